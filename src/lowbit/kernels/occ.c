/* lowbit's CPU kernels: OCC per token and the products of its sparse residual. */
#include "common.h"

/* --- OCC per token (estimators.occ_clamp_rows): order statistics, clamp and residual in one pass ---- */

/* A total order on floats as unsigned keys: -0 and +0 equal, NaN (either sign) above +inf, as torch.sort and
 * torch.topk order them. */
static inline uint32_t sort_key(float f) {
    uint32_t u = f2u(f), a = u & 0x7FFFFFFFu;
    uint32_t k = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
    k = a == 0 ? 0x80000000u : k;
    return a > 0x7F800000u ? 0xFFFFFFFFu : k;
}

static inline float key_value(uint32_t k) {
    if (k == 0xFFFFFFFFu) return NAN;
    return u2f((k & 0x80000000u) ? (k & 0x7FFFFFFFu) : ~k);
}

/* The i-th smallest of a[0..n) (0-based), reordering a (Hoare quickselect, median of three: deterministic). */
static uint32_t select_kth(uint32_t *a, int64_t n, int64_t i) {
    int64_t lo = 0, hi = n - 1;
    while (hi > lo) {
        int64_t mid = lo + (hi - lo) / 2;
        uint32_t x = a[lo], y = a[mid], z = a[hi];
        uint32_t pv = x < y ? (y < z ? y : (x < z ? z : x)) : (x < z ? x : (y < z ? z : y));
        int64_t l = lo, r = hi;
        while (l <= r) {
            while (a[l] < pv) l++;
            while (a[r] > pv) r--;
            if (l <= r) { uint32_t t = a[l]; a[l] = a[r]; a[r] = t; l++; r--; }
        }
        if (i <= r) hi = r;
        else if (i >= l) lo = l;
        else return a[i];
    }
    return a[i];
}

/* The m-th smallest (largest: of the complements) key of a[0..n) in one pass keeping the m smallest in a
 * sorted buffer (m <= 64): most elements cost one comparison against the buffer's top. */
static uint32_t tail_kth(const uint32_t *a, int64_t n, int64_t m, int largest) {
    uint32_t buf[64];
    int64_t cnt = 0;
    uint32_t top = 0xFFFFFFFFu; /* the buffer's largest once full */
    for (int64_t j = 0; j < n; j++) {
        uint32_t k = largest ? ~a[j] : a[j];
        if (cnt == m && k >= top) continue;
        int64_t i = cnt < m ? cnt++ : m - 1; /* full: the largest drops out */
        while (i > 0 && buf[i - 1] > k) { buf[i] = buf[i - 1]; i--; }
        buf[i] = k;
        if (cnt == m) top = buf[m - 1];
    }
    return largest ? ~buf[m - 1] : buf[m - 1];
}

static inline float round_to(float f, int dt) { /* f rounded to dt (as store_f32 would) and back */
    if (dt == LB_BF16) return u2f((uint32_t)f32_to_bf16(f) << 16);
    if (dt == LB_F16) return (float)(_Float16)f;
    return f;
}

/* One row's lo, hi from its keys (keys reordered). */
static void row_bounds(uint32_t *keys, int64_t K, int64_t i_lo, int64_t i_hi, float *lo, float *hi) {
    int64_t m_lo = i_lo + 1, m_hi = K - i_hi;
    *lo = key_value(m_lo <= 64 ? tail_kth(keys, K, m_lo, 0) : select_kth(keys, K, i_lo));
    *hi = key_value(m_hi <= 64 ? tail_kth(keys, K, m_hi, 1) : select_kth(keys, K, i_hi));
}

/* x [M, K] (dtype dt, contiguous): per row lo = sorted[i_lo], hi = sorted[i_hi]; xc = min(max(x, lo), hi)
 * (NaN stays NaN), lo, hi [M] in dt; the residual x − xc rounded to dt goes to res [M, K] (dt) if res is given,
 * and its nonzeros (NaN included, ±0 not) to ELL rows if cnt is given: row m's in ascending column order at
 * vals/cols[m·cap ..] (fp32 / int64, zeros past the count), cnt[m] of them. Returns 1 if scratch failed, 2 if
 * some row has more than cap nonzeros (only rows with NaN or infinities can). */
int lb_occ_rows(const void *x, int32_t dt, int64_t M, int64_t K, int64_t i_lo, int64_t i_hi, void *xc, void *res,
                void *lo_out, void *hi_out, float *vals, int64_t *cols, int64_t *cnt, int64_t cap,
                int32_t nthreads) {
    int failed = 0;
    #pragma omp parallel num_threads(nthreads) if (M * K > (1 << 15)) reduction(|:failed)
    {
        uint32_t *keys = malloc((size_t)K * sizeof(uint32_t));
        float *row = malloc((size_t)K * sizeof(float));
        failed |= keys == NULL || row == NULL;
        #pragma omp for schedule(static)
        for (int64_t m = 0; m < M; m++) {
            if (!keys || !row) continue;
            load_f32(row, x, m * K, K, dt);
            for (int64_t j = 0; j < K; j++) keys[j] = sort_key(row[j]);
            float lo, hi;
            row_bounds(keys, K, i_lo, i_hi, &lo, &hi);
            /* torch.maximum/minimum: NaN in either operand wins; a NaN lo implies a NaN hi (NaN sorts last),
             * and a NaN hi makes every entry NaN */
            const int nanhi = isnan(hi);
            const float top = nanhi ? INFINITY : hi;
            float buf[SEG], rb[SEG];
            int64_t c = 0;
            for (int64_t j0 = 0; j0 < K; j0 += SEG) {
                int64_t n = K - j0 < SEG ? K - j0 : SEG;
                for (int64_t j = 0; j < n; j++) {
                    float v = row[j0 + j];
                    float cl = v < lo ? lo : v;
                    cl = cl > top ? top : cl;
                    cl = nanhi ? NAN : cl;
                    buf[j] = cl;
                    rb[j] = v - cl;
                }
                store_f32(xc, m * K + j0, buf, n, dt);
                if (res) store_f32(res, m * K + j0, rb, n, dt);
                for (int64_t j = 0; cnt && j < n; j++) { /* (vals is NULL when cap is 0) */
                    if (!(f2u(rb[j]) & 0x7FFFFFFFu)) continue;
                    if (c == cap) { failed |= 2; break; }
                    vals[m * cap + c] = round_to(rb[j], dt);
                    cols[m * cap + c++] = j0 + j;
                }
            }
            for (int64_t j = c; cnt && j < cap; j++) { vals[m * cap + j] = 0.0f; cols[m * cap + j] = 0; }
            if (cnt) cnt[m] = c;
            store_f32(lo_out, m, &lo, 1, dt);
            store_f32(hi_out, m, &hi, 1, dt);
        }
        free(keys);
        free(row);
    }
    return failed & 1 ? 1 : failed;
}

/* --- the residual's products (nn.residual.mm_reference / tmm_reference: the order they spell out) --- */

#define NB 64 /* output columns per block of lb_ell_mm: Wᵀ's block (K × NB fp32) stays in L2 */

/* wt[k, n] = w[n0 + n, k] (fp32 [K, nb], row stride NB) for n < nb <= NB: 16×16 tiles through a buffer, read
 * along rows of w and written as rows of wt. */
static void transpose_block(const void *w, int dt, int64_t n0, int64_t nb, int64_t K, float *wt) {
    float row[16], tile[16][16];
    for (int64_t r0 = 0; r0 < nb; r0 += 16) {
        int64_t rb = nb - r0 < 16 ? nb - r0 : 16;
        for (int64_t k0 = 0; k0 < K; k0 += 16) {
            int64_t kb = K - k0 < 16 ? K - k0 : 16;
            for (int64_t n = 0; n < rb; n++) {
                load_f32(row, w, (n0 + r0 + n) * K + k0, kb, dt);
                for (int64_t k = 0; k < kb; k++) tile[k][n] = row[k];
            }
            for (int64_t k = 0; k < kb; k++) memcpy(wt + (k0 + k) * NB + r0, tile[k], (size_t)rb * sizeof(float));
        }
    }
}

/* out [M, N] fp32 = ΔX·Wᵀ for ΔX [M, K] in ELL rows and w [N, K] (dtype wdt, contiguous): out[i, n] =
 * Σ_j vals[i, j]·w[n, cols[i, j]] for j < cnt[i] in order, from +0, each product rounded to fp32 before its
 * sum. Blocks of NB output columns: that block of Wᵀ is staged in fp32 so every term is a short contiguous row.
 * Returns nonzero if scratch failed. */
int lb_ell_mm(const float *vals, const int64_t *cols, const int64_t *cnt, int64_t M, int64_t cap, const void *w,
              int32_t wdt, int64_t N, int64_t K, float *out, int32_t nthreads) {
    int failed = 0;
    #pragma omp parallel num_threads(nthreads) if (M * N + K * N > (1 << 16)) reduction(|:failed)
    {
        float *wt = malloc((size_t)(K > 0 ? K : 1) * NB * sizeof(float));
        failed |= wt == NULL;
        #pragma omp for schedule(static)
        for (int64_t n0 = 0; n0 < N; n0 += NB) {
            if (!wt) continue;
            int64_t nb = N - n0 < NB ? N - n0 : NB;
            transpose_block(w, wdt, n0, nb, K, wt);
            for (int64_t i = 0; i < M; i++) {
                float acc[NB] = {0};
                for (int64_t j = 0; j < cnt[i]; j++) {
                    const float v = vals[i * cap + j], *r = wt + cols[i * cap + j] * NB;
                    for (int64_t n = 0; n < NB; n++) acc[n] += v * r[n];
                }
                memcpy(out + i * N + n0, acc, (size_t)nb * sizeof(float));
            }
        }
        free(wt);
    }
    return failed;
}

/* out [K, N] fp32 = ΔXᵀ·dy, the transpose of dW's compensation dyᵀ·ΔX, for dy [M, N] (dtype ddt, contiguous):
 * out[k, n] = Σ_i ΔX[i, k]·dy[i, n] over rows i in ascending order, from +0, each product rounded to fp32 before
 * its sum. Threads own column ranges of out, so the order never depends on their number. */
void lb_ell_tmm(const float *vals, const int64_t *cols, const int64_t *cnt, int64_t M, int64_t cap, const void *dy,
                int32_t ddt, int64_t N, int64_t K, float *out, int32_t nthreads) {
    #pragma omp parallel for num_threads(nthreads) schedule(static) if (M * N + K * N > (1 << 16))
    for (int64_t n0 = 0; n0 < N; n0 += 64) {
        int64_t nb = N - n0 < 64 ? N - n0 : 64;
        float d[64];
        for (int64_t k = 0; k < K; k++)
            for (int64_t n = 0; n < nb; n++) out[k * N + n0 + n] = 0.0f;
        for (int64_t i = 0; i < M; i++) {
            if (!cnt[i]) continue;
            load_f32(d, dy, i * N + n0, nb, ddt);
            for (int64_t j = 0; j < cnt[i]; j++) {
                const float v = vals[i * cap + j];
                float *o = out + cols[i * cap + j] * N + n0;
                for (int64_t n = 0; n < nb; n++) o[n] += v * d[n];
            }
        }
    }
}
