// SWS GEMM: out[R, N] = x[R, K] @ unpack(packed)^T + bias, fp32 accumulation.
//
// The packed 1:M weight (runtime/packing.py, PackedSparseWeight) is the sparse operand A
// (rows = N): values [N, Kp/2] hold 2 entries per aligned group of 4 columns, meta
// [N, Kp/16] one uint16 per 4 groups, group j of a word in bits [4j, 4j+4) as
// i0 | i1 << 2 with i0 < i1. That is the row-major form of the mma.sp metadata, so a
// 16-bit fragment is a plain load. The activation is the dense operand B (element (k, r) =
// x[r, k]); the mma computes out^T, which the epilogue writes back transposed.
// float32 runs as tf32 m16n8k16, whose A is 1:2 per pair of columns: a group whose two
// entries sit in different pairs is one 1:2 chunk; when a warp meets a group with both
// entries in one pair it splits A into two 1:2 operands (first entries, second entries).
#include "gemm_common.cuh"

// tf32 chunk (pair) p of one row in the current mma step: `vals` / `word` are the step's
// values and metadata word. Returns the merged 1:2 register (when every group is 1:2
// compatible) and the two split registers (first / second stored entry).
struct Tf32Chunk {
    u32 merged, first, second;
    u32 nib_merged, nib_first, nib_second;
    bool compatible;
};

__device__ __forceinline__ Tf32Chunk sws_tf32_chunk(const unsigned char* vals, u32 word, int p) {
    const int q = p >> 1, h = p & 1;
    const u32 nib = (word >> (4 * q)) & 0xFu;
    const u32 i0 = nib & 3u, i1 = nib >> 2;
    const u32 v0 = cvt_rna_tf32(sas_bits_to_float(smem_load<u32>(vals, (2 * q) * 4)));
    const u32 v1 = cvt_rna_tf32(sas_bits_to_float(smem_load<u32>(vals, (2 * q + 1) * 4)));
    Tf32Chunk c;
    c.compatible = i0 < 2u && i1 >= 2u;
    c.merged = h ? v1 : v0;
    c.nib_merged = ((h ? i1 : i0) & 1u) ? 0xEu : 0x4u;
    c.first = ((int)(i0 >> 1) == h) ? v0 : 0u;
    c.nib_first = (i0 & 1u) ? 0xEu : 0x4u;
    c.second = ((int)(i1 >> 1) == h) ? v1 : 0u;
    c.nib_second = (i1 & 1u) ? 0xEu : 0x4u;
    return c;
}

template <typename Tr, typename Cfg>
__device__ __forceinline__ void sws_gemm_body(const GemmParams& p) {
    typedef typename Tr::storage S;
    constexpr int kWide = kStageRowBytes / Tr::kSize;  // wide (dense K) columns per stage
    constexpr int kValBytes = kStageRowBytes / 2;      // packed values per stage row
    constexpr int kVRow = kValBytes + kSmemPad;
    constexpr int kMetaWords = kWide / 16;              // uint16 metadata words per stage row
    constexpr int kBRow = kStageRowBytes + kSmemPad;
    constexpr int kStage = Cfg::BM * kVRow + Cfg::BM * kMetaWords * 2 + Cfg::BN * kBRow;

    unsigned char* smem = sas_shared_memory();
    const Lane ln;
    const int warp_m = ln.warp / Cfg::WARPS_N, warp_n = ln.warp % Cfg::WARPS_N;
    const int n0 = blockIdx.y * Cfg::BM;  // weight rows (output columns)
    const int r0 = blockIdx.x * Cfg::BN;  // activation rows
    const S* vals = static_cast<const S*>(p.a);
    const S* x = static_cast<const S*>(p.b);
    const u16* meta = static_cast<const u16*>(p.meta);
    const int meta_stride = p.Kp / 16;
    const int num_k = (p.Kp + kWide - 1) / kWide;
    const bool a_aligned = (p.flags & kFlagAAligned) != 0;
    const bool b_aligned = (p.flags & kFlagBAligned) != 0;

    auto load_stage = [&](int stage, int kt) {
        unsigned char* sv = smem + stage * kStage;
        u16* sm = reinterpret_cast<u16*>(sv + Cfg::BM * kVRow);
        unsigned char* sb = sv + Cfg::BM * kVRow + Cfg::BM * kMetaWords * 2;
        load_tile<Cfg::BM, kValBytes, Cfg::kThreads>(sv, vals, p.Kp / 2, n0, p.N,
                                                     (long long)kt * (kWide / 2), p.Kp / 2, a_aligned);
        // metadata is tiny and its rows are only 2-byte aligned: plain loads.
        // Outside the matrix it reads 0x8888 (entries at 0 and 2, values 0): valid for
        // both mma.sp forms, where zero-filled metadata would be undefined.
        for (int i = threadIdx.x; i < Cfg::BM * kMetaWords; i += Cfg::kThreads) {
            const int r = i / kMetaWords, c = i % kMetaWords;
            const int gw = kt * kMetaWords + c;
            const bool ok = (n0 + r < p.N) && (gw < meta_stride);
            sm[i] = ok ? meta[(long long)(n0 + r) * meta_stride + gw] : (u16)0x8888u;
        }
        load_tile<Cfg::BN, kStageRowBytes, Cfg::kThreads>(sb, x, p.K, r0, p.R, (long long)kt * kWide,
                                                          p.K, b_aligned);
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
        cp_async_wait<1>();
        __syncthreads();

        const unsigned char* sv = smem + (kt & 1) * kStage;
        const u16* sm = reinterpret_cast<const u16*>(sv + Cfg::BM * kVRow);
        const unsigned char* sb = sv + Cfg::BM * kVRow + Cfg::BM * kMetaWords * 2;
#pragma unroll
        for (int ks = 0; ks < kWide / Tr::kKStep; ++ks) {
            u32 b[Cfg::NT][4];
#pragma unroll
            for (int nt = 0; nt < Cfg::NT; ++nt)
                load_b_fragment<Tr>(b[nt], sb + (warp_n * Cfg::WTN + nt * 8 + ln.g) * kBRow,
                                    ks * Tr::kKStep, ln.t);
#pragma unroll
            for (int mt = 0; mt < Cfg::MT; ++mt) {
                const int ra = warp_m * Cfg::WTM + mt * 16 + ln.g, rb = ra + 8;
                u32 a[4];
                if constexpr (!Tr::kTf32) {
                    // compressed columns of this m16n8k32 step: 16 values, 2 metadata words
                    const int v0 = ks * 16 * 2;
                    a[0] = smem_load<u32>(sv + ra * kVRow, v0 + 4 * ln.t);
                    a[1] = smem_load<u32>(sv + rb * kVRow, v0 + 4 * ln.t);
                    a[2] = smem_load<u32>(sv + ra * kVRow, v0 + 16 + 4 * ln.t);
                    a[3] = smem_load<u32>(sv + rb * kVRow, v0 + 16 + 4 * ln.t);
                    const int mw = ks * 2 + (ln.t & 1);
                    const u32 e = u32(sm[ra * kMetaWords + mw]) | (u32(sm[rb * kMetaWords + mw]) << 16);
#pragma unroll
                    for (int nt = 0; nt < Cfg::NT; ++nt) Tr::mma(acc[mt][nt], a, b[nt], e);
                } else {
                    // m16n8k16 tf32 step: 8 values, 1 metadata word (4 groups = 8 pairs) per row
                    const unsigned char* va = sv + ra * kVRow + ks * 8 * 4;
                    const unsigned char* vb = sv + rb * kVRow + ks * 8 * 4;
                    const u32 wa = sm[ra * kMetaWords + ks], wb = sm[rb * kMetaWords + ks];
                    const Tf32Chunk c0 = sws_tf32_chunk(va, wa, ln.t);
                    const Tf32Chunk c1 = sws_tf32_chunk(vb, wb, ln.t);
                    const Tf32Chunk c2 = sws_tf32_chunk(va, wa, 4 + ln.t);
                    const Tf32Chunk c3 = sws_tf32_chunk(vb, wb, 4 + ln.t);
                    const bool mine = c0.compatible && c1.compatible && c2.compatible && c3.compatible;
                    if (sas_warp_all(mine)) {
                        a[0] = c0.merged; a[1] = c1.merged; a[2] = c2.merged; a[3] = c3.merged;
                        const u32 e = assemble_meta(ln.t, c0.nib_merged, c1.nib_merged,
                                                    c2.nib_merged, c3.nib_merged);
#pragma unroll
                        for (int nt = 0; nt < Cfg::NT; ++nt) Tr::mma(acc[mt][nt], a, b[nt], e);
                    } else {
                        a[0] = c0.first; a[1] = c1.first; a[2] = c2.first; a[3] = c3.first;
                        const u32 e1 = assemble_meta(ln.t, c0.nib_first, c1.nib_first,
                                                     c2.nib_first, c3.nib_first);
#pragma unroll
                        for (int nt = 0; nt < Cfg::NT; ++nt) Tr::mma(acc[mt][nt], a, b[nt], e1);
                        a[0] = c0.second; a[1] = c1.second; a[2] = c2.second; a[3] = c3.second;
                        const u32 e2 = assemble_meta(ln.t, c0.nib_second, c1.nib_second,
                                                     c2.nib_second, c3.nib_second);
#pragma unroll
                        for (int nt = 0; nt < Cfg::NT; ++nt) Tr::mma(acc[mt][nt], a, b[nt], e2);
                    }
                }
            }
        }
        __syncthreads();
    }

    store_tile<Tr, Cfg, true>(p, acc, n0 + warp_m * Cfg::WTM, r0 + warp_n * Cfg::WTN, p.N, p.R, ln);
}

template <typename Tr, typename Cfg>
__host__ __device__ constexpr int sws_smem_bytes() {
    return 2 * (Cfg::BM * (kStageRowBytes / 2 + kSmemPad) + Cfg::BM * (kStageRowBytes / Tr::kSize / 16) * 2 +
                Cfg::BN * (kStageRowBytes + kSmemPad));
}

#define SWS_GEMM_KERNEL(NAME, TR, CFG)                                                      \
    extern "C" __global__ void __launch_bounds__(CFG::kThreads) NAME(const GemmParams p) { \
        sws_gemm_body<TR, CFG>(p);                                                          \
    }                                                                                       \
    SAS_PUBLISH_LAUNCH(NAME, CFG::kThreads, (sws_smem_bytes<TR, CFG>()))

SWS_GEMM_KERNEL(sws_gemm_f16_64x64, F16, Tile64x64)
SWS_GEMM_KERNEL(sws_gemm_bf16_64x64, BF16, Tile64x64)
SWS_GEMM_KERNEL(sws_gemm_f32_64x64, F32, Tile64x64)
SWS_GEMM_KERNEL(sws_gemm_f16_128x128, F16, Tile128x128)
SWS_GEMM_KERNEL(sws_gemm_bf16_128x128, BF16, Tile128x128)
SWS_GEMM_KERNEL(sws_gemm_f32_128x128, F32, Tile128x128)
