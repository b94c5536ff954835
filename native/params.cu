// Per-group min/max reductions and the (scale, zero) they give (affine.compute_params).
//
// A group is reduced by a team of lanes (8, 16 or 32 of a warp, or a whole block
// for a few long groups); min/max are exact, so any reduction order gives the
// reference's result. The host twins run each team member's share in turn.
#include <algorithm>
#include <climits>
#include <cmath>

#include "qflow_launch.cuh"
#include "qflow_math.cuh"

namespace qflow {
namespace {

constexpr int kThreads = 256;

// ---- min / max per group, optionally finished into (scale, zero) -------------

struct MinmaxArgs {
  const float* lo_src;
  const float* hi_src;
  int64_t rows;
  int32_t cols;
  int32_t group;      // <= cols
  int32_t n_groups;   // per row
  int64_t total_groups;
  bool vec;           // lo_src == hi_src, 16-byte aligned, cols and group multiples of 4
  bool finalize;
  ParamSpec spec;
  float* out_a;       // lo or scale
  float* out_b;       // hi or zero
};

// One team member's share of group `gid`: columns c0 + member, c0 + member + team, ...
QF_HD void minmax_partial(const MinmaxArgs& a, int64_t gid, int member, int team, float* lo,
                          float* hi) {
  const int64_t row = gid / a.n_groups;
  const int64_t c0 = (gid - row * a.n_groups) * a.group;
  const int64_t c1 = min64(c0 + a.group, a.cols);
  const float* plo = a.lo_src + row * a.cols;
  const float* phi = a.hi_src + row * a.cols;
  float l = *lo;
  float h = *hi;
  if (a.vec) {
    for (int64_t c = c0 + 4 * member; c < c1; c += 4 * team) {
      const float4 v = load_ro(reinterpret_cast<const float4*>(plo + c));
      l = nan_min(nan_min(l, v.x), nan_min(nan_min(v.y, v.z), v.w));
      h = nan_max(nan_max(h, v.x), nan_max(nan_max(v.y, v.z), v.w));
    }
  } else {
    for (int64_t c = c0 + member; c < c1; c += team) {
      l = nan_min(l, load_ro(plo + c));
      h = nan_max(h, load_ro(phi + c));
    }
  }
  *lo = l;
  *hi = h;
}

QF_HD void minmax_write(const MinmaxArgs& a, int64_t gid, float lo, float hi) {
  if (a.finalize) {
    params_from_range(lo, hi, a.spec, a.out_a + gid, a.out_b + gid);
  } else {
    a.out_a[gid] = lo;
    a.out_b[gid] = hi;
  }
}

// Team size: lanes per group (8, 16 or 32 lanes of a warp), or 0 for a whole block
// (few, long groups: per-tensor second pass, per-channel of short matrices).
int minmax_team(const MinmaxArgs& a) {
  const int64_t steps = a.vec ? a.group / 4 : a.group;
  if (a.total_groups < 256 && a.group >= 2048) return 0;
  return steps <= 8 ? 8 : steps <= 16 ? 16 : 32;
}

__device__ __forceinline__ void warp_minmax(float* lo, float* hi, int width) {
  for (int offset = width / 2; offset > 0; offset >>= 1) {
    *lo = nan_min(*lo, __shfl_xor_sync(0xffffffffu, *lo, offset));
    *hi = nan_max(*hi, __shfl_xor_sync(0xffffffffu, *hi, offset));
  }
}

template <int TEAM>
__global__ void __launch_bounds__(kThreads) minmax_team_kernel(MinmaxArgs a) {
  constexpr int kTeamsPerWarp = 32 / TEAM;
  const int lane = static_cast<int>(threadIdx.x & 31);
  const int64_t warp = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const int64_t n_warps = (static_cast<int64_t>(gridDim.x) * blockDim.x) >> 5;
  // `base` is the same for the whole warp, so every lane takes part in the shuffles
  for (int64_t base = warp * kTeamsPerWarp; base < a.total_groups; base += n_warps * kTeamsPerWarp) {
    const int64_t gid = base + lane / TEAM;
    float lo = INFINITY;
    float hi = -INFINITY;
    if (gid < a.total_groups) minmax_partial(a, gid, lane % TEAM, TEAM, &lo, &hi);
    warp_minmax(&lo, &hi, TEAM);
    if (lane % TEAM == 0 && gid < a.total_groups) minmax_write(a, gid, lo, hi);
  }
}

__global__ void __launch_bounds__(kThreads) minmax_block_kernel(MinmaxArgs a) {
  __shared__ float s_lo[kThreads / 32];
  __shared__ float s_hi[kThreads / 32];
  const int lane = static_cast<int>(threadIdx.x & 31);
  const int warp = static_cast<int>(threadIdx.x >> 5);
  const int n_warps = static_cast<int>(blockDim.x >> 5);
  for (int64_t gid = blockIdx.x; gid < a.total_groups; gid += gridDim.x) {
    float lo = INFINITY;
    float hi = -INFINITY;
    minmax_partial(a, gid, static_cast<int>(threadIdx.x), static_cast<int>(blockDim.x), &lo, &hi);
    warp_minmax(&lo, &hi, 32);
    if (lane == 0) {
      s_lo[warp] = lo;
      s_hi[warp] = hi;
    }
    __syncthreads();
    if (warp == 0) {
      lo = lane < n_warps ? s_lo[lane] : INFINITY;
      hi = lane < n_warps ? s_hi[lane] : -INFINITY;
      warp_minmax(&lo, &hi, 32);
      if (lane == 0) minmax_write(a, gid, lo, hi);
    }
    __syncthreads();  // s_lo / s_hi are reused by the next group
  }
}

int run_minmax(const MinmaxArgs& a, void* stream, bool host) {
  if (a.total_groups == 0) return kOk;
  const int team = minmax_team(a);
  if (host) {
    const int members = team == 0 ? kThreads : team;
    for (int64_t gid = 0; gid < a.total_groups; ++gid) {
      float lo = INFINITY;
      float hi = -INFINITY;
      for (int m = 0; m < members; ++m) {
        float l = INFINITY;
        float h = -INFINITY;
        minmax_partial(a, gid, m, members, &l, &h);
        lo = nan_min(lo, l);
        hi = nan_max(hi, h);
      }
      minmax_write(a, gid, lo, hi);
    }
    return kOk;
  }
  cudaStream_t s = as_stream(stream);
  if (team == 0) {
    const unsigned blocks = static_cast<unsigned>(std::min<int64_t>(a.total_groups, 65535));
    minmax_block_kernel<<<blocks, kThreads, 0, s>>>(a);
  } else {
    const int64_t warps = ceil_div(a.total_groups, 32 / team);
    const unsigned blocks = static_cast<unsigned>(std::min<int64_t>(ceil_div(warps, kThreads / 32), 65535));
    if (team == 8) {
      minmax_team_kernel<8><<<blocks, kThreads, 0, s>>>(a);
    } else if (team == 16) {
      minmax_team_kernel<16><<<blocks, kThreads, 0, s>>>(a);
    } else {
      minmax_team_kernel<32><<<blocks, kThreads, 0, s>>>(a);
    }
  }
  return static_cast<int>(cudaGetLastError());
}

int check_spec(int scheme, int bits, int scale_dtype, ParamSpec* spec) {
  if (scheme < QFLOW_SCHEME_ASYM_Z || scheme > QFLOW_SCHEME_ABSMAX) return kInvalid;
  if (scheme != QFLOW_SCHEME_ABSMAX && !valid_bits(bits)) return kInvalid;
  if (scale_dtype != QFLOW_SCALE_F32 && scale_dtype != QFLOW_SCALE_F16 && scale_dtype != QFLOW_SCALE_BF16) {
    return kInvalid;
  }
  spec->scheme = scheme;
  spec->bits = scheme == QFLOW_SCHEME_ABSMAX ? 4 : bits;
  spec->scale_dtype = scale_dtype;
  spec->zero_float = 0;
  return kOk;
}

int minmax_impl(const float* lo_src, const float* hi_src, int64_t rows, int64_t cols,
                int64_t group, bool finalize, const ParamSpec& spec, float* out_a, float* out_b,
                void* stream, bool host) {
  if (rows < 0 || cols < 0 || cols > INT32_MAX || group < 1) return kInvalid;
  if (rows == 0 || cols == 0) return kOk;
  if (!lo_src || !hi_src || !out_a || !out_b) return kInvalid;
  MinmaxArgs a;
  a.lo_src = lo_src;
  a.hi_src = hi_src;
  a.rows = rows;
  a.cols = static_cast<int32_t>(cols);
  a.group = static_cast<int32_t>(std::min(group, cols));
  a.n_groups = static_cast<int32_t>(ceil_div(cols, a.group));
  a.total_groups = rows * a.n_groups;
  a.vec = lo_src == hi_src && a.cols % 4 == 0 && a.group % 4 == 0 && aligned(lo_src, 16);
  a.finalize = finalize;
  a.spec = spec;
  a.out_a = out_a;
  a.out_b = out_b;
  return run_minmax(a, stream, host);
}

int compute_params_impl(const float* w, int64_t rows, int64_t cols, int64_t group, int scheme,
                        int bits, int scale_dtype, int zero_float, float* scale, float* zero,
                        void* stream, bool host) {
  ParamSpec spec;
  const int rc = check_spec(scheme, bits, scale_dtype, &spec);
  if (rc != kOk) return rc;
  spec.zero_float = zero_float;
  return minmax_impl(w, w, rows, cols, group, true, spec, scale, zero, stream, host);
}

__global__ void __launch_bounds__(kThreads)
    params_kernel(const float* lo, const float* hi, int64_t n, ParamSpec spec, float* scale,
                  float* zero) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    params_from_range(load_ro(lo + i), load_ro(hi + i), spec, scale + i, zero + i);
  }
}

int params_from_minmax_impl(const float* lo, const float* hi, int64_t n, int scheme, int bits,
                            int scale_dtype, int zero_float, float* scale, float* zero,
                            void* stream, bool host) {
  ParamSpec spec;
  const int rc = check_spec(scheme, bits, scale_dtype, &spec);
  if (rc != kOk) return rc;
  spec.zero_float = zero_float;
  if (n < 0) return kInvalid;
  if (n == 0) return kOk;
  if (!lo || !hi || !scale || !zero) return kInvalid;
  if (host) {
    for (int64_t i = 0; i < n; ++i) params_from_range(lo[i], hi[i], spec, scale + i, zero + i);
    return kOk;
  }
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>(ceil_div(n, kThreads), 65535));
  params_kernel<<<blocks, kThreads, 0, as_stream(stream)>>>(lo, hi, n, spec, scale, zero);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace
}  // namespace qflow

using namespace qflow;

extern "C" {

int qflow_group_minmax(const float* lo_src, const float* hi_src, int64_t rows, int64_t cols,
                       int64_t group, float* lo, float* hi, void* stream) {
  return minmax_impl(lo_src, hi_src, rows, cols, group, false, ParamSpec{}, lo, hi, stream, false);
}

int qflow_params_from_minmax(const float* lo, const float* hi, int64_t n, int scheme, int bits,
                             int scale_dtype, int zero_float, float* scale, float* zero,
                             void* stream) {
  return params_from_minmax_impl(lo, hi, n, scheme, bits, scale_dtype, zero_float, scale, zero,
                                 stream, false);
}

int qflow_compute_params(const float* w, int64_t rows, int64_t cols, int64_t group, int scheme,
                         int bits, int scale_dtype, int zero_float, float* scale, float* zero,
                         void* stream) {
  return compute_params_impl(w, rows, cols, group, scheme, bits, scale_dtype, zero_float, scale,
                             zero, stream, false);
}

// ---- host twins ----------------------------------------------------------------

int qflow_host_group_minmax(const float* lo_src, const float* hi_src, int64_t rows, int64_t cols,
                            int64_t group, float* lo, float* hi) {
  return minmax_impl(lo_src, hi_src, rows, cols, group, false, ParamSpec{}, lo, hi, nullptr, true);
}

int qflow_host_params_from_minmax(const float* lo, const float* hi, int64_t n, int scheme,
                                  int bits, int scale_dtype, int zero_float, float* scale,
                                  float* zero) {
  return params_from_minmax_impl(lo, hi, n, scheme, bits, scale_dtype, zero_float, scale, zero,
                                 nullptr, true);
}

int qflow_host_compute_params(const float* w, int64_t rows, int64_t cols, int64_t group,
                              int scheme, int bits, int scale_dtype, int zero_float, float* scale,
                              float* zero) {
  return compute_params_impl(w, rows, cols, group, scheme, bits, scale_dtype, zero_float, scale,
                             zero, nullptr, true);
}

}  // extern "C"
