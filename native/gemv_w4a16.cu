// W4A16 GEMV for batch-1 decode: y = x W^T with W dequantized on the fly.
//
// Fast path (cols % 32 == 0, group % 32 == 0, x and qweight 16-byte aligned):
// a warp owns ROWS output rows; each lane walks 32-column chunks of the row
// (one 128-bit load = 4 words = 32 codes per row, four 128-bit loads of x) and
// two chunks are in flight per lane. A chunk lies inside one group, so the
// group's scale and zero are factored out of the chunk's dot product:
//     sum_k x_k (q_k - z) s = s * (sum_k x_k q_k - z * sum_k x_k)
// which costs one FMA per weight. Codes become floats exactly with the
// "magic number" trick: the byte q placed in the mantissa of 2^23 gives
// 2^23 + q, and subtracting 2^23 leaves q. Accumulation is fp32; the result is
// rounded once to fp16. This is not bit-identical to dequantize-then-matmul
// (no GEMV is: the summation order differs); it is checked against an fp64
// reference with a tolerance.
//
// Generic path (anything else): a warp per row, one word per lane step,
// (q - z) * s per element.
//
// The per-lane loops are __host__ __device__ and the host twin replays the
// device's warp reduction order, so host and device results are meant to agree
// bit for bit (both use fmaf explicitly).
#include <cstring>

#include "qflow_launch.cuh"
#include "qflow_math.cuh"

namespace qflow {
namespace {

constexpr int kGemvWarps = 4;  // warps per block
constexpr int kGemvThreads = 32 * kGemvWarps;

struct GemvArgs {
  const __half* x;          // [batch, cols]
  const uint32_t* qweight;  // [rows, words]
  const void* scale;        // [rows * param_row_stride ...] of P
  const void* zero;         // same, or NULL (zero = 8)
  __half* y;                // [batch, rows]
  int64_t batch;
  int64_t rows;
  int32_t cols;
  int32_t group;
  int64_t param_row_stride;
  int64_t words;            // per row: ceil(cols / 8)
};

QF_HD float param_to_float(float v) { return v; }
QF_HD float param_to_float(__half v) { return __half2float(v); }

QF_HD float bits_to_float(uint32_t u) {
#ifdef __CUDA_ARCH__
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
#endif
}

// PTX prmt / __byte_perm: result byte n = byte (selector nibble n & 7) of {y:x}.
QF_HD uint32_t byte_perm(uint32_t x, uint32_t y, uint32_t selector) {
#ifdef __CUDA_ARCH__
  return __byte_perm(x, y, selector);
#else
  const uint64_t both = (static_cast<uint64_t>(y) << 32) | x;
  uint32_t r = 0;
  for (int n = 0; n < 4; ++n) {
    const uint32_t pick = (selector >> (4 * n)) & 7u;
    r |= static_cast<uint32_t>((both >> (8 * pick)) & 0xFFu) << (8 * n);
  }
  return r;
#endif
}

// Byte b (0..3) of `bytes`, each byte < 256, as an exact float.
QF_HD float byte_as_float(uint32_t bytes, uint32_t b) {
  // bytes: [q, 0, 0, 0x4B] = 2^23 + q
  return bits_to_float(byte_perm(bytes, 0x4B000000u, 0x7440u | b)) - 8388608.0f;
}

// sum_i x[i] * q_i over the 8 nibbles of one word (nibble i = column i).
QF_HD float dot_word(uint32_t word, const float* x, float acc) {
  const uint32_t even = word & 0x0F0F0F0Fu;         // byte b: nibble 2b
  const uint32_t odd = (word >> 4) & 0x0F0F0F0Fu;   // byte b: nibble 2b + 1
#pragma unroll
  for (uint32_t b = 0; b < 4; ++b) {
    acc = fmaf(x[2 * b], byte_as_float(even, b), acc);
    acc = fmaf(x[2 * b + 1], byte_as_float(odd, b), acc);
  }
  return acc;
}

QF_HD float half_bits_to_float(uint32_t bits) {
  __half_raw raw;
  raw.x = static_cast<unsigned short>(bits);
  return __half2float(__half(raw));
}

// 32 fp16 activations -> fp32, and their sum.
QF_HD float load_x_chunk(const __half* x, float (&xf)[32]) {
  float sum = 0.0f;
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const uint4 v = load_ro(reinterpret_cast<const uint4*>(x) + j);
    const uint32_t u[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const float lo = half_bits_to_float(u[k] & 0xFFFFu);  // the lower address: column 2k
      const float hi = half_bits_to_float(u[k] >> 16);
      xf[8 * j + 2 * k] = lo;
      xf[8 * j + 2 * k + 1] = hi;
      sum += lo;
      sum += hi;
    }
  }
  return sum;
}

constexpr int kUnroll = 2;  // chunks in flight per lane

template <int ROWS, class P>
QF_HD void gemv_fast_lane(const GemvArgs& a, int64_t b, int64_t row0, int lane, float (&acc)[ROWS]) {
  const __half* x = a.x + b * a.cols;
  const P* scale = static_cast<const P*>(a.scale);
  const P* zero = static_cast<const P*>(a.zero);
  const int32_t n_chunks = a.cols / 32;
  for (int32_t c = lane; c < n_chunks; c += 32 * kUnroll) {
    uint4 w[kUnroll][ROWS];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int32_t cu = c + 32 * u;
#pragma unroll
      for (int r = 0; r < ROWS; ++r) {
        if (cu < n_chunks && row0 + r < a.rows) {
          w[u][r] = load_ro(reinterpret_cast<const uint4*>(a.qweight + (row0 + r) * a.words) + cu);
        } else {
          w[u][r] = make_uint4(0u, 0u, 0u, 0u);
        }
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int32_t cu = c + 32 * u;
      if (cu >= n_chunks) break;
      float xf[32];
      const float xsum = load_x_chunk(x + 32 * static_cast<int64_t>(cu), xf);
      const int32_t g = (32 * cu) / a.group;
#pragma unroll
      for (int r = 0; r < ROWS; ++r) {
        if (row0 + r >= a.rows) continue;
        float dot = 0.0f;
        dot = dot_word(w[u][r].x, xf, dot);
        dot = dot_word(w[u][r].y, xf + 8, dot);
        dot = dot_word(w[u][r].z, xf + 16, dot);
        dot = dot_word(w[u][r].w, xf + 24, dot);
        const int64_t pi = (row0 + r) * a.param_row_stride + g;
        const float s = param_to_float(load_ro(scale + pi));
        const float z = zero ? param_to_float(load_ro(zero + pi)) : 8.0f;
        acc[r] = fmaf(s, fmaf(-z, xsum, dot), acc[r]);
      }
    }
  }
}

template <class P>
QF_HD float gemv_generic_lane(const GemvArgs& a, int64_t b, int64_t row, int lane) {
  const __half* x = a.x + b * a.cols;
  const P* scale = static_cast<const P*>(a.scale) + row * a.param_row_stride;
  const P* zero = a.zero ? static_cast<const P*>(a.zero) + row * a.param_row_stride : nullptr;
  float acc = 0.0f;
  for (int64_t t = lane; t < a.words; t += 32) {
    const uint32_t word = load_ro(a.qweight + row * a.words + t);
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const int64_t c = 8 * t + i;
      if (c >= a.cols) break;
      const int64_t g = c / a.group;
      const float s = param_to_float(load_ro(scale + g));
      const float z = zero ? param_to_float(load_ro(zero + g)) : 8.0f;
      const float q = static_cast<float>((word >> (4 * i)) & 15u);
      acc = fmaf(__half2float(load_ro(x + c)), f_mul(f_sub(q, z), s), acc);
    }
  }
  return acc;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// The same butterfly on the host: lane l adds lane l ^ offset's value.
float host_warp_sum(float (&v)[32]) {
  for (int offset = 16; offset > 0; offset >>= 1) {
    float next[32];
    for (int l = 0; l < 32; ++l) next[l] = v[l] + v[l ^ offset];
    std::memcpy(v, next, sizeof next);
  }
  return v[0];
}

template <int ROWS, class P>
__global__ void __launch_bounds__(kGemvThreads) gemv_fast_kernel(GemvArgs a) {
  const int lane = static_cast<int>(threadIdx.x & 31);
  const int64_t row0 = (static_cast<int64_t>(blockIdx.x) * kGemvWarps + (threadIdx.x >> 5)) * ROWS;
  if (row0 >= a.rows) return;  // whole warp
  for (int64_t b = blockIdx.y; b < a.batch; b += gridDim.y) {
    float acc[ROWS];
#pragma unroll
    for (int r = 0; r < ROWS; ++r) acc[r] = 0.0f;
    gemv_fast_lane<ROWS, P>(a, b, row0, lane, acc);
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
      const float v = warp_sum(acc[r]);
      if (lane == 0 && row0 + r < a.rows) a.y[b * a.rows + row0 + r] = __float2half_rn(v);
    }
  }
}

template <class P>
__global__ void __launch_bounds__(kGemvThreads) gemv_generic_kernel(GemvArgs a) {
  const int lane = static_cast<int>(threadIdx.x & 31);
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kGemvWarps + (threadIdx.x >> 5);
  if (row >= a.rows) return;
  for (int64_t b = blockIdx.y; b < a.batch; b += gridDim.y) {
    const float v = warp_sum(gemv_generic_lane<P>(a, b, row, lane));
    if (lane == 0) a.y[b * a.rows + row] = __float2half_rn(v);
  }
}

template <int ROWS, class P>
void gemv_fast_host(const GemvArgs& a) {
  for (int64_t b = 0; b < a.batch; ++b) {
    for (int64_t row0 = 0; row0 < a.rows; row0 += ROWS) {
      float lanes[ROWS][32];
      for (int lane = 0; lane < 32; ++lane) {
        float acc[ROWS];
        for (int r = 0; r < ROWS; ++r) acc[r] = 0.0f;
        gemv_fast_lane<ROWS, P>(a, b, row0, lane, acc);
        for (int r = 0; r < ROWS; ++r) lanes[r][lane] = acc[r];
      }
      for (int r = 0; r < ROWS && row0 + r < a.rows; ++r) {
        a.y[b * a.rows + row0 + r] = __float2half_rn(host_warp_sum(lanes[r]));
      }
    }
  }
}

template <class P>
void gemv_generic_host(const GemvArgs& a) {
  for (int64_t b = 0; b < a.batch; ++b) {
    for (int64_t row = 0; row < a.rows; ++row) {
      float lanes[32];
      for (int lane = 0; lane < 32; ++lane) lanes[lane] = gemv_generic_lane<P>(a, b, row, lane);
      a.y[b * a.rows + row] = __float2half_rn(host_warp_sum(lanes));
    }
  }
}

template <int ROWS, class P>
int launch_fast(const GemvArgs& a, cudaStream_t stream, bool host) {
  if (host) {
    gemv_fast_host<ROWS, P>(a);
    return kOk;
  }
  const dim3 grid(static_cast<unsigned>(ceil_div(a.rows, kGemvWarps * ROWS)),
                  static_cast<unsigned>(a.batch < 65535 ? a.batch : 65535));
  gemv_fast_kernel<ROWS, P><<<grid, kGemvThreads, 0, stream>>>(a);
  return static_cast<int>(cudaGetLastError());
}

template <class P>
int launch(const GemvArgs& a, int rows_per_warp, cudaStream_t stream, bool host) {
  const bool fast = a.cols % 32 == 0 && a.group % 32 == 0 && aligned(a.x, 16) && aligned(a.qweight, 16);
  if (!fast) {
    if (host) {
      gemv_generic_host<P>(a);
      return kOk;
    }
    const dim3 grid(static_cast<unsigned>(ceil_div(a.rows, kGemvWarps)),
                    static_cast<unsigned>(a.batch < 65535 ? a.batch : 65535));
    gemv_generic_kernel<P><<<grid, kGemvThreads, 0, stream>>>(a);
    return static_cast<int>(cudaGetLastError());
  }
  if (rows_per_warp == 0) {  // enough blocks to fill ~132 SMs several times over
    rows_per_warp = a.rows >= 8192 ? 4 : a.rows >= 2048 ? 2 : 1;
  }
  switch (rows_per_warp) {
    case 1: return launch_fast<1, P>(a, stream, host);
    case 2: return launch_fast<2, P>(a, stream, host);
    default: return launch_fast<4, P>(a, stream, host);
  }
}

int gemv_impl(const void* x, const int32_t* qweight, const void* scale, const void* zero,
              int param_dtype, int64_t batch, int64_t rows, int64_t cols, int64_t group,
              int64_t param_row_stride, int rows_per_warp, void* y, void* stream, bool host) {
  if (batch < 0 || rows < 0 || cols < 0 || cols > INT32_MAX - 32 || group < 1 || param_row_stride < 0) {
    return kInvalid;
  }
  if (param_dtype != QFLOW_PARAM_F32 && param_dtype != QFLOW_PARAM_F16) return kInvalid;
  if (rows_per_warp != 0 && rows_per_warp != 1 && rows_per_warp != 2 && rows_per_warp != 4) return kInvalid;
  if (batch == 0 || rows == 0) return kOk;
  if (!y || (cols > 0 && (!x || !qweight || !scale))) return kInvalid;
  GemvArgs a;
  a.x = static_cast<const __half*>(x);
  a.qweight = reinterpret_cast<const uint32_t*>(qweight);
  a.scale = scale;
  a.zero = zero;
  a.y = static_cast<__half*>(y);
  a.batch = batch;
  a.rows = rows;
  a.cols = static_cast<int32_t>(cols);
  a.group = static_cast<int32_t>(group < cols ? group : (cols > 0 ? cols : 1));
  a.param_row_stride = param_row_stride;
  a.words = ceil_div(cols, 8);
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  return param_dtype == QFLOW_PARAM_F16 ? launch<__half>(a, rows_per_warp, s, host)
                                        : launch<float>(a, rows_per_warp, s, host);
}

}  // namespace
}  // namespace qflow

extern "C" {

int qflow_gemv_w4a16(const void* x, const int32_t* qweight, const void* scale, const void* zero,
                     int param_dtype, int64_t batch, int64_t rows, int64_t cols, int64_t group,
                     int64_t param_row_stride, int rows_per_warp, void* y, void* stream) {
  return qflow::gemv_impl(x, qweight, scale, zero, param_dtype, batch, rows, cols, group,
                          param_row_stride, rows_per_warp, y, stream, false);
}

int qflow_host_gemv_w4a16(const void* x, const int32_t* qweight, const void* scale,
                          const void* zero, int param_dtype, int64_t batch, int64_t rows,
                          int64_t cols, int64_t group, int64_t param_row_stride,
                          int rows_per_warp, void* y) {
  return qflow::gemv_impl(x, qweight, scale, zero, param_dtype, batch, rows, cols, group,
                          param_row_stride, rows_per_warp, y, nullptr, true);
}

}  // extern "C"
