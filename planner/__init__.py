"""legend.planner."""
