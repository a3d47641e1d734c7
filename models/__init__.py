"""legend.models."""
