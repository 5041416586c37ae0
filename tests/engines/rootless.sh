#!/bin/sh
# A rootless engine of the test user (PI_AGENT_TEST_USER, default pi-test):
#   tests/engines/rootless.sh podman    Podman (Debian 12's 4.3), no service
#   tests/engines/rootless.sh docker    rootless Docker (Debian's 20.10 with
#                                       rootlesskit), its socket in the user's
#                                       runtime directory
# Idempotent; needs root, the host's engine and local/debian:bookworm
# (tests/setup-engine.sh), which it loads into the user's engine. What an
# ordinary user's login would give and CI has not: subordinate IDs, a
# runtime directory (/run/user/UID), /dev/net/tun for rootless networking
# (Debian's mode, 0666), and / as a shared mount (systemd makes it so;
# Podman warns at every command otherwise).
set -eu

kind=${1:?usage: rootless.sh podman|docker}
user=${PI_AGENT_TEST_USER:-pi-test}
log=${TMPDIR:-/tmp}/pi-agent-engine-rootless-$kind.log

say() { printf 'rootless %s: %s\n' "$kind" "$1"; }

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

case $kind in
  podman) apt_install podman uidmap slirp4netns catatonit ;;
  docker) apt_install docker.io rootlesskit uidmap slirp4netns ;;
  *) echo "usage: rootless.sh podman|docker" >&2; exit 2 ;;
esac
uid=$(id -u "$user")
home=$(getent passwd "$user" | cut -d: -f6)
runtime=/run/user/$uid
grep -q "^$user:" /etc/subuid || usermod --add-subuids 100000-165535 "$user"
grep -q "^$user:" /etc/subgid || usermod --add-subgids 100000-165535 "$user"
if [ -c /dev/net/tun ] && [ "$(stat -c %a /dev/net/tun)" != 666 ]; then
  chmod 0666 /dev/net/tun
fi
if [ "$(findmnt -no PROPAGATION /)" != shared ]; then
  mount --make-rshared /
fi
if [ -f /proc/sys/kernel/unprivileged_userns_clone ]; then
  echo 1 > /proc/sys/kernel/unprivileged_userns_clone
fi
mkdir -p "$runtime"
chown "$user:" "$runtime"
chmod 0700 "$runtime"

as_user() {
  runuser -u "$user" -- env -i HOME="$home" PATH=/usr/sbin:/usr/bin:/sbin:/bin \
    XDG_RUNTIME_DIR="$runtime" "$@"
}

if [ "$kind" = podman ]; then
  # Its storage, named in CONTAINERS_STORAGE_CONF (the tests give a run a
  # home of its own, where Podman would otherwise keep it): overlay, as
  # vfs (which it picks when /dev/fuse is not the user's) copies each layer.
  conf=/etc/pi-agent-engines/podman-$user.conf
  mkdir -p /etc/pi-agent-engines
  cat > "$conf" <<CONF
# rootless Podman storage for $user (tests/engines/rootless.sh podman)
[storage]
driver = "overlay"
graphroot = "$home/.local/share/containers/storage"
rootless_storage_path = "$home/.local/share/containers/storage"
runroot = "$runtime/containers"
CONF
  engine() { as_user CONTAINERS_STORAGE_CONF="$conf" podman "$@"; }
else
  sock=unix://$runtime/docker.sock
  engine() { as_user DOCKER_HOST="$sock" docker "$@"; }
  if ! engine version >/dev/null 2>&1; then
    say "starting dockerd-rootless.sh as $user (log: $log)"
    # shellcheck disable=SC2016
    as_user sh -c 'setsid nohup /usr/share/docker.io/contrib/dockerd-rootless.sh \
      >>"$0" 2>&1 </dev/null &' "$log"
    i=0
    until engine version >/dev/null 2>&1; do
      i=$((i + 1))
      if [ "$i" -gt 90 ]; then
        say "it did not start; the end of $log:" >&2
        tail -n 20 "$log" >&2
        exit 1
      fi
      sleep 1
    done
  fi
fi
if ! engine image inspect local/debian:bookworm >/dev/null 2>&1; then
  say "loading local/debian:bookworm into it"
  docker save local/debian:bookworm | engine load -q >/dev/null
fi
say "ready for $user: $(engine version 2>/dev/null | grep -m 2 Version: | tail -1)"
