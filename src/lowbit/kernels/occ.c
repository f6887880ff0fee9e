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

/* Insert k into buf, the sorted cnt smallest keys so far (at most m <= 64; when full the largest drops out). */
static inline void tail_insert(uint32_t *buf, int64_t *cnt, int64_t m, uint32_t k) {
    if (*cnt == m && k >= buf[m - 1]) return;
    int64_t i = *cnt < m ? (*cnt)++ : m - 1;
    while (i > 0 && buf[i - 1] > k) { buf[i] = buf[i - 1]; i--; }
    buf[i] = k;
}

static inline int any16(v16i v) { /* some lane nonzero: an OR tree in registers (a store and narrow reloads stall) */
    v |= __builtin_shuffle(v, (v16i){8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7});
    v |= __builtin_shuffle(v, (v16i){4, 5, 6, 7, 0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3});
    v |= __builtin_shuffle(v, (v16i){2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1});
    v |= __builtin_shuffle(v, (v16i){1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0});
    return v[0] != 0;
}

/* The m-th smallest of the keys a[0..n) ^ flip (flip = all ones: the m-th largest, complemented), m <= 64, with
 * few branches: each of 16 lanes keeps its r smallest keys (vector min/max), and the m-th smallest t of those
 * 16·r > m candidates (and the ragged end) is the answer when every lane's r-th smallest is >= t (no key left out
 * can be below t). Otherwise (a lane with r keys below t: rare) a second pass sends every key <= t through the
 * sorted buffer. */
static uint32_t tail_kth(const uint32_t *a, int64_t n, int64_t m, uint32_t flip) {
    const int64_t r = m / 16 + 3;
    uint32_t buf[64];
    int64_t cnt = 0, j = 0;
    if (n >= 32 * r) {
        v16u lane[7];
        for (int64_t d = 0; d < r; d++) lane[d] = (v16u){0} + 0xFFFFFFFFu;
        for (; j + 16 <= n; j += 16) {
            v16u k;
            memcpy(&k, a + j, sizeof k);
            k ^= flip;
            for (int64_t d = 0; d < r; d++) { /* insert k into each lane's sorted list */
                v16u lt = (v16u)(k < lane[d]), lo = (k & lt) | (lane[d] & ~lt);
                k = (lane[d] & lt) | (k & ~lt);
                lane[d] = lo;
            }
        }
        for (int64_t d = 0; d < r; d++)
            for (int l = 0; l < 16; l++) tail_insert(buf, &cnt, m, lane[d][l]);
        for (int64_t i = j; i < n; i++) tail_insert(buf, &cnt, m, a[i] ^ flip);
        const uint32_t t = buf[m - 1];
        if (!any16((v16i)(lane[r - 1] < (v16u){0} + t)))
            return t ^ flip;
        cnt = 0;
        for (j = 0; j + 16 <= n; j += 16) {
            v16u k;
            memcpy(&k, a + j, sizeof k);
            if (!any16((k ^ flip) <= (v16u){0} + t)) continue;
            for (int l = 0; l < 16; l++) tail_insert(buf, &cnt, m, a[j + l] ^ flip);
        }
    }
    for (; j < n; j++) tail_insert(buf, &cnt, m, a[j] ^ flip);
    return buf[m - 1] ^ flip;
}

static inline float round_to(float f, int dt) { /* f rounded to dt (as store_f32 would) and back */
    if (dt == LB_BF16) return u2f((uint32_t)f32_to_bf16(f) << 16);
    if (dt == LB_F16) return (float)(_Float16)f;
    return f;
}

/* One row's lo, hi from its keys (keys reordered). */
static void row_bounds(uint32_t *keys, int64_t K, int64_t i_lo, int64_t i_hi, float *lo, float *hi) {
    int64_t m_lo = i_lo + 1, m_hi = K - i_hi;
    uint32_t klo, khi;
    klo = m_lo <= 64 ? tail_kth(keys, K, m_lo, 0) : select_kth(keys, K, i_lo);
    khi = m_hi <= 64 ? tail_kth(keys, K, m_hi, 0xFFFFFFFFu) : select_kth(keys, K, i_hi);
    *lo = key_value(klo);
    *hi = key_value(khi);
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
                    if (j % 16 == 0 && j + 16 <= n) { /* skip 16 zeros at once (most of them are) */
                        v16u r;
                        memcpy(&r, rb + j, sizeof r);
                        if (!any16((v16i)(r & 0x7FFFFFFFu))) { j += 15; continue; }
                    }
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

/* dst[c, r] = src[r, c] in fp32 for r < R, c < C: src rows of stride lds (element offset off, dtype dt), dst rows
 * of stride ldd. Whole 16×16 tiles go through registers, the ragged edges element by element. */
static void transpose_tiles(const void *src, int dt, int64_t off, int64_t lds, int64_t R, int64_t C, float *dst,
                            int64_t ldd) {
    for (int64_t r0 = 0; r0 < R; r0 += 16) {
        int64_t rb = R - r0 < 16 ? R - r0 : 16, c0 = 0;
        for (; rb == 16 && c0 + 16 <= C; c0 += 16) {
            v16f t[16];
            #pragma GCC unroll 16
            for (int r = 0; r < 16; r++) t[r] = load16(src, off + (r0 + r) * lds + c0, dt);
            transpose16(t);
            #pragma GCC unroll 16
            for (int c = 0; c < 16; c++) memcpy(dst + (c0 + c) * ldd + r0, &t[c], sizeof t[c]);
        }
        for (int64_t r = 0; r < rb; r++)
            for (int64_t c = c0; c < C; c++) dst[c * ldd + r0 + r] = load_any(src, off + (r0 + r) * lds + c, dt);
    }
}

/* y[off .. off + n) += a rounded to y's dtype ydt first (torch's y += a.to(y.dtype): both operands in fp32, the
 * sum rounded once to ydt). */
static void add_rounded(void *y, int ydt, int64_t off, const float *a, int64_t n) {
    int64_t k = 0;
    for (; k + 16 <= n; k += 16) {
        v16f v;
        memcpy(&v, a + k, sizeof v);
        store16(y, off + k, load16(y, off + k, ydt) + round16(v, ydt), ydt);
    }
    for (; k < n; k++) {
        float v = load_any(y, off + k, ydt) + round_to(a[k], ydt);
        store_f32(y, off + k, &v, 1, ydt);
    }
}

/* out [M, N] fp32 = ΔX·Wᵀ for ΔX [M, K] in ELL rows and w [N, K] (dtype wdt, contiguous): out[i, n] =
 * Σ_j vals[i, j]·w[n, cols[i, j]] for j < cnt[i] in order, from +0, each product rounded to fp32 before its
 * sum. Blocks of NB output columns: that block of Wᵀ is staged in fp32 so every term is a short contiguous row.
 * With y (contiguous [M, N], dtype ydt) instead of out: y += the product rounded to ydt (OCC's compensation added
 * to the GeMM's output without the fp32 product or its cast ever stored). Returns nonzero if scratch failed. */
int lb_ell_mm(const float *vals, const int64_t *cols, const int64_t *cnt, int64_t M, int64_t cap, const void *w,
              int32_t wdt, int64_t N, int64_t K, float *out, void *y, int32_t ydt, int32_t nthreads) {
    int failed = 0;
    #pragma omp parallel num_threads(nthreads) if (M * N + K * N > (1 << 16)) reduction(|:failed)
    {
        float *wt = malloc((size_t)(K > 0 ? K : 1) * NB * sizeof(float));
        failed |= wt == NULL;
        #pragma omp for schedule(static)
        for (int64_t n0 = 0; n0 < N; n0 += NB) {
            if (!wt) continue;
            int64_t nb = N - n0 < NB ? N - n0 : NB;
            transpose_tiles(w, wdt, n0 * K, K, nb, K, wt, NB); /* wt [K, NB]: rows n0.. of w, transposed */
            for (int64_t i = 0; i < M; i++) {
                v16f acc[NB / 16] = {0}; /* in registers */
                for (int64_t j = 0; j < cnt[i]; j++) {
                    const float *r = wt + cols[i * cap + j] * NB;
                    const v16f v = (v16f){0} + vals[i * cap + j];
                    for (int q = 0; q < NB / 16; q++) {
                        v16f w16;
                        memcpy(&w16, r + 16 * q, sizeof w16);
                        acc[q] += v * w16;
                    }
                }
                if (y) add_rounded(y, ydt, i * N + n0, (const float *)acc, nb);
                else memcpy(out + i * N + n0, acc, (size_t)nb * sizeof(float));
            }
        }
        free(wt);
    }
    return failed;
}

/* out [N, K] fp32 = dyᵀ·ΔX for dy [M, N] (dtype ddt, contiguous): out[n, k] = Σ_i ΔX[i, k]·dy[i, n] over rows i in
 * ascending order, from +0, each product rounded to fp32 before its sum. Blocks of NB columns of dy: the block
 * of ΔXᵀ·dy (K × NB) accumulates row by row, then goes out transposed. Threads own blocks, so the order never
 * depends on their number. Returns nonzero if scratch failed. */
int lb_ell_tmm(const float *vals, const int64_t *cols, const int64_t *cnt, int64_t M, int64_t cap, const void *dy,
               int32_t ddt, int64_t N, int64_t K, float *out, int32_t nthreads) {
    int failed = 0;
    #pragma omp parallel num_threads(nthreads) if (M * N + K * N > (1 << 16)) reduction(|:failed)
    {
        float *acc = malloc((size_t)(K > 0 ? K : 1) * NB * sizeof(float));
        failed |= acc == NULL;
        #pragma omp for schedule(static)
        for (int64_t n0 = 0; n0 < N; n0 += NB) {
            if (!acc) continue;
            int64_t nb = N - n0 < NB ? N - n0 : NB;
            float d[NB] = {0};
            memset(acc, 0, (size_t)K * NB * sizeof(float));
            for (int64_t i = 0; i < M; i++) {
                if (!cnt[i]) continue;
                load_f32(d, dy, i * N + n0, nb, ddt);
                for (int64_t j = 0; j < cnt[i]; j++) {
                    const float v = vals[i * cap + j];
                    float *o = acc + cols[i * cap + j] * NB;
                    for (int64_t n = 0; n < NB; n++) o[n] += v * d[n];
                }
            }
            transpose_tiles(acc, LB_F32, 0, NB, K, nb, out + n0 * K, K); /* out rows n0..: acc transposed */
        }
        free(acc);
    }
    return failed;
}
