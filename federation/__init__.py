"""legend.federation."""
