"""shell/pi.sh and install.sh: lint, silent sourcing in bash and zsh, and
installing into a fresh home (no Docker engine needed)."""

import os
import shutil
import subprocess

import pytest

from conftest import ROOT

FUNCTIONS = ("pi", "pi-shell", "pi-exec", "pi-status", "pi-snapshots", "pi-rollback",
             "pi-reset-system", "pi-reset-all", "pi-rebuild-base", "pi-prune", "pi-flatten",
             "pi-orphans",
             "pi-recover", "pi-clean-orphans", "pi-unlock")
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


def install(home, *args, shell="dash", env=None):
    need(shell)
    full_env = {"PATH": os.environ["PATH"], "HOME": str(home)}
    full_env.update(env or {})
    return subprocess.run([shell, os.path.join(ROOT, "install.sh"), *args],
                          capture_output=True, text=True, env=full_env, stdin=subprocess.DEVNULL)


def test_install_from_a_checkout_is_idempotent_and_works_in_bash_and_zsh(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    first = install(home, "-y")
    assert first.returncode == 0, first.stderr
    rc_before = {name: (home / name).read_text() for name in (".bashrc", ".zshrc")}
    second = install(home, "-y")
    assert second.returncode == 0, second.stderr
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
    assert len(lines) == 2 and str(other) in lines[1], "and so does the other install's"


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
    assert not (home / ".bashrc").exists()


def test_install_refuses_an_old_python(tmp_path):
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "python3").write_text("#!/bin/sh\n[ \"$1\" = -c ] && case $2 in *exit*) exit 1;; "
                                  "*) echo 3.8.10;; esac\n")
    (fake / "python3").chmod(0o755)
    result = install(tmp_path, "-y", env={"PATH": "%s:%s" % (fake, os.environ["PATH"])})
    assert result.returncode == 1 and "3.9" in result.stderr
    assert not (tmp_path / ".local").exists()
