// Unit tests of the agent's JSON codecs: exec/prepare/commit/resolve bodies (valid and
// refused), results, replies, branch views, and the coordinator's answers.
#include <doctest/doctest.h>

#include "participant/codec.h"

using namespace tpc;
using namespace tpc::agent;

TEST_CASE("exec bodies: one statement or a list, params of every allowed type") {
  ExecLimits lim;
  auto one = decode_exec(R"({"sql":"SELECT $1, $2, $3, $4, $5","params":["x'; DROP TABLE t;--",5,1.5,true,null]})", lim);
  REQUIRE(one.ok());
  REQUIRE(one->statements.size() == 1);
  auto& p = one->statements[0].params;
  REQUIRE(p.size() == 5);
  CHECK(*p[0] == "x'; DROP TABLE t;--");
  CHECK(*p[1] == "5");
  CHECK(*p[2] == "1.5");
  CHECK(*p[3] == "true");
  CHECK_FALSE(p[4].has_value());
  CHECK_FALSE(one->prepare);

  auto many = decode_exec(R"({"statements":[{"sql":"A"},{"sql":"B","params":[1]}],"prepare":true,"protocol":"3pc"})", lim);
  REQUIRE(many.ok());
  CHECK(many->statements.size() == 2);
  CHECK(many->prepare);
  CHECK(many->protocol == Protocol::three_phase);
}

TEST_CASE("exec bodies that are refused") {
  ExecLimits lim;
  lim.statements_max = 2;
  lim.params_max = 2;
  for (const char* bad : {R"({})", R"({"sql":""})", R"({"sql":5})", R"({"sql":"A","statements":[]})",
                          R"({"statements":[]})", R"({"statements":[1]})",
                          R"({"statements":[{"sql":"A"},{"sql":"B"},{"sql":"C"}]})",
                          R"({"sql":"A","params":[1,2,3]})", R"({"sql":"A","params":[[1]]})",
                          R"({"sql":"A","params":[{"a":1}]})", R"({"sql":"A","params":"x"})",
                          R"({"sql":"A","prepare":"yes"})", R"({"sql":"A","protocol":"9pc"})", "{\"sql\":",
                          R"({"sql":"A\u0000B"})"}) {
    CAPTURE(bad);
    auto r = decode_exec(bad, lim);
    CHECK_FALSE(r.ok());
    CHECK((r.status().code() == Code::invalid_argument || r.status().code() == Code::too_large));
  }
}

TEST_CASE("prepare, commit and resolve bodies") {
  CHECK(decode_prepare("")->protocol == Protocol::two_phase);
  CHECK(decode_prepare(R"({"protocol":"3pc"})")->protocol == Protocol::three_phase);
  CHECK_FALSE(decode_prepare(R"({"protocol":3})").ok());
  CHECK_FALSE(decode_commit("")->one_phase);
  CHECK(decode_commit(R"({"one_phase":true})")->one_phase);
  CHECK_FALSE(decode_commit(R"({"one_phase":1})").ok());
  CHECK(decode_resolve(R"({"outcome":"commit"})")->commit);
  CHECK_FALSE(decode_resolve(R"({"outcome":"abort"})")->commit);
  CHECK_FALSE(decode_resolve(R"({"outcome":"x"})").ok());
}

TEST_CASE("results are text values with NULL as null") {
  pg::StatementResult r;
  r.columns = {"id", "note"};
  r.rows = {{std::string("1"), std::nullopt}};
  r.affected = 1;
  r.command_tag = "SELECT 1";
  Json j = encode_results({r});
  CHECK(j[0]["columns"] == Json::array({"id", "note"}));
  CHECK(j[0]["rows"][0][0] == "1");
  CHECK(j[0]["rows"][0][1].is_null());
  CHECK(j[0]["affected"] == 1);
}

TEST_CASE("replies: votes, states, 409 outcomes and SQL errors") {
  Reply vote;
  vote.kind = RequestKind::prepare;
  vote.state = BranchState::aborted;
  vote.vote = pg::Vote::no;
  vote.reason = "insert violates foreign key";
  vote.sqlstate = "23503";
  auto resp = encode_reply(vote);
  CHECK(resp.status == 200);
  auto j = *parse_json(resp.body);
  CHECK(j["vote"] == "no");
  CHECK(j["sqlstate"] == "23503");

  Reply c;
  c.kind = RequestKind::commit;
  c.contrary = true;
  c.state = BranchState::aborted;
  auto cr = encode_reply(c);
  CHECK(cr.status == 409);
  auto cj = *parse_json(cr.body);
  CHECK(cj["state"] == "aborted");
  CHECK(cj["error"]["code"] == "conflict");

  Reply sql;
  sql.kind = RequestKind::exec;
  sql.error = Status(Code::sql_error, "duplicate key");
  sql.sqlstate = "23505";
  sql.state = BranchState::failed;
  auto sr = encode_reply(sql);
  CHECK(sr.status == 422);
  auto sj = *parse_json(sr.body);
  CHECK(sj["error"]["code"] == "sql_error");
  CHECK(sj["error"]["sqlstate"] == "23505");
  CHECK(sj["state"] == "active");

  Reply busy;
  busy.kind = RequestKind::exec;
  busy.error = unavailable("too many open branches");
  auto br = encode_reply(busy);
  CHECK(br.status == 503);
  CHECK(br.header("retry-after") == "1");
}

TEST_CASE("the coordinator's answers: enlistment and outcome") {
  int64_t expires = 0;
  CHECK(decode_enlist_answer(201, R"({"gid":"c1-1-1","expires_in_ms":1234})", ok_status(), &expires).ok());
  CHECK(expires == 1234);
  CHECK(decode_enlist_answer(409, R"({"error":{"code":"conflict","message":"not active"}})", ok_status(), &expires).code() == Code::conflict);
  CHECK(decode_enlist_answer(404, "{}", ok_status(), &expires).code() == Code::not_found);
  CHECK(decode_enlist_answer(503, "{}", ok_status(), &expires).code() == Code::unavailable);
  CHECK(decode_enlist_answer(0, "", unavailable("refused"), &expires).code() == Code::unavailable);

  std::string a;
  CHECK(decode_outcome_answer(200, R"({"state":"committing","decision":"commit"})", ok_status(), &a) == Outcome::commit);
  CHECK(decode_outcome_answer(200, R"({"state":"aborted","presumed":true,"decision":"abort"})", ok_status(), &a) == Outcome::abort);
  CHECK(decode_outcome_answer(200, R"({"state":"preparing"})", ok_status(), &a) == Outcome::pending);
  CHECK(decode_outcome_answer(200, R"({"state":"unknown","forgotten":true})", ok_status(), &a) == Outcome::unknown);
  CHECK(decode_outcome_answer(200, R"({"state":5})", ok_status(), &a) == Outcome::unknown);
  CHECK(decode_outcome_answer(404, "{}", ok_status(), &a) == Outcome::unknown);
  CHECK(decode_outcome_answer(503, "{}", ok_status(), &a) == Outcome::unreachable);
  CHECK(decode_outcome_answer(0, "", timeout_error("deadline"), &a) == Outcome::unreachable);
}

TEST_CASE("exec bodies from the coordinator: enlisted, with prepare or with a one-phase commit") {
  ExecLimits lim;
  auto c = decode_exec(R"({"enlisted":true,"commit":true,"statements":[{"sql":"UPDATE t SET v = 1"}]})", lim);
  REQUIRE(c.ok());
  CHECK(c->enlisted);
  CHECK(c->one_phase);
  auto p = decode_exec(R"({"enlisted":true,"prepare":true,"protocol":"3pc","peers":[{"participant":"a1","url":"http://h:1"}],"statements":[{"sql":"x"}]})", lim);
  REQUIRE(p.ok());
  CHECK(p->prepare);
  CHECK(p->protocol == Protocol::three_phase);
  REQUIRE(p->peers.size() == 1);
  CHECK_FALSE(decode_exec(R"({"prepare":true,"commit":true,"sql":"x"})", lim).ok());
  CHECK_FALSE(decode_exec(R"({"sql":"x","peers":[{"participant":"a b","url":"http://h:1"}]})", lim).ok());
  CHECK_FALSE(decode_exec(R"({"sql":"x","peers":[{"participant":"a1","url":"nope"}]})", lim).ok());
}

TEST_CASE("exec params keep the digits the client sent") {
  auto r = decode_exec(
      R"({"sql":"SELECT $1, $2, $3, $4, $5","params":[18446744073709551617,123456789012345678901234567890,12345678901234567.89,1.50,-9223372036854775808]})",
      ExecLimits{});
  REQUIRE(r.ok());
  auto& p = r->statements[0].params;
  REQUIRE(p.size() == 5);
  CHECK(*p[0] == "18446744073709551617");
  CHECK(*p[1] == "123456789012345678901234567890");
  CHECK(*p[2] == "12345678901234567.89");
  CHECK(*p[3] == "1.50");
  CHECK(*p[4] == "-9223372036854775808");
  auto list = decode_exec(R"({"statements":[{"sql":"A","params":[1e-400000]}]})", ExecLimits{});
  REQUIRE(list.ok());
  CHECK(*list->statements[0].params[0] == "1e-400000");
}

TEST_CASE("expect_rows: a non-negative integer per statement") {
  auto one = decode_exec(R"({"sql":"UPDATE t SET v = 1","expect_rows":1})", ExecLimits{});
  REQUIRE(one.ok());
  CHECK(one->statements[0].expect_rows == 1);
  auto list =
      decode_exec(R"({"statements":[{"sql":"A","expect_rows":0},{"sql":"B"}]})", ExecLimits{});
  REQUIRE(list.ok());
  CHECK(list->statements[0].expect_rows == 0);
  CHECK_FALSE(list->statements[1].expect_rows.has_value());
  for (const char* bad : {R"({"sql":"A","expect_rows":-1})", R"({"sql":"A","expect_rows":"1"})",
                          R"({"sql":"A","expect_rows":1.0})", R"({"sql":"A","expect_rows":true})",
                          R"({"sql":"A","expect_rows":18446744073709551615})",
                          R"({"statements":[{"sql":"A","expect_rows":-5}]})"}) {
    CAPTURE(bad);
    auto r = decode_exec(bad, ExecLimits{});
    CHECK(r.status().code() == Code::invalid_argument);
    CHECK(r.status().message().find("expect_rows") != std::string::npos);
  }
}

TEST_CASE("every agent body refuses unknown fields and repeated keys, naming them") {
  auto named = [](const Status& s, const char* field) {
    CAPTURE(s.message());
    CHECK(s.code() == Code::invalid_argument);
    CHECK(s.message().find(field) != std::string::npos);
  };
  named(decode_exec(R"({"sql":"A","parms":[1]})", ExecLimits{}).status(),
        "unknown field \"parms\"");
  named(decode_exec(R"({"statements":[{"sql":"A"}],"params":[1]})", ExecLimits{}).status(),
        "\"params\"");
  named(decode_exec(R"({"statements":[{"sql":"A","parms":[1]}]})", ExecLimits{}).status(),
        "statements[0]: unknown field \"parms\"");
  named(decode_exec(R"({"sql":"A","sql":"B"})", ExecLimits{}).status(), "duplicate key \"sql\"");
  named(
      decode_exec(
          R"({"sql":"A","prepare":true,"protocol":"3pc","peers":[{"participant":"b","url":"http://h:1","x":1}]})",
          ExecLimits{})
          .status(),
      "\"x\"");
  named(decode_prepare(R"({"protocl":"3pc"})").status(), "\"protocl\"");
  named(decode_commit(R"({"onephase":true})").status(), "\"onephase\"");
  named(decode_resolve(R"({"outcome":"abort","outcome":"commit"})").status(),
        "duplicate key \"outcome\"");
}
