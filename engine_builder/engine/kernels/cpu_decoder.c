/*
 * Every decoder layer of a decode-only CPU step in one call: the same kernels, in the same order, with the
 * same roundings as the per-op path of runtime/engine/models/decoder.py, minus ~10 Python-level calls and
 * their tensor allocations per layer (~0.15 ms per layer on this machine, a sixth of a 16-row step).
 *
 * The kernels themselves live in cpu_gemm.c, cpu_layers.c and cpu_attention.c, built into the same library;
 * this file calls them directly and repeats none of them.
 *
 * Per layer, for `rows` decode rows (one new token per sequence):
 *   x = rms_norm(hidden);  qkv = x Wqkv^T (+ b);  rotary on q and k in place;  k, v -> cache slots;
 *   attn = attention(q, cache);  proj = attn Wo^T;  (normed, mid) = rms_norm(proj + hidden), proj + hidden;
 *   hidden = mid + down(silu(gate) * up)(normed)
 * Activations are float32 (io_dtype 0) or bf16 (1); GEMM inputs are bf16 (float32 rounded to nearest even,
 * as torch's .to(bfloat16)), outputs in io_dtype. The cache is bf16.
 */
#include <stdint.h>
#include <string.h>

#include "cpu_common.h"
#include "engine_kernels.h"

static int linear(const DecodeShape *shape, const DecodeScratch *s, const void *x, int64_t in_features,
                  const uint16_t *panels, const float *bias, void *y, int64_t out_features)
{
    const uint16_t *input = (const uint16_t *)x;
    if (shape->io_dtype == 0) {
        const float *source = (const float *)x;
        for (int64_t i = 0; i < shape->rows * in_features; ++i) s->staging[i] = float_to_bf16(source[i]);
        input = s->staging;
    }
    return gemm_bf16(input, panels, bias, y, (int)shape->io_dtype, shape->rows, out_features, in_features);
}

/* One row of n values from a (possibly strided) io_dtype buffer into the bf16 cache. */
static void to_cache(uint16_t *restrict dst, const void *src, int io_dtype, int64_t offset, int64_t n) {
    if (io_dtype == 1) {
        memcpy(dst, (const uint16_t *)src + offset, sizeof(uint16_t) * (size_t)n);
    } else {
        const float *values = (const float *)src + offset;
        for (int64_t i = 0; i < n; ++i) dst[i] = float_to_bf16(values[i]);
    }
}

/* hidden [rows, hidden] in and out. cos, sin [rows, head_dim] of io_dtype; slot_mapping [rows] (where each
 * row's K/V go); context_slots [rows, slots_stride]; lengths [rows] (context length with the new token).
 * Returns 0, or the first failing kernel's status (the step must then be redone by the per-op path). */
int decode_layers(const DecodeLayer *layers, int64_t num_layers, const DecodeShape *shape, const DecodeScratch *s,
                  void *hidden, const void *cos, const void *sin, const int64_t *slot_mapping,
                  const int64_t *context_slots, int64_t slots_stride, const int64_t *lengths)
{
    const int io = (int)shape->io_dtype;
    const size_t element = io == 1 ? 2 : 4;
    const int64_t rows = shape->rows, width = shape->q_size + 2 * shape->kv_size;
    int status = 0;
    for (int64_t l = 0; l < num_layers && status == 0; ++l) {
        const DecodeLayer *layer = &layers[l];
        status = rms_norm(hidden, NULL, NULL, s->normed, layer->input_norm, io, (int)shape->norm_dtype, rows,
                          shape->hidden, shape->hidden, shape->eps, shape->norm_offset);
        if (status == 0)
            status = linear(shape, s, s->normed, shape->hidden, layer->qkv, layer->qkv_bias, s->qkv, width);
        if (status == 0)
            status = rotary(s->qkv, io, cos, sin, rows, shape->num_heads, shape->head_dim, width);
        if (status == 0)
            status = rotary((char *)s->qkv + element * (size_t)shape->q_size, io, cos, sin, rows,
                            shape->num_kv_heads, shape->head_dim, width);
        if (status != 0) break;
        for (int64_t r = 0; r < rows; ++r) {
            const int64_t row = r * width;
            memcpy((char *)s->query + element * (size_t)(r * shape->q_size), (const char *)s->qkv + element * (size_t)row,
                   element * (size_t)shape->q_size);
            to_cache(layer->key_cache + slot_mapping[r] * shape->kv_size, s->qkv, io, row + shape->q_size, shape->kv_size);
            to_cache(layer->value_cache + slot_mapping[r] * shape->kv_size, s->qkv, io, row + shape->q_size + shape->kv_size,
                     shape->kv_size);
        }
        status = paged_decode_attention(s->query, s->attn, io, layer->key_cache, layer->value_cache, 1, context_slots,
                                        slots_stride, lengths, (int)rows, (int)shape->num_heads,
                                        (int)shape->num_kv_heads, (int)shape->head_dim, layer->scale, layer->window);
        if (status == 0)
            status = linear(shape, s, s->attn, shape->q_size, layer->o_proj, layer->o_bias, s->proj, shape->hidden);
        if (status == 0)
            status = rms_norm(s->proj, hidden, s->mid, s->normed, layer->post_norm, io, (int)shape->norm_dtype, rows,
                              shape->hidden, shape->hidden, shape->eps, shape->norm_offset);
        if (status == 0)
            status = linear(shape, s, s->normed, shape->hidden, layer->gate_up, layer->gate_up_bias, s->gate_up,
                            2 * shape->inter);
        if (status == 0) status = silu_mul(s->gate_up, s->act, io, rows, shape->inter);
        if (status == 0)
            status = linear(shape, s, s->act, shape->inter, layer->down, layer->down_bias, s->proj, shape->hidden);
        if (status != 0) break;
        const int64_t n = rows * shape->hidden;
        if (io == 1) {
            uint16_t *out = (uint16_t *)hidden;
            const uint16_t *mid = (const uint16_t *)s->mid, *down = (const uint16_t *)s->proj;
            for (int64_t i = 0; i < n; ++i) out[i] = float_to_bf16(bf16_to_float(mid[i]) + bf16_to_float(down[i]));
        } else {
            float *out = (float *)hidden;
            const float *mid = (const float *)s->mid, *down = (const float *)s->proj;
            for (int64_t i = 0; i < n; ++i) out[i] = mid[i] + down[i];
        }
    }
    return status;
}
