"""Curvature of the training loss: the curvature kinds, their products, the stored Jacobian, damping, preconditioners."""
