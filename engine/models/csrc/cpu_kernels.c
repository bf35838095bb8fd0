/* CPU kernels for decode-sized batches, fp32: a linear layer, the routed-expert FFN and the
 * attention of decode steps over the paged KV cache.
 *
 * All three are built on one primitive, dot_tile: the dot products of up to TILE_W weight rows
 * with up to TILE_X activation rows, each weight vector loaded once for all activation rows and
 * each activation vector once for all weight rows. A dot product runs in LANES independent
 * partial sums, lane l taking the elements k = l (mod LANES) in order, and the lanes are added
 * as a fixed tree (lane_sum). Every output element is summed in that same order whatever the
 * number of rows, the tile it falls in, or whether the vector or the scalar code computed it
 * (the build uses -ffp-contract=off, and MADD is an explicit fused multiply-add where the CPU
 * has one), so a row's result does not depend on the rows batched with it, nor on how experts
 * are grouped into calls. Weight rows are split across OpenMP threads. */
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <omp.h>

#define LANES 16
#define TILE_W 2 /* weight rows per tile */
#define TILE_X 3 /* activation rows per tile: 2 x TILE_W x TILE_X accumulators + TILE_W + 1 fit the 16 AVX registers */

/* a + w * x. With FMA hardware an explicit fused multiply-add: rounded once, the same in scalar
 * and vector code, so it keeps the bit-identity the build's -ffp-contract=off protects. */
#ifdef __FMA__
#define MADD(a, w, x) fmaf((w), (x), (a))
#else
#define MADD(a, w, x) ((a) + (w) * (x))
#endif

/* The lanes' partial sums added as a tree: lane l plus lane l + 8, then + 4, + 2, + 1. */
static float lane_sum(const float *a) {
    float t[LANES / 2];
    for (int l = 0; l < 8; ++l) t[l] = a[l] + a[l + 8];
    for (int l = 0; l < 4; ++l) t[l] += t[l + 4];
    for (int l = 0; l < 2; ++l) t[l] += t[l + 2];
    return t[0] + t[1];
}

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>

/* lane_sum of the lanes held in lo (0-7) and hi (8-15): the same adds in the same order. */
static inline float hsum(__m256 lo, __m256 hi) {
    __m256 t8 = _mm256_add_ps(lo, hi);
    __m128 t4 = _mm_add_ps(_mm256_castps256_ps128(t8), _mm256_extractf128_ps(t8, 1));
    __m128 t2 = _mm_add_ps(t4, _mm_movehl_ps(t4, t4));
    return _mm_cvtss_f32(_mm_add_ss(t2, _mm_shuffle_ps(t2, t2, 1)));
}

/* s[r * lds + c] = dot(w[r], x[c]) for r < R <= TILE_W, c < C <= TILE_X. Inlined with constant R
 * and C, so the accumulators stay in registers. */
static inline __attribute__((always_inline)) void dot_tile(const float *const *w, int R, const float *const *x, int C,
                                                           int64_t k, float *s, int64_t lds) {
    int64_t kv = k - k % LANES;
    __m256 acc[TILE_W][TILE_X][2];
    for (int r = 0; r < R; ++r)
        for (int c = 0; c < C; ++c) acc[r][c][0] = acc[r][c][1] = _mm256_setzero_ps();
    for (int64_t j = 0; j < kv; j += LANES)
        for (int h = 0; h < 2; ++h) {
            __m256 wv[TILE_W];
            for (int r = 0; r < R; ++r) wv[r] = _mm256_loadu_ps(w[r] + j + 8 * h);
            for (int c = 0; c < C; ++c) {
                __m256 xv = _mm256_loadu_ps(x[c] + j + 8 * h);
                for (int r = 0; r < R; ++r) acc[r][c][h] = _mm256_fmadd_ps(wv[r], xv, acc[r][c][h]);
            }
        }
    for (int r = 0; r < R; ++r)
        for (int c = 0; c < C; ++c) {
            if (kv == k) {
                s[r * lds + c] = hsum(acc[r][c][0], acc[r][c][1]);
                continue;
            }
            float a[LANES];  /* the tail: one more partial lane step */
            _mm256_storeu_ps(a, acc[r][c][0]);
            _mm256_storeu_ps(a + 8, acc[r][c][1]);
            for (int l = 0; l < k - kv; ++l) a[l] = MADD(a[l], w[r][kv + l], x[c][kv + l]);
            s[r * lds + c] = lane_sum(a);
        }
}
#else
static float dot1(const float *restrict w, const float *restrict x, int64_t k) {
    int64_t kv = k - k % LANES;
    float a[LANES] = {0};
    for (int64_t j = 0; j < kv; j += LANES)
        for (int l = 0; l < LANES; ++l) a[l] = MADD(a[l], w[j + l], x[j + l]);
    for (int l = 0; l < k - kv; ++l) a[l] = MADD(a[l], w[kv + l], x[kv + l]);  /* the tail: one more partial lane step */
    return lane_sum(a);
}

/* s[r * lds + c] = dot(w[r], x[c]) for r < R, c < C (portable: one dot product at a time). */
static void dot_tile(const float *const *w, int R, const float *const *x, int C, int64_t k, float *s, int64_t lds) {
    for (int r = 0; r < R; ++r)
        for (int c = 0; c < C; ++c) s[r * lds + c] = dot1(w[r], x[c], k);
}
#endif

/* dot_tile for any R <= TILE_W and C <= TILE_X, dispatched to a constant-size instance. */
static void dot_tile_any(const float *const *w, int R, const float *const *x, int C, int64_t k, float *s) {
    if (R == 2) {
        if (C == 3) dot_tile(w, 2, x, 3, k, s, TILE_X);
        else if (C == 2) dot_tile(w, 2, x, 2, k, s, TILE_X);
        else dot_tile(w, 2, x, 1, k, s, TILE_X);
    } else {
        if (C == 3) dot_tile(w, 1, x, 3, k, s, TILE_X);
        else if (C == 2) dot_tile(w, 1, x, 2, k, s, TILE_X);
        else dot_tile(w, 1, x, 1, k, s, TILE_X);
    }
}

/* Starts loading `rows` weight rows of k floats (the next ones, while the current ones are in
 * use: without this a multi-row pass streams its weights at half the rate of a one-row pass). */
static inline void prefetch_rows(const float *row, int64_t k, int rows) {
    for (int64_t c = 0; c < rows * k; c += 64 / sizeof(float)) __builtin_prefetch(row + c, 0, 0);
}

/* The R (1 or 2) consecutive weight rows at w (row length k) against the activation rows
 * [begin, end): y[y_row(i) * ldy + r] = scale(i) * dot(w[r], x[x_row(i)]), where a NULL x_row,
 * y_row is the identity and a NULL scale is 1. x rows are ldx floats apart. */
static void weight_rows(const float *w, int R, int64_t k, int64_t begin, int64_t end, const float *x, const int64_t *x_row,
                        int64_t ldx, float *y, const int64_t *y_row, int64_t ldy, const float *scale) {
    const float *ws[TILE_W] = {w, w + k};
    float s[TILE_W * TILE_X];
    for (int64_t i = begin; i < end; i += TILE_X) {
        int C = end - i < TILE_X ? (int)(end - i) : TILE_X;
        const float *xs[TILE_X];
        for (int c = 0; c < C; ++c) xs[c] = x + (x_row ? x_row[i + c] : i + c) * ldx;
        dot_tile_any(ws, R, xs, C, k, s);
        for (int c = 0; c < C; ++c) {
            float *yi = y + (y_row ? y_row[i + c] : i + c) * ldy;
            for (int r = 0; r < R; ++r) yi[r] = scale ? s[r * TILE_X + c] * scale[i + c] : s[r * TILE_X + c];
        }
    }
}

/* y[i, n] = sum_k x[i, k] * w[n, k]. w: [n, k] contiguous; x: [m, k], row stride ldx; y: [m, n], row stride ldy. */
void linear_f32(const float *w, const float *x, float *y, int64_t n, int64_t k, int64_t m, int64_t ldx, int64_t ldy, int threads) {
    int64_t pairs = (n + 1) / 2;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t p = 0; p < pairs; ++p) {
        int64_t r = 2 * p;
        if (p + 1 < pairs) prefetch_rows(w + (r + 2) * k, k, r + 3 < n ? 2 : 1);
        weight_rows(w + r * k, r + 1 < n ? 2 : 1, k, 0, m, x, NULL, ldx, y + r, NULL, ldy, NULL);
    }
}

/* Routed experts for the rows of `groups` groups (one per expert).
 *
 * Row r (an assignment of token tokens[r] to an expert) belongs to the group g with
 * begin[g] <= r < end[g]; group g's weights are gate_up[g] ([2*ffn, hidden], gate rows then up
 * rows) and down[g] ([hidden, ffn]), passed as addresses. Computes
 *     out[dest[r], :] = scale[r] * down(silu(gate x) * (up x)),  x = x[tokens[r], :]
 * using h ([rows, 2*ffn]) and act ([rows, ffn]) as scratch, indexed by r. */
void moe_experts_f32(const float *x, int64_t hidden, int64_t ffn, const int64_t *tokens, const int64_t *dest, const float *scale,
                     const int64_t *begin, const int64_t *end, const int64_t *gate_up, const int64_t *down, int64_t groups,
                     float *out, float *h, float *act, int threads) {
    int64_t up_rows = 2 * ffn, up_pairs = ffn, down_pairs = (hidden + 1) / 2;
#pragma omp parallel num_threads(threads)
    {
#pragma omp for schedule(static)
        for (int64_t i = 0; i < groups * up_pairs; ++i) {
            int64_t g = i / up_pairs, n = 2 * (i % up_pairs);
            const float *w = (const float *)gate_up[g] + n * hidden;
            if (i + 1 < groups * up_pairs)
                prefetch_rows((const float *)gate_up[(i + 1) / up_pairs] + 2 * ((i + 1) % up_pairs) * hidden, hidden, 2);
            weight_rows(w, 2, hidden, begin[g], end[g], x, tokens, hidden, h + n, NULL, up_rows, NULL);
        }
#pragma omp for schedule(static)
        for (int64_t g = 0; g < groups; ++g)
            for (int64_t r = begin[g]; r < end[g]; ++r) {
                const float *gate = h + r * up_rows, *up = gate + ffn;
                float *a = act + r * ffn;
                for (int64_t f = 0; f < ffn; ++f) a[f] = gate[f] / (1.f + expf(-gate[f])) * up[f];
            }
#pragma omp for schedule(static)
        for (int64_t i = 0; i < groups * down_pairs; ++i) {
            int64_t g = i / down_pairs, n = 2 * (i % down_pairs);
            const float *w = (const float *)down[g] + n * ffn;
            if (i + 1 < groups * down_pairs)
                prefetch_rows((const float *)down[(i + 1) / down_pairs] + 2 * ((i + 1) % down_pairs) * ffn, ffn, 2);
            weight_rows(w, n + 1 < hidden ? 2 : 1, ffn, begin[g], end[g], act, NULL, ffn, out + n, dest, hidden, scale);
        }
    }
}

/* Attention for decode steps (one new token per sequence) straight from the paged KV cache.
 *
 * q: [seqs, heads, head_dim]; k_cache, v_cache: [slots, kv_heads, head_dim]; sequence b attends
 * its context_lens[b] positions, whose cache slots are slots[b * slots_stride + t]. Query head h
 * reads kv head h / (heads / kv_heads); the query heads sharing a kv head are computed together,
 * reading each key and value row once. out: [seqs, heads, head_dim]; scratch: one row of
 * slots_stride floats per (sequence, head). Every (sequence, head) is summed in the same order
 * whatever else is in the step, so a sequence's result does not depend on the others. */
void paged_decode_attention_f32(const float *q, const float *k_cache, const float *v_cache, const int64_t *slots,
                                int64_t slots_stride, const int64_t *context_lens, int64_t seqs, int64_t heads,
                                int64_t kv_heads, int64_t head_dim, float scale, float *out, float *scratch,
                                int threads) {
    int64_t group = heads / kv_heads;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t i = 0; i < seqs * kv_heads; ++i) {
        int64_t b = i / kv_heads, g = i % kv_heads, n = context_lens[b], first = b * heads + g * group;
        const int64_t *slot = slots + b * slots_stride;
        for (int64_t h0 = 0; h0 < group; h0 += TILE_X) {  /* up to TILE_X query heads against two keys at a time */
            int C = group - h0 < TILE_X ? (int)(group - h0) : TILE_X;
            const float *qs[TILE_X];
            for (int c = 0; c < C; ++c) qs[c] = q + (first + h0 + c) * head_dim;
            float s[TILE_W * TILE_X];
            for (int64_t t = 0; t < n; t += TILE_W) {
                int R = n - t < TILE_W ? (int)(n - t) : TILE_W;
                const float *ks[TILE_W];
                for (int r = 0; r < R; ++r) ks[r] = k_cache + (slot[t + r] * kv_heads + g) * head_dim;
                dot_tile_any(ks, R, qs, C, head_dim, s);
                for (int r = 0; r < R; ++r)
                    for (int c = 0; c < C; ++c) scratch[(first + h0 + c) * slots_stride + t + r] = s[r * TILE_X + c] * scale;
            }
        }
        for (int64_t h = first; h < first + group; ++h) {  /* softmax: p[t] / total is the weight of position t */
            float *p = scratch + h * slots_stride, top = -INFINITY, total = 0.f;
            for (int64_t t = 0; t < n; ++t)
                if (p[t] > top) top = p[t];
            for (int64_t t = 0; t < n; ++t) {
                p[t] = expf(p[t] - top);
                total += p[t];
            }
            for (int64_t t = 0; t < n; ++t) p[t] /= total;
            for (int64_t d = 0; d < head_dim; ++d) out[h * head_dim + d] = 0.f;
        }
        for (int64_t t = 0; t < n; ++t) {
            const float *v = v_cache + (slot[t] * kv_heads + g) * head_dim;
            for (int64_t h = first; h < first + group; ++h) {
                float w = scratch[h * slots_stride + t], *o = out + h * head_dim;
                for (int64_t d = 0; d < head_dim; ++d) o[d] = MADD(o[d], w, v[d]);
            }
        }
    }
}

/* Rotate-half rotary embedding: x [tokens, heads, head_dim] with row stride ldx (heads
 * contiguous within a row) into the contiguous out [tokens, heads, head_dim], with cos, sin
 * [tokens, head_dim] the tables at each token's position. With h = head_dim / 2,
 *     out[i] = x[i] * cos[i] - x[i + h] * sin[i],  out[i + h] = x[i + h] * cos[i + h] + x[i] * sin[i + h]
 * each product rounded before the sum, as x * cos + rotate_half(x) * sin computes it. */
void rope_f32(const float *x, int64_t ldx, float *out, const float *cos, const float *sin, int64_t tokens, int64_t heads,
              int64_t head_dim) {
    int64_t half = head_dim / 2;
    for (int64_t t = 0; t < tokens; ++t)
        for (int64_t h = 0; h < heads; ++h) {
            const float *xi = x + t * ldx + h * head_dim, *c = cos + t * head_dim, *s = sin + t * head_dim;
            float *o = out + (t * heads + h) * head_dim;
            for (int64_t i = 0; i < half; ++i) {
                float a = xi[i] * c[i], b = -xi[i + half] * s[i];
                o[i] = a + b;
            }
            for (int64_t i = half; i < head_dim; ++i) {
                float a = xi[i] * c[i], b = xi[i - half] * s[i];
                o[i] = a + b;
            }
        }
}

/* RMSNorm of each row: out[r] = weight * (x[r] * (1 / sqrt(mean(x[r]^2) + eps))), each product
 * rounded on its own as the reference computes it; the sum of squares runs in the lanes of a
 * dot product, so a row's result does not depend on the other rows. x rows are ldx floats apart;
 * out is contiguous [rows, dim]. */
void rms_norm_f32(const float *x, int64_t ldx, const float *weight, float *out, int64_t rows, int64_t dim, float eps) {
    for (int64_t r = 0; r < rows; ++r) {
        const float *xr = x + r * ldx;
        int64_t kv = dim - dim % LANES;
        float a[LANES] = {0};
        for (int64_t j = 0; j < kv; j += LANES)
            for (int l = 0; l < LANES; ++l) a[l] = MADD(a[l], xr[j + l], xr[j + l]);
        for (int l = 0; l < dim - kv; ++l) a[l] = MADD(a[l], xr[kv + l], xr[kv + l]);
        float inv = 1.f / sqrtf(lane_sum(a) / (float)dim + eps);
        float *o = out + r * dim;
        for (int64_t j = 0; j < dim; ++j) {
            float normed = xr[j] * inv;
            o[j] = weight[j] * normed;
        }
    }
}
