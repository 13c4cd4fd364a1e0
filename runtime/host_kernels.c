/* Host (CPU) kernels for the M = 2 sign rule, float32 and float64: the projection and its
 * input gradient, each in one pass.
 *
 * The channel-major wide tensor of a linear layer (or of a channels_last convolution) puts
 * the two slots of a value side by side: wide[2i] = max(x[i], 0), wide[2i + 1] = max(-x[i], 0).
 * Written as two strided planes by PyTorch, every cache line of the wide tensor is touched
 * twice and no store vectorises; here one pass reads x and writes each pair once, and the
 * compiler vectorises the interleaving (runtime/host_kernels.py builds this file with -O3).
 * An NCHW convolution's slots are planes of H * W values: PyTorch needs three passes for them
 * (slot 1 is max(-x, 0) and no single op computes it), this file one.
 *
 * Semantics are the PyTorch formulation's (runtime/projection.py, runtime/sas_ops.py):
 * NaN stays NaN in both slots, +-inf lands in its own slot; the input gradient of a pair is
 * g0 where x > 0 (or x is NaN) and -g1 where x <= 0.
 */
#include <stdint.h>

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

KERNELS(float, f32)
KERNELS(double, f64)

typedef struct {
    int kind; /* 0 project, 1 slot gradient */
    int dtype; /* 0 float32, 1 float64 */
    const void *x, *g;
    void *out;
    int64_t R, begin, end; /* rows [begin, end) */
} task_t;

static void *run(void *arg) {
    const task_t *t = (const task_t *)arg;
    if (t->kind == 0) {
        if (t->dtype == 0) project_f32(t->x, t->out, t->R, t->begin, t->end);
        else project_f64(t->x, t->out, t->R, t->begin, t->end);
    } else {
        if (t->dtype == 0) slot_grad_f32(t->x, t->g, t->out, t->R, t->begin, t->end);
        else slot_grad_f64(t->x, t->g, t->out, t->R, t->begin, t->end);
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
    task_t t = {0, dtype, x, 0, out, R, 0, 0};
    return split(t, rows, threads);
}

int sas_host_slot_grad_m2(int dtype, const void *x, const void *g, void *out, int64_t rows, int64_t R,
                          int threads) {
    task_t t = {1, dtype, x, g, out, R, 0, 0};
    return split(t, rows, threads);
}
