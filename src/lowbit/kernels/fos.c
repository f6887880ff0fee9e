/* NVFP4 with "4 over 6" (lowbit.quant._four_over_six) in one pass over each block of rows.
 *
 * Per group of B elements (a 1xB tile, or a BxB block: brows = B rows of the same columns) two candidates are
 * rounded: the group absmax mapped to 6 (the scale rule on amax) and to 4 (the rule on amax * 1.5), both with
 * NVFP4's E4M3 block scales capped at 256 (p->block_max); each candidate's squared error is summed in the
 * eager code's order (a pairwise tree over the B elements, then, for blocks, over the brows rows: quant._tree_sum)
 * and the smaller error wins, ties keeping "to 6". Stochastic rounding draws one key per candidate (keys[0],
 * keys[1]), the element's rng index being its flat position in the tensor, as two rng.uniform calls over the
 * whole tensor. B and brows: powers of two, B <= 64. Same fp32 operations as the eager code, in its order.
 */
#include "common.h"

void lb_group_scales(const uint32_t *am, int64_t n, const lb_params *p, float *sg, float *eg);

static float round1(float v, const lb_params *p, uint32_t idx, uint32_t key) {
    float E = u2f(f2u(v) & 0x7F800000u);
    E = E < p->min_normal ? p->min_normal : E;
    if (p->stochastic) {
        float step = E * ldexpf(1.0f, -p->mbits);
        float u = (float)((hash32(idx, key) >> 8) & 0xFFFFFFu) * 5.9604644775390625e-08f;
        return floorf(v / step + u) * step;
    }
    float c = E * (1.5f * ldexpf(1.0f, 23 - p->mbits));
    return (v + c) - c;
}

static float tree_sum(float *d, int64_t n) { /* pairwise: (d0 + d1), (d2 + d3), ... then pairs of those */
    for (; n > 1; n /= 2)
        for (int64_t i = 0; i < n / 2; i++) d[i] = d[2 * i] + d[2 * i + 1];
    return d[0];
}

/* Rows r0 .. r0 + nr of x as [R, G, B]. work: xb [nr·G·B] the rows in fp32 (then the output), v [2][nr·G·B]
 * the rounded candidates, err [2][nr][G] their group errors, sg [2][G] their scales, eg [G] (unused encode
 * factors), am [2][G] the absmax bit patterns (of amax and amax · 1.5). */
static void fos_rowblock(const void *x, void *out, int64_t r0, int64_t nr, int64_t G, int64_t B,
                         const lb_params *p, float *scales, float *work) {
    int64_t per_row = G * B, n = nr * per_row;
    float *xb = work, *v = xb + n, *err = v + 2 * n, *sg = err + 2 * nr * G, *eg = sg + 2 * G, d[64];
    uint32_t *am = (uint32_t *)(eg + G);
    for (int64_t r = 0; r < nr; r++) load_f32(xb + r * per_row, x, (r0 + r) * per_row, per_row, p->in_dtype);
    for (int64_t g = 0; g < G; g++) {
        uint32_t m = 0;
        for (int64_t r = 0; r < nr; r++) {
            uint32_t b = absmax_bits(x, (r0 + r) * per_row + g * B, B, p->in_dtype);
            m = b > m ? b : m;
        }
        am[g] = m;
        am[G + g] = f2u(bits_value(m) * 1.5f); /* quant: amax * 1.5 in fp32 (NaN stays NaN) */
    }
    lb_group_scales(am, G, p, sg, eg);
    lb_group_scales(am + G, G, p, sg + G, eg);
    for (int m = 0; m < 2; m++) {
        uint32_t key = p->stochastic ? (uint32_t)p->keys[m] : 0u;
        for (int64_t r = 0; r < nr; r++)
            for (int64_t g = 0; g < G; g++) {
                float s = sg[m * G + g];
                for (int64_t k = 0; k < B; k++) {
                    int64_t i = r * per_row + g * B + k;
                    float q = xb[i] / s;
                    q = q < -p->fmax ? -p->fmax : (q > p->fmax ? p->fmax : q);
                    q = round1(q, p, (uint32_t)((r0 * per_row) + i), key);
                    v[m * n + i] = q;
                    float t = q * s - xb[i];
                    d[k] = t * t;
                }
                err[(m * nr + r) * G + g] = tree_sum(d, B);
            }
    }
    for (int64_t g = 0; g < G; g++) {
        float e0, e1;
        if (nr == 1) {
            e0 = err[g]; e1 = err[G + g];
        } else {
            for (int64_t r = 0; r < nr; r++) d[r] = err[r * G + g];
            e0 = tree_sum(d, nr);
            for (int64_t r = 0; r < nr; r++) d[r] = err[(nr + r) * G + g];
            e1 = tree_sum(d, nr);
        }
        int pick = e1 < e0; /* NaN: "to 6" */
        float s = sg[pick * G + g];
        if (scales) scales[(r0 / nr) * G + g] = s;
        for (int64_t r = 0; r < nr; r++)
            for (int64_t k = 0; k < B; k++) {
                int64_t i = r * per_row + g * B + k;
                float q = v[pick * n + i];
                xb[i] = p->dequant ? q * s : q;
            }
    }
    int odt = p->dequant ? p->out_dtype : LB_F32;
    for (int64_t r = 0; r < nr; r++) store_f32(out, (r0 + r) * per_row, xb + r * per_row, per_row, odt);
}

/* x as [R, G, B], groups of B elements shared over brows rows (1: tiles; B: square blocks); scales: fp32
 * [R / brows, G]. Returns nonzero where a work buffer could not be allocated. */
int lb_quant_fos(const void *x, void *out, int64_t R, int64_t G, int64_t B, int64_t brows, const lb_params *p,
                 float *scales) {
    int64_t nblk = R / brows, n = brows * G * B;
    int failed = 0;
    #pragma omp parallel num_threads(p->nthreads) if (R * G * B > (1 << 16)) reduction(|:failed)
    {
        float *work = malloc((size_t)(3 * n + 2 * brows * G + 5 * G) * sizeof(float));
        failed |= work == NULL;
        #pragma omp for schedule(static)
        for (int64_t i = 0; i < nblk; i++)
            if (work) fos_rowblock(x, out, i * brows, brows, G, B, p, scales, work);
        free(work);
    }
    return failed;
}
