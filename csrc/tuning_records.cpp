// Named tuning records -> the torch-free rule structs (tuning_records.h).
#include "tuning_records.h"

#include <set>
#include <string>
#include <vector>

#include "qsvd/formats.h"
#include "qsvd/kernels/quant_gemm_menu.h"
#include "qsvd/kernels/quant_gemm_rules.h"
#include "qsvd/kernels/tuning_rules.h"
#include "tuning.h"

namespace qsvd_torch {
namespace records {
namespace {

namespace py = pybind11;
namespace qt = qsvd::tuning;
namespace qg = qsvd::gemm;
namespace lat = qsvd::latent;

constexpr int64_t kUnbounded = qt::kUnbounded;

void check_keys(const py::dict& d, const std::set<std::string>& allowed, const char* what) {
  for (const auto& item : d) {
    const std::string key = py::str(item.first);
    TORCH_CHECK(allowed.count(key) != 0, what, " rule: unknown key '", key, "'");
  }
}

bool has(const py::dict& d, const char* key) { return d.contains(key) && !d[key].is_none(); }

// [lo, hi] with hi None = unbounded; absent = [1, unbounded].
void range(const py::dict& d, const char* key, int64_t* lo, int64_t* hi, const char* what) {
  *lo = 1;
  *hi = kUnbounded;
  if (!has(d, key)) return;
  const py::list v = d[key].cast<py::list>();
  TORCH_CHECK(v.size() == 2, what, " rule: '", key, "' is [lo, hi]");
  *lo = v[0].cast<int64_t>();
  *hi = v[1].is_none() ? kUnbounded : v[1].cast<int64_t>();
  TORCH_CHECK(*lo >= 1 && *lo <= *hi, what, " rule: '", key, "' must be 1 <= lo <= hi, got [", *lo, ", ", *hi, "]");
}

// A dtype name -> qsvd::DType value; None/absent -> -1 (any).
int dtype_of(const py::dict& d, const char* key, std::initializer_list<const char*> allowed, const char* what) {
  if (!has(d, key)) return -1;
  const std::string n = d[key].cast<std::string>();
  bool ok = false;
  for (const char* a : allowed) ok |= n == a;
  TORCH_CHECK(ok, what, " rule: '", key, "' '", n, "' is not one this rule takes");
  if (n == "f16") return static_cast<int>(qsvd::DType::kF16);
  if (n == "bf16") return static_cast<int>(qsvd::DType::kBF16);
  if (n == "int8" || n == "i8") return static_cast<int>(qsvd::DType::kI8);
  return static_cast<int>(qsvd::DType::kF32);
}

template <class E>
E name_of(const py::dict& d, const char* key, std::initializer_list<std::pair<const char*, E>> names, E dflt,
          const char* what) {
  if (!has(d, key)) return dflt;
  const std::string n = d[key].cast<std::string>();
  for (const auto& [name, value] : names)
    if (n == name) return value;
  TORCH_CHECK(false, what, " rule: bad '", key, "' '", n, "'");
  return dflt;
}

int int_of(const py::dict& d, const char* key, int dflt) { return has(d, key) ? d[key].cast<int>() : dflt; }

qg::GemmRule gemm_rule(const py::dict& d) {
  const char* what = "quant_gemm";
  check_keys(d, {"m", "n", "k", "bits", "config", "streamk_mode", "splits", "raster", "note"}, what);
  qg::GemmRule r;
  range(d, "m", &r.m_min, &r.m_max, what);
  range(d, "n", &r.n_min, &r.n_max, what);
  range(d, "k", &r.k_min, &r.k_max, what);
  if (has(d, "bits")) {
    const py::list b = d["bits"].cast<py::list>();
    TORCH_CHECK(b.size() == 2, what, " rule: 'bits' is [a_bits, b_bits]");
    r.a_bits = b[0].cast<int>();
    r.b_bits = b[1].cast<int>();
  }
  TORCH_CHECK(has(d, "config"), what, " rule: 'config' is required");
  const std::string config = d["config"].cast<std::string>();
  TORCH_CHECK(qg::find_config(config.c_str(), &r.choice.config), what, " rule: no config named '", config, "'");
  r.choice.mode = name_of<qg::StreamKMode>(d, "streamk_mode",
                                           {{"heuristic", qg::StreamKMode::kHeuristic},
                                            {"data_parallel", qg::StreamKMode::kDataParallel},
                                            {"split_k", qg::StreamKMode::kSplitK}},
                                           qg::StreamKMode::kHeuristic, what);
  r.choice.splits = int_of(d, "splits", 1);
  r.choice.raster = name_of<qg::Raster>(
      d, "raster",
      {{"heuristic", qg::Raster::kHeuristic}, {"along_m", qg::Raster::kAlongM}, {"along_n", qg::Raster::kAlongN}},
      qg::Raster::kHeuristic, what);
  TORCH_CHECK(qg::valid_knobs(r.choice.mode, r.choice.splits, r.choice.raster), what,
              " rule: bad knobs (split_k takes splits 2..", qg::kMaxSplits, ", other modes splits 1)");
  return r;
}

qt::LatentRule latent_rule(const py::dict& d) {
  const char* what = "latent_attention";
  check_keys(d, {"rope", "weight_dtype", "bits", "r", "d", "group", "b", "ctx", "kernel", "splits", "tile_tokens",
                 "heads_per_cta", "ctas_per_sm", "note"},
             what);
  qt::LatentRule r;
  r.rope = has(d, "rope") ? (d["rope"].cast<bool>() ? 1 : 0) : -1;
  r.weight_type = dtype_of(d, "weight_dtype", {"f16", "bf16", "int8", "i8"}, what);
  r.bits = int_of(d, "bits", 0);
  TORCH_CHECK(r.bits == 0 || r.bits == 4 || r.bits == 8, what, " rule: 'bits' is 4 or 8");
  range(d, "r", &r.r_min, &r.r_max, what);
  range(d, "d", &r.d_min, &r.d_max, what);
  range(d, "group", &r.g_min, &r.g_max, what);
  range(d, "b", &r.b_min, &r.b_max, what);
  range(d, "ctx", &r.ctx_min, &r.ctx_max, what);
  r.choice = name_of<lat::KernelChoice>(
      d, "kernel",
      {{"auto", lat::KernelChoice::kAuto}, {"simt", lat::KernelChoice::kSimt}, {"tc", lat::KernelChoice::kTensorCore}},
      lat::KernelChoice::kAuto, what);
  r.knobs.splits = int_of(d, "splits", 0);
  r.knobs.tile_tokens = int_of(d, "tile_tokens", 0);
  r.knobs.heads_per_cta = int_of(d, "heads_per_cta", 0);
  r.knobs.ctas_per_sm = int_of(d, "ctas_per_sm", 2);
  TORCH_CHECK(r.knobs.splits >= 0 && r.knobs.splits <= lat::kMaxSplits && r.knobs.tile_tokens >= 0 &&
                  r.knobs.heads_per_cta >= 0 && r.knobs.ctas_per_sm >= 1 && r.knobs.ctas_per_sm <= 64,
              what, " rule: plan knobs out of range");
  return r;
}

qt::HadamardRule hadamard_rule(const py::dict& d) {
  const char* what = "hadamard";
  check_keys(d, {"k", "dtype", "elems_per_thread", "note"}, what);
  qt::HadamardRule r;
  range(d, "k", &r.k_min, &r.k_max, what);
  r.x_type = dtype_of(d, "dtype", {"f16", "bf16", "f32"}, what);
  r.min_elems_per_thread = int_of(d, "elems_per_thread", 0);
  TORCH_CHECK(qt::valid_elems_per_thread(r.min_elems_per_thread), what,
              " rule: elems_per_thread is 0, 1, 2, 4, 8 or 32");
  return r;
}

template <class R, class F>
std::vector<R> convert(const std::vector<py::dict>& records, F f) {
  std::vector<R> out;
  out.reserve(records.size());
  for (const py::dict& d : records) out.push_back(f(d));
  return out;
}

void check_device(int64_t device) {
  TORCH_CHECK(device >= kTuningAllDevices && device < kTuningMaxDevices, "bad device ", device);
}

int match_rule(const std::string& op, const std::vector<py::dict>& records, const py::dict& shape) {
  auto get = [&](const char* key) -> int64_t {
    TORCH_CHECK(shape.contains(key), "match_rule(", op, "): the shape lacks '", key, "'");
    return shape[key].cast<int64_t>();
  };
  if (op == "quant_gemm") {
    const auto rules = convert<qg::GemmRule>(records, gemm_rule);
    for (size_t i = 0; i < rules.size(); ++i)
      if (qg::rule_matches(rules[i], get("M"), get("N"), get("K"), static_cast<int>(get("a_bits")),
                           static_cast<int>(get("b_bits"))))
        return static_cast<int>(i);
    return -1;
  }
  if (op == "latent_attention") {
    const auto rules = convert<qt::LatentRule>(records, latent_rule);
    qt::LatentKey k;
    k.rope = shape.contains("rope") ? shape["rope"].cast<bool>() : true;
    py::dict wd;
    wd["weight_dtype"] = shape.contains("weight_dtype") ? shape["weight_dtype"] : py::str("f16");
    k.weight_type = dtype_of(wd, "weight_dtype", {"f16", "bf16", "int8", "i8"}, "latent_attention shape");
    k.bits = shape.contains("bits") ? shape["bits"].cast<int>() : 8;
    k.r = get("r");
    k.d = get("d");
    const int64_t H = get("H"), H_kv = get("H_kv");
    k.group = H_kv > 0 ? H / H_kv : 0;
    k.B = get("B");
    k.ctx = get("token_capacity");
    for (size_t i = 0; i < rules.size(); ++i)
      if (qt::latent_rule_matches(rules[i], k)) return static_cast<int>(i);
    return -1;
  }
  if (op == "hadamard") {
    const auto rules = convert<qt::HadamardRule>(records, hadamard_rule);
    py::dict dt;
    dt["dtype"] = shape.contains("dtype") ? shape["dtype"] : py::str("f16");
    const int x_type = dtype_of(dt, "dtype", {"f16", "bf16", "f32"}, "hadamard shape");
    for (size_t i = 0; i < rules.size(); ++i)
      if (qt::hadamard_rule_matches(rules[i], get("K"), x_type)) return static_cast<int>(i);
    return -1;
  }
  TORCH_CHECK(false, "match_rule: op is quant_gemm, latent_attention or hadamard, got '", op, "'");
  return -1;
}

}  // namespace

void bind(py::module& m) {
  m.def(
      "set_quant_gemm_rules",
      [](int64_t device, const std::vector<py::dict>& rules, const std::string& source, const std::string& label) {
        TORCH_CHECK(source == "table" || source == "forced", "source must be 'table' or 'forced'");
        check_device(device);
        set_gemm_rules(static_cast<int>(device), convert<qg::GemmRule>(rules, gemm_rule),
                       source == "forced" ? qg::ChoiceSource::kForced : qg::ChoiceSource::kTable, label);
      },
      "Installs quant_gemm rules (named records: a table's JSON rules) on a device (-1: all); [] removes them.",
      py::arg("device"), py::arg("rules"), py::arg("source"), py::arg("label"));
  m.def(
      "set_latent_rules",
      [](int64_t device, const std::vector<py::dict>& rules, const std::string& label) {
        check_device(device);
        set_latent_rules(static_cast<int>(device), convert<qt::LatentRule>(rules, latent_rule), label);
      },
      "Installs latent_attention rules (named records) on a device (-1: all); [] removes them.", py::arg("device"),
      py::arg("rules"), py::arg("label"));
  m.def(
      "set_hadamard_rules",
      [](int64_t device, const std::vector<py::dict>& rules, const std::string& label) {
        check_device(device);
        set_hadamard_rules(static_cast<int>(device), convert<qt::HadamardRule>(rules, hadamard_rule), label);
      },
      "Installs hadamard rules (named records) on a device (-1: all); [] removes them.", py::arg("device"),
      py::arg("rules"), py::arg("label"));
  m.def("match_rule", &match_rule,
        "The index of the first of `rules` (named records) that a shape matches, by the launchers' own matching, "
        "or -1. quant_gemm: M, N, K, a_bits, b_bits; latent_attention: B, H, H_kv, r, d, bits, rope, "
        "weight_dtype, token_capacity; hadamard: K, dtype.",
        py::arg("op"), py::arg("rules"), py::arg("shape"));
}

}  // namespace records
}  // namespace qsvd_torch
