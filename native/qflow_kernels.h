/* qflow CUDA kernels: the C ABI that qflow/kernels/cuda.py loads with ctypes.
 *
 * Every entry point takes device pointers, element counts and a stream
 * (a cudaStream_t passed as void*; NULL = legacy default stream), launches
 * asynchronously on that stream, and returns a cudaError_t as int (0 = ok;
 * cudaErrorInvalidValue = 1 for bad sizes/flags; launch errors come from
 * cudaGetLastError right after each launch).
 *
 * The math is qflow/quant/affine.py's, bit for bit (METHODS.md §1-2):
 *   scale, zero   fp32 [rows, n_groups]; element (r, c) uses
 *                 params[r * param_row_stride + c / group]
 *                 (per channel: group = cols, stride 1; per tensor: group = cols, stride 0)
 *   affine codes  clamp(rint(w / scale) + zero, 0, 2^bits - 1) as uint8; with a fractional
 *                 zero (HQQ zero_float) clamp(rint(w / scale + zero), 0, 2^bits - 1)
 *   affine w_hat  (float(code) - zero) * scale        (no FMA contraction)
 *   nf4 / fp4     code = first argmin_k |w / scale - TABLE[k]|, w_hat = TABLE[code] * scale
 *   packing       32 / bits codes per int32 along the input dim, field i in
 *                 bits [bits*i, bits*i + bits); bits in {2, 3, 4, 5, 6, 8}
 * Parameters are fp32 everywhere except the GEMV (fp16 or fp32); the Python
 * binding converts fp16/bf16 scales to fp32 (an exact widening) before the call.
 *
 * Every qflow_<op> has a qflow_host_<op> twin with the same arguments minus the
 * stream that runs the same per-thread device code in plain loops on host
 * memory. It exists so the arithmetic and indexing can be tested on machines
 * without a GPU; it is not fast.
 */
#ifndef QFLOW_KERNELS_H
#define QFLOW_KERNELS_H

#include <stdint.h>

#define QFLOW_ABI_VERSION 1

/* kind: how codes map to values */
#define QFLOW_KIND_AFFINE 0            /* code = clamp(rint(w / s) + z, 0, qmax) */
#define QFLOW_KIND_NF4 1
#define QFLOW_KIND_FP4 2
#define QFLOW_KIND_AFFINE_FLOAT_ZERO 3 /* fractional (HQQ fp16) zero: code = clamp(rint(w / s + z), 0, qmax) */

/* scheme: how (scale, zero) come from a group's min and max (METHODS.md §1 table) */
#define QFLOW_SCHEME_ASYM_Z 0
#define QFLOW_SCHEME_ASYM_A 1
#define QFLOW_SCHEME_ASYM_H 2
#define QFLOW_SCHEME_SYM_F 3
#define QFLOW_SCHEME_SYM_R 4
#define QFLOW_SCHEME_ABSMAX 5 /* nf4 / fp4: scale = absmax (1 if 0), zero = 0 */

/* scale_dtype: the storage type the fp32 scale is rounded through */
#define QFLOW_SCALE_F32 0
#define QFLOW_SCALE_F16 1
#define QFLOW_SCALE_BF16 2

/* param_dtype of the GEMV's scale and zero */
#define QFLOW_PARAM_F32 0
#define QFLOW_PARAM_F16 1

#ifdef __cplusplus
extern "C" {
#endif

int qflow_abi_version(void);
const char* qflow_error_string(int code);
/* CUDA runtime and driver versions (e.g. 13000); needs no device. */
int qflow_cuda_versions(int* runtime_version, int* driver_version);

/* ---- parameters ------------------------------------------------------- */
/* lo[r, g] = min, hi[r, g] = max over the valid columns of group g of row r
 * (NaN propagates). Reads lo_src for the min and hi_src for the max, so a
 * second pass can reduce the output of a first one (per-tensor params). */
int qflow_group_minmax(const float* lo_src, const float* hi_src, int64_t rows, int64_t cols,
                       int64_t group, float* lo, float* hi, void* stream);
int qflow_params_from_minmax(const float* lo, const float* hi, int64_t n, int scheme, int bits,
                             int scale_dtype, int zero_float, float* scale, float* zero,
                             void* stream);
/* group_minmax + params_from_minmax fused; scale/zero [rows, ceil(cols / group)]. */
int qflow_compute_params(const float* w, int64_t rows, int64_t cols, int64_t group, int scheme,
                         int bits, int scale_dtype, int zero_float, float* scale, float* zero,
                         void* stream);

/* ---- quantize / dequantize (w, out fp32 [rows, cols]; codes uint8 [rows, cols];
 *      packed int32 [rows, ceil(cols / (32 / bits))]) ----------------------- */
int qflow_quantize(const float* w, int64_t rows, int64_t cols, int64_t group,
                   int64_t param_row_stride, const float* scale, const float* zero, int kind,
                   int bits, uint8_t* codes, void* stream);
int qflow_quantize_pack(const float* w, int64_t rows, int64_t cols, int64_t group,
                        int64_t param_row_stride, const float* scale, const float* zero, int kind,
                        int bits, int32_t* packed, void* stream);
int qflow_fake_quant(const float* w, int64_t rows, int64_t cols, int64_t group,
                     int64_t param_row_stride, const float* scale, const float* zero, int kind,
                     int bits, float* out, void* stream);
int qflow_dequantize(const uint8_t* codes, int64_t rows, int64_t cols, int64_t group,
                     int64_t param_row_stride, const float* scale, const float* zero, int kind,
                     int bits, float* out, void* stream);
int qflow_dequantize_packed(const int32_t* packed, int64_t rows, int64_t cols, int64_t group,
                            int64_t param_row_stride, const float* scale, const float* zero,
                            int kind, int bits, float* out, void* stream);
int qflow_pack(const uint8_t* codes, int64_t rows, int64_t cols, int bits, int32_t* packed,
               void* stream);
int qflow_unpack(const int32_t* packed, int64_t rows, int64_t cols, int bits, uint8_t* codes,
                 void* stream);

/* ---- W4A16 GEMV -------------------------------------------------------- */
/* y[b, r] = sum_k x[b, k] * (q[r, k] - zero[r, g]) * scale[r, g], g = k / group;
 * x, y fp16 ([batch, cols], [batch, rows]); qweight int32 [rows, ceil(cols / 8)] (4-bit
 * internal packing); scale, zero of param_dtype; zero NULL means 8 (symmetric).
 * fp32 accumulation. rows_per_warp: 1, 2 or 4, or 0 to choose by size. */
int qflow_gemv_w4a16(const void* x, const int32_t* qweight, const void* scale, const void* zero,
                     int param_dtype, int64_t batch, int64_t rows, int64_t cols, int64_t group,
                     int64_t param_row_stride, int rows_per_warp, void* y, void* stream);

/* ---- benchmarking helper ---------------------------------------------- */
/* One thread spins for `nanoseconds` on the stream: lets a benchmark queue its
 * launches ahead of the GPU without touching memory (no cache pollution). */
int qflow_busy_wait(int64_t nanoseconds, void* stream);

/* ---- host twins (host pointers, same results; for tests without a GPU) -- */
int qflow_host_group_minmax(const float* lo_src, const float* hi_src, int64_t rows, int64_t cols,
                            int64_t group, float* lo, float* hi);
int qflow_host_params_from_minmax(const float* lo, const float* hi, int64_t n, int scheme,
                                  int bits, int scale_dtype, int zero_float, float* scale,
                                  float* zero);
int qflow_host_compute_params(const float* w, int64_t rows, int64_t cols, int64_t group,
                              int scheme, int bits, int scale_dtype, int zero_float, float* scale,
                              float* zero);
int qflow_host_quantize(const float* w, int64_t rows, int64_t cols, int64_t group,
                        int64_t param_row_stride, const float* scale, const float* zero, int kind,
                        int bits, uint8_t* codes);
int qflow_host_quantize_pack(const float* w, int64_t rows, int64_t cols, int64_t group,
                             int64_t param_row_stride, const float* scale, const float* zero,
                             int kind, int bits, int32_t* packed);
int qflow_host_fake_quant(const float* w, int64_t rows, int64_t cols, int64_t group,
                          int64_t param_row_stride, const float* scale, const float* zero,
                          int kind, int bits, float* out);
int qflow_host_dequantize(const uint8_t* codes, int64_t rows, int64_t cols, int64_t group,
                          int64_t param_row_stride, const float* scale, const float* zero,
                          int kind, int bits, float* out);
int qflow_host_dequantize_packed(const int32_t* packed, int64_t rows, int64_t cols,
                                 int64_t group, int64_t param_row_stride, const float* scale,
                                 const float* zero, int kind, int bits, float* out);
int qflow_host_pack(const uint8_t* codes, int64_t rows, int64_t cols, int bits, int32_t* packed);
int qflow_host_unpack(const int32_t* packed, int64_t rows, int64_t cols, int bits,
                      uint8_t* codes);
int qflow_host_gemv_w4a16(const void* x, const int32_t* qweight, const void* scale,
                          const void* zero, int param_dtype, int64_t batch, int64_t rows,
                          int64_t cols, int64_t group, int64_t param_row_stride,
                          int rows_per_warp, void* y);

#ifdef __cplusplus
}
#endif

#endif /* QFLOW_KERNELS_H */
