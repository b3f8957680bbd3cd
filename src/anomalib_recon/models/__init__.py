"""anomalib-recon models, each a direct ``AnomalibModule`` subclass named as in its paper.

Importing this module also imports :mod:`anomalib_recon.data`, so the datamodules (``ELPV``,
``MagneticTile``, the ``MVTec`` alias, ...) are visible to anomalib's CLI by short name whenever the
models are.
"""

from anomalib_recon import data  # noqa: F401 - registers the datamodules with anomalib's CLI
from anomalib_recon.models.image.agpnet import AGPNet
from anomalib_recon.models.image.ami_net import AMINet
from anomalib_recon.models.image.inp_former_pp import InpFormerPP
from anomalib_recon.models.image.nafrad import NAFRAD

__all__ = ["NAFRAD", "AGPNet", "AMINet", "InpFormerPP"]
