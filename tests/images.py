"""The tests' base images: the project's Dockerfile built from a local
Debian image (no registry is reachable here), once per host user.

    python3 tests/images.py     build them ahead of the test run (make test-image)
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
    """Built again whenever the Dockerfile or the build arguments change."""
    import hashlib
    tag = "pi-agent-test/base:uid%d%s" % (uid, worker_suffix(worker))
    args = ["--label", "pi-agent.repo=test", "--label", "pi-agent.uid=%d" % uid,
            "--build-arg", "BASE_IMAGE=" + BASE_IMAGE,
            "--build-arg", "AGENT_UID=%d" % uid,
            "--build-arg", "AGENT_GID=%d" % (gid if uid else 0),
            "--build-arg", "AGENT_HOME=" + home,
            "--build-arg", "EXTRA_CA_CERTS=" + pi_agent.read_ca_certs(test_ca_certs())]
    with open(os.path.join(context, "Dockerfile"), "rb") as handle:
        digest = hashlib.sha256(handle.read() + "\0".join(args).encode()).hexdigest()[:16]
    exists = subprocess.run(["docker", "image", "inspect", "--format",
                             '{{index .Config.Labels "pi-agent-test.source"}}', tag],
                            capture_output=True, text=True)
    if exists.returncode == 0 and exists.stdout.strip() == digest:
        return tag
    subprocess.run(["docker", "build", "-q", "-t", tag, "--label",
                    "pi-agent-test.source=" + digest] + args + [context],
                   check=True, stdout=subprocess.DEVNULL)
    return tag


def main():
    users = [(os.getuid(), os.getgid())]
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
