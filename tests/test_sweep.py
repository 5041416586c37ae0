"""The sweep after a run, without an engine: a project in a temporary
directory, what the agent left in it made by hand (git directories, setuid
bits, sockets, unreadable directories), the sweep and the watch run on it,
the host's side checked with host git itself."""

import os
import stat

import pytest

from conftest import git

import pi_agent


def sweep_record(root, started, **extra):
    record = {"target": root, "uid": os.getuid(), "started": started, "git_dirs": [],
              "git_files": {}, "protected": []}
    record.update(extra)
    return record


def test_the_sweep_disarms_new_git_directories_and_clears_setuid_bits(tmp_path):
    import time
    root = str(tmp_path / "p")
    os.makedirs(root)
    kept = os.path.join(root, "kept")
    git(root, "init", "-q", "kept")
    before = os.lstat(os.path.join(kept, ".git"))
    started = time.time()
    git(root, "init", "-q", "made")
    git(root, "init", "-q", "--bare", "bare")
    with open(os.path.join(root, "made", "sub.git"), "w"):
        pass
    os.makedirs(os.path.join(root, "w"))
    with open(os.path.join(root, "w", ".git"), "w") as handle:
        handle.write("gitdir: ../bare\n")
    tool = os.path.join(root, "tool")
    with open(tool, "w"):
        pass
    os.chmod(tool, 0o6755)
    record = sweep_record(root, started, git_dirs=[[before.st_dev, before.st_ino]])
    found = pi_agent.ProjectScan(root, pi_agent.scan_after(os.getuid()), False).results()
    notes, for_root, reopen = pi_agent.sweep_project(record, found)
    assert for_root == [] and reopen == []
    assert os.path.exists(os.path.join(kept, ".git", "HEAD")), "it was there before: trusted"
    for gitdir in ("made/.git", "bare"):
        assert not os.path.exists(os.path.join(root, gitdir, "HEAD"))
        assert len(set_aside_in(os.path.join(root, gitdir), "HEAD")) == 1
    assert not os.path.exists(os.path.join(root, "w", ".git"))
    assert stat.S_IMODE(os.stat(tool).st_mode) == 0o755
    assert len(notes) == 4 and all(pi_agent.printable(note) == note for note in notes)
    assert git(root, "rev-parse", "--git-dir", check=False).returncode != 0, \
        "host git finds no repository the agent made"


def set_aside_in(directory, name):
    """What the sweep renamed `name` to: a name no one could take first."""
    import re
    return [entry for entry in os.listdir(directory)
            if re.fullmatch(re.escape(name) + r"\.pi-agent-untrusted-[0-9a-f]{16}", entry)]


def sweep_all(root, record):
    found = pi_agent.ProjectScan(root, pi_agent.scan_after(os.getuid()), False).results()
    return pi_agent.sweep_project(record, found)


def test_a_git_directory_cannot_dodge_being_disabled(tmp_path):
    """The names it could be renamed to taken first, or a git directory
    made over two runs (so no HEAD is new in the second)."""
    import time
    root = str(tmp_path / "p")
    os.makedirs(root)
    git(root, "init", "-q", "blocked")
    for number in range(100):
        os.makedirs(os.path.join(root, "blocked", ".git", "HEAD.pi-agent-untrusted" + (
            ".%d" % number if number else "")))
    half = os.path.join(root, "half", ".git")
    os.makedirs(os.path.join(half, "objects"))
    with open(os.path.join(half, "HEAD"), "w") as handle:
        handle.write("ref: refs/heads/main\n")
    started = time.time()
    os.makedirs(os.path.join(half, "refs"))  # the second run completes it
    notes, _for_root, _reopen = sweep_all(root, sweep_record(root, started))
    assert len(set_aside_in(os.path.join(root, "blocked", ".git"), "HEAD")) == 1
    assert not os.path.exists(os.path.join(half, "HEAD"))
    for where in ("blocked", "half"):
        assert git(os.path.join(root, where), "rev-parse", "--git-dir",
                   check=False).returncode != 0


def test_a_disarm_that_fails_is_an_alarm_and_stops_the_next_run(tmp_path, monkeypatch):
    import time
    root, state = str(tmp_path / "p"), str(tmp_path / "state")
    os.makedirs(root)
    started = time.time()
    git(root, "init", "-q", "sub")
    rename = os.rename
    monkeypatch.setattr(os, "rename", lambda source, *rest: (_ for _ in ()).throw(
        PermissionError(1, "not yours")) if "sub" in source else rename(source, *rest))

    class Line:
        state_dir = state
    record = dict(sweep_record(root, started), gated=True, gid=os.getgid())
    found = pi_agent.ProjectScan(root, pi_agent.scan_after(os.getuid()), False).results()
    monkeypatch.setattr(pi_agent, "give_back", lambda *args: [])  # as if it could not help
    pi_agent.sweep(Line, record, found, pi_agent.scan_after(os.getuid()))
    assert record["armed"] == ["sub/.git"]
    alarm = pi_agent.keep_armed(Line, record)
    assert isinstance(alarm, pi_agent.Alarm) and "sub/.git" in alarm
    with pytest.raises(pi_agent.Refused, match="sub/.git"):
        pi_agent.check_armed(state, root, forget=True)
    monkeypatch.setattr(os, "rename", rename)
    os.remove(os.path.join(root, "sub", ".git", "HEAD"))  # the user decided
    pi_agent.check_armed(state, root, forget=True)
    assert pi_agent.armed_paths(state, root) == {}


def test_a_directory_the_user_cannot_read_is_opened_and_looked_into(tmp_path):
    import time
    root = str(tmp_path / "p")
    hidden = os.path.join(root, "d")
    os.makedirs(hidden)
    started = time.time()
    git(hidden, "init", "-q", "sub")
    os.chmod(hidden, 0o111)
    record = sweep_record(root, started)
    first, _for_root, reopen = sweep_all(root, record)
    assert reopen == ["d"] and stat.S_IMODE(os.stat(hidden).st_mode) & 0o500 == 0o500
    found = pi_agent.ProjectScan(root, pi_agent.scan_after(os.getuid()), False,
                                 ["./d"]).results()
    second, _for_root, reopen = pi_agent.sweep_project(record, found)
    assert reopen == [] and any("d/sub/.git/HEAD" in note for note in first + second)


def test_a_stale_socket_the_agent_left_is_removed_a_live_one_stays(tmp_path):
    import socket
    import time
    root = str(tmp_path / "p")
    os.makedirs(root)
    started = time.time()
    stale, live = socket.socket(socket.AF_UNIX), socket.socket(socket.AF_UNIX)
    stale.bind(os.path.join(root, "stale.sock"))
    stale.close()
    live.bind(os.path.join(root, "live.sock"))
    live.listen()
    try:
        notes, _for_root, _reopen = sweep_all(root, sweep_record(root, started))
        assert sorted(os.listdir(root)) == ["live.sock"]
        assert notes == ["removed stale.sock, a socket the agent left"]
    finally:
        live.close()


def test_the_watch_gives_up_when_what_changed_has_another_name(tmp_path):
    root = str(tmp_path / "p")
    os.makedirs(root)
    with open(os.path.join(root, "tool"), "w"):
        pass
    watch = pi_agent.ProjectWatch(root, [""])
    if watch.fd is None:
        pytest.skip("no inotify here")
    os.link(os.path.join(root, "tool"), os.path.join(root, "tmp"))
    os.chmod(os.path.join(root, "tmp"), 0o4755)
    os.unlink(os.path.join(root, "tmp"))  # tool is setuid now; tmp is gone
    assert watch.found(pi_agent.scan_after(os.getuid()), False) is None, "look at everything"
    top = pi_agent.ProjectWatch(root, [""])
    os.chmod(root, 0o700)
    assert top.changed() == ({""}, set()), "the top directory itself counts"


def test_the_watch_sees_what_changed(tmp_path):
    root = str(tmp_path / "p")
    os.makedirs(os.path.join(root, "a"))
    watch = pi_agent.ProjectWatch(root, ["", "a"])
    if watch.fd is None:
        pytest.skip("no inotify here")
    with open(os.path.join(root, "a", "f"), "w"):
        pass
    os.chmod(os.path.join(root, "a", "f"), 0o4755)
    os.makedirs(os.path.join(root, "new", "deeper"))
    assert watch.changed() == ({"a/f"}, {"new"})
    moved = pi_agent.ProjectWatch(root, ["", "a"])
    os.rename(os.path.join(root, "a"), os.path.join(root, "b"))
    assert moved.changed() is None, "a directory moved: look at everything"
