"""The fourth review of issue 22 (attacks on the third's fixes): paths
host git reads in the project that the "protected" set did not cover: a
config file linked into it (dotfiles), nested repositories' and
worktrees' hooks, chains of links, `..` after a directory of the project,
an include behind a condition false at the start, a command of your
config naming a script of the project, a FIFO in place of a config file.
Each test plants its attack from inside a run, as the agent would, then
takes the user's ordinary next step, and asserts the SAFE outcome: it
fails while the attack works."""

import os
import stat

from test_containment import agent, host_git, marker

FSMONITOR = "printf '[core]\\n\\tfsmonitor = \"touch %s; false\"\\n' >> %s"
HOOK = "printf '#!/bin/sh\\ntouch %s\\n' > %s && chmod +x %s"


def agent_arms_config(box, path, first="", then="", cwd=None):
    """The agent adds an fsmonitor to the config file at `path` (between
    `first` and `then`): neither pi-agent's own git nor the user's next git
    status (in `cwd`) runs it."""
    pwned = marker(box)
    result = agent(box, first + FSMONITOR % (pwned, path) + then)
    assert not os.path.exists(pwned), "pi-agent's own git ran it: " + result.stderr
    host_git(box, "status", cwd=cwd)
    assert not os.path.exists(pwned), "the user's git status ran the agent's fsmonitor"


def passing_hook(directory, name):
    """An executable hook script of the user's, DIRECTORY/NAME, that passes."""
    path = os.path.join(directory, name)
    with open(path, "w") as handle:
        handle.write("#!/bin/sh\nexit 0\n")
    os.chmod(path, 0o755)


def agent_rewrites_hook(box, path, cwd=None, first=""):
    """The agent rewrites the hook at `path` (after `first`): neither
    pi-agent's own git nor the user's next git commit (in `cwd`) runs it."""
    pwned = marker(box)
    result = agent(box, first + HOOK % (pwned, path, path))
    assert not os.path.exists(pwned), "pi-agent's own git ran it: " + result.stderr
    box.sh("git -c user.name=H -c user.email=h@x commit -q --allow-empty -m mine", cwd=cwd)
    assert not os.path.exists(pwned), "the user's git commit ran the agent's hook"


def test_a_global_config_linked_into_the_project_is_protected(box):
    # dotfiles kept with stow: ~/.gitconfig -> ~/dotfiles/gitconfig, and
    # the user runs pi in the dotfiles repository. Host git reads the file
    # as ~/.gitconfig (show-origin names the link), so config_facts finds
    # it outside the project: neither read-only nor checked after the run.
    box.init_repo()
    with open(os.path.join(box.project, "gitconfig"), "w") as handle:
        handle.write("[alias]\n\tst = status\n")
    box.chown(box.project)
    os.symlink(os.path.join(box.project, "gitconfig"), os.path.join(box.home, ".gitconfig"))
    agent_arms_config(box, "gitconfig")


def test_a_hooks_path_linked_into_the_project_is_protected(box):
    # core.hooksPath = ~/.githooks, a link to ~/dotfiles/githooks (stow).
    box.init_repo()
    box.mkdir(os.path.join(box.project, "githooks"))
    os.symlink(os.path.join(box.project, "githooks"), os.path.join(box.home, ".githooks"))
    box.ok("git config --global core.hooksPath ~/.githooks")
    agent_rewrites_hook(box, "githooks/pre-commit")


def test_a_nested_repositorys_hooks_path_is_protected(box):
    # A nested repository (mounted read-only, trusted after the run) whose
    # config sets core.hooksPath to a directory of its work tree (husky's
    # .husky/_, or .githooks): that directory is the agent's to write.
    box.init_repo()
    sub = box.mkdir(os.path.join(box.project, "sub"))
    box.init_repo(sub)
    box.mkdir(os.path.join(sub, ".githooks"))
    box.ok("git config core.hooksPath .githooks", cwd=sub)
    agent_rewrites_hook(box, "sub/.githooks/pre-commit", cwd=sub)


def test_a_nested_repositorys_include_is_protected(box):
    # git config include.path ../.gitconfig in a nested repository: the
    # usual way to share a tracked config.
    box.init_repo()
    sub = box.mkdir(os.path.join(box.project, "sub"))
    box.init_repo(sub)
    with open(os.path.join(sub, ".gitconfig"), "w") as handle:
        handle.write("[alias]\n\tst = status\n")
    box.chown(sub)
    box.ok("git config include.path ../.gitconfig", cwd=sub)
    agent_arms_config(box, "sub/.gitconfig", cwd=sub)


def test_a_link_on_the_way_to_a_linked_hook_is_protected(box):
    # .git/hooks/pre-commit -> ../../hooks/pre-commit, itself a link in the
    # project to hooks/lint.sh. config_facts protects realpath (lint.sh)
    # only; the link in between is the agent's to replace.
    box.init_repo()
    hooks = box.mkdir(os.path.join(box.project, "hooks"))
    passing_hook(hooks, "lint.sh")
    os.symlink("lint.sh", os.path.join(hooks, "pre-commit"))
    box.chown(box.project)
    box.ok("ln -s ../../hooks/pre-commit .git/hooks/pre-commit")
    agent_rewrites_hook(box, "hooks/pre-commit", first="rm hooks/pre-commit && ")


def test_a_hook_in_the_hooks_path_linked_elsewhere_is_protected(box):
    # core.hooksPath = .githooks (read-only inside), whose pre-commit is a
    # link to scripts/pre-commit.sh: git runs the link's target, which is
    # not protected (the .git/hooks case realpaths each link; this one not).
    box.init_repo()
    box.mkdir(os.path.join(box.project, ".githooks"))
    scripts = box.mkdir(os.path.join(box.project, "scripts"))
    passing_hook(scripts, "pre-commit.sh")
    os.symlink("../scripts/pre-commit.sh", os.path.join(box.project, ".githooks", "pre-commit"))
    box.chown(box.project)
    box.ok("git config core.hooksPath .githooks")
    agent_rewrites_hook(box, "scripts/pre-commit.sh")


def test_a_hook_linked_into_the_project_is_protected_with_hooks_path_set_to_git_hooks(box):
    # core.hooksPath = .git/hooks (what undoing husky often leaves): the
    # same directory as git's default, yet config_facts looks for links in
    # it only when core.hooksPath is unset.
    box.init_repo()
    scripts = box.mkdir(os.path.join(box.project, "scripts"))
    passing_hook(scripts, "pre-commit")
    box.chown(box.project)
    box.ok("ln -s ../../scripts/pre-commit .git/hooks/pre-commit && "
           "git config core.hooksPath .git/hooks")
    agent_rewrites_hook(box, "scripts/pre-commit")


def test_an_include_with_dot_dot_through_a_directory_made_a_link_is_protected(box):
    # include.path = ../sub/../conf.cfg: git resolves sub/.. physically,
    # config_facts lexically (normpath: conf.cfg). The agent makes sub a
    # link into a/b, so git reads a/conf.cfg.
    box.init_repo()
    box.mkdir(os.path.join(box.project, "sub"))
    with open(os.path.join(box.project, "conf.cfg"), "w") as handle:
        handle.write("[alias]\n\tst = status\n")
    box.chown(box.project)
    box.ok("git config include.path ../sub/../conf.cfg")
    agent_arms_config(box, "a/conf.cfg", first="mkdir -p a/b && rmdir sub && ln -s a/b sub && ")




def test_an_include_nested_in_a_condition_the_agent_makes_true_is_protected(box):
    # [includeIf "onbranch:release"] path = ../conf/release.cfg (protected:
    # its key is listed), which includes local.cfg. At the seed the branch
    # is main, so git never read release.cfg and its include is not in the
    # listing: conf/local.cfg is the agent's to make. HEAD comes back.
    box.init_repo()
    conf = box.mkdir(os.path.join(box.project, "conf"))
    with open(os.path.join(conf, "release.cfg"), "w") as handle:
        handle.write("[include]\n\tpath = local.cfg\n")
    box.chown(box.project)
    box.ok("git config includeIf.onbranch:release.path ../conf/release.cfg")
    agent_arms_config(box, "conf/local.cfg", then=" && git checkout -q -b release")


def test_a_filter_command_in_the_project_does_not_run_on_review(box):
    # The user's config names a script of the project as a clean filter
    # (git config filter.strip.clean 'sh tools/strip.sh', nbstripout-like);
    # the agent rewrites the script and gives a file the filter in
    # .gitattributes. The user's review, git diff, runs it.
    box.init_repo()
    tools = box.mkdir(os.path.join(box.project, "tools"))
    with open(os.path.join(tools, "strip.sh"), "w") as handle:
        handle.write("#!/bin/sh\ncat\n")
    box.chown(box.project)
    box.ok("git config filter.strip.clean 'sh tools/strip.sh' && git add tools && "
           "git -c user.name=H -c user.email=h@x commit -qm tools")
    pwned = marker(box)
    result = agent(box, "printf 'touch %s\\ncat\\n' > tools/strip.sh && "
               "echo '*.txt filter=strip' > .gitattributes && echo hi > a.txt && "
               "git add a.txt .gitattributes 2>/dev/null; echo more >> a.txt" % pwned)
    assert not os.path.exists(pwned), "pi-agent's own git ran it: " + result.stderr
    host_git(box, "diff")
    assert not os.path.exists(pwned), "the user's git diff ran the agent's filter script"


def test_a_relative_hooks_path_in_a_worktree_inside_the_project_is_protected(box):
    # core.hooksPath = .githooks (relative: to each work tree's top), and a
    # linked worktree of the repository inside the project (.worktrees/feat,
    # as agents' tools make them): config_facts protects .githooks of the
    # main work tree only; in feat, git runs .worktrees/feat/.githooks.
    box.init_repo()
    hooks = box.mkdir(os.path.join(box.project, ".githooks"))
    passing_hook(hooks, "pre-commit")
    box.chown(box.project)
    box.ok("git add .githooks && git -c user.name=H -c user.email=h@x commit -qm hooks && "
           "git config core.hooksPath .githooks && git worktree add -q .worktrees/feat")
    agent_rewrites_hook(box, ".worktrees/feat/.githooks/pre-commit",
                        cwd=os.path.join(box.project, ".worktrees", "feat"))


def test_a_fifo_in_place_of_a_linked_global_config_does_not_stop_the_sweep(box):
    # ~/.gitconfig -> PROJECT/gitconfig (stow): the agent makes it a FIFO,
    # which pi-agent's own git, bringing the agent's commits back, would
    # open and wait on for ever (the sweep after it never running). The file
    # is read-only inside, a mount the agent cannot remove.
    box.init_repo()
    config = os.path.join(box.project, "gitconfig")
    with open(config, "w") as handle:
        handle.write("[alias]\n\tst = status\n")
    box.chown(box.project)
    os.symlink(config, os.path.join(box.home, ".gitconfig"))
    result = agent(box, "rm gitconfig && mkfifo gitconfig && git commit -q --allow-empty -m x",
                   timeout=120)
    assert result.returncode != 0, result.stderr
    assert stat.S_ISREG(os.lstat(config).st_mode)
