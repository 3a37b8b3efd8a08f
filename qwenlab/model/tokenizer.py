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
from tokenizers import decoders

from qwenlab.errors import QwenlabError

IM_END = "<|im_end|>"
ENDOFTEXT = "<|endoftext|>"


def _token_text(value) -> str | None:
    if isinstance(value, dict):  # older configs store AddedToken dicts
        value = value.get("content")
    return value if isinstance(value, str) else None


def _raise_exception(message):
    raise TemplateError(message)


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level alphabet (bytes_to_unicode), inverted: the character each byte is spelt as -> the byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    spelling = {b: chr(b) for b in printable} | {b: chr(256 + i) for i, b in enumerate(others)}
    return {char: b for b, char in spelling.items()}


def _read_tokenizer_config(path: Path) -> dict:
    if not path.exists():
        return {}
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except IsADirectoryError:
        raise QwenlabError(f"{path}: expected a JSON file, found a folder") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise QwenlabError(f"{path}: invalid JSON ({e})") from None
    if not isinstance(config, dict):
        raise QwenlabError(f"{path}: expected a JSON object of tokenizer settings, got {type(config).__name__}")
    return config


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
        self.config = _read_tokenizer_config(self.folder / "tokenizer_config.json")
        self.chat_template = self._read_chat_template()
        self.eos_token = _token_text(self.config.get("eos_token")) or ENDOFTEXT
        self.pad_token = _token_text(self.config.get("pad_token")) or ENDOFTEXT

    def _read_chat_template(self) -> str | None:
        jinja = self.folder / "chat_template.jinja"
        if jinja.is_file():
            try:
                return jinja.read_text(encoding="utf-8")
            except UnicodeDecodeError as e:
                raise QwenlabError(f"{jinja}: not UTF-8 text ({e.reason})") from None
        template = self.config.get("chat_template")
        where = f"{self.folder / 'tokenizer_config.json'}: 'chat_template'"
        if isinstance(template, list):  # named templates: take the default one
            if not all(isinstance(t, dict) and isinstance(t.get("template"), str) for t in template):
                raise QwenlabError(f"{where}: expected a string or a list of {{name, template}} objects")
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        if template is not None and not isinstance(template, str):
            raise QwenlabError(f"{where}: expected a string, got {type(template).__name__}")
        return template

    # ---- ids -----------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def token_id(self, text: str) -> int | None:
        return self._tok.token_to_id(text)

    def vocabulary(self) -> dict[str, int]:
        """Every token's text and id, added tokens included (what a swarm compares between peers)."""
        return self._tok.get_vocab(with_added_tokens=True)

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

    @cached_property
    def _byte_alphabet(self) -> dict[str, int] | None:
        """The byte each character of a token spells, when the decoder is plain byte-level (Qwen's)."""
        return _byte_level_alphabet() if isinstance(self._tok.decoder, decoders.ByteLevel) else None

    @cached_property
    def _added_tokens(self) -> dict[int, tuple[str, bool]]:
        return {i: (t.content, t.special) for i, t in self._tok.get_added_tokens_decoder().items()}

    @property
    def byte_level(self) -> bool:
        return self._byte_alphabet is not None

    def token_bytes(self, token_id: int) -> bytes | None:
        """The bytes this token adds to `decode(ids)`'s UTF-8 stream (skip_special_tokens=True).

        None when the decoder is not byte-level: then bytes are not what the tokens spell. An added
        token is decoded as its text (a special one is skipped); any other token as the bytes its
        characters stand for, which `decode` joins and turns into text as one UTF-8 stream.
        """
        alphabet = self._byte_alphabet
        if alphabet is None:
            return None
        if token_id in self._added_tokens:
            content, special = self._added_tokens[token_id]
            return b"" if special else content.encode("utf-8")
        token = self._tok.id_to_token(token_id)
        if token is None:  # an id past the vocabulary decodes to nothing
            return b""
        try:
            return bytes(alphabet[char] for char in token)
        except KeyError:  # not spelt in the byte alphabet: decode takes the text as it is
            return token.encode("utf-8")

    def stop_ids(self, generation_config: dict | None = None) -> set[int]:
        """Tokens that end a generation: eos from both configs, plus <|im_end|> and <|endoftext|>."""
        ids = set()
        eos = (generation_config or {}).get("eos_token_id")
        eos = eos if isinstance(eos, list) else [eos] if eos is not None else []
        if not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < 2**63 for i in eos):
            raise QwenlabError(f"{self.folder / 'generation_config.json'}: 'eos_token_id' must be a token id "
                               f"or a list of token ids, got {(generation_config or {}).get('eos_token_id')!r}")
        ids.update(eos)
        for text in (self.eos_token, IM_END, ENDOFTEXT):
            token = self.token_id(text)
            if token is not None:
                ids.add(token)
        return ids

    # ---- chat ----------------------------------------------------------------
    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            tools: list[dict] | None = None) -> str:
        """The conversation as the model's template writes it; `tools` (OpenAI function objects) go in
        the template's tools block (Qwen2.5: its system turn)."""
        if not self.chat_template:
            raise QwenlabError(f"{self.folder}: the tokenizer has no chat template "
                               "(expected 'chat_template' in tokenizer_config.json or chat_template.jinja)")
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or "role" not in message or "content" not in message:
                raise QwenlabError(f"messages[{i}]: expected an object with 'role' and 'content'")
        try:
            return self._compiled_template.render(
                messages=messages, add_generation_prompt=add_generation_prompt, tools=tools or None,
                bos_token=_token_text(self.config.get("bos_token")) or "", eos_token=self.eos_token)
        except TemplateError as e:
            raise QwenlabError(f"{self._template_source}: chat template: {e}") from None

    @property
    def _template_source(self) -> Path:
        jinja = self.folder / "chat_template.jinja"
        return jinja if jinja.is_file() else self.folder / "tokenizer_config.json"

    @cached_property
    def _compiled_template(self):
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False, **_: json.dumps(
            x, indent=indent, ensure_ascii=ensure_ascii)
        env.globals["raise_exception"] = _raise_exception
        return env.from_string(self.chat_template)


def load_tokenizer(folder: str | Path) -> Tokenizer:
    """The tokenizer of a model folder, 'nano', or a hub id (every reference the loaders take)."""
    from qwenlab.checkpoint.reader import resolve_model_path

    return Tokenizer(resolve_model_path(folder))
