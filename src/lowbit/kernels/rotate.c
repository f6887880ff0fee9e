/* lowbit's CPU kernels: the blockwise randomized Hadamard rotation (lowbit.nn.hadamard.rotate), bit for bit the
 * eager butterflies: per run of n, x·diag(signs) (exact), then stages h = 1, 2, .., n/2 of (u, v) -> (u + v, u − v)
 * on the pairs (j, j + h) of each 2h-block in fp32, then × scale (fp32 1/√n); the padded tail rotates zeros.
 * Along dim 0 the runs go down columns, so every stage is a vector operation across the columns; along dim 1 the
 * stages h < 16 pair lanes of one 16-float vector (GCC vector extensions: permutes on AVX-512, pairs of them on
 * AVX2; no intrinsics) and the wider ones are again plain vector loops. */
#include "common.h"

#define TILE 4096 /* floats in one staging tile (16 KiB: stays in L1) */

/* v16f, v16i: common.h */

static inline void butterfly(float *restrict u, float *restrict v, int64_t W) {
    for (int64_t w = 0; w < W; w++) {
        float p = u[w], q = v[w];
        u[w] = p + q;
        v[w] = p - q;
    }
}

/* Stages h = h0, 2·h0, .., n/2 on t[n][W] (row stride W): the pairs are rows (j, j + h), vectorised along W. */
static void stages_rows(float *restrict t, int n, int h0, int64_t W) {
    for (int h = h0; h < n; h *= 2)
        for (int b = 0; b < n; b += 2 * h)
            for (int j = b; j < b + h; j++) butterfly(t + (int64_t)j * W, t + (int64_t)(j + h) * W, W);
}

static void scale_all(float *restrict t, int64_t m, float s) {
    for (int64_t k = 0; k < m; k++) t[k] *= s;
}

/* The butterfly stages h = 1, 2, .., N/2 across N vectors in registers: (r[j], r[j + h]) -> (r[j] + r[j + h],
 * r[j] − r[j + h]) for every j with bit h clear (the runs go across the vectors, lane by lane). */
static inline __attribute__((always_inline)) void stages_regs(v16f *r, const int N) {
    #pragma GCC unroll 8
    for (int h = 1; h < N; h *= 2) {
        #pragma GCC unroll 64
        for (int j = 0; j < N; j++)
            if (!(j & h)) {
                v16f p = r[j], q = r[j + h];
                r[j] = p + q;
                r[j + h] = p - q;
            }
    }
}

/* One 16-column slice of the dim-0 rotation held in registers from load to store: rows l0..l0+N of src (row
 * stride ld; rows at or past L are zeros) -> rows of out (row stride ldo), dtypes converted on the way. */
static inline __attribute__((always_inline)) void slice_regs(const void *src, int in_dt, int64_t l0, int64_t L,
                                                             int64_t ld, const float *signs, float scale,
                                                             void *out, int out_dt, int64_t ldo, const int N) {
    v16f r[N];
    #pragma GCC unroll 64
    for (int i = 0; i < N; i++) {
        r[i] = l0 + i < L ? load16(src, (l0 + i) * ld, in_dt) : (v16f){0};
        if (signs) r[i] *= signs[i];
    }
    stages_regs(r, N);
    #pragma GCC unroll 64
    for (int i = 0; i < N; i++) store16(out, (l0 + i) * ldo, r[i] * scale, out_dt);
}

static void slice(const void *src, int in_dt, int64_t l0, int64_t L, int64_t ld, int n, const float *signs,
                  float scale, void *out, int out_dt, int64_t ldo) {
    if (n == 16) slice_regs(src, in_dt, l0, L, ld, signs, scale, out, out_dt, ldo, 16);
    else if (n == 32) slice_regs(src, in_dt, l0, L, ld, signs, scale, out, out_dt, ldo, 32);
    else slice_regs(src, in_dt, l0, L, ld, signs, scale, out, out_dt, ldo, 8);
}

/* Along dim 0: src [L, W] (row stride ld) -> out [Lp, W] contiguous; rows L..Lp are zeros before rotating.
 * n = 8, 16, 32: 16-column slices in registers (a last partial slice through a zero-padded fp32 tile); other n:
 * an L1 tile per (run, column chunk) and one vector loop per stage. */
static void rotate_dim0(const void *src, int in_dt, int64_t L, int64_t W, int64_t ld, int n, const float *signs,
                        float scale, int64_t Lp, void *out, int out_dt, int nthreads) {
    int regs = n == 8 || n == 16 || n == 32;
    int64_t lanes = regs ? 256 : TILE / n, chunks = (W + lanes - 1) / lanes, items = (Lp / n) * chunks;
    #pragma omp parallel for num_threads(nthreads) schedule(static) if (Lp * W > (1 << 16))
    for (int64_t it = 0; it < items; it++) {
        float t[TILE];
        int64_t g = it / chunks, c0 = (it % chunks) * lanes, cw = W - c0 < lanes ? W - c0 : lanes;
        int64_t full = regs ? cw / 16 * 16 : 0, rest = cw - full;
        for (int64_t w = 0; w < full; w += 16)
            slice((const char *)src + (c0 + w) * (int64_t[]){4, 2, 2}[in_dt], in_dt, g * n, L, ld, n, signs, scale,
                  (char *)out + (c0 + w) * (int64_t[]){4, 2, 2}[out_dt], out_dt, W);
        if (!rest) continue;
        int64_t ws = (rest + 15) / 16 * 16, c1 = c0 + full; /* tile row stride; lanes rest..ws never stored */
        for (int i = 0; i < n; i++) {
            int64_t l = g * n + i;
            float *row = t + i * ws;
            memset(row, 0, sizeof(float) * (size_t)ws);
            if (l < L) load_f32(row, src, l * ld + c1, rest, in_dt);
            if (signs) scale_all(row, rest, signs[i]);
        }
        stages_rows(t, n, 1, ws);
        scale_all(t, n * ws, scale);
        for (int i = 0; i < n; i++) store_f32(out, (g * n + i) * W + c1, t + i * ws, rest, out_dt);
    }
}

/* One stage h < 16 inside a 16-lane vector: lane j pairs with j ^ h; clear bit h: v[j] + v[j^h] (= u + w), set
 * bit h: v[j^h] − v[j] (= u − w). */
static inline v16f stage_lanes(v16f v, v16i idx, v16i hi) {
    v16f s = __builtin_shuffle(v, idx);
    v16i a = (v16i)(v + s), b = (v16i)(s - v);
    return (v16f)((a & ~hi) | (b & hi));
}

/* The stages h = 1, 2, 4, 8 (those below n) of one vector: runs of n ≤ 16 lanes, or the first four stages of
 * longer runs. */
static inline v16f stages16(v16f v, int n) {
    const v16i i1 = {1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14};
    const v16i i2 = {2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13};
    const v16i i4 = {4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11};
    const v16i i8 = {8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7};
    const v16i m1 = {0, -1, 0, -1, 0, -1, 0, -1, 0, -1, 0, -1, 0, -1, 0, -1};
    const v16i m2 = {0, 0, -1, -1, 0, 0, -1, -1, 0, 0, -1, -1, 0, 0, -1, -1};
    const v16i m4 = {0, 0, 0, 0, -1, -1, -1, -1, 0, 0, 0, 0, -1, -1, -1, -1};
    const v16i m8 = {0, 0, 0, 0, 0, 0, 0, 0, -1, -1, -1, -1, -1, -1, -1, -1};
    if (n > 1) v = stage_lanes(v, i1, m1);
    if (n > 2) v = stage_lanes(v, i2, m2);
    if (n > 4) v = stage_lanes(v, i4, m4);
    if (n > 8) v = stage_lanes(v, i8, m8);
    return v;
}

static void stages_lanes(float *restrict buf, int64_t m16, int n) {
    for (int64_t k = 0; k < m16; k += 16) {
        v16f v;
        memcpy(&v, buf + k, sizeof v);
        v = stages16(v, n);
        memcpy(buf + k, &v, sizeof v);
    }
}

/* G = N·16 consecutive elements of a row (whole runs of n: G is a multiple of n, or n divides 16 and N = 1)
 * rotated in registers from load to store: signs (srep from the run's start), the lane stages h < 16, the
 * cross-vector stages h = 16, .., n/2, the scale; the same operations in the same order as the staged path. */
static inline __attribute__((always_inline)) void row_regs(const void *src, int in_dt, int64_t off,
                                                           const float *srep, int n, float scale, void *out,
                                                           int out_dt, int64_t ooff, const int N) {
    v16f r[N];
    #pragma GCC unroll 4
    for (int i = 0; i < N; i++) {
        r[i] = load16(src, off + 16 * i, in_dt);
        if (srep) {
            v16f sv;
            memcpy(&sv, srep + 16 * i, sizeof sv);
            r[i] *= sv;
        }
        r[i] = stages16(r[i], n);
    }
    stages_regs(r, N); /* pairs of vectors (j, j + h): elements 16·h apart */
    #pragma GCC unroll 4
    for (int i = 0; i < N; i++) store16(out, ooff + 16 * i, r[i] * scale, out_dt);
}

static inline __attribute__((always_inline)) void groups_n(const void *src, int in_dt, int64_t off, int64_t full,
                                                           const float *srep, int n, float scale, void *out,
                                                           int out_dt, int64_t ooff, const int N) {
    for (int64_t k = 0; k < full; k += 16 * N)
        row_regs(src, in_dt, off + k, srep, n, scale, out, out_dt, ooff + k, N);
}

/* The first `full` elements of a row (whole groups of G) through row_regs, its dtype branches resolved at compile
 * time for the common pairs (a branch per vector otherwise kept the stores out of line: 1.4x slower). */
static void groups_regs(const void *src, int in_dt, int64_t off, int64_t full, int64_t G, const float *srep,
                        int n, float scale, void *out, int out_dt, int64_t ooff) {
#define LB_GROUPS(I, O) \
    do { \
        if (G == 16) groups_n(src, I, off, full, srep, n, scale, out, O, ooff, 1); \
        else if (G == 32) groups_n(src, I, off, full, srep, n, scale, out, O, ooff, 2); \
        else groups_n(src, I, off, full, srep, n, scale, out, O, ooff, 4); \
    } while (0)
    if (in_dt == LB_BF16 && out_dt == LB_BF16) LB_GROUPS(LB_BF16, LB_BF16);
    else if (in_dt == LB_F32 && out_dt == LB_F32) LB_GROUPS(LB_F32, LB_F32);
    else if (in_dt == LB_BF16 && out_dt == LB_F32) LB_GROUPS(LB_BF16, LB_F32);
    else if (in_dt == LB_F32 && out_dt == LB_BF16) LB_GROUPS(LB_F32, LB_BF16);
    else LB_GROUPS(in_dt, out_dt);
#undef LB_GROUPS
}

/* Along dim 1: src [W, L] (row stride ld) -> out [W, Lp] contiguous; columns L..Lp are zeros before rotating.
 * Each row's whole groups of G = max(n, 16) valid elements rotate in registers (row_regs); the rest (the last
 * partial group and the padding) goes through an L1 staging buffer of TILE floats (a multiple of n and of 16). */
static void rotate_dim1(const void *src, int in_dt, int64_t L, int64_t W, int64_t ld, int n, const float *signs,
                        float scale, int64_t Lp, void *out, int out_dt, int nthreads) {
    float srep[TILE]; /* the signs repeated: every staging segment starts a run */
    for (int64_t k = 0; k < TILE; k++) srep[k] = signs ? signs[k % n] : 1.0f;
    /* registers for runs of 32+ or fp32 in and out; 16-element bf16 groups were slower in registers than staged
     * (measured on an EPYC: 406 vs 342 us for [512, 1536]) */
    const int64_t G = n > 16 ? n : 16;
    const int64_t full = n >= 32 || (in_dt == LB_F32 && out_dt == LB_F32) ? L / G * G : 0;
    #pragma omp parallel for num_threads(nthreads) schedule(static) if (Lp * W > (1 << 16))
    for (int64_t r = 0; r < W; r++) {
        float buf[TILE];
        groups_regs(src, in_dt, r * ld, full, G, signs ? srep : NULL, n, scale, out, out_dt, r * Lp);
        for (int64_t off = full; off < Lp; off += TILE) {
            int64_t m = Lp - off < TILE ? Lp - off : TILE, m16 = (m + 15) / 16 * 16;
            int64_t valid = L - off < m ? (L - off > 0 ? L - off : 0) : m;
            load_f32(buf, src, r * ld + off, valid, in_dt);
            memset(buf + valid, 0, sizeof(float) * (size_t)(m16 - valid));
            if (signs)
                for (int64_t k = 0; k < m16; k++) buf[k] *= srep[k];
            stages_lanes(buf, m16, n);
            for (int64_t b = 0; b < m; b += n) stages_rows(buf + b, n, 16, 1);
            scale_all(buf, m, scale);
            store_f32(out, r * Lp + off, buf, m, out_dt);
        }
    }
}

/* The rotation along dim 0 (dim0 != 0) or dim 1 of a 2-D src; n a power of two <= 64 dividing Lp. Returns 1
 * (nothing written) for an n the kernel does not take. */
int32_t lb_rotate(const void *src, int32_t in_dt, int64_t L, int64_t W, int64_t ld, int32_t dim0, int32_t n,
                  const float *signs, float scale, int64_t Lp, void *out, int32_t out_dt, int32_t nthreads) {
    if (n < 1 || n > 64 || (n & (n - 1)) || Lp % n) return 1;
    if (dim0) rotate_dim0(src, in_dt, L, W, ld, n, signs, scale, Lp, out, out_dt, nthreads);
    else rotate_dim1(src, in_dt, L, W, ld, n, signs, scale, Lp, out, out_dt, nthreads);
    return 0;
}
