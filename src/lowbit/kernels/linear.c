/* Fused decode-and-multiply for QuantLinear: y = x W^T + b straight from the stored bytes.
 *
 * Why our own kernel: torch's _weight_int4pack_mm_for_cpu only reads its own int4 layout
 * with one affine (scale, zero) pair per group whose size divides the row, and
 * _weight_int8pack_mm only per-row scales; neither holds a table look-up (nf4, fp4,
 * learned codebooks) or lowbit's per-block fp32 scales on blocks that cross rows.
 * Measured in benchmarks/bench_decode.py where they apply (lowbit.kernels.linear).
 *
 * Each output row is decoded into a small buffer (L1-resident) with exactly the float32
 * operations of the reference decode (table[q] * factor, (table[q] - zero) * factor, or
 * GGUF's d * (q - 8) / d * q), so the decoded weights equal the reference's bit for bit;
 * then it is dotted with each input row. Only the dot product's summation order differs
 * from torch's matmul: 32 lanes of fused multiply-adds, reduced in a fixed tree (dot_*).
 * The AVX2 path and the portable path follow the same order, so the result does not
 * depend on the CPU (tests/kernels/test_linear.py checks both paths agree to the bit), nor
 * on the thread count: rows are split over OpenMP threads, each row summed by one thread.
 *
 * The threads are torch's own: torch loads its libgomp.so.1 first and this library,
 * asking for the same soname, is given that one (lowbit.kernels imports torch first).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>

#if defined(__x86_64__)
#include <immintrin.h>
#define LOWBIT_X86 1
#endif

#include "linear.h"

#define QK 32 /* GGUF legacy block (ggml-common.h QK4_0, QK8_0) */
#define LANES 32
#define SERIAL_BELOW (1 << 16) /* weights: below this one thread does the row loop */

/* IEEE binary16 -> binary32, exact (every half is a float) */
static inline float half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1F, man = h & 0x3FF;
    uint32_t bits;
    if (exp == 0x1F) {
        bits = sign | 0x7F800000u | (man << 13);
    } else if (exp != 0) {
        bits = sign | ((exp + 112) << 23) | (man << 13);
    } else if (man == 0) {
        bits = sign;
    } else { /* subnormal: normalise */
        int e = -1;
        do { man <<= 1; e++; } while (!(man & 0x400));
        bits = sign | ((uint32_t)(112 - e) << 23) | ((man & 0x3FF) << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static inline int code4(const uint8_t *codes, int64_t e) {
    uint8_t byte = codes[e >> 1];
    return (e & 1) ? (byte & 0x0F) : (byte >> 4);
}

static inline int nibbles(const lowbit_weights *w) { return w->kind == W_LUT4 || w->kind == W_AFFINE4; }

/* table[q] - zero[b] of flat element e (code kinds): the decoded value before the factor */
static inline float level_of(const lowbit_weights *w, int64_t e) {
    float v;
    switch (w->kind) {
    case W_LUT4: v = w->table[code4(w->codes, e)]; break;
    case W_AFFINE4: v = (float)code4(w->codes, e) - w->affine_offset; break;
    case W_LUT8: v = w->table[w->codes[e]]; break;
    default: v = (float)w->codes[e] - w->affine_offset;
    }
    return w->zero ? v - w->zero[e / w->block] : v;
}

static inline float decode_one(const lowbit_weights *w, int64_t e) {
    return level_of(w, e) * w->factor[e / w->block];
}

/* GGUF element j of a block's bytes, before d: q - 8 (Q4_0: byte j holds j and j + 16) or q */
static inline float gguf_level(const lowbit_weights *w, const uint8_t *blk, int j) {
    if (w->kind == W_Q8_0) return (float)(int8_t)blk[2 + j];
    int q = j < QK / 2 ? blk[2 + j] & 0x0F : blk[2 + j - QK / 2] >> 4;
    return (float)(q - 8);
}

/* the first GGUF block of row o, and the bytes per block */
static inline const uint8_t *gguf_row(const lowbit_weights *w, int64_t o, int64_t *bytes) {
    *bytes = w->kind == W_Q4_0 ? 2 + QK / 2 : 2 + QK;
    return w->codes + o * (w->in_features / QK) * *bytes;
}

static inline float gguf_d(const uint8_t *blk) {
    uint16_t h;
    memcpy(&h, blk, 2);
    return half_to_float(h);
}

static void decode_gguf_row(const lowbit_weights *w, int64_t o, float *out) {
    int64_t bytes;
    const uint8_t *blk = gguf_row(w, o, &bytes);
    for (int64_t b = 0; b < w->in_features / QK; b++, out += QK, blk += bytes) {
        float d = gguf_d(blk);
        for (int j = 0; j < QK; j++) out[j] = d * gguf_level(w, blk, j); /* legacy.py: d * (q - 8), q * d */
    }
}

static void decode_row_generic(const lowbit_weights *w, int64_t o, float *out) {
    if (w->kind == W_Q4_0 || w->kind == W_Q8_0) {
        decode_gguf_row(w, o, out);
        return;
    }
    int64_t base = o * w->in_features;
    for (int64_t k = 0; k < w->in_features; k++) out[k] = decode_one(w, base + k);
}

/* The fixed summation order both paths follow: lane j of 32 accumulates elements
 * k = j (mod 32) of the whole 32-chunks, then lanes 0..7 the whole 8-chunks left, with
 * fmaf; lanes fold as (j, j+8, j+16, j+24) -> ((a+b)+(c+d)), then 8 -> 1 as
 * ((v0+v4)+(v2+v6)) + ((v1+v5)+(v3+v7)); the last K mod 8 products are summed in order
 * with fmaf from 0 and added at the end. */
static float dot_generic(const float *w, const float *x, int64_t K) {
    float acc[LANES] = {0};
    int64_t k = 0;
    for (; k + LANES <= K; k += LANES)
        for (int j = 0; j < LANES; j++) acc[j] = fmaf(w[k + j], x[k + j], acc[j]);
    for (; k + 8 <= K; k += 8)
        for (int j = 0; j < 8; j++) acc[j] = fmaf(w[k + j], x[k + j], acc[j]);
    float tail = 0.0f;
    for (; k < K; k++) tail = fmaf(w[k], x[k], tail);
    float v[8];
    for (int j = 0; j < 8; j++) v[j] = (acc[j] + acc[j + 8]) + (acc[j + 16] + acc[j + 24]);
    float s = ((v[0] + v[4]) + (v[2] + v[6])) + ((v[1] + v[5]) + (v[3] + v[7]));
    return s + tail;
}

static inline float hsum8_generic(const float *v) {
    return ((v[0] + v[4]) + (v[2] + v[6])) + ((v[1] + v[5]) + (v[3] + v[7]));
}

/* Grouped 4-bit rows: kind LUT4/AFFINE4, in_features and block multiples of GROUP. A byte holds
 * two neighbours (high nibble first), so instead of interleaving every row's nibbles the
 * input is permuted once per call (lowbit_prepare_x: each group of 32 as its 16 even, then
 * its 16 odd elements) and each byte's high and low nibbles meet x in place. Measured on one
 * core, 1536x576 block 64: nf4 180 us vs 209, int4 114 vs 161 per call (the interleaving path). */
#define GROUP 32

int lowbit_grouped(const lowbit_weights *w) {
    return (w->kind == W_LUT4 || w->kind == W_AFFINE4) && w->in_features % GROUP == 0 && w->block % GROUP == 0;
}

void lowbit_prepare_x(const float *x, int64_t K, float *xp) {
    for (int64_t g = 0; g < K; g += GROUP)
        for (int j = 0; j < GROUP / 2; j++) {
            xp[g + j] = x[g + 2 * j];
            xp[g + GROUP / 2 + j] = x[g + 2 * j + 1];
        }
}

/* A grouped row (M = 1), x as given: per stretch sharing a block's factor s, four 8-lane
 * accumulators take, from each group of 32, the even elements 0..14 (acc0), even 16..30
 * (acc1), odd 1..15 (acc2) and odd 17..31 (acc3); then row = fmaf((acc0 + acc1) + (acc2 +
 * acc3), s, row) lane-wise, and the result is hsum8(row). row_dot_avx2 follows this order. */
static float grouped_dot_generic(const lowbit_weights *w, int64_t o, const float *x) {
    float row[8] = {0};
    int64_t K = w->in_features, e = o * K, end = e + K;
    while (e < end) {
        int64_t b = e / w->block, stop = (b + 1) * w->block, len = (stop < end ? stop : end) - e;
        float acc[4][8] = {{0}};
        for (int64_t g = 0; g < len; g += GROUP)
            for (int j = 0; j < 8; j++)
                for (int a = 0; a < 4; a++) { /* a: 0/1 even elements of the first/second half, 2/3 odd */
                    int64_t k = g + 2 * j + 16 * (a & 1) + (a >> 1);
                    acc[a][j] = fmaf(level_of(w, e + k), x[k], acc[a][j]);
                }
        float s = w->factor[b];
        for (int j = 0; j < 8; j++) row[j] = fmaf((acc[0][j] + acc[1][j]) + (acc[2][j] + acc[3][j]), s, row[j]);
        x += len;
        e += len;
    }
    return hsum8_generic(row);
}

/* One input row (M = 1), fused: per stretch of the row that shares a block's factor s,
 * acc0/acc1 (8 lanes each) take alternate groups of 8 products level * x (a last group
 * of 8 goes to acc0), products left over (fewer than 8, and a first element on an odd
 * nibble) sum in order into tail; then row = fmaf(acc0 + acc1, s, row) lane-wise and
 * row_tail = fmaf(tail, s, row_tail). The result is hsum8(row) + row_tail. row_dot_avx2
 * follows this order exactly. Factoring s out of each stretch is the one other
 * reassociation besides the order of the sum. */
static float row_dot_generic(const lowbit_weights *w, int64_t o, const float *x, const float *xp) {
    (void)xp; /* the grouped order reads x in place here */
    if (lowbit_grouped(w)) return grouped_dot_generic(w, o, x);
    float row[8] = {0}, row_tail = 0.0f;
    int64_t K = w->in_features;
    if (w->kind == W_Q4_0 || w->kind == W_Q8_0) {
        int64_t bytes;
        const uint8_t *blk = gguf_row(w, o, &bytes);
        for (int64_t b = 0; b < K / QK; b++, blk += bytes, x += QK) {
            float acc0[8] = {0}, acc1[8] = {0};
            for (int g = 0; g < QK; g += 16)
                for (int j = 0; j < 8; j++) {
                    acc0[j] = fmaf(gguf_level(w, blk, g + j), x[g + j], acc0[j]);
                    acc1[j] = fmaf(gguf_level(w, blk, g + 8 + j), x[g + 8 + j], acc1[j]);
                }
            float d = gguf_d(blk);
            for (int j = 0; j < 8; j++) row[j] = fmaf(acc0[j] + acc1[j], d, row[j]);
        }
        return hsum8_generic(row);
    }
    int64_t e = o * K, end = e + K;
    while (e < end) {
        int64_t b = e / w->block, stop = (b + 1) * w->block;
        int64_t len = (stop < end ? stop : end) - e, i = 0;
        float acc0[8] = {0}, acc1[8] = {0}, tail = 0.0f;
        if (nibbles(w) && (e & 1)) tail = fmaf(level_of(w, e), x[i++], tail);
        for (; i + 16 <= len; i += 16)
            for (int j = 0; j < 8; j++) {
                acc0[j] = fmaf(level_of(w, e + i + j), x[i + j], acc0[j]);
                acc1[j] = fmaf(level_of(w, e + i + 8 + j), x[i + 8 + j], acc1[j]);
            }
        if (i + 8 <= len) {
            for (int j = 0; j < 8; j++) acc0[j] = fmaf(level_of(w, e + i + j), x[i + j], acc0[j]);
            i += 8;
        }
        for (; i < len; i++) tail = fmaf(level_of(w, e + i), x[i], tail);
        float s = w->factor[b];
        for (int j = 0; j < 8; j++) row[j] = fmaf(acc0[j] + acc1[j], s, row[j]);
        row_tail = fmaf(tail, s, row_tail);
        x += len;
        e += len;
    }
    return hsum8_generic(row) + row_tail;
}

#ifdef LOWBIT_X86
#define AVX2 __attribute__((target("avx2,fma,f16c")))

AVX2 static inline __m256 lut16(__m256i idx, __m256 lo, __m256 hi) {
    __m256 a = _mm256_permutevar8x32_ps(lo, idx), b = _mm256_permutevar8x32_ps(hi, idx);
    return _mm256_blendv_ps(a, b, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28))); /* bit 3 picks hi */
}

/* n codes (n = 8 or 16) from n/2 bytes, high nibble first, as two vectors of int32 */
AVX2 static inline __m128i nibbles_in_order(__m128i bytes) {
    const __m128i m = _mm_set1_epi8(0x0F);
    __m128i hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), m), lo = _mm_and_si128(bytes, m);
    return _mm_unpacklo_epi8(hi, lo);
}

AVX2 static inline __m256i codes8(const lowbit_weights *w, int64_t e) {
    if (nibbles(w)) {
        int32_t four;
        memcpy(&four, w->codes + (e >> 1), 4);
        return _mm256_cvtepu8_epi32(nibbles_in_order(_mm_cvtsi32_si128(four)));
    }
    return _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(w->codes + e)));
}

/* 8 levels (table[q] - zero, before the factor) of codes e .. e + 7 (e even for nibbles) */
AVX2 static inline __m256 levels8(const lowbit_weights *w, __m256i q, __m256 lo, __m256 hi, __m256 off, __m256 z) {
    __m256 v;
    if (w->kind == W_LUT4) v = lut16(q, lo, hi);
    else if (w->kind == W_LUT8) v = _mm256_i32gather_ps(w->table, q, 4);
    else v = _mm256_sub_ps(_mm256_cvtepi32_ps(q), off);
    return w->zero ? _mm256_sub_ps(v, z) : v;
}

/* elements [e, e + len) of the flat tensor, all in block b, to out: (table[q] - zero) * factor */
AVX2 static void decode_segment_avx2(const lowbit_weights *w, int64_t e, int64_t len, int64_t b, float *out) {
    __m256 f = _mm256_set1_ps(w->factor[b]), z = _mm256_set1_ps(w->zero ? w->zero[b] : 0.0f);
    __m256 off = _mm256_set1_ps(w->affine_offset), lo = off, hi = off;
    if (w->kind == W_LUT4) {
        lo = _mm256_loadu_ps(w->table);
        hi = _mm256_loadu_ps(w->table + 8);
    }
    int64_t i = 0;
    if (nibbles(w) && (e & 1) && len > 0) { out[0] = decode_one(w, e); i = 1; } /* codes8 reads from a byte start */
    for (; i + 8 <= len; i += 8)
        _mm256_storeu_ps(out + i, _mm256_mul_ps(levels8(w, codes8(w, e + i), lo, hi, off, z), f));
    for (; i < len; i++) out[i] = decode_one(w, e + i);
}

AVX2 static void decode_gguf_row_avx2(const lowbit_weights *w, int64_t o, float *out) {
    int64_t bytes;
    const uint8_t *blk = gguf_row(w, o, &bytes);
    for (int64_t b = 0; b < w->in_features / QK; b++, out += QK, blk += bytes) {
        uint16_t h;
        memcpy(&h, blk, 2);
        __m256 d = _mm256_cvtph_ps(_mm_set1_epi16((short)h)); /* exact, as half_to_float */
        if (w->kind == W_Q4_0) {
            __m128i q = _mm_loadu_si128((const __m128i *)(blk + 2));
            const __m128i m = _mm_set1_epi8(0x0F);
            __m128i lo = _mm_and_si128(q, m), hi = _mm_and_si128(_mm_srli_epi16(q, 4), m);
            const __m256i eight = _mm256_set1_epi32(8);
            __m128i parts[4] = {lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)};
            for (int p = 0; p < 4; p++) {
                __m256i v = _mm256_sub_epi32(_mm256_cvtepu8_epi32(parts[p]), eight);
                _mm256_storeu_ps(out + 8 * p, _mm256_mul_ps(d, _mm256_cvtepi32_ps(v)));
            }
        } else {
            for (int p = 0; p < 4; p++) {
                __m256i v = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(blk + 2 + 8 * p)));
                _mm256_storeu_ps(out + 8 * p, _mm256_mul_ps(_mm256_cvtepi32_ps(v), d));
            }
        }
    }
}

AVX2 static void decode_row_avx2(const lowbit_weights *w, int64_t o, float *out) {
    if (w->kind == W_Q4_0 || w->kind == W_Q8_0) {
        decode_gguf_row_avx2(w, o, out);
        return;
    }
    int64_t K = w->in_features, e = o * K, end = e + K;
    while (e < end) { /* segments of the row that share one block's scale */
        int64_t b = e / w->block, stop = (b + 1) * w->block;
        int64_t len = (stop < end ? stop : end) - e;
        decode_segment_avx2(w, e, len, b, out);
        out += len;
        e += len;
    }
}

AVX2 static inline float hsum8_avx2(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1)); /* v_j + v_j+4 */
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));                                      /* (0,2), (1,3) */
    return _mm_cvtss_f32(s) + _mm_cvtss_f32(_mm_shuffle_ps(s, s, 1));
}

AVX2 static float dot_avx2(const float *w, const float *x, int64_t K) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    int64_t k = 0;
    for (; k + LANES <= K; k += LANES) {
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w + k), _mm256_loadu_ps(x + k), a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(w + k + 8), _mm256_loadu_ps(x + k + 8), a1);
        a2 = _mm256_fmadd_ps(_mm256_loadu_ps(w + k + 16), _mm256_loadu_ps(x + k + 16), a2);
        a3 = _mm256_fmadd_ps(_mm256_loadu_ps(w + k + 24), _mm256_loadu_ps(x + k + 24), a3);
    }
    for (; k + 8 <= K; k += 8) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w + k), _mm256_loadu_ps(x + k), a0);
    float tail = 0.0f;
    for (; k < K; k++) tail = fmaf(w[k], x[k], tail);
    return hsum8_avx2(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3))) + tail;
}


/* levels of 16 codes from e (even for nibbles), as two vectors of 8 */
#define LOWBIT_INLINE __attribute__((always_inline)) inline
AVX2 static LOWBIT_INLINE void levels16(const lowbit_weights *w, int64_t e, int kind, int has_zero, __m256 lo,
                                        __m256 hi, __m256 off, __m256 z, __m256 *v0, __m256 *v1) {
    __m256i q0, q1;
    if (kind == W_LUT4 || kind == W_AFFINE4) {
        __m128i c = nibbles_in_order(_mm_loadl_epi64((const __m128i *)(w->codes + (e >> 1))));
        q0 = _mm256_cvtepu8_epi32(c);
        q1 = _mm256_cvtepu8_epi32(_mm_srli_si128(c, 8));
    } else {
        __m128i c = _mm_loadu_si128((const __m128i *)(w->codes + e));
        q0 = _mm256_cvtepu8_epi32(c);
        q1 = _mm256_cvtepu8_epi32(_mm_srli_si128(c, 8));
    }
    if (kind == W_LUT4) {
        *v0 = lut16(q0, lo, hi);
        *v1 = lut16(q1, lo, hi);
    } else if (kind == W_LUT8) {
        *v0 = _mm256_i32gather_ps(w->table, q0, 4);
        *v1 = _mm256_i32gather_ps(w->table, q1, 4);
    } else {
        *v0 = _mm256_sub_ps(_mm256_cvtepi32_ps(q0), off);
        *v1 = _mm256_sub_ps(_mm256_cvtepi32_ps(q1), off);
    }
    if (has_zero) {
        *v0 = _mm256_sub_ps(*v0, z);
        *v1 = _mm256_sub_ps(*v1, z);
    }
}

AVX2 static LOWBIT_INLINE float codes_dot_avx2(const lowbit_weights *w, int64_t o, const float *x, int kind,
                                               int has_zero) {
    __m256 row = _mm256_setzero_ps(), lo = row, hi = row, off = _mm256_set1_ps(w->affine_offset), z = row;
    if (kind == W_LUT4) {
        lo = _mm256_loadu_ps(w->table);
        hi = _mm256_loadu_ps(w->table + 8);
    }
    float row_tail = 0.0f;
    int64_t K = w->in_features, e = o * K, end = e + K, b = e / w->block;
    for (; e < end; b++) {
        int64_t stop = (b + 1) * w->block, len = (stop < end ? stop : end) - e, i = 0;
        if (has_zero) z = _mm256_set1_ps(w->zero[b]);
        __m256 acc0 = _mm256_setzero_ps(), acc1 = acc0, v0, v1;
        float tail = 0.0f;
        if ((kind == W_LUT4 || kind == W_AFFINE4) && (e & 1)) tail = fmaf(level_of(w, e), x[i++], tail);
        for (; i + 16 <= len; i += 16) {
            levels16(w, e + i, kind, has_zero, lo, hi, off, z, &v0, &v1);
            acc0 = _mm256_fmadd_ps(v0, _mm256_loadu_ps(x + i), acc0);
            acc1 = _mm256_fmadd_ps(v1, _mm256_loadu_ps(x + i + 8), acc1);
        }
        if (i + 8 <= len) {
            acc0 = _mm256_fmadd_ps(levels8(w, codes8(w, e + i), lo, hi, off, z), _mm256_loadu_ps(x + i), acc0);
            i += 8;
        }
        for (; i < len; i++) tail = fmaf(level_of(w, e + i), x[i], tail);
        float s = w->factor[b];
        row = _mm256_fmadd_ps(_mm256_add_ps(acc0, acc1), _mm256_set1_ps(s), row);
        row_tail = fmaf(tail, s, row_tail);
        x += len;
        e += len;
    }
    return hsum8_avx2(row) + row_tail;
}

/* 8 levels of sign-marked codes (bit 31 set for codes 8..15, low 3 bits the rest): no shift */
AVX2 static LOWBIT_INLINE __m256 lut16_marked(__m256i idx, __m256 lo, __m256 hi) {
    __m256 a = _mm256_permutevar8x32_ps(lo, idx), b = _mm256_permutevar8x32_ps(hi, idx);
    return _mm256_blendv_ps(a, b, _mm256_castsi256_ps(idx));
}

/* grouped_dot_generic's order on the prepared x: a byte's high nibbles meet xp[0..15], low ones xp[16..31] */
AVX2 static LOWBIT_INLINE float grouped_dot_avx2(const lowbit_weights *w, int64_t o, const float *xp, int kind,
                                                 int has_zero) {
    const __m128i m = _mm_set1_epi8(0x0F);
    /* code c -> c | 0x80 for c >= 8: sign-extended to 32 bits it is lut16_marked's index */
    const __m128i mark = _mm_setr_epi8(0, 1, 2, 3, 4, 5, 6, 7, (char)0x88, (char)0x89, (char)0x8A, (char)0x8B,
                                       (char)0x8C, (char)0x8D, (char)0x8E, (char)0x8F);
    __m256 row = _mm256_setzero_ps(), lo = row, hi = row, off = _mm256_set1_ps(w->affine_offset), z = row;
    if (kind == W_LUT4) {
        lo = _mm256_loadu_ps(w->table);
        hi = _mm256_loadu_ps(w->table + 8);
    }
    int64_t K = w->in_features, e = o * K, end = e + K;
    const uint8_t *c = w->codes + (e >> 1);
    while (e < end) {
        int64_t b = e / w->block, stop = (b + 1) * w->block, len = (stop < end ? stop : end) - e;
        if (has_zero) z = _mm256_set1_ps(w->zero[b]);
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, v[4];
        for (int64_t g = 0; g < len; g += GROUP, c += GROUP / 2, xp += GROUP) {
            __m128i q = _mm_loadu_si128((const __m128i *)c);
            __m128i h = _mm_and_si128(_mm_srli_epi16(q, 4), m), l = _mm_and_si128(q, m);
            __m128i part[4] = {h, _mm_srli_si128(h, 8), l, _mm_srli_si128(l, 8)};
            for (int p = 0; p < 4; p++) {
                if (kind == W_LUT4) v[p] = lut16_marked(_mm256_cvtepi8_epi32(_mm_shuffle_epi8(mark, part[p])), lo, hi);
                else v[p] = _mm256_sub_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(part[p])), off);
                if (has_zero) v[p] = _mm256_sub_ps(v[p], z);
            }
            a0 = _mm256_fmadd_ps(v[0], _mm256_loadu_ps(xp), a0);
            a1 = _mm256_fmadd_ps(v[1], _mm256_loadu_ps(xp + 8), a1);
            a2 = _mm256_fmadd_ps(v[2], _mm256_loadu_ps(xp + 16), a2);
            a3 = _mm256_fmadd_ps(v[3], _mm256_loadu_ps(xp + 24), a3);
        }
        __m256 sum = _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3));
        row = _mm256_fmadd_ps(sum, _mm256_set1_ps(w->factor[b]), row);
        e += len;
    }
    return hsum8_avx2(row);
}

/* row_dot_generic's order, eight lanes at a time; xp: x as lowbit_prepare_x made it, for grouped rows
 * (without it those take the portable path, same result) */
AVX2 static float row_dot_avx2(const lowbit_weights *w, int64_t o, const float *x, const float *xp) {
    if (lowbit_grouped(w)) {
        if (!xp) return grouped_dot_generic(w, o, x);
        if (w->kind == W_LUT4) return w->zero ? grouped_dot_avx2(w, o, xp, W_LUT4, 1) : grouped_dot_avx2(w, o, xp, W_LUT4, 0);
        return w->zero ? grouped_dot_avx2(w, o, xp, W_AFFINE4, 1) : grouped_dot_avx2(w, o, xp, W_AFFINE4, 0);
    }
    __m256 row = _mm256_setzero_ps();
    int64_t K = w->in_features;
    if (w->kind == W_Q4_0 || w->kind == W_Q8_0) {
        int64_t bytes;
        const uint8_t *blk = gguf_row(w, o, &bytes);
        const __m256 eight = _mm256_set1_ps(8.0f);
        const __m128i m = _mm_set1_epi8(0x0F);
        for (int64_t b = 0; b < K / QK; b++, blk += bytes, x += QK) {
            uint16_t h;
            memcpy(&h, blk, 2);
            __m256 v[4];
            if (w->kind == W_Q4_0) {
                __m128i q = _mm_loadu_si128((const __m128i *)(blk + 2));
                __m128i lo = _mm_and_si128(q, m), hi = _mm_and_si128(_mm_srli_epi16(q, 4), m);
                __m128i p[4] = {lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)};
                for (int g = 0; g < 4; g++) v[g] = _mm256_sub_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(p[g])), eight);
            } else {
                for (int g = 0; g < 4; g++)
                    v[g] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(blk + 2 + 8 * g))));
            }
            __m256 acc0 = _mm256_fmadd_ps(v[0], _mm256_loadu_ps(x), _mm256_setzero_ps());
            __m256 acc1 = _mm256_fmadd_ps(v[1], _mm256_loadu_ps(x + 8), _mm256_setzero_ps());
            acc0 = _mm256_fmadd_ps(v[2], _mm256_loadu_ps(x + 16), acc0);
            acc1 = _mm256_fmadd_ps(v[3], _mm256_loadu_ps(x + 24), acc1);
            row = _mm256_fmadd_ps(_mm256_add_ps(acc0, acc1), _mm256_cvtph_ps(_mm_set1_epi16((short)h)), row);
        }
        return hsum8_avx2(row);
    }
    switch (w->kind) { /* constant kind and zero: the compiler specialises each loop */
    case W_LUT4: return w->zero ? codes_dot_avx2(w, o, x, W_LUT4, 1) : codes_dot_avx2(w, o, x, W_LUT4, 0);
    case W_AFFINE4: return w->zero ? codes_dot_avx2(w, o, x, W_AFFINE4, 1) : codes_dot_avx2(w, o, x, W_AFFINE4, 0);
    case W_LUT8: return w->zero ? codes_dot_avx2(w, o, x, W_LUT8, 1) : codes_dot_avx2(w, o, x, W_LUT8, 0);
    default: return w->zero ? codes_dot_avx2(w, o, x, W_AFFINE8, 1) : codes_dot_avx2(w, o, x, W_AFFINE8, 0);
    }
}
#endif

typedef void (*decode_fn)(const lowbit_weights *, int64_t, float *);
typedef float (*dot_fn)(const float *, const float *, int64_t);
typedef float (*row_dot_fn)(const lowbit_weights *, int64_t, const float *, const float *);

/* 1 when the AVX2 path can run here (x86-64 with AVX2, FMA and F16C), else 0 */
int lowbit_linear_isa(void) {
#ifdef LOWBIT_X86
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
#else
    return 0;
#endif
}

static void pick(int isa, decode_fn *decode, dot_fn *dot, row_dot_fn *row_dot);

/* One row of W times x, in the order row_dot_generic defines (dense rows: dot_*'s order);
 * xp: NULL, or x as lowbit_prepare_x made it when lowbit_grouped(w) (faster, same result) */
float lowbit_row_dot(const lowbit_weights *w, int64_t o, const float *x, const float *xp, int isa) {
    decode_fn decode;
    dot_fn dot;
    row_dot_fn row_dot;
    pick(isa, &decode, &dot, &row_dot);
    if (w->kind == W_F32) return dot((const float *)w->codes + o * w->in_features, x, w->in_features);
    return row_dot(w, o, x, xp);
}

static void pick(int isa, decode_fn *decode, dot_fn *dot, row_dot_fn *row_dot) {
    *decode = decode_row_generic;
    *dot = dot_generic;
    *row_dot = row_dot_generic;
#ifdef LOWBIT_X86
    if (isa) {
        *decode = decode_row_avx2;
        *dot = dot_avx2;
        *row_dot = row_dot_avx2;
    }
#endif
}

/* y (M, N) = x (M, K) W^T + bias; bias may be NULL. M = 1 (decoding a token) runs fully
 * fused (row_dot_*); small M > 1 decodes each row of W once into a buffer and dots it with
 * every row of x; lowbit.kernels.linear takes large M through lowbit_decode_rows and
 * torch's matmul instead. Returns 0, or -1 when a thread's row buffer could not be
 * allocated (y is then incomplete). */
int lowbit_linear(const lowbit_weights *w, const float *x, int64_t M, const float *bias, float *y, int isa) {
    decode_fn decode;
    dot_fn dot;
    row_dot_fn row_dot;
    pick(isa, &decode, &dot, &row_dot);
    int64_t K = w->in_features, N = w->out_features;
    if (M == 1) { /* threads only where the work outweighs waking them (~5 us here) */
        float *xp = lowbit_grouped(w) ? malloc((size_t)K * sizeof(float)) : NULL; /* NULL: the portable order */
        if (xp) lowbit_prepare_x(x, K, xp);
#pragma omp parallel for schedule(static) if (N * K >= SERIAL_BELOW)
        for (int64_t o = 0; o < N; o++) y[o] = row_dot(w, o, x, xp) + (bias ? bias[o] : 0.0f);
        free(xp);
        return 0;
    }
    int failed = 0;
#pragma omp parallel reduction(| : failed)
    {
        float *row = malloc((size_t)K * sizeof(float));
        failed = row == NULL;
#pragma omp for schedule(static)
        for (int64_t o = 0; o < N; o++) {
            if (!row) continue;
            decode(w, o, row);
            float b = bias ? bias[o] : 0.0f;
            for (int64_t m = 0; m < M; m++) y[m * N + o] = dot(row, x + m * K, K) + b;
        }
        free(row);
    }
    return failed ? -1 : 0;
}

/* rows [o0, o1) of W, decoded (bit-identical to the reference decode) into out ((o1 - o0), K) */
void lowbit_decode_rows(const lowbit_weights *w, int64_t o0, int64_t o1, float *out, int isa) {
    decode_fn decode;
    dot_fn dot;
    row_dot_fn row_dot;
    pick(isa, &decode, &dot, &row_dot);
#pragma omp parallel for schedule(static)
    for (int64_t o = o0; o < o1; o++) decode(w, o, out + (o - o0) * w->in_features);
}
