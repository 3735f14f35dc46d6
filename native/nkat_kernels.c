/* INT8 star-product kernels with run-time ISA dispatch (AVX-512 / AVX2+FMA / scalar) and
 * OpenMP threading over columns. See nkat_kernels.h for the storage layout.
 *
 * Two phases per input column x:
 *   A phase: t[k] = A_s[k] * sum_i A_q[k][i] * x[i]            (rank dot products, 4 rows at once)
 *   B phase: y[o] += s * B_s[o] * sum_k B_q[o][k] * t[k]       (one tile of 64 outputs at a time,
 *                                                                its rank x 64 bytes read in order)
 * Accumulation is in float; the only difference from a float64 reference with the same int8
 * factors is summation order (relative error ~1e-6). Enough independent accumulators are kept
 * that FMA latency does not bound the loops; the loads of A and B are sequential streams.
 */
#include "nkat_kernels.h"

#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define NKAT_X86 1
#endif

#ifdef _OPENMP
#include <omp.h>
#endif

/* Below this much theta traffic per call, threads cost more than they save. */
#define NKAT_PAR_MIN_BYTES (384 * 1024)

typedef void (*a_phase_fn)(const nkat_factors *f, int64_t k0, int64_t k1, const float *x, float *t);
typedef void (*b_phase_fn)(const nkat_factors *f, int64_t tile0, int64_t tile1, const float *t, float s, float *y);

static inline int64_t n_tiles(int64_t n_out) { return (n_out + NKAT_TILE - 1) / NKAT_TILE; }

int64_t nkat_tiled_b_size(int64_t rank, int64_t n_out) { return n_tiles(n_out) * rank * NKAT_TILE; }

void nkat_tile_b(const int8_t *Bt_plain, int64_t rank, int64_t n_out, int8_t *Bt_tiled) {
    memset(Bt_tiled, 0, (size_t)nkat_tiled_b_size(rank, n_out));
    for (int64_t tile = 0; tile < n_tiles(n_out); tile++) {
        const int64_t o0 = tile * NKAT_TILE;
        const int64_t width = n_out - o0 < NKAT_TILE ? n_out - o0 : NKAT_TILE;
        for (int64_t k = 0; k < rank; k++)
            memcpy(Bt_tiled + (tile * rank + k) * NKAT_TILE, Bt_plain + k * n_out + o0, (size_t)width);
    }
}

/* y[o0 .. o0+width) += s * B_s * acc, for a tile's accumulators held in acc[NKAT_TILE]. */
static void store_tile(const float *acc, const float *B_s, float s, float *y, int64_t width) {
    for (int64_t j = 0; j < width; j++) y[j] += s * B_s[j] * acc[j];
}

/* ---------------------------------------------------------------- scalar ------------ */

static void a_phase_scalar(const nkat_factors *f, int64_t k0, int64_t k1, const float *x, float *t) {
    for (int64_t k = k0; k < k1; k++) {
        const int8_t *a = f->A_q + k * f->n_in;
        float acc = 0.0f;
        for (int64_t i = 0; i < f->n_in; i++) acc += (float)a[i] * x[i];
        t[k] = acc * f->A_s[k];
    }
}

static void b_phase_scalar(const nkat_factors *f, int64_t tile0, int64_t tile1, const float *t, float s, float *y) {
    float acc[NKAT_TILE];
    for (int64_t tile = tile0; tile < tile1; tile++) {
        const int8_t *b = f->Bt_q + tile * f->rank * NKAT_TILE;
        memset(acc, 0, sizeof acc);
        for (int64_t k = 0; k < f->rank; k++)
            for (int j = 0; j < NKAT_TILE; j++) acc[j] += (float)b[k * NKAT_TILE + j] * t[k];
        const int64_t o0 = tile * NKAT_TILE;
        store_tile(acc, f->B_s + o0, s, y + o0, f->n_out - o0 < NKAT_TILE ? f->n_out - o0 : NKAT_TILE);
    }
}

#ifdef NKAT_X86
/* ---------------------------------------------------------------- AVX2 + FMA ------- */

#define NKAT_AVX2 __attribute__((target("avx2,fma")))

NKAT_AVX2 static inline __m256 i8x8_ps(const int8_t *p) {
    /* movq: an unaligned 8-byte load that reads nothing past p + 8 */
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
}

NKAT_AVX2 static inline float hsum256(__m256 v) {
    __m128 lo = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
    lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
    return _mm_cvtss_f32(lo);
}

/* One row: two accumulators, 16 elements per step, scalar tail. */
NKAT_AVX2 static float dot_row_avx2(const int8_t *a, const float *x, int64_t n) {
    __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        s0 = _mm256_fmadd_ps(i8x8_ps(a + i), _mm256_loadu_ps(x + i), s0);
        s1 = _mm256_fmadd_ps(i8x8_ps(a + i + 8), _mm256_loadu_ps(x + i + 8), s1);
    }
    for (; i + 8 <= n; i += 8) s0 = _mm256_fmadd_ps(i8x8_ps(a + i), _mm256_loadu_ps(x + i), s0);
    float acc = hsum256(_mm256_add_ps(s0, s1));
    for (; i < n; i++) acc += (float)a[i] * x[i];
    return acc;
}

/* Four rows share each load of x; two accumulators per row (eight FMA chains). */
NKAT_AVX2 static void a_phase_avx2(const nkat_factors *f, int64_t k0, int64_t k1, const float *x, float *t) {
    const int64_t n = f->n_in;
    int64_t k = k0;
    for (; k + 4 <= k1; k += 4) {
        const int8_t *a0 = f->A_q + k * n, *a1 = a0 + n, *a2 = a1 + n, *a3 = a2 + n;
        __m256 s0 = _mm256_setzero_ps(), s1 = s0, s2 = s0, s3 = s0, u0 = s0, u1 = s0, u2 = s0, u3 = s0;
        int64_t i = 0;
        for (; i + 16 <= n; i += 16) {
            const __m256 xa = _mm256_loadu_ps(x + i), xb = _mm256_loadu_ps(x + i + 8);
            s0 = _mm256_fmadd_ps(i8x8_ps(a0 + i), xa, s0);
            s1 = _mm256_fmadd_ps(i8x8_ps(a1 + i), xa, s1);
            s2 = _mm256_fmadd_ps(i8x8_ps(a2 + i), xa, s2);
            s3 = _mm256_fmadd_ps(i8x8_ps(a3 + i), xa, s3);
            u0 = _mm256_fmadd_ps(i8x8_ps(a0 + i + 8), xb, u0);
            u1 = _mm256_fmadd_ps(i8x8_ps(a1 + i + 8), xb, u1);
            u2 = _mm256_fmadd_ps(i8x8_ps(a2 + i + 8), xb, u2);
            u3 = _mm256_fmadd_ps(i8x8_ps(a3 + i + 8), xb, u3);
        }
        for (; i + 8 <= n; i += 8) {
            const __m256 xa = _mm256_loadu_ps(x + i);
            s0 = _mm256_fmadd_ps(i8x8_ps(a0 + i), xa, s0);
            s1 = _mm256_fmadd_ps(i8x8_ps(a1 + i), xa, s1);
            s2 = _mm256_fmadd_ps(i8x8_ps(a2 + i), xa, s2);
            s3 = _mm256_fmadd_ps(i8x8_ps(a3 + i), xa, s3);
        }
        float r0 = hsum256(_mm256_add_ps(s0, u0)), r1 = hsum256(_mm256_add_ps(s1, u1));
        float r2 = hsum256(_mm256_add_ps(s2, u2)), r3 = hsum256(_mm256_add_ps(s3, u3));
        for (; i < n; i++) {
            r0 += (float)a0[i] * x[i];
            r1 += (float)a1[i] * x[i];
            r2 += (float)a2[i] * x[i];
            r3 += (float)a3[i] * x[i];
        }
        t[k] = r0 * f->A_s[k];
        t[k + 1] = r1 * f->A_s[k + 1];
        t[k + 2] = r2 * f->A_s[k + 2];
        t[k + 3] = r3 * f->A_s[k + 3];
    }
    for (; k < k1; k++) t[k] = dot_row_avx2(f->A_q + k * n, x, n) * f->A_s[k];
}

/* A tile of 64 outputs in eight accumulators of 8 (eight FMA chains per k). */
NKAT_AVX2 static void b_phase_avx2(const nkat_factors *f, int64_t tile0, int64_t tile1, const float *t, float s, float *y) {
    const int64_t rank = f->rank;
    const __m256 sv = _mm256_set1_ps(s);
    for (int64_t tile = tile0; tile < tile1; tile++) {
        const int8_t *b = f->Bt_q + tile * rank * NKAT_TILE;
        __m256 c[8];
        for (int j = 0; j < 8; j++) c[j] = _mm256_setzero_ps();
        for (int64_t k = 0; k < rank; k++, b += NKAT_TILE) {
            const __m256 tk = _mm256_set1_ps(t[k]);
            for (int j = 0; j < 8; j++) c[j] = _mm256_fmadd_ps(i8x8_ps(b + 8 * j), tk, c[j]);
        }
        const int64_t o0 = tile * NKAT_TILE;
        if (f->n_out - o0 >= NKAT_TILE) {
            for (int j = 0; j < 8; j++) {
                const __m256 scale = _mm256_mul_ps(sv, _mm256_loadu_ps(f->B_s + o0 + 8 * j));
                _mm256_storeu_ps(y + o0 + 8 * j, _mm256_fmadd_ps(c[j], scale, _mm256_loadu_ps(y + o0 + 8 * j)));
            }
        } else {
            float acc[NKAT_TILE];
            for (int j = 0; j < 8; j++) _mm256_storeu_ps(acc + 8 * j, c[j]);
            store_tile(acc, f->B_s + o0, s, y + o0, f->n_out - o0);
        }
    }
}

/* ---------------------------------------------------------------- AVX-512 ---------- */

#define NKAT_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma")))

NKAT_AVX512 static inline __m512 i8x16_ps(const int8_t *p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)));
}

NKAT_AVX512 static inline __m512 i8x16_masked_ps(__mmask16 m, const int8_t *p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(m, p)));
}

/* Four rows share each load of x; two accumulators per row; masked tail (no read past a row). */
NKAT_AVX512 static void a_phase_avx512(const nkat_factors *f, int64_t k0, int64_t k1, const float *x, float *t) {
    const int64_t n = f->n_in;
    int64_t k = k0;
    for (; k + 4 <= k1; k += 4) {
        const int8_t *a0 = f->A_q + k * n, *a1 = a0 + n, *a2 = a1 + n, *a3 = a2 + n;
        __m512 s0 = _mm512_setzero_ps(), s1 = s0, s2 = s0, s3 = s0, u0 = s0, u1 = s0, u2 = s0, u3 = s0;
        int64_t i = 0;
        for (; i + 32 <= n; i += 32) {
            const __m512 xa = _mm512_loadu_ps(x + i), xb = _mm512_loadu_ps(x + i + 16);
            s0 = _mm512_fmadd_ps(i8x16_ps(a0 + i), xa, s0);
            s1 = _mm512_fmadd_ps(i8x16_ps(a1 + i), xa, s1);
            s2 = _mm512_fmadd_ps(i8x16_ps(a2 + i), xa, s2);
            s3 = _mm512_fmadd_ps(i8x16_ps(a3 + i), xa, s3);
            u0 = _mm512_fmadd_ps(i8x16_ps(a0 + i + 16), xb, u0);
            u1 = _mm512_fmadd_ps(i8x16_ps(a1 + i + 16), xb, u1);
            u2 = _mm512_fmadd_ps(i8x16_ps(a2 + i + 16), xb, u2);
            u3 = _mm512_fmadd_ps(i8x16_ps(a3 + i + 16), xb, u3);
        }
        for (; i < n; i += 16) {
            const __mmask16 m = n - i >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - i)) - 1u);
            const __m512 xa = _mm512_maskz_loadu_ps(m, x + i);
            s0 = _mm512_fmadd_ps(i8x16_masked_ps(m, a0 + i), xa, s0);
            s1 = _mm512_fmadd_ps(i8x16_masked_ps(m, a1 + i), xa, s1);
            s2 = _mm512_fmadd_ps(i8x16_masked_ps(m, a2 + i), xa, s2);
            s3 = _mm512_fmadd_ps(i8x16_masked_ps(m, a3 + i), xa, s3);
        }
        t[k] = _mm512_reduce_add_ps(_mm512_add_ps(s0, u0)) * f->A_s[k];
        t[k + 1] = _mm512_reduce_add_ps(_mm512_add_ps(s1, u1)) * f->A_s[k + 1];
        t[k + 2] = _mm512_reduce_add_ps(_mm512_add_ps(s2, u2)) * f->A_s[k + 2];
        t[k + 3] = _mm512_reduce_add_ps(_mm512_add_ps(s3, u3)) * f->A_s[k + 3];
    }
    for (; k < k1; k++) {
        const int8_t *a = f->A_q + k * n;
        __m512 s0 = _mm512_setzero_ps(), u0 = s0;
        int64_t i = 0;
        for (; i + 32 <= n; i += 32) {
            s0 = _mm512_fmadd_ps(i8x16_ps(a + i), _mm512_loadu_ps(x + i), s0);
            u0 = _mm512_fmadd_ps(i8x16_ps(a + i + 16), _mm512_loadu_ps(x + i + 16), u0);
        }
        for (; i < n; i += 16) {
            const __mmask16 m = n - i >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - i)) - 1u);
            s0 = _mm512_fmadd_ps(i8x16_masked_ps(m, a + i), _mm512_maskz_loadu_ps(m, x + i), s0);
        }
        t[k] = _mm512_reduce_add_ps(_mm512_add_ps(s0, u0)) * f->A_s[k];
    }
}

/* A tile of 64 outputs: four accumulators of 16 for even k and four for odd k (eight chains). */
NKAT_AVX512 static void b_phase_avx512(const nkat_factors *f, int64_t tile0, int64_t tile1, const float *t, float s, float *y) {
    const int64_t rank = f->rank;
    const __m512 sv = _mm512_set1_ps(s);
    for (int64_t tile = tile0; tile < tile1; tile++) {
        const int8_t *b = f->Bt_q + tile * rank * NKAT_TILE;
        __m512 c0 = _mm512_setzero_ps(), c1 = c0, c2 = c0, c3 = c0, d0 = c0, d1 = c0, d2 = c0, d3 = c0;
        int64_t k = 0;
        for (; k + 2 <= rank; k += 2, b += 2 * NKAT_TILE) {
            const __m512 t0 = _mm512_set1_ps(t[k]), t1 = _mm512_set1_ps(t[k + 1]);
            c0 = _mm512_fmadd_ps(i8x16_ps(b), t0, c0);
            c1 = _mm512_fmadd_ps(i8x16_ps(b + 16), t0, c1);
            c2 = _mm512_fmadd_ps(i8x16_ps(b + 32), t0, c2);
            c3 = _mm512_fmadd_ps(i8x16_ps(b + 48), t0, c3);
            d0 = _mm512_fmadd_ps(i8x16_ps(b + 64), t1, d0);
            d1 = _mm512_fmadd_ps(i8x16_ps(b + 80), t1, d1);
            d2 = _mm512_fmadd_ps(i8x16_ps(b + 96), t1, d2);
            d3 = _mm512_fmadd_ps(i8x16_ps(b + 112), t1, d3);
        }
        if (k < rank) {
            const __m512 t0 = _mm512_set1_ps(t[k]);
            c0 = _mm512_fmadd_ps(i8x16_ps(b), t0, c0);
            c1 = _mm512_fmadd_ps(i8x16_ps(b + 16), t0, c1);
            c2 = _mm512_fmadd_ps(i8x16_ps(b + 32), t0, c2);
            c3 = _mm512_fmadd_ps(i8x16_ps(b + 48), t0, c3);
        }
        const __m512 acc[4] = {_mm512_add_ps(c0, d0), _mm512_add_ps(c1, d1), _mm512_add_ps(c2, d2),
                               _mm512_add_ps(c3, d3)};
        const int64_t o0 = tile * NKAT_TILE;
        const int64_t width = f->n_out - o0 < NKAT_TILE ? f->n_out - o0 : NKAT_TILE;
        for (int j = 0; j < 4 && 16 * j < width; j++) {
            const int64_t left = width - 16 * j;
            const __mmask16 m = left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1u);
            const __m512 scale = _mm512_mul_ps(sv, _mm512_maskz_loadu_ps(m, f->B_s + o0 + 16 * j));
            const __m512 yj = _mm512_maskz_loadu_ps(m, y + o0 + 16 * j);
            _mm512_mask_storeu_ps(y + o0 + 16 * j, m, _mm512_fmadd_ps(acc[j], scale, yj));
        }
    }
}
#endif /* NKAT_X86 */

/* ---------------------------------------------------------------- dispatch --------- */

static int g_isa = -1;

int nkat_isa_best(void) {
#ifdef NKAT_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl"))
        return NKAT_ISA_AVX512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return NKAT_ISA_AVX2;
#endif
    return NKAT_ISA_SCALAR;
}

static int current_isa(void) {
    if (g_isa < 0) g_isa = nkat_isa_best();
    return g_isa;
}

int nkat_isa_set(int isa) {
    if (isa < NKAT_ISA_SCALAR || isa > NKAT_ISA_AVX512) return -1;
    if (isa > nkat_isa_best()) return -1;
    g_isa = isa;
    return 0;
}

const char *nkat_isa_name(void) {
    switch (current_isa()) {
    case NKAT_ISA_AVX512: return "avx512";
    case NKAT_ISA_AVX2: return "avx2";
    default: return "scalar";
    }
}

static void pick_phases(a_phase_fn *a, b_phase_fn *b) {
    *a = a_phase_scalar;
    *b = b_phase_scalar;
#ifdef NKAT_X86
    switch (current_isa()) {
    case NKAT_ISA_AVX512: *a = a_phase_avx512; *b = b_phase_avx512; break;
    case NKAT_ISA_AVX2: *a = a_phase_avx2; *b = b_phase_avx2; break;
    default: break;
    }
#endif
}

/* ---------------------------------------------------------------- driver ----------- */

/* Threads split the columns (prompt batches). A single column stays on one thread: measured
 * here, one core already streams theta at close to the machine's read bandwidth, and splitting
 * one column's rows costs a fork and a barrier per matrix, ruinous when a core is busy. */
static int threads_for(const nkat_factors *f, int64_t n_cols, int n_threads) {
    const int64_t bytes = f->rank * (f->n_in + f->n_out) * n_cols;
    if (n_threads <= 1 || bytes < NKAT_PAR_MIN_BYTES || n_cols < 2 * (int64_t)n_threads) return 1;
    return n_threads;
}

static void columns_serial(const nkat_factors *f, a_phase_fn a, b_phase_fn b, const float *x, int64_t x_stride,
                           float *y, int64_t y_stride, int64_t c0, int64_t c1, float s) {
    float t[NKAT_MAX_RANK];
    for (int64_t c = c0; c < c1; c++) {
        a(f, 0, f->rank, x + c * x_stride, t);
        b(f, 0, n_tiles(f->n_out), t, s, y + c * y_stride);
    }
}

int nkat_star_apply(const nkat_factors *f, const float *x, int64_t x_stride, float *y, int64_t y_stride,
                    int64_t n_cols, float s, int n_threads) {
    if (!f || !x || !y || !f->A_q || !f->A_s || !f->Bt_q || !f->B_s) return -1;
    if (f->rank < 1 || f->rank > NKAT_MAX_RANK || f->n_in < 1 || f->n_out < 1 || n_cols < 0) return -1;
    if ((n_cols > 1 && (x_stride < f->n_in || y_stride < f->n_out))) return -1;
    if (n_cols == 0 || s == 0.0f) return 0;
    a_phase_fn a;
    b_phase_fn b;
    pick_phases(&a, &b);
    const int nt = threads_for(f, n_cols, n_threads);
    if (nt <= 1) {
        columns_serial(f, a, b, x, x_stride, y, y_stride, 0, n_cols, s);
        return 0;
    }
#pragma omp parallel num_threads(nt)
    {
        int id = 0, n = 1;
#ifdef _OPENMP
        id = omp_get_thread_num();
        n = omp_get_num_threads();
#endif
        columns_serial(f, a, b, x, x_stride, y, y_stride, n_cols * id / n, n_cols * (id + 1) / n, s);
    }
    return 0;
}
