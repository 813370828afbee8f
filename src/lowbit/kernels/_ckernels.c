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
#include <float.h>
#include <math.h>
#include <sys/mman.h>
#include <string.h>

/* Ask for transparent huge pages on a fresh output buffer before first touch: a 64 MB
 * tensor then faults in 32 pages instead of 16384, which on this class of VM costs more
 * than the quantization itself. Advice only; a no-op where THP is off. */
void lowbit_advise_huge(void *p, int64_t nbytes) {
#ifdef MADV_HUGEPAGE
    const uintptr_t huge = (uintptr_t)2 << 20;
    uintptr_t start = ((uintptr_t)p + huge - 1) & ~(huge - 1);
    uintptr_t end = ((uintptr_t)p + (uintptr_t)nbytes) & ~(huge - 1);
    if (end > start) madvise((void *)start, end - start, MADV_HUGEPAGE);
#endif
}

/* max |x|; max is exact in any order, so the SIMD reduction gives the sequential result */
static inline float absmax_of(const float *x, int64_t len) {
    float am = 0.0f;
#pragma omp simd reduction(max : am)
    for (int64_t i = 0; i < len; i++) {
        float a = x[i] < 0 ? -x[i] : x[i];
        am = a > am ? a : am;
    }
    return am;
}

/* 4-bit codebook quantize (nf4, bnb_fp4), bitsandbytes' arithmetic (docs/formats.md#normalfloat-and-bitsandbytes-fp4):
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
        float am = absmax_of(xb, len);
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

/* Symmetric absmax int (docs/formats.md#symmetric-integers), as lowbit.formats.int.SymmetricInt computes it:
 * s = amax / qp; q = clamp(round_half_even(x / max(s, FLT_MIN)), -qp, qp); code = q + qp
 * (one unpacked byte per element). Adding and subtracting 1.5 * 2^23 rounds a float32 of
 * magnitude < 2^22 to the nearest integer, ties to even, exactly (no fast-math, no FMA). */
#define RNE_MAGIC 12582912.0f

void lowbit_int_sym_quantize(const float *x, int64_t n, int64_t block, int qp, uint8_t *codes,
                             float *scales) {
    int64_t nblocks = (n + block - 1) / block;
#pragma omp parallel for schedule(static)
    for (int64_t b = 0; b < nblocks; b++) {
        int64_t start = b * block;
        int64_t len = n - start < block ? n - start : block;
        const float *xb = x + start;
        float s = absmax_of(xb, len) / (float)qp;
        scales[b] = s;
        float safe = s > FLT_MIN ? s : FLT_MIN;
        float lim = (float)qp;
        uint8_t *cb = codes + start;
        for (int64_t c0 = 0; c0 < len; c0 += 256) {
            int64_t cl = len - c0 < 256 ? len - c0 : 256;
            uint8_t tmp[256]; /* local: stores through a char pointer could alias x */
            for (int64_t i = 0; i < cl; i++) {
                float v = xb[c0 + i] / safe;
                v = v < -lim ? -lim : (v > lim ? lim : v); /* clamp first: |v| < 2^22 for RNE */
                float r = (v + RNE_MAGIC) - RNE_MAGIC;
                tmp[i] = (uint8_t)((int)r + qp);
            }
            memcpy(cb + c0, tmp, (size_t)cl);
        }
    }
}

void lowbit_int_sym_dequantize(const uint8_t *codes, const float *scales, int64_t n, int64_t block,
                               int qp, float *out) {
    int64_t nblocks = (n + block - 1) / block;
#pragma omp parallel for schedule(static)
    for (int64_t b = 0; b < nblocks; b++) {
        int64_t start = b * block;
        int64_t len = n - start < block ? n - start : block;
        float s = scales[b];
        for (int64_t i = 0; i < len; i++) out[start + i] = (float)((int)codes[start + i] - qp) * s;
    }
}

/* Round |x| to the nearest entry of a sorted magnitude table (minifloat elements), as
 * lowbit.formats.exmy.ExMy.encode does: idx = number of midpoints strictly below |x|
 * (saturates at the top entry); on an exact midpoint move up when tie_up[idx] (the lower
 * entry's code is odd: ties to even); code = codes[idx], plus the sign bit for x < 0
 * unless the code is 0 (zero is always +0). */
void lowbit_table_round(const float *x, int64_t n, const float *mids, int nmids, const uint8_t *codes,
                        const uint8_t *tie_up, int sign_shift, uint8_t *out) {
    float m[256];
    uint8_t c[256], t[256];
    memcpy(m, mids, (size_t)nmids * sizeof(float));
    memcpy(c, codes, (size_t)nmids + 1);
    memcpy(t, tie_up, (size_t)nmids + 1);
    uint8_t sign = (uint8_t)(1u << sign_shift);
#pragma omp parallel for schedule(static)
    for (int64_t c0 = 0; c0 < n; c0 += 4096) {
        int64_t cl = n - c0 < 4096 ? n - c0 : 4096;
        int32_t idx[4096];
        const float *xc = x + c0;
        if (nmids <= 32) {
            for (int64_t i = 0; i < cl; i++) {
                float a = fabsf(xc[i]);
                int32_t k = 0;
                for (int j = 0; j < nmids; j++) k += a > m[j];
                idx[i] = k;
            }
        } else {
            for (int64_t i = 0; i < cl; i++) { /* lower bound: first midpoint >= |x| */
                float a = fabsf(xc[i]);
                int32_t lo = 0, len = nmids;
                while (len > 0) {
                    int32_t half = len / 2;
                    if (m[lo + half] < a) { lo += half + 1; len -= half + 1; } else len = half;
                }
                idx[i] = lo;
            }
        }
        uint8_t tmp[4096];
        for (int64_t i = 0; i < cl; i++) {
            int32_t k = idx[i];
            float a = fabsf(xc[i]);
            if (k < nmids && a == m[k] && t[k]) k++;
            uint8_t code = c[k];
            tmp[i] = (xc[i] < 0 && code) ? (uint8_t)(code | sign) : code;
        }
        memcpy(out + c0, tmp, (size_t)cl);
    }
}

/* out[i] = table[codes[i]] * scales[i / block]: the decode of every "value of a code times
 * the block's scale" format (minifloats, MX, NVFP4), one float32 multiply as the reference. */
void lowbit_lut_scale(const uint8_t *codes, int64_t n, int64_t block, const float *table,
                      const float *scales, float *out) {
    float t[256];
    memcpy(t, table, sizeof t);
    int64_t nblocks = (n + block - 1) / block;
#pragma omp parallel for schedule(static)
    for (int64_t b = 0; b < nblocks; b++) {
        int64_t start = b * block, end = n - start < block ? n : start + block;
        float s = scales[b];
        for (int64_t i = start; i < end; i++) out[i] = t[codes[i]] * s;
    }
}

/* GGUF Q8_0 / Q4_0 (llama.cpp ggml-quants.c quantize_row_q8_0_ref / q4_0_ref, as gguf-py
 * computes them). Blocks of 32; the caller writes the fp16 d (RNE from the float32 d
 * returned here) into the first two bytes of each block; codes go to the bytes after. */
#define QK 32

/* Scale search over a sorted level table (lowbit.search, docs/formats.md#scale-search): for each
 * block b and candidate ratio r_k, every element rounds to the level nearest x / s, s = base[b] * r_k
 * (out of range: the end level, as the codecs saturate), and the block's error is
 * sum w * (level * s - x)^2 (w = 1 without weights). Writes each block's least-error candidate
 * (the first on ties: ratios[0] is the format's own rule) and its error. Ties between two
 * levels go to the lower one here whatever the format's own rule: a choice of scale only, the
 * reference codec then encodes with that scale exactly. Not bit-matched to the torch search
 * (float sums in another order), which tests/kernels check by the errors it reaches. With a
 * per-block ``centre``, candidate k is centre[b] + ratios[k] (a refinement around a first pass). */
void lowbit_search_table(const float *x, const float *w, int64_t n_blocks, int64_t block, const float *base,
                         const float *centre, const float *ratios, int n_ratios, const float *levels,
                         const float *mids, int n_mids, int32_t *best_idx, float *best_err) {
#pragma omp parallel for schedule(dynamic, 64)
    for (int64_t b = 0; b < n_blocks; b++) {
        const float *xb = x + b * block;
        const float *wb = w ? w + b * block : NULL;
        float lowest = INFINITY;
        int32_t pick = 0;
        if (!(base[b] > 0)) {  /* an all-zero block (or a zero scale): every candidate decodes to 0 */
            best_idx[b] = 0;
            best_err[b] = 0.0f;
            continue;
        }
        for (int k = 0; k < n_ratios; k++) {
            const float s = base[b] * (centre ? centre[b] + ratios[k] : ratios[k]);
            const float inv = 1.0f / s;
            float err = 0.0f;
            if (n_mids <= 32) { /* few levels: count the mids below y, vectorized across elements */
#pragma omp simd reduction(+ : err)
                for (int64_t i = 0; i < block; i++) {
                    const float y = xb[i] * inv;
                    int idx = 0;
                    for (int j = 0; j < n_mids; j++) idx += mids[j] < y;
                    const float e = levels[idx] * s - xb[i];
                    err += (wb ? wb[i] : 1.0f) * e * e;
                }
            } else { /* many levels (8-bit tables): binary search, ties low */
                for (int64_t i = 0; i < block; i++) {
                    const float y = xb[i] * inv;
                    int lo = 0, hi = n_mids;
                    while (lo < hi) {
                        const int mid = (lo + hi) >> 1;
                        if (mids[mid] < y) lo = mid + 1; else hi = mid;
                    }
                    const float e = levels[lo] * s - xb[i];
                    err += (wb ? wb[i] : 1.0f) * e * e;
                }
            }
            if (err < lowest) {
                lowest = err;
                pick = k;
            }
        }
        best_idx[b] = pick;
        best_err[b] = lowest;
    }
}

/* zero_codes_if_id_overflows: when d is subnormal, id = 1/d overflows to inf and x * id is
 * +-inf or NaN. ggml's (int8_t) cast and gguf-py's astype(np.uint8) of those are undefined in
 * C; on x86 they give 0 (cvttss2si returns 0x80000000), so every code of such a block is 0 in
 * the reference bytes. d rounds to fp16 zero, so the block decodes alike whatever its codes;
 * writing 0 keeps the bytes equal and avoids the undefined conversion. lowbit.gguf.legacy._finite_or_zero
 * does the same on the PyTorch path. */
void lowbit_q8_0_quantize(const float *x, int64_t nblocks, float *d_out, uint8_t *blocks) {
#pragma omp parallel for schedule(static)
    for (int64_t b = 0; b < nblocks; b++) {
        const float *xb = x + b * QK;
        float amax = absmax_of(xb, QK);
        float d = amax / 127.0f;
        float id = d != 0.0f ? 1.0f / d : 0.0f;
        d_out[b] = d;
        if (isinf(id)) { /* d subnormal: see zero_codes_if_id_overflows */
            memset(blocks + b * (2 + QK) + 2, 0, QK);
            continue;
        }
        float r[QK];
        for (int i = 0; i < QK; i++) {
            /* roundf (half away from zero) in a form the compiler vectorizes without SSE4.1:
             * a - trunc(a) is exact for |a| < 2^23, so the 0.5 comparison is exact too */
            float v = xb[i] * id;
            float a = fabsf(v);
            float t = (float)(int)a;
            t += (a - t >= 0.5f) ? 1.0f : 0.0f;
            r[i] = copysignf(t, v);
        }
        int8_t q[QK]; /* a local buffer: stores through a char pointer could alias x */
        for (int i = 0; i < QK; i++) q[i] = (int8_t)(int)r[i];
        memcpy(blocks + b * (2 + QK) + 2, q, QK);
    }
}

void lowbit_q8_0_dequantize(const uint8_t *blocks, const float *d, int64_t nblocks, float *out) {
#pragma omp parallel for schedule(static)
    for (int64_t b = 0; b < nblocks; b++) {
        const int8_t *q = (const int8_t *)(blocks + b * (2 + QK) + 2);
        float db = d[b];
        for (int i = 0; i < QK; i++) out[b * QK + i] = (float)q[i] * db;
    }
}

void lowbit_q4_0_quantize(const float *x, int64_t nblocks, float *d_out, uint8_t *blocks) {
#pragma omp parallel for schedule(static)
    for (int64_t b = 0; b < nblocks; b++) {
        const float *xb = x + b * QK;
        float amax = absmax_of(xb, QK);
        int first = 0; /* the signed value of largest magnitude: first one wins, as np.argmax */
        while ((xb[first] < 0 ? -xb[first] : xb[first]) != amax) first++;
        float d = xb[first] / -8.0f;
        float id = d != 0.0f ? 1.0f / d : 0.0f;
        d_out[b] = d;
        uint8_t *qs = blocks + b * (2 + QK / 2) + 2;
        if (isinf(id)) { /* d subnormal: see zero_codes_if_id_overflows */
            memset(qs, 0, QK / 2);
            continue;
        }
        uint8_t q[QK];
        for (int i = 0; i < QK; i++) {
            int v = (int)(xb[i] * id + 8.5f); /* operand >= 0.5, so (int) truncates like truncf */
            q[i] = (uint8_t)(v > 15 ? 15 : v);
        }
        for (int i = 0; i < QK / 2; i++) qs[i] = q[i] | (uint8_t)(q[i + QK / 2] << 4);
    }
}

void lowbit_q4_0_dequantize(const uint8_t *blocks, const float *d, int64_t nblocks, float *out) {
#pragma omp parallel for schedule(static)
    for (int64_t b = 0; b < nblocks; b++) {
        const uint8_t *qs = blocks + b * (2 + QK / 2) + 2;
        float db = d[b];
        float *ob = out + b * QK;
        for (int i = 0; i < QK / 2; i++) {
            ob[i] = (float)((int)(qs[i] & 0x0F) - 8) * db;
            ob[i + QK / 2] = (float)((int)(qs[i] >> 4) - 8) * db;
        }
    }
}

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_ckernels", NULL, -1, NULL};
PyMODINIT_FUNC PyInit__ckernels(void) { return PyModule_Create(&module); }
