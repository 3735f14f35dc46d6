// CUDA star-product: y[:, c] += s * B (A x[:, c]) with per-row INT8 factors on device memory.
// Same layout as nkat_kernels.h (A_q rank x n_in, Bt_q rank x n_out, scales per row).
// Built into libnkat_cuda.so by native/build_cuda.py when nvcc exists; loaded by the hook only
// for tensors that live in device buffers.
#include <cuda_runtime.h>

#include "nkat_cuda.h"

namespace {

constexpr int kThreads = 256;

// Device scratch for t = A x (rank x n_cols floats), grown on demand, one per device.
constexpr int kMaxDevices = 16;
float *g_scratch[kMaxDevices] = {};
size_t g_scratch_floats[kMaxDevices] = {};

// One block per (row k of A, column c): t[c][k] = A_s[k] * dot(A_q[k], x[:, c]).
__global__ void a_phase(const int8_t *A_q, const float *A_s, int64_t n_in, int64_t rank, const float *x,
                        int64_t x_stride, float *t) {
    const int64_t k = blockIdx.x, c = blockIdx.y;
    const int8_t *a = A_q + k * n_in;
    const float *xc = x + c * x_stride;
    float acc = 0.0f;
    for (int64_t i = threadIdx.x; i < n_in; i += blockDim.x) acc += static_cast<float>(a[i]) * xc[i];
    for (int off = 16; off > 0; off >>= 1) acc += __shfl_down_sync(0xffffffffu, acc, off);
    __shared__ float warp_sums[kThreads / 32];
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    if (lane == 0) warp_sums[warp] = acc;
    __syncthreads();
    if (warp == 0) {
        acc = lane < static_cast<int>(blockDim.x / 32) ? warp_sums[lane] : 0.0f;
        for (int off = 16; off > 0; off >>= 1) acc += __shfl_down_sync(0xffffffffu, acc, off);
        if (lane == 0) t[c * rank + k] = acc * A_s[k];
    }
}

// One thread per output row o of column c (blockIdx.y). Bt_q is in the CPU kernels' tiled layout
// ([n_out/64][rank][64]), so a warp's 32 consecutive o read 32 consecutive bytes per k.
__global__ void b_phase(const int8_t *Bt_q, const float *B_s, int64_t n_out, int64_t rank, const float *t,
                        float s, float *y, int64_t y_stride) {
    const int64_t o = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x, c = blockIdx.y;
    if (o >= n_out) return;
    const float *tc = t + c * rank;
    const int8_t *b = Bt_q + (o / NKAT_CUDA_TILE) * rank * NKAT_CUDA_TILE + o % NKAT_CUDA_TILE;
    float acc = 0.0f;
    for (int64_t k = 0; k < rank; k++) acc += static_cast<float>(b[k * NKAT_CUDA_TILE]) * tc[k];
    y[c * y_stride + o] += s * B_s[o] * acc;
}

int device_of(const void *ptr, int *device) {
    cudaPointerAttributes attr;
    cudaError_t rc = cudaPointerGetAttributes(&attr, ptr);
    if (rc != cudaSuccess) return static_cast<int>(rc);
    if (attr.type != cudaMemoryTypeDevice && attr.type != cudaMemoryTypeManaged) return static_cast<int>(cudaErrorInvalidDevicePointer);
    if (attr.device < 0 || attr.device >= kMaxDevices) return static_cast<int>(cudaErrorInvalidDevice);
    *device = attr.device;
    return 0;
}

int scratch_for(int device, size_t floats, float **out) {
    if (g_scratch_floats[device] < floats) {
        if (g_scratch[device]) cudaFree(g_scratch[device]);
        g_scratch[device] = nullptr;
        g_scratch_floats[device] = 0;
        cudaError_t rc = cudaMalloc(reinterpret_cast<void **>(&g_scratch[device]), floats * sizeof(float));
        if (rc != cudaSuccess) return static_cast<int>(rc);
        g_scratch_floats[device] = floats;
    }
    *out = g_scratch[device];
    return 0;
}

}  // namespace

extern "C" {

int nkat_cuda_api_version(void) { return NKAT_CUDA_API_VERSION; }

int nkat_cuda_device_count(void) {
    int n = 0;
    return cudaGetDeviceCount(&n) == cudaSuccess ? n : 0;
}

int nkat_cuda_upload(const void *like, const void *src, size_t n, void **dst) {
    int device = 0;
    int rc = device_of(like, &device);
    if (rc != 0) return rc;
    if ((rc = static_cast<int>(cudaSetDevice(device))) != 0) return rc;
    if ((rc = static_cast<int>(cudaMalloc(dst, n ? n : 1))) != 0) return rc;
    rc = static_cast<int>(cudaMemcpy(*dst, src, n, cudaMemcpyHostToDevice));
    if (rc != 0) {
        cudaFree(*dst);
        *dst = nullptr;
    }
    return rc;
}

void nkat_cuda_release(void *dev) {
    if (dev) cudaFree(dev);
}

int nkat_cuda_star_apply(int64_t n_out, int64_t n_in, int64_t rank, const int8_t *A_q, const float *A_s,
                         const int8_t *Bt_q, const float *B_s, const float *x, int64_t x_stride, float *y,
                         int64_t y_stride, int64_t n_cols, float s) {
    if (n_out < 1 || n_in < 1 || rank < 1 || n_cols < 0 || n_cols > 65535 || rank > 2147483647LL)
        return static_cast<int>(cudaErrorInvalidValue);
    if (n_cols == 0 || s == 0.0f) return 0;
    int device = 0;
    int rc = device_of(y, &device);
    if (rc != 0) return rc;
    if ((rc = static_cast<int>(cudaSetDevice(device))) != 0) return rc;
    float *t = nullptr;
    if ((rc = scratch_for(device, static_cast<size_t>(rank * n_cols), &t)) != 0) return rc;
    a_phase<<<dim3(static_cast<unsigned>(rank), static_cast<unsigned>(n_cols)), kThreads>>>(A_q, A_s, n_in, rank, x,
                                                                                            x_stride, t);
    const unsigned blocks = static_cast<unsigned>((n_out + kThreads - 1) / kThreads);
    b_phase<<<dim3(blocks, static_cast<unsigned>(n_cols)), kThreads>>>(Bt_q, B_s, n_out, rank, t, s, y, y_stride);
    if ((rc = static_cast<int>(cudaGetLastError())) != 0) return rc;
    return static_cast<int>(cudaDeviceSynchronize());
}

const char *nkat_cuda_error_string(int code) { return cudaGetErrorString(static_cast<cudaError_t>(code)); }

}  // extern "C"
