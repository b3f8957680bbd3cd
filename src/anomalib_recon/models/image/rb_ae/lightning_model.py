"""RB-AE / NDP-Net: reference-based autoencoder with normal-reference attention and defect segmentation.

Papers: *Reference-Based Autoencoder for Surface Defect Detection* (RB-AE, arXiv 2211.10060 v1) and *Normal
Reference Attention and Defective Feature Perception Network for Surface Defect Detection* (NDP-Net, the same arXiv
id, v2; Luo, Yao, Yu). No public code; the design is a re-design from the two abstracts (see the README).

Both training stages run inside one ``anomalib train``: stage 1 ("reconstruction") trains the encoder, the
reference-based attention modules and the decoder to reconstruct clean images from images with synthetic defects
(Perlin masks, anomalib's ``PerlinAnomalyGenerator``), plus the defective-feature perception loss on the encoder;
stage 2 ("segmentation") freezes them and trains the multi-scale segmentation module with focal + Dice loss. The
switch is by epoch (``reconstruction_epochs``) or by optimizer step (``reconstruction_steps``, for ``max_steps``
budgets). The fixed normal reference image is chosen from the training set when fitting starts, by a documented
rule (:meth:`RBAE.choose_reference`), and stored as a buffer: checkpoints and exported graphs carry it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from anomalib.data import Batch
from anomalib.data.utils.generators.perlin import PerlinAnomalyGenerator
from anomalib.metrics import Evaluator
from anomalib.models.components import AnomalibModule
from anomalib.pre_processing import PreProcessor
from anomalib.visualization import Visualizer
from lightning.pytorch.utilities.types import STEP_OUTPUT
from torch import distributed as dist
from torch import nn
from torch.utils.data import default_collate
from torchvision.transforms.v2 import Normalize

from anomalib_recon.components.guards import NonFiniteError, is_finite_number
from anomalib_recon.components.module import ReconModuleMixin
from anomalib_recon.components.normal_images import collect_normal_images, preprocess, training_dataset
from anomalib_recon.components.preprocessing import resize_pre_processor, sized_pre_processor
from anomalib_recon.components.schedules import check_lr_schedule, plan_two_stages

from .loss import RBAEReconstructionLoss, RBAESegmentationLoss
from .torch_model import DEFAULT_BACKBONE, REFERENCE_FROM_FILE, RBAEModel

logger = logging.getLogger(__name__)

__all__ = ["RBAE", "STAGES"]

DEFAULT_IMAGE_SIZE = (256, 256)
STAGES = ("reconstruction", "segmentation")
TIE_TOLERANCE = 1e-5
"""Reference rule: distances to the mean descriptor within this fraction of the largest distance are a tie."""


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def check_settings(**settings: Any) -> None:
    """One ``ValueError`` at construction for a setting that would fail (or silently misbehave) in ``fit``."""
    rules = {
        "lr": (lambda v: is_finite_number(v) and v > 0, "a finite number > 0 (Adam; the paper's setting is 1e-4)"),
        "weight_decay": (lambda v: is_finite_number(v) and v >= 0, "a finite number >= 0"),
        "focal_gamma": (lambda v: is_finite_number(v) and v >= 0, "a finite number >= 0 (2)"),
        "perception_loss_weight": (lambda v: is_finite_number(v) and v >= 0, "a finite number >= 0 (0 = off)"),
        "perception_margin": (lambda v: is_finite_number(v) and -1 <= v < 1, "a cosine margin in [-1, 1) (0.5)"),
        "anomaly_probability": (lambda v: is_finite_number(v) and 0 < v <= 1, "in (0, 1] (0.5)"),
        "stats_max_images": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1, "an int >= 1"),
        "reconstruction_epochs": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0, "an int >= 0"),
        "segmentation_epochs": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0, "an int >= 0"),
        "reconstruction_steps": (
            lambda v: v is None or (isinstance(v, int) and not isinstance(v, bool) and v >= 0),
            "None or an int >= 0",
        ),
    }
    for name, value in settings.items():
        ok, rule = rules[name]
        if not ok(value):
            msg = f"RBAE: {name} must be {rule}, got {value!r}."
            raise ValueError(msg)


class RBAE(ReconModuleMixin, AnomalibModule):
    """RB-AE / NDP-Net (arXiv 2211.10060): reference-based autoencoder + multi-scale defect segmentation.

    Stage switch: by default stage 1 runs ``reconstruction_epochs`` epochs and stage 2 ``segmentation_epochs``
    (``trainer_arguments`` sets ``max_epochs`` to their sum). With ``reconstruction_steps`` the switch is at that
    optimizer step and the trainer's ``max_steps`` (or ``max_epochs``) ends training. A budget that ends before
    stage 2 starts is refused when fitting starts. Validation during stage 1 scores with an untrained segmentation
    module (an info line says so); the shared rails validate the final weights after the last step, so thresholds
    and normalisation always come from the trained model.

    Reference image (the "fixed normal reference" of the paper; rule INFERRED): when fitting starts and no reference
    is stored yet, :meth:`choose_reference` takes, among the first ``stats_max_images`` training images in dataset
    order, the one whose global-average-pooled encoder maps (all layers, concatenated) are closest in Euclidean
    distance to their mean over those images, with the encoder as it is before training (ImageNet weights);
    near-ties (:data:`TIE_TOLERANCE`) go to the first image. Under DDP every rank computes the same choice from every
    rank's images. ``reference`` overrides the rule with a training-set index or an image file. The pre-processed
    image is the buffer ``model.reference_image`` (``model.reference_index`` says which one), saved in checkpoints
    and exported graphs.

    Args:
        backbone: Trainable encoder, a timm CNN (``resnet18.tv_in1k``, the paper's ResNet-18;
            ``tf_efficientnet_lite0`` offline).
        layers: Encoder layers, shallow to deep; ``None`` = the layers at strides 4, 8, 16, 32 (``layer1``-``layer4``).
        weights: ``"imagenet"`` (offline-aware), a local weights file, or ``None`` (random initialisation).
        image_size: Input size of the default pre-processor (256); also the size of the stored reference image.
        use_rbam: Reference-based attention on every encoder map (True); ``False`` = plain skip connections.
        seg_channels: Width of the segmentation module's maps (64).
        reference: ``None`` = the rule above; an ``int`` = that training image (dataset order); a ``str`` = an image
            file (read when fitting starts, resized by the pre-processor).
        stats_max_images: At most this many training images (the first, in dataset order) compete for the reference.
        anomaly_source_path: Folder of texture images (e.g. DTD's ``images/``) for the synthetic defects; ``None`` =
            Perlin-noise textures (nothing downloaded).
        anomaly_probability: Probability that a training image gets a synthetic defect (0.5).
        perception_loss_weight: ``λ_p`` of the defective-feature perception loss (1.0); 0 = without it (ablation).
        perception_margin: Cosine margin below which defective encoder features must fall (0.5).
        focal_gamma: γ of the focal loss of stage 2 (2).
        score_kernel_size: Average-pool kernel of the image score ``max(avg_pool2d(map, k, 1, k // 2))`` (21).
        reconstruction_epochs: Stage-1 epochs (300).
        segmentation_epochs: Stage-2 epochs (100).
        reconstruction_steps: Switch to stage 2 after this many optimizer steps instead of by epoch (``None``).
        lr: Adam learning rate of both stages (1e-4).
        weight_decay: Adam weight decay (0).
        lr_milestones: Step decay within *each stage*: fractions of the stage in (0, 1) (``(0.8,)``: ×``lr_gamma``
            after 80 % of each stage) or epoch numbers counted from the stage's start.
        lr_gamma: Decay factor (0.1).
        pre_processor: Pre-processor, or ``True`` for Resize(``image_size``) (no normalisation: the model
            normalises inside, after the synthetic defects are drawn on [0, 1] images).
        post_processor: Post-processor or flag.
        evaluator: Evaluator or flag.
        visualizer: Visualizer or flag.

    Example:
        >>> from anomalib.engine import Engine
        >>> model = RBAE()                                               # paper settings, 300 + 100 epochs
        >>> Engine().fit(model, datamodule=datamodule)                   # doctest: +SKIP
        >>> small = RBAE(backbone="tf_efficientnet_lite0", image_size=128, reconstruction_steps=200)
        >>> Engine(max_steps=300).fit(small, datamodule=datamodule)      # doctest: +SKIP
    """

    # The argument list repeats the other models' on purpose: one name per concept is the CLI/YAML API, and
    # jsonargparse documents each model from its explicit signature (components/README.md, "What stays repeated").
    def __init__(
        self,
        backbone: str = DEFAULT_BACKBONE,
        layers: list[int | str] | None = None,
        weights: str | None = "imagenet",
        image_size: int | tuple[int, int] | None = None,
        use_rbam: bool = True,
        seg_channels: int = 64,
        reference: int | str | None = None,
        stats_max_images: int = 1024,
        anomaly_source_path: str | None = None,
        anomaly_probability: float = 0.5,
        perception_loss_weight: float = 1.0,
        perception_margin: float = 0.5,
        focal_gamma: float = 2.0,
        score_kernel_size: int = 21,
        reconstruction_epochs: int = 300,
        segmentation_epochs: int = 100,
        reconstruction_steps: int | None = None,
        lr: float = 1e-4,
        weight_decay: float = 0.0,
        lr_milestones: Sequence[float] = (0.8,),
        lr_gamma: float = 0.1,
        pre_processor: nn.Module | bool = True,
        post_processor: nn.Module | bool = True,
        evaluator: Evaluator | bool = True,
        visualizer: Visualizer | bool = True,
    ) -> None:
        check_settings(
            lr=lr,
            weight_decay=weight_decay,
            focal_gamma=focal_gamma,
            perception_loss_weight=perception_loss_weight,
            perception_margin=perception_margin,
            anomaly_probability=anomaly_probability,
            stats_max_images=stats_max_images,
            reconstruction_epochs=reconstruction_epochs,
            segmentation_epochs=segmentation_epochs,
            reconstruction_steps=reconstruction_steps,
        )
        if reconstruction_steps is None and reconstruction_epochs + segmentation_epochs == 0:
            msg = "RBAE: reconstruction_epochs + segmentation_epochs must be positive."
            raise ValueError(msg)
        if isinstance(reference, bool) or not (reference is None or isinstance(reference, int | str)):
            msg = f"RBAE: reference must be None, a training-image index or an image file, got {reference!r}."
            raise TypeError(msg)
        if isinstance(reference, int) and reference < 0:
            msg = f"RBAE: reference must be a training-image index >= 0, got {reference}."
            raise ValueError(msg)
        if anomaly_source_path is not None and not Path(anomaly_source_path).is_dir():
            msg = (
                f"RBAE: anomaly_source_path {anomaly_source_path!r} is not a folder; pass a folder of texture images "
                "(e.g. DTD's images/) or None for Perlin-noise textures."
            )
            raise ValueError(msg)
        super().__init__(
            sized_pre_processor(type(self), image_size, pre_processor), post_processor, evaluator, visualizer
        )
        self.lr_milestones = check_lr_schedule(lr_milestones, lr_gamma)
        self.lr_gamma = float(lr_gamma)
        self.lr = float(lr)
        self.weight_decay = float(weight_decay)
        self.reference = reference
        self.stats_max_images = int(stats_max_images)
        self.perception_loss_weight = float(perception_loss_weight)
        self.reconstruction_epochs = int(reconstruction_epochs)
        self.segmentation_epochs = int(segmentation_epochs)
        self.reconstruction_steps = None if reconstruction_steps is None else int(reconstruction_steps)
        self.automatic_optimization = False

        input_size = self.model_input_size(image_size)
        self.model = RBAEModel(
            backbone=backbone,
            layers=layers,
            weights=weights,
            image_size=input_size,
            use_rbam=use_rbam,
            seg_channels=seg_channels,
            score_kernel_size=score_kernel_size,
        )
        self.reconstruction_loss = RBAEReconstructionLoss(perception_loss_weight, perception_margin)
        self.segmentation_loss = RBAESegmentationLoss(focal_gamma)
        self.augmenter = PerlinAnomalyGenerator(
            anomaly_source_path=anomaly_source_path, probability=anomaly_probability, blend_factor=(0.2, 1.0)
        )
        if anomaly_source_path is not None and not self.augmenter.anomaly_source_paths:
            msg = f"RBAE: anomaly_source_path {anomaly_source_path!r} contains no images."
            raise ValueError(msg)
        self._stage_steps: dict[str, float] = {}
        self._batches_per_epoch = 1.0
        self._logged_stage1_validation = False

    # ------------------------------------------------------------------------------------------------ configuration
    default_image_size = DEFAULT_IMAGE_SIZE

    @classmethod
    def configure_pre_processor(cls, image_size: tuple[int, int] | None = None) -> PreProcessor:
        """Resize to ``image_size`` (256×256), no normalisation: the synthetic defects are drawn on [0, 1] images and
        the model applies the ImageNet normalisation itself before its encoder."""
        return resize_pre_processor(image_size or cls.default_image_size, normalize=False)

    @property
    def input_normalization(self) -> str:
        """``"none"``: the pre-processor only resizes; ImageNet normalisation is inside the torch model."""
        return "none"

    @property
    def trainer_arguments(self) -> dict[str, Any]:
        """No sanity validation; epoch switch: ``max_epochs = reconstruction_epochs + segmentation_epochs`` (400).

        With ``reconstruction_steps`` the budget is left to the trainer (``max_steps`` / ``max_epochs``).
        """
        if self.reconstruction_steps is not None:
            return {"num_sanity_val_steps": 0}
        return {"max_epochs": self.reconstruction_epochs + self.segmentation_epochs, "num_sanity_val_steps": 0}

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        """``[Adam(encoder, RBAM, decoder), Adam(MSFDM)]``, one per stage; the learning rate is set every step."""
        kwargs = {"lr": self.lr, "weight_decay": self.weight_decay}
        return [
            torch.optim.Adam(self.model.reconstruction_parameters(), **kwargs),
            torch.optim.Adam(self.model.segmentation_parameters(), **kwargs),
        ]

    # ------------------------------------------------------------------------------------------------ stages
    @property
    def stage(self) -> str:
        """``"reconstruction"`` (stage 1) or ``"segmentation"`` (stage 2) at the current epoch / optimizer step."""
        if self.reconstruction_steps is not None:
            return STAGES[1] if self.global_step >= self.reconstruction_steps else STAGES[0]
        return STAGES[1] if self.current_epoch >= self.reconstruction_epochs else STAGES[0]

    def _switch_step(self, batches_per_epoch: float) -> float:
        if self.reconstruction_steps is not None:
            return float(self.reconstruction_steps)
        return self.reconstruction_epochs * batches_per_epoch

    def _plan_stages(self) -> None:
        """Steps of each stage from the trainer's budget; refuse a budget that ends before stage 2 starts."""
        batches, switch, total = plan_two_stages(
            "RBAE",
            self.trainer,
            self._switch_step,
            self.reconstruction_steps,
            self.reconstruction_epochs,
            stage2="the segmentation module, which gives the anomaly map",
            suggestion="2/3",
        )
        self._batches_per_epoch = batches if math.isfinite(batches) and batches > 0 else 1.0
        self._stage_steps = {STAGES[0]: switch, STAGES[1]: total - switch}
        logger.info(
            "RBAE: stage 1 (reconstruction) for %s steps, then stage 2 (segmentation) for %s steps.",
            int(switch) if math.isfinite(switch) else switch,
            int(total - switch) if math.isfinite(total) else "the rest of the budget",
        )

    def _stage_start(self, stage: str) -> int:
        """Optimizer step at which ``stage`` starts."""
        return 0 if stage == STAGES[0] else int(self._switch_step(self._batches_per_epoch))

    def stage_lr(self, stage: str, step_in_stage: int) -> float:
        """Learning rate at ``step_in_stage`` (0-based optimizer steps since the stage started).

        ``lr × lr_gamma^k`` with ``k`` the milestones passed: a fraction ``f`` is passed after ``max(round(f · L), 1)``
        steps of a stage of ``L`` steps (a stage of unknown length keeps ``lr``); an epoch number ``m`` after ``m``
        epochs of the stage.
        """
        length = self._stage_steps.get(stage, math.inf)
        passed = 0
        for milestone in self.lr_milestones:
            if milestone >= 1:
                passed += step_in_stage // self._batches_per_epoch >= milestone
            elif math.isfinite(length):
                passed += step_in_stage >= max(round(milestone * length), 1)
        return self.lr * self.lr_gamma**passed

    # ------------------------------------------------------------------------------------------------ reference
    def choose_reference(self, dataloader: Iterable[Any] | None = None) -> int:
        """Choose and store the fixed normal reference image; returns its index.

        ``reference=None``: among the first ``stats_max_images`` images (the training set in dataset order, read by
        :func:`~anomalib_recon.components.normal_images.collect_normal_images`, so under DDP from every rank's share
        and identical on every rank; or ``dataloader``'s raw normal images, as given), the image whose descriptor (the
        global-average-pooled maps of the current encoder, all layers concatenated, in float64) is closest in
        Euclidean distance to the mean descriptor; on a tie (within :data:`TIE_TOLERANCE` of the largest distance,
        as batched convolutions differ in the last bits) the first of them. ``reference=i``: training image
        ``i``. ``reference="path"``: that image file. Called automatically when fitting starts if no reference is
        stored (a model restored from a checkpoint keeps its reference).
        """
        if isinstance(self.reference, str):
            return self._reference_from_file(Path(self.reference))
        if isinstance(self.reference, int):
            index = self.reference
        else:
            descriptor = self.model.reference_descriptor
            descriptors = collect_normal_images(self, descriptor, self.stats_max_images, dataloader)
            if not bool(torch.isfinite(descriptors).all()):
                msg = (
                    "RBAE: the encoder's features of the training images are NaN or inf while choosing the reference "
                    "image; check the backbone weights (a corrupt file?) and the training images."
                )
                raise NonFiniteError(msg)
            distances = (descriptors - descriptors.mean(dim=0, keepdim=True)).norm(dim=1)
            # Batched convolutions differ in the last bits with the batch's composition (one process vs DDP shares):
            # distances within TIE_TOLERANCE of the largest count as a tie, and the first image wins.
            tied = distances <= distances.min() + TIE_TOLERANCE * distances.max()
            index = int(torch.nonzero(tied)[0, 0])
        image = self._load_normal_image(index, dataloader)
        if _distributed():  # identical already; the broadcast also covers random training-set augmentations
            image = image.to(self.model.reference_image.device)
            dist.broadcast(image, src=0)
        self.model.set_reference(image, index)
        logger.info("RBAE: reference image = training image %d.", index)
        return index

    def _load_normal_image(self, index: int, dataloader: Iterable[Any] | None) -> torch.Tensor:
        """Pre-processed image ``index`` of the training set (or of ``dataloader``), ``(1, 3, H, W)``."""
        was_training = self.training
        self.eval()
        try:
            if dataloader is not None:
                seen = 0
                for batch in dataloader:
                    images = batch if isinstance(batch, torch.Tensor) else batch.image
                    if index < seen + images.shape[0]:
                        return preprocess(self, images[index - seen : index - seen + 1]).detach()
                    seen += images.shape[0]
                msg = f"RBAE: reference={index} but the dataloader holds {seen} images."
                raise ValueError(msg)
            dataset = training_dataset(self)
            if index >= len(dataset):
                msg = (
                    f"RBAE: reference={index} but the training set holds {len(dataset)} images "
                    f"(indices 0..{len(dataset) - 1})."
                )
                raise ValueError(msg)
            collate = getattr(dataset, "collate_fn", None) or default_collate
            return preprocess(self, collate([dataset[index]])).detach()
        finally:
            self.train(was_training)

    def _reference_from_file(self, path: Path) -> int:
        from anomalib.data.utils import read_image

        if not path.is_file():
            msg = f"RBAE: reference image {str(path)!r} does not exist; pass an image file or a training-image index."
            raise ValueError(msg)
        image = read_image(path, as_tensor=True).unsqueeze(0)
        self.model.set_reference(preprocess(self, image).detach(), REFERENCE_FROM_FILE)
        logger.info("RBAE: reference image = %s.", path)
        return REFERENCE_FROM_FILE

    # ------------------------------------------------------------------------------------------------ training
    def on_train_start(self) -> None:
        """Plan the stages (refusing a budget without stage 2), choose the reference once, check the pre-processor."""
        self._plan_stages()
        if not self.model.has_reference:
            self.choose_reference()
        transform = getattr(self.pre_processor, "transform", None)
        if transform is not None and any(isinstance(t, Normalize) for t in getattr(transform, "transforms", [])):
            logger.warning(
                "RBAE: the pre-processor normalises, but the model expects [0, 1] images (it normalises inside and "
                "draws the synthetic defects on [0, 1] images); use RBAE.configure_pre_processor()."
            )

    def sync_buffers(self) -> None:
        """Under DDP, give every rank rank 0's buffers (batch-norm statistics), as DDP's ``broadcast_buffers`` does
        before each forward. With manual optimisation Lightning turns that broadcast off after the first step, so
        without this the ranks' batch-norm statistics drift apart and each rank would validate another model."""
        if not _distributed():
            return
        with torch.no_grad():
            for buffer in self.model.buffers():
                if buffer.dtype != torch.bool:  # gloo has no bool (the model has none)
                    dist.broadcast(buffer, src=0)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        """Rank 0's buffers before every training step (DDP)."""
        del batch, batch_idx
        self.sync_buffers()

    def on_validation_start(self) -> None:
        """Rank 0's buffers before validating (DDP): every rank scores the same model."""
        self.sync_buffers()

    def on_train_end(self) -> None:
        """Rank 0's buffers at the end of fitting (DDP): every rank holds the same model."""
        self.sync_buffers()

    def synthesize(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pseudo-anomalous copies of [0, 1] ``images`` and their masks ``(B, 1, H, W)`` (Perlin generator)."""
        with torch.no_grad():
            augmented, mask = self.augmenter(images)
        return augmented.to(images.dtype).clamp(0, 1), mask.to(images.dtype)

    def training_step(self, batch: Batch, *args, **kwargs) -> STEP_OUTPUT:
        """One step of the current stage with its own optimiser (zeroed every step, learning rate set per stage)."""
        del args, kwargs
        optimizers = self.optimizers()
        stage = self.stage
        self.model.set_stage(stage)
        images = batch.image
        size = int(images.shape[0])
        augmented, mask = self.synthesize(images)
        if stage == STAGES[0]:
            normal = images if self.perception_loss_weight > 0 else None
            out = self.model.reconstruction_outputs(augmented, normal)
            losses = self.reconstruction_loss(
                out.reconstruction, images, mask, out.augmented_features, out.normal_features
            )
            names, optimizer = ("mse", "ssim", "perception"), optimizers[0]
        else:
            probability = torch.sigmoid(self.model.segmentation_logits(augmented))
            losses = self.segmentation_loss(probability, mask)
            names, optimizer = ("focal", "dice"), optimizers[1]
        lr = self.stage_lr(stage, int(self.global_step) - self._stage_start(stage))
        for group in optimizer.optimizer.param_groups:
            group["lr"] = lr
        loss = losses["loss"]
        objective = loss
        if _distributed():
            # DDP (without find_unused_parameters) waits for a gradient of every parameter at every step: the other
            # stage's parameters get exact zeros (their optimiser does not step). A non-finite weight makes it NaN.
            net = self.model
            idle = net.segmentation_parameters() if stage == STAGES[0] else net.reconstruction_parameters()
            objective = loss + 0.0 * sum(p.sum() for p in idle)
        optimizer.zero_grad()
        self.manual_backward(objective)  # a non-finite loss stops here (ModelGuard.on_before_backward)
        optimizer.step()
        self.log("train_loss", loss.detach(), on_step=True, on_epoch=False, prog_bar=True, batch_size=size)
        self.log("stage", float(STAGES.index(stage)), on_step=True, on_epoch=False, batch_size=size)
        self.log("lr", lr, on_step=True, on_epoch=False, batch_size=size)
        for name in names:
            self.log(f"train_{name}_loss", losses[name].detach(), on_step=False, on_epoch=True, batch_size=size)
        return {"loss": loss.detach()}

    def on_validation_epoch_start(self) -> None:
        """Say once that stage-1 validation scores with an untrained segmentation module."""
        if self.trainer.training and self.stage == STAGES[0] and not self._logged_stage1_validation:
            logger.info(
                "RBAE: validation during stage 1 scores with the untrained segmentation module (meaningless values); "
                "the post-processor's thresholds are recomputed at every validation, the last one after the last step."
            )
            self._logged_stage1_validation = True

    @property
    def parameter_counts(self) -> dict[str, int]:
        """Encoder, RBAM, decoder and MSFDM parameter counts."""
        count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
        net = self.model
        return {
            "encoder": count(net.encoder),
            "rbam": count(net.rbam),
            "decoder": count(net.decoder),
            "msfdm": count(net.msfdm),
            "total": count(net),
        }
