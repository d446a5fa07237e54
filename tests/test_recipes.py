"""Recipe schema, YAML loading, --set overrides and the shipped recipes."""
from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import typer
import yaml
from typer.testing import CliRunner

from finegrain.cli import fgvc as fgvc_cli
from finegrain.cli import recipes as recipes_cli
from finegrain.errors import FinegrainError
from finegrain.recipes import (RECIPES_DIR, Recipe, apply_overrides, find_recipe, list_recipes, load_recipe,
                               recipe_from_dict, recipe_to_yaml, same_recipe_or_error, schema_for)
from finegrain.recipes.rows import paper_rows

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
    assert (reg.mixup.type, reg.mixup.alpha, reg.label_smoothing, reg.autoaugment) == (1, 0.2, 0.1, "release_good")
    assert reg.kd.logits is None
    # The release's Food-101 script evaluates with its `imagenet` preprocessing: 256 -> 224.
    assert (recipe.model.name, recipe.data.train_size, recipe.data.eval_resize, recipe.data.eval_crop) == \
        ("assemble_resnet50", 224, 256, 224)
    assert "Table 15" in (RECIPES_DIR / "fgvc" / f"{name}.yaml").read_text()


def test_every_shipped_fgvc_recipe_validates() -> None:
    names = [n for n in list_recipes() if n.startswith("fgvc/")]
    table_10 = {name for _, name, _ in paper_rows()[10]}
    assert set(names) == {f"fgvc/{n}" for n in [*PAPER_FGVC_EPOCHS, "demo"]} | table_10
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


@pytest.mark.parametrize("assignment, key", [
    ("optim.momentum=-1", "optim.momentum"), ("optim.momentum=1", "optim.momentum"),
    ("optim.weight_decay=-1e-4", "optim.weight_decay"), ("optim.lr=0", "optim.lr"),
    ("optim.lr_reference_batch=0", "optim.lr_reference_batch"),
    ("data.train_size=0", "data.train_size"), ("data.eval_resize=-96", "data.eval_resize"),
    ("data.eval_crop=0", "data.eval_crop"), ("data.train_size=100000", "data.train_size"),
    ("data.crop_min_area=0", "data.crop_min_area"),
    ("train.epochs=0", "train.epochs"), ("train.batch_size=0", "train.batch_size"),
    ("train.eval_batch_size=0", "train.eval_batch_size"), ("train.threads=0", "train.threads"),
    ("train.workers=-1", "train.workers"), ("train.workers=80000", "train.workers"),
    ("train.threads=100000", "train.threads"), ("train.accumulate_steps=0", "train.accumulate_steps"),
    ("train.seed=-1", "train.seed"), ("train.seed=18446744073709551616", "train.seed"),
    ("schedule.warmup_epochs=-1", "schedule.warmup_epochs"), ("schedule.final_lr=-0.1", "schedule.final_lr"),
    ("regularization.mixup.alpha=0", "regularization.mixup.alpha"),
    ("regularization.label_smoothing=1.5", "regularization.label_smoothing"),
    ("regularization.dropblock.end=0", "regularization.dropblock.end"),
    ("regularization.dropblock.start=1.5", "regularization.dropblock.start"),
    ("regularization.kd.temperature=0", "regularization.kd.temperature"),
    ("model.overrides={base_width: 0}", "model.overrides.base_width"),
    ("model.overrides={base_width: 100000}", "model.overrides.base_width"),
    ("model.overrides={base_width: true}", "model.overrides.base_width"),
    ("model.overrides.layers=[3, 4, 200000, 3]", "model.overrides.layers"),
    ("model.overrides.layers=[3, 4, -6, 3]", "model.overrides.layers"),
    ("model.overrides.layers=3", "model.overrides.layers"),
    ("model.overrides.se_reduction=0", "model.overrides.se_reduction"),
    ("model.overrides={1: 2}", "model.overrides"),
    ("data.options={split: {2001-01-01: a}}", "data.options.split"),
    ("data.options={first: 2001-01-01}", "data.options.first"),
    ("data.root=!!binary aGk=", "data.root"),
])
def test_values_out_of_range_are_refused(assignment: str, key: str) -> None:
    with pytest.raises(FinegrainError) as error:
        load_recipe("demo", [assignment], group="fgvc")
    message = str(error.value)
    assert message.startswith(f"Recipe key '{key}") and "Fix the value in recipe fgvc/demo or in --set" in message


@pytest.mark.parametrize("group, assignment, key", [
    ("retrieval", "retrieval.embedding_size=0", "retrieval.embedding_size"),
    ("retrieval", "retrieval.recall_ks=[1, 0]", "retrieval.recall_ks"),
    ("retrieval", "retrieval.gem_p=0", "retrieval.gem_p"),
    ("retrieval", "retrieval.gem_lr_mult=-1", "retrieval.gem_lr_mult"),
    ("retrieval", "retrieval.loss.lr_mult=0", "retrieval.loss.lr_mult"),
    ("retrieval", "retrieval.loss.args={temperature: .nan}", "retrieval.loss.args.temperature"),
    ("retrieval", "retrieval.m_per_class=0", "retrieval.m_per_class"),
    ("retrieval", "optim.momentum=1.5", "optim.momentum"),
    ("backbone", "kd_required=1", "kd_required"),
    ("backbone", "optim.lr=.nan", "optim.lr"),
])
def test_task_sections_are_validated_too(group: str, assignment: str, key: str) -> None:
    with pytest.raises(FinegrainError, match=f"^Recipe key '{re.escape(key)}'"):
        load_recipe("demo", [assignment], group=group)


@pytest.mark.parametrize("value", [".nan", ".NaN", ".inf", "-.inf", "1e400"])
@pytest.mark.parametrize("key", ["optim.lr", "schedule.final_lr", "data.options.fraction"])
def test_non_finite_numbers_are_refused_anywhere(key: str, value: str) -> None:
    with pytest.raises(FinegrainError, match=f"Recipe key '{re.escape(key)}' must be a finite number"):
        load_recipe("demo", [f"{key}={value}"], group="fgvc")


def test_exponents_without_a_dot_are_numbers(tmp_path: Path) -> None:
    """YAML 1.1 reads `1e-4` as a string; users write it, in files and in --set."""
    assert load_recipe("demo", ["optim.lr=1e-4", "optim.weight_decay=5E-4"], group="fgvc").optim.lr == 1e-4
    own = tmp_path / "mine.yaml"
    own.write_text("optim:\n  lr: 1e-4\n  weight_decay: 5e-5\nmodel: {overrides: {gem_p: 3e0}}\n")
    recipe = load_recipe(str(own))
    assert (recipe.optim.lr, recipe.optim.weight_decay, recipe.model.overrides["gem_p"]) == (1e-4, 5e-5, 3.0)
    assert load_recipe("demo", ["description=e5", "data.root=1.2.3"], group="fgvc").data.root == "1.2.3"
    with pytest.raises(FinegrainError, match="'train.epochs' must be an integer"):
        load_recipe("demo", ["train.epochs=1e1"], group="fgvc")
    (tmp_path / "resolved.yaml").write_text(recipe_to_yaml(recipe))
    assert load_recipe(str(tmp_path / "resolved.yaml")) == recipe


NESTED = b"[" * 20_000 + b"]" * 20_000
ALIAS_BOMB = b"".join(f"l{i}: &l{i} [{', '.join([f'*l{i - 1}' if i else 'x'] * 9)}]\n".encode() for i in range(9))


@pytest.mark.parametrize("content, problem", [
    (b"- optim\n- train\n", "must be a YAML mapping of sections.*top level is a list"),
    (b"0.01\n", "must be a YAML mapping.*top level is a number"),
    ("description: caf\u00e9\n".encode("latin-1"), "is not UTF-8 text"),
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "is not UTF-8 text"),
    (b"optim:\n  lr: \x00\n", "not valid YAML: it holds the character U\\+0000"),
    (b"", "is empty"),
    (b"# only a comment\n", "is empty"),
    (b"optim: {lr: 0.1}\noptim: {lr: 0.2}\n", "key 'optim' appears twice \\(line 2"),
    (b"!!python/object/apply:os.system [echo]\n", "not valid YAML: could not determine a constructor"),
    (NESTED, "nests too deeply"),
    (ALIAS_BOMB, "more than 10000 values"),
    (b"#" * (2 << 20), "larger than 1024 KB"),
])
def test_files_that_are_not_recipes_fail_clearly(tmp_path: Path, content: bytes, problem: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_bytes(content)
    with pytest.raises(FinegrainError, match=problem) as error:
        load_recipe(str(path))
    assert "bad.yaml" in str(error.value)


@pytest.mark.parametrize("assignment", ["optim.lr=.nan", "optim.momentum=-1", "model.overrides={base_width: 0}",
                                        "data.train_size=0", "optim.lrr=1", "optim.lr=[1,"])
def test_recipes_show_refuses_what_fgvc_refuses(assignment: str, tmp_path: Path) -> None:
    app = typer.Typer()
    app.command("fgvc")(fgvc_cli.fgvc)
    app.add_typer(recipes_cli.app, name="recipes")
    shown = CliRunner().invoke(app, ["recipes", "show", "fgvc/demo", "--set", assignment])
    trained = CliRunner().invoke(app, ["fgvc", "--recipe", "demo", "--set", assignment, "--out", str(tmp_path / "run")])
    assert isinstance(shown.exception, FinegrainError) and isinstance(trained.exception, FinegrainError)
    assert str(shown.exception) == str(trained.exception)
    assert not (tmp_path / "run").exists()


def test_recipes_show_validates_a_file_with_the_schema_of_its_group(tmp_path: Path) -> None:
    own = tmp_path / "mine.yaml"
    own.write_text("retrieval:\n  embedding_size: 64\n")
    show = typer.Typer()
    show.add_typer(recipes_cli.app, name="recipes")
    shown = CliRunner().invoke(show, ["recipes", "show", str(own), "--group", "retrieval", "--json"])
    assert shown.exit_code == 0, shown.output
    assert '"embedding_size": 64' in shown.stdout
    refused = CliRunner().invoke(show, ["recipes", "show", str(own)])
    assert isinstance(refused.exception, FinegrainError) and "Unknown recipe key 'retrieval'" in str(refused.exception)
    wrong = CliRunner().invoke(show, ["recipes", "show", str(own), "--group", "retrival"])
    assert isinstance(wrong.exception, FinegrainError) and "fgvc, retrieval, backbone" in str(wrong.exception)


def test_resume_accepts_only_the_same_recipe() -> None:
    saved = load_recipe("demo", group="fgvc")
    same_recipe_or_error(saved, load_recipe("demo", ["train.workers=2"], group="fgvc"))
    with pytest.raises(FinegrainError, match="started with optim.lr=0.1, now 0.2"):
        same_recipe_or_error(saved, load_recipe("demo", ["optim.lr=0.2"], group="fgvc"))
    with pytest.raises(FinegrainError, match="started with model.overrides="):
        same_recipe_or_error(saved, load_recipe("demo", ["model.overrides.zero_gamma=false"], group="fgvc"))


def test_the_recipes_package_loads_without_torch_or_the_training_code() -> None:
    """`finegrain recipes` and every command's argument checks stay fast; the schema is one layer."""
    code = ("import sys, finegrain.recipes; print(sorted(m for m in sys.modules "
            "if m in ('torch', 'faiss', 'timm') or m.startswith(('finegrain.train', 'finegrain.cli'))))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stdout + done.stderr


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

