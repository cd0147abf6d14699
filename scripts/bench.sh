#!/usr/bin/env bash
# scripts/bench.sh: the benchmark. Installs what is missing, builds (Release, no failpoints),
# and runs build-release/bin/tpc-bench, which starts its own PostgreSQL clusters (fsync on), a
# coordinator and one agent per database, and measures every mode at every concurrency in one
# run on this machine: raw hand-driven 2PC (the baseline), the pipelined raw variant, plain
# local transactions, interactive and one-shot transactions through tpc, and the coordinator
# alone against fake participants; then a restart with 100k decided-but-unfinished
# transactions. Figures are medians of --repeat runs; each mode's ratio is to raw at the same
# concurrency.
#
# usage: scripts/bench.sh [--quick] [--json] [-- TPC_BENCH_ARGS...]
#   --quick   2 participants, concurrency 1,8,32, one run per cell (a few minutes)
#   --json    JSON instead of tables
#   default   2 and 4 participants, concurrency 1,8,32,64, medians of 3, recovery of 100k
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

ARGS=(--participants 2,4 --concurrency 1,8,32,64 --repeat 3 --seconds 5 --recovery 100000)
EXTRA=()

usage() { sed -n '2,/^set -euo/{/^#/s/^# \{0,1\}//p}' "$0"; }

while (($#)); do
  case $1 in
    --quick) ARGS=(--participants 2 --concurrency 1,8,32 --repeat 1 --seconds 4 --recovery 100000) ;;
    --json) EXTRA+=(--json) ;;
    --) shift; EXTRA+=("$@"); break ;;
    -h | --help) usage; exit 0 ;;
    *) tpc_die "unknown option '$1' (see --help)" ;;
  esac
  shift
done

tpc_install_deps
tpc_build_dir build-release -DCMAKE_BUILD_TYPE=Release
tpc_say "machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(sed -n 's/^model name\s*: //p' /proc/cpuinfo | head -1)"
tpc_say "command: build-release/bin/tpc-bench ${ARGS[*]} ${EXTRA[*]}"
exec "$TPC_ROOT/build-release/bin/tpc-bench" "${ARGS[@]}" "${EXTRA[@]}"
