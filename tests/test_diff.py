"""pi-diff and the session log's account of a run (issue 16), against the
real engine: a run that installs a Debian package built in the test, writes
and deletes files, and commits; what pi-diff, pi-log and their --json say."""
import json
import os
import re

import pytest

# A package built inside the run (dpkg-deb, no network), installed with dpkg.
BUILD_AND_INSTALL = r"""set -e
mkdir -p /tmp/pkg/DEBIAN /tmp/pkg/usr/share/pitest
printf 'Package: pitest-hello\nVersion: 1.0-1\nArchitecture: all\nInstalled-Size: 294\nMaintainer: T <t@example.com>\nDescription: test\n' > /tmp/pkg/DEBIAN/control
head -c 300000 /dev/urandom > /tmp/pkg/usr/share/pitest/data.bin
dpkg-deb --build /tmp/pkg /tmp/pitest.deb >/dev/null
sudo dpkg -i /tmp/pitest.deb >/dev/null
rm -rf /tmp/pkg /tmp/pitest.deb
sudo mkdir -p /opt/app/.cache/tool && sudo chown -R "$(id -u)" /opt/app
echo note > /opt/app/made.txt && echo x > /opt/app/.cache/tool/entry
sudo rm /etc/motd
"""


def diff_json(box, args=""):
    return json.loads(box.ok("pi-diff --json %s" % args).stdout)


@pytest.mark.long
def test_a_run_that_installs_a_package_shows_as_that_package(box):
    with open(os.path.join(box.project, "install.sh"), "w") as script:
        script.write(BUILD_AND_INSTALL)
    box.ok("pi-exec sh install.sh")
    first = json.loads(box.ok("pi-log --json").stdout)[0]
    facts = diff_json(box)
    assert facts["packages"] == [{"manager": "deb", "name": "pitest-hello", "change": "installed",
                                  "version": "1.0-1", "size": facts["packages"][0]["size"]}]
    assert facts["packages"][0]["size"] == 294 * 1024  # dpkg's Installed-Size, in KiB
    changes = {(c["change"], c["path"]): c for c in facts["changes"]}
    assert ("added", "/opt/app/made.txt") in changes
    assert ("deleted", "/etc/motd") in changes
    assert changes[("added", "/usr/share/pitest/data.bin")]["package"] == "deb:pitest-hello"
    assert not any("/.cache/" in path for _change, path in changes), "noise is left out"
    assert not any(path.startswith("/tmp") for _change, path in changes)
    assert facts["from"]["name"] == first["snapshot"] and facts["runs"][0]["container"] == \
        first["container"]
    # The table says the same, by what a person recognises.
    text = box.ok("pi-diff").stdout
    counts = facts["paths"]
    assert text.splitlines()[0].endswith(": %d added, %d changed, %d deleted" % (
        counts["added"], counts["changed"], counts["deleted"]))
    assert "installed  deb  pitest-hello  1.0-1  301.1 kB" in text
    for group in facts["groups"]:  # the table's rows are the JSON's groups
        assert re.search(r"^  %s +%d +%d +%d +" % (re.escape(group["directory"]), group["added"],
                                                  group["changed"], group["deleted"]),
                         text, re.M), text
    assert "/opt/app" in text and "/etc" in text
    assert "not shown:" in text and "of the packages above" in text and "caches" in text
    every = box.ok("pi-diff --all").stdout
    assert "A /opt/app/.cache/tool/entry" in every
    assert "A /usr/share/pitest/data.bin  (deb:pitest-hello)" in every
    assert "D /etc/motd" in every
    # pi-log counts what pi-diff lists (the directories above a change are not counted).
    assert first["paths"] == json.loads(box.ok("pi-diff --json --all").stdout)["paths"]
    assert first["paths"]["deleted"] == 1 and first["paths"]["added"] >= 3

    # Removed again: the last run says so; since the first snapshot, it was never there.
    box.ok("pi-exec sh -c 'sudo dpkg -r pitest-hello >/dev/null && sudo rm -r /opt/app'")
    assert [(p["name"], p["change"]) for p in diff_json(box)["packages"]] == \
        [("pitest-hello", "removed")]
    since = diff_json(box, first["snapshot"])
    assert since["packages"] == [] and len(since["runs"]) == 2
    assert [(c["change"], c["path"]) for c in since["changes"]] == [("deleted", "/etc/motd")]
    assert "/opt/app" not in box.ok("pi-diff --all %s" % first["snapshot"]).stdout
    # Between two snapshots: the first run alone; given the other way round,
    # what going back undoes.
    second = json.loads(box.ok("pi-log --json").stdout)[0]
    between = diff_json(box, "%s %s" % (first["snapshot"], second["snapshot"]))
    assert [(p["name"], p["change"]) for p in between["packages"]] == \
        [("pitest-hello", "installed")]
    back = diff_json(box, "%s %s" % (second["snapshot"], first["snapshot"]))
    assert back["backwards"] and [(p["name"], p["change"]) for p in back["packages"]] == \
        [("pitest-hello", "removed")]
    undone = {(c["change"], c["path"]) for c in back["changes"]}
    assert {("added", "/etc/motd"), ("deleted", "/opt/app"),
            ("deleted", "/usr/share/pitest")} <= undone, "(a directory goes with its files)"
    assert ("deleted", "/opt/app/made.txt") not in undone
    # After a rollback, the last run's changes are not current's: pi-diff says so.
    box.ok("pi-rollback %s" % second["snapshot"])
    assert "current is no longer what that run left" in box.ok("pi-diff").stdout
    assert diff_json(box)["to"]["name"] != "current"


def test_the_session_log_names_the_commits_refs_and_swept_files(box):
    box.init_repo()
    box.ok("pi-exec sh -c 'git commit -q --allow-empty -m \"agent work\" && git branch side "
           "&& touch tool && chmod u+s tool && touch ~/x'")
    record = json.loads(box.ok("pi-log --json").stdout)[0]
    head = box.ok("git rev-parse HEAD").stdout.strip()
    assert record["commits"] == [{"id": head, "subject": "agent work"}]
    assert record["commits_total"] == 1
    refs = {ref["ref"]: ref for ref in record["refs"]}
    assert refs["refs/heads/side"] == {"ref": "refs/heads/side", "old": None, "new": head}
    branch = box.ok("git symbolic-ref HEAD").stdout.strip()
    assert refs[branch]["new"] == head and refs[branch]["old"] != head
    assert {"path": "tool", "action": "cleared setuid/setgid"} in record["swept"]
    table = box.ok("pi-log").stdout.splitlines()
    assert table[0].split()[4:7] == ["PATHS", "+/~/-", "COMMITS"] and table[1].split()[7] == "1"


# What a hostile agent does to hide what it left, or to make the record
# cost the host: each fails here without its protection.
HIDE_AND_BLOAT = r"""set -e
echo / | sudo tee -a /var/lib/dpkg/info/adduser.list >/dev/null
echo '* * * * * root sh /opt/x' | sudo tee /etc/cron.d/evil >/dev/null
sudo mkdir -p /usr/lib/python3.11/json/__pycache__
echo trojan | sudo tee /usr/lib/python3.11/json/__pycache__/__init__.cpython-311.pyc >/dev/null
sudo truncate -s 40M /var/lib/dpkg/info/zz-huge.list
sudo touch "/opt/$(printf '\033]0;owned\007x')"
echo /etc/passwd | sudo tee /var/lib/dpkg/info/fakepkg.list >/dev/null
printf '\nPackage: fakepkg\nStatus: install ok installed\nVersion: 1\nInstalled-Size: %s\n' \
  100000000000000 | sudo tee -a /var/lib/dpkg/status >/dev/null
echo 'evil:x:0:0::/root:/bin/sh' | sudo tee -a /etc/passwd >/dev/null
"""


def test_what_an_agent_leaves_cannot_hide_in_a_package_or_as_noise(box):
    with open(os.path.join(box.project, "hide.sh"), "w") as script:
        script.write(HIDE_AND_BLOAT)
    box.ok("pi-exec sh hide.sh")
    facts = diff_json(box)
    assert not facts["failed"], facts["failed"]
    shown = {c["path"]: c for c in facts["changes"]}
    # A package's list claims its own paths, never a tree.
    assert shown["/etc/cron.d/evil"]["package"] is None
    assert "/etc/cron.d" in [group["directory"] for group in facts["groups"]]
    # What Python loads by itself is no cache.
    assert "/usr/lib/python3.11/json/__pycache__/__init__.cpython-311.pyc" in shown
    # A list too big to read (sparse: nothing to the agent) is left unread.
    assert [p["name"] for p in facts["packages"]] == ["adduser", "fakepkg", "zz-huge"]
    # A package's books do not hide where code runs, nor make it bigger than
    # what the run wrote.
    assert shown["/etc/passwd"]["package"] is None
    every = diff_json(box, "--all")["changes"]
    size = [p["size"] for p in facts["packages"] if p["name"] == "fakepkg"][0]
    assert size <= sum(c["size"] or 0 for c in every) < 1 << 30
    assert " GB" not in box.ok("pi-diff").stdout
    # A name is shown, never played to the terminal.
    every = box.ok("pi-diff --all").stdout
    assert "\033" not in every and "\007" not in every and "/opt/\\x1b]0;owned\\x07x" in every


def test_a_run_that_changes_nothing_has_nothing_to_show(box):
    assert json.loads(box.ok("pi-diff --json").stdout)["runs"] == []  # (no run yet)
    box.ok("pi-exec true")
    assert box.ok("pi-diff").stdout.startswith("the last run (exec ")
    assert "no change" in box.ok("pi-diff").stdout
    unknown = box.sh("pi-diff snap-20000101-000000.000")
    assert unknown.returncode == 4 and "pi-agent: " in unknown.stderr
    # A run whose changes were not recorded says so, not "no change".
    box.extra_env["PI_AGENT_RECORD_CHANGES"] = "0"
    unrecorded = box.ok("pi-exec touch ~/x && pi-diff")
    assert ": not recorded" in unrecorded.stdout and "without a record" in unrecorded.stderr


# --- unit: the record and its composition ------------------------------------

def test_diff_from_base_on_a_fresh_install_shows_the_agents_directories(box):
    """A first run in a project under the home makes the directories above
    it the agent's (a commit of pi-agent's own): the session log has it, so
    base leads to current."""
    project = box.mkdir(os.path.join(box.home, "src", "app"))
    box.ok("pi-exec true", cwd=project)
    log = json.loads(box.ok("pi-log --json").stdout)
    assert [record["kind"] for record in log] == ["exec", "prepare"]
    facts = diff_json(box, "--all base current")  # (--all: the test's home is in /tmp)
    assert [(change["change"], change["path"]) for change in facts["changes"]] == [
        ("added", project)], facts
    assert len(facts["runs"]) == 1 and facts["from"]["name"] == "base"
    box.ok("pi-exec touch ~/later", cwd=project)
    assert len(diff_json(box, "base")["runs"]) == 2


def test_the_diff_keeps_what_a_person_made():
    import pi_agent
    output = "C /home\nC /home/u\nA /home/u/project\nC /usr\nA /usr/local/x\nA /usr/local/x/f\n" \
             "C /etc\nD /etc/motd\nC /etc/hosts\nA /sbin/docker-init\n"
    kept = pi_agent.kept_changes(pi_agent.parse_diff(output), ["/home/u/project"])
    assert kept == [("A", "/usr/local/x"), ("A", "/usr/local/x/f"), ("D", "/etc/motd"),
                    ("C", "/etc/hosts")]
    rows = [[kind, path, None, 10] for kind, path in kept]
    assert [row[1] for row in pi_agent.leaf_rows(rows)] == ["/usr/local/x/f", "/etc/motd",
                                                            "/etc/hosts"]
    facts = pi_agent.summarize(pi_agent.leaf_rows(rows), [])
    assert facts["paths"] == {"added": 1, "changed": 1, "deleted": 1}
    assert facts["groups"] == [
        {"directory": "/etc", "added": 0, "changed": 1, "deleted": 1, "bytes": 10},
        {"directory": "/usr/local", "added": 1, "changed": 0, "deleted": 0, "bytes": 10}]


def test_a_name_with_a_newline_makes_docker_diff_unreadable():
    import pi_agent
    # The directory "x\nD " holding "/etc" reads as a deletion of /etc.
    forged = "A /opt/n\nA /opt/n/x\nD \nA /opt/n/x\nD /etc\n"
    with pytest.raises(pi_agent.EngineError):
        pi_agent.parse_diff(forged)


def test_runs_compose_as_one():
    import pi_agent
    first = [["A", "/opt/a", None, None], ["A", "/opt/a/f", None, 1], ["C", "/etc/x", None, 2],
             ["D", "/etc/old", None, None], ["A", "/tmp/t", None, 3]]
    second = [["D", "/opt/a", None, None], ["A", "/etc/old", None, 4],
              ["D", "/etc/x", None, None], ["C", "/tmp/t", None, 5]]
    assert pi_agent.compose_changes([first, second]) == [
        ["C", "/etc/old", None, 4], ["D", "/etc/x", None, None], ["A", "/tmp/t", None, 5]]
    deb = {"manager": "deb", "name": "hello", "version": "1", "size": 1}
    assert pi_agent.compose_packages([[dict(deb, change="installed")],
                                      [dict(deb, change="removed")]]) == []
    assert pi_agent.compose_packages([[dict(deb, change="removed")],
                                      [dict(deb, change="installed", version="2")]]) == \
        [dict(deb, change="changed", version="2")]


def test_packages_are_known_by_their_managers_marks():
    import pi_agent
    changes = pi_agent.parse_diff(
        "A /usr/local/lib/python3.11/dist-packages/requests-2.31.0.dist-info\n"
        "A /usr/local/lib/python3.11/dist-packages/requests/api.py\n"
        "D /usr/lib/python3/dist-packages/six-1.16.0.dist-info\n"
        "A /usr/lib/python3/dist-packages/six-1.17.0.dist-info\n"
        "A /usr/local/lib/node_modules/@scope/tool\n"
        "A /usr/local/lib/node_modules/@scope/tool/index.js\n"
        "C /usr/local/lib/node_modules/untouched\n"
        "D /var/lib/dpkg/info/gone:amd64.list\n"
        "A /var/lib/dpkg/info/fresh.list\n")
    packages, owners = pi_agent.find_packages(changes)
    found = {(p["manager"], p["name"]): (p["change"], p["version"]) for p in packages}
    assert found == {("pip", "requests"): ("installed", "2.31.0"),
                     ("pip", "six"): ("changed", "1.17.0"),
                     ("npm", "@scope/tool"): ("installed", None),
                     ("deb", "gone"): ("removed", None), ("deb", "fresh"): ("installed", None)}
    assert pi_agent.owner_of("/usr/local/lib/python3.11/dist-packages/requests/api.py",
                             owners) == "pip:requests"
    assert pi_agent.owner_of("/usr/local/lib/node_modules/@scope/tool/index.js",
                             owners) == "npm:@scope/tool"
    assert pi_agent.owner_of("/usr/local/lib/node_modules/untouched/x", owners) is None
    status = pi_agent.parse_dpkg_status(
        b"Package: fresh\nStatus: install ok installed\nArchitecture: amd64\n"
        b"Version: 2.0-1\nInstalled-Size: 12\n\nPackage: half\nStatus: deinstall ok "
        b"config-files\nVersion: 1\n")
    assert status["fresh"] == status["fresh:amd64"] == ("2.0-1", 12 * 1024)
    assert status["half"] == ("1", None), "a removed package keeps its version"


def test_the_summary_the_wrapper_sends_fits_the_pipe():
    import pi_agent
    subject = "\u00e9" * 200  # six bytes each once escaped
    summary = {"commits": [{"id": "0" * 40, "subject": subject}] * 50, "commits_total": 50,
               "refs": [{"ref": "refs/heads/" + "x" * 190, "old": None, "new": "1" * 40}] * 50,
               "swept": [{"path": "p" * 300, "action": "disabled"}] * 50}
    message = pi_agent.summary_message(summary)
    assert len(message) <= pi_agent.SUMMARY_BYTES
    assert json.loads(message)["commits_total"] == 50 and json.loads(message)["commits"]
    assert pi_agent.said_ended(["status 0", "ended " + message])["commits_total"] == 50
    assert pi_agent.said_ended(["status 0"]) is None


def test_the_books_name_the_files_of_pip_and_dpkg_packages():
    import io
    import tarfile
    import pi_agent
    data = io.BytesIO()
    with tarfile.open(fileobj=data, mode="w") as archive:
        for name, text in [
                ("var/lib/dpkg/status", "Package: tool\nStatus: install ok installed\n"
                                        "Version: 3\nInstalled-Size: 2\n"),
                ("var/lib/dpkg/info/tool.list", "/usr/bin/tool\n/usr/share/tool\n"),
                ("var/lib/dpkg/info/other.list", "/usr/bin/other\n"),
                ("./usr/lib/python3/dist-packages/idna-3.20.dist-info/RECORD",
                 "idna/__init__.py,sha256=x,10\n../../../bin/idna,,\n"
                 "idna-3.20.dist-info/RECORD,,\n")]:
            raw = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(raw)
            archive.addfile(info, io.BytesIO(raw))
    data.seek(0)
    status, lists, records = pi_agent.read_books(data, {"tool"})
    assert status["tool"] == ("3", 2048) and lists == {"tool": {"/usr/bin/tool",
                                                                "/usr/share/tool"}}
    assert records == {"/usr/lib/python3/dist-packages/idna-3.20.dist-info": {
        "/usr/lib/python3/dist-packages/idna/__init__.py", "/usr/bin/idna",
        "/usr/lib/python3/dist-packages/idna-3.20.dist-info/RECORD"}}
    data.seek(0)
    changes = pi_agent.parse_diff("A /usr/lib/python3/dist-packages/idna-3.20.dist-info\n"
                                  "A /usr/bin/idna\nA /usr/lib/python3/dist-packages/idna\n"
                                  "A /var/lib/dpkg/info/tool.list\nA /usr/bin/tool\n"
                                  "A /usr/share/tool\n")
    packages, owners = pi_agent.find_packages(
        changes, lambda wanted: pi_agent.read_books(data, wanted))
    assert {p["name"]: p["change"] for p in packages} == {"idna": "installed",
                                                          "tool": "installed"}
    # (a command, in a bin directory, is no package's: see RUNS_CODE_RE)
    assert [pi_agent.owner_of(path, owners) for _kind, path in changes[1:]] == [
        None, "pip:idna", None, None, "deb:tool"]


def test_the_books_cannot_hide_where_code_runs_nor_inflate_a_size():
    """The books are the agent's to write: a fake package's list claims
    /etc/passwd, its status an absurd Installed-Size, and a book that did not
    change in the layer claims a file."""
    import io
    import tarfile
    import pi_agent
    data = io.BytesIO()
    with tarfile.open(fileobj=data, mode="w") as archive:
        for name, text in [
                ("var/lib/dpkg/status", "Package: fake\nStatus: install ok installed\n"
                                        "Version: 1\nInstalled-Size: 100000000000000\n"),
                ("var/lib/dpkg/info/fake.list", "/etc/passwd\n/usr/share/fake/f\n"
                                                "/usr/local/bin/tool\n/root/.bashrc\n"),
                ("var/lib/dpkg/info/bystander.list", "/opt/planted\n"),
                ("usr/lib/python3/dist-packages/x-1.dist-info/RECORD",
                 "x/__init__.py,,\nevil.pth,,\nsitecustomize.py,,\n")]:
            raw = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(raw)
            archive.addfile(info, io.BytesIO(raw))
    site = "/usr/lib/python3/dist-packages"
    changes = pi_agent.parse_diff(
        "A /var/lib/dpkg/info/fake.list\nC /var/lib/dpkg/status\nC /etc/passwd\n"
        "A /usr/share/fake/f\nA /usr/local/bin/tool\nC /root/.bashrc\nA /opt/planted\n"
        "A %s/x-1.dist-info\nA %s/x/__init__.py\nA %s/evil.pth\nA %s/sitecustomize.py\n"
        % ((site,) * 4))
    sizes = {path: 1000 for _kind, path in changes}

    def books(wanted):
        data.seek(0)
        return pi_agent.read_books(data, wanted)
    packages, owners = pi_agent.find_packages(changes, books)
    rows = pi_agent.credit(changes, sizes, packages, owners)
    owner = {path: owner for _kind, path, owner, _size in rows}
    assert owner["/usr/share/fake/f"] == "deb:fake" and owner[site + "/x/__init__.py"] == "pip:x"
    for path in ("/etc/passwd", "/usr/local/bin/tool", "/root/.bashrc", site + "/evil.pth",
                 site + "/sitecustomize.py", "/opt/planted"):
        assert owner[path] is None, path
    facts = pi_agent.summarize(pi_agent.leaf_rows(rows), packages)
    groups = {group["directory"]: group for group in facts["groups"]}
    assert groups["/etc"]["changed"] == 1 and "/usr/local" in groups and "/root" in groups
    size = {p["name"]: p["size"] for p in packages}
    assert size["fake"] == 1000 * len(changes), "at most what the layer's files take"
    assert size["x"] == 2000  # (its dist-info and its __init__.py)
    # Without the files' sizes (the docker diff fallback) dpkg's is not taken on trust.
    packages, owners = pi_agent.find_packages(changes, books)
    pi_agent.credit(changes, {}, packages, owners)
    assert [p["size"] for p in packages if p["name"] == "fake"] == [None]
    for forged in ("-5", "12k", "\u00b2", "9" * 5000):
        status = pi_agent.parse_dpkg_status(("Package: f\nStatus: install ok installed\n"
                                             "Version: 1\nInstalled-Size: %s\n" % forged).encode())
        assert status["f"] == ("1", None), forged


@pytest.mark.long
def test_a_run_is_read_from_its_layer_when_asked_after_prunes_and_a_flatten(box):
    """Nothing is listed at the save: pi-diff reads a run's layer when asked,
    from any image that still holds it. Three runs back, after two prunes,
    its layer is in current's; after pi-flatten, what was listed at the
    flatten is kept."""
    box.extra_env["PI_AGENT_SNAPSHOT_KEEP"] = "1"
    for name in ("first", "second", "third", "fourth"):
        box.ok("pi-exec sh -c 'echo %s > ~/%s.txt'" % (name, name))
    box.wait_saved()
    assert len(box.snapshots()) == 1, "pruned to one"
    log = json.loads(box.ok("pi-log --json").stdout)
    assert log[3]["paths"]["added"] >= 1, "three back, its snapshot pruned, read from current"
    assert any(path.endswith("/first.txt") for path in diff_paths(box, log[3]))
    box.ok("pi-exec sh -c 'echo fifth > ~/fifth.txt'")
    box.wait_saved()
    with open(box.line().sessions_path) as handle:  # (pi-log would list the run's layer)
        fifth = json.loads(handle.read().splitlines()[-1])
    reports = os.path.join(box.state_dir, [name for name in os.listdir(box.state_dir)
                                           if name.endswith(".runs")][0])
    assert not os.path.exists(os.path.join(reports, fifth["container"] + ".json"))
    box.ok("pi-flatten")
    assert os.path.exists(os.path.join(reports, fifth["container"] + ".json")), \
        "listed at the flatten, before its layer was squashed"
    box.ok("pi-prune 0")  # (the layered image kept by the flatten goes too)
    assert any(path.endswith("fifth.txt") for path in diff_paths(box, fifth))
    for name in os.listdir(reports):
        assert os.stat(os.path.join(reports, name)).st_mode & 0o077 == 0, name


def diff_paths(box, record):
    """The paths pi-diff shows from base to current, a way that takes in
    the run of this session record."""
    facts = json.loads(box.ok("pi-diff --json --all base").stdout)
    assert record["container"] in [run["container"] for run in facts["runs"]]
    assert facts["unrecorded"] == 0 and not facts["failed"], facts
    return [change["path"] for change in facts["changes"]]
