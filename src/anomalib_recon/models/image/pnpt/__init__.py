"""PNPT: Prior Normality Prompt Transformer for multi-class industrial image anomaly detection (IEEE TII 2024)."""

from .lightning_model import PNPT

__all__ = ["PNPT"]
