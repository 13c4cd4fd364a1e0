// The sparse GEMM of spmma.cu on Hopper (sm_90a): warpgroup-level `wgmma.mma_async.sp`
// with both operands read by the tensor cores straight from shared memory through matrix
// descriptors (the swizzled k-tiles of sparse_common.cuh ARE the wgmma K-major layouts:
// A with the 64-byte swizzle, B with the 128-byte swizzle), the metadata in registers.
//
// Per CTA: a 128 x BN tile, two warpgroups (256 threads), each computing 64 x BN with one
// m64nBNk32 instruction per k-step (two per k-tile); STAGES k-tiles in flight through
// cp.async (every thread loads; after its copies land it fences them to the async proxy);
// wgmma groups overlap one k-tile (wait_group 1), so a stage is refilled only after every
// warpgroup's wgmma on it completed. Same compressed operand, same epilogue as spmma.cu.
#include "sparse_common.cuh"
#include "sas_wgmma.cuh"

template <int BN_, int STAGES_, int MIN_BLOCKS_>
struct WgTile {
    static constexpr int BM = 128, BN = BN_, STAGES = STAGES_, kMinBlocks = MIN_BLOCKS_;
    static constexpr int kWarpgroups = BM / 64;
    static constexpr int kThreads = 128 * kWarpgroups;
    static constexpr int kBStage = BN * kKTileBytesB;  // stage layout: B | A | metadata, 1 KiB aligned
    static constexpr int kAStage = BM * kKTileBytesA;
    static constexpr int kMStage = BM / 16 * kMetaTileBytes;
    static constexpr int kStage = kBStage + kAStage + kMStage;
    static constexpr int kPipeline = STAGES * kStage;
    static constexpr int kStaging = BM * BN * 4;
    static constexpr int kAlign = 1024;  // the 128-byte swizzle repeats every 1 KiB
    static constexpr int kSmem = (kPipeline > kStaging ? kPipeline : kStaging) + kAlign;
    static_assert(kStage % kAlign == 0 && kBStage % kAlign == 0, "stages and tiles stay 1 KiB aligned");
    static_assert(STAGES >= 3, "one stage computing, one in the tensor cores, one landing");
};

typedef WgTile<128, 4, 2> WgTile128x128;  // 2 CTAs per SM
typedef WgTile<256, 4, 1> WgTile128x256;  // 1 CTA per SM (its accumulators fill half the RF)

// Shared-memory matrix descriptor (PTX ISA "Matrix Descriptor Format"): start address,
// leading and stride byte offsets (16-byte units), swizzle mode in bits 62-63
// (1: 128-byte, 2: 64-byte); base offset 0 (the tiles start on their pattern boundary).
__device__ __forceinline__ u64 smem_desc(u32 addr, u32 lbo, u32 sbo, u32 mode) {
    return u64((addr & 0x3FFFFu) >> 4) | (u64((lbo & 0x3FFFFu) >> 4) << 16) | (u64((sbo & 0x3FFFFu) >> 4) << 32) |
           (u64(mode) << 62);
}

template <int BN, typename Tr>
__device__ __forceinline__ void wgmma_sp(float (&d)[BN / 2], u64 da, u64 db, u32 meta) {
    static_assert(BN == 128 || BN == 256, "wgmma.sp wrappers exist for N = 128 and 256");
    if constexpr (BN == 128 && Tr::kIsBf16) wgmma_sp_m64n128k32_bf16(d, da, db, meta);
    if constexpr (BN == 128 && !Tr::kIsBf16) wgmma_sp_m64n128k32_f16(d, da, db, meta);
    if constexpr (BN == 256 && Tr::kIsBf16) wgmma_sp_m64n256k32_bf16(d, da, db, meta);
    if constexpr (BN == 256 && !Tr::kIsBf16) wgmma_sp_m64n256k32_f16(d, da, db, meta);
}

// CTA -> (A tile, B tile), grouped by 8 A tiles (see spmma.cu).
template <int BM, int BN>
__device__ __forceinline__ void wg_tile_of_block(const SpGemmParams& p, int& tile_a, int& tile_b) {
    constexpr int kGroup = 8;
    const int num_a = (p.rows_a + BM - 1) / BM, num_b = (p.rows_b + BN - 1) / BN;
    const int pid = blockIdx.x, per_group = kGroup * num_b;
    const int first_a = (pid / per_group) * kGroup;
    const int group_size = min(num_a - first_a, kGroup);
    tile_a = (first_a + (pid % per_group) % group_size) * BM;
    tile_b = ((pid % per_group) / group_size) * BN;
}

template <typename Tr, typename Cfg, bool TRANSPOSED>
__device__ __forceinline__ void spwgmma_body(const SpGemmParams& p) {
    static_assert(!Tr::kTf32, "the wgmma kernels take float16 / bfloat16");
    constexpr int BM = Cfg::BM, BN = Cfg::BN, STAGES = Cfg::STAGES;
    const Lane ln;
    const u32 smem = (sas_smem_base() + Cfg::kAlign - 1) & ~u32(Cfg::kAlign - 1);
    const int wg = ln.warp / 4, wid = ln.warp % 4;  // warpgroup, warp inside it
    int tile_a, tile_b;
    wg_tile_of_block<BM, BN>(p, tile_a, tile_b);
    const TileLoader<Tr, BM, BN, Cfg::kThreads> loader(p, tile_a, tile_b, ln.tid);
    // this thread's metadata word: rows wg*64 + wid*16 + (g, g+8) of the tile
    const u32 m_off = Cfg::kBStage + Cfg::kAStage + (wg * 4 + wid) * kMetaTileBytes + (ln.g * 2 + (ln.t & 1)) * 8;

    float acc[BN / 2];
#pragma unroll
    for (int i = 0; i < BN / 2; ++i) acc[i] = 0.f;

    // One main loop, B copied by cp.async: the host launches this kernel only when B's rows
    // are 16-byte aligned (kFlagBVec); ragged problems run spmma (a second copy of the loop
    // here would make ptxas serialize the wgmma pipeline). Without the flag: no output.
    if (!(p.flags & kFlagBVec)) return;
    {
        constexpr bool VEC = true;
        const int ktiles = p.ktiles;
        KCursor load_at;  // next k-tile to copy
#pragma unroll
        for (int s = 0; s < STAGES - 2; ++s) {
            issue_ktile<VEC, Cfg>(loader, p, load_at, smem + s * Cfg::kStage, ln.tid);
        }
        int read_stage = 0, write_stage = STAGES - 2;
        for (int kt = 0; kt < ktiles; ++kt) {
            cp_async_wait<STAGES - 3>();  // k-tile kt has landed (this thread's copies)
            fence_proxy_async();          // ... and is visible to the tensor cores' async proxy
            __syncthreads();              // everyone's copies; every wgmma group <= kt-2 completed
            issue_ktile<VEC, Cfg>(loader, p, load_at, smem + write_stage * Cfg::kStage, ln.tid);

            const u32 base = smem + read_stage * Cfg::kStage;
            const u32x2 meta = lds64(base + m_off);
            const u32 a_tile = base + Cfg::kBStage + wg * 64 * kKTileBytesA;
#pragma unroll
            for (int i = 0; i < BN / 2; ++i) wgmma_fence_operand(acc[i]);
            wgmma_fence();
#pragma unroll
            for (int s = 0; s < 2; ++s) {
                // A: 64 rows x 32 bytes of this k-step, 64-byte swizzle, 8-row groups 512 B apart;
                // B: BN rows x 64 bytes, 128-byte swizzle, 8-row groups 1 KiB apart
                const u64 da = smem_desc(a_tile + s * 32, 16, 8 * kKTileBytesA, 2);
                const u64 db = smem_desc(base + s * 64, 16, 8 * kKTileBytesB, 1);
                wgmma_sp<BN, Tr>(acc, da, db, s ? meta.y : meta.x);
            }
            wgmma_commit();
            wgmma_wait<1>();  // the previous k-tile's group is done
#pragma unroll
            for (int i = 0; i < BN / 2; ++i) wgmma_fence_operand(acc[i]);
            read_stage = read_stage + 1 == STAGES ? 0 : read_stage + 1;
            write_stage = write_stage + 1 == STAGES ? 0 : write_stage + 1;
        }
    }
    wgmma_wait<0>();
#pragma unroll
    for (int i = 0; i < BN / 2; ++i) wgmma_fence_operand(acc[i]);
    cp_async_wait<0>();
    __syncthreads();  // the pipeline's shared memory becomes the output tile
    float(&frag)[1][BN / 8][4] = *reinterpret_cast<float(*)[1][BN / 8][4]>(&acc);
    stage_fragments<Tr, BM, BN, 1, BN / 8, TRANSPOSED>(p, smem, frag, wg * 64 + wid * 16, 0, tile_a, tile_b, ln);
    __syncthreads();
    store_staged<Tr, BM, BN, Cfg::kThreads, TRANSPOSED>(p, smem, tile_a, tile_b, ln.tid);
}

#define SPWGMMA_KERNEL(NAME, TR, CFG, TRANSPOSED) SAS_SPARSE_GEMM_KERNEL(NAME, spwgmma_body, TR, CFG, TRANSPOSED)

SPWGMMA_KERNEL(spwgmma_f16_128x128_sas, F16, WgTile128x128, false)
SPWGMMA_KERNEL(spwgmma_bf16_128x128_sas, BF16, WgTile128x128, false)
SPWGMMA_KERNEL(spwgmma_f16_128x256_sas, F16, WgTile128x256, false)
SPWGMMA_KERNEL(spwgmma_bf16_128x256_sas, BF16, WgTile128x256, false)
SPWGMMA_KERNEL(spwgmma_f16_128x128_sws, F16, WgTile128x128, true)
SPWGMMA_KERNEL(spwgmma_bf16_128x128_sws, BF16, WgTile128x128, true)
SPWGMMA_KERNEL(spwgmma_f16_128x256_sws, F16, WgTile128x256, true)
SPWGMMA_KERNEL(spwgmma_bf16_128x256_sws, BF16, WgTile128x256, true)
