"""Attacks of a hostile agent found by the third review of issues 22 and
30 (after the egress, engine and recovery work): what host git reads in
the project swapped behind a link, pi-agent's own git reading it before
the sweep, hooks linked into the project, sparse objects, Python's start
files, FIFOs, names that answer for another commit, separators in a
subject.

Each test plants its attack from inside a run, as the agent would, and
asserts the SAFE outcome: it fails while the attack works."""

import json
import os
import subprocess

import pytest

from test_containment import agent, host_git, included_config, marker, warnings

# A commit with a signature header (index-pack --strict takes it): git log
# verifies it when log.showSignature is set, running gpg.program.
SIGNED_COMMIT = r"""
tree=$(git rev-parse HEAD^{tree}); parent=$(git rev-parse HEAD)
c=$(printf 'tree %s\nparent %s\nauthor A <a@b> 1700000000 +0000\ncommitter A <a@b> 1700000000 +0000\ngpgsig -----BEGIN PGP SIGNATURE-----\n \n AAAA\n -----END PGP SIGNATURE-----\n\nsigned\n' $tree $parent | git hash-object -t commit -w --stdin)
git update-ref HEAD $c
"""


def test_an_included_config_swapped_behind_a_link_is_disabled(box):
    # The agent copies conf within the project, arms the copy, renames conf
    # away (the read-only mount goes with it) and makes conf a link to it.
    included_config(box)
    pwned = marker(box)
    by_pi_agent = pwned + "-by-pi-agent"
    result = agent(box, r"""
mkdir -p .cache/x && cp conf/git.cfg .cache/x/git.cfg
printf '[core]\n\tfsmonitor = "touch %(m)s; false"\n[log]\n\tshowSignature = true\n[gpg]\n\tprogram = %(p)s/.cache/x/g\n' >> .cache/x/git.cfg
printf '#!/bin/sh\ntouch %(m2)s\nexit 1\n' > .cache/x/g && chmod +x .cache/x/g
mv conf .cache/old && ln -s .cache/x conf
""" % {"m": pwned, "m2": by_pi_agent, "p": box.project} + SIGNED_COMMIT)
    assert not os.path.exists(by_pi_agent), "pi-agent's own git ran the agent's gpg.program"
    assert any("disabled conf" in line for line in warnings(result)), result.stderr
    assert any("kept in" in line for line in warnings(result)), "its git work is kept aside"
    host_git(box, "status")
    assert not os.path.exists(pwned), "the user's git status ran the agent's fsmonitor"
    assert not os.path.islink(os.path.join(box.project, "conf"))


def test_pi_agents_own_git_never_reads_an_include_made_anew(box):
    # The case the sweep disarms (conf/git.cfg made anew): pi-agent's own
    # git, bringing the agent's commits back, must not read it before.
    included_config(box)
    by_pi_agent = marker(box) + "-by-pi-agent"
    result = agent(box, r"""
mkdir -p .x && printf '#!/bin/sh\ntouch %(m2)s\nexit 1\n' > .x/g && chmod +x .x/g
mv conf conf2 && mkdir conf
printf '[log]\n\tshowSignature = true\n[gpg]\n\tprogram = %(p)s/.x/g\n' > conf/git.cfg
""" % {"m2": by_pi_agent, "p": box.project} + SIGNED_COMMIT)
    assert "disabled conf/git.cfg" in result.stderr
    assert not os.path.exists(by_pi_agent), "pi-agent's own git ran the agent's gpg.program"


def test_a_hooks_directory_linked_into_the_project_is_read_only(box):
    # .git/hooks -> ../githooks: the way to share hooks before core.hooksPath.
    box.init_repo()
    hooks = box.mkdir(os.path.join(box.project, "githooks"))
    with open(os.path.join(hooks, "pre-commit"), "w") as handle:
        handle.write("#!/bin/sh\nexit 0\n")
    os.chmod(os.path.join(hooks, "pre-commit"), 0o755)
    box.chown(box.project)
    box.ok("rm -rf .git/hooks && ln -s ../githooks .git/hooks")
    pwned = marker(box)
    result = agent(box, "printf '#!/bin/sh\\ntouch %s\\n' > githooks/pre-commit" % pwned)
    assert result.returncode != 0 and "Read-only file system" in result.stderr, result.stderr
    box.sh("git -c user.name=H -c user.email=h@x commit -q --allow-empty -m mine")
    assert not os.path.exists(pwned), "the user's git commit ran the agent's hook"


def test_a_sparse_object_is_never_written_out(box):
    # Root's sparse file named like a pack cannot be hard-linked
    # (protected_hardlinks); a broken object sends the work to STATE/kept.
    if os.getuid() != 0:
        pytest.skip("needs root to mount a tmpfs")
    state = box.state_dir
    os.makedirs(state, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512m,mode=0700,uid=%d,gid=%d"
                    % (box.user.uid, box.user.gid), "tmpfs", state], check=True)
    try:
        box.init_repo()
        result = agent(box, """
            oid=$(printf 'tree 0000000000000000000000000000000000000000\\nauthor nobody\\n\\nbad\\n' |
                  git hash-object -t commit --literally -w --stdin)
            git update-ref HEAD $oid
            sudo truncate -s 1G .git/objects/pack/pack-%s.pack
            """ % ("0" * 40))
        box.wait_saved()
        used = os.statvfs(state)
        used = (used.f_blocks - used.f_bfree) * used.f_frsize
        assert used < 64 << 20, "%d MB in the state directory: %s" % (used >> 20, result.stderr)
        assert any("kept in" in line for line in warnings(result)), result.stderr
    finally:
        box.cleanup()
        subprocess.run(["umount", "-l", state], check=False)


def test_a_start_file_in_the_projects_venv_is_named(box):
    # pre-commit's hook runs PROJECT/.venv/bin/python: a .pth file there
    # runs at the user's next git commit; .venv is git-ignored.
    box.init_repo()
    site = box.mkdir(os.path.join(box.project, ".venv", "lib", "python3.11", "site-packages"))
    box.chown(box.project)
    result = agent(box, "echo 'import os' > %s/zz.pth" % os.path.relpath(site, box.project))
    assert any(".venv/lib/python3.11/site-packages/zz.pth" in line and "may run" in line
               for line in warnings(result)), result.stderr


def test_a_fifo_the_agent_made_is_removed(box):
    # Host git reading a FIFO named .gitignore waits for ever (a git-aware
    # prompt hangs the shell).
    box.init_repo()
    result = agent(box, "mkdir -p src && mkfifo src/.gitignore")
    assert any("removed src/.gitignore, a FIFO" in line for line in warnings(result)), \
        result.stderr
    assert not os.path.lexists(os.path.join(box.project, "src", ".gitignore"))
    host_git(box, "status")


def test_a_tag_named_as_git_describe_names_a_commit_is_kept_aside(box):
    box.init_repo()
    box.ok("git tag v1.0 && echo ok > f && git add f && "
           "git -c user.name=H -c user.email=h@x commit -qm mine")
    result = agent(box, """
        echo evil > f && git commit -qam 'tidy f'
        git describe --tags HEAD > described.txt
        git tag "$(cat described.txt)" HEAD~1
        """)
    assert result.returncode == 0, result.stderr
    name = open(os.path.join(box.project, "described.txt")).read().strip()
    assert host_git(box, "for-each-ref refs/tags/%s" % name).stdout == "", result.stderr
    assert host_git(box, "rev-parse %s^{commit}" % name).stdout.strip() == \
        host_git(box, "rev-parse HEAD").stdout.strip()


def test_a_separator_in_a_subject_hides_no_commit(box):
    box.init_repo()
    result = agent(box, r"""
        echo x > f && git add f
        git commit -q --author='Alice Admin <alice@example.com>' -m "$(printf 'tidy\037up')"
        """)
    assert result.returncode == 0, result.stderr
    box.wait_saved()
    assert any("someone else" in line for line in warnings(result)), result.stderr
    assert json.loads(box.ok("pi-log --json").stdout)[0].get("commits_total") == 1
