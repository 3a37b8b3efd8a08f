"""Recipes: YAML lists of stages (train, merge, quantize, bench, eval, ...) run in order."""

from qwenlab.recipe.runner import BUILTIN_RECIPE, load_recipe, run_recipe

__all__ = ["BUILTIN_RECIPE", "load_recipe", "run_recipe"]
