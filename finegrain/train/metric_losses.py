"""Retrieval losses: thin wrappers of pytorch-metric-learning (pml), picked by name.

`arcface` and `softmax` are the paper's losses (Section 4.4, Table 17) with arguments in the
paper's units; any other pml loss is taken by its class name with pml's own arguments, e.g.
`{name: TripletMarginLoss, args: {margin: 0.1}}`. Shapes: embeddings [B, E] float, labels [B]
int64 class ids in [0, num_classes).
"""
from __future__ import annotations

import inspect
import math
from typing import Any, Callable

import torch
from torch import Tensor, nn

from finegrain.errors import FinegrainError

# ArcFace scale: the paper gives none. 64 is ArcFace's own (Deng et al. 2019, also pml's default),
# chosen for many classes (SOP trains on 11,318): with s = 30 the softmax over so many classes
# cannot get confident enough (Wang et al., "NormFace": the needed scale grows with log C).
ARCFACE_SCALE = 64.0
ARCFACE_MARGIN_RADIANS = 0.3  # paper Section 4.4
# Normalised-softmax temperature 0.05 (scale 20): Zhai & Wu, "Classification is a Strong Baseline
# for Deep Metric Learning" (BMVC 2019), the cosine softmax used for CUB200 / CARS196; pml's default.
SOFTMAX_TEMPERATURE = 0.05


def arcface_arguments(margin_radians: float = ARCFACE_MARGIN_RADIANS, scale: float = ARCFACE_SCALE) -> dict[str, float]:
    """pml ArcFaceLoss arguments for the paper's margin in RADIANS: pml takes DEGREES
    (it converts back with np.radians), so 0.3 rad becomes 17.19 degrees."""
    return {"margin": math.degrees(margin_radians), "scale": scale}


def softmax_arguments(temperature: float = SOFTMAX_TEMPERATURE) -> dict[str, float]:
    """pml NormalizedSoftmaxLoss: cross-entropy over cos(embedding, class weight) / temperature."""
    return {"temperature": temperature}


# Our names for the paper's losses: (pml class name, argument translation in the paper's units).
ALIASES: dict[str, tuple[str, Callable[..., dict[str, Any]]]] = {
    "arcface": ("ArcFaceLoss", arcface_arguments),
    "softmax": ("NormalizedSoftmaxLoss", softmax_arguments),
}
# Constructor arguments filled in from the model and data, never from the recipe.
_SHAPE_ARGUMENTS = ("num_classes", "embedding_size", "descriptors_dim")
_ABSTRACT = {"BaseMetricLossFunction", "GenericPairLoss"}


def pml_loss_classes() -> dict[str, type]:
    """Every pml loss usable on (embeddings, labels): BaseMetricLossFunction subclasses by name."""
    from pytorch_metric_learning import losses

    return {name: cls for name, cls in vars(losses).items()
            if inspect.isclass(cls) and issubclass(cls, losses.BaseMetricLossFunction) and name not in _ABSTRACT}


def available_losses() -> list[str]:
    return sorted(ALIASES) + sorted(pml_loss_classes())


def _constructor_arguments(cls: type) -> set[str]:
    """Named constructor arguments of `cls`, following **kwargs up the class hierarchy (pml
    subclasses such as CosFaceLoss pass num_classes on to their base)."""
    names: set[str] = set()
    for klass in cls.__mro__:
        if "__init__" not in vars(klass):
            continue
        parameters = inspect.signature(klass.__init__).parameters.values()
        names |= {p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)} - {"self"}
        if not any(p.kind is p.VAR_KEYWORD for p in parameters):
            break
    return names


def _resolve_class(name: str) -> type:
    classes = pml_loss_classes()
    if name in classes:
        return classes[name]
    folded = {key.lower(): cls for key, cls in classes.items()}
    if name.lower() in folded:
        return folded[name.lower()]
    raise FinegrainError(f"Unknown retrieval loss {name!r}. Use one of: {', '.join(available_losses())}.")


class MetricLoss(nn.Module):
    """A pml loss on L2-normalised embeddings, always computed in FP32 outside autocast.

    FP32 matters beyond precision: pml's classification losses cast their class-weight
    Parameter in place to the embeddings' dtype, which under bf16 autocast would silently turn
    the trained weights into bf16.
    """

    def __init__(self, name: str, loss: nn.Module) -> None:
        super().__init__()
        self.name = name
        self.loss = loss

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        with torch.autocast(device_type=embeddings.device.type, enabled=False):
            return self.loss(embeddings.float(), labels)

    def extra_repr(self) -> str:
        return f"name={self.name!r}"


def enable_label_smoothing(loss: nn.Module, smoothing: float, name: str) -> None:
    """Label smoothing for pml's softmax-over-classes losses (NormalizedSoftmax, ArcFace, CosFace,
    ...): they all apply their `cross_entropy` criterion to their own (margin-adjusted, scaled)
    logits, so giving it torch's label_smoothing smooths exactly those targets, TF-style
    (1 - eps) * onehot + eps / C."""
    if not isinstance(getattr(loss, "cross_entropy", None), nn.CrossEntropyLoss):
        raise FinegrainError(f"Label smoothing needs a softmax over classes; {name} has none. "
                             "Set regularization.label_smoothing=0, or use softmax, arcface or CosFaceLoss.")
    loss.cross_entropy = nn.CrossEntropyLoss(reduction="none", label_smoothing=smoothing)


def create_metric_loss(name: str, num_classes: int, embedding_size: int, args: dict[str, Any] | None = None,
                       label_smoothing: float = 0.0) -> MetricLoss:
    """Build a loss by name: an alias ("arcface", "softmax") with the paper's argument units, or any
    pml loss class name with pml's arguments; num_classes / embedding_size are filled in."""
    args = dict(args or {})
    if name in ALIASES:
        pml_name, translate = ALIASES[name]
        valid = set(inspect.signature(translate).parameters)
        unknown = sorted(set(args) - valid)
        if unknown:
            raise FinegrainError(f"Loss {name} does not take {', '.join(unknown)}. Its arguments: "
                                 f"{', '.join(sorted(valid))}; or use pml's {pml_name} with its own arguments.")
        cls, kwargs = _resolve_class(pml_name), translate(**args)
    else:
        cls, kwargs = _resolve_class(name), args
    accepted = _constructor_arguments(cls)
    given_shape = sorted(set(kwargs) & set(_SHAPE_ARGUMENTS))
    if given_shape:
        raise FinegrainError(f"Do not set {', '.join(given_shape)} in the loss arguments: they come from the "
                             "data and the embedding size. Remove them from the recipe.")
    shapes = {"num_classes": num_classes, "embedding_size": embedding_size, "descriptors_dim": embedding_size}
    kwargs.update({key: value for key, value in shapes.items() if key in accepted})
    try:
        loss = cls(**kwargs)
    except TypeError as error:
        raise FinegrainError(f"{cls.__name__} rejected the arguments {sorted(args)} ({error}). Its arguments: "
                             f"{', '.join(sorted(accepted - set(_SHAPE_ARGUMENTS)))}.") from None
    if label_smoothing:
        enable_label_smoothing(loss, label_smoothing, cls.__name__)
    return MetricLoss(name, loss)
