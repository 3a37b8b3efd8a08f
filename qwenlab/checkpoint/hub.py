"""Hub ids: `org/name` or `org/name@rev`, resolved through huggingface_hub and its standard cache.

A model that transformers (or `qwenlab pull`) already downloaded is reused from HF_HUB_CACHE; only
safetensors, JSON, tokenizer and template files are fetched, never pickled weights (.bin, .pt).
HF_HUB_OFFLINE=1 and HF_TOKEN are read by huggingface_hub itself. Offline, an id that is not in the
cache is one line saying where qwenlab looked and how to fetch it.
"""

from __future__ import annotations

import re
from pathlib import Path

from qwenlab.errors import QwenlabError

HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*)(?:@(?P<revision>[A-Za-z0-9][A-Za-z0-9._/-]*))?$")
# What a model or adapter needs: weights, configs, the tokenizer and the chat template. Never *.bin or *.pt.
ALLOW_PATTERNS = ["*.safetensors", "*.json", "*.jinja", "*.txt", "*.model", "*.tiktoken", "README.md"]


def parse_hub_id(reference: str | Path) -> tuple[str, str | None] | None:
    """(repo_id, revision) for 'org/name' or 'org/name@rev'; None for anything else."""
    match = HUB_ID.match(str(reference))
    return (match["repo"], match["revision"]) if match else None


def hub_snapshot(reference: str, local_only: bool = False) -> Path:
    """The snapshot folder of a hub id, downloaded into the standard cache unless it is there already."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    parsed = parse_hub_id(reference)
    if parsed is None:
        raise QwenlabError(f"{reference}: not a hub id (expected org/name or org/name@revision)")
    repo, revision = parsed
    offline = local_only or constants.HF_HUB_OFFLINE
    try:
        folder = snapshot_download(repo, revision=revision, allow_patterns=ALLOW_PATTERNS, local_files_only=offline)
    except LocalEntryNotFoundError:
        how = ("HF_HUB_OFFLINE=1 is set; " if constants.HF_HUB_OFFLINE else "") + \
              f"fetch it where the network is reachable with `qwenlab pull {reference}`"
        raise QwenlabError(f"{reference}: not a local folder, and not in the Hugging Face cache "
                           f"({constants.HF_HUB_CACHE}); {how}") from None
    except RevisionNotFoundError:
        raise QwenlabError(f"{reference}: the repository has no revision '{revision}'") from None
    except GatedRepoError:
        raise QwenlabError(f"{reference}: a gated repository; accept its terms on the Hub and set HF_TOKEN") from None
    except RepositoryNotFoundError:
        raise QwenlabError(f"{reference}: no such repository on the Hub (or it is private: set HF_TOKEN)") from None
    except (HfHubHTTPError, OSError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise QwenlabError(f"{reference}: could not fetch from the Hub ({first})") from None
    return Path(folder)


def cached_repositories() -> list[dict]:
    """Every repository in the Hugging Face cache: id, kind, size on disk, revisions, path."""
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    try:
        info = scan_cache_dir()
    except CacheNotFound:
        return []
    return [{"id": repo.repo_id, "kind": repo.repo_type, "size_bytes": repo.size_on_disk,
             "revisions": sorted(r.commit_hash[:12] for r in repo.revisions), "path": str(repo.repo_path)}
            for repo in sorted(info.repos, key=lambda r: r.repo_id)]
