"""The native kernels check the sizes they are given: every entry point takes each buffer's length and
refuses lengths that do not fit its dimensions (an error code the wrappers raise as an exception)
instead of reading past a buffer. Each case runs in a child process (native_child.py): a consistent
call first, checked against PyTorch, then an inconsistent one that must raise, not kill the process."""

import subprocess
import sys
from pathlib import Path

import pytest

from qwenlab import native

CHILD = Path(__file__).with_name("native_child.py")
needs_native = pytest.mark.skipif(not native.available(), reason=f"native kernel: {native.unavailable_reason()}")


@needs_native
@pytest.mark.parametrize("case,refusal", [
    ("gemm_int8_short_scales", "KernelArgumentError: native gemm_int8: a buffer's length does not fit"),
    ("gemm_int8_short_bias", "KernelArgumentError: native gemm_int8: a buffer's length does not fit"),
    ("gemm_int4_short_mins", "KernelArgumentError: native gemm_int4: a buffer's length does not fit"),
    ("gemm_group_size_that_does_not_fit", "KernelArgumentError: native gemm_int8"),
    ("gemm_raw_entry_short_weight", "KernelArgumentError: native gemm_int8"),
    ("rms_norm_weight_of_one", "KernelArgumentError: native rms_norm"),
    ("decode_attention_short_qkv", "KernelArgumentError: native decode_attention"),
    ("lora_bgmv_adapter_index_past_the_stack", "KernelArgumentError: native lora_bgmv"),
    ("decode_stack_norm_of_one", "KernelArgumentError: native decode_stack"),
    ("expanded_weight_tensor", "KernelArgumentError: native gemm_int8: the packed weight must be a contiguous"),
])
def test_an_inconsistent_call_raises_in_the_child_instead_of_crashing(quantized_dirs, case, refusal):
    done = subprocess.run([sys.executable, str(CHILD), case, str(quantized_dirs[4])], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, f"exit {done.returncode} (negative: a signal; 3: not refused)\n{done.stderr[-2000:]}"
    assert done.stdout.startswith(f"refused {refusal}"), done.stdout


def test_the_status_codes_become_exceptions():
    assert native.checked(0, "k") == 0 and native.checked(native.NOT_APPLICABLE, "k") == native.NOT_APPLICABLE
    with pytest.raises(native.KernelArgumentError, match="native k: a buffer's length"):
        native.checked(native.BAD_SIZES, "k")
    with pytest.raises(MemoryError, match="native k: out of memory"):
        native.checked(native.NO_MEMORY, "k")
