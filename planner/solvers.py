"""Solver backends; each registers itself in :data:`legend.planner.api.SOLVERS`."""
