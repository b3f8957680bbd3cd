"""DADF losses: stage 1 reconstruction MSE of both streams, stage 2 flow negative log-likelihood.

* Reconstruction: ``L_rec = Σ_s [mean (X̂_s − f_s)² + mean (M̂_s − f_s)²]`` on patchified targets (an unweighted sum
  of six MSE terms with three scales; three without the memory stream).
* Flow: ``L_nf = Σ_s mean_batch[½·Σ_{c,h,w} z_s² − log|det J_s|]``, which is anomalib's ``FastflowLoss`` (reused).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from anomalib.models.image.fastflow.loss import FastflowLoss
from torch import nn

__all__ = ["DADFFlowLoss", "DADFReconstructionLoss"]

DADFFlowLoss = FastflowLoss
"""``Σ_s mean_batch[½·Σ z_s² − log|det J_s|]``: the reference's flow loss is FastFlow's."""


class DADFReconstructionLoss(nn.Module):
    """Sum over scales of the mean squared error of the self- and the memory-reconstruction."""

    def forward(
        self,
        self_tokens: Sequence[torch.Tensor],
        memory_tokens: Sequence[torch.Tensor] | None,
        targets: Sequence[torch.Tensor],
    ) -> dict[str, torch.Tensor]:
        """``{"loss", "self", "memory"}``; ``memory`` is 0 without the memory stream."""
        self_loss = sum(((x - t) ** 2).mean() for x, t in zip(self_tokens, targets, strict=True))
        if memory_tokens is None:
            memory_loss = torch.zeros((), device=targets[0].device)
        else:
            memory_loss = sum(((m - t) ** 2).mean() for m, t in zip(memory_tokens, targets, strict=True))
        return {"loss": self_loss + memory_loss, "self": self_loss, "memory": memory_loss}
