/* CPU kernels for decode-sized batches, fp32 or bf16: a linear layer, the routed-expert FFN (both
 * also on int8 and 4-bit weights with integer dot products: Q8 and Q4 below), the attention of decode steps over the paged KV cache, RMSNorm, the rotary embedding and the
 * router's top-k with the grouping of assignments by expert.
 *
 * The linear layer and the experts read packed weights (see PACK below): blocks of 16 outputs
 * stored k-major, so one tile of up to TILE_ROWS activation rows streams a block once, with its
 * 2 x TILE_ROWS accumulators in registers and one broadcast per row and step; every output is one
 * chain of fused multiply-adds over k in order. Attention reads its key rows with dot_tile, the dot
 * products of up to TILE_W rows with up to TILE_X query rows, each in LANES independent partial
 * sums (lane l takes the elements k = l (mod LANES) in order) added as a fixed tree (lane_sum).
 * Either way every output element is summed in the same order whatever the number of rows, the
 * tile it falls in, or whether the vector or the scalar code computed it (the build uses
 * -ffp-contract=off, and MADD is an explicit fused multiply-add where the CPU has one), so a row's
 * result does not depend on the rows batched with it, nor on how experts are grouped into calls.
 * Work is split across OpenMP threads by output blocks or (sequence, kv head). */
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <omp.h>

#define LANES 16
#define TILE_W 2 /* key rows per attention tile */
#define KV_AHEAD 8 /* key/value rows fetched ahead in decode attention */
#define TILE_X 3 /* query rows per attention tile: 2 x TILE_W x TILE_X accumulators + TILE_W + 1 fit the 16 AVX registers */

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

/* Tensors are fp32 or bf16 (the `bf16` flags below); arithmetic is fp32. A bf16 value is the
 * upper half of the fp32 with the same bits, so widening is exact; narrowing rounds to nearest
 * even, as torch does. */
static inline float from_bf16(uint16_t half) {
    uint32_t bits = (uint32_t)half << 16;
    float v;
    __builtin_memcpy(&v, &bits, sizeof v);
    return v;
}

static inline float weight_at(const void *w, int bf16, int64_t i) {
    return bf16 ? from_bf16(((const uint16_t *)w)[i]) : ((const float *)w)[i];
}

static inline uint16_t to_bf16(float v) {
    uint32_t bits;
    __builtin_memcpy(&bits, &v, sizeof bits);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((bits >> 16) | 0x40);  /* NaN stays a (quiet) NaN */
    return (uint16_t)((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
}

/* v rounded to the precision of the tensor type (bf16 or fp32), as a float. */
static inline float rounded(float v, int bf16) {
    return bf16 ? from_bf16(to_bf16(v)) : v;
}

static inline void store_at(void *p, int bf16, int64_t i, float v) {
    if (bf16) ((uint16_t *)p)[i] = to_bf16(v);
    else ((float *)p)[i] = v;
}

/* rows x cols values of a (row stride ld) widened into a new contiguous fp32 buffer (free it). */
/* out[r * cols + c] = the bf16 value a[r * ld + c], for rows x cols values (split across threads when large). */
static void widen_into(const void *a, int64_t rows, int64_t cols, int64_t ld, float *out, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads) if (rows * cols > 65536)
    for (int64_t r = 0; r < rows; ++r)
        for (int64_t c = 0; c < cols; ++c) out[r * cols + c] = weight_at(a, 1, r * ld + c);
}

static float *widened(const void *a, int64_t rows, int64_t cols, int64_t ld) {
    float *out = malloc(sizeof(float) * (rows * cols > 0 ? rows * cols : 1));
    if (out) widen_into(a, rows, cols, ld, out, 1);
    return out;
}

/* As `widened`, into a scratch buffer of the calling thread that is kept and reused (it only
 * grows), so prefill-sized calls do not fault in fresh pages each time. Valid until the thread's
 * next call; NULL if it cannot grow. */
static float *widened_into_scratch(const void *a, int64_t rows, int64_t cols, int64_t ld, int threads) {
    static __thread float *scratch = NULL;
    static __thread int64_t capacity = 0;
    if (rows * cols > capacity) {
        float *grown = realloc(scratch, sizeof(float) * rows * cols);
        if (!grown) return NULL;
        scratch = grown, capacity = rows * cols;
    }
    widen_into(a, rows, cols, ld, scratch, threads);  /* a plain pointer: the OpenMP threads see their own thread-locals */
    return scratch;
}

static inline const void *weight_row(const void *w, int bf16, int64_t row, int64_t k) {
    return (const char *)w + row * k * (bf16 ? 2 : 4);
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

static inline __m256 load_weights8(const void *w, int bf16, int64_t i) {
    if (!bf16) return _mm256_loadu_ps((const float *)w + i);
    __m128i half = _mm_loadu_si128((const __m128i *)((const uint16_t *)w + i));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(half), 16));
}

/* s[r * lds + c] = dot(w[r], x[c]) for r < R <= TILE_W, c < C <= TILE_X. Inlined with constant R,
 * C and bf16, so the accumulators stay in registers. */
static inline __attribute__((always_inline)) void dot_tile(const void *const *w, int bf16, int R, const float *const *x,
                                                           int C, int64_t k, float *s, int64_t lds) {
    int64_t kv = k - k % LANES;
    __m256 acc[TILE_W][TILE_X][2];
    for (int r = 0; r < R; ++r)
        for (int c = 0; c < C; ++c) acc[r][c][0] = acc[r][c][1] = _mm256_setzero_ps();
    for (int64_t j = 0; j < kv; j += LANES)
        for (int h = 0; h < 2; ++h) {
            __m256 wv[TILE_W];
            for (int r = 0; r < R; ++r) wv[r] = load_weights8(w[r], bf16, j + 8 * h);
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
            for (int l = 0; l < k - kv; ++l) a[l] = MADD(a[l], weight_at(w[r], bf16, kv + l), x[c][kv + l]);
            s[r * lds + c] = lane_sum(a);
        }
}
#else
static float dot1(const void *w, int bf16, const float *x, int64_t k) {
    int64_t kv = k - k % LANES;
    float a[LANES] = {0};
    for (int64_t j = 0; j < kv; j += LANES)
        for (int l = 0; l < LANES; ++l) a[l] = MADD(a[l], weight_at(w, bf16, j + l), x[j + l]);
    for (int l = 0; l < k - kv; ++l) a[l] = MADD(a[l], weight_at(w, bf16, kv + l), x[kv + l]);  /* the tail: one more partial lane step */
    return lane_sum(a);
}

/* s[r * lds + c] = dot(w[r], x[c]) for r < R, c < C (portable: one dot product at a time). */
static void dot_tile(const void *const *w, int bf16, int R, const float *const *x, int C, int64_t k, float *s, int64_t lds) {
    for (int r = 0; r < R; ++r)
        for (int c = 0; c < C; ++c) s[r * lds + c] = dot1(w[r], bf16, x[c], k);
}
#endif

/* dot_tile for any R <= TILE_W and C <= TILE_X, dispatched to a constant-size instance. */
static inline __attribute__((always_inline)) void dot_tile_sized(const void *const *w, int bf16, int R, const float *const *x,
                                                                 int C, int64_t k, float *s) {
    if (R == 2) {
        if (C == 3) dot_tile(w, bf16, 2, x, 3, k, s, TILE_X);
        else if (C == 2) dot_tile(w, bf16, 2, x, 2, k, s, TILE_X);
        else dot_tile(w, bf16, 2, x, 1, k, s, TILE_X);
    } else {
        if (C == 3) dot_tile(w, bf16, 1, x, 3, k, s, TILE_X);
        else if (C == 2) dot_tile(w, bf16, 1, x, 2, k, s, TILE_X);
        else dot_tile(w, bf16, 1, x, 1, k, s, TILE_X);
    }
}

static void dot_tile_any(const void *const *w, int bf16, int R, const float *const *x, int C, int64_t k, float *s) {
    if (bf16) dot_tile_sized(w, 1, R, x, C, k, s);
    else dot_tile_sized(w, 0, R, x, C, k, s);
}

/* Starts loading `rows` rows of k values at row (the next ones, while the current ones are in use). */
static inline void prefetch_rows(const void *row, int bf16, int64_t k, int rows) {
    int64_t bytes = rows * k * (bf16 ? 2 : 4);
    for (int64_t c = 0; c < bytes; c += 64) __builtin_prefetch((const char *)row + c, 0, 0);
}

/* Packed weights. A weight matrix [n, k] (n outputs) is stored as ceil(n / PACK) blocks of PACK
 * outputs, each k-major: block[b][kk][j] = w[b * PACK + j][kk], zero rows padding n. One step of
 * kk reads one cache line of a block (fp32) and the blocks follow each other, so a product streams
 * the matrix front to back once per tile of up to TILE_ROWS activation rows. Output (r, j) is one
 * fused multiply-add chain over kk = 0 .. k-1 in order, whatever the number of rows, the tile the
 * row falls in, or whether the vector or the scalar code computed it. */
#define PACK 16
#define TILE_ROWS 6 /* 2 x TILE_ROWS accumulators + 2 weight vectors + 1 broadcast fit the 16 AVX registers */
#define PACK_AHEAD 64 /* block rows (cache lines, fp32) fetched ahead of use */
#define WIDEN_ROWS (4 * TILE_ROWS) /* a bf16 block read by more rows than this is widened to fp32 once */

static inline const void *block_at(const void *w, int bf16, int64_t b, int64_t k) {
    return (const char *)w + b * k * PACK * (bf16 ? 2 : 4);
}

#if defined(__AVX2__) && defined(__FMA__)
/* acc[r][j] = sum_kk x[r][kk] * block[kk][j] for r < R (constant after inlining). */
static inline __attribute__((always_inline)) void block_tile(const void *block, int bf16, int64_t k, const float *const *x,
                                                             int R, float acc_out[TILE_ROWS][PACK]) {
    __m256 acc[TILE_ROWS][2];
#pragma GCC unroll 6
    for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
    for (int64_t kk = 0; kk < k; ++kk) {
        __builtin_prefetch((const char *)block + (kk + PACK_AHEAD) * PACK * (bf16 ? 2 : 4), 0, 3);
        __m256 w0 = load_weights8(block, bf16, kk * PACK), w1 = load_weights8(block, bf16, kk * PACK + 8);
#pragma GCC unroll 6
        for (int r = 0; r < R; ++r) {
            __m256 xv = _mm256_broadcast_ss(x[r] + kk);
            acc[r][0] = _mm256_fmadd_ps(w0, xv, acc[r][0]);
            acc[r][1] = _mm256_fmadd_ps(w1, xv, acc[r][1]);
        }
    }
#pragma GCC unroll 6
    for (int r = 0; r < R; ++r) {
        _mm256_storeu_ps(acc_out[r], acc[r][0]);
        _mm256_storeu_ps(acc_out[r] + 8, acc[r][1]);
    }
}
#else
static inline void block_tile(const void *block, int bf16, int64_t k, const float *const *x, int R,
                              float acc_out[TILE_ROWS][PACK]) {
    for (int r = 0; r < R; ++r)
        for (int j = 0; j < PACK; ++j) {
            float a = 0.f;
            for (int64_t kk = 0; kk < k; ++kk) a = MADD(a, weight_at(block, bf16, kk * PACK + j), x[r][kk]);
            acc_out[r][j] = a;
        }
}
#endif

/* block_tile for any R <= TILE_ROWS, dispatched to a constant-size instance. */
static void block_tile_any(const void *block, int bf16, int64_t k, const float *const *x, int R, float acc[TILE_ROWS][PACK]) {
#define TILE_CASE(n) \
    case n: \
        if (bf16) block_tile(block, 1, k, x, n, acc); \
        else block_tile(block, 0, k, x, n, acc); \
        break;
    switch (R) {
        TILE_CASE(1) TILE_CASE(2) TILE_CASE(3) TILE_CASE(4) TILE_CASE(5) default: TILE_CASE(6)
    }
#undef TILE_CASE
}

/* Weight kinds (engine/model/quant.py WeightKind): fp32 and bf16 run the blocks above; INT8 (Q8 below)
 * and the 4-bit INT4 and MXFP4 (Q4 below) run integer dot products. */
enum { KIND_FP32 = 0, KIND_BF16 = 1, KIND_INT8 = 2, KIND_INT4 = 3, KIND_MXFP4 = 4 };

/* One packed fp32 or bf16 block (outputs b * PACK .. b * PACK + cols - 1, k steps) against the activation rows [begin, end):
 * y[y_row(i) * ldy + j] = scale(i) * dot(w[j], x[x_row(i)]), or dot + bias[j] with a bias and no scale,
 * for j < cols, where a NULL x_row, y_row is the identity and a NULL scale is 1. x rows are ldx floats
 * apart; y is fp32, or bf16 where y_bf16 != 0 (each result rounded once). */
static void block_rows(const void *block, int bf16, int64_t k, int cols, int64_t begin, int64_t end, const float *x,
                       const int64_t *x_row, int64_t ldx, void *y, int y_bf16, const int64_t *y_row, int64_t ldy,
                       const float *scale, const float *bias) {
    float acc[TILE_ROWS][PACK];
    float *wide = NULL;
    if (bf16 && end - begin > WIDEN_ROWS && (wide = malloc(sizeof(float) * k * PACK))) {
        /* many tiles will read this block: widen it once (the same values, so the same bits) */
        widen_into(block, 1, k * PACK, k * PACK, wide, 1);
        block = wide, bf16 = 0;
    }
    for (int64_t i = begin; i < end; i += TILE_ROWS) {
        int R = end - i < TILE_ROWS ? (int)(end - i) : TILE_ROWS;
        const float *xs[TILE_ROWS];
        for (int r = 0; r < R; ++r) xs[r] = x + (x_row ? x_row[i + r] : i + r) * ldx;
        block_tile_any(block, bf16, k, xs, R, acc);
        for (int r = 0; r < R; ++r) {
            int64_t yi = (y_row ? y_row[i + r] : i + r) * ldy;
            float s = scale ? scale[i + r] : 1.f;
            if (scale)
                for (int j = 0; j < cols; ++j) store_at(y, y_bf16, yi + j, acc[r][j] * s);
            else if (bias)
                for (int j = 0; j < cols; ++j) store_at(y, y_bf16, yi + j, acc[r][j] + bias[j]);
            else
                for (int j = 0; j < cols; ++j) store_at(y, y_bf16, yi + j, acc[r][j]);
        }
    }
    free(wide);
}

#define ITEMS_PER_THREAD 4 /* a linear layer splits its rows into chunks only when the blocks are fewer */

/* How many rows a chunk of a linear layer's work items (block, chunk of rows) holds, for m rows over
 * `blocks` output blocks: whole tiles, and more than one chunk only where the blocks are too few. */
static int64_t chunk_rows_for(int64_t blocks, int64_t m, int threads, int tile) {
    int64_t wanted = (int64_t)ITEMS_PER_THREAD * threads;
    int64_t chunks = blocks >= wanted ? 1 : (wanted + blocks - 1) / blocks;
    int64_t rows = (m + chunks - 1) / chunks;
    return (rows + tile - 1) / tile * tile;
}

/* y[i, o] = sum_kk x[i, kk] * w[o, kk] (+ bias[o]) for o < n, i < m, with w packed fp32 or bf16 weights
 * ([ceil(n / PACK)] blocks of [k][PACK], in the type of x); x: [m, k], row stride ldx; y: [m, n], row
 * stride ldy; bias: [n] or NULL. x, y and bias are fp32, or bf16 where bf16 != 0: then the products are
 * summed in fp32 and each result (with its bias) rounded once. Work items are (block, chunk of rows),
 * block-major, split across threads in contiguous runs, so a decode step's threads each stream their
 * part of w once. Returns 0, or -1 if scratch memory ran out. */
int linear(const void *w, const void *bias, const void *x, void *y, int bf16, int64_t n, int64_t k, int64_t m, int64_t ldx,
           int64_t ldy, int threads) {
    int64_t blocks = (n + PACK - 1) / PACK, chunk_rows = chunk_rows_for(blocks, m, threads, TILE_ROWS);
    int64_t chunks = (m + chunk_rows - 1) / chunk_rows;
    const float *xw = bf16 ? widened_into_scratch(x, m, k, ldx, threads) : (const float *)x;
    float *bw = bias ? malloc(sizeof(float) * n) : NULL;
    if (!xw || (bias && !bw)) {
        free(bw);
        return -1;
    }
    for (int64_t o = 0; bias && o < n; ++o) bw[o] = weight_at(bias, bf16, o);
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t item = 0; item < blocks * chunks; ++item) {
        int64_t b = item / chunks, begin = item % chunks * chunk_rows, end = begin + chunk_rows < m ? begin + chunk_rows : m;
        int cols = n - b * PACK < PACK ? (int)(n - b * PACK) : PACK;
        void *yb = (char *)y + b * PACK * (bf16 ? 2 : 4);
        block_rows(block_at(w, bf16, b, k), bf16, k, cols, begin, end, xw, NULL, bf16 ? k : ldx, yb, bf16, NULL, ldy, NULL,
                   bw ? bw + b * PACK : NULL);
    }
    free(bw);
    return 0;
}

/* Q8: int8 weights (INT8, dense layers and experts; engine/model/quant.py) with integer dot products. A
 * [n, k] matrix is stored as ceil(n / PACK) blocks of [ceil(k / 4)][PACK][4] int8 codes: per step of 4
 * inputs the PACK outputs' 4 codes side by side (64 bytes, one 512-bit vector; zero padded), with an
 * fp32 scale and the int32 sum of the codes of each output. Activations are quantized per row on the fly,
 * q = round(x / s) with s = max|x| / 127 (all 0 for a zero row), and output (r, j) is
 *     ((float)(sum_kk q[r][kk] * code[j][kk]) * scale[j]) * s[r]  (+ bias[j]),
 * rounded once to bf16 where the activations are bf16. The integer sum is exact, so each kernel
 * (AVX512-VNNI vpdpbusd, AVX2 vpmaddubsw, portable C) gives the same bits whatever the rows batched. */
#define Q8_STEP 4      /* inputs per 32-bit lane of a dot-product instruction */
#define Q8_TILE 8      /* activation rows per tile */
#define Q8_AHEAD 16    /* steps (64-byte lines) fetched ahead */

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define Q8_OFFSET 128  /* vpdpbusd multiplies unsigned by signed bytes: activations are stored as q + 128 */
#else
#define Q8_OFFSET 0
#endif

/* Which int8 dot-product kernel this build runs: 2 AVX512-VNNI, 1 AVX2, 0 portable C. */
int q8_kernel(void) {
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
    return 2;
#elif defined(__AVX2__)
    return 1;
#else
    return 0;
#endif
}

/* One row x (k values, fp32 or bf16) as k4 * Q8_STEP codes q + offset (zero padded), and its scale. */
static void quantize_row(const void *x, int bf16, int64_t k, int64_t k4, uint8_t *q, float *s, int offset) {
    float top = 0.f;
    for (int64_t kk = 0; kk < k; ++kk) {
        float v = fabsf(weight_at(x, bf16, kk));
        if (v > top) top = v;
    }
    float scale = top / 127.f;
    for (int64_t kk = 0; kk < k4 * Q8_STEP; ++kk) {
        int code = kk < k && scale > 0.f ? (int)nearbyintf(weight_at(x, bf16, kk) / scale) : 0;
        code = code > 127 ? 127 : code < -127 ? -127 : code;
        q[kk] = (uint8_t)(code + offset);
    }
    *s = scale;
}

static inline int32_t load_i32(const uint8_t *p) {
    int32_t v;
    __builtin_memcpy(&v, p, sizeof v);
    return v;
}

/* acc[r][j] = sum_kk q[r][kk] * code[j][kk] for the block's PACK outputs, r < R (constant after inlining). */
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
static inline __attribute__((always_inline)) void q8_tile(const int8_t *block, const int32_t *sums, int64_t k4,
                                                          const uint8_t *const *q, int R, int32_t acc_out[Q8_TILE][PACK]) {
    __m512i acc[Q8_TILE];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_si512();
    for (int64_t s = 0; s < k4; ++s) {
        __builtin_prefetch(block + (s + Q8_AHEAD) * Q8_STEP * PACK, 0, 3);
        __m512i w = _mm512_loadu_si512(block + s * Q8_STEP * PACK);
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r) acc[r] = _mm512_dpbusd_epi32(acc[r], _mm512_set1_epi32(load_i32(q[r] + s * Q8_STEP)), w);
    }
    __m512i offset = _mm512_mullo_epi32(_mm512_loadu_si512(sums), _mm512_set1_epi32(Q8_OFFSET));  /* sum (q + 128) w - 128 sum w */
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) _mm512_storeu_si512(acc_out[r], _mm512_sub_epi32(acc[r], offset));
}
#elif defined(__AVX2__)
static inline __attribute__((always_inline)) void q8_tile(const int8_t *block, const int32_t *sums, int64_t k4,
                                                          const uint8_t *const *q, int R, int32_t acc_out[Q8_TILE][PACK]) {
    (void)sums;
    const __m256i ones = _mm256_set1_epi16(1);
    __m256i acc[Q8_TILE][2];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_si256();
    for (int64_t s = 0; s < k4; ++s) {
        __builtin_prefetch(block + (s + Q8_AHEAD) * Q8_STEP * PACK, 0, 3);
        __m256i w0 = _mm256_loadu_si256((const __m256i *)(block + s * Q8_STEP * PACK));
        __m256i w1 = _mm256_loadu_si256((const __m256i *)(block + s * Q8_STEP * PACK + 32));
        __m256i a0 = _mm256_abs_epi8(w0), a1 = _mm256_abs_epi8(w1);  /* |code| x (q with code's sign): pairs fit int16 */
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r) {
            __m256i xv = _mm256_set1_epi32(load_i32(q[r] + s * Q8_STEP));
            __m256i p0 = _mm256_maddubs_epi16(a0, _mm256_sign_epi8(xv, w0));
            __m256i p1 = _mm256_maddubs_epi16(a1, _mm256_sign_epi8(xv, w1));
            acc[r][0] = _mm256_add_epi32(acc[r][0], _mm256_madd_epi16(p0, ones));
            acc[r][1] = _mm256_add_epi32(acc[r][1], _mm256_madd_epi16(p1, ones));
        }
    }
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
        _mm256_storeu_si256((__m256i *)acc_out[r], acc[r][0]);
        _mm256_storeu_si256((__m256i *)(acc_out[r] + 8), acc[r][1]);
    }
}
#else
static inline void q8_tile(const int8_t *block, const int32_t *sums, int64_t k4, const uint8_t *const *q, int R,
                           int32_t acc_out[Q8_TILE][PACK]) {
    (void)sums;
    for (int r = 0; r < R; ++r)
        for (int j = 0; j < PACK; ++j) {
            int32_t a = 0;
            for (int64_t s = 0; s < k4; ++s)
                for (int i = 0; i < Q8_STEP; ++i)
                    a += (int32_t)(int8_t)(q[r][s * Q8_STEP + i] - Q8_OFFSET) * block[(s * PACK + j) * Q8_STEP + i];
            acc_out[r][j] = a;
        }
}
#endif

/* q8_tile for any R <= Q8_TILE, dispatched to a constant-size instance. */
static void q8_tile_any(const int8_t *block, const int32_t *sums, int64_t k4, const uint8_t *const *q, int R,
                        int32_t acc[Q8_TILE][PACK]) {
    switch (R) {
        case 1: q8_tile(block, sums, k4, q, 1, acc); break;
        case 2: q8_tile(block, sums, k4, q, 2, acc); break;
        case 3: q8_tile(block, sums, k4, q, 3, acc); break;
        case 4: q8_tile(block, sums, k4, q, 4, acc); break;
        case 5: q8_tile(block, sums, k4, q, 5, acc); break;
        case 6: q8_tile(block, sums, k4, q, 6, acc); break;
        case 7: q8_tile(block, sums, k4, q, 7, acc); break;
        default: q8_tile(block, sums, k4, q, 8, acc); break;
    }
}

/* Block b (outputs b * PACK .. b * PACK + cols - 1) of an int8 matrix with k4 steps (codes w, scales
 * ws, code sums sums: the whole matrix's) against the quantized activation rows [begin, end):
 * y[y_row(i) * ldy + j] = ((float)dot * ws[j]) * qs[x_row(i)], then times scale(i), or plus bias[j] with
 * a bias and no scale, for j < cols; q rows are k4 * Q8_STEP bytes apart; a NULL x_row, y_row is the
 * identity. y is fp32, or bf16 where y_bf16 != 0 (each result rounded once). */
static void q8_block_rows(const int8_t *w, const float *ws, const int32_t *sums, int64_t b, int64_t k4, int cols,
                          int64_t begin, int64_t end, const uint8_t *q, const float *qs, const int64_t *x_row, void *y,
                          int y_bf16, const int64_t *y_row, int64_t ldy, const float *scale, const float *bias) {
    const int8_t *block = w + b * k4 * Q8_STEP * PACK;
    ws += b * PACK, sums += b * PACK;
    int32_t acc[Q8_TILE][PACK];
    for (int64_t i = begin; i < end; i += Q8_TILE) {
        int R = end - i < Q8_TILE ? (int)(end - i) : Q8_TILE;
        const uint8_t *rows[Q8_TILE];
        for (int r = 0; r < R; ++r) rows[r] = q + (x_row ? x_row[i + r] : i + r) * k4 * Q8_STEP;
        q8_tile_any(block, sums, k4, rows, R, acc);
        for (int r = 0; r < R; ++r) {
            int64_t yi = (y_row ? y_row[i + r] : i + r) * ldy + b * PACK;
            float row_scale = qs[x_row ? x_row[i + r] : i + r];
            for (int j = 0; j < cols; ++j) {
                float v = (float)acc[r][j] * ws[j] * row_scale;
                if (scale) v *= scale[i + r];
                else if (bias) v += bias[j];
                store_at(y, y_bf16, yi + j, v);
            }
        }
    }
}

/* y[i, o] = the int8 product above (+ bias[o]) for o < n, i < m: w the codes ([ceil(n / PACK)] blocks
 * of [ceil(k / 4)][PACK][4]), scale and sums [ceil(n / PACK) * PACK]; x: [m, k], row stride ldx; y:
 * [m, n], row stride ldy; bias [n] or NULL; x, y and bias fp32, or bf16 where bf16 != 0. Work items as
 * in linear_blocks. Returns 0, or -1 if scratch memory ran out. */
int linear_q8(const int8_t *w, const float *scale, const int32_t *sums, const void *bias, const void *x, void *y, int bf16,
              int64_t n, int64_t k, int64_t m, int64_t ldx, int64_t ldy, int threads) {
    int64_t blocks = (n + PACK - 1) / PACK, k4 = (k + Q8_STEP - 1) / Q8_STEP;
    int64_t chunk_rows = chunk_rows_for(blocks, m, threads, Q8_TILE), chunks = (m + chunk_rows - 1) / chunk_rows;
    uint8_t *q = malloc((size_t)(m * k4 * Q8_STEP));
    float *xs = malloc(sizeof(float) * m), *bw = bias ? malloc(sizeof(float) * n) : NULL;
    if (!q || !xs || (bias && !bw)) {
        free(q), free(xs), free(bw);
        return -1;
    }
    for (int64_t o = 0; bias && o < n; ++o) bw[o] = weight_at(bias, bf16, o);
#pragma omp parallel num_threads(threads)
    {
#pragma omp for schedule(static)
        for (int64_t r = 0; r < m; ++r)
            quantize_row((const char *)x + r * ldx * (bf16 ? 2 : 4), bf16, k, k4, q + r * k4 * Q8_STEP, xs + r, Q8_OFFSET);
#pragma omp for schedule(static)
        for (int64_t item = 0; item < blocks * chunks; ++item) {
            int64_t b = item / chunks, begin = item % chunks * chunk_rows, end = begin + chunk_rows < m ? begin + chunk_rows : m;
            int cols = n - b * PACK < PACK ? (int)(n - b * PACK) : PACK;
            q8_block_rows(w, scale, sums, b, k4, cols, begin, end, q, xs, NULL, y, bf16, NULL, ldy, NULL,
                          bw ? bw + b * PACK : NULL);
        }
    }
    free(q), free(xs), free(bw);
    return 0;
}

/* Q4: 4-bit weights (INT4 and MXFP4: experts and INT4 dense layers; engine/model/quant.py) with the
 * same integer dot products. A [n, k] matrix is stored as ceil(n / PACK) blocks of [ceil(k / 8)][64]
 * bytes: per step of Q4_STEP = 8 inputs, byte 4 j + i holds output j's code for input i in its low
 * nibble and for input 4 + i in its high one (zero padded), so one 64-byte load widens (mask, shift)
 * to the [PACK][4] byte vectors of two dot-product steps. Per group of `group` inputs each output has
 * a scale (INT4: fp16; MXFP4: e8m0) and INT4 a zero point z (uint8, or 8 without). The codes enter the
 * products as unsigned bytes u: INT4 the code itself (weight (u - z) * scale); MXFP4 through a
 * 16-entry table, u = 2 x E2M1 value + 12 in 0..24 (a byte shuffle; weight (u - 12) * 2^(e - 128)).
 * Activations are quantized per row as Q8's but stay signed (the signed operand), and each row keeps
 * the sum of its codes per group, so per (row, output, group)
 *     d = sum_kk u * q - z * sum_kk q = sum_kk (u - z) * q   (exact in int32)
 * and output (r, j) = (the groups in order: total = total + (float)d * scale) * s[r]  (+ bias[j]), each
 * product and sum rounded on its own, so every kernel (AVX512-VNNI vpdpbusd, AVX2 vpmaddubsw +
 * vpmaddwd, portable C) gives the same bits whatever the rows batched. */
#define Q4_STEP 8       /* inputs per 64-byte step */
#define Q4_TILE 8       /* activation rows per tile */
#define Q4_AHEAD 8      /* steps (64-byte lines) fetched ahead */
#define MXFP4_ZERO 12   /* the MXFP4 table's offset */

static const uint8_t MXFP4_CODES[16] = {12, 13, 14, 15, 16, 18, 20, 24, 12, 11, 10, 9, 8, 6, 4, 0};  /* 2 x E2M1 + 12 */

/* One block of a 4-bit matrix: its codes and its groups' scales and zero points (NULL: none). */
typedef struct {
    const uint8_t *w;    /* [k8][64] */
    const void *scale;   /* INT4: fp16 [groups][PACK]; MXFP4: uint8 [groups][PACK] */
    const uint8_t *zero; /* INT4 with zero points: [groups][PACK] */
    int64_t group;       /* inputs per scale (a multiple of Q4_STEP) */
} q4block;

static inline float from_fp16(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu, bits;
    if (exp == 0x1f) bits = sign | 0x7f800000u | (man << 13);  /* inf / NaN */
    else if (exp) bits = sign | ((exp + 112) << 23) | (man << 13);
    else if (!man) bits = sign;
    else {  /* subnormal: normalise */
        exp = 113;
        while (!(man & 0x400u)) man <<= 1, --exp;
        bits = sign | (exp << 23) | ((man & 0x3ffu) << 13);
    }
    float v;
    __builtin_memcpy(&v, &bits, sizeof v);
    return v;
}

/* 2^(e - 128), the MXFP4 scale of the doubled table values: the exponent field (e = 0: the subnormal
 * 2^-127) halved, exact. */
static inline float mxfp4_scale(uint8_t e) {
    uint32_t bits = e ? (uint32_t)e << 23 : 0x00400000u;
    float v;
    __builtin_memcpy(&v, &bits, sizeof v);
    return v * 0.5f;
}

/* Group g's scale and zero point of output j. */
static inline float q4_scale(const q4block *b, int kind, int64_t g, int j) {
    int64_t i = g * PACK + j;
    return kind == KIND_INT4 ? from_fp16(((const uint16_t *)b->scale)[i]) : mxfp4_scale(((const uint8_t *)b->scale)[i]);
}

static inline int32_t q4_zero(const q4block *b, int kind, int64_t g, int j) {
    return b->zero ? b->zero[g * PACK + j] : kind == KIND_INT4 ? 8 : MXFP4_ZERO;
}

/* acc[r][j] = the output (r, j) above before the row scale, for r < R (constant after inlining); q[r]
 * is row r's codes (k8 * Q4_STEP), qsum[r] its sums per group. */
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
static inline __attribute__((always_inline)) void q4_tile(const q4block *b, int kind, int64_t k8, const int8_t *const *q,
                                                          const int32_t *const *qsum, int R, float acc_out[Q4_TILE][PACK]) {
    const __m512i low = _mm512_set1_epi8(0x0f);
    const __m512i table = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)MXFP4_CODES));
    const int64_t per_group = b->group / Q4_STEP;
    __m512 total[Q4_TILE];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) total[r] = _mm512_setzero_ps();
    for (int64_t g = 0, t0 = 0; t0 < k8; ++g, t0 += per_group) {
        int64_t t1 = t0 + per_group < k8 ? t0 + per_group : k8;
        __m512i lo_acc[Q4_TILE], hi_acc[Q4_TILE];
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r) lo_acc[r] = hi_acc[r] = _mm512_setzero_si512();
        for (int64_t t = t0; t < t1; ++t) {
            __builtin_prefetch(b->w + (t + Q4_AHEAD) * 64, 0, 3);
            __m512i v = _mm512_loadu_si512(b->w + t * 64);
            __m512i lo = _mm512_and_si512(v, low), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
            if (kind == KIND_MXFP4) lo = _mm512_shuffle_epi8(table, lo), hi = _mm512_shuffle_epi8(table, hi);
#pragma GCC unroll 8
            for (int r = 0; r < R; ++r) {
                const uint8_t *qr = (const uint8_t *)q[r] + t * Q4_STEP;
                lo_acc[r] = _mm512_dpbusd_epi32(lo_acc[r], lo, _mm512_set1_epi32(load_i32(qr)));
                hi_acc[r] = _mm512_dpbusd_epi32(hi_acc[r], hi, _mm512_set1_epi32(load_i32(qr + 4)));
            }
        }
        __m512 scale;
        __m512i zero;
        if (kind == KIND_INT4) {
            scale = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)((const uint16_t *)b->scale + g * PACK)));
            zero = b->zero ? _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(b->zero + g * PACK))) : _mm512_set1_epi32(8);
        } else {
            __m512i e = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)((const uint8_t *)b->scale + g * PACK)));
            __m512i bits = _mm512_mask_mov_epi32(_mm512_slli_epi32(e, 23), _mm512_cmpeq_epi32_mask(e, _mm512_setzero_si512()),
                                                 _mm512_set1_epi32(0x00400000));
            scale = _mm512_mul_ps(_mm512_castsi512_ps(bits), _mm512_set1_ps(0.5f));
            zero = _mm512_set1_epi32(MXFP4_ZERO);
        }
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r) {
            __m512i d = _mm512_sub_epi32(_mm512_add_epi32(lo_acc[r], hi_acc[r]),
                                         _mm512_mullo_epi32(zero, _mm512_set1_epi32(qsum[r][g])));
            total[r] = _mm512_add_ps(total[r], _mm512_mul_ps(_mm512_cvtepi32_ps(d), scale));
        }
    }
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) _mm512_storeu_ps(acc_out[r], total[r]);
}
#elif defined(__AVX2__) && defined(__F16C__)
static inline __attribute__((always_inline)) void q4_tile(const q4block *b, int kind, int64_t k8, const int8_t *const *q,
                                                          const int32_t *const *qsum, int R, float acc_out[Q4_TILE][PACK]) {
    const __m256i low = _mm256_set1_epi8(0x0f), ones = _mm256_set1_epi16(1);
    const __m256i table = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)MXFP4_CODES));
    const int64_t per_group = b->group / Q4_STEP;
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r)
        for (int j = 0; j < PACK; ++j) acc_out[r][j] = 0.f;
    for (int64_t g = 0, t0 = 0; t0 < k8; ++g, t0 += per_group) {
        int64_t t1 = t0 + per_group < k8 ? t0 + per_group : k8;
        __m256i acc[Q4_TILE][2];
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_si256();
        for (int64_t t = t0; t < t1; ++t) {
            __builtin_prefetch(b->w + (t + Q4_AHEAD) * 64, 0, 3);
            for (int h = 0; h < 2; ++h) {  /* outputs 8 h .. 8 h + 7 */
                __m256i v = _mm256_loadu_si256((const __m256i *)(b->w + t * 64 + 32 * h));
                __m256i lo = _mm256_and_si256(v, low), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
                if (kind == KIND_MXFP4) lo = _mm256_shuffle_epi8(table, lo), hi = _mm256_shuffle_epi8(table, hi);
#pragma GCC unroll 8
                for (int r = 0; r < R; ++r) {  /* u * q pairs fit int16: |2 x 24 x 127| x 2 < 2^15 */
                    const uint8_t *qr = (const uint8_t *)q[r] + t * Q4_STEP;
                    __m256i pairs = _mm256_add_epi16(_mm256_maddubs_epi16(lo, _mm256_set1_epi32(load_i32(qr))),
                                                     _mm256_maddubs_epi16(hi, _mm256_set1_epi32(load_i32(qr + 4))));
                    acc[r][h] = _mm256_add_epi32(acc[r][h], _mm256_madd_epi16(pairs, ones));
                }
            }
        }
        for (int h = 0; h < 2; ++h) {
            int64_t i = g * PACK + 8 * h;
            __m256 scale;
            __m256i zero;
            if (kind == KIND_INT4) {
                scale = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)b->scale + i)));
                zero = b->zero ? _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(b->zero + i))) : _mm256_set1_epi32(8);
            } else {
                __m256i e = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)((const uint8_t *)b->scale + i)));
                __m256i bits = _mm256_blendv_epi8(_mm256_slli_epi32(e, 23), _mm256_set1_epi32(0x00400000),
                                                  _mm256_cmpeq_epi32(e, _mm256_setzero_si256()));
                scale = _mm256_mul_ps(_mm256_castsi256_ps(bits), _mm256_set1_ps(0.5f));
                zero = _mm256_set1_epi32(MXFP4_ZERO);
            }
#pragma GCC unroll 8
            for (int r = 0; r < R; ++r) {
                __m256i d = _mm256_sub_epi32(acc[r][h], _mm256_mullo_epi32(zero, _mm256_set1_epi32(qsum[r][g])));
                __m256 sum = _mm256_add_ps(_mm256_loadu_ps(acc_out[r] + 8 * h), _mm256_mul_ps(_mm256_cvtepi32_ps(d), scale));
                _mm256_storeu_ps(acc_out[r] + 8 * h, sum);
            }
        }
    }
}
#else
static inline void q4_tile(const q4block *b, int kind, int64_t k8, const int8_t *const *q, const int32_t *const *qsum, int R,
                           float acc_out[Q4_TILE][PACK]) {
    for (int r = 0; r < R; ++r)
        for (int j = 0; j < PACK; ++j) acc_out[r][j] = 0.f;
    for (int64_t g = 0, k0 = 0; k0 < k8 * Q4_STEP; ++g, k0 += b->group) {
        int64_t k1 = k0 + b->group < k8 * Q4_STEP ? k0 + b->group : k8 * Q4_STEP;
        for (int j = 0; j < PACK; ++j) {
            float scale = q4_scale(b, kind, g, j);
            int32_t zero = q4_zero(b, kind, g, j);
            for (int r = 0; r < R; ++r) {
                int32_t d = 0;
                for (int64_t kk = k0; kk < k1; ++kk) {
                    uint8_t byte = b->w[kk / Q4_STEP * 64 + j * 4 + kk % 4];
                    int code = kk % Q4_STEP < 4 ? byte & 0x0f : byte >> 4;
                    d += (kind == KIND_MXFP4 ? MXFP4_CODES[code] : code) * q[r][kk];
                }
                d -= zero * qsum[r][g];
                acc_out[r][j] = acc_out[r][j] + (float)d * scale;
            }
        }
    }
}
#endif

/* q4_tile for any R <= Q4_TILE and 4-bit kind, dispatched to a constant-size instance. */
static void q4_tile_any(const q4block *b, int kind, int64_t k8, const int8_t *const *q, const int32_t *const *qsum, int R,
                        float acc[Q4_TILE][PACK]) {
#define Q4_KIND(n, kind) \
    case kind: q4_tile(b, kind, k8, q, qsum, n, acc); break;
#define Q4_CASE(n) \
    case n: \
        switch (kind) { Q4_KIND(n, KIND_INT4) default: Q4_KIND(n, KIND_MXFP4) } \
        break;
    switch (R) {
        Q4_CASE(1) Q4_CASE(2) Q4_CASE(3) Q4_CASE(4) Q4_CASE(5) Q4_CASE(6) Q4_CASE(7) default: Q4_CASE(8)
    }
#undef Q4_CASE
#undef Q4_KIND
}

/* Block b of a 4-bit [n, k] matrix whose stored tensors sit at addresses m[0..2] (codes, scales, zero
 * points or 0), `group` inputs per scale. */
static q4block q4_block(const int64_t *m, int kind, int64_t group, int64_t b, int64_t k) {
    int64_t k8 = (k + Q4_STEP - 1) / Q4_STEP, groups = (k + group - 1) / group;
    q4block wb = {(const uint8_t *)m[0] + b * k8 * 64, (const char *)m[1] + b * groups * PACK * (kind == KIND_INT4 ? 2 : 1),
                  m[2] ? (const uint8_t *)m[2] + b * groups * PACK : NULL, group};
    return wb;
}

/* Activation rows quantized for a kind's dot products: row r's codes at q + r * bytes (Q8: offset to
 * unsigned where the kernel wants it; Q4: signed), its scale s[r], and (Q4) its code sums per group at
 * sums + r * groups. */
typedef struct {
    uint8_t *q;
    int32_t *sums;
    float *s;
    int64_t bytes, groups;
} qrows;

/* Scratch for `rows` rows of k inputs for kind (INT8 or 4-bit, `group` inputs per scale); q NULL if
 * memory ran out (free it with qrows_free either way). */
static qrows qrows_new(int kind, int64_t rows, int64_t k, int64_t group) {
    int64_t step = kind == KIND_INT8 ? Q8_STEP : Q4_STEP;
    qrows a = {NULL, NULL, NULL, (k + step - 1) / step * step, kind == KIND_INT8 ? 0 : (k + group - 1) / group};
    a.q = malloc((size_t)(rows * a.bytes + 1));
    a.sums = malloc(sizeof(int32_t) * (size_t)(rows * a.groups + 1));
    a.s = malloc(sizeof(float) * (size_t)(rows + 1));
    if (!a.sums || !a.s) free(a.q), a.q = NULL;
    return a;
}

static void qrows_free(qrows *a) {
    free(a->q), free(a->sums), free(a->s);
}

/* Row r of `a` from x (k values, fp32 or bf16), for kind with `group` inputs per scale. */
static void qrows_set(qrows *a, int kind, int64_t r, const void *x, int bf16, int64_t k, int64_t group) {
    uint8_t *q = a->q + r * a->bytes;
    if (kind == KIND_INT8) {
        quantize_row(x, bf16, k, a->bytes / Q8_STEP, q, a->s + r, Q8_OFFSET);
        return;
    }
    quantize_row(x, bf16, k, a->bytes / Q8_STEP, q, a->s + r, 0);
    for (int64_t g = 0; g < a->groups; ++g) {
        int32_t sum = 0;
        for (int64_t kk = g * group; kk < (g + 1) * group && kk < a->bytes; ++kk) sum += (int8_t)q[kk];
        a->sums[r * a->groups + g] = sum;
    }
}

/* Block b (outputs b * PACK .. b * PACK + cols - 1) of a 4-bit matrix (`wb`, k8 steps) against the
 * quantized rows [begin, end) of `a`: y[y_row(i) * ldy + b * PACK + j] = acc * s[x_row(i)], then times
 * scale(i), or plus bias[j] with a bias and no scale, for j < cols (a NULL x_row, y_row is the
 * identity); y is fp32, or bf16 where y_bf16 != 0 (each result rounded once). */
static void q4_block_rows(const q4block *wb, int kind, int64_t b, int64_t k8, int cols, int64_t begin, int64_t end,
                          const qrows *a, const int64_t *x_row, void *y, int y_bf16, const int64_t *y_row, int64_t ldy,
                          const float *scale, const float *bias) {
    float acc[Q4_TILE][PACK];
    for (int64_t i = begin; i < end; i += Q4_TILE) {
        int R = end - i < Q4_TILE ? (int)(end - i) : Q4_TILE;
        const int8_t *rows[Q4_TILE];
        const int32_t *sums[Q4_TILE];
        for (int r = 0; r < R; ++r) {
            int64_t x = x_row ? x_row[i + r] : i + r;
            rows[r] = (const int8_t *)(a->q + x * a->bytes), sums[r] = a->sums + x * a->groups;
        }
        q4_tile_any(wb, kind, k8, rows, sums, R, acc);
        for (int r = 0; r < R; ++r) {
            int64_t yi = (y_row ? y_row[i + r] : i + r) * ldy + b * PACK;
            float row_scale = a->s[x_row ? x_row[i + r] : i + r];
            for (int j = 0; j < cols; ++j) {
                float v = acc[r][j] * row_scale;
                if (scale) v *= scale[i + r];
                else if (bias) v += bias[j];
                store_at(y, y_bf16, yi + j, v);
            }
        }
    }
}

/* A linear layer over 4-bit weights (INT4 or MXFP4, `group` inputs per scale; matrix[0..2]: codes,
 * scales, zero points or 0) with integer dot products (Q4 above): y[i, o] for o < n, i < m; x: [m, k],
 * row stride ldx; y: [m, n], row stride ldy; bias [n] or NULL; x, y and bias fp32, or bf16 where
 * bf16 != 0. Work items as in linear. Returns 0, or -1 if scratch memory ran out. */
int linear_quant(const int64_t *matrix, int kind, int64_t group, const void *bias, const void *x, void *y, int bf16,
                 int64_t n, int64_t k, int64_t m, int64_t ldx, int64_t ldy, int threads) {
    int64_t blocks = (n + PACK - 1) / PACK, k8 = (k + Q4_STEP - 1) / Q4_STEP;
    int64_t chunk_rows = chunk_rows_for(blocks, m, threads, Q4_TILE), chunks = (m + chunk_rows - 1) / chunk_rows;
    qrows a = qrows_new(kind, m, k, group);
    float *bw = bias ? malloc(sizeof(float) * n) : NULL;
    if (!a.q || (bias && !bw)) {
        qrows_free(&a), free(bw);
        return -1;
    }
    for (int64_t o = 0; bias && o < n; ++o) bw[o] = weight_at(bias, bf16, o);
#pragma omp parallel num_threads(threads)
    {
#pragma omp for schedule(static)
        for (int64_t r = 0; r < m; ++r) qrows_set(&a, kind, r, (const char *)x + r * ldx * (bf16 ? 2 : 4), bf16, k, group);
#pragma omp for schedule(static)
        for (int64_t item = 0; item < blocks * chunks; ++item) {
            int64_t b = item / chunks, begin = item % chunks * chunk_rows, end = begin + chunk_rows < m ? begin + chunk_rows : m;
            int cols = n - b * PACK < PACK ? (int)(n - b * PACK) : PACK;
            q4block wb = q4_block(matrix, kind, group, b, k);
            q4_block_rows(&wb, kind, b, k8, cols, begin, end, &a, NULL, y, bf16, NULL, ldy, NULL, bw ? bw + b * PACK : NULL);
        }
    }
    qrows_free(&a), free(bw);
    return 0;
}

/* Block b (cols outputs) of one expert matrix (stored tensors at m[0..2], [n, k], weights of `kind`)
 * against the rows [begin, end): fp32 / bf16 weights read x (rows x_row, ldx apart), the quantized
 * kinds the rows of `a` (indexed by row); y[y_row(i) * ldy + b * PACK + j] = scale(i) * dot, or dot
 * where scale is NULL (y fp32). */
static void expert_block(const int64_t *m, int kind, int64_t group, int64_t b, int64_t k, int cols, int64_t begin,
                         int64_t end, const qrows *a, const float *x, const int64_t *x_row, int64_t ldx, float *y,
                         const int64_t *y_row, int64_t ldy, const float *scale) {
    if (kind == KIND_INT8) {
        q8_block_rows((const int8_t *)m[0], (const float *)m[1], (const int32_t *)m[2], b, a->bytes / Q8_STEP, cols, begin,
                      end, a->q, a->s, NULL, y, 0, y_row, ldy, scale, NULL);
    } else if (kind >= KIND_INT4) {
        q4block wb = q4_block(m, kind, group, b, k);
        q4_block_rows(&wb, kind, b, a->bytes / Q4_STEP, cols, begin, end, a, NULL, y, 0, y_row, ldy, scale, NULL);
    } else {
        int bf16 = kind == KIND_BF16;
        block_rows(block_at((const void *)m[0], bf16, b, k), bf16, k, cols, begin, end, x, x_row, ldx, y + b * PACK, 0, y_row,
                   ldy, scale, NULL);
    }
}

/* Routed experts for the rows of `groups` groups (one per expert).
 *
 * Row r (an assignment of token tokens[r] to an expert) belongs to the group g with
 * begin[g] <= r < end[g]; group g's weights are gate_up (packed [2*ffn, hidden]: gate rows then up
 * rows) and down (packed [hidden, ffn]), whose stored tensors' addresses are matrices[g * 6 + 0..2]
 * (gate_up: weights or codes, scales, zero points or code sums; 0 where the kind has none) and
 * matrices[g * 6 + 3..5] (down). Computes
 *     out[dest[r], :] = scale[r] * down(silu(gate x) * (up x)),  x = x[tokens[r], :]
 * using h ([rows, 2*ffn]) and act ([rows, ffn]) as scratch, indexed by r. The weights are of `kind`
 * (fp32, bf16, or quantized with `group` inputs per scale); everything else is fp32. The quantized
 * kinds run integer dot products (Q8, Q4): each row's x and act quantized per row. Work items are
 * (group, block) pairs. Returns 0, or -1 if scratch memory ran out. */
int moe_experts(const float *x, int64_t hidden, int64_t ffn, const int64_t *tokens, const int64_t *dest, const float *scale,
                const int64_t *begin, const int64_t *end, const int64_t *matrices, int kind, int64_t group,
                int64_t groups, float *out, float *h, float *act, int threads) {
    int64_t up_rows = 2 * ffn, up_blocks = (up_rows + PACK - 1) / PACK, down_blocks = (hidden + PACK - 1) / PACK, rows = 0;
    for (int64_t g = 0; g < groups; ++g) rows = end[g] > rows ? end[g] : rows;
    int quantized = kind >= KIND_INT8;
    qrows xq = {0}, aq = {0};  /* row r: x[tokens[r]] and act[r] quantized */
    if (quantized) {
        xq = qrows_new(kind, rows, hidden, group), aq = qrows_new(kind, rows, ffn, group);
        if (!xq.q || !aq.q) {
            qrows_free(&xq), qrows_free(&aq);
            return -1;
        }
    }
#pragma omp parallel num_threads(threads)
    {
        if (quantized) {
#pragma omp for schedule(static)
            for (int64_t g = 0; g < groups; ++g)
                for (int64_t r = begin[g]; r < end[g]; ++r) qrows_set(&xq, kind, r, x + tokens[r] * hidden, 0, hidden, group);
        }
#pragma omp for schedule(static)
        for (int64_t i = 0; i < groups * up_blocks; ++i) {
            int64_t g = i / up_blocks, b = i % up_blocks;
            int cols = up_rows - b * PACK < PACK ? (int)(up_rows - b * PACK) : PACK;
            expert_block(matrices + g * 6, kind, group, b, hidden, cols, begin[g], end[g], &xq, x, tokens, hidden, h, NULL,
                         up_rows, NULL);
        }
#pragma omp for schedule(static)
        for (int64_t g = 0; g < groups; ++g)
            for (int64_t r = begin[g]; r < end[g]; ++r) {
                const float *gate = h + r * up_rows, *up = gate + ffn;
                float *a = act + r * ffn;
                for (int64_t f = 0; f < ffn; ++f) a[f] = gate[f] / (1.f + expf(-gate[f])) * up[f];
                if (quantized) qrows_set(&aq, kind, r, a, 0, ffn, group);
            }
#pragma omp for schedule(static)
        for (int64_t i = 0; i < groups * down_blocks; ++i) {
            int64_t g = i / down_blocks, b = i % down_blocks;
            int cols = hidden - b * PACK < PACK ? (int)(hidden - b * PACK) : PACK;
            expert_block(matrices + g * 6 + 3, kind, group, b, ffn, cols, begin[g], end[g], &aq, act, NULL, ffn, out, dest,
                         hidden, scale);
        }
    }
    if (quantized) qrows_free(&xq), qrows_free(&aq);
    return 0;
}

/* Attention for decode steps (one new token per sequence) straight from the paged KV cache.
 *
 * q: [seqs, heads, head_dim]; k_cache, v_cache: [slots, kv_heads, head_dim]; sequence b attends
 * its context_lens[b] positions, whose cache slots are slots[b * slots_stride + t]. Query head h
 * reads kv head h / (heads / kv_heads); the query heads sharing a kv head are computed together,
 * reading each key and value row once. out: [seqs, heads, head_dim]; scratch: one row of
 * slots_stride floats per (sequence, head). q, the caches and out are fp32, or bf16 where bf16 != 0
 * (computed in fp32, out rounded once); returns 0, or -1 if scratch memory ran out. Every (sequence, head) is summed in the same order whatever else is in
 * the step, so a sequence's result does not depend on the others. */
int paged_decode_attention(const void *q_in, const void *k_cache, const void *v_cache, int bf16, const int64_t *slots,
                           int64_t slots_stride, const int64_t *context_lens, int64_t seqs, int64_t heads, int64_t kv_heads,
                           int64_t head_dim, float scale, void *out_io, float *scratch, int threads) {
    int64_t group = heads / kv_heads;
    float *q = bf16 ? widened(q_in, seqs * heads, head_dim, head_dim) : (float *)q_in;
    float *out = bf16 ? malloc(sizeof(float) * seqs * heads * head_dim) : (float *)out_io;
    if (!q || !out) {
        if (bf16) free(q), free(out);
        return -1;
    }
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
                const void *ks[TILE_W];
                for (int r = 0; r < R; ++r) ks[r] = weight_row(k_cache, bf16, slot[t + r] * kv_heads + g, head_dim);
                if (t + KV_AHEAD < n)  /* the context's rows are scattered over the cache: fetch ahead */
                    for (int r = 0; r < R && t + KV_AHEAD + r < n; ++r)
                        prefetch_rows(weight_row(k_cache, bf16, slot[t + KV_AHEAD + r] * kv_heads + g, head_dim), bf16, head_dim, 1);
                dot_tile_any(ks, bf16, R, qs, C, head_dim, s);
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
            const void *v = weight_row(v_cache, bf16, slot[t] * kv_heads + g, head_dim);
            if (t + KV_AHEAD < n) prefetch_rows(weight_row(v_cache, bf16, slot[t + KV_AHEAD] * kv_heads + g, head_dim), bf16, head_dim, 1);
            for (int64_t d0 = 0; d0 < head_dim; d0 += 64) {  /* the value row in fp32, 64 at a time */
                float widened_v[64];
                int64_t len = head_dim - d0 < 64 ? head_dim - d0 : 64;
                const float *vf = (const float *)v + d0;
                if (bf16) {
                    for (int64_t d = 0; d < len; ++d) widened_v[d] = weight_at(v, 1, d0 + d);
                    vf = widened_v;
                }
                for (int64_t h = first; h < first + group; ++h) {
                    float w = scratch[h * slots_stride + t], *o = out + h * head_dim + d0;
                    for (int64_t d = 0; d < len; ++d) o[d] = MADD(o[d], w, vf[d]);
                }
            }
        }
    }
    if (bf16) {
        for (int64_t i = 0; i < seqs * heads * head_dim; ++i) store_at(out_io, 1, i, out[i]);
        free(q), free(out);
    }
    return 0;
}

static inline __attribute__((always_inline)) void rope_rows(const void *x, int64_t ldx, void *out, const float *cos,
                                                            const float *sin, int64_t tokens, int64_t heads,
                                                            int64_t head_dim, int bf16) {
    int64_t half = head_dim / 2;
    for (int64_t t = 0; t < tokens; ++t)
        for (int64_t h = 0; h < heads; ++h) {
            int64_t xi = t * ldx + h * head_dim, oi = (t * heads + h) * head_dim;
            const float *c = cos + t * head_dim, *s = sin + t * head_dim;
            for (int64_t i = 0; i < head_dim; ++i) {
                float other = i < half ? -weight_at(x, bf16, xi + i + half) : weight_at(x, bf16, xi + i - half);
                float a = rounded(weight_at(x, bf16, xi + i) * rounded(c[i], bf16), bf16);
                float b = rounded(other * rounded(s[i], bf16), bf16);
                store_at(out, bf16, oi + i, a + b);
            }
        }
}

/* Rotate-half rotary embedding: x [tokens, heads, head_dim] with row stride ldx (heads
 * contiguous within a row) into the contiguous out [tokens, heads, head_dim], with the fp32 cos,
 * sin [tokens, head_dim] the tables at each token's position. With h = head_dim / 2,
 *     out[i] = x[i] * cos[i] - x[i + h] * sin[i],  out[i + h] = x[i + h] * cos[i + h] + x[i] * sin[i + h]
 * rounding where x * cos + rotate_half(x) * sin does in x's type (fp32, or bf16 where bf16 != 0,
 * with the tables rounded to bf16 first): the same bits as torch. */
void rope(const void *x, int64_t ldx, void *out, const float *cos, const float *sin, int64_t tokens, int64_t heads,
          int64_t head_dim, int bf16) {
    if (bf16) rope_rows(x, ldx, out, cos, sin, tokens, heads, head_dim, 1);
    else rope_rows(x, ldx, out, cos, sin, tokens, heads, head_dim, 0);
}

static inline __attribute__((always_inline)) void rms_norm_rows(const void *x, int64_t ldx, const void *weight, void *out,
                                                                int64_t rows, int64_t dim, float eps, int bf16) {
    for (int64_t r = 0; r < rows; ++r) {
        int64_t xr = r * ldx;
        int64_t kv = dim - dim % LANES;
        float a[LANES] = {0};
        for (int64_t j = 0; j < kv; j += LANES)
            for (int l = 0; l < LANES; ++l) {
                float v = weight_at(x, bf16, xr + j + l);
                a[l] = MADD(a[l], v, v);
            }
        for (int l = 0; l < dim - kv; ++l) {
            float v = weight_at(x, bf16, xr + kv + l);
            a[l] = MADD(a[l], v, v);
        }
        float inv = 1.f / sqrtf(lane_sum(a) / (float)dim + eps);
        for (int64_t j = 0; j < dim; ++j) {
            float normed = rounded(weight_at(x, bf16, xr + j) * inv, bf16);
            store_at(out, bf16, r * dim + j, weight_at(weight, bf16, j) * normed);
        }
    }
}

/* RMSNorm of each row: out[r] = weight * (x[r] * (1 / sqrt(mean(x[r]^2) + eps))), computed in
 * fp32 with each product rounded on its own (and, for bf16, the normalised row rounded to bf16
 * before the weight multiplies it) as the reference computes it; the sum of squares runs in the
 * lanes of a dot product, so a row's result does not depend on the other rows. x rows are ldx
 * values apart; out is contiguous [rows, dim]; all fp32, or all bf16 where bf16 != 0. */
void rms_norm(const void *x, int64_t ldx, const void *weight, void *out, int64_t rows, int64_t dim, float eps, int bf16) {
    if (bf16) rms_norm_rows(x, ldx, weight, out, rows, dim, eps, 1);
    else rms_norm_rows(x, ldx, weight, out, rows, dim, eps, 0);
}

/* Router top-k and the grouping of the (token, slot) assignments by expert, for one MoE layer.
 *
 * logits: [tokens, experts], fp32 or bf16 (bf16 != 0). Per token: p = softmax(logits) in fp32;
 * the top_k largest (ties: the lower expert first), or the experts in override[t] when override
 * is not NULL; with norm, divided by their sum; rounded to bf16 where bf16 != 0 (the routing
 * weights are in the activations' type). Writes ids [tokens, top_k]; counts [experts]; and, for
 * the assignments a = t * top_k + slot sorted stably by expert: order[i] = a, token[i] = t and
 * scale[i] = the weight of a. Returns 0, or -1 if scratch memory ran out. */
int route(const void *logits, int bf16, int64_t tokens, int64_t experts, int64_t top_k, const int64_t *override, int norm,
          int64_t *ids, int64_t *counts, int64_t *order, int64_t *token, float *scale) {
    float *p = malloc(sizeof(float) * (experts > 0 ? experts : 1)), *w = malloc(sizeof(float) * (tokens * top_k + 1));
    int64_t *start = malloc(sizeof(int64_t) * (experts + 1));
    if (!p || !w || !start) {
        free(p), free(w), free(start);
        return -1;
    }
    for (int64_t e = 0; e < experts; ++e) counts[e] = 0;
    for (int64_t t = 0; t < tokens; ++t) {
        float top = -INFINITY, total = 0.f;
        for (int64_t e = 0; e < experts; ++e) {
            p[e] = weight_at(logits, bf16, t * experts + e);
            if (p[e] > top) top = p[e];
        }
        for (int64_t e = 0; e < experts; ++e) total += (p[e] = expf(p[e] - top));
        for (int64_t e = 0; e < experts; ++e) p[e] /= total;
        int64_t *row = ids + t * top_k;
        float picked = 0.f;
        for (int64_t s = 0; s < top_k; ++s) {
            int64_t best = override ? override[t * top_k + s] : -1;
            if (!override)
                for (int64_t e = 0; e < experts; ++e) {
                    int taken = 0;
                    for (int64_t q = 0; q < s; ++q) taken |= row[q] == e;
                    if (!taken && (best < 0 || p[e] > p[best])) best = e;
                }
            row[s] = best;
            w[t * top_k + s] = p[best];
            picked += p[best];
            counts[best] += 1;
        }
        for (int64_t s = 0; s < top_k; ++s) {
            float v = norm ? w[t * top_k + s] / picked : w[t * top_k + s];
            w[t * top_k + s] = rounded(v, bf16);
        }
    }
    start[0] = 0;
    for (int64_t e = 0; e < experts; ++e) start[e + 1] = start[e] + counts[e];
    for (int64_t a = 0; a < tokens * top_k; ++a) {  /* a counting sort: stable */
        int64_t i = start[ids[a]]++;
        order[i] = a;
        token[i] = a / top_k;
        scale[i] = w[a];
    }
    free(p), free(w), free(start);
    return 0;
}
