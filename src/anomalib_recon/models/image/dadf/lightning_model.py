"""DADF: Dual-Attention Transformer and Discriminative Flow for industrial visual anomaly detection.

Paper: H. Yao et al., *Dual-Attention Transformer and Discriminative Flow for Industrial Visual Anomaly
Detection*, IEEE T-ASE 2023 (arXiv 2303.17882). Authors' code: GitHub hmyao22/DADF, commit ebef0b6 (MIT licence).

Both stages train inside one anomalib model, so one ``anomalib train`` runs them in order: stage 1
("reconstruction") trains the dual-attention transformer with AdamW, stage 2 ("flow") freezes it and trains the
per-scale normalizing flows with Adam. The switch is by epoch (the paper: 200 + 15) or, with
``reconstruction_steps``, by optimizer step (for ``max_steps`` budgets).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from anomalib.data import Batch
from anomalib.metrics import Evaluator
from anomalib.models.components import AnomalibModule
from anomalib.visualization import Visualizer
from lightning.pytorch.utilities.types import STEP_OUTPUT
from torch import nn

from anomalib_recon.components.checkpoint import restoring_from_checkpoint
from anomalib_recon.components.guards import check_optimizer_settings
from anomalib_recon.components.module import ReconModuleMixin
from anomalib_recon.components.preprocessing import sized_pre_processor
from anomalib_recon.components.schedules import plan_two_stages

from .loss import DADFFlowLoss, DADFReconstructionLoss
from .torch_model import DADFModel, permutation_matrices_to_indices

logger = logging.getLogger(__name__)

__all__ = ["DADF", "STAGES"]

DEFAULT_IMAGE_SIZE = (256, 256)
STAGES = ("reconstruction", "flow")


class DADF(ReconModuleMixin, AnomalibModule):
    """DADF (T-ASE 2023): dual-attention feature reconstruction, then discriminative normalizing flows.

    ``load_from_checkpoint`` restores the frozen backbone from the checkpoint alone (no weight download).

    Stage switch: by default stage 1 runs for ``reconstruction_epochs`` epochs and stage 2 for ``flow_epochs``
    (``trainer_arguments`` sets ``max_epochs`` to their sum). With ``reconstruction_steps`` the switch is at that
    optimizer step instead and the trainer's ``max_steps`` (or ``max_epochs``) ends training; use this with step
    budgets. Training that would end before stage 2 starts is refused at the start of fit with a clear error.

    Validation before stage 2 scores with untrained flows; an info line says so, and its values (none are
    logged by default) mean nothing. It does not leak into the result: anomalib's post-processor recomputes its
    normalisation and thresholds from scratch at every validation, and the last validation is always after the
    last training step (with ``max_steps`` the shared ``ModelGuard`` stops training through ``should_stop``, so
    Lightning validates the final weights even mid-epoch).

    Args:
        backbone: timm CNN. ``wide_resnet50_2.tv_in1k`` (layer1-3) by default: the reference's flow script uses
            WideResNet-50, its config file defaults to ResNet-18 (``resnet18.tv_in1k`` is the light option).
        layers: Three backbone layers; ``None`` = the layers at strides 4, 8, 16.
        weights: ``"imagenet"`` (offline-aware), a local weights file, or ``None`` (random init, for tests).
        image_size: Input size of the default pre-processor (``None`` = 256×256); a multiple of 16. Ignored when
            a pre-processor is passed (the model then takes its size from that pre-processor's Resize).
        patch_sizes: Patch size per scale; ``None`` = (4, 2, 1) for strides 4/8/16.
        embed_dim_per_scale: Width of each scale's token embedding (480); ``3·embed_dim_per_scale`` must be
            divisible by 4 and by ``num_heads``.
        depth: Dual-attention blocks (8).
        num_heads: Attention heads (8).
        mlp_ratio: Block MLP ratio (4).
        flow_steps: ``AllInOneBlock`` s per flow (8).
        flow_clamp: Affine clamping of the flows (2.0).
        use_memory: Dual attention (True); ``False`` = self-reconstruction only (flows on ``[f, X̂]``).
        flow_input: ``"reconstruction"`` (flows on ``[f, X̂, M̂]``) or ``"features"`` (flows on the raw backbone
            features only; no transformer and no stage 1).
        reconstruction_epochs: Stage-1 epochs (200).
        flow_epochs: Stage-2 epochs (15).
        reconstruction_steps: Switch to stage 2 after this many optimizer steps instead of by epoch (``None``).
        lr: Stage-1 AdamW learning rate (1e-4, constant).
        betas: Stage-1 AdamW betas ((0.9, 0.95)).
        weight_decay: Stage-1 AdamW weight decay (0.01, PyTorch's default the reference ends up with).
        flow_lr: Stage-2 Adam learning rate (1e-3).
        flow_weight_decay: Stage-2 Adam weight decay (1e-5).
        pre_processor: Pre-processor, or ``True`` for Resize(256) + ImageNet Normalize.
        post_processor: Post-processor or flag.
        evaluator: Evaluator or flag.
        visualizer: Visualizer or flag.

    Example:
        >>> from anomalib.engine import Engine
        >>> model = DADF()                                                 # paper settings, 200 + 15 epochs
        >>> Engine().fit(model, datamodule=datamodule)                     # doctest: +SKIP
        >>> small = DADF(backbone="tf_efficientnet_lite0", reconstruction_steps=250)
        >>> Engine(max_steps=300).fit(small, datamodule=datamodule)        # doctest: +SKIP
    """

    # The argument list repeats the other models' on purpose: one name per concept is the CLI/YAML API, and
    # jsonargparse documents each model from its explicit signature (components/README.md, "What stays repeated").
    def __init__(
        self,
        backbone: str = "wide_resnet50_2.tv_in1k",
        layers: list[int | str] | None = None,
        weights: str | None = "imagenet",
        image_size: int | tuple[int, int] | None = None,
        patch_sizes: list[int] | None = None,
        embed_dim_per_scale: int = 480,
        depth: int = 8,
        num_heads: int = 8,
        mlp_ratio: float = 4.0,
        flow_steps: int = 8,
        flow_clamp: float = 2.0,
        use_memory: bool = True,
        flow_input: str = "reconstruction",
        reconstruction_epochs: int = 200,
        flow_epochs: int = 15,
        reconstruction_steps: int | None = None,
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.95),
        weight_decay: float = 0.01,
        flow_lr: float = 1e-3,
        flow_weight_decay: float = 1e-5,
        pre_processor: nn.Module | bool = True,
        post_processor: nn.Module | bool = True,
        evaluator: Evaluator | bool = True,
        visualizer: Visualizer | bool = True,
    ) -> None:
        super().__init__(
            sized_pre_processor(type(self), image_size, pre_processor), post_processor, evaluator, visualizer
        )
        for name, value in (("reconstruction_epochs", reconstruction_epochs), ("flow_epochs", flow_epochs)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                msg = f"{name} must be an int >= 0, got {value!r}."
                raise ValueError(msg)
        if reconstruction_steps is not None and (not isinstance(reconstruction_steps, int) or reconstruction_steps < 0):
            msg = f"reconstruction_steps must be None or an int >= 0, got {reconstruction_steps!r}."
            raise ValueError(msg)
        if reconstruction_steps is None and reconstruction_epochs + flow_epochs == 0:
            msg = "reconstruction_epochs + flow_epochs must be positive."
            raise ValueError(msg)
        check_optimizer_settings("DADF", lr, weight_decay, betas)
        check_optimizer_settings("DADF", flow_lr, flow_weight_decay, prefix="flow_")
        self.reconstruction_epochs = int(reconstruction_epochs)
        self.flow_epochs = int(flow_epochs)
        self.reconstruction_steps = None if reconstruction_steps is None else int(reconstruction_steps)
        self.lr = float(lr)
        self.betas = (float(betas[0]), float(betas[1]))
        self.weight_decay = float(weight_decay)
        self.flow_lr = float(flow_lr)
        self.flow_weight_decay = float(flow_weight_decay)
        self.automatic_optimization = False
        self._model_args = {
            "backbone": backbone,
            "layers": layers,
            "weights": weights,
            "patch_sizes": patch_sizes,
            "embed_dim_per_scale": embed_dim_per_scale,
            "depth": depth,
            "num_heads": num_heads,
            "mlp_ratio": mlp_ratio,
            "flow_steps": flow_steps,
            "flow_clamp": flow_clamp,
            "use_memory": use_memory,
            "flow_input": flow_input,
        }
        input_size = self.model_input_size(image_size)
        self.model = DADFModel(image_size=input_size, **self._model_args)
        self.reconstruction_loss = DADFReconstructionLoss()
        self.flow_loss = DADFFlowLoss()
        self._logged_stage1_validation = False

    # ------------------------------------------------------------------------------------------------ configuration
    default_image_size = DEFAULT_IMAGE_SIZE

    @property
    def trainer_arguments(self) -> dict[str, Any]:
        """No sanity validation; epoch switch: ``max_epochs = reconstruction_epochs + flow_epochs`` (215).

        With ``reconstruction_steps`` the budget is left to the trainer (``max_steps`` / ``max_epochs``).
        """
        if self.reconstruction_steps is not None:
            return {"num_sanity_val_steps": 0}
        return {"max_epochs": self.reconstruction_epochs + self.flow_epochs, "num_sanity_val_steps": 0}

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        """``[AdamW(transformer), Adam(flows)]``; only the flows' Adam without a transformer (flows on features)."""
        flow = torch.optim.Adam(self.model.flow_parameters(), lr=self.flow_lr, weight_decay=self.flow_weight_decay)
        params = self.model.reconstruction_parameters()
        if not params:
            return [flow]
        rec = torch.optim.AdamW(params, lr=self.lr, betas=self.betas, weight_decay=self.weight_decay)
        return [rec, flow]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Rebuild the model for the checkpoint's input size (fixed-size memory and LayerNorms), then restore.

        The size comes from the size record of the checkpoint, if any, else from its restored pre-processor.
        Checkpoints that stored the flows' fixed permutations as matrices are converted to index buffers first.
        """
        if checkpoint.get("state_dict"):
            permutation_matrices_to_indices(checkpoint["state_dict"])
        recorded = (checkpoint.get("anomalib_recon") or {}).get("input_size")
        if recorded is not None:
            self._build_for(recorded)
        super().on_load_checkpoint(checkpoint)
        if self.input_size is not None:
            self._build_for(self.input_size)

    def _build_for(self, size: Any) -> None:
        size = (int(size[0]), int(size[1]))
        if size != self.model.image_size:
            with restoring_from_checkpoint():  # every tensor comes from the checkpoint: no weight download
                self.model = DADFModel(image_size=size, **self._model_args)

    def setup(self, stage: str) -> None:
        """Under DDP, let DDP look for unused parameters before it wraps the model.

        The two stages train disjoint parameter sets (stage 1 the transformer, stage 2 the flows), so in every step
        the other stage's parameters get no gradient, which DDP's default ``find_unused_parameters=False`` refuses
        ("parameters that were not used in producing the loss"). Lightning's DDP strategies take the flag only as a
        constructor argument; it is set here on the strategy's DDP arguments, which Lightning reads when it wraps the
        model after this hook. Any other strategy is left as it is.
        """
        del stage
        strategy = getattr(self._trainer, "strategy", None)
        ddp_kwargs = getattr(strategy, "_ddp_kwargs", None)
        if (
            self.model.has_reconstruction
            and isinstance(ddp_kwargs, dict)
            and not ddp_kwargs.get("find_unused_parameters")
        ):
            ddp_kwargs["find_unused_parameters"] = True
            logger.info("DADF: DDP will find unused parameters (each stage trains only its own parameters).")

    # ------------------------------------------------------------------------------------------------ stages
    @property
    def stage(self) -> str:
        """``"reconstruction"`` (stage 1) or ``"flow"`` (stage 2) at the current epoch / optimizer step."""
        if not self.model.has_reconstruction:
            return "flow"
        if self.reconstruction_steps is not None:
            return "flow" if self.global_step >= self.reconstruction_steps else "reconstruction"
        return "flow" if self.current_epoch >= self.reconstruction_epochs else "reconstruction"

    def _switch_step(self, batches_per_epoch: float) -> float:
        if not self.model.has_reconstruction:
            return 0
        if self.reconstruction_steps is not None:
            return self.reconstruction_steps
        return self.reconstruction_epochs * batches_per_epoch

    def on_train_start(self) -> None:
        """Refuse a budget that ends before stage 2 (the flows, which give the map, would stay untrained)."""
        _, switch, _ = plan_two_stages(
            "DADF",
            self.trainer,
            self._switch_step,
            self.reconstruction_steps,
            self.reconstruction_epochs,
            stage2="the flows",
            suggestion="5/6",
        )
        logger.info("DADF: stage 1 (reconstruction) until step %s, then stage 2 (flows).", int(switch))

    # ------------------------------------------------------------------------------------------------ steps
    def training_step(self, batch: Batch, *args, **kwargs) -> STEP_OUTPUT:
        """One step of the current stage with its own optimiser (zeroed every step)."""
        del args, kwargs
        optimizers = self.optimizers()
        optimizers = optimizers if isinstance(optimizers, list) else [optimizers]
        stage = self.stage
        size = int(batch.image.shape[0])
        if stage == "reconstruction":
            self.model.freeze_reconstruction(False)
            out = self.model.reconstruction_outputs(batch.image)
            losses = self.reconstruction_loss(out.self_tokens, out.memory_tokens, out.targets)
            loss = losses["loss"]
            self.log("train_self_loss", losses["self"], on_step=False, on_epoch=True, batch_size=size)
            self.log("train_memory_loss", losses["memory"], on_step=False, on_epoch=True, batch_size=size)
            optimizer = optimizers[0]
        else:
            self.model.freeze_reconstruction(True)
            hidden, log_jacobians = self.model.flow_outputs(batch.image)
            loss = self.flow_loss(hidden, log_jacobians)
            self.log("train_flow_loss", loss, on_step=False, on_epoch=True, batch_size=size)
            optimizer = optimizers[-1]
        optimizer.zero_grad()
        self.manual_backward(loss)  # a non-finite loss stops here (ModelGuard.on_before_backward)
        optimizer.step()
        self.log("train_loss", loss, on_step=True, on_epoch=False, prog_bar=True, batch_size=size)
        self.log("stage", float(STAGES.index(stage)), on_step=True, on_epoch=False, batch_size=size)
        return {"loss": loss.detach()}

    def on_validation_epoch_start(self) -> None:
        """Say once that stage-1 validation scores with untrained flows."""
        if self.stage == "reconstruction" and not self._logged_stage1_validation:
            logger.info(
                "DADF: validation during stage 1 scores with untrained flows (meaningless values); the "
                "post-processor's thresholds are recomputed at the first validation of stage 2."
            )
            self._logged_stage1_validation = True

    @property
    def parameter_counts(self) -> dict[str, int]:
        """Transformer, flow and frozen-backbone parameter counts."""
        rec = sum(p.numel() for p in self.model.reconstruction_parameters())
        flow = sum(p.numel() for p in self.model.flow_parameters())
        total = sum(p.numel() for p in self.model.parameters())
        return {"reconstruction": rec, "flow": flow, "frozen": total - rec - flow, "total": total}
