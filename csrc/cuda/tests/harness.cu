// Torch-free host harness of the fastlin CUDA launchers (built and run by .ci/compile_cuda.sh).
//
// It links against cudart and calls every launcher of kernels.h. Without a CUDA device it says so
// and exits 0 (CI has no GPU: the point there is that everything compiles and links). With a
// device it runs a small numeric self-check of each launcher against a float64 host reference and
// exits 1 on a mismatch (small enough for compute-sanitizer's memcheck and racecheck).
//   harness --bench   also times train_step (row pass + finalize) against a device-to-device copy
//                     of the same bytes: the issue's target is >= 85% of the copy bandwidth for one
//                     read of x at N = 4M, D = 256, O = 1, float32.
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include "kernels.h"

namespace fc = fastlin::cuda;

namespace {

int g_fail = 0;

#define CHECK_CUDA(expr)                                                                          \
  do {                                                                                            \
    const cudaError_t e_ = (expr);                                                                \
    if (e_ != cudaSuccess) {                                                                      \
      std::printf("CUDA error %s at %s:%d: %s\n", cudaGetErrorName(e_), __FILE__, __LINE__, #expr); \
      std::exit(1);                                                                               \
    }                                                                                             \
  } while (0)

template <typename T>
T* to_device(const std::vector<T>& h) {
  T* d = nullptr;
  CHECK_CUDA(cudaMalloc(&d, h.size() * sizeof(T) + 16));
  CHECK_CUDA(cudaMemcpy(d, h.data(), h.size() * sizeof(T), cudaMemcpyHostToDevice));
  return d;
}
template <typename T>
std::vector<T> to_host(const T* d, size_t n) {
  std::vector<T> h(n);
  CHECK_CUDA(cudaMemcpy(h.data(), d, n * sizeof(T), cudaMemcpyDeviceToHost));
  return h;
}

void expect_close(const std::vector<double>& out, const std::vector<double>& ref, double tol, const char* what) {
  double num = 0, den = 0;
  for (size_t i = 0; i < out.size(); ++i) {
    num += (out[i] - ref[i]) * (out[i] - ref[i]);
    den += ref[i] * ref[i];
  }
  const double err = std::sqrt(num / (den > 0 ? den : 1));
  const bool ok = err <= tol && !std::isnan(err);
  std::printf("  %-28s rel err %.2e (tol %.0e) %s\n", what, err, tol, ok ? "ok" : "FAIL");
  if (!ok) ++g_fail;
}

// train_step (row pass + finalize, float32, O = 2) against a float64 host reference.
void check_train_step(int num_sms) {
  const int N = 3001, D = 256, O = 2;
  std::mt19937 rng(7);
  std::normal_distribution<float> nd;
  std::vector<float> x(static_cast<size_t>(N) * D), y(static_cast<size_t>(N) * O), w(O * D), b(O);
  for (auto& v : x) v = nd(rng);
  for (auto& v : y) v = nd(rng);
  for (auto& v : w) v = nd(rng) * 0.06f;
  for (auto& v : b) v = nd(rng);
  const double lr = 0.1;
  // reference
  std::vector<double> gw(O * D, 0.0), gb(O, 0.0);
  double lsum = 0;
  for (int i = 0; i < N; ++i)
    for (int o = 0; o < O; ++o) {
      double p = b[o];
      for (int d = 0; d < D; ++d) p += static_cast<double>(x[static_cast<size_t>(i) * D + d]) * w[o * D + d];
      const double r = p - y[static_cast<size_t>(i) * O + o];
      lsum += r * r;
      gb[o] += r;
      for (int d = 0; d < D; ++d) gw[o * D + d] += r * x[static_cast<size_t>(i) * D + d];
    }
  const double denom = static_cast<double>(O) * N;
  std::vector<double> rw(O * D), rb(O);
  for (int k = 0; k < O * D; ++k) rw[k] = w[k] - lr * 2.0 / denom * gw[k];
  for (int k = 0; k < O; ++k) rb[k] = b[k] - lr * 2.0 / denom * gb[k];

  float *dx = to_device(x), *dy = to_device(y), *dw = to_device(w), *db = to_device(b);
  const fc::RowPassPlan plan = fc::rowpass_plan(fc::DType::F32, true, O, D, N, num_sms);
  if (!plan.ok) {
    std::printf("  train_step: no plan (%s) FAIL\n", plan.why);
    ++g_fail;
    return;
  }
  const int64_t E = static_cast<int64_t>(O) * D + O;
  float* part = nullptr;
  double* part_s = nullptr;
  float* loss = nullptr;
  CHECK_CUDA(cudaMalloc(&part, sizeof(float) * plan.G * E));
  CHECK_CUDA(cudaMalloc(&part_s, sizeof(double) * plan.G * 2));
  CHECK_CUDA(cudaMalloc(&loss, sizeof(float)));
  fc::RowPassArgs a;
  a.nrows = N;
  a.O = O;
  a.D = D;
  a.x = dx;
  a.ldx = D;
  a.y = dy;
  a.ys0 = O;
  a.ys1 = 1;
  a.w = dw;
  a.ws0 = D;
  a.ws1 = 1;
  a.b = db;
  a.bs0 = 1;
  a.param_f32 = 1;
  a.acc_w = a.acc_b = a.acc_loss = 1;
  a.part = part;
  a.part_s = part_s;
  CHECK_CUDA(fc::rowpass_launch(fc::DType::F32, plan, a, nullptr));
  fc::FinalizeArgs f;
  f.mode = fc::kFinUpdate;
  f.pt = fc::DType::F32;
  f.part = part;
  f.part_s = part_s;
  f.G = plan.G;
  f.O = O;
  f.D = D;
  f.need_totals = 1;
  f.w = dw;
  f.ws0 = D;
  f.ws1 = 1;
  f.b = db;
  f.bs0 = 1;
  f.opt.lr = lr;
  f.loss_out = loss;
  CHECK_CUDA(fc::finalize_launch(f, nullptr));
  CHECK_CUDA(cudaDeviceSynchronize());
  const auto hw = to_host(dw, O * D), hb = to_host(db, O), hl = to_host(loss, 1);
  expect_close(std::vector<double>(hw.begin(), hw.end()), rw, 1e-5, "train_step weight");
  expect_close(std::vector<double>(hb.begin(), hb.end()), rb, 1e-5, "train_step bias");
  expect_close({hl[0]}, {lsum / denom}, 1e-5, "train_step loss");
  for (void* p : {static_cast<void*>(dx), static_cast<void*>(dy), static_cast<void*>(dw), static_cast<void*>(db),
                  static_cast<void*>(part), static_cast<void*>(part_s), static_cast<void*>(loss)})
    CHECK_CUDA(cudaFree(p));
}

void check_mse(int num_sms) {
  const int64_t n = 100003;
  std::mt19937 rng(3);
  std::normal_distribution<float> nd;
  std::vector<float> x(n), y(n);
  for (auto& v : x) v = nd(rng);
  for (auto& v : y) v = nd(rng);
  double s = 0;
  std::vector<double> rnone(n), rback(n);
  for (int64_t i = 0; i < n; ++i) {
    const double d = static_cast<double>(x[i]) - y[i];
    s += d * d;
    rnone[i] = d * d;
    rback[i] = d * 0.5 * (2.0 / n);
  }
  float *dx = to_device(x), *dy = to_device(y), *dout = nullptr, *dl = nullptr, *dgo = to_device(std::vector<float>{0.5f});
  double* parts = nullptr;
  CHECK_CUDA(cudaMalloc(&dout, sizeof(float) * n));
  CHECK_CUDA(cudaMalloc(&dl, sizeof(float)));
  CHECK_CUDA(cudaMalloc(&parts, sizeof(double) * (fc::mse_reduce_blocks(n, num_sms) + 1)));
  CHECK_CUDA(fc::mse_none_launch(fc::DType::F32, dx, dy, dout, n, num_sms, nullptr));
  auto h = to_host(dout, n);
  expect_close(std::vector<double>(h.begin(), h.end()), rnone, 1e-6, "mse_loss none");
  CHECK_CUDA(fc::mse_reduce_launch(fc::DType::F32, dx, dy, n, parts, dl, true, num_sms, nullptr));
  expect_close({to_host(dl, 1)[0]}, {s / n}, 1e-6, "mse_loss mean");
  CHECK_CUDA(fc::mse_backward_launch(fc::DType::F32, dx, dy, dgo, true, 2.0 / n, dout, n, num_sms, nullptr));
  h = to_host(dout, n);
  expect_close(std::vector<double>(h.begin(), h.end()), rback, 1e-6, "mse_loss_backward mean");
  for (void* p : {static_cast<void*>(dx), static_cast<void*>(dy), static_cast<void*>(dout), static_cast<void*>(dl),
                  static_cast<void*>(dgo), static_cast<void*>(parts)})
    CHECK_CUDA(cudaFree(p));
}

void check_sgd(int num_sms) {
  const int64_t sizes[3] = {5, 70001, 1};
  std::vector<float*> dp, dg, db;
  std::vector<std::vector<double>> refs;
  std::vector<fc::SgdTensorRef> list;
  std::mt19937 rng(11);
  std::normal_distribution<float> nd;
  for (int64_t n : sizes) {
    std::vector<float> p(n), g(n), b(n);
    std::vector<double> r(n);
    for (int64_t i = 0; i < n; ++i) {
      p[i] = nd(rng);
      g[i] = nd(rng);
      b[i] = nd(rng);
      const double gg = g[i] + 0.01 * p[i];
      const double bb = 0.9 * b[i] + gg;
      r[i] = p[i] - 0.1 * bb;
    }
    dp.push_back(to_device(p));
    dg.push_back(to_device(g));
    db.push_back(to_device(b));
    refs.push_back(r);
    fc::SgdTensorRef t;
    t.p = dp.back();
    t.g = dg.back();
    t.buf = db.back();
    t.n = n;
    t.dt = fc::DType::F32;
    list.push_back(t);
  }
  fc::SgdOpts o;
  o.lr = 0.1;
  o.momentum = 0.9;
  o.weight_decay = 0.01;
  CHECK_CUDA(fc::sgd_update_launch(list.data(), static_cast<int>(list.size()), o, num_sms, nullptr));
  std::vector<double> out, ref;
  for (size_t k = 0; k < list.size(); ++k) {
    const auto h = to_host(dp[k], static_cast<size_t>(sizes[k]));
    out.insert(out.end(), h.begin(), h.end());
    ref.insert(ref.end(), refs[k].begin(), refs[k].end());
    CHECK_CUDA(cudaFree(dp[k]));
    CHECK_CUDA(cudaFree(dg[k]));
    CHECK_CUDA(cudaFree(db[k]));
  }
  expect_close(out, ref, 1e-6, "sgd_update_ (3 tensors)");
}

// ---- --bench ------------------------------------------------------------------------------------
__global__ void fill_kernel(float* p, int64_t n, uint32_t seed, float scale) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    uint32_t h = static_cast<uint32_t>(i) * 2654435761u ^ seed;
    h ^= h >> 15;
    h *= 2246822519u;
    h ^= h >> 13;
    p[i] = scale * (static_cast<float>(h & 0xffffff) / 16777216.0f - 0.5f);
  }
}

float median(std::vector<float> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

// Median ms of `reps` runs of fn (after 2 warm-ups), timed with events on the default stream.
template <typename F>
float time_ms(F fn, int reps) {
  cudaEvent_t a, b;
  CHECK_CUDA(cudaEventCreate(&a));
  CHECK_CUDA(cudaEventCreate(&b));
  for (int i = 0; i < 2; ++i) fn();
  std::vector<float> t;
  for (int i = 0; i < reps; ++i) {
    CHECK_CUDA(cudaEventRecord(a));
    fn();
    CHECK_CUDA(cudaEventRecord(b));
    CHECK_CUDA(cudaEventSynchronize(b));
    float ms = 0;
    CHECK_CUDA(cudaEventElapsedTime(&ms, a, b));
    t.push_back(ms);
  }
  CHECK_CUDA(cudaEventDestroy(a));
  CHECK_CUDA(cudaEventDestroy(b));
  return median(t);
}

void bench_train_step(int num_sms, int64_t N, int D, int O) {
  const int64_t nx = N * D;
  float *x = nullptr, *y = nullptr, *w = nullptr, *b = nullptr, *copy = nullptr, *loss = nullptr, *part = nullptr;
  double* part_s = nullptr;
  CHECK_CUDA(cudaMalloc(&x, sizeof(float) * nx));
  CHECK_CUDA(cudaMalloc(&copy, sizeof(float) * nx));
  CHECK_CUDA(cudaMalloc(&y, sizeof(float) * N * O));
  CHECK_CUDA(cudaMalloc(&w, sizeof(float) * O * D));
  CHECK_CUDA(cudaMalloc(&b, sizeof(float) * O));
  CHECK_CUDA(cudaMalloc(&loss, sizeof(float)));
  fill_kernel<<<1024, 256>>>(x, nx, 1u, 2.0f);
  fill_kernel<<<1024, 256>>>(y, N * O, 2u, 2.0f);
  fill_kernel<<<64, 256>>>(w, static_cast<int64_t>(O) * D, 3u, 0.1f);
  fill_kernel<<<1, 256>>>(b, O, 4u, 1.0f);
  CHECK_CUDA(cudaGetLastError());
  const fc::RowPassPlan plan = fc::rowpass_plan(fc::DType::F32, true, O, D, N, num_sms);
  if (!plan.ok) {
    std::printf("  bench: no plan (%s)\n", plan.why);
    return;
  }
  const int64_t E = static_cast<int64_t>(O) * D + O;
  CHECK_CUDA(cudaMalloc(&part, sizeof(float) * plan.G * E));
  CHECK_CUDA(cudaMalloc(&part_s, sizeof(double) * plan.G * 2));
  fc::RowPassArgs a;
  a.nrows = N;
  a.O = O;
  a.D = D;
  a.x = x;
  a.ldx = D;
  a.y = y;
  a.ys0 = O;
  a.ys1 = 1;
  a.w = w;
  a.ws0 = D;
  a.ws1 = 1;
  a.b = b;
  a.bs0 = 1;
  a.param_f32 = 1;
  a.acc_w = a.acc_b = a.acc_loss = 1;
  a.part = part;
  a.part_s = part_s;
  fc::FinalizeArgs f;
  f.mode = fc::kFinUpdate;
  f.pt = fc::DType::F32;
  f.part = part;
  f.part_s = part_s;
  f.G = plan.G;
  f.O = O;
  f.D = D;
  f.need_totals = 1;
  f.w = w;
  f.ws0 = D;
  f.ws1 = 1;
  f.b = b;
  f.bs0 = 1;
  f.opt.lr = 1e-4;
  f.loss_out = loss;
  const int reps = N >= (1 << 22) ? 10 : 30;
  const float t_step = time_ms([&] {
    CHECK_CUDA(fc::rowpass_launch(fc::DType::F32, plan, a, nullptr));
    CHECK_CUDA(fc::finalize_launch(f, nullptr));
  }, reps);
  const float t_pass = time_ms([&] { CHECK_CUDA(fc::rowpass_launch(fc::DType::F32, plan, a, nullptr)); }, reps);
  const double bytes = static_cast<double>(sizeof(float)) * nx;
  const float t_copy = time_ms([&] { CHECK_CUDA(cudaMemcpyAsync(copy, x, bytes, cudaMemcpyDeviceToDevice)); }, reps);
  const double copy_bw = 2.0 * bytes / (t_copy * 1e-3);  // bytes read + written per second
  const double step_bw = bytes / (t_step * 1e-3);        // bytes of x read per second
  std::printf("  train_step f32 N=%lld D=%d O=%d: %.3f ms (row pass %.3f ms, G=%d, L=%d kc=%d rb=%d); "
              "copy %.3f ms = %.0f GB/s; one read of x at copy bandwidth: %.3f ms; step reads x at %.0f GB/s = "
              "%.0f%% of copy bandwidth\n",
              static_cast<long long>(N), D, O, t_step, t_pass, plan.G, plan.L, plan.kc, plan.rb, t_copy,
              copy_bw / 1e9, bytes / copy_bw * 1e3, step_bw / 1e9, 100.0 * step_bw / copy_bw);
  for (void* p : {static_cast<void*>(x), static_cast<void*>(copy), static_cast<void*>(y), static_cast<void*>(w),
                  static_cast<void*>(b), static_cast<void*>(loss), static_cast<void*>(part),
                  static_cast<void*>(part_s)})
    CHECK_CUDA(cudaFree(p));
}

}  // namespace

int main(int argc, char** argv) {
  const bool bench = argc > 1 && std::strcmp(argv[1], "--bench") == 0;
  int count = 0;
  const cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess || count == 0) {
    std::printf("harness: no CUDA device (%s); the launchers compiled and linked, nothing to run\n",
                err != cudaSuccess ? cudaGetErrorString(err) : "0 devices");
    return 0;
  }
  int sms = 0;
  CHECK_CUDA(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
  std::printf("harness: device 0, %d SMs\n", sms);
  check_train_step(sms);
  check_mse(sms);
  check_sgd(sms);
  std::printf("harness: %s\n", g_fail ? "FAILED" : "all ok");
  if (bench && !g_fail) {
    bench_train_step(sms, int64_t(1) << 22, 256, 1);   // the issue's target shape (4 GiB of x)
    bench_train_step(sms, int64_t(1) << 22, 256, 16);
    bench_train_step(sms, 262144, 256, 1);             // the CPU bench's shapes
    bench_train_step(sms, 262144, 256, 16);
    bench_train_step(sms, 1048576, 64, 1);
  }
  return g_fail ? 1 : 0;
}
