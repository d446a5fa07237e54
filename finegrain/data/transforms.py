"""The paper's preprocessing presets: uint8 HxWx3 RGB array -> normalised float CxHxW tensor.

Geometry runs in albumentations (OpenCV, fast on uint8), AutoAugment in torchvision.transforms.v2
(albumentations has no AutoAugment), normalisation last: (pixel - mean) / std in 0-255 scale.
Resampling is bilinear, as in the authors' TF pipeline.
"""
from __future__ import annotations

import os
import random
from typing import Callable

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # its import would otherwise query PyPI

import albumentations as A  # noqa: E402
import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torchvision.transforms import v2  # noqa: E402

from finegrain.data.autoaugment_release import POLICIES as RELEASE_POLICIES  # noqa: E402
from finegrain.data.autoaugment_release import ReleaseAutoAugment  # noqa: E402
from finegrain.errors import FinegrainError  # noqa: E402
from finegrain.preprocessing import Preprocessing  # noqa: E402

# torchvision's policies (their own magnitudes); the release's (TF magnitudes) are RELEASE_POLICIES.
AUTOAUGMENT_POLICIES = {"imagenet": v2.AutoAugmentPolicy.IMAGENET, "cifar10": v2.AutoAugmentPolicy.CIFAR10}
PixelOps = Callable[[torch.Tensor], torch.Tensor]
_LINEAR = cv2.INTER_LINEAR


class ImageTransform:
    """albumentations geometry -> optional torchvision pixel ops -> normalise; picklable for workers.

    albumentations keeps its own random state, which every DataLoader worker would inherit
    identically (same crops in every worker). A random transform therefore reseeds it from
    torch's RNG on each call, as AutoAugment draws from it: the training loader seeds that RNG
    per sample from the sample's place in the run (finegrain.data.loaders), so a resumed run
    repeats every augmentation.
    """

    def __init__(self, geometry: list[A.BasicTransform], pre: Preprocessing,
                 pixel_ops: PixelOps | None = None, stochastic: bool = True) -> None:
        self.geometry = A.Compose(geometry)
        self.pixel_ops = pixel_ops
        self.normalize = v2.Normalize(mean=list(pre.mean), std=list(pre.std))
        self.stochastic = stochastic

    def __call__(self, image: np.ndarray) -> torch.Tensor:
        if self.stochastic:
            seed = int(torch.randint(0, 2**62, (1,)))
            self.geometry.set_random_state(np.random.default_rng(seed), random.Random(seed))
        array = self.geometry(image=image)["image"]
        tensor = torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1)
        if self.pixel_ops is not None:
            tensor = self.pixel_ops(tensor)
        return self.normalize(tensor.float()).contiguous()

    def __repr__(self) -> str:
        return f"ImageTransform(geometry={self.geometry}, pixel_ops={self.pixel_ops}, normalize={self.normalize})"


def train_transform(pre: Preprocessing, autoaugment: str | None = None, crop_min_area: float = 0.05) -> ImageTransform:
    """Random resized crop (5%-100% of the area by default, aspect 3/4-4/3) to `pre.train_size`,
    horizontal flip, optional AutoAugment on the resized crop, as the release applies it
    ("release_imagenet" for backbones, "release_good" for FGVC; torchvision's "imagenet", "cifar10")."""
    geometry = [
        A.RandomResizedCrop(size=(pre.train_size, pre.train_size), scale=(crop_min_area, 1.0), ratio=(3 / 4, 4 / 3),
                            interpolation=_LINEAR),
        A.HorizontalFlip(p=0.5),
    ]
    return ImageTransform(geometry, pre, _autoaugment(autoaugment))


def eval_transform(pre: Preprocessing) -> ImageTransform:
    """Resize the short side to `pre.resize`, centre-crop `pre.crop` (256 -> 224; 292 -> 256 for BL models)."""
    if pre.resize < pre.crop:
        raise FinegrainError(f"Eval resize {pre.resize} is smaller than the crop {pre.crop}. Use resize >= crop.")
    geometry = [A.SmallestMaxSize(max_size=pre.resize, interpolation=_LINEAR), A.CenterCrop(pre.crop, pre.crop)]
    return ImageTransform(geometry, pre, stochastic=False)


def retrieval_train_transform(pre: Preprocessing, size: int = 224, autoaugment: str | None = None) -> ImageTransform:
    """Paper Appendix C: with p 0.5 resize to size x size ignoring aspect, else resize to
    round(size * 256 / 224) square and random-crop size x size; then horizontal flip; optional
    AutoAugment (CARS196, Table 18)."""
    enlarged = round(size * 256 / 224)
    geometry = [
        A.OneOf([
            A.Resize(size, size, interpolation=_LINEAR),
            A.Sequential([A.Resize(enlarged, enlarged, interpolation=_LINEAR), A.RandomCrop(size, size)]),
        ], p=1.0),
        A.HorizontalFlip(p=0.5),
    ]
    return ImageTransform(geometry, pre, _autoaugment(autoaugment))


def retrieval_eval_transform(pre: Preprocessing, size: int = 256) -> ImageTransform:
    """Resize to size x size ignoring aspect, no crop (the paper evaluates at 256 or 224)."""
    return ImageTransform([A.Resize(size, size, interpolation=_LINEAR)], pre, stochastic=False)


def _autoaugment(policy: str | None) -> PixelOps | None:
    if policy is None:
        return None
    if policy in RELEASE_POLICIES:
        return ReleaseAutoAugment(policy)
    if policy not in AUTOAUGMENT_POLICIES:
        raise FinegrainError(f"Unknown AutoAugment policy {policy!r}. "
                             f"Use one of: {', '.join([*AUTOAUGMENT_POLICIES, *RELEASE_POLICIES])}, or none.")
    return v2.AutoAugment(AUTOAUGMENT_POLICIES[policy])
