"""Image anomaly-detection models."""
