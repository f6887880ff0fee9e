/* NVFP4 with "4 over 6" (lowbit.quant._four_over_six) in one pass over each block of rows.
 *
 * Per group of B elements (a 1xB tile, or a BxB block: brows = B rows of the same columns) two candidates are
 * rounded: the group absmax mapped to 6 (the scale rule on amax) and to 4 (the rule on amax * 1.5), both with
 * NVFP4's E4M3 block scales capped at 256 (p->block_max); each candidate's squared error is summed in the
 * eager code's order (a pairwise tree over the B elements, then, for blocks, over the brows rows: groups.tree_sum)
 * and the smaller error wins, ties keeping "to 6". Stochastic rounding draws one key per candidate (keys[0],
 * keys[1]), the element's rng index being its flat position in the tensor, as two rng.uniform calls over the
 * whole tensor. B and brows: powers of two, B <= 64. Same fp32 operations as the eager code, in its order.
 */
#include "common.h"

void lb_group_scales(const uint32_t *am, int64_t n, const lb_params *p, float *sg, float *eg);
void lb_group_absmax(const void *x, int64_t off, int64_t stride, int64_t nr, int64_t G, int64_t B, int dt,
                     uint32_t *am);

static float tree_sum(float *d, int64_t n) { /* pairwise: (d0 + d1), (d2 + d3), ... (n a power of two) */
    for (; n > 1; n /= 2)
        for (int64_t i = 0; i < n / 2; i++) d[i] = d[2 * i] + d[2 * i + 1];
    return d[0];
}

static void pair_level(const float *restrict src, float *restrict dst, int64_t m) {
    for (int64_t i = 0; i < m; i++) dst[i] = src[2 * i] + src[2 * i + 1];
}

/* One candidate on one row of n = G·B elements: v = round(x / sa) (saturated; sa: the group scales expanded
 * to elements), d = the squared errors, then d[0..G) = each group's sum by the pairwise tree, level by level
 * over the whole row (groups are contiguous runs of B, a power of two, so each level pairs within groups).
 * idx0: the rng index of x[0] in the tensor. SR is a compile-time constant at each call: one branch-free,
 * vectorised loop per variant. */
static inline __attribute__((always_inline)) void candidate_row(
        const float *restrict x, const float *restrict sa, float *restrict v, float *restrict d, int64_t n,
        int64_t G, const lb_params *p, uint32_t idx0, uint32_t key, const int SR) {
    const float fmax = p->fmax, mn = p->min_normal, sub = pow2i(-p->mbits);
    const float k = 1.5f * pow2i(23 - p->mbits);
    for (int64_t i = 0; i < n; i++) {
        float s = sa[i], q = x[i] / s;
        q = q < -fmax ? -fmax : (q > fmax ? fmax : q);
        float E = u2f(f2u(q) & 0x7F800000u);
        E = E < mn ? mn : E;
        if (SR) {
            float step = E * sub;
            float u = (float)((hash32(idx0 + (uint32_t)i, key) >> 8) & 0xFFFFFFu) * 5.9604644775390625e-08f;
            q = floorf(q / step + u) * step;
        } else {
            float c = E * k;
            q = (q + c) - c;
        }
        v[i] = q;
        float t = q * s - x[i];
        d[i] = t * t;
    }
    float *a = d, *b = d + n; /* the levels alternate between d's two halves (no in-place aliasing: vectorises) */
    for (int64_t m = n; m > G; m /= 2) {
        pair_level(a, b, m / 2);
        float *t = a; a = b; b = t;
    }
    if (a != d) memcpy(d, a, (size_t)G * sizeof(float));
}

/* Both candidates of 16 elements x (scales s[0], s[1]): the rounded values v[m][j] and squared errors d[m][j],
 * the operations of candidate_row in its order. idx0: the rng index of x[0]. */
static inline __attribute__((always_inline)) void cand16(
        const float *x, const float *s, float v[2][16], float d[2][16], const lb_params *p, uint32_t idx0,
        uint32_t key0, uint32_t key1, const int SR) {
    const float fmax = p->fmax, mn = p->min_normal, sub = pow2i(-p->mbits);
    const float k = 1.5f * pow2i(23 - p->mbits);
    for (int m = 0; m < 2; m++)
        for (int j = 0; j < 16; j++) {
            float q = x[j] / s[m];
            q = q < -fmax ? -fmax : (q > fmax ? fmax : q);
            float E = u2f(f2u(q) & 0x7F800000u);
            E = E < mn ? mn : E;
            if (SR) {
                float step = E * sub;
                uint32_t h = hash32(idx0 + (uint32_t)j, m ? key1 : key0);
                float u = (float)((h >> 8) & 0xFFFFFFu) * 5.9604644775390625e-08f;
                q = floorf(q / step + u) * step;
            } else {
                float c = E * k;
                q = (q + c) - c;
            }
            v[m][j] = q;
            float t = q * s[m] - x[j];
            d[m][j] = t * t;
        }
}

/* One row of 1x16 tiles, group by group with both candidates in registers (no per-element scale, error or pick
 * arrays over the row): the same operations as candidate_row and fos_rowblock, in their order. xr: the row in
 * fp32, o: its output (fp32, may be xr), sg: [2][G] the candidates' scales, sc: the row's chosen scales or NULL. */
static inline __attribute__((always_inline)) void fos_row16_impl(
        const float *xr, float *o, int64_t G, const float *sg, const lb_params *p, uint32_t idx0, float *sc,
        const int SR) {
    const uint32_t key0 = SR ? (uint32_t)p->keys[0] : 0u, key1 = SR ? (uint32_t)p->keys[1] : 0u;
    for (int64_t g = 0; g < G; g++) {
        float v[2][16], d[2][16], s[2] = {sg[g], sg[G + g]};
        cand16(xr + g * 16, s, v, d, p, idx0 + (uint32_t)(g * 16), key0, key1, SR);
        v16f e0, e1;
        memcpy(&e0, d[0], sizeof e0);
        memcpy(&e1, d[1], sizeof e1);
        int pick = tree16(e1) < tree16(e0); /* ties and NaN: "to 6"; the pairwise tree of common.h */
        if (sc) sc[g] = s[pick];
        for (int j = 0; j < 16; j++) o[g * 16 + j] = p->dequant ? v[pick][j] * s[pick] : v[pick][j];
    }
}

/* NVFP4's 16x16 blocks (NR = 16) block by block, both candidates kept per block only: each row's error by the
 * pairwise tree over its 16 elements, the block's by the same tree over its 16 rows (common.h's tree16,
 * groups.tree_sum's order). xb: the NR rows in fp32 (row stride n = G·16; overwritten by the output), sg: [2][G]
 * the candidates' scales, sc: the chosen scales (G of them) or NULL, idx0: the rng index of xb[0]. (1x16 tiles:
 * fos_row16_impl, whose single-row loop measured faster than this one with NR = 1.) */
static inline __attribute__((always_inline)) void fos16_impl(
        float *xb, int64_t G, const float *sg, const lb_params *p, uint32_t idx0, float *sc, const int NR,
        const int SR) {
    const uint32_t key0 = SR ? (uint32_t)p->keys[0] : 0u, key1 = SR ? (uint32_t)p->keys[1] : 0u;
    const int64_t n = G * 16;
    for (int64_t g = 0; g < G; g++) {
        float v[NR][2][16], d[2][16], er[2][16], s[2] = {sg[g], sg[G + g]};
        for (int r = 0; r < NR; r++) {
            cand16(xb + r * n + g * 16, s, v[r], d, p, idx0 + (uint32_t)(r * n + g * 16), key0, key1, SR);
            v16f e0, e1;
            memcpy(&e0, d[0], sizeof e0);
            memcpy(&e1, d[1], sizeof e1);
            er[0][r] = tree16(e0);
            er[1][r] = tree16(e1);
        }
        float E0 = er[0][0], E1 = er[1][0];
        if (NR == 16) {
            v16f b0, b1;
            memcpy(&b0, er[0], sizeof b0);
            memcpy(&b1, er[1], sizeof b1);
            E0 = tree16(b0);
            E1 = tree16(b1);
        }
        int pick = E1 < E0; /* ties and NaN: "to 6" */
        if (sc) sc[g] = s[pick];
        for (int r = 0; r < NR; r++)
            for (int j = 0; j < 16; j++)
                xb[r * n + g * 16 + j] = p->dequant ? v[r][pick][j] * s[pick] : v[r][pick][j];
    }
}

/* Rows r0 .. r0 + nr of x as [R, G, B] (nr = 1, or B for square blocks). work: xb [nr·G·B] the rows in fp32
 * (then the output), v [2][nr·G·B] the rounded candidates, sa [2][G·B] their scales per element, d [2][G·B],
 * err [2][nr][G] the group errors, sg [2][G] the scales, eg [G] (unused encode factors), pk [G·B] the pick per
 * element, am [2][G] the absmax bit patterns (of amax and amax · 1.5). */
static void fos_rowblock(const void *x, void *out, int64_t r0, int64_t nr, int64_t G, int64_t B,
                         const lb_params *p, float *scales, float *work) {
    int64_t per_row = G * B, n = nr * per_row;
    float *xb = work, *v = xb + n, *sa = v + 2 * n, *d = sa + 2 * per_row, *err = d + 2 * per_row;
    float *sg = err + 2 * nr * G, *eg = sg + 2 * G, tmp[64];
    int32_t *pk = (int32_t *)(eg + G);
    uint32_t *am = (uint32_t *)(pk + per_row);
    for (int64_t r = 0; r < nr; r++) load_f32(xb + r * per_row, x, (r0 + r) * per_row, per_row, p->in_dtype);
    lb_group_absmax(x, r0 * per_row, per_row, nr, G, B, p->in_dtype, am);
    for (int64_t g = 0; g < G; g++) am[G + g] = f2u(bits_value(am[g]) * 1.5f); /* quant: amax * 1.5 in fp32 */
    lb_group_scales(am, G, p, sg, eg);
    lb_group_scales(am + G, G, p, sg + G, eg);
    if (B == 16 && (nr == 1 || nr == 16)) { /* NVFP4's 1x16 tiles and 16x16 blocks: group by group */
        float *sc = scales ? scales + (r0 / nr) * G : NULL;
        uint32_t i0 = (uint32_t)(r0 * per_row);
        if (nr == 1 && p->stochastic) fos_row16_impl(xb, xb, G, sg, p, i0, sc, 1);
        else if (nr == 1) fos_row16_impl(xb, xb, G, sg, p, i0, sc, 0);
        else if (p->stochastic) fos16_impl(xb, G, sg, p, i0, sc, 16, 1);
        else fos16_impl(xb, G, sg, p, i0, sc, 16, 0);
        store_f32(out, r0 * per_row, xb, n, p->dequant ? p->out_dtype : LB_F32);
        return;
    }
    for (int64_t g = 0; g < 2 * G; g++)  /* sa[m·G·B + g·B + k] = sg[m·G + g] */
        for (int64_t k = 0; k < B; k++) sa[g * B + k] = sg[g];
    for (int m = 0; m < 2; m++) {
        uint32_t key = p->stochastic ? (uint32_t)p->keys[m] : 0u;
        for (int64_t r = 0; r < nr; r++) {
            const float *xr = xb + r * per_row;
            float *vr = v + m * n + r * per_row;
            uint32_t idx0 = (uint32_t)((r0 + r) * per_row);
            if (p->stochastic) candidate_row(xr, sa + m * per_row, vr, d, per_row, G, p, idx0, key, 1);
            else candidate_row(xr, sa + m * per_row, vr, d, per_row, G, p, idx0, key, 0);
            memcpy(err + (m * nr + r) * G, d, (size_t)G * sizeof(float));
        }
    }
    for (int64_t g = 0; g < G; g++) {
        float e0 = err[g], e1 = err[nr * G + g];
        if (nr > 1) { /* a square block: its rows' errors, pairwise too */
            for (int64_t r = 0; r < nr; r++) tmp[r] = err[r * G + g];
            e0 = tree_sum(tmp, nr);
            for (int64_t r = 0; r < nr; r++) tmp[r] = err[(nr + r) * G + g];
            e1 = tree_sum(tmp, nr);
        }
        int pick = e1 < e0; /* ties and NaN: "to 6" */
        if (scales) scales[(r0 / nr) * G + g] = sg[pick * G + g];
        for (int64_t k = 0; k < B; k++) pk[g * B + k] = pick;
    }
    for (int64_t r = 0; r < nr; r++) {
        float *o = xb + r * per_row;
        const float *v0 = v + r * per_row, *v1 = v + n + r * per_row;
        if (p->dequant)
            for (int64_t i = 0; i < per_row; i++) o[i] = pk[i] ? v1[i] * sa[per_row + i] : v0[i] * sa[i];
        else
            for (int64_t i = 0; i < per_row; i++) o[i] = pk[i] ? v1[i] : v0[i];
    }
    int odt = p->dequant ? p->out_dtype : LB_F32;
    for (int64_t r = 0; r < nr; r++) store_f32(out, (r0 + r) * per_row, xb + r * per_row, per_row, odt);
}

/* x as [R, G, B], groups of B elements shared over brows rows (1: tiles; B: square blocks); scales: fp32
 * [R / brows, G]. Returns nonzero where a work buffer could not be allocated. */
int lb_quant_fos(const void *x, void *out, int64_t R, int64_t G, int64_t B, int64_t brows, const lb_params *p,
                 float *scales) {
    int64_t nblk = R / brows, per_row = G * B, n = brows * per_row;
    int failed = 0;
    #pragma omp parallel num_threads(p->nthreads) if (R * G * B > (1 << 16)) reduction(|:failed)
    {
        float *work = malloc((size_t)(3 * n + 5 * per_row + 2 * brows * G + 5 * G) * sizeof(float));
        failed |= work == NULL;
        #pragma omp for schedule(static)
        for (int64_t i = 0; i < nblk; i++)
            if (work) fos_rowblock(x, out, i * brows, brows, G, B, p, scales, work);
        free(work);
    }
    return failed;
}
