"""Model merging: mergekit-compatible YAML, one file per method, streaming execution.

    from qwenlab.merge import merge
    merge("slerp.yaml", "out/merged")

In memory, tensor by tensor (what merge search does): `plan, sources = plan_merge(config)`, then
`merge_tensor(plan, planned, sources, load_dtype=..., out_dtype=..., seed=...)` for each
`planned` in `plan.tensors`, calling `release_inputs(sources)` after each.
"""

from qwenlab.merge.config import MergeConfig, load_merge_config
from qwenlab.merge.executor import DEFAULT_MERGE_SHARD_BYTES, merge, merge_tensor, plan_merge, release_inputs
from qwenlab.merge.methods import METHODS, get_method
from qwenlab.merge.report import describe_plan

__all__ = ["DEFAULT_MERGE_SHARD_BYTES", "METHODS", "MergeConfig", "describe_plan", "get_method",
           "load_merge_config", "merge", "merge_tensor", "plan_merge", "release_inputs"]
