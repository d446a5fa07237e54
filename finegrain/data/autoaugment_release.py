"""The release's AutoAugment: its policies with the TF magnitudes of its preprocessing/autoaugment.py,
applied with torchvision.transforms.v2 ops.

torchvision's own policies ("imagenet", "cifar10") bin each magnitude range into 10 steps of
their own; the release maps a level L in 0-10 the TF way, and its FGVC script uses the `good`
policy: 95 sub-policies found on CIFAR-10 (torchvision's CIFAR10 policy holds 25 of them), with
translate_const 250, so a level-9 translation moves a 224 image by 225 pixels (torchvision: at
most ~101), leaving only the grey fill. The policies are data; `ReleaseAutoAugment` applies one.

As in the release: one sub-policy drawn uniformly per image, each of its operations applied with
its probability, geometric operations with nearest sampling and grey (128) fill, shears about
the top-left corner, a random sign on rotations, shears and translations. Every draw comes from
torch's RNG, which the training loader seeds per sample (finegrain.data.transforms).
Differences in the pixel arithmetic are listed in docs/fidelity.md (contrast blends toward the
image's mean grey here; the release's TF code blends toward H*W/256).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

from finegrain.errors import FinegrainError

Operation = tuple[str, float, int]  # (name, probability, level in 0-10)
SubPolicy = tuple[Operation, ...]

MAX_LEVEL = 10
TRANSLATE_CONST = 250  # the release's augmentation_hparams
CUTOUT_CONST = 100
FILL = 128  # the release's replace value for pixels moved in from outside the image

# good_policies() of the release, in its order (exp0s + exp1s + exp2s).
GOOD_POLICY: tuple[SubPolicy, ...] = (
    # exp0_0
    (("Invert", 0.1, 7), ("Contrast", 0.2, 6)),
    (("Rotate", 0.7, 2), ("TranslateX", 0.3, 9)),
    (("Sharpness", 0.8, 1), ("Sharpness", 0.9, 3)),
    (("ShearY", 0.5, 8), ("TranslateY", 0.7, 9)),
    (("AutoContrast", 0.5, 8), ("Equalize", 0.9, 2)),
    # exp0_1
    (("Solarize", 0.4, 5), ("AutoContrast", 0.9, 3)),
    (("TranslateY", 0.9, 9), ("TranslateY", 0.7, 9)),
    (("AutoContrast", 0.9, 2), ("Solarize", 0.8, 3)),
    (("Equalize", 0.8, 8), ("Invert", 0.1, 3)),
    (("TranslateY", 0.7, 9), ("AutoContrast", 0.9, 1)),
    # exp0_2
    (("Solarize", 0.4, 5), ("AutoContrast", 0.0, 2)),
    (("TranslateY", 0.7, 9), ("TranslateY", 0.7, 9)),
    (("AutoContrast", 0.9, 0), ("Solarize", 0.4, 3)),
    (("Equalize", 0.7, 5), ("Invert", 0.1, 3)),
    (("TranslateY", 0.7, 9), ("TranslateY", 0.7, 9)),
    # exp0_3
    (("Solarize", 0.4, 5), ("AutoContrast", 0.9, 1)),
    (("TranslateY", 0.8, 9), ("TranslateY", 0.9, 9)),
    (("AutoContrast", 0.8, 0), ("TranslateY", 0.7, 9)),
    (("TranslateY", 0.2, 7), ("Color", 0.9, 6)),
    (("Equalize", 0.7, 6), ("Color", 0.4, 9)),
    # exp1_0
    (("ShearY", 0.2, 7), ("Posterize", 0.3, 7)),
    (("Color", 0.4, 3), ("Brightness", 0.6, 7)),
    (("Sharpness", 0.3, 9), ("Brightness", 0.7, 9)),
    (("Equalize", 0.6, 5), ("Equalize", 0.5, 1)),
    (("Contrast", 0.6, 7), ("Sharpness", 0.6, 5)),
    # exp1_1
    (("Brightness", 0.3, 7), ("AutoContrast", 0.5, 8)),
    (("AutoContrast", 0.9, 4), ("AutoContrast", 0.5, 6)),
    (("Solarize", 0.3, 5), ("Equalize", 0.6, 5)),
    (("TranslateY", 0.2, 4), ("Sharpness", 0.3, 3)),
    (("Brightness", 0.0, 8), ("Color", 0.8, 8)),
    # exp1_2
    (("Solarize", 0.2, 6), ("Color", 0.8, 6)),
    (("Solarize", 0.2, 6), ("AutoContrast", 0.8, 1)),
    (("Solarize", 0.4, 1), ("Equalize", 0.6, 5)),
    (("Brightness", 0.0, 0), ("Solarize", 0.5, 2)),
    (("AutoContrast", 0.9, 5), ("Brightness", 0.5, 3)),
    # exp1_3
    (("Contrast", 0.7, 5), ("Brightness", 0.0, 2)),
    (("Solarize", 0.2, 8), ("Solarize", 0.1, 5)),
    (("Contrast", 0.5, 1), ("TranslateY", 0.2, 9)),
    (("AutoContrast", 0.6, 5), ("TranslateY", 0.0, 9)),
    (("AutoContrast", 0.9, 4), ("Equalize", 0.8, 4)),
    # exp1_4
    (("Brightness", 0.0, 7), ("Equalize", 0.4, 7)),
    (("Solarize", 0.2, 5), ("Equalize", 0.7, 5)),
    (("Equalize", 0.6, 8), ("Color", 0.6, 2)),
    (("Color", 0.3, 7), ("Color", 0.2, 4)),
    (("AutoContrast", 0.5, 2), ("Solarize", 0.7, 2)),
    # exp1_5
    (("AutoContrast", 0.2, 0), ("Equalize", 0.1, 0)),
    (("ShearY", 0.6, 5), ("Equalize", 0.6, 5)),
    (("Brightness", 0.9, 3), ("AutoContrast", 0.4, 1)),
    (("Equalize", 0.8, 8), ("Equalize", 0.7, 7)),
    (("Equalize", 0.7, 7), ("Solarize", 0.5, 0)),
    # exp1_6
    (("Equalize", 0.8, 4), ("TranslateY", 0.8, 9)),
    (("TranslateY", 0.8, 9), ("TranslateY", 0.6, 9)),
    (("TranslateY", 0.9, 0), ("TranslateY", 0.5, 9)),
    (("AutoContrast", 0.5, 3), ("Solarize", 0.3, 4)),
    (("Solarize", 0.5, 3), ("Equalize", 0.4, 4)),
    # exp2_0
    (("Color", 0.7, 7), ("TranslateX", 0.5, 8)),
    (("Equalize", 0.3, 7), ("AutoContrast", 0.4, 8)),
    (("TranslateY", 0.4, 3), ("Sharpness", 0.2, 6)),
    (("Brightness", 0.9, 6), ("Color", 0.2, 8)),
    (("Solarize", 0.5, 2), ("Invert", 0.0, 3)),
    # exp2_1
    (("AutoContrast", 0.1, 5), ("Brightness", 0.0, 0)),
    (("Cutout", 0.2, 4), ("Equalize", 0.1, 1)),
    (("Equalize", 0.7, 7), ("AutoContrast", 0.6, 4)),
    (("Color", 0.1, 8), ("ShearY", 0.2, 3)),
    (("ShearY", 0.4, 2), ("Rotate", 0.7, 0)),
    # exp2_2
    (("ShearY", 0.1, 3), ("AutoContrast", 0.9, 5)),
    (("TranslateY", 0.3, 6), ("Cutout", 0.3, 3)),
    (("Equalize", 0.5, 0), ("Solarize", 0.6, 6)),
    (("AutoContrast", 0.3, 5), ("Rotate", 0.2, 7)),
    (("Equalize", 0.8, 2), ("Invert", 0.4, 0)),
    # exp2_3
    (("Equalize", 0.9, 5), ("Color", 0.7, 0)),
    (("Equalize", 0.1, 1), ("ShearY", 0.1, 3)),
    (("AutoContrast", 0.7, 3), ("Equalize", 0.7, 0)),
    (("Brightness", 0.5, 1), ("Contrast", 0.1, 7)),
    (("Contrast", 0.1, 4), ("Solarize", 0.6, 5)),
    # exp2_4
    (("Solarize", 0.2, 3), ("ShearX", 0.0, 0)),
    (("TranslateX", 0.3, 0), ("TranslateX", 0.6, 0)),
    (("Equalize", 0.5, 9), ("TranslateY", 0.6, 7)),
    (("ShearX", 0.1, 0), ("Sharpness", 0.5, 1)),
    (("Equalize", 0.8, 6), ("Invert", 0.3, 6)),
    # exp2_5
    (("AutoContrast", 0.3, 9), ("Cutout", 0.5, 3)),
    (("ShearX", 0.4, 4), ("AutoContrast", 0.9, 2)),
    (("ShearX", 0.0, 3), ("Posterize", 0.0, 3)),
    (("Solarize", 0.4, 3), ("Color", 0.2, 4)),
    (("Equalize", 0.1, 4), ("Equalize", 0.7, 6)),
    # exp2_6
    (("Equalize", 0.3, 8), ("AutoContrast", 0.4, 3)),
    (("Solarize", 0.6, 4), ("AutoContrast", 0.7, 6)),
    (("AutoContrast", 0.2, 9), ("Brightness", 0.4, 8)),
    (("Equalize", 0.1, 0), ("Equalize", 0.0, 6)),
    (("Equalize", 0.8, 4), ("Equalize", 0.0, 4)),
    # exp2_7
    (("Equalize", 0.5, 5), ("AutoContrast", 0.1, 2)),
    (("Solarize", 0.5, 5), ("AutoContrast", 0.9, 5)),
    (("AutoContrast", 0.6, 1), ("AutoContrast", 0.7, 8)),
    (("Equalize", 0.2, 0), ("AutoContrast", 0.1, 2)),
    (("Equalize", 0.6, 9), ("Equalize", 0.4, 4)),
)

# imagenet_policies() of the release (the published ImageNet policy, TF magnitudes).
IMAGENET_POLICY: tuple[SubPolicy, ...] = (
    # exp0_0
    (("Posterize", 0.4, 8), ("Rotate", 0.6, 9)),
    (("Solarize", 0.6, 5), ("AutoContrast", 0.6, 5)),
    (("Equalize", 0.8, 8), ("Equalize", 0.6, 3)),
    (("Posterize", 0.6, 7), ("Posterize", 0.6, 6)),
    (("Equalize", 0.4, 7), ("Solarize", 0.2, 4)),
    # exp1_0
    (("Equalize", 0.4, 4), ("Rotate", 0.8, 8)),
    (("Solarize", 0.6, 3), ("Equalize", 0.6, 7)),
    (("Posterize", 0.8, 5), ("Equalize", 1.0, 2)),
    (("Rotate", 0.2, 3), ("Solarize", 0.6, 8)),
    (("Equalize", 0.6, 8), ("Posterize", 0.4, 6)),
    # exp2_0
    (("Rotate", 0.8, 8), ("Color", 0.4, 0)),
    (("Rotate", 0.4, 9), ("Equalize", 0.6, 2)),
    (("Equalize", 0.0, 7), ("Equalize", 0.8, 8)),
    (("Invert", 0.6, 4), ("Equalize", 1.0, 8)),
    (("Color", 0.6, 4), ("Contrast", 1.0, 8)),
    # exp3_0
    (("Rotate", 0.8, 8), ("Color", 1.0, 2)),
    (("Color", 0.8, 8), ("Solarize", 0.8, 7)),
    (("Sharpness", 0.4, 7), ("Invert", 0.6, 8)),
    (("ShearX", 0.6, 5), ("Equalize", 1.0, 9)),
    (("Color", 0.4, 0), ("Equalize", 0.6, 3)),
    # exp4_0
    (("Equalize", 0.4, 7), ("Solarize", 0.2, 4)),
    (("Solarize", 0.6, 5), ("AutoContrast", 0.6, 5)),
    (("Invert", 0.6, 4), ("Equalize", 1.0, 8)),
    (("Color", 0.6, 4), ("Contrast", 1.0, 8)),
    (("Equalize", 0.8, 8), ("Equalize", 0.6, 3)),
)

POLICIES = {"release_good": GOOD_POLICY, "release_imagenet": IMAGENET_POLICY}
SIGNED = {"Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY"}


def magnitude(name: str, level: int) -> float:
    """The argument the release's level_to_arg gives operation `name` at `level` (before the random
    sign of SIGNED operations); 0 for operations without one."""
    fraction = level / MAX_LEVEL
    if name == "Rotate":
        return fraction * 30.0  # degrees
    if name in ("ShearX", "ShearY"):
        return fraction * 0.3
    if name in ("TranslateX", "TranslateY"):
        return fraction * TRANSLATE_CONST  # pixels
    if name in ("Color", "Contrast", "Brightness", "Sharpness"):
        return fraction * 1.8 + 0.1  # enhancement factor, 1 = unchanged
    if name == "Posterize":
        return int(fraction * 4)  # bits kept
    if name == "Solarize":
        return int(fraction * 256)  # threshold
    if name == "Cutout":
        return int(fraction * CUTOUT_CONST)  # half side of the square
    if name in ("AutoContrast", "Equalize", "Invert"):
        return 0.0
    raise FinegrainError(f"AutoAugment operation {name!r} is not one of the release's. "
                         f"Use one of: {', '.join(sorted(OPERATIONS))}.")


def _shear(image: Tensor, value: float, axis: int) -> Tensor:
    shear = [0.0, 0.0]
    shear[axis] = math.degrees(math.atan(value))
    return F.affine(image, angle=0.0, translate=[0, 0], scale=1.0, shear=shear,
                    interpolation=InterpolationMode.NEAREST, fill=[FILL] * 3, center=[0, 0])


def _translate(image: Tensor, value: float, axis: int) -> Tensor:
    offset = [0, 0]
    offset[axis] = int(value)
    return F.affine(image, angle=0.0, translate=offset, scale=1.0, shear=[0.0, 0.0],
                    interpolation=InterpolationMode.NEAREST, fill=[FILL] * 3)


def _solarize(image: Tensor, threshold: float) -> Tensor:
    # The release inverts pixels >= threshold; a threshold above 255 inverts none.
    return image if threshold > 255 else F.solarize(image, threshold)


def _cutout(image: Tensor, half_side: float) -> Tensor:
    """A grey square of side 2 * half_side centred on a uniform pixel, clipped to the image."""
    height, width = image.shape[-2:]
    y, x = int(torch.randint(height, ())), int(torch.randint(width, ()))
    half = int(half_side)
    image = image.clone()
    image[..., max(0, y - half):min(height, y + half), max(0, x - half):min(width, x + half)] = FILL
    return image


OPERATIONS = {
    "AutoContrast": lambda image, _: F.autocontrast(image),
    "Equalize": lambda image, _: F.equalize(image),
    "Invert": lambda image, _: F.invert(image),
    "Rotate": lambda image, degrees: F.rotate(image, degrees, interpolation=InterpolationMode.NEAREST,
                                              fill=[FILL] * 3),
    "Posterize": lambda image, bits: F.posterize(image, int(bits)),
    "Solarize": _solarize,
    "Color": F.adjust_saturation,
    "Contrast": F.adjust_contrast,
    "Brightness": F.adjust_brightness,
    "Sharpness": F.adjust_sharpness,
    "ShearX": lambda image, value: _shear(image, value, 0),
    "ShearY": lambda image, value: _shear(image, value, 1),
    "TranslateX": lambda image, value: _translate(image, value, 0),
    "TranslateY": lambda image, value: _translate(image, value, 1),
    "Cutout": _cutout,
}


def apply_operation(image: Tensor, name: str, level: int) -> Tensor:
    """One operation at `level` on a uint8 [3, H, W] image, with the release's random sign."""
    value = magnitude(name, level)
    if name in SIGNED and bool(torch.rand(()) < 0.5):
        value = -value
    return OPERATIONS[name](image, value)


class ReleaseAutoAugment:
    """A policy of the release (a key of POLICIES) as a uint8 [3, H, W] -> uint8 transform."""

    def __init__(self, policy: str) -> None:
        if policy not in POLICIES:
            raise FinegrainError(f"Unknown release AutoAugment policy {policy!r}. Use one of: {', '.join(POLICIES)}.")
        self.policy = policy
        self.sub_policies = POLICIES[policy]

    def __call__(self, image: Tensor) -> Tensor:
        for name, probability, level in self.sub_policies[int(torch.randint(len(self.sub_policies), ()))]:
            if bool(torch.rand(()) < probability):
                image = apply_operation(image, name, level)
        return image

    def __repr__(self) -> str:
        return f"ReleaseAutoAugment({self.policy!r}, {len(self.sub_policies)} sub-policies)"
