"""The EMA of the weights: timm's ModelEmaV3 formula (decay, warm-up, buffers, FP32), evaluated each
epoch beside the raw weights, saved as ema.safetensors, and part of the exact resume state."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from timm.utils.model_ema import ModelEmaV3

import finegrain
from finegrain.models import read_weights
from finegrain.train import resume
from finegrain.train.ema import WeightEma
from test_trainer import assert_same_weights, make_trainer, tiny_splits  # noqa: F401 - a fixture

EMA_ON = {"ema": {"enabled": True, "decay": 0.95, "warmup": True}}


@pytest.mark.parametrize("warmup", [True, False])
def test_decay_is_timms(warmup: bool) -> None:
    model = torch.nn.Linear(2, 2)
    ours, timms = WeightEma(model, 0.999, warmup), ModelEmaV3(model, decay=0.999, use_warmup=warmup)
    for step in (1, 2, 3, 10, 1000, 10**6):
        assert ours.decay_at(step) == timms.get_decay(step), step


def test_updates_equal_timms_on_a_training_network() -> None:
    """Parameters and BN statistics averaged, num_batches_tracked copied, as ModelEmaV3 does."""
    torch.manual_seed(0)
    model = finegrain.create_model("assemble_resnet50", num_classes=3, base_width=4)
    ours, timms = WeightEma(model, 0.9, warmup=True), ModelEmaV3(model, decay=0.9, use_warmup=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(1, 6):
        loss = torch.nn.functional.cross_entropy(model(torch.randn(4, 3, 32, 32)), torch.tensor([0, 1, 2, 0]))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        ours.update(model, step)
        timms.update(model, step)
    expected = timms.module.state_dict()
    for key, value in ours.state_dict().items():
        torch.testing.assert_close(value, expected[key], msg=key)
    assert not torch.equal(ours.state_dict()["fc.weight"], model.state_dict()["fc.weight"])  # an average, not a copy
    assert all(v.dtype == torch.float32 for v in ours.state_dict().values() if v.is_floating_point())


def test_a_run_with_ema_evaluates_and_saves_it(tiny_splits: dict, tmp_path: Path) -> None:  # noqa: F811
    trainer = make_trainer(tiny_splits, tmp_path, extra=EMA_ON)
    trainer.fit()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all({"test_top1", "test_ema_top1", "test_ema_top5"} <= row.keys() for row in rows)
    saved = finegrain.load_model(tmp_path / "ema.safetensors")
    assert_same_weights(saved.state_dict(), {k: v.contiguous() for k, v in trainer.ema.state_dict().items()})
    assert float(saved.metadata["finegrain.metric.test_top1"]) == rows[-1]["test_ema_top1"]
    assert any(not torch.equal(saved.state_dict()[k], v) for k, v in trainer.model.state_dict().items()
               if v.is_floating_point())


def test_ema_resumes_exactly_after_a_kill(tiny_splits: dict, tmp_path: Path) -> None:  # noqa: F811
    reference = make_trainer(tiny_splits, tmp_path / "a", extra=EMA_ON)
    reference.fit()

    def kill_at_epoch_2(message: str) -> None:
        if message.startswith("epoch 2,"):
            raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        make_trainer(tiny_splits, tmp_path / "b", extra=EMA_ON, echo=kill_at_epoch_2).fit()
    resumed = make_trainer(tiny_splits, tmp_path / "b", extra=EMA_ON)
    resume.seed_everything(12345)
    resumed.fit(resume=True)
    assert_same_weights(reference.ema.state_dict(), resumed.ema.state_dict())
    saved = [read_weights(run / "ema.safetensors") for run in (tmp_path / "a", tmp_path / "b")]
    assert_same_weights(saved[0][0], saved[1][0])
    assert saved[0][1] == saved[1][1]  # the same metadata: epoch, the EMA's figures
