// Grammar masks as llguidance writes them (one bit per token id, low bit first, 32 ids per uint32 word),
// applied to one row's logits without unpacking them into a bool row first.
#include <math.h>
#include <stdint.h>

#include "vec.h"

// out[0] = the id of the largest logit among the ids whose bit is set and that are < n_valid (ids past the
// tokenizer's own, the embedding's padding, are never chosen); ties go to the lowest id, as torch's argmax
// over masked logits. -1 when no id is allowed. Words that are all zero are skipped a word at a time.
extern "C" int qwenlab_masked_argmax(const float* logits, int64_t logits_len, const uint32_t* mask,
                                     int64_t mask_len, int64_t n_valid, int64_t* out) {
    if (logits_len < 0 || mask_len < 0 || n_valid < 0 || n_valid > logits_len || mask_len * 32 < n_valid ||
        (logits_len && !logits) || (mask_len && !mask) || !out)
        return QWENLAB_BAD_SIZES;
    int64_t best = -1;
    float best_value = -INFINITY;
    const int64_t words = (n_valid + 31) / 32;
    for (int64_t w = 0; w < words; ++w) {
        uint32_t bits = mask[w];
        if (w == words - 1 && (n_valid & 31)) bits &= (1u << (n_valid & 31)) - 1;
        while (bits) {
            const int64_t id = w * 32 + __builtin_ctz(bits);
            bits &= bits - 1;
            const float value = logits[id];
            if (best < 0 || value > best_value) {  // strictly greater: the lowest id keeps a tie
                best = id;
                best_value = value;
            }
        }
    }
    out[0] = best;
    return QWENLAB_OK;
}
