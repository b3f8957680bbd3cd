"""LGFDR: local and global feature denoising reconstruction with a selective reconstruction head.

Paper: Chen Yichi, Chen Bin, Xian Weizhi, Wang Junjie, Huang Yao, Chen Min, *LGFDR: local and global feature
denoising reconstruction for unsupervised anomaly detection*, The Visual Computer 40(12), 2024, DOI
10.1007/s00371-024-03281-x. No code is public (the announced repository, GitHub Karma1628/work-1, holds only a
README); the architecture beyond the abstract is inferred and every inferred choice is an option (see the README).

Frozen backbone features of normal images, with Gaussian noise added in training, are reconstructed by two towers:
a local one (neighbourhood attention on the full feature grid) and a global one (ViT blocks over patch tokens); the
selective reconstruction head (SRH) fuses them with a learned per-position gate. The squared residual between the
clean features and the fused reconstruction is the anomaly map.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from anomalib.data import Batch
from anomalib.metrics import Evaluator
from anomalib.models.components import AnomalibModule
from anomalib.visualization import Visualizer
from lightning.pytorch.utilities.types import STEP_OUTPUT
from torch import nn

from anomalib_recon.components.guards import check_optimizer_settings
from anomalib_recon.components.module import ReconModuleMixin
from anomalib_recon.components.preprocessing import sized_pre_processor
from anomalib_recon.components.schedules import check_lr_schedule, multistep_lr
from anomalib_recon.components.standardization import measure_feature_statistics

from .loss import LGFDRLoss
from .torch_model import SWIN_L, LGFDRModel

logger = logging.getLogger(__name__)

__all__ = ["LGFDR"]

DEFAULT_IMAGE_SIZE = (256, 256)


class LGFDR(ReconModuleMixin, AnomalibModule):
    """LGFDR (The Visual Computer 2024): dual-tower denoising feature reconstruction fused by the SRH.

    ``load_from_checkpoint`` restores the frozen backbone and the feature statistics from the checkpoint alone.

    Args:
        backbone: timm name or ``"swin_l"`` (``swin_large_patch4_window7_224.ms_in22k_ft_in1k``, the default,
            **INFERRED** from the authors' other work); e.g. ``"tf_efficientnet_lite0"`` offline.
        layers: Backbone layers; ``None`` = the stages at strides 4, 8, 16 (Swin-L stages 0-2 → 1344 channels;
            ``layer1``-``layer3`` for ResNets; ``blocks.1, blocks.2, blocks.4`` for EfficientNet-Lite).
        weights: ``"imagenet"`` (offline-aware), a local weights file, or ``None`` (random init).
        image_size: Input size of the default pre-processor (``None`` = 256); a multiple of 16 with the default
            stride-4 features and ``patch_size`` 4. Ignored when a pre-processor is passed (its Resize gives it).
        local_embed_dim: Width of the shared 1×1 stem and of the local tower (256).
        local_depth: Neighbourhood-attention blocks of the local tower (4).
        local_num_heads: Their heads (8).
        kernel_size: Neighbourhood-attention window (7).
        embed_dim: Token width of the global tower (512).
        depth: ViT blocks of the global tower (4).
        num_heads: Their heads (8).
        mlp_ratio: MLP ratio of every block (4).
        patch_size: Patch size of the global tower's tokens on the feature grid (4).
        towers: ``"both"`` (default), ``"local"`` or ``"global"`` (the key ablation).
        srh_mode: SRH fusion: ``"spatial"`` (learned per-position gate, default), ``"channel"`` (SKNet-style
            per-channel weights) or ``"average"`` (fixed ½/½).
        feature_noise_std: σ of the training feature noise in units of each standardised channel's std (0.1);
            0 = no noise.
        tower_loss_weight: λ of the per-tower terms of the loss (1).
        standardize_features: Standardise each feature channel with a mean/std measured once on the training images
            when fitting starts (True, **INFERRED**); stored in checkpoints and exports.
        stats_max_images: At most this many training images (the first ones, in dataset order) for those statistics.
        blur_sigma: Gaussian σ of the map (4); ``None`` = no blur.
        score_kernel_size: Kernel of the image score ``max(avg_pool2d(map, k, 1, k // 2))``; ``None`` = side / 8
            (32 at 256 px).
        na_backend: Neighbourhood-attention backend: ``"auto"``, ``"natten"``, ``"flex"`` or ``"pure"``.
        lr: Adam learning rate (1e-4).
        betas: Adam betas ((0.9, 0.999)).
        weight_decay: Adam weight decay (0).
        lr_milestones: Where the learning rate is multiplied by ``lr_gamma``: (0.8, 0.9) of training (epochs, or steps
            when only ``max_steps`` bounds it; :mod:`~anomalib_recon.components.schedules`).
        lr_gamma: MultiStepLR factor (0.1).
        pre_processor: Pre-processor, or ``True`` for Resize(``image_size``) + ImageNet Normalize.
        post_processor: Post-processor or flag.
        evaluator: Evaluator or flag.
        visualizer: Visualizer or flag.

    Example:
        >>> from anomalib.engine import Engine
        >>> model = LGFDR()                                              # Swin-L, 256 px, both towers + SRH
        >>> Engine(max_epochs=400).fit(model, datamodule=datamodule)     # doctest: +SKIP
    """

    # The argument list repeats the other models' on purpose: one name per concept is the CLI/YAML API, and
    # jsonargparse documents each model from its explicit signature (components/README.md, "What stays repeated").
    def __init__(
        self,
        backbone: str = SWIN_L,
        layers: list[int | str] | None = None,
        weights: str | None = "imagenet",
        image_size: int | tuple[int, int] | None = None,
        local_embed_dim: int = 256,
        local_depth: int = 4,
        local_num_heads: int = 8,
        kernel_size: int = 7,
        embed_dim: int = 512,
        depth: int = 4,
        num_heads: int = 8,
        mlp_ratio: float = 4.0,
        patch_size: int = 4,
        towers: str = "both",
        srh_mode: str = "spatial",
        feature_noise_std: float = 0.1,
        tower_loss_weight: float = 1.0,
        standardize_features: bool = True,
        stats_max_images: int = 256,
        blur_sigma: float | None = 4.0,
        score_kernel_size: int | None = None,
        na_backend: str = "auto",
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.999),
        weight_decay: float = 0.0,
        lr_milestones: Sequence[float] = (0.8, 0.9),
        lr_gamma: float = 0.1,
        pre_processor: nn.Module | bool = True,
        post_processor: nn.Module | bool = True,
        evaluator: Evaluator | bool = True,
        visualizer: Visualizer | bool = True,
    ) -> None:
        check_optimizer_settings("LGFDR", lr, weight_decay, betas)
        super().__init__(
            sized_pre_processor(type(self), image_size, pre_processor), post_processor, evaluator, visualizer
        )
        if isinstance(stats_max_images, bool) or not isinstance(stats_max_images, int) or stats_max_images < 1:
            msg = f"LGFDR: stats_max_images must be a positive number of images, got {stats_max_images!r}."
            raise ValueError(msg)
        self.lr = float(lr)
        self.betas = (float(betas[0]), float(betas[1]))
        self.weight_decay = float(weight_decay)
        self.lr_milestones = check_lr_schedule(lr_milestones, lr_gamma)
        self.lr_gamma = float(lr_gamma)
        self.stats_max_images = int(stats_max_images)

        input_size = self.model_input_size(image_size)
        self.model = LGFDRModel(
            backbone=backbone,
            layers=layers,
            weights=weights,
            image_size=input_size,
            local_embed_dim=local_embed_dim,
            local_depth=local_depth,
            local_num_heads=local_num_heads,
            kernel_size=kernel_size,
            embed_dim=embed_dim,
            depth=depth,
            num_heads=num_heads,
            mlp_ratio=mlp_ratio,
            patch_size=patch_size,
            towers=towers,
            srh_mode=srh_mode,
            feature_noise_std=feature_noise_std,
            standardize_features=standardize_features,
            blur_sigma=blur_sigma,
            score_kernel_size=score_kernel_size,
            na_backend=na_backend,
        )
        self.loss = LGFDRLoss(tower_loss_weight=tower_loss_weight)

    # ------------------------------------------------------------------------------------------------ configuration
    default_image_size = DEFAULT_IMAGE_SIZE

    def configure_optimizers(self) -> dict[str, Any]:
        """Adam on the stem, towers and SRH (the backbone is frozen), ×``lr_gamma`` at ``lr_milestones``."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = torch.optim.Adam(params, lr=self.lr, betas=self.betas, weight_decay=self.weight_decay)
        return multistep_lr(optimizer, self.lr_milestones, self.lr_gamma, self._trainer)

    # ------------------------------------------------------------------------------------------------ statistics
    def fit_feature_statistics(self, dataloader: Iterable[Batch] | None = None) -> int:
        """Per-channel feature mean/std of at most ``stats_max_images`` normal images (``standardize_features``):
        :func:`~anomalib_recon.components.standardization.measure_feature_statistics`. Runs once at fit start: a
        model restored from a checkpoint keeps its statistics."""
        return measure_feature_statistics(self, self.stats_max_images, dataloader)

    def on_train_start(self) -> None:
        """Measure the feature statistics once (a model restored from a checkpoint keeps its own)."""
        if not self.model.feature_statistics_fitted:
            self.fit_feature_statistics()

    # ------------------------------------------------------------------------------------------------ steps
    def training_step(self, batch: Batch, *args, **kwargs) -> STEP_OUTPUT:
        """Noisy features in, clean features as the target: returns the reconstruction loss."""
        del args, kwargs
        out = self.model(batch.image)
        losses = self.loss(out.reconstruction, out.features, out.local, out.global_)
        size = int(batch.image.shape[0])
        self.log("train_loss", losses["loss"], on_step=True, on_epoch=True, prog_bar=True, batch_size=size)
        for name in ("fused", "local", "global"):
            self.log(f"train_{name}_loss", losses[name], on_step=False, on_epoch=True, batch_size=size)
        if out.gate is not None:
            self.log("train_srh_local_weight", out.gate.detach().mean(), on_step=False, on_epoch=True, batch_size=size)
        return {"loss": losses["loss"]}

    # ------------------------------------------------------------------------------------------------ export
    def _require_statistics(self) -> None:
        if not self.model.feature_statistics_fitted:
            msg = (
                "LGFDR: the feature statistics are not fitted, so the exported graph would standardise with mean 0 "
                "and std 1. Export a trained model (Engine.fit or a checkpoint)."
            )
            raise RuntimeError(msg)

    def to_torch(self, *args, **kwargs) -> Path:
        """anomalib's torch export, refused while the feature statistics are unfitted."""
        self._require_statistics()
        return super().to_torch(*args, **kwargs)

    def to_onnx(self, *args, **kwargs) -> Path:
        """anomalib's ONNX export (backbone, statistics, towers, SRH, map and score), refused while unfitted."""
        self._require_statistics()
        return super().to_onnx(*args, **kwargs)

    def to_openvino(self, *args, **kwargs) -> Path:
        """anomalib's OpenVINO export (via ONNX), refused while the feature statistics are unfitted."""
        self._require_statistics()
        return super().to_openvino(*args, **kwargs)

    @property
    def parameter_counts(self) -> dict[str, int]:
        """Trainable and frozen parameter counts."""
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.model.parameters())
        return {"trainable": trainable, "frozen": total - trainable, "total": total}
