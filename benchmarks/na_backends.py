"""Time every neighborhood-attention backend that runs on this machine.

For each map size, dtype and backend: forward (no grad) and forward+backward of
``neighborhood_attention_2d`` on ``(B, heads, H, W, dim/heads)`` tensors with a relative-position bias
(natten >= 0.20 has none: it is timed without, and the table says so). ``pure`` is timed in both of its
forms (``pure-gather``: O(HW k^2) memory; ``pure-dense``: masked HW x HW product) as well as with its
automatic choice. Prints a markdown table and writes ``benchmarks/results/<name>.json`` with the machine
and the exact command.

    python benchmarks/na_backends.py                         # CPU: pure + eager flex (forward only)
    python benchmarks/na_backends.py --sizes 32 64 --batch 8 # on a CUDA machine: + compiled flex, natten
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

from anomalib_recon.components import neighborhood_attention as na

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def machine_info() -> dict:
    """What the numbers were measured on: the harness's record plus the attention backends and the load."""
    info = {
        **harness.machine_info(),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "available_backends": na.available_backends(),
        "load_average_1_5_15": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    natten = na._get_natten()
    info["natten"] = None if natten is None else ".".join(map(str, natten.version))
    info["natten_has_cuda"] = None if natten is None else natten.has_cuda
    return info


def make_call(backend: str, kernel_size: int):
    """Return fn(q, k, v, rpb) for one benchmark backend name (pure-gather/-dense/-blocked are pure's forms)."""
    if backend.startswith("pure-"):
        form = backend.removeprefix("pure-")
        return lambda q, k, v, rpb: na._pure(q, k, v, kernel_size, 1, rpb, q.shape[-1] ** -0.5, 0.0, form=form)
    return lambda q, k, v, rpb: na.neighborhood_attention_2d(q, k, v, kernel_size, 1, rpb, backend=backend)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_it(fn, device: torch.device, warmup: int, iters: int) -> float:
    """Median wall time of ``fn()`` in milliseconds."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def bench_one(backend, size, dtype, mode, args, device) -> dict:
    row = {"backend": backend, "size": f"{size}x{size}", "dtype": str(dtype).replace("torch.", ""), "mode": mode}
    heads, head_dim = args.heads, args.dim // args.heads
    natten = na._get_natten()
    use_rpb = not (backend == "natten" and natten is not None and not natten.supports_rpb)
    row["rpb"] = use_rpb
    if backend == "flex" and device.type == "cpu" and mode == "fwd+bwd":
        return {**row, "ms": None, "note": "flex has no CPU backward"}
    if backend == "natten" and device.type == "cpu" and mode == "fwd+bwd":
        return {**row, "ms": None, "note": "natten without libnatten is forward-only"}
    if backend == "pure-dense" and size * size > args.max_dense_tokens:
        return {**row, "ms": None, "note": f"skipped: HW > {args.max_dense_tokens} (O((HW)^2) memory)"}
    gen = torch.Generator(device=device).manual_seed(0)
    shape = (args.batch, heads, size, size, head_dim)
    q, k, v = (torch.randn(shape, generator=gen, device=device, dtype=dtype) for _ in range(3))
    rpb = 0.02 * torch.randn(heads, 2 * args.kernel - 1, 2 * args.kernel - 1, generator=gen, device=device)
    rpb = rpb if use_rpb else None
    call = make_call(backend, args.kernel)
    if mode == "fwd":

        def fn():
            with torch.no_grad():
                return call(q, k, v, rpb)
    else:
        for t in (q, k, v) + ((rpb,) if rpb is not None else ()):
            t.requires_grad_(True)
        grad = torch.randn(shape, generator=gen, device=device, dtype=dtype)

        def fn():
            out = call(q, k, v, rpb)
            out.backward(grad)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    try:
        start = time.perf_counter()
        fn()  # first call: compilation / caches
        sync(device)
        row["first_call_ms"] = round((time.perf_counter() - start) * 1e3, 1)
        row["ms"] = round(time_it(fn, device, args.warmup, args.iters), 3)
    except Exception as error:  # report, keep benchmarking the others
        row["ms"] = None
        row["note"] = f"{type(error).__name__}: {str(error).splitlines()[0][:120]}"
    if device.type == "cuda":
        row["peak_mem_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return row


def markdown(rows: list[dict]) -> str:
    has_mem = any("peak_mem_mb" in r for r in rows)
    head = "| backend | map | dtype | mode | rpb | ms (median) | first call ms |" + (" peak MB |" if has_mem else "")
    sep = "|---|---|---|---|---|---:|---:|" + ("---:|" if has_mem else "")
    lines = [head, sep]
    for r in rows:
        ms = f"{r['ms']:.2f}" if r.get("ms") is not None else r.get("note", "-")
        line = (
            f"| {r['backend']} | {r['size']} | {r['dtype']} | {r['mode']} | {'yes' if r['rpb'] else 'no'} | {ms} "
            f"| {r.get('first_call_ms', '-')} |"
        )
        if has_mem:
            line += f" {r.get('peak_mem_mb', '-')} |"
        lines.append(line)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kernel", type=int, default=7)
    parser.add_argument("--dtypes", nargs="+", default=None, help="default: float32 (+ bfloat16 on CUDA)")
    parser.add_argument("--backends", nargs="+", default=None, help="default: all that run here")
    parser.add_argument("--modes", nargs="+", default=["fwd", "fwd+bwd"])
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--max-dense-tokens", type=int, default=1024, help="skip pure-dense above this HW")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--name", default=None, help="result file stem (default na_backends_<device>)")
    args = parser.parse_args()

    device = torch.device(args.device)
    dtypes = args.dtypes or (["float32", "bfloat16"] if device.type == "cuda" else ["float32"])
    backends = args.backends or [b for b in na.available_backends() if b != "pure"] + [
        "pure",
        "pure-gather",
        "pure-dense",
        "pure-blocked",
    ]
    warnings.filterwarnings("ignore")
    rows = []
    for size in args.sizes:
        for dtype_name in dtypes:
            for backend in backends:
                for mode in args.modes:
                    row = bench_one(backend, size, getattr(torch, dtype_name), mode, args, device)
                    rows.append(row)
                    print(json.dumps(row), file=sys.stderr, flush=True)
    machine = machine_info()  # load average right after the runs: this machine may be shared
    table = markdown(rows)
    print(table)
    name = args.name or f"na_backends_{device.type}"
    RESULTS.mkdir(parents=True, exist_ok=True)
    result = {
        "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
        "machine": machine,
        "config": {k: v for k, v in vars(args).items() if k != "name"} | {"dtypes": dtypes, "backends": backends},
        "rows": rows,
        "table_markdown": table,
    }
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {RESULTS / f'{name}.json'}")


if __name__ == "__main__":
    main()
