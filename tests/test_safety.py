"""Host safety against the real engine: file ownership, notices for
host-run files, credential URLs, network and resource limits. (What a
hostile agent cannot do to the host is in test_containment.py.)"""

import os
import subprocess

import pytest

from conftest import docker, make_sandbox


def git(box, *args, cwd=None):
    return box.ok("git " + " ".join(args), cwd=cwd)


def test_changes_to_files_the_host_runs_are_announced(box):
    result = box.ok("pi-exec sh -c 'echo \"export X=1\" > .envrc; mkdir -p .vscode; "
                    "echo {} > .vscode/tasks.json; echo ok > README'")
    notice = [line for line in result.stderr.splitlines() if "changed" in line]
    assert len(notice) == 1 and ".envrc" in notice[0] and ".vscode/tasks.json" in notice[0]
    assert "README" not in notice[0]
    quiet = box.ok("pi-exec sh -c 'echo again > README'")
    assert "changed" not in quiet.stderr


def test_a_credential_in_a_remote_url_is_warned_about(box):
    box.init_repo()
    box.ok("git remote add origin https://me:ghp_abcdef123456@github.com/me/repo.git")
    result = box.ok("pi-exec true")
    assert "credential" in result.stderr and "ghp_abcdef123456" not in result.stderr
    box.ok("git remote set-url origin https://github.com/me/repo.git")
    assert "credential" not in box.ok("pi-exec true").stderr


def test_offline_has_no_network(box):
    assert box.ok("pi-exec --offline ls /sys/class/net").stdout.split() == ["lo"]
    assert box.ok("pi-exec ls /sys/class/net", env={"PI_AGENT_NETWORK": "none"}).stdout.split() \
        == ["lo"]
    assert "eth0" in box.ok("pi-exec ls /sys/class/net").stdout.split()
    for option, env, how in (("--offline", {}, "--offline"),
                             ("", {"PI_AGENT_EGRESS": "none"}, "PI_AGENT_EGRESS=none")):
        failed = box.sh("pi-exec %s sh -c 'exit 3'" % option, env=env)
        assert failed.returncode == 3 and failed.stderr.splitlines()[-1] == "pi-agent: exit " \
            "3; this run had no network (%s): what failed may have needed it" % how, failed.stderr
    assert "network" not in box.sh("pi-exec sh -c 'exit 3'").stderr, "online: nothing to say"


def cgroup_value(box, v1, v2, env):
    script = "cat /sys/fs/cgroup/%s 2>/dev/null || cat /sys/fs/cgroup/%s" % (v2, v1)
    return box.ok("pi-exec sh -c '%s'" % script, env=env).stdout.split()


def test_resource_limits_are_visible_inside(box):
    env = {"PI_AGENT_MEMORY": "256m", "PI_AGENT_PIDS": "123", "PI_AGENT_CPUS": "0.5"}
    assert cgroup_value(box, "memory/memory.limit_in_bytes", "memory.max", env) == ["268435456"]
    assert cgroup_value(box, "pids/pids.max", "pids.max", env) == ["123"]
    quota = cgroup_value(box, "cpu/cpu.cfs_quota_us", "cpu.max", env)
    assert quota[0] == "50000"


# Forks until it has `n` children (each waiting for the pipe to close) or
# fails; then lets them go.
FORKS = """import os, sys
r, w = os.pipe()
made = failed = 0
for _ in range(int(sys.argv[1])):
    try:
        pid = os.fork()
    except OSError:
        failed += 1
        continue
    if pid == 0:
        os.close(w)
        os.read(r, 1)
        os._exit(0)
    made += 1
os.close(w)
for _ in range(made):
    os.wait()
print(made, failed)
"""


def test_processes_and_memory_are_limited_by_default(any_box):
    box = any_box
    pids = cgroup_value(box, "pids/pids.max", "pids.max", {})
    assert 0 < int(pids[0]) <= 4096
    memory = cgroup_value(box, "memory/memory.limit_in_bytes", "memory.max", {})
    assert int(memory[0]) < os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    assert cgroup_value(box, "pids/pids.max", "pids.max", {"PI_AGENT_PIDS": "none"}) == ["max"]
    # A fork bomb's forks fail inside; the run ends as usual.
    with open(os.path.join(box.project, "forks.py"), "w") as script:
        script.write(FORKS)
    made, failed = box.ok("pi-exec python3 forks.py 200", env={"PI_AGENT_PIDS": "64"}
                          ).stdout.split()
    assert 0 < int(made) < 64 and int(made) + int(failed) == 200


@pytest.mark.parametrize("name,value", [("PI_AGENT_MEMORY", "lots"), ("PI_AGENT_CPUS", "0"),
                                        ("PI_AGENT_PIDS", "-5"), ("PI_AGENT_NETWORK", "host")])
def test_bad_limits_are_refused_before_anything_starts(box, name, value):
    result = box.sh("pi-exec true", env={name: value})
    assert result.returncode == 9 and name in result.stderr
    assert result.stderr.count("\n") == 1
    assert box.containers() == [] and "current" not in box.images()


def test_a_line_of_another_uid_is_refused_and_left_as_it_is(request, engine, install_dir):
    box = make_sandbox(request, install_dir, "user", "bash")
    # A line whose base was built for root, used by an ordinary user.
    labels = box.inspect(box.repo + ":base")["Config"]["Labels"]
    assert labels["pi-agent.uid"] == str(box.user.uid)
    root_base = subprocess.run(["docker", "build", "-q", "--label", "pi-agent.uid=0",
                                "-"], input="FROM %s\n" % (box.repo + ":base"),
                               capture_output=True, text=True, check=True).stdout.strip()
    docker("tag", root_base, box.repo + ":base")
    box.ok("git init -q .")
    result = box.sh("pi-exec git status --porcelain")
    assert result.returncode == 3 and result.stderr.count("\n") == 1, result.stderr
    assert "made for UID 0, and you are UID %d" % box.user.uid in result.stderr
    assert "PI_AGENT_IMAGE_REPO=" in result.stderr
    assert box.images() == {"base": root_base[7:19]}, "nothing tagged, nothing run"
    assert box.containers() == []


def test_the_dockerfile_gives_way_to_a_user_that_has_the_uid(engine, install_dir):
    """Like Ubuntu 24.04's "ubuntu" (UID 1000): a base with a user (and group)
    at the host's UID still gets an agent user with that UID."""
    from images import base_image, test_home
    tools = base_image(0, 0, test_home(0), install_dir)  # has the packages already
    occupied = subprocess.run(
        ["docker", "build", "-q", "-"], capture_output=True, text=True, check=True,
        input="FROM %s\nUSER root\nRUN useradd -m -u 4321 -U ubuntu\n" % tools).stdout.strip()
    built = subprocess.run(
        ["docker", "build", "-q", "--build-arg", "BASE_IMAGE=" + occupied,
         "--build-arg", "AGENT_UID=4321", "--build-arg", "AGENT_GID=4321",
         "--build-arg", "AGENT_HOME=/home/someone",
         "--build-arg", "NODE_FROM=distro",  # (the tools' Node is new enough: no download)
         install_dir],
        capture_output=True, text=True)
    assert built.returncode == 0, built.stderr[-2000:]
    image = built.stdout.strip()
    try:
        out = docker("run", "--rm", image, "sh", "-c", "id; echo $HOME; sudo -n true && echo sudo")
        assert "uid=4321(agent) gid=4321(agent)" in out.stdout
        assert "/home/someone" in out.stdout and "sudo" in out.stdout
    finally:
        docker("rmi", image, occupied, check=False)
