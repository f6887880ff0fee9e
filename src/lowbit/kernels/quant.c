/* lowbit's fused CPU quantizers: one pass per quantizer over the input.
 *
 * The specification is the eager code in lowbit/quant.py, lowbit/scales.py and lowbit/formats.py; every
 * operation here mirrors one there, in the same fp32 order, so the results are bit for bit the same
 * (tests/test_kernels.py). Built with -O3 -ffp-contract=off (no fused multiply-adds: the eager ops round
 * each product), -fno-trapping-math (lets floorf vectorise; no value changes), no -ffast-math (NaN and
 * the rounding trick need IEEE arithmetic). Loops are written
 * branch-free so the compiler vectorises them for the CPU it is built on; OpenMP splits rows.
 *
 * Elements: fp32, bf16 or fp16 (dtype codes 0, 1, 2), converted to fp32 exactly before any arithmetic.
 * Rounding of an fp32 value v onto the format's grid (formats.round_to_grid_):
 *   E = 2^max(floor(log2|v|), emin)   (v's exponent bits, clamped below at the smallest normal)
 *   nearest:    (v + 1.5*2^(23-mbits)*E) - 1.5*2^(23-mbits)*E   (the FPU's ties-to-even does the work)
 *   stochastic: floor(v / step + u) * step, step = E * 2^-mbits, u = the counter hash of lowbit/rng.py.
 */
#include "common.h"

/* lb_params: common.h */

float lb_absmax(const void *x, int64_t n, int32_t dt, int32_t nthreads) {
    uint32_t m = 0;
    int64_t step = 1 << 16;
    #pragma omp parallel for num_threads(nthreads) reduction(max:m) schedule(static) if (n > (1 << 18))
    for (int64_t i = 0; i < n; i += step) {
        uint32_t b = absmax_bits(x, i, n - i < step ? n - i : step, dt);
        m = b > m ? b : m;
    }
    return bits_value(m);
}

/* --- the element pass: v = x / s (or x * e), round, [* s] -------------------------------------- */

/* One element: x scaled by s (USE_E: multiplied by e), saturated, rounded, inf kept (e5m2), dequantized; idx its
 * rng index. The flags are compile-time constants at every call (see quant_seg), so each combination compiles to
 * its own branch-free loop that the compiler vectorises. */
static inline __attribute__((always_inline)) float elem(
        float x, float s, float e, float fmax, float mn, float k, float sub, uint32_t key, uint32_t idx,
        const int USE_E, const int SAT, const int INF, const int DQ, const int SR) {
    float v = USE_E ? x * e : x / s;
    if (SAT) v = v < -fmax ? -fmax : (v > fmax ? fmax : v);
    float E = u2f(f2u(v) & 0x7F800000u);
    E = E < mn ? mn : E;
    if (SR) {
        float step = E * sub;
        float u = (float)((hash32(idx, key) >> 8) & 0xFFFFFFu) * 5.9604644775390625e-08f;
        v = floorf(v / step + u) * step;
    } else {
        float c = E * k;
        v = (v + c) - c;
    }
    if (INF && SAT) v = (f2u(x) & 0x7FFFFFFFu) == 0x7F800000u ? x : v;
    return DQ ? v * s : v;
}

/* dst[0..n) = elem(src[i]) with one scale s0 (e0) (ARR = 0), per-element scales sa[i] (ea[i]) (ARR = 1), or one
 * broadcast scale per whole group, sa[g] (ea[g]), of ARR = 16 or 32 elements or (ARR = 2) of gl elements; fp32,
 * dst may be src. idx0: the rng index of src[0] within its chunk, istr: the index step between elements. */
static inline __attribute__((always_inline)) void seg_impl(
        const float *src, float *dst, const float *restrict sa, const float *restrict ea, float s0, float e0,
        int64_t n, float fmax, float mn, float k, float sub, uint32_t key, uint32_t idx0, uint32_t istr,
        int64_t gl, const int ARR, const int USE_E, const int SAT, const int INF, const int DQ, const int SR) {
    if (ARR == 16 || ARR == 32 || ARR == 2) { /* whole groups; 16 and 32 stay compile-time lengths */
        const int64_t L = ARR == 2 ? gl : ARR;
        for (int64_t g = 0; g < n / L; g++) {
            float s = sa[g], e = USE_E ? ea[g] : 1.0f;
            uint32_t i0 = idx0 + (uint32_t)(g * L) * istr;
            for (int64_t j = 0; j < L; j++)
                dst[g * L + j] = elem(src[g * L + j], s, e, fmax, mn, k, sub, key, i0 + (uint32_t)j * istr, USE_E,
                                      SAT, INF, DQ, SR);
        }
        return;
    }
    for (int64_t i = 0; i < n; i++)
        dst[i] = elem(src[i], ARR ? sa[i] : s0, USE_E ? (ARR ? ea[i] : e0) : 1.0f, fmax, mn, k, sub, key,
                      idx0 + (uint32_t)i * istr, USE_E, SAT, INF, DQ, SR);
}

#define SEG_SR(A, UE, SAT, INF, DQ) \
    (p->stochastic ? seg_impl(src, dst, sa, ea, s0, e0, n, fmax, mn, k, sub, key, idx0, istr, grp, A, UE, SAT, INF, DQ, 1) \
                   : seg_impl(src, dst, sa, ea, s0, e0, n, fmax, mn, k, sub, key, idx0, istr, grp, A, UE, SAT, INF, DQ, 0))
#define SEG_DQ(A, UE, SAT, INF) (p->dequant ? SEG_SR(A, UE, SAT, INF, 1) : SEG_SR(A, UE, SAT, INF, 0))
#define SEG_INF(A, UE, SAT) (p->has_inf ? SEG_DQ(A, UE, SAT, 1) : SEG_DQ(A, UE, SAT, 0))
#define SEG_SAT(A, UE) (p->saturate ? SEG_INF(A, UE, 1) : SEG_INF(A, UE, 0))

/* sa == NULL: one scale s0 (e0) for all n elements; grp = 0: per-element scales sa (ea); grp = 16, 32 or a
 * multiple of 16 from 64: one scale per group of grp elements (n a multiple of grp). */
static void quant_seg(const float *src, float *dst, const float *sa, const float *ea, float s0, float e0,
                      int64_t n, int use_e, const lb_params *p, uint32_t key, uint32_t idx0, uint32_t istr, int grp) {
    const float k = 1.5f * pow2i(23 - p->mbits), sub = pow2i(-p->mbits);
    const float fmax = p->fmax, mn = p->min_normal;
    if (sa == NULL) {
        if (use_e) SEG_SAT(0, 1); else SEG_SAT(0, 0);
    } else if (grp == 16) {
        if (use_e) SEG_SAT(16, 1); else SEG_SAT(16, 0);
    } else if (grp == 32) {
        if (use_e) SEG_SAT(32, 1); else SEG_SAT(32, 0);
    } else if (grp) {
        if (use_e) SEG_SAT(2, 1); else SEG_SAT(2, 0);
    } else {
        if (use_e) SEG_SAT(1, 1); else SEG_SAT(1, 0);
    }
}

/* out[off .. off+n) = the quantized x[off .. off+n), element i scaled by sg[(off + i) / B] (eg likewise;
 * sg, eg: per-group scales with group 0 at element 0). fp32 in and out go straight from x to out; other
 * dtypes through an L1 staging buffer. Runs inside one group use the scalar loop. */
static void quant_span(const void *x, void *out, int64_t off, int64_t n, const float *sg, const float *eg,
                       int64_t B, int use_e, const lb_params *p, uint32_t key, uint32_t idx0) {
    float buf[SEG], sa[SEG], ea[SEG];
    int odt = p->dequant ? p->out_dtype : LB_F32, direct = p->in_dtype == LB_F32 && odt == LB_F32;
    for (int64_t i0 = 0; i0 < n; i0 += SEG) {
        int64_t m = n - i0 < SEG ? n - i0 : SEG, g0 = i0 / B;
        int one = (i0 + m - 1) / B == g0; /* the whole segment lies in group g0 */
        int grp = !one && i0 % B == 0 && m % B == 0 && (B == 16 || B == 32 || (B >= 64 && B % 16 == 0))
                  ? (int)B : 0; /* whole groups */
        if (!one && !grp) {
            for (int64_t i = 0; i < m;) { /* expand the group scales over this segment */
                int64_t g = (i0 + i) / B, end = (g + 1) * B - i0;
                end = end < m ? end : m;
                for (; i < end; i++) { sa[i] = sg[g]; ea[i] = eg[g]; }
            }
        }
        const float *src = direct ? (const float *)x + off + i0 : buf;
        float *dst = direct ? (float *)out + off + i0 : buf;
        if (!direct) load_f32(buf, x, off + i0, m, p->in_dtype);
        quant_seg(src, dst, one ? NULL : (grp ? sg + g0 : sa), grp ? eg + g0 : ea, sg[g0], eg[g0], m, use_e, p, key,
                  idx0 + (uint32_t)i0, 1u, grp);
        if (!direct) store_f32(out, off + i0, buf, m, odt);
    }
}

/* One scale for the whole tensor (granularity "tensor", delayed scaling): scales come from Python. */
void lb_quant_scalar(const void *x, void *out, int64_t n, float s, float e, int32_t use_e, const lb_params *p) {
    int64_t chunk = p->chunk_rows, step = 1 << 14;
    #pragma omp parallel for num_threads(p->nthreads) schedule(static) if (n > (1 << 16))
    for (int64_t i = 0; i < n; i += step) {
        int64_t m = n - i < step ? n - i : step;
        /* a run never straddles a chunk: chunk is a multiple of step or larger than n */
        int64_t c = i / chunk;
        uint32_t key = p->stochastic ? (uint32_t)p->keys[c] : 0u;
        quant_span(x, out, i, m, &s, &e, n, use_e, p, key, (uint32_t)(i - c * chunk));
    }
}

void lb_scale_one(float a, const lb_params *p, float *s, float *e);

/* Granularity "tensor" in one call (one ctypes call instead of three, and no Python float round trip): the absmax
 * of x (measure) or the given delayed amax a, the scale by lb_scale_one's rule, then the element pass; the decode
 * scale to *s_out. */
void lb_quant_tensor(const void *x, void *out, int64_t n, float a, int32_t measure, const lb_params *p,
                     float *s_out) {
    lb_params q = *p;
    q.tensor_amax = measure ? lb_absmax(x, n, p->in_dtype, p->nthreads) : a;
    float s, e;
    lb_scale_one(q.tensor_amax, &q, &s, &e);
    *s_out = s;
    lb_quant_scalar(x, out, n, s, e, LB_USE_E(p), p);
}

/* --- group scales (scales.scale_from_amax, one group at a time) ------------------------------- */

static inline float round_e4m3(float v) { /* formats.round_to_grid_(v, e4m3), saturating */
    v = v < -448.0f ? -448.0f : (v > 448.0f ? 448.0f : v);
    float E = u2f(f2u(v) & 0x7F800000u);
    E = E < 0.015625f ? 0.015625f : E;
    float c = E * 1572864.0f; /* 1.5 * 2^20 */
    return (v + c) - c;
}

/* 2^ceil(log2 r) as frexp gives it (scales._pow2, "ceil"), exponent clamped to [-127, 127]; r >= 0 finite.
 * r = 0 gives 2^0 (frexp(0) = (0, 0)); subnormal r: 2^-126 above 2^-127, else 2^-127. */
static inline float pow2_ceil(float r) {
    uint32_t b = f2u(r), ex = (b >> 23) & 0xFFu;
    int32_t k = (int32_t)ex - 127 + ((b & 0x7FFFFFu) != 0);
    k = ex ? k : (b == 0 ? 0 : (b > 0x00400000u ? -126 : -127));
    k = k < -127 ? -127 : (k > 127 ? 127 : k);
    return k == -127 ? u2f(0x00400000u) : u2f((uint32_t)(k + 127) << 23);
}

enum { R_FP32, R_FP32_RCP, R_E8M0_FLOOR, R_E8M0_CEIL, R_NVFP4, R_NVFP4_RCP };

typedef struct { float fmax, mult, st, g, ginv, c_emax; int tbad; } scale_consts;

static inline __attribute__((always_inline)) void scales_impl(
        const uint32_t *restrict am, int64_t n, scale_consts c, float *restrict sg, float *restrict eg,
        const int RULE, const int MULT) {
    const float tiny = 1.17549435e-38f /* 2^-126 */, e8min = 5.87747175e-39f /* 2^-127 */;
    for (int64_t i = 0; i < n; i++) {
        float a = bits_value(am[i]), s, e = 1.0f;
        if (RULE == R_FP32) {
            s = a / c.fmax;
            s = s < tiny ? tiny : s;
        } else if (RULE == R_FP32_RCP) {
            e = a == 0.0f ? 1.0f : (1.0f / a) * c.fmax; /* torch: fmax / t is t.reciprocal() * fmax */
            e = e > FP32_MAX ? FP32_MAX : e;
            s = 1.0f / e;
        } else if (RULE == R_E8M0_FLOOR || RULE == R_E8M0_CEIL) {
            if (RULE == R_E8M0_CEIL) {
                s = pow2_ceil(a / c.fmax);
            } else {
                s = u2f(f2u(a) & 0x7F800000u) * c.c_emax;
                s = s < e8min ? e8min : s;
            }
            e = 1.0f / s;
        } else if (RULE == R_NVFP4_RCP) { /* Transformer Engine's rule */
            float d = a / c.fmax * c.g;
            d = round_e4m3(d > 448.0f ? 448.0f : d);
            s = d * c.ginv;
            e = 1.0f / s;
            e = e > FP32_MAX ? FP32_MAX : e;
            s = c.tbad ? NAN : s;
        } else { /* NVFP4, divide */
            float d = round_e4m3(a / c.fmax / c.st);
            d = d < 0.001953125f ? 0.001953125f : d; /* E4M3's smallest subnormal, 2^-9 */
            s = c.tbad ? NAN : d * c.st;
        }
        if (MULT) {
            s = s * c.mult;
            e = e / c.mult;
            e = e > FP32_MAX ? FP32_MAX : e;
        }
        int zero = a == 0.0f, bad = !(a < INFINITY);
        sg[i] = bad ? NAN : (zero ? 1.0f : s);
        eg[i] = bad ? NAN : (zero ? 1.0f : e);
    }
}

#define SCALES(R) (p->has_mult ? scales_impl(am, n, c, sg, eg, R, 1) : scales_impl(am, n, c, sg, eg, R, 0))

/* Decode scales sg (and encode factors eg) of n groups from their absmax bit patterns am: scales.scale_from_amax
 * element by element, in its fp32 order. One branch-free loop per rule, so it vectorises across groups. */
static void group_scales(const uint32_t *am, int64_t n, const lb_params *p, float *sg, float *eg) {
    scale_consts c = {p->fmax, p->scale_mult, 0, 0, 0, pow2i(-p->emax), !(p->tensor_amax < INFINITY)};
    /* NVFP4's tensor-level factors (one per tensor), as scales._nvfp4 computes them */
    float t = p->tensor_amax, bm = p->fmax * p->block_max;
    c.st = t / bm;
    c.st = (t == 0.0f || c.st == 0.0f) ? 1.0f : c.st;
    c.g = (1.0f / t) * bm;
    c.g = c.g > FP32_MAX ? FP32_MAX : c.g;
    c.g = c.g == 0.0f ? 1.0f : c.g;
    c.ginv = 1.0f / c.g;
    if (p->scale_fmt == SCALE_FP32) { if (p->reciprocal) SCALES(R_FP32_RCP); else SCALES(R_FP32); }
    else if (p->scale_fmt == SCALE_E8M0) { if (p->ceil_round) SCALES(R_E8M0_CEIL); else SCALES(R_E8M0_FLOOR); }
    else if (p->reciprocal) SCALES(R_NVFP4_RCP);
    else SCALES(R_NVFP4);
}

/* group_scales for other translation units (fos.c). */
void lb_group_scales(const uint32_t *am, int64_t n, const lb_params *p, float *sg, float *eg) {
    group_scales(am, n, p, sg, eg);
}

/* scales.scale_from_amax for one scale (granularity "tensor": the current or delayed absmax a, inf or NaN
 * allowed): the group rule above with one group, NVFP4's tensor absmax being a itself (p->tensor_amax). */
void lb_scale_one(float a, const lb_params *p, float *s, float *e) {
    uint32_t am = f2u(a) & 0x7FFFFFFFu; /* |a|; NaN patterns sort above inf */
    group_scales(&am, 1, p, s, e);
}

/* am[g] = the absmax bit pattern of group g (B elements at x[off + g·B]) over rows off, off + stride, ...
 * (nr rows), for G groups; B = 16 and 32 get loops of constant length. */
static inline __attribute__((always_inline)) void amax_f32_fixed(const uint32_t *restrict r, int64_t G,
                                                                  uint32_t *restrict am, const int B) {
    for (int64_t g = 0; g < G; g++) {
        uint32_t m = am[g];
        for (int k = 0; k < B; k++) { uint32_t a = r[g * B + k] & 0x7FFFFFFFu; m = a > m ? a : m; }
        am[g] = m;
    }
}

static inline __attribute__((always_inline)) void amax_u16_fixed(const uint16_t *restrict r, int64_t G,
                                                                  uint32_t *restrict am, const int B) {
    for (int64_t g = 0; g < G; g++) {
        uint16_t m = (uint16_t)am[g];
        for (int k = 0; k < B; k++) { uint16_t a = r[g * B + k] & 0x7FFFu; m = a > m ? a : m; }
        am[g] = m;
    }
}

static void group_absmax(const void *x, int64_t off, int64_t stride, int64_t nr, int64_t G, int64_t B,
                         int dt, uint32_t *am) {
    for (int64_t g = 0; g < G; g++) am[g] = 0;
    if (B == 1 && dt == LB_F32) { /* one element per group per row: columns, vectorised across them */
        for (int64_t r = 0; r < nr; r++) {
            const uint32_t *row = (const uint32_t *)x + off + r * stride;
            for (int64_t g = 0; g < G; g++) { uint32_t a = row[g] & 0x7FFFFFFFu; am[g] = a > am[g] ? a : am[g]; }
        }
        return;
    }
    if (dt == LB_F32 || (B != 1 && B != 16 && B != 32)) {
        for (int64_t r = 0; r < nr; r++) {
            int64_t o = off + r * stride;
            if (dt == LB_F32 && B == 16) amax_f32_fixed((const uint32_t *)x + o, G, am, 16);
            else if (dt == LB_F32 && B == 32) amax_f32_fixed((const uint32_t *)x + o, G, am, 32);
            else for (int64_t g = 0; g < G; g++) {
                uint32_t b = absmax_bits(x, o + g * B, B, dt);
                am[g] = b > am[g] ? b : am[g];
            }
        }
        return;
    }
    /* bf16/fp16 with 1-, 16- or 32-element groups: reduce the 16-bit magnitude patterns, convert at the end */
    for (int64_t r = 0; r < nr; r++) {
        const uint16_t *row = (const uint16_t *)x + off + r * stride;
        if (B == 16) amax_u16_fixed(row, G, am, 16);
        else if (B == 32) amax_u16_fixed(row, G, am, 32);
        else amax_u16_fixed(row, G, am, 1);
    }
    for (int64_t g = 0; g < G; g++) {
        if (dt == LB_BF16) { am[g] <<= 16; continue; }
        uint16_t h16 = (uint16_t)am[g];
        _Float16 h; memcpy(&h, &h16, 2);
        am[g] = f2u((float)h);
    }
}

/* group_absmax for other translation units (fos.c). */
void lb_group_absmax(const void *x, int64_t off, int64_t stride, int64_t nr, int64_t G, int64_t B, int dt,
                     uint32_t *am) {
    group_absmax(x, off, stride, nr, G, B, dt, am);
}

/* out[r, g] = max |x[r, g, :]| (fp32; NaN where the group holds one) of contiguous x [R, G, B]: quant._group_absmax
 * in one read-only pass (a max does not depend on its order, so the same values). */
void lb_absmax_groups(const void *x, int64_t R, int64_t G, int64_t B, int32_t dt, float *out, int32_t nthreads) {
    #pragma omp parallel for num_threads(nthreads) schedule(static) if (R * G * B > (1 << 16))
    for (int64_t r = 0; r < R; r++) {
        uint32_t *am = (uint32_t *)(out + r * G); /* the bit patterns in place, then their values */
        group_absmax(x, r * G * B, G * B, 1, G, B, dt, am);
        for (int64_t g = 0; g < G; g++) out[r * G + g] = bits_value(am[g]);
    }
}

/* Rows r0..r0+nr of x as [R, G, B] sharing scales over the `nr` rows (1: row/tile; block: the block size).
 * sg, eg, am: scratch for G entries each. */
static void quant_rowblock(const void *x, void *out, int64_t r0, int64_t nr, int64_t G, int64_t B,
                           const lb_params *p, float *scales, float *sg, float *eg, uint32_t *am) {
    int64_t per_row = G * B;
    if (p->quest) {
        lb_quest_scales(x, r0 * per_row, G, B, p->in_dtype, p->quest_c, p, sg, eg);
    } else {
        group_absmax(x, r0 * per_row, per_row, nr, G, B, p->in_dtype, am);
        group_scales(am, G, p, sg, eg);
    }
    if (scales) memcpy(scales + (r0 / nr) * G, sg, (size_t)G * sizeof(float));
    for (int64_t r = r0; r < r0 + nr; r++) {
        int64_t c = r / p->chunk_rows;
        uint32_t key = p->stochastic ? (uint32_t)p->keys[c] : 0u;
        uint32_t idx = (uint32_t)((r - c * p->chunk_rows) * per_row);
        quant_span(x, out, r * per_row, per_row, sg, eg, B, LB_USE_E(p), p, key, idx);
    }
}

/* Groups along the last dim: x as [R, G, B], scales over `brows` rows (1, or the block size).
 * scales: fp32 [R / brows, G], the decode scales. */
int lb_quant_groups(const void *x, void *out, int64_t R, int64_t G, int64_t B, int64_t brows,
                    const lb_params *p, float *scales) {
    int64_t nblk = R / brows;
    int failed = 0;
    #pragma omp parallel num_threads(p->nthreads) if (R * G * B > (1 << 16)) reduction(|:failed)
    {
        float *sg = malloc((size_t)G * 3 * sizeof(float));
        failed |= sg == NULL;
        #pragma omp for schedule(static)
        for (int64_t i = 0; i < nblk; i++)
            if (sg) quant_rowblock(x, out, i * brows, brows, G, B, p, scales, sg, sg + G, (uint32_t *)(sg + 2 * G));
        free(sg);
    }
    return failed; /* nonzero: a work buffer could not be allocated, the output is incomplete */
}

/* quant_seg for other translation units (cols.c). */
void lb_quant_seg(const float *src, float *dst, const float *sa, const float *ea, float s0, float e0, int64_t n,
                  int use_e, const lb_params *p, uint32_t key, uint32_t idx0, uint32_t istr, int grp) {
    quant_seg(src, dst, sa, ea, s0, e0, n, use_e, p, key, idx0, istr, grp);
}
