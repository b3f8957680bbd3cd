"""SCL-VI at the paper's 256 px geometry: memory-bank sizes, exact chunked kNN time, coreset time, encoder time.

The banks hold one D-dim embedding per window of every training image: at 256 px with the paper's strides (16 for
K=64, 4 for K=32) that is 13x13 = 169 and 57x57 = 3249 windows per image, so 762 Magnetic Tile training images give
128,778 and 2,475,738 rows (D = 64, float32: 33 MB and 634 MB). This script times, on random data of those sizes:

* the exact chunked search (``knn_distances`` with ``knn_chunk_size``) of one test image's windows against each bank;
* anomalib's ``KCenterGreedy`` coreset on a sub-bank (its cost grows with bank rows x coreset rows);
* the encoder on one image's windows at full width (the paper) and at the CPU widths used in our benchmarks.

Example::

    python benchmarks/scl_vi_knn.py --threads 2 --train-images 762 --name knn_256
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

import harness  # noqa: E402


def _time(fn, repeats: int = 1) -> float:
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def main(argv: list[str] | None = None) -> int:
    """Measure and write ``benchmarks/results/scl_vi_<name>.json`` / ``.md``."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--train-images", type=int, default=762, help="training images (Magnetic Tile: 762)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--chunk", type=int, default=65536, help="knn_chunk_size (bank rows per block)")
    p.add_argument("--coreset-rows", type=int, default=50000, help="sub-bank size for the coreset timing")
    p.add_argument("--coreset-ratio", type=float, default=0.01)
    p.add_argument("--encoder-patches", type=int, default=256, help="windows timed per encoder width")
    p.add_argument("--name", default="knn_256")
    p.add_argument("--results-dir", default=str(harness.RESULTS))
    args = p.parse_args(argv)

    import torch
    from anomalib.models.components.sampling import KCenterGreedy

    from anomalib_recon.models.image.scl_vi.torch_model import DeepEncoder, HierEncoder, knn_distances

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dim, k = 64, 5
    windows = {64: 13 * 13, 32: 57 * 57}
    rows = []
    for patch, per_image in windows.items():
        bank = torch.rand(args.train_images * per_image, dim) * 2 - 1
        queries = torch.rand(per_image, dim) * 2 - 1
        knn_distances(queries[:8], bank[:1000], k, args.chunk)  # warm-up
        seconds = _time(lambda q=queries, b=bank: knn_distances(q, b, k, args.chunk))
        rows.append(
            {
                "what": f"exact chunked kNN, K={patch}",
                "bank_rows": int(bank.shape[0]),
                "bank_mb": round(bank.numel() * 4 / 2**20, 1),
                "queries_per_image": per_image,
                "seconds_per_test_image": round(seconds, 3),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
        del bank

    sub = torch.rand(args.coreset_rows, dim) * 2 - 1
    seconds = _time(lambda: KCenterGreedy(embedding=sub, sampling_ratio=args.coreset_ratio).sample_coreset())
    full = args.train_images * windows[32]
    scale = (full / args.coreset_rows) ** 2  # rows x selected rows, both proportional to the bank at a fixed ratio
    rows.append(
        {
            "what": f"KCenterGreedy coreset, ratio {args.coreset_ratio}",
            "bank_rows": args.coreset_rows,
            "seconds": round(seconds, 2),
            "extrapolated_seconds_full_K32_bank": round(seconds * scale, 0),
        }
    )
    print(json.dumps(rows[-1]), flush=True)

    patches = torch.rand(args.encoder_patches, 3, 32, 32)
    for width in (1.0, 0.25, 0.125):
        enc = DeepEncoder(dim, width).eval()
        hier = HierEncoder(enc, dim).eval()
        with torch.no_grad():
            enc(patches[:8])
            per32 = _time(lambda e=enc: e(patches)) / args.encoder_patches
            per64 = _time(lambda h=hier: h(patches[: args.encoder_patches // 4].repeat(1, 1, 2, 2))) / (
                args.encoder_patches // 4
            )
        rows.append(
            {
                "what": f"encoder width {width}",
                "ms_per_32px_window": round(per32 * 1000, 3),
                "ms_per_64px_window": round(per64 * 1000, 3),
                "seconds_per_256px_image_paper_strides": round(per32 * windows[32] + per64 * windows[64], 2),
            }
        )
        print(json.dumps(rows[-1]), flush=True)

    header = {
        "name": f"scl_vi_{args.name}",
        "command": "python benchmarks/scl_vi_knn.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])),
        "machine": harness.machine_info(),
        "train_images": args.train_images,
        "rows": rows,
    }
    results = Path(args.results_dir)
    results.mkdir(parents=True, exist_ok=True)
    (results / f"{header['name']}.json").write_text(json.dumps(header, indent=2))
    lines = [
        *harness.result_preamble(header),
    ]
    lines += [
        "",
        f"Random embeddings (D = 64, k = 5) of the paper's bank sizes for {args.train_images} training images at "
        "256 px; one test image = all its windows. Times are one process on the threads given.",
        "",
    ]
    for row in rows:
        lines.append("- " + ", ".join(f"{key}: {value}" for key, value in row.items()))
    (results / f"{header['name']}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
