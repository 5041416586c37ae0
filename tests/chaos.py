#!/usr/bin/env python3
"""Chaos (issue 28): changing runs killed at random moments, the saver
killed, the docker client killed, the terminal closed, the engine restarted
mid-run; then recovery, and what a user would check: nothing lost, in the
environment or in git, and nothing left behind.

    python3 tests/chaos.py [-n N]            against this machine's engine, which
                                             it RESTARTS (make chaos; CI)
    python3 tests/chaos.py --nested [-n N]   inside a container with an engine of
                                             its own (make chaos-nested)

The soak: N runs (pi-exec, through the shell functions, as a user types
them), two at a time, each in one of two profiles (default, w2) and one of
two git worktrees of one repository (repo on main, repo-w2 on agent/w2,
made by pi-worktree), picked at random. Each run's agent writes a marker
in the environment (/var/tmp/markers/ID: most a line, one in ten 8 to 48
MB of random bytes; its ID appended to /var/tmp/markers.log), then says so
in the project (.chaos/ID.marker, with its container's name), then commits
a file with the subject "chaos ID" and says so (.chaos/ID.commit, with the
commit's ID), then works on for a moment. About half the runs get a fault
at a random moment of their lives: SIGKILL, SIGHUP, SIGTERM or SIGINT to
the wrapper; SIGKILL to the saver; SIGKILL to a docker client of the run
(its `docker run`, or the saver's commit); the terminal closed (the run
started on a pty, whose master is closed); or the engine restarted
(stopped, its containers stopped with it, and started: --engine-restart
CMD, or by default the local dockerd found, as systemd or its command
line started it). A run that finds the engine down (exit 7) is one; its
lane takes the next once the engine answers. Meanwhile a poller asks
every quarter second for both profiles' current.

Definitions:
- a run *reached its agent* when its agent wrote its marker: the agent
  writes .chaos/ID.marker in the project only after the marker is whole in
  the environment, so the file on the host says so. Such a run owes its
  marker: in its profile's current after recovery, whole, its ID once in
  markers.log (not in the other profile's).
- a run owes its *commit* when .chaos/ID.commit is there (git commit
  returned) and its container was saved (its profile's session log has a
  record of it ended by run, interrupted or recovered). The commit must be
  on its worktree's branch or under refs/pi-agent/.
- a run killed before its agent wrote the marker owes nothing.

Then recovery: pi-recover in each profile (what the next run does first),
and the checks: markers and commits as above; no container saved twice (one
saved record per container); git fsck --strict clean and no ref to a
missing object; the user's refs unmoved, and the two branches moved only by
runs' commits; current present at every sample the engine answered; no two
lifecycles of one line overlapping in its session log; no container, run
directory, untagged image or pi-agent process left; no Python traceback in
any output or log. The last line is "N passed, N failed"; the exit status
is 1 when any check failed.
"""

import argparse
import collections
import json
import os
import pty
import random
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
import images  # noqa: E402 (from tests/)

PROFILES = ("default", "w2")
FAULTS = ("wrapper-KILL", "wrapper-HUP", "wrapper-TERM", "wrapper-INT", "saver-KILL",
          "docker-KILL", "terminal", "engine")
SAVED = ("run", "interrupted", "recovered")
RUN_TIMEOUT = 300
ENGINE_TIMEOUT = 180

# The agent: the marker (whole before it is said), the commit, some work.
AGENT = r"""set -e
id=$1 size=$2 work=$3
mkdir -p /var/tmp/markers
if [ "$size" -gt 0 ]; then head -c "$size" /dev/urandom > /var/tmp/markers/.$id
else printf 'chaos %s\n' "$id" > /var/tmp/markers/.$id; fi
mv /var/tmp/markers/.$id /var/tmp/markers/$id
echo "$id" >> /var/tmp/markers.log
sed -n '2s/.* of \([^ ]*\).*/\1/p' /dev/pi-agent/run > .chaos/$id.tmp
mv .chaos/$id.tmp .chaos/$id.marker
mkdir -p log
echo "$id" > log/$id
git add log/$id
git commit -q -m "chaos $id"
git rev-parse HEAD > .chaos/$id.tmp
mv .chaos/$id.tmp .chaos/$id.commit
sleep "$work"
"""


def say(text):
    print(text, flush=True)


def run(argv, check=True, **kwargs):
    return subprocess.run(argv, check=check, text=True, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, **kwargs)


def docker(*args, check=False, **kwargs):
    return run(["docker", *args], check=check, **kwargs)


def engine_up():
    return docker("info", "--format", "{{.ServerVersion}}").returncode == 0


def wait_until(predicate, timeout, interval=0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


# --- processes, read from /proc ----------------------------------------------

def proc_stat(pid):
    """(comm, ppid, sid, starttime) or None when gone."""
    try:
        with open("/proc/%d/stat" % pid) as handle:
            data = handle.read()
    except OSError:
        return None
    comm = data[data.index("(") + 1:data.rindex(")")]
    fields = data[data.rindex(")") + 2:].split()
    return comm, int(fields[1]), int(fields[3]), int(fields[19])


def cmdline(pid):
    try:
        with open("/proc/%d/cmdline" % pid, "rb") as handle:
            return handle.read().decode(errors="replace").split("\0")
    except OSError:
        return []


def children(pid):
    found = []
    try:
        for task in os.listdir("/proc/%d/task" % pid):
            with open("/proc/%d/task/%s/children" % (pid, task)) as handle:
                found += [int(word) for word in handle.read().split()]
    except OSError:
        pass
    return found


def descendants(pid):
    found, todo = [], [pid]
    while todo:
        for child in children(todo.pop()):
            found.append(child)
            todo.append(child)
    return found


class Proc:
    """A process known by pid and start time (a pid taken again is not it)."""

    def __init__(self, pid):
        self.pid = pid
        self.start = (proc_stat(pid) or (None,) * 4)[3]

    def alive(self):
        found = proc_stat(self.pid)
        return found is not None and found[3] == self.start and found[0] != "<defunct>"

    def kill(self, signum):
        if not self.alive():
            return False
        try:
            os.kill(self.pid, signum)
            return True
        except ProcessLookupError:
            return False


def is_tool(pid):
    """A pi_agent.py process (the wrapper, its saver, recovery)."""
    return any("import pi_agent" in part for part in cmdline(pid))


def tool_processes():
    return [int(name) for name in os.listdir("/proc") if name.isdigit()
            and is_tool(int(name)) and any(ROOT in part for part in cmdline(int(name)))]


# --- the engine ----------------------------------------------------------------

def dockerd_pid():
    for name in os.listdir("/proc"):
        if name.isdigit() and (proc_stat(int(name)) or ("",))[0] == "dockerd":
            return int(name)
    return None


def restart_local_engine(log_path):
    """Stop the local dockerd (its containers stop with it) and start it
    again as it was started: by systemd, or by its own command line."""
    pid = dockerd_pid()
    if pid is None:
        raise SystemExit("chaos: no dockerd process here to restart; give --engine-restart CMD")
    if os.path.isdir("/run/systemd/system") and shutil.which("systemctl") and \
            run(["systemctl", "is-active", "--quiet", "docker"], check=False).returncode == 0:
        run(["systemctl", "stop", "docker"], check=False)
        time.sleep(random.uniform(0, 2))  # (the engine down a while: chaos, not a wait)
        run(["systemctl", "start", "docker"], check=False)
        return
    argv = cmdline(pid)[:-1] if cmdline(pid)[-1:] == [""] else cmdline(pid)
    with open("/proc/%d/environ" % pid, "rb") as handle:
        env = dict(item.split("=", 1) for item in handle.read().decode().split("\0")
                   if "=" in item)
    cwd = os.readlink("/proc/%d/cwd" % pid)
    process = Proc(pid)
    process.kill(signal.SIGTERM)
    if not wait_until(lambda: not process.alive(), 60):
        process.kill(signal.SIGKILL)
        wait_until(lambda: not process.alive(), 30)
    time.sleep(random.uniform(0, 2))  # (the engine down a while: chaos, not a wait)
    with open(log_path, "ab") as log:
        subprocess.Popen(argv, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=log,
                         stderr=log, start_new_session=True)


class Engine:
    def __init__(self, command, log_path):
        self.command, self.log_path = command, log_path
        self.lock = threading.Lock()
        self.restarts = 0
        self.seconds = []

    def restart(self):
        """One restart at a time; False when one is under way already."""
        if not self.lock.acquire(blocking=False):
            return False
        try:
            started = time.monotonic()
            if self.command:
                run(["sh", "-c", self.command], check=False)
            else:
                restart_local_engine(self.log_path)
            if not wait_until(engine_up, ENGINE_TIMEOUT, 0.2):
                raise SystemExit("chaos: the engine did not come back in %d s" % ENGINE_TIMEOUT)
            self.restarts += 1
            self.seconds.append(time.monotonic() - started)
            return True
        finally:
            self.lock.release()


# --- the user's world: two profiles, two worktrees of one repository ------------

class World:
    def __init__(self, workdir, base, home, repo_name):
        self.workdir, self.base, self.home = workdir, base, home
        self.image_repo = repo_name
        self.state = os.path.join(workdir, "state")
        self.repo = os.path.join(workdir, "repo")
        self.trees = {"repo": self.repo, "repo-w2": self.repo + "-w2"}
        self.branches = {"repo": "refs/heads/main", "repo-w2": "refs/heads/agent/w2"}

    def env(self, **extra):
        env = {"HOME": self.home, "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
               "LANG": "C.UTF-8", "USER": os.environ.get("USER", "root"),
               "PI_AGENT_IMAGE_REPO": self.image_repo, "PI_AGENT_STATE_DIR": self.state,
               "PI_AGENT_PYTHON": sys.executable}
        env.update(extra)
        return env

    def script(self, text):
        return ["bash", "--norc", "-c", ". %s/shell/pi.sh\n%s" % (ROOT, text)]

    def sh(self, text, cwd=None, **extra):
        return run(self.script(text), check=False, cwd=cwd or self.repo, env=self.env(**extra))

    def ok(self, text, cwd=None, **extra):
        result = self.sh(text, cwd, **extra)
        if result.returncode != 0:
            raise SystemExit("chaos: setup step failed: %s\n%s%s" % (text, result.stdout,
                                                                      result.stderr))
        return result

    def git(self, *args, cwd=None):
        return run(["git", "-C", cwd or self.repo, *args], check=False)

    def setup(self):
        os.makedirs(self.home, exist_ok=True)
        os.makedirs(self.repo)
        docker("tag", self.base, self.image_repo + ":base", check=True)
        git = ["git", "-c", "user.name=User", "-c", "user.email=user@example.com"]
        for args in (["init", "-q", "-b", "main", "."], ["config", "user.name", "User"],
                     ["config", "user.email", "user@example.com"]):
            run(git + args, cwd=self.repo)
        with open(os.path.join(self.repo, ".gitignore"), "w") as handle:
            handle.write(".chaos/\n")
        run(git + ["add", ".gitignore"], cwd=self.repo)
        run(git + ["commit", "-q", "-m", "first"], cwd=self.repo)
        # The user's own refs, which no run may move.
        run(git + ["branch", "user-work"], cwd=self.repo)
        run(git + ["tag", "-a", "-m", "v1", "v1"], cwd=self.repo)
        run(git + ["update-ref", "refs/remotes/origin/main", "HEAD"], cwd=self.repo)
        self.ok("pi-exec true")  # current, from base
        # the second worktree and its profile, as a user makes them
        self.ok("pi-worktree w2", PI_AGENT_COMMAND="true")
        for tree in self.trees.values():
            os.makedirs(os.path.join(tree, ".chaos"))
        self.first = self.git("rev-parse", "HEAD").stdout.strip()
        self.refs = self.ref_values()

    def ref_values(self):
        out = self.git("for-each-ref", "--format=%(objectname) %(refname)").stdout
        return dict(reversed(line.split(" ", 1)) for line in out.splitlines())

    def sessions(self, profile):
        key = self.image_repo.replace("%", "%25").replace("/", "%2F")
        path = os.path.join(self.state, key + ("" if profile == "default" else "@" + profile)
                            + ".sessions.jsonl")
        try:
            with open(path) as handle:
                return [json.loads(line) for line in handle if line.strip()]
        except FileNotFoundError:
            return []

    def current_tag(self, profile):
        return "current" if profile == "default" else profile + "-current"


# --- one run ------------------------------------------------------------------

class Run:
    def __init__(self, number, rng, fault):
        self.id = "%04d" % number
        self.profile = rng.choice(PROFILES)
        self.tree = rng.choice(("repo", "repo-w2"))
        self.size = rng.randint(8, 48) << 20 if rng.random() < 0.1 else 0
        self.work = round(rng.uniform(0.1, 1.5), 2)
        self.fault = fault
        # (from the run's start; for the saver and the docker clients,
        # from the saver's start: a run may wait for the lock first)
        self.delay = round(rng.uniform(0.0, 3.0), 2)
        self.pty = fault == "terminal" or rng.random() < 0.15
        self.injected = None  # what the fault reached: None, or words
        self.status = None
        self.output = ""
        self.seconds = None
        self.hung = False

    def describe(self):
        return "run %s %-7s %-7s %s%s%s" % (
            self.id, self.profile, self.tree, "%2d MB" % (self.size >> 20) if self.size
            else "tiny ", " pty" if self.pty else "    ",
            " %s@%.1fs" % (self.fault, self.delay) if self.fault else "")

    def start(self, world):
        profile = "--profile " + self.profile
        command = "pi-exec --wait %s -- sh -c %s chaos %s %d %s" % (
            profile, shlex.quote(AGENT), self.id, self.size, self.work)
        cwd = world.trees[self.tree]
        env = world.env()
        self.started = time.monotonic()
        if self.pty:
            self.master, slave = pty.openpty()
            tty = os.ttyname(slave)
            env["TERM"] = "xterm"
            # bash, a session leader, opens the terminal: it becomes its
            # controlling terminal, as a terminal emulator's shell has it.
            argv = world.script("exec 0<>%s 1>&0 2>&0\n%s" % (tty, command))
            self.proc = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                         start_new_session=True)
            os.close(slave)
            self.chunks, self.hangup = [], threading.Event()
            self.reader = threading.Thread(target=self._read_pty, daemon=True)
            self.reader.start()
        else:
            self.log = tempfile.TemporaryFile()
            self.proc = subprocess.Popen(world.script(command), cwd=cwd, env=env,
                                         stdin=subprocess.DEVNULL, stdout=self.log,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        self.shell = Proc(self.proc.pid)
        self.wrapper = self.saver = None

    def _read_pty(self):
        """The terminal's side: what the run writes, until it has all gone
        (EIO) or the terminal is closed; only this thread closes it."""
        import select
        try:
            while not self.hangup.is_set():
                if not select.select([self.master], [], [], 0.05)[0]:
                    continue
                try:
                    chunk = os.read(self.master, 65536)
                except OSError:
                    break
                if not chunk:
                    break
                self.chunks.append(chunk)
        finally:
            os.close(self.master)  # the terminal's window closed: a hangup

    def close_terminal(self):
        self.hangup.set()
        self.reader.join()

    def observe(self):
        """Learn the wrapper and its saver while they are there."""
        if self.wrapper is None:
            for pid in children(self.proc.pid):
                if is_tool(pid):
                    self.wrapper = Proc(pid)
        if self.wrapper is not None and self.saver is None and self.wrapper.alive():
            for pid in children(self.wrapper.pid):
                found = proc_stat(pid)
                if found and found[2] == pid and is_tool(pid):
                    self.saver = Proc(pid)

    def docker_clients(self):
        roots = [p for p in (self.wrapper, self.saver) if p is not None and p.alive()]
        return [pid for root in roots for pid in descendants(root.pid)
                if (proc_stat(pid) or ("",))[0] == "docker"]

    def inject(self, engine):
        kind = self.fault
        if kind.startswith("wrapper-"):
            signum = getattr(signal, "SIG" + kind.split("-")[1])
            if self.wrapper is not None and self.wrapper.kill(signum):
                self.injected = "wrapper"
        elif kind == "saver-KILL":
            if self.saver is not None and self.saver.kill(signal.SIGKILL):
                self.injected = "saver"
        elif kind == "docker-KILL":
            clients = self.docker_clients()
            client = random.choice(clients) if clients else None
            words = " ".join(cmdline(client)[1:2]) if client else ""
            if client and Proc(client).kill(signal.SIGKILL):
                self.injected = "docker " + words
        elif kind == "terminal":  # (with the prompt back, the saver may still write to it)
            if self.proc.poll() is None or (self.saver is not None and self.saver.alive()):
                self.injected = "terminal" if self.proc.poll() is None else "terminal, saving"
                self.close_terminal()
        elif kind == "engine":
            if engine.restart():
                self.injected = "engine"

    def life(self, world, engine):
        self.start(world)
        if self.fault:
            deadline = self.started + self.delay
            if self.fault in ("saver-KILL", "docker-KILL"):
                wait_until(lambda: self.observe() or self.saver or self.proc.poll() is not None,
                           RUN_TIMEOUT, 0.02)
                deadline = time.monotonic() + self.delay
            while time.monotonic() < deadline:
                self.observe()
                time.sleep(0.02)  # (watching the processes come; the delay is the chaos)
            if self.fault.startswith("wrapper-"):  # (not started yet: it is hit as it starts)
                wait_until(lambda: self.observe() or self.wrapper or self.proc.poll() is not None,
                           5, 0.02)
            self.observe()
            self.inject(engine)
        try:
            self.status = self.proc.wait(timeout=RUN_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.hung = True
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.status = self.proc.wait()
        self.seconds = time.monotonic() - self.started
        if self.pty:
            # (the saver writes to the terminal until it is done; then
            # the window is closed, as after any prompt)
            self.reader.join(RUN_TIMEOUT)
            self.close_terminal()
            self.output = b"".join(self.chunks).decode(errors="replace")
        else:
            self.log.seek(0)
            self.output = self.log.read().decode(errors="replace")
            self.log.close()

    def signal_file(self, world, what):
        try:
            with open(os.path.join(world.trees[self.tree], ".chaos",
                                   "%s.%s" % (self.id, what))) as handle:
                return handle.read().strip()
        except FileNotFoundError:
            return None


def fault_plan(count, rng, rate):
    """Which run gets which fault: engine restarts spread over the soak
    (one in 20 runs, two at least), the other kinds drawn at random."""
    plan = [None] * count
    restarts = max(2, round(count / 20))
    for index in range(restarts):
        plan[min(count - 1, int((index + rng.random()) * count / restarts))] = "engine"
    for index in range(count):
        if plan[index] is None and rng.random() < rate:
            plan[index] = rng.choice([kind for kind in FAULTS if kind != "engine"])
    return plan


# --- the poller: current is never missing ----------------------------------------

class Poller(threading.Thread):
    def __init__(self, world):
        super().__init__(daemon=True)
        self.world = world
        self.stop = threading.Event()
        self.samples = self.down = 0
        self.missing = []

    def run(self):
        wanted = {self.world.current_tag(profile) for profile in PROFILES}
        while not self.stop.wait(0.25):
            result = docker("image", "ls", self.world.image_repo, "--format", "{{.Tag}}")
            if result.returncode != 0:
                self.down += 1
                continue
            self.samples += 1
            # (a listing can miss a tag that a commit moves meanwhile: Docker
            # takes its images, then asks each one's tags; asked by name, a
            # tag is there or not)
            gone = [tag for tag in wanted - set(result.stdout.split()) if "No such image" in
                    docker("image", "inspect", "--format", "{{.Id}}", "%s:%s" % (
                        self.world.image_repo, tag)).stderr]
            if gone:
                self.missing.append((time.strftime("%H:%M:%S"), sorted(gone)))


# --- after the soak: recovery, then the checks --------------------------------------

class Checks:
    def __init__(self):
        self.passed, self.failed = [], []

    def check(self, name, ok, detail=""):
        (self.passed if ok else self.failed).append(name)
        say("%s  %s%s" % ("ok  " if ok else "FAIL", name, (": " + detail) if detail else ""))


def recover(world):
    for profile in PROFILES:
        for _attempt in range(3):  # (an engine still settling: said, and tried again)
            result = world.sh("pi-recover --profile %s" % profile)
            say("pi-recover --profile %s: exit %d%s" % (
                profile, result.returncode, "".join("\n  " + line for line in
                                                     result.stderr.splitlines())))
            if result.returncode == 0:
                break


def quiet(world):
    """No pi-agent process, container or run directory of this soak."""
    run_dir = os.path.join(world.state, "run")
    return (not tool_processes() and not containers(world)
            and not (os.path.isdir(run_dir) and os.listdir(run_dir)))


def all_containers():
    """{ID: (name, the pi-agent.repo label)} of every container."""
    out = docker("ps", "-a", "--no-trunc", "--format",
                 "{{.ID}}\t{{.Names}}\t{{.Label \"pi-agent.repo\"}}").stdout
    return {row[0]: tuple(row[1:3]) for row in
            (line.split("\t") + ["", ""] for line in out.splitlines())}


def containers(world):
    """Containers of this soak's image line, and any other of the tool's
    (pi-agent-list-*, ...) that was not there before it, but the egress
    proxy: the tool keeps it for the next run until it has been idle for
    EGRESS_IDLE (10 minutes), by design."""
    return [name for cid, (name, repo) in all_containers().items()
            if repo == world.image_repo or (name.startswith("pi-agent-")
                                            and not name.startswith("pi-agent-egress-")
                                            and cid not in world.before)]


def image_contents(world, profile):
    """{marker: size} and markers.log's IDs in the profile's current."""
    ref = "%s:%s" % (world.image_repo, world.current_tag(profile))
    result = docker("run", "--rm", "--network", "none", "--entrypoint", "sh", "--user", "0",
                    ref, "-c", "find /var/tmp/markers -maxdepth 1 -type f -printf '%f %s\\n'; "
                    "echo ---; cat /var/tmp/markers.log 2>/dev/null; true")
    if result.returncode != 0:
        return None, None
    listing, _, log = result.stdout.partition("---\n")
    sizes = {}
    for line in listing.splitlines():
        name, size = line.rsplit(" ", 1)
        sizes[name] = int(size)
    return sizes, log.split()


def lock_overlaps(records):
    """Records of one line whose run overlaps another container's:
    [(container, container)]."""
    rows = sorted((r.get("started") or "", r.get("ended") or "", r.get("container"))
                  for r in records if r.get("started") and r.get("ended"))
    waiting = {r.get("container") for r in records if r.get("ended_by") == "waiting"}
    rows = [row for row in rows if row[2] not in waiting]
    bad = []
    for index, (started, ended, name) in enumerate(rows):
        for other_started, _other_ended, other in rows[index + 1:]:
            if other_started >= ended:
                break
            if other != name:
                bad.append((name, other))
    return bad


def check_all(world, runs, poller, checks):
    results = {}
    # -- leftovers
    left = containers(world)
    checks.check("no container left", not left, " ".join(left))
    run_dir = os.path.join(world.state, "run")
    dirs = os.listdir(run_dir) if os.path.isdir(run_dir) else []
    checks.check("no run directory left", not dirs, " ".join(dirs))
    dangling = docker("image", "ls", "-q", "--filter", "dangling=true", "--filter",
                      "label=pi-agent.repo=" + world.image_repo).stdout.split()
    checks.check("no untagged image left", not dangling, " ".join(dangling))
    procs = tool_processes()
    checks.check("no pi-agent process left", not procs, " ".join(map(str, procs)))
    results["leftovers"] = len(left) + len(dirs) + len(dangling) + len(procs)
    # -- markers
    contents = {profile: image_contents(world, profile) for profile in PROFILES}
    for profile, (sizes, _log) in contents.items():
        checks.check("current of %s readable" % profile, sizes is not None)
    owed = [r for r in runs if r.signal_file(world, "marker") is not None]
    lost, wrong = [], []
    for r in owed:
        sizes, log = contents[r.profile]
        other = contents[[p for p in PROFILES if p != r.profile][0]]
        expected = r.size or len("chaos %s\n" % r.id)
        if sizes is None or sizes.get(r.id) != expected or log.count(r.id) != 1:
            lost.append(r.id)
        if other[0] is not None and (r.id in other[0] or r.id in other[1]):
            wrong.append(r.id)
    found_markers = len(owed) - len(lost)
    results["markers"] = (len(owed), found_markers)
    checks.check("every marker owed is in its profile's current, whole, once",
                 not lost, "%d expected, %d found; lost: %s" % (
                     len(owed), found_markers, " ".join(lost[:20])))
    checks.check("no marker in the other profile's current", not wrong, " ".join(wrong[:20]))
    logged = collections.Counter(i for _sizes, log in contents.values() if log for i in log)
    twice = [i for i, count in logged.items() if count > 1]
    checks.check("no marker logged twice", not twice, " ".join(twice[:20]))
    # -- the session logs: each container saved once; one lifecycle at a time
    saved = collections.Counter()
    for profile in PROFILES:
        records = world.sessions(profile)
        for record in records:
            if record.get("ended_by") in SAVED:
                saved[record.get("container")] += 1
        overlaps = lock_overlaps(records)
        checks.check("one lifecycle at a time on %s (session log)" % profile, not overlaps,
                     "; ".join("%s and %s" % pair for pair in overlaps[:5]))
    double = [name for name, count in saved.items() if count > 1]
    checks.check("no container saved twice", not double, " ".join(double[:5]))
    # -- git
    names = {r.id: r.signal_file(world, "marker") for r in owed}
    committed = [r for r in runs if r.signal_file(world, "commit")]
    owed_commits = [r for r in committed if saved.get(names.get(r.id) or
                                                      r.signal_file(world, "marker"))]
    kept_refs = [ref for ref in world.ref_values() if ref.startswith("refs/pi-agent/")]
    missing_commits, kept = [], 0
    reach = {}
    for tree, branch in world.branches.items():
        reach[tree] = set(world.git("rev-list", branch).stdout.split())
    aside = set(world.git("rev-list", *kept_refs).stdout.split()) if kept_refs else set()
    for r in owed_commits:
        oid = r.signal_file(world, "commit")
        if oid in reach[r.tree]:
            continue
        if oid in aside:
            kept += 1
            continue
        missing_commits.append("%s (%s)" % (r.id, (oid or "?")[:12]))
    results["commits"] = (len(owed_commits), len(owed_commits) - len(missing_commits), kept)
    checks.check("every commit owed is on its branch or under refs/pi-agent/",
                 not missing_commits, "%d expected, %d found (%d under refs/pi-agent/); "
                 "lost: %s" % (len(owed_commits), len(owed_commits) - len(missing_commits),
                               kept, " ".join(missing_commits[:20])))
    by_id = {r.id: r for r in runs}
    strangers = []
    for tree, branch in world.branches.items():
        out = world.git("log", "--format=%H %s", "%s..%s" % (world.first, branch)).stdout
        for line in out.splitlines():
            oid, subject = line.split(" ", 1)
            match = re.fullmatch(r"chaos (\d{4})", subject)
            if not match or match.group(1) not in by_id or by_id[match.group(1)].tree != tree:
                strangers.append("%s %s" % (branch, subject))
    checks.check("the branches moved only by runs' commits", not strangers,
                 "; ".join(strangers[:5]))
    now = world.ref_values()
    moved = [ref for ref, oid in world.refs.items() if now.get(ref) != oid
             and ref not in world.branches.values()]
    checks.check("the user's own refs never moved", not moved, " ".join(moved))
    fsck = world.git("fsck", "--strict", "--no-progress")
    checks.check("git fsck --strict", fsck.returncode == 0 and "error" not in fsck.stderr,
                 (fsck.stdout + fsck.stderr).strip()[:500])
    batch = run(["git", "-C", world.repo, "cat-file", "--batch-check"], check=False,
                input="".join(oid + "\n" for oid in now.values()))
    checks.check("no ref to a missing object", "missing" not in batch.stdout,
                 batch.stdout.strip()[:300] if "missing" in batch.stdout else "")
    for tree, branch in world.branches.items():
        head = world.git("symbolic-ref", "HEAD", cwd=world.trees[tree]).stdout.strip()
        checks.check("%s still on %s" % (tree, branch), head == branch, head)
    # -- current, sampled during the soak
    checks.check("current never missing (%d samples, %d while the engine was down)"
                 % (poller.samples, poller.down), not poller.missing,
                 "; ".join("%s %s" % item for item in poller.missing[:5]))
    # -- what the tool said
    crashes = [r.id for r in runs if "Traceback" in r.output]
    logs, gave_up = [], 0
    for name in os.listdir(world.state):
        if name.endswith(".log") or name.endswith(".log.1"):
            with open(os.path.join(world.state, name), errors="replace") as handle:
                for line in handle:
                    # (a saver that could not reach the engine leaves the run to
                    # recovery, as a killed one does; anything else is a bug)
                    if "saver crashed: PiError(" in line or "saver crashed: EngineError(" \
                            in line:
                        gave_up += 1
                    elif "Traceback" in line or "saver crashed" in line:
                        logs.append(line.strip())
    results["saver gave up"] = gave_up
    checks.check("no traceback from pi-agent", not crashes and not logs,
                 " ".join(crashes[:10] + logs[:5]))
    hung = [r.id for r in runs if r.hung]
    checks.check("no run hung (%d s)" % RUN_TIMEOUT, not hung, " ".join(hung))
    return results


# --- the soak ------------------------------------------------------------------------

def soak(args):
    if not engine_up():
        raise SystemExit("chaos: no engine answers (docker info)")
    if not args.engine_restart:
        others = [name for name in docker("ps", "--format", "{{.Names}}").stdout.split()]
        if others:
            raise SystemExit(
                "chaos: this engine runs other containers (%s), which a restart would stop; "
                "run it nested (make chaos-nested), or give --engine-restart CMD"
                % " ".join(others[:5]))
    rng = random.Random(args.seed)
    uid, gid = os.getuid(), os.getgid()
    home = args.home or images.test_home(uid, "chaos")
    base = args.base or images.base_image(uid, gid, home, ROOT, worker="chaos")
    workdir = tempfile.mkdtemp(prefix="pi-agent-chaos-")
    world = World(workdir, base, home, "pi-agent-chaos/%08x" % rng.getrandbits(32))
    world.before = set(all_containers())
    engine = Engine(args.engine_restart, os.path.join(tempfile.gettempdir(),
                                                      "pi-agent-chaos-dockerd.log"))
    say("chaos: %d runs, seed %d, image line %s, in %s" % (args.runs, args.seed,
                                                           world.image_repo, workdir))
    wall = time.monotonic()
    checks = Checks()
    try:
        world.setup()
        plan = fault_plan(args.runs, rng, args.fault_rate)
        runs = [Run(number + 1, rng, fault) for number, fault in enumerate(plan)]
        poller = Poller(world)
        poller.start()
        queue = list(runs)
        queue_lock = threading.Lock()

        def lane():
            while True:
                with queue_lock:
                    if not queue:
                        return
                    each = queue.pop(0)
                each.life(world, engine)
                say("%s -> %s%s%s  %.1fs  [%s]" % (
                    each.describe(), "exit %d" % each.status,
                    " (%s)" % each.injected if each.injected else
                    " (missed)" if each.fault else "",
                    " marker" if each.signal_file(world, "marker") else "",
                    each.seconds, each.wrapper.pid if each.wrapper else "-"))
                if each.status == 7:  # (the engine is down: as a user would, the lane
                    wait_until(engine_up, ENGINE_TIMEOUT, 0.2)  # goes on once it answers)

        lanes = [threading.Thread(target=lane) for _ in range(2)]
        for thread in lanes:
            thread.start()
        for thread in lanes:
            thread.join()
        soaked = time.monotonic() - wall
        if not engine_up():
            wait_until(engine_up, ENGINE_TIMEOUT, 0.5)
        recover(world)
        if not wait_until(lambda: quiet(world), 180, 0.5):
            say("chaos: still busy 180 s after recovery")
        poller.stop.set()
        poller.join()
        results = check_all(world, runs, poller, checks)
        wall = time.monotonic() - wall
        table(args, runs, engine, results, soaked, wall)
        report = os.path.join(args.out or workdir, "chaos-report.json")
        with open(report, "w") as handle:
            json.dump({"seed": args.seed, "runs": [vars_of(r) for r in runs],
                       "results": results, "wall": wall, "failed": checks.failed},
                      handle, indent=1)
        say("report: %s" % report)
    finally:
        if args.out:  # (the line's logs, for a look afterwards)
            for name in os.listdir(world.state) if os.path.isdir(world.state) else ():
                if name.endswith((".log", ".log.1", ".jsonl")):
                    shutil.copy(os.path.join(world.state, name), args.out)
            kept = os.path.join(world.state, "kept")  # (git data a run could not bring back)
            if os.path.isdir(kept):
                shutil.copytree(kept, os.path.join(args.out, "kept"), dirs_exist_ok=True)
        if not args.keep:
            clean(world)
    say("%d passed, %d failed" % (len(checks.passed), len(checks.failed)))
    return 1 if checks.failed else 0


def vars_of(r):
    return {"id": r.id, "profile": r.profile, "tree": r.tree, "size": r.size, "pty": r.pty,
            "fault": r.fault, "delay": r.delay, "injected": r.injected, "status": r.status,
            "seconds": r.seconds, "wrapper": r.wrapper.pid if r.wrapper else None,
            "output": r.output[-2000:]}


def table(args, runs, engine, results, soaked, wall):
    kinds = collections.Counter(r.fault for r in runs if r.fault and r.injected)
    missed = collections.Counter(r.fault for r in runs if r.fault and not r.injected)
    owed, found = results["markers"]
    c_owed, c_found, kept = results["commits"]
    rows = [("runs", str(len(runs))),
            ("runs that reached their agent (markers owed)", str(owed))]
    for kind in FAULTS:
        rows.append(("fault: %s" % kind, "%d (%d missed: nothing to hit)"
                     % (kinds[kind], missed[kind])))
    rows += [("faults in all", str(sum(kinds.values()))),
             ("engine restarts, seconds each (median)", "%d, %.1f" % (
                 engine.restarts, sorted(engine.seconds)[len(engine.seconds) // 2]
                 if engine.seconds else 0)),
             ("markers expected / found", "%d / %d" % (owed, found)),
             ("commits expected / found (under refs/pi-agent/)", "%d / %d (%d)"
              % (c_owed, c_found, kept)),
             ("leftovers (containers, run dirs, untagged images, processes)",
              str(results["leftovers"])),
             ("savers that could not reach the engine (left to recovery)",
              str(results.get("saver gave up", 0))),
             ("wall time: soak / in all", "%.0f s / %.0f s" % (soaked, wall))]
    say("")
    say("| measure | value |")
    say("|---|---|")
    for name, value in rows:
        say("| %s | %s |" % (name, value))
    say("")


def clean(world):
    if not engine_up():
        return
    ids = docker("ps", "-aq", "--filter", "label=pi-agent.repo=" + world.image_repo).stdout
    if ids.split():
        docker("rm", "-f", *ids.split())
    tags = docker("image", "ls", world.image_repo, "--format", "{{.Repository}}:{{.Tag}}").stdout
    if tags.split():
        docker("rmi", "-f", *tags.split())
    dangling = docker("image", "ls", "-q", "--filter", "dangling=true", "--filter",
                      "label=pi-agent.repo=" + world.image_repo).stdout.split()
    if dangling:
        docker("rmi", "-f", *dangling)
    shutil.rmtree(world.workdir, ignore_errors=True)
    shutil.rmtree(world.home, ignore_errors=True)


# --- nested: the soak inside a container with an engine of its own -------------------

ENGINE_DOCKERFILE = """FROM %s
RUN apt-get update -qq \\
 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \\
      docker.io git python3 procps ca-certificates iptables >/dev/null \\
 && rm -rf /var/lib/apt/lists/*
"""


def nested(args, argv):
    """Build (once) an image with Docker 20.10, start it as
    pi-agent-chaos-NAME with a data root of its own on this host's disk,
    start its engine, load the tests' base into it, and run the soak in
    it; then remove the container and its data root."""
    import hashlib
    source = images.BASE_IMAGE
    text = ENGINE_DOCKERFILE % source
    tag = "pi-agent-chaos/engine:" + hashlib.sha256(text.encode()).hexdigest()[:12]
    if docker("image", "inspect", tag).returncode != 0:
        say("chaos: building %s (Docker 20.10 on %s)" % (tag, source))
        context = tempfile.mkdtemp(prefix="pi-agent-chaos-build-")
        with open(os.path.join(context, "Dockerfile"), "w") as handle:
            handle.write(text)
        docker("build", "-q", "-t", tag, context, check=True)
        shutil.rmtree(context)
    home = images.test_home(0, "chaos")
    base = images.base_image(0, 0, home, ROOT, worker="chaos")
    slot = os.environ.get("PI_AGENT_TEST_SLOT") or str(os.getpid())
    name = "pi-agent-chaos-" + slot
    data = os.path.join("/var/tmp", name + "-docker")
    docker("rm", "-f", name)
    shutil.rmtree(data, ignore_errors=True)
    os.makedirs(data)
    out = args.out or tempfile.mkdtemp(prefix="pi-agent-chaos-out-")
    started = time.monotonic()
    try:
        docker("run", "-d", "--init", "--name", name, "--cap-add", "ALL", "--cap-drop",
               "SYS_RESOURCE", "--security-opt", "seccomp=unconfined", "--security-opt",
               "apparmor=unconfined", "--cgroupns", "host",
               "-v", "/sys/fs/cgroup:/sys/fs/cgroup:rw", "-v", data + ":/var/lib/docker",
               "-v", "%s:%s:ro" % (ROOT, ROOT), "-v", "%s:%s" % (out, out),
               tag, "sleep", "infinity", check=True)
        docker("exec", "-d", name, "sh", "-c", "exec dockerd >>/var/log/dockerd.log 2>&1",
               check=True)
        if not wait_until(lambda: docker("exec", name, "docker", "info").returncode == 0, 120,
                          0.5):
            raise SystemExit("chaos: the engine in %s did not start: %s" % (
                name, docker("exec", name, "tail", "-5", "/var/log/dockerd.log").stdout))
        say("chaos: engine up in %s; loading %s" % (name, base))
        save = subprocess.Popen(["docker", "save", base], stdout=subprocess.PIPE)
        subprocess.run(["docker", "exec", "-i", name, "docker", "load", "-q"],
                       stdin=save.stdout, check=True, stdout=subprocess.DEVNULL)
        save.stdout.close()
        save.wait()
        say("chaos: ready in %.0f s" % (time.monotonic() - started))
        inner = [arg for arg in argv if arg != "--nested"]
        return subprocess.run(["docker", "exec", "-e", "USER=root", name, "python3",
                               os.path.join(ROOT, "tests", "chaos.py"), *inner,
                               "--base", base, "--home", home, "--out", out]).returncode
    finally:
        docker("rm", "-f", name)
        shutil.rmtree(data, ignore_errors=True)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", "--runs", type=int, default=300)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--fault-rate", type=float, default=0.6,
                        help="the share of runs that get a fault (engine restarts besides)")
    parser.add_argument("--engine-restart", metavar="CMD", default=os.environ.get(
        "PI_AGENT_CHAOS_ENGINE_RESTART", ""), help="how to restart the engine (sh -c CMD; "
        "then docker info is waited for); default: stop the local dockerd and start it again")
    parser.add_argument("--nested", action="store_true",
                        help="run the soak in a container with an engine of its own")
    parser.add_argument("--base", help="a built base image (default: the tests' own)")
    parser.add_argument("--home", help="the home the base was built for")
    parser.add_argument("--out", help="a directory for the report")
    parser.add_argument("--keep", action="store_true", help="keep the image line and files")
    args = parser.parse_args(argv)
    if args.seed is None:
        args.seed = random.SystemRandom().randrange(1 << 31)
        argv = argv + ["--seed", str(args.seed)]
    if args.nested:
        return nested(args, argv)
    return soak(args)


if __name__ == "__main__":
    sys.exit(main())
