/* The stored weight the fused kernels read (linear.c), shared with the decode step (llama_step.c).
 * Mirrored by ctypes in lowbit/kernels/linear.py. */
#ifndef LOWBIT_LINEAR_H
#define LOWBIT_LINEAR_H
#include <stdint.h>

/* kinds of stored weight; W_F32: a dense float32 (out, in) weight at codes */
enum { W_LUT4 = 0, W_AFFINE4 = 1, W_LUT8 = 2, W_AFFINE8 = 3, W_Q4_0 = 4, W_Q8_0 = 5, W_F32 = 6 };

typedef struct {
    int64_t kind, in_features, out_features, block;
    const uint8_t *codes;  /* packed codes (4-bit: first element in the high nibble), GGUF blocks, or floats */
    const float *table;    /* LUT4: 16 values, LUT8: 256 values */
    const float *factor;   /* per block: value = table[q] * factor[b] */
    const float *zero;     /* per block, or NULL: value = (table[q] - zero[b]) * factor[b] */
    float affine_offset;   /* AFFINE4/8: table[q] = q - affine_offset, computed instead of looked up */
} lowbit_weights;

/* 1 when row dots of w read a prepared input (4-bit codes, in_features and block multiples of 32) */
int lowbit_grouped(const lowbit_weights *w);
/* xp (K floats): x permuted as grouped rows read it */
void lowbit_prepare_x(const float *x, int64_t K, float *xp);
/* row o of W times x (K = in_features floats); xp: NULL or lowbit_prepare_x's x, used by grouped
 * rows (faster, the same result); no threads of its own */
float lowbit_row_dot(const lowbit_weights *w, int64_t o, const float *x, const float *xp, int isa);

#endif
