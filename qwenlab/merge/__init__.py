"""Model merging: mergekit-compatible YAML, one file per method, streaming execution.

    from qwenlab.merge import merge
    merge("slerp.yaml", "out/merged")
"""

from qwenlab.merge.config import MergeConfig, load_merge_config
from qwenlab.merge.executor import DEFAULT_MERGE_SHARD_BYTES, merge, plan_merge
from qwenlab.merge.methods import METHODS, get_method
from qwenlab.merge.report import describe_plan

__all__ = ["DEFAULT_MERGE_SHARD_BYTES", "METHODS", "MergeConfig", "describe_plan", "get_method",
           "load_merge_config", "merge", "plan_merge"]
