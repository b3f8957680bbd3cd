"""One study runner for ablations and sweeps, driven by a small YAML study file (``benchmarks/studies/*.yaml``).

A study names one model, its base arguments and its variants (argument overrides), the dataset and its options,
backbone, image size, budget, seeds, and a mode:

* ``train``: every variant is trained and tested in its own ``benchmarks/harness.py`` subprocess (the harness's
  datamodule, model builder, Engine, metrics and throughput pass), one row per variant, plus optional ``peers``
  (harness models trained as ``harness.py --models <peer>`` trains them);
* ``rescore``: every variant is trained once (one subprocess per variant and seed, the harness's datamodule, model
  builder and Engine), then evaluated under each inference-time override of ``rescore`` on the same weights. An
  override sets attributes of the torch model (``adaptive_mask_at_inference: false``) or calls one of its methods
  with keyword arguments (``set_scoring: {branch: local}``); ``evaluate: engine`` validates (the post-processor
  re-fits its statistics to this override's scores) and tests through the Engine with the harness's metrics,
  ``evaluate: raw`` computes the same metrics on the torch model's raw outputs (no post-processor).

Results go to ``benchmarks/results/<name>.json`` / ``.md`` through ``harness.write_results`` (one file per seed when
``name`` holds ``{seed}``, else one file for all seeds), with the exact command and machine, and the table is
printed. Every recorded ablation has its study file, so each recorded table is re-run by one command::

    python benchmarks/study.py benchmarks/studies/grnr_mt_lite0_128_seed0.yaml
    python benchmarks/study.py benchmarks/studies/glcf_mt_lite0_128_300steps.yaml --seeds 0 --threads 1
    python benchmarks/study.py benchmarks/studies/dadf_mt_lite0_128_300steps_ablation_seed1.yaml --dry-run

Study file fields (defaults in brackets): ``model``; ``mode`` (train | rescore); ``dataset`` (a name, or a mapping
``{name, cell_type, data_root}``; names: ``magnetic_tile``, ``elpv``, ``folder``, ``logical`` = the generated set of
``glcf_logical.py``, written under the work dir); ``backbone`` [tf_efficientnet_lite0]; ``image_size``;
``batch_size`` [8]; ``max_steps`` [-1], ``max_epochs``, ``max_time``; ``seeds`` [[0]]; ``workers`` [1];
``threads`` [0 = torch's default]; ``base_args`` [{}]; ``variants`` (name -> argument overrides) [{default: {}}];
``variant_budget`` (name -> ``max_steps``/``max_epochs``/``max_time``) [{}]; ``rescore`` (name -> inference
override; rescore mode only); ``evaluate`` [engine]; ``engine`` (extra Engine arguments, e.g.
``check_val_every_n_epoch``) [{}]; ``record`` (lightning-module attributes whose dict is copied into each row, e.g.
``bank_stats``) [[]]; ``peers`` (harness models, name -> init args) [{}]; ``name`` (result name, may hold
``{seed}``); ``label`` (row label pattern with ``{model}``, ``{variant}``, ``{override}``, ``{seed}``);
``work_dir`` [/tmp/anomalib_recon_study/<file stem>]; ``note`` (text appended to the markdown).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import re
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import harness  # noqa: E402

ROOT = BENCH.parent
STUDIES = BENCH / "studies"
MODES = ("train", "rescore")
EVALUATIONS = ("engine", "raw")
DATASETS = ("magnetic_tile", "elpv", "folder", "logical")
BUDGET_KEYS = ("max_steps", "max_epochs", "max_time")
DEFAULT_LABELS = {"train": "{model} ({variant})", "rescore": "{model} ({variant}, {override})"}
FIELDS = {
    "model",
    "mode",
    "dataset",
    "backbone",
    "image_size",
    "batch_size",
    *BUDGET_KEYS,
    "seeds",
    "workers",
    "threads",
    "base_args",
    "variants",
    "variant_budget",
    "rescore",
    "evaluate",
    "engine",
    "record",
    "peers",
    "name",
    "label",
    "work_dir",
    "note",
}


class StudyError(ValueError):
    """A study file that cannot describe a run (unknown field, missing value, clashing row labels)."""


@dataclass
class Job:
    """One subprocess: a variant at a seed (train: one row; rescore: one row per override), or a peer."""

    seed: int
    variant: str
    model: str
    init_args: dict
    budget: dict
    work_dir: str
    labels: list[str]
    overrides: list[str] = field(default_factory=list)
    peer: bool = False


@dataclass
class ResultFile:
    """The jobs whose rows go into one results file."""

    name: str
    seeds: list[int]
    jobs: list[Job]


# ------------------------------------------------------------------------------------------------ study files
def load_study(path: str | Path) -> dict:
    """A study file, checked, with its defaults filled in (``path`` and ``stem`` added)."""
    path = Path(path)
    raw = yaml.safe_load(path.read_text())
    if not isinstance(raw, dict):
        msg = f"{path}: a study file is a YAML mapping."
        raise StudyError(msg)
    return normalise(raw, path)


def normalise(raw: dict, path: Path | None = None) -> dict:
    """Check a study mapping and fill in its defaults."""
    where = f"{path}: " if path else ""
    unknown = sorted(set(raw) - FIELDS)
    if unknown:
        msg = f"{where}unknown field(s) {unknown}; known: {sorted(FIELDS)}."
        raise StudyError(msg)
    for key in ("model", "mode", "dataset", "image_size", "name"):
        if raw.get(key) in (None, ""):
            msg = f"{where}missing field {key!r}."
            raise StudyError(msg)
    study = {
        "backbone": "tf_efficientnet_lite0",
        "batch_size": 8,
        "max_steps": -1,
        "max_epochs": None,
        "max_time": None,
        "seeds": [0],
        "workers": 1,
        "threads": 0,
        "base_args": {},
        "variants": {"default": {}},
        "variant_budget": {},
        "rescore": {},
        "evaluate": "engine",
        "engine": {},
        "record": [],
        "peers": {},
        "note": "",
    } | raw
    stem = path.stem if path else str(raw["name"]).replace("{seed}", "").strip("_")
    study.setdefault("work_dir", f"/tmp/anomalib_recon_study/{stem}")
    study.setdefault("label", DEFAULT_LABELS.get(study["mode"], ""))
    study["path"], study["stem"] = (str(path) if path else None), stem
    dataset = study["dataset"]
    dataset = {"name": dataset} if isinstance(dataset, str) else dict(dataset)
    unknown = sorted(set(dataset) - {"name", "cell_type", "data_root"})
    if unknown or dataset.get("name") not in DATASETS:
        msg = f"{where}dataset must be one of {DATASETS} or a mapping {{name, cell_type, data_root}}, got {dataset}."
        raise StudyError(msg)
    study["dataset"] = {"cell_type": "mono" if dataset["name"] == "elpv" else None, "data_root": None} | dataset
    if study["mode"] not in MODES:
        msg = f"{where}mode must be one of {MODES}, got {study['mode']!r}."
        raise StudyError(msg)
    if study["evaluate"] not in EVALUATIONS:
        msg = f"{where}evaluate must be one of {EVALUATIONS}, got {study['evaluate']!r}."
        raise StudyError(msg)
    if isinstance(study["seeds"], int):
        study["seeds"] = [study["seeds"]]
    if isinstance(study["peers"], list):
        study["peers"] = {peer: {} for peer in study["peers"]}
    for key in ("base_args", "variants", "variant_budget", "rescore", "engine", "peers"):
        if not isinstance(study[key], dict):
            msg = f"{where}{key} must be a mapping, got {study[key]!r}."
            raise StudyError(msg)
    for key in ("variants", "rescore", "peers"):
        for name, value in study[key].items():
            if not isinstance(value or {}, dict):
                msg = f"{where}{key}.{name} must be a mapping of arguments, got {value!r}."
                raise StudyError(msg)
        study[key] = {str(name): dict(value or {}) for name, value in study[key].items()}
    if study["mode"] == "rescore" and not study["rescore"]:
        msg = f"{where}mode rescore needs a non-empty 'rescore' mapping (name -> inference-time override)."
        raise StudyError(msg)
    if study["mode"] == "train" and study["rescore"]:
        msg = f"{where}'rescore' overrides need mode: rescore (mode train trains and tests each variant once)."
        raise StudyError(msg)
    for key, fields in (("label", {"model", "variant", "override", "seed"}), ("name", {"seed"})):
        try:
            study[key].format(**dict.fromkeys(fields, 0))
        except (KeyError, IndexError, ValueError) as err:
            msg = f"{where}{key} {study[key]!r} may only hold {sorted(fields)} in braces ({err!r})."
            raise StudyError(msg) from err
    for variant, budget in study["variant_budget"].items():
        if variant not in study["variants"] or not set(budget) <= set(BUDGET_KEYS):
            msg = f"{where}variant_budget.{variant} must name a variant and only {BUDGET_KEYS}, got {budget}."
            raise StudyError(msg)
    return study


# ------------------------------------------------------------------------------------------------ planning
def _select(available: dict, chosen: list[str] | None, what: str) -> list[str]:
    if not chosen:
        return list(available)
    missing = [c for c in chosen if c not in available]
    if missing:
        msg = f"unknown {what} {missing}; the study has {list(available)}."
        raise StudyError(msg)
    return [c for c in available if c in chosen]  # the study's order


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", text).strip("_") or "default"


def label_of(study: dict, variant: str, seed: int, override: str = "") -> str:
    """A row's label from the study's ``label`` pattern."""
    return study["label"].format(model=study["model"], variant=variant, override=override, seed=seed)


def plan(
    study: dict,
    seeds: list[int] | None = None,
    variants: list[str] | None = None,
    overrides: list[str] | None = None,
) -> list[ResultFile]:
    """The results files of a study and the jobs of each (selected seeds, variants and overrides, study order)."""
    seeds = [int(s) for s in (seeds if seeds else study["seeds"])]
    chosen = _select(study["variants"], variants, "variant(s)")
    chosen_overrides = _select(study["rescore"], overrides, "override(s)") if study["mode"] == "rescore" else []
    per_seed = "{seed}" in study["name"]
    groups = [[s] for s in seeds] if per_seed else [seeds]
    files = []
    for group in groups:
        jobs = []
        for seed in group:
            base = {k: study[k] for k in BUDGET_KEYS}
            for peer, init in study["peers"].items():
                work = f"{study['work_dir']}/seed{seed}/peer_{_slug(peer)}"
                jobs.append(Job(seed, peer, peer, init, base, work, [peer], peer=True))
            for variant in chosen:
                init = study["base_args"] | study["variants"][variant]
                budget = base | study["variant_budget"].get(variant, {})
                work = f"{study['work_dir']}/seed{seed}/{_slug(variant)}"
                if study["mode"] == "train":
                    labels = [label_of(study, variant, seed)]
                else:
                    labels = [label_of(study, variant, seed, o) for o in chosen_overrides]
                jobs.append(Job(seed, variant, study["model"], init, budget, work, labels, chosen_overrides))
        labels = [label for job in jobs for label in job.labels]
        if len(set(labels)) != len(labels):
            msg = (
                f"row labels repeat in one results file ({labels}): put {{seed}} into 'name' (one file per seed) or "
                "'label', and {override}/{variant} into 'label' where there are several."
            )
            raise StudyError(msg)
        files.append(ResultFile(study["name"].format(seed=group[0]) if per_seed else study["name"], group, jobs))
    return files


def data_root(study: dict) -> str | None:
    """The dataset folder the harness reads (``logical``: where the generated set is written)."""
    dataset = study["dataset"]
    if dataset["name"] == "logical":
        return dataset["data_root"] or f"{study['work_dir']}/logical_{study['image_size']}"
    return dataset["data_root"]


def harness_argv(study: dict, job: Job) -> list[str]:
    """The harness arguments of one job (``harness.py <these> --single <model>`` runs it)."""
    dataset = study["dataset"]
    shared = argparse.Namespace(
        dataset="folder" if dataset["name"] == "logical" else dataset["name"],
        cell_type=dataset["cell_type"],
        data_root=data_root(study),
        backbone=study["backbone"],
        image_size=study["image_size"],
        batch_size=study["batch_size"],
        workers=study["workers"],
        threads=study["threads"],
        seed=job.seed,
        **job.budget,
    )
    return harness.variant_argv(shared, job.model, job.init_args, job.work_dir)


def prepare_data(study: dict) -> None:
    """Write the generated ``logical`` set once; check a ``folder`` root before any subprocess starts."""
    name = study["dataset"]["name"]
    if name == "logical":
        root = Path(data_root(study))
        if not (root / "train" / "good").is_dir():
            import glcf_logical

            glcf_logical.write_logical_dataset(root, size=study["image_size"])
    elif name == "folder":
        harness.check_folder_root(argparse.Namespace(data_root=study["dataset"]["data_root"]))


# ------------------------------------------------------------------------------------------------ rescoring
def apply_override(module: Any, override: dict, originals: dict) -> None:
    """Apply one inference-time override to the torch model: a key naming a method calls it with the value's
    keyword arguments (``set_scoring: {branch: local}``); any other key must be an existing attribute and is set
    (a list becomes a tuple where the attribute is one). ``originals`` collects the values set attributes had."""
    for key, value in override.items():
        current = getattr(module, key, None)
        if callable(current) and not isinstance(current, type):
            if not isinstance(value, dict):
                msg = f"override {key!r} calls {type(module).__name__}.{key}: its value must be keyword arguments."
                raise StudyError(msg)
            current(**value)
        elif hasattr(module, key):
            originals.setdefault(key, current)
            setattr(module, key, tuple(value) if isinstance(current, tuple) and isinstance(value, list) else value)
        else:
            msg = f"{type(module).__name__} has no attribute or method {key!r} to override at inference."
            raise StudyError(msg)


def restore(module: Any, originals: dict) -> None:
    """Put back the attributes earlier overrides set (each override starts from the trained model's settings)."""
    for key, value in originals.items():
        setattr(module, key, value)


def weights_digest(module: Any) -> str:
    """A short hash of the module's parameters: rows that share it scored the same weights."""
    digest = hashlib.sha1()
    for name, param in sorted(module.named_parameters()):
        digest.update(name.encode())
        digest.update(param.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:12]


def raw_metrics(model: Any, datamodule: Any) -> dict[str, float]:
    """The harness's test metrics on the torch model's raw outputs over the test split (no post-processor)."""
    import torch

    metrics = [copy.deepcopy(metric) for metric in model.evaluator.test_metrics]
    for metric in metrics:
        metric.reset()
    net = model.model.eval()
    device = next(net.parameters()).device
    with torch.no_grad():
        for batch in datamodule.test_dataloader():
            if batch.gt_mask is None:
                images, masks = model.pre_processor.transform(batch.image), None
            else:
                images, masks = model.pre_processor.transform(batch.image, batch.gt_mask)
            out = net(images.to(device))
            scored = batch.update(
                image=images, gt_mask=masks, pred_score=out.pred_score.cpu(), anomaly_map=out.anomaly_map.cpu()
            )
            for metric in metrics:
                metric.update(scored)
    values = {metric.name: metric.compute() for metric in metrics}
    return {name: float(value) for name, value in values.items() if value is not None}


def rescore_rows(study: dict, job: Job) -> list[dict]:
    """Train one variant once, then one row per inference override, each evaluated on the same weights."""
    hargs = harness.parse([*harness_argv(study, job), "--single", study["model"]])
    harness.setup_run(hargs)
    datamodule = harness.build_datamodule(hargs)
    model = harness.build_model(study["model"], hargs)
    engine = harness.make_engine(hargs, study["model"], **({"enable_progress_bar": False} | study["engine"]))
    start = time.perf_counter()
    engine.fit(model=model, datamodule=datamodule)
    train_s = round(time.perf_counter() - start, 1)
    steps = int(engine.trainer.global_step)
    params_m = round(sum(p.numel() for p in model.model.parameters()) / 1e6, 3)
    rows, originals = [], {}
    for override, label in zip(job.overrides, job.labels, strict=True):
        restore(model.model, originals)
        apply_override(model.model, study["rescore"][override], originals)
        if study["evaluate"] == "engine":
            engine.validate(model=model, datamodule=datamodule)  # this override's own post-processor statistics
            start = time.perf_counter()
            results = engine.test(model=model, datamodule=datamodule)[0]
            metrics = {m: float(results[m]) for m in harness.METRICS if m in results}
        else:
            start = time.perf_counter()
            metrics = raw_metrics(model, datamodule)
        row = {"model": label, "seed": job.seed, **{m: metrics[m] for m in harness.METRICS if m in metrics}}
        row |= {"train_s": train_s, "test_s": round(time.perf_counter() - start, 1), "steps": steps}
        row |= {"params_m": params_m, "weights": weights_digest(model.model)}
        for attr in study["record"]:
            value = getattr(model, attr, None)
            row |= value if isinstance(value, dict) else {attr: value}
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------------------------ running
def job_command(study: dict, job: Job, forwarded: list[str]) -> list[str]:
    """The subprocess of one job: ``harness.py <args> --single <model>`` (train mode, peers), or this script with
    ``--single <variant> --single-seed <seed>`` (rescore: one training, then every override)."""
    if job.peer or study["mode"] == "train":
        return [sys.executable, str(BENCH / "harness.py"), *harness_argv(study, job), "--single", job.model]
    here = str(Path(__file__).resolve())
    return [sys.executable, here, study["path"], *forwarded, "--single", job.variant, "--single-seed", str(job.seed)]


def header_of(study: dict, result: ResultFile, command: str) -> dict:
    """The results file's header: the harness's fields plus the study (arguments per row label, overrides)."""
    dataset = study["dataset"]
    name = dataset["name"] + (f" ({dataset['cell_type']})" if dataset["name"] == "elpv" else "")
    budgets = {job.variant: job.budget for job in result.jobs if not job.peer}
    model_args = {label: job.init_args for job in result.jobs for label in job.labels}
    header = {
        "name": result.name,
        "command": command,
        "machine": harness.machine_info(),
        "dataset": name,
        "backbone": study["backbone"],
        "image_size": study["image_size"],
        **{k: study[k] for k in BUDGET_KEYS},
        "seed": result.seeds[0] if len(result.seeds) == 1 else result.seeds,
        "batch_size": study["batch_size"],
        "threads": study["threads"],
        "mode": study["mode"],
        "model_args": model_args,
    }
    if any(budget != {k: study[k] for k in BUDGET_KEYS} for budget in budgets.values()):
        header["budgets"] = budgets
    if study["mode"] == "rescore":
        header["evaluate"] = study["evaluate"]
        header["rescore"] = {o: study["rescore"][o] for o in next(j for j in result.jobs if not j.peer).overrides}
    file = _relative([study["path"]])[0] if study["path"] else None
    header["study"] = {k: v for k, v in study.items() if k not in {"path", "stem"}} | {"file": file}
    return header


def note_of(study: dict, header: dict) -> str:
    """Text under the table: how the rows were produced, the arguments, the study's own note."""
    lines = ["", f"Study `{header['study']['file']}`, mode `{study['mode']}`."]
    if study["mode"] == "rescore":
        how = (
            "validated (post-processor statistics re-fitted to its scores) and tested through the Engine"
            if study["evaluate"] == "engine"
            else "scored on the torch model's raw outputs (no post-processor)"
        )
        lines.append(
            "One training per variant and seed; each override is applied to the same weights (the rows' `weights` "
            f"digest in the JSON), {how}. Inference overrides: `{json.dumps(header['rescore'])}`."
        )
    if "budgets" in header:
        lines.append(f"Budget per variant: `{json.dumps(header['budgets'])}`.")
    lines.append(f"{study['model']} init args per row: `{json.dumps(header['model_args'])}`")
    if study["note"]:
        lines += ["", study["note"].strip()]
    return "\n".join(lines) + "\n"


def run_file(study: dict, result: ResultFile, opts: argparse.Namespace, command: str, forwarded: list[str]) -> str:
    """Run one results file's jobs one after another (each in a subprocess), writing after each; its markdown."""
    header = header_of(study, result, command)
    note = note_of(study, header)
    results = Path(opts.results_dir)
    rows: list[dict] = []
    table = ""
    for job in result.jobs:
        print(f"=== {result.name}: {', '.join(job.labels)} ===", flush=True)
        out = harness.run_child(job_command(study, job, forwarded), job.labels[0])
        if "rows" in out:  # a rescore subprocess: one row per override
            rows += out["rows"]
        else:  # a harness row (named after the model), or the error row of a failed subprocess
            rows.append(out | {"model": job.labels[0], "seed": job.seed})
        table = harness.write_results(results, header, rows, note)  # after every job: a stopped run keeps its rows
    return table


def commands(study: dict, files: list[ResultFile], forwarded: list[str]) -> list[str]:
    """The subprocess command of every job (what ``--dry-run`` prints)."""
    lines = []
    for result in files:
        lines.append(f"# {result.name}")
        for job in result.jobs:
            argv = ["python", *_relative(job_command(study, job, forwarded)[1:])]
            lines.append(shlex.join(argv) + f"   # {', '.join(job.labels)}")
            if argv[1] != "benchmarks/harness.py":  # a rescore job: the harness settings it trains with
                lines.append("#   trains with: " + shlex.join(harness_argv(study, job)))
    return lines


def apply_options(study: dict, opts: argparse.Namespace) -> dict:
    """The study with the command line's overrides of machine-side settings (threads, workers, paths)."""
    study = copy.deepcopy(study)
    for key in ("threads", "workers", "work_dir"):
        if getattr(opts, key) is not None:
            study[key] = getattr(opts, key)
    if opts.data_root is not None:
        study["dataset"]["data_root"] = opts.data_root
    return study


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line arguments."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("study", help="study file (YAML), e.g. benchmarks/studies/grnr_mt_lite0_128_seed0.yaml")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="run only these seeds (default: the study's)")
    p.add_argument("--variants", nargs="+", default=None, help="run only these variants")
    p.add_argument("--overrides", nargs="+", default=None, help="rescore: evaluate only these overrides")
    p.add_argument("--dry-run", action="store_true", help="print the subprocess commands, run nothing")
    p.add_argument("--threads", type=int, default=None, help="torch threads per subprocess (default: the study's)")
    p.add_argument("--workers", type=int, default=None, help="dataloader workers (default: the study's)")
    p.add_argument("--data-root", default=None, help="dataset folder (default: the study's / the harness's)")
    p.add_argument("--work-dir", default=None, help="checkpoints and logs (default: the study's)")
    p.add_argument("--results-dir", default=str(harness.RESULTS), help="where the JSON and markdown go")
    p.add_argument("--single", default=None, help=argparse.SUPPRESS)
    p.add_argument("--single-seed", type=int, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run (or print) a study: every results file, one subprocess per job; print each table."""
    raw = list(sys.argv[1:] if argv is None else argv)
    opts = parse(raw)
    study = apply_options(load_study(opts.study), opts)
    forwarded = forwarded_options(opts)
    if opts.single is not None:
        (result,) = plan(study, [opts.single_seed], [opts.single], opts.overrides)
        (job,) = [j for j in result.jobs if not j.peer]
        print("RESULT " + json.dumps({"model": study["model"], "rows": rescore_rows(study, job)}), flush=True)
        return 0
    files = plan(study, opts.seeds, opts.variants, opts.overrides)
    if opts.dry_run:
        print("\n".join(commands(study, files, forwarded)))
        return 0
    prepare_data(study)
    command = "python benchmarks/study.py " + shlex.join(_relative(raw))
    for result in files:
        print(run_file(study, result, opts, command, forwarded))
    return 0


def forwarded_options(opts: argparse.Namespace) -> list[str]:
    """The command-line options a rescore subprocess needs to plan the same job (machine-side settings, overrides)."""
    argv = []
    for flag in ("threads", "workers", "data_root", "work_dir"):
        if getattr(opts, flag) is not None:
            argv += [f"--{flag.replace('_', '-')}", str(getattr(opts, flag))]
    return argv + (["--overrides", *opts.overrides] if opts.overrides else [])


def _relative(argv: list[str]) -> list[str]:
    """Arguments with the study and script paths relative to the repository (as results files record commands)."""
    out = []
    for arg in argv:
        path = Path(arg)
        if arg.endswith((".yaml", ".yml", ".py")) and path.resolve().is_relative_to(ROOT):
            arg = str(path.resolve().relative_to(ROOT))
        out.append(arg)
    return out


if __name__ == "__main__":
    sys.exit(main())
