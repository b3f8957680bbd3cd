"""Deployment helpers: OpenVINO at fp32 unless a lower precision is asked for.

OpenVINO's CPU plugin runs in bf16 by default on processors with AVX-512 BF16 / AMX (``ov.Core().get_property(
"CPU", "INFERENCE_PRECISION_HINT")`` is ``bfloat16`` there), which moves our normalised scores by 1e-2 and more.
The precision cannot be stored in the IR (an ``INFERENCE_PRECISION_HINT`` in the model's ``rt_info`` and per-node
``disable_fp16_compression`` marks are both ignored by the CPU plugin); only the compile-time config restores
fp32. So every place that compiles one of our models passes :data:`FP32_CONFIG`, and users of anomalib's own
inferencer do the same in one line::

    from anomalib.deploy import OpenVINOInferencer
    inferencer = OpenVINOInferencer(path="model.xml", device="CPU", config={"INFERENCE_PRECISION_HINT": "f32"})

or use :class:`OpenVINOInferencer` from this module, which is anomalib's with fp32 as its default.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from anomalib.deploy import OpenVINOInferencer as _AnomalibOpenVINOInferencer

__all__ = ["FP32_CONFIG", "OpenVINOInferencer", "compile_openvino", "openvino_config"]

FP32_CONFIG: dict[str, str] = {"INFERENCE_PRECISION_HINT": "f32"}
_PRECISIONS = {"f32": "f32", "fp32": "f32", "bf16": "bf16", "f16": "f16", "fp16": "f16"}


def openvino_config(precision: str = "f32", config: dict[str, Any] | None = None) -> dict[str, Any]:
    """Compile-time config with ``INFERENCE_PRECISION_HINT`` set to ``precision`` (``"f32"``, ``"bf16"``, ``"f16"``).

    ``config`` entries are kept, except that an explicit ``INFERENCE_PRECISION_HINT`` in it wins over ``precision``.
    """
    key = precision.lower()
    if key not in _PRECISIONS:
        msg = f"precision must be one of {sorted(set(_PRECISIONS))}, got {precision!r}."
        raise ValueError(msg)
    return {"INFERENCE_PRECISION_HINT": _PRECISIONS[key], **(config or {})}


def compile_openvino(
    model: str | os.PathLike | Any,
    device: str = "CPU",
    precision: str = "f32",
    config: dict[str, Any] | None = None,
) -> Any:
    """Compile an IR (``.xml``), an ONNX file or an ``ov.Model`` with the given inference precision (fp32 default)."""
    import openvino as ov

    core = ov.Core()
    if isinstance(model, str | os.PathLike):
        model = core.read_model(str(Path(model)))
    return core.compile_model(model, device, openvino_config(precision, config))


class OpenVINOInferencer(_AnomalibOpenVINOInferencer):
    """anomalib's ``OpenVINOInferencer`` that compiles at fp32 and writes no model cache unless ``config`` says so.

    Identical to ``anomalib.deploy.OpenVINOInferencer`` otherwise (same arguments, same ``predict``). Pass
    ``config={"INFERENCE_PRECISION_HINT": "bf16"}`` for bf16 on CPUs that support it (faster, with the score
    error each model README records).

    anomalib's inferencer caches every compiled model in ``./openvino_cache`` of the working directory, a blob as
    large as the model's constants (GBs for a large feature bank), never cleaned up. Here the cache is
    off by default; ``config={"CACHE_DIR": "some/folder"}`` turns it on (faster recompiles of the same IR).
    """

    def __init__(
        self,
        path: str | Path | tuple[bytes, bytes],
        device: str | None = "AUTO",
        config: dict | None = None,
    ) -> None:
        config = {"CACHE_DIR": "", **(config or {})}
        cache_folder = Path("openvino_cache")  # anomalib creates it whatever the config says
        existed = cache_folder.exists()
        try:
            super().__init__(path=path, device=device, config=openvino_config("f32", config))
        finally:
            if not existed and cache_folder.is_dir() and not any(cache_folder.iterdir()):
                cache_folder.rmdir()
