"""Stage `card`: a Hugging Face model card for each variant, with the others side by side.

    - card: {models: [nano, sft-math, merged, merged-int4], base_model: Qwen/Qwen2.5-0.5B-Instruct}

models: names known to the run (default: those of the last compare stage, else all). A model folder
made by this run gets its README.md inside it; any other (nano, an input folder) gets
cards/<name>.md in the run folder, so nothing outside the run is written. Optional: base_model
(a Hub id for the metadata), license.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from qwenlab.recipe.stages.params import StageParams


class Params(StageParams):
    MODEL_FIELDS = ("models",)
    models: list[str] | None = None
    base_model: str | None = None  # a Hub id for the metadata
    license: str | None = None


def card_file_name(name: str, folder: Path, taken: set[str]) -> str:
    """cards/<this>.md for a model outside the run: its name when that is a plain name, else the folder's
    name made plain (a name given as a path, e.g. /abs/model or ../x, must not place the card outside)."""
    from qwenlab.recipe.context import is_plain_name

    stem = name if is_plain_name(name) else \
        re.sub(r"[^A-Za-z0-9._-]+", "-", folder.name).strip(".-") or "model"
    unique, n = stem, 1
    while unique in taken:
        n += 1
        unique = f"{stem}-{n}"
    taken.add(unique)
    return f"{unique}.md"


def run(ctx, params: Params) -> tuple[dict, str]:
    from qwenlab.report.card import build_card, validate_card
    from qwenlab.checkpoint.reader import resolve_model_path

    saved = ctx.run_dir / "variants.json"
    default = json.loads(saved.read_text()) if saved.is_file() else {}
    names = params.models or list(default) or list(ctx.models)
    folders = {name: resolve_model_path(ctx.model_path(name)).resolve() for name in names}
    run_dir = ctx.run_dir.resolve()
    written: dict[str, str] = {}  # name -> path relative to the run folder
    taken: set[str] = set()
    for name, folder in folders.items():
        others = list(folders.values()) if len(folders) > 1 else None
        text = build_card(folder, variants=others, base_model=params.base_model, license=params.license,
                          names={str(path): n for n, path in folders.items()})
        validate_card(text)
        out = folder / "README.md" if folder.is_relative_to(run_dir) else \
            run_dir / "cards" / card_file_name(name, folder, taken)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text, encoding="utf-8")
        written[name] = str(out.relative_to(run_dir))
        print(f"  card: {out}")
    links = "\n".join(f"- `{name}`: [{path}]({path})" for name, path in written.items())
    section = ("## Model cards\n\nOne Hugging Face model card per variant (README.md format, validated with "
               "huggingface_hub's ModelCard), from measured figures only:\n\n" + links)
    return {"cards": written}, section
