/* CPU kernels for decode-sized batches, fp32 or bf16: a linear layer, the routed-expert FFN,
 * the attention of decode steps over the paged KV cache, RMSNorm, the rotary embedding and the
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

/* Quantized weights (engine/model/quant.py): the same blocks of PACK outputs, k-major, as codes.
 * INT8 is computed with integer dot products (its layout and kernel: Q8 below). INT4: 4-bit codes, 8 bytes per k step (byte i
 * holds output i in its low nibble and output i + 8 in its high one), per group of `group` k steps an
 * fp16 scale and a uint8 zero point per output (8 without zero points): w = (code - zero) * scale;
 * MXFP4: 4-bit E2M1 codes laid out as INT4, per group of 32 an e8m0 scale per output: w = FP4[code] *
 * 2^(scale - 127). The codes are widened to fp32 in registers: each output sums code * x over a group
 * in one fused multiply-add chain, then adds scale * that sum to its total (one more fused multiply-add
 * per group), in that order whatever the rows, the tile, or vector or scalar code. */
enum { KIND_FP32 = 0, KIND_BF16 = 1, KIND_INT8 = 2, KIND_INT4 = 3, KIND_MXFP4 = 4 };

typedef struct {
    const void *w;        /* the block's codes (or fp32 / bf16 weights) */
    const void *scale;    /* INT4: fp16 [groups][PACK]; MXFP4: uint8 [groups][PACK] */
    const uint8_t *zero;  /* INT4 with zero points: [groups][PACK], else NULL */
    int kind;
    int64_t group;        /* k steps per scale */
} wblock;

static const float FP4_TABLE[16] = {0.f, .5f, 1.f, 1.5f, 2.f, 3.f, 4.f, 6.f, -0.f, -.5f, -1.f, -1.5f, -2.f, -3.f, -4.f, -6.f};

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

/* 2^(e - 127): the exponent field itself, or for e = 0 the subnormal 2^-127. */
static inline float from_e8m0(uint8_t e) {
    uint32_t bits = e ? (uint32_t)e << 23 : 0x00400000u;
    float v;
    __builtin_memcpy(&v, &bits, sizeof v);
    return v;
}

/* The group's scale and zero point of each of the block's PACK outputs. */
static inline void group_params(const wblock *b, int64_t g, float s[PACK], float z[PACK]) {
    for (int j = 0; j < PACK; ++j) {
        if (b->kind == KIND_INT4) {
            s[j] = from_fp16(((const uint16_t *)b->scale)[g * PACK + j]);
            z[j] = b->zero ? (float)b->zero[g * PACK + j] : 8.f;
        } else s[j] = from_e8m0(((const uint8_t *)b->scale)[g * PACK + j]), z[j] = 0.f;
    }
}

/* Code value of output j at step kk (before the scale). */
static inline float code_at(const wblock *b, int64_t kk, int j, const float z[PACK]) {
    uint8_t byte = ((const uint8_t *)b->w)[kk * (PACK / 2) + (j & 7)];
    int code = j < 8 ? byte & 0x0f : byte >> 4;
    return b->kind == KIND_INT4 ? (float)code - z[j] : FP4_TABLE[code];
}

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
/* The group's scales and zero points of the block's 16 outputs as two 8-lane vectors each (group_params). */
static inline __attribute__((always_inline)) void group_vectors(const wblock *b, int kind, int64_t g, __m256 s[2],
                                                                 __m256 z[2]) {
    for (int h = 0; h < 2; ++h) {
        int64_t i = g * PACK + 8 * h;
        if (kind == KIND_INT4) {
            s[h] = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)b->scale + i)));
            z[h] = b->zero ? _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(b->zero + i))))
                           : _mm256_set1_ps(8.f);
        } else {
            __m256i e = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)((const uint8_t *)b->scale + i)));
            __m256i bits = _mm256_blendv_epi8(_mm256_slli_epi32(e, 23), _mm256_set1_epi32(0x00400000),
                                              _mm256_cmpeq_epi32(e, _mm256_setzero_si256()));
            s[h] = _mm256_castsi256_ps(bits), z[h] = _mm256_setzero_ps();
        }
    }
}

/* The 16 code values of step kk as two 8-lane vectors (outputs 0-7, 8-15). */
static inline __attribute__((always_inline)) void codes16(const void *w, int kind, int64_t kk, __m256 z0, __m256 z1,
                                                           __m256 *w0, __m256 *w1) {
    __m256i both = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)((const uint8_t *)w + kk * (PACK / 2))));
    __m256i lo = _mm256_and_si256(both, _mm256_set1_epi32(0x0f)), hi = _mm256_srli_epi32(both, 4);
    if (kind == KIND_INT4) {
        *w0 = _mm256_sub_ps(_mm256_cvtepi32_ps(lo), z0);
        *w1 = _mm256_sub_ps(_mm256_cvtepi32_ps(hi), z1);
        return;
    }
    const __m256 magnitudes = _mm256_setr_ps(0.f, .5f, 1.f, 1.5f, 2.f, 3.f, 4.f, 6.f);  /* indexed by code & 7 */
    __m256i sign_lo = _mm256_slli_epi32(_mm256_and_si256(lo, _mm256_set1_epi32(8)), 28);
    __m256i sign_hi = _mm256_slli_epi32(_mm256_and_si256(hi, _mm256_set1_epi32(8)), 28);
    *w0 = _mm256_xor_ps(_mm256_permutevar8x32_ps(magnitudes, lo), _mm256_castsi256_ps(sign_lo));
    *w1 = _mm256_xor_ps(_mm256_permutevar8x32_ps(magnitudes, hi), _mm256_castsi256_ps(sign_hi));
}

/* acc[r][j] = sum over groups of scale * sum_kk code * x[r][kk] for r < R (constant after inlining). */
static inline __attribute__((always_inline)) void qblock_tile(const wblock *b, int kind, int64_t k, const float *const *x,
                                                              int R, float acc_out[TILE_ROWS][PACK]) {
    const int bytes_per_step = PACK / 2;
#pragma GCC unroll 6
    for (int r = 0; r < R; ++r)
        for (int j = 0; j < PACK; ++j) acc_out[r][j] = 0.f;
    for (int64_t g = 0, g0 = 0; g0 < k; ++g, g0 += b->group) {
        int64_t g1 = g0 + b->group < k ? g0 + b->group : k;
        __m256 s[2], z[2];
        group_vectors(b, kind, g, s, z);
        __m256 acc[TILE_ROWS][2];
#pragma GCC unroll 6
        for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
        for (int64_t kk = g0; kk < g1; ++kk) {
            if ((kk * bytes_per_step) % 64 == 0)  /* once per cache line */
                __builtin_prefetch((const char *)b->w + (kk + PACK_AHEAD) * bytes_per_step, 0, 3);
            __m256 w0, w1;
            codes16(b->w, kind, kk, z[0], z[1], &w0, &w1);
#pragma GCC unroll 6
            for (int r = 0; r < R; ++r) {
                __m256 xv = _mm256_broadcast_ss(x[r] + kk);
                acc[r][0] = _mm256_fmadd_ps(w0, xv, acc[r][0]);
                acc[r][1] = _mm256_fmadd_ps(w1, xv, acc[r][1]);
            }
        }
#pragma GCC unroll 6
        for (int r = 0; r < R; ++r)
            for (int h = 0; h < 2; ++h)
                _mm256_storeu_ps(acc_out[r] + 8 * h, _mm256_fmadd_ps(s[h], acc[r][h], _mm256_loadu_ps(acc_out[r] + 8 * h)));
    }
}
#else
static inline void qblock_tile(const wblock *b, int kind, int64_t k, const float *const *x, int R,
                               float acc_out[TILE_ROWS][PACK]) {
    (void)kind;
    for (int r = 0; r < R; ++r)
        for (int j = 0; j < PACK; ++j) acc_out[r][j] = 0.f;
    for (int64_t g = 0, g0 = 0; g0 < k; ++g, g0 += b->group) {
        int64_t g1 = g0 + b->group < k ? g0 + b->group : k;
        float s[PACK], z[PACK];
        group_params(b, g, s, z);
        for (int r = 0; r < R; ++r)
            for (int j = 0; j < PACK; ++j) {
                float a = 0.f;
                for (int64_t kk = g0; kk < g1; ++kk) a = MADD(a, code_at(b, kk, j, z), x[r][kk]);
                acc_out[r][j] = MADD(acc_out[r][j], s[j], a);
            }
    }
}
#endif

/* qblock_tile for any R <= TILE_ROWS and 4-bit kind, dispatched to a constant-size instance. */
static void qblock_tile_any(const wblock *b, int64_t k, const float *const *x, int R, float acc[TILE_ROWS][PACK]) {
#define QTILE_KIND(n, kind) \
    case kind: qblock_tile(b, kind, k, x, n, acc); break;
#define QTILE_CASE(n) \
    case n: \
        switch (b->kind) { QTILE_KIND(n, KIND_INT4) default: QTILE_KIND(n, KIND_MXFP4) } \
        break;
    switch (R) {
        QTILE_CASE(1) QTILE_CASE(2) QTILE_CASE(3) QTILE_CASE(4) QTILE_CASE(5) default: QTILE_CASE(6)
    }
#undef QTILE_CASE
#undef QTILE_KIND
}

/* One packed block `wb` (outputs b * PACK .. b * PACK + cols - 1) against the activation rows [begin, end):
 * y[y_row(i) * ldy + j] = scale(i) * dot(w[j], x[x_row(i)]), or dot + bias[j] with a bias and no scale,
 * for j < cols, where a NULL x_row, y_row is the identity and a NULL scale is 1. x rows are ldx floats
 * apart; y is fp32, or bf16 where y_bf16 != 0 (each result rounded once). */
static void block_rows(const wblock *wb, int64_t k, int cols, int64_t begin, int64_t end, const float *x,
                       const int64_t *x_row, int64_t ldx, void *y, int y_bf16, const int64_t *y_row, int64_t ldy,
                       const float *scale, const float *bias) {
    float acc[TILE_ROWS][PACK];
    float *wide = NULL;
    const void *block = wb->w;
    int bf16 = wb->kind == KIND_BF16, quantized = wb->kind >= KIND_INT8;
    if (bf16 && end - begin > WIDEN_ROWS && (wide = malloc(sizeof(float) * k * PACK))) {
        /* many tiles will read this block: widen it once (the same values, so the same bits) */
        widen_into(block, 1, k * PACK, k * PACK, wide, 1);
        block = wide, bf16 = 0;
    }
    for (int64_t i = begin; i < end; i += TILE_ROWS) {
        int R = end - i < TILE_ROWS ? (int)(end - i) : TILE_ROWS;
        const float *xs[TILE_ROWS];
        for (int r = 0; r < R; ++r) xs[r] = x + (x_row ? x_row[i + r] : i + r) * ldx;
        if (quantized) qblock_tile_any(wb, k, xs, R, acc);
        else block_tile_any(block, bf16, k, xs, R, acc);
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

/* Block b of a packed [n, k] matrix whose stored tensors sit at addresses m[0..2] (codes or weights,
 * scales, zero points), in weight kind `kind` (not INT8) with `group` k steps per scale. */
static wblock matrix_block(const int64_t *m, int kind, int64_t group, int64_t b, int64_t k) {
    wblock wb = {NULL, NULL, NULL, kind, kind >= KIND_INT8 ? group : k};
    if (kind <= KIND_BF16) {
        wb.w = block_at((const void *)m[0], kind, b, k);
        return wb;
    }
    int64_t groups = (k + group - 1) / group;
    wb.w = (const uint8_t *)m[0] + b * k * (PACK / 2);
    wb.scale = (const char *)m[1] + b * groups * PACK * (kind == KIND_INT4 ? 2 : 1);
    wb.zero = m[2] ? (const uint8_t *)m[2] + b * groups * PACK : NULL;
    return wb;
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

/* y[i, o] = sum_kk x[i, kk] * w[o, kk] (+ bias[o]) for o < n, i < m, with w a packed matrix whose
 * stored tensors sit at addresses matrix[0..2] (see matrix_block) in weight kind `kind`; x: [m, k],
 * row stride ldx; y: [m, n], row stride ldy; bias: [n] or NULL. x, y and bias are fp32, or bf16 where
 * bf16 != 0: then the products are summed in fp32 and each result (with its bias) rounded once. Work
 * items are (block, chunk of rows), block-major, split across threads in contiguous runs, so a decode
 * step's threads each stream their part of w once. Returns 0, or -1 if scratch memory ran out. */
static int linear_blocks(const int64_t *matrix, int kind, int64_t group, const void *bias, const void *x, void *y, int bf16,
                         int64_t n, int64_t k, int64_t m, int64_t ldx, int64_t ldy, int threads) {
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
        wblock wb = matrix_block(matrix, kind, group, b, k);
        block_rows(&wb, k, cols, begin, end, xw, NULL, bf16 ? k : ldx, yb, bf16, NULL, ldy, NULL, bw ? bw + b * PACK : NULL);
    }
    free(bw);
    return 0;
}

/* A linear layer over fp32 or bf16 packed weights w ([ceil(n / PACK)] blocks of [k][PACK], in the
 * type of x): see linear_blocks. */
int linear(const void *w, const void *bias, const void *x, void *y, int bf16, int64_t n, int64_t k, int64_t m, int64_t ldx,
           int64_t ldy, int threads) {
    int64_t matrix[3] = {(int64_t)w, 0, 0};
    return linear_blocks(matrix, bf16 ? KIND_BF16 : KIND_FP32, k, bias, x, y, bf16, n, k, m, ldx, ldy, threads);
}

/* A linear layer over 4-bit weights (INT4 or MXFP4, `group` k steps per scale; matrix[0..2]: codes,
 * scales, zero points or 0), dequantized in registers: see linear_blocks. */
int linear_quant(const int64_t *matrix, int kind, int64_t group, const void *bias, const void *x, void *y, int bf16,
                 int64_t n, int64_t k, int64_t m, int64_t ldx, int64_t ldy, int threads) {
    return linear_blocks(matrix, kind, group, bias, x, y, bf16, n, k, m, ldx, ldy, threads);
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

/* One row x (k values, fp32 or bf16) as k4 * Q8_STEP codes q + Q8_OFFSET (zero padded), and its scale. */
static void quantize_row(const void *x, int bf16, int64_t k, int64_t k4, uint8_t *q, float *s) {
    float top = 0.f;
    for (int64_t kk = 0; kk < k; ++kk) {
        float v = fabsf(weight_at(x, bf16, kk));
        if (v > top) top = v;
    }
    float scale = top / 127.f;
    for (int64_t kk = 0; kk < k4 * Q8_STEP; ++kk) {
        int code = kk < k && scale > 0.f ? (int)nearbyintf(weight_at(x, bf16, kk) / scale) : 0;
        code = code > 127 ? 127 : code < -127 ? -127 : code;
        q[kk] = (uint8_t)(code + Q8_OFFSET);
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
            quantize_row((const char *)x + r * ldx * (bf16 ? 2 : 4), bf16, k, k4, q + r * k4 * Q8_STEP, xs + r);
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

/* Routed experts for the rows of `groups` groups (one per expert).
 *
 * Row r (an assignment of token tokens[r] to an expert) belongs to the group g with
 * begin[g] <= r < end[g]; group g's weights are gate_up (packed [2*ffn, hidden]: gate rows then up
 * rows) and down (packed [hidden, ffn]), whose stored tensors' addresses are matrices[g * 6 + 0..2]
 * (gate_up: weights or codes, scales, zero points or code sums; 0 where the kind has none) and
 * matrices[g * 6 + 3..5] (down). Computes
 *     out[dest[r], :] = scale[r] * down(silu(gate x) * (up x)),  x = x[tokens[r], :]
 * using h ([rows, 2*ffn]) and act ([rows, ffn]) as scratch, indexed by r. The weights are of `kind`
 * (fp32, bf16, or quantized with `group` k steps per scale); everything else is fp32. INT8 runs Q8:
 * each row's x and act quantized per row. Work items are (group, block) pairs. Returns 0, or -1 if
 * scratch memory ran out. */
int moe_experts(const float *x, int64_t hidden, int64_t ffn, const int64_t *tokens, const int64_t *dest, const float *scale,
                const int64_t *begin, const int64_t *end, const int64_t *matrices, int kind, int64_t group,
                int64_t groups, float *out, float *h, float *act, int threads) {
    int64_t up_rows = 2 * ffn, up_blocks = (up_rows + PACK - 1) / PACK, down_blocks = (hidden + PACK - 1) / PACK;
    int64_t rows = 0, k4_up = (hidden + Q8_STEP - 1) / Q8_STEP, k4_down = (ffn + Q8_STEP - 1) / Q8_STEP;
    for (int64_t g = 0; g < groups; ++g) rows = end[g] > rows ? end[g] : rows;
    int q8 = kind == KIND_INT8;
    uint8_t *xq = q8 ? malloc((size_t)(rows * k4_up * Q8_STEP + 1)) : NULL;  /* row r: x[tokens[r]] quantized */
    uint8_t *aq = q8 ? malloc((size_t)(rows * k4_down * Q8_STEP + 1)) : NULL;
    float *xs = q8 ? malloc(sizeof(float) * (rows + 1)) : NULL, *as = q8 ? malloc(sizeof(float) * (rows + 1)) : NULL;
    if (q8 && (!xq || !aq || !xs || !as)) {
        free(xq), free(aq), free(xs), free(as);
        return -1;
    }
#pragma omp parallel num_threads(threads)
    {
        if (q8) {
#pragma omp for schedule(static)
            for (int64_t g = 0; g < groups; ++g)
                for (int64_t r = begin[g]; r < end[g]; ++r)
                    quantize_row(x + tokens[r] * hidden, 0, hidden, k4_up, xq + r * k4_up * Q8_STEP, xs + r);
        }
#pragma omp for schedule(static)
        for (int64_t i = 0; i < groups * up_blocks; ++i) {
            int64_t g = i / up_blocks, b = i % up_blocks;
            int cols = up_rows - b * PACK < PACK ? (int)(up_rows - b * PACK) : PACK;
            const int64_t *m = matrices + g * 6;
            if (q8) {
                q8_block_rows((const int8_t *)m[0], (const float *)m[1], (const int32_t *)m[2], b, k4_up, cols, begin[g],
                              end[g], xq, xs, NULL, h, 0, NULL, up_rows, NULL, NULL);
                continue;
            }
            wblock wb = matrix_block(m, kind, group, b, hidden);
            block_rows(&wb, hidden, cols, begin[g], end[g], x, tokens, hidden, h + b * PACK, 0, NULL, up_rows, NULL, NULL);
        }
#pragma omp for schedule(static)
        for (int64_t g = 0; g < groups; ++g)
            for (int64_t r = begin[g]; r < end[g]; ++r) {
                const float *gate = h + r * up_rows, *up = gate + ffn;
                float *a = act + r * ffn;
                for (int64_t f = 0; f < ffn; ++f) a[f] = gate[f] / (1.f + expf(-gate[f])) * up[f];
                if (q8) quantize_row(a, 0, ffn, k4_down, aq + r * k4_down * Q8_STEP, as + r);
            }
#pragma omp for schedule(static)
        for (int64_t i = 0; i < groups * down_blocks; ++i) {
            int64_t g = i / down_blocks, b = i % down_blocks;
            int cols = hidden - b * PACK < PACK ? (int)(hidden - b * PACK) : PACK;
            const int64_t *m = matrices + g * 6 + 3;
            if (q8) {
                q8_block_rows((const int8_t *)m[0], (const float *)m[1], (const int32_t *)m[2], b, k4_down, cols, begin[g],
                              end[g], aq, as, NULL, out, 0, dest, hidden, scale, NULL);
                continue;
            }
            wblock wb = matrix_block(m, kind, group, b, ffn);
            block_rows(&wb, ffn, cols, begin[g], end[g], act, NULL, ffn, out + b * PACK, 0, dest, hidden, scale, NULL);
        }
    }
    free(xq), free(aq), free(xs), free(as);
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
