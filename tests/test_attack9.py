"""The ninth review of issue 22: the import's unpacked-size cap and its
memory hold (import_objects, host_git_process), attacked with packs the
agent writes by hand. Each test acts as the agent, then looks at what the
hand-back let through, and asserts the SAFE outcome: it fails while the
attack works."""

import os

from test_attack8 import BOMB, WRITES_PACKS, landed_size
from test_containment import agent, warnings

def test_an_object_cat_file_dies_on_makes_the_objects_hold_nothing(box):
    # The cap summed cat-file --batch-all-objects' sizes, run with
    # check=False: what it printed before it failed was taken as all there
    # is. cat-file
    # lists the objects sorted; one named 000...01 whose .idx offset lies
    # past its pack's end makes it die ("offset beyond end of packfile")
    # before it prints one size. Size 0: no cap. pack-objects --revs never
    # reads that object (nothing reaches it), and the bomb comes back.
    box.init_repo()
    script = WRITES_PACKS + """
        set -e
        python3 - <<'PY'
import hashlib, struct, sys, zlib
sys.path.insert(0, "/tmp")
from pack import make, header
data = b"x\\n"
raw = header(3, len(data)) + zlib.compress(data)
name = make(".git/objects/pack", [(b"\\0" * 19 + b"\\1", raw)])
idx = bytearray(open(name + ".idx", "rb").read())
at = 8 + 256 * 4 + 20 + 4
idx[at:at + 4] = struct.pack(">L", 0x7fff0000)
idx[-20:] = hashlib.sha1(bytes(idx[:-20])).digest()
open(name + ".idx", "wb").write(idx)
PY
        du -sk .git/objects | cut -f1 > written
""" + BOMB
    result = agent(box, script, timeout=600)
    assert result.returncode == 0, result.stderr
    with open(os.path.join(box.project, "written")) as handle:
        written = int(handle.read()) * 1024 + (128 << 10)
    size = landed_size(box)
    assert size < 100 * written, ("the agent wrote ~%d bytes of objects; a %d-byte blob came "
                                  "back, for git checkout to write: %s"
                                  % (written, size, warnings(result)))


def test_hard_links_of_one_pack_make_a_compressed_bomb_look_like_what_it_takes(box):
    # "taken" summed st_blocks of every name in `incoming`; link_objects hard
    # links each of the agent's names, and the agent can give one pack (and
    # its .idx) many names: git never checks a pack's name against its
    # checksum. cat-file --batch-all-objects counts each object once. One
    # 128 KiB pack named 40 times "takes" 5 MB: a 128 MiB bomb is inside
    # the ratio, and comes back.
    box.init_repo()
    script = """
        set -e
""" + BOMB + """
        git repack -qad
        cd .git/objects/pack
        p=$(ls pack-*.pack); p=${p%.pack}
        for i in $(seq 10 49); do
            n=pack-$(printf '%040d' $i)
            ln $p.pack $n.pack; ln $p.idx $n.idx
        done
        cd - >/dev/null
        du -sk .git/objects | cut -f1 > written
"""
    result = agent(box, script, timeout=600)
    assert result.returncode == 0, result.stderr
    with open(os.path.join(box.project, "written")) as handle:
        written = int(handle.read()) * 1024
    assert written < 4 << 20, written
    size = landed_size(box)
    assert size < 100 * written, ("the agent wrote %d bytes of objects (one pack, many names); "
                                  "a %d-byte blob came back, for git checkout to write: %s"
                                  % (written, size, warnings(result)))
