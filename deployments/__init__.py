"""Prefect deployments of the SAEC flows (prefect.yaml) and the code that applies or serves them."""
