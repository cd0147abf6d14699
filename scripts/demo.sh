#!/usr/bin/env bash
# scripts/demo.sh: the project's "run" command, a first look at tpc in about a minute.
#
# Installs what is missing, builds build-demo/ (no failpoints: the binaries people run),
# starts two throw-away PostgreSQL clusters (bank_a,
# bank_b), a tpc-coordinator, one tpc-agent per database and a small HTTP service holding
# wallets (tpc-http-participant, for the TCC and saga examples), then moves money between the two
# databases over the HTTP API: one transfer that commits on both, and one that fails on bank_a
# (CHECK constraint) and therefore changes neither. It checks the balances, the total and that
# no prepared transaction is left behind. Then it runs the README's examples (the ```sh blocks
# marked <!-- demo: run -->) literally against the same services, checks each answer against the
# README's answer lines and the total after each block, and exits non-zero if anything is off.
#
# Ports: the coordinator on 7400, the agents bank_a on 7401 and bank_b on 7402, the wallet
# service on 7403, as in the README; a port already taken is replaced by a free one, and the
# export lines printed at the start (TPC_COORD, TPC_BANK_A, TPC_BANK_B, TPC_WALLET) always name
# the ones in use.
#
# usage: scripts/demo.sh [--keep]
#   --keep   leave everything running afterwards and print how to reach and stop it
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

BIN="$TPC_ROOT/build-demo/bin"
KEEP=0
RUN_DIR=""
declare -A PG_DIR=() AGENT_URL=() AGENT_PORT=() SERVICE_PID=() SERVICE_LOG=()
COORD_PORT=""
WALLET_PORT=""
WALLET_URL=""
WALLET_PORT_WANTED=7403
README="$TPC_ROOT/README.md"
# The ports the README's examples name; taken ones are replaced (see demo_port).
COORD_PORT_WANTED=7400
declare -A AGENT_PORT_WANTED=([bank_a]=7401 [bank_b]=7402)
BANKS=()    # names in start order
SERVICES=() # names in start order
COORD_URL=""
FAILURES=0
HTTP_STATUS=""
HTTP_BODY=""

usage() { sed -n '2,/^set -euo/{/^#/s/^# \{0,1\}//p}' "$0"; }

parse_args() {
  while (($#)); do
    case $1 in
      --keep) KEEP=1 ;;
      -h | --help) usage; exit 0 ;;
      *) tpc_die "unknown option '$1' (see --help)" ;;
    esac
    shift
  done
}

# --- set-up -------------------------------------------------------------------------------

install_and_build() {
  tpc_step "packages and build"
  tpc_install_deps
  local start=$SECONDS log="$TPC_ROOT/build-demo/build.log"
  if [[ -x $BIN/tpc-coordinator && -x $BIN/tpc-agent && -x $BIN/tpcctl && -x $BIN/tpc-http-participant ]]; then
    tpc_say "building build-demo/ (log: build-demo/build.log)"
  else
    tpc_say "building build-demo/: the first build takes a few minutes (log: build-demo/build.log)"
  fi
  mkdir -p "$TPC_ROOT/build-demo"
  : >"$log"
  # The services and the tool only, without failpoints and without the tests.
  TPC_BUILD_LOG=$log tpc_configure build-demo -DTPC_FAILPOINTS=OFF -DTPC_INTEGRATION_TESTS=OFF
  TPC_BUILD_LOG=$log tpc_compile build-demo tpc-coordinator tpc-agent tpcctl tpc-http-participant || exit 1
  tpc_say "build: done in $(tpc_elapsed "$start")"
}

make_run_dir() {
  RUN_DIR=$(mktemp -d "${TMPDIR:-/tmp}/tpc-demo.XXXXXX")
  chmod 0755 "$RUN_DIR" # the postgres account must reach the clusters when we are root
}

# start_bank NAME ROWS_SQL: a cluster with an accounts table holding ROWS_SQL. `frozen` is
# what TCC tries have reserved and not yet confirmed or cancelled (README, TCC).
start_bank() {
  local name=$1 rows=$2 port
  tpc_free_port port
  PG_DIR[$name]="$RUN_DIR/$name"
  BANKS+=("$name")
  tpc_pg_create "${PG_DIR[$name]}" "$port"
  tpc_pg_start "${PG_DIR[$name]}"
  tpc_psql "${PG_DIR[$name]}" "CREATE TABLE accounts (id int PRIMARY KEY, owner text NOT NULL,
      balance bigint NOT NULL CHECK (balance >= 0),
      frozen bigint NOT NULL DEFAULT 0 CHECK (frozen >= 0 AND frozen <= balance));
    INSERT INTO accounts VALUES $rows;"
  tpc_say "  PostgreSQL $name   127.0.0.1:$port"
}

# start_service NAME URL CMD...: start, remember, wait for URL/healthz.
start_service() {
  local name=$1 url=$2
  shift 2
  SERVICE_LOG[$name]="$RUN_DIR/$name.log"
  tpc_start_service "$name" "${SERVICE_LOG[$name]}" "$@"
  SERVICE_PID[$name]=$TPC_SERVICE_PID
  SERVICES+=("$name")
  tpc_wait_http "$url/healthz" 30 "${SERVICE_LOG[$name]}" "$TPC_SERVICE_PID"
}

# demo_port VAR WANTED: WANTED when nothing listens on it, else a free port (into VAR).
demo_port() {
  if tpc_port_in_use "$2"; then
    tpc_free_port "$1"
    tpc_warn "port $2 is taken: using ${!1} instead (the export lines below name it)"
  else
    printf -v "$1" '%s' "$2"
    TPC_PORTS_GIVEN+="$2 "
  fi
}

# choose_ports: every service's port and URL, before any starts (the coordinator names the
# agents with --participant).
choose_ports() {
  local name
  demo_port COORD_PORT "$COORD_PORT_WANTED"
  COORD_URL="http://127.0.0.1:$COORD_PORT"
  for name in bank_a bank_b; do
    demo_port "AGENT_PORT[$name]" "${AGENT_PORT_WANTED[$name]}"
    AGENT_URL[$name]="http://127.0.0.1:${AGENT_PORT[$name]}"
  done
  demo_port WALLET_PORT "$WALLET_PORT_WANTED"
  WALLET_URL="http://127.0.0.1:$WALLET_PORT"
}

# The wallet service: an in-memory ledger answering HTTP ops (tools/http_participant.h), with
# erin's wallet, empty.
start_wallet() {
  start_service wallet "$WALLET_URL" "$BIN/tpc-http-participant" --listen "127.0.0.1:$WALLET_PORT"
  curl -sS -f -o /dev/null -X POST "$WALLET_URL/accounts" -d '{"erin":0}' ||
    tpc_die "could not create erin's wallet at $WALLET_URL"
  tpc_say "  wallet service      $WALLET_URL"
}

start_coordinator() {
  start_service coordinator "$COORD_URL" "$BIN/tpc-coordinator" \
    --data-dir "$RUN_DIR/coordinator-data" --listen "127.0.0.1:$COORD_PORT" --id c1 \
    --participant "bank_a=${AGENT_URL[bank_a]}" --participant "bank_b=${AGENT_URL[bank_b]}"
  tpc_say "  tpc-coordinator     $COORD_URL"
}

start_agent() {
  local name=$1 port=${AGENT_PORT[$1]} pg_port
  pg_port=$(tpc_pg_port "${PG_DIR[$name]}")
  start_service "agent-$name" "${AGENT_URL[$name]}" "$BIN/tpc-agent" --name "$name" \
    --listen "127.0.0.1:$port" \
    --pg "host=127.0.0.1 port=$pg_port dbname=postgres user=tpc" \
    --coordinator "c1=$COORD_URL"
  tpc_say "  tpc-agent $name    ${AGENT_URL[$name]}"
}

start_everything() {
  tpc_step "starting two PostgreSQL clusters, the coordinator and one agent per database"
  start_bank bank_a "(1, 'alice', 1000), (2, 'bob', 500)"
  start_bank bank_b "(1, 'carol', 200), (2, 'dave', 800)"
  choose_ports
  start_coordinator
  start_agent bank_a
  start_agent bank_b
  start_wallet
  print_exports
}

# print_exports: the shell lines that point the README's examples at this demo.
print_exports() {
  tpc_say ""
  tpc_say "  the README's examples use these (paste them into your shell):"
  tpc_say "  $(export_lines | sed '2,$s/^/  /')"
}

export_lines() {
  printf 'export TPC_COORD=%s TPC_BANK_A=%s TPC_BANK_B=%s TPC_WALLET=%s\n' "$COORD_URL" \
    "${AGENT_URL[bank_a]}" "${AGENT_URL[bank_b]}" "$WALLET_URL"
  # shellcheck disable=SC2016 # $PATH expands in the user's shell
  printf 'export PATH=%s:$PATH\n' "$BIN"
}

# --- HTTP and checks ----------------------------------------------------------------------

# http METHOD URL [BODY]: prints the call as a curl command and the answer (status, JSON);
# leaves them in HTTP_STATUS and HTTP_BODY.
http() {
  local method=$1 url=$2 body=${3:-} out
  local -a data=()
  [[ -z $body ]] || data=(-H 'Content-Type: application/json' --data "$body")
  # shellcheck disable=SC2016 # a literal '$ ' prompt
  printf '\n$ curl -X %s %s%s\n' "$method" "$url" "${body:+ -d '$body'}"
  out=$(mktemp "$RUN_DIR/http.XXXXXX")
  HTTP_STATUS=$(curl -sS -o "$out" -w '%{http_code}' --max-time 30 -X "$method" "${data[@]}" "$url") ||
    tpc_die "HTTP $method $url failed (is the service running? logs in $RUN_DIR)"
  HTTP_BODY=$(cat "$out")
  rm -f "$out"
  printf '%s\n' "$HTTP_STATUS"
  jq -r "$JQ_SHOW" <<<"$HTTP_BODY" 2>/dev/null || printf '%s\n' "$HTTP_BODY"
}

# A jq program printing JSON compactly but readably: objects one field a line (gid and state
# first), an array of objects one object a line.
# shellcheck disable=SC2016 # jq variables, not shell ones
JQ_SHOW='
def first_keys: ["gid", "state", "decision", "reason", "branch"];
def show(ind):
  if type == "object" and length > 0 then
    "{\n" + ([to_entries | sort_by(.key as $k | first_keys | index($k) // 99) | .[]
              | ind + "  " + (.key | tojson) + ": " + (.value | show(ind + "  "))]
             | join(",\n")) + "\n" + ind + "}"
  elif type == "array" and length > 0 and all(.[]; type == "object") then
    "[\n" + (map(ind + "  " + tojson) | join(",\n")) + "\n" + ind + "]"
  else tojson end;
show("")'

# check DESCRIPTION CMD...: prints [ok] or [FAIL] DESCRIPTION; counts failures.
check() {
  local what=$1
  shift
  if "$@"; then
    printf '  [ok]   %s\n' "$what"
  else
    printf '  [FAIL] %s\n' "$what"
    FAILURES=$((FAILURES + 1))
  fi
}

# answer_is STATUS [JQ_FILTER]: the last answer had STATUS and JQ_FILTER is true on its body.
answer_is() {
  [[ $HTTP_STATUS == "$1" ]] || return 1
  [[ -z ${2:-} ]] || jq -e "$2" >/dev/null 2>&1 <<<"$HTTP_BODY"
}

# --- the transfers ------------------------------------------------------------------------

# shellcheck disable=SC2016 # $1, $2 are PostgreSQL bind parameters
SQL_DEBIT='UPDATE accounts SET balance = balance - $1 WHERE id = $2'
# shellcheck disable=SC2016
SQL_CREDIT='UPDATE accounts SET balance = balance + $1 WHERE id = $2'

# exec_body SQL AMOUNT ID: the JSON body of an exec request.
exec_body() { jq -cn --arg sql "$1" --argjson amount "$2" --argjson id "$3" '{sql: $sql, params: [$amount, $id]}'; }

# balances: "bank_a alice=1000 bob=500 | bank_b carol=200 dave=800 | wallet erin=0 | total=2500"
balances() {
  local name rows total=0 line="" owner balance
  for name in bank_a bank_b; do
    rows=$(tpc_psql "${PG_DIR[$name]}" "SELECT owner, balance FROM accounts ORDER BY id")
    line+="$name"
    while IFS='|' read -r owner balance; do
      line+=" $owner=$balance"
      total=$((total + balance))
    done <<<"$rows"
    line+=" | "
  done
  balance=$(curl -sS -f "$WALLET_URL/accounts" | jq -r '.accounts.erin.balance') ||
    tpc_die "could not read the wallets at $WALLET_URL"
  line+="wallet erin=$balance | "
  total=$((total + balance))
  printf '%stotal=%s\n' "$line" "$total"
}

total_of() { printf '%s\n' "${1##*total=}"; }

begin_transaction() {
  http POST "$COORD_URL/v1/transactions" '{"protocol":"2pc"}'
  check "begin: 201, state active" answer_is 201 '.state == "active" and (.gid | length > 0)'
  GID=$(jq -r '.gid // empty' <<<"$HTTP_BODY")
  [[ -n $GID ]] || tpc_die "the coordinator gave no gid; cannot go on"
}

transfer_that_commits() {
  tpc_step "transfer 300 from alice (bank_a) to carol (bank_b): commits on both"
  BEFORE=$(balances)
  tpc_say "balances before: $BEFORE"
  begin_transaction
  http POST "${AGENT_URL[bank_a]}/v1/branches/$GID/exec" "$(exec_body "$SQL_DEBIT" 300 1)"
  check "debit on bank_a: 200" answer_is 200
  http POST "${AGENT_URL[bank_b]}/v1/branches/$GID/exec" "$(exec_body "$SQL_CREDIT" 300 1)"
  check "credit on bank_b: 200" answer_is 200
  http POST "$COORD_URL/v1/transactions/$GID/commit"
  check "commit: 200, state committed" answer_is 200 '.state == "committed"'
  AFTER=$(balances)
  tpc_say ""
  tpc_say "balances after:  $AFTER"
  check "alice lost 300 and carol got 300" \
    test "$AFTER" = "$(expected_after_commit)"
  check "total unchanged ($(total_of "$BEFORE"))" test "$(total_of "$AFTER")" = "$(total_of "$BEFORE")"
}

# The balances once the first transfer committed (from the rows created by start_everything).
expected_after_commit() { printf '%s\n' 'bank_a alice=700 bob=500 | bank_b carol=500 dave=800 | wallet erin=0 | total=2500'; }

transfer_that_aborts() {
  tpc_step "transfer 5000 from bob (bank_a, balance 500) to dave (bank_b): all or nothing"
  BEFORE=$(balances)
  begin_transaction
  http POST "${AGENT_URL[bank_a]}/v1/branches/$GID/exec" "$(exec_body "$SQL_DEBIT" 5000 2)"
  check "debit on bank_a: 422, sqlstate 23514 (CHECK balance >= 0)" \
    answer_is 422 '[.. | objects | .sqlstate? // empty] | index("23514") != null'
  http POST "${AGENT_URL[bank_b]}/v1/branches/$GID/exec" "$(exec_body "$SQL_CREDIT" 5000 2)"
  check "credit on bank_b: 200 (this branch alone is fine)" answer_is 200
  http POST "$COORD_URL/v1/transactions/$GID/commit"
  check "commit: 409, state aborted" answer_is 409 '.state == "aborted"'
  AFTER=$(balances)
  tpc_say ""
  tpc_say "balances after:  $AFTER"
  check "neither database changed" test "$AFTER" = "$BEFORE"
}

show_transactions() {
  tpc_step "tpcctl --coordinator $COORD_URL list"
  "$BIN/tpcctl" --coordinator "$COORD_URL" list || check "tpcctl list works" false
}

# --- the README's examples ---------------------------------------------------------------

# readme_blocks DIR: writes each ```sh block of README.md that follows a <!-- demo: run --> line
# to DIR/readme-N.sh (N from 1, in README order) and prints how many there are.
readme_blocks() {
  awk -v dir="$1" '
    /^<!-- demo: run -->$/ { marked = 1; next }
    marked && /^```sh$/ { n++; inside = 1; marked = 0; next }
    inside && /^```$/ { inside = 0; next }
    inside { print > (dir "/readme-" n ".sh") }
    { marked = 0 }
    END { print n + 0 }' "$README"
}

# expected_pairs FILE: the "key":scalar pairs of the answer lines (comments showing JSON) in
# FILE, one a line; gids differ from run to run and are left out.
expected_pairs() {
  grep -E '^ *# ?\{|^ *#  "' "$1" | grep -oE '"[a-z_]+":("[^"]*"|-?[0-9]+|true|false|null)' |
    grep -v '^"gid":' || true
}

# answer_has_pairs OUT FILE: every expected pair of FILE appears in the output OUT.
answer_has_pairs() {
  local pair absent=0
  while IFS= read -r pair; do
    grep -qF -- "$pair" "$1" || {
      tpc_say "    missing in the answers: $pair"
      absent=1
    }
  done < <(expected_pairs "$2")
  return "$absent"
}

# run_readme_block N FILE: runs FILE in this shell (GID and other variables carry over to the
# next block, as in a terminal), shows its output and checks it.
run_readme_block() {
  local n=$1 file=$2 out="$RUN_DIR/readme-$1.out" before
  before=$(balances)
  tpc_say ""
  tpc_say "--- README block $n ---"
  sed 's/^/  $ /' "$file" | grep -v '^  \$ *#' || true
  # shellcheck disable=SC1090 # the README's code
  # In a || list, errexit is off inside the block: every command of it runs, as when pasted.
  { source "$file" || true; } >"$out" 2>&1
  sed 's/^/  /' "$out"
  [[ ! -s $out || -z $(tail -c 1 "$out") ]] || printf '\n' # curl's answers end without one
  check "README block $n: the answers README.md shows" answer_has_pairs "$out" "$file"
  check "README block $n: total unchanged ($(total_of "$before"))" \
    test "$(total_of "$(balances)")" = "$(total_of "$before")"
}

run_readme_examples() {
  local count n
  tpc_step "the README's examples, pasted as they are"
  export TPC_COORD=$COORD_URL TPC_BANK_A=${AGENT_URL[bank_a]} TPC_BANK_B=${AGENT_URL[bank_b]} \
    TPC_WALLET=$WALLET_URL
  export PATH="$BIN:$PATH"
  count=$(readme_blocks "$RUN_DIR")
  check "README.md has examples marked <!-- demo: run -->" test "$count" -gt 0
  for ((n = 1; n <= count; n++)); do run_readme_block "$n" "$RUN_DIR/readme-$n.sh"; done
  check "balances after the README: $(expected_after_readme)" \
    test "$(balances)" = "$(expected_after_readme)"
}

# The balances once the README's examples ran: three transfers of 100 from alice to carol
# (interactive, one-shot and TCC) committed, a saga moved 50 from alice to erin's wallet, the
# transfers of 5000 from bob (2PC, TCC and saga) aborted; messages moved 20 from alice to dave
# and 30 from alice to erin's wallet, and a half message nobody committed was fenced.
expected_after_readme() { printf '%s\n' 'bank_a alice=300 bob=500 | bank_b carol=800 dave=820 | wallet erin=80 | total=2500'; }

frozen_total() { tpc_psql "${PG_DIR[$1]}" "SELECT coalesce(sum(frozen), 0) FROM accounts"; }

prepared_count() { tpc_psql "${PG_DIR[$1]}" "SELECT count(*) FROM pg_prepared_xacts"; }

# no_prepared_left NAME: polls until NAME has no prepared transaction (phase 2 of an abort
# may still be on its way right after the answer), 15 s at most.
no_prepared_left() {
  local deadline=$((SECONDS + 15))
  until [[ $(prepared_count "$1") == 0 ]]; do
    ((SECONDS < deadline)) || return 1
    sleep 0.1
  done
}

final_checks() {
  tpc_step "checks"
  check "bank_a: SELECT count(*) FROM pg_prepared_xacts = 0" no_prepared_left bank_a
  check "bank_b: SELECT count(*) FROM pg_prepared_xacts = 0" no_prepared_left bank_b
  check "bank_a: nothing left frozen by TCC tries" test "$(frozen_total bank_a)" = 0
  check "bank_b: nothing left frozen by TCC tries" test "$(frozen_total bank_b)" = 0
  check "final balances: $(expected_after_readme)" test "$(balances)" = "$(expected_after_readme)"
}

# --- clean-up -----------------------------------------------------------------------------

stop_everything() {
  local i name
  for ((i = ${#SERVICES[@]} - 1; i >= 0; i--)); do
    name=${SERVICES[i]}
    (tpc_stop_service "${SERVICE_PID[$name]}" "$name") || tpc_warn "could not stop $name"
  done
  for name in "${BANKS[@]}"; do
    (tpc_pg_stop "${PG_DIR[$name]}" fast) || tpc_warn "could not stop PostgreSQL $name"
  done
  rm -rf "$RUN_DIR" || tpc_warn "could not remove $RUN_DIR"
}

show_logs_tail() {
  local name
  for name in "${SERVICES[@]}"; do tpc_tail_log "${SERVICE_LOG[$name]}" 10; done
}

# write_stop_script: RUN_DIR/stop.sh, self-contained (the helpers it needs are copied in).
write_stop_script() {
  local i name
  {
    printf '#!/usr/bin/env bash\n# Stops the tpc demo in %s and removes that directory.\nset -uo pipefail\n' "$RUN_DIR"
    declare -f tpc_say tpc_warn tpc_die tpc_tail_log tpc_is_root tpc_pid_alive tpc_stop_service \
      tpc_pg_bindir tpc_pg_as_owner tpc_pg_port tpc_pg_stop
    for ((i = ${#SERVICES[@]} - 1; i >= 0; i--)); do
      name=${SERVICES[i]}
      printf 'tpc_stop_service %q %q\n' "${SERVICE_PID[$name]}" "$name"
    done
    for name in "${BANKS[@]}"; do
      printf '(tpc_pg_stop %q fast)\n' "${PG_DIR[$name]}"
    done
    printf 'rm -rf %q && echo "stopped; removed %s"\n' "$RUN_DIR" "$RUN_DIR"
  } >"$RUN_DIR/stop.sh"
  chmod +x "$RUN_DIR/stop.sh"
}

print_keep_info() {
  local name
  tpc_step "still running (--keep)"
  tpc_say "  coordinator   $COORD_URL    ($BIN/tpcctl --coordinator $COORD_URL list)"
  for name in "${BANKS[@]}"; do
    [[ -n ${AGENT_URL[$name]:-} ]] || continue
    tpc_say "  agent $name  ${AGENT_URL[$name]}"
  done
  for name in "${BANKS[@]}"; do
    tpc_say "  psql $name   psql -h 127.0.0.1 -p $(tpc_pg_port "${PG_DIR[$name]}") -U tpc postgres"
  done
  tpc_say "  wallet        $WALLET_URL/accounts"
  tpc_say "  for the README $(export_lines | head -n 1)"
  tpc_say "                $(export_lines | tail -n 1)"
  tpc_say "  logs          $RUN_DIR/*.log"
  tpc_say "  stop it all   $RUN_DIR/stop.sh"
}

on_exit() {
  local status=$?
  trap - EXIT
  [[ -n $RUN_DIR ]] || exit "$status"
  if ((KEEP)); then
    write_stop_script
    print_keep_info
    exit "$status"
  fi
  case $status in
    0) ;;
    130 | 143) tpc_say "interrupted: stopping the services and clusters" ;;
    *)
      tpc_say "the demo failed; the last lines of the services' logs:"
      show_logs_tail
      ;;
  esac
  stop_everything
  exit "$status"
}

main() {
  parse_args "$@"
  tpc_say "tpc demo: one transfer between two PostgreSQL databases, committed or aborted as a whole"
  install_and_build
  make_run_dir
  trap on_exit EXIT
  trap 'exit 130' INT
  trap 'exit 143' TERM
  start_everything
  transfer_that_commits
  transfer_that_aborts
  show_transactions
  run_readme_examples
  final_checks
  if ((FAILURES > 0)); then
    tpc_die "$FAILURES check(s) failed"
  fi
  tpc_say ""
  tpc_say "demo passed: the committed transfer is on both databases, the failed one on neither."
}

main "$@"
