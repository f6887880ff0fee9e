/* lowbit's CPU kernels: OCC per token and its sparse residual. */
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

/* x [M, K] (dtype dt, contiguous): per row lo = sorted[i_lo], hi = sorted[i_hi]; xc = min(max(x, lo), hi)
 * (NaN stays NaN), res = x − xc rounded to dt; lo, hi [M] in dt. Returns nonzero if scratch failed. */
int lb_occ_rows(const void *x, int32_t dt, int64_t M, int64_t K, int64_t i_lo, int64_t i_hi, void *xc, void *res,
                void *lo_out, void *hi_out, int32_t nthreads) {
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
            int64_t m_lo = i_lo + 1, m_hi = K - i_hi;
            uint32_t klo = m_lo <= 64 ? tail_kth(keys, K, m_lo, 0) : select_kth(keys, K, i_lo);
            uint32_t khi = m_hi <= 64 ? tail_kth(keys, K, m_hi, 1) : select_kth(keys, K, i_hi);
            float lo = key_value(klo), hi = key_value(khi);
            /* torch.maximum/minimum: NaN in either operand wins; a NaN lo implies a NaN hi (NaN sorts last),
             * and a NaN hi makes every entry NaN */
            const int nanhi = isnan(hi);
            const float top = nanhi ? INFINITY : hi;
            float buf[SEG], rb[SEG];
            for (int64_t j0 = 0; j0 < K; j0 += SEG) {
                int64_t n = K - j0 < SEG ? K - j0 : SEG;
                for (int64_t j = 0; j < n; j++) {
                    float v = row[j0 + j];
                    float c = v < lo ? lo : v;
                    c = c > top ? top : c;
                    c = nanhi ? NAN : c;
                    buf[j] = c;
                    rb[j] = v - c;
                }
                store_f32(xc, m * K + j0, buf, n, dt);
                store_f32(res, m * K + j0, rb, n, dt);
            }
            store_f32(lo_out, m, &lo, 1, dt);
            store_f32(hi_out, m, &hi, 1, dt);
        }
        free(keys);
        free(row);
    }
    return failed;
}

/* --- a dense matrix's nonzeros as CSR (OCC's sparse residual) ----------------------------------- */

/* crow[m + 1] = the nonzeros (NaN included, ±0 not) of rows 0..m of x [M, K]; returns their total. */
int64_t lb_csr_count(const void *x, int32_t dt, int64_t M, int64_t K, int64_t *crow, int32_t nthreads) {
    crow[0] = 0;
    #pragma omp parallel for num_threads(nthreads) schedule(static) if (M * K > (1 << 16))
    for (int64_t m = 0; m < M; m++) {
        int64_t c = 0;
        if (dt == LB_F32) {
            const uint32_t *r = (const uint32_t *)x + m * K;
            for (int64_t j = 0; j < K; j++) c += (r[j] & 0x7FFFFFFFu) != 0;
        } else {
            const uint16_t *r = (const uint16_t *)x + m * K;
            for (int64_t j = 0; j < K; j++) c += (r[j] & 0x7FFFu) != 0;
        }
        crow[m + 1] = c;
    }
    for (int64_t m = 0; m < M; m++) crow[m + 1] += crow[m];
    return crow[M];
}

/* col / val (fp32) of the nonzeros of x [M, K], row by row, at the offsets crow gives. */
void lb_csr_fill(const void *x, int32_t dt, int64_t M, int64_t K, const int64_t *crow, int64_t *col, float *val,
                 int32_t nthreads) {
    #pragma omp parallel for num_threads(nthreads) schedule(static) if (M * K > (1 << 16))
    for (int64_t m = 0; m < M; m++) {
        int64_t o = crow[m];
        for (int64_t j = 0; j < K; j++) {
            float v = load_any(x, m * K + j, dt);
            if (f2u(v) & 0x7FFFFFFFu) { col[o] = j; val[o] = v; o++; }
        }
    }
}
