"""SCL-VI loss: jigsaw position cross-entropy at each patch scale plus the SVDD term (arXiv 2311.06504)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .torch_model import TrainOutputs


class SCLVILoss(nn.Module):
    """``L = sum_K CE(cls_K(h1 - h2), y_K) + lambda * sum_K mean ||h(S1_K) - h(S2_K)||_2``.

    Args:
        svdd_weight: ``lambda`` (1, the authors' README command; their code's default is 0.001). ``0`` trains the
            jigsaw task alone (the key ablation).
    """

    def __init__(self, svdd_weight: float = 1.0) -> None:
        super().__init__()
        if svdd_weight < 0:
            msg = f"svdd_weight must be >= 0, got {svdd_weight}."
            raise ValueError(msg)
        self.svdd_weight = float(svdd_weight)

    def forward(self, outputs: TrainOutputs) -> dict[str, torch.Tensor]:
        """Total loss and its parts per scale (``jigsaw_64``, ``svdd_64``, ``accuracy_64``, ...)."""
        parts: dict[str, torch.Tensor] = {}
        total = None
        for patch, logits in outputs.logits.items():
            jigsaw = F.cross_entropy(logits, outputs.labels[patch])
            term = jigsaw
            parts[f"jigsaw_{patch}"] = jigsaw.detach()
            if patch in outputs.svdd:
                h1, h2 = outputs.svdd[patch]
                svdd = (h1 - h2).norm(dim=1).mean()
                term = term + self.svdd_weight * svdd
                parts[f"svdd_{patch}"] = svdd.detach()
            total = term if total is None else total + term
            parts[f"accuracy_{patch}"] = (logits.argmax(1) == outputs.labels[patch]).float().mean()
        return {"loss": total, **parts}
