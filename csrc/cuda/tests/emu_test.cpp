// Runs the fastlin CUDA kernels on the CPU emulator (cuda_emu.h) and checks them against a float64
// reference computed from the same (rounded) inputs. Built by .ci/compile_cuda.sh --emu (with
// AddressSanitizer and UBSan) together with csrc/cuda/*.cu compiled as C++:
//   g++ -std=c++20 -DFASTLIN_CUDA_EMU -x c++ csrc/cuda/*.cu -x none csrc/cuda/tests/emu_test.cpp ...
// It drives the launchers the way the tensor glue does (csrc/cuda/*_cuda.cpp): plan, row pass,
// finalize, commit. Outputs are poisoned with NaN first, so an unwritten element fails.
#include "cuda_emu.h"  // first: the CUDA qualifiers for the host compiler

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <functional>
#include <limits>
#include <new>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "../kernels.h"

// ---- the CUDA runtime calls the launchers make -------------------------------------------------
extern "C" {
cudaError_t CUDARTAPI cudaGetLastError(void) { return cudaSuccess; }
cudaError_t CUDARTAPI cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}
cudaError_t CUDARTAPI cudaOccupancyMaxActiveBlocksPerMultiprocessorWithFlags(int* numBlocks, const void*, int, size_t,
                                                                             unsigned int) {
  *numBlocks = 3;
  return cudaSuccess;
}
}

namespace {

using fastlin::cuda::DType;
namespace fc = fastlin::cuda;

constexpr int kSms = 4;  // emulated SM count (x 3 blocks per SM): grids of up to 12 blocks
const double kNaN = std::numeric_limits<double>::quiet_NaN();

int g_failures = 0;
int g_checks = 0;

// ---- element types -----------------------------------------------------------------------------
template <typename T>
double tod(T v) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return __bfloat162float(v);
  } else if constexpr (std::is_same_v<T, __half>) {
    return __half2float(v);
  } else {
    return static_cast<double>(v);
  }
}
template <typename T>
T fromd(double v) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return __float2bfloat16_rn(static_cast<float>(v));
  } else if constexpr (std::is_same_v<T, __half>) {
    return __float2half_rn(static_cast<float>(v));
  } else {
    return static_cast<T>(v);
  }
}
template <typename T>
DType dtype_of() {
  if constexpr (std::is_same_v<T, float>) return DType::F32;
  if constexpr (std::is_same_v<T, double>) return DType::F64;
  if constexpr (std::is_same_v<T, __nv_bfloat16>) return DType::BF16;
  return DType::F16;
}
template <typename T>
const char* name_of() {
  if constexpr (std::is_same_v<T, float>) return "f32";
  if constexpr (std::is_same_v<T, double>) return "f64";
  if constexpr (std::is_same_v<T, __nv_bfloat16>) return "bf16";
  return "f16";
}
// Relative 2-norm tolerance of outputs stored in T against the float64 reference (tests/conftest.py).
template <typename T>
double tol_of() {
  if constexpr (std::is_same_v<T, float>) return 1e-5;
  if constexpr (std::is_same_v<T, double>) return 1e-12;
  if constexpr (std::is_same_v<T, __nv_bfloat16>) return 1e-2;
  return 2e-3;
}
// Largest finite value of T.
template <typename T>
double max_of() {
  if constexpr (std::is_same_v<T, __half>) return 65504.0;
  if constexpr (std::is_same_v<T, __nv_bfloat16>) return 3.3895313892515355e38;
  if constexpr (std::is_same_v<T, float>) return std::numeric_limits<float>::max();
  return std::numeric_limits<double>::max();
}
template <typename T>
using acc_of = std::conditional_t<std::is_same_v<T, double>, double, float>;

// 64-byte aligned storage (kept by copies, unlike an offset into a std::vector).
template <typename T>
struct AlignedAlloc {
  using value_type = T;
  AlignedAlloc() = default;
  template <typename U>
  AlignedAlloc(const AlignedAlloc<U>&) {}
  T* allocate(size_t n) { return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t(64))); }
  void deallocate(T* p, size_t) { ::operator delete(p, std::align_val_t(64)); }
  template <typename U>
  bool operator==(const AlignedAlloc<U>&) const { return true; }
};
template <typename T>
using avec = std::vector<T, AlignedAlloc<T>>;

// A strided 2-D array in an aligned buffer, starting `offset` elements in (1: a really misaligned
// pointer for the misaligned cases).
template <typename T>
struct Mat {
  int64_t rows = 0, cols = 0, s0 = 0, s1 = 0, offset = 0;
  avec<T> buf;
  T* data() { return buf.data() + offset; }
  const T* data() const { return buf.data() + offset; }
  T& at(int64_t i, int64_t j) { return data()[i * s0 + j * s1]; }
  double get(int64_t i, int64_t j) const { return tod(data()[i * s0 + j * s1]); }
};

template <typename T>
Mat<T> make_mat(int64_t rows, int64_t cols, bool transposed, int64_t pad, int64_t misalign) {
  Mat<T> m;
  m.rows = rows;
  m.cols = cols;
  if (transposed) {
    m.s0 = 1;
    m.s1 = rows + pad;
  } else {
    m.s0 = cols + pad;
    m.s1 = 1;
  }
  const int64_t span = transposed ? (rows + pad) * cols : rows * (cols + pad);
  m.buf.resize(static_cast<size_t>(span + 64));
  m.offset = misalign;
  for (auto& v : m.buf) v = fromd<T>(kNaN);
  return m;
}

template <typename T>
void fill_normal(Mat<T>& m, std::mt19937_64& rng, double scale = 1.0, double shift = 0.0) {
  std::normal_distribution<double> nd(0.0, 1.0);
  for (int64_t i = 0; i < m.rows; ++i)
    for (int64_t j = 0; j < m.cols; ++j) m.at(i, j) = fromd<T>(shift + scale * nd(rng));
}

void check(bool ok, const std::string& what) {
  ++g_checks;
  if (!ok) {
    ++g_failures;
    std::printf("FAIL %s\n", what.c_str());
  }
}

// ||out - ref|| / ||ref|| <= tol, and no NaN in out unless in ref.
void check_close(const std::vector<double>& out, const std::vector<double>& ref, double tol, const std::string& what) {
  double num = 0, den = 0;
  bool nan_out = false;
  for (size_t i = 0; i < out.size(); ++i) {
    if (std::isnan(out[i]) && !std::isnan(ref[i])) nan_out = true;
    num += (out[i] - ref[i]) * (out[i] - ref[i]);
    den += ref[i] * ref[i];
  }
  const double err = den > 0 ? std::sqrt(num / den) : std::sqrt(num);
  const bool ok = !nan_out && out.size() == ref.size() && err <= tol;
  ++g_checks;
  if (!ok) {
    ++g_failures;
    std::printf("FAIL %s: rel err %.3e > %.1e%s\n", what.c_str(), err, tol, nan_out ? " (NaN in output)" : "");
  }
}

template <typename T>
std::vector<double> flat(const Mat<T>& m) {
  std::vector<double> v;
  for (int64_t i = 0; i < m.rows; ++i)
    for (int64_t j = 0; j < m.cols; ++j) v.push_back(m.get(i, j));
  return v;
}

void ok_or_die(cudaError_t e, const char* what) {
  if (e != cudaSuccess) {
    std::printf("launcher error in %s: %d\n", what, static_cast<int>(e));
    std::exit(1);
  }
}

// ---- the problem of one test case ----------------------------------------------------------------
struct Shape {
  int64_t N, D, O;
};

template <typename T, typename P>
struct Case {
  Shape s;
  Mat<T> x, y, g;
  Mat<P> w, b;  // b: (1, O)
  bool bias = true;
  bool x_vec_ok = false;
  std::vector<acc_of<T>> sw;

  fc::RowPassArgs base_args() const {
    fc::RowPassArgs a;
    a.nrows = s.N;
    a.O = static_cast<int>(s.O);
    a.D = static_cast<int>(s.D);
    a.x = x.data();
    a.ldx = x.s0;
    a.y = y.data();
    a.ys0 = y.s0;
    a.ys1 = y.s1;
    a.w = w.data();
    a.ws0 = w.s0;
    a.ws1 = w.s1;
    if (bias) {
      a.b = b.data();
      a.bs0 = b.s1;
    }
    a.param_f32 = std::is_same_v<P, float> ? 1 : 0;
    return a;
  }
};

template <typename T, typename P>
Case<T, P> make_case(Shape s, std::mt19937_64& rng, bool bias, int variant) {
  Case<T, P> c;
  c.s = s;
  c.bias = bias;
  const int vw = fc::vec_width(dtype_of<T>());
  // variant 0: contiguous; 1: x rows padded by a vector (aligned), W transposed; 2: x misaligned.
  c.x = make_mat<T>(s.N, s.D, false, variant == 1 ? vw : 0, variant == 2 ? 1 : 0);
  c.y = make_mat<T>(s.N, s.O, variant == 1, 0, 0);
  c.g = make_mat<T>(s.N, s.O, variant != 1, 0, 0);
  c.w = make_mat<P>(s.O, s.D, variant == 1, 0, 0);
  c.b = make_mat<P>(1, s.O, false, 0, 0);
  fill_normal(c.x, rng);
  fill_normal(c.y, rng, 1.0, 0.5);
  fill_normal(c.g, rng);
  fill_normal(c.w, rng, 1.0 / std::sqrt(static_cast<double>(s.D)));
  fill_normal(c.b, rng, 0.5);
  c.x_vec_ok = variant != 2 && s.D % vw == 0;
  std::uniform_real_distribution<double> u(0.25, 2.0);
  c.sw.resize(static_cast<size_t>(s.N));
  for (auto& v : c.sw) v = static_cast<acc_of<T>>(u(rng));
  return c;
}

// float64 reference pieces
template <typename T, typename P>
std::vector<double> ref_pred(const Case<T, P>& c) {  // (N, O) x W^T + b
  std::vector<double> out(static_cast<size_t>(c.s.N * c.s.O));
  for (int64_t i = 0; i < c.s.N; ++i)
    for (int64_t o = 0; o < c.s.O; ++o) {
      double acc = c.bias ? c.b.get(0, o) : 0.0;
      for (int64_t d = 0; d < c.s.D; ++d) acc += c.x.get(i, d) * c.w.get(o, d);
      out[static_cast<size_t>(i * c.s.O + o)] = acc;
    }
  return out;
}

template <typename V>
std::vector<double> vec_of(const V& v, size_t n) {
  std::vector<double> r(n);
  for (size_t i = 0; i < n; ++i) r[i] = tod(v[i]);
  return r;
}

// ---- linear forward -------------------------------------------------------------------------------
template <typename T>
void test_linear(const Case<T, T>& c, const std::string& tag) {
  const auto plan = fc::rowpass_plan(dtype_of<T>(), c.x_vec_ok, static_cast<int>(c.s.O), static_cast<int>(c.s.D),
                                     c.s.N, kSms);
  if (!plan.ok) return;
  avec<T> out(static_cast<size_t>(c.s.N * c.s.O), fromd<T>(kNaN));
  fc::RowPassArgs a = c.base_args();
  a.y = nullptr;
  a.src = fc::kSrcDots;
  a.y_out = out.data();
  ok_or_die(fc::rowpass_launch(dtype_of<T>(), plan, a, nullptr), "linear");
  check_close(vec_of(out, out.size()), ref_pred(c), tol_of<T>(), tag + " linear");
}

// ---- linear_backward --------------------------------------------------------------------------------
template <typename T>
void test_linear_backward(const Case<T, T>& c, const std::string& tag, bool mi, bool mw, bool mb) {
  const auto xt = dtype_of<T>();
  const auto plan = fc::rowpass_plan(xt, mw ? c.x_vec_ok : c.s.D % fc::vec_width(xt) == 0, static_cast<int>(c.s.O),
                                     static_cast<int>(c.s.D), c.s.N, kSms);
  if (!plan.ok) return;
  const int64_t N = c.s.N, D = c.s.D, O = c.s.O, E = O * D + O;
  avec<T> gi(static_cast<size_t>(N * D), fromd<T>(kNaN)), gw(static_cast<size_t>(O * D), fromd<T>(kNaN)),
      gb(static_cast<size_t>(O), fromd<T>(kNaN));
  std::vector<acc_of<T>> part(static_cast<size_t>(plan.G * E), static_cast<acc_of<T>>(kNaN));
  std::vector<double> part_s(static_cast<size_t>(plan.G * 2), kNaN);
  fc::RowPassArgs a = c.base_args();
  a.y = nullptr;
  a.src = fc::kSrcGrad;
  a.g = c.g.data();
  a.gs0 = c.g.s0;
  a.gs1 = c.g.s1;
  a.b = nullptr;
  a.load_x = mw;
  a.acc_w = mw;
  a.acc_b = mb;
  a.gi_out = mi ? gi.data() : nullptr;
  a.part = part.data();
  a.part_s = part_s.data();
  ok_or_die(fc::rowpass_launch(xt, plan, a, nullptr), "linear_backward rowpass");
  if (mw || mb) {
    fc::FinalizeArgs f;
    f.mode = fc::kFinGrad;
    f.pt = xt;
    f.part = part.data();
    f.part_s = part_s.data();
    f.G = plan.G;
    f.O = static_cast<int>(O);
    f.D = static_cast<int>(D);
    f.out_w = mw ? gw.data() : nullptr;
    f.out_b = mb ? gb.data() : nullptr;
    ok_or_die(fc::finalize_launch(f, nullptr), "linear_backward finalize");
  }
  std::vector<double> rgi(static_cast<size_t>(N * D), 0.0), rgw(static_cast<size_t>(O * D), 0.0),
      rgb(static_cast<size_t>(O), 0.0);
  for (int64_t i = 0; i < N; ++i)
    for (int64_t o = 0; o < O; ++o) {
      const double g = c.g.get(i, o);
      rgb[static_cast<size_t>(o)] += g;
      for (int64_t d = 0; d < D; ++d) {
        rgi[static_cast<size_t>(i * D + d)] += g * c.w.get(o, d);
        rgw[static_cast<size_t>(o * D + d)] += g * c.x.get(i, d);
      }
    }
  const std::string t = tag + " linear_backward[" + std::to_string(mi) + std::to_string(mw) + std::to_string(mb) + "]";
  if (mi) check_close(vec_of(gi, gi.size()), rgi, tol_of<T>(), t + " grad_input");
  if (mw) check_close(vec_of(gw, gw.size()), rgw, tol_of<T>(), t + " grad_weight");
  if (mb) check_close(vec_of(gb, gb.size()), rgb, tol_of<T>(), t + " grad_bias");
}

// ---- linear_mse_loss -------------------------------------------------------------------------------
template <typename T>
void test_lmse(const Case<T, T>& c, const std::string& tag, bool mean, std::array<bool, 4> m) {
  const auto xt = dtype_of<T>();
  const auto plan = fc::rowpass_plan(xt, c.x_vec_ok, static_cast<int>(c.s.O), static_cast<int>(c.s.D), c.s.N, kSms);
  if (!plan.ok) return;
  const int64_t N = c.s.N, D = c.s.D, O = c.s.O, E = O * D + O;
  const double numel = static_cast<double>(N * O);
  const double scale = mean ? 2.0 / numel : 2.0;
  avec<T> loss(1, fromd<T>(kNaN)), gi(static_cast<size_t>(N * D), fromd<T>(kNaN)),
      gw(static_cast<size_t>(O * D), fromd<T>(kNaN)), gb(static_cast<size_t>(O), fromd<T>(kNaN)),
      gt(static_cast<size_t>(N * O), fromd<T>(kNaN));
  std::vector<acc_of<T>> part(static_cast<size_t>(plan.G * E), static_cast<acc_of<T>>(kNaN));
  std::vector<double> part_s(static_cast<size_t>(plan.G * 2), kNaN);
  fc::RowPassArgs a = c.base_args();
  a.src = fc::kSrcDots;
  a.acc_w = m[1];
  a.acc_b = m[2];
  a.acc_loss = 1;
  a.gi_out = m[0] ? gi.data() : nullptr;
  a.gt_out = m[3] ? gt.data() : nullptr;
  a.out_scale = scale;
  a.part = part.data();
  a.part_s = part_s.data();
  ok_or_die(fc::rowpass_launch(xt, plan, a, nullptr), "lmse rowpass");
  fc::FinalizeArgs f;
  f.mode = fc::kFinGrad;
  f.pt = xt;
  f.part = part.data();
  f.part_s = part_s.data();
  f.G = plan.G;
  f.O = static_cast<int>(O);
  f.D = static_cast<int>(D);
  f.need_totals = 1;
  f.out_w = m[1] ? gw.data() : nullptr;
  f.out_b = m[2] ? gb.data() : nullptr;
  f.out_loss = loss.data();
  f.grad_scale = scale;
  f.loss_div = mean ? numel : 1.0;
  ok_or_die(fc::finalize_launch(f, nullptr), "lmse finalize");

  const auto pred = ref_pred(c);
  double rl = 0;
  std::vector<double> rgi(static_cast<size_t>(N * D), 0.0), rgw(static_cast<size_t>(O * D), 0.0),
      rgb(static_cast<size_t>(O), 0.0), rgt(static_cast<size_t>(N * O));
  for (int64_t i = 0; i < N; ++i)
    for (int64_t o = 0; o < O; ++o) {
      const double r = pred[static_cast<size_t>(i * O + o)] - c.y.get(i, o);
      rl += r * r;
      const double g = r * scale;
      rgt[static_cast<size_t>(i * O + o)] = -g;
      rgb[static_cast<size_t>(o)] += g;
      for (int64_t d = 0; d < D; ++d) {
        rgi[static_cast<size_t>(i * D + d)] += g * c.w.get(o, d);
        rgw[static_cast<size_t>(o * D + d)] += g * c.x.get(i, d);
      }
    }
  if (mean) rl /= numel;
  const std::string t = tag + (mean ? " lmse(mean)" : " lmse(sum)");
  check_close({tod(loss[0])}, {rl}, tol_of<T>(), t + " loss");
  if (m[0]) check_close(vec_of(gi, gi.size()), rgi, tol_of<T>(), t + " grad_input");
  if (m[1]) check_close(vec_of(gw, gw.size()), rgw, tol_of<T>(), t + " grad_weight");
  if (m[2]) check_close(vec_of(gb, gb.size()), rgb, tol_of<T>(), t + " grad_bias");
  if (m[3]) check_close(vec_of(gt, gt.size()), rgt, tol_of<T>(), t + " grad_target");
}

// ---- train_step / fit ----------------------------------------------------------------------------------
struct Sgd {
  double lr, momentum, dampening, wd;
  bool nesterov, maximize;
};

// float64 reference of one step over `rows` (indices into the case's rows); updates w, b, bufs.
// R: the arithmetic (double: the reference; the accumulation dtype: "stock" arithmetic at the
// kernel's precision, for DESIGN.md's rule that the kernel may err at most 2x what stock does).
template <typename R = double, typename T, typename P>
double ref_step(const Case<T, P>& c, const std::vector<int64_t>& rows, bool use_sw, std::vector<double>& w,
                std::vector<double>& b, std::vector<double>& wm, std::vector<double>& bm, const Sgd& o, bool first,
                double* wsum_out) {
  const int64_t D = c.s.D, O = c.s.O;
  std::vector<R> gw(static_cast<size_t>(O * D), R(0)), gb(static_cast<size_t>(O), R(0));
  R lsum = 0, wsum = 0;
  for (int64_t i : rows) {
    const R swv = use_sw ? static_cast<R>(c.sw[static_cast<size_t>(i)]) : R(1);
    wsum += swv;
    for (int64_t o = 0; o < O; ++o) {
      R p = c.bias ? static_cast<R>(b[static_cast<size_t>(o)]) : R(0);
      for (int64_t d = 0; d < D; ++d) p += static_cast<R>(c.x.get(i, d)) * static_cast<R>(w[static_cast<size_t>(o * D + d)]);
      const R r = p - static_cast<R>(c.y.get(i, o));
      lsum += swv * r * r;
      gb[static_cast<size_t>(o)] += swv * r;
      for (int64_t d = 0; d < D; ++d) gw[static_cast<size_t>(o * D + d)] += swv * r * static_cast<R>(c.x.get(i, d));
    }
  }
  const R denom = static_cast<R>(O) * wsum;
  auto upd = [&](double& pd, R g, double& bufd) {
    R p = static_cast<R>(pd), buf = static_cast<R>(bufd);
    g *= R(2) / denom;
    if (o.maximize) g = -g;
    if (o.wd != 0) g += static_cast<R>(o.wd) * p;
    if (o.momentum != 0) {
      buf = first ? g : static_cast<R>(o.momentum) * buf + static_cast<R>(1 - o.dampening) * g;
      g = o.nesterov ? g + static_cast<R>(o.momentum) * buf : buf;
    }
    p -= static_cast<R>(o.lr) * g;
    // stock arithmetic stores in the parameters' dtype
    pd = std::is_same_v<R, double> ? static_cast<double>(p) : tod(fromd<P>(static_cast<double>(p)));
    bufd = std::is_same_v<R, double> ? static_cast<double>(buf) : tod(fromd<P>(static_cast<double>(buf)));
  };
  for (size_t k = 0; k < w.size(); ++k) upd(w[k], gw[k], wm[k]);
  if (c.bias)
    for (size_t k = 0; k < b.size(); ++k) upd(b[k], gb[k], bm[k]);
  *wsum_out = static_cast<double>(wsum);
  return static_cast<double>(lsum / denom);
}

double rel_err(const std::vector<double>& out, const std::vector<double>& ref) {
  double num = 0, den = 0;
  for (size_t i = 0; i < out.size(); ++i) {
    num += (out[i] - ref[i]) * (out[i] - ref[i]);
    den += ref[i] * ref[i];
  }
  return den > 0 ? std::sqrt(num / den) : std::sqrt(num);
}

// out within max(tol, 2 x stock's error) of the float64 reference.
void check_close2x(const std::vector<double>& out, const std::vector<double>& ref, const std::vector<double>& stock,
                   double tol, const std::string& what) {
  const double es = rel_err(stock, ref);
  check_close(out, ref, std::isfinite(es) ? std::max(tol, 2 * es) : tol, what);
}

// Device-side state of a training run: parameters and buffers in P, strided like the case's W/b.
template <typename P>
struct Params {
  Mat<P> w, b, wm, bm;
};

template <typename T, typename P>
Params<P> init_params(const Case<T, P>& c, bool momentum) {
  Params<P> p;
  p.w = c.w;
  p.b = c.b;
  p.wm = make_mat<P>(c.s.O, c.s.D, c.w.s0 == 1, 0, 0);
  p.bm = make_mat<P>(1, c.s.O, false, 0, 0);
  (void)momentum;
  return p;
}

template <typename T, typename P>
fc::FinalizeArgs update_args(const Case<T, P>& c, Params<P>& p, const Sgd& o, bool first, void* part, double* part_s,
                             int G, int mode, bool use_bias) {
  fc::FinalizeArgs f;
  f.mode = mode;
  f.pt = dtype_of<P>();
  f.part = part;
  f.part_s = part_s;
  f.G = G;
  f.O = static_cast<int>(c.s.O);
  f.D = static_cast<int>(c.s.D);
  f.need_totals = 1;
  f.w = p.w.data();
  f.ws0 = p.w.s0;
  f.ws1 = p.w.s1;
  if (use_bias) {
    f.b = p.b.data();
    f.bs0 = p.b.s1;
  }
  if (o.momentum != 0) {
    f.wm = p.wm.data();
    f.wms0 = p.wm.s0;
    f.wms1 = p.wm.s1;
    if (use_bias) {
      f.bm = p.bm.data();
      f.bms0 = p.bm.s1;
    }
  }
  f.opt.lr = o.lr;
  f.opt.momentum = o.momentum;
  f.opt.dampening = o.dampening;
  f.opt.weight_decay = o.wd;
  f.opt.nesterov = o.nesterov;
  f.opt.maximize = o.maximize;
  f.opt.first_step = first;
  return f;
}

// One train_step (kFinUpdate) over rows [row0, row0 + nrows) or rows[], like the glue.
template <typename T, typename P>
double run_step(const Case<T, P>& c, Params<P>& p, const Sgd& o, bool first, bool use_sw, const int64_t* rows,
                int64_t row0, int64_t nrows, int mode, std::vector<acc_of<T>>* staging, std::vector<int>* flags,
                std::vector<double>* state, const int* stopped) {
  const auto xt = dtype_of<T>();
  const auto plan =
      fc::rowpass_plan(xt, c.x_vec_ok, static_cast<int>(c.s.O), static_cast<int>(c.s.D), nrows, kSms);
  if (!plan.ok) {
    std::printf("FAIL no plan for a train step\n");
    ++g_failures;
    return kNaN;
  }
  const int64_t E = c.s.O * c.s.D + c.s.O;
  std::vector<acc_of<T>> part(static_cast<size_t>(plan.G * E), static_cast<acc_of<T>>(kNaN));
  std::vector<double> part_s(static_cast<size_t>(plan.G * 2), kNaN);
  fc::RowPassArgs a = c.base_args();
  a.nrows = nrows;
  a.row0 = row0;
  a.rows = rows;
  a.w = p.w.data();
  a.ws0 = p.w.s0;
  a.ws1 = p.w.s1;
  a.b = c.bias ? p.b.data() : nullptr;
  a.sw = use_sw ? c.sw.data() : nullptr;
  a.src = fc::kSrcDots;
  a.acc_w = 1;
  a.acc_b = c.bias;
  a.acc_loss = 1;
  a.part = part.data();
  a.part_s = part_s.data();
  a.stopped = stopped;
  ok_or_die(fc::rowpass_launch(xt, plan, a, nullptr), "train rowpass");
  fc::FinalizeArgs f = update_args(c, p, o, first, part.data(), part_s.data(), plan.G, mode, c.bias);
  acc_of<T> loss = static_cast<acc_of<T>>(kNaN);
  if (mode == fc::kFinUpdate) {
    f.loss_out = &loss;
  } else {
    f.staging = staging->data();
    f.flags = flags->data();
    f.state = state->data();
    f.stopped = stopped;
  }
  ok_or_die(fc::finalize_launch(f, nullptr), "train finalize");
  return static_cast<double>(loss);
}

template <typename P>
std::vector<double> flatp(const Mat<P>& m) {
  return flat(m);
}

template <typename T, typename P>
void test_train(const Case<T, P>& c, const std::string& tag, const Sgd& o, bool use_sw) {
  const int64_t N = c.s.N, D = c.s.D, O = c.s.O;
  const auto plan0 = fc::rowpass_plan(dtype_of<T>(), c.x_vec_ok, static_cast<int>(O), static_cast<int>(D), N, kSms);
  if (!plan0.ok) return;
  const std::string t = tag + " train(lr=" + std::to_string(o.lr) + ",m=" + std::to_string(o.momentum) +
                        (o.nesterov ? ",nesterov" : "") + (o.maximize ? ",max" : "") + (use_sw ? ",sw" : "") + ")";
  // two steps of train_step: first_step then a regular one
  Params<P> p = init_params(c, o.momentum != 0);
  std::vector<double> rw = flatp(c.w), rb = flatp(c.b), rwm(rw.size(), 0.0), rbm(rb.size(), 0.0);
  std::vector<int64_t> all(static_cast<size_t>(N));
  std::iota(all.begin(), all.end(), 0);
  for (int step = 0; step < 2; ++step) {
    const double loss = run_step(c, p, o, step == 0, use_sw, nullptr, 0, N, fc::kFinUpdate, nullptr, nullptr,
                                 nullptr, nullptr);
    double wsum = 0;
    std::vector<double> sw_ = rw, sb = rb, swm = rwm, sbm = rbm;  // stock: the same step at the kernel's precision
    const double sl = ref_step<acc_of<T>>(c, all, use_sw, sw_, sb, swm, sbm, o, step == 0, &wsum);
    const double rl = ref_step(c, all, use_sw, rw, rb, rwm, rbm, o, step == 0, &wsum);
    const std::string ts = t + " step " + std::to_string(step);
    check_close2x({loss}, {rl}, {sl}, tol_of<T>(), ts + " loss");
    check_close2x(flatp(p.w), rw, sw_, tol_of<P>(), ts + " weight");
    if (c.bias) check_close2x(flatp(p.b), rb, sb, tol_of<P>(), ts + " bias");
    if (o.momentum != 0) {
      check_close2x(flatp(p.wm), rwm, swm, tol_of<P>(), ts + " weight_momentum");
      if (c.bias) check_close2x(flatp(p.bm), rbm, sbm, tol_of<P>(), ts + " bias_momentum");
    }
    // The reference continues from the kernel's (rounded) parameters, like the kernel does.
    rw = flatp(p.w);
    rb = flatp(p.b);
    rwm = flatp(p.wm);
    rbm = flatp(p.bm);
  }
}

// fit: staged steps + commit over shuffled mini-batches, against train_step on the same rows
// (bit-identical) and the float64 reference; and the non-finite stop.
template <typename T, typename P>
void test_fit(const Case<T, P>& c0, const std::string& tag, const Sgd& o, bool use_sw, std::mt19937_64& rng,
              bool poison) {
  Case<T, P> c = c0;
  const int64_t N = c.s.N, D = c.s.D, O = c.s.O, E = O * D + O;
  const auto plan0 = fc::rowpass_plan(dtype_of<T>(), c.x_vec_ok, static_cast<int>(O), static_cast<int>(D), N, kSms);
  if (!plan0.ok || N < 3) return;
  const int64_t bs = (N + 2) / 3;
  const int epochs = 2;
  // the poisoned row: an Inf in x, met in epoch 1 (second epoch), batch 1
  std::vector<std::vector<int64_t>> perms;
  for (int e = 0; e < epochs; ++e) {
    std::vector<int64_t> perm(static_cast<size_t>(N));
    std::iota(perm.begin(), perm.end(), 0);
    std::shuffle(perm.begin(), perm.end(), rng);
    perms.push_back(perm);
  }
  int64_t bad_row = -1;
  if (poison) {
    bad_row = perms[1][static_cast<size_t>(std::min(bs, N - 1))];
    c.x.at(bad_row, 0) = fromd<T>(std::numeric_limits<double>::infinity());
  }
  Params<P> pf = init_params(c, o.momentum != 0);  // fit
  Params<P> pt = init_params(c, o.momentum != 0);  // train_step on gathered rows
  std::vector<acc_of<T>> staging(static_cast<size_t>(2 * E), static_cast<acc_of<T>>(kNaN));
  std::vector<int> flags(static_cast<size_t>(fc::finalize_grid(static_cast<int>(O), static_cast<int>(D))), -7);
  std::vector<double> state(4, 0.0), history(static_cast<size_t>(epochs), kNaN);
  int stopped = 0;
  fc::CommitArgs cm;
  cm.pt = dtype_of<P>();
  cm.O = static_cast<int>(O);
  cm.D = static_cast<int>(D);
  cm.w = pf.w.data();
  cm.ws0 = pf.w.s0;
  cm.ws1 = pf.w.s1;
  if (c.bias) {
    cm.b = pf.b.data();
    cm.bs0 = pf.b.s1;
  }
  if (o.momentum != 0) {
    cm.wm = pf.wm.data();
    cm.wms0 = pf.wm.s0;
    cm.wms1 = pf.wm.s1;
    if (c.bias) {
      cm.bm = pf.bm.data();
      cm.bms0 = pf.bm.s1;
    }
  }
  cm.staging = staging.data();
  cm.flags = flags.data();
  cm.nflags = static_cast<int>(flags.size());
  cm.state = state.data();
  cm.stopped = &stopped;
  cm.history = history.data();

  // reference
  std::vector<double> rw = flatp(c.w), rb = flatp(c.b), rwm(rw.size(), 0.0), rbm(rb.size(), 0.0);
  std::vector<double> rhist(static_cast<size_t>(epochs), kNaN);
  bool ref_stopped = false;
  bool t_stopped = false;
  int64_t step = 0;
  for (int e = 0; e < epochs; ++e) {
    double tot = 0, wtot = 0;
    for (int64_t start = 0; start < N; start += bs, ++step) {
      const int64_t n = std::min(bs, N - start);
      const int64_t* rows = perms[static_cast<size_t>(e)].data() + start;
      const bool first = step == 0;
      run_step(c, pf, o, first, use_sw, rows, 0, n, fc::kFinStage, &staging, &flags, &state, &stopped);
      cm.epoch = e;
      cm.epoch_end = start + bs >= N;
      ok_or_die(fc::fit_commit_launch(cm, nullptr), "fit commit");
      // train_step on the same rows (rows pointer, no staging): applies whatever it computes
      if (!t_stopped) {
        Params<P> before = pt;
        run_step(c, pt, o, first, use_sw, rows, 0, n, fc::kFinUpdate, nullptr, nullptr, nullptr, nullptr);
        bool fin = true;
        for (double v : flatp(pt.w)) fin = fin && std::isfinite(v);
        for (double v : flatp(pt.b)) fin = fin && std::isfinite(v);
        if (!fin) {
          pt = before;
          t_stopped = true;
        }
      }
      if (!ref_stopped) {
        std::vector<int64_t> rr(rows, rows + n);
        std::vector<double> w2 = rw, b2 = rb, wm2 = rwm, bm2 = rbm;
        double ws = 0;
        const double l = ref_step(c, rr, use_sw, w2, b2, wm2, bm2, o, first, &ws);
        bool fin = std::isfinite(l);
        for (double v : w2) fin = fin && std::isfinite(v);
        for (double v : b2) fin = fin && std::isfinite(v);
        if (!fin) {
          ref_stopped = true;
        } else {
          rw = w2;
          rb = b2;
          rwm = wm2;
          rbm = bm2;
          tot += l * ws;
          wtot += ws;
        }
      }
    }
    if (!ref_stopped) rhist[static_cast<size_t>(e)] = tot / wtot;
  }
  const std::string t = tag + " fit(bs=" + std::to_string(bs) + (use_sw ? ",sw" : "") + (poison ? ",inf" : "") + ")";
  // fit and train_step on the same rows: bit-identical parameters
  check(flatp(pf.w) == flatp(pt.w), t + " weight == train_step's (bitwise)");
  if (c.bias) check(flatp(pf.b) == flatp(pt.b), t + " bias == train_step's (bitwise)");
  check_close(flatp(pf.w), rw, 20 * tol_of<P>(), t + " weight vs float64 reference");
  if (c.bias) check_close(flatp(pf.b), rb, 20 * tol_of<P>(), t + " bias vs float64 reference");
  for (int e = 0; e < epochs; ++e) {
    const double h = history[static_cast<size_t>(e)], r = rhist[static_cast<size_t>(e)];
    if (std::isnan(r)) {
      check(std::isnan(h), t + " history[" + std::to_string(e) + "] is NaN after the stop");
    } else {
      check_close({h}, {r}, 20 * tol_of<T>(), t + " history[" + std::to_string(e) + "]");
    }
  }
  check((stopped != 0) == poison, t + " stopped flag");
}

// ---- mse ------------------------------------------------------------------------------------------------
template <typename T>
void test_mse(int64_t n, int misalign, std::mt19937_64& rng) {
  const std::string t = std::string(name_of<T>()) + " mse n=" + std::to_string(n) + " mis=" + std::to_string(misalign);
  Mat<T> x = make_mat<T>(1, n, false, 0, misalign), y = make_mat<T>(1, n, false, 0, misalign),
         go = make_mat<T>(1, n, false, 0, misalign), out = make_mat<T>(1, n, false, 0, misalign);
  fill_normal(x, rng);
  fill_normal(y, rng);
  fill_normal(go, rng);
  std::vector<double> rnone(static_cast<size_t>(n)), rback(static_cast<size_t>(n)), rbacks(static_cast<size_t>(n));
  double rsum = 0;
  const acc_of<T> g0 = static_cast<acc_of<T>>(0.75);
  for (int64_t i = 0; i < n; ++i) {
    const double d = x.get(0, i) - y.get(0, i);
    rnone[static_cast<size_t>(i)] = d * d;
    rsum += d * d;
    rback[static_cast<size_t>(i)] = d * go.get(0, i) * 2.0;
    rbacks[static_cast<size_t>(i)] = d * 0.75 * (2.0 / static_cast<double>(n));
  }
  ok_or_die(fc::mse_none_launch(dtype_of<T>(), x.data(), y.data(), out.data(), n, kSms, nullptr), "mse none");
  check_close(flat(out), rnone, tol_of<T>(), t + " none");
  const int np = fc::mse_reduce_blocks(n, kSms);
  std::vector<double> partials(static_cast<size_t>(std::max(np, 1)), kNaN);
  for (int mean = 0; mean < 2; ++mean) {
    T o = fromd<T>(kNaN);
    ok_or_die(fc::mse_reduce_launch(dtype_of<T>(), x.data(), y.data(), n, partials.data(), &o, mean, kSms, nullptr),
              "mse reduce");
    const double r = mean ? (n ? rsum / static_cast<double>(n) : kNaN) : rsum;
    if (n == 0 && mean) {
      check(std::isnan(tod(o)), t + " mean of nothing is NaN");
    } else if (std::abs(r) > max_of<T>()) {  // the true value is past T's range
      check(std::isinf(tod(o)), t + " sum past the dtype's range is inf");
    } else {
      check_close({tod(o)}, {r}, tol_of<T>(), t + (mean ? " mean" : " sum"));
    }
  }
  for (auto& v : out.buf) v = fromd<T>(kNaN);
  ok_or_die(fc::mse_backward_launch(dtype_of<T>(), x.data(), y.data(), go.data(), false, 2.0, out.data(), n, kSms,
                                    nullptr),
            "mse backward none");
  check_close(flat(out), rback, tol_of<T>(), t + " backward(none)");
  for (auto& v : out.buf) v = fromd<T>(kNaN);
  ok_or_die(fc::mse_backward_launch(dtype_of<T>(), x.data(), y.data(), &g0, true, n ? 2.0 / static_cast<double>(n) : 2.0,
                                    out.data(), n, kSms, nullptr),
            "mse backward scalar");
  check_close(flat(out), rbacks, tol_of<T>(), t + " backward(mean)");
}

// ---- sgd multi-tensor ------------------------------------------------------------------------------------
struct AnyTensor {
  DType dt;
  int64_t n;
  int misalign;
  std::vector<unsigned char> p, g, buf;  // raw storage with slack
  size_t off;
};

template <typename P>
void sgd_case(const std::vector<int64_t>& sizes, const Sgd& o, bool first, std::mt19937_64& rng, const std::string& tag,
              const fc::SgdLaunchCfg& cfg = fc::SgdLaunchCfg()) {
  std::normal_distribution<double> nd;
  std::vector<avec<P>> ps, gs, bs;
  std::vector<std::vector<double>> rps, rbs;
  std::vector<fc::SgdTensorRef> refs;
  for (size_t k = 0; k < sizes.size(); ++k) {
    const int64_t n = sizes[k];
    const size_t mis = k % 3 == 2 ? 1 : 0;  // every third tensor misaligned
    avec<P> p(static_cast<size_t>(n) + 16), g(static_cast<size_t>(n) + 16), b(static_cast<size_t>(n) + 16);
    std::vector<double> rp(static_cast<size_t>(n)), rb(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i) {
      p[mis + static_cast<size_t>(i)] = fromd<P>(nd(rng));
      g[mis + static_cast<size_t>(i)] = fromd<P>(nd(rng));
      b[mis + static_cast<size_t>(i)] = fromd<P>(first ? kNaN : nd(rng));  // first step: never read
    }
    ps.push_back(std::move(p));
    gs.push_back(std::move(g));
    bs.push_back(std::move(b));
    for (int64_t i = 0; i < n; ++i) {
      double pv = tod(ps.back()[mis + static_cast<size_t>(i)]), gv = tod(gs.back()[mis + static_cast<size_t>(i)]);
      double bv = first ? 0.0 : tod(bs.back()[mis + static_cast<size_t>(i)]);
      if (o.maximize) gv = -gv;
      if (o.wd != 0) gv += o.wd * pv;
      if (o.momentum != 0) {
        bv = first ? gv : o.momentum * bv + (1 - o.dampening) * gv;
        gv = o.nesterov ? gv + o.momentum * bv : bv;
      }
      pv -= o.lr * gv;
      rp[static_cast<size_t>(i)] = pv;
      rb[static_cast<size_t>(i)] = bv;
    }
    rps.push_back(rp);
    rbs.push_back(rb);
  }
  for (size_t k = 0; k < sizes.size(); ++k) {
    const size_t mis = k % 3 == 2 ? 1 : 0;
    fc::SgdTensorRef r;
    r.p = ps[k].data() + mis;
    r.g = gs[k].data() + mis;
    r.buf = o.momentum != 0 ? bs[k].data() + mis : nullptr;
    r.n = sizes[k];
    r.dt = dtype_of<P>();
    refs.push_back(r);
  }
  fc::SgdOpts so;
  so.lr = o.lr;
  so.momentum = o.momentum;
  so.dampening = o.dampening;
  so.weight_decay = o.wd;
  so.nesterov = o.nesterov;
  so.maximize = o.maximize;
  so.first_step = first;
  ok_or_die(fc::sgd_update_launch(refs.data(), static_cast<int>(refs.size()), so, kSms, nullptr, cfg), "sgd");
  std::vector<double> outp, outb, refp, refb;
  for (size_t k = 0; k < sizes.size(); ++k) {
    const size_t mis = k % 3 == 2 ? 1 : 0;
    for (int64_t i = 0; i < sizes[k]; ++i) {
      outp.push_back(tod(ps[k][mis + static_cast<size_t>(i)]));
      refp.push_back(rps[k][static_cast<size_t>(i)]);
      if (o.momentum != 0) {
        outb.push_back(tod(bs[k][mis + static_cast<size_t>(i)]));
        refb.push_back(rbs[k][static_cast<size_t>(i)]);
      }
    }
    // the slack around each tensor is untouched
    check(mis == 0 || tod(ps[k][0]) == tod(ps[k][0]), tag + " slack");
  }
  check_close(outp, refp, tol_of<P>(), tag + " params");
  if (o.momentum != 0) check_close(outb, refb, tol_of<P>(), tag + " buffers");
}

// ---- drivers --------------------------------------------------------------------------------------------
template <typename T, typename P>
void run_case_set(std::mt19937_64& rng, const std::vector<Shape>& shapes, bool quick) {
  const Sgd plain{0.3, 0.0, 0.0, 0.0, false, false};
  const Sgd mom{0.2, 0.9, 0.1, 0.01, false, false};
  const Sgd nest{0.2, 0.9, 0.0, 0.0, true, true};
  for (const Shape& s : shapes) {
    for (int variant = 0; variant < (quick ? 1 : 3); ++variant) {
      const bool bias = variant != 1;
      Case<T, P> c = make_case<T, P>(s, rng, bias, variant);
      const std::string tag = std::string(name_of<T>()) + "/" + name_of<P>() + " N=" + std::to_string(s.N) + " D=" +
                              std::to_string(s.D) + " O=" + std::to_string(s.O) + " v" + std::to_string(variant) +
                              (bias ? "" : " nobias");
      if constexpr (std::is_same_v<T, P>) {
        test_linear(c, tag);
        test_lmse(c, tag, variant != 2, {true, true, true, true});
        if (!quick) {
          test_lmse(c, tag, true, {false, variant == 0, false, variant == 1});
          test_linear_backward(c, tag, true, true, true);
          test_linear_backward(c, tag, variant == 0, false, true);
          test_linear_backward(c, tag, true, false, false);
        }
      }
      test_train(c, tag, variant == 0 ? plain : variant == 1 ? mom : nest, variant == 2);
      if (!quick || variant == 0) test_fit(c, tag, variant == 1 ? mom : plain, variant != 1, rng, false);
      if (!quick && variant == 0) test_fit(c, tag, plain, false, rng, true);
    }
  }
}

}  // namespace

// Sizes reach every path of sgd_range: whole chunks, the kIlp-vector main loop and its remainder,
// the element tail, empty tensors, and more tensors than one launch takes.
void run_sgd_cases(std::mt19937_64& rng) {
  const std::vector<int64_t> sizes = {1, 7, 0, 16385, 40000, 3, 8, 33};
  std::vector<int64_t> many(70, 5);  // > kSgdMaxTensors: two launches
  many[3] = 17;
  for (bool first : {true, false}) {
    sgd_case<float>(sizes, {0.1, 0.9, 0.1, 0.01, false, false}, first, rng, std::string("sgd f32 m first=") + (first ? "1" : "0"));
    sgd_case<double>(sizes, {0.1, 0.9, 0.0, 0.0, true, true}, first, rng, "sgd f64 nesterov");
    sgd_case<__nv_bfloat16>(sizes, {0.1, 0.0, 0.0, 0.0, false, false}, first, rng, "sgd bf16 plain");
    sgd_case<__half>(sizes, {0.1, 0.5, 0.0, 0.1, false, false}, first, rng, "sgd f16 m wd");
    sgd_case<float>(many, {0.1, 0.9, 0.0, 0.0, false, false}, first, rng, "sgd f32 70 tensors");
  }
  // Other launch shapes (SgdLaunchCfg): chunks of 24 and 4096 elements over one block per SM, the
  // even split over one wave (chunk 0, occupancy), and a 9-element chunk (rounded up to 16).
  const fc::SgdLaunchCfg shapes[] = {{24, 1}, {4096, 1}, {0, 0}, {9, 3}};
  for (const auto& c : shapes) {
    const std::string t = " chunk=" + std::to_string(c.chunk) + " per_sm=" + std::to_string(c.blocks_per_sm);
    sgd_case<float>(sizes, {0.1, 0.9, 0.1, 0.01, false, false}, false, rng, "sgd f32 m" + t, c);
    sgd_case<__nv_bfloat16>(sizes, {0.1, 0.5, 0.0, 0.1, true, false}, false, rng, "sgd bf16 nesterov" + t, c);
    sgd_case<float>(many, {0.1, 0.0, 0.0, 0.0, false, true}, true, rng, "sgd f32 70 tensors maximize" + t, c);
  }
}

int main(int argc, char** argv) {
  const std::string mode = argc > 1 ? argv[1] : "";
  std::mt19937_64 rng(12345);
  if (mode == "--sgd") {  // the multi-tensor SGD kernel alone
    run_sgd_cases(rng);
    std::printf("emu_test --sgd: %d checks, %d failures\n", g_checks, g_failures);
    return g_failures == 0 ? 0 : 1;
  }
  if (mode == "--smoke") {  // CI: a few seconds; every kernel family once
    const std::vector<Shape> smoke = {{7, 3, 3}, {2000, 256, 1}, {130, 64, 16}};
    run_case_set<float, float>(rng, smoke, true);
    run_case_set<__nv_bfloat16, float>(rng, {{300, 8, 1}}, true);
    for (int64_t n : {7, 1000}) test_mse<float>(n, 1, rng);
    sgd_case<__half>({5, 16385, 3}, {0.1, 0.9, 0.0, 0.01, true, false}, false, rng, "sgd f16 nesterov");
    std::printf("emu_test --smoke: %d checks, %d failures\n", g_checks, g_failures);
    return g_failures == 0 ? 0 : 1;
  }
  const bool quick = mode == "--quick";
  // Shapes: every kernel variant family (16-byte loads with L < 32 and L = 32, K = 1/2/8, element
  // loads K = 2/16), O padded (3 -> 4, 5 -> 16), O = 16, odd N and several blocks.
  const std::vector<Shape> shapes_full = {{1, 1, 1},    {7, 3, 3},     {300, 4, 1},  {130, 8, 4},    {513, 64, 5},
                                          {257, 256, 16}, {130, 257, 3}, {65, 1024, 1}, {1100, 16, 1}, {4097, 3, 1}, {2000, 256, 1}};
  const std::vector<Shape> shapes_quick = {{7, 3, 3}, {300, 4, 1}, {257, 256, 16}, {130, 257, 3}, {1100, 16, 1}, {2000, 256, 1}};
  const auto& shapes = quick ? shapes_quick : shapes_full;
  run_case_set<float, float>(rng, shapes, quick);
  run_case_set<double, double>(rng, shapes, quick);
  run_case_set<__nv_bfloat16, __nv_bfloat16>(rng, shapes, quick);
  run_case_set<__half, __half>(rng, quick ? shapes_quick : shapes_full, quick);
  run_case_set<__nv_bfloat16, float>(rng, shapes_quick, true);  // float32 parameters, bf16 data
  run_case_set<__half, float>(rng, shapes_quick, true);

  for (int64_t n : {0, 1, 7, 8, 9, 1000, 70001}) {
    for (int mis : {0, 1}) {
      test_mse<float>(n, mis, rng);
      test_mse<__nv_bfloat16>(n, mis, rng);
      if (!quick) {
        test_mse<double>(n, mis, rng);
        test_mse<__half>(n, mis, rng);
      }
    }
  }
  run_sgd_cases(rng);
  std::printf("emu_test: %d checks, %d failures\n", g_checks, g_failures);
  return g_failures == 0 ? 0 : 1;
}
