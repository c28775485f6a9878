// y = x @ w.T + b for the few rows (1 to 8) of a decode step, float32, on x86 CPUs with AVX2 and FMA.
//
// Why: a decode step multiplies K x batch rows by every weight; the product is bound by reading the weight once,
// but the CPU GEMMs PyTorch ships pay 1.4-2x a one-row product for 4 rows. This kernel reads w in its own
// nn.Linear layout ([out, in], row-major; no copy, no packing), NT output rows at a time: each weight vector loaded
// is multiplied into all M input rows (kept in L1), and the weight 16 KiB ahead is prefetched, so the loads stream
// at the memory bound while the M x NT accumulators do the arithmetic. Output rows are split across ATen's threads.
// The dense reference is F.linear (tests/test_inference_kernels.py).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <immintrin.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>

namespace {

constexpr int64_t kPrefetchFloats = 4096;  // 16 KiB ahead of the weight row being read
constexpr int64_t kMaxRows = 8;            // kernels.py's ROWS_LINEAR_MAX_ROWS

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_hadd_ps(s, s);
  s = _mm_hadd_ps(s, s);
  return _mm_cvtss_f32(s);
}

inline void prefetch(const float* p) {
  // An address past the end is fine: a prefetch never faults. Integer arithmetic keeps the pointer valid C++.
  _mm_prefetch(reinterpret_cast<const char*>(reinterpret_cast<uintptr_t>(p) + kPrefetchFloats * sizeof(float)),
               _MM_HINT_T0);
}

// Output columns [n, n1) of y (M rows, row stride N), NT weight rows at a time; returns the first column not done.
template <int M, int NT>
int64_t rows_block(const float* x, const float* w, const float* b, float* y, int64_t N, int64_t K, int64_t n,
                   int64_t n1) {
  for (; n + NT <= n1; n += NT) {
    const float* wr = w + n * K;
    __m256 acc[M][NT];
    for (int m = 0; m < M; ++m)
      for (int j = 0; j < NT; ++j) acc[m][j] = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) {
      __m256 lo[NT], hi[NT];
      for (int j = 0; j < NT; ++j) {
        prefetch(wr + j * K + k);
        lo[j] = _mm256_loadu_ps(wr + j * K + k);
        hi[j] = _mm256_loadu_ps(wr + j * K + k + 8);
      }
      for (int m = 0; m < M; ++m) {
        const __m256 xlo = _mm256_loadu_ps(x + m * K + k), xhi = _mm256_loadu_ps(x + m * K + k + 8);
        for (int j = 0; j < NT; ++j) {
          acc[m][j] = _mm256_fmadd_ps(lo[j], xlo, acc[m][j]);
          acc[m][j] = _mm256_fmadd_ps(hi[j], xhi, acc[m][j]);
        }
      }
    }
    for (; k + 8 <= K; k += 8) {
      for (int j = 0; j < NT; ++j) {
        const __m256 v = _mm256_loadu_ps(wr + j * K + k);
        for (int m = 0; m < M; ++m) acc[m][j] = _mm256_fmadd_ps(v, _mm256_loadu_ps(x + m * K + k), acc[m][j]);
      }
    }
    for (int m = 0; m < M; ++m) {
      for (int j = 0; j < NT; ++j) {
        float s = hsum(acc[m][j]);
        for (int64_t t = k; t < K; ++t) s += wr[j * K + t] * x[m * K + t];
        y[m * N + n + j] = b ? s + b[n + j] : s;
      }
    }
  }
  return n;
}

// Register budget (16 ymm): M x NT accumulators plus 2 x NT weight vectors and 2 input vectors.
template <int M>
void rows_group(const float* x, const float* w, const float* b, float* y, int64_t N, int64_t K, int64_t n0,
                int64_t n1) {
  constexpr int NT = M <= 2 ? 4 : 3;
  const int64_t n = rows_block<M, NT>(x, w, b, y, N, K, n0, n1);
  rows_block<M, 1>(x, w, b, y, N, K, n, n1);
}

using GroupFn = void (*)(const float*, const float*, const float*, float*, int64_t, int64_t, int64_t, int64_t);
constexpr GroupFn kRows[4] = {rows_group<1>, rows_group<2>, rows_group<3>, rows_group<4>};

// M > 4 rows, weight-stationary: NT weight rows are read from memory once, by the first group of 4 input rows, and
// stay in L1 while the other groups (the input rows live in L2) multiply them. So the weight streams once whatever
// M is, and the arithmetic runs at the register-blocked rate of rows_block<4, NT>.
template <int NT>
int64_t many_rows_block(const float* x, const float* w, const float* b, float* y, int64_t M, int64_t N, int64_t K,
                        int64_t n, int64_t n1) {
  for (; n + NT <= n1; n += NT) {
    int64_t m = 0;
    for (; m + 4 <= M; m += 4) rows_block<4, NT>(x + m * K, w, b, y + m * N, N, K, n, n + NT);
    switch (M - m) {
      case 3: rows_block<3, NT>(x + m * K, w, b, y + m * N, N, K, n, n + NT); break;
      case 2: rows_block<2, NT>(x + m * K, w, b, y + m * N, N, K, n, n + NT); break;
      case 1: rows_block<1, NT>(x + m * K, w, b, y + m * N, N, K, n, n + NT); break;
      default: break;
    }
  }
  return n;
}

void many_rows(const float* x, const float* w, const float* b, float* y, int64_t M, int64_t N, int64_t K, int64_t n0,
               int64_t n1) {
  const int64_t n = many_rows_block<3>(x, w, b, y, M, N, K, n0, n1);
  many_rows_block<1>(x, w, b, y, M, N, K, n, n1);
}

at::Tensor rows_linear(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1),
              "rows_linear: x must be [M, K] and w [N, K]; got ", x.sizes(), " and ", w.sizes());
  // From 16 rows on the product is no longer bound by the weight, and MKL's blocked, packed GEMM is faster.
  TORCH_CHECK(x.size(0) >= 1 && x.size(0) <= kMaxRows, "rows_linear: 1 to ", kMaxRows, " rows; got ", x.size(0));
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu() && x.scalar_type() == at::kFloat &&
                  w.scalar_type() == at::kFloat && x.is_contiguous() && w.is_contiguous(),
              "rows_linear: contiguous float32 CPU tensors only");
  const float* b = nullptr;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == w.size(0) && bias->is_contiguous() &&
                    bias->scalar_type() == at::kFloat && bias->device().is_cpu(),
                "rows_linear: bias must be a contiguous float32 CPU vector of ", w.size(0));
    b = bias->data_ptr<float>();
  }
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  at::Tensor y = at::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  // Each thread takes a contiguous slab of output rows: >= 64 rows, so a slab streams its weights in one run.
  at::parallel_for(0, N, 64, [&](int64_t n0, int64_t n1) {
    if (M <= 4)
      kRows[M - 1](xp, wp, b, yp, N, K, n0, n1);
    else
      many_rows(xp, wp, b, yp, M, N, K, n0, n1);
  });
  return y;
}

}  // namespace

TORCH_LIBRARY(phd_kernels, m) { m.def("rows_linear(Tensor x, Tensor w, Tensor? bias) -> Tensor"); }
TORCH_LIBRARY_IMPL(phd_kernels, CPU, m) { m.impl("rows_linear", &rows_linear); }
