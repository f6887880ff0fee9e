/* Shared pieces of lowbit's CPU kernels (every *.c here): dtype codes, exact dtype conversion, bit-pattern absmax,
 * the 16-lane pairwise sum. Everything here is static inline: each translation unit keeps its own copy. */
#ifndef LOWBIT_KERNELS_COMMON_H
#define LOWBIT_KERNELS_COMMON_H

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define LB_F32 0
#define LB_BF16 1
#define LB_F16 2
#define SCALE_FP32 0
#define SCALE_E8M0 1
#define SCALE_E4M3 2
#define FP32_MAX 3.4028234663852886e38f
#define SEG 512 /* elements per fp32 staging segment (stays in L1) */

/* What one quantizer call needs (mirrored by lowbit.kernels.cpu.Params: same field order and types). */
typedef struct {
    /* element format */
    int32_t mbits, has_inf, saturate, stochastic, dequant, emax;
    float fmax, min_normal;
    /* scale rule (grouped kernel only) */
    int32_t scale_fmt, reciprocal, ceil_round, has_mult;
    float scale_mult, tensor_amax, block_max;
    /* stochastic rounding: keys[c] for the c-th chunk of chunk_rows rows (rng.uniform's key per chunk) */
    const int32_t *keys;
    int64_t chunk_rows;
    int32_t nthreads, in_dtype, out_dtype, pad;
    /* QuEST's scales (quest.c) instead of the absmax rule: quest_c = QUEST_CLIP / fmax */
    int32_t quest;
    float quest_c;
} lb_params;

/* Whether the element pass multiplies by the encode factors e instead of dividing by the scales s: the rule
 * multiplies (reciprocal), or every scale is a power of two in [2^-127, 2^127] (E8M0, no multiplier; QuEST's too)
 * or NaN, whose e = 1/s is exact, so x * e and the specification's x / s are the same real number rounded once:
 * the same bits, without the division (a third of a bf16 element pass's time). */
#define LB_USE_E(p) ((p)->reciprocal || ((p)->scale_fmt == SCALE_E8M0 && !(p)->has_mult))

static inline uint32_t f2u(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
static inline float u2f(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }

/* 2^e for an exponent of a normal fp32 (−126 ≤ e ≤ 127), from the bits: ldexpf without the libm call (it ran
 * once per 512-element segment). */
static inline float pow2i(int e) { return u2f((uint32_t)(e + 127) << 23); }

static inline uint32_t hash32(uint32_t i, uint32_t key) { /* rng._hash_into */
    uint32_t h = (i * 0x9E3779B9u) ^ key;
    h ^= h >> 16; h *= 0x85EBCA6Bu;
    h ^= h >> 13; h *= 0xC2B2AE35u;
    h ^= h >> 16;
    return h;
}

/* --- dtype conversion -------------------------------------------------------------------------- */

static inline void load_f32(float *dst, const void *src, int64_t off, int64_t n, int dt) {
    if (dt == LB_F32) {
        memcpy(dst, (const float *)src + off, (size_t)n * 4);
    } else if (dt == LB_BF16) {
        const uint16_t *s = (const uint16_t *)src + off;
        for (int64_t i = 0; i < n; i++) dst[i] = u2f((uint32_t)s[i] << 16);
    } else {
        const _Float16 *s = (const _Float16 *)src + off;
        for (int64_t i = 0; i < n; i++) dst[i] = (float)s[i];
    }
}

static inline uint16_t f32_to_bf16(float f) { /* c10::BFloat16's round to nearest even; NaN -> 0x7FC0 */
    uint32_t u = f2u(f);
    uint32_t r = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    return (u & 0x7FFFFFFFu) > 0x7F800000u ? (uint16_t)0x7FC0 : (uint16_t)r;
}

static inline void store_f32(void *dst, int64_t off, const float *src, int64_t n, int dt) {
    if (dt == LB_F32) {
        memcpy((float *)dst + off, src, (size_t)n * 4);
    } else if (dt == LB_BF16) {
        uint16_t *d = (uint16_t *)dst + off;
        for (int64_t i = 0; i < n; i++) d[i] = f32_to_bf16(src[i]);
    } else {
        _Float16 *d = (_Float16 *)dst + off;
        for (int64_t i = 0; i < n; i++) d[i] = (_Float16)src[i];
    }
}

/* --- absmax: max of the magnitude bit patterns (NaN patterns sort above inf, so NaN propagates) -- */

static inline uint32_t absmax_bits(const void *x, int64_t off, int64_t n, int dt) {
    uint32_t m = 0;
    if (dt == LB_F32) {
        const uint32_t *s = (const uint32_t *)x + off;
        for (int64_t i = 0; i < n; i++) { uint32_t a = s[i] & 0x7FFFFFFFu; m = a > m ? a : m; }
    } else { /* bf16 and fp16: 16-bit patterns, converted after the reduction */
        const uint16_t *s = (const uint16_t *)x + off;
        uint16_t m16 = 0;
        for (int64_t i = 0; i < n; i++) { uint16_t a = s[i] & 0x7FFFu; m16 = a > m16 ? a : m16; }
        if (dt == LB_BF16) return (uint32_t)m16 << 16;
        _Float16 h; memcpy(&h, &m16, 2); return f2u((float)h);
    }
    return m;
}

static inline float bits_value(uint32_t b) { return b > 0x7F800000u ? NAN : u2f(b); }

static inline float load_any(const void *p, int64_t i, int dt) {
    if (dt == LB_F32) return ((const float *)p)[i];
    if (dt == LB_BF16) return u2f((uint32_t)((const uint16_t *)p)[i] << 16);
    return (float)((const _Float16 *)p)[i];
}

/* --- pairwise sums in vectors ----------------------------------------------------------------- */

typedef float v16f __attribute__((vector_size(64)));
typedef int32_t v16i __attribute__((vector_size(64)));
typedef uint32_t v16u __attribute__((vector_size(64)));
typedef uint16_t v16h16 __attribute__((vector_size(32)));
typedef _Float16 v16h __attribute__((vector_size(32)));

/* 16 consecutive elements at p[off] as fp32 (exact), one vector (rotate.c, occ.c). */
static inline v16f load16(const void *p, int64_t off, int dt) {
    v16f v;
    if (dt == LB_F32) {
        memcpy(&v, (const float *)p + off, sizeof v);
    } else if (dt == LB_BF16) {
        v16h16 h;
        memcpy(&h, (const uint16_t *)p + off, sizeof h);
        v = (v16f)(__builtin_convertvector(h, v16u) << 16);
    } else {
        v16h h;
        memcpy(&h, (const _Float16 *)p + off, sizeof h);
        v = __builtin_convertvector(h, v16f);
    }
    return v;
}

/* v stored at p[off] in dtype dt, rounded as store_f32 rounds (bf16: to nearest even, NaN -> 0x7FC0). */
static inline void store16(void *p, int64_t off, v16f v, int dt) {
    if (dt == LB_F32) {
        memcpy((float *)p + off, &v, sizeof v);
    } else if (dt == LB_BF16) {
        v16u u = (v16u)v;
        v16u r = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
        v16u nan = (v16u)((u & 0x7FFFFFFFu) > 0x7F800000u);
        v16h16 h = __builtin_convertvector((r & ~nan) | (0x7FC0u & nan), v16h16);
        memcpy((uint16_t *)p + off, &h, sizeof h);
    } else {
        v16h h = __builtin_convertvector(v, v16h);
        memcpy((_Float16 *)p + off, &h, sizeof h);
    }
}

/* v rounded to dtype dt and back (as store16 then load16 would give it). */
static inline v16f round16(v16f v, int dt) {
    if (dt == LB_BF16) {
        v16u u = (v16u)v;
        v16u r = ((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16) << 16;
        v16u nan = (v16u)((u & 0x7FFFFFFFu) > 0x7F800000u);
        return (v16f)((r & ~nan) | (0x7FC00000u & nan));
    }
    if (dt == LB_F16) return __builtin_convertvector(__builtin_convertvector(v, v16h), v16f);
    return v;
}

/* The 16×16 transpose of rows r[0..16) in registers: four stages, stage s swapping bit h = 2^s of the row index
 * with bit h of the lane index (lane c of row i pairs with lane c ^ h of row i ^ h). */
static const v16i T_LO[4] = {
    {0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30},
    {0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29},
    {0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27},
    {0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23}};
static const v16i T_HI[4] = {
    {1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31},
    {2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31},
    {4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31},
    {8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31}};

static inline void transpose16(v16f *r) {
    #pragma GCC unroll 4
    for (int st = 0; st < 4; st++) {
        const int h = 1 << st;
        #pragma GCC unroll 16
        for (int i = 0; i < 16; i++) {
            if (i & h) continue;
            v16f a = r[i], b = r[i + h];
            r[i] = __builtin_shuffle(a, b, T_LO[st]);
            r[i + h] = __builtin_shuffle(a, b, T_HI[st]);
        }
    }
}

/* The pairwise sum of a vector's 16 lanes: lane j adds lane j ^ h for h = 1, 2, 4, 8, so lane 0 ends with
 * ((v0 + v1) + (v2 + v3)) + ..., the tree groups.tree_sum builds (fp32 addition commutes exactly). GCC vector
 * extensions: permutes on AVX-512, pairs of them on AVX2. Used by quest.c (QuEST's std) and fos.c ("4 over 6"). */
static inline float tree16(v16f v) {
    const v16i i1 = {1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14};
    const v16i i2 = {2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13};
    const v16i i4 = {4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11};
    const v16i i8 = {8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7};
    v = v + __builtin_shuffle(v, i1);
    v = v + __builtin_shuffle(v, i2);
    v = v + __builtin_shuffle(v, i4);
    v = v + __builtin_shuffle(v, i8);
    return v[0];
}

void lb_quest_scales(const void *x, int64_t off, int64_t G, int64_t B, int32_t dt, float c, const lb_params *p,
                     float *sg, float *eg);

#endif
