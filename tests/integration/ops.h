// Helpers of the integration tests of ops (docs/DESIGN.md §8-§10): two banks behind their
// agents, a real tpc-http-participant with its wallet "w", ops to both, and the checks every
// case ends with.
#pragma once

#include <doctest/doctest.h>

#include <optional>
#include <string>
#include <vector>

#include "tests/integration/testbed.h"

namespace tpc::testing {

// The participant's only account, "w", and what it holds at the start.
inline constexpr int64_t kWallet = 500;

// Fresh banks (with accounts.frozen) and the participant, its wallet filled; barrier rows are
// purged every 200 ms.
inline Testbed& bed(Testbed::Options o = {}) {
  o.http_participant = true;
  o.frozen = true;
  o.agent_args.insert(o.agent_args.end(), {"--purge-interval-ms", "200"});
  Testbed& t = Testbed::fresh(o);
  Http r = t.http_participant("POST", "/accounts", dump(Json{{"w", kWallet}}));
  REQUIRE_MESSAGE(r.status == 200, r.describe());
  return t;
}

inline Json stmt(const std::string& sql, Json params, std::optional<int64_t> expect_rows = {}) {
  Json s = {{"sql", sql}, {"params", std::move(params)}};
  if (expect_rows) s["expect_rows"] = *expect_rows;
  return s;
}

inline Json sql_op(int bank, Json statements) {
  return {{"participant", Testbed::agent_name(bank)}, {"statements", std::move(statements)}};
}

inline Json http_op(Testbed& t, const std::string& path, Json body) {
  return {{"url", t.http_participant_url().to_string() + path}, {"body", std::move(body)}};
}

inline void set_faults(Testbed& t, Json rules) {
  Http r = t.http_participant("POST", "/control/faults", dump(Json{{"rules", std::move(rules)}}));
  REQUIRE_MESSAGE(r.status == 200, r.describe());
}

// The participant's call log of gid: [{"seq","path","branch","op","attempt","status",...}].
inline Json calls(Testbed& t, const std::string& gid) {
  Http r = t.http_participant("GET", "/calls?gid=" + gid);
  REQUIRE_MESSAGE(r.status == 200, r.describe());
  return r.body["calls"];
}

// "branch/op" of each call, in arrival order.
inline std::vector<std::string> call_order(const Json& log) {
  std::vector<std::string> out;
  for (auto& c : log)
    out.push_back(c["branch"].get<std::string>() + "/" + c["op"].get<std::string>());
  return out;
}

inline Json wallet(Testbed& t) {
  Http r = t.http_participant("GET", "/accounts");
  REQUIRE_MESSAGE(r.status == 200, r.describe());
  return r.body["accounts"]["w"];
}

// tpc_agent_steps_total{outcome} of bank's agent.
inline double steps_metric(Testbed& t, int bank, const std::string& outcome) {
  Http m = t.agent(bank, "GET", "/metrics");
  std::string key = "tpc_agent_steps_total{outcome=\"" + outcome + "\"} ";
  size_t at = m.raw.find(key);
  REQUIRE_MESSAGE(at != std::string::npos, key << " missing from /metrics");
  return std::stod(m.raw.substr(at + key.size()));
}

inline void crashed(Testbed& t, const Http& request) {
  CHECK_FALSE_MESSAGE(request.transport.ok(), request.describe());  // it died under the request
  REQUIRE(t.coordinator_process().wait(10'000) >= 0);
}

// Every case ends here, once its transactions have finished: nothing prepared, the money of
// both banks and the participant all there, nothing frozen anywhere, and the barrier rows
// purged by the agents once the coordinator reported the transactions finished.
inline void check_all(Testbed& t) {
  INFO(t.logs());
  bool clean = eventually([&] { return t.prepared(0) == 0 && t.prepared(1) == 0; }, 20'000);
  CHECK_MESSAGE(clean, "prepared transactions left behind");
  Json w = wallet(t);
  CHECK(t.total() + w["balance"].get<int64_t>() == Testbed::kTotal + kWallet);
  CHECK(w["frozen"] == 0);
  for (int i = 0; i < 2; ++i) {
    auto v = query_value(t.conninfo(i), "SELECT sum(frozen) FROM accounts");
    REQUIRE(v.ok());
    CHECK_MESSAGE(v->value() == "0", "bank " << i << " has money frozen");
  }
  bool purged =
      eventually([&] { return t.barrier_rows(0) == 0 && t.barrier_rows(1) == 0; }, 20'000);
  CHECK_MESSAGE(purged, "barrier rows left: bank a " << t.barrier_rows(0) << ", bank b "
                                                     << t.barrier_rows(1));
}

// The one transaction the coordinator knows (for a saga whose run request died with it).
inline std::string only_gid(Testbed& t) {
  Http r = t.coord("GET", "/v1/transactions?limit=10");
  REQUIRE_MESSAGE(r.status == 200, r.describe());
  REQUIRE_MESSAGE(r.body["transactions"].size() == 1, r.describe());
  return r.body["transactions"][0]["gid"].get<std::string>();
}

// tpcctl against the coordinator; its exit code, its output into *out.
inline int ctl(Testbed& t, std::vector<std::string> args, std::string* out) {
  std::vector<std::string> argv = {bin_dir() + "/tpcctl", "--coordinator",
                                   t.coordinator_url().to_string()};
  argv.insert(argv.end(), args.begin(), args.end());
  auto code = run_to_exit(argv, out);
  REQUIRE_MESSAGE(code.ok(), code.status().to_string());
  return *code;
}

// Whether the coordinator lists gid in /v1/in-doubt.
inline bool listed_in_doubt(Testbed& t, const std::string& gid) {
  Http d = t.coord("GET", "/v1/in-doubt");
  for (auto& v : d.body["transactions"])
    if (v["gid"] == gid) return true;
  return false;
}

// A saga step adding `delta` to the participant's `account`.
inline Json http_step(Testbed& t, const std::string& name, const std::string& account,
                      int64_t delta, bool compensate = true) {
  Json body = {{"account", account}, {"delta", delta}};
  Json s = {{"name", name}, {"action", http_op(t, "/saga/action", body)}};
  if (compensate) s["compensate"] = http_op(t, "/saga/compensate", body);
  return s;
}

}  // namespace tpc::testing
