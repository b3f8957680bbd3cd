"""One combined table of every model on Magnetic Tile and ELPV, regenerated from ``benchmarks/results/*.json``.

Reads every results file whose header names the dataset ``magnetic_tile`` or ``elpv`` (the harness's
``write_results`` format, which the sweep, ablation and learning-curve scripts share: a header plus ``rows``), and
writes one row per (model or variant, dataset, backbone, image size, budget, protocol) with image AUROC, pixel
AUROC and pixel AUPRO (Magnetic Tile only): the mean over seeds ± the sample standard deviation, the min–max range,
the number of seeds ``n`` and the files the runs came from. Padim, Patchcore, Stfpm and ReverseDistillation are
marked ``peer``, MeanFeature ``baseline``.

Budgets: ``N steps`` for a curve's snapshot (``<model> @ N steps``), ``one pass`` for the memory-bank models (Padim,
Patchcore, MeanFeature stop after one epoch whatever the step cap), ``training-free`` for a row with 0 steps, else
the header's ``max_steps`` / ``max_epochs`` / ``max_time``; the batch size is part of the budget.

Protocol: issue #13 put every model on one pre-processing (anomalib's peers got our non-antialiased resize in the
commit "harness: anomalib's peers get our non-antialiased resize"). A file written before that commit (the earlier of
its last commit's time and its mtime; untracked or modified files: its mtime) is ``old``; one written after it but
started before it (write time minus its rows' ``train_s`` + ``test_s``) is ``uncertain``; rows of different
protocols are never averaged together. One seed of one row appearing in several files (a re-run) counts once: the
newest file's value, unless the runs were on different CPU models (the results' ``machine.cpu``; files written before
it was recorded count as one unnamed CPU): CPU training is not bit-reproducible across CPU models, so such a run is
another sample and counts as its own run.

Example::

    python benchmarks/combined_table.py            # prints markdown, writes results/combined.md and .json
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import re
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
PROTOCOL_COMMIT_GREP = "non-antialiased resize"
DATASETS = {"magnetic_tile": "Magnetic Tile", "elpv": "ELPV"}
METRICS = {"magnetic_tile": ["image_AUROC", "pixel_AUROC", "pixel_AUPRO"], "elpv": ["image_AUROC"]}
PEERS = {"Padim", "Patchcore", "Stfpm", "ReverseDistillation"}
BASELINES = {"MeanFeature"}
ONE_PASS = {"Padim", "Patchcore", "MeanFeature"}
ROLE_ORDER = {"baseline": 0, "peer": 1, "ours": 2}
OUTPUT_STEM = "combined"
_AGPNET_DISTANCE_BUG = "AGPNet trained with a cosine loss and scored with an L2 map (issue #13, fixed)"
# Results measured with a bug that has since been fixed: listed apart with the reason, never averaged or ranked.
# file -> (models of that file concerned, or None for every row; reason)
WITHDRAWN: dict[str, tuple[set[str] | None, str]] = {
    "agpnet_mt_lite0_128_curve.json": (
        None,
        _AGPNET_DISTANCE_BUG + "; its snapshots were tested with the final weights' post-processor statistics",
    ),
    "agpnet_mt_lite0_noise.json": (None, _AGPNET_DISTANCE_BUG + "; fixed image noise σ = 0.2"),
    "agpnet_mt_lite0_128_stride8_600steps.json": (None, _AGPNET_DISTANCE_BUG),
    "mt_lite0_128_300steps.json": ({"AGPNet"}, _AGPNET_DISTANCE_BUG),
    "elpv_mono_lite0_128_300steps.json": ({"AGPNet"}, _AGPNET_DISTANCE_BUG),
    "ami_net_mt_lite0_128_curve.json": (
        None,
        "learning_curve.py before issue #13's fix: snapshots tested with the final weights' post-processor statistics",
    ),
}


def withdrawn_reason(file: str, model: str) -> str | None:
    """Why a row of ``file`` is withdrawn, or ``None`` when it stands."""
    models, reason = WITHDRAWN.get(file, (set(), ""))
    return reason if models is None or model in models else None


def git(args: list[str], cwd: Path) -> str | None:
    """Output of one git command, or ``None`` outside a repository / on any git error."""
    try:
        proc = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=False, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


def protocol_cutoff(folder: Path) -> tuple[float, str] | None:
    """Commit time and short hash of the one-protocol commit, found by its message; ``None`` if not found."""
    out = git(["log", "--grep", PROTOCOL_COMMIT_GREP, "-1", "--format=%ct %h"], folder)
    if not out:
        return None
    stamp, commit = out.split()
    return float(stamp), commit


def file_time(path: Path) -> tuple[float, str]:
    """When a results file was written: the earlier of its last commit's time (committed and unmodified files) and
    its mtime (a fresh clone's mtimes are all "now"; in the working tree that ran it, the mtime is the write)."""
    mtime = path.stat().st_mtime
    committed = git(["log", "-1", "--format=%ct", "--", path.name], path.parent)
    if committed and git(["status", "--porcelain", "--", path.name], path.parent) == "":
        return (float(committed), "git") if float(committed) <= mtime else (mtime, "mtime")
    return mtime, "mtime"


def run_seconds(rows: list) -> float:
    """Training + test seconds of a file's rows: how long before its last write the run started, at least."""
    total = 0.0
    for row in rows:
        if isinstance(row, dict):
            total += sum(float(row[k]) for k in ("train_s", "test_s") if isinstance(row.get(k), int | float))
    return total


def protocol_of(written: float, seconds: float, cutoff: float | None) -> str:
    """``old`` (written before the change), ``uncertain`` (written after it, started before it), else ``current``."""
    if cutoff is None:
        return "unknown"
    if written < cutoff:
        return "old"
    return "uncertain" if written - seconds < cutoff else "current"


def dataset_of(header: dict) -> str | None:
    """``magnetic_tile`` or ``elpv`` from the header (``"elpv (mono)"`` counts as ``elpv``), else ``None``."""
    value = str(header.get("dataset") or "").strip().lower()
    key = value.split()[0] if value else ""
    return key if key in DATASETS else None


def cell_type(header: dict) -> str:
    """ELPV's cell type: ``elpv (poly)`` in the header, else ``--cell-type`` in its command, else ``mono``."""
    match = re.search(r"\((\w+)\)", str(header.get("dataset", "")))
    if match:
        return match.group(1)
    try:
        words = shlex.split(str(header.get("command", "")))
    except ValueError:
        words = str(header.get("command", "")).split()
    for flag, value in itertools.pairwise(words):
        if flag == "--cell-type":
            return value
    return "mono"


def split_label(label: str) -> tuple[str, int | None, int | None]:
    """``"GLCF (local, seed 1) @ 300 steps"`` -> ``("GLCF (local)", 1, 300)``: variant, seed, snapshot steps."""
    steps = None
    match = re.search(r"\s*@\s*(\d+)\s*steps?\b", label)
    if match:
        steps = int(match.group(1))
        label = label[: match.start()] + label[match.end() :]
    seed = None
    match = re.search(r"(,\s*)?\bseed\s*=?\s*(\d+)", label)
    if match:
        seed = int(match.group(2))
        label = label[: match.start()] + label[match.end() :]
    label = re.sub(r"\(\s*,\s*", "(", label)
    label = re.sub(r"\s*\(\s*\)", "", label)
    return " ".join(label.split()), seed, steps


def base_model(variant: str) -> str:
    """The model's class name: the label before any ``" ("`` or ``" @"``."""
    return re.split(r"\s*[(@]", variant, maxsplit=1)[0].strip()


def budget_of(header: dict, row: dict, model: str, snapshot: int | None) -> str:
    """A row's training budget (see the module docstring), including the batch size."""
    if snapshot is not None:  # a learning curve's snapshot: not the same run as a standalone one at that budget
        budget = f"{snapshot} steps (curve to {header.get('max_steps')})"
    elif model in ONE_PASS:
        budget = "one pass"
    elif row.get("steps") == 0:
        budget = "training-free"
    else:
        parts = []
        if isinstance(header.get("max_steps"), int) and header["max_steps"] > 0:
            parts.append(f"{header['max_steps']} steps")
        if header.get("max_epochs"):
            parts.append(f"{header['max_epochs']} epochs")
        if header.get("max_time"):
            parts.append(f"time {header['max_time']}")
        budget = " / ".join(parts) or "unbounded"
    batch = header.get("batch_size")
    return f"{budget}, batch {batch}" if batch and budget != "training-free" else budget


def command_model_args(header: dict) -> dict | None:
    """The ``--model-args`` JSON of the header's command, if any."""
    try:
        words = shlex.split(str(header.get("command", "")))
    except ValueError:
        return None
    for flag, value in itertools.pairwise(words):
        if flag == "--model-args":
            try:
                parsed = json.loads(value)
            except json.JSONDecodeError:
                return None
            return parsed if isinstance(parsed, dict) else None
    return None


def config_of(header: dict, label: str, variant: str, model: str) -> dict:
    """The init args a row's model ran with, as far as the file records them (``{}``: the script's defaults).

    Scripts record them differently: keyed by model (the harness's ``--model-args``), by variant label or its first
    word in parentheses (ablations), or one dict shared by every variant of the script's model.
    """
    inner = re.search(r"\(([^)]*)\)", variant)
    names = [label, variant, model]
    if inner:
        names += [inner.group(1), inner.group(1).split(",")[0].strip()]
    for source in (header.get("model_args"), command_model_args(header)):
        if not isinstance(source, dict) or not source:
            continue
        for name in names:
            if isinstance(source.get(name), dict):
                return {k: v for k, v in source[name].items() if k != "image_size"}
        if all(isinstance(v, dict) for v in source.values()):
            return {}  # keyed by other models or variants
        if model not in PEERS | BASELINES:
            return {k: v for k, v in source.items() if k != "image_size"}  # one dict for the script's model
    return {}


def config_id(config: dict) -> str:
    """A short stable name for a configuration (``default`` when empty)."""
    if not config:
        return "default"
    text = json.dumps(config, sort_keys=True)
    return "cfg-" + hashlib.sha1(text.encode()).hexdigest()[:6]


def seed_of(header: dict, row: dict, label_seed: int | None) -> int | None:
    """The run's seed: the row's own, the label's, or the header's when it names a single seed."""
    for value in (row.get("seed"), label_seed, header.get("seed")):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, list) and len(value) == 1 and isinstance(value[0], int):
            return value[0]
    return None


def collect(folder: Path, cutoff: float | None) -> tuple[list[dict], list[dict], list[dict]]:
    """Every result row of a Magnetic Tile / ELPV file as one run, the rows that hold an error, the withdrawn rows."""
    runs, errors, withdrawn = [], [], []
    for path in sorted(folder.glob("*.json")):
        if path.stem == OUTPUT_STEM:
            continue
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if not isinstance(data, dict) or not isinstance(data.get("rows"), list):
            continue
        dataset = dataset_of(data)
        if dataset is None:
            continue
        produced, clock = file_time(path)
        protocol = protocol_of(produced, run_seconds(data["rows"]), cutoff)
        for row in data["rows"]:
            if not isinstance(row, dict) or not isinstance(row.get("model"), str):
                continue  # e.g. per_class.py's rows, whose "model" is a score
            variant, label_seed, snapshot = split_label(str(row["model"]))
            model = base_model(variant)
            if row.get("error"):
                errors.append({"file": path.name, "model": row["model"], "error": str(row["error"])})
                continue
            metrics = {m: float(row[m]) for m in METRICS[dataset] if isinstance(row.get(m), int | float)}
            if not metrics:
                continue
            config = config_of(data, str(row["model"]), variant, model)
            reason = withdrawn_reason(path.name, model)
            if reason:
                withdrawn.append({"file": path.name, "model": row["model"], "reason": reason, "metrics": metrics})
                continue
            runs.append(
                {
                    "variant": variant,
                    "model": model,
                    "role": "peer" if model in PEERS else "baseline" if model in BASELINES else "ours",
                    "dataset": dataset,
                    "cell_type": cell_type(data) if dataset == "elpv" else None,
                    "backbone": data.get("backbone"),
                    "image_size": data.get("image_size"),
                    "budget": budget_of(data, row, model, snapshot),
                    "protocol": protocol,
                    "config": config_id(config),
                    "config_args": config,
                    "seed": seed_of(data, row, label_seed),
                    "cpu": (data.get("machine") or {}).get("cpu"),
                    "steps": row.get("steps"),
                    "metrics": metrics,
                    "file": path.name,
                    "time": produced,
                    "clock": clock,
                }
            )
    return runs, errors, withdrawn


GROUP_KEYS = ("dataset", "cell_type", "backbone", "image_size", "budget", "role", "variant", "config", "protocol")


def summarise(values: list[float]) -> dict:
    """Mean, sample standard deviation (0 for one value), min, max and n."""
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


def combine(runs: list[dict]) -> list[dict]:
    """One row per group: a seed re-run on the same CPU counts once (newest file wins), every metric summarised."""
    groups: dict[tuple, dict] = {}
    for run in sorted(runs, key=lambda r: r["time"]):  # oldest first: a newer run of a seed replaces it
        key = tuple(run[k] for k in GROUP_KEYS)
        group = groups.setdefault(key, {"by_seed": {}, "superseded": set()})
        seed = run["seed"] if run["seed"] is not None else f"?{len(group['by_seed'])}"
        seed_key = (seed, run["cpu"])
        if seed_key in group["by_seed"]:
            group["superseded"].add(group["by_seed"][seed_key]["file"])
        group["by_seed"][seed_key] = run
    rows = []
    for key, group in groups.items():
        members = list(group["by_seed"].values())
        metrics = sorted({m for r in members for m in r["metrics"]}, key=lambda m: METRICS["magnetic_tile"].index(m))
        row = dict(zip(GROUP_KEYS, key, strict=True))
        row["seeds"] = sorted((r["seed"] for r in members if r["seed"] is not None), key=int)
        row["n"] = len(members)
        row["steps"] = sorted({r["steps"] for r in members if isinstance(r["steps"], int)})
        row["config_args"] = members[0]["config_args"]
        row["files"] = sorted({r["file"] for r in members})
        row["superseded_files"] = sorted(group["superseded"] - set(row["files"]))
        row["metrics"] = {m: summarise([r["metrics"][m] for r in members if m in r["metrics"]]) for m in metrics}
        rows.append(row)
    rows.sort(
        key=lambda r: (
            list(DATASETS).index(r["dataset"]),
            str(r["cell_type"]),
            str(r["backbone"]),
            r["image_size"] or 0,
            ["current", "uncertain", "unknown", "old"].index(r["protocol"]),
            ROLE_ORDER[r["role"]],
            r["variant"],
            r["budget"],
        )
    )
    return rows


def cell(stats: dict | None) -> str:
    """``0.896 ± 0.034 (0.844–0.931)``; a single run is just its value."""
    if not stats:
        return "–"
    if stats["n"] == 1:
        return f"{stats['mean']:.3f}"
    return f"{stats['mean']:.3f} ± {stats['std']:.3f} ({stats['min']:.3f}–{stats['max']:.3f})"


def to_markdown(rows: list[dict], errors: list[dict], header: dict, withdrawn: list[dict] | None = None) -> str:
    """The combined tables, one per dataset, with how they were made."""
    cutoff = header["protocol_commit"]
    lines = [
        "# Combined results: all models on Magnetic Tile and ELPV",
        "",
        f"Command: `{header['command']}` (generated {header['generated']} from `benchmarks/results/*.json`).",
        "",
        "Each metric: mean over runs ± sample standard deviation (min–max); one run is shown as its value. `n` runs, "
        "`seeds` their seeds (a seed twice: the same seed on two CPU models, which CPU training does not reproduce "
        "bit for bit). Roles: `peer` = anomalib's built-in models, `baseline` = MeanFeature (per-position "
        "distance to the mean normal feature on the same backbone), `ours` = this package's models.",
        "",
        (
            f"Protocol: rows from files produced before commit {cutoff['commit']} "
            f'({cutoff["date"]}, "{PROTOCOL_COMMIT_GREP}": anomalib\'s peers switched from their antialiased resize '
            "to our non-antialiased one) are marked `old`: their peer numbers are not on the one pre-processing; "
            "`uncertain`: written after that commit but started before it (write time minus the rows' training and "
            "test seconds), so its first models may have run under the old harness."
            if cutoff
            else f'Protocol: the commit "{PROTOCOL_COMMIT_GREP}" was not found, so no row could be dated (`unknown`).'
        ),
    ]
    for dataset, title in DATASETS.items():
        chosen = [r for r in rows if r["dataset"] == dataset]
        if not chosen:
            continue
        metrics = METRICS[dataset]
        headers = [m.replace("_", " ") for m in metrics]
        cols = [
            "model / variant",
            "role",
            "config",
            "backbone",
            "px",
            "budget",
            *headers,
            "n",
            "seeds",
            "protocol",
            "files",
        ]
        lines += ["", f"## {title}", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        for r in chosen:
            name = r["variant"] + (f" ({r['cell_type']})" if r["cell_type"] and r["cell_type"] != "mono" else "")
            values = [cell(r["metrics"].get(m)) for m in metrics]
            seeds = ", ".join(str(s) for s in r["seeds"]) or "?"
            files = ", ".join(f"`{f}`" for f in r["files"])
            cells = [name, r["role"], r["config"], str(r["backbone"]), str(r["image_size"]), r["budget"], *values]
            cells += [str(r["n"]), seeds, r["protocol"], files]
            lines.append("| " + " | ".join(cells) + " |")
        if dataset == "elpv":
            lines += ["", "ELPV has image labels only: no pixel metrics."]
    configs = {r["config"]: r["config_args"] for r in rows if r["config_args"]}
    if configs:
        lines += ["", "Configurations (init args over the model's defaults, as the files record them):", ""]
        lines += [f"- `{name}`: `{json.dumps(args, sort_keys=True)}`" for name, args in sorted(configs.items())]
    superseded = [(r["variant"], f) for r in rows for f in r["superseded_files"]]
    if superseded:
        lines += ["", "Runs replaced by a newer run of the same seed on the same CPU model:", ""]
        lines += [f"- {variant}: `{f}`" for variant, f in superseded]
    if withdrawn:
        lines += [
            "",
            "Withdrawn: measured with a bug since fixed (kept in their files for the record, not in the tables):",
            "",
        ]
        for w in withdrawn:
            values = ", ".join(f"{m.replace('_', ' ')} {v:.3f}" for m, v in w["metrics"].items())
            lines.append(f"- `{w['file']}` {w['model']} ({values}): {w['reason']}")
    if errors:
        lines += ["", "Rows without a result:", ""]
        lines += [f"- `{e['file']}` {e['model']}: {e['error'][:200]}" for e in errors]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Read the results, print the markdown, write ``<out>.md`` and ``<out>.json``."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results-dir", default=str(RESULTS), help="folder of the *.json results")
    p.add_argument("--out", default=None, help="output stem (default <results-dir>/combined)")
    p.add_argument(
        "--protocol-cutoff",
        type=float,
        default=None,
        help="Unix time of the one-protocol change (default: the commit found by its message with git log --grep)",
    )
    args = p.parse_args(argv)
    folder = Path(args.results_dir)
    if not folder.is_dir():
        msg = f"--results-dir {folder} is not a folder."
        raise SystemExit(msg)
    found = protocol_cutoff(folder) if args.protocol_cutoff is None else (args.protocol_cutoff, "given")
    cutoff = found[0] if found else None
    runs, errors, withdrawn = collect(folder, cutoff)
    rows = combine(runs)
    command = "python benchmarks/combined_table.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    header = {
        "command": command.strip(),
        "generated": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "protocol_commit": {
            "commit": found[1],
            "time": found[0],
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(found[0])),
        }
        if found
        else None,
    }
    table = to_markdown(rows, errors, header, withdrawn)
    out = Path(args.out) if args.out else folder / OUTPUT_STEM
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(table)
    out.with_suffix(".json").write_text(
        json.dumps({**header, "rows": rows, "errors": errors, "withdrawn": withdrawn}, indent=2) + "\n"
    )
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
