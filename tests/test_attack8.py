"""The eighth review of issue 22: the import's new unpacked-size cap
(import_objects: cat-file --batch-all-objects on `incoming`), attacked
with packs the agent writes by hand. Each test acts as the agent, then
looks at what the hand-back cost or let through, and asserts the SAFE
outcome: it fails while the attack works."""

import os
import resource

import pytest

from conftest import pi_agent
from test_containment import agent, host_git, warnings

# The agent's shell writes /tmp/pack.py: make(DIR, [(oid bytes, raw entry
# bytes)]) writes a pack and its .idx as git would lay them out (the .idx
# names the pack's trailing checksum, which is all git compares when it
# opens one) and returns the pack's name; header() and varint() make entries.
WRITES_PACKS = "cat > /tmp/pack.py <<'PY'\n%s\nPY\n" % r'''
import hashlib, os, struct, sys, zlib

def varint(n):
    out = bytearray()
    while True:
        b, n = n & 0x7f, n >> 7
        if not n:
            out.append(b)
            return bytes(out)
        out.append(b | 0x80)

def header(kind, size):
    b, size, out = (kind << 4) | (size & 0x0f), size >> 4, bytearray()
    while size:
        out.append(b | 0x80)
        b, size = size & 0x7f, size >> 7
    out.append(b)
    return bytes(out)

def make(where, entries):
    body, offsets, crcs = b"PACK" + struct.pack(">LL", 2, len(entries)), {}, {}
    for oid, raw in entries:
        offsets[oid], crcs[oid] = len(body), zlib.crc32(raw) & 0xffffffff
        body += raw
    trailer = hashlib.sha1(body).digest()
    oids = sorted(offsets)
    idx = b"\xfftOc" + struct.pack(">L", 2)
    for i in range(256):
        idx += struct.pack(">L", sum(1 for o in oids if o[0] <= i))
    idx += b"".join(oids) + b"".join(struct.pack(">L", crcs[o]) for o in oids)
    idx += b"".join(struct.pack(">L", offsets[o]) for o in oids) + trailer
    idx += hashlib.sha1(idx).digest()
    name = os.path.join(where, "pack-" + trailer.hex())
    with open(name + ".pack", "wb") as f:
        f.write(body + trailer)
    with open(name + ".idx", "wb") as f:
        f.write(idx)
    return name
'''

# 128 MiB of zeros, one loose object of 128 KiB (the seventh review's bomb,
# which the cap refuses on its own), committed on the agent's branch.
BOMB = """
        oid=$(head -c 134217728 /dev/zero | git -c core.loosecompression=9 hash-object -w --stdin)
        git update-index --add --cacheinfo 100644,$oid,big
        git -c user.name=A -c user.email=a@x commit -qm 'add a fixture'
"""


def landed_size(box):
    """The size of the agent's blob `big` as it came back (0: it did not)."""
    landed = host_git(box, "cat-file -s HEAD:big")
    return int(landed.stdout) if landed.returncode == 0 else 0


def test_a_delta_cycle_makes_host_git_take_all_the_memory_it_can(box):
    # Two REF_DELTA entries of one pack, each the other's base: 66 bytes.
    # cat-file --batch-check=%(objectsize) reads only a delta's header (10
    # bytes each: far below the cap), but pack-objects --revs must read the
    # commit the branch names to walk it, and git's unpack_entry follows
    # the chain for ever, its stack of deltas growing by ~300 MB a second
    # (no timeout on the import's host git: host_git_process). On a host
    # without a limit it takes every byte of memory until the OOM killer
    # picks a process. Here the test's shell is held to 3 GB of address
    # space, so git stops at "Out of memory" after ~10 s.
    box.init_repo()
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    assert before < 800 << 10, "a child of the test used %d kB already" % before
    x, y = "c" * 40, "d" * 40
    script = WRITES_PACKS + """
        python3 - <<'PY'
import sys
sys.path.insert(0, "/tmp")
from pack import make, header, varint
import zlib
delta = varint(10) + varint(10) + bytes([0x90, 10])  # (copy 10 bytes of the base)
x, y = bytes.fromhex("%s"), bytes.fromhex("%s")
entry = lambda base: header(7, len(delta)) + base + zlib.compress(delta)
make(".git/objects/pack", [(x, entry(y)), (y, entry(x))])
PY
        echo %s > .git/refs/heads/cycle
        """ % (x, y, x)
    result = box.sh("ulimit -v 3000000; pi-exec sh -s", input=script, timeout=600)
    assert result.returncode == 0, result.stderr
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    assert peak < (pi_agent.AGENT_OBJECTS_MEMORY >> 10) + (256 << 10), (
        "66 bytes of pack the agent wrote made host git hold %d MB (the limit of this test's "
        "shell; a host has no such limit): %s" % (peak >> 10, warnings(result)))


def test_a_sparse_pack_makes_a_compressed_bomb_look_like_what_it_takes(box):
    # The ratio cap once compared the objects' unpacked size with
    # %(objectsize:disk): for the last object of a pack, the bytes from it
    # to the pack's end. A pack the agent pads with a hole (seek 10 GB,
    # write the trailer) takes 4 kB of disk and "takes" 10 GB; link_objects
    # hard links it (the sparse check is only on a copy). Beside it, the 128 MiB
    # blob of zeros the seventh review's cap refuses (128 KiB loose) comes
    # back: the user's git checkout writes a thousand times what the agent
    # wrote, as before the cap; up to 4 GB a run.
    box.init_repo()
    script = WRITES_PACKS + """
        set -e
        python3 - <<'PY'
import hashlib, sys, zlib
sys.path.insert(0, "/tmp")
from pack import make, header
data = b"filler\\n"
oid = hashlib.sha1(b"blob %d\\0" % len(data) + data).digest()
name = make(".git/objects/pack", [(oid, header(3, len(data)) + zlib.compress(data))])
raw = open(name + ".pack", "rb").read()
with open(name + ".pack", "r+b") as f:
    f.truncate(0)
    f.write(raw[:-20])
    f.seek(10 << 30)
    f.write(raw[-20:])
PY
        du -sk .git/objects | cut -f1 > written
""" + BOMB
    result = agent(box, script, timeout=600)
    assert result.returncode == 0, result.stderr
    with open(os.path.join(box.project, "written")) as handle:
        written = int(handle.read()) * 1024 + (128 << 10)
    assert written < 4 << 20, written
    size = landed_size(box)
    assert size < 100 * written, ("the agent wrote %d bytes of objects (a 10 GB pack that is a "
                                  "hole); a %d-byte blob came back, for git checkout to write: "
                                  "%s" % (written, size, warnings(result)))


@pytest.mark.parametrize("path, text", [
    # yarn classic runs yarn-path for every yarn command (.yarnrc.yml's
    # yarnPath, yarn 2+, is named)
    (".yarnrc", 'yarn-path "./tools/y.js"\n'),
    # mise's local file, git-ignored by convention (git diff never shows
    # it); mise.toml and .mise.toml are named
    ("mise.local.toml", '[hooks]\nenter = "sh tools/x.sh"\n'),
    (".config/mise/config.toml", '[hooks]\nenter = "sh tools/x.sh"\n'),
])
def test_a_tool_config_beside_the_named_ones_is_named_too(box, path, text):
    box.init_repo()
    result = agent(box, "mkdir -p \"$(dirname %s)\" && printf '%%s' '%s' > %s"
                   % (path, text.replace("\n", "\\n"), path))
    assert result.returncode == 0, result.stderr
    assert os.path.exists(os.path.join(box.project, path))
    assert any(path in line and "may run" in line for line in warnings(result)), \
        "%s was changed and is not named: %s" % (path, warnings(result))
