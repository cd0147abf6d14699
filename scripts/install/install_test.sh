#!/usr/bin/env bash
# install_test.sh BUILD_DIR: `cmake --install` into a temporary prefix, then checks that every
# file is in place, that the installed binaries answer --version, and that the sample configs
# pass each service's --check-config (which parses the file and validates every option).
set -euo pipefail

build=${1:?usage: install_test.sh BUILD_DIR}
prefix=$(mktemp -d)
trap 'rm -rf "$prefix"' EXIT

fail() { echo "install_test: $*" >&2; exit 1; }

cmake --install "$build" --prefix "$prefix" >/dev/null

for f in bin/tpc-coordinator bin/tpc-agent bin/tpcctl \
         etc/tpc/coordinator.conf etc/tpc/agent.conf \
         lib/systemd/system/tpc-coordinator.service lib/systemd/system/tpc-agent.service; do
  [[ -f $prefix/$f ]] || fail "missing $f"
done
for b in tpc-coordinator tpc-agent tpcctl; do
  [[ -x $prefix/bin/$b ]] || fail "bin/$b is not executable"
  out=$("$prefix/bin/$b" --version) || fail "$b --version exited $?"
  [[ $out =~ ^$b\ [0-9]+\.[0-9]+\.[0-9]+ ]] || fail "$b --version printed \"$out\""
done

"$prefix/bin/tpc-coordinator" --config "$prefix/etc/tpc/coordinator.conf" --check-config ||
  fail "the sample coordinator.conf does not pass --check-config"
"$prefix/bin/tpc-agent" --config "$prefix/etc/tpc/agent.conf" --check-config ||
  fail "the sample agent.conf does not pass --check-config"
# --check-config really reads the file: a bad line in a copy is refused with its line number.
bad="$prefix/bad-agent.conf"
{ cat "$prefix/etc/tpc/agent.conf"; echo "no-such-option = 1"; } >"$bad"
if err=$("$prefix/bin/tpc-agent" --config "$bad" --check-config 2>&1); then
  fail "tpc-agent --check-config accepted an unknown option"
fi
[[ $err == *"unknown option \"no-such-option\""* ]] || fail "unexpected error: $err"

for unit in tpc-coordinator tpc-agent; do
  file="$prefix/lib/systemd/system/$unit.service"
  grep -q "^ExecStart=.*/bin/$unit --config /etc/tpc/${unit#tpc-}.conf$" "$file" || fail "$unit.service: ExecStart"
  grep -q '^Restart=on-failure$' "$file" || fail "$unit.service: Restart"
  grep -q '^User=tpc$' "$file" || fail "$unit.service: User"
  if grep -q '^ExecReload=' "$file"; then fail "$unit.service: ExecReload without SIGHUP support"; fi
done
# systemd-analyze verify is left out: it needs a running systemd, and it checks ExecStart's
# binary, which the units name under the configured prefix rather than this temporary one.
echo "install_test: ok ($prefix)"
