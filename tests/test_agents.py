"""Real agents from the shipped defaults, against the real engine: the
shipped Dockerfile's Node.js, Pi installed by its preset's install command
and run for a real session against a scripted model (no provider), the
extra CA certificates, the proxy variables, the git identity fallback.

`make test-agents` (PI_AGENT_TEST_AGENTS=1) also installs every other
preset's agent from the network and runs its --version through pi."""

import json
import os
import re
import shutil

import pytest


def fixture(box, name):
    """A test fixture copied into the project, where the run can read it."""
    path = os.path.join(box.project, name)
    shutil.copy(os.path.join(box.install_dir, "tests", "fixtures", name), path)
    box.chown(path)
    return name


def version(text):
    found = re.search(r"(\d+)\.(\d+)\.(\d+)", text)
    return tuple(int(part) for part in found.groups()) if found else None


@pytest.mark.long
def test_the_real_pi_installs_once_and_works_a_session_offline(box):
    box.init_repo()
    # First run, in a pipe: Pi is installed by the preset's install command,
    # quietly (nothing but Pi's own output: it prints its version on stderr).
    first = box.ok("pi -- --version")
    assert version(first.stdout + first.stderr) is not None, first.stderr
    assert "installing" not in first.stderr

    # A real session, under the default egress policy: a scripted
    # OpenAI-compatible model, inside, answers with a call of Pi's write
    # tool; the file lands in the host project.
    fixture(box, "fake_llm.py")
    models = {"providers": {"fake": {
        "baseUrl": "http://127.0.0.1:8765/v1", "api": "openai-completions", "apiKey": "none",
        "compat": {"supportsDeveloperRole": False, "supportsReasoningEffort": False},
        "models": [{"id": "m1"}]}}}
    with open(os.path.join(box.project, "models.json"), "w") as handle:
        json.dump(models, handle)
    box.chown(box.project)
    serve_then_pi = ('sh -c "mkdir -p ~/.pi/agent && mv models.json ~/.pi/agent/ && '
                     'python3 fake_llm.py 8765 /tmp/ready hello.txt \\"hi from pi\\" & '
                     'for i in $(seq 50); do [ -e /tmp/ready ] && break; sleep 0.1; done; '
                     'exec pi \\"\\$@\\"" pi')
    session = box.ok("pi -p 'write hello.txt' --provider fake --model m1",
                     env={"PI_AGENT_COMMAND": serve_then_pi})
    assert "done: wrote hello.txt" in session.stdout
    with open(os.path.join(box.project, "hello.txt")) as handle:
        assert handle.read() == "hi from pi"
    assert os.stat(os.path.join(box.project, "hello.txt")).st_uid == box.user.uid
    sessions = box.ok("pi-exec sh -c 'cat ~/.pi/agent/sessions/*/*.jsonl'").stdout
    assert "hi from pi" in sessions, "Pi's session is kept in current"
    box.wait_saved()
    status = box.ok("pi-status").stdout
    assert re.search(r"agents in current: pi \(\d+\.\d+\.\d+\)", status), status


def test_the_base_has_node_for_pi_and_trusts_the_certificates_given(box):
    """The base was built with PI_AGENT_CA_CERTS naming the tests' own CA;
    a server with a certificate from it is trusted by curl, Node and
    Python, one with a certificate from a CA not given is not."""
    fixture(box, "tls-server.pem")
    serve = ("import http.server, ssl, sys\n"
             "server = http.server.HTTPServer(('127.0.0.1', int(sys.argv[1])),"
             " http.server.SimpleHTTPRequestHandler)\n"
             "context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)\n"
             "context.load_cert_chain(sys.argv[2])\n"
             "server.socket = context.wrap_socket(server.socket, server_side=True)\n"
             "open(sys.argv[3], 'w').close()\n"
             "server.serve_forever()\n")
    with open(os.path.join(box.project, "serve.py"), "w") as handle:
        handle.write(serve)
    box.chown(box.project)
    script = r"""
        node --version
        openssl req -x509 -newkey rsa:2048 -nodes -keyout /tmp/k -out /tmp/c -days 1 \
            -subj /CN=localhost -addext subjectAltName=DNS:localhost 2>/dev/null
        cat /tmp/c /tmp/k > /tmp/untrusted.pem
        python3 serve.py 8443 tls-server.pem /tmp/a & python3 serve.py 8444 /tmp/untrusted.pem /tmp/b &
        for i in $(seq 50); do [ -e /tmp/a ] && [ -e /tmp/b ] && break; sleep 0.1; done
        echo hello > served.txt
        for port in 8443 8444; do
            curl -fsS https://localhost:$port/served.txt >/dev/null 2>&1 && echo "curl $port ok"
            node -e "fetch('https://localhost:$port/served.txt').then(r => r.ok && console.log('node $port ok'), () => {})"
            python3 -c "import urllib.request; urllib.request.urlopen('https://localhost:$port/served.txt'); print('python $port ok')" 2>/dev/null
        done
        rm served.txt
        """
    out = box.ok("pi-exec --offline sh -s", input=script).stdout
    assert version(out.splitlines()[0]) >= (20, 6, 0), out
    for tool in ("curl", "node", "python"):
        assert "%s 8443 ok" % tool in out and "%s 8444 ok" % tool not in out, out


def test_commits_inside_work_in_an_image_with_no_git_identity(box):
    box.init_repo()
    before = open(os.path.join(box.project, ".git", "config")).read()
    # The shipped base has no identity of its own (nor may an image you bring).
    commit = ("pi-exec sh -c 'cd $(mktemp -d) && git init -q && "
              "git commit -q --allow-empty -m x && git log --format=%an/%ae'")
    assert box.ok(commit).stdout.strip() == "Agent/agent@pi-agent.invalid"
    assert box.ok(commit, env={"PI_AGENT_GIT_IDENTITY": "Bob B <bob@example.com>"}).stdout \
        .strip() == "Bob B/bob@example.com"
    box.ok("pi-exec git config --global user.name Mine")
    assert box.ok("pi-exec sh -c 'cd $(mktemp -d) && git init -q && "
                  "git commit -q --allow-empty -m x && git log --format=%an'").stdout \
        == "Mine\n", "an identity the image has stays"
    assert open(os.path.join(box.project, ".git", "config")).read() == before


def test_proxy_variables_reach_the_run_and_never_an_image(box):
    """Under the default policy the run gets the egress proxy (yours are
    its way on, not the agent's to read); under open, yours, as they are."""
    proxies = {"HTTPS_PROXY": "http://me:secret@proxy.invalid:3128", "no_proxy": "localhost,.corp"}
    out = box.ok("pi-exec sh -c 'env; touch ~/p'", env=proxies).stdout
    assert "HTTPS_PROXY=http://pi-agent-egress-%d-" % box.user.uid in out
    assert "no_proxy=localhost,127.0.0.1,::1\n" in out and "secret" not in out
    proxies["PI_AGENT_EGRESS"] = "open"
    out = box.ok("pi-exec sh -c 'echo $HTTPS_PROXY $no_proxy; touch ~/p'", env=proxies).stdout
    assert out.split() == ["http://me:secret@proxy.invalid:3128", "localhost,.corp"]
    # The docker client's own proxies (which it would give every container,
    # and a commit would keep): in the run, not in the image either.
    client = box.mkdir(os.path.join(box.home, "docker-client"))
    with open(os.path.join(client, "config.json"), "w") as handle:
        json.dump({"proxies": {"default": {"httpProxy": "http://client-proxy.invalid:8080",
                                           "noProxy": "client.corp"}}}, handle)
    out = box.ok("pi-exec --egress open sh -c 'echo $HTTP_PROXY $no_proxy; touch ~/q'",
                 env={"DOCKER_CONFIG": client}).stdout
    assert out.split() == ["http://client-proxy.invalid:8080", "client.corp"]
    config = json.dumps(box.inspect(box.repo + ":current")["Config"])
    assert "proxy.invalid" not in config and "corp" not in config, config
    env = box.inspect(box.repo + ":current")["Config"]["Env"]
    assert "HTTP_PROXY=" in env, "emptied, as the image had none"


def test_an_agent_for_one_run_is_that_agents_command(box):
    out = box.ok("pi --agent codex --dry-run").stdout
    assert re.search(r"exec sh -c .* pi-agent codex$", out, re.M), out
    assert "pi: --agent gpt: use one of" in box.sh("pi --agent gpt").stderr


@pytest.mark.agents
@pytest.mark.parametrize("agent", ["claude", "codex", "aider", "opencode"])
def test_each_agent_installs_from_its_preset_and_runs(box, agent):
    result = box.ok("pi --agent %s -- --version" % agent, timeout=900)
    assert version(result.stdout + result.stderr) is not None, result.stderr
    box.wait_saved()
    assert agent in box.ok("pi-status").stdout.split("agents in current:")[1]


def test_status_asks_the_agents_in_current_without_trusting_them(box):
    """What answers pi-status's question is the agent's: a flood of output
    is cut, escape sequences are shown escaped, the caller's input is not
    read, and the answer is remembered per image."""
    box.ok("pi-exec sh -c 'mkdir -p ~/.local/bin && cd ~/.local/bin && "
           "printf \"#!/bin/sh\\nyes 1.2.3-flood | head -c 30000000\\n\" > claude && "
           "printf \"#!/bin/sh\\nprintf \\\"\\\\033]0;x\\\\007 9.9.9\\\\n\\\"\\n\" > codex && "
           "chmod +x claude codex'")
    box.wait_saved()
    result = box.ok("printf 'kept\\n' | { pi-status; cat; }")
    listed = result.stdout.split("agents in current:")[1].splitlines()[0]
    assert "claude (1.2.3-flood)" in listed and "codex (\\x1b]0;x\\x07 9.9.9)" in listed, listed
    assert result.stdout.endswith("kept\n"), "pi-status left the caller's input alone"
    assert len(result.stdout) < 10000
