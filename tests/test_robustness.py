"""mCE / mFR on the shipped demo data with a tiny CNN trained here, the cache, the maths by hand,
bad input, and the `robustness` / `compare` commands."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from typer.testing import CliRunner

from finegrain.data import DEMO_ROOT, Sample, load_splits
from finegrain.errors import FinegrainError
from finegrain.eval.corruptions import (
    CORRUPTIONS, VALIDATION_CORRUPTIONS, CorruptionCache, corrupt_image, load_eval_crop, parse_corruptions,
    parse_severities,
)
from finegrain.eval.perturbations import PERTURBATIONS, frame_indices, parse_perturbations
from finegrain.eval.robustness import (
    alexnet_reference, corruption_errors, error_rates, evaluate_robustness, flip_rate, mean_corruption_error,
    mean_flip_rate,
)
from finegrain.eval.robustness_report import recorded_data
from finegrain.preprocessing import Preprocessing

PRE = Preprocessing(resize=40, crop=40)  # small crops keep corruption and training fast
QUICK = dict(num_workers=0, throughput_iterations=0, device="cpu")


def _block(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, 2, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]


class TinyNet(nn.Sequential):
    def __init__(self, num_classes: int) -> None:
        super().__init__(*_block(3, 16), *_block(16, 32), *_block(32, 64), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(64, num_classes))
        self.preprocessing = PRE


class ConstantNet(nn.Module):
    """Predicts class 3 whatever the input."""

    def __init__(self) -> None:
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(()))
        self.preprocessing = PRE

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(len(x), 16, device=x.device) + self.anchor
        logits[:, 3] = 1.0
        return logits


class RandomNet(ConstantNet):
    """Ignores the input: uniformly random labels among 16 classes."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.randn(len(x), 16, generator=torch.Generator().manual_seed(int(x.sum()) % 2**31))


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """These models are tiny: one thread is faster than contending for the machine's cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def demo():
    return load_splits("folder", DEMO_ROOT)


@pytest.fixture(scope="module")
def trained(demo) -> TinyNet:
    return train_tiny_cnn(demo["train"])


def train_tiny_cnn(train) -> TinyNet:
    """A tiny CNN fitted to the demo train split in a few seconds (about 90% clean test accuracy)."""
    torch.manual_seed(0)
    mean, std = torch.tensor(PRE.mean).view(1, 3, 1, 1), torch.tensor(PRE.std).view(1, 3, 1, 1)
    images = torch.from_numpy(np.stack([load_eval_crop(s.path, PRE) for s in train.samples])).permute(0, 3, 1, 2)
    images = (images.float() - mean) / std
    labels = torch.tensor([s.label for s in train.samples])
    model = TinyNet(len(train.classes))
    epochs, steps = 10, (len(images) + 63) // 64
    optimizer = torch.optim.Adam(model.parameters(), 5e-3)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, 5e-3, total_steps=epochs * steps)
    for _ in range(epochs):
        order = torch.randperm(len(images))
        for start in range(0, len(images), 64):
            index = order[start:start + 64]
            batch = images[index]
            batch = torch.where(torch.rand(len(index), 1, 1, 1) < 0.5, batch.flip(3), batch)
            loss = nn.functional.cross_entropy(model(batch), labels[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    return model.eval()


def test_noise_hurts_more_than_clean_and_severity_orders_errors(trained, demo, tmp_path):
    result = evaluate_robustness(trained, demo["test"].samples, corruptions="gaussian_noise,defocus_blur,contrast",
                                 frames=0, max_images=4, cache_dir=tmp_path, **QUICK)
    assert result["num_images"] == 4 * len(demo["test"].classes)
    assert result["top1"] > 0.5, "the tiny CNN did not learn the demo data; the checks below would be vacuous"
    noise = result["errors"]["gaussian_noise"]
    assert 1 - result["top1"] < noise[5]
    steps = [row[s + 1] >= row[s] for row in result["errors"].values() for s in range(1, 5)]
    assert sum(steps) >= 0.75 * len(steps), result["errors"]
    assert all(row[5] > row[1] for row in result["errors"].values()), result["errors"]
    expected = np.mean([np.mean(list(row.values())) for row in result["errors"].values()])
    assert result["mce"] == pytest.approx(expected)  # off ImageNet: the plain mean corruption error
    assert result["mfr"] is None and result["throughput"] is None


def test_constant_model_never_flips_and_random_model_flips_often(demo, tmp_path):
    common = dict(corruptions="gaussian_noise", severities="1", frames=5, max_images=2, cache_dir=tmp_path,
                  perturbations="gaussian_noise,rotate,translate,brightness", **QUICK)
    constant = evaluate_robustness(ConstantNet(), demo["test"].samples, **common)
    assert constant["mfr"] == 0.0 and set(constant["flip_rates"].values()) == {0.0}
    random = evaluate_robustness(RandomNet(), demo["test"].samples, **common)
    assert min(random["flip_rates"].values()) > 0.5, random["flip_rates"]


def test_trained_model_flip_rates_are_rates(trained, demo, tmp_path):
    result = evaluate_robustness(trained, demo["test"].samples, corruptions="brightness", severities="1",
                                 frames=4, max_images=1, cache_dir=tmp_path, **QUICK)
    assert set(result["flip_rates"]) == set(PERTURBATIONS)
    assert all(0.0 <= rate <= 1.0 for rate in result["flip_rates"].values())
    assert result["mfr"] == pytest.approx(np.mean(list(result["flip_rates"].values())))


def test_cache_returns_identical_images_without_recomputing(demo, tmp_path):
    crop = load_eval_crop(demo["test"].samples[0].path, PRE)
    first = CorruptionCache(tmp_path)
    made, generated = first.get(crop, "shot_noise", 3, seed=7)
    assert generated and first.generated == 1
    stored = next(tmp_path.rglob("*.png"))
    stamp = stored.stat().st_mtime_ns
    second = CorruptionCache(tmp_path)  # e.g. the next model's run
    again, generated_again = second.get(crop, "shot_noise", 3, seed=7)
    assert not generated_again and second.reused == 1 and second.generated == 0
    np.testing.assert_array_equal(made, again)
    assert stored.stat().st_mtime_ns == stamp
    assert not np.array_equal(made, second.get(crop, "shot_noise", 3, seed=8)[0])  # the seed is in the key


def test_second_run_reads_the_cache_and_worker_processes_change_nothing(trained, demo, tmp_path):
    args = dict(corruptions="impulse_noise,frost", severities="2,4", frames=0, max_images=2,
                throughput_iterations=0, device="cpu")
    first = evaluate_robustness(trained, demo["test"].samples, cache_dir=tmp_path, num_workers=2, **args)
    second = evaluate_robustness(trained, demo["test"].samples, cache_dir=tmp_path, num_workers=0, **args)
    uncached = evaluate_robustness(trained, demo["test"].samples, cache_dir=None, num_workers=0, **args)
    assert first["cache"]["generated"] == 2 * 2 * 32 and first["cache"]["reused"] == 0
    assert second["cache"]["generated"] == 0 and second["cache"]["reused"] == 2 * 2 * 32
    assert first["errors"] == second["errors"] == uncached["errors"]


def test_corruption_is_deterministic_independent_of_order_and_leaves_numpy_rng_alone(demo):
    crop = load_eval_crop(demo["test"].samples[1].path, PRE)
    state = np.random.get_state()
    alone = corrupt_image(crop, "frost", 2, seed=0)
    corrupt_image(crop, "fog", 5, seed=0)  # another draw in between changes nothing
    again = corrupt_image(crop, "frost", 2, seed=0)
    np.testing.assert_array_equal(alone, again)
    after = np.random.get_state()
    assert state[0] == after[0] and np.array_equal(state[1], after[1]) and state[2:] == after[2:]


def test_maths_against_hand_computed_values():
    errors = np.array([[0.2, 0.4], [0.5, 0.7]])
    np.testing.assert_allclose(corruption_errors(errors), [0.3, 0.6])
    np.testing.assert_allclose(corruption_errors(errors, np.array([0.5, 0.8])), [0.6, 0.75])
    np.testing.assert_allclose(corruption_errors(errors, np.array([[0.4, 0.6], [0.8, 0.8]])), [0.6, 0.75])
    assert mean_corruption_error(errors) == pytest.approx(0.45)
    assert mean_corruption_error(errors, np.array([0.5, 0.8])) == pytest.approx(0.675)
    np.testing.assert_allclose(error_rates(np.array([[0, 1], [1, 1], [2, 0]]), np.array([0, 1, 2])), [0.0, 2 / 3])
    sequences = np.array([[0, 0, 1, 1, 0], [1, 2, 2, 2, 2]])
    assert flip_rate(sequences) == pytest.approx((2 / 4 + 1 / 4) / 2)
    assert flip_rate(sequences, compare_to_first=True) == pytest.approx((2 / 4 + 4 / 4) / 2)
    assert mean_flip_rate(np.array([0.2, 0.3])) == pytest.approx(0.25)
    assert mean_flip_rate(np.array([0.2, 0.3]), np.array([0.4, 0.6])) == pytest.approx(0.5)


def test_alexnet_reference_normalises_alexnet_to_one():
    reference = alexnet_reference()
    ce = reference["corruption_error"]
    assert set(CORRUPTIONS) <= set(ce) and all(0 < v < 1 for v in ce.values())
    assert set(PERTURBATIONS) <= set(reference["flip_rate"])
    own = np.array([[ce[c]] * 5 for c in CORRUPTIONS])
    assert mean_corruption_error(own, np.array([ce[c] for c in CORRUPTIONS])) == pytest.approx(1.0)
    assert any("augmix" in source["repository"] for source in reference["sources"])


def test_bad_names_and_ranges_give_clear_errors(demo):
    with pytest.raises(FinegrainError, match="fooblur") as caught:
        parse_corruptions("gaussian_noise,fooblur")
    assert all(name in str(caught.value) for name in CORRUPTIONS + VALIDATION_CORRUPTIONS)
    with pytest.raises(FinegrainError, match="fooblur"):
        evaluate_robustness(ConstantNet(), demo["test"].samples, corruptions=["fooblur"], **QUICK)
    with pytest.raises(FinegrainError, match="1 to 5"):
        parse_severities("0,6")
    with pytest.raises(FinegrainError, match="wobble"):
        parse_perturbations("wobble")
    with pytest.raises(FinegrainError, match="frames"):
        frame_indices("rotate", 40)


def test_tiny_and_unreadable_images_do_not_crash(tmp_path):
    rng = np.random.default_rng(0)
    paths = []
    for k, size in enumerate([(5, 7), (1, 40), (20, 20)]):
        path = tmp_path / f"tiny{k}.png"
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    tiny = Preprocessing(resize=16, crop=16)
    crop = load_eval_crop(paths[0], tiny)
    for name in CORRUPTIONS + VALIDATION_CORRUPTIONS:
        out = corrupt_image(crop, name, 5, seed=0)
        assert out.shape == (16, 16, 3) and out.dtype == np.uint8
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    samples = [Sample(str(p), 0) for p in paths] + [Sample(str(broken), 1)]
    result = evaluate_robustness(ConstantNet(), samples, tiny, corruptions="zoom_blur,snow,pixelate", severities="5",
                                 frames=3, cache_dir=None, **QUICK)
    assert result["num_images"] == 3 and result["unreadable_images"] == 1
    assert result["top1"] == 0.0  # ConstantNet says class 3; these are class 0


def _cli():
    import typer

    from finegrain.cli.robustness import compare, robustness

    app = typer.Typer()
    app.command("robustness")(robustness)
    app.command("compare")(compare)
    return app


def test_robustness_and_compare_commands(demo, tmp_path):
    from finegrain.models import create_model, save_model

    model = create_model("resnet50", num_classes=len(demo["train"].classes), base_width=8)
    model.preprocessing = Preprocessing(resize=37, crop=32)
    weights = tmp_path / "tiny.safetensors"
    save_model(model, weights, extra_metadata={"finegrain.classes": json.dumps(demo["train"].classes)})
    runner = CliRunner()
    out = tmp_path / "run.json"
    invoked = runner.invoke(_cli(), [
        "robustness", "--weights", str(weights), "--corruptions", "gaussian_noise,fog", "--severities", "1,5",
        "--frames", "2", "--perturbations", "rotate", "--max-images", "1", "--json", str(out),
        "--cache", str(tmp_path / "cache"), "--throughput-iters", "1", "--workers", "0", "--device", "cpu"])
    assert invoked.exit_code == 0, invoked.output
    assert "mCE" in invoked.output and "Throughput" in invoked.output
    written = json.loads(out.read_text())
    assert {"top1", "mce", "mfr", "throughput"} <= set(written) and written["throughput"] > 0
    assert set(written["errors"]) == {"gaussian_noise", "fog"} and set(written["errors"]["fog"]) == {"1", "5"}
    assert written["data"]["root"] == str(Path(DEMO_ROOT).resolve()) and written["num_images"] == 16
    assert out.with_suffix(".png").read_bytes().startswith(b"\x89PNG")
    other = tmp_path / "other.json"
    other.write_text(json.dumps({**written, "name": "other-run", "seed": 1}))
    outs = [out, other]
    compared = runner.invoke(_cli(), ["compare", *map(str, outs), "--per-corruption"])
    assert compared.exit_code == 0, compared.output
    assert "Top-1" in compared.output and "gaussian_noise" in compared.output and "differ in seed" in compared.output
    bad = runner.invoke(_cli(), ["compare", str(weights)])
    assert isinstance(bad.exception, FinegrainError)
    wrong = tmp_path / "wrong.safetensors"
    save_model(model, wrong, extra_metadata={"finegrain.classes": json.dumps(demo["train"].classes[::-1])})
    refused = runner.invoke(_cli(), ["robustness", "--weights", str(wrong), "--frames", "0", "--device", "cpu"])
    assert isinstance(refused.exception, FinegrainError) and "differ" in str(refused.exception)


def test_recorded_data_is_read_from_checkpoint_metadata():
    assert recorded_data({}) is None
    entry = {"kind": "food101", "root": "/data/food-101", "options": {"test_fraction": 0.2}}
    assert recorded_data({"finegrain.data": json.dumps(entry)}) == ("food101", Path("/data/food-101"),
                                                                    {"test_fraction": 0.2})
    assert recorded_data({"finegrain.data": "/data/fruits"}) == ("folder", Path("/data/fruits"), {})
