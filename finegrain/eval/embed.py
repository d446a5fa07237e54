"""Embedding a list of image files, in resumable shards, without ever losing track of a bad file.

The search index's embedder; the model runs through the one predictor (eval/inference.py), so
an indexed image gets the embedding every other command computes. A collection of a million
images takes hours to embed; the work is cut into shards written atomically to a work folder, so
a build that is killed resumes from its last finished shard instead of from zero. A shard is
reused only if its key (the caller's model fingerprint plus each file's path, size and mtime)
still matches.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from finegrain.data.images import decode_rgb
from finegrain.data.transforms import eval_transform, retrieval_eval_transform
from finegrain import distributed
from finegrain.errors import FinegrainError
from finegrain.eval.inference import InferenceOptions, Predictor, embedding_mode
from finegrain.fileio import atomic_path
from finegrain.preprocessing import Preprocessing
from finegrain.runtime import default_device

DEFAULT_SHARD_SIZE = 4096


@dataclass
class EmbedResult:
    """Row i of `embeddings` [N, E] float32 (L2-normalised) belongs to `ok_paths[i]`;
    every input path is either there or in `failed` with the decoder's reason."""

    embeddings: np.ndarray
    ok_paths: list[str]
    failed: list[tuple[str, str]] = field(default_factory=list)
    shards_reused: int = 0
    shards_computed: int = 0


def image_transform(model: nn.Module, preprocessing: Preprocessing) -> Callable[[np.ndarray], torch.Tensor]:
    """Retrieval networks see a square resize to `crop` (paper Appendix C); classifiers the
    classification eval preset (short side to `resize`, centre crop)."""
    if embedding_mode(model) == "forward_embedding":
        return retrieval_eval_transform(preprocessing, size=preprocessing.crop)
    return eval_transform(preprocessing)


_Loaded = tuple[torch.Tensor | None, int, str]  # (image or None, position, failure reason)


class _ImageFiles(Dataset):
    """Items (tensor or None, position, failure reason): a bad file is reported, not replaced."""

    def __init__(self, paths: Sequence[str], transform: Callable[[np.ndarray], torch.Tensor]) -> None:
        self.paths, self.transform = list(paths), transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, position: int) -> _Loaded:
        try:
            return self.transform(decode_rgb(self.paths[position])), position, ""
        except Exception as error:  # noqa: BLE001 - any decoder failure on an untrusted file means "skip it"
            return None, position, f"{type(error).__name__}: {error}" if str(error) else type(error).__name__


def _collate(items: list[_Loaded]) -> tuple[torch.Tensor | None, list[int], list[tuple[int, str]]]:
    good = [(tensor, position) for tensor, position, _ in items if tensor is not None]
    bad = [(position, reason) for tensor, position, reason in items if tensor is None]
    images = torch.stack([tensor for tensor, _ in good]) if good else None
    return images, [position for _, position in good], bad


def _embed_chunk(predictor: Predictor, paths: Sequence[str], transform: Callable, batch_size: int, workers: int,
                 bar: tqdm) -> tuple[np.ndarray, list[int], list[tuple[int, str]]]:
    loader = DataLoader(_ImageFiles(paths, transform), batch_size=batch_size, num_workers=workers,
                        collate_fn=_collate, pin_memory=predictor.device.type == "cuda")
    rows, ok, bad = [], [], []
    for images, positions, failures in loader:
        if images is not None:
            rows.append(predictor.embed(images).cpu().numpy())
            ok.extend(positions)
        bad.extend(failures)
        bar.update(len(positions) + len(failures))
    width = rows[0].shape[1] if rows else 0
    return (np.concatenate(rows) if rows else np.zeros((0, width), np.float32)), ok, bad


def _shard_key(cache_key: str, paths: Sequence[str]) -> str:
    digest = hashlib.sha256(cache_key.encode())
    for path in paths:
        stat = os.stat(path) if os.path.exists(path) else None
        digest.update(f"\n{path}\t{stat.st_size if stat else -1}\t{stat.st_mtime_ns if stat else -1}".encode())
    return digest.hexdigest()[:20]


def _read_shard(folder: Path) -> tuple[np.ndarray, list[int], list[tuple[int, str]]]:
    info = json.loads((folder / "shard.json").read_text())
    rows = np.load(folder / "embeddings.npy", allow_pickle=False)
    if len(rows) != len(info["ok"]):
        raise FinegrainError(f"Embedding shard {folder} is inconsistent. Delete the folder and run again.")
    return rows, info["ok"], [(int(p), str(r)) for p, r in info["failed"]]


def _write_shard(folder: Path, rows: np.ndarray, ok: list[int], bad: list[tuple[int, str]]) -> None:
    with atomic_path(folder) as tmp:
        tmp.mkdir()
        np.save(tmp / "embeddings.npy", rows.astype(np.float32), allow_pickle=False)
        (tmp / "shard.json").write_text(json.dumps({"ok": ok, "failed": bad}))


def embed_paths(model: nn.Module, paths: Sequence[str | os.PathLike], preprocessing: Preprocessing, *,
                batch_size: int = 64, device: torch.device | str | None = None, workers: int = 0,
                progress: bool = True, work_dir: str | os.PathLike | None = None,
                shard_size: int = DEFAULT_SHARD_SIZE, cache_key: str = "",
                on_shard: Callable[[int, bool], None] | None = None) -> EmbedResult:
    """Embed image files with `model` under eval preprocessing; see EmbedResult.

    With `work_dir`, shards of `shard_size` paths are kept there and reused by a later call with
    the same `cache_key` (which must identify the weights and preprocessing) and unchanged files.
    `on_shard(shard_number, reused)` is called after each shard is done.
    """
    if batch_size < 1 or shard_size < 1:
        raise FinegrainError(f"batch_size ({batch_size}) and shard_size ({shard_size}) must be >= 1. "
                             "Pass positive sizes.")
    paths = [str(path) for path in paths]
    info = distributed.current()
    device = torch.device(device) if device is not None else (
        distributed.device_for(info) if info.enabled else default_device())
    predictor = Predictor(model, device, InferenceOptions.for_collection(device))
    transform = image_transform(model, preprocessing)
    work = Path(work_dir) if work_dir is not None else None
    step = shard_size if work is not None else max(1, len(paths))
    if info.enabled and work is not None:
        # Under torchrun each rank embeds every world_size-th shard into the shared work folder;
        # once all are written, every rank reads the finished set below (in order).
        for number, start in list(enumerate(range(0, len(paths), step)))[info.rank::info.world_size]:
            chunk = paths[start:start + step]
            folder = work / f"shard-{number:06d}-{_shard_key(cache_key, chunk)}"
            if not folder.is_dir():
                with tqdm(total=len(chunk), desc=f"embedding (rank {info.rank})", unit="img",
                          disable=not progress) as bar:
                    _write_shard(folder, *_embed_chunk(predictor, chunk, transform, batch_size, workers, bar))
        distributed.barrier()
        progress = progress and info.is_main
    parts, ok_paths, failed = [], [], []
    reused = computed = 0
    with tqdm(total=len(paths), desc="embedding", unit="img", disable=not progress) as bar:
        for number, start in enumerate(range(0, len(paths), step)):
            chunk = paths[start:start + step]
            folder = work / f"shard-{number:06d}-{_shard_key(cache_key, chunk)}" if work is not None else None
            was_reused = folder is not None and folder.is_dir()
            if was_reused:
                rows, ok, bad = _read_shard(folder)
                bar.update(len(chunk))
                reused += 1
            else:
                rows, ok, bad = _embed_chunk(predictor, chunk, transform, batch_size, workers, bar)
                if folder is not None:
                    _write_shard(folder, rows, ok, bad)
                computed += 1
            if len(rows):
                parts.append(rows)
            ok_paths += [chunk[p] for p in ok]
            failed += [(chunk[p], reason) for p, reason in bad]
            if on_shard is not None:
                on_shard(number, was_reused)
    widths = {part.shape[1] for part in parts}
    if len(widths) > 1:
        raise FinegrainError(f"Embedding shards disagree on the width ({sorted(widths)}). Delete {work} and run again.")
    embeddings = np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)
    return EmbedResult(embeddings, ok_paths, failed, reused, computed)
