"""Agents side by side, against the real engine: profiles (image lines of
their own), pi-branch, pi-worktree, and sessions that join a running run."""

import json
import os
import re
import signal

import pytest
from conftest import docker, make_sandbox, wait_until

import pi_agent


def tags(box):
    return box.images()


def in_project(path, name):
    return os.path.exists(os.path.join(path, name))


# --- profiles -------------------------------------------------------------------

def test_two_profiles_run_at_once_and_each_keeps_its_own_changes(box):
    box.ok("pi-branch a && pi-branch b")
    other = box.mkdir(os.path.join(os.path.dirname(box.project), "other"))
    # Each run waits, inside, for a file the test writes only once both run.
    wait_go = "touch ready; while [ ! -e go ]; do sleep 0.1; done"
    first = box.background("pi-exec --profile a sh -c 'touch ~/from-a; %s'" % wait_go)
    second = box.background("cd %s && pi-exec --profile b sh -c 'touch ~/from-b; %s'"
                            % (other, wait_go))
    assert wait_until(lambda: in_project(box.project, "ready") and in_project(other, "ready"),
                      timeout=60), "both run at the same time: %s %s" % (
        first.stderr.read() if first.poll() is not None else "",
        second.stderr.read() if second.poll() is not None else "")
    for path in (box.project, other):
        open(os.path.join(path, "go"), "w").close()
    assert first.wait(timeout=60) == 0 and second.wait(timeout=60) == 0
    box.ok("pi-exec --profile a sh -c 'test -e ~/from-a && test ! -e ~/from-b'")
    box.ok("pi-exec --profile b sh -c 'test -e ~/from-b && test ! -e ~/from-a'")
    assert not any(tag.startswith("snap-") or tag == "current" for tag in tags(box)), \
        "the default line is apart"
    images = tags(box)
    assert any(tag.startswith("a-snap-") for tag in images)
    assert any(tag.startswith("b-snap-") for tag in images)
    # Rolling back one profile leaves the others alone.
    box.ok("pi-rollback --profile a")
    box.ok("pi-exec --profile a test ! -e ~/from-a")
    assert tags(box)["b-current"] == images["b-current"]


def test_two_users_of_one_engine_never_touch_each_others_images_or_runs(
        request, engine, install_dir, box):
    """Two ordinary users, at once: each on a line of their own (the
    default: a repository each), and the second even when pointed at the
    first one's repository: their commands neither use nor change what is
    the first one's, and never stop its running container."""
    other = make_sandbox(request, install_dir, "user2", "bash")
    assert other.user.uid != box.user.uid
    with box.running("pi-exec sh -c 'touch ~/from-a ready; "
                     "while [ ! -e go ]; do sleep 0.1; done'") as first:
        assert wait_until(lambda: in_project(box.project, "ready"), timeout=60)
        container = box.live_run_name()
        other.ok("pi-exec touch ~/from-b")  # on its own line, at the same time
        assert "removed 2 images" in other.ok("pi-clean-orphans --yes && "
                                              "pi-reset-all --yes").stderr
        shared = {"PI_AGENT_IMAGE_REPO": box.repo}
        refused = other.sh("pi-exec true", env=shared)
        assert refused.returncode == 3 and refused.stderr.count("\n") == 1, refused.stderr
        assert "UID %d" % box.user.uid in refused.stderr
        assert "PI_AGENT_IMAGE_REPO=" in refused.stderr
        assert other.ok("pi-orphans", env=shared).stdout.startswith("no left-behind")
        for command in ("pi-clean-orphans --yes", "pi-reset-all --yes", "pi-prune 0",
                        "pi-rollback", "pi-flatten", "pi-rebuild-base", "pi-recover",
                        "pi-reset-system"):
            assert other.sh(command, env=shared).returncode == 3, command
        state = docker("inspect", "--format", "{{.State.Running}}", container).stdout
        assert state.strip() == "true", "the first user's run goes on"
        open(os.path.join(box.project, "go"), "w").close()
        assert first.wait(timeout=60) == 0, first.stderr.read()
    box.ok("pi-exec sh -c 'test -e ~/from-a && test ! -e ~/from-b'")
    assert "current" in box.images() and len(box.snapshots()) == 1


def test_reset_all_base_removes_all_that_is_yours_and_nothing_else(
        request, engine, install_dir, box):
    other = make_sandbox(request, install_dir, "user2", "bash")
    box.ok("pi-exec touch ~/one && pi-branch side && pi-exec --profile side touch ~/two")
    theirs = docker("image", "inspect", "--format", "{{.Id}}", other.repo + ":base").stdout
    docker("tag", other.repo + ":base", box.repo + ":theirs")  # another UID's, in the repository
    with other.running("pi-exec sh -c 'touch ready; while [ ! -e go ]; do sleep 0.1; done'"):
        assert wait_until(lambda: in_project(other.project, "ready"), timeout=60)
        asked = box.sh("pi-reset-all --base </dev/null")
        assert asked.returncode == 3 and "everything of yours in %s" % box.repo in asked.stderr
        assert "base" in box.images()
        done = box.ok("pi-reset-all --base --yes")
        assert "images of other users stay (1 image)" in done.stderr, done.stderr
        assert [row.split()[0] for row in docker(
            "image", "ls", box.repo, "--format", "{{.Tag}} {{.ID}}").stdout.splitlines()] == \
            ["theirs"] and theirs.strip()
        assert not os.path.exists(box.state_dir), "its state too"
        assert other.live_run()[0], "the other user's run goes on"
        open(os.path.join(other.project, "go"), "w").close()


def test_one_profile_keeps_its_lock_and_says_how_to_run_beside_it(box):
    other = box.mkdir(os.path.join(os.path.dirname(box.project), "other"))
    with box.running("pi-exec sh -c 'touch ready; while [ ! -e go ]; do sleep 0.1; done'"):
        assert wait_until(lambda: in_project(box.project, "ready"), timeout=60)
        busy = box.sh("pi-exec true", cwd=other)
        assert busy.returncode == 5
        assert "pi-branch" in busy.stderr and "pi-worktree" in busy.stderr
        assert busy.stderr.count("\n") == 1
    box.wait_saved()  # (else the next command says first that it waits for this save)
    box.ok("pi-branch b")
    with box.running("pi-exec --profile b sh -c 'touch ready2; "
                     "while [ ! -e go2 ]; do sleep 0.1; done'"):
        assert wait_until(lambda: in_project(box.project, "ready2"), timeout=60)
        busy = box.sh("pi-shell </dev/null")  # where a run of another profile is
        assert busy.returncode == 5 and busy.stderr.count("\n") == 1
        assert "pi-shell --profile b joins it" in busy.stderr, busy.stderr


def test_a_profile_must_be_made_first_and_names_are_checked(box):
    result = box.sh("pi-exec --profile typo true")
    assert result.returncode == 4 and "pi-branch typo" in result.stderr
    assert "typo-current" not in tags(box), "a misspelled profile starts nothing"
    for bad in ("Upper", "snap-x", "base", "a..b", "x.lock", "-x", "a" * 41):
        result = box.sh("pi-exec --profile=%s true" % bad)
        assert result.returncode == 2 and "--profile" in result.stderr, bad
        assert box.sh("pi-branch -- %s" % bad).returncode in (2, 3), bad
    result = box.sh("pi-exec true", env={"PI_AGENT_PROFILE": "Bad"})
    assert result.returncode == 9 and "PI_AGENT_PROFILE" in result.stderr
    assert box.sh("pi-branch default").returncode == 2
    assert box.sh("pi-branch --delete default --yes").returncode == 3


@pytest.mark.long
def test_pi_branch_copies_a_snapshot_as_a_tag_and_lists_and_deletes(box):
    box.ok("pi-exec touch ~/one")
    box.ok("pi-exec touch ~/two")
    snaps = box.snapshots()
    older = snaps[-1]  # kept at the start of the second run: ~/one, not ~/two
    box.ok("pi-branch old --from %s" % older)
    images = tags(box)
    assert images["old-current"] == images[older], "a tag of the snapshot's image"
    box.ok("pi-exec --profile old sh -c 'test -e ~/one && test ! -e ~/two'")
    box.ok("pi-branch fresh --from base && pi-branch copy --from old")
    listing = box.ok("pi-branch").stdout
    for name in ("default", "old", "fresh", "copy"):
        assert re.search(r"^\*?\s+%s\s+%s:" % (name, box.repo), listing, re.M), listing
    listed = {entry["profile"]: entry for entry in json.loads(box.ok("pi-branch --json").stdout)}
    assert sorted(listed) == ["copy", "default", "fresh", "old"] and listed["default"]["in_use"]
    assert listed["old"]["current"] == box.repo + ":old-current"
    assert listed["old"]["id"].startswith("sha256:" + images["old-current"])
    assert listed["default"]["snapshots"] == 2 and listed["old"]["snapshots"] == 0
    images = tags(box)
    assert images["fresh-current"] == images["base"]
    assert images["copy-current"] == images["old-current"]
    assert box.sh("pi-branch old").returncode == 3, "a profile is never overwritten"
    # Completion: profiles after --profile and --delete (not default there), and
    # snapshots and base after --from.
    words = lambda *argv: box.ok("_pi_agent_candidates %s" % " ".join(argv)).stdout.split()  # noqa
    assert {"default", "old", "fresh", "copy"} <= set(words("pi", "--profile"))
    assert "old" in words("pi-branch", "--delete") and "default" not in words("pi-branch",
                                                                              "--delete")
    assert {"base", "old", older} <= set(words("pi-branch", "--from"))
    refused = box.sh("pi-branch --delete old", input="")
    assert refused.returncode == 3 and "old-current" in tags(box)
    box.ok("pi-branch --delete old --yes")
    images = tags(box)
    assert not any(tag.startswith("old-") for tag in images)
    assert images["copy-current"] and images["current"], "the others stay"
    assert box.sh("pi-exec --profile old true").returncode == 4


def test_projects_nested_in_one_another_take_turns_whatever_the_profile(box):
    """An agent in the outer project swaps the inner one for a link to a
    victim directory while a run of another profile starts there: that run
    is refused every time (the engine would mount what the link points at)."""
    box.ok("pi-branch b")
    inner = box.mkdir(os.path.join(box.project, "inner"))
    victim = box.mkdir(os.path.join(os.path.dirname(box.project), "victim"))
    # It swaps from go (the attempts begin) to stop (they are over).
    swap = ("touch ready; while [ ! -e go ]; do sleep 0.1; done; "
            "while [ ! -e stop ]; do mv inner held && ln -s %s inner; "
            "sleep 0.01; rm inner && mv held inner; done; touch swapped" % victim)
    with box.running("pi-exec --here sh -c '%s'" % swap) as outer:
        assert wait_until(lambda: in_project(box.project, "ready"), timeout=60)
        attempts = box.sh("touch ../go; for i in 1 2 3 4; do pi-exec --profile b sh -c "
                          "'echo pwned >> marker'; echo rc=$?; sleep 0.3; done; touch ../stop",
                          cwd=inner, timeout=120)
        assert attempts.stdout.split() == ["rc=5"] * 4, attempts.stderr
        assert "overlaps" in attempts.stderr and "take turns" in attempts.stderr
        assert outer.wait(timeout=60) == 0
        assert in_project(box.project, "swapped")
    assert os.listdir(victim) == [], "nothing reached the victim"
    # And the other way round: the inner project runs, the outer one waits its turn.
    with box.running("cd %s && pi-exec --profile b sh -c 'touch ready; "
                     "while [ ! -e go ]; do sleep 0.1; done'" % inner):
        assert wait_until(lambda: in_project(inner, "ready"), timeout=60)
        around = box.sh("pi-exec --here true")
        assert around.returncode == 5 and "overlaps" in around.stderr


def test_a_worktree_whose_repository_is_in_another_runs_reach_waits_its_turn(box):
    """The repository of a worktree lies inside the project of a live run
    (of another profile): its agent could swap it for one with hooks that
    host git would run when the worktree run's commits come back."""
    box.ok("pi-branch b")
    outer = box.mkdir(os.path.join(os.path.dirname(box.project), "outer"))
    repo = box.mkdir(os.path.join(outer, "repo"))
    box.init_repo(repo)
    worktree = os.path.join(os.path.dirname(box.project), "wt")
    box.ok("git worktree add -q %s" % worktree, cwd=repo)
    hold = "touch ready; while [ ! -e go ]; do sleep 0.1; done"
    with box.running("cd %s && pi-exec --here sh -c '%s'" % (outer, hold)):
        assert wait_until(lambda: in_project(outer, "ready"), timeout=60)
        busy = box.sh("pi-exec --profile b true", cwd=worktree)
        assert busy.returncode == 5 and "overlaps" in busy.stderr and repo in busy.stderr
    box.wait_saved()  # (its saver holds the project until it hears the run's end)
    with box.running("cd %s && pi-exec --profile b sh -c '%s'" % (worktree, hold)):
        assert wait_until(lambda: in_project(worktree, "ready"), timeout=60)
        busy = box.sh("pi-exec --here true", cwd=outer)
        assert busy.returncode == 5 and "overlaps" in busy.stderr


def test_hooks_an_agent_swaps_in_below_the_project_never_run_on_the_host(box):
    """core.hooksPath in a subdirectory: its parent can be renamed during a
    run, and the agent makes hooks of its own there. pi-agent's host git
    (pi-worktree) runs none of them, and, while they are swapped, does not
    touch the repository: the agent's commit is kept aside, as data."""
    box.init_repo()
    box.ok("mkdir -p tools/githooks && git config core.hooksPath tools/githooks")
    marker = os.path.join(os.path.dirname(box.project), "hook-ran-on-the-host")
    hook = "#!/bin/sh\ntouch %s 2>/dev/null\nexit 0\n" % marker
    plant = ("mv tools tools.x && mkdir -p tools/githooks && for h in reference-transaction "
             "post-checkout post-commit post-index-change; do printf '%s' > tools/githooks/$h; "
             "chmod +x tools/githooks/$h; done && touch ready && "
             "while [ ! -e go ]; do sleep 0.1; done && git commit -q --allow-empty -m agent"
             % hook)
    with box.running("pi-exec sh -c %s" % pi_agent.shlex.quote(plant)) as run:
        assert wait_until(lambda: in_project(box.project, "ready"), timeout=60)
        worktree = box.sh("pi-worktree w1 -- -c true", env={"PI_AGENT_COMMAND": "sh"})
        assert worktree.returncode == 5 and "overlaps" in worktree.stderr
        assert not os.path.exists(box.project + "-w1")
        open(os.path.join(box.project, "go"), "w").close()
        assert run.wait(timeout=60) == 0
    assert "agent" not in box.ok("git log --format=%s -1").stdout, "kept aside, not applied"
    assert os.listdir(os.path.join(box.state_dir, "kept")), "the agent's git work is kept"
    assert not os.path.exists(marker), "no hook of the agent's ran on the host"


# --- worktrees -----------------------------------------------------------------

def test_pi_worktree_runs_an_agent_whose_commits_reach_the_main_repository(box):
    box.init_repo()
    box.extra_env = {"PI_AGENT_COMMAND": "sh"}
    main_git = os.path.join(box.project, ".git")
    config_before = open(os.path.join(main_git, "config"), "rb").read()
    worktree = box.project + "-fix"
    # The agent commits, then tries to reach the main repository's git
    # directory: by its host path, by the worktree's .git file, and through
    # the objects it can read.
    attack = ("echo x > f && git add f && git commit -q -m 'from the worktree' && "
              "{ echo evil > %s/hooks/post-checkout; "
              "echo evil > \"$(git rev-parse --git-common-dir)/hooks/post-merge\"; "
              "git config core.hooksPath /tmp/hooks; "
              "touch /dev/pi-agent/objects/evil; "
              "printf 'gitdir: %s\\n' > .git; true; } 2>/dev/null"
              % (main_git, main_git))
    # Beside an agent at work in the main work tree: the point of a worktree.
    main_run = box.background("pi-exec sh -c 'touch ready; while [ ! -e go ]; do sleep 0.1; "
                              "done'")
    try:
        assert wait_until(lambda: in_project(box.project, "ready"), timeout=60)
        result = box.ok("pi-worktree fix -- -c %s" % pi_agent.shlex.quote(attack))
    finally:
        open(os.path.join(box.project, "go"), "w").close()
        assert main_run.wait(timeout=60) == 0
    assert "made the worktree %s" % worktree in result.stderr
    log = box.ok("git log --format=%s agent/fix").stdout
    assert log.splitlines()[0] == "from the worktree", "the commit is the main repository's"
    assert box.ok("git -C %s status --porcelain" % worktree).stdout == ""
    assert not os.path.exists(os.path.join(main_git, "hooks", "post-checkout"))
    assert not os.path.exists(os.path.join(main_git, "hooks", "post-merge"))
    assert not os.path.exists(os.path.join(main_git, "objects", "evil"))
    assert open(os.path.join(main_git, "config"), "rb").read() == config_before + \
        b'[branch "agent/fix"]\n\tpiAgentWorktree = true\n', "only pi-worktree's own mark"
    assert open(os.path.join(worktree, ".git")).read().startswith("gitdir: %s/worktrees/"
                                                                   % main_git)
    assert "fix-current" in tags(box), "the worktree's own profile"
    # Again: the same worktree and profile.
    box.ok("pi-worktree fix -- -c 'test -e f'")
    # Removal refuses uncommitted work, and keeps the profile unless asked.
    open(os.path.join(worktree, "scratch"), "w").close()
    refused = box.sh("pi-worktree --remove fix", input="")
    assert refused.returncode == 3 and os.path.isdir(worktree)
    os.remove(os.path.join(worktree, "scratch"))
    removed = box.ok("pi-worktree --remove fix", input="")
    assert not os.path.exists(worktree) and "kept the profile fix" in removed.stderr
    assert "from the worktree" in box.ok("git log --format=%s agent/fix").stdout
    box.ok("pi-branch --delete fix --yes")


def test_pi_worktree_does_not_check_out_a_branch_an_agent_made(box):
    box.init_repo()
    box.ok("pi-exec sh -c 'git checkout -q -b agent/evil && echo x > evil && git add evil && "
           "git commit -q -m evil && git checkout -q -'")
    assert "evil" in box.ok("git log --format=%s agent/evil").stdout
    refused = box.sh("pi-worktree evil -- -c true", env={"PI_AGENT_COMMAND": "sh"})
    assert refused.returncode == 3 and "did not make it" in refused.stderr
    assert not os.path.exists(box.project + "-evil")
    assert "evil-current" not in tags(box), "nothing made"
    box.ok("git config branch.agent/evil.piAgentWorktree true")
    box.ok("pi-worktree evil -- -c 'test -e evil'", env={"PI_AGENT_COMMAND": "sh"})


# --- joining a running session --------------------------------------------------

@pytest.mark.long
def test_pi_shell_joins_a_running_run_and_the_container_is_saved_once(box):
    box.ok("pi-exec true")
    before = box.snapshots()
    with box.running("pi-exec sh -c 'hostname > main-host; echo $$ > main-pid; touch ready; "
                     "while [ ! -e go ]; do sleep 0.1; done; touch ~/from-main main-done'"
                     ) as run:
        assert wait_until(lambda: in_project(box.project, "ready"), timeout=60)
        # The session outlives the run's command: it is still at work when
        # the command has ended (its process gone), and what it does then
        # is saved too.
        joined = box.ok("pi-shell", input="hostname > join-host; touch go; "
                        "while [ ! -e main-done ]; do sleep 0.1; done; "
                        "while kill -0 $(cat main-pid) 2>/dev/null; do sleep 0.1; done; "
                        "touch ~/from-join; exit 0\n", timeout=120)
        assert "joining" in joined.stderr
        assert run.wait(timeout=60) == 0
    assert len(box.snapshots()) == len(before) + 1, "one save for both"
    host = lambda name: open(os.path.join(box.project, name)).read()  # noqa: E731
    assert host("main-host") == host("join-host"), "one container"
    box.ok("pi-exec sh -c 'test -e ~/from-main && test -e ~/from-join'")
    # pi joins the agent's run too, with the agent command, but not with a
    # key the run does not have.
    with box.running("PI_AGENT_COMMAND=sh OPENAI_API_KEY=sk-run pi -- -c 'touch ready2; "
                     "while [ ! -e go2 ]; do sleep 0.1; done'") as run:
        assert wait_until(lambda: in_project(box.project, "ready2"), timeout=60)
        other = box.sh("pi -- -c 'touch go2'", env={"PI_AGENT_COMMAND": "sh",
                                                    "OPENAI_API_KEY": "sk-another"})
        assert other.returncode == 5 and "OPENAI_API_KEY" in other.stderr
        assert not in_project(box.project, "go2")
        box.extra_env = {"OPENAI_API_KEY": "sk-run"}
        agent = box.ok("pi -- -c 'hostname; touch go2'", env={"PI_AGENT_COMMAND": "sh"})
        assert "joining" in agent.stderr
        box.extra_env = {}
        assert run.wait(timeout=60) == 0
    # pi-exec keeps the lock's rules (a script's command waits or fails).
    with box.running("pi-exec sh -c 'touch ready3; while [ ! -e go3 ]; do sleep 0.1; done'"):
        assert wait_until(lambda: in_project(box.project, "ready3"), timeout=60)
        busy = box.sh("pi-exec true")
        assert busy.returncode == 5 and "pi-shell" in busy.stderr
        # Not onto another network, and the agent (with its keys) only into the agent's run.
        for other in ("pi-shell --offline", "PI_AGENT_NETWORK=none pi-shell"):
            offline = box.sh(other, input="touch joined-offline\n")
            assert offline.returncode == 5 and "network" in offline.stderr
        key = box.sh("pi -- -c 'touch joined-agent'",
                     env={"PI_AGENT_COMMAND": "sh", "OPENAI_API_KEY": "sk-joiner-test"})
        assert key.returncode == 5  # (pi only into the agent's run)
        assert not in_project(box.project, "joined-offline")
        assert not in_project(box.project, "joined-agent")
        assert not any(name.startswith("join-") for name in os.listdir(
            os.path.join(box.state_dir, "run", box.live_run_name())))


def test_an_agent_cannot_fake_a_joined_session_to_keep_its_container(box):
    """It can hold the run's join lock and leave a process behind: the
    run still ends (a few seconds later), saying nothing of sessions."""
    run = box.sh("pi-exec sh -c 'setsid flock -s /dev/pi-agent/join sh -c \"touch /tmp/held; "
                 "exec sleep infinity\" & while [ ! -e /tmp/held ]; do sleep 0.1; done; "
                 "touch /dev/pi-agent/join-x 2>/dev/null; true'",
                 timeout=60)
    assert run.returncode == 0
    assert "joined" not in run.stderr
    box.wait_saved()
    assert box.containers() == []


def test_a_joined_session_does_not_keep_the_container_from_being_stopped(box):
    run = box.background("pi-exec sh -c 'touch ready; while [ ! -e go ]; do sleep 0.1; done'")
    assert wait_until(lambda: in_project(box.project, "ready"), timeout=60)
    joined = box.background("echo 'touch in-join; while [ ! -e go ]; do sleep 0.1; done' "
                            "| pi-shell")
    assert wait_until(lambda: in_project(box.project, "in-join"), timeout=60)
    os.kill(box.wrapper_pid(), signal.SIGTERM)
    assert run.wait(timeout=60) == 128 + signal.SIGTERM
    joined.wait(timeout=60)
    box.wait_saved()
    assert box.containers() == [], "the run ended, and its sessions with it"
    assert docker("ps", "-q", "--filter", "label=pi-agent.repo=" + box.repo).stdout == ""


def test_pi_status_and_snapshots_speak_of_the_profile_in_use(box):
    box.ok("pi-branch p")
    box.extra_env = {"PI_AGENT_PROFILE": "p"}
    box.ok("pi-exec touch ~/x")
    assert "%s:p-current" % box.repo in box.ok("pi-status").stdout
    snaps = box.ok("pi-snapshots").stdout
    assert "snap-" in snaps and "p-snap" not in snaps
