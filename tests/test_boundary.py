"""What crosses the container's boundary besides the project: hard links
the project already has (into your home, a cache), what a save may cost
the engine's disk (a sparse file), and the environment (the locale, a
joined session's). Against the real engine where a `box` is used."""

import os
import signal

from conftest import wait_until

import pi_agent


def in_project(box, name):
    return os.path.exists(os.path.join(box.project, name))


# --- the environment ---------------------------------------------------------

def test_only_the_locale_variables_pass_and_only_with_a_locale_name():
    environ = {"LANG": "C.UTF-8", "LC_TIME": "en_DK.UTF-8@euro", "LC_SECRET": "tok",
               "LC_TOKEN": "ghp_x", "LC_CTYPE": "$(curl evil)", "LC_ALL": "x" * 65}
    env = dict(pi_agent.container_env(environ, []))
    assert env.get("LANG") == "C.UTF-8" and env.get("LC_TIME") == "en_DK.UTF-8@euro"
    for name in ("LC_SECRET", "LC_TOKEN", "LC_CTYPE", "LC_ALL"):
        assert name not in env


def test_an_lc_variable_of_yours_is_not_inside_but_the_locale_is(box):
    out = box.ok("pi-exec env", env={"LC_SECRET": "tok-lc-secret"}).stdout
    assert "tok-lc-secret" not in out and "LC_SECRET" not in out
    assert "LANG=C.UTF-8" in out.splitlines()


def test_a_joined_sessions_environment_is_not_in_the_run_directory(box):
    """The agent reads what is under /dev/pi-agent: the joiner's script
    there holds no value of its environment, which still reaches it."""
    value = "Europe/Joiner_Only_Zone"
    run = box.background(
        "pi-exec sh -c 'touch ready; while [ ! -e go ]; do sleep 0.1; done; "
        "ls -la /dev/pi-agent > listing; cat /dev/pi-agent/join-* > seen 2>&1; "
        "touch read-done'")
    try:
        assert wait_until(lambda: in_project(box, "ready"), timeout=60)
        joined = box.ok("pi-shell", env={"TZ": value}, input=(
            "touch go; while [ ! -e read-done ]; do sleep 0.1; done; "
            "printf %s \"$TZ\" > join-tz; exit 0\n"), timeout=120)
        assert "joining" in joined.stderr
        assert run.wait(timeout=60) == 0
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGTERM)
    read = lambda name: open(os.path.join(box.project, name)).read()  # noqa: E731
    assert "join-" in read("listing"), "the agent looked while the session was in"
    assert "cd " in read("seen"), "and could read the script"
    assert value not in read("seen")
    assert read("join-tz") == value, "the session has its environment all the same"
