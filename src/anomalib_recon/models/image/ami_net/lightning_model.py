"""AMI-Net: Adaptive Mask Inpainting Network for industrial anomaly detection and localization.

Paper: W. Luo et al., *AMI-Net: Adaptive Mask Inpainting Network for Industrial Anomaly Detection and
Localization*, IEEE T-ASE 2024 (arXiv 2412.11802). Authors' code: GitHub luow23/AMI-Net, commit 3350be0 (MIT
licence).

Frozen WideResNet-50 features are inpainted by a ViT trained with random positional and quantitative masks;
at inference an adaptive mask generator (cluster centres + per-cluster outlier threshold) masks the likely
anomalous tokens so that they are reconstructed as normal, and the residual becomes the anomaly map.
"""

from __future__ import annotations

import logging

import torch
from anomalib import TaskType
from anomalib.data import Batch
from anomalib.metrics import Evaluator
from anomalib.models.components import AnomalibModule
from anomalib.post_processing import PostProcessor
from anomalib.visualization import Visualizer
from lightning.pytorch.utilities.types import STEP_OUTPUT
from torch import nn

from anomalib_recon.components.few_shot import restrict_to_few_shot
from anomalib_recon.components.guards import check_optimizer_settings
from anomalib_recon.components.module import ReconModuleMixin
from anomalib_recon.components.preprocessing import sized_pre_processor

from .loss import AMINetLoss
from .torch_model import AMINetModel

logger = logging.getLogger(__name__)

__all__ = ["AMINet"]

DEFAULT_IMAGE_SIZE = (256, 256)


class AMINet(ReconModuleMixin, AnomalibModule):
    """AMI-Net (T-ASE 2024): adaptive-mask feature inpainting.

    ``load_from_checkpoint`` restores the frozen backbone from the checkpoint alone (no weight download).

    Settings of the reference: one-class (one model per category, batch 8, 300 epochs), multi-class (one model on
    the union of categories, e.g. ``anomalib_recon.data.MultiCategory``, batch 16) and few-shot (``few_shot_k``
    random normal images, batch 1, 300 epochs).

    Args:
        backbone: timm CNN; ``wide_resnet50_2.tv_in1k`` (torchvision weights) as in the paper.
        layers: Backbone layers (names or ``features_only`` indices). ``None`` = the layers at strides 4, 8, 16:
            ``layer1``-``layer3`` for ResNets, ``blocks.1, blocks.2, blocks.4`` for EfficientNet-Lite.
        weights: ``"imagenet"`` (offline-aware, see ``anomalib_recon.components.weights``), a local weights file,
            or ``None`` (random init, for tests).
        image_size: Input size of the default pre-processor (``None`` = 256×256). Ignored when a pre-processor is
            passed: the model then takes its size from that pre-processor's Resize. With the default layers the
            size must be a multiple of 4 × ``patch_size`` (16).
        patch_size: Patch size of both patch embeddings (4 → 16×16 tokens at 256 px).
        embed_dim: Token width (768).
        depth: Inpainting ViT blocks (8).
        num_heads: Attention heads (12).
        aux_depth: Mask-generator ViT blocks (1).
        mlp_ratio: Block MLP ratio (4).
        num_centers: Cluster-centre tokens (8).
        sigma: Adaptive-mask threshold ``mean + σ·std`` per cluster (0.5).
        jitter_scale: Scale of the norm-scaled feature jitter in training; ``None`` = 20 at the paper's
            ``embed_dim`` 768 and ``20·√(embed_dim/768)`` at other widths, which keeps the paper's noise-to-token-norm
            ratio ``20/√768 ≈ 0.72`` (see ``torch_model.width_matched_jitter_scale``; INFERRED for widths ≠ 768).
        adaptive_mask_at_inference: Use the adaptive mask at inference (True, the paper); ``False`` = no mask.
        blur_sigma: Gaussian σ of the map smoothing (4, kernel 33).
        direction_weight: Weight of the cosine (direction) loss (5).
        diversity_weight: Weight of the centre-diversity term in the auxiliary loss (0.1).
        lr: AdamW learning rate (1e-4, constant).
        betas: AdamW betas ((0.9, 0.95)).
        weight_decay: AdamW weight decay (0.01, PyTorch's default the reference ends up with).
        few_shot_k: Few-shot setting: train on ``k`` normal images drawn (seeded) from the datamodule's training
            set (the reference uses k = 2 and batch 1). ``None`` = all images.
        few_shot_seed: Seed of that draw.
        threshold_matching: anomalib's post-processor threshold matching (without a pixel threshold, the anomaly
            map is normalised around the *image* threshold). ``None`` = on, except when the datamodule of a run has
            no pixel masks (classification task, e.g. ELPV): there the image threshold, a standard deviation of the
            map, lies far below the map values and every heatmap saturates, so matching is switched off and the map
            is normalised around the midpoint of its own min-max range. Image scores, labels and metrics are the
            same either way. ``True``/``False`` force the setting. INFERRED (not in the paper).
        pre_processor: Pre-processor, or ``True`` for Resize(256) + ImageNet Normalize.
        post_processor: Post-processor or flag.
        evaluator: Evaluator or flag.
        visualizer: Visualizer or flag.

    Example:
        >>> from anomalib.engine import Engine
        >>> model = AMINet()                                               # paper settings
        >>> Engine(max_epochs=300).fit(model, datamodule=datamodule)       # doctest: +SKIP
    """

    # The argument list repeats the other models' on purpose: one name per concept is the CLI/YAML API, and
    # jsonargparse documents each model from its explicit signature (components/README.md, "What stays repeated").
    def __init__(
        self,
        backbone: str = "wide_resnet50_2.tv_in1k",
        layers: list[int | str] | None = None,
        weights: str | None = "imagenet",
        image_size: int | tuple[int, int] | None = None,
        patch_size: int = 4,
        embed_dim: int = 768,
        depth: int = 8,
        num_heads: int = 12,
        aux_depth: int = 1,
        mlp_ratio: float = 4.0,
        num_centers: int = 8,
        sigma: float = 0.5,
        jitter_scale: float | None = None,
        adaptive_mask_at_inference: bool = True,
        blur_sigma: float = 4.0,
        direction_weight: float = 5.0,
        diversity_weight: float = 0.1,
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.95),
        weight_decay: float = 0.01,
        few_shot_k: int | None = None,
        few_shot_seed: int = 0,
        threshold_matching: bool | None = None,
        pre_processor: nn.Module | bool = True,
        post_processor: nn.Module | bool = True,
        evaluator: Evaluator | bool = True,
        visualizer: Visualizer | bool = True,
    ) -> None:
        super().__init__(
            sized_pre_processor(type(self), image_size, pre_processor), post_processor, evaluator, visualizer
        )
        if few_shot_k is not None and few_shot_k < 1:
            msg = f"few_shot_k must be a positive number of normal images or None, got {few_shot_k}."
            raise ValueError(msg)
        check_optimizer_settings("AMINet", lr, weight_decay, betas)
        input_size = self.model_input_size(image_size)
        self.lr = float(lr)
        self.betas = (float(betas[0]), float(betas[1]))
        self.weight_decay = float(weight_decay)
        self.few_shot_k = few_shot_k
        self.few_shot_seed = int(few_shot_seed)
        self.threshold_matching = threshold_matching
        if threshold_matching is not None:
            self._set_threshold_matching(bool(threshold_matching))

        self.model = AMINetModel(
            backbone=backbone,
            layers=layers,
            weights=weights,
            image_size=input_size,
            patch_size=patch_size,
            embed_dim=embed_dim,
            depth=depth,
            num_heads=num_heads,
            aux_depth=aux_depth,
            mlp_ratio=mlp_ratio,
            num_centers=num_centers,
            sigma=sigma,
            jitter_scale=jitter_scale,
            adaptive_mask_at_inference=adaptive_mask_at_inference,
            blur_sigma=blur_sigma,
        )
        self.loss = AMINetLoss(direction_weight=direction_weight, diversity_weight=diversity_weight)

    # ------------------------------------------------------------------------------------------------ configuration
    default_image_size = DEFAULT_IMAGE_SIZE

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """AdamW with a constant learning rate on the trainable parts (the backbone is frozen)."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        return torch.optim.AdamW(params, lr=self.lr, betas=self.betas, weight_decay=self.weight_decay)

    # ------------------------------------------------------------------------------------------------ setup
    def _set_threshold_matching(self, enabled: bool) -> None:
        """Switch anomalib's threshold matching on the post-processor (if it is anomalib's ``PostProcessor``)."""
        if isinstance(self.post_processor, PostProcessor):
            self.post_processor.enable_threshold_matching = enabled

    def _datamodule_has_masks(self) -> bool | None:
        """Whether the trainer's datamodule carries pixel masks (its task), or ``None`` when it cannot tell."""
        trainer = self._trainer
        datamodule = getattr(trainer, "datamodule", None) if trainer is not None else None
        try:
            task = datamodule.task
        except AttributeError:  # no datamodule (plain dataloaders), or one without datasets yet
            return None
        return TaskType(task) == TaskType.SEGMENTATION

    def setup(self, stage: str) -> None:
        """Threshold matching off for label-only data (see ``threshold_matching``); few-shot subsampling."""
        if self.threshold_matching is None and self._datamodule_has_masks() is False:
            self._set_threshold_matching(False)
            logger.info("AMINet: the datamodule has no pixel masks; anomalib's threshold matching is off.")
        self._few_shot_setup(stage)

    def _few_shot_setup(self, stage: str) -> None:
        """Few-shot: keep ``few_shot_k`` seeded random normal images of the datamodule's training set.

        The shared recipe (:func:`~anomalib_recon.components.few_shot.restrict_to_few_shot`) with one fold: the
        paper trains on the ``k`` images as they are (no replication, no augmentation).
        """
        if self.few_shot_k is None or stage != "fit":
            return
        restrict_to_few_shot(self.trainer, self.few_shot_k, 1, self.few_shot_seed, "AMINet")

    # ------------------------------------------------------------------------------------------------ steps
    def training_step(self, batch: Batch, *args, **kwargs) -> STEP_OUTPUT:
        """Random-mask inpainting of the normal batch; returns the total loss."""
        del args, kwargs
        out = self.model(batch.image)
        losses = self.loss(out.pred_tokens, out.target_tokens, out.token_scores, out.centers)
        size = int(batch.image.shape[0])
        self.log("train_loss", losses["loss"], on_step=True, on_epoch=True, prog_bar=True, batch_size=size)
        for name in ("direction", "distance", "compactness", "diversity"):
            self.log(f"train_{name}", losses[name], on_step=False, on_epoch=True, batch_size=size)
        return {"loss": losses["loss"]}

    @property
    def parameter_counts(self) -> dict[str, int]:
        """Trainable and frozen parameter counts."""
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.model.parameters())
        return {"trainable": trainable, "frozen": total - trainable, "total": total}
