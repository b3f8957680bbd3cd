"""Checkpoint loading: offline restoring, and one clear error when a checkpoint does not fit the model.

* :func:`restoring_from_checkpoint` / :func:`is_restoring_from_checkpoint`: the one "a checkpoint is about to be
  loaded" flag; backbones skip fetching pretrained weights and constructors skip checks of training data under it.
* :func:`check_checkpoint_matches`: a checkpoint of another model, or of settings that give other tensor shapes, is
  refused with the settings that differ instead of Lightning's list of missing/unexpected keys.
* :func:`align_evaluator_state`: metric buffers of the evaluator are not model state.

:class:`~anomalib_recon.components.module.ReconModuleMixin` calls these from ``load_from_checkpoint`` and the
Lightning checkpoint hooks.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar
from pathlib import Path

_RESTORING: ContextVar[bool] = ContextVar("anomalib_recon_restoring_checkpoint", default=False)


@contextlib.contextmanager
def restoring_from_checkpoint() -> Iterator[None]:
    """Build backbones without fetching pretrained weights: a checkpoint is about to overwrite them.

    A checkpoint holds every backbone tensor, so loading one offline must not need the hub.
    """
    token = _RESTORING.set(True)
    try:
        yield
    finally:
        _RESTORING.reset(token)


def is_restoring_from_checkpoint() -> bool:
    """Whether a model is being built inside :func:`restoring_from_checkpoint` (the one "loading" flag).

    Constructors use it to skip what a checkpoint makes unnecessary: fetching weights, checking training-data folders.
    """
    return _RESTORING.get()


class CheckpointMismatchError(ValueError):
    """A checkpoint was trained with another model, or with settings that give other tensor shapes."""


def _plain(value: object) -> object:
    """Hyper-parameter values as comparable plain data (tuples as lists, modules/objects as their class name)."""
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return type(value).__name__


def looks_unreadable(error: BaseException) -> bool:
    """Whether ``torch.load`` failed because the file is not a checkpoint at all (garbage, truncated, not a zip)."""
    text = str(error)
    return isinstance(error, EOFError) or any(
        marker in text
        for marker in ("weights_only", "Unpickl", "invalid load key", "PytorchStreamReader", "zip archive", "magic")
    )


def check_checkpoint_file(path: str | Path, model_name: str = "the model") -> None:
    """Open ``path`` with torch's safe loader (memory-mapped, nothing read into memory) so a missing, garbage or
    truncated file is one :class:`CheckpointMismatchError` naming it, before Lightning's loader fails deep inside."""
    import torch

    file = Path(path).expanduser()
    if not file.is_file():
        msg = f"checkpoint {str(path)!r} does not exist. Pass the .ckpt that anomalib train / Engine.fit wrote."
        raise CheckpointMismatchError(msg)
    try:
        try:
            checkpoint = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as error:  # a legacy (non-zip) torch.save file cannot be memory-mapped
            if "mmap" not in str(error):
                raise
            checkpoint = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as error:  # every reason ends in the same message
        reason = str(error).splitlines()[0][:200] if str(error) else type(error).__name__
        msg = (
            f"{str(path)!r} is not a readable checkpoint of {model_name} ({type(error).__name__}: {reason}). A valid "
            "file is the .ckpt that anomalib train / Engine.fit wrote for this model; re-train or re-copy it."
        )
        raise CheckpointMismatchError(msg) from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        msg = (
            f"{str(path)!r} holds no Lightning checkpoint (no 'state_dict'); pass the .ckpt that anomalib train / "
            "Engine.fit wrote, not a weights file (backbone weights go to --model.weights)."
        )
        raise CheckpointMismatchError(msg)


def align_evaluator_state(model: object, checkpoint: dict) -> None:
    """Make the checkpoint's ``evaluator.*`` entries those of ``model``'s evaluator (metric settings, not weights)."""
    state = checkpoint.get("state_dict")
    if not state:
        return
    own = {k: v for k, v in model.state_dict().items() if k.startswith("evaluator.")}  # type: ignore[attr-defined]
    for key in [k for k in state if k.startswith("evaluator.") and k not in own]:
        del state[key]
    for key, value in own.items():
        state.setdefault(key, value)


def check_checkpoint_matches(model: object, checkpoint: dict) -> None:
    """Raise :class:`CheckpointMismatchError` if ``checkpoint`` cannot load into ``model``.

    Another model class always fails. Settings may differ freely as long as every tensor has a counterpart of the
    same shape (a learning rate, say); a missing, unexpected or re-shaped parameter or buffer fails with the
    settings that differ. Buffers a model re-sizes on load (memory banks) are the model's own business: it lists
    their names in ``resizable_buffers``.
    """
    recorded = checkpoint.get("anomalib_recon") or {}
    name = type(model).__name__
    trained_with = recorded.get("model")
    state = checkpoint.get("state_dict") or {}
    if trained_with is not None and trained_with != name:
        msg = (
            f"This checkpoint was trained with {trained_with}, not {name}. Pass the checkpoint to the model it was "
            f"trained with (e.g. --model {trained_with})."
        )
        raise CheckpointMismatchError(msg)
    own = model.state_dict()  # type: ignore[attr-defined]
    resizable = tuple(getattr(model, "resizable_buffers", ()))
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    reshaped = sorted(
        key
        for key in set(own) & set(state)
        if hasattr(state[key], "shape")
        and tuple(state[key].shape) != tuple(own[key].shape)
        and key.split(".")[-1] not in resizable
    )
    if not (missing or unexpected or reshaped):
        return
    theirs = {k: _plain(v) for k, v in (checkpoint.get("hyper_parameters") or {}).items()}
    ours = {k: _plain(v) for k, v in dict(getattr(model, "hparams", {})).items()}
    if recorded.get("input_size") is not None:
        theirs["input_size"] = recorded["input_size"]
        size = getattr(model, "input_size", None)
        ours["input_size"] = [int(s) for s in size] if size is not None else None
    differ = {k: (theirs.get(k), ours.get(k)) for k in sorted(set(theirs) | set(ours)) if theirs.get(k) != ours.get(k)}
    settings = ", ".join(f"{k}={a!r} (this model: {b!r})" for k, (a, b) in differ.items()) or "unknown settings"
    examples = [*(f"missing {k}" for k in missing[:2]), *(f"unexpected {k}" for k in unexpected[:2])]
    examples += [f"{k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in reshaped[:2]]
    header = (
        f"This {name} checkpoint was trained with other settings: {settings}."
        if recorded
        else f"This checkpoint was not written by {name} (it records no anomalib-recon model: another model's "
        f"checkpoint, or an older anomalib-recon's); settings that differ: {settings}."
    )
    msg = (
        f"{header} Its tensors do not fit this model "
        f"({len(missing)} missing, {len(unexpected)} unexpected, {len(reshaped)} of another shape; e.g. "
        f"{'; '.join(examples)}). Build the model with the checkpoint's settings (the same --model.* arguments or "
        f"config as for training), or use {name}.load_from_checkpoint(path), which takes them from the checkpoint."
    )
    raise CheckpointMismatchError(msg)
