"""The resume state of a run: everything needed to continue bit-exactly, in a safe format.

Saved with torch.save and read back with torch.load(weights_only=True), so it holds only
tensors, dicts, lists, numbers and strings: the numpy and Python RNG states are converted to
those types on the way out and back on the way in.
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from finegrain.errors import FinegrainError
from finegrain.fileio import atomic_path

RESUME_FILE = "resume_state.pt"
RESUME_FORMAT = 1


def seed_everything(seed: int) -> None:
    """Seed torch (all devices), numpy and Python: a fresh run is reproducible from its recipe."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def capture_rng_state() -> dict[str, Any]:
    """torch (CPU and every CUDA device), numpy and Python RNG states as safe types."""
    np_state = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": list(torch.cuda.get_rng_state_all()) if torch.cuda.is_available() else [],
        "numpy": {"key": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": {"version": py_version, "internal": list(py_internal), "gauss_next": py_gauss},
    }


def restore_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    np_state = state["numpy"]
    np.random.set_state(("MT19937", np_state["key"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["cached_gaussian"]))
    py = state["python"]
    random.setstate((py["version"], tuple(py["internal"]), py["gauss_next"]))


def save_resume_state(path: str | Path, state: dict[str, Any]) -> None:
    """Write the resume state atomically: a kill mid-write leaves the previous one intact."""
    with atomic_path(path) as tmp:
        torch.save({"format": RESUME_FORMAT, **state}, tmp)


def load_resume_state(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FinegrainError(f"No resume state at {path}. Run without --resume to start a new run, "
                             "or point --out at the run directory to continue.")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated or foreign file: say so instead of a pickle traceback
        raise FinegrainError(f"Cannot read the resume state {path} ({exc}). Start a new run without --resume.") from exc
    if not isinstance(state, dict) or state.get("format") != RESUME_FORMAT:
        raise FinegrainError(f"{path} is not a finegrain resume state (format {RESUME_FORMAT}). "
                             "Start a new run without --resume.")
    return state
