"""benchmarks/combined_table.py on hand-written results files: statistics, dataset filter, protocol dating."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
from pathlib import Path
from types import ModuleType

import pytest

from tests.benchmarks.conftest import load_script


@pytest.fixture(scope="module")
def combined() -> ModuleType:
    return load_script("combined_table")


def write(folder: Path, name: str, rows: list[dict], dataset: str = "magnetic_tile", **header) -> Path:
    """A results file in the harness's ``write_results`` format."""
    base = {
        "name": name,
        "command": f"python benchmarks/harness.py --name {name}",
        "machine": {},
        "dataset": dataset,
        "backbone": "tf_efficientnet_lite0",
        "image_size": 128,
        "max_steps": 300,
        "max_epochs": None,
        "max_time": None,
        "seed": 0,
        "batch_size": 8,
    }
    path = folder / f"{name}.json"
    path.write_text(json.dumps({**base, **header, "rows": rows}))
    return path


def mt(model: str, image: float, pixel: float, aupro: float, steps: int = 300, **extra) -> dict:
    return {"model": model, "image_AUROC": image, "pixel_AUROC": pixel, "pixel_AUPRO": aupro, "steps": steps} | extra


def run(combined: ModuleType, folder: Path, *extra: str) -> dict:
    assert combined.main(["--results-dir", str(folder), *extra]) == 0
    return json.loads((folder / "combined.json").read_text())


def find(rows: list[dict], **match) -> list[dict]:
    return [r for r in rows if all(r[k] == v for k, v in match.items())]


def test_seeds_are_averaged_with_std_and_range(combined: ModuleType, tmp_path: Path) -> None:
    values = {0: (0.912, 0.779, 0.635), 1: (0.844, 0.775, 0.600), 2: (0.880, 0.790, 0.610)}
    for seed, (image, pixel, aupro) in values.items():
        write(tmp_path, f"padim_s{seed}", [mt("Padim", image, pixel, aupro, steps=96)], seed=seed)
    write(tmp_path, "ours", [mt("AGPNet", 0.7, 0.6, 0.4), mt("MeanFeature", 0.8, 0.7, 0.5, steps=96)])
    data = run(combined, tmp_path, "--protocol-cutoff", "0")
    (padim,) = find(data["rows"], variant="Padim")
    images = [v[0] for v in values.values()]
    stats = padim["metrics"]["image_AUROC"]
    assert stats["n"] == padim["n"] == 3 and padim["seeds"] == [0, 1, 2]
    assert stats["mean"] == pytest.approx(statistics.fmean(images))
    assert stats["std"] == pytest.approx(statistics.stdev(images))
    assert (stats["min"], stats["max"]) == (0.844, 0.912)
    assert padim["metrics"]["pixel_AUPRO"]["mean"] == pytest.approx((0.635 + 0.600 + 0.610) / 3)
    assert padim["role"] == "peer" and padim["budget"] == "one pass, batch 8"
    assert padim["files"] == ["padim_s0.json", "padim_s1.json", "padim_s2.json"]
    assert find(data["rows"], variant="MeanFeature")[0]["role"] == "baseline"
    assert find(data["rows"], variant="AGPNet")[0]["role"] == "ours"
    table = (tmp_path / "combined.md").read_text()
    mean, std = statistics.fmean(images), statistics.stdev(images)
    assert f"| {mean:.3f} ± {std:.3f} (0.844–0.912) |" in table
    assert "| 3 | 0, 1, 2 | current |" in table


def test_only_magnetic_tile_and_elpv_files_are_read(combined: ModuleType, tmp_path: Path) -> None:
    write(tmp_path, "mt", [mt("AMINet", 0.8, 0.7, 0.6)])
    write(tmp_path, "elpv", [{"model": "AMINet", "image_AUROC": 0.86, "steps": 300}], dataset="elpv (mono)")
    write(tmp_path, "folder", [mt("AMINet", 0.1, 0.1, 0.1)], dataset="folder")
    write(tmp_path, "logical", [mt("AMINet", 0.2, 0.2, 0.2)], dataset="logical")
    (tmp_path / "throughput_cpu.json").write_text(json.dumps({"name": "t", "rows": [{"model": "AMINet"}]}))
    (tmp_path / "per_class.json").write_text(json.dumps({"rows": [{"class": "all", "model": 0.9}]}))
    (tmp_path / "broken.json").write_text("{not json")
    data = run(combined, tmp_path, "--protocol-cutoff", "0")
    assert sorted((r["dataset"], r["metrics"]["image_AUROC"]["mean"]) for r in data["rows"]) == [
        ("elpv", 0.86),
        ("magnetic_tile", 0.8),
    ]
    (elpv,) = find(data["rows"], dataset="elpv")
    assert elpv["cell_type"] == "mono" and set(elpv["metrics"]) == {"image_AUROC"}
    table = (tmp_path / "combined.md").read_text()
    assert "## Magnetic Tile" in table and "## ELPV" in table and "0.100" not in table and "0.200" not in table


def test_labels_split_into_variant_seed_and_curve_snapshot(combined: ModuleType, tmp_path: Path) -> None:
    assert combined.split_label("GLCF (local, seed 1)") == ("GLCF (local)", 1, None)
    assert combined.split_label("SCLVI (seed 0)") == ("SCLVI", 0, None)
    assert combined.split_label("AGPNet @ 300 steps") == ("AGPNet", None, 300)
    write(tmp_path, "glcf0", [mt("GLCF (local, seed 0)", 0.73, 0.67, 0.46, seed=0)], seed=[0])
    write(tmp_path, "glcf1", [mt("GLCF (local, seed 1)", 0.75, 0.69, 0.48, seed=1)], seed=[1])
    write(tmp_path, "curve", [mt("GLCF @ 300 steps", 0.70, 0.66, 0.40)], max_steps=600)
    data = run(combined, tmp_path, "--protocol-cutoff", "0")
    (local,) = find(data["rows"], variant="GLCF (local)")
    assert local["n"] == 2 and local["seeds"] == [0, 1]
    (curve,) = find(data["rows"], variant="GLCF")  # a curve snapshot is not averaged with a standalone run
    assert curve["budget"] == "300 steps (curve to 600), batch 8"


def test_a_rerun_seed_counts_once_and_other_configs_stay_apart(combined: ModuleType, tmp_path: Path) -> None:
    args = '{"AMINet": {"patch_size": 2}}'
    old = write(tmp_path, "first", [mt("AMINet", 0.70, 0.6, 0.5)], command=f"python harness.py --model-args '{args}'")
    new = write(tmp_path, "rerun", [mt("AMINet", 0.78, 0.7, 0.6)], command=f"python harness.py --model-args '{args}'")
    other = '{"AMINet": {"patch_size": 4}}'
    write(tmp_path, "other", [mt("AMINet", 0.60, 0.5, 0.4)], command=f"python harness.py --model-args '{other}'")
    os.utime(old, (1_000, 1_000))
    os.utime(new, (2_000, 2_000))
    data = run(combined, tmp_path, "--protocol-cutoff", "0")
    rows = find(data["rows"], variant="AMINet")
    assert len(rows) == 2
    (patch2,) = [r for r in rows if r["config_args"] == {"patch_size": 2}]
    assert patch2["n"] == 1 and patch2["metrics"]["image_AUROC"]["mean"] == 0.78  # the newer file's value
    assert patch2["files"] == ["rerun.json"] and patch2["superseded_files"] == ["first.json"]


def test_a_seed_rerun_on_another_cpu_model_is_its_own_run(combined: ModuleType, tmp_path: Path) -> None:
    """Same seed, two CPU models: both count (CPU training differs across them); same CPU again: replaced."""
    unnamed = write(tmp_path, "a", [mt("NAFRAD", 0.78, 0.60, 0.7)])  # written before results recorded the CPU
    xeon = write(tmp_path, "b", [mt("NAFRAD", 0.70, 0.62, 0.6)], machine={"cpu": "Xeon"})
    xeon_again = write(tmp_path, "c", [mt("NAFRAD", 0.72, 0.64, 0.6)], machine={"cpu": "Xeon"})
    for when, path in enumerate((unnamed, xeon, xeon_again), start=1):
        os.utime(path, (when * 1_000, when * 1_000))
    (row,) = find(run(combined, tmp_path, "--protocol-cutoff", "0")["rows"], variant="NAFRAD")
    assert row["n"] == 2 and row["seeds"] == [0, 0]
    assert row["files"] == ["a.json", "c.json"] and row["superseded_files"] == ["b.json"]
    assert row["metrics"]["image_AUROC"]["mean"] == pytest.approx((0.78 + 0.72) / 2)


def git(folder: Path, *args: str, when: int | None = None) -> None:
    env = dict(os.environ)
    if when is not None:
        env |= {"GIT_AUTHOR_DATE": f"@{when} +0000", "GIT_COMMITTER_DATE": f"@{when} +0000"}
    identity = ["-c", "user.name=t", "-c", "user.email=t@example.com", "-c", "commit.gpgsign=false"]
    subprocess.run(["git", *identity, *args], cwd=folder, env=env, check=True, capture_output=True)


def test_rows_older_than_the_protocol_commit_are_flagged_old(combined: ModuleType, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    results = repo / "benchmarks" / "results"
    results.mkdir(parents=True)
    git(repo, "init", "-q")
    write(results, "before", [mt("Padim", 0.912, 0.779, 0.635, steps=96)])
    git(repo, "add", ".")
    git(repo, "commit", "-q", "-m", "padim seed 0", when=1_700_000_000)
    (repo / "harness.py").write_text("# resize\n")
    git(repo, "add", "harness.py")
    msg = "harness: anomalib's peers get our non-antialiased resize (one protocol)"
    git(repo, "commit", "-q", "-m", msg, when=1_700_001_000)
    write(results, "after", [mt("Padim", 0.850, 0.770, 0.600, steps=96)], seed=1)
    git(repo, "add", ".")
    git(repo, "commit", "-q", "-m", "padim seed 1", when=1_700_002_000)
    untracked = write(results, "untracked", [mt("Padim", 0.870, 0.780, 0.610, steps=96)], seed=2)
    os.utime(untracked, (1_700_003_000, 1_700_003_000))  # written after the change, not committed yet
    slow = write(results, "slow", [mt("Padim", 0.9, 0.7, 0.6, steps=96, train_s=1_500.0, test_s=600.0)], seed=4)
    os.utime(slow, (1_700_002_000, 1_700_002_000))  # written 1000 s after the change, after 2100 s of runs
    stale = write(results, "stale", [mt("Padim", 0.930, 0.780, 0.610, steps=96)], seed=3)
    os.utime(stale, (1_699_000_000, 1_699_000_000))  # an untracked file written before it
    # a committed file's own mtime is ignored: the commit date counts (a fresh clone's mtimes are all "now")
    os.utime(results / "before.json", (1_800_000_000, 1_800_000_000))

    data = run(combined, results)
    assert data["protocol_commit"]["time"] == 1_700_001_000
    by_protocol = {r["protocol"]: r for r in find(data["rows"], variant="Padim")}
    assert set(by_protocol) == {"old", "current", "uncertain"}  # never averaged together
    assert by_protocol["uncertain"]["files"] == ["slow.json"]
    assert by_protocol["current"]["seeds"] == [1, 2] and by_protocol["current"]["files"] == [
        "after.json",
        "untracked.json",
    ]
    assert by_protocol["old"]["seeds"] == [0, 3]
    assert "| old |" in (results / "combined.md").read_text()


def test_without_git_or_cutoff_the_protocol_is_unknown(combined: ModuleType, tmp_path: Path) -> None:
    write(tmp_path, "x", [mt("Padim", 0.9, 0.8, 0.6, steps=96)])
    data = run(combined, tmp_path)
    assert data["protocol_commit"] is None and data["rows"][0]["protocol"] == "unknown"
    assert "was not found" in (tmp_path / "combined.md").read_text()


def test_withdrawn_rows_are_listed_apart_and_never_averaged(combined: ModuleType, tmp_path: Path) -> None:
    # a file whose AGPNet row was measured under the fixed cosine-loss / L2-map bug, with a valid Padim row beside it
    write(tmp_path, "mt_lite0_128_300steps", [mt("Padim", 0.9, 0.78, 0.63, steps=96), mt("AGPNet", 0.725, 0.65, 0.39)])
    write(tmp_path, "agpnet_new", [mt("AGPNet", 0.75, 0.70, 0.50)])
    data = run(combined, tmp_path, "--protocol-cutoff", "0")
    agpnet = find(data["rows"], variant="AGPNet")
    assert len(agpnet) == 1 and agpnet[0]["files"] == ["agpnet_new.json"]
    assert agpnet[0]["metrics"]["image_AUROC"]["mean"] == pytest.approx(0.75)
    assert len(find(data["rows"], variant="Padim")) == 1  # only the named model of that file is withdrawn
    assert [(w["file"], w["model"]) for w in data["withdrawn"]] == [("mt_lite0_128_300steps.json", "AGPNet")]
    text = (tmp_path / "combined.md").read_text()
    assert "Withdrawn" in text and "cosine loss" in text and "0.725" in text
