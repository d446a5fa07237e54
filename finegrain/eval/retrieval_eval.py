"""Retrieval evaluation of an embedder: its embeddings of a loader, and Recall@K / MAP@R of a
checkpoint on a split's (unseen) classes. The metrics themselves are in eval/retrieval.py."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Sequence

import torch
from torch import Tensor, nn

from finegrain.data.base import Split
from finegrain.errors import FinegrainError
from finegrain.eval.inference import InferenceOptions, Predictor, embedding_mode

if TYPE_CHECKING:
    from finegrain.eval.query_gallery import QueryGalleryReport
    from finegrain.eval.rerank import Rerank
    from finegrain.eval.retrieval import RetrievalReport


def embed_loader(model: nn.Module, loader: Iterable, device: torch.device, dtype: torch.dtype | None = None,
                 channels_last: bool = False, progress: bool = False) -> tuple[Tensor, Tensor]:
    """(embeddings [N, E] fp32 on the CPU, labels [N] int64) of an embedder over `loader`, in
    loader order, by the one predictor (eager, `dtype` autocast; the model's mode kept)."""
    if embedding_mode(model) != "forward_embedding":
        raise FinegrainError(f"{getattr(model, 'arch', type(model).__name__)} has no forward_embedding. "
                             "Evaluate an embedder checkpoint (from `finegrain retrieval`).")
    return Predictor(model, device, InferenceOptions(dtype=dtype, channels_last=channels_last)).predict(
        loader, embeddings=True, progress=progress)


def evaluate_retrieval(weights: str | Path, test: Split, recall_ks: Sequence[int], batch_size: int = 64,
                       workers: int = 2, device: torch.device | None = None, progress: bool = True, *,
                       gallery: Split | None = None, rerank: Rerank | None = None,
                       singletons: str = "exclude") -> RetrievalReport | QueryGalleryReport:
    """Recall@K and MAP@R of an embedder checkpoint on `test` (a zero-shot split: classes unseen
    in training), preprocessed as the checkpoint records (its eval size squared, no crop), in FP32.
    With `gallery` (labelled over the same classes), `test` is the query set searched in it.
    `singletons`: queries with no correct answer are left out ("exclude") or counted as misses
    ("miss", the authors' release, so its numbers can be compared)."""
    from finegrain.data import ImageDataset
    from finegrain.data.loaders import eval_loader
    from finegrain.eval.embed import image_transform
    from finegrain.eval.query_gallery import SINGLETON_RULES, query_gallery_metrics, singletons_as_misses
    from finegrain.eval.retrieval import retrieval_metrics
    from finegrain.models import load_model
    from finegrain.runtime import default_device

    if singletons not in SINGLETON_RULES:  # before minutes of embedding
        raise FinegrainError(f"singletons (--singletons) must be exclude or miss, got {singletons!r}. Pass exclude "
                             "to leave out queries with nothing of their class to find, or miss to count them as "
                             "misses as the authors' release did.")
    device = device or default_device()
    model = load_model(weights)
    transform = image_transform(model, model.preprocessing)
    parts = [test] if gallery is None else [test, gallery]
    embedded = [embed_loader(model, eval_loader(ImageDataset(part.samples, transform), batch_size, workers,
                                                device.type == "cuda"), device, progress=progress) for part in parts]
    if gallery is None:
        report = retrieval_metrics(*embedded[0], recall_ks, device=device, rerank=rerank)
        return singletons_as_misses(report) if singletons == "miss" else report
    return query_gallery_metrics(*embedded[0], *embedded[1], recall_ks, device=device, rerank=rerank,
                                 singletons=singletons)
