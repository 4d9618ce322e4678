"""The gcfs benchmark: `python tests/bench/run.py [--quick]` (see run.py)."""
