"""Benchmark harness: ours and anomalib's built-in models as peers on one dataset, one backbone, one budget.

Each model runs in its own subprocess (clean peak-memory numbers), through anomalib's ``Engine``: fit
on normal images, test with anomalib's metrics (image AUROC and F1-max, pixel AUROC, AUPRO and AP), then
a torch-eager throughput pass. Results go to ``benchmarks/results/<name>.json`` and ``.md`` together with
the machine and the exact command.

Example (offline, Magnetic Tile from ../shared, EfficientNet-Lite0 weights)::

    python benchmarks/harness.py --models NAFRAD Padim --dataset magnetic_tile \
        --backbone tf_efficientnet_lite0 --image-size 256 --max-steps 300 --name mt_lite0
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import platform
import resource
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DEFAULT_MT_ROOT = ROOT.parent / "shared" / "datasets" / "magnetic_tile"
METRICS = ["image_AUROC", "image_F1Max", "pixel_AUROC", "pixel_AUPRO", "pixel_AUPR"]

# Layer choice per (model, backbone family). Built-ins take timm feature-module names.
# EfficientNet-Lite feature modules: blocks.1 (24 ch, /4), blocks.2 (40, /8), blocks.4 (112, /16).
LITE_LAYERS = {
    "Padim": ["blocks.1", "blocks.2", "blocks.4"],
    "Patchcore": ["blocks.2", "blocks.4"],
    "Stfpm": ["blocks.1", "blocks.2", "blocks.4"],
}
RESNET_LAYERS = {
    "Padim": ["layer1", "layer2", "layer3"],
    "Patchcore": ["layer2", "layer3"],
    "Stfpm": ["layer1", "layer2", "layer3"],
}

# Benchmark baselines (not product models): resolved from benchmarks/baselines.py, not anomalib.models.
BASELINES_FILE = Path(__file__).resolve().parent / "baselines.py"
BASELINE_NAMES = ("MeanFeature",)


def cpu_model() -> str:
    """The CPU's model name: CPU training is not bit-reproducible across CPU models, so results record it."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    """The CPU's vector/bf16 flags that change kernels and precision (empty where /proc/cpuinfo is absent)."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return []
    return sorted({f for f in flags if "bf16" in f or f in {"amx_tile", "avx512f", "avx2"}})


def machine_info() -> dict:
    """What the numbers were measured on."""
    import torch

    info = {
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpu_flags": cpu_flags(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        import anomalib

        info["anomalib"] = anomalib.__version__
    except ImportError:
        pass
    return info


def build_datamodule(args: argparse.Namespace):
    """The dataset at ``args.image_size`` with fixed seeds."""
    if args.dataset == "magnetic_tile":
        from anomalib_recon.data import MagneticTile

        root = Path(args.data_root or os.environ.get("ANOMALIB_RECON_MAGNETIC_TILE", DEFAULT_MT_ROOT))
        return MagneticTile(
            root=root, train_batch_size=args.batch_size, eval_batch_size=args.batch_size, num_workers=args.workers
        )
    if args.dataset == "elpv":
        from anomalib_recon.data import ELPV

        return ELPV(
            cell_type=args.cell_type,
            train_batch_size=args.batch_size,
            eval_batch_size=args.batch_size,
            num_workers=args.workers,
            seed=args.seed,
        )
    if args.dataset == "folder":
        return _folder_datamodule(args)
    msg = f"unknown dataset {args.dataset}"
    raise ValueError(msg)


def check_folder_root(args: argparse.Namespace) -> Path:
    """The ``--dataset folder`` root, or one clear error (checked before any model subprocess starts)."""
    if not args.data_root:
        msg = "--dataset folder needs --data-root PATH (an MVTec-style category folder)."
        raise SystemExit(msg)
    root = Path(args.data_root).expanduser()
    if not (root / "train" / "good").is_dir() or not (root / "test").is_dir():
        msg = f"{root} is not an MVTec-style category folder: it needs train/good and test/<class> sub-folders."
        raise SystemExit(msg)
    return root


def _folder_datamodule(args: argparse.Namespace):
    """Any MVTec-style category folder (``train/good``, ``test/good``, ``test/<defect>``, ``ground_truth/<defect>``)."""
    from anomalib.data import Folder

    root = check_folder_root(args)
    test = root / "test"
    defects = sorted(d.name for d in test.iterdir() if d.is_dir() and d.name != "good")
    masks = bool(defects) and all((root / "ground_truth" / d).is_dir() for d in defects)
    return Folder(
        name=root.name,
        root=root,
        normal_dir="train/good",
        normal_test_dir="test/good" if (test / "good").is_dir() else None,
        abnormal_dir=[f"test/{d}" for d in defects],
        mask_dir=[f"ground_truth/{d}" for d in defects] if masks else None,
        train_batch_size=args.batch_size,
        eval_batch_size=args.batch_size,
        num_workers=args.workers,
        test_split_mode="from_dir",
        val_split_mode="same_as_test",
        seed=args.seed,
    )


def model_class(name: str) -> type:
    """A benchmark baseline from ``baselines.py`` (``MeanFeature``), else ``anomalib.models.<name>`` (ours included)."""
    import importlib.util

    import anomalib.models as am

    if name in BASELINE_NAMES:
        module = sys.modules.get("benchmark_baselines")
        if module is None:
            spec = importlib.util.spec_from_file_location("benchmark_baselines", BASELINES_FILE)
            module = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = module
            spec.loader.exec_module(module)
        return module.BASELINES[name]
    return getattr(am, name)


def build_model(name: str, args: argparse.Namespace):
    """One model with the shared backbone, image size and anomalib's full test metrics."""
    from anomalib.metrics import AUPR, AUPRO, AUROC, Evaluator, F1Max

    from anomalib_recon.components.preprocessing import resize_pre_processor

    evaluator = Evaluator(
        test_metrics=[
            AUROC(fields=["pred_score", "gt_label"], prefix="image_"),
            F1Max(fields=["pred_score", "gt_label"], prefix="image_"),
            AUROC(fields=["anomaly_map", "gt_mask"], prefix="pixel_", strict=False),
            AUPRO(fields=["anomaly_map", "gt_mask"], prefix="pixel_", strict=False),
            AUPR(fields=["anomaly_map", "gt_mask"], prefix="pixel_", strict=False),
        ]
    )
    cls = model_class(name)
    size = (args.image_size, args.image_size)
    lite = "lite" in args.backbone
    kwargs: dict = {
        "evaluator": evaluator,
        # one protocol: anomalib's peers get the same non-antialiased resize + ImageNet normalisation as our models
        # (their own default antialiases, which anomalib's forward and exports then drop)
        "pre_processor": cls.configure_pre_processor(image_size=size)
        if cls.__module__.startswith("anomalib_recon")
        else resize_pre_processor(size),
        "visualizer": False,  # metrics only; `anomalib predict` produces the images
    }
    if cls.__module__.startswith("anomalib_recon"):
        params = inspect.signature(cls.__init__).parameters  # SCLVI trains from scratch: no backbone, no weights
        kwargs |= {"backbone": args.backbone, "weights": "imagenet", "image_size": args.image_size}
        kwargs = {k: v for k, v in kwargs.items() if k in params}
    elif name in {"Padim", "Patchcore", "Stfpm"}:
        kwargs |= {"backbone": args.backbone, "layers": (LITE_LAYERS if lite else RESNET_LAYERS)[name]}
        if name == "Padim" and lite:
            kwargs["n_features"] = 100  # random subset of the 176 channels, as Padim does for resnet18 (100 of 448)
    elif name in BASELINE_NAMES:  # the trivial baseline reads the same layers as Padim
        layers = (LITE_LAYERS if lite else RESNET_LAYERS)["Padim"]
        kwargs |= {"backbone": args.backbone, "layers": layers, "weights": "imagenet"}
    elif name == "ReverseDistillation":
        if not args.backbone.startswith(("resnet", "wide_resnet")):
            msg = "n/a: ReverseDistillation needs a ResNet-family backbone (its decoder mirrors ResNet stages)."
            raise ValueError(msg)
        kwargs |= {"backbone": args.backbone, "layers": RESNET_LAYERS["Padim"]}
    kwargs |= args.model_args.get(name, {})
    return cls(**{k: v for k, v in kwargs.items() if v is not None})


def setup_run(args: argparse.Namespace) -> None:
    """What every run does before building data and model: offline hub, torch threads, seeds (in this order)."""
    import torch
    from lightning.pytorch import seed_everything

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.threads:
        torch.set_num_threads(args.threads)
    seed_everything(args.seed, workers=True)


def make_engine(args: argparse.Namespace, name: str, **overrides):
    """anomalib's ``Engine`` with the harness's settings (budget, device, ``<work_dir>/<name>``); ``overrides`` are
    further ``Engine``/Trainer arguments (e.g. ``check_val_every_n_epoch``)."""
    import torch
    from anomalib.engine import Engine

    settings = {
        "accelerator": "gpu" if torch.cuda.is_available() and not args.cpu else "cpu",
        "devices": 1,
        "max_steps": args.max_steps,
        "max_epochs": args.max_epochs,
        "max_time": args.max_time,
        "default_root_dir": str(Path(args.work_dir) / name),
        "logger": False,
        "enable_progress_bar": True,
        "deterministic": False,
    }
    return Engine(**(settings | overrides))


def run_single(args: argparse.Namespace) -> dict:
    """Fit + test + throughput of one model (called in a subprocess)."""
    import torch

    setup_run(args)
    name = args.single
    datamodule = build_datamodule(args)
    model = build_model(name, args)
    engine = make_engine(args, name)
    start = time.perf_counter()
    engine.fit(model=model, datamodule=datamodule)
    train_s = time.perf_counter() - start
    start = time.perf_counter()
    results = engine.test(model=model, datamodule=datamodule)[0]
    test_s = time.perf_counter() - start
    params = sum(p.numel() for p in model.model.parameters())
    trainable = sum(p.numel() for p in model.model.parameters() if p.requires_grad)
    model.eval()
    device = next(model.model.parameters()).device
    batch = torch.rand(args.batch_size, 3, args.image_size, args.image_size, device=device)
    with torch.no_grad():
        model.model(batch)
        reps = 3
        start = time.perf_counter()
        for _ in range(reps):
            model.model(batch)
        ips = reps * args.batch_size / (time.perf_counter() - start)
    return {
        "model": name,
        **{m: float(results[m]) for m in METRICS if m in results},
        "train_s": round(train_s, 1),
        "test_s": round(test_s, 1),
        "steps": int(engine.trainer.global_step),
        "infer_img_per_s": round(ips, 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "params_m": round(params / 1e6, 2),
        "trainable_params_m": round(trainable / 1e6, 2),
    }


def result_preamble(header: dict) -> list[str]:
    """The first lines of every results file: its name, the exact command and the machine."""
    return [
        f"# {header['name']}",
        "",
        f"Command: `{header['command']}`",
        "",
        f"Machine: {json.dumps(header['machine'])}",
    ]


def markdown_table(columns: list[str], rows: list[dict], cell: Callable[[dict, str], str] | None = None) -> list[str]:
    """A markdown table's lines: header, separator, one line per row (``cell(row, column)``, default ``str``; a
    missing column is empty). Every benchmark script writes its tables through this."""
    cell = cell or (lambda row, col: str(row.get(col, "")))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return lines + ["| " + " | ".join(cell(row, col) for col in columns) + " |" for row in rows]


def to_markdown(rows: list[dict], header: dict) -> str:
    """A results table plus how it was produced."""
    cols = ["model", *METRICS, "train_s", "test_s", "steps", "infer_img_per_s", "peak_rss_mb", "params_m"]
    lines = [
        *result_preamble(header),
        "",
        f"Dataset {header['dataset']}, backbone {header['backbone']}, {header['image_size']} px, "
        f"budget max_steps={header['max_steps']} max_epochs={header['max_epochs']} max_time={header['max_time']}, "
        f"seed {header['seed']}. Metrics from anomalib's Evaluator on the test split; images/s is torch eager "
        f"`model.model(batch)` at batch {header['batch_size']}.",
        "",
        *markdown_table(cols, rows, _metric_cell),
    ]
    errors = [f"- {row['model']}: {row['error']}" for row in rows if row.get("error")]
    if errors:
        lines += ["", "Models without a result:", "", *errors]
    return "\n".join(lines) + "\n"


def run_child(child: list[str], label: str) -> dict:
    """Run one ``--single`` subprocess, echoing its output (progress stays visible); its ``RESULT`` row, or an
    error row named ``label`` with the last error line it printed."""
    proc = subprocess.Popen(child, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    row = {"model": label, "error": "no result"}
    last_error = ""
    for line in proc.stdout:
        sys.stdout.write(line)
        if line.startswith("RESULT "):
            row = json.loads(line[len("RESULT ") :])
        elif "Error: " in line:
            last_error = line.strip()
    if proc.wait() != 0 and "error" in row:
        row["error"] = last_error or f"exit code {proc.returncode}"
    return row


def _metric_cell(row: dict, col: str) -> str:
    """Metrics to four decimals, anything else as it is."""
    value = row.get(col, "")
    return f"{value:.4f}" if isinstance(value, float) and col in METRICS else str(value)


def write_results(
    results: Path,
    header: dict,
    rows: list[dict],
    note: str = "",
    render: Callable[[list[dict], dict], str] | None = None,
) -> str:
    """``<results>/<header['name']>.json`` and ``.md`` (``render(rows, header)``, the harness's table by default,
    plus ``note``); returns the markdown. Every benchmark script records its results through this."""
    results.mkdir(parents=True, exist_ok=True)
    (results / f"{header['name']}.json").write_text(json.dumps({**header, "rows": rows}, indent=2))
    table = (render or to_markdown)(rows, header) + note
    (results / f"{header['name']}.md").write_text(table)
    return table


def variant_argv(args: argparse.Namespace, model: str, init_args: dict, work_dir: str) -> list[str]:
    """Harness arguments for one model variant of a study (its ``args`` carry the shared settings; ``cell_type``,
    ``max_epochs`` and ``max_time`` only where it has them)."""
    argv = ["--models", model, "--dataset", args.dataset, "--backbone", args.backbone]
    argv += ["--image-size", str(args.image_size), "--batch-size", str(args.batch_size)]
    argv += ["--workers", str(args.workers), "--threads", str(getattr(args, "threads", 0))]
    argv += ["--max-steps", str(args.max_steps), "--seed", str(args.seed), "--work-dir", work_dir]
    argv += ["--model-args", json.dumps({model: init_args})]
    for flag, attr in (("--cell-type", "cell_type"), ("--max-epochs", "max_epochs"), ("--max-time", "max_time")):
        if getattr(args, attr, None) is not None:
            argv += [flag, str(getattr(args, attr))]
    return argv + (["--data-root", args.data_root] if args.data_root else [])


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line arguments."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["NAFRAD", "Padim"])
    p.add_argument("--dataset", choices=["magnetic_tile", "elpv", "folder"], default="magnetic_tile")
    p.add_argument("--data-root", default=None, help="dataset folder (magnetic_tile: optional; folder: required)")
    p.add_argument("--cell-type", default="mono")
    p.add_argument("--backbone", default="tf_efficientnet_lite0")
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--max-steps", type=int, default=-1)
    p.add_argument("--max-epochs", type=int, default=None)
    p.add_argument("--max-time", default=None, help="Lightning max_time, e.g. 00:00:20:00")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--name", default=None)
    p.add_argument("--work-dir", default="/tmp/anomalib_recon_bench")
    p.add_argument("--results-dir", default=str(RESULTS), help="where the JSON and markdown go")
    p.add_argument(
        "--model-args",
        type=json.loads,
        default={},
        help='extra init args per model, JSON: {"NAFRAD": {"layers": [1, 2]}}',
    )
    p.add_argument("--cpu", action="store_true")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--single", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run every model in a subprocess and write JSON + markdown."""
    args = parse(argv)
    if args.single:
        print("RESULT " + json.dumps(run_single(args)), flush=True)
        return 0
    if args.dataset == "folder":
        check_folder_root(args)
    name = args.name or f"{args.dataset}_{args.backbone}_{args.image_size}"
    command = "python benchmarks/harness.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    header = {
        "name": name,
        "command": command,
        "machine": machine_info(),
        **{k: getattr(args, k) for k in ("dataset", "backbone", "image_size", "max_steps", "max_epochs", "max_time")},
        "seed": args.seed,
        "batch_size": args.batch_size,
    }
    results = Path(args.results_dir)
    rows = []
    for index, model in enumerate(args.models, 1):
        print(f"=== [{index}/{len(args.models)}] {model} ===", flush=True)
        rows.append(run_child([sys.executable, __file__, *(argv or sys.argv[1:]), "--single", model], model))
        # Written after every model, so a long run that is stopped keeps what it finished.
        table = write_results(results, header, rows)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
