"""The retrieval recipe (paper Section 4.4, Appendix C): the common recipe plus the metric loss,
the embedding head and the evaluation's K values."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from finegrain.recipes.schema import Recipe, Rule

MAX_EMBEDDING_SIZE = 65536


@dataclass
class LossConfig:
    """A loss by name: "arcface" / "softmax" (paper units) or any pml loss class with pml's args."""

    name: str = "arcface"
    args: dict[str, Any] = field(default_factory=dict)
    # lr multiplier of the loss's own parameters (class weights, proxies): they start random
    # while the backbone is pretrained, so they may learn faster. The paper gives none.
    lr_mult: float = 1.0


@dataclass
class RetrievalConfig:
    loss: LossConfig = field(default_factory=LossConfig)
    embedding_size: int = 1536  # "feature size" of Appendix C
    gem_p: float = 3.0  # the release's fixed p
    gem_learnable: bool = False
    # Learnable p: its own group without weight decay; 10x lr as in Radenovic et al.'s cirtorch.
    gem_lr_mult: float = 10.0
    recall_ks: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    # Batches of m images per class (pml's MPerClassSampler), for pair-based losses; null: random.
    m_per_class: int | None = None


@dataclass
class RetrievalRecipe(Recipe):
    """The common recipe plus a `retrieval` section. Retrieval evaluates whole images resized to
    data.eval_resize squared (no crop), so data.eval_crop must be null or the same size."""

    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)

    def rules(self) -> list[Rule]:
        section, m = self.retrieval, self.retrieval.m_per_class
        return [
            *super().rules(),
            (not 1 <= section.embedding_size <= MAX_EMBEDDING_SIZE,
             "retrieval.embedding_size", f"in [1, {MAX_EMBEDDING_SIZE}]"),
            (not section.recall_ks or min(section.recall_ks) < 1, "retrieval.recall_ks", "a non-empty list of K >= 1"),
            (section.loss.lr_mult <= 0, "retrieval.loss.lr_mult", "positive"),
            (section.gem_lr_mult <= 0, "retrieval.gem_lr_mult", "positive"),
            (section.gem_p <= 0, "retrieval.gem_p", "positive"),
            (m is not None and (m < 1 or self.train.batch_size % m > 0),
             "retrieval.m_per_class", f"a divisor of train.batch_size ({self.train.batch_size}) or null"),
            (self.regularization.mixup.type is not None,
             "regularization.mixup.type", "null for retrieval (metric losses take class ids, not mixed labels)"),
            (self.regularization.kd.logits is not None,
             "regularization.kd.logits", "null for retrieval (it has no distillation)"),
            (self.data.eval_crop is not None and self.data.eval_crop != self.data.eval_resize,
             "data.eval_crop", "null or equal to data.eval_resize (retrieval does not crop)"),
        ]
