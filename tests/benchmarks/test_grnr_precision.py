"""benchmarks/grnr_precision.py on tiny settings: the synthetic and time tables, without the dataset."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.benchmarks.conftest import load_script


@pytest.mark.slow
def test_precision_script_reports_before_after_and_time(tmp_path: Path) -> None:
    precision = load_script("grnr_precision")
    argv = ["--channels", "32", "--positions", "16", "--dataset-root", "", "--image-size", "64"]
    argv += ["--num-global-priors", "8", "--repeats", "1", "--name", "tiny", "--results-dir", str(tmp_path)]
    assert precision.main(argv) == 0
    record = json.loads((tmp_path / "grnr_tiny.json").read_text())
    synthetic = [r for r in record["rows"] if r["table"] == "synthetic"]
    assert {(r["kind"], r["lam"]) for r in synthetic} == {(k, lam) for k in precision.KINDS for lam in (0.0, 5.0)}
    for row in synthetic:
        assert row["after_nonfinite"] == 0 and row["after_max_rel_err"] < 1e-4, row
    # the raw-Gram float32 solve of before is far off on flat neighbourhoods, the fix is not
    flat = next(r for r in synthetic if r["kind"] == "flat" and r["lam"] == 0.0)
    assert flat["before_max_rel_err"] > 100 * flat["after_max_rel_err"]
    timing = [r for r in record["rows"] if r["table"] == "time"]
    assert [r["solve"] for r in timing] == ["before", "after"]
    assert all(r["forward_ms"] > 0 and r["regressions_ms"] > 0 for r in timing)
    markdown = (tmp_path / "grnr_tiny.md").read_text()
    assert "Command: `python benchmarks/grnr_precision.py --channels 32" in markdown
    assert "## Synthetic near-flat neighbourhoods" in markdown and "## Time cost" in markdown


def test_brute_force_is_the_ridge_least_squares_problem() -> None:
    import torch

    precision = load_script("grnr_precision")
    gen = torch.Generator().manual_seed(0)
    support, query = torch.rand(1, 5, 8, 12, generator=gen), torch.rand(1, 5, 12, generator=gen)
    priors = torch.rand(1, 4, 12, generator=gen)
    got = precision.brute_force_f64(support, query, priors, lam=2.0, eps=1e-3)
    s, q = support.double()[0], query.double()[0]
    t = (q + 2.0 * priors.double()[0].sum(0)) / (1 + 2.0 * 4)
    ridge = 1e-3 * (s * s).sum((-1, -2)) / 8 + torch.finfo(torch.float32).tiny
    w = torch.linalg.solve(
        s @ s.transpose(-1, -2) + ridge[:, None, None] * torch.eye(8, dtype=torch.float64), s @ t[..., None]
    )
    expected = (q - (w.transpose(-1, -2) @ s).squeeze(-2)).norm(dim=-1)
    torch.testing.assert_close(got[0], expected)
    # the frozen "before" solve is the same problem (in float64 it agrees with the brute force)
    torch.testing.assert_close(
        precision.solve_before(support.double(), query.double(), priors.double(), 2.0, 1e-3)[0], expected
    )
