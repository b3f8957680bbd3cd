"""PNPT's cosine hierarchical reconstruction loss.

``L = Σ_s [mean_pos(1 − cos(f_s, R^x_s)) + mean_pos(1 − cos(f_s, R^p_s))]``: per scale ``s`` of the frozen feature
pyramid, the per-position cosine residual of the sample-stream reconstruction ``R^x_s`` and of the prompt-stream
reconstruction ``R^p_s`` (absent without prompts), averaged over positions and batch and summed over scales and
streams. A non-finite loss is stopped by the shared ``ModelGuard`` (which names the learning rate and any
non-finite weights). "Cosine-based hierarchical reconstruction loss" is the paper's summary (arXiv 2406.11507);
the exact form (unweighted sum, both streams) is INFERRED.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .anomaly_map import cosine_residual

__all__ = ["PNPTLoss"]


class PNPTLoss(nn.Module):
    """Sum over scales of the mean cosine residual of the sample and the prompt reconstruction."""

    def forward(
        self,
        features: Sequence[torch.Tensor],
        sample: Sequence[torch.Tensor],
        prompt: Sequence[torch.Tensor] | None,
    ) -> dict[str, torch.Tensor]:
        """``{"loss", "sample", "prompt"}`` from per-scale maps ``(B, C_s, H_s, W_s)``; ``prompt`` is 0 without it."""
        if len(features) != len(sample) or (prompt is not None and len(prompt) != len(features)):
            msg = f"PNPTLoss needs one reconstruction per scale: {len(features)} feature maps, {len(sample)} sample"
            msg += f" and {len(prompt) if prompt is not None else 0} prompt reconstructions."
            raise ValueError(msg)
        sample_loss = sum(cosine_residual(f, r).mean() for f, r in zip(features, sample, strict=True))
        if prompt is None:
            prompt_loss = torch.zeros((), device=features[0].device)
        else:
            prompt_loss = sum(cosine_residual(f, r).mean() for f, r in zip(features, prompt, strict=True))
        return {"loss": sample_loss + prompt_loss, "sample": sample_loss, "prompt": prompt_loss}
