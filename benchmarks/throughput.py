"""Inference throughput per model and backend: torch eager (CPU; GPU fp32 and bf16), ONNX Runtime and OpenVINO.

Every backend runs the same thing: the whole ``AnomalibModule`` forward (pre-processor, model, post-processor)
on a random ``(B, 3, S, S)`` batch in ``[0, 1]``, which is also exactly what ``AnomalibModule.to_onnx`` /
``to_openvino`` export. The ONNX graph comes from the model's own ``to_onnx`` (dynamic batch by default, as
anomalib exports it; a static graph per batch size when ``--onnx-batch static`` or when the dynamic one fails);
the OpenVINO model is converted from that ONNX file with ``openvino.convert_model``, which is what
``to_openvino`` does (FP32, no compression). Models are built by the benchmark harness
(``harness.build_model``: shared backbone and image size) and are not trained: heads keep their initial
weights and memory banks (Padim, Patchcore, GRNR with ``prior_source="normal"``) are fitted on ``--fit-images``
random images. Speed does not depend on training, but a memory bank's search time grows with its size, which is
reported with the fit's wall time (``fit_s``: feature pass and fit) and the fitted state's size (``fitted_mb``: the
model's buffers outside its backbone, i.e. Padim's Gaussians, Patchcore's coreset, GRNR's banks).

A ``--models`` entry ``LABEL=MODEL`` measures ``MODEL`` under its own label (rows, ``--model-args``), so one run
can compare settings of one model: ``GRNR GRNR-normal=GRNR --model-args '{"GRNR-normal": {"prior_source": "normal"}}'``.

Latency is per batch after ``--warmup`` calls: median and 90th percentile over at least ``--min-iters`` calls
and ``--min-time`` seconds; images/s is total images over total time. Results go to
``benchmarks/results/throughput_<name>.json`` and ``.md`` with the machine and the exact command. A model or
backend that fails becomes a row holding the error.

Example (2-core CPU)::

    python benchmarks/throughput.py --models NAFRAD AGPNet AMINet Padim Patchcore --image-size 256 \
        --batch-sizes 1 8 --threads 2 --name cpu_256
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import json
import os
import shlex
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
BACKENDS = ("torch", "onnxruntime", "openvino", "openvino-bf16")
COLUMNS = [
    "model",
    "backend",
    "precision",
    "batch",
    "graph",
    "median_ms",
    "p90_ms",
    "img_per_s",
    "iters",
    "max_score_err",
    "max_map_err",
    "error",
]


def load_harness():
    """The benchmark harness module (a script, not a package), imported by path."""
    spec = importlib.util.spec_from_file_location("anomalib_recon_bench_harness", ROOT / "benchmarks" / "harness.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def time_calls(call: Callable[[], object], warmup: int, min_iters: int, min_time: float, max_iters: int) -> dict:
    """Median / p90 latency (ms) of ``call`` after ``warmup`` calls; ``call`` must block until done."""
    for _ in range(warmup):
        call()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < max_iters and (len(times) < min_iters or time.perf_counter() - start < min_time):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    ordered = sorted(times)
    p90 = ordered[min(len(ordered) - 1, round(0.9 * (len(ordered) - 1)))]
    median = statistics.median(times)
    return {"median_ms": median * 1e3, "p90_ms": p90 * 1e3, "total_s": sum(times), "iters": len(times)}


def measure(call: Callable[[], object], args: argparse.Namespace) -> dict:
    """:func:`time_calls` with the command line's warm-up and iteration settings."""
    return time_calls(call, args.warmup, args.min_iters, args.min_time, args.max_iters)


def model_args_for(label: str, name: str, args: argparse.Namespace) -> dict:
    """Init args of the entry ``label`` (model ``name``): ``--model-args`` plus random backbone weights when
    ``--weights random``."""
    import anomalib.models as am

    extra = dict(args.model_args.get(label, {}))
    if args.weights == "random":
        params = inspect.signature(getattr(am, name).__init__).parameters
        if "weights" in params:  # ours
            extra.setdefault("weights", None)
        elif "pre_trained" in params:  # anomalib's built-ins
            extra.setdefault("pre_trained", False)
    return extra


def split_label(entry: str) -> tuple[str, str]:
    """``LABEL=MODEL`` -> (label, model); a plain ``MODEL`` is its own label."""
    label, _, model = entry.partition("=")
    return (label, model) if model else (entry, entry)


def random_batches(args: argparse.Namespace):
    """``--fit-images`` random raw images in ``[0, 1]``, batches of 8, seeded by ``--seed``."""
    import torch

    generator = torch.Generator().manual_seed(args.seed)
    for start in range(0, args.fit_images, 8):
        count = min(8, args.fit_images - start)
        yield torch.rand(count, 3, args.image_size, args.image_size, generator=generator)


def fitted_megabytes(model) -> float:
    """Size of the torch model's buffers outside its backbone (``feature_extractor``): what fitting stored."""
    total = sum(
        buffer.numel() * buffer.element_size()
        for name, buffer in model.named_buffers()
        if not name.startswith("feature_extractor.")
    )
    return round(total / 2**20, 2)


def build(entry: str, args: argparse.Namespace, harness):
    """The model as the harness builds it, in eval mode, with any memory bank fitted on random images."""
    import torch
    from anomalib.models.components import MemoryBankMixin

    label, name = split_label(entry)
    ns = argparse.Namespace(
        backbone=args.backbone, image_size=args.image_size, model_args={name: model_args_for(label, name, args)}
    )
    module = harness.build_model(name, ns)
    info: dict = {"params_m": round(sum(p.numel() for p in module.model.parameters()) / 1e6, 2)}
    banks = getattr(getattr(module, "model", None), "prior_source", None) == "normal"  # GRNR's bank priors
    if isinstance(module, MemoryBankMixin) or banks:
        start = time.perf_counter()
        if banks:
            module.build_banks(random_batches(args))
        else:
            module.model.train()
            with torch.no_grad():
                for images in random_batches(args):
                    module.model(module.pre_processor(images) if module.pre_processor else images)
            module.fit()
            module._is_fitted = torch.tensor([True])  # what anomalib's fit hooks set after fit()
        info["fitted_on_random_images"] = args.fit_images
        info["fit_s"] = round(time.perf_counter() - start, 2)
        info["fitted_mb"] = fitted_megabytes(module.model)
        bank = getattr(module.model, "memory_bank", None)
        if isinstance(bank, torch.Tensor) and bank.ndim == 2:
            info["memory_bank"] = list(bank.shape)
    return module.eval(), info


def torch_rows(module, name: str, args: argparse.Namespace, device: str, precision: str) -> list[dict]:
    """Torch eager rows for one device and precision, one per batch size."""
    import torch

    rows = []
    module = module.to(device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for batch in args.batch_sizes:
        row = {"model": name, "backend": f"torch-{device}", "precision": precision, "batch": batch, "graph": "eager"}
        try:
            x = torch.rand(batch, 3, args.image_size, args.image_size, device=device)

            def call(x=x):
                # no_grad, not inference_mode: inference tensors cached by a model would break the export after it
                with torch.no_grad(), torch.autocast(device, torch.bfloat16, enabled=precision == "bf16"):
                    module(x)
                sync()

            row |= measure(call, args)
        except Exception as error:  # recorded as a row
            row["error"] = describe(error)
        rows.append(finish(row))
    module.to("cpu")
    return rows


def export_onnx(module, folder: Path, args: argparse.Namespace, batch: int | None) -> Path:
    """``module.to_onnx``: dynamic batch (``batch=None``, anomalib's default) or a graph fixed at ``batch``."""
    size = (args.image_size, args.image_size)
    name = "model_dynamic" if batch is None else f"model_b{batch}"
    kwargs = {} if batch is None else {"dynamic_shapes": ({0: batch},)}
    return module.to_onnx(folder, model_file_name=name, input_size=size, **kwargs)


def ort_runner(path: Path, threads: int) -> Callable:
    """An ONNX Runtime CPU session as ``run(x)``."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    return lambda x: session.run(None, {input_name: x})


def ov_runner(path: Path, threads: int, precision: str = "f32") -> Callable:
    """An OpenVINO CPU model (converted from the ONNX file, latency hint) as ``run(x)``, at ``precision``.

    fp32 unless asked otherwise: on CPUs with AVX-512 BF16 OpenVINO's default would be bf16.
    """
    import openvino as ov

    from anomalib_recon.deploy import compile_openvino

    config: dict = {"PERFORMANCE_HINT": "LATENCY"}
    if threads:
        config["INFERENCE_NUM_THREADS"] = threads
    compiled = compile_openvino(ov.convert_model(str(path)), "CPU", precision=precision, config=config)
    request = compiled.create_infer_request()
    return lambda x: request.infer({0: x})


def exported_rows(module, name: str, args: argparse.Namespace, backends: list[str], folder: Path) -> list[dict]:
    """ONNX Runtime and OpenVINO rows from the model's ONNX export, one per batch size and backend."""
    import numpy as np
    import torch

    makers = {
        "onnxruntime": ort_runner,
        "openvino": ov_runner,
        "openvino-bf16": lambda path, threads: ov_runner(path, threads, "bf16"),
    }
    rows = []
    graphs: dict[int | None, Path | Exception] = {}

    def graph(batch: int | None) -> Path:
        if batch not in graphs:
            label = "dynamic batch" if batch is None else f"static batch {batch}"
            print(f"  exporting ONNX ({label}) ...", flush=True)
            start = time.perf_counter()
            try:
                graphs[batch] = export_onnx(module, folder, args, batch)
                print(f"  exported in {time.perf_counter() - start:.1f} s", flush=True)
            except Exception as error:  # reported per row
                graphs[batch] = error
        if isinstance(graphs[batch], Exception):
            raise graphs[batch]
        return graphs[batch]

    runners: dict[tuple[str, int | None], Callable | Exception] = {}

    def runner(backend: str, batch: int | None) -> Callable:
        key = (backend, batch)
        if key not in runners:
            try:
                runners[key] = makers[backend](graph(batch), args.threads)
            except Exception as error:  # reported per row
                runners[key] = error
        if isinstance(runners[key], Exception):
            raise runners[key]
        return runners[key]

    for backend in backends:
        for batch in args.batch_sizes:
            precision = "bf16" if backend.endswith("bf16") else "fp32"
            row = {"model": name, "backend": backend, "precision": precision, "batch": batch}
            x = np.random.default_rng(args.seed).random((batch, 3, args.image_size, args.image_size), np.float32)
            with torch.no_grad():
                reference = module(torch.from_numpy(x))
            attempts = [None, batch] if args.onnx_batch == "dynamic" else [batch]
            errors = []
            for fixed in attempts:
                row["graph"] = "dynamic batch" if fixed is None else "static batch"
                try:
                    run = runner(backend, fixed)
                    row |= output_errors(run(x), reference)
                    row |= measure(lambda run=run, x=x: run(x), args)
                    row.pop("error", None)
                    break
                except Exception as error:  # falls back to a static graph, then becomes a row
                    text = describe(error)
                    if not errors or text not in errors[0]:
                        errors.append(f"{row['graph']}: {text}")
                    row["error"] = "; ".join(errors)
            if errors and "error" not in row:
                row["note"] = f"dynamic-batch graph failed ({errors[0][:200]}), static graph used"
            rows.append(finish(row))
    return rows


def output_errors(outputs: list, reference) -> dict:
    """Largest absolute difference of the exported ``pred_score`` and ``anomaly_map`` from torch eager's.

    Both are anomalib's normalised outputs (post-processor in the graph), so the numbers are what a deployed model's
    user sees: e.g. OpenVINO at bf16 against the fp32 checkpoint.
    """
    import numpy as np

    outputs = list(outputs.values()) if hasattr(outputs, "values") else list(outputs)  # OpenVINO: a dict
    errors = {}
    for key, field in (("max_score_err", "pred_score"), ("max_map_err", "anomaly_map")):
        expected = getattr(reference, field, None)
        if expected is None:
            continue
        expected = expected.numpy()
        for out in outputs:
            out = np.asarray(out)
            if out.size == expected.size:
                errors[key] = float(f"{np.abs(out.reshape(expected.shape) - expected).max():.3g}")
                break
    return errors


def describe(error: BaseException) -> str:
    """One line for an error row: type, message (first 300 characters) and the innermost frame."""
    text = " ".join(str(error).split())[:300]
    frames = traceback.extract_tb(error.__traceback__)
    where = f" [{Path(frames[-1].filename).name}:{frames[-1].lineno}]" if frames else ""
    return f"{type(error).__name__}: {text}{where}"


def finish(row: dict) -> dict:
    """Round the timings, add images/s, print the row (progress)."""
    if "median_ms" in row:
        row["img_per_s"] = round(row["batch"] * row["iters"] / row.pop("total_s"), 2)
        row["median_ms"] = round(row["median_ms"], 2)
        row["p90_ms"] = round(row["p90_ms"], 2)
        print(
            f"  {row['backend']:<12} {row['precision']:<5} batch {row['batch']:>3} ({row['graph']}): "
            f"median {row['median_ms']:.1f} ms, p90 {row['p90_ms']:.1f} ms, {row['img_per_s']:.1f} img/s",
            flush=True,
        )
    else:
        print(f"  {row.get('backend')} batch {row.get('batch')}: ERROR {row.get('error')}", flush=True)
    return row


def run_model(entry: str, args: argparse.Namespace, harness, cuda: bool) -> tuple[list[dict], dict]:
    """All rows of one ``--models`` entry (named by its label); any failure becomes a row."""
    name = split_label(entry)[0]
    try:
        module, info = build(entry, args, harness)
    except Exception as error:  # a model that cannot be built is one row
        return [finish({"model": name, "backend": "build", "error": describe(error)})], {}
    rows = []
    if "torch" in args.backends:
        rows += torch_rows(module, name, args, "cpu", "fp32")
        if cuda:
            rows += torch_rows(module, name, args, "cuda", "fp32")
            rows += torch_rows(module, name, args, "cuda", "bf16")
    exported = [b for b in args.backends if b != "torch"]
    if exported:
        if args.work_dir:
            rows += exported_rows(module, name, args, exported, Path(args.work_dir) / name)
        else:  # exported graphs take hundreds of MB per model at 256 px: removed once measured
            with tempfile.TemporaryDirectory(prefix="anomalib_recon_throughput_") as work:
                rows += exported_rows(module, name, args, exported, Path(work))
    return rows, info


def to_markdown(rows: list[dict], header: dict) -> str:
    """A results table plus how it was produced."""
    lines = [
        f"# Throughput: {header['name']}",
        "",
        f"Command: `{header['command']}`",
        "",
        f"Machine: {json.dumps(header['machine'])}",
        "",
        f"Load average (1, 5, 15 min) at start {header['load_average_at_start']}, at end "
        f"{header.get('load_average_at_end')}: other processes on the machine slow every row alike.",
        "",
        f"Backbone {header['backbone']} ({header['weights']} weights), {header['image_size']} px, threads "
        f"{header['threads'] or 'default'}, warm-up {header['warmup']}, at least {header['min_iters']} calls and "
        f"{header['min_time']} s per row. Models are untrained (speed does not depend on training); memory banks "
        f"are fitted on {header['fit_images']} random images. Every backend runs the whole exported pipeline "
        "(pre-processor, model, post-processor) on random input; latency is per batch.",
        "",
    ]
    lines += [f"- {note}" for note in header["notes"]]
    for name, info in header["models"].items():
        if info:
            lines.append(f"- {name}: " + ", ".join(f"{k} {v}" for k, v in info.items()))
    lines += ["", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows:
        lines.append("| " + " | ".join(str(row.get(col, "")).replace("|", "/") for col in COLUMNS) + " |")
    notes = {f"{row['model']} {row['backend']}": row["note"] for row in rows if row.get("note")}
    if notes:
        lines += ["", "Static-batch fallbacks:", ""] + [f"- {where}: {note}" for where, note in notes.items()]
    return "\n".join(lines) + "\n"


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line arguments."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["NAFRAD", "Padim"], help="MODEL or LABEL=MODEL entries")
    p.add_argument("--backbone", default="tf_efficientnet_lite0")
    p.add_argument(
        "--weights",
        choices=["imagenet", "random"],
        default="imagenet",
        help="backbone weights (imagenet: offline Lite weights / HF cache; random: no download at all)",
    )
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--backends", nargs="+", choices=BACKENDS, default=list(BACKENDS))
    p.add_argument(
        "--onnx-batch",
        choices=["dynamic", "static"],
        default="dynamic",
        help="dynamic: one graph with a dynamic batch axis (static per batch size if it fails); static: one per size",
    )
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch, ONNX Runtime, OpenVINO (0: default)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--min-iters", type=int, default=5)
    p.add_argument("--min-time", type=float, default=3.0, help="seconds of timed calls per row, at least")
    p.add_argument("--max-iters", type=int, default=200)
    p.add_argument("--fit-images", type=int, default=32, help="random images for memory-bank models (Padim, ...)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model-args", type=json.loads, default={}, help="extra init args per model, JSON")
    p.add_argument("--name", default=None, help="results name (default: cpu_<size> or cuda_<size>)")
    p.add_argument("--results-dir", default=str(RESULTS))
    p.add_argument("--work-dir", default=None, help="keep exported graphs here (default: temporary)")
    args = p.parse_args(argv)
    if min(args.batch_sizes) < 1 or args.image_size < 1 or args.fit_images < 1:
        p.error("--batch-sizes, --image-size and --fit-images must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    """Measure every model on every backend and write JSON + markdown."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = parse(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    harness = load_harness()
    cuda = torch.cuda.is_available() and "torch" in args.backends
    name = args.name or f"{'cuda' if cuda else 'cpu'}_{args.image_size}"
    notes = []
    if "torch" in args.backends and not cuda:
        notes.append("torch on GPU (fp32, bf16 autocast) skipped: CUDA is not available on this machine.")
    if args.onnx_batch == "dynamic":
        notes.append(
            "ONNX/OpenVINO: one graph exported with a dynamic batch axis ('dynamic batch' rows); a static "
            "graph per batch size only where the dynamic one failed ('static batch' rows)."
        )
    else:
        notes.append("ONNX/OpenVINO: one graph exported per batch size, batch axis fixed ('static batch').")
    command = "python benchmarks/throughput.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    header = {
        "name": name,
        "command": command,
        "machine": harness.machine_info(),
        **{k: getattr(args, k) for k in ("backbone", "weights", "image_size", "batch_sizes", "threads", "warmup")},
        **{k: getattr(args, k) for k in ("min_iters", "min_time", "fit_images", "onnx_batch")},
        "load_average_at_start": [round(v, 2) for v in os.getloadavg()],
        "trained": False,
        "notes": notes,
        "models": {},
    }
    results = Path(args.results_dir)
    results.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    for index, model in enumerate(args.models, 1):
        print(f"=== [{index}/{len(args.models)}] {model} ===", flush=True)
        model_rows, info = run_model(model, args, harness, cuda)
        rows += model_rows
        header["models"][split_label(model)[0]] = info
        # Written after every model, so an interrupted run keeps what it finished.
        header["load_average_at_end"] = [round(v, 2) for v in os.getloadavg()]
        (results / f"throughput_{name}.json").write_text(json.dumps({**header, "rows": rows}, indent=2))
        table = to_markdown(rows, header)
        (results / f"throughput_{name}.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
