"""shell/pi.sh and install.sh: lint, silent sourcing in bash and zsh, and
installing into a fresh home (no Docker engine needed)."""

import os
import pathlib
import shutil
import subprocess

import pytest

from conftest import ROOT

import pi_agent


def parser_commands():
    """{shell function: [its long options]} from pi_agent's own parser."""
    import argparse
    parser = pi_agent.build_parser()
    sub = next(action for action in parser._actions
               if isinstance(action, argparse._SubParsersAction))
    return {("pi" if name == "run" else "pi-" + name):
            sorted(option for action in command._actions for option in action.option_strings
                   if option.startswith("--"))
            for name, command in sub.choices.items() if name != "complete"}


FUNCTIONS = tuple(parser_commands())
SHELLS = {"bash": ["bash", "--norc", "--noprofile", "-eu", "-c"],
          "zsh": ["zsh", "-f", "-eu", "-c"]}


def need(tool):
    if shutil.which(tool) is None:
        pytest.skip("%s is not installed" % tool)


@pytest.mark.parametrize("shell,files", [("bash", ["shell/pi.sh"]),
                                         ("sh", ["install.sh", "tests/setup-engine.sh",
                                                 ".ci/run"])])
def test_shellcheck_is_clean(shell, files):
    need("shellcheck")
    result = subprocess.run(["shellcheck", "-s", shell] + files, cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


@pytest.mark.parametrize("shell", sorted(SHELLS))
def test_sourcing_is_silent_repeatable_and_alias_proof(shell, tmp_path):
    """A user's aliases, `command` and the functions' own names included,
    are really expanded here (bash expands none in a script without
    expand_aliases); the functions work all the same, at the "prompt" too."""
    need(shell)
    aliases = ["command=false", "builtin=false", "cd=false", "grep=false", "rm=false",
               "ls=false", "pi=false", "pi-exec=false", "pi-status=false"]
    # A sourced file is read a command at a time, so its aliases apply to
    # what follows them (a -c string may be parsed whole first).
    rc = tmp_path / "rc"
    rc.write_text("alias %s\n" % " ".join(aliases)
                  + "command -v true >/dev/null && exit 90\n"  # the aliases are live
                  + ". %s/shell/pi.sh\n. %s/shell/pi.sh\n" % (ROOT, ROOT)
                  + "".join("typeset -f %s >/dev/null\n" % name for name in FUNCTIONS)
                  + "pi --version\npi-exec --help | head -n 1\n")
    script = ("shopt -s expand_aliases\n" if shell == "bash" else "") + ". %s\n" % rc
    result = subprocess.run(SHELLS[shell] + [script], capture_output=True, text=True,
                            env={"PATH": os.environ["PATH"], "HOME": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    lines = result.stdout.splitlines()
    assert lines[0].startswith("pi-agent ") and lines[1].startswith("usage: pi-exec")


@pytest.mark.parametrize("shell", sorted(SHELLS))
def test_functions_reach_pi_agent_from_any_directory(shell, tmp_path):
    need(shell)
    script = ". %s/shell/pi.sh\ncd /\npi --version\npi-exec --help | head -n 1\n" % ROOT
    result = subprocess.run(SHELLS[shell] + [script], capture_output=True, text=True,
                            env={"PATH": os.environ["PATH"], "HOME": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0].startswith("pi-agent ")
    assert result.stdout.splitlines()[1].startswith("usage: pi-exec")


@pytest.mark.parametrize("shell", sorted(SHELLS))
def test_every_command_of_the_parser_has_its_function_and_completes_every_option(shell,
                                                                                  tmp_path):
    """The shell side cannot drift from the parser: each subcommand has its
    function, its alias cleared, its completion registered, and each of its
    options among the candidates; the module's usage and docs/commands.md
    name it."""
    need(shell)
    commands = parser_commands()
    register = "autoload -Uz compinit && compinit -u\n" if shell == "zsh" else ""
    show = ('print -r -- "$name ${_comps[$name]-}"' if shell == "zsh" else
            'printf "%s %s\\n" "$name" "$(complete -p "$name" 2>/dev/null)"')
    script = (register + "alias %s\n. %s/shell/pi.sh\n" % (
        " ".join("%s=false" % name for name in commands), ROOT) + "".join(
        'name=%s; typeset -f "$name" >/dev/null || echo "no function $name"; %s\n'
        'alias "$name" >/dev/null 2>&1 && echo "no function $name (an alias is left)"\n'
        'echo "$name candidates: $(_pi_agent_candidates "$name" "" | tr "\\n" " ")"\n'
        % (name, show) for name in commands))
    if shell == "zsh":
        script += "_pi_agent_compdef\n" + "".join(
            'name=%s; %s\n' % (name, show) for name in commands)
    result = subprocess.run(SHELLS[shell] + [script], capture_output=True, text=True,
                            env={"PATH": os.environ["PATH"], "HOME": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    out = result.stdout.splitlines()
    assert not [line for line in out if line.startswith("no function")]
    for name, options in commands.items():
        candidates = next(line for line in out if line.startswith(name + " candidates: "))
        missing = set(options) - set(candidates.split()[2:])
        assert not missing, "%s does not complete %s" % (name, ", ".join(sorted(missing)))
        registered = [line for line in out if line.startswith(name + " ") and "_pi_agent" in line]
        assert registered, "no completion registered for %s" % name
    with open(os.path.join(ROOT, "docs", "commands.md"), encoding="utf-8") as handle:
        reference = handle.read()
    for name in commands:
        assert name + " " in pi_agent.__doc__ and "`%s" % name in reference, name


@pytest.mark.parametrize("shell", sorted(SHELLS))
def test_a_shell_left_open_after_an_uninstall_says_so_in_one_line(shell, tmp_path):
    need(shell)
    shutil.copytree(os.path.join(ROOT, "shell"), tmp_path / "shell")
    script = ". %s/shell/pi.sh\npi-status; echo status=$?\n" % tmp_path
    result = subprocess.run(SHELLS[shell][:-2] + ["-c", script], capture_output=True, text=True,
                            env={"PATH": os.environ["PATH"], "HOME": str(tmp_path)})
    assert result.stdout == "status=127\n"
    assert result.stderr == "pi-agent: pi-agent was uninstalled (%s/shell/../pi_agent.py is " \
        "gone); open a new shell, or install it again\n" % tmp_path


def install(home, *args, shell="dash", env=None, script=None):
    need(shell)
    full_env = {"PATH": os.environ["PATH"], "HOME": str(home)}
    full_env.update(env or {})
    return subprocess.run([shell, script or os.path.join(ROOT, "install.sh"), *args],
                          capture_output=True, text=True, env=full_env, stdin=subprocess.DEVNULL)


def test_install_from_a_checkout_is_idempotent_and_works_in_bash_and_zsh(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    first = install(home, "-y")
    assert first.returncode == 0, first.stderr
    assert "installed pi-agent %s in" % get_version() in first.stdout
    rc_before = {name: (home / name).read_text() for name in (".bashrc", ".zshrc")}
    installed = home / ".local/share/pi-agent"
    older = (installed / "pi_agent.py").read_text().replace(
        '__version__ = "%s"' % get_version(), '__version__ = "0.0.9"')
    (installed / "pi_agent.py").write_text(older)
    second = install(home, "-y")
    assert second.returncode == 0, second.stderr
    assert "upgraded pi-agent from 0.0.9 to %s in" % get_version() in second.stdout
    for name, text in rc_before.items():
        assert (home / name).read_text() == text and text.count("# pi-agent") == 1
    installed = home / ".local/share/pi-agent"
    assert (installed / "pi_agent.py").read_text() == open(os.path.join(ROOT, "pi_agent.py")).read()
    for shell, argv in (("bash", ["bash", "-i", "-c"]), ("zsh", ["zsh", "-i", "-c"])):
        need(shell)
        result = subprocess.run(argv + ["pi --version"], capture_output=True, text=True,
                                env={"PATH": os.environ["PATH"], "HOME": str(home)},
                                stdin=subprocess.DEVNULL)
        assert result.stdout.strip().endswith("pi-agent " + get_version()), result.stderr


def get_version():
    import pi_agent
    return pi_agent.__version__


def test_install_without_rc_changes_and_uninstall_leaves_no_trace(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    (home / ".bashrc").write_text("# mine\n")
    assert install(home, "-y").returncode == 0
    assert install(home, "--uninstall").returncode == 0
    assert (home / ".bashrc").read_text() == "# mine\n"
    assert sorted(p.name for p in home.iterdir()) == [".bashrc"]
    assert install(home, "--no-modify-rc").returncode == 0
    assert (home / ".bashrc").read_text() == "# mine\n"


def test_uninstall_removes_only_its_own_line(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    mine = "export PI_AGENT_CPUS=2  # pi-agent settings\n"
    (home / ".bashrc").write_text(mine)
    other = tmp_path / "other"
    assert install(home, "-y", env={"PI_AGENT_HOME": str(other)}).returncode == 0
    assert install(home, "-y").returncode == 0
    assert install(home, "--uninstall").returncode == 0
    lines = (home / ".bashrc").read_text().splitlines(keepends=True)
    assert lines[0] == mine, "the user's own line stays"
    assert len(lines) == 3 and str(other) in lines[2], "and so does the other install's"
    assert "# PATH for pi-agent" in lines[1], "with the PATH of its pi-agent command"


@pytest.mark.parametrize("source", ["missing-dir", "not-a-tarball"])
def test_a_failed_source_is_one_error(tmp_path, source):
    bad = tmp_path / source
    if source == "not-a-tarball":
        bad.write_text("hello\n")
    result = install(tmp_path, "-y", "--from", str(bad))
    assert result.returncode == 1
    errors = result.stderr.strip().splitlines()
    assert len([line for line in errors if line.startswith("pi-agent install:")]) == 1, errors
    assert str(bad) in errors[-1]
    assert not (tmp_path / ".local").exists()


def release_tarball(tmp_path):
    tarball = tmp_path / "pi-agent.tar.gz"
    subprocess.run(["tar", "-czf", str(tarball), "-C", os.path.dirname(ROOT),
                    "--exclude=.git", "--exclude=__pycache__", os.path.basename(ROOT)],
                   check=True)
    return tarball


def test_install_offline_from_a_tarball_with_no_network(tmp_path):
    need("unshare")
    if os.getuid() != 0:
        pytest.skip("a network namespace needs root")
    tarball = release_tarball(tmp_path)
    home = tmp_path / "home"
    home.mkdir()
    result = subprocess.run(["unshare", "--net", "dash", os.path.join(ROOT, "install.sh"), "-y",
                             "--from", str(tarball)], capture_output=True, text=True,
                            stdin=subprocess.DEVNULL,
                            env={"PATH": os.environ["PATH"], "HOME": str(home)})
    assert result.returncode == 0, result.stderr
    assert (home / ".local/share/pi-agent/shell/pi.sh").exists()


def test_install_piped_from_a_url(tmp_path):
    """curl -fsSL URL/install.sh | sh: the script fetches the release tarball."""
    import functools
    import http.server
    import threading
    release_tarball(tmp_path)
    shutil.copy(os.path.join(ROOT, "install.sh"), tmp_path / "install.sh")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = "http://127.0.0.1:%d" % server.server_address[1]
    home = tmp_path / "home"
    home.mkdir()
    try:
        result = subprocess.run(
            "curl -fsSL %s/install.sh | sh -s -- -y" % url, shell=True, capture_output=True,
            text=True, env={"PATH": os.environ["PATH"], "HOME": str(home),
                            "PI_AGENT_RELEASE_URL": url + "/pi-agent.tar.gz"})
    finally:
        server.shutdown()
    assert result.returncode == 0, result.stderr
    assert "downloading %s/pi-agent.tar.gz" % url in result.stderr
    installed = home / ".local/share/pi-agent/pi_agent.py"
    assert installed.read_text() == open(os.path.join(ROOT, "pi_agent.py")).read()


def test_install_without_a_terminal_leaves_rc_files_and_says_what_to_add(tmp_path):
    need("setsid")
    home = tmp_path / "home"
    home.mkdir()
    result = subprocess.run(["setsid", "dash", os.path.join(ROOT, "install.sh")],
                            capture_output=True, text=True, stdin=subprocess.DEVNULL,
                            env={"PATH": os.environ["PATH"], "HOME": str(home)})
    assert result.returncode == 0, result.stderr
    assert "left %s/.bashrc alone" % home in result.stdout and "shell/pi.sh" in result.stdout
    assert "%s/.local/bin is not on your PATH; to type pi-agent alone, add to your shell's " \
        "startup file: case " % home in result.stdout
    assert not (home / ".bashrc").exists() and not (home / ".profile").exists()


def test_install_refuses_an_old_python(tmp_path):
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "python3").write_text("#!/bin/sh\n[ \"$1\" = -c ] && case $2 in *exit*) exit 1;; "
                                  "*) echo 3.8.10;; esac\n")
    (fake / "python3").chmod(0o755)
    result = install(tmp_path, "-y", env={"PATH": "%s:%s" % (fake, os.environ["PATH"])})
    assert result.returncode == 1 and "3.9" in result.stderr
    assert not (tmp_path / ".local").exists()


def test_install_checks_the_python_the_functions_run_and_a_version_it_can_fetch(tmp_path):
    result = install(tmp_path, "-y", env={"PI_AGENT_PYTHON": "python2.6"})
    assert result.returncode == 1 and "python2.6 is not installed" in result.stderr
    assert "PI_AGENT_PYTHON" in result.stderr
    script = tmp_path / "install.sh"
    shutil.copy(os.path.join(ROOT, "install.sh"), script)  # (no checkout beside it)
    result = install(tmp_path, "-y", env={"PI_AGENT_VERSION": "latest; rm -rf /"},
                     script=str(script))
    assert result.returncode == 1 and "use a release such as" in result.stderr
    assert not (tmp_path / ".local").exists()


def zsh_at_prompt(home, commands, zshrc=None):
    """An interactive zsh (no global rc files: Ubuntu's runs compinit) that
    reads COMMANDS from stdin, so it draws a prompt, and runs precmd, first.
    The prompt is empty, so anything on stderr came from the rc files."""
    need("zsh")
    (home / ".zshenv").write_text("PS1=\nunsetopt prompt_cr prompt_sp\n")
    if zshrc is not None:
        (home / ".zshrc").write_text(zshrc)
    return subprocess.run(["zsh", "-d", "-i"], input=commands, capture_output=True, text=True,
                          env={"PATH": os.environ["PATH"], "HOME": str(home)})


SHOW_COMPLETION = 'print -r -- "comp=${_comps[pi-rollback]-} hooks=${(j:,:)precmd_functions}"\n'


@pytest.mark.parametrize("order", ["compinit-before", "compinit-after", "no-compinit",
                                   "installer"])
def test_zsh_completion_whatever_the_order_of_compinit(order, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    source = ". %s/shell/pi.sh\n" % ROOT
    compinit = "autoload -Uz compinit && compinit\n"
    # Sourced twice, as a .zshrc sourced again does: one hook all the same.
    lines = source + source + 'print -r -- "sourced: ${(j:,:)precmd_functions}"\n'
    zshrc = {"compinit-before": compinit + lines, "compinit-after": lines + compinit,
             "no-compinit": lines, "installer": None}[order]
    if order == "installer":
        assert install(home, "-y", "--no-bin").returncode == 0
    result = zsh_at_prompt(home, SHOW_COMPLETION, zshrc)
    assert result.returncode == 0, result.stderr
    out = result.stdout.splitlines()
    if order in ("compinit-after", "no-compinit"):
        assert out[0] == "sourced: _pi_agent_compdef_at_prompt"
    expected = "" if order == "no-compinit" else "_pi_agent_complete_zsh"
    assert out[-1] == "comp=%s hooks=" % expected, "registered at the first prompt, hook gone"
    assert result.stderr == ""


@pytest.mark.parametrize("how", ["no terminal", "--no-modify-rc"])
def test_install_that_adds_no_line_says_so_last(how, tmp_path):
    need("setsid")
    home = tmp_path / "home"
    home.mkdir()
    args = ["--no-modify-rc"] if how == "--no-modify-rc" else []
    result = subprocess.run(["setsid", "dash", os.path.join(ROOT, "install.sh"), *args],
                            capture_output=True, text=True, stdin=subprocess.DEVNULL,
                            env={"PATH": os.environ["PATH"], "HOME": str(home)})
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    installed = home / ".local/share/pi-agent"
    assert '. "%s/shell/pi.sh"  # pi-agent' % installed in lines[-2], "the line to add"
    assert "not in any shell startup file yet" in lines[-1]
    assert '. "%s/shell/pi.sh" in this one' % installed in lines[-1]
    assert "%s/.local/bin/pi-agent run" % home in lines[-1]
    assert "open a new shell (or" not in result.stdout
    assert sorted(p.name for p in home.iterdir()) == [".local"]


def run_pi_agent(command, *args, path=None):
    """The pi-agent command as a script or CI job runs it: sh, no rc file."""
    return subprocess.run([command, *args], capture_output=True, text=True, cwd="/",
                          env={"PATH": path or os.environ["PATH"], "HOME": "/nonexistent"},
                          stdin=subprocess.DEVNULL)


def test_pi_agent_command_for_scripts_from_an_awkward_install_path(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    dest = tmp_path / "it's a dir" / "pi agent"
    bin_dir = home / ".local/bin"
    first = install(home, "-y", env={"PI_AGENT_HOME": str(dest)})
    assert first.returncode == 0, first.stderr
    assert "added %s to PATH in ~/.profile ~/.bashrc ~/.zshenv" % bin_dir in first.stdout
    for script, shell in (("pi-agent --version", ["sh", "-l", "-c"]),
                          ("pi-agent --version", ["zsh", "-c"])):  # (zsh reads ~/.zshenv)
        need(shell[0])
        found = subprocess.run(shell + [script], capture_output=True, text=True, cwd="/",
                               env={"PATH": "/usr/bin:/bin", "HOME": str(home)})
        assert found.stdout == "pi-agent %s\n" % get_version(), (shell, found.stderr)
    command = bin_dir / "pi-agent"
    text = command.read_text()
    second = install(home, "-y", env={"PI_AGENT_HOME": str(dest),
                                      "PATH": "%s:%s" % (bin_dir, os.environ["PATH"])})
    assert second.returncode == 0, second.stderr
    assert command.read_text() == text and "PATH" not in second.stdout
    assert run_pi_agent(str(command), "run", "--version").stdout == "pi-agent %s\n" % get_version()
    help_text = run_pi_agent("pi-agent", "exec", "--help", path="%s:%s" % (
        bin_dir, os.environ["PATH"])).stdout
    assert help_text.startswith("usage: pi-exec")


def test_each_install_removes_only_its_own_command(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    other = {"PI_AGENT_HOME": str(tmp_path / "other")}
    command = home / ".local/bin/pi-agent"
    assert install(home, "-y", "--no-bin").returncode == 0
    assert not command.exists()
    assert install(home, "-y", env=other).returncode == 0
    assert str(tmp_path / "other") in command.read_text()
    result = install(home, "-y")
    assert "left %s alone: it is not this install's" % command in result.stdout
    assert install(home, "--uninstall").returncode == 0
    assert str(tmp_path / "other") in command.read_text(), "the other install's command stays"
    assert str(tmp_path / "other") in (home / ".bashrc").read_text(), "and its line"
    assert install(home, "--uninstall", env=other).returncode == 0
    assert not (home / ".local").exists()
    command.parent.mkdir(parents=True)
    command.write_text("#!/bin/sh\necho mine\n")
    assert "not this install's" in install(home, "-y").stdout
    assert install(home, "--uninstall").returncode == 0
    assert command.read_text() == "#!/bin/sh\necho mine\n", "someone else's file stays"


# Install dirs that the shell lines the installer writes would run as code:
# {marker} is a file that no one may create. A newline also splits the rc
# line and the pi-agent command's marker into lines of their own, each of
# which grep -F matches alone: "#!/bin/sh" starts someone else's command,
# "export IMPORTANT=1" is a line of the user's own.
ATTACKS = {
    "newline": "d3\n#!/bin/sh\nexport IMPORTANT=1\ntouch {marker}\n#",
    "dollar": "d1'$(touch {marker})'",
    "backquote": "d4`touch {marker}`",
    "double-quote": 'd5"; touch {marker}; : "',
    "backslash": "d6\\",
    "tab": "d7\tx",
}
# Where the directory comes from, and how the refusal names that.
SETTINGS = {
    "PI_AGENT_HOME": "PI_AGENT_HOME",
    "PI_AGENT_BIN_DIR": "PI_AGENT_BIN_DIR",
    "XDG_DATA_HOME": "the default install dir $XDG_DATA_HOME/pi-agent (set PI_AGENT_HOME?)",
    "HOME": "the default install dir $HOME/.local/share/pi-agent (set PI_AGENT_HOME?)",
}
USERS_BASHRC = "export IMPORTANT=1\n# mine\n"
THEIR_COMMAND = "#!/bin/sh\necho theirs\n"


def snapshot(top):
    """Every directory and file below TOP, with the files' contents."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(top):
        found.update((os.path.join(dirpath, name), None) for name in dirnames)
        for name in filenames:
            with open(os.path.join(dirpath, name), "rb") as f:
                found[os.path.join(dirpath, name)] = f.read()
    return found


@pytest.mark.parametrize("action", ["install", "uninstall"])
@pytest.mark.parametrize("setting", sorted(SETTINGS))
@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_a_directory_that_would_run_as_code_is_refused_before_anything_is_written(
        attack, setting, action, tmp_path):
    marker = tmp_path / "PWNED"
    bad = os.path.join(str(tmp_path), "x", ATTACKS[attack].format(marker=marker))
    home, env = tmp_path / "home", {setting: bad}
    if setting == "HOME":
        home, env = pathlib.Path(bad), {}
        assert str(home) == bad
    home.mkdir(parents=True)
    (home / ".bashrc").write_text(USERS_BASHRC)
    theirs = home / ".local/bin/pi-agent"
    theirs.parent.mkdir(parents=True)
    theirs.write_text(THEIR_COMMAND)
    theirs.chmod(0o755)
    before = snapshot(str(tmp_path))
    for shell in ("dash", "bash"):
        result = install(home, "-y" if action == "install" else "--uninstall", shell=shell,
                         env=env)
        assert result.returncode == 1 and result.stdout == "", (shell, result.stdout)
        assert len(result.stderr.splitlines()) == 1, (shell, result.stderr)
        assert result.stderr.startswith("pi-agent install: %s has " % SETTINGS[setting]), shell
    # All the same, what a new shell and a script would run: the rc files
    # and any pi-agent command.
    run_env = {"PATH": os.environ["PATH"], "HOME": str(home)}
    for shell, rc in (("sh", ".bashrc"), ("bash", ".bashrc"), ("zsh", ".zshrc")):
        if (home / rc).exists() and shutil.which(shell):
            subprocess.run([shell, "-c", '. "$HOME/%s"' % rc], capture_output=True,
                           env=run_env, stdin=subprocess.DEVNULL)
    for command in (theirs, pathlib.Path(bad, "pi-agent")):
        if command.is_file():
            subprocess.run(["sh", str(command), "run", "--version"], capture_output=True,
                           env=run_env, stdin=subprocess.DEVNULL)
    assert not marker.exists(), "the directory ran as code"
    assert (home / ".bashrc").read_text() == USERS_BASHRC, "the user's lines stay"
    assert theirs.read_text() == THEIR_COMMAND, "someone else's command stays"
    assert snapshot(str(tmp_path)) == before, "nothing was written"


def test_spaces_and_a_single_quote_in_the_install_dir_are_only_text_in_the_rc_line(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    dest = tmp_path / "it's a dir" / "pi agent"
    env = {"PI_AGENT_HOME": str(dest)}
    result = install(home, "-y", "--no-bin", env=env)
    assert result.returncode == 0, result.stderr
    line = '[ -f "%s/shell/pi.sh" ] && . "%s/shell/pi.sh"  # pi-agent\n' % (dest, dest)
    assert (home / ".bashrc").read_text() == line, "the line as before (uninstall matches it)"
    for shell in ("bash", "zsh"):
        need(shell)
        started = subprocess.run([shell, "-i", "-c", "pi --version"], capture_output=True,
                                 text=True, stdin=subprocess.DEVNULL,
                                 env={"PATH": os.environ["PATH"], "HOME": str(home)})
        assert started.stdout.strip().endswith("pi-agent " + get_version()), started.stderr
    # sh reads the line alike (pi.sh itself is for bash and zsh: a stand-in).
    (dest / "shell/pi.sh").write_text("echo sourced\n")
    in_sh = subprocess.run(["sh", "-c", '. "$HOME/.bashrc"'], capture_output=True, text=True,
                           env={"PATH": os.environ["PATH"], "HOME": str(home)})
    assert (in_sh.stdout, in_sh.stderr) == ("sourced\n", "")
    assert install(home, "--uninstall", env=env).returncode == 0
    assert not (home / ".bashrc").exists() and not (home / ".zshrc").exists()


def test_uninstall_hint_reads_the_config_file_and_pastes_as_printed(tmp_path):
    """The printed clean-up, run as printed, with a docker that logs its calls."""
    home = tmp_path / "home"
    state = tmp_path / "my state"
    config = home / ".config/pi-agent/config"
    config.parent.mkdir(parents=True)
    config.write_text("# mine\nexport PI_AGENT_IMAGE_REPO=\"myrepo\"\n"
                      "PI_AGENT_STATE_DIR='%s'  # read as a shell reads it\n" % state)
    state.mkdir()
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "docker").write_text('#!/bin/sh\n[ "$1" = images ] && echo "$2:current" && exit\n'
                                 'echo "$@" >>"%s/docker.log"\n' % tmp_path)
    (fake / "docker").chmod(0o755)
    assert install(home, "-y").returncode == 0
    result = install(home, "--uninstall")
    assert result.returncode == 0, result.stderr
    lines = [line.split(": ", 1)[1] for line in result.stdout.splitlines()]
    clean = lines[lines.index("your environments are kept (--uninstall --purge removes them); "
                              "to remove them by hand (yours only):") + 1]
    assert clean == ("  docker images 'myrepo' --filter label=pi-agent.uid=%d --format "
                     "'{{.Repository}}:{{.Tag}}' | xargs -r docker rmi; rm -r '%s'"
                     % (os.getuid(), state))
    assert lines[-1].endswith("rm -r '%s'" % config.parent)
    subprocess.run(["sh", "-c", clean], check=True,
                   env={"PATH": "%s:%s" % (fake, os.environ["PATH"])})
    assert (tmp_path / "docker.log").read_text() == "rmi myrepo:current\n"
    assert not state.exists() and config.exists()
    assert install(home, "-y").returncode == 0
    from_env = install(home, "--uninstall", env={"PI_AGENT_IMAGE_REPO": "envrepo"})
    assert "docker images 'envrepo' " in from_env.stdout, "the environment beats the file"


def test_uninstall_purge_removes_images_state_and_settings_or_nothing(tmp_path):
    """--purge removes the user's images and state (pi-reset-all --base) and
    settings too; an engine that cannot do it stops it all, nothing removed."""
    home = tmp_path / "home"
    config = home / ".config/pi-agent/config"
    config.parent.mkdir(parents=True)
    config.write_text("PI_AGENT_SNAPSHOT_KEEP=3\n")
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "docker").write_text('#!/bin/sh\necho "$@" >>"%s/docker.log"\n'
                                 '[ -e "%s/down" ] || exit 0\n'
                                 'echo "Cannot connect to the Docker daemon" >&2; exit 1\n'
                                 % (tmp_path, tmp_path))
    (fake / "docker").chmod(0o755)
    env = {"PATH": "%s:%s" % (fake, os.environ["PATH"])}
    assert install(home, "-y").returncode == 0
    (tmp_path / "down").write_text("")
    stopped = install(home, "--uninstall", "--purge", env=env)
    assert stopped.returncode == 1 and "nothing uninstalled" in stopped.stderr
    assert (home / ".local/share/pi-agent/pi_agent.py").exists() and config.exists()
    (tmp_path / "down").unlink()
    done = install(home, "--uninstall", "--purge", env=env)
    assert done.returncode == 0, done.stderr
    assert "rm -f -v" not in (tmp_path / "docker.log").read_text(), "no container to remove"
    assert not (home / ".local/share/pi-agent").exists() and not config.parent.exists()
    assert not (home / ".local/state/pi-agent").exists()
    assert install(home, "--purge").returncode == 1, "--purge goes with --uninstall"


def test_pi_agent_py_reads_top_to_bottom_and_its_map_is_true():
    """No definition is used above it (the house style: calls go upward in
    the file, to what is defined), pi_agent.py imports nothing outside the
    standard library, and CONTRIBUTING's map names its sections in order."""
    import ast
    import re
    import sys
    with open(os.path.join(ROOT, "pi_agent.py"), encoding="utf-8") as handle:
        source = handle.read()
    tree = ast.parse(source)
    defined = {}
    for number, node in enumerate(tree.body):
        names = [node.name] if isinstance(node, (ast.FunctionDef, ast.ClassDef)) else [
            target.id for target in getattr(node, "targets", []) if isinstance(target, ast.Name)]
        for name in names:
            defined.setdefault(name, number)
    forward = []
    for number, node in enumerate(tree.body):
        local = {sub.arg for sub in ast.walk(node) if isinstance(sub, ast.arg)} | {
            sub.id for sub in ast.walk(node) if isinstance(sub, ast.Name)
            and isinstance(sub.ctx, ast.Store)} if isinstance(node, (
                ast.FunctionDef, ast.ClassDef)) else set()
        forward += sorted({"%s -> %s" % (getattr(node, "name", "?"), sub.id)
                           for sub in ast.walk(node) if isinstance(sub, ast.Name)
                           and sub.id not in local and defined.get(sub.id, -1) > number})
    assert forward == [], "used above their definitions: %s" % forward
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names} | {node.module.split(".")[0] for node in ast.walk(tree)
                                            if isinstance(node, ast.ImportFrom) and node.module}
    if hasattr(sys, "stdlib_module_names"):
        assert imported <= set(sys.stdlib_module_names), imported - set(sys.stdlib_module_names)
    run_map = re.search(r"^# A run, as run_lifecycle.*?(?=^[^#])", source, re.M | re.S).group()
    named = set(re.findall(r"\b([A-Z][a-z]+[A-Z]\w*|[a-z]+_[a-z_]+)\b", run_map))
    methods = {sub.name for node in tree.body if isinstance(node, ast.ClassDef)
               for sub in node.body if isinstance(sub, ast.FunctionDef)}
    assert named and named <= set(defined) | methods, named - set(defined) - methods
    banners = re.findall(r"^# -{10,} (.+)$", source, re.M)
    with open(os.path.join(ROOT, "docs", "CONTRIBUTING.md"), encoding="utf-8") as handle:
        mapped = re.findall(r"^\| ([a-z][a-z ]+) \|", handle.read(), re.M)
    assert [name for name in mapped if name in banners] == banners, (banners, mapped)
