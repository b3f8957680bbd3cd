"""INP-Former++: Intrinsic Normal Prototypes + residual learning (arXiv 2506.03660), on anomalib's INP-Former."""

from .lightning_model import InpFormerPP

__all__ = ["InpFormerPP"]
