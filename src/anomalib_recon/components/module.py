"""The rails every anomalib-recon model stands on: ``class Model(ReconModuleMixin, AnomalibModule)``.

A model gets, by construction:

* **checkpoints** that load offline with anomalib's safe loader, record the model class, input size and whether the
  model was trained, and refuse another model's checkpoint or other settings with one message naming them
  (:mod:`~anomalib_recon.components.checkpoint`);
* **its inputs checked** before the pre-processor, at every stage and in direct calls (:func:`check_images`);
* **nothing non-finite reaching a metric**: a NaN/inf training loss stops training naming the likely causes; a
  NaN/inf score or map at validation, test or predict raises, naming the checkpoint; so does a direct call;
* **no metrics from an untrained model**: ``test``/``predict``/``validate`` of a model that needs training and was
  neither trained nor loaded from a checkpoint is refused (zero-shot models excepted);
* **a final validation after ``max_steps``**: when the step budget ends mid-epoch, training stops through
  ``trainer.should_stop``, so Lightning validates the final weights and the post-processor's thresholds and
  normalisation come from them, not from the last epoch boundary;
* **export sizes checked** before anomalib's ONNX/OpenVINO export, and no autograd recorded while exporting;
* **frozen parts named, not warned about**: a frozen backbone stays in eval mode on purpose; Lightning's
  "module(s) in eval mode at the start of training" warning is replaced by one INFO line naming them, and stays a
  warning for any eval-mode module that still trains (:func:`frozen_eval_modules`);
* **only the metrics the data can give**: without masks, pixel metrics are skipped with one INFO line instead of
  torchmetrics' "compute called before update" warnings (:mod:`~anomalib_recon.components.evaluation`).

The checks live in :class:`ModelGuard`, a callback the mixin puts first among the model's callbacks, so it runs
before anomalib's pre-processor, post-processor, evaluator and visualizer, and whatever hooks a model overrides.
"""

from __future__ import annotations

import logging
import os
import pickle
import warnings
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from anomalib import LearningType
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.trainer.states import TrainerFn

from .checkpoint import (
    CheckpointMismatchError,
    align_evaluator_state,
    check_checkpoint_matches,
    looks_unreadable,
    restoring_from_checkpoint,
)
from .evaluation import SkipUnavailableMetrics
from .guards import NonFiniteError, UntrainedModelError, check_finite, check_images, nonfinite_parameters
from .preprocessing import as_image_size, resize_pre_processor
from .tracing import is_tracing

if TYPE_CHECKING:
    from anomalib.pre_processing import PreProcessor

logger = logging.getLogger(__name__)


def _images(batch: Any) -> Any:
    return batch if isinstance(batch, torch.Tensor) else getattr(batch, "image", None)


class ModelGuard(Callback):
    """Input, loss and output checks, the untrained-model refusal and the final validation (see module docstring)."""

    def __init__(self) -> None:
        self._last_validation_step: int | None = None
        self._eval_mode_quiet: warnings.catch_warnings | None = None

    # ---------------------------------------------------------------------------------------------- frozen parts
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Name the frozen eval-mode parts once, instead of Lightning's warning, when they are all that is in eval
        mode (the filter lives until ``on_train_start``, right after Lightning's check)."""
        del trainer
        frozen = frozen_eval_modules(pl_module)
        if not frozen:
            return
        logger.info("%s: frozen, kept in eval mode while training: %s.", type(pl_module).__name__, ", ".join(frozen))
        self._eval_mode_quiet = warnings.catch_warnings()
        self._eval_mode_quiet.__enter__()
        warnings.filterwarnings("ignore", message=_EVAL_MODE_WARNING)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Lightning has checked the modes: the warning filters are restored for whatever comes next."""
        del trainer, pl_module
        self._restore_warnings()

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        """A fit that fails before training starts restores the warning filters too."""
        del trainer, pl_module, exception
        self._restore_warnings()

    def _restore_warnings(self) -> None:
        if self._eval_mode_quiet is not None:
            self._eval_mode_quiet.__exit__(None, None, None)
            self._eval_mode_quiet = None

    # ---------------------------------------------------------------------------------------------- inputs
    @staticmethod
    def _check_batch(pl_module: LightningModule, batch: Any) -> None:
        images = _images(batch)
        if images is not None:
            check_images(images, type(pl_module).__name__)

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        """Raw training images are checked before the pre-processor."""
        del trainer, batch_idx
        self._check_batch(pl_module, batch)

    def on_validation_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        """Raw validation images are checked before the pre-processor."""
        del trainer, batch_idx, dataloader_idx
        self._check_batch(pl_module, batch)

    def on_test_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        """Raw test images are checked before the pre-processor."""
        del trainer, batch_idx, dataloader_idx
        self._check_batch(pl_module, batch)

    def on_predict_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        """Raw images to predict are checked before the pre-processor."""
        del trainer, batch_idx, dataloader_idx
        self._check_batch(pl_module, batch)

    # ---------------------------------------------------------------------------------------------- training
    def on_before_backward(self, trainer: Trainer, pl_module: LightningModule, loss: torch.Tensor) -> None:
        """A non-finite loss stops training with the likely causes."""
        name = type(pl_module).__name__
        if is_tracing() or bool(torch.isfinite(loss.detach()).all()):
            return
        bad = _nonfinite_weights(pl_module)
        causes = (
            f"weights {bad} are already non-finite (a corrupt weights file or checkpoint, or an earlier step diverged)"
            if bad
            else "the learning rate is too high for this model and data"
        )
        rates = {
            name: value
            for name, value in sorted(vars(pl_module).items())
            if (name == "lr" or name.endswith("_lr")) and isinstance(value, int | float)
        }
        settings = f" ({', '.join(f'{k}={v}' for k, v in rates.items())})" if rates else ""
        msg = (
            f"{name}: the training loss is {float(loss.detach().reshape(-1)[0])} at step {trainer.global_step} "
            f"(epoch {trainer.current_epoch}). Likely cause: {causes}{settings}. Lower the learning rate, or check "
            "the backbone weights and the training images; nothing was saved from this step."
        )
        raise NonFiniteError(msg)

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Mark the model trained; stop through ``should_stop`` at ``max_steps`` so the final weights are validated."""
        del outputs, batch, batch_idx
        if trainer.global_step > 0:
            pl_module._recon_trained = True
        max_steps = trainer.max_steps
        if max_steps is not None and max_steps > 0 and trainer.global_step >= max_steps:
            trainer.should_stop = True

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Remember at which step the last validation inside ``fit`` ran."""
        del pl_module
        if trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking:
            self._last_validation_step = trainer.global_step

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Warn when the post-processor's statistics come from weights older than the final ones."""
        last = self._last_validation_step
        if trainer.enable_validation and trainer.global_step > 0 and last is not None and last != trainer.global_step:
            logger.warning(
                "%s: the last validation ran at step %d, training ended at step %d (check_val_every_n_epoch skipped "
                "the last epoch): thresholds and normalisation come from older weights. Run `anomalib validate` / "
                "Engine.validate before testing, or let max_steps end in a validation epoch.",
                type(pl_module).__name__,
                last,
                trainer.global_step,
            )

    # ---------------------------------------------------------------------------------------------- evaluation
    def _refuse_untrained(self, trainer: Trainer, pl_module: LightningModule, what: str) -> None:
        if trainer.state.fn == TrainerFn.FITTING or not getattr(pl_module, "requires_training", True):
            return
        if getattr(pl_module, "_recon_trained", False):
            return
        name = type(pl_module).__name__
        msg = (
            f"{name} has not been trained: {what} would score a randomly initialised model. Pass the checkpoint of a "
            f"trained model (anomalib {what} --ckpt_path <model.ckpt>, Engine.{what}(model, ckpt_path=...)), or "
            "train it first (anomalib train / Engine.fit)."
        )
        raise UntrainedModelError(msg)

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Refuse to validate an untrained model outside ``fit``."""
        self._refuse_untrained(trainer, pl_module, "validate")

    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Refuse to test an untrained model."""
        self._refuse_untrained(trainer, pl_module, "test")

    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Refuse to predict with an untrained model."""
        self._refuse_untrained(trainer, pl_module, "predict")

    @staticmethod
    def _check_outputs(trainer: Trainer, pl_module: LightningModule, outputs: Any, stage: str) -> None:
        scores = getattr(outputs, "pred_score", None)
        maps = getattr(outputs, "anomaly_map", None)
        name = type(pl_module).__name__
        try:
            check_finite(name, f"a {stage} anomaly score or map", scores, maps)
        except NonFiniteError:
            bad = _nonfinite_weights(pl_module)
            source = f"checkpoint {str(trainer.ckpt_path)!r}" if trainer.ckpt_path else "the model's weights"
            cause = (
                f"{source} holds non-finite weights ({', '.join(bad)}): the file is corrupt or the training diverged "
                "(look for a NaN train_loss); retrain, with a lower learning rate if it diverged."
                if bad
                else f"the weights ({source}) are finite, so an input or a numerical edge case produced it; check "
                "the images of this batch."
            )
            msg = f"{name}: a {stage} anomaly score or map is NaN or inf; no metric is computed from it. {cause}"
            raise NonFiniteError(msg) from None

    def on_validation_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        """Non-finite validation scores or maps raise before the post-processor sees them."""
        del batch, batch_idx, dataloader_idx
        self._check_outputs(trainer, pl_module, outputs, "validation")

    def on_test_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        """Non-finite test scores or maps raise before the evaluator sees them."""
        del batch, batch_idx, dataloader_idx
        self._check_outputs(trainer, pl_module, outputs, "test")

    def on_predict_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        """Non-finite predicted scores or maps raise before the visualizer sees them."""
        del batch, batch_idx, dataloader_idx
        self._check_outputs(trainer, pl_module, outputs, "predict")


class ReconModuleMixin:
    """Put before ``AnomalibModule``: the shared checks and checkpoint handling of every model (module docstring).

    Attributes:
        requires_training: Whether test/predict are refused before training or loading (``False`` for zero-shot).
    """

    _recon_trained: bool = False
    default_image_size: ClassVar[tuple[int, int] | None] = None
    """The default pre-processor's size when ``image_size`` is ``None`` (each model sets its paper's; 256×256)."""

    # ---------------------------------------------------------------------------------------------- defaults
    # What most models share; a model overrides what differs (its own pre-processor, sanity checks, learning type).
    @classmethod
    def configure_pre_processor(cls, image_size: tuple[int, int] | None = None) -> PreProcessor:
        """Resize to ``image_size`` (the model's ``default_image_size``), then ImageNet ``Normalize``; no
        augmentation."""
        return resize_pre_processor(image_size or cls.default_image_size)

    def model_input_size(self, image_size: int | tuple[int, int] | None) -> tuple[int, int]:
        """The ``(H, W)`` the torch model is built for: the pre-processor's Resize (``self.input_size``, where the
        size lives); without one (``pre_processor=False`` or a custom pre-processor), ``image_size``; without either,
        the model's ``default_image_size``, with a warning (the model then expects inputs already at that size)."""
        size = self.input_size  # type: ignore[attr-defined]
        if size is None and image_size is None:
            size = self.default_image_size
            logger.warning(
                "%s: no Resize in the pre-processor and no image_size; building for %s inputs.",
                type(self).__name__,
                size,
            )
        return as_image_size(size if size is not None else image_size)

    @property
    def trainer_arguments(self) -> dict[str, Any]:
        """No sanity validation: a model's statistics, banks or thresholds do not exist before training."""
        return {"num_sanity_val_steps": 0}

    @property
    def learning_type(self) -> LearningType:
        """Trained on normal images only, one model per category."""
        return LearningType.ONE_CLASS

    def validation_step(self, batch: Any, *args, **kwargs) -> Any:
        """The torch model's inference on the batch's images → ``pred_score`` and ``anomaly_map`` (and whatever
        else its ``InferenceBatch`` holds) for the post-processor and metrics; test and predict use it too."""
        del args, kwargs
        return batch.update(**self.model(batch.image)._asdict())  # type: ignore[attr-defined]

    @property
    def input_normalization(self) -> str:
        """What the default pre-processor does after its Resize: ``"imagenet"`` (ImageNet mean/std ``Normalize``) or
        ``"none"`` (images stay in [0, 1]). A model's contract, listed in the README and tested for every model."""
        return "imagenet"

    @property
    def requires_training(self) -> bool:
        """Models that learn need training (or a checkpoint) before they score; zero-shot models do not."""
        return self.learning_type != LearningType.ZERO_SHOT  # type: ignore[attr-defined]

    # ---------------------------------------------------------------------------------------------- callbacks
    def configure_callbacks(self) -> list[Callback]:
        """:class:`ModelGuard` first, then :class:`SkipUnavailableMetrics`, then anomalib's pre-processor,
        post-processor, evaluator and visualizer."""
        callbacks = super().configure_callbacks()  # type: ignore[misc]
        callbacks = list(callbacks) if isinstance(callbacks, list | tuple) else [callbacks]
        return [ModelGuard(), SkipUnavailableMetrics(), *callbacks]

    # ---------------------------------------------------------------------------------------------- direct calls
    def forward(self, batch: torch.Tensor, *args, **kwargs) -> Any:
        """anomalib's forward (pre-processor, model, post-processor) with the input and output checks.

        The checks are skipped while exporting: exported graphs carry none.
        """
        if is_tracing():
            return super().forward(batch, *args, **kwargs)  # type: ignore[misc]
        name = type(self).__name__
        check_images(_images(batch), name)
        output = super().forward(batch, *args, **kwargs)  # type: ignore[misc]
        scores, maps = getattr(output, "pred_score", None), getattr(output, "anomaly_map", None)
        bad = _nonfinite_weights(self) if _has_nonfinite(scores, maps) else []
        hint = f"Non-finite weights: {', '.join(bad)} (a corrupt checkpoint or a diverged fit)." if bad else ""
        check_finite(name, "the anomaly score or map", scores, maps, hint=hint)
        return output

    # ---------------------------------------------------------------------------------------------- export
    def _check_export_size(self, input_size: Any) -> None:
        if input_size is not None:
            as_image_size(input_size, name="input_size")

    def to_onnx(self, export_root: Any, model_file_name: str = "model", input_size: Any = None, **kwargs: Any) -> Any:
        """anomalib's ONNX export, after checking ``input_size`` (positive ``(height, width)``), without autograd.

        anomalib runs an eager probe forward before exporting; with gradients on, that forward keeps every
        intermediate its output depends on for a backward that never comes. For a memory-bank search that is the
        whole query x bank distance matrix, block after block (SCLVI at the paper's bank: an estimated ~40 GB
        instead of ~3 GB). An exported graph is for inference: no gradient is recorded anywhere in the export.
        """
        self._check_export_size(input_size)
        with torch.no_grad():
            return super().to_onnx(export_root, model_file_name, input_size, **kwargs)  # type: ignore[misc]

    def to_openvino(
        self, export_root: Any, model_file_name: str = "model", input_size: Any = None, **kwargs: Any
    ) -> Any:
        """anomalib's OpenVINO export, after checking ``input_size`` (positive ``(height, width)``)."""
        self._check_export_size(input_size)
        return super().to_openvino(export_root, model_file_name, input_size, **kwargs)  # type: ignore[misc]

    # ---------------------------------------------------------------------------------------------- checkpoints
    @classmethod
    def load_from_checkpoint(cls, checkpoint_path: str | os.PathLike, *args, **kwargs) -> Any:
        """Lightning's ``load_from_checkpoint`` (anomalib's safe loader) without fetching pretrained weights."""
        try:
            with restoring_from_checkpoint():
                return super().load_from_checkpoint(checkpoint_path, *args, **kwargs)  # type: ignore[misc]
        except (pickle.UnpicklingError, EOFError, RuntimeError) as error:
            if not looks_unreadable(error):
                raise
            msg = (
                f"{str(checkpoint_path)!r} is not a readable {cls.__name__} checkpoint ({type(error).__name__}: "
                f"{str(error).splitlines()[0][:200]}). A valid file is the .ckpt that anomalib train / Engine.fit "
                "wrote for this model; re-train or re-copy it."
            )
            raise CheckpointMismatchError(msg) from None

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Also record the model class and its input size, so a mismatch can be named on load."""
        super().on_save_checkpoint(checkpoint)  # type: ignore[misc]
        size = getattr(self, "input_size", None)
        checkpoint["anomalib_recon"] = {
            "model": type(self).__name__,
            "input_size": [int(s) for s in size] if size is not None else None,
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Refuse a checkpoint of another model or of incompatible settings with one message, then load; a torch
        model with ``set_image_size`` is then re-targeted to the restored pre-processor's input size.

        The evaluator's metric buffers (e.g. AUPRO's ``fpr_limit``) are not model state: a checkpoint trained with
        another evaluator (the benchmark harness adds AUPRO) loads into a model built with this one's.
        """
        align_evaluator_state(self, checkpoint)
        check_checkpoint_matches(self, checkpoint)
        super().on_load_checkpoint(checkpoint)  # type: ignore[misc]
        self._recon_trained = True
        # Torch models with size-dependent caches (positions, partitions) follow the restored pre-processor's size.
        set_image_size = getattr(getattr(self, "model", None), "set_image_size", None)
        size = getattr(self, "input_size", None)
        if callable(set_image_size) and size is not None:
            set_image_size(tuple(size))

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        """``nn.Module.load_state_dict``; weights loaded from elsewhere count as a trained model."""
        result = super().load_state_dict(state_dict, strict=strict, assign=assign)  # type: ignore[misc]
        self._recon_trained = True
        return result


_EVAL_MODE_WARNING = r"Found \d+ module\(s\) in eval mode at the start of training"  # Lightning's fit loop


def frozen_eval_modules(module: torch.nn.Module) -> list[str]:
    """The outermost eval-mode submodules of a module in train mode, when each holds parameters and none of them
    trains (a frozen backbone); ``[]`` when anything else is in eval mode (a trainable part, or one without
    parameters such as a Dropout, left in eval by mistake), so that Lightning's warning stays."""
    if not module.training:
        return []
    outermost = []
    for name, child in module.named_modules():
        if child.training or any(name.startswith(f"{top}.") for top in outermost):
            continue
        params = list(child.parameters())
        if not params or any(p.requires_grad for p in params):
            return []
        outermost.append(name)
    return outermost


def _nonfinite_weights(module: Any) -> list[str]:
    """Non-finite parameters/buffers of the torch model (not of the pre/post-processors, whose unset statistics are
    infinite by design), named from the Lightning module (``model.<name>``)."""
    model = getattr(module, "model", None)
    if isinstance(model, torch.nn.Module):
        return [f"model.{name}" for name in nonfinite_parameters(model)]
    return nonfinite_parameters(module)


def _has_nonfinite(*tensors: Any) -> bool:
    return any(isinstance(t, torch.Tensor) and not bool(torch.isfinite(t).all()) for t in tensors)
