"""State that scales, against the real engine: lossless flatten (by hand and
automatically), pruning that frees space, no untagged images left behind.

These tests use a small base of their own (Debian minbase with every kind of
config field and file), so that flattening takes seconds."""

import json
import re
import subprocess

import pytest

from conftest import BASE_IMAGE, docker, make_sandbox

RICH_DOCKERFILE = """FROM %s
RUN mkdir -p /srv/data /opt/t \\
 && echo content > /opt/t/file && ln /opt/t/file /opt/t/hardlink \\
 && ln -s /opt/t/file /opt/t/symlink && ln -s /nowhere /opt/t/dangling \\
 && chmod 4755 /opt/t/file && mkdir -m 1777 /opt/t/sticky \\
 && mkfifo /opt/t/fifo && chown 1234:5678 /opt/t/file /opt/t/sticky \\
 && touch -d 2001-02-03T04:05:06 /opt/t/file
ENV GREETING="hello world" EMPTY=""
LABEL org.example.note="a \\"quoted\\" $dollar" other=1
EXPOSE 8080/tcp 53/udp
VOLUME ["/srv/data"]
WORKDIR /srv
STOPSIGNAL SIGINT
HEALTHCHECK --interval=30s --timeout=5s --retries=2 CMD ["true"]
ENTRYPOINT ["/bin/sh", "-c", "exec \\"$@\\"", "entry"]
CMD ["bash"]
"""
# Everything but what the engine makes for each container (/.dockerenv, /etc/mtab, ...).
LISTING = ("find / -mindepth 1 -xdev \\( -path /proc -o -path /sys -o -path /dev "
           "-o -path /srv/data -o -path /.dockerenv -o -path /etc/mtab -o -path /etc/hostname -o -path /etc/hosts "
           "-o -path /etc/resolv.conf \\) -prune -o -type d -printf '%p %y %m %U %G\\n' "
           "-o -printf '%p %y %m %U %G %n %s %l %T@\\n' | sort")
# (directory times are left out: each container's mount points touch /etc and /)
CONFIG_FIELDS = ("Cmd", "Entrypoint", "Env", "WorkingDir", "User", "Labels", "ExposedPorts",
                 "Volumes", "StopSignal", "Healthcheck", "OnBuild")


@pytest.fixture(scope="module")
def rich_base(engine):
    tag = "pi-agent-test/rich:base"
    subprocess.run(["docker", "build", "-q", "-t", tag, "-"], input=RICH_DOCKERFILE % BASE_IMAGE,
                   text=True, check=True, stdout=subprocess.DEVNULL)
    return tag


@pytest.fixture
def rich(request, engine, install_dir, rich_base):
    box = make_sandbox(request, install_dir, "root", "bash")
    docker("tag", rich_base, box.repo + ":base")
    box.extra_env = {"PI_AGENT_EGRESS": "open"}  # (no python3 in it for the egress proxy)
    return box


def listing(ref):
    return docker("run", "--rm", "--entrypoint", "sh", ref, "-c", LISTING).stdout


def layers(box, ref):
    return len(box.inspect(ref)["RootFS"]["Layers"])


def test_flatten_keeps_every_file_and_config_field(rich):
    box = rich
    box.ok("pi-exec sh -c 'echo run1 > /opt/t/run1'")
    box.ok("pi-exec sh -c 'rm /opt/t/dangling; echo run2 > /opt/t/run2'")
    current = box.repo + ":current"
    before_config = box.inspect(current)["Config"]
    before_files = listing(current)
    assert layers(box, current) > 2 and "/opt/t/run2" in before_files
    result = box.ok("pi-flatten")
    assert "kept as snap-" in result.stderr
    after = box.inspect(current)
    assert len(after["RootFS"]["Layers"]) == 1
    for field in CONFIG_FIELDS:
        assert after["Config"].get(field) == before_config.get(field), field
    assert listing(current) == before_files
    kept = result.stderr.split("kept as ")[1].split()[0]
    assert box.inspect(box.repo + ":" + kept)["Config"]["Labels"] == before_config["Labels"]
    assert box.dangling() == []
    assert box.ok("pi-exec cat /opt/t/run1 /opt/t/run2").stdout == "run1\nrun2\n"
    assert "single layer already" in box.ok("pi-flatten").stderr


def state_log(box):
    return open(box.line().log_path).read()


@pytest.mark.parametrize("dockerfile,cmd,entrypoint", [
    # ENTRYPOINT in a Dockerfile resets the inherited CMD: none
    ('FROM %s\nENTRYPOINT ["/bin/sh", "-c", "exec \\"$@\\"", "entry"]\n',
     None, ["/bin/sh", "-c", "exec \"$@\"", "entry"]),
    (None, ["sh"], None),  # the plain imported image: neither (a commit cannot unset CMD)
], ids=["entrypoint without cmd", "neither"])
def test_images_without_a_command_keep_their_config(rich, rich_base, dockerfile, cmd,
                                                    entrypoint):
    box = rich
    if dockerfile:
        subprocess.run(["docker", "build", "-q", "-t", box.repo + ":base", "-"],
                       input=dockerfile % rich_base, text=True, check=True,
                       stdout=subprocess.DEVNULL)
    else:
        docker("tag", BASE_IMAGE, box.repo + ":base")
    base = box.inspect(box.repo + ":base")["Config"]
    box.ok("pi-exec touch /changed")
    assert box.ok("pi-exec sh -c 'test -e /changed && echo yes'").stdout == "yes\n"
    box.wait_saved()
    current = box.inspect(box.repo + ":current")["Config"]
    assert (current["Cmd"], current["Entrypoint"]) == (cmd, entrypoint)
    for field in ("Env", "WorkingDir", "User"):
        assert current.get(field) == base.get(field), field


def test_at_the_threshold_the_background_save_flattens_current(rich):
    box = rich
    base_layers = layers(box, box.repo + ":base")
    box.extra_env["PI_AGENT_FLATTEN_LAYER_THRESHOLD"] = str(base_layers + 2)
    box.ok("pi-exec touch /one")
    assert layers(box, box.repo + ":current") == base_layers + 1
    box.ok("pi-exec touch /two")  # reaches the threshold: the save flattens
    result = box.ok("pi-exec test -e /one -a -e /two")  # waits for it
    assert layers(box, box.repo + ":current") == 1, "flat, and the test changed nothing"
    log = state_log(box)
    assert "flattening" in log and "flattened" in log
    assert any(layers(box, box.repo + ":" + snap) == base_layers + 2
               for snap in box.snapshots()), "the layered image is kept as a snapshot"
    assert "Traceback" not in result.stderr


@pytest.mark.long
def test_flatten_and_prune_free_space_by_the_engines_figures(rich):
    box = rich
    for i in range(3):  # three versions of one 20 MB file: two of them dead weight
        box.ok("pi-exec sh -c 'head -c 20000000 /dev/urandom > /opt/big'")
    box.ok("pi-flatten")
    old_chain = [box.inspect(box.repo + ":" + snap)["Id"] for snap in box.snapshots()]
    before = images_disk_usage()
    dry = box.ok("pi-prune --dry-run 0")
    assert "would remove %d snapshots" % len(old_chain) in dry.stderr
    freed = float(re.search(r"free about ([\d.]+) MB", dry.stderr).group(1)) * 1e6
    assert 40e6 < freed < 80e6, dry.stderr
    assert len(box.snapshots()) == len(old_chain), "a dry run removes nothing"
    box.ok("pi-prune 0")
    assert box.snapshots() == []
    after = images_disk_usage()
    assert before - after > 50e6, (before, after)
    base = box.inspect(box.repo + ":base")["Id"]
    for image in set(old_chain) - {base}:
        assert docker("image", "inspect", image, check=False).returncode != 0
    assert box.dangling() == []


def images_disk_usage():
    """The engine's own figure for the disk its images use, in bytes."""
    out = docker("system", "df", "--format", "{{.Type}}\t{{.Size}}").stdout
    return to_bytes([line.split("\t")[1] for line in out.splitlines()
                     if line.startswith("Images")][0])


def test_flatten_threshold_is_validated(rich):
    result = rich.sh("pi-exec true", env={"PI_AGENT_FLATTEN_LAYER_THRESHOLD": "200"})
    assert result.returncode == 9 and "PI_AGENT_FLATTEN_LAYER_THRESHOLD" in result.stderr


def status_disk(box):
    """pi-status's disk line, in bytes: {own, base, snapshots}, once the
    last run is saved (pi-status does not wait for a save: it shows it)."""
    box.wait_saved()
    line = re.search(r"^disk: current holds (.+) of its own on (.+) shared with base; (.+) "
                     r"only its snapshots hold", box.ok("pi-status").stdout, re.M)
    return dict(zip(("own", "base", "snapshots"), (to_bytes(text) for text in line.groups())))


def to_bytes(text):
    number, unit = re.fullmatch(r"([\d.]+)\s*([kMGT]?B)", text).groups()
    return float(number) * {"B": 1, "kB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12}[unit]


def engine_unique(image_id):
    """docker system df -v: the bytes only this image holds."""
    images = json.loads(docker("system", "df", "-v", "--format", "{{json .Images}}").stdout)
    return to_bytes(next(image["UniqueSize"] for image in images
                         if image["ID"].split(":")[-1].startswith(image_id.split(":")[-1][:12])))


@pytest.mark.long
def test_pi_status_counts_the_disk_as_the_engine_does(rich):
    box = rich
    box.ok("pi-exec true")
    box.ok("pi-exec sh -c 'head -c 20000000 /dev/urandom > /opt/blob'")
    disk = status_disk(box)
    assert 20e6 <= disk["own"] < 20.3e6 and disk["snapshots"] < 0.1e6, disk
    blob_image = box.inspect(box.repo + ":current")["Id"]
    assert abs(disk["own"] - engine_unique(blob_image)) < 0.2e6
    base = box.inspect(box.repo + ":base")["Size"]
    assert abs(disk["base"] - base) <= 0.05e9  # (shown to a tenth of a GB)
    # Removed, and current flattened: the blob is now only in the snapshots.
    box.ok("pi-exec rm /opt/blob")
    box.ok("pi-flatten")
    disk = status_disk(box)
    assert 20e6 <= disk["snapshots"] < 20.3e6 and disk["base"] == 0, disk
    freed = re.search(r"free about ([\d.]+ [kMG]?B)", box.ok("pi-prune --dry-run 0").stderr)
    assert abs(to_bytes(freed.group(1)) - disk["snapshots"]) < 0.1e6
