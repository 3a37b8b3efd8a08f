"""qwenlab's own CPU kernels, compiled on first use (build.py) and called through ctypes (signatures.py).

One library holds every kernel. This package holds what is not quantization: RMSNorm, a decode
step's attention (decode_attention.cpp) and a prompt's (prefill_attention.cpp), the per-row LoRA delta serving uses for mixed-adapter batches
(lora_bgmv.cpp), the argmax under a grammar's bit mask (token_mask.cpp), the build, the thread policy
and the status codes. The int8/int4 matmul and the one-call decode stack live with the quantized
formats they read (qwenlab/quant/native/).

Without a compiler, or on a CPU without AVX-512 VNNI, `available()` is False and every caller falls
back to PyTorch. Set QWENLAB_NATIVE=0 to disable the kernels.
"""

from qwenlab.native.library import (BAD_SIZES, NO_MEMORY, NOT_APPLICABLE, KernelArgumentError, available, buffer,
                                    checked, kernel_threads, library, optional_buffer, torch_single_threaded,
                                    torch_threads_on_free_cores, unavailable_reason)
from qwenlab.native.ops import (LORA_MAX_RANK, decode_attention, lora_bgmv_, lora_bits, masked_argmax,
                                prefill_attention, rms_norm)

__all__ = ["BAD_SIZES", "LORA_MAX_RANK", "NOT_APPLICABLE", "NO_MEMORY", "KernelArgumentError", "available", "buffer",
           "checked", "decode_attention", "kernel_threads", "library", "lora_bgmv_", "lora_bits", "masked_argmax", "optional_buffer",
           "prefill_attention", "rms_norm", "torch_single_threaded", "torch_threads_on_free_cores", "unavailable_reason"]
