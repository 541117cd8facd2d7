"""Evaluators, one module per protocol of the paper (run as ``python -m evaluate.<name>``)."""
