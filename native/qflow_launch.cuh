// Host-side helpers shared by the entry points of every .cu file.
#pragma once

#include <cuda_runtime.h>
#include <stdint.h>

namespace qflow {

constexpr int kOk = static_cast<int>(cudaSuccess);
constexpr int kInvalid = static_cast<int>(cudaErrorInvalidValue);  // bad sizes or flags

inline bool valid_bits(int bits) {
  return bits == 2 || bits == 3 || bits == 4 || bits == 5 || bits == 6 || bits == 8;
}

inline cudaStream_t as_stream(void* stream) { return static_cast<cudaStream_t>(stream); }

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace qflow
