"""merge kernels."""
