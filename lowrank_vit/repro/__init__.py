"""Reproducing the paper's tables: the registry of rows, the runner, the tables, the rehearsal, the cost estimate,
the stand-in models and the demo."""
