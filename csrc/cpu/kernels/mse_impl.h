// MSE-family kernels (table: mse.h), compiled once per ISA (see isa.h). Included inside
// namespace fastlin::cpu::<isa>; includes nothing. Tails use the same vector arithmetic as the
// body (partial loads/stores), so a value's rounding never depends on where a span starts.

namespace mse_impl {

template <Fmt F> double sum_sq(const void* a_, const void* b_, int64_t n) {
  using T = FmtTraits<F>;
  using Elem = typename T::Elem;
  using V = typename T::V;
  constexpr int W = T::W;
  const Elem* a = static_cast<const Elem*>(a_);
  const Elem* b = static_cast<const Elem*>(b_);
  V s0{}, s1{}, s2{}, s3{};  // four independent chains hide the FMA latency
  int64_t i = 0;
  for (; i + 4 * W <= n; i += 4 * W) {
    const V d0 = vload<F>(a + i) - vload<F>(b + i), d1 = vload<F>(a + i + W) - vload<F>(b + i + W);
    const V d2 = vload<F>(a + i + 2 * W) - vload<F>(b + i + 2 * W);
    const V d3 = vload<F>(a + i + 3 * W) - vload<F>(b + i + 3 * W);
    s0 += d0 * d0;
    s1 += d1 * d1;
    s2 += d2 * d2;
    s3 += d3 * d3;
  }
  for (; i < n; i += W) {
    const int64_t m = n - i < W ? n - i : W;
    const V d = vload_partial<F>(a + i, m) - vload_partial<F>(b + i, m);
    s0 += d * d;
  }
  return static_cast<double>(vhsum((s0 + s1) + (s2 + s3)));
}

template <Fmt F> void sq(const void* a_, const void* b_, void* out_, int64_t n) {
  using T = FmtTraits<F>;
  using Elem = typename T::Elem;
  using V = typename T::V;
  constexpr int W = T::W;
  const Elem* a = static_cast<const Elem*>(a_);
  const Elem* b = static_cast<const Elem*>(b_);
  Elem* out = static_cast<Elem*>(out_);
  int64_t i = 0;
  for (; i + W <= n; i += W) {
    const V d = vload<F>(a + i) - vload<F>(b + i);
    vstore<F>(out + i, d * d);
  }
  if (i < n) {
    const V d = vload_partial<F>(a + i, n - i) - vload_partial<F>(b + i, n - i);
    vstore_partial<F>(out + i, d * d, n - i);
  }
}

template <Fmt F>
void bwd(const void* a_, const void* b_, const void* g_, double g_scalar, double scale, void* out_, int64_t n) {
  using T = FmtTraits<F>;
  using Elem = typename T::Elem;
  using Acc = typename T::Acc;
  using V = typename T::V;
  constexpr int W = T::W;
  const Elem* a = static_cast<const Elem*>(a_);
  const Elem* b = static_cast<const Elem*>(b_);
  const Elem* g = static_cast<const Elem*>(g_);
  Elem* out = static_cast<Elem*>(out_);
  const V sc = vbcast<V>(static_cast<Acc>(scale));
  const V gs = vbcast<V>(static_cast<Acc>(g_scalar));
  int64_t i = 0;
  for (; i + W <= n; i += W) {
    const V d = sc * (vload<F>(a + i) - vload<F>(b + i));
    vstore<F>(out + i, d * (g ? vload<F>(g + i) : gs));
  }
  if (i < n) {
    const int64_t m = n - i;
    const V d = sc * (vload_partial<F>(a + i, m) - vload_partial<F>(b + i, m));
    vstore_partial<F>(out + i, d * (g ? vload_partial<F>(g + i, m) : gs), m);
  }
}

}  // namespace mse_impl

inline MseKernels mse_kernels_table() {
  using namespace mse_impl;
  MseKernels t{};
  t.sum_sq[kF32] = sum_sq<Fmt::f32>;
  t.sum_sq[kF64] = sum_sq<Fmt::f64>;
  t.sum_sq[kBF16] = sum_sq<Fmt::bf16>;
  t.sum_sq[kF16] = sum_sq<Fmt::f16>;
  t.sq[kF32] = sq<Fmt::f32>;
  t.sq[kF64] = sq<Fmt::f64>;
  t.sq[kBF16] = sq<Fmt::bf16>;
  t.sq[kF16] = sq<Fmt::f16>;
  t.bwd[kF32] = bwd<Fmt::f32>;
  t.bwd[kF64] = bwd<Fmt::f64>;
  t.bwd[kBF16] = bwd<Fmt::bf16>;
  t.bwd[kF16] = bwd<Fmt::f16>;
  return t;
}
