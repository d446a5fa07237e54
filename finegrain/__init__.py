"""finegrain: transfer learning for fine-grained classification and retrieval on the assembled CNN.

The public API (`finegrain.create_model`, ...) loads `finegrain.models`, and with it torch, on
first use: `import finegrain` alone, as the CLI does before reading its arguments, stays instant.
"""
from __future__ import annotations

import importlib
import os
from typing import Any

__version__ = "0.1.0"
# albumentations otherwise asks PyPI for a newer version at import; finegrain runs offline.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

_FROM_MODELS = ("create_embedder", "create_model", "load_model", "save_model")

__all__ = ["__version__", *_FROM_MODELS]


def __getattr__(name: str) -> Any:
    """Import finegrain.models when one of its public names is first asked for (PEP 562)."""
    if name in _FROM_MODELS:
        value = getattr(importlib.import_module("finegrain.models"), name)
        globals()[name] = value  # later look-ups skip this function
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_FROM_MODELS})
