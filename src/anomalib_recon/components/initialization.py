"""MAE weight initialisation of the transformer parts of AMI-Net, DADF and GLCF.

MAE (K. He et al., *Masked Autoencoders Are Scalable Vision Learners*, CVPR 2022; authors' code: GitHub
facebookresearch/mae, ``models_mae.py``, ``_init_weights``) initialises every ``nn.Linear`` with xavier-uniform
weights and zero bias, and every ``nn.LayerNorm`` with weight 1 and bias 0. The authors' code of AMI-Net, DADF and
GLCF applies the same recipe to their ViT blocks, norms and projections; :func:`init_mae_weights` is that recipe,
once. Patch-embedding convolutions (xavier-uniform as a ``Linear`` on the flattened patch) are initialised by
:class:`~anomalib_recon.components.patch_embed.PatchEmbed` itself, and learnable tokens by each model (their
initial values differ: zeros, or ``N(0, 0.02)``).
"""

from __future__ import annotations

from torch import nn

__all__ = ["init_mae_weights"]


def init_mae_weights(*modules: nn.Module) -> None:
    """Re-initialise, in place, every ``nn.Linear`` and ``nn.LayerNorm`` inside ``modules`` the MAE way.

    ``nn.Linear``: weight ``U(−a, a)`` with ``a = √(6 / (fan_in + fan_out))`` (xavier-uniform), bias 0.
    ``nn.LayerNorm``: weight 1, bias 0 (where they exist). Other modules and parameters are left as they are.

    The modules are visited in the order given, each in ``Module.modules()`` order, so the random draws (and thus
    the weights for a given seed) are reproducible; a module passed twice is initialised twice.

    Args:
        *modules: The modules to initialise (e.g. a model's ``blocks`` and ``norm``, or a whole bottleneck).
    """
    for module in modules:
        for m in module.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                if m.weight is not None:
                    nn.init.ones_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
