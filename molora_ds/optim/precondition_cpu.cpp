// The Riemannian preconditioner's two passes over memory on CPU, for fp32 LoRA factors (riemannian.py
// dispatches here; other dtypes and devices use torch ops). Each is one read of its input (and one write
// of the output) per expert, where the torch ops need a float64 copy, a batched matmul of r x r blocks
// that runs far from memory bandwidth, and a copy back.
//
//   inverse_of_gram(x, rows, reg): x [E, r, K] with rows (Gram x x^T) or [E, K, r] (Gram x^T x);
//       (Gram + reg I)^-1 per expert, float64 throughout, via Cholesky. Returns (P [E, r, r] float64,
//       failed: a bool tensor, true if some factorisation met a non-positive pivot or NaN).
//   apply_(g, p, rows, out): out = P g per expert for g [E, r, K] (rows), out = g P for g [E, K, r];
//       products accumulated in float64 and rounded once; out may be g itself (in place).
// r is one of 1, 2, 4, 8, 16 (a template argument, so that rows and accumulators stay in registers).
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "multiversion.h"

namespace {

// gram[i * r + j] for j <= i: sum_k x[i, k] x[j, k], x one expert's [r, K] rows.
MULTIVERSION void gram_rows(const float* x, int64_t r, int64_t K, double* gram) {
  for (int64_t i = 0; i < r; ++i) {
    for (int64_t j = 0; j <= i; ++j) {
      const float* a = x + i * K;
      const float* b = x + j * K;
      double acc = 0;
#pragma omp simd reduction(+ : acc)
      for (int64_t k = 0; k < K; ++k) acc += static_cast<double>(a[k]) * static_cast<double>(b[k]);
      gram[i * r + j] = acc;
    }
  }
}

// gram[i * R + j]: sum_k x[k, i] x[k, j], x one expert's [K, R] rows (all R x R entries accumulated).
// R is a template argument so that a row and the accumulators stay in registers.
template <int64_t R>
[[gnu::always_inline]] inline void add_outer(const float* x, double* acc) {
  double row[R];
  for (int64_t j = 0; j < R; ++j) row[j] = x[j];
  for (int64_t i = 0; i < R; ++i)
    for (int64_t j = 0; j < R; ++j) acc[i * R + j] += row[i] * row[j];
}

template <int64_t R>
[[gnu::always_inline]] inline void gram_cols(const float* x, int64_t K, double* gram) {
  // Two accumulator sets, even and odd rows: one set would wait on its own FMA latency every row.
  double even[R * R] = {}, odd[R * R] = {};
  int64_t k = 0;
  for (; k + 1 < K; k += 2) {
    add_outer<R>(x + k * R, even);
    add_outer<R>(x + (k + 1) * R, odd);
  }
  if (k < K) add_outer<R>(x + k * R, even);
  for (int64_t i = 0; i < R * R; ++i) gram[i] = even[i] + odd[i];
}

// out[k, i] = sum_j g[k, j] p[j, i] for one expert's [K, R] rows (out may be g: a row is read whole first).
template <int64_t R>
[[gnu::always_inline]] inline void apply_cols(const float* g, const double* p, int64_t K, float* out) {
  double pr[R * R];
  std::copy(p, p + R * R, pr);
  for (int64_t k = 0; k < K; ++k) {
    double row[R], acc[R] = {};
    for (int64_t j = 0; j < R; ++j) row[j] = g[k * R + j];
    for (int64_t j = 0; j < R; ++j)
      for (int64_t i = 0; i < R; ++i) acc[i] += row[j] * pr[j * R + i];
    for (int64_t i = 0; i < R; ++i) out[k * R + i] = static_cast<float>(acc[i]);
  }
}

// out[i, k] = sum_j p[i, j] g[j, k] for one expert's [R, K] rows (out may be g: column k is read whole
// before it is written, and no two columns share an element).
template <int64_t R>
[[gnu::always_inline]] inline void apply_rows(const float* g, const double* p, int64_t K, float* out) {
  double pr[R * R];
  std::copy(p, p + R * R, pr);
#pragma omp simd
  for (int64_t k = 0; k < K; ++k) {
    double col[R];
    for (int64_t j = 0; j < R; ++j) col[j] = g[j * K + k];
    for (int64_t i = 0; i < R; ++i) {
      double acc = 0;
      for (int64_t j = 0; j < R; ++j) acc += pr[i * R + j] * col[j];
      out[i * K + k] = static_cast<float>(acc);
    }
  }
}

// The layouts' loops for one expert, r one of the ranks compiled in (cpu_kernels.RANKS; check_rank).
MULTIVERSION void gram_cols_any(const float* x, int64_t r, int64_t K, double* gram) {
  switch (r) {
    case 1: return gram_cols<1>(x, K, gram);
    case 2: return gram_cols<2>(x, K, gram);
    case 4: return gram_cols<4>(x, K, gram);
    case 8: return gram_cols<8>(x, K, gram);
    case 16: return gram_cols<16>(x, K, gram);
  }
}

MULTIVERSION void apply_cols_any(const float* g, const double* p, int64_t r, int64_t K, float* out) {
  switch (r) {
    case 1: return apply_cols<1>(g, p, K, out);
    case 2: return apply_cols<2>(g, p, K, out);
    case 4: return apply_cols<4>(g, p, K, out);
    case 8: return apply_cols<8>(g, p, K, out);
    case 16: return apply_cols<16>(g, p, K, out);
  }
}

MULTIVERSION void apply_rows_any(const float* g, const double* p, int64_t r, int64_t K, float* out) {
  switch (r) {
    case 1: return apply_rows<1>(g, p, K, out);
    case 2: return apply_rows<2>(g, p, K, out);
    case 4: return apply_rows<4>(g, p, K, out);
    case 8: return apply_rows<8>(g, p, K, out);
    case 16: return apply_rows<16>(g, p, K, out);
  }
}

// (gram + reg I)^-1 into p (full r x r), from gram's lower triangle; false if not positive definite.
bool regularised_inverse(double* gram, int64_t r, double reg, double* p) {
  // Cholesky in place: the lower triangle of gram becomes L with gram = L L^T.
  for (int64_t j = 0; j < r; ++j) {
    double d = gram[j * r + j] + reg;
    for (int64_t k = 0; k < j; ++k) d -= gram[j * r + k] * gram[j * r + k];
    if (!(d > 0)) return false;  // also NaN
    d = std::sqrt(d);
    gram[j * r + j] = d;
    for (int64_t i = j + 1; i < r; ++i) {
      double s = gram[i * r + j];
      for (int64_t k = 0; k < j; ++k) s -= gram[i * r + k] * gram[j * r + k];
      gram[i * r + j] = s / d;
    }
  }
  // W = L^-1 (lower), then P = W^T W.
  std::vector<double> w(r * r, 0.0);
  for (int64_t j = 0; j < r; ++j) {
    w[j * r + j] = 1.0 / gram[j * r + j];
    for (int64_t i = j + 1; i < r; ++i) {
      double s = 0;
      for (int64_t k = j; k < i; ++k) s -= gram[i * r + k] * w[k * r + j];
      w[i * r + j] = s / gram[i * r + i];
    }
  }
  for (int64_t i = 0; i < r; ++i) {
    for (int64_t j = 0; j <= i; ++j) {
      double s = 0;
      for (int64_t k = i; k < r; ++k) s += w[k * r + i] * w[k * r + j];
      p[i * r + j] = p[j * r + i] = s;
    }
  }
  return true;
}

void check_rank(int64_t r) {
  TORCH_CHECK(r == 1 || r == 2 || r == 4 || r == 8 || r == 16, "the CPU kernels take ranks 1, 2, 4, 8, 16; got ", r);
}

void check_factor(const torch::Tensor& x, const char* name) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == torch::kFloat && x.dim() == 3 && x.is_contiguous(),
              name, " must be a contiguous float32 CPU tensor [E, ., .], got ", x.scalar_type(), " ",
              x.sizes(), " on ", x.device());
}

std::tuple<torch::Tensor, torch::Tensor> inverse_of_gram(torch::Tensor x, bool rows, double reg) {
  check_factor(x, "x");
  const int64_t E = x.size(0), r = rows ? x.size(1) : x.size(2), K = rows ? x.size(2) : x.size(1);
  check_rank(r);
  auto p = torch::empty({E, r, r}, x.options().dtype(torch::kDouble));
  auto ok = torch::empty({E}, x.options().dtype(torch::kBool));
  const float* xs = x.data_ptr<float>();
  double* ps = p.data_ptr<double>();
  bool* oks = ok.data_ptr<bool>();
  at::parallel_for(0, E, 1, [&](int64_t begin, int64_t end) {
    std::vector<double> gram(r * r);
    for (int64_t e = begin; e < end; ++e) {
      (rows ? gram_rows : gram_cols_any)(xs + e * r * K, r, K, gram.data());
      oks[e] = regularised_inverse(gram.data(), r, reg, ps + e * r * r);
    }
  });
  return {p, ok.logical_not().any()};
}

torch::Tensor apply_(torch::Tensor g, torch::Tensor p, bool rows, torch::Tensor out) {
  check_factor(g, "g");
  check_factor(out, "out");
  const int64_t E = g.size(0), r = rows ? g.size(1) : g.size(2), K = rows ? g.size(2) : g.size(1);
  check_rank(r);
  TORCH_CHECK(out.sizes() == g.sizes(), "out must have g's shape ", g.sizes(), ", got ", out.sizes());
  TORCH_CHECK(p.scalar_type() == torch::kDouble && p.is_contiguous() && p.sizes() == torch::IntArrayRef({E, r, r}),
              "p must be a contiguous float64 [", E, ", ", r, ", ", r, "] tensor, got ", p.sizes());
  const float* gs = g.data_ptr<float>();
  const double* ps = p.data_ptr<double>();
  float* os = out.data_ptr<float>();
  at::parallel_for(0, E, 1, [&](int64_t begin, int64_t end) {
    for (int64_t e = begin; e < end; ++e)
      (rows ? apply_rows_any : apply_cols_any)(gs + e * r * K, ps + e * r * r, r, K, os + e * r * K);
  });
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("inverse_of_gram", &inverse_of_gram);
  m.def("apply_", &apply_);
}
