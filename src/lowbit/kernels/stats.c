/* lowbit's CPU kernels: the statistics of one quantization. */
#include "common.h"

/* --- statistics of one quantization (lowbit.nn.stats.operand_stats, in one pass) --------------- */


/* Rows 0, k, 2k, ... of t and tq [R, C] (element (r, c) at r·s0 + c·s1 of each), with decode scales
 * scales[r·ss + c / B] (ss = 0: one scale): out[0..7] = elements, inf/NaN count, amax (NaN if any NaN),
 * nonzero count, underflow count (t != 0, tq == 0), Σt², Σ(tq − t)², count of |t / s| > thr. Sums in double:
 * statistics, not training numbers, so only their summation order differs from the eager code's. */
void lb_operand_stats(const void *t, int32_t tdt, int64_t ts0, int64_t ts1, const void *tq, int32_t qdt,
                      int64_t qs0, int64_t qs1, int64_t R, int64_t C, int64_t k, const float *scales, int64_t ss,
                      int64_t B, float thr, int32_t nthreads, double *out) {
    double n = 0, nonfin = 0, nz = 0, under = 0, t2 = 0, e2 = 0, sat = 0;
    uint32_t am = 0;
    #pragma omp parallel for num_threads(nthreads) schedule(static) if (R * C > (1 << 16)) \
        reduction(+:n, nonfin, nz, under, t2, e2, sat) reduction(max:am)
    for (int64_t r = 0; r < R; r += k) {
        double rt2 = 0, re2 = 0;
        int64_t rnf = 0, rnz = 0, run = 0, rsat = 0;
        uint32_t ram = 0;
        for (int64_t c = 0; c < C; c++) {
            float x = load_any(t, r * ts0 + c * ts1, tdt), y = load_any(tq, r * qs0 + c * qs1, qdt);
            float s = scales[r * ss + c / B];
            uint32_t a = f2u(x) & 0x7FFFFFFFu;
            ram = a > ram ? a : ram;
            rnf += a >= 0x7F800000u;
            rnz += x != 0.0f;
            run += x != 0.0f && y == 0.0f;
            rt2 += (double)x * x;
            re2 += ((double)y - x) * ((double)y - x);
            rsat += fabsf(x / s) > thr;
        }
        n += C; nonfin += rnf; nz += rnz; under += run; t2 += rt2; e2 += re2; sat += rsat;
        am = ram > am ? ram : am;
    }
    out[0] = n; out[1] = nonfin; out[2] = bits_value(am); out[3] = nz; out[4] = under; out[5] = t2; out[6] = e2;
    out[7] = sat;
}
