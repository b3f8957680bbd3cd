"""SCL-VI: Self-supervised Context Learning for Visual Inspection (arXiv 2311.06504)."""

from .lightning_model import SCLVI

__all__ = ["SCLVI"]
