"""attnprec.kernels."""
