// Host emulation of the CUDA features the SAS / SWS kernels use, so that the same .cu
// source runs on the CPU: threadIdx/blockIdx, per-block dynamic shared memory,
// __syncthreads, warp shuffles and votes, cp.async groups, conversions, and a reference
// mma.sp that follows the PTX ISA fragment and metadata layouts (section 9.7.14.6).
//
// Execution model: every CUDA thread of a block is a cooperative fiber (ucontext) with its
// own stack; a fiber runs until it reaches __syncthreads or a warp-collective operation
// (shuffle, vote, mma.sp), which are barriers over the block / the warp's 32 lanes, and
// the scheduler resumes fibers whose barrier has completed. A barrier nobody can complete
// is reported as a deadlock. Blocks run in parallel on a few OS threads. cp.async copies
// are queued per thread and performed at cp.async.wait_group, so reading a stage before
// waiting for it reads stale data, and shared memory starts every block as NaN bytes.
// Invalid mma.sp metadata is reported as an error, not silently computed.
#pragma once

#include <atomic>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <algorithm>
#include <deque>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include <ucontext.h>

typedef unsigned int u32;
typedef unsigned short u16;

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) alignas(n)

struct sas_dim3 {
    unsigned x = 0, y = 0, z = 0;
};

inline thread_local sas_dim3 threadIdx, blockIdx, blockDim, gridDim;

namespace sas_emu {

struct Fiber;
inline thread_local Fiber* current_fiber = nullptr;
inline void yield_to_scheduler();

// Barrier over a fixed number of fibers of one block (run by one OS thread, so no locks).
class Barrier {
  public:
    explicit Barrier(int count) : count_(count) {}
    // true for the arrival that completed the barrier (it runs on without yielding)
    inline bool arrive_and_wait(const char* what);
    unsigned long long generation() const { return generation_; }

  private:
    int count_;
    int arrived_ = 0;
    unsigned long long generation_ = 0;
};

// Payload of one lane in a warp-collective operation.
struct LaneSlot {
    u32 a[4], b[4], meta;
    float c[4];
    u32 value;
};

struct Warp {
    Barrier barrier{32};
    LaneSlot slots[2][32];  // alternating buffers: one rendezvous per collective suffices
};

struct Block {
    explicit Block(int threads, int smem_bytes)
        : barrier(threads), warps((threads + 31) / 32), smem(smem_bytes > 0 ? smem_bytes : 16) {}
    Barrier barrier;
    std::vector<Warp> warps;
    std::vector<unsigned char> smem;
    std::mutex error_mutex;
    std::string error;  // first error reported by any thread

    void fail(const std::string& message) {
        std::lock_guard<std::mutex> lock(error_mutex);
        if (error.empty()) error = message;
    }
};

struct AsyncCopy {
    void* dst;
    const void* src;
    int src_bytes;
};

struct Thread {
    Block* block = nullptr;
    int lane = 0;
    int warp = 0;
    unsigned collectives = 0;  // parity of the next warp-collective buffer
    std::vector<AsyncCopy> open_group;
    std::deque<std::vector<AsyncCopy>> committed;
};

// One CUDA thread: its context, stack, state, and the barrier generation it waits for.
struct Fiber {
    ucontext_t context;
    std::vector<unsigned char> stack;
    Thread thread;
    sas_dim3 index;
    bool done = false;
    const Barrier* waiting_on = nullptr;
    unsigned long long waiting_generation = 0;
    const char* waiting_what = "";
};

inline thread_local ucontext_t* scheduler_context = nullptr;

inline void yield_to_scheduler() { swapcontext(&current_fiber->context, scheduler_context); }

inline bool Barrier::arrive_and_wait(const char* what) {
    if (++arrived_ == count_) {  // the last arrival releases the others and runs on
        arrived_ = 0;
        ++generation_;
        return true;
    }
    current_fiber->waiting_on = this;
    current_fiber->waiting_generation = generation_;
    current_fiber->waiting_what = what;
    yield_to_scheduler();
    return false;
}

inline thread_local Thread* self = nullptr;

// Every lane publishes `mine`; returns the warp's 32 slots once all lanes have arrived.
// `last` tells the lane that completed the rendezvous: fibers are cooperative, so it runs
// before any other lane resumes and may compute results for the whole warp in place.
inline LaneSlot* warp_exchange(const LaneSlot& mine, const char* what, bool* last = nullptr) {
    Warp& w = self->block->warps[self->warp];
    LaneSlot* buf = w.slots[self->collectives++ & 1u];
    buf[self->lane] = mine;
    const bool completed = w.barrier.arrive_and_wait(what);
    if (last) *last = completed;
    return buf;
}

inline void perform(const std::vector<AsyncCopy>& group) {
    for (const AsyncCopy& c : group) {
        if (c.src_bytes > 0) std::memcpy(c.dst, c.src, c.src_bytes);
        if (c.src_bytes < 16) std::memset(static_cast<unsigned char*>(c.dst) + c.src_bytes, 0, 16 - c.src_bytes);
    }
}

inline float bits_to_float(u32 b) {
    float f;
    std::memcpy(&f, &b, 4);
    return f;
}

inline u32 float_to_bits(float f) {
    u32 b;
    std::memcpy(&b, &f, 4);
    return b;
}

inline float half_to_float(u16 h) {
    const u32 sign = u32(h & 0x8000u) << 16;
    const u32 exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
    if (exp == 0x1f) return bits_to_float(sign | 0x7f800000u | (man << 13));
    if (exp == 0) {  // zero or subnormal: man * 2^-24
        const float v = float(man) * 5.9604644775390625e-08f;
        return sign ? -v : v;
    }
    return bits_to_float(sign | ((exp + 112u) << 23) | (man << 13));
}

// Round to nearest even, with subnormals, overflow to inf and NaN kept quiet.
inline u16 float_to_half(float f) {
    const u32 x = float_to_bits(f);
    const u32 sign = (x >> 16) & 0x8000u;
    const u32 ax = x & 0x7fffffffu;
    if (ax > 0x7f800000u) return u16(sign | 0x7e00u);
    if (ax >= 0x477ff000u) return u16(sign | 0x7c00u);  // rounds to >= 65520: inf
    if (ax < 0x38800000u) {                              // below the smallest normal half
        if (ax < 0x33000000u) return u16(sign);           // below half the smallest subnormal
        const u32 e = ax >> 23, m = (ax & 0x7fffffu) | 0x800000u;
        const int shift = 126 - int(e);  // value = m * 2^(e-150); subnormal unit 2^-24
        u32 q = m >> shift;
        const u32 rem = m & ((1u << shift) - 1u), halfway = 1u << (shift - 1);
        if (rem > halfway || (rem == halfway && (q & 1u))) ++q;
        return u16(sign | q);
    }
    u32 r = ax - 0x38000000u;  // rebias exponent 127 -> 15, still with 23 mantissa bits
    r = (r + 0xfffu + ((r >> 13) & 1u)) >> 13;
    return u16(sign | r);
}

inline u16 float_to_bf16(float f) {
    const u32 x = float_to_bits(f);
    if ((x & 0x7fffffffu) > 0x7f800000u) return u16((x >> 16) | 0x40u);
    return u16((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
}

// Where the mma.sp operand A elements of each shape live (PTX ISA 9.7.14.6.2): A is the
// compressed 16 x K/2 matrix laid out like the dense mma of half the K, and one chunk
// (4 columns for 16-bit, 2 for tf32) holds 2 (resp. 1) stored elements.
enum class SpKind { F16, BF16, TF32 };

// The warp's mma.sp from the 32 lanes' registers: rebuild A (decompressed through the
// metadata), B and C from their fragments, then D = A * B + C with exact products.
inline void mma_sp_warp(LaneSlot* all, SpKind kind) {
    const bool tf32 = kind == SpKind::TF32;
    const int K = tf32 ? 16 : 32;
    auto decode = [&](u32 bits16or32) -> double {
        if (kind == SpKind::F16) return half_to_float(u16(bits16or32));
        if (kind == SpKind::BF16) return bits_to_float(bits16or32 << 16);
        return bits_to_float(bits16or32 & 0xffffe000u);  // the tensor core reads 19 bits
    };
    double A[16][32] = {};
    double B[32][8] = {};
    for (int lane = 0; lane < 32; ++lane) {
        const int g = lane >> 2, t = lane & 3;
        for (int r = 0; r < 4; ++r) {
            const int row = g + 8 * (r & 1);
            const int chunk = t + 4 * (r >> 1);  // group of 4 (16-bit) or pair (tf32)
            // selector 0: lane 4*row_group + (chunk >= 4) holds the row's metadata,
            // row g in bits 0-15 and row g+8 in bits 16-31, chunk (chunk % 4) at 4*(chunk % 4)
            const u32 word = all[(row & 7) * 4 + (chunk >> 2)].meta;
            const u32 nib = ((row < 8 ? word : word >> 16) >> (4 * (chunk & 3))) & 0xfu;
            const u32 i0 = nib & 3u, i1 = nib >> 2;
            if (tf32) {
                if (nib != 0x4u && nib != 0xEu) {
                    char msg[160];
                    std::snprintf(msg, sizeof msg,
                                  "mma.sp tf32: invalid metadata nibble 0x%x (row %d, pair %d); "
                                  "only 0x4 and 0xe are valid",
                                  nib, row, chunk);
                    self->block->fail(msg);
                }
                A[row][2 * chunk + (nib == 0xEu ? 1 : 0)] = decode(all[lane].a[r]);
            } else {
                if (i0 >= i1) {  // ordered_metadata: two distinct, increasing indices
                    char msg[160];
                    std::snprintf(msg, sizeof msg,
                                  "mma.sp 16-bit: invalid metadata nibble 0x%x (row %d, group %d); "
                                  "need index0 < index1",
                                  nib, row, chunk);
                    self->block->fail(msg);
                }
                A[row][4 * chunk + i0] += decode(all[lane].a[r] & 0xffffu);
                A[row][4 * chunk + i1] += decode(all[lane].a[r] >> 16);
            }
        }
        for (int r = 0; r < 4; ++r) {
            if (tf32) {
                B[t + 4 * r][g] = decode(all[lane].b[r]);
            } else {
                B[2 * t + 8 * r][g] = decode(all[lane].b[r] & 0xffffu);
                B[2 * t + 8 * r + 1][g] = decode(all[lane].b[r] >> 16);
            }
        }
    }
    for (int lane = 0; lane < 32; ++lane) {
        const int g = lane >> 2, t = lane & 3;
        for (int i = 0; i < 4; ++i) {
            const int row = g + 8 * (i >> 1), col = 2 * t + (i & 1);
            double s = all[lane].c[i];
            for (int k = 0; k < K; ++k) s += A[row][k] * B[k][col];
            all[lane].c[i] = float(s);
        }
    }
}


inline void mma_sp(float d[4], const u32 a[4], const u32 b[4], u32 meta, SpKind kind) {
    LaneSlot mine{};
    for (int i = 0; i < 4; ++i) {
        mine.a[i] = a[i];
        mine.b[i] = b[i];
        mine.c[i] = d[i];
    }
    mine.meta = meta;
    bool last = false;
    LaneSlot* all = warp_exchange(mine, "mma.sp", &last);
    if (last) mma_sp_warp(all, kind);  // D for every lane, written over the lanes' C
    for (int i = 0; i < 4; ++i) d[i] = all[self->lane].c[i];
}

}  // namespace sas_emu

// ---- the primitives of runtime/cuda/sas_ptx.cuh ------------------------------------------
inline unsigned char* sas_shared_memory() { return sas_emu::self->block->smem.data(); }

inline void __syncthreads() { sas_emu::self->block->barrier.arrive_and_wait("__syncthreads"); }

inline void cp_async_16(void* smem_dst, const void* gmem_src, int src_bytes) {
    sas_emu::self->open_group.push_back({smem_dst, gmem_src, src_bytes});
}

inline void cp_async_commit() {
    sas_emu::Thread* th = sas_emu::self;
    th->committed.push_back(std::move(th->open_group));
    th->open_group.clear();
}

template <int N>
inline void cp_async_wait() {
    sas_emu::Thread* th = sas_emu::self;
    while (th->committed.size() > size_t(N)) {
        sas_emu::perform(th->committed.front());
        th->committed.pop_front();
    }
}

inline u32 cvt_rna_tf32(float x) {
    const u32 b = sas_emu::float_to_bits(x);
    if ((b & 0x7f800000u) == 0x7f800000u) return b & 0xffffe000u;  // inf / nan keep their class
    return (b + 0x1000u) & 0xffffe000u;  // ties away from zero: the magnitude rounds up
}

inline u16 f32_to_f16_rn(float x) { return sas_emu::float_to_half(x); }
inline float f16_to_f32(u16 h) { return sas_emu::half_to_float(h); }
inline u16 f32_to_bf16_rn(float x) { return sas_emu::float_to_bf16(x); }
inline float bf16_to_f32(u16 h) { return sas_emu::bits_to_float(u32(h) << 16); }
inline float sas_bits_to_float(u32 b) { return sas_emu::bits_to_float(b); }
inline u32 sas_float_to_bits(float f) { return sas_emu::float_to_bits(f); }

inline u32 sas_shfl_xor(u32 v, int lane_mask) {
    sas_emu::LaneSlot mine{};
    mine.value = v;
    const sas_emu::LaneSlot* all = sas_emu::warp_exchange(mine, "shfl.sync.bfly");
    return all[sas_emu::self->lane ^ lane_mask].value;
}

inline bool sas_warp_all(bool pred) {
    sas_emu::LaneSlot mine{};
    mine.value = pred ? 1u : 0u;
    const sas_emu::LaneSlot* all = sas_emu::warp_exchange(mine, "vote.all");
    for (int l = 0; l < 32; ++l)
        if (!all[l].value) return false;
    return true;
}

inline void mma_sp_16832_f16(float d[4], const u32 a[4], const u32 b[4], u32 meta) {
    sas_emu::mma_sp(d, a, b, meta, sas_emu::SpKind::F16);
}
inline void mma_sp_16832_bf16(float d[4], const u32 a[4], const u32 b[4], u32 meta) {
    sas_emu::mma_sp(d, a, b, meta, sas_emu::SpKind::BF16);
}
inline void mma_sp_16816_tf32(float d[4], const u32 a[4], const u32 b[4], u32 meta) {
    sas_emu::mma_sp(d, a, b, meta, sas_emu::SpKind::TF32);
}

// ---- grid launch ----------------------------------------------------------------------------
namespace sas_emu {

constexpr size_t kFiberStackBytes = 256 * 1024;

template <typename Params>
struct LaunchState {
    void (*kernel)(Params);
    const Params* params;
    int gx, gy, threads, smem_bytes;
    std::atomic<int> next_block{0};
    std::mutex error_mutex;
    std::string error;
    void fail(const std::string& message) {
        std::lock_guard<std::mutex> lock(error_mutex);
        if (error.empty()) error = message;
    }
};

template <typename Params>
inline thread_local LaunchState<Params>* running_launch = nullptr;

template <typename Params>
inline void fiber_main() {
    LaunchState<Params>* launch = running_launch<Params>;
    launch->kernel(*launch->params);
    Thread& th = current_fiber->thread;
    if (!th.open_group.empty()) th.block->fail("cp.async copies issued but never committed");
    for (const auto& group : th.committed)
        if (!group.empty()) th.block->fail("kernel exited with cp.async copies never waited for");
    current_fiber->done = true;
}  // returns to uc_link: the scheduler

// One OS thread: takes blocks from the launch and runs each block's fibers to completion.
template <typename Params>
inline void worker(LaunchState<Params>& launch) {
    const int threads = launch.threads;
    Block block(threads, launch.smem_bytes);
    std::vector<Fiber> fibers(threads);
    for (Fiber& f : fibers) f.stack.resize(kFiberStackBytes);
    ucontext_t scheduler;
    scheduler_context = &scheduler;
    running_launch<Params> = &launch;
    blockDim = {unsigned(threads), 1, 1};
    gridDim = {unsigned(launch.gx), unsigned(launch.gy), 1};
    const int blocks = launch.gx * launch.gy;
    for (int b = launch.next_block++; b < blocks; b = launch.next_block++) {
        blockIdx = {unsigned(b % launch.gx), unsigned(b / launch.gx), 0};
        // uninitialised shared memory reads as NaN for every element type
        std::memset(block.smem.data(), 0xff, block.smem.size());
        for (int tid = 0; tid < threads; ++tid) {
            Fiber& f = fibers[tid];
            f.thread = Thread();
            f.thread.block = &block;
            f.thread.lane = tid & 31;
            f.thread.warp = tid >> 5;
            f.index = {unsigned(tid), 0, 0};
            f.done = false;
            f.waiting_on = nullptr;
            getcontext(&f.context);
            f.context.uc_stack.ss_sp = f.stack.data();
            f.context.uc_stack.ss_size = f.stack.size();
            f.context.uc_link = &scheduler;
            makecontext(&f.context, fiber_main<Params>, 0);
        }
        int finished = 0;
        while (finished < threads) {
            bool progressed = false;
            for (Fiber& f : fibers) {
                if (f.done) continue;
                if (f.waiting_on && f.waiting_on->generation() == f.waiting_generation) continue;
                f.waiting_on = nullptr;
                current_fiber = &f;
                self = &f.thread;
                threadIdx = f.index;
                swapcontext(&scheduler, &f.context);
                progressed = true;
                if (f.done) ++finished;
            }
            if (!progressed) {
                std::string what;
                for (const Fiber& f : fibers)
                    if (!f.done) {
                        what = f.waiting_what;
                        break;
                    }
                block.fail("deadlock: the threads of a block wait in " + what +
                           " that not every thread of the block / warp reaches");
                break;
            }
        }
        if (!block.error.empty()) {
            launch.fail(block.error);
            break;
        }
    }
    current_fiber = nullptr;
    self = nullptr;
    scheduler_context = nullptr;
}

// Runs kernel(params) over a gx x gy grid of blocks of `threads` threads; returns "" or the
// first error a thread reported.
template <typename Params>
inline std::string launch(void (*kernel)(Params), const Params& params, int gx, int gy, int threads,
                          int smem_bytes) {
    LaunchState<Params> state;
    state.kernel = kernel;
    state.params = &params;
    state.gx = gx;
    state.gy = gy;
    state.threads = threads;
    state.smem_bytes = smem_bytes;
    const int blocks = gx * gy;
    const int workers = std::max(1, std::min<int>(blocks, int(std::thread::hardware_concurrency())));
    std::vector<std::thread> pool;
    for (int w = 1; w < workers; ++w) pool.emplace_back([&state] { worker(state); });
    worker(state);
    for (std::thread& t : pool) t.join();
    return state.error;
}

}  // namespace sas_emu
