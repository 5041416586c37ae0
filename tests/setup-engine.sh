#!/bin/sh
# Make this machine ready for the integration tests (idempotent; needs root):
# a running Docker engine, a local Debian base image (no registry is needed),
# the shells and tools the tests use, and an ordinary user in the docker group.
#   tests/setup-engine.sh            engine, local/debian:bookworm, test user
# Settings: PI_AGENT_TEST_BASE_IMAGE (default local/debian:bookworm),
# PI_AGENT_TEST_USER (default pi-test, UID 1234), PI_AGENT_TEST_USER2 (a
# second user on the same engine, default pi-test2, UID 1235).
set -eu

log=${TMPDIR:-/tmp}/pi-agent-setup-engine.log
base=${PI_AGENT_TEST_BASE_IMAGE:-local/debian:bookworm}
user=${PI_AGENT_TEST_USER:-pi-test}
user2=${PI_AGENT_TEST_USER2:-pi-test2}

say() { printf 'setup-engine: %s\n' "$1"; }

apt_install() {
  missing=""
  for pkg in "$@"; do
    dpkg -s "$pkg" >/dev/null 2>&1 || missing="$missing $pkg"
  done
  [ -z "$missing" ] && return 0
  say "apt-get install$missing"
  apt-get update -qq >>"$log" 2>&1
  # shellcheck disable=SC2086
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >>"$log" 2>&1
}

apt_install zsh dash shellcheck debootstrap util-linux
if ! docker info >/dev/null 2>&1; then
  command -v dockerd >/dev/null 2>&1 || apt_install docker.io
  say "starting dockerd (log: $log)"
  nohup dockerd >>"$log" 2>&1 &
  i=0
  until docker info >/dev/null 2>&1; do
    i=$((i + 1))
    [ "$i" -le 60 ] || { say "dockerd did not start; see $log" >&2; exit 1; }
    sleep 1
  done
fi

if ! docker image inspect "$base" >/dev/null 2>&1; then
  case $base in
    local/debian:*) suite=${base#local/debian:} ;;
    *) say "$base is missing and only local/debian:SUITE can be made here" >&2; exit 1 ;;
  esac
  root=$(mktemp -d)
  say "building $base with debootstrap (about 30-60 s)"
  debootstrap --variant=minbase "$suite" "$root" >>"$log" 2>&1
  tar -C "$root" -c . | docker import - "$base" >/dev/null
  rm -rf "$root"
fi

for entry in "$user:1234" "$user2:1235"; do
  name=${entry%:*} uid=${entry#*:}
  if ! id "$name" >/dev/null 2>&1; then
    useradd -m -u "$uid" -G docker -s /bin/bash "$name"
    say "created user $name (UID $uid, group docker)"
  fi
done
say "engine ready: $(docker version --format '{{.Server.Version}}'), base $base"
