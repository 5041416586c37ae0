#!/bin/sh
# Docker 26 with the containerd image store (the store Docker Engine 29 uses
# on fresh installs), as a second engine in a container of the host's own:
# Debian 13's docker.io. Idempotent; needs root, the host's engine and
# local/debian:bookworm (tests/setup-engine.sh). The tests reach it at
#   DOCKER_HOST=unix:///run/pi-agent-engines/docker26/docker.sock
# from the host (PI_AGENT_TEST_ENGINE=docker26): /tmp is the same inside, so
# the paths a run mounts are; its data is in /var/lib/pi-agent-engines, at the
# same path on both sides, so its free space is what the host sees.
# Why these flags: ../shared/notes/engines.md (--privileged fails here).
set -eu

name=pi-agent-engine-docker26
run=/run/pi-agent-engines/docker26
data=/var/lib/pi-agent-engines/docker26
sock=unix://$run/docker.sock
image=local/debian:trixie
log=${TMPDIR:-/tmp}/pi-agent-engine-docker26.log

say() { printf 'docker26: %s\n' "$1"; }
inner() { DOCKER_HOST=$sock docker "$@"; }

if ! docker image inspect "$image" >/dev/null 2>&1; then
  root=$(mktemp -d)
  say "building $image with debootstrap (about a minute)"
  debootstrap --variant=minbase trixie "$root" >>"$log" 2>&1
  tar -C "$root" -c . | docker import - "$image" >/dev/null
  rm -rf "$root"
fi
mkdir -p "$run" "$data"
if [ "$(docker inspect --format '{{.State.Running}}' "$name" 2>/dev/null)" != true ]; then
  if docker inspect "$name" >/dev/null 2>&1; then
    docker start "$name" >/dev/null
  else
    say "starting the container $name"
    docker run -d --name "$name" --restart unless-stopped \
      --cap-add ALL --cap-drop SYS_RESOURCE \
      --security-opt seccomp=unconfined --security-opt apparmor=unconfined \
      --cgroupns host -v /sys/fs/cgroup:/sys/fs/cgroup:rw \
      -v "$data:$data" -v "$run:$run" -v /tmp:/tmp \
      "$image" sleep infinity >/dev/null
  fi
fi
if ! docker exec "$name" sh -c 'command -v dockerd' >/dev/null 2>&1; then
  say "installing docker.io in it (about 30 s)"
  docker exec "$name" sh -c 'apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
    apt-get install -y -qq docker.io' >>"$log" 2>&1
fi
if ! inner version >/dev/null 2>&1; then
  say "starting its dockerd, with the containerd image store (log: $data/dockerd.log)"
  docker exec "$name" sh -c 'mkdir -p /etc/docker && printf "%s\n" \
    "{\"features\": {\"containerd-snapshotter\": true}}" > /etc/docker/daemon.json'
  # The docker group's GID: the host's test user reaches the socket.
  group=$(getent group docker | cut -d: -f3)
  # A dockerd that does not answer is restarted from nothing: the container
  # restarted (its processes gone, as after the host's engine restarts), and
  # the pid files it left in $run removed, since they outlive the container
  # and a new process holding the same pid makes dockerd wait on a containerd
  # that is not there ("timeout waiting for containerd to start").
  docker restart -t 5 "$name" >/dev/null
  docker exec -d -e DOCKER_ALLOW_IPV6_ON_IPV4_INTERFACE=1 "$name" sh -c "\
    rm -f $run/docker.pid $run/exec/containerd/containerd.pid; \
    exec dockerd --data-root $data/docker --exec-root $run/exec -H $sock \
    --group ${group:-0} --pidfile $run/docker.pid >>$data/dockerd.log 2>&1"
  i=0
  until inner version >/dev/null 2>&1; do
    i=$((i + 1))
    if [ "$i" -gt 90 ]; then
      say "its dockerd did not start; the end of $data/dockerd.log:" >&2
      tail -n 20 "$data/dockerd.log" >&2
      exit 1
    fi
    sleep 1
  done
fi
if ! inner image inspect local/debian:bookworm >/dev/null 2>&1; then
  say "loading local/debian:bookworm into it"
  docker save local/debian:bookworm | inner load -q >/dev/null
fi
say "ready: $(inner info --format '{{.ServerVersion}}, {{.Driver}} {{.DriverStatus}}') at $sock"
