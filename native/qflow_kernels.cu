// Group-wise quantization kernels: quantize, dequantize, fake-quant, pack, unpack
// (the parameters are in params.cu, the GEMV in gemv_w4a16.cu), plus the
// library's small entry points (ABI version, error strings, busy wait).
//
// Each kernel is a thin grid loop around a per-thread "unit" function that is
// also compiled for the host; the qflow_host_* twins run the same units in
// plain loops so the arithmetic and indexing are testable without a GPU.
// The math is qflow/quant/affine.py's (see qflow_math.cuh for the exact rules).
#include <algorithm>
#include <climits>
#include <cmath>

#include "qflow_launch.cuh"
#include "qflow_math.cuh"

namespace qflow {
namespace {

__constant__ float c_nf4[16] = {QFLOW_NF4_VALUES};
__constant__ float c_fp4[16] = {QFLOW_FP4_VALUES};
const float h_nf4[16] = {QFLOW_NF4_VALUES};
const float h_fp4[16] = {QFLOW_FP4_VALUES};

constexpr int kThreads = 256;

// ---- element-wise units ------------------------------------------------------

struct ElemArgs {
  const void* in;   // fp32 weights, uint8 codes or int32 words, [rows, cols or words]
  void* out;
  int64_t rows;
  int32_t cols;
  int32_t group;    // <= cols
  int64_t param_row_stride;
  const float* scale;
  const float* zero;  // NULL for lookup kinds
  int kind;
  float qmax;
  bool vec;          // rows start 16-byte aligned and hold whole vectors
};

constexpr int kVec = 4;  // columns per thread for the unpacked kernels

struct QuantizeUnit {  // fp32 -> uint8 codes
  static QF_HD void run(const ElemArgs& a, const float* table, int64_t row, int32_t t) {
    const int32_t c0 = kVec * t;
    const float* w = static_cast<const float*>(a.in) + row * a.cols;
    uint8_t* q = static_cast<uint8_t*>(a.out) + row * a.cols;
    ParamCursor p(a.scale, a.zero, row, a.param_row_stride, a.group, c0);
    if (a.vec) {  // cols % 4 == 0: the unit is whole
      const float4 v = load_ro(reinterpret_cast<const float4*>(w + c0));
      const float vals[kVec] = {v.x, v.y, v.z, v.w};
      uint8_t codes[kVec];
#pragma unroll
      for (int i = 0; i < kVec; ++i) {
        p.advance(c0 + i);
        codes[i] = quantize_value(vals[i], p.s, p.z, a.kind, a.qmax, table);
      }
      store_vec(reinterpret_cast<uchar4*>(q + c0), make_uchar4(codes[0], codes[1], codes[2], codes[3]));
      return;
    }
    for (int32_t c = c0; c < c0 + kVec && c < a.cols; ++c) {
      p.advance(c);
      q[c] = quantize_value(load_ro(w + c), p.s, p.z, a.kind, a.qmax, table);
    }
  }
};

struct FakeQuantUnit {  // fp32 -> fp32 through the codes
  static QF_HD void run(const ElemArgs& a, const float* table, int64_t row, int32_t t) {
    const int32_t c0 = kVec * t;
    const float* w = static_cast<const float*>(a.in) + row * a.cols;
    float* out = static_cast<float*>(a.out) + row * a.cols;
    ParamCursor p(a.scale, a.zero, row, a.param_row_stride, a.group, c0);
    if (a.vec) {
      const float4 v = load_ro(reinterpret_cast<const float4*>(w + c0));
      float vals[kVec] = {v.x, v.y, v.z, v.w};
#pragma unroll
      for (int i = 0; i < kVec; ++i) {
        p.advance(c0 + i);
        const uint8_t code = quantize_value(vals[i], p.s, p.z, a.kind, a.qmax, table);
        vals[i] = dequantize_value(code, p.s, p.z, a.kind, table);
      }
      store_vec(reinterpret_cast<float4*>(out + c0), make_float4(vals[0], vals[1], vals[2], vals[3]));
      return;
    }
    for (int32_t c = c0; c < c0 + kVec && c < a.cols; ++c) {
      p.advance(c);
      const uint8_t code = quantize_value(load_ro(w + c), p.s, p.z, a.kind, a.qmax, table);
      out[c] = dequantize_value(code, p.s, p.z, a.kind, table);
    }
  }
};

struct DequantizeUnit {  // uint8 codes -> fp32
  static QF_HD void run(const ElemArgs& a, const float* table, int64_t row, int32_t t) {
    const int32_t c0 = kVec * t;
    const uint8_t* q = static_cast<const uint8_t*>(a.in) + row * a.cols;
    float* out = static_cast<float*>(a.out) + row * a.cols;
    ParamCursor p(a.scale, a.zero, row, a.param_row_stride, a.group, c0);
    if (a.vec) {
      const uchar4 v = load_ro(reinterpret_cast<const uchar4*>(q + c0));
      const unsigned codes[kVec] = {v.x, v.y, v.z, v.w};
      float vals[kVec];
#pragma unroll
      for (int i = 0; i < kVec; ++i) {
        p.advance(c0 + i);
        vals[i] = dequantize_value(codes[i], p.s, p.z, a.kind, table);
      }
      store_vec(reinterpret_cast<float4*>(out + c0), make_float4(vals[0], vals[1], vals[2], vals[3]));
      return;
    }
    for (int32_t c = c0; c < c0 + kVec && c < a.cols; ++c) {
      p.advance(c);
      out[c] = dequantize_value(load_ro(q + c), p.s, p.z, a.kind, table);
    }
  }
};

// ---- packed units: one int32 word (32 / BITS columns) per thread -------------

template <int BITS>
struct Word {
  static constexpr int kPer = 32 / BITS;
  static constexpr uint32_t kMask = (1u << BITS) - 1u;
  // vector access is used only where a word's values fill whole 16-byte vectors
  static constexpr bool kFloatVec = kPer % 4 == 0;
  static constexpr bool kByteVec = kPer == 4 || kPer == 8 || kPer == 16;
};

template <int BITS>
QF_HD int32_t words_per_row(int32_t cols) {
  return static_cast<int32_t>((static_cast<int64_t>(cols) + Word<BITS>::kPer - 1) / Word<BITS>::kPer);
}

// Load the kPer fp32 values of one word (n valid, the rest 0).
template <int BITS>
QF_HD void load_word_floats(const float* p, int n, bool vec, float (&v)[Word<BITS>::kPer]) {
  constexpr int kPer = Word<BITS>::kPer;
  if constexpr (Word<BITS>::kFloatVec) {
    if (vec && n == kPer) {
#pragma unroll
      for (int j = 0; j < kPer / 4; ++j) {
        const float4 f = load_ro(reinterpret_cast<const float4*>(p) + j);
        v[4 * j] = f.x;
        v[4 * j + 1] = f.y;
        v[4 * j + 2] = f.z;
        v[4 * j + 3] = f.w;
      }
      return;
    }
  }
#pragma unroll
  for (int i = 0; i < kPer; ++i) v[i] = i < n ? load_ro(p + i) : 0.0f;
}

template <int BITS>
QF_HD void store_word_floats(float* p, int n, bool vec, const float (&v)[Word<BITS>::kPer]) {
  constexpr int kPer = Word<BITS>::kPer;
  if constexpr (Word<BITS>::kFloatVec) {
    if (vec && n == kPer) {
#pragma unroll
      for (int j = 0; j < kPer / 4; ++j) {
        store_vec(reinterpret_cast<float4*>(p) + j, make_float4(v[4 * j], v[4 * j + 1], v[4 * j + 2], v[4 * j + 3]));
      }
      return;
    }
  }
#pragma unroll
  for (int i = 0; i < kPer; ++i) {
    if (i < n) p[i] = v[i];
  }
}

template <int BITS>
QF_HD void load_word_bytes(const uint8_t* p, int n, bool vec, uint8_t (&v)[Word<BITS>::kPer]) {
  constexpr int kPer = Word<BITS>::kPer;
  if constexpr (Word<BITS>::kByteVec) {
    if (vec && n == kPer) {
      uint32_t u[kPer / 4];
      if constexpr (kPer == 16) {
        const uint4 x = load_ro(reinterpret_cast<const uint4*>(p));
        u[0] = x.x; u[1] = x.y; u[2] = x.z; u[3] = x.w;
      } else if constexpr (kPer == 8) {
        const uint2 x = load_ro(reinterpret_cast<const uint2*>(p));
        u[0] = x.x; u[1] = x.y;
      } else {
        u[0] = load_ro(reinterpret_cast<const uint32_t*>(p));
      }
#pragma unroll
      for (int i = 0; i < kPer; ++i) v[i] = static_cast<uint8_t>(u[i / 4] >> (8 * (i % 4)));
      return;
    }
  }
#pragma unroll
  for (int i = 0; i < kPer; ++i) v[i] = i < n ? load_ro(p + i) : uint8_t{0};
}

template <int BITS>
QF_HD void store_word_bytes(uint8_t* p, int n, bool vec, const uint8_t (&v)[Word<BITS>::kPer]) {
  constexpr int kPer = Word<BITS>::kPer;
  if constexpr (Word<BITS>::kByteVec) {
    if (vec && n == kPer) {
      uint32_t u[kPer / 4] = {};
#pragma unroll
      for (int i = 0; i < kPer; ++i) u[i / 4] |= static_cast<uint32_t>(v[i]) << (8 * (i % 4));
      if constexpr (kPer == 16) {
        store_vec(reinterpret_cast<uint4*>(p), make_uint4(u[0], u[1], u[2], u[3]));
      } else if constexpr (kPer == 8) {
        store_vec(reinterpret_cast<uint2*>(p), make_uint2(u[0], u[1]));
      } else {
        store_vec(reinterpret_cast<uint32_t*>(p), u[0]);
      }
      return;
    }
  }
#pragma unroll
  for (int i = 0; i < kPer; ++i) {
    if (i < n) p[i] = v[i];
  }
}

template <int BITS>
QF_HD uint32_t pack_word(const uint8_t (&codes)[Word<BITS>::kPer], int n) {
  uint32_t word = 0;
#pragma unroll
  for (int i = 0; i < Word<BITS>::kPer; ++i) {
    if (i < n) word |= (static_cast<uint32_t>(codes[i]) & Word<BITS>::kMask) << (BITS * i);
  }
  return word;
}

template <int BITS>
struct PackUnit {  // uint8 codes -> int32 words
  static QF_HD void run(const ElemArgs& a, const float*, int64_t row, int32_t t) {
    constexpr int kPer = Word<BITS>::kPer;
    const int32_t c0 = kPer * t;
    const int n = static_cast<int>(min64(kPer, a.cols - c0));
    const uint8_t* q = static_cast<const uint8_t*>(a.in) + row * a.cols + c0;
    uint8_t codes[kPer];
    load_word_bytes<BITS>(q, n, a.vec, codes);
    static_cast<uint32_t*>(a.out)[row * words_per_row<BITS>(a.cols) + t] = pack_word<BITS>(codes, n);
  }
};

template <int BITS>
struct UnpackUnit {  // int32 words -> uint8 codes
  static QF_HD void run(const ElemArgs& a, const float*, int64_t row, int32_t t) {
    constexpr int kPer = Word<BITS>::kPer;
    const int32_t c0 = kPer * t;
    const int n = static_cast<int>(min64(kPer, a.cols - c0));
    const uint32_t word =
        load_ro(static_cast<const uint32_t*>(a.in) + row * words_per_row<BITS>(a.cols) + t);
    uint8_t codes[kPer];
#pragma unroll
    for (int i = 0; i < kPer; ++i) codes[i] = static_cast<uint8_t>((word >> (BITS * i)) & Word<BITS>::kMask);
    store_word_bytes<BITS>(static_cast<uint8_t*>(a.out) + row * a.cols + c0, n, a.vec, codes);
  }
};

template <int BITS>
struct QuantizePackUnit {  // fp32 -> int32 words
  static QF_HD void run(const ElemArgs& a, const float* table, int64_t row, int32_t t) {
    constexpr int kPer = Word<BITS>::kPer;
    const int32_t c0 = kPer * t;
    const int n = static_cast<int>(min64(kPer, a.cols - c0));
    float w[kPer];
    load_word_floats<BITS>(static_cast<const float*>(a.in) + row * a.cols + c0, n, a.vec, w);
    ParamCursor p(a.scale, a.zero, row, a.param_row_stride, a.group, c0);
    uint8_t codes[kPer];
#pragma unroll
    for (int i = 0; i < kPer; ++i) {
      if (i < n) {
        p.advance(c0 + i);
        codes[i] = quantize_value(w[i], p.s, p.z, a.kind, a.qmax, table);
      } else {
        codes[i] = 0;
      }
    }
    static_cast<uint32_t*>(a.out)[row * words_per_row<BITS>(a.cols) + t] = pack_word<BITS>(codes, n);
  }
};

template <int BITS>
struct DequantizePackedUnit {  // int32 words -> fp32
  static QF_HD void run(const ElemArgs& a, const float* table, int64_t row, int32_t t) {
    constexpr int kPer = Word<BITS>::kPer;
    const int32_t c0 = kPer * t;
    const int n = static_cast<int>(min64(kPer, a.cols - c0));
    const uint32_t word =
        load_ro(static_cast<const uint32_t*>(a.in) + row * words_per_row<BITS>(a.cols) + t);
    ParamCursor p(a.scale, a.zero, row, a.param_row_stride, a.group, c0);
    float vals[kPer];
#pragma unroll
    for (int i = 0; i < kPer; ++i) {
      if (i < n) {
        p.advance(c0 + i);
        vals[i] = dequantize_value((word >> (BITS * i)) & Word<BITS>::kMask, p.s, p.z, a.kind, table);
      } else {
        vals[i] = 0.0f;
      }
    }
    store_word_floats<BITS>(static_cast<float*>(a.out) + row * a.cols + c0, n, a.vec, vals);
  }
};

// ---- running units: grid loops on the device, plain loops on the host --------

template <class Unit>
__global__ void __launch_bounds__(kThreads) rows_kernel(ElemArgs a, int32_t units_per_row) {
  __shared__ float table[16];  // lookup kinds: divergent reads hit distinct banks, not serialized
  if (threadIdx.x < 16) {
    table[threadIdx.x] = a.kind == QFLOW_KIND_FP4 ? c_fp4[threadIdx.x] : c_nf4[threadIdx.x];
  }
  __syncthreads();
  const int32_t stride = static_cast<int32_t>(gridDim.x * blockDim.x);
  for (int64_t row = blockIdx.y; row < a.rows; row += gridDim.y) {
    for (int32_t t = static_cast<int32_t>(blockIdx.x * blockDim.x + threadIdx.x); t < units_per_row;
         t += stride) {
      Unit::run(a, table, row, t);
    }
  }
}

template <class Unit>
int run_units(const ElemArgs& a, int64_t units_per_row, void* stream, bool host) {
  if (a.rows == 0 || units_per_row == 0) return kOk;
  if (host) {
    const float* table = a.kind == QFLOW_KIND_FP4 ? h_fp4 : h_nf4;
    for (int64_t row = 0; row < a.rows; ++row) {
      for (int32_t t = 0; t < units_per_row; ++t) Unit::run(a, table, row, t);
    }
    return kOk;
  }
  const dim3 grid(static_cast<unsigned>(std::min<int64_t>(ceil_div(units_per_row, kThreads), 1024)),
                  static_cast<unsigned>(std::min<int64_t>(a.rows, 65535)));
  rows_kernel<Unit><<<grid, kThreads, 0, as_stream(stream)>>>(a, static_cast<int32_t>(units_per_row));
  return static_cast<int>(cudaGetLastError());
}

template <template <int> class Unit>
int run_packed(int bits, const ElemArgs& a, void* stream, bool host) {
  switch (bits) {
    case 2: return run_units<Unit<2>>(a, words_per_row<2>(a.cols), stream, host);
    case 3: return run_units<Unit<3>>(a, words_per_row<3>(a.cols), stream, host);
    case 4: return run_units<Unit<4>>(a, words_per_row<4>(a.cols), stream, host);
    case 5: return run_units<Unit<5>>(a, words_per_row<5>(a.cols), stream, host);
    case 6: return run_units<Unit<6>>(a, words_per_row<6>(a.cols), stream, host);
    case 8: return run_units<Unit<8>>(a, words_per_row<8>(a.cols), stream, host);
    default: return kInvalid;
  }
}

// ---- argument checks ---------------------------------------------------------

// Shared checks of the element-wise entry points; fills `a` on success.
int make_elem_args(const void* in, void* out, int64_t rows, int64_t cols, int64_t group,
                   int64_t param_row_stride, const float* scale, const float* zero, int kind,
                   int bits, bool need_params, ElemArgs* a) {
  if (rows < 0 || cols < 0 || cols > INT32_MAX || group < 1 || param_row_stride < 0) return kInvalid;
  if (!valid_bits(bits)) return kInvalid;
  if (need_params) {
    if (kind < QFLOW_KIND_AFFINE || kind > QFLOW_KIND_AFFINE_FLOAT_ZERO) return kInvalid;
    if (is_lookup(kind) && bits != 4) return kInvalid;
    if (rows > 0 && cols > 0 && (scale == nullptr || (!is_lookup(kind) && zero == nullptr))) {
      return kInvalid;
    }
  }
  if (rows > 0 && cols > 0 && (in == nullptr || out == nullptr)) return kInvalid;
  a->in = in;
  a->out = out;
  a->rows = rows;
  a->cols = static_cast<int32_t>(cols);
  a->group = static_cast<int32_t>(std::min(group, std::max<int64_t>(cols, 1)));
  a->param_row_stride = param_row_stride;
  a->scale = scale;
  a->zero = is_lookup(kind) ? nullptr : zero;
  a->kind = kind;
  a->qmax = static_cast<float>((1 << bits) - 1);
  a->vec = false;
  return kOk;
}

// Packed kernels on the fp32 side: a word's values are whole float4s (2, 4, 8 bits)
// and every row starts 16-byte aligned.
bool packed_float_vec_ok(int bits, int32_t cols, const void* floats) {
  const int per = 32 / bits;
  return per % 4 == 0 && cols % per == 0 && aligned(floats, 16);
}

// ... on the uint8 side: a word's codes are one 4, 8 or 16-byte access.
bool packed_byte_vec_ok(int bits, int32_t cols, const void* bytes) {
  const int per = 32 / bits;
  return (per == 4 || per == 8 || per == 16) && cols % per == 0 && aligned(bytes, static_cast<unsigned>(per));
}

int quantize_impl(const float* w, int64_t rows, int64_t cols, int64_t group, int64_t prs,
                  const float* scale, const float* zero, int kind, int bits, uint8_t* codes,
                  void* stream, bool host) {
  ElemArgs a;
  int rc = make_elem_args(w, codes, rows, cols, group, prs, scale, zero, kind, bits, true, &a);
  if (rc != kOk) return rc;
  a.vec = a.cols % kVec == 0 && aligned(w, 16) && aligned(codes, 4);
  return run_units<QuantizeUnit>(a, ceil_div(a.cols, kVec), stream, host);
}

int fake_quant_impl(const float* w, int64_t rows, int64_t cols, int64_t group, int64_t prs,
                    const float* scale, const float* zero, int kind, int bits, float* out,
                    void* stream, bool host) {
  ElemArgs a;
  int rc = make_elem_args(w, out, rows, cols, group, prs, scale, zero, kind, bits, true, &a);
  if (rc != kOk) return rc;
  a.vec = a.cols % kVec == 0 && aligned(w, 16) && aligned(out, 16);
  return run_units<FakeQuantUnit>(a, ceil_div(a.cols, kVec), stream, host);
}

int dequantize_impl(const uint8_t* codes, int64_t rows, int64_t cols, int64_t group, int64_t prs,
                    const float* scale, const float* zero, int kind, int bits, float* out,
                    void* stream, bool host) {
  ElemArgs a;
  int rc = make_elem_args(codes, out, rows, cols, group, prs, scale, zero, kind, bits, true, &a);
  if (rc != kOk) return rc;
  a.vec = a.cols % kVec == 0 && aligned(codes, 4) && aligned(out, 16);
  return run_units<DequantizeUnit>(a, ceil_div(a.cols, kVec), stream, host);
}

int quantize_pack_impl(const float* w, int64_t rows, int64_t cols, int64_t group, int64_t prs,
                       const float* scale, const float* zero, int kind, int bits, int32_t* packed,
                       void* stream, bool host) {
  ElemArgs a;
  int rc = make_elem_args(w, packed, rows, cols, group, prs, scale, zero, kind, bits, true, &a);
  if (rc != kOk) return rc;
  a.vec = packed_float_vec_ok(bits, a.cols, w);
  return run_packed<QuantizePackUnit>(bits, a, stream, host);
}

int dequantize_packed_impl(const int32_t* packed, int64_t rows, int64_t cols, int64_t group,
                           int64_t prs, const float* scale, const float* zero, int kind, int bits,
                           float* out, void* stream, bool host) {
  ElemArgs a;
  int rc = make_elem_args(packed, out, rows, cols, group, prs, scale, zero, kind, bits, true, &a);
  if (rc != kOk) return rc;
  a.vec = packed_float_vec_ok(bits, a.cols, out);
  return run_packed<DequantizePackedUnit>(bits, a, stream, host);
}

int pack_impl(const uint8_t* codes, int64_t rows, int64_t cols, int bits, int32_t* packed,
              void* stream, bool host) {
  ElemArgs a;
  int rc = make_elem_args(codes, packed, rows, cols, 1, 0, nullptr, nullptr, 0, bits, false, &a);
  if (rc != kOk) return rc;
  a.vec = packed_byte_vec_ok(bits, a.cols, codes);
  return run_packed<PackUnit>(bits, a, stream, host);
}

int unpack_impl(const int32_t* packed, int64_t rows, int64_t cols, int bits, uint8_t* codes,
                void* stream, bool host) {
  ElemArgs a;
  int rc = make_elem_args(packed, codes, rows, cols, 1, 0, nullptr, nullptr, 0, bits, false, &a);
  if (rc != kOk) return rc;
  a.vec = packed_byte_vec_ok(bits, a.cols, codes);
  return run_packed<UnpackUnit>(bits, a, stream, host);
}

__global__ void busy_wait_kernel(int64_t nanoseconds) {
  uint64_t start;
  uint64_t now;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(start));
  do {
    __nanosleep(1000);
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now));
  } while (now - start < static_cast<uint64_t>(nanoseconds));
}

}  // namespace
}  // namespace qflow

using namespace qflow;

extern "C" {

int qflow_abi_version(void) { return QFLOW_ABI_VERSION; }

const char* qflow_error_string(int code) {
  return cudaGetErrorString(static_cast<cudaError_t>(code));
}

int qflow_cuda_versions(int* runtime_version, int* driver_version) {
  *runtime_version = 0;
  *driver_version = 0;
  cudaError_t rc = cudaRuntimeGetVersion(runtime_version);
  if (rc != cudaSuccess) return static_cast<int>(rc);
  return static_cast<int>(cudaDriverGetVersion(driver_version));  // 0 when no driver
}

int qflow_busy_wait(int64_t nanoseconds, void* stream) {
  if (nanoseconds < 0) return kInvalid;
  busy_wait_kernel<<<1, 1, 0, as_stream(stream)>>>(nanoseconds);
  return static_cast<int>(cudaGetLastError());
}

// ---- device entry points -------------------------------------------------------

int qflow_quantize(const float* w, int64_t rows, int64_t cols, int64_t group,
                   int64_t param_row_stride, const float* scale, const float* zero, int kind,
                   int bits, uint8_t* codes, void* stream) {
  return quantize_impl(w, rows, cols, group, param_row_stride, scale, zero, kind, bits, codes,
                       stream, false);
}

int qflow_quantize_pack(const float* w, int64_t rows, int64_t cols, int64_t group,
                        int64_t param_row_stride, const float* scale, const float* zero, int kind,
                        int bits, int32_t* packed, void* stream) {
  return quantize_pack_impl(w, rows, cols, group, param_row_stride, scale, zero, kind, bits,
                            packed, stream, false);
}

int qflow_fake_quant(const float* w, int64_t rows, int64_t cols, int64_t group,
                     int64_t param_row_stride, const float* scale, const float* zero, int kind,
                     int bits, float* out, void* stream) {
  return fake_quant_impl(w, rows, cols, group, param_row_stride, scale, zero, kind, bits, out,
                         stream, false);
}

int qflow_dequantize(const uint8_t* codes, int64_t rows, int64_t cols, int64_t group,
                     int64_t param_row_stride, const float* scale, const float* zero, int kind,
                     int bits, float* out, void* stream) {
  return dequantize_impl(codes, rows, cols, group, param_row_stride, scale, zero, kind, bits, out,
                         stream, false);
}

int qflow_dequantize_packed(const int32_t* packed, int64_t rows, int64_t cols, int64_t group,
                            int64_t param_row_stride, const float* scale, const float* zero,
                            int kind, int bits, float* out, void* stream) {
  return dequantize_packed_impl(packed, rows, cols, group, param_row_stride, scale, zero, kind,
                                bits, out, stream, false);
}

int qflow_pack(const uint8_t* codes, int64_t rows, int64_t cols, int bits, int32_t* packed,
               void* stream) {
  return pack_impl(codes, rows, cols, bits, packed, stream, false);
}

int qflow_unpack(const int32_t* packed, int64_t rows, int64_t cols, int bits, uint8_t* codes,
                 void* stream) {
  return unpack_impl(packed, rows, cols, bits, codes, stream, false);
}

// ---- host twins ----------------------------------------------------------------

int qflow_host_quantize(const float* w, int64_t rows, int64_t cols, int64_t group,
                        int64_t param_row_stride, const float* scale, const float* zero, int kind,
                        int bits, uint8_t* codes) {
  return quantize_impl(w, rows, cols, group, param_row_stride, scale, zero, kind, bits, codes,
                       nullptr, true);
}

int qflow_host_quantize_pack(const float* w, int64_t rows, int64_t cols, int64_t group,
                             int64_t param_row_stride, const float* scale, const float* zero,
                             int kind, int bits, int32_t* packed) {
  return quantize_pack_impl(w, rows, cols, group, param_row_stride, scale, zero, kind, bits,
                            packed, nullptr, true);
}

int qflow_host_fake_quant(const float* w, int64_t rows, int64_t cols, int64_t group,
                          int64_t param_row_stride, const float* scale, const float* zero,
                          int kind, int bits, float* out) {
  return fake_quant_impl(w, rows, cols, group, param_row_stride, scale, zero, kind, bits, out,
                         nullptr, true);
}

int qflow_host_dequantize(const uint8_t* codes, int64_t rows, int64_t cols, int64_t group,
                          int64_t param_row_stride, const float* scale, const float* zero,
                          int kind, int bits, float* out) {
  return dequantize_impl(codes, rows, cols, group, param_row_stride, scale, zero, kind, bits, out,
                         nullptr, true);
}

int qflow_host_dequantize_packed(const int32_t* packed, int64_t rows, int64_t cols,
                                 int64_t group, int64_t param_row_stride, const float* scale,
                                 const float* zero, int kind, int bits, float* out) {
  return dequantize_packed_impl(packed, rows, cols, group, param_row_stride, scale, zero, kind,
                                bits, out, nullptr, true);
}

int qflow_host_pack(const uint8_t* codes, int64_t rows, int64_t cols, int bits, int32_t* packed) {
  return pack_impl(codes, rows, cols, bits, packed, nullptr, true);
}

int qflow_host_unpack(const int32_t* packed, int64_t rows, int64_t cols, int bits,
                      uint8_t* codes) {
  return unpack_impl(packed, rows, cols, bits, codes, nullptr, true);
}

}  // extern "C"
