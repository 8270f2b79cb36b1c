/* ReLU / ReLU6 masks at one bit per element, in one pass each way (modelpatch.models.bitmask).

   clamp_mask(out, bits, n, dtype, max_val, threads): bit i of `bits` (numpy's packbits with bitorder="little":
   element 0 in the low bit of byte 0) is 1 where the gradient passes: not (out[i] <= 0 or out[i] >= max_val);
   with max_val NaN (ReLU) only the first test. `out` is the activation's output, dense, in memory order.
   masked_grad(grad, bits, result, n, dtype, threads): result[i] = bit i ? grad[i] : +0, what PyTorch's
   threshold_backward / hardtanh_backward give for that mask (a bitwise AND: the gradient's bits or +0).
   Pointers are addresses (Tensor.data_ptr()); dtype 0: float32, 1: bfloat16. The GIL is released; up to
   `threads` contiguous parts run on OpenMP threads (a thread pool: threads started per call cost more than
   these passes on the smaller maps). AVX2 where the CPU has it (checked at import), plain C elsewhere. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <string.h>
#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define HAVE_AVX2_PATH 1
#endif

typedef struct {
    const void *src;
    uint8_t *bits;
    void *dst;
    int64_t first_byte, last_byte, n;
    int dtype;
    float max_val;
    int has_max;
} Part;

static inline float load(const void *p, int dtype, int64_t i) {
    if (dtype == 0) return ((const float *)p)[i];
    uint32_t u = (uint32_t)((const uint16_t *)p)[i] << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static uint32_t keep32[256][8]; /* byte -> 8 masks: all ones where its bit is set */
static uint16_t keep16[256][8];

#ifdef HAVE_AVX2_PATH
static int use_avx2;

/* float32, whole bytes from j: the bits of 8 elements from one compare and movemask; returns where it stopped */
__attribute__((target("avx2"))) static int64_t mask_avx2(Part *a, int64_t j) {
    const __m256 zero = _mm256_setzero_ps(), top = _mm256_set1_ps(a->has_max ? a->max_val : NAN); /* ordered >= NaN: never */
    const float *x = (const float *)a->src;
    for (; j < a->last_byte && j * 8 + 8 <= a->n; j++) {
        __m256 v = _mm256_loadu_ps(x + j * 8);
        __m256 stop = _mm256_or_ps(_mm256_cmp_ps(v, zero, _CMP_LE_OQ), _mm256_cmp_ps(v, top, _CMP_GE_OQ));
        a->bits[j] = (uint8_t)~_mm256_movemask_ps(stop);
    }
    return j;
}

/* float32, whole bytes from j: each bit spread to a 32-bit mask, ANDed with the gradient */
__attribute__((target("avx2"))) static int64_t grad_avx2(Part *a, int64_t j) {
    const __m256i select = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    const float *g = (const float *)a->src;
    float *r = (float *)a->dst;
    for (; j < a->last_byte && j * 8 + 8 <= a->n; j++) {
        __m256i b = _mm256_set1_epi32(a->bits[j]);
        __m256i keep = _mm256_cmpeq_epi32(_mm256_and_si256(b, select), select);
        _mm256_storeu_ps(r + j * 8, _mm256_and_ps(_mm256_loadu_ps(g + j * 8), _mm256_castsi256_ps(keep)));
    }
    return j;
}
#endif

static void *mask_part(void *arg) {
    Part *a = (Part *)arg;
    int64_t j = a->first_byte;
#ifdef HAVE_AVX2_PATH
    if (a->dtype == 0 && use_avx2) j = mask_avx2(a, j);
#endif
    for (; j < a->last_byte; j++) {
        int64_t base = j * 8, end = base + 8 < a->n ? base + 8 : a->n;
        uint8_t b = 0;
        for (int64_t i = base; i < end; i++) {
            float v = load(a->src, a->dtype, i);
            int stop = (v <= 0.0f) || (a->has_max && v >= a->max_val);
            b |= (uint8_t)(!stop) << (i - base);
        }
        a->bits[j] = b;
    }
    return NULL;
}

static void *grad_part(void *arg) {
    Part *a = (Part *)arg;
    int64_t j = a->first_byte;
#ifdef HAVE_AVX2_PATH
    if (a->dtype == 0 && use_avx2) j = grad_avx2(a, j);
#endif
    for (; j < a->last_byte; j++) {
        int64_t base = j * 8, count = base + 8 < a->n ? 8 : a->n - base;
        uint8_t b = a->bits[j];
        if (a->dtype == 0) {
            const uint32_t *g = (const uint32_t *)a->src + base, *keep = keep32[b];
            uint32_t *r = (uint32_t *)a->dst + base;
            for (int64_t k = 0; k < count; k++) r[k] = g[k] & keep[k];
        } else {
            const uint16_t *g = (const uint16_t *)a->src + base, *keep = keep16[b];
            uint16_t *r = (uint16_t *)a->dst + base;
            for (int64_t k = 0; k < count; k++) r[k] = g[k] & keep[k];
        }
    }
    return NULL;
}

#define MAX_THREADS 64
static int64_t min_bytes_per_thread = 16384; /* 128K elements: fewer, and a thread costs more than it saves */

static void run_parts(void *(*fn)(void *), Part proto, int64_t n, int threads) {
    int64_t nbytes = (n + 7) / 8;
    if (threads < 1) threads = 1;
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    if (nbytes < min_bytes_per_thread * 2) threads = 1;
    else if (nbytes / threads < min_bytes_per_thread) threads = (int)(nbytes / min_bytes_per_thread);
    int64_t per = (nbytes + threads - 1) / threads;
#pragma omp parallel for num_threads(threads) schedule(static, 1) if (threads > 1)
    for (int t = 0; t < threads; t++) {
        Part part = proto;
        part.n = n;
        part.first_byte = t * per < nbytes ? t * per : nbytes;
        part.last_byte = (t + 1) * per < nbytes ? (t + 1) * per : nbytes;
        fn(&part);
    }
}

static int valid(long long n, int dtype) {
    if (n >= 0 && (dtype == 0 || dtype == 1)) return 1;
    PyErr_Format(PyExc_ValueError, "n=%lld, dtype=%d: expected n >= 0 and dtype 0 (float32) or 1 (bfloat16)", n, dtype);
    return 0;
}

static PyObject *clamp_mask(PyObject *self, PyObject *args) {
    unsigned long long src, bits;
    long long n;
    int dtype, threads;
    double max_val;
    if (!PyArg_ParseTuple(args, "KKLidi", &src, &bits, &n, &dtype, &max_val, &threads)) return NULL;
    if (!valid(n, dtype)) return NULL;
    Part proto = {(const void *)(uintptr_t)src, (uint8_t *)(uintptr_t)bits, NULL, 0, 0, n, dtype,
                  (float)max_val, !isnan(max_val)};
    Py_BEGIN_ALLOW_THREADS run_parts(mask_part, proto, n, threads);
    Py_END_ALLOW_THREADS Py_RETURN_NONE;
}

static PyObject *masked_grad(PyObject *self, PyObject *args) {
    unsigned long long grad, bits, result;
    long long n;
    int dtype, threads;
    if (!PyArg_ParseTuple(args, "KKKLii", &grad, &bits, &result, &n, &dtype, &threads)) return NULL;
    if (!valid(n, dtype)) return NULL;
    Part proto = {(const void *)(uintptr_t)grad, (uint8_t *)(uintptr_t)bits, (void *)(uintptr_t)result, 0, 0, n,
                  dtype, 0.0f, 0};
    Py_BEGIN_ALLOW_THREADS run_parts(grad_part, proto, n, threads);
    Py_END_ALLOW_THREADS Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"clamp_mask", clamp_mask, METH_VARARGS, "bits of where a ReLU/ReLU6 gradient passes"},
    {"masked_grad", masked_grad, METH_VARARGS, "the gradient where the bits say it passes, +0 elsewhere"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_masks", NULL, -1, methods};

PyMODINIT_FUNC PyInit__masks(void) {
#ifdef HAVE_AVX2_PATH
    __builtin_cpu_init();
    use_avx2 = __builtin_cpu_supports("avx2");
#endif
    for (int b = 0; b < 256; b++)
        for (int k = 0; k < 8; k++) {
            keep32[b][k] = (b >> k) & 1 ? 0xFFFFFFFFu : 0u;
            keep16[b][k] = (b >> k) & 1 ? 0xFFFFu : 0u;
        }
    return PyModule_Create(&module);
}
