"""Errors of the run store."""

from __future__ import annotations


class StoreError(RuntimeError):
    """A run store that cannot be read or written: the message names the path and the fix."""
