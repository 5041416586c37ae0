"""The sixth review of issue 22: the hand-back made again after it was cut
short (c1d0131: incoming.part renamed to incoming) and the work kept on
any error (keep_gate). Each test acts as the agent (or as the fault that
cut a hand-back short), then takes the user's ordinary next step, and
asserts the SAFE outcome: it fails while the attack works."""

import os
import signal

import pytest

from test_containment import agent, warnings
from test_recovery import start_and_wait_for

COMMIT = ("echo a > f && git add f && git -c user.name=A -c user.email=a@x "
          "commit -qm by-the-agent")


def agent_tip(run_dir):
    """The agent's commit: what its HEAD's branch holds in its git directory."""
    gate = os.path.join(run_dir, "git")
    with open(os.path.join(gate, "HEAD")) as handle:
        head = handle.read().strip()
    assert head.startswith("ref: "), head
    with open(os.path.join(gate, head[5:])) as handle:
        return handle.read().strip()


def kept_objects(box, name):
    """The loose object IDs kept in STATE/kept/NAME/objects."""
    objects = os.path.join(box.state_dir, "kept", name, "objects")
    found = set()
    for prefix in os.listdir(objects) if os.path.isdir(objects) else ():
        if len(prefix) == 2:
            found |= {prefix + rest for rest in os.listdir(os.path.join(objects, prefix))}
    return found


def test_a_keep_cut_short_is_done_again_and_the_work_is_kept(box):
    # The import fails (a branch names an object the agent never wrote:
    # any verification failure does), so the hand-back keeps the agent's
    # work; a saver killed inside keep_gate leaves STATE/kept/NAME.part
    # (once an empty NAME: the next keep stopped at EEXIST, "it could not be
    # kept", and the run directory with the agent's only copy of its commit
    # was removed). The next hand-back (recovery) keeps it again, whole.
    box.init_repo()
    run = start_and_wait_for(box, "/tmp/committed", script=(
        "pi-exec sh -c '%s && echo %s > .git/refs/heads/broken && touch /tmp/committed && "
        "while [ ! -e go ]; do sleep 0.1; done'" % (COMMIT, "1" * 40)))
    name = box.live_run_name()
    saver = box.holder()["saver_pid"]
    os.kill(box.wrapper_pid(), signal.SIGKILL)
    os.kill(saver, signal.SIGKILL)
    run.wait(timeout=60)
    run_dir = os.path.join(box.state_dir, "run", name)
    tip = agent_tip(run_dir)
    cut = os.path.join(box.state_dir, "kept", name + ".part", "objects", tip[:2])
    box.mkdir(cut)  # (a copy cut short)
    open(os.path.join(cut, tip[2:]), "wb").close()
    box.mkdir(os.path.join(box.state_dir, "kept", name))  # (as an older keep_gate left it)
    box.chown(os.path.join(box.state_dir, "kept"))
    result = box.ok("pi-exec true")
    assert "recovered the interrupted run" in result.stderr, result.stderr
    landed = box.sh("git cat-file -e %s^{commit}" % tip).returncode == 0
    assert landed or tip in kept_objects(box, name), \
        "the agent's commit is neither brought back nor kept: %s" % warnings(result)


@pytest.mark.parametrize("plant", ["file", "objects dir"])
def test_an_unreadable_object_file_does_not_lose_the_agents_commit(box, plant):
    # Root inside is root on the host (docker, not rootless): a file named
    # like a loose object, root's and 0600, cannot be hard-linked
    # (protected_hardlinks) nor opened for the copy. link_objects raises
    # PermissionError out of the hand-back; the new `except Exception`
    # calls keep_gate, whose link_objects raises it again: "it could not
    # be kept", and the gate is marked done. The docstring's promise ("one
    # left out makes the import fail, and the work is kept") is not kept:
    # the commit is neither in the repository nor in STATE/kept.
    box.init_repo()
    junk = ".git/objects/00/" + "0" * 38
    # (or: .git/objects itself root's and 0700: link_objects returns 0,
    # the import is skipped, update-ref fails on every ref, nothing kept)
    unreadable = ("mkdir -p .git/objects/00 && echo junk > %s && chmod 600 %s" % (junk, junk)
                  if plant == "file" else "chown root .git/objects && chmod 700 .git/objects")
    result = agent(box, "%s && git rev-parse HEAD > tip && sudo sh -c '%s'"
                   % (COMMIT, unreadable))
    assert result.returncode == 0, result.stderr
    with open(os.path.join(box.project, "tip")) as handle:
        tip = handle.read().strip()
    landed = box.sh("git cat-file -e %s^{commit}" % tip).returncode == 0
    kept_dir = os.path.join(box.state_dir, "kept")
    kept = any(tip in kept_objects(box, name) for name in
               (os.listdir(kept_dir) if os.path.isdir(kept_dir) else ()))
    if plant == "objects dir":  # (the agent's own objects, unreadable to you: its refs are kept)
        kept = any(tip in open(os.path.join(kept_dir, name, "packed-refs")).read()
                   for name in os.listdir(kept_dir))
        assert any("could not be brought back" in line for line in warnings(result))
    assert landed or kept, "the agent's commit is lost: %s" % warnings(result)


def test_a_stash_message_with_a_nul_does_not_half_bring_back_the_work(box):
    # The agent writes its stash reflog by hand: a message holding a NUL.
    # carry_stash passes it to host git as an argument (-m): subprocess
    # raises ValueError (embedded null byte), which `except PiError` does
    # not catch; the new `except Exception` of hand_back_git does, after
    # move_refs ran: the branch and HEAD were moved, yet the one line says
    # the work "could not be brought back" and is "kept" (the index and a
    # merge's state are not applied). What the user is told is false.
    box.init_repo()
    before = box.ok("git rev-parse HEAD").stdout.strip()
    result = agent(box, "%s && echo b > g && git add g && git stash -q && "
                   "printf '%%s %%s A <a@x> 1 +0000\\tx\\000y\\n' %s $(git rev-parse refs/stash) "
                   "> .git/logs/refs/stash" % (COMMIT, "0" * 40))
    assert result.returncode == 0, result.stderr
    after = box.ok("git rev-parse HEAD").stdout.strip()
    said = [line for line in warnings(result) if "could not be brought back" in line]
    assert not (said and after != before), \
        "HEAD moved (%s -> %s), yet: %s" % (before[:12], after[:12], said)
