/* lowbit's CPU kernels: QuEST's power-of-two group scales (scales.quest_scale), bit for bit: E[x] and E[x²] from
 * pairwise sums (groups.tree_sum's order), var = E[x²] − E[x]², std = √var (1 where var < 0 or NaN), groups
 * whose squares overflow take std(x / absmax)·absmax, s = 2^floor(log2(c·std + 1e-8)), NaN for a group holding
 * NaN or inf; then × the scale multiplier. */
#include "common.h"

/* (Σ v, Σ v²) over v[0..n), pairwise (common.h's tree16 per 16 lanes); n a power of two <= 64. */
static void tree_sums(const float *v, int n, float *sum, float *sq) {
    if (n >= 16) {
        float a[4], b[4];
        for (int q = 0; q < n / 16; q++) {
            v16f x;
            memcpy(&x, v + 16 * q, sizeof x);
            a[q] = tree16(x);
            b[q] = tree16(x * x);
        }
        for (int m = n / 16; m > 1; m /= 2)
            for (int i = 0; i < m / 2; i++) {
                a[i] = a[2 * i] + a[2 * i + 1];
                b[i] = b[2 * i] + b[2 * i + 1];
            }
        *sum = a[0];
        *sq = b[0];
        return;
    }
    float a[16], b[16];
    for (int i = 0; i < n; i++) {
        a[i] = v[i];
        b[i] = v[i] * v[i];
    }
    for (int m = n; m > 1; m /= 2)
        for (int i = 0; i < m / 2; i++) {
            a[i] = a[2 * i] + a[2 * i + 1];
            b[i] = b[2 * i] + b[2 * i + 1];
        }
    *sum = a[0];
    *sq = b[0];
}

/* (std, var) of v[0..n) in fp32, n a power of two <= 64 (scales._std). */
static void std_var(const float *v, int n, float *std, float *var) {
    float sum, sq;
    tree_sums(v, n, &sum, &sq);
    float mean = sum / (float)n, vr = sq / (float)n - mean * mean;
    *var = vr;
    *std = vr >= 0.0f ? sqrtf(vr > 0.0f ? vr : 0.0f) : 1.0f;
}

/* Decode scales sg (and eg = 1/sg, exact, without a multiplier) of G groups of B contiguous elements at x[off + g·B],
 * dtype dt; B a power of two <= 64; c = QUEST_CLIP / fmax (fp32). */
void lb_quest_scales(const void *x, int64_t off, int64_t G, int64_t B, int32_t dt, float c, const lb_params *p,
                     float *sg, float *eg) {
    float v[64], w[64];
    for (int64_t g = 0; g < G; g++) {
        load_f32(v, x, off + g * B, B, dt);
        uint32_t am = 0;
        for (int i = 0; i < B; i++) {
            uint32_t u = f2u(v[i]) & 0x7FFFFFFFu;
            am = u > am ? u : am;
        }
        float a = bits_value(am), std, var;
        std_var(v, (int)B, &std, &var);
        if (!isfinite(var) && isfinite(a)) { /* the squares overflowed: scale by the absmax first */
            for (int i = 0; i < B; i++) w[i] = v[i] / a;
            std_var(w, (int)B, &std, &var);
            std = std * a;
        }
        float t = std * c + 1e-8f; /* >= 1e-8: a normal number, so frexp's exponent is its exponent field */
        int32_t k = (int32_t)((f2u(t) >> 23) & 0xFFu) - 127;
        k = k < -127 ? -127 : (k > 127 ? 127 : k);
        float s = k == -127 ? u2f(0x00400000u) : u2f((uint32_t)(k + 127) << 23);
        s = isfinite(a) ? s : NAN;
        sg[g] = p->has_mult ? s * p->scale_mult : s;
        eg[g] = p->has_mult ? 1.0f : 1.0f / s; /* s a power of two (or NaN): exact (LB_USE_E) */
    }
}

/* QuEST's trust mask: m[i] = |x[i] / s| < fmax for x [R, G·B] contiguous (dtype dt), s = scales[r·G + g] (fp32),
 * in the eager order (x in fp32, one division, then the comparison; NaN gives 0). */
void lb_trust_mask(const void *x, int32_t dt, int64_t R, int64_t G, int64_t B, const float *scales, float fmax,
                   uint8_t *m, int32_t nthreads) {
    #pragma omp parallel for num_threads(nthreads) schedule(static) if (R * G * B > (1 << 16))
    for (int64_t r = 0; r < R; r++) {
        float v[SEG];
        for (int64_t g = 0; g < G; g++) {
            float s = scales[r * G + g];
            for (int64_t j0 = 0; j0 < B; j0 += SEG) {
                int64_t off = (r * G + g) * B + j0, n = B - j0 < SEG ? B - j0 : SEG;
                load_f32(v, x, off, n, dt);
                for (int64_t j = 0; j < n; j++) m[off + j] = fabsf(v[j] / s) < fmax;
            }
        }
    }
}
