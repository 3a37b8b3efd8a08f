"""Perplexity of a text or JSONL file with a sliding window over long documents.

Each document is scored on its own, prefixed by one token (the tokenizer's BOS, else its EOS,
as lm-evaluation-harness does) so that every token of the text is predicted exactly once.

Windows (max_length input tokens, stride new targets per window after the first):

    seq = [prefix] + tokens;  window k reads seq[s_k : e_k] and scores the targets seq[p_k : e_k + 1]
    e_0 = min(max_length, L - 1), p_0 = 1;   e_k = min(e_{k-1} + stride, L - 1), p_k = e_{k-1} + 1,
    s_k = max(0, e_k - max_length)

so every target after the first window sees at least max_length - stride tokens of context
(stride = max_length gives disjoint windows: the cheapest and the most pessimistic figure).
This is the strided evaluation of the Hugging Face perplexity guide, with each token counted once.

    perplexity    = exp(-sum log p / tokens)
    bits_per_byte = -sum log p / (utf-8 bytes · ln 2)   (comparable across tokenizers)
    word_perplexity = exp(-sum log p / words)           (lm-evaluation-harness' wikitext metric)
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from qwenlab.eval.jsonl import jsonl_records, read_text_file
from qwenlab.errors import QwenlabError

LOGITS_BUDGET_BYTES = 1 << 30


@dataclass
class PerplexityResult:
    source: str
    documents: int
    tokens: int
    nll_sum: float  # -sum of log p over every scored token (nats)
    bytes: int
    words: int
    max_length: int
    stride: int

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll_sum / self.tokens) if self.tokens else float("nan")

    @property
    def bits_per_byte(self) -> float:
        return self.nll_sum / (self.bytes * math.log(2)) if self.bytes else float("nan")

    @property
    def word_perplexity(self) -> float:
        return math.exp(self.nll_sum / self.words) if self.words else float("nan")

    def as_dict(self) -> dict:
        return {**asdict(self), "perplexity": round(self.perplexity, 4), "bits_per_byte": round(self.bits_per_byte, 4),
                "word_perplexity": round(self.word_perplexity, 4)}


def read_documents(path: str | Path, field: str = "text", limit: int | None = None) -> list[str]:
    """A .jsonl/.json-lines file gives one document per line (its `field`); any other file is one document."""
    path = Path(path)
    if path.suffix not in (".jsonl", ".ndjson"):
        text = read_text_file(path)
        if not text.strip():
            raise QwenlabError(f"{path}: the file is empty")
        return [text]
    documents = []
    for number, record in jsonl_records(path):
        if not isinstance(record, dict) or not isinstance(record.get(field), str):
            raise QwenlabError(f"{path}:{number}: expected an object with a string field '{field}'")
        if record[field]:
            documents.append(record[field])
        if limit is not None and len(documents) >= limit:
            break
    if not documents:
        raise QwenlabError(f"{path}: no documents with a non-empty '{field}' field")
    return documents


def windows(length: int, max_length: int, stride: int) -> list[tuple[int, int, int]]:
    """(start, end, first_target) per window over a sequence of `length` ids (prefix included).

    The window reads ids[start:end] and scores targets ids[first_target:end + 1].
    """
    if max_length < 1 or not 1 <= stride <= max_length:
        raise QwenlabError(f"need 1 <= stride <= max_length, got stride {stride}, max_length {max_length}")
    last = length - 1  # the last input position that predicts something
    if last < 1:
        return []
    end = min(max_length, last)
    result = [(0, end, 1)]
    while end < last:
        new_end = min(end + stride, last)
        result.append((max(0, new_end - max_length), new_end, end + 1))
        end = new_end
    return result


@torch.inference_mode()
def sequence_nll(model, ids: list[int], max_length: int, stride: int, batch_size: int | None = None
                 ) -> tuple[float, int]:
    """(-sum log p, number of scored tokens) of ids[1:] given ids[0] and the sliding windows."""
    plan = windows(len(ids), max_length, stride)
    # The head's logits are [batch, max_length, vocab]: keep them near 1 GiB in float32.
    batch_size = batch_size or max(1, LOGITS_BUDGET_BYTES // (4 * max_length * model.config.vocab_size))
    seq = torch.tensor(ids)
    nll, count = 0.0, 0
    # Windows of one length batch together (all but the first and last are max_length long).
    groups: dict[int, list[tuple[int, int, int]]] = {}
    for window in plan:
        groups.setdefault(window[1] - window[0], []).append(window)
    for group in groups.values():
        for i in range(0, len(group), batch_size):
            chunk = group[i:i + batch_size]
            inputs = torch.stack([seq[s:e] for s, e, _ in chunk])
            logits = model(inputs).float()
            for row, (s, e, first) in enumerate(chunk):
                # logits at input position j predict seq[s + j + 1]; targets seq[first : e + 1]
                positions = torch.arange(first - 1 - s, e - s)
                log_probs = F.log_softmax(logits[row, positions], dim=-1)
                targets = seq[first:e + 1]
                nll -= float(log_probs.gather(-1, targets[:, None]).sum())
                count += len(targets)
    return nll, count


def evaluate_perplexity(model, tokenizer, documents: list[str], *, max_length: int | None = None,
                        stride: int | None = None, prefix_token_id: int | None = None, batch_size: int | None = None,
                        source: str = "", progress: bool = True) -> PerplexityResult:
    """Token perplexity (and bits per byte, word perplexity) over documents scored separately."""
    max_length = max_length or min(model.config.max_position_embeddings, 1024)
    stride = stride or max(1, max_length // 2)
    if max_length > model.config.max_position_embeddings:
        raise QwenlabError(f"--max-length {max_length} exceeds the model's context "
                           f"({model.config.max_position_embeddings})")
    prefix = prefix_token_id if prefix_token_id is not None else default_prefix_token_id(tokenizer)
    result = PerplexityResult(source, 0, 0, 0.0, 0, 0, max_length, stride)
    for text in tqdm(documents, desc="perplexity", unit="doc", disable=not progress):
        ids = tokenizer.encode(text)
        if not ids:
            continue
        nll, count = sequence_nll(model, [prefix] + ids, max_length, stride, batch_size)
        result.documents += 1
        result.tokens += count
        result.nll_sum += nll
        result.bytes += len(text.encode("utf-8"))
        result.words += len(text.split())
    if not result.tokens:
        raise QwenlabError(f"{source or 'documents'}: nothing to score (every document tokenized to nothing)")
    return result


def default_prefix_token_id(tokenizer) -> int:
    """BOS if the tokenizer has one, else EOS (lm-evaluation-harness' prefix for loglikelihoods)."""
    bos = tokenizer.config.get("bos_token")
    bos = bos.get("content") if isinstance(bos, dict) else bos
    bos_id = tokenizer.token_id(bos) if bos else None
    if bos_id is not None:
        return bos_id
    if tokenizer.eos_id is None:
        raise QwenlabError(f"{tokenizer.folder}: the tokenizer has neither a BOS nor an EOS token to prefix with")
    return tokenizer.eos_id
