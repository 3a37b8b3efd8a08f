"""Reports across variants: comparison tables, plots and HTML (compare.py), model cards (card.py)."""
