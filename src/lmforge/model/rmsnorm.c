/* RMSNorm over the last dimension on the CPU, forward and backward, one pass over the data each way.
 *
 * PyTorch 2.13's CPU rms_norm is a chain of whole-tensor ops, and even the fewest aten ops that
 * compute it make three passes forward and three backward, where layer_norm's kernels make one
 * (benchmarks/RESULTS.md). These loops visit a row once: forward, the sum of squares and then the
 * scaled row while it is still in L1; backward, the row's dot product and then its gradient, adding
 * the weight's gradient into a per-thread row.
 *
 * Built by lmforge/model/cpu_kernels.py with the system's C compiler and loaded with ctypes; rows are
 * split over OpenMP threads, which are PyTorch's own: the library links libgomp.so.1 by soname and
 * the loader hands it the copy PyTorch already loaded. Computed in fp32; tensors are fp32 or bf16
 * (rounded to nearest even, as PyTorch rounds). A row r of x starts at
 * (r / inner) * outer_stride + (r % inner) * inner_stride elements: a contiguous tensor, or a
 * per-head view of a fused qkv projection; y, grad and dx are contiguous.
 */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef uint16_t bf16;

static inline float from_bf16(bf16 v) {
    uint32_t bits = (uint32_t)v << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static inline bf16 to_bf16(float f) {
    uint32_t bits;
    memcpy(&bits, &f, sizeof bits);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return (bf16)((bits >> 16) | 0x40u); /* a quiet NaN */
    bits += 0x7fffu + ((bits >> 16) & 1u);
    return (bf16)(bits >> 16);
}

typedef struct {
    int64_t rows, inner, outer_stride, inner_stride, d;
    const void *x, *weight, *grad;
    int x_bf16, weight_bf16;
    float eps;
    void *y, *dx;        /* NULL: that result is not wanted */
    float *rstd, *dweight; /* rstd: one per row; dweight: one d-row per thread, zeroed, or NULL */
} rms_job;

static inline int64_t row_offset(const rms_job *job, int64_t r) {
    return (r / job->inner) * job->outer_stride + (r % job->inner) * job->inner_stride;
}

/* The weight in fp32, a copy for the calling thread, on the heap: a row as wide as MAX_WIDTH is
 * 64 KiB, more than a small thread stack holds (OMP_STACKSIZE, Python's threading.stack_size).
 * NULL when out of memory. */
static float *load_weight(const rms_job *job) {
    float *w = malloc((size_t)job->d * sizeof *w);
    if (w)
        for (int64_t c = 0; c < job->d; c++)
            w[c] = job->weight_bf16 ? from_bf16(((const bf16 *)job->weight)[c]) : ((const float *)job->weight)[c];
    return w;
}

static inline float from_fp32(float v) { return v; }
static inline float to_fp32(float v) { return v; }

/* One row each way for one element type T, read with LOAD and written with STORE. Each loop reads
 * its operands straight from the tensors: copying the row into a local buffer first measured 2x
 * slower (the copies defeat the prefetch of the row's next use). */
#define ROW_KERNELS(T, LOAD, STORE)                                                                  \
    static float forward_row_##T(const T *x, T *y, const float *w, int64_t d, float eps) {           \
        float sum = 0.f;                                                                             \
        _Pragma("omp simd reduction(+ : sum)") for (int64_t c = 0; c < d; c++) {                     \
            const float v = LOAD(x[c]);                                                              \
            sum += v * v;                                                                            \
        }                                                                                            \
        const float rstd = 1.f / sqrtf(sum / (float)d + eps);                                        \
        _Pragma("omp simd") for (int64_t c = 0; c < d; c++) y[c] = STORE(LOAD(x[c]) * rstd * w[c]);  \
        return rstd;                                                                                 \
    }                                                                                                \
    /* dx = rstd·(g·w) − x·rstd³·mean(g·w·x); dweight += g·x·rstd */                                  \
    static void backward_row_##T(const T *x, const T *g, const float *w, float rstd, int64_t d,      \
                                 T *dx, float *dweight) {                                            \
        if (!dx) {                                                                                   \
            _Pragma("omp simd") for (int64_t c = 0; c < d; c++) dweight[c] += LOAD(g[c]) * LOAD(x[c]) * rstd; \
            return;                                                                                  \
        }                                                                                            \
        float dot = 0.f;                                                                             \
        _Pragma("omp simd reduction(+ : dot)") for (int64_t c = 0; c < d; c++) dot += LOAD(g[c]) * w[c] * LOAD(x[c]); \
        const float k = dot * rstd * rstd * rstd / (float)d;                                         \
        if (!dweight) {                                                                              \
            _Pragma("omp simd") for (int64_t c = 0; c < d; c++) dx[c] = STORE(LOAD(g[c]) * w[c] * rstd - LOAD(x[c]) * k); \
            return;                                                                                  \
        }                                                                                            \
        _Pragma("omp simd") for (int64_t c = 0; c < d; c++) {                                        \
            const float gv = LOAD(g[c]), xv = LOAD(x[c]);                                            \
            dx[c] = STORE(gv * w[c] * rstd - xv * k);                                                \
            dweight[c] += gv * xv * rstd;                                                            \
        }                                                                                            \
    }

ROW_KERNELS(float, from_fp32, to_fp32)
ROW_KERNELS(bf16, from_bf16, to_bf16)

/* Rows begin..end, forward, or backward adding into this thread's `dweight` row (or NULL). */
static int run_rows(const rms_job *job, int64_t begin, int64_t end, int backward, float *dweight) {
    const int64_t d = job->d;
    float *w = load_weight(job);
    if (!w) return 1;
    for (int64_t r = begin; r < end; r++) {
        const int64_t at = row_offset(job, r);
        if (!backward && job->x_bf16)
            job->rstd[r] = forward_row_bf16((const bf16 *)job->x + at, (bf16 *)job->y + r * d, w, d, job->eps);
        else if (!backward)
            job->rstd[r] = forward_row_float((const float *)job->x + at, (float *)job->y + r * d, w, d, job->eps);
        else if (job->x_bf16)
            backward_row_bf16((const bf16 *)job->x + at, (const bf16 *)job->grad + r * d, w, job->rstd[r], d,
                              job->dx ? (bf16 *)job->dx + r * d : NULL, dweight);
        else
            backward_row_float((const float *)job->x + at, (const float *)job->grad + r * d, w, job->rstd[r], d,
                               job->dx ? (float *)job->dx + r * d : NULL, dweight);
    }
    free(w);
    return 0;
}

/* Rows split evenly over `threads` (1: no parallel region at all). Nonzero: out of memory. */
static int run(const rms_job *job, int threads, int backward) {
    if (threads > job->rows) threads = job->rows > 1 ? (int)job->rows : 1;
    int failed = 0;
#pragma omp parallel num_threads(threads) if (threads > 1) reduction(|| : failed)
    {
        const int64_t t = omp_get_thread_num(), n = omp_get_num_threads();
        const int64_t begin = job->rows * t / n, end = job->rows * (t + 1) / n;
        failed = run_rows(job, begin, end, backward, job->dweight ? job->dweight + t * job->d : NULL);
    }
    return failed;
}

/* Both return 0, or nonzero when out of memory (the results are then incomplete). */
int lmforge_rms_norm_forward(int threads, int64_t rows, int64_t inner, int64_t outer_stride,
                              int64_t inner_stride, int64_t d, const void *x, int x_bf16,
                              const void *weight, int weight_bf16, float eps, void *y, float *rstd) {
    rms_job job = {rows, inner, outer_stride, inner_stride, d, x, weight, NULL, x_bf16, weight_bf16,
                   eps, y, NULL, rstd, NULL};
    return run(&job, threads, 0);
}

int lmforge_rms_norm_backward(int threads, int64_t rows, int64_t inner, int64_t outer_stride,
                               int64_t inner_stride, int64_t d, const void *x, int x_bf16,
                               const void *weight, int weight_bf16, const void *grad,
                               const float *rstd, void *dx, float *dweight) {
    rms_job job = {rows, inner, outer_stride, inner_stride, d, x, weight, grad, x_bf16, weight_bf16,
                   0.f, NULL, dx, (float *)rstd, dweight};
    if (!dx && !dweight) return 0; /* neither wanted: nothing to compute */
    return run(&job, threads, 1);
}
