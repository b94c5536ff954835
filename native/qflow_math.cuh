// Element math shared by the CUDA kernels and their host twins.
//
// Everything here is __host__ __device__ and reproduces torch's CPU fp32
// semantics exactly (qflow/quant/affine.py is the definition):
//   * division, subtraction, multiplication are single IEEE round-to-nearest
//     operations; the device side uses the __f*_rn intrinsics, which the
//     compiler never contracts into an FMA (the host side is compiled with
//     -ffp-contract=off);
//   * torch.round is round-half-to-even (rintf);
//   * torch.clamp keeps NaN and the sign of zero: max(a, lo) = a < lo ? lo : a;
//   * amin / amax propagate NaN;
//   * fp32 -> fp16 / bf16 casts round to nearest even (__float2half_rn and
//     __float2bfloat16_rn, the same functions on host and device);
//   * float -> uint8 truncates toward zero.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "qflow_kernels.h"

#define QF_HD __host__ __device__ __forceinline__

namespace qflow {

// ---- torch-exact scalar operations ----------------------------------------

QF_HD float f_div(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}

QF_HD float f_sub(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}

QF_HD float f_add(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}

QF_HD float f_mul(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

QF_HD float f_rint(float x) { return rintf(x); }  // current rounding mode: to nearest even

QF_HD bool f_isnan(float x) { return x != x; }

QF_HD bool f_isfinite(float x) { return fabsf(x) <= 3.402823466e38f; }  // false for inf and NaN

QF_HD float clamp_min(float x, float lo) { return x < lo ? lo : x; }   // torch.clamp(x, min=lo)
QF_HD float clamp_max(float x, float hi) { return hi < x ? hi : x; }   // torch.clamp(x, max=hi)
QF_HD float clamp(float x, float lo, float hi) { return clamp_max(clamp_min(x, lo), hi); }

QF_HD float nan_min(float a, float b) { return (f_isnan(a) || a < b) ? a : b; }
QF_HD float nan_max(float a, float b) { return (f_isnan(a) || a > b) ? a : b; }

QF_HD int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

QF_HD uint8_t to_uint8(float v) { return static_cast<uint8_t>(static_cast<int>(v)); }

QF_HD float round_to_f16(float x) { return __half2float(__float2half_rn(x)); }
QF_HD float round_to_bf16(float x) { return __bfloat162float(__float2bfloat16_rn(x)); }

// affine.py _round_scale: cast through the storage dtype, then guard.
QF_HD float round_scale(float s, int scale_dtype) {
  if (scale_dtype == QFLOW_SCALE_F16) {
    s = round_to_f16(s);
  } else if (scale_dtype == QFLOW_SCALE_BF16) {
    s = round_to_bf16(s);
  }
  return (f_isfinite(s) && s > 0.0f) ? s : 0x1p-24f;  // 2^-24: smallest fp16 subnormal
}

// ---- parameters from a group's range (affine.py compute_params) ------------

struct ParamSpec {
  int scheme;
  int bits;
  int scale_dtype;
  int zero_float;
};

QF_HD void params_from_range(float lo, float hi, const ParamSpec& p, float* scale_out,
                             float* zero_out) {
  const float qmax = static_cast<float>((1 << p.bits) - 1);
  const float half_range = static_cast<float>(1 << (p.bits - 1));
  float scale;
  float zero;
  switch (p.scheme) {
    case QFLOW_SCHEME_ABSMAX: {
      const float absmax = nan_max(fabsf(lo), fabsf(hi));
      scale = absmax > 0.0f ? absmax : 1.0f;
      zero = 0.0f;
      break;
    }
    case QFLOW_SCHEME_ASYM_Z: {
      lo = clamp_max(lo, 0.0f);
      hi = clamp_min(hi, 0.0f);
      if (lo == 0.0f && hi == 0.0f) {
        lo = -1.0f;
        hi = 1.0f;
      }
      scale = round_scale(f_div(f_sub(hi, lo), qmax), p.scale_dtype);
      zero = clamp(f_rint(f_div(-lo, scale)), 0.0f, qmax);
      break;
    }
    case QFLOW_SCHEME_ASYM_A:
    case QFLOW_SCHEME_ASYM_H: {
      const float range = clamp_min(f_sub(hi, lo), 0x1.4f8b58p-17f);  // float32(1e-5)
      scale = round_scale(f_div(range, qmax), p.scale_dtype);
      if (p.zero_float) {
        zero = round_to_f16(f_div(-lo, scale));
      } else {
        zero = clamp(-f_rint(f_div(lo, scale)), 0.0f, qmax);
      }
      break;
    }
    case QFLOW_SCHEME_SYM_F: {
      float amax = nan_max(fabsf(lo), fabsf(hi));
      amax = amax == 0.0f ? 1.0f : amax;
      scale = round_scale(f_div(f_mul(2.0f, amax), qmax), p.scale_dtype);
      zero = half_range;
      break;
    }
    default: {  // QFLOW_SCHEME_SYM_R (validated by the entry points)
      const float amax = clamp_min(nan_max(fabsf(lo), fabsf(hi)), 0x1.4f8b58p-17f);
      scale = round_scale(f_div(amax, half_range - 1.0f), p.scale_dtype);
      zero = half_range;
      break;
    }
  }
  *scale_out = scale;
  *zero_out = zero;
}

// ---- lookup tables (affine.NF4_TABLE / FP4_TABLE as float32, exact hex) ----

#define QFLOW_NF4_VALUES                                                                    \
  -0x1p+0f, -0x1.647362p-1f, -0x1.0cd66p-1f, -0x1.94654p-2f, -0x1.23449ap-2f,               \
      -0x1.7a6a7ep-3f, -0x1.74f0e2p-4f, 0x0p+0f, 0x1.45f5fep-4f, 0x1.4995c6p-3f,            \
      0x1.f809bap-3f, 0x1.5a0674p-2f, 0x1.c3497p-2f, 0x1.200f56p-1f, 0x1.722766p-1f, 0x1p+0f
// bitsandbytes fp4: bit 3 = sign, magnitudes [0, 0.0625, 8, 12, 4, 6, 2, 3] / 12; code 8 is -0.0
#define QFLOW_FP4_VALUES                                                                    \
  0x0p+0f, 0x1.555556p-8f, 0x1.555556p-1f, 0x1p+0f, 0x1.555556p-2f, 0x1p-1f, 0x1.555556p-3f, \
      0x1p-2f, -0x0p+0f, -0x1.555556p-8f, -0x1.555556p-1f, -0x1p+0f, -0x1.555556p-2f,       \
      -0x1p-1f, -0x1.555556p-3f, -0x1p-2f

// ---- one element -------------------------------------------------------------

QF_HD bool is_lookup(int kind) { return kind == QFLOW_KIND_NF4 || kind == QFLOW_KIND_FP4; }

// affine.quantize: (kind, table) select the lookup formats; table has 16 entries.
QF_HD uint8_t quantize_value(float w, float scale, float zero, int kind, float qmax,
                             const float* table) {
  if (kind == QFLOW_KIND_AFFINE) {
    return to_uint8(clamp(f_add(f_rint(f_div(w, scale)), zero), 0.0f, qmax));
  }
  if (kind == QFLOW_KIND_AFFINE_FLOAT_ZERO) {  // HQQ: the zero is added before rounding
    return to_uint8(clamp(f_rint(f_add(f_div(w, scale), zero)), 0.0f, qmax));
  }
  // torch.argmin(|x - TABLE|): the first index of the smallest distance
  const float x = f_div(w, scale);
  int best = 0;
  float best_distance = fabsf(f_sub(x, table[0]));
#pragma unroll
  for (int k = 1; k < 16; ++k) {
    const float distance = fabsf(f_sub(x, table[k]));
    if (distance < best_distance) {
      best_distance = distance;
      best = k;
    }
  }
  return static_cast<uint8_t>(best);
}

// affine.dequantize
QF_HD float dequantize_value(unsigned code, float scale, float zero, int kind,
                             const float* table) {
  if (is_lookup(kind)) return f_mul(table[code & 15u], scale);
  return f_mul(f_sub(static_cast<float>(code), zero), scale);
}

// ---- parameter geometry ------------------------------------------------------

// Where the parameters of element (row, col) live, with the group tracked
// incrementally along a row (no division per element).
struct ParamCursor {
  const float* scale;
  const float* zero;  // NULL for lookup kinds
  int32_t group;
  int64_t next;       // first column of the next group (64-bit: no overflow near INT32_MAX)
  float s;
  float z;
  const float* scale_row;
  const float* zero_row;
  int32_t g;

  QF_HD ParamCursor(const float* scale_, const float* zero_, int64_t row, int64_t row_stride,
                    int32_t group_, int32_t col)
      : scale(scale_), zero(zero_), group(group_) {
    scale_row = scale + row * row_stride;
    zero_row = zero ? zero + row * row_stride : nullptr;
    g = col / group;
    next = (static_cast<int64_t>(g) + 1) * group;
    load();
  }
  QF_HD void load() {
#ifdef __CUDA_ARCH__
    s = __ldg(scale_row + g);
    z = zero_row ? __ldg(zero_row + g) : 0.0f;
#else
    s = scale_row[g];
    z = zero_row ? zero_row[g] : 0.0f;
#endif
  }
  // Move to column `col`, which is at most one column past the previous one.
  QF_HD void advance(int32_t col) {
    if (col >= next) {
      ++g;
      next += group;
      load();
    }
  }
};

// Loads that use the read-only path on the device.
template <class T>
QF_HD T load_ro(const T* p) {
#ifdef __CUDA_ARCH__
  return __ldg(p);
#else
  return *p;
#endif
}

// Vector store that stays one instruction: a plain `*p = v` can be split into scalar
// stores when the compiler merges it with a neighbouring scalar code path.
template <class T>
QF_HD void store_vec(T* p, const T& v) {
#ifdef __CUDA_ARCH__
  __stwb(p, v);
#else
  *p = v;
#endif
}

QF_HD bool aligned(const void* p, unsigned bytes) {
  return (reinterpret_cast<uintptr_t>(p) & (bytes - 1)) == 0;
}

}  // namespace qflow
