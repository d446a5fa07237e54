"""Recipe schema, YAML loading, --set overrides and the shipped recipes."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from finegrain.errors import FinegrainError
from finegrain.recipes import (RECIPES_DIR, Recipe, apply_overrides, find_recipe, list_recipes, load_recipe,
                               recipe_from_dict, recipe_to_yaml, schema_for)

PAPER_FGVC_EPOCHS = {"food101": 100, "cars196": 1000, "flowers102": 1000, "aircraft": 800, "pets": 1300}  # Table 15


@pytest.mark.parametrize("name", sorted(PAPER_FGVC_EPOCHS))
def test_fgvc_recipes_follow_appendix_b_and_table_15(name: str) -> None:
    recipe = load_recipe(name, group="fgvc")
    assert recipe.name == f"fgvc/{name}"
    assert recipe.train.epochs == PAPER_FGVC_EPOCHS[name]
    assert (recipe.optim.lr, recipe.optim.weight_decay, recipe.optim.momentum) == (0.01, 0.001, 0.9)
    assert (recipe.train.batch_size, recipe.schedule.warmup_epochs, recipe.train.bn_momentum_rule) == (256, 5, True)
    reg = recipe.regularization
    assert (reg.dropblock.start, reg.dropblock.end) == (0.9, 0.7)
    assert (reg.mixup.type, reg.mixup.alpha, reg.label_smoothing, reg.autoaugment) == (1, 0.2, 0.1, "cifar10")
    assert reg.kd.logits is None
    assert (recipe.model.name, recipe.data.train_size, recipe.data.eval_resize, recipe.data.eval_crop) == \
        ("assemble_resnet50", 224, 292, 256)
    assert "Table 15" in (RECIPES_DIR / "fgvc" / f"{name}.yaml").read_text()


def test_every_shipped_fgvc_recipe_validates() -> None:
    names = [n for n in list_recipes() if n.startswith("fgvc/")]
    assert set(names) == {f"fgvc/{n}" for n in [*PAPER_FGVC_EPOCHS, "demo"]}
    for name in names:
        assert type(load_recipe(name)) is Recipe


def test_group_schema_validates_its_own_sections() -> None:
    recipe = load_recipe("retrieval/sop")
    assert type(recipe).__name__ == "RetrievalRecipe" and schema_for("retrieval") is type(recipe)
    assert schema_for("fgvc") is Recipe
    with pytest.raises(FinegrainError, match="Unknown recipe key 'retrieval'"):
        load_recipe("retrieval/sop", schema=Recipe)


def test_unknown_key_names_the_key_and_the_valid_keys() -> None:
    with pytest.raises(FinegrainError) as error:
        recipe_from_dict({"optim": {"learning_rate": 0.1}})
    message = str(error.value)
    assert "optim.learning_rate" in message and "lr" in message and "weight_decay" in message


def test_unknown_top_level_section() -> None:
    with pytest.raises(FinegrainError, match="Unknown recipe key 'trian'.*train"):
        recipe_from_dict({"trian": {}})


@pytest.mark.parametrize("raw, key, expected", [
    ({"optim": {"lr": "fast"}}, "optim.lr", "a number"),
    ({"train": {"epochs": 2.5}}, "train.epochs", "an integer"),
    ({"train": {"channels_last": "yes"}}, "train.channels_last", "true or false"),
    ({"regularization": {"mixup": {"type": 3}}}, "regularization.mixup.type", "one of 1, 2"),
    ({"train": {"amp": "fp8"}}, "train.amp", "one of 'auto'"),
    ({"model": {"overrides": [1, 2]}}, "model.overrides", "a mapping"),
    ({"model": "resnet50"}, "model", "a mapping"),
])
def test_wrong_type_names_key_and_expected_type(raw: dict, key: str, expected: str) -> None:
    with pytest.raises(FinegrainError) as error:
        recipe_from_dict(raw)
    assert f"'{key}'" in str(error.value) and expected in str(error.value)


def test_int_widens_to_float_but_bool_is_not_a_number() -> None:
    assert recipe_from_dict({"optim": {"lr": 1}}).optim.lr == 1.0
    with pytest.raises(FinegrainError, match="optim.lr"):
        recipe_from_dict({"optim": {"lr": True}})


def test_values_out_of_range_are_refused() -> None:
    with pytest.raises(FinegrainError, match="regularization.label_smoothing"):
        recipe_from_dict({"regularization": {"label_smoothing": 1.5}})
    with pytest.raises(FinegrainError, match="regularization.dropblock.end"):
        recipe_from_dict({"regularization": {"dropblock": {"end": 0.0}}})


def test_overrides_parse_values_as_yaml() -> None:
    recipe = load_recipe("food101", group="fgvc", overrides=[
        "optim.lr=0.02", "train.epochs=3", "data.root=/data/food", "model.weights=null",
        "model.overrides={base_width: 8}", "regularization.mixup.type=2", "train.channels_last=false"])
    assert recipe.optim.lr == 0.02 and recipe.train.epochs == 3
    assert recipe.data.root == "/data/food" and recipe.model.weights is None
    assert recipe.model.overrides == {"base_width": 8}
    assert recipe.regularization.mixup.type == 2 and recipe.train.channels_last is False


def test_override_inside_a_dict_field_adds_a_key() -> None:
    recipe = load_recipe("demo", group="fgvc", overrides=["model.overrides.zero_gamma=false"])
    assert recipe.model.overrides["zero_gamma"] is False


def test_override_errors() -> None:
    with pytest.raises(FinegrainError, match="optim.lrr"):
        load_recipe("food101", group="fgvc", overrides=["optim.lrr=0.1"])
    with pytest.raises(FinegrainError, match="KEY=VALUE"):
        apply_overrides({}, ["optim.lr"])
    with pytest.raises(FinegrainError, match="'optim.lr' holds a value"):
        apply_overrides({"optim": {"lr": 0.1}}, ["optim.lr.x=1"])
    with pytest.raises(FinegrainError, match="optim.lr"):
        load_recipe("food101", group="fgvc", overrides=["optim.lr=[1, 2]"])


def test_find_recipe_by_short_name_group_and_path(tmp_path: Path) -> None:
    assert find_recipe("food101") == RECIPES_DIR / "fgvc" / "food101.yaml"
    assert find_recipe("fgvc/food101") == RECIPES_DIR / "fgvc" / "food101.yaml"
    assert find_recipe("demo", group="fgvc") == RECIPES_DIR / "fgvc" / "demo.yaml"
    with pytest.raises(FinegrainError, match="No recipe named 'food102'.*fgvc/food101"):
        find_recipe("food102")
    own = tmp_path / "mine.yaml"
    own.write_text("train:\n  epochs: 7\n")
    recipe = load_recipe(str(own))
    assert recipe.name == "mine" and recipe.train.epochs == 7


def test_ambiguous_short_name_lists_candidates(tmp_path: Path) -> None:
    for group in ("fgvc", "retrieval"):
        (tmp_path / group).mkdir()
        (tmp_path / group / "cars.yaml").write_text("{}\n")
    with pytest.raises(FinegrainError, match="ambiguous: fgvc/cars, retrieval/cars"):
        find_recipe("cars", root=tmp_path)
    assert find_recipe("cars", group="retrieval", root=tmp_path) == tmp_path / "retrieval" / "cars.yaml"


def test_invalid_yaml_file_is_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: {lr: [\n")
    with pytest.raises(FinegrainError, match="not valid YAML"):
        load_recipe(str(bad))


def test_resolved_yaml_round_trips() -> None:
    recipe = load_recipe("pets", group="fgvc", overrides=["optim.lr=0.005"])
    text = recipe_to_yaml(recipe)
    assert recipe_from_dict(yaml.safe_load(text)) == recipe
    assert "lr: 0.005" in text


def test_lr_scales_with_batch_only_when_asked() -> None:
    assert Recipe().effective_lr() == Recipe().optim.lr
    scaled = recipe_from_dict({"optim": {"lr": 0.4, "lr_reference_batch": 1024}, "train": {"batch_size": 256}})
    assert scaled.effective_lr() == pytest.approx(0.1)


@dataclass
class LossSection:
    name: str = "arcface"
    margin_degrees: float = 17.19


@dataclass
class ExtendedRecipe(Recipe):
    loss: LossSection = field(default_factory=LossSection)


def test_schema_is_extensible_by_subclassing() -> None:
    recipe = recipe_from_dict({"loss": {"name": "softmax"}, "optim": {"lr": 0.001}}, ExtendedRecipe)
    assert recipe.loss.name == "softmax" and recipe.optim.lr == 0.001
    with pytest.raises(FinegrainError, match="loss.margin"):
        recipe_from_dict({"loss": {"margin": 0.3}}, ExtendedRecipe)
