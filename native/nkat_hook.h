/* The llama.cpp eval-callback hook: a registry of INT8 theta factors keyed by weight name,
 * applied after each matching MUL_MAT node ("apply" mode), or per-weight activation
 * statistics (sum of x_i^2 over input columns, "collect" mode, the imatrix), or a copy of
 * each input column into a caller's buffer ("capture" mode: the covariance collector sums
 * x x^T over the copied columns with BLAS after each decode).
 *
 * One hook per llama.cpp context; the callback runs on the thread that calls llama_decode.
 * Configure it (add, set_scale, ...) between decodes, not during one.
 */
#ifndef NKAT_HOOK_H
#define NKAT_HOOK_H

#include <stdbool.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

enum nkat_mode { NKAT_MODE_APPLY = 0, NKAT_MODE_COLLECT = 1, NKAT_MODE_CAPTURE = 2 };

/* Why a claimed node was left alone (counted, never fatal). */
enum nkat_skip {
    NKAT_SKIP_OP = 0,    /* not MUL_MAT by ggml_op_name: header/library mismatch */
    NKAT_SKIP_TYPE,      /* input or output is not F32 */
    NKAT_SKIP_SHAPE,     /* weight/input/output shape disagrees with the registered factors */
    NKAT_SKIP_LAYOUT,    /* non-contiguous rows or odd strides */
    NKAT_SKIP_NO_DATA,   /* no buffer or data pointer */
    NKAT_SKIP_DEVICE,    /* device memory and no CUDA library loaded */
    NKAT_SKIP_BOUNDS,    /* the access would leave the tensor's buffer */
    NKAT_SKIP_KERNEL,    /* the kernel (CPU or CUDA) reported an error */
    NKAT_SKIP_COUNT
};

#define NKAT_DETAIL_LEN 320

typedef struct nkat_stats {
    int64_t applied;  /* nodes corrected (apply) or collected (collect) */
    int64_t skipped;
    int64_t reasons[NKAT_SKIP_COUNT];
    int64_t work_ns;  /* time spent applying / collecting inside the callback */
    char detail[NKAT_DETAIL_LEN]; /* the first skip since the last reset, in words */
} nkat_stats;

typedef struct nkat_hook nkat_hook;

/* NULL when the running libggml agrees with the headers this was compiled against
 * (struct ggml_tensor layout, GGML_OP_MUL_MAT, names); otherwise what disagrees. */
const char *nkat_abi_check(void);

nkat_hook *nkat_hook_new(int mode, int capacity);
void nkat_hook_free(nkat_hook *h);

/* Apply mode: copy one weight's factors in (A_q [rank][n_in], Bt_q plain [rank][n_out]; the
 * registry keeps B in the tiled layout of nkat_kernels.h). Returns the
 * entry index, -1 on bad arguments, -2 when full or the name is taken, -3 out of memory. */
int nkat_hook_add_factors(nkat_hook *h, const char *name, int64_t n_out, int64_t n_in, int64_t rank,
                          const int8_t *A_q, const float *A_s, const int8_t *Bt_q, const float *B_s);
/* Collect mode: one weight whose inputs (n_in long) are summed. Same return codes. */
int nkat_hook_add_target(nkat_hook *h, const char *name, int64_t n_in);
/* Capture mode: one weight whose input columns are appended to `buffer` (room for `capacity`
 * columns of n_in floats, owned by the caller and kept alive while the hook lives). A node
 * that would overflow it is skipped (bounds). Same return codes. */
int nkat_hook_add_capture(nkat_hook *h, const char *name, int64_t n_in, float *buffer, int64_t capacity);
/* Capture mode: columns in entry `index`'s buffer since the last reset (-1 on bad arguments). */
int64_t nkat_hook_captured(const nkat_hook *h, int index);
/* Capture mode: empty every buffer (the next decode writes from column 0). */
void nkat_hook_capture_reset(nkat_hook *h);

/* Apply mode: y += scale * theta @ x. The caller owns the gamma -> scale rule (Python's
 * formats.nkat_format.applied_scale); 0 leaves the graph untouched. */
void nkat_hook_set_scale(nkat_hook *h, float scale);
float nkat_hook_get_scale(const nkat_hook *h);
void nkat_hook_set_enabled(nkat_hook *h, int enabled);
void nkat_hook_set_threads(nkat_hook *h, int n_threads);

/* dlopen the CUDA kernel library (libnkat_cuda.so); 0 on success, else err is filled. */
int nkat_hook_load_cuda(nkat_hook *h, const char *path, char *err, int err_len);
int nkat_hook_has_cuda(const nkat_hook *h);

void nkat_hook_stats(nkat_hook *h, nkat_stats *out, int reset);
const char *nkat_skip_name(int reason);

int nkat_hook_entry_count(const nkat_hook *h);
const char *nkat_hook_entry_name(const nkat_hook *h, int index);
int64_t nkat_hook_entry_n_in(const nkat_hook *h, int index);
/* Apply mode: matmul nodes entry `index` corrected so far (collect mode: columns summed). */
int64_t nkat_hook_entry_uses(const nkat_hook *h, int index);
/* Collect mode: copy entry `index`'s sums (n_in doubles) out; returns its column count or -1. */
int64_t nkat_hook_collected(const nkat_hook *h, int index, double *sum_sq);

/* The callback (ggml_backend_sched_eval_callback) and its address for ctypes. */
uintptr_t nkat_cb_eval_address(void);

#ifdef __cplusplus
}
#endif

#endif
