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
 * Tables: (ngroups, B, G, 16) uint8, group-major.
 * Index layout (built in Python from the checked copy): bytes (ngroups, nblk, G/2, 32), one 32-byte row per
 * pair of segments (2p, 2p+1) and block of 32 outputs: byte j (j < 16) = I[o_j, 2p] | I[o_{16+j}, 2p] << 4,
 * byte 16 + j = I[o_j, 2p+1] | I[o_{16+j}, 2p+1] << 4.  The table rows of a pair are 32 contiguous bytes, so
 * one vector load of indices feeds two 16-entry shuffles (AVX2 vpshufb: the 128-bit lanes are the two
 * segments, low / high nibbles the two halves of the output block).
 *
 * Memory safety: every read is bounded by the dimensions passed in; a nibble is < 16 and each table row has
 * 16 bytes, so even an index value >= K (never passed: Python checks indices < K) cannot leave its row.
 * Floating point: compiled with -ffp-contract=off and both paths perform the same float operations in the
 * same order, so the AVX2 and the scalar path give bit-identical outputs.
 */
#include <stdint.h>
#include <string.h>
#include <math.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define VQ_X86 1
#endif

#define VQ_ROW 16      /* table entries per segment */
#define VQ_BLK 32      /* outputs per block */
#define VQ_MAXG 256    /* largest group: 256 * 255 <= 65535 */

enum { VQ_SCALAR = 0, VQ_AVX2 = 1 };

int vq_abi_version(void) { return 1; }

int vq_isa_supported(int isa)
{
    if (isa == VQ_SCALAR) return 1;
#ifdef VQ_X86
    if (isa == VQ_AVX2) {
        __builtin_cpu_init();
        return __builtin_cpu_supports("avx2") ? 1 : 0;
    }
#endif
    return 0;
}

/* ------------------------------------------------------------------ tables */

/* x (B, S*d) float32 rows, cbt (d, 16) float32 (codebook transposed, columns >= K unused),
 * tab (ngroups, B, group, 16) uint8 (group-major: the tables of all rows for one group are contiguous; with
 * (B, S, 16) rows 32 KB apart collided in the same L1 sets), steps (B, ngroups) float32, offset (B,). */
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
            uint8_t *tg = tab + (g * B + b) * group * VQ_ROW;
            for (int64_t i = 0; i < cnt; i++) {
                for (int k = 0; k < VQ_ROW; k++) {
                    float v = (t[i][k] - lo[i]) * inv + 0.5f;
                    v = v >= 0.0f ? v : 0.0f;                               /* also maps NaN to 0 */
                    v = v <= 255.0f ? v : 255.0f;
                    tg[i * VQ_ROW + k] = (k < K) ? (uint8_t)(int)v : 0;
                }
            }
            memset(tg + cnt * VQ_ROW, 0, (size_t)((group - cnt) * VQ_ROW)); /* padded segments add 0 */
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
            uint8_t *tg = tab + (g * B + b) * group * VQ_ROW;
            for (int64_t i = 0; i < cnt; i++) {
                const __m256 l = _mm256_set1_ps(lo[i]);
                __m256 v0 = _mm256_add_ps(_mm256_mul_ps(_mm256_sub_ps(t0[i], l), vinv), half);
                __m256 v1 = _mm256_add_ps(_mm256_mul_ps(_mm256_sub_ps(t1[i], l), vinv), half);
                v0 = _mm256_min_ps(_mm256_max_ps(v0, zero), top);       /* max_ps(NaN, 0) = 0, as in C */
                v1 = _mm256_min_ps(_mm256_max_ps(v1, zero), top);
                const __m256i w = _mm256_permute4x64_epi64(
                    _mm256_packs_epi32(_mm256_cvttps_epi32(v0), _mm256_cvttps_epi32(v1)), 0xd8);
                const __m128i q = _mm_packus_epi16(_mm256_castsi256_si128(w), _mm256_extracti128_si256(w, 1));
                _mm_storeu_si128((__m128i *)(tg + i * VQ_ROW), _mm_and_si128(q, mask));
            }
            memset(tg + cnt * VQ_ROW, 0, (size_t)((group - cnt) * VQ_ROW));
        }
        offset[b] = bad ? NAN : off;
    }
}
#endif

/* Returns 0, or -1 for arguments outside what the kernel handles (nothing is written then). */
int vq_tables(const float *x, int64_t B, int64_t S, int64_t d, const float *cbt, int64_t K, int64_t group,
              int64_t ngroups, uint8_t *tab, float *steps, float *offset, int isa)
{
    if (B < 0 || S < 1 || d < 1 || K < 1 || K > VQ_ROW || group < 2 || group > VQ_MAXG || group % 2
        || ngroups < 1 || ngroups * group < S || (ngroups - 1) * group >= S || !vq_isa_supported(isa))
        return -1;
#ifdef VQ_X86
    if (isa == VQ_AVX2) { tables_avx2(x, B, S, d, cbt, K, group, ngroups, tab, steps, offset); return 0; }
#endif
    tables_scalar(x, B, S, d, cbt, K, group, ngroups, tab, steps, offset);
    return 0;
}

/* ------------------------------------------------------------------ lookups: scalar */

static void lut_scalar(const uint8_t *idx, const uint8_t *tab, const float *steps, float *y, int64_t B,
                       int64_t nblk, int64_t blk0, int64_t blk1, int64_t ngroups, int64_t group)
{
    const int64_t half = group / 2, ldy = nblk * VQ_BLK;
    for (int64_t g = 0; g < ngroups; g++) {
        for (int64_t blk = blk0; blk < blk1; blk++) {
            const uint8_t *ib = idx + (g * nblk + blk) * half * VQ_BLK;
            for (int64_t b = 0; b < B; b++) {
                const uint8_t *tg = tab + (g * B + b) * group * VQ_ROW;
                uint32_t acc[VQ_BLK];
                for (int j = 0; j < VQ_BLK; j++) acc[j] = 0;
                for (int64_t p = 0; p < half; p++) {
                    const uint8_t *v = ib + p * VQ_BLK;
                    const uint8_t *t0 = tg + 2 * p * VQ_ROW, *t1 = t0 + VQ_ROW;
                    for (int j = 0; j < 16; j++) {
                        acc[j] += t0[v[j] & 15] + t1[v[16 + j] & 15];
                        acc[16 + j] += t0[v[j] >> 4] + t1[v[16 + j] >> 4];
                    }
                }
                const float step = steps[b * ngroups + g];
                float *yb = y + b * ldy + blk * VQ_BLK;
                for (int j = 0; j < VQ_BLK; j++) yb[j] = yb[j] + (float)acc[j] * step;
            }
        }
    }
}

/* ------------------------------------------------------------------ lookups: AVX2 */

#ifdef VQ_X86
/* 16 outputs from the two uint16 accumulators of one half block: a = sum of (even + 256 * odd byte),
 * c = sum of odd bytes (both per 16-bit lane; lane 0 / lane 1 = the pair's two segments). */
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

/* One step of one input row: the pair's 32 table bytes at t, shuffled by the low / high nibbles, added to the
 * uint16 accumulators (A: even + 256 * odd bytes, C: odd bytes) of outputs 0..15 (lo) and 16..31 (hi). */
#define VQ_STEP(t, ALO, CLO, AHI, CHI) do {                                      \
        const __m256i u_ = _mm256_shuffle_epi8(t, lo);                          \
        const __m256i w_ = _mm256_shuffle_epi8(t, hi);                          \
        ALO = _mm256_add_epi16(ALO, u_);                                        \
        CLO = _mm256_add_epi16(CLO, _mm256_srli_epi16(u_, 8));                  \
        AHI = _mm256_add_epi16(AHI, w_);                                        \
        CHI = _mm256_add_epi16(CHI, _mm256_srli_epi16(w_, 8));                  \
    } while (0)

/* One group x one block of 32 outputs for one input row.  ib: the block's G/2 rows of 32 index bytes;
 * tg: the row's table at the group's first segment; yb: the row's 32 outputs. */
static inline __attribute__((always_inline, target("avx2")))
void block1_avx2(const uint8_t *ib, int64_t half, const uint8_t *tg, float step, float *yb)
{
    const __m256i m4 = _mm256_set1_epi8(0x0f);
    __m256i alo = _mm256_setzero_si256(), clo = _mm256_setzero_si256();
    __m256i ahi = _mm256_setzero_si256(), chi = _mm256_setzero_si256();
    for (int64_t p = 0; p < half; p++) {
        const __m256i v = _mm256_loadu_si256((const __m256i *)(ib + p * VQ_BLK));
        const __m256i lo = _mm256_and_si256(v, m4);
        const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
        const __m256i t = _mm256_loadu_si256((const __m256i *)(tg + p * VQ_BLK));
        VQ_STEP(t, alo, clo, ahi, chi);
    }
    const __m256 st = _mm256_set1_ps(step);
    flush16(alo, clo, st, yb);
    flush16(ahi, chi, st, yb + 16);
}

/* The same for two input rows (tables tg and tg + tstride, outputs yb and yb + ldy): one index load feeds
 * four shuffles; 8 accumulators + 6 temporaries fit the 16 registers. */
static inline __attribute__((always_inline, target("avx2")))
void block2_avx2(const uint8_t *ib, int64_t half, const uint8_t *tg, int64_t tstride, float step0, float step1,
                 float *yb, int64_t ldy)
{
    const __m256i m4 = _mm256_set1_epi8(0x0f);
    __m256i alo0 = _mm256_setzero_si256(), clo0 = _mm256_setzero_si256();
    __m256i ahi0 = _mm256_setzero_si256(), chi0 = _mm256_setzero_si256();
    __m256i alo1 = _mm256_setzero_si256(), clo1 = _mm256_setzero_si256();
    __m256i ahi1 = _mm256_setzero_si256(), chi1 = _mm256_setzero_si256();
    const uint8_t *tg1 = tg + tstride;
    for (int64_t p = 0; p < half; p++) {
        const __m256i v = _mm256_loadu_si256((const __m256i *)(ib + p * VQ_BLK));
        const __m256i lo = _mm256_and_si256(v, m4);
        const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
        const __m256i t0 = _mm256_loadu_si256((const __m256i *)(tg + p * VQ_BLK));
        VQ_STEP(t0, alo0, clo0, ahi0, chi0);
        const __m256i t1 = _mm256_loadu_si256((const __m256i *)(tg1 + p * VQ_BLK));
        VQ_STEP(t1, alo1, clo1, ahi1, chi1);
    }
    const __m256 s0 = _mm256_set1_ps(step0), s1 = _mm256_set1_ps(step1);
    flush16(alo0, clo0, s0, yb);
    flush16(ahi0, chi0, s0, yb + 16);
    flush16(alo1, clo1, s1, yb + ldy);
    flush16(ahi1, chi1, s1, yb + ldy + 16);
}

__attribute__((target("avx2")))
static void lut_avx2(const uint8_t *idx, const uint8_t *tab, const float *steps, float *y, int64_t B,
                     int64_t nblk, int64_t blk0, int64_t blk1, int64_t ngroups, int64_t group)
{
    const int64_t half = group / 2, ldy = nblk * VQ_BLK, tstride = group * VQ_ROW;
    for (int64_t g = 0; g < ngroups; g++) {
        for (int64_t blk = blk0; blk < blk1; blk++) {
            const uint8_t *ib = idx + (g * nblk + blk) * half * VQ_BLK;
            int64_t b = 0;
            const uint8_t *tg = tab + g * B * tstride;
            for (; b + 2 <= B; b += 2)
                block2_avx2(ib, half, tg + b * tstride, tstride, steps[b * ngroups + g],
                            steps[(b + 1) * ngroups + g], y + b * ldy + blk * VQ_BLK, ldy);
            if (b < B)
                block1_avx2(ib, half, tg + b * tstride, steps[b * ngroups + g], y + b * ldy + blk * VQ_BLK);
        }
    }
}
#endif

/* y (B, nblk*32) float32: its blocks [blk0, blk1) are set to offset[b] + the lookups.  Returns 0, or -1 for
 * arguments outside what the kernel handles (nothing is written then). */
int vq_lut(const uint8_t *idx, const uint8_t *tab, const float *steps, const float *offset, float *y, int64_t B,
           int64_t nblk, int64_t blk0, int64_t blk1, int64_t ngroups, int64_t group, int isa)
{
    if (B < 0 || nblk < 1 || blk0 < 0 || blk1 > nblk || blk0 > blk1 || ngroups < 1 || group < 2
        || group > VQ_MAXG || group % 2 || !vq_isa_supported(isa))
        return -1;
    const int64_t ldy = nblk * VQ_BLK;
    for (int64_t b = 0; b < B; b++)
        for (int64_t o = blk0 * VQ_BLK; o < blk1 * VQ_BLK; o++) y[b * ldy + o] = offset[b];
#ifdef VQ_X86
    if (isa == VQ_AVX2) { lut_avx2(idx, tab, steps, y, B, nblk, blk0, blk1, ngroups, group); return 0; }
#endif
    lut_scalar(idx, tab, steps, y, B, nblk, blk0, blk1, ngroups, group);
    return 0;
}
