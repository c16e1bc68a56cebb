"""`launch/compare.py`'s parts: the plan (plan.py, JAX-free), the dry-run estimate (estimate.py), the paired
statistics (stats.py) and the report (report.py)."""
