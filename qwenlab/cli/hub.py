"""`qwenlab pull ID` (a hub model or adapter into the standard Hugging Face cache) and `qwenlab cache clear`
(qwenlab's own caches under $QWENLAB_HOME)."""

from __future__ import annotations

import shutil

from qwenlab.errors import QwenlabError

# What `cache clear` removes: rebuilt on demand. Measurements (figures) are kept unless --all.
REBUILDABLE = ("kernels", "bench-variants", "wheels")


def cmd_pull(args) -> int:
    from qwenlab.checkpoint.hub import hub_snapshot

    folder = hub_snapshot(args.id)
    kinds = "an adapter" if (folder / "adapter_config.json").is_file() else "a model"
    if not any(folder.glob("*.safetensors")):
        raise QwenlabError(f"{args.id}: the repository has no safetensors weights (pickled .bin/.pt weights are "
                           "never fetched or loaded)")
    print(f"{args.id}: {kinds} in {folder}")
    return 0


def cmd_cache_clear(args) -> int:
    from qwenlab.home import qwenlab_home

    home = qwenlab_home()
    names = [*REBUILDABLE, "measurements"] if args.all else list(REBUILDABLE)
    targets = [home / name for name in names if (home / name).exists()]
    if not targets:
        print(f"nothing to clear in {home}")
        return 0
    if not args.yes:
        raise QwenlabError(f"cache clear: would remove {', '.join(map(str, targets))}; add --yes to do it")
    for target in targets:
        shutil.rmtree(target)
        print(f"removed {target}")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("pull", help="download a hub model or adapter (org/name[@rev]) into the HF cache")
    p.add_argument("id", help="org/name or org/name@revision")
    p.set_defaults(func=cmd_pull)
    cache = subparsers.add_parser("cache", help="qwenlab's own caches ($QWENLAB_HOME)")
    verbs = cache.add_subparsers(dest="cache_command", metavar="VERB", required=True)
    p = verbs.add_parser("clear", help=f"remove rebuildable caches ({', '.join(REBUILDABLE)}); --all: measurements too")
    p.add_argument("--all", action="store_true", help="also remove recorded measurements")
    p.add_argument("--yes", action="store_true", help="do it (without it, say what would be removed)")
    p.set_defaults(func=cmd_cache_clear)
