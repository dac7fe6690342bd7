"""decode kernels."""
