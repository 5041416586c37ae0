"""make bench: pi-agent against the engine's floor, side by side, on the real
engine. Prints a table: measure, ours, reference, ratio, goal, pass/fail.

The floor is the least any snapshot-and-commit wrapper must do per run:
`docker tag` + `docker run` + `docker commit` + `docker rm`, same image, same
change, with the engine's own command (PI_AGENT_TEST_ENGINE picks another
engine than the host's Docker, see images.py: make bench-engines measures
the prompt on each; a rootless engine's bench runs as its user). Every
figure is a median over alternating runs.

    python3 tests/bench.py [--quick] [--only NAME[,NAME]]

NAMES: source, imports, prompt, five, egress, repo, scale10k, scale100k, scale300k, scale1m (the
full bench only), parallel, log, record, sweep, big, snapshots, flatten, disk, soak
(all by default; the soak alone makes 1000 runs, about 15 minutes here).
"""

import argparse
import fcntl
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
import images  # noqa: E402

ENGINE = images.ENGINE


def sh(*argv, **kwargs):
    """`argv`; "docker" as its first word is the engine under test's command."""
    if argv[0] == "docker":
        return ENGINE.run(*argv[1:], **kwargs)
    return subprocess.run(argv, check=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, **kwargs)


class Line:
    """A scratch image line with the tool installed, and a project."""

    def __init__(self):
        self.repo = "pi-agent-bench/" + uuid.uuid4().hex[:8]
        self.work = tempfile.mkdtemp(prefix="pi-agent-bench-")
        self.home = images.test_home(os.getuid())
        os.makedirs(self.home, exist_ok=True)
        self.project = os.path.join(self.work, "project")
        os.makedirs(self.project)
        self.state = os.path.join(self.work, "state")
        base = images.base_image(os.getuid(), os.getgid(), self.home)
        sh("docker", "tag", base, self.repo + ":base")
        python = shutil.which("python3")
        self.env = {"HOME": self.home, "PATH": os.environ["PATH"], "LANG": "C.UTF-8",
                    "PI_AGENT_IMAGE_REPO": self.repo, "PI_AGENT_STATE_DIR": self.state,
                    "PI_AGENT_PYTHON": python}
        self.env.update(ENGINE.env)
        if "PI_AGENT_RECORD_CHANGES" in os.environ:  # (to measure a lifecycle without it)
            self.env["PI_AGENT_RECORD_CHANGES"] = os.environ["PI_AGENT_RECORD_CHANGES"]
        self.source = ". %s/shell/pi.sh\n" % ROOT
        self.shell = None  # (see timed)

    def script(self, body):
        """A bash that sourced pi.sh once; returns (process) ready to take lines."""
        return ["bash", "--norc", "-c", self.source + body]

    def wait_saved(self):
        """Until the save is done and its container removed: the lock is
        free, and the run directory, which goes once the container has gone,
        is gone (asking the engine instead would cost more than the wait)."""
        key = self.repo.replace("/", "%2F")
        locks = [name for name in os.listdir(self.state) if name.startswith(key)
                 and name.endswith(".lock")] if os.path.isdir(self.state) else []
        for lock in locks:  # (every profile's)
            fd = os.open(os.path.join(self.state, lock), os.O_RDONLY)
            fcntl.flock(fd, fcntl.LOCK_SH)
            os.close(fd)
        runs = os.path.join(self.state, "run")
        while os.path.isdir(runs) and os.listdir(runs):
            time.sleep(0.002)

    def timed(self, body, cwd=None):
        """Seconds `body` takes in a user's shell: one that sourced pi.sh
        and ran a pi-agent command already (so its functions know where the
        interpreter is, as in any shell after its first pi), with this
        line's settings; its output is dropped, its failure raises."""
        if self.shell is None:
            self.shell = subprocess.Popen(["bash", "--norc", "-s"], stdin=subprocess.PIPE,
                                          stdout=subprocess.PIPE, env=self.env, text=True,
                                          cwd=self.project)
            self.shell.stdin.write(self.source + "pi --version >/dev/null </dev/null\n")
        settings = "".join("export %s=%s; " % (name, shlex_quote(value))
                           for name, value in self.env.items())
        self.shell.stdin.write("%scd %s && { %s; } >/dev/null 2>&1 </dev/null; "
                               "echo __bench_done $?\n" % (settings, shlex_quote(
                                   cwd or self.project), body))
        start = time.perf_counter()
        self.shell.stdin.flush()
        answer = self.shell.stdout.readline()
        took = time.perf_counter() - start
        assert answer == "__bench_done 0\n", (body, answer)
        return took

    def floor(self, command, count=1, mount=False):
        """tag + run + commit + rm, `count` times, on this line's current image
        (with the project mounted, read-write, .git and all: a wrapper with no
        gate)."""
        start = time.perf_counter()
        volume = ["--mount", "type=bind,source=%s,target=%s" % (self.project, self.project),
                  "-w", self.project] if mount else []
        tag = "%s:floor-%s" % (self.repo, uuid.uuid4().hex[:8])  # (floors may run at once)
        for i in range(count):
            name = "pi-agent-bench-floor-%s" % uuid.uuid4().hex[:8]
            sh("docker", "tag", self.repo + ":current", "%s-%d" % (tag, i))
            # (an identity for git, as pi-agent's run script gives each run)
            sh("docker", "run", "--name", name, *volume, "-e", "EMAIL=floor@bench.invalid",
               "-e", "GIT_AUTHOR_NAME=floor", "-e", "GIT_COMMITTER_NAME=floor",
               self.repo + ":current", "sh", "-c", command)
            sh("docker", "commit", name, tag + "-result")
            sh("docker", "rm", name)
        took = time.perf_counter() - start
        # Untimed: the floor's images go, or the engine slows as they pile up.
        sh("docker", "rmi", tag + "-result", *["%s-%d" % (tag, i) for i in range(count)])
        return took

    def close(self):
        if self.shell is not None:
            self.shell.stdin.close()
            self.shell.wait()
        self.wait_saved()
        ids = sh("docker", "ps", "-aq", "--filter", "label=pi-agent.repo=" + self.repo).stdout.split()
        if ids:
            ENGINE.run("rm", "-f", *ids, check=False)
        refs = ["%s:%s" % (self.repo, row.split()[1]) for row in sh(
            "docker", "image", "ls", self.repo, "--format", "{{.Repository}} {{.Tag}}"
        ).stdout.splitlines() if row.split()[0].split("localhost/")[-1] == self.repo]
        if refs:
            ENGINE.run("rmi", "-f", *refs, check=False)
        shutil.rmtree(self.work, ignore_errors=True)


ROWS = []


def row(measure, ours, reference, goal, unit="s"):
    ratio = ours / reference if reference else float("inf")
    ROWS.append((measure, "%.3f %s" % (ours, unit), "%.3f %s" % (reference, unit),
                 "%.2f" % ratio, "<= %.2f" % goal, "pass" if ratio <= goal else "FAIL"))
    print("# " + " | ".join(ROWS[-1]), file=sys.stderr, flush=True)  # as it comes


def prompt_pairs(line, pairs, title, names=("stamp", "floor"), mount=False, goal=1.0):
    """Prompt back after a small changing run vs the floor script, taking
    turns, after one run to warm up; each run makes a new file, `names`%d."""
    line.timed("pi-exec touch ~/warm")
    ours, floor = [], []
    for i in range(pairs):
        line.wait_saved()
        ours.append(line.timed("pi-exec touch ~/%s%d" % (names[0], i)))
        line.wait_saved()
        floor.append(line.floor("touch ~/%s%d" % (names[1], i), mount=mount))
    row("%s (median of %d)" % (title, pairs), statistics.median(ours),
        statistics.median(floor), goal)


def bench_prompt(line, pairs):
    """Goal 1: prompt back after a small changing run vs the floor script."""
    prompt_pairs(line, pairs, "prompt back, small change", goal=0.9)


def bench_five(line, rounds):
    """Goal 2: five back-to-back changing runs, last save included."""
    ours, floor = [], []
    body = " && ".join("pi-exec touch ~/five%d" % i for i in range(5))
    for _ in range(rounds):
        line.wait_saved()
        start = time.perf_counter()
        line.timed(body)
        line.wait_saved()
        ours.append(time.perf_counter() - start)
        floor.append(line.floor("touch ~/ffive", count=5))
    row("5 back-to-back runs, saves included (median of %d)" % rounds,
        statistics.median(ours), statistics.median(floor), 1.15)


def bench_egress(line, rounds):
    """Issue 27: the default policy (its proxy up, as after any first run)
    against open on the prompt; and a 10 MB download through the egress
    proxy against the same download from a container on the server's own
    network (curl's own time, medians)."""
    line.timed("pi-exec true")  # (the proxy, started)
    ours, opened = [], []
    for i in range(rounds * 3):
        line.wait_saved()
        ours.append(line.timed("pi-exec touch ~/public%d" % i))
        line.wait_saved()
        opened.append(line.timed("pi-exec --egress open touch ~/open%d" % i))
    row("prompt back, small change, public vs open (median of %d)" % len(ours),
        statistics.median(ours), statistics.median(opened), 1.05)
    net, server = "pi-agent-bench-net-" + line.repo[-8:], "pi-agent-bench-web-" + line.repo[-8:]
    sh("docker", "network", "create", "--subnet", "198.51.100.64/26", net)
    try:
        sh("docker", "run", "-d", "--rm", "--name", server, "--network", net, "-u", "0",
           "--entrypoint", "sh", line.repo + ":base", "-c", "head -c 10000000 /dev/urandom > "
           "/tmp/10m && cd /tmp && exec python3 -m http.server 80")
        up = "import socket; socket.create_connection(('127.0.0.1', 80))"
        address = sh("docker", "inspect", "--format", "{{range .NetworkSettings.Networks}}"
                     "{{.IPAddress}}{{end}}", server).stdout.strip()
        env = dict(os.environ, **line.env)

        def inside(command):
            return subprocess.run(["bash", "--norc", "-c", line.source + "pi-exec sh -c \"%s\""
                                   % command], cwd=line.project, env=env, check=True,
                                  capture_output=True, text=True).stdout
        # (the proxy of this policy now: the network gave the host an address)
        proxy = inside("echo \\$HTTP_PROXY").strip()[len("http://"):].split(":")[0]
        sh("docker", "network", "connect", net, proxy)
        loop = ("for i in $(seq %d); do curl -fsS -o /dev/null -w '%%{time_total} ' "
                "http://%s/10m; done" % (rounds * 5, address))
        sh("docker", "exec", server, "sh", "-c", "until python3 -c \"%s\" 2>/dev/null; do "
           "sleep 0.1; done" % up)
        through = inside(loop).split()
        direct = sh("docker", "run", "--rm", "--network", net, "--entrypoint", "sh",
                    line.repo + ":base", "-c", loop).stdout.split()
        row("a 10 MB download through the egress proxy vs direct (median of %d)" % len(direct),
            statistics.median(map(float, through)), statistics.median(map(float, direct)), 1.1)
        sh("docker", "network", "disconnect", net, proxy)
    finally:
        subprocess.run(["docker", "rm", "-f", server], capture_output=True)
        subprocess.run(["docker", "network", "rm", net], capture_output=True)


def make_tree(path, files):
    """`files` small files in directories of 100."""
    for i in range(files):
        directory = os.path.join(path, "d%03d" % (i // 100))
        if i % 100 == 0:
            os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, "f%d.txt" % i), "w") as handle:
            handle.write("%d\n" % i)


def bench_repo(line, pairs):
    """Issue 11: in a repository of 10,000 files the git gate costs the
    user nothing at the prompt, and a run that commits little more."""
    make_tree(line.project, 10000)
    git = ["git", "-C", line.project, "-c", "user.name=b", "-c", "user.email=b@b"]
    sh(*git[:3], "init", "-q")
    sh(*git, "add", "-A")
    sh(*git, "commit", "-qm", "tree")
    prompt_pairs(line, pairs, "prompt back, 10,000-file repository, no commit", ("r", "f"),
                 mount=True)
    # As an agent does: it commits, and writes its own session in its home.
    commit = "echo %d >> d000/f0.txt && git commit -qam %s%d && echo %d >> ~/session"
    ours, floor = [], []
    for i in range(pairs):
        line.wait_saved()
        start = time.perf_counter()
        line.timed("pi-exec sh -c '%s'" % (commit % (i, "ours", i, i)))
        line.wait_saved()
        ours.append(time.perf_counter() - start)
        floor.append(line.floor(commit % (i, "floor", i, i), mount=True))
    row("a run making one commit there, save included (median of %d)" % pairs,
        statistics.median(ours), statistics.median(floor), 1.2)


def bench_scale(line, files, pairs):
    """Issue 29: in a repository of `files` files (250 a directory), a run
    that changes nothing and one that commits a one-line change, each
    against the same command in a bare `docker run --rm` with the project
    (and its .git) mounted: what the git gate and the looks at the project
    cost grows with what changed, not with the repository."""
    for i in range(files):
        directory = os.path.join(line.project, "d%04d" % (i // 250))
        if i % 250 == 0:
            os.makedirs(directory)
        with open(os.path.join(directory, "f%d.txt" % i), "w") as handle:
            handle.write("%d\n" % i)
    git = ["git", "-C", line.project, "-c", "user.name=b", "-c", "user.email=b@b"]
    sh(*git[:3], "init", "-q")
    sh(*git, "add", "-A")
    sh(*git, "commit", "-qm", "tree")
    bare = ["docker", "run", "--rm", "--mount", "type=bind,source=%s,target=%s" % (
        line.project, line.project), "-w", line.project, "-e", "EMAIL=bare@bench.invalid",
        "-e", "GIT_AUTHOR_NAME=bare", "-e", "GIT_COMMITTER_NAME=bare", line.repo + ":current",
        "sh", "-c"]
    commit = "echo %s >> d0000/f0.txt && git commit -qam %s"
    line.timed("pi-exec true")
    for title, ours_command, bare_command, goal in (
            ("a run that changes nothing", lambda i: "true", lambda i: "true", 1.1),
            ("a run committing a one-line change", lambda i: commit % (i, "ours%d" % i),
             lambda i: commit % (i, "bare%d" % i), 1.2)):
        ours, theirs = [], []
        for i in range(pairs):
            line.wait_saved()
            ours.append(line.timed("pi-exec sh -c %s" % shlex_quote(ours_command(i))))
            line.wait_saved()
            start = time.perf_counter()
            sh(*bare, bare_command(i))
            theirs.append(time.perf_counter() - start)
        row("%s, %d-file repository, vs a bare docker run (median of %d)"
            % (title, files, pairs), statistics.median(ours), statistics.median(theirs), goal)


def bench_parallel(line, rounds):
    """Issue 15: runs of two profiles at once, each against the same run
    alone; pi-branch on a big current against a small one; a session
    joining a running run against a bare docker exec."""
    other = os.path.join(line.work, "other")
    os.makedirs(other)
    line.timed("pi-exec touch ~/warm && pi-branch a && pi-branch b")
    line.timed("pi-exec --profile a touch ~/warm")
    line.timed("pi-exec --profile b touch ~/warm", cwd=other)
    alone, together = [], []
    for i in range(rounds):
        line.wait_saved()
        alone.append(line.timed("pi-exec --profile a touch ~/alone%d" % i))
        line.wait_saved()
        start = time.perf_counter()
        runs = [subprocess.Popen(line.script("pi-exec --profile %s touch ~/both%d" % (name, i)),
                                 cwd=cwd, env=line.env, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL)
                for name, cwd in (("a", line.project), ("b", other))]
        for run in runs:
            run.wait()
            together.append(time.perf_counter() - start)
    row("two profiles at once: each run's prompt back vs alone (median of %d)" % rounds,
        statistics.median(together), statistics.median(alone), 1.3)
    # The engine's own share: two floors at once against one alone.
    import threading
    alone, together = [], []
    for i in range(rounds):
        line.wait_saved()
        start = time.perf_counter()
        line.floor("touch ~/floor-alone%d" % i)
        alone.append(time.perf_counter() - start)
        start = time.perf_counter()
        floors = [threading.Thread(target=lambda: (line.floor("touch ~/floor-both"),
                                                   together.append(time.perf_counter() - start)))
                  for _ in range(2)]
        for floor in floors:
            floor.start()
        for floor in floors:
            floor.join()
    ROWS.append(("the floor, two at once vs alone (median of %d): the engine's share" % rounds,
                 "%.3f s" % statistics.median(together), "%.3f s" % statistics.median(alone),
                 "%.2f" % (statistics.median(together) / statistics.median(alone)), "-", "-"))
    print("# " + " | ".join(ROWS[-1]), file=sys.stderr, flush=True)

    # Taking turns: from profile a's small current, and from a current 1 GB bigger.
    line.timed("pi-exec sh -c 'head -c 1000000000 /dev/zero > ~/big'")
    line.wait_saved()
    small, big = [], []
    for i in range(rounds):
        small.append(line.timed("pi-branch --profile a small%d" % i))
        big.append(line.timed("pi-branch big%d" % i))
    row("pi-branch of current + 1 GB vs of current (median of %d)" % rounds,
        statistics.median(big), statistics.median(small), 1.15)

    line.wait_saved()
    ready, go = (os.path.join(line.project, name) for name in ("ready", "go"))
    holder = subprocess.Popen(line.script("pi-exec sh -c 'touch ready; "
                                          "while [ ! -e go ]; do sleep 0.1; done'"),
                              cwd=line.project, env=line.env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    while not os.path.exists(ready):
        time.sleep(0.05)
    container = sh("docker", "ps", "-q", "--filter",
                   "label=pi-agent.repo=" + line.repo).stdout.split()[0]
    # In one shell, as a user types them (pi.sh has looked its python up).
    loop = ("_pi_agent --version; for i in $(seq %d); do t0=$EPOCHREALTIME; "
            "PI_AGENT_COMMAND=true pi 2>/dev/null; t1=$EPOCHREALTIME; docker exec -i %s true; "
            "t2=$EPOCHREALTIME; echo \"$t0 $t1 $t2\"; done" % (rounds, container))
    times = subprocess.run(line.script(loop), cwd=line.project, env=line.env, check=True,
                           stdout=subprocess.PIPE, text=True).stdout.splitlines()[1:]
    stamps = [[float(value) for value in entry.split()] for entry in times]
    row("joining a running run (pi) vs a bare docker exec (median of %d)" % rounds,
        statistics.median(t1 - t0 for t0, t1, _t2 in stamps),
        statistics.median(t2 - t1 for _t0, t1, t2 in stamps), 1.2)
    open(go, "w").close()  # the holding run ends
    holder.wait(timeout=120)
    os.remove(ready)
    os.remove(go)


def bench_log(line, rounds):
    """Issue 16: pi-log over 10,000 records against over 10 (it reads the
    newest from the end of the file)."""
    line.timed("pi-exec touch ~/logged")
    line.wait_saved()
    path = os.path.join(line.state, line.repo.replace("/", "%2F") + ".sessions.jsonl")
    with open(path, "rb") as handle:
        record = handle.read().splitlines()[-1] + b"\n"
    files = {}
    for count in (10, 10000):
        files[count] = path + ".%d" % count
        with open(files[count], "wb") as handle:
            handle.write(record * count)
    times = {10: [], 10000: []}
    for _ in range(rounds):
        for count in (10, 10000):
            shutil.copy(files[count], path)
            times[count].append(line.timed("pi-log"))
    row("pi-log over 10,000 records vs over 10 (median of %d)" % rounds,
        statistics.median(times[10000]), statistics.median(times[10]), 1.2)


def bench_record(line, rounds):
    """Issue 24: what a run changed is read from its layer when asked: pi-diff
    of the last run (10,000 files written) on the test image, the first ask
    (one container lists the layer) against 1 s, and the next (its record)
    against 0.2 s. Then the layer's listing against the engine's own diff of
    the container (which compares the whole image)."""
    make = ("mkdir -p ~/tree$1 && cd ~/tree$1 && for d in $(seq 100); do mkdir d$d; "
            "for f in $(seq 100); do echo $f > d$d/f$f; done; done")
    first, again = [], []
    for i in range(rounds):
        line.wait_saved()
        line.timed("pi-exec sh -c '%s' - %d" % (make, i))
        line.wait_saved()
        first.append(line.timed("pi-diff"))
        again.append(line.timed("pi-diff"))
        # Untimed: back to the state before the run, so that every run
        # starts from an image of the same size.
        before = json.loads(subprocess.run(
            line.script("pi-log -n 1 --json"), cwd=line.project, env=line.env,
            check=True, stdout=subprocess.PIPE).stdout)[0]["snapshot"]
        line.timed("pi-rollback %s" % before)
        line.timed("pi-prune 1")
    row("pi-diff of the last run (10,000 files), the first ask, against 1 s (median of %d)"
        % rounds, statistics.median(first), 1.0, 1.0)
    row("the next ask, from its record, against 0.2 s", statistics.median(again), 0.2, 1.0)
    sys.path.insert(0, ROOT)
    import pi_agent
    os.environ.update(line.env)
    pi_line = pi_agent.Line(pi_agent.Config())
    name = "pi-agent-bench-diff-" + uuid.uuid4().hex[:8]
    sh("docker", "run", "--name", name, line.repo + ":current", "sh", "-c", make, "-", "x")
    image = sh("docker", "commit", name).stdout.strip()
    listings, diffs = [], []
    for _ in range(5):
        start = time.perf_counter()
        listed = pi_agent.list_layer(pi_line, pi_agent.inspect_image(image))[0]
        listings.append(time.perf_counter() - start)
        start = time.perf_counter()
        diffed = sh("docker", "diff", name).stdout
        diffs.append(time.perf_counter() - start)
    assert len(listed) == len(pi_agent.parse_diff(diffed)), "the two must say the same"
    sh("docker", "rm", name)
    sh("docker", "rmi", image)
    row("the layer's listing vs docker diff of the container (median of 5)",
        statistics.median(listings), statistics.median(diffs), 1.0)


def bench_sweep(line, sizes):
    """Issue 11: the look at the project before each run, and the full look
    after one when the watch is in doubt, each against one plain `find`
    that stats every file, on trees of these sizes."""
    sys.path.insert(0, ROOT)
    import pi_agent
    for files in sizes:
        tree = os.path.join(line.work, "tree%d" % files)
        make_tree(tree, files)
        before, after, plain = [], [], []
        for _ in range(5):
            start = time.perf_counter()
            pi_agent.ProjectScan(tree, pi_agent.SCAN_BEFORE, True).results()
            before.append(time.perf_counter() - start)
            start = time.perf_counter()
            pi_agent.ProjectScan(tree, pi_agent.scan_after(os.getuid()), True).results()
            after.append(time.perf_counter() - start)
            start = time.perf_counter()
            sh("find", tree, "-xdev", "-perm", "-4000")
            plain.append(time.perf_counter() - start)
        # (1.5: since issue 30 it stats every plain file too, for its links)
        row("look before a run, %d files, vs one find (median of 5)" % files,
            statistics.median(before), statistics.median(plain), 1.5)
        row("full look after one, %d files, vs one find (median of 5)" % files,
            statistics.median(after), statistics.median(plain), 2.0)


def bench_source(line, count):
    """Goal 5: sourcing shell/pi.sh, against sourcing an empty file."""
    empty = os.path.join(line.work, "empty.sh")
    open(empty, "w").close()
    body = "for i in $(seq %d); do . %s; done" % (count, "%s")
    ours = line.timed(body % os.path.join(ROOT, "shell", "pi.sh")) / count
    none = line.timed(body % empty) / count
    ROWS.append(("sourcing shell/pi.sh (per source)", "%.2f ms" % (ours * 1000),
                 "%.2f ms empty" % (none * 1000), "-", "< 5 ms",
                 "pass" if ours < 0.005 else "FAIL"))


def bench_big(line, sizes, rounds):
    """Goal 3: prompt back after a run writing a lot, vs a plain docker run."""
    for size in sizes:
        write = "head -c %d /dev/zero > ~/big" % size
        ours, plain = [], []
        for _ in range(rounds):
            line.wait_saved()
            ours.append(line.timed("pi-exec sh -c %s" % shlex_quote(write)))
            line.wait_saved()
            start = time.perf_counter()
            sh("docker", "run", "--rm", line.repo + ":current", "sh", "-c", write)
            plain.append(time.perf_counter() - start)
        row("prompt back after writing %s (median of %d)" % (human(size), rounds),
            statistics.median(ours), statistics.median(plain), 1.3)


def shlex_quote(text):
    import shlex
    return shlex.quote(text)


def human(size):
    return "%d MB" % (size // 1000000) if size < 1e9 else "%.0f GB" % (size / 1e9)


def run_cost(line, count):
    """Median full cost (save included) of small changing runs."""
    times = []
    for i in range(count):
        line.wait_saved()
        start = time.perf_counter()
        subprocess.run(line.script("pi-exec touch ~/cost%d" % i), cwd=line.project, env=line.env,
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        line.wait_saved()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_snapshots(line, count):
    """Goal 4: a run costs the same with 10 or 500 snapshots. Two lines of
    the same image, one with 500 snapshots, take turns: the noise of this
    machine and the drift of a deepening image fall on both alike."""
    many_line = Line()
    try:
        for each in (line, many_line):
            each.env["PI_AGENT_SNAPSHOT_KEEP"] = "1000"
            run_cost(each, 2)
        current = many_line.repo + ":current"
        for i in range(490):
            sh("docker", "tag", current, "%s:snap-20000101-000000.%03d" % (many_line.repo, i))
        many_line.timed("pi-prune 1000")  # the state learns the snapshots
        few, many = [], []
        for _ in range(count):
            few.append(run_cost(line, 1))
            many.append(run_cost(many_line, 1))
        row("run with 500 snapshots vs with 10 (median of %d, taking turns)" % count,
            statistics.median(many), statistics.median(few), 1.05)
    finally:
        many_line.close()
    del line.env["PI_AGENT_SNAPSHOT_KEEP"]


def bench_imports():
    """Goal 5: what pi_agent.py imports at start-up, and how long that takes."""
    out = subprocess.run([sys.executable, "-I", "-S", "-X", "importtime", "-c",
                          "import sys; sys.path.insert(0, %r); import pi_agent" % ROOT],
                         capture_output=True, text=True).stderr
    total = 0
    for entry in out.splitlines():
        parts = entry.split("|")
        if len(parts) == 3 and parts[2].strip() == "pi_agent":
            total = int(parts[1])
    bare = subprocess.run([sys.executable, "-I", "-S", "-X", "importtime", "-c", "pass"],
                          capture_output=True, text=True)
    ROWS.append(("import pi_agent (python3 -X importtime, cumulative)",
                 "%.1f ms" % (total / 1000), "-", "-", "stdlib only",
                 "pass" if bare.returncode == 0 else "FAIL"))


def bench_flatten(line, rounds):
    """Issue 5: pi-flatten vs a bare docker export | docker import."""
    line.timed("pi-exec touch ~/layer")
    ours, bare = [], []
    for _ in range(rounds):
        line.wait_saved()
        line.timed("pi-exec touch ~/again")  # a layer to flatten
        line.wait_saved()
        ours.append(line.timed("pi-flatten"))
        start = time.perf_counter()
        holder = sh("docker", "create", line.repo + ":current", "x").stdout.strip()
        subprocess.run("docker export %s | docker import - >/dev/null" % holder, shell=True,
                       check=True)
        bare.append(time.perf_counter() - start)
        sh("docker", "rm", holder)
    image = json.loads(sh("docker", "image", "inspect", line.repo + ":current").stdout)[0]
    row("pi-flatten of %s vs export|import (median of %d)" % (human(image["Size"]), rounds),
        statistics.median(ours), statistics.median(bare), 1.10)
    subprocess.run("docker image prune -f >/dev/null", shell=True)


def reach(refs, info):
    """Image IDs reachable from refs through their parents (engine figures)."""
    seen, frontier = set(), list(refs)
    while frontier:
        images = json.loads(sh("docker", "image", "inspect", *frontier).stdout)
        for image in images:
            info[image["Id"]] = image
        ids = [image["Id"] for image in images if image["Id"] not in seen]
        seen.update(ids)
        frontier = [info[i]["Parent"] for i in ids if info[i].get("Parent")]
    return seen


def own_bytes(ids, info):
    """The bytes of these images' own layers (size less the parent's)."""
    total = 0
    for image_id in ids:
        parent = info[image_id].get("Parent")
        total += info[image_id]["Size"] - (info[parent]["Size"] if parent in info else 0)
    return total


def line_figures(line):
    """(disk the environment holds beyond REPO:base, live size of current,
    bytes only the snapshots hold), all from the engine's image sizes."""
    info = {}
    tags = sh("docker", "image", "ls", line.repo, "--format", "{{.Repository}} {{.Tag}}").stdout
    tags = [tag for name, tag in (row.split() for row in tags.splitlines())
            if name.split("localhost/")[-1] == line.repo]
    refs = ["%s:%s" % (line.repo, tag) for tag in tags]
    snaps = [ref for ref in refs if ref.split(":")[1].startswith("snap-")]
    base = reach([line.repo + ":base"], info)
    current = reach([line.repo + ":current"], info)
    everything = reach(refs, info)
    disk = own_bytes(everything - base, info)
    only_snapshots = own_bytes(reach(snaps, info) - current - base, info) if snaps else 0
    live = info[json.loads(sh("docker", "image", "inspect", line.repo + ":current").stdout)[0]
                ["Id"]]["Size"]
    return disk, live, only_snapshots


def bench_disk(line, runs):
    """Issue 5: runs rewriting one 50 MB file; the disk the line uses."""
    for i in range(runs):
        line.wait_saved()
        line.timed("pi-exec sh -c 'head -c 50000000 /dev/urandom > ~/blob'")
    line.wait_saved()
    disk, live, only_snapshots = line_figures(line)
    row("%d runs x 50 MB: disk vs 2 x live + snapshots' own" % runs, disk / 1e6,
        (2 * live + only_snapshots) / 1e6, 1.0, unit="MB")
    line.timed("pi-prune 0")
    line.timed("pi-flatten")
    line.timed("pi-prune 0")
    disk, live, only_snapshots = line_figures(line)
    row("after pi-prune 0 + pi-flatten: disk vs live", disk / 1e6, live / 1e6, 1.10, unit="MB")


def bench_soak(line, runs):
    """Issue 5: 1000 changing runs with the default threshold."""
    times, most_layers = [], 0
    for i in range(runs):
        line.wait_saved()
        start = time.perf_counter()
        result = subprocess.run(line.script("pi-exec touch ~/soak"), cwd=line.project,
                                env=line.env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True)
        line.wait_saved()
        times.append(time.perf_counter() - start)
        if result.returncode != 0:
            raise SystemExit("soak run %d failed: %s" % (i + 1, result.stderr))
        layers = len(json.loads(sh("docker", "image", "inspect", line.repo + ":current").stdout)
                     [0]["RootFS"]["Layers"])
        most_layers = max(most_layers, layers)
    early = statistics.median(times[5:15])
    late = statistics.median(times[-10:])
    row("%d runs: time per run at the end vs run 10" % runs, late, early, 1.10)
    ROWS.append(("%d runs: most layers seen (threshold 100)" % runs, str(most_layers), "100",
                 "-", "<= 100", "pass" if most_layers <= 100 else "FAIL"))


def main():
    if ENGINE.owner and os.getuid() == 0:  # (a rootless engine's bench is its user's)
        import pwd
        entry = pwd.getpwnam(ENGINE.owner)
        os.execvp("runuser", ["runuser", "-u", ENGINE.owner, "--", "env", "HOME=" + entry.pw_dir,
                              "PATH=" + os.environ["PATH"], "PI_AGENT_TEST_ENGINE=" + ENGINE.name,
                              "PI_AGENT_TEST_SLOT=" + os.environ.get("PI_AGENT_TEST_SLOT", ""),
                              "/usr/bin/python3" if os.path.exists("/usr/bin/python3")
                              else sys.executable, *sys.argv])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    parser.add_argument("--only", default="", help="comma-separated names (see above)")
    args = parser.parse_args()
    only = set(filter(None, args.only.split(",")))
    quick = args.quick

    def wanted(name):
        return name in only if only else True

    # Each section on a line of its own: what one writes (a 1 GB file, say)
    # must not slow the next one down.
    sections = [
        ("source", lambda line: bench_source(line, 200)),
        ("imports", lambda line: bench_imports()),
        ("prompt", lambda line: bench_prompt(line, 4 if quick else 12)),
        ("five", lambda line: bench_five(line, 2 if quick else 5)),
        ("egress", lambda line: bench_egress(line, 2 if quick else 4)),
        ("repo", lambda line: bench_repo(line, 4 if quick else 12)),
        ("scale10k", lambda line: bench_scale(line, 10000, 4 if quick else 9)),
        ("scale100k", lambda line: bench_scale(line, 100000, 3 if quick else 7)),
        ("scale300k", lambda line: bench_scale(line, 300000, 3 if quick else 5)),
        ("scale1m", lambda line: None if quick else bench_scale(line, 1000000, 3)),
        ("parallel", lambda line: bench_parallel(line, 4 if quick else 10)),
        ("log", lambda line: bench_log(line, 5 if quick else 15)),
        ("record", lambda line: bench_record(line, 3 if quick else 9)),
        ("sweep", lambda line: bench_sweep(line, [10000, 100000])),
        ("big", lambda line: bench_big(line, [300000000] if quick else
                                       [300000000, 1000000000], 2 if quick else 3)),
        ("snapshots", lambda line: bench_snapshots(line, 5 if quick else 15)),
        ("flatten", lambda line: bench_flatten(line, 1 if quick else 3)),
        ("disk", lambda line: bench_disk(line, 20 if quick else 100)),
        ("soak", lambda line: bench_soak(line, 100 if quick else 1000)),
    ]
    for name, measure in sections:
        if wanted(name):
            line = Line()
            try:
                measure(line)
            finally:
                line.close()
                os.sync()  # what a section wrote (100,000 files, 1 GB) must not slow the next
                time.sleep(2)
    server = sh("docker", "version", "--format", "{{.Version}}" if ENGINE.command == "podman"
                else "{{.Server.Version}}").stdout.strip()
    print("machine: %s, %d cores, Linux %s, %s %s (%s), Python %s" % (
        platform.machine(), os.cpu_count(), platform.release(), ENGINE.command.capitalize(),
        server, ENGINE.name, platform.python_version()))
    header = ("measure", "ours", "reference", "ratio", "goal", "result")
    widths = [max(len(str(r[i])) for r in ROWS + [header]) for i in range(6)]
    for r in [header] + ROWS:
        print("| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |")
    return 0 if all(r[-1] == "pass" for r in ROWS) else 1


if __name__ == "__main__":
    sys.exit(main())
