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

// One build serves every x86-64 machine (as in precondition_cpu.cpp): AVX-512, AVX2 + FMA and the baseline.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define MULTIVERSION __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define MULTIVERSION
#endif

namespace {

// h[order[q]] = w_e x[token[q]] for one expert's pairs q in [begin, end). Four rows of w per pass over the
// token's row (one load of x for four products), then the rest one by one.
MULTIVERSION void project_expert(const float* x, const float* w, const int64_t* order, const int64_t* token,
                                 int64_t begin, int64_t end, int64_t R, int64_t D, float* h) {
  for (int64_t q = begin; q < end; ++q) {
    const float* xt = x + token[q] * D;
    float* hp = h + order[q] * R;
    int64_t i = 0;
    for (; i + 4 <= R; i += 4) {
      const float *w0 = w + i * D, *w1 = w0 + D, *w2 = w1 + D, *w3 = w2 + D;
      float a0 = 0, a1 = 0, a2 = 0, a3 = 0;
#pragma omp simd reduction(+ : a0, a1, a2, a3)
      for (int64_t c = 0; c < D; ++c) {
        const float xc = xt[c];
        a0 += w0[c] * xc;
        a1 += w1[c] * xc;
        a2 += w2[c] * xc;
        a3 += w3[c] * xc;
      }
      hp[i] = a0, hp[i + 1] = a1, hp[i + 2] = a2, hp[i + 3] = a3;
    }
    for (; i < R; ++i) {
      const float* wi = w + i * D;
      float acc = 0;
#pragma omp simd reduction(+ : acc)
      for (int64_t c = 0; c < D; ++c) acc += wi[c] * xt[c];
      hp[i] = acc;
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

// g = sum over one expert's pairs q in [begin, end) of h[order[q]]^T x[token[q]]; g [R, D] starts at zero.
// Four rows of g per pass over the token's row, then the rest one by one.
MULTIVERSION void outer_expert(const float* h, const float* x, const int64_t* order, const int64_t* token,
                               int64_t begin, int64_t end, int64_t R, int64_t D, float* g) {
  for (int64_t c = 0; c < R * D; ++c) g[c] = 0;
  for (int64_t q = begin; q < end; ++q) {
    const float* xt = x + token[q] * D;
    const float* hp = h + order[q] * R;
    int64_t i = 0;
    for (; i + 4 <= R; i += 4) {
      float *g0 = g + i * D, *g1 = g0 + D, *g2 = g1 + D, *g3 = g2 + D;
      const float a0 = hp[i], a1 = hp[i + 1], a2 = hp[i + 2], a3 = hp[i + 3];
#pragma omp simd
      for (int64_t c = 0; c < D; ++c) {
        const float xc = xt[c];
        g0[c] += a0 * xc;
        g1[c] += a1 * xc;
        g2[c] += a2 * xc;
        g3[c] += a3 * xc;
      }
    }
    for (; i < R; ++i) {
      const float a = hp[i];
      float* gi = g + i * D;
#pragma omp simd
      for (int64_t c = 0; c < D; ++c) gi[c] += a * xt[c];
    }
  }
}

void check(const torch::Tensor& t, torch::ScalarType dtype, int64_t dim, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == dtype && t.dim() == dim && t.is_contiguous(), name,
              " must be a contiguous ", dim, "-D ", dtype, " CPU tensor, got ", t.scalar_type(), " ", t.sizes(),
              " on ", t.device());
}

// The pairs sorted by expert: order and token [P], offsets [E + 1] ending at P.
void check_runs(const torch::Tensor& order, const torch::Tensor& token, const torch::Tensor& offsets, int64_t E) {
  check(order, torch::kLong, 1, "order");
  check(token, torch::kLong, 1, "token");
  check(offsets, torch::kLong, 1, "offsets");
  TORCH_CHECK(token.size(0) == order.size(0) && offsets.size(0) == E + 1 &&
                  offsets[E].item<int64_t>() == order.size(0),
              "order, token [P] and offsets [E + 1 = ", E + 1, "] ending at P do not match: ", order.sizes(), ", ",
              token.sizes(), ", ", offsets.sizes());
}

torch::Tensor project(torch::Tensor x, torch::Tensor w, torch::Tensor order, torch::Tensor token,
                      torch::Tensor offsets) {
  check(x, torch::kFloat, 2, "x");
  check(w, torch::kFloat, 3, "w");
  const int64_t E = w.size(0), R = w.size(1), D = w.size(2);
  TORCH_CHECK(x.size(1) == D, "x has ", x.size(1), " features, w rows ", D);
  check_runs(order, token, offsets, E);
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
  check(row_offsets, torch::kLong, 1, "row_offsets");
  const int64_t T = row_offsets.size(0) - 1, R = w.size(1), D = w.size(2);
  TORCH_CHECK(h.size(0) == experts.size(0) && h.size(1) == R && row_offsets[T].item<int64_t>() == h.size(0),
              "h [P, R = ", R, "], experts [P] and row_offsets ending at P do not match: ", h.sizes(), ", ",
              experts.sizes(), ", ", row_offsets.sizes());
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
  check_runs(order, token, offsets, E);
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
