"""AMI-Net: Adaptive Mask Inpainting Network (IEEE T-ASE 2024)."""

from .lightning_model import AMINet

__all__ = ["AMINet"]
