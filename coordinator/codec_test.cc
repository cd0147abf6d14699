// Unit tests of the coordinator's JSON codecs: request bodies (valid and refused), views,
// replies, and the agents' answers to protocol messages.
#include <doctest/doctest.h>

#include "coordinator/codec.h"

using namespace tpc;
using namespace tpc::coord;

TEST_CASE("begin bodies: defaults, protocol, timeout, and refusals") {
  auto d = decode_begin("", 1000);
  REQUIRE(d.ok());
  CHECK(d->protocol == Protocol::two_phase);
  CHECK_FALSE(d->timeout_ms.has_value());
  auto t = decode_begin(R"({"protocol":"3pc","timeout_ms":500})", 1000);
  REQUIRE(t.ok());
  CHECK(t->protocol == Protocol::three_phase);
  CHECK(*t->timeout_ms == 500);
  CHECK(decode_begin(R"({"protocol":"4pc"})", 1000).status().code() == Code::invalid_argument);
  CHECK(decode_begin(R"({"protocol":2})", 1000).status().code() == Code::invalid_argument);
  CHECK(decode_begin(R"({"timeout_ms":"5"})", 1000).status().code() == Code::invalid_argument);
  CHECK(decode_begin(R"({"timeout_ms":0})", 1000).status().code() == Code::invalid_argument);
  CHECK(decode_begin(R"({"timeout_ms":1001})", 1000).status().code() == Code::invalid_argument);
  CHECK(decode_begin(R"({"timeout_ms":1.5})", 1000).status().code() == Code::invalid_argument);
  CHECK(decode_begin("{", 1000).status().code() == Code::invalid_argument);
  CHECK(decode_begin("[]", 1000).status().code() == Code::invalid_argument);
  auto unknown = decode_begin(R"({"protocl":"3pc"})", 1000);
  CHECK(unknown.status().code() == Code::invalid_argument);
  CHECK(unknown.status().message() == "unknown field \"protocl\"");
}

TEST_CASE("enlist bodies need a valid participant name and URL") {
  auto e = decode_enlist(R"({"participant":"a1","url":"http://127.0.0.1:7401"})");
  REQUIRE(e.ok());
  CHECK(e->participant == "a1");
  CHECK(decode_enlist(R"({"url":"http://h:1"})").status().code() == Code::invalid_argument);
  CHECK(decode_enlist(R"({"participant":"a'1","url":"http://h:1"})").status().code() ==
        Code::invalid_argument);
  CHECK(decode_enlist(R"({"participant":"a1","url":"ftp://h"})").status().code() ==
        Code::invalid_argument);
  CHECK(decode_enlist(R"({"participant":"a1","url":"http://h:99999"})").status().code() ==
        Code::invalid_argument);
}

TEST_CASE("commit and resolve bodies") {
  CHECK_FALSE(decode_commit("")->wait_decision_only);
  CHECK(decode_commit(R"({"wait":"decision"})")->wait_decision_only);
  CHECK_FALSE(decode_commit(R"({"wait":"completion"})")->wait_decision_only);
  CHECK_FALSE(decode_commit(R"({"wait":"never"})").ok());
  CHECK(*decode_resolve(R"({"outcome":"commit"})"));
  CHECK_FALSE(*decode_resolve(R"({"outcome":"abort"})"));
  CHECK_FALSE(decode_resolve(R"({"outcome":"maybe"})").ok());
  CHECK_FALSE(decode_resolve("{}").ok());
}

TEST_CASE("views carry state, branches, reason and the decision") {
  TxnView v;
  v.gid = "c1-1-1";
  v.state = TxnState::aborted;
  v.decision = Decision::abort;
  v.reason = "vote_no";
  v.reason_branch = "a2";
  v.branches = {{"a1", "http://h:1", BranchState::aborted, 1, "", false, false},
                {"a2", "http://h:2", BranchState::aborted, 3, "23503", false, false}};
  Json j = encode_view(v);
  CHECK(j["gid"] == "c1-1-1");
  CHECK(j["protocol"] == "2pc");
  CHECK(j["state"] == "aborted");
  CHECK(j["reason"] == "vote_no");
  CHECK(j["branch"] == "a2");
  CHECK(j["decision"] == "abort");
  REQUIRE(j["branches"].size() == 2);
  CHECK(j["branches"][1]["participant"] == "a2");
  CHECK(j["branches"][1]["state"] == "aborted");
  CHECK(j["branches"][1]["attempts"] == 3);
  CHECK_FALSE(j["branches"][0].contains("attempts"));

  TxnView f;
  f.gid = "c1-1-2";
  f.forgotten = true;
  Json jf = encode_view(f);
  CHECK(jf["state"] == "unknown");
  CHECK(jf["forgotten"] == true);
  CHECK_FALSE(jf.contains("decision"));
  TxnView p;
  p.gid = "c1-1-3";
  p.state = TxnState::precommitted;
  p.decision = Decision::commit;
  p.protocol = Protocol::three_phase;
  CHECK(encode_view(p)["decision"] == "commit");
  CHECK(encode_view(p)["protocol"] == "3pc");
}

TEST_CASE("replies: a 409 outcome carries the view and an error; a plain error only the error") {
  ClientReply r;
  r.answer = Answer::contrary;
  r.view.gid = "c1-1-1";
  r.view.state = TxnState::aborted;
  HttpResponse resp = encode_reply(r);
  CHECK(resp.status == 409);
  auto j = parse_json(resp.body);
  REQUIRE(j.ok());
  CHECK((*j)["state"] == "aborted");
  CHECK((*j)["error"]["code"] == "conflict");

  ClientReply e;
  e.error = not_found("no transaction c9-1-1");
  HttpResponse er = encode_reply(e);
  CHECK(er.status == 404);
  auto je = parse_json(er.body);
  CHECK((*je)["error"]["code"] == "not_found");
  CHECK_FALSE(je->contains("state"));
}

TEST_CASE("agents' answers map to replies; anything unusable is failed") {
  Message prep{"c1-1-1", "a1", "http://h:1", MsgKind::prepare, 1, Protocol::two_phase, {}};
  CHECK(decode_branch_answer(prep, 200, R"({"vote":"yes"})", ok_status()).reply == ReplyKind::vote_yes);
  CHECK(decode_branch_answer(prep, 200, R"({"vote":"read_only"})", ok_status()).reply ==
        ReplyKind::vote_read_only);
  auto no = decode_branch_answer(prep, 200, R"({"vote":"no","reason":"23503 fk"})", ok_status());
  CHECK(no.reply == ReplyKind::vote_no);
  CHECK(no.reason == "23503 fk");
  CHECK(decode_branch_answer(prep, 503, R"({"error":{"code":"unavailable","message":"x"}})",
                             ok_status()).reply == ReplyKind::failed);
  CHECK(decode_branch_answer(prep, 200, "not json", ok_status()).reply == ReplyKind::failed);
  auto down = decode_branch_answer(prep, 0, "", unavailable("connection refused"));
  CHECK(down.reply == ReplyKind::failed);
  CHECK(down.reason.find("connection refused") != std::string::npos);

  Message commit{"c1-1-1", "a1", "http://h:1", MsgKind::commit, 1, Protocol::two_phase, {}};
  CHECK(decode_branch_answer(commit, 200, R"({"state":"committed"})", ok_status()).reply ==
        ReplyKind::committed);
  CHECK(decode_branch_answer(commit, 409, R"({"state":"aborted"})", ok_status()).reply ==
        ReplyKind::aborted);
  CHECK(decode_branch_answer(commit, 409, R"({"state":"active"})", ok_status()).reply ==
        ReplyKind::failed);
  Message abort{"c1-1-1", "a1", "http://h:1", MsgKind::abort, 1, Protocol::two_phase, {}};
  CHECK(decode_branch_answer(abort, 200, R"({"state":"aborted"})", ok_status()).reply ==
        ReplyKind::aborted);
  CHECK(decode_branch_answer(abort, 409, R"({"state":"committed"})", ok_status()).reply ==
        ReplyKind::committed);
  Message pre{"c1-1-1", "a1", "http://h:1", MsgKind::precommit, 1, Protocol::three_phase, {}};
  CHECK(decode_branch_answer(pre, 200, R"({"state":"precommitted"})", ok_status()).reply ==
        ReplyKind::precommitted);
  CHECK(decode_branch_answer(pre, 409, R"({"state":"aborted"})", ok_status()).reply ==
        ReplyKind::aborted);
}

TEST_CASE("an answer that proves the agent did nothing is final where it can be") {
  const char* refusal = R"({"error":{"code":"not_found","message":"no coordinator configured for gid"}})";
  auto msg = [](MsgKind k, uint32_t attempt) {
    return Message{"c1-1-1", "a1", "http://h:1", k, attempt, Protocol::two_phase, {}};
  };
  for (int status : {400, 401, 403, 404, 413}) {
    CAPTURE(status);
    // Before the decision: a vote no.
    CHECK(decode_branch_answer(msg(MsgKind::prepare, 1), status, refusal, ok_status()).reply ==
          ReplyKind::vote_no);
    CHECK(decode_branch_answer(msg(MsgKind::exec_prepare, 1), status, refusal, ok_status()).reply ==
          ReplyKind::vote_no);
    // A one-phase commit whose first attempt was refused never committed.
    CHECK(decode_branch_answer(msg(MsgKind::exec_commit, 1), status, refusal, ok_status()).reply ==
          ReplyKind::aborted);
    CHECK(decode_branch_answer(msg(MsgKind::commit_one_phase, 1), status, refusal, ok_status()).reply ==
          ReplyKind::aborted);
    // Presumed abort lets an abort end on it.
    CHECK(decode_branch_answer(msg(MsgKind::abort, 3), status, refusal, ok_status()).reply ==
          ReplyKind::aborted);
    // A resent one-phase commit may follow one that committed; a decided commit never gives up.
    CHECK(decode_branch_answer(msg(MsgKind::commit_one_phase, 2), status, refusal, ok_status()).reply ==
          ReplyKind::failed);
    CHECK(decode_branch_answer(msg(MsgKind::commit, 1), status, refusal, ok_status()).reply ==
          ReplyKind::failed);
    CHECK(decode_branch_answer(msg(MsgKind::precommit, 1), status, refusal, ok_status()).reply ==
          ReplyKind::failed);
  }
  for (int status : {408, 425, 429, 500, 502, 503}) {
    CAPTURE(status);
    CHECK(decode_branch_answer(msg(MsgKind::exec_commit, 1), status, refusal, ok_status()).reply ==
          ReplyKind::failed);
    CHECK(decode_branch_answer(msg(MsgKind::abort, 1), status, refusal, ok_status()).reply ==
          ReplyKind::failed);
  }
}

TEST_CASE("message bodies say the protocol at prepare and one_phase at a one-phase commit") {
  Message m{"c1-1-1", "a1", "u", MsgKind::prepare, 1, Protocol::three_phase,
            {{"a1", "http://h:1"}, {"a2", "http://h:2"}}};
  CHECK(encode_message_body(m) ==
        R"({"peers":[{"participant":"a1","url":"http://h:1"},{"participant":"a2","url":"http://h:2"}],"protocol":"3pc"})");
  m.protocol = Protocol::two_phase;
  CHECK(encode_message_body(m) == "{}");
  m.kind = MsgKind::commit_one_phase;
  CHECK(encode_message_body(m) == R"({"one_phase":true})");
}

TEST_CASE("run bodies: branches with statements; refusals name the branch") {
  auto r = decode_run(R"({"protocol":"3pc","wait":"decision","branches":[{"participant":"a1","statements":[{"sql":"UPDATE t SET v = $1","params":[1,"x",null,true]}]}]})", 10);
  REQUIRE(r.ok());
  CHECK(r->protocol == Protocol::three_phase);
  CHECK(r->opts.wait_decision_only);
  REQUIRE(r->branches.size() == 1);
  CHECK(r->branches[0].participant == "a1");
  CHECK(r->branches[0].statements == R"([{"params":[1,"x",null,true],"sql":"UPDATE t SET v = $1"}])");
  for (const char* bad : {R"({})", R"({"branches":{}})", R"({"branches":[1]})",
                          R"({"branches":[{"participant":"a1"}]})",
                          R"({"branches":[{"participant":"a 1","statements":[{"sql":"x"}]}]})",
                          R"({"branches":[{"participant":"a1","statements":[]}]})",
                          R"({"branches":[{"participant":"a1","statements":[{"sql":""}]}]})",
                          R"({"branches":[{"participant":"a1","statements":[{"sql":"x","params":[{}]}]}]})",
                          R"({"protocol":"1pc","branches":[]})"}) {
    CAPTURE(bad);
    CHECK_FALSE(decode_run(bad, 10).ok());
  }
  auto many = decode_run(R"({"branches":[{"participant":"a1","statements":[{"sql":"a"},{"sql":"b"},{"sql":"c"}]}]})", 2);
  CHECK(many.status().code() == Code::too_large);
}

TEST_CASE("exec messages carry the statements once, with prepare or with commit") {
  Message m{"c1-1-1", "a1", "u", MsgKind::exec_prepare, 1, Protocol::two_phase, {}};
  CHECK(encode_message_body(m, R"([{"sql":"x"}])") ==
        R"({"enlisted":true,"prepare":true,"statements":[{"sql":"x"}]})");
  m.kind = MsgKind::exec_commit;
  CHECK(encode_message_body(m, R"([{"sql":"x"}])") ==
        R"({"commit":true,"enlisted":true,"statements":[{"sql":"x"}]})");
  auto answer = decode_branch_answer(Message{"c1-1-1", "a1", "u", MsgKind::exec_prepare, 1, Protocol::two_phase, {}},
                                     422, R"({"error":{"code":"sql_error","message":"check","sqlstate":"23514"},"vote":"no"})",
                                     ok_status());
  CHECK(answer.reply == ReplyKind::vote_no);
  Json results;
  auto ok = decode_branch_answer(m, 200, R"({"results":[{"rows":[]}],"state":"committed"})", ok_status(), &results);
  CHECK(ok.reply == ReplyKind::committed);
  CHECK(results.is_array());
}

TEST_CASE("every coordinator body refuses unknown fields and repeated keys, naming them") {
  auto named = [](const Status& s, const char* field) {
    CAPTURE(s.message());
    CHECK(s.code() == Code::invalid_argument);
    CHECK(s.message().find(field) != std::string::npos);
  };
  named(decode_begin(R"({"protocol":"2pc","protocol":"3pc"})", 1000).status(),
        "duplicate key \"protocol\"");
  named(decode_enlist(R"({"participant":"a1","url":"http://h:1","urls":1})").status(), "\"urls\"");
  named(decode_commit(R"({"wiat":"decision"})").status(), "\"wiat\"");
  named(decode_resolve(R"({"outcome":"commit","force":true})").status(), "\"force\"");
  named(decode_run(R"({"branches":[],"protocl":"3pc"})", 10).status(), "\"protocl\"");
  named(decode_run(R"({"branches":[{"participant":"a1","statements":[{"sql":"a"}],"x":1}]})", 10)
            .status(),
        "branches[0]: unknown field \"x\"");
  named(decode_run(R"({"branches":[{"participant":"a1","statements":[{"sql":"a","parms":[1]}]}]})",
                   10)
            .status(),
        "branches[0].statements[0]: unknown field \"parms\"");
  named(
      decode_run(R"({"branches":[{"participant":"a1","statements":[{"sql":"a","sql":"b"}]}]})", 10)
          .status(),
      "duplicate key \"sql\"");
  CHECK(parse_empty_object("{}").ok());
  CHECK(parse_empty_object("").ok());
  named(parse_empty_object(R"({"reason":"x"})").status(), "\"reason\"");
}

TEST_CASE(
    "one-shot statements keep the exact digits of their number params and check expect_rows") {
  auto r = decode_run(
      R"({"branches":[{"participant":"a1","statements":[{"sql":"SELECT $1, $2, $3","params":[18446744073709551617,123456789012345678901234567890,12345678901234567.89],"expect_rows":1}]}]})",
      10);
  REQUIRE(r.ok());
  const std::string& st = r->branches[0].statements;
  CAPTURE(st);
  CHECK(st.find("\"18446744073709551617\"") != std::string::npos);
  CHECK(st.find("\"123456789012345678901234567890\"") != std::string::npos);
  CHECK(st.find("\"12345678901234567.89\"") != std::string::npos);
  CHECK(st.find("\"expect_rows\":1") != std::string::npos);
  for (
      const char* bad :
      {R"({"branches":[{"participant":"a1","statements":[{"sql":"a","expect_rows":-1}]}]})",
       R"({"branches":[{"participant":"a1","statements":[{"sql":"a","expect_rows":"1"}]}]})",
       R"({"branches":[{"participant":"a1","statements":[{"sql":"a","expect_rows":1.5}]}]})",
       R"({"branches":[{"participant":"a1","statements":[{"sql":"a","expect_rows":9223372036854775808}]}]})"}) {
    CAPTURE(bad);
    auto b = decode_run(bad, 10);
    CHECK(b.status().code() == Code::invalid_argument);
    CHECK(b.status().message().find("expect_rows") != std::string::npos);
  }
}
