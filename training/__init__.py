"""Training side of the project: data loading, synthetic data, prompt sampling and metrics.

Kept free of heavy imports so that `python -m training --help` answers at once; each
command imports what it needs when it runs.
"""
