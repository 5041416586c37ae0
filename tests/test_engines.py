"""The core loop on the engine under test (PI_AGENT_TEST_ENGINE: make
test-engines runs this file, and more, on each engine CI brings up, see
tests/engines/run): a run that changes the project and the environment, its
files the user's (root's given back, and said only once they are);
persistence; a git commit inside that reaches the host branch; status, with
what pi-agent makes of the engine; what a run changed; snapshots, rollback
and its undo; a run that changes nothing leaves nothing."""

import json
import os
import stat

from conftest import ENGINE


def test_the_core_loop(any_box):
    box = any_box
    box.init_repo()
    if ENGINE.command == "podman":  # the network policy: Docker's only, said so on Podman
        refused = box.sh("pi-exec true", env={"PI_AGENT_EGRESS": "public"})
        assert refused.returncode == 3 and refused.stderr.count("\n") == 1, refused.stderr
        assert "not yet on Podman; set PI_AGENT_EGRESS=open" in refused.stderr
    branch = box.ok("git symbolic-ref --short HEAD").stdout.strip()

    # A run that changes the project (as the agent, as root inside, as
    # another user inside) and the environment.
    result = box.ok(
        "pi-exec sh -c 'echo made > made.txt && echo hi > ~/x && "
        "sudo touch /usr/local/share/marker && "
        "sudo sh -c \"echo root > root.txt && chmod 4755 root.txt && mkdir -p by-root/deep "
        "&& touch by-root/deep/f && mkdir other && touch other/f && chown -R 4242:4242 other\"'")
    for name in ("made.txt", "root.txt", "by-root", "by-root/deep/f", "other", "other/f"):
        info = os.lstat(os.path.join(box.project, name))
        assert info.st_uid == box.user.uid, "%s is the user's" % name
    assert not os.lstat(os.path.join(box.project, "root.txt")).st_mode & stat.S_ISUID
    assert "gave other back to you" in result.stderr, "said once it is so"
    for said in result.stderr.splitlines():
        assert "could not give" not in said, said
    snaps = box.snapshots()
    assert len(snaps) == 1

    # It persists; a run that changes nothing leaves nothing.
    both = "pi-exec sh -c 'cat ~/x; test -e /usr/local/share/marker && echo there'"
    assert box.ok(both).stdout == "hi\nthere\n"
    assert box.snapshots() == snaps

    # A commit inside reaches the host's branch.
    box.ok("pi-exec sh -c 'git add made.txt && git commit -qm agent-commit'")
    assert box.ok("git log -1 --format=%%s %s" % branch).stdout.strip() == "agent-commit"
    assert box.ok("git status --porcelain made.txt").stdout == ""

    # Status says what the engine is, and what root inside can do there.
    facts = json.loads(box.ok("pi-status --json").stdout)
    engine = facts["engine_facts"]
    assert engine["kind"] == ENGINE.command and engine["store"] == ENGINE.store
    assert engine["rootless"] == bool(ENGINE.owner)
    assert ("root on the host" in engine["root_inside"]) != bool(ENGINE.owner)
    assert facts["settings"]["PI_AGENT_ENGINE"]["value"] == ENGINE.command
    assert facts["images"]["current"]["id"]
    if engine["sizes_are_disk"]:
        assert facts["disk"]["own"] > 0
    else:
        assert facts["disk"] is None, "a figure the engine cannot give is not made up"
        assert "disk: not known" in box.ok("pi-status").stdout

    # What the runs changed, since the first snapshot.
    diff = json.loads(box.ok("pi-diff --all --json %s" % snaps[0]).stdout)
    paths = {change["path"]: change["change"] for change in diff["changes"]}
    assert paths.get("/usr/local/share/marker") == "added", paths
    assert paths.get(os.path.join(box.home, "x")) == "added", paths
    assert box.ok("pi-log").stdout.count("\n") >= 2

    # A second change, then rollback and its undo: every state under one
    # name, nothing left untagged.
    box.ok("pi-exec sh -c 'echo two > ~/x'")
    snaps = box.snapshots()
    assert len(snaps) == 2
    box.ok("pi-rollback %s" % snaps[0])
    assert box.sh(both).stdout == "", "the state before the first run"
    undo = box.ok("pi-rollback")
    assert box.ok("pi-exec cat ~/x").stdout == "two\n"
    images = box.images()
    kept = [tag for tag in images if tag.startswith("snap-")]
    assert len({images[tag] for tag in kept}) == len(kept), "no image under two names"
    assert "still kept as" in undo.stderr or "kept as" in undo.stderr
    assert box.dangling() == []
    assert box.containers() == []
