/*
 * Fused element-wise parts of a decoder layer for the CPU: residual add + RMSNorm, rotary embedding in place,
 * and SiLU(gate) * up; grammar bitmasks applied to logits, and the greedy argmax. In PyTorch each of these is
 * four to seven small kernels per call, whose launch cost is most of a decode step's non-GEMM time at small
 * batch sizes.
 *
 * Activations are float32 (io_dtype 0) or bfloat16 (io_dtype 1), row-major with a row stride in elements.
 * Arithmetic is float32; bf16 results are rounded to nearest even where the PyTorch path rounds:
 *   rms_norm:  out = round(round(x * rsqrt(mean(x^2) + eps)) * w)       (offset == 0, as in Llama)
 *              out = round(x * rsqrt(mean(x^2) + eps) * (offset + w))    (offset != 0, as in Gemma)
 * The loops are written so the compiler vectorizes them (built with -O3 -march=native).
 */
#include <stdint.h>
#include <string.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "cpu_common.h"
#include "engine_kernels.h"

#define LANES 16

static inline float round_bf16(float value) { return bf16_to_float(float_to_bf16(value)); }

static inline void load(const void *src, int dtype, int64_t offset, int64_t n, float *restrict dst) {
    if (dtype == 1) {
        const uint16_t *s = (const uint16_t *)src + offset;
        for (int64_t i = 0; i < n; ++i) dst[i] = bf16_to_float(s[i]);
    } else {
        memcpy(dst, (const float *)src + offset, sizeof(float) * (size_t)n);
    }
}

static inline void store(void *dst, int dtype, int64_t offset, int64_t n, const float *restrict src) {
    if (dtype == 1) {
        uint16_t *d = (uint16_t *)dst + offset;
        for (int64_t i = 0; i < n; ++i) d[i] = float_to_bf16(src[i]);
    } else {
        memcpy((float *)dst + offset, src, sizeof(float) * (size_t)n);
    }
}

#define MAX_DIM ENGINE_KERNELS_MAX_DIM
#define MAX_HEAD_DIM ENGINE_KERNELS_MAX_HEAD_DIM

/* With residual != NULL the input is x + residual (rounded to io_dtype), also written to sum_out.
 * x rows are x_stride elements apart; every other array is contiguous [rows, dim].
 * Returns 0, or -1 when dim exceeds MAX_DIM. */
int rms_norm(const void *x, const void *residual, void *sum_out, void *out, const void *weight, int io_dtype,
             int weight_dtype, int64_t rows, int64_t dim, int64_t x_stride, float eps, float offset)
{
    if (dim > MAX_DIM) return -1;
    float values[MAX_DIM], w[MAX_DIM], extra[MAX_DIM];
    load(weight, weight_dtype, 0, dim, w);
    for (int64_t r = 0; r < rows; ++r) {
        load(x, io_dtype, r * x_stride, dim, values);
        if (residual != NULL) {
            load(residual, io_dtype, r * dim, dim, extra);
            for (int64_t i = 0; i < dim; ++i) values[i] += extra[i];
            if (io_dtype == 1)
                for (int64_t i = 0; i < dim; ++i) values[i] = round_bf16(values[i]);
            store(sum_out, io_dtype, r * dim, dim, values);
        }
        float lanes[LANES] = {0};
        int64_t i = 0;
        for (; i + LANES <= dim; i += LANES)
            for (int j = 0; j < LANES; ++j) lanes[j] += values[i + j] * values[i + j];
        float total = 0.0f;
        for (int j = 0; j < LANES; ++j) total += lanes[j];
        for (; i < dim; ++i) total += values[i] * values[i];
        const float inverse = 1.0f / __builtin_sqrtf(total / (float)dim + eps);
        if (offset != 0.0f) {
            for (i = 0; i < dim; ++i) values[i] = values[i] * inverse * (offset + w[i]);
        } else if (io_dtype == 1) {
            for (i = 0; i < dim; ++i) values[i] = round_bf16(values[i] * inverse) * w[i];
        } else {
            for (i = 0; i < dim; ++i) values[i] = values[i] * inverse * w[i];
        }
        store(out, io_dtype, r * dim, dim, values);
    }
    return 0;
}

/* In place, rotate-half (GPT-NeoX) layout: x[i] * cos[i] + rotate_half(x)[i] * sin[i] for each head.
 * x: rows of `heads` heads of head_dim values, row stride in elements; cos, sin: [rows, head_dim] of io_dtype
 * (the PyTorch path rounds the tables to the activation dtype too). */
int rotary(void *x, int io_dtype, const void *cos, const void *sin, int64_t rows, int64_t heads,
           int64_t head_dim, int64_t row_stride)
{
    if (head_dim > MAX_HEAD_DIM || (head_dim & 1)) return -1;
    const int64_t half = head_dim / 2;
    float values[MAX_HEAD_DIM], rotated[MAX_HEAD_DIM], c[MAX_HEAD_DIM], s[MAX_HEAD_DIM];
    for (int64_t r = 0; r < rows; ++r) {
        load(cos, io_dtype, r * head_dim, head_dim, c);
        load(sin, io_dtype, r * head_dim, head_dim, s);
        for (int64_t h = 0; h < heads; ++h) {
            const int64_t offset = r * row_stride + h * head_dim;
            load(x, io_dtype, offset, head_dim, values);
            for (int64_t i = 0; i < half; ++i) {
                rotated[i] = values[i] * c[i] - values[i + half] * s[i];
                rotated[i + half] = values[i + half] * c[i + half] + values[i] * s[i + half];
            }
            store(x, io_dtype, offset, head_dim, rotated);
        }
    }
    return 0;
}

static void silu_times(float *restrict gate, const float *restrict up, int64_t n) {
    for (int64_t i = 0; i < n; ++i) {
        const float g = gate[i];
        gate[i] = g / (1.0f + exp_approx(-g)) * up[i];
    }
}

/* out[r] = silu(gate_up[r, :inter]) * gate_up[r, inter:]; out is [rows, inter]. */
int silu_mul(const void *gate_up, void *out, int io_dtype, int64_t rows, int64_t inter)
{
    if (inter > MAX_DIM) return -1;
    float gate[MAX_DIM], up[MAX_DIM];
    for (int64_t r = 0; r < rows; ++r) {
        load(gate_up, io_dtype, r * 2 * inter, inter, gate);
        load(gate_up, io_dtype, r * 2 * inter + inter, inter, up);
        silu_times(gate, up, inter);
        store(out, io_dtype, r * inter, inter, gate);
    }
    return 0;
}

/* Grammar masks: logits[rows[i]][t] = -inf wherever bit t of masks[i] (packed int32 words, bit set = allowed)
 * is clear; tokens past the mask's last word are disallowed too. */
int apply_token_bitmask(float *logits, int64_t vocab, const int32_t *masks, int64_t words, const int64_t *rows,
                        int64_t num_rows)
{
    const float negative_infinity = -__builtin_inff();
    const int64_t limit = vocab < words * 32 ? vocab : words * 32;
    for (int64_t i = 0; i < num_rows; ++i) {
        float *row = logits + rows[i] * vocab;
        const uint32_t *mask = (const uint32_t *)masks + i * words;
        int64_t t = 0;
#if defined(__AVX512F__)
        const __m512 fill = _mm512_set1_ps(negative_infinity);
        for (; t + 32 <= limit; t += 32) {
            const uint32_t word = mask[t >> 5];
            if (word == 0xffffffffu) continue;
            _mm512_mask_storeu_ps(row + t, (__mmask16)~(word & 0xffffu), fill);
            _mm512_mask_storeu_ps(row + t + 16, (__mmask16)~(word >> 16), fill);
        }
#endif
        for (; t < limit; ++t)
            if (!((mask[t >> 5] >> (t & 31)) & 1u)) row[t] = negative_infinity;
        for (; t < vocab; ++t) row[t] = negative_infinity;
    }
    return 0;
}

/* out[r] = the first index of the largest value of row r of x [rows, cols] (float32, contiguous), as
 * torch.argmax picks it. Returns 0, or -1 when a row holds a NaN (torch.argmax points at the NaN; the caller
 * keeps PyTorch for such rows). PyTorch's CPU argmax reads ~1 G values/s on this machine; this streams. */
int argmax_rows(const float *x, int64_t rows, int64_t cols, int64_t *out)
{
    int status = 0;
    for (int64_t r = 0; r < rows; ++r) {
        const float *row = x + r * cols;
        int64_t best_index = 0;
        float best = row[0];
        int64_t t = 0;
        int has_nan = 0;
#if defined(__AVX512F__)
        if (cols >= 16) {
            __m512 top = _mm512_set1_ps(-__builtin_inff());
            __m512i index = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0), at = index;
            const __m512i step = _mm512_set1_epi32(16);
            __mmask16 nan = 0;
            for (; t + 16 <= cols; t += 16) {
                const __m512 v = _mm512_loadu_ps(row + t);
                const __mmask16 greater = _mm512_cmp_ps_mask(v, top, _CMP_GT_OQ);
                nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
                top = _mm512_mask_mov_ps(top, greater, v);
                at = _mm512_mask_mov_epi32(at, greater, index);
                index = _mm512_add_epi32(index, step);
            }
            has_nan = nan != 0;
            float lanes[16];
            int32_t where[16];
            _mm512_storeu_ps(lanes, top);
            _mm512_storeu_si512((void *)where, at);
            best = lanes[0];
            best_index = where[0];
            for (int i = 1; i < 16; ++i)
                if (lanes[i] > best || (lanes[i] == best && where[i] < best_index)) {
                    best = lanes[i];
                    best_index = where[i];
                }
        }
#endif
        for (; t < cols; ++t) {
            const float v = row[t];
            if (v != v) has_nan = 1;
            else if (v > best) {
                best = v;
                best_index = t;
            }
        }
        if (best != best) has_nan = 1;  /* row[0] itself was NaN (scalar path) */
        if (has_nan) status = -1;
        out[r] = best_index;
    }
    return status;
}
