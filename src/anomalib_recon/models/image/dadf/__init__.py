"""DADF: Dual-Attention Transformer and Discriminative Flow (IEEE T-ASE 2023)."""

from .lightning_model import DADF

__all__ = ["DADF"]
