"""Prefix caching: the KV of token prefixes already seen, reused by later prompts that start the same way.

A prompt is cut into blocks of BLOCK_TOKENS tokens. Block j's key hashes (key of block j-1, its tokens),
so one key names a whole prefix (vLLM's automatic prefix caching); a lookup walks a prompt's blocks
from the start and stops at the first miss. Each block holds its tokens' keys and values for every
layer, [layers, 2, kv heads, BLOCK_TOKENS, head dim], computed at positions 0.. (RoPE is baked into the
keys, and a prefix always starts at position 0, so a block fits any prompt that starts with it).

Namespaces keep KV apart where it differs: the engine (a base or variant; a quantized base is its own
engine) and the adapter, down to the attach that loaded it (an adapter unloaded and loaded again under
the same name never meets its old KV). The namespace is compared in full, and so are a block's tokens
and parent key, so a hash collision can never hand out another prefix's KV.

Blocks are kept in least-recently-used order under a byte budget. A lookup touches a chain from its
last block to its first, so an ancestor is always more recent than its descendants and eviction takes
leaves first. Only the engine thread reads or writes the cache.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

BLOCK_TOKENS = 16


@dataclass
class Block:
    namespace: tuple
    parent: int | None
    tokens: tuple[int, ...]
    kv: torch.Tensor  # [layers, 2 (keys, values), kv heads, BLOCK_TOKENS, head dim]

    @property
    def nbytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()


class PrefixCache:
    def __init__(self, budget_bytes: int, block_tokens: int = BLOCK_TOKENS):
        self.budget_bytes, self.block_tokens = budget_bytes, block_tokens
        self.blocks: OrderedDict[int, Block] = OrderedDict()  # least recently used first
        self.bytes = 0
        self.queried_tokens = 0  # prompt tokens looked up
        self.hit_tokens = 0  # prompt tokens whose KV was reused
        self.evicted_blocks = 0

    @property
    def cached_tokens(self) -> int:
        return len(self.blocks) * self.block_tokens

    def hit_rate(self) -> float:
        return self.hit_tokens / self.queried_tokens if self.queried_tokens else 0.0

    def _key(self, namespace: tuple, parent: int | None, tokens: tuple[int, ...]) -> int:
        return hash((namespace, parent, tokens))

    def _chain(self, namespace: tuple, tokens: list[int], blocks: int):
        """(key, parent, block tokens) of the first `blocks` blocks of `tokens`."""
        parent, size = None, self.block_tokens
        for j in range(blocks):
            part = tuple(tokens[j * size:(j + 1) * size])
            key = self._key(namespace, parent, part)
            yield key, parent, part
            parent = key

    def _get(self, namespace: tuple, key: int, parent: int | None, tokens: tuple[int, ...]) -> Block | None:
        block = self.blocks.get(key)
        if block is None or block.parent != parent or block.tokens != tokens or block.namespace != namespace:
            return None
        return block

    def match(self, namespace: tuple, tokens: list[int], limit: int) -> tuple[list[int], torch.Tensor | None]:
        """The longest cached prefix of tokens[:limit] (whole blocks): (its block keys, its KV
        [layers, 2, kv heads, length, head dim]); counts the lookup in the hit rate."""
        self.queried_tokens += len(tokens)
        found: list[tuple[int, Block]] = []
        for key, parent, part in self._chain(namespace, tokens, max(0, limit) // self.block_tokens):
            block = self._get(namespace, key, parent, part)
            if block is None:
                break
            found.append((key, block))
        for key, _ in reversed(found):  # ancestors end up more recent than descendants
            self.blocks.move_to_end(key)
        if not found:
            return [], None
        self.hit_tokens += len(found) * self.block_tokens
        return [k for k, _ in found], torch.cat([b.kv for _, b in found], dim=3)

    def cached_length(self, namespace: tuple, tokens: list[int], limit: int) -> int:
        """How many of tokens[:limit] a `match` would reuse, without counting or touching anything."""
        found = 0
        for key, parent, part in self._chain(namespace, tokens, max(0, limit) // self.block_tokens):
            if self._get(namespace, key, parent, part) is None:
                break
            found += 1
        return found * self.block_tokens

    def insert(self, namespace: tuple, tokens: list[int], kv_of) -> int:
        """Cache every whole block of `tokens` not cached yet; kv_of(start, end) gives the KV of
        tokens[start:end] as [layers, 2, kv heads, end - start, head dim]. Returns the blocks added."""
        whole = len(tokens) // self.block_tokens
        if whole == 0 or self.budget_bytes <= 0:
            return 0
        chain = list(self._chain(namespace, tokens, whole))
        first_new = 0
        while first_new < whole and self._get(namespace, *chain[first_new]) is not None:
            first_new += 1
        added = 0
        if first_new < whole:
            size = self.block_tokens
            kv = kv_of(first_new * size, whole * size)
            for j in range(first_new, whole):
                key, parent, part = chain[j]
                if key in self.blocks:  # a different prefix with a colliding hash holds the key: leave it
                    break
                piece = kv[:, :, :, (j - first_new) * size:(j - first_new + 1) * size].contiguous()
                block = Block(namespace, parent, part, piece)
                self.blocks[key] = block
                self.bytes += block.nbytes
                added += 1
        for key, _, _ in reversed(chain[:first_new + added]):
            self.blocks.move_to_end(key)
        self._evict()
        return added

    def drop(self, namespace: tuple) -> None:
        """Forget a namespace (its adapter was unloaded)."""
        for key in [k for k, b in self.blocks.items() if b.namespace == namespace]:
            self.bytes -= self.blocks.pop(key).nbytes

    def _evict(self) -> None:
        while self.bytes > self.budget_bytes and self.blocks:
            _, block = self.blocks.popitem(last=False)
            self.bytes -= block.nbytes
            self.evicted_blocks += 1
