/*
 * y = x W^T (+ b) for a few to a few dozen rows of bf16 activations on CPUs with AVX512-BF16.
 *
 * W is packed once into groups of 48 output columns: packed[N/48][K/2][48][2], so one 64-byte load holds a
 * (k, k+1) pair for 16 columns, the operand layout of VDPBF16PS, and a group is one contiguous stream (three
 * separate 16-column streams measured ~25% slower at 1-4 rows, where the call is bandwidth-bound). Each step
 * of the inner loop broadcasts a (k, k+1) pair of one activation row and multiply-accumulates it into 16
 * float32 columns. A register tile is up to 8 rows x 48 columns (24 accumulators); a group streams from
 * memory once per 8 rows and stays in cache for the next 8. There is no software prefetch: the hardware
 * prefetchers follow the one stream better alone (measured: prefetching 8 pairs ahead into L1 made a
 * 16-row step's linears + LM head 28.3 ms instead of 24.6; prefetching the next group into L2, no gain).
 *
 * Layouts: x bf16 [M, K] contiguous (K even); y [M, N] float32 (out_dtype 0) or bf16 (1, rounded to nearest
 * even); bias float32 [N] or NULL. N is padded to a multiple of 48 in the packed weight only.
 * Returns 0, or -2 when this build has no AVX512-BF16 (the caller keeps its other GEMM).
 */
#include <stdint.h>
#include <string.h>
#if defined(__AVX512BF16__)
#include <immintrin.h>
#endif

#include "engine_kernels.h"

int gemm_bf16_available(void) {
#if defined(__AVX512BF16__)
    return 1;
#else
    return 0;
#endif
}

#if defined(__AVX512BF16__)
static inline void store_row(float *restrict yf, uint16_t *restrict yb, int out_dtype, const float *restrict bias,
                             int64_t n0, int64_t width, __m512 acc) {
    if (bias != NULL) {
        __mmask16 bias_mask = (__mmask16)((1u << width) - 1u);
        acc = _mm512_add_ps(acc, _mm512_maskz_loadu_ps(bias_mask, bias + n0));
    }
    __mmask16 mask = (__mmask16)(width >= 16 ? 0xffff : (1u << width) - 1u);
    if (out_dtype == 1)
        _mm256_mask_storeu_epi16(yb + n0, mask, (__m256i)_mm512_cvtneps_pbh(acc));
    else
        _mm512_mask_storeu_ps(yf + n0, mask, acc);
}

/* ROWS rows x 48 columns: rows m0.., column group `group`. */
static inline __attribute__((always_inline)) void tile(
    const int ROWS, const uint32_t *restrict x, int64_t pairs, const uint16_t *restrict packed,
    int64_t m0, int64_t group, int64_t n, void *y, int out_dtype, const float *restrict bias)
{
    __m512 acc[8][3];
    for (int r = 0; r < ROWS; ++r)
        for (int b = 0; b < 3; ++b) acc[r][b] = _mm512_setzero_ps();
    const uint16_t *stream = packed + group * pairs * 96;
    const uint32_t *rows = x + m0 * pairs;
    for (int64_t p = 0; p < pairs; ++p) {
        const uint16_t *at = stream + p * 96;
        __m512bh w[3];
        for (int b = 0; b < 3; ++b) w[b] = (__m512bh)_mm512_loadu_si512((const void *)(at + 32 * b));
        for (int r = 0; r < ROWS; ++r) {
            __m512bh a = (__m512bh)_mm512_set1_epi32((int)rows[r * pairs + p]);
            for (int b = 0; b < 3; ++b) acc[r][b] = _mm512_dpbf16_ps(acc[r][b], a, w[b]);
        }
    }
    for (int r = 0; r < ROWS; ++r) {
        float *yf = (float *)y + (m0 + r) * n;
        uint16_t *yb = (uint16_t *)y + (m0 + r) * n;
        for (int b = 0; b < 3; ++b) {
            const int64_t n0 = group * 48 + b * 16;
            const int64_t width = n - n0 < 16 ? n - n0 : 16;
            if (width > 0) store_row(yf, yb, out_dtype, bias, n0, width, acc[r][b]);
        }
    }
}

#define ROW_CASES                                                                     \
    switch (rows) {                                                                   \
    case 8: tile(8, x32, pairs, packed, m0, group, n, y, out_dtype, bias); break;     \
    case 7: tile(7, x32, pairs, packed, m0, group, n, y, out_dtype, bias); break;     \
    case 6: tile(6, x32, pairs, packed, m0, group, n, y, out_dtype, bias); break;     \
    case 5: tile(5, x32, pairs, packed, m0, group, n, y, out_dtype, bias); break;     \
    case 4: tile(4, x32, pairs, packed, m0, group, n, y, out_dtype, bias); break;     \
    case 3: tile(3, x32, pairs, packed, m0, group, n, y, out_dtype, bias); break;     \
    case 2: tile(2, x32, pairs, packed, m0, group, n, y, out_dtype, bias); break;     \
    default: tile(1, x32, pairs, packed, m0, group, n, y, out_dtype, bias); break;    \
    }
#endif

int gemm_bf16(const uint16_t *x, const uint16_t *packed, const float *bias, void *y, int out_dtype,
              int64_t m, int64_t n, int64_t k)
{
#if defined(__AVX512BF16__)
    if (k & 1) return -1;
    const int64_t pairs = k / 2, groups = (n + 47) / 48;
    const uint32_t *x32 = (const uint32_t *)x;
    for (int64_t group = 0; group < groups; ++group) {
        for (int64_t m0 = 0; m0 < m; m0 += 8) {
            const int64_t rows = m - m0 < 8 ? m - m0 : 8;
            ROW_CASES
        }
    }
    return 0;
#else
    (void)x; (void)packed; (void)bias; (void)y; (void)out_dtype; (void)m; (void)n; (void)k;
    return -2;
#endif
}
