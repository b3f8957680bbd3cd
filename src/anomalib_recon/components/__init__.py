"""Building blocks shared by two or more anomalib-recon models (see README.md in this folder for each block's users)."""

from .aggregation import FeatureAggregator, layer_norm_channels, map_to_tokens, tokens_to_map
from .anomaly_map import AnomalyMapGenerator, check_blur_fits, make_blur, reduce_max, reduce_max_avgpool, reduce_std
from .checkpoint import CheckpointMismatchError, restoring_from_checkpoint
from .dual_attention import DualAttention, DualAttentionBlock
from .evaluation import SkipUnavailableMetrics
from .feature_extractor import BackboneInfo, FeatureExtractor, layers_at_strides, probe_backbone
from .few_shot import dihedral_augment, few_shot_subset, restrict_to_few_shot
from .guards import InputImageError, NonFiniteError, UntrainedModelError, check_finite, check_images
from .initialization import init_mae_weights
from .losses import cosine_distance, dice_loss, focal_loss_on_probs, mse_loss
from .module import ModelGuard, ReconModuleMixin
from .neighborhood_attention import (
    NA_BACKEND_ENV_VAR,
    NeighborhoodAttention2D,
    available_backends,
    na_backend,
    neighborhood_attention_2d,
)
from .normal_images import collect_normal_images
from .patch_embed import MultiScalePatchEmbed, PatchEmbed, TokenToFeatureHead, patchify, unpatchify
from .position import SinCosPositionEmbedding2D, get_2d_sincos_pos_embed
from .schedules import multistep_lr
from .weights import OfflineWeightsError, WeightsFileError

__all__ = [
    "NA_BACKEND_ENV_VAR",
    "AnomalyMapGenerator",
    "BackboneInfo",
    "CheckpointMismatchError",
    "DualAttention",
    "DualAttentionBlock",
    "FeatureAggregator",
    "FeatureExtractor",
    "InputImageError",
    "ModelGuard",
    "MultiScalePatchEmbed",
    "NeighborhoodAttention2D",
    "NonFiniteError",
    "OfflineWeightsError",
    "PatchEmbed",
    "ReconModuleMixin",
    "SinCosPositionEmbedding2D",
    "SkipUnavailableMetrics",
    "TokenToFeatureHead",
    "UntrainedModelError",
    "WeightsFileError",
    "available_backends",
    "check_blur_fits",
    "check_finite",
    "check_images",
    "collect_normal_images",
    "cosine_distance",
    "dice_loss",
    "dihedral_augment",
    "few_shot_subset",
    "focal_loss_on_probs",
    "get_2d_sincos_pos_embed",
    "init_mae_weights",
    "layer_norm_channels",
    "layers_at_strides",
    "make_blur",
    "map_to_tokens",
    "mse_loss",
    "multistep_lr",
    "na_backend",
    "neighborhood_attention_2d",
    "patchify",
    "probe_backbone",
    "reduce_max",
    "reduce_max_avgpool",
    "reduce_std",
    "restoring_from_checkpoint",
    "restrict_to_few_shot",
    "tokens_to_map",
    "unpatchify",
]
