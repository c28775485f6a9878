// Attention of a PHD step's queries over [their request's originals in a paged KV cache | the request's hidden
// window | the step's set], float32, on x86 CPUs with AVX2 and FMA: the vLLM plugin's hidden path (the hidden
// copies' queries; in a fused decode step all K copies', the original's too, with itself in the set).
//
// Why: the originals live in the engine's paged cache, scattered over blocks; attending them with SDPA first
// copies every block of the request out of the cache, then keys and values out of the blocks, then the window
// and the set into one buffer, every layer (about 0.3 ms a layer for one decode request of SmolLM2's shape, as
// much as the layer's matrix products). This kernel reads the keys and values where they are: the paged
// blocks through the layout the plugin's probe found (element (t, d) of a block's slab at base + t*s_t + d*s_d;
// the CPU backend keeps keys [D, block] and values [block, D]), the window in its pool row, the set where the
// layer's projection left it. Per (request, kv head): the scores of all its query rows, one softmax, one
// weighted sum; (request, kv head) pairs are split across ATen's threads.
// Who may see whom: originals 0..limit[r, m]-1 for query m of request r (the caller counts them by
// masks.allowed: position + 1 for a hidden copy whose original is in the cache, the position where the original
// is in the set); the window and the set by an additive mask (0 / -inf) the caller builds by the same rule. There
// may be fewer queries than set entries (a last layer, where only copy K's output is read). A request's leading
// queries that see no key (limit 0, mask all -inf: the padding of a step that mixes prompts and decoding
// requests) are not computed; their rows are zeros, as any query's with no key.
// The dense reference is SDPA over the same keys (tests/test_hidden_attention.py; the plugin's SDPA path in
// tests/test_vllm.py).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_hadd_ps(s, s);
  s = _mm_hadd_ps(s, s);
  return _mm_cvtss_f32(s);
}

// exp(x) for 8 floats: x = n*ln2 + r, |r| <= ln2/2, 2^n built in the exponent bits, e^r by its Taylor polynomial
// to degree 7 (relative error < 2e-7 on the range). Below -87 (and -inf: a masked key) it is exactly 0.
inline __m256 exp256(__m256 x) {
  const __m256 lo = _mm256_set1_ps(-87.0f);
  const __m256 keep = _mm256_cmp_ps(x, lo, _CMP_GE_OQ);
  x = _mm256_max_ps(x, lo);
  x = _mm256_min_ps(x, _mm256_set1_ps(88.0f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);  // ln2 in two parts: exact n*hi
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.0f / 5040);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 720));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_and_ps(_mm256_mul_ps(p, _mm256_castsi256_ps(e)), keep);
}

inline __m256i first(int64_t count) {  // lanes 0..count-1 (count < 8): for the masked loads of a tail
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(count)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

// The scores of JT query rows (j0..j0+JT-1 of J) against n keys held as columns, k[d * ld + t]:
// s[j * E + t] = sum_d qT[d * J + j] * k[d * ld + t]. Register-blocked: 16 keys (two vectors) by JT rows in 2*JT
// accumulators, so each broadcast query element feeds two FMAs and each key vector JT; the last < 16 keys go 8
// (then fewer, masked) at a time.
template <int JT>
void scores_tile(const float* qT, int64_t J, int64_t j0, const float* k, int64_t ld, int64_t n, int64_t D, float* s,
                 int64_t E) {
  int64_t t0 = 0;
  for (; t0 + 16 <= n; t0 += 16) {
    __m256 a[JT], b[JT];
    for (int jj = 0; jj < JT; ++jj) a[jj] = b[jj] = _mm256_setzero_ps();
    for (int64_t d = 0; d < D; ++d) {
      const __m256 k0 = _mm256_loadu_ps(k + d * ld + t0), k1 = _mm256_loadu_ps(k + d * ld + t0 + 8);
      const float* qd = qT + d * J + j0;
      for (int jj = 0; jj < JT; ++jj) {
        const __m256 qv = _mm256_broadcast_ss(qd + jj);
        a[jj] = _mm256_fmadd_ps(qv, k0, a[jj]);
        b[jj] = _mm256_fmadd_ps(qv, k1, b[jj]);
      }
    }
    for (int jj = 0; jj < JT; ++jj) {
      _mm256_storeu_ps(s + (j0 + jj) * E + t0, a[jj]);
      _mm256_storeu_ps(s + (j0 + jj) * E + t0 + 8, b[jj]);
    }
  }
  for (; t0 < n; t0 += 8) {
    const int64_t left = n - t0;
    const __m256i keep = first(std::min<int64_t>(left, 8));
    __m256 a[JT];
    for (int jj = 0; jj < JT; ++jj) a[jj] = _mm256_setzero_ps();
    for (int64_t d = 0; d < D; ++d) {
      const __m256 kv = left >= 8 ? _mm256_loadu_ps(k + d * ld + t0) : _mm256_maskload_ps(k + d * ld + t0, keep);
      const float* qd = qT + d * J + j0;
      for (int jj = 0; jj < JT; ++jj) a[jj] = _mm256_fmadd_ps(_mm256_broadcast_ss(qd + jj), kv, a[jj]);
    }
    for (int jj = 0; jj < JT; ++jj) {
      if (left >= 8)
        _mm256_storeu_ps(s + (j0 + jj) * E + t0, a[jj]);
      else
        _mm256_maskstore_ps(s + (j0 + jj) * E + t0, keep, a[jj]);
    }
  }
}

// acc[j * D + d] += sum_t p[j * E + t] * v[t * ld + d] for JT rows and n values held as rows: 16 dimensions by JT
// rows in 2*JT accumulators, then 8 (then fewer, masked) at a time.
template <int JT>
void values_tile(const float* p, int64_t E, int64_t j0, const float* v, int64_t ld, int64_t n, int64_t D,
                 float* acc) {
  int64_t d0 = 0;
  for (; d0 + 16 <= D; d0 += 16) {
    __m256 a[JT], b[JT];
    for (int jj = 0; jj < JT; ++jj) {
      a[jj] = _mm256_loadu_ps(acc + (j0 + jj) * D + d0);
      b[jj] = _mm256_loadu_ps(acc + (j0 + jj) * D + d0 + 8);
    }
    for (int64_t t = 0; t < n; ++t) {
      const __m256 v0 = _mm256_loadu_ps(v + t * ld + d0), v1 = _mm256_loadu_ps(v + t * ld + d0 + 8);
      for (int jj = 0; jj < JT; ++jj) {
        const __m256 pv = _mm256_broadcast_ss(p + (j0 + jj) * E + t);
        a[jj] = _mm256_fmadd_ps(pv, v0, a[jj]);
        b[jj] = _mm256_fmadd_ps(pv, v1, b[jj]);
      }
    }
    for (int jj = 0; jj < JT; ++jj) {
      _mm256_storeu_ps(acc + (j0 + jj) * D + d0, a[jj]);
      _mm256_storeu_ps(acc + (j0 + jj) * D + d0 + 8, b[jj]);
    }
  }
  for (; d0 < D; d0 += 8) {
    const int64_t left = D - d0;
    const __m256i keep = first(std::min<int64_t>(left, 8));
    __m256 a[JT];
    for (int jj = 0; jj < JT; ++jj)
      a[jj] = left >= 8 ? _mm256_loadu_ps(acc + (j0 + jj) * D + d0)
                        : _mm256_maskload_ps(acc + (j0 + jj) * D + d0, keep);
    for (int64_t t = 0; t < n; ++t) {
      const __m256 vv = left >= 8 ? _mm256_loadu_ps(v + t * ld + d0) : _mm256_maskload_ps(v + t * ld + d0, keep);
      for (int jj = 0; jj < JT; ++jj) a[jj] = _mm256_fmadd_ps(_mm256_broadcast_ss(p + (j0 + jj) * E + t), vv, a[jj]);
    }
    for (int jj = 0; jj < JT; ++jj) {
      if (left >= 8)
        _mm256_storeu_ps(acc + (j0 + jj) * D + d0, a[jj]);
      else
        _mm256_maskstore_ps(acc + (j0 + jj) * D + d0, keep, a[jj]);
    }
  }
}

// Runs f.template operator()<JT>(j0) over J rows in balanced tiles of at most 6 (12 accumulators + 2 loaded
// vectors + 1 broadcast fit the 16 vector registers): 9 rows go 5 + 4, not 6 + 3.
template <typename F>
void by_tiles(int64_t J, const F& f) {
  const int64_t tiles = (J + 5) / 6, size = (J + tiles - 1) / tiles;
  for (int64_t j0 = 0; j0 < J; j0 += size) {
    switch (std::min(size, J - j0)) {
      case 6: f.template operator()<6>(j0); break;
      case 5: f.template operator()<5>(j0); break;
      case 4: f.template operator()<4>(j0); break;
      case 3: f.template operator()<3>(j0); break;
      case 2: f.template operator()<2>(j0); break;
      case 1: f.template operator()<1>(j0); break;
      default: break;
    }
  }
}

struct Scores {  // (a functor, not a template lambda: the library also builds as C++17, for PyTorch < 2.13)
  const float* qT;
  int64_t J;
  const float* k;
  int64_t ld, n, D;
  float* s;
  int64_t E;
  template <int JT>
  void operator()(int64_t j0) const { scores_tile<JT>(qT, J, j0, k, ld, n, D, s, E); }
};

struct Values {
  const float* p;
  int64_t E;
  const float* v;
  int64_t ld, n, D;
  float* acc;
  template <int JT>
  void operator()(int64_t j0) const { values_tile<JT>(p, E, j0, v, ld, n, D, acc); }
};

void scores(const float* qT, int64_t J, const float* k, int64_t ld, int64_t n, int64_t D, float* s, int64_t E) {
  by_tiles(J, Scores{qT, J, k, ld, n, D, s, E});
}

void values(const float* p, int64_t E, int64_t J, const float* v, int64_t ld, int64_t n, int64_t D, float* acc) {
  by_tiles(J, Values{p, E, v, ld, n, D, acc});
}

// The scores of J query rows (q rows of D at qrow[j]) against n keys held as rows, k[t * ld + d]: dot products,
// four query rows at a time (four independent FMA chains, each key vector loaded once for them), for the window,
// the set, and blocks whose layout keeps a key's dimensions together (no transposition).
void scores_rows(const float* const* qrow, int64_t J, const float* k, int64_t ld, int64_t n, int64_t D, float* s,
                 int64_t E) {
  const int64_t tail = D % 8;
  const __m256i keep = first(tail);
  for (int64_t t = 0; t < n; ++t) {
    const float* kt = k + t * ld;
    for (int64_t j0 = 0; j0 < J; j0 += 4) {
      const int64_t rows = std::min<int64_t>(4, J - j0);
      const float* q0 = qrow[j0];
      const float* q1 = qrow[j0 + (rows > 1 ? 1 : 0)];  // fewer than 4 rows: repeat the first (results unused)
      const float* q2 = qrow[j0 + (rows > 2 ? 2 : 0)];
      const float* q3 = qrow[j0 + (rows > 3 ? 3 : 0)];
      __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
      int64_t d = 0;
      for (; d + 8 <= D; d += 8) {
        const __m256 kv = _mm256_loadu_ps(kt + d);
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q0 + d), kv, a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(q1 + d), kv, a1);
        a2 = _mm256_fmadd_ps(_mm256_loadu_ps(q2 + d), kv, a2);
        a3 = _mm256_fmadd_ps(_mm256_loadu_ps(q3 + d), kv, a3);
      }
      if (tail) {
        const __m256 kv = _mm256_maskload_ps(kt + d, keep);
        a0 = _mm256_fmadd_ps(_mm256_maskload_ps(q0 + d, keep), kv, a0);
        a1 = _mm256_fmadd_ps(_mm256_maskload_ps(q1 + d, keep), kv, a1);
        a2 = _mm256_fmadd_ps(_mm256_maskload_ps(q2 + d, keep), kv, a2);
        a3 = _mm256_fmadd_ps(_mm256_maskload_ps(q3 + d, keep), kv, a3);
      }
      const float got[4] = {hsum(a0), hsum(a1), hsum(a2), hsum(a3)};
      for (int64_t jj = 0; jj < rows; ++jj) s[(j0 + jj) * E + t] = got[jj];
    }
  }
}

// n vectors of D at x[t * st + d * sd], as columns (out[d * n + t]) or rows (out[t * D + d]) of a scratch buffer.
void columns(const float* x, int64_t st, int64_t sd, int64_t n, int64_t D, float* out) {
  for (int64_t d = 0; d < D; ++d)
    for (int64_t t = 0; t < n; ++t) out[d * n + t] = x[t * st + d * sd];
}

void rows_of(const float* x, int64_t st, int64_t sd, int64_t n, int64_t D, float* out) {
  for (int64_t t = 0; t < n; ++t)
    for (int64_t d = 0; d < D; ++d) out[t * D + d] = x[t * st + d * sd];
}

bool sees_nothing(const float* mask, int64_t n) {  // every entry -inf
  for (int64_t i = 0; i < n; ++i)
    if (mask[i] != kNegInf) return false;
  return true;
}

struct Layout {  // element (t, d) of a block's slab for one kv head: base + t * st + d * sd
  int64_t base, st, sd;
};

Layout layout_of(at::IntArrayRef v, const char* what) {
  TORCH_CHECK(v.size() == 3, "hidden_attention: ", what, " must be (base, s_t, s_d)");
  return {v[0], v[1], v[2]};
}

void check_float_cpu(const at::Tensor& t, const char* what) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat, "hidden_attention: ", what,
              " must be a float32 CPU tensor");
}

at::Tensor hidden_attention(const at::Tensor& q, const at::Tensor& cache, at::IntArrayRef key_layout,
                            at::IntArrayRef value_layout, int64_t block_size, const at::Tensor& block_table,
                            const at::Tensor& limit, const at::Tensor& window, const at::Tensor& rows,
                            const at::Tensor& set_k, const at::Tensor& set_v, const at::Tensor& extra_mask,
                            double scale) {
  // q [R, Hq, M, D]; cache [blocks, Hkv, slab]; block_table [R, B] int64; limit [R, M] int64;
  // window [rows, 2, Hkv, S, D] contiguous (S may be 0) and rows [R] int64; set_k / set_v [R, Hkv, Ms, D]
  // (Ms >= M); extra_mask [R, M, S + Ms] contiguous. Returns [Hq, R * M, D]: query m of request r in row r * M + m.
  check_float_cpu(q, "q");
  check_float_cpu(cache, "cache");
  check_float_cpu(window, "window");
  check_float_cpu(set_k, "set_k");
  check_float_cpu(set_v, "set_v");
  check_float_cpu(extra_mask, "extra_mask");
  TORCH_CHECK(q.dim() == 4 && set_k.dim() == 4 && set_v.dim() == 4 && cache.dim() == 3 && window.dim() == 5,
              "hidden_attention: q, set_k, set_v must be 4-d, cache 3-d, window 5-d");
  const int64_t R = q.size(0), Hq = q.size(1), M = q.size(2), D = q.size(3);
  const int64_t Hkv = cache.size(1), S = window.size(3), Ms = set_k.size(2);
  TORCH_CHECK(Hkv > 0 && Hq % Hkv == 0, "hidden_attention: ", Hq, " query heads over ", Hkv, " kv heads");
  TORCH_CHECK(Ms >= M && set_k.sizes() == at::IntArrayRef({R, Hkv, Ms, D}) && set_v.sizes() == set_k.sizes(),
              "hidden_attention: set_k / set_v must be [R, Hkv, Ms, D] with Ms >= ", M, " and R, Hkv, D = ",
              at::IntArrayRef({R, Hkv, D}));
  TORCH_CHECK(q.stride(3) == 1 && set_k.stride(3) == 1 && set_v.stride(3) == 1 && cache.is_contiguous() &&
                  window.is_contiguous() && extra_mask.is_contiguous(),
              "hidden_attention: q / set_k / set_v need a contiguous last dimension; cache, window, mask contiguous");
  TORCH_CHECK(extra_mask.sizes() == at::IntArrayRef({R, M, S + Ms}), "hidden_attention: extra_mask must be ",
              at::IntArrayRef({R, M, S + Ms}));
  TORCH_CHECK(S == 0 || (window.size(1) == 2 && window.size(2) == Hkv && window.size(4) == D && rows.numel() == R),
              "hidden_attention: window must be [rows, 2, Hkv, S, D] with one row per request");
  TORCH_CHECK(block_table.scalar_type() == at::kLong && limit.scalar_type() == at::kLong &&
                  block_table.is_contiguous() && limit.is_contiguous() && block_table.size(0) == R &&
                  limit.sizes() == at::IntArrayRef({R, M}),
              "hidden_attention: block_table [R, B] and limit [R, M] must be contiguous int64");
  TORCH_CHECK(S == 0 || (rows.scalar_type() == at::kLong && rows.is_contiguous()),
              "hidden_attention: rows must be contiguous int64");
  TORCH_CHECK(block_table.device().is_cpu() && limit.device().is_cpu() && (S == 0 || rows.device().is_cpu()),
              "hidden_attention: block_table, limit and rows must be CPU tensors");
  const Layout kl = layout_of(key_layout, "key_layout"), vl = layout_of(value_layout, "value_layout");
  const int64_t G = Hq / Hkv, J_all = G * M, B = block_table.size(1), slab = cache.size(2);
  TORCH_CHECK(block_size > 0, "hidden_attention: block_size must be positive");
  for (const Layout& l : {kl, vl})
    TORCH_CHECK(l.base >= 0 && l.st >= 0 && l.sd >= 0 && l.base + (block_size - 1) * l.st + (D - 1) * l.sd < slab,
                "hidden_attention: a layout (", l.base, ", ", l.st, ", ", l.sd, ") reaches past the ", slab,
                " elements of a block's slab");
  at::Tensor out = at::empty({Hq, R * M, D}, q.options());
  if (R * M == 0) return out;
  const int64_t* lim = limit.data_ptr<int64_t>();
  for (int64_t i = 0; i < R * M; ++i)
    TORCH_CHECK(lim[i] >= 0 && lim[i] <= B * block_size, "hidden_attention: limit ", lim[i], " outside the ",
                B * block_size, " positions the block table holds");
  if (S)
    for (int64_t r = 0; r < R; ++r)
      TORCH_CHECK(rows.data_ptr<int64_t>()[r] >= 0 && rows.data_ptr<int64_t>()[r] < window.size(0),
                  "hidden_attention: window row ", rows.data_ptr<int64_t>()[r], " outside the ", window.size(0),
                  " rows of the pool");

  const float* qp = q.data_ptr<float>();
  const float* cp = cache.data_ptr<float>();
  const float* wp = window.data_ptr<float>();
  const float* kp = set_k.data_ptr<float>();
  const float* vp = set_v.data_ptr<float>();
  const float* mp = extra_mask.data_ptr<float>();
  const int64_t* bt = block_table.data_ptr<int64_t>();
  const int64_t* rp = S ? rows.data_ptr<int64_t>() : nullptr;
  const int64_t blocks = cache.size(0);
  float* op = out.data_ptr<float>();
  const float sc = static_cast<float>(scale);

  at::parallel_for(0, R * Hkv, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> sc_buf, qT(D * J_all), acc, scratch(std::max({block_size, S, Ms}) * D);
    std::vector<const float*> qrow(J_all);
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t r = task / Hkv, h = task % Hkv;
      // Leading queries that see no key at all (a request's padding in a step that mixes prompts and decoding
      // requests: all but its last few of M) get zeros without being computed: the active ones are m0..M-1.
      int64_t m0 = 0;
      while (m0 < M && lim[r * M + m0] == 0 && sees_nothing(mp + (r * M + m0) * (S + Ms), S + Ms)) ++m0;
      for (int64_t g = 0; g < G; ++g)
        for (int64_t m = 0; m < m0; ++m) std::fill_n(op + ((h * G + g) * R * M + r * M + m) * D, D, 0.0f);
      const int64_t Ma = M - m0, J = G * Ma;
      if (J == 0) continue;
      int64_t L = 0;  // originals any query of this request sees
      for (int64_t m = m0; m < M; ++m) L = std::max(L, lim[r * M + m]);
      const int64_t E = L + S + Ms;
      sc_buf.resize(J * E);
      float* s = sc_buf.data();
      for (int64_t j = 0; j < J; ++j) {  // row j = g * Ma + m - m0 (query m of head h * G + g): qT[d * J + j]
        const float* qv = qrow[j] =
            qp + r * q.stride(0) + (h * G + j / Ma) * q.stride(1) + (m0 + j % Ma) * q.stride(2);
        for (int64_t d = 0; d < D; ++d) qT[d * J + j] = qv[d];
      }
      // Scores: originals block by block (keys read in place when the layout holds them as columns), then the
      // window and the set.
      for (int64_t b0 = 0; b0 < L; b0 += block_size) {
        const int64_t id = bt[r * B + b0 / block_size];
        TORCH_CHECK(id >= 0 && id < blocks, "hidden_attention: block id ", id, " outside the cache");
        const float* k = cp + (id * Hkv + h) * slab + kl.base;
        const int64_t n = std::min(block_size, L - b0);
        if (kl.st == 1) {
          scores(qT.data(), J, k, kl.sd, n, D, s + b0, E);
        } else if (kl.sd == 1) {
          scores_rows(qrow.data(), J, k, kl.st, n, D, s + b0, E);
        } else {
          columns(k, kl.st, kl.sd, n, D, scratch.data());
          scores(qT.data(), J, scratch.data(), n, n, D, s + b0, E);
        }
      }
      // The window's and the set's keys are rows; with many query rows (a prompt's hidden set) they are worth
      // turning into columns for the register-tiled product (a prefill call of 16 x 96 queries: -10-15%); with
      // few (decode: G x K) the dot products are as fast, and left as measured in serving.
      auto key_rows = [&](const float* k, int64_t ld, int64_t n, float* out) {
        if (J >= 32) {
          columns(k, ld, 1, n, D, scratch.data());
          scores(qT.data(), J, scratch.data(), n, n, D, out, E);
        } else {
          scores_rows(qrow.data(), J, k, ld, n, D, out, E);
        }
      };
      if (S) key_rows(wp + ((rp[r] * 2 + 0) * Hkv + h) * S * D, D, S, s + L);
      key_rows(kp + r * set_k.stride(0) + h * set_k.stride(1), set_k.stride(2), Ms, s + L + S);
      // Scale, mask, softmax (probabilities in place of the scores, their sums kept).
      std::vector<float> sums(J);
      for (int64_t j = 0; j < J; ++j) {
        const int64_t m = m0 + j % Ma, lj = lim[r * M + m];
        float* sj = s + j * E;
        const float* mask = mp + (r * M + m) * (S + Ms);
        for (int64_t t = 0; t < L; ++t) sj[t] = t < lj ? sj[t] * sc : kNegInf;
        for (int64_t i = 0; i < S + Ms; ++i) sj[L + i] = sj[L + i] * sc + mask[i];
        float mx = kNegInf;
        for (int64_t t = 0; t < E; ++t) mx = std::max(mx, sj[t]);
        if (mx == kNegInf) {  // no key at all (only a padding query can be so): zeros, not NaN
          std::fill(sj, sj + E, 0.0f);
          continue;
        }
        const __m256 mxv = _mm256_set1_ps(mx);
        __m256 sumv = _mm256_setzero_ps();
        int64_t t = 0;
        for (; t + 8 <= E; t += 8) {
          const __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(sj + t), mxv));
          _mm256_storeu_ps(sj + t, e);
          sumv = _mm256_add_ps(sumv, e);
        }
        float sum = hsum(sumv);
        for (; t < E; ++t) {
          sj[t] = sj[t] - mx >= -87.0f ? std::exp(sj[t] - mx) : 0.0f;  // as exp256: 0 below -87 (and -inf)
          sum += sj[t];
        }
        sums[j] = sum;
      }
      // Weighted sums: originals (values read in place when the layout holds them as rows), window, set.
      acc.assign(J * D, 0.0f);
      for (int64_t b0 = 0; b0 < L; b0 += block_size) {
        const float* v = cp + (bt[r * B + b0 / block_size] * Hkv + h) * slab + vl.base;
        const int64_t n = std::min(block_size, L - b0);
        if (vl.sd == 1) {
          values(s + b0, E, J, v, vl.st, n, D, acc.data());
        } else {
          rows_of(v, vl.st, vl.sd, n, D, scratch.data());
          values(s + b0, E, J, scratch.data(), D, n, D, acc.data());
        }
      }
      if (S) values(s + L, E, J, wp + ((rp[r] * 2 + 1) * Hkv + h) * S * D, D, S, D, acc.data());
      values(s + L + S, E, J, vp + r * set_v.stride(0) + h * set_v.stride(1), set_v.stride(2), Ms, D, acc.data());
      for (int64_t j = 0; j < J; ++j) {
        float* o = op + ((h * G + j / Ma) * R * M + r * M + m0 + j % Ma) * D;
        const float inv = sums[j] > 0.0f ? 1.0f / sums[j] : 0.0f;
        for (int64_t d = 0; d < D; ++d) o[d] = acc[j * D + d] * inv;
      }
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(phd_kernels, m) {
  m.def(
      "hidden_attention(Tensor q, Tensor cache, int[] key_layout, int[] value_layout, int block_size, "
      "Tensor block_table, Tensor limit, Tensor window, Tensor rows, Tensor set_k, Tensor set_v, Tensor extra_mask, "
      "float scale) -> Tensor");
}
TORCH_LIBRARY_IMPL(phd_kernels, CPU, m) { m.impl("hidden_attention", &hidden_attention); }
