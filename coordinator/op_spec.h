// The options a TCC or saga transaction keeps in its log record as JSON text: the saga's
// policy, and why it ended. Pure functions, no IO.
#pragma once

#include <string>
#include <string_view>

#include "common/status.h"
#include "coordinator/txn.h"

namespace tpc::coord {

// What a TCC or saga record keeps besides its branches: the saga's policy, and the reason and
// branch or step that decided the outcome.
struct OpTxnOptions {
  SagaOptions saga;
  std::string reason;
  std::string step;
  bool operator==(const OpTxnOptions&) const = default;
};

std::string encode_op_options(const OpTxnOptions& o);
// corruption when the text is not what encode_op_options writes.
Result<OpTxnOptions> decode_op_options(std::string_view text);

}  // namespace tpc::coord
