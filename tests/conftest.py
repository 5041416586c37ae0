"""Fixtures: a real engine (Docker's, or another: PI_AGENT_TEST_ENGINE, see
images.py), a prebuilt base image, and a sandbox per test (its own image
line, state dir, home and project) driven through the shell functions
exactly as a user would, as root and as an ordinary user (on a rootless
engine, as its user alone)."""

import contextlib
import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid

import pytest

import images

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import pi_agent  # noqa: E402 (from ROOT)

BASE_IMAGE = images.BASE_IMAGE
TEST_USER = images.TEST_USER
ENGINE = images.ENGINE
TEST_USER2 = images.TEST_USER2
STRICT = os.environ.get("PI_AGENT_TEST_STRICT") == "1"
SHELLS = ("bash", "zsh")


# The tiers beyond make test's (make test-all runs every tier): engine tests
# in these files are marked with their tier; single tests are marked long.
TIERS = {"test_attack.py": "hostile", "test_attack2.py": "hostile",
         "test_attack_egress.py": "hostile", "test_attack3.py": "hostile",
         "test_attack4.py": "hostile", "test_attack5.py": "hostile",
         "test_attack6.py": "hostile", "test_attack7.py": "hostile",
         "test_attack8.py": "hostile", "test_attack9.py": "hostile",
         "test_containment.py": "hostile",
         "test_recovery.py": "long"}


def pytest_configure(config):
    config.addinivalue_line("markers", "integration: needs a real Docker engine")
    config.addinivalue_line("markers", "hostile: an attack's reproduction against the "
                            "engine (make test-all)")
    config.addinivalue_line("markers", "long: faults, soaks and installs, each tens of "
                            "seconds (make test-all)")
    config.addinivalue_line("markers", "agents: installs an agent from the network "
                            "(make test-agents)")


def pytest_collection_modifyitems(config, items):
    """Engine tests are marked, with their tier; agent installs run only
    under make test-agents (left out, not skipped: CI counts a skip as a
    failure)."""
    for item in items:
        if "engine" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.integration)
            tier = TIERS.get(os.path.basename(str(item.fspath)))
            if tier:
                item.add_marker(tier)
    if os.environ.get("PI_AGENT_TEST_AGENTS") != "1":
        left_out = [item for item in items if item.get_closest_marker("agents")]
        if left_out:
            config.hook.pytest_deselected(items=left_out)
            items[:] = [item for item in items if item not in left_out]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """In CI (PI_AGENT_TEST_STRICT=1) a skipped test is a failure: the
    integration tests must really run."""
    outcome = yield
    report = outcome.get_result()
    if STRICT and report.skipped and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        report.longrepr = "skipped under PI_AGENT_TEST_STRICT=1: %s" % (report.longrepr,)


def docker(*args, check=True):
    """The engine's command (docker, or podman: see images.Engine)."""
    return ENGINE.run(*args, check=check)


def git(repo, *args, env=None, check=True):
    """Host git in `repo` (the engine-free tests of the gate and the sweep)."""
    return subprocess.run(["git", "-C", repo, *args], check=check, capture_output=True,
                          text=True, env=dict(os.environ, **(env or {})))


@pytest.fixture(scope="session")
def engine():
    if shutil.which(ENGINE.command) is None:
        pytest.skip("no %s command: integration tests need an engine" % ENGINE.command)
    result = docker("version", check=False)
    if result.returncode != 0:
        pytest.skip("the %s engine is unreachable (%s): %s" % (
            ENGINE.name, "tests/engines/run brings it up" if ENGINE.name != "docker" else
            "sudo make setup", result.stderr.strip().splitlines()[-1:]))
    if docker("image", "inspect", BASE_IMAGE, check=False).returncode != 0:
        pytest.skip("no %s image; build it with tests/setup-engine.sh (sudo make setup) "
                    "or set PI_AGENT_TEST_BASE_IMAGE" % BASE_IMAGE)
    return ENGINE.name


@pytest.fixture(scope="session")
def install_dir():
    """A copy of the tool that any user can read (a checkout under /root cannot)."""
    import pathlib
    path = pathlib.Path(tempfile.mkdtemp(prefix="pi-agent-install-"))
    for name in ("pi_agent.py", "Dockerfile", ".dockerignore"):
        shutil.copy(os.path.join(ROOT, name), path / name)
    for name in ("shell", "tests/fixtures"):
        shutil.copytree(os.path.join(ROOT, name), path / name)
    for dirpath, dirnames, filenames in os.walk(path):
        os.chmod(dirpath, 0o755)
        for name in filenames:
            os.chmod(os.path.join(dirpath, name), 0o644)
    yield str(path)
    shutil.rmtree(path, ignore_errors=True)


class User:
    def __init__(self, name, uid, gid, via_runuser):
        self.name, self.uid, self.gid = name, uid, gid
        self.via_runuser = via_runuser


def user_for(kind):
    me = pwd.getpwuid(os.getuid())
    if kind == "root":
        if os.getuid() != 0:
            pytest.skip("the root host user variant needs the tests to run as root")
        return User("root", 0, 0, False)
    if os.getuid() != 0 and kind == "user":
        return User(me.pw_name, me.pw_uid, me.pw_gid, False)
    if os.getuid() != 0:
        pytest.skip("a second ordinary user needs the tests to run as root")
    name, uid = (TEST_USER, 1234) if kind == "user" else (TEST_USER2, 1235)
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        pytest.skip("no user %s to run as (CI creates it: useradd -m -u %d -G docker %s)"
                    % (name, uid, name))
    return User(entry.pw_name, entry.pw_uid, entry.pw_gid, True)


def base_for(uid, gid, home, install_dir):
    """The Dockerfile built once per host user (UID and home), then shared:
    each test tags it as its own REPO:base ("a base that exists is used as is")."""
    return images.base_image(uid, gid, home, install_dir)


class Sandbox:
    """One user's world: an image line, a state dir, a home, a project."""

    def __init__(self, user, shell, install_dir, workdir):
        self.user, self.shell, self.install_dir = user, shell, install_dir
        self.repo = "pi-agent-test/" + uuid.uuid4().hex[:10]
        # A fake home at a path stable per user, so one base image (built
        # with that home) serves every test; emptied for each test.
        self.home = images.test_home(user.uid)
        shutil.rmtree(self.home, ignore_errors=True)
        self.state_dir = os.path.join(workdir, "state")
        self.project = os.path.join(workdir, "project")
        for path in (self.home, self.project):
            os.makedirs(path, exist_ok=True)
        self.chown(workdir)
        self.chown(self.home)
        self.extra_env = {}
        self.sessions = []  # box.background's

    def chown(self, path):
        if self.user.via_runuser:
            for dirpath, dirnames, filenames in os.walk(path):
                os.chown(dirpath, self.user.uid, self.user.gid)
                for name in filenames:
                    os.chown(os.path.join(dirpath, name), self.user.uid, self.user.gid)

    def mkdir(self, path):
        os.makedirs(path, exist_ok=True)
        self.chown(path)
        return path

    def env(self, **extra):
        env = {"HOME": self.home, "PATH": "/usr/local/bin:/usr/bin:/bin",
               "LANG": "C.UTF-8", "USER": self.user.name,
               "PI_AGENT_IMAGE_REPO": self.repo, "PI_AGENT_STATE_DIR": self.state_dir,
               "PI_AGENT_BASE_IMAGE": BASE_IMAGE, "PI_AGENT_CA_CERTS": images.test_ca_certs(
                   os.path.join(self.install_dir, "tests", "fixtures")),
               "PI_AGENT_PYTHON": sys.executable
               if not self.user.via_runuser else "/usr/bin/python3"}
        env.update(ENGINE.env)
        env.update(self.extra_env)
        env.update(extra)
        return env

    def sh(self, script, cwd=None, env=None, input=None, timeout=300, shell=None):
        """Run `script` in a new bash or zsh that sourced shell/pi.sh."""
        shell = shell or self.shell
        source = ". %s/shell/pi.sh\n" % self.install_dir
        argv = [shell, "--norc", "-c"] if shell == "bash" else [shell, "-f", "-c"]
        argv += [source + script]
        full_env = self.env(**(env or {}))
        prefix = ["env", "-i"] + ["%s=%s" % item for item in full_env.items()]
        if self.user.via_runuser:
            prefix = ["runuser", "-u", self.user.name, "--"] + prefix
        return subprocess.run(prefix + argv, cwd=cwd or self.project, text=True, input=input,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=timeout)

    def ok(self, script, **kwargs):
        result = self.sh(script, **kwargs)
        assert result.returncode == 0, "exit %d\nstdout: %s\nstderr: %s" % (
            result.returncode, result.stdout, result.stderr)
        return result

    def background(self, script):
        """Start `script` (with the shell functions) in a session of its own
        (one the test has not ended is ended as the sandbox goes)."""
        prefix = ["env", "-i"] + ["%s=%s" % item for item in self.env().items()]
        if self.user.via_runuser:
            prefix = ["runuser", "-u", self.user.name, "--"] + prefix
        run = subprocess.Popen(prefix + ["bash", "--norc", "-c", ". %s/shell/pi.sh\n%s"
                                         % (self.install_dir, script)],
                               cwd=self.project, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
        self.sessions.append(run)
        return run

    @contextlib.contextmanager
    def running(self, script):
        """`with box.running(script) as run:` box.background(script) for
        the block, its session ended (end_session) as the block ends."""
        run = self.background(script)
        try:
            yield run
        finally:
            end_session(run)

    def line(self):
        """The image line as pi_agent sees it (its state, lock and log paths)."""
        return pi_agent.Line(pi_agent.Config(self.env()))

    def state(self):
        return self.line().read_state()

    def holder(self):
        return self.state().get("holder") or {}

    def lock_held(self):
        return pi_agent.lock_is_held(self.line())

    def live_run(self):
        """(container, wrapper pid) of the run whose wrapper is alive, or (None, None)."""
        for cid in self.containers():
            pid = docker("inspect", "--format", '{{index .Config.Labels "pi-agent.pid"}}',
                         cid, check=False).stdout.strip()  # (it may be gone meanwhile)
            if pid and os.path.exists("/proc/%s" % pid):
                return cid, int(pid)
        return None, None

    def live_run_name(self):
        cid = self.live_run()[0]
        return cid and docker("inspect", "--format", "{{.Name}}", cid).stdout.strip().lstrip("/")

    def wrapper_pid(self):
        return self.live_run()[1]

    def init_repo(self, path=None):
        self.ok("git init -q . && git -c user.email=h@example.com -c user.name=Host "
                "commit -q --allow-empty -m first", cwd=path)

    def wait_saved(self):
        """Block until no save holds the line (what every pi-* command does),
        and the saved containers are removed (which happens after the lock)."""
        import fcntl
        line = self.line()
        if not os.path.isdir(self.state_dir):
            return
        removing = set()
        for name in os.listdir(self.state_dir):  # every profile's lock
            if name == line.key + ".lock" or (name.startswith(line.key + "@")
                                              and name.endswith(".lock")):
                profile = name[len(line.key) + 1:-len(".lock")]
                each = pi_agent.Line(pi_agent.Config(self.env(), profile=profile))
                fd = os.open(each.lock_path, os.O_RDONLY)
                try:
                    fcntl.flock(fd, fcntl.LOCK_SH)
                finally:
                    os.close(fd)
                removing |= set(each.read_state().get("removing") or {})
        wait_until(lambda: not removing & set(docker(
            "ps", "-a", "--format", "{{.Names}}", "--filter",
            "label=pi-agent.repo=" + self.repo).stdout.split()), timeout=60)

    def wait_recorded(self):
        """Until the savers are all done: their runs' changes recorded and
        containers removed, after which their run directories go."""
        run_dir = os.path.join(self.state_dir, "run")
        assert wait_until(lambda: not os.path.isdir(run_dir) or not os.listdir(run_dir),
                          timeout=60)

    def images(self):
        self.wait_saved()
        return repository_images(self.repo)

    def snapshots(self):
        return sorted(tag for tag in self.images() if tag.startswith("snap-"))

    def inspect(self, ref):
        self.wait_saved()
        return json.loads(docker("image", "inspect", ref).stdout)[0]

    def dangling(self):
        """This line's untagged images, once no save is at work: what
        replaced images must not pile up as."""
        self.wait_saved()
        return docker("image", "ls", "-q", "--filter", "dangling=true", "--filter",
                      "label=pi-agent.repo=" + self.repo).stdout.split()

    def containers(self):
        return docker("ps", "-a", "-q", "--filter", "label=pi-agent.repo=" + self.repo).stdout.split()

    def cleanup(self):
        for run in self.sessions:
            end_session(run)
        ids = self.containers()
        if ids:
            docker("rm", "-f", "-v", *ids, check=False)
        self.wait_saved()
        try:  # its egress proxies (named in its state), which would idle on for minutes
            with open(os.path.join(self.state_dir, "egress.json")) as handle:
                proxies = [name for name in json.load(handle) if name not in (
                    "outside", "routed")]
        except (OSError, ValueError):
            proxies = []
        if proxies:
            docker("rm", "-f", *proxies, check=False)
        refs = ["%s:%s" % (self.repo, tag) for tag in repository_images(self.repo)]
        if refs:
            docker("rmi", "-f", *refs, check=False)


def repository_images(repo):
    """{tag: image ID} of the images tagged in `repo` (Podman's `image ls
    REPO` lists their other names too, and names the repository
    localhost/REPO)."""
    out = docker("image", "ls", repo, "--format", "{{.Repository}} {{.Tag}} {{.ID}}").stdout
    rows = [line.split() for line in out.splitlines()]
    return {tag: image_id for name, tag, image_id in rows
            if pi_agent.image_name(name) == repo and tag != "<none>"}


def make_sandbox(request, install_dir, user_kind, shell):
    user = user_for(user_kind)
    workdir = tempfile.mkdtemp(prefix="pi-agent-test-")
    os.chmod(workdir, 0o755)
    box = Sandbox(user, shell, install_dir, workdir)
    docker("tag", base_for(user.uid, user.gid, box.home, install_dir), box.repo + ":base")

    def finish():
        box.cleanup()
        shutil.rmtree(workdir, ignore_errors=True)
        shutil.rmtree(box.home, ignore_errors=True)
    request.addfinalizer(finish)
    return box


@pytest.fixture
def box(request, engine, install_dir):
    """The usual sandbox: an ordinary user in bash."""
    return make_sandbox(request, install_dir, "user", "bash")


@pytest.fixture(params=[("user", "bash"), ("user" if ENGINE.owner else "root", "zsh")],
                ids=lambda p: "%s-%s" % p)
def any_box(request, engine, install_dir):
    """A sandbox for each host user kind (root, ordinary) and each shell:
    two, as each pairing of them adds nothing the others do not cover
    (shell_box runs the shell-specific tests in both). A rootless engine is
    its user's alone: that user in both shells."""
    user_kind, shell = request.param
    return make_sandbox(request, install_dir, user_kind, shell)


@pytest.fixture(params=SHELLS)
def shell_box(request, engine, install_dir):
    return make_sandbox(request, install_dir, "user", request.param)


def end_session(run, timeout=60):
    """End a background session (box.background) still there: SIGTERM to
    its process group (the shell, the wrapper, the docker client), a wait
    of up to `timeout` seconds, then SIGKILL if it is still there. The
    session's leader is reaped and its pipes closed."""
    for signum in (signal.SIGTERM, signal.SIGKILL):
        if run.poll() is not None:
            break
        try:
            os.killpg(run.pid, signum)
        except ProcessLookupError:  # (gone meanwhile)
            break
        try:
            run.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
    run.wait(timeout=timeout)
    for stream in (run.stdout, run.stderr):
        if stream:
            stream.close()


def wait_until(predicate, timeout=30.0, interval=0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return False
