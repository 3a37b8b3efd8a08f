"""One smoke test per verb (quantize, export gguf, bench), through the CLI entry point."""

import json

from qwenlab.cli import main


def test_quantize_and_export(tiny32_dir, tmp_path, capsys):
    assert main(["quantize", str(tiny32_dir), str(tmp_path / "q8"), "--bits", "8", "--group-size", "32"]) == 0
    assert json.loads((tmp_path / "q8" / "config.json").read_text())["quantization"]["bits"] == 8
    assert main(["quantize", str(tmp_path / "q8"), str(tmp_path / "again")]) == 2
    assert main(["quantize", str(tiny32_dir), str(tmp_path / "bad"), "--group-size", "128"]) == 2
    assert main(["export", "gguf", str(tiny32_dir), str(tmp_path / "m.gguf"), "--type", "q4_0"]) == 0
    assert (tmp_path / "m.gguf").stat().st_size > 0
    assert main(["export", "gguf", str(tiny32_dir), str(tmp_path / "m2.gguf"), "--type", "q3_k"]) == 2
    err = capsys.readouterr().err
    assert "already quantized" in err and "group size 128 does not divide" in err and "unknown GGUF type 'q3_k'" in err


def test_bench_prints_a_table_and_json(tiny32_dir, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("QWENLAB_HOME", str(tmp_path))  # the int4 variant is cached here
    args = ["bench", str(tiny32_dir), "--dtype", "fp32,int4", "--ctx", "8", "--gen", "3", "--runs", "2",
            "--threads", "1", "--no-record"]
    assert main(args + ["--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [r["dtype"] for r in report["results"]] == ["fp32", "int4"]
    for result in report["results"]:
        runs = result["runs"]["8"]
        assert len(runs) == 2 and all(r["ttft_s"] > 0 and r["decode_tokens_per_s"] > 0 for r in runs)
        assert result["peak_rss_bytes"] > 50 * 2**20 and result["threads"] == 1
    assert len(list((tmp_path / "bench-variants").iterdir())) == 1


def test_bench_without_llama_cpp_says_how_to_install(tiny32_dir, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llama_cpp" else real(name, *a))
    assert main(["bench", str(tiny32_dir), "--vs", "llama.cpp", "--no-record"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "pip install llama-cpp-python" in err
    assert main(["bench", str(tiny32_dir), "--dtype", "int3"]) == 2
    assert "unknown dtype 'int3'" in capsys.readouterr().err
