"""The merge methods: one file each, one line in METHODS. See spec.py for the calling convention."""

from __future__ import annotations

from qwenlab.errors import QwenlabError
from qwenlab.merge.methods import (breadcrumbs, dare, della, linear, model_stock, nuslerp, passthrough,
                                   slerp, task_arithmetic, ties)
from qwenlab.merge.methods.spec import MergeMethod, Parameter

METHODS: dict[str, MergeMethod] = {method.name: method for method in (
    linear.METHOD,
    slerp.METHOD,
    nuslerp.METHOD,
    task_arithmetic.METHOD,
    ties.METHOD,
    dare.DARE_LINEAR,
    dare.DARE_TIES,
    breadcrumbs.BREADCRUMBS,
    breadcrumbs.BREADCRUMBS_TIES,
    della.DELLA,
    della.DELLA_LINEAR,
    model_stock.METHOD,
    passthrough.METHOD,
)}


def get_method(name: str) -> MergeMethod:
    try:
        return METHODS[name]
    except KeyError:
        raise QwenlabError(f"merge_method: unknown method '{name}' (expected one of {', '.join(METHODS)})") from None


__all__ = ["METHODS", "MergeMethod", "Parameter", "get_method"]
