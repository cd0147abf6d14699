// The local message table's SQL against a real server (pg_outbox.h): statements and message
// rows commit together or not at all; the scan's eligibility (pending, due, head of its key, a
// dead row holding its key back until retried or discarded); marks; the views; the NOTIFY at
// commit.
#include "participant/pg_outbox.h"

#include <doctest/doctest.h>

#include "participant/pg_branch.h"
#include "tests/harness/harness.h"

namespace tpc::pg {
namespace {

using agent::MarkKind;
using agent::OutboxMark;
using testing::PgCluster;

PgCluster* cluster() {
  auto c = testing::shared_cluster();
  REQUIRE_MESSAGE(c.ok(), c.status().to_string());
  return *c;
}

struct Shop {
  Shop() {
    static int counter = 0;
    name = "outbox_" + std::to_string(++counter);
    REQUIRE(cluster()->create_database(name).ok());
    conninfo = cluster()->conninfo(name);
    conn = connect();
    REQUIRE(ensure_outbox_schema(*conn).ok());
    REQUIRE(ensure_outbox_schema(*conn).ok());  // again: nothing changes
    sql("CREATE TABLE orders(id int PRIMARY KEY, state text NOT NULL)");
  }
  std::unique_ptr<PgConn> connect() const {
    auto c = PgConn::connect(ConnectOptions{conninfo});
    REQUIRE_MESSAGE(c.ok(), c.status().to_string());
    return std::move(c).value();
  }
  void sql(const std::string& text) const {
    auto r = testing::query(conninfo, text);
    REQUIRE_MESSAGE(r.ok(), r.status().to_string());
  }
  std::string value(const std::string& text) const {
    auto v = testing::query_value(conninfo, text);
    REQUIRE_MESSAGE(v.ok(), v.status().to_string());
    return v->value_or("NULL");
  }
  OutboxPut put(int order, std::vector<OutboxInsert> messages) {
    return put_outbox(
        *conn,
        {PipelineStep{"INSERT INTO orders VALUES ($1, 'placed')", {std::to_string(order)}, true}},
        messages);
  }
  std::vector<int64_t> scan() {
    auto rows = scan_outbox(*conn, 100);
    REQUIRE_MESSAGE(rows.ok(), rows.status().to_string());
    std::vector<int64_t> ids;
    for (auto& r : *rows) ids.push_back(r.id);
    return ids;
  }
  bool mark(int64_t id, MarkKind kind, int64_t retry_in_ms = 0) {
    auto m = mark_outbox(*conn, OutboxMark{id, kind, 1, retry_in_ms, "HTTP 503"});
    REQUIRE_MESSAGE(m.ok(), m.status().to_string());
    return *m;
  }

  std::string name, conninfo;
  std::unique_ptr<PgConn> conn;
};

OutboxInsert msg(std::string key, std::string payload = R"({"n":1})") {
  return OutboxInsert{std::move(key), R"({"url":"http://d:1/"})", std::move(payload)};
}

}  // namespace

TEST_CASE("the statements and the message rows commit together, or neither does") {
  Shop s;
  OutboxPut ok = s.put(1, {msg("order-1"), msg("")});
  REQUIRE_MESSAGE(ok.status.ok(), ok.status.to_string());
  REQUIRE(ok.ids.size() == 2);
  CHECK(ok.ids[1] > ok.ids[0]);
  REQUIRE(ok.results.size() == 1);
  CHECK(ok.results[0].affected == 1);
  CHECK(s.value("SELECT count(*) FROM tpc_outbox") == "2");
  OutboxPut dup = s.put(1, {msg("order-1")});  // the order exists: 23505, nothing kept
  CHECK(dup.status.code() == Code::sql_error);
  CHECK(dup.sqlstate == "23505");
  CHECK(dup.ids.empty());
  CHECK_FALSE(s.conn->in_transaction());
  CHECK(s.value("SELECT count(*) FROM tpc_outbox") == "2");
  OutboxPut bad = put_outbox(*s.conn, {}, {OutboxInsert{"", "not json", "{}"}});
  CHECK(bad.status.code() == Code::sql_error);
  CHECK(s.value("SELECT count(*) FROM tpc_outbox") == "2");
  auto v = get_outbox(*s.conn, ok.ids[0]);
  REQUIRE(v.ok());
  REQUIRE(v->has_value());
  CHECK((*v)->state == "pending");
  CHECK((*v)->key == std::optional<std::string>("order-1"));
  CHECK((*v)->payload == R"({"n": 1})");
  CHECK((*v)->attempts == 0);
}

TEST_CASE("a scan returns the head of each key only; keyless rows all") {
  Shop s;
  auto a = s.put(1, {msg("k1"), msg("k1"), msg(""), msg("k2"), msg("")});
  REQUIRE(a.status.ok());
  auto& id = a.ids;
  CHECK(s.scan() == std::vector<int64_t>{id[0], id[2], id[3], id[4]});
  CHECK(s.mark(id[0], MarkKind::delivered));
  CHECK(s.scan() == std::vector<int64_t>{id[1], id[2], id[3], id[4]});
  CHECK_FALSE(s.mark(id[0], MarkKind::dead));  // no longer pending: left alone
  // A retry later: the row is not due, and still holds its key back.
  CHECK(s.mark(id[1], MarkKind::retry, 60'000));
  CHECK(s.scan() == std::vector<int64_t>{id[2], id[3], id[4]});
  auto v = get_outbox(*s.conn, id[1]);
  REQUIRE((v.ok() && v->has_value()));
  CHECK((*v)->attempts == 1);
  CHECK((*v)->last_error == std::optional<std::string>("HTTP 503"));
}

TEST_CASE("a dead row holds its key back until it is retried or discarded") {
  Shop s;
  auto a = s.put(1, {msg("k"), msg("k"), msg("k")});
  REQUIRE(a.status.ok());
  auto& id = a.ids;
  CHECK(s.mark(id[0], MarkKind::dead));
  CHECK(s.scan().empty());
  auto dead = list_outbox(*s.conn, "dead", 10);
  REQUIRE(dead.ok());
  REQUIRE(dead->size() == 1);
  CHECK((*dead)[0].id == id[0]);
  auto oldest = oldest_undelivered_ms(*s.conn);
  REQUIRE(oldest.ok());
  CHECK(*oldest >= 0);
  // Retried: pending again from attempt 0, first of its key.
  CHECK(*retry_outbox(*s.conn, id[0]));
  CHECK_FALSE(*retry_outbox(*s.conn, id[0]));  // not dead any more
  CHECK(s.scan() == std::vector<int64_t>{id[0]});
  CHECK(s.mark(id[0], MarkKind::dead));
  // Discarded: recorded, and the key's later rows go on.
  CHECK(*discard_outbox(*s.conn, id[0]));
  CHECK_FALSE(*discard_outbox(*s.conn, id[0]));
  CHECK(s.scan() == std::vector<int64_t>{id[1]});
  auto v = get_outbox(*s.conn, id[0]);
  REQUIRE((v.ok() && v->has_value()));
  CHECK((*v)->state == "discarded");
  CHECK((*v)->discarded_at.has_value());
  CHECK(list_outbox(*s.conn, "", 10)->size() == 3);
  CHECK((*list_outbox(*s.conn, "", 10))[0].id == id[2]);  // newest first
  CHECK_FALSE(get_outbox(*s.conn, 999'999)->has_value());
}

TEST_CASE(
    "rows inserted by the application's own transaction are relayed too, and NOTIFY at "
    "commit") {
  Shop s;
  auto listener = s.connect();
  REQUIRE(listener->exec("LISTEN tpc_outbox").status.ok());
  s.sql(
      "BEGIN; INSERT INTO orders VALUES (9, 'placed'); "
      "INSERT INTO tpc_outbox (key, destination, payload) VALUES "
      "('order-9', '{\"url\":\"http://d:1/\"}', '{\"order\":9}'); COMMIT");
  CHECK(s.scan().size() == 1);
  // The notification reached the listener at commit (a round trip of its own collects it).
  REQUIRE(listener->exec("SELECT 1").status.ok());
  auto got = listener->take_notifications();
  REQUIRE(got.ok());
  CHECK(*got == std::vector<std::string>{"tpc_outbox"});
  // Rolled back: no row, no notification.
  s.sql("BEGIN; INSERT INTO tpc_outbox (destination) VALUES ('{}'); ROLLBACK");
  REQUIRE(listener->exec("SELECT 1").status.ok());
  auto none = listener->take_notifications();
  REQUIRE(none.ok());
  CHECK(none->empty());
  CHECK(s.value("SELECT count(*) FROM tpc_outbox") == "1");
}

}  // namespace tpc::pg
