"""The fifth review of issue 22 (attacks on the fourth's fixes): commands
of your config that COMMAND_KEYS missed (diff.external), a word of a
command that is no path at all (an alias's origin/main) refusing every
later run, and a global config git would read if it were there, in a
directory linked into the project. Each test plants its attack from inside
a run, as the agent would, then takes the user's ordinary next step, and
asserts the SAFE outcome: it fails while the attack works."""

import os

from test_attack4 import agent_arms_config
from test_containment import agent, host_git, marker


def test_diff_external_script_in_the_project_does_not_run_on_review(box):
    # diff.external = tools/ext.sh, a project script: read-only in a run.
    box.init_repo()
    tools = box.mkdir(os.path.join(box.project, "tools"))
    with open(os.path.join(tools, "ext.sh"), "w") as handle:
        handle.write("#!/bin/sh\nexit 0\n")
    os.chmod(os.path.join(tools, "ext.sh"), 0o755)
    with open(os.path.join(box.project, "a.txt"), "w") as handle:
        handle.write("a\n")
    box.chown(box.project)
    box.ok("git add tools a.txt && git -c user.name=H -c user.email=h@x commit -qm t && "
           "git config diff.external tools/ext.sh")
    pwned = marker(box)
    result = agent(box, "printf '#!/bin/sh\\ntouch %s\\n' > tools/ext.sh; echo more >> a.txt"
                   % pwned)
    assert not os.path.exists(pwned), "pi-agent's own git ran it: " + result.stderr
    host_git(box, "diff")
    assert not os.path.exists(pwned), "the user's git diff ran the agent's diff.external"


def test_a_link_named_like_a_word_of_an_alias_does_not_refuse_the_next_run(box):
    # A common global alias (git rebase origin/main): origin/main could be
    # a path of the project; the agent makes it a link. Only a file a
    # command names is protected: nothing is refused for a word.
    box.init_repo()
    box.ok("git config --global alias.sync '!git fetch origin && git rebase origin/main'")
    result = agent(box, "mkdir -p origin && ln -s nowhere origin/main")
    assert result.returncode == 0, result.stderr
    result = agent(box, "true")
    assert result.returncode == 0, result.stderr


def test_a_missing_xdg_global_config_linked_into_the_project_is_protected(box):
    # dotfiles with stow's tree folding: ~/.config/git -> PROJECT/git
    # (it holds only 'ignore'); the user's config is ~/.gitconfig. Git
    # also reads ~/.config/git/config when it exists: the agent makes it.
    box.init_repo()
    git = box.mkdir(os.path.join(box.project, "git"))
    with open(os.path.join(git, "ignore"), "w") as handle:
        handle.write("*.o\n")
    box.chown(box.project)
    config_dir = os.path.join(box.home, ".config")
    if not os.path.isdir(config_dir):
        box.mkdir(config_dir)
    os.symlink(git, os.path.join(config_dir, "git"))
    agent_arms_config(box, "git/config")
