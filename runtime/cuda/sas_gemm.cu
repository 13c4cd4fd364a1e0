// Fused SAS GEMM: out[R, N] = S(x)[R, M*K] @ weight[N, M*K]^T + bias, fp32 accumulation.
//
// The projected activation S(x) is the sparse operand A of `mma.sp` and never exists in
// memory: the A tile holds the narrow x, and each A fragment register plus its 2-bit
// metadata are computed in registers from x while the fragment is read.
//   M = 2, 16-bit: a wide group of 4 columns is 2 channels x 2 slots, exactly 2 nonzeros;
//     the compressed pair is (|x_2q|, |x_2q+1|) and the indices are ([x_2q <= 0],
//     2 + [x_2q+1 <= 0]).
//   M = 4, 16-bit: a wide group of 4 is one channel's 4 slots: 2:4 with one explicit zero.
//   tf32 (float32 inputs, 1:2 per pair of wide columns): M = 2 is one channel per pair;
//     M = 4 puts the channel's value in the pair that holds its slot and 0 in the other.
// The weight (B) is read as stored, wide and row-major: element (k, n) = weight[n, k].
#include "gemm_common.cuh"

__device__ __forceinline__ bool nonpos16(u32 h) { return (h & 0x8000u) || (h & 0x7fffu) == 0; }
__device__ __forceinline__ bool nonpos32(u32 f) { return (f & 0x80000000u) || (f & 0x7fffffffu) == 0; }

// Register of chunk j (a group of 4 wide columns for 16-bit, a pair for tf32) of one A row
// in the current mma step, and its metadata nibble. `row` is the smem row of narrow x,
// `cb` the step's first channel in the tile, `gcb` the same channel's global index.
template <typename Tr, int M>
__device__ __forceinline__ u32 sas_a_chunk(const unsigned char* row, int j, int cb, int gcb, int K,
                                           u32& nib) {
    if constexpr (!Tr::kTf32 && M == 2) {
        // channels cb+2j, cb+2j+1; x <= 0 only differs from the sign bit at +0, whose value is 0
        const u32 w = smem_load<u32>(row, (cb + 2 * j) * 2);
        nib = 0x8u | ((w >> 15) & 1u) | (((w >> 31) & 1u) << 2);
        return w & 0x7fff7fffu;
    } else if constexpr (!Tr::kTf32 && M == 4) {
        const int c = cb + j, even = (gcb + j) & ~1;  // channel pair (2g, 2g+1) shares the slot
        const u32 w = smem_load<u32>(row, (c & ~1) * 2);
        const u32 lo = w & 0xffffu, hi = w >> 16;
        // a last partial group (K odd) uses only its own bit
        const u32 I = (nonpos16(lo) ? 1u : 0u) | ((nonpos16(hi) && even + 1 < K) ? 2u : 0u);
        const u32 v = ((j & 1) ? hi : lo) & 0x7fffu;
        if (I < 3u) {
            nib = I | ((I + 1u) << 2);
            return v;
        }
        nib = 0xEu;  // indices (2, 3): the explicit zero goes first
        return v << 16;
    } else if constexpr (Tr::kTf32 && M == 2) {
        const u32 f = smem_load<u32>(row, (cb + j) * 4);
        nib = (f >> 31) ? 0xEu : 0x4u;  // 1:2 in 2:4 terms: pair index 0 -> 0b0100, 1 -> 0b1110
        return cvt_rna_tf32(sas_bits_to_float(f & 0x7fffffffu));
    } else {  // tf32, M == 4: pairs 2c, 2c+1 are the slots {0,1} and {2,3} of channel c
        const int c = cb + (j >> 1), h = j & 1, even = (gcb + (j >> 1)) & ~1;
        const u32 fe = smem_load<u32>(row, (c & ~1) * 4);
        const u32 fo = smem_load<u32>(row, (c | 1) * 4);
        const u32 I = (nonpos32(fe) ? 1u : 0u) | ((nonpos32(fo) && even + 1 < K) ? 2u : 0u);
        const u32 f = (c & 1) ? fo : fe;
        nib = (I & 1u) ? 0xEu : 0x4u;
        return ((int)(I >> 1) == h) ? cvt_rna_tf32(sas_bits_to_float(f & 0x7fffffffu)) : 0u;
    }
}

template <typename Tr, int M, typename Cfg>
__device__ __forceinline__ void sas_gemm_body(const GemmParams& p) {
    static_assert(M == 2 || M == 4, "the fused SAS kernel handles M = 2 and M = 4");
    typedef typename Tr::storage S;
    constexpr int kWide = kStageRowBytes / Tr::kSize;     // wide columns per stage
    constexpr int kNarrow = kWide / M;                    // channels per stage
    constexpr int kStepNarrow = Tr::kKStep / M;           // channels per mma step
    constexpr int kARowBytes = kNarrow * Tr::kSize;
    constexpr int kARow = kARowBytes + kSmemPad;
    constexpr int kBRow = kStageRowBytes + kSmemPad;
    constexpr int kStage = Cfg::BM * kARow + Cfg::BN * kBRow;

    unsigned char* smem = sas_shared_memory();
    const Lane ln;
    const int warp_m = ln.warp / Cfg::WARPS_N, warp_n = ln.warp % Cfg::WARPS_N;
    const int m0 = blockIdx.x * Cfg::BM, n0 = blockIdx.y * Cfg::BN;
    const S* x = static_cast<const S*>(p.a);
    const S* w = static_cast<const S*>(p.b);
    const long long Kw = (long long)M * p.K;
    const int num_k = (int)((Kw + kWide - 1) / kWide);
    const bool a_aligned = (p.flags & kFlagAAligned) != 0;
    const bool b_aligned = (p.flags & kFlagBAligned) != 0;

    auto load_stage = [&](int stage, int kt) {
        unsigned char* sa = smem + stage * kStage;
        unsigned char* sb = sa + Cfg::BM * kARow;
        load_tile<Cfg::BM, kARowBytes, Cfg::kThreads>(sa, x, p.K, m0, p.R, (long long)kt * kNarrow,
                                                      p.K, a_aligned);
        load_tile<Cfg::BN, kStageRowBytes, Cfg::kThreads>(sb, w, Kw, n0, p.N, (long long)kt * kWide,
                                                          Kw, b_aligned);
    };

    float acc[Cfg::MT][Cfg::NT][4];
#pragma unroll
    for (int mt = 0; mt < Cfg::MT; ++mt)
#pragma unroll
        for (int nt = 0; nt < Cfg::NT; ++nt)
#pragma unroll
            for (int i = 0; i < 4; ++i) acc[mt][nt][i] = 0.f;

    load_stage(0, 0);
    cp_async_commit();
    for (int kt = 0; kt < num_k; ++kt) {
        if (kt + 1 < num_k) load_stage((kt + 1) & 1, kt + 1);
        cp_async_commit();
        cp_async_wait<1>();  // stage kt has landed; stage kt+1 stays in flight
        __syncthreads();

        const unsigned char* sa = smem + (kt & 1) * kStage;
        const unsigned char* sb = sa + Cfg::BM * kARow;
#pragma unroll
        for (int ks = 0; ks < kWide / Tr::kKStep; ++ks) {
            const int cb = ks * kStepNarrow;
            const int gcb = kt * kNarrow + cb;
            u32 a[Cfg::MT][4], meta[Cfg::MT];
#pragma unroll
            for (int mt = 0; mt < Cfg::MT; ++mt) {
                const int r0 = warp_m * Cfg::WTM + mt * 16 + ln.g;
                const unsigned char* row0 = sa + r0 * kARow;
                const unsigned char* row1 = row0 + 8 * kARow;
                u32 n0r0, n0r1, n1r0, n1r1;
                a[mt][0] = sas_a_chunk<Tr, M>(row0, ln.t, cb, gcb, p.K, n0r0);
                a[mt][1] = sas_a_chunk<Tr, M>(row1, ln.t, cb, gcb, p.K, n0r1);
                a[mt][2] = sas_a_chunk<Tr, M>(row0, 4 + ln.t, cb, gcb, p.K, n1r0);
                a[mt][3] = sas_a_chunk<Tr, M>(row1, 4 + ln.t, cb, gcb, p.K, n1r1);
                meta[mt] = assemble_meta(ln.t, n0r0, n0r1, n1r0, n1r1);
            }
#pragma unroll
            for (int nt = 0; nt < Cfg::NT; ++nt) {
                u32 b[4];
                load_b_fragment<Tr>(b, sb + (warp_n * Cfg::WTN + nt * 8 + ln.g) * kBRow,
                                    ks * Tr::kKStep, ln.t);
#pragma unroll
                for (int mt = 0; mt < Cfg::MT; ++mt) Tr::mma(acc[mt][nt], a[mt], b, meta[mt]);
            }
        }
        __syncthreads();  // the next iteration overwrites this stage
    }

    store_tile<Tr, Cfg, false>(p, acc, m0 + warp_m * Cfg::WTM, n0 + warp_n * Cfg::WTN, p.R, p.N, ln);
}

template <typename Tr, int M, typename Cfg>
__host__ __device__ constexpr int sas_smem_bytes() {
    return 2 * (Cfg::BM * (kStageRowBytes / Tr::kSize / M * Tr::kSize + kSmemPad) +
                Cfg::BN * (kStageRowBytes + kSmemPad));
}

#define SAS_GEMM_KERNEL(NAME, TR, M, CFG)                                                   \
    extern "C" __global__ void __launch_bounds__(CFG::kThreads) NAME(const GemmParams p) { \
        sas_gemm_body<TR, M, CFG>(p);                                                       \
    }                                                                                       \
    SAS_PUBLISH_LAUNCH(NAME, CFG::kThreads, (sas_smem_bytes<TR, M, CFG>()))

SAS_GEMM_KERNEL(sas_gemm_f16_m2_64x64, F16, 2, Tile64x64)
SAS_GEMM_KERNEL(sas_gemm_f16_m4_64x64, F16, 4, Tile64x64)
SAS_GEMM_KERNEL(sas_gemm_bf16_m2_64x64, BF16, 2, Tile64x64)
SAS_GEMM_KERNEL(sas_gemm_bf16_m4_64x64, BF16, 4, Tile64x64)
SAS_GEMM_KERNEL(sas_gemm_f32_m2_64x64, F32, 2, Tile64x64)
SAS_GEMM_KERNEL(sas_gemm_f32_m4_64x64, F32, 4, Tile64x64)
SAS_GEMM_KERNEL(sas_gemm_f16_m2_128x128, F16, 2, Tile128x128)
SAS_GEMM_KERNEL(sas_gemm_f16_m4_128x128, F16, 4, Tile128x128)
SAS_GEMM_KERNEL(sas_gemm_bf16_m2_128x128, BF16, 2, Tile128x128)
SAS_GEMM_KERNEL(sas_gemm_bf16_m4_128x128, BF16, 4, Tile128x128)
SAS_GEMM_KERNEL(sas_gemm_f32_m2_128x128, F32, 2, Tile128x128)
SAS_GEMM_KERNEL(sas_gemm_f32_m4_128x128, F32, 4, Tile128x128)
