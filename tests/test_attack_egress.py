"""Attacks of a hostile agent against the egress policy (issue 27), from
inside real runs on the real engine. Each test plants its attack as the
agent would and asserts the SAFE outcome: it fails while the hole is open.

Traffic goes only to this machine: its loopback, the engine's bridges and
containers the tests make (test_egress's `internet` fixture: `inet`, the
internet's stand-in on 198.51.100.0/26, `lan` on 10.213.0.0/24, `meta` at
169.254.169.254)."""

import json
import os

import pytest

from conftest import docker, wait_until
from test_egress import WEB, internet, networks_held, proxy_of  # noqa: F401 (a fixture)


def run_python(box, script, args, env=None):
    """`script` run by python3 in a run (pi-exec), `args` its JSON argv[1];
    what it printed as JSON."""
    result = box.sh("pi-exec python3 -c '%s' '%s'" % (script.replace("'", "'\\''"),
                                                     json.dumps(args)), env=env)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


# The agent looks for every egress proxy on its network (port 3128 on its
# own /24, all at once), and asks each for the internet's stand-in.
OTHER_PROXIES = r"""
import errno, json, os, select, socket, sys, time
args = json.loads(sys.argv[1])
mine = socket.gethostbyname(os.environ["HTTP_PROXY"][len("http://"):].split(":")[0])
me = socket.gethostbyname(socket.gethostname())
prefix = me.rsplit(".", 1)[0]
pending = {}
for last in range(1, 255):
    address = "%s.%d" % (prefix, last)
    if address == me:
        continue
    s = socket.socket()
    s.setblocking(False)
    s.connect_ex((address, 3128))
    pending[s] = address
found, deadline = set(args["known"]), time.monotonic() + 2
while pending and time.monotonic() < deadline:
    for s in select.select([], list(pending), [], 0.2)[1]:
        if s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0:
            found.add(pending[s])
        s.close()
        del pending[s]
for s in pending:
    s.close()

def via(proxy, line):
    s = socket.create_connection((proxy, 3128), 5)
    s.sendall(line.encode() + b"\r\n\r\n")
    data = b"".join(iter(lambda: s.recv(65536), b""))
    s.close()
    return data.decode("latin-1").split("\r\n")[0] + " | " + data.decode(
        "latin-1").rpartition("\r\n\r\n")[2].strip()

out = {"mine": mine}
for proxy in sorted(found - {mine}):
    try:
        out[proxy] = via(proxy, "GET http://inet/ HTTP/1.1\r\nHost: inet")
    except OSError as err:
        out[proxy] = "failed: %s" % err
print(json.dumps(out))
"""


@pytest.fixture(autouse=True)
def one_at_a_time():
    with networks_held():
        yield


def test_a_run_cannot_use_the_proxy_of_another_policy(box, internet):  # noqa: F811
    """Every policy's proxy of one user is on the same internal network,
    and a proxy serves whoever connects. A run under `allow` (nothing but
    its list) finds the `public` proxy another run left up (it stays ten
    minutes) by a scan of port 3128 next to its own, and goes through it to
    the internet. (The same holds for a proxy with a wider
    PI_AGENT_EGRESS_ALLOW, or PI_AGENT_HOST_PORTS: any run of the user gets
    what the loosest live proxy gives.)"""
    public = proxy_of(box)  # a run under the default: its proxy stays up
    internet["attach"](public)
    inside = "pi-agent-egress-%d" % box.user.uid
    known = docker("inspect", "--format", "{{range $n, $v := .NetworkSettings.Networks}}"
                   "{{$n}} {{$v.IPAddress}}\n{{end}}", public).stdout.split("\n")
    known = [row.split()[1] for row in known if row.split()[:1] and row.split()[0].startswith(
        inside) and not row.split()[0].endswith("-out")]
    env = {"PI_AGENT_EGRESS": "allow", "PI_AGENT_EGRESS_ALLOW": "nothing.example"}
    out = run_python(box, OTHER_PROXIES, {"known": known}, env)
    mine = out.pop("mine")
    assert mine not in known, "the allow run has a proxy of its own"
    reached = {proxy: said for proxy, said in out.items() if "inet server" in said}
    assert reached == {}, "a run under allow reached the internet through another " \
        "policy's proxy: %s" % json.dumps(out, indent=1)
    assert all(" 403 " in out[proxy] and "is not a run of this proxy's policy" in out[proxy]
               for proxy in known), json.dumps(out, indent=1)


@pytest.mark.parametrize("key", ["default", "unix:///var/run/docker.sock"])
def test_your_docker_config_proxy_password_does_not_reach_the_agent(box, key):
    """The docker client gives every container it runs the proxies of its
    config file (~/.docker/config.json), password and all, unless the run
    sets those variables itself. Under `public` pi-agent promises that your
    proxy, and its password, stay with the egress proxy: the run's script
    exports the egress proxy's, but the container's own environment (PID
    1's, in /proc) still holds yours."""
    secret = "http://me:s3cret-pw@10.9.9.9:3128"
    config = os.path.join(box.home, ".docker")
    os.makedirs(config, exist_ok=True)
    with open(os.path.join(config, "config.json"), "w") as handle:
        json.dump({"proxies": {key: {"httpProxy": secret, "httpsProxy": secret,
                                     "ftpProxy": secret, "noProxy": "corp.example"}}},
                  handle)
    box.chown(config)
    out = box.ok("pi-exec sh -c 'env; for p in /proc/[0-9]*/environ; do "
                 "tr \"\\0\" \"\\n\" < $p; done 2>/dev/null; sudo cat /proc/1/environ | "
                 "tr \"\\0\" \"\\n\"'").stdout
    assert "HTTPS_PROXY=http://pi-agent-egress-" in out, out
    leaked = sorted(set(row for row in out.splitlines() if "s3cret" in row))
    assert leaked == [], "your proxy's password reached the agent: %s" % leaked


# What the agent asks a proxy, and what it answers: (status line, body).
ASK = r"""
import json, os, socket, sys, time
args = json.loads(sys.argv[1])
proxy = args.get("proxy") or os.environ["HTTP_PROXY"][len("http://"):].split(":")[0]

def via(line):
    s = socket.create_connection((proxy, 3128), 15)
    s.sendall(line.encode() + b"\r\n\r\n")
    data = b"".join(iter(lambda: s.recv(65536), b""))
    s.close()
    text = data.decode("latin-1")
    return [text.split("\r\n")[0], text.rpartition("\r\n\r\n")[2].strip()]

print(json.dumps({line: via(line) for line in args["lines"]}))
"""


def test_allow_does_not_look_up_names_it_does_not_list(box, internet):  # noqa: F811
    """Under `allow` the proxy resolved every name the agent asked for
    before refusing it: the agent has the user's DNS, a channel out
    (`<your secrets>.attacker.example` reaches the attacker's name server)
    and an oracle (the refusal names the address: the LAN's names, mapped
    from inside). Here `lan`, a name the engine's DNS answers (as your
    LAN's DNS would), listed nowhere."""
    env = {"PI_AGENT_EGRESS": "allow", "PI_AGENT_EGRESS_ALLOW": "inet"}
    internet["attach"](proxy_of(box, env))
    out = run_python(box, ASK, {"lines": ["CONNECT lan:443 HTTP/1.1",
                                          "GET http://lan/ HTTP/1.1\r\nHost: lan",
                                          "GET http://inet/ HTTP/1.1\r\nHost: inet"]}, env)
    assert out["GET http://inet/ HTTP/1.1\r\nHost: inet"][1] == "inet server"
    for line in ("CONNECT lan:443 HTTP/1.1", "GET http://lan/ HTTP/1.1\r\nHost: lan"):
        status = out[line][0]
        assert status.startswith("HTTP/1.1 403 "), out
        assert internet["lan"] not in status, "the proxy looked %s up: %s" % ("lan", status)


# A proxy of yours (a corporate one): it takes you anywhere it can reach,
# your LAN included, resolving names itself.
OPEN_PROXY = r"""
import socket, threading
def pump(a, b):
    try:
        for data in iter(lambda: a.recv(65536), b""):
            b.sendall(data)
    except OSError:
        pass
    try:
        b.shutdown(socket.SHUT_WR)
    except OSError:
        pass
def serve(c):
    head = b""
    while b"\r\n\r\n" not in head:
        data = c.recv(4096)
        if not data:
            return
        head += data
    method, target, _ = head.split(b"\r\n")[0].decode().split(" ")
    if method == "CONNECT":
        host, port = target.rsplit(":", 1)
        u = socket.create_connection((host, int(port)), 10)
        c.sendall(b"HTTP/1.1 200 OK\r\n\r\n")
        u.sendall(head.split(b"\r\n\r\n", 1)[1])
    else:
        host, _, port = target.split("/")[2].partition(":")
        u = socket.create_connection((host, int(port or 80)), 10)
        u.sendall(head.replace(target.encode(), b"/" + target.split("/", 3)[3].encode(), 1))
    threading.Thread(target=pump, args=(u, c), daemon=True).start()
    pump(c, u)
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 3128))
s.listen(64)
while True:
    threading.Thread(target=serve, args=(s.accept()[0],), daemon=True).start()
"""


def test_through_your_proxy_the_name_checked_is_the_address_reached(box):
    """With a proxy of yours (HTTPS_PROXY on the host), the egress proxy
    checks what a name resolves to, then hands your proxy the NAME, which
    it resolves again: a rebinding name (or one your LAN's DNS answers
    otherwise than the world's) is public to the check and your LAN to
    your proxy. Here `twofaced` is 198.51.100.66 where the egress proxy
    looks and 10.213.1.x (a LAN server) where yours does."""
    suffix = box.repo.rsplit("/", 1)[1]
    made = {"nets": [], "boxes": []}
    public = None
    try:
        proxy_of(box)  # (the networks, made)
        for name, subnet, ip in (("pub", "198.51.100.64/26", "198.51.100.66"),
                                 ("lan", "10.213.1.0/24", "10.213.1.2")):
            net = "pi-agent-test-twin%s-%s" % (name, suffix)
            docker("network", "create", "--subnet", subnet, net)
            made["nets"].append(net)
            made[name] = net
            container = "pi-agent-test-twin%s-%s" % (name, suffix)
            docker("run", "-d", "--rm", "--name", container, "--network", net, "--ip", ip,
                   "--network-alias", "twofaced", "-u", "0", "--entrypoint", "python3",
                   box.repo + ":base", "-c", WEB, "%s twin" % name)
            made["boxes"].append(container)
        yours = "pi-agent-test-yourproxy-" + suffix
        docker("run", "-d", "--rm", "--name", yours, "--network",
               "pi-agent-egress-%d-out" % box.user.uid, "--entrypoint", "python3",
               box.repo + ":base", "-c", OPEN_PROXY)
        made["boxes"].append(yours)
        docker("network", "connect", made["lan"], yours)
        address = docker("inspect", "--format", '{{(index .NetworkSettings.Networks "%s")'
                         '.IPAddress}}' % ("pi-agent-egress-%d-out" % box.user.uid),
                         yours).stdout.strip()
        env = {"HTTPS_PROXY": "http://%s:3128" % address,
               "HTTP_PROXY": "http://%s:3128" % address}
        public = proxy_of(box, env)
        docker("network", "connect", made["pub"], public)
        got = box.ok("pi-exec sh -c 'curl -s -m 10 http://twofaced/; "
                     "curl -s -m 10 -p http://twofaced:80/; true'", env=env).stdout
    finally:
        if public:
            docker("network", "disconnect", "-f", made["pub"], public, check=False)
        if made["boxes"]:
            docker("rm", "-f", *made["boxes"], check=False)
        for net in made["nets"]:
            docker("network", "rm", net, check=False)
    assert "lan twin" not in got, "the agent reached your LAN through your proxy: %r" % got


SLOW_HEAD = r"""
import json, os, socket, time
proxy = os.environ["HTTP_PROXY"][len("http://"):].split(":")[0]
s = socket.create_connection((proxy, 3128), 5)
s.sendall(b"GET http://inet/ HTTP/1.1\r\nX: ")
started, answer = time.monotonic(), b""
s.settimeout(3)
while time.monotonic() - started < 16:
    try:
        s.sendall(b"a")       # a byte every 3 s: each read of the proxy's gets one
        answer = s.recv(4096)
        break                 # (answered, or closed)
    except socket.timeout:
        continue
    except OSError as err:
        answer = str(err).encode()
        break
print(json.dumps([round(time.monotonic() - started), answer.decode("latin-1")[:100]]))
"""


def test_a_slow_head_is_cut_off_at_ten_seconds(box):
    """Each read of a request's head waited 10 s, but the head as a whole
    had no limit: a byte every few seconds held a connection (up to 16 kB:
    days), where the proxy promises a head within 10 s."""
    took, answer = run_python(box, SLOW_HEAD, {})
    assert answer.startswith("HTTP/1.1 408 ") and took <= 12, (took, answer)


def ask_proxy(box):
    """What the box's proxy tells the host (its one proxy: egress.json)."""
    import socket
    known = json.load(open(os.path.join(box.state_dir, "egress.json")))
    address = [value for key, value in known.items() if key not in ("outside", "routed")][0]
    try:
        with socket.create_connection((address, 3128), 2) as sock:
            sock.sendall(b"GET /never/ HTTP/1.0\r\n\r\n")
            data = b"".join(iter(lambda: sock.recv(65536), b""))
        return json.loads(data.partition(b"\r\n\r\n")[2])
    except (OSError, ValueError):
        return {}


NEW_BRIDGE = r"""
import json, os, socket, sys, time
proxy = os.environ["HTTP_PROXY"][len("http://"):].split(":")[0]
open("ready", "w").close()
while not os.path.exists("go"):
    time.sleep(0.1)
target = open("go").read().strip()
s = socket.create_connection((proxy, 3128), 10)
s.sendall(b"CONNECT %s HTTP/1.1\r\n\r\n" % target.encode())
data = b"".join(iter(lambda: s.recv(65536), b""))
with open("result", "w") as out:
    out.write(data.decode("latin-1"))
"""


def test_a_bridge_made_during_a_run_is_still_the_host(box):
    """The host's own addresses are never reachable, whatever the
    exceptions say: pi-agent lists them when the proxy starts. A network
    made while a run lasts (docker compose up in another terminal; here a
    docker network create) gives the host a new address, in a private
    range your exception lets through (10.231.0.0/16, your LAN say): the
    agent reaches every service of your host on 0.0.0.0 through it."""
    from test_egress import Listener
    env = {"PI_AGENT_EGRESS": "allow", "PI_AGENT_EGRESS_ALLOW": "10.231.0.0/16"}
    with open(os.path.join(box.project, "attack.py"), "w") as handle:
        handle.write(NEW_BRIDGE)
    box.chown(box.project)
    listener = Listener()
    net = "pi-agent-test-newbridge-" + box.repo.rsplit("/", 1)[1]
    try:
        box.extra_env.update(env)  # (what box.running's session takes)
        with box.running("pi-exec python3 attack.py") as run:
            assert wait_until(lambda: os.path.exists(os.path.join(box.project, "ready")),
                              timeout=60)
            docker("network", "create", "--subnet", "10.231.77.0/24", net)
            # (the proxy is told within half a second: that window stays open)
            wait_until(lambda: "10.231.77.1" in ask_proxy(box).get("never", ()), timeout=10)
            with open(os.path.join(box.project, "go"), "w") as handle:
                handle.write("10.231.77.1:%d" % listener.port)
            assert wait_until(lambda: os.path.exists(os.path.join(box.project, "result")),
                              timeout=60), run.stderr
    finally:
        listener.close()
        docker("network", "rm", net, check=False)
    result = open(os.path.join(box.project, "result")).read()
    assert listener.peers == [], "the agent reached the host at 10.231.77.1: %r" % result
    assert " 403 " in result.split("\r\n")[0], result


def test_the_hosts_own_ipv6_address_is_the_host_however_it_is_spelled(box):
    """pi-agent listed the host's IPv6 addresses as /proc spells them
    (fd27:000a:0000:0000:0000:0000:0000:0001) and the proxy compared them
    with its own spelling (fd27:a::1): never the same, so none of them was
    the host to it. With an exception for the network's range (a ULA of
    your LAN), the agent reached your host's services on [::] at its own
    address there."""
    from test_egress import Listener
    net = "pi-agent-test-v6-" + box.repo.rsplit("/", 1)[1]
    docker("network", "create", "--ipv6", "--subnet", "fd27:a::/64", net)
    listener = Listener()
    proxy = None
    try:
        env = {"PI_AGENT_EGRESS": "allow", "PI_AGENT_EGRESS_ALLOW": "fd27:a::/64"}
        proxy = proxy_of(box, env)
        docker("network", "connect", net, proxy)
        out = run_python(box, ASK, {"lines": ["CONNECT [fd27:a::1]:%d HTTP/1.1"
                                              % listener.port]}, env)
    finally:
        listener.close()
        if proxy:
            docker("network", "disconnect", "-f", net, proxy, check=False)
        docker("network", "rm", net, check=False)
    assert listener.peers == [], "the agent reached the host at fd27:a::1: %s" % out
    status = list(out.values())[0][0]
    assert status.startswith("HTTP/1.1 403 ") and "never reachable" in status, status


def test_other_clouds_metadata_services_are_never_reachable_either(box):
    """Alibaba Cloud's metadata service is 100.100.100.200: in CGNAT,
    which an exception takes in (100.64.0.0/10: Tailscale's addresses, a
    usual one). The metadata service is never reachable whatever the
    exceptions say; here it was, with the VM's credentials behind it."""
    net = "pi-agent-test-alimeta-" + box.repo.rsplit("/", 1)[1]
    container = net
    proxy = None
    docker("network", "create", "--subnet", "100.100.100.0/24", net)
    try:
        docker("run", "-d", "--rm", "--name", container, "--network", net, "--ip",
               "100.100.100.200", "-u", "0", "--entrypoint", "python3", box.repo + ":base",
               "-c", WEB, "metadata")
        env = {"PI_AGENT_EGRESS_ALLOW": "100.64.0.0/10"}
        proxy = proxy_of(box, env)
        docker("network", "connect", net, proxy)
        out = run_python(box, ASK, {"lines": [
            "GET http://100.100.100.200/latest/meta-data/ HTTP/1.1\r\nHost: 100.100.100.200"]},
            env)
    finally:
        if proxy:
            docker("network", "disconnect", "-f", net, proxy, check=False)
        docker("rm", "-f", container, check=False)
        docker("network", "rm", net, check=False)
    status, body = list(out.values())[0]
    assert body != "metadata", "the agent reached 100.100.100.200: %s" % out
    assert status.startswith("HTTP/1.1 403 ") and "never reachable" in status, status


# A proxy of yours that only says what it was asked (and connects nowhere).
TELLING_PROXY = r"""
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 3128))
s.listen(64)
while True:
    c = s.accept()[0]
    head = b""
    while b"\r\n\r\n" not in head:
        data = c.recv(4096)
        if not data:
            break
        head += data
    print("asked", head.split(b"\r\n")[0].decode("latin-1"), flush=True)
    c.sendall(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n")
    c.close()
"""


def test_your_proxy_is_handed_the_address_checked_not_the_agents_spelling(box):
    """The egress proxy reads `0127.0.0.1` as the C library does (octal:
    87.0.0.1, the internet) and `010.0.0.5` as 8.0.0.5; then it handed your
    proxy the agent's spelling, which a proxy that reads leading zeros as
    decimal (Go before 1.17, CVE-2021-29923; many URL parsers) takes for
    its own loopback, or your LAN. An address is handed on as the address
    that was checked. (Your proxy here only says what it was asked.)"""
    suffix = box.repo.rsplit("/", 1)[1]
    proxy_of(box)  # (the networks, made)
    yours = "pi-agent-test-telling-" + suffix
    out = "pi-agent-egress-%d-out" % box.user.uid
    docker("run", "-d", "--rm", "--name", yours, "--network", out, "--entrypoint", "python3",
           box.repo + ":base", "-c", TELLING_PROXY)
    try:
        address = docker("inspect", "--format", '{{(index .NetworkSettings.Networks "%s")'
                         '.IPAddress}}' % out, yours).stdout.strip()
        env = {"HTTPS_PROXY": "http://%s:3128" % address,
               "HTTP_PROXY": "http://%s:3128" % address}
        run_python(box, ASK, {"lines": ["CONNECT 0127.0.0.1:80 HTTP/1.1",
                                        "GET http://010.0.0.5/ HTTP/1.1\r\nHost: 010.0.0.5"]},
                   env)
        asked = [row for row in docker("logs", yours).stdout.splitlines()
                 if row.startswith("asked ")]
    finally:
        docker("rm", "-f", yours, check=False)
    assert asked == ["asked CONNECT 87.0.0.1:80 HTTP/1.1",
                     "asked GET http://8.0.0.5:80/ HTTP/1.1"], asked


def test_a_name_your_exception_lists_that_is_your_host_is_refused(box):
    """A named exception reaches what the name resolves to, private ranges
    included: a name that resolves to one of your host's own private
    addresses (its LAN address, a bridge's) reached every service of the
    host on 0.0.0.0, where the host's addresses are never reachable. The
    name here is 182936321 (what the resolver reads as 10.231.99.1, the
    host's side of a network the test makes): as your LAN's DNS would
    answer for a name of yours that is this machine."""
    from test_egress import Listener
    net = "pi-agent-test-hostname-" + box.repo.rsplit("/", 1)[1]
    docker("network", "create", "--subnet", "10.231.99.0/24", net)
    listener = Listener()
    try:
        env = {"PI_AGENT_EGRESS_ALLOW": "182936321"}
        out = run_python(box, ASK, {"lines": ["CONNECT 182936321:%d HTTP/1.1"
                                              % listener.port]}, env)
    finally:
        listener.close()
        docker("network", "rm", net, check=False)
    assert listener.peers == [], "the agent reached the host at 10.231.99.1: %s" % out
    status = list(out.values())[0][0]
    assert status.startswith("HTTP/1.1 403 ") and "never reachable" in status, status
