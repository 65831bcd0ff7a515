// ctest: the torch-free tuning rules of latent_attention and hadamard
// (include/qsvd/kernels/tuning_rules.h): matching, first match wins, a rule
// the plan checker refuses falls back to the default plan, and a default
// rule set reproduces the default plan.
#include <cstdio>
#include <cstring>
#include <initializer_list>

#include "check.h"
#include "qsvd/kernels/tuning_rules.h"

namespace {

using qsvd_test::g_failures;

namespace lat = qsvd::latent;
namespace qt = qsvd::tuning;

alignas(16) const unsigned char kFakeWeights[16] = {};
const float kFakeTable[4] = {};

lat::LatentAttentionParams shape(int B, int H, int H_kv, int r, int d, bool rope, qsvd::DType w) {
  lat::LatentAttentionParams p;
  p.B = B;
  p.H = H;
  p.H_kv = H_kv;
  p.r = r;
  p.d = d;
  p.bits = 8;
  p.weight_type = w;
  p.rope_cos = rope ? kFakeTable : nullptr;
  p.rope_sin = p.rope_cos;
  p.w_uk = kFakeWeights;
  return p;
}

bool same_plan(const lat::LatentAttentionParams& a, const lat::LatentAttentionParams& b) {
  return a.split_kernel == b.split_kernel && a.splits == b.splits && a.split_tokens == b.split_tokens &&
         a.tile_tokens == b.tile_tokens && a.heads_per_cta == b.heads_per_cta && a.r_slices == b.r_slices &&
         a.slice_cols == b.slice_cols && a.split_smem == b.split_smem && a.combine_heads == b.combine_heads;
}

void test_latent() {
  const int sms = 132;
  const size_t smem = 227 * 1024;
  // Default rule set (one catch-all with default knobs) == no rules, over a grid.
  const qt::LatentRule catch_all;
  for (int B : {1, 7, 64})
    for (int r : {64, 130, 512, 1024})
      for (int d : {64, 128})
        for (bool rope : {false, true})
          for (qsvd::DType w : {qsvd::DType::kF16, qsvd::DType::kI8})
            for (int64_t ctx : {int64_t{16}, int64_t{4096}}) {
              lat::LatentAttentionParams a = shape(B, 32, 8, r, d, rope, w), b = a;
              qt::LatentDecision da, db;
              const char* wa = qt::decide_latent_plan(a, ctx, sms, smem, nullptr, 0, qt::RuleSource::kTable, &da);
              const char* wb = qt::decide_latent_plan(b, ctx, sms, smem, &catch_all, 1, qt::RuleSource::kTable, &db);
              CHECK(std::strcmp(wa, wb) == 0);
              CHECK(da.source == qt::RuleSource::kDefault && da.rule == -1);
              CHECK(db.source == qt::RuleSource::kTable && db.rule == 0);
              if (wa[0] == '\0') CHECK(same_plan(a, b));
            }
  // First match wins; keys select.
  qt::LatentRule simt;
  simt.rope = 1;
  simt.b_max = 4;
  simt.choice = lat::KernelChoice::kSimt;
  simt.knobs.splits = 3;
  qt::LatentRule rules[2] = {simt, catch_all};
  {
    lat::LatentAttentionParams p = shape(2, 32, 8, 512, 128, true, qsvd::DType::kF16);
    qt::LatentDecision dec;
    CHECK(qt::decide_latent_plan(p, 4096, sms, smem, rules, 2, qt::RuleSource::kTable, &dec)[0] == '\0');
    CHECK(dec.rule == 0 && dec.source == qt::RuleSource::kTable);
    CHECK(p.split_kernel == lat::SplitKernel::kSimt && p.splits == 3);
  }
  {
    lat::LatentAttentionParams p = shape(8, 32, 8, 512, 128, true, qsvd::DType::kF16);  // B = 8 > 4
    qt::LatentDecision dec;
    CHECK(qt::decide_latent_plan(p, 4096, sms, smem, rules, 2, qt::RuleSource::kTable, &dec)[0] == '\0');
    CHECK(dec.rule == 1);
  }
  {
    lat::LatentAttentionParams p = shape(2, 32, 8, 512, 128, false, qsvd::DType::kF16);  // no RoPE
    qt::LatentDecision dec;
    CHECK(qt::decide_latent_plan(p, 4096, sms, smem, rules, 2, qt::RuleSource::kTable, &dec)[0] == '\0');
    CHECK(dec.rule == 1);
  }
  // A rule whose plan the checker refuses (tile 24 for the tensor-core kernel;
  // heads_per_cta above the group size) gives the default plan: no error.
  for (int which = 0; which < 2; ++which) {
    qt::LatentRule bad;
    if (which == 0) {
      bad.choice = lat::KernelChoice::kTensorCore;
      bad.knobs.tile_tokens = 24;
    } else {
      bad.knobs.heads_per_cta = 16;  // group size 4
    }
    lat::LatentAttentionParams p = shape(2, 32, 8, 512, 128, true, qsvd::DType::kF16), ref = p;
    qt::LatentDecision dec, dref;
    CHECK(qt::decide_latent_plan(p, 4096, sms, smem, &bad, 1, qt::RuleSource::kTable, &dec)[0] == '\0');
    CHECK(dec.source == qt::RuleSource::kFallback && dec.rule == 0 && dec.rule_refused[0] != '\0');
    CHECK(qt::decide_latent_plan(ref, 4096, sms, smem, nullptr, 0, qt::RuleSource::kTable, &dref)[0] == '\0');
    CHECK(same_plan(p, ref));
  }
  // Shared memory: a tile that fits 227 KB but not a small fake limit falls back.
  {
    qt::LatentRule big;
    big.choice = lat::KernelChoice::kTensorCore;
    big.knobs.tile_tokens = 64;
    lat::LatentAttentionParams p = shape(1, 16, 1, 2048, 128, false, qsvd::DType::kF16);
    qt::LatentDecision dec;
    qt::decide_latent_plan(p, 4096, sms, 48 * 1024, &big, 1, qt::RuleSource::kTable, &dec);
    CHECK(dec.source == qt::RuleSource::kFallback);
  }
}

void test_hadamard() {
  qt::HadamardRule rules[3];
  rules[0].k_max = 1024;
  rules[0].x_type = static_cast<int>(qsvd::DType::kF16);
  rules[0].min_elems_per_thread = 4;
  rules[1].k_min = 1025;
  rules[1].min_elems_per_thread = 8;
  rules[2].min_elems_per_thread = 0;
  const int f16 = static_cast<int>(qsvd::DType::kF16), bf16 = static_cast<int>(qsvd::DType::kBF16);
  qt::HadamardDecision d = qt::decide_hadamard(rules, 3, qt::RuleSource::kTable, 512, f16);
  CHECK(d.rule == 0 && d.min_elems_per_thread == 4 && d.source == qt::RuleSource::kTable);
  d = qt::decide_hadamard(rules, 3, qt::RuleSource::kTable, 512, bf16);
  CHECK(d.rule == 2 && d.min_elems_per_thread == 0);
  d = qt::decide_hadamard(rules, 3, qt::RuleSource::kTable, 4096, bf16);
  CHECK(d.rule == 1 && d.min_elems_per_thread == 8);
  d = qt::decide_hadamard(nullptr, 0, qt::RuleSource::kTable, 4096, bf16);
  CHECK(d.rule == -1 && d.source == qt::RuleSource::kDefault && d.min_elems_per_thread == 0);
  qt::HadamardRule bad;
  bad.min_elems_per_thread = 3;
  d = qt::decide_hadamard(&bad, 1, qt::RuleSource::kTable, 4096, bf16);
  CHECK(d.source == qt::RuleSource::kFallback && d.min_elems_per_thread == 0);
}

}  // namespace

int main() {
  test_latent();
  test_hadamard();
  if (g_failures) {
    std::fprintf(stderr, "%d failures\n", g_failures);
    return 1;
  }
  std::printf("tuning rules: ok\n");
  return 0;
}
