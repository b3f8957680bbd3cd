"""Is the default GRNR (``prior_source="image"``, the paper's zero-shot method) unchanged, bit for bit?

``save DIR`` (run on the revision before a change): for each case below the default GRNR is built with fixed seeds,
and it records the raw torch-model outputs (``model.model``: ``pred_score``, ``anomaly_map``), the Lightning module's
direct-call outputs (pre-processor + model + the uncalibrated post-processor), the outputs after an ``Engine``
validation on a generated category (calibrated, normalised), the ONNX Runtime outputs of the exported calibrated
graph, the state-dict keys and shapes, and the learning type, trainer arguments and ``requires_training``.

``compare DIR`` (run on the revision after it) builds the same models and reports, per case and output, whether the
tensors are identical (``torch.equal``) and their largest absolute difference; exit code 1 unless all are identical.
Cases: the contract test's 64-px Lite0 model (K = 8), 128 px (λ = 5 and 0, K = 40), unchunked and odd-chunked
distances, 256 px, and WideResNet-50 with random weights (C = 512/1024) at 128 px; inputs are generated stripes and,
when present, Magnetic Tile test images (``--data-root``). Same machine for both runs: CPU float results are
bit-reproducible only on one CPU model.

    python benchmarks/grnr_default_identity.py save /tmp/grnr_identity_before
    python benchmarks/grnr_default_identity.py compare /tmp/grnr_identity_before --name default_identity
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
import warnings
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(BENCH))

import tests.conftest  # noqa: E402, F401 - isolates the hub caches (as in the tests) before anything imports the hub

import harness  # noqa: E402

LITE0 = {"backbone": "tf_efficientnet_lite0", "weights": "imagenet"}
CASES: dict[str, tuple[dict, int]] = {
    "contract_64_K8": ({**LITE0, "image_size": 64, "num_global_priors": 8}, 64),
    "lite0_128_lam5_K40": ({**LITE0, "image_size": 128}, 128),
    "lite0_128_lam0": ({**LITE0, "image_size": 128, "lam": 0.0}, 128),
    "lite0_128_unchunked": ({**LITE0, "image_size": 128, "distance_chunk": None}, 128),
    "lite0_128_chunk37_K20_lam0.7": ({**LITE0, "image_size": 128, "distance_chunk": 37, "num_global_priors": 20}, 128),
    "lite0_256": ({**LITE0, "image_size": 256}, 256),
    "wrn50_random_128": ({"backbone": "wide_resnet50_2.tv_in1k", "weights": None, "image_size": 128}, 128),
}
"""name -> (GRNR arguments, input size). ``lam`` is 5 (the default) unless given; the chunk-37 case uses λ = 0.7."""
CASES["lite0_128_chunk37_K20_lam0.7"][0]["lam"] = 0.7


def images(size: int, data_root: Path | None, work: Path) -> tuple[torch.Tensor, Path]:
    """Raw images in [0, 1] at ``size``: 4 generated stripes (2 with a defect) and up to 4 Magnetic Tile test images."""
    from anomalib.data.utils import read_image
    from tests.conftest import write_textured_category
    from torch.nn.functional import interpolate

    root = write_textured_category(work / f"stripes_{size}", size=size, defect=max(8, size // 5))
    paths = sorted((root / "test" / "defect").glob("*.png"))[:2] + sorted((root / "test" / "good").glob("*.png"))[:2]
    if data_root is not None and (data_root / "test").is_dir():
        for cls in ("crack", "good", "blowhole", "uneven"):
            paths += sorted((data_root / "test" / cls).glob("*.jpg"))[:1]
    batch = [
        interpolate(read_image(p, as_tensor=True).unsqueeze(0), size=(size, size), mode="bilinear", align_corners=False)
        for p in paths
    ]
    return torch.cat(batch), root


def record(name: str, data_root: Path | None, work: Path) -> dict[str, object]:
    """Every output of case ``name`` (module docstring)."""
    from anomalib.engine import Engine
    from lightning.pytorch import seed_everything
    from tests.conftest import folder_datamodule

    from anomalib_recon.models import GRNR

    kwargs, size = CASES[name]
    seed_everything(0, workers=True)
    model = GRNR(**kwargs).eval()
    x, root = images(size, data_root, work)
    out: dict[str, object] = {}
    with torch.no_grad():
        raw = model.model(model.pre_processor.transform(x))
        out["raw_score"], out["raw_map"] = raw.pred_score.clone(), raw.anomaly_map.clone()
        direct = model(x)
        out["direct_score"], out["direct_map"] = direct.pred_score.clone(), direct.anomaly_map.clone()
    out["state_keys"] = [(k, list(v.shape)) for k, v in model.state_dict().items()]
    out["meta"] = {
        "learning_type": str(model.learning_type),
        "trainer_arguments": model.trainer_arguments,
        "requires_training": bool(model.requires_training),
    }
    if size <= 128 and "wrn50" not in name:  # calibrated outputs and the exported graph (cheap sizes)
        engine = Engine(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, default_root_dir=work)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            engine.validate(model, datamodule=folder_datamodule(root))
        model.eval()
        with torch.no_grad():
            calibrated = model(x)
        out["calibrated_score"], out["calibrated_map"] = calibrated.pred_score.clone(), calibrated.anomaly_map.clone()
        out["post_processor"] = {k: v.clone() for k, v in model.post_processor.state_dict().items()}
        try:
            import onnxruntime as ort
        except ImportError:
            ort = None
        if ort is not None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                onnx_file = model.to_onnx(work / f"onnx_{name}", input_size=(size, size))
            session = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
            names = [o.name for o in session.get_outputs()]
            result = dict(zip(names, session.run(None, {session.get_inputs()[0].name: x.numpy()}), strict=True))
            out["onnx_score"] = torch.from_numpy(result["pred_score"]).clone()
            out["onnx_map"] = torch.from_numpy(result["anomaly_map"]).clone()
    return out


def _diff(a: object, b: object) -> tuple[bool, float | None]:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        if a.shape != b.shape:
            return False, float("inf")
        same = torch.equal(a, b) or (
            torch.isnan(a).equal(torch.isnan(b)) and torch.equal(a.nan_to_num(), b.nan_to_num())
        )
        return same, float((a.double() - b.double()).abs().max()) if a.numel() else 0.0
    if isinstance(a, dict) and isinstance(b, dict):
        results = [_diff(a.get(k), b.get(k)) for k in sorted(set(a) | set(b))]
        worst = max((d for _, d in results if d is not None), default=None)
        return all(s for s, _ in results) and set(a) == set(b), worst
    return a == b, None


def save(folder: Path, data_root: Path | None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        for name in CASES:
            torch.save(record(name, data_root, Path(tmp) / name), folder / f"{name}.pt")
            print(f"saved {name}")


def compare(folder: Path, data_root: Path | None) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in CASES:
            before = torch.load(folder / f"{name}.pt", weights_only=False)
            after = record(name, data_root, Path(tmp) / name)
            for key in sorted(set(before) | set(after)):
                same, diff = _diff(before.get(key), after.get(key))
                rows.append({"case": name, "output": key, "identical": same, "max_abs_diff": diff})
                print(f"{name:32s} {key:18s} {'identical' if same else 'DIFFERENT'} {diff}")
    return rows


def to_markdown(rows: list[dict], header: dict) -> str:
    lines = [*harness.result_preamble(header), "", header["note"], ""]
    lines += ["| case | output | identical (torch.equal) | max abs diff |", "|---|---|---|---|"]
    for r in rows:
        diff = "" if r["max_abs_diff"] is None else f"{r['max_abs_diff']:.3g}"
        lines.append(f"| {r['case']} | {r['output']} | {'yes' if r['identical'] else '**no**'} | {diff} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=["save", "compare"])
    p.add_argument("folder", type=Path)
    p.add_argument("--data-root", default=str(harness.DEFAULT_MT_ROOT), help="Magnetic Tile ('' to skip)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--name", default=None, help="compare: write results/grnr_<name>.md/.json")
    p.add_argument("--results-dir", default=str(harness.RESULTS))
    p.add_argument("--note", default="")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    data_root = Path(args.data_root) if args.data_root else None
    if args.mode == "save":
        save(args.folder, data_root)
        return 0
    rows = compare(args.folder, data_root)
    if args.name:
        header = {
            "name": f"grnr_{args.name}",
            "command": "python " + shlex.join(["benchmarks/grnr_default_identity.py", *(argv or sys.argv[1:])]),
            "machine": harness.machine_info(),
            "note": args.note
            or "Default GRNR (prior_source='image') before vs after, same machine, same seeds: every output compared "
            "with torch.equal.",
        }
        out = Path(args.results_dir)
        (out / f"{header['name']}.json").write_text(json.dumps({**header, "rows": rows}, indent=1, default=str))
        (out / f"{header['name']}.md").write_text(to_markdown(rows, header))
    return 0 if all(r["identical"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
