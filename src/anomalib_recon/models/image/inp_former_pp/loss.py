"""INP-Former++ losses: INP coherence (hard and soft), soft mining (cosine + MSE), residual-head segmentation.

* **Hard INP coherence** (base INP-Former): ``mean_i min_m (1 − cos(f_i, p_m))``, computed by anomalib's own
  ``InpFormerModel.get_inp_loss``.
* **Soft INP coherence** (++, Eq. 3 as cited by third parties): ``w_im = softmax_m(cos(f_i, p_m) / τ)``,
  ``f̃_i = Σ_m w_im p_m``, ``L_sc = mean_i (1 − cos(f_i, f̃_i))``. Every token pulls on all INPs in proportion to its
  similarity, so the INPs cannot all collapse onto the one INP every token picks. As ``τ → 0`` the weights become
  one-hot at the nearest INP and ``L_sc`` equals the hard loss.
* **Soft mining** (base): global cosine loss whose gradient at token ``i`` is scaled by ``(d_i / mean d)^γ``
  (anomalib's ``GlobalCosineHmAdaptiveLoss`` via :func:`soft_mining_cosine`); ++ adds the same re-weighting on an
  MSE term (:func:`soft_mining_mse`).
* **Segmentation** (++ residual head, unpublished; our default): Dice + focal (γ = 2) on the head's probability map.
"""

from __future__ import annotations

from collections.abc import Sequence
from types import SimpleNamespace

import torch
from torch import nn
from torch.nn import functional as F

from anomalib_recon.components.losses import (
    cosine_distance,
    dice_loss,
    focal_loss_on_probs,
    require_finite,
    require_same_shape,
)

__all__ = [
    "COHERENCE_MODES",
    "SEG_LOSSES",
    "InpFormerPPLoss",
    "hard_inp_coherence",
    "soft_inp_coherence",
    "soft_mining_cosine",
    "soft_mining_mse",
]

COHERENCE_MODES = ("soft", "hard")
SEG_LOSSES = ("dice_focal", "focal", "dice")


def _scale_grad(grad: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return grad * weights


def _as_list(x: torch.Tensor | Sequence[torch.Tensor]) -> list[torch.Tensor]:
    return [x] if isinstance(x, torch.Tensor) else list(x)


def _check_feature_lists(name: str, en: list[torch.Tensor], de: list[torch.Tensor]) -> None:
    if len(en) == 0 or len(en) != len(de):
        msg = f"{name}: need equally long non-empty feature lists, got {len(en)} and {len(de)}."
        raise ValueError(msg)
    for e, d in zip(en, de, strict=True):
        require_same_shape(e, d, name)
        if e.dim() != 4:
            msg = f"{name}: expects (B, C, H, W) maps, got {tuple(e.shape)}; convert tokens with tokens_to_map."
            raise ValueError(msg)


def soft_mining_cosine(
    encoder_features: torch.Tensor | Sequence[torch.Tensor],
    decoder_features: torch.Tensor | Sequence[torch.Tensor],
    power: float = 3.0,
    check_finite: bool = True,
) -> torch.Tensor:
    """INP-Former's soft-mining global cosine loss, reusing anomalib's ``GlobalCosineHmAdaptiveLoss``.

    Value: the global (per-sample flattened) cosine distance, averaged over layers. Gradient: the gradient reaching
    decoder position i is scaled by ``(d_i / mean d)^power`` with ``d_i`` the per-position cosine distance and the
    mean taken over the whole batch. Encoder features are detached.

    anomalib registers its hook on the tensor it receives, which would also re-weight gradients of any other loss
    on the same decoder features; we hand it a view so the re-weighting stays inside this term (INP-Former++ adds
    :func:`soft_mining_mse` on the same features).
    """
    en, de = _as_list(encoder_features), _as_list(decoder_features)
    _check_feature_lists("soft_mining_cosine", en, de)
    if check_finite:
        require_finite("soft_mining_cosine", *en, *de)
    if not any(d.requires_grad for d in de):  # no graph (evaluation): same value without hooks
        dists = [cosine_distance(e, d, per_token=False, check_finite=False) for e, d in zip(en, de, strict=True)]
        return torch.stack(dists).mean()
    from anomalib.models.image.inp_former.components.loss import GlobalCosineHmAdaptiveLoss  # heavy import

    views = [d.view_as(d) for d in de]
    zero = torch.zeros((), device=de[0].device, dtype=de[0].dtype)
    return GlobalCosineHmAdaptiveLoss(power=power)(encoder_features=en, decoder_features=views, inp_loss=zero)


def soft_mining_mse(
    encoder_features: torch.Tensor | Sequence[torch.Tensor],
    decoder_features: torch.Tensor | Sequence[torch.Tensor],
    power: float = 3.0,
    eps: float = 1e-12,
    check_finite: bool = True,
) -> torch.Tensor:
    """MSE with soft-mining gradient re-weighting (INP-Former++'s added term).

    Value: ``MSE(decoder, encoder.detach())`` averaged over layers. Gradient: the gradient of decoder position i is
    scaled by ``(e_i / mean e)^power`` with ``e_i = mean_c (en − de)²`` (no grad) and the mean over the whole batch,
    matching the convention of anomalib's ``GlobalCosineHmAdaptiveLoss``. The hook sits on a view of the decoder
    features, so gradients from other losses on the same features are not re-weighted.

    Args:
        encoder_features, decoder_features: ``(B, C, H, W)`` maps or lists of them (one per layer group).
        power: Exponent γ (3 in INP-Former).
        eps: Floor of ``mean e`` (a perfect reconstruction yields zero weights instead of NaN).
        check_finite: Raise on NaN/inf inputs.
    """
    en, de = _as_list(encoder_features), _as_list(decoder_features)
    _check_feature_lists("soft_mining_mse", en, de)
    if check_finite:
        require_finite("soft_mining_mse", *en, *de)
    losses = []
    for e, d in zip(en, de, strict=True):
        e = e.detach()
        if d.requires_grad:
            with torch.no_grad():
                point = ((e - d) ** 2).mean(dim=1, keepdim=True)
                weights = (point / point.mean().clamp_min(eps)) ** power
            d = d.view_as(d)
            d.register_hook(lambda grad, w=weights: _scale_grad(grad, w))
        losses.append(F.mse_loss(d, e))
    return torch.stack(losses).mean()


def _check_tokens(query: torch.Tensor, prototypes: torch.Tensor) -> None:
    if query.dim() != 3 or prototypes.dim() != 3 or query.shape[0] != prototypes.shape[0]:
        msg = (
            "INP coherence expects tokens (B, L, C) and prototypes (B, M, C) with the same batch size, "
            f"got {tuple(query.shape)} and {tuple(prototypes.shape)}."
        )
        raise ValueError(msg)
    if query.shape[-1] != prototypes.shape[-1]:
        msg = f"INP coherence: token width {query.shape[-1]} differs from prototype width {prototypes.shape[-1]}."
        raise ValueError(msg)


def hard_inp_coherence(query: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """Base INP-Former coherence ``mean_i min_m (1 − cos(f_i, p_m))`` (anomalib's ``get_inp_loss``).

    Args:
        query: Fused encoder tokens ``(B, L, C)``.
        prototypes: INPs ``(B, M, C)``.
    """
    from anomalib.models.image.inp_former.torch_model import InpFormerModel

    _check_tokens(query, prototypes)
    # get_inp_loss stores its intermediate tensors on ``self``; a throw-away namespace keeps them off our module.
    return InpFormerModel.get_inp_loss(SimpleNamespace(), query, prototypes)


def soft_inp_coherence(
    query: torch.Tensor, prototypes: torch.Tensor, tau: float = 1.0, reduction: str = "mean"
) -> torch.Tensor:
    """Soft INP coherence (INP-Former++): distance of each token to its softmax-weighted INP mixture.

    ``s_im = cos(f_i, p_m)``, ``w_im = softmax_m(s_im / τ)``, ``f̃_i = Σ_m w_im p_m``, loss ``1 − cos(f_i, f̃_i)``.

    Args:
        query: Fused encoder tokens ``(B, L, C)``.
        prototypes: INPs ``(B, M, C)``.
        tau: Softmax temperature τ > 0 (1 by default; ``τ → 0`` recovers :func:`hard_inp_coherence`).
        reduction: ``"mean"`` over tokens and batch, or ``"none"`` for the ``(B, L)`` per-token values.
    """
    _check_tokens(query, prototypes)
    if not tau > 0:
        msg = f"tau must be > 0, got {tau}."
        raise ValueError(msg)
    sim = F.cosine_similarity(query.unsqueeze(2), prototypes.unsqueeze(1), dim=-1)  # (B, L, M)
    weights = torch.softmax(sim / tau, dim=-1)
    mixture = weights @ prototypes  # (B, L, C)
    dist = 1 - F.cosine_similarity(query, mixture, dim=-1)
    if reduction == "none":
        return dist
    if reduction != "mean":
        msg = f"reduction must be 'mean' or 'none', got {reduction!r}."
        raise ValueError(msg)
    return dist.mean()


class InpFormerPPLoss(nn.Module):
    """Normal-modelling loss (soft mining + coherence) and the residual head's segmentation loss.

    Args:
        coherence: ``"soft"`` (++) or ``"hard"`` (base INP-Former).
        tau: Temperature of the soft coherence.
        coherence_weight: Weight of the coherence term (0.2, base; unverified for ++).
        mse_mining: Add the soft-mining MSE term (++).
        mse_weight: Weight of the MSE term (1: the blog's plain sum).
        mining_power: Exponent γ of the soft-mining gradient weights (3).
        seg_loss: ``"dice_focal"`` (default), ``"focal"`` or ``"dice"``.
        focal_gamma: γ of the focal loss (2).
    """

    def __init__(
        self,
        coherence: str = "soft",
        tau: float = 1.0,
        coherence_weight: float = 0.2,
        mse_mining: bool = True,
        mse_weight: float = 1.0,
        mining_power: float = 3.0,
        seg_loss: str = "dice_focal",
        focal_gamma: float = 2.0,
    ) -> None:
        super().__init__()
        if coherence not in COHERENCE_MODES:
            msg = f"coherence must be one of {COHERENCE_MODES}, got {coherence!r}."
            raise ValueError(msg)
        if seg_loss not in SEG_LOSSES:
            msg = f"seg_loss must be one of {SEG_LOSSES}, got {seg_loss!r}."
            raise ValueError(msg)
        if not tau > 0:
            msg = f"tau must be > 0, got {tau}."
            raise ValueError(msg)
        if coherence_weight < 0 or mse_weight < 0 or mining_power < 0 or focal_gamma < 0:
            msg = "coherence_weight, mse_weight, mining_power and focal_gamma must be >= 0."
            raise ValueError(msg)
        self.coherence = coherence
        self.tau = float(tau)
        self.coherence_weight = float(coherence_weight)
        self.mse_mining = bool(mse_mining)
        self.mse_weight = float(mse_weight)
        self.mining_power = float(mining_power)
        self.seg_loss = seg_loss
        self.focal_gamma = float(focal_gamma)

    def coherence_loss(self, query: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
        """The configured INP coherence term (unweighted)."""
        if self.coherence == "soft":
            return soft_inp_coherence(query, prototypes, tau=self.tau)
        return hard_inp_coherence(query, prototypes)

    def reconstruction_loss(
        self, encoder_features: list[torch.Tensor], decoder_features: list[torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Soft-mining cosine (and MSE) over the layer groups; maps are ``(B, C, h, w)``."""
        terms = {"cosine": soft_mining_cosine(encoder_features, decoder_features, power=self.mining_power)}
        if self.mse_mining:
            terms["mse"] = soft_mining_mse(
                encoder_features, decoder_features, power=self.mining_power, check_finite=False
            )
        return terms

    def normal_loss(
        self,
        encoder_features: list[torch.Tensor],
        decoder_features: list[torch.Tensor],
        query: torch.Tensor,
        prototypes: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """``L_sm(cos) [+ w·L_sm(mse)] + 0.2·L_c`` on normal images; returns every term and their sum ``"loss"``."""
        terms = self.reconstruction_loss(encoder_features, decoder_features)
        terms["coherence"] = self.coherence_loss(query, prototypes)
        loss = terms["cosine"] + self.coherence_weight * terms["coherence"]
        if "mse" in terms:
            loss = loss + self.mse_weight * terms["mse"]
        terms["loss"] = loss
        return terms

    def segmentation_loss(self, prediction: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Dice + focal (or one of them) between the head's probabilities and the binary mask ``(B, 1, H, W)``."""
        if prediction.shape != mask.shape:
            msg = f"segmentation_loss: prediction {tuple(prediction.shape)} and mask {tuple(mask.shape)} differ."
            raise ValueError(msg)
        mask = mask.to(prediction.dtype)
        loss = prediction.new_zeros(())
        if self.seg_loss in ("dice_focal", "focal"):
            loss = loss + focal_loss_on_probs(prediction, mask, gamma=self.focal_gamma)
        if self.seg_loss in ("dice_focal", "dice"):
            loss = loss + dice_loss(prediction, mask)
        return loss
