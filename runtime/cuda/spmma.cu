// Sparse GEMM on a pre-compressed 2:4 (16-bit) or 1:2 (tf32) operand A with the warp-level
// `mma.sp` of Ampere and newer (sm_80+):
//     normal (SAS):      out[a][b] = sum_k A[a][k] * B[b][k] + bias[b]
//     transposed (SWS):  out[b][a] = sum_k A[a][k] * B[b][k] + bias[a]
// A is the compressed operand of sparse_common.cuh (SAS: S(x) written by sas_compress;
// SWS: the packed weight), B is dense and row-major with K contiguous (SAS: the wide
// weight [N, M*K]; SWS: x [R, K]); fp32 accumulation.
//
// Per CTA: a BM x BN tile, WARPS_M x WARPS_N warps of (BM/WARPS_M) x (BN/WARPS_N), a
// STAGES-deep cp.async pipeline of k-tiles (128 bytes of B per row: 64 wide columns for
// 16-bit types) in swizzled shared memory, operands read with ldmatrix.x4 (conflict-free by
// the swizzle), the metadata of a k-tile read once per warp and m-tile (one 64-bit load for
// both k-steps), and an epilogue that stages the tile in shared memory for 16-byte stores.
// No per-MMA work besides the fragment loads: the projection of SAS happened once, in
// sas_compress.
#include "sparse_common.cuh"

template <int BM_, int BN_, int WARPS_M_, int WARPS_N_, int STAGES_, int MIN_BLOCKS_>
struct MmaTile {
    static constexpr int BM = BM_, BN = BN_, WARPS_M = WARPS_M_, WARPS_N = WARPS_N_, STAGES = STAGES_;
    static constexpr int kMinBlocks = MIN_BLOCKS_;  // CTAs per SM the tile is sized for
    static constexpr int kThreads = 32 * WARPS_M * WARPS_N;
    static constexpr int WTM = BM / WARPS_M, WTN = BN / WARPS_N;  // warp tile
    static constexpr int MT = WTM / 16, NT = WTN / 8;             // mma tiles per warp
    static constexpr int kBStage = BN * kKTileBytesB;             // stage layout: B | A | metadata
    static constexpr int kAStage = BM * kKTileBytesA;
    static constexpr int kMStage = BM / 16 * kMetaTileBytes;
    static constexpr int kStage = kBStage + kAStage + kMStage;
    static constexpr int kPipeline = STAGES * kStage;
    static constexpr int kStaging = BM * BN * 4;  // the epilogue's fp32 output tile
    static constexpr int kSmem = kPipeline > kStaging ? kPipeline : kStaging;
    static_assert(WTM % 16 == 0 && WTN % 8 == 0, "warp tile must be a multiple of the mma tile");
    static_assert(kRowPad % BM == 0, "compressed operands are padded to whole A tiles");
};

typedef MmaTile<64, 64, 2, 2, 3, 4> MmaTile64x64;      // 4 warps of 32x32: small problems
typedef MmaTile<128, 128, 2, 2, 3, 2> MmaTile128x128;  // 4 warps of 64x64: the main tile
// 8 warps of 64x64: the large tile of the best Ampere kernels; its fp32 accumulators alone
// (128 x 256 x 4 bytes) are half the register file, so 1 CTA per SM
typedef MmaTile<128, 256, 2, 4, 3, 1> MmaTile128x256;

// CTA -> (A tile, B tile), grouped by 8 A tiles so that the CTAs resident at one time share
// few A tiles and sweep B (better L2 reuse than row-major order); 1-D grid.
template <int BM, int BN>
__device__ __forceinline__ void tile_of_block(const SpGemmParams& p, int& tile_a, int& tile_b) {
    constexpr int kGroup = 8;
    const int num_a = (p.rows_a + BM - 1) / BM, num_b = (p.rows_b + BN - 1) / BN;
    const int pid = blockIdx.x, per_group = kGroup * num_b;
    const int first_a = (pid / per_group) * kGroup;
    const int group_size = min(num_a - first_a, kGroup);
    tile_a = (first_a + (pid % per_group) % group_size) * BM;
    tile_b = ((pid % per_group) / group_size) * BN;
}

template <typename Tr, typename Cfg, bool TRANSPOSED>
__device__ __forceinline__ void spmma_body(const SpGemmParams& p) {
    constexpr int BM = Cfg::BM, BN = Cfg::BN, MT = Cfg::MT, NT = Cfg::NT, STAGES = Cfg::STAGES;
    const Lane ln;
    const u32 smem = sas_smem_base();
    const int warp_m = ln.warp / Cfg::WARPS_N, warp_n = ln.warp % Cfg::WARPS_N;
    int tile_a, tile_b;
    tile_of_block<BM, BN>(p, tile_a, tile_b);
    const TileLoader<Tr, BM, BN, Cfg::kThreads> loader(p, tile_a, tile_b, ln.tid);

    // this lane's ldmatrix row addresses (k-step s in 0, 1) and metadata word, stage-relative
    const int lr = ln.lane & 7;
    const int a_row = warp_m * Cfg::WTM + lr + 8 * ((ln.lane >> 3) & 1);
    const int b_row = warp_n * Cfg::WTN + lr;
    u32 a_off[2], b_off[2];
#pragma unroll
    for (int s = 0; s < 2; ++s) {
        a_off[s] = Cfg::kBStage + a_tile_offset(a_row, 2 * s + (ln.lane >> 4));
        b_off[s] = b_tile_offset(b_row, 4 * s + (ln.lane >> 3));
    }
    const u32 m_off = Cfg::kBStage + Cfg::kAStage + warp_m * MT * kMetaTileBytes + (ln.g * 2 + (ln.t & 1)) * 8;

    float acc[MT][NT][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
            for (int i = 0; i < 4; ++i) acc[mt][nt][i] = 0.f;

    // the main loop, specialised on how B is copied (aligned rows: cp.async)
    auto mainloop = [&](auto vec_tag) {
        constexpr bool VEC = decltype(vec_tag)::value != 0;
        const int ktiles = p.ktiles;
        KCursor load_at;  // next k-tile to copy
#pragma unroll
        for (int s = 0; s < STAGES - 1; ++s) {
            issue_ktile<VEC, Cfg>(loader, p, load_at, smem + s * Cfg::kStage, ln.tid);
        }
        int read_stage = 0, write_stage = STAGES - 1;
        for (int kt = 0; kt < ktiles; ++kt) {
            cp_async_wait<STAGES - 2>();  // k-tile kt has landed (this thread's copies) ...
            __syncthreads();              // ... and everyone's; stage write_stage is free again
            issue_ktile<VEC, Cfg>(loader, p, load_at, smem + write_stage * Cfg::kStage, ln.tid);

            const u32 base = smem + read_stage * Cfg::kStage;
            u32x2 meta[MT];  // both k-steps of the k-tile, one load per m-tile
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) meta[mt] = lds64(base + m_off + mt * kMetaTileBytes);
#pragma unroll
            for (int s = 0; s < 2; ++s) {
                u32 a[MT][4];
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) ldmatrix_x4(a[mt], base + a_off[s] + mt * 16 * kKTileBytesA);
#pragma unroll
                for (int nt = 0; nt < NT; ++nt) {
                    u32 b[4];
                    ldmatrix_x4(b, base + b_off[s] + nt * 8 * kKTileBytesB);
                    if constexpr (Tr::kTf32) {
#pragma unroll
                        for (int i = 0; i < 4; ++i) b[i] = cvt_rna_tf32(sas_bits_to_float(b[i]));
                    }
#pragma unroll
                    for (int mt = 0; mt < MT; ++mt) Tr::mma(acc[mt][nt], a[mt], b, s ? meta[mt].y : meta[mt].x);
                }
            }
            read_stage = read_stage + 1 == STAGES ? 0 : read_stage + 1;
            write_stage = write_stage + 1 == STAGES ? 0 : write_stage + 1;
        }
    };
    if (p.flags & kFlagBVec)
        mainloop(IntConst<1>{});
    else
        mainloop(IntConst<0>{});

    cp_async_wait<0>();
    __syncthreads();  // every warp is done reading the pipeline: reuse it for the output tile
    stage_fragments<Tr, BM, BN, MT, NT, TRANSPOSED>(p, smem, acc, warp_m * Cfg::WTM, warp_n * Cfg::WTN, tile_a,
                                                    tile_b, ln);
    __syncthreads();
    store_staged<Tr, BM, BN, Cfg::kThreads, TRANSPOSED>(p, smem, tile_a, tile_b, ln.tid);
}

#define SPMMA_KERNEL(NAME, TR, CFG, TRANSPOSED) SAS_SPARSE_GEMM_KERNEL(NAME, spmma_body, TR, CFG, TRANSPOSED)

SPMMA_KERNEL(spmma_f16_64x64_sas, F16, MmaTile64x64, false)
SPMMA_KERNEL(spmma_bf16_64x64_sas, BF16, MmaTile64x64, false)
SPMMA_KERNEL(spmma_f32_64x64_sas, F32, MmaTile64x64, false)
SPMMA_KERNEL(spmma_f16_128x128_sas, F16, MmaTile128x128, false)
SPMMA_KERNEL(spmma_bf16_128x128_sas, BF16, MmaTile128x128, false)
SPMMA_KERNEL(spmma_f32_128x128_sas, F32, MmaTile128x128, false)
SPMMA_KERNEL(spmma_f16_128x256_sas, F16, MmaTile128x256, false)
SPMMA_KERNEL(spmma_bf16_128x256_sas, BF16, MmaTile128x256, false)
SPMMA_KERNEL(spmma_f16_64x64_sws, F16, MmaTile64x64, true)
SPMMA_KERNEL(spmma_bf16_64x64_sws, BF16, MmaTile64x64, true)
SPMMA_KERNEL(spmma_f32_64x64_sws, F32, MmaTile64x64, true)
SPMMA_KERNEL(spmma_f16_128x128_sws, F16, MmaTile128x128, true)
SPMMA_KERNEL(spmma_bf16_128x128_sws, BF16, MmaTile128x128, true)
SPMMA_KERNEL(spmma_f32_128x128_sws, F32, MmaTile128x128, true)
SPMMA_KERNEL(spmma_f16_128x256_sws, F16, MmaTile128x256, true)
SPMMA_KERNEL(spmma_bf16_128x256_sws, BF16, MmaTile128x256, true)
