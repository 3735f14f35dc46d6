/* The CUDA build of the star-product (libnkat_cuda.so): same math and layout as
 * nkat_kernels.h, on device pointers. Loaded at run time (dlopen) by the hook only when a
 * llama.cpp tensor lives in device memory; never required.
 * All functions return 0 on success, else a cudaError_t value (see nkat_cuda_error_string).
 */
#ifndef NKAT_CUDA_H
#define NKAT_CUDA_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define NKAT_CUDA_API_VERSION 2
/* B is tiled as in nkat_kernels.h: [ceil(n_out / 64)][rank][64], zero-padded. */
#define NKAT_CUDA_TILE 64

int nkat_cuda_api_version(void);
/* Number of usable devices (0 when there is no GPU or driver). */
int nkat_cuda_device_count(void);
/* Copy n host bytes to a new allocation on the device that owns `like` (a device pointer). */
int nkat_cuda_upload(const void *like, const void *src, size_t n, void **dst);
void nkat_cuda_release(void *dev);
/* y[:, c] += s * B (A x[:, c]); every pointer is device memory on one device (Bt_q tiled).
 * Synchronous. */
int nkat_cuda_star_apply(int64_t n_out, int64_t n_in, int64_t rank, const int8_t *A_q, const float *A_s,
                         const int8_t *Bt_q, const float *B_s, const float *x, int64_t x_stride, float *y,
                         int64_t y_stride, int64_t n_cols, float s);
const char *nkat_cuda_error_string(int code);

typedef int (*nkat_cuda_upload_fn)(const void *, const void *, size_t, void **);
typedef void (*nkat_cuda_release_fn)(void *);
typedef int (*nkat_cuda_star_apply_fn)(int64_t, int64_t, int64_t, const int8_t *, const float *, const int8_t *,
                                       const float *, const float *, int64_t, float *, int64_t, int64_t, float);
typedef const char *(*nkat_cuda_error_string_fn)(int);

#ifdef __cplusplus
}
#endif

#endif
