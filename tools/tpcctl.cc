// tpcctl: an operator's view of a coordinator or an agent. See `tpcctl --help`.
//
//   tpcctl --coordinator URL list [--state S] [--protocol P] [--limit N]
//                                                           transactions, newest first
//   tpcctl --coordinator URL notifications [--state S] [--limit N]   notifications, newest first
//   tpcctl --coordinator URL show GID                       one transaction, its branches or steps
//   tpcctl --coordinator URL in-doubt                       decided but unfinished, heuristic
//   tpcctl --coordinator URL resolve GID commit|abort       operator decision (heuristic)
//   tpcctl --coordinator URL forget GID                     clear a heuristic outcome
//   tpcctl --agent URL list|show GID|in-doubt|resolve GID commit|abort|forget GID
#include <cstdio>
#include <iostream>
#include <string>
#include <vector>

#include "common/cli.h"
#include "common/config.h"
#include "common/http_client.h"
#include "common/json.h"

extern char** environ;

namespace {

constexpr char kProgram[] = "tpcctl";

std::vector<tpc::OptionSpec> specs() {
  std::vector<tpc::OptionSpec> s = {
      {"coordinator", "URL of a coordinator", ""},
      {"agent", "URL of an agent", ""},
      {"token", "bearer token", ""},
      {"state", "list, notifications: only this state", ""},
      {"protocol", "list: only this protocol (2pc, 3pc, tcc, saga, msg)", ""},
      {"limit", "list: at most this many", "100"},
      {"timeout-ms", "request timeout", "10000"},
      {"json", "print the raw JSON answer", "", false, true},
      {"help", "print this help", "", false, true},
  };
  tpc::add_version_option(&s);
  return s;
}

std::string cell(const tpc::Json& j, const char* key) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return "-";
  if (it->is_string()) return it->get<std::string>();
  return tpc::dump(*it);
}

void print_row(const std::vector<std::string>& cells, const std::vector<size_t>& widths) {
  std::string line;
  for (size_t i = 0; i < cells.size(); ++i) {
    std::string c = cells[i];
    if (i + 1 < cells.size() && c.size() < widths[i]) c.resize(widths[i], ' ');
    line += c;
    if (i + 1 < cells.size()) line += "  ";
  }
  std::cout << line << "\n";
}

void print_table_rows(const std::vector<std::vector<std::string>>& rows) {
  std::vector<size_t> widths;
  for (auto& l : rows) {
    widths.resize(std::max(widths.size(), l.size()), 0);
    for (size_t i = 0; i < l.size(); ++i) widths[i] = std::max(widths[i], l[i].size());
  }
  for (auto& l : rows) print_row(l, widths);
}

// The branches (2PC, 3PC, TCC), steps (saga) or, for a message, its producer's "local" slot
// and its destinations, each with a "name" or "participant".
tpc::Json entries(const tpc::Json& t) {
  if (t.contains("steps")) return t["steps"];
  if (t.contains("destinations")) {
    tpc::Json out = tpc::Json::array();
    if (t.contains("local")) {
      tpc::Json local = t["local"];
      local["name"] = "local";
      out.push_back(std::move(local));
    }
    for (auto& d : t["destinations"]) out.push_back(d);
    return out;
  }
  return t.contains("branches") ? t["branches"] : tpc::Json::array();
}

void print_table(const tpc::Json& rows,
                 const std::vector<std::pair<std::string, std::string>>& cols,
                 bool branches_column) {
  std::vector<std::vector<std::string>> out;
  std::vector<std::string> head;
  for (auto& [key, title] : cols) head.push_back(title);
  if (branches_column) head.push_back("BRANCHES");
  out.push_back(head);
  for (auto& r : rows) {
    std::vector<std::string> line;
    for (auto& [key, title] : cols) line.push_back(cell(r, key.c_str()));
    if (branches_column) {
      std::string b;
      tpc::Json list = entries(r);
      if (list.is_array())
        for (auto& br : list) {
          if (!b.empty()) b += ",";
          b += cell(br, br.contains("name") ? "name" : "participant") + ":" + cell(br, "state");
          // A TCC branch or saga step still being retried says how often, and why.
          if (br.contains("last_error") && br.value("attempts", 0) > 1)
            b += "(" + cell(br, "attempts") + " attempts: " + cell(br, "last_error") + ")";
        }
      line.push_back(b.empty() ? "-" : b);
    }
    out.push_back(line);
  }
  print_table_rows(out);
}

// `show` on a coordinator: the transaction, then one line per branch (2PC, 3PC, TCC), step
// (saga) or message slot (its producer's "local", then its destinations) with its state,
// attempts and last error.
void print_transaction(const tpc::Json& t) {
  if (!t.contains("gid") && t.contains("id")) {  // a notification
    print_table_rows({{"ID", cell(t, "id")},
                      {"STATE", cell(t, "state")},
                      {"ATTEMPTS", cell(t, "attempts")},
                      {"REASON", cell(t, "reason")},
                      {"URL", cell(t, "url")},
                      {"LAST_ERROR", cell(t, "last_error")},
                      {"BODY", cell(t, "body")}});
    return;
  }
  std::vector<std::vector<std::string>> head = {{"GID", cell(t, "gid")},
                                                {"PROTOCOL", cell(t, "protocol")},
                                                {"STATE", cell(t, "state")},
                                                {"DECISION", cell(t, "decision")}};
  if (t.contains("reason")) {
    std::string why = cell(t, "reason");
    if (t.contains("step")) why += " (step " + cell(t, "step") + ")";
    if (t.contains("branch")) why += " (branch " + cell(t, "branch") + ")";
    head.push_back({"REASON", why});
  }
  if (t.contains("recovered")) head.push_back({"RECOVERED", "yes"});
  print_table_rows(head);
  std::cout << "\n";
  bool saga = t.contains("steps"), msg = t.contains("destinations");
  tpc::Json list = entries(t);
  if (!list.is_array() || list.empty()) {
    std::cout << "(no " << (saga ? "steps" : "branches") << ")\n";
    return;
  }
  bool ops = list[0].contains("name");
  std::vector<std::vector<std::string>> rows;
  rows.push_back({saga  ? "STEP"
                  : msg ? "SLOT"
                  : ops ? "BRANCH"
                        : "PARTICIPANT",
                  "STATE", "ATTEMPTS", "LAST_ERROR", ops ? "RESULT" : "URL"});
  for (auto& b : list) {
    std::string flags;
    if (b.value("forced", false)) flags += " (forced)";
    if (b.value("heuristic", false)) flags += " (heuristic)";
    rows.push_back({cell(b, ops ? "name" : "participant"), cell(b, "state") + flags,
                    cell(b, "attempts"), cell(b, "last_error"), cell(b, ops ? "result" : "url")});
  }
  print_table_rows(rows);
}

}  // namespace

int main(int argc, char** argv) {
  auto spec = specs();
  auto parsed = tpc::parse_command_line(
      kProgram,
      "tpcctl --coordinator URL | --agent URL  <list|show GID|in-doubt|resolve "
      "GID commit|abort|forget GID|notifications>",
      spec, argc, argv, true);
  if (const int* code = std::get_if<int>(&parsed)) return *code;
  const tpc::Config& c = std::get<tpc::Config>(parsed);
  bool coordinator = !c.get("coordinator").empty(), agent = !c.get("agent").empty();
  if (coordinator == agent)
    return tpc::fail(kProgram, "give exactly one of --coordinator URL or --agent URL", 2);
  auto url = tpc::parse_url(coordinator ? c.get("coordinator") : c.get("agent"));
  if (!url.ok()) return tpc::fail(kProgram, url.status().message(), 2);
  auto timeout = c.get_int("timeout-ms", 1, 3'600'000);
  if (!timeout.ok()) return tpc::fail(kProgram, timeout.status().message(), 2);
  const auto& args = c.positional();
  if (args.empty())
    return tpc::fail(
        kProgram,
        "missing command: list, show GID, in-doubt, resolve GID commit|abort, forget GID or "
        "notifications",
        2);
  const std::string& cmd = args[0];
  std::string collection = coordinator ? "transactions" : "branches";

  std::string method = "GET", target, body;
  bool notifications = coordinator && cmd == "notifications";
  if ((cmd == "list" || notifications) && args.size() == 1) {
    auto limit = c.get_int("limit", 1, 1000);
    if (!limit.ok()) return tpc::fail(kProgram, limit.status().message(), 2);
    target = "/v1/" + (notifications ? std::string("notifications") : collection) +
             "?limit=" + std::to_string(*limit);
    if (!c.get("state").empty()) target += "&state=" + c.get("state");
    if (!c.get("protocol").empty() && coordinator && !notifications)
      target += "&protocol=" + c.get("protocol");
  } else if (cmd == "show" && args.size() == 2) {
    target = "/v1/" + collection + "/" + args[1];
  } else if (cmd == "in-doubt" && args.size() == 1) {
    target = "/v1/in-doubt";
  } else if (cmd == "resolve" && args.size() == 3) {
    if (args[2] != "commit" && args[2] != "abort")
      return tpc::fail(kProgram, "resolve wants commit or abort, got \"" + args[2] + "\"", 2);
    method = "POST";
    target = "/v1/" + collection + "/" + args[1] + "/resolve";
    body = tpc::dump(tpc::Json{{"outcome", args[2]}});
  } else if (cmd == "forget" && args.size() == 2) {
    method = "POST";
    target = "/v1/" + collection + "/" + args[1] + "/forget";
    body = "{}";
  } else {
    return tpc::fail(kProgram, "unknown command or wrong arguments: \"" + cmd + "\" (see --help)",
                     2);
  }

  tpc::HttpResult res = tpc::http_call(*url, method, target, body, *timeout, c.get("token"));
  if (!res.status.ok())
    return tpc::fail(kProgram, "cannot reach " + url->to_string() + ": " + res.status.message());
  auto j = tpc::parse_json(res.body);
  if (!j.ok())
    return tpc::fail(kProgram,
                     "the answer is not JSON (HTTP " + std::to_string(res.http_status) + ")");
  bool ok = res.http_status >= 200 && res.http_status < 300;
  if (c.flag("json") || (cmd == "show" && !coordinator) || cmd == "resolve" || cmd == "forget" ||
      !ok) {
    std::cout << j->dump(2) << "\n";
  } else if (cmd == "show") {
    print_transaction(*j);
  } else if (notifications) {
    print_table((*j)["notifications"],
                {{"id", "ID"},
                 {"state", "STATE"},
                 {"attempts", "ATTEMPTS"},
                 {"reason", "REASON"},
                 {"url", "URL"},
                 {"last_error", "LAST_ERROR"}},
                false);
  } else if (coordinator) {
    const tpc::Json& rows = (*j)["transactions"];
    if (cmd == "in-doubt")
      print_table(
          rows,
          {{"gid", "GID"}, {"state", "STATE"}, {"decision", "DECISION"}, {"age_ms", "AGE_MS"}},
          true);
    else
      print_table(
          rows,
          {{"gid", "GID"}, {"protocol", "PROTOCOL"}, {"state", "STATE"}, {"reason", "REASON"}},
          true);
  } else {
    const tpc::Json& rows = (*j)["branches"];
    print_table(rows,
                {{"gid", "GID"},
                 {"state", "STATE"},
                 {"protocol", "PROTOCOL"},
                 {"age_ms", "AGE_MS"},
                 {"check", "CHECK"},
                 {"asks", "ASKS"},
                 {"coordinator_answer", "COORDINATOR"},
                 {"reason", "REASON"}},
                false);
  }
  if (!ok) {
    std::string msg = "HTTP " + std::to_string(res.http_status);
    if (j->contains("error") && (*j)["error"].is_object())
      msg += ": " + cell((*j)["error"], "message");
    return tpc::fail(kProgram, msg);
  }
  return 0;
}
