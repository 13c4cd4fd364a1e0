// S(x) compressed: the narrow activation x [R, K] becomes the sparse operand A of the GEMM
// (sparse_common.cuh layout) in one memory-bound pass: one read of x, one write of the kept
// values and of the metadata, in the order the MMA fragments load them. The wide S(x)
// [R, M*K] never exists.
//
// Slot rule (runtime/projection.py, sign_pattern): the value of channel c is |x_c| in slot
// I of its M slots (wide columns c*M .. c*M + M - 1);
//   M = 2: I = [x_c <= 0];
//   M = 4: channels pair up (2j, 2j+1), I = [x_2j <= 0] + 2 [x_2j+1 <= 0] for both; a last
//          partial pair (K odd) uses only its own bit.
// x <= 0 is the IEEE comparison: +0 and -0 are nonpositive, NaN (of either sign) is not.
// Values are |x| by clearing the sign bit (never a multiplication, so +-inf and NaN pass
// through unchanged and no 0 * inf is formed); tf32 values are rounded to nearest, ties away.
// Layout per 16-bit group of 4 wide columns (one 2:4 chunk of mma.sp):
//   M = 2: channels 2q, 2q+1 -> values (|x_2q|, |x_2q+1|), indices ([x_2q<=0], 2 + [x_2q+1<=0]);
//   M = 4: channel c -> values (|x_c|, 0), indices (I, 3) for I < 3; (0, |x_c|), (2, 3) for I = 3.
// tf32 (1:2 per pair of wide columns): M = 2: the pair of channel c holds |x_c| at index I;
//   M = 4: pairs (slots 0,1) and (2,3) of channel c: |x_c| at index I % 2 in pair I / 2, 0 in
//   the other (index 0).
// Channels >= K and rows >= R are padding: value 0, a valid index.
#include "sparse_common.cuh"

template <typename Tr>
struct Bits;
template <>
struct Bits<F16> {
    static constexpr u32 kMag = 0x7fffu, kInf = 0x7c00u;
};
template <>
struct Bits<BF16> {
    static constexpr u32 kMag = 0x7fffu, kInf = 0x7f80u;
};
template <>
struct Bits<F32> {
    static constexpr u32 kMag = 0x7fffffffu, kInf = 0x7f800000u;
};

// IEEE x <= 0 on the bit pattern: zero of either sign, or negative and not NaN.
template <typename Tr>
__device__ __forceinline__ u32 nonpos(u32 bits) {
    const u32 mag = bits & Bits<Tr>::kMag;
    return (mag == 0u || ((bits & ~Bits<Tr>::kMag) != 0u && mag <= Bits<Tr>::kInf)) ? 1u : 0u;
}

constexpr int kCompressThreads = 256;

template <typename Tr, int M>
__device__ __forceinline__ void compress_body(const CompressParams& p) {
    static_assert(M == 2 || M == 4, "the compressed layout covers M = 2 and M = 4");
    typedef typename Tr::storage S;
    constexpr int kWide = kKTileBytesB / Tr::kSize;  // wide columns per k-tile
    constexpr int kLaneWide = kWide / 4;             // wide columns per lane and row
    constexpr int kLaneCh = kLaneWide / M;           // channels per lane and row
    const Lane ln;
    const int step = ln.lane & 1, t = (ln.lane >> 1) & 1;  // word index g*4 + t*2 + step == lane
    const int items = p.rows_pad / 16 * p.ktiles;
    const int warps = kCompressThreads / 32;
    const bool xvec = (p.flags & kFlagXVec) != 0;
    for (int item = blockIdx.x * warps + ln.warp; item < items; item += gridDim.x * warps) {
        const int block = item / p.ktiles, kt = item % p.ktiles;
        const int wide0 = kt * kWide + step * (kWide / 2) + t * kLaneWide;  // first wide column
        const int c0 = wide0 / M;                                          // first channel
        u32 meta = 0;
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int row = block * 16 + ln.g + 8 * h;
            // this lane's channels of the row (padding reads as +0 that is not "nonpositive")
            u32 x[kLaneCh], pad[kLaneCh];
            const S* src = static_cast<const S*>(p.x) + (long long)row * p.K + c0;
            if (row < p.R && xvec && c0 + kLaneCh <= p.K) {
                if constexpr (kLaneCh * Tr::kSize == 16) {
                    const u32x4 v = ldg128(src);
                    const u32 w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
                    for (int c = 0; c < kLaneCh; ++c) x[c] = Tr::kSize == 2 ? (w[c / 2] >> (16 * (c % 2))) & 0xffffu : w[c];
                } else {
                    const u32x2 v = ldg64(src);
                    const u32 w[2] = {v.x, v.y};
#pragma unroll
                    for (int c = 0; c < kLaneCh; ++c) x[c] = Tr::kSize == 2 ? (w[c / 2] >> (16 * (c % 2))) & 0xffffu : w[c];
                }
#pragma unroll
                for (int c = 0; c < kLaneCh; ++c) pad[c] = 0u;
            } else {
#pragma unroll
                for (int c = 0; c < kLaneCh; ++c) {
                    const bool in = row < p.R && c0 + c < p.K;
                    x[c] = in ? u32(src[c]) : 0u;
                    pad[c] = in ? 0u : 1u;
                }
            }
            u32 np[kLaneCh], mag[kLaneCh];
#pragma unroll
            for (int c = 0; c < kLaneCh; ++c) {
                np[c] = pad[c] ? 0u : nonpos<Tr>(x[c]);
                mag[c] = x[c] & Bits<Tr>::kMag;
            }
            u32 bits16 = 0;  // 4 chunks of this lane, 4 bits each
            u32 out[4];      // 16 bytes of compressed values
            if constexpr (!Tr::kTf32 && M == 2) {
#pragma unroll
                for (int q = 0; q < 4; ++q) {
                    bits16 |= (np[2 * q] | ((2u + np[2 * q + 1]) << 2)) << (4 * q);
                    out[q] = mag[2 * q] | (mag[2 * q + 1] << 16);
                }
            } else if constexpr (!Tr::kTf32 && M == 4) {
#pragma unroll
                for (int c = 0; c < 4; ++c) {
                    const u32 I = (c & 1) ? (np[c - 1] | (np[c] << 1)) : (np[c] | (np[c + 1] << 1));
                    bits16 |= (I == 3u ? 0xEu : (I | 0xCu)) << (4 * c);
                    out[c] = I == 3u ? (mag[c] << 16) : mag[c];
                }
            } else if constexpr (Tr::kTf32 && M == 2) {
#pragma unroll
                for (int c = 0; c < 4; ++c) {
                    bits16 |= (np[c] ? 0xEu : 0x4u) << (4 * c);
                    out[c] = cvt_rna_tf32(sas_bits_to_float(mag[c]));
                }
            } else {  // tf32, M = 4: channels c0 (even) and c0 + 1 form one pair
                const u32 I = np[0] | (np[1] << 1);
#pragma unroll
                for (int c = 0; c < 2; ++c) {
                    const u32 v = cvt_rna_tf32(sas_bits_to_float(mag[c]));
                    const u32 hi = I >> 1, lo = I & 1u;  // pair and index inside it
                    out[2 * c] = hi ? 0u : v;
                    out[2 * c + 1] = hi ? v : 0u;
                    const u32 nib = lo ? 0xEu : 0x4u;
                    bits16 |= ((hi ? 0x4u : nib) | ((hi ? nib : 0x4u) << 4)) << (8 * c);
                }
            }
            unsigned char* dst = static_cast<unsigned char*>(p.vals) +
                                 ((long long)row * p.a_ld + wide0 / 2) * Tr::kSize;
            stg128(dst, u32x4{out[0], out[1], out[2], out[3]});
            meta |= bits16 << (16 * h);
        }
        stg32(static_cast<unsigned char*>(p.meta) + ((long long)item * 32 + ln.lane) * 4, meta);
    }
}

#define COMPRESS_KERNEL(NAME, TR, M)                                                       \
    extern "C" __global__ void __launch_bounds__(kCompressThreads) NAME(const CompressParams p) { \
        compress_body<TR, M>(p);                                                           \
    }                                                                                      \
    SAS_PUBLISH_LAUNCH(NAME, CompressParams, kCompressThreads, 0)

COMPRESS_KERNEL(sas_compress_f16_m2, F16, 2)
COMPRESS_KERNEL(sas_compress_f16_m4, F16, 4)
COMPRESS_KERNEL(sas_compress_bf16_m2, BF16, 2)
COMPRESS_KERNEL(sas_compress_bf16_m4, BF16, 4)
COMPRESS_KERNEL(sas_compress_f32_m2, F32, 2)
COMPRESS_KERNEL(sas_compress_f32_m4, F32, 4)
