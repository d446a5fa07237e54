"""Honest model selection: the validation part never overlaps train or test, depends only on its
seed and the sample list (not on the training seed, the order files are listed in, or the process
count), is the data set's official one where it has one; a select_on=val run chooses best on it
and evaluates the test split once at the end, for the best and the last weights."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

import finegrain
from finegrain.data import DEMO_ROOT, ImageDataset, load_splits
from finegrain.data.base import Split
from finegrain.data.transforms import eval_transform
from finegrain.data.validation import hold_out
from finegrain.errors import FinegrainError
from finegrain.eval.classification import predict_logits, topk_accuracy
from finegrain.recipes import load_recipe, recipe_from_dict
from finegrain.train import report
from finegrain.train.fgvc import run_fgvc
from finegrain.train.selection import VALIDATION_FILE
from test_data import _aircraft, _flowers, _write
from test_trainer import TINY, make_tiny_folder

CPU = torch.device("cpu")


def paths(split: Split) -> set[str]:
    return {sample.path for sample in split.samples}


def test_the_stratified_part_is_disjoint_and_a_function_of_seed_and_samples_only() -> None:
    splits = load_splits("folder", DEMO_ROOT)
    train, test = splits["train"], splits["test"]
    part = hold_out("folder", DEMO_ROOT, train, 0.1, 0, by_class=False)
    assert not paths(part.val) & paths(part.train) and not paths(part.val) & paths(test)
    assert paths(part.val) | paths(part.train) == paths(train)
    per_class = [part.val.labels.count(label) for label in range(len(train.classes))]
    assert per_class == [2] * 16  # round(24 x 0.1) of each class's 24 photos
    shuffled = Split(random.Random(7).sample(train.samples, len(train)), train.classes)
    assert paths(hold_out("folder", DEMO_ROOT, shuffled, 0.1, 0, by_class=False).val) == paths(part.val)
    assert paths(hold_out("folder", DEMO_ROOT, train, 0.1, 1, by_class=False).val) != paths(part.val)
    # The training seed has no say: a recipe's runs over seeds share one part (it takes no seed but val_seed).
    recipe = load_recipe("demo", ["train.seed=5"], group="fgvc")
    assert (recipe.eval.select_on, recipe.eval.val_fraction, recipe.eval.val_seed) == ("val", 0.1, 0)


def test_zero_shot_validation_holds_out_whole_training_classes() -> None:
    recipe = load_recipe("demo", [], group="retrieval")
    splits = load_splits("folder_zeroshot", DEMO_ROOT, **recipe.data.options)
    part = hold_out("folder_zeroshot", DEMO_ROOT, splits["train"], 0.1, 0, by_class=True)
    assert len(part.val.classes) == 2 and len(part.train.classes) == 9  # at least 2 of the 11
    assert not set(part.val.classes) & set(part.train.classes)
    assert not set(part.val.classes) & set(splits["test"].classes)
    for split in (part.train, part.val):  # labels re-indexed 0..k-1, still naming the photo's folder
        assert sorted(set(split.labels)) == list(range(len(split.classes)))
        assert all(split.classes[s.label] == Path(s.path).parent.name for s in split.samples)
    assert len(part.train) + len(part.val) == len(splits["train"])


def test_flowers_and_aircraft_hold_out_their_official_validation_split(tmp_path: Path) -> None:
    (tmp_path / "flowers").mkdir()
    _flowers(tmp_path / "flowers")
    train = load_splits("flowers102", tmp_path / "flowers")["train"]  # trnid + valid: images 1-4
    part = hold_out("flowers102", tmp_path / "flowers", train, 0.5, 0, by_class=False)
    assert sorted(Path(p).name for p in paths(part.val)) == ["image_00003.jpg", "image_00004.jpg"]
    assert sorted(Path(p).name for p in paths(part.train)) == ["image_00001.jpg", "image_00002.jpg"]
    assert part.source == "official (setid.mat valid)"

    _aircraft(tmp_path / "aircraft")
    train = load_splits("aircraft", tmp_path / "aircraft")["train"]
    with pytest.raises(FinegrainError, match="images_variant_val.txt.*eval.select_on=test"):
        hold_out("aircraft", tmp_path / "aircraft", train, 0.5, 0, by_class=False)
    _write(tmp_path / "aircraft" / "data" / "images_variant_val.txt", ["0037511 F-16A/B", "0037512 Cessna 172"])
    part = hold_out("aircraft", tmp_path / "aircraft", train, 0.5, 0, by_class=False)
    assert sorted(Path(p).stem for p in paths(part.val)) == ["0037511", "0037512"]
    assert sorted(Path(p).stem for p in paths(part.train)) == ["0034309", "0034958"]


def val_recipe(root: Path, epochs: int = 3) -> object:
    return recipe_from_dict({**TINY, "data": {**TINY["data"], "root": str(root)},
                             "train": {**TINY["train"], "epochs": epochs, "threads": 1},
                             "eval": {"select_on": "val", "val_fraction": 0.25}})


def test_a_val_run_selects_on_val_and_evaluates_test_once_for_best_and_last(tmp_path: Path) -> None:
    root = make_tiny_folder(tmp_path / "photos")  # 3 classes, 8 train / 4 test photos each
    recipe, run = val_recipe(root), tmp_path / "run"
    summary = run_fgvc(recipe, run, device=CPU, progress=False, echo=lambda message: None)
    record = json.loads((run / VALIDATION_FILE).read_text())
    assert (record["train_images"], record["val_images"]) == (18, 6)  # 2 of each class's 8
    assert not {Path(p).parent.parent.name for p in record["val"]} - {"train"}  # from the training photos only
    rows = report.read_metrics(run)
    assert [row["epoch"] for row in rows] == [1, 2, 3] and all("val_top1" in row for row in rows)
    best_value = max(row["val_top1"] for row in rows)
    best = [row for row in rows if row["val_top1"] == best_value][-1]  # a tie goes to the later epoch
    assert summary["best"] == {"metric": "val_top1", "value": best_value, "epoch": best["epoch"]}
    assert [row["epoch"] for row in rows if "test_top1" in row] == sorted({best["epoch"], 3})
    # The best row's test figure is best.safetensors' on the test split.
    model = finegrain.load_model(run / "best.safetensors")
    test = load_splits("folder", root)["test"]
    loader = torch.utils.data.DataLoader(ImageDataset(test.samples, eval_transform(model.preprocessing)), batch_size=16)
    logits, labels = predict_logits(model, loader, CPU, None, False)
    assert topk_accuracy(logits, labels, ks=(1,))["top1"] == pytest.approx(best["test_top1"], abs=1e-12)
    assert summary["test"]["best"]["test_top1"] == best["test_top1"]
    # Resumed once finished: nothing is trained or evaluated again.
    before = (run / report.METRICS_FILE).read_text()
    run_fgvc(recipe, run, resume=True, device=CPU, progress=False, echo=lambda message: None)
    assert (run / report.METRICS_FILE).read_text() == before
    # Data that now gives another validation part cannot continue the run.
    sorted((root / "train").glob("*/*.jpg"))[0].unlink()
    with pytest.raises(FinegrainError, match="another validation part"):
        run_fgvc(recipe, run, resume=True, device=CPU, progress=False, echo=lambda message: None)
