"""Data-parallel training under torchrun (gloo, 2 CPU processes) against one process."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from finegrain.distributed import rank_slice, shard_range
from finegrain.models import read_weights

SMALL = ["--set", "train.epochs=1", "--set", "train.batch_size=16", "--set", "data.train_size=64",
         "--set", "data.eval_resize=64", "--set", "data.eval_crop=64", "--set", "train.threads=1", "--quiet"]


def run(args: list[str], processes: int, tmp_path: Path) -> None:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    command = (launcher if processes > 1 else [sys.executable]) + ["-m", "finegrain", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parent.parent)}
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_shards_cover_every_item_once_without_padding():
    for count in (0, 1, 7, 160):
        for world in (1, 2, 3):
            parts = [list(shard_range(count, rank, world)) for rank in range(world)]
            assert sum(parts, []) == list(range(count))
    assert rank_slice(list(range(8)), 1, 2) == [4, 5, 6, 7]


def test_two_processes_end_with_the_same_weights_as_one(tmp_path):
    """BN statistics frozen and augmentation off: per-sample gradients do not depend on how the
    global batch is split, so DDP's averaged gradients equal one process's."""
    exact = ["--set", "train.freeze_bn=true", "--set", "data.augment=false", "--set", "optim.lr=0.01",
             "--set", "train.batch_size=32"]
    run(["fgvc", "--recipe", "demo", "--out", "one", *SMALL, *exact], 1, tmp_path)
    run(["fgvc", "--recipe", "demo", "--out", "two", *SMALL, *exact], 2, tmp_path)
    one, _ = read_weights(tmp_path / "one" / "last.safetensors")
    two, _ = read_weights(tmp_path / "two" / "last.safetensors")
    assert one.keys() == two.keys()
    for key in one:
        # Float sums in another order differ in the last bits; a wrong split would differ at 1e-2.
        assert torch.allclose(one[key].float(), two[key].float(), rtol=1e-3, atol=1e-5), key
    # Evaluation gathered from both ranks sees every image once: the same top-1, on the same
    # validation part (it depends on the seed and the sample list only, not on the process count).
    assert (tmp_path / "one" / "validation.json").read_text() == (tmp_path / "two" / "validation.json").read_text()
    for key in ("val_top1", "test_top1"):
        assert metrics(tmp_path / "one")[-1][key] == pytest.approx(metrics(tmp_path / "two")[-1][key], abs=1e-6), key


def test_everything_on_with_accumulation_trains_and_evaluates(tmp_path):
    on = ["--set", "regularization.mixup.type=1", "--set", "train.accumulate_steps=2"]
    run(["fgvc", "--recipe", "demo", "--out", "full", *SMALL, *on], 2, tmp_path)
    row = metrics(tmp_path / "full")[-1]
    assert 0.0 <= row["val_top1"] <= 1.0 and 0.0 <= row["test_top1"] <= 1.0 and row["loss"] > 0
    assert (tmp_path / "full" / "best.safetensors").is_file()


def test_recall_of_gathered_embeddings_equals_one_process(tmp_path):
    retrieval = ["--set", "train.epochs=1", "--set", "train.threads=1", "--quiet"]
    run(["retrieval", "--recipe", "demo", "--out", "one", *retrieval], 1, tmp_path)
    run(["retrieval", "--recipe", "demo", "--out", "two", *retrieval], 2, tmp_path)
    start_one, start_two = metrics(tmp_path / "one")[0], metrics(tmp_path / "two")[0]
    assert start_one["epoch"] == start_two["epoch"] == 0
    for key in (f"{split}_recall@{k}" for split in ("val", "test") for k in (1, 2, 4, 8)):
        assert start_one[key] == start_two[key], key
    # Shards embed in other batch compositions: the last float bits of a few scores may move.
    for key in ("val_map@r", "test_map@r"):
        assert start_one[key] == pytest.approx(start_two[key], abs=1e-5), key


def test_index_build_shards_embedding_across_ranks(tmp_path):
    """Two ranks embed alternate shards; rank 0 merges them into the same index as one process."""
    import numpy as np

    import finegrain
    from finegrain.data import demo_root

    model = finegrain.create_embedder("assemble_resnet50", embedding_size=16, base_width=8)
    model.preprocessing = model.preprocessing.with_eval_size(64)
    weights = finegrain.save_model(model, tmp_path / "embedder.safetensors")
    images = str(demo_root() / "test")
    common = ["index", "build", "--weights", str(weights), "--images", images, "--shard-size", "40"]
    run([*common, "--out", "one"], 1, tmp_path)
    run([*common, "--out", "two"], 2, tmp_path)
    one = json.loads((tmp_path / "one" / "manifest.json").read_text())
    two = json.loads((tmp_path / "two" / "manifest.json").read_text())
    assert one["count"] == two["count"] == 160
    vectors = [np.load(tmp_path / name / "embeddings.npy") for name in ("one", "two")]
    assert np.allclose(vectors[0], vectors[1], atol=1e-5)
