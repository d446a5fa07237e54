"""Exact resume at any step: a `finegrain fgvc` run stopped by Ctrl-C (SIGINT) or killed (SIGKILL)
at a random step, then continued with `--resume`, ends with the uninterrupted run's weights and
metrics, bit for bit; a diverging run stops with one message and writes nothing non-finite.

Each run is the CLI's entry point in a forked process: a real process that takes real signals,
without paying torch's start-up again. The progress bar on its stderr says which step it is at.
"""
from __future__ import annotations

import io
import json
import os
import random
import re
import select
import shutil
import signal
import sys
import time
import traceback
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file

from finegrain import cli
from finegrain.errors import FinegrainError
from finegrain.train.resume import RESUME_FILE, load_resume_state
from test_trainer import make_tiny_folder

STEPS_PER_EPOCH, EPOCHS = 6, 2  # 24 training photos, 6 of them held out for validation, in batches of 3
PROGRESS = re.compile(r"epoch (\d+)/\d+:\s+\d+%\|[^|]*\|\s*(\d+)/(\d+)")
TIMING = ("time", "images_per_s")


def run_cli(args: list[str], stop_at: int | None = None, sig: int = signal.SIGINT,
            timeout_s: float = 300.0) -> tuple[int, str, int | None]:
    """(exit status, or minus the signal that ended it; its stderr; the global step shown when it
    was signalled) of `finegrain ARGS` in a forked process, sent `sig` once its progress bar
    shows global step `stop_at` or later."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: the CLI, with stderr into the pipe
        code = 1
        try:
            os.close(read_fd)
            os.dup2(write_fd, 2)
            os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
            sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), write_through=True)
            sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), write_through=True)
            sys.argv = ["finegrain", *args]
            try:
                cli.main()
                code = 0
            except SystemExit as exit_:
                code = exit_.code if isinstance(exit_.code, int) else 1
        except BaseException:  # noqa: BLE001 - report anything to the parent through the pipe
            traceback.print_exc()
        finally:
            os._exit(code)
    os.close(write_fd)
    os.set_blocking(read_fd, False)
    output, shown_at, deadline, status = b"", None, time.monotonic() + timeout_s, None
    try:
        while status is None:
            select.select([read_fd], [], [], 0.05)
            output += _drain(read_fd)
            progress = PROGRESS.findall(output.decode(errors="replace"))
            if stop_at is not None and shown_at is None and progress:
                epoch, step, _ = map(int, progress[-1])
                if (epoch - 1) * STEPS_PER_EPOCH + step >= stop_at:
                    shown_at = (epoch - 1) * STEPS_PER_EPOCH + step
                    os.kill(pid, sig)
            done, raw = os.waitpid(pid, os.WNOHANG)
            if done:
                status = os.waitstatus_to_exitcode(raw)
            elif time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                raise AssertionError(f"finegrain {' '.join(args)} ran over {timeout_s} s:\n{output.decode()[-3000:]}")
        output += _drain(read_fd)  # an orphaned loader worker may keep the pipe open: no waiting for EOF
    finally:
        os.close(read_fd)
    return status, output.decode(errors="replace"), shown_at


def _drain(fd: int) -> bytes:
    chunks = []
    while True:
        try:
            chunk = os.read(fd, 1 << 16)
        except BlockingIOError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 demo classes, 8 train / 4 test photos each."""
    return make_tiny_folder(tmp_path_factory.mktemp("photos"))


# Selection on a validation part (2 photos of each class's 8) and an EMA of the weights: both
# must resume exactly too. The other runs train on the whole split and choose on test.
HONEST = {"eval": {"select_on": "val", "val_fraction": 0.25}, "ema": {"enabled": True, "decay": 0.9}}
PAPER = {"eval": {"select_on": "test"}}


def write_recipe(folder: Path, data_root: Path, mixup: int | None, workers: int, selection: dict = PAPER,
                 **train: object) -> Path:
    """A tiny recipe with every random part on: augmentation + AutoAugment, Mixup, DropBlock."""
    recipe = {
        "name": "tiny-resume",
        "model": {"name": "assemble_resnet50", "overrides": {"base_width": 4}},
        "data": {"kind": "folder", "root": str(data_root), "train_size": 32, "eval_resize": 32, "eval_crop": 32},
        "optim": {"lr": 0.05, "weight_decay": 1.0e-4},
        "schedule": {"warmup_epochs": 0.5},
        "regularization": {"label_smoothing": 0.1, "mixup": {"type": mixup, "alpha": 0.2},
                           "dropblock": {"start": 0.9, "end": 0.7}, "autoaugment": "cifar10"},
        "train": {"epochs": EPOCHS, "batch_size": 4, "workers": workers, "amp": "fp32", "channels_last": True,
                  "seed": 3, "bn_momentum_rule": True, "threads": 1, **train},
        **selection,
    }
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"tiny-mixup{mixup}-workers{workers}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


_REFERENCES: dict[Path, Path] = {}


def reference_run(recipe: Path) -> Path:
    """The uninterrupted run of `recipe` (made once per recipe)."""
    if recipe not in _REFERENCES:
        out = recipe.with_suffix(".reference")
        status, log, _ = run_cli(["fgvc", "--recipe", str(recipe), "--out", str(out), "--quiet"])
        assert status == 0, log[-3000:]
        _REFERENCES[recipe] = out
    return _REFERENCES[recipe]


def metrics_rows(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k not in TIMING} for row in rows]


def assert_same_run(reference: Path, run: Path) -> None:
    assert (run / "validation.json").read_text() == (reference / "validation.json").read_text()
    for name in ("last.safetensors", "best.safetensors", "ema.safetensors"):
        expected, got = load_file(reference / name), load_file(run / name)
        assert expected.keys() == got.keys()
        for key in expected:
            assert torch.equal(expected[key], got[key]), f"{name}: {key} differs"
    assert metrics_rows(run) == metrics_rows(reference)


# Where to stop: a global step (1-based) drawn by a seeded RNG in each epoch, clear of the epoch's
# last steps so that the signal lands mid-epoch. Ctrl-C in epoch 1 resumes mid-epoch; the kill in
# epoch 2 resumes from epoch 1's end and replays what the killed run had done of epoch 2.
_DRAW = random.Random(20240611)
_STOPS = [epoch * STEPS_PER_EPOCH + _DRAW.randint(1, STEPS_PER_EPOCH - 2) for epoch in range(EPOCHS)]


@pytest.mark.parametrize(("sig", "stop_at"), [(signal.SIGINT, _STOPS[0]), (signal.SIGKILL, _STOPS[1])],
                         ids=["sigint", "sigkill"])
def test_a_run_stopped_at_a_random_step_resumes_bit_exactly(data_root: Path, tmp_path_factory: pytest.TempPathFactory,
                                                            sig: int, stop_at: int) -> None:
    # Mixup type 2 (its partners and lambdas), one loader worker. Type 1's paired loading resumes
    # mid-epoch in test_trainer.py, without workers and with them.
    recipe = write_recipe(tmp_path_factory.getbasetemp() / "recipes", data_root, mixup=2, workers=1, selection=HONEST,
                          batch_size=3)
    reference = reference_run(recipe)
    run = tmp_path_factory.mktemp("stopped")
    status, log, shown_at = run_cli(["fgvc", "--recipe", str(recipe), "--out", str(run)], stop_at=stop_at, sig=sig)
    assert shown_at is not None and shown_at >= stop_at, log[-3000:]
    state = torch.load(run / RESUME_FILE, weights_only=True)
    if sig == signal.SIGINT:  # stopped at the next step boundary, saved there, exit 130 as for any Ctrl-C
        assert status == 130, log[-3000:]
        assert "stopping after this step" in log and "interrupted: the resume state" in log
        assert shown_at <= state["global_step"] < EPOCHS * STEPS_PER_EPOCH
    else:  # killed: nothing saved then; the state is the last one written (the start or an epoch's end)
        assert status == -signal.SIGKILL, log[-3000:]
        assert state["step_in_epoch"] == 0 and state["global_step"] <= shown_at
    assert state["global_step"] == state["epoch"] * STEPS_PER_EPOCH + state["step_in_epoch"]
    status, log, _ = run_cli(["fgvc", "--resume", "--out", str(run), "--quiet"])
    assert status == 0, log[-3000:]
    assert_same_run(reference, run)


def test_a_diverging_run_stops_with_the_step_and_keeps_its_last_finite_state(data_root: Path, tmp_path: Path) -> None:
    # One step per epoch; warmup makes step 1's lr 0, so epoch 1 is sane; step 2's lr of 1e30 blows
    # the weights up (still finite), and step 3's loss is no longer a number.
    recipe = write_recipe(tmp_path, data_root, None, 0, epochs=3, batch_size=24)
    run = tmp_path / "run"
    status, log, _ = run_cli(["fgvc", "--recipe", str(recipe), "--out", str(run), "--set", "schedule.warmup_epochs=1",
                              "--set", "optim.lr=1.0e+30"])
    assert status == 2, log[-3000:]
    message = re.sub(r"\s+", "", log[log.index("error:"):])  # the console wraps long lines
    assert "Trainingdivergedatstep3(epoch3,step1of1)" in message and "Loweroptim.lr" in message
    assert "Traceback" not in log
    with safe_open(run / "last.safetensors", "pt") as last:
        assert last.metadata()["finegrain.epoch"] == "2"
        assert all(bool(torch.isfinite(last.get_tensor(key)).all()) for key in last.keys())
    state = torch.load(run / RESUME_FILE, weights_only=True)
    assert (state["epoch"], state["global_step"]) == (2, 2)
    assert all(bool(torch.isfinite(t).all()) for t in state["model"].values() if t.is_floating_point())


def test_a_damaged_resume_state_gets_one_way_forward(data_root: Path, tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path, data_root, None, 0, epochs=1, batch_size=24)
    run = tmp_path / "run"
    assert run_cli(["fgvc", "--recipe", str(recipe), "--out", str(run), "--quiet"])[0] == 0
    state_file = run / RESUME_FILE
    state_file.write_bytes(state_file.read_bytes()[:1000])  # a copy cut short
    status, log, _ = run_cli(["fgvc", "--resume", "--out", str(run)])
    assert status == 2 and "Traceback" not in log
    message = re.sub(r"\s+", "", log[log.index("error:"):])  # the console wraps long lines
    assert "isunreadable" in message and f"delete{state_file}" in message
    assert "weights_only" not in message and "--resume" not in message
    # Starting again where it was, as told, is refused only until the file is gone.
    status, log, _ = run_cli(["fgvc", "--recipe", str(recipe), "--out", str(run)])
    assert status == 2 and "delete" in log
    state_file.unlink()
    assert run_cli(["fgvc", "--recipe", str(recipe), "--out", str(run), "--quiet"])[0] == 0
    shutil.rmtree(run)


def test_a_resume_state_that_needs_unpickling_is_refused_without_suggesting_it(tmp_path: Path) -> None:
    import datetime

    torch.save({"format": 2, "when": datetime.date(2024, 6, 11)}, tmp_path / RESUME_FILE)  # not tensors
    with pytest.raises(FinegrainError, match="is unreadable") as refused:
        load_resume_state(tmp_path / RESUME_FILE)
    assert "weights_only" not in str(refused.value) and "delete" in str(refused.value)
