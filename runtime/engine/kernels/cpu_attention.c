/*
 * Decode attention over the paged KV cache for the CPU, in one pass per (sequence, KV head).
 *
 * PyTorch needs three passes for this (gather the context rows, convert them to float32, run SDPA on the
 * padded batch), each a separate kernel launch per layer. Here each query group reads its K/V rows
 * straight from the cache slots, converts them in registers and keeps the scores in a small buffer.
 *
 * Layouts (all contiguous):
 *   query, out  [num_seqs, num_heads, head_dim] of float32 (io_dtype 0) or bfloat16 (io_dtype 1)
 *   key, value  [num_slots, num_kv_heads, head_dim] of float32 (dtype 0) or bfloat16 (dtype 1)
 *   slots       int64 [num_seqs, slots_stride]: cache slot of each context position
 *   lengths     int64 [num_seqs]: context length including the new token
 * Query head h reads KV head h / (num_heads / num_kv_heads), as in grouped-query attention.
 * With window > 0 only the last `window` positions are attended. Arithmetic is float32 throughout; bf16
 * outputs are rounded to nearest even.
 *
 * Built by runtime/engine/kernels/__init__.py with the system C compiler; no Python or PyTorch headers.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "cpu_common.h"

#define MAX_GROUP 16

/* One cache row (head_dim values) as float32. */
static inline void load_row(const void *restrict base, int dtype, int64_t offset, int head_dim, float *restrict row) {
    if (dtype == 1) {
        const uint16_t *src = (const uint16_t *)base + offset;
#if defined(__AVX512F__)
        if ((head_dim & 15) == 0) {
            for (int i = 0; i < head_dim; i += 16) {
                __m256i half = _mm256_loadu_si256((const __m256i *)(src + i));
                __m512i wide = _mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16);
                _mm512_storeu_ps(row + i, _mm512_castsi512_ps(wide));
            }
            return;
        }
#endif
        for (int i = 0; i < head_dim; ++i) row[i] = bf16_to_float(src[i]);
    } else {
        memcpy(row, (const float *)base + offset, sizeof(float) * (size_t)head_dim);
    }
}

static inline float dot(const float *restrict a, const float *restrict b, int n) {
#if defined(__AVX512F__)
    if ((n & 15) == 0) {
        __m512 acc = _mm512_setzero_ps();
        for (int i = 0; i < n; i += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc);
        return _mm512_reduce_add_ps(acc);
    }
#endif
    float total = 0.0f;
    for (int i = 0; i < n; ++i) total += a[i] * b[i];
    return total;
}

/* y += w * x */
static inline void axpy(float *restrict y, float w, const float *restrict x, int n) {
    for (int i = 0; i < n; ++i) y[i] += w * x[i];
}

/* In place: p <- softmax(p) over n values. */
static void softmax(float *restrict p, int64_t n) {
    float top = p[0];
    for (int64_t t = 1; t < n; ++t) top = p[t] > top ? p[t] : top;
    for (int64_t t = 0; t < n; ++t) p[t] = exp_approx(p[t] - top);
    float total = 0.0f;
    for (int64_t t = 0; t < n; ++t) total += p[t];
    const float inverse = 1.0f / total;
    for (int64_t t = 0; t < n; ++t) p[t] *= inverse;
}

#if defined(__AVX512F__)
/* 16 float32 values of a cache row starting at `offset` (bf16 widened by a shift). */
static inline __m512 load16(const void *base, int dtype, int64_t offset) {
    if (dtype == 1) {
        __m256i half = _mm256_loadu_si256((const __m256i *)((const uint16_t *)base + offset));
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16));
    }
    return _mm512_loadu_ps((const float *)base + offset);
}

static inline __m512 exp16_nonpositive(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(p, n);
}

static void softmax16(float *restrict p, int64_t n) {
    __m512 top = _mm512_set1_ps(-3.0e38f);
    int64_t t = 0;
    for (; t + 16 <= n; t += 16) top = _mm512_max_ps(top, _mm512_loadu_ps(p + t));
    float maximum = _mm512_reduce_max_ps(top);
    for (; t < n; ++t) maximum = p[t] > maximum ? p[t] : maximum;
    const __m512 shift = _mm512_set1_ps(maximum);
    __m512 sum = _mm512_setzero_ps();
    for (t = 0; t + 16 <= n; t += 16) {
        __m512 e = exp16_nonpositive(_mm512_sub_ps(_mm512_loadu_ps(p + t), shift));
        _mm512_storeu_ps(p + t, e);
        sum = _mm512_add_ps(sum, e);
    }
    float total = _mm512_reduce_add_ps(sum);
    for (; t < n; ++t) {
        p[t] = exp_approx(p[t] - maximum);
        total += p[t];
    }
    const __m512 inverse = _mm512_set1_ps(1.0f / total);
    for (t = 0; t + 16 <= n; t += 16) _mm512_storeu_ps(p + t, _mm512_mul_ps(_mm512_loadu_ps(p + t), inverse));
    for (; t < n; ++t) p[t] *= 1.0f / total;
}

/* One (sequence, KV head): `group` pre-scaled queries of CHUNKS*16 values against `count` cache rows.
 * Scores go to scores[group][count]; the V rows are widened once into vrows[count][CHUNKS*16]. */
static inline __attribute__((always_inline)) void attend_avx512(
    const int CHUNKS, const float *restrict q, float *restrict o, const void *key, const void *value, int dtype,
    const int64_t *restrict rows, int64_t count, int64_t row_stride, int64_t head_offset, int group,
    float *restrict scores, float *restrict vrows)
{
    const int head_dim = CHUNKS * 16;
    for (int64_t t = 0; t < count; ++t) {
        const int64_t offset = rows[t] * row_stride + head_offset;
        __m512 k[CHUNKS];
        for (int c = 0; c < CHUNKS; ++c) k[c] = load16(key, dtype, offset + 16 * c);
        for (int g = 0; g < group; ++g) {
            __m512 acc = _mm512_mul_ps(_mm512_loadu_ps(q + g * head_dim), k[0]);
            for (int c = 1; c < CHUNKS; ++c) acc = _mm512_fmadd_ps(_mm512_loadu_ps(q + g * head_dim + 16 * c), k[c], acc);
            scores[g * count + t] = _mm512_reduce_add_ps(acc);
        }
        for (int c = 0; c < CHUNKS; ++c) _mm512_storeu_ps(vrows + t * head_dim + 16 * c, load16(value, dtype, offset + 16 * c));
    }
    for (int g = 0; g < group; ++g) {
        const float *p = scores + g * count;
        softmax16((float *)p, count);
        __m512 acc[CHUNKS];
        for (int c = 0; c < CHUNKS; ++c) acc[c] = _mm512_setzero_ps();
        for (int64_t t = 0; t < count; ++t) {
            const __m512 weight = _mm512_set1_ps(p[t]);
            for (int c = 0; c < CHUNKS; ++c) acc[c] = _mm512_fmadd_ps(weight, _mm512_loadu_ps(vrows + t * head_dim + 16 * c), acc[c]);
        }
        for (int c = 0; c < CHUNKS; ++c) _mm512_storeu_ps(o + g * head_dim + 16 * c, acc[c]);
    }
}
#endif

/* Any head_dim, any instruction set. */
static void attend_portable(
    const float *restrict q, float *restrict o, const void *key, const void *value, int dtype,
    const int64_t *restrict rows, int64_t count, int num_kv_heads, int kv, int head_dim, int group,
    float *restrict scores, float *restrict row)
{
    for (int64_t t = 0; t < count; ++t) {
        load_row(key, dtype, (rows[t] * num_kv_heads + kv) * head_dim, head_dim, row);
        for (int g = 0; g < group; ++g) scores[g * count + t] = dot(q + g * head_dim, row, head_dim);
    }
    for (int g = 0; g < group; ++g) softmax(scores + g * count, count);
    memset(o, 0, sizeof(float) * (size_t)(group * head_dim));
    for (int64_t t = 0; t < count; ++t) {
        load_row(value, dtype, (rows[t] * num_kv_heads + kv) * head_dim, head_dim, row);
        for (int g = 0; g < group; ++g) axpy(o + g * head_dim, scores[g * count + t], row, head_dim);
    }
}

/* Returns 0; -1 when the scratch buffer cannot be allocated; -2 when the head grouping is unsupported. */
int paged_decode_attention(
    const void *query, void *out, int io_dtype, const void *key, const void *value, int dtype,
    const int64_t *slots, int64_t slots_stride, const int64_t *lengths,
    int num_seqs, int num_heads, int num_kv_heads, int head_dim, float scale, int64_t window)
{
    const int group = num_heads / num_kv_heads;
    if (group < 1 || group > MAX_GROUP || group * num_kv_heads != num_heads) return -2;
    int64_t max_len = 0;
    for (int s = 0; s < num_seqs; ++s)
        if (lengths[s] > max_len) max_len = lengths[s];
    /* scores [group][max_len], one widened row, the group's scaled queries and its output, widened V rows */
    float *scratch = (float *)malloc(
        sizeof(float) * (size_t)(group * max_len + (1 + 2 * group) * head_dim + max_len * head_dim + 16));
    if (scratch == NULL) return -1;
    float *scores = scratch;
    float *row = scores + group * max_len;
    float *q = row + head_dim;
    float *o = q + group * head_dim;
    float *vrows = o + group * head_dim;
    const int64_t group_size = (int64_t)group * head_dim;
    (void)vrows; /* used by the AVX-512 path only */
    for (int s = 0; s < num_seqs; ++s) {
        const int64_t length = lengths[s];
        const int64_t start = (window > 0 && length > window) ? length - window : 0;
        const int64_t count = length - start;
        const int64_t *seq_slots = slots + s * slots_stride + start;
        for (int kv = 0; kv < num_kv_heads; ++kv) {
            const int64_t first = ((int64_t)s * num_heads + (int64_t)kv * group) * head_dim;
            if (io_dtype == 1)
                for (int64_t i = 0; i < group_size; ++i) q[i] = bf16_to_float(((const uint16_t *)query)[first + i]) * scale;
            else
                for (int64_t i = 0; i < group_size; ++i) q[i] = ((const float *)query)[first + i] * scale;
            if (count <= 0)
                memset(o, 0, sizeof(float) * (size_t)group_size);
#if defined(__AVX512F__)
            else if (head_dim == 64)
                attend_avx512(4, q, o, key, value, dtype, seq_slots, count, (int64_t)num_kv_heads * head_dim,
                              (int64_t)kv * head_dim, group, scores, vrows);
            else if (head_dim == 128)
                attend_avx512(8, q, o, key, value, dtype, seq_slots, count, (int64_t)num_kv_heads * head_dim,
                              (int64_t)kv * head_dim, group, scores, vrows);
#endif
            else
                attend_portable(q, o, key, value, dtype, seq_slots, count, num_kv_heads, kv, head_dim, group, scores, row);
            if (io_dtype == 1)
                for (int64_t i = 0; i < group_size; ++i) ((uint16_t *)out)[first + i] = float_to_bf16(o[i]);
            else
                memcpy((float *)out + first, o, sizeof(float) * (size_t)group_size);
        }
    }
    free(scratch);
    return 0;
}
