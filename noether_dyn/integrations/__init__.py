"""Callbacks for training frameworks, one line each (optional extras, imported on first use).

- ``noether_dyn.integrations.lightning.NoetherCallback``: a Lightning ``Callback``
  (``pip install noether-dyn[lightning]``).
- ``noether_dyn.integrations.hf.NoetherTrainerCallback``: a Hugging Face ``TrainerCallback``
  (``pip install noether-dyn[hf]``).

Importing this package imports neither framework; each submodule imports its own on first use.
"""

from __future__ import annotations

from typing import Any

_LAZY = {
    "NoetherCallback": "noether_dyn.integrations.lightning",
    "NoetherTrainerCallback": "noether_dyn.integrations.hf",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'noether_dyn.integrations' has no attribute {name!r}")
