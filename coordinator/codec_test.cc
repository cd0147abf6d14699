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

// --- TCC and saga ------------------------------------------------------------------------------

namespace {

Result<wal::OpText> op_of(std::string_view text, StepOp op = StepOp::action) {
  auto j = parse_json(text);
  REQUIRE(j.ok());
  return decode_op(*j, op, "op", 10);
}

void refused(const Status& st, std::string_view part) {
  CAPTURE(st.message());
  CHECK(st.code() == Code::invalid_argument);
  CHECK(st.message().find(part) != std::string::npos);
}

}  // namespace

TEST_CASE("begin takes tcc and sends a saga to /run; run refuses tcc") {
  auto t = decode_begin(R"({"protocol":"tcc"})", 1000);
  REQUIRE(t.ok());
  CHECK(t->protocol == Protocol::tcc);
  refused(decode_begin(R"({"protocol":"saga"})", 1000).status(), "/v1/transactions/run");
  refused(decode_run(R"({"protocol":"tcc","branches":[]})", 10).status(), "POST /v1/transactions");
  refused(decode_run(R"({"protocol":"saga","branches":[]})", 10).status(), "steps");
}

TEST_CASE("ops: HTTP and SQL shapes normalised, bad ones refused with where they are") {
  auto h = op_of(R"({"url":"http://127.0.0.1:9/a/b","body":{"x":1},"headers":{"X-Trace":"t"}})");
  REQUIRE(h.ok());
  CHECK(h->op == StepOp::action);
  auto target = decode_op_target(h->json);
  REQUIRE(target.ok());
  CHECK_FALSE(target->sql);
  CHECK(target->url == "http://127.0.0.1:9/a/b");
  CHECK(target->body == R"({"x":1})");
  REQUIRE(target->headers.size() == 1);
  CHECK(target->headers[0] == std::pair<std::string, std::string>{"x-trace", "t"});
  auto nobody = decode_op_target(op_of(R"({"url":"http://h:1/p"})")->json);
  CHECK(nobody->body == "{}");

  auto s = op_of(
      R"J({"participant":"bank_a","statements":[{"sql":"INSERT INTO t VALUES ($1,$2)","params":[{"tpc":"gid"},{"tpc":"branch"}]}]})J");
  REQUIRE(s.ok());
  auto st = decode_op_target(s->json);
  REQUIRE(st.ok());
  CHECK(st->sql);
  CHECK(st->participant == "bank_a");
  CHECK(st->body.find("{\"tpc\":\"gid\"}") != std::string::npos);
  // A compensation may be empty (it commits only its barrier row); an action may not.
  CHECK(op_of(R"({"participant":"a","statements":[]})", StepOp::compensate).ok());
  CHECK(op_of(R"({"participant":"a","statements":[]})", StepOp::cancel).ok());
  refused(op_of(R"({"participant":"a","statements":[]})").status(), "must not be empty");
  refused(op_of(R"({"participant":"a","statements":[]})", StepOp::try_op).status(),
          "must not be empty");

  refused(op_of(R"("http://h:1")").status(), "must be an op");
  refused(op_of(R"({})").status(), "either \"url\"");
  refused(op_of(R"({"url":"http://h:1","participant":"a"})").status(), "either \"url\"");
  refused(op_of(R"({"url":"ftp://h"})").status(), "http://");
  refused(op_of(R"({"url":"http://h:1","method":"GET"})").status(), "\"method\"");
  refused(op_of(R"({"url":"http://h:1","headers":[]})").status(), "headers must be an object");
  refused(op_of(R"({"url":"http://h:1","headers":{"Tpc-Gid":"x"}})").status(),
          "set by the coordinator");
  refused(op_of(R"({"url":"http://h:1","headers":{"Content-Length":"1"}})").status(),
          "set by the coordinator");
  refused(op_of(R"({"url":"http://h:1","headers":{"a b":"x"}})").status(), "bad header name");
  refused(op_of(R"({"url":"http://h:1","headers":{"x":"a\r\nb"}})").status(), "CR, LF");
  refused(op_of(R"({"url":"http://h:1","headers":{"x":1}})").status(), "must be a string");
  refused(op_of(R"({"participant":"a b","statements":[{"sql":"x"}]})").status(), "participant");
  refused(
      op_of(R"({"participant":"a","statements":[{"sql":"x","params":[{"tpc":"time"}]}]})").status(),
      "statements[0]");
  refused(op_of(R"({"participant":"a","statements":[{"sql":""}]})").status(), "statements[0]");
  refused(op_of(R"({"participant":"a","statements":[{"sql":"x"}],"extra":1})").status(),
          "\"extra\"");
  // The one-shot form keeps refusing the placeholders: they mean something only in a step.
  refused(
      decode_run(
          R"({"branches":[{"participant":"a1","statements":[{"sql":"x","params":[{"tpc":"gid"}]}]}]})",
          10)
          .status(),
      "params");
}

TEST_CASE("try bodies need a branch name and all three ops") {
  auto t = decode_try(
      R"({"branch":"debit","try":{"url":"http://h:1/t"},"confirm":{"url":"http://h:1/c"},"cancel":{"participant":"a","statements":[]}})",
      10);
  REQUIRE(t.ok());
  CHECK(t->name == "debit");
  REQUIRE(t->ops.size() == 3);
  CHECK(t->ops[0].op == StepOp::try_op);
  CHECK(t->ops[1].op == StepOp::confirm);
  CHECK(t->ops[2].op == StepOp::cancel);
  refused(
      decode_try(R"({"branch":"d","try":{"url":"http://h:1"},"confirm":{"url":"http://h:1"}})", 10)
          .status(),
      "\"cancel\"");
  refused(
      decode_try(
          R"({"try":{"url":"http://h:1"},"confirm":{"url":"http://h:1"},"cancel":{"url":"http://h:1"}})",
          10)
          .status(),
      "\"branch\"");
  refused(
      decode_try(
          R"({"branch":"d!","try":{"url":"http://h:1"},"confirm":{"url":"http://h:1"},"cancel":{"url":"http://h:1"}})",
          10)
          .status(),
      "\"branch\"");
  refused(
      decode_try(
          R"({"branch":"d","try":{"url":"x"},"confirm":{"url":"http://h:1"},"cancel":{"url":"http://h:1"}})",
          10)
          .status(),
      "try:");
}

TEST_CASE("saga bodies: defaults, options, and refusals") {
  auto parse = [](std::string_view text) {
    auto j = parse_json(text);
    REQUIRE(j.ok());
    return decode_saga(*j, 10, 1000);
  };
  auto d = parse(R"({"protocol":"saga","steps":[{"name":"a","action":{"url":"http://h:1/a"}}]})");
  REQUIRE(d.ok());
  CHECK_FALSE(d->opts.parallel);
  CHECK_FALSE(d->opts.forward);
  CHECK_FALSE(d->opts.wait_accepted);
  CHECK(d->opts.attempts_max == kSagaAttemptsDefault);
  CHECK_FALSE(d->opts.timeout_ms.has_value());
  REQUIRE(d->steps.size() == 1);
  CHECK(d->steps[0].ops.size() == 1);

  auto f = parse(
      R"({"protocol":"saga","recovery":"forward","parallel":true,"wait":"accepted","timeout_ms":500,"retry":{"min_ms":10,"max_ms":20},"steps":[{"name":"a","action":{"url":"http://h:1/a"},"compensate":{"url":"http://h:1/c"}}]})");
  REQUIRE(f.ok());
  CHECK(f->opts.forward);
  CHECK(f->opts.parallel);
  CHECK(f->opts.wait_accepted);
  CHECK(f->opts.attempts_max == 0);  // forward: until it succeeds
  CHECK(*f->opts.timeout_ms == 500);
  CHECK(f->opts.retry_min_ms == 10);
  CHECK(f->opts.retry_max_ms == 20);
  CHECK(f->steps[0].ops[1].op == StepOp::compensate);
  auto fa = parse(
      R"({"protocol":"saga","recovery":"forward","retry":{"max_attempts":3},"steps":[{"name":"a","action":{"url":"http://h:1/a"}}]})");
  REQUIRE(fa.ok());
  CHECK(fa->opts.attempts_max == 3);

  const std::string step = R"([{"name":"a","action":{"url":"http://h:1/a"}}])";
  auto with = [&](std::string fields) {
    return parse(R"({"protocol":"saga","steps":)" + step + fields + "}").status();
  };
  refused(with(R"(,"recovery":"sideways")"), "\"recovery\"");
  refused(with(R"(,"wait":"decision")"), "\"wait\"");
  refused(with(R"(,"timeout_ms":1001)"), "timeout_ms");
  refused(with(R"(,"retry":{"max_attempts":0})"), "max_attempts");  // backward needs >= 1
  refused(with(R"(,"retry":{"max_attempts":1001})"), "max_attempts");
  refused(with(R"(,"retry":{"min_ms":0})"), "min_ms");
  refused(with(R"(,"retry":{"tries":1})"), "\"tries\"");
  refused(with(R"(,"retry":5)"), "\"retry\" must be an object");
  refused(with(R"(,"notify":{"participant":"a","statements":[]})"), "must be an HTTP op");
  refused(with(R"(,"notify":{"url":"ftp://h:1"})"), "notify");
  auto notified =
      parse(R"({"protocol":"saga","steps":)" + step + R"(,"notify":{"url":"http://h:1/n"}})");
  REQUIRE(notified.ok());
  CHECK(notified->opts.notify == R"({"url":"http://h:1/n"})");
  refused(parse(R"({"protocol":"saga"})").status(), "\"steps\"");
  refused(parse(R"({"protocol":"saga","steps":[{"name":"a"}]})").status(), "needs \"action\"");
  refused(parse(R"({"protocol":"saga","steps":[7]})").status(), "steps[0] must be an object");
  refused(
      parse(
          R"({"protocol":"saga","steps":[{"name":"a","action":{"url":"http://h:1"},"compensate":{}}]})")
          .status(),
      "steps[0].compensate");
}

TEST_CASE("op answers: 2xx ok with its JSON, 409/422 business failures, the rest unknown") {
  OpCall c{"c1-1-2", "debit", StepOp::confirm, 2, ""};
  auto ok = decode_op_answer(c, false, 200, R"({"debited":30})", "", ok_status(), 0);
  CHECK(ok.outcome == OpOutcome::ok);
  CHECK(ok.result == R"({"debited":30})");
  CHECK(ok.gid == "c1-1-2");
  CHECK(ok.branch == "debit");
  CHECK(ok.op == StepOp::confirm);
  CHECK(decode_op_answer(c, false, 204, "", "", ok_status(), 0).result.empty());
  CHECK(decode_op_answer(c, false, 200, "not json", "", ok_status(), 0).result.empty());
  std::string big = "[\"" + std::string(kOpResultMaxBytes, 'x') + "\"]";
  CHECK(decode_op_answer(c, false, 200, big, "", ok_status(), 0).result.find("truncated") !=
        std::string::npos);

  auto business = decode_op_answer(
      c, true, 422, R"({"error":{"code":"sql_error","message":"boom","sqlstate":"23505"}})", "1",
      ok_status(), 0);
  CHECK(business.outcome == OpOutcome::business_failure);
  CHECK(business.error == "HTTP 422: sql_error: boom (SQLSTATE 23505)");
  CHECK(decode_op_answer(c, false, 409, "", "", ok_status(), 0).outcome ==
        OpOutcome::business_failure);
  for (int status : {400, 404, 425, 429, 500, 503}) {
    CAPTURE(status);
    CHECK(decode_op_answer(c, false, status, "", "", ok_status(), 0).outcome == OpOutcome::unknown);
  }
  // Retry-After, seconds or an HTTP-date, is honoured for HTTP ops, capped; not for our agents'
  // generic hint.
  auto after = [&](std::string_view v, int64_t wall_ms, bool sql = false) {
    return decode_op_answer(c, sql, 503, "", v, ok_status(), wall_ms).retry_after_ms;
  };
  const int64_t t0 = 1445412480'000;  // Wed, 21 Oct 2015 07:28:00 GMT
  CHECK(after("2", t0) == 2000);
  CHECK(after("99999", t0) == kRetryAfterMaxMs);
  CHECK(after("Wed, 21 Oct 2015 07:28:07 GMT", t0) == 7000);
  CHECK(after("Wednesday, 21-Oct-15 07:28:30 GMT", t0) == 30'000);
  CHECK(after("Wed Oct 21 07:29:00 2015", t0) == 60'000);
  CHECK(after("Wed, 21 Oct 2015 07:28:00 GMT", t0 + 5'000) == 0);  // already past
  CHECK(after("Thu, 21 Oct 2025 07:28:00 GMT", t0) == kRetryAfterMaxMs);
  CHECK(after("soon", t0) == 0);
  CHECK(after("-1", t0) == 0);
  CHECK(after("1", t0, /*sql=*/true) == 0);
  auto lost = decode_op_answer(c, false, 0, "", "", unavailable("connection refused"), 0);
  CHECK(lost.outcome == OpOutcome::unknown);
  CHECK(lost.error.find("connection refused") != std::string::npos);
}

TEST_CASE("op calls: headers and the agent's step body") {
  OpCall c{"c1-1-2", "debit", StepOp::cancel, 3, ""};
  Headers h = op_call_headers(c);
  auto has = [&](std::string k, std::string v) {
    return std::find(h.begin(), h.end(), std::pair{k, v}) != h.end();
  };
  CHECK(has("tpc-gid", "c1-1-2"));
  CHECK(has("tpc-branch", "debit"));
  CHECK(has("tpc-op", "cancel"));
  CHECK(has("tpc-attempt", "3"));
  CHECK(has("idempotency-key", "c1-1-2/debit/cancel"));
  CHECK(encode_step_body(c, R"([{"sql":"x"}])") ==
        R"({"branch":"debit","op":"cancel","statements":[{"sql":"x"}]})");
  CHECK(encode_step_body(c, "") == R"({"branch":"debit","op":"cancel","statements":[]})");
}

TEST_CASE("views of TCC and saga transactions, and the answer to a try") {
  TxnView v;
  v.gid = "c1-1-3";
  v.protocol = Protocol::saga;
  v.state = TxnState::aborted;
  v.reason = "step_failed";
  v.reason_branch = "s2";
  BranchView a;
  a.participant = "s1";
  a.state = BranchState::compensated;
  a.attempts = 1;
  a.result = R"({"undone":5})";
  BranchView b;
  b.participant = "s2";
  b.state = BranchState::failed;
  b.attempts = 5;
  b.last_error = "HTTP 503";
  v.branches = {a, b};
  Json j = encode_view(v);
  CHECK(j["step"] == "s2");
  CHECK_FALSE(j.contains("branch"));
  CHECK_FALSE(j.contains("branches"));
  REQUIRE(j["steps"].size() == 2);
  CHECK(j["steps"][0]["name"] == "s1");
  CHECK(j["steps"][0]["state"] == "compensated");
  CHECK(j["steps"][0]["result"]["undone"] == 5);
  CHECK(j["steps"][1]["attempts"] == 5);
  CHECK(j["steps"][1]["last_error"] == "HTTP 503");
  CHECK(j["results"].empty());
  v.state = TxnState::committed;
  v.branches[0].state = BranchState::done;
  CHECK(encode_view(v)["results"]["s1"]["undone"] == 5);

  TxnView t;
  t.gid = "c1-1-4";
  t.protocol = Protocol::tcc;
  t.state = TxnState::active;
  BranchView d;
  d.participant = "debit";
  d.state = BranchState::tried;
  d.attempts = 1;
  d.result = R"({"frozen":30})";
  t.branches = {d};
  CHECK(encode_view(t)["branches"][0]["name"] == "debit");
  ClientReply r;
  r.kind = RequestKind::try_op;
  r.branch = "debit";
  r.view = t;
  HttpResponse ok = encode_reply(r);
  CHECK(ok.status == 200);
  auto body = parse_json(ok.body);
  REQUIRE(body.ok());
  CHECK((*body)["state"] == "tried");
  CHECK((*body)["branch"] == "debit");
  CHECK((*body)["result"]["frozen"] == 30);
  r.answer = Answer::contrary;
  r.view.state = TxnState::aborting;
  r.view.reason = "try_failed";
  r.view.reason_branch = "debit";
  HttpResponse no = encode_reply(r);
  CHECK(no.status == 409);
  auto nb = parse_json(no.body);
  CHECK((*nb)["state"] == "aborting");
  CHECK((*nb)["reason"] == "try_failed");
  CHECK((*nb)["branch"] == "debit");
}

TEST_CASE("decode_msg: a half message names its check, the one-request form its local op") {
  auto half = parse_object(
      R"j({"protocol":"msg","destinations":[{"url":"http://h:1/a","body":{"id":7}},
          {"participant":"b","statements":[{"sql":"INSERT INTO t VALUES (1)"}]}],
          "check":{"url":"http://p:2/check"},"timeout_ms":3000})j");
  REQUIRE(half.ok());
  auto m = decode_msg(*half, false, 64, 60'000);
  REQUIRE_MESSAGE(m.ok(), m.status().to_string());
  REQUIRE(m->producer.size() == 1);
  CHECK(m->producer[0].op == StepOp::check);
  REQUIRE(m->destinations.size() == 2);
  CHECK(m->destinations[1].op == StepOp::deliver);
  CHECK(m->timeout_ms == std::optional<int64_t>(3000));
  auto agent = parse_object(
      R"j({"protocol":"msg","destinations":[{"url":"http://h:1/a"}],"check":{"participant":"a"}})j");
  auto ma = decode_msg(*agent, false, 64, 60'000);
  REQUIRE_MESSAGE(ma.ok(), ma.status().to_string());
  CHECK(ma->producer[0].json == R"j({"participant":"a"})j");

  auto run = parse_object(
      R"j({"protocol":"msg","local":{"participant":"a","statements":[{"sql":"UPDATE t SET v = 1"}]},
          "destinations":[{"url":"http://h:1/a"}]})j");
  auto mr = decode_msg(*run, true, 64, 60'000);
  REQUIRE_MESSAGE(mr.ok(), mr.status().to_string());
  REQUIRE(mr->producer.size() == 2);
  CHECK(mr->producer[0].op == StepOp::local);
  CHECK(mr->producer[1].op == StepOp::check);
  CHECK(mr->producer[1].json == R"j({"participant":"a"})j");
}

TEST_CASE("decode_msg: what is refused, and why") {
  auto refused = [](const std::string& body, bool one_request, const char* says) {
    CAPTURE(body);
    auto j = parse_object(body);
    REQUIRE(j.ok());
    auto m = decode_msg(*j, one_request, 64, 60'000);
    REQUIRE(!m.ok());
    CHECK(m.status().code() == Code::invalid_argument);
    CHECK_MESSAGE(m.status().message().find(says) != std::string::npos, m.status().message());
  };
  const std::string head = R"j({"protocol":"msg","destinations":[{"url":"http://h:1/a"}])j";
  refused(head + "}", false, "check");
  refused(R"j({"protocol":"msg","destinations":[],"check":{"url":"http://p:2/c"}})j", false,
          "must not be empty");
  refused(head + R"j(,"check":{"participant":"a","statements":[{"sql":"SELECT 1"}]}})j", false,
          "no \"statements\"");
  refused(head + R"j(,"local":{"url":"http://p:2/l"}})j", true, "must be a SQL op");
  refused(head + R"j(,"local":{"participant":"a","statements":[{"sql":"SELECT 1"}]},)j"
                 R"j("check":{"url":"http://p:2/c"}})j",
          true, "no \"check\"");
  refused(head + R"j(,"check":{"url":"ftp://p:2/c"}})j", false, "check");
  refused(head + R"j(,"check":{"url":"http://p:2/c"},"notify":{"url":"n:1/"}})j", false, "notify");
  refused(head + R"j(,"local":{"participant":"a","statements":[{"sql":"SELECT 1"}]}})j", false,
          "\"local\" goes with POST /v1/transactions/run");
}

TEST_CASE("decode_notification and \"notify\" on begin and run") {
  auto n =
      decode_notification(R"({"url":"http://r:1/hook","body":{"order":7},"max_attempts":3})", 8);
  REQUIRE_MESSAGE(n.ok(), n.status().to_string());
  CHECK(n->attempts_max == 3);
  CHECK(n->op.op == StepOp::notify);
  CHECK(n->op.json == R"({"body":{"order":7},"url":"http://r:1/hook"})");
  CHECK(decode_notification(R"({"url":"http://r:1/hook"})", 8)->attempts_max == 8);
  for (const char* bad :
       {R"({"body":{}})", R"({"url":"http://r:1/","max_attempts":0})",
        R"({"url":"http://r:1/","max_attempts":1001})", R"({"participant":"a","statements":[]})",
        R"({"url":"http://r:1/","x":1})", R"({"url":"http://r:1/","headers":{"tpc-gid":"x"}})"}) {
    CAPTURE(bad);
    auto r = decode_notification(bad, 8);
    REQUIRE_FALSE(r.ok());
    CHECK(r.status().code() == Code::invalid_argument);
  }
  auto b = decode_begin(R"({"protocol":"2pc","notify":{"url":"http://r:1/hook"}})", 1000);
  REQUIRE(b.ok());
  CHECK(b->notify == R"({"url":"http://r:1/hook"})");
  CHECK(decode_begin(R"({"protocol":"tcc"})", 1000)->notify.empty());
  CHECK_FALSE(decode_begin(R"({"notify":"http://r:1/hook"})", 1000).ok());
}

TEST_CASE("a one-shot run is 2pc or 3pc: other protocols are refused with their own request") {
  for (const char* p : {"notify", "tcc", "msg"}) {
    CAPTURE(p);
    auto j =
        parse_object(std::string(R"({"protocol":")") + p +
                     R"(","branches":[{"participant":"a","statements":[{"sql":"SELECT 1"}]}]})");
    REQUIRE(j.ok());
    auto r = decode_run_json(*j, 10);
    REQUIRE_FALSE(r.ok());
    CHECK(r.status().code() == Code::invalid_argument);
  }
  CHECK_FALSE(decode_begin(R"({"protocol":"notify"})", 1000).ok());
}
