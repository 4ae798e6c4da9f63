// SGD-family kernels (table: sgd.h), compiled once per ISA (see isa.h). Included inside
// namespace fastlin::cpu::<isa>; includes nothing.
//
// torch.optim.SGD (_single_tensor_sgd), term by term, scalars cast to the arithmetic type as
// ATen casts its `alpha`:
//   g = -grad if maximize else grad
//   g = g + weight_decay * p                       (grad.add(param, alpha=weight_decay))
//   buf = g                          first step    (torch.clone(grad))
//   buf = buf * momentum + (1 - dampening) * g     (buf.mul_(momentum).add_(grad, alpha=1 - dampening))
//   g = g + momentum * buf if nesterov else buf    (grad.add(buf, alpha=momentum))
//   p = p + (-lr) * g                              (param.add_(grad, alpha=-lr))

namespace sgd_impl {

template <Fmt F, bool WD, int MODE, bool NEST, bool MAX>
void update_span(typename FmtTraits<F>::Elem* p, const typename FmtTraits<F>::Elem* grad,
                 typename FmtTraits<F>::Elem* buf, int64_t n, const SgdOptions& o) {
  using T = FmtTraits<F>;
  using Acc = typename T::Acc;
  using V = typename T::V;
  constexpr int W = T::W;
  const V nlr = vbcast<V>(static_cast<Acc>(-o.lr)), mom = vbcast<V>(static_cast<Acc>(o.momentum));
  const V damp1 = vbcast<V>(static_cast<Acc>(1.0 - o.dampening)), wd = vbcast<V>(static_cast<Acc>(o.weight_decay));
  auto step = [&](V pv, V gv, V bv, V& np, V& nb) {
    if (MAX) gv = -gv;
    if (WD) gv = gv + wd * pv;
    if (MODE == 1) bv = gv;
    if (MODE == 2) bv = bv * mom + damp1 * gv;
    if (MODE != 0) gv = NEST ? gv + mom * bv : bv;
    np = pv + nlr * gv;
    nb = bv;
  };
  int64_t i = 0;
  for (; i + W <= n; i += W) {
    V np, nb;
    step(vload<F>(p + i), vload<F>(grad + i), MODE == 2 ? vload<F>(buf + i) : V{}, np, nb);
    vstore<F>(p + i, np);
    if (MODE != 0) vstore<F>(buf + i, nb);
  }
  if (i < n) {
    const int64_t m = n - i;
    V np, nb;
    step(vload_partial<F>(p + i, m), vload_partial<F>(grad + i, m), MODE == 2 ? vload_partial<F>(buf + i, m) : V{},
         np, nb);
    vstore_partial<F>(p + i, np, m);
    if (MODE != 0) vstore_partial<F>(buf + i, nb, m);
  }
}

template <Fmt F, bool WD, int MODE, bool NEST>
void update_max(typename FmtTraits<F>::Elem* p, const typename FmtTraits<F>::Elem* g, typename FmtTraits<F>::Elem* b,
                int64_t n, const SgdOptions& o) {
  if (o.maximize) return update_span<F, WD, MODE, NEST, true>(p, g, b, n, o);
  update_span<F, WD, MODE, NEST, false>(p, g, b, n, o);
}

template <Fmt F, bool WD, int MODE>
void update_nest(typename FmtTraits<F>::Elem* p, const typename FmtTraits<F>::Elem* g, typename FmtTraits<F>::Elem* b,
                 int64_t n, const SgdOptions& o) {
  if (MODE != 0 && o.nesterov) return update_max<F, WD, MODE, true>(p, g, b, n, o);
  update_max<F, WD, MODE, false>(p, g, b, n, o);
}

template <Fmt F, bool WD>
void update_mode(typename FmtTraits<F>::Elem* p, const typename FmtTraits<F>::Elem* g, typename FmtTraits<F>::Elem* b,
                 int64_t n, const SgdOptions& o) {
  if (o.momentum == 0) return update_nest<F, WD, 0>(p, g, b, n, o);
  if (o.first_step) return update_nest<F, WD, 1>(p, g, b, n, o);
  update_nest<F, WD, 2>(p, g, b, n, o);
}

template <Fmt F> void update(void* p_, const void* g_, void* b_, int64_t n, const SgdOptions& o) {
  using Elem = typename FmtTraits<F>::Elem;
  Elem* p = static_cast<Elem*>(p_);
  const Elem* g = static_cast<const Elem*>(g_);
  Elem* b = static_cast<Elem*>(b_);
  if (o.weight_decay != 0) return update_mode<F, true>(p, g, b, n, o);
  update_mode<F, false>(p, g, b, n, o);
}

}  // namespace sgd_impl

inline SgdKernels sgd_kernels_table() {
  using namespace sgd_impl;
  SgdKernels t{};
  t.update[kF32] = update<Fmt::f32>;
  t.update[kF64] = update<Fmt::f64>;
  t.update[kBF16] = update<Fmt::bf16>;
  t.update[kF16] = update<Fmt::f16>;
  return t;
}
