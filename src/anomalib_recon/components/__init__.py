"""Building blocks shared by two or more anomalib-recon models."""
