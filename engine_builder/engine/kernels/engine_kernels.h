/*
 * The ABI of the CPU kernel library: every function Python calls and every struct it fills. Each .c file of
 * this folder includes it, so the compiler checks each definition against its declaration here; the Python
 * mirror (runtime/engine/kernels/bindings.py) is checked against the library at load through the four
 * engine_kernels_* functions below.
 *
 * Conventions: io_dtype / dtype 0 is float32, 1 is bfloat16 (raw uint16 bits); arrays are row-major; functions
 * return 0 on success and a negative status the caller answers by running its PyTorch path.
 */
#ifndef ENGINE_KERNELS_H
#define ENGINE_KERNELS_H
#include <stdint.h>

/* Bumped whenever a declaration or struct below changes. */
#define ENGINE_KERNELS_ABI_VERSION 1

/* Largest rms_norm / silu_mul row, rotary head_dim, and query heads per KV head the kernels take. */
#define ENGINE_KERNELS_MAX_DIM 16384
#define ENGINE_KERNELS_MAX_HEAD_DIM 1024
#define ENGINE_KERNELS_MAX_GROUP 16

/* ---- cpu_abi.c: the ABI check ---- */
int engine_kernels_abi_version(void);
/* sizeof the named struct below ("DecodeLayer", "DecodeShape", "DecodeScratch"), or -1 for another name. */
int64_t engine_kernels_struct_size(const char *name);
/* The index-th field of the named struct, in declaration order: its offset, its name in *name; -1 past the last. */
int64_t engine_kernels_field(const char *type, int64_t index, const char **name);
/* The named limit above ("MAX_DIM", "MAX_HEAD_DIM", "MAX_GROUP"), or -1 for another name. */
int64_t engine_kernels_limit(const char *name);

/* ---- cpu_gemm.c: y = x W^T (+ b) on AVX512-BF16 ---- */
/* 1 when this build has the AVX512-BF16 GEMM, else 0 (gemm_bf16 then returns -2). */
int gemm_bf16_available(void);
/* x bf16 [m, k] (k even); packed: W as bf16 panels [ceil(n/48)][k/2][48][2]; bias float32 [n] or NULL;
 * y [m, n] of out_dtype. */
int gemm_bf16(const uint16_t *x, const uint16_t *packed, const float *bias, void *y, int out_dtype, int64_t m,
              int64_t n, int64_t k);

/* ---- cpu_layers.c: fused element-wise ops, grammar masks, greedy argmax ---- */
int rms_norm(const void *x, const void *residual, void *sum_out, void *out, const void *weight, int io_dtype,
             int weight_dtype, int64_t rows, int64_t dim, int64_t x_stride, float eps, float offset);
int rotary(void *x, int io_dtype, const void *cos, const void *sin, int64_t rows, int64_t heads, int64_t head_dim,
           int64_t row_stride);
int silu_mul(const void *gate_up, void *out, int io_dtype, int64_t rows, int64_t inter);
int apply_token_bitmask(float *logits, int64_t vocab, const int32_t *masks, int64_t words, const int64_t *rows,
                        int64_t num_rows);
int argmax_rows(const float *x, int64_t rows, int64_t cols, int64_t *out);

/* ---- cpu_attention.c: decode attention over the paged KV cache ---- */
int paged_decode_attention(const void *query, void *out, int io_dtype, const void *key, const void *value, int dtype,
                           const int64_t *slots, int64_t slots_stride, const int64_t *lengths, int num_seqs,
                           int num_heads, int num_kv_heads, int head_dim, float scale, int64_t window);

/* ---- cpu_decoder.c: every decoder layer of a decode-only step in one call ---- */
typedef struct {
    const void *input_norm, *post_norm;             /* [hidden] of norm_dtype */
    const uint16_t *qkv, *o_proj, *gate_up, *down;  /* packed bf16 panels (gemm_bf16's layout) */
    const float *qkv_bias, *o_bias, *gate_up_bias, *down_bias;  /* float32 or NULL */
    uint16_t *key_cache, *value_cache;              /* this layer's [slots, num_kv_heads, head_dim] bf16 */
    int64_t window;                                 /* sliding window, 0 = none */
    float scale;
} DecodeLayer;

typedef struct {
    int64_t rows, hidden, q_size, kv_size, inter, num_heads, num_kv_heads, head_dim;
    int64_t io_dtype, norm_dtype;
    float eps, norm_offset;
} DecodeShape;

typedef struct {  /* caller-owned buffers for `rows` rows, of io_dtype unless said */
    void *normed, *qkv, *query, *attn, *proj, *mid, *gate_up, *act;
    uint16_t *staging;  /* bf16 [rows, max(hidden, q_size, inter)]: GEMM inputs when io is float32 */
} DecodeScratch;

/* hidden [rows, hidden] in and out; cos, sin [rows, head_dim] of io_dtype; slot_mapping [rows] (where each row's
 * K/V go); context_slots [rows, slots_stride]; lengths [rows] (context length with the new token). */
int decode_layers(const DecodeLayer *layers, int64_t num_layers, const DecodeShape *shape,
                  const DecodeScratch *scratch, void *hidden, const void *cos, const void *sin,
                  const int64_t *slot_mapping, const int64_t *context_slots, int64_t slots_stride,
                  const int64_t *lengths);

#endif
