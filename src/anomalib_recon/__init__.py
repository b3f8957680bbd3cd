"""anomalib-recon: feature-reconstruction anomaly detection models for anomalib.

This module is deliberately import-light: it must not pull in torch or anomalib,
because the plugin hook (``_anomalib_recon_hook``) may touch it from a ``.pth``
file at interpreter start-up. Models live in :mod:`anomalib_recon.models`,
shared blocks in :mod:`anomalib_recon.components`, datamodules in
:mod:`anomalib_recon.data`.
"""

__version__ = "0.1.0"
