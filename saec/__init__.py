"""SAEC: scene-aware edge-cloud visual inspection."""

__version__ = "0.1.0"
