"""Do renames and moves leave every model's outputs unchanged? (issue "One vocabulary ...": checked on the same
weights and inputs).

``save DIR`` (run on the revision before a refactor): for each registered model, the contract test's fast
construction (``tests/test_contract.py::CONTRACT_KWARGS``, so each revision uses its own argument names) is fitted
through anomalib's ``Engine`` on the contract test's generated category, with a fixed seed; its ``state_dict``, four
test images and its outputs (``pred_score``, ``anomaly_map``, pre- and post-processing included) are saved.

``compare DIR`` (run on the revision after it): each model is built again the same way, (1) the saved weights are
loaded and the outputs on the saved images are compared with the saved ones, and (2) the fit is repeated with the
same seed and its weights and outputs are compared too (CPU training is bit-reproducible on one machine, not across
CPU models). Prints one table; exit code 1 when a loaded model's outputs differ by more than ``--atol``.

    python benchmarks/refactor_parity.py save /tmp/parity_before
    python benchmarks/refactor_parity.py compare /tmp/parity_before --out benchmarks/results/refactor_parity.md
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


SAVED_STEPS = {"GRNR": 1, "DADF": 4, "AGPNet": 2, "AMINet": 2, "GLCF": 2, "InpFormerPP": 2, "NAFRAD": 2, "SCLVI": 2}
"""Training steps of the baseline saved before the vocabulary work (the contract test's counts of that time)."""


def fit(name: str, work: Path) -> tuple[object, list]:
    """The contract test's model ``name`` after its short fit (seed 0), and four test images at its input size."""
    import anomalib.models as am
    import torch
    from anomalib.data.utils import read_image
    from lightning.pytorch import seed_everything
    from tests.conftest import cpu_engine, folder_datamodule, write_textured_category
    from tests.test_contract import CONTRACT_KWARGS
    from torch.nn.functional import interpolate

    kwargs, size, _ = CONTRACT_KWARGS[name]
    steps = SAVED_STEPS.get(name, 3)
    seed_everything(0, workers=True)
    model = getattr(am, name)(**kwargs)
    root = write_textured_category(work / "stripes", size=size, defect=max(8, size // 5))
    engine = cpu_engine(work / "run", max_steps=steps)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        engine.fit(model, datamodule=folder_datamodule(root))
    paths = sorted((root / "test" / "defect").glob("*.png"))[:2] + sorted((root / "test" / "good").glob("*.png"))[:2]
    images = [
        interpolate(read_image(p, as_tensor=True).unsqueeze(0), size=(size, size), mode="bilinear") for p in paths
    ]
    model.eval()
    return model, [torch.cat(images)]


def outputs(model: object, images: list) -> tuple:
    """``(pred_score, anomaly_map)`` of the whole module (pre-processing, model, post-processing), then the raw
    ``pred_score`` and ``anomaly_map`` of the torch model (before the post-processor's normalisation and clipping)."""
    import torch

    with torch.no_grad():
        out = model(images[0])
        raw = model.model(model.pre_processor(images[0]) if model.pre_processor else images[0])
    return tuple(t.detach().clone() for t in (out.pred_score, out.anomaly_map, raw.pred_score, raw.anomaly_map))


def models() -> list[str]:
    from tests.test_contract import CONTRACT_KWARGS, REGISTERED

    return [n for n in REGISTERED if n in CONTRACT_KWARGS]


def save(folder: Path, names: list[str]) -> None:
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        with tempfile.TemporaryDirectory() as work:
            model, images = fit(name, Path(work))
            score, amap, raw_score, raw_map = outputs(model, images)
        torch.save(
            {
                "state_dict": model.state_dict(),
                "images": images[0],
                "pred_score": score,
                "anomaly_map": amap,
                "raw_score": raw_score,
                "raw_map": raw_map,
            },
            folder / f"{name}.pt",
        )
        print(f"{name}: saved (score {score.tolist()})", flush=True)


def _max_diff(a, b) -> float:
    return float((a.double() - b.double()).abs().max()) if a.shape == b.shape else float("inf")


def compare(folder: Path, names: list[str], atol: float) -> list[dict]:
    import torch

    rows = []
    for name in names:
        saved = torch.load(folder / f"{name}.pt", weights_only=True)
        with tempfile.TemporaryDirectory() as work:
            refit, images = fit(name, Path(work))
            images = [saved["images"]]
            refit_score, refit_map, refit_raw_score, _ = outputs(refit, images)
            refit_state = refit.state_dict()
            missing, unexpected = refit.load_state_dict(saved["state_dict"], strict=False)
            score, amap, raw_score, raw_map = outputs(refit, images)
        weight_diff = max(
            (
                _max_diff(refit_state[k], v)
                for k, v in saved["state_dict"].items()
                if k in refit_state and v.is_floating_point()
            ),
            default=0.0,
        )
        rows.append(
            {
                "model": name,
                "loaded: score diff": _max_diff(score, saved["pred_score"]),
                "loaded: map diff": _max_diff(amap, saved["anomaly_map"]),
                "loaded: raw score diff": _max_diff(raw_score, saved["raw_score"]),
                "loaded: raw map diff": _max_diff(raw_map, saved["raw_map"]),
                "keys missing / unexpected": f"{len(missing)} / {len(unexpected)}",
                "refit: weight diff": weight_diff,
                "refit: score diff": _max_diff(refit_score, saved["pred_score"]),
                "refit: map diff": _max_diff(refit_map, saved["anomaly_map"]),
                "refit: raw score diff": _max_diff(refit_raw_score, saved["raw_score"]),
            }
        )
        print(rows[-1], flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["save", "compare"])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--models", nargs="*", default=None)
    parser.add_argument("--atol", type=float, default=1e-6)
    parser.add_argument("--out", type=Path, default=None, help="results file (markdown) for compare")
    args = parser.parse_args(argv)
    import tests.conftest  # noqa: F401 - isolates the hub caches, as in the tests, before anything imports the hub
    import torch

    torch.set_num_threads(1)
    names = args.models or models()
    if args.mode == "save":
        save(args.folder, names)
        return 0
    rows = compare(args.folder, names, args.atol)
    from harness import machine_info, markdown_table, result_preamble

    header = {
        "name": "refactor_parity",
        "command": "python " + " ".join([str(Path(sys.argv[0])), *sys.argv[1:]]),
        "machine": machine_info(),
    }
    columns = list(rows[0])
    fmt = lambda row, col: f"{row[col]:.2e}" if isinstance(row[col], float) else str(row[col])  # noqa: E731
    text = "\n".join([*result_preamble(header), "", *markdown_table(columns, rows, fmt), ""])
    print(text)
    if args.out is not None:
        args.out.write_text(text)
    loaded = [c for c in columns if c.startswith("loaded:") and "diff" in c]
    bad = [r["model"] for r in rows if max(r[c] for c in loaded) > args.atol]
    if bad:
        print(f"outputs differ beyond {args.atol}: {bad}")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
