"""PNPT: Prior Normality Prompt Transformer for multi-class industrial image anomaly detection.

Paper: H. Yao et al., *Prior Normality Prompt Transformer for Multi-class Industrial Image Anomaly Detection*,
IEEE Transactions on Industrial Informatics 2024 (arXiv 2406.11507). No public code; the architecture is a
documented re-design (see the README), consistent with the same first author's DADF (GitHub hmyao22/DADF).

One model is trained on several categories at once (``anomalib_recon.data.MultiCategory``). The classes come from
the datamodule at ``fit``: its ``categories`` (and the category of each training image from its ``category_of``),
or one class named after any other datamodule. Training selects each image's prompt by its category; inference
infers the category from the image (nearest class key) unless ``prompt_selection="oracle"``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
from anomalib.data import Batch
from anomalib.metrics import Evaluator
from anomalib.models.components import AnomalibModule
from anomalib.visualization import Visualizer
from lightning.pytorch.utilities.types import STEP_OUTPUT
from torch import distributed as dist
from torch import nn

from anomalib_recon.components.checkpoint import restoring_from_checkpoint
from anomalib_recon.components.guards import check_optimizer_settings, is_finite_number
from anomalib_recon.components.module import ReconModuleMixin
from anomalib_recon.components.normal_images import normal_image_batches, preprocess, training_dataset
from anomalib_recon.components.preprocessing import sized_pre_processor

from .loss import PNPTLoss
from .torch_model import PNPTModel

logger = logging.getLogger(__name__)

__all__ = ["PNPT", "PROMPT_SELECTIONS", "WarmupCosine"]

DEFAULT_IMAGE_SIZE = (256, 256)
PROMPT_SELECTIONS = ("inferred", "oracle")
"""How validation/test pick each image's prompt: the nearest class key (no labels needed), or its true category."""


class WarmupCosine:
    """Learning-rate factor of step ``t``: linear warm-up over ``warmup`` steps, then cosine decay to ``final``.

    ``f(t) = (t + 1) / warmup`` for ``t < warmup``; then ``final + (1 − final)·½(1 + cos(π·min(1, (t − warmup) /
    (total − warmup))))``, where ``final = final_lr / lr``. A callable object, so ``LambdaLR`` saves it in checkpoints.
    """

    def __init__(self, total: int, warmup: int, final: float) -> None:
        self.total = int(total)
        self.warmup = int(warmup)
        self.final = float(final)

    def __call__(self, step: int) -> float:
        """The factor of the base learning rate at optimizer step ``step`` (0-based)."""
        if step < self.warmup:
            return (step + 1) / self.warmup
        progress = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        return self.final + (1.0 - self.final) * 0.5 * (1.0 + math.cos(math.pi * progress))


class PNPT(ReconModuleMixin, AnomalibModule):
    """PNPT (IEEE TII 2024): class-specific normality prompts condition a dual-stream feature reconstruction.

    ``load_from_checkpoint`` restores the frozen backbone from the checkpoint alone (no weight download); the prompt
    pool takes its classes from the checkpoint.

    Args:
        backbone: timm CNN; ``wide_resnet50_2.tv_in1k`` (layer1-3) by default, as DADF's pyramid (INFERRED).
        layers: Three backbone layers; ``None`` = the layers at strides 4, 8, 16.
        weights: ``"imagenet"`` (offline-aware), a local weights file, or ``None`` (random init, for tests).
        image_size: Input size of the default pre-processor (``None`` = 256×256); a multiple of 16. Ignored when a
            pre-processor is passed (the model then takes its size from that pre-processor's Resize).
        patch_sizes: Patch size per scale; ``None`` = (4, 2, 1) for strides 4/8/16.
        embed_dim_per_scale: Width of each scale's token embedding (256, so 768-d tokens).
        depth: SACE (encoder) blocks (6).
        decoder_depth: CSCD (decoder) blocks (4).
        num_heads: Attention heads (8).
        mlp_ratio: Block MLP ratio (4).
        prompts: ``"class"`` (a prompt per class, the paper), ``"shared"`` (one prompt for all classes) or ``"none"``
            (no prompt stream).
        prompt_prior: Prompts start from the class's mean feature map (``HPE(μ_c) + pos + Δ_c``, True) or are
            learnable tokens only (``pos + Δ_c``).
        prompt_selection: ``"inferred"`` (nearest class key, the default and what exports do) or ``"oracle"`` (the
            datamodule's category of each image) at validation/test/predict. Training always uses the category.
        map_streams: ``"both"`` (½ of each stream's residual), ``"sample"`` or ``"prompt"``.
        scale_weights: Weight of each scale's residual in the map (strides 4, 8, 16); (1, 1, 1) = the plain sum
            (INFERRED; the paper gives no fusion formula); 0 leaves a scale out of the map (it is still trained).
        blur_sigma: Gaussian σ of the map (4); ``None`` = no blur.
        lr: AdamW learning rate (1e-4).
        betas: AdamW betas ((0.9, 0.95)).
        weight_decay: AdamW weight decay (0.05).
        warmup_epochs: Linear warm-up, in epochs (an integer >= 1; 10) or as a fraction of training in (0, 1);
            0 = none. Then cosine decay to ``final_lr`` at the end of training (``max_epochs`` or ``max_steps``).
        final_lr: Learning rate at the end of the cosine decay (0).
        pre_processor: Pre-processor, or ``True`` for Resize(256) + ImageNet Normalize.
        post_processor: Post-processor or flag.
        evaluator: Evaluator or flag.
        visualizer: Visualizer or flag.

    Example:
        >>> from anomalib.engine import Engine
        >>> from anomalib_recon.data import MultiCategory
        >>> datamodule = MultiCategory(root="./datasets/MVTecAD", categories=["bottle", "cable"])
        >>> Engine(max_epochs=300).fit(PNPT(), datamodule=datamodule)          # doctest: +SKIP
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
        embed_dim_per_scale: int = 256,
        depth: int = 6,
        decoder_depth: int = 4,
        num_heads: int = 8,
        mlp_ratio: float = 4.0,
        prompts: str = "class",
        prompt_prior: bool = True,
        prompt_selection: str = "inferred",
        map_streams: str = "both",
        scale_weights: tuple[float, float, float] = (1.0, 1.0, 1.0),
        blur_sigma: float | None = 4.0,
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.95),
        weight_decay: float = 0.05,
        warmup_epochs: float = 10,
        final_lr: float = 0.0,
        pre_processor: nn.Module | bool = True,
        post_processor: nn.Module | bool = True,
        evaluator: Evaluator | bool = True,
        visualizer: Visualizer | bool = True,
    ) -> None:
        super().__init__(
            sized_pre_processor(type(self), image_size, pre_processor), post_processor, evaluator, visualizer
        )
        _check_training_settings(lr, betas, weight_decay, warmup_epochs, final_lr)
        if prompt_selection not in PROMPT_SELECTIONS:
            msg = f"PNPT: prompt_selection must be one of {PROMPT_SELECTIONS}, got {prompt_selection!r}."
            raise ValueError(msg)
        self.lr = float(lr)
        self.betas = (float(betas[0]), float(betas[1]))
        self.weight_decay = float(weight_decay)
        self.warmup_epochs = float(warmup_epochs)
        self.final_lr = float(final_lr)
        self.prompt_selection = prompt_selection
        self._model_args = {
            "backbone": backbone,
            "layers": layers,
            "weights": weights,
            "patch_sizes": patch_sizes,
            "embed_dim_per_scale": embed_dim_per_scale,
            "depth": depth,
            "decoder_depth": decoder_depth,
            "num_heads": num_heads,
            "mlp_ratio": mlp_ratio,
            "prompts": prompts,
            "prompt_prior": prompt_prior,
            "map_streams": map_streams,
            "scale_weights": scale_weights,
            "blur_sigma": blur_sigma,
        }
        input_size = self.model_input_size(image_size)
        self.model = PNPTModel(image_size=input_size, **self._model_args)
        self.loss = PNPTLoss()
        self._category_fn: Callable[[str], str] | None = None

    # ------------------------------------------------------------------------------------------------ configuration
    default_image_size = DEFAULT_IMAGE_SIZE

    def configure_optimizers(self) -> torch.optim.Optimizer | dict[str, Any]:
        """AdamW on everything but the backbone, with the warm-up + cosine schedule stepped every optimizer step.

        Without a trainer or a finite training length (``max_time`` only) the learning rate stays constant.
        """
        optimizer = torch.optim.AdamW(
            self.model.trainable_parameters(), lr=self.lr, betas=self.betas, weight_decay=self.weight_decay
        )
        schedule = self._schedule()
        if schedule is None:
            return optimizer
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _schedule(self) -> WarmupCosine | None:
        trainer = self._trainer
        if trainer is None:
            return None
        total = trainer.estimated_stepping_batches
        if total is None or not math.isfinite(float(total)) or total <= 0:
            logger.info("PNPT: no finite training length (max_epochs/max_steps); constant learning rate %g.", self.lr)
            return None
        total = int(total)
        if self.warmup_epochs >= 1:
            batches = float(trainer.num_training_batches)
            accumulate = max(1, int(getattr(trainer, "accumulate_grad_batches", 1) or 1))
            per_epoch = math.ceil(batches / accumulate) if math.isfinite(batches) and batches > 0 else total
            warmup = int(self.warmup_epochs) * per_epoch
        else:
            warmup = round(self.warmup_epochs * total)
        return WarmupCosine(total, min(warmup, total), self.final_lr / self.lr)

    # ------------------------------------------------------------------------------------------------ classes
    def setup(self, stage: str) -> None:
        """Find the datamodule's category lookup; at ``fit``, size the prompt pool for its classes."""
        super().setup(stage)
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        lookup = getattr(datamodule, "category_of", None)
        self._category_fn = lookup if callable(lookup) else None
        if stage != "fit":
            return
        names = _datamodule_classes(datamodule)
        before = self.model.class_names
        if self.model.set_classes(names) and before not in (["default"], names):
            logger.warning("PNPT: classes changed from %s to %s; the prompt pool was re-initialised.", before, names)
        logger.info("PNPT: %d class(es) %s, prompts=%s.", len(names), names, self.model.prompts)

    def class_ids(self, image_paths: Sequence[str], device: torch.device | None = None) -> torch.Tensor:
        """The class index of each image path ``(B,)``, from the datamodule's ``category_of``.

        Raises one ``ValueError`` when the model knows several classes but the data cannot name an image's class.
        """
        names = self.model.class_names
        device = device if device is not None else self.device
        if len(names) == 1:
            return torch.zeros(len(image_paths), dtype=torch.long, device=device)
        if self._category_fn is None:
            msg = (
                f"PNPT knows {len(names)} classes {names} and needs the class of each image: train (and, with "
                "prompt_selection='oracle', test) with the anomalib_recon.data.MultiCategory datamodule, whose "
                "category_of(image_path) gives it."
            )
            raise ValueError(msg)
        index = {name: i for i, name in enumerate(names)}
        ids = []
        for path in image_paths:
            try:
                category = self._category_fn(str(path))
            except Exception as error:  # the datamodule's own message says why (e.g. an image it never loaded)
                msg = f"PNPT: no class for {str(path)!r}: {error}"
                raise ValueError(msg) from error
            if category not in index:
                msg = f"PNPT: {str(path)!r} is of category {category!r}, not one of the model's classes {names}."
                raise ValueError(msg)
            ids.append(index[category])
        return torch.tensor(ids, dtype=torch.long, device=device)

    def _dataset_class_ids(self, dataset: Any) -> torch.Tensor:
        names = self.model.class_names
        if len(names) == 1:
            return torch.zeros(len(dataset), dtype=torch.long)
        samples = getattr(dataset, "samples", None)
        if samples is None or "image_path" not in samples:
            msg = (
                f"PNPT knows {len(names)} classes but its training set ({type(dataset).__name__}) lists no image "
                "paths; use the MultiCategory datamodule."
            )
            raise ValueError(msg)
        return self.class_ids(list(samples["image_path"]), torch.device("cpu"))

    # ------------------------------------------------------------------------------------------------ prompt pool
    def on_fit_start(self) -> None:
        """Fit the prompt pool's priors and keys from every normal training image, before the first step."""
        self.fit_prompt_pool()

    def _normal_batches(self, dataloader: Iterable | None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """``(class ids, pre-processed images)`` of this rank's share of the training set, or of ``dataloader``."""
        if dataloader is None:
            ids_of_index = self._dataset_class_ids(training_dataset(self))
            for indices, images in normal_image_batches(self):
                yield ids_of_index[indices].to(images.device), images
            return
        for batch in dataloader:
            images = preprocess(self, batch)
            yield self.class_ids(list(getattr(batch, "image_path", [""] * len(images))), images.device), images

    def fit_prompt_pool(self, dataloader: Iterable | None = None) -> None:
        """Priors ``μ_{c,s}`` (mean feature map per class and scale) and keys ``k_c`` (mean ``GAP(f_3)`` per class).

        Reads the whole normal training set once, without augmentation. Under DDP each rank reads its share and the
        float64 per-class sums and counts are summed over the ranks (``all_reduce``), so every rank holds the same
        pool, equal to a single process's up to float64 rounding. ``dataloader``: raw normal images to use instead
        (every image's class from its ``image_path``; no sharding).
        """
        net = self.model
        pool = net.prompt_pool
        if pool is None:
            return
        n = pool.num_classes
        sums = [
            torch.zeros(n, c, h, w, dtype=torch.float64, device=self.device)
            for c, (h, w) in zip(net.channels, net.feature_sizes, strict=True)
        ]
        key_sums = torch.zeros(n, net.channels[-1], dtype=torch.float64, device=self.device)
        counts = torch.zeros(n, dtype=torch.float64, device=self.device)
        was_training = self.training
        self.eval()
        try:
            with torch.inference_mode(False), torch.no_grad():
                for ids, images in self._normal_batches(dataloader):
                    features = net.extract(images.to(self.device))
                    ids = ids.to(self.device)
                    for total, f in zip(sums, features, strict=True):
                        total.index_add_(0, ids, f.double())
                    key_sums.index_add_(0, ids, net.class_query(features).double())
                    counts.index_add_(0, ids, torch.ones(ids.shape[0], dtype=torch.float64, device=self.device))
        finally:
            self.train(was_training)
        if dataloader is None and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            for tensor in (*sums, key_sums, counts):
                dist.all_reduce(tensor)
        empty = [name for name, count in zip(pool.class_names, counts.tolist(), strict=True) if count == 0]
        if empty:
            msg = f"PNPT: no normal training images of class(es) {empty}; every class needs at least one."
            raise ValueError(msg)
        if pool.shared:
            priors = [total.sum(dim=0, keepdim=True) / counts.sum() for total in sums]
        else:
            priors = [total / counts.view(-1, 1, 1, 1) for total in sums]
        pool.set_statistics([p.to(pool.offsets.dtype) for p in priors], (key_sums / counts.view(-1, 1)).float())
        logger.info("PNPT: prompt pool fitted from %s training images per class.", [int(c) for c in counts.tolist()])

    # ------------------------------------------------------------------------------------------------ checkpoints
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Rebuild for the checkpoint's input size and size the prompt pool for its classes, then restore."""
        recorded = (checkpoint.get("anomalib_recon") or {}).get("input_size")
        if recorded is not None:
            self._build_for(recorded)
        if self.model.prompt_pool is not None:
            self.model.prompt_pool.resize_like(checkpoint.get("state_dict") or {}, "model.prompt_pool.")
        super().on_load_checkpoint(checkpoint)
        if self.input_size is not None:
            self._build_for(self.input_size)

    def _build_for(self, size: Any) -> None:
        size = (int(size[0]), int(size[1]))
        if size != self.model.image_size:
            with restoring_from_checkpoint():  # every tensor comes from the checkpoint: no weight download
                self.model = PNPTModel(image_size=size, **self._model_args)

    # ------------------------------------------------------------------------------------------------ steps
    def training_step(self, batch: Batch, *args, **kwargs) -> STEP_OUTPUT:
        """Reconstruct the batch with each image's class prompt; the cosine hierarchical loss of both streams."""
        del args, kwargs
        class_ids = None
        if self.model.prompts == "class":
            class_ids = self.class_ids(batch.image_path, batch.image.device)
        out = self.model.reconstruction_outputs(batch.image, class_ids)
        losses = self.loss(out.features, out.sample, out.prompt)
        size = int(batch.image.shape[0])
        self.log("train_loss", losses["loss"], on_step=True, on_epoch=False, prog_bar=True, batch_size=size)
        self.log("train_sample_loss", losses["sample"], on_step=False, on_epoch=True, batch_size=size)
        self.log("train_prompt_loss", losses["prompt"], on_step=False, on_epoch=True, batch_size=size)
        return {"loss": losses["loss"]}

    def validation_step(self, batch: Batch, *args, **kwargs) -> STEP_OUTPUT:
        """Full inference path → ``pred_score`` and ``anomaly_map`` (class inferred, or the datamodule's)."""
        del args, kwargs
        class_ids = None
        if self.prompt_selection == "oracle" and self.model.prompts == "class":
            class_ids = self.class_ids(batch.image_path, batch.image.device)
        return batch.update(**self.model(batch.image, class_ids)._asdict())

    @property
    def parameter_counts(self) -> dict[str, int]:
        """Trainable (HPE, prompts, encoder, decoder, heads) and frozen-backbone parameter counts."""
        trainable = sum(p.numel() for p in self.model.trainable_parameters())
        total = sum(p.numel() for p in self.model.parameters())
        return {"trainable": trainable, "frozen": total - trainable, "total": total}


def _datamodule_classes(datamodule: Any) -> list[str]:
    """The classes of a datamodule: ``MultiCategory.categories``, else one class named after it."""
    categories = getattr(datamodule, "categories", None)
    if callable(getattr(datamodule, "category_of", None)) and categories:
        return [str(c) for c in categories]
    name = getattr(datamodule, "category", None) or getattr(datamodule, "name", None)
    return [str(name) if name else "default"]


def _check_training_settings(lr: Any, betas: Any, weight_decay: Any, warmup_epochs: Any, final_lr: Any) -> None:
    """One clear error per bad optimisation setting (NaN refused)."""
    check_optimizer_settings("PNPT", lr, weight_decay, betas)
    if (
        not is_finite_number(warmup_epochs)
        or warmup_epochs < 0
        or (warmup_epochs >= 1 and warmup_epochs != int(warmup_epochs))
    ):
        msg = (
            "PNPT: warmup_epochs must be 0, a whole number of epochs >= 1, or a fraction of training in (0, 1); "
            f"got {warmup_epochs!r}."
        )
        raise ValueError(msg)
    if not is_finite_number(final_lr) or not 0 <= final_lr <= lr:
        msg = f"PNPT: final_lr must be a finite number in [0, lr={lr}], got {final_lr!r}."
        raise ValueError(msg)
