"""LGFDR: local and global feature denoising reconstruction with a selective reconstruction head."""

from .lightning_model import LGFDR

__all__ = ["LGFDR"]
