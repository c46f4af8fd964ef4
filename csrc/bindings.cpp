// pybind11 bindings of the row pass: tensor checks, then the CUDA launchers (when built
// with -DGRPO_WITH_CUDA and the tensors are on a CUDA device; the stream comes from
// Python as an integer) or the C++ CPU implementation.
//
// Outputs are passed in (preallocated by grpo_kernels/backends/cuda.py), so that the
// caller chooses where they live; every output element is written by the kernels.
#include <torch/extension.h>

#include <optional>
#include <stdexcept>
#include <string>
#include <tuple>

#include "row_pass.h"

namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

int dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return grpo::kF32;
    case at::kDouble:
      return grpo::kF64;
    case at::kHalf:
      return grpo::kF16;
    case at::kBFloat16:
      return grpo::kBF16;
    default:
      TORCH_CHECK(false, "grpo_kernels: logits dtype must be float32, float64, float16 or bfloat16, got ", t);
  }
  return -1;
}

at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

bool built_with_cuda() {
#ifdef GRPO_WITH_CUDA
  return true;
#else
  return false;
#endif
}

void check_device_supported(const Tensor& t, const char* what) {
  if (t.is_cpu()) return;
#ifdef GRPO_WITH_CUDA
  if (t.is_cuda()) return;
  TORCH_CHECK(false, "grpo_kernels ", what, ": tensors must be on the CPU or a CUDA device, got ", t.device());
#else
  TORCH_CHECK(false, "grpo_kernels ", what, ": this build of the extension has no CUDA support (tensor on ",
              t.device(), "); it runs on CPU tensors only");
#endif
}

// A [n] vector in dtype `dt` on `dev`, contiguous.
void check_vec(const Tensor& t, const char* name, int64_t n, at::ScalarType dt, const at::Device& dev,
               const char* what) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == n, "grpo_kernels ", what, ": ", name, " must have shape [", n, "], got ",
              t.sizes());
  TORCH_CHECK(t.scalar_type() == dt, "grpo_kernels ", what, ": ", name, " must be ", dt, ", got ", t.scalar_type());
  TORCH_CHECK(t.device() == dev, "grpo_kernels ", what, ": ", name, " is on ", t.device(), ", expected ", dev);
  TORCH_CHECK(t.is_contiguous(), "grpo_kernels ", what, ": ", name, " must be contiguous");
}

const void* opt_ptr(const OptTensor& t, const char* name, int64_t n, at::ScalarType dt, const at::Device& dev,
                    const char* what) {
  if (!t.has_value() || !t->defined()) return nullptr;
  check_vec(*t, name, n, dt, dev, what);
  return t->data_ptr();
}

grpo::RowArgs row_args(const Tensor& logits, const Tensor& targets, double temperature, std::optional<double> softcap,
                       const char* what) {
  check_device_supported(logits, what);
  TORCH_CHECK(logits.dim() == 2, "grpo_kernels ", what, ": logits must be 2-D [n, V], got ", logits.sizes());
  const int64_t n = logits.size(0), V = logits.size(1);
  TORCH_CHECK(V <= 1 || logits.stride(1) == 1, "grpo_kernels ", what, ": logits rows must be contiguous (stride(1) == 1)");
  TORCH_CHECK(n <= 1 || logits.stride(0) >= V, "grpo_kernels ", what, ": logits rows overlap (stride(0) < V)");
  check_vec(targets, "targets", n, at::kLong, logits.device(), what);
  TORCH_CHECK(temperature > 0.0 && std::isfinite(temperature), "grpo_kernels ", what,
              ": temperature must be finite and > 0, got ", temperature);
  if (softcap.has_value()) {
    TORCH_CHECK(*softcap > 0.0 && std::isfinite(*softcap), "grpo_kernels ", what,
                ": softcap must be finite and > 0, got ", *softcap);
  }
  grpo::RowArgs r;
  r.logits = logits.data_ptr();
  r.targets = targets.data_ptr<int64_t>();
  r.n = n;
  r.V = V;
  r.ld = n <= 1 ? V : logits.stride(0);
  r.temperature = temperature;
  r.softcap = softcap.has_value() ? *softcap : 0.0;
  r.dtype = dtype_code(logits.scalar_type());
  return r;
}

grpo::EpilogueOptions epilogue_options(int64_t kind, double lo, double hi, std::optional<double> delta,
                                       double eps_high, double sapo_pos, double sapo_neg, double beta,
                                       bool bias_correction_kl) {
  TORCH_CHECK(kind == grpo::kClipped || kind == grpo::kCispo || kind == grpo::kSapo,
              "grpo_kernels: unknown loss kind ", kind);
  grpo::EpilogueOptions o;
  o.kind = (int)kind;
  o.lo = lo;
  o.hi = hi;
  o.has_delta = delta.has_value() ? 1 : 0;
  o.delta = delta.has_value() ? *delta : 0.0;
  o.eps_high = eps_high;
  o.sapo_pos = (float)sapo_pos;
  o.sapo_neg = (float)sapo_neg;
  o.beta = beta;
  o.bias_correction_kl = bias_correction_kl ? 1 : 0;
  return o;
}

grpo::TokenArgs token_args(int64_t n, at::ScalarType acc, const at::Device& dev, const OptTensor& old,
                           const OptTensor& adv, const Tensor& weight, const OptTensor& ref,
                           const OptTensor& policy_scale, double beta, bool has_rewards, const char* what) {
  grpo::TokenArgs t;
  t.old = opt_ptr(old, "old", n, acc, dev, what);
  t.adv = opt_ptr(adv, "adv", n, acc, dev, what);
  TORCH_CHECK(t.adv != nullptr || has_rewards || n == 0, "grpo_kernels ", what,
              ": adv is required without rewards");
  check_vec(weight, "weight", n, acc, dev, what);
  t.weight = weight.data_ptr();
  t.ref = opt_ptr(ref, "ref", n, acc, dev, what);
  // (an empty chunk's ref has no data pointer: there is nothing to read)
  TORCH_CHECK(beta == 0.0 || t.ref != nullptr || n == 0, "grpo_kernels ", what, ": ref is required when beta != 0");
  t.policy_scale = opt_ptr(policy_scale, "policy_scale", n, acc, dev, what);
  return t;
}

grpo::StatsOut stats_out(const Tensor& lse, const Tensor& entropy, const Tensor& target_logit, int64_t n,
                         at::ScalarType acc, const at::Device& dev, const char* what) {
  check_vec(lse, "lse", n, acc, dev, what);
  check_vec(entropy, "entropy", n, acc, dev, what);
  check_vec(target_logit, "target_logit", n, acc, dev, what);
  return grpo::StatsOut{lse.data_ptr(), entropy.data_ptr(), target_logit.data_ptr()};
}

#ifdef GRPO_WITH_CUDA
void check_cuda(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "grpo_kernels ", what, ": CUDA error: ", cudaGetErrorString(err));
}
cudaStream_t as_stream(int64_t stream) { return reinterpret_cast<cudaStream_t>(static_cast<intptr_t>(stream)); }
#endif

// The device emulation runs the CUDA kernels' order on the host: CPU tensors only.
void check_emulation(const Tensor& t, bool emulate_device, const char* what) {
  TORCH_CHECK(!emulate_device || t.is_cpu(), "grpo_kernels ", what,
              ": emulate_device=True runs on CPU tensors only, got a tensor on ", t.device());
}

template <class F>
void run_cpu(F&& f, const char* what) {
  try {
    f();
  } catch (const std::invalid_argument& e) {
    TORCH_CHECK(false, e.what());
  }
}

void row_stats(const Tensor& logits, const Tensor& targets, const Tensor& lse, const Tensor& entropy,
               const Tensor& target_logit, double temperature, std::optional<double> softcap, int64_t stream,
               bool need_entropy, bool emulate_device) {
  const char* what = "row_stats";
  grpo::RowStatsParams p;
  p.row = row_args(logits, targets, temperature, softcap, what);
  p.need_entropy = need_entropy ? 1 : 0;
  const auto acc = acc_type(logits.scalar_type());
  p.out = stats_out(lse, entropy, target_logit, p.row.n, acc, logits.device(), what);
  check_emulation(logits, emulate_device, what);
#ifdef GRPO_WITH_CUDA
  if (logits.is_cuda()) return check_cuda(grpo::row_stats_cuda(p, logits.get_device(), as_stream(stream)), what);
#endif
  (void)stream;
  run_cpu([&] { grpo::row_stats_cpu(p, emulate_device); }, what);
}

void row_grad_(const Tensor& logits, const Tensor& targets, const Tensor& lse, const Tensor& entropy,
               const Tensor& dlogp, const OptTensor& dentropy, double temperature, std::optional<double> softcap,
               int64_t stream, bool emulate_device) {
  const char* what = "row_grad_";
  grpo::RowGradParams p;
  p.row = row_args(logits, targets, temperature, softcap, what);
  const auto acc = acc_type(logits.scalar_type());
  const auto dev = logits.device();
  check_vec(lse, "lse", p.row.n, acc, dev, what);
  check_vec(entropy, "entropy", p.row.n, acc, dev, what);
  check_vec(dlogp, "dlogp", p.row.n, acc, dev, what);
  p.lse = lse.data_ptr();
  p.entropy = entropy.data_ptr();
  p.dlogp = dlogp.data_ptr();
  p.dentropy = opt_ptr(dentropy, "dentropy", p.row.n, acc, dev, what);
  check_emulation(logits, emulate_device, what);
#ifdef GRPO_WITH_CUDA
  if (logits.is_cuda()) return check_cuda(grpo::row_grad_cuda(p, logits.get_device(), as_stream(stream)), what);
#endif
  (void)stream;
  run_cpu([&] { grpo::row_grad_cpu(p, emulate_device); }, what);
}

// One head of the divergence: [n, V] logits with contiguous rows, its transform checked.
grpo::DivHead div_head(const Tensor& z, const char* name, double scale, std::optional<double> softcap,
                       double temperature, const char* what) {
  TORCH_CHECK(z.dim() == 2, "grpo_kernels ", what, ": ", name, " must be 2-D [n, V], got ", z.sizes());
  TORCH_CHECK(z.size(1) <= 1 || z.stride(1) == 1, "grpo_kernels ", what, ": ", name,
              " rows must be contiguous (stride(1) == 1)");
  TORCH_CHECK(z.size(0) <= 1 || z.stride(0) >= z.size(1), "grpo_kernels ", what, ": ", name,
              " rows overlap (stride(0) < V)");
  TORCH_CHECK(std::isfinite(scale), "grpo_kernels ", what, ": ", name, " scale must be finite, got ", scale);
  TORCH_CHECK(temperature > 0.0 && std::isfinite(temperature), "grpo_kernels ", what, ": ", name,
              " temperature must be finite and > 0, got ", temperature);
  if (softcap.has_value()) {
    TORCH_CHECK(*softcap > 0.0 && std::isfinite(*softcap), "grpo_kernels ", what, ": ", name,
                " softcap must be finite and > 0, got ", *softcap);
  }
  return grpo::DivHead{z.data_ptr(), z.size(0) <= 1 ? z.size(1) : z.stride(0), dtype_code(z.scalar_type()), scale,
                       softcap.has_value() ? *softcap : 0.0, temperature};
}

// The divergence rows (grpo_kernels/divergence.py): div and entropy [n] in the student's
// accumulation dtype; with coef ([] or [n], that dtype) coef * dD/dz_s into out (none: over zs).
void divergence_rows_(const Tensor& zs, const Tensor& zt, const Tensor& div, const Tensor& entropy,
                      const OptTensor& coef, const OptTensor& out, double student_scale,
                      std::optional<double> student_softcap, double student_temperature, double teacher_scale,
                      std::optional<double> teacher_softcap, double teacher_temperature, double beta,
                      int64_t stream, bool emulate_device) {
  const char* what = "divergence_rows_";
  check_device_supported(zs, what);
  grpo::DivergenceParams p{};
  p.student = div_head(zs, "zs", student_scale, student_softcap, student_temperature, what);
  p.teacher = div_head(zt, "zt", teacher_scale, teacher_softcap, teacher_temperature, what);
  TORCH_CHECK(zt.sizes() == zs.sizes(), "grpo_kernels ", what, ": zt must have the shape of zs ", zs.sizes(),
              ", got ", zt.sizes());
  TORCH_CHECK(zt.device() == zs.device(), "grpo_kernels ", what, ": zt is on ", zt.device(), ", zs on ", zs.device());
  TORCH_CHECK(beta >= 0.0 && beta <= 1.0, "grpo_kernels ", what, ": beta must be in [0, 1], got ", beta);
  p.n = zs.size(0);
  p.V = zs.size(1);
  p.beta = beta;
  const auto acc = acc_type(zs.scalar_type());
  const auto dev = zs.device();
  check_vec(div, "div", p.n, acc, dev, what);
  check_vec(entropy, "entropy", p.n, acc, dev, what);
  p.div = div.data_ptr();
  p.entropy = entropy.data_ptr();
  if (coef.has_value() && coef->defined()) {
    const bool per_row = coef->dim() == 1;
    TORCH_CHECK(coef->dim() == 0 || per_row, "grpo_kernels ", what, ": coef must be [] or [n], got ", coef->sizes());
    if (per_row) check_vec(*coef, "coef", p.n, acc, dev, what);
    TORCH_CHECK(coef->scalar_type() == acc && coef->device() == dev, "grpo_kernels ", what, ": coef must be ", acc,
                " on ", dev);
    p.coef = coef->data_ptr();
    p.coef_per_row = per_row ? 1 : 0;
    const Tensor& o = (out.has_value() && out->defined()) ? *out : zs;
    const grpo::DivHead oh = div_head(o, "out", 1.0, std::nullopt, 1.0, what);
    TORCH_CHECK(o.sizes() == zs.sizes() && o.scalar_type() == zs.scalar_type() && o.device() == dev,
                "grpo_kernels ", what, ": out must be ", zs.scalar_type(), " ", zs.sizes(), " on ", dev);
    p.out = o.data_ptr();
    p.ld_out = oh.ld;
  }
  check_emulation(zs, emulate_device, what);
#ifdef GRPO_WITH_CUDA
  if (zs.is_cuda()) return check_cuda(grpo::divergence_rows_cuda(p, zs.get_device(), as_stream(stream)), what);
#endif
  (void)stream;
  run_cpu([&] { grpo::divergence_rows_cpu(p, emulate_device); }, what);
}

// B rows in groups of num_generations, and a known scale mode (row_pass.h's ScaleMode)
void check_groups(int64_t B, int64_t num_generations, int64_t mode, const char* what) {
  TORCH_CHECK(num_generations > 0 && B % num_generations == 0, "grpo_kernels ", what, ": batch size ", B,
              " is not a multiple of num_generations=", num_generations);
  TORCH_CHECK(mode == grpo::kScaleGroup || mode == grpo::kScaleBatch || mode == grpo::kScaleNone,
              "grpo_kernels ", what, ": unknown scale mode ", mode);
}

// The rewards of the fused epilogue: rewards [B, K] (contiguous), weights [K], seq [n] int64 (values
// in [0, B), checked by the caller), adv_out [n]; all in the accumulation dtype but seq.
grpo::RewardArgs reward_args(const OptTensor& rewards, const OptTensor& weights, const OptTensor& seq,
                             const OptTensor& adv_out, int64_t n, int64_t num_generations, int64_t mode,
                             double eps, at::ScalarType acc, const at::Device& dev, void** adv_ptr,
                             const char* what) {
  grpo::RewardArgs ra{};
  *adv_ptr = nullptr;
  if (!rewards.has_value() || !rewards->defined()) return ra;
  const Tensor& r = *rewards;
  TORCH_CHECK(r.dim() == 2 && r.is_contiguous(), "grpo_kernels ", what, ": rewards must be a contiguous [B, K], got ",
              r.sizes());
  TORCH_CHECK(r.scalar_type() == acc && r.device() == dev, "grpo_kernels ", what, ": rewards must be ", acc,
              " on ", dev);
  const int64_t B = r.size(0), K = r.size(1);
  check_groups(B, num_generations, mode, what);
  TORCH_CHECK(weights.has_value() && weights->defined(), "grpo_kernels ", what, ": reward_weights are required");
  check_vec(*weights, "reward_weights", K, acc, dev, what);
  TORCH_CHECK(seq.has_value() && seq->defined(), "grpo_kernels ", what, ": seq is required with rewards");
  check_vec(*seq, "seq", n, at::kLong, dev, what);
  TORCH_CHECK(adv_out.has_value() && adv_out->defined(), "grpo_kernels ", what, ": adv_out is required");
  check_vec(*adv_out, "adv_out", n, acc, dev, what);
  ra.rewards = r.data_ptr();
  ra.weights = weights->data_ptr();
  ra.seq = seq->data_ptr<int64_t>();
  ra.B = B;
  ra.K = K;
  ra.G = num_generations;
  ra.mode = (int)mode;
  ra.eps = eps;
  *adv_ptr = adv_out->data_ptr();
  return ra;
}

void row_fused_(const Tensor& logits, const Tensor& targets, const OptTensor& old, const OptTensor& adv,
                const Tensor& weight, const OptTensor& ref, const OptTensor& policy_scale, const Tensor& lse,
                const Tensor& entropy, const Tensor& target_logit, const Tensor& loss, const Tensor& dlogp,
                double temperature, std::optional<double> softcap, int64_t kind, double lo, double hi,
                std::optional<double> delta, double eps_high, double sapo_pos, double sapo_neg, double beta,
                bool bias_correction_kl, int64_t stream, const OptTensor& rewards, const OptTensor& reward_weights,
                const OptTensor& seq, const OptTensor& adv_out, int64_t num_generations, int64_t scale_mode,
                double reward_eps, bool emulate_device) {
  const char* what = "row_fused_";
  grpo::RowFusedParams p;
  p.row = row_args(logits, targets, temperature, softcap, what);
  const auto acc = acc_type(logits.scalar_type());
  const auto dev = logits.device();
  const int64_t n = p.row.n;
  p.out = stats_out(lse, entropy, target_logit, n, acc, dev, what);
  p.rew = reward_args(rewards, reward_weights, seq, adv_out, n, num_generations, scale_mode, reward_eps, acc, dev,
                      &p.adv_out, what);
  p.tok = token_args(n, acc, dev, old, adv, weight, ref, policy_scale, beta, p.rew.rewards != nullptr, what);
  p.opt = epilogue_options(kind, lo, hi, delta, eps_high, sapo_pos, sapo_neg, beta, bias_correction_kl);
  check_vec(loss, "loss", n, acc, dev, what);
  check_vec(dlogp, "dlogp", n, acc, dev, what);
  p.loss = loss.data_ptr();
  p.dlogp = dlogp.data_ptr();
  check_emulation(logits, emulate_device, what);
#ifdef GRPO_WITH_CUDA
  if (logits.is_cuda()) return check_cuda(grpo::row_fused_cuda(p, logits.get_device(), as_stream(stream)), what);
#endif
  (void)stream;
  run_cpu([&] { grpo::row_fused_cpu(p, emulate_device); }, what);
}

void group_normalize(const Tensor& rewards, const Tensor& out, int64_t num_generations, int64_t mode, double eps,
                     int64_t stream, bool emulate_device) {
  const char* what = "group_normalize";
  check_device_supported(rewards, what);
  const auto dt = rewards.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble, "grpo_kernels ", what,
              ": rewards must be float32 or float64, got ", dt);
  TORCH_CHECK(rewards.dim() == 1, "grpo_kernels ", what, ": rewards must be 1-D, got ", rewards.sizes());
  const int64_t B = rewards.size(0);
  check_groups(B, num_generations, mode, what);
  check_vec(rewards, "rewards", B, dt, rewards.device(), what);
  check_vec(out, "out", B, dt, rewards.device(), what);
  grpo::GroupNormParams p;
  p.B = B;
  p.G = num_generations;
  p.mode = (int)mode;
  p.eps = eps;
  p.dtype = dtype_code(dt);
  p.rewards = rewards.data_ptr();
  p.out = out.data_ptr();
  check_emulation(rewards, emulate_device, what);
#ifdef GRPO_WITH_CUDA
  if (rewards.is_cuda()) return check_cuda(grpo::group_normalize_cuda(p, rewards.get_device(), as_stream(stream)), what);
#endif
  (void)stream;
  run_cpu([&] { grpo::group_normalize_cpu(p, emulate_device); }, what);
}

// The CUDA row kernels' threads per row (row_pass.h's row_threads), which the device emulation
// uses as its lane count; dtype is a row_pass.h DType code.
int64_t device_row_threads(int64_t V, int64_t dtype) {
  TORCH_CHECK(V >= 0, "grpo_kernels row_threads: V must be >= 0, got ", V);
  TORCH_CHECK(dtype >= grpo::kF32 && dtype <= grpo::kBF16, "grpo_kernels row_threads: unknown dtype code ", dtype);
  return grpo::row_threads(V, (int)dtype);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  m.doc() = "grpo_kernels compiled row pass (C++/OpenMP for CPU tensors, CUDA kernels when built with CUDA)";
  m.def("has_cuda", &built_with_cuda, "True when this build has the CUDA kernels");
  m.def("row_threads", &device_row_threads, "the CUDA row kernels' threads per row for V and a dtype code",
        py::arg("V"), py::arg("dtype"));
  m.def("row_stats", &row_stats, "per-row lse, entropy and target logit into the given [n] outputs",
        py::arg("logits"), py::arg("targets"), py::arg("lse"), py::arg("entropy"), py::arg("target_logit"),
        py::arg("temperature"), py::arg("softcap"), py::arg("stream") = 0, py::arg("need_entropy") = true,
        py::arg("emulate_device") = false);
  m.def("row_grad_", &row_grad_, "in-place gradient of the logits", py::arg("logits"), py::arg("targets"),
        py::arg("lse"), py::arg("entropy"), py::arg("dlogp"), py::arg("dentropy"), py::arg("temperature"),
        py::arg("softcap"), py::arg("stream") = 0, py::arg("emulate_device") = false);
  m.def("row_fused_", &row_fused_, "stats + GRPO token epilogue + in-place gradient, one sweep",
        py::arg("logits"), py::arg("targets"), py::arg("old"), py::arg("adv"), py::arg("weight"), py::arg("ref"),
        py::arg("policy_scale"), py::arg("lse"), py::arg("entropy"), py::arg("target_logit"), py::arg("loss"),
        py::arg("dlogp"), py::arg("temperature"), py::arg("softcap"), py::arg("kind"), py::arg("lo"), py::arg("hi"),
        py::arg("delta"), py::arg("eps_high"), py::arg("sapo_pos"), py::arg("sapo_neg"), py::arg("beta"),
        py::arg("bias_correction_kl"), py::arg("stream") = 0, py::arg("rewards") = py::none(),
        py::arg("reward_weights") = py::none(), py::arg("seq") = py::none(), py::arg("adv_out") = py::none(),
        py::arg("num_generations") = 1, py::arg("scale_mode") = 0, py::arg("reward_eps") = 1e-4,
        py::arg("emulate_device") = false);
  m.def("divergence_rows_", &divergence_rows_,
        "per-row divergence and student entropy; with coef, coef * dD/dz_s into out (None: over zs)",
        py::arg("zs"), py::arg("zt"), py::arg("div"), py::arg("entropy"), py::arg("coef"), py::arg("out"),
        py::arg("student_scale"), py::arg("student_softcap"), py::arg("student_temperature"),
        py::arg("teacher_scale"), py::arg("teacher_softcap"), py::arg("teacher_temperature"), py::arg("beta"),
        py::arg("stream") = 0, py::arg("emulate_device") = false);
  m.def("group_normalize", &group_normalize, "group-normalized advantages into out", py::arg("rewards"),
        py::arg("out"), py::arg("num_generations"), py::arg("mode"), py::arg("eps"), py::arg("stream") = 0,
        py::arg("emulate_device") = false);
}
