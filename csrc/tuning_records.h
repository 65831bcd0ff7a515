// Tuning rules as named records: one dict per rule, exactly the rule's JSON
// form in a table (qsvd_kernels/tuning/tables.py writes and validates the
// file; Rule.as_json() is what crosses). Converted and checked here, once,
// into the torch-free rule structs (qsvd/kernels/*_rules.h), which the
// launchers match on every call; dtypes travel by name and become
// qsvd::DType values here, the one numbering.
#pragma once

#include <torch/extension.h>

namespace qsvd_torch {
namespace records {

// set_quant_gemm_rules / set_latent_rules / set_hadamard_rules (install a
// device's rules) and match_rule (the index of the first rule a shape
// matches: the launchers' own matching, for the tuner and explain()).
void bind(pybind11::module& m);

}  // namespace records
}  // namespace qsvd_torch
