/* lowbit's CPU kernels: DGE's derivative applied to the weight gradient (estimators.dge_derivative), in two
 * passes around torch's own pow (which stays torch's, so the values are the eager ones bit for bit). */
#include "common.h"

/* t = |(a − q_lo)·(2/δ) − 1| for a = |ws|, δ = max(2^floor(log2 a), 2^emin)·2^-mbits, q_lo = floor(a/δ)·δ
 * (estimators._interval), element by element in memory order: t has ws's layout. */
void lb_dge_arg(const float *ws, int64_t n, float min_normal, float sub, float *t, int32_t nthreads) {
    #pragma omp parallel for num_threads(nthreads) schedule(static) if (n > (1 << 16))
    for (int64_t i = 0; i < n; i++) {
        float a = fabsf(ws[i]);
        float d = u2f(f2u(a) & 0x7F800000u);
        d = (d < min_normal ? min_normal : d) * sub;
        float q = floorf(a / d) * d;
        t[i] = fabsf((a - q) * ((1.0f / d) * 2.0f) - 1.0f);
    }
}

/* out[r, c] = dw[r, c] · min(tp[p] / k, clamp), 0 where |ws[p]| > fmax, p = r·s0 + c·s1 the position of (r, c)
 * in tp's and ws's layout (contiguous or transposed); dw [R, C] contiguous (dtype dt), out fp32 [R, C]. */
void lb_dge_finish(const float *tp, const float *ws, int64_t s0, int64_t s1, const void *dw, int32_t dt, int64_t R,
                   int64_t C, float k, float clamp, float fmax, float *out, int32_t nthreads) {
    #pragma omp parallel for num_threads(nthreads) schedule(static) if (R * C > (1 << 16))
    for (int64_t r = 0; r < R; r++) {
        for (int64_t c = 0; c < C; c++) {
            int64_t p = r * s0 + c * s1;
            float d = tp[p] / k;
            d = d > clamp ? clamp : d;
            d = fabsf(ws[p]) > fmax ? 0.0f : d;
            out[r * C + c] = load_any(dw, r * C + c, dt) * d;
        }
    }
}
