"""Attacks of a hostile agent against the issue-22 hand-back and sweep.

Each test plants its attack from inside a run, as the agent would, and
asserts the SAFE outcome: it fails while the attack works."""

import os
import stat
import subprocess

import pytest

from conftest import docker, wait_until  # noqa: F401
from test_containment import agent, host_git, marker, warnings  # noqa: F401


def test_deeply_nested_unreadable_dirs_hide_an_armed_repository(box):
    """The sweep opens directories the user cannot look into, but only four
    rounds deep: a fifth level is never looked into, and nothing is said.
    A gitlink in the index then makes the host's own top-level git status
    run the planted repository's fsmonitor."""
    box.init_repo()
    m = marker(box)
    deep = "d1/d2/d3/d4/d5/sub"
    result = agent(box, """
        mkdir -p {deep} && git init -q {deep}
        git -C {deep} config core.fsmonitor 'touch {m}; false'
        git -C {deep} commit -q --allow-empty -m x
        git update-index --add --cacheinfo 160000,$(git -C {deep} rev-parse HEAD),{deep}
        chmod 100 d1/d2/d3/d4/d5 d1/d2/d3/d4 d1/d2/d3 d1/d2 d1
        """.format(deep=deep, m=m))
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    said = "\n".join(warnings(result))
    assert not os.path.exists(m), "made during the run itself?"
    status = host_git(box, "status")
    said += "\n" + status.stdout + status.stderr
    assert not os.path.exists(m), "host git status ran the agent's fsmonitor\n" + said


def test_a_long_symlink_chain_crashes_the_end_of_the_run_before_the_sweep(box):
    """A watched directory replaced by a link into a chain of 1500 links:
    os.path.realpath (recursive in Python 3.11) raises RecursionError in
    ProjectWatch.found, which end_run does not catch (it catches PiError
    and OSError): a traceback, and the prompt is back before any hand-back
    or sweep (the saver does them about a second later). The user ran pi
    from src/, which the agent made a repository with an fsmonitor; the
    prompt's git status (run right away, as a git-aware prompt does) runs
    it. A setuid-root shell sits in the project meanwhile."""
    box.init_repo()
    box.mkdir(os.path.join(box.project, "x"))
    src = box.mkdir(os.path.join(box.project, "src"))
    m = marker(box)
    script = """
        git init -q . && git config core.fsmonitor 'touch {m}; false'
        sudo cp /bin/sh ../rootsh && sudo chmod 4755 ../rootsh
        cd .. && touch x/f && rm -rf x
        i=0; while [ $i -lt 1500 ]; do ln -s l$((i+1)) l$i; i=$((i+1)); done
        ln -s . l1500 && ln -s l0 x
        """.format(m=m)
    # pi, then what a git-aware prompt runs at once in the same directory
    result = box.sh("pi-exec sh -s; ls -l ../rootsh >&2; git status >/dev/null 2>&1",
                    cwd=src, input=script)
    problems = [what for what, bad in (
        ("a traceback", "Traceback" in result.stderr),
        ("a setuid-root shell at the prompt", "rwsr-xr-x 1 root" in result.stderr),
        ("the prompt's git status ran the planted fsmonitor", os.path.exists(m))) if bad]
    assert not problems, "%s\n%s" % (problems, result.stderr[-400:])


def test_credentials_in_a_submodules_config_stay_out_of_the_run(box):
    """The gate's config is allow-listed, but GITDIR/modules is mounted
    whole (read-only): what actions/checkout writes into each submodule's
    config (an extraheader), a credential helper's file, a token in a
    submodule remote's URL are all read inside."""
    upstream = box.mkdir(os.path.join(os.path.dirname(box.project), "upstream"))
    box.init_repo(upstream)
    box.init_repo()
    box.ok("git -c protocol.file.allow=always submodule add -q %s sub && "
           "git -c user.name=H -c user.email=h@x commit -qm sub" % upstream)
    box.ok("git -C sub config http.https://github.com/.extraheader "
           "'AUTHORIZATION: basic SECRET-1' && "
           "git -C sub config credential.helper 'store --file /tmp/SECRET-2' && "
           "git -C sub remote set-url origin https://u:SECRET-3@github.com/o/sub")
    result = agent(box, "git -C sub config --list; cat .git/modules/*/config")
    assert result.returncode == 0, result.stderr
    assert "SECRET" not in result.stdout, result.stdout


def test_a_flood_of_stash_entries_costs_a_host_git_process_each(box):
    """The refs are capped at 1,000 a run, the stash is not: every line of
    the agent's stash reflog (16 MB of it are read) is one host `git
    update-ref`, before the prompt, and one entry in the user's stash list
    (theirs pushed down under the flood). A commit ID may repeat."""
    import time
    box.init_repo()
    box.ok("echo 0 > f && git add f && git -c user.name=H -c user.email=h@x commit -qm f && "
           "echo mine >> f && git stash -q")
    started = time.monotonic()
    result = agent(box, """
        echo a >> f && git stash -q && echo b >> f && git stash -q
        a=$(git rev-parse stash@{0}) b=$(git rev-parse stash@{1})
        z=0000000000000000000000000000000000000000
        python3 -c "
import sys
a, b = sys.argv[1:]
with open('.git/logs/refs/stash', 'a') as log:
    for i in range(20000):
        log.write('%s %s A <a@x> 1700000000 +0000\\tWIP on main: mine\\n' % (a, b) if i % 2
                  else '%s %s A <a@x> 1700000000 +0000\\tWIP on main: mine\\n' % (b, a))
" $a $b
        """)
    took = time.monotonic() - started
    assert result.returncode == 0, result.stderr
    listing = host_git(box, "stash list --format=%gs").stdout.splitlines()
    assert len(listing) <= 1001, "%d stash entries came back in %.0fs" % (len(listing), took)


def peak_rss_of_pi_agent(stop, peaks):
    """Sample the peak RSS (VmHWM, kB) of every pi_agent process until `stop`."""
    import time
    while not stop.is_set():
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                with open("/proc/%s/cmdline" % pid, "rb") as handle:
                    if b"pi_agent" not in handle.read():
                        continue
                with open("/proc/%s/status" % pid) as handle:
                    for line in handle:
                        if line.startswith("VmHWM:"):
                            peaks[pid] = max(peaks.get(pid, 0), int(line.split()[1]))
            except OSError:
                pass
        time.sleep(0.2)


def test_a_huge_index_of_gitlinks_costs_the_host_memory_and_comes_back_whole(box):
    """An index of 4 million gitlink entries (290 MB: gitlinks need no
    object, so nothing is imported or checked): pi-agent's own process
    parses it in Python before the prompt (about 12 bytes of memory per
    byte of index; the read limit is 1 GB), and the host's .git/index
    becomes that size: every later git status reads it."""
    import threading
    import time
    box.init_repo()
    stop, peaks = threading.Event(), {}
    watcher = threading.Thread(target=peak_rss_of_pi_agent, args=(stop, peaks))
    watcher.start()
    started = time.monotonic()
    try:
        result = agent(box, """python3 - <<'PY'
import hashlib, struct
n, parts = 4000000, []
for i in range(n):
    path = b"d/%07d" % i
    rec = struct.pack(">10L20sH", 0, 0, 0, 0, 0, 0, 0o160000, 0, 0, 0, b"\\x11" * 20, len(path))
    size = len(rec) + len(path)
    parts.append(rec + path + b"\\0" * (((size + 8) & ~7) - size))
body = struct.pack(">4sLL", b"DIRC", 2, n) + b"".join(parts)
open(".git/index", "wb").write(body + hashlib.sha1(body).digest())
PY
""", timeout=900)
    finally:
        stop.set()
        watcher.join()
    took = time.monotonic() - started
    assert result.returncode == 0, result.stderr
    size = os.path.getsize(os.path.join(box.project, ".git", "index"))
    peak = max(peaks.values() or [0]) // 1024
    assert size < 64 << 20, "the host's index is %d MB; pi-agent peaked at %d MB, %.0fs" % (
        size >> 20, peak, took)


def deep_lstat(root, parts):
    """lstat of root/parts... reached one directory at a time (no path
    length limit)."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for part in parts[:-1]:
            inner = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            os.close(fd)
            fd = inner
        return os.stat(parts[-1], dir_fd=fd, follow_symlinks=False)
    finally:
        os.close(fd)


def test_a_setuid_root_shell_deeper_than_path_max_stays(box):
    """find reports a path longer than PATH_MAX (4096), but the sweep's
    os.lstat of TARGET/PATH fails (ENAMETOOLONG) and ProjectScan.results
    drops it without a word: a setuid-root shell stays in the project,
    reachable with cd, step by step."""
    name = "x" * 200
    result = agent(box, """
        python3 -c "
import os
for _ in range(22):
    os.mkdir('{n}')
    os.chdir('{n}')
os.execvp('sudo', ['sudo', 'sh', '-c', 'cp /bin/sh rootsh && chmod 4755 rootsh'])
"
        """.format(n=name))
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    info = deep_lstat(box.project, [name] * 22 + ["rootsh"])
    # the host user (any user who can reach the project) runs it:
    euid = box.sh("python3 -c \"import os; [os.chdir('%s') for _ in range(22)]; "
                  "os.execv('./rootsh', ['rootsh', '-p', '-c', 'id -u -n'])\"" % name)
    assert not (info.st_uid == 0 and info.st_mode & stat.S_ISUID), \
        "a setuid-root shell stays: %o, it runs as %s\n%s" % (
            info.st_mode, euid.stdout.strip(), result.stderr)


def test_a_new_tag_named_like_a_commits_short_id_answers_for_it(box):
    """ambiguous_ref checks a new tag's name against refs only: a tag named
    with the short ID of the agent's own commit (as git log --oneline shows
    it) wins over the commit in git show, git diff, git revert (git only
    warns): the user who reviews, or reverts, `abc1234` gets another
    commit."""
    box.init_repo()
    box.ok("echo ok > f && git add f && git -c user.name=H -c user.email=h@x commit -qm mine")
    result = agent(box, """
        echo evil > f && git commit -qam 'tidy f'
        git tag $(git rev-parse --short HEAD) HEAD~1
        """)
    assert result.returncode == 0, result.stderr
    short = host_git(box, "log -1 --format=%h").stdout.strip()
    full = host_git(box, "rev-parse HEAD").stdout.strip()
    shown = host_git(box, "show -s --format=%H " + short).stdout.strip()
    assert shown == full, "git show %s shows %s, not the agent's %s" % (short, shown, full)


def test_many_long_new_directories_make_the_sweep_look_at_nothing(box):
    """10,000 new directories with 250-character names (fewer events than
    inotify's queue holds): ProjectWatch.found passes every one to find
    on its command line, which is too long (E2BIG); the PiError this
    raises is taken by end_run for "the project is gone": found = [], no
    full scan, nothing is swept, and nothing is said."""
    box.init_repo()
    m = marker(box)
    result = agent(box, """
        python3 -c "import os; [os.mkdir('%0250d' % i) for i in range(10000)]"
        git init -q sub && git -C sub config core.fsmonitor 'touch {m}; false'
        sudo cp /bin/sh rootsh && sudo chmod 4755 rootsh
        """.format(m=m))
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    info = os.lstat(os.path.join(box.project, "rootsh"))
    host_git(box, "status", cwd=os.path.join(box.project, "sub"))
    problems = [what for what, bad in (
        ("a setuid-root shell stays", info.st_uid == 0 and info.st_mode & stat.S_ISUID),
        ("host git status in sub ran the planted fsmonitor", os.path.exists(m))) if bad]
    assert not problems, "%s\n%s" % (problems, "\n".join(warnings(result)))


def test_a_file_system_mounted_in_the_project_is_never_swept(box):
    """A file system mounted inside the project (a tmpfs build directory, a
    data disk) is in the run (docker's bind mounts are recursive), but
    the sweep's find runs with -xdev: once the watch is in doubt (a
    directory moved) the full scan never goes in, and a setuid-root shell
    the agent puts there stays."""
    if os.getuid() != 0:
        pytest.skip("mounting a file system needs root")
    build = box.mkdir(os.path.join(box.project, "build"))
    subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=0755,uid=%d,gid=%d"
                    % (box.user.uid, box.user.gid), "tmpfs", build], check=True)
    try:
        result = agent(box, "sudo cp /bin/sh build/rootsh && sudo chmod 4755 build/rootsh && "
                            "mkdir x && mv x y")
        assert result.returncode == 3 and "file systems are mounted inside it" in result.stderr
        assert not os.path.exists(os.path.join(build, "rootsh"))
    finally:
        subprocess.run(["umount", "-l", build])


def test_the_agent_deletes_a_branch_another_worktree_has_checked_out(box):
    """A move of a branch another worktree has checked out is kept aside;
    its deletion is applied (git itself refuses it: the worktree's admin
    directory is not in the run, so the agent's git cannot know): the
    other worktree is left on a branch that is gone (its reflog with it),
    and shows every file as new. The user's own current branch goes the
    same way."""
    box.init_repo()
    branch = host_git(box, "symbolic-ref --short HEAD").stdout.strip()
    worktree = os.path.join(os.path.dirname(box.project), "wt2")
    box.ok("git worktree add -q %s" % worktree)
    box.ok("git -c user.name=H -c user.email=h@x commit -q --allow-empty -m work", cwd=worktree)
    result = agent(box, "git checkout -q --detach && git update-ref -d refs/heads/wt2 && "
                        "git update-ref -d refs/heads/%s" % branch)
    assert result.returncode == 0, result.stderr
    branches = host_git(box, "for-each-ref --format='%(refname:short)' refs/heads").stdout.split()
    assert "wt2" in branches and branch in branches, (branches, warnings(result))
