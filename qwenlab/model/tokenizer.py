"""Tokenizer and chat template: tokenizer.json through the `tokenizers` library, the template via Jinja.

The chat template may sit in tokenizer_config.json (the Qwen2.5 releases) or in
chat_template.jinja (what transformers 5 writes); both are read. Rendering follows
transformers' conventions (sandboxed Jinja, trim_blocks/lstrip_blocks, raise_exception, tojson).
"""

from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path

from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as RustTokenizer

from qwenlab.errors import QwenlabError

IM_END = "<|im_end|>"
ENDOFTEXT = "<|endoftext|>"


def _token_text(value) -> str | None:
    if isinstance(value, dict):  # older configs store AddedToken dicts
        return value.get("content")
    return value


def _raise_exception(message):
    raise TemplateError(message)


class Tokenizer:
    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        path = self.folder / "tokenizer.json"
        if not path.is_file():
            raise QwenlabError(f"{path}: missing tokenizer.json (qwenlab needs a fast tokenizer file)")
        try:
            self._tok = RustTokenizer.from_file(str(path))
        except Exception as e:  # the Rust error is long; keep its first line
            raise QwenlabError(f"{path}: invalid tokenizer file ({str(e).splitlines()[0]})") from None
        config_path = self.folder / "tokenizer_config.json"
        self.config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        self.chat_template = self._read_chat_template()
        self.eos_token = _token_text(self.config.get("eos_token")) or ENDOFTEXT
        self.pad_token = _token_text(self.config.get("pad_token")) or ENDOFTEXT

    def _read_chat_template(self) -> str | None:
        jinja = self.folder / "chat_template.jinja"
        if jinja.is_file():
            return jinja.read_text()
        template = self.config.get("chat_template")
        if isinstance(template, list):  # named templates: take the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        return template

    # ---- ids -----------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def token_id(self, text: str) -> int | None:
        return self._tok.token_to_id(text)

    @cached_property
    def eos_id(self) -> int | None:
        return self.token_id(self.eos_token)

    @cached_property
    def pad_id(self) -> int:
        pad = self.token_id(self.pad_token)
        return pad if pad is not None else (self.eos_id or 0)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=True).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def stop_ids(self, generation_config: dict | None = None) -> set[int]:
        """Tokens that end a generation: eos from both configs, plus <|im_end|> and <|endoftext|>."""
        ids = set()
        eos = (generation_config or {}).get("eos_token_id")
        ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        for text in (self.eos_token, IM_END, ENDOFTEXT):
            token = self.token_id(text)
            if token is not None:
                ids.add(token)
        return ids

    # ---- chat ----------------------------------------------------------------
    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        if not self.chat_template:
            raise QwenlabError(f"{self.folder}: the tokenizer has no chat template "
                               "(expected 'chat_template' in tokenizer_config.json or chat_template.jinja)")
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or "role" not in message or "content" not in message:
                raise QwenlabError(f"messages[{i}]: expected an object with 'role' and 'content'")
        try:
            return self._compiled_template.render(
                messages=messages, add_generation_prompt=add_generation_prompt, tools=None,
                bos_token=_token_text(self.config.get("bos_token")) or "", eos_token=self.eos_token)
        except TemplateError as e:
            raise QwenlabError(f"chat template: {e}") from None

    @cached_property
    def _compiled_template(self):
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False, **_: json.dumps(
            x, indent=indent, ensure_ascii=ensure_ascii)
        env.globals["raise_exception"] = _raise_exception
        return env.from_string(self.chat_template)


def load_tokenizer(folder: str | Path) -> Tokenizer:
    return Tokenizer(folder)
