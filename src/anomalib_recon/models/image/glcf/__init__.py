"""GLCF: global-local correspondence with a semantic bottleneck (arXiv 2303.05768)."""

from .lightning_model import GLCF

__all__ = ["GLCF"]
