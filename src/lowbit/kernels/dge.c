/* lowbit's CPU kernels: DGE's derivative applied to the weight gradient (estimators.dge_apply) in one pass, its
 * power by lowbit.powers' fixed fp32 operations (so the values are the eager ones bit for bit). */
#include "common.h"

/* lowbit.powers.power: t^e by fixed fp32 operations; poly = LOG2_POLY (5) then EXP2_POLY (8), Horner order. */
static inline float power(float t, float e, const float *poly, float zero_pow) {
    uint32_t b = f2u(t);
    float E = (float)((int32_t)(b >> 23) - 127);
    float m = u2f((b & 0x7FFFFFu) | 0x3F800000u);
    int big = m > 1.41421354f;
    m = big ? m * 0.5f : m;
    E = big ? E + 1.0f : E;
    float s = (m - 1.0f) / (m + 1.0f), z = s * s;
    float p = poly[0];
    for (int i = 1; i < 5; i++) p = p * z + poly[i];
    float y = (s * p + E) * e;
    y = y < -126.0f ? -126.0f : y;
    y = y > 127.0f ? 127.0f : y;
    y = y != y ? 0.0f : y; /* NaN t: any finite y (the result is NaN below) */
    float n = rintf(y), f = y - n;
    float q = poly[5];
    for (int i = 6; i < 13; i++) q = q * f + poly[i];
    float r = q * u2f((uint32_t)((int32_t)n + 127) << 23);
    r = t < 0x1p-126f ? zero_pow : r;
    return t != t ? NAN : r;
}

/* DGE's distance for one scaled weight: t = |(a − q_lo)·(2/δ) − 1| for a = |ws|, δ = max(2^floor(log2 a),
 * min_normal)·sub, q_lo = floor(a/δ)·δ (estimators._interval and dge_derivative). */
static inline float dist(float ws, float min_normal, float sub) {
    float a = fabsf(ws);
    float d = u2f(f2u(a) & 0x7F800000u);
    d = (d < min_normal ? min_normal : d) * sub;
    /* 1/d from the bits (d is a power of two): exact, so a·inv is the eager a / δ, for every a ≤ fmax (the
     * only ones whose factor is kept; for a = inf or NaN the factor is 0 or NaN either way) */
    float inv = u2f(0x7F000000u - f2u(d));
    float q = floorf(a * inv) * d;
    return fabsf((a - q) * (inv * 2.0f) - 1.0f);
}

/* The factor min(power(t, e) / k, clamp), 0 where |ws| > fmax, in three loops over a segment (distances, powers,
 * products): the power's long dependency chains in a loop of their own overlap across iterations (~15% faster
 * than one fused loop on an EPYC); the same operations, so the same bits. */
static void factors(const float *w, const float *g, int64_t n, float min_normal, float sub, float e, float k,
                    float clamp, float fmax, const float *poly, float zero_pow, float *out) {
    float t[SEG];
    for (int64_t c = 0; c < n; c++) t[c] = dist(w[c], min_normal, sub);
    #pragma GCC unroll 4
    for (int64_t c = 0; c < n; c++) t[c] = power(t[c], e, poly, zero_pow);
    for (int64_t c = 0; c < n; c++) {
        float v = t[c] / k;
        v = v > clamp ? clamp : v;
        out[c] = g[c] * (fabsf(w[c]) > fmax ? 0.0f : v);
    }
}

/* out[r, c] = (dw[r, c] + add[r, c]) · factor(ws(r, c)) for dw [R, C] contiguous (dtype dt), add fp32 [R, C]
 * contiguous or NULL (then nothing is added, not even +0: −0 stays −0), out fp32 [R, C]. The scaled weight
 * ws(r, c) is src[r·s0 + c·s1] (fp32, contiguous or transposed) when scales is NULL, else src[r, c] (dtype sdt,
 * contiguous) divided by its row's scale (scales[r], or scales[0] for all rows when rs == 1), or multiplied by it
 * when recip (the rule's encode factor): what quant.scaled_values computes. */
void lb_dge_apply(const void *src, int32_t sdt, int64_t s0, int64_t s1, const float *scales, int64_t rs,
                  int32_t recip, const float *add, const void *dw, int32_t dt, int64_t R, int64_t C,
                  float min_normal, float sub, float e, float k, float clamp, float fmax, const float *poly,
                  float zero_pow, float *out, int32_t nthreads) {
    #pragma omp parallel for num_threads(nthreads) schedule(static) if (R * C > (1 << 16))
    for (int64_t r = 0; r < R; r++) {
        float g[SEG], w[SEG];
        const float sc = scales ? scales[rs > 1 ? r : 0] : 1.0f;
        for (int64_t c0 = 0; c0 < C; c0 += SEG) {
            int64_t n = C - c0 < SEG ? C - c0 : SEG;
            load_f32(g, dw, r * C + c0, n, dt);
            if (add)
                for (int64_t c = 0; c < n; c++) g[c] += add[r * C + c0 + c];
            if (scales) {
                load_f32(w, src, r * C + c0, n, sdt);
                if (recip)
                    for (int64_t c = 0; c < n; c++) w[c] *= sc;
                else
                    for (int64_t c = 0; c < n; c++) w[c] /= sc;
            } else if (s1 == 1) {
                memcpy(w, (const float *)src + r * s0 + c0, (size_t)n * sizeof(float));
            } else {
                for (int64_t c = 0; c < n; c++) w[c] = ((const float *)src)[r * s0 + (c0 + c) * s1];
            }
            factors(w, g, n, min_normal, sub, e, k, clamp, fmax, poly, zero_pow, out + r * C + c0);
        }
    }
}
