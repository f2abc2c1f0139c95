/* Ahead-of-time compiled row sums for ilr_inspect.measure.stream (wrapped by _native.py).
 *
 * The same two loops as the numba kernel (_kernel.py), built when the package is installed, so a process pays no
 * JIT load (~0.6 s CPU per process for numba). Every sum is a float64 sum of float64 products, accumulated in
 * LANES independent partial sums (two 4-wide vectors) in a fixed order and combined in a fixed tree: the result does not depend on the
 * machine's vector width, and the ‖b‖² of the pair loop equals the norm loop's bit for bit. FP contraction is
 * off (setup.py), so no FMA changes a rounding on machines that have one. The lanes let the compiler vectorise
 * without reassociating anything; the GIL is released around every loop (stream.py runs one tensor per thread).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>

#define LANES 8

/* GCC/clang vector extensions: other compilers fail here and the optional extension is skipped (setup.py). */
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define MULTIVERSION __attribute__((target_clones("avx2", "default")))
#else
#define MULTIVERSION
#endif

typedef double v4d __attribute__((vector_size(32)));
typedef float v4f __attribute__((vector_size(16)));

/* Eight lanes as two 4-wide vectors: lane k of the loops below is element j + k of each step of 8. */
static inline double combine(v4d lo, v4d hi) {
    return ((lo[0] + hi[0]) + (lo[1] + hi[1])) + ((lo[2] + hi[2]) + (lo[3] + hi[3]));
}

static inline void load8(const float *p, v4d *lo, v4d *hi) {
    v4f a, b;
    memcpy(&a, p, sizeof a);
    memcpy(&b, p + 4, sizeof b);
    *lo = __builtin_convertvector(a, v4d);
    *hi = __builtin_convertvector(b, v4d);
}

static inline void load8d(const double *p, v4d *lo, v4d *hi) {
    memcpy(lo, p, sizeof *lo);
    memcpy(hi, p + 4, sizeof *hi);
}

#define NORM_LOOP(NAME, T, LOAD)                                                                            \
    MULTIVERSION static void NAME(const T *b, Py_ssize_t rows, Py_ssize_t cols, double *out) {              \
        for (Py_ssize_t r = 0; r < rows; r++) {                                                             \
            const T *y = b + r * cols;                                                                      \
            v4d s0 = {0}, s1 = {0}, v0, v1;                                                                 \
            Py_ssize_t j = 0;                                                                               \
            for (; j + LANES <= cols; j += LANES) {                                                         \
                LOAD(y + j, &v0, &v1);                                                                      \
                s0 += v0 * v0;                                                                              \
                s1 += v1 * v1;                                                                              \
            }                                                                                               \
            double t = 0.0;                                                                                 \
            for (; j < cols; j++) {                                                                         \
                double v = (double)y[j];                                                                    \
                t += v * v;                                                                                 \
            }                                                                                               \
            out[r] = combine(s0, s1) + t;                                                                   \
        }                                                                                                   \
    }

#define PAIR_LOOP(NAME, T, LOAD)                                                                            \
    MULTIVERSION static void NAME(const T *b, const T *a, Py_ssize_t rows, Py_ssize_t cols, double *out) {  \
        for (Py_ssize_t r = 0; r < rows; r++) {                                                             \
            const T *y = b + r * cols;                                                                      \
            const T *x = a + r * cols;                                                                      \
            v4d b0 = {0}, b1 = {0}, d0 = {0}, d1 = {0}, a0 = {0}, a1 = {0}, v0, v1, u0, u1, e0, e1;         \
            Py_ssize_t j = 0;                                                                               \
            for (; j + LANES <= cols; j += LANES) {                                                         \
                LOAD(y + j, &v0, &v1);                                                                      \
                LOAD(x + j, &u0, &u1);                                                                      \
                e0 = v0 - u0;                                                                               \
                e1 = v1 - u1;                                                                               \
                b0 += v0 * v0;                                                                              \
                b1 += v1 * v1;                                                                              \
                d0 += e0 * e0;                                                                              \
                d1 += e1 * e1;                                                                              \
                a0 += e0 * u0;                                                                              \
                a1 += e1 * u1;                                                                              \
            }                                                                                               \
            double tb = 0.0, td = 0.0, ta = 0.0;                                                            \
            for (; j < cols; j++) {                                                                         \
                double v = (double)y[j], u = (double)x[j], d = v - u;                                       \
                tb += v * v;                                                                                \
                td += d * d;                                                                                \
                ta += d * u;                                                                                \
            }                                                                                               \
            out[3 * r] = combine(b0, b1) + tb;                                                              \
            out[3 * r + 1] = combine(d0, d1) + td;                                                          \
            out[3 * r + 2] = combine(a0, a1) + ta;                                                          \
        }                                                                                                   \
    }

NORM_LOOP(norm_f32, float, load8)
NORM_LOOP(norm_f64, double, load8d)
PAIR_LOOP(pair_f32, float, load8)
PAIR_LOOP(pair_f64, double, load8d)

/* Checks the buffers against the shape the caller states: itemsize 4 or 8, contiguous, large enough. */
static int check(Py_buffer *buf, Py_ssize_t rows, Py_ssize_t cols, Py_ssize_t item, const char *what) {
    if (rows < 0 || cols < 0 || (cols && rows > PY_SSIZE_T_MAX / cols / item)) {
        PyErr_Format(PyExc_ValueError, "%s: bad shape", what);
        return -1;
    }
    if (buf->len < rows * cols * item) {
        PyErr_Format(PyExc_ValueError, "%s: buffer smaller than its shape", what);
        return -1;
    }
    return 0;
}

static PyObject *py_norm_sums(PyObject *self, PyObject *args) {
    Py_buffer b, out;
    Py_ssize_t rows, cols;
    int f64;
    if (!PyArg_ParseTuple(args, "y*nnpw*", &b, &rows, &cols, &f64, &out))
        return NULL;
    Py_ssize_t item = f64 ? 8 : 4;
    int bad = check(&b, rows, cols, item, "b") || check(&out, rows, 1, 8, "out");
    if (!bad) {
        Py_BEGIN_ALLOW_THREADS
        if (f64)
            norm_f64((const double *)b.buf, rows, cols, (double *)out.buf);
        else
            norm_f32((const float *)b.buf, rows, cols, (double *)out.buf);
        Py_END_ALLOW_THREADS
    }
    PyBuffer_Release(&b);
    PyBuffer_Release(&out);
    if (bad)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *py_pair_sums(PyObject *self, PyObject *args) {
    Py_buffer b, a, out;
    Py_ssize_t rows, cols;
    int f64;
    if (!PyArg_ParseTuple(args, "y*y*nnpw*", &b, &a, &rows, &cols, &f64, &out))
        return NULL;
    Py_ssize_t item = f64 ? 8 : 4;
    int bad = check(&b, rows, cols, item, "b") || check(&a, rows, cols, item, "a") || check(&out, rows, 3, 8, "out");
    if (!bad) {
        Py_BEGIN_ALLOW_THREADS
        if (f64)
            pair_f64((const double *)b.buf, (const double *)a.buf, rows, cols, (double *)out.buf);
        else
            pair_f32((const float *)b.buf, (const float *)a.buf, rows, cols, (double *)out.buf);
        Py_END_ALLOW_THREADS
    }
    PyBuffer_Release(&b);
    PyBuffer_Release(&a);
    PyBuffer_Release(&out);
    if (bad)
        return NULL;
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"norm_sums", py_norm_sums, METH_VARARGS,
     "norm_sums(b, rows, cols, f64, out): out[r] = sum_j b[r,j]^2 in float64 (b: float32 or float64 buffer)."},
    {"pair_sums", py_pair_sums, METH_VARARGS,
     "pair_sums(b, a, rows, cols, f64, out): out[r] = (|b_r|^2, |b_r - a_r|^2, <b_r - a_r, a_r>) in float64."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_ckernel", NULL, -1, methods};

PyMODINIT_FUNC PyInit__ckernel(void) { return PyModule_Create(&module); }
