// Pieces shared by the SAS and SWS sparse GEMM kernels: launch parameters, element
// types, tile configurations, the cp.async tile loader and the epilogue.
//
// Both kernels run the warp-level `mma.sp` with the sparse operand A (16 rows per mma)
// and a dense operand B (8 columns per mma), staged through shared memory in a
// two-stage cp.async pipeline. A stage covers 128 bytes of the wide K axis per row:
// 64 wide columns for float16/bfloat16 (two m16n8k32 steps), 32 for tf32 (two
// m16n8k16 steps).
#pragma once
#include "sas_ptx.cuh"

// One struct for every kernel, passed by value; runtime/cuda/launch.py and the emulator
// mirror it with ctypes.
struct GemmParams {
    const void* a;     // SAS: x [R, K] (narrow). SWS: packed values [N, Kp/2]
    const void* b;     // SAS: wide weight [N, M*K]. SWS: x [R, K]
    const void* meta;  // SWS: metadata [N, Kp/16] (uint16 bit patterns). SAS: unused
    const void* bias;  // [N] in the input dtype, or null
    void* out;         // [R, N]
    int R, N, K;       // K: narrow channels (SAS) or dense input features (SWS)
    int Kp;            // SWS: K rounded up to a multiple of 16. SAS: unused
    int flags;         // kFlag* below
};

enum : int {
    kFlagAAligned = 1,  // A rows may be read with 16-byte cp.async
    kFlagBAligned = 2,  // B rows may be read with 16-byte cp.async
    kFlagOutF32 = 4,    // write fp32 instead of the input dtype
};

constexpr int kStageRowBytes = 128;  // bytes of the wide K axis per row and stage
constexpr int kSmemPad = 16;         // row padding: conflict-free fragment reads, keeps 16B alignment

// ---- element types ----------------------------------------------------------------
struct F16 {
    typedef u16 storage;
    static constexpr int kSize = 2;
    static constexpr bool kTf32 = false;
    static constexpr int kKStep = 32;  // wide K of one m16n8k32
    static __device__ __forceinline__ float to_float(storage v) { return f16_to_f32(v); }
    static __device__ __forceinline__ storage from_float(float v) { return f32_to_f16_rn(v); }
    static __device__ __forceinline__ void mma(float d[4], const u32 a[4], const u32 b[4], u32 e) {
        mma_sp_16832_f16(d, a, b, e);
    }
};

struct BF16 {
    typedef u16 storage;
    static constexpr int kSize = 2;
    static constexpr bool kTf32 = false;
    static constexpr int kKStep = 32;
    static __device__ __forceinline__ float to_float(storage v) { return bf16_to_f32(v); }
    static __device__ __forceinline__ storage from_float(float v) { return f32_to_bf16_rn(v); }
    static __device__ __forceinline__ void mma(float d[4], const u32 a[4], const u32 b[4], u32 e) {
        mma_sp_16832_bf16(d, a, b, e);
    }
};

struct F32 {  // float32 tensors, multiplied as tf32
    typedef u32 storage;
    static constexpr int kSize = 4;
    static constexpr bool kTf32 = true;
    static constexpr int kKStep = 16;  // wide K of one m16n8k16 tf32
    static __device__ __forceinline__ float to_float(storage v) { return sas_bits_to_float(v); }
    static __device__ __forceinline__ storage from_float(float v) { return sas_float_to_bits(v); }
    static __device__ __forceinline__ void mma(float d[4], const u32 a[4], const u32 b[4], u32 e) {
        mma_sp_16816_tf32(d, a, b, e);
    }
};

// ---- tile configurations ------------------------------------------------------------
template <int BM_, int BN_, int WARPS_M_, int WARPS_N_>
struct TileConfig {
    static constexpr int BM = BM_;  // block tile along the sparse operand's rows
    static constexpr int BN = BN_;  // block tile along the dense operand's columns
    static constexpr int WARPS_M = WARPS_M_;
    static constexpr int WARPS_N = WARPS_N_;
    static constexpr int kThreads = 32 * WARPS_M_ * WARPS_N_;
    static constexpr int WTM = BM_ / WARPS_M_;  // warp tile
    static constexpr int WTN = BN_ / WARPS_N_;
    static constexpr int MT = WTM / 16;  // mma tiles per warp
    static constexpr int NT = WTN / 8;
    static_assert(WTM % 16 == 0 && WTN % 8 == 0, "warp tile must be a multiple of the mma tile");
};

typedef TileConfig<64, 64, 2, 2> Tile64x64;      // 4 warps: small problems, the emulator
typedef TileConfig<128, 128, 2, 4> Tile128x128;  // 8 warps: large problems

// Fragment lane coordinates (PTX ISA: groupID and threadID_in_group).
struct Lane {
    int warp, g, t;
    __device__ __forceinline__ Lane() {
        const int tid = threadIdx.x;
        warp = tid >> 5;
        g = (tid & 31) >> 2;
        t = tid & 3;
    }
};

// ---- global -> shared tile loader -----------------------------------------------------
// Copies rows [row0, row0+ROWS) x bytes [col0*S, col0*S + ROW_BYTES) of a row-major matrix
// with `stride` elements per row into shared memory rows of ROW_BYTES + kSmemPad bytes.
// Out-of-range elements (row >= rows, col >= cols) become zero. With `aligned` (rows start
// on 16 bytes and `cols` is a multiple of 16 bytes) it issues 16-byte cp.async, else it
// falls back to element loads (ragged K, odd strides).
template <int ROWS, int ROW_BYTES, int THREADS, typename S>
__device__ __forceinline__ void load_tile(unsigned char* smem, const S* g, long long stride,
                                          int row0, int rows, long long col0, long long cols,
                                          bool aligned) {
    constexpr int kSmemRow = ROW_BYTES + kSmemPad;
    if (aligned) {
        constexpr int kChunks = ROW_BYTES / 16;
        constexpr int kPerChunk = 16 / (int)sizeof(S);
        for (int i = threadIdx.x; i < ROWS * kChunks; i += THREADS) {
            const int r = i / kChunks, c = i % kChunks;
            const long long col = col0 + (long long)c * kPerChunk;
            const bool ok = (row0 + r < rows) && (col < cols);
            const S* src = ok ? g + (long long)(row0 + r) * stride + col : g;
            cp_async_16(smem + r * kSmemRow + c * 16, src, ok ? 16 : 0);
        }
    } else {
        constexpr int kElems = ROW_BYTES / (int)sizeof(S);
        for (int i = threadIdx.x; i < ROWS * kElems; i += THREADS) {
            const int r = i / kElems, c = i % kElems;
            const long long col = col0 + c;
            const bool ok = (row0 + r < rows) && (col < cols);
            const S v = ok ? g[(long long)(row0 + r) * stride + col] : S(0);
            *reinterpret_cast<S*>(smem + r * kSmemRow + c * (int)sizeof(S)) = v;
        }
    }
}

template <typename S>
__device__ __forceinline__ S smem_load(const unsigned char* p, int byte_offset) {
    return *reinterpret_cast<const S*>(p + byte_offset);
}

// Quad-wide OR: every lane of a group of 4 ends with the OR of the 4 values.
__device__ __forceinline__ u32 quad_or(u32 v) {
    v |= sas_shfl_xor(v, 1);
    v |= sas_shfl_xor(v, 2);
    return v;
}

// The metadata register of selector 0 from per-lane nibbles: lane t of a quad knows the
// 4-bit entries of chunks t (nib_lo_*) and 4+t (nib_hi_*) for rows g (*_r0) and g+8 (*_r1).
// Lane 4g holds chunks 0..3, lane 4g+1 chunks 4..7; row g in bits 0-15, row g+8 in 16-31.
__device__ __forceinline__ u32 assemble_meta(int t, u32 nib_lo_r0, u32 nib_lo_r1, u32 nib_hi_r0,
                                             u32 nib_hi_r1) {
    const u32 lo = quad_or((nib_lo_r0 << (4 * t)) | (nib_lo_r1 << (16 + 4 * t)));
    const u32 hi = quad_or((nib_hi_r0 << (4 * t)) | (nib_hi_r1 << (16 + 4 * t)));
    return (t & 1) ? hi : lo;
}

// B fragment (dense, "col" layout: element (k, n) at row n, column k of the smem tile).
template <typename Tr>
__device__ __forceinline__ void load_b_fragment(u32 b[4], const unsigned char* row, int k0, int t) {
    if constexpr (Tr::kTf32) {
#pragma unroll
        for (int r = 0; r < 4; ++r)  // m16n8k16 tf32: k = t + 4r
            b[r] = cvt_rna_tf32(sas_bits_to_float(smem_load<u32>(row, (k0 + t + 4 * r) * 4)));
    } else {
#pragma unroll
        for (int r = 0; r < 4; ++r)  // m16n8k32: k = 2t + 8r, 2t + 8r + 1
            b[r] = smem_load<u32>(row, (k0 + 2 * t + 8 * r) * 2);
    }
}

// ---- epilogue ---------------------------------------------------------------------------
// acc holds the warp's (MT x NT) mma tiles; A-row a_row0 + ..., B-column b_col0 + ...
// SWS computes out^T (its A rows are output columns): TRANSPOSED writes out[b][a].
template <typename Tr, typename Cfg, bool TRANSPOSED>
__device__ __forceinline__ void store_tile(const GemmParams& p, float (&acc)[Cfg::MT][Cfg::NT][4],
                                           int a_row0, int b_col0, int a_rows, int b_cols,
                                           const Lane& ln) {
    typedef typename Tr::storage S;
    const S* bias = static_cast<const S*>(p.bias);
    const bool out_f32 = (p.flags & kFlagOutF32) != 0;
#pragma unroll
    for (int mt = 0; mt < Cfg::MT; ++mt)
#pragma unroll
        for (int nt = 0; nt < Cfg::NT; ++nt)
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                const int a = a_row0 + mt * 16 + ln.g + 8 * (i >> 1);
                const int b = b_col0 + nt * 8 + 2 * ln.t + (i & 1);
                if (a >= a_rows || b >= b_cols) continue;
                const int n = TRANSPOSED ? a : b;  // output column = weight row
                float v = acc[mt][nt][i];
                if (bias) v += Tr::to_float(bias[n]);
                const long long o = TRANSPOSED ? (long long)b * p.N + a : (long long)a * p.N + b;
                if (out_f32)
                    static_cast<float*>(p.out)[o] = v;
                else
                    static_cast<S*>(p.out)[o] = Tr::from_float(v);
            }
}

// Launch geometry published next to each kernel: {threads per block, dynamic smem bytes}.
// Python reads it from the cubin (cuModuleGetGlobal) or the emulator library (ctypes).
#define SAS_PUBLISH_LAUNCH(NAME, THREADS, SMEM) \
    extern "C" __device__ const int NAME##_launch[2] = {(THREADS), (SMEM)};
