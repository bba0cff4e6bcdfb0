"""Paper-reproduction experiments, each run as ``python -m experiments.<name>``, sharing one bundle runner.

The experiments drive the bundles exactly as a user does (their own ``configs/*.json`` with overrides)
through :mod:`experiments.runner`, the same runner the tests use. User tools (setup, demo, evaluation,
data preparation, packaging) live in ``scripts/``; the library the bundles import lives in ``common/``.
"""
