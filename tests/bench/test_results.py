"""The measurement store: append, newest-wins per item, stale records, the cache for unwritable folders."""

import json

import pytest

from qwenlab.variants import results
from qwenlab.variants.results import (MEASUREMENTS_FILE, latest, latest_all, read_measurements, record_measurement,
                                   weights_fingerprint)
from qwenlab.errors import QwenlabError


def test_latest_merges_items_newest_first(fresh_family, monkeypatch):
    folder = fresh_family / "base"
    times = iter(["2025-01-01T00:00:00Z", "2025-01-02T00:00:00Z", "2025-01-03T00:00:00Z"])
    monkeypatch.setattr(results.time, "strftime", lambda fmt, t=None: next(times))
    record_measurement(folder, "accuracy", {"arithmetic": {"accuracy": 0.5, "n": 10}, "reverse": {"accuracy": 0.1}},
                       setup={"dtype": "fp32"}, command="qwenlab eval a")
    record_measurement(folder, "accuracy", {"arithmetic": {"accuracy": 0.7, "n": 20}}, command="qwenlab eval b")
    record_measurement(folder, "speed", {"128": {"ttft_s": 0.01, "decode_tokens_per_s": 50.0}})
    accuracy = latest(folder, "accuracy")
    assert accuracy["arithmetic"].values == {"accuracy": 0.7, "n": 20}  # the newer figure wins...
    assert accuracy["reverse"].values["accuracy"] == 0.1  # ...without hiding other items
    assert accuracy["arithmetic"].command == "qwenlab eval b" and accuracy["reverse"].setup == {"dtype": "fp32"}
    everything = latest_all(folder)
    assert set(everything) == {"accuracy", "speed", "perplexity"} and everything["perplexity"] == {}
    record = json.loads((folder / MEASUREMENTS_FILE).read_text().splitlines()[0])
    fields = {"schema", "kind", "figures", "setup", "command", "time", "versions", "machine", "fingerprint"}
    assert fields <= set(record)
    assert record["versions"]["torch"] and record["machine"]["cores"]


def test_records_of_other_weights_are_ignored(fresh_family):
    folder = fresh_family / "base"
    record_measurement(folder, "accuracy", {"arithmetic": {"accuracy": 0.5, "n": 10}})
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-4:] = b"\x00\x00\x80\x3f"  # the folder now holds other weights
    weights.write_bytes(bytes(data))
    assert latest(folder, "accuracy") == {}
    assert len(read_measurements(folder, include_stale=True)) == 1


def test_torn_lines_and_bad_input(fresh_family):
    folder = fresh_family / "base"
    record_measurement(folder, "perplexity", {"wiki.txt": {"perplexity": 12.5}})
    with open(folder / MEASUREMENTS_FILE, "a") as f:
        f.write('{"kind": "accuracy", "figu')  # an interrupted write
    assert latest(folder, "perplexity")["wiki.txt"].values["perplexity"] == 12.5
    with pytest.raises(QwenlabError, match="kind must be one of"):
        record_measurement(folder, "latency", {"x": {}})
    with pytest.raises(QwenlabError, match="figures must map"):
        record_measurement(folder, "speed", {"128": 3.0})


def test_unwritable_folders_use_the_cache(fresh_family, tmp_path, monkeypatch):
    folder = fresh_family / "other"
    monkeypatch.setattr(results, "_inside_package", lambda path: True)  # like the shipped nano
    path = record_measurement(folder, "speed", {"64": {"ttft_s": 0.002, "decode_tokens_per_s": 80.0}})
    assert path == tmp_path / "qwenlab-home" / "measurements" / f"{weights_fingerprint(folder)}.jsonl"
    assert not (folder / MEASUREMENTS_FILE).exists()
    assert latest(folder, "speed")["64"].values["decode_tokens_per_s"] == 80.0
