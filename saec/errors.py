"""The kind of error a user can act on.

An error of this kind carries a message that says what is wrong and what to do. The command
line prints it as one line, without a traceback, and Prefect's logs show its message without
one too; any other exception is a fault of the program and keeps its traceback.
"""
from __future__ import annotations


class ActionableError(Exception):
    """Base of errors whose message names the problem and the fix."""
