"""GRNR: Global-Regularized Neighborhood Regression for zero-shot texture anomaly detection (arXiv 2406.07333)."""

from .lightning_model import GRNR

__all__ = ["GRNR"]
