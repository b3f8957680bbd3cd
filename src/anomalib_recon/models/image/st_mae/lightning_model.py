"""ST-MAE: Siamese Transition Masked Autoencoders as Uniform Unsupervised Visual Anomaly Detector.

Paper: H. Yao et al., *Siamese Transition Masked Autoencoders as Uniform Unsupervised Visual Anomaly Detector*,
arXiv 2211.00349. No official code; read for understanding only: the re-implementation GitHub TSTB-dev/ST-MAE
(commit a8afa00, MIT licence) and the authors' related repository GitHub hmyao22/PSA (commit 7f607e7: loss, map,
training recipe and a two-subset auxiliary-token variant).

Feature-patch tokens of frozen, fused CNN features are split into two disjoint random halves; one (Siamese) ViT
encoder encodes each half; the decoder predicts each half's tokens from the *other* half's encoding, so an anomaly
cannot be copied through; the residual between the features and their prediction is the anomaly map.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from anomalib.data import Batch
from anomalib.metrics import Evaluator
from anomalib.models.components import AnomalibModule
from anomalib.visualization import Visualizer
from lightning.pytorch.utilities.types import STEP_OUTPUT
from torch import nn

from anomalib_recon.components.guards import check_optimizer_settings, is_finite_number
from anomalib_recon.components.module import ReconModuleMixin
from anomalib_recon.components.preprocessing import sized_pre_processor
from anomalib_recon.components.schedules import check_lr_schedule, multistep_lr

from .loss import STMAELoss
from .torch_model import STMAEModel

logger = logging.getLogger(__name__)

__all__ = ["STMAE"]

DEFAULT_IMAGE_SIZE = (256, 256)


class STMAE(ReconModuleMixin, AnomalibModule):
    """ST-MAE (arXiv 2211.00349): Siamese transition masked autoencoder on frozen CNN features.

    ``load_from_checkpoint`` restores the frozen backbone from the checkpoint alone (no weight download).

    Args:
        backbone: timm CNN; ``vgg19.tv_in1k`` (torchvision ImageNet weights) as in the paper.
        layers: Backbone layers to fuse; ``None`` = the first four feature levels (VGG19 relu1_2, relu2_2, relu3_4,
            relu4_4: 960 channels; EfficientNet-Lite0 ``blocks.0, 1, 2, 4``: 192 channels).
        weights: ``"imagenet"`` (offline-aware, see ``anomalib_recon.components.weights``), a local weights file,
            or ``None`` (random init, for tests).
        image_size: Input size of the default pre-processor (``None`` = 256×256); a multiple of
            ``fusion_stride · patch_size`` (16) with an even number of tokens. Ignored when a pre-processor is passed:
            the model then takes its size from that pre-processor's Resize.
        post_pool: 2×2 max-pool each tapped map before fusion (VGG19: the authors' post-pool stage outputs); False =
            pre-pool ReLU outputs (INFERRED default, the re-implementation's taps).
        fusion_stride: Stride of the fused feature grid (4: 64×64 at 256 px; INFERRED).
        patch_size: Feature-patch size (4: 16×16 = 256 tokens at 256 px; INFERRED).
        embed_dim, depth, num_heads: Siamese encoder (240, 12, 12; INFERRED "tiny" size).
        decoder_embed_dim, decoder_depth, decoder_num_heads: Lightweight decoder (256, 8, 16; INFERRED).
        mlp_ratio: Block MLP ratio (4).
        transition: ``"swap"`` (the paper: each half predicted from the other half's encoding), ``"self"`` (each half
            decoded at its own positions: the self-reconstruction ablation) or ``"aux_token"`` (the authors' PSA
            two-subset variant with learned auxiliary tokens).
        n_partitions: Fixed test partitions whose maps are averaged (1; INFERRED). Each reconstructs every token once.
        partition_seed: Seed of the fixed test partitions (0): every image is scored with the same partitions, so
            scores are reproducible, independent of the batch, and exportable.
        blur_sigma: Gaussian σ of the upsampled map (4, kernel 33); ``None`` = no blur.
        direction_weight: Weight of the per-token cosine term of the loss (5).
        lr: AdamW learning rate (1e-4).
        betas: AdamW betas ((0.9, 0.95)).
        weight_decay: AdamW weight decay (0.05).
        lr_milestones: Epochs (or fractions of training) from which the learning rate is multiplied by ``lr_gamma``
            (``(300,)`` of 400 epochs).
        lr_gamma: Step-decay factor (0.1).
        pre_processor: Pre-processor, or ``True`` for Resize(256) + ImageNet Normalize.
        post_processor: Post-processor or flag.
        evaluator: Evaluator or flag.
        visualizer: Visualizer or flag.

    Example:
        >>> from anomalib.engine import Engine
        >>> model = STMAE()                                                # paper settings
        >>> Engine(max_epochs=400).fit(model, datamodule=datamodule)       # doctest: +SKIP
    """

    # The argument list repeats the other models' on purpose: one name per concept is the CLI/YAML API, and
    # jsonargparse documents each model from its explicit signature (components/README.md, "What stays repeated").
    def __init__(
        self,
        backbone: str = "vgg19.tv_in1k",
        layers: list[int | str] | None = None,
        weights: str | None = "imagenet",
        image_size: int | tuple[int, int] | None = None,
        post_pool: bool = False,
        fusion_stride: int = 4,
        patch_size: int = 4,
        embed_dim: int = 240,
        depth: int = 12,
        num_heads: int = 12,
        decoder_embed_dim: int = 256,
        decoder_depth: int = 8,
        decoder_num_heads: int = 16,
        mlp_ratio: float = 4.0,
        transition: str = "swap",
        n_partitions: int = 1,
        partition_seed: int = 0,
        blur_sigma: float | None = 4.0,
        direction_weight: float = 5.0,
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.95),
        weight_decay: float = 0.05,
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
        check_optimizer_settings("STMAE", lr, weight_decay, betas)
        if not is_finite_number(direction_weight) or direction_weight < 0:
            msg = f"STMAE: direction_weight must be a finite number >= 0, got {direction_weight!r}."
            raise ValueError(msg)
        input_size = self.model_input_size(image_size)
        self.lr = float(lr)
        self.betas = (float(betas[0]), float(betas[1]))
        self.weight_decay = float(weight_decay)
        self.lr_milestones = check_lr_schedule(lr_milestones, lr_gamma)
        self.lr_gamma = float(lr_gamma)

        self.model = STMAEModel(
            backbone=backbone,
            layers=layers,
            weights=weights,
            image_size=input_size,
            post_pool=post_pool,
            fusion_stride=fusion_stride,
            patch_size=patch_size,
            embed_dim=embed_dim,
            depth=depth,
            num_heads=num_heads,
            decoder_embed_dim=decoder_embed_dim,
            decoder_depth=decoder_depth,
            decoder_num_heads=decoder_num_heads,
            mlp_ratio=mlp_ratio,
            transition=transition,
            n_partitions=n_partitions,
            partition_seed=partition_seed,
            blur_sigma=blur_sigma,
        )
        self.loss = STMAELoss(direction_weight=direction_weight)

    # ------------------------------------------------------------------------------------------------ configuration
    default_image_size = DEFAULT_IMAGE_SIZE

    def configure_optimizers(self) -> dict[str, Any]:
        """AdamW on the trainable parts (the backbone is frozen), ×``lr_gamma`` at ``lr_milestones``."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=self.lr, betas=self.betas, weight_decay=self.weight_decay)
        return multistep_lr(optimizer, self.lr_milestones, self.lr_gamma, self._trainer)

    # ------------------------------------------------------------------------------------------------ steps
    def training_step(self, batch: Batch, *args, **kwargs) -> STEP_OUTPUT:
        """A fresh random partition per image; every token predicted from the other half; returns the loss."""
        del args, kwargs
        out = self.model(batch.image)
        losses = self.loss(out.pred_tokens, out.target_tokens)
        size = int(batch.image.shape[0])
        self.log("train_loss", losses["loss"], on_step=True, on_epoch=True, prog_bar=True, batch_size=size)
        for name in ("distance", "direction"):
            self.log(f"train_{name}", losses[name], on_step=False, on_epoch=True, batch_size=size)
        return {"loss": losses["loss"]}

    @property
    def parameter_counts(self) -> dict[str, int]:
        """Trainable and frozen parameter counts."""
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.model.parameters())
        return {"trainable": trainable, "frozen": total - trainable, "total": total}
