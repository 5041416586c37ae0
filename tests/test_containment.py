"""Containment, tried as a hostile agent would, against the real engine and
as an ordinary host user: each test plants its attack from inside a run (or,
where a run can no longer plant it, as an earlier version let it), then the
next run, or the host's own git, must not mount it, run it or be fooled by
it. A marker file outside the project must not appear; a canary the host
user alone can read must not be readable inside."""

import os
import re
import shutil
import signal
import socket
import stat
import subprocess

import pytest

from conftest import docker, wait_until
from test_recovery import start_and_wait_for


def marker(box):
    """A file outside the project that planted code would create."""
    return os.path.join(os.path.dirname(box.project), "pwned")


def host_git(box, command, cwd=None):
    """The host user's own git, as a shell prompt or an editor runs it."""
    return box.sh("git " + command, cwd=cwd)


def canary(box, where):
    """A directory with a secret only the host user can read."""
    path = box.mkdir(where)
    with open(os.path.join(path, "secret"), "w") as handle:
        handle.write("CANARY-7f3a")
    box.chown(path)
    os.chmod(path, 0o700)
    return path


def agent(box, script, **kwargs):
    """What the agent does in a run: a shell script, given on stdin."""
    return box.sh("pi-exec sh -s", input=script, **kwargs)


def warnings(result):
    return [line for line in result.stderr.splitlines() if line.startswith("pi-agent:")]


# --- 1. no host path is mounted because a file in the project said so -------

@pytest.mark.parametrize("gitdir", ["/run", "canary"])
def test_a_gitdir_file_never_chooses_a_mount(box, gitdir):
    secret = canary(box, os.path.join(box.home, "private"))
    named = secret if gitdir == "canary" else gitdir
    # Inside, .git is the run's own directory: the agent cannot even write it.
    assert agent(box, "printf 'gitdir: %s\\n' > .git" % named).returncode != 0
    # As an earlier version let it: the file is there when the next run starts.
    with open(os.path.join(box.project, ".git"), "w") as handle:
        handle.write("gitdir: %s\n" % named)
    result = agent(box, "ls /run/docker.sock; cat %s/secret; echo ===; "
                        "cat /proc/self/mountinfo" % secret)
    shown, mountinfo = result.stdout.split("===")
    assert "CANARY-7f3a" not in shown and "docker.sock" not in shown
    assert named not in [line.split()[4] for line in mountinfo.strip().splitlines()]
    assert "ignoring %s/.git" % box.project in result.stderr


def test_a_gitdir_file_in_a_subdirectory_never_chooses_the_target(box):
    box.init_repo()
    ssh = canary(box, os.path.join(box.home, ".ssh"))
    planted = agent(box, "mkdir -p lib && printf 'gitdir: %s\\n' > lib/.git" % ssh)
    assert "disabled lib/.git" in planted.stderr, "the run that wrote it disarms it"
    lib = os.path.join(box.project, "lib")
    with open(os.path.join(lib, ".git"), "w") as handle:  # and planted as before
        handle.write("gitdir: %s\n" % ssh)
    result = agent(box, "pwd; cat %s/secret" % ssh, cwd=lib)
    assert result.stdout.split()[0] == lib and "CANARY-7f3a" not in result.stdout
    assert "ignoring %s/.git" % lib in result.stderr


# --- 2. host git never reads what the agent wrote ----------------------------

def test_the_private_git_dir_cannot_be_swapped_and_nothing_reaches_host_git(box):
    box.init_repo()
    config = open(os.path.join(box.project, ".git", "config")).read()
    agent(box, """
        mv .git .o && mkdir .git && cp -a .o/. .git/
        git config core.fsmonitor 'touch {m}'
        printf '#!/bin/sh\\ntouch {m}\\n' > .git/hooks/pre-commit
        chmod +x .git/hooks/pre-commit
        echo c > .git/commondir
        mkdir -p c && cp -r .git/objects .git/refs .git/HEAD c/
        printf '[core]\\n\\tfsmonitor = "touch {m}"\\n' > c/config
        """.format(m=marker(box)))
    assert box.sh("pi-exec mv .git .o").returncode != 0, "its mount point cannot be renamed"
    assert open(os.path.join(box.project, ".git", "config")).read() == config
    assert not os.path.exists(os.path.join(box.project, ".git", "commondir"))
    assert not os.path.exists(os.path.join(box.project, ".git", "hooks", "pre-commit"))
    host_git(box, "status")
    host_git(box, "-c user.name=H -c user.email=h@x commit -q --allow-empty -m host")
    host_git(box, "status", cwd=os.path.join(box.project, "c"))
    assert not os.path.exists(marker(box))


def test_a_repository_the_agent_makes_inside_is_disarmed(box):
    box.init_repo()
    result = agent(box, """
        mkdir sub && cd sub && git init -q && git config core.fsmonitor 'touch {m}' && cd ..
        git init -q --bare trap && git -C trap config core.bare false
        git -C trap config core.worktree .. && git -C trap config core.fsmonitor 'touch {m}'
        """.format(m=marker(box)))
    assert "disabled sub/.git" in result.stderr and "disabled trap" in result.stderr
    for where in ("sub", "trap"):
        host_git(box, "status", cwd=os.path.join(box.project, where))
    assert not os.path.exists(marker(box))


def test_a_repository_already_inside_is_read_only_and_cannot_be_swapped(box):
    box.init_repo()
    lib = box.mkdir(os.path.join(box.project, "vendor", "lib"))
    box.init_repo(lib)
    write = agent(box, "git -C vendor/lib config core.fsmonitor 'touch %s'" % marker(box))
    assert write.returncode != 0, "read-only inside"
    assert box.ok("pi-exec git -C vendor/lib log --format=%s").stdout == "first\n"
    swap = agent(box, """
        mv vendor vendor2 && mkdir -p vendor/lib && cp -a vendor2/lib/.git vendor/lib/
        git -C vendor/lib config core.fsmonitor 'touch {m}'
        """.format(m=marker(box)))
    assert "disabled vendor/lib/.git" in swap.stderr
    host_git(box, "status", cwd=os.path.join(box.project, "vendor", "lib"))
    host_git(box, "status", cwd=os.path.join(box.project, "vendor2", "lib"))
    assert not os.path.exists(marker(box))


def test_submodules_work_inside_read_only_and_their_git_dirs_stay_the_hosts(box):
    upstream = box.mkdir(os.path.join(os.path.dirname(box.project), "upstream"))
    box.init_repo(upstream)
    box.ok("echo u > file && git add file && git -c user.name=U -c user.email=u@x commit -qm u",
           cwd=upstream)
    box.init_repo()
    box.ok("git -c protocol.file.allow=always submodule add -q %s sub && "
           "git -c user.name=H -c user.email=h@x commit -qm sub" % upstream)
    modules = os.path.join(box.project, ".git", "modules", "sub")
    config = open(os.path.join(modules, "config")).read()
    inside = box.ok("pi-exec sh -c 'cat sub/file; git -C sub log -1 --format=%s; git status "
                    "--short'")
    assert inside.stdout == "u\nu\n"
    attack = agent(box, """
        git -C sub config core.fsmonitor 'touch {m}' || echo refused
        printf x > .git/modules/sub/hooks/post-checkout || echo refused
        """.format(m=marker(box)))
    assert attack.stdout.split() == ["refused", "refused"]
    assert open(os.path.join(modules, "config")).read() == config
    host_git(box, "status")
    host_git(box, "-c protocol.file.allow=always submodule update --init")
    assert not os.path.exists(marker(box))


def included_config(box):
    """The user's repository config includes ../conf/git.cfg, in the
    project (so mounted read-only inside)."""
    box.init_repo()
    box.mkdir(os.path.join(box.project, "conf"))
    with open(os.path.join(box.project, "conf", "git.cfg"), "w") as handle:
        handle.write("[alias]\n\tst = status\n")
    box.chown(box.project)
    box.ok("git config include.path ../conf/git.cfg")


def test_config_files_git_reads_from_the_project_are_read_only(box):
    included_config(box)
    evil = "printf '[core]\\n\\tfsmonitor = touch %s\\n'" % marker(box)
    write = agent(box, evil + " >> conf/git.cfg")
    assert write.returncode != 0 and "Read-only" in write.stderr
    swap = agent(box, "mv conf conf2 && mkdir conf && %s > conf/git.cfg" % evil)
    assert "disabled conf/git.cfg" in swap.stderr
    host_git(box, "status")
    assert not os.path.exists(marker(box))
    # The directory above it made a link to a host file the agent chose:
    # the link is disabled, and the host's file stays where it is.
    box.ok("rm -r conf && mv conf2 conf")
    mine = box.mkdir(os.path.join(box.home, ".config", "git"))
    with open(os.path.join(mine, "git.cfg"), "w") as handle:
        handle.write("[alias]\n\tmine = status\n")
    box.chown(mine)
    out = agent(box, "mv conf conf2 && ln -s %s conf" % mine)
    assert "disabled conf, a symbolic link made during the run" in out.stderr, out.stderr
    assert os.listdir(mine) == ["git.cfg"], "the host's file stays where it is"
    assert not os.path.lexists(os.path.join(box.project, "conf"))
    box.ok("rm conf.pi-agent-untrusted-* && mv conf2 conf")
    box.ok("git config include.path ../conf/missing.cfg")
    missing = box.sh("pi-exec true")
    assert missing.returncode == 3 and "could create it" in missing.stderr


# --- the gate: the agent's git work comes back as data ------------------------

def test_commits_staging_and_a_new_branch_come_back_before_the_prompt(box):
    box.init_repo()
    box.ok("echo one > tracked && git add tracked && "
           "git -c user.name=H -c user.email=h@x commit -qm tracked")
    agent(box, "echo a > a && git add a && git commit -qm agent && git checkout -qb feature "
               "&& echo b > b && git add b && echo two > tracked")
    assert host_git(box, "log --format=%an:%s feature").stdout.split() == [
        "Agent:agent", "H:tracked", "Host:first"]
    assert host_git(box, "symbolic-ref --short HEAD").stdout == "feature\n"
    assert host_git(box, "status --short").stdout.splitlines() == ["A  b", " M tracked"]
    assert host_git(box, "fsck --no-progress").returncode == 0


def test_a_change_hidden_from_git_status_inside_shows_on_the_host(box):
    box.init_repo()
    box.ok("echo one > tracked && git add tracked && "
           "git -c user.name=H -c user.email=h@x commit -qm tracked")
    agent(box, "echo evil > tracked && git update-index --assume-unchanged tracked && "
               "git update-index --skip-worktree tracked && git status --short")
    assert host_git(box, "status --short").stdout == " M tracked\n"


def test_a_branch_the_user_moved_during_the_run_is_not_overwritten(box):
    box.init_repo()
    ready, go = (os.path.join(box.project, name) for name in ("ready", "go"))
    run = box.background("pi-exec sh -c 'git commit -q --allow-empty -m agent && "
                              "touch ready && while [ ! -e go ]; do sleep 0.1; done'")
    assert wait_until(lambda: os.path.exists(ready), timeout=60)
    box.ok("git -c user.name=H -c user.email=h@x commit -q --allow-empty -m host-meanwhile")
    open(go, "w").close()
    box.chown(go)
    _out, err = run.communicate(timeout=60)
    assert run.returncode == 0, err
    branch = host_git(box, "symbolic-ref --short HEAD").stdout.strip()
    assert host_git(box, "log -1 --format=%s").stdout == "host-meanwhile\n"
    kept = host_git(box, "for-each-ref --format='%(refname)' refs/pi-agent/").stdout.split()
    assert len(kept) == 1 and kept[0].endswith("/heads/" + branch)
    assert host_git(box, "log -1 --format=%s " + kept[0]).stdout == "agent\n"
    assert "moved on the host during the run" in err and kept[0] in err


def test_stash_entries_come_back_with_their_list(box):
    box.init_repo()
    box.ok("echo 0 > f && git add f && git -c user.name=H -c user.email=h@x commit -qm f && "
           "echo mine >> f && git stash -q")
    agent(box, "echo a >> f && git stash -q && echo b >> f && git stash -q")
    listing = host_git(box, "stash list --format=%gs").stdout.splitlines()
    assert len(listing) == 3 and listing[-1].startswith("WIP on"), listing
    assert "+b" in host_git(box, "stash show -p stash@{0}").stdout
    assert "+mine" in host_git(box, "stash show -p stash@{2}").stdout


def test_head_never_follows_onto_a_branch_another_worktree_has(box):
    box.init_repo()
    branch = host_git(box, "symbolic-ref --short HEAD").stdout.strip()
    worktree = os.path.join(os.path.dirname(box.project), "wt2")
    box.ok("git worktree add -q %s" % worktree)
    result = agent(box, "git checkout -q %s" % branch, cwd=worktree)
    assert "HEAD stays" in result.stderr
    assert host_git(box, "symbolic-ref --short HEAD", cwd=worktree).stdout.strip() == "wt2"
    box.ok("git switch -q -c elsewhere && git switch -q %s" % branch)  # still possible


def test_a_broken_object_is_refused_on_the_way_in(box):
    box.init_repo()
    before = host_git(box, "rev-parse HEAD").stdout
    result = agent(box, """
        oid=$(printf 'tree 0000000000000000000000000000000000000000\\nauthor nobody\\n\\nbad\\n' |
              git hash-object -t commit --literally -w --stdin)
        git update-ref refs/heads/master $oid && git update-ref refs/heads/main $oid
        """)
    assert "could not be brought back" in result.stderr
    assert host_git(box, "rev-parse HEAD").stdout == before
    assert host_git(box, "fsck --no-progress").returncode == 0


def test_a_new_repository_in_a_plain_project_comes_back_clean(box):
    box.ok("pi-exec true")
    assert not os.path.exists(os.path.join(box.project, ".git")), "no repository, no trace"
    result = agent(box, """
        git init -q && git config core.fsmonitor 'touch {m}'
        printf '#!/bin/sh\\ntouch {m}\\n' > .git/hooks/post-commit
        chmod +x .git/hooks/post-commit
        echo x > x && git add x && git commit -qm first-by-agent
        git remote add origin https://example.com/r.git
        """.format(m=marker(box)))
    assert "agent-config" in result.stderr
    assert host_git(box, "log --format=%an:%s").stdout == "Agent:first-by-agent\n"
    assert "fsmonitor" not in host_git(box, "config --list").stdout
    host_git(box, "status")
    host_git(box, "-c user.name=H -c user.email=h@x commit -q --allow-empty -m host")
    assert not os.path.exists(marker(box))


def test_agent_commits_carry_the_agents_identity(box):
    box.init_repo()
    box.ok("git config user.name 'Host Person' && git config user.email host@example.com")
    box.ok("pi-exec git commit -q --allow-empty -m one")
    box.ok("pi-exec git commit -q --allow-empty -m two",
           env={"PI_AGENT_GIT_IDENTITY": "Review Bot <bot@example.com>"})
    assert host_git(box, "log -2 --format=%an/%ae/%cn/%G?").stdout.splitlines() == [
        "Review Bot/bot@example.com/Review Bot/N", "Agent/agent@pi-agent.invalid/Agent/N"]


def test_a_worktree_works_inside_and_its_repository_stays_the_hosts(box):
    box.init_repo()
    worktree = os.path.join(os.path.dirname(box.project), "wt")
    box.ok("git -c user.email=h@example.com -c user.name=Host worktree add -q %s" % worktree)
    common = os.path.join(box.project, ".git")
    out = agent(box, "echo w > w && git add w && git commit -qm in-worktree && "
                     "git log -1 --format=%%s; ls %s 2>&1" % common, cwd=worktree)
    assert out.stdout.startswith("in-worktree\n") and "No such file" in out.stdout
    assert host_git(box, "log -1 --format=%s wt").stdout == "in-worktree\n"
    assert host_git(box, "status --short", cwd=worktree).stdout == ""


# --- 3. nothing privileged stays in the project -------------------------------

def test_setuid_files_and_root_owned_files_are_given_back(box):
    result = agent(box, """
        sudo cp /bin/sh sh-root && sudo chmod 4755 sh-root
        cp /bin/sh mine && chmod 6755 mine
        sudo mkdir -m 700 rootdir && sudo cp /bin/sh rootdir/inner
        sudo chmod 4755 rootdir/inner
        """)
    for name in ("sh-root", "mine", "rootdir", os.path.join("rootdir", "inner")):
        info = os.lstat(os.path.join(box.project, name))
        assert info.st_uid == box.user.uid, name
        assert not info.st_mode & (stat.S_ISUID | stat.S_ISGID), name
    said = "\n".join(warnings(result))
    assert "sh-root" in said and "mine" in said and "rootdir" in said
    box.ok("rm -rf rootdir sh-root mine")  # the host user can remove them again


def test_device_nodes_and_file_capabilities_cannot_be_made(box):
    result = agent(box, """
        sudo mknod kmsg c 1 11 || echo no-mknod
        cp /bin/ls capls
        sudo python3 -c "import os; os.setxattr('capls', 'security.capability', \\
            bytes.fromhex('0100000280000000000000000000000000000000'))" || echo no-setcap
        """)
    assert "no-mknod" in result.stdout and "no-setcap" in result.stdout
    assert not os.path.exists(os.path.join(box.project, "kmsg"))
    with pytest.raises(OSError):
        os.getxattr(os.path.join(box.project, "capls"), "security.capability")


def test_nothing_the_agent_does_makes_the_sweep_miss(box):
    """One run, every way found to slip past the sweep: a ref name that is
    not UTF-8 (once crashed the hand-back before the sweep), setuid through
    a hard link since removed, the project root taken by root, a directory
    the user cannot read, the name a disabled HEAD would get taken first,
    a gitlink that makes the top-level git status look into a repository."""
    box.init_repo()
    box.ok("cp /bin/true tool && git add tool && git -c user.name=H -c user.email=h@x "
           "commit -qm tool")
    m = marker(box)
    result = agent(box, """
        printf '%s\\n' "$(git rev-parse HEAD)" > ".git/refs/heads/$(printf '\\377')"
        ln tool tmp && sudo chown root:root tmp && sudo chmod 4755 tmp && rm -f tmp
        mkdir d && sudo cp /bin/sh d/rootsh && sudo chmod 4755 d/rootsh
        git init -q d/sub && git -C d/sub config core.fsmonitor 'touch {m}; false'
        chmod 111 d
        git init -q sub && git -C sub config core.fsmonitor 'touch {m}; false'
        mkdir sub/.git/HEAD.pi-agent-untrusted
        git -C sub commit -q --allow-empty -m x && git add sub
        sudo chown root:root .
        """.format(m=m))
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    for name in ("tool", "d/rootsh"):
        info = os.lstat(os.path.join(box.project, name))
        assert info.st_uid == box.user.uid and not info.st_mode & stat.S_ISUID, name
    assert os.stat(box.project).st_uid == box.user.uid
    host_git(box, "status")
    for where in ("sub", "d/sub"):
        host_git(box, "status", cwd=os.path.join(box.project, where))
    assert not os.path.exists(m)


def test_a_directory_swapped_for_a_link_never_leads_the_sweep_outside(box):
    """The agent plants what the sweep acts on (a HEAD, a .git file, a
    setuid file) in directories the watch knows, then replaces them with
    links to the host's repositories and files: the sweep acts inside the
    project only."""
    victim = box.mkdir(os.path.join(box.home, "victim"))
    box.init_repo(victim)
    outside = os.path.join(box.home, "tool")
    shutil.copy("/bin/true", outside)
    os.chmod(outside, 0o4755)
    box.chown(outside)
    os.chmod(outside, 0o4755)
    for name in ("d", "e", "f", "g"):
        box.mkdir(os.path.join(box.project, name))
    box.init_repo()
    for plant in ("touch d/HEAD e/.git f/tool && rm -rf d e f && ln -s {victim}/.git d && "
                  "ln -s {victim} e && ln -s {home} f",
                  "mkdir g/sub && touch g/sub/HEAD && rm -rf g && ln -s {victim} g"):
        result = agent(box, plant.format(victim=victim, home=box.home))
        assert result.returncode == 0, result.stderr
        assert not [line for line in warnings(result) if "disabled" in line]
        box.ok("for x in d e f g; do [ -L $x ] && rm $x; mkdir -p $x; done")
    assert host_git(box, "status", cwd=victim).returncode == 0
    assert os.path.exists(os.path.join(victim, ".git", "HEAD"))
    assert not [name for name in os.listdir(victim) + os.listdir(os.path.join(victim, ".git"))
                if "untrusted" in name]
    assert os.stat(outside).st_mode & stat.S_ISUID, "a file outside keeps its mode"


def test_many_privileged_files_are_all_given_back(box):
    result = agent(box, """
        sudo python3 -c "import os; [open('%0200d' % i, 'w').close() for i in range(15000)]"
        sudo cp /bin/sh rootsh && sudo chmod 4755 rootsh
        """)
    assert "Traceback" not in result.stderr
    assert not os.lstat(os.path.join(box.project, "rootsh")).st_mode & stat.S_ISUID
    assert {os.lstat(os.path.join(box.project, name)).st_uid
            for name in os.listdir(box.project)} == {box.user.uid}


def test_a_planted_repository_with_links_reaches_nothing_of_the_host(box):
    ssh = canary(box, os.path.join(box.home, ".ssh"))
    planted = box.mkdir(os.path.join(box.project, "s"))
    box.init_repo(planted)  # as if an earlier run had left it, undisabled
    os.symlink(ssh, os.path.join(planted, ".git", "modules"))
    shutil.rmtree(os.path.join(planted, ".git", "hooks"))
    os.symlink(ssh, os.path.join(planted, ".git", "hooks"))
    result = agent(box, "cat .git/modules/secret .git/hooks/secret; cat /proc/self/mountinfo",
                   cwd=planted)
    assert "CANARY-7f3a" not in result.stdout and ssh not in result.stdout


def test_runs_of_two_image_lines_take_turns_in_one_project(box):
    run = box.background("pi-exec sh -c 'touch started; while [ ! -e go ]; do sleep 0.1; "
                         "done'")
    assert wait_until(lambda: os.path.exists(os.path.join(box.project, "started")), timeout=60)
    other = box.sh("pi-exec true", env={"PI_AGENT_IMAGE_REPO": box.repo + "-other"})
    assert other.returncode == 5 and "%s is in use by pid" % box.project in other.stderr
    open(os.path.join(box.project, "go"), "w").close()
    assert run.wait(timeout=60) == 0
    docker("rmi", "-f", box.repo + "-other:base", check=False)


def test_commits_naming_someone_else_are_named(box):
    box.init_repo()
    result = agent(box, "GIT_COMMITTER_NAME=Host GIT_COMMITTER_EMAIL=h@example.com "
                        "GIT_AUTHOR_NAME=Host GIT_AUTHOR_EMAIL=h@example.com "
                        "git commit -q --allow-empty -m posing")
    assert "someone else as author or committer" in result.stderr
    assert "Host <h@example.com>" in result.stderr


def test_a_ref_that_clashes_costs_that_ref_only(box):
    box.init_repo()
    run = box.background("pi-exec sh -c 'git branch feature && git branch keep && "
                              "touch ready && while [ ! -e go ]; do sleep 0.1; done'")
    assert wait_until(lambda: os.path.exists(os.path.join(box.project, "ready")), timeout=60)
    box.ok("git branch feature/x && touch go")
    _out, err = run.communicate(timeout=60)
    assert "keep" in host_git(box, "branch --format='%(refname:short)'").stdout.split()
    kept = re.search(r"could not move refs/heads/feature \(.*\), so the agent's is kept as "
                     r"(refs/pi-agent/\S+/heads/feature):", err)
    assert kept, err
    assert host_git(box, "rev-parse --verify -q %s" % kept.group(1)).returncode == 0


# --- 4. nothing from the agent's world steers the terminal --------------------

def test_control_characters_in_file_names_reach_no_terminal(box):
    result = agent(box, "mkdir -p .vscode && touch \".vscode/$(printf '\\033[2K\\rinnocent')\"")
    notice = [line for line in warnings(result) if ".vscode" in line]
    assert len(notice) == 1 and "\\x1b[2K\\x0dinnocent" in notice[0]
    assert "\033" not in result.stderr and "\r" not in result.stderr


# --- 5. no host socket reaches the container -----------------------------------

@pytest.mark.parametrize("where", ["/tmp", "/dev/shm", "/run"])
def test_shared_system_directories_are_refused(box, where):
    result = box.sh("pi-exec true", cwd=where)
    assert result.returncode == 3 and result.stderr.count("\n") == 1
    assert box.containers() == [] and "current" not in box.images()


def test_a_project_holding_a_socket_is_refused(box):
    path = os.path.join(box.project, "tmp", "server.sock")
    os.makedirs(os.path.dirname(path))
    server = socket.socket(socket.AF_UNIX)
    server.bind(path)
    try:
        result = box.sh("pi-exec true")
        assert result.returncode == 3 and "tmp/server.sock" in result.stderr
        assert box.containers() == [] and "current" not in box.images()
    finally:
        server.close()


# --- 6. safety options are never mistaken ---------------------------------------

@pytest.mark.parametrize("typo,meant", [("--ofline", "--offline"), ("--wiat", "--wait"),
                                        ("--hre", "--here"), ("\u2014offline", "--offline")])
def test_a_near_miss_of_a_wrapper_option_is_an_error(box, typo, meant):
    result = box.sh("pi %s -p hello" % typo)
    assert result.returncode == 2 and "did you mean %s?" % meant in result.stderr
    assert box.containers() == [] and "current" not in box.images()


# --- 8. secrets do not outlive the run -----------------------------------------

def test_state_is_private_and_discarded_leftovers_take_their_secrets(box):
    secret = "sk-canary-2b9d"
    box.extra_env = {"API_TOKEN": secret, "PI_AGENT_PASS_ENV": "API_TOKEN"}
    run = start_and_wait_for(box, "/usr/local/left")
    state = box.state_dir
    assert stat.S_IMODE(os.stat(state).st_mode) == 0o700
    for name in os.listdir(state):
        if name.endswith((".json", ".log", ".lock")):
            assert stat.S_IMODE(os.stat(os.path.join(state, name)).st_mode) == 0o600, name
    os.kill(box.holder()["saver_pid"], signal.SIGKILL)  # before it hears the wrapper end
    os.kill(box.wrapper_pid(), signal.SIGKILL)
    run.wait(timeout=60)
    assert subprocess.run(["grep", "-rlq", secret, state]).returncode == 0, "left behind"
    box.ok("pi-clean-orphans --yes")
    assert box.containers() == []
    assert subprocess.run(["grep", "-rlq", secret, state]).returncode == 1, \
        "no file in the state directory holds the secret any more"
    assert os.listdir(os.path.join(state, "run")) == []


# --- 5. what comes back is allow-listed; a disarm holds -------------------------

def test_a_planted_repository_whose_old_names_are_taken_is_disarmed(box):
    """Every name an earlier sweep would have set HEAD aside as is taken
    first: the disarm still holds, and the next run mounts nothing of it."""
    box.init_repo()
    m = marker(box)
    result = agent(box, """
        git init -q sub && git -C sub config core.fsmonitor 'touch {m}; false'
        git -C sub commit -q --allow-empty -m x
        mkdir sub/.git/HEAD.pi-agent-untrusted
        for n in $(seq 1 99); do mkdir sub/.git/HEAD.pi-agent-untrusted.$n; done
        """.format(m=m))
    assert result.returncode == 0 and "disabled sub/.git" in result.stderr, result.stderr
    host_git(box, "status", cwd=os.path.join(box.project, "sub"))
    assert not os.path.exists(m)
    mounts = box.ok("pi-exec cat /proc/self/mountinfo").stdout
    assert os.path.join(box.project, "sub") not in mounts, "not mounted as a trusted repository"


def test_the_git_work_kept_aside_is_data_that_runs_nothing(box):
    """The agent makes the import fail (a tree holding .git), and arms its
    git directory's config: what is kept has no HEAD, config or hooks."""
    box.init_repo()
    m = marker(box)
    result = agent(box, """
        tree=$(printf '100644 blob %s\\t.git\\n' $(git hash-object -w /dev/null) |
               git mktree --missing)
        git update-ref refs/heads/evil $(git commit-tree $tree -m evil)
        git config core.fsmonitor 'touch {m}; false' && git config core.pager 'touch {m}'
        printf '#!/bin/sh\\ntouch {m}\\n' > .git/hooks/post-checkout
        for n in '' $(seq 1 99 | sed 's/^/./'); do mkdir .git/HEAD.pi-agent-untrusted$n; done
        """.format(m=m))
    assert "could not be brought back" in result.stderr and "as data" in result.stderr
    kept_root = os.path.join(box.state_dir, "kept")
    kept = [os.path.join(kept_root, name) for name in os.listdir(kept_root)]
    assert len(kept) == 1 and sorted(os.listdir(kept[0])) == ["objects", "packed-refs"]
    for where in (kept[0], os.path.join(kept[0], "objects")):
        assert host_git(box, "status", cwd=where).returncode != 0, "no repository there"
        host_git(box, "log", cwd=where)
    assert not os.path.exists(m)
    assert "evil" not in host_git(box, "branch").stdout


def test_replace_refs_never_reach_the_host(box):
    """git replace would let host git show the clean file while checkout
    writes the agent's."""
    box.init_repo()
    box.ok("echo clean > file && git add file && git -c user.name=H -c user.email=h@x "
           "commit -qm file")
    result = agent(box, "git replace $(git rev-parse HEAD:file) "
                        "$(echo evil | git hash-object -w --stdin)")
    assert "1 ref change of the agent's was not applied" in result.stderr, result.stderr
    assert host_git(box, "for-each-ref refs/replace").stdout == ""
    box.ok("rm file && git checkout -- file")
    with open(os.path.join(box.project, "file")) as handle:
        assert handle.read() == "clean\n"
    kept = host_git(box, "for-each-ref --format='%(refname)' refs/pi-agent").stdout.split()
    assert len(kept) == 1 and "/replace/" in kept[0]


def test_only_branches_and_new_tags_come_back_the_users_names_stay(box):
    box.init_repo()
    box.ok("git tag v1 && git update-ref refs/remotes/origin/main HEAD && "
           "git symbolic-ref refs/remotes/origin/HEAD refs/remotes/origin/main")
    branch = host_git(box, "symbolic-ref --short HEAD").stdout.strip()
    before = host_git(box, "for-each-ref --format='%(refname) %(objectname)'").stdout
    result = agent(box, """
        git commit -q --allow-empty -m agent
        git tag -f v1 && git update-ref refs/remotes/origin/main HEAD
        git update-ref refs/main HEAD && git branch origin/main && git tag {b}
        git notes add -m note && git tag v2
        """.format(b=branch))
    assert result.returncode == 0, result.stderr
    after = dict(line.split() for line in host_git(
        box, "for-each-ref --format='%(refname) %(objectname)'").stdout.splitlines())
    unchanged = dict(line.split() for line in before.splitlines())
    moved = {name for name in after if after[name] != unchanged.get(name)}
    assert {name for name in moved if not name.startswith("refs/pi-agent/")} == {
        "refs/heads/" + branch, "refs/tags/v2"}
    assert host_git(box, "log -1 --format=%s origin/main").stdout == "first\n"
    assert "ref changes of the agent's were not applied" in result.stderr


def test_a_flood_of_refs_leaves_the_hosts_git_directory_small(box):
    box.init_repo()
    result = agent(box, """
        oid=$(git rev-parse HEAD)
        seq 1 20000 | sed "s|^|$oid refs/tags/flood-|" >> .git/packed-refs
        """)
    assert result.returncode == 0 and "20000 new refs" not in result.stderr
    assert "more than the 1000 a run brings back" in result.stderr, result.stderr
    count = len(host_git(box, "for-each-ref refs/tags").stdout.splitlines())
    assert count == 1000
    size = int(subprocess.run(["du", "-sk", os.path.join(box.project, ".git")],
                              capture_output=True, text=True).stdout.split()[0])
    assert size < 2048, "the host's .git stays small: %d kB" % size


def test_packed_commits_naming_someone_else_are_named_too(box):
    box.init_repo()
    result = agent(box, "GIT_AUTHOR_NAME=Host GIT_AUTHOR_EMAIL=h@example.com "
                        "git commit -q --allow-empty -m posing && git repack -adq && "
                        "git prune-packed")
    assert "someone else as author or committer" in result.stderr, result.stderr
    subjects = [commit["subject"] for record in json_log(box) for commit in record["commits"]]
    assert subjects == ["posing"]


def json_log(box):
    import json
    return json.loads(box.ok("pi-log --json").stdout)


def test_credentials_in_the_repositorys_config_stay_out_of_the_run(box):
    """What actions/checkout writes (an extraheader), a credential helper,
    a token in a remote's URL or in an insteadOf: none reaches the agent."""
    box.init_repo()
    box.ok("git config http.https://github.com/.extraheader 'AUTHORIZATION: basic SECRET-1' && "
           "git config credential.helper 'store --file /tmp/SECRET-2' && "
           "git remote add origin https://u:SECRET-3@github.com/o/r && "
           "git config url.https://SECRET-4@ghe.example/.insteadOf gh:")
    result = agent(box, "git config --list --show-origin; cat .git/config")
    assert result.returncode == 0, result.stderr
    assert "SECRET" not in result.stdout, result.stdout
    assert "origin.url=https://github.com/o/r" in result.stdout
    notice = [line for line in warnings(result) if "may be credentials" in line]
    assert len(notice) == 1 and "extraheader" in notice[0] and "SECRET" not in notice[0]


def test_head_never_follows_onto_a_branch_that_did_not_come_back(box):
    box.init_repo()
    branch = host_git(box, "symbolic-ref --short HEAD").stdout.strip()
    box.ok("git update-ref refs/remotes/origin/main HEAD")
    result = agent(box, "git checkout -q -b origin/main")  # kept aside: it shadows the remote's
    assert "origin/main, which did not come back: HEAD stays" in result.stderr, result.stderr
    assert host_git(box, "symbolic-ref --short HEAD").stdout.strip() == branch
