"""What a user meets first: `finegrain --help`, every command's `--help` and a mistyped option
answer without loading the heavy libraries (torch alone takes seconds and a gigabyte), switches
show as switches, and `finegrain bench` says what it is doing while it runs."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

HEAVY = ("torch", "torchvision", "faiss", "timm", "scipy", "matplotlib", "albumentations", "cv2",
         "pytorch_metric_learning")

# Runs in a fresh interpreter: this test process has torch loaded already (conftest).
SCRIPT = r"""
import json, sys
import typer
from typer.testing import CliRunner
from finegrain.cli import app

def command_paths(command, prefix):
    yield prefix
    for name, sub in sorted(getattr(command, "commands", {}).items()):
        yield from command_paths(sub, [*prefix, name])

runner = CliRunner()
answers = {}
for path in command_paths(typer.main.get_command(app), []):
    result = runner.invoke(app, [*path, "--help"], prog_name="finegrain", terminal_width=100)
    answers[" ".join([*path, "--help"])] = [result.exit_code, result.output]
for mistake in (["eval", "--weights", "w", "--data", "d", "--quiet", "true"], ["bench", "x", "--no-such-option"]):
    result = runner.invoke(app, mistake, prog_name="finegrain")
    answers[" ".join(mistake)] = [result.exit_code, result.output]
print(json.dumps({"answers": answers, "loaded": sorted(set(sys.modules) & set(sys.argv[1:]))}))
"""


@pytest.fixture(scope="module")
def report() -> dict:
    """Help of every command and two usage errors, answered in one fresh interpreter."""
    done = subprocess.run([sys.executable, "-c", SCRIPT, *HEAVY], capture_output=True, text=True, timeout=300,
                          check=True)
    return json.loads(done.stdout)


def test_help_of_every_command_and_usage_errors_load_no_heavy_library(report):
    assert report["loaded"] == []
    answers = report["answers"]
    # The walk reached the nested groups' commands, not only the top level.
    for command in ("--help", "bench --help", "index build --help", "backbone train --help", "recipes show --help",
                    "data info --help", "teacher-logits --help", "compare --help"):
        assert answers[command][0] == 0, (command, answers[command][1])
    assert all(code == 0 for name, (code, _) in answers.items() if name.endswith("--help"))
    # A switch takes no value: `--quiet true` leaves `true` as an unexpected argument (usage error, status 2).
    assert answers["eval --weights w --data d --quiet true"][0] == 2
    assert "true" in answers["eval --weights w --data d --quiet true"][1]
    assert answers["bench x --no-such-option"][0] == 2


def test_switches_show_without_a_value_placeholder(report):
    answers = report["answers"]
    for name, (_, output) in answers.items():
        if name.endswith("--help"):
            assert "<bool>" not in output, (name, output)
    quiet = next(line for line in answers["eval --help"][1].splitlines() if "--quiet" in line)
    assert quiet.split() == ["--quiet", "No", "progress", "bar"]


def test_bench_reports_each_model_its_warm_up_and_timing_loop_on_stderr():
    from typer.testing import CliRunner

    from finegrain.cli import app

    result = CliRunner().invoke(app, ["bench", "assemble_resnet50", "--base-width", "8", "--resolution", "32",
                                      "--batch", "1", "--iterations", "2", "--fast"], prog_name="finegrain")
    assert result.exit_code == 0, result.output
    progress = " ".join(result.stderr.split())  # rich wraps long lines at the terminal width
    expected = ["[1/3] torchvision resnet50: warm-up", "[1/3] torchvision resnet50: warm-up took",
                "timing 2 batches", "[2/3] assemble_resnet50: warm-up", "[3/3] assemble_resnet50 fast path FP32: "
                "warm-up"]
    positions = [progress.find(line) for line in expected]
    assert -1 not in positions and positions == sorted(positions), progress
    # The figures go to stdout, the progress does not.
    assert "fast path FP32" in result.stdout and "warm-up" not in result.stdout
