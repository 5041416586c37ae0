"""What crosses the container's boundary besides the project: hard links
the project already has (into your home, a cache), what a save may cost
the engine's disk (a sparse file), and the environment (the locale, a
joined session's). Against the real engine where a `box` is used."""

import os

from conftest import docker, wait_until

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
    with box.running(
            "pi-exec sh -c 'touch ready; while [ ! -e go ]; do sleep 0.1; done; "
            "ls -la /dev/pi-agent > listing; cat /dev/pi-agent/join-* > seen 2>&1; "
            "touch read-done'") as run:
        assert wait_until(lambda: in_project(box, "ready"), timeout=60)
        joined = box.ok("pi-shell", env={"TZ": value}, input=(
            "touch go; while [ ! -e read-done ]; do sleep 0.1; done; "
            "printf %s \"$TZ\" > join-tz; exit 0\n"), timeout=120)
        assert "joining" in joined.stderr
        assert run.wait(timeout=60) == 0
    read = lambda name: open(os.path.join(box.project, name)).read()  # noqa: E731
    assert "join-" in read("listing"), "the agent looked while the session was in"
    assert "cd " in read("seen"), "and could read the script"
    assert value not in read("seen")
    assert read("join-tz") == value, "the session has its environment all the same"


# --- hard links the project already has ----------------------------------------

def linked_venv_file(box):
    """A file of your home (a tool's cache), hard-linked into the project's .venv."""
    outside = os.path.join(box.home, "cache", "x.py")
    os.makedirs(os.path.dirname(outside))
    with open(outside, "w") as handle:
        handle.write("home's own\n")
    os.chmod(outside, 0o644)
    inside = os.path.join(box.mkdir(os.path.join(box.project, ".venv", "lib")), "x.py")
    os.link(outside, inside)
    box.chown(os.path.join(box.home, "cache"))
    box.chown(os.path.join(box.project, ".venv"))
    return outside, inside


def test_a_hard_link_into_your_home_is_a_copy_before_the_agent_starts(box):
    outside, inside = linked_venv_file(box)
    before = os.lstat(outside)
    run = box.ok("pi-exec sh -c 'stat -c %h .venv/lib/x.py; echo agent > .venv/lib/x.py; "
                 "sudo chown root .venv/lib/x.py; sudo chmod u+s .venv/lib/x.py'")
    assert run.stdout.split() == ["1"], "a copy already when the agent starts"
    assert "copies of their own" in run.stderr and "1 file in .venv" in run.stderr
    after = os.lstat(outside)
    assert open(outside).read() == "home's own\n"
    assert (after.st_uid, after.st_mode, after.st_nlink, after.st_mtime_ns) == (
        before.st_uid, before.st_mode, 1, before.st_mtime_ns)
    mine = os.lstat(inside)
    assert mine.st_nlink == 1 and mine.st_ino != after.st_ino
    assert open(inside).read() == "agent\n"
    assert not mine.st_mode & 0o6000, "the sweep cleared setuid on the agent's copy"


def test_refuse_stops_the_run_and_names_the_fix_and_allow_names_what_changed(box):
    outside, inside = linked_venv_file(box)
    refused = box.sh("pi-exec touch ran", env={"PI_AGENT_HARDLINKS": "refuse"})
    assert refused.returncode == 3
    assert "uv sync --link-mode=copy" in refused.stderr and "package-import-method=copy" in \
        refused.stderr and ".venv" in refused.stderr
    assert not in_project(box, "ran") and os.lstat(inside).st_nlink == 2
    allowed = box.ok("pi-exec sh -c 'echo agent > .venv/lib/x.py'",
                     env={"PI_AGENT_HARDLINKS": "allow", "PI_AGENT_SAVE": "foreground"})
    assert open(outside).read() == "agent\n", "allow: today's behaviour, named for what it is"
    assert ".venv/lib/x.py" in allowed.stderr and "PI_AGENT_HARDLINKS=allow" in allowed.stderr
    bad = box.sh("pi-exec true", env={"PI_AGENT_HARDLINKS": "sometimes"})
    assert bad.returncode == 9


def test_links_with_every_name_in_the_project_stay_and_installs_inside_copy(box):
    with open(os.path.join(box.project, "a"), "w") as handle:
        handle.write("one\n")
    os.link(os.path.join(box.project, "a"), os.path.join(box.project, "b"))
    box.chown(box.project)
    out = box.ok("pi-exec sh -c 'echo $UV_LINK_MODE $npm_config_package_import_method'")
    assert out.stdout.split() == ["copy", "copy"]
    assert os.lstat(os.path.join(box.project, "a")).st_nlink == 2
    assert "copies" not in out.stderr


def test_only_shared_files_outside_or_read_only_count():
    def info(ino, nlink):
        return os.stat_result((0o100644, ino, 1, nlink, 0, 0, 1, 0, 0, 0))
    found = [("a", info(1, 2)), ("b", info(1, 2)),          # both names here: stays
             (".venv/x", info(2, 3)), (".venv/y", info(2, 3)),  # a third name elsewhere
             ("sub/.git/hooks/h", info(3, 2)), ("h", info(3, 2)),  # one name read-only
             ("sub/.git/objects/o", info(4, 2))]              # read-only only: stays
    shared = pi_agent.shared_files(found, ["sub/.git"])
    assert sorted(shared) == [".venv/x", ".venv/y", "h"]


# --- what a save may cost -------------------------------------------------------

def test_a_sparse_file_too_big_to_save_waits_and_drop_saves_the_rest(box):
    """truncate costs the agent nothing, a commit writes every byte."""
    root = docker("info", "--format", "{{.DockerRootDir}}").stdout.strip()

    def used():
        disk = os.statvfs(root)
        return (disk.f_blocks - disk.f_bfree) * disk.f_frsize

    box.extra_env["PI_AGENT_SAVE_LIMIT"] = "1G"
    box.ok("pi-exec true")
    current = box.images()["current"]
    before = used()
    box.ok("pi-exec sh -c 'truncate -s 3G /tmp/big; echo kept > ~/kept'")
    box.wait_saved()
    [cid] = box.containers()
    name = docker("inspect", "--format", "{{.Name}}", cid).stdout.strip().lstrip("/")
    waiting = box.state().get("waiting") or {}
    assert list(waiting) == [name] and waiting[name]["size"] >= 3 << 30
    assert ["/tmp/big", 3 << 30] in waiting[name]["largest"]
    assert box.images()["current"] == current, "not committed"
    said = box.ok("pi-exec true").stderr
    assert "/tmp/big" in said and "pi-recover --drop PATH ... " + name in said
    again = box.ok("pi-exec true").stderr
    assert "/tmp/big" not in again, "said once; no recovery retries it"
    box.wait_saved()
    assert box.containers() == [cid]
    assert "waiting" in box.ok("pi-orphans").stdout
    assert "/tmp/big" in box.ok("pi-status").stdout
    bad = box.sh("pi-recover --drop /tmp/../etc/passwd")
    assert bad.returncode == 2
    link = box.sh("pi-recover --drop /tmp/big/x")
    assert link.returncode == 3 and "did not change" in link.stderr
    recovered = box.ok("pi-recover --drop /tmp/big")
    assert "recovered" in recovered.stderr
    assert box.containers() == [] and not box.state().get("waiting")
    assert box.images()["current"] != current
    box.ok("pi-exec sh -c 'test ! -e /tmp/big && test -e ~/kept'")
    assert used() - before < (3 << 30) // 2, "the holes were never written out"


def test_what_a_save_may_cost():
    class Line:
        config = pi_agent.Config({"HOME": "/home/alice"})

    free, pi_agent.engine_free_space = pi_agent.engine_free_space, lambda line: 10 << 30
    try:
        assert pi_agent.save_cost(Line, 4 << 30) == 4 << 30
        for size in (6 << 30, 30 << 30):  # half the free space; the free space less a margin
            try:
                pi_agent.save_cost(Line, size)
                raise AssertionError("saved %d" % size)
            except pi_agent.SaveWaits as err:
                assert "free" in str(err)
        pi_agent.engine_free_space = lambda line: None
        assert pi_agent.save_cost(Line, 19 << 30) == 19 << 30
        Line.config = pi_agent.Config({"HOME": "/home/alice", "PI_AGENT_SAVE_LIMIT": "none"})
        assert pi_agent.save_cost(Line, 100 << 30) == 100 << 30
    finally:
        pi_agent.engine_free_space = free
