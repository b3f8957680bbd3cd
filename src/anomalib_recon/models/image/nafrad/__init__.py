"""NAFRAD: Neighborhood Attention-based Feature Reconstruction (ACM TOMM 2026)."""

from .lightning_model import NAFRAD

__all__ = ["NAFRAD"]
