/* Fast CPU kernels for lowbit's hot formats.
 *
 * Each function computes exactly what the plain-PyTorch reference in lowbit.formats /
 * lowbit.gguf computes, float32 operation for float32 operation (no fast-math, no FMA
 * contraction: see setup.py), so results are bit-identical; tests/kernels check that.
 * Loaded with ctypes; the Python module wrapper below exists only so that setuptools
 * builds and installs the shared library beside the package.
 */
#include <Python.h>
#include <stdint.h>
#include <string.h>

/* 4-bit codebook quantize (nf4, bnb_fp4), bitsandbytes' arithmetic (SPEC.md §2):
 * absmax per block; full blocks scale by x * (1 / absmax), the trailing partial block
 * by x / absmax; clamp to [-1, 1]; code = number of midpoints strictly below the value
 * (ties to the lower code), mapped through order[] to the format's code; two codes per
 * byte, first in the high nibble, a padding nibble holds pad_code. */
void lowbit_codebook4_quantize(const float *x, int64_t n, int64_t block, const float *mids,
                               const uint8_t *order, uint8_t pad_code, uint8_t *packed,
                               float *absmax) {
    int64_t nblocks = (n + block - 1) / block;
    float m[15];
    memcpy(m, mids, sizeof m);
#pragma omp parallel for schedule(static)
    for (int64_t b = 0; b < nblocks; b++) {
        int64_t start = b * block;
        int64_t len = n - start < block ? n - start : block;
        const float *xb = x + start;
        float am = 0.0f;
        /* max is exact in any order, so a SIMD reduction gives the same absmax */
#pragma omp simd reduction(max : am)
        for (int64_t i = 0; i < len; i++) {
            float a = xb[i] < 0 ? -xb[i] : xb[i];
            am = a > am ? a : am;
        }
        absmax[b] = am;
        float safe = am > 1e-38f ? am : 1e-38f;
        float inv = 1.0f / safe;
        int partial = len < block;
        uint8_t codes[256];
        for (int64_t c0 = 0; c0 < len; c0 += 256) {
            int64_t cl = len - c0 < 256 ? len - c0 : 256;
            const float *xc = xb + c0;
            float sc[256];
            if (partial)
                for (int64_t i = 0; i < cl; i++) sc[i] = xc[i] / safe;
            else
                for (int64_t i = 0; i < cl; i++) sc[i] = xc[i] * inv;
            for (int64_t i = 0; i < cl; i++) {
                float s = sc[i] < -1.0f ? -1.0f : (sc[i] > 1.0f ? 1.0f : sc[i]);
                int32_t c = 0;
                for (int k = 0; k < 15; k++) c += s > m[k];
                codes[i] = (uint8_t)c;
            }
            if (order)
                for (int64_t i = 0; i < cl; i++) codes[i] = order[codes[i]];
            uint8_t *pc = packed + ((start + c0) >> 1); /* block and chunk starts are even */
            for (int64_t i = 0; i + 1 < cl; i += 2) pc[i >> 1] = (uint8_t)(codes[i] << 4) | codes[i + 1];
            if (cl & 1) pc[cl >> 1] = (uint8_t)(codes[cl - 1] << 4) | pad_code;
        }
    }
}

/* Inverse: value[code] * absmax[block] in float32. */
void lowbit_codebook4_dequantize(const uint8_t *packed, const float *absmax, const float *values,
                                 int64_t n, int64_t block, float *out) {
    int64_t nblocks = (n + block - 1) / block;
    float v[16];
    memcpy(v, values, sizeof v);
#pragma omp parallel for schedule(static)
    for (int64_t b = 0; b < nblocks; b++) {
        int64_t start = b * block; /* even: the caller passes even blocks */
        int64_t len = n - start < block ? n - start : block;
        float am = absmax[b];
        const uint8_t *pb = packed + (start >> 1);
        float *ob = out + start;
        for (int64_t i = 0; i + 1 < len; i += 2) {
            uint8_t byte = pb[i >> 1];
            ob[i] = v[byte >> 4] * am;
            ob[i + 1] = v[byte & 0x0F] * am;
        }
        if (len & 1) ob[len - 1] = v[pb[len >> 1] >> 4] * am;
    }
}

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_ckernels", NULL, -1, NULL};
PyMODINIT_FUNC PyInit__ckernels(void) { return PyModule_Create(&module); }
