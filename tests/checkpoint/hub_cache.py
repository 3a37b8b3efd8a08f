"""A Hugging Face hub cache built on disk with the layout huggingface_hub documents and reads
(models--ORG--NAME/{blobs,snapshots/COMMIT,refs/BRANCH}), for tests that name models by hub id offline."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def add_repo(cache: Path, repo_id: str, folder: Path, commit: str, branch: str | None = "main") -> Path:
    """Copy `folder`'s files into the cache as revision `commit` (files as symlinks to content-addressed
    blobs, as huggingface_hub writes them); `branch` (refs/BRANCH) points at it. Returns the snapshot."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        data = file.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        target = snapshot / file.relative_to(folder)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(os.path.relpath(blob, target.parent))
    if branch:
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / branch).write_text(commit)
    return snapshot
