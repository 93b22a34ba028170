"""Inverse-curvature solvers: one object per solver behind one protocol, and their registry."""
