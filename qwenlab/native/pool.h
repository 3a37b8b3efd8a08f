// The kernels' thread pool, shared by every matmul of the library (qmatmul.cpp, float_matmul.cpp).
#pragma once
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <mutex>
#include <thread>
#include <vector>

// A small thread pool in which the caller never waits for a thread that has not started.
//
// OpenMP's fork-join makes every thread reach a barrier at the end of each parallel region, so on a
// machine shared with other processes one preempted worker stalls the whole matmul for a scheduler
// time slice, ~100 times per token (measured: 2 threads decoded 6x slower than 1). Here chunks are
// claimed from a counter tagged with the job's generation: the caller works through the chunks
// itself and, at the end, waits (yielding) only for chunks another thread has actually claimed.
// Idle workers spin up to SPIN_US, then sleep on a condition variable, so an idle engine does not
// keep a core busy.
namespace qwenlab_pool {
constexpr int64_t SPIN_US = 200;  // idle workers spin this long before sleeping (QWENLAB_KERNEL_SPIN_US)
using ChunkFn = void (*)(const void* job, int64_t chunk);

struct Pool {
    std::mutex callers;  // one job at a time when several Python threads call the kernel
    std::mutex mutex;
    std::condition_variable wake;
    std::vector<std::thread> threads;
    std::atomic<uint64_t> generation{0};
    std::atomic<uint64_t> state{0};  // (generation << 32) | next chunk
    std::atomic<int64_t> done{0};
    std::atomic<int64_t> total{0};
    int64_t spin_us = getenv("QWENLAB_KERNEL_SPIN_US") ? atoll(getenv("QWENLAB_KERNEL_SPIN_US")) : SPIN_US;
    ChunkFn fn = nullptr;
    const void* job = nullptr;

    // Claim and run chunks of job `gen` until none is left; false once the job is not `gen` any more.
    void work(uint64_t gen) {
        for (;;) {
            uint64_t st = state.load(std::memory_order_acquire);
            if ((st >> 32) != (gen & 0xffffffffu) ||
                (int64_t)(st & 0xffffffffu) >= total.load(std::memory_order_acquire))
                return;
            if (!state.compare_exchange_weak(st, st + 1, std::memory_order_acq_rel)) continue;
            fn(job, (int64_t)(st & 0xffffffffu));  // job and fn are stable while a claimed chunk is not done
            done.fetch_add(1, std::memory_order_release);
        }
    }

    void worker() {
        uint64_t seen = generation.load();
        for (;;) {
            uint64_t gen = generation.load(std::memory_order_acquire);
            // Spin for a while before sleeping: in a decode step the matmuls come every few tens of
            // microseconds (the Python ops between them), and a futex wake-up costs about as much as
            // a small matmul. The spin is bounded in time so that an idle engine gives the core back.
            if (gen == seen) {
                const auto until = std::chrono::steady_clock::now() + std::chrono::microseconds(spin_us);
                for (int i = 0; gen == seen; ++i) {
                    _mm_pause();
                    gen = generation.load(std::memory_order_acquire);
                    if ((i & 63) == 63 && std::chrono::steady_clock::now() > until) break;
                }
            }
            if (gen == seen) {
                std::unique_lock<std::mutex> lock(mutex);
                wake.wait(lock, [&] { return generation.load() != seen; });
                gen = generation.load();
            }
            seen = gen;
            work(gen);
        }
    }

    void run(ChunkFn f, const void* j, int64_t chunks, int nthreads) {
        if (nthreads <= 1 || chunks <= 1) {
            for (int64_t i = 0; i < chunks; ++i) f(j, i);
            return;
        }
        std::lock_guard<std::mutex> one_job(callers);
        {
            std::lock_guard<std::mutex> lock(mutex);
            while ((int)threads.size() < nthreads - 1) {
                threads.emplace_back([this] { worker(); });
                threads.back().detach();
            }
            const uint64_t gen = generation.load() + 1;
            // Close the previous job's state first: a worker that read it (and may read the new
            // `total` below) must fail its claim. Without this, a late worker could claim chunk k of
            // the new job under the old tag, that chunk was then claimed twice, `done` reached the
            // count early and the caller returned while a chunk still ran on its freed buffers
            // (a rare segfault in prefill, caught under gdb in row_blocks<4, 4, 2>).
            state.store(((gen & 0xffffffffu) << 32) | 0xffffffffu, std::memory_order_seq_cst);
            fn = f;
            job = j;
            total.store(chunks, std::memory_order_release);  // seen => the closing store is seen
            done.store(0, std::memory_order_relaxed);
            state.store((gen & 0xffffffffu) << 32, std::memory_order_release);
            generation.store(gen, std::memory_order_release);
        }
        wake.notify_all();
        const uint64_t gen = generation.load();
        work(gen);
        // Only chunks in progress on another thread are left; yield so that thread can run on this core.
        for (int spin = 0; done.load(std::memory_order_acquire) < chunks; ++spin) {
            if (spin < 64) _mm_pause();
            else std::this_thread::yield();
        }
    }
};

inline Pool& pool() {  // inline: one pool for every file of the library
    static Pool* p = new Pool();  // never destroyed: detached workers may outlive static destructors
    return *p;
}
}  // namespace qwenlab_pool
