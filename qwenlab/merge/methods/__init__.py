"""The merge methods: one file each (the task-vector family: one row each in task_vectors.FAMILY), one
line in METHODS. See spec.py for the calling convention."""

from __future__ import annotations

from qwenlab.errors import QwenlabError
from qwenlab.merge.methods import (linear, model_stock, nuslerp, passthrough, regmean, regmean_sequential, slerp,
                                   task_vectors)
from qwenlab.merge.methods.spec import MergeMethod, Parameter

METHODS: dict[str, MergeMethod] = {method.name: method for method in (
    linear.METHOD,
    slerp.METHOD,
    nuslerp.METHOD,
    *task_vectors.METHODS,  # task arithmetic, TIES, DARE, breadcrumbs, DELLA: one row each
    model_stock.METHOD,
    passthrough.METHOD,
    regmean.METHOD,  # data-aware: needs each model's `data`
    regmean_sequential.METHOD,  # data-aware, solved layer by layer on the merged model
)}


def get_method(name: str) -> MergeMethod:
    try:
        return METHODS[name]
    except KeyError:
        raise QwenlabError(f"merge_method: unknown method '{name}' (expected one of {', '.join(METHODS)})") from None


__all__ = ["METHODS", "MergeMethod", "Parameter", "get_method"]
