"""GLCF loss: three RD-style global cosine correspondence terms (arXiv 2303.05768; authors' ``models/Model.py``).

    L = Σ_k cosG(T_k, L_k) + Σ_k cosG(G_k, T_k) + Σ_k cosG(G_k, Ĝ_k)
        (local-local)        (local-global)       (global-global)

``cosG(a, b)`` = mean over the batch of ``1 − cos(flat(a), flat(b))``, each sample's whole ``C·H·W`` map one vector
(:func:`anomalib_recon.components.losses.cosine_distance` with ``per_token=False``). Equal weights and no
stop-gradient, as in the reference: in the third term both ``G`` and ``Ĝ`` receive gradients.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from anomalib_recon.components.losses import cosine_distance

__all__ = ["GLCFLoss"]


def _global_cosine(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor], name: str) -> torch.Tensor:
    if len(a) != len(b) or len(a) == 0:
        msg = f"GLCFLoss {name}: need equally long non-empty lists of maps, got {len(a)} and {len(b)}."
        raise ValueError(msg)
    return sum(cosine_distance(x, y, per_token=False) for x, y in zip(a, b, strict=True))


class GLCFLoss(nn.Module):
    """Sum of the local-local, local-global and global-global terms; returns every term and the total."""

    def forward(
        self,
        teacher: Sequence[torch.Tensor],
        local: Sequence[torch.Tensor],
        global_features: Sequence[torch.Tensor],
        global_estimates: Sequence[torch.Tensor],
    ) -> dict[str, torch.Tensor]:
        """``teacher`` = ``T_k``, ``local`` = ``L_k``, ``global_features`` = ``G_k``, ``global_estimates`` = ``Ĝ_k``."""
        local_local = _global_cosine(teacher, local, "local-local")
        local_global = _global_cosine(global_features, teacher, "local-global")
        global_global = _global_cosine(global_features, global_estimates, "global-global")
        return {
            "loss": local_local + local_global + global_global,
            "local_local": local_local,
            "local_global": local_global,
            "global_global": global_global,
        }
