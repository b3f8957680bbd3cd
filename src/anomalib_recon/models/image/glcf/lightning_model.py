"""GLCF: Learning Global-Local Correspondence with Semantic Bottleneck for Logical Anomaly Detection.

Paper: H. Yao et al., *Learning Global-Local Correspondence with Semantic Bottleneck for Logical Anomaly
Detection*, arXiv 2303.05768. Authors' code: GitHub hmyao22/GLCF, commit a9eaaec (MIT licence), read for
understanding only.

A frozen CNN teacher, a ViT bottleneck whose patch tokens carry the local latent and whose one semantic token
carries a global latent, and three reverse-distillation decoders: the local branch (teacher vs local estimate)
catches structural defects, the global branch (global features vs their estimate from the local latent) catches
logical ones (missing, extra or misplaced parts). After training, the cosine maps are standardised with statistics
fitted on normal images, weighted over scales and fused.
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
from anomalib_recon.components.normal_images import collect_normal_images
from anomalib_recon.components.preprocessing import sized_pre_processor
from anomalib_recon.components.schedules import check_lr_schedule, multistep_lr

from .loss import GLCFLoss
from .torch_model import GLCFModel

logger = logging.getLogger(__name__)

__all__ = ["GLCF"]

DEFAULT_IMAGE_SIZE = (224, 224)
STATS_SPLITS = ("auto", "train", "val")


def _all_normal(dataset: Any) -> bool:
    """Whether an anomalib dataset holds only normal images (label 0); False when that cannot be told."""
    samples = getattr(dataset, "samples", None)
    if samples is None or len(samples) == 0 or "label_index" not in getattr(samples, "columns", []):
        return False
    return bool((samples["label_index"] == 0).all())


class GLCF(ReconModuleMixin, AnomalibModule):
    """GLCF (arXiv 2303.05768): global-local correspondence with a semantic bottleneck.

    ``load_from_checkpoint`` restores the teacher and the fitted map statistics from the checkpoint alone.

    Args:
        backbone: Teacher (timm CNN); ``wide_resnet50_2.tv_in1k`` (torchvision weights) as the reference.
        layers: Four teacher layers at strides 4, 8, 16, 32 (``None``: ``layer1``-``layer4`` for ResNets,
            ``blocks.1, blocks.2, blocks.4, blocks.6`` for EfficientNet-Lite).
        weights: ``"imagenet"`` (offline-aware), a local weights file, or ``None``.
        image_size: Input size of the default pre-processor (``None`` = 224, the reference's 256 → 224); a multiple
            of 32. Ignored when a pre-processor is passed (its Resize gives the size).
        embed_dim, depth, num_heads: DPTV encoder (480, 6, 12).
        decoder_embed_dim, decoder_depth, decoder_num_heads: DPTV latent decoders (480, 6, 16).
        mlp_ratio: Block MLP ratio (4).
        legacy_double_residual: The reference's extra outer residual ``x ← Block(x) + x`` (True).
        fuse_patch_scales: Sum the three patch embeddings (True, the paper and the authors' code at a9eaaec);
            False = the deepest scale only (an ablation; an earlier authors' commit, 0571ff1, had it).
        decoder: ``"auto"``: anomalib's reverse-distillation decoder for ResNet teachers, a generic RD-style decoder
            (:class:`~.torch_model.ChannelMirrorDecoder`, **INFERRED**) otherwise; or ``"resnet"`` / ``"generic"``.
        decoder_blocks: Blocks per stage of the generic decoder (2, **INFERRED**).
        train_teacher: ``True`` = optimise the teacher as well, in train mode, as the released code does;
            ``False`` (default) = frozen teacher in eval mode.
        scale_weights: Weights of the standardised scale maps k = 1..3, both branches ((1, 3, 6), ``measure.py``).
        branch_weights: ``(w_L, w_G)`` of ``final = w_L·local + w_G·global`` ((1, 1), **INFERRED**).
        branch: ``"both"`` (default), ``"local"`` or ``"global"``: which branch scores (the key ablation).
        score_reducer: ``"max"`` (default, **INFERRED**) or ``"std"`` of the fused map (``measure.py``).
        blur_sigma: Optional Gaussian σ per upsampled map (the reference's is commented out; σ = 4 if used).
        stats_split: Normal images for the map statistics: ``"auto"`` (the datamodule's validation split when it
            holds only normal images, else the training set), ``"train"`` or ``"val"``.
        stats_max_images: Use the first this many images (in dataset order) for the statistics; ``None`` = all
            (**INFERRED** option, to bound the refit cost on large training sets).
        lr: AdamW learning rate (1e-4).
        betas: AdamW betas ((0.9, 0.95)).
        weight_decay: AdamW weight decay (0.01, PyTorch's default that the reference ends up with).
        lr_milestones: Epochs (or fractions of training, :mod:`~anomalib_recon.components.schedules`) from which the
            learning rate is multiplied by ``lr_gamma``: ``(300,)`` of 501 epochs.
        lr_gamma: Step-decay factor (0.1).
        pre_processor: Pre-processor, or ``True`` for Resize(224) + ImageNet Normalize.
        post_processor: Post-processor or flag.
        evaluator: Evaluator or flag.
        visualizer: Visualizer or flag.

    Example:
        >>> from anomalib.engine import Engine
        >>> model = GLCF()                                                 # reference settings
        >>> Engine(max_epochs=501).fit(model, datamodule=datamodule)       # doctest: +SKIP
    """

    # The argument list repeats the other models' on purpose: one name per concept is the CLI/YAML API, and
    # jsonargparse documents each model from its explicit signature (components/README.md, "What stays repeated").
    def __init__(
        self,
        backbone: str = "wide_resnet50_2.tv_in1k",
        layers: list[int | str] | None = None,
        weights: str | None = "imagenet",
        image_size: int | tuple[int, int] | None = None,
        embed_dim: int = 480,
        depth: int = 6,
        num_heads: int = 12,
        decoder_embed_dim: int = 480,
        decoder_depth: int = 6,
        decoder_num_heads: int = 16,
        mlp_ratio: float = 4.0,
        legacy_double_residual: bool = True,
        fuse_patch_scales: bool = True,
        decoder: str = "auto",
        decoder_blocks: int = 2,
        train_teacher: bool = False,
        scale_weights: tuple[float, float, float] = (1.0, 3.0, 6.0),
        branch_weights: tuple[float, float] = (1.0, 1.0),
        branch: str = "both",
        score_reducer: str = "max",
        blur_sigma: float | None = None,
        stats_split: str = "auto",
        stats_max_images: int | None = None,
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.95),
        weight_decay: float = 0.01,
        lr_milestones: Sequence[float] = (300,),
        lr_gamma: float = 0.1,
        pre_processor: nn.Module | bool = True,
        post_processor: nn.Module | bool = True,
        evaluator: Evaluator | bool = True,
        visualizer: Visualizer | bool = True,
    ) -> None:
        super().__init__(
            sized_pre_processor(type(self), image_size, pre_processor), post_processor, evaluator, visualizer
        )
        check_optimizer_settings("GLCF", lr, weight_decay, betas)
        if stats_max_images is not None and stats_max_images < 1:
            msg = f"stats_max_images must be a positive number of images or None, got {stats_max_images}."
            raise ValueError(msg)
        if stats_split not in STATS_SPLITS:
            msg = f"stats_split must be one of {STATS_SPLITS}, got {stats_split!r}."
            raise ValueError(msg)
        input_size = self.model_input_size(image_size)
        self.lr = float(lr)
        self.betas = (float(betas[0]), float(betas[1]))
        self.weight_decay = float(weight_decay)
        self.lr_milestones = check_lr_schedule(lr_milestones, lr_gamma)
        self.lr_gamma = float(lr_gamma)
        self.stats_split = stats_split
        self.stats_max_images = stats_max_images
        self._stats_stale = False
        self._stats_fingerprint: tuple[float, float] | None = None

        self.model = GLCFModel(
            backbone=backbone,
            layers=layers,
            weights=weights,
            image_size=input_size,
            embed_dim=embed_dim,
            depth=depth,
            num_heads=num_heads,
            decoder_embed_dim=decoder_embed_dim,
            decoder_depth=decoder_depth,
            decoder_num_heads=decoder_num_heads,
            mlp_ratio=mlp_ratio,
            legacy_double_residual=legacy_double_residual,
            fuse_patch_scales=fuse_patch_scales,
            decoder=decoder,
            decoder_blocks=decoder_blocks,
            train_teacher=train_teacher,
            scale_weights=scale_weights,
            branch_weights=branch_weights,
            branch=branch,
            score_reducer=score_reducer,
            blur_sigma=blur_sigma,
        )
        self.loss = GLCFLoss()

    # ------------------------------------------------------------------------------------------------ configuration
    default_image_size = DEFAULT_IMAGE_SIZE

    def configure_optimizers(self) -> dict[str, Any]:
        """AdamW on the trainable parts (the teacher too when ``train_teacher``), ×``lr_gamma`` at ``lr_milestones``."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=self.lr, betas=self.betas, weight_decay=self.weight_decay)
        return multistep_lr(optimizer, self.lr_milestones, self.lr_gamma, self._trainer)

    # ------------------------------------------------------------------------------------------------ steps
    def training_step(self, batch: Batch, *args, **kwargs) -> STEP_OUTPUT:
        """Three global-cosine correspondence terms on a normal batch; returns the total."""
        del args, kwargs
        out = self.model(batch.image)
        losses = self.loss(out.teacher, out.local, out.global_features, out.global_estimates)
        self._stats_stale = True
        size = int(batch.image.shape[0])
        self.log("train_loss", losses["loss"], on_step=True, on_epoch=True, prog_bar=True, batch_size=size)
        for name in ("local_local", "local_global", "global_global"):
            self.log(f"train_{name}", losses[name], on_step=False, on_epoch=True, batch_size=size)
        return {"loss": losses["loss"]}

    # ------------------------------------------------------------------------------------------------ statistics
    def _weights_fingerprint(self) -> tuple[float, float]:
        """Cheap summary of the trainable weights (sum and sum of squares, float64)."""
        total, squares = 0.0, 0.0
        with torch.no_grad():
            for param in self.model.parameters():
                if param.requires_grad:
                    flat = param.detach().double()
                    total += float(flat.sum())
                    squares += float((flat * flat).sum())
        return total, squares

    def statistics_outdated(self) -> bool:
        """Whether the weights changed since the statistics were fitted in this process.

        True after training steps, or after other weights were loaded into ``model`` (e.g. a learning-curve
        snapshot). Statistics restored from a checkpoint are trusted (no fingerprint yet).
        """
        if self._stats_stale:
            return True
        return self._stats_fingerprint is not None and self._stats_fingerprint != self._weights_fingerprint()

    def on_validation_start(self) -> None:
        """Refit the map statistics when the weights changed since the last fit (validation inside ``fit``)."""
        if self.statistics_outdated():
            self.fit_statistics()

    def on_test_start(self) -> None:
        """Refit the map statistics if other weights were loaded since they were fitted."""
        if self.statistics_outdated():
            self.fit_statistics()

    def on_train_end(self) -> None:
        """Fit the map statistics after the last training step, unless a validation already did with these weights."""
        if self._stats_stale:
            self.fit_statistics()

    def _statistics_source(self) -> tuple[Any, str]:
        """Where the statistics come from: ``(None, "training")`` for the training set, or ``(dataset,
        "validation")`` for the datamodule's normal-only validation split; the shared loop reads either, sharded and
        gathered under DDP."""
        trainer = getattr(self, "_trainer", None)
        datamodule = getattr(trainer, "datamodule", None) if trainer is not None else None
        val = getattr(datamodule, "val_data", None)
        if self.stats_split in ("auto", "val") and val is not None and _all_normal(val):
            return val, "validation"
        if self.stats_split == "val":
            msg = (
                "GLCF: stats_split='val' but the datamodule's validation split is missing or holds anomalous images; "
                "use stats_split='train' or a datamodule with a normal-only validation split (e.g. MVTec LOCO)."
            )
            raise ValueError(msg)
        return None, "training"

    def _map_moment_rows(self, images: torch.Tensor) -> torch.Tensor:
        """One row per pre-processed image: its maps' means and standard deviations ``(B, 4, 3)``."""
        return torch.cat(self.model.map_moments(images), dim=1)

    def fit_statistics(self, dataloader: Iterable | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Fit ``(μ, σ)`` per (branch, scale) on normal images and store them as buffers.

        Every DDP rank ends with the statistics a single process computes on rank 0's model: the shared loop
        (:func:`~anomalib_recon.components.normal_images.collect_normal_images`) takes the model's buffers (the
        decoders' batch-norm statistics, which each rank updates on its own batches) from rank 0, reads each rank's
        share of the training set or of the normal validation split, and gathers the per-image rows.

        Args:
            dataloader: Batches of *raw* normal images (anomalib batches or tensors; the pre-processor is applied
                here, as the Lightning loops do), read as given on this process. ``None``: the source chosen by
                ``stats_split`` (called automatically during ``Engine.fit``). At most ``stats_max_images`` images
                are used either way.
        """
        source, dataset = "given", None
        if dataloader is None:
            dataset, source = self._statistics_source()
        with torch.inference_mode(False), torch.no_grad():
            rows = collect_normal_images(self, self._map_moment_rows, self.stats_max_images, dataloader, dataset)
            mean, std = self.model.statistics_from_moments(rows[:, :2], rows[:, 2:])
            mean, std = mean.to(self.model.stats_mean), std.to(self.model.stats_std)
            self.model.set_statistics(mean, std)
        self._stats_stale = False
        self._stats_fingerprint = self._weights_fingerprint()
        logger.info(
            "GLCF: map statistics fitted on %d %s images: mean %s, std %s",
            rows.shape[0],
            source,
            mean.tolist(),
            std.tolist(),
        )
        return mean, std

    # ------------------------------------------------------------------------------------------------ export
    def to_torch(self, *args, **kwargs) -> Path:
        """anomalib's export, refused while the map statistics are unfitted (the graph would carry μ=0, σ=1)."""
        self.model.require_statistics()
        return super().to_torch(*args, **kwargs)

    def to_onnx(self, *args, **kwargs) -> Path:
        """anomalib's ONNX export of the full path, including the fitted statistics (refused if unfitted)."""
        self.model.require_statistics()
        return super().to_onnx(*args, **kwargs)

    def to_openvino(self, *args, **kwargs) -> Path:
        """anomalib's OpenVINO export (via ONNX), refused while the statistics are unfitted."""
        self.model.require_statistics()
        return super().to_openvino(*args, **kwargs)

    @property
    def parameter_counts(self) -> dict[str, int]:
        """Trainable and frozen parameter counts."""
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.model.parameters())
        return {"trainable": trainable, "frozen": total - trainable, "total": total}
