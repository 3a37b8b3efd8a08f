"""Tokenizer, chat template and generation config of the merged model, chosen deliberately.

qwenlab merges models that share one vocabulary and keeps the embedding rows as they are
(Qwen2.5 pads 151665 tokens to 151936 rows; rebuilding to the tokenizer's size breaks users).
Inputs with different vocabularies are refused rather than silently remapped.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from pathlib import Path

from qwenlab.checkpoint import copy_tokenizer_files
from qwenlab.errors import QwenlabError
from qwenlab.merge.sources import TensorSource

log = logging.getLogger(__name__)

EMBED = "model.embed_tokens.weight"
# mergekit's built-in "chatml" template, so `chat_template: chatml` gives the same file.
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>' + '\\n'}}{% endfor %}\n{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
          "{% endif %}")


def vocabulary_hash(folder: Path) -> str | None:
    """sha256 of tokenizer.json's vocabulary and added tokens (not its padding or truncation settings)."""
    path = Path(folder) / "tokenizer.json"
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    vocabulary = {"vocab": (data.get("model") or {}).get("vocab"), "merges": (data.get("model") or {}).get("merges"),
                  "added": [(t.get("id"), t.get("content")) for t in data.get("added_tokens") or []]}
    return hashlib.sha256(json.dumps(vocabulary, sort_keys=True).encode()).hexdigest()


def check_vocabularies(sources: dict[str, TensorSource]) -> None:
    """Refuse inputs whose embedding shapes or tokenizer vocabularies differ."""
    shapes = {name: tuple(source.shape(EMBED)) for name, source in sources.items()}
    if len(set(shapes.values())) > 1:
        listing = ", ".join(f"{list(shape)} in {name}" for name, shape in shapes.items())
        raise QwenlabError(f"the models have different vocabularies ({EMBED}: {listing}); qwenlab merges models "
                           "that share one tokenizer and does not remap embeddings")
    hashes = {name: h for name, source in sources.items() if (h := vocabulary_hash(source.path))}
    if len(set(hashes.values())) > 1:
        groups = Counter(hashes.values())
        odd = [name for name, h in hashes.items() if groups[h] < max(groups.values())] or list(hashes)[1:]
        raise QwenlabError(f"the models have different tokenizer vocabularies (tokenizer.json of {', '.join(odd)} "
                           "differs); qwenlab merges models that share one tokenizer and does not remap embeddings")


def tokenizer_donor(tokenizer_source: str | None, base: str | None, sources: dict[str, TensorSource]) -> Path:
    """The folder whose tokenizer files the output gets: base (or first model), or a named model."""
    default = sources[base or next(iter(sources))].path
    if tokenizer_source in (None, "base", "union"):
        # union of identical vocabularies (checked above) is that vocabulary
        return default
    if tokenizer_source in sources:
        return sources[tokenizer_source].path
    folder = Path(tokenizer_source).expanduser()
    if not (folder / "tokenizer.json").is_file():
        raise QwenlabError(f"tokenizer_source: {tokenizer_source} is not base, union, or a folder with tokenizer.json")
    their, ours = vocabulary_hash(folder), vocabulary_hash(default)
    if their and ours and their != ours:
        raise QwenlabError(f"tokenizer_source: {tokenizer_source} has a different vocabulary from the merged models")
    return folder


def read_chat_template(folder: Path) -> str | None:
    jinja = Path(folder) / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    config = Path(folder) / "tokenizer_config.json"
    if config.is_file():
        template = json.loads(config.read_text()).get("chat_template")
        return template if isinstance(template, str) else None
    return None


def chosen_chat_template(setting: str, sources: dict[str, TensorSource]) -> str | None:
    """`auto`: the most common template among the inputs; `chatml`; or a literal Jinja template."""
    if setting == "auto":
        templates = [t.strip() for s in sources.values() if (t := read_chat_template(s.path))]
        return Counter(templates).most_common(1)[0][0] if templates else None
    if setting == "chatml":
        return CHATML
    if "{" in setting:
        return setting
    raise QwenlabError(f"chat_template: '{setting}' is not supported (expected auto, chatml, or a Jinja template)")


def write_chat_template(folder: Path, template: str) -> None:
    """chat_template.jinja wins; drop the copied tokenizer_config's own template so none disagrees."""
    (folder / "chat_template.jinja").write_text(template)
    config_path = folder / "tokenizer_config.json"
    if config_path.is_file():
        config = json.loads(config_path.read_text())
        if config.pop("chat_template", None) is not None:
            config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def warn_on_differences(sources: dict[str, TensorSource]) -> None:
    eos = {name: s.generation_config.get("eos_token_id", s.config.eos_token_id) for name, s in sources.items()}
    if len({json.dumps(v) for v in eos.values()}) > 1:
        log.warning("the models disagree on eos_token_id (%s); the output uses the tokenizer donor's", eos)
    templates = {(read_chat_template(s.path) or "").strip() for s in sources.values()}
    if len(templates) > 1:
        log.warning("the models have different chat templates; the output uses the tokenizer donor's "
                    "(set chat_template to choose)")


def write_tokenizer(folder: Path, donor: Path, chat_template: str | None,
                    sources: dict[str, TensorSource]) -> list[str]:
    """Copy the donor's tokenizer files into `folder` and apply chat_template; returns the files written."""
    copied = copy_tokenizer_files(donor, folder)
    if chat_template:
        template = chosen_chat_template(chat_template, sources)
        if template:
            write_chat_template(folder, template)
            copied.append("chat_template.jinja")
    return copied
