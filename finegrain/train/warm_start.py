"""Starting a run's network from backbone weights, shared by fine-tuning (fgvc), retrieval and
pretraining: one place decides the architecture, loads everything but the head and says so."""
from __future__ import annotations

from typing import Any, Callable

from torch import nn

from finegrain.models import load_backbone_weights
from finegrain.models.factory import warm_start_architecture
from finegrain.recipes import Recipe


def loud_warning(message: str, echo: Callable[[str], None]) -> None:
    """A message framed in '!' so that it stands out of a training log."""
    bar = "!" * 78
    echo(f"{bar}\n!! {message}\n{bar}")


def warm_start(build: Callable[[str, dict[str, Any]], nn.Module], recipe: Recipe, echo: Callable[[str], None],
               resuming: bool, without_weights: str | None) -> nn.Module:
    """The recipe's network, made by `build(name, overrides)`, with recipe.model.weights loaded
    into everything but its head, saying so.

    A weights file that records its architecture (a `finegrain convert` or training output)
    decides the network when the recipe's does not fit it. Without weights, warn loudly
    (`without_weights` says why it matters) where the recipe expects them; the demos and
    pretraining (None) start from scratch on purpose.
    """
    name, overrides, weights = recipe.model.name, dict(recipe.model.overrides), recipe.model.weights
    if not weights:
        if not resuming and without_weights and recipe.model.expects_weights:
            loud_warning(f"No backbone weights: {name} starts from RANDOM INITIALISATION. {without_weights}", echo)
        return build(name, overrides)
    name, overrides, note = warm_start_architecture(name, overrides, weights)
    if note and not resuming:
        echo(note)
    model = build(name, overrides)
    counts = load_backbone_weights(model, weights, reset_bn_stats=recipe.model.reset_bn_stats)
    if not resuming:
        echo(f"warm start from {weights}: {counts['loaded']} tensors loaded, {counts['skipped']} (head) skipped")
    return model
