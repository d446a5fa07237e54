"""What a set of weights expects as input, recorded in every checkpoint we write.

Values are in the 0-255 pixel scale: a model input is (rgb_uint8 - mean) / std. ImageNet's
usual normalisation is mean = 255 * (0.485, 0.456, 0.406), std = 255 * (0.229, 0.224, 0.225);
the authors' TF release feeds RGB minus (123.68, 116.78, 103.94) with std 1.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

IMAGENET_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)
RELEASE_MEAN = (123.68, 116.78, 103.94)
RELEASE_STD = (1.0, 1.0, 1.0)


@dataclass(frozen=True)
class Preprocessing:
    """Normalisation and sizes. Eval: resize the short side to `resize`, centre-crop `crop`."""

    mean: tuple[float, float, float] = field(default=IMAGENET_MEAN)
    std: tuple[float, float, float] = field(default=IMAGENET_STD)
    train_size: int = 224
    resize: int = 256
    crop: int = 224

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "Preprocessing":
        raw = json.loads(text)
        return cls(mean=tuple(raw["mean"]), std=tuple(raw["std"]), train_size=int(raw["train_size"]),
                   resize=int(raw["resize"]), crop=int(raw["crop"]))

    def with_eval_size(self, crop: int) -> "Preprocessing":
        """The same normalisation at another eval resolution, keeping the resize/crop ratio."""
        return Preprocessing(self.mean, self.std, self.train_size, round(crop * self.resize / self.crop), crop)


IMAGENET = Preprocessing()
RELEASE = Preprocessing(mean=RELEASE_MEAN, std=RELEASE_STD)
# BigLittleNet models: trained at 224, evaluated at short side 292 -> centre crop 256.
RELEASE_BL = Preprocessing(mean=RELEASE_MEAN, std=RELEASE_STD, train_size=224, resize=292, crop=256)
