"""Replay every fuzz target's seed corpus and regressions without atheris (tests/fuzz/README.md).

Each tests/fuzz/fuzz_<target>.py defines `one_input(data)`, which swallows FinegrainError and
lets anything else out. Every file in tests/fuzz/corpus/<target>/ and
tests/fuzz/regressions/<target>/ must come back from it within SECONDS (after an empty input
has warmed up lazy imports), in a child process
whose address space may grow by at most BOUND_MB past its imports: an input that once hung,
ballooned or crashed a reader fails here, and cannot take the test run down with it.
"""
from __future__ import annotations

import importlib.util
import json
import signal
import subprocess
import sys
import traceback
from pathlib import Path

import pytest

FUZZ = Path(__file__).parent / "fuzz"
TARGETS = sorted(path.stem.removeprefix("fuzz_") for path in FUZZ.glob("fuzz_*.py"))
SECONDS, WARM_UP_SECONDS, BOUND_MB = 10, 120, 2048


def inputs(target: str) -> list[Path]:
    return sorted(path for kind in ("corpus", "regressions") for path in (FUZZ / kind / target).glob("*")
                  if path.is_file())


@pytest.mark.parametrize("target", TARGETS)
def test_corpus_and_regressions_replay_cleanly(target: str, tmp_path: Path) -> None:
    files = inputs(target)
    assert files, f"tests/fuzz/corpus/{target}/ holds no seed inputs"
    report = tmp_path / "failures.json"
    result = subprocess.run([sys.executable, __file__, target, str(report), *map(str, files)],
                            capture_output=True, text=True, timeout=SECONDS * len(files) + WARM_UP_SECONDS + 120)
    assert result.returncode == 0, result.stderr[-4000:]
    failures = json.loads(report.read_text())
    assert not failures, "\n\n".join(f"{name}:\n{error}" for name, error in failures.items())


class Timeout(BaseException):
    """Raised by the alarm; a BaseException so that no `except Exception` in a reader hides it."""


def replay(target: str, files: list[str]) -> dict[str, str]:
    """Feed each file to the target's one_input; returns file name -> what went wrong."""
    spec = importlib.util.spec_from_file_location(f"fuzz_{target}", FUZZ / f"fuzz_{target}.py")
    assert spec is not None and spec.loader is not None
    harness = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(harness)
    failures = {}
    if not callable(getattr(harness, "main", None)):
        failures["(harness)"] = f"fuzz_{target}.py defines no main() that runs atheris"
    if sys.platform == "linux":
        import resource

        status = Path("/proc/self/status").read_text()
        vm_bytes = int(next(line for line in status.splitlines() if line.startswith("VmSize:")).split()[1]) * 1024
        limit = vm_bytes + (BOUND_MB << 20)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    def alarm(*_: object) -> None:
        raise Timeout("ran out of time")

    signal.signal(signal.SIGALRM, alarm)
    # An empty input first, with time for the lazy imports a first call may make (torch, faiss).
    for name, data, seconds in [("(empty input)", b"", WARM_UP_SECONDS)] + [
            (f"{Path(path).parent.parent.name}/{Path(path).name}", Path(path).read_bytes(), SECONDS) for path in files]:
        signal.alarm(seconds)
        try:
            harness.one_input(data)
        except BaseException:  # noqa: BLE001 - every escape is the failure being reported
            failures[name] = traceback.format_exc(limit=-8)
        finally:
            signal.alarm(0)
    return failures


if __name__ == "__main__":
    Path(sys.argv[2]).write_text(json.dumps(replay(sys.argv[1], sys.argv[3:])))
