// Pieces shared by the sparse kernels: launch parameters, element types, the compressed
// operand layout, the swizzled shared-memory tile layout and its cp.async loaders, and the
// epilogue that stages the output tile through shared memory for 16-byte stores.
//
// The compressed sparse operand A ("SpA") is what runtime/cuda/sas_compress.cu writes for
// SAS (from the narrow activation) and runtime/cuda/operands.py builds for SWS (from a
// packed weight). Its K axis is cut into k-tiles of 128 bytes of the wide (dense) operand
// B: 64 wide columns for 16-bit types (two m16n8k32 steps), 32 for tf32 (two m16n8k16
// steps). Per k-tile and row A holds 64 bytes of kept values and 2 x 32 bits of metadata:
//   values  [rows_pad][a_ld] row-major, a_ld = ktiles * 64 bytes / element size;
//   meta    u32 [rows_pad / 16][ktiles][32]: the 32 words of one 16-row block and k-tile
//           are indexed g*4 + t*2 + step (g = row % 8, t = 0/1, step = k-step in the
//           k-tile): exactly the mma.sp (and wgmma.sp) metadata register of lane 4g+t for
//           sparsity selector 0: rows g (bits 0-15) and g+8 (bits 16-31) of the block,
//           chunks 4t..4t+3 of the k-step (a chunk is 4 wide columns for 16-bit types,
//           a pair for tf32), chunk j at bits 4*(j%4): i0 | i1 << 2 (16-bit, i0 < i1) or
//           0x4 / 0xE (tf32: the kept element of the pair).
// rows_pad is a multiple of kRowPad, so a kernel's A tiles never leave the allocation and
// their metadata is always valid (padding rows hold zeros with valid indices).
#pragma once
#include "sas_ptx.cuh"

// ---- launch parameters (mirrored with ctypes in runtime/cuda/kernel_params.py) ---------
struct SpGemmParams {
    const void* a_vals;  // compressed sparse operand, [rows_pad][a_ld]
    const void* a_meta;  // its metadata, u32 [rows_pad / 16][ktiles][32]
    const void* b;       // dense operand [rows_b][b_ld], row-major (K contiguous)
    const void* bias;    // [output columns] in the input dtype, or null
    void* out;           // normal: [rows_a][ldo]; transposed: [rows_b][ldo]
    int rows_a;          // valid rows of A (SAS: R; SWS: N)
    int rows_b;          // valid rows of B (SAS: N; SWS: R)
    int k;               // valid columns of B; columns >= k read as zero
    int b_ld;            // elements per row of B
    int a_ld;            // elements per compressed row of A
    int ktiles;          // k-tiles of A
    int b_ktiles;        // B's k-tile of A's k-tile kt is kt % b_ktiles (tf32 split operands)
    int ldo;             // elements per output row
    int flags;           // kFlag* below
};

struct CompressParams {
    const void* x;  // [R][K] narrow activation
    void* vals;     // [rows_pad][a_ld]
    void* meta;     // u32 [rows_pad / 16][ktiles][32]
    int R, K;       // rows and channels of x
    int rows_pad;   // rows of the compressed operand (a multiple of kRowPad)
    int ktiles;     // k-tiles of the wide axis M*K
    int a_ld;       // elements per compressed row
    int flags;      // kFlagXVec
};

enum : int {
    kFlagBVec = 1,    // B rows may be read with 16-byte cp.async (aligned base, row and K)
    kFlagOutF32 = 2,  // write fp32 instead of the input dtype
    kFlagOutVec = 4,  // output rows may be written with 16-byte stores
    kFlagXVec = 8,    // compress: x rows may be read with 8/16-byte vectors
};

constexpr int kRowPad = 128;         // rows of a compressed operand are padded to this
constexpr int kKTileBytesB = 128;    // bytes of a B row per k-tile
constexpr int kKTileBytesA = 64;     // bytes of a compressed A row per k-tile
constexpr int kMetaTileBytes = 128;  // metadata bytes per 16-row block and k-tile

template <int V>
struct IntConst {
    static constexpr int value = V;
};

// ---- element types ----------------------------------------------------------------------
struct F16 {
    typedef u16 storage;
    static constexpr int kSize = 2;
    static constexpr bool kTf32 = false, kIsBf16 = false;
    static __device__ __forceinline__ float to_float(storage v) { return f16_to_f32(v); }
    static __device__ __forceinline__ storage from_float(float v) { return f32_to_f16_rn(v); }
    static __device__ __forceinline__ void mma(float d[4], const u32 a[4], const u32 b[4], u32 e) {
        mma_sp_16832_f16(d, a, b, e);
    }
};

struct BF16 {
    typedef u16 storage;
    static constexpr int kSize = 2;
    static constexpr bool kTf32 = false, kIsBf16 = true;
    static __device__ __forceinline__ float to_float(storage v) { return bf16_to_f32(v); }
    static __device__ __forceinline__ storage from_float(float v) { return f32_to_bf16_rn(v); }
    static __device__ __forceinline__ void mma(float d[4], const u32 a[4], const u32 b[4], u32 e) {
        mma_sp_16832_bf16(d, a, b, e);
    }
};

struct F32 {  // float32 tensors, multiplied as tf32 (1:2 sparse A)
    typedef u32 storage;
    static constexpr int kSize = 4;
    static constexpr bool kTf32 = true, kIsBf16 = false;
    static __device__ __forceinline__ float to_float(storage v) { return sas_bits_to_float(v); }
    static __device__ __forceinline__ storage from_float(float v) { return sas_float_to_bits(v); }
    static __device__ __forceinline__ void mma(float d[4], const u32 a[4], const u32 b[4], u32 e) {
        mma_sp_16816_tf32(d, a, b, e);
    }
};

// ---- swizzled shared-memory tiles ---------------------------------------------------------
// A k-tile of A: rows of 64 bytes (4 chunks of 16 B), chunk c of row r at chunk
// c ^ ((r >> 1) & 3): the 64-byte swizzle of the PTX ISA (address bits [4,6) ^= [7,9)),
// which wgmma reads through a descriptor and which keeps every 8-row ldmatrix phase on 8
// distinct 16-byte bank groups. A tile base must be 512-byte aligned for wgmma.
__device__ __forceinline__ u32 a_tile_offset(int row, int chunk) {
    return u32(row * kKTileBytesA + ((chunk ^ ((row >> 1) & 3)) << 4));
}
// A k-tile of B: rows of 128 bytes (8 chunks), chunk c of row r at c ^ (r & 7): the
// 128-byte swizzle (bits [4,7) ^= [7,10)); tile base 1024-byte aligned for wgmma.
__device__ __forceinline__ u32 b_tile_offset(int row, int chunk) {
    return u32(row * kKTileBytesB + ((chunk ^ (row & 7)) << 4));
}

// Fragment lane coordinates (PTX ISA: groupID and threadID_in_group).
struct Lane {
    int tid, warp, lane, g, t;
    __device__ __forceinline__ Lane() {
        tid = threadIdx.x;
        warp = tid >> 5;
        lane = tid & 31;
        g = lane >> 2;
        t = lane & 3;
    }
};

// Global -> shared copies of one k-tile of A (values and metadata) and B, for a CTA of
// THREADS threads computing a BM x BN tile. Each thread copies the same chunk columns of
// the same rows every k-tile, so rows, predicates and source rows are computed once.
template <typename Tr, int BM, int BN, int THREADS>
struct TileLoader {
    typedef typename Tr::storage S;
    static constexpr int kAIters = BM * 4 / THREADS;  // 16-byte chunks of A per thread
    static constexpr int kBIters = BN * 8 / THREADS;  // 16-byte chunks of B per thread
    static constexpr int kMetaChunks = BM / 16 * (kMetaTileBytes / 16);
    static constexpr int kBElems = 16 / Tr::kSize;  // B elements per chunk
    static_assert(BM * 4 % THREADS == 0 && BN * 8 % THREADS == 0, "tile rows must cover the threads");
    static_assert(kMetaChunks <= THREADS, "one metadata chunk per thread at most");

    const unsigned char* a_src;   // row (row0 + tid / 4) of A, chunk tid % 4
    const unsigned char* m_src;   // this thread's metadata chunk, k-tile 0
    const unsigned char* b_src;   // row (brow0 + tid / 8) of B, chunk tid % 8 of k-tile 0
    long long a_row_step, b_row_step;
    int b_elem0;                  // first element of this thread's chunk in a k-tile
    u32 b_rows_ok;                // bit u: B row tid / 8 + u * THREADS / 8 exists
    bool meta_loader;

    __device__ __forceinline__ TileLoader(const SpGemmParams& p, int row0, int brow0, int tid) {
        const int ar = tid / 4, ac = tid % 4;
        a_row_step = (long long)(THREADS / 4) * p.a_ld * Tr::kSize;
        a_src = static_cast<const unsigned char*>(p.a_vals) + ((long long)(row0 + ar) * p.a_ld) * Tr::kSize +
                ac * 16;
        meta_loader = tid < kMetaChunks;
        const int mb = tid / 8, mc = tid % 8;
        m_src = static_cast<const unsigned char*>(p.a_meta) +
                ((long long)(row0 / 16 + mb) * p.ktiles) * kMetaTileBytes + mc * 16;
        const int br = tid / 8;
        b_elem0 = (tid % 8) * kBElems;
        b_row_step = (long long)(THREADS / 8) * p.b_ld * Tr::kSize;
        b_src = static_cast<const unsigned char*>(p.b) + ((long long)(brow0 + br) * p.b_ld + b_elem0) * Tr::kSize;
        b_rows_ok = 0;
#pragma unroll
        for (int u = 0; u < kBIters; ++u) b_rows_ok |= (brow0 + br + u * (THREADS / 8) < p.rows_b ? 1u : 0u) << u;
    }

    // Copies k-tile kt of A into a_stage/m_stage and k-tile kb of B (kb = kt unless the
    // operand is split, kb = kt mod b_ktiles) into b_stage. VEC: B rows are 16-byte aligned
    // (kFlagBVec), copied with cp.async; otherwise element loads (ragged rows, a slow path).
    template <bool VEC>
    __device__ __forceinline__ void load(const SpGemmParams& p, int kt, int kb, u32 a_stage, u32 b_stage,
                                         u32 m_stage, int tid) const {
        const unsigned char* a = a_src + kt * kKTileBytesA;
#pragma unroll
        for (int u = 0; u < kAIters; ++u) {
            const int r = tid / 4 + u * (THREADS / 4);
            cp_async_16(a_stage + a_tile_offset(r, tid % 4), a + u * a_row_step, 16);
        }
        if (meta_loader) cp_async_16(m_stage + tid * 16, m_src + kt * kMetaTileBytes, 16);
        const int k0 = kb * (kKTileBytesB / Tr::kSize) + b_elem0;  // first element of my chunk
        const unsigned char* b = b_src + kb * kKTileBytesB;
        if constexpr (VEC) {
            // outside B (rows past rows_b, columns past k) the copy reads nothing (src-size 0)
            // and zero-fills; the address is then never dereferenced
            const u32 ok = k0 < p.k ? b_rows_ok : 0u;
#pragma unroll
            for (int u = 0; u < kBIters; ++u) {
                const int r = tid / 8 + u * (THREADS / 8);
                cp_async_16(b_stage + b_tile_offset(r, tid % 8), b + u * b_row_step, (ok >> u & 1u) ? 16 : 0);
            }
        } else {  // ragged rows: element loads, zero outside B
#pragma unroll
            for (int u = 0; u < kBIters; ++u) {
                const int r = tid / 8 + u * (THREADS / 8);
                const bool row_ok = (b_rows_ok >> u & 1u) != 0;
                const S* src = reinterpret_cast<const S*>(b + u * b_row_step);
                S v[kBElems];
#pragma unroll
                for (int e = 0; e < kBElems; ++e) v[e] = (row_ok && k0 + e < p.k) ? src[e] : S(0);
                u32x4 w;
                if constexpr (Tr::kSize == 2) {
                    w.x = u32(v[0]) | (u32(v[1]) << 16);
                    w.y = u32(v[2]) | (u32(v[3]) << 16);
                    w.z = u32(v[4]) | (u32(v[5]) << 16);
                    w.w = u32(v[6]) | (u32(v[7]) << 16);
                } else {
                    w.x = v[0];
                    w.y = v[1];
                    w.z = v[2];
                    w.w = v[3];
                }
                sts128(b_stage + b_tile_offset(r, tid % 8), w);
            }
        }
    }
};

// k-tile counters of the pipeline: the k-tile of A to load next, the matching k-tile of B
// (wrapping at b_ktiles, without a division), and the stage ring positions.
struct KCursor {
    int kt = 0, kb = 0;
    __device__ __forceinline__ void next(int b_ktiles) {
        ++kt;
        kb = kb + 1 == b_ktiles ? 0 : kb + 1;
    }
};

// One pipeline step of the copy side: k-tile `at` into the stage at `stage` (B, A, metadata in
// the layout of Cfg's stage) while k-tiles remain, one cp.async group committed either way (the
// wait counts groups), then the cursor moves on.
template <bool VEC, class Cfg, class Loader>
__device__ __forceinline__ void issue_ktile(const Loader& loader, const SpGemmParams& p, KCursor& at, u32 stage,
                                            int tid) {
    if (at.kt < p.ktiles)
        loader.template load<VEC>(p, at.kt, at.kb, stage + Cfg::kBStage, stage, stage + Cfg::kBStage + Cfg::kAStage,
                                  tid);
    cp_async_commit();
    at.next(p.b_ktiles);
}

// ---- epilogue -----------------------------------------------------------------------------
// The CTA's accumulators go through shared memory so that global stores are 16-byte vectors
// along the output rows, in both orientations:
//   normal (SAS):      out[a][b], staging tile [BM][BN];
//   transposed (SWS):  out[b][a] (A's rows are the output columns), staging tile [BN][BM].
// Staging rows are >= 128 bytes; chunk c of staging row r sits at c ^ swz(r), chosen per
// orientation and output width so that the fragment writes and the 16-byte reads of every
// warp hit 32 distinct banks (checked by the emulator's bank-conflict counter).
template <int OB, bool TRANSPOSED>
__device__ __forceinline__ int staging_swizzle(int row) {
    if constexpr (!TRANSPOSED) return OB == 2 ? (row & 7) : 2 * (row & 3);
    return OB == 2 ? ((row >> 1) & 3) : 2 * ((row >> 1) & 3);
}

template <int OB, bool TRANSPOSED, int ROW_BYTES>
__device__ __forceinline__ u32 staging_offset(int row, int byte_col) {
    return u32(row * ROW_BYTES + (((byte_col >> 4) ^ staging_swizzle<OB, TRANSPOSED>(row)) << 4) + (byte_col & 15));
}

// Writes the warp's accumulator fragments acc[MT][NT][4] (A rows a0 + mt*16 + ..., B columns
// b0 + nt*8 + ... inside the CTA tile), bias added, converted, into the staging tile.
template <typename Tr, int BM, int BN, int MT, int NT, bool TRANSPOSED, typename Acc>
__device__ __forceinline__ void stage_fragments(const SpGemmParams& p, u32 stage, const Acc& acc, int a0, int b0,
                                                int tile_a, int tile_b, const Lane& ln) {
    typedef typename Tr::storage S;
    const S* bias = static_cast<const S*>(p.bias);
    const bool out_f32 = (p.flags & kFlagOutF32) != 0;
    float bias_b[NT][2];  // per output column of a normal tile
    float bias_a[MT][2];  // per output column of a transposed tile
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int j = 0; j < 2; ++j) {
            const int b = tile_b + b0 + nt * 8 + 2 * ln.t + j;
            bias_b[nt][j] = (!TRANSPOSED && bias && b < p.rows_b) ? Tr::to_float(bias[b]) : 0.f;
        }
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int a = tile_a + a0 + mt * 16 + ln.g + 8 * h;
            bias_a[mt][h] = (TRANSPOSED && bias && a < p.rows_a) ? Tr::to_float(bias[a]) : 0.f;
        }
    auto store = [&](auto ob_tag) {
        constexpr int OB = decltype(ob_tag)::value;
        constexpr int kRow = (TRANSPOSED ? BM : BN) * OB;
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int nt = 0; nt < NT; ++nt)
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    const int a = a0 + mt * 16 + ln.g + 8 * h;
                    const int b = b0 + nt * 8 + 2 * ln.t;
                    const float v0 = acc[mt][nt][2 * h] + bias_b[nt][0] + bias_a[mt][h];
                    const float v1 = acc[mt][nt][2 * h + 1] + bias_b[nt][1] + bias_a[mt][h];
                    if constexpr (!TRANSPOSED) {
                        if constexpr (OB == 4) {
                            sts64(stage + staging_offset<4, false, kRow>(a, b * 4),
                                  u32x2{sas_float_to_bits(v0), sas_float_to_bits(v1)});
                        } else {
                            sts32(stage + staging_offset<2, false, kRow>(a, b * 2),
                                  u32(Tr::from_float(v0)) | (u32(Tr::from_float(v1)) << 16));
                        }
                    } else {
                        if constexpr (OB == 4) {
                            sts32(stage + staging_offset<4, true, kRow>(b, a * 4), sas_float_to_bits(v0));
                            sts32(stage + staging_offset<4, true, kRow>(b + 1, a * 4), sas_float_to_bits(v1));
                        } else {
                            sts16(stage + staging_offset<2, true, kRow>(b, a * 2), u16(Tr::from_float(v0)));
                            sts16(stage + staging_offset<2, true, kRow>(b + 1, a * 2), u16(Tr::from_float(v1)));
                        }
                    }
                }
    };
    if (out_f32 || Tr::kSize == 4)
        store(IntConst<4>{});
    else
        store(IntConst<2>{});
}

// Reads the staged CTA tile in 16-byte chunks and writes it to global memory: 16-byte
// stores where the output row is aligned and the chunk lies inside the output, element
// stores at ragged edges. The caller synchronises the CTA between staging and this.
template <typename Tr, int BM, int BN, int THREADS, bool TRANSPOSED, int OB>
__device__ __forceinline__ void store_staged_as(const SpGemmParams& p, u32 stage, int tile_a, int tile_b, int tid) {
    constexpr int kRows = TRANSPOSED ? BN : BM;  // staging rows = output rows of the tile
    constexpr int kCols = TRANSPOSED ? BM : BN;  // staging columns = output columns of the tile
    constexpr int kRowBytes = kCols * OB, kChunks = kRowBytes / 16, kPerChunk = 16 / OB;
    const bool vec = (p.flags & kFlagOutVec) != 0;
    const int row0 = TRANSPOSED ? tile_b : tile_a, col0 = TRANSPOSED ? tile_a : tile_b;
    const int out_rows = TRANSPOSED ? p.rows_b : p.rows_a, out_cols = TRANSPOSED ? p.rows_a : p.rows_b;
#pragma unroll 4
    for (int i = tid; i < kRows * kChunks; i += THREADS) {
        const int r = i / kChunks, c = i % kChunks;
        const int orow = row0 + r, ocol = col0 + c * kPerChunk;
        if (orow >= out_rows || ocol >= out_cols) continue;
        const u32x4 v = lds128(stage + u32(r * kRowBytes + ((c ^ staging_swizzle<OB, TRANSPOSED>(r)) << 4)));
        unsigned char* dst = static_cast<unsigned char*>(p.out) + ((long long)orow * p.ldo + ocol) * OB;
        if (vec && ocol + kPerChunk <= out_cols) {
            stg128(dst, v);
        } else {
            const u32 w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
            for (int e = 0; e < kPerChunk; ++e) {
                if (ocol + e >= out_cols) break;
                if constexpr (OB == 4)
                    stg32(dst + 4 * e, w[e]);
                else
                    *reinterpret_cast<u16*>(dst + 2 * e) = u16(w[e >> 1] >> (16 * (e & 1)));
            }
        }
    }
}

template <typename Tr, int BM, int BN, int THREADS, bool TRANSPOSED>
__device__ __forceinline__ void store_staged(const SpGemmParams& p, u32 stage, int tile_a, int tile_b, int tid) {
    if ((p.flags & kFlagOutF32) != 0 || Tr::kSize == 4)
        store_staged_as<Tr, BM, BN, THREADS, TRANSPOSED, 4>(p, stage, tile_a, tile_b, tid);
    else
        store_staged_as<Tr, BM, BN, THREADS, TRANSPOSED, 2>(p, stage, tile_a, tile_b, tid);
}

// Launch geometry published next to each kernel: {threads per block, dynamic smem bytes}.
// Python reads it from the cubin (cuModuleGetGlobal) or the emulator library; the emulator
// also registers the kernel with its parameter struct so its cuLaunchKernel decodes
// kernelParams[0] as the driver does.
#if defined(SAS_EMULATOR)
#define SAS_PUBLISH_LAUNCH(NAME, PARAMS, THREADS, SMEM)                        \
    extern "C" __device__ const int NAME##_launch[2] = {(THREADS), (SMEM)}; \
    static const sas_emu::Registrar<PARAMS> NAME##_registrar(#NAME, #PARAMS, NAME);
#else
#define SAS_PUBLISH_LAUNCH(NAME, PARAMS, THREADS, SMEM) \
    extern "C" __device__ const int NAME##_launch[2] = {(THREADS), (SMEM)};
#endif

// A sparse GEMM kernel: BODY<TR, CFG, TRANSPOSED>(p) under CFG's launch bounds, published.
#define SAS_SPARSE_GEMM_KERNEL(NAME, BODY, TR, CFG, TRANSPOSED)                           \
    extern "C" __global__ void __launch_bounds__(CFG::kThreads, CFG::kMinBlocks)          \
        NAME(const SpGemmParams p) {                                                      \
        BODY<TR, CFG, TRANSPOSED>(p);                                                     \
    }                                                                                     \
    SAS_PUBLISH_LAUNCH(NAME, SpGemmParams, CFG::kThreads, CFG::kSmem)
