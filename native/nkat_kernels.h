/* INT8 star-product kernels: y += s * B (A x), with per-row scales.
 *
 * Storage (what the registry and the kernels use):
 *   A_q  int8  [rank][n_in]   row-major; A[k][i] = A_q[k][i] * A_s[k]
 *   Bt_q int8  B transposed and cut into tiles of NKAT_TILE outputs, [n_tiles][rank][NKAT_TILE],
 *              zero-padded past n_out, so the B phase streams it front to back:
 *              B[o][k] = Bt_q[(o / NKAT_TILE) * rank * NKAT_TILE + k * NKAT_TILE + o % NKAT_TILE] * B_s[o]
 *              (nkat_tile_b makes it from the plain [rank][n_out] layout)
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
#define NKAT_TILE 64

enum nkat_isa { NKAT_ISA_SCALAR = 0, NKAT_ISA_AVX2 = 1, NKAT_ISA_AVX512 = 2 };

typedef struct nkat_factors {
    int64_t n_out, n_in, rank;
    const int8_t *A_q;   /* rank x n_in */
    const float *A_s;    /* rank */
    const int8_t *Bt_q;  /* tiled, nkat_tiled_b_size(rank, n_out) bytes */
    const float *B_s;    /* n_out */
} nkat_factors;

/* Bytes of the tiled B layout, and the conversion from plain Bt [rank][n_out] into it. */
int64_t nkat_tiled_b_size(int64_t rank, int64_t n_out);
void nkat_tile_b(const int8_t *Bt_plain, int64_t rank, int64_t n_out, int8_t *Bt_tiled);

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
