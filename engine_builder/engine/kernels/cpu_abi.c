/*
 * What the Python binding checks before it calls anything: the ABI version, the size, fields and field offsets
 * of each struct it fills, and the limits it screens inputs against (runtime/engine/kernels/bindings.py refuses the
 * library on a mismatch).
 */
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "engine_kernels.h"

int engine_kernels_abi_version(void) { return ENGINE_KERNELS_ABI_VERSION; }

int64_t engine_kernels_struct_size(const char *name)
{
    if (strcmp(name, "DecodeLayer") == 0) return (int64_t)sizeof(DecodeLayer);
    if (strcmp(name, "DecodeShape") == 0) return (int64_t)sizeof(DecodeShape);
    if (strcmp(name, "DecodeScratch") == 0) return (int64_t)sizeof(DecodeScratch);
    return -1;
}

/* Every field of every struct in engine_kernels.h, in declaration order (offsetof fails to compile on a name the
 * struct lacks). */
#define FIELD(type, field) {#type, #field, offsetof(type, field)},
static const struct {
    const char *type, *field;
    size_t offset;
} FIELDS[] = {
    FIELD(DecodeLayer, input_norm) FIELD(DecodeLayer, post_norm) FIELD(DecodeLayer, qkv) FIELD(DecodeLayer, o_proj)
    FIELD(DecodeLayer, gate_up) FIELD(DecodeLayer, down) FIELD(DecodeLayer, qkv_bias) FIELD(DecodeLayer, o_bias)
    FIELD(DecodeLayer, gate_up_bias) FIELD(DecodeLayer, down_bias) FIELD(DecodeLayer, key_cache)
    FIELD(DecodeLayer, value_cache) FIELD(DecodeLayer, window) FIELD(DecodeLayer, scale)
    FIELD(DecodeShape, rows) FIELD(DecodeShape, hidden) FIELD(DecodeShape, q_size) FIELD(DecodeShape, kv_size)
    FIELD(DecodeShape, inter) FIELD(DecodeShape, num_heads) FIELD(DecodeShape, num_kv_heads)
    FIELD(DecodeShape, head_dim) FIELD(DecodeShape, io_dtype) FIELD(DecodeShape, norm_dtype) FIELD(DecodeShape, eps)
    FIELD(DecodeShape, norm_offset)
    FIELD(DecodeScratch, normed) FIELD(DecodeScratch, qkv) FIELD(DecodeScratch, query) FIELD(DecodeScratch, attn)
    FIELD(DecodeScratch, proj) FIELD(DecodeScratch, mid) FIELD(DecodeScratch, gate_up) FIELD(DecodeScratch, act)
    FIELD(DecodeScratch, staging)
};
#undef FIELD

int64_t engine_kernels_field(const char *type, int64_t index, const char **name)
{
    int64_t seen = 0;
    for (size_t i = 0; i < sizeof(FIELDS) / sizeof(FIELDS[0]); ++i) {
        if (strcmp(FIELDS[i].type, type) != 0) continue;
        if (seen++ == index) {
            *name = FIELDS[i].field;
            return (int64_t)FIELDS[i].offset;
        }
    }
    return -1;
}

int64_t engine_kernels_limit(const char *name)
{
    if (strcmp(name, "MAX_DIM") == 0) return ENGINE_KERNELS_MAX_DIM;
    if (strcmp(name, "MAX_HEAD_DIM") == 0) return ENGINE_KERNELS_MAX_HEAD_DIM;
    if (strcmp(name, "MAX_GROUP") == 0) return ENGINE_KERNELS_MAX_GROUP;
    return -1;
}
