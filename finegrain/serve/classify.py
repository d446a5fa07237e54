"""`--classifier`: the top classes of a query, from a classifier checkpoint, through the one predictor."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from finegrain.errors import FinegrainError
from finegrain.eval.inference import InferenceOptions, Predictor
from finegrain.fileio import sha256_file

TOP = 5


@dataclass(frozen=True)
class Classifier:
    """A classifier checkpoint on the serving device: its eval transform and its class names."""

    predictor: Predictor
    transform: Callable[[np.ndarray], torch.Tensor]
    classes: tuple[str, ...]
    arch: str
    fingerprint: str

    @classmethod
    def load(cls, path: str | Path, device: torch.device) -> "Classifier":
        from finegrain.data.transforms import eval_transform
        from finegrain.models import load_model

        model = load_model(path)
        count = int(model.info.num_classes or 0)
        if count < 1:
            raise FinegrainError(f"{path} is not a classifier (it has no class head). Pass a checkpoint of "
                                 "`finegrain fgvc` or `finegrain eval` to --classifier.")
        classes = model.info.classes or tuple(f"class {i}" for i in range(count))
        # The fast path: BN folded into the convs, channels_last, bf16 where the hardware has it.
        predictor = Predictor(model, device, InferenceOptions.fast(device))
        return cls(predictor, eval_transform(model.preprocessing), tuple(classes), model.info.architecture,
                   sha256_file(path))

    def top_classes(self, images: Sequence[torch.Tensor]) -> list[list[dict[str, Any]]]:
        """For each image, the TOP most probable classes, most probable first (a batch function)."""
        probabilities = torch.softmax(self.predictor(torch.stack(list(images))).float(), dim=1).cpu()
        values, indices = probabilities.topk(min(TOP, len(self.classes)), dim=1)
        return [[{"label": self.classes[int(i)], "probability": round(float(p), 6)} for p, i in zip(row_p, row_i)]
                for row_p, row_i in zip(values, indices)]

    def info(self) -> dict[str, Any]:
        return {"arch": self.arch, "classes": len(self.classes), "weights_sha256": self.fingerprint}
