"""anomalib-recon models, each a direct ``AnomalibModule`` subclass named as in its paper.

Importing this module also imports :mod:`anomalib_recon.data`, so the datamodules (``ELPV``,
``MagneticTile``, the ``MVTec`` alias, ...) are visible to anomalib's CLI by short name whenever the
models are.
"""

import contextlib

from anomalib_recon import data  # noqa: F401 - registers the datamodules with anomalib's CLI
from anomalib_recon.models.image.agpnet import AGPNet
from anomalib_recon.models.image.ami_net import AMINet
from anomalib_recon.models.image.dadf import DADF
from anomalib_recon.models.image.glcf import GLCF
from anomalib_recon.models.image.grnr import GRNR
from anomalib_recon.models.image.inp_former_pp import InpFormerPP
from anomalib_recon.models.image.lgfdr import LGFDR
from anomalib_recon.models.image.nafrad import NAFRAD
from anomalib_recon.models.image.pnpt import PNPT
from anomalib_recon.models.image.rb_ae import RBAE
from anomalib_recon.models.image.scl_vi import SCLVI
from anomalib_recon.models.image.st_mae import STMAE

__all__ = [
    "DADF",
    "GLCF",
    "GRNR",
    "LGFDR",
    "NAFRAD",
    "PNPT",
    "RBAE",
    "SCLVI",
    "STMAE",
    "AGPNet",
    "AMINet",
    "InpFormerPP",
]

try:  # the start-up hook the wheel installs; absent when running from a bare source tree
    from _anomalib_recon_hook import load_plugins as _load_plugins
except ImportError:
    _load_plugins = None
if _load_plugins is not None:
    # Imported before anomalib.models: the hook skipped us half-way through (circular import); register now.
    with contextlib.suppress(TypeError):  # a hook from an older install (no `ready`); reinstall to update it
        _load_plugins(ready=(__name__,))
