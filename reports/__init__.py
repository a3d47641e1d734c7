"""legend.reports: plan, what-if and run reports."""
