# scripts/lib.sh: shell functions shared by scripts/demo.sh and scripts/test.sh.
#
# Source it from bash (`source "$(dirname "$0")/lib.sh"`); it does not run anything itself.
# Every function is safe under `set -euo pipefail`, and every failure prints one line that
# starts with "error:" and says what failed (plus the tail of the relevant log, if any).
#
#   tpc_install_deps           install the Debian packages that are missing (sudo if not root)
#   tpc_build [CMAKE_ARGS...]  configure (when needed) and build build/
#   tpc_build_dir DIR [ARGS]   the same for another build tree
#   tpc_configure DIR [ARGS] / tpc_compile DIR [TARGET...]   the two halves of tpc_build_dir
#   tpc_pg_bindir              where initdb/pg_ctl/psql live
#   tpc_pg_create DIR PORT     a throw-away PostgreSQL cluster in DIR (not started)
#   tpc_pg_start DIR / tpc_pg_stop DIR [fast|immediate]
#   tpc_psql DIR SQL           run SQL in the cluster in DIR, unaligned output
#   tpc_free_port [VAR]        a free TCP port on 127.0.0.1 (into VAR, or printed)
#   tpc_start_service NAME LOG CMD...   start CMD in the background (pid in TPC_SERVICE_PID)
#   tpc_stop_service PID [NAME]         SIGTERM, wait for the exit, SIGKILL after a timeout
#   tpc_wait_http URL [TIMEOUT_S [LOG [PID]]]   poll until URL answers 200
#
# Environment: TPC_SKIP_DEPS=1 skips the package check (non-Debian machines);
# TPC_DEPS_DRY_RUN=1 prints what tpc_install_deps would run instead of running it;
# TPC_BUILD_LOG=FILE sends build output to FILE (the tail is printed on failure).

# $(...) keeps -e from the caller, so a failure inside a command substitution stops the script.
shopt -s inherit_errexit

TPC_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

# Debian 12 packages the project needs, and why:
#   g++ cmake ninja-build                  the C++20 toolchain and the build
#   libboost1.81-dev nlohmann-json3-dev    Beast/Asio (header-only) and JSON
#   libpq-dev libleveldb-dev doctest-dev   PostgreSQL client, the decision log, unit tests
#   postgresql-15 postgresql-client-15     initdb/pg_ctl/postgres for the clusters, psql
#   curl jq                                the demo's HTTP calls and their answers
# Not needed: libsnappy-dev (wal/CMakeLists.txt drops leveldb's -lsnappy when it is absent),
# pkg-config (no pkg_check_modules), iproute2 (ports are probed with bash's /dev/tcp),
# procps (processes are watched through /proc), ca-certificates (plain http to 127.0.0.1).
TPC_DEB_PACKAGES=(
  g++ cmake ninja-build
  libboost1.81-dev nlohmann-json3-dev
  libpq-dev libleveldb-dev doctest-dev
  postgresql-15 postgresql-client-15
  curl jq
  faketime
)

TPC_PORTS_GIVEN=" "            # ports handed out by tpc_free_port in this shell
TPC_SERVICE_PID=""             # set by tpc_start_service

# --- messages -----------------------------------------------------------------------------

tpc_say() { printf '%s\n' "$*"; }
tpc_step() { printf '\n==> %s\n' "$*"; }
tpc_warn() { printf 'warning: %s\n' "$*" >&2; }
tpc_die() {
  printf 'error: %s\n' "$*" >&2
  exit 1
}

# tpc_tail_log FILE [LINES]: the last lines of FILE on stderr, indented, if it exists.
tpc_tail_log() {
  local file=$1 lines=${2:-20}
  [[ -s $file ]] || return 0
  printf -- '--- last %s lines of %s ---\n' "$lines" "$file" >&2
  tail -n "$lines" "$file" | sed 's/^/  /' >&2
}

tpc_is_root() { [[ $(id -u) -eq 0 ]]; }

# tpc_as_root CMD...: CMD as root, through sudo when we are not root.
tpc_as_root() {
  if tpc_is_root; then
    "$@"
  elif command -v sudo >/dev/null 2>&1; then
    sudo "$@"
  else
    tpc_die "need root to run '$*': run as root or install and configure sudo"
  fi
}

# tpc_require_root_access WHAT: fails with one line unless we are root or sudo can be used
# (without a password, or with a terminal to ask for it on).
tpc_require_root_access() {
  tpc_is_root && return 0
  command -v sudo >/dev/null 2>&1 ||
    tpc_die "need root to $1: not root and sudo is not installed (run as root, or install them yourself)"
  sudo -n true 2>/dev/null && return 0
  [[ -t 0 ]] ||
    tpc_die "need root to $1: sudo wants a password and there is no terminal to ask on"
}

# --- packages -----------------------------------------------------------------------------

# tpc_pkg_installed PKG: true when dpkg says PKG is installed.
tpc_pkg_installed() {
  local status
  status=$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null) || return 1
  [[ $status == "install ok installed" ]]
}

# tpc_missing_packages PKG...: prints those of PKG... that are not installed, one per line.
tpc_missing_packages() {
  local pkg
  for pkg in "$@"; do
    tpc_pkg_installed "$pkg" || printf '%s\n' "$pkg"
  done
}

# tpc_install_deps: installs whatever of TPC_DEB_PACKAGES is missing (apt-get, sudo if needed).
tpc_install_deps() {
  if [[ ${TPC_SKIP_DEPS:-0} == 1 ]]; then
    tpc_say "packages: not checked (TPC_SKIP_DEPS=1)"
    return 0
  fi
  command -v dpkg-query >/dev/null 2>&1 ||
    tpc_die "dpkg-query not found: package installation supports Debian 12 only (set TPC_SKIP_DEPS=1 and install the packages listed in scripts/lib.sh yourself)"
  local missing
  mapfile -t missing < <(tpc_missing_packages "${TPC_DEB_PACKAGES[@]}")
  if [[ ${#missing[@]} -eq 0 ]]; then
    tpc_say "packages: all ${#TPC_DEB_PACKAGES[@]} present"
    return 0
  fi
  tpc_say "packages: missing ${missing[*]}"
  local -a apt_env=(env DEBIAN_FRONTEND=noninteractive)
  if [[ ${TPC_DEPS_DRY_RUN:-0} == 1 ]]; then
    tpc_say "  (dry run) would run: apt-get update"
    tpc_say "  (dry run) would run: ${apt_env[*]} apt-get install -y --no-install-recommends ${missing[*]}"
    return 0
  fi
  tpc_require_root_access "install ${missing[*]}"
  local log
  tpc_say "packages: installing them with apt-get (sudo when not root)"
  log=$(mktemp "${TMPDIR:-/tmp}/tpc-apt.XXXXXX.log")
  if ! tpc_as_root "${apt_env[@]}" apt-get update >"$log" 2>&1; then
    tpc_tail_log "$log"
    tpc_die "apt-get update failed (log: $log)"
  fi
  if ! tpc_as_root "${apt_env[@]}" apt-get install -y --no-install-recommends "${missing[@]}" \
    >>"$log" 2>&1; then
    tpc_tail_log "$log"
    tpc_die "apt-get install ${missing[*]} failed (log: $log)"
  fi
  rm -f "$log"
  mapfile -t missing < <(tpc_missing_packages "${TPC_DEB_PACKAGES[@]}")
  [[ ${#missing[@]} -eq 0 ]] || tpc_die "still not installed after apt-get: ${missing[*]}"
  tpc_say "packages: installed"
}

# --- build --------------------------------------------------------------------------------

# tpc_configure_needed DIR ARGS_STAMP: true when DIR has no usable configuration or was
# configured with other arguments by these scripts.
tpc_configure_needed() {
  local dir=$1 stamp=$2
  [[ -f $dir/CMakeCache.txt && -f $dir/build.ninja ]] || return 0
  grep -qx 'CMAKE_GENERATOR:INTERNAL=Ninja' "$dir/CMakeCache.txt" || return 0
  [[ -f $dir/.tpc-configure-args ]] || return 0
  [[ $(cat "$dir/.tpc-configure-args") != "$stamp" ]]
}

# tpc_run_logged LOG CMD...: CMD with output to LOG when LOG is set, else to the terminal.
tpc_run_logged() {
  local log=$1
  shift
  if [[ -n $log ]]; then
    "$@" >>"$log" 2>&1
  else
    "$@"
  fi
}

# tpc_configure DIR [CMAKE_ARGS...]: configure the tree DIR (relative to the repository) with
# Ninja, RelWithDebInfo unless ARGS name another CMAKE_BUILD_TYPE; only when DIR is not
# configured yet or ARGS changed since the last time.
tpc_configure() {
  local dir=$1
  shift
  local -a args=("$@")
  [[ " ${args[*]} " == *" -DCMAKE_BUILD_TYPE="* ]] || args=(-DCMAKE_BUILD_TYPE=RelWithDebInfo "${args[@]}")
  local stamp="${args[*]}" log=${TPC_BUILD_LOG:-} path="$TPC_ROOT/$dir"
  if [[ -e $path && ! -w $path ]]; then
    tpc_die "$path is not writable by $(id -un) (made by another user? remove it)"
  fi
  tpc_configure_needed "$path" "$stamp" || return 0
  # A cache from another generator cannot be reused with -G Ninja.
  if [[ -f $path/CMakeCache.txt ]] && ! grep -qx 'CMAKE_GENERATOR:INTERNAL=Ninja' "$path/CMakeCache.txt"; then
    rm -rf "$path/CMakeCache.txt" "$path/CMakeFiles"
  fi
  rm -f "$path/.tpc-configure-args"
  if ! tpc_run_logged "$log" cmake -S "$TPC_ROOT" -B "$path" -G Ninja "${args[@]}"; then
    [[ -z $log ]] || tpc_tail_log "$log" 40
    tpc_die "cmake could not configure $dir/ (${args[*]})"
  fi
  printf '%s' "$stamp" >"$path/.tpc-configure-args"
}

# tpc_compile DIR [TARGET...]: build TARGETs (default: all) of the configured tree DIR with
# -j TPC_BUILD_JOBS (default: nproc). TPC_BUILD_KEEP_GOING=1 goes on past a failing target.
tpc_compile() {
  local dir=$1
  shift
  local jobs=${TPC_BUILD_JOBS:-$(nproc)} log=${TPC_BUILD_LOG:-}
  local -a targets=() keep_going=()
  (($# == 0)) || targets=(--target "$@")
  [[ ${TPC_BUILD_KEEP_GOING:-0} != 1 ]] || keep_going=(-- -k 0)
  if ! tpc_run_logged "$log" cmake --build "$TPC_ROOT/$dir" -j "$jobs" "${targets[@]}" "${keep_going[@]}"; then
    [[ -z $log ]] || tpc_tail_log "$log" 40
    printf 'error: the build of %s/ failed%s\n' "$dir" "${log:+ (log: $log)}" >&2
    return 1
  fi
}

# tpc_build_dir DIR [CMAKE_ARGS...]: tpc_configure, then tpc_compile of everything.
# TPC_BUILD_LOG=FILE sends the output to FILE (its tail is printed on failure).
tpc_build_dir() {
  local dir=$1 log=${TPC_BUILD_LOG:-}
  if [[ -n $log ]]; then
    mkdir -p "$(dirname "$log")"
    : >"$log"
  fi
  tpc_configure "$@"
  tpc_compile "$dir"
}

# tpc_build [CMAKE_ARGS...]: build/ (RelWithDebInfo), configured when needed, then built.
# shellcheck disable=SC2120 # arguments are optional
tpc_build() { tpc_build_dir build "$@"; }

# --- PostgreSQL clusters ------------------------------------------------------------------

# tpc_pg_bindir: the directory holding initdb and pg_ctl.
tpc_pg_bindir() {
  local dir=""
  if command -v pg_config >/dev/null 2>&1; then
    dir=$(pg_config --bindir 2>/dev/null) || dir=""
  fi
  if [[ -z $dir || ! -x $dir/initdb || ! -x $dir/pg_ctl ]]; then
    dir=$(find /usr/lib/postgresql -mindepth 2 -maxdepth 2 -type d -name bin 2>/dev/null | sort -V | tail -n 1)
  fi
  [[ -n $dir && -x $dir/initdb && -x $dir/pg_ctl ]] ||
    tpc_die "PostgreSQL server binaries (initdb, pg_ctl) not found: install postgresql-15"
  printf '%s\n' "$dir"
}

# The account that owns and runs throw-away clusters: `postgres` when we are root
# (initdb and pg_ctl refuse to run as root), else ourselves.
tpc_pg_account() {
  if tpc_is_root; then
    id -u postgres >/dev/null 2>&1 ||
      tpc_die "running as root, but there is no 'postgres' user to run PostgreSQL (install postgresql-15)"
    printf 'postgres\n'
  else
    id -un
  fi
}

# tpc_pg_as_owner DIR CMD...: CMD as the cluster account, from inside DIR (a working directory
# it can read; root's home is not).
tpc_pg_as_owner() {
  local dir=$1
  shift
  if tpc_is_root; then
    (cd "$dir" && runuser -u postgres -- "$@")
  else
    (cd "$dir" && "$@")
  fi
}

# tpc_pg_create DIR PORT: initdb in DIR/data with a configuration for 2PC tests.
tpc_pg_create() {
  local dir=$1 port=$2 bindir account
  bindir=$(tpc_pg_bindir)
  account=$(tpc_pg_account)
  mkdir -p "$dir"
  chmod 0755 "$dir"
  if tpc_is_root; then chown "$account": "$dir"; fi
  if ! tpc_pg_as_owner "$dir" "$bindir/initdb" -D "$dir/data" -U tpc --auth=trust -E UTF8 \
    --no-locale --no-sync >"$dir/initdb.log" 2>&1; then
    tpc_tail_log "$dir/initdb.log"
    tpc_die "initdb failed in $dir/data (as $account)"
  fi
  cat >>"$dir/data/postgresql.conf" <<EOF

# Added by scripts/lib.sh (tpc_pg_create): a throw-away cluster for two-phase commit.
listen_addresses = '127.0.0.1'
port = $port
unix_socket_directories = '$dir'
max_prepared_transactions = 64
max_connections = 200
EOF
  printf '%s\n' "$port" >"$dir/port"
}

# tpc_pg_port DIR: the port of the cluster in DIR.
tpc_pg_port() {
  [[ -f $1/port ]] || tpc_die "no PostgreSQL cluster in $1 (tpc_pg_create first)"
  cat "$1/port"
}

# tpc_pg_start DIR: start the cluster and wait until it accepts connections.
tpc_pg_start() {
  local dir=$1 bindir
  bindir=$(tpc_pg_bindir)
  if ! tpc_pg_as_owner "$dir" "$bindir/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 \
    start >"$dir/pg_ctl.log" 2>&1; then
    tpc_tail_log "$dir/server.log"
    tpc_die "PostgreSQL in $dir did not start (port $(tpc_pg_port "$dir"))"
  fi
}

# tpc_pg_stop DIR [fast|immediate]: stop the cluster if it runs.
tpc_pg_stop() {
  local dir=$1 mode=${2:-fast} bindir
  [[ -f $dir/data/postmaster.pid ]] || return 0
  bindir=$(tpc_pg_bindir)
  if ! tpc_pg_as_owner "$dir" "$bindir/pg_ctl" -D "$dir/data" -m "$mode" -w -t 60 stop \
    >"$dir/pg_ctl.log" 2>&1; then
    tpc_tail_log "$dir/pg_ctl.log"
    tpc_die "could not stop PostgreSQL in $dir"
  fi
}

# tpc_psql DIR SQL: run SQL (stop at the first error) as user tpc in database postgres;
# unaligned, tuples only, '|' between columns.
tpc_psql() {
  local dir=$1 sql=$2 bindir port
  bindir=$(tpc_pg_bindir)
  port=$(tpc_pg_port "$dir")
  "$bindir/psql" -X -q -At -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$port" -U tpc -d postgres \
    -c "$sql" ||
    tpc_die "psql on port $port failed: $sql"
}

# --- ports, services, HTTP ----------------------------------------------------------------

# tpc_port_in_use PORT: true when something listens on 127.0.0.1:PORT.
tpc_port_in_use() {
  (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

# tpc_free_port [VAR]: a TCP port on 127.0.0.1 that nothing listens on and that this shell
# has not handed out yet; stored in VAR (which also remembers it) or printed.
# Ports come from 20000-32767, below Linux's ephemeral range (32768+), so that an outgoing
# connection cannot be holding the port when the server binds it.
tpc_free_port() {
  # Names start with _tpc_ so that they do not shadow the caller's VAR.
  local _tpc_var=${1:-} _tpc_port _tpc_try
  for ((_tpc_try = 0; _tpc_try < 200; _tpc_try++)); do
    _tpc_port=$((20000 + RANDOM % 12768))
    [[ $TPC_PORTS_GIVEN == *" $_tpc_port "* ]] && continue
    tpc_port_in_use "$_tpc_port" && continue
    TPC_PORTS_GIVEN+="$_tpc_port "
    if [[ -n $_tpc_var ]]; then
      printf -v "$_tpc_var" '%s' "$_tpc_port"
    else
      printf '%s\n' "$_tpc_port"
    fi
    return 0
  done
  tpc_die "no free TCP port found on 127.0.0.1 in 20000-32767"
}

# tpc_pid_alive PID: true while PID runs (a zombie does not count).
tpc_pid_alive() {
  local stat
  stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
  stat=${stat##*) }
  [[ ${stat:0:1} != Z ]]
}

# tpc_start_service NAME LOG CMD...: start CMD in the background, output to LOG; its pid goes
# to TPC_SERVICE_PID (call it directly, not in $(...)).
tpc_start_service() {
  local name=$1 log=$2
  shift 2
  [[ -x $1 ]] || tpc_die "cannot start $name: $1 is not an executable (build first)"
  "$@" >"$log" 2>&1 </dev/null &
  # shellcheck disable=SC2034 # read by the caller
  TPC_SERVICE_PID=$!
}

# tpc_stop_service PID [NAME [TIMEOUT_S]]: SIGTERM, wait until it exits, SIGKILL after TIMEOUT_S.
tpc_stop_service() {
  local pid=$1 name=${2:-process $1} timeout_s=${3:-15} deadline
  tpc_pid_alive "$pid" || return 0
  kill -TERM "$pid" 2>/dev/null || return 0
  deadline=$((SECONDS + timeout_s))
  while tpc_pid_alive "$pid"; do
    if ((SECONDS >= deadline)); then
      tpc_warn "$name did not stop within ${timeout_s}s of SIGTERM: killing it"
      kill -KILL "$pid" 2>/dev/null || true
      break
    fi
    sleep 0.1
  done
  wait "$pid" 2>/dev/null || true
}

# tpc_wait_http URL [TIMEOUT_S [LOG [PID]]]: poll URL until it answers 200; on timeout, or when
# PID exits first, fail with the tail of LOG.
tpc_wait_http() {
  local url=$1 timeout_s=${2:-30} log=${3:-} pid=${4:-} deadline
  deadline=$((SECONDS + timeout_s))
  until curl -fsS -o /dev/null --max-time 2 "$url" 2>/dev/null; do
    if [[ -n $pid ]] && ! tpc_pid_alive "$pid"; then
      [[ -z $log ]] || tpc_tail_log "$log"
      tpc_die "the process behind $url exited before it answered${log:+ (log: $log)}"
    fi
    if ((SECONDS >= deadline)); then
      [[ -z $log ]] || tpc_tail_log "$log"
      tpc_die "$url did not answer 200 within ${timeout_s}s${log:+ (log: $log)}"
    fi
    sleep 0.1
  done
}

# tpc_elapsed START: seconds since START (a value of $SECONDS), as "12s" or "3m04s".
tpc_elapsed() {
  local s=$((SECONDS - $1))
  if ((s >= 60)); then
    printf '%dm%02ds\n' $((s / 60)) $((s % 60))
  else
    printf '%ds\n' "$s"
  fi
}
