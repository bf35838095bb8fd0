/* CPU kernels for decode-sized batches, fp32: a linear layer, the routed-expert FFN and the
 * attention of decode steps over the paged KV cache.
 *
 * The first two are bound by reading weights: each weight row is read once for up to 2 x BLOCK
 * (linear) or BLOCK (experts) activation rows, each dot product runs in LANES independent
 * partial sums (vectorised by the compiler), and weight rows are split across OpenMP threads. Every output element is summed in the same
 * order whatever the number of rows (built with -ffp-contract=off, so vectorised and scalar code
 * round alike), so a row's result does not depend on the rows batched with it, nor on how
 * experts are grouped into calls. */
#include <math.h>
#include <stdint.h>
#include <omp.h>

#define LANES 16
#define BLOCK 4

/* a + w * x. With FMA hardware an explicit fused multiply-add: rounded once, the same in scalar
 * and vector code, so it keeps the bit-identity the build's -ffp-contract=off protects. */
#ifdef __FMA__
#define MADD(a, w, x) fmaf((w), (x), (a))
#else
#define MADD(a, w, x) ((a) + (w) * (x))
#endif

static float lane_sum(const float *a) {
    float s = 0.f;
    for (int l = 0; l < LANES; ++l) s += a[l];
    return s;
}

static float dot1(const float *restrict w, const float *restrict x, int64_t k) {
    int64_t kv = k - k % LANES;
    float a[LANES] = {0};
    for (int64_t j = 0; j < kv; j += LANES)
        for (int l = 0; l < LANES; ++l) a[l] = MADD(a[l], w[j + l], x[j + l]);
    for (int l = 0; l < k - kv; ++l) a[l] = MADD(a[l], w[kv + l], x[kv + l]);  /* the tail: one more partial lane step */
    return lane_sum(a);
}

/* s[i] = dot(w, x_i) for four rows, reading w once; bit-identical to four dot1 calls. */
static void dot4(const float *restrict w, const float *x0, const float *x1, const float *x2, const float *x3, int64_t k,
                 float *s) {
    int64_t kv = k - k % LANES;
    float a0[LANES] = {0}, a1[LANES] = {0}, a2[LANES] = {0}, a3[LANES] = {0};
    for (int64_t j = 0; j < kv; j += LANES)
        for (int l = 0; l < LANES; ++l) {
            float wv = w[j + l];
            a0[l] = MADD(a0[l], wv, x0[j + l]);
            a1[l] = MADD(a1[l], wv, x1[j + l]);
            a2[l] = MADD(a2[l], wv, x2[j + l]);
            a3[l] = MADD(a3[l], wv, x3[j + l]);
        }
    for (int l = 0; l < k - kv; ++l) {
        float wv = w[kv + l];
        a0[l] = MADD(a0[l], wv, x0[kv + l]);
        a1[l] = MADD(a1[l], wv, x1[kv + l]);
        a2[l] = MADD(a2[l], wv, x2[kv + l]);
        a3[l] = MADD(a3[l], wv, x3[kv + l]);
    }
    s[0] = lane_sum(a0);
    s[1] = lane_sum(a1);
    s[2] = lane_sum(a2);
    s[3] = lane_sum(a3);
}

/* s[i] = dot(w, xs[i]) for eight rows, reading w once; bit-identical to eight dot1 calls. */
static void dot8(const float *restrict w, const float *const *xs, int64_t k, float *s) {
    int64_t kv = k - k % LANES;
    float a[8][LANES] = {{0}};
    for (int64_t j = 0; j < k; j += LANES) {
        int n = j < kv ? LANES : (int)(k - kv);
        for (int l = 0; l < n; ++l) {
            float wv = w[j + l];
            for (int b = 0; b < 8; ++b) a[b][l] = MADD(a[b][l], wv, xs[b][j + l]);
        }
    }
    for (int b = 0; b < 8; ++b) s[b] = lane_sum(a[b]);
}

/* Starts loading a weight row of k floats (the next one, while the current one is in use: without
 * this a four-row pass streams its weights at half the rate of a one-row pass). */
static inline void prefetch_row(const float *row, int64_t k) {
    for (int64_t c = 0; c < k; c += 64 / sizeof(float)) __builtin_prefetch(row + c, 0, 0);
}

/* y[i, n] = sum_k x[i, k] * w[n, k]. w: [n, k] contiguous; x: [m, k], row stride ldx; y: [m, n], row stride ldy. */
void linear_f32(const float *w, const float *x, float *y, int64_t n, int64_t k, int64_t m, int64_t ldx, int64_t ldy, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t r = 0; r < n; ++r) {
        const float *wr = w + r * k;
        if (r + 1 < n) prefetch_row(wr + k, k);
        int64_t i = 0;
        float s[2 * BLOCK];
        for (; i + 2 * BLOCK <= m; i += 2 * BLOCK) {
            const float *xs[2 * BLOCK];
            for (int b = 0; b < 2 * BLOCK; ++b) xs[b] = x + (i + b) * ldx;
            dot8(wr, xs, k, s);
            for (int b = 0; b < 2 * BLOCK; ++b) y[(i + b) * ldy + r] = s[b];
        }
        for (; i + BLOCK <= m; i += BLOCK) {
            const float *xi = x + i * ldx;
            dot4(wr, xi, xi + ldx, xi + 2 * ldx, xi + 3 * ldx, k, s);
            for (int b = 0; b < BLOCK; ++b) y[(i + b) * ldy + r] = s[b];
        }
        for (; i < m; ++i) y[i * ldy + r] = dot1(wr, x + i * ldx, k);
    }
}

/* One weight row against the rows [begin, end) of a group: out[row_out(r)] = scale(r) * dot(w, x_r). */
static void group_rows(const float *w, int64_t k, int64_t begin, int64_t end, const float *x, const int64_t *x_row, int64_t ldx,
                       float *y, const int64_t *y_row, int64_t ldy, const float *scale) {
    int64_t r = begin;
    float s[BLOCK];
    for (; r + BLOCK <= end; r += BLOCK) {
        dot4(w, x + x_row[r] * ldx, x + x_row[r + 1] * ldx, x + x_row[r + 2] * ldx, x + x_row[r + 3] * ldx, k, s);
        for (int b = 0; b < BLOCK; ++b) y[y_row[r + b] * ldy] = scale ? s[b] * scale[r + b] : s[b];
    }
    for (; r < end; ++r) {
        float v = dot1(w, x + x_row[r] * ldx, k);
        y[y_row[r] * ldy] = scale ? v * scale[r] : v;
    }
}

/* Routed experts for the rows of `groups` groups (one per expert).
 *
 * Row r (an assignment of token tokens[r] to an expert) belongs to the group g with
 * begin[g] <= r < end[g]; group g's weights are gate_up[g] ([2*ffn, hidden], gate rows then up
 * rows) and down[g] ([hidden, ffn]), passed as addresses. Computes
 *     out[dest[r], :] = scale[r] * down(silu(gate x) * (up x)),  x = x[tokens[r], :]
 * using h ([rows, 2*ffn]) and act ([rows, ffn]) as scratch, indexed by r. `self_rows[r] == r`. */
void moe_experts_f32(const float *x, int64_t hidden, int64_t ffn, const int64_t *tokens, const int64_t *dest, const float *scale,
                     const int64_t *self_rows, const int64_t *begin, const int64_t *end, const int64_t *gate_up,
                     const int64_t *down, int64_t groups, float *out, float *h, float *act, int threads) {
    int64_t up_rows = 2 * ffn;
#pragma omp parallel num_threads(threads)
    {
#pragma omp for schedule(static)
        for (int64_t i = 0; i < groups * up_rows; ++i) {
            int64_t g = i / up_rows, n = i % up_rows;
            const float *w = (const float *)gate_up[g] + n * hidden;
            if (i + 1 < groups * up_rows) prefetch_row((const float *)gate_up[(i + 1) / up_rows] + (i + 1) % up_rows * hidden, hidden);
            group_rows(w, hidden, begin[g], end[g], x, tokens, hidden, h + n, self_rows, up_rows, 0);
        }
#pragma omp for schedule(static)
        for (int64_t g = 0; g < groups; ++g)
            for (int64_t r = begin[g]; r < end[g]; ++r) {
                const float *gate = h + r * up_rows, *up = gate + ffn;
                float *a = act + r * ffn;
                for (int64_t f = 0; f < ffn; ++f) a[f] = gate[f] / (1.f + expf(-gate[f])) * up[f];
            }
#pragma omp for schedule(static)
        for (int64_t i = 0; i < groups * hidden; ++i) {
            int64_t g = i / hidden, n = i % hidden;
            const float *w = (const float *)down[g] + n * ffn;
            if (i + 1 < groups * hidden) prefetch_row((const float *)down[(i + 1) / hidden] + (i + 1) % hidden * ffn, ffn);
            group_rows(w, ffn, begin[g], end[g], act, self_rows, ffn, out + n, dest, hidden, scale);
        }
    }
}

/* Attention for decode steps (one new token per sequence) straight from the paged KV cache.
 *
 * q: [seqs, heads, head_dim]; k_cache, v_cache: [slots, kv_heads, head_dim]; sequence b attends
 * its context_lens[b] positions, whose cache slots are slots[b * slots_stride + t]. Query head h
 * reads kv head h / (heads / kv_heads). out: [seqs, heads, head_dim]; scratch: one row of
 * slots_stride floats per (sequence, head). Each (sequence, head) is computed on its own, so a
 * sequence's result does not depend on the others in the step. */
void paged_decode_attention_f32(const float *q, const float *k_cache, const float *v_cache, const int64_t *slots,
                                int64_t slots_stride, const int64_t *context_lens, int64_t seqs, int64_t heads,
                                int64_t kv_heads, int64_t head_dim, float scale, float *out, float *scratch,
                                int threads) {
    int64_t group = heads / kv_heads;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t i = 0; i < seqs * heads; ++i) {
        int64_t b = i / heads, h = i % heads, g = h / group, n = context_lens[b];
        const float *qi = q + i * head_dim;
        const int64_t *slot = slots + b * slots_stride;
        float *p = scratch + i * slots_stride, *o = out + i * head_dim;
        float top = -INFINITY, total = 0.f;
        for (int64_t t = 0; t < n; ++t) {
            p[t] = dot1(qi, k_cache + (slot[t] * kv_heads + g) * head_dim, head_dim) * scale;
            if (p[t] > top) top = p[t];
        }
        for (int64_t t = 0; t < n; ++t) {
            p[t] = expf(p[t] - top);
            total += p[t];
        }
        for (int64_t d = 0; d < head_dim; ++d) o[d] = 0.f;
        for (int64_t t = 0; t < n; ++t) {
            const float *v = v_cache + (slot[t] * kv_heads + g) * head_dim;
            float w = p[t] / total;
            for (int64_t d = 0; d < head_dim; ++d) o[d] = MADD(o[d], w, v[d]);
        }
    }
}
