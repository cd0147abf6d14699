#include "coordinator/op_spec.h"

#include "common/json.h"

namespace tpc::coord {

std::string encode_op_options(const OpTxnOptions& o) {
  Json j = Json::object();
  const SagaOptions& s = o.saga;
  if (s.parallel) j["parallel"] = true;
  if (s.forward) j["forward"] = true;
  j["attempts_max"] = s.attempts_max;
  if (s.retry_min_ms > 0) j["retry_min_ms"] = s.retry_min_ms;
  if (s.retry_max_ms > 0) j["retry_max_ms"] = s.retry_max_ms;
  if (s.wait_accepted) j["wait_accepted"] = true;
  if (s.timeout_ms) j["timeout_ms"] = *s.timeout_ms;
  if (!o.reason.empty()) j["reason"] = o.reason;
  if (!o.step.empty()) j["step"] = o.step;
  if (!s.notify.empty())
    if (auto n = parse_json(s.notify); n.ok()) j["notify"] = std::move(*n);
  return dump(j);
}

Result<OpTxnOptions> decode_op_options(std::string_view text) {
  auto j = parse_object(text);
  if (!j.ok()) return Status(Code::corruption, "options: " + j.status().message());
  FieldReader r(*j);
  OpTxnOptions o;
  SagaOptions& s = o.saga;
  int64_t attempts = 0, timeout = -1;
  r.boolean("parallel", &s.parallel);
  r.boolean("forward", &s.forward);
  r.int64("attempts_max", &attempts, 0, UINT32_MAX, true);
  r.int64("retry_min_ms", &s.retry_min_ms, 0, INT64_MAX);
  r.int64("retry_max_ms", &s.retry_max_ms, 0, INT64_MAX);
  r.boolean("wait_accepted", &s.wait_accepted);
  r.int64("timeout_ms", &timeout, 1, INT64_MAX);
  r.string("reason", &o.reason, false, 64);
  r.string("step", &o.step, false, 64);
  bool has_notify = r.has("notify");
  if (Status st = r.finish(); !st.ok()) return Status(Code::corruption, "options: " + st.message());
  if (has_notify) {
    if (!(*j)["notify"].is_object()) return Status(Code::corruption, "options: notify is no op");
    s.notify = dump((*j)["notify"]);
  }
  s.attempts_max = static_cast<uint32_t>(attempts);
  if (timeout > 0) s.timeout_ms = timeout;
  return o;
}

}  // namespace tpc::coord
