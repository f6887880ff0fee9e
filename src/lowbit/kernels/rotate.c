/* lowbit's CPU kernels: the blockwise randomized Hadamard rotation (lowbit.nn.hadamard.rotate), bit for bit the
 * eager butterflies: per run of n, x·diag(signs) (exact), then stages h = 1, 2, .., n/2 of (u, v) -> (u + v, u − v)
 * on the pairs (j, j + h) of each 2h-block in fp32, then × scale (fp32 1/√n); the padded tail rotates zeros. */
#include "common.h"

#define RW 64 /* independent runs per staging tile (one vector lane each) */

/* t[n][RW]: the n-point transform of each of the RW columns. */
static void fwht_tile(float *t, int n, const float *signs, float scale) {
    if (signs)
        for (int i = 0; i < n; i++)
            for (int w = 0; w < RW; w++) t[i * RW + w] *= signs[i];
    for (int h = 1; h < n; h *= 2)
        for (int b = 0; b < n; b += 2 * h)
            for (int j = b; j < b + h; j++) {
                float *u = t + j * RW, *v = t + (j + h) * RW;
                for (int w = 0; w < RW; w++) {
                    float p = u[w], q = v[w];
                    u[w] = p + q;
                    v[w] = p - q;
                }
            }
    for (int k = 0; k < n * RW; k++) t[k] *= scale;
}

static inline void store_any(void *p, int64_t i, float v, int dt) {
    if (dt == LB_F32) ((float *)p)[i] = v;
    else if (dt == LB_BF16) ((uint16_t *)p)[i] = f32_to_bf16(v);
    else ((_Float16 *)p)[i] = (_Float16)v;
}

/* Along dim 0: src [L, W] (row stride ld) -> out [Lp, W] contiguous; rows L..Lp are zeros before rotating. */
static void rotate_dim0(const void *src, int in_dt, int64_t L, int64_t W, int64_t ld, int n, const float *signs,
                        float scale, int64_t Lp, void *out, int out_dt, int nthreads) {
    int64_t chunks = (W + RW - 1) / RW, items = (Lp / n) * chunks;
    #pragma omp parallel for num_threads(nthreads) schedule(static) if (Lp * W > (1 << 16))
    for (int64_t it = 0; it < items; it++) {
        float t[64 * RW];
        int64_t g = it / chunks, c0 = (it % chunks) * RW, cw = W - c0 < RW ? W - c0 : RW;
        for (int i = 0; i < n; i++) {
            int64_t l = g * n + i;
            memset(t + i * RW, 0, sizeof(float) * RW);
            if (l < L) load_f32(t + i * RW, src, l * ld + c0, cw, in_dt);
        }
        fwht_tile(t, n, signs, scale);
        for (int i = 0; i < n; i++) store_f32(out, (g * n + i) * W + c0, t + i * RW, cw, out_dt);
    }
}

/* Along dim 1: src [W, L] (row stride ld) -> out [W, Lp] contiguous; columns L..Lp are zeros before rotating. */
static void rotate_dim1(const void *src, int in_dt, int64_t L, int64_t W, int64_t ld, int n, const float *signs,
                        float scale, int64_t Lp, void *out, int out_dt, int nthreads) {
    int64_t chunks = (W + RW - 1) / RW;
    #pragma omp parallel for num_threads(nthreads) schedule(static) if (Lp * W > (1 << 16))
    for (int64_t c = 0; c < chunks; c++) {
        float t[64 * RW];
        int64_t r0 = c * RW, rw = W - r0 < RW ? W - r0 : RW;
        for (int64_t g = 0; g < Lp / n; g++) {
            memset(t, 0, sizeof(float) * n * RW);
            for (int64_t w = 0; w < rw; w++)
                for (int i = 0; i < n; i++) {
                    int64_t l = g * n + i;
                    if (l < L) t[i * RW + w] = load_any(src, (r0 + w) * ld + l, in_dt);
                }
            fwht_tile(t, n, signs, scale);
            for (int64_t w = 0; w < rw; w++)
                for (int i = 0; i < n; i++) store_any(out, (r0 + w) * Lp + g * n + i, t[i * RW + w], out_dt);
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
