/* Host (CPU) kernels for the sign rule (M = 2) and the sign pattern (M = 4 ... 128), float32 and
 * float64: the projection and its input gradient, each in one pass.
 *
 * The channel-major wide tensor of a linear layer (or of a channels_last convolution) puts
 * the two slots of a value side by side: wide[2i] = max(x[i], 0), wide[2i + 1] = max(-x[i], 0).
 * Written as two strided planes by PyTorch, every cache line of the wide tensor is touched
 * twice and no store vectorises; here one pass reads x and writes each pair once, and the
 * compiler vectorises the interleaving (runtime/host_kernels.py builds this file with -O3).
 * An NCHW convolution's slots are planes of H * W values: PyTorch needs three passes for them
 * (slot 1 is max(-x, 0) and no single op computes it), this file one.
 *
 * At M >= 4 PyTorch needs a slot computation and one torch.where per slot (5-21x a copy); the
 * pattern kernels below write each group's slots in one pass.
 *
 * Asked to (check = 1), a projection also reports whether x held a value that is not finite,
 * reading each block of x again right after writing its slots, while it is in cache: a layer
 * whose weight has all-zero columns must zero those slots when x holds +-inf or NaN (0 * inf
 * would be NaN where the dense layer gives 0), and asking PyTorch that cost one more pass over
 * x (a sum) and a handful of scalar ops per layer.
 *
 * Semantics are the PyTorch formulation's (runtime/projection.py, runtime/sas_ops.py):
 * at M = 2 NaN stays NaN in both slots, +-inf lands in its own slot; the input gradient of a
 * pair is g0 where x > 0 (or x is NaN) and -g1 where x <= 0.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

/* v is +-inf or NaN: v - v is then NaN, which compares unequal to 0; finite v gives exactly 0 */
#define NONFINITE(v) ((v) - (v) != 0)
/* values of x a projection checks at a time, right after writing their slots (still in L1):
 * a check inside the pattern kernels' own loops slowed their groups (R = 1) by a third to a half */
#define SPAN 2048

/* x is [rows][R], the wide tensor [rows][2][R]: R = 1 is interleaved pairs (a linear layer, a
 * channels_last convolution), R > 1 two planes per row (an NCHW convolution: R = H * W). Per
 * row, slot 0's plane and then slot 1's are written in two loops (x's row is read again from
 * L1): one fused loop over both output streams measured 2-3x slower. */
#define KERNELS(T, SUFFIX)                                                                    \
    /* 1 if one of the n values at x is not finite: one vectorised reduction */               \
    static inline int nonfinite_##SUFFIX(const T *restrict x, int64_t n) {                    \
        int nonfinite = 0;                                                                    \
        for (int64_t i = 0; i < n; ++i) nonfinite |= NONFINITE(x[i]);                         \
        return nonfinite;                                                                     \
    }                                                                                         \
    static void project_rows_##SUFFIX(const T *restrict x, T *restrict out, int64_t R, int64_t begin, \
                                      int64_t end) {                                          \
        if (R == 1) {                                                                         \
            for (int64_t i = begin; i < end; ++i) {                                           \
                T v = x[i];                                                                   \
                out[2 * i] = v < 0 ? (T)0 : v;                                                \
                out[2 * i + 1] = v > 0 ? (T)0 : -v;                                           \
            }                                                                                 \
            return;                                                                           \
        }                                                                                     \
        for (int64_t row = begin; row < end; ++row) {                                         \
            const T *restrict xr = x + row * R;                                               \
            T *restrict positive = out + row * 2 * R;                                         \
            for (int64_t r = 0; r < R; ++r) {                                                 \
                T v = xr[r];                                                                  \
                positive[r] = v < 0 ? (T)0 : v;                                               \
            }                                                                                 \
            T *restrict negative = positive + R;                                              \
            for (int64_t r = 0; r < R; ++r) {                                                 \
                T v = xr[r];                                                                  \
                negative[r] = v > 0 ? (T)0 : -v;                                              \
            }                                                                                 \
        }                                                                                     \
    }                                                                                         \
    /* rows [begin, end); with check, in blocks of about SPAN values of x, each block's x     \
     * checked right after it is written: returns 1 if a value is not finite, else 0 */       \
    static int project_##SUFFIX(const T *restrict x, T *restrict out, int64_t R, int64_t begin, \
                                int64_t end, int check) {                                     \
        if (!check) {                                                                         \
            project_rows_##SUFFIX(x, out, R, begin, end);                                     \
            return 0;                                                                         \
        }                                                                                     \
        int nonfinite = 0;                                                                    \
        if (R == 1) { /* the pairs' loop takes the check at no measurable cost */             \
            for (int64_t i = begin; i < end; ++i) {                                           \
                T v = x[i];                                                                   \
                out[2 * i] = v < 0 ? (T)0 : v;                                                \
                out[2 * i + 1] = v > 0 ? (T)0 : -v;                                           \
                nonfinite |= NONFINITE(v);                                                    \
            }                                                                                 \
            return nonfinite;                                                                 \
        }                                                                                     \
        const int64_t block = R < SPAN ? SPAN / R : 1;                                        \
        for (int64_t b0 = begin; b0 < end; b0 += block) {                                     \
            const int64_t b1 = end - b0 < block ? end : b0 + block;                           \
            project_rows_##SUFFIX(x, out, R, b0, b1);                                         \
            nonfinite |= nonfinite_##SUFFIX(x + b0 * R, (b1 - b0) * R);                       \
        }                                                                                     \
        return nonfinite;                                                                     \
    }                                                                                         \
    static void slot_grad_##SUFFIX(const T *restrict x, const T *restrict g, T *restrict out, \
                                   int64_t R, int64_t begin, int64_t end) {                   \
        if (R == 1) {                                                                         \
            for (int64_t i = begin; i < end; ++i) {                                           \
                T positive = g[2 * i], negative = g[2 * i + 1];                               \
                out[i] = x[i] <= 0 ? -negative : positive;                                    \
            }                                                                                 \
            return;                                                                           \
        }                                                                                     \
        for (int64_t row = begin; row < end; ++row) {                                         \
            const T *restrict xr = x + row * R;                                               \
            const T *restrict positive = g + row * 2 * R;                                     \
            const T *restrict negative = positive + R;                                        \
            T *restrict o = out + row * R;                                                    \
            for (int64_t r = 0; r < R; ++r) o[r] = xr[r] <= 0 ? -negative[r] : positive[r];   \
        }                                                                                     \
    }

/* The sign pattern at M = 2^b, b >= 2 (runtime/projection.py, SignPatternRule): channels form
 * groups of b neighbours, I = sum_j [x_(g*b+j) <= 0] * 2^j is the slot of every channel of the
 * group (a last partial group uses the bits it has), the slot holds |x| and the other M - 1 are
 * 0. NaN files under bit 0 (NaN <= 0 is false) and stays NaN in its slot, as torch.where puts it.
 * The gradient reads the slot each value went to: g[I] where x > 0 (or x is NaN), -g[I] where
 * x <= 0 (its sign bit flipped), the same derivative as the M = 2 kernel.
 *
 * x is [outer][C][R], the wide tensor [outer][C][M][R]; a unit is one group at one outer index
 * (units are what the threads split). Values are handled as their bits (U, an unsigned integer
 * of T's size): a slot is selected by ANDing with an all-ones or all-zero mask. A select on the
 * random slot compiled to branches and ran 5x slower; a multiply would turn inf into NaN.
 * Every function below is compiled once per b (the switch at the end), so M and a full group's
 * loops are constants and a group's M slots are vectors: compiled for a variable b they ran
 * 2-3x slower. R = 1 (a linear layer, a channels_last convolution): a unit's slots are contiguous.
 * R > 1 (an NCHW convolution): the patterns of CHUNK positions are computed first, then every
 * (channel, slot) plane of the chunk is one vectorised pass. */
#define CHUNK 256
#define PATTERN_KERNELS(T, U, SUFFIX, ABS)                                                    \
    static inline U bits_##SUFFIX(T v) {                                                      \
        U u;                                                                                  \
        memcpy(&u, &v, sizeof v);                                                             \
        return u;                                                                             \
    }                                                                                         \
    /* the sign bit where v <= 0 (the gradient's negation), else 0 */                         \
    static inline U flip_##SUFFIX(T v) { return (U)(v <= 0) << (8 * sizeof(U) - 1); }         \
    /* the slot of a group of cn adjacent channels (R = 1) */                                 \
    static inline U group_slot_##SUFFIX(const T *restrict xg, int64_t cn) {                   \
        U slot = 0;                                                                           \
        for (int64_t j = 0; j < cn; ++j) slot |= (U)(xg[j] <= 0) << j;                        \
        return slot;                                                                          \
    }                                                                                         \
    /* the slots of n positions of a group whose cn channel planes (stride R) start at xg */  \
    static inline void chunk_pattern_##SUFFIX(const T *restrict xg, int64_t R, int64_t n, int64_t cn, \
                                              U *restrict pattern) {                          \
        for (int64_t r = 0; r < n; ++r) pattern[r] = (U)(xg[r] <= 0);                         \
        for (int64_t j = 1; j < cn; ++j)                                                      \
            for (int64_t r = 0; r < n; ++r) pattern[r] |= (U)(xg[j * R + r] <= 0) << j;       \
    }                                                                                         \
    /* one unit of cn channels: the projection into og ([cn][M][R]), or the gradient from gg  \
     * into og ([cn][R]); inlined with constant cn and M for full groups */                   \
    static inline __attribute__((always_inline)) void project_unit_##SUFFIX(                  \
        const T *restrict xg, U *restrict og, int64_t cn, int64_t M, int64_t R) {             \
        if (R == 1) {                                                                         \
            const U slot = group_slot_##SUFFIX(xg, cn);                                       \
            for (int64_t j = 0; j < cn; ++j) {                                                \
                const U a = bits_##SUFFIX(ABS(xg[j]));                                        \
                for (U m = 0; m < (U)M; ++m) og[j * M + m] = a & -(U)(m == slot);             \
            }                                                                                 \
            return;                                                                           \
        }                                                                                     \
        U pattern[CHUNK];                                                                     \
        for (int64_t r0 = 0; r0 < R; r0 += CHUNK) {                                           \
            const int64_t n = R - r0 < CHUNK ? R - r0 : CHUNK;                                \
            chunk_pattern_##SUFFIX(xg + r0, R, n, cn, pattern);                               \
            for (int64_t j = 0; j < cn; ++j) {                                                \
                const T *restrict xj = xg + j * R + r0;                                       \
                for (U m = 0; m < (U)M; ++m) {                                                \
                    U *restrict plane = og + (j * M + m) * R + r0;                            \
                    for (int64_t r = 0; r < n; ++r) plane[r] = bits_##SUFFIX(ABS(xj[r])) & -(U)(pattern[r] == m); \
                }                                                                             \
            }                                                                                 \
        }                                                                                     \
    }                                                                                         \
    static inline __attribute__((always_inline)) void grad_unit_##SUFFIX(                     \
        const T *restrict xg, const U *restrict gg, U *restrict og, int64_t cn, int64_t M, int64_t R) { \
        if (R == 1) {                                                                         \
            const U slot = group_slot_##SUFFIX(xg, cn);                                       \
            for (int64_t j = 0; j < cn; ++j) og[j] = gg[j * M + slot] ^ flip_##SUFFIX(xg[j]); \
            return;                                                                           \
        }                                                                                     \
        U pattern[CHUNK];                                                                     \
        for (int64_t r0 = 0; r0 < R; r0 += CHUNK) {                                           \
            const int64_t n = R - r0 < CHUNK ? R - r0 : CHUNK;                                \
            chunk_pattern_##SUFFIX(xg + r0, R, n, cn, pattern);                               \
            for (int64_t j = 0; j < cn; ++j) {                                                \
                U *restrict oj = og + j * R + r0;                                             \
                const U *restrict gj = gg + j * M * R + r0;                                   \
                for (int64_t r = 0; r < n; ++r) {                                             \
                    U acc = flip_##SUFFIX(xg[j * R + r0 + r]);                                \
                    for (U m = 0; m < (U)M; ++m) acc ^= gj[m * R + r] & -(U)(pattern[r] == m); \
                    oj[r] = acc;                                                              \
                }                                                                             \
            }                                                                                 \
        }                                                                                     \
    }                                                                                         \
    /* units [begin, end): pointers advance a group at a time (no division per unit); all     \
     * groups are full but a row's last when b does not divide C */                           \
    static inline __attribute__((always_inline)) void pattern_units_##SUFFIX(                 \
        int grad, const T *restrict x, const U *restrict g, U *restrict out, int64_t C, int64_t R, \
        const int bits, int64_t begin, int64_t end) {                                         \
        const int64_t M = (int64_t)1 << bits, groups = (C + bits - 1) / bits;                 \
        int64_t grp = begin % groups;                                                         \
        const int64_t first = (begin / groups) * C + grp * bits; /* its first channel */      \
        const T *restrict xg = x + first * R;                                                 \
        const U *restrict gg = grad ? g + first * M * R : 0;                                  \
        const int64_t out_per_channel = grad ? R : M * R;                                     \
        U *restrict og = out + first * out_per_channel;                                       \
        for (int64_t unit = begin; unit < end; ++unit) {                                      \
            if (++grp < groups || C % bits == 0) { /* a full group */                         \
                grp = grp == groups ? 0 : grp;                                                \
                if (grad) grad_unit_##SUFFIX(xg, gg, og, bits, M, R);                         \
                else project_unit_##SUFFIX(xg, og, bits, M, R);                               \
                xg += bits * R;                                                               \
                if (grad) gg += bits * M * R;                                                 \
                og += bits * out_per_channel;                                                 \
                continue;                                                                     \
            }                                                                                 \
            grp = 0; /* a row's last group, C % b channels */                                 \
            const int64_t cn = C % bits;                                                      \
            if (grad) grad_unit_##SUFFIX(xg, gg, og, cn, M, R);                               \
            else project_unit_##SUFFIX(xg, og, cn, M, R);                                     \
            xg += cn * R;                                                                     \
            if (grad) gg += cn * M * R;                                                       \
            og += cn * out_per_channel;                                                       \
        }                                                                                     \
    }                                                                                         \
    /* the projection of units [begin, end) in blocks of about SPAN values of x (a unit's     \
     * values are contiguous, and so are a block's), each block's x checked right after it is \
     * written; returns 1 if a value is not finite */                                         \
    static inline __attribute__((always_inline)) int project_blocks_##SUFFIX(                 \
        const T *restrict x, U *restrict out, int64_t C, int64_t R, const int bits, int64_t begin, \
        int64_t end) {                                                                        \
        const int64_t groups = (C + bits - 1) / bits, per_block = SPAN / (bits * R);          \
        const int64_t block = per_block > 0 ? per_block : 1;                                  \
        int nonfinite = 0;                                                                    \
        for (int64_t b0 = begin; b0 < end; b0 += block) {                                     \
            const int64_t b1 = end - b0 < block ? end : b0 + block;                           \
            pattern_units_##SUFFIX(0, x, 0, out, C, R, bits, b0, b1);                         \
            const int64_t c0 = (b0 / groups) * C + (b0 % groups) * bits; /* first channels */ \
            const int64_t c1 = (b1 / groups) * C + (b1 % groups) * bits;                      \
            nonfinite |= nonfinite_##SUFFIX(x + c0 * R, (c1 - c0) * R);                       \
        }                                                                                     \
        return nonfinite;                                                                     \
    }                                                                                         \
    PATTERN_AT(T, U, SUFFIX, 2) PATTERN_AT(T, U, SUFFIX, 3) PATTERN_AT(T, U, SUFFIX, 4)       \
    PATTERN_AT(T, U, SUFFIX, 5) PATTERN_AT(T, U, SUFFIX, 6) PATTERN_AT(T, U, SUFFIX, 7)       \
    static int pattern_##SUFFIX(int grad, int check, const void *x, const void *g, void *out, int64_t C, \
                                int64_t R, int bits, int64_t begin, int64_t end) {            \
        switch (bits) {                                                                       \
        case 2: return pattern_2_##SUFFIX(grad, check, x, g, out, C, R, begin, end);          \
        case 3: return pattern_3_##SUFFIX(grad, check, x, g, out, C, R, begin, end);          \
        case 4: return pattern_4_##SUFFIX(grad, check, x, g, out, C, R, begin, end);          \
        case 5: return pattern_5_##SUFFIX(grad, check, x, g, out, C, R, begin, end);          \
        case 6: return pattern_6_##SUFFIX(grad, check, x, g, out, C, R, begin, end);          \
        default: return pattern_7_##SUFFIX(grad, check, x, g, out, C, R, begin, end);         \
        }                                                                                     \
    }
/* the projection (grad = 0; with check, returning 1 if x holds a value that is not finite) and
 * the gradient (grad = 1) at one b, R = 1 and R > 1 apart: each a function of its own, with every
 * size but C and R a constant */
#define PATTERN_AT(T, U, SUFFIX, BITS)                                                        \
    static __attribute__((noinline)) int pattern_##BITS##_##SUFFIX(                           \
        int grad, int check, const T *x, const void *g, void *out, int64_t C, int64_t R, int64_t begin, \
        int64_t end) {                                                                        \
        if (grad && R == 1) pattern_units_##SUFFIX(1, x, g, out, C, 1, BITS, begin, end);     \
        else if (grad) pattern_units_##SUFFIX(1, x, g, out, C, R, BITS, begin, end);          \
        else if (check && R == 1) return project_blocks_##SUFFIX(x, out, C, 1, BITS, begin, end); \
        else if (check) return project_blocks_##SUFFIX(x, out, C, R, BITS, begin, end);       \
        else if (R == 1) pattern_units_##SUFFIX(0, x, 0, out, C, 1, BITS, begin, end);        \
        else pattern_units_##SUFFIX(0, x, 0, out, C, R, BITS, begin, end);                    \
        return 0;                                                                             \
    }

KERNELS(float, f32)
KERNELS(double, f64)
PATTERN_KERNELS(float, uint32_t, f32, fabsf)
PATTERN_KERNELS(double, uint64_t, f64, fabs)

#if defined(__AVX512F__)
#include <immintrin.h>
/* The sign pattern at M = 4 for float32 with R = 1 and an even C (a linear layer, a channels_last
 * convolution): every unit is then a pair of adjacent values of x and a block of 8 of the wide
 * tensor, and units [begin, end) are contiguous. Eight units per step: 16 values of x in one
 * vector, every unit's two bits from one compare (x <= 0, false for NaN, as in the generic loop),
 * and each of the 4 output vectors one permute of |x| masked to the lanes whose slot is their
 * unit's. The generic loop writes a unit at a time and measured 2.5-3x slower (AMD EPYC, Zen 4:
 * 0.32 against 0.11 ms on BERT-base's [1024, 768], bit-identical); the last units of a range
 * take the generic loop. */
static int project_m4_pairs_f32(const float *restrict x, float *restrict out, int64_t C, int64_t begin,
                                int64_t end, int check) {
    const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    const __m512i lane_slot = _mm512_and_si512(lane, _mm512_set1_epi32(3));
    const __m512i three = _mm512_set1_epi32(3);
    const __m512 zero = _mm512_setzero_ps();
    /* output vector k holds units 2k and 2k + 1: lane l is slot l % 4 of value 4k + l / 4 of the
     * step's 16 (channel (l / 4) % 2 of unit 2k + l / 8), whose slot is bits 2 (2k + l / 8) and up */
    __m512i source[4], shift[4];
    for (int k = 0; k < 4; ++k) {
        source[k] = _mm512_add_epi32(_mm512_set1_epi32(4 * k), _mm512_srli_epi32(lane, 2));
        shift[k] = _mm512_add_epi32(_mm512_set1_epi32(4 * k), _mm512_slli_epi32(_mm512_srli_epi32(lane, 3), 1));
    }
    __mmask16 nonfinite = 0;
    int64_t u = begin;
    for (; u + 8 <= end; u += 8) {
        const __m512 v = _mm512_loadu_ps(x + 2 * u);
        const __m512i bits = _mm512_set1_epi32((int)_mm512_cmp_ps_mask(v, zero, _CMP_LE_OQ));
        const __m512 a = _mm512_abs_ps(v);
        if (check) nonfinite |= _mm512_cmp_ps_mask(_mm512_sub_ps(v, v), zero, _CMP_NEQ_UQ); /* inf, NaN */
        for (int k = 0; k < 4; ++k) {
            const __m512i slot = _mm512_and_si512(_mm512_srlv_epi32(bits, shift[k]), three);
            _mm512_storeu_ps(out + 8 * u + 16 * k, _mm512_maskz_mov_ps(_mm512_cmpeq_epi32_mask(slot, lane_slot),
                                                                       _mm512_permutexvar_ps(source[k], a)));
        }
    }
    pattern_units_f32(0, x, 0, (uint32_t *)out, C, 1, 2, u, end);
    return (check && (nonfinite != 0 || nonfinite_f32(x + 2 * u, 2 * (end - u)))) ? 1 : 0;
}

/* Its input gradient, eight units per step: value i of the step's 16 reads the wide gradient at
 * 4 i + its unit's slot, from the first two of the step's four gradient vectors (values 0-7) or
 * the last two (8-15), with its sign flipped where x <= 0 (the generic loop's bits). */
static void slot_grad_m4_pairs_f32(const float *restrict x, const float *restrict g, float *restrict out,
                                   int64_t C, int64_t begin, int64_t end) {
    const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    const __m512i at = _mm512_slli_epi32(lane, 2);                                  /* 4 i */
    const __m512i shift = _mm512_slli_epi32(_mm512_srli_epi32(lane, 1), 1);         /* 2 (i / 2) */
    const __m512i three = _mm512_set1_epi32(3), sign = _mm512_set1_epi32((int)0x80000000u);
    const __m512 zero = _mm512_setzero_ps();
    int64_t u = begin;
    for (; u + 8 <= end; u += 8) {
        const __m512 v = _mm512_loadu_ps(x + 2 * u);
        const __mmask16 negative = _mm512_cmp_ps_mask(v, zero, _CMP_LE_OQ);
        const __m512i slot = _mm512_and_si512(_mm512_srlv_epi32(_mm512_set1_epi32((int)negative), shift), three);
        const __m512i index = _mm512_add_epi32(at, slot); /* its low 5 bits pick from a pair of vectors */
        const float *gu = g + 8 * u;
        const __m512 low = _mm512_permutex2var_ps(_mm512_loadu_ps(gu), index, _mm512_loadu_ps(gu + 16));
        const __m512 high = _mm512_permutex2var_ps(_mm512_loadu_ps(gu + 32), index, _mm512_loadu_ps(gu + 48));
        const __m512i picked = _mm512_castps_si512(_mm512_mask_blend_ps(0xFF00, low, high));
        _mm512_storeu_si512(out + 2 * u, _mm512_mask_xor_epi32(picked, negative, picked, sign));
    }
    pattern_units_f32(1, x, (const uint32_t *)g, (uint32_t *)out, C, 1, 2, u, end);
}
#endif

typedef struct {
    int kind; /* 0 project, 1 slot gradient (M = 2); 2, 3 the same for the sign pattern at b >= 2 */
    int dtype; /* 0 float32, 1 float64 */
    const void *x, *g;
    void *out;
    int64_t C, R, begin, end; /* rows (M = 2) or units (pattern) [begin, end) */
    int bits;
    int check;     /* a projection checks whether x is finite */
    int nonfinite; /* out: it saw a value of x that is not finite */
} task_t;

static void *run(void *arg) {
    task_t *t = (task_t *)arg;
    switch (t->kind) {
    case 0:
        if (t->dtype == 0) t->nonfinite = project_f32(t->x, t->out, t->R, t->begin, t->end, t->check);
        else t->nonfinite = project_f64(t->x, t->out, t->R, t->begin, t->end, t->check);
        break;
    case 1:
        if (t->dtype == 0) slot_grad_f32(t->x, t->g, t->out, t->R, t->begin, t->end);
        else slot_grad_f64(t->x, t->g, t->out, t->R, t->begin, t->end);
        break;
    default: /* 2 the projection, 3 the gradient */
#if defined(__AVX512F__)
        if (t->dtype == 0 && t->bits == 2 && t->R == 1 && t->C % 2 == 0) {
            if (t->kind == 2) t->nonfinite = project_m4_pairs_f32(t->x, t->out, t->C, t->begin, t->end, t->check);
            else slot_grad_m4_pairs_f32(t->x, t->g, t->out, t->C, t->begin, t->end);
            break;
        }
#endif
        if (t->dtype == 0)
            t->nonfinite = pattern_f32(t->kind == 3, t->check, t->x, t->g, t->out, t->C, t->R, t->bits, t->begin,
                                       t->end);
        else
            t->nonfinite = pattern_f64(t->kind == 3, t->check, t->x, t->g, t->out, t->C, t->R, t->bits, t->begin,
                                       t->end);
    }
    return 0;
}

/* Rows split into `threads` contiguous ranges (the caller decides when threads pay off). Built
 * with OpenMP (-fopenmp), the ranges run on the OpenMP team of the calling thread: PyTorch's own
 * libgomp (its soname is the one this library needs), whose workers are already running and
 * spin-wait after every PyTorch op. Threads of our own measured 2x slower than that on two
 * cores: they compete with those spinning workers. Without OpenMP, pthreads. Returns 1 if a
 * projection saw a value of x that is not finite, else 0. */
#ifdef _OPENMP
static int split(task_t base, int64_t n, int threads) {
    if (threads < 1) threads = 1;
    if (threads > n) threads = n < 1 ? 1 : (int)n;
    int nonfinite = 0;
#pragma omp parallel for num_threads(threads) schedule(static, 1) reduction(| : nonfinite)
    for (int i = 0; i < threads; ++i) {
        task_t t = base;
        t.begin = n * i / threads;
        t.end = n * (i + 1) / threads;
        run(&t);
        nonfinite |= t.nonfinite;
    }
    return nonfinite;
}
#else
#include <pthread.h>
#define MAX_THREADS 64
static int split(task_t base, int64_t n, int threads) {
    if (threads < 1) threads = 1;
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    if (threads > n) threads = n < 1 ? 1 : (int)n;
    task_t tasks[MAX_THREADS];
    pthread_t ids[MAX_THREADS];
    int started[MAX_THREADS] = {0};
    for (int i = 0; i < threads; ++i) {
        tasks[i] = base;
        tasks[i].begin = n * i / threads;
        tasks[i].end = n * (i + 1) / threads;
    }
    for (int i = 1; i < threads; ++i) started[i] = pthread_create(&ids[i], 0, run, &tasks[i]) == 0;
    run(&tasks[0]);
    int nonfinite = tasks[0].nonfinite;
    for (int i = 1; i < threads; ++i) {
        if (started[i]) pthread_join(ids[i], 0);
        else run(&tasks[i]); /* no thread to be had: its range runs here */
        nonfinite |= tasks[i].nonfinite;
    }
    return nonfinite;
}
#endif

/* 1 when built with OpenMP (host_kernels.py reports it) */
int sas_host_openmp(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

/* 1 when built with the AVX-512 kernels (-march=native on a CPU that has them) */
int sas_host_avx512(void) {
#if defined(__AVX512F__)
    return 1;
#else
    return 0;
#endif
}

/* With check = 1 the projections return 1 if x holds a value that is not finite, else 0; with
 * check = 0 they return 0 and read x once (-1: bits out of range). The gradients return 0 (-1:
 * bits out of range). */
int sas_host_project_m2(int dtype, const void *x, void *out, int64_t rows, int64_t R, int check, int threads) {
    task_t t = {0, dtype, x, 0, out, 0, R, 0, 0, 1, check, 0};
    return split(t, rows, threads);
}

int sas_host_slot_grad_m2(int dtype, const void *x, const void *g, void *out, int64_t rows, int64_t R,
                          int threads) {
    task_t t = {1, dtype, x, g, out, 0, R, 0, 0, 1, 0, 0};
    return split(t, rows, threads);
}

/* x is [outer][C][R]; 2 <= bits <= 7 (M <= 128, the slot fits a byte) */
int sas_host_project_pattern(int dtype, const void *x, void *out, int64_t outer, int64_t C, int64_t R, int bits,
                             int check, int threads) {
    if (bits < 2 || bits > 7) return -1;
    task_t t = {2, dtype, x, 0, out, C, R, 0, 0, bits, check, 0};
    return split(t, outer * ((C + bits - 1) / bits), threads);
}

int sas_host_slot_grad_pattern(int dtype, const void *x, const void *g, void *out, int64_t outer, int64_t C,
                               int64_t R, int bits, int threads) {
    if (bits < 2 || bits > 7) return -1;
    task_t t = {3, dtype, x, g, out, C, R, 0, 0, bits, 0, 0};
    return split(t, outer * ((C + bits - 1) / bits), threads);
}
