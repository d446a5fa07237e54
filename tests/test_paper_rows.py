"""Every row of the paper's ablation tables as a recipe: the rows in order, what each trains, the
step one row adds to another, the release's layout, and `finegrain recipes --table` / `diff`."""
from __future__ import annotations

import re

import pytest
import typer
from typer.testing import CliRunner

from finegrain.cli import recipes as recipes_cli
from finegrain.errors import FinegrainError
from finegrain.recipes import Recipe, list_recipes, load_recipe, same_recipe_or_error
from finegrain.recipes.compare import recipe_differences
from finegrain.recipes.rows import paper_rows

ROWS = {2: [f"C{i}" for i in range(6)], 3: [f"A{i}" for i in range(5)], 4: ["1", "2", "3"], 5: ["1", "2", "3", "4"],
        6: [f"T{i}" for i in range(6)], 7: [f"E{i}" for i in range(13)], 9: [f"M{i}" for i in range(9)],
        10: [f"F{i}" for i in range(14)]}
ASSEMBLE = "assemble_resnet50"
# Table 7: network, epochs, LS, Mixup type, DropBlock end keep_prob, KD, AutoAugment, eval resize / crop.
TABLE_7 = {
    "E0": ("resnet50", 120, 0.0, None, 1.0, False, None, 256, 224),
    "E1": ("resnet50d", 120, 0.0, None, 1.0, False, None, 256, 224),
    "E2": ("resnet50d", 120, 0.1, None, 1.0, False, None, 256, 224),
    "E3": ("resnet50d", 200, 0.1, 1, 1.0, False, None, 256, 224),
    "E4": ("r50d_se", 200, 0.1, 1, 1.0, False, None, 256, 224),
    "E5": ("r50d_se", 270, 0.1, 1, 0.9, False, None, 256, 224),
    "E6": ("r50d_sk", 270, 0.1, 1, 0.9, False, None, 256, 224),
    "E7": ("r50d_sk", 270, 0.1, 1, 0.9, True, None, 256, 224),
    "E8": ("r50d_sk", 600, 0.1, 1, 0.9, True, None, 256, 224),
    "E9": ("r50d_sk_bl", 600, 0.1, 1, 0.9, True, None, 292, 256),
    "E10": (ASSEMBLE, 600, 0.1, 1, 0.9, True, None, 292, 256),
    "E11": (ASSEMBLE, 600, 0.1, 1, 0.9, True, "release_imagenet", 292, 256),
    "E12": ("assemble_resnet152", 600, 0.1, 1, 0.9, True, "release_imagenet", 257, 256),
}
# Table 9: network, epochs, LS, Mixup type, DropBlock end keep_prob, KD.
TABLE_9 = {
    "M0": ("mobilenet_v1", 120, 0.0, None, 1.0, False), "M1": ("se_mobilenet_v1", 360, 0.0, None, 1.0, False),
    "M2": ("mobilenet_v1", 120, 0.1, None, 1.0, False), "M3": ("mobilenet_v1", 200, 0.1, 1, 1.0, False),
    "M4": ("mobilenet_v1", 200, 0.1, 1, 1.0, True), "M5": ("mobilenet_v1", 360, 0.1, 1, 1.0, True),
    "M6": ("se_mobilenet_v1", 360, 0.1, 1, 1.0, True), "M7": ("se_mobilenet_v1_r2", 360, 0.1, 1, 1.0, True),
    "M8": ("se_mobilenet_v1_r2", 900, 0.1, 1, 0.95, True),
}
# Table 10: network fine-tuned, and the fine-tuning regularization (DropBlock, Mixup, AutoAugment, LS).
FINE_TUNING = [(False, False, False, False), (True, False, False, False), (True, True, False, False),
               (True, True, True, False), (True, True, True, True)]
TABLE_10 = {"F0": ("resnet50", FINE_TUNING[0]), "F1": ("resnet50d", FINE_TUNING[0]),
            "F2": ("r50d_sk", FINE_TUNING[0]), "F3": ("r50d_sk_bl", FINE_TUNING[0]),
            **{f"F{4 + i}": (ASSEMBLE, steps) for i, steps in enumerate(FINE_TUNING)},
            **{f"F{9 + i}": (ASSEMBLE, steps) for i, steps in enumerate(FINE_TUNING)}}


@pytest.fixture(scope="module")
def shipped() -> dict[str, Recipe]:
    """Every shipped recipe, loaded once."""
    return {name: load_recipe(name) for name in list_recipes()}


@pytest.fixture(scope="module")
def tables(shipped: dict[str, Recipe]) -> dict[int, dict[str, Recipe]]:
    """table -> row -> its loaded recipe, for every table a shipped recipe names."""
    return {table: {row: shipped[name] for row, name, _ in rows} for table, rows in paper_rows().items()}


def test_every_row_of_the_ablation_tables_is_a_recipe_in_order(tables: dict[int, dict[str, Recipe]]) -> None:
    assert {table: list(rows) for table, rows in tables.items()} == ROWS
    for table, rows in tables.items():
        for row, recipe in rows.items():
            assert f"{table}:{row}" in recipe.paper_rows


def test_table_7_and_9_rows_train_what_the_paper_says(tables: dict[int, dict[str, Recipe]]) -> None:
    for row, expected in [*TABLE_7.items(), *((row, (*spec, None, 256, 224)) for row, spec in TABLE_9.items())]:
        recipe = tables[7 if row[0] == "E" else 9][row]
        reg, data = recipe.regularization, recipe.data
        got = (recipe.model.name, recipe.train.epochs, reg.label_smoothing, reg.mixup.type, reg.dropblock.end,
               recipe.kd_required, reg.autoaugment, data.eval_resize, data.eval_crop)
        assert got == expected, row
        assert (recipe.optim.lr, recipe.train.batch_size, recipe.optim.weight_decay) == (0.4, 1024, 1e-4), row


def test_table_10_rows_fine_tune_with_the_releases_food101_script(tables: dict[int, dict[str, Recipe]]) -> None:
    for row, (model, (dropblock, mixup, autoaugment, smoothing)) in TABLE_10.items():
        recipe = tables[10][row]
        reg = recipe.regularization
        assert (recipe.model.name, recipe.data.kind, recipe.train.epochs, recipe.model.expects_weights) == \
            (model, "food101", 100, True), row
        assert ((reg.dropblock.start, reg.dropblock.end) == (0.9, 0.7), reg.mixup.type == 1,
                reg.autoaugment == "release_good", reg.label_smoothing == 0.1) == (dropblock, mixup, autoaugment,
                                                                                  smoothing), row
        assert (recipe.optim.lr, recipe.optim.weight_decay, recipe.train.batch_size) == (0.01, 1e-3, 256), row
        assert (recipe.data.eval_resize, recipe.data.eval_crop, recipe.train.bn_momentum_rule) == (256, 224, True), row


@pytest.mark.parametrize("before, after, step", [
    ("7:E1", "7:E2", {"regularization.label_smoothing"}),
    ("7:E2", "7:E3", {"regularization.mixup.type", "train.epochs"}),
    ("7:E6", "7:E7", {"kd_required"}),
    ("7:E10", "7:E11", {"regularization.autoaugment"}),
    ("6:T3", "6:T4", {"data.eval_resize", "data.eval_crop"}),
    ("10:F6", "10:F7", {"regularization.autoaugment"}),
    ("10:F7", "10:F8", {"regularization.label_smoothing"}),
    ("4:2", "4:3", {"regularization.mixup.type"}),
])
def test_a_row_differs_from_the_previous_by_its_step(tables: dict[int, dict[str, Recipe]], before: str, after: str,
                                                     step: set[str]) -> None:
    first, second = (tables[int(key.split(":")[0])][key.split(":")[1]] for key in (before, after))
    assert {key for key, _, _ in recipe_differences(first, second)} == step


def test_release_layout_in_every_version_1_resnet_recipe(shipped: dict[str, Recipe]) -> None:
    """The release's TF-SAME max-pool and stride-1 D pool wherever its version-1 graph trained (the
    CPU demos start from scratch with the default layout)."""
    from finegrain.models.registry import check_overrides, variant

    for name, recipe in shipped.items():
        check_overrides(recipe.model.name, recipe.model.overrides)
        config = variant(recipe.model.name).config
        if name.endswith("/demo") or variant(recipe.model.name).family != "resnet" or config.get("stem") == "biglittle":
            continue
        assert recipe.model.overrides.get("maxpool_padding") == "tf_same", name
        assert recipe.model.overrides.get("d_pool_at_stride1", False) == (config.get("shortcut") == "avg_d"), name


def test_recipes_table_lists_the_rows_in_order_and_diff_prints_the_step() -> None:
    app = typer.Typer()
    app.add_typer(recipes_cli.app, name="recipes")
    listed = CliRunner().invoke(app, ["recipes", "--table", "7"], env={"COLUMNS": "200"})
    assert listed.exit_code == 0, listed.output
    found = re.findall(r"^│\s*(E\d+)\s*│", listed.stdout, re.MULTILINE)  # the row column
    assert found == [f"E{i}" for i in range(13)] and "backbone/e10_assemble_no_autoaugment" in listed.stdout
    missing = CliRunner().invoke(app, ["recipes", "--table", "8"])
    assert isinstance(missing.exception, FinegrainError)
    assert "Tables with recipes: 2, 3, 4, 5, 6, 7, 9, 10." in str(missing.exception)
    shown = CliRunner().invoke(app, ["recipes", "diff", "E2", "e3_r50d"], env={"COLUMNS": "200"})
    assert shown.exit_code == 0, shown.output
    assert re.search(r"regularization\.mixup\.type\s*│\s*null\s*│\s*1", shown.stdout)
    assert re.search(r"train\.epochs\s*│\s*120\s*│\s*200", shown.stdout) and "label_smoothing" not in shown.stdout
    shown_row = CliRunner().invoke(app, ["recipes", "show", "f13", "--json"])
    assert shown_row.exit_code == 0 and '"name": "fgvc/food101"' in shown_row.stdout
    ambiguous = CliRunner().invoke(app, ["recipes", "diff", "1", "E2"])
    assert isinstance(ambiguous.exception, FinegrainError) and "4:1 (backbone/e2_r50d_ls)" in str(ambiguous.exception)


def test_paper_rows_are_validated_and_do_not_block_a_resume() -> None:
    with pytest.raises(FinegrainError, match="Recipe key 'paper_rows' must be a list of TABLE:ROW names"):
        load_recipe("food101", ["paper_rows=[F13]"], group="fgvc")
    saved = load_recipe("food101", ["paper_rows=[]", "description=old"], group="fgvc")
    same_recipe_or_error(saved, load_recipe("food101", group="fgvc"))
