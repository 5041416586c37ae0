"""The core lifecycle against a real Docker engine, through the shell
functions in bash and zsh, as an ordinary user and as root."""

import json
import os
import re
import select
import shutil
import signal
import time

import pytest

import images
from conftest import ENGINE, docker, end_session, repository_images, wait_until

import pi_agent

FAKE_AGENT = ('mkdir -p "$HOME/.local/bin" && printf \'%s\\n\' \'#!/bin/sh\' '
              '\'echo "fake-agent args: $*"\' '
              '\'[ -t 0 ] || echo "stdin: $(cat)"\' '
              '\'echo ran >> "$HOME/.fake-agent-runs"\' '
              '> "$HOME/.local/bin/fake-agent" && chmod +x "$HOME/.local/bin/fake-agent" '
              '&& echo installed-fake-agent')


# --- the acceptance flow ----------------------------------------------------

def test_environment_persists_and_rollback_is_undoable(any_box):
    box = any_box
    box.ok("git init -q .")
    box.ok("pi-exec sh -c 'echo hi > ~/x && sudo touch /usr/local/share/x'")
    both = "pi-exec sh -c 'cat ~/x; test -e /usr/local/share/x && echo there'"
    assert box.ok(both).stdout == "hi\nthere\n"
    assert len(box.snapshots()) == 1, "one run changed the environment: one snapshot"

    before_write = box.snapshots()[0]
    result = box.ok("pi-rollback %s" % before_write)
    kept = result.stderr.split("kept as ")[1].split()[0].rstrip(";")
    assert box.sh(both).stdout == ""

    box.ok("pi-rollback %s" % kept)
    assert box.ok(both).stdout == "hi\nthere\n"
    assert box.dangling() == [], "replaced images do not pile up untagged"


def test_a_run_in_a_repository_ends_while_its_terminal_stays_open(box):
    # (an input that never ends, as a terminal's: pi-agent's own host git
    # once read it, and the run's end waited for ever)
    box.init_repo()
    box.ok("pi-exec --wait true < <(exec sleep 600 2>/dev/null)", timeout=120)
    box.ok("pi-exec --wait sh -c 'echo a > f && git add f && git -c user.name=A "
           "-c user.email=a@x commit -qm by-the-agent' < <(exec sleep 600 2>/dev/null)",
           timeout=120)
    assert box.ok("git log -1 --format=%s").stdout.strip() == "by-the-agent"


def test_agent_writes_into_the_project_as_the_host_user(any_box):
    box = any_box
    sub = box.mkdir(os.path.join(box.project, "deep", "er"))
    box.ok("git init -q .")
    result = box.ok("pi-exec sh -c 'pwd; echo made > made.txt'", cwd=sub)
    assert result.stdout.strip() == sub, "same path inside, plus the subdirectory"
    path = os.path.join(sub, "made.txt")
    assert open(path).read() == "made\n"
    assert os.stat(path).st_uid == box.user.uid


# --- the save ---------------------------------------------------------------

def test_each_changing_run_makes_one_snapshot_and_no_change_makes_none(box):
    for i in range(3):
        box.ok("pi-exec touch ~/stamp%d" % i)
    snaps = box.snapshots()
    assert len(snaps) == 3 and len(set(snaps)) == 3
    layers = len(box.inspect(box.repo + ":current")["RootFS"]["Layers"])
    current_id = box.images()["current"]

    box.ok("pi-exec true")
    box.ok("pi-exec cat /etc/hostname")
    assert box.snapshots() == snaps, "a run that changed nothing leaves no snapshot"
    assert box.images()["current"] == current_id
    assert len(box.inspect(box.repo + ":current")["RootFS"]["Layers"]) == layers


def test_first_run_in_a_new_project_that_changes_nothing_adds_nothing(box):
    base_id = box.images()["base"]
    box.ok("pi-exec true")
    images = box.images()
    assert images.get("current") == base_id and box.snapshots() == []


def test_commits_keep_the_image_config_and_bake_in_nothing_of_the_run(box):
    secret = "sk-test-7c1d9e55-never-in-an-image"
    box.extra_env = {"ANTHROPIC_API_KEY": secret, "PI_AGENT_PASS_ENV": "ANTHROPIC_API_KEY"}
    out = box.ok("pi-exec sh -c 'echo \"$ANTHROPIC_API_KEY\"; touch ~/changed'").stdout
    assert out.strip() == secret, "the listed variable reaches the agent"
    box.wait_saved()
    base = box.inspect(box.repo + ":base")["Config"]
    current = box.inspect(box.repo + ":current")["Config"]
    if ENGINE.command == "podman":  # (which orders ENV as it likes)
        current["Env"], base["Env"] = sorted(current["Env"]), sorted(base["Env"])
    for field in ("Cmd", "Entrypoint", "WorkingDir", "User", "Env"):
        assert current.get(field) == base.get(field), field
    assert current["Labels"]["pi-agent.pid"] == ""
    for tag in box.images():
        ref = "%s:%s" % (box.repo, tag)
        assert secret not in docker("image", "inspect", ref).stdout
        assert secret not in docker("history", "--no-trunc", ref).stdout


def test_a_run_after_a_clean_release_makes_six_docker_calls(box):
    trace = os.path.join(box.state_dir, "trace")
    box.extra_env = {"PI_AGENT_TRACE": trace}
    for i in range(3):
        box.ok("pi-exec touch ~/t%d" % i)
        box.wait_recorded()
        if i == 1:
            os.remove(trace)  # the first runs inspect and list; keep the third's alone
    # The saver's last call (the container's removal) is logged once it is gone.
    assert wait_until(lambda: " rm " in open(trace).read(), timeout=30)
    command = ": %s " % ENGINE.command
    with open(trace) as handle:
        calls = sorted(" ".join(line.split(command, 1)[1].split()[:2]).split(":")[0]
                       for line in handle if command in line)  # (not the steps)
    # Six (one asks what the commit will write, and current's ID with it:
    # see size_call). The save starts no container but the run's own: what
    # the run changed is read from its layer when someone asks
    # (ensure_reports). A run that exits 0 off a terminal is not asked
    # whether it stopped: see run_container. An engine whose layers cannot
    # be listed records the run's diff at the save (one more call; Podman
    # drives its commit with its format, and names images without sha256:).
    listed = ENGINE.command == "docker" and ENGINE.store == "overlay2"
    if not listed:
        calls = [call.split()[0] if call.startswith(("diff ", "tag ")) else call
                 for call in calls]
    assert calls == (
        ["commit -m", "image inspect", "inspect --size", "rm -f", "run -i", "tag sha256"]
        if listed else ["commit " + ("--format" if ENGINE.command == "podman" else "-m"),
                        "diff", "image inspect", "inspect --size", "rm -f", "run -i", "tag"]), \
        calls
    os.remove(trace)
    first = box.ok("pi-diff").stdout
    assert "/t2" in first or "added" in first, first
    with open(trace) as handle:
        assert (" run --rm " in handle.read()) == listed, "the first ask lists the run's layer"
    os.remove(trace)
    assert box.ok("pi-diff").stdout == first
    with open(trace) as handle:
        assert " run " not in handle.read(), "the second reads what the first kept"


def test_labels_record_the_run(box):
    result = box.sh("pi-exec sh -c 'touch ~/a; exit 3'")
    assert result.returncode == 3
    box.wait_saved()
    labels = box.inspect(box.repo + ":current")["Config"]["Labels"]
    snap = box.snapshots()[0]
    assert labels["pi-agent.exit_status"] == "3"
    assert labels["pi-agent.target"] == box.project
    assert labels["pi-agent.previous"] == box.inspect(box.repo + ":" + snap)["Id"]
    assert labels["pi-agent.committed_at"]
    assert "exec in %s (exit 3)" % box.project in box.ok("pi-status").stdout


# --- boundaries -------------------------------------------------------------

def test_host_credentials_and_environment_stay_outside(box):
    box.extra_env = {"GITHUB_TOKEN": "ghp_hostsecret", "AWS_SECRET_ACCESS_KEY": "awssecret",
                     "SSH_AUTH_SOCK": "/tmp/ssh-agent.sock", "HOST_ONLY": "hostonly",
                     "DOCKER_HOST": "unix:///var/run/docker.sock", "TZ": "Europe/Paris"}
    out = box.ok("pi-exec env").stdout
    for value in ("ghp_hostsecret", "awssecret", "/tmp/ssh-agent.sock", "hostonly",
                  "docker.sock"):
        assert value not in out
    env = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
    assert env["GITHUB_TOKEN"] == "" and env["SSH_AUTH_SOCK"] == ""
    assert env["TZ"] == "Europe/Paris", "the allow-list passes"


def test_credential_in_pass_env_is_refused(box):
    result = box.sh("pi-exec true", env={"PI_AGENT_PASS_ENV": "GITHUB_TOKEN",
                                         "GITHUB_TOKEN": "x"})
    assert result.returncode == 3
    assert result.stderr.startswith("pi-agent: ") and "GITHUB_TOKEN" in result.stderr
    assert "current" not in box.images()


def test_only_the_project_is_mounted_and_no_docker_socket(box):
    marker = os.path.join(box.home, ".ssh", "id_ed25519")
    os.makedirs(os.path.dirname(marker), exist_ok=True)
    with open(marker, "w") as handle:
        handle.write("PRIVATE-KEY-MARKER")
    box.chown(box.home)
    out = box.ok("pi-exec sh -c 'cat /proc/self/mountinfo; echo ===; "
                 "ls -d /var/run/docker.sock /run/docker.sock 2>&1; "
                 "grep -rl PRIVATE-KEY-MARKER / --exclude-dir=proc --exclude-dir=sys 2>/dev/null;"
                 " echo done'").stdout
    mounts, rest = out.split("===")
    destinations = {line.split()[4] for line in mounts.splitlines()}
    host_binds = destinations - {"/", "/proc", "/dev", "/sys", "/dev/pts", "/dev/mqueue",
                                 "/dev/shm", "/sys/fs/cgroup", "/dev/console"}
    host_binds = {d for d in host_binds if not d.startswith(("/proc/", "/sys/", "/dev/"))}
    # besides the project: the engine's own files and its init binary (--init)
    host_binds -= set(pi_agent.INIT_MOUNTS + pi_agent.PODMAN_MOUNTS[3:])
    # the project has no repository: its .git is the run's own (see the git gate)
    assert host_binds == {box.project, box.project + "/.git", "/etc/hosts", "/etc/hostname",
                          "/etc/resolv.conf"}
    assert "No such file" in rest and rest.count("No such file") == 2
    assert "PRIVATE-KEY-MARKER" not in rest and box.home not in rest


def test_running_in_home_is_refused_and_starts_nothing(box):
    result = box.sh("pi-exec true", cwd=box.home)
    assert result.returncode == 3
    assert "home directory" in result.stderr and result.stderr.count("\n") == 1
    assert "current" not in box.images() and box.containers() == []


def test_repository_at_home_needs_here(box):
    box.ok("git init -q .", cwd=box.home)
    proj = box.mkdir(os.path.join(box.home, "proj"))
    result = box.sh("pi-exec pwd", cwd=proj)
    assert result.returncode == 3 and "--here" in result.stderr
    assert box.ok("pi-exec --here pwd", cwd=proj).stdout.strip() == proj


def test_exit_status_passes_through(shell_box):
    box = shell_box
    assert box.sh("pi-exec sh -c 'exit 7'").returncode == 7
    missing = box.sh("pi-exec no-such-command-here")
    assert missing.returncode == 127, "a shell's code for a missing command"
    assert "no-such-command-here: not found" in missing.stderr


@pytest.mark.parametrize("name", ['with space, comma: colon "quote" é'])
def test_awkward_project_paths_work(box, name):
    project = box.mkdir(os.path.join(os.path.dirname(box.project), name))
    box.ok("pi-exec sh -c 'pwd > where.txt'", cwd=project)
    assert open(os.path.join(project, "where.txt")).read().strip() == project


def test_git_commits_inside_without_touching_project_config(box):
    box.ok("git init -q .")
    config_before = open(os.path.join(box.project, ".git", "config")).read()
    out = box.ok("pi-exec sh -c 'echo a > a && git add a && git commit -qm agent && "
                 "git log -1 --format=%an:%G?'").stdout
    assert out.strip() == "Agent:N"
    box.ok("pi-exec sh -c 'test ! -e ~/.ssh && test ! -e ~/.gnupg'")  # no key to sign or push
    assert open(os.path.join(box.project, ".git", "config")).read() == config_before
    assert "Agent" not in config_before


def test_a_first_run_below_home_that_changes_nothing_leaves_no_snapshot(box):
    project = box.mkdir(os.path.join(box.home, "src", "app"))
    box.ok("pi-exec true", cwd=project)
    box.wait_saved()
    assert box.snapshots() == [], "making ~/src the agent's is not a run's change"
    box.ok("pi-exec touch ~/kept")
    box.ok("pi-reset-system")
    box.ok("pi-exec true", cwd=project)  # from base again: ~/src again, still no snapshot
    box.ok("pi-rollback")  # so this undoes the reset
    box.ok("pi-exec test -e ~/kept")
    assert "pi-agent, making the directories above %s the agent's" % project in \
        box.ok("pi-snapshots").stdout


def test_new_directories_above_a_project_in_home_belong_to_the_agent(box):
    project = box.mkdir(os.path.join(box.home, "src", "deeper", "app"))
    out = box.ok("pi-exec sh -c 'stat -c %U ~/src ~/src/deeper; touch ~/src/mine && echo ok'",
                 cwd=project).stdout.split()
    agent = "root" if ENGINE.root_is_user else "agent"  # (root inside is the user)
    assert out == [agent, agent, "ok"]


def test_mount_at_gives_the_flat_layout(box):
    out = box.ok("pi-exec pwd", env={"PI_AGENT_MOUNT_AT": "/workspace"}).stdout
    assert out.strip() == "/workspace"


# --- the agent --------------------------------------------------------------

def test_pi_installs_the_agent_once_and_reads_stdin(shell_box):
    box = shell_box
    box.extra_env = {"PI_AGENT_COMMAND": "fake-agent", "PI_AGENT_INSTALL_CMD": FAKE_AGENT}
    first = box.ok("echo task | pi -p hello")
    # In a pipe the install is quiet: the agent's output alone, nothing else.
    assert first.stdout == "fake-agent args: -p hello\nstdin: task\n" and first.stderr == ""
    second = box.ok("pi --wait -- --help </dev/null")
    assert second.stdout == "fake-agent args: --help\nstdin: \n"
    assert box.ok("pi-exec cat ~/.fake-agent-runs").stdout == "ran\nran\n"
    # On a terminal it says what it does, and how long it took.
    box.ok("pi-exec rm ~/.local/bin/fake-agent")
    shown = box.ok("script -qec \". %s/shell/pi.sh; pi -- x\" /dev/null" % box.install_dir,
                   env={"SHELL": "/bin/bash"}).stdout
    assert "fake-agent is not installed here; installing it:" in shown
    assert re.search(r"installed-fake-agent.*pi-agent: installed fake-agent in \d+ s.*"
                     r"fake-agent args: x", shown, re.S), shown


def test_pi_shell_runs_a_shell_in_the_same_lifecycle(shell_box):
    box = shell_box
    result = box.ok("printf 'touch ~/from-shell\\necho in-$(pwd)\\nexit 4\\n' | pi-shell; "
                    "echo status=$?")
    assert "in-%s" % box.project in result.stdout and "status=4" in result.stdout
    box.ok("pi-exec test -e ~/from-shell")
    assert box.sh("pi-shell extra").returncode == 2


def test_completion_offers_snapshots_and_options(shell_box):
    box = shell_box
    box.ok("pi-exec touch ~/one")
    box.ok("pi-exec touch ~/two")
    snaps = box.snapshots()
    if box.shell == "bash":
        script = ("COMP_WORDS=(pi-rollback snap-); COMP_CWORD=1; _pi_agent_complete_bash; "
                  "printf '%s\\n' \"${COMPREPLY[@]}\"; COMP_WORDS=(pi --w); "
                  "_pi_agent_complete_bash; printf '%s\\n' \"${COMPREPLY[@]}\"")
    else:
        script = "_pi_agent_candidates pi-rollback; _pi_agent_candidates pi | grep -e --w"
    out = box.ok(script).stdout.split()
    assert set(snaps) <= set(out) and "--wait" in out


def test_status_says_where_each_setting_comes_from(box):
    config = os.path.join(box.home, ".config", "pi-agent", "config")
    os.makedirs(os.path.dirname(config))
    with open(config, "w") as handle:
        handle.write("# my settings\nPI_AGENT_SNAPSHOT_KEEP=4\nPI_AGENT_MEMORY=2g\n")
    box.chown(box.home)
    status = box.ok("pi-status", env={"PI_AGENT_MEMORY": "1g"}).stdout
    keep = [line for line in status.splitlines() if line.startswith("PI_AGENT_SNAPSHOT_KEEP")][0]
    memory = [line for line in status.splitlines() if line.startswith("PI_AGENT_MEMORY")][0]
    assert "4" in keep and "%s line 2" % config in keep
    assert "1g" in memory and "(environment)" in memory
    assert "config file: %s" % config in status


def test_wrapper_help_and_version(shell_box):
    box = shell_box
    assert "pi-rollback" in box.ok("pi --help").stdout
    assert box.ok("pi --version").stdout.startswith("pi-agent ")
    assert "pi-exec" in box.ok("pi-exec --help").stdout


# --- the lock ---------------------------------------------------------------

def test_second_run_is_busy_and_wait_waits(box):
    first = box.background("pi-exec sh -c 'touch ~/first; while [ ! -e go ]; do sleep 0.1; "
                           "done'")
    assert wait_until(lambda: len(box.containers()) == 1, timeout=30)
    busy = box.sh("pi-exec true")
    assert busy.returncode == 5
    assert "pid" in busy.stderr and box.project in busy.stderr and "--wait" in busy.stderr
    with box.running("pi-exec --wait sh -c 'ls ~/first'") as waiter:
        select.select([waiter.stderr], [], [], 60)  # until it says what it waits for
        open(os.path.join(box.project, "go"), "w").close()  # the first run may end
        out, err = waiter.communicate(timeout=120)
        assert waiter.returncode == 0, "exit %d\nstdout: %s\nstderr: %s" % (
            waiter.returncode, out, err)
    assert "first" in out
    assert first.wait(timeout=60) == 0


def test_kill_9_of_the_wrapper_loses_nothing(box):
    run = box.background("pi-exec sh -c 'sudo touch /usr/local/kill9 && "
                         "while [ ! -e go ]; do sleep 0.1; done'")
    assert wait_until(lambda: box.wrapper_pid(), timeout=30)
    assert wait_until(lambda: docker("exec", box.containers()[0], "test", "-e",
                                     "/usr/local/kill9", check=False).returncode == 0)
    os.kill(box.wrapper_pid(), signal.SIGKILL)
    run.wait(timeout=60)
    box.ok("pi-exec test -e /usr/local/kill9")
    box.wait_saved()
    assert box.containers() == []


# --- failures the user can cause ---------------------------------------------

def run_dirs(box):
    path = os.path.join(box.state_dir, "run")
    return os.listdir(path) if os.path.isdir(path) else []


def test_engine_unreachable_is_one_line_exit_7_and_leaves_nothing(box):
    variable, engine = ("CONTAINER_HOST", "Podman service") if ENGINE.command == "podman" else (
        "DOCKER_HOST", "Docker engine")
    result = box.sh("pi-exec true", env={variable: "unix:///nonexistent/docker.sock"})
    assert result.returncode == 7
    assert result.stderr.count("\n") == 1 and "nonexistent" in result.stderr
    assert "current" not in box.images()
    # After a clean run nothing asks the engine before `docker run`, whose
    # own lines must not come first; the hint names what chose the engine.
    box.init_repo()
    box.ok("pi-exec true")
    box.wait_saved()
    for host in ("unix:///nonexistent/docker.sock", "tcp://127.0.0.1:1"):
        result = box.sh("pi-exec true", env={variable: host})
        assert result.returncode == 7 and result.stderr.count("\n") == 1, result.stderr
        assert result.stderr.startswith("pi-agent: cannot reach the %s at %s" % (engine, host))
        assert "unset " + variable in result.stderr
        box.wait_saved()
        assert run_dirs(box) == [] and box.containers() == []
    box.ok("pi-exec true")


def test_a_network_that_is_not_there_is_a_bad_setting_before_the_run(box):
    box.init_repo()
    result = box.sh("pi-exec true", env={"PI_AGENT_NETWORK": "nosuchnet"})
    assert result.returncode == 9 and result.stderr.count("\n") == 1, result.stderr
    assert "PI_AGENT_NETWORK=nosuchnet" in result.stderr
    assert "%s network ls" % ENGINE.command in result.stderr
    box.wait_saved()
    assert run_dirs(box) == [] and box.containers() == []
    assert box.ok("pi-exec --offline echo ok", env={"PI_AGENT_NETWORK": "nosuchnet"}).stdout \
        == "ok\n", "offline does not need it"
    host = docker("network", "ls", "-q", "--filter", "name=^host$").stdout.strip()
    if host:  # (Podman's is a mode, not a network with an ID)
        result = box.sh("pi-exec true", env={"PI_AGENT_NETWORK": host})
        assert result.returncode == 9 and "the host's own network" in result.stderr


def test_a_base_image_that_cannot_be_had_is_named_with_its_setting(box):
    box.extra_env = {"PI_AGENT_IMAGE_REPO": box.repo + "-new",
                     "PI_AGENT_BASE_IMAGE": "nosuch.invalid/base:1"}
    dry = box.ok("pi --dry-run").stdout
    assert "FROM nosuch.invalid/base:1 (not here: the build would pull it; " \
           "PI_AGENT_BASE_IMAGE picks another" in dry
    piped = box.sh("pi-exec true")
    on_terminal = box.sh("script -qec \". %s/shell/pi.sh; pi-exec true\" /dev/null"
                         % box.install_dir, env={"SHELL": "/bin/bash"})
    for result, output in ((piped, piped.stderr), (on_terminal, on_terminal.stdout)):
        assert result.returncode == 8, output
        last = output.strip().splitlines()[-1]
        assert "pi-agent:" in last and "could not get nosuch.invalid/base:1" in last
        assert "set PI_AGENT_BASE_IMAGE (in the environment, or in " in last
    assert piped.stderr.count("pi-agent:") == 2, "what it does, then the one error"
    assert re.search(r"step \d+/", on_terminal.stdout.lower()), \
        "the engine's progress is shown on a terminal"


def test_a_failed_first_build_leaves_nothing_behind_and_says_so(box):
    import uuid
    mark = uuid.uuid4().hex
    context = box.mkdir(os.path.join(os.path.dirname(box.project), "context"))
    with open(os.path.join(context, "Dockerfile"), "w") as handle:
        handle.write("ARG BASE_IMAGE\nFROM $BASE_IMAGE\nRUN echo %s > /mark\n"
                     "RUN test %s = fails\n" % (mark, mark))
    box.extra_env = {"PI_AGENT_IMAGE_REPO": box.repo + "-new",
                     "PI_AGENT_DOCKERFILE": os.path.join(context, "Dockerfile")}
    result = box.sh("pi-exec true")
    assert result.returncode == 8, result.stderr
    assert "docker build failed" in result.stderr and "what the failed build left, " \
        in result.stderr and "is removed" in result.stderr
    containers = docker("ps", "-a", "--no-trunc", "--format", "{{.Command}}").stdout
    assert mark not in containers, "no stopped container of the failed step"
    ids = docker("image", "ls", "-a", "-q").stdout.split()
    steps = docker("image", "inspect", "--format", "{{json .ContainerConfig.Cmd}}",
                   *ids, check=False).stdout  # (others' images may go meanwhile)
    assert mark not in steps, "no image of its finished steps"


def test_a_build_behind_a_proxy_whose_ca_is_missing_ends_naming_the_setting(box):
    """This machine reaches npm's registry through a TLS-inspecting proxy:
    npm without the proxy's CA (Node's own roots alone) fails as a base
    build behind one does, piped and on a terminal."""
    context = box.mkdir(os.path.join(os.path.dirname(box.project), "context"))
    with open(os.path.join(context, "Dockerfile"), "w") as handle:
        handle.write("ARG BASE_IMAGE\nFROM $BASE_IMAGE\n"
                     "RUN env -u NODE_EXTRA_CA_CERTS npm view --fetch-retries=0 node version\n")
    box.extra_env = {"PI_AGENT_IMAGE_REPO": box.repo + "-new", "PI_AGENT_CA_CERTS": "",
                     "PI_AGENT_BASE_IMAGE": box.repo + ":base",
                     "PI_AGENT_DOCKERFILE": os.path.join(context, "Dockerfile")}
    piped = box.sh("pi-exec true")
    on_terminal = box.sh("script -qec \". %s/shell/pi.sh; pi-exec true\" /dev/null"
                         % box.install_dir, env={"SHELL": "/bin/bash"})
    for result, output in ((piped, piped.stderr), (on_terminal, on_terminal.stdout)):
        assert result.returncode == 8, output
        last = output.strip().splitlines()[-1]
        assert re.match(r"pi-agent: docker build failed: a server's certificate was not trusted "
                        r"\((SELF_SIGNED_CERT_IN_CHAIN|UNABLE_TO_GET_ISSUER_CERT_LOCALLY)\): a "
                        r"TLS-inspecting proxy's, most likely: set PI_AGENT_CA_CERTS to its CA "
                        r"certificate", pi_agent.ESCAPES.sub("", last)), output
        assert "\\x1b" not in last and "The command" not in last
    assert piped.stderr.count("pi-agent:") == 2, "what it does, then the one error"


def test_status_check_says_in_seconds_what_a_first_run_lacks(box):
    """pi-status --check, before a first build: the FROM image here, its apt
    mirror reached; npm's registry not trusted without this machine's CA
    (its TLS-inspecting proxy's), trusted with it; nothing made."""
    repo = box.repo + "-new"
    box.extra_env = {"PI_AGENT_IMAGE_REPO": repo, "PI_AGENT_CA_CERTS": ""}
    started = time.monotonic()
    result = box.sh("pi-status --check")
    assert time.monotonic() - started < 20
    assert result.returncode == 10, result.stdout + result.stderr
    lines = dict(line.split(None, 1) for line in result.stdout.splitlines())
    assert set(lines) == {"engine:", "image:", "apt:", "npm:", "disk:"}, result.stdout
    assert lines["image:"].startswith("ok: %s is here (PI_AGENT_BASE_IMAGE): the first pi builds"
                                      % box.env()["PI_AGENT_BASE_IMAGE"])
    assert lines["apt:"].startswith("ok: http") and lines["engine:"].startswith("ok: ")
    assert lines["npm:"].startswith("FAILED: https://registry.npmjs.org/: ") and \
        "set PI_AGENT_CA_CERTS to its CA certificate" in lines["npm:"]
    assert result.stderr == "pi-agent: 1 check failed: see above\n"
    trusted = box.sh("pi-status --check", env={"PI_AGENT_CA_CERTS": images.test_ca_certs(
        os.path.join(box.install_dir, "tests", "fixtures"))})
    assert trusted.returncode == 0 and "FAILED" not in trusted.stdout, trusted.stdout
    assert trusted.stderr == "pi-agent: every check passed\n"
    assert "npm:     ok: https://registry.npmjs.org/ answers" in trusted.stdout
    unknown = box.sh("pi-status --check", env={"PI_AGENT_BASE_IMAGE": "nosuch.invalid/base:1"})
    assert unknown.returncode == 10 and "image:   FAILED: nosuch.invalid/base:1 " \
        "(PI_AGENT_BASE_IMAGE) is not here and cannot be pulled (" in unknown.stdout
    assert "apt:" not in unknown.stdout, "its mirrors are in the image"
    assert box.sh("pi-status --check --json").returncode == 2
    assert repository_images(repo) == {} and "/etc/apt/sources.list" not in docker(
        "ps", "-a", "--no-trunc", "--format", "{{.Command}}").stdout, "nothing made, nothing left"


def test_status_says_when_the_base_was_built_from_other_settings(box, tmp_path):
    rebuilt = box.ok("pi-rebuild-base")
    assert "building %s:base" % box.repo in rebuilt.stderr and "first use" not in rebuilt.stderr
    assert "differs" not in box.ok("pi-status").stdout
    changed = os.path.join(box.home, "Dockerfile")
    with open(os.path.join(box.install_dir, "Dockerfile")) as source:
        text = source.read()
    with open(changed, "w") as handle:
        handle.write(text + "# changed\n")
    os.chmod(changed, 0o644)
    status = box.ok("pi-status", env={"PI_AGENT_BASE_IMAGE": "other:1",
                                      "PI_AGENT_DOCKERFILE": changed}).stdout
    assert "the base differs from your settings: PI_AGENT_BASE_IMAGE is other:1, the base was " \
           "built FROM %s; the Dockerfile (%s) has changed since the base was built; " \
           "pi-rebuild-base builds it again" % (box.env()["PI_AGENT_BASE_IMAGE"], changed) \
        in status


def test_a_mistyped_option_of_pi_exec_starts_nothing(box):
    result = box.sh("pi-exec --ofline make")
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert "unknown option --ofline" in result.stderr and "current" not in box.images()
    assert box.ok("pi-exec -- sh -c 'echo ok'").stdout == "ok\n"


def test_a_near_miss_setting_in_the_environment_is_named(box):
    result = box.ok("pi-exec true", env={"PI_AGENT_SNAPSHOT_KEPE": "3"})
    assert "PI_AGENT_SNAPSHOT_KEPE is not a setting; did you mean PI_AGENT_SNAPSHOT_KEEP?" \
        in result.stderr


def test_unknown_snapshot_is_exit_4(box):
    box.ok("pi-exec touch ~/x")
    result = box.sh("pi-rollback snap-nope")
    assert result.returncode == 4 and "pi-snapshots" in result.stderr


def tree(path):
    """Every path below `path`, with its type and mode."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(path):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            found[os.path.relpath(full, path)] = os.lstat(full).st_mode
    return found


def test_dry_run_prints_docker_commands_and_changes_nothing(box):
    box.init_repo()
    shutil.rmtree(os.path.join(box.project, ".git", "hooks"))
    before = tree(box.project)
    out = box.ok("pi-exec --dry-run touch ~/x").stdout
    assert "%s run -i --init" % ENGINE.command in out and "%s commit" % ENGINE.command in out
    assert re.search("#   (exec )?sh -c 'exec \"\\$@\"' pi-exec touch ", out), "the run script"
    assert "current" not in box.images() and box.containers() == []
    assert tree(box.project) == before, "not even .git/hooks is made"
    assert not os.path.exists(box.state_dir), "no lock, no state, no run script"


# --- housekeeping -----------------------------------------------------------

def test_reset_system_prune_and_reset_all(box):
    for i in range(3):
        box.ok("pi-exec touch ~/f%d" % i)
    assert len(box.snapshots()) == 3
    box.ok("pi-reset-system")
    assert box.images()["current"] == box.images()["base"]
    assert len(box.snapshots()) == 4, "the replaced current is kept"
    box.ok("pi-prune 2")
    assert len(box.snapshots()) == 2
    assert box.sh("pi-reset-all </dev/null").returncode == 3, "asks, or needs --yes"
    assert box.dangling() == []
    box.ok("pi-reset-all --yes")
    assert set(box.images()) == {"base"}
    assert box.dangling() == []
    box.ok("pi-exec true")
    assert box.images()["current"] == box.images()["base"]


def test_reset_system_says_what_goes_and_keeps_the_agents_own_files(box):
    box.ok("pi-exec sh -c 'mkdir -p ~/.pi/agent ~/.local/share/opencode && echo tok-1 > "
           "~/.pi/agent/auth.json && echo o > ~/.local/share/opencode/auth.json && "
           "sudo touch /usr/local/installed'")
    box.wait_saved()
    said = box.ok("pi-reset-system").stderr.splitlines()
    assert "the agents' logins, settings and sessions, but for their own files" in said[0]
    assert said[-1].startswith("pi-agent: current is now the base image (%s:base), with "
                               "~/.pi, ~/.local/share/opencode of before" % box.repo), said
    assert box.ok("pi-exec sh -c 'cat ~/.pi/agent/auth.json; test ! -e /usr/local/installed; "
                  "stat -c %U ~/.local/share ~/.local/share/opencode/auth.json'").stdout == \
        "tok-1\nagent\nagent\n"
    facts = json.loads(box.ok("pi-diff --json --all base current").stdout)
    assert {change["path"] for change in facts["changes"]} >= {
        os.path.join(box.home, ".pi/agent/auth.json")}
    box.ok("pi-rollback")  # undone: the environment as it was
    box.ok("pi-exec test -e /usr/local/installed")
    assert "their own files" not in box.ok("pi-reset-system --drop-config").stderr
    assert box.images()["current"] == box.images()["base"]


def test_nothing_is_printed_over_the_prompt_and_the_next_command_says_it(box):
    """An interactive bash on a terminal (script's): once the prompt is
    back, the background saver (and its auto-prune) prints nothing; what it
    did is said by pi-log and by the next command."""
    import subprocess
    box.extra_env = {"PI_AGENT_SNAPSHOT_KEEP": "1"}
    box.ok("pi-exec touch ~/one")
    prefix = ["env", "-i"] + ["%s=%s" % item for item in box.env(SHELL="/bin/bash").items()]
    if box.user.via_runuser:
        prefix = ["runuser", "-u", box.user.name, "--"] + prefix
    terminal = subprocess.Popen(prefix + ["script", "-qec", "bash --norc -i", "/dev/null"],
                                cwd=box.project, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, start_new_session=True)
    seen = b""

    def read_until(pattern, timeout=60):
        nonlocal seen
        deadline = time.monotonic() + timeout
        while not re.search(pattern, seen, re.S) and time.monotonic() < deadline:
            if select.select([terminal.stdout], [], [], 1)[0]:
                seen += os.read(terminal.stdout.fileno(), 65536)
        return re.search(pattern, seen, re.S)

    try:
        terminal.stdin.write(b"PS1='P> '; . %s/shell/pi.sh\n"
                             b"pi-exec touch ~/two </dev/null; echo ran-$?\n"
                             % box.install_dir.encode())
        terminal.stdin.flush()
        assert read_until(rb"\nran-0\r?\nP> $"), seen
        box.wait_saved()
        box.wait_recorded()
        after = len(seen)
        terminal.stdin.write(b"echo done\n")
        terminal.stdin.flush()
        assert read_until(rb"\ndone\r?\nP> $"), seen
        assert seen[after:].startswith(b"echo done"), "printed after the prompt: %r" % (
            seen[after:],)
    finally:
        terminal.stdin.close()
        end_session(terminal)
    assert len(box.snapshots()) == 1, "the save did prune"
    assert "after the last save, auto-prune removed 1 snapshot" in box.ok("pi-log").stdout
    assert "auto-prune removed 1 snapshot" in box.ok("pi-rollback").stderr


def test_rollback_and_its_undo_keep_every_state_under_one_name(box):
    box.extra_env = {"PI_AGENT_SNAPSHOT_KEEP": "3"}
    for i in range(3):
        box.ok("pi-exec touch ~/r%d" % i)
    states = set(box.images().values())
    assert len(states) == 4, "current and three snapshots (the first is base)"
    box.ok("pi-rollback")
    undo = box.ok("pi-rollback")
    snaps = box.snapshots()
    images = box.images()
    assert set(images.values()) == states, "rollback and undo drop no state"
    assert len({images[s] for s in snaps}) == len(snaps), "no image kept under two names"
    assert "still kept as %s" % snaps[-2] in undo.stderr
    listing = box.ok("pi-snapshots").stdout
    marked = [row.split()[1] for row in listing.splitlines()
              if row.split()[:1] == ["*"] and row.split()[1].startswith("snap-")]
    assert marked == [snaps[-1]] and images[snaps[-1]] == images["current"]

    # A run from a state kept already keeps it under its name; the prune it
    # triggers spares it, and what the prune dropped is said.
    box.ok("pi-exec touch ~/r3")
    assert box.snapshots() == snaps[1:], "the oldest went, the run's own stayed"
    assert "after the last save, auto-prune removed 1 snapshot (%s)" % snaps[0] \
        in box.ok("pi-snapshots").stdout
    told = box.ok("pi-exec true").stderr
    assert "auto-prune removed 1 snapshot (%s)" % snaps[0] in told
    box.ok("pi-rollback %s" % snaps[1])
    box.ok("pi-exec true")  # changes nothing: the kept snapshot stays
    assert snaps[1] in box.snapshots()
    box.ok("pi-exec sh -c 'test -e ~/r0 && test ! -e ~/r1'")


@pytest.mark.long
def test_thirty_noisy_runs_later_the_pinned_and_the_daily_states_are_still_there(box):
    """Retention as a user meets it: days of work, a state pinned, then an
    hour of sessions that change only shell history (noise): a rollback
    still reaches the pinned state, each day's and today's real one."""
    box.extra_env = {"PI_AGENT_SNAPSHOT_KEEP": "3", "PI_AGENT_AUTO_PRUNE": "0"}
    for word in ("day3", "day2", "day1", "today"):
        box.ok("pi-exec sh -c 'echo %s > ~/state'" % word)
    box.extra_env["PI_AGENT_AUTO_PRUNE"] = "1"
    # What those runs kept, moved to the days they stand for (the clock
    # cannot be wound back): the base state 40 days ago, then a day each.
    pristine, day3, day2, day1 = box.snapshots()
    now = time.time()
    aged = {}
    for name, days in ((pristine, 40), (day3, 3), (day2, 2), (day1, 1)):
        aged[name] = pi_agent.snapshot_name(now - days * 86400)
        docker("tag", "%s:%s" % (box.repo, name), "%s:%s" % (box.repo, aged[name]))
        docker("rmi", "%s:%s" % (box.repo, name))
    said = box.ok("pi-snapshots --pin pristine %s" % aged[pristine]).stderr
    assert "pinned %s as pristine" % aged[pristine] in said
    again = box.sh("pi-snapshots --pin pristine")
    assert again.returncode == 3 and again.stderr == (
        "pi-agent: pin pristine exists already; pi-snapshots --unpin pristine first\n")
    assert box.sh("pi-snapshots --unpin nosuch").returncode == 4

    for i in range(30):
        box.ok("pi-exec sh -c 'echo ls%d >> ~/.bash_history'" % i)
    snaps = box.snapshots()
    assert set(aged.values()) <= set(snaps), "the pinned state and each day's stay"
    assert len(snaps) == 4 + 1 + 3, "and today's real state; of the noise, the newest 3: %s" % (
        snaps,)
    assert "would remove 0 snapshots" in box.ok("pi-prune --dry-run").stderr, \
        "pi-prune keeps by the same rule"
    listing = box.ok("pi-snapshots").stdout
    assert re.search(r"^\s*%s\s+pristine\s" % aged[pristine], listing, re.M), listing
    assert json.loads(box.ok("pi-snapshots --json").stdout)[-1]["pins"] == ["pristine"]
    for name, state in (("pristine", ""), (aged[day3], "day3"), (aged[day2], "day2"),
                        (aged[day1], "day1"), (snaps[4], "today")):
        box.ok("pi-rollback %s" % name)
        assert box.ok("pi-exec sh -c 'cat ~/state 2>/dev/null; true'").stdout == \
            state + "\n" * bool(state), name
    box.ok("pi-prune 0")
    assert box.snapshots() == [aged[pristine]], "pi-prune N never removes a pinned one"
    box.ok("pi-snapshots --unpin pristine")
    box.ok("pi-prune 0")
    assert box.snapshots() == []


def test_a_pin_of_the_state_you_have_is_the_snapshot_the_next_run_keeps(box):
    box.ok("pi-exec touch ~/a")
    said = box.ok("pi-snapshots --pin mine").stderr
    kept = box.snapshots()
    assert len(kept) == 2 and "pi-agent: pinned %s as mine" % kept[-1] in said, said
    box.ok("pi-exec touch ~/b")
    assert box.snapshots() == kept, "the run keeps its start by the pinned snapshot: no other"
    assert "added" in box.ok("pi-diff mine").stdout
    box.ok("pi-rollback mine")
    box.ok("pi-exec sh -c 'test -e ~/a && test ! -e ~/b'")
    assert box.ok("_pi_agent complete pins").stdout == "mine\n"


def test_status_and_snapshots_show_the_line(box):
    box.ok("pi-exec touch ~/s")
    box.wait_saved()
    status = box.ok("pi-status").stdout
    assert box.repo + ":current" in status and "layers" in status
    assert "PI_AGENT_IMAGE_REPO" in status and "(environment)" in status
    assert "lock: free" in status and box.project in status
    snaps = box.ok("pi-snapshots").stdout
    assert box.snapshots()[0] in snaps and "the base image" in snaps


def test_the_session_log_has_a_record_per_saved_run_newest_first(box):
    box.extra_env = {}  # (changes recorded, as by default)
    assert box.sh("pi-exec sh -c 'exit 3'").returncode == 3
    box.ok("pi-exec sh -c 'head -c 1000000 /dev/urandom > ~/one-mb'")
    records = json.loads(box.ok("pi-log --json").stdout)
    assert [record["exit_status"] for record in records] == [0, 3]
    newest, oldest = records
    assert 1e6 <= newest["bytes_added"] < 1.1e6 and newest["snapshot"].startswith("snap-")
    assert newest["image_before"] != newest["image_after"]
    assert oldest["bytes_added"] == 0 and oldest["snapshot"] is None
    assert oldest["image_before"] == oldest["image_after"] == newest["image_before"]
    assert newest["command"] == ["sh", "-c", "head -c 1000000 /dev/urandom > ~/one-mb"]
    assert newest["kind"] == "exec" and newest["ended_by"] == "run"
    assert newest["target"] == box.project and newest["profile"] == ""
    table = box.ok("pi-log").stdout.splitlines()
    assert len(table) == 3 and table[1].split()[2:4] == ["exec", "0"]
    assert table[1].split()[8] == newest["snapshot"] and table[2].split()[3] == "3"
    assert len(json.loads(box.ok("pi-log -n 1 --json").stdout)) == 1
    # pi-snapshots names the run that started from each snapshot, in JSON as in its table.
    snaps = json.loads(box.ok("pi-snapshots --json").stdout)
    assert [snap["name"] for snap in snaps] == [newest["snapshot"]]
    assert snaps[0]["next_run"] == newest and snaps[0]["current"] is False
    assert snaps[0]["kept_at"].replace("-", "").replace(":", "").replace("T", "-")[:19] == \
        newest["snapshot"][len("snap-"):]
    row = box.ok("pi-snapshots").stdout.splitlines()[1].split()
    assert row[0] == snaps[0]["name"] and " ".join(row).endswith("exec, exit 0, +1.0 MB")


def test_pi_status_json_matches_its_table(box):
    box.ok("pi-exec sh -c 'head -c 1000000 /dev/urandom > ~/one-mb'")
    box.wait_saved()
    text = box.ok("pi-status").stdout
    facts = json.loads(box.ok("pi-status --json").stdout)
    current = facts["images"]["current"]
    assert current["ref"] == box.repo + ":current" and current["id"] == box.inspect(
        box.repo + ":current")["Id"]
    assert re.search(r"^current\s+%s\s+%s\s+%d layers\s+exec in %s \(exit 0\)$" % (
        re.escape(current["ref"]), re.escape(pi_agent.human_size(current["size"])),
        current["layers"], re.escape(box.project)), text, re.M), text
    assert current["made_by"] == {"kind": "exec", "target": box.project, "exit_status": 0}
    assert re.search(r"^snapshots\s+%d\s+newest %s$" % (facts["snapshots"]["count"],
                                                       facts["snapshots"]["newest"]), text, re.M)
    if facts["engine_facts"]["sizes_are_disk"]:
        assert "holds %s of its own" % pi_agent.human_size(facts["disk"]["own"]) in text
        assert 1e6 <= facts["disk"]["own"] < 1.1e6
    else:
        assert facts["disk"] is None and "\ndisk: not known on this image store" in text
    assert facts["lock"] is None and "\nlock: free\n" in text
    assert facts["target"]["path"] == box.project and "target: %s " % box.project in text
    assert facts["settings"]["PI_AGENT_IMAGE_REPO"] == {"value": box.repo,
                                                        "source": "environment"}
