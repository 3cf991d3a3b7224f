/*
 * Decode attention over the paged KV cache for the CPU: one pass per sequence for bf16 queries on a bf16
 * cache with head_dim 64 or 128 (below), otherwise one pass per (sequence, KV head).
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
 * With window > 0 only the last `window` positions are attended. Arithmetic is float32 throughout (the bf16
 * path multiplies bf16 pairs, exactly, into float32 sums); bf16 outputs are rounded to nearest even.
 *
 * Built into the kernel library by runtime/engine/kernels/build.py with the system C compiler; no Python or
 * PyTorch headers.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "cpu_common.h"
#include "engine_kernels.h"

#define MAX_GROUP ENGINE_KERNELS_MAX_GROUP

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

#if defined(__AVX512BF16__)
/* bf16 queries on a bf16 cache (the 9+-row steps of a bf16 model), head_dim 64 or 128: one pass per sequence
 * over its slots, every head at once.
 *
 * q.k: 16 positions at a time, every head over the same 16 K rows (L1-resident while they are used), on
 * VDPBF16PS straight from the cache: the product of two bf16 values is exact in float32, so this is the
 * float32 dot product up to summation order. The 16 sums per head come out of one transpose-and-add tree.
 * p.V: each V row is widened with two bit operations (a 32-bit lane holds the pair (2i, 2i+1): shifted left
 * it is value 2i, masked it is value 2i+1); even and odd dimensions accumulate apart, up to 3 heads (head_dim
 * 64) or 1 head (128) per pass over a 16-row chunk, the accumulators parked in `o` between chunks.
 * Prefetch: the cache rows are scattered over blocks, which the hardware prefetchers do not follow, so each
 * chunk asks for the next chunk's rows into L2 (then the first V rows, then the next sequence's first K rows).
 * Measured on this machine's EPYC, 16 sequences x 121 positions x 30 layers of SmolLM2 shapes: 3.5 ms against
 * 7.2 ms for the float32 path below. */
static inline __m512 sum16x16(__m512 v[16]) {  /* lane i: the sum of v[i]'s 16 lanes */
    __m512 t[8], u[4], w[2];
    for (int i = 0; i < 8; ++i)  /* per 128-bit lane: [a0+a2, b0+b2, a1+a3, b1+b3] */
        t[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
    for (int i = 0; i < 4; ++i)  /* per 128-bit lane: that lane's partial sums of v[4i..4i+3] */
        u[i] = _mm512_add_ps(_mm512_shuffle_ps(t[2 * i], t[2 * i + 1], 0x44), _mm512_shuffle_ps(t[2 * i], t[2 * i + 1], 0xEE));
    for (int i = 0; i < 2; ++i)
        w[i] = _mm512_add_ps(_mm512_shuffle_f32x4(u[2 * i], u[2 * i + 1], 0x88), _mm512_shuffle_f32x4(u[2 * i], u[2 * i + 1], 0xDD));
    return _mm512_add_ps(_mm512_shuffle_f32x4(w[0], w[1], 0x88), _mm512_shuffle_f32x4(w[0], w[1], 0xDD));
}

/* always_inline: GCC sees prefetches as free of side effects, so a separate call to this would be deleted */
static inline __attribute__((always_inline)) void prefetch_rows(const uint16_t *base, const int64_t *rows, int64_t from, int64_t to, int64_t row_stride) {
    const int64_t row_bytes = row_stride * 2;
    for (int64_t i = from; i < to; ++i) {
        const char *row = (const char *)(base + rows[i] * row_stride);
        for (int64_t b = 0; b < row_bytes; b += 64) _mm_prefetch(row + b, _MM_HINT_T1);
    }
}

/* GB heads' p.V over n rows; acc holds [head][chunk][16 even | 16 odd] float32 sums in and out. */
static inline __attribute__((always_inline)) void values_chunk_bf16(
    const int CHUNKS, const int GB, const float *restrict p, int64_t p_stride, const uint16_t *value,
    const int64_t *restrict rows, int n, int64_t row_stride, int64_t head_offset, float *restrict acc)
{
    __m512 even[3][4], odd[3][4];
    for (int g = 0; g < GB; ++g)
        for (int c = 0; c < CHUNKS; ++c) {
            even[g][c] = _mm512_loadu_ps(acc + (g * CHUNKS + c) * 32);
            odd[g][c] = _mm512_loadu_ps(acc + (g * CHUNKS + c) * 32 + 16);
        }
    const __m512i high = _mm512_set1_epi32((int)0xFFFF0000u);
    for (int t = 0; t < n; ++t) {
        const uint16_t *v = value + rows[t] * row_stride + head_offset;
        __m512 ve[4], vo[4];
        for (int c = 0; c < CHUNKS; ++c) {
            const __m512i pairs = _mm512_loadu_si512((const void *)(v + 32 * c));
            ve[c] = _mm512_castsi512_ps(_mm512_slli_epi32(pairs, 16));
            vo[c] = _mm512_castsi512_ps(_mm512_and_si512(pairs, high));
        }
        for (int g = 0; g < GB; ++g) {
            const __m512 weight = _mm512_set1_ps(p[g * p_stride + t]);
            for (int c = 0; c < CHUNKS; ++c) {
                even[g][c] = _mm512_fmadd_ps(weight, ve[c], even[g][c]);
                odd[g][c] = _mm512_fmadd_ps(weight, vo[c], odd[g][c]);
            }
        }
    }
    for (int g = 0; g < GB; ++g)
        for (int c = 0; c < CHUNKS; ++c) {
            _mm512_storeu_ps(acc + (g * CHUNKS + c) * 32, even[g][c]);
            _mm512_storeu_ps(acc + (g * CHUNKS + c) * 32 + 16, odd[g][c]);
        }
}

/* q [num_heads][CHUNKS*32] bf16 (unscaled); o [num_heads][CHUNKS*32] float32; scores [num_heads][count]. */
static inline __attribute__((always_inline)) void attend_sequence_bf16(
    const int CHUNKS, const uint16_t *restrict q, float *restrict o, const uint16_t *key, const uint16_t *value,
    const int64_t *restrict rows, int64_t count, int num_heads, int num_kv_heads, float scale,
    float *restrict scores, const int64_t *next_rows, int64_t next_count)
{
    const int head_dim = CHUNKS * 32, group = num_heads / num_kv_heads;
    const int64_t row_stride = (int64_t)num_kv_heads * head_dim;
    const __m512 scaled = _mm512_set1_ps(scale);
    for (int64_t t = 0; t < count; t += 16) {
        const int n = count - t < 16 ? (int)(count - t) : 16;
        if (t + 16 < count) {
            prefetch_rows(key, rows, t + 16, t + 32 < count ? t + 32 : count, row_stride);
        } else {
            prefetch_rows(value, rows, 0, count < 16 ? count : 16, row_stride);
            if (next_rows != NULL) prefetch_rows(key, next_rows, 0, next_count < 16 ? next_count : 16, row_stride);
        }
        for (int h = 0; h < num_heads; ++h) {
            const uint16_t *k0 = key + (int64_t)(h / group) * head_dim;
            __m512bh qv[4];
            for (int c = 0; c < CHUNKS; ++c) qv[c] = (__m512bh)_mm512_loadu_si512((const void *)(q + h * head_dim + 32 * c));
            __m512 v[16];
            for (int i = 0; i < 16; ++i) {
                if (i >= n) {
                    v[i] = _mm512_setzero_ps();
                    continue;
                }
                const uint16_t *k = k0 + rows[t + i] * row_stride;
                __m512 acc = _mm512_dpbf16_ps(_mm512_setzero_ps(), qv[0], (__m512bh)_mm512_loadu_si512((const void *)k));
                for (int c = 1; c < CHUNKS; ++c)
                    acc = _mm512_dpbf16_ps(acc, qv[c], (__m512bh)_mm512_loadu_si512((const void *)(k + 32 * c)));
                v[i] = acc;
            }
            _mm512_mask_storeu_ps(scores + h * count + t, (__mmask16)((1u << n) - 1u), _mm512_mul_ps(sum16x16(v), scaled));
        }
    }
    for (int h = 0; h < num_heads; ++h) softmax16(scores + h * count, count);
    memset(o, 0, sizeof(float) * (size_t)(num_heads * head_dim));
    const int most = CHUNKS == 2 ? 3 : 1;  /* 4 * CHUNKS * heads accumulators + 2 * CHUNKS widened rows <= 32 */
    for (int64_t t = 0; t < count; t += 16) {
        const int n = count - t < 16 ? (int)(count - t) : 16;
        if (t + 16 < count) prefetch_rows(value, rows, t + 16, t + 32 < count ? t + 32 : count, row_stride);
        for (int kv = 0; kv < num_kv_heads; ++kv)
            for (int g = 0; g < group; g += most) {
                const int gb = group - g < most ? group - g : most, h = kv * group + g;
                const float *p = scores + h * count + t;
                const int64_t head_offset = (int64_t)kv * head_dim;
                float *acc = o + h * head_dim;
                if (gb == 3) values_chunk_bf16(CHUNKS, 3, p, count, value, rows + t, n, row_stride, head_offset, acc);
                else if (gb == 2) values_chunk_bf16(CHUNKS, 2, p, count, value, rows + t, n, row_stride, head_offset, acc);
                else values_chunk_bf16(CHUNKS, 1, p, count, value, rows + t, n, row_stride, head_offset, acc);
            }
    }
    const __m512i first = _mm512_set_epi32(23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    const __m512i second = _mm512_set_epi32(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8);
    for (int64_t i = 0; i < (int64_t)num_heads * head_dim; i += 32) {  /* back to dimension order */
        const __m512 even = _mm512_loadu_ps(o + i), odd = _mm512_loadu_ps(o + i + 16);
        _mm512_storeu_ps(o + i, _mm512_permutex2var_ps(even, first, odd));
        _mm512_storeu_ps(o + i + 16, _mm512_permutex2var_ps(even, second, odd));
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
    /* the bf16 path's scores [num_heads][max_len] and output [num_heads][head_dim] */
#if defined(__AVX512BF16__)
    const int bf16_path = io_dtype == 1 && dtype == 1 && (head_dim == 64 || head_dim == 128);
#else
    const int bf16_path = 0;
#endif
    float *seq_scores = NULL, *seq_out = NULL;
    if (bf16_path) {
        seq_scores = (float *)malloc(sizeof(float) * (size_t)(num_heads * (max_len + head_dim) + 16));
        if (seq_scores == NULL) {
            free(scratch);
            return -1;
        }
        seq_out = seq_scores + (int64_t)num_heads * max_len;
    }
    float *scores = scratch;
    float *row = scores + group * max_len;
    float *q = row + head_dim;
    float *o = q + group * head_dim;
    float *vrows = o + group * head_dim;
    const int64_t group_size = (int64_t)group * head_dim;
    (void)vrows; /* used by the AVX-512 path only */
    (void)seq_out; /* and this by the AVX512-BF16 path */
    for (int s = 0; s < num_seqs; ++s) {
        const int64_t length = lengths[s];
        const int64_t start = (window > 0 && length > window) ? length - window : 0;
        const int64_t count = length - start;
        const int64_t *seq_slots = slots + s * slots_stride + start;
#if defined(__AVX512BF16__)
        if (bf16_path && count > 0) {
            const int64_t *next_rows = NULL, first = (int64_t)s * num_heads * head_dim;
            int64_t next_count = 0;
            if (s + 1 < num_seqs) {
                const int64_t next_start = (window > 0 && lengths[s + 1] > window) ? lengths[s + 1] - window : 0;
                next_rows = slots + (s + 1) * slots_stride + next_start;
                next_count = lengths[s + 1] - next_start;
            }
            const uint16_t *seq_query = (const uint16_t *)query + first;
            if (head_dim == 64)
                attend_sequence_bf16(2, seq_query, seq_out, (const uint16_t *)key, (const uint16_t *)value, seq_slots,
                                     count, num_heads, num_kv_heads, scale, seq_scores, next_rows, next_count);
            else
                attend_sequence_bf16(4, seq_query, seq_out, (const uint16_t *)key, (const uint16_t *)value, seq_slots,
                                     count, num_heads, num_kv_heads, scale, seq_scores, next_rows, next_count);
            for (int64_t i = 0; i < (int64_t)num_heads * head_dim; ++i)
                ((uint16_t *)out)[first + i] = float_to_bf16(seq_out[i]);
            continue;
        }
#endif
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
    free(seq_scores);
    return 0;
}
