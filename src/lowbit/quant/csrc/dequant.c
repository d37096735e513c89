/* Fast k-bit blockwise dequantization for CPUs (lowbit).
 *
 * out[i] = code[q_i] * absmax[i / blocksize], with q_i unpacked as lowbit/quant/packing.py lays codes out:
 *   4 bits: q_{2j} = byte_j >> 4, q_{2j+1} = byte_j & 15                       (bitsandbytes)
 *   3 bits: 8 codes in 3 bytes, the big-endian 24-bit word c0<<21 | ... | c7
 *   2 bits: 4 codes per byte, the first in the two highest bits
 * The AVX-512 path gets 16 codes into 16 int32 lanes (4 bits: zero-extend bytes; 3 bits: one byte permute,
 * vpermb; 2 bits: one variable shift), looks the codebook up with one permute per 16 values (vpermps), scales and
 * stores 32 values at a time; the portable path is a plain loop.
 * Both compute code * absmax in float32 and then round to the output type (bf16/fp16: round to nearest even),
 * exactly as the PyTorch reference does.
 * Built at first use by lowbit/quant/native.py; the PyTorch path in nf4.py is the reference.
 */
#include <stdint.h>
#include <string.h>
#if defined(__AVX512F__) || defined(__F16C__)
#include <immintrin.h>
#endif

static inline uint16_t f32_to_bf16(float f) {
    uint32_t u; memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40); /* quiet NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static inline int code_at(const uint8_t* p, int64_t i, int bits) {
    if (bits == 4) return (i & 1) ? (p[i >> 1] & 15) : (p[i >> 1] >> 4);
    if (bits == 2) return (p[i >> 2] >> (6 - 2 * (i & 3))) & 3;
    const uint8_t* g = p + 3 * (i >> 3);
    uint32_t w = ((uint32_t)g[0] << 16) | ((uint32_t)g[1] << 8) | g[2];
    return (w >> (21 - 3 * (i & 7))) & 7;
}

/* out_kind: 0 = float32, 1 = bfloat16, 2 = float16 (fp16 only on the AVX-512 path; else caller falls back) */
static void block_scalar(const uint8_t* p, float s, const float* code, void* out, int64_t start, int64_t cnt, int kind,
                         int bits) {
    for (int64_t k = 0; k < cnt; k++) {
        int64_t i = start + k;
        float v = code[code_at(p, i, bits)] * s;
        if (kind == 0) ((float*)out)[i] = v;
        else if (kind == 1) ((uint16_t*)out)[i] = f32_to_bf16(v);
#ifdef __F16C__
        else ((uint16_t*)out)[i] = _cvtss_sh(v, _MM_FROUND_TO_NEAREST_INT);
#endif
    }
}

#ifdef __AVX512F__
#ifndef __AVX512BF16__
static inline __m512i bf16_round(__m512 v) {
    /* round-to-nearest-even float32 -> bf16 in the low 16 bits of each lane (NaN kept quiet) */
    __m512i u = _mm512_castps_si512(v);
    __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
    __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    return _mm512_mask_or_epi32(r, nan, _mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40));
}
#endif

static inline void store16(__m512 o, void* out, int64_t i, int kind) {
    if (kind == 0) _mm512_storeu_ps((float*)out + i, o);
    else if (kind == 1) _mm256_storeu_si256((__m256i*)((uint16_t*)out + i),
#ifdef __AVX512BF16__
                                            (__m256i)_mm512_cvtneps_pbh(o));
#else
                                            _mm512_cvtepi32_epi16(bf16_round(o)));
#endif
    else _mm256_storeu_si256((__m256i*)((uint16_t*)out + i), _mm512_cvtps_ph(o, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

/* outputs i .. i+31 */
static inline void store32(__m512 o0, __m512 o1, void* out, int64_t i, int kind) {
#ifdef __AVX512BF16__
    if (kind == 1) {
        _mm512_storeu_si512((uint16_t*)out + i, (__m512i)_mm512_cvtne2ps_pbh(o1, o0));
        return;
    }
#endif
    store16(o0, out, i, kind);
    store16(o1, out, i + 16, kind);
}

/* 2 bits: 16 codes from the 4 bytes at p + i/4, as 16 int32 lanes (byte k of the word holds codes 4k..4k+3) */
static inline __m512i codes16_2bit(const uint8_t* p, int64_t i) {
    uint32_t w; memcpy(&w, p + (i >> 2), 4);
    const __m512i sh = _mm512_set_epi32(24, 26, 28, 30, 16, 18, 20, 22, 8, 10, 12, 14, 0, 2, 4, 6);
    return _mm512_and_si512(_mm512_srlv_epi32(_mm512_set1_epi32((int)w), sh), _mm512_set1_epi32(3));
}

/* 3 bits: 32 codes (12 bytes, read as 16) at p + 3·i/8, as two vectors of 16 int32 lanes. Code L of a 16-code
 * half lies in bytes b = 3L/8 and b+1: each lane gets the big-endian pair (p[b] << 8 | p[b+1]), shifted right by
 * 13 - (3L mod 8). */
static inline void codes32_3bit(const uint8_t* p, int64_t i, __m512i* c0, __m512i* c1) {
    const __m512i sh = _mm512_set_epi32(8, 11, 6, 9, 12, 7, 10, 13, 8, 11, 6, 9, 12, 7, 10, 13);
    const __m512i m7 = _mm512_set1_epi32(7);
#ifdef __AVX512VBMI__
    static const uint8_t idx[2][64] = {
        {1, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 2, 1, 0, 0, 2, 1, 0, 0, 2, 1, 0, 0, 3, 2, 0, 0, 3, 2, 0, 0,
         4, 3, 0, 0, 4, 3, 0, 0, 4, 3, 0, 0, 5, 4, 0, 0, 5, 4, 0, 0, 5, 4, 0, 0, 6, 5, 0, 0, 6, 5, 0, 0},
        {7, 6, 0, 0, 7, 6, 0, 0, 7, 6, 0, 0, 8, 7, 0, 0, 8, 7, 0, 0, 8, 7, 0, 0, 9, 8, 0, 0, 9, 8, 0, 0,
         10, 9, 0, 0, 10, 9, 0, 0, 10, 9, 0, 0, 11, 10, 0, 0, 11, 10, 0, 0, 11, 10, 0, 0, 12, 11, 0, 0, 12, 11, 0, 0}};
    __m512i src = _mm512_zextsi128_si512(_mm_loadu_si128((const __m128i*)(p + 3 * (i >> 3))));
    *c0 = _mm512_and_si512(_mm512_srlv_epi32(_mm512_permutexvar_epi8(_mm512_loadu_si512(idx[0]), src), sh), m7);
    *c1 = _mm512_and_si512(_mm512_srlv_epi32(_mm512_permutexvar_epi8(_mm512_loadu_si512(idx[1]), src), sh), m7);
#else
    for (int h = 0; h < 2; h++) {
        uint32_t v[16];
        const uint8_t* g = p + 3 * (i >> 3) + 6 * h;
        for (int L = 0; L < 16; L++) v[L] = ((uint32_t)g[(3 * L) >> 3] << 8) | g[((3 * L) >> 3) + 1];
        __m512i c = _mm512_and_si512(_mm512_srlv_epi32(_mm512_loadu_si512(v), sh), m7);
        if (h == 0) *c0 = c; else *c1 = c;
    }
#endif
}

static void block_avx512(const uint8_t* p, int64_t nbytes, float s, __m512 cv, void* out, int64_t start, int64_t cnt,
                         int kind, int bits) {
    const __m512i lo_idx = _mm512_set_epi32(23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    const __m512i hi_idx = _mm512_set_epi32(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8);
    const __m512i m15 = _mm512_set1_epi32(15);
    const __m512 vs = _mm512_set1_ps(s);
    int64_t k = 0;
    for (; k + 32 <= cnt; k += 32) {
        int64_t i = start + k;
        __m512 o0, o1;
        if (bits == 4) {
            __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(p + (i >> 1))));
            __m512 hi = _mm512_permutexvar_ps(_mm512_srli_epi32(b, 4), cv);
            __m512 lo = _mm512_permutexvar_ps(_mm512_and_si512(b, m15), cv);
            o0 = _mm512_permutex2var_ps(hi, lo_idx, lo);
            o1 = _mm512_permutex2var_ps(hi, hi_idx, lo);
        } else {
            __m512i c0, c1;
            if (bits == 3) {  /* the 16-byte read must stay inside the packed buffer */
                if (3 * (i >> 3) + 16 > nbytes) break;
                codes32_3bit(p, i, &c0, &c1);
            } else {
                c0 = codes16_2bit(p, i);
                c1 = codes16_2bit(p, i + 16);
            }
            o0 = _mm512_permutexvar_ps(c0, cv);
            o1 = _mm512_permutexvar_ps(c1, cv);
        }
        store32(_mm512_mul_ps(o0, vs), _mm512_mul_ps(o1, vs), out, i, kind);
    }
    if (k < cnt) {
        float code[16];
        _mm512_storeu_ps(code, cv);
        block_scalar(p, s, code, out, start + k, cnt - k, kind, bits);
    }
}
#endif

int lowbit_has_avx512(void) {
#ifdef __AVX512F__
    return 1;
#else
    return 0;
#endif
}

/* Dequantize n values of `bits` (4, 3 or 2) bits; blocksize must be a multiple of 16 (lowbit's are 32..4096).
 * Returns 0 on success.
 * Block scales: absmax[b] (float32), or with double quantization (absmax == NULL)
 *   code256[qabsmax[b]] * nested_absmax[b / nested_blocksize] + offset,
 * the same two float32 operations (no fused multiply-add: built with -ffp-contract=off) as the reference. */
int lowbit_dequant(const uint8_t* packed, const float* absmax, const uint8_t* qabsmax, const float* nested_absmax,
                   const float* code256, float offset, int64_t nested_blocksize, const float* code16, void* out,
                   int64_t n, int64_t blocksize, int bits, int kind, int nthreads) {
    if (blocksize <= 0 || (blocksize & 15) || (absmax == NULL && nested_blocksize <= 0)) return 1;
    if (bits != 4 && bits != 3 && bits != 2) return 3;
    int64_t nbytes = bits == 4 ? (n + 1) / 2 : bits == 2 ? (n + 3) / 4 : 3 * ((n + 7) / 8);
#if !defined(__AVX512F__) && !defined(__F16C__)
    if (kind == 2) return 2;
#endif
    int64_t nblocks = (n + blocksize - 1) / blocksize;
#ifdef __AVX512F__
    __m512 cv = _mm512_loadu_ps(code16);
#endif
    #pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t b = 0; b < nblocks; b++) {
        int64_t start = b * blocksize;
        int64_t cnt = n - start < blocksize ? n - start : blocksize;
        float s = absmax ? absmax[b] : code256[qabsmax[b]] * nested_absmax[b / nested_blocksize] + offset;
#ifdef __AVX512F__
        block_avx512(packed, nbytes, s, cv, out, start, cnt, kind, bits);
#else
        (void)nbytes;
        block_scalar(packed, s, code16, out, start, cnt, kind, bits);
#endif
    }
    return 0;
}
