"""make bench: pi-agent against the engine's floor, side by side, on the real
engine. Prints a table: measure, ours, reference, ratio, goal, pass/fail.

The floor is the least any snapshot-and-commit wrapper must do per run:
`docker tag` + `docker run` + `docker commit` + `docker rm`, same image, same
change. Every figure is a median over alternating runs.

    python3 tests/bench.py [--quick] [--only NAME[,NAME]]
"""

import argparse
import fcntl
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


def sh(*argv, **kwargs):
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
        self.source = ". %s/shell/pi.sh\n" % ROOT

    def script(self, body):
        """A bash that sourced pi.sh once; returns (process) ready to take lines."""
        return ["bash", "--norc", "-c", self.source + body]

    def wait_saved(self):
        """Until the save is done and its container removed (no running
        container is left: the removal happens after the lock)."""
        lock = os.path.join(self.state, self.repo.replace("/", "%2F") + ".lock")
        if os.path.exists(lock):
            fd = os.open(lock, os.O_RDONLY)
            fcntl.flock(fd, fcntl.LOCK_SH)
            os.close(fd)
        while sh("docker", "ps", "-aq", "--filter", "label=pi-agent.repo=" + self.repo).stdout:
            time.sleep(0.01)

    def timed(self, body):
        start = time.perf_counter()
        subprocess.run(self.script(body), cwd=self.project, env=self.env, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return time.perf_counter() - start

    def floor(self, command, count=1):
        """tag + run + commit + rm, `count` times, on this line's current image."""
        start = time.perf_counter()
        for i in range(count):
            name = "pi-agent-bench-floor-%s" % uuid.uuid4().hex[:8]
            sh("docker", "tag", self.repo + ":current", "%s:floor-%d" % (self.repo, i))
            sh("docker", "run", "--name", name, self.repo + ":current", "sh", "-c", command)
            sh("docker", "commit", name, self.repo + ":floor-result")
            sh("docker", "rm", name)
        return time.perf_counter() - start

    def close(self):
        self.wait_saved()
        ids = sh("docker", "ps", "-aq", "--filter", "label=pi-agent.repo=" + self.repo).stdout.split()
        if ids:
            subprocess.run(["docker", "rm", "-f", *ids], capture_output=True)
        refs = ["%s:%s" % (self.repo, tag) for tag in
                sh("docker", "image", "ls", self.repo, "--format", "{{.Tag}}").stdout.split()]
        if refs:
            subprocess.run(["docker", "rmi", "-f", *refs], capture_output=True)
        shutil.rmtree(self.work, ignore_errors=True)


ROWS = []


def row(measure, ours, reference, goal, unit="s"):
    ratio = ours / reference if reference else float("inf")
    ROWS.append((measure, "%.3f %s" % (ours, unit), "%.3f %s" % (reference, unit),
                 "%.2f" % ratio, "<= %.2f" % goal, "pass" if ratio <= goal else "FAIL"))


def bench_prompt(line, pairs):
    """Goal 1: prompt back after a small changing run vs the floor script."""
    line.timed("pi-exec touch ~/warm")
    ours, floor = [], []
    for i in range(pairs):
        line.wait_saved()
        ours.append(line.timed("pi-exec touch ~/stamp%d" % i))
        line.wait_saved()
        floor.append(line.floor("touch ~/floor%d" % i))
    row("prompt back, small change (median of %d)" % pairs, statistics.median(ours),
        statistics.median(floor), 1.0)


def bench_five(line, rounds):
    """Goal 2: five back-to-back changing runs, last save included."""
    ours, floor = [], []
    body = "".join("pi-exec touch ~/five%d\n" % i for i in range(5))
    for _ in range(rounds):
        line.wait_saved()
        start = time.perf_counter()
        subprocess.run(line.script(body), cwd=line.project, env=line.env, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        line.wait_saved()
        ours.append(time.perf_counter() - start)
        floor.append(line.floor("touch ~/ffive", count=5))
    row("5 back-to-back runs, saves included (median of %d)" % rounds,
        statistics.median(ours), statistics.median(floor), 1.25)


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


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    parser.add_argument("--only", default="", help="comma-separated: prompt,five,source")
    args = parser.parse_args()
    only = set(filter(None, args.only.split(",")))
    line = Line()
    try:
        if not only or "source" in only:
            bench_source(line, 200)
        if not only or "prompt" in only:
            bench_prompt(line, 4 if args.quick else 12)
        if not only or "five" in only:
            bench_five(line, 2 if args.quick else 5)
    finally:
        line.close()
    server = sh("docker", "version", "--format", "{{.Server.Version}}").stdout.strip()
    print("machine: %s, %d cores, Linux %s, Docker %s, Python %s" % (
        platform.machine(), os.cpu_count(), platform.release(), server,
        platform.python_version()))
    header = ("measure", "ours", "reference", "ratio", "goal", "result")
    widths = [max(len(str(r[i])) for r in ROWS + [header]) for i in range(6)]
    for r in [header] + ROWS:
        print("| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |")
    return 0 if all(r[-1] == "pass" for r in ROWS) else 1


if __name__ == "__main__":
    sys.exit(main())
