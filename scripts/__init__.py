"""The tools a user runs (set-up, demo, data preparation, evaluation, packaging, the zoo client, phase analysis).

Each is a command-line script: ``python scripts/<name>.py ...`` once the project is installed
(``bash scripts/setup.sh`` runs ``pip install -e .``), or ``python -m scripts.<name> ...`` from the
repository root; tests and other tools import them as ``scripts.<name>``.
"""
