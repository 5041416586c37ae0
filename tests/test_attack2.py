"""Attacks of a hostile agent against the issue-30 defences (hard links,
the save limit, the environment) and what is left of the issue-22 ones.

Each test plants its attack from inside a run, as the agent would, and
asserts the SAFE outcome: it fails while the attack works."""

import os
import subprocess
import time


from conftest import docker, wait_until  # noqa: F401
from test_containment import agent, host_git, marker  # noqa: F401

import pi_agent


# A path deeper than PATH_MAX on the host (the engine's own path to the
# layer adds ~90 characters to what the agent sees inside).
DEEP_DIR = """
mkdir -p /var/tmp/deep && cd /var/tmp/deep
i=0; while [ $i -lt 40 ]; do
  n=$(printf "%0100d" $i); mkdir $n && cd $n || break; i=$((i+1))
done
echo x > f
"""


def test_a_path_deeper_than_path_max_makes_the_size_unknown_and_the_save_unlimited(box):
    """`docker container inspect --size` walks the layer and gives up on
    the first error (ENAMETOOLONG on a path past PATH_MAX on the host):
    SizeRw is -1. save_cost takes a size that is not digits for "not
    known" and commits without any limit; the commit's own tar skips what
    it cannot stat, and writes the sparse file's holes out whole."""
    box.extra_env["PI_AGENT_SAVE_LIMIT"] = "100m"
    box.ok("pi-exec true")
    current = box.images()["current"]
    result = agent(box, "truncate -s 400M /var/tmp/big\n" + DEEP_DIR)
    assert result.returncode == 0, result.stderr
    box.wait_saved()
    size = box.inspect(box.repo + ":current")["Size"]
    assert box.images()["current"] == current, (
        "a 400 MB sparse file was committed past PI_AGENT_SAVE_LIMIT=100m: current is "
        "%d MB now" % (size >> 20))


def test_a_reader_that_stops_early_leaves_the_agent_at_work_after_the_sweep(box):
    """`pi-exec make test | head` (or `| less`, quit early): the docker
    client dies of the broken pipe, but the container goes on. Only a
    terminal's detach is checked (ensure_stopped); here the wrapper takes
    the client's exit for the container's, ends the run (the hand-back, the
    sweep) and gives the prompt back, while the agent is still at work in
    the project. The agent waits for its run record to go (the last step
    of end_run, visible under /dev/pi-agent), then plants a repository
    with an fsmonitor and a setuid-root shell, which no sweep sees."""
    box.init_repo()
    m = marker(box)
    script = """
        here=$(pwd)
        mkdir -p /var/tmp/m && cd /var/tmp/m
        for d in $(seq 1 300); do mkdir $d; (cd $d && seq 1 1000 | xargs touch); done
        cd "$here"
        (
          while [ -e /dev/pi-agent/run.json ]; do sleep 0.02; done
          git init -q sub && git -C sub config core.fsmonitor 'touch {m}; false'
          git -C sub commit -q --allow-empty -m x
          sudo cp /bin/sh rootsh && sudo chmod 4755 rootsh
        ) </dev/null >/dev/null 2>&1 &
        yes | head -c 3000000
        sleep 60
        """.format(m=m)
    result = box.sh("pi-exec sh -s | head -1", input=script, timeout=300)
    assert result.returncode == 0, result.stderr
    box.wait_saved()
    sub = os.path.join(box.project, "sub")
    problems = []
    if wait_until(lambda: os.path.exists(os.path.join(box.project, "rootsh")), timeout=5):
        info = os.lstat(os.path.join(box.project, "rootsh"))
        if info.st_uid == 0 and info.st_mode & 0o4000:
            problems.append("a setuid-root shell in the project after the run")
    if os.path.isdir(sub):
        host_git(box, "status", cwd=sub)
        if os.path.exists(m):
            problems.append("host git status ran the agent's fsmonitor")
    assert not problems, "%s\n%s" % (problems, result.stderr[-600:])


def layer_disk_usage(image_ref):
    """What the image's top layer takes on the engine's disk (du, bytes)."""
    upper = docker("image", "inspect", "--format", "{{.GraphDriver.Data.UpperDir}}",
                   image_ref).stdout.strip()
    out = subprocess.run(["du", "-s", "-B1", upper], text=True, stdout=subprocess.PIPE).stdout
    return int(out.split()[0])


def test_a_million_hard_links_inside_cost_every_later_run_the_hosts_memory(box):
    """Hard links cost the agent no data, only directory entries (ext4
    allows 65,000 names per file): a million names of 20 files inside the
    project. Every later run's look before it (SCAN_BEFORE: every file with
    more than one name) holds a (path, lstat) for each in pi-agent's own
    process, before the agent starts; the cached look is no help (its
    entries list passes 64 MB, so it is never read back)."""
    import threading
    box.init_repo()
    result = agent(box, """python3 - <<'PY'
import os
os.makedirs("l", exist_ok=True)
for f in range(20):
    open("l/src%d" % f, "w").close()
for d in range(1000):
    os.makedirs("l/%d" % d, exist_ok=True)
    for i in range(1000):
        os.link("l/src%d" % ((d * 1000 + i) // 50000), "l/%d/%d" % (d, i))
PY
""", timeout=900)
    assert result.returncode == 0, result.stderr
    box.wait_saved()
    stop, peaks = threading.Event(), {}
    watcher = threading.Thread(target=peak_rss_of_pi_agent, args=(stop, peaks))
    watcher.start()
    started = time.monotonic()
    try:
        refused = box.sh("pi-exec true", timeout=900)
    finally:
        stop.set()
        watcher.join()
    took = time.monotonic() - started
    peak = max(peaks.values() or [0]) // 1024
    assert refused.returncode == 3 and "hard links" in refused.stderr, refused.stderr
    # (bounded by what a look keeps, MAX_SCAN_ENTRIES, whatever the names' count)
    assert peak < 384, "pi-agent peaked at %d MB (%.0f s) before it refused" % (peak, took)


def peak_rss_of_pi_agent(stop, peaks):
    from test_attack import peak_rss_of_pi_agent as sample
    return sample(stop, peaks)


def test_a_token_in_a_real_locale_variable_is_not_a_locale_name():
    """LOCALE_VALUE allows any 64 characters of [A-Za-z0-9_.@+=,-]: a
    GitHub token, an AWS key ID or a JWT-less API key carried in LC_PAPER
    (sshd accepts every LC_* a client sends: the very reason given for the
    allow-list) reaches the agent as it is."""
    environ = {"LC_PAPER": "ghp_16C7e42F292c6912E7710c838347Ae178B4a",
               "LC_IDENTIFICATION": "AKIAIOSFODNN7EXAMPLE",
               "LC_TELEPHONE": "sk-proj-abcdefghijklmnopqrstuvwxyz0123456789ABCDEFGH"}
    passed = dict(pi_agent.container_env(environ, []))
    leaked = {name: passed[name] for name in environ if name in passed}
    assert not leaked, "these reach the agent: %s" % leaked
