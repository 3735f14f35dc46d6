/* INT8 star-product kernels: y += s * B (A x), with per-row scales.
 *
 * Storage (what the registry and the kernels use):
 *   A_q  int8  [rank][n_in]   row-major; A[k][i] = A_q[k][i] * A_s[k]
 *   Bt_q int8  [rank][n_out]  B transposed; B[o][k] = Bt_q[k][o] * B_s[o]
 * Columns of x and y (one per token) are contiguous vectors of n_in / n_out floats,
 * `x_stride` / `y_stride` floats apart.
 */
#ifndef NKAT_KERNELS_H
#define NKAT_KERNELS_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define NKAT_MAX_RANK 4096

enum nkat_isa { NKAT_ISA_SCALAR = 0, NKAT_ISA_AVX2 = 1, NKAT_ISA_AVX512 = 2 };

typedef struct nkat_factors {
    int64_t n_out, n_in, rank;
    const int8_t *A_q;   /* rank x n_in */
    const float *A_s;    /* rank */
    const int8_t *Bt_q;  /* rank x n_out */
    const float *B_s;    /* n_out */
} nkat_factors;

/* y[:, c] += s * B (A x[:, c]) for c < n_cols. Returns 0, or -1 on bad arguments. */
int nkat_star_apply(const nkat_factors *f, const float *x, int64_t x_stride, float *y,
                    int64_t y_stride, int64_t n_cols, float s, int n_threads);

/* The ISA in use ("avx512", "avx2", "scalar"), the best one this CPU supports, and a way to
 * force one (for tests): returns 0, or -1 if the CPU lacks it. */
const char *nkat_isa_name(void);
int nkat_isa_best(void);
int nkat_isa_set(int isa);

#ifdef __cplusplus
}
#endif

#endif
