"""ST-MAE: Siamese Transition Masked Autoencoders (arXiv 2211.00349)."""

from .lightning_model import STMAE

__all__ = ["STMAE"]
