"""Deployment helpers: fp32 by default, the precision a user names otherwise, and no stray OpenVINO model cache."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from anomalib_recon.deploy import FP32_CONFIG, OpenVINOInferencer, compile_openvino, openvino_config


def test_openvino_config_precisions_and_explicit_hint_wins() -> None:
    assert openvino_config() == FP32_CONFIG
    assert openvino_config("BF16")["INFERENCE_PRECISION_HINT"] == "bf16"
    assert openvino_config("fp16")["INFERENCE_PRECISION_HINT"] == "f16"
    config = openvino_config("f32", {"INFERENCE_PRECISION_HINT": "bf16", "NUM_STREAMS": "1"})
    assert config == {"INFERENCE_PRECISION_HINT": "bf16", "NUM_STREAMS": "1"}
    with pytest.raises(ValueError, match="precision must be one of"):
        openvino_config("int8")


def _tiny_ir(folder: Path) -> Path:
    """A 1x3x32x32 image -> (score, map) IR: a weighted channel sum and its maximum."""
    ov = pytest.importorskip("openvino")
    from openvino import opset13 as ops

    image = ops.parameter([1, 3, 32, 32], np.float32, name="input")
    weight = ops.constant(np.array([0.2, -0.5, 0.9], np.float32).reshape(1, 3, 1, 1))
    amap = ops.reduce_sum(ops.multiply(image, weight), [1], keep_dims=True)
    score = ops.reduce_max(amap, [1, 2, 3], keep_dims=False)
    model = ov.Model([score, amap], [image], "tiny")
    path = folder / "model.xml"
    ov.save_model(model, path, compress_to_fp16=False)
    return path


def test_inferencer_is_fp32_and_leaves_no_cache_by_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    xml = _tiny_ir(tmp_path)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    inferencer = OpenVINOInferencer(path=xml, device="CPU")
    assert inferencer.config["INFERENCE_PRECISION_HINT"] == "f32"
    assert not (work / "openvino_cache").exists()  # anomalib's own inferencer leaves a blob per model here
    assert os.listdir(work) == []

    # the cache where a user asks for it, and a folder of their own left alone
    cache = tmp_path / "cache"
    OpenVINOInferencer(path=xml, device="CPU", config={"CACHE_DIR": str(cache)})
    assert [p.suffix for p in cache.iterdir()] == [".blob"]
    (work / "openvino_cache").mkdir()
    OpenVINOInferencer(path=xml, device="CPU")
    assert (work / "openvino_cache").is_dir()


def test_compile_openvino_agrees_with_the_inferencer_at_fp32(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    xml = _tiny_ir(tmp_path)
    monkeypatch.chdir(tmp_path)
    image = np.random.default_rng(1).random((1, 3, 32, 32), dtype=np.float32)
    compiled = compile_openvino(xml)
    direct = compiled(image)
    assert compiled.get_property("INFERENCE_PRECISION_HINT").to_string() == "f32"
    inferencer = OpenVINOInferencer(path=xml, device="CPU")
    via = inferencer.model(image)
    np.testing.assert_allclose(via[1], direct[1], rtol=0, atol=0)
