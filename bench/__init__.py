"""Benchmarks: `bench/run.py` (the side-by-side SMTP benchmark) and `bench/body_store.py`."""
