"""`qwenlab bench`'s reporting: the kernel path that ran, the bandwidth bound and each figure's share of it,
and the warnings for disagreeing runs or a busy machine. Nothing here asserts a speed."""

import pytest
import torch

from qwenlab import native
from qwenlab.bench.machine import BusyMeter, kernel_path, model_bytes_per_token, run_warnings
from qwenlab.bench.speed import EngineResult, SpeedReport, bench_speed, speed_table
from qwenlab.loading import load
from tests.conftest import build_hf_model

needs_native = pytest.mark.skipif(not native.available(), reason=f"native kernel: {native.unavailable_reason()}")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("speed") / "model"
    build_hf_model(folder, vocab_size=300, hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, std=0.05)
    return folder


def runs(*decode, busy=0.0):
    return [{"ttft_s": 0.1, "prompt_tokens_per_s": 1000.0, "decode_tokens_per_s": d, "other_cpu_cores": busy}
            for d in decode]


def test_runs_that_agree_on_a_quiet_machine_get_no_warning():
    assert run_warnings(runs(10.0, 10.5, 9.8)) == []


def test_disagreeing_runs_and_a_busy_machine_are_each_named():
    spread, busy = run_warnings(runs(10.0, 5.0, 9.0, busy=1.2))
    assert "disagree by" in spread and "min 5.0, max 10.0" in spread
    assert "busy" in busy and "1.20" in busy


def test_the_busy_meter_measures_other_processes_cpu_in_cores():
    meter = BusyMeter()
    meter.start()
    sum(i * i for i in range(200_000))  # our own CPU time is not counted
    other = meter.stop()
    assert other is None or 0.0 <= other


def test_bytes_per_token_counts_a_tied_table_once_and_the_kv_cache(tiny_dir):
    model = load(tiny_dir, "fp32", float_backend="torch").model
    weights = sum(p.numel() * 4 for p in model.parameters())  # tied: the table is both embedding and head
    kv = 2 * 2 * 2 * 16 * 100 * 4  # 2 (k, v) x layers x kv heads x head_dim x slots x fp32
    assert model_bytes_per_token(model, 100) - weights - kv in range(0, 1024)  # + RoPE's small buffers
    assert kernel_path(model, "fp32") == "fp32:torch"


@needs_native
def test_the_kernel_path_names_the_native_one(tiny_dir):
    bf16 = load(tiny_dir, "bf16").model
    assert kernel_path(bf16, "bf16") in ("bf16:avx512bf16", "bf16:avx512f")
    assert kernel_path(load(tiny_dir, "fp32").model, "fp32") == "fp32:avx512f"
    # bf16 weights hold half the bytes of fp32 ones (norms and biases stay fp32)
    assert model_bytes_per_token(bf16, 1) < 0.6 * model_bytes_per_token(load(tiny_dir, "fp32").model, 1)


def test_the_table_shows_kernel_bound_share_and_warnings():
    result = EngineResult("qwenlab", "bf16", "bf16", 2, 1.0, 2**20, runs={128: runs(20.0, 21.0, 10.0, busy=0.9)},
                          kernel="bf16:avx512bf16", bytes_per_token={128: 10**9})
    report = SpeedReport("m", 2, [128], 32, 3, [result], bandwidth_bytes_per_s=25e9)
    assert report.bound(result, 128) == 25.0
    text = speed_table(report, markdown=False)
    assert "bf16:avx512bf16" in text and "25.0" in text and "80%" in text  # median 20 of a bound of 25
    assert "25.0 GB/s" in text and "figures to distrust" in text and "busy" in text and "disagree" in text


@needs_native
def test_bench_runs_a_float_variant_end_to_end(tiny_dir):
    report = bench_speed(tiny_dir, dtypes=["bf16"], contexts=[8], gen=3, runs=1, record=False, log=lambda *a: None)
    (result,) = report.results
    assert result.kernel.startswith("bf16:avx512") and result.bytes_per_token[8] > 0
    assert report.bandwidth_bytes_per_s and report.bandwidth_bytes_per_s > 1e8
    # each engine has its own bound: the faster of the reads just before and just after its runs
    assert result.bandwidth_bytes_per_s and result.bandwidth_bytes_per_s > 1e8
    assert report.bound(result, 8) == result.bandwidth_bytes_per_s / result.bytes_per_token[8]
    low, high = report.bandwidth_range()
    assert low <= min(report.bandwidth_bytes_per_s, result.bandwidth_bytes_per_s) and high >= result.bandwidth_bytes_per_s
    assert "of bound" in speed_table(report)
