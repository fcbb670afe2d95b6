"""Weight-only int8 / int4 matrix-vector kernels for x86 CPUs with AVX2 and FMA, compiled on first use.

Why our own: on this 2-core CPU every weight-only kernel torch 2.13 and torchao 0.18 offer without
``torch.compile`` is slower than fp32 ``F.linear`` at one token (``torch._weight_int8pack_mm`` 0.08-0.43x,
``torch._weight_int4pack_mm_for_cpu`` 0.02-0.24x, torchao's int8 / intx weight-only 0.04-0.25x; torchao's
``Int4WeightOnlyConfig`` needs a CUDA-only library), measured by ``bench/weight_only_kernels.py``. Decoding
one token reads every weight once, so it is bound by memory bandwidth: a kernel that reads 4-bit weights and
widens them to fp32 in registers moves 8x fewer bytes than fp32.

The kernels are a few loops of AVX2 intrinsics (``_SOURCE``), compiled with the system's C++ compiler into a
shared library cached under ``$TANSUO_KERNEL_CACHE`` (default ``~/.cache/tansuo/kernels``, keyed by a hash of
the source and flags) and called through :mod:`ctypes`; OpenMP threads them (the same ``libgomp`` torch
loads, so ``torch.set_num_threads`` holds). No torch headers: compiling takes about a second. Without a
compiler, without AVX2, or off Linux, :func:`kernels` returns None and the layers dequantize in PyTorch
instead (same results, no speed-up).

Layouts (row-major, C contiguous): ``x (M, K)`` fp32; int8: ``q (N, K)`` int8, ``scale (N,)``; int4:
``q (N, K / 2)`` uint8 in blocks of 32 inputs, byte ``j`` of a block holding input ``j`` in its low nibble
and input ``j + 16`` in its high one, ``scale`` and ``low`` ``(N, K / group)``, ``w = q * scale + low``.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

log = logging.getLogger(__name__)

_SOURCE = r"""
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <vector>

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

static inline __m256 widen8(__m128i bytes) {  // 8 unsigned bytes -> 8 floats
    return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(bytes));
}

// 32 unsigned bytes u times 32 signed bytes s, summed in fours into 8 int32 lanes
static inline __m256i dot_u8s8(__m256i u, __m256i s) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s);
#else
    return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
#endif
}

// x (M, K) fp32 to int8 codes and one scale per block of 32 inputs: d = max|x| / 127, q = round(x / d),
// the same arithmetic as weight_only.quantize_activations, so every path sees the same activations
static void quantize_blocks(const float* x, int64_t n_blocks, int8_t* xq, float* xs) {
    for (int64_t i = 0; i < n_blocks; ++i) {
        const float* b = x + i * 32;
        float amax = 0.f;
        for (int j = 0; j < 32; ++j) amax = fmaxf(amax, fabsf(b[j]));
        const float d = amax / 127.f;
        xs[i] = d;
        for (int j = 0; j < 32; ++j) xq[i * 32 + j] = d > 0.f ? (int8_t)nearbyintf(b[j] / d) : 0;
    }
}

// int4 weights x int8 activations. Per block of 32 inputs: the integer dot product of the 4-bit codes with
// the int8 activations, times the weight group's scale and the block's activation scale; the low terms
// come at the end (low[g] times the group's sum of the activations). With groups of 32 the scales of eight
// blocks lie side by side: eight blocks' integer sums are reduced into one vector (sum8) and scaled by one
// multiply and one fused multiply-add, not eight of each (8% faster over SmolLM2's layers here).
static inline __m256i block_dot(const uint8_t* q16, const int8_t* x32) {
    const __m128i bytes = _mm_loadu_si128((const __m128i*)q16);  // 32 codes: inputs 0-15 low, 16-31 high
    const __m256i codes = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(bytes, 4), bytes),
                                           _mm256_set1_epi8(0x0F));
    return dot_u8s8(codes, _mm256_loadu_si256((const __m256i*)x32));
}

// the eight blocks from q16 / x32 on: lane i of the result is block i's whole integer dot product
static inline __m256i sum8(const uint8_t* q16, const int8_t* x32) {
    __m256i p[8];
    for (int i = 0; i < 8; ++i) p[i] = block_dot(q16 + 16 * i, x32 + 32 * i);
    const __m256i a = _mm256_hadd_epi32(_mm256_hadd_epi32(p[0], p[1]), _mm256_hadd_epi32(p[2], p[3]));
    const __m256i b = _mm256_hadd_epi32(_mm256_hadd_epi32(p[4], p[5]), _mm256_hadd_epi32(p[6], p[7]));
    return _mm256_add_epi32(_mm256_permute2x128_si256(a, b, 0x20), _mm256_permute2x128_si256(a, b, 0x31));
}

extern "C" void int4_gemv_q8(const float* x, int64_t M, int64_t K, int64_t N, const uint8_t* q,
                             const float* scale, const float* low, int64_t group, float* y, int threads) {
    const int64_t G = K / group, B = K / 32, per = group / 32;
    std::vector<int8_t> xq(M * K);
    std::vector<float> xs(M * B), xsum(M * G);
    quantize_blocks(x, M * B, xq.data(), xs.data());
    for (int64_t m = 0; m < M; ++m)  // the low term: low[g] times the group's sum of the int8 activations
        for (int64_t g = 0; g < G; ++g) {
            float s = 0.f;
            for (int64_t b = g * per; b < (g + 1) * per; ++b) {
                int32_t t = 0;
                for (int j = 0; j < 32; ++j) t += xq[m * K + b * 32 + j];
                s += (float)t * xs[m * B + b];
            }
            xsum[m * G + g] = s;
        }
    const int64_t B8 = per == 1 ? B / 8 * 8 : 0;  // blocks taken eight at a time (groups of 32 only)
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t n = 0; n < N; ++n) {
        const uint8_t* qn = q + n * (K / 2);
        const float* sn = scale + n * G;
        for (int64_t m = 0; m < M; ++m) {
            const int8_t* xm = xq.data() + m * K;
            const float* xsm = xs.data() + m * B;
            __m256 acc = _mm256_setzero_ps();
            for (int64_t b = 0; b < B8; b += 8) {
                const __m256 d = _mm256_mul_ps(_mm256_loadu_ps(sn + b), _mm256_loadu_ps(xsm + b));
                acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum8(qn + b * 16, xm + b * 32)), d, acc);
            }
            for (int64_t b = B8; b < B; ++b) {
                const __m256 d = _mm256_set1_ps(sn[b / per] * xsm[b]);
                acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(block_dot(qn + b * 16, xm + b * 32)), d, acc);
            }
            float offset = 0.f;
            for (int64_t g = 0; g < G; ++g) offset += low[n * G + g] * xsum[m * G + g];
            y[m * N + n] = hsum(acc) + offset;
        }
    }
}

#define ROWS 4  // int8_gemv_q8's output rows per pass: they share each activation block's load

extern "C" void int8_gemv_q8(const float* x, int64_t M, int64_t K, int64_t N, const int8_t* q,
                             const float* scale, float* y, int threads) {
    const int64_t B = K / 32;
    std::vector<int8_t> xq(M * K);
    std::vector<float> xs(M * B);
    quantize_blocks(x, M * B, xq.data(), xs.data());
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t n0 = 0; n0 < N; n0 += ROWS) {
        const int64_t rows = N - n0 < ROWS ? N - n0 : ROWS;
        for (int64_t m = 0; m < M; ++m) {
            const int8_t* xm = xq.data() + m * K;
            const float* xsm = xs.data() + m * B;
            __m256 acc[ROWS];
            for (int r = 0; r < ROWS; ++r) acc[r] = _mm256_setzero_ps();
            for (int64_t b = 0; b < B; ++b) {
                const __m256i xb = _mm256_loadu_si256((const __m256i*)(xm + b * 32));
                const __m256 d = _mm256_set1_ps(xsm[b]);
                for (int r = 0; r < rows; ++r) {
                    const __m256i w = _mm256_loadu_si256((const __m256i*)(q + (n0 + r) * K + b * 32));
                    // |w| as unsigned times x carrying w's sign: the signed product, as VNNI wants it
                    const __m256i dot = dot_u8s8(_mm256_sign_epi8(w, w), _mm256_sign_epi8(xb, w));
                    acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), d, acc[r]);
                }
            }
            for (int r = 0; r < rows; ++r) y[m * N + n0 + r] = hsum(acc[r]) * scale[n0 + r];
        }
    }
}

extern "C" void int4_gemv(const float* x, int64_t M, int64_t K, int64_t N, const uint8_t* q,
                          const float* scale, const float* low, int64_t group, float* y, int threads) {
    const int64_t G = K / group;
    std::vector<float> xsum(M * G);
    for (int64_t m = 0; m < M; ++m)
        for (int64_t g = 0; g < G; ++g) {
            float s = 0.f;
            for (int64_t k = g * group; k < (g + 1) * group; ++k) s += x[m * K + k];
            xsum[m * G + g] = s;
        }
    const __m128i nib = _mm_set1_epi8(0x0F);
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t n = 0; n < N; ++n) {
        const uint8_t* qn = q + n * (K / 2);
        const float* sn = scale + n * G;
        const float* ln = low + n * G;
        for (int64_t m = 0; m < M; ++m) {
            const float* xm = x + m * K;
            __m256 acc = _mm256_setzero_ps();
            float offset = 0.f;
            for (int64_t g = 0; g < G; ++g) {
                __m256 d0 = _mm256_setzero_ps(), d1 = _mm256_setzero_ps();
                for (int64_t b = g * group; b < (g + 1) * group; b += 32) {
                    __m128i bytes = _mm_loadu_si128((const __m128i*)(qn + b / 2));
                    __m128i lo = _mm_and_si128(bytes, nib);
                    __m128i hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), nib);
                    d0 = _mm256_fmadd_ps(widen8(lo), _mm256_loadu_ps(xm + b), d0);
                    d1 = _mm256_fmadd_ps(widen8(_mm_srli_si128(lo, 8)), _mm256_loadu_ps(xm + b + 8), d1);
                    d0 = _mm256_fmadd_ps(widen8(hi), _mm256_loadu_ps(xm + b + 16), d0);
                    d1 = _mm256_fmadd_ps(widen8(_mm_srli_si128(hi, 8)), _mm256_loadu_ps(xm + b + 24), d1);
                }
                acc = _mm256_fmadd_ps(_mm256_add_ps(d0, d1), _mm256_set1_ps(sn[g]), acc);
                offset += ln[g] * xsum[m * G + g];
            }
            y[m * N + n] = hsum(acc) + offset;
        }
    }
}

extern "C" void int4_dequant(int64_t K, int64_t N, const uint8_t* q, const float* scale, const float* low,
                             int64_t group, float* w, int threads) {
    const int64_t G = K / group;
    const __m128i nib = _mm_set1_epi8(0x0F);
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t n = 0; n < N; ++n) {
        const uint8_t* qn = q + n * (K / 2);
        float* wn = w + n * K;
        for (int64_t b = 0; b < K; b += 32) {
            const int64_t g = b / group;
            const __m256 s = _mm256_set1_ps(scale[n * G + g]), l = _mm256_set1_ps(low[n * G + g]);
            __m128i bytes = _mm_loadu_si128((const __m128i*)(qn + b / 2));
            __m128i lo = _mm_and_si128(bytes, nib);
            __m128i hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), nib);
            _mm256_storeu_ps(wn + b, _mm256_fmadd_ps(widen8(lo), s, l));
            _mm256_storeu_ps(wn + b + 8, _mm256_fmadd_ps(widen8(_mm_srli_si128(lo, 8)), s, l));
            _mm256_storeu_ps(wn + b + 16, _mm256_fmadd_ps(widen8(hi), s, l));
            _mm256_storeu_ps(wn + b + 24, _mm256_fmadd_ps(widen8(_mm_srli_si128(hi, 8)), s, l));
        }
    }
}

extern "C" void int8_gemv(const float* x, int64_t M, int64_t K, int64_t N, const int8_t* q,
                          const float* scale, float* y, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t n = 0; n < N; ++n) {
        const int8_t* qn = q + n * K;
        for (int64_t m = 0; m < M; ++m) {
            const float* xm = x + m * K;
            __m256 d0 = _mm256_setzero_ps(), d1 = _mm256_setzero_ps();
            int64_t k = 0;
            for (; k + 16 <= K; k += 16) {
                __m128i bytes = _mm_loadu_si128((const __m128i*)(qn + k));
                __m256 w0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes));
                __m256 w1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(bytes, 8)));
                d0 = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xm + k), d0);
                d1 = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xm + k + 8), d1);
            }
            float s = hsum(_mm256_add_ps(d0, d1));
            for (; k < K; ++k) s += xm[k] * (float)qn[k];
            y[m * N + n] = s * scale[n];
        }
    }
}

extern "C" void int8_dequant(int64_t K, int64_t N, const int8_t* q, const float* scale, float* w,
                             int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t n = 0; n < N; ++n)
        for (int64_t k = 0; k < K; ++k) w[n * K + k] = (float)q[n * K + k] * scale[n];
}
"""

_FLAGS = ["-O3", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC", "-std=c++17"]
#: with AVX-512 VNNI the int8 dot products are one instruction (``vpdpbusd``) instead of two
_VNNI_FLAGS = ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni"]

_P = ctypes.c_void_p
_I = ctypes.c_int64
_SIGNATURES = {
    "int4_gemv": [_P, _I, _I, _I, _P, _P, _P, _I, _P, ctypes.c_int],
    "int4_dequant": [_I, _I, _P, _P, _P, _I, _P, ctypes.c_int],
    "int8_gemv": [_P, _I, _I, _I, _P, _P, _P, ctypes.c_int],
    "int8_dequant": [_I, _I, _P, _P, _P, ctypes.c_int],
    "int4_gemv_q8": [_P, _I, _I, _I, _P, _P, _P, _I, _P, ctypes.c_int],
    "int8_gemv_q8": [_P, _I, _I, _I, _P, _P, _P, ctypes.c_int],
}


def cache_dir() -> Path:
    """Where compiled kernels are kept: ``$TANSUO_KERNEL_CACHE`` or ``~/.cache/tansuo/kernels``."""
    return Path(os.environ.get("TANSUO_KERNEL_CACHE") or Path.home() / ".cache" / "tansuo" / "kernels")


def _cpu_flags() -> set[str]:
    try:
        return set(Path("/proc/cpuinfo").read_text(encoding="ascii", errors="replace").split())
    except OSError:
        return set()


def _flags() -> list[str]:
    vnni = {"avx512f", "avx512bw", "avx512vl", "avx512_vnni"} <= _cpu_flags()
    return _FLAGS + (_VNNI_FLAGS if vnni else [])


def _compile(compiler: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        src, lib = Path(tmp) / "weight_only.cpp", Path(tmp) / target.name
        src.write_text(_SOURCE, encoding="ascii")
        proc = subprocess.run([compiler, *_flags(), str(src), "-o", str(lib)], capture_output=True, text=True)
        if proc.returncode != 0:
            raise OSError(f"{compiler} failed: {proc.stderr.strip()[-500:]}")
        os.replace(lib, target)  # atomic: a concurrent process sees the old file or the whole new one


@functools.cache
def kernels() -> ctypes.CDLL | None:
    """The compiled kernels (compiled on the first call of a process that finds none cached), or None where
    they cannot run: not x86-64 Linux with AVX2 and FMA, no C++ compiler, or the compile failed (logged)."""
    if os.environ.get("TANSUO_WEIGHT_ONLY_KERNELS", "1") == "0":
        return None
    x86 = platform.system() == "Linux" and platform.machine() in ("x86_64", "AMD64")
    if not x86 or not {"avx2", "fma"} <= _cpu_flags():
        log.info("weight-only kernels need x86-64 Linux with AVX2 and FMA; dequantizing in PyTorch instead")
        return None
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        log.warning("no C++ compiler (g++) found: weight-only layers dequantize in PyTorch, without speed-up")
        return None
    key = hashlib.sha256((_SOURCE + " ".join(_flags()) + compiler).encode()).hexdigest()[:16]
    target = cache_dir() / f"weight_only-{key}.so"
    try:
        if not target.is_file():
            log.info("compiling the weight-only kernels into %s", target)
            _compile(compiler, target)
        lib = ctypes.CDLL(str(target))
    except OSError as e:
        log.warning("weight-only kernels unavailable (%s): dequantizing in PyTorch instead", e)
        return None
    for name, argtypes in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = argtypes, None
    return lib


def _ptr(t: torch.Tensor) -> int:
    return t.data_ptr()


def int4_dequant(
    lib: ctypes.CDLL, q: torch.Tensor, scale: torch.Tensor, low: torch.Tensor, group: int
) -> torch.Tensor:
    """The fp32 weight ``(N, K)`` of packed int4 ``q (N, K / 2)``."""
    N, K = q.shape[0], q.shape[1] * 2
    w = torch.empty(N, K)
    lib.int4_dequant(K, N, _ptr(q), _ptr(scale), _ptr(low), group, _ptr(w), torch.get_num_threads())
    return w


def int8_dequant(lib: ctypes.CDLL, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The fp32 weight ``(N, K)`` of int8 ``q (N, K)`` with one scale per row."""
    N, K = q.shape
    w = torch.empty(N, K)
    lib.int8_dequant(K, N, _ptr(q), _ptr(scale), _ptr(w), torch.get_num_threads())
    return w


def gemv(
    lib: ctypes.CDLL,
    x: torch.Tensor,
    q: torch.Tensor,
    scale: torch.Tensor,
    low: torch.Tensor | None,
    group: int | None,
    int8_activations: bool,
) -> torch.Tensor:
    """The matrix-vector kernel for a layer's weights: int8 ``q (N, K)`` (``low`` None) or packed int4
    ``q (N, K / 2)``, with int8 or fp32 activations; ``x (M, K)`` fp32 contiguous, returns ``(M, N)``."""
    M, K = x.shape
    N = q.shape[0]
    y = torch.empty(M, N)
    threads = torch.get_num_threads()
    xp, qp, sp, yp = x.data_ptr(), q.data_ptr(), scale.data_ptr(), y.data_ptr()
    if low is None:
        fn = lib.int8_gemv_q8 if int8_activations else lib.int8_gemv
        fn(xp, M, K, N, qp, sp, yp, threads)
    else:
        fn = lib.int4_gemv_q8 if int8_activations else lib.int4_gemv
        fn(xp, M, K, N, qp, sp, low.data_ptr(), group, yp, threads)
    return y
