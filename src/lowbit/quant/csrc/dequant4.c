/* Fast 4-bit blockwise dequantization for CPUs (lowbit).
 *
 * out[i] = code[q_i] * absmax[i / blocksize], q_{2j} = byte_j >> 4, q_{2j+1} = byte_j & 15.
 * The AVX-512 path looks the 16-entry codebook up with one permute per 16 values (vpermps), scales and
 * stores; the portable path is a plain loop. Both compute code * absmax in float32 and then round to
 * the output type (bf16/fp16: round to nearest even), exactly as the PyTorch reference does.
 * Built at first use by lowbit/quant/native.py; the PyTorch path in nf4.py is the reference.
 */
#include <stdint.h>
#include <string.h>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

static inline uint16_t f32_to_bf16(float f) {
    uint32_t u; memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40); /* quiet NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

/* out_kind: 0 = float32, 1 = bfloat16, 2 = float16 (fp16 only on the AVX-512 path; else caller falls back) */
static void block_scalar(const uint8_t* p, float s, const float* code, void* out, int64_t start, int64_t cnt, int kind) {
    for (int64_t k = 0; k < cnt; k++) {
        int64_t i = start + k;
        uint8_t b = p[i >> 1];
        float v = code[(i & 1) ? (b & 15) : (b >> 4)] * s;
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

static void block_avx512(const uint8_t* p, float s, __m512 cv, void* out, int64_t start, int64_t cnt, int kind) {
    const __m512i lo_idx = _mm512_set_epi32(23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    const __m512i hi_idx = _mm512_set_epi32(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8);
    const __m512i m15 = _mm512_set1_epi32(15);
    const __m512 vs = _mm512_set1_ps(s);
    int64_t k = 0;
    for (; k + 32 <= cnt; k += 32) {
        int64_t i = start + k;
        __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(p + (i >> 1))));
        __m512 hi = _mm512_permutexvar_ps(_mm512_srli_epi32(b, 4), cv);
        __m512 lo = _mm512_permutexvar_ps(_mm512_and_si512(b, m15), cv);
        __m512 o0 = _mm512_mul_ps(_mm512_permutex2var_ps(hi, lo_idx, lo), vs);
        __m512 o1 = _mm512_mul_ps(_mm512_permutex2var_ps(hi, hi_idx, lo), vs);
        if (kind == 0) {
            _mm512_storeu_ps((float*)out + i, o0);
            _mm512_storeu_ps((float*)out + i + 16, o1);
        } else if (kind == 1) {
#ifdef __AVX512BF16__
            _mm512_storeu_si512((uint16_t*)out + i, (__m512i)_mm512_cvtne2ps_pbh(o1, o0));
#else
            _mm256_storeu_si256((__m256i*)((uint16_t*)out + i), _mm512_cvtepi32_epi16(bf16_round(o0)));
            _mm256_storeu_si256((__m256i*)((uint16_t*)out + i + 16), _mm512_cvtepi32_epi16(bf16_round(o1)));
#endif
        } else {
            _mm256_storeu_si256((__m256i*)((uint16_t*)out + i), _mm512_cvtps_ph(o0, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
            _mm256_storeu_si256((__m256i*)((uint16_t*)out + i + 16), _mm512_cvtps_ph(o1, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
        }
    }
    if (k < cnt) {
        float code[16];
        _mm512_storeu_ps(code, cv);
        block_scalar(p, s, code, out, start + k, cnt - k, kind);
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

/* Dequantize n values; blocksize must be even (bitsandbytes' are 32..4096). Returns 0 on success.
 * Block scales: absmax[b] (float32), or with double quantization (absmax == NULL)
 *   code256[qabsmax[b]] * nested_absmax[b / nested_blocksize] + offset,
 * the same two float32 operations (no fused multiply-add: built with -ffp-contract=off) as the reference. */
int lowbit_dequant4(const uint8_t* packed, const float* absmax, const uint8_t* qabsmax, const float* nested_absmax,
                    const float* code256, float offset, int64_t nested_blocksize, const float* code16, void* out,
                    int64_t n, int64_t blocksize, int kind, int nthreads) {
    if (blocksize <= 0 || (blocksize & 1) || (absmax == NULL && nested_blocksize <= 0)) return 1;
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
        block_avx512(packed, s, cv, out, start, cnt, kind);
#else
        block_scalar(packed, s, code16, out, start, cnt, kind);
#endif
    }
    return 0;
}
