#!/usr/bin/env bash
# scripts/crash-test.sh: the crash-recovery and fault-injection suite.
#
# With real PostgreSQL clusters and real processes, concurrent transfers between two databases
# run while faults hit: every named failpoint once (armed at run time on its process, action
# 1*crash; the process dies, is restarted, recovers), kill -9 of each process, SIGSTOP/SIGCONT,
# and PostgreSQL stopped -m immediate while branches are prepared; then a randomized chaos run.
# After each fault it checks that every transfer is all-committed or all-aborted on both
# databases, the total balance is unchanged, nothing of ours is left in pg_prepared_xacts, and
# reports how long branches stayed prepared. Exit code 0 only with zero violations; a failing
# run prints the command that reproduces it.
#
# usage: scripts/crash-test.sh [--quick] [--seed S] [--clients N] [--bin DIR]
#        scripts/crash-test.sh --chaos [--seed S] [--minutes M | --seconds N] [--protocol P]
#   (default)   the failpoint table, then a 60 s chaos run
#   --quick     the failpoint table, then a 20 s chaos run (what scripts/test.sh runs)
#   --chaos     only the chaos run (default 10 minutes), with its scorecard
#   --seed S    the chaos run's seed (default: a new one, printed)
#   --protocol  2pc, 3pc, tcc, saga, msg or mix (all five) for the chaos run (default: mix)
#   --bin DIR   use DIR/tpc-chaos and skip the install and build steps
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

MODE=full
SEED=""
SECONDS_ARG=""
CLIENTS=8
PROTOCOL=mix
BIN=""

usage() { sed -n '2,/^set -euo/{/^#/s/^# \{0,1\}//p}' "$0"; }

parse_args() {
  while (($#)); do
    case $1 in
      --quick) MODE=quick ;;
      --chaos) MODE=chaos ;;
      --seed) SEED=${2:?--seed needs a value}; shift ;;
      --minutes) [[ ${2:-} =~ ^[1-9][0-9]*$ ]] || tpc_die "--minutes needs a positive number"
                 SECONDS_ARG=$(($2 * 60)); shift ;;
      --seconds) [[ ${2:-} =~ ^[1-9][0-9]*$ ]] || tpc_die "--seconds needs a positive number"
                 SECONDS_ARG=$2; shift ;;
      --clients) [[ ${2:-} =~ ^[1-9][0-9]*$ ]] || tpc_die "--clients needs a positive number"
                 CLIENTS=$2; shift ;;
      --protocol) PROTOCOL=${2:?--protocol needs a value}; shift ;;
      --bin) BIN=${2:?--bin needs a directory}; shift ;;
      -h | --help) usage; exit 0 ;;
      *) tpc_die "unknown option '$1' (see --help)" ;;
    esac
    shift
  done
  [[ $SEED =~ ^[0-9]*$ ]] || tpc_die "--seed must be a number"
  [[ $PROTOCOL =~ ^(2pc|3pc|tcc|saga|msg|mix)$ ]] || tpc_die "--protocol must be 2pc, 3pc, tcc, saga, msg or mix"
}

main() {
  parse_args "$@"
  if [[ -z $BIN ]]; then
    tpc_install_deps
    tpc_build
    BIN="$TPC_ROOT/build/bin"
  fi
  [[ -x $BIN/tpc-chaos ]] || tpc_die "$BIN/tpc-chaos is missing (build with -DTPC_INTEGRATION_TESTS=ON)"
  [[ -n $SEED ]] || SEED=$(( (RANDOM << 15) | RANDOM ))
  local status=0
  if [[ $MODE != chaos ]]; then
    tpc_step "failpoint table: every failpoint once, then external faults"
    "$BIN/tpc-chaos" --table --seed "$SEED" --clients "$CLIENTS" || status=1
  fi
  local seconds=${SECONDS_ARG:-$([[ $MODE == chaos ]] && echo 600 || ([[ $MODE == quick ]] && echo 20 || echo 60))}
  tpc_step "chaos run: ${seconds}s, seed $SEED, protocol $PROTOCOL"
  "$BIN/tpc-chaos" --chaos --seed "$SEED" --seconds "$seconds" --clients "$CLIENTS" \
    --protocol "$PROTOCOL" || status=1
  if ((status)); then
    tpc_say "crash test FAILED: the commands above reproduce each failing run (seed $SEED)"
  else
    tpc_say "crash test passed: 0 violations (seed $SEED)"
  fi
  return $status
}

main "$@"
