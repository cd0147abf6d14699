#!/usr/bin/env bash
# scripts/test.sh: the project's "test" command; .ci/run calls it.
#
# Installs what is missing, builds build/ (RelWithDebInfo, failpoints on) and a sanitizer
# tree build-asan/ (ASan+UBSan, Debug, unit tests only), runs the sanitizer unit tests, then
# every test of build/ (unit and PostgreSQL integration tests; those start their own
# clusters). The main ctest run comes last, so its summary is the last thing printed. The exit
# code is non-zero if any phase failed.
#
# usage: scripts/test.sh [--quick] [--jobs N]
#   --quick    skip the sanitizer tree
#   --jobs N   build with N jobs (default: nproc) and run N tests at once (default: 2)
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

QUICK=0
BUILD_JOBS=$(nproc)
TEST_JOBS=2
FAILED=()        # phases that failed
declare -A PHASE_TIME=()
PHASES=()        # phases in the order they ran

usage() { sed -n '2,/^set -euo/{/^#/s/^# \{0,1\}//p}' "$0"; }

parse_args() {
  while (($#)); do
    case $1 in
      --quick) QUICK=1 ;;
      --jobs)
        [[ ${2:-} =~ ^[1-9][0-9]*$ ]] || tpc_die "--jobs needs a positive number"
        BUILD_JOBS=$2
        TEST_JOBS=$2
        shift
        ;;
      --jobs=*)
        [[ ${1#--jobs=} =~ ^[1-9][0-9]*$ ]] || tpc_die "--jobs needs a positive number"
        BUILD_JOBS=${1#--jobs=}
        TEST_JOBS=$BUILD_JOBS
        ;;
      -h | --help) usage; exit 0 ;;
      *) tpc_die "unknown option '$1' (see --help)" ;;
    esac
    shift
  done
}

# phase NAME CMD...: runs CMD in a subshell (a fatal error ends the phase, not the script),
# records its time, and records NAME as failed if CMD fails.
phase() {
  local name=$1 start=$SECONDS
  shift
  tpc_step "$name"
  PHASES+=("$name")
  if ("$@"); then
    PHASE_TIME[$name]="$(tpc_elapsed "$start")"
  else
    PHASE_TIME[$name]="$(tpc_elapsed "$start"), FAILED"
    FAILED+=("$name")
  fi
}

# Builds keep going past a failing target, so that ctest still runs whatever did build
# (a test whose binary is missing is reported by ctest as failed).
build_main() { TPC_BUILD_JOBS=$BUILD_JOBS TPC_BUILD_KEEP_GOING=1 tpc_build; }

# The sanitizer tree builds only what its unit tests need, at -O0 (Debug): a third of the time
# of a full RelWithDebInfo sanitizer build on 2 cores.
build_asan() {
  local -a targets
  tpc_configure build-asan -DCMAKE_BUILD_TYPE=Debug -DTPC_SANITIZE=ON \
    -DTPC_INTEGRATION_TESTS=OFF
  mapfile -t targets < <(unit_test_targets build-asan)
  ((${#targets[@]})) || tpc_die "build-asan/ has no test labelled unit"
  TPC_BUILD_JOBS=$BUILD_JOBS TPC_BUILD_KEEP_GOING=1 tpc_compile build-asan "${targets[@]}"
}

# unit_test_targets DIR: the build targets of DIR's tests labelled unit. A test is named like
# its binary's target (tpc_add_test); the binary's name (known once built) is tried as well.
unit_test_targets() {
  local dir="$TPC_ROOT/$1" name
  ctest --test-dir "$dir" --show-only=json-v1 -L unit |
    jq -r '.tests[] | .name, (.command[0]? // empty | split("/") | last)' | sort -u |
    while read -r name; do
      if ninja -C "$dir" -t query "$name" >/dev/null 2>&1; then printf '%s\n' "$name"; fi
    done
}

# Sanitizer reports stop the test at the first error and name the stack.
test_asan() {
  ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=0:halt_on_error=1} \
    UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1} \
    ctest --test-dir "$TPC_ROOT/build-asan" --output-on-failure -j "$TEST_JOBS" -L unit
}

test_main() { ctest --test-dir "$TPC_ROOT/build" --output-on-failure -j "$TEST_JOBS"; }

print_summary() {
  local name
  tpc_step "summary before the last phase (the tests of build/; its own summary follows it)"
  for name in "${PHASES[@]}"; do
    printf '  %-28s %s\n' "$name" "${PHASE_TIME[$name]}"
  done
  if ((QUICK)); then
    printf '  %-28s %s\n' "sanitizer tree" "skipped (--quick)"
  fi
  if ((${#FAILED[@]})); then
    printf '  FAILED so far: %s\n' "$(IFS=,; echo "${FAILED[*]}")"
  fi
}

main() {
  parse_args "$@"
  local start=$SECONDS
  phase "install packages" tpc_install_deps
  ((${#FAILED[@]} == 0)) || exit 1
  phase "build build/" build_main
  if ((!QUICK)); then
    phase "build build-asan/" build_asan
    phase "unit tests (build-asan/)" test_asan
  fi
  print_summary
  tpc_say "  total so far                 $(tpc_elapsed "$start")"
  phase "tests (build/)" test_main
  ((${#FAILED[@]} == 0))
}

main "$@"
