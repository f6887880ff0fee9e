/* lowbit's CPU kernels: quantization along columns (a transposed view b.t() of a contiguous b quantized without
 * the transposed copy), bit for bit the row kernels of quant.c on the copy. */
#include "common.h"

void lb_group_scales(const uint32_t *am, int64_t n, const lb_params *p, float *sg, float *eg);
void lb_group_absmax(const void *x, int64_t off, int64_t stride, int64_t nr, int64_t G, int64_t B, int dt,
                     uint32_t *am);
void lb_quant_seg(const float *src, float *dst, const float *sa, const float *ea, float s0, float e0, int64_t n,
                  int use_e, const lb_params *p, uint32_t key, uint32_t idx0, uint32_t istr, int grp);

/* --- along columns: the transposed variants ------------------------------------------------- */

/* Columns [n0, n1) of rows [m0, m0 + L) of x [M, N]: groups run down the columns (L rows each, `bw` columns
 * wide for blocks). The same numbers as quantizing the rows of the transposed copy xᵀ [N, M] (its rng
 * index of element (m, n) is (n - chunk start)·M + m, its chunks are chunk_rows rows of xᵀ). */
static void quant_colpanel(const void *x, void *out, int64_t M, int64_t N, int64_t m0, int64_t L, int64_t bw,
                           int64_t n0, int64_t n1, const lb_params *p, float *scales, float *sg, float *eg,
                           uint32_t *am) {
    int64_t w = n1 - n0;
    float buf[SEG];
    int odt = p->dequant ? p->out_dtype : LB_F32, direct = p->in_dtype == LB_F32 && odt == LB_F32;
    lb_group_absmax(x, m0 * N + n0, N, L, w, 1, p->in_dtype, am); /* w one-column groups over L rows */
    for (int64_t j = 0; bw > 1 && j < w; j += bw) { /* a block's columns share one scale */
        uint32_t b = 0;
        for (int64_t t = j; t < j + bw; t++) b = am[t] > b ? am[t] : b;
        for (int64_t t = j; t < j + bw; t++) am[t] = b;
    }
    lb_group_scales(am, w, p, sg, eg);
    if (scales && bw == 1) /* (no division per column: it cost as much as the panel's quantization) */
        memcpy(scales + (m0 / L) * N + n0, sg, (size_t)w * sizeof(float));
    else if (scales)
        for (int64_t j = 0; j < w; j += bw) scales[(m0 / L) * (N / bw) + (n0 + j) / bw] = sg[j];
    for (int64_t m = m0; m < m0 + L; m++) {
        for (int64_t j0 = 0; j0 < w;) { /* segments that stay inside one rng chunk of xᵀ's rows */
            int64_t n = n0 + j0, c = n / p->chunk_rows, end = (c + 1) * p->chunk_rows - n0;
            int64_t len = w - j0 < SEG ? w - j0 : SEG;
            len = end - j0 < len ? end - j0 : len;
            uint32_t key = p->stochastic ? (uint32_t)p->keys[c] : 0u;
            uint32_t idx = (uint32_t)((n - c * p->chunk_rows) * M + m);
            const float *src = direct ? (const float *)x + m * N + n : buf;
            float *dst = direct ? (float *)out + m * N + n : buf;
            if (!direct) load_f32(buf, x, m * N + n, len, p->in_dtype);
            lb_quant_seg(src, dst, sg + j0, eg + j0, 0.0f, 0.0f, len, LB_USE_E(p), p, key, idx, (uint32_t)M, 0);
            if (!direct) store_f32(out, m * N + n, buf, len, odt);
            j0 += len;
        }
    }
}

/* x [M, N] quantized in groups of L consecutive rows down each column (L = M: one group per column,
 * "row" of xᵀ; L = b: "tile"; with bw = b: "block"). scales: fp32 [M / L, N / bw]. Threads split the
 * panels of L rows, or, with one panel, the columns (in multiples of bw). */
int lb_quant_cols(const void *x, void *out, int64_t M, int64_t N, int64_t L, int64_t bw, const lb_params *p,
                   float *scales) {
    int64_t npan = M / L, nt = p->nthreads > 0 ? p->nthreads : 1;
    int64_t ncol = npan >= nt ? 1 : nt, cw = ((N / ncol + bw - 1) / bw) * bw; /* column range per task */
    if (cw == 0) cw = N;
    int64_t ntask = npan * ((N + cw - 1) / cw);
    int failed = 0;
    #pragma omp parallel num_threads(p->nthreads) if (M * N > (1 << 16)) reduction(|:failed)
    {
        float *sg = malloc((size_t)cw * 2 * sizeof(float));
        uint32_t *am = malloc((size_t)cw * sizeof(uint32_t));
        failed |= sg == NULL || am == NULL;
        #pragma omp for schedule(static)
        for (int64_t t = 0; t < ntask; t++) {
            int64_t pan = t % npan, n0 = (t / npan) * cw, n1 = n0 + cw < N ? n0 + cw : N;
            if (sg && am) quant_colpanel(x, out, M, N, pan * L, L, bw, n0, n1, p, scales, sg, sg + cw, am);
        }
        free(sg);
        free(am);
    }
    return failed;
}

/* --- the transposed copy ------------------------------------------------------------------------ */

/* dst [C, R] contiguous = the transpose of src [R, C] (row stride lds), element bits copied exactly (esize 2: bf16,
 * fp16; 4: fp32): 16×16 tiles through registers (16-bit elements widened to 32-bit lanes and narrowed back), the
 * ragged edges element by element. torch's strided copy of a bf16 [512, 1536] takes ~10x a plain copy. */
void lb_transpose(const void *src, int32_t esize, int64_t R, int64_t C, int64_t lds, void *dst, int32_t nthreads) {
    #pragma omp parallel for num_threads(nthreads) schedule(static) if (R * C > (1 << 16))
    for (int64_t r0 = 0; r0 < R; r0 += 16) {
        int64_t rb = R - r0 < 16 ? R - r0 : 16, c0 = 0;
        for (; rb == 16 && c0 + 16 <= C; c0 += 16) {
            v16f t[16];
            #pragma GCC unroll 16
            for (int r = 0; r < 16; r++) {
                if (esize == 4) {
                    memcpy(&t[r], (const uint32_t *)src + (r0 + r) * lds + c0, sizeof t[r]);
                } else {
                    v16h16 h;
                    memcpy(&h, (const uint16_t *)src + (r0 + r) * lds + c0, sizeof h);
                    t[r] = (v16f)__builtin_convertvector(h, v16u);
                }
            }
            transpose16(t);
            #pragma GCC unroll 16
            for (int c = 0; c < 16; c++) {
                if (esize == 4) {
                    memcpy((uint32_t *)dst + (c0 + c) * R + r0, &t[c], sizeof t[c]);
                } else {
                    v16h16 h = __builtin_convertvector((v16u)t[c], v16h16);
                    memcpy((uint16_t *)dst + (c0 + c) * R + r0, &h, sizeof h);
                }
            }
        }
        for (int64_t r = 0; r < rb; r++)
            for (int64_t c = c0; c < C; c++) {
                if (esize == 4) ((uint32_t *)dst)[c * R + r0 + r] = ((const uint32_t *)src)[(r0 + r) * lds + c];
                else ((uint16_t *)dst)[c * R + r0 + r] = ((const uint16_t *)src)[(r0 + r) * lds + c];
            }
    }
}
