// The sparse experts' products on CPU, for fp32 (sparse.py dispatches here; other dtypes and devices use
// the CSR kernels). A pair p is (token rows[p], expert experts[p]), given sorted by token; `order` lists the
// pairs sorted by expert (`offsets[e] .. offsets[e+1]` is expert e's run, `token` their tokens), so that
// one expert's weights stay in cache while its tokens stream by. `w` holds each expert's R rows [E, R, D].
//
//   project(x [T, D], w, order, token, offsets) -> h [P, R]:   h[p, i] = <w[experts[p], i], x[rows[p]]>
//   expand(h [P, R], w, experts, row_offsets) -> out [T, D]:   out[t] = sum_{p of t} sum_i h[p, i] w[experts[p], i]
//   outer(h [P, R], x [T, D], order, token, offsets) -> g [E, R, D]:  g[e, i] = sum_{p of e} h[p, i] x[rows[p]]
//
// h is in the caller's pair order throughout. Every output element is one sum in a fixed order (a token's
// pairs in order; an expert's pairs in order; threads split tokens or experts, never one sum), so results
// do not depend on the thread count and repeat bit for bit: resume stays exact. No float64 here: each dot
// product is one fp32 sum of D terms, as in the dense path's GEMMs.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include "multiversion.h"

namespace {

// A dot product is LANES partial sums (column c into lane c mod LANES) added in a fixed order at the end: the
// same arithmetic for a pair whatever the blocking below and the vector width the compiler picks, so a pair's
// h does not depend on which other tokens chose its expert. 16 lanes: one AVX-512 register.
constexpr int64_t LANES = 16;

// h[j][i] = <w_i, x[j]> for N rows of w and J tokens: each row of w is loaded once for J tokens, each token's
// element once for N rows (register blocking; one row per token per pass would read w from L2 every pair).
template <int N, int J>
[[gnu::always_inline]] inline void dots(const float* w, const float* const* x, int64_t D, float* const* h) {
  float acc[J][N][LANES] = {};
  int64_t c = 0;
  for (; c + LANES <= D; c += LANES)
    for (int j = 0; j < J; ++j)
      for (int i = 0; i < N; ++i)
#pragma omp simd
        for (int64_t l = 0; l < LANES; ++l) acc[j][i][l] += w[i * D + c + l] * x[j][c + l];
  for (int64_t l = 0; c + l < D; ++l)
    for (int j = 0; j < J; ++j)
      for (int i = 0; i < N; ++i) acc[j][i][l] += w[i * D + c + l] * x[j][c + l];
  for (int j = 0; j < J; ++j)
    for (int i = 0; i < N; ++i) {
      float sum = 0;
      for (int64_t l = 0; l < LANES; ++l) sum += acc[j][i][l];
      h[j][i] = sum;
    }
}

// h[order[q]] = w_e x[token[q]] for one expert's pairs q in [begin, end), two pairs and four rows at a time.
MULTIVERSION void project_expert(const float* x, const float* w, const int64_t* order, const int64_t* token,
                                 int64_t begin, int64_t end, int64_t R, int64_t D, float* h) {
  for (int64_t q = begin; q < end; q += 2) {
    const bool two = q + 1 < end;
    const float* xs[2] = {x + token[q] * D, x + token[two ? q + 1 : q] * D};
    float* hp[2] = {h + order[q] * R, h + order[two ? q + 1 : q] * R};
    int64_t i = 0;
    for (; i + 4 <= R; i += 4) {
      float* hi[2] = {hp[0] + i, hp[1] + i};
      two ? dots<4, 2>(w + i * D, xs, D, hi) : dots<4, 1>(w + i * D, xs, D, hi);
    }
    for (; i < R; ++i) {
      float* hi[2] = {hp[0] + i, hp[1] + i};
      two ? dots<1, 2>(w + i * D, xs, D, hi) : dots<1, 1>(w + i * D, xs, D, hi);
    }
  }
}

// out[t] = sum over t's pairs [begin, end) of h[p] w_{experts[p]}: the row stays in cache, written once.
MULTIVERSION void expand_row(const float* h, const float* w, const int64_t* experts, int64_t begin, int64_t end,
                             int64_t R, int64_t D, float* out) {
  for (int64_t c = 0; c < D; ++c) out[c] = 0;
  for (int64_t p = begin; p < end; ++p) {
    const float* we = w + experts[p] * R * D;
    for (int64_t i = 0; i < R; ++i) {
      const float a = h[p * R + i];
      const float* wi = we + i * D;
#pragma omp simd
      for (int64_t c = 0; c < D; ++c) out[c] += a * wi[c];
    }
  }
}

// g_i += h[j][i] x[j] for N rows of g and J tokens, token by token for each element (so the same sums as one
// pair at a time): each row of g is read and written once for J tokens.
template <int N, int J>
[[gnu::always_inline]] inline void add_outer(float* __restrict g, const float* const* h, const float* const* x,
                                            int64_t D) {
  float a[J][N];
  const float* __restrict xs[J];
  for (int j = 0; j < J; ++j) {
    xs[j] = x[j];
    for (int i = 0; i < N; ++i) a[j][i] = h[j][i];
  }
#pragma omp simd
  for (int64_t c = 0; c < D; ++c)
    for (int j = 0; j < J; ++j)
      for (int i = 0; i < N; ++i) g[i * D + c] += a[j][i] * xs[j][c];
}

// g = sum over one expert's pairs q in [begin, end) of h[order[q]]^T x[token[q]], two pairs and four rows at a
// time; g [R, D] starts at zero.
MULTIVERSION void outer_expert(const float* h, const float* x, const int64_t* order, const int64_t* token,
                               int64_t begin, int64_t end, int64_t R, int64_t D, float* g) {
  for (int64_t c = 0; c < R * D; ++c) g[c] = 0;
  for (int64_t q = begin; q < end; q += 2) {
    const bool two = q + 1 < end;
    const float* xs[2] = {x + token[q] * D, x + token[two ? q + 1 : q] * D};
    const float* hp[2] = {h + order[q] * R, h + order[two ? q + 1 : q] * R};
    int64_t i = 0;
    for (; i + 4 <= R; i += 4) {
      const float* hi[2] = {hp[0] + i, hp[1] + i};
      two ? add_outer<4, 2>(g + i * D, hi, xs, D) : add_outer<4, 1>(g + i * D, hi, xs, D);
    }
    for (; i < R; ++i) {
      const float* hi[2] = {hp[0] + i, hp[1] + i};
      two ? add_outer<1, 2>(g + i * D, hi, xs, D) : add_outer<1, 1>(g + i * D, hi, xs, D);
    }
  }
}

void check(const torch::Tensor& t, torch::ScalarType dtype, int64_t dim, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == dtype && t.dim() == dim && t.is_contiguous(), name,
              " must be a contiguous ", dim, "-D ", dtype, " CPU tensor, got ", t.scalar_type(), " ", t.sizes(),
              " on ", t.device());
}

// Every index in [0, bound): the kernels read and write through them unchecked.
void check_range(const torch::Tensor& index, int64_t bound, const char* name) {
  TORCH_CHECK(index.numel() == 0 || (index.min().item<int64_t>() >= 0 && index.max().item<int64_t>() < bound), name,
              " must index [0, ", bound, ")");
}

// Run boundaries [n + 1]: from 0 up to P, never falling.
void check_offsets(const torch::Tensor& offsets, int64_t n, int64_t P, const char* name) {
  check(offsets, torch::kLong, 1, name);
  TORCH_CHECK(offsets.size(0) == n + 1 && offsets[0].item<int64_t>() == 0 && offsets[n].item<int64_t>() == P &&
                  (n == 0 || (offsets.diff() >= 0).all().item<bool>()),
              name, " must be ", n + 1, " run boundaries rising from 0 to ", P, ", got ", offsets.sizes());
}

// The pairs sorted by expert: order and token [P] (pairs and tokens of x's T rows), offsets [E + 1].
void check_runs(const torch::Tensor& order, const torch::Tensor& token, const torch::Tensor& offsets, int64_t E,
                int64_t T) {
  check(order, torch::kLong, 1, "order");
  check(token, torch::kLong, 1, "token");
  TORCH_CHECK(token.size(0) == order.size(0), "order ", order.sizes(), " and token ", token.sizes(), " differ");
  check_offsets(offsets, E, order.size(0), "offsets");
  check_range(order, order.size(0), "order");
  check_range(token, T, "token");
}

torch::Tensor project(torch::Tensor x, torch::Tensor w, torch::Tensor order, torch::Tensor token,
                      torch::Tensor offsets) {
  check(x, torch::kFloat, 2, "x");
  check(w, torch::kFloat, 3, "w");
  const int64_t E = w.size(0), R = w.size(1), D = w.size(2);
  TORCH_CHECK(x.size(1) == D, "x has ", x.size(1), " features, w rows ", D);
  check_runs(order, token, offsets, E, x.size(0));
  auto h = torch::empty({order.size(0), R}, x.options());
  const float *xs = x.data_ptr<float>(), *ws = w.data_ptr<float>();
  const int64_t *os = order.data_ptr<int64_t>(), *ts = token.data_ptr<int64_t>(), *off = offsets.data_ptr<int64_t>();
  float* hs = h.data_ptr<float>();
  at::parallel_for(0, E, 1, [&](int64_t begin, int64_t end) {
    for (int64_t e = begin; e < end; ++e) project_expert(xs, ws + e * R * D, os, ts, off[e], off[e + 1], R, D, hs);
  });
  return h;
}

torch::Tensor expand(torch::Tensor h, torch::Tensor w, torch::Tensor experts, torch::Tensor row_offsets) {
  check(h, torch::kFloat, 2, "h");
  check(w, torch::kFloat, 3, "w");
  check(experts, torch::kLong, 1, "experts");
  const int64_t T = row_offsets.size(0) - 1, R = w.size(1), D = w.size(2);
  TORCH_CHECK(h.size(0) == experts.size(0) && h.size(1) == R, "h [P, R = ", R, "] and experts [P] do not match: ",
              h.sizes(), ", ", experts.sizes());
  check_offsets(row_offsets, T, h.size(0), "row_offsets");
  check_range(experts, w.size(0), "experts");
  auto out = torch::empty({T, D}, h.options());
  const float *hs = h.data_ptr<float>(), *ws = w.data_ptr<float>();
  const int64_t *es = experts.data_ptr<int64_t>(), *ro = row_offsets.data_ptr<int64_t>();
  float* out_s = out.data_ptr<float>();
  at::parallel_for(0, T, 16, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) expand_row(hs, ws, es, ro[t], ro[t + 1], R, D, out_s + t * D);
  });
  return out;
}

torch::Tensor outer(torch::Tensor h, torch::Tensor x, torch::Tensor order, torch::Tensor token,
                    torch::Tensor offsets) {
  check(h, torch::kFloat, 2, "h");
  check(x, torch::kFloat, 2, "x");
  const int64_t E = offsets.size(0) - 1, R = h.size(1), D = x.size(1);
  check_runs(order, token, offsets, E, x.size(0));
  TORCH_CHECK(h.size(0) == order.size(0), "h has ", h.size(0), " pairs, order ", order.size(0));
  auto g = torch::empty({E, R, D}, x.options());
  const float *hs = h.data_ptr<float>(), *xs = x.data_ptr<float>();
  const int64_t *os = order.data_ptr<int64_t>(), *ts = token.data_ptr<int64_t>(), *off = offsets.data_ptr<int64_t>();
  float* gs = g.data_ptr<float>();
  at::parallel_for(0, E, 1, [&](int64_t begin, int64_t end) {
    for (int64_t e = begin; e < end; ++e) outer_expert(hs, xs, os, ts, off[e], off[e + 1], R, D, gs + e * R * D);
  });
  return g;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("project", &project);
  m.def("expand", &expand);
  m.def("outer", &outer);
}
