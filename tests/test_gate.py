"""The git gate, without an engine: real git repositories in temporary
directories, the agent's side played by hand (as a hostile agent would
write it), the host's side checked with host git itself. (The sweep's
tests are in test_sweep.py.)"""

import os
import struct
import subprocess
import sys

import pytest

from conftest import git

import pi_agent


@pytest.fixture
def repo(tmp_path):
    path = str(tmp_path / "repo")
    os.makedirs(os.path.join(path, "src", "deep"))
    for name in ("a.txt", "src/b.txt", "src/deep/c.txt"):
        with open(os.path.join(path, name), "w") as handle:
            handle.write(name + "\n")
    git(path, "init", "-q")
    git(path, "add", "-A")
    git(path, "-c", "user.name=H", "-c", "user.email=h@x", "commit", "-qm", "one")
    return path


def index_of(repo):
    with open(os.path.join(repo, ".git", "index"), "rb") as handle:
        return handle.read()


def agent_index(repo, tmp_path, *commands):
    """A copy of the host's index, changed by git as the agent would."""
    path = str(tmp_path / "agent-index")
    with open(path, "wb") as handle:
        handle.write(index_of(repo))
    for command in commands:
        git(repo, *command, env={"GIT_INDEX_FILE": path})
    with open(path, "rb") as handle:
        return handle.read()


def applied(repo, tmp_path, agent_data, *args):
    """What host git says with the agent's staging brought back as pi-agent
    brings it (index_changes, then git update-index --index-info on a copy
    of the host's index); None when there is nothing to bring back."""
    changes, _needed = pi_agent.index_changes(agent_data, index_of(repo), 20)
    if not changes:
        return None
    path = str(tmp_path / "result-index")
    with open(path, "wb") as handle:
        handle.write(index_of(repo))
    subprocess.run(["git", "-C", repo, "update-index", "-z", "--index-info"], check=True,
                   input=b"".join(b"%o %s %d\t%s\0" % (mode, oid.hex().encode(), stage, name)
                                  for name, stage, mode, oid in changes),
                   env=dict(os.environ, GIT_INDEX_FILE=path))
    return git(repo, *args, env={"GIT_INDEX_FILE": path}).stdout


def entry_bytes(entry, hash_len=20):
    """One entry as an index of version 2 or 3 stores it."""
    path, extended = entry.path, entry.extended
    flags = entry.flags | (entry.stage << 12) | min(len(path), 0xFFF) | (0x4000 if extended
                                                                        else 0)
    record = struct.pack(">10L%dsH" % hash_len, *entry.stat[:6], entry.mode, *entry.stat[6:],
                         entry.oid, flags) + (struct.pack(">H", extended) if extended else b"")
    length = len(record) + len(path)
    return record + path + b"\0" * (((length + 8) & ~7) - length)


def rebuilt(entries, hash_len=20, version=2, extensions=b""):
    import hashlib
    body = struct.pack(">4sLL", b"DIRC", version, len(entries)) + b"".join(
        entry_bytes(entry, hash_len) for entry in entries) + extensions
    return body + hashlib.sha1(body).digest()


NO_STAT = (0,) * 9


# --- the index ------------------------------------------------------------------

def test_an_index_the_agent_only_refreshed_changes_nothing(repo, tmp_path):
    os.utime(os.path.join(repo, "a.txt"))  # new stat data for the agent's git to record
    data = agent_index(repo, tmp_path, ["update-index", "--refresh"])
    assert applied(repo, tmp_path, data) is None


def test_flags_that_hide_a_change_do_not_come_back(repo, tmp_path):
    data = agent_index(repo, tmp_path, ["update-index", "--assume-unchanged", "a.txt"],
                       ["update-index", "--skip-worktree", "src/b.txt"])
    assert applied(repo, tmp_path, data) is None, "the host's entries"


def test_forged_stat_data_cannot_hide_a_change(repo, tmp_path):
    """The agent changes a file and writes the new stat data into the old
    entry: host git would believe the file unchanged without reading it."""
    blob = git(repo, "hash-object", "-w", "a.txt").stdout.strip()
    with open(os.path.join(repo, "new.txt"), "w") as handle:
        handle.write("a.txt\n")
    staged = agent_index(repo, tmp_path, ["update-index", "--add", "--cacheinfo",
                                          "100644,%s,new.txt" % blob])
    with open(os.path.join(repo, "a.txt"), "w") as handle:
        handle.write("changed by the agent\n")
    os.utime(os.path.join(repo, "a.txt"), (1e9, 1e9))  # old enough not to look racy
    info = os.lstat(os.path.join(repo, "a.txt"))
    entries = [pi_agent.decode_entry(raw, 20) for raw in pi_agent.index_entries(staged, 20)]
    for entry in entries:
        if entry.path == b"a.txt":
            entry.stat = (int(info.st_ctime), info.st_ctime_ns % 10**9, int(info.st_mtime),
                          info.st_mtime_ns % 10**9, info.st_dev & 0xFFFFFFFF, info.st_ino
                          & 0xFFFFFFFF, info.st_uid, info.st_gid, info.st_size)
    forged = rebuilt(entries)
    path = str(tmp_path / "forged-index")
    with open(path, "wb") as handle:
        handle.write(forged)
    assert git(repo, "status", "--short", env={"GIT_INDEX_FILE": path}).stdout.splitlines() \
        == ["A  new.txt"], "as the agent wrote it, git would not see the change"
    assert applied(repo, tmp_path, forged, "status", "--short").splitlines() == [
        " M a.txt", "A  new.txt"]
    assert pi_agent.index_changes(forged, index_of(repo), 20)[1] == {blob}


@pytest.mark.parametrize("path", [b".git/hooks/post-checkout", b"../outside", b"a/../../b",
                                  b"sub/.GIT/config", b".git", b"/abs", b"dir/", b"x\x1by"])
def test_paths_git_would_refuse_are_refused(repo, path):
    entry = pi_agent.IndexEntry(path, 0, NO_STAT, 0o100644, b"\1" * 20, 0, 0)
    with pytest.raises(ValueError, match="refuse"):
        pi_agent.index_changes(rebuilt([entry]), index_of(repo), 20)


def test_entries_out_of_order_or_twice_are_refused(repo):
    entries = [pi_agent.decode_entry(raw, 20)
               for raw in pi_agent.index_entries(index_of(repo), 20)]
    for broken in (entries[::-1], entries + entries[-1:]):
        with pytest.raises(ValueError, match="order"):
            pi_agent.index_changes(rebuilt(broken), index_of(repo), 20)


def test_a_split_index_is_refused(repo, tmp_path):
    """(A damaged checksum is no matter: what comes back is each entry the
    agent changed, decoded and checked; host git writes the index.)"""
    split = agent_index(repo, tmp_path, ["update-index", "--split-index"])
    with pytest.raises(ValueError):
        pi_agent.index_changes(split, index_of(repo), 20)


def test_a_version_4_index_is_read(repo, tmp_path):
    data = agent_index(repo, tmp_path, ["update-index", "--index-version", "4"],
                       ["rm", "-q", "--cached", "src/b.txt"])
    assert applied(repo, tmp_path, data, "status", "--short").splitlines() == [
        "D  src/b.txt", "?? src/b.txt"]


def test_the_tree_cache_kept_is_true(repo, tmp_path):
    """Host git trusts the tree cache when it commits: the one brought back
    must give the same trees as an index with no cache at all."""
    with open(os.path.join(repo, "src", "deep", "c.txt"), "a") as handle:
        handle.write("more\n")
    data = agent_index(repo, tmp_path, ["add", "src/deep/c.txt"])
    cached = applied(repo, tmp_path, data, "write-tree").strip()
    listing = git(repo, "ls-files", "-s", env={"GIT_INDEX_FILE": str(tmp_path / "result-index")})
    fresh = str(tmp_path / "fresh")
    subprocess.run(["git", "-C", repo, "update-index", "--index-info"], input="".join(
        "%s %s\t%s\n" % tuple(line.split(None, 3)[i] for i in (0, 1, 3))
        for line in listing.stdout.splitlines()), text=True, check=True,
        env=dict(os.environ, GIT_INDEX_FILE=fresh))
    assert git(repo, "write-tree", env={"GIT_INDEX_FILE": fresh}).stdout.strip() == cached


def test_what_changed_costs_what_changed_not_the_index(tmp_path):
    """A large index whose agent copy changes one entry, removes one and adds
    one: the comparison finds exactly those (and nothing else is decoded:
    the rest is compared as bytes)."""
    import hashlib
    entries = [pi_agent.IndexEntry(b"d%03d/f%05d" % (i // 250, i), 0, (i,) * 9, 0o100644,
                                   hashlib.sha1(b"%d" % i).digest(), 0, 0) for i in range(20000)]
    host = rebuilt(entries)
    agent_entries = list(entries)
    agent_entries[7000] = pi_agent.IndexEntry(entries[7000].path, 0, NO_STAT, 0o100755,
                                              b"\2" * 20, 0, 0)
    del agent_entries[12000]
    agent_entries.append(pi_agent.IndexEntry(b"d059/new", 0, NO_STAT, 0o100644, b"\3" * 20, 0,
                                             0))
    agent_entries.sort(key=lambda entry: entry.path)
    decoded = []
    decode = pi_agent.decode_entry

    def counting(raw, hash_len, trusted=False):
        decoded.append(raw)
        return decode(raw, hash_len, trusted)
    pi_agent.decode_entry = counting
    try:
        changes, needed = pi_agent.index_changes(rebuilt(agent_entries), host, 20)
    finally:
        pi_agent.decode_entry = decode
    assert [(path, mode) for path, _stage, mode, _oid in changes] == [
        (b"d028/f07000", 0o100755), (b"d048/f12000", 0), (b"d059/new", 0o100644)]
    assert needed == {"02" * 20, "03" * 20}
    assert len(decoded) < 20, "decoded %d entries of 20,000" % len(decoded)


# --- refs -----------------------------------------------------------------------

@pytest.mark.parametrize("name,ok", [("refs/heads/main", True), ("refs/heads/a/b", True),
                                     ("refs/heads/\udcff", False), ("refs/heads/\u202ex", False),
                                     ("refs/heads/caf\u00e9", True),
                                     ("refs/heads/..x", False), ("refs/heads/x.lock", False),
                                     ("refs/heads/.x", False), ("refs/heads/a b", False),
                                     ("refs/heads/a~1", False), ("refs/heads/a@{1", False),
                                     ("heads/main", False), ("refs/heads/a\nb", False)])
def test_ref_names_follow_gits_rules(name, ok):
    assert pi_agent.valid_refname(name) is ok


def test_ref_updates_never_overwrite_what_the_user_moved():
    record = {"refs": {"refs/heads/main": "1" * 40, "refs/heads/old": "2" * 40,
                       "refs/heads/moved": "3" * 40},
              "started": 0}
    agent = {"refs/heads/main": "4" * 40, "refs/heads/new": "5" * 40,
             "refs/heads/moved": "6" * 40, "refs/pi-agent/x": "7" * 40}
    host = {"refs/heads/main": "1" * 40, "refs/heads/old": "2" * 40,
            "refs/heads/moved": "8" * 40}
    lines, notes, _left_out = pi_agent.ref_updates(record, agent, host, {})
    assert lines == ["update refs/heads/main %s %s" % ("4" * 40, "1" * 40),
                     "create refs/pi-agent/19700101-000000/heads/moved %s" % ("6" * 40),
                     "create refs/heads/new %s" % ("5" * 40),
                     "create refs/pi-agent/deleted/19700101-000000/heads/old %s" % ("2" * 40),
                     "delete refs/heads/old %s" % ("2" * 40)]
    assert any("moved on the host" in note for note in notes)
    lines, notes, _left_out = pi_agent.ref_updates(record, agent, host,
                                                   {"refs/heads/main": "/src/wt"})
    assert "update refs/heads/main" not in " ".join(lines), "checked out elsewhere: kept aside"
    assert any("checked out in /src/wt" in note for note in notes)
    after = dict(host, **{"refs/heads/main": "4" * 40, "refs/heads/new": "5" * 40,
                          "refs/pi-agent/19700101-000000/heads/moved": "6" * 40})
    del after["refs/heads/old"]
    assert pi_agent.ref_updates(record, agent, after, {})[0] == [], \
        "a hand-back cut short after its refs moved makes none again"


def test_a_branch_that_cannot_be_moved_keeps_its_commit_reachable(repo):
    # The host holds refs/heads/topic/x, so the agent's refs/heads/topic
    # cannot be made (as when another work tree's run holds the ref's lock
    # past git's wait): the commit goes under refs/pi-agent/, never dangling.
    head = git(repo, "rev-parse", "HEAD").stdout.strip()
    git(repo, "branch", "topic/x")
    git(repo, "-c", "user.name=A", "-c", "user.email=a@x", "commit", "-q", "--allow-empty",
        "-m", "the agent's")
    theirs = git(repo, "rev-parse", "HEAD").stdout.strip()
    git(repo, "reset", "-q", "--hard", head)
    record = {"started": 0, "notes": []}
    branch = git(repo, "symbolic-ref", "HEAD").stdout.strip()
    lines = ["create refs/heads/topic %s" % theirs, "update %s %s %s" % (branch, theirs, head)]
    pi_agent.apply_ref_lines({"gitdir": os.path.join(repo, ".git")}, lines, "test", record)
    kept = "refs/pi-agent/19700101-000000/heads/topic"
    assert git(repo, "rev-parse", kept).stdout.strip() == theirs
    assert any("kept as %s" % kept in note for note in record["notes"]), record["notes"]
    assert git(repo, "rev-parse", "refs/heads/topic/x").stdout.strip() == head
    assert git(repo, "rev-parse", branch).stdout.strip() == theirs, "the other line applies"


def test_only_branches_and_new_tags_come_back():
    """Replace refs would make host git show one object for another; a
    moved remote-tracking ref would hide what is not pushed; refs/main
    and a tag or branch named like another ref would be taken for it."""
    a, b, c = "a" * 40, "b" * 40, "c" * 40
    seeded = {"refs/heads/main": a, "refs/tags/v1": a, "refs/remotes/origin/main": a,
              "refs/remotes/origin/HEAD": "ref: refs/remotes/origin/main", "refs/tags/gone": a}
    agent = dict(seeded, **{"refs/heads/main": b, "refs/heads/topic": b, "refs/tags/v2": b,
                            "refs/tags/v1": b, "refs/remotes/origin/main": b,
                            "refs/replace/" + a: c, "refs/notes/commits": c, "refs/main": c,
                            "refs/tags/main": c, "refs/heads/origin/main": c,
                            "refs/heads/origin": c, "refs/bisect/bad": c})
    del agent["refs/tags/gone"]
    lines, notes, left_out = pi_agent.ref_updates({"refs": seeded, "started": 0}, agent,
                                                  seeded, {})
    applied = {line.split(" ")[1] for line in lines}
    assert applied - {name for name in applied if name.startswith("refs/pi-agent/")} == {
        "refs/heads/main", "refs/heads/topic", "refs/tags/v2"}
    kept = {name[len("refs/pi-agent/19700101-000000/"):] for name in applied
            if name.startswith("refs/pi-agent/")}
    assert kept == {"tags/v1", "remotes/origin/main", "replace/" + a, "notes/commits", "main",
                    "tags/main", "heads/origin/main", "heads/origin", "bisect/bad"}
    assert not any(line.startswith("delete refs/tags/") for line in lines)
    assert left_out == []
    assert notes[0] == "the agent made 1 tag: v2"
    assert len(notes) == 2 and "10 ref changes" in notes[1] and "refs/pi-agent/" in notes[1]


def test_a_flood_of_refs_is_bounded():
    seeded = {"refs/heads/main": "a" * 40}
    agent = dict(seeded, **{"refs/heads/f%05d" % n: "b" * 40 for n in range(3000)})
    lines, notes, left_out = pi_agent.ref_updates({"refs": seeded, "started": 0}, agent,
                                                  seeded, {})
    assert len(lines) == pi_agent.MAX_NEW_REFS and len(left_out) == 3000 - len(lines)
    assert left_out[0] == "%s refs/heads/f%05d" % ("b" * 40, pi_agent.MAX_NEW_REFS)


def test_an_agents_ref_store_past_its_bound_is_not_read(tmp_path):
    """Read as if absent, a packed-refs too large would make every ref in
    it look deleted (and the hand-back delete the user's branches)."""
    gate = tmp_path / "gate"
    (gate / "refs" / "heads").mkdir(parents=True)
    (gate / "packed-refs").write_text("".join("%s refs/heads/f%d\n" % ("1" * 40, n)
                                              for n in range(50)))
    fd = pi_agent.open_dir(str(gate))
    try:
        assert len(pi_agent.read_ref_store(fd, 51)) == 50  # (refs/heads counts)
        with pytest.raises(ValueError, match="more than 40"):
            pi_agent.read_ref_store(fd, 40)
        with pytest.raises(ValueError, match="packed-refs"):
            pi_agent.read_ref_store(fd, 5)  # (too large to be read for 5)
    finally:
        os.close(fd)


def test_the_agents_ref_store_is_read_without_following_links(tmp_path):
    gate = tmp_path / "gate"
    (gate / "refs" / "heads").mkdir(parents=True)
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "heads").mkdir(parents=True)
    (elsewhere / "heads" / "stolen").write_text("9" * 40 + "\n")
    os.symlink(str(elsewhere), str(gate / "refs" / "remotes"))
    os.symlink(str(elsewhere / "heads" / "stolen"), str(gate / "refs" / "heads" / "linked"))
    (gate / "refs" / "heads" / "main").write_text("1" * 40 + "\n")
    os.mkfifo(str(gate / "refs" / "heads" / "fifo"))
    (gate / "packed-refs").write_text("# pack-refs with: sorted \n%s refs/tags/v1\n"
                                      "%s refs/heads/bad..name\n" % ("2" * 40, "3" * 40))
    fd = pi_agent.open_dir(str(gate))
    try:
        assert pi_agent.read_ref_store(fd) == {"refs/heads/main": "1" * 40,
                                               "refs/tags/v1": "2" * 40}
    finally:
        os.close(fd)


def test_host_git_never_reads_the_terminal(repo):
    # (a pty that stays open: an empty input once left git reading it, and
    # a run with no stash entries to bring back hung in CI's chaos soak)
    code = ("import sys; sys.path.insert(0, %r); import pi_agent; "
            "pi_agent.host_git(%r, 'cat-file', '--batch-check', stdin=b''); "
            "pi_agent.host_git(%r, 'cat-file', '--batch-check')"
            % (os.path.dirname(pi_agent.__file__), os.path.join(repo, ".git"),
               os.path.join(repo, ".git")))
    reader, writer = os.pipe()
    try:
        subprocess.run([sys.executable, "-c", code], stdin=reader, check=True, timeout=30)
    finally:
        os.close(reader)
        os.close(writer)


def test_host_git_held_in_memory_runs_under_a_lower_limit_of_yours():
    # (ulimit -d above the hard limit fails: git would never run, and every
    # run's git work would be kept instead of brought back)
    code = ("import sys; sys.path.insert(0, %r); import pi_agent; "
            "print(pi_agent.host_git(None, 'version', memory=4 << 30).stdout.decode())"
            % os.path.dirname(pi_agent.__file__))
    result = subprocess.run(["sh", "-c", 'ulimit -d 900000 && exec "$@"', "sh", sys.executable,
                             "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, timeout=30)
    assert result.stdout.startswith("git version"), result.stderr


def test_a_host_git_that_hangs_is_stopped_loudly(tmp_path, monkeypatch):
    # (as on a FIFO where git reads; the child keeps git's pipes open)
    stub = tmp_path / "git"
    stub.write_text("#!/bin/sh\nsleep 60 &\nexec sleep 60\n")
    stub.chmod(0o755)
    monkeypatch.setenv("PATH", "%s:%s" % (tmp_path, os.environ["PATH"]))
    monkeypatch.setattr(pi_agent, "HOST_GIT_TIMEOUT", 1)
    with pytest.raises(pi_agent.PiError, match="git log took more than 1 s and was stopped"):
        pi_agent.host_git(str(tmp_path), "log")


def test_objects_are_taken_only_as_plain_files(tmp_path):
    gate = tmp_path / "gate"
    (gate / "objects" / "ab").mkdir(parents=True)
    secret = tmp_path / "secret"
    secret.write_text("host file")
    (gate / "objects" / "ab" / ("c" * 38)).write_bytes(b"object")
    os.symlink(str(secret), str(gate / "objects" / "ab" / ("d" * 38)))
    os.mkfifo(str(gate / "objects" / "ab" / ("e" * 38)))
    os.symlink(str(tmp_path), str(gate / "objects" / "cd"))
    fd = pi_agent.open_dir(str(gate))
    try:
        assert pi_agent.link_objects(fd, str(tmp_path / "in")) == 1
    finally:
        os.close(fd)
    assert os.listdir(str(tmp_path / "in")) == ["ab"]
    assert os.listdir(str(tmp_path / "in" / "ab")) == ["c" * 38]


# --- output and options ---------------------------------------------------------

def test_nothing_printed_can_steer_a_terminal():
    assert pi_agent.printable("a\x1b[2K\rb\u202ec\x07") == "a\\x1b[2K\\x0db\\u202ec\\x07"
    assert pi_agent.printable("plain ünïcode / path") == "plain ünïcode / path"


@pytest.mark.parametrize("word,meant", [("--ofline", "--offline"), ("--wiat", "--wait"),
                                        ("--hre", "--here"), ("-offline", "--offline"),
                                        ("--Dry-Run", "--dry-run"), ("\u2014offline", "--offline"),
                                        ("\u2013wait", "--wait"), ("--dry", "--dry-run"),
                                        ("--offline-mode", "--offline"), ("--model", None),
                                        ("--print", None), ("--verbose", None), ("-p", None)])
def test_a_slip_of_a_wrapper_option_is_caught(word, meant):
    assert pi_agent.near_miss(word) == meant


@pytest.mark.parametrize("name,refused", [("PI_AGENT_NETWROK", True), ("PI_AGENT_OFFLINE", True),
                                          ("PI_AGENT_NET", True), ("PI_AGENT_MEMORI", False)])
def test_a_misnamed_network_setting_stops_the_run(name, refused):
    if refused:
        with pytest.raises(pi_agent.BadSetting, match=name):
            pi_agent.network_typos({name: "none"})
    else:
        pi_agent.network_typos({name: "4g"})


def test_the_gate_config_takes_only_what_git_needs_inside():
    local = [("core.repositoryformatversion", "0"), ("core.bare", "false"),
             ("remote.origin.url", "https://x-access-token:ghs_SECRET@github.com/o/r"),
             ("remote.origin.fetch", "+refs/heads/*:refs/remotes/origin/*"),
             ("remote.mirror.url", "ssh://git@example.com/r.git"),
             ("http.https://github.com/.extraheader", "AUTHORIZATION: basic SECRET"),
             ("credential.helper", "store"), ("url.https://tok@ghe.example/.insteadof", "gh:"),
             ("core.fsmonitor", "touch /tmp/pwned"), ("branch.main.remote", "origin"),
             ("core.hookspath", ".husky"), ("include.path", "/etc/x"),
             ("branch.main.description", "two\nlines\t\"quoted\"")]
    entries, left_out = pi_agent.gate_entries(local, "/p", "/p/.husky")
    text = pi_agent.gate_config(entries, "/p", ("A", "a@x"))
    assert "SECRET" not in text and "fsmonitor = false" in text and "include" not in text
    assert "tok@" not in text and "store" not in text and "/tmp/pwned" not in text
    assert 'url = "https://github.com/o/r"' in text and "ssh://git@example.com" in text
    assert 'hookspath = ".husky"' in text
    assert left_out == ["the user and password in remote.origin.url",
                        "http.https://github.com/.extraheader", "credential.helper",
                        "url.https://***@ghe.example/.insteadof"]
    parsed = subprocess.run(["git", "config", "--file", "-", "--list"], input=text,
                            capture_output=True, text=True, check=True).stdout
    assert 'branch.main.description=two\nlines\t"quoted"' in parsed, "a value stays one value"
