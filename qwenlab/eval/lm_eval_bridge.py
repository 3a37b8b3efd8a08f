"""lm-evaluation-harness model "qwenlab": loglikelihood, loglikelihood_rolling and generate_until on qwenlab's engine.

    import qwenlab.eval.lm_eval_bridge          # registers "qwenlab" with lm_eval's model registry
    lm_eval.simple_evaluate(model="qwenlab", model_args="pretrained=PATH,adapter=PATH,dtype=fp32,batch_size=8",
                            tasks=[...])
    python -m qwenlab.eval.lm_eval_bridge run --model qwenlab --model_args pretrained=nano --tasks ...

lm_eval 0.4 finds models only in its registry (no entry-point group), so registration happens on
import of this module; `qwenlab eval --lm-eval` and the `python -m` shim above import it first.

Any qwenlab variant works: a model folder, 'nano', a quantized folder (load_model dispatches to
qwenlab.quant), or a LoRA adapter (`adapter=` or an adapter folder as `pretrained`), attached unmerged.
Scoring follows lm_eval's HF model (`hf`) exactly: the same context/continuation split, left
truncation to max_length, rolling windows and prefix token, so the two agree to float precision.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from tqdm import tqdm

import lm_eval.models  # noqa: F401  lm_eval fills its registry lazily only while it is empty: fill it first
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text

from qwenlab.eval.perplexity import LOGITS_BUDGET_BYTES, default_prefix_token_id
from qwenlab.errors import QwenlabError

MODEL_NAME = "qwenlab"


class QwenlabLM(TemplateLM):
    """An lm_eval LM over a qwenlab model core (CPU)."""

    backend = "causal"

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None) -> "QwenlabLM":
        # model_args win over the harness's own batch_size/device (its CLI always passes them).
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in arg_dict}
        return cls(**arg_dict, **extra)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> "QwenlabLM":
        return cls.create_from_arg_obj(lm_utils.simple_parse_args_string(arg_string), additional_config)

    def __init__(self, pretrained: str = "nano", adapter: str | None = None, dtype: str = "fp32",
                 batch_size: int | str | None = 8, max_length: int | None = None, max_gen_toks: int = 256,
                 prefix_token_id: int | None = None, device: str | None = None, model=None, tokenizer=None,
                 **_ignored):
        super().__init__()
        if device not in (None, "cpu"):  # lm_eval's CLI passes cuda:0 by default
            logging.getLogger(__name__).warning("qwenlab runs on the CPU; ignoring device=%s", device)
        if model is None:
            from qwenlab.variants.listing import load_variant

            model, tokenizer, variant = load_variant(str(pretrained), dtype=str(dtype), adapters=[adapter] if adapter else ())
            self.variant_path = str(variant.path)
        else:
            if tokenizer is None:
                raise QwenlabError("QwenlabLM(model=...) needs tokenizer= too")
            self.variant_path = str(pretrained)
        self.model, self.tokenizer = model, tokenizer
        # "auto" and None: lm_eval's CLI defaults; a fixed size is what a CPU wants.
        self._batch_size = int(batch_size) if str(batch_size).isdigit() else 8
        self._max_length = int(max_length) if max_length else None
        self._max_gen_toks = int(max_gen_toks)
        self._prefix = int(prefix_token_id) if prefix_token_id is not None else default_prefix_token_id(tokenizer)
        if tokenizer.eos_id is None:
            raise QwenlabError(f"{tokenizer.folder}: the tokenizer has no EOS token")

    # ---- what lm_eval asks of a model --------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self._prefix

    @property
    def max_length(self) -> int:
        return self._max_length or self.model.config.max_position_embeddings

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def tokenizer_name(self) -> str:
        return str(self.tokenizer.folder).replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return self.tokenizer.chat_template if chat_template else None

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(chat_history, add_generation_prompt=add_generation_prompt)

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None,
                   **kwargs) -> list[int]:
        ids = self.tokenizer.encode(string)
        if add_special_tokens is False and ids and ids[0] == self._prefix and not string.startswith(
                self.tokenizer.decode([self._prefix], skip_special_tokens=False)):
            ids = ids[1:]  # a post-processor added BOS that the caller does not want
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
        tokens = [tokens] if isinstance(tokens, int) else list(tokens)
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    def get_model_info(self) -> dict:
        return {"model_path": self.variant_path, "model_dtype": str(self.model.dtype),
                "model_num_parameters": sum(p.numel() for p in self.model.parameters())}

    # ---- scoring -----------------------------------------------------------------------------
    def _rows_per_batch(self, length: int) -> int:
        return max(1, min(self.batch_size, LOGITS_BUDGET_BYTES // (4 * max(1, length) * self.model.config.vocab_size)))

    @torch.inference_mode()
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """(sum log p(continuation | context), whether greedy decoding yields the continuation) per request."""
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i][1]) - len(requests[i][2]))
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        bar = tqdm(total=len(requests), desc="loglikelihood", disable=disable_tqdm)
        position = 0
        while position < len(order):
            first = requests[order[position]]
            longest = min(len(first[1]) + len(first[2]) - 1, self.max_length)
            chunk = order[position:position + self._rows_per_batch(longest)]
            position += len(chunk)
            inputs, lengths = [], []
            for index in chunk:
                _, context, continuation = requests[index]
                if not context or not continuation:
                    raise QwenlabError("loglikelihood request with an empty context or continuation")
                # Left-truncate to max_length inputs; the last token is only ever a target.
                ids = (context + continuation)[-(self.max_length + 1):][:-1]
                inputs.append(ids)
                lengths.append(len(ids))
            width = max(lengths)
            # Right padding: causal attention keeps pads from touching the real positions.
            batch = torch.tensor([ids + [self.eot_token_id] * (width - len(ids)) for ids in inputs])
            logits = self.model(batch)
            for row, index in enumerate(chunk):
                continuation = requests[index][2]
                n = len(continuation)
                log_probs = F.log_softmax(logits[row, lengths[row] - n:lengths[row]].float(), dim=-1)
                target = torch.tensor(continuation)
                greedy = bool((log_probs.argmax(-1) == target).all())
                results[index] = (float(log_probs.gather(-1, target[:, None]).sum()), greedy)
                key = requests[index][0]
                if key is not None:
                    self.cache_hook.add_partial("loglikelihood", key, results[index])
            bar.update(len(chunk))
        bar.close()
        return results  # type: ignore[return-value]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Sum log p of each whole string, in disjoint windows of max_length (lm_eval's rolling windows)."""
        totals = []
        for (string,) in tqdm([r.args for r in requests], desc="loglikelihood_rolling", disable=disable_tqdm):
            windows = map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1))
            scored = self._loglikelihood_tokens([(None, ctx, cont) for ctx, cont in windows], disable_tqdm=True)
            total = sum(logprob for logprob, _ in scored)
            totals.append(total)
            self.cache_hook.add_partial("loglikelihood_rolling", (string,), total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from qwenlab.model.generate import GenerationConfig, generate

        results: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for index, request in enumerate(requests):
            groups.setdefault(repr(sorted(request.args[1].items())), []).append(index)
        eos = self.tok_decode(self.eot_token_id, skip_special_tokens=False)
        bar = tqdm(total=len(requests), desc="generate_until", disable=disable_tqdm)
        for indices in groups.values():
            kwargs = normalize_gen_kwargs(requests[indices[0]].args[1], self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            max_new = int(kwargs.pop("max_gen_toks"))
            if max_new >= self.max_length:
                raise QwenlabError(f"max_gen_toks {max_new} must be below the context length {self.max_length}")
            config = GenerationConfig(
                max_new_tokens=max_new, temperature=float(kwargs.get("temperature") or 0.0) if kwargs.get("do_sample")
                else 0.0, top_p=float(kwargs.get("top_p") or 1.0), top_k=int(kwargs.get("top_k") or 0),
                stop=tuple(s for s in until if s), seed=kwargs.get("seed"), max_context=self.max_length,
                truncate_prompt=True)
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start:start + self.batch_size]
                contexts = [requests[i].args[0] for i in chunk]
                for index, context, completion in zip(chunk, contexts, generate(self.model, self.tokenizer, contexts,
                                                                                config)):
                    # Decode the ids (as HFLM does) rather than the streamed text, which holds back a
                    # trailing incomplete UTF-8 sequence.
                    text = postprocess_generated_text(self.tok_decode(completion.token_ids), until, None)
                    results[index] = text
                    self.cache_hook.add_partial("generate_until", (context, requests[index].args[1]), text)
                bar.update(len(chunk))
        bar.close()
        return results  # type: ignore[return-value]


if __name__ != "__main__":  # run as a script, the import below registers the one true class
    register_model(MODEL_NAME)(QwenlabLM)


def run_lm_eval(model: str, tasks: list[str], *, adapter: str | None = None, dtype: str = "fp32",
                batch_size: int = 8, include_path: str | None = None, limit: int | float | None = None,
                num_fewshot: int | None = None, apply_chat_template: bool = False, seed: int = 0,
                only_include_path: bool = False, lm: QwenlabLM | None = None) -> dict:
    """lm_eval.simple_evaluate over a qwenlab variant; returns lm_eval's results dict.

    only_include_path: index the tasks of include_path only, not lm_eval's thousands of built-in ones
    (much faster start when every task is local).
    """
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    if only_include_path and not include_path:
        raise QwenlabError("only_include_path needs include_path (a folder of task YAML files)")
    lm = lm or QwenlabLM(pretrained=model, adapter=adapter, dtype=dtype, batch_size=batch_size)
    manager = TaskManager(include_path=include_path, include_defaults=not only_include_path)
    try:
        return simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=limit, num_fewshot=num_fewshot,
                               apply_chat_template=apply_chat_template, log_samples=False, random_seed=seed,
                               numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed,
                               bootstrap_iters=0)
    except KeyError as e:  # lm_eval's unknown-task error
        raise QwenlabError(f"lm_eval: {e.args[0] if e.args else e}") from None


def main_metric(metrics: dict) -> tuple[str, float] | None:
    """The headline number of one lm_eval task: acc, then exact_match, acc_norm, then any float."""
    for prefix in ("acc,", "exact_match,", "acc_norm,", "word_perplexity,"):
        for key, value in metrics.items():
            if key.startswith(prefix) and isinstance(value, (int, float)):
                return key, float(value)
    for key, value in metrics.items():
        if "_stderr" not in key and key != "alias" and isinstance(value, (int, float)):
            return key, float(value)
    return None


if __name__ == "__main__":  # `python -m qwenlab.eval.lm_eval_bridge run --model qwenlab ...`: lm_eval's CLI
    import qwenlab.eval.lm_eval_bridge  # noqa: F401  registers "qwenlab"
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()
