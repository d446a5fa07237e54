"""Robustness of a classifier as the paper reports it: top-1, mCE, mFR and throughput.

mCE (Hendrycks & Dietterich 2019): E[c, s] is the top-1 error under corruption c at severity s;
CE_c = sum_s E[c, s] / sum_s E_AlexNet[c, s]; mCE = mean_c CE_c. Off ImageNet there is no
AlexNet to normalise by, so (as the paper's Food-101 column, Table 10) mCE is the plain mean
corruption error mean_{c,s} E[c, s].

mFR: the flip rate of a perturbation sequence is the fraction of frame pairs whose top-1
prediction differs, pairs being consecutive frames, except for noise sequences, whose frames are
independent draws around a clean frame 0 and are each compared to frame 0 (ImageNet-P's test
code, `flip_prob`). FR_p = FP_p / FP_AlexNet_p on ImageNet, else FP_p; mFR = mean_p FR_p.
"""
from __future__ import annotations

import json
import os
from collections import defaultdict
from importlib import resources
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from finegrain.errors import FinegrainError
from finegrain.eval.corruptions import (
    CorruptionCache, default_cache_dir, derived_seed, image_digest, load_eval_crop, load_eval_resized,
    parse_corruptions, parse_severities,
)
from finegrain.eval.perturbations import (
    compares_to_first_frame, frame_indices, parse_perturbations, perturbation_sequence,
)
from finegrain.eval.inference import Predictor
from finegrain.eval.throughput import measure_throughput
from finegrain.preprocessing import Preprocessing
from finegrain.runtime import default_device

# ---------------------------------------------------------------------------- the maths


def error_rates(predictions: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Top-1 error per column. predictions [N, ...] class ids, labels [N] -> errors [...]."""
    predictions, labels = np.asarray(predictions), np.asarray(labels)
    if len(predictions) == 0:
        raise FinegrainError("No images to evaluate. Check the data path and --max-images.")
    wrong = predictions != labels.reshape((-1,) + (1,) * (predictions.ndim - 1))
    return wrong.mean(axis=0)


def corruption_errors(errors: np.ndarray, reference: np.ndarray | None = None) -> np.ndarray:
    """CE per corruption. errors [C, S] (one column per severity) -> CE [C].

    reference [C, S] (a baseline's errors per severity) gives sum_s E / sum_s E_ref; reference [C]
    (the baseline's error averaged over all 5 severities, as published for AlexNet) gives
    mean_s E / E_ref; None gives the unnormalised mean_s E.
    """
    errors = np.asarray(errors, dtype=np.float64)
    if errors.ndim != 2:
        raise ValueError(f"errors must be [corruptions, severities], got shape {errors.shape}")
    if reference is None:
        return errors.mean(axis=1)
    reference = np.asarray(reference, dtype=np.float64)
    if reference.ndim == 2:
        return errors.sum(axis=1) / reference.sum(axis=1)
    return errors.mean(axis=1) / reference


def mean_corruption_error(errors: np.ndarray, reference: np.ndarray | None = None) -> float:
    """mCE: the mean over corruptions of `corruption_errors(errors [C, S], reference)`."""
    return float(corruption_errors(errors, reference).mean())


def flip_rate(predictions: np.ndarray, compare_to_first: bool = False) -> float:
    """Flip probability of sequences. predictions [n_sequences, n_frames] top-1 ids -> [0, 1].

    Consecutive frames are compared, or every frame j >= 1 with frame 0 when compare_to_first
    (noise sequences); the rate is averaged per sequence, then over sequences.
    """
    predictions = np.asarray(predictions)
    if predictions.ndim != 2 or predictions.shape[1] < 2:
        raise ValueError(f"predictions must be [sequences, frames>=2], got shape {predictions.shape}")
    anchor = predictions[:, :1] if compare_to_first else predictions[:, :-1]
    return float((predictions[:, 1:] != anchor).mean(axis=1).mean())


def mean_flip_rate(flip_rates: np.ndarray, reference: np.ndarray | None = None) -> float:
    """mFR over perturbations. flip_rates [P], reference [P] (AlexNet's) or None -> float."""
    rates = np.asarray(flip_rates, dtype=np.float64)
    if reference is not None:
        rates = rates / np.asarray(reference, dtype=np.float64)
    return float(rates.mean())


def alexnet_reference() -> dict[str, Any]:
    """The published AlexNet corruption errors and flip probabilities shipped with finegrain."""
    text = resources.files("finegrain.eval").joinpath("data/alexnet_reference.json").read_text()
    return json.loads(text)


# ---------------------------------------------------------------------------- the driver


class _RobustnessImages(Dataset):
    """Job k is image k % N in block k // N; a block is ("clean", ""), ("corruption", name: all
    requested severities) or ("perturbation", name: all frames). Items are (uint8 frames
    [F, 3, H, W], job index, images generated, image readable)."""

    def __init__(self, paths: list[str], blocks: list[tuple[str, str]], preprocessing: Preprocessing,
                 severities: list[int], frames: int, seed: int, cache_dir: Path | None):
        self.paths, self.blocks, self.pre = paths, blocks, preprocessing
        self.severities, self.frames, self.seed = severities, frames, seed
        self.cache = CorruptionCache(cache_dir)

    def __len__(self) -> int:
        return len(self.paths) * len(self.blocks)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int, bool]:
        block, sample = divmod(index, len(self.paths))
        kind, name = self.blocks[block]
        load = load_eval_resized if kind == "perturbation" else load_eval_crop
        try:
            image = load(self.paths[sample], self.pre)
        except (OSError, Image.DecompressionBombError):  # undecodable: counted, left out
            count = {"clean": 1, "corruption": len(self.severities), "perturbation": self.frames}[kind]
            return torch.zeros(count, 3, self.pre.crop, self.pre.crop, dtype=torch.uint8), index, 0, False
        generated = 0
        if kind == "clean":
            stack = image[None]
        elif kind == "corruption":
            outs = [self.cache.get(image, name, s, self.seed) for s in self.severities]
            stack = np.stack([out for out, _ in outs])
            generated = sum(made for _, made in outs)
        else:
            seed = derived_seed(image_digest(image), name, self.seed)
            stack = perturbation_sequence(image, name, self.frames, self.pre.crop, seed)
        return torch.from_numpy(np.ascontiguousarray(stack)).permute(0, 3, 1, 2), index, generated, True


class _FrameQueue:
    """Collects raw frames from many jobs and runs the predictor once per `batch_size` frames."""

    def __init__(self, predictor: Predictor, batch_size: int):
        self.predictor, self.batch_size = predictor, batch_size
        self.pending: list[tuple[int, torch.Tensor]] = []
        self.count = 0

    def add(self, job: int, frames: torch.Tensor) -> list[tuple[int, np.ndarray]]:
        """Queue a job's frames; returns the (job, predictions) of every job run so far, if any."""
        self.pending.append((job, frames))
        self.count += len(frames)
        return self.flush() if self.count >= self.batch_size else []

    def flush(self) -> list[tuple[int, np.ndarray]]:
        """Run the model on every queued frame; (job, top-1 ids [frames]) per queued job."""
        if not self.pending:
            return []
        frames = torch.cat([f for _, f in self.pending])
        predictions = self.predictor.logits_in_batches(frames, self.batch_size).argmax(dim=1).numpy()
        done, start = [], 0
        for job, chunk in self.pending:
            done.append((job, predictions[start:start + len(chunk)]))
            start += len(chunk)
        self.pending, self.count = [], 0
        return done


def cap_per_class(samples: Sequence[Any], max_images: int | None) -> list[Any]:
    """The first `max_images` samples of every class (sorted by path, so the choice is stable)."""
    ordered = sorted(samples, key=lambda s: (s.label, str(s.path)))
    if max_images is None:
        return ordered
    if max_images < 1:
        raise FinegrainError(f"max_images={max_images} must be at least 1. Pass a positive cap per class.")
    taken: dict[int, int] = defaultdict(int)
    kept = []
    for sample in ordered:
        if taken[sample.label] < max_images:
            taken[sample.label] += 1
            kept.append(sample)
    return kept


def evaluate_robustness(
    model: nn.Module,
    samples: Sequence[Any],
    preprocessing: Preprocessing | None = None,
    corruptions: str | Sequence[str] | None = None,
    severities: str | Sequence[int] | None = None,
    frames: int = 10,
    max_images: int | None = None,
    seed: int = 0,
    cache_dir: str | os.PathLike | None = "default",
    device: torch.device | str | None = None,
    *,
    perturbations: str | Sequence[str] | None = None,
    normalize: str | None = None,
    batch_size: int = 64,
    num_workers: int | None = None,
    throughput_iterations: int = 5,
) -> dict[str, Any]:
    """Top-1, mCE, mFR and throughput of `model` on `samples` (objects with .path and .label).

    normalize="alexnet" divides by AlexNet's published errors / flip rates (ImageNet only);
    None reports unnormalised means. frames=0 skips mFR, throughput_iterations=0 throughput.
    cache_dir="default" uses `default_cache_dir()`, None disables the corruption cache.
    Returns keys top1, mce, mfr, throughput, errors {corruption: {severity: error}},
    corruption_errors, flip_rates, and what was evaluated (all rates are fractions).
    """
    pre = preprocessing or getattr(model, "preprocessing", None)
    if pre is None:
        raise FinegrainError("The model has no .preprocessing. Pass preprocessing=Preprocessing(...) explicitly.")
    names = parse_corruptions(corruptions)
    levels = parse_severities(severities)
    moves = parse_perturbations(perturbations) if frames else []
    if moves:
        frame_indices(moves[0], frames)  # range check before any work
    if normalize not in (None, "alexnet"):
        raise FinegrainError(f"normalize={normalize!r} is not known. Use 'alexnet' (ImageNet) or None.")
    reference = alexnet_reference() if normalize == "alexnet" else None
    # The reference holds every corruption and perturbation name we accept.
    ce_reference = np.array([reference["corruption_error"][c] for c in names]) if reference else None
    fr_reference = np.array([reference["flip_rate"][p] for p in moves]) if reference else None
    cache = None if cache_dir is None else Path(default_cache_dir() if cache_dir == "default" else cache_dir)
    device = torch.device(device) if device is not None else default_device()
    chosen = cap_per_class(samples, max_images)
    if not chosen:
        raise FinegrainError("No images to evaluate. Check the data path (its test split is empty).")
    labels = np.array([s.label for s in chosen])

    blocks = [("clean", "")] + [("corruption", c) for c in names] + [("perturbation", p) for p in moves]
    dataset = _RobustnessImages([str(s.path) for s in chosen], blocks, pre, levels, frames, seed, cache)
    workers = min(4, os.cpu_count() or 1) if num_workers is None else num_workers
    loader = DataLoader(dataset, batch_size=None, shuffle=False, num_workers=workers)

    model = model.to(device).eval()
    queue = _FrameQueue(Predictor(model, device, preprocessing=pre), batch_size)
    predictions: dict[int, np.ndarray] = {}
    readable = np.ones(len(chosen), dtype=bool)
    generated = corrupted = 0
    for stack, job, made, ok in tqdm(loader, total=len(dataset), desc="robustness", unit="job"):
        block, sample = divmod(job, len(chosen))
        generated += made
        corrupted += len(stack) if ok and blocks[block][0] == "corruption" else 0
        readable[sample] &= ok
        predictions.update(queue.add(job, stack))
    predictions.update(queue.flush())

    def table(kind: str, name: str = "") -> np.ndarray:
        """Predictions [readable images, frames] of one block."""
        start = blocks.index((kind, name)) * len(chosen)
        return np.stack([predictions[start + i] for i in range(len(chosen))])[readable]

    valid_labels = labels[readable]
    top1 = 1.0 - float(error_rates(table("clean")[:, 0], valid_labels))
    errors = np.stack([error_rates(table("corruption", c), valid_labels) for c in names])
    ces = corruption_errors(errors, ce_reference)
    flips = {p: flip_rate(table("perturbation", p), compares_to_first_frame(p)) for p in moves}
    throughput = (measure_throughput(model, pre.crop, 64, device, iterations=throughput_iterations)
                  if throughput_iterations else None)
    return {
        "top1": top1,
        "mce": float(ces.mean()),
        "mfr": mean_flip_rate(np.array(list(flips.values())), fr_reference) if flips else None,
        "throughput": throughput,
        "errors": {c: {s: float(e) for s, e in zip(levels, row)} for c, row in zip(names, errors)},
        "corruption_errors": {c: float(v) for c, v in zip(names, ces)},
        "flip_rates": flips,
        "normalize": normalize,
        "severities": levels,
        "frames": frames,
        "seed": seed,
        "resolution": pre.crop,
        "device": str(device),
        "num_images": int(readable.sum()),
        "unreadable_images": int((~readable).sum()),
        "cache": {"dir": str(cache) if cache else None, "generated": generated, "reused": corrupted - generated},
    }
