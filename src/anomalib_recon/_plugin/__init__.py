"""Sources of the top-level plugin hook and its ``.pth`` (installed at the wheel's root)."""
