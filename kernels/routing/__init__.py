"""routing kernels."""
