"""A wheel installed away from the checkout runs `finegrain recipes` and the demo (issue 12).

The wheel is built offline from a copy of the sources (pip with the venv's setuptools, no build
isolation), so stale files of an earlier in-tree build cannot slip into it, and installed with
`pip --target` into a temporary folder. The commands then run from yet another folder with only
that install on PYTHONPATH: the venv still provides torch and the other dependencies, the
package itself (code, recipes, demo photos) must come from the wheel.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from finegrain.recipes import RECIPES_DIR, list_recipes

CHECKOUT = Path(__file__).resolve().parent.parent  # the sources the wheel is built from
DEMO = CHECKOUT / "finegrain" / "data" / "demo"


def _pip(*args: str | Path, cwd: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "pip", *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


@pytest.fixture(scope="module")
def wheel_install(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(the wheel, the folder it is installed into)."""
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "source"
    shutil.copytree(CHECKOUT / "finegrain", source / "finegrain",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(CHECKOUT / name, source / name)
    _pip("wheel", "--no-deps", "--no-build-isolation", "--no-index", "--wheel-dir", tmp / "dist", ".", cwd=source)
    (wheel,) = (tmp / "dist").glob("finegrain-*.whl")
    _pip("install", "--no-deps", "--no-index", "--target", tmp / "site", wheel, cwd=tmp)
    return wheel, tmp / "site"


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts}


def test_wheel_holds_every_recipe_and_the_demo_photos(wheel_install: tuple[Path, Path]) -> None:
    wheel, _ = wheel_install
    names = set(zipfile.ZipFile(wheel).namelist())
    recipes = {f"finegrain/recipes/{name}.yaml" for name in list_recipes(RECIPES_DIR)}
    assert recipes and recipes <= names
    demo = {f"finegrain/data/demo/{name}" for name in _files(DEMO) if not name.endswith(".py")}
    assert {"finegrain/data/demo/LICENSE", "finegrain/data/demo/ATTRIBUTION.md"} <= demo
    assert sum(name.endswith(".jpg") for name in demo) == 544  # 16 classes x 34 photos (data/demo/ATTRIBUTION.md)
    assert demo <= names
    static = {f"finegrain/serve/static/{p.name}" for p in (CHECKOUT / "finegrain" / "serve" / "static").iterdir()}
    assert {"finegrain/serve/static/index.html", "finegrain/serve/static/app.js"} <= static <= names  # the web page


@pytest.mark.slow
def test_installed_wheel_lists_recipes_and_trains_the_demo(wheel_install: tuple[Path, Path], tmp_path: Path) -> None:
    """`finegrain recipes` and a one-epoch `finegrain fgvc --recipe demo` from the install alone."""
    _, site = wheel_install
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site), "COLUMNS": "200", "OMP_NUM_THREADS": "1"}

    def finegrain_cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "finegrain", *map(str, args)], cwd=elsewhere, env=env,
                              capture_output=True, text=True, timeout=600)

    where = subprocess.run([sys.executable, "-c", "import json, finegrain, finegrain.data, finegrain.recipes; print("
                            "json.dumps([finegrain.__file__, str(finegrain.data.DEMO_ROOT), "
                            "str(finegrain.recipes.RECIPES_DIR)]))"],
                           cwd=elsewhere, env=env, capture_output=True, text=True, timeout=120)
    assert where.returncode == 0, where.stderr
    for path in json.loads(where.stdout):
        assert Path(path).resolve().is_relative_to(site.resolve()), path

    listed = finegrain_cli("recipes")
    assert listed.returncode == 0, listed.stderr
    for name in list_recipes(RECIPES_DIR):
        assert name in listed.stdout

    trained = finegrain_cli("fgvc", "--recipe", "demo", "--set", "train.epochs=1", "--out", tmp_path / "run", "--quiet")
    assert trained.returncode == 0, trained.stdout[-3000:] + trained.stderr[-3000:]
    assert (tmp_path / "run" / "best.safetensors").is_file()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["epoch"] == 1 and 0.0 <= rows[-1]["test_top1"] <= 1.0
