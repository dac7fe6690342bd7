"""recurrence kernels."""
