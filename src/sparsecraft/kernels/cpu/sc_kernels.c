/* sparsecraft CPU kernels: y = x . W^T with W stored compressed (bitmask or packed N:M).
 *
 * Compiled at first use by the system C compiler (see build.py) into a per-user cache and called
 * through ctypes with raw tensor pointers; no torch headers, so a build takes seconds.
 *
 * Shapes: x (B, in) fp32 row-major with row stride ldx; y (B, out) fp32 with row stride ldy.
 * Layouts follow the sparsecraft compressed-tensor contract (formats/):
 *   bitmask: mask uint8 (out, ceil(in/8)), bit j%8 of byte j/8 set iff W[i,j] kept;
 *            values in row-major order; row_offsets int64 (out+1) count value slots
 *            (for int4 codes: nibbles, each row padded to an even count).
 *   N:M:     values (out, L = in*N/M) (int4: L padded to even, 2 codes a byte, low nibble first);
 *            indices 2 bits (M <= 4) or 4 bits (M <= 16) per value, little-endian along the row,
 *            each row padded to a whole byte.
 *   quantized: code -> (code - zero) * scale, scale fp16 (out, ceil(in/G)), zero uint8 or none.
 * Value types (vt): 0 fp32, 1 bf16, 2 fp16, 3 int8 (symmetric), 4 uint8 (asymmetric),
 *                   5 int4 (symmetric, nibble = code & 0xF), 6 uint4 (asymmetric).
 *
 * Design notes (why):
 *  - Decoding one token is memory-bound, so each kernel streams the compressed bytes exactly once
 *    per call and keeps all arithmetic in registers.  With AVX-512 a 16-bit chunk of the mask is
 *    the write mask of an expand-load, which places the next popcount(mask) values at their dense
 *    positions; x is loaded under the same mask, so pruned positions cost nothing but a zero lane.
 *  - int8 codes at batch 1 go 64 columns per mask word: one byte expand (VBMI2) places 64 codes,
 *    which are widened 16 at a time.
 *  - Dense rows (kind 2: float values, e.g. an unpruned lm_head, or quantized codes) are one
 *    sequential stream read with four independent accumulators, at the memory's read bandwidth.
 *  - Batches up to 4 rows share one decode per chunk (weights decoded once, reused from registers);
 *    larger batches run in tiles of 4 over the same row while it is hot in L1.
 *  - Small layers (under SC_PAR_MIN_BYTES compressed bytes) run on the calling thread: an OpenMP
 *    fork/join costs more than it saves there.
 *  - Threads get contiguous row ranges balanced by stored bytes (bitmask rows differ in density).
 *  - Everything has a portable scalar twin used when __AVX512F__ is absent (and in tests).
 */
#include <stdint.h>
#include <stddef.h>
#include <string.h>
#include <stdlib.h>
#include <math.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512VBMI2__) \
    && defined(__BMI2__)
#include <immintrin.h>
#define SC_AVX512 1
#else
#define SC_AVX512 0
#endif

enum { VT_F32 = 0, VT_BF16 = 1, VT_F16 = 2, VT_I8 = 3, VT_U8 = 4, VT_I4 = 5, VT_U4 = 6 };

int sc_has_avx512(void) { return SC_AVX512; }
int sc_abi_version(void) { return 5; }

/* ------------------------------------------------------------------ scalar helpers */
static inline float f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ffu, bits;
    if (exp == 0) {
        if (man == 0) {
            bits = sign;
        } else { /* subnormal: normalise */
            exp = 127 - 15 + 1;
            while (!(man & 0x400u)) { man <<= 1; exp--; }
            man &= 0x3ffu;
            bits = sign | (exp << 23) | (man << 13);
        }
    } else if (exp == 31) {
        bits = sign | 0x7f800000u | (man << 13);
    } else {
        bits = sign | ((exp - 15 + 127) << 23) | (man << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}
static inline float bf16_to_f32(uint16_t h) {
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}
static inline int is_quant(int vt) { return vt >= VT_I8; }
static inline int is_int4(int vt) { return vt == VT_I4 || vt == VT_U4; }
/* bytes from the start of a dense (or N:M) value row i of Lpad slots */
static inline int64_t row_byte_offset(int vt, int64_t i, int64_t Lpad) {
    return is_int4(vt) ? i * Lpad / 2 : i * Lpad * (vt == VT_F32 ? 4 : (vt == VT_BF16 || vt == VT_F16) ? 2 : 1);
}

/* raw value of slot s (before scale) */
static inline float raw_value(int vt, const void* values, int64_t s) {
    switch (vt) {
        case VT_F32: return ((const float*)values)[s];
        case VT_BF16: return bf16_to_f32(((const uint16_t*)values)[s]);
        case VT_F16: return f16_to_f32(((const uint16_t*)values)[s]);
        case VT_I8: return (float)((const int8_t*)values)[s];
        case VT_U8: return (float)((const uint8_t*)values)[s];
        case VT_I4: {
            int c = (((const uint8_t*)values)[s >> 1] >> ((s & 1) * 4)) & 0xf;
            return (float)(c >= 8 ? c - 16 : c);
        }
        default: { /* VT_U4 */
            int c = (((const uint8_t*)values)[s >> 1] >> ((s & 1) * 4)) & 0xf;
            return (float)c;
        }
    }
}

/* Dequantisation parameters of one row. */
typedef struct {
    const uint16_t* scales; /* (out, ngroups) fp16 or NULL */
    const uint8_t* zeros;   /* (out, ngroups) or NULL */
    int64_t ngroups;
    int64_t G;
    int gshift; /* log2(G) when G is a power of two (the contract's 32/64/128), else -1 */
} quant_t;

/* Everything one call needs, shared read-only by the threads. */
typedef struct {
    int kind, vt; /* kind: 0 bitmask, 1 N:M, 2 dense */
    int64_t out, in;
    const uint8_t* meta; /* bitmask mask / N:M indices */
    const void* values;
    const int64_t* ro; /* bitmask row offsets */
    int64_t nslots;    /* bitmask: value slots in all */
    int N, M;
    quant_t q;
    const float* x;
    int64_t B, ldx;
    float* y;
    int64_t ldy;
    const float* bias;
    const float* xT; /* x transposed for the batched path, or NULL */
} job_t;

#ifndef SC_PAR_MIN_BYTES
#define SC_PAR_MIN_BYTES (96 * 1024)
#endif

static inline int log2_exact(int64_t v) {
    for (int k = 0; k < 62; k++)
        if (((int64_t)1 << k) == v) return k;
    return -1;
}
/* group of column col without a division on the hot path */
static inline int64_t group_of(const quant_t* q, int64_t col) { return q->gshift >= 0 ? col >> q->gshift : col / q->G; }

static inline float deq(int vt, float raw, const quant_t* q, int64_t row, int64_t col) {
    if (!is_quant(vt)) return raw;
    int64_t g = col / q->G;
    float z = q->zeros ? (float)q->zeros[row * q->ngroups + g] : 0.0f;
    return (raw - z) * f16_to_f32(q->scales[row * q->ngroups + g]);
}

/* ------------------------------------------------------------------ scalar kernels */
static void bm_rows_scalar(const uint8_t* mask, const void* values, const int64_t* ro, int64_t in,
                           int vt, const quant_t* q, const float* x, int64_t B, int64_t ldx, float* y,
                           int64_t ldy, const float* bias, int64_t r0, int64_t r1) {
    int64_t mb = (in + 7) / 8;
    for (int64_t i = r0; i < r1; i++) {
        const uint8_t* mr = mask + i * mb;
        for (int64_t b = 0; b < B; b++) {
            const float* xb = x + b * ldx;
            double acc = 0.0;
            int64_t s = ro[i];
            for (int64_t j = 0; j < in; j++) {
                if (mr[j >> 3] >> (j & 7) & 1) {
                    acc += (double)deq(vt, raw_value(vt, values, s), q, i, j) * xb[j];
                    s++;
                }
            }
            y[b * ldy + i] = (float)acc + (bias ? bias[i] : 0.0f);
        }
    }
}

static void nm_rows_scalar(const uint8_t* idx, const void* values, int64_t in, int N, int M, int vt,
                           const quant_t* q, const float* x, int64_t B, int64_t ldx, float* y, int64_t ldy,
                           const float* bias, int64_t r0, int64_t r1) {
    int64_t L = in / M * N;
    int64_t Lpad = is_int4(vt) ? (L + 1) / 2 * 2 : L;
    int bits = M <= 4 ? 2 : 4;
    int64_t ib = (L * bits + 7) / 8;
    for (int64_t i = r0; i < r1; i++) {
        const uint8_t* ir = idx + i * ib;
        for (int64_t b = 0; b < B; b++) {
            const float* xb = x + b * ldx;
            double acc = 0.0;
            for (int64_t k = 0; k < L; k++) {
                int64_t bit = k * bits;
                int p = (ir[bit >> 3] >> (bit & 7)) & ((1 << bits) - 1);
                int64_t col = (k / N) * M + p;
                acc += (double)deq(vt, raw_value(vt, values, i * Lpad + k), q, i, col) * xb[col];
            }
            y[b * ldy + i] = (float)acc + (bias ? bias[i] : 0.0f);
        }
    }
}

/* quantized dense rows (no sparsity metadata): codes (out, in), int4 rows padded to even */
static void qd_rows_scalar(const void* values, int64_t in, int vt, const quant_t* q, const float* x, int64_t B,
                           int64_t ldx, float* y, int64_t ldy, const float* bias, int64_t r0, int64_t r1) {
    int64_t Lpad = is_int4(vt) ? (in + 1) / 2 * 2 : in;
    for (int64_t i = r0; i < r1; i++) {
        for (int64_t b = 0; b < B; b++) {
            const float* xb = x + b * ldx;
            double acc = 0.0;
            for (int64_t j = 0; j < in; j++)
                acc += (double)deq(vt, raw_value(vt, values, i * Lpad + j), q, i, j) * xb[j];
            y[b * ldy + i] = (float)acc + (bias ? bias[i] : 0.0f);
        }
    }
}

#if SC_AVX512
/* ------------------------------------------------------------------ AVX-512 kernels */
#define SC_INLINE static inline __attribute__((always_inline))

/* batch rows in tiles of 4, then the last 1..3, so that NB is a compile-time constant in every tile
 * call (its accumulators stay in registers); TILE(NB) sees the tile's first row as b */
#define SC_BATCH_TILES(TILE)                     \
    do {                                         \
        int64_t b = 0;                           \
        for (; b + 4 <= B; b += 4) TILE(4);      \
        switch (B - b) {                         \
            case 3: TILE(3); break;              \
            case 2: TILE(2); break;              \
            case 1: TILE(1); break;              \
            default: break;                      \
        }                                        \
    } while (0)

#ifndef SC_MASK_PF_ROWS
#define SC_MASK_PF_ROWS 4 /* mask rows prefetched ahead */
#endif
#ifndef SC_PF_BYTES
#define SC_PF_BYTES 1536 /* software prefetch distance: the value stream advances by a data-dependent
                            amount, which the hardware prefetchers here follow poorly */
#endif
/* 16 raw codes/values (as fp32) expanded under mask m from the value stream at slot *s.
 * A full-width unmasked load + register expand is much faster than an expand-load from memory
 * (or a masked load) when the data comes from DRAM; near the end of the buffer (s > safe) the
 * masked form keeps the read inside it. */
SC_INLINE __m512 bm_decode(int vt, __mmask16 m, const void* values, int64_t* s, int64_t safe) {
    int pc = __builtin_popcount((unsigned)m);
    int64_t s0 = *s;
    int full = s0 <= safe;
    __mmask16 low = (__mmask16)((1u << pc) - 1);
    __m512 w;
    switch (vt) {
        case VT_F32: {
            const float* p = (const float*)values + s0;
            _mm_prefetch((const char*)p + SC_PF_BYTES, _MM_HINT_T0);
            w = full ? _mm512_maskz_expand_ps(m, _mm512_loadu_ps(p)) : _mm512_maskz_expandloadu_ps(m, p);
            break;
        }
        case VT_BF16:
        case VT_F16: { /* convert the packed values, then expand 32-bit lanes (fast on every AVX-512 core) */
            const uint16_t* p = (const uint16_t*)values + s0;
            _mm_prefetch((const char*)p + SC_PF_BYTES, _MM_HINT_T0);
            __m256i h = full ? _mm256_loadu_si256((const __m256i*)p) : _mm256_maskz_loadu_epi16(low, p);
            __m512 f = vt == VT_BF16 ? _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16))
                                     : _mm512_cvtph_ps(h);
            w = _mm512_maskz_expand_ps(m, f);
            break;
        }
        case VT_I8:
        case VT_U8: {
            const uint8_t* p = (const uint8_t*)values + s0;
            _mm_prefetch((const char*)p + SC_PF_BYTES / 2, _MM_HINT_T0);
            __m128i c = full ? _mm_loadu_si128((const __m128i*)p) : _mm_maskz_loadu_epi8(low, p);
            __m512i c32 = vt == VT_I8 ? _mm512_cvtepi8_epi32(c) : _mm512_cvtepu8_epi32(c);
            w = _mm512_maskz_expand_ps(m, _mm512_cvtepi32_ps(c32));
            break;
        }
        default: { /* int4 / uint4: pc nibbles starting at nibble s0 */
            const uint8_t* p = (const uint8_t*)values + (s0 >> 1);
            _mm_prefetch((const char*)p + SC_PF_BYTES / 4, _MM_HINT_T0);
            int odd = (int)(s0 & 1);
            int nbytes = (odd + pc + 1) >> 1; /* <= 9 */
            __m128i raw = full ? _mm_loadu_si128((const __m128i*)p) : _mm_maskz_loadu_epi8((__mmask16)((1u << nbytes) - 1), p);
            uint64_t lo = (uint64_t)_mm_cvtsi128_si64(raw);
            uint64_t hi = (uint64_t)_mm_extract_epi64(raw, 1);
            /* branch-free: a data-dependent branch on the nibble phase mispredicts half the time */
            unsigned __int128 both = ((unsigned __int128)hi << 64) | lo;
            uint64_t nib = (uint64_t)(both >> (4 * odd));
            uint64_t b0 = _pdep_u64(nib & 0xffffffffu, 0x0f0f0f0f0f0f0f0full);
            uint64_t b1 = _pdep_u64(nib >> 32, 0x0f0f0f0f0f0f0f0full);
            __m128i c = _mm_set_epi64x((long long)b1, (long long)b0);
            __m512i c32;
            if (vt == VT_I4) { /* sign-extend 4-bit two's complement */
                c = _mm_sub_epi8(_mm_xor_si128(c, _mm_set1_epi8(8)), _mm_set1_epi8(8));
                c32 = _mm512_cvtepi8_epi32(c);
            } else {
                c32 = _mm512_cvtepu8_epi32(c);
            }
            w = _mm512_maskz_expand_ps(m, _mm512_cvtepi32_ps(c32));
            break;
        }
    }
    *s = s0 + pc;
    return w;
}

/* last slot from which bm_decode may read a full vector without leaving the value buffer */
static inline int64_t safe_slot(int vt, int64_t nslots) {
    return nslots - (vt == VT_I4 || vt == VT_U4 ? 32 : 16);
}

/* scale (and zero point) of the group holding column j of row i, applied to raw w under mask m */
SC_INLINE __m512 apply_quant(int vt, __m512 w, __mmask16 m, const quant_t* q, int64_t i, int64_t j) {
    if (!is_quant(vt)) return w;
    int64_t g = i * q->ngroups + group_of(q, j);
    __m512 sc = _mm512_set1_ps(_cvtsh_ss(q->scales[g]));
    if (q->zeros) w = _mm512_maskz_sub_ps(m, w, _mm512_set1_ps((float)q->zeros[g]));
    return _mm512_mul_ps(w, sc);
}

SC_INLINE __mmask16 load_mask16(const uint8_t* mr, int64_t j, int64_t in) {
    int64_t rem = in - j;
    if (rem >= 16) {
        uint16_t v;
        memcpy(&v, mr + (j >> 3), 2);
        return (__mmask16)v;
    }
    uint32_t v = mr[j >> 3];
    if (rem > 8) v |= (uint32_t)mr[(j >> 3) + 1] << 8;
    return (__mmask16)(v & ((1u << rem) - 1));
}

/* One output row, NB (compile-time) batch rows. */
SC_INLINE void bm_row_tile(const uint8_t* mr, const void* values, int64_t s, int64_t safe, int64_t in, int vt,
                           const quant_t* q, int64_t i, const float* x, int64_t ldx, float* y, int64_t ldy,
                           float bias, const int NB) {
    __m512 acc[NB > 1 ? NB : 2];
    for (int b = 0; b < (NB > 1 ? NB : 2); b++) acc[b] = _mm512_setzero_ps();
    int64_t j = 0;
    if (NB == 1) { /* two accumulators hide the FMA latency */
        for (; j + 32 <= in; j += 32) {
            __mmask16 m0 = load_mask16(mr, j, in), m1 = load_mask16(mr, j + 16, in);
            __m512 w0 = apply_quant(vt, bm_decode(vt, m0, values, &s, safe), m0, q, i, j);
            __m512 w1 = apply_quant(vt, bm_decode(vt, m1, values, &s, safe), m1, q, i, j + 16);
            acc[0] = _mm512_fmadd_ps(w0, _mm512_maskz_loadu_ps(m0, x + j), acc[0]);
            acc[1] = _mm512_fmadd_ps(w1, _mm512_maskz_loadu_ps(m1, x + j + 16), acc[1]);
        }
    }
    for (; j < in; j += 16) {
        __mmask16 m = load_mask16(mr, j, in);
        __m512 w = apply_quant(vt, bm_decode(vt, m, values, &s, safe), m, q, i, j);
        for (int b = 0; b < NB; b++)
            acc[b] = _mm512_fmadd_ps(w, _mm512_maskz_loadu_ps(m, x + b * ldx + j), acc[b]);
    }
    if (NB == 1) {
        y[i] = _mm512_reduce_add_ps(_mm512_add_ps(acc[0], acc[1])) + bias;
    } else {
        for (int b = 0; b < NB; b++) y[b * ldy + i] = _mm512_reduce_add_ps(acc[b]) + bias;
    }
}

/* Quantized codes: accumulate raw codes * x over one scale group, then scale once per group
 * (instead of one scale multiply per 16 columns). Needs group_size % 16 == 0. */
SC_INLINE void bm_row_tile_q(const uint8_t* mr, const void* values, int64_t s, int64_t safe, int64_t in, int vt,
                             const quant_t* q, int64_t i, const float* x, int64_t ldx, float* y, int64_t ldy,
                             float bias, const int NB) {
    __m512 acc[NB > 1 ? NB : 2];
    for (int b = 0; b < (NB > 1 ? NB : 2); b++) acc[b] = _mm512_setzero_ps();
    const int64_t G = q->G;
    for (int64_t g0 = 0, gi = i * q->ngroups; g0 < in; g0 += G, gi++) {
        int64_t g1 = g0 + G < in ? g0 + G : in;
        __m512 ga[NB > 1 ? NB : 2];
        for (int b = 0; b < (NB > 1 ? NB : 2); b++) ga[b] = _mm512_setzero_ps();
        __m512 zero = _mm512_set1_ps(q->zeros ? (float)q->zeros[gi] : 0.0f);
        int64_t j = g0;
        if (NB == 1) { /* two named accumulators (a runtime-indexed one would live in memory) */
            for (; j + 32 <= g1; j += 32) {
                __mmask16 m0 = load_mask16(mr, j, in), m1 = load_mask16(mr, j + 16, in);
                __m512 w0 = bm_decode(vt, m0, values, &s, safe);
                __m512 w1 = bm_decode(vt, m1, values, &s, safe);
                if (vt == VT_U8 || vt == VT_U4) {
                    w0 = _mm512_maskz_sub_ps(m0, w0, zero);
                    w1 = _mm512_maskz_sub_ps(m1, w1, zero);
                }
                ga[0] = _mm512_fmadd_ps(w0, _mm512_maskz_loadu_ps(m0, x + j), ga[0]);
                ga[1] = _mm512_fmadd_ps(w1, _mm512_maskz_loadu_ps(m1, x + j + 16), ga[1]);
            }
        }
        for (; j < g1; j += 16) {
            __mmask16 m = load_mask16(mr, j, in);
            __m512 w = bm_decode(vt, m, values, &s, safe);
            if (vt == VT_U8 || vt == VT_U4) w = _mm512_maskz_sub_ps(m, w, zero);
            for (int b = 0; b < NB; b++)
                ga[b] = _mm512_fmadd_ps(w, _mm512_maskz_loadu_ps(m, x + b * ldx + j), ga[b]);
        }
        __m512 sc = _mm512_set1_ps(_cvtsh_ss(q->scales[gi]));
        if (NB == 1) {
            acc[0] = _mm512_fmadd_ps(_mm512_add_ps(ga[0], ga[1]), sc, acc[0]);
        } else {
            for (int b = 0; b < NB; b++) acc[b] = _mm512_fmadd_ps(ga[b], sc, acc[b]);
        }
    }
    if (NB == 1) {
        y[i] = _mm512_reduce_add_ps(acc[0]) + bias;
    } else {
        for (int b = 0; b < NB; b++) y[b * ldy + i] = _mm512_reduce_add_ps(acc[b]) + bias;
    }
}

/* int8 / uint8 codes with group_size % 64 == 0: one 64-bit word of the mask drives one byte expand
 * (VBMI2 vpexpandb) that places 64 codes at their dense positions; they are widened 16 at a time
 * and multiplied with x unmasked (a pruned lane holds code 0), accumulated per quant group, and the
 * group's scale applied once.  Per 64 columns that is one mask load, one popcount and one value
 * load instead of four of each.  Columns past the last multiple of 64 take the 16-column path. */
SC_INLINE __m512 widen_i8(int vt, __m512i c, const int k) {
    __m128i c8 = k == 0 ? _mm512_castsi512_si128(c)
                 : k == 1 ? _mm512_extracti32x4_epi32(c, 1)
                 : k == 2 ? _mm512_extracti32x4_epi32(c, 2)
                          : _mm512_extracti32x4_epi32(c, 3);
    return _mm512_cvtepi32_ps(vt == VT_I8 ? _mm512_cvtepi8_epi32(c8) : _mm512_cvtepu8_epi32(c8));
}

/* One batch row (the decode case), named accumulators: an array indexed in the group loop would live
 * in memory.  Batches of 2-4 rows take bm_row_tile_q, 5 and more the batched path. */
SC_INLINE float bm_row_i8(const uint8_t* mr, const void* values, int64_t s, int64_t nslots, int64_t safe, int64_t in,
                          int vt, const quant_t* q, int64_t i, const float* x) {
    const uint8_t* v8 = (const uint8_t*)values;
    const uint16_t* scales = q->scales + i * q->ngroups;
    const uint8_t* zeros = q->zeros ? q->zeros + i * q->ngroups : NULL;
    const int64_t G = q->G;
    __m512 acc = _mm512_setzero_ps();
    for (int64_t g0 = 0, gi = 0; g0 < in; g0 += G, gi++) {
        const int64_t g1 = g0 + G < in ? g0 + G : in;
        const __m512 zero = _mm512_set1_ps(zeros ? (float)zeros[gi] : 0.0f);
        __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        int64_t j = g0;
        for (; j + 64 <= g1; j += 64) {
            uint64_t m;
            memcpy(&m, mr + (j >> 3), 8);
            const int pc = __builtin_popcountll(m);
            const uint8_t* p = v8 + s;
            _mm_prefetch((const char*)p + SC_PF_BYTES / 2, _MM_HINT_T0);
            __m512i raw = s + 64 <= nslots ? _mm512_loadu_si512(p)
                                           : _mm512_maskz_loadu_epi8(pc == 64 ? ~0ull : (1ull << pc) - 1, p);
            const __m512i c = _mm512_maskz_expand_epi8((__mmask64)m, raw);
            s += pc;
            __m512 w0 = widen_i8(vt, c, 0), w1 = widen_i8(vt, c, 1), w2 = widen_i8(vt, c, 2), w3 = widen_i8(vt, c, 3);
            if (vt == VT_U8) {
                w0 = _mm512_maskz_sub_ps((__mmask16)m, w0, zero);
                w1 = _mm512_maskz_sub_ps((__mmask16)(m >> 16), w1, zero);
                w2 = _mm512_maskz_sub_ps((__mmask16)(m >> 32), w2, zero);
                w3 = _mm512_maskz_sub_ps((__mmask16)(m >> 48), w3, zero);
            }
            a0 = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x + j), a0);
            a1 = _mm512_fmadd_ps(w1, _mm512_loadu_ps(x + j + 16), a1);
            a2 = _mm512_fmadd_ps(w2, _mm512_loadu_ps(x + j + 32), a2);
            a3 = _mm512_fmadd_ps(w3, _mm512_loadu_ps(x + j + 48), a3);
        }
        for (; j < g1; j += 16) {
            __mmask16 m = load_mask16(mr, j, in);
            __m512 w = bm_decode(vt, m, values, &s, safe);
            if (vt == VT_U8) w = _mm512_maskz_sub_ps(m, w, zero);
            a0 = _mm512_fmadd_ps(w, _mm512_maskz_loadu_ps(m, x + j), a0);
        }
        const __m512 t = _mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3));
        acc = _mm512_fmadd_ps(t, _mm512_set1_ps(_cvtsh_ss(scales[gi])), acc);
    }
    return _mm512_reduce_add_ps(acc);
}

#define BM_TILE(NB_)                                                                                        \
    do {                                                                                                   \
        if ((vt == VT_I8 || vt == VT_U8) && i8_wide && NB_ == 1)                                          \
            y[b * ldy + i] = bm_row_i8(mr, values, ro[i], nslots, safe, in, vt, q, i, x + b * ldx) + bi; \
        else if (is_quant(vt))                                                                             \
            bm_row_tile_q(mr, values, ro[i], safe, in, vt, q, i, x + b * ldx, ldx, y + b * ldy, ldy, bi, NB_); \
        else                                                                                               \
            bm_row_tile(mr, values, ro[i], safe, in, vt, q, i, x + b * ldx, ldx, y + b * ldy, ldy, bi, NB_);   \
    } while (0)

SC_INLINE void bm_rows_vt(const uint8_t* mask, const void* values, const int64_t* ro, int64_t nslots, int64_t in, int vt,
                          const quant_t* q, const float* x, int64_t B, int64_t ldx, float* y, int64_t ldy,
                          const float* bias, int64_t r0, int64_t r1) {
    int64_t mb = (in + 7) / 8;
    int64_t safe = safe_slot(vt, nslots);
    const int i8_wide = is_quant(vt) && q->G % 64 == 0;
    for (int64_t i = r0; i < r1; i++) {
        const uint8_t* mr = mask + i * mb;
        for (int64_t o = 0; o < mb; o += 64) _mm_prefetch((const char*)(mr + SC_MASK_PF_ROWS * mb + o), _MM_HINT_T0);
        float bi = bias ? bias[i] : 0.0f;
        SC_BATCH_TILES(BM_TILE);
    }
}

/* 16 raw values of an N:M row (value slots k0.., lanes under vm) as fp32 */
SC_INLINE __m512 nm_decode(int vt, __mmask16 vm, const void* vrow, int64_t k0) {
    /* masked loads are slow when the line comes from DRAM: use them only for a row's last chunk */
    const int full = vm == (__mmask16)0xffff;
    switch (vt) {
        case VT_F32: {
            const float* p = (const float*)vrow + k0;
            return full ? _mm512_loadu_ps(p) : _mm512_maskz_loadu_ps(vm, p);
        }
        case VT_BF16:
        case VT_F16: {
            const uint16_t* p = (const uint16_t*)vrow + k0;
            __m256i h = full ? _mm256_loadu_si256((const __m256i*)p) : _mm256_maskz_loadu_epi16(vm, p);
            return vt == VT_BF16 ? _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)) : _mm512_cvtph_ps(h);
        }
        case VT_I8:
        case VT_U8: {
            const uint8_t* p = (const uint8_t*)vrow + k0;
            __m128i c = full ? _mm_loadu_si128((const __m128i*)p) : _mm_maskz_loadu_epi8(vm, p);
            return _mm512_cvtepi32_ps(vt == VT_I8 ? _mm512_cvtepi8_epi32(c) : _mm512_cvtepu8_epi32(c));
        }
        default: {
            const uint8_t* p = (const uint8_t*)vrow + (k0 >> 1);
            uint64_t nib;
            if (full) {
                memcpy(&nib, p, 8);
            } else {
                int n = __builtin_popcount((unsigned)vm);
                __m128i raw = _mm_maskz_loadu_epi8((__mmask16)((1u << ((n + 1) >> 1)) - 1), p);
                nib = (uint64_t)_mm_cvtsi128_si64(raw);
            }
            __m128i c = _mm_set_epi64x((long long)_pdep_u64(nib >> 32, 0x0f0f0f0f0f0f0f0full),
                                       (long long)_pdep_u64(nib & 0xffffffffu, 0x0f0f0f0f0f0f0f0full));
            if (vt == VT_I4) {
                c = _mm_sub_epi8(_mm_xor_si128(c, _mm_set1_epi8(8)), _mm_set1_epi8(8));
                return _mm512_maskz_cvtepi32_ps(vm, _mm512_cvtepi8_epi32(c));
            }
            return _mm512_maskz_cvtepi32_ps(vm, _mm512_cvtepu8_epi32(c));
        }
    }
}

/* permutation lanes (column offsets inside the chunk's W dense columns) for value chunk k0 */
SC_INLINE __m512i nm_lanes(const uint8_t* ir, int64_t ib, int64_t k0, int bits, __m512i base) {
    if (bits == 2) {
        uint32_t wv = 0;
        int64_t off = k0 >> 2;
        if (off + 4 <= ib) memcpy(&wv, ir + off, 4); /* fixed size: one load */
        else for (int64_t t = 0; off + t < ib; t++) wv |= (uint32_t)ir[off + t] << (8 * t);
        __m512i sh = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
        __m512i p = _mm512_and_si512(_mm512_srlv_epi32(_mm512_set1_epi32((int)wv), sh), _mm512_set1_epi32(3));
        return _mm512_add_epi32(p, base);
    } else {
        uint64_t wv = 0;
        int64_t off = k0 >> 1;
        if (off + 8 <= ib) memcpy(&wv, ir + off, 8);
        else for (int64_t t = 0; off + t < ib; t++) wv |= (uint64_t)ir[off + t] << (8 * t);
        __m512i sh = _mm512_set_epi32(28, 24, 20, 16, 12, 8, 4, 0, 28, 24, 20, 16, 12, 8, 4, 0);
        __m512i v = _mm512_inserti64x4(_mm512_set1_epi32((int)(uint32_t)wv), _mm256_set1_epi32((int)(uint32_t)(wv >> 32)), 1);
        __m512i p = _mm512_and_si512(_mm512_srlv_epi32(v, sh), _mm512_set1_epi32(15));
        return _mm512_add_epi32(p, base);
    }
}

SC_INLINE __m512 nm_gather_x(const float* xb, int64_t c0, int64_t in, int W, __m512i lanes) {
    int64_t rem = in - c0;
    __mmask16 lo = rem >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << rem) - 1);
    __m512 x0 = _mm512_maskz_loadu_ps(lo, xb + c0);
    if (W <= 16) return _mm512_permutexvar_ps(lanes, x0);
    int64_t rem1 = rem - 16;
    __mmask16 hi = rem1 >= 16 ? (__mmask16)0xffff : rem1 <= 0 ? (__mmask16)0 : (__mmask16)((1u << rem1) - 1);
    __m512 x1 = _mm512_maskz_loadu_ps(hi, xb + c0 + 16);
    return _mm512_permutex2var_ps(x0, lanes, x1);
}

SC_INLINE void nm_row_tile(const uint8_t* ir, int64_t ib, const void* vrow, int64_t L, int64_t in, int N, int M,
                           int bits, int W, __m512i base, int vt, const quant_t* q, int64_t i,
                           const float* x, int64_t ldx, float* y, int64_t ldy, float bias, const int NB) {
    __m512 acc[NB > 1 ? NB : 2];
    for (int b = 0; b < (NB > 1 ? NB : 2); b++) acc[b] = _mm512_setzero_ps();
    int64_t k0 = 0;
    const int nshift = log2_exact(N);
    for (; k0 < L; k0 += 16) {
        int64_t rem = L - k0;
        __mmask16 vm = rem >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << rem) - 1);
        int64_t c0 = (k0 >> nshift) * M;
        __m512i lanes = nm_lanes(ir, ib, k0, bits, base);
        __m512 w = nm_decode(vt, vm, vrow, k0);
        if (is_quant(vt)) {
            int64_t g = i * q->ngroups + group_of(q, c0);
            if (q->zeros) w = _mm512_maskz_sub_ps(vm, w, _mm512_set1_ps((float)q->zeros[g]));
            w = _mm512_mul_ps(w, _mm512_set1_ps(_cvtsh_ss(q->scales[g])));
        }
        if (NB == 1) {
            /* rotate two accumulators (hides FMA latency; a runtime index would spill them) */
            __m512 t = _mm512_fmadd_ps(w, nm_gather_x(x, c0, in, W, lanes), acc[1]);
            acc[1] = acc[0];
            acc[0] = t;
        } else {
            for (int b = 0; b < NB; b++)
                acc[b] = _mm512_fmadd_ps(w, nm_gather_x(x + b * ldx, c0, in, W, lanes), acc[b]);
        }
    }
    if (NB == 1) {
        y[i] = _mm512_reduce_add_ps(_mm512_add_ps(acc[0], acc[1])) + bias;
    } else {
        for (int b = 0; b < NB; b++) y[b * ldy + i] = _mm512_reduce_add_ps(acc[b]) + bias;
    }
}

SC_INLINE void nm_rows_vt(const uint8_t* idx, const void* values, int64_t in, int N, int M, int vt,
                          const quant_t* q, const float* x, int64_t B, int64_t ldx, float* y, int64_t ldy,
                          const float* bias, int64_t r0, int64_t r1) {
    int64_t L = in / M * N;
    int64_t Lpad = is_int4(vt) ? (L + 1) / 2 * 2 : L;
    int bits = M <= 4 ? 2 : 4;
    int64_t ib = (L * bits + 7) / 8;
    int W = 16 / N * M;
    int lane_base[16];
    for (int l = 0; l < 16; l++) lane_base[l] = (l / N) * M;
    __m512i base = _mm512_loadu_si512(lane_base);
    for (int64_t i = r0; i < r1; i++) {
        const uint8_t* ir = idx + i * ib;
        const void* vrow = (const uint8_t*)values + row_byte_offset(vt, i, Lpad);
        float bi = bias ? bias[i] : 0.0f;
#define NM_TILE(NB_) nm_row_tile(ir, ib, vrow, L, in, N, M, bits, W, base, vt, q, i, x + b * ldx, ldx, y + b * ldy, ldy, bi, NB_)
        SC_BATCH_TILES(NM_TILE);
#undef NM_TILE
    }
}


/* 16 weights of a dense row from column k0 (lanes under vm), dequantized */
SC_INLINE __m512 qd_weights(int vt, __mmask16 vm, const void* vrow, int64_t k0, const quant_t* q, int64_t i) {
    __m512 w = nm_decode(vt, vm, vrow, k0);
    if (is_quant(vt)) {
        int64_t g = i * q->ngroups + group_of(q, k0);
        if (q->zeros) w = _mm512_maskz_sub_ps(vm, w, _mm512_set1_ps((float)q->zeros[g]));
        w = _mm512_mul_ps(w, _mm512_set1_ps(_cvtsh_ss(q->scales[g])));
    }
    return w;
}

/* Dense rows: float values (fp32/bf16/fp16, e.g. an unpruned lm_head) or quantized codes.
 * At NB = 1 four named accumulators over 64 columns keep the loads independent; the weight rows
 * are one sequential stream, prefetched SC_PF_BYTES ahead, so this runs near the memory's read
 * bandwidth.  Batches of 2-4 rows reuse each weight vector from registers. */
SC_INLINE void qd_row_tile(const void* vrow, int64_t in, int vt, const quant_t* q, int64_t i, const float* x,
                           int64_t ldx, float* y, int64_t ldy, float bias, const int NB) {
    const int esz = vt == VT_F32 ? 4 : (vt == VT_BF16 || vt == VT_F16) ? 2 : 1;
    const char* pf = (const char*)vrow + SC_PF_BYTES;
    int64_t k0 = 0;
    if (NB == 1) {
        __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        for (; k0 + 64 <= in; k0 += 64) {
            if (!is_int4(vt))
                for (int o = 0; o < 64 * esz; o += 64) _mm_prefetch(pf + k0 * esz + o, _MM_HINT_T0);
            a0 = _mm512_fmadd_ps(qd_weights(vt, 0xffff, vrow, k0, q, i), _mm512_loadu_ps(x + k0), a0);
            a1 = _mm512_fmadd_ps(qd_weights(vt, 0xffff, vrow, k0 + 16, q, i), _mm512_loadu_ps(x + k0 + 16), a1);
            a2 = _mm512_fmadd_ps(qd_weights(vt, 0xffff, vrow, k0 + 32, q, i), _mm512_loadu_ps(x + k0 + 32), a2);
            a3 = _mm512_fmadd_ps(qd_weights(vt, 0xffff, vrow, k0 + 48, q, i), _mm512_loadu_ps(x + k0 + 48), a3);
        }
        for (; k0 < in; k0 += 16) {
            int64_t rem = in - k0;
            __mmask16 vm = rem >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << rem) - 1);
            a0 = _mm512_fmadd_ps(qd_weights(vt, vm, vrow, k0, q, i), _mm512_maskz_loadu_ps(vm, x + k0), a0);
        }
        y[i] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3))) + bias;
        return;
    }
    __m512 acc[NB];
    for (int b = 0; b < NB; b++) acc[b] = _mm512_setzero_ps();
    for (; k0 < in; k0 += 16) {
        int64_t rem = in - k0;
        __mmask16 vm = rem >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << rem) - 1);
        if (!is_int4(vt) && ((k0 * esz) & 63) == 0) _mm_prefetch(pf + k0 * esz, _MM_HINT_T0);
        __m512 w = qd_weights(vt, vm, vrow, k0, q, i);
        for (int b = 0; b < NB; b++) acc[b] = _mm512_fmadd_ps(w, _mm512_maskz_loadu_ps(vm, x + b * ldx + k0), acc[b]);
    }
    for (int b = 0; b < NB; b++) y[b * ldy + i] = _mm512_reduce_add_ps(acc[b]) + bias;
}

SC_INLINE void qd_rows_vt(const void* values, int64_t in, int vt, const quant_t* q, const float* x, int64_t B,
                          int64_t ldx, float* y, int64_t ldy, const float* bias, int64_t r0, int64_t r1) {
    int64_t Lpad = is_int4(vt) ? (in + 1) / 2 * 2 : in;
    for (int64_t i = r0; i < r1; i++) {
        const void* vrow = (const uint8_t*)values + row_byte_offset(vt, i, Lpad);
        float bi = bias ? bias[i] : 0.0f;
#define QD_TILE(NB_) qd_row_tile(vrow, in, vt, q, i, x + b * ldx, ldx, y + b * ldy, ldy, bi, NB_)
        SC_BATCH_TILES(QD_TILE);
#undef QD_TILE
    }
}

/* ---- batched path (B >= SC_NZ_MIN_B): weights decoded once per row into a list of (column, fp32
 * value) pairs, then one FMA per kept weight against x transposed to (in, 16): 16 batch rows fill
 * one vector, so the work scales with the kept weights rather than with the dense width. */
#ifndef SC_NZ_MIN_B
#define SC_NZ_MIN_B 5
#endif

SC_INLINE int64_t bm_row_list(const uint8_t* mr, const void* values, int64_t s, int64_t safe, int64_t in, int vt,
                              const quant_t* q, int64_t i, float* wl, int32_t* il) {
    int64_t n = 0;
    const __m512i iota = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    for (int64_t j = 0; j < in; j += 16) {
        __mmask16 m = load_mask16(mr, j, in);
        __m512 w = apply_quant(vt, bm_decode(vt, m, values, &s, safe), m, q, i, j);
        _mm512_storeu_ps(wl + n, _mm512_maskz_compress_ps(m, w));
        _mm512_storeu_si512(il + n, _mm512_maskz_compress_epi32(m, _mm512_add_epi32(iota, _mm512_set1_epi32((int)j))));
        n += __builtin_popcount((unsigned)m);
    }
    return n;
}

SC_INLINE int64_t nm_row_list(const uint8_t* ir, int64_t ib, const void* vrow, int64_t L, int N, int M, int bits,
                              __m512i base, int vt, const quant_t* q, int64_t i, float* wl, int32_t* il) {
    const int nshift = log2_exact(N);
    for (int64_t k0 = 0; k0 < L; k0 += 16) {
        int64_t rem = L - k0;
        __mmask16 vm = rem >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << rem) - 1);
        int64_t c0 = (k0 >> nshift) * M;
        __m512 w = nm_decode(vt, vm, vrow, k0);
        if (is_quant(vt)) {
            int64_t g = i * q->ngroups + group_of(q, c0);
            if (q->zeros) w = _mm512_maskz_sub_ps(vm, w, _mm512_set1_ps((float)q->zeros[g]));
            w = _mm512_mul_ps(w, _mm512_set1_ps(_cvtsh_ss(q->scales[g])));
        }
        _mm512_storeu_ps(wl + k0, w);
        _mm512_storeu_si512(il + k0, _mm512_add_epi32(nm_lanes(ir, ib, k0, bits, base), _mm512_set1_epi32((int)c0)));
    }
    return L;
}

SC_INLINE int64_t qd_row_list(const void* vrow, int64_t in, int vt, const quant_t* q, int64_t i, float* wl, int32_t* il) {
    const __m512i iota = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    for (int64_t k0 = 0; k0 < in; k0 += 16) {
        int64_t rem = in - k0;
        __mmask16 vm = rem >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << rem) - 1);
        _mm512_storeu_ps(wl + k0, qd_weights(vt, vm, vrow, k0, q, i));
        _mm512_storeu_si512(il + k0, _mm512_add_epi32(iota, _mm512_set1_epi32((int)k0)));
    }
    return in;
}

/* y[b, i] = bias + sum_k wl[k] * x[b, il[k]] for all B rows, x given as xT (nblk, in, 16) */
static inline void nz_fma(const float* wl, const int32_t* il, int64_t n, const float* xT, int64_t in, int64_t B,
                          float* y, int64_t ldy, int64_t i, float bias) {
    for (int64_t b0 = 0; b0 < B; b0 += 16) {
        const float* xb = xT + (b0 / 16) * in * 16;
        __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        int64_t k = 0;
        for (; k + 4 <= n; k += 4) {
            a0 = _mm512_fmadd_ps(_mm512_set1_ps(wl[k]), _mm512_load_ps(xb + (int64_t)il[k] * 16), a0);
            a1 = _mm512_fmadd_ps(_mm512_set1_ps(wl[k + 1]), _mm512_load_ps(xb + (int64_t)il[k + 1] * 16), a1);
            a2 = _mm512_fmadd_ps(_mm512_set1_ps(wl[k + 2]), _mm512_load_ps(xb + (int64_t)il[k + 2] * 16), a2);
            a3 = _mm512_fmadd_ps(_mm512_set1_ps(wl[k + 3]), _mm512_load_ps(xb + (int64_t)il[k + 3] * 16), a3);
        }
        for (; k < n; k++) a0 = _mm512_fmadd_ps(_mm512_set1_ps(wl[k]), _mm512_load_ps(xb + (int64_t)il[k] * 16), a0);
        __m512 acc = _mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3));
        float lanes[16] __attribute__((aligned(64)));
        _mm512_store_ps(lanes, acc);
        int64_t nb = B - b0 < 16 ? B - b0 : 16;
        for (int64_t b = 0; b < nb; b++) y[(b0 + b) * ldy + i] = lanes[b] + bias;
    }
}

/* x (B, in) -> xT (ceil(B/16), in, 16), zero-padded batch lanes; 64-byte aligned */
static float* make_xT(const float* x, int64_t B, int64_t ldx, int64_t in) {
    int64_t nblk = (B + 15) / 16;
    size_t bytes = (size_t)(nblk * in * 16 * sizeof(float));
    float* xT = (float*)aligned_alloc(64, (bytes + 63) / 64 * 64);
    if (!xT) return NULL;
    memset(xT, 0, bytes);
    for (int64_t b = 0; b < B; b++) {
        float* dst = xT + (b / 16) * in * 16 + (b % 16);
        const float* src = x + b * ldx;
        for (int64_t j = 0; j < in; j++) dst[j * 16] = src[j];
    }
    return xT;
}

SC_INLINE void bm_rows_nz_vt(const uint8_t* mask, const void* values, const int64_t* ro, int64_t nslots, int64_t in,
                             int vt, const quant_t* q, const float* xT, int64_t B, float* y, int64_t ldy,
                             const float* bias, int64_t r0, int64_t r1, float* wl, int32_t* il) {
    int64_t mb = (in + 7) / 8;
    int64_t safe = safe_slot(vt, nslots);
    for (int64_t i = r0; i < r1; i++) {
        int64_t n = bm_row_list(mask + i * mb, values, ro[i], safe, in, vt, q, i, wl, il);
        nz_fma(wl, il, n, xT, in, B, y, ldy, i, bias ? bias[i] : 0.0f);
    }
}

SC_INLINE void nm_rows_nz_vt(const uint8_t* idx, const void* values, int64_t in, int N, int M, int vt, const quant_t* q,
                             const float* xT, int64_t B, float* y, int64_t ldy, const float* bias, int64_t r0,
                             int64_t r1, float* wl, int32_t* il) {
    int64_t L = in / M * N;
    int64_t Lpad = is_int4(vt) ? (L + 1) / 2 * 2 : L;
    int bits = M <= 4 ? 2 : 4;
    int64_t ib = (L * bits + 7) / 8;
    int lane_base[16];
    for (int l = 0; l < 16; l++) lane_base[l] = (l / N) * M;
    __m512i base = _mm512_loadu_si512(lane_base);
    for (int64_t i = r0; i < r1; i++) {
        const void* vrow = (const uint8_t*)values + row_byte_offset(vt, i, Lpad);
        int64_t n = nm_row_list(idx + i * ib, ib, vrow, L, N, M, bits, base, vt, q, i, wl, il);
        nz_fma(wl, il, n, xT, in, B, y, ldy, i, bias ? bias[i] : 0.0f);
    }
}

SC_INLINE void qd_rows_nz_vt(const void* values, int64_t in, int vt, const quant_t* q, const float* xT, int64_t B,
                             float* y, int64_t ldy, const float* bias, int64_t r0, int64_t r1, float* wl, int32_t* il) {
    int64_t Lpad = is_int4(vt) ? (in + 1) / 2 * 2 : in;
    for (int64_t i = r0; i < r1; i++) {
        const void* vrow = (const uint8_t*)values + row_byte_offset(vt, i, Lpad);
        int64_t n = qd_row_list(vrow, in, vt, q, i, wl, il);
        nz_fma(wl, il, n, xT, in, B, y, ldy, i, bias ? bias[i] : 0.0f);
    }
}


/* One specialised copy of every row loop per (value type, format, path): the switches on vt inside
 * the decoders fold away at compile time. */
SC_INLINE void rows_vt(const job_t* J, const int vt, int64_t r0, int64_t r1, float* wl, int32_t* il) {
    const quant_t* q = &J->q;
    if (J->xT) {
        switch (J->kind) {
            case 0: bm_rows_nz_vt(J->meta, J->values, J->ro, J->nslots, J->in, vt, q, J->xT, J->B, J->y, J->ldy, J->bias, r0, r1, wl, il); break;
            case 1: nm_rows_nz_vt(J->meta, J->values, J->in, J->N, J->M, vt, q, J->xT, J->B, J->y, J->ldy, J->bias, r0, r1, wl, il); break;
            default: qd_rows_nz_vt(J->values, J->in, vt, q, J->xT, J->B, J->y, J->ldy, J->bias, r0, r1, wl, il); break;
        }
    } else {
        switch (J->kind) {
            case 0: bm_rows_vt(J->meta, J->values, J->ro, J->nslots, J->in, vt, q, J->x, J->B, J->ldx, J->y, J->ldy, J->bias, r0, r1); break;
            case 1: nm_rows_vt(J->meta, J->values, J->in, J->N, J->M, vt, q, J->x, J->B, J->ldx, J->y, J->ldy, J->bias, r0, r1); break;
            default: qd_rows_vt(J->values, J->in, vt, q, J->x, J->B, J->ldx, J->y, J->ldy, J->bias, r0, r1); break;
        }
    }
}

/* One out-of-line function per value type: a single function holding all seven inlined copies
 * made gcc compile the fp32 row loop ~25% slower (SmolLM2 block 310 vs 240 us, interleaved A/B). */
#define SC_ROWS_FN(NAME, VT)                                                                              \
    static __attribute__((noinline)) void NAME(const job_t* J, int64_t r0, int64_t r1, float* wl, int32_t* il) { \
        rows_vt(J, VT, r0, r1, wl, il);                                                                   \
    }
SC_ROWS_FN(rows_f32, VT_F32)
SC_ROWS_FN(rows_bf16, VT_BF16)
SC_ROWS_FN(rows_f16, VT_F16)
SC_ROWS_FN(rows_i8, VT_I8)
SC_ROWS_FN(rows_u8, VT_U8)
SC_ROWS_FN(rows_i4, VT_I4)
SC_ROWS_FN(rows_u4, VT_U4)
#undef SC_ROWS_FN

static void rows_avx512(const job_t* J, int64_t r0, int64_t r1, float* wl, int32_t* il) {
    switch (J->vt) {
        case VT_F32: rows_f32(J, r0, r1, wl, il); break;
        case VT_BF16: rows_bf16(J, r0, r1, wl, il); break;
        case VT_F16: rows_f16(J, r0, r1, wl, il); break;
        case VT_I8: rows_i8(J, r0, r1, wl, il); break;
        case VT_U8: rows_u8(J, r0, r1, wl, il); break;
        case VT_I4: rows_i4(J, r0, r1, wl, il); break;
        default: rows_u4(J, r0, r1, wl, il); break;
    }
}
#endif /* SC_AVX512 */

/* ------------------------------------------------------------------ entry point */
static void rows_scalar(const job_t* J, int64_t r0, int64_t r1) {
    switch (J->kind) {
        case 0: bm_rows_scalar(J->meta, J->values, J->ro, J->in, J->vt, &J->q, J->x, J->B, J->ldx, J->y, J->ldy, J->bias, r0, r1); break;
        case 1: nm_rows_scalar(J->meta, J->values, J->in, J->N, J->M, J->vt, &J->q, J->x, J->B, J->ldx, J->y, J->ldy, J->bias, r0, r1); break;
        default: qd_rows_scalar(J->values, J->in, J->vt, &J->q, J->x, J->B, J->ldx, J->y, J->ldy, J->bias, r0, r1); break;
    }
}

/* Compressed bytes (times 2 for batches > 4) below which a call runs on the calling thread: waking
 * the second thread and joining it costs more than it saves on a small layer.  Measured on
 * SmolLM2's layers: int8 k/v_proj (50 KB) run faster on one thread (10 vs 15 us), int8 q/o_proj
 * (151 KB) break even, fp32 k/v_proj (148 KB) and everything larger gain from two.
 * SPARSECRAFT_PAR_MIN_BYTES overrides it (tuning). */
static int64_t par_min_bytes(void) {
    static int64_t v = -1;
    if (v < 0) {
        const char* e = getenv("SPARSECRAFT_PAR_MIN_BYTES");
        v = e && *e ? atoll(e) : (int64_t)SC_PAR_MIN_BYTES;
    }
    return v;
}

/* Threads: nthreads <= 0 means the OpenMP default; small problems run on the calling thread. */
static int pick_threads(int nthreads, int64_t work_bytes) {
#ifdef _OPENMP
    int nt = nthreads > 0 ? nthreads : omp_get_max_threads();
#else
    int nt = 1;
    (void)nthreads;
#endif
    if (work_bytes < par_min_bytes()) nt = 1;
    return nt < 1 ? 1 : nt;
}

static int64_t value_bytes(int vt, int64_t slots) {
    return vt == VT_F32 ? 4 * slots : (vt == VT_BF16 || vt == VT_F16) ? 2 * slots : is_int4(vt) ? slots / 2 : slots;
}

/* rows per dynamically scheduled block: ~8 blocks per thread, at least 4 rows */
static int64_t row_block(int64_t out, int nt) {
    int64_t rb = out / ((int64_t)nt * 8);
    return rb < 4 ? 4 : rb;
}

/* One call for any format: the constant arguments live in a descriptor built once per weight,
 * so a Python call passes 6 arguments instead of 18 (ctypes converts each one, ~0.3 us apiece). */
typedef struct {
    int32_t kind; /* 0 bitmask, 1 N:M, 2 dense (float values or quantized codes) */
    int32_t vt;
    int64_t out, in;
    const void* meta; /* bitmask: mask; N:M: indices; dense: unused */
    const void* values;
    const int64_t* row_offsets;
    int32_t n, m;
    const uint16_t* scales;
    const uint8_t* zeros;
    int64_t group_size;
    const float* bias;
    int32_t nthreads, force_scalar;
} sc_desc;

int sc_matmul(const sc_desc* d, const float* x, int64_t B, int64_t ldx, float* y, int64_t ldy) {
    const int64_t out = d->out, in = d->in, gs = d->group_size;
    const int vt = d->vt;
    if (out <= 0 || B <= 0) return 0;
    if (vt < 0 || vt > VT_U4) return -1;
    if (is_quant(vt) && (!d->scales || gs <= 0)) return -2;
    job_t J = {d->kind, vt, out, in, (const uint8_t*)d->meta, d->values, d->row_offsets, 0, d->n, d->m,
               {d->scales, d->zeros, is_quant(vt) ? (in + gs - 1) / gs : 0, gs > 0 ? gs : 1, log2_exact(gs > 0 ? gs : 1)},
               x, B, ldx, y, ldy, d->bias, NULL};
    int vec = SC_AVX512 && !d->force_scalar, W = 16;
    int64_t work; /* compressed bytes read */
    switch (d->kind) {
        case 0:
            J.nslots = d->row_offsets[out];
            work = value_bytes(vt, J.nslots - d->row_offsets[0]) + out * ((in + 7) / 8);
            break;
        case 1: {
            const int N = d->n, M = d->m;
            if (N < 1 || M < 1 || N > M || M > 16 || in % M) return -3;
            W = (16 % N == 0) ? 16 / N * M : 1 << 30;
            vec = vec && W <= 32;
            int64_t L = in / M * N;
            work = value_bytes(vt, out * L) + out * ((L * (M <= 4 ? 2 : 4) + 7) / 8);
            break;
        }
        case 2:
            work = value_bytes(vt, out * (is_int4(vt) ? (in + 1) / 2 * 2 : in));
            break;
        default:
            return -5;
    }
    vec = vec && (!is_quant(vt) || gs % W == 0);
    int nt = pick_threads(d->nthreads, work * (B > 4 ? 2 : 1));
    float* xT = NULL;
#if SC_AVX512
    /* the batched (decode-list) path pays off for sparse or quantized rows; dense float rows
     * stay on the tiles (weights reused from registers / L1 across the batch rows) */
    if (vec && B >= SC_NZ_MIN_B && (d->kind != 2 || is_quant(vt))) {
        xT = make_xT(x, B, ldx, in);
        if (!xT) return -4;
    }
#endif
    J.xT = xT;
    int64_t rb = row_block(out, nt), nblk = (out + rb - 1) / rb;
    int failed = 0;
#pragma omp parallel num_threads(nt) if (nt > 1)
    {
        float* wl = NULL;
        int32_t* il = NULL;
        if (xT) { /* per-thread decode lists of one row */
            wl = (float*)malloc((size_t)(in + 64) * sizeof(float));
            il = (int32_t*)malloc((size_t)(in + 64) * sizeof(int32_t));
            if (!wl || !il) failed = 1;
        }
        /* dynamic row blocks: a thread the OS deschedules (other jobs on the machine) does not hold up
         * the rest of the team, and uneven bitmask rows balance themselves */
#pragma omp for schedule(dynamic, 1)
        for (int64_t blk = 0; blk < nblk; blk++) {
            int64_t r0 = blk * rb, r1 = r0 + rb < out ? r0 + rb : out;
            if (xT && !(wl && il)) continue;
#if SC_AVX512
            if (vec) {
                rows_avx512(&J, r0, r1, wl, il);
                continue;
            }
#endif
            rows_scalar(&J, r0, r1);
        }
        free(wl);
        free(il);
    }
    free(xT);
    return failed ? -4 : 0;
}

/* the hot path from Python: contiguous x (B, in) -> y (B, out), four arguments to convert */
int sc_matmul_rows(const sc_desc* d, const float* x, int64_t B, float* y) { return sc_matmul(d, x, B, d->in, y, d->out); }

/* STREAM-like copy used by the benchmark for the machine's bandwidth bound: bytes moved = 2 * n * 4 */
void sc_stream_copy(const float* a, float* b, int64_t n, int nthreads) {
    int nt = pick_threads(nthreads, n * 4);
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t i = 0; i < n; i++) b[i] = a[i];
}

/* STREAM-like read (sum): bytes moved = n * 4; a decode pass is read-dominated like this */
float sc_stream_read(const float* a, int64_t n, int nthreads) {
    int nt = pick_threads(nthreads, n * 4);
    float total = 0.0f;
#pragma omp parallel num_threads(nt) reduction(+ : total)
    {
        int t = 0, k = 1;
#ifdef _OPENMP
        t = omp_get_thread_num();
        k = omp_get_num_threads();
#endif
        int64_t i = n * t / k, e = n * (t + 1) / k;
        float acc[32] = {0};
        for (; i + 32 <= e; i += 32)
            for (int l = 0; l < 32; l++) acc[l] += a[i + l];
        for (; i < e; i++) acc[0] += a[i];
        for (int l = 0; l < 32; l++) total += acc[l];
    }
    return total;
}
