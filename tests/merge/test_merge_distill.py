"""regmean_sequential's distillation (merge/distill.py): the answer positions it trains on, a lower KL to every
input on its own data than the solve alone, nothing but the decoder linears moved, a model merged with itself
left alone, and its parameters' errors."""

import json

import pytest
import torch
import torch.nn.functional as F

from qwenlab.errors import QwenlabError
from tests.merge.test_regmean_sequential import ARITHMETIC, REVERSE, _config, _solved, adapters  # noqa: F401


def _rows(reference: str, data: dict):
    from qwenlab.merge.activations import data_token_rows
    from qwenlab.merge.config import ActivationData
    from qwenlab.merge.sources import open_model_source

    return data_token_rows(open_model_source(reference), ActivationData(**data), "test")


def test_the_answer_of_each_task_row_starts_after_its_prompt():
    from qwenlab.merge.distill import answer_positions
    from qwenlab.merge.activations import token_batches
    from qwenlab.model.tokenizer import load_tokenizer
    from qwenlab.nano import nano_path
    from qwenlab.tasks import generate
    from qwenlab.merge.activations import MERGE_DATA_SEED_OFFSET

    tokenizer = load_tokenizer(nano_path())
    rows, pad_id, starts = _rows(str(nano_path()), {"task": "reverse", "n": 5, "difficulty": 1})
    for i, (row, start) in enumerate(zip(rows, starts)):
        expected = generate("reverse", MERGE_DATA_SEED_OFFSET + i, 1).expected
        assert tokenizer.decode(row[start:]).strip() == expected  # the answer, then the end of the turn
    (tokens, mask), = token_batches(rows, pad_id, batch=8)
    where = answer_positions(mask, starts)
    for r, (row, start) in enumerate(zip(rows, starts)):
        predicted = [row[p + 1] for p in range(len(row)) if where[r, p]]  # what those positions predict
        assert predicted == row[start:len(row)]
        assert not where[r, len(row) - 1:].any()  # nothing from the last token, nor from the padding


def test_file_records_answer_from_their_last_assistant_turn_or_whole(tmp_path):
    from qwenlab.model.tokenizer import load_tokenizer
    from qwenlab.nano import nano_path

    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in (
        {"messages": [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hi there"}]},
        {"messages": [{"role": "user", "content": "no answer here"}]},
        {"text": "plain text row"})) + "\n")
    rows, _, starts = _rows(str(nano_path()), {"file": str(path), "n": 3})
    tokenizer = load_tokenizer(nano_path())
    assert tokenizer.decode(rows[0][starts[0]:]).strip() == "hi there"
    assert starts[1:] == [0, 0]


def _answer_kl(model, teacher, rows, pad_id, starts) -> float:
    """Mean KL(teacher ‖ model) over the answer tokens, computed here from full logits."""
    from qwenlab.merge.activations import token_batches

    total, count = 0.0, 0
    with torch.no_grad():
        for b, (tokens, mask) in enumerate(token_batches(rows, pad_id, batch=16)):
            p = F.log_softmax(teacher(tokens), -1)
            q = F.log_softmax(model(tokens), -1)
            kl = (p.exp() * (p - q)).sum(-1)
            for r in range(tokens.shape[0]):
                start, length = starts[b * 16 + r], int(mask[r].sum())
                total += kl[r, max(start - 1, 0):length - 1].sum().item()
                count += length - max(start - 1, 0) - 1
    return total / count


def _merged_models(configs: dict) -> tuple[dict, object]:
    from qwenlab.merge.search import InMemoryMerger

    models = {}
    for name, config in configs.items():
        merger = InMemoryMerger(config)
        merger.load(config)
        models[name] = merger.model
    return models, merger


def test_distillation_brings_a_far_off_merge_closer_to_every_input_on_its_own_answers(adapters):  # noqa: F811
    # A strong ridge holds the solve near the weighted average, far from either model: the distillation has to
    # bring the merged model's answers back towards each model's own, on each model's data.
    from qwenlab.merge.activations import runnable_model
    from qwenlab.nano import nano_path

    first, second, _ = adapters
    refs = (f"{nano_path()}+{first}", f"{nano_path()}+{second}")
    inputs = ((refs[0], 1.0, ARITHMETIC), (refs[1], 1.0, REVERSE))
    models, merger = _merged_models({"solve": _config(*inputs, ridge=10.0),
                                     "distilled": _config(*inputs, ridge=10.0, distill_steps=30)})
    for name, tensor in models["solve"].state_dict().items():  # only the decoder linears' weights move
        if not (".layers." in name and name.endswith("proj.weight")):
            torch.testing.assert_close(models["distilled"].state_dict()[name], tensor, rtol=0, atol=0)
    for ref, data in zip(refs, (ARITHMETIC, REVERSE)):
        rows, pad_id, starts = _rows(ref, data)
        teacher = runnable_model(merger.sources[ref])
        kls = {name: _answer_kl(model, teacher, rows, pad_id, starts) for name, model in models.items()}
        assert kls["distilled"] < 0.5 * kls["solve"], kls


def test_a_distillation_that_only_moves_away_returns_the_solve(adapters):  # noqa: F811
    # On these adapters the solve is near exact (KL ~4e-4), and Adam's first steps, lr-sized whatever the
    # gradient, move the merge away (measured: KL 0.29 after 30 steps at this rate); what comes back is the solve.
    from qwenlab.nano import nano_path

    first, second, _ = adapters
    inputs = ((f"{nano_path()}+{first}", 1.0, ARITHMETIC), (f"{nano_path()}+{second}", 1.0, REVERSE))
    solved, _, _ = _solved(_config(*inputs))
    distilled, _, _ = _solved(_config(*inputs, distill_steps=50, distill_lr=3e-4))
    for name, weight in solved.items():
        torch.testing.assert_close(distilled[name], weight, rtol=0, atol=0)


def test_a_model_merged_with_itself_is_left_alone_by_the_distillation(adapters):  # noqa: F811
    from qwenlab.nano import nano_path

    first, _, twin = adapters
    solved, _, sources = _solved(_config((f"{nano_path()}+{first}", 1.0, ARITHMETIC),
                                         (f"{nano_path()}+{twin}", 1.0, REVERSE), distill_steps=5))
    source = sources[f"{nano_path()}+{first}"]
    for name, weight in solved.items():
        torch.testing.assert_close(weight, source.get(name).float(), atol=2e-4, rtol=2e-3)


@pytest.mark.parametrize("setting, message", [
    ({"distill_steps": 1.5}, "distill_steps: expected a whole number"),
    ({"distill_steps": -1}, r"distill_steps = -1 is outside \[0, None\]"),
    ({"distill_lr": 0}, r"distill_lr = 0 is outside \(0.0, None\]"),
])
def test_bad_distillation_settings_fail_before_any_work(tmp_path, adapters, setting, message):  # noqa: F811
    from qwenlab.merge import merge
    from qwenlab.nano import nano_path

    first, second, _ = adapters
    config = _config((f"{nano_path()}+{first}", 1.0, ARITHMETIC), (f"{nano_path()}+{second}", 1.0, REVERSE),
                     **setting)
    with pytest.raises(QwenlabError, match=message):
        merge(config, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
