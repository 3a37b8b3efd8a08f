"""Measure and choose: speed bench, task accuracy, comparisons and model cards."""
