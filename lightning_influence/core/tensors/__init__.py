"""Primitives: parameters, batches, data subsets, analysis mode, Lanczos, residuals."""
