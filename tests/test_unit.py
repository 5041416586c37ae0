"""The pure logic of pi_agent.py: no Docker engine involved."""

import csv
import io
import json
import os
import re
import subprocess
import sys

import pytest

import pi_agent
from conftest import ROOT

HOME = "/home/alice"


def git_init(path):
    subprocess.run(["git", "init", "-q", path], check=True)
    return os.path.join(path, ".git")


@pytest.fixture
def home(tmp_path):
    path = tmp_path / "home" / "alice"
    path.mkdir(parents=True)
    return str(path)


# --- target choice and refusals ---------------------------------------------

def test_target_is_the_git_root_and_subdir_is_kept(home):
    app = os.path.join(home, "src", "app")
    os.makedirs(os.path.join(app, "lib", "x"))
    dot = git_init(app)
    target, subdir, repo, notes = pi_agent.find_target(os.path.join(app, "lib", "x"), [home])
    assert (target, subdir, repo, notes) == (app, "lib/x", pi_agent.GitRepo(dot, dot), [])


def test_target_is_cwd_outside_a_repository(home):
    notes = os.path.join(home, "notes")
    os.mkdir(notes)
    assert pi_agent.find_target(notes, [home]) == (notes, "", None, [])


def test_here_mounts_cwd_even_inside_a_repository(home):
    app = os.path.join(home, "app")
    os.makedirs(os.path.join(app, "lib"))
    git_init(app)
    assert pi_agent.find_target(os.path.join(app, "lib"), [home], here=True)[:3] == (
        os.path.join(app, "lib"), "", None)


@pytest.mark.parametrize("cwd", ["/home/alice", "/home", "/"])
def test_home_and_above_are_refused(cwd):
    with pytest.raises(pi_agent.Refused) as err:
        pi_agent.find_target(cwd, [HOME])
    assert err.value.code == pi_agent.EXIT_REFUSED


def test_repository_rooted_at_home_is_refused_and_suggests_here(home):
    git_init(home)
    proj = os.path.join(home, "proj")
    os.mkdir(proj)
    with pytest.raises(pi_agent.Refused, match="--here"):
        pi_agent.find_target(proj, [home])
    assert pi_agent.find_target(proj, [home], here=True)[:2] == (proj, "")


def test_every_home_counts():
    with pytest.raises(pi_agent.Refused):
        pi_agent.find_target("/srv/real-home", ["/tmp/fake", "/srv/real-home"])


@pytest.mark.parametrize("secret", [".ssh", ".gnupg", ".aws", ".config/gcloud"])
def test_credential_directories_are_refused(secret):
    with pytest.raises(pi_agent.Refused, match="credentials"):
        pi_agent.find_target(HOME + "/" + secret + "/sub", [HOME])


def test_a_directory_holding_credentials_is_refused():
    # ~/.config holds ~/.config/gh's and ~/.config/gcloud's tokens.
    with pytest.raises(pi_agent.Refused, match=r"credentials \(~/\.config/gcloud\)"):
        pi_agent.find_target(HOME + "/.config", [HOME])


def test_sibling_of_home_with_common_prefix_is_fine():
    assert pi_agent.find_target("/home/alice2/p", [HOME])[0] == "/home/alice2/p"


@pytest.mark.parametrize("path", ["/tmp", "/var/tmp", "/dev/shm", "/run", "/run/user/1000",
                                  "/var", "/etc", "/etc/nginx", "/usr", "/var/lib/docker",
                                  "/proc/1", "/opt"])
def test_shared_and_system_directories_are_refused(path):
    with pytest.raises(pi_agent.Refused, match="share|system"):
        pi_agent.find_target(path, [HOME])


def test_a_project_inside_tmp_is_fine(tmp_path):
    assert pi_agent.find_target(str(tmp_path), [HOME])[0] == str(tmp_path)


def test_pi_agents_own_directories_are_never_a_project(home):
    state = os.path.join(home, "proj", "state")
    os.makedirs(state)
    for cwd in (os.path.join(home, "proj"), state):
        with pytest.raises(pi_agent.Refused, match="pi-agent's own files"):
            pi_agent.find_target(cwd, [home], guarded=[state])


def test_a_project_holding_the_ca_certificates_is_refused(home):
    """The agent could add a certificate the next base build would trust."""
    project = os.path.join(home, "src", "app")
    certs = os.path.join(project, "certs")
    os.makedirs(certs)
    config = pi_agent.Config({"HOME": home, "PI_AGENT_CA_CERTS": certs})
    with pytest.raises(pi_agent.Refused, match="holds pi-agent's own files"):
        pi_agent.find_target(project, [home], guarded=pi_agent.guarded_dirs(config))


def test_a_config_file_in_home_guards_itself_not_the_home(home):
    config = pi_agent.Config({"HOME": home, "PI_AGENT_CONFIG": os.path.join(home, ".pi.conf")})
    guarded = pi_agent.guarded_dirs(config)
    project = os.path.join(home, "src", "app")
    os.makedirs(project)
    assert pi_agent.find_target(project, [home], guarded=guarded)[0] == project
    holder = os.path.join(home, "conf")
    os.makedirs(holder)
    config = pi_agent.Config({"HOME": home, "PI_AGENT_CONFIG": os.path.join(holder, "pi.conf")})
    with pytest.raises(pi_agent.Refused, match="holds pi-agent's own files"):
        pi_agent.find_target(holder, [home], guarded=pi_agent.guarded_dirs(config))


def test_a_git_directory_is_not_a_work_tree(home):
    dot = git_init(os.path.join(home, "app"))
    for cwd in (dot, os.path.join(dot, "hooks")):
        with pytest.raises(pi_agent.Refused, match="git directory"):
            pi_agent.find_target(cwd, [home], here=True)


# --- a .git the agent may have written never chooses what is mounted --------

def write(path, text):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as handle:
        handle.write(text)


@pytest.mark.parametrize("gitdir", ["/run", "/root", "../../..", "/etc"])
def test_a_gitdir_file_naming_any_directory_is_ignored(home, gitdir):
    project = os.path.join(home, "p")
    write(os.path.join(project, ".git"), "gitdir: %s\n" % gitdir)
    target, subdir, repo, notes = pi_agent.find_target(project, [home])
    assert (target, repo) == (project, None)
    assert len(notes) == 1 and notes[0].startswith("ignoring %s/.git: " % project)


def test_a_gitdir_file_in_a_subdirectory_of_a_repository_is_ignored(home):
    app = os.path.join(home, "app")
    os.makedirs(os.path.join(home, ".ssh"))
    dot = git_init(app)
    write(os.path.join(app, "lib", ".git"), "gitdir: %s\n" % os.path.join(home, ".ssh"))
    target, subdir, repo, notes = pi_agent.find_target(os.path.join(app, "lib"), [home])
    assert (target, subdir, repo) == (app, "lib", pi_agent.GitRepo(dot, dot))
    assert "ignoring %s/lib/.git" % app in notes[0]


def test_a_worktree_must_be_one_its_repository_points_back_at(home):
    main = os.path.join(home, "main")
    git_init(main)
    subprocess.run(["git", "-C", main, "-c", "user.name=a", "-c", "user.email=a@b", "commit",
                    "-q", "--allow-empty", "-m", "x"], check=True)
    wt = os.path.join(home, "wt")
    subprocess.run(["git", "-C", main, "worktree", "add", "-q", wt], check=True)
    target, subdir, repo, notes = pi_agent.find_target(wt, [home])
    assert target == wt and repo.linked and notes == []
    assert repo.common == os.path.join(main, ".git")
    # The same .git file copied elsewhere: the repository does not point back.
    other = os.path.join(home, "other")
    write(os.path.join(other, ".git"), open(os.path.join(wt, ".git")).read())
    assert pi_agent.find_target(other, [home])[2:] == (None, [
        "ignoring %s/.git: it names %s, which is not a worktree of a repository that points "
        "back here" % (other, repo.gitdir)])


def test_paths_are_resolved_physically_not_lexically(home):
    """link/.. is where link points, up one: not the directory link is in."""
    main = os.path.join(home, "deep", "main")
    git_init(main)
    project = os.path.join(home, "p")
    os.makedirs(os.path.join(project, "d"))
    os.symlink(os.path.join(home, "deep", "main", ".git"), os.path.join(project, "d", "link"))
    write(os.path.join(project, ".git"), "gitdir: d/link/../.git\n")
    assert pi_agent.find_target(project, [home])[2] is None


@pytest.mark.parametrize("plant", ["symlink", "commondir", "empty-config"])
def test_a_doctored_git_directory_is_ignored(home, plant):
    project = os.path.join(home, "p")
    os.makedirs(project)
    if plant == "symlink":
        git_init(os.path.join(home, "real"))
        os.symlink(os.path.join(home, "real", ".git"), os.path.join(project, ".git"))
    elif plant == "commondir":
        dot = git_init(project)
        write(os.path.join(dot, "commondir"), "c\n")
    else:
        os.makedirs(os.path.join(project, ".git", "objects"))
    target, subdir, repo, notes = pi_agent.find_target(project, [home])
    assert repo is None and len(notes) == 1 and "ignoring" in notes[0]


def test_an_empty_git_directory_counts_as_none(home):
    project = os.path.join(home, "p")
    os.makedirs(os.path.join(project, ".git"))
    assert pi_agent.find_target(project, [home])[2:] == (None, [])


# --- mount point ------------------------------------------------------------

@pytest.mark.parametrize("target,expected", [
    ("/home/alice/src/app", "/home/alice/src/app"),
    ("/tmp/x y", "/tmp/x y"),
    ("/srv/app", "/srv/app"),
    ("/home", "/workspace/home"),
    ("/usr", "/workspace/usr"),
    ("/usr/local/src/app", "/workspace/app"),
    ("/etc/nginx", "/workspace/nginx"),
    ("/root/app", "/root/app"),
    ("/home/agent", "/workspace/agent"),
    ("/home/agent/app", "/home/agent/app"),
    ("/var", "/workspace/var"),
])
def test_mount_point_keeps_the_host_path_unless_it_shadows_the_image(target, expected):
    assert pi_agent.mount_point(target, "/home/agent") == expected


@pytest.mark.parametrize("home,expected", [
    ("/home/alice", "/home/alice"), ("/root", "/root"), ("/Users/bob", "/Users/bob"),
    ("/", "/home/agent"), ("/usr/lib/svc", "/home/agent")])
def test_agent_home_is_the_host_home_path_where_usable(home, expected):
    assert pi_agent.agent_home({"HOME": home}) == expected


def test_mount_at_setting_wins():
    assert pi_agent.mount_point("/home/alice/app", "/home/agent", "/workspace") == "/workspace"


@pytest.mark.parametrize("path", ["/tmp/a b", "/tmp/a,b", "/tmp/a:b", '/tmp/a"b', "/tmp/é ü",
                                  "/tmp/'q'", " /lead"])
def test_mount_spec_survives_csv_parsing(path):
    fields = next(csv.reader(io.StringIO(pi_agent.mount_spec(path, path))))
    assert fields == ["type=bind", "source=" + path, "target=" + path]


# --- environment ------------------------------------------------------------

def test_container_env_allows_only_the_short_list_and_pass_env():
    environ = {"TERM": "xterm", "LANG": "C.UTF-8", "LC_ALL": "C", "HOME": "/home/alice",
               "GITHUB_TOKEN": "ghp_x", "ANTHROPIC_API_KEY": "sk", "SECRET": "s",
               "PATH": "/bin"}
    env = dict(pi_agent.container_env(environ, ["ANTHROPIC_API_KEY", "UNSET_ONE"]))
    assert {k: v for k, v in env.items() if v} == {
        "TERM": "xterm", "LANG": "C.UTF-8", "LC_ALL": "C", "ANTHROPIC_API_KEY": "sk"}
    assert env["GITHUB_TOKEN"] == "" and env["SSH_AUTH_SOCK"] == ""
    assert "HOME" not in env and "PATH" not in env and "SECRET" not in env


@pytest.mark.parametrize("name", ["GITHUB_TOKEN", "SSH_AUTH_SOCK", "AWS_SECRET_ACCESS_KEY",
                                  "DOCKER_HOST"])
def test_pass_env_refuses_credentials(name):
    with pytest.raises(pi_agent.Refused, match=name):
        pi_agent.parse_pass_env("ANTHROPIC_API_KEY," + name)


def test_pass_env_rejects_bad_names():
    with pytest.raises(pi_agent.BadSetting):
        pi_agent.parse_pass_env("OK BAD-NAME")
    assert pi_agent.parse_pass_env(" A, B C ") == ["A", "B", "C"]


@pytest.mark.parametrize("name,value", [
    ("PI_AGENT_IMAGE_REPO", "Bad:Repo"), ("PI_AGENT_SNAPSHOT_KEEP", "-1"),
    ("PI_AGENT_AUTO_PRUNE", "maybe"), ("PI_AGENT_MOUNT_AT", "relative"),
    ("PI_AGENT_MOUNT_AT", "/usr"), ("PI_AGENT_MOUNT_AT", "/etc/x"), ("PI_AGENT_MOUNT_AT", "/"),
    ("PI_AGENT_STATE_DIR", "relative/dir"), ("PI_AGENT_DOCKERFILE", "Dockerfile"),
    ("PI_AGENT_SAVE", "sometimes"), ("PI_AGENT_COMMAND", "'unclosed")])
def test_bad_settings_are_reported_with_their_name(name, value):
    with pytest.raises(pi_agent.BadSetting, match=name):
        pi_agent.Config({"HOME": "/home/alice", name: value})


def test_defaults_and_sources():
    import pwd
    config = pi_agent.Config({"HOME": "/home/alice", "PI_AGENT_SNAPSHOT_KEEP": "3"})
    assert config.image_repo == "pi-agent-" + pwd.getpwuid(os.getuid()).pw_name
    assert config.state_dir == "/home/alice/.local/state/pi-agent"
    assert config.snapshot_keep == 3 and config.sources["PI_AGENT_SNAPSHOT_KEEP"] == "environment"
    assert config.sources["PI_AGENT_IMAGE_REPO"] == "default"
    assert config.dockerfile == os.path.join(ROOT, "Dockerfile")



def test_each_user_has_a_repository_of_their_own_and_keeps_the_shared_one_they_used(
        tmp_path, monkeypatch):
    """Users of one engine never share a repository by default; one whose
    state directory shows that they used the shared `pi-agent` of earlier
    versions keeps it; PI_AGENT_IMAGE_REPO still says which."""
    import pwd
    environ = {"HOME": str(tmp_path), "PI_AGENT_STATE_DIR": str(tmp_path / "state")}
    monkeypatch.setattr(pwd, "getpwuid", lambda uid: pwd.struct_passwd(
        ("alice.b", "x", uid, 0, "", "/home/alice", "/bin/sh")))
    assert pi_agent.Config(environ).image_repo == "pi-agent-alice.b"
    monkeypatch.setattr(pwd, "getpwuid", lambda uid: pwd.struct_passwd(
        ("Bob@CORP", "x", uid, 0, "", "/home/bob", "/bin/sh")))
    assert pi_agent.Config(environ).image_repo == "pi-agent-uid%d" % os.getuid()
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "pi-agent.lock").write_text("")
    config = pi_agent.Config(environ)
    assert config.image_repo == "pi-agent" and config.sources["PI_AGENT_IMAGE_REPO"] == "default"
    assert pi_agent.Config(dict(environ, PI_AGENT_IMAGE_REPO="team/x")).image_repo == "team/x"


def test_processes_and_memory_are_limited_by_default_and_none_lifts_a_limit():
    limits = pi_agent.Config({"HOME": "/home/alice"}).limits
    given = dict(zip(limits[::2], limits[1::2]))
    assert 0 < int(given["--pids-limit"]) <= 4096 and "--cpus" not in given
    assert re.fullmatch(r"[1-9]\d*[mg]", given["--memory"])
    assert pi_agent.Config({"HOME": "/home/alice", "PI_AGENT_PIDS": "none",
                            "PI_AGENT_MEMORY": "none"}).limits == []

# --- snapshots --------------------------------------------------------------

def test_snapshot_names_sort_and_stay_unique_within_a_second():
    epoch = 1795000000.25
    first = pi_agent.snapshot_name(epoch)
    assert pi_agent.SNAPSHOT_RE.match(first)
    second = pi_agent.snapshot_name(epoch, last=first)
    third = pi_agent.snapshot_name(epoch - 5, last=second)  # clock went back
    assert first < second < third
    assert abs(pi_agent.snapshot_epoch(first) - epoch) < 0.001


def test_retention_keeps_the_newest_one_a_day_for_a_week_and_one_a_week_for_a_month():
    now = pi_agent.utc_epoch([2026, 12, 6, 12, 0, 0])  # a Sunday, noon UTC

    def name(days_ago, hour):
        return pi_agent.snapshot_name(now - days_ago * 86400 - hour * 3600)
    snaps = [(name(day, hour), False) for day in range(60) for hour in (1, 2)]
    kept = pi_agent.retained(snaps, 3, now)
    assert kept == {name(0, 1), name(0, 2), name(1, 1)} | {
        name(day, 1) for day in range(7)} | {name(day, 1) for day in (7, 14, 21, 28)}, \
        "the 3 newest, today and the 6 days before, this week and the 4 before (to Sunday)"
    assert pi_agent.retained(snaps, 0, now) == kept - {name(0, 2)}
    assert pi_agent.retained([], 3, now) == set()


def test_noise_snapshots_do_not_crowd_out_real_states():
    now = pi_agent.utc_epoch([2026, 12, 6, 12, 0, 0])
    real_today, real_before = pi_agent.snapshot_name(now - 7200), pi_agent.snapshot_name(
        now - 3 * 86400)
    noisy = [pi_agent.snapshot_name(now - 60 * minute) for minute in range(1, 31)]
    snaps = [(name, True) for name in noisy] + [(real_today, False), (real_before, False)]
    kept = pi_agent.retained(snaps, 3, now)
    assert kept == set(noisy[:3]) | {real_today, real_before}, \
        "30 noisy runs later both real states stay; of the noise, the newest 3"
    assert pi_agent.retained([(name, False) for name, _ in snaps], 3, now) == set(
        noisy[:3]) | {real_before}, "(counted as real, the noise would push today's state out)"


def test_pins_are_tags_no_profile_can_read_as_its_own(tmp_path):
    environ = {"HOME": "/h", "PI_AGENT_STATE_DIR": "/s/p", "PI_AGENT_IMAGE_REPO": "r"}
    default = pi_agent.Line(pi_agent.Config(environ))
    pin = pi_agent.Line(pi_agent.Config(environ, profile="pin"))
    assert default.pin("before-upgrade") == "r:pin-before-upgrade"
    assert default.pin_named("pin-before-upgrade") == "before-upgrade"
    assert pin.pin_named("pin-pin-x") == "x" and default.pin_named("pin-pin-x") is None
    assert default.pin_named("pin-current") is None, "profile pin's current"
    assert default.pin_named("pin-snap-20261130-010203.004") is None, "profile pin's snapshot"
    assert default.pin_named("pin-a-current") is None and default.pin_named("pin-base") is None
    for bad in ("snap-1", "a-pin-b", "x-current", "Upper", "_x", "a" * 41, "a/b"):
        result = run_tool("snapshots", "--pin", bad, env=dict(os.environ, HOME=str(tmp_path)))
        assert result.returncode == 2 and result.stderr.count("\n") == 1, (bad, result.stderr)
        assert result.stderr.startswith("pi-agent: pi-snapshots: --pin ")
    result = run_tool("snapshots", "--unpin", "a", "--pin", "b")
    assert result.returncode == 2 and "pi-snapshots --help" in result.stderr


def test_a_run_that_changed_only_the_noise_named_is_noise():
    line = pi_agent.Line(pi_agent.Config({"HOME": "/home/u", "PI_AGENT_STATE_DIR": "/s/p"}))
    assert pi_agent.all_noise(line, ["/home/u/.bash_history",
                                     "/home/u/.pi/agent/sessions/--p--/1.jsonl",
                                     "/home/u/.pi/agent/sessions"])
    assert not pi_agent.all_noise(line, ["/home/u/.bash_history", "/home/u/.pi/agent/auth.json"])
    assert not pi_agent.all_noise(line, ["/tmp/x"]), "only what the setting names"
    assert not pi_agent.all_noise(line, []), "a run that changed nothing is not noise"
    mine = pi_agent.Line(pi_agent.Config({"HOME": "/home/u", "PI_AGENT_STATE_DIR": "/s/p",
                                          "PI_AGENT_NOISE": "~/notes/*.md, /srv/"}))
    assert pi_agent.all_noise(mine, ["/home/u/notes/a/b.md", "/srv/x"])
    assert not pi_agent.all_noise(mine, ["/home/u/.bash_history"]), "the setting replaces"
    with pytest.raises(pi_agent.BadSetting, match="PI_AGENT_NOISE"):
        pi_agent.Config({"HOME": "/h", "PI_AGENT_NOISE": "relative/path"})


# --- argument building ------------------------------------------------------

# What ask_engine makes of Debian's Docker 20.10 here (rootful, overlay2).
ROOTFUL_DOCKER = {"kind": "docker", "version": "20.10.24+dfsg1", "rootless": False, "remap": False,
                  "store": "overlay2", "os": "Debian GNU/Linux 12 (bookworm)", "local": True,
                  "root_dir": "/var/lib/docker",
                  "limits": ["--memory", "--pids-limit", "--cpus"]}


def stub_line(config, facts=ROOTFUL_DOCKER):
    """A line whose engine is `facts` (nothing asks a real engine)."""
    line = pi_agent.Line(config)
    line.engine = pi_agent.Engine(facts)
    return line


def make_plan(kind="exec", argv=("make", "test"), image=None, tty=False, environ=None,
              target="/home/alice/a,b", subdir="sub"):
    config = pi_agent.Config({"HOME": "/home/alice", "PI_AGENT_PASS_ENV": "API_KEY"})
    image = image or {"Id": "sha256:abc", "Config": {"Cmd": ["bash"], "Entrypoint": None,
                                                     "Env": ["HOME=/home/agent"]}}
    return pi_agent.RunPlan(stub_line(config), kind, list(argv), image,
                            pi_agent.Project(target, subdir), environ or {"API_KEY": "k"},
                            1795000000.0, 4242, tty, "snap-x")


def test_run_args_run_the_script_and_label_the_container():
    plan = make_plan()
    args = plan.run_args
    assert args[:3] == ["run", "-i", "--init"]
    assert "--entrypoint" not in args and args[-3:] == ["sha256:abc", "sh", "/dev/pi-agent/run"]
    labels = [args[i + 1] for i, a in enumerate(args) if a == "--label"]
    assert "pi-agent.pid=4242" in labels and "pi-agent.target=/home/alice/a,b" in labels
    mounts = [args[i + 1] for i, a in enumerate(args) if a == "--mount"]
    assert pi_agent.mount_spec(plan.run_dir, "/dev/pi-agent") + ",readonly" in mounts
    assert plan.workdir == "/home/alice/a,b/sub"
    # neither values nor the command are in the container's config
    assert "k" not in args and "make" not in args and "-e" not in args and "-w" not in args


def test_run_args_replace_an_entrypoint_only_when_there_is_one():
    plan = make_plan(image={"Id": "sha256:abc", "Config": {"Entrypoint": ["/init"]}})
    assert plan.run_args[-3:] == ["--entrypoint", "/dev/pi-agent/run", "sha256:abc"]


def test_tty_only_on_a_terminal():
    assert "-t" not in make_plan().run_args
    assert make_plan(tty=True).run_args[:4] == ["run", "-i", "-t", "--init"]


def test_run_script_carries_values_directory_and_arguments_exactly(tmp_path):
    work = tmp_path / "my project"
    (work / "sub dir").mkdir(parents=True)
    tricky = "it's \"$HOME\" `x`\nline two"
    argv = ["sh", "-c", 'printf "%s|" "$PWD" "$API_KEY" "$GITHUB_TOKEN" "$@"', "x",
            "a b", "$HOME", "'q'", ""]
    plan = make_plan(argv=argv, target=str(work), subdir="sub dir",
                     environ={"API_KEY": tricky, "GITHUB_TOKEN": "ghp_host"})
    script = tmp_path / "run"
    script.write_text(plan.script())
    out = subprocess.run(["sh", str(script)], env={"PATH": os.environ["PATH"]},
                         capture_output=True, text=True, check=True).stdout
    assert out == "|".join([str(work / "sub dir"), tricky, "", "a b", "$HOME", "'q'", ""]) + "|"
    assert tricky not in plan.script(redact=True)


def test_run_kind_installs_the_agent_when_missing():
    script = make_plan(kind="run", argv=["-p", "hello"]).script()
    assert "export PI_AGENT_INSTALL_CMD=" in script
    lines = script.splitlines()
    # As the parent that waits for joined sessions, or by exec where it cannot.
    assert lines[lines.index("trap stopped=1 INT TERM HUP") + 1].endswith(" pi -p hello")
    assert any(line.startswith("  exec sh -c ") and line.endswith(" pi -p hello")
               for line in lines)


def test_a_joining_session_script_runs_its_command_by_exec():
    plan = make_plan(kind="shell", argv=[])
    script = pi_agent.session_script(plan.container, plan.env, plan.line.config, plan.workdir,
                                     pi_agent.agent_command("shell", [], plan.line.config, ""))
    assert script.splitlines()[-1].startswith("exec sh -c ")
    assert "flock" not in script and "cd %s" % plan.workdir in script


def test_a_new_mount_point_in_a_non_root_home_gets_its_parents_made():
    config = {"Cmd": ["bash"], "User": "agent", "Env": ["HOME=/home/agent"]}
    image = {"Id": "sha256:abc", "Config": dict(config)}
    plan = make_plan(image=image, target="/home/agent/src/app/x", subdir="")
    assert plan.home_parents == ["/home/agent/src", "/home/agent/src/app"]
    known = dict(config, Labels={"pi-agent.mounts": '["/home/agent/src/other"]'})
    plan = make_plan(image={"Id": "sha256:abc", "Config": known},
                     target="/home/agent/src/app/x", subdir="")
    assert plan.home_parents == ["/home/agent/src/app"]
    root = {"Id": "sha256:abc", "Config": dict(config, User="root", Env=["HOME=/home/agent"])}
    assert make_plan(image=root, target="/home/agent/src/app", subdir="").home_parents == []


def test_a_remembered_current_is_used_only_when_whole():
    record = {"Id": "sha256:a", "Config": {}, "RootFS": {"Layers": []}, "RepoTags": []}
    assert pi_agent.remembered_current({"current": record}) is record
    for broken in (None, "x", {"Id": "sha256:a"}, dict(record, Config=None), dict(record, Id=1)):
        assert pi_agent.remembered_current({"current": broken}) is None


def test_near_misses_of_setting_names_are_named():
    environ = {"PI_AGENT_MEMORI": "4g", "PI_AGENT_FOO": "1", "PI_AGENT_PYTHON": "python3",
               "PI_AGENT_MEMORY": "1g", "OTHER": "x"}
    assert pi_agent.misspelled_settings(environ) == [
        "warning: PI_AGENT_MEMORI is not a setting; did you mean PI_AGENT_MEMORY?"]


def test_an_offline_run_does_not_try_to_install():
    config = pi_agent.Config({"HOME": "/home/alice"})
    image = {"Id": "sha256:abc", "Config": {"Cmd": ["bash"], "Env": ["HOME=/home/agent"]}}
    plan = pi_agent.RunPlan(stub_line(config), "run", [], image, pi_agent.Project("/tmp/p"),
                            {}, 1.0, 1, False, "snap-x", offline=True)
    assert "PI_AGENT_INSTALL_CMD\" >&2" not in plan.script() and "offline" in plan.script()


def test_released_cleanly():
    assert not pi_agent.released_cleanly({})  # no state file: look for leftovers
    assert pi_agent.released_cleanly({"holder": None, "removing": {"c": 1}})
    assert not pi_agent.released_cleanly({"holder": {"pid": 1}})
    assert not pi_agent.released_cleanly({"holder": None, "failed": "c"})


def test_commit_restores_config_and_overwrites_run_labels():
    image = {"Config": {"Cmd": ["bash", "-l"], "Entrypoint": ["/e p"]}}
    args = pi_agent.commit_args("c1", image, {"pi-agent.pid": "", "pi-agent.target": '/a "$HOME"'},
                                "msg")
    assert args[-1] == "c1"
    changes = [args[i + 1] for i, a in enumerate(args) if a == "--change"]
    assert 'ENTRYPOINT ["/e p"]' in changes and 'CMD ["bash", "-l"]' in changes
    assert 'LABEL "pi-agent.pid"=""' in changes
    assert 'LABEL "pi-agent.target"="/a \\"\\$HOME\\""' in changes


def test_commit_gives_an_image_without_a_command_the_fallback():
    args = pi_agent.commit_args("c1", {"Config": {"Cmd": None}}, {}, "m")
    assert "CMD [\"sh\"]" in args and not any(a.startswith("ENTRYPOINT") for a in args)


def test_commit_leaves_an_entrypoint_image_without_cmd_alone():
    args = pi_agent.commit_args("c1", {"Config": {"Entrypoint": ["/e"], "User": "1000:1000"}},
                                {}, "m")
    assert 'ENTRYPOINT ["/e"]' in args and "USER 1000:1000" in args
    assert not any(a.startswith("CMD") for a in args)


def test_only_mountpoint_changes():
    def only(output, mount):
        return pi_agent.only_mountpoint_changes(pi_agent.parse_diff(output), mount)
    assert only("C /tmp\nA /tmp/p q\n", "/tmp/p q")
    assert only("C /usr\nC /usr/sbin\nA /usr/sbin/docker-init\n", "/tmp/p q")
    assert not only("C /tmp\nA /tmp/p q\nA /tmp/x\n", "/tmp/p q")
    assert not only("D /tmp/p q\n", "/tmp/p q")


# --- parsing ----------------------------------------------------------------

@pytest.mark.parametrize("argv,wrapper,rest,values", [
    (["--wait", "-p", "x"], ["--wait"], ["-p", "x"], {}),
    (["--", "--help"], [], ["--help"], {}),
    (["--here", "--wait", "--", "make", "--wait"], ["--here", "--wait"], ["make", "--wait"], {}),
    (["make", "--wait"], [], ["make", "--wait"], {}),
    (["--agent", "codex", "--offline", "fix"], ["--agent", "codex", "--offline"], ["fix"],
     {"--agent": "codex"}),
    (["--agent=aider", "--", "--agent", "x"], ["--agent=aider"], ["--agent", "x"],
     {"--agent": "aider"}),
    (["--profile", "a", "--profile=b", "x"], ["--profile", "a", "--profile=b"], ["x"],
     {"--profile": "b"}),
])
def test_wrapper_options_come_first(argv, wrapper, rest, values):
    assert pi_agent.split_wrapper_args(argv) == (wrapper, rest, values)


@pytest.mark.parametrize("name,ok", [
    ("a", True), ("fix-tests", True), ("v1.2_x", True), ("9", True), ("a" * 40, True),
    ("", False), ("A", False), ("-a", False), (".a", False), ("a b", False), ("a/b", False),
    ("a" * 41, False), ("base", False), ("current", False), ("snap-1", False), ("a..b", False),
    ("a.", False), ("a.lock", False), ("é", False),
])
def test_profile_names_are_what_a_tag_a_directory_and_a_branch_allow(name, ok):
    assert (pi_agent.profile_problem(name) is None) == ok


def test_a_profile_has_its_own_tags_files_and_labels():
    environ = {"HOME": "/h", "PI_AGENT_STATE_DIR": "/s/p", "PI_AGENT_IMAGE_REPO": "pi-agent"}
    default = pi_agent.Line(pi_agent.Config(environ))
    line = pi_agent.Line(pi_agent.Config(environ, profile="snap"))
    assert (default.current, line.current) == ("pi-agent:current", "pi-agent:snap-current")
    assert line.snap("snap-20261130-010203.004") == "pi-agent:snap-snap-20261130-010203.004"
    assert line.base == default.base == "pi-agent:base"
    assert len({default.lock_path, line.lock_path, default.state_path, line.state_path}) == 4
    stamp = "snap-20261130-010203.004"
    assert default.snapshot_named(stamp) == stamp and line.snapshot_named(stamp) is None
    assert line.snapshot_named("snap-" + stamp) == stamp
    assert default.snapshot_named("snap-" + stamp) is None
    assert default.snapshot_named("x-" + stamp) is None
    mine = {"pi-agent.uid": str(os.getuid())}
    assert line.owns(dict(mine, **{"pi-agent.repo": "pi-agent", "pi-agent.profile": "snap"}))
    assert default.owns(dict(mine, **{"pi-agent.repo": "pi-agent"}))
    assert not line.owns(dict(mine, **{"pi-agent.repo": "pi-agent"}))
    assert not default.owns({"pi-agent.repo": "pi-agent", "pi-agent.uid": "99999"}), \
        "another user's"
    assert pi_agent.Line(pi_agent.Config(dict(environ, PI_AGENT_PROFILE="default"))).current \
        == default.current


@pytest.mark.parametrize("environ,flag,command,install,keys,agent", [
    ({}, None, "pi", "npm install -g @mariozechner/pi-coding-agent", "ANTHROPIC_API_KEY", "pi"),
    ({"PI_AGENT_AGENT": "claude"}, None, "claude", "npm install -g @anthropic-ai/claude-code",
     "ANTHROPIC_API_KEY", "claude"),
    ({"PI_AGENT_AGENT": "codex"}, None, "codex", "npm install -g @openai/codex",
     "OPENAI_API_KEY", "codex"),
    ({"PI_AGENT_AGENT": "opencode"}, None, "opencode", "npm install -g opencode-ai",
     "ANTHROPIC_API_KEY", "opencode"),
    ({"PI_AGENT_AGENT": "aider"}, None, "aider", "~/.local/share/aider/bin/pip install",
     "OPENAI_API_KEY", "aider"),
    # an explicit command stays, with the agent's install and keys
    ({"PI_AGENT_AGENT": "claude", "PI_AGENT_COMMAND": "claude --verbose"}, None,
     "claude --verbose", "@anthropic-ai/claude-code", "ANTHROPIC_API_KEY", "claude"),
    # a command that names an agent's picks its install command and keys
    ({"PI_AGENT_COMMAND": "codex"}, None, "codex", "@openai/codex", "OPENAI_API_KEY", "codex"),
    # pi --agent NAME, for one run, beats the settings but not an explicit key list
    ({"PI_AGENT_COMMAND": "mine", "PI_AGENT_INSTALL_CMD": "true", "PI_AGENT_PASS_ENV": "K"},
     "claude", "claude", "@anthropic-ai/claude-code", "K", "claude"),
    ({"PI_AGENT_PASS_ENV": "none"}, None, "pi", "pi-coding-agent", "", "pi"),
])
def test_agent_presets(environ, flag, command, install, keys, agent):
    config = pi_agent.Config(dict(environ, HOME="/home/alice"), agent=flag)
    assert (config.command, config.agent) == (command, agent)
    assert install in config.install_cmd
    assert keys in " ".join(config.pass_env) and bool(keys) == bool(config.pass_env)
    for name in config.pass_env:
        assert name not in pi_agent.CREDENTIAL_ENV
    environment = {name: "v" for name in pi_agent.CREDENTIAL_ENV + ("ANTHROPIC_API_KEY", "OTHER")}
    passed = dict(pi_agent.container_env(environment, config.pass_env))
    assert all(passed[name] == "" for name in pi_agent.CREDENTIAL_ENV), "never a credential"
    assert "OTHER" not in passed


def test_the_agents_keys_go_to_the_agent_and_a_list_you_set_to_every_run():
    image = {"Id": "sha256:abc", "Config": {"Cmd": ["bash"], "Env": ["HOME=/home/agent"]}}
    environ = {"ANTHROPIC_API_KEY": "k", "MINE": "m"}
    for settings, kind, passed in (({}, "run", "k"), ({}, "exec", None), ({}, "shell", None),
                                   ({"PI_AGENT_PASS_ENV": "MINE"}, "exec", "m")):
        config = pi_agent.Config(dict(settings, HOME="/home/alice"))
        plan = pi_agent.RunPlan(stub_line(config), kind, ["x"], image,
                                pi_agent.Project("/tmp/p"), environ, 1.0, 1, False, "snap-x")
        values = dict(plan.env)
        assert values.get("ANTHROPIC_API_KEY", values.get("MINE")) == passed, (settings, kind)


def test_an_unknown_agent_is_a_bad_setting_or_a_usage_error():
    with pytest.raises(pi_agent.BadSetting, match="use one of pi, claude, codex, aider, opencode"):
        pi_agent.Config({"HOME": "/home/alice", "PI_AGENT_AGENT": "gpt"})
    for argv in (["run", "--agent", "gpt"], ["exec", "--agent", "pi", "true"], ["run", "--agent"]):
        with pytest.raises(pi_agent.PiError) as err:
            pi_agent.parse_args(argv)
        assert err.value.code == 2


def test_ca_certificates_are_read_in_order_and_never_a_key(tmp_path):
    pem = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"
    (tmp_path / "b.crt").write_text(pem.replace("AAAA", "BBBB"))
    (tmp_path / "a.pem").write_text(pem)
    (tmp_path / "notes.txt").write_text("not read")
    config = pi_agent.Config({"HOME": "/home/alice", "PI_AGENT_CA_CERTS": str(tmp_path)})
    assert config.ca_certs.index("AAAA") < config.ca_certs.index("BBBB")
    assert "not read" not in config.ca_certs
    (tmp_path / "key.pem").write_text("-----BEGIN PRIVATE KEY-----\nx\n")
    with pytest.raises(pi_agent.Refused, match="private key"):
        pi_agent.Config({"HOME": "/home/alice", "PI_AGENT_CA_CERTS": str(tmp_path)})
    with pytest.raises(pi_agent.BadSetting, match="cannot read /nonexistent"):
        pi_agent.Config({"HOME": "/home/alice", "PI_AGENT_CA_CERTS": "/nonexistent"})
    with pytest.raises(pi_agent.BadSetting, match="must be an absolute path"):
        pi_agent.Config({"HOME": "/home/alice", "PI_AGENT_CA_CERTS": "certs/corp.crt"})
    # Only the certificate blocks of a file go into the image: never a secret
    # that came with them (an OpenVPN static key says no "PRIVATE KEY").
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "vpn.pem").write_text(pem + "-----BEGIN OpenVPN Static key V1-----\nSECRET\n"
                                   "-----END OpenVPN Static key V1-----\n")
    text = pi_agent.read_ca_certs(str(mixed))
    assert "SECRET" not in text and text.strip() == pem.strip()
    os.mkfifo(str(mixed / "pipe.crt"))
    with pytest.raises(pi_agent.BadSetting, match="not a certificate file"):
        pi_agent.read_ca_certs(str(mixed))
    os.remove(str(mixed / "pipe.crt"))
    (mixed / "bundle.crt").write_text(pem * 2000)
    with pytest.raises(pi_agent.BadSetting, match="more than a build can take"):
        pi_agent.read_ca_certs(str(mixed))


def test_a_slip_of_agent_is_a_usage_error_so_offline_is_never_lost():
    with pytest.raises(pi_agent.PiError, match="did you mean --agent") as err:
        pi_agent.parse_args(["run", "--agnet", "claude", "--offline"])
    assert err.value.code == 2


def run_tool(*args, env=None):
    return subprocess.run([sys.executable, os.path.join(ROOT, "pi_agent.py"), *args],
                          capture_output=True, text=True, env=env)


def test_help_lists_every_command_and_version_prints():
    out = run_tool("run", "--help").stdout
    for name in ("pi-shell", "pi-exec", "pi-status", "pi-snapshots", "pi-rollback",
                 "pi-reset-system", "pi-reset-all", "pi-rebuild-base", "pi-prune"):
        assert name in out
    assert run_tool("run", "--version").stdout.strip() == "pi-agent " + pi_agent.__version__


@pytest.mark.parametrize("argv,command", [
    (["exec"], "pi-exec"), (["rollback", "a", "b"], "pi-rollback"), (["prune", "-1"], "pi-prune"),
    (["prune", "abc"], "pi-prune"), (["status", "--bogus"], "pi-status"),
    (["no-such-command"], "pi-agent")])
def test_usage_errors_are_one_line_naming_the_command_and_exit_2(argv, command):
    result = run_tool(*argv)
    assert result.returncode == 2
    assert result.stderr.startswith("pi-agent: ") and result.stderr.count("\n") == 1
    assert command in result.stderr


def test_bad_setting_is_one_line_and_exit_9():
    env = dict(os.environ, PI_AGENT_SNAPSHOT_KEEP="many")
    result = run_tool("snapshots", env=env)
    assert result.returncode == 9
    assert result.stderr.count("\n") == 1 and "PI_AGENT_SNAPSHOT_KEEP" in result.stderr


@pytest.mark.parametrize("state_dir", ["/proc/no-such-dir", "/dev/null/below-a-file"])
def test_an_unusable_state_dir_is_one_line_and_exit_9(tmp_path, state_dir):
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "PI_AGENT_STATE_DIR": state_dir}
    project = tmp_path / "project"
    project.mkdir()
    result = subprocess.run([sys.executable, os.path.join(ROOT, "pi_agent.py"), "exec", "true"],
                            capture_output=True, text=True, env=env, cwd=str(project))
    assert result.returncode == 9, result.stderr
    assert result.stderr.count("\n") == 1 and "PI_AGENT_STATE_DIR" in result.stderr


def test_missing_docker_is_exit_6(tmp_path):
    env = {"PATH": str(tmp_path), "HOME": str(tmp_path / "h")}
    result = run_tool("snapshots", env=env)
    assert result.returncode == 6 and "docker" in result.stderr
    assert "Traceback" not in result.stderr


def python39():
    for candidate in (os.path.expanduser("~/.pyenv/versions/3.9.18/bin/python3"), "python3.9"):
        try:
            out = subprocess.run([candidate, "--version"], capture_output=True, text=True)
        except OSError:
            continue
        if out.returncode == 0 and out.stdout.startswith("Python 3.9"):
            return candidate
    return None


def test_runs_on_the_oldest_supported_python():
    """Python 3.9 runs it where one is installed; its grammar is checked always."""
    import ast
    ast.parse(open(os.path.join(ROOT, "pi_agent.py")).read(), feature_version=(3, 9))
    interpreter = python39()
    if interpreter:
        result = subprocess.run([interpreter, os.path.join(ROOT, "pi_agent.py"), "run", "--help"],
                                capture_output=True, text=True)
        assert result.returncode == 0, result.stderr


def test_stdlib_only():
    import ast
    tree = ast.parse(open(os.path.join(ROOT, "pi_agent.py")).read())
    modules = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
               for alias in node.names}
    modules |= {node.module.split(".")[0] for node in ast.walk(tree)
                if isinstance(node, ast.ImportFrom) and node.module}
    assert modules <= set(sys.stdlib_module_names)


def test_json_state_roundtrip(tmp_path):
    config = pi_agent.Config({"HOME": str(tmp_path), "PI_AGENT_STATE_DIR": str(tmp_path / "s"),
                              "PI_AGENT_IMAGE_REPO": "a/b"})
    line = pi_agent.Line(config)
    assert line.read_state() == {}
    line.write_state({"last_snapshot": "snap-x"})
    assert line.read_state() == {"last_snapshot": "snap-x"}
    assert os.path.basename(line.lock_path) == "a%2Fb.lock"
    with open(line.state_path, "w") as handle:
        handle.write("{broken")
    assert line.read_state() == {"corrupt": True}
    assert json.loads(json.dumps(line.read_state()))


# --- the config file and precedence -----------------------------------------

def write_config(tmp_path, text):
    path = tmp_path / "config"
    path.write_text(text)
    return {"HOME": str(tmp_path), "PI_AGENT_CONFIG": str(path)}


@pytest.mark.parametrize("in_file,in_env,expected,source", [
    (None, None, 10, "default"),
    ("3", None, 3, "file"),
    ("3", "5", 5, "environment"),
    (None, "5", 5, "environment"),
])
def test_precedence_defaults_then_file_then_environment(tmp_path, in_file, in_env, expected,
                                                        source):
    environ = write_config(tmp_path, "# mine\n\nPI_AGENT_SNAPSHOT_KEEP=%s\n" % in_file
                           if in_file else "")
    if in_env:
        environ["PI_AGENT_SNAPSHOT_KEEP"] = in_env
    config = pi_agent.Config(environ)
    assert config.snapshot_keep == expected
    where = config.sources["PI_AGENT_SNAPSHOT_KEEP"]
    assert where == ("%s line 3" % environ["PI_AGENT_CONFIG"] if source == "file" else source)


def test_a_flag_beats_every_setting(tmp_path):
    environ = write_config(tmp_path, "PI_AGENT_NETWORK=bridge\n")
    config = pi_agent.Config(environ)
    assert config.network == "bridge"
    image = {"Id": "sha256:abc", "Config": {"Cmd": ["bash"], "Env": ["HOME=/home/agent"]}}
    plan = pi_agent.RunPlan(stub_line(config), "exec", ["true"], image,
                            pi_agent.Project("/tmp/p"), {}, 1.0, 1, False, "snap-x", offline=True)
    assert plan.run_args[plan.run_args.index("--network") + 1] == "none"


@pytest.mark.parametrize("line", [
    "PI_AGENT_DOCKERFILE=~/df/Dockerfile",
    "PI_AGENT_DOCKERFILE=~",
    "PI_AGENT_COMMAND='~/x'",
    "PI_AGENT_COMMAND=claude # the agent",
    "export PI_AGENT_COMMAND='claude --verbose'  # quoted",
    '  PI_AGENT_COMMAND="say \\"hi\\" \\$x \\\\ \\n"  ',
    "PI_AGENT_COMMAND=a#b",
    "PI_AGENT_COMMAND=a\\ b'c'\"d\"",
    "PI_AGENT_PASS_ENV=",
])
def test_config_file_lines_mean_what_a_shell_assigns(tmp_path, line):
    environ = write_config(tmp_path, "# mine\n%s\n#PI_AGENT_IMAGE_REPO=x\n" % line)
    name = line.strip().replace("export ", "").split("=")[0]
    shell = subprocess.run(["sh", "-c", '. "$1"; eval "printf %%s \\"\\$%s\\""' % name, "sh",
                            environ["PI_AGENT_CONFIG"]], env={"HOME": environ["HOME"]},
                           capture_output=True, text=True, check=True)
    config = pi_agent.Config(environ)
    assert config.raw[name] == shell.stdout or (not shell.stdout and config.sources[name]
                                                == "default")
    assert config.image_repo == pi_agent.own_repo(), "the commented line is not read"


@pytest.mark.parametrize("line,needle", [
    ("PI_AGENT_CPUS = 2", "no spaces around ="),
    ("PI_AGENT_CPUS= 2", "needs quotes"),
    ("PI_AGENT_COMMAND=claude --verbose", "needs quotes"),
    ("PI_AGENT_DOCKERFILE=$HOME/Dockerfile", "$ is not expanded"),
    ('PI_AGENT_COMMAND="$(id)"', "$ is not expanded"),
    ("PI_AGENT_COMMAND=a;b", "; is not allowed unquoted"),
    ("PI_AGENT_COMMAND='a", "unterminated"),
    ("PI_AGENT_IMAGE_REPO=~;id>&2", "; is not allowed unquoted"),
    ("PI_AGENT_NETWORK=~>x", "> is not allowed unquoted"),
    ("PI_AGENT_NETWORK=none\r# $(touch m)", "a control character"),
    ("PI_AGENT_NETWORK=none\r", "a Windows line end"),
    ("PI_AGENT_NETWORK=none\u2028# $(touch m)", "a control character"),
    ("PI_AGENT_NETWORK=none\x0c# $(touch m)", "a control character"),
    ("PI_AGENT_NETWORK=none\\", "a backslash at the end of a line"),
    ("\xa0PI_AGENT_NETWORK=none", "expected NAME=value"),
    ("PI_AGENT_NETWORK=none \xa0# c", "needs quotes"),
])
def test_config_file_lines_a_shell_would_read_otherwise_are_refused(tmp_path, line, needle):
    environ = write_config(tmp_path, "\n" + line + "\n")
    with pytest.raises(pi_agent.BadSetting) as err:
        pi_agent.Config(environ)
    assert str(err.value).startswith(environ["PI_AGENT_CONFIG"] + " line 2: ")
    assert needle in str(err.value)


def test_config_values_a_shell_would_read_otherwise_never_pass(tmp_path):
    """Random values: each one the parser accepts assigns the same in dash
    and runs nothing there (no command, no file made)."""
    import random
    pieces = list("ab \t#~/:'\"\\$`;&|<>()*=x\r{}!%-.")
    rng, accepted = random.Random(13), 0
    for _ in range(1500):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 8)))
        try:
            value = pi_agent.shell_value(text, "/home/fz")
        except pi_agent.BadSetting:
            continue
        accepted += 1
        work = tmp_path / str(accepted)
        work.mkdir()
        (work / "cfg").write_bytes(("X=" + text + "\n").encode())
        shell = subprocess.run(["/bin/dash", "-c", '. ./cfg; printf %s "$X"'], cwd=work,
                               capture_output=True, env={"HOME": "/home/fz", "PATH": "/none"})
        assert (shell.stdout.decode(), shell.stderr, os.listdir(work)) == (value, b"", ["cfg"]), \
            repr(text)
    assert accepted > 100


def fake_docker(tmp_path, images=""):
    """A docker on PATH for what a real engine cannot be made to do on
    demand: it knows no image or container but `images` (image ls
    output), and logs its calls to tmp_path/calls."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "images").write_text(images)
    (bin_dir / "docker").write_text(
        '#!/bin/sh\necho "$*" >> "%s/calls"\ncase "$1 $2" in\n'
        '  "image inspect"|"container inspect") echo "Error: No such $1: $3" >&2; exit 1 ;;\n'
        '  "image ls") cat "%s/images" ;;\nesac\nexit 0\n' % (tmp_path, bin_dir))
    (bin_dir / "docker").chmod(0o755)
    return "%s:%s" % (bin_dir, os.environ["PATH"])


def test_status_with_a_bad_setting_shows_everything_else_and_the_bad_lines(tmp_path):
    environ = dict(os.environ, **write_config(
        tmp_path, "PI_AGENT_SNAPSHOT_KEEP=3\nPI_AGENT_CPUS = 2\nPI_AGENT_MEMORY=lots\n"))
    environ.update(PATH=fake_docker(tmp_path), PI_AGENT_STATE_DIR=str(tmp_path / "state"))
    result = run_tool("status", env=environ)
    assert result.returncode == 9
    errors = [row for row in result.stderr.splitlines() if row.startswith("pi-agent: ")]
    assert "line 2: expected NAME=value with no spaces around =" in errors[0]
    assert "line 3: PI_AGENT_MEMORY=lots" in errors[1]
    assert "2 bad settings" in errors[2] and len(errors) == 3
    assert re.search(r"PI_AGENT_SNAPSHOT_KEEP +3 +\(.*config line 1\)", result.stdout)
    assert re.search(r"PI_AGENT_MEMORY +\d+[mg] +\(default, as the value is bad\)", result.stdout)
    assert "images:" in result.stdout and "target:" in result.stdout


CLASSIC_ERROR = ("\x1b[0mThe command '/bin/sh -c set -eu; if [ \"$NODE_FROM\" = npm ]; then npm "
                 "install --global node; fi' returned a non-zero code: 1\n")


def failing_build(tmp_path, output, ca_certs="", error=CLASSIC_ERROR):
    """pi-rebuild-base with a docker whose build prints `output` (as the
    classic builder does, on a terminal's colours) and fails with `error`:
    the last line of its stderr."""
    environ = dict(os.environ, PATH=fake_docker(tmp_path), HOME=str(tmp_path),
                   PI_AGENT_STATE_DIR=str(tmp_path / "state"), PI_AGENT_ENGINE="docker",
                   PI_AGENT_CA_CERTS=ca_certs, PI_AGENT_DOCKERFILE=str(tmp_path / "Dockerfile"))
    (tmp_path / "Dockerfile").write_text("FROM debian\nRUN npm install -g node\n")
    (tmp_path / "out").write_text("Step 2/2 : RUN set -eu; npm install\n ---> Running in 0123"
                                  "456789ab\n\x1b[31mnpm\x1b[39m ERR! %s\n" % output)
    (tmp_path / "err").write_text(error)
    docker = tmp_path / "bin" / "docker"
    docker.write_text(docker.read_text().replace('case "$1 $2" in', 'case "$1 $2" in\n  build*) '
                                                 'cat %s/out; cat %s/err >&2; exit 1 ;;'
                                                 % (tmp_path, tmp_path)))
    result = run_tool("rebuild-base", env=environ)
    assert result.returncode == 8 and "\x1b" not in result.stderr, result.stderr
    lines = result.stderr.splitlines()
    assert lines[0].startswith("pi-agent: building ") and len(lines) == 2, result.stderr
    return lines[-1]


@pytest.mark.parametrize("said", [
    "code SELF_SIGNED_CERT_IN_CHAIN",
    "code UNABLE_TO_GET_ISSUER_CERT_LOCALLY",
    "request to https://registry.npmjs.org/node failed, reason: self-signed certificate in "
    "certificate chain",
    "Err:1 https://mirror.example/debian bookworm InRelease\n  Certificate verification failed: "
    "The certificate is NOT trusted. The certificate issuer is unknown.  Could not handshake",
    "curl: (60) SSL certificate problem: unable to get local issuer certificate",
    "fatal: unable to access 'https://git.example/x.git/': server certificate verification "
    "failed. CAfile: none CRLfile: none",
    "ERROR: cannot verify deb.example's certificate, issued by 'CN=Corp Proxy CA'",
    "Could not fetch URL https://pypi.org/simple/x/: SSLError(SSLCertVerificationError(1, "
    "'[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed'))",
])
def test_a_build_that_no_certificate_trust_lets_through_names_the_setting(tmp_path, said):
    last = failing_build(tmp_path, said)
    assert last.startswith("pi-agent: docker build failed: a server's certificate was not "
                           "trusted (") and "set PI_AGENT_CA_CERTS to its CA certificate" in last
    assert "The command" not in last


def test_a_build_with_ca_certs_that_miss_the_proxy_says_to_add_it(tmp_path):
    (tmp_path / "corp.crt").write_text(
        "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n")
    last = failing_build(tmp_path, "code SELF_SIGNED_CERT_IN_CHAIN", str(tmp_path / "corp.crt"))
    assert "PI_AGENT_CA_CERTS=%s does not hold the CA that signed it" % (tmp_path / "corp.crt") \
        in last


def test_a_failed_build_step_is_said_without_escapes_or_its_whole_script(tmp_path):
    last = failing_build(tmp_path, "code E404 node@99 is not in this registry")
    assert last == ("pi-agent: docker build failed: The command '/bin/sh -c set -eu; if [ "
                    "\"$NODE_FROM\" = npm ]; then...' returned a non-zero code: 1")
    buildkit = failing_build(tmp_path, "code E404", error="ERROR: failed to solve: process "
                             "\"/bin/sh -c set -eu; if [ \\\"$NODE_FROM\\\" = npm ]; then npm "
                             "install --global node; fi\" did not complete successfully: exit "
                             "code: 1\n")
    assert buildkit == ("pi-agent: docker build failed: ERROR: failed to solve: process \"/bin/sh "
                        "-c set -eu; if [ \\\"$NODE_FROM\\\" = npm ]; th...\" did not complete "
                        "successfully: exit code: 1")


def test_status_check_goes_on_past_an_engine_that_is_down_and_says_each_failure(tmp_path):
    environ = dict(os.environ, PATH=fake_docker(tmp_path), HOME=str(tmp_path),
                   PI_AGENT_STATE_DIR=str(tmp_path / "state"), PI_AGENT_ENGINE="docker",
                   HTTPS_PROXY="http://127.0.0.1:9", NO_PROXY="", PI_AGENT_CPUS="lots")
    docker = tmp_path / "bin" / "docker"
    docker.write_text(docker.read_text().replace('case "$1 $2" in', 'case "$1 $2" in\n  info*) '
                                                 'echo "Cannot connect to the Docker daemon at '
                                                 'unix:///x.sock" >&2; exit 1 ;;'))
    result = run_tool("status", "--check", env=environ)
    lines = result.stdout.splitlines()
    assert [line.split()[:2] for line in lines] == [["setting:", "FAILED:"], ["engine:", "FAILED:"],
                                                    ["npm:", "FAILED:"]], result.stdout
    assert "PI_AGENT_CPUS=lots" in lines[0] and "cannot reach the Docker engine" in lines[1]
    assert lines[2].startswith("npm:     FAILED: https://registry.npmjs.org/: ") and \
        lines[2].endswith("behind a proxy, set HTTPS_PROXY and HTTP_PROXY")
    assert result.returncode == 10 and result.stderr == "pi-agent: 3 checks failed: see above\n"
    (tmp_path / "config.json").write_text('{"proxies": {"default": {"httpsProxy": '
                                          '"http://127.0.0.1:9"}}}')
    for name in pi_agent.PROXY_ENV:
        environ.pop(name, None)
    environ.update(DOCKER_CONFIG=str(tmp_path), PI_AGENT_CPUS="2")
    assert "npm:     FAILED: https://registry.npmjs.org/: [Errno 111] Connection refused" in \
        run_tool("status", "--check", env=environ).stdout, "the docker client's proxy, as a build's"


def test_answering_no_changes_nothing_and_is_a_refusal(tmp_path):
    import pty
    snap = ('{"repo":"pi-agent","tag":"snap-20260101-000000.000","id":"abc","created":"x",'
            '"size":"1 MB"}\n')
    environ = dict(os.environ, PATH=fake_docker(tmp_path, snap), HOME=str(tmp_path),
                   PI_AGENT_STATE_DIR=str(tmp_path / "state"), PI_AGENT_ENGINE="docker",
                   PI_AGENT_IMAGE_REPO="pi-agent")
    for command in ("reset-all", "clean-orphans"):
        if command == "clean-orphans":
            (tmp_path / "bin" / "docker").write_text((tmp_path / "bin" / "docker").read_text(
            ).replace('"image ls")', '"ps -a") echo \'{"names":"c1","pid":"1","host":"elsewhere"}'
                      '\' ;;\n  "image ls")'))
        main, secondary = pty.openpty()
        proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "pi_agent.py"), command],
                                stdin=secondary, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                env=environ, text=True)
        os.write(main, b"n\n")
        out, err = proc.communicate(timeout=30)
        os.close(secondary)
        os.close(main)
        assert proc.returncode == 3 and "nothing removed (answered no)" in err, err
        calls = (tmp_path / "calls").read_text()
        assert " rmi " not in " " + calls and "rm -f" not in calls


@pytest.mark.parametrize("text,needle", [
    ("PI_AGENT_SNAPSHOT_KEPE=3\n", "line 1: unknown setting PI_AGENT_SNAPSHOT_KEPE; did you mean "
                                   "PI_AGENT_SNAPSHOT_KEEP?"),
    ("\nnot a setting\n", "line 2: expected NAME=value"),
    ("PI_AGENT_SNAPSHOT_KEEP=ten\n", "line 1: PI_AGENT_SNAPSHOT_KEEP=ten is not a whole number"),
])
def test_config_file_mistakes_name_the_file_and_line(tmp_path, text, needle):
    environ = write_config(tmp_path, text)
    with pytest.raises(pi_agent.BadSetting) as err:
        pi_agent.Config(environ)
    assert environ["PI_AGENT_CONFIG"] in str(err.value) and needle in str(err.value)


@pytest.mark.parametrize("text,error,line", [
    ('\nPI_AGENT_PASS_ENV="A, AWS_SECRET_ACCESS_KEY"\n', pi_agent.Refused, 2),
    ("PI_AGENT_CPUS=2\nPI_AGENT_MEMORY=lots\n", pi_agent.BadSetting, 2),
    ("PI_AGENT_STATE_DIR=/tmp\n", pi_agent.BadSetting, 1),
])
def test_a_bad_value_names_the_line_it_came_from_whatever_the_check(tmp_path, text, error,
                                                                    line):
    environ = write_config(tmp_path, text)
    with pytest.raises(error) as err:
        pi_agent.Config(environ)
    assert str(err.value).startswith("%s line %d: " % (environ["PI_AGENT_CONFIG"], line))
    assert err.value.code == error.code


def test_the_trace_setting_works_from_the_config_file(tmp_path):
    trace = tmp_path / "trace"
    environ = dict(os.environ, **write_config(tmp_path, "PI_AGENT_TRACE=%s\n" % trace))
    environ.pop("PI_AGENT_TRACE", None)
    environ["PI_AGENT_ENGINE"] = "docker"  # (the stub's: not a Podman found on PATH)
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "docker").write_text("#!/bin/sh\nexit 0\n")
    (fake / "docker").chmod(0o755)
    environ["PATH"] = "%s:%s" % (fake, environ["PATH"])
    result = run_tool("snapshots", env=environ)
    assert result.returncode == 0, result.stderr
    assert "docker image ls" in trace.read_text()


def test_colour_only_on_a_terminal_and_never_with_no_color(tmp_path):
    import pty
    for extra, coloured in (({}, True), ({"NO_COLOR": "1"}, False)):
        main, secondary = pty.openpty()
        env = dict(os.environ, PI_AGENT_SNAPSHOT_KEEP="x", TERM="xterm", **extra)
        env.pop("NO_COLOR", None) if not extra else None
        proc = subprocess.run([sys.executable, os.path.join(ROOT, "pi_agent.py"), "status"],
                              stderr=secondary, stdout=subprocess.DEVNULL, env=env)
        os.close(secondary)
        output = os.read(main, 4096).decode()
        os.close(main)
        assert proc.returncode == 9 and ("\033[" in output) == coloured, output
    piped = run_tool("status", env=dict(os.environ, PI_AGENT_SNAPSHOT_KEEP="x"))
    assert "\033[" not in piped.stderr


# --- the engine: one probe, and what each engine gets ----------------------

ENGINE_FIXTURES = os.path.join(ROOT, "tests", "fixtures", "engines")
# What `docker info` / `podman info` said on each engine CI runs (verbatim).
ENGINE_CASES = {
    "docker-20.10-rootful": ("docker", dict(
        version="20.10.24+dfsg1", rootless=False, store="overlay2", lists_layers=True,
        sizes_are_disk=True, run_args=[], agent_uid=1000, inside=(1000, 1000),
        limits=["--memory", "--pids-limit", "--cpus"], max_layers=125, group_signals=True)),
    "docker-20.10-rootless": ("docker", dict(
        version="20.10.24+dfsg1", rootless=True, store="overlay2", lists_layers=True,
        sizes_are_disk=True, run_args=[], agent_uid=0, inside=(0, 0), limits=[],
        max_layers=125, group_signals=True)),
    "docker-26-containerd": ("docker", dict(
        version="26.1.5+dfsg1", rootless=False, store="containerd", lists_layers=False,
        sizes_are_disk=False, run_args=[], agent_uid=1000, inside=(1000, 1000),
        limits=["--memory", "--pids-limit", "--cpus"], max_layers=250, group_signals=True,
        free_space_dir=None)),
    "podman-4.3-rootless": ("podman", dict(
        version="4.3.1", rootless=True, store="overlay", lists_layers=False,
        sizes_are_disk=False, run_args=["--http-proxy=false", "--unsetenv", "container",
                                         "--unsetenv", "TERM"], agent_uid=0, inside=(0, 0),
        limits=[], max_layers=129, group_signals=False, empty_commits=True)),
}


@pytest.fixture
def engine_env(monkeypatch, tmp_path):
    """Fake engine commands on PATH (answering `info` with a fixture, and
    `image ls` with tmp_path/images), each call logged to tmp_path/calls;
    the engine choice forgotten, and no endpoint set."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()

    def install(kind, fixture=None, images=""):
        (tmp_path / "images").write_text(images)
        info = os.path.join(ENGINE_FIXTURES, fixture + ".json") if fixture else "/dev/null"
        (bin_dir / kind).write_text(
            '#!/bin/sh\necho "$*" >> "%s/calls"\ncase $1 in\n  info) /bin/cat "%s" ;;\n'
            '  image) /bin/cat "%s/images" ;;\nesac\n' % (tmp_path, info, tmp_path))
        (bin_dir / kind).chmod(0o755)
        return kind

    monkeypatch.setenv("PATH", str(bin_dir))  # (no real engine's command)
    for name in ("DOCKER_HOST", "DOCKER_CONTEXT", "CONTAINER_HOST", "PI_AGENT_ENGINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "no-docker-config"))
    monkeypatch.setattr(pi_agent, "_client_config", None)
    monkeypatch.setattr(pi_agent, "_engine_setting", "")
    monkeypatch.setattr(pi_agent, "_engine_chosen", None)
    monkeypatch.setattr(pi_agent, "_probed", {})
    install.calls = lambda: (tmp_path / "calls").read_text().splitlines() \
        if (tmp_path / "calls").exists() else []
    return install


def listening_socket(path):
    import socket
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(path))
    server.listen(1)
    return server


@pytest.mark.parametrize("case", sorted(ENGINE_CASES))
def test_the_probe_reads_what_each_engine_says(engine_env, monkeypatch, tmp_path, case):
    kind, expected = ENGINE_CASES[case]
    monkeypatch.setattr(pi_agent, "_engine_setting", engine_env(kind, case))
    monkeypatch.setattr(os, "getuid", lambda: 1000)
    monkeypatch.setattr(os, "getgid", lambda: 1000)
    engine = pi_agent.probe_engine(str(tmp_path / "state"))
    assert engine.kind == kind
    for name, value in expected.items():
        found = {"version": engine.facts.get("version"), "run_args": engine.run_args(),
                 "agent_uid": engine.agent_uid(1000), "inside": engine.inside(1000, 1000),
                 "limits": engine.limits}.get(name, getattr(engine, name, None))
        assert found == value, name
    # The resource options it does not apply are left out of a run.
    assert engine.limit_args(["--memory", "3g", "--pids-limit", "4096"]) == [
        part for option, value in (("--memory", "3g"), ("--pids-limit", "4096"))
        if option in expected["limits"] for part in (option, value)]
    assert engine.describe().startswith(engine.name)
    assert ("root on the host" in engine.root_inside()) != expected["rootless"]


def test_the_probe_is_asked_once_per_engine_and_again_when_it_restarts(engine_env, monkeypatch,
                                                                        tmp_path):
    engine_env("docker", "docker-20.10-rootful")
    sock = tmp_path / "docker.sock"
    server = listening_socket(sock)
    monkeypatch.setenv("DOCKER_HOST", "unix://%s" % sock)
    state = str(tmp_path / "state")
    assert pi_agent.probe_engine(state).store == "overlay2"
    assert not os.path.exists(state), "kept only where pi-agent keeps its state already"
    monkeypatch.setattr(pi_agent, "_probed", {})
    os.mkdir(state)
    assert pi_agent.probe_engine(state).store == "overlay2"
    monkeypatch.setattr(pi_agent, "_probed", {})  # (a later process: it reads the state)
    assert pi_agent.probe_engine(state).store == "overlay2"
    assert engine_env.calls() == ["info --format {{json .}}"] * 2, "asked once, once kept"
    os.chmod(os.path.join(state, pi_agent.ENGINES_FILE), 0o600)
    server.close()
    os.remove(sock)
    server = listening_socket(sock)  # the engine restarted (an upgrade, say): asked again
    engine_env("docker", "docker-26-containerd")
    assert pi_agent.probe_engine(state).store == "containerd"
    assert pi_agent.probe_engine(state, fresh=True).store == "containerd"
    assert len(engine_env.calls()) == 4
    server.close()


def test_an_answer_that_cannot_be_read_is_not_kept(engine_env, tmp_path):
    engine_env("docker")  # (says nothing)
    os.mkdir(tmp_path / "state")
    engine = pi_agent.probe_engine(str(tmp_path / "state"))
    assert engine.facts == {"kind": "docker"} and "did not say" in engine.describe()
    assert not os.path.exists(tmp_path / "state" / pi_agent.ENGINES_FILE)


def test_docker_when_it_reaches_an_engine_else_podman(engine_env, monkeypatch, tmp_path):
    engine_env("podman")
    assert pi_agent.engine_kind() == "podman", "no docker command"
    engine_env("docker")
    monkeypatch.setattr(pi_agent, "_engine_chosen", None)
    monkeypatch.setenv("DOCKER_HOST", "unix://%s" % (tmp_path / "nothing.sock"))
    assert pi_agent.engine_kind() == "docker", "DOCKER_HOST chose docker, reached or not"
    monkeypatch.delenv("DOCKER_HOST")
    monkeypatch.setattr(pi_agent, "_engine_chosen", None)
    real = pi_agent.engine_endpoint
    monkeypatch.setattr(pi_agent, "engine_endpoint", lambda kind: (  # (as if the default socket)
        "unix://%s" % (tmp_path / "nothing.sock"), None))
    assert pi_agent.engine_kind() == "podman", "a docker command that reaches no engine"
    server = listening_socket(tmp_path / "nothing.sock")
    monkeypatch.setattr(pi_agent, "_engine_chosen", None)
    assert pi_agent.engine_kind() == "docker"
    server.close()
    monkeypatch.setattr(pi_agent, "engine_endpoint", real)
    monkeypatch.setattr(pi_agent, "_engine_chosen", None)
    monkeypatch.setenv("DOCKER_HOST", "ssh://me@elsewhere")
    assert pi_agent.engine_kind() == "docker", "an engine elsewhere is docker's to reach"
    config = pi_agent.Config({"HOME": "/h", "PI_AGENT_ENGINE": "podman"})
    assert config.engine == "podman" and pi_agent.engine_kind() == "podman", "the setting wins"
    with pytest.raises(pi_agent.BadSetting, match="PI_AGENT_ENGINE=nerdctl"):
        pi_agent.Config({"HOME": "/h", "PI_AGENT_ENGINE": "nerdctl"})


def test_each_engine_is_driven_in_its_own_words(engine_env, monkeypatch, tmp_path):
    monkeypatch.setattr(pi_agent, "_engine_setting", "podman")
    failed = subprocess.CompletedProcess([], 125, "", "Error: x:y: image not known\n")
    assert pi_agent.is_absent(failed, "image")
    failed.stderr = "Error: no container with name or ID \"c\" found: no such container"
    assert pi_agent.is_absent(failed, "container")
    assert str(pi_agent.docker_failure(("commit",), "Error: disk full")) == \
        "podman commit failed: Error: disk full"
    assert pi_agent.commit_args("c1", {"Config": {}}, {}, "m")[:4] == [
        "commit", "--format", "docker", "-m"], "a message needs Docker's image format"
    assert pi_agent.label_field("pi-agent.pid") == '(index .Labels "pi-agent.pid")'
    # `image ls REPO` lists an image's other names too, as localhost/NAME.
    engine_env("podman", images="".join(json.dumps(row) + "\n" for row in [
        {"repo": "localhost/pi-agent", "tag": "current", "id": "a", "created": "", "size": ""},
        {"repo": "localhost/other", "tag": "snap-20260101-000000.000", "id": "a",
         "created": "", "size": ""},
        {"repo": "localhost/pi-agent", "tag": "snap-20260101-000000.001", "id": "b",
         "created": "", "size": ""}]))
    line = stub_line(pi_agent.Config({"HOME": "/h", "PI_AGENT_ENGINE": "podman",
                                      "PI_AGENT_IMAGE_REPO": "pi-agent"}),
                     ENGINE_CASES["podman-4.3-rootless"][1])
    assert [row["tag"] for row in pi_agent.list_snapshots(line)] == ["snap-20260101-000000.001"]
    assert pi_agent.kept_as(line, {"RepoTags": ["localhost/pi-agent:snap-20260101-000000.001",
                                                "localhost/pi-agent:current"]}) == \
        "snap-20260101-000000.001", "a rollback's snapshot is known under localhost/"
    monkeypatch.setattr(pi_agent, "_engine_setting", "docker")
    failed.stderr = "Error: No such image: x"
    assert pi_agent.is_absent(failed, "image") and not pi_agent.is_absent(failed, "container")
    assert pi_agent.commit_args("c1", {"Config": {}}, {}, "m")[:2] == ["commit", "-m"]
    assert pi_agent.label_field("pi-agent.pid") == '(.Label "pi-agent.pid")'


def test_a_run_gets_what_its_engine_needs():
    config = pi_agent.Config({"HOME": "/home/alice"})
    image = {"Id": "sha256:abc", "Config": {"Cmd": ["bash"], "Env": ["HOME=/home/agent"]}}

    def plan(facts):
        return pi_agent.RunPlan(stub_line(config, facts), "exec", ["true"], image,
                                pi_agent.Project("/tmp/p"), {}, 1.0, 1, False, "snap-x")
    rootful = plan(ROOTFUL_DOCKER)
    assert "--memory" in rootful.run_args and "--http-proxy=false" not in rootful.run_args
    assert "TINI_KILL_PROCESS_GROUP" in rootful.script(), "the script stays the agent's parent"
    podman = plan(ENGINE_CASES["podman-4.3-rootless"][1] | {"kind": "podman"})
    assert "--http-proxy=false" in podman.run_args, "no proxy of podman's own in an image"
    assert "--memory" not in podman.run_args, "an engine that applies no limit gets none"
    assert "TINI_KILL_PROCESS_GROUP" not in podman.script(), \
        "catatonit signals its child alone: the agent is that child"
    remapped = plan(dict(ROOTFUL_DOCKER, remap=True))
    assert "--userns=host" in remapped.run_args
    assert "root on the host" in pi_agent.Engine(dict(ROOTFUL_DOCKER, remap=True)).root_inside()
    rootless = pi_agent.Engine(dict(ROOTFUL_DOCKER, rootless=True))
    assert pi_agent.build_args(rootless, {"HOME": "/home/alice"})["AGENT_UID"] == "0"
    assert pi_agent.owner_mismatch({"Config": {"Labels": {"pi-agent.uid": str(os.getuid())}}},
                                   rootless) or os.getuid() == 0
