/* vqlab "simd" backend: register-resident lookup-table GEMV for VQ weights with K <= 16 codewords.
 *
 * Plain C ABI, called through ctypes (vqlab/kernels/simd.py compiles this file at first use).
 *
 *   y[b, o] = sum_s T[b, s, I[o, s]],   T[b, s, k] = x[b, s*d:(s+1)*d] . C[k]
 *
 * Tables are quantized to uint8: per segment s a minimum lo_s, per group g of G segments one step_g,
 *   q[b, s, k] = round((T[b, s, k] - lo_s) / step_g)  in [0, 255],
 *   y[b, o]   ~= sum_s lo_s + sum_g step_g * (sum_{s in g} q[b, s, I[o, s]]).
 * The integer sum over one group is exact in uint16 because G * 255 <= 65535 (G <= 256, checked here).
 *
 * Two index forms: the packed layout of vq_lut_packed (below; codes stored in it, 4 bits per index, no transpose:
 * the fast form) and the caller's row-major uint8 tensor (vq_lut_rows), described here.
 * Row-major indices: the caller's (m, S) uint8 tensor itself, read in place -- there is no private copy and
 * no layout built in advance, so the bytes must be transposed on the fly: a vpshufb lane needs 16 outputs of
 * ONE segment.  Rows are loaded as 32-byte vectors (lane L = segments s + 16 L .. s + 16 L + 15) and transposed
 * inside the 128-bit lanes (4 rounds of unpacks), giving vectors t whose lane L holds the tile's rows at segment
 * s + 16 L + t; one vpshufb against the table register of segments (s + t, s + 16 + t) looks them up.
 *   batch 1: tiles of 32 rows, row r and row r + 16 packed into one byte (low / high nibble) before the
 *            transpose (half the unpacks), both 32-segment blocks of a row's cache line loaded together (the
 *            rows are S bytes apart and share few L1 sets), lookups as the vectors come out;
 *   batch > 1: tiles of 16 rows transposed once per group and kept (4 KB) for every row of the batch, two rows
 *            per pass; the groups go in chunks whose tables stay in cache.
 * Per group, uint16 sums (even / odd bytes apart; the odd ones by vpmaddubsw, which does not compete with the
 * shuffles for ports), then one float flush per 16 outputs.  Tables are interleaved to match (vq_pos).
 * Cost on a 2-core Zen 3 (4096 x 4096, K=16, d=2, batch 1): about 2x the old kernel that read a cached nibble
 * layout (more vector ops per lookup: transpose, range check; twice the index bytes), but no per-call copy
 * compare, which cost more than the kernel.
 *
 * Range check and memory safety: the kernel reads exactly the bytes [row0 * S, row1 * S) of the index tensor
 * (Python checked its shape, dtype and contiguity) and returns the largest byte it read; Python raises for a
 * value >= K and discards the output.  A lookup never addresses memory with an index: AVX2 shuffles inside a
 * 16-byte register, the scalar path masks with & 15 inside a 16-byte table row.  So a caller that rewrites its
 * indices during a call can get a wrong result, never a crash.
 * Floating point: compiled with -ffp-contract=off and both paths perform the same float operations in the
 * same order, so the AVX2 and the scalar path give bit-identical outputs.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define VQ_X86 1
#endif

#define VQ_ROW 16      /* table entries per segment */
#define VQ_TILE 16     /* output rows per tile */
#define VQ_MAXG 256    /* largest group: 256 * 255 <= 65535 */
#ifndef VQ_TABLE_BUDGET
#define VQ_TABLE_BUDGET (128 * 1024)   /* bytes of tables one pass of row tiles works through */
#endif

enum { VQ_SCALAR = 0, VQ_AVX2 = 1 };

int vq_abi_version(void) { return 4; }

int vq_isa_supported(int isa)
{
    if (isa == VQ_SCALAR) return 1;
#ifdef VQ_X86
    if (isa == VQ_AVX2) {
        __builtin_cpu_init();
        return (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) ? 1 : 0;
    }
#endif
    return 0;
}

/* ------------------------------------------------------------------ tables */

/* Table rows stored per group: G rounded up to a multiple of 32 (whole blocks; the padding rows are zero). */
static inline int64_t vq_gstride(int64_t group) { return (group + 31) & ~(int64_t)31; }

/* Where segment i of a group is stored: interleaved per block of 32 segments, segment 16 L + t (L = 0, 1;
 * t < 16) at row 2 t + L, so the 32 bytes at row 2 t are one table register: segment t in the low lane,
 * segment 16 + t in the high lane -- the lanes of the transposed index vector t (see below). */
static inline int64_t vq_pos(int64_t i)
{
    return (i & ~(int64_t)31) | ((i & 15) << 1) | ((i >> 4) & 1);
}

/* x (B, S*d) float32 rows, cbt (d, 16) float32 (codebook transposed, columns >= K unused),
 * tab (ngroups, B, Gs, 16) uint8, Gs = vq_gstride(G), segment i of group g at row vq_pos(i) (group-major: the
 * tables of all rows for one group are contiguous; with (B, S, 16) rows 32 KB apart collided in the same L1
 * sets), steps (B, ngroups) float32, offset (B,). */
static inline __attribute__((always_inline))
void tables_body(const float *x, int64_t B, int64_t S, int64_t d, const float *cbt, int64_t K, int64_t group,
                 int64_t ngroups, uint8_t *tab, float *steps, float *offset)
{
    float t[VQ_MAXG][VQ_ROW];
    float lo[VQ_MAXG];
    for (int64_t b = 0; b < B; b++) {
        const float *xb = x + b * S * d;
        float off = 0.0f;
        int bad = 0;
        for (int64_t g = 0; g < ngroups; g++) {
            const int64_t s0 = g * group;
            const int64_t cnt = (S - s0 < group) ? (S - s0) : group;   /* real segments in this group */
            float maxr = 0.0f;
            for (int64_t i = 0; i < cnt; i++) {
                const float *xs = xb + (s0 + i) * d;
                float *ti = t[i];
                for (int k = 0; k < VQ_ROW; k++) ti[k] = 0.0f;
                for (int64_t j = 0; j < d; j++) {
                    const float xv = xs[j];
                    const float *c = cbt + j * VQ_ROW;
                    for (int k = 0; k < VQ_ROW; k++) ti[k] += xv * c[k];
                }
                for (int64_t k = K; k < VQ_ROW; k++) ti[k] = ti[0];        /* padding never moves min / max */
                float mn = ti[0], mx = ti[0], z = 0.0f;
                for (int k = 0; k < VQ_ROW; k++) {
                    mn = ti[k] < mn ? ti[k] : mn;
                    mx = ti[k] > mx ? ti[k] : mx;
                    z += ti[k] * 0.0f;                                     /* NaN when any entry is NaN / inf */
                }
                if (z != z) bad = 1;
                lo[i] = mn;
                off += mn;
                const float r = mx - mn;
                maxr = r > maxr ? r : maxr;
            }
            const float step = maxr / 255.0f;
            const float inv = step > 0.0f ? 1.0f / step : 0.0f;
            steps[b * ngroups + g] = step;
            const int64_t gs = vq_gstride(group);
            uint8_t *tg = tab + (g * B + b) * gs * VQ_ROW;
            for (int64_t i = 0; i < cnt; i++) {
                uint8_t *ti = tg + vq_pos(i) * VQ_ROW;
                for (int k = 0; k < VQ_ROW; k++) {
                    float v = (t[i][k] - lo[i]) * inv + 0.5f;
                    v = v >= 0.0f ? v : 0.0f;                               /* also maps NaN to 0 */
                    v = v <= 255.0f ? v : 255.0f;
                    ti[k] = (k < K) ? (uint8_t)(int)v : 0;
                }
            }
            for (int64_t i = cnt; i < gs; i++)                             /* padded segments add 0 */
                memset(tg + vq_pos(i) * VQ_ROW, 0, VQ_ROW);
        }
        offset[b] = bad ? NAN : off;
    }
}

static void tables_scalar(const float *x, int64_t B, int64_t S, int64_t d, const float *cbt, int64_t K,
                          int64_t group, int64_t ngroups, uint8_t *tab, float *steps, float *offset)
{
    tables_body(x, B, S, d, cbt, K, group, ngroups, tab, steps, offset);
}

#ifdef VQ_X86
/* The same float operations as tables_body, one segment's 16 entries in two registers. */
static inline __attribute__((always_inline, target("avx2")))
float hmin8(__m256 v)
{
    __m128 m = _mm_min_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_min_ps(m, _mm_movehl_ps(m, m));
    m = _mm_min_ss(m, _mm_shuffle_ps(m, m, 1));
    return _mm_cvtss_f32(m);
}

static inline __attribute__((always_inline, target("avx2")))
float hmax8(__m256 v)
{
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 1));
    return _mm_cvtss_f32(m);
}

__attribute__((target("avx2")))
static void tables_avx2(const float *x, int64_t B, int64_t S, int64_t d, const float *cbt, int64_t K,
                        int64_t group, int64_t ngroups, uint8_t *tab, float *steps, float *offset)
{
    __m256 t0[VQ_MAXG], t1[VQ_MAXG];
    float lo[VQ_MAXG];
    uint8_t keep[VQ_ROW];
    for (int k = 0; k < VQ_ROW; k++) keep[k] = k < K ? 0xff : 0;
    const __m128i mask = _mm_loadu_si128((const __m128i *)keep);
    /* entries k >= K are replaced by entry 0 before min / max (as in tables_body) */
    const __m256i pad0 = _mm256_setr_epi32(0, 1 < K ? -1 : 0, 2 < K ? -1 : 0, 3 < K ? -1 : 0, 4 < K ? -1 : 0,
                                           5 < K ? -1 : 0, 6 < K ? -1 : 0, 7 < K ? -1 : 0);
    const __m256i pad1 = _mm256_setr_epi32(8 < K ? -1 : 0, 9 < K ? -1 : 0, 10 < K ? -1 : 0, 11 < K ? -1 : 0,
                                           12 < K ? -1 : 0, 13 < K ? -1 : 0, 14 < K ? -1 : 0, 15 < K ? -1 : 0);
    const __m256 zero = _mm256_setzero_ps(), top = _mm256_set1_ps(255.0f), half = _mm256_set1_ps(0.5f);
    for (int64_t b = 0; b < B; b++) {
        const float *xb = x + b * S * d;
        float off = 0.0f;
        int bad = 0;
        for (int64_t g = 0; g < ngroups; g++) {
            const int64_t s0 = g * group;
            const int64_t cnt = (S - s0 < group) ? (S - s0) : group;
            float maxr = 0.0f;
            for (int64_t i = 0; i < cnt; i++) {
                const float *xs = xb + (s0 + i) * d;
                __m256 a = zero, c = zero;
                for (int64_t j = 0; j < d; j++) {
                    const __m256 xv = _mm256_set1_ps(xs[j]);
                    a = _mm256_add_ps(a, _mm256_mul_ps(xv, _mm256_loadu_ps(cbt + j * VQ_ROW)));
                    c = _mm256_add_ps(c, _mm256_mul_ps(xv, _mm256_loadu_ps(cbt + j * VQ_ROW + 8)));
                }
                const __m256 first = _mm256_set1_ps(_mm256_cvtss_f32(a));
                a = _mm256_blendv_ps(first, a, _mm256_castsi256_ps(pad0));
                c = _mm256_blendv_ps(first, c, _mm256_castsi256_ps(pad1));
                const __m256 z = _mm256_add_ps(_mm256_mul_ps(a, zero), _mm256_mul_ps(c, zero));
                if (_mm256_movemask_ps(_mm256_cmp_ps(z, z, _CMP_UNORD_Q))) bad = 1;
                const float mn = hmin8(_mm256_min_ps(a, c)), mx = hmax8(_mm256_max_ps(a, c));
                t0[i] = a;
                t1[i] = c;
                lo[i] = mn;
                off += mn;
                const float r = mx - mn;
                maxr = r > maxr ? r : maxr;
            }
            const float step = maxr / 255.0f;
            const float inv = step > 0.0f ? 1.0f / step : 0.0f;
            steps[b * ngroups + g] = step;
            const __m256 vinv = _mm256_set1_ps(inv);
            const int64_t gs = vq_gstride(group);
            uint8_t *tg = tab + (g * B + b) * gs * VQ_ROW;
            for (int64_t i = 0; i < cnt; i++) {
                const __m256 l = _mm256_set1_ps(lo[i]);
                __m256 v0 = _mm256_add_ps(_mm256_mul_ps(_mm256_sub_ps(t0[i], l), vinv), half);
                __m256 v1 = _mm256_add_ps(_mm256_mul_ps(_mm256_sub_ps(t1[i], l), vinv), half);
                v0 = _mm256_min_ps(_mm256_max_ps(v0, zero), top);       /* max_ps(NaN, 0) = 0, as in C */
                v1 = _mm256_min_ps(_mm256_max_ps(v1, zero), top);
                const __m256i w = _mm256_permute4x64_epi64(
                    _mm256_packs_epi32(_mm256_cvttps_epi32(v0), _mm256_cvttps_epi32(v1)), 0xd8);
                const __m128i q = _mm_packus_epi16(_mm256_castsi256_si128(w), _mm256_extracti128_si256(w, 1));
                _mm_storeu_si128((__m128i *)(tg + vq_pos(i) * VQ_ROW), _mm_and_si128(q, mask));
            }
            for (int64_t i = cnt; i < gs; i++)
                memset(tg + vq_pos(i) * VQ_ROW, 0, VQ_ROW);
        }
        offset[b] = bad ? NAN : off;
    }
}
#endif

static int tables_run(const float *x, int64_t B, int64_t S, int64_t d, const float *cb, int64_t K, int64_t group,
                      int64_t ngroups, uint8_t *tab, float *steps, float *offset, int isa)
{
    float local[64 * VQ_ROW];
    float *cbt = d <= 64 ? local : (float *)malloc((size_t)(d * VQ_ROW) * sizeof(float));
    if (cbt == NULL) return -2;
    for (int64_t j = 0; j < d; j++)                            /* the codebook transposed: (d, 16), 0 for k >= K */
        for (int64_t k = 0; k < VQ_ROW; k++) cbt[j * VQ_ROW + k] = k < K ? cb[k * d + j] : 0.0f;
#ifdef VQ_X86
    if (isa == VQ_AVX2) tables_avx2(x, B, S, d, cbt, K, group, ngroups, tab, steps, offset);
    else
#endif
    tables_scalar(x, B, S, d, cbt, K, group, ngroups, tab, steps, offset);
    if (cbt != local) free(cbt);
    return 0;
}

static int tables_args_ok(int64_t B, int64_t S, int64_t d, int64_t K, int64_t group, int64_t ngroups, int isa)
{
    return !(B < 0 || S < 1 || d < 1 || K < 1 || K > VQ_ROW || group < 2 || group > VQ_MAXG || group % 2
             || ngroups < 1 || ngroups * group < S || (ngroups - 1) * group >= S || !vq_isa_supported(isa));
}

/* x (B, S*d) float32, cb: the (K, d) float32 codebook, row-major -> tab, steps, offset (see tables_body).
 * Returns 0, -1 for arguments outside what the kernel handles (nothing is written then), -2 out of memory. */
int vq_tables(const float *x, int64_t B, int64_t S, int64_t d, const float *cb, int64_t K, int64_t group,
              int64_t ngroups, uint8_t *tab, float *steps, float *offset, int isa)
{
    if (!tables_args_ok(B, S, d, K, group, ngroups, isa)) return -1;
    return tables_run(x, B, S, d, cb, K, group, ngroups, tab, steps, offset, isa);
}

/* ------------------------------------------------------------------ lookups
 *
 * idx: the caller's (m, S) uint8 indices, row stride S; only the bytes [row0 * S, row1 * S) are read.
 * tab: from vq_tables; y: (B, ldy) float32, of which outputs [row0, row1) of every row are set.
 * *maxval: the largest index byte read (>= K: the output is meaningless and must be discarded). */

static void rows_scalar(const uint8_t *idx, int64_t S, int64_t row0, int64_t row1, const uint8_t *tab,
                        const float *steps, const float *offset, float *y, int64_t ldy, int64_t B,
                        int64_t ngroups, int64_t group, int *maxval)
{
    const int64_t gs = vq_gstride(group);
    int mx = 0;
    for (int64_t o = row0; o < row1; o++) {
        const uint8_t *io = idx + o * S;
        for (int64_t s = 0; s < S; s++) mx = io[s] > mx ? io[s] : mx;
        for (int64_t b = 0; b < B; b++) {
            float acc = offset[b];
            for (int64_t g = 0; g < ngroups; g++) {
                const int64_t s0 = g * group, cnt = (S - s0 < group) ? (S - s0) : group;
                const uint8_t *tg = tab + (g * B + b) * gs * VQ_ROW;
                uint32_t sum = 0;
                for (int64_t i = 0; i < cnt; i++) sum += tg[vq_pos(i) * VQ_ROW + (io[s0 + i] & 15)];
                acc = acc + (float)sum * steps[b * ngroups + g];
            }
            y[b * ldy + o] = acc;
        }
    }
    *maxval = mx;
}

#ifdef VQ_X86
/* 16 outputs from the uint16 accumulators a = sum of (even + 256 * odd byte), c = sum of odd bytes (per 16-bit
 * lane; the two 128-bit lanes are two halves of the segments and are added): y[0..15] += sums * step. */
static inline __attribute__((always_inline, target("avx2")))
void flush16(__m256i a, __m256i c, __m256 step, float *y)
{
    const __m256i even = _mm256_sub_epi16(a, _mm256_slli_epi16(c, 8));         /* exact: sum < 65536 */
    const __m128i e = _mm_add_epi16(_mm256_castsi256_si128(even), _mm256_extracti128_si256(even, 1));
    const __m128i o = _mm_add_epi16(_mm256_castsi256_si128(c), _mm256_extracti128_si256(c, 1));
    const __m256 f0 = _mm256_cvtepi32_ps(_mm256_cvtepu16_epi32(_mm_unpacklo_epi16(e, o)));  /* outputs 0..7 */
    const __m256 f1 = _mm256_cvtepi32_ps(_mm256_cvtepu16_epi32(_mm_unpackhi_epi16(e, o)));  /* outputs 8..15 */
    _mm256_storeu_ps(y, _mm256_add_ps(_mm256_loadu_ps(y), _mm256_mul_ps(f0, step)));
    _mm256_storeu_ps(y + 8, _mm256_add_ps(_mm256_loadu_ps(y + 8), _mm256_mul_ps(f1, step)));
}

/* flush16 into the nr (<= 16) outputs at y. */
static inline __attribute__((always_inline, target("avx2")))
void flush_tile(__m256i a, __m256i c, float step, float *y, int64_t nr)
{
    const __m256 st = _mm256_set1_ps(step);
    if (nr == VQ_TILE) {
        flush16(a, c, st, y);
        return;
    }
    float yt[VQ_TILE];
    for (int64_t j = 0; j < VQ_TILE; j++) yt[j] = j < nr ? y[j] : 0.0f;
    flush16(a, c, st, yt);
    for (int64_t j = 0; j < nr; j++) y[j] = yt[j];
}

/* Keeps the compiler from re-associating a chain of adds into a tree that spills registers. */
#define VQ_PIN(v) __asm__("" : "+x"(v))

/* One transposed index vector v looked up in table register t, added to the accumulators a, c (the odd bytes
 * by vpmaddubsw against 0x0100 words, which runs beside the shuffles: shifts compete with them for ports). */
#define VQ_LOOK(v, t) do {                                                      \
        const __m256i u_ = _mm256_shuffle_epi8(t, v);                           \
        a = _mm256_add_epi16(a, u_);                                            \
        c = _mm256_add_epi16(c, _mm256_maddubs_epi16(u_, odd));                 \
        VQ_PIN(a);                                                              \
        VQ_PIN(c);                                                              \
    } while (0)

/* Transpose, rounds 1-2, of rows p0..p3: q[k] = the 4 rows as dwords, columns 4k..4k+3 (in each lane). */
static inline __attribute__((always_inline, target("avx2")))
void quad(__m256i p0, __m256i p1, __m256i p2, __m256i p3, __m256i *q)
{
    const __m256i e0 = _mm256_unpacklo_epi8(p0, p1), e1 = _mm256_unpackhi_epi8(p0, p1);
    const __m256i e2 = _mm256_unpacklo_epi8(p2, p3), e3 = _mm256_unpackhi_epi8(p2, p3);
    q[0] = _mm256_unpacklo_epi16(e0, e2);
    q[1] = _mm256_unpackhi_epi16(e0, e2);
    q[2] = _mm256_unpacklo_epi16(e1, e3);
    q[3] = _mm256_unpackhi_epi16(e1, e3);
}

/* Rounds 3-4 for column quad k of the four row quads (q[4 i + k]): v[e] = column 4k + e of all 16 rows. */
static inline __attribute__((always_inline, target("avx2")))
void cols(const __m256i *q, int k, __m256i *v)
{
    const __m256i t0 = _mm256_unpacklo_epi32(q[k], q[4 + k]), t1 = _mm256_unpackhi_epi32(q[k], q[4 + k]);
    const __m256i t2 = _mm256_unpacklo_epi32(q[8 + k], q[12 + k]), t3 = _mm256_unpackhi_epi32(q[8 + k], q[12 + k]);
    v[0] = _mm256_unpacklo_epi64(t0, t2);
    v[1] = _mm256_unpackhi_epi64(t0, t2);
    v[2] = _mm256_unpacklo_epi64(t1, t3);
    v[3] = _mm256_unpackhi_epi64(t1, t3);
}

/* Loads the block of 32 segments at s of the 16 rows (running byte maximum in *vmax) and transposes rounds 1-2. */
static inline __attribute__((always_inline, target("avx2")))
void load_block(const uint8_t *const *rows, int64_t s, __m256i *q, __m256i *vmax)
{
    __m256i mx = *vmax;
#pragma GCC unroll 4
    for (int i = 0; i < 4; i++) {
        const __m256i p0 = _mm256_loadu_si256((const __m256i *)(rows[4 * i] + s));
        const __m256i p1 = _mm256_loadu_si256((const __m256i *)(rows[4 * i + 1] + s));
        const __m256i p2 = _mm256_loadu_si256((const __m256i *)(rows[4 * i + 2] + s));
        const __m256i p3 = _mm256_loadu_si256((const __m256i *)(rows[4 * i + 3] + s));
        mx = _mm256_max_epu8(mx, _mm256_max_epu8(_mm256_max_epu8(p0, p1), _mm256_max_epu8(p2, p3)));
        VQ_PIN(mx);
        quad(p0, p1, p2, p3, q + 4 * i);
    }
    *vmax = mx;
}

/* ---- batch 1 with 32-row tiles: rows r and r + 16 share a byte (r | (r + 16) << 4), halving the transpose */

/* Lookups of the transposed packed vectors of one block (q from quad()) with its 16 table registers t. */
static inline __attribute__((always_inline, target("avx2")))
void look32(const __m256i *q, const __m256i *t, __m256i *acc)
{
    const __m256i m4 = _mm256_set1_epi8(0x0f), odd = _mm256_set1_epi16(0x0100);
    __m256i alo = acc[0], clo = acc[1], ahi = acc[2], chi = acc[3];
#pragma GCC unroll 4
    for (int k = 0; k < 4; k++) {
        __m256i v[4];
        cols(q, k, v);
#pragma GCC unroll 4
        for (int e = 0; e < 4; e++) {
            const __m256i tt = _mm256_loadu_si256(t + 4 * k + e);
            const __m256i l = _mm256_and_si256(v[e], m4);
            const __m256i h = _mm256_and_si256(_mm256_srli_epi16(v[e], 4), m4);
            const __m256i u = _mm256_shuffle_epi8(tt, l), w = _mm256_shuffle_epi8(tt, h);
            alo = _mm256_add_epi16(alo, u);
            clo = _mm256_add_epi16(clo, _mm256_maddubs_epi16(u, odd));
            ahi = _mm256_add_epi16(ahi, w);
            chi = _mm256_add_epi16(chi, _mm256_maddubs_epi16(w, odd));
            VQ_PIN(alo); VQ_PIN(clo); VQ_PIN(ahi); VQ_PIN(chi);
        }
    }
    acc[0] = alo; acc[1] = clo; acc[2] = ahi; acc[3] = chi;
}

/* rows[0..31] at s, `halves` (1 or 2) blocks of 32 real segments: each row's bytes are loaded once (its cache
 * line may be evicted before a second visit: rows S bytes apart share few L1 sets). */
static inline __attribute__((always_inline, target("avx2")))
void block32_b1(const uint8_t *const *rows, int64_t s, int halves, const __m256i *t, __m256i *acc, __m256i *vmax)
{
    __m256i q[2][16], mx = *vmax;
#pragma GCC unroll 4
    for (int i = 0; i < 4; i++) {
        for (int h = 0; h < halves; h++) {
            __m256i p[4];
#pragma GCC unroll 4
            for (int j = 0; j < 4; j++) {
                const __m256i lo = _mm256_loadu_si256((const __m256i *)(rows[4 * i + j] + s + 32 * h));
                const __m256i hi = _mm256_loadu_si256((const __m256i *)(rows[16 + 4 * i + j] + s + 32 * h));
                mx = _mm256_max_epu8(mx, _mm256_max_epu8(lo, hi));
                p[j] = _mm256_or_si256(lo, _mm256_slli_epi16(hi, 4));          /* exact for bytes < 16 */
            }
            VQ_PIN(mx);
            quad(p[0], p[1], p[2], p[3], q[h] + 4 * i);
        }
    }
    *vmax = mx;
    look32(q[0], t, acc);
    if (halves == 2) look32(q[1], t + 16, acc);
}

__attribute__((target("avx2")))
static void rows_b1_avx2(const uint8_t *idx, int64_t S, int64_t row0, int64_t row1, const uint8_t *tab,
                           const float *steps, const float *offset, float *y, int64_t ngroups, int64_t group,
                           int *maxval)
{
    const int64_t gs = vq_gstride(group), tstride = gs * VQ_ROW;
    const uint8_t *rows[32];
    uint8_t pad[32][32];
    const uint8_t *padrows[32];
    __m256i vmax = _mm256_setzero_si256();
    for (int i = 0; i < 32; i++) padrows[i] = pad[i];
    for (int64_t r0 = row0; r0 < row1; r0 += 32) {
        const int64_t nr = (row1 - r0 < 32) ? row1 - r0 : 32;
        for (int i = 0; i < 32; i++) rows[i] = idx + (r0 + (i < nr ? i : nr - 1)) * S;
        for (int64_t j = 0; j < nr; j++) y[r0 + j] = offset[0];
        for (int64_t g = 0; g < ngroups; g++) {
            const int64_t s0 = g * group, cnt = (S - s0 < group) ? (S - s0) : group, nb = (cnt + 31) / 32;
            const uint8_t *tg = tab + g * tstride;
            __m256i acc[4] = {_mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256(),
                              _mm256_setzero_si256()};
            for (int64_t k = 0; k < nb;) {
                const int64_t w = cnt - 32 * k;
                if (w >= 64) {
                    block32_b1(rows, s0 + 32 * k, 2, (const __m256i *)(tg + k * 32 * VQ_ROW), acc, &vmax);
                    k += 2;
                } else if (w >= 32) {
                    block32_b1(rows, s0 + 32 * k, 1, (const __m256i *)(tg + k * 32 * VQ_ROW), acc, &vmax);
                    k += 1;
                } else {
                    for (int i = 0; i < 32; i++) {
                        memset(pad[i], 0, 32);
                        memcpy(pad[i], rows[i] + s0 + 32 * k, (size_t)w);
                    }
                    block32_b1(padrows, 0, 1, (const __m256i *)(tg + k * 32 * VQ_ROW), acc, &vmax);
                    k += 1;
                }
            }
            flush_tile(acc[0], acc[1], steps[g], y + r0, nr < 16 ? nr : 16);
            if (nr > 16) flush_tile(acc[2], acc[3], steps[g], y + r0 + 16, nr - 16);
        }
    }
    uint8_t m[32];
    _mm256_storeu_si256((__m256i *)m, vmax);
    int mx = 0;
    for (int i = 0; i < 32; i++) mx = m[i] > mx ? m[i] : mx;
    *maxval = mx;
}

__attribute__((target("avx2")))
static void rows_avx2(const uint8_t *idx, int64_t S, int64_t row0, int64_t row1, const uint8_t *tab,
                      const float *steps, const float *offset, float *y, int64_t ldy, int64_t B,
                      int64_t ngroups, int64_t group, int *maxval)
{
    const int64_t gs = vq_gstride(group), tstride = gs * VQ_ROW;
    const __m256i odd = _mm256_set1_epi16(0x0100);
    __m256i tv[VQ_MAXG / 2] __attribute__((aligned(32)));   /* batch > 1: the group's transposed index vectors */
    uint8_t pad[VQ_TILE][32];                                /* a block with fewer than 32 real segments */
    const uint8_t *rows[VQ_TILE], *padrows[VQ_TILE];
    __m256i vmax = _mm256_setzero_si256();
    for (int i = 0; i < VQ_TILE; i++) padrows[i] = pad[i];
    /* groups in chunks whose tables (B rows) stay in cache while every tile of rows passes over them */
    const int64_t gchunk = (VQ_TABLE_BUDGET / (B * tstride)) > 1 ? VQ_TABLE_BUDGET / (B * tstride) : 1;
    for (int64_t g0 = 0; g0 < ngroups; g0 += gchunk) {
    const int64_t g1 = (g0 + gchunk < ngroups) ? g0 + gchunk : ngroups;
    for (int64_t r0 = row0; r0 < row1; r0 += VQ_TILE) {
        const int64_t nr = (row1 - r0 < VQ_TILE) ? row1 - r0 : VQ_TILE;
        for (int i = 0; i < VQ_TILE; i++) rows[i] = idx + (r0 + (i < nr ? i : nr - 1)) * S;  /* repeats: unused */
        if (g0 == 0)
            for (int64_t b = 0; b < B; b++)
                for (int64_t j = 0; j < nr; j++) y[b * ldy + r0 + j] = offset[b];
        for (int64_t g = g0; g < g1; g++) {
            const int64_t s0 = g * group, cnt = (S - s0 < group) ? (S - s0) : group, nb = (cnt + 31) / 32;
            const uint8_t *tg = tab + g * B * tstride;
            for (int64_t k = 0; k < nb; k++) {                   /* transposed once, kept for every row */
                const int64_t w = (cnt - 32 * k < 32) ? cnt - 32 * k : 32;
                const uint8_t *const *src = rows;
                int64_t at = s0 + 32 * k;
                if (w < 32) {                                    /* zero-padded copies: padded tables are 0 */
                    for (int i = 0; i < VQ_TILE; i++) {
                        memset(pad[i], 0, 32);
                        memcpy(pad[i], rows[i] + at, (size_t)w);
                    }
                    src = padrows;
                    at = 0;
                }
                __m256i q[16];
                load_block(src, at, q, &vmax);
#pragma GCC unroll 4
                for (int kk = 0; kk < 4; kk++) cols(q, kk, tv + 16 * k + 4 * kk);
            }
            int64_t b = 0;
            for (; b + 2 <= B; b += 2) {                             /* two rows per pass over the vectors */
                const __m256i *t0 = (const __m256i *)(tg + b * tstride), *t1 = (const __m256i *)(tg + (b + 1) * tstride);
                __m256i a0 = _mm256_setzero_si256(), c0 = a0, a1 = a0, c1 = a0;
                for (int64_t v = 0; v < 16 * nb; v++) {
                    const __m256i iv = _mm256_load_si256(tv + v);
                    const __m256i u0 = _mm256_shuffle_epi8(_mm256_loadu_si256(t0 + v), iv);
                    const __m256i u1 = _mm256_shuffle_epi8(_mm256_loadu_si256(t1 + v), iv);
                    a0 = _mm256_add_epi16(a0, u0);
                    c0 = _mm256_add_epi16(c0, _mm256_maddubs_epi16(u0, odd));
                    a1 = _mm256_add_epi16(a1, u1);
                    c1 = _mm256_add_epi16(c1, _mm256_maddubs_epi16(u1, odd));
                }
                flush_tile(a0, c0, steps[b * ngroups + g], y + b * ldy + r0, nr);
                flush_tile(a1, c1, steps[(b + 1) * ngroups + g], y + (b + 1) * ldy + r0, nr);
            }
            if (b < B) {
                const __m256i *t = (const __m256i *)(tg + b * tstride);
                __m256i a = _mm256_setzero_si256(), c = _mm256_setzero_si256();
                for (int64_t v = 0; v < 16 * nb; v++) VQ_LOOK(tv[v], _mm256_loadu_si256(t + v));
                flush_tile(a, c, steps[b * ngroups + g], y + b * ldy + r0, nr);
            }
        }
    }
    }
    uint8_t m[32];
    _mm256_storeu_si256((__m256i *)m, vmax);
    int mx = 0;
    for (int i = 0; i < 32; i++) mx = m[i] > mx ? m[i] : mx;
    *maxval = mx;
}
#endif

/* y[b, row0:row1] = offset[b] + the lookups of index rows [row0, row1).  Returns 0 (then *maxval = the largest
 * index byte read: >= K means the output is meaningless), or -1 for arguments outside what the kernel handles
 * (nothing is written then). */
int vq_lut_rows(const uint8_t *idx, int64_t m, int64_t S, int64_t row0, int64_t row1, const uint8_t *tab,
                const float *steps, const float *offset, float *y, int64_t ldy, int64_t B, int64_t ngroups,
                int64_t group, int *maxval, int isa)
{
    if (m < 1 || S < 1 || row0 < 0 || row1 > m || row0 > row1 || B < 0 || ldy < row1 || group < 2
        || group > VQ_MAXG || group % 2 || ngroups < 1 || ngroups * group < S || (ngroups - 1) * group >= S
        || !vq_isa_supported(isa))
        return -1;
    *maxval = 0;
    if (row0 == row1 || B == 0) {
        int mx = 0;                                              /* still report the indices' range */
        for (int64_t i = row0 * S; i < row1 * S; i++) mx = idx[i] > mx ? idx[i] : mx;
        *maxval = mx;
        return 0;
    }
#ifdef VQ_X86
    if (isa == VQ_AVX2) {
        if (B == 1) rows_b1_avx2(idx, S, row0, row1, tab, steps, offset, y, ngroups, group, maxval);
        else rows_avx2(idx, S, row0, row1, tab, steps, offset, y, ldy, B, ngroups, group, maxval);
        return 0;
    }
#endif
    rows_scalar(idx, S, row0, row1, tab, steps, offset, y, ldy, B, ngroups, group, maxval);
    return 0;
}

/* ------------------------------------------------------------------ the packed layout
 *
 * For codes stored in the kernel's own format (vqlab.packed.SimdCode): P (ngroups, nblk, Gs/2, 32) uint8 for
 * one block of `rows` output rows, nblk = ceil(rows / 32), Gs = vq_gstride(G).  Vector p = 16 b + t of a group
 * and block of 32 outputs: byte c (c < 16) = I[o_c, 32 b + t] | I[o_{16+c}, 32 b + t] << 4 and byte 16 + c =
 * I[o_c, 32 b + 16 + t] | I[o_{16+c}, 32 b + 16 + t] << 4 (o_j = 32 blk + j; zero for padded rows and
 * segments) -- the two lanes match the table register of rows 2p, 2p + 1 (vq_pos), so one 32-byte load feeds
 * two shuffles with no transpose, and the code takes 4 bits per index.
 * Range check: with check != 0 (K < 16) the largest nibble read is returned in *maxval (>= K: discard the
 * output); with K = 16 every nibble is a codeword.  A nibble indexes a 16-byte register or table row, so no
 * value can address memory.  The float operations are those of the row-major path, in the same order, so both
 * give bit-identical outputs for the same indices. */

static void packed_scalar(const uint8_t *P, int64_t rows, int64_t nblk, int64_t blk0, int64_t blk1,
                          const uint8_t *tab, const float *steps, float *y, int64_t ldy, int64_t B,
                          int64_t ngroups, int64_t group, int *maxval)
{
    const int64_t gs = vq_gstride(group), half = gs / 2;
    int mx = 0;
    for (int64_t g = 0; g < ngroups; g++) {
        for (int64_t blk = blk0; blk < blk1; blk++) {
            const uint8_t *ib = P + (g * nblk + blk) * half * 32;
            for (int64_t i = 0; i < half * 32; i++) {
                const int lo = ib[i] & 15, hi = ib[i] >> 4;
                mx = lo > mx ? lo : mx;
                mx = hi > mx ? hi : mx;
            }
            const int64_t nr = (rows - blk * 32 < 32) ? rows - blk * 32 : 32;
            for (int64_t b = 0; b < B; b++) {
                const uint8_t *tg = tab + (g * B + b) * gs * VQ_ROW;
                uint32_t acc[32];
                for (int j = 0; j < 32; j++) acc[j] = 0;
                for (int64_t p = 0; p < half; p++) {
                    const uint8_t *v = ib + p * 32, *t0 = tg + p * 32, *t1 = t0 + VQ_ROW;
                    for (int j = 0; j < 16; j++) {
                        acc[j] += t0[v[j] & 15] + t1[v[16 + j] & 15];
                        acc[16 + j] += t0[v[j] >> 4] + t1[v[16 + j] >> 4];
                    }
                }
                const float step = steps[b * ngroups + g];
                float *yb = y + b * ldy + blk * 32;
                for (int64_t j = 0; j < nr; j++) yb[j] = yb[j] + (float)acc[j] * step;
            }
        }
    }
    *maxval = mx;
}

#ifdef VQ_X86
/* One index vector v against table register t: outputs 0..15 (low nibbles) into alo/clo, 16..31 into ahi/chi. */
#define VQ_PSTEP(t, ALO, CLO, AHI, CHI) do {                                    \
        const __m256i u_ = _mm256_shuffle_epi8(t, lo);                          \
        const __m256i w_ = _mm256_shuffle_epi8(t, hi);                          \
        ALO = _mm256_add_epi16(ALO, u_);                                        \
        CLO = _mm256_add_epi16(CLO, _mm256_maddubs_epi16(u_, odd));             \
        AHI = _mm256_add_epi16(AHI, w_);                                        \
        CHI = _mm256_add_epi16(CHI, _mm256_maddubs_epi16(w_, odd));             \
    } while (0)

/* One group x one block of 32 outputs for one input row (CHECK: keep the running nibble maximum). */
static inline __attribute__((always_inline, target("avx2")))
void pblock1(const uint8_t *ib, int64_t half, const uint8_t *tg, float step, float *yb, int64_t nr,
             __m256i *vmax, const int check)
{
    const __m256i m4 = _mm256_set1_epi8(0x0f), odd = _mm256_set1_epi16(0x0100);
    __m256i alo = _mm256_setzero_si256(), clo = alo, ahi = alo, chi = alo, mx = *vmax;
    for (int64_t p = 0; p < half; p++) {
        const __m256i v = _mm256_loadu_si256((const __m256i *)(ib + p * 32));
        const __m256i lo = _mm256_and_si256(v, m4);
        const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
        if (check) mx = _mm256_max_epu8(mx, _mm256_max_epu8(lo, hi));
        const __m256i t = _mm256_loadu_si256((const __m256i *)(tg + p * 32));
        VQ_PSTEP(t, alo, clo, ahi, chi);
    }
    *vmax = mx;
    flush_tile(alo, clo, step, yb, nr < 16 ? nr : 16);
    if (nr > 16) flush_tile(ahi, chi, step, yb + 16, nr - 16);
}

/* The same for two input rows (tables tg, tg + tstride; outputs yb, yb + ldy): one index load, four shuffles. */
static inline __attribute__((always_inline, target("avx2")))
void pblock2(const uint8_t *ib, int64_t half, const uint8_t *tg, int64_t tstride, float step0, float step1,
             float *yb, int64_t ldy, int64_t nr, __m256i *vmax, const int check)
{
    const __m256i m4 = _mm256_set1_epi8(0x0f), odd = _mm256_set1_epi16(0x0100);
    __m256i alo0 = _mm256_setzero_si256(), clo0 = alo0, ahi0 = alo0, chi0 = alo0;
    __m256i alo1 = alo0, clo1 = alo0, ahi1 = alo0, chi1 = alo0, mx = *vmax;
    const uint8_t *tg1 = tg + tstride;
    for (int64_t p = 0; p < half; p++) {
        const __m256i v = _mm256_loadu_si256((const __m256i *)(ib + p * 32));
        const __m256i lo = _mm256_and_si256(v, m4);
        const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
        if (check) mx = _mm256_max_epu8(mx, _mm256_max_epu8(lo, hi));
        const __m256i t0 = _mm256_loadu_si256((const __m256i *)(tg + p * 32));
        VQ_PSTEP(t0, alo0, clo0, ahi0, chi0);
        const __m256i t1 = _mm256_loadu_si256((const __m256i *)(tg1 + p * 32));
        VQ_PSTEP(t1, alo1, clo1, ahi1, chi1);
    }
    *vmax = mx;
    flush_tile(alo0, clo0, step0, yb, nr < 16 ? nr : 16);
    if (nr > 16) flush_tile(ahi0, chi0, step0, yb + 16, nr - 16);
    flush_tile(alo1, clo1, step1, yb + ldy, nr < 16 ? nr : 16);
    if (nr > 16) flush_tile(ahi1, chi1, step1, yb + ldy + 16, nr - 16);
}

static inline __attribute__((always_inline, target("avx2")))
void packed_body(const uint8_t *P, int64_t rows, int64_t nblk, int64_t blk0, int64_t blk1, const uint8_t *tab,
                 const float *steps, float *y, int64_t ldy, int64_t B, int64_t ngroups, int64_t group,
                 int *maxval, const int check)
{
    const int64_t gs = vq_gstride(group), half = gs / 2, tstride = gs * VQ_ROW;
    __m256i vmax = _mm256_setzero_si256();
    for (int64_t g = 0; g < ngroups; g++) {
        const uint8_t *tg = tab + g * B * tstride;
        for (int64_t blk = blk0; blk < blk1; blk++) {
            const uint8_t *ib = P + (g * nblk + blk) * half * 32;
            const int64_t nr = (rows - blk * 32 < 32) ? rows - blk * 32 : 32;
            int64_t b = 0;
            for (; b + 2 <= B; b += 2)
                pblock2(ib, half, tg + b * tstride, tstride, steps[b * ngroups + g], steps[(b + 1) * ngroups + g],
                        y + b * ldy + blk * 32, ldy, nr, &vmax, check);
            if (b < B)
                pblock1(ib, half, tg + b * tstride, steps[b * ngroups + g], y + b * ldy + blk * 32, nr, &vmax,
                        check);
        }
    }
    uint8_t m[32];
    _mm256_storeu_si256((__m256i *)m, vmax);
    int mx = 0;
    for (int i = 0; i < 32; i++) mx = m[i] > mx ? m[i] : mx;
    *maxval = mx;
}

__attribute__((target("avx2")))
static void packed_avx2(const uint8_t *P, int64_t rows, int64_t nblk, int64_t blk0, int64_t blk1,
                        const uint8_t *tab, const float *steps, float *y, int64_t ldy, int64_t B, int64_t ngroups,
                        int64_t group, int *maxval, int check)
{
    if (check) packed_body(P, rows, nblk, blk0, blk1, tab, steps, y, ldy, B, ngroups, group, maxval, 1);
    else packed_body(P, rows, nblk, blk0, blk1, tab, steps, y, ldy, B, ngroups, group, maxval, 0);
}
#endif

/* y[b, o] (o in [32 blk0, min(32 blk1, rows))) = offset[b] + the lookups of P's blocks [blk0, blk1); y points at
 * the block of rows' first output, row stride ldy.  Returns 0 (*maxval: the largest nibble read when check,
 * else 0) or -1 for arguments outside what the kernel handles (nothing is written then). */
int vq_lut_packed(const uint8_t *P, int64_t rows, int64_t blk0, int64_t blk1, const uint8_t *tab,
                  const float *steps, const float *offset, float *y, int64_t ldy, int64_t B, int64_t ngroups,
                  int64_t group, int check, int *maxval, int isa)
{
    const int64_t nblk = (rows + 31) / 32;
    if (rows < 1 || blk0 < 0 || blk1 > nblk || blk0 > blk1 || B < 0 || ldy < rows || group < 2
        || group > VQ_MAXG || group % 2 || ngroups < 1 || !vq_isa_supported(isa))
        return -1;
    *maxval = 0;
    const int64_t o1 = (blk1 * 32 < rows) ? blk1 * 32 : rows;
    for (int64_t b = 0; b < B; b++)
        for (int64_t o = blk0 * 32; o < o1; o++) y[b * ldy + o] = offset[b];
    if (B == 0 || blk0 == blk1) return 0;
#ifdef VQ_X86
    if (isa == VQ_AVX2) {
        packed_avx2(P, rows, nblk, blk0, blk1, tab, steps, y, ldy, B, ngroups, group, maxval, check);
        return 0;
    }
#endif
    packed_scalar(P, rows, nblk, blk0, blk1, tab, steps, y, ldy, B, ngroups, group, maxval);
    if (!check) *maxval = 0;
    return 0;
}

/* vq_tables then vq_lut_packed for all blocks (the single-threaded call). */
int vq_matmul_packed(const float *x, int64_t B, int64_t S, int64_t d, const float *cb, int64_t K, const uint8_t *P,
                     int64_t rows, float *y, int64_t ldy, int64_t group, int64_t ngroups, uint8_t *tab,
                     float *steps, float *offset, int check, int *maxval, int isa)
{
    if (!tables_args_ok(B, S, d, K, group, ngroups, isa)) return -1;
    const int rc = B ? tables_run(x, B, S, d, cb, K, group, ngroups, tab, steps, offset, isa) : 0;
    if (rc != 0) return rc;
    return vq_lut_packed(P, rows, 0, (rows + 31) / 32, tab, steps, offset, y, ldy, B, ngroups, group, check,
                         maxval, isa);
}

/* vq_tables then vq_lut_rows in one call (one ctypes call for the common single-threaded case). */
int vq_matmul_rows(const float *x, int64_t B, int64_t d, const float *cb, int64_t K, const uint8_t *idx, int64_t m,
                   int64_t S, int64_t row0, int64_t row1, float *y, int64_t ldy, int64_t group, int64_t ngroups,
                   uint8_t *tab, float *steps, float *offset, int *maxval, int isa)
{
    if (!tables_args_ok(B, S, d, K, group, ngroups, isa)) return -1;
    if (m < 1 || row0 < 0 || row1 > m || row0 > row1 || ldy < row1) return -1;
    const int rc = B ? tables_run(x, B, S, d, cb, K, group, ngroups, tab, steps, offset, isa) : 0;
    if (rc != 0) return rc;
    return vq_lut_rows(idx, m, S, row0, row1, tab, steps, offset, y, ldy, B, ngroups, group, maxval, isa);
}

/* ------------------------------------------------------------------ convolution
 *
 * vq_conv_lut: one conv group of a segment="input" VQ convolution (K <= 16) by lookup tables per input pixel.
 *   x (B, ldx, H, W) float32 (NCHW); the group's S * d input channels start at channel cx0.
 *   P (nblk, kh * kw, S2, 16) uint8, nblk = ceil(cout / 16), S2 = ceil(S / 2): byte c of vector (blk, tap, p) =
 *     I[16 blk + c, tap, 2p] | I[16 blk + c, tap, 2p + 1] << 4   (zero for padded channels and the padded segment)
 *   y (B, ldy, Ho, Wo) float32 (NCHW); the group's cout outputs go to channels yc0 ...
 * Tables are built once per image on the zero-padded grid (Hp = H + 2 ph, Wp = W + 2 pw), one 16-byte table per
 * (pixel, segment), and every output channel and every kernel tap that reads the pixel looks it up:
 *   step  = max over the image's pixels and segments of r / 255,  r = |x_0| w_0 + ... + |x_{d-1}| w_{d-1}
 *           (w_j = cmax_j - cmin_j over the K codewords: r bounds T[k] - lo), inv = 1 / step (0 when step = 0)
 *   lo    = e_0 + ... + e_{d-1},  e_j = (x_j >= 0 ? x_j * cmin_j : x_j * cmax_j)    (lo <= T[k] for every k)
 *   v[k]  = fma(x_{d-1}, c'[d-1, k], ... fma(x_0, c'[0, k], 0.5 - lo * inv)),  c' = C * inv
 *   q[k]  = trunc(min(255, v[k])) when v[k] > -1, else 0 (and 0 for k >= K)   ~ round((T[k] - lo) / step)
 *   y[o, oy, ox] = sum_{i, j} LO[py, px] + step * sum_{i, j, s} q[py, px, s, I[o, i, j, s]]
 *                  (py = oy sh + i dh, px = ox sw + j dw on the padded grid; LO = lo_0 + ... + lo_{S-1})
 * The integer sums restart every CONV_CHUNK (tap, pair) steps: uint16 lanes hold even + 256 odd bytes and the odd
 * bytes apart, both lanes (segments 2p, 2p + 1) add up to at most 2 * 128 * 255 < 65536, so every sum is exact,
 * and both paths flush the same integers in the same order with the same float operations (fmaf = vfmadd):
 * AVX2 and scalar outputs are bit-identical.  A nibble selects an entry inside a 16-byte register (scalar: & 15
 * in a 16-byte row), so no index value can address memory; vq_conv_maxnib reports the largest nibble for the
 * range check.  An image whose step is 0 (all-zero input) skips the lookups: every q is 0. */

#define CONV_CHUNK 128

static inline int64_t conv_align(int64_t n) { return (n + 63) & ~(int64_t)63; }

/* bytes of scratch vq_conv_lut needs */
int64_t vq_conv_scratch(int64_t H, int64_t W, int64_t S, int64_t ph, int64_t pw, int64_t Wo, int64_t kh, int64_t kw)
{
    const int64_t Hp = H + 2 * ph, Wp = W + 2 * pw, S2 = (S + 1) / 2;
    return conv_align(Hp * Wp * S2 * 32) + conv_align(Hp * Wp * 4) + conv_align(H * W * 12)
           + conv_align(Wo * 16 * 4) + conv_align(Wo * 4) + 64 + conv_align(kh * kw * S2 * 8);
}

/* The step of one image (see above); x: the group's first channel plane, planes HW floats apart. */
static float conv_step_scalar(const float *x, int64_t HW, int64_t S, int64_t d, const float *wid, int64_t p0)
{
    float m = 0.0f;
    for (int64_t s = 0; s < S; s++)
        for (int64_t p = p0; p < HW; p++) {
            const float *xs = x + s * d * HW + p;
            float r = fabsf(xs[0]) * wid[0];
            for (int64_t j = 1; j < d; j++) r += fabsf(xs[j * HW]) * wid[j];
            m = r > m ? r : m;
        }
    return m;
}

/* One pixel's S tables (scalar): lo, q -> tab + off, returns LO. */
static float conv_pixel_scalar(const float *xp, int64_t HW, int64_t S, int64_t d, const float *cs,
                               const float *cmin, const float *cmax, float inv, int64_t K, uint8_t *t)
{
    float LO = 0.0f;
    for (int64_t s = 0; s < S; s++) {
        const float *xs = xp + s * d * HW;
        float lo = xs[0] >= 0.0f ? xs[0] * cmin[0] : xs[0] * cmax[0];
        for (int64_t j = 1; j < d; j++) {
            const float v = xs[j * HW];
            lo += v >= 0.0f ? v * cmin[j] : v * cmax[j];
        }
        LO = s ? LO + lo : lo;
        const float bias = 0.5f - lo * inv;
        uint8_t *q = t + s * VQ_ROW;
        for (int k = 0; k < VQ_ROW; k++) {
            float v = fmaf(xs[0], cs[k], bias);
            for (int64_t j = 1; j < d; j++) v = fmaf(xs[j * HW], cs[j * VQ_ROW + k], v);
            v = 255.0f < v ? 255.0f : v;
            q[k] = (k < K && v > -1.0f) ? (uint8_t)(int)v : 0;
        }
    }
    return LO;
}

#ifdef VQ_X86
__attribute__((target("avx2,fma")))
static float conv_step_avx2(const float *x, int64_t HW, int64_t S, int64_t d, const float *wid)
{
    const __m256 sign = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    __m256 m = _mm256_setzero_ps();
    const int64_t n8 = HW & ~(int64_t)7;
    for (int64_t s = 0; s < S; s++)
        for (int64_t p = 0; p < n8; p += 8) {
            const float *xs = x + s * d * HW + p;
            __m256 r = _mm256_mul_ps(_mm256_and_ps(_mm256_loadu_ps(xs), sign), _mm256_set1_ps(wid[0]));
            for (int64_t j = 1; j < d; j++)
                r = _mm256_add_ps(r, _mm256_mul_ps(_mm256_and_ps(_mm256_loadu_ps(xs + j * HW), sign),
                                                   _mm256_set1_ps(wid[j])));
            m = _mm256_max_ps(r, m);                         /* (r > m) ? r : m, as the scalar path */
        }
    float v[8], top = n8 < HW ? conv_step_scalar(x, HW, S, d, wid, n8) : 0.0f;
    _mm256_storeu_ps(v, m);
    for (int k = 0; k < 8; k++) top = v[k] > top ? v[k] : top;
    return top;
}

/* 8 pixels' S tables: the scalar path's float operations lane by lane. */
static inline __attribute__((always_inline, target("avx2,fma")))
void conv_pixels8(const float *xp, int64_t HW, int64_t S, int64_t d, const float *cs, const float *cmin,
                  const float *cmax, float inv, int masked, __m128i mask, uint8_t *tab, const int64_t *off,
                  float *LOout, const int nv)
{
    /* nv < 8: the last pixels of the image; lanes >= nv load 0 (masked loads) and are not stored */
    const __m256i lanes = _mm256_cmpgt_epi32(_mm256_set1_epi32(nv), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
#define CONV_LOAD(ptr) (nv == 8 ? _mm256_loadu_ps(ptr) : _mm256_maskload_ps((ptr), lanes))
    const __m256 zero = _mm256_setzero_ps(), top = _mm256_set1_ps(255.0f), half = _mm256_set1_ps(0.5f);
    const __m256 vinv = _mm256_set1_ps(inv);
    const __m256i tr = _mm256_setr_epi8(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15,
                                        0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
    const __m256i m2 = _mm256_broadcastsi128_si256(mask);
    __m256 LO = zero;
    for (int64_t s = 0; s < S; s++) {
        const float *xs = xp + s * d * HW;
        __m256 x0 = CONV_LOAD(xs);
        __m256 lo = _mm256_mul_ps(x0, _mm256_blendv_ps(_mm256_set1_ps(cmax[0]), _mm256_set1_ps(cmin[0]),
                                                       _mm256_cmp_ps(x0, zero, _CMP_GE_OQ)));
        for (int64_t j = 1; j < d; j++) {
            const __m256 xj = CONV_LOAD(xs + j * HW);
            lo = _mm256_add_ps(lo, _mm256_mul_ps(xj, _mm256_blendv_ps(_mm256_set1_ps(cmax[j]),
                                   _mm256_set1_ps(cmin[j]), _mm256_cmp_ps(xj, zero, _CMP_GE_OQ))));
        }
        LO = s ? _mm256_add_ps(LO, lo) : lo;
        const __m256 bias = _mm256_sub_ps(half, _mm256_mul_ps(lo, vinv));
        __m256i B[4];
        for (int kq = 0; kq < 4; kq++) {
            __m256i V[4];
            for (int kk = 0; kk < 4; kk++) {
                const int k = 4 * kq + kk;
                __m256 v = _mm256_fmadd_ps(x0, _mm256_set1_ps(cs[k]), bias);
                for (int64_t j = 1; j < d; j++)
                    v = _mm256_fmadd_ps(CONV_LOAD(xs + j * HW), _mm256_set1_ps(cs[j * VQ_ROW + k]), v);
                V[kk] = _mm256_cvttps_epi32(_mm256_min_ps(top, v));     /* (255 < v) ? 255 : v */
            }
            const __m256i b = _mm256_packus_epi16(_mm256_packs_epi32(V[0], V[1]), _mm256_packs_epi32(V[2], V[3]));
            B[kq] = _mm256_shuffle_epi8(b, tr);              /* dword p of a lane: entries 4kq..4kq+3 of pixel p */
        }
        const __m256i t0 = _mm256_unpacklo_epi32(B[0], B[1]), t1 = _mm256_unpackhi_epi32(B[0], B[1]);
        const __m256i t2 = _mm256_unpacklo_epi32(B[2], B[3]), t3 = _mm256_unpackhi_epi32(B[2], B[3]);
        __m256i r[4] = {_mm256_unpacklo_epi64(t0, t2), _mm256_unpackhi_epi64(t0, t2),
                        _mm256_unpacklo_epi64(t1, t3), _mm256_unpackhi_epi64(t1, t3)};
        for (int p = 0; p < 4; p++) {
            if (masked) r[p] = _mm256_and_si256(r[p], m2);
            if (p < nv) _mm_storeu_si128((__m128i *)(tab + off[p] + s * VQ_ROW), _mm256_castsi256_si128(r[p]));
            if (p + 4 < nv)
                _mm_storeu_si128((__m128i *)(tab + off[p + 4] + s * VQ_ROW), _mm256_extracti128_si256(r[p], 1));
        }
    }
    if (nv == 8) {
        _mm256_storeu_ps(LOout, LO);
    } else {
        float t[8];
        _mm256_storeu_ps(t, LO);
        for (int p = 0; p < nv; p++) LOout[p] = t[p];
    }
#undef CONV_LOAD
}

__attribute__((target("avx2,fma")))
static void conv_fill_avx2(const float *x, int64_t HW, int64_t S, int64_t d, const float *cs, const float *cmin,
                           const float *cmax, float inv, int64_t K, uint8_t *tab, const int64_t *off, float *LOp)
{
    uint8_t keep[VQ_ROW];
    for (int k = 0; k < VQ_ROW; k++) keep[k] = k < K ? 0xff : 0;
    const __m128i mask = _mm_loadu_si128((const __m128i *)keep);
    const int64_t n8 = HW & ~(int64_t)7;
    for (int64_t p = 0; p < n8; p += 8) {
        if (d == 2) {
            if (K < VQ_ROW) conv_pixels8(x + p, HW, S, 2, cs, cmin, cmax, inv, 1, mask, tab, off + p, LOp + p, 8);
            else conv_pixels8(x + p, HW, S, 2, cs, cmin, cmax, inv, 0, mask, tab, off + p, LOp + p, 8);
        } else {
            conv_pixels8(x + p, HW, S, d, cs, cmin, cmax, inv, K < VQ_ROW, mask, tab, off + p, LOp + p, 8);
        }
    }
    if (n8 < HW)                                               /* the last HW % 8 pixels, masked */
        conv_pixels8(x + n8, HW, S, d, cs, cmin, cmax, inv, K < VQ_ROW, mask, tab, off + n8, LOp + n8,
                     (int)(HW - n8));
}
#endif

/* The tables and LO of one image on the padded grid; returns the step. */
static float conv_tables(const float *x, int64_t H, int64_t W, int64_t S, int64_t d, const float *cb, int64_t K,
                         int64_t ph, int64_t pw, uint8_t *tab, float *LO, int64_t *off, int isa)
{
    const int64_t Hp = H + 2 * ph, Wp = W + 2 * pw, S2 = (S + 1) / 2, ts = S2 * 32, HW = H * W;
    float cmin[64], cmax[64], wid[64], cs[64 * VQ_ROW];
    for (int64_t j = 0; j < d; j++) {
        cmin[j] = cmax[j] = cb[j];
        for (int64_t k = 1; k < K; k++) {
            const float v = cb[k * d + j];
            cmin[j] = v < cmin[j] ? v : cmin[j];
            cmax[j] = v > cmax[j] ? v : cmax[j];
        }
        wid[j] = cmax[j] - cmin[j];
    }
    float m;
#ifdef VQ_X86
    if (isa == VQ_AVX2) m = conv_step_avx2(x, HW, S, d, wid);
    else
#endif
    m = conv_step_scalar(x, HW, S, d, wid, 0);
    const float step = m / 255.0f, inv = step > 0.0f ? 1.0f / step : 0.0f;
    for (int64_t j = 0; j < d; j++)
        for (int64_t k = 0; k < VQ_ROW; k++) cs[j * VQ_ROW + k] = (k < K ? cb[k * d + j] : 0.0f) * inv;
    /* zero the padding: border pixels, and the padded segment of every pixel when S is odd */
    memset(tab, 0, (size_t)(ph * Wp * ts));
    memset(tab + (ph + H) * Wp * ts, 0, (size_t)(ph * Wp * ts));
    for (int64_t h = 0; h < H; h++) {
        memset(tab + (ph + h) * Wp * ts, 0, (size_t)(pw * ts));
        memset(tab + ((ph + h) * Wp + pw + W) * ts, 0, (size_t)(pw * ts));
        if (S % 2)
            for (int64_t w = 0; w < W; w++) memset(tab + ((ph + h) * Wp + pw + w) * ts + S * VQ_ROW, 0, VQ_ROW);
    }
    memset(LO, 0, (size_t)(Hp * Wp) * sizeof(float));
    if (!(step > 0.0f)) return 0.0f;                         /* every q is 0: the lookups are skipped */
    for (int64_t h = 0; h < H; h++)
        for (int64_t w = 0; w < W; w++) off[h * W + w] = ((ph + h) * Wp + pw + w) * ts;
    float *LOp = (float *)(off + HW);                         /* LO per real pixel, then placed on the grid */
#ifdef VQ_X86
    if (isa == VQ_AVX2) conv_fill_avx2(x, HW, S, d, cs, cmin, cmax, inv, K, tab, off, LOp);
    else
#endif
    for (int64_t p = 0; p < HW; p++) LOp[p] = conv_pixel_scalar(x + p, HW, S, d, cs, cmin, cmax, inv, K, tab + off[p]);
    for (int64_t h = 0; h < H; h++)
        for (int64_t w = 0; w < W; w++) LO[(ph + h) * Wp + pw + w] = LOp[h * W + w];
    return step;
}

/* acc[p][c] += step * (integer sum of a chunk of CONV_CHUNK (tap, pair) steps) for the np pixels whose tap-(0, 0)
 * tables start at tp[p]; step q reads index vector q and the tables at tp[p] + qoff[q]. */
static void conv_px_scalar(int np, const uint8_t *const *tp, const int64_t *qoff, int64_t Q, const uint8_t *pv,
                           float step, float *acc)
{
    int32_t sum[4][VQ_ROW];
    memset(sum, 0, sizeof(sum));
    int64_t n = 0;
    for (int64_t q = 0; q < Q; q++) {
        const uint8_t *v = pv + q * 16;
        for (int p = 0; p < np; p++) {
            const uint8_t *t = tp[p] + qoff[q];
            for (int c = 0; c < 16; c++) sum[p][c] += t[v[c] & 15] + t[16 + ((v[c] >> 4) & 15)];
        }
        if (++n == CONV_CHUNK || q == Q - 1) {
            for (int p = 0; p < np; p++)
                for (int c = 0; c < 16; c++) {
                    acc[p * 16 + c] += step * (float)sum[p][c];
                    sum[p][c] = 0;
                }
            n = 0;
        }
    }
}

#ifdef VQ_X86
static inline __attribute__((always_inline, target("avx2")))
void conv_flush(__m256i A, __m256i C, float step, float *a)
{
    const __m256i even = _mm256_sub_epi16(A, _mm256_slli_epi16(C, 8));
    const __m128i e = _mm_add_epi16(_mm256_castsi256_si128(even), _mm256_extracti128_si256(even, 1));
    const __m128i o = _mm_add_epi16(_mm256_castsi256_si128(C), _mm256_extracti128_si256(C, 1));
    const __m256 st = _mm256_set1_ps(step);
    const __m256 f0 = _mm256_cvtepi32_ps(_mm256_cvtepu16_epi32(_mm_unpacklo_epi16(e, o)));
    const __m256 f1 = _mm256_cvtepi32_ps(_mm256_cvtepu16_epi32(_mm_unpackhi_epi16(e, o)));
    _mm256_storeu_ps(a, _mm256_add_ps(_mm256_loadu_ps(a), _mm256_mul_ps(st, f0)));
    _mm256_storeu_ps(a + 8, _mm256_add_ps(_mm256_loadu_ps(a + 8), _mm256_mul_ps(st, f1)));
}

/* odd bytes by vpmaddubsw (odd byte * 1 + even byte * 0), which does not compete with the shuffles for ports */
#define CONV_LOOK(T, A, C) do {                                                    \
        const __m256i r_ = _mm256_shuffle_epi8(_mm256_loadu_si256((const __m256i *)(T)), iv); \
        A = _mm256_add_epi16(A, r_);                                               \
        C = _mm256_add_epi16(C, _mm256_maddubs_epi16(r_, odd1));                   \
    } while (0)

static inline __attribute__((always_inline, target("avx2")))
void conv_px_body(const int np, const uint8_t *const *tp, const int64_t *qoff, int64_t Q, const uint8_t *pv,
                  float step, float *acc)
{
    const __m256i sh = _mm256_setr_epi32(0, 0, 0, 0, 4, 4, 4, 4), low = _mm256_set1_epi8(15);
    const __m256i zero = _mm256_setzero_si256(), odd1 = _mm256_set1_epi16(0x0100);
    __m256i A0 = zero, C0 = zero, A1 = zero, C1 = zero, A2 = zero, C2 = zero, A3 = zero, C3 = zero;
    const uint8_t *t0 = tp[0], *t1 = tp[np > 1 ? 1 : 0], *t2 = tp[np > 2 ? 2 : 0], *t3 = tp[np > 3 ? 3 : 0];
    for (int64_t q0 = 0; q0 < Q; q0 += CONV_CHUNK) {          /* chunks of CONV_CHUNK steps, then a flush */
        const int64_t q1 = Q - q0 < CONV_CHUNK ? Q : q0 + CONV_CHUNK;
        A0 = C0 = A1 = C1 = A2 = C2 = A3 = C3 = zero;
        for (int64_t q = q0; q < q1; q++) {                   /* (tap, pair) in order: table offset qoff[q] */
            const __m256i v = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(pv + q * 16)));
            const __m256i iv = _mm256_and_si256(_mm256_srlv_epi32(v, sh), low);
            const int64_t o = qoff[q];
            CONV_LOOK(t0 + o, A0, C0);
            if (np > 1) CONV_LOOK(t1 + o, A1, C1);
            if (np > 2) CONV_LOOK(t2 + o, A2, C2);
            if (np > 3) CONV_LOOK(t3 + o, A3, C3);
        }
        conv_flush(A0, C0, step, acc);
        if (np > 1) conv_flush(A1, C1, step, acc + 16);
        if (np > 2) conv_flush(A2, C2, step, acc + 32);
        if (np > 3) conv_flush(A3, C3, step, acc + 48);
    }
}

__attribute__((target("avx2")))
static void conv_px_avx2(int np, const uint8_t *const *tp, const int64_t *qoff, int64_t Q, const uint8_t *pv,
                         float step, float *acc)
{
    switch (np) {
    case 4: conv_px_body(4, tp, qoff, Q, pv, step, acc); break;
    case 3: conv_px_body(3, tp, qoff, Q, pv, step, acc); break;
    case 2: conv_px_body(2, tp, qoff, Q, pv, step, acc); break;
    default: conv_px_body(1, tp, qoff, Q, pv, step, acc); break;
    }
}

/* y[c * ldc + ox] = acc[ox * 16 + c] + offs[ox] for c < nc and the whole groups of 8 ox (8 x 8 transposes);
 * returns the first ox left to the caller. */
__attribute__((target("avx2")))
static int64_t conv_store_avx2(const float *acc, const float *offs, float *y, int64_t ldc, int64_t Wo, int64_t nc)
{
    const int64_t n8 = Wo & ~(int64_t)7;
    for (int64_t ox = 0; ox < n8; ox += 8) {
        const __m256 o = _mm256_loadu_ps(offs + ox);
        for (int h = 0; h < 2 && 8 * h < nc; h++) {
            __m256 r[8], t[8];
            for (int p = 0; p < 8; p++) r[p] = _mm256_loadu_ps(acc + (ox + p) * 16 + 8 * h);
            for (int p = 0; p < 8; p += 2) {
                t[p] = _mm256_unpacklo_ps(r[p], r[p + 1]);
                t[p + 1] = _mm256_unpackhi_ps(r[p], r[p + 1]);
            }
            for (int p = 0; p < 8; p += 4) {
                r[p] = _mm256_shuffle_ps(t[p], t[p + 2], 0x44);
                r[p + 1] = _mm256_shuffle_ps(t[p], t[p + 2], 0xee);
                r[p + 2] = _mm256_shuffle_ps(t[p + 1], t[p + 3], 0x44);
                r[p + 3] = _mm256_shuffle_ps(t[p + 1], t[p + 3], 0xee);
            }
            /* r[0..3]: channels (0, 1, 2, 3) of pixels 0-3 | 4-7 ... as lanes; r[4..7] the same for pixels 4-7 */
            for (int c = 0; c < 4; c++) {
                const __m256 lo4 = _mm256_permute2f128_ps(r[c], r[c + 4], 0x20);   /* channel c, pixels 0..7 */
                const __m256 hi4 = _mm256_permute2f128_ps(r[c], r[c + 4], 0x31);   /* channel c + 4 */
                const int64_t ca = 8 * h + c, cb2 = 8 * h + c + 4;
                if (ca < nc) _mm256_storeu_ps(y + ca * ldc + ox, _mm256_add_ps(lo4, o));
                if (cb2 < nc) _mm256_storeu_ps(y + cb2 * ldc + ox, _mm256_add_ps(hi4, o));
            }
        }
    }
    return n8;
}

__attribute__((target("avx2")))
static int conv_maxnib_avx2(const uint8_t *P, int64_t n)
{
    const __m256i low = _mm256_set1_epi8(15);
    __m256i mlo = _mm256_setzero_si256(), mall = mlo;
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
        const __m256i v = _mm256_loadu_si256((const __m256i *)(P + i));
        mlo = _mm256_max_epu8(mlo, _mm256_and_si256(v, low));
        mall = _mm256_max_epu8(mall, v);
    }
    uint8_t a[32], b[32];
    _mm256_storeu_si256((__m256i *)a, mlo);
    _mm256_storeu_si256((__m256i *)b, mall);
    int top = 0;
    for (int k = 0; k < 32; k++) {
        top = a[k] > top ? a[k] : top;
        top = (b[k] >> 4) > top ? (b[k] >> 4) : top;
    }
    for (; i < n; i++) {
        top = (P[i] & 15) > top ? (P[i] & 15) : top;
        top = (P[i] >> 4) > top ? (P[i] >> 4) : top;
    }
    return top;
}
#endif

/* The largest nibble of the n bytes at P (the range check of a packed convolution code). */
int vq_conv_maxnib(const uint8_t *P, int64_t n, int isa)
{
    if (n < 0 || !vq_isa_supported(isa)) return -1;
#ifdef VQ_X86
    if (isa == VQ_AVX2) return conv_maxnib_avx2(P, n);
#endif
    int top = 0;
    for (int64_t i = 0; i < n; i++) {
        top = (P[i] & 15) > top ? (P[i] & 15) : top;
        top = (P[i] >> 4) > top ? (P[i] >> 4) : top;
    }
    return top;
}

/* Returns 0, -1 for arguments outside what the kernel handles (nothing written), -3 for too little scratch. */
int vq_conv_lut(const float *x, int64_t B, int64_t H, int64_t W, int64_t ldx, int64_t cx0, int64_t S, int64_t d,
                const float *cb, int64_t K, const uint8_t *P, int64_t cout, int64_t kh, int64_t kw, int64_t sh,
                int64_t sw, int64_t ph, int64_t pw, int64_t dh, int64_t dw, const float *bias, float *y, int64_t ldy,
                int64_t yc0, uint8_t *scratch, int64_t scratch_bytes, int isa)
{
    if (B < 0 || H < 1 || W < 1 || S < 1 || d < 1 || d > 64 || K < 1 || K > VQ_ROW || cout < 1 || kh < 1
        || kw < 1 || sh < 1 || sw < 1 || ph < 0 || pw < 0 || dh < 1 || dw < 1 || cx0 < 0 || cx0 + S * d > ldx
        || yc0 < 0 || !vq_isa_supported(isa))
        return -1;
    const int64_t Hp = H + 2 * ph, Wp = W + 2 * pw;
    if (Hp < dh * (kh - 1) + 1 || Wp < dw * (kw - 1) + 1) return -1;
    const int64_t Ho = (Hp - dh * (kh - 1) - 1) / sh + 1, Wo = (Wp - dw * (kw - 1) - 1) / sw + 1;
    if (yc0 + cout > ldy) return -1;
    if (scratch_bytes < vq_conv_scratch(H, W, S, ph, pw, Wo, kh, kw)) return -3;
    const int64_t S2 = (S + 1) / 2, ts = S2 * 32, nblk = (cout + 15) / 16, taps = kh * kw, HoWo = Ho * Wo;
    uint8_t *tab = (uint8_t *)(((uintptr_t)scratch + 63) & ~(uintptr_t)63);
    float *LO = (float *)(tab + conv_align(Hp * Wp * ts));
    int64_t *off = (int64_t *)((uint8_t *)LO + conv_align(Hp * Wp * 4));
    float *acc = (float *)((uint8_t *)off + conv_align(H * W * 12));
    float *offs = (float *)((uint8_t *)acc + conv_align(Wo * 16 * 4));
    int64_t *qoff = (int64_t *)((uint8_t *)offs + conv_align(Wo * 4));
    const int64_t Q = taps * S2;
    for (int64_t i = 0; i < kh; i++)                          /* (tap, pair) -> table offset from tap (0, 0) */
        for (int64_t j = 0; j < kw; j++)
            for (int64_t sp = 0; sp < S2; sp++) qoff[(i * kw + j) * S2 + sp] = (i * dh * Wp + j * dw) * ts + sp * 32;
    for (int64_t b = 0; b < B; b++) {
        const float step = conv_tables(x + (b * ldx + cx0) * H * W, H, W, S, d, cb, K, ph, pw, tab, LO, off, isa);
        float *yb = y + (b * ldy + yc0) * HoWo;
        for (int64_t oy = 0; oy < Ho; oy++) {
            for (int64_t ox = 0; ox < Wo; ox++) offs[ox] = 0.0f;
            for (int64_t i = 0; i < kh; i++)
                for (int64_t j = 0; j < kw; j++) {
                    const float *l = LO + (oy * sh + i * dh) * Wp + j * dw;
                    if (sw == 1)
                        for (int64_t ox = 0; ox < Wo; ox++) offs[ox] += l[ox];
                    else
                        for (int64_t ox = 0; ox < Wo; ox++) offs[ox] += l[ox * sw];
                }
            for (int64_t blk = 0; blk < nblk; blk++) {
                memset(acc, 0, (size_t)(Wo * 16) * sizeof(float));
                if (step > 0.0f) {
                    const uint8_t *pv = P + blk * taps * S2 * 16;
                    for (int64_t ox = 0; ox < Wo; ox += 4) {
                        const int np = (int)(Wo - ox < 4 ? Wo - ox : 4);
                        const uint8_t *tp[4];
                        for (int p = 0; p < np; p++) tp[p] = tab + (oy * sh * Wp + (ox + p) * sw) * ts;
#ifdef VQ_X86
                        if (isa == VQ_AVX2) {
                            conv_px_avx2(np, tp, qoff, Q, pv, step, acc + ox * 16);
                            continue;
                        }
#endif
                        conv_px_scalar(np, tp, qoff, Q, pv, step, acc + ox * 16);
                    }
                }
                const int64_t nc = cout - blk * 16 < 16 ? cout - blk * 16 : 16;
                int64_t ox0 = 0;
#ifdef VQ_X86
                if (isa == VQ_AVX2) ox0 = conv_store_avx2(acc, offs, yb + blk * 16 * HoWo + oy * Wo, HoWo, Wo, nc);
#endif
                for (int64_t c = 0; c < nc; c++) {
                    float *yc = yb + (blk * 16 + c) * HoWo + oy * Wo;
                    for (int64_t ox = ox0; ox < Wo; ox++) yc[ox] = acc[ox * 16 + c] + offs[ox];
                }
                if (bias)                                            /* (lookups + offset) + bias */
                    for (int64_t c = 0; c < nc; c++) {
                        float *yc = yb + (blk * 16 + c) * HoWo + oy * Wo;
                        const float bc = bias[yc0 + blk * 16 + c];
                        for (int64_t ox = 0; ox < Wo; ox++) yc[ox] += bc;
                    }
            }
        }
    }
    return 0;
}

/* The whole convolution in one call: geo = {B, H, W, C, S, d, K, cout, kh, kw, sh, sw, ph, pw, dh, dw, groups,
 * scratch_bytes, isa}: x (B, C, H, W), groups of C / groups input channels (S segments of d) and cout / groups
 * outputs, P (groups, ...) as vq_conv_lut's per group, bias (cout) or NULL, y (B, cout, Ho, Wo).
 * Returns 0; -1 / -3 as vq_conv_lut; -4 when the codebook holds a NaN or Inf (nothing written: run the exact
 * product); -5 when a nibble is >= K (*top = the largest; nothing written). */
int vq_conv_call(const int64_t *geo, const float *x, const float *cb, const uint8_t *P, const float *bias, float *y,
                 uint8_t *scratch, int *top)
{
    const int64_t B = geo[0], H = geo[1], W = geo[2], C = geo[3], S = geo[4], d = geo[5], K = geo[6];
    const int64_t cout = geo[7], kh = geo[8], kw = geo[9], groups = geo[16];
    const int isa = (int)geo[18];
    *top = 0;
    if (groups < 1 || C % groups || cout % groups || S * d * groups != C || K < 1 || K > VQ_ROW || d < 1
        || d > 64 || !vq_isa_supported(isa))
        return -1;
    for (int64_t i = 0; i < K * d; i++)
        if (!isfinite(cb[i])) return -4;
    const int64_t per = cout / groups, pstride = ((per + 15) / 16) * kh * kw * ((S + 1) / 2) * 16;
    if (K < VQ_ROW) {
        *top = vq_conv_maxnib(P, groups * pstride, isa);
        if (*top >= K) return -5;
    }
    for (int64_t g = 0; g < groups; g++) {
        const int rc = vq_conv_lut(x, B, H, W, C, g * S * d, S, d, cb, K, P + g * pstride, per, kh, kw, geo[10],
                                   geo[11], geo[12], geo[13], geo[14], geo[15], bias, y, cout, g * per, scratch,
                                   geo[17], isa);
        if (rc) return rc;
    }
    return 0;
}

/* A packed layer's small single-threaded call in one: geo = {B, S, d, K, rows, group, ngroups, check, isa,
 * table bytes (64-aligned)}; x (B, S * d), cb (K, d), P the packed code, bias (rows) or NULL, y (B, rows).
 * Returns 0; -1 as vq_matmul_packed; -4 when the codebook holds a NaN or Inf (run the exact product); -5 when a
 * nibble read is >= K (*top = the largest).  y is then not to be used. */
int vq_packed_call(const int64_t *geo, const float *x, const float *cb, const uint8_t *P, const float *bias, float *y,
                   uint8_t *scratch, int *top)
{
    const int64_t B = geo[0], S = geo[1], d = geo[2], K = geo[3], rows = geo[4], group = geo[5], ngroups = geo[6];
    *top = 0;
    if (K < 1 || K > VQ_ROW || d < 1) return -1;
    for (int64_t i = 0; i < K * d; i++)
        if (!isfinite(cb[i])) return -4;
    uint8_t *tab = (uint8_t *)(((uintptr_t)scratch + 63) & ~(uintptr_t)63);
    float *steps = (float *)(tab + geo[9]), *off = steps + B * ngroups;
    const int rc = vq_matmul_packed(x, B, S, d, cb, K, P, rows, y, rows, group, ngroups, tab, steps, off,
                                    (int)geo[7], top, (int)geo[8]);
    if (rc) return rc;
    if (*top >= K) return -5;
    if (bias)
        for (int64_t b = 0; b < B; b++)
            for (int64_t o = 0; o < rows; o++) y[b * rows + o] += bias[o];
    return 0;
}
