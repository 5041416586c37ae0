"""Nothing lost: closed terminals, kill -9, failed commits, a dead daemon and
concurrent starts, against the real engine. A fake `docker` in front of the
real one injects the faults an engine cannot produce on demand (a failing,
slow or blind command); everything else is the real engine."""

import json
import os
import select
import shutil
import signal
import subprocess

import pytest

from conftest import ROOT, docker, pi_agent, wait_until

FAKE_DOCKER = """#!/bin/sh
# Fault injection in front of the real docker: a file FAULTS/<command>-fails
# holds the error text to fail with, FAULTS/<command>-slow a number of seconds
# to sleep first, FAULTS/ps-blind makes `docker ps` list nothing. Each call
# adds its pid (the docker client's, once exec'd) to FAULTS/<command>-started.
faults=%(faults)s
echo $$ >>"$faults/$1-started"
if [ -f "$faults/$1-slow" ]; then sleep "$(cat "$faults/$1-slow")"; fi
if [ -f "$faults/$1-fails" ]; then cat "$faults/$1-fails" >&2; exit 1; fi
if [ "$1" = ps ] && [ -f "$faults/ps-blind" ]; then exit 0; fi
exec %(real)s "$@"
"""


@pytest.fixture
def faulty(box):
    """The box, with a fake docker first on PATH; box.faults is its switchboard."""
    real = shutil.which("docker")
    bindir = box.mkdir(os.path.join(os.path.dirname(box.project), "fakebin"))
    box.faults = box.mkdir(os.path.join(os.path.dirname(box.project), "faults"))
    os.chmod(box.faults, 0o777)
    path = os.path.join(bindir, "docker")
    with open(path, "w") as handle:
        handle.write(FAKE_DOCKER % {"faults": box.faults, "real": real})
    os.chmod(path, 0o755)
    box.extra_env["PATH"] = bindir + ":/usr/local/bin:/usr/bin:/bin"
    return box


def fault(box, name, content=""):
    with open(os.path.join(box.faults, name), "w") as handle:
        handle.write(content)


def clear(box, name):
    os.unlink(os.path.join(box.faults, name))


def started(box, command):
    """The pids of the `docker COMMAND` calls made so far."""
    try:
        with open(os.path.join(box.faults, command + "-started")) as handle:
            return [int(pid) for pid in handle.read().split()]
    except FileNotFoundError:
        return []


def in_container(box, path):
    cid = box.live_run()[0]
    return cid is not None and docker("exec", cid, "test", "-e", path,
                                      check=False).returncode == 0


def start_and_wait_for(box, path, script=None):
    """Start a run in the background that writes `path`, then waits for a
    go file (that no test makes: the test ends the run as it means to)."""
    run = box.background(script or "pi-exec sh -c 'sudo touch %s && "
                         "while [ ! -e go ]; do sleep 0.1; done'" % path)
    assert wait_until(lambda: in_container(box, path), timeout=60), run.stderr
    return run


# --- signals ----------------------------------------------------------------

@pytest.mark.parametrize("how", ["SIGHUP to the terminal's process group",
                                 "SIGINT to the terminal's process group",
                                 "SIGTERM to the wrapper", "SIGKILL to the wrapper"])
def test_the_run_is_saved_whatever_ends_the_wrapper(box, how):
    path = "/usr/local/sig-" + how.split()[0].lower()
    run = start_and_wait_for(box, path)
    signum = getattr(signal, how.split()[0])
    if "group" in how:
        os.killpg(run.pid, signum)  # the session bash, the wrapper and the docker client
    else:
        os.kill(box.wrapper_pid(), signum)
    status = run.wait(timeout=60)
    if how.startswith(("SIGTERM", "SIGINT")):
        assert status == 128 + signum, "the wrapper reports the signal, even in a pipe"
    # (the session's shell is gone at once; the wrapper may still be ending the run)
    box.ok("pi-exec --wait test -e %s" % path)
    box.wait_saved()
    assert box.containers() == []


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_the_agent_hears_a_signal_and_stops_in_its_own_time(box, signum):
    """SIGINT to the terminal's process group, SIGTERM to the wrapper: the
    agent hears it (the run script, its parent, passes it on)."""
    script = ("pi-exec sh -c 'trap \"echo stopped > ~/stopped; exit 0\" INT TERM; "
              "touch ~/started; while :; do sleep 0.1; done'")
    run = start_and_wait_for(box, box.home + "/started", script)
    if signum == signal.SIGINT:
        os.killpg(run.pid, signum)
    else:
        os.kill(box.wrapper_pid(), signum)
    assert run.wait(timeout=60) == 128 + signum
    assert box.ok("pi-exec cat ~/stopped").stdout == "stopped\n", "its trap ran, and was saved"


def test_ctrl_c_while_python_loads_pi_agent_is_said_not_a_traceback(tmp_path):
    """Ctrl-C as a command starts, before main hears it (chaos, issue 28: a
    SIGINT 0.1 s into pi-exec printed Python's traceback): here it lands as
    the shell functions' Python loads pi_agent.py."""
    os.mkdir(tmp_path / "shell")
    shutil.copy(os.path.join(ROOT, "shell", "pi.sh"), tmp_path / "shell")
    (tmp_path / "pi_agent.py").write_text(
        "import os, signal\nos.kill(os.getpid(), signal.SIGINT)\nimport json\n")
    result = subprocess.run(["bash", "--norc", "-c", ". %s/shell/pi.sh; pi-exec true" % tmp_path],
                            capture_output=True, text=True, timeout=60)
    assert (result.returncode, result.stderr) == (130, "pi-agent: interrupted\n"), result.stderr


def test_while_it_runs_the_container_shows_no_value_and_no_argument(box):
    secret = "sk-test-0b7e-never-in-inspect"
    box.extra_env = {"ANTHROPIC_API_KEY": secret, "PI_AGENT_PASS_ENV": "ANTHROPIC_API_KEY"}
    run = start_and_wait_for(box, "/tmp/marker-argument",
                             "pi-exec sh -c 'touch /tmp/marker-argument; "
                             "while [ ! -e go ]; do sleep 0.1; done'")
    cid = box.live_run()[0]
    shown = docker("inspect", cid).stdout + docker("ps", "-a", "--no-trunc").stdout
    assert secret not in shown and "marker-argument" not in shown
    script = docker("exec", cid, "cat", "/dev/pi-agent/run").stdout
    assert secret in script, "it reaches the agent through the run script"
    os.kill(box.wrapper_pid(), signal.SIGTERM)
    run.wait(timeout=60)
    box.wait_saved()
    run_dir = os.path.join(box.state_dir, "run")
    assert wait_until(lambda: os.listdir(run_dir) == [], timeout=10), "and it is gone after"


def test_current_changed_by_hand_between_runs_is_never_overwritten(box):
    box.ok("pi-exec touch ~/one")
    box.wait_saved()
    docker("tag", box.repo + ":base", box.repo + ":current")
    box.ok("pi-exec touch ~/two")  # starts from the current its line remembers
    box.wait_saved()
    assert box.images()["current"] == box.images()["base"], "the hand-made current stays"
    result = box.ok("pi-exec test ! -e ~/one")  # and the next run uses it
    assert "changed outside pi-agent" in result.stderr and result.stderr.count("\n") == 1
    snap = result.stderr.split("the run is snapshot ")[1].split()[0]
    box.ok("pi-rollback " + snap)
    box.ok("pi-exec test -e ~/one -a -e ~/two")


def test_kill_9_of_wrapper_and_saver_is_recovered_by_the_next_run(box):
    run = start_and_wait_for(box, "/usr/local/both-killed")
    saver = box.holder()["saver_pid"]
    os.kill(box.wrapper_pid(), signal.SIGKILL)
    os.kill(saver, signal.SIGKILL)
    run.wait(timeout=60)
    assert len(box.containers()) == 1, "left behind"
    assert "left-behind containers: 1" in box.ok("pi-status").stdout
    orphans = box.ok("pi-orphans").stdout
    assert "pi-agent-" in orphans and box.project in orphans
    [orphan] = json.loads(box.ok("pi-orphans --json").stdout)
    assert orphan["container"] in orphans and orphan["target"] == box.project
    assert orphan["state"] == "running" and orphan["waiting"] is None
    result = box.ok("pi-exec test -e /usr/local/both-killed")
    assert "recovered the interrupted run" in result.stderr
    assert result.stderr.count("\n") == 1, "one line"


def killed_before_the_hand_back(box, script):
    """The run directory of a run whose wrapper and saver were killed after
    the agent ran `script` (its git work not brought back yet)."""
    box.init_repo()
    run = start_and_wait_for(box, "/tmp/done", script=(
        "pi-exec sh -c '%s && touch /tmp/done && while [ ! -e go ]; do sleep 0.1; done'"
        % script))
    name = box.live_run_name()
    saver = box.holder()["saver_pid"]
    os.kill(box.wrapper_pid(), signal.SIGKILL)
    os.kill(saver, signal.SIGKILL)
    run.wait(timeout=60)
    return os.path.join(box.state_dir, "run", name)


def agents_loose_objects(run_dir):
    objects = os.path.join(run_dir, "git", "objects")
    return [(prefix, entry) for prefix in os.listdir(objects) if len(prefix) == 2
            for entry in os.listdir(os.path.join(objects, prefix))]


def test_a_hand_back_cut_short_is_done_again_and_the_commit_lands(box):
    """A saver killed inside the hand-back leaves the agent's objects it had
    linked, some of them, a copy cut short: the next hand-back makes them
    again (it once stopped at the first, and the commit was lost)."""
    run_dir = killed_before_the_hand_back(
        box, "echo a > f && git add f && git -c user.name=A -c user.email=a@x "
        "commit -qm by-the-agent")
    loose = agents_loose_objects(run_dir)
    assert loose, "the agent's commit is in its git directory"
    for prefix, entry in loose:
        os.makedirs(os.path.join(run_dir, "incoming", prefix), exist_ok=True)
        open(os.path.join(run_dir, "incoming", prefix, entry), "wb").close()
    box.chown(os.path.join(run_dir, "incoming"))
    result = box.ok("pi-exec true")
    assert "recovered the interrupted run" in result.stderr, result.stderr
    assert box.ok("git log -1 --format=%s HEAD").stdout.strip() == "by-the-agent", \
        result.stderr
    box.ok("git fsck --strict")


def test_a_stash_entry_brought_back_before_the_cut_is_not_made_twice(box):
    run_dir = killed_before_the_hand_back(
        box, "for a in a b; do echo $a > f && git add f && "
        "git -c user.name=A -c user.email=a@x stash -q; done")
    for prefix, entry in agents_loose_objects(run_dir):  # (as the cut-short hand-back did)
        target = os.path.join(box.project, ".git", "objects", prefix)
        os.makedirs(target, exist_ok=True)
        shutil.copy(os.path.join(run_dir, "git", "objects", prefix, entry), target)
    box.chown(os.path.join(box.project, ".git", "objects"))
    with open(os.path.join(run_dir, "git", "logs", "refs", "stash")) as handle:
        for line in handle:
            box.ok("git update-ref --create-reflog -m agent refs/stash " + line.split()[1])
    result = box.ok("pi-exec true")
    assert "recovered the interrupted run" in result.stderr, result.stderr
    assert len(box.ok("git stash list").stdout.splitlines()) == 2, result.stderr


def test_kill_9_during_the_commit_loses_nothing(faulty):
    box = faulty
    fault(box, "commit-slow", "3")
    box.ok("pi-exec sh -c 'sudo touch /usr/local/during-commit'")
    assert wait_until(lambda: started(box, "commit"), timeout=30)  # inside `docker commit`
    os.killpg(box.holder()["saver_pid"], signal.SIGKILL)  # the saver and its docker client
    clear(box, "commit-slow")
    box.ok("pi-exec test -e /usr/local/during-commit")
    box.wait_saved()
    assert box.containers() == []


def test_kill_9_while_waiting_for_the_lock_changes_nothing(box):
    first = start_and_wait_for(box, "/usr/local/holder")
    waiter = box.background("pi-exec --wait touch ~/never")
    assert select.select([waiter.stderr], [], [], 30)[0], "it says what it waits for"
    said = waiter.stderr.readline()
    assert said.startswith("pi-agent: waiting for pid %d" % box.wrapper_pid()), said
    assert waiter.poll() is None, "it waits"
    os.killpg(waiter.pid, signal.SIGKILL)  # the waiting wrapper, and the shell around it
    waiter.wait(timeout=30)
    os.kill(box.wrapper_pid(), signal.SIGTERM)
    first.wait(timeout=60)
    box.ok("pi-exec test -e /usr/local/holder")
    assert box.sh("pi-exec test -e ~/never").returncode == 1
    box.wait_saved()
    assert box.containers() == []


def test_kill_9_while_the_container_starts_runs_nothing_and_leaves_nothing(faulty):
    box = faulty
    box.ok("pi-exec touch ~/before")
    box.wait_recorded()  # (its saver's last docker run lists its layer)
    fault(box, "run-slow", "2")
    runs = len(started(box, "run"))
    run = box.background("pi-exec touch ~/never-ran")
    assert wait_until(lambda: len(started(box, "run")) > runs, timeout=30)  # in `docker run`
    os.kill(box.holder()["pid"], signal.SIGKILL)
    run.wait(timeout=30)
    client = started(box, "run")[-1]  # goes on, orphaned, and finds no run script
    assert wait_until(lambda: not pi_agent.pid_alive(client), timeout=30)
    clear(box, "run-slow")
    assert box.containers() == [], "docker run went on without its script"
    result = box.ok("pi-exec test ! -e ~/never-ran")
    assert result.stderr == ""
    box.wait_saved()
    assert box.containers() == [] and len(box.snapshots()) == 1, "only the first run's"
    run_dir = os.path.join(box.state_dir, "run")
    assert wait_until(lambda: os.listdir(run_dir) == [], timeout=10), "no run script is left"


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_while_the_container_is_made_takes_the_run_back(faulty, signum):
    """Ctrl-C (or SIGTERM) as the run begins: docker run stops before it
    made the container. Nothing ran, so nothing is to save: no failed save
    of a container that never was, no snapshot, no run directory left
    (chaos, issue 28)."""
    box = faulty
    box.ok("pi-exec touch ~/before")
    box.wait_recorded()
    fault(box, "run-slow", "5")  # (the signal lands in this sleep; the client goes after 3 s)
    runs = len(started(box, "run"))
    run = box.background("pi-exec touch ~/never-ran")
    assert wait_until(lambda: len(started(box, "run")) > runs, timeout=30)  # in `docker run`
    os.kill(box.holder()["pid"], signum)
    assert run.wait(timeout=60) == 128 + signum
    stderr = run.stderr.read()
    assert "failed" not in stderr and "Traceback" not in stderr, stderr
    clear(box, "run-slow")
    box.wait_saved()
    run_dir = os.path.join(box.state_dir, "run")
    assert wait_until(lambda: os.listdir(run_dir) == [], timeout=30), os.listdir(run_dir)
    result = box.ok("pi-exec test ! -e ~/never-ran")
    assert "failed" not in result.stderr, result.stderr
    box.wait_saved()
    assert box.containers() == [] and len(box.snapshots()) == 1, "only the first run's"
    assert [r["ended_by"] for r in json.loads(box.ok("pi-log --json").stdout)] == ["run"] * 2


def test_a_run_killed_before_its_container_was_made_leaves_no_run_directory(faulty):
    """The wrapper and its saver killed before `docker run` made the
    container, as between writing the run directory and forking the saver
    (chaos, issue 28): the next run's recovery removes the directory, and
    the value passed to the agent in its script with it."""
    box = faulty
    box.extra_env.update(API_TOKEN="tok-5a0c", PI_AGENT_PASS_ENV="API_TOKEN")
    box.ok("pi-exec touch ~/before")
    box.wait_recorded()
    fault(box, "run-slow", "30")  # (the client is killed in it: it never reaches the engine)
    runs = len(started(box, "run"))
    run = box.background("pi-exec touch ~/never-ran")
    assert wait_until(lambda: len(started(box, "run")) > runs, timeout=30)  # in `docker run`
    os.kill(box.holder()["saver_pid"], signal.SIGKILL)
    os.killpg(run.pid, signal.SIGKILL)  # the wrapper, the docker client, its sleep
    run.wait(timeout=30)
    run_dir = os.path.join(box.state_dir, "run")
    [left] = os.listdir(run_dir)
    assert "tok-5a0c" in open(os.path.join(run_dir, left, "run")).read()
    clear(box, "run-slow")
    box.ok("pi-exec test ! -e ~/never-ran")
    box.wait_saved()
    assert wait_until(lambda: os.listdir(run_dir) == [], timeout=30), os.listdir(run_dir)
    assert box.containers() == [] and len(box.snapshots()) == 1, "only the first run's"


def test_kill_9_of_the_saver_while_it_removes_the_container(faulty):
    box = faulty
    fault(box, "rm-slow", "3")
    box.ok("pi-exec sh -c 'sudo touch /usr/local/saved-then-killed'")
    assert wait_until(lambda: (box.holder() or {}).get("phase") is None and
                      box.containers() and not box.lock_held(), timeout=30)
    saver = max(int(pid) for pid in box.state().get("removing", {}).values())
    os.killpg(saver, signal.SIGKILL)
    clear(box, "rm-slow")
    result = box.ok("pi-exec test -e /usr/local/saved-then-killed")
    assert "interrupted" not in result.stderr, "it was saved: nothing to recover"
    box.wait_saved()
    assert box.containers() == [] and len(box.snapshots()) == 1


def leave_behind(box, path):
    """A run killed with its saver: its container is left behind."""
    box.wait_saved()  # (an earlier run's container gone: removed after its lock)
    run = start_and_wait_for(box, path)
    os.kill(box.holder()["saver_pid"], signal.SIGKILL)  # first: it would save if it saw
    os.kill(box.wrapper_pid(), signal.SIGKILL)         # the wrapper go
    run.wait(timeout=60)
    assert len(box.containers()) == 1


def test_a_leftover_whose_current_is_gone_is_kept_as_a_snapshot(box):
    leave_behind(box, "/usr/local/left")
    docker("rmi", box.repo + ":current")
    shutil.rmtree(box.state_dir)  # and a fresh state directory: the labels still find it
    result = box.ok("pi-exec test ! -e /usr/local/left")
    said = [line for line in result.stderr.splitlines() if "no current" in line]
    assert len(said) == 1 and "Traceback" not in result.stderr, result.stderr
    snap = [word for word in said[0].split() if word.startswith("snap-")][0].rstrip(":;)")
    box.ok("pi-rollback " + snap)
    box.ok("pi-exec test -e /usr/local/left")
    box.wait_saved()
    assert box.containers() == []


def test_prune_dry_run_is_a_plain_read(box):
    for name in ("one", "two"):
        box.ok("pi-exec touch ~/" + name)
    leave_behind(box, "/usr/local/left")
    state = open(box.line().state_path).read()
    result = box.ok("pi-prune 0 --dry-run")
    assert "would remove 2 snapshots" in result.stderr and "Traceback" not in result.stderr
    assert open(box.line().state_path).read() == state, "no state written"
    assert len(box.containers()) == 1 and len(box.snapshots()) == 2, "nothing recovered or gone"


def test_a_saver_killed_during_the_run_is_replaced_by_the_same_save(box):
    """The wrapper saves in its place, as carefully: current changed by hand
    meanwhile is not overwritten."""
    box.ok("pi-exec touch ~/before")
    box.wait_saved()
    run = start_and_wait_for(box, "/usr/local/during", script=(
        "pi-exec sh -c 'sudo touch /usr/local/during; while [ ! -e ~/go ]; do sleep 0.1; done'"))
    os.kill(box.holder()["saver_pid"], signal.SIGKILL)
    docker("tag", box.repo + ":base", box.repo + ":current")
    cid = box.live_run()[0]
    docker("exec", cid, "touch", box.home + "/go")
    assert run.wait(timeout=60) == 0
    stderr = run.stderr.read()
    assert "saving in the foreground" in stderr and "changed outside pi-agent" in stderr, stderr
    assert box.images()["current"] == box.images()["base"], "the hand-made current stays"
    snap = stderr.split("the run is snapshot ")[1].split()[0]
    box.ok("pi-rollback " + snap)
    box.ok("pi-exec test -e /usr/local/during")
    box.wait_saved()
    assert box.containers() == []


def test_ctrl_c_during_the_foreground_save_leaves_it_to_recovery(faulty):
    box = faulty
    box.ok("pi-exec touch ~/before")
    box.wait_saved()
    run = start_and_wait_for(box, "/usr/local/during", script=(
        "pi-exec sh -c 'sudo touch /usr/local/during; while [ ! -e ~/go ]; do sleep 0.1; done'"))
    saver = box.holder()["saver_pid"]
    os.kill(saver, signal.SIGKILL)
    # Dead, its pipe closed (a loaded machine takes a while): else the
    # wrapper still finds it there and leaves the save to it.
    assert wait_until(lambda: not pi_agent.pid_alive(saver), timeout=30)
    wrapper = box.wrapper_pid()
    # Long enough that the signal lands inside the commit on a loaded machine.
    fault(box, "commit-slow", "15")
    commits = len(started(box, "commit"))
    docker("exec", box.live_run()[0], "touch", box.home + "/go")
    assert wait_until(lambda: len(started(box, "commit")) > commits, timeout=60)
    os.kill(wrapper, signal.SIGINT)  # inside the foreground save's commit
    assert run.wait(timeout=60) == 130, run.stderr.read()
    clear(box, "commit-slow")
    result = box.ok("pi-exec test -e /usr/local/during")
    assert "recovered" in result.stderr or "saved already" in result.stderr, result.stderr
    box.wait_saved()
    assert box.containers() == []


def test_a_recovery_that_fails_before_its_save_is_tried_again(faulty):
    box = faulty
    box.ok("pi-exec touch ~/before")
    leave_behind(box, "/usr/local/left")
    fault(box, "container-fails", "Cannot connect to the Docker daemon at unix:///x. "
                                  "Is the docker daemon running?")
    first = box.sh("pi-exec true")
    assert first.returncode == 7 and "Traceback" not in first.stderr, first.stderr
    clear(box, "container-fails")
    result = box.ok("pi-exec test -e /usr/local/left")
    assert "recovered the interrupted run" in result.stderr


def test_a_run_that_cannot_reach_the_engine_leaves_the_recovery_to_the_next(box):
    """A lifecycle that fails before its recovery (the engine down, as
    while it restarts) must not release the lock as clean: the next run
    still looks for what the interrupted one left (chaos, issue 28)."""
    leave_behind(box, "/usr/local/left")
    down = box.sh("pi-exec true", env={"DOCKER_HOST": "unix:///nonexistent/docker.sock"})
    assert down.returncode == 7, down.stderr
    result = box.ok("pi-exec test -e /usr/local/left")
    assert "recovered the interrupted run" in result.stderr
    box.wait_saved()
    assert box.containers() == []


# --- failed saves -----------------------------------------------------------

@pytest.mark.parametrize("error,code", [
    ("Error response from daemon: layer does not exist", 8),
    ("Cannot connect to the Docker daemon at unix:///var/run/docker.sock. "
     "Is the docker daemon running?", 7)])
def test_a_failed_commit_keeps_current_and_the_container_until_recovered(faulty, error, code):
    box = faulty
    box.ok("pi-exec touch ~/before")
    box.wait_saved()
    current = box.images()["current"]
    fault(box, "commit-fails", error)
    failed = box.sh("pi-exec sh -c 'echo kept > ~/kept'", env={"PI_AGENT_SAVE": "foreground"})
    assert failed.returncode == code
    assert "pi-recover" in failed.stderr
    assert box.images()["current"] == current, "current is untouched"
    assert len(box.containers()) == 1, "the container keeps the changes"

    again = box.sh("pi-exec touch ~/not-run")
    assert again.returncode == code, "no new run on top of an unsaved one"
    assert "pi-recover" in again.stderr and len(box.containers()) == 1

    clear(box, "commit-fails")
    result = box.ok("pi-exec cat ~/kept")
    assert result.stdout == "kept\n" and "recovered" in result.stderr
    assert box.sh("pi-exec test -e ~/not-run").returncode == 1
    box.wait_saved()
    assert box.containers() == []


def test_a_background_save_failure_is_reported_by_the_next_command(faulty):
    box = faulty
    fault(box, "commit-fails", "Error response from daemon: layer does not exist")
    assert box.sh("pi-exec touch ~/bg").returncode == 0, "the agent's own status"
    box.wait_saved()
    status = box.ok("pi-status").stdout
    assert "notice: the save" in status and "layer does not exist" in status
    clear(box, "commit-fails")
    result = box.ok("pi-recover")
    assert "recovered" in result.stderr
    assert "notice" not in box.ok("pi-status").stdout
    box.ok("pi-exec test -e ~/bg")


def test_a_save_that_fails_for_disk_space_waits_for_your_decision(faulty):
    """Not retried by every run, each filling the disk again."""
    box = faulty
    fault(box, "commit-fails", "Error response from daemon: write /var/lib/docker/tmp: "
                               "no space left on device")
    failed = box.sh("pi-exec touch ~/bg", env={"PI_AGENT_SAVE": "foreground"})
    assert failed.returncode == 3 and "pi-recover --drop PATH" in failed.stderr
    clear(box, "commit-fails")
    status = box.ok("pi-status").stdout
    assert "waiting: " in status and status.count("no space left") == 1, "said once"
    assert "no space left" in box.ok("pi-exec true").stderr, "said by the next command"
    assert "no space left" not in box.ok("pi-exec true").stderr, "once, and not retried"
    box.wait_saved()
    assert len(box.containers()) == 1
    assert "recovered" in box.ok("pi-recover").stderr
    assert "waiting" not in box.ok("pi-status").stdout
    box.ok("pi-exec test -e ~/bg")


def test_two_leftovers_are_recovered_oldest_first_and_nothing_is_lost(faulty):
    box = faulty
    fault(box, "ps-blind")  # the second run must not see (and recover) the first
    for name in ("first", "second"):
        run = start_and_wait_for(box, "/usr/local/" + name, script=(
            "pi-exec sh -c 'echo %s | sudo tee -a /usr/local/order >/dev/null; "
            "sudo touch /usr/local/%s; while [ ! -e go ]; do sleep 0.1; done'" % (name, name)))
        saver = box.holder()["saver_pid"]
        os.kill(box.wrapper_pid(), signal.SIGKILL)
        os.kill(saver, signal.SIGKILL)
        run.wait(timeout=60)
    clear(box, "ps-blind")
    assert len(box.containers()) == 2
    result = box.ok("pi-exec cat /usr/local/order")
    lines = [line for line in result.stderr.splitlines() if "run of" in line]
    assert len(lines) == 2, result.stderr
    assert result.stdout == "first\n", "the oldest went into current"
    log = json.loads(box.ok("pi-log --json").stdout)
    assert [record["ended_by"] for record in log] == ["run", "recovered", "recovered"]
    assert [record["exit_status"] for record in log] == [0, None, None]
    snap = [word for word in lines[1].split() if word.startswith("snap-")][0].rstrip(";)")
    assert "older environment" in lines[1]
    box.ok("pi-rollback %s" % snap)
    assert box.ok("pi-exec cat /usr/local/order").stdout == "second\n", "and none is lost"


# --- concurrency and waiting ------------------------------------------------

def test_twelve_concurrent_runs_all_land(box):
    runs = [box.background("pi-exec --wait sh -c 'sudo touch /usr/local/c%02d'" % i)
            for i in range(12)]
    for run in runs:
        assert run.wait(timeout=240) == 0, run.stderr.read()
    out = box.ok("pi-exec ls /usr/local").stdout.split()
    assert sorted(name for name in out if name.startswith("c")) == \
        ["c%02d" % i for i in range(12)]
    assert len(box.snapshots()) == 10, "12 saves, auto-pruned to the newest 10"


def test_status_shows_a_save_and_readers_wait_for_it(faulty):
    box = faulty
    fault(box, "commit-slow", "10")  # (long enough for pi-status first, on a loaded machine)
    box.ok("pi-exec touch ~/slow")
    assert wait_until(lambda: box.holder().get("phase") == "saving", timeout=30)
    assert "saving the run in " + box.project in box.ok("pi-status").stdout
    clear(box, "commit-slow")
    snaps = box.ok("pi-snapshots")
    assert "waiting for pid" in snaps.stderr and "snap-" in snaps.stdout


def test_unlock_explains_and_never_breaks_a_live_lock(box):
    assert "nothing holds the lock" in box.ok("pi-unlock").stderr
    run = start_and_wait_for(box, "/usr/local/unlock")
    result = box.sh("pi-unlock")
    assert result.returncode == 5 and "pid" in result.stderr
    assert box.sh("pi-exec true").returncode == 5, "still locked"
    os.kill(box.wrapper_pid(), signal.SIGTERM)
    run.wait(timeout=60)
    box.ok("pi-exec --wait test -e /usr/local/unlock")


def test_a_finished_run_is_never_listed_as_left_behind(box):
    for i in range(5):  # its saver may still be removing it
        out = box.ok("pi-exec touch ~/o%d; pi-orphans" % i).stdout
        assert out.startswith("no left-behind containers"), out


def test_clean_orphans_asks_then_discards(box):
    box.extra_env = {"API_TOKEN": "tok-3e1d", "PI_AGENT_PASS_ENV": "API_TOKEN"}
    leave_behind(box, "/usr/local/discard-me")
    run_dir = box.line().run_dir
    assert "tok-3e1d" in open(os.path.join(run_dir, os.listdir(run_dir)[0], "run")).read()
    assert box.sh("pi-clean-orphans </dev/null").returncode == 3
    assert len(box.containers()) == 1
    assert "removed 1" in box.ok("pi-clean-orphans --yes").stderr
    assert box.containers() == []
    assert os.listdir(run_dir) == [], "its run script, with the passed value, went too"
    assert box.sh("pi-exec test -e /usr/local/discard-me").returncode == 1
