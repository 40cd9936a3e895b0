"""Errors and warnings of the run store."""

from __future__ import annotations


class StoreError(RuntimeError):
    """A run store that cannot be read or written: the message names the path and the fix."""


class StoreLockedError(StoreError):
    """Another live writer holds the run directory: the message names it (pid, host, since)."""


class StoreWriteError(StoreError):
    """A write to the store failed (disk full, read-only storage, I/O error): the message names
    the path and the cause; every flush that completed before it stays in the store."""


class StoreWarning(UserWarning):
    """Something at ``RunWriter.close()`` could not be finished (the message names the path);
    every completed flush is still in the store."""
