"""The engine the tests drive, and the tests' base images: the project's
Dockerfile built from a local Debian image (no registry is reachable here),
once per host user.

    python3 tests/images.py     build them ahead of the test run (make test-image)

PI_AGENT_TEST_ENGINE picks the engine (tests/engines/ brings each up):
docker (the default: whatever `docker` reaches), docker26 (Docker 26 with the
containerd image store, in a container), rootless-docker and podman (rootless,
the test user's).
"""

import os
import pwd
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import pi_agent  # noqa: E402 (from ROOT)

BASE_IMAGE = os.environ.get("PI_AGENT_TEST_BASE_IMAGE", "local/debian:bookworm")
TEST_USER = os.environ.get("PI_AGENT_TEST_USER", "pi-test")
TEST_USER2 = os.environ.get("PI_AGENT_TEST_USER2", "pi-test2")  # another user, same engine
# The extra CA certificates every test base trusts (PI_AGENT_CA_CERTS): this
# machine's (its TLS to the package registries needs them) and the tests'
# own CA, whose server certificate a test serves inside a container.
FIXTURES = os.path.join(ROOT, "tests", "fixtures")


def test_ca_certs(fixtures=FIXTURES):
    """PI_AGENT_CA_CERTS for the tests (`fixtures`: a copy any user can read)."""
    return ",".join(path for path in ("/usr/local/share/ca-certificates",
                                      os.path.join(fixtures, "test-ca.crt"))
                    if os.path.exists(path))


class Engine:
    """An engine the tests drive: its command, what reaches it (variables for
    the tool and the tests alike), the user who owns it (a rootless engine:
    root drives it as that user, and the tests run only as that user), and
    whether root inside is that user (the agent is then built as root)."""

    def __init__(self, name, command="docker", env=None, owner=None, root_is_user=False,
                 store="overlay2"):
        self.name, self.command, self.env, self.owner = name, command, env or {}, owner
        self.root_is_user, self.store = root_is_user, store

    def argv(self, *args):
        """The command line that runs `command ARGS` on this engine, from here."""
        env = ["%s=%s" % item for item in self.env.items()]
        if self.owner and os.getuid() == 0 and pwd.getpwnam(self.owner).pw_uid != 0:
            entry = pwd.getpwnam(self.owner)
            return ["runuser", "-u", self.owner, "--", "env", "HOME=" + entry.pw_dir,
                    "PATH=/usr/local/bin:/usr/bin:/bin", *env, self.command, *args]
        return ["env", *env, self.command, *args] if env else [self.command, *args]

    def run(self, *args, check=True, **options):
        options.setdefault("stdout", subprocess.PIPE)
        options.setdefault("stderr", subprocess.PIPE)
        return subprocess.run(self.argv(*args), check=check, text=options.pop("text", True),
                              **options)


def test_user_uid():
    try:
        return pwd.getpwnam(TEST_USER).pw_uid
    except KeyError:
        return 1234


ENGINES = {
    "docker": Engine("docker"),
    "docker26": Engine("docker26", env={
        "DOCKER_HOST": "unix:///run/pi-agent-engines/docker26/docker.sock"}, store="containerd"),
    "rootless-docker": Engine("rootless-docker", env={
        "DOCKER_HOST": "unix:///run/user/%d/docker.sock" % test_user_uid()},
        owner=TEST_USER, root_is_user=True),
    "podman": Engine("podman", "podman", env={
        "PI_AGENT_ENGINE": "podman", "XDG_RUNTIME_DIR": "/run/user/%d" % test_user_uid(),
        "PI_AGENT_EGRESS": "open",  # (public and allow are Docker's only: test_engines)
        "CONTAINERS_STORAGE_CONF": "/etc/pi-agent-engines/podman-%s.conf" % TEST_USER},
        owner=TEST_USER, root_is_user=True, store="overlay"),
}
ENGINE = ENGINES[os.environ.get("PI_AGENT_TEST_ENGINE") or "docker"]


def worker_suffix(worker=None):
    """Tests run in parallel (pytest-xdist workers, and test runs side by
    side: PI_AGENT_TEST_SLOT) each need a home of their own."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "") if worker is None else worker
    slot = os.environ.get("PI_AGENT_TEST_SLOT", "")
    return "".join("-" + part for part in (slot, worker) if part)


def test_home(uid, worker=None):
    """A fake home at a path stable per user (and test worker), so one base
    image, built with that home, serves every test."""
    return "/tmp/pi-agent-test-home-%d%s" % (uid, worker_suffix(worker))


def base_image(uid, gid, home, context=ROOT, worker=None):
    """Built again whenever the Dockerfile or the build arguments change: by
    the host's own Docker engine (its cache holds all but the user's
    layers), then loaded into the engine under test."""
    import hashlib
    tag = "pi-agent-test/base:uid%d%s" % (uid, worker_suffix(worker))
    agent_uid = 0 if ENGINE.root_is_user else uid
    args = ["--label", "pi-agent.repo=test", "--label", "pi-agent.uid=%d" % uid,
            "--label", "pi-agent.agent_uid=%d" % agent_uid,
            "--build-arg", "BASE_IMAGE=" + BASE_IMAGE,
            "--build-arg", "AGENT_UID=%d" % agent_uid,
            "--build-arg", "AGENT_GID=%d" % (gid if agent_uid else 0),
            "--build-arg", "AGENT_HOME=" + home,
            "--build-arg", "EXTRA_CA_CERTS=" + pi_agent.read_ca_certs(test_ca_certs())]
    with open(os.path.join(context, "Dockerfile"), "rb") as handle:
        digest = hashlib.sha256(handle.read() + "\0".join(args).encode()).hexdigest()[:16]
    exists = ENGINE.run("image", "inspect", "--format",
                        '{{index .Config.Labels "pi-agent-test.source"}}', tag, check=False)
    if exists.returncode == 0 and exists.stdout.strip() == digest:
        return tag
    # (a name of its own on the host's engine, whose tests use `tag` for another build)
    built = tag if ENGINE.name == "docker" else tag.replace(":", "-for-%s:" % ENGINE.name)
    host = dict(os.environ, PI_AGENT_TEST_ENGINE="docker")
    host.pop("DOCKER_HOST", None)
    subprocess.run(["docker", "build", "-q", "-t", built, "--label",
                    "pi-agent-test.source=" + digest] + args + [context],
                   check=True, stdout=subprocess.DEVNULL, env=host)
    if built != tag:
        saved = subprocess.Popen(["docker", "save", built], stdout=subprocess.PIPE, env=host)
        ENGINE.run("load", "-q", stdin=saved.stdout, stdout=subprocess.DEVNULL)
        saved.stdout.close()
        assert saved.wait() == 0
        ENGINE.run("tag", built, tag)
        ENGINE.run("rmi", built)
    return tag


def main():
    users = [(os.getuid(), os.getgid())] if not ENGINE.owner else []
    if os.getuid() == 0:
        for name in (TEST_USER, TEST_USER2):
            try:
                entry = pwd.getpwnam(name)
                users.append((entry.pw_uid, entry.pw_gid))
            except KeyError:
                pass
    for worker in ("", "gw0", "gw1"):
        for uid, gid in users:
            print(base_image(uid, gid, test_home(uid, worker), worker=worker))
    return 0


if __name__ == "__main__":
    sys.exit(main())
