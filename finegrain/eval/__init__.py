"""Evaluation: classification, retrieval (Recall@K, MAP@R), robustness, throughput, embedding.

The retrieval metrics load on first use (faiss takes a moment to import).
"""
from __future__ import annotations

from typing import Any

_RETRIEVAL = ("RetrievalReport", "map_at_r", "recall_at_k", "retrieval_metrics")
__all__ = list(_RETRIEVAL)


def __getattr__(name: str) -> Any:
    if name in _RETRIEVAL:
        from finegrain.eval import retrieval

        return getattr(retrieval, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
