"""GGUF export: llama.cpp (llama-cpp-python) loads our file, tokenizes like qwenlab, and computes the same logits."""

import numpy as np
import pytest
import torch

from qwenlab.errors import QwenlabError
from qwenlab.model import load_model, load_tokenizer
from qwenlab.quant.gguf_export import GLOBAL_NAMES, LAYER_NAMES, export_gguf

from llama_child import LlamaChild

PROMPT = "What is 12 + 7? The answer is"


def llama(path, n_ctx=64) -> LlamaChild:
    """llama.cpp in a child process: a crash there fails this test, not the pytest run."""
    return LlamaChild(path, n_ctx)


def qwenlab_greedy(model, ids: list[int], n: int) -> list[int]:
    from qwenlab.model import GenerationConfig
    from qwenlab.model.generate import generate_token_ids

    return [step[0] for step in generate_token_ids(model, [ids], GenerationConfig(max_new_tokens=n), set())]


def model_from_gguf(folder, gguf_path):
    """qwenlab's model with the GGUF file's (dequantized) weights: what llama.cpp multiplies by."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    model = load_model(folder)
    to_hf = {v: k for k, v in GLOBAL_NAMES.items()}
    to_hf.update({f"blk.{i}.{v}": f"model.layers.{i}.{k}" for i in range(model.config.num_hidden_layers)
                  for k, v in LAYER_NAMES.items()})
    state = {}
    for tensor in GGUFReader(str(gguf_path)).tensors:
        values = dequantize(tensor.data, tensor.tensor_type).reshape([int(d) for d in reversed(tensor.shape)])
        state[to_hf[tensor.name]] = torch.from_numpy(np.array(values, dtype=np.float32))
    model.load_state_dict(state, strict=True)
    return model


@pytest.fixture(scope="module")
def exported(tiny32_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf")
    return {kind: export_gguf(tiny32_dir, root / f"tiny-{kind}.gguf", kind)["path"] for kind in ("f16", "q8_0", "q4_0")}


def test_metadata_and_tokenizer(tiny32_dir, exported):
    from gguf import GGUFReader

    reader = GGUFReader(exported["q8_0"])
    field = lambda key: reader.fields[key].contents()
    assert field("general.architecture") == "qwen2" and field("tokenizer.ggml.pre") == "qwen2"
    assert field("qwen2.block_count") == 2 and field("qwen2.attention.head_count_kv") == 2
    assert "<|im_start|>" in field("tokenizer.chat_template")
    tokens, types = field("tokenizer.ggml.tokens"), field("tokenizer.ggml.token_type")
    assert len(tokens) == 300 and types[tokens.index("<|im_end|>")] == 3  # control token
    names = {t.name for t in reader.tensors}
    assert "token_embd.weight" in names and "output.weight" not in names  # tied: llama.cpp reuses token_embd

    llm = llama(exported["f16"])
    tokenizer = load_tokenizer(tiny32_dir)
    for text in (PROMPT, "Reverse the word: apple\n  hello  world!", tokenizer.apply_chat_template(
            [{"role": "user", "content": "hello"}])):
        assert llm.tokenize(text) == tokenizer.encode(text)
    llm.close()


def test_f16_logits_and_greedy_output_match_qwenlab(tiny32_dir, exported):
    model = load_model(tiny32_dir)
    ids = load_tokenizer(tiny32_dir).encode(PROMPT)
    with torch.no_grad():
        ours = model(torch.tensor([ids]))[0].numpy()
    llm = llama(exported["f16"])
    theirs = llm.logits(ids)
    assert np.abs(theirs - ours).max() <= 1e-2 * np.abs(ours).max()  # f16 weights
    assert (theirs.argmax(-1) == ours.argmax(-1)).all()
    assert llm.greedy(ids, 8) == qwenlab_greedy(model, ids, 8)
    llm.close()


@pytest.mark.parametrize("kind", ["q8_0", "q4_0"])
def test_quantized_logits_match_qwenlab_on_the_same_weights(tiny32_dir, exported, kind):
    model = model_from_gguf(tiny32_dir, exported[kind])
    ids = load_tokenizer(tiny32_dir).encode(PROMPT)
    with torch.no_grad():
        ours = model(torch.tensor([ids]))[0].numpy()
    llm = llama(exported[kind])
    theirs = llm.logits(ids)
    # llama.cpp also rounds activations to 8 bits (Q8 blocks) inside its dot products
    assert np.abs(theirs - ours).max() <= 2e-2 * np.abs(ours).max()
    assert (theirs.argmax(-1) == ours.argmax(-1)).all()
    assert llm.greedy(ids, 8) == qwenlab_greedy(model, ids, 8)
    llm.close()


def test_nano_exports_and_matches(tmp_path):
    from qwenlab.nano import nano_path

    try:
        folder = nano_path()
    except QwenlabError:
        pytest.skip("the nano model is not built")
    path = export_gguf(folder, tmp_path / "nano.gguf", "f16")["path"]
    model, tokenizer = load_model(folder), load_tokenizer(folder)
    ids = tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": "What is 12 + 7?"}]))
    llm = llama(path, n_ctx=256)
    assert llm.tokenize(tokenizer.decode(ids, skip_special_tokens=False)) == ids
    with torch.no_grad():
        ours = model(torch.tensor([ids]))[0].numpy()
    theirs = llm.logits(ids)
    assert (theirs.argmax(-1) == ours.argmax(-1)).mean() >= 0.99
    assert llm.greedy(ids, 16) == qwenlab_greedy(model, ids, 16)
    llm.close()


def test_bad_input(tiny32_dir, quantized_dirs, tmp_path):
    with pytest.raises(QwenlabError, match="unknown GGUF type 'q5_k'; expected one of f16, q8_0, q4_0"):
        export_gguf(tiny32_dir, tmp_path / "x.gguf", "q5_k")
    with pytest.raises(QwenlabError, match="already quantized"):
        export_gguf(quantized_dirs[4], tmp_path / "x.gguf", "q4_0")
    assert not (tmp_path / "x.gguf").exists()


def test_a_crash_in_llama_cpp_fails_one_call_not_the_run(exported):
    import signal

    llm = llama(exported["f16"])
    llm.proc.send_signal(signal.SIGILL)  # what a llama.cpp built for another CPU dies of
    with pytest.raises(RuntimeError, match="died with signal SIGILL during 'tokenize'"):
        llm.tokenize("hello")
    llm.close()
