"""The backbone pretraining recipe (paper Section 3, Tables 7 and 9)."""
from __future__ import annotations

from dataclasses import dataclass

from finegrain.recipes.schema import Recipe


@dataclass
class BackboneRecipe(Recipe):
    """The common recipe plus `kd_required`: the paper's KD experiments (E7, E11, E12, M5, M8)
    refuse to start without teacher logits instead of silently training another experiment."""

    kd_required: bool = False
