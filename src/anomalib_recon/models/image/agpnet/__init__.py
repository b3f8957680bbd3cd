"""AGPNet: Attention-Guided Perturbation Network (arXiv 2408.07490)."""

from .lightning_model import AGPNet

__all__ = ["AGPNet"]
