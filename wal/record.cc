// The TxnRecord codec and CRC-32C.
//
// Value:   [u8 version = 1][u32 crc32c(payload), little-endian][payload]
// Payload (version 1), in this order:
//   gid              varint length + bytes
//   protocol         u8 (2 or 3)
//   decision         u8 (Decision, 1..5)
//   flags            u8 (bit 0 ended, bit 1 heuristic_mixed; other bits must be 0)
//   decided_wall_ms  zigzag varint
//   ended_wall_ms    zigzag varint
//   branch count     varint
//   per branch:      participant (varint length + bytes), url (varint length + bytes),
//                    outcome u8 (BranchOutcome, 0..4)
// Nothing may follow the last branch. Varints are LEB128, at most 10 bytes.
//
// Payload (version 2, protocols tcc and saga): version 1's, with after each branch's outcome
//                    state u8, attempts varint, op count varint, per op: op u8 (StepOp) and
//                    json (varint length + bytes), result and last_error (varint length +
//                    bytes each);
//   and after the last branch: options (varint length + bytes).
#include "wal/record.h"

#include <array>
#include <cstring>

namespace tpc::wal {
namespace {

constexpr size_t kHeaderBytes = 5;  // version + crc
constexpr uint8_t kFlagEnded = 1;
constexpr uint8_t kFlagHeuristicMixed = 2;
constexpr uint8_t kFlagsKnown = kFlagEnded | kFlagHeuristicMixed;
constexpr size_t kBranchBytesMin = 3;  // two empty strings and an outcome
constexpr size_t kOpBytesMin = 2;      // an op byte and an empty string
constexpr size_t kVarintBytesMax = 10;

// ---- CRC-32C, slice-by-8 -------------------------------------------------------------------

constexpr uint32_t kCastagnoliReflected = 0x82F63B78u;

using CrcTables = std::array<std::array<uint32_t, 256>, 8>;

constexpr CrcTables make_crc_tables() {
  CrcTables t{};
  for (uint32_t i = 0; i < 256; ++i) {
    uint32_t c = i;
    for (int k = 0; k < 8; ++k) c = (c & 1) ? (c >> 1) ^ kCastagnoliReflected : c >> 1;
    t[0][i] = c;
  }
  for (size_t k = 1; k < 8; ++k) {
    for (size_t i = 0; i < 256; ++i) t[k][i] = (t[k - 1][i] >> 8) ^ t[0][t[k - 1][i] & 0xff];
  }
  return t;
}

constexpr CrcTables kCrcTables = make_crc_tables();

uint32_t load_le32(const uint8_t* p) {
  return uint32_t{p[0]} | uint32_t{p[1]} << 8 | uint32_t{p[2]} << 16 | uint32_t{p[3]} << 24;
}

// ---- encoding ------------------------------------------------------------------------------

void put_varint(std::string& out, uint64_t v) {
  while (v >= 0x80) {
    out.push_back(static_cast<char>((v & 0x7f) | 0x80));
    v >>= 7;
  }
  out.push_back(static_cast<char>(v));
}

void put_signed(std::string& out, int64_t v) {
  const uint64_t u = static_cast<uint64_t>(v);
  put_varint(out, (u << 1) ^ (v < 0 ? ~uint64_t{0} : 0));
}

void put_bytes(std::string& out, std::string_view s) {
  put_varint(out, s.size());
  out.append(s);
}

void put_u8(std::string& out, uint8_t v) {
  out.push_back(static_cast<char>(v));
}

void put_le32(std::string& out, uint32_t v) {
  for (int i = 0; i < 4; ++i) out.push_back(static_cast<char>((v >> (8 * i)) & 0xff));
}

void put_branch_ops(std::string& out, const BranchRecord& b) {
  put_u8(out, b.state);
  put_varint(out, b.attempts);
  put_varint(out, b.ops.size());
  for (const OpText& op : b.ops) {
    put_u8(out, static_cast<uint8_t>(op.op));
    put_bytes(out, op.json);
  }
  put_bytes(out, b.result);
  put_bytes(out, b.last_error);
}

// ---- decoding ------------------------------------------------------------------------------

// Reads the payload front to back; every read checks the bytes left.
class Reader {
 public:
  explicit Reader(std::string_view in) : in_(in) {}

  size_t left() const { return in_.size() - pos_; }

  Status u8(const char* what, uint8_t& out) {
    if (left() < 1) return truncated(what);
    out = static_cast<uint8_t>(in_[pos_++]);
    return ok_status();
  }

  Status varint(const char* what, uint64_t& out) {
    uint64_t v = 0;
    for (size_t i = 0; i < kVarintBytesMax; ++i) {
      if (left() < 1) return truncated(what);
      const uint64_t byte = static_cast<uint8_t>(in_[pos_++]);
      if (i == kVarintBytesMax - 1 && byte > 1) return bad(what, "varint overflows 64 bits");
      v |= (byte & 0x7f) << (7 * i);
      if ((byte & 0x80) == 0) {
        out = v;
        return ok_status();
      }
    }
    return bad(what, "varint longer than 10 bytes");
  }

  Status signed_varint(const char* what, int64_t& out) {
    uint64_t u = 0;
    TPC_RETURN_IF_ERROR(varint(what, u));
    out = static_cast<int64_t>((u >> 1) ^ (~(u & 1) + 1));
    return ok_status();
  }

  Status bytes(const char* what, std::string& out) {
    uint64_t n = 0;
    TPC_RETURN_IF_ERROR(varint(what, n));
    if (n > left()) return truncated(what);
    out.assign(in_.substr(pos_, n));
    pos_ += n;
    return ok_status();
  }

  static Status bad(const char* what, const std::string& why) {
    return corruption(std::string("decision record: ") + what + ": " + why);
  }

 private:
  static Status truncated(const char* what) {
    return corruption(std::string("decision record: truncated in ") + what);
  }

  std::string_view in_;
  size_t pos_ = 0;
};

Status decode_decision(Reader& r, Decision& out) {
  uint8_t v = 0;
  TPC_RETURN_IF_ERROR(r.u8("decision", v));
  if (v < static_cast<uint8_t>(Decision::commit) || v > static_cast<uint8_t>(Decision::half)) {
    return Reader::bad("decision", "value " + std::to_string(v) + " out of range");
  }
  out = static_cast<Decision>(v);
  return ok_status();
}

Status decode_outcome(Reader& r, BranchOutcome& out) {
  uint8_t v = 0;
  TPC_RETURN_IF_ERROR(r.u8("branch outcome", v));
  if (v > static_cast<uint8_t>(BranchOutcome::forced)) {
    return Reader::bad("branch outcome", "value " + std::to_string(v) + " out of range");
  }
  out = static_cast<BranchOutcome>(v);
  return ok_status();
}

Status decode_branch_ops(Reader& r, BranchRecord& b) {
  uint64_t attempts = 0, count = 0;
  TPC_RETURN_IF_ERROR(r.u8("branch state", b.state));
  TPC_RETURN_IF_ERROR(r.varint("branch attempts", attempts));
  if (attempts > UINT32_MAX) return Reader::bad("branch attempts", "more than 2^32");
  b.attempts = static_cast<uint32_t>(attempts);
  TPC_RETURN_IF_ERROR(r.varint("op count", count));
  if (count > r.left() / kOpBytesMin)
    return Reader::bad("op count", std::to_string(count) + " ops cannot fit in the bytes left");
  b.ops.resize(count);
  for (OpText& op : b.ops) {
    uint8_t v = 0;
    TPC_RETURN_IF_ERROR(r.u8("op", v));
    if (v >= kStepOps) return Reader::bad("op", "value " + std::to_string(v) + " out of range");
    op.op = static_cast<StepOp>(v);
    TPC_RETURN_IF_ERROR(r.bytes("op json", op.json));
  }
  TPC_RETURN_IF_ERROR(r.bytes("branch result", b.result));
  return r.bytes("branch last_error", b.last_error);
}

// TCC, saga and msg records come as version 2 (2PC and 3PC ones as version 1, or as version 2
// when they carry options), and only they hold the decisions of their own.
Status check_protocol_decision(const TxnRecord& rec, uint8_t version) {
  if (calls_ops(rec.protocol) && version < kRecordVersionOps)
    return Reader::bad("protocol", std::string(protocol_name(rec.protocol)) + " in a version " +
                                       std::to_string(version) + " record");
  bool tcc_only = rec.decision == Decision::registered;
  bool saga_only = rec.decision == Decision::running;  // or a notification's

  bool msg_only = rec.decision == Decision::half;
  bool xa_only = rec.decision == Decision::precommit || rec.decision == Decision::one_phase ||
                 rec.decision == Decision::committed_read_only;
  if ((tcc_only && rec.protocol != Protocol::tcc) ||
      (saga_only && rec.protocol != Protocol::saga && rec.protocol != Protocol::notify) ||
      (msg_only && rec.protocol != Protocol::msg) || (xa_only && calls_ops(rec.protocol)))
    return Reader::bad("decision", std::string(decision_name(rec.decision)) + " in a " +
                                       std::string(protocol_name(rec.protocol)) + " record");
  return ok_status();
}

Status decode_payload(std::string_view payload, uint8_t version, TxnRecord& rec) {
  Reader r(payload);
  TPC_RETURN_IF_ERROR(r.bytes("gid", rec.gid));
  uint8_t protocol = 0;
  TPC_RETURN_IF_ERROR(r.u8("protocol", protocol));
  auto p = protocol_from_byte(protocol);
  if (!p) return Reader::bad("protocol", "value " + std::to_string(protocol) + " is not 2 to 7");
  rec.protocol = *p;
  TPC_RETURN_IF_ERROR(decode_decision(r, rec.decision));
  uint8_t flags = 0;
  TPC_RETURN_IF_ERROR(r.u8("flags", flags));
  if ((flags & ~kFlagsKnown) != 0) {
    return Reader::bad("flags", "unknown bits in " + std::to_string(flags));
  }
  rec.ended = (flags & kFlagEnded) != 0;
  rec.heuristic_mixed = (flags & kFlagHeuristicMixed) != 0;
  TPC_RETURN_IF_ERROR(r.signed_varint("decided_wall_ms", rec.decided_wall_ms));
  TPC_RETURN_IF_ERROR(r.signed_varint("ended_wall_ms", rec.ended_wall_ms));
  uint64_t count = 0;
  TPC_RETURN_IF_ERROR(r.varint("branch count", count));
  // Bounds the allocation by the bytes actually present.
  if (count > r.left() / kBranchBytesMin) {
    return Reader::bad("branch count",
                       std::to_string(count) + " branches cannot fit in the bytes left");
  }
  rec.branches.resize(count);
  for (BranchRecord& b : rec.branches) {
    TPC_RETURN_IF_ERROR(r.bytes("branch participant", b.participant));
    TPC_RETURN_IF_ERROR(r.bytes("branch url", b.url));
    TPC_RETURN_IF_ERROR(decode_outcome(r, b.outcome));
    if (version >= kRecordVersionOps) TPC_RETURN_IF_ERROR(decode_branch_ops(r, b));
  }
  if (version >= kRecordVersionOps) TPC_RETURN_IF_ERROR(r.bytes("options", rec.options));
  TPC_RETURN_IF_ERROR(check_protocol_decision(rec, version));
  if (r.left() != 0) {
    return Reader::bad("end", std::to_string(r.left()) + " trailing bytes after the record");
  }
  return ok_status();
}

std::string hex32(uint32_t v) {
  static constexpr char kDigits[] = "0123456789abcdef";
  std::string s = "0x";
  for (int i = 7; i >= 0; --i) s.push_back(kDigits[(v >> (4 * i)) & 0xf]);
  return s;
}

}  // namespace

uint32_t crc32c(std::string_view data) {
  const auto* p = reinterpret_cast<const uint8_t*>(data.data());
  size_t n = data.size();
  uint32_t crc = ~uint32_t{0};
  const auto& t = kCrcTables;
  while (n >= 8) {
    const uint32_t one = load_le32(p) ^ crc;
    const uint32_t two = load_le32(p + 4);
    crc = t[7][one & 0xff] ^ t[6][(one >> 8) & 0xff] ^ t[5][(one >> 16) & 0xff] ^ t[4][one >> 24] ^
          t[3][two & 0xff] ^ t[2][(two >> 8) & 0xff] ^ t[1][(two >> 16) & 0xff] ^ t[0][two >> 24];
    p += 8;
    n -= 8;
  }
  while (n-- > 0) crc = (crc >> 8) ^ t[0][(crc ^ *p++) & 0xff];
  return ~crc;
}

std::string encode_record(const TxnRecord& r) {
  std::string payload;
  payload.reserve(32 + r.gid.size() + r.branches.size() * 48);
  put_bytes(payload, r.gid);
  put_u8(payload, protocol_byte(r.protocol));
  put_u8(payload, static_cast<uint8_t>(r.decision));
  put_u8(payload, static_cast<uint8_t>((r.ended ? kFlagEnded : 0) |
                                       (r.heuristic_mixed ? kFlagHeuristicMixed : 0)));
  put_signed(payload, r.decided_wall_ms);
  put_signed(payload, r.ended_wall_ms);
  const bool ops = calls_ops(r.protocol) || !r.options.empty();
  put_varint(payload, r.branches.size());
  for (const BranchRecord& b : r.branches) {
    put_bytes(payload, b.participant);
    put_bytes(payload, b.url);
    put_u8(payload, static_cast<uint8_t>(b.outcome));
    if (ops) put_branch_ops(payload, b);
  }
  if (ops) put_bytes(payload, r.options);

  std::string value;
  value.reserve(kHeaderBytes + payload.size());
  put_u8(value, ops ? kRecordVersionOps : kRecordVersion);
  put_le32(value, crc32c(payload));
  value.append(payload);
  return value;
}

Result<TxnRecord> decode_record(std::string_view value) {
  if (value.size() < kHeaderBytes) {
    return corruption("decision record: truncated header (" + std::to_string(value.size()) +
                      " of " + std::to_string(kHeaderBytes) + " bytes)");
  }
  const auto version = static_cast<uint8_t>(value[0]);
  if (version != kRecordVersion && version != kRecordVersionOps) {
    return corruption("decision record: unknown version " + std::to_string(version) +
                      " (this build reads versions " + std::to_string(kRecordVersion) + " and " +
                      std::to_string(kRecordVersionOps) + ")");
  }
  const uint32_t stored = load_le32(reinterpret_cast<const uint8_t*>(value.data() + 1));
  const std::string_view payload = value.substr(kHeaderBytes);
  const uint32_t computed = crc32c(payload);
  if (stored != computed) {
    return corruption("decision record: checksum mismatch (stored " + hex32(stored) +
                      ", computed " + hex32(computed) + ")");
  }
  TxnRecord rec;
  TPC_RETURN_IF_ERROR(decode_payload(payload, version, rec));
  return rec;
}

std::string_view decision_name(Decision d) {
  switch (d) {
    case Decision::commit:
      return "commit";
    case Decision::precommit:
      return "precommit";
    case Decision::one_phase:
      return "one_phase";
    case Decision::aborted:
      return "aborted";
    case Decision::committed_read_only:
      return "committed_read_only";
    case Decision::registered: return "registered";
    case Decision::running: return "running";
    case Decision::half: return "half";
  }
  return "unknown";
}

bool decision_may_follow(Decision from, Decision to) {
  if (from == to) return true;
  bool undecided =
      from == Decision::registered || from == Decision::running || from == Decision::half;
  return undecided && (to == Decision::commit || to == Decision::aborted);
}

std::string_view outcome_name(BranchOutcome o) {
  switch (o) {
    case BranchOutcome::pending:
      return "pending";
    case BranchOutcome::committed:
      return "committed";
    case BranchOutcome::aborted:
      return "aborted";
    case BranchOutcome::read_only:
      return "read_only";
    case BranchOutcome::forced:
      return "forced";
  }
  return "unknown";
}

}  // namespace tpc::wal
