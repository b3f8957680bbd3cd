"""RB-AE / NDP-Net: reference-based autoencoder for surface defect detection (arXiv 2211.10060)."""

from .lightning_model import RBAE

__all__ = ["RBAE"]
