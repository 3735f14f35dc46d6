/* The eval-callback hook. Compiled against the ggml headers that llama-cpp-python ships
 * and linked to its libggml-base; see nkat_hook.h for the contract.
 *
 * Safety rules: a node is touched only after its op, types, shapes, strides, buffer kind and
 * byte extent have been checked against the registered entry; anything else is counted as a
 * skip (reported to Python after the decode) and the node is left as llama.cpp computed it.
 * The callback never aborts the graph (it returns true for every ask=false call).
 */
#include "nkat_hook.h"

#include <dlfcn.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "ggml-backend.h"
#include "ggml.h"
#include "nkat_cuda.h"
#include "nkat_kernels.h"

#define NKAT_MAGIC 0x4e4b4154484f4f4bULL /* "NKATHOOK" */

_Static_assert(NKAT_CUDA_TILE == NKAT_TILE, "the CUDA and CPU kernels must share the tiled B layout");

typedef struct nkat_entry {
    char name[GGML_MAX_NAME];
    int64_t n_out, n_in, rank;
    /* apply mode: host factors (owned) and their lazily made device copies */
    int8_t *A_q, *Bt_q;
    float *A_s, *B_s;
    void *dev[4];
    /* collect mode: sums; capture mode: the caller's buffer (not owned) */
    double *sum_sq;
    float *capture;
    int64_t capacity;
    int64_t count; /* collect: columns summed; capture: columns held; apply: nodes corrected */
} nkat_entry;

typedef struct nkat_cuda_api {
    void *handle;
    nkat_cuda_upload_fn upload;
    nkat_cuda_release_fn release;
    nkat_cuda_star_apply_fn star_apply;
    nkat_cuda_error_string_fn error_string;
} nkat_cuda_api;

struct nkat_hook {
    uint64_t magic;
    int mode;
    float scale; /* the factor on theta @ x: the caller's applied_scale(gamma), not gamma */
    int enabled;
    int n_threads;
    nkat_entry *entries;
    int n_entries, capacity;
    int32_t *table; /* open addressing: entry index or -1 */
    uint32_t table_mask;
    nkat_stats stats;
    nkat_cuda_api cuda;
    float *scratch; /* collect mode: host copy of a device input */
    size_t scratch_bytes;
};

/* ---------------------------------------------------------------- ABI check -------- */

const char *nkat_abi_check(void) {
    static char msg[256];
    struct ggml_init_params params = {16 * ggml_tensor_overhead() + 4096, NULL, true};
    struct ggml_context *ctx = ggml_init(params);
    if (!ctx) return "ggml_init failed";
    struct ggml_tensor *a = ggml_new_tensor_2d(ctx, GGML_TYPE_F16, 64, 3);
    struct ggml_tensor *b = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, 64, 5);
    ggml_set_name(a, "blk.0.abi_probe.weight");
    struct ggml_tensor *c = ggml_mul_mat(ctx, a, b);
    const char *bad = NULL;
    if (c->op != GGML_OP_MUL_MAT || strcmp(ggml_op_name(c->op), "MUL_MAT") != 0) bad = "GGML_OP_MUL_MAT value";
    else if (c->src[0] != a || c->src[1] != b) bad = "ggml_tensor.src offset";
    else if (ggml_get_name(a) != a->name || strcmp(a->name, "blk.0.abi_probe.weight") != 0) bad = "ggml_tensor.name offset";
    else if (a->ne[0] != 64 || a->ne[1] != 3 || a->nb[0] != 2 || b->nb[1] != 256) bad = "ggml_tensor.ne/nb offsets";
    else if (c->type != GGML_TYPE_F32 || c->ne[0] != 3 || c->ne[1] != 5 || ggml_nbytes(c) != 60) bad = "ggml_tensor.type or MUL_MAT shape";
    else if (c->buffer != NULL || c->data != NULL) bad = "ggml_tensor.buffer/data offsets";
    ggml_free(ctx);
    if (!bad) return NULL;
    snprintf(msg, sizeof msg, "libggml does not match the headers the shim was built with (%s); rebuild nkat-gguf", bad);
    return msg;
}

/* ---------------------------------------------------------------- registry --------- */

static uint32_t name_hash(const char *s, size_t n) {
    uint32_t h = 2166136261u;
    for (size_t i = 0; i < n; i++) h = (h ^ (uint8_t)s[i]) * 16777619u;
    return h;
}

static int find_entry(const nkat_hook *h, const char *s, size_t n) {
    if (n == 0 || n >= GGML_MAX_NAME) return -1;
    for (uint32_t slot = name_hash(s, n) & h->table_mask;; slot = (slot + 1) & h->table_mask) {
        const int32_t idx = h->table[slot];
        if (idx < 0) return -1;
        const nkat_entry *e = &h->entries[idx];
        if (strncmp(e->name, s, n) == 0 && e->name[n] == '\0') return idx;
    }
}

/* A weight's name as the scheduler shows it: "blk.5.attn_q.weight", or a copy made for
 * another backend, "CUDA0#blk.5.attn_q.weight#0". Try the whole name, then each part. */
static nkat_entry *lookup_weight(const nkat_hook *h, const struct ggml_tensor *w) {
    const char *name = w->name;
    const size_t len = strnlen(name, GGML_MAX_NAME);
    int idx = find_entry(h, name, len);
    if (idx >= 0) return &h->entries[idx];
    const char *part = name, *end = name + len;
    while (part < end) {
        const char *hash = memchr(part, '#', (size_t)(end - part));
        const char *stop = hash ? hash : end;
        if (stop != name + len || part != name) {
            idx = find_entry(h, part, (size_t)(stop - part));
            if (idx >= 0) return &h->entries[idx];
        }
        if (!hash) break;
        part = hash + 1;
    }
    return NULL;
}

nkat_hook *nkat_hook_new(int mode, int capacity) {
    if ((mode != NKAT_MODE_APPLY && mode != NKAT_MODE_COLLECT && mode != NKAT_MODE_CAPTURE) || capacity < 1 || capacity > (1 << 24)) return NULL;
    nkat_hook *h = calloc(1, sizeof *h);
    if (!h) return NULL;
    uint32_t table_size = 16;
    while (table_size < 2u * (uint32_t)capacity) table_size <<= 1;
    h->entries = calloc((size_t)capacity, sizeof *h->entries);
    h->table = malloc(sizeof(int32_t) * table_size);
    if (!h->entries || !h->table) {
        free(h->entries);
        free(h->table);
        free(h);
        return NULL;
    }
    memset(h->table, 0xff, sizeof(int32_t) * table_size);
    h->table_mask = table_size - 1;
    h->capacity = capacity;
    h->mode = mode;
    h->enabled = 1;
    h->n_threads = 1;
    h->magic = NKAT_MAGIC;
    return h;
}

static void free_entry(nkat_hook *h, nkat_entry *e) {
    free(e->A_q);
    free(e->A_s);
    free(e->Bt_q);
    free(e->B_s);
    free(e->sum_sq);
    for (int i = 0; i < 4; i++)
        if (e->dev[i] && h->cuda.release) h->cuda.release(e->dev[i]);
}

void nkat_hook_free(nkat_hook *h) {
    if (!h || h->magic != NKAT_MAGIC) return;
    for (int i = 0; i < h->n_entries; i++) free_entry(h, &h->entries[i]);
    free(h->entries);
    free(h->table);
    free(h->scratch);
    if (h->cuda.handle) dlclose(h->cuda.handle);
    h->magic = 0;
    free(h);
}

/* Reserve an entry for `name`: its index, -1 bad name, -2 full or taken. */
static int new_entry(nkat_hook *h, const char *name) {
    if (!h || h->magic != NKAT_MAGIC || !name) return -1;
    const size_t n = strlen(name);
    if (n == 0 || n >= GGML_MAX_NAME || memchr(name, '#', n)) return -1;
    if (h->n_entries >= h->capacity || find_entry(h, name, n) >= 0) return -2;
    const int idx = h->n_entries;
    memcpy(h->entries[idx].name, name, n + 1);
    return idx;
}

static void publish_entry(nkat_hook *h, int idx) {
    const nkat_entry *e = &h->entries[idx];
    uint32_t slot = name_hash(e->name, strlen(e->name)) & h->table_mask;
    while (h->table[slot] >= 0) slot = (slot + 1) & h->table_mask;
    h->table[slot] = idx;
    h->n_entries++;
}

static void *copy_of(const void *src, size_t n) {
    void *p = malloc(n ? n : 1);
    if (p) memcpy(p, src, n);
    return p;
}

int nkat_hook_add_factors(nkat_hook *h, const char *name, int64_t n_out, int64_t n_in, int64_t rank,
                          const int8_t *A_q, const float *A_s, const int8_t *Bt_q, const float *B_s) {
    if (!h || h->mode != NKAT_MODE_APPLY || !A_q || !A_s || !Bt_q || !B_s) return -1;
    if (n_out < 1 || n_in < 1 || rank < 1 || rank > NKAT_MAX_RANK || n_out > (1 << 30) || n_in > (1 << 30)) return -1;
    const int idx = new_entry(h, name);
    if (idx < 0) return idx;
    nkat_entry *e = &h->entries[idx];
    e->n_out = n_out;
    e->n_in = n_in;
    e->rank = rank;
    e->A_q = copy_of(A_q, (size_t)(rank * n_in));
    e->A_s = copy_of(A_s, sizeof(float) * (size_t)rank);
    e->Bt_q = malloc((size_t)nkat_tiled_b_size(rank, n_out));
    if (e->Bt_q) nkat_tile_b(Bt_q, rank, n_out, e->Bt_q);
    e->B_s = copy_of(B_s, sizeof(float) * (size_t)n_out);
    if (!e->A_q || !e->A_s || !e->Bt_q || !e->B_s) {
        free_entry(h, e);
        memset(e, 0, sizeof *e);
        return -3;
    }
    publish_entry(h, idx);
    return idx;
}

int nkat_hook_add_target(nkat_hook *h, const char *name, int64_t n_in) {
    if (!h || h->mode != NKAT_MODE_COLLECT || n_in < 1 || n_in > (1 << 30)) return -1;
    const int idx = new_entry(h, name);
    if (idx < 0) return idx;
    nkat_entry *e = &h->entries[idx];
    e->n_in = n_in;
    e->sum_sq = calloc((size_t)n_in, sizeof(double));
    if (!e->sum_sq) {
        memset(e, 0, sizeof *e);
        return -3;
    }
    publish_entry(h, idx);
    return idx;
}

int nkat_hook_add_capture(nkat_hook *h, const char *name, int64_t n_in, float *buffer, int64_t capacity) {
    if (!h || h->mode != NKAT_MODE_CAPTURE || !buffer || n_in < 1 || n_in > (1 << 30) || capacity < 1) return -1;
    const int idx = new_entry(h, name);
    if (idx < 0) return idx;
    nkat_entry *e = &h->entries[idx];
    e->n_in = n_in;
    e->capture = buffer;
    e->capacity = capacity;
    publish_entry(h, idx);
    return idx;
}

int64_t nkat_hook_captured(const nkat_hook *h, int i) {
    if (!h || h->mode != NKAT_MODE_CAPTURE || i < 0 || i >= h->n_entries) return -1;
    return h->entries[i].count;
}

void nkat_hook_capture_reset(nkat_hook *h) {
    if (!h || h->mode != NKAT_MODE_CAPTURE) return;
    for (int i = 0; i < h->n_entries; i++) h->entries[i].count = 0;
}

void nkat_hook_set_scale(nkat_hook *h, float scale) {
    if (h && isfinite(scale)) h->scale = scale;
}

float nkat_hook_get_scale(const nkat_hook *h) { return h ? h->scale : 0.0f; }

void nkat_hook_set_enabled(nkat_hook *h, int enabled) {
    if (h) h->enabled = enabled ? 1 : 0;
}

void nkat_hook_set_threads(nkat_hook *h, int n_threads) {
    if (h) h->n_threads = n_threads < 1 ? 1 : (n_threads > 256 ? 256 : n_threads);
}

int nkat_hook_entry_count(const nkat_hook *h) { return h ? h->n_entries : 0; }

const char *nkat_hook_entry_name(const nkat_hook *h, int i) {
    return (h && i >= 0 && i < h->n_entries) ? h->entries[i].name : NULL;
}

int64_t nkat_hook_entry_n_in(const nkat_hook *h, int i) {
    return (h && i >= 0 && i < h->n_entries) ? h->entries[i].n_in : -1;
}

int64_t nkat_hook_entry_uses(const nkat_hook *h, int i) {
    return (h && i >= 0 && i < h->n_entries) ? h->entries[i].count : -1;
}

int64_t nkat_hook_collected(const nkat_hook *h, int i, double *sum_sq) {
    if (!h || h->mode != NKAT_MODE_COLLECT || i < 0 || i >= h->n_entries || !sum_sq) return -1;
    memcpy(sum_sq, h->entries[i].sum_sq, sizeof(double) * (size_t)h->entries[i].n_in);
    return h->entries[i].count;
}

/* ---------------------------------------------------------------- CUDA loading ----- */

int nkat_hook_load_cuda(nkat_hook *h, const char *path, char *err, int err_len) {
    if (!h || !path) return -1;
    void *lib = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    if (!lib) {
        snprintf(err, (size_t)err_len, "%s", dlerror());
        return -1;
    }
    nkat_cuda_api api = {lib, (nkat_cuda_upload_fn)dlsym(lib, "nkat_cuda_upload"),
                         (nkat_cuda_release_fn)dlsym(lib, "nkat_cuda_release"),
                         (nkat_cuda_star_apply_fn)dlsym(lib, "nkat_cuda_star_apply"),
                         (nkat_cuda_error_string_fn)dlsym(lib, "nkat_cuda_error_string")};
    int (*version)(void) = (int (*)(void))dlsym(lib, "nkat_cuda_api_version");
    if (!api.upload || !api.release || !api.star_apply || !api.error_string || !version ||
        version() != NKAT_CUDA_API_VERSION) {
        snprintf(err, (size_t)err_len, "%s: not a matching libnkat_cuda (API version %d expected)", path,
                 NKAT_CUDA_API_VERSION);
        dlclose(lib);
        return -1;
    }
    if (h->cuda.handle) dlclose(h->cuda.handle);
    h->cuda = api;
    return 0;
}

int nkat_hook_has_cuda(const nkat_hook *h) { return h && h->cuda.handle != NULL; }

/* ---------------------------------------------------------------- statistics ------- */

static const char *const SKIP_NAMES[NKAT_SKIP_COUNT] = {
    "op", "type", "shape", "layout", "no_data", "device", "bounds", "kernel",
};

const char *nkat_skip_name(int reason) {
    return (reason >= 0 && reason < NKAT_SKIP_COUNT) ? SKIP_NAMES[reason] : "unknown";
}

void nkat_hook_stats(nkat_hook *h, nkat_stats *out, int reset) {
    if (!h) return;
    if (out) *out = h->stats;
    if (reset) memset(&h->stats, 0, sizeof h->stats);
}

static void skip(nkat_hook *h, const nkat_entry *e, int reason, const char *what) {
    if (h->stats.skipped == 0)
        snprintf(h->stats.detail, sizeof h->stats.detail, "%s: %s (%s)", e->name, nkat_skip_name(reason), what);
    h->stats.skipped++;
    h->stats.reasons[reason]++;
}

/* ---------------------------------------------------------------- node checks ------ */

/* F32 columns of ne[0] floats, nb[1] apart, with dims 2 and 3 folded into columns. */
static int columns_layout_ok(const struct ggml_tensor *t) {
    if (t->nb[0] != sizeof(float) || t->nb[1] % sizeof(float) != 0) return 0;
    if (t->nb[1] < (size_t)t->ne[0] * sizeof(float)) return 0;
    if (t->nb[2] != t->nb[1] * (size_t)t->ne[1] || t->nb[3] != t->nb[2] * (size_t)t->ne[2]) return 0;
    return t->ne[0] > 0 && t->ne[1] > 0 && t->ne[2] > 0 && t->ne[3] > 0;
}

static int64_t n_columns(const struct ggml_tensor *t) { return t->ne[1] * t->ne[2] * t->ne[3]; }

/* Bytes from t->data to the end of its last element. */
static size_t columns_extent(const struct ggml_tensor *t) {
    return (size_t)(n_columns(t) - 1) * t->nb[1] + (size_t)t->ne[0] * sizeof(float);
}

static int within_buffer(const struct ggml_tensor *t) {
    ggml_backend_buffer_t buf = t->buffer;
    if (!buf || !t->data) return 0;
    const char *base = ggml_backend_buffer_get_base(buf);
    const size_t size = ggml_backend_buffer_get_size(buf);
    const char *p = t->data;
    if (!base || p < base) return 0;
    const size_t off = (size_t)(p - base);
    return off <= size && columns_extent(t) <= size - off;
}

/* Checks shared by both modes on the node `t` = MUL_MAT(w, x). Returns a skip reason or -1. */
static int check_input(const struct ggml_tensor *t, const nkat_entry *e, char *what, size_t n) {
    const struct ggml_tensor *w = t->src[0], *x = t->src[1];
    if (!w || !x || strcmp(ggml_op_name(t->op), "MUL_MAT") != 0) {
        snprintf(what, n, "node op %s", ggml_op_name(t->op));
        return NKAT_SKIP_OP;
    }
    if (x->type != GGML_TYPE_F32) {
        snprintf(what, n, "input type %s, not f32", ggml_type_name(x->type));
        return NKAT_SKIP_TYPE;
    }
    if (w->ne[0] != e->n_in || x->ne[0] != e->n_in || w->ne[2] != 1 || w->ne[3] != 1) {
        snprintf(what, n, "weight is %lldx%lld (n_out x n_in), input rows %lld, registered n_in %lld",
                 (long long)w->ne[1], (long long)w->ne[0], (long long)x->ne[0], (long long)e->n_in);
        return NKAT_SKIP_SHAPE;
    }
    if (!columns_layout_ok(x)) {
        snprintf(what, n, "input strides %zu/%zu/%zu/%zu", x->nb[0], x->nb[1], x->nb[2], x->nb[3]);
        return NKAT_SKIP_LAYOUT;
    }
    if (!x->buffer || !x->data) {
        snprintf(what, n, "input has no data");
        return NKAT_SKIP_NO_DATA;
    }
    if (!within_buffer(x)) {
        snprintf(what, n, "input extent leaves its buffer");
        return NKAT_SKIP_BOUNDS;
    }
    return -1;
}

static int check_output(const struct ggml_tensor *t, const nkat_entry *e, char *what, size_t n) {
    const struct ggml_tensor *w = t->src[0], *x = t->src[1];
    if (t->type != GGML_TYPE_F32) {
        snprintf(what, n, "output type %s, not f32", ggml_type_name(t->type));
        return NKAT_SKIP_TYPE;
    }
    if (w->ne[1] != e->n_out || t->ne[0] != e->n_out || t->ne[1] != x->ne[1] || t->ne[2] != x->ne[2] ||
        t->ne[3] != x->ne[3]) {
        snprintf(what, n, "weight is %lldx%lld (n_out x n_in), theta is %lldx%lld",
                 (long long)w->ne[1], (long long)w->ne[0], (long long)e->n_out, (long long)e->n_in);
        return NKAT_SKIP_SHAPE;
    }
    if (!columns_layout_ok(t)) {
        snprintf(what, n, "output strides %zu/%zu/%zu/%zu", t->nb[0], t->nb[1], t->nb[2], t->nb[3]);
        return NKAT_SKIP_LAYOUT;
    }
    if (!t->buffer || !t->data) {
        snprintf(what, n, "output has no data");
        return NKAT_SKIP_NO_DATA;
    }
    if (!within_buffer(t)) {
        snprintf(what, n, "output extent leaves its buffer");
        return NKAT_SKIP_BOUNDS;
    }
    return -1;
}

/* ---------------------------------------------------------------- apply / collect -- */

static int cuda_apply(nkat_hook *h, nkat_entry *e, const struct ggml_tensor *t, float s, char *what, size_t n) {
    const void *host[4] = {e->A_q, e->A_s, e->Bt_q, e->B_s};
    const size_t bytes[4] = {(size_t)(e->rank * e->n_in), sizeof(float) * (size_t)e->rank,
                             (size_t)nkat_tiled_b_size(e->rank, e->n_out), sizeof(float) * (size_t)e->n_out};
    for (int i = 0; i < 4; i++) {
        if (e->dev[i]) continue;
        const int rc = h->cuda.upload(t->data, host[i], bytes[i], &e->dev[i]);
        if (rc != 0) {
            snprintf(what, n, "CUDA upload: %s", h->cuda.error_string(rc));
            return -1;
        }
    }
    const struct ggml_tensor *x = t->src[1];
    const int rc = h->cuda.star_apply(e->n_out, e->n_in, e->rank, e->dev[0], e->dev[1], e->dev[2], e->dev[3],
                                      x->data, (int64_t)(x->nb[1] / sizeof(float)), t->data,
                                      (int64_t)(t->nb[1] / sizeof(float)), n_columns(t), s);
    if (rc != 0) {
        snprintf(what, n, "CUDA kernel: %s", h->cuda.error_string(rc));
        return -1;
    }
    return 0;
}

static void prefetch_bytes(const void *p, size_t n) {
    for (size_t off = 0; off < n; off += 64) __builtin_prefetch((const char *)p + off, 0, 2);
}

/* During generation the factors are cold (the model's weights stream through the caches between
 * two corrections) and each matrix's few KB are latency-bound: start fetching them when the
 * scheduler asks about the node, so they arrive while llama.cpp computes it. */
static void prefetch_factors(const nkat_entry *e) {
    prefetch_bytes(e->A_q, (size_t)(e->rank * e->n_in));
    prefetch_bytes(e->Bt_q, (size_t)nkat_tiled_b_size(e->rank, e->n_out));
    prefetch_bytes(e->A_s, sizeof(float) * (size_t)e->rank);
    prefetch_bytes(e->B_s, sizeof(float) * (size_t)e->n_out);
}

static void apply_node(nkat_hook *h, nkat_entry *e, struct ggml_tensor *t) {
    char what[256];
    int reason = check_input(t, e, what, sizeof what);
    if (reason < 0) reason = check_output(t, e, what, sizeof what);
    if (reason >= 0) {
        skip(h, e, reason, what);
        return;
    }
    const struct ggml_tensor *x = t->src[1];
    const float s = h->scale;
    const int host = ggml_backend_buffer_is_host(t->buffer) && ggml_backend_buffer_is_host(x->buffer);
    if (!host) {
        if (!h->cuda.handle) {
            skip(h, e, NKAT_SKIP_DEVICE, "device buffer and no CUDA library loaded");
        } else if (cuda_apply(h, e, t, s, what, sizeof what) != 0) {
            skip(h, e, NKAT_SKIP_KERNEL, what);
        } else {
            h->stats.applied++;
            e->count++;
        }
        return;
    }
    const nkat_factors f = {e->n_out, e->n_in, e->rank, e->A_q, e->A_s, e->Bt_q, e->B_s};
    if (nkat_star_apply(&f, x->data, (int64_t)(x->nb[1] / sizeof(float)), t->data,
                        (int64_t)(t->nb[1] / sizeof(float)), n_columns(t), s, h->n_threads) != 0) {
        skip(h, e, NKAT_SKIP_KERNEL, "kernel refused its arguments");
        return;
    }
    h->stats.applied++;
    e->count++;
}

/* A host pointer to x's data: x itself, or a copy of device memory in h->scratch. */
static const char *host_input(nkat_hook *h, const struct ggml_tensor *x) {
    if (ggml_backend_buffer_is_host(x->buffer)) return x->data;
    const size_t bytes = columns_extent(x);
    if (bytes > h->scratch_bytes) {
        float *p = realloc(h->scratch, bytes);
        if (!p) return NULL;
        h->scratch = p;
        h->scratch_bytes = bytes;
    }
    ggml_backend_tensor_get(x, h->scratch, 0, bytes);
    return (const char *)h->scratch;
}

static void collect_node(nkat_hook *h, nkat_entry *e, const struct ggml_tensor *t) {
    char what[256];
    const int reason = check_input(t, e, what, sizeof what);
    if (reason >= 0) {
        skip(h, e, reason, what);
        return;
    }
    const struct ggml_tensor *x = t->src[1];
    const char *data = host_input(h, x);
    if (!data) {
        skip(h, e, NKAT_SKIP_NO_DATA, "out of memory copying a device input");
        return;
    }
    const int64_t cols = n_columns(x), n_in = e->n_in;
    if (h->mode == NKAT_MODE_CAPTURE) {
        if (cols > e->capacity - e->count) {
            snprintf(what, sizeof what, "%lld columns, room for %lld more", (long long)cols,
                     (long long)(e->capacity - e->count));
            skip(h, e, NKAT_SKIP_BOUNDS, what);
            return;
        }
        float *dst = e->capture + (size_t)e->count * (size_t)n_in;
        for (int64_t c = 0; c < cols; c++)
            memcpy(dst + (size_t)c * (size_t)n_in, data + (size_t)c * x->nb[1], sizeof(float) * (size_t)n_in);
        e->count += cols;
        h->stats.applied++;
        return;
    }
    double *sum = e->sum_sq;
    for (int64_t c = 0; c < cols; c++) {
        const float *xc = (const float *)(data + (size_t)c * x->nb[1]);
        for (int64_t i = 0; i < n_in; i++) sum[i] += (double)xc[i] * (double)xc[i];
    }
    e->count += cols;
    h->stats.applied++;
}

/* ---------------------------------------------------------------- the callback ----- */

static int active(const nkat_hook *h) {
    if (!h->enabled || h->n_entries == 0) return 0;
    return h->mode != NKAT_MODE_APPLY || h->scale != 0.0f;
}

static nkat_entry *claimed(const nkat_hook *h, const struct ggml_tensor *t) {
    if (!t || t->op != GGML_OP_MUL_MAT || !t->src[0]) return NULL;
    return lookup_weight(h, t->src[0]);
}

/* A matmul over zero tokens (e.g. the last layer when no logits are asked for): nothing to do. */
static int empty_node(const struct ggml_tensor *t) {
    const struct ggml_tensor *x = t->src[1];
    return x && (x->ne[1] == 0 || x->ne[2] == 0 || x->ne[3] == 0);
}

static bool nkat_cb_eval(struct ggml_tensor *t, bool ask, void *user_data) {
    nkat_hook *h = user_data;
    if (!h || h->magic != NKAT_MAGIC || !active(h)) return !ask; /* never abort the graph */
    nkat_entry *e = claimed(h, t);
    if (ask) {
        if (!e || empty_node(t)) return false;
        if (h->mode == NKAT_MODE_APPLY) prefetch_factors(e);
        return true;
    }
    if (!e || empty_node(t)) return true;
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    if (h->mode == NKAT_MODE_APPLY) apply_node(h, e, t);
    else collect_node(h, e, t);
    clock_gettime(CLOCK_MONOTONIC, &t1);
    h->stats.work_ns += (int64_t)(t1.tv_sec - t0.tv_sec) * 1000000000 + (t1.tv_nsec - t0.tv_nsec);
    return true;
}

uintptr_t nkat_cb_eval_address(void) {
    ggml_backend_sched_eval_callback cb = nkat_cb_eval; /* checks the signature */
    return (uintptr_t)cb;
}
