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
 * Semantics are the PyTorch formulation's (runtime/projection.py, runtime/sas_ops.py):
 * at M = 2 NaN stays NaN in both slots, +-inf lands in its own slot; the input gradient of a
 * pair is g0 where x > 0 (or x is NaN) and -g1 where x <= 0.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

/* x is [rows][R], the wide tensor [rows][2][R]: R = 1 is interleaved pairs (a linear layer, a
 * channels_last convolution), R > 1 two planes per row (an NCHW convolution: R = H * W). Per
 * row, slot 0's plane and then slot 1's are written in two loops (x's row is read again from
 * L1): one fused loop over both output streams measured 2-3x slower. */
#define KERNELS(T, SUFFIX)                                                                    \
    static void project_##SUFFIX(const T *restrict x, T *restrict out, int64_t R, int64_t begin, \
                                 int64_t end) {                                               \
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
    static void slot_grad_##SUFFIX(const T *restrict x, const T *restrict g, T *restrict out,  \
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
 * x is [outer][C][R], the wide tensor [outer][C][M][R]; a unit is one group at one outer index
 * (units are what the threads split). R = 1: a block of units' outputs is contiguous, zeroed at
 * memset speed, then each |x| is stored at its slot (M = 4 and 8 without loops). R > 1 (an NCHW
 * convolution): the patterns of CHUNK positions are computed first (int32: a byte array beside
 * float selects did not vectorise, 4x slower on 7x7 planes), then every (channel, slot) plane of
 * the chunk is one vectorised select. The gradient reads the slot each value went to: g[I] where
 * x > 0 (or x is NaN), -g[I] where x <= 0, the same derivative as the M = 2 kernel. */
#define CHUNK 256
#define UNIT_BLOCK 512
#define PATTERN_KERNELS(T, SUFFIX, ABS)                                                       \
    /* the slots of n positions of a group whose cn channel planes (stride R) start at xg */  \
    static inline void chunk_pattern_##SUFFIX(const T *restrict xg, int64_t R, int64_t n, int64_t cn, \
                                              int32_t *restrict pattern) {                    \
        for (int64_t r = 0; r < n; ++r) pattern[r] = 0;                                       \
        for (int64_t j = 0; j < cn; ++j)                                                      \
            for (int64_t r = 0; r < n; ++r) pattern[r] |= (int32_t)(xg[j * R + r] <= 0) << j; \
    }                                                                                         \
    static void project_pattern_##SUFFIX(const T *restrict x, T *restrict out, int64_t C, int64_t R, \
                                         int bits, int64_t begin, int64_t end) {              \
        const int64_t M = (int64_t)1 << bits, groups = (C + bits - 1) / bits;                 \
        if (R == 1) { /* units in blocks: zero a block's outputs (contiguous), then place each |x| */ \
            int64_t o = begin / groups, grp = begin % groups;                                 \
            for (int64_t b0 = begin; b0 < end; b0 += UNIT_BLOCK) {                            \
                const int64_t b1 = end - b0 < UNIT_BLOCK ? end : b0 + UNIT_BLOCK;             \
                const int64_t first = (b0 / groups) * C + (b0 % groups) * bits;               \
                const int64_t last = (b1 / groups) * C + (b1 % groups) * bits;                \
                memset(out + first * M, 0, (size_t)((last - first) * M) * sizeof(T));         \
                for (int64_t unit = b0; unit < b1; ++unit, ++grp == groups ? (grp = 0, ++o) : 0) { \
                    const int64_t c0 = grp * bits;                                            \
                    const T *restrict xg = x + o * C + c0;                                    \
                    T *restrict og = out + (o * C + c0) * M;                                  \
                    if (bits == 2 && c0 + 2 <= C) { /* M = 4, a full group: no loops */       \
                        const int64_t slot = (int64_t)(xg[0] <= 0) | (int64_t)(xg[1] <= 0) << 1; \
                        og[slot] = ABS(xg[0]);                                                \
                        og[4 + slot] = ABS(xg[1]);                                            \
                        continue;                                                             \
                    }                                                                         \
                    if (bits == 3 && c0 + 3 <= C) { /* M = 8 */                               \
                        const int64_t slot = (int64_t)(xg[0] <= 0) | (int64_t)(xg[1] <= 0) << 1 | \
                                             (int64_t)(xg[2] <= 0) << 2;                      \
                        og[slot] = ABS(xg[0]);                                                \
                        og[8 + slot] = ABS(xg[1]);                                            \
                        og[16 + slot] = ABS(xg[2]);                                           \
                        continue;                                                             \
                    }                                                                         \
                    const int64_t cn = C - c0 < bits ? C - c0 : bits;                         \
                    int64_t slot = 0;                                                         \
                    for (int64_t j = 0; j < cn; ++j) slot |= (int64_t)(xg[j] <= 0) << j;      \
                    for (int64_t j = 0; j < cn; ++j) og[j * M + slot] = ABS(xg[j]);           \
                }                                                                             \
            }                                                                                 \
            return;                                                                           \
        }                                                                                     \
        int64_t o = begin / groups, grp = begin % groups; /* no division per unit */        \
        for (int64_t unit = begin; unit < end; ++unit, ++grp == groups ? (grp = 0, ++o) : 0) { \
            const int64_t c0 = grp * bits, cn = C - c0 < bits ? C - c0 : bits;                \
            const T *restrict xg = x + (o * C + c0) * R;                                      \
            T *restrict og = out + (o * C + c0) * M * R;                                      \
            int32_t pattern[CHUNK];                                                           \
            for (int64_t r0 = 0; r0 < R; r0 += CHUNK) {                                       \
                const int64_t n = R - r0 < CHUNK ? R - r0 : CHUNK;                            \
                chunk_pattern_##SUFFIX(xg + r0, R, n, cn, pattern);                           \
                for (int64_t j = 0; j < cn; ++j) {                                            \
                    const T *restrict xj = xg + j * R + r0;                                   \
                    for (int64_t m = 0; m < M; ++m) {                                         \
                        T *restrict plane = og + (j * M + m) * R + r0;                        \
                        for (int64_t r = 0; r < n; ++r) plane[r] = pattern[r] == m ? ABS(xj[r]) : (T)0; \
                    }                                                                         \
                }                                                                             \
            }                                                                                 \
        }                                                                                     \
    }                                                                                         \
    static void slot_grad_pattern_##SUFFIX(const T *restrict x, const T *restrict g, T *restrict out, \
                                           int64_t C, int64_t R, int bits, int64_t begin, int64_t end) { \
        const int64_t M = (int64_t)1 << bits, groups = (C + bits - 1) / bits;                 \
        const T sign[2] = {(T)1, (T)-1}; /* g * -1 is -g exactly, NaN and +-0 included */      \
        int64_t o = begin / groups, grp = begin % groups; /* no division per unit */        \
        for (int64_t unit = begin; unit < end; ++unit, ++grp == groups ? (grp = 0, ++o) : 0) { \
            const int64_t c0 = grp * bits, cn = C - c0 < bits ? C - c0 : bits;                \
            const T *restrict xg = x + (o * C + c0) * R;                                      \
            const T *restrict gg = g + (o * C + c0) * M * R;                                  \
            T *restrict og = out + (o * C + c0) * R;                                          \
            if (R == 1) {                                                                     \
                int64_t slot = 0;                                                             \
                for (int64_t j = 0; j < cn; ++j) slot |= (int64_t)(xg[j] <= 0) << j;          \
                for (int64_t j = 0; j < cn; ++j) /* x's sign is random: no branch on it */ \
                    og[j] = gg[j * M + slot] * sign[xg[j] <= 0];                              \
                continue;                                                                     \
            }                                                                                 \
            int32_t pattern[CHUNK];                                                           \
            for (int64_t r0 = 0; r0 < R; r0 += CHUNK) {                                       \
                const int64_t n = R - r0 < CHUNK ? R - r0 : CHUNK;                            \
                chunk_pattern_##SUFFIX(xg + r0, R, n, cn, pattern);                           \
                for (int64_t j = 0; j < cn; ++j) {                                            \
                    const T *restrict xj = xg + j * R + r0;                                   \
                    T *restrict oj = og + j * R + r0;                                         \
                    for (int64_t r = 0; r < n; ++r) oj[r] = 0;                                \
                    for (int64_t m = 0; m < M; ++m) {                                         \
                        const T *restrict plane = gg + (j * M + m) * R + r0;                  \
                        for (int64_t r = 0; r < n; ++r) oj[r] = pattern[r] == m ? plane[r] : oj[r]; \
                    }                                                                         \
                    for (int64_t r = 0; r < n; ++r) oj[r] = xj[r] <= 0 ? -oj[r] : oj[r];      \
                }                                                                             \
            }                                                                                 \
        }                                                                                     \
    }

KERNELS(float, f32)
KERNELS(double, f64)
PATTERN_KERNELS(float, f32, fabsf)
PATTERN_KERNELS(double, f64, fabs)

typedef struct {
    int kind; /* 0 project, 1 slot gradient (M = 2); 2, 3 the same for the sign pattern at b >= 2 */
    int dtype; /* 0 float32, 1 float64 */
    const void *x, *g;
    void *out;
    int64_t C, R, begin, end; /* rows (M = 2) or units (pattern) [begin, end) */
    int bits;
} task_t;

static void *run(void *arg) {
    const task_t *t = (const task_t *)arg;
    switch (t->kind) {
    case 0:
        if (t->dtype == 0) project_f32(t->x, t->out, t->R, t->begin, t->end);
        else project_f64(t->x, t->out, t->R, t->begin, t->end);
        break;
    case 1:
        if (t->dtype == 0) slot_grad_f32(t->x, t->g, t->out, t->R, t->begin, t->end);
        else slot_grad_f64(t->x, t->g, t->out, t->R, t->begin, t->end);
        break;
    case 2:
        if (t->dtype == 0) project_pattern_f32(t->x, t->out, t->C, t->R, t->bits, t->begin, t->end);
        else project_pattern_f64(t->x, t->out, t->C, t->R, t->bits, t->begin, t->end);
        break;
    default:
        if (t->dtype == 0) slot_grad_pattern_f32(t->x, t->g, t->out, t->C, t->R, t->bits, t->begin, t->end);
        else slot_grad_pattern_f64(t->x, t->g, t->out, t->C, t->R, t->bits, t->begin, t->end);
    }
    return 0;
}

/* Rows split into `threads` contiguous ranges (the caller decides when threads pay off). Built
 * with OpenMP (-fopenmp), the ranges run on the OpenMP team of the calling thread: PyTorch's own
 * libgomp (its soname is the one this library needs), whose workers are already running and
 * spin-wait after every PyTorch op. Threads of our own measured 2x slower than that on two
 * cores: they compete with those spinning workers. Without OpenMP, pthreads. */
#ifdef _OPENMP
static int split(task_t base, int64_t n, int threads) {
    if (threads < 1) threads = 1;
    if (threads > n) threads = n < 1 ? 1 : (int)n;
#pragma omp parallel for num_threads(threads) schedule(static, 1)
    for (int i = 0; i < threads; ++i) {
        task_t t = base;
        t.begin = n * i / threads;
        t.end = n * (i + 1) / threads;
        run(&t);
    }
    return 0;
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
    for (int i = 1; i < threads; ++i) {
        if (started[i]) pthread_join(ids[i], 0);
        else run(&tasks[i]); /* no thread to be had: its range runs here */
    }
    return 0;
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

int sas_host_project_m2(int dtype, const void *x, void *out, int64_t rows, int64_t R, int threads) {
    task_t t = {0, dtype, x, 0, out, 0, R, 0, 0, 1};
    return split(t, rows, threads);
}

int sas_host_slot_grad_m2(int dtype, const void *x, const void *g, void *out, int64_t rows, int64_t R,
                          int threads) {
    task_t t = {1, dtype, x, g, out, 0, R, 0, 0, 1};
    return split(t, rows, threads);
}

/* x is [outer][C][R]; 2 <= bits <= 7 (M <= 128, the slot fits a byte) */
int sas_host_project_pattern(int dtype, const void *x, void *out, int64_t outer, int64_t C, int64_t R, int bits,
                             int threads) {
    if (bits < 2 || bits > 7) return -1;
    task_t t = {2, dtype, x, 0, out, C, R, 0, 0, bits};
    return split(t, outer * ((C + bits - 1) / bits), threads);
}

int sas_host_slot_grad_pattern(int dtype, const void *x, const void *g, void *out, int64_t outer, int64_t C,
                               int64_t R, int bits, int threads) {
    if (bits < 2 || bits > 7) return -1;
    task_t t = {3, dtype, x, g, out, C, R, 0, 0, bits};
    return split(t, outer * ((C + bits - 1) / bits), threads);
}
