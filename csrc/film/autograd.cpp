// FiLM's autograd, registered for the Autograd key: forward film, backward film_backward, both
// through the dispatcher (so the backward of a CUDA call runs the CUDA kernel). Under
// create_graph=True the three gradients are computed with differentiable ATen ops instead.
#include <torch/extension.h>

#include "../accumulate.h"
#include "../spec.h"

namespace fastrobust {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptTensor = c10::optional<at::Tensor>;

at::Tensor value(const OptTensor& t) { return t.has_value() ? *t : at::Tensor(); }
OptTensor opt(const at::Tensor& t) { return t.defined() ? OptTensor(t) : c10::nullopt; }

// A node's edges are those of its *defined* tensor arguments, so an argument's edge index
// skips the None arguments before it. Returns, per argument, its edge (or -1).
template <size_t N>
std::array<int64_t, N> edges_of(const std::array<at::Tensor, N>& args) {
  std::array<int64_t, N> e{};
  int64_t next = 0;
  for (size_t i = 0; i < N; ++i) e[i] = args[i].defined() ? next++ : -1;
  return e;
}

c10::ScalarType dtype_or_undefined(const at::Tensor& t) {
  return t.defined() ? t.scalar_type() : c10::ScalarType::Undefined;
}

template <typename Sig>
c10::TypedOperatorHandle<Sig> op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

using FilmSig = at::Tensor(const at::Tensor&, const OptTensor&, const OptTensor&);
using FilmBackwardSig = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const OptTensor&, std::array<bool, kNumFilmGrads>,
    std::array<bool, 2>);

// (dx, dgamma, dbeta) of y = gamma·x + beta as differentiable ATen ops (double backward); a
// per-channel ([C]) gamma or beta gets its gradient summed over the batch as well.
std::vector<at::Tensor> film_grads_with_graph(const at::Tensor& dy, const at::Tensor& x,
                                              const at::Tensor& gamma,
                                              std::array<bool, kNumFilmGrads> needs,
                                              std::array<bool, 2> per_channel,
                                              at::ScalarType x_dtype) {
  const int64_t nd = dy.dim();
  std::vector<int64_t> planes, channels{0}, shape(dy.sizes().begin(), dy.sizes().begin() + 2);
  for (int64_t d = 2; d < nd; ++d) {
    planes.push_back(d);
    channels.push_back(d);
    shape.push_back(1);
  }
  const auto acc = acc_dtype(dy);
  auto reduce = [&](const at::Tensor& t, bool per_c) {
    const auto& dims = per_c ? channels : planes;
    return dims.empty() ? t.to(acc) : t.to(acc).sum(dims);
  };
  at::Tensor dx, dg, db;
  if (needs[kFilmX]) {
    auto gshape = shape;
    if (gamma.defined() && gamma.dim() == 1) gshape[0] = 1;
    dx = (gamma.defined() ? dy * gamma.view(gshape).to(dy.scalar_type()) : dy).to(x_dtype);
  }
  if (needs[kFilmGamma]) dg = reduce(dy * x, per_channel[0]);
  if (needs[kFilmBeta]) db = reduce(dy, per_channel[1]);
  return {dx, dg, db};
}

struct Film : public torch::autograd::Function<Film> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const OptTensor& gamma,
                            const OptTensor& beta) {
    static const auto fwd = op<FilmSig>("fastrobust::film");
    at::Tensor y;
    {
      at::AutoDispatchBelowADInplaceOrView below;
      y = fwd.call(x, gamma, beta);
    }
    const std::array<at::Tensor, 3> args = {x, value(gamma), value(beta)};
    const auto edge = edges_of(args);
    // x is needed only for dgamma, which exists only with a gamma.
    ctx->save_for_backward({gamma ? x : at::Tensor(), value(gamma)});
    ctx->saved_data["edges"] = std::vector<int64_t>(edge.begin(), edge.end());
    ctx->saved_data["dtypes"] = std::vector<int64_t>{
        int64_t(x.scalar_type()), int64_t(dtype_or_undefined(args[1])),
        int64_t(dtype_or_undefined(args[2]))};
    ctx->saved_data["per_channel"] = std::vector<int64_t>{
        gamma && gamma->dim() == 1, beta && beta->dim() == 1};
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto bwd = op<FilmBackwardSig>("fastrobust::film_backward");
    const auto s = ctx->get_saved_variables();
    const auto edges = ctx->saved_data["edges"].toIntVector();
    const auto dtypes = ctx->saved_data["dtypes"].toIntVector();
    const auto pc = ctx->saved_data["per_channel"].toIntVector();
    const std::array<bool, 2> per_channel{pc[0] != 0, pc[1] != 0};
    std::array<bool, kNumFilmGrads> needs{};
    for (int i = 0; i < kNumFilmGrads; ++i)
      needs[i] = edges[i] >= 0 && ctx->needs_input_grad(size_t(edges[i]));
    const at::Tensor& dy = grads[0];
    const auto x_dtype = static_cast<at::ScalarType>(dtypes[0]);
    std::vector<at::Tensor> g;
    if (at::GradMode::is_enabled()) {
      g = film_grads_with_graph(dy, s[0], s[1], needs, per_channel, x_dtype);
    } else {
      // Without a gamma, dx = dy and dbeta = Σ dy need no x: dy stands in for it.
      auto r = bwd.call(dy, s[0].defined() ? s[0] : dy, opt(s[1]), needs, per_channel);
      g = {std::get<0>(r), std::get<1>(r), std::get<2>(r)};
    }
    variable_list result(3);
    for (int i = 0; i < kNumFilmGrads; ++i) {
      if (!needs[i]) continue;
      const auto dt = static_cast<at::ScalarType>(dtypes[i]);
      result[i] = g[i].scalar_type() == dt ? g[i] : g[i].to(dt);
    }
    return result;
  }
};

at::Tensor film_autograd(const at::Tensor& x, const OptTensor& gamma, const OptTensor& beta) {
  return Film::apply(x, gamma, beta);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastrobust, Autograd, m) {
  m.impl("film", &film_autograd);
}

}  // namespace fastrobust
