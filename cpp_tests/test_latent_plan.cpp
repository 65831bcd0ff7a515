// latent_attention's plan object replays exactly: for every shape, device
// (SM count, shared memory) and knob set the planner serves, replaying the
// plan from its own choices (replay_latent_plan, what latent_attention does
// with a plan tensor) gives every field back, and an edited plan is refused.
// Plain C++: the CUDA plans are checked on any machine.
#include <cstdio>
#include <cstring>

#include "check.h"
#include "qsvd/kernels/latent_attention_plan.h"

namespace lat = qsvd::latent;

namespace {

// rope: 0 none, 1 K rebuilt (tables), 2 K's first d / 4 dims cached (rope_keys).
lat::LatentAttentionParams sized(int B, int H, int H_kv, int r, int d, int rope, qsvd::DType weight) {
  static const float table[4] = {};
  alignas(16) static const unsigned char weights[16] = {};
  lat::LatentAttentionParams p;
  p.rope_cos = rope == 1 ? table : nullptr;
  p.rope_sin = p.rope_cos;
  p.rope_keys = rope == 2 ? weights : nullptr;
  p.d_rope = rope == 2 ? d / 4 : 0;
  p.w_uk = weights;
  p.B = B, p.H = H, p.H_kv = H_kv, p.r = r, p.d = d, p.bits = 8, p.weight_type = weight;
  return p;
}

}  // namespace

int main() {
  struct Heads { int H, H_kv; };
  const Heads heads[] = {{8, 8}, {32, 8}, {14, 2}, {9, 3}, {64, 1}};
  const int batches[] = {1, 4, 33};
  const int ranks[] = {64, 200, 960, 1536, 4000, 8192};
  const int dims[] = {64, 128, 80};
  const int64_t capacities[] = {17, 1000, 4096, 33000};
  const int sms[] = {1, 132};
  const size_t smems[] = {48 * 1024, 101376, 232448};
  const qsvd::DType weights[] = {qsvd::DType::kF16, qsvd::DType::kI8};
  const lat::LatentPlanKnobs knob_sets[] = {{0, 0, 0, 2}, {3, 0, 0, 2}, {0, 16, 0, 2}, {0, 0, 2, 2}, {0, 0, 0, 4}};
  int planned = 0, replayed = 0;
  for (const Heads& hh : heads)
    for (int B : batches)
      for (int r : ranks)
        for (int d : dims)
          for (int rope = 0; rope < 3; ++rope)
            for (qsvd::DType w : weights)
              for (int64_t cap : capacities)
                for (int sm : sms)
                  for (size_t smem : smems)
                    for (const lat::LatentPlanKnobs& k : knob_sets)
                      for (int kernel = 1; kernel <= 2; ++kernel) {
                        lat::LatentAttentionParams p = sized(B, hh.H, hh.H_kv, r, d, rope, w);
                        if (lat::plan_latent_attention_auto(p, cap, sm, smem, k,
                                                            static_cast<lat::KernelChoice>(kernel))[0] != '\0')
                          continue;
                        ++planned;
                        lat::LatentAttentionParams q = sized(B, hh.H, hh.H_kv, r, d, rope, w);
                        const char* why = lat::replay_latent_plan(q, p, cap, smem);
                        CHECK(rope != 2 || p.split_kernel == lat::SplitKernel::kSimt,
                              "a plan with cached rotary keys chose the tensor-core kernel");
                        CHECK(why[0] == '\0', "B=%d H=%d H_kv=%d r=%d d=%d rope=%d cap=%lld sm=%d smem=%zu: %s", B,
                              hh.H, hh.H_kv, r, d, rope, static_cast<long long>(cap), sm, smem, why);
                        replayed += why[0] == '\0';
                        // An edited plan never reaches a kernel.
                        lat::LatentAttentionParams edited = p;
                        edited.split_tokens += edited.tile_tokens;
                        lat::LatentAttentionParams e = sized(B, hh.H, hh.H_kv, r, d, rope, w);
                        CHECK(lat::replay_latent_plan(e, edited, cap, smem)[0] != '\0', "edited split_tokens passed");
                        edited = p;
                        edited.splits = 0;
                        e = sized(B, hh.H, hh.H_kv, r, d, rope, w);
                        CHECK(lat::replay_latent_plan(e, edited, cap, smem)[0] != '\0', "splits = 0 passed");
                      }
  CHECK(planned > 10000, "only %d plans were made: the sweep lost its coverage", planned);
  char detail[96];
  std::snprintf(detail, sizeof detail, " (%d plans replayed of %d)", replayed, planned);
  return qsvd_test::report("latent_plan", detail);
}
