// Host emulation of the CUDA features the sparse kernels use, so that the same .cu source
// runs on the CPU: threadIdx/blockIdx, per-block dynamic shared memory addressed through a
// 32-bit shared window, __syncthreads / __syncwarp, ldmatrix, cp.async groups, conversions,
// a reference mma.sp that follows the PTX ISA fragment and metadata layouts (section
// 9.7.14.6), and the Hopper warpgroup MMA wgmma.mma_async.sp (section 9.7.15.6) reading
// its operands from shared memory through matrix descriptors (section 9.7.15.5.1.2).
//
// Execution model: every CUDA thread of a block is a cooperative fiber (ucontext) with its
// own stack; a fiber runs until it reaches __syncthreads or a warp / warpgroup collective
// (ldmatrix, mma.sp, __syncwarp, wgmma.*), which are barriers over the block / the warp's 32
// lanes / the warpgroup's 128 threads, and the scheduler resumes fibers whose barrier has
// completed. A barrier nobody can complete is reported as a deadlock. Blocks run in
// parallel on a few OS threads.
//
// What it checks (each a launch error, never silently computed):
//   * every shared-memory access is inside the block's dynamic shared memory;
//   * cp.async copies land only at cp.async.wait_group (reading a stage early reads stale
//     data; shared memory starts every block as NaN bytes); every copy is waited for;
//   * mma.sp / wgmma.sp metadata is valid (distinct indices; ordered for mma.sp);
//   * wgmma: descriptors uniform over the warpgroup, a wgmma.fence before issue, the
//     thread's landed cp.async / st.shared data fenced to the async proxy
//     (fence.proxy.async) before the wgmma that may read it, operands read when the group
//     is waited for (so overwriting a stage too early gives wrong results), no group left
//     pending at exit;
//   * 8/16-byte global accesses are aligned (they fault on a GPU otherwise).
// And it measures shared-memory bank conflicts: every warp-wide shared access (ld/st.shared,
// ldmatrix, the shared side of cp.async) is split into its hardware phases (32 lanes for
// 4-byte accesses, 16 for 8-byte, 8 for 16-byte and ldmatrix matrices), a phase takes as
// many wavefronts as the largest number of distinct 4-byte words in one of the 32 banks, and
// wavefronts beyond one per phase are counted as conflicts (sas_emu_smem_stats).
#pragma once

#include <atomic>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <algorithm>
#include <deque>
#include <mutex>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

#include <ucontext.h>

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

using std::min;
using std::max;

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

// One warp-wide shared-memory access being assembled from its lanes (non-collective
// instructions: lanes run one after another, so the k-th execution of a call site by each
// lane is the same warp instruction).
struct PendingAccess {
    int kind = 0, bytes = 0, count = 0;
    unsigned mask = 0;
    u32 addr[32];
};

struct AccessKey {
    const void* site;
    unsigned occurrence;
    bool operator==(const AccessKey& o) const { return site == o.site && occurrence == o.occurrence; }
};
struct AccessKeyHash {
    size_t operator()(const AccessKey& k) const {
        return std::hash<const void*>()(k.site) ^ (size_t(k.occurrence) * 0x9E3779B97F4A7C15ull);
    }
};

struct Warp {
    Barrier barrier{32};
    LaneSlot slots[2][32];  // alternating buffers: one rendezvous per collective suffices
    int lanes = 32;         // threads of the block in this warp
    std::unordered_map<AccessKey, PendingAccess, AccessKeyHash> pending;
};

enum class SpKind { F16, BF16, TF32 };

// One wgmma.mma_async.sp of a warpgroup, as issued: operands are read when it is performed.
struct WgmmaOp {
    int n = 0;
    SpKind kind = SpKind::F16;
    u64 desc_a = 0, desc_b = 0;
    u32 meta[128];
    float* d[128];
};

struct WgSlot {
    u64 desc_a, desc_b;
    u32 meta;
    float* d;
    int n;
    SpKind kind;
};

struct Warpgroup {
    Barrier barrier{128};
    WgSlot slots[2][128];
    std::vector<WgmmaOp> open;
    std::deque<std::vector<WgmmaOp>> committed;
};

// Shared-memory access kinds counted for bank conflicts.
enum SmemKind { kSmemLoad = 0, kSmemStore = 1, kSmemLdmatrix = 2, kSmemCpAsync = 3, kSmemKinds = 4 };

struct SmemStats {
    long long instructions[kSmemKinds] = {}, wavefronts[kSmemKinds] = {}, ideal[kSmemKinds] = {};
    std::string example;  // the first conflicting access, for the error message of a test
    void add(const SmemStats& o) {
        for (int k = 0; k < kSmemKinds; ++k) {
            instructions[k] += o.instructions[k];
            wavefronts[k] += o.wavefronts[k];
            ideal[k] += o.ideal[k];
        }
        if (example.empty()) example = o.example;
    }
};

// The shared window of a block starts at kSmemBase (not 0 and not 1 KiB aligned, as on a
// GPU where the dynamic shared memory follows reserved and static shared memory), so
// kernels that need an alignment must align the base themselves.
constexpr u32 kSmemBase = 16;

struct Block {
    explicit Block(int threads, int smem_bytes)
        : barrier(threads), warps((threads + 31) / 32), warpgroups(threads / 128),
          smem(size_t(kSmemBase) + size_t(smem_bytes > 0 ? smem_bytes : 0)) {
        for (int w = 0; w < int(warps.size()); ++w) warps[w].lanes = std::min(32, threads - 32 * w);
    }
    Barrier barrier;
    std::vector<Warp> warps;
    std::vector<Warpgroup> warpgroups;
    std::vector<unsigned char> smem;
    SmemStats stats;
    std::mutex error_mutex;
    std::string error;  // first error reported by any thread

    void fail(const std::string& message) {
        std::lock_guard<std::mutex> lock(error_mutex);
        if (error.empty()) error = message;
    }
};

struct AsyncCopy {
    u32 dst;
    const void* src;
    int src_bytes;
};

struct Thread {
    Block* block = nullptr;
    int tid = 0;
    int lane = 0;
    int warp = 0;
    unsigned collectives = 0;     // parity of the next warp-collective buffer
    unsigned wg_collectives = 0;  // parity of the next warpgroup-collective buffer
    bool wgmma_fenced = false;    // wgmma.fence since the last wgmma.wait_group
    bool unfenced_writes = false; // generic-proxy smem writes not yet fenced to the async proxy
    std::vector<AsyncCopy> open_group;
    std::deque<std::vector<AsyncCopy>> committed;
    std::unordered_map<const void*, unsigned> occurrences;  // per call site, for PendingAccess
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

inline void failf(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
inline void failf(const char* fmt, ...) {
    char msg[400];
    va_list args;
    va_start(args, fmt);
    std::vsnprintf(msg, sizeof msg, fmt, args);
    va_end(args);
    self->block->fail(msg);
}

// ---- shared memory: bounds and bank conflicts ---------------------------------------------
// Pointer to `bytes` bytes at shared address `addr`, or null (and a launch error) outside.
inline unsigned char* smem_ptr(u32 addr, int bytes, const char* what) {
    Block* b = self->block;
    if (addr < kSmemBase || size_t(addr) + size_t(bytes) > b->smem.size()) {
        failf("%s: shared address 0x%x (+%d bytes) is outside the block's dynamic shared memory [0x%x, 0x%zx)",
              what, addr, bytes, kSmemBase, b->smem.size());
        return nullptr;
    }
    if (addr % unsigned(bytes < 16 ? bytes : 16) != 0) {
        failf("%s: shared address 0x%x is not %d-byte aligned", what, addr, bytes);
        return nullptr;
    }
    return b->smem.data() + addr;
}

// Wavefronts of one warp-wide access: phases of 128 bytes of lanes, each as many wavefronts
// as the most distinct 4-byte words any bank serves in it.
inline void account(SmemStats& stats, int kind, int bytes, unsigned mask, const u32* addr) {
    const int per_phase = bytes <= 4 ? 32 : 128 / bytes;
    const int words = bytes <= 4 ? 1 : bytes / 4;
    long long wavefronts = 0, ideal = 0;
    for (int p = 0; p < 32 / per_phase; ++p) {
        u32 seen[32][32];
        int count[32] = {};
        bool any = false;
        for (int l = p * per_phase; l < (p + 1) * per_phase; ++l) {
            if (!(mask >> l & 1u)) continue;
            any = true;
            for (int w = 0; w < words; ++w) {
                const u32 word = addr[l] / 4 + u32(w), bank = word % 32;
                bool dup = false;
                for (int i = 0; i < count[bank]; ++i) dup |= seen[bank][i] == word;
                if (!dup && count[bank] < 32) seen[bank][count[bank]++] = word;
            }
        }
        if (!any) continue;
        int worst = 1;
        for (int bank = 0; bank < 32; ++bank) worst = std::max(worst, count[bank]);
        wavefronts += worst;
        ideal += 1;
    }
    stats.instructions[kind] += 1;
    stats.wavefronts[kind] += wavefronts;
    stats.ideal[kind] += ideal;
    if (wavefronts > ideal && stats.example.empty()) {
        static const char* names[] = {"ld.shared", "st.shared", "ldmatrix", "cp.async (shared side)"};
        char msg[400];
        int n = std::snprintf(msg, sizeof msg, "%s of %d bytes: %lld wavefronts for %lld phases; lane addresses",
                              names[kind], bytes, wavefronts, ideal);
        for (int l = 0; l < 32 && n < 360; ++l)
            if (mask >> l & 1u) n += std::snprintf(msg + n, sizeof msg - n, " %x", addr[l]);
        stats.example = msg;
    }
}

// Records this lane's part of a non-collective shared access made from call site `site`.
inline void record_access(const void* site, int kind, u32 addr, int bytes) {
    Thread* th = self;
    Warp& w = th->block->warps[th->warp];
    const unsigned occurrence = th->occurrences[site]++;
    PendingAccess& pa = w.pending[AccessKey{site, occurrence}];
    if (pa.count == 0) {
        pa.kind = kind;
        pa.bytes = bytes;
    }
    if (pa.mask >> th->lane & 1u) {
        failf("emulator: lane %d recorded twice in one shared access", th->lane);
        return;
    }
    pa.addr[th->lane] = addr;
    pa.mask |= 1u << th->lane;
    if (++pa.count == w.lanes) {
        account(th->block->stats, pa.kind, pa.bytes, pa.mask, pa.addr);
        w.pending.erase(AccessKey{site, occurrence});
    }
}

// Accesses some lanes never reached (divergent code) are accounted with the lanes they have.
inline void flush_accesses(Block& block) {
    for (Warp& w : block.warps) {
        for (auto& kv : w.pending) account(block.stats, kv.second.kind, kv.second.bytes, kv.second.mask, kv.second.addr);
        w.pending.clear();
    }
}

// The call site of an emulated instruction: the return address into the kernel's code.
#define SAS_EMU_SITE() __builtin_return_address(0)

__attribute__((noinline)) inline void smem_load(void* dst, u32 addr, int bytes) {
    record_access(SAS_EMU_SITE(), kSmemLoad, addr, bytes);
    if (const unsigned char* p = smem_ptr(addr, bytes, "ld.shared")) std::memcpy(dst, p, size_t(bytes));
    else std::memset(dst, 0, size_t(bytes));
}

__attribute__((noinline)) inline void smem_store(u32 addr, const void* src, int bytes) {
    record_access(SAS_EMU_SITE(), kSmemStore, addr, bytes);
    if (unsigned char* p = smem_ptr(addr, bytes, "st.shared")) std::memcpy(p, src, size_t(bytes));
    self->unfenced_writes = true;
}

__attribute__((noinline)) inline void cp_async_issue(u32 dst, const void* src, int src_bytes) {
    record_access(SAS_EMU_SITE(), kSmemCpAsync, dst, 16);
    if (src_bytes < 0 || src_bytes > 16) failf("cp.async: src-size %d outside 0..16", src_bytes);
    if (src_bytes > 0 && reinterpret_cast<uintptr_t>(src) % 16 != 0)
        failf("cp.async: global source %p is not 16-byte aligned", src);
    self->open_group.push_back({dst, src, src_bytes});
}

inline void perform(const std::vector<AsyncCopy>& group) {
    for (const AsyncCopy& c : group) {
        unsigned char* p = smem_ptr(c.dst, 16, "cp.async");
        if (!p) continue;
        if (c.src_bytes > 0) std::memcpy(p, c.src, size_t(c.src_bytes));
        if (c.src_bytes < 16) std::memset(p + c.src_bytes, 0, size_t(16 - c.src_bytes));
    }
    if (!group.empty()) self->unfenced_writes = true;
}

// ---- number formats -----------------------------------------------------------------------
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

// The 19 bits of a tf32 (sign, exponent, 10 mantissa bits); a NaN whose payload sits only in
// the dropped bits keeps the quiet bit, so it stays a NaN rather than becoming inf.
inline u32 tf32_truncate(u32 b) {
    const bool nan = (b & 0x7f800000u) == 0x7f800000u && (b & 0x007fffffu) != 0;
    return (b & 0xffffe000u) | (nan ? 0x00400000u : 0u);
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

inline double decode_operand(u32 bits, SpKind kind) {
    if (kind == SpKind::F16) return half_to_float(u16(bits));
    if (kind == SpKind::BF16) return bits_to_float(bits << 16);
    return bits_to_float(tf32_truncate(bits));  // the tensor core reads 19 bits of a tf32
}

// ---- mma.sp ------------------------------------------------------------------------------
// Where the mma.sp operand A elements of each shape live (PTX ISA 9.7.14.6.2): A is the
// compressed 16 x K/2 matrix laid out like the dense mma of half the K, and one chunk
// (4 columns for 16-bit, 2 for tf32) holds 2 (resp. 1) stored elements.
// The warp's mma.sp from the 32 lanes' registers: rebuild A (decompressed through the
// metadata), B and C from their fragments, then D = A * B + C with exact products.
inline void mma_sp_warp(LaneSlot* all, SpKind kind) {
    const bool tf32 = kind == SpKind::TF32;
    const int K = tf32 ? 16 : 32;
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
                if (nib != 0x4u && nib != 0xEu)
                    failf("mma.sp tf32: invalid metadata nibble 0x%x (row %d, pair %d); only 0x4 and 0xe are valid",
                          nib, row, chunk);
                A[row][2 * chunk + (nib == 0xEu ? 1 : 0)] = decode_operand(all[lane].a[r], kind);
            } else {
                if (i0 >= i1)  // ordered_metadata: two distinct, increasing indices
                    failf("mma.sp 16-bit: invalid metadata nibble 0x%x (row %d, group %d); need index0 < index1",
                          nib, row, chunk);
                A[row][4 * chunk + i0] += decode_operand(all[lane].a[r] & 0xffffu, kind);
                A[row][4 * chunk + i1] += decode_operand(all[lane].a[r] >> 16, kind);
            }
        }
        for (int r = 0; r < 4; ++r) {
            if (tf32) {
                B[t + 4 * r][g] = decode_operand(all[lane].b[r], kind);
            } else {
                B[2 * t + 8 * r][g] = decode_operand(all[lane].b[r] & 0xffffu, kind);
                B[2 * t + 8 * r + 1][g] = decode_operand(all[lane].b[r] >> 16, kind);
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

// ---- wgmma.mma_async.sp ---------------------------------------------------------------------
// Byte address of element (row, byte column) of a K-major operand described by `desc`
// (PTX ISA 9.7.15.5.1.2: canonical K-major layouts; swizzle modes 1 = 128 B, 2 = 64 B,
// 3 = 32 B act on the address bits [4, 4+b) ^= [7, 7+b); mode 0 is the interleaved layout
// of 8 x 16-byte core matrices, LBO between core matrices along K, SBO between 8-row groups).
inline bool desc_address(u64 desc, int row, int col_bytes, u32& addr) {
    const u32 start = u32(desc & 0x3FFFu) << 4;
    const u32 lbo = u32((desc >> 16) & 0x3FFFu) << 4;
    const u32 sbo = u32((desc >> 32) & 0x3FFFu) << 4;
    const u32 base_offset = u32((desc >> 49) & 7u);
    const u32 mode = u32(desc >> 62);
    if (base_offset != 0) {
        failf("wgmma: matrix descriptor base offset %u is not emulated (align the swizzle pattern)", base_offset);
        return false;
    }
    if (mode == 0) {
        addr = start + u32(row % 8) * 16 + u32(row / 8) * sbo + u32(col_bytes % 16) + u32(col_bytes / 16) * lbo;
        return true;
    }
    const u32 width = mode == 1 ? 128u : mode == 2 ? 64u : 32u;
    if (u32(col_bytes) >= width) {
        failf("wgmma: a K-major row of %d+ bytes does not fit the %u-byte swizzle atom", col_bytes + 1, width);
        return false;
    }
    const u32 a = start + u32(row % 8) * width + u32(row / 8) * sbo + u32(col_bytes);
    addr = a ^ (((a >> 7) & (width / 16 - 1)) << 4);
    return true;
}

inline u32 smem_u16(u32 addr) {
    const unsigned char* p = smem_ptr(addr, 2, "wgmma operand read");
    if (!p) return 0;
    u16 v;
    std::memcpy(&v, p, 2);
    return v;
}

// D[64 x n] += A[64 x 32] (2:4 sparse, compressed 64 x 16 in shared memory) * B[32 x n]
// (K-major in shared memory), for the 128 threads' registers.
inline void wgmma_perform(const WgmmaOp& op) {
    static thread_local std::vector<double> A, B;
    A.assign(64 * 32, 0.0);
    B.assign(size_t(32) * op.n, 0.0);
    for (int r = 0; r < 64; ++r) {
        const int w = r / 16, rr = r % 16, g = rr % 8;
        for (int j = 0; j < 8; ++j) {
            // metadata of sparsity selector 0, per warp as for mma.sp m16n8k32 (Figure 176)
            const u32 word = op.meta[w * 32 + g * 4 + (j >> 2)];
            const u32 nib = ((rr < 8 ? word : word >> 16) >> (4 * (j & 3))) & 0xfu;
            const u32 i0 = nib & 3u, i1 = nib >> 2;
            if (i0 == i1) {
                failf("wgmma.sp: invalid metadata nibble 0x%x (row %d, chunk %d): equal indices", nib, r, j);
                return;
            }
            for (int e = 0; e < 2; ++e) {
                u32 addr;
                if (!desc_address(op.desc_a, r, (2 * j + e) * 2, addr)) return;
                A[size_t(r) * 32 + 4 * j + (e ? i1 : i0)] += decode_operand(smem_u16(addr), op.kind);
            }
        }
    }
    for (int n = 0; n < op.n; ++n)
        for (int k = 0; k < 32; ++k) {
            u32 addr;
            if (!desc_address(op.desc_b, n, k * 2, addr)) return;
            B[size_t(k) * op.n + n] = decode_operand(smem_u16(addr), op.kind);
        }
    for (int tid = 0; tid < 128; ++tid) {
        const int w = tid / 32, lane = tid % 32, g = lane / 4, t = lane % 4;
        for (int i = 0; i < op.n / 2; ++i) {
            const int row = 16 * w + g + 8 * ((i >> 1) & 1), col = 8 * (i >> 2) + 2 * t + (i & 1);
            double s = op.d[tid][i];
            for (int k = 0; k < 32; ++k) s += A[size_t(row) * 32 + k] * B[size_t(k) * op.n + col];
            op.d[tid][i] = float(s);
        }
    }
}

inline Warpgroup* my_warpgroup(const char* what) {
    Block* b = self->block;
    const int wg = self->tid / 128;
    if (wg >= int(b->warpgroups.size())) {
        failf("%s: thread %d is not in a complete warpgroup of 128 threads", what, self->tid);
        return nullptr;
    }
    return &b->warpgroups[wg];
}

// Every thread of the warpgroup publishes `mine`; the last arrival gets `last`.
inline WgSlot* warpgroup_exchange(Warpgroup& wg, const WgSlot& mine, const char* what, bool& last) {
    WgSlot* buf = wg.slots[self->wg_collectives++ & 1u];
    buf[self->tid % 128] = mine;
    last = wg.barrier.arrive_and_wait(what);
    return buf;
}

inline void wgmma_issue(float* d, int n, u64 desc_a, u64 desc_b, u32 meta, SpKind kind) {
    Warpgroup* wg = my_warpgroup("wgmma.mma_async.sp");
    if (!wg) return;
    if (!self->wgmma_fenced) failf("wgmma.mma_async.sp issued without a wgmma.fence since the last wgmma.wait_group");
    if (self->unfenced_writes)
        failf("wgmma.mma_async.sp issued while this thread's shared-memory writes (landed cp.async or st.shared) "
              "are not fenced to the async proxy (fence.proxy.async)");
    bool last = false;
    WgSlot* all = warpgroup_exchange(*wg, WgSlot{desc_a, desc_b, meta, d, n, kind}, "wgmma.mma_async.sp", last);
    if (!last) return;
    WgmmaOp op;
    op.n = n;
    op.kind = kind;
    op.desc_a = all[0].desc_a;
    op.desc_b = all[0].desc_b;
    for (int i = 0; i < 128; ++i) {
        if (all[i].desc_a != op.desc_a || all[i].desc_b != op.desc_b || all[i].n != n || all[i].kind != kind) {
            failf("wgmma.mma_async.sp: thread %d of the warpgroup issued a different instruction or descriptor", i);
            return;
        }
        op.meta[i] = all[i].meta;
        op.d[i] = all[i].d;
    }
    wg->open.push_back(op);
}

}  // namespace sas_emu

// ---- the primitives of runtime/cuda/sas_ptx.cuh ------------------------------------------
inline u32 sas_smem_base() { return sas_emu::kSmemBase; }

inline void __syncthreads() { sas_emu::self->block->barrier.arrive_and_wait("__syncthreads"); }

inline void sas_syncwarp() {
    sas_emu::self->block->warps[sas_emu::self->warp].barrier.arrive_and_wait("__syncwarp");
}

inline u32 lds32(u32 addr) {
    u32 v;
    sas_emu::smem_load(&v, addr, 4);
    return v;
}
inline u32x2 lds64(u32 addr) {
    u32x2 v;
    sas_emu::smem_load(&v, addr, 8);
    return v;
}
inline u32x4 lds128(u32 addr) {
    u32x4 v;
    sas_emu::smem_load(&v, addr, 16);
    return v;
}
inline void sts16(u32 addr, u16 v) { sas_emu::smem_store(addr, &v, 2); }
inline void sts32(u32 addr, u32 v) { sas_emu::smem_store(addr, &v, 4); }
inline void sts64(u32 addr, u32x2 v) { sas_emu::smem_store(addr, &v, 8); }
inline void sts128(u32 addr, u32x4 v) { sas_emu::smem_store(addr, &v, 16); }

inline void ldmatrix_x4(u32 (&r)[4], u32 addr) {
    sas_emu::LaneSlot mine{};
    mine.value = addr;
    bool last = false;
    sas_emu::LaneSlot* all = sas_emu::warp_exchange(mine, "ldmatrix", &last);
    if (last) {
        u32 addrs[32];
        for (int l = 0; l < 32; ++l) addrs[l] = all[l].value;
        sas_emu::account(sas_emu::self->block->stats, sas_emu::kSmemLdmatrix, 16, 0xffffffffu, addrs);
    }
    // matrix j: rows from lanes 8j..8j+7; this lane gets row lane/4, 32-bit column lane%4
    const int lane = sas_emu::self->lane;
    for (int j = 0; j < 4; ++j) {
        const u32 row_addr = all[8 * j + lane / 4].value;
        if (row_addr % 16 != 0) sas_emu::failf("ldmatrix: row address 0x%x is not 16-byte aligned", row_addr);
        const unsigned char* p = sas_emu::smem_ptr(row_addr + 4 * u32(lane % 4), 4, "ldmatrix");
        if (p)
            std::memcpy(&r[j], p, 4);
        else
            r[j] = 0;
    }
}

inline void cp_async_16(u32 smem_dst, const void* gmem_src, int src_bytes) {
    sas_emu::cp_async_issue(smem_dst, gmem_src, src_bytes);
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

// global memory: vector accesses must be aligned as on a GPU
inline u32x4 ldg128(const void* p) {
    u32x4 v{};
    if (reinterpret_cast<uintptr_t>(p) % 16) sas_emu::failf("16-byte global load from misaligned %p", p);
    else std::memcpy(&v, p, 16);
    return v;
}
inline u32x2 ldg64(const void* p) {
    u32x2 v{};
    if (reinterpret_cast<uintptr_t>(p) % 8) sas_emu::failf("8-byte global load from misaligned %p", p);
    else std::memcpy(&v, p, 8);
    return v;
}
inline void stg128(void* p, u32x4 v) {
    if (reinterpret_cast<uintptr_t>(p) % 16) sas_emu::failf("16-byte global store to misaligned %p", p);
    else std::memcpy(p, &v, 16);
}
inline void stg32(void* p, u32 v) {
    if (reinterpret_cast<uintptr_t>(p) % 4) sas_emu::failf("4-byte global store to misaligned %p", p);
    else std::memcpy(p, &v, 4);
}

inline u32 cvt_rna_tf32(float x) {
    const u32 b = sas_emu::float_to_bits(x);
    if ((b & 0x7f800000u) == 0x7f800000u) return sas_emu::tf32_truncate(b);  // inf / nan keep their class
    return (b + 0x1000u) & 0xffffe000u;  // ties away from zero: the magnitude rounds up
}

inline u16 f32_to_f16_rn(float x) { return sas_emu::float_to_half(x); }
inline float f16_to_f32(u16 h) { return sas_emu::half_to_float(h); }
inline u16 f32_to_bf16_rn(float x) { return sas_emu::float_to_bf16(x); }
inline float bf16_to_f32(u16 h) { return sas_emu::bits_to_float(u32(h) << 16); }
inline float sas_bits_to_float(u32 b) { return sas_emu::bits_to_float(b); }
inline u32 sas_float_to_bits(float f) { return sas_emu::float_to_bits(f); }

inline void mma_sp_16832_f16(float d[4], const u32 a[4], const u32 b[4], u32 meta) {
    sas_emu::mma_sp(d, a, b, meta, sas_emu::SpKind::F16);
}
inline void mma_sp_16832_bf16(float d[4], const u32 a[4], const u32 b[4], u32 meta) {
    sas_emu::mma_sp(d, a, b, meta, sas_emu::SpKind::BF16);
}
inline void mma_sp_16816_tf32(float d[4], const u32 a[4], const u32 b[4], u32 meta) {
    sas_emu::mma_sp(d, a, b, meta, sas_emu::SpKind::TF32);
}

// ---- the primitives of runtime/cuda/sas_wgmma.cuh -----------------------------------------
inline void wgmma_fence() { sas_emu::self->wgmma_fenced = true; }
inline void wgmma_fence_operand(float&) {}
inline void fence_proxy_async() { sas_emu::self->unfenced_writes = false; }

inline void wgmma_commit() {
    sas_emu::Warpgroup* wg = sas_emu::my_warpgroup("wgmma.commit_group");
    if (!wg) return;
    bool last = false;
    sas_emu::warpgroup_exchange(*wg, sas_emu::WgSlot{}, "wgmma.commit_group", last);
    if (last) {
        wg->committed.push_back(std::move(wg->open));
        wg->open.clear();
    }
}

template <int N>
inline void wgmma_wait() {
    sas_emu::Warpgroup* wg = sas_emu::my_warpgroup("wgmma.wait_group");
    if (!wg) return;
    bool last = false;
    sas_emu::warpgroup_exchange(*wg, sas_emu::WgSlot{}, "wgmma.wait_group", last);
    if (last) {
        while (wg->committed.size() > size_t(N)) {
            for (const sas_emu::WgmmaOp& op : wg->committed.front()) sas_emu::wgmma_perform(op);
            wg->committed.pop_front();
        }
    }
    // the last arrival performed the groups before any other thread of the warpgroup resumes
    sas_emu::self->wgmma_fenced = false;
}

#define SAS_EMU_WGMMA(N, TY, KIND)                                                                    \
    inline void wgmma_sp_m64n##N##k32_##TY(float (&d)[N / 2], u64 desc_a, u64 desc_b, u32 meta) {   \
        sas_emu::wgmma_issue(d, N, desc_a, desc_b, meta, sas_emu::SpKind::KIND);                      \
    }
SAS_EMU_WGMMA(128, f16, F16)
SAS_EMU_WGMMA(128, bf16, BF16)
SAS_EMU_WGMMA(256, f16, F16)
SAS_EMU_WGMMA(256, bf16, BF16)
#undef SAS_EMU_WGMMA

// ---- grid launch ----------------------------------------------------------------------------
namespace sas_emu {

constexpr size_t kFiberStackBytes = 256 * 1024;

template <typename Params>
struct LaunchState {
    void (*kernel)(Params);
    const Params* params;
    int gx, gy, threads, smem_bytes;
    std::atomic<int> next_block{0};
    std::mutex mutex;
    std::string error;
    SmemStats stats;
    void fail(const std::string& message) {
        std::lock_guard<std::mutex> lock(mutex);
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
    std::vector<Fiber> fibers(threads);
    for (Fiber& f : fibers) f.stack.resize(kFiberStackBytes);
    ucontext_t scheduler;
    scheduler_context = &scheduler;
    running_launch<Params> = &launch;
    blockDim = {unsigned(threads), 1, 1};
    gridDim = {unsigned(launch.gx), unsigned(launch.gy), 1};
    const int blocks = launch.gx * launch.gy;
    SmemStats stats;
    for (int b = launch.next_block++; b < blocks; b = launch.next_block++) {
        Block block(threads, launch.smem_bytes);
        blockIdx = {unsigned(b % launch.gx), unsigned(b / launch.gx), 0};
        // uninitialised shared memory reads as NaN for every element type
        std::memset(block.smem.data(), 0xff, block.smem.size());
        for (int tid = 0; tid < threads; ++tid) {
            Fiber& f = fibers[tid];
            f.thread = Thread();
            f.thread.block = &block;
            f.thread.tid = tid;
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
                           " that not every thread of the block / warp / warpgroup reaches");
                break;
            }
        }
        for (const Warpgroup& wg : block.warpgroups)
            if (!wg.open.empty() || !wg.committed.empty())
                block.fail("kernel exited with wgmma groups never waited for (wgmma.wait_group)");
        flush_accesses(block);
        stats.add(block.stats);
        if (!block.error.empty()) {
            launch.fail(block.error);
            break;
        }
    }
    {
        std::lock_guard<std::mutex> lock(launch.mutex);
        launch.stats.add(stats);
    }
    current_fiber = nullptr;
    self = nullptr;
    scheduler_context = nullptr;
}

// Statistics of the last launch (any thread), for sas_emu_smem_stats.
inline std::mutex last_stats_mutex;
inline SmemStats last_stats;

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
    {
        std::lock_guard<std::mutex> lock(last_stats_mutex);
        last_stats = state.stats;
    }
    return state.error;
}

// ---- the kernel registry: name -> host function, its parameter struct -----------------------
struct KernelEntry {
    const char* name;
    void* function;
    const char* param_type;
    int param_size;
    std::string (*run)(void* function, const void* param_bytes, int gx, int gy, int threads, int smem);
};

inline std::vector<KernelEntry>& registry() {
    static std::vector<KernelEntry> entries;
    return entries;
}

template <typename P>
std::string run_registered(void* function, const void* param_bytes, int gx, int gy, int threads, int smem) {
    P params;
    std::memcpy(&params, param_bytes, sizeof(P));  // what the driver copies from kernelParams[0]
    return launch(reinterpret_cast<void (*)(P)>(function), params, gx, gy, threads, smem);
}

template <typename P>
struct Registrar {
    Registrar(const char* name, const char* param_type, void (*function)(P)) {
        registry().push_back({name, reinterpret_cast<void*>(function), param_type, int(sizeof(P)), &run_registered<P>});
    }
};

}  // namespace sas_emu
