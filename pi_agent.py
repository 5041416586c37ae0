#!/usr/bin/env python3
"""pi-agent: run a coding agent in a snapshotted, contained Docker workstation.

Commands (shell function in shell/pi.sh, then pi_agent.py's subcommand):

 Run the agent, or anything, in your environment:
  pi [OPTIONS] [--] [AGENT ARGS]   run           the agent in the current project
  pi-exec [OPTIONS] [--] CMD ...   exec          a command, same lifecycle
  pi-shell [OPTIONS]               shell         an interactive shell, same lifecycle
 Look:
  pi-status                        status        settings, images, lock, target
  pi-snapshots [--pin NAME]        snapshots     snapshots, newest first; pin one
  pi-orphans                       orphans       containers left by interrupted runs
  pi-log [-n N] [--json]           log           the saved runs, newest first
  pi-diff [SNAPSHOT | A B]         diff          what runs changed: packages, paths
 Undo:
  pi-rollback [SNAPSHOT]           rollback      current := a snapshot (undoable)
  pi-reset-system                  reset-system  current := base (undoable), agents' files kept
  pi-reset-all [--yes] [--base]    reset-all     remove current and all snapshots
                                                 (--base: all of yours, base too)
 Side by side:
  pi-branch [NAME [--from X]]      branch        list profiles; make one (a copy)
  pi-branch --delete NAME          branch        delete a profile
  pi-worktree NAME [BASE]          worktree      pi in ../REPO-NAME, profile NAME
  pi-worktree --remove NAME        worktree      remove that worktree
 Keep it tidy:
  pi-prune [N] [--dry-run]         prune         drop what retention lets go (N: all but N)
  pi-flatten                       flatten       rewrite current as one layer
  pi-rebuild-base [--no-cache]     rebuild-base  build the base image again
  pi-recover [CONTAINER]           recover       save a left-behind container now
  pi-clean-orphans [--yes]         clean-orphans discard left-behind containers
  pi-unlock                        unlock        who holds the lock, and why

Every run: find the project (git root, else the current directory), take the
image line's lock, start a container from REPO:current with only the project
mounted, run the agent as its main process, then save: commit the
container, keep the replaced image as REPO:snap-<time>, move REPO:current.
A profile (PI_AGENT_PROFILE, --profile NAME) is an image line of its own,
REPO:NAME-current and REPO:NAME-snap-<time>, with its own lock: agents of
different profiles run at the same time. pi or pi-shell where an agent of
the profile runs in the same project joins its container instead.
The save runs in a detached saver process that holds the lock, so the prompt
comes back at once and a closed terminal or a killed wrapper loses nothing.

Exit codes:
  0    success
  N    run, exec, shell: the exit status of the agent or command
  2    usage error
  3    refused: unsafe mount target (a shared or system directory, one
       holding a Unix socket, ...), credential in PI_AGENT_PASS_ENV,
       destructive command without --yes
  4    not found: unknown snapshot, container, image, Dockerfile or profile
  5    busy: an agent is running on this image line or in this project
       (use --wait; pi-shell joins it; another profile runs beside it)
  6    the docker command is not installed
  7    the Docker engine is unreachable
  8    the Docker engine failed (build, commit, tag, ...)
  9    bad setting (a PI_AGENT_* variable or a line of the config file)
  10   pi-status --check: a check failed
  127  run, exec: the command is not there inside
  130  interrupted
"""

import errno
import fcntl
import json
import os
import re
import shlex
import signal
import stat
import struct
import subprocess
import sys
import time

__version__ = "0.2.0"
STARTED = time.monotonic()  # (for trace_step)

HERE = os.path.dirname(os.path.abspath(__file__))


# ------------------------------------------------------------------ constants
#
# Every PI_AGENT_* setting, with its default and meaning; exit codes; the
# names and limits the other sections share.

# Every setting: name, default, meaning. Defaults in <> are computed.
SETTINGS = (
    ("PI_AGENT_IMAGE_REPO", "<pi-agent-NAME, NAME your login name>",
     "image repository: REPO:base, REPO:current, REPO:snap-* (one per user: users of one "
     "engine never share one)"),
    ("PI_AGENT_PROFILE", "",
     "the environment's profile: an image line of its own, REPO:NAME-current and "
     "REPO:NAME-snap-* (empty: REPO:current; pi-branch makes one; --profile NAME for one "
     "command)"),
    ("PI_AGENT_DOCKERFILE", "<Dockerfile beside pi_agent.py>",
     "the Dockerfile the base image is built from"),
    ("PI_AGENT_BASE_IMAGE", "ubuntu:24.04",
     "the image that Dockerfile starts FROM (build arg BASE_IMAGE)"),
    ("PI_AGENT_STATE_DIR", "<${XDG_STATE_HOME:-~/.local/state}/pi-agent>",
     "locks, run state, the save log and each run's script"),
    ("PI_AGENT_ENGINE", "<docker if a docker command reaches an engine, else podman>",
     "the container engine, driven with its own command: docker or podman"),
    ("PI_AGENT_AGENT", "pi",
     "the agent: pi, claude, codex, aider or opencode (its command, install command and "
     "API key variables; pi --agent NAME for one run)"),
    ("PI_AGENT_COMMAND", "<the agent's>",
     "the agent command that pi runs"),
    ("PI_AGENT_INSTALL_CMD", "<the agent's>",
     "run inside when the agent command is missing"),
    ("PI_AGENT_PASS_ENV", "<the agent's API key variables>",
     "host variables passed to the agent when set (none: no variable)"),
    ("PI_AGENT_GIT_IDENTITY", "Agent <agent@pi-agent.invalid>",
     "the author and committer of commits made inside, whatever the project's git config says"),
    ("PI_AGENT_MOUNT_AT", "",
     "mount the project here instead of at its host path"),
    ("PI_AGENT_CA_CERTS", "",
     "extra CA certificates for the base image: PEM files or directories of them, comma "
     "separated (a TLS-inspecting proxy's, say)"),
    ("PI_AGENT_NETWORK", "",
     "the container's network: empty for the engine's default, none for offline"),
    ("PI_AGENT_EGRESS", "public",
     "what a run reaches: public (the internet, not your host, LAN or cloud metadata), allow "
     "(only PI_AGENT_EGRESS_ALLOW and the agent's own hosts), open (the engine's network), none "
     "(nothing); pi --egress POLICY for one run"),
    ("PI_AGENT_EGRESS_ALLOW", "",
     "exceptions: names, *.suffixes, host:port, addresses or CIDRs a run may reach, private "
     "ones too (comma separated)"),
    ("PI_AGENT_HOST_PORTS", "",
     "ports of services on your host's loopback (a model server: 11434) that a run reaches as "
     "host.docker.internal:PORT, forwarded while it runs (comma separated)"),
    ("PI_AGENT_CPUS", "", "CPU limit, e.g. 2 or 1.5 (docker run --cpus)"),
    ("PI_AGENT_MEMORY", "<3/4 of this machine's memory>",
     "memory limit, e.g. 4g (docker run --memory; none: no limit)"),
    ("PI_AGENT_PIDS", "<4096, or half your own process limit if lower>",
     "process limit, e.g. 512 (docker run --pids-limit; none: no limit)"),
    ("PI_AGENT_SNAPSHOT_KEEP", "10",
     "the newest snapshots auto-prune and pi-prune keep, noise apart (and one a day for a "
     "week, one a week for a month, the pinned)"),
    ("PI_AGENT_AUTO_PRUNE", "1",
     "prune snapshots after each saved run (1/0)"),
    ("PI_AGENT_NOISE", "~/.bash_history ~/.zsh_history ~/.python_history ~/.lesshst ~/.viminfo "
     "~/.pi/agent/sessions/ ~/.claude/projects/ ~/.claude/todos/ ~/.claude/shell-snapshots/ "
     "~/.claude/statsig/ ~/.claude.json* ~/.codex/sessions/ ~/.codex/log/ "
     "~/.codex/history.jsonl ~/.aider/caches/ ~/.local/share/opencode/storage/ "
     "~/.local/share/opencode/log/",
     "paths whose changes alone do not make a run's state worth keeping (histories, sessions): "
     "shell patterns, ~/ the agent's home, DIR/ all below it (none: nothing)"),
    ("PI_AGENT_FLATTEN_LAYER_THRESHOLD", "100",
     "flatten current when a save leaves it with this many layers (0: never; "
     "the engine refuses commits at 125)"),
    ("PI_AGENT_TRACE", "",
     "a file to log every docker command to, with its duration"),
    ("PI_AGENT_SAVE_LIMIT", "",
     "the most a save may write, e.g. 10g (empty: half the engine's free space, 20g where that "
     "is not known; none: only the free space): a bigger run is not saved, its container waits "
     "for pi-recover --drop PATH or pi-clean-orphans"),
    ("PI_AGENT_SAVE", "background",
     "background: the prompt returns while the saver commits; "
     "foreground: wait for the save and report it"),
    ("PI_AGENT_RECORD_CHANGES", "1",
     "after each save, record what the run changed in the environment, for pi-diff (1/0)"),
    ("PI_AGENT_HARDLINKS", "copy",
     "project files that are hard links to files outside it (uv's, pnpm's caches): copy (make "
     "them copies of their own before the run), refuse (stop, naming the fix), allow (leave "
     "them: the agent can change those files through them)"),
)

# PI_AGENT_* variables that are not settings: the shell functions' and the
# installer's.
OTHER_VARIABLES = ("PI_AGENT_PYTHON", "PI_AGENT_CONFIG", "PI_AGENT_HOME", "PI_AGENT_RELEASE_URL")

# Host variables the container sees (besides PI_AGENT_PASS_ENV), and the
# locale's (LOCALE_ENV). The proxy variables reach the run (and the base
# build, as build args), never an image: a corporate network needs them.
PROXY_ENV = ("HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "ALL_PROXY",
             "http_proxy", "https_proxy", "no_proxy", "all_proxy")
ALLOWED_ENV = ("TERM", "COLORTERM", "TZ") + PROXY_ENV
# The locale: POSIX's categories only, each with a value that names a
# locale. Never any other LC_*: sshd accepts every LC_* a client sends, and
# people carry tokens in them.
LOCALE_ENV = ("LANG", "LC_ALL", "LC_CTYPE", "LC_COLLATE", "LC_MESSAGES", "LC_MONETARY",
              "LC_NUMERIC", "LC_TIME", "LC_ADDRESS", "LC_IDENTIFICATION", "LC_MEASUREMENT",
              "LC_NAME", "LC_PAPER", "LC_TELEPHONE")
LOCALE_VALUE = re.compile(r"(?:|C|POSIX|[a-z]{2,3}(?:_[A-Z]{2})?)"
                          r"(?:\.(?i:utf-?8|iso-?8859-?1?[0-9]|"
                          r"euc-?(?:jp|kr|tw|cn)|gb(?:2312|k|18030)|big5(?:-?hkscs)?|koi8-?[ru]|"
                          r"cp125[0-9]|tis-?620|ascii))?(?:@[a-z]{3,10})?")

# The agents pi-agent knows (PI_AGENT_AGENT, pi --agent): the command, how
# it installs itself inside, as the agent user (npm's prefix and ~/.local
# are the agent's own: no sudo), and the API key variables it reads, passed
# when set on the host (PI_AGENT_PASS_ENV replaces the list).
AGENTS = {
    "pi": ("pi", "npm install -g @mariozechner/pi-coding-agent",
           ("ANTHROPIC_API_KEY", "OPENAI_API_KEY", "AZURE_OPENAI_API_KEY", "DEEPSEEK_API_KEY",
            "GEMINI_API_KEY", "MISTRAL_API_KEY", "GROQ_API_KEY", "CEREBRAS_API_KEY",
            "XAI_API_KEY", "OPENROUTER_API_KEY", "AI_GATEWAY_API_KEY", "ZAI_API_KEY",
            "OPENCODE_API_KEY", "FIREWORKS_API_KEY", "KIMI_API_KEY", "MINIMAX_API_KEY")),
    "claude": ("claude", "npm install -g @anthropic-ai/claude-code", ("ANTHROPIC_API_KEY",)),
    "codex": ("codex", "npm install -g @openai/codex", ("OPENAI_API_KEY",)),
    "aider": ("aider", "python3 -m venv ~/.local/share/aider && ~/.local/share/aider/bin/pip "
              "install --quiet aider-chat && mkdir -p ~/.local/bin && ln -sf "
              "~/.local/share/aider/bin/aider ~/.local/bin/aider",
              ("OPENAI_API_KEY", "ANTHROPIC_API_KEY", "GEMINI_API_KEY", "DEEPSEEK_API_KEY",
               "OPENROUTER_API_KEY")),
    "opencode": ("opencode", "npm install -g opencode-ai",
                 ("ANTHROPIC_API_KEY", "OPENAI_API_KEY", "GEMINI_API_KEY",
                  "OPENROUTER_API_KEY")),
}

# Each agent's own files in its home: its login, settings and sessions,
# which pi-reset-system carries over to the new current (unless told not to).
AGENT_CONFIG = {"pi": (".pi",), "claude": (".claude", ".claude.json"), "codex": (".codex",),
                "aider": (".aider", ".aider.conf.yml"),
                "opencode": (".config/opencode", ".local/share/opencode")}

# What each agent reaches under PI_AGENT_EGRESS=allow besides the list:
# its model APIs and the registry its install command uses.
AGENT_HOSTS = {
    "pi": ("registry.npmjs.org", "api.anthropic.com", "api.openai.com", "*.openai.azure.com",
           "api.deepseek.com", "generativelanguage.googleapis.com", "api.mistral.ai",
           "api.groq.com", "api.cerebras.ai", "api.x.ai", "openrouter.ai",
           "ai-gateway.vercel.sh", "api.z.ai", "opencode.ai", "api.fireworks.ai",
           "api.moonshot.ai", "api.minimax.io"),
    "claude": ("registry.npmjs.org", "api.anthropic.com", "statsig.anthropic.com",
               "console.anthropic.com", "claude.ai"),
    "codex": ("registry.npmjs.org", "api.openai.com", "auth.openai.com", "chatgpt.com"),
    "aider": ("pypi.org", "files.pythonhosted.org", "api.openai.com", "api.anthropic.com",
              "generativelanguage.googleapis.com", "api.deepseek.com", "openrouter.ai"),
    "opencode": ("registry.npmjs.org", "opencode.ai", "models.dev", "api.anthropic.com",
                 "api.openai.com", "generativelanguage.googleapis.com", "openrouter.ai"),
}

# Set empty inside, and refused in PI_AGENT_PASS_ENV: they open doors
# outside the container (accounts, agents, the Docker engine).
CREDENTIAL_ENV = (
    "GITHUB_TOKEN", "GH_TOKEN", "GH_ENTERPRISE_TOKEN", "GITHUB_ENTERPRISE_TOKEN",
    "GITLAB_TOKEN", "GL_TOKEN", "BITBUCKET_TOKEN",
    "SSH_AUTH_SOCK", "SSH_AGENT_PID", "GPG_AGENT_INFO",
    "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
    "AWS_PROFILE", "AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE",
    "GOOGLE_APPLICATION_CREDENTIALS", "CLOUDSDK_AUTH_ACCESS_TOKEN",
    "AZURE_CLIENT_SECRET", "AZURE_CLIENT_CERTIFICATE_PATH",
    "KUBECONFIG", "NPM_TOKEN", "NODE_AUTH_TOKEN", "YARN_NPM_AUTH_TOKEN",
    "CARGO_REGISTRY_TOKEN", "TWINE_PASSWORD", "PYPI_TOKEN",
    "DOCKER_HOST", "DOCKER_CONFIG", "DOCKER_CERT_PATH", "DOCKER_CONTEXT",
    "VAULT_TOKEN", "HEROKU_API_KEY", "DIGITALOCEAN_ACCESS_TOKEN",
)

# Host directories that hold credentials: never a mount target.
CREDENTIAL_DIRS = (".ssh", ".gnupg", ".aws", ".azure", ".kube", ".docker",
                   ".config/gcloud", ".config/gh", ".password-store")

# Mounting at one of these (or above one) would shadow the image's own files.
SYSTEM_DIRS = ("/bin", "/boot", "/dev", "/etc", "/home", "/lib", "/lib32",
               "/lib64", "/libx32", "/media", "/mnt", "/opt", "/proc", "/root",
               "/run", "/sbin", "/srv", "/sys", "/tmp", "/usr", "/var")
# ... and a project inside one of these would land in the image's own tree.
SYSTEM_TREES = ("/bin", "/boot", "/dev", "/etc", "/lib", "/lib32", "/lib64",
                "/libx32", "/proc", "/run", "/sbin", "/sys", "/usr")

# Never a project: directories many programs share (their sockets and files
# are there; a project goes in a directory of its own inside one) ...
SHARED_DIRS = ("/tmp", "/var/tmp", "/var", "/usr", "/usr/local", "/opt", "/srv", "/home", "/mnt",
               "/media", "/root", "/Users", "/Volumes", "/private", "/private/tmp",
               "/private/var")
# ... nor anything inside these: devices, sockets (the Docker socket among
# them), the system's programs, configuration and state.
HOST_TREES = ("/proc", "/sys", "/dev", "/run", "/var/run", "/var/lock", "/boot", "/etc",
              "/var/lib", "/var/log", "/var/spool", "/var/cache", "/var/mail", "/bin", "/sbin",
              "/lib", "/lib32", "/lib64", "/libx32", "/usr/bin", "/usr/sbin", "/usr/lib",
              "/usr/lib32", "/usr/lib64", "/usr/libexec", "/usr/share", "/usr/include",
              "/System", "/Library", "/private/etc")

# Capabilities that root inside (sudo) does not need to install software
# (apt, npm and pip work without them) and that would let it make what the
# host must not get from a project: device nodes, file capabilities, raw
# packets on the network, chroot escapes.
CAP_DROP = ("MKNOD", "SETFCAP", "NET_RAW", "SYS_CHROOT", "SETPCAP")
CAP_DROP_ARGS = [arg for cap in CAP_DROP for arg in ("--cap-drop", cap)]

# PI_AGENT_EGRESS. Through the egress proxy no run reaches these, whatever
# the exceptions say: "this network", loopback, link-local (the cloud
# metadata service, 169.254.169.254, is there), multicast and reserved ...
NEVER_NETS = ("0.0.0.0/8", "127.0.0.0/8", "169.254.0.0/16", "224.0.0.0/3", "fe80::/10",
              "ff00::/8")
# ... nor clouds' metadata services outside link-local (Alibaba's, in CGNAT,
# which an exception for Tailscale's addresses takes in; Oracle Cloud
# Classic's; AWS's over IPv6, a ULA), though an exception may take in their
# range ...
METADATA_ADDRESSES = ("100.100.100.200", "192.0.0.192", "fd00:ec2::254")
# ... and these only as exceptions (PI_AGENT_EGRESS_ALLOW): RFC 1918, CGNAT,
# benchmarking, IETF protocol assignments, IPv6 ULA and site-local, local
# NAT64, Teredo. (IPv6 forms that carry an IPv4 address are judged by it.)
PRIVATE_NETS = ("10.0.0.0/8", "100.64.0.0/10", "172.16.0.0/12", "192.0.0.0/24",
                "192.168.0.0/16", "198.18.0.0/15", "fc00::/7", "fec0::/10", "64:ff9b:1::/48",
                "2001::/32")
EGRESS_POLICIES = ("public", "allow", "open", "none")

SNAPSHOT_PREFIX = "snap-"
SNAPSHOT_RE = re.compile(r"^snap-(\d{8})-(\d{6})\.(\d{3})$")
# Retention: besides the newest PI_AGENT_SNAPSHOT_KEEP, the newest of each
# of the last days and weeks (UTC, Monday to Sunday), as backups keep them.
KEEP_DAYS, KEEP_WEEKS = 7, 5
# A pin is a second tag of a snapshot's image, [PROFILE-]pin-NAME, which no
# prune removes. A NAME that could read as another profile's tag is refused.
PIN_PREFIX = "pin-"
PIN_CLASH_RE = re.compile(r"(^|-)(current$|snap-|pin-)|^base$")
# A profile is an image line of its own in the same repository (base is
# shared): tags NAME-current and NAME-snap-*, its own lock and state. The
# default profile has the plain names, current and snap-*.
DEFAULT_PROFILE = "default"
PROFILE_RE = re.compile(r"[a-z0-9][a-z0-9_.-]{0,39}")
LABEL = "pi-agent."
# Every container and image pi-agent makes carries its user's UID here, and
# what a command changes or removes (recovery, orphans, prune, reset) is
# only what carries the user's own: users of one engine never touch each
# other's (by accident: anyone with the engine can set any label).
OWNER_LABEL = LABEL + "uid"
# The repository all users of an engine shared before each had one: a user
# whose state directory holds its files keeps it (their environments are
# there), as long as its images are theirs (check_owner).
SHARED_REPO = "pi-agent"
MINE = "%s=%d" % (OWNER_LABEL, os.getuid())  # (as --label and --filter label= take it)
# The labels a run puts on its container. The engine copies container labels
# into the committed image, so the save overwrites each with its image value;
# only the wrapper pid, meaningless on an image, becomes empty. An empty pid
# is also how a container started by hand from current is told from ours.
RUN_LABELS = ("repo", "profile", "pid", "host", "target", "started", "kind", "snapshot", "kept")
MOUNTS_LABEL = LABEL + "mounts"
MAX_KNOWN_MOUNTS = 200

# Where the engine mounts its init (--init) binary: a mount point it creates.
INIT_MOUNTS = ("/sbin/docker-init", "/usr/sbin/docker-init", "/run/podman-init")
# Podman's too: the files it gives each container (those an image lacks end
# up in the container's own layer, and their directory changed).
PODMAN_MOUNTS = ("/etc/hosts", "/etc/hostname", "/etc/resolv.conf", "/etc/mtab",
                 "/run/.containerenv")
# A run's environment and command reach the container as a script in a
# private host directory mounted here, never as `-e` or command arguments,
# which the engine would keep in the container's config and commit into the
# image. /dev is the engine's tmpfs, so the mount point leaves no trace in
# the container's own layer.
RUN_DIR_INSIDE = "/dev/pi-agent"
RUN_SCRIPT = "run"
# A session that joins a running run (pi-shell during pi) writes its script
# into the run directory as JOIN_PREFIX<pid> and holds an flock on it while
# it lasts; to join, it holds a shared flock on JOIN_FILE for a moment. The
# run's script, once its command has ended, takes JOIN_FILE exclusively (so
# that no session joins a run that is ending), then waits for the sessions'
# files to go or their locks to be released. The agent can make neither
# (the directory is read-only inside), so it cannot fake a session to keep
# its container up.
JOIN_FILE = "join"
JOIN_PREFIX = "join-"
# The CMD a committed image gets when its image had neither CMD nor
# ENTRYPOINT: a commit keeps the container's command unless told another.
FALLBACK_CMD = ["sh"]
# Seconds an agent has to stop after a signal before the save goes ahead.
STOP_GRACE = 3
# overlay2 refuses to commit on an image this deep ("max depth exceeded");
# other stores have limits of their own (Engine.max_layers).
MAX_LAYERS = 125
ENGINES = ("docker", "podman")

LIFECYCLE_KINDS = ("run", "exec", "shell")

# Sessions that join a run of their profile in their project, instead of
# waiting for it (pi-exec, for scripts, keeps the lock's rules).
JOINABLE_KINDS = ("run", "shell")

EXIT_USAGE = 2
EXIT_REFUSED = 3
EXIT_NOT_FOUND = 4
EXIT_BUSY = 5
EXIT_NO_DOCKER = 6
EXIT_ENGINE_DOWN = 7
EXIT_ENGINE_ERROR = 8
EXIT_BAD_SETTING = 9
EXIT_CHECK_FAILED = 10
EXIT_INTERRUPTED = 130


# --------------------------------------------------------------------- errors
#
# The one way out: a PiError is one line on stderr and its exit code.

class PiError(Exception):
    """A failure the user can act on: one line on stderr and an exit code."""

    code = 1

    def __init__(self, message, code=None):
        super().__init__(message)
        if code is not None:
            self.code = code


class Refused(PiError):
    code = EXIT_REFUSED


class NotFound(PiError):
    code = EXIT_NOT_FOUND


class Busy(PiError):
    code = EXIT_BUSY


class EngineError(PiError):
    code = EXIT_ENGINE_ERROR


class BadSetting(PiError):
    code = EXIT_BAD_SETTING


# --------------------------------------------------------------------- output
#
# What the user sees: one line per message, nothing that steers a terminal.

def colour(code):
    """An ANSI colour for stderr: only on a terminal, never with NO_COLOR."""
    try:
        wanted = sys.stderr.isatty() and "NO_COLOR" not in os.environ and \
            os.environ.get("TERM") != "dumb"
    except (AttributeError, ValueError):
        wanted = False
    return ("\033[%sm" % code, "\033[0m") if wanted else ("", "")


# Control characters (C0, DEL, C1) and the marks that reorder text: a file
# name the agent chose must not move the cursor, erase a line or recolour one.
UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069"
                         "\ud800-\udfff]")  # (the last: bytes of a name that is not UTF-8)


def printable(text):
    """`text` with every character that could steer a terminal escaped."""
    def escape(match):
        code = ord(match.group())
        if 0xdc80 <= code <= 0xdcff:  # a byte that was not UTF-8
            return "\\x%02x" % (code - 0xdc00)
        return "\\x%02x" % code if code < 0x100 else "\\u%04x" % code
    return UNPRINTABLE.sub(escape, str(text))


def say(message, kind=None):
    """One line for the user on stderr (errors red, warnings yellow on a
    terminal); a closed terminal is not an error. Whatever the message
    holds is made printable first: much of it comes from the agent's world."""
    start, end = colour({"error": "1;31", "warning": "33"}.get(kind, "")) if kind else ("", "")
    try:
        print("%spi-agent:%s %s" % (start, end, printable(message)), file=sys.stderr,
              flush=True)
    except (OSError, ValueError):
        pass


class Alarm(str):
    """A note that is an error: something pi-agent could not make safe."""


def utc_iso(epoch):
    """2026-11-27T11:03:24.481Z: sortable, and precise enough to order runs."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(epoch)) + ".%03dZ" % (epoch % 1 * 1000)


def utc_epoch(struct):
    """calendar.timegm of (year, month, day, hour, minute, second), without
    importing calendar or datetime (and what they import) at start-up: the
    days since 1970 by the proleptic Gregorian calendar's own rule."""
    year, month, day, hour, minute, second = struct[:6]
    year -= month <= 2
    era, offset = divmod(year, 400)
    day_of_year = (153 * (month + (-3 if month > 2 else 9)) + 2) // 5 + day - 1
    day_of_era = offset * 365 + offset // 4 - offset // 100 + day_of_year
    days = era * 146097 + day_of_era - 719468
    return days * 86400 + hour * 3600 + minute * 60 + second


def local_time(iso):
    """'2026-11-27T11:03:24.481Z' -> '2026-11-27 11:03:24' in local time."""
    text = (iso or "")[:19]
    try:
        # (not strptime: its import costs 4 ms, on the way to a joined session)
        epoch = utc_epoch([int(text[start:end]) for start, end in
                           ((0, 4), (5, 7), (8, 10), (11, 13), (14, 16), (17, 19))])
    except ValueError:
        return iso or "?"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(epoch))


def exit_number(status):
    """A run's exit status as a number, or None when it is not known."""
    return int(status) if str(status).isdigit() else None


def human_size(size):
    if size < 1000:
        return "%d B" % size
    for unit in ("kB", "MB"):
        size /= 1000
        if size < 1000:
            return "%.1f %s" % (size, unit)
    return "%.1f GB" % (size / 1000)


def plural(count, noun):
    return "%d %s%s" % (count, noun, "" if count == 1 else "s")


def clip(text, limit=200):
    return text if len(text) <= limit else text[:limit - 3] + "..."


def print_table(rows):
    rows = [[printable(cell) for cell in row] for row in rows]
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        cells = [str(cell).ljust(width) for cell, width in zip(row, widths)]
        print("  ".join(cells).rstrip())


# ---------------------------------------------------- helpers used everywhere
#
# Paths compared and reached without following a link the agent made, files
# read and written whole, processes looked for.

def is_within(path, parent):
    """path is parent or below it (both normalized, absolute)."""
    return path == parent or parent == "/" or path.startswith(parent + "/")


def real_path(path):
    """os.path.realpath, or None where it cannot say (a chain of links so
    long it would recurse past Python's limit)."""
    try:
        return os.path.realpath(path)
    except (RecursionError, OSError):
        return None


def read_regular(path, limit=1 << 20, dir_fd=None):
    """The bytes of a regular file, or None: never through a symlink (its
    last component), never blocking on a FIFO, never more than `limit`."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=dir_fd)
    except OSError:
        return None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_size > limit:
            return None
        chunks, left = [], info.st_size + 1
        while left > 0:
            chunk = os.read(fd, min(left, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        data = b"".join(chunks)
        return data if len(data) <= limit else None
    except OSError:
        return None
    finally:
        os.close(fd)


def open_dir(name, dir_fd=None):
    """A directory's fd, never through a symlink (nor a non-directory)."""
    return os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dir_fd)


def copy_file(source, dest, limit):
    """A new file `dest` (never through an existing one or a link) with the
    bytes of the regular file `source` (never through a link; `limit`
    bytes at most), copied by the kernel where it can (a large git index
    must not cost a run a copy through this process). False when `source`
    is not such a file."""
    try:
        fd = os.open(source, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return False
    try:
        size = os.fstat(fd).st_size
        if not stat.S_ISREG(os.fstat(fd).st_mode) or size > limit:
            return False
        out = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        try:
            done = 0
            while done < size:
                try:
                    copied = os.copy_file_range(fd, out, size - done, done, done)
                except (AttributeError, OSError):  # (not Linux, or not across these)
                    copied = os.write(out, os.pread(fd, min(size - done, 1 << 20), done))
                if not copied:
                    break
                done += copied
        finally:
            os.close(out)
        return True
    finally:
        os.close(fd)


def open_beneath(base, *parts):
    """An fd of base/parts..., no component of `parts` a symlink, or None:
    even a repository the host trusts may hold links the agent planted in
    an earlier life of it, and they must not lead a copy elsewhere."""
    try:
        fd = open_dir(base)
    except OSError:
        return None
    for part in parts:
        try:
            inner = open_dir(part, fd)
        except OSError:
            inner = None
        os.close(fd)
        if inner is None:
            return None
        fd = inner
    return fd


def read_beneath(base, *parts, limit=16 << 20):
    """The bytes of the plain file base/parts... (see open_beneath), or None."""
    fd = open_beneath(base, *parts[:-1])
    if fd is None:
        return None
    try:
        return read_regular(parts[-1], limit, dir_fd=fd)
    finally:
        os.close(fd)


def physical(target, path):
    """The directory target/path (`path` relative) is reached through real
    directories alone, no symbolic link on the way: checked a component at
    a time, never with realpath (a chain of links an agent made would make
    that recurse)."""
    fd = open_beneath(target, *[part for part in path.split("/") if part])
    if fd is None:
        return False
    os.close(fd)
    return True


def write_file(path, data, mode=0o644):
    """A new file (never through an existing one or a link)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


def replace_file(path, data, mode=0o600):
    """The one atomic write: `path` holds `data` whole, or what it held (a
    file beside it, written, then renamed over it; never through a link; a
    file left so by a killed process of the same pid is replaced)."""
    temp = "%s.%d.tmp" % (path, os.getpid())
    try:
        os.unlink(temp)
    except FileNotFoundError:
        pass
    write_file(temp, data, mode)
    os.replace(temp, path)


def sha256_hex(data):
    """The SHA-256 of `data`, in hex, from the interpreter's own module:
    hashlib loads OpenSSL first, which costs each run 5 ms."""
    try:
        from _sha256 import sha256  # (Python 3.11 and before)
    except ImportError:
        from hashlib import sha256
    return sha256(data).hexdigest()


def text_digest(text):
    return sha256_hex(text.encode("utf-8", "surrogateescape"))


def json_lines(output):
    return [json.loads(line) for line in output.splitlines() if line.strip()]


def csv_field(text):
    """One field of docker's --mount value, which docker parses as CSV."""
    if any(char in text for char in ',"\r\n') or text != text.strip():
        return '"' + text.replace('"', '""') + '"'
    return text


def mount_spec(source, destination):
    return ",".join(csv_field(field) for field in
                    ("type=bind", "source=" + source, "target=" + destination))


def label_args(labels):
    args = []
    for key, value in labels.items():
        args += ["--label", "%s=%s" % (key, value)]
    return args


def dockerfile_quote(text):
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("$", "\\$") + '"'


def pid_alive(pid):
    """The process exists and is not a zombie (a killed saver whose new
    parent has not reaped it yet is dead for our purposes)."""
    try:
        os.kill(int(pid), 0)
    except (ProcessLookupError, ValueError, TypeError):
        return False
    except PermissionError:
        pass
    try:
        with open("/proc/%d/stat" % int(pid)) as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return True  # no /proc (macOS): existence is all we can tell


def home_dirs(environ=None):
    """The user's home directories: $HOME and the password database's."""
    environ = os.environ if environ is None else environ
    homes = set()
    if environ.get("HOME"):
        homes.add(os.path.realpath(environ["HOME"]))
    try:
        import pwd
        homes.add(os.path.realpath(pwd.getpwuid(os.getuid()).pw_dir))
    except (ImportError, KeyError):
        pass
    return sorted(homes)


# ------------------------------------------------------------------- settings
#
# The config file, read as a shell would, and the Config every command starts
# from.

def parse_bool(name, value):
    lowered = value.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise BadSetting("%s=%s is not a yes/no value; use 1 or 0" % (name, value))


def config_path(environ):
    """PI_AGENT_CONFIG, else ${XDG_CONFIG_HOME:-~/.config}/pi-agent/config."""
    if environ.get("PI_AGENT_CONFIG"):
        return environ["PI_AGENT_CONFIG"]
    base = environ.get("XDG_CONFIG_HOME") or os.path.join(
        environ.get("HOME") or os.path.expanduser("~"), ".config")
    return os.path.join(base, "pi-agent", "config")


def tilde_prefix(text, index):
    """The ~ or ~user a shell expands at `index` of an assignment (at the
    value's start, or after an unquoted colon), or None."""
    prefix = re.match(r"~[A-Za-z0-9._-]*", text[index:]).group()
    following = text[index + len(prefix):index + len(prefix) + 1]
    return prefix if following in ("", "/", ":", " ", "\t") else None


def shell_value(text, home):
    """The value a POSIX shell assigns for NAME=text: '...' literal, "..."
    with its backslash escapes, a backslash outside quotes, ~ and ~user at
    the start or after a colon, and a trailing # comment. An expansion ($,
    `), a second word, an operator or a backslash that would join the next
    line is refused: the shell would expand it or run it. (A test holds it
    to dash's reading of random values.)"""
    value, index, word_start = [], 0, True
    while index < len(text):
        char, at, word_start = text[index], word_start, False
        if char in " \t":
            rest = text[index:].lstrip(" \t")
            if rest and not rest.startswith("#"):
                raise BadSetting("a value with spaces needs quotes (a shell would run %r as a "
                                 "command)" % re.match(r"[^ \t]*", rest).group())
            break
        if char == "'":
            end = text.find("'", index + 1)
            if end < 0:
                raise BadSetting("unterminated ' quote")
            value.append(text[index + 1:end])
            index = end + 1
        elif char == '"':
            index += 1
            while index < len(text) and text[index] != '"':
                if text[index] == "\\" and text[index + 1:index + 2] in ("$", "`", '"', "\\"):
                    index += 1
                elif text[index] in "$`":
                    raise BadSetting("%s is not expanded here: write the value out (or put it "
                                     "in single quotes)" % text[index])
                value.append(text[index])
                index += 1
            if index >= len(text):
                raise BadSetting('unterminated " quote')
            index += 1
        elif char == "\\":
            if index + 1 == len(text):
                raise BadSetting("a backslash at the end of a line joins the next one in a shell: "
                                 "not here")
            value.append(text[index + 1])
            index += 2
        elif char in "$`":
            raise BadSetting("%s is not expanded here: write the value out, or quote it ('...')"
                             % char)
        elif char in ";&|<>()":
            raise BadSetting("%s is not allowed unquoted (a shell would take it as an operator): "
                             "quote the value ('...')" % char)
        elif char == "~" and at and tilde_prefix(text, index):
            prefix = tilde_prefix(text, index)
            value.append(home if prefix == "~" else os.path.expanduser(prefix))
            index += len(prefix)
        else:
            value.append(char)
            index += 1
            word_start = char == ":"  # an assignment expands ~ after a colon too
    return "".join(value)


def read_config_file(path, home, problems=None):
    """{NAME: (value, line number)} from NAME=value lines, read as a POSIX
    shell would assign them (so the file can be sourced, and means the same):
    blank lines, # comments, `export `, quotes, a leading ~. What a shell
    would read differently is refused, each line with its number; with
    `problems` (a list), bad lines are put there and skipped instead."""
    try:
        # Lines end at a newline only, as in a shell (no universal newlines).
        with open(path, encoding="utf-8", newline="") as handle:
            text = handle.read()
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError) as err:
        raise BadSetting("cannot read the config file %s: %s" % (path, err))
    known = [name for name, _default, _meaning in SETTINGS]
    values = {}
    for number, line in enumerate(text.split("\n"), 1):
        entry = line.strip(" \t")
        try:
            if re.search(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029]", line):
                raise BadSetting("a control character%s; a shell reads it otherwise"
                                 % (" (a Windows line end: save the file with Unix ones)"
                                    if line.endswith("\r") else ""))
            if not entry or entry.startswith("#"):
                continue
            if entry.startswith("export "):
                entry = entry[len("export "):].lstrip(" \t")
            name, equals, value = entry.partition("=")
            if not equals or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
                raise BadSetting("expected NAME=value with no spaces around =, not %r" % line)
            if name not in known:
                import difflib
                close = difflib.get_close_matches(name, known, 1)
                raise BadSetting("unknown setting %s%s" % (
                    name, "; did you mean %s?" % close[0] if close else "; pi-status lists them"))
            values[name] = (shell_value(value, home), number)
        except BadSetting as err:
            err = BadSetting("%s line %d: %s" % (path, number, err))
            if problems is None:
                raise err
            problems.append(str(err))
    return values


def shadows_the_image(path, container_home=None):
    """Mounting at `path` would hide (or land inside) the image's own tree."""
    protected = SYSTEM_DIRS + ((container_home,) if container_home else ())
    return (any(is_within(system, path) for system in protected)
            or any(is_within(path, tree) for tree in SYSTEM_TREES))


# No --ulimit nproc beside --pids-limit: RLIMIT_NPROC counts every process of
# the UID on the host (the agent's is yours), so a limit inside would fail the
# agent's forks for your processes outside; root (sudo) is not held to it;
# and a hard limit above the engine's own fails the run. The pids cgroup is
# the container's own.
def parse_limits(raw):
    """docker run options for the resource limits that are set (none: no limit)."""
    options = []
    checks = (("PI_AGENT_CPUS", "--cpus", r"\d+(\.\d+)?", "a number of CPUs such as 2 or 1.5"),
              ("PI_AGENT_MEMORY", "--memory", r"\d+(\.\d+)?[bkmgBKMG]?",
               "a size such as 4g or 512m"),
              ("PI_AGENT_PIDS", "--pids-limit", r"\d+", "a whole number of processes such as 512"))
    for name, option, pattern, what in checks:
        value = raw[name]
        if value in ("", "none"):
            continue
        if not re.fullmatch(pattern, value) or float(re.sub(r"[a-zA-Z]", "", value)) <= 0:
            raise BadSetting("%s=%s is not %s, nor none" % (name, value, what))
        options += [option, value]
    return options


def profile_problem(name):
    """Why `name` cannot name a profile, or None. It becomes part of image
    tags and, for pi-worktree, of a directory and a git branch."""
    if not PROFILE_RE.fullmatch(name):
        return ("a profile name is 1 to 40 of a-z, 0-9, '.', '_' and '-', starting with a "
                "letter or digit")
    if name in ("base", "current"):
        return "the default profile's images are named %s; pick another name" % name
    if name.startswith(SNAPSHOT_PREFIX):
        return ("a name starting with %s would read as a snapshot's; pick another name"
                % SNAPSHOT_PREFIX)
    if ".." in name or name.endswith((".", ".lock")):
        return ("pi-worktree makes a git branch agent/NAME, and git refuses that one; pick "
                "another name")
    return None


def checked_profile(prog, name, option="--profile"):
    """A profile name given on the command line (after `option`, or as an
    argument if None): "" for the default profile, None when not given."""
    if name is None or name == DEFAULT_PROFILE:
        return name and ""
    problem = profile_problem(name)
    if problem:
        raise PiError("%s: %s: %s" % (prog, "%s %s" % (option, shlex.quote(name)) if option
                                      else "profile name %s" % shlex.quote(name), problem),
                      EXIT_USAGE)
    return name


def parse_pass_env(value):
    if value.strip() == "none":
        return []
    names = [name for name in re.split(r"[\s,]+", value) if name]
    for name in names:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise BadSetting("PI_AGENT_PASS_ENV: %r is not a variable name; list names like "
                             "ANTHROPIC_API_KEY, separated by commas or spaces" % name)
        if name in CREDENTIAL_ENV:
            raise Refused("PI_AGENT_PASS_ENV lists %s, a credential pi-agent never passes "
                          "into the container; remove it from PI_AGENT_PASS_ENV" % name)
    return names


def address_class(text, never=()):
    """never, private or public (see NEVER_NETS): what the egress proxy
    makes of an address. `never`: more addresses no run reaches (the
    host's own)."""
    import ipaddress
    ip = ipaddress.ip_address(text)
    if ip.version == 6:
        inner = ip.ipv4_mapped or ip.sixtofour
        if inner is None and (int(ip) >> 32 == 0 or ip in ipaddress.ip_network("64:ff9b::/96")):
            inner = ipaddress.IPv4Address(int(ip) & 0xffffffff)  # (compatible, NAT64)
        if inner is not None:
            return address_class(str(inner), never)
    if str(ip) in never or str(ip) in METADATA_ADDRESSES:
        return "never"
    for kind, nets in (("never", NEVER_NETS), ("private", PRIVATE_NETS)):
        if any(ip in ipaddress.ip_network(net) for net in nets):
            return kind
    return "public"


def parse_allow(value):
    """PI_AGENT_EGRESS_ALLOW: [{"name": NAME or *.SUFFIX, or "net": CIDR;
    "port": N or None}]. The host's own ports are PI_AGENT_HOST_PORTS'."""
    import ipaddress
    entries = []
    for word in value.replace(",", " ").split():
        found = re.fullmatch(r"\[([^]]+)\](?::(\d+))?|([^][:]+)(?::(\d+))?|([0-9A-Fa-f:./]+)", word)
        where = found and (found.group(1) or found.group(3) or found.group(5)).lower()
        port = found and (found.group(2) or found.group(4))
        entry = {"port": int(port) if port else None}
        try:
            entry["net"] = ipaddress.ip_network(where or "-", strict=False)
        except ValueError:
            entry["name"] = (where or "").rstrip(".")
            if not re.fullmatch(r"(\*\.)?[a-z0-9_](?:[a-z0-9_-]*[a-z0-9_])?"
                                r"(?:\.[a-z0-9_](?:[a-z0-9_-]*[a-z0-9_])?)*", entry["name"]):
                raise BadSetting("PI_AGENT_EGRESS_ALLOW: %s is not a name, *.suffix, host:port, "
                                 "address or CIDR" % word)
        if entry.get("name") == "host.docker.internal":
            raise BadSetting("PI_AGENT_EGRESS_ALLOW: %s: your host's ports are "
                             "PI_AGENT_HOST_PORTS' (e.g. PI_AGENT_HOST_PORTS=%s)"
                             % (word, port or 11434))
        if port is not None and not 0 < int(port) < 65536:
            raise BadSetting("PI_AGENT_EGRESS_ALLOW: %s: the port is not 1 to 65535" % word)
        net = entry.get("net")
        if net and any(net.overlaps(ipaddress.ip_network(never)) for never in NEVER_NETS
                       if ipaddress.ip_network(never).version == net.version):
            raise BadSetting("PI_AGENT_EGRESS_ALLOW: %s takes in loopback, link-local (the cloud "
                             "metadata service) or multicast addresses, which no run reaches; "
                             "name what you need (PI_AGENT_EGRESS=open is the engine's own "
                             "network)" % word)
        if net:
            entry["net"] = str(net)
        entries.append(entry)
    return entries


def parse_ports(value):
    ports = value.replace(",", " ").split()
    if not all(port.isdigit() and 0 < int(port) < 65536 for port in ports):
        raise BadSetting("PI_AGENT_HOST_PORTS=%s: use port numbers, comma separated (e.g. 11434)"
                         % value)
    return sorted(set(int(port) for port in ports))


def ca_cert_files(value):
    """The files PI_AGENT_CA_CERTS names (absolute paths: files, or
    directories of *.crt and *.pem), in a stable order."""
    files = []
    for item in (part.strip() for part in value.split(",")):
        if not item:
            continue
        if not item.startswith("/"):
            raise BadSetting("PI_AGENT_CA_CERTS: %s must be an absolute path (a relative one "
                             "would be read from the project you are in)" % item)
        if not os.path.isdir(item):
            files.append(item)
            continue
        try:
            names = os.listdir(item)
        except OSError as err:
            raise BadSetting("PI_AGENT_CA_CERTS: cannot read %s: %s" % (item, err.strerror))
        files += sorted(os.path.join(item, name) for name in names
                        if name.endswith((".crt", ".pem")))
    return files


CERT_BLOCK = re.compile(r"-----BEGIN CERTIFICATE-----\r?\n[A-Za-z0-9+/=\r\n]+"
                        r"-----END CERTIFICATE-----")
# What one build arg can carry (the kernel's limit for one argument is 128 KiB).
MAX_CA_TEXT = 100000


def read_ca_certs(value):
    """The certificates of PI_AGENT_CA_CERTS as PEM text: the certificate
    blocks of regular files, nothing else of them, so nothing secret is
    built into an image."""
    blocks = []
    for path in ca_cert_files(value):
        try:
            info = os.stat(path)
            if not stat.S_ISREG(info.st_mode) or info.st_size > 1 << 20:
                raise BadSetting("PI_AGENT_CA_CERTS: %s is not a certificate file (a regular "
                                 "file under 1 MB)" % path)
            with open(path, "rb") as handle:
                text = handle.read(1 << 20).decode("ascii", "replace")
        except OSError as err:
            raise BadSetting("PI_AGENT_CA_CERTS: cannot read %s: %s" % (path, err.strerror))
        if "PRIVATE KEY" in text:
            raise Refused("PI_AGENT_CA_CERTS: %s holds a private key, which must never go "
                          "into an image; name the certificate alone" % path)
        found = CERT_BLOCK.findall(text)
        if not found:
            raise BadSetting("PI_AGENT_CA_CERTS: %s is not a PEM certificate" % path)
        blocks += [block.replace("\r", "") for block in found]
    text = "\n".join(blocks)
    if len(text) > MAX_CA_TEXT:
        raise BadSetting("PI_AGENT_CA_CERTS: %d certificates (%d kB) are more than a build "
                         "can take; name only those your network needs (not a whole system "
                         "bundle)" % (len(blocks), len(text) // 1000))
    return text


def own_repo():
    """pi-agent-NAME, NAME the login name (uidUID where that is no repository
    name): an image repository of the user's own."""
    try:
        import pwd
        name = pwd.getpwuid(os.getuid()).pw_name
    except (ImportError, KeyError):
        name = ""
    if not re.fullmatch(r"[a-z0-9]+(?:[._-][a-z0-9]+)*", name) or len(name) > 64:
        name = "uid%d" % os.getuid()
    return "pi-agent-" + name


def default_repo(state_dir):
    """PI_AGENT_IMAGE_REPO's default: the user's own repository, or the
    shared one of earlier versions where the user has used it."""
    if any(os.path.exists(os.path.join(state_dir, SHARED_REPO + suffix))
           for suffix in (".lock", ".json")):
        return SHARED_REPO
    return own_repo()


class Config:
    """The effective settings. Precedence: defaults < the config file <
    the environment < command-line flags; `sources` says where each came from."""

    def __init__(self, environ=None, lenient=False, agent=None, profile=None, egress=None):
        """`lenient` (for pi-status): a bad line or value is kept in
        `problems` and its setting left at the default, instead of raised.
        `agent`: pi --agent NAME, for one run; `profile`: --profile NAME;
        `egress`: --egress POLICY."""
        environ = os.environ if environ is None else environ
        self.environ = environ
        self.path = config_path(environ)
        self.problems = [] if lenient else None
        from_file = read_config_file(self.path, environ.get("HOME") or os.path.expanduser("~"),
                                     self.problems)
        self.sources = {}
        raw = {}
        for name, default, _meaning in SETTINGS:
            if environ.get(name, "") != "":
                raw[name], self.sources[name] = environ[name], "environment"
            elif name in from_file:
                raw[name] = from_file[name][0]
                self.sources[name] = "%s line %d" % (self.path, from_file[name][1])
            else:
                raw[name], self.sources[name] = self._default(name, default, environ), "default"
        if profile is not None:
            raw["PI_AGENT_PROFILE"], self.sources["PI_AGENT_PROFILE"] = profile, "--profile"
        if self.sources["PI_AGENT_IMAGE_REPO"] == "default":
            raw["PI_AGENT_IMAGE_REPO"] = default_repo(raw["PI_AGENT_STATE_DIR"])
        if egress is not None:
            raw["PI_AGENT_EGRESS"], self.sources["PI_AGENT_EGRESS"] = egress, "--egress"
        self.raw = raw
        self._preset(agent)
        for _attempt in SETTINGS:
            try:
                self._check(raw)
                break
            except PiError as err:
                # Say where a bad value came from when it was the config file.
                name = re.match(r"PI_AGENT_[A-Z_]+", str(err))
                name = name and name.group()
                if name and self.sources.get(name) not in (None, "environment", "default"):
                    err = type(err)("%s: %s" % (self.sources[name], err), err.code)
                if not lenient or name not in raw or self.sources[name] == "default":
                    raise err
                self.problems.append(str(err))
                raw[name] = default_repo(raw["PI_AGENT_STATE_DIR"]) \
                    if name == "PI_AGENT_IMAGE_REPO" else \
                    self._default(name, dict((n, d) for n, d, _ in SETTINGS)[name], environ)
                self.sources[name] = "default, as the value is bad"
                self._preset(None)
        global _trace_file, _engine_setting
        _trace_file, _engine_setting = raw["PI_AGENT_TRACE"], raw["PI_AGENT_ENGINE"]

    def _check(self, raw):
        """Every error here starts with the name of the setting it is about:
        __init__ adds the config file's line when the value came from there."""
        self.image_repo = raw["PI_AGENT_IMAGE_REPO"]
        if not re.fullmatch(r"[a-z0-9]+(?:[._-]+[a-z0-9]+)*(?:/[a-z0-9]+(?:[._-]+[a-z0-9]+)*)*",
                            self.image_repo):
            raise BadSetting("PI_AGENT_IMAGE_REPO=%s is not a Docker repository name "
                             "(lowercase letters, digits, . _ - /; no tag)" % self.image_repo)
        self.profile = "" if raw["PI_AGENT_PROFILE"] == DEFAULT_PROFILE else raw["PI_AGENT_PROFILE"]
        problem = profile_problem(self.profile) if self.profile else None
        if problem:
            raise BadSetting("PI_AGENT_PROFILE=%s: %s" % (self.profile, problem))
        self.dockerfile = raw["PI_AGENT_DOCKERFILE"]
        self.base_image = raw["PI_AGENT_BASE_IMAGE"]
        self.state_dir = os.path.normpath(raw["PI_AGENT_STATE_DIR"])
        for name in ("PI_AGENT_DOCKERFILE", "PI_AGENT_STATE_DIR"):
            if not raw[name].startswith("/"):
                raise BadSetting("%s=%s must be an absolute path (a relative one would change "
                                 "with the directory you are in)" % (name, raw[name]))
        state = os.path.realpath(self.state_dir)
        if state == "/" or state in SHARED_DIRS or \
                any(is_within(state, tree) for tree in HOST_TREES) \
                or any(is_within(home, state) for home in home_dirs(self.environ)):
            raise BadSetting("PI_AGENT_STATE_DIR=%s is shared with other files; pi-agent makes "
                             "it private (0700): use a directory of its own, e.g. "
                             "~/.local/state/pi-agent" % self.state_dir)
        self.agent = raw["PI_AGENT_AGENT"]
        if self.agent not in AGENTS:
            raise BadSetting("PI_AGENT_AGENT=%s: use one of %s (PI_AGENT_COMMAND and "
                             "PI_AGENT_INSTALL_CMD run any other)"
                             % (self.agent, ", ".join(AGENTS)))
        self.command = raw["PI_AGENT_COMMAND"]
        try:
            self.command_argv = shlex.split(self.command)
        except ValueError as err:
            raise BadSetting("PI_AGENT_COMMAND=%s: %s" % (self.command, err))
        if not self.command_argv:
            raise BadSetting("PI_AGENT_COMMAND is empty; set it to the agent command, e.g. pi")
        self.install_cmd = raw["PI_AGENT_INSTALL_CMD"]
        self.pass_env = parse_pass_env(raw["PI_AGENT_PASS_ENV"])
        # The agent's own keys go to the agent (pi), not to every command
        # (pi-exec npm ci runs package scripts); a list you set goes to all.
        self.keys_for_agent_only = self.sources["PI_AGENT_PASS_ENV"].startswith("agent ")
        self.ca_certs = read_ca_certs(raw["PI_AGENT_CA_CERTS"])
        identity = re.fullmatch(r"\s*([^<>\n]*[^<>\s])\s*<([^<>\s]+)>\s*",
                                raw["PI_AGENT_GIT_IDENTITY"])
        if not identity:
            raise BadSetting("PI_AGENT_GIT_IDENTITY=%s is not like Name <email>"
                             % raw["PI_AGENT_GIT_IDENTITY"])
        self.git_identity = identity.groups()
        self.mount_at = raw["PI_AGENT_MOUNT_AT"]
        if self.mount_at:
            self.mount_at = os.path.normpath(self.mount_at)
            if not self.mount_at.startswith("/") or shadows_the_image(self.mount_at):
                raise BadSetting("PI_AGENT_MOUNT_AT=%s would hide part of the image (or is not "
                                 "absolute); use a path of its own, e.g. /workspace"
                                 % raw["PI_AGENT_MOUNT_AT"])
        self.network = raw["PI_AGENT_NETWORK"]
        if self.network == "host":
            raise BadSetting("PI_AGENT_NETWORK=host would give the agent the host's own network "
                             "(and every service on its localhost); use none, or a network "
                             "made with docker network create")
        if self.network and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", self.network):
            raise BadSetting("PI_AGENT_NETWORK=%s is not a network name; use none, or a name "
                             "from docker network ls" % self.network)
        self.egress = raw["PI_AGENT_EGRESS"]
        if self.egress not in EGRESS_POLICIES:
            raise BadSetting("PI_AGENT_EGRESS=%s: use public, allow, open or none" % self.egress)
        # A network of your own is yours to rule (open); none is none.
        if self.network == "none":
            self.egress = "none"
        elif self.network and self.sources["PI_AGENT_EGRESS"] == "default":
            self.egress = "open"
        elif self.network and self.egress != "open":
            raise BadSetting("PI_AGENT_EGRESS=%s cannot hold a run on PI_AGENT_NETWORK=%s, a "
                             "network of yours: use PI_AGENT_EGRESS=open with it, or unset "
                             "PI_AGENT_NETWORK" % (self.egress, self.network))
        self.egress_allow = parse_allow(raw["PI_AGENT_EGRESS_ALLOW"])
        self.host_ports = parse_ports(raw["PI_AGENT_HOST_PORTS"])
        self.limits = parse_limits(raw)
        keep = raw["PI_AGENT_SNAPSHOT_KEEP"]
        if not keep.isdigit():
            raise BadSetting("PI_AGENT_SNAPSHOT_KEEP=%s is not a whole number >= 0" % keep)
        self.snapshot_keep = int(keep)
        threshold = raw["PI_AGENT_FLATTEN_LAYER_THRESHOLD"]
        if not threshold.isdigit() or (0 < int(threshold) < 2) or int(threshold) > MAX_LAYERS - 10:
            raise BadSetting("PI_AGENT_FLATTEN_LAYER_THRESHOLD=%s: use 0 (never) or a number of "
                             "layers from 2 to %d" % (threshold, MAX_LAYERS - 10))
        self.flatten_threshold = int(threshold)
        self.auto_prune = parse_bool("PI_AGENT_AUTO_PRUNE", raw["PI_AGENT_AUTO_PRUNE"])
        self.noise = [] if raw["PI_AGENT_NOISE"].strip() == "none" else [
            pattern for pattern in re.split(r"[\s,]+", raw["PI_AGENT_NOISE"]) if pattern]
        if any(not pattern.startswith(("/", "~/")) for pattern in self.noise):
            raise BadSetting("PI_AGENT_NOISE=%s: each pattern is a path inside, starting with / "
                             "or ~/" % raw["PI_AGENT_NOISE"])
        self.record_changes = parse_bool("PI_AGENT_RECORD_CHANGES",
                                         raw["PI_AGENT_RECORD_CHANGES"])
        self.save_mode = raw["PI_AGENT_SAVE"]
        if self.save_mode not in ("background", "foreground"):
            raise BadSetting("PI_AGENT_SAVE=%s: use background or foreground" % self.save_mode)
        limit = raw["PI_AGENT_SAVE_LIMIT"].strip().lower()
        size = re.fullmatch(r"(\d+(?:\.\d+)?)([bkmgt]?)", limit)
        if limit not in ("", "none") and not (size and float(size.group(1)) > 0):
            raise BadSetting("PI_AGENT_SAVE_LIMIT=%s is not a size such as 10g or 500m (or none)"
                             % raw["PI_AGENT_SAVE_LIMIT"])
        self.save_limit = size and float(size.group(1)) * 1024 ** "bkmgt".index(
            size.group(2) or "b") or (float("inf") if limit else None)
        self.hardlinks = raw["PI_AGENT_HARDLINKS"]
        if self.hardlinks not in ("copy", "refuse", "allow"):
            raise BadSetting("PI_AGENT_HARDLINKS=%s: use copy, refuse or allow" % self.hardlinks)
        self.engine = raw["PI_AGENT_ENGINE"]
        if self.engine not in ("",) + ENGINES:
            raise BadSetting("PI_AGENT_ENGINE=%s: use docker or podman (or leave it unset: docker "
                             "if a docker command reaches an engine, else podman)" % self.engine)

    def for_profile(self, profile):
        """The same settings, for another profile (a name checked already:
        "" or None for the default), without reading anything again."""
        import copy
        other = copy.copy(self)
        other.profile = "" if profile in (None, DEFAULT_PROFILE) else profile
        other.raw = dict(self.raw, PI_AGENT_PROFILE=other.profile or DEFAULT_PROFILE)
        other.sources = dict(self.sources, PI_AGENT_PROFILE="--profile")
        return other

    def _preset(self, flag):
        """The agent's command, install command and key list, where they
        were not set. `pi --agent NAME` sets the command and install command
        even so (an explicit key list stays: what reaches the agent is
        yours to say). A PI_AGENT_COMMAND naming an agent's command picks
        that agent's install command and keys."""
        raw, sources = self.raw, self.sources
        if flag:
            raw["PI_AGENT_AGENT"], sources["PI_AGENT_AGENT"] = flag, "pi --agent"
        elif sources["PI_AGENT_AGENT"] == "default" and sources["PI_AGENT_COMMAND"] != "default":
            word = os.path.basename((raw["PI_AGENT_COMMAND"].split() or [""])[0])
            for name, (command, _install, _keys) in AGENTS.items():
                if command == word:
                    raw["PI_AGENT_AGENT"] = name
                    sources["PI_AGENT_AGENT"] = "from PI_AGENT_COMMAND"
        name = raw["PI_AGENT_AGENT"]
        if name not in AGENTS:
            return  # (_check says so)
        command, install, keys = AGENTS[name]
        for setting, value in (("PI_AGENT_COMMAND", command), ("PI_AGENT_INSTALL_CMD", install),
                               ("PI_AGENT_PASS_ENV", " ".join(keys))):
            if sources[setting].startswith(("default", "agent ")) or (
                    flag and setting != "PI_AGENT_PASS_ENV"):
                raw[setting], sources[setting] = value, "agent %s" % name

    @staticmethod
    def _default(name, default, environ):
        if name == "PI_AGENT_ENGINE":
            return ""  # (chosen when first needed: engine_kind)
        if name == "PI_AGENT_DOCKERFILE":
            return os.path.join(HERE, "Dockerfile")
        if name == "PI_AGENT_STATE_DIR":
            base = environ.get("XDG_STATE_HOME") or os.path.join(
                environ.get("HOME") or os.path.expanduser("~"), ".local", "state")
            return os.path.join(base, "pi-agent")
        if name == "PI_AGENT_MEMORY":
            # (this machine's: an engine elsewhere, or in a VM, may have less)
            try:
                mib = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") * 3 // 4 >> 20
            except (ValueError, OSError):
                return "none"
            return "%dg" % (mib >> 10) if mib >= 4096 else "%dm" % max(mib, 64)
        if name == "PI_AGENT_PIDS":
            # The agent's processes are yours to the kernel (same UID): half
            # your limit is left to you whatever it starts.
            import resource
            soft = resource.getrlimit(resource.RLIMIT_NPROC)[0]
            return str(4096 if soft == resource.RLIM_INFINITY else max(1, min(4096, soft // 2)))
        return default


def misspelled_settings(environ):
    """A line for each PI_AGENT_* variable whose name is a near miss of a
    setting's: set in the environment, it would be silently ignored."""
    known = [name for name, _d, _m in SETTINGS] + list(OTHER_VARIABLES)
    unknown = sorted(name for name in environ if name.startswith("PI_AGENT_")
                     and name not in known)
    if not unknown:
        return []
    import difflib
    return ["warning: %s is not a setting; did you mean %s?" % (name, close[0]) for name in unknown
            for close in [difflib.get_close_matches(name, known, 1, 0.9)] if close]


def network_typos(environ):
    """A PI_AGENT_* name that is not a setting but looks meant to choose the
    network (PI_AGENT_NETWROK, PI_AGENT_OFFLINE, PI_AGENT_EGRES): BadSetting,
    because the run it would have held would reach more."""
    known = [name for name, _d, _m in SETTINGS] + list(OTHER_VARIABLES)
    for name in sorted(environ):
        if not name.startswith("PI_AGENT_") or name in known:
            continue
        import difflib  # (only here: its import costs every run 8 ms)
        if difflib.get_close_matches(name, ["PI_AGENT_NETWORK", "PI_AGENT_EGRESS",
                                            "PI_AGENT_EGRESS_ALLOW"], 1, 0.85) or \
                any(word in name for word in ("NETW", "OFFLINE", "ONLINE", "EGRES")):
            raise BadSetting("%s is not a setting; a run it was meant to hold would reach "
                             "more, so none starts: use PI_AGENT_EGRESS (public, allow, open, "
                             "none; pi --offline is none), and unset %s" % (name, name))


def guarded_dirs(config):
    """pi-agent's own directories, its config file and the CA certificates
    it builds into a base: no project may hold (or be inside) one, or the
    agent could rewrite what the host runs (or trusts) next.
    The file, not its directory: a config file kept in the home must not
    make every project there refused."""
    ca_paths = [path.strip() for path in config.raw["PI_AGENT_CA_CERTS"].split(",")]
    return [os.path.realpath(path) for path in [HERE, config.state_dir, config.path]
            + [path for path in ca_paths if path]]


# ----------------------------------------------------------------- the engine
#
# The one docker helper (argument lists, a trace line and an error for every
# call; the command is docker or podman, see engine_kind), the engine probe
# (Engine: what the engine is, asked once and kept), what the engine says of
# images, and the attached run.

_client_config = None


def docker_client_config():
    """The docker client's config file (its context, its proxies), read once."""
    global _client_config
    if _client_config is None:
        config_dir = os.environ.get("DOCKER_CONFIG") or os.path.expanduser("~/.docker")
        try:
            with open(os.path.join(config_dir, "config.json"), encoding="utf-8") as handle:
                _client_config = json.load(handle)
        except (OSError, ValueError):
            _client_config = {}
        if not isinstance(_client_config, dict):
            _client_config = {}
    return _client_config


# PI_AGENT_ENGINE as the settings have it, once read (the environment's until
# then); the engine chosen when it is not set, once a process.
_engine_setting = None
_engine_chosen = None


def command_path(name):
    """Where `name` is on PATH, as a shell would find it (nothing is run)."""
    for directory in os.environ.get("PATH", os.defpath).split(os.pathsep):
        path = os.path.join(directory or ".", name)
        if os.access(path, os.X_OK) and not os.path.isdir(path):
            return path
    return None


def engine_endpoint(kind):
    """Where the engine's command looks for the engine, and what chose it
    (None: its default: Docker's socket; Podman itself, which needs no
    service)."""
    if kind == "podman":
        host = os.environ.get("CONTAINER_HOST")
        return (host, "CONTAINER_HOST") if host else ("podman on this host", None)
    host = os.environ.get("DOCKER_HOST")
    if host:
        return host, "DOCKER_HOST"
    context = os.environ.get("DOCKER_CONTEXT")
    if context:
        return "context " + context, "DOCKER_CONTEXT"
    context = docker_client_config().get("currentContext")
    if context and context != "default":
        return "context " + str(context), "docker context use"
    return "unix:///var/run/docker.sock", None


def reach_socket(endpoint):
    """Connect to a unix:// or tcp:// endpoint, and let go: OSError
    (PermissionError: not yours to use) when nothing answers there. A Unix
    socket takes microseconds; ssh:// and contexts are left to the command."""
    if endpoint.startswith("unix://"):
        # The C module: the socket module's own import costs every run 2 ms.
        import _socket
        probe = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
        try:
            probe.connect(endpoint[len("unix://"):])
        finally:
            probe.close()
    elif endpoint.startswith("tcp://"):
        import socket
        host, _, port = endpoint[len("tcp://"):].split("/")[0].rpartition(":")
        if port.isdigit():
            socket.create_connection((host.strip("[]"), int(port)), timeout=5).close()


def engine_kind():
    """The engine pi-agent drives, with its own command: PI_AGENT_ENGINE;
    unset, docker where a docker command reaches an engine (its socket
    answers, or DOCKER_HOST or a context chose one), else podman where
    there is one (else docker, whose absence is then said)."""
    global _engine_chosen
    setting = os.environ.get("PI_AGENT_ENGINE", "") if _engine_setting is None else \
        _engine_setting
    if setting:
        return setting
    if _engine_chosen is None:
        _engine_chosen = "docker"
        endpoint, chosen_by = engine_endpoint("docker")
        if command_path("podman") and chosen_by is None:
            try:
                if not command_path("docker"):
                    raise OSError
                reach_socket(endpoint)
            except PermissionError:
                pass  # (an engine that is there: the docker group is what is missing)
            except OSError:
                _engine_chosen = "podman"
    return _engine_chosen


def engine_unreachable():
    kind = engine_kind()
    endpoint, chosen_by = engine_endpoint(kind)
    if kind == "podman":
        return PiError("cannot reach the Podman service at %s; start it (podman system service, "
                       "or podman machine start), or unset CONTAINER_HOST to use Podman on this "
                       "host" % endpoint, EXIT_ENGINE_DOWN)
    if chosen_by is None:
        hint = "start it (sudo systemctl start docker, or open Docker Desktop), then retry"
    elif chosen_by == "docker context use":
        hint = ("the docker context in use chose it: start that engine, or switch (docker "
                "context ls; docker context use default)")
    else:
        hint = ("%s chose it: start that engine, or unset %s to use the default socket"
                % (chosen_by, chosen_by))
    return PiError("cannot reach the Docker engine at %s; %s" % (endpoint, hint),
                   EXIT_ENGINE_DOWN)


def socket_denied():
    return PiError("permission denied on the Docker socket (%s); add yourself to the docker "
                   "group (sudo usermod -aG docker $USER) and log in again"
                   % engine_endpoint("docker")[0], EXIT_ENGINE_DOWN)


def check_engine():
    """Before a run whose way to `docker run` has not asked the engine
    anything: an engine that is not there would get its command's own
    lines first. Local Podman is its command: nothing to reach."""
    try:
        reach_socket(engine_endpoint(engine_kind())[0])
    except PermissionError:
        raise socket_denied()
    except OSError:
        raise engine_unreachable()


# A terminal's escape sequences (a build's colours): taken out of what the
# engine says before it is read, not shown escaped.
ESCAPES = re.compile(r"\x1b(?:\[[0-9;?]*[ -/]*[@-~]|[@-Z\\-_])")


def docker_failure(args, stderr):
    """Turn the engine command's stderr into the right PiError (docker's
    wording and Podman's)."""
    text = ESCAPES.sub("", stderr or "").strip()
    lowered = text.lower()
    if any(words in lowered for words in (
            "cannot connect to the docker daemon", "error during connect",
            "is the docker daemon running", "cannot connect to podman",
            "unable to connect to podman")):
        return engine_unreachable()
    if "permission denied" in lowered and "docker" in lowered and ".sock" in lowered:
        return socket_denied()
    lines = [line for line in text.splitlines() if line.strip()]
    detail = lines[-1] if lines else "no error message"
    for line in lines:
        if line.lower().startswith(("error", "docker: error")):
            detail = line
            break
    return EngineError("%s %s failed: %s" % (engine_kind(), args[0], detail))


# PI_AGENT_TRACE as the settings have it, once read (the environment's until then).
_trace_file = None


def trace_line(seconds, text):
    path = os.environ.get("PI_AGENT_TRACE") if _trace_file is None else _trace_file
    if path:
        try:
            with open(path, "a", encoding="utf-8") as handle:
                handle.write("%.6f %6.3fs pid %d %s\n" % (time.time(), seconds, os.getpid(),
                                                          text))
        except OSError:
            pass  # (a trace that cannot be written costs the run nothing)


def trace(argv, started, status):
    """PI_AGENT_TRACE=FILE: one line per docker command, for finding cost:
    when its result was collected, and how long after it started (a call
    overlapped with others may have ended earlier)."""
    trace_line(time.monotonic() - started, "exit %s: %s" % (status, shlex.join(argv)[:200]))


def trace_step(name):
    """PI_AGENT_TRACE=FILE: a line as a run reaches each of its steps, with
    the time since the process started (what the prompt waits for, that is
    not a docker command)."""
    trace_line(time.monotonic() - STARTED, "step: " + name)


class DockerCall:
    """`docker ARGS` (`podman ARGS`: engine_kind), started at once (never
    through a shell); finish() waits and, with check, raises the PiError
    that its stderr calls for. Starting two calls before finishing either
    overlaps independent reads.
    """

    def __init__(self, args, capture=True, env=None, stdin=None, stdout=None, stderr=None,
                 feed=None):
        self.args, self.capture, self.feed = args, capture, feed
        self.argv = [engine_kind(), *args]
        self.started = time.monotonic()
        try:
            self.proc = subprocess.Popen(
                self.argv, env=env, stdin=subprocess.PIPE if feed is not None else stdin,
                stdout=subprocess.PIPE if capture else stdout,
                stderr=subprocess.PIPE if capture else stderr,
                universal_newlines=True if capture else None,
                errors="surrogateescape" if capture else None)
        except FileNotFoundError:
            raise PiError("the %s command is not installed (or not on PATH); %s" % (
                self.argv[0], "install Podman, or set PI_AGENT_ENGINE=docker"
                if self.argv[0] == "podman" else "install Docker Engine or Docker Desktop (or "
                "Podman) first"), EXIT_NO_DOCKER)
        except OSError as err:
            raise EngineError("cannot run %s %s: %s" % (self.argv[0], args[0], err.strerror))

    def finish(self, check=True, timeout=None):
        try:
            out, err = self.proc.communicate(self.feed, timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.communicate()
            raise EngineError("%s %s did not answer in %d s" % (self.argv[0], self.args[0],
                                                                timeout))
        trace(self.argv, self.started, self.proc.returncode)
        result = subprocess.CompletedProcess(self.argv, self.proc.returncode, out, err)
        if check and result.returncode != 0:
            raise docker_failure(self.args, err.decode(errors="replace")
                                 if isinstance(err, bytes) else err or "")
        return result


def docker_shown(*args, lines=None):
    """`docker ARGS` with its output (both streams) shown on our stderr as
    it comes, as progress; its last lines make the error it raises. Every
    line is added to `lines` too, if given."""
    import collections
    call = DockerCall(args, capture=False, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    tail = collections.deque(maxlen=20)
    for raw in call.proc.stdout:
        sys.stderr.buffer.write(raw)
        sys.stderr.flush()
        tail.append(raw.decode("utf-8", "replace"))
        if lines is not None:
            lines.append(tail[-1])
    result = call.finish(check=False)
    if result.returncode != 0:
        raise docker_failure(args, "".join(tail))
    return result


def docker(*args, check=True, timeout=None, **options):
    """Run `docker ARGS` and return the CompletedProcess (see DockerCall)."""
    return DockerCall(args, **options).finish(check, timeout)


# How each engine says that what an inspect asked for is not there.
ABSENT_WORDS = {"image": ("no such image", "image not known"),
                "container": ("no such container", "no container with name or id"),
                "network": ("no such network", "network not found")}


def is_absent(result, kind):
    """True when a failed inspect means 'no such object', not an engine fault."""
    text = (result.stderr or "").lower()
    return result.returncode != 0 and any(
        words in text for words in ABSENT_WORDS.get(kind, ("no such " + kind,)))


def label_field(key):
    """A container's label in a `ps --format` template (Podman's .Labels
    is a map; it has no .Label)."""
    return ('(index .Labels "%s")' if engine_kind() == "podman" else '(.Label "%s")') % key


def image_format():
    """What `commit` and `build` need to keep an image's message, SHELL and
    HEALTHCHECK: Podman writes OCI images unless told Docker's format."""
    return ["--format", "docker"] if engine_kind() == "podman" else []


def image_name(ref):
    """An image's name as pi-agent gives it: Podman names a local image
    localhost/NAME."""
    return ref[len("localhost/"):] if ref.startswith("localhost/") else ref


def check_network(config):
    """A network that is not there is a bad setting (exit 9), said before
    the run, not docker run's own error. Asked only for a network other
    than the engine's own: a default run pays nothing."""
    name = config.network
    if name in ("", "none", "bridge"):
        return
    result = docker("network", "inspect", "--format", "{{.Driver}}", name, check=False)
    source = config.sources["PI_AGENT_NETWORK"]
    where = "" if source == "environment" else source + ": "
    if is_absent(result, "network") or "not found" in result.stderr:
        raise BadSetting("%sPI_AGENT_NETWORK=%s: the engine has no such network; %s network "
                         "ls lists them (unset it for the engine's default)"
                         % (where, name, engine_kind()))
    if result.returncode != 0:
        raise docker_failure(("network",), result.stderr)
    if result.stdout.strip() == "host":  # `host` by its ID
        raise BadSetting("%sPI_AGENT_NETWORK=%s is the host's own network; use none, or a network "
                         "made with %s network create" % (where, name, engine_kind()))


def inspect(kind, ref):
    """The inspect record of an image or container, or None when it does not
    exist (any other failure is an error, never "absent")."""
    result = docker(kind, "inspect", ref, check=False)
    if result.returncode == 0:
        return json.loads(result.stdout)[0]
    if is_absent(result, kind):
        return None
    raise docker_failure((kind, "inspect"), result.stderr)


def inspect_image(ref):
    return inspect("image", ref)


def image_layers(image):
    return len(((image or {}).get("RootFS") or {}).get("Layers") or [])


def image_labels(image):
    return ((image or {}).get("Config") or {}).get("Labels") or {}


def image_home(image):
    """The container user's home directory, from the image's ENV or USER."""
    config = (image or {}).get("Config") or {}
    for entry in config.get("Env") or []:
        if entry.startswith("HOME="):
            return os.path.normpath(entry[5:]) if entry[5:] else "/root"
    user = (config.get("User") or "").split(":")[0]
    return "/root" if user in ("", "root", "0") else "/home/" + user


def known_mounts(image):
    try:
        mounts = json.loads(image_labels(image).get(MOUNTS_LABEL) or "[]")
    except ValueError:
        return []
    return [m for m in mounts if isinstance(m, str)] if isinstance(mounts, list) else []


def docker_config_proxies():
    """The proxies of the docker client's config file (the entry for the
    engine's address, else "default"), as variables: the client would give
    them to every container."""
    proxies = docker_client_config().get("proxies")
    if isinstance(proxies, dict):  # (the engine's own entry, as the client takes it, else default)
        found = proxies.get(engine_endpoint("docker")[0])
        proxies = found if isinstance(found, dict) else proxies.get("default")
    keys = {"httpProxy": "HTTP_PROXY", "httpsProxy": "HTTPS_PROXY", "noProxy": "NO_PROXY",
            "allProxy": "ALL_PROXY"}
    found = {}
    for key, name in keys.items():
        value = proxies.get(key) if isinstance(proxies, dict) else None
        if isinstance(value, str) and value:
            found[name] = found[name.lower()] = value
    return found


# What the docker client adds to every container it runs from the proxies of
# its config file, password and all, unless the run sets them itself.
DOCKER_CLIENT_PROXY_ENV = ("HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "FTP_PROXY", "ALL_PROXY")


def docker_config_blanks():
    """-e NAME= for each variable the docker client would add from its
    config file's proxies (none if it has none): a container's own
    environment (PID 1's, in /proc) never holds your proxy or its password
    (the run script gives each run its own: the egress proxy's)."""
    proxies = docker_client_config().get("proxies")  # ("default", or the engine's address)
    if not (isinstance(proxies, dict) and any(isinstance(each, dict) and any(each.values())
                                              for each in proxies.values())):
        return []
    return [arg for name in DOCKER_CLIENT_PROXY_ENV for each in (name, name.lower())
            for arg in ("-e", each + "=")]


# --- the engine probe

class Engine:
    """What the engine is, and each choice pi-agent makes by it. Its facts
    (plain data, from ask_engine; kept by probe_engine):

      kind      docker or podman: the command pi-agent drives
      version   the engine's own
      rootless  the engine runs as an ordinary user (rootless Docker or
                Podman): root inside is that user, the other users inside
                its subordinate UIDs, none of them root on the host
      remap     Docker's userns-remap: root inside is a subordinate UID
      store     overlay2 (Docker's classic graph driver), containerd
                (Docker's containerd image store), or the driver's name
                (Podman's overlay, vfs)
      os        the engine's system, as it names it
      local     its files are on this host, as the paths it gives (not an
                engine elsewhere, nor Docker Desktop's or a Podman
                machine's VM)
      root_dir  where it keeps them (Docker's root directory, Podman's
                graph root)
      limits    the resource options (parse_limits) it applies: a rootless
                engine on cgroup v1 applies none; None where not known
      id        the server's ID (Docker's)
    """

    def __init__(self, facts):
        self.facts = facts
        self.kind = facts.get("kind") or "docker"
        self.rootless, self.remap = bool(facts.get("rootless")), bool(facts.get("remap"))
        self.store = facts.get("store") or "?"
        self.local = bool(facts.get("local"))
        self.limits = facts.get("limits")

    @property
    def name(self):
        return "%s %s" % ("Podman" if self.kind == "podman" else "Docker",
                          self.facts.get("version") or "(version unknown)")

    @property
    def root_is_user(self):
        """Root inside is the user who runs the engine (rootless Docker and
        Podman): the agent is root there, so that what it writes is the
        user's. (Not Podman's --userns=keep-id, which would make the agent
        the user's UID inside: Podman 4.3 then copies every layer of an
        image, its IDs shifted, the first time it runs it, and each save
        makes a new image: 9 s a run here, for a 1.2 GB image.)"""
        return self.rootless

    def agent_uid(self, uid):
        """The UID the agent has inside, for a host user of `uid`."""
        return 0 if self.root_is_user else uid

    def inside(self, uid, gid):
        """The host user (`uid`, `gid`) as the engine maps it inside."""
        return (0, 0) if self.root_is_user else (uid, gid)

    def run_args(self):
        """What every container started from the line's images gets. Podman:
        none of the variables it would add to the container's config, which
        a commit keeps: the proxies of podman's own environment (the run
        script gives each run its own), container=podman, TERM=xterm.
        userns-remap: --userns=host, as a remapped root could not write the
        project (root inside is root on the host again: see root_inside)."""
        if self.kind == "podman":
            return ["--http-proxy=false", "--unsetenv", "container", "--unsetenv", "TERM"]
        return (["--userns=host"] if self.remap else []) + docker_config_blanks()

    def limit_args(self, options):
        """The resource options (parse_limits) that this engine applies: it
        would warn at each run of one it does not, and apply nothing."""
        if self.limits is None:
            return list(options)
        return [part for option, value in zip(options[::2], options[1::2])
                if option in self.limits for part in (option, value)]

    @property
    def made_mounts(self):
        """The mount points the engine makes in every container."""
        return INIT_MOUNTS + (PODMAN_MOUNTS if self.kind == "podman" else ())

    @property
    def empty_commits(self):
        """A commit adds a layer even when the container changed nothing
        (Podman; Docker adds none): whether it did is the engine's diff."""
        return self.kind == "podman"

    @property
    def group_signals(self):
        """The engine's init passes a signal to the run's whole process
        group (docker run --init's tini, told by TINI_KILL_PROCESS_GROUP):
        Podman's catatonit passes it to its child alone."""
        return self.kind == "docker"

    @property
    def lists_layers(self):
        """A run's layer is an overlay2 directory on this host, which a
        container can mount to list (list_layers): Docker's graph driver,
        here. Elsewhere what a run changed is the engine's own diff,
        recorded at the save (record_changes)."""
        return self.kind == "docker" and self.store == "overlay2" and self.local

    @property
    def sizes_are_disk(self):
        """An image's size is what its layers hold on disk, so that one
        less its parent's is what it adds (ImageTree): Docker's graph
        drivers. The containerd store gives the compressed content (and
        keeps it unpacked too), Podman a figure that is not additive."""
        return self.kind == "docker" and self.store != "containerd"

    @property
    def free_space_dir(self):
        """Where the free space that commits use can be asked (statvfs),
        or None: an engine elsewhere, or the containerd store (containerd
        keeps the layers, where the engine does not say)."""
        root = self.facts.get("root_dir")
        return root if self.local and self.store != "containerd" and \
            isinstance(root, str) and root.startswith("/") else None

    @property
    def max_layers(self):
        """The layers of an image on which the next save fails: overlay2
        refuses to commit on one of 125 ("max depth exceeded"); measured
        here, the containerd store on one of 250 (its overlay mount fails),
        Podman's overlay to start a container on one of 129."""
        return {"overlay2": MAX_LAYERS, "containerd": 250, "overlay": 129}.get(self.store,
                                                                              MAX_LAYERS)

    def root_inside(self):
        """What root inside (sudo) can do to the host, in a sentence."""
        if self.root_is_user:
            return ("root inside is you on the host (your UID), nothing more: the agent runs as "
                    "root so that what it writes is yours; what it leaves as another user "
                    "inside (one of your subordinate UIDs outside) is given back to you")
        return ("root inside (sudo) is root on the host%s: each run ends with a sweep of the "
                "project for what it left privileged; a rootless engine makes root inside "
                "harmless (see docs/security.md)" % (
                    " (pi-agent's containers run with --userns=host: a remapped root could not "
                    "write your project)" if self.remap else ""))

    def describe(self):
        """pi-status's line for the engine."""
        if not self.facts.get("version"):
            return "%s, which did not say what it is" % self.name.split()[0]
        kind = ("rootless" if self.rootless else "userns-remap" if self.remap else "rootful")
        where = "" if self.local else ", elsewhere (%s)" % (self.facts.get("os") or "?")
        text = "%s (%s, image store %s%s): %s" % (self.name, kind, self.store, where,
                                                   self.root_inside())
        if self.limits is not None and len(self.limits) < 3:
            text += "; it applies %s of the resource limits (%s)" % (
                "none" if not self.limits else "only " + ", ".join(self.limits),
                "a rootless engine on cgroup v1" if self.rootless else "its cgroups")
        return text


def ask_engine(kind):
    """The engine's facts (see Engine), from one `docker info` (`podman
    info`); the engine's own wording is read here alone."""
    if kind == "podman":
        try:
            info = json.loads(docker("info", "--format", "json").stdout)
            host, store = info.get("host") or {}, info.get("store") or {}
        except (ValueError, AttributeError):
            return {"kind": kind}
        controllers = host.get("cgroupControllers") or []
        return {"kind": kind, "version": (info.get("version") or {}).get("Version"),
                "rootless": bool((host.get("security") or {}).get("rootless")),
                "remap": False, "store": store.get("graphDriverName"),
                "os": "%s %s" % ((host.get("distribution") or {}).get("distribution", ""),
                                 (host.get("distribution") or {}).get("version", "")),
                "local": not host.get("serviceIsRemote") and not os.environ.get("CONTAINER_HOST"),
                "root_dir": store.get("graphRoot"),
                "limits": [option for option, controller in (
                    ("--memory", "memory"), ("--pids-limit", "pids"), ("--cpus", "cpu"))
                    if controller in controllers]}
    try:
        info = json.loads(docker("info", "--format", "{{json .}}").stdout)
    except ValueError:
        return {"kind": kind}
    if not info.get("ServerVersion") and info.get("ServerErrors"):
        raise docker_failure(("info",), "\n".join(map(str, info["ServerErrors"])))
    options = " ".join(map(str, info.get("SecurityOptions") or []))
    status = dict(pair for pair in info.get("DriverStatus") or [] if len(pair) == 2)
    system = info.get("OperatingSystem") or ""
    return {"kind": kind, "version": info.get("ServerVersion"), "id": info.get("ID"),
            "rootless": "name=rootless" in options, "remap": "name=userns" in options,
            "store": "containerd" if str(status.get("driver-type", "")).startswith(
                "io.containerd.snapshotter") else info.get("Driver"),
            "os": system, "root_dir": info.get("DockerRootDir"),
            "local": engine_endpoint(kind)[0].startswith("unix://")
            and "Docker Desktop" not in system,
            "limits": [option for option, key in (("--memory", "MemoryLimit"),
                                                  ("--pids-limit", "PidsLimit"),
                                                  ("--cpus", "CpuCfsQuota")) if info.get(key)]}


def engine_identity(kind):
    """What tells the engine from another without asking it: its command,
    its endpoint, and what changes when it does: a local socket's inode and
    change time (an engine that restarts makes it anew), local Podman's
    program and storage configuration; an engine elsewhere, the hour (it is
    asked again each hour). None: nothing there to know it by."""
    endpoint = engine_endpoint(kind)[0]
    if kind == "podman" and not os.environ.get("CONTAINER_HOST"):
        parts = [kind, str(os.getuid())] + [os.environ.get(name, "") for name in (
            "CONTAINERS_STORAGE_CONF", "CONTAINERS_CONF", "XDG_CONFIG_HOME", "XDG_DATA_HOME",
            "HOME")]
        config = os.environ.get("XDG_CONFIG_HOME") or os.path.expanduser("~/.config")
        for path in (command_path("podman"), os.environ.get("CONTAINERS_STORAGE_CONF"),
                     os.path.join(config, "containers", "storage.conf"),
                     "/etc/containers/storage.conf"):
            try:
                info = os.stat(path) if path else None
                parts.append("%d:%d" % (info.st_ino, info.st_mtime_ns) if info else "")
            except OSError:
                parts.append("-")
        return "|".join(parts)
    if endpoint.startswith("unix://"):
        try:
            info = os.stat(endpoint[len("unix://"):])
        except OSError:
            return None
        return "%s|%s|%d:%d" % (kind, endpoint, info.st_ino, info.st_ctime_ns)
    return "%s|%s|%d" % (kind, endpoint, time.time() // 3600)


# The engines probed in this process, by identity; STATE/ENGINES_FILE keeps
# the newest few for later ones.
_probed = {}
ENGINES_FILE = "engines.json"


def probe_engine(state_dir, fresh=False):
    """The Engine pi-agent drives: asked once (ask_engine), then kept in
    STATE/engines.json under its identity (engine_identity), so that a run
    pays for it only a read of that file; `fresh` (pi-status) asks again."""
    kind = engine_kind()
    key = engine_identity(kind)
    if not fresh and key in _probed:
        return _probed[key]
    path = os.path.join(state_dir, ENGINES_FILE)
    try:
        kept = json.loads(read_regular(path) or b"{}")
    except ValueError:
        kept = {}
    kept = {name: facts for name, facts in kept.items() if isinstance(facts, dict)} \
        if isinstance(kept, dict) else {}
    facts = kept.get(key) if key and not fresh else None
    if not facts or facts.get("kind") != kind:
        facts = ask_engine(kind)
        # (kept where pi-agent keeps its state already: a dry run writes nothing)
        if key and facts.get("version") and os.path.isdir(state_dir):
            kept[key] = dict(facts, asked=time.time())
            newest = sorted(kept, key=lambda name: kept[name].get("asked") or 0)[-8:]
            try:
                replace_file(path, json.dumps({name: kept[name] for name in newest},
                                              sort_keys=True).encode())
            except OSError:
                pass  # (then it is asked again next time)
    engine = Engine(facts)
    if key:
        _probed[key] = engine
    return engine


def run_attached(argv, container=None, env=None):
    """Run the docker client in the foreground and return the status.

    Hangup, terminate and interrupt go on to the client, which passes them
    to the container's init and it to the agent. An agent that does not stop
    within STOP_GRACE seconds (or a second signal) is stopped: the client is
    killed and so is `container` (nothing more happens in the project once
    this returns); the saver commits it as it was, then removes it.
    """
    call = DockerCall(argv, capture=False, env=env)
    proc = call.proc

    caught, killed = [], []

    def stop_waiting(_signum=None, _frame=None):
        killed.append(True)
        try:
            proc.kill()
        except OSError:
            pass

    def forward(signum, _frame):
        caught.append(signum)
        if len(caught) > 1:
            return stop_waiting()
        try:
            proc.send_signal(signum)
        except OSError:
            pass
        signal.setitimer(signal.ITIMER_REAL, STOP_GRACE)

    handled = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGALRM)
    previous = {signum: signal.signal(signum, stop_waiting if signum == signal.SIGALRM
                                      else forward) for signum in handled}
    try:
        proc.wait()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    status = call.finish(check=False).returncode  # (its trace line)
    if killed and container:
        docker("kill", container, check=False)
    # The docker client may exit 0 when signalled: the signal is the status.
    if caught:
        return 128 + caught[0]
    return 128 - status if status < 0 else status


def ensure_stopped(container, tty):
    """The container of a run whose docker client has returned, stopped
    for sure before anything happens in its project, and its inspect
    record (None: gone). The client can return with the container still at
    work: the terminal detached from it (ctrl-p ctrl-q), or what read its
    output stopped early (`pi-exec ... | head`: a broken pipe); the agent
    is stopped then, never left at work in a project about to be swept."""
    info = inspect("container", container)
    if info and (info.get("State") or {}).get("Running"):
        docker("kill", container, check=False)
        docker("wait", container, check=False)
        say("%s; pi-agent does not leave an agent at work in the background: it was stopped, "
            "and its work is saved" % ("the terminal detached from the container (ctrl-p "
                                       "ctrl-q?)" if tty else "the agent's output could not be "
                                       "passed on (what read it stopped early?)"), "warning")
    return info


# ------------------------------------------------------------ state and locks
#
# An image line's lock, state file and session log; the project's lock.

class Line:
    """One image line: REPO:base, REPO:current, REPO:snap-*, and its files.

    Everything that changes the line's images holds its lock. The lock file
    is never deleted; the state file is written only by the lock holder,
    always whole (temp file, then rename). Its keys (JSON):

      holder         who holds the lock (null once released): kind, target,
                     pid, host, started, phase (starting, running, saving,
                     flattening; working for other commands), saver_pid,
                     container
      current        current's inspect record (Id, Config, RootFS,
                     RepoTags) as the last holder left it, so that a run
                     after a clean release need not inspect it (its saver
                     checks it); dropped by anything that moves current
      last_snapshot  the newest snapshot name given (names stay unique)
      snapshots      the snapshots' names, for auto-prune (absent until a
                     listing made it)
      removing       {container: pid}: saved containers, being removed by pid
      failed         the container whose save failed (recovery retries it)
      waiting        {container: {what, why, size, largest}}: runs not saved
                     as they would write too much (save_cost) or the disk
                     was full, kept for the user's decision (pi-recover
                     --drop, pi-clean-orphans); no recovery retries them
      notice         a line for the next command to show
      pruned         snapshots a detached auto-prune removed, for the next
                     command to say
      made           (a profile's) pi-branch made it: a run without a
                     current starts from base
      corrupt        (read_state only) the file could not be read

    A holder that finds holder, failed, notice or corrupt set knows that
    the last one did not finish cleanly (released_cleanly).
    """

    def __init__(self, config):
        self.config = config
        self.repo, self.profile = config.image_repo, config.profile
        # (a profile's tags: NAME-current, NAME-snap-*; base is shared)
        self.tag_prefix = self.profile + "-" if self.profile else ""
        self.name = "%s profile %s" % (self.repo, self.profile) if self.profile else self.repo
        self.base = self.repo + ":base"
        self.current = "%s:%scurrent" % (self.repo, self.tag_prefix)
        # "@" is in no repository name: a profile's files are its own.
        self.key = self.repo.replace("%", "%25").replace("/", "%2F")
        key = self.key + ("@" + self.profile if self.profile else "")
        self.state_dir = config.state_dir
        self.lock_path = os.path.join(self.state_dir, key + ".lock")
        self.state_path = os.path.join(self.state_dir, key + ".json")
        self.log_path = os.path.join(self.state_dir, key + ".log")
        self.sessions_path = os.path.join(self.state_dir, key + ".sessions.jsonl")
        self.agents_path = os.path.join(self.state_dir, key + ".agents.json")
        self.runs_dir = os.path.join(self.state_dir, key + ".runs")
        self.run_dir = os.path.join(self.state_dir, "run")
        # (in its runs' container names: pi-agent-SLUG-TIME-PID)
        self.slug = re.sub(r"[^a-zA-Z0-9_.-]", "-",
                           self.repo + "-" * bool(self.profile) + self.profile)
        self._engine = None

    @property
    def engine(self):
        """The engine (Engine), probed when first needed (probe_engine)."""
        if self._engine is None:
            self._engine = probe_engine(self.state_dir)
        return self._engine

    @engine.setter
    def engine(self, engine):
        self._engine = engine

    def snap(self, name):
        return "%s:%s%s" % (self.repo, self.tag_prefix, name)

    def snapshot_named(self, tag):
        """The snapshot name of one of this line's tags, else None."""
        name = tag[len(self.tag_prefix):] if tag.startswith(self.tag_prefix) else ""
        return name if SNAPSHOT_RE.match(name) else None

    def pin(self, name):
        return self.snap(PIN_PREFIX + name)

    def pin_named(self, tag):
        """The pin's name of one of this line's tags, else None."""
        prefix = self.tag_prefix + PIN_PREFIX
        name = tag[len(prefix):] if tag.startswith(prefix) else ""
        return name if PROFILE_RE.fullmatch(name) and not PIN_CLASH_RE.search(name) else None

    def owns(self, labels):
        """A container or image of this line's, by its labels."""
        return labels.get(LABEL + "repo") == self.repo and \
            (labels.get(LABEL + "profile") or "") == self.profile and \
            labels.get(OWNER_LABEL) == str(os.getuid())

    def read_state(self):
        try:
            with open(self.state_path, encoding="utf-8") as handle:
                state = json.load(handle)
            return state if isinstance(state, dict) else {"corrupt": True}
        except FileNotFoundError:
            return {}
        except (OSError, ValueError):
            return {"corrupt": True}

    def open_lock(self, flags):
        try:
            # Private: run scripts hold the values of PI_AGENT_PASS_ENV.
            os.makedirs(self.state_dir, mode=0o700, exist_ok=True)
            os.chmod(self.state_dir, 0o700)
            return os.open(self.lock_path, flags | os.O_CREAT, 0o600)
        except OSError as err:
            raise BadSetting("cannot use PI_AGENT_STATE_DIR=%s: %s; set it to a directory you "
                             "can write" % (self.state_dir, err.strerror))

    def write_state(self, state):
        try:
            os.makedirs(self.state_dir, mode=0o700, exist_ok=True)
            replace_file(self.state_path, json.dumps(state, indent=1, sort_keys=True).encode())
        except OSError as err:
            raise BadSetting("cannot write %s: %s; PI_AGENT_STATE_DIR must be a directory you "
                             "can write" % (self.state_path, err.strerror))

    def record_session(self, meta, ended_by):
        """One line of the session log (JSON; docs/commands.md's "Session log"
        names its fields) for a saved run, appended whole by whoever saves
        it, under the lock."""
        record = {
            "started": meta.get("started") or None, "ended": utc_iso(time.time()),
            "profile": self.profile, "target": meta.get("target") or None,
            "kind": meta.get("kind") or "run", "command": meta.get("command"),
            "agent": meta.get("agent"), "exit_status": exit_number(meta.get("exit_status")),
            "image_before": meta.get("image_before"), "image_after": meta.get("image_after"),
            "snapshot": meta.get("saved_as"), "bytes_added": meta.get("bytes_added"),
            "ended_by": ended_by, "container": meta.get("container"),
            # (where what the run changed is read when asked: see ensure_reports)
            "layer": ((meta.get("new_image") or {}).get("RootFS") or {}).get("Layers", [None])[-1]
            if meta.get("image_after") != meta.get("image_before") else None,
            "mount": meta.get("mount") or None}
        ended = meta.get("ended")  # what end_run brought back and swept
        for key in ("commits", "commits_total", "refs", "swept", "refused"):
            record[key] = ended.get(key) if isinstance(ended, dict) else None
        record["egress"] = meta.get("egress")
        try:
            os.makedirs(self.state_dir, mode=0o700, exist_ok=True)
            fd = os.open(self.sessions_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            try:
                os.write(fd, (json.dumps(record, sort_keys=True) + "\n").encode())
            finally:
                os.close(fd)
        except OSError as err:
            self.log("could not write the session log %s: %s" % (self.sessions_path,
                                                                 err.strerror))
        return record

    def log(self, message):
        try:
            os.makedirs(self.state_dir, exist_ok=True)
            if os.path.exists(self.log_path) and os.path.getsize(self.log_path) > 1 << 20:
                os.replace(self.log_path, self.log_path + ".1")
            with os.fdopen(os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600),
                           "a", encoding="utf-8") as handle:
                handle.write("%s [%d] %s\n" % (utc_iso(time.time()), os.getpid(),
                                               printable(message)))
        except OSError:
            pass


def newest_sessions(path, count):
    """The newest `count` records of a session log, newest first, read from
    its end: a long log costs no more than a short one."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return []
    records = []
    try:
        end, partial = os.fstat(fd).st_size, b""
        while end > 0 and len(records) < count:
            start = max(0, end - (1 << 16))
            lines = (os.pread(fd, end - start, start) + partial).split(b"\n")
            partial = lines.pop(0) if start > 0 else b""
            for raw in reversed(lines):
                try:
                    record = json.loads(raw) if raw.strip() else None
                except ValueError:
                    continue  # (a line cut short by a full disk, say)
                if isinstance(record, dict) and len(records) < count:
                    records.append(record)
            end = start
    finally:
        os.close(fd)
    return records


def show_notes(line, notes, limit=8):
    for note in notes[:limit]:
        say(note, "error" if isinstance(note, Alarm) else "warning")
    if len(notes) > limit:
        say("... and %d more, in %s" % (len(notes) - limit, line.log_path), "warning")
    for note in notes:
        line.log(note)


RUNS = {"run": "running the agent", "exec": "running a command", "shell": "running a shell",
        "worktree": "making or removing a worktree", "end": "ending an interrupted run"}


def describe_holder(holder):
    if not holder:
        return "another pi-agent command"
    phase = holder.get("phase", "working")
    kind = holder.get("kind", "run")
    runs = RUNS.get(kind, "running " + kind)
    what = {"running": runs + " in",
            "saving": "saving the run in",
            "flattening": "flattening current after the run in",
            "starting": "starting %s in" % runs.split(" ", 1)[1]}.get(phase, "%s for" % kind)
    pid = holder.get("saver_pid") if phase in ("saving", "flattening") else holder.get("pid")
    return "pid %s (%s %s, since %s)" % (pid, what, holder.get("target", "?"),
                                        local_time(holder.get("started")))


def block_on_lock(fd, operation, holder, patient=False):
    """Wait for the lock; say so at once when it is a running agent we wait
    for, or after a second for a save (most saves end sooner: no message)."""
    def announce(_signum=None, _frame=None):
        say("waiting for %s ..." % describe_holder(holder))

    if patient:
        announce()
        fcntl.flock(fd, operation)
        return
    previous = signal.signal(signal.SIGALRM, announce)
    signal.setitimer(signal.ITIMER_REAL, 1.0)
    try:
        fcntl.flock(fd, operation)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def agent_is_running(holder):
    """An agent is live on the line (as opposed to a save or a short command)."""
    return bool(holder and holder.get("phase") in ("starting", "running")
                and holder.get("host") == os.uname().nodename and pid_alive(holder.get("pid")))


class LineLock:
    """The image line's fcntl lock.

    flock belongs to the open file description, so a forked saver that keeps
    the descriptor keeps the lock after the wrapper exits, and the kernel
    drops it when the last holder dies: a dead holder never leaves it behind.
    """

    def __init__(self, line):
        self.line = line
        self.fd = None

    def acquire(self, kind, target="", wait=False):
        """Take the lock and record the holder; return the state it found.

        Saves and short commands are waited for; a running agent is an error
        unless `wait`.
        """
        self.fd = self.line.open_lock(os.O_RDWR)
        for attempt in range(2):
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                holder = self.line.read_state().get("holder")
                if not agent_is_running(holder) or wait:
                    block_on_lock(self.fd, fcntl.LOCK_EX, holder, patient=agent_is_running(holder))
                    break
                if attempt:
                    os.close(self.fd)
                    self.fd = None
                    raise Busy("%s is in use by %s; %s" % (
                        self.line.name, describe_holder(holder),
                        "its images change only between runs: try again when it has ended"
                        if kind not in LIFECYCLE_KINDS else
                        "add --wait to wait for it, or join it: pi-shell"
                        if (holder or {}).get("target") == target else
                        "add --wait to wait for it, or run beside it in another profile "
                        "(pi-branch; pi-worktree NAME makes a worktree and a profile, and runs "
                        "pi there)"))
                time.sleep(0.1)  # an agent that is just exiting is not worth an error
        state = self.line.read_state()
        found = dict(state)
        state["holder"] = {"kind": kind, "target": target, "pid": os.getpid(),
                           "host": os.uname().nodename, "started": utc_iso(time.time()),
                           "phase": "working" if kind not in LIFECYCLE_KINDS else "starting"}
        state.pop("corrupt", None)
        if kind not in LIFECYCLE_KINDS:  # it may change current its own way
            state.pop("current", None)
        self.line.write_state(state)
        return found, state

    def release(self, state, clean=True):
        """Free the lock. Not `clean`: this holder failed before it dealt
        with what an unclean end left it, so its record stays in the state
        and the next holder looks again (see released_cleanly)."""
        if clean:
            state["holder"] = None
        self.line.write_state(state)
        os.close(self.fd)
        self.fd = None


# The project locks this process holds, {lock file: fd}: recovery, under a
# run's own lock, may end an older run of the same project.
HELD_PROJECTS = {}


def project_file(state_dir, target, suffix):
    """A file of pi-agent's about one project, in the state directory."""
    return os.path.join(state_dir, "projects", sha256_hex(os.fsencode(target))[:32] + suffix)


def project_holder(fd):
    try:
        holder = json.loads(os.pread(fd, 1 << 20, 0) or b"{}")
    except ValueError:
        return {}
    return holder if isinstance(holder, dict) else {}


def describe_project_holder(holder):
    return "pid %s (%s with %s, since %s)" % (
        holder.get("pid", "?"), RUNS.get(holder.get("kind"), "running a command"),
        holder.get("repo", "?"), local_time(holder.get("started")))


def reachable(path, target):
    """The agent of a run in `target` can change `path`, or swap it or a
    directory above it for a link: it is inside the project (but for the
    project's .git, which a run never mounts), or the project is inside it."""
    return (is_within(path, target) and not is_within(path, os.path.join(target, ".git"))) \
        or is_within(target, path)


def overlap(mine, theirs):
    """Words for how two runs' covers overlap, or None."""
    for first, second in ((mine, theirs), (theirs, mine)):
        for path in [first["target"]] + [p for p in first.get("paths") or []
                                         if isinstance(p, str)]:
            if reachable(path, second["target"]):
                return ("%s is in reach of the agent there" % path if first is mine else
                        "it reads %s, in reach of an agent here" % path)
    return None


def overlapping_run(state_dir, holder):
    """(holder, its lock file) of a live run of another process whose
    covers overlap `holder`'s, else (None, None)."""
    directory = os.path.join(state_dir, "projects")
    for name in os.listdir(directory):
        path = os.path.join(directory, name)
        if not name.endswith(".lock") or path in HELD_PROJECTS:
            continue
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            continue
        try:
            other = project_holder(fd)
            if not isinstance(other.get("target"), str) or other.get("pid") == os.getpid() \
                    or overlap(holder, other) is None:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return other, path
        finally:
            os.close(fd)
    return None, None


def release_project_lock(fd):
    for path, held in list(HELD_PROJECTS.items()):
        if held == fd:
            del HELD_PROJECTS[path]
    os.close(fd)


def cover_project(fd, line, target, kind, paths):
    """Say in the lock what it covers, then look for a live run whose own
    covers overlap it: each run writes before it looks, so of two that
    start at once, one sees the other. Busy names it."""
    holder = {"pid": os.getpid(), "kind": kind, "repo": line.name, "target": target,
              "paths": sorted(set(paths)), "started": utc_iso(time.time()),
              "image_repo": line.repo, "profile": line.profile}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(holder).encode(), 0)
    other, other_path = overlapping_run(line.state_dir, holder)
    if other is None:
        return
    err = Busy("%s overlaps %s, where %s: %s; they take turns: add --wait to wait for it"
               % (target, other["target"], describe_project_holder(other), overlap(
                   holder, other)))
    err.holder_words, err.lock_path = describe_project_holder(other), other_path
    raise err


def lock_project(line, target, kind, wait, paths=()):
    """An fcntl lock on the project for the whole run, whatever the image
    line or profile: another run's agent must not change the project
    between this run's look at it and its container's start, nor while
    this run ends. `paths`: the others host git reads for the project (its
    repository's, when it is a worktree; files its config includes); no
    other live run's agent may reach those either, nor may two projects
    nest (an agent in the outer one could swap the inner one's directory
    for a link to anywhere just as the engine mounts it). The lock file
    says who holds it, and what it covers. Returns the fd (None when this
    process holds it already); Busy if a live run has it, or what it
    covers (after a second's grace for one that is ending), unless `wait`."""
    path = project_file(line.state_dir, target, ".lock")
    if path in HELD_PROJECTS:
        return None
    try:
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as err:
        raise BadSetting("cannot use PI_AGENT_STATE_DIR=%s: %s" % (line.state_dir, err.strerror))
    deadline = time.monotonic() + 1.0
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if not wait and time.monotonic() < deadline:
                time.sleep(0.05)
                continue
        holder = project_holder(fd)
        if not wait and pid_alive(holder.get("pid")):
            os.close(fd)
            profile = holder.get("profile") if holder.get("image_repo") == line.repo else None
            raise Busy("%s is in use by %s; %s" % (
                target, describe_project_holder(holder), "add --wait to wait for it, or join "
                "it: pi-shell" if holder.get("repo") == line.name and kind in LIFECYCLE_KINDS
                else "%s --profile %s joins it (add --wait to wait for it instead)" % (
                    "pi" if kind == holder.get("kind") == "run" else "pi-shell",
                    profile or DEFAULT_PROFILE)
                if isinstance(profile, str) and kind in JOINABLE_KINDS else
                "add --wait to wait for it"))
        # (a holder that is gone left the end of its run to its saver)
        say("waiting for %s ..." % describe_project_holder(holder))
        fcntl.flock(fd, fcntl.LOCK_EX)
        break
    HELD_PROJECTS[path] = fd
    try:
        cover_project(fd, line, target, kind, paths)
    except Busy as err:
        release_project_lock(fd)
        if not wait:
            raise
        # (held while waiting, it could deadlock with the other run)
        say("waiting for %s ..." % err.holder_words)
        waiting = os.open(err.lock_path, os.O_RDONLY)
        try:
            fcntl.flock(waiting, fcntl.LOCK_SH)
        finally:
            os.close(waiting)
        return lock_project(line, target, kind, wait, paths)
    return fd


def released_cleanly(found):
    """The state the lock's last holder left says it finished its work."""
    return bool(found) and not any(found.get(key) for key in
                                   ("holder", "corrupt", "failed", "notice"))


def pruned_message(names, keep):
    return ("auto-prune removed %s (%s), keeping the newest %d, one a day for a week, one a "
            "week for a month and the pinned (pi-prune --help)"
            % (plural(len(names), "snapshot"), ", ".join(names), keep))


def say_what_was_left(line, found, state):
    """What the last holder left for the next one to say: its notice, and
    the snapshots its auto-prune removed out of sight (a detached save)."""
    if found.get("notice"):
        say(found["notice"])
    if state.pop("pruned", None):
        say(pruned_message(found["pruned"], line.config.snapshot_keep))


def lock_is_held(line):
    try:
        fd = os.open(line.lock_path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def wait_for_save(line):
    """Readers wait for a save in progress instead of racing it."""
    holder = line.read_state().get("holder")
    if not lock_is_held(line) or agent_is_running(holder):
        return
    fd = line.open_lock(os.O_RDONLY)
    try:
        block_on_lock(fd, fcntl.LOCK_SH, holder)
    finally:
        os.close(fd)


def profile_exists(line):
    """The default profile always is; another once pi-branch made it (or
    while it has a current)."""
    return not line.profile or bool(line.read_state().get("made")) or \
        inspect_image(line.current) is not None


def no_profile(line):
    return NotFound("there is no profile %s; pi-branch %s makes it (a copy of the environment "
                    "you have), pi-branch lists them" % (line.profile, line.profile))


def require_profile(line):
    """NotFound for a profile never made, before anything is written."""
    if not profile_exists(line):
        raise no_profile(line)
    return line


def profile_line(args):
    """The line of the command's profile, which must exist."""
    return require_profile(Line(Config(profile=args.profile)))


# --------------------------------------------------- the project and its scan
#
# Which directory a run mounts, and what is in it before and after (one find,
# an inotify watch).
#
# The project is the one host directory a run mounts. Everything the agent
# can write is untrusted input, the project's files and anything named .git
# in it included: what is mounted, and what host git reads, is decided only
# from what the host alone could have written, resolved physically, checked,
# and read without following a symlink the agent could have planted.


def refusal(path, homes, guarded=()):
    """(reason, hint) when `path` must never be mounted into a container,
    else None. A hint of None means: home or above (the caller knows what
    to suggest)."""
    if "\n" in path:
        return "a path with a newline cannot be mounted safely", "rename it"
    if path == "/":
        return "it holds the whole host", "cd into a project directory"
    for home in homes:
        if is_within(home, path):
            return ("it is %s, which would hand the agent ~/.ssh and every credential"
                    % ("your home directory" if path == home else "a directory above your home"),
                    None)
        for secret in CREDENTIAL_DIRS:  # (in one, or holding one: ~/.config holds ~/.config/gh)
            if is_within(path, os.path.join(home, secret)) or \
                    is_within(os.path.join(home, secret), path):
                return "it holds credentials (~/%s)" % secret, "cd into a project directory"
    if path in SHARED_DIRS:
        return ("it is a directory many programs share, their sockets and files among them",
                "make a directory for the project inside it")
    tree = next((tree for tree in HOST_TREES if is_within(path, tree)), None)
    if tree:
        return ("it is part of the system (%s: devices, sockets, system files)" % tree,
                "cd into a project directory")
    for own in guarded:
        if is_within(path, own) or is_within(own, path):
            return ("it %s pi-agent's own files (%s), which the agent could rewrite for your "
                    "next command" % ("holds" if is_within(own, path) else "is inside", own),
                    "keep projects apart from pi-agent's install, state and config (./install.sh "
                    "puts a copy of a checkout elsewhere)")
    return None


def git_dir_problem(path, main=True):
    """Why `path` is not a git directory, or None: it needs HEAD, objects/
    and refs/, none a symlink. A repository's own git directory (`main`) has
    no commondir file; with one, git would take another's config."""
    for name, is_kind, what in (("HEAD", stat.S_ISREG, "file"),
                                ("objects", stat.S_ISDIR, "directory"),
                                ("refs", stat.S_ISDIR, "directory")):
        try:
            mode = os.lstat(os.path.join(path, name)).st_mode
        except OSError:
            return "it has no %s" % name
        if not is_kind(mode):
            return "its %s is not a plain %s" % (name, what)
    if main and os.path.lexists(os.path.join(path, "commondir")):
        return "it has a commondir file, which only a worktree's git directory has"
    return None


class GitRepo:
    """A repository as host git sees it from a work tree: `gitdir` holds its
    HEAD and index (a linked worktree's own admin directory), `common` its
    objects, refs and config (the same directory for a main work tree)."""

    def __init__(self, gitdir, common):
        self.gitdir, self.common = gitdir, common

    @property
    def linked(self):
        return self.gitdir != self.common

    def __eq__(self, other):
        return isinstance(other, GitRepo) and \
            (self.gitdir, self.common) == (other.gitdir, other.common)

    def __repr__(self):
        return "GitRepo(%r, %r)" % (self.gitdir, self.common)


def linked_worktree(work_tree):
    """(GitRepo, None) when work_tree/.git is the file of a worktree: it names
    <common>/worktrees/<name>, whose gitdir file points back at it and whose
    commondir leads to <common>, a git directory. Else (None, why): only git
    worktree add, on the host, writes such a pair."""
    dot = os.path.join(work_tree, ".git")
    text = read_regular(dot, 4096)
    if text is None or not text.startswith(b"gitdir:"):
        return None, "it is neither a git directory nor the .git file of a worktree"
    named = os.fsdecode(text[len(b"gitdir:"):].strip())
    gitdir = real_path(os.path.join(work_tree, named)) or "/"
    common = os.path.dirname(os.path.dirname(gitdir))
    back = read_regular(os.path.join(gitdir, "gitdir"), 4096)
    via = read_regular(os.path.join(gitdir, "commondir"), 4096)
    if (os.path.basename(os.path.dirname(gitdir)) != "worktrees" or back is None or via is None
            or real_path(os.path.join(gitdir, os.fsdecode(back.strip()))) != dot
            or real_path(os.path.join(gitdir, os.fsdecode(via.strip()))) != common):
        return None, ("it names %s, which is not a worktree of a repository that points back "
                      "here" % named)
    problem = git_dir_problem(common)
    if problem is None and read_regular(os.path.join(gitdir, "HEAD"), 4096) is None:
        problem = "the worktree has no HEAD"
    if problem:
        return None, "its repository %s is not a git directory: %s" % (common, problem)
    return GitRepo(gitdir, common), None


def git_repo_at(work_tree):
    """What work_tree/.git is: (GitRepo, None) when host git may trust it;
    (None, None) when there is none (an empty directory counts as none, as
    for git); (None, why) for one that is not to be trusted."""
    dot = os.path.join(work_tree, ".git")
    try:
        mode = os.lstat(dot).st_mode
    except FileNotFoundError:
        return None, None
    except OSError as err:
        return None, err.strerror
    if stat.S_ISDIR(mode):
        problem = git_dir_problem(dot)
        if problem is None:
            return GitRepo(dot, dot), None
        try:
            return None, (None if not os.listdir(dot) else problem)
        except OSError as err:
            return None, err.strerror
    if stat.S_ISREG(mode):
        return linked_worktree(work_tree)
    return None, "it is a symlink" if stat.S_ISLNK(mode) else "it is not a file or a directory"


def find_target(cwd, homes, here=False, guarded=()):
    """The project to mount: (target, subdir, repo, notes).

    The work tree of the repository cwd is in (with --here, cwd itself),
    else cwd. A .git on the way up counts only when git_repo_at() trusts it
    and its repository may be mounted; any other is passed over with a line
    in `notes`, so nothing the agent wrote ever chooses what is mounted.
    Refused (Refused): see refusal(), and a git directory itself.
    """
    target, repo, notes = cwd, None, []
    probe = cwd
    while True:
        found, problem = git_repo_at(probe)
        refused = found and refusal(found.common, homes, guarded)
        if refused:
            problem = "its repository %s may not be mounted: %s" % (found.common, refused[0])
        if problem:
            notes.append("ignoring %s: %s" % (os.path.join(probe, ".git"), problem))
        elif found:
            target, repo = probe, found
            break
        parent = os.path.dirname(probe)
        if here or parent == probe:
            break
        probe = parent
    refused = refusal(target, homes, guarded)
    if not refused and (".git" in target.split("/") or git_dir_problem(target, main=False) is None):
        refused = "it is (inside) a git directory, not a work tree", "cd into the work tree"
    if refused:
        reason, hint = refused
        if hint is None:
            hint = ("use --here to mount only the current directory"
                    if cwd != target and not any(is_within(home, cwd) for home in homes)
                    else "cd into a project directory")
        raise Refused("refusing to mount %s: %s; %s" % (target, reason, hint))
    subdir = os.path.relpath(cwd, target) if cwd != target else ""
    return target, subdir, repo, notes


def mount_point(target, container_home, mount_at=""):
    """Where the project appears inside: its host path, unless that would
    shadow part of the image (then /workspace/NAME), or PI_AGENT_MOUNT_AT."""
    if mount_at:
        return mount_at
    if shadows_the_image(target, container_home):
        return "/workspace/" + os.path.basename(target)
    return target


def inside_path(host_path, target, point):
    """Where a host path in the project appears inside."""
    return os.path.normpath(os.path.join(point, os.path.relpath(host_path, target)))


# A look at part of a project starts find at most this many places: past
# that, its command line could be too long (and a look at all is cheaper).
# What one look keeps at most: an agent can make any number of names.
MAX_SCAN_STARTS = 256
MAX_SCAN_ENTRIES = 200000


def mounts_below(target):
    """The file systems mounted inside `target`, by the kernel's own list
    (none known where there is no /proc)."""
    try:
        with open("/proc/self/mountinfo", "rb") as handle:
            text = handle.read(16 << 20).decode("utf-8", "surrogateescape")
    except OSError:
        return []
    points = [re.sub(r"\\([0-7]{3})", lambda code: chr(int(code.group(1), 8)), fields[4])
              for fields in (row.split(" ") for row in text.splitlines()) if len(fields) > 4]
    return sorted(point for point in points if point != target and is_within(point, target))


class ProjectScan:
    """One `find` over the project (or parts of it: `starts`), started at
    once and read later, so that it overlaps other work: C speed, never into
    another file system, nor into the .git a run replaces with its own.
    What it lists but cannot be looked at (too deep for a path, or in a
    directory the user cannot search) is kept in `problems`."""

    def __init__(self, target, predicate, skip_git, starts=(".",)):
        self.target, self.problems = target, []
        argv = ["find", *starts, "-xdev"] + (["-path", "./.git", "-prune", "-o"]
                                             if skip_git else [])
        argv += ["("] + predicate + [")", "-print0"]
        try:
            self.proc = subprocess.Popen(argv, cwd=target, stdout=subprocess.PIPE,
                                         stderr=subprocess.DEVNULL)
        except OSError as err:
            raise PiError("cannot look through %s with find: %s" % (target, err.strerror))

    def results(self):
        """[(relative path, lstat)] of what matched (and still exists), the
        first MAX_SCAN_ENTRIES (`truncated` says when there were more: a
        tree can hold more names than this process could keep);
        [(relative path, errno)] of what could not be looked at in
        `problems`."""
        found, pending = [], b""
        self.truncated = False
        while True:
            chunk = self.proc.stdout.read(1 << 20)
            names = (pending + chunk).split(b"\0")
            pending = names.pop() if chunk else b""
            for raw in names:
                path = os.fsdecode(raw[2:]) if raw.startswith(b"./") else ""
                if len(found) + len(self.problems) >= MAX_SCAN_ENTRIES:
                    break
                try:
                    if raw:
                        found.append((path, os.lstat(os.path.join(self.target, path))))
                except FileNotFoundError:
                    pass
                except OSError as err:
                    self.problems.append((path, err.errno))
            if not chunk or len(found) + len(self.problems) >= MAX_SCAN_ENTRIES:
                break
        if chunk:
            self.truncated = True
            self.proc.kill()
        self.proc.stdout.close()
        self.proc.wait()
        return found


class ProjectWatch:
    """inotify on every directory of the project, armed before the run, so
    that the sweep after it looks only at what changed instead of at every
    file. At any doubt (no inotify here, too many directories, events lost,
    a directory moved) it says so and the sweep looks at everything."""

    # inotify(7): ATTRIB, CLOSE_WRITE, MOVED_FROM, MOVED_TO, CREATE, MOVE_SELF
    MASK = 0x4 | 0x8 | 0x40 | 0x80 | 0x100 | 0x800
    ONLYDIR, DONT_FOLLOW, OVERFLOW, ISDIR = 0x01000000, 0x02000000, 0x4000, 0x40000000
    MOVED_FROM, MOVED_TO, CREATE, SELF = 0x40, 0x80, 0x100, 0x800
    MAX_DIRS = 20000

    def __init__(self, target, dirs):
        self.target, self.fd, self.paths = target, None, {}
        if len(dirs) > self.MAX_DIRS:
            return
        try:
            import ctypes
            libc = ctypes.CDLL(None, use_errno=True)
            fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        except (ImportError, OSError, AttributeError):
            return
        if fd < 0:
            return
        for path in dirs:
            wd = libc.inotify_add_watch(fd, os.fsencode(os.path.join(target, path)),
                                        self.MASK | self.ONLYDIR | self.DONT_FOLLOW)
            if wd < 0:  # a watch limit, most likely
                os.close(fd)
                return
            self.paths[wd] = path
        self.fd = fd

    def changed(self):
        """(paths that changed, new directories), relative; or None: the
        sweep must look at everything. (Closing the watch is cheap only if
        another process still holds it: see the saver.)"""
        if self.fd is None:
            return None
        chunks = []
        try:
            while True:
                chunk = os.read(self.fd, 1 << 16)
                if not chunk:
                    break
                chunks.append(chunk)
        except BlockingIOError:
            pass
        finally:
            os.close(self.fd)
            self.fd = None
        data, pos, paths, new_dirs = b"".join(chunks), 0, set(), set()
        while pos + 16 <= len(data):
            wd, mask, _cookie, size = struct.unpack_from("iIII", data, pos)
            name = os.fsdecode(data[pos + 16:pos + 16 + size].rstrip(b"\0"))
            pos += 16 + size
            if mask & self.OVERFLOW or mask & self.SELF or (
                    mask & self.ISDIR and mask & self.MOVED_FROM):
                return None
            if wd not in self.paths:
                continue
            # (no name: the watched directory itself changed, the top one too)
            path = os.path.join(self.paths[wd], name) if name else self.paths[wd]
            (new_dirs if mask & self.ISDIR and mask & (self.CREATE | self.MOVED_TO)
             else paths).add(path)
        return paths, new_dirs

    def found(self, predicate, skip_git):
        """What a full scan with `predicate` would find among the changes,
        or None."""
        changes = self.changed()
        if changes is None:
            return None
        paths, new_dirs = changes
        found = []
        for path in sorted(paths):
            full = os.path.join(self.target, path)
            # A watched directory the agent replaced with a symlink: its old
            # name now leads outside the project, where the sweep must not
            # act. (A full scan never follows one.)
            if not physical(self.target, os.path.dirname(path)):
                return None
            try:
                info = os.lstat(full)
            except OSError:
                return None  # gone: it may have been another name of what changed (a hard link)
            if stat.S_ISREG(info.st_mode) and info.st_nlink > 1:
                return None  # changed through this name, it is also seen through another
            found.append((path, info))
        if len(new_dirs) > MAX_SCAN_STARTS or not all(physical(self.target, path)
                                                      for path in new_dirs):
            return None
        if new_dirs:
            scan = ProjectScan(self.target, predicate, skip_git,
                               ["./" + path for path in sorted(new_dirs)])
            found += scan.results()
            if scan.problems or scan.truncated:
                return None
        return found


# Pre-run: what a run must know (git directories to protect, sockets, files
# with other names, perhaps outside the project), and the directories to watch.
SCAN_BEFORE = ["-name", "HEAD", "-o", "-name", ".git", "-o", "-type", "s", "-o", "-type", "d",
               "-o", "-type", "f", "-links", "+1"]

# What git needs to take a directory for a git directory.
GIT_DIR_PARTS = ("HEAD", "objects", "refs", "commondir")


def scan_after(uid):
    """Post-run: what could make a git directory, .git files, what is
    privileged or another user's, sockets, FIFOs, directories the user cannot
    look into (what they hide must be looked at too)."""
    names = sum((["-name", name, "-o"] for name in GIT_DIR_PARTS + (".git",)), [])
    return names + ["-type", "b", "-o", "-type", "c", "-o", "-type", "s", "-o", "-type", "p",
                    "-o", "-perm", "-4000",
                    "-o", "-perm", "-2000", "-o", "!", "-user", str(uid), "-o", "-type", "d",
                    "!", "-perm", "-500"]


def looks_like_git_dir(path):
    """What git's discovery would take for a git directory (HEAD beside
    objects/ and refs/, or a worktree's commondir): cd there, and a shell
    prompt's git status reads its config."""
    return os.path.lexists(os.path.join(path, "HEAD")) and (
        os.path.lexists(os.path.join(path, "commondir")) or
        (os.path.lexists(os.path.join(path, "objects")) and
         os.path.lexists(os.path.join(path, "refs"))))


def git_entries(target, found):
    """From a scan: the git directories inside the project ({relative path:
    (dev, ino)}) and the .git files ({relative path: (dev, ino, ctime)})."""
    dirs, files = {}, {}
    for path, info in found:
        name, parent = os.path.basename(path), os.path.dirname(path)
        if name == "HEAD" and parent and looks_like_git_dir(os.path.join(target, parent)):
            try:
                parent_info = os.lstat(os.path.join(target, parent))
            except OSError:
                continue
            dirs[parent] = (parent_info.st_dev, parent_info.st_ino)
        elif name == ".git" and not stat.S_ISDIR(info.st_mode):
            files[path] = (info.st_dev, info.st_ino, info.st_ctime_ns)
    return dirs, files


def outermost(paths):
    """The paths not inside another of them. Sorted by their components,
    what is inside a path comes right after it: one comparison each."""
    kept = []
    for path in sorted(set(paths), key=lambda path: path.split("/")):
        if not kept or not is_within(path, kept[-1]):
            kept.append(path)
    return kept


def look_through(target, skip_git, cache):
    """What SCAN_BEFORE finds in the project, as (relative path, lstat).
    From the last look, kept in `cache`, when no directory of the project
    has changed since: no entry is added, removed or renamed without its
    directory's ctime changing, and no one can set a ctime back. Else from
    a fresh scan, which is kept for the next run (if no directory changed in
    the last second, so that a coarse clock cannot hide a change). Its
    limit: a hard link made from outside to a file already here changes no
    directory of the project, so the file is known as linked at the next
    fresh scan only."""
    try:
        known = json.loads(read_regular(cache, 64 << 20) or b"null") if cache else None
    except ValueError:
        known = None
    if isinstance(known, dict) and known.get("target") == target and \
            known.get("skip_git") == skip_git and known.get("predicate") == SCAN_BEFORE:
        found = []
        for path, stamp in known.get("dirs", {}).items():
            try:
                info = os.lstat(os.path.join(target, path))
            except OSError:
                break
            if not stat.S_ISDIR(info.st_mode) or [info.st_mtime_ns, info.st_ctime_ns] != stamp:
                break
            found.append((path, info))
        else:
            try:
                return found + [(path, os.lstat(os.path.join(target, path)))
                                for path in known.get("entries", [])]
            except OSError:
                pass
    scan = ProjectScan(target, SCAN_BEFORE, skip_git=skip_git)
    found = scan.results()
    if scan.truncated:
        raise Refused("refusing to mount %s: it holds more than %d directories and files with "
                      "other names (hard links) to look at before a run; remove what an agent "
                      "made of them, or cd into a part with fewer and use --here"
                      % (target, MAX_SCAN_ENTRIES))
    dirs = {path: [info.st_mtime_ns, info.st_ctime_ns] for path, info in found
            if stat.S_ISDIR(info.st_mode)}
    if cache and max((stamp[1] for stamp in dirs.values()), default=0) < time.time_ns() - 10**9:
        try:
            replace_file(cache, json.dumps({
                "target": target, "skip_git": skip_git, "predicate": SCAN_BEFORE,
                "dirs": dirs,
                "entries": [path for path, info in found if not stat.S_ISDIR(info.st_mode)]})
                .encode("utf-8", "surrogateescape"))
        except OSError:
            pass
    return found


def shared_files(found, readonly):
    """{path: lstat} of the files (in a scan) that are hard links to a file
    the agent must not change: through them it would, whatever the mounts.
    An inode with a name outside the project (a uv or pnpm cache's, one in
    your home: more names than the scan found) or in what is mounted
    read-only (`readonly`, relative paths: the git directories inside)."""
    inodes = {}
    for path, info in found:
        if stat.S_ISREG(info.st_mode) and info.st_nlink > 1:
            inodes.setdefault((info.st_dev, info.st_ino), []).append((path, info))
    shared = {}
    for names in inodes.values():
        writable = [(path, info) for path, info in names
                    if not any(is_within(path, top) for top in readonly)]
        if writable and len(writable) < names[0][1].st_nlink:
            shared.update(writable)
    return shared


def unshare_file(target, path):
    """Make the project's file `path` a copy of its own, where it is: the
    same bytes, permissions (less setuid and setgid) and mtime, in a new
    file renamed over the name; never through a symbolic link."""
    parts = path.split("/")
    fd = open_beneath(target, *parts[:-1])
    if fd is None:
        raise Refused("cannot make %s a copy of its own: a directory on the way is a symbolic "
                      "link or is gone; look at it, then run again" % path)
    name, temp = parts[-1], ".pi-agent-copy-%d" % os.getpid()

    def beneath(file, flags):  # (never through a link; never blocking on a FIFO)
        return os.open(file, flags | os.O_NOFOLLOW | os.O_NONBLOCK, 0o600, dir_fd=fd)
    try:
        try:  # (one a crashed run left)
            os.unlink(temp, dir_fd=fd)
        except FileNotFoundError:
            pass
        with open(name, "rb", opener=beneath) as source, open(temp, "xb", opener=beneath) as copy:
            info = os.fstat(source.fileno())
            if not stat.S_ISREG(info.st_mode):
                raise OSError(0, "it is no longer a plain file")
            import shutil
            shutil.copyfileobj(source, copy, 1 << 20)
            copy.flush()
            os.fchmod(copy.fileno(), stat.S_IMODE(info.st_mode) & ~(stat.S_ISUID | stat.S_ISGID))
            os.utime(copy.fileno(), ns=(info.st_atime_ns, info.st_mtime_ns))
        os.rename(temp, name, src_dir_fd=fd, dst_dir_fd=fd)
        if os.lstat(name, dir_fd=fd).st_nlink != 1:
            raise OSError(0, "it has other names still")
    except BaseException as err:  # (Ctrl-C too: no copy is left behind)
        try:
            os.unlink(temp, dir_fd=fd)
        except OSError:
            pass
        if not isinstance(err, OSError):
            raise
        raise Refused("cannot make %s a copy of its own (it is a hard link to a file outside "
                      "the project, which the agent could change through it): %s; make it one "
                      "(cp --remove-destination), then run again"
                      % (path, err.strerror or err))
    finally:
        os.close(fd)


def unshare_links(config, project):
    """PI_AGENT_HARDLINKS before a run, under the project's lock and before
    its watch: the project's files that are hard links to files the agent
    must not change (shared_files) become copies of their own (copy), or
    stop the run (refuse); allow leaves them, and end_run names those it
    changed."""
    linked = project.linked
    if not linked or config.hardlinks == "allow":
        return
    tops = sorted({path.split("/")[0] if "/" in path else "." for path in linked})
    where = "%s in %s" % (plural(len(linked), "file"),
                          ", ".join(tops[:3] + ["..."] * (len(tops) > 3)))
    if config.hardlinks == "refuse":
        raise Refused("refusing to run in %s: it holds hard links to files outside it (%s), "
                      "a cache's or your home's, which the agent could change through them; "
                      "make them copies (uv sync --link-mode=copy; pnpm: "
                      "package-import-method=copy in .npmrc; cp without -l), or set "
                      "PI_AGENT_HARDLINKS=copy" % (project.target, where))
    for path in sorted(linked):
        unshare_file(project.target, path)
    say("hard links to files outside the project (%s) are copies of their own now, so that the "
        "agent cannot change those files through them (uv: UV_LINK_MODE=copy and pnpm: "
        "package-import-method=copy keep them copies)" % where)


# Files in a project that tools on the host run (or read commands from) by
# themselves: the agent may change them, the user should hear of it. Out of
# scope: files the user runs knowingly (Makefiles, package scripts).
HOST_RUN_PATHS = (
    ".envrc", ".vscode", ".devcontainer", ".idea", ".zed", ".helix", ".nvim.lua", ".nvimrc",
    ".exrc", ".vimrc", ".dir-locals.el", ".dir-locals-2.el", ".pre-commit-config.yaml",
    "lefthook.yml", "lefthook.yaml", ".lefthook.yml", "lefthook-local.yml", ".husky",
    ".yarnrc.yml", ".yarnrc", ".npmrc", "rust-toolchain", "rust-toolchain.toml",
    ".tool-versions", "mise.toml", ".mise.toml", "mise.local.toml", ".mise.local.toml",
    ".config/mise", ".config/mise.toml", ".mise", ".pdbrc", ".irbrc", ".pryrc", ".hg/hgrc",
    ".cargo/config", ".cargo/config.toml", ".gitmodules", ".mailmap", ".claude", ".mcp.json",
    ".cursor", ".aider.conf.yml", ".env", "compose.override.yaml", "compose.override.yml",
    "docker-compose.override.yml", "docker-compose.override.yaml", "node_modules/.bin",
    ".venv/bin", ".venv/pyvenv.cfg", "venv/bin", "venv/pyvenv.cfg")
# What Python runs at every start of a virtual environment's interpreter
# (which git hooks and editors start): VENV/lib/*/site-packages/NAME.
SITE_STARTUP = (".pth", "sitecustomize.py", "usercustomize.py")


def host_run_files(target, extra=()):
    """{relative path: [size, ctime]} of the files the host runs by itself
    (never following a link: the agent may have made one; ctime, which no
    one can set back)."""
    found, startup = {}, []
    for lib in (".venv/lib", "venv/lib"):
        try:
            versions = os.listdir(os.path.join(target, lib))
        except OSError:
            continue
        for site in (os.path.join(lib, version, "site-packages") for version in versions[:8]):
            try:
                startup += [os.path.join(site, name) for name in os.listdir(
                    os.path.join(target, site)) if name.endswith(SITE_STARTUP)]
            except OSError:
                continue
    for name in HOST_RUN_PATHS + tuple(extra) + tuple(startup):
        top = os.path.join(target, name)
        try:
            info = os.lstat(top)
        except OSError:
            continue
        if not stat.S_ISDIR(info.st_mode):
            found[name] = [info.st_size, info.st_ctime_ns]
            continue
        for dirpath, _dirnames, filenames in os.walk(top):
            for filename in filenames:
                path = os.path.join(dirpath, filename)
                try:
                    info = os.lstat(path)
                except OSError:
                    continue
                found[os.path.relpath(path, target)] = [info.st_size, info.st_ctime_ns]
            if len(found) > 5000:
                return found
    return found


def changed_files(before, after):
    return sorted(path for path in set(before) | set(after) if before.get(path) != after.get(path))


# --------------------------------------------------------------- the git gate
#
# The run's private git directory: seeded from the host's, and what the agent
# did brought back as data.
#
# The host's git directory is never mounted. A run gets a private one in its
# run directory, seeded from the host's (HEAD, refs, index, config; the
# host's objects read-only, as alternates), mounted where the agent expects
# .git, a mount point it cannot rename. After the run, what the agent did
# comes back as data: its new objects taken out without following a link
# and verified on the way in (index-pack --strict), refs moved compare-and-
# swap, HEAD, the index and a merge in progress following. Host git never
# reads a file the agent wrote as its configuration, hooks or git directory.

GATE_DIR = "git"             # in the run directory: the private git directory
GATE_FILE = "gitfile"        # a linked worktree's .git inside: "gitdir: <the gate>"
GATE_OBJECTS = "objects"     # where the host's objects are mounted (read-only)
RUN_RECORD = "run.json"      # what the run found and seeded, for whoever ends it
MODULE_CONFIGS = "modules"   # the submodules' configs, as the agent sees them
KEPT_DIR = "kept"            # in the state directory: git data that could not come back
# Files of an operation in progress that are data (object IDs, a message):
# they travel both ways. A rebase's todo list runs commands: never carried.
GIT_STATE_FILES = ("MERGE_HEAD", "MERGE_MSG", "MERGE_MODE", "CHERRY_PICK_HEAD", "REVERT_HEAD",
                   "ORIG_HEAD")
OID_RE = re.compile(r"[0-9a-f]{40}(?:[0-9a-f]{24})?")
# A run refuses a project with more git directories than this inside: each
# is mounted read-only (use --here in a part of it).
MAX_NESTED_GIT = 100
# What a run brings back of refs: at most MAX_NEW_REFS new ones (the rest
# are listed in STATE/kept, not made); an agent's store with more than
# MAX_AGENT_REFS refs beyond those it was given is not read at all.
MAX_NEW_REFS = 1000
MAX_AGENT_REFS = 100000
# Stash entries a run brings back at most (each is a host git process), and
# index entries beyond the host's a run's staging may have.
MAX_NEW_STASH = 50
MAX_NEW_INDEX_ENTRIES = 100000
PACKED_REFS_LIMIT = 1 << 30
# The commits of a run that are read (for the session log and the note on
# authors) at most.
MAX_COMMITS_READ = 10000
# What the hand-back copies at most of the agent's objects that cannot be
# hard-linked (root's, inside: protected_hardlinks); a sparse one never is
# (its holes would be written out, filling the disk for nothing).
MAX_OBJECT_COPY = 1 << 30
# What the agent's objects may hold unpacked, all told, and past 64 MB
# for each byte they take: 1 MB of zeros, compressed, is 1 GB to unpack (in
# the import, and in your checkout).
MAX_IMPORT_SIZE = 4 << 30
MAX_IMPORT_RATIO = 100
# What host git may hold in memory reading the agent's objects: a 66-byte
# pack whose two deltas name each other makes it grow for ever.
AGENT_OBJECTS_MEMORY = 1 << 30
# How long one host git command may take (not the import, bounded by size):
# one that hangs (a FIFO where it reads) is stopped, loudly, not waited for
# with the project's lock held.
HOST_GIT_TIMEOUT = 600


def valid_refname(name):
    """git check-ref-format's rules, for a full name under refs/, in UTF-8."""
    if not name.startswith("refs/") or name.endswith((".", "/")) or ".." in name \
            or "@{" in name or not name.isprintable():
        return False
    for part in name.split("/"):
        if not part or part.startswith(".") or part.endswith(".lock"):
            return False
        if any(char < " " or char in "\x7f ~^:?*[\\" for char in part):
            return False
    return True


def ref_value(data):
    """An object ID or 'ref: TARGET' from a loose ref's (or HEAD's) bytes."""
    text = (data or b"").decode("utf-8", "replace").strip()
    if OID_RE.fullmatch(text):
        return text
    if text.startswith("ref: ") and valid_refname(text[5:].strip()):
        return "ref: " + text[5:].strip()
    return None


def read_ref_store(dir_fd, limit=None):
    """{refname: value} of a files-backend ref store: packed-refs, then the
    loose refs over them; a symbolic ref's value is 'ref: TARGET'. Only
    plain files and directories are read (never a link). `limit`, for an
    agent's store: ValueError past that many entries, packed and loose
    (a flood of refs must cost neither memory nor the host's .git), or for
    a packed-refs that cannot be read whole (read as none, it would make
    every ref it holds look deleted)."""
    refs, budget = {}, limit if limit is not None else float("inf")
    try:
        size = os.stat("packed-refs", dir_fd=dir_fd, follow_symlinks=False).st_size
    except FileNotFoundError:
        size = None
    packed = b""
    if size is not None:
        packed = read_regular("packed-refs", PACKED_REFS_LIMIT if limit is None
                              else min(PACKED_REFS_LIMIT, limit * 256), dir_fd=dir_fd)
        if packed is None:
            raise ValueError("its packed-refs (%s) is not a plain file that can be read whole"
                             % human_size(size))
    for line in packed.splitlines():
        oid, _, name = line.decode("utf-8", "replace").partition(" ")
        if OID_RE.fullmatch(oid) and valid_refname(name):
            refs[name] = oid
            budget -= 1
    if budget < 0:
        raise ValueError("it holds more than %d refs" % limit)
    try:
        top = open_dir("refs", dir_fd)
    except OSError:
        return refs
    pending = [(top, "refs/", 0)]
    try:
        while pending:
            fd, prefix, depth = pending.pop()
            try:
                for entry in os.scandir(fd):
                    budget -= 1
                    if budget < 0:
                        raise ValueError("it holds more than %d refs" % limit)
                    if entry.is_dir(follow_symlinks=False) and depth < 32:
                        try:
                            pending.append((open_dir(entry.name, fd), prefix + entry.name + "/",
                                            depth + 1))
                        except OSError:
                            pass
                    elif entry.is_file(follow_symlinks=False) and \
                            valid_refname(prefix + entry.name):
                        value = ref_value(read_regular(entry.name, 4096, dir_fd=fd))
                        if value:
                            refs[prefix + entry.name] = value
            finally:
                os.close(fd)
    finally:
        for fd, _prefix, _depth in pending:
            os.close(fd)
    return refs


def read_head(dir_fd):
    return ref_value(read_regular("HEAD", 4096, dir_fd=dir_fd))


def host_git_process(repo_dir, *args, env=None, stdin=subprocess.DEVNULL, memory=None):
    """Host git on a repository pi-agent trusts, named explicitly (never
    discovered; None for git init), with none of the caller's GIT_*
    redirections, and running no hook and no fsmonitor whatever the config
    says (a file it includes may be in a project, where an agent at work
    can swap it), never reading the terminal; started, with its output
    piped. With `memory` (bytes), held to that much data (a limit that
    cannot be set: git does not run)."""
    clean = {name: value for name, value in os.environ.items()
             if not name.startswith("GIT_") or name in ("GIT_CONFIG_GLOBAL", "GIT_CONFIG_SYSTEM",
                                                        "GIT_CONFIG_NOSYSTEM", "GIT_EXEC_PATH")}
    # Replacement refs would let an agent's object stand in for another in
    # what pi-agent reads (the commits it lists): never honoured here.
    clean.update(env or {}, GIT_TERMINAL_PROMPT="0", GIT_NO_REPLACE_OBJECTS="1")
    try:
        # (ref locks: a run of another work tree may be ending at the same
        # moment; git's own waits, 0.1 s and 1 s, are too short for that)
        if memory:  # (never above the hard limit this process has: that cannot be set)
            import resource
            hard = resource.getrlimit(resource.RLIMIT_DATA)[1]
            memory = memory if hard == resource.RLIM_INFINITY else min(memory, hard)
        held = ["sh", "-c", 'ulimit -d %d && exec "$@"' % (memory >> 10), "sh"] if memory else []
        return subprocess.Popen([*held, "git", "-c", "core.hooksPath=/dev/null", "-c",
                                 "core.fsmonitor=false", "-c", "log.showSignature=false",
                                 "-c", "core.filesRefLockTimeout=5000",
                                 "-c", "core.packedRefsTimeout=5000",
                                 *(["--git-dir", repo_dir] if repo_dir else []), *args],
                                env=clean, stdin=stdin, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)
    except FileNotFoundError:
        raise PiError("git is not installed on this host", EXIT_NOT_FOUND)


def git_failure(args, stderr):
    lines = stderr.decode(errors="replace").strip().splitlines()
    return PiError("git %s failed: %s" % (args[0], lines[-1] if lines else "no message"))


def host_git(repo_dir, *args, stdin=None, check=True, env=None, memory=None):
    """Run host git (see host_git_process) to the end."""
    proc = host_git_process(repo_dir, *args, env=env, memory=memory,
                            stdin=subprocess.DEVNULL if stdin is None else subprocess.PIPE)
    try:
        out, err = proc.communicate(stdin, timeout=HOST_GIT_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()  # (not its pipes: a child of git's may hold them)
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            if stream:
                stream.close()
        raise PiError("git %s took more than %d s and was stopped" % (args[0],
                                                                   HOST_GIT_TIMEOUT))
    if check and proc.returncode != 0:
        raise git_failure(args, err)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def host_ref_store(common):
    """The refs of a repository pi-agent trusts (see read_ref_store)."""
    fd = open_dir(common)
    try:
        return read_ref_store(fd)
    except ValueError as err:
        raise PiError("cannot read the refs of %s: %s" % (common, err))
    finally:
        os.close(fd)


# --- the index: read, checked, written back without what could hide a change

class IndexEntry:
    __slots__ = ("path", "stage", "stat", "mode", "oid", "flags", "extended")

    def __init__(self, path, stage, stat_fields, mode, oid, flags, extended):
        self.path, self.stage, self.stat, self.mode = path, stage, stat_fields, mode
        self.oid, self.flags, self.extended = oid, flags, extended


INDEX_ASSUME_VALID = 0x8000
INDEX_EXTENDED = 0x4000
INDEX_INTENT_TO_ADD = 0x2000   # of the extended flags
INDEX_MODES = frozenset((0o100644, 0o100755, 0o120000, 0o160000))
# A path git could check out without leaving the work tree or writing into
# a .git (git's own verify_path insists on as much): this finds any other.
BAD_INDEX_PATH = re.compile(
    rb"[\x00-\x1f\x7f]|^/|/$|(?:^|/)(?:\.{0,2}|\.git[. ]*|git~1)(?:/|$)", re.I)


def varint(data, pos):
    """git's offset varint (index v4 path prefix lengths)."""
    byte = data[pos]
    value = byte & 127
    pos += 1
    while byte & 128:
        byte = data[pos]
        value = ((value + 1) << 7) | (byte & 127)
        pos += 1
    return value, pos


def index_entries(data, hash_len, trusted=False):
    """The one reader of a git index (versions 2 to 4): its entries, each as
    the bytes of a version 2 or 3 entry (a version 4 index's paths are
    decoded into them), after checking the header, checksum and extensions
    unless it is the host's own (`trusted`): a required extension (a split
    or sparse index) is refused. What each entry says is checked where it
    is used (decode_entry). ValueError if anything is off."""
    import hashlib
    if len(data) < 12 + hash_len or data[:4] != b"DIRC":
        raise ValueError("not an index file")
    version, count = struct.unpack_from(">LL", data, 4)
    if version not in (2, 3, 4):
        raise ValueError("index version %d" % version)
    digest = data[-hash_len:]
    if not trusted and digest != bytes(hash_len) and hashlib.new(
            "sha1" if hash_len == 20 else "sha256", data[:-hash_len]).digest() != digest:
        raise ValueError("its checksum is wrong")
    fixed, find, entries, pos, previous = 40 + hash_len + 2, data.find, [], 12, b""
    for _ in range(count):
        if pos + fixed > len(data):
            raise ValueError("it is truncated")
        head = pos + fixed + (2 if data[pos + fixed - 2] & 0x40 else 0)
        if version == 4:
            try:
                strip, start = varint(data, head)
            except IndexError:
                raise ValueError("it is truncated")
            end = find(b"\0", start)
            if strip > len(previous):
                raise ValueError("a bad path prefix")
            previous = previous[:len(previous) - strip] + data[start:end]
            raw = data[pos:head] + previous
            entries.append(raw + b"\0" * (((len(raw) + 8) & ~7) - len(raw)))
        else:
            end = find(b"\0", head)
            entries.append(data[pos:pos + ((end - pos + 8) & ~7)])
        if end < 0:
            raise ValueError("it is truncated")
        pos = end + 1 if version == 4 else pos + len(entries[-1])
    if pos > len(data) - hash_len:
        raise ValueError("it is truncated")
    while not trusted and pos + 8 <= len(data) - hash_len:
        signature = data[pos:pos + 4]
        if not b"A" <= signature[:1] <= b"Z":
            raise ValueError("a %s extension" % signature.decode("ascii", "replace"))
        pos += 8 + struct.unpack_from(">L", data, pos + 4)[0]
    return entries


def entry_key(raw, fixed):
    """(path, stage) of an entry's bytes; `fixed` is the size of its head."""
    high = raw[fixed - 2]
    start = fixed + (2 if high & 0x40 else 0)
    return raw[start:raw.index(b"\0", start)], (high >> 4) & 3


def decode_entry(raw, hash_len, trusted=False):
    head = struct.Struct(">10L%dsH" % hash_len)
    c_s, c_n, m_s, m_n, dev, ino, mode, uid, gid, size, oid, flags = head.unpack_from(raw)
    extended = struct.unpack_from(">H", raw, head.size)[0] if flags & INDEX_EXTENDED else 0
    path, stage = entry_key(raw, head.size)
    if not trusted and mode not in INDEX_MODES:
        raise ValueError("an entry of mode %o (a sparse index?)" % mode)
    if not trusted and BAD_INDEX_PATH.search(path):
        raise ValueError("a path git would refuse: %r" % path)
    return IndexEntry(path, stage, (c_s, c_n, m_s, m_n, dev, ino, uid, gid, size), mode, oid,
                      flags & INDEX_ASSUME_VALID, extended)


def entries_view(data, hash_len, trusted=False):
    """(bytes, where the entries start, how many) of an index: its own
    bytes for versions 2 and 3, its entries decoded to version 2's for
    version 4 (see index_entries)."""
    if len(data) < 12 + hash_len or data[:4] != b"DIRC":
        raise ValueError("not an index file")
    version, count = struct.unpack_from(">LL", data, 4)
    if version == 4:
        return b"".join(index_entries(data, hash_len, trusted)), 0, count
    if version not in (2, 3):
        raise ValueError("index version %d" % version)
    return data, 12, count


def entry_end(data, pos, fixed):
    """Where the version 2 or 3 entry at `pos` ends (its path's length from
    its flags; ValueError past the data)."""
    if pos + fixed > len(data):
        raise ValueError("it is truncated")
    flags = (data[pos + fixed - 2] << 8) | data[pos + fixed - 1]
    head, size = fixed + (2 if flags & INDEX_EXTENDED else 0), flags & 0xFFF
    if size == 0xFFF:
        size = data.find(b"\0", pos + head) - pos - head
        if size < 0xFFF:
            raise ValueError("it is truncated")
    end = pos + ((head + size + 8) & ~7)
    if end > len(data) or data[pos + head + size] != 0:
        raise ValueError("it is truncated")
    return end


def walk_index(data, hash_len):
    """(bytes, [where each entry starts, then where the last ends]) of the
    host's index (empty for none): index_changes' map of it."""
    if not data:
        return b"", [0]
    view, pos, count = entries_view(data, hash_len, trusted=True)
    fixed, starts = 40 + hash_len + 2, [pos]
    for _ in range(count):
        starts.append(entry_end(view, starts[-1], fixed))
    return view, starts


# The hosts' indexes, walked while their runs' agents work (by the wrapper,
# in a thread: see walk_in_background), so that what a run changed in a
# large index costs the prompt what changed: {(path, size, mtime, inode):
# the thread, whose `walked` is walk_index()'s, or None}.
WALKED_INDEXES = {}


def walk_in_background(path, key, hash_len):
    """Read and walk the host's index `path` while the agent runs, if it is
    still what `key` (size, mtime, inode) says when read."""
    import threading

    def walk():
        try:
            data = read_regular(path, 1 << 30)
            info = os.lstat(path)
            if data is not None and [info.st_size, info.st_mtime_ns, info.st_ino] == key:
                thread.walked = walk_index(data, hash_len)
        except (OSError, ValueError):
            pass
    thread = threading.Thread(target=walk, daemon=True)
    thread.walked = None
    WALKED_INDEXES[(path,) + tuple(key)] = thread
    thread.start()


def first_difference(a, b, i, j):
    """How many bytes a[i:] and b[j:] have the same from their start:
    compared in runs that double (so that it costs what is the same), then
    halved, memcmp all the way (bytes.startswith: a memoryview's own
    comparison goes item by item, ten times slower)."""
    mb = memoryview(b)
    limit, low, size = min(len(a) - i, len(b) - j), 0, 4096
    while True:
        high = min(low + size, limit)
        if not a.startswith(mb[j + low:j + high], i + low):
            break
        if high == limit:
            return limit
        low, size = high, size * 2
    while high - low > 1:
        middle = (low + high) // 2
        if a.startswith(mb[j + low:j + middle], i + low):
            low = middle
        else:
            high = middle
    return low


def extensions(data, hash_len, pos):
    """ValueError for a required extension (a split or sparse index) of an
    index whose entries end at `pos` (None: read from a version 4 index,
    whose extensions index_entries checked)."""
    while pos is not None and pos + 8 <= len(data) - hash_len:
        signature = data[pos:pos + 4]
        if not b"A" <= signature[:1] <= b"Z":
            raise ValueError("a %s extension" % signature.decode("ascii", "replace"))
        pos += 8 + struct.unpack_from(">L", data, pos + 4)[0]


def index_changes(agent_data, host_data, hash_len, walked=None):
    """What the agent's staging area changed, as host git is to apply it
    (git update-index --index-info): [(path, stage, mode, object ID)], a
    mode of 0 removing that entry, and the objects the entries need.
    Entries the agent left as the host had them cost a comparison of bytes,
    whole runs at once (first_difference); only those that differ are
    decoded and checked (decode_entry), so the cost follows what changed,
    not the size of the index (but for a version 4 index, whose paths are
    read from its start). No flag and no stat data comes back: git compares
    the content of what changed with the file. An intent-to-add entry does
    not come back (update-index cannot make one). `walked`: walk_index()
    of the host's, if done already. ValueError for an index that is not to
    be used."""
    import bisect
    fixed = 40 + hash_len + 2
    agent, pa, a_count = entries_view(agent_data, hash_len)
    host, starts = walked or walk_index(host_data, hash_len)
    h_count = len(starts) - 1
    changes, needed, last, ia, ih = [], set(), None, 0, 0
    while ia < a_count or ih < h_count:
        if ia < a_count and ih < h_count:
            same = first_difference(agent, host, pa, starts[ih])
            skip = min(bisect.bisect_right(starts, starts[ih] + same, ih) - 1 - ih, a_count - ia)
            if skip > 0:
                pa += starts[ih + skip] - starts[ih]
                ia, ih = ia + skip, ih + skip
                last = entry_key(host[starts[ih - 1]:starts[ih]], fixed)
                continue
        entry = raw = None
        if ia < a_count:
            end = entry_end(agent, pa, fixed)
            raw = agent[pa:end]
            entry = decode_entry(raw, hash_len)
            if last is not None and (entry.path, entry.stage) <= last:
                raise ValueError("its entries are out of order")
        old = decode_entry(host[starts[ih]:starts[ih + 1]], hash_len, True) if ih < h_count \
            else None
        key = old and (old.path, old.stage)
        if entry is None or (old is not None and key < (entry.path, entry.stage)):
            changes.append((old.path, old.stage, 0, bytes(hash_len)))  # the agent removed it
            ih += 1
            continue
        if key == (entry.path, entry.stage):
            ih += 1
            if (old.mode, old.oid, old.extended & INDEX_INTENT_TO_ADD) != \
                    (entry.mode, entry.oid, entry.extended & INDEX_INTENT_TO_ADD):
                key = None
        if key != (entry.path, entry.stage) and not entry.extended & INDEX_INTENT_TO_ADD:
            changes.append((entry.path, entry.stage, entry.mode, entry.oid))
            if entry.mode != 0o160000:
                needed.add(entry.oid.hex())
        last, pa, ia = (entry.path, entry.stage), end, ia + 1
    extensions(agent_data, hash_len, pa if agent is agent_data else None)
    return changes, needed


# --- git's config: what host git reads from the project, and what the gate takes of it

def start_config_listing(repo):
    """Host git's own list of the configuration it reads for the repository
    (each value with the file it came from), started now, read later."""
    try:
        return host_git_process(repo.gitdir, "config", "--list", "--show-origin", "-z")
    except PiError:
        return None


# What a run's private git directory takes of the repository's own config
# (names as git config --list gives them): what git needs inside to read
# the repository, its remotes and branches. Nothing else comes in: not the
# credentials a config may hold (http.<url>.extraheader, credential.*, a
# token in url.<base>.insteadOf or in a remote's URL), not commands.
GATE_CONFIG_KEYS = re.compile(
    r"core\.(?:repositoryformatversion|filemode|symlinks|ignorecase|precomposeunicode|"
    r"logallrefupdates|autocrlf|eol|safecrlf|quotepath|abbrev|commentchar|whitespace|"
    r"sparsecheckout|sparsecheckoutcone|checkstat|trustctime)"
    r"|extensions\.(?:objectformat|worktreeconfig|preciousobjects|noop)"
    r"|remote\..+\.(?:url|pushurl|fetch|push|tagopt|mirror|prune)"
    r"|branch\..+\.(?:remote|merge|rebase|pushremote|description)"
    r"|submodule\..+\.(?:url|active|branch)"
    r"|pull\.(?:rebase|ff)|merge\.(?:ff|conflictstyle)|init\.defaultbranch"
    r"|diff\.(?:renames|algorithm)", re.S)
SECRET_WORDS = re.compile(r"extraheader|credential|token|password|passwd|secret|auth|cookie|"
                          r"insteadof|proxy", re.I)
URL_USERINFO = re.compile(r"^([a-z][a-z0-9+.-]*://)([^/@]*)@", re.I)


def gate_entries(local, target, hooks, also=()):
    """[(key, value)] of the repository's own config (`local`) that the
    private git directory gets, by GATE_CONFIG_KEYS: URLs without a
    password or a token (any userinfo but an ssh user), a core.hooksPath
    only inside the project (relative: the hooks run there inside too),
    and the keys `also`. And the names left out that look like credentials
    (userinfo masked)."""
    kept, left_out = [], []
    for key, value in local:
        if key == "core.hookspath" and hooks and is_within(hooks, target):
            kept.append((key, os.path.relpath(hooks, target)))
            continue
        if not GATE_CONFIG_KEYS.fullmatch(key) and key not in also:
            section, _, rest = key.partition(".")
            if SECRET_WORDS.search(key) or URL_USERINFO.search(rest):
                left_out.append(section + "." + URL_USERINFO.sub(r"\1***@", rest))
            continue
        userinfo = URL_USERINFO.match(value or "")
        if key.endswith("url") and userinfo and (":" in userinfo.group(2) or not
                                                  userinfo.group(1).lower().startswith("ssh")):
            value = URL_USERINFO.sub(r"\1", value)
            left_out.append("the user and password in %s" % key)
        kept.append((key, value))
    return kept, left_out


def link_on_the_way(target, path):
    """The first part of `path` (relative to target) that is a symbolic
    link, looked at a component at a time; None if there is none."""
    parts = path.split("/")
    for end in range(1, len(parts) + 1):
        try:
            if stat.S_ISLNK(os.lstat(os.path.join(target, *parts[:end])).st_mode):
                return "/".join(parts[:end])
        except OSError:
            return None
    return None


def read_reaches(path, target, fixed):
    """Where host git reading `path` (absolute) ends up, every symbolic link
    followed a component at a time as the kernel does (`..` after a link
    included), and the first part of the way that the agent could make
    lead elsewhere, else None: a link, or a directory left by `..` (which
    it could replace with a link), in `target` and not in one of the `fixed`
    directories (git directories, which a run cannot write)."""
    done, pending, movable, hops = "/", path.split("/"), None, 0
    while pending:
        part = pending.pop(0)
        if part in ("", "."):
            continue
        if part == "..":
            if movable is None and is_within(done, target) and done != target and \
                    not any(is_within(done, directory) for directory in fixed):
                movable = done
            done = os.path.dirname(done)
            continue
        here = os.path.join(done, part)
        try:
            link = os.readlink(here)
        except OSError:  # (not a link, or not there)
            done = here
            continue
        hops += 1
        if hops > 40:
            raise Refused("your git config reads %s, through more than 40 symbolic links" % path)
        if movable is None and is_within(here, target) and \
                not any(is_within(here, directory) for directory in fixed):
            movable = here
        done = "/" if link.startswith("/") else done
        pending = link.split("/") + pending
    return done, movable


# Config keys whose value is a command host git runs by itself or as you
# review (git status, git diff, git commit): a file of the project that one
# names is read-only in a run, as an include is.
COMMAND_KEYS = re.compile(
    r"filter\..+\.(?:clean|smudge|process)|diff\.(?:.+\.)?(?:textconv|command|external)|"
    r"merge\..+\.driver|core\.(?:fsmonitor|pager|editor|sshcommand|askpass|gitproxy|"
    r"alternaterefscommand)|pager\..+|interactive\.difffilter|sequence\.editor|"
    r"gpg\.(?:.+\.)?program|gpg\.ssh\.defaultkeycommand|credential\.(?:.+\.)?helper|alias\..+|"
    r"remote\..+\.(?:uploadpack|receivepack)|submodule\..+\.update|trailer\..+\.(?:command|cmd)|"
    r"(?:merge|diff)tool\..+\.cmd|sendemail\.(?:sendmailcmd|smtpserver)|hook\..+\.command|"
    r"uploadpack\.packobjectshook")


# (why host git reads a path: config_reads writes it, config_facts reads it)
INCLUDED, COMMAND_WORD = "your git config includes", "your git config runs"


def config_reads(out, top, what):
    """From a `git config --list --show-origin -z` listing (`out`), into
    `what` ({path as git names it: why git reads it}): the files read, the
    files they include, the hooks directory in effect (a relative one is
    the work tree's, `top`'s), the files of `top` that commands name.
    Returns [(key, value, the file it is in)], the hooks directory set,
    and that setting as written."""
    entries, hooks, written = [], None, None
    fields = out.split("\0")
    for origin, pair in zip(fields[0::2], fields[1::2]):
        key, newline, value = pair.partition("\n")
        key = key.lower()
        source = os.path.join(top, origin[len("file:"):]) if origin.startswith("file:") else None
        entries.append((key, value if newline else None, source))
        if source:
            what.setdefault(source, INCLUDED)
        if re.fullmatch(r"include(?:if\..*)?\.path", key) and source and newline:
            what[os.path.join(os.path.dirname(source), os.path.expanduser(value))] = INCLUDED
        elif key == "core.hookspath" and source and newline:
            written = os.path.expanduser(value)
            hooks = os.path.join(top, written)
        elif COMMAND_KEYS.fullmatch(key) and newline:
            for word in re.split(r"[\s'\"();|&<>=!`]+", value):
                path = os.path.join(top, os.path.expanduser(word))
                if "/" in word and not is_within(os.path.normpath(path), top):
                    path = os.path.join(top, word.lstrip("/"))  # ($(git rev-parse ...)/x)
                if "/" in word and is_within(os.path.normpath(path), top):
                    what.setdefault(path, COMMAND_WORD)
    if hooks:
        what[hooks] = "your git config runs hooks from"
    return entries, hooks, written


def config_facts(listing, target, repo, nested=()):
    """From that listing: the object format, and the paths host git reads
    as configuration or runs as hooks that lie in the project (outside its
    .git), for the repository and each one inside (`nested`, their git
    directories): config files (through links too), files they include, a
    core.hooksPath there (a worktree's too), the hooks in effect that are
    links. The agent must not write those: they are mounted read-only, must
    exist (else the agent could create them), and be reached through no
    link the agent could point elsewhere. And what the run's private git
    directory takes of `repo`'s own config (gate_entries)."""
    facts = {"format": "sha1", "protected": [], "read": [], "local": [], "left_out": []}
    what, hooks_dirs, local, hooks = {}, [], [], None
    fixed = [os.path.join(target, ".git")] + list(nested)
    home = os.path.expanduser("~")
    for path in [os.environ.get("GIT_CONFIG_SYSTEM") or "/etc/gitconfig"] + (
            [os.environ["GIT_CONFIG_GLOBAL"]] if os.environ.get("GIT_CONFIG_GLOBAL") else
            [os.path.join(home, ".gitconfig"), os.path.join(os.environ.get(
                "XDG_CONFIG_HOME") or os.path.join(home, ".config"), "git", "config")]):
        what[path] = "git reads"  # (if it is there: a link into the project makes it the agent's)
    if listing is not None:
        own = {os.path.join(repo.common, "config"), os.path.join(repo.gitdir, "config.worktree")}
        out, err = listing.communicate()
        if listing.returncode:
            raise git_failure(("config",), err)
        entries, hooks, written = config_reads(out.decode("utf-8", "surrogateescape"), target,
                                               what)
        for key, value, source in entries:
            if source and os.path.normpath(source) in own:
                local.append((key, value))
            if key == "extensions.objectformat":
                facts["format"] = (value or "").strip().lower()
            elif key == "extensions.refstorage" and (value or "").strip().lower() != "files":
                raise Refused("the repository in %s keeps its refs in %s, which pi-agent cannot "
                              "read yet" % (target, (value or "").strip()))
        hooks_dirs.append(hooks or os.path.join(repo.common, "hooks"))
        if hooks and not os.path.isabs(written):
            try:  # (a relative one is each work tree's: those in the project too)
                names = os.listdir(os.path.join(repo.common, "worktrees"))
            except OSError:
                names = []
            for name in names:
                dot = (read_regular(os.path.join(repo.common, "worktrees", name, "gitdir"),
                                    4096) or b"").decode("utf-8", "replace").strip()
                if dot and is_within(dot, target):
                    what[os.path.join(os.path.dirname(dot), written)] = \
                        "your git config runs hooks from"
    # An included file git did not read (behind a condition false now) is
    # read here, with what it includes in turn: the agent could make the
    # condition true (a branch checked out) and the files it names.
    seen = {os.path.realpath(source) for _key, _value, source in entries if source} \
        if listing is not None else set()
    for _ in range(MAX_NESTED_GIT):
        unread = [path for path, why in what.items() if why == INCLUDED
                  and os.path.realpath(path) not in seen and os.path.isfile(path)]
        if not unread:
            break
        seen.add(os.path.realpath(unread[0]))
        config_reads(host_git(None, "config", "--file", unread[0], "--no-includes", "--list",
                              "--show-origin", "-z").stdout.decode("utf-8", "surrogateescape"),
                     target, what)
    else:
        raise Refused("your git config includes more than %d files: pi-agent cannot look "
                      "through them all" % MAX_NESTED_GIT)
    for gitdir in nested:
        listed = host_git(gitdir, "config", "--list", "--show-origin", "-z")
        top = os.path.dirname(gitdir) if os.path.basename(gitdir) == ".git" else gitdir
        hooks_dirs.append(config_reads(listed.stdout.decode("utf-8", "surrogateescape"), top,
                                       what)[1] or os.path.join(gitdir, "hooks"))
    unwritable = list(fixed)  # (and a hooks directory in the project: read-only inside)
    for directory in hooks_dirs:  # (the hooks in effect that are links, too)
        what.setdefault(directory, "your git config runs hooks from")
        real, movable = read_reaches(directory, target, fixed)
        if not movable:
            unwritable.append(real)
        try:
            what.update((os.path.join(directory, entry.name), "your repository's hooks lead "
                         "to") for entry in os.scandir(real) if entry.is_symlink())
        except OSError:
            pass
    reached = {}
    for path, why in what.items():
        real, movable = read_reaches(path, target, unwritable)
        if why == COMMAND_WORD and (movable or not os.path.isfile(real)):
            continue  # (a word that may not be a path at all: only a file is protected)
        if why == "git reads" and not os.path.lexists(real) and not movable and \
                not is_within(os.path.dirname(real), target):
            continue  # (not there, and none could make it but you)
        if movable:
            raise Refused("%s %s, reached through %s in the project, which the agent could "
                          "make lead elsewhere (a symbolic link, or a directory before ..); "
                          "make it a plain path, or change the setting" % (why, path, movable))
        if not any(is_within(real, directory) for directory in fixed):
            reached[real] = why
    facts["read"] = sorted(reached)
    for path in facts["read"]:
        if not is_within(path, target):
            continue
        try:
            info = os.lstat(path)
        except OSError:
            raise Refused("%s %s, which does not exist in the project: the agent could create "
                          "it; create it, or change the setting" % (reached[path], path))
        facts["protected"].append((path, info.st_dev, info.st_ino))
    facts["local"], facts["left_out"] = gate_entries(local, target, hooks and os.path.normpath(
        hooks))
    return facts


def submodules_mountable(repo, target, notes):
    """Whether the submodules' git directories (GITDIR/modules) may be
    mounted read-only inside: a real directory, with no socket in it (a
    host program's, such as git's fsmonitor daemon); and what each one's
    config becomes inside, [(its directory in modules, [(key, value)])]
    by the gate's allow-list (core.worktree too): a submodule's config
    holds credentials as the repository's does."""
    path = os.path.join(repo.gitdir, "modules")
    try:
        if not stat.S_ISDIR(os.lstat(path).st_mode):
            return False, []
    except OSError:
        return False, []
    found = ProjectScan(path, ["-type", "s", "-o", "-name", "config", "-type", "f"],
                        False).results()
    if any(stat.S_ISSOCK(info.st_mode) for _path, info in found):
        notes.append("the submodules' git directories hold sockets (a git fsmonitor daemon's?): "
                     "they are not mounted, so submodules cannot be looked into inside")
        return False, []
    configs, left_out = [], []
    for config, _info in found:
        listing = host_git(None, "config", "--file", os.path.join(path, config), "--list", "-z",
                           check=False).stdout.decode("utf-8", "surrogateescape").split("\0")
        entries, dropped = gate_entries([(pair.partition("\n")[0].lower(), pair.partition(
            "\n")[2] if "\n" in pair else None) for pair in listing if pair], target, None,
            also=("core.worktree",))
        configs.append((os.path.dirname(config), entries))
        left_out += dropped
    if left_out:
        notes.append("your submodules' git config holds what may be credentials (%s): they "
                     "stay out of the run" % ", ".join(sorted(set(left_out))[:4]))
    return True, configs


# --- seeding: the private git directory, from the host's (read, never written)

def config_quote(value):
    return '"%s"' % value.replace("\\", "\\\\").replace('"', '\\"').replace(
        "\n", "\\n").replace("\t", "\\t")


def config_text(entries):
    """A git config file that gives [(key, value)] (value None: a bare key)."""
    lines, header = [], None
    for key, value in entries:
        head, _, name = key.rpartition(".")
        section, _, sub = head.partition(".")
        if (section, sub) != header:
            header = section, sub
            lines.append("[%s%s]" % (section, " " + config_quote(sub) if sub else ""))
        lines.append("\t%s = %s" % (name, "true" if value is None else config_quote(value)))
    return "".join(line + "\n" for line in lines)


def gate_config(entries, point, identity):
    """The private git directory's config: the repository's own entries
    that are let in (gate_entries), then what makes commits inside the
    agent's own and keeps git from running or repacking anything of the
    host's."""
    name, email = identity
    who = "\tname = %s\n\temail = %s\n" % (config_quote(name), config_quote(email))
    return (config_text(entries) + "# pi-agent: the agent's own commits, whatever is above\n"
            "[core]\n\tbare = false\n\tfsmonitor = false\n\tworktree = %s\n"
            "[user]\n%s[author]\n%s[committer]\n%s"
            "[commit]\n\tgpgsign = false\n[tag]\n\tgpgsign = false\n"
            "[gc]\n\tauto = 0\n[maintenance]\n\tauto = false\n"
            % (config_quote(point), who, who, who))


def copy_tree_files(source, dest, keep=lambda name: True):
    """The plain files of a host directory (one level), as copies."""
    fd = open_beneath(source)
    if fd is None:
        return
    try:
        for entry in sorted(os.scandir(fd), key=lambda entry: entry.name):
            data = read_regular(entry.name, 16 << 20, dir_fd=fd) if keep(entry.name) else None
            if data is not None:
                mode = entry.stat(follow_symlinks=False).st_mode & 0o755
                write_file(os.path.join(dest, entry.name), data, mode)
    finally:
        os.close(fd)


def stash_entries(log):
    """[(commit, message)] of a refs/stash reflog, oldest first."""
    entries = []
    for line in (log or b"").decode("utf-8", "replace").splitlines():
        head, _, message = line.partition("\t")
        fields = head.split(" ")
        if len(fields) > 1 and OID_RE.fullmatch(fields[1]):
            entries.append((fields[1], message.replace("\0", " ")))  # (git's -m takes no NUL)
    return entries


def seed_refs(gate, gitdir, common, record):
    """HEAD, and every ref as packed-refs (symbolic ones loose)."""
    head = read_regular(os.path.join(gitdir, "HEAD"), 4096)
    record["head"] = ref_value(head)
    write_file(os.path.join(gate, "HEAD"), head or b"ref: refs/heads/main\n")
    refs = record["refs"] = host_ref_store(common)
    packed = ["# pack-refs with: sorted \n"]
    for name in sorted(refs):
        if refs[name].startswith("ref: "):
            path = os.path.join(gate, name)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            write_file(path, (refs[name] + "\n").encode())
        else:
            packed.append("%s %s\n" % (refs[name], name))
    write_file(os.path.join(gate, "packed-refs"), "".join(packed).encode())


def seed_index(gate, gitdir, record):
    """The index, and what the hand-back compares with: the host's as it was
    (to leave the user's staging alone if it changed) and the copy's."""
    index = os.path.join(gitdir, "index")
    try:
        info = os.lstat(index)
        record["index"] = [info.st_size, info.st_mtime_ns, info.st_ino]
    except OSError:
        record["index"] = None
    if record["index"] and copy_file(index, os.path.join(gate, "index"), 1 << 30):
        info = os.lstat(os.path.join(gate, "index"))
        record["gate_index"] = [info.st_size, info.st_mtime_ns]
    copy_tree_files(gitdir, gate, keep=lambda name: name.startswith("sharedindex."))


def seed_files(gate, gitdir, common, record):
    """What git reads besides: ignore and attribute files, sparse-checkout,
    hooks (they run inside, as ever), a shallow clone's boundary, an
    operation in progress, the stash's reflog (its list)."""
    for name in ("exclude", "attributes", "sparse-checkout"):
        data = read_beneath(gitdir if name == "sparse-checkout" else common, "info", name)
        if data is not None:
            write_file(os.path.join(gate, "info", name), data)
    copy_tree_files(os.path.join(common, "hooks"), os.path.join(gate, "hooks"),
                    keep=lambda name: not name.endswith(".sample"))
    for name in ("shallow",) + GIT_STATE_FILES:
        data = read_regular(os.path.join(common if name == "shallow" else gitdir, name), 16 << 20)
        if data is not None:
            write_file(os.path.join(gate, name), data)
        if name != "shallow":
            record["state"][name] = None if data is None else data.decode("utf-8", "replace")
    stash = read_beneath(common, "logs", "refs", "stash")
    record["stash"] = [oid for oid, _message in stash_entries(stash)]
    if stash is not None:
        os.makedirs(os.path.join(gate, "logs", "refs"))
        write_file(os.path.join(gate, "logs", "refs", "stash"), stash)


def seed_gate(run_dir, record, identity):
    """Make the run's private git directory (GATE_DIR), and record what it
    was seeded with. For a project that is not a repository it starts empty,
    and the project gets the empty .git a mount point needs (the end of the
    run removes it again unless the agent made a repository)."""
    gate = os.path.join(run_dir, GATE_DIR)
    os.mkdir(gate, 0o755)
    repo = record["repo"]
    if repo is None:
        dot = os.path.join(record["target"], ".git")
        if not os.path.lexists(dot):
            os.mkdir(dot, 0o755)
            record["made_dot"] = True
        return
    gitdir, common = repo["gitdir"], repo["common"]
    for sub in ("objects", "objects/info", "objects/pack", "refs", "refs/heads", "refs/tags",
                "info", "hooks") + (("modules",) if repo["modules"] else ()):
        os.mkdir(os.path.join(gate, sub), 0o755)
    seed_refs(gate, gitdir, common, record)
    seed_index(gate, gitdir, record)
    if record["module_configs"]:
        os.mkdir(os.path.join(run_dir, MODULE_CONFIGS), 0o755)
    for number, (_directory, entries) in enumerate(record["module_configs"]):
        write_file(os.path.join(run_dir, MODULE_CONFIGS, str(number)), config_text(
            entries).encode("utf-8", "surrogateescape"))
    text = gate_config(record["git_config"], record["point"], identity)
    write_file(os.path.join(gate, "config"), text.encode("utf-8", "surrogateescape"))
    record["gate_config"] = text_digest(text)
    seed_files(gate, gitdir, common, record)
    write_file(os.path.join(gate, "objects", "info", "alternates"),
               (RUN_DIR_INSIDE + "/" + GATE_OBJECTS + "\n").encode())
    os.mkdir(os.path.join(run_dir, GATE_OBJECTS), 0o755)
    if repo["linked"]:
        write_file(os.path.join(run_dir, GATE_FILE),
                   ("gitdir: %s/%s\n" % (RUN_DIR_INSIDE, GATE_DIR)).encode())


def gate_mounts(record, run_dir):
    """[(source, destination inside, read-only)] that put the private git
    directory where the agent expects .git, the host's objects under it
    (read-only) and the submodules' git directories (read-only: a submodule
    can be read and built inside, not committed to)."""
    if not record.get("gated"):
        return []
    gate, dot = os.path.join(run_dir, GATE_DIR), os.path.join(record["point"], ".git")
    repo = record["repo"]
    if repo is None:
        return [(gate, dot, False)]
    inside = RUN_DIR_INSIDE + "/" + GATE_DIR if repo["linked"] else dot
    mounts = [(os.path.join(run_dir, GATE_FILE), dot, True), (gate, inside, False)] \
        if repo["linked"] else [(gate, dot, False)]
    mounts.append((os.path.join(repo["common"], "objects"), RUN_DIR_INSIDE + "/" + GATE_OBJECTS,
                   True))
    if repo["modules"]:
        mounts.append((os.path.join(repo["gitdir"], "modules"), inside + "/modules", True))
        # (each submodule's config, over its own: the allow-listed one)
        mounts += [(os.path.join(run_dir, MODULE_CONFIGS, str(number)),
                    "%s/modules/%s/config" % (inside, directory), True)
                   for number, (directory, _entries) in enumerate(record["module_configs"])]
    return mounts


# --- the hand-back: what the agent did to git, brought back as data

def object_types(gitdir, oids):
    """{oid: its type} of the objects of `oids` the host repository has."""
    if not oids:
        return {}
    listing = host_git(gitdir, "cat-file", "--batch-check=%(objectname) %(objecttype)",
                       stdin="".join(oid + "\n" for oid in sorted(oids)).encode(), check=False)
    rows = (row.split(" ") for row in listing.stdout.decode("utf-8", "replace").splitlines())
    return {row[0]: row[1] for row in rows
            if len(row) == 2 and OID_RE.fullmatch(row[0]) and row[1] != "missing"}


def link_objects(gate_fd, dest):
    """Hard links in `dest` to the agent's loose objects and packs (a copy
    where a link is not allowed, MAX_OBJECT_COPY at most, never of a sparse
    file nor of one it cannot read: one left out makes the import fail, and
    the work is kept):
    only plain files, reached through directories that are not links. The
    container has stopped, so none of them can change any more. Made in
    `dest`.part, then renamed: a `dest` is whole. Returns how many there are."""
    import shutil
    part = dest + ".part"
    for leftover in (dest, part):  # (of a hand-back cut short: made again, whole)
        shutil.rmtree(leftover, ignore_errors=True)
    count, copied = 0, 0
    try:
        objects = open_dir("objects", gate_fd)
    except OSError:
        return 0
    try:
        for entry in os.scandir(objects):
            if re.fullmatch(r"[0-9a-f]{2}", entry.name):
                pattern = r"[0-9a-f]{38}(?:[0-9a-f]{24})?"
            elif entry.name == "pack":
                pattern = r"pack-[0-9a-f]{40,64}\.(?:pack|idx)"
            else:
                continue
            try:
                fd = open_dir(entry.name, objects)
            except OSError:
                continue
            try:
                for item in os.scandir(fd):
                    if not (re.fullmatch(pattern, item.name) and
                            item.is_file(follow_symlinks=False)):
                        continue
                    os.makedirs(os.path.join(part, entry.name), exist_ok=True)
                    target = os.path.join(part, entry.name, item.name)
                    try:
                        os.link(item.name, target, src_dir_fd=fd, follow_symlinks=False)
                    except OSError:  # not ours to link (protected_hardlinks)
                        try:
                            source = os.open(item.name, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=fd)
                        except OSError:  # (nor to read: left out)
                            continue
                        with os.fdopen(source, "rb") as reading:
                            info = os.fstat(reading.fileno())
                            copied += info.st_size
                            if info.st_blocks * 512 < info.st_size or copied > MAX_OBJECT_COPY:
                                continue
                            with open(target, "xb") as writing:
                                shutil.copyfileobj(reading, writing)
                    count += 1
            finally:
                os.close(fd)
    finally:
        os.close(objects)
    if os.path.isdir(part):
        os.rename(part, dest)
    return count


def note_commits(record, repo, tips, have):
    """The commits that came back (reachable from the agent's new refs and
    HEAD, `tips`, not from `have`), read by host git wherever they are
    (loose or packed), for the session log; and a note for those naming
    someone else as author or committer: a rebase keeps authors, and a
    hostile agent can write any name."""
    commits = sorted(oid for oid, kind in object_types(repo["gitdir"], tips).items()
                     if kind in ("commit", "tag"))
    if not commits:
        return
    listing = host_git(repo["gitdir"], "log", "--stdin", "-z", "--max-count=%d" % MAX_COMMITS_READ,
                       "--format=%H%x1f%an <%ae>%x1f%cn <%ce>%x1f%s",
                       stdin=("".join(oid + "\n" for oid in commits) +
                              "".join("^%s\n" % oid for oid in sorted(have))).encode(),
                       check=False)
    reached = []
    for entry in listing.stdout.decode("utf-8", "replace").split("\0"):
        fields = entry.split("\x1f")
        if len(fields) > 4 and OID_RE.fullmatch(fields[0]):  # (a separator in a name or subject)
            odd = "a name holding control characters"
            fields = [fields[0], odd, odd, "\x1f".join(fields[3:])]
        if len(fields) == 4:
            reached.append(fields)
    record["commits"] = [{"id": oid, "subject": clip(subject)}
                         for oid, _author, _committer, subject in reached]
    foreign = [(oid, who) for oid, author, committer, _subject in reached
               for who in (author, committer) if who != record.get("identity")]
    if foreign:
        record["notes"].append(
            "%s brought back name%s someone else as author or committer (%s: %s): a rebase "
            "keeps authors, and an agent can write any name" % (
                plural(len({oid for oid, _ in foreign}), "commit"),
                "" if len({oid for oid, _ in foreign}) > 1 else "s",
                foreign[0][0][:12], foreign[0][1]))


def import_objects(gitdir, incoming, wanted, have):
    """Into the host repository: the objects reachable from `wanted` and
    not from `have`, packed by host git from the linked ones, and checked
    on the way in, object by object and for completeness (index-pack
    --strict), the one piping into the other; PiError for objects that
    would cost too much unpacked (MAX_IMPORT_SIZE, MAX_IMPORT_RATIO)."""
    # (every object, or none: one git cannot read would leave the others
    # uncounted, and it need not be one the import reads)
    sizes = host_git(gitdir, "cat-file", "--batch-all-objects", "--batch-check=%(objectsize)",
                     env={"GIT_OBJECT_DIRECTORY": incoming},
                     memory=AGENT_OBJECTS_MEMORY).stdout.split()
    if not all(item.isdigit() for item in sizes):
        raise PiError("the sizes of its objects cannot be read")
    size = sum(int(item) for item in sizes)
    # (the disk the files take, each once, not the sizes a pack or its index
    # claims: a pack can be a hole, or one file under forty names)
    files = {(info.st_dev, info.st_ino): info.st_blocks * 512 for info in (
        os.lstat(os.path.join(folder, name))
        for folder, _folders, names in os.walk(incoming) for name in names)}
    taken = sum(files.values())
    if size > MAX_IMPORT_SIZE or size > 64 << 20 and size > MAX_IMPORT_RATIO * taken:
        raise PiError("its objects take %s and hold %s unpacked, more than a run brings back "
                      "(%s, or %d times what they take)" % (human_size(taken), human_size(size),
                                                           human_size(MAX_IMPORT_SIZE),
                                                           MAX_IMPORT_RATIO))
    revs = "".join(oid + "\n" for oid in sorted(wanted)) + "--not\n" + \
        "".join(oid + "\n" for oid in sorted(have))
    # (no delta search, and large blobs streamed, not held: what the agent
    # wrote costs the host its size, not minutes and gigabytes of memory)
    packing = host_git_process(gitdir, "-c", "core.bigFileThreshold=16m", "pack-objects",
                               "--revs", "--stdout", "-q", "--window=0",
                               env={"GIT_ALTERNATE_OBJECT_DIRECTORIES": incoming},
                               stdin=subprocess.PIPE, memory=AGENT_OBJECTS_MEMORY)
    indexing = host_git_process(gitdir, "-c", "core.bigFileThreshold=16m", "index-pack",
                                "--stdin", "--strict",
                                stdin=packing.stdout, memory=AGENT_OBJECTS_MEMORY)
    packing.stdout.close()  # index-pack alone reads it now
    packing.stdin.write(revs.encode())
    packing.stdin.close()
    try:
        index_err = indexing.communicate(timeout=HOST_GIT_TIMEOUT)[1]
    except subprocess.TimeoutExpired:
        for proc in (packing, indexing):
            proc.kill()
            proc.wait()
        raise PiError("git took more than %d s to take the agent's objects, and was stopped"
                      % HOST_GIT_TIMEOUT)
    pack_err = packing.stderr.read()
    if packing.wait() != 0:
        raise git_failure(("pack-objects",), pack_err)
    if indexing.returncode != 0:
        raise git_failure(("index-pack",), index_err)


def adopt_repository(record, gate_fd):
    """The agent made a repository in a project that had none: host git
    makes a clean one there (host git's own config and hooks) for what
    comes back. Returns its GitRepo record, or None with a note."""
    dot = os.path.join(record["target"], ".git")
    try:
        empty = stat.S_ISDIR(os.lstat(dot).st_mode) and not os.listdir(dot)
    except OSError:
        empty = False
    if not empty:
        record["notes"].append("the agent made a git repository, but %s is in the way: it was "
                               "not brought back" % dot)
        return None
    agent_config = (read_regular("config", 1 << 20, dir_fd=gate_fd) or b"").decode(
        "utf-8", "replace")
    sha256 = re.search(r"^\s*objectformat\s*=\s*sha256\s*$", agent_config, re.I | re.M)
    host_git(None, "init", "-q", *(["--object-format=sha256"] if sha256 else []), record["target"])
    fd = open_dir(dot)
    try:
        record["head"] = read_head(fd)
    finally:
        os.close(fd)
    record["repo"] = {"gitdir": dot, "common": dot, "linked": False, "modules": False}
    record["format"] = "sha256" if sha256 else "sha1"
    record["gate_config"] = ""
    return record["repo"]


def branches_checked_out_elsewhere(repo):
    """{branch: work tree} of the branches the repository's other work trees
    have checked out: moving one under it would leave that work tree wrong."""
    common = repo["common"]
    admin = [common] if repo["linked"] else []
    try:
        admin += [os.path.join(common, "worktrees", name)
                  for name in os.listdir(os.path.join(common, "worktrees"))]
    except OSError:
        pass
    elsewhere = {}
    for gitdir in admin:
        value = ref_value(read_regular(os.path.join(gitdir, "HEAD"), 4096))
        if gitdir == repo["gitdir"] or not (value and value.startswith("ref: ")):
            continue
        dot = read_regular(os.path.join(gitdir, "gitdir"), 4096) if gitdir != common else None
        elsewhere[value[5:]] = os.path.dirname(os.fsdecode(dot.strip())) if dot else \
            os.path.dirname(common)
    return elsewhere


# What a new branch or tag of the agent's may be named, short (refs/heads/,
# refs/tags/ taken off), to come back as it is.
PLAIN_REF_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/@+,-]*")


def ambiguous_ref(name, known, remotes=()):
    """A new branch or tag `name` is not to be taken as it is: host git
    would take it for another ref of `known`, or another for it (the
    names it tries for a short name), or for a remote's branch once
    fetched (REMOTE/..., a remote of `remotes`), or for a commit (a short
    name of hex digits, or git describe's NAME-N-gHEX), or it is not plain
    ASCII (a name that looks like another one, or that a prompt would print
    as something else)."""
    short = name.split("/", 2)[2]
    return bool(re.fullmatch(r"[A-Z_]*HEAD", short)) or not PLAIN_REF_NAME.fullmatch(short) or \
        any(short == remote or short.startswith(remote + "/") for remote in remotes) or \
        bool(re.fullmatch(r"[0-9a-f]{4,64}", short, re.I)) or \
        bool(re.search(r"-g[0-9a-f]{4,64}$", short, re.I)) or any(
            other != name and other in known for other in (
                "refs/" + short, "refs/tags/" + short, "refs/heads/" + short,
                "refs/remotes/" + short, "refs/remotes/%s/HEAD" % short))


def run_stamp(record):
    """The run's name under refs/pi-agent/ (refs/pi-agent/STAMP/heads/...)."""
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime(record["started"]))


def ref_updates(record, agent_refs, host_refs, elsewhere, current_branch=None):
    """The update-ref --stdin lines that bring the agent's ref changes back,
    by allow-list; notes for the user; and the refs left out ("OID NAME").
    Applied: branches moved, made or deleted compare-and-swap against what
    the run started from (one the user moved meanwhile, or that another
    work tree has checked out, is kept aside; a deleted one's tip is kept
    under refs/pi-agent/deleted/<run>/), and new tags (named in a note). Kept aside,
    under refs/pi-agent/<run>/, with one counted line: a new branch or tag
    whose short name another ref answers to (git would take one for the
    other: a tag main beside the branch main, a branch origin/main beside
    the remote's), and any other change: a moved tag, remote-tracking refs
    (git log origin/main.. would lie), replace refs (host git would show
    one object for another), notes, refs directly under refs/. Deletions
    of what is not a branch, or of a branch a work tree has checked out
    (`elsewhere`, or `current_branch`: this one's), are not applied. At most
    MAX_NEW_REFS refs are made; the others are left out."""
    seeded, lines, notes, aside, kept_deleted, left_out = record["refs"], [], [], [], [], []
    tags = []
    stamp = run_stamp(record)
    known, made = set(host_refs), 0
    remotes = {key[len("remote."):-len(".url")] for key, _value in record.get("git_config", ())
               if key.startswith("remote.") and key.endswith(".url")}
    for name in sorted(set(seeded) | set(agent_refs)):
        old, new = seeded.get(name), agent_refs.get(name)
        if old == new or name.startswith("refs/pi-agent/") or name == "refs/stash":
            continue
        if (old or "").startswith("ref: ") or (new or "").startswith("ref: "):
            notes.append("the agent changed the symbolic ref %s; that is not brought back" % name)
            continue
        current = host_refs.get(name)
        if current == new:
            continue
        line, branch, outside = None, name.startswith("refs/heads/"), False
        if branch and new is None and (name in elsewhere or name == current_branch):
            notes.append("the agent deleted %s, which %s has checked out: it stays" % (
                name, elsewhere.get(name, "your work tree")))
        elif branch and (current != old or (new and name in elsewhere)):
            if new:
                line = "create refs/pi-agent/%s/%s %s" % (stamp, name[len("refs/"):], new)
                why = ("is checked out in %s" % elsewhere[name] if current == old
                       else "moved on the host during the run")
                notes.append("%s %s, so the agent's is kept as refs/pi-agent/%s/%s: git log or "
                             "git merge it, then git update-ref -d it"
                             % (name, why, stamp, name[len("refs/"):]))
            else:
                notes.append("the agent deleted %s, which moved on the host meanwhile: kept" % name)
        elif (branch or name.startswith("refs/tags/") and old is None and current is None) \
                and not (old is None and ambiguous_ref(name, known, remotes)):
            if new is None:  # (its reflog goes with it: the tip is kept, where no ref
                # of the agent's can be set aside: those are refs/pi-agent/STAMP/...)
                line = "delete %s %s" % (name, old)
                lines.append("create refs/pi-agent/deleted/%s/%s %s"
                             % (stamp, name[len("refs/"):], old))
                notes.append("the agent deleted %s (it was %s, now refs/pi-agent/deleted/%s/%s: "
                             "git update-ref -d it when you are sure)"
                             % (name, old[:12], stamp, name[len("refs/"):]))
            elif old is None:
                line = "create %s %s" % (name, new)
            else:
                line = "update %s %s %s" % (name, new, old)
        elif new:
            line = "create refs/pi-agent/%s/%s %s" % (stamp, name[len("refs/"):], new)
            outside = True
        else:
            kept_deleted.append(name)
        if line and line.startswith("create ") and host_refs.get(line.split(" ")[1]) == new:
            line = None  # (made by a hand-back cut short)
        if line and line.startswith("create "):
            made += 1
            if made > MAX_NEW_REFS:
                left_out.append("%s %s" % (new, name))
                continue
            known.add(line.split(" ")[1])
        if line:
            lines.append(line)
            if line.startswith("create refs/tags/"):
                tags.append(name[len("refs/tags/"):])
        if outside:
            aside.append(name)
    if tags:  # (a name upstream has and you have not fetched is the agent's from now on)
        notes.append("the agent made %s: %s" % (plural(len(tags), "tag"), ", ".join(
            tags[:3] + ["..."] * (len(tags) > 3))))
    if aside or kept_deleted:
        names = aside + kept_deleted
        notes.append("%s of the agent's %s not applied, as a run brings back only branches "
                     "and new tags (%s)%s%s" % (
                         plural(len(names), "ref change"), "was" if len(names) == 1 else "were",
                         ", ".join(names[:3] + ["..."] * (len(names) > 3)),
                         "; kept as refs/pi-agent/%s/... (git for-each-ref refs/pi-agent/%s)"
                         % (stamp, stamp) if aside else "",
                         "; deletions of %s left undone" % plural(len(kept_deleted), "ref")
                         if kept_deleted else ""))
    return lines, notes, left_out


def apply_index(record, repo, gate_fd, hash_len, wanted):
    """The agent's staging area, as host git is to apply it to the host's
    index (see index_changes): only if the host's is as the run found it
    (else the user's staging wins). Adds the objects it needs to `wanted`;
    returns the `git update-index -z --index-info` input, or None."""
    try:
        info = os.stat("index", dir_fd=gate_fd, follow_symlinks=False)
    except OSError:
        return None
    if [info.st_size, info.st_mtime_ns] == record.get("gate_index"):
        return None
    host_path = os.path.join(repo["gitdir"], "index")
    try:
        now = os.lstat(host_path)
        host_now = [now.st_size, now.st_mtime_ns, now.st_ino]
    except OSError:
        host_now = None
    if host_now != record.get("index"):
        record["notes"].append("the staging area (index) changed on the host during the run: "
                               "yours stays, and what the agent staged is not applied")
        return None
    # Bounded by the host's: an index of millions of entries that need no
    # object (gitlinks) would cost this process gigabytes, and every later
    # git status its size.
    walking = WALKED_INDEXES.get((host_path,) + tuple(host_now or ()))
    if walking is not None:
        walking.join()
    walked = walking and walking.walked  # (else read and walked now)
    host_data = b"" if walked or not host_now else read_regular(host_path, 1 << 30)
    agent_data = read_regular("index", (host_now or [0])[0] + (64 << 20), dir_fd=gate_fd)
    host_entries = len(walked[1]) - 1 if walked else (
        struct.unpack_from(">L", host_data, 8)[0] if len(host_data or b"") >= 12 else 0)
    try:
        if agent_data is None:
            raise ValueError("it is not a file, or it is 64 MB larger than yours")
        more = (struct.unpack_from(">L", agent_data, 8)[0] if len(agent_data) >= 12 else 0) - \
            host_entries
        if more > MAX_NEW_INDEX_ENTRIES:
            raise ValueError("it has %d entries more than yours" % more)
        changes, needed = index_changes(agent_data, host_data, hash_len, walked)
    except ValueError as err:
        record["notes"].append("the agent's staging area (index) is not applied: %s" % err)
        return None
    wanted.update(needed)
    return b"".join(b"%o %s %d\t%s\0" % (mode, oid.hex().encode(), stage, path)
                    for path, stage, mode, oid in changes) or None


def write_host_index(repo, index, record):
    """The agent's staging changes into the host's index, by host git
    (its index.lock, its tree cache, its racy-git rules)."""
    result = host_git(repo["gitdir"], "update-index", "-z", "--index-info", stdin=index,
                      check=False)
    if result.returncode != 0:
        record["notes"].append("the agent's staging area (index) is not applied: %s" % (
            result.stderr.decode(errors="replace").strip().splitlines() or ["git failed"])[-1])


def state_file_ok(name, text):
    if name in ("MERGE_MSG", "MERGE_MODE"):
        return True
    lines = text.split()
    return bool(lines) and all(OID_RE.fullmatch(oid) for oid in lines)


def apply_state_files(record, repo, agent_state):
    """A merge (or cherry-pick, revert) the agent finished or started: the
    host's files follow, unless the user changed them meanwhile."""
    for name in GIT_STATE_FILES:
        before, after = record["state"].get(name), agent_state.get(name)
        if before == after or name == "ORIG_HEAD":
            continue  # (ORIG_HEAD: no one sees it, and git reset --hard ORIG_HEAD trusts it)
        path = os.path.join(repo["gitdir"], name)
        now = read_regular(path, 16 << 20)
        if (None if now is None else now.decode("utf-8", "replace")) != before:
            record["notes"].append("%s changed on the host during the run: yours stays" % name)
        elif after is None:
            os.remove(path)
        elif state_file_ok(name, after):
            replace_file(path, after.encode(), 0o644)


def keep_gate(run_dir, gate_fd, record, why):
    """Git data that could not come back is kept, not lost, and cannot run:
    STATE/kept/CONTAINER holds the agent's objects (plain files with an
    object's name, as linked for the import) and its refs (a packed-refs
    written here from what was read, unless there are too many to read),
    nothing else. No HEAD, config or hooks: no git takes it, or anything in
    it, for a repository. Made in CONTAINER.part, then renamed: a keep cut
    short is made again, one done is not."""
    import shutil
    try:
        refs = read_ref_store(gate_fd, len(record.get("refs") or ()) + MAX_AGENT_REFS)
    except (ValueError, OSError):
        refs = None
    kept = os.path.join(os.path.dirname(os.path.dirname(run_dir)), KEPT_DIR,
                        os.path.basename(run_dir))
    part, incoming = kept + ".part", os.path.join(run_dir, "incoming")
    try:
        os.makedirs(os.path.dirname(kept), mode=0o700, exist_ok=True)
        if not (os.path.isdir(kept) and os.listdir(kept)):  # (an empty one is renamed over)
            shutil.rmtree(part, ignore_errors=True)
            os.mkdir(part, 0o700)
            if not os.path.isdir(incoming):
                link_objects(gate_fd, incoming)
            if os.path.isdir(incoming):
                os.rename(incoming, os.path.join(part, "objects"))
            if refs:
                write_file(os.path.join(part, "packed-refs"), "".join(
                    "%s %s\n" % (oid, name) for name, oid in sorted(refs.items())
                    if OID_RE.fullmatch(oid)).encode())
            if not set(os.listdir(part)) <= {"objects", "packed-refs"} or \
                    looks_like_git_dir(part) or looks_like_git_dir(os.path.join(part, "objects")):
                raise OSError("what was kept is not data alone")
            os.rename(part, kept)
        where = ("its objects and refs are kept in %s, as data (no HEAD, config or hooks); to "
                 "look (the agent's data: git held to 1 GB): git init -q --bare %s.look && "
                 "cp -r %s/. %s.look && (ulimit -d 1048576 && git --git-dir %s.look log --all)"
                 % ((kept,) * 5))
    except OSError as err:
        where = "it could not be kept (%s)" % err
    record["notes"].append("the agent's git work %s (%s); %s" % (
        "came back only in part (the refs pi-log lists moved)" if record.get("moved")
        else "could not be brought back", why, where))


def agent_stash(gate):
    """The agent's stash entries, read as the rest of its git directory is."""
    return stash_entries(read_beneath(gate, "logs", "refs", "stash"))


def agent_git_work(record, gate, gate_fd):
    """What the agent left in its git directory: HEAD, refs (ValueError
    for a store past MAX_AGENT_REFS more than it was given), operation
    files, stash entries."""
    head, stash = read_head(gate_fd), agent_stash(gate)
    refs = read_ref_store(gate_fd, len(record["refs"]) + MAX_AGENT_REFS)
    state = {}
    for name in GIT_STATE_FILES:
        data = read_regular(name, 16 << 20, dir_fd=gate_fd)
        state[name] = None if data is None else data.decode("utf-8", "replace")
    return head, refs, state, stash


def list_left_out(run_dir, record, left_out):
    """The new refs past MAX_NEW_REFS: named in STATE/kept/CONTAINER.refs
    (1 MB of them at most), never made."""
    path = os.path.join(os.path.dirname(os.path.dirname(run_dir)), KEPT_DIR,
                        os.path.basename(run_dir) + ".refs")
    try:
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        write_file(path, "".join(line + "\n" for line in left_out).encode()[:1 << 20], 0o600)
        where = "they are listed in %s" % path
    except OSError as err:
        where = "their list could not be written (%s)" % err.strerror
    record["notes"].append("the agent made %d new refs more than the %d a run brings back: "
                           "those are not made, and their objects not taken; %s"
                           % (len(left_out), MAX_NEW_REFS, where))


def ref_move(line):
    """{ref, old, new} of an update-ref --stdin line."""
    verb, name, *ids = line.split(" ")
    old = ids[-1] if verb in ("update", "delete") else None
    return {"ref": clip(name), "old": old, "new": ids[0] if verb != "delete" else None}


def apply_ref_lines(repo, lines, message, record):
    """update-ref --stdin, all at once; if that fails (a name clash with a
    ref the user made meanwhile, say), one by one, so one failure costs
    one ref: a branch or tag that cannot be moved is kept under
    refs/pi-agent/<run>/ instead (its commits must stay reachable), else it
    is named with its object ID. The refs moved go into record["moved"]
    (for the session log)."""
    moved = record.setdefault("moved", [])
    try:
        host_git(repo["gitdir"], "update-ref", "--stdin", "-m", message,
                 stdin="".join(line + "\n" for line in lines).encode())
        moved.extend(ref_move(line) for line in lines)
        return
    except PiError:
        pass
    for line in lines:
        try:
            host_git(repo["gitdir"], "update-ref", "--stdin", "-m", message,
                     stdin=(line + "\n").encode())
            moved.append(ref_move(line))
        except PiError as err:
            verb, name, *ids = line.split(" ")
            if verb != "delete" and not name.startswith("refs/pi-agent/"):
                kept = "refs/pi-agent/%s/%s" % (run_stamp(record), name[len("refs/"):])
                try:
                    host_git(repo["gitdir"], "update-ref", "-m", message, kept, ids[0], "")
                    moved.append({"ref": kept, "old": None, "new": ids[0]})
                    record["notes"].append("could not move %s (%s), so the agent's is kept as %s:"
                                           " git log or git merge it" % (name, err, kept))
                    continue
                except PiError:
                    pass
            record["notes"].append("could not %s %s%s: %s" % (
                verb, name, " to " + ids[0] if verb != "delete" else "", err))


def move_refs(record, repo, lines, head, elsewhere):
    """The ref changes `lines` (ref_updates'), then HEAD, through host git
    (its reflogs say pi-agent)."""
    message = "pi-agent: %s in %s" % (record["kind"], record["container"])
    try:
        if lines:
            apply_ref_lines(repo, lines, message, record)
        if sum(line.startswith("create ") for line in lines) > 100:
            host_git(repo["gitdir"], "pack-refs", "--all", check=False)  # (not an inode each)
        if head is None or head == record["head"]:
            return
        now = ref_value(read_regular(os.path.join(repo["gitdir"], "HEAD"), 4096))
        if now != record["head"]:
            record["notes"].append("HEAD changed on the host during the run: it stays (the "
                                   "agent's was %s)" % head)
        elif head[5:] in elsewhere:
            record["notes"].append("the agent checked out %s, which %s has checked out: HEAD "
                                   "stays" % (head[5:], elsewhere[head[5:]]))
        elif head.startswith("ref: refs/heads/") and host_git(
                repo["gitdir"], "rev-parse", "--verify", "--quiet", head[5:],
                check=False).returncode != 0:
            record["notes"].append("the agent checked out %s, which did not come back: HEAD "
                                   "stays" % head[5:])
        elif head.startswith("ref: refs/heads/"):
            host_git(repo["gitdir"], "symbolic-ref", "-m", message, "HEAD", head[5:])
            record.setdefault("moved", []).append(
                {"ref": "HEAD", "old": clip(record["head"] or ""), "new": clip(head)})
        elif OID_RE.fullmatch(head):
            host_git(repo["gitdir"], "update-ref", "--no-deref", "-m", message, "HEAD", head)
            record.setdefault("moved", []).append(
                {"ref": "HEAD", "old": clip(record["head"] or ""), "new": head})
    except PiError as err:
        record["notes"].append("the agent's branches could not all be moved: %s" % err)


def stash_commits(gitdir, oids):
    """Those of `oids` that can be stash entries: commits with two or three
    parents."""
    commits = [oid for oid, kind in object_types(gitdir, oids).items() if kind == "commit"]
    if not commits:
        return set()
    listing = host_git(gitdir, "log", "--no-walk=unsorted", "--stdin", "--format=%H %P",
                       stdin="".join(oid + "\n" for oid in commits).encode(), check=False)
    return {row.split(" ")[0] for row in listing.stdout.decode().splitlines()
            if len(row.split(" ")) in (3, 4)}


def carry_stash(record, repo, entries):
    """Stash entries the agent made become the host's (git stash list), in
    its order; one of the user's it dropped stays. An entry the host has
    already (brought back by a hand-back cut short) is not made twice."""
    known, new = set(record.get("stash") or ()), []
    here = {oid for oid, _message in stash_entries(read_beneath(repo["common"], "logs", "refs",
                                                                "stash"))}
    for oid, message in entries:
        if oid not in known and oid not in here:
            known.add(oid)
            new.append((oid, message))
    if len(new) > MAX_NEW_STASH:
        record["notes"].append("the agent made %d stash entries; the newest %d come back" % (
            len(new), MAX_NEW_STASH))
    new = new[-MAX_NEW_STASH:]
    # (another object would hide all of git stash list, yours too)
    shaped = stash_commits(repo["gitdir"], [oid for oid, _message in new])
    odd = [oid for oid, _message in new if oid not in shaped]
    if odd:
        record["notes"].append("the agent's stash names %s that %s not a stash entry (a commit "
                               "with two or three parents): not brought back (%s)" % (
                                   plural(len(odd), "object"), "is" if len(odd) == 1 else "are",
                                   ", ".join(odd[:3])))
    for oid, message in new:
        if oid in shaped:
            host_git(repo["gitdir"], "update-ref", "--create-reflog", "-m",
                     clip(message or "stash"), "refs/stash", oid)
    if known - {oid for oid, _message in entries}:
        record["notes"].append("the agent dropped stash entries of yours; they are kept "
                               "(git stash list)")


def keep_agent_config(record, repo, gate_fd):
    """The agent's own git settings (remotes it added, say) stay its own;
    a copy is left where the user can read it, never where git reads it."""
    text = (read_regular("config", 1 << 20, dir_fd=gate_fd) or b"").decode("utf-8", "replace")
    if not text or text_digest(text) == record.get("gate_config") or \
            record.get("gate_config") == "" and \
            not re.search(r"^\s*\[(?!core\])", text, re.M):
        return  # (a repository it made: git init's own [core] is nothing to report)
    path = os.path.join(repo["gitdir"], "pi-agent", "agent-config")
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        replace_file(path, text.encode(), 0o644)
    except OSError:
        return
    record["notes"].append("the agent changed its git config (remotes, settings); yours is "
                           "unchanged, and its version is in %s" % path)


def hand_back_git(run_dir, record, keep=None):
    """What the agent did to git, brought back as data (see above); notes
    for the user go to record["notes"]. Done once: the private directory is
    then marked done, and whoever ends the run again (the saver, recovery)
    finds nothing more to bring back. With `keep` (why), it is all kept
    aside (keep_gate) and host git is not run on the repository."""
    gate = os.path.join(run_dir, GATE_DIR)
    try:
        gate_fd = open_dir(gate)
    except FileNotFoundError:
        return  # (brought back already)
    except OSError as err:
        record["notes"].append("the agent's git work could not be brought back: its git "
                               "directory cannot be read (%s)" % err.strerror)
        return
    try:
        if keep:
            keep_gate(run_dir, gate_fd, record, keep)
            os.rename(gate, gate + ".done")
            return
        if record["repo"] is None:
            if read_head(gate_fd) is None:
                return  # the agent made no repository
            record["refs"], record["state"] = {}, {}
            if adopt_repository(record, gate_fd) is None:
                return
        repo = record["repo"]
        try:
            head, refs, state, stash = agent_git_work(record, gate, gate_fd)
        except ValueError as err:
            keep_gate(run_dir, gate_fd, record, "its git directory: %s" % err)
            os.rename(gate, gate + ".done")
            return
        elsewhere = branches_checked_out_elsewhere(repo)
        here = ref_value(read_regular(os.path.join(repo["gitdir"], "HEAD"), 4096)) or ""
        lines, notes, left_out = ref_updates(record, refs, host_ref_store(repo["common"]),
                                             elsewhere, here[5:] if here.startswith("ref: ")
                                             else None)
        record["notes"].extend(notes)
        tips = {line.split(" ")[2] for line in lines if not line.startswith("delete ")}
        if head and OID_RE.fullmatch(head):
            tips.add(head)
        wanted = tips | {oid for oid, _message in stash if oid not in record.get("stash", ())}
        for name, text in state.items():
            if text and name not in ("MERGE_MSG", "MERGE_MODE"):
                wanted.update(oid for oid in text.split() if OID_RE.fullmatch(oid))
        hash_len = 32 if record.get("format") == "sha256" else 20
        index = apply_index(record, repo, gate_fd, hash_len, wanted)
        have = {oid for oid in record["refs"].values() if OID_RE.fullmatch(oid)}
        have.update(record.get("stash", ()))
        incoming = os.path.join(run_dir, "incoming")
        # (nothing linked is nothing new only if the host has what the refs
        # name: the agent can make its objects unreadable)
        if wanted - have and (link_objects(gate_fd, incoming) or
                               wanted - have - set(object_types(repo["gitdir"], wanted - have))):
            try:
                import_objects(repo["gitdir"], incoming, wanted, have)
            except PiError as err:
                keep_gate(run_dir, gate_fd, record, err)
                os.rename(gate, gate + ".done")
                return
            note_commits(record, repo, tips, have)
        if left_out:
            list_left_out(run_dir, record, left_out)
        move_refs(record, repo, lines, head, elsewhere)
        try:
            carry_stash(record, repo, stash)
        except PiError as err:
            record["notes"].append("the agent's stash could not be brought back: %s" % err)
        if index is not None:
            write_host_index(repo, index, record)
        apply_state_files(record, repo, state)
        keep_agent_config(record, repo, gate_fd)
        os.rename(gate, gate + ".done")
    except Exception as err:  # (a fault of ours: the work is kept, not lost with the run directory)
        keep_gate(run_dir, gate_fd, record, "an unexpected error: %s" % err)
        os.rename(gate, gate + ".done")
    finally:
        os.close(gate_fd)


# ------------------------------------------------------------------ the sweep
#
# After a run, in the project: what the host must not trust is disarmed, given
# back or named; what cannot be, stops the next run.

UNTRUSTED_SUFFIX = ".pi-agent-untrusted-"
# The sweep's rounds at most (each opens what the last could not look into).
SWEEP_ROUNDS = 100


def set_aside(full):
    """Rename `full` to a name no one could have taken first (UNTRUSTED_SUFFIX
    and a random part), so that git no longer takes it for what it was;
    returns the new name, or None when the rename failed (its directory is
    not the user's) or `full` is there still."""
    aside = full + UNTRUSTED_SUFFIX + os.urandom(8).hex()
    try:
        os.rename(full, aside)
    except OSError:
        return None
    return None if os.path.lexists(full) else aside


def still_armed(target, path, kind):
    """What a disarm was for is there still: `kind` "dir", a git directory
    git would find at `path`; any other ("file"; "deep", a directory whose
    tree is too deep to look at; "unswept", one the sweep could not look
    through), `path` is there."""
    full = os.path.join(target, path)
    return looks_like_git_dir(full) if kind == "dir" else os.path.lexists(full)


def stale_socket(path):
    """Nothing listens on the socket: the container that made it is gone."""
    import socket
    probe = socket.socket(socket.AF_UNIX)
    try:
        probe.connect(path)
        return False
    except ConnectionRefusedError:
        return True
    except OSError:
        return False
    finally:
        probe.close()


def protected_swaps(record):
    """[(path, what)]: what to disarm so that host git reads the user's own
    config and hooks again. What it reads in the project is read-only
    inside, yet a directory above can be renamed away and the path made
    anew, or made to lead elsewhere by a link (the seed refused any link
    on the way: one there now was made during the run)."""
    target, swaps = record["target"], []
    for path, dev, ino in record.get("protected", ()):
        relative = os.path.relpath(path, target)
        link = link_on_the_way(target, relative)
        if link:
            swaps.append((link, "a symbolic link made during the run in the way of %s, which "
                          "your git config reads" % relative))
            continue
        try:
            info = os.lstat(path)
        except OSError:
            continue
        if (info.st_dev, info.st_ino) != (dev, ino):
            swaps.append((relative, "which your git config reads, made anew during the run "
                          "(yours was moved away)"))
    return swaps


def sweep_project(record, found):
    """What a run left in the project that the host must not trust: git
    directories and .git files that appeared (disarmed), and, newer than
    the run, what is privileged (setuid/setgid bits cleared, device nodes
    removed), FIFOs (removed), sockets nothing listens on (removed: one
    would refuse the next run), what another user owns. Returns (notes, paths only root can fix,
    directories to look into again once fixed)."""
    target, uid = record["target"], record["uid"]
    since = int((record["started"] - 1) * 1e9)
    trusted = {tuple(pair) for pair in record["git_dirs"]}
    notes, for_root, reopen = [], [], []

    def swept(path, action):  # for the session log
        record.setdefault("swept", []).append({"path": clip(path, 300), "action": action})

    def disarm(path, what):
        full = os.path.join(target, path)
        if not physical(target, os.path.dirname(path)):
            # Never renamed through a link (that would move a file outside
            # the project): it stays armed, which stops the next run.
            record.setdefault("disarmed", {})[path] = "unswept"
            return
        # (checked once the sweep is over: one that failed stops the next run)
        if os.path.basename(path) == "HEAD":
            record.setdefault("disarmed", {})[os.path.dirname(path)] = "dir"
        else:
            record.setdefault("disarmed", {})[path] = "file"
        aside = set_aside(full)
        if aside:
            swept(path, "disabled")
            notes.append("disabled %s, %s (host git would run its config and hooks): it is "
                         "now %s; read it before you rename it back"
                         % (path or ".", what, os.path.basename(aside)))
        else:
            for_root.append(os.path.dirname(path))
            reopen.append(os.path.dirname(path))

    for path, info in found:
        full, name, parent = os.path.join(target, path), os.path.basename(path), \
            os.path.dirname(path)
        try:
            if name in GIT_DIR_PARTS and os.path.lexists(os.path.join(target, parent, "HEAD")):
                directory = os.lstat(os.path.join(target, parent))
                if (directory.st_dev, directory.st_ino) not in trusted and \
                        looks_like_git_dir(os.path.join(target, parent)):
                    disarm(os.path.join(parent, "HEAD"), "the HEAD of a git directory made "
                           "during the run")
                    continue
            if name == ".git" and not stat.S_ISDIR(info.st_mode) and \
                    record["git_files"].get(path) != [info.st_dev, info.st_ino, info.st_ctime_ns]:
                disarm(path, "a .git file written during the run, which could send host git to "
                       "a directory of the agent's")
                continue
            if info.st_ctime_ns < since:
                continue
            mode = info.st_mode
            if stat.S_ISBLK(mode) or stat.S_ISCHR(mode):
                os.unlink(full)
                swept(path, "removed device node")
                notes.append("removed %s, a device node made during the run" % path)
            elif info.st_uid != uid:
                for_root.append(path)
                if stat.S_ISDIR(mode):
                    reopen.append(path)
            elif stat.S_ISFIFO(mode):  # (host git, reading one as .gitignore, waits for ever)
                os.unlink(full)
                swept(path, "removed FIFO")
                notes.append("removed %s, a FIFO made during the run" % path)
            elif stat.S_ISSOCK(mode):
                if stale_socket(full):
                    os.unlink(full)
                    swept(path, "removed socket")
                    notes.append("removed %s, a socket the agent left" % path)
            elif stat.S_ISDIR(mode) and mode & 0o500 != 0o500:
                os.chmod(full, stat.S_IMODE(mode) | 0o500)  # what it hides must be seen
                reopen.append(path)
            elif mode & (stat.S_ISUID | stat.S_ISGID) and not stat.S_ISDIR(mode):
                os.chmod(full, stat.S_IMODE(mode) & ~(stat.S_ISUID | stat.S_ISGID))
                swept(path, "cleared setuid/setgid")
                notes.append("cleared the setuid/setgid bit of %s" % path)
        except FileNotFoundError:
            continue
        except OSError:
            for_root.append(path)
    for path, what in protected_swaps(record):
        disarm(path, what)
    return notes, sorted(set(for_root)), sorted(set(reopen))


# Run as root in a container of REPO:base (never current: the agent's),
# with only the project mounted: what the host user cannot do themselves.
GIVE_BACK_SCRIPT = """owner=$0
find "$@" -xdev \\( -type b -o -type c \\) -execdir rm -f {} +
chown -hR "$owner" "$@"
find "$@" -xdev ! -type l ! -type d \\( -perm -4000 -o -perm -2000 \\) -execdir chmod ug-s {} +
true"""


def give_back(line, root, paths, uid, gid):
    """Give `paths` (relative to root; "" for root itself) back to the user,
    as root: device nodes removed, owner the user (as the engine maps the
    user inside: root itself on rootless Docker), no setuid/setgid bit.
    The paths go on standard input, however many. Each is then looked at
    on the host: one that is not the user's yet is said so, with the
    command that fixes it. Returns notes."""
    paths = outermost(paths) if "" not in paths else [""]
    base = inspect_image(line.base)
    if base is None:
        return ["%s is not yours and could not be given back (%s is missing); run: sudo chown "
                "-R %d:%d %s" % (path or ".", line.base, uid, gid, os.path.join(root, path))
                for path in paths]
    engine = line.engine
    docker("run", "--rm", "-i", "--label", MINE, "--network", "none", "-u", "0",
           *engine.run_args(), "--cap-drop", "ALL", "--cap-add", "CHOWN", "--cap-add", "FOWNER",
           "--cap-add", "DAC_OVERRIDE", "--entrypoint", "sh", "-w", "/pi-agent-fix",
           "--mount", mount_spec(root, "/pi-agent-fix"), base["Id"],
           "-c", 'exec xargs -0 -r sh -c "$1" "$0"', "%d:%d" % engine.inside(uid, gid),
           GIVE_BACK_SCRIPT, feed="".join("./%s\0" % path for path in paths))
    notes = []
    for path in paths:
        try:
            owner = os.lstat(os.path.join(root, path)).st_uid
        except FileNotFoundError:
            owner = uid  # (a device node, removed)
        except OSError:
            owner = None
        notes.append("gave %s back to you: it was another user's or privileged" % (path or ".")
                     if owner == uid else "could not give %s back to you (it is UID %s's on "
                     "the host); run: sudo chown -R %d:%d %s" % (
                         path or ".", owner, uid, gid, os.path.join(root, path)))
    return notes


def reachable_part(target, path):
    """The part of `path` (relative to target) that a path can still name,
    with some room to spare: where what is too deep below it starts."""
    parts, kept = path.split("/"), []
    for part in parts[:-1]:
        if len(os.path.join(target, *kept, part)) > 2048:
            break
        kept.append(part)
    return "/".join(kept or parts[:1])


def sweep(line, record, found, predicate, problems=()):
    """sweep_project() on what was found, and again on what it could not
    look into until it was given back (or made readable), as many rounds
    as that takes. What find listed but could not be looked at
    (`problems`): a path deeper than a path can be goes to root (given
    back, made unprivileged) and is an alarm; one in a directory the user
    cannot search is looked at again. Returns notes.
    What it could not disarm or look into, or what was too deep to, is
    record["armed"]: see end_run."""
    notes, target, reopen, last = [], record["target"], [], None
    disarmed = record.setdefault("disarmed", {})
    for _ in range(SWEEP_ROUNDS):
        swept, for_root, reopen = sweep_project(record, found)
        for path, number in problems:
            if number == errno.ENAMETOOLONG:
                deep = reachable_part(target, path)
                disarmed[deep] = "deep"
                for_root.append(deep)
            else:  # (its directory, made searchable or given back, is looked at again)
                reopen.append(os.path.dirname(path))
        notes += swept
        if for_root:
            try:
                notes += give_back(line, target, for_root, record["uid"], record["gid"])
                record.setdefault("swept", []).extend(
                    {"path": clip(path or ".", 300), "action": "given back"} for path in for_root)
            except PiError as err:
                notes.append("could not give back %s: %s" % (", ".join(for_root[:5]), err))
        if not reopen or set(reopen) == last:
            break
        last = set(reopen)
        try:
            scan = ProjectScan(target, predicate, record["gated"], ["./" + path for path in reopen]
                               if len(reopen) <= MAX_SCAN_STARTS else ["."])
            found, problems = scan.results(), scan.problems
            if scan.truncated:
                disarmed[""] = "unswept"
        except PiError:
            break
    for path in reopen:
        disarmed.setdefault(path, "unswept")
    record["armed"] = sorted(path for path, kind in disarmed.items()
                             if still_armed(target, path, kind))
    return notes


def armed_paths(state_dir, target):
    """{relative path: kind} of what earlier runs' sweeps could not make
    safe in `target` (see still_armed)."""
    try:
        entries = json.loads(read_regular(project_file(state_dir, target, ".armed")) or b"{}")
    except ValueError:
        return {}
    paths = entries.get("paths") if isinstance(entries, dict) else None
    return {path: kind for path, kind in paths.items() if isinstance(kind, str)} \
        if isinstance(paths, dict) else {}


def disarm_advice(paths, target, record_file):
    """What the user does about armed `paths`: remove them (never the
    project, `target`: its record goes instead, once it has been looked at)."""
    doomed = [path for path in map(os.path.normpath, paths) if path != target][:3]
    return ("look, then remove %s (rm -rf %s); if yours and safe: rm %s" % (
        "it" if len(doomed) == 1 else "them", " ".join(map(shlex.quote, doomed)), record_file)
        if doomed else "look through it, then rm %s" % record_file)


def keep_armed(line, record):
    """What the sweep could not make safe, written down: a later run in the
    project, or in a part of it, stops until it is gone (check_armed).
    Returns the loud note."""
    target = record["target"]
    entries = armed_paths(line.state_dir, target)
    entries.update((path, record["disarmed"][path]) for path in record["armed"])
    path = project_file(line.state_dir, target, ".armed")
    try:
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        replace_file(path, json.dumps({"target": target, "paths": entries}).encode())
    except OSError as err:
        line.log("could not write %s: %s" % (path, err.strerror))
    return Alarm("could not make %s safe (a git directory or .git file the agent made, a "
                 "directory too deep or that the sweep could not look through): host git, or "
                 "a program there, could run what the agent left; %s; pi-agent runs nothing "
                 "more in %s until then" % (", ".join(record["armed"][:3]) or ".", disarm_advice(
                     [os.path.join(target, path) for path in record["armed"]], target, path),
                     target))


def check_armed(state_dir, target, forget=False):
    """Refused while an earlier run left something armed that a run in
    `target` would reach (in it, or it in that); with `forget`, the record
    of a project whose armed paths are all gone is dropped."""
    directory = os.path.join(state_dir, "projects")
    try:
        names = [name for name in os.listdir(directory) if name.endswith(".armed")]
    except OSError:
        return
    for name in names:
        try:
            entries = json.loads(read_regular(os.path.join(directory, name)) or b"{}")
            armed_in = entries["target"]
            paths = armed_paths(state_dir, armed_in)
        except (ValueError, KeyError, TypeError):
            continue
        armed = sorted(os.path.normpath(os.path.join(armed_in, path))
                       for path, kind in paths.items() if still_armed(armed_in, path, kind))
        near = [path for path in armed if is_within(path, target) or is_within(target, path)]
        if near:
            raise Refused("refusing to run in %s: an earlier run left %s, which pi-agent could "
                          "not make safe (host git, or a program there, could run what the agent "
                          "left); %s" % (target, ", ".join(near[:3]), disarm_advice(
                              near, armed_in, os.path.join(directory, name))))
        if not armed and forget:
            try:
                os.remove(os.path.join(directory, name))
            except FileNotFoundError:
                pass


# A session record lists this many commits, refs and swept files at most;
# the wrapper sends them to the saver on a pipe, whose buffer (64 kB on
# Linux) must not fill before the saver reads: SUMMARY_BYTES at most.
SUMMARY_LIMIT = 50
SUMMARY_BYTES = 16384


def run_summary(record):
    """What end_run brought back and swept, for the session log."""
    commits = record.get("commits") or []
    return {"commits": commits[:SUMMARY_LIMIT], "commits_total": len(commits),
            "refs": (record.get("moved") or [])[:SUMMARY_LIMIT],
            "swept": (record.get("swept") or [])[:SUMMARY_LIMIT]}


def summary_message(summary):
    """run_summary() as one line of JSON of SUMMARY_BYTES at most (its
    lists cut short if need be: the agent writes the subjects and names)."""
    summary = dict(summary)
    while True:
        message = json.dumps(summary)
        lists = [key for key in ("commits", "refs", "swept") if summary.get(key)]
        if len(message) <= SUMMARY_BYTES or not lists:
            return message
        for key in lists:
            summary[key] = summary[key][:len(summary[key]) // 2]


def end_run(line, run_dir, record, watch=None):
    """Everything a finished run leaves to do in the project before the
    user can act on it: git back through the gate, the private git
    directory gone, the sweep (and what only root can fix), a word on files
    the host runs by itself. Returns lines for the user. The container must
    have stopped. Safe to repeat: whoever ends the run does it (the
    wrapper; the saver or recovery when the wrapper is gone)."""
    target, predicate = record["target"], scan_after(record["uid"])
    scan, found, problems = None, None, []
    try:
        found = watch.found(predicate, record["gated"]) if watch else None
    except Exception:  # (whatever the agent made of the tree, all of it is looked at)
        found = None
    if found is None:
        try:
            scan = ProjectScan(target, predicate, record["gated"])
        except PiError as err:  # (not a project gone: one that cannot be looked at)
            found = []
            if os.path.lexists(target):
                record.setdefault("disarmed", {})[""] = "unswept"
                record.setdefault("notes", []).append(str(err))
    record["notes"] = record.get("notes") or []
    # Host git reads the repository's config, which may include a file in
    # the project: not while the agent has swapped one (the sweep below
    # disarms it).
    swaps = [path for path, _what in protected_swaps(record)]
    try:
        hand_back_git(run_dir, record, swaps and "%s, which your git config reads, was swapped "
                      "during the run" % ", ".join(swaps[:3]))
    except Exception as err:  # whatever went wrong, the sweep below must happen
        record["notes"].append("the agent's git work could not be brought back: %s" % err)
    notes = record["notes"]
    if record.get("made_dot"):
        try:  # the mount point of a project with no repository, if nothing came of it
            os.rmdir(os.path.join(target, ".git"))
        except OSError:
            pass
    if scan is not None:
        found, problems = scan.results(), scan.problems
        if scan.truncated:  # (what was found is swept; the rest could not be looked at)
            record.setdefault("disarmed", {})[""] = "unswept"
    notes += sweep(line, record, found, predicate, problems)
    if record["armed"]:
        notes.insert(0, keep_armed(line, record))
    linked = []
    for path, stamp in sorted((record.get("linked") or {}).items()):
        try:
            info = os.lstat(os.path.join(target, path))
            if [info.st_ino, info.st_ctime_ns] == stamp:
                continue
        except OSError:
            pass
        linked.append(path)
    if linked:
        notes.append("the agent changed (or moved) %s, hard links to files outside the project "
                     "(PI_AGENT_HARDLINKS=allow): those changed too; %s" % (
                         plural(len(linked), "file"),
                         ", ".join(linked[:5] + (["..."] if len(linked) > 5 else []))))
    changed = changed_files(record["host_run"], host_run_files(target))
    if changed:
        notes.append("the agent changed %s, which your host may run by itself; review before "
                     "trusting them (git status, git diff)"
                     % ", ".join(changed[:5] + (["..."] if len(changed) > 5 else [])))
    record["summary"] = run_summary(record)
    try:
        os.remove(os.path.join(run_dir, RUN_RECORD))  # ended: nobody need do it again
    except FileNotFoundError:
        pass
    return notes


# ------------------------------------------------------- images and snapshots
#
# The base, current, snapshots and their names, pins, retention, disk.

def snapshot_epoch(name):
    match = SNAPSHOT_RE.match(name)
    if not match:
        return None
    digits = match.group(1) + match.group(2)  # not strptime: its import costs every run
    then = [int(digits[start:end]) for start, end in ((0, 4), (4, 6), (6, 8), (8, 10),
                                                      (10, 12), (12, 14))]
    return utc_epoch(then) + int(match.group(3)) / 1000


def snapshot_name(epoch, last=None):
    """snap-YYYYMMDD-HHMMSS.mmm (UTC), strictly after `last`: unique for runs
    in the same second without sleeping, and sortable by name."""
    millis = int(epoch * 1000)
    last_epoch = snapshot_epoch(last) if last else None
    if last_epoch is not None:
        millis = max(millis, round(last_epoch * 1000) + 1)
    seconds, fraction = divmod(millis, 1000)
    return SNAPSHOT_PREFIX + time.strftime("%Y%m%d-%H%M%S", time.gmtime(seconds)) + \
        ".%03d" % fraction


def repository_images(repo):
    """[{tag, id, created, size}] of the images tagged in `repo`, one row
    a tag (one `image ls`). Podman lists every name of an image it finds,
    and names a local repository localhost/REPO: rows are kept by their
    repository."""
    rows = json_lines(docker(
        "image", "ls", repo, "--format",
        '{"repo":{{json .Repository}},"tag":{{json .Tag}},"id":{{json .ID}},'
        '"created":{{json .CreatedAt}},"size":{{json .Size}}}').stdout)
    return [row for row in rows if image_name(str(row.pop("repo", ""))) == repo
            and row.get("tag") not in (None, "", "<none>")]


def list_snapshots(line):
    """[{tag, id, created, size, pins}] of the line's snapshots (tag: the
    name, snap-*; pins: the names pinned to its image), newest first (one
    docker call)."""
    rows = repository_images(line.repo)
    pins = [(row["id"], line.pin_named(row["tag"])) for row in rows if line.pin_named(row["tag"])]
    snaps = [dict(row, tag=line.snapshot_named(row["tag"]),
                  pins=sorted(name for image, name in pins if image == row["id"]))
             for row in rows if line.snapshot_named(row["tag"])]
    snaps.sort(key=lambda row: row["tag"], reverse=True)
    return snaps


def snapshot_refs(line, snaps):
    """Every tag of these snapshots (rows of list_snapshots): pins too."""
    return [line.snap(snap["tag"]) for snap in snaps] + [
        line.pin(name) for snap in snaps for name in snap["pins"]]


def retained(snaps, keep, now):
    """The names retention keeps of `snaps`, [(name, noise)] newest first:
    the newest `keep` that are not noise (a noise one only among the newest
    `keep` of all), and the newest not noise of each of the last KEEP_DAYS
    days and KEEP_WEEKS weeks (UTC, by the name's time; a week starts on
    Monday: day 0, 1970-01-01, was a Thursday)."""
    real = [name for name, noise in snaps if not noise]
    kept = set(real[:keep]) | {name for name, noise in snaps[:keep]}
    today, seen = int(now // 86400), set()
    for name in real:
        day = int(snapshot_epoch(name) // 86400)
        for period, recent in ((("day", day), today - day < KEEP_DAYS),
                               (("week", (day + 3) // 7), (today + 3) // 7 - (day + 3) // 7
                                < KEEP_WEEKS)):
            if recent and period not in seen:
                seen.add(period)
                kept.add(name)
    return kept


def made_by(image):
    """{kind, target, exit_status} of the run whose save made `image`, or
    None for an image no save made (the base)."""
    labels = image_labels(image)
    if not labels.get(LABEL + "committed_at"):
        return None
    return {"kind": labels.get(LABEL + "kind") or "run",
            "target": labels.get(LABEL + "target") or None,
            "exit_status": exit_number(labels.get(LABEL + "exit_status"))}


def describe_origin(image):
    """What made an image, from the labels its save put on it."""
    labels = image_labels(image)
    if not labels.get(LABEL + "committed_at"):
        return "the base image"
    kind = labels.get(LABEL + "kind") or "run"
    target = labels.get(LABEL + "target") or "?"
    if kind == "prepare":
        return "pi-agent, making the directories above %s the agent's" % target
    if kind == "reset":
        return "the base image, and the agents' own files of before"
    status = labels.get(LABEL + "exit_status") or "?"
    return "%s in %s (exit %s)" % (kind, target, status)


def agent_home(environ=None):
    """The agent's home inside: the host user's home path, so ~ means the
    same inside and out; /home/agent where that path is unusable there."""
    environ = os.environ if environ is None else environ
    home = os.path.realpath(environ.get("HOME") or os.path.expanduser("~"))
    if home == "/" or "\n" in home or any(is_within(home, tree) for tree in SYSTEM_TREES):
        return "/home/agent"
    return home


def build_args(engine, environ=None):
    """The Dockerfile's build args for this host user, as `engine` maps the
    user inside (on rootless Docker the agent is root: root is the user)."""
    uid = engine.agent_uid(os.getuid())
    return {"AGENT_UID": str(uid), "AGENT_GID": str(os.getgid() if uid else 0),
            "AGENT_HOME": agent_home(environ)}


def dockerfile_digest(path):
    import hashlib
    try:
        with open(path, "rb") as handle:
            return hashlib.sha256(handle.read()).hexdigest()[:16]
    except OSError:
        return None


def base_labels(config, values):
    """What a base is built from, kept in its labels (see base_drift)."""
    return {LABEL + "base_image": config.base_image,
            LABEL + "dockerfile": dockerfile_digest(config.dockerfile) or "",
            LABEL + "ca_certs": text_digest(config.ca_certs)[:16] if config.ca_certs else "none",
            OWNER_LABEL: str(os.getuid()), LABEL + "agent_uid": values["AGENT_UID"],
            LABEL + "home": values["AGENT_HOME"]}


def base_drift(config, base, engine):
    """How the settings now differ from what `base` was built from (a base
    built before pi-agent kept that, or brought by the user, says nothing)."""
    built = image_labels(base)
    wanted = base_labels(config, build_args(engine))
    said = {"base_image": "PI_AGENT_BASE_IMAGE is {now}, the base was built FROM {then}",
            "dockerfile": "the Dockerfile ({path}) has changed since the base was built",
            "ca_certs": "PI_AGENT_CA_CERTS names other certificates than the base was built with",
            "agent_uid": "the agent's UID is {now} here (see pi-status's engine), the base was built "
                   "for UID {then}",
            "home": "your home is {now}, the base was built for {then}"}
    return [text.format(now=wanted[LABEL + key], then=built[LABEL + key], path=config.dockerfile)
            for key, text in said.items() if built.get(LABEL + key) and wanted[LABEL + key]
            and built[LABEL + key] != wanted[LABEL + key]]


def remove_failed_build(output):
    """Remove what a failed build left (docker's classic builder keeps each
    finished step as an image: the last, untagged, holds them all), as its
    output names it; returns its size (0: nothing)."""
    ids = re.findall(r"^ ---> ([0-9a-f]{12,64})\s*$", "".join(output), re.M)
    left = inspect_image(ids[-1]) if len(ids) > 1 and ids[-1] != ids[0] else None
    if left is None or left.get("RepoTags") or \
            docker("rmi", left["Id"], check=False).returncode != 0:
        return 0
    return left.get("Size") or 1


# How the tools a build runs say that a server's certificate is trusted by
# nothing they know: npm (Node's codes), curl and OpenSSL, pip (Python's
# ssl), apt, wget and git (GnuTLS).
UNTRUSTED = re.compile(
    r"SELF_SIGNED_CERT_IN_CHAIN|UNABLE_TO_GET_ISSUER_CERT_LOCALLY|DEPTH_ZERO_SELF_SIGNED_CERT|"
    r"UNABLE_TO_VERIFY_LEAF_SIGNATURE|CERT_UNTRUSTED|CERTIFICATE_VERIFY_FAILED|"
    r"self[- ]signed certificate|unable to get local issuer certificate|"
    r"certificate verif(?:y|ication) failed|certificate is NOT trusted|"
    r"certificate issuer is unknown|SSL certificate problem|cannot verify \S+ certificate", re.I)


def untrusted_advice(config):
    """What to do about a certificate nothing here trusts: a TLS-inspecting
    proxy's, most likely, whose CA PI_AGENT_CA_CERTS builds in."""
    return ("%s (docs/settings.md#corporate-networks)" % (
        "PI_AGENT_CA_CERTS=%s does not hold the CA that signed it: add your proxy's CA "
        "certificate to it" % config.raw["PI_AGENT_CA_CERTS"] if config.ca_certs else
        "a TLS-inspecting proxy's, most likely: set PI_AGENT_CA_CERTS to its CA certificate, "
        "a PEM file"))


def build_failure(config, err, output):
    """The line a failed build ends with: a certificate nothing trusted is
    named with the setting that fixes it; else the engine's words, with the
    RUN step's script (docker gives all of it) cut short."""
    found = UNTRUSTED.search(ESCAPES.sub("", "".join(output)))
    if found:
        return EngineError("%s build failed: a server's certificate was not trusted (%s): %s, "
                           "then retry" % (engine_kind(), found.group(), untrusted_advice(config)))
    return EngineError(re.sub(r"(/bin/sh -c .{40}).+?(' returned a|\" did not complete)",
                              r"\1...\2", str(err)))


def build_base(line, no_cache=False, first=True):
    config = line.config
    dockerfile = os.path.abspath(config.dockerfile)
    if not os.path.isfile(dockerfile):
        raise NotFound("no Dockerfile at %s; set PI_AGENT_DOCKERFILE to yours, or reinstall "
                       "pi-agent" % dockerfile)
    values = build_args(line.engine)
    labels = dict(base_labels(config, values), **{LABEL + "repo": line.repo})
    args = ["build", "--force-rm", *image_format(), "-t", line.base, "--build-arg",
            "BASE_IMAGE=" + config.base_image, "-f", dockerfile] + label_args(labels)
    for name, value in values.items():
        args += ["--build-arg", "%s=%s" % (name, value)]
    if config.ca_certs:
        args += ["--build-arg", "EXTRA_CA_CERTS=" + config.ca_certs]
    # Docker's own proxy build args: the value comes from our environment,
    # and the image's history does not keep it.
    args += sum((["--build-arg", name] for name in PROXY_ENV if os.environ.get(name)), [])
    if no_cache:
        args.append("--no-cache")
    args.append(os.path.dirname(dockerfile))
    say("%sbuilding %s from %s, FROM %s (this takes a few minutes)"
        % ("first use: " if first else "", line.base, dockerfile, config.base_image))
    started, output = time.monotonic(), []
    try:
        if sys.stderr.isatty():
            docker_shown(*args, lines=output)  # docker's own output is the progress
        else:
            result = docker(*args, check=False)
            output = [result.stdout, result.stderr]
            if result.returncode != 0:
                raise docker_failure(args, result.stderr)
    except EngineError as err:
        left = remove_failed_build(output)
        if ("BASE_IMAGE" in (read_regular(dockerfile) or b"").decode("utf-8", "replace")
                and inspect_image(config.base_image) is None):
            err = EngineError("could not get %s, the image the base is built FROM (%s); set "
                              "PI_AGENT_BASE_IMAGE (in the environment, or in %s) to an image "
                              "you have (%s images) or can pull" % (
                                  config.base_image, str(err).split(": ", 1)[-1], config.path,
                                  engine_kind()))
        else:
            err = build_failure(config, err, output)
        if left:
            err = EngineError("%s (what the failed build left, %s, is removed)"
                              % (err, human_size(left)))
        raise err
    say("built %s in %.0f s" % (line.base, time.monotonic() - started))


def check_owner(line, *images):
    """Refused for an image made for another UID: another user's line on
    the engine (or the user's own from before their UID changed), which
    pi-agent neither uses nor changes. One without the label (a base of
    the user's, tagged by hand) is theirs."""
    for image in images:
        owner = image_labels(image).get(OWNER_LABEL)
        if owner and owner != str(os.getuid()):
            mine = own_repo() if own_repo() != line.repo else "%s-%d" % (line.repo, os.getuid())
            raise Refused("%s was made for UID %s, and you are UID %d: it is another user's "
                          "environment on this engine (or yours from before your UID changed), "
                          "which pi-agent neither uses nor changes; set PI_AGENT_IMAGE_REPO=%s "
                          "(in %s) for one of your own" % (
                              (image.get("RepoTags") or [line.repo])[0], owner, os.getuid(),
                              mine, line.config.path))


def owner_mismatch(image, engine):
    """A line built for another UID writes files the host user does not own
    (the agent's UID is the user's, or root where root inside is the user:
    see Engine.agent_uid). (Docker Desktop maps ownership itself: nothing
    to say on macOS.)"""
    labels = image_labels(image)
    built_for = labels.get(LABEL + "agent_uid", labels.get(OWNER_LABEL))
    wanted = engine.agent_uid(os.getuid())
    if not built_for or os.uname().sysname == "Darwin" or built_for == str(wanted):
        return None
    return ("warning: %s was built for UID %s but %s, so files the agent writes will not be "
            "yours; pi-rebuild-base, then pi-reset-system, fixes that (your environment stays "
            "as a snapshot)" % (image_name((image.get("RepoTags") or ["current"])[0]), built_for,
                                "you are UID %d" % wanted if wanted else "on %s the agent must "
                                "be root (root inside is you)" % engine.name))


def remember_current(state, image):
    """Keep current's record in the state, so that a run after a clean
    release need not inspect it (its saver checks it while the agent runs)."""
    state["current"] = {key: image.get(key) for key in ("Id", "Config", "RootFS", "RepoTags",
                                                          "Size")}


def remembered_current(state):
    record = state.get("current")
    if (isinstance(record, dict) and isinstance(record.get("Id"), str)
            and isinstance(record.get("Config"), dict) and isinstance(record.get("RootFS"), dict)):
        return record
    return None


def ensure_current(line, current=None, made=True):
    """Current's inspect record; on first use tag it from base (built if
    absent: then also True, for the run to say how long its first use took).
    A profile starts from base only once pi-branch `made` it: a misspelled
    --profile must not start an empty environment."""
    current = current or inspect_image(line.current)
    if current is not None:
        check_owner(line, current)
        return current, False
    if line.profile and not made:
        raise no_profile(line)  # (deleted since the run's require_profile)
    base = inspect_image(line.base)
    built = base is None
    if built:
        build_base(line)
    check_owner(line, base)
    docker("tag", line.base, line.current)
    return inspect_image(line.current), built


def record_snapshot(state, name):
    """Remember a snapshot: the newest name (to stay unique) and the list
    auto-prune works from (absent until a listing made it)."""
    if name > (state.get("last_snapshot") or ""):
        state["last_snapshot"] = name
    if state.get("snapshots") is not None and name not in state["snapshots"]:
        state["snapshots"].append(name)
        state["snapshots"].sort()


def next_snapshot(state, epoch=None):
    """Name the next snapshot after `epoch` (default now) and record it.
    Recorded before it is tagged: a name never tagged is harmless."""
    name = snapshot_name(time.time() if epoch is None else epoch, state.get("last_snapshot"))
    record_snapshot(state, name)
    return name


def add_snapshot(line, state, image_ref, epoch=None):
    """Tag image_ref as a new snapshot; returns its name."""
    name = next_snapshot(state, epoch)
    docker("tag", image_ref, line.snap(name))
    return name


def drop_snapshot(line, state, name, also=()):
    """Take back a snapshot that kept nothing new (its image is current);
    `also`: other images to remove in the same call."""
    docker("rmi", line.snap(name), *also, check=False)
    if name in (state.get("snapshots") or []):
        state["snapshots"].remove(name)


def kept_as(line, image):
    """The snapshot that keeps this image already (from its inspect
    record's tags), or None: an image is never kept under two names."""
    prefix = line.repo + ":"
    names = [line.snapshot_named(image_name(tag)[len(prefix):])
             for tag in (image or {}).get("RepoTags") or [] if image_name(tag).startswith(prefix)]
    names = [name for name in names if name]
    return max(names) if names else None


def replace_current(line, state, old, new_ref):
    """The one way current changes by hand: the old image stays kept (by
    the snapshot that keeps it already, else a new one), then the tag moves
    (atomic). Returns (the snapshot's name, whether it is new)."""
    name = kept_as(line, old)
    fresh = name is None
    if fresh:
        name = add_snapshot(line, state, old["Id"])
    state.pop("current", None)
    docker("tag", new_ref, line.current)
    line.write_state(state)
    return name, fresh


def remove_own_dangling(line):
    """Remove untagged images that carry this line's labels: only our own
    (another profile's save may hold one it is about to tag)."""
    ids = docker("image", "ls", "-q", "--filter", "dangling=true", "--filter", "label=" + MINE,
                 "--filter", "label=%srepo=%s" % (LABEL, line.repo)).stdout.split()
    if ids:
        images = json.loads(docker("image", "inspect", *ids, check=False).stdout or "[]")
        ids = [image["Id"] for image in images if line.owns(image_labels(image))]
    if ids:
        docker("rmi", *ids, check=False)
    return ids


class ImageTree:
    """Images and the images below them, as the engine has them, loaded as
    needed: each image's own bytes are its size less its parent's, so that
    a layer several images share counts once."""

    def __init__(self):
        self.info = {}

    def reach(self, refs):
        """The IDs of `refs` (tags or IDs that exist) and of the images below."""
        seen, frontier = set(), list(refs)
        while frontier:
            missing = [ref for ref in frontier if ref not in self.info]
            if missing:
                for image in json.loads(docker("image", "inspect", *missing).stdout):
                    self.info[image["Id"]] = image
                    for tag in image.get("RepoTags") or []:
                        self.info[image_name(tag)] = image
            ids = [self.info[ref]["Id"] for ref in frontier if ref in self.info]
            seen.update(ids)
            frontier = [self.info[i].get("Parent") for i in ids if self.info[i].get("Parent")]
            frontier = [parent for parent in frontier if parent not in seen]
        return seen

    def own(self, ids):
        total = 0
        for image_id in ids:
            parent = self.info[image_id].get("Parent")
            total += self.info[image_id]["Size"] - (self.info[parent]["Size"]
                                                    if parent in self.info else 0)
        return total


def repository_tags(line):
    """Every tag of the repository (all profiles'), as REPO:TAG."""
    return ["%s:%s" % (line.repo, row["tag"]) for row in repository_images(line.repo)]


def bytes_freed(line, doomed_tags):
    """What removing these snapshots would free: the layers that no other
    tag of the repository (another profile's included) reaches. None where
    the engine's image sizes do not say (Engine.sizes_are_disk)."""
    if not line.engine.sizes_are_disk:
        return None
    tree, doomed = ImageTree(), {line.snap(tag) for tag in doomed_tags}
    kept = [ref for ref in repository_tags(line) if ref not in doomed]
    return tree.own(tree.reach(doomed) - tree.reach(kept))


def disk_usage(line):
    """The line's disk, by the engine's own image sizes, each layer once:
    {base: what current shares with base, own: current's own layers,
    snapshots: what only its snapshots hold (no other tag reaches it),
    which pruning them all would free}. None where the engine's image
    sizes do not say (Engine.sizes_are_disk): never a wrong figure."""
    if not line.engine.sizes_are_disk:
        return None
    tree, refs = ImageTree(), repository_tags(line)
    snaps = [ref for ref in refs if line.snapshot_named(ref.split(":", 1)[1])]
    mine = snaps + [line.current, line.base]
    current = tree.reach([line.current]) if line.current in refs else set()
    base = tree.reach([line.base]) if line.base in refs else set()
    others = tree.reach([ref for ref in refs if ref not in mine])
    return {"base": tree.own(current & base), "own": tree.own(current - base),
            "snapshots": tree.own(tree.reach(snaps) - current - base - others)}


def resolve_snapshot(line, name):
    snaps = list_snapshots(line)
    if not snaps:
        raise NotFound("%s has no snapshots yet: each run that changes the environment makes "
                       "one" % line.name)
    if name is None:
        return snaps[0]
    tag = (line.snapshot_named(name.split(":", 1)[1]) if name.startswith(line.repo + ":")
           else name)
    for snap in snaps:
        if tag in [snap["tag"]] + snap["pins"]:
            return snap
    raise NotFound("no snapshot %r of %s; pi-snapshots lists them%s" % (
        name, line.name, " (pi-reset-system makes base current)" if name == "base" else ""))


def commit_args(container, image, labels, message):
    """docker commit arguments that give the new image the old image's own
    config: the run's command is replaced by the image's CMD/ENTRYPOINT (or
    FALLBACK_CMD), its user by the image's, and every run label by its
    image value."""
    config = image.get("Config") or {}
    args = ["commit", *image_format(), "-m", message]
    if config.get("Entrypoint"):
        args += ["--change", "ENTRYPOINT " + json.dumps(config["Entrypoint"], ensure_ascii=False)]
    if config.get("Cmd") or not config.get("Entrypoint"):
        command = config.get("Cmd") or FALLBACK_CMD
        args += ["--change", "CMD " + json.dumps(command, ensure_ascii=False)]
    if config.get("User"):
        args += ["--change", "USER " + config["User"]]
    # The docker client gives every container its config file's proxies
    # (~/.docker/config.json), and a commit would keep them: emptied unless
    # the image had them. (The run script gives each run its proxies.)
    had = {entry.split("=", 1)[0] for entry in config.get("Env") or []}
    for name in sorted(set(docker_config_proxies()) - had):
        args += ["--change", "ENV %s=" % name]
    for key in sorted(labels):
        args += ["--change", "LABEL %s=%s" % (dockerfile_quote(key), dockerfile_quote(labels[key]))]
    return args + [container]


def saved_labels(line, container, image, meta):
    """The labels a save puts on the image it commits: the run's (`meta`),
    its outcome, and the mount points the image now has."""
    mount = meta.get("mount") or ""
    mounts = known_mounts(image)
    if mount and mount not in mounts:
        mounts = (mounts + [mount])[-MAX_KNOWN_MOUNTS:]
    labels = {LABEL + key: meta.get(key, "") for key in RUN_LABELS}
    labels.update({LABEL + "pid": "", LABEL + "repo": line.repo, LABEL + "profile": line.profile,
                   OWNER_LABEL: str(os.getuid()), LABEL + "container": container,
                   LABEL + "previous": image["Id"],
                   LABEL + "committed_at": utc_iso(time.time()),
                   LABEL + "exit_status": str(meta.get("exit_status", "unknown")),
                   MOUNTS_LABEL: json.dumps(mounts, ensure_ascii=False)})
    return labels


# ------------------------------------------------- the change record and diff
#
# What each run changed in the environment, listed from its layer, and runs
# put together for pi-diff and pi-log; pruning, which asks which runs only
# made noise.

# What a person does not mean by "what did the run change": caches, logs,
# temporary files, shell histories, and the package managers' own books
# (what they record is shown as packages). pi-diff --all shows them too.
# Nothing that a program runs or loads by itself is noise (Python's
# __pycache__, the loader's ld.so.cache, dpkg's maintainer scripts): the
# agent could hide what it leaves behind there.
NOISE_TREES = ("/tmp", "/var/tmp", "/run", "/var/run", "/var/cache", "/var/log",
               "/var/lib/apt", "/var/lib/dpkg", "/var/backups")
NOISE_DIRS = {".cache", ".npm", "_cacache", ".node-gyp"}
NOISE_NAMES = {".bash_history", ".zsh_history", ".python_history", ".lesshst", ".viminfo",
               ".wget-hsts", ".sudo_as_admin_successful"}
# Where what runs by itself, or says what runs, is kept: any bin or sbin
# directory (a PATH's), /etc (cron, profile.d, ld.so.preload, sudoers, apt's
# hooks), systemd's units, dpkg's maintainer scripts, what Python runs as it
# starts (a site-packages' .pth files, sitecustomize), shells' startup files.
# A change there is always shown: never noise, never a package's (the books
# that would claim it are the agent's to write). Kept to those: a package's
# other files (its libraries too) are its own, and the package is shown.
RUNS_CODE_RE = re.compile(
    r"/etc(/.*)?|.*/s?bin(/.*)?|/(usr/)?lib/systemd/.*"
    r"|/var/lib/dpkg/info/[^/]*\.(preinst|postinst|prerm|postrm|config)"
    r"|.*-packages/([^/]*\.pth|(site|user)customize\.py)"
    r"|/usr/lib/python3[^/]*/sitecustomize\.py"
    r"|.*/\.(bashrc|bash_profile|bash_login|bash_logout|profile|zshrc|zshenv|zprofile"
    r"|zlog(in|out))",
    re.S)
# The package managers' marks, in the paths docker diff lists.
DPKG_LIST_RE = re.compile(r"/var/lib/dpkg/info/([a-z0-9][a-z0-9+.-]*)(?::([a-z0-9-]+))?\.list")
PIP_DIST_RE = re.compile(r"(/.+/(?:site|dist)-packages)/([A-Za-z0-9][A-Za-z0-9._]*)-"
                         r"([A-Za-z0-9][A-Za-z0-9.+!_]*)\.dist-info")
NPM_PACKAGE_RE = re.compile(r"(/(?:.+/)?lib/node_modules)/((?:@[^/@.][^/]*/)?[^/@.][^/]*)")
# What is read of the package managers' books, and kept of their file
# lists: the agent can make them any size.
BOOKS_READ_LIMIT = 128 << 20
BOOKS_KEPT_LIMIT = 16 << 20
# Paths recorded (and counted) of one run at most; what the saver reads of
# the listing at most, and how long it waits for it; records kept.
MAX_RECORDED_PATHS = 200000
LAYER_READ_LIMIT = 96 << 20
LAYER_TIMEOUT = 300
KEEP_REPORTS = 500
# A run's changes: its report, STATE/REPO[@PROFILE].runs/CONTAINER.json
# (counts, packages), and every path in CONTAINER.changes.gz.
REPORT_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,200}")
CHANGE_WORDS = {"A": "added", "C": "changed", "D": "deleted"}
# How far back in the session log pi-diff looks for the runs since a snapshot.
DIFF_LOG_DEPTH = 5000

# What a run's commit holds, listed in a container of the base (never the
# agent's image: its tools could lie) as root with no capability but
# reading, no network, the layer at /pi-agent-layer and the layers below it
# at /pi-agent-lower/NNN (the top one first), all read-only. Records, each
# ended by NUL: "L TYPE SIZE PATH" for every path in the layer, the trees a
# person looks at first (FIRST_TREES) first; "P PATH" for those the layers
# below have (changed, not added; in a directory that is new nothing is
# looked up); "E"; then a tar of the package managers' books in the layer
# (dpkg's status and file lists, pip's RECORD files), 32 MB at most. $1
# paths at most of each kind: the agent can make any number. $2 "names":
# the paths alone (no "P" records, no books).
FIRST_TREES = ("etc", "usr", "root", "home", "opt", "srv", "bin", "sbin", "lib", "lib64",
               "boot", "var/spool", "var/lib")
LAYER_SCRIPT = r"""cd "$top" || exit 1
{ for tree in %s; do
    if [ -d "$tree" ] && [ ! -L "$tree" ]; then find "$tree" -printf 'L %%y %%s %%p\0'; fi
  done
  find . -mindepth 1 -type d \( %s \) -prune -o -printf 'L %%y %%s %%p\0'
} | head -z -n "$max"
[ "$mode" = names ] && { printf 'E\0'; exit 0; }
find . -mindepth 1 ! -type c -print0 | head -z -n "$max" | xargs -0 -r sh -c '
new=
for p do
  p=${p#./}
  if [ -n "$new" ]; then case $p in "$new"/*) continue ;; esac; fi
  for l in $LOWERS; do
    [ -c "$l/$p" ] && break
    if [ -e "$l/$p" ] || [ -L "$l/$p" ]; then printf "P %%s\0" "$p"; continue 2; fi
  done
  if [ -d "$p" ] && [ ! -L "$p" ]; then new=$p; fi
done
true' sh
printf 'E\0'
{ if [ -d var/lib/dpkg ] && [ ! -L var/lib/dpkg ]; then
    find var/lib/dpkg -maxdepth 2 -type f -size -16384k \( -path var/lib/dpkg/status -o \
      -path 'var/lib/dpkg/info/*.list' \) -print0
  fi
  find . -type f -size -16384k -path '*-packages/*.dist-info/RECORD' -print0 | head -z -n 1000
} | tar --null --no-recursion -T - -cf - | head -c 33554432
true""" % (" ".join(FIRST_TREES),
           " -o ".join("-path ./%s" % tree for tree in FIRST_TREES))
# The listing container's own loop: for each layer, named by its mount and
# those below it (ended by ";"), LAYER_SCRIPT's output as its length in
# bytes on a line, then the bytes.
LIST_SCRIPT = r"""max=$1 mode=$2; shift 2
while [ $# -gt 0 ]; do
  top=$1; shift; LOWERS=
  while [ "$1" != ";" ]; do LOWERS="$LOWERS $1"; shift; done; shift
  export top LOWERS max mode
  sh -c "$0" > /tmp/layer 2>/dev/null
  wc -c < /tmp/layer; cat /tmp/layer; rm -f /tmp/layer
done"""


def layer_listable(line, image):
    """The engine keeps `image`'s layers as directories LAYER_SCRIPT can
    read (Engine.lists_layers: probed, never taken from an inspect alone)."""
    driver = (image or {}).get("GraphDriver") or {}
    return line.engine.lists_layers and driver.get("Name") == "overlay2" and \
        bool((driver.get("Data") or {}).get("UpperDir"))


def parse_listing(out):
    """([(A|C|D, path)], {path: size}, books) from LAYER_SCRIPT's output."""
    pos, listed, present, sizes = 0, [], set(), {}
    while True:
        end = out.find(b"\0", pos)
        if end < 0:
            raise EngineError("the listing of the run's layer was cut short")
        record, pos = out[pos:end].decode("utf-8", "surrogateescape"), end + 1
        if record == "E":
            break
        if record.startswith("L "):
            kind, length, path = (record[2:].split(" ", 2) + ["", ""])[:3]
            path = "/" + (path[2:] if path.startswith("./") else path)
            listed.append((kind, path))
            if kind == "f" and length.isdigit():
                sizes[path] = int(length)
        elif record.startswith("P "):
            present.add("/" + record[2:])
    changes = [("D" if kind == "c" else "C" if path in present else "A", path)
               for kind, path in listed]
    return changes, sizes, out[pos:]


def list_layers(line, jobs, names_only=False):
    """What layers hold, read as docker diff would say it of the container
    that made each, reading only that layer (the engine's diff compares the
    whole image, see record_changes): `jobs` [(key, [the layer's directory,
    then those below it, top first])]; yields (key, [(A|C|D, path)],
    {path: size of a file}, the tar of dpkg's books), MAX_RECORDED_PATHS
    paths of each at most, one container of the base for all (never the
    agent's image: its tools could lie) as root with no capability but
    reading, no network, every directory mounted read-only. With
    `names_only`, only the paths (every one "A"): quick whatever the
    layers below. EngineError when one layer's listing is more than
    LAYER_READ_LIMIT, or all take more than LAYER_TIMEOUT."""
    import select
    dirs = sorted({path for _key, paths in jobs for path in paths})
    inside = {path: "/pi-agent-layers/%03d" % number for number, path in enumerate(dirs)}
    name = "pi-agent-list-%d-%d-%d" % (os.getuid(), os.getpid(), time.monotonic_ns() % 10**6)
    # (never pulled: a base that is gone means no listing, not a stranger's image)
    args = ["run", "--rm", "--name", name, "--label", MINE, "--pull", "never", "--network", "none",
            "-u", "0", "--cap-drop", "ALL", "--cap-add", "DAC_READ_SEARCH", "--read-only",
            "--tmpfs", "/tmp", "--security-opt", "no-new-privileges", "--log-driver", "none",
            "--entrypoint", "sh"]
    for path in dirs:
        args += ["--mount", mount_spec(path, inside[path]) + ",readonly"]
    call = DockerCall((*args, line.base, "-c", LIST_SCRIPT, LAYER_SCRIPT, str(MAX_RECORDED_PATHS),
                       "names" if names_only else "all",
                       *[part for _key, paths in jobs for part in
                         [inside[path] for path in paths] + [";"]]),
                      capture=False, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    deadline, pending = time.monotonic() + LAYER_TIMEOUT, b""

    def read(size, until=None):
        """`size` bytes of the listing (or up to `until`), within its time."""
        nonlocal pending
        while (len(pending) < size) if until is None else (until not in pending):
            if until is not None and len(pending) > 32:
                raise EngineError("the listing of a layer is not what it should be")
            ready = select.select([call.proc.stdout], [], [],
                                  max(0, deadline - time.monotonic()))[0]
            chunk = os.read(call.proc.stdout.fileno(), 1 << 20) if ready else None
            if chunk is None:
                raise EngineError("the listing of the runs' layers took more than %d s"
                                  % LAYER_TIMEOUT)
            if not chunk:
                raise EngineError("the listing of the runs' layers failed (is %s there?)"
                                  % line.base)
            pending += chunk
        end = size if until is None else pending.index(until) + 1
        data, pending = pending[:end], pending[end:]
        return data

    try:
        for key, _paths in jobs:
            size = int(read(0, b"\n"))
            if size > LAYER_READ_LIMIT:
                raise EngineError("the listing of a run's layer is more than %s"
                                  % human_size(LAYER_READ_LIMIT))
            yield (key,) + parse_listing(read(size))
    finally:
        if call.proc.poll() is None:
            call.proc.kill()
            docker("rm", "-f", name, check=False)
        call.finish(check=False)


def list_layer(line, image, names_only=False):
    """What the top layer of `image` (a run's commit) holds: list_layers."""
    data = image["GraphDriver"]["Data"]
    dirs = [data["UpperDir"]] + [path for path in (data.get("LowerDir") or "").split(":")
                                 if path]
    return next(list_layers(line, [(None, dirs)], names_only))[1:]


def parse_diff(output):
    """[(A|C|D, path)] from `docker diff`. A path with a newline, which
    only the agent makes, would read as two lines, and so make up a change
    (a deletion that hides earlier runs' files, once runs are put
    together): the directory that holds it always leaves a line that is
    not a change, and then nothing is taken from the output."""
    changes = []
    for row in output.split("\n"):
        kind, _, path = row.partition(" ")
        if kind in CHANGE_WORDS and path.startswith("/"):
            changes.append((kind, path))
        elif row:
            raise EngineError("docker diff lists a name with a newline in it, which "
                              "cannot be read for sure")
    return changes


def is_noise(path):
    if RUNS_CODE_RE.fullmatch(path):
        return False
    if any(path == tree or path.startswith(tree + "/") for tree in NOISE_TREES):
        return True
    parts = path.split("/")
    return parts[-1] in NOISE_NAMES or \
        any(part in NOISE_DIRS for part in parts[:-1])


def all_noise(line, paths):
    """Whether these paths (a run's changes) are all noise the user named
    (PI_AGENT_NOISE): a state they alone made is not worth keeping apart."""
    import fnmatch
    home = agent_home(line.config.environ)
    patterns = [home + pattern[1:] if pattern.startswith("~/") else pattern
                for pattern in line.config.noise]
    return bool(paths) and all(any(
        path.startswith(pattern) or path == pattern[:-1] if pattern.endswith("/")
        else fnmatch.fnmatchcase(path, pattern) for pattern in patterns) for path in paths)


def parents_of(paths):
    parents = set()
    for path in paths:
        parent = os.path.dirname(path)
        while parent != "/" and parent not in parents:
            parents.add(parent)
            parent = os.path.dirname(parent)
    return parents


def kept_changes(changes, mounts=()):
    """What is worth keeping of a run's docker diff: not the mount points
    the engine made (nor the directories above them), nor a directory
    listed as changed only because something in it changed. (A directory
    added stays: a later run that deletes it deletes what is in it.)"""
    points = set(mounts) | set(INIT_MOUNTS)  # (and the engine's own, from the caller)
    above = parents_of(points) | points
    parents = parents_of(path for _kind, path in changes)
    return [(kind, path) for kind, path in changes
            if path not in above and not (kind == "C" and path in parents)]


def leaf_rows(rows):
    """The rows a person counts: a directory listed because what is in it
    was added is not counted apart from it, nor is what was in a directory
    deleted."""
    parents = parents_of(row[1] for row in rows)
    deleted = {row[1] for row in rows if row[0] == "D"}
    depths = sorted({path.count("/") for path in deleted})

    def in_deleted(path):
        parts = path.split("/")
        return any("/".join(parts[:depth + 1]) in deleted for depth in depths
                   if depth < len(parts) - 1)
    return [row for row in rows if (row[0] == "D" or row[1] not in parents)
            and not (deleted and in_deleted(row[1]))]


def parse_dpkg_status(data):
    """{name and name:arch: (version, bytes or None)} of the packages dpkg
    knows (a removed one whose configuration is kept, too)."""
    found = {}
    for stanza in data.decode("utf-8", "replace").split("\n\n"):
        fields = dict(re.findall(r"^([A-Za-z-]+): *(.*)$", stanza, re.M))
        if not fields.get("Package") or not fields.get("Version"):
            continue
        size = fields.get("Installed-Size", "")
        installed = fields.get("Status", "").endswith(" installed")
        value = (fields["Version"], int(size) * 1024 if re.fullmatch(r"[0-9]{1,15}", size)
                 and installed else None)
        found[fields["Package"]] = value
        found["%s:%s" % (fields["Package"], fields.get("Architecture"))] = value
    return found


def read_books(stream, wanted):
    """From a tar stream of the package managers' books: {package: (version,
    bytes or None)} from dpkg's status file; {list name: set of paths} of
    the `wanted` dpkg info/*.list files; {dist-info directory: set of
    paths} from pip's RECORD files. BOOKS_READ_LIMIT of the stream is read
    at most, and BOOKS_KEPT_LIMIT of the lists kept."""
    import csv
    import tarfile
    status, lists, records, kept = {}, {}, {}, 0

    class Limited:
        read_so_far = 0

        def read(self, size=-1):
            left = BOOKS_READ_LIMIT - self.read_so_far
            data = stream.read(left if size < 0 else min(size, left)) if left > 0 else b""
            self.read_so_far += len(data)
            return data

    try:
        with tarfile.open(fileobj=Limited(), mode="r|") as archive:
            for member in archive:
                name = "/" + member.name.lstrip("./")
                if not member.isfile() or member.size > 64 << 20:
                    continue
                if name.endswith("/dpkg/status"):
                    status = parse_dpkg_status(archive.extractfile(member).read())
                    continue
                list_name = name.rsplit("/info/", 1)[-1][:-len(".list")]
                is_list = "/info/" in name and name.endswith(".list") and list_name in wanted
                is_record = name.endswith(".dist-info/RECORD")
                if not (is_list or is_record) or kept + member.size > BOOKS_KEPT_LIMIT:
                    continue
                kept += member.size
                text = archive.extractfile(member).read().decode("utf-8", "surrogateescape")
                if is_list:
                    lists[list_name] = set(text.split("\n")) - {""}
                    continue
                dist_info = os.path.dirname(name)  # RECORD's paths are from its parent
                site = os.path.dirname(dist_info)
                records[dist_info] = {os.path.normpath(os.path.join(site, row[0]))
                                      for row in csv.reader(text.splitlines()) if row}
    except (tarfile.TarError, EOFError, OSError, ValueError, csv.Error):
        pass  # what was read stands
    return status, lists, records


def dpkg_books(container, wanted):
    """The package managers' books (see read_books) in a container: dpkg's,
    by `docker cp` of its /var/lib/dpkg."""
    call = DockerCall(("cp", container + ":/var/lib/dpkg", "-"), capture=False,
                      stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        return read_books(call.proc.stdout, wanted)
    finally:
        call.proc.kill()
        call.finish(check=False)


def find_packages(changes, books=None):
    """The packages a run's changes installed, removed or changed, by the
    marks their managers leave (dpkg's info/*.list, pip's *.dist-info,
    npm's lib/node_modules/NAME), and {path: "manager:name"} for the files
    they own: dpkg's and pip's from their books (`books(wanted dpkg lists)`
    reads them, see read_books), npm's by their directory. Only a package
    whose own books are in `changes` (one layer's) claims a path: its list
    (only those are wanted), its dist-info (only its RECORD is used), its
    directory (a changed one with its package.json); a forged claim so
    shows its package. (owner_of: none where code runs.)"""
    kinds = dict((path, kind) for kind, path in changes)
    packages, owners, deb = {}, {}, {}
    dist_infos = {}
    for kind, path in changes:
        match = DPKG_LIST_RE.fullmatch(path)
        if match:
            deb[match.group(1) + (":" + match.group(2) if match.group(2) else "")] = kind
            continue
        match = PIP_DIST_RE.fullmatch(path)
        if match:
            dist_infos.setdefault((match.group(1), match.group(2).lower().replace("-", "_")),
                                  []).append((kind, match.group(3), path))
            continue
        match = NPM_PACKAGE_RE.fullmatch(path)
        if match and (kind != "C" or kinds.get(path + "/package.json") in ("A", "C")):
            packages["npm:" + match.group(2)] = {
                "manager": "npm", "name": match.group(2), "change": CHANGE_WORDS[kind].replace(
                    "added", "installed").replace("deleted", "removed"),
                "version": None, "size": None}
            owners[path + "/"] = "npm:" + match.group(2)
    status, lists, records = books({n for n, k in deb.items() if k != "D"}) \
        if books and (deb or dist_infos) else ({}, {}, {})
    for (site, name), marks in dist_infos.items():
        kinds_seen = {kind for kind, _v, _p in marks}
        new = [version for kind, version, _p in marks if kind != "D"]
        change = "changed" if "D" in kinds_seen and new else \
            ("removed" if not new else ("changed" if kinds_seen == {"C"} else "installed"))
        version = new[-1] if new else marks[-1][1]
        packages["pip:" + name] = {"manager": "pip", "name": name, "change": change,
                                   "version": version, "size": None}
        for _kind, _version, path in marks:
            owners[path + "/"] = "pip:" + name
            for owned in records.get(path, ()):
                if owned.startswith(site + "/"):  # (a RECORD claims its package's files)
                    owners[owned] = "pip:" + name
        owners[site + "/" + name + "/"] = "pip:" + name
        owners[site + "/" + name + ".py"] = "pip:" + name
    if deb:
        for list_name, kind in deb.items():
            name = list_name.split(":")[0]
            version, size = status.get(list_name, (None, None))
            packages["deb:" + name] = {"manager": "deb", "name": name,
                                       "change": {"A": "installed", "C": "changed",
                                                  "D": "removed"}[kind],
                                       "version": version, "size": size}
            for owned in lists.get(list_name, ()):
                owned = owned.rstrip("/")  # (exact paths: a list claims no tree)
                if owned not in ("", "/."):
                    owners[owned] = "deb:" + name
    return sorted(packages.values(), key=lambda p: (p["manager"], p["name"])), owners


def package_prefixes(owners):
    return sorted((key for key in owners if key.endswith("/")), key=len, reverse=True)


def owner_of(path, owners, prefixes=None):
    """The package that owns `path`: listed in its books (exact paths), or
    inside a directory of pip's or npm's (keys ending in /; `prefixes`,
    those keys, longest first, if known); none where code runs (RUNS_CODE_RE)."""
    if RUNS_CODE_RE.fullmatch(path):
        return None
    owner = owners.get(path) or owners.get(path + "/")
    if owner:
        return owner
    for prefix in prefixes if prefixes is not None else package_prefixes(owners):
        if path.startswith(prefix):
            return owners[prefix]
    return None


def credit(changes, sizes, packages, owners):
    """[kind, path, owner, size] rows of a layer's `changes` (owner_of), and
    the `packages`' sizes set: what a pip or npm package's files written
    take; dpkg's (its books, which the agent can write) at most what the
    layer's files take, and not known without their sizes."""
    prefixes = package_prefixes(owners)
    rows = [[kind, path, owner_of(path, owners, prefixes), sizes.get(path)]
            for kind, path in changes]
    written, taken = 0, {}
    for kind, _path, owner, size in rows:
        if kind != "D":
            written += size or 0
            if owner:
                taken[owner] = taken.get(owner, 0) + (size or 0)
    for package in packages:
        owner = "%s:%s" % (package["manager"], package["name"])
        if package["size"] is None and package["change"] != "removed" and owner in taken:
            package["size"] = taken[owner]
        elif package["size"] is not None:
            package["size"] = min(package["size"], written) if sizes else None
    return rows


def prune_reports(line):
    """The records of the newest KEEP_REPORTS runs stay (a snapshot older
    than those has nothing to show to pi-diff anyway: auto-prune keeps 10)."""
    names = [name for name in os.listdir(line.runs_dir) if name.endswith(".json")]
    if len(names) <= KEEP_REPORTS:
        return
    names.sort(key=lambda name: os.stat(os.path.join(line.runs_dir, name)).st_mtime)
    for name in names[:-KEEP_REPORTS]:
        for doomed in (name, name[:-len(".json")] + ".changes.gz"):
            try:
                os.remove(os.path.join(line.runs_dir, doomed))
            except FileNotFoundError:
                pass


def gzip_json(value):
    import gzip
    return gzip.compress(json.dumps(value, separators=(",", ":")).encode(), 6)


def summarize(leaves, packages, everything=False):
    """The counts of [kind, path, owner, size] rows (leaf_rows), and the
    other paths (not a package's, not noise unless `everything`) grouped by
    their top two directories."""
    counts = {word: 0 for word in CHANGE_WORDS.values()}
    groups, hidden, hidden_bytes, owned = {}, 0, 0, 0
    for kind, path, owner, size in leaves:
        counts[CHANGE_WORDS[kind]] += 1
        if owner:
            owned += 1
            continue
        if not everything and is_noise(path):
            hidden += 1
            hidden_bytes += (size or 0) if kind != "D" else 0
            continue
        parts = path.split("/")
        group = "/".join(parts[:3]) if len(parts) > 3 else "/".join(parts[:2])
        groups.setdefault(group, dict({word: 0 for word in CHANGE_WORDS.values()}, bytes=0))
        groups[group][CHANGE_WORDS[kind]] += 1
        groups[group]["bytes"] += (size or 0) if kind != "D" else 0
    return {"paths": counts, "packages": packages, "package_paths": owned, "hidden": hidden,
            "hidden_bytes": hidden_bytes,
            "groups": [dict(directory=name, **groups[name]) for name in sorted(groups)]}


def keep_report(line, container, report):
    try:
        os.makedirs(line.runs_dir, mode=0o700, exist_ok=True)
        replace_file(os.path.join(line.runs_dir, container + ".json"),
                     json.dumps(dict(report, recorded=utc_iso(time.time())),
                                sort_keys=True).encode())
        prune_reports(line)
    except OSError as err:
        line.log("could not write the record of %s: %s" % (container, err.strerror))


def report_changes(line, container, image_after, mount, changes, sizes, books):
    """Keep what a run changed as its report, STATE/REPO[@PROFILE].runs/
    CONTAINER.json (counts, packages), and every path in .changes.gz, for
    pi-diff and pi-log: `changes` [(A|C|D, path)], `sizes`, and `books`
    (a function that reads the package managers' books, see find_packages).
    What cannot be made is a report that says why ("failed")."""
    try:
        truncated = len(changes) >= MAX_RECORDED_PATHS
        changes = kept_changes(changes[:MAX_RECORDED_PATHS], [mount or "", RUN_DIR_INSIDE,
                                                              *line.engine.made_mounts])
        packages, owners = find_packages(changes, books)
        rows = credit(changes, sizes, packages, owners)
        report = dict(summarize(leaf_rows(rows), packages), container=container,
                      image_after=image_after, recorded=utc_iso(time.time()),
                      truncated=truncated, noise=all_noise(line, [row[1] for row in changes]))
        os.makedirs(line.runs_dir, mode=0o700, exist_ok=True)
        replace_file(os.path.join(line.runs_dir, container + ".changes.gz"), gzip_json(rows))
    except Exception as err:  # (what the run made is read: a surprise must cost only this)
        line.log("could not record what %s changed: %r" % (container, err))
        report = {"failed": str(err) if isinstance(err, PiError) else repr(err)}
    keep_report(line, container, dict(report, container=container, image_after=image_after))


def record_changes(line, container, meta):
    """After a save where the engine keeps no layer directories (see
    layer_listable): what the run changed, from `docker diff` of its
    container, which must still be there. That costs the engine a walk of
    the whole image (its diff of a container compares the whole tree,
    moby#39428; meta["diff_output"], if the save asked it already): done
    by the saver once the line is free. Elsewhere a run's changes are read
    from its layer when someone asks (ensure_reports)."""
    if not line.config.record_changes or meta.get("image_after") == meta.get("image_before") \
            or not REPORT_NAME_RE.fullmatch(container) \
            or layer_listable(line, meta.get("new_image")):
        return
    try:
        changes = parse_diff(meta.pop("diff_output", None) or docker("diff", container).stdout)
    except PiError as err:
        keep_report(line, container, {"image_after": meta.get("image_after"),
                                      "failed": str(err)})
        return
    report_changes(line, container, meta.get("image_after"), meta.get("mount"), changes, {},
                   lambda wanted: dpkg_books(container, wanted))


def read_report(line, container):
    """A run's report, or None."""
    if not isinstance(container, str) or not REPORT_NAME_RE.fullmatch(container):
        return None
    try:
        with open(os.path.join(line.runs_dir, container + ".json"), encoding="utf-8") as handle:
            report = json.load(handle)
        return report if isinstance(report, dict) else None
    except (OSError, ValueError):
        return None


def read_changes(line, container):
    """A run's [kind, path, owner, size] rows, or None."""
    import gzip
    try:
        with open(os.path.join(line.runs_dir, container + ".changes.gz"), "rb") as handle:
            rows = json.loads(gzip.decompress(handle.read(64 << 20)))
    except (OSError, ValueError, EOFError):
        return None
    # (a record made before RUNS_CODE_RE may credit such a path to a package)
    return [[kind, path, None if RUNS_CODE_RE.fullmatch(path) else owner, size]
            for kind, path, owner, size in ((row + [None])[:4] for row in rows
                                            if isinstance(row, list) and len(row) in (3, 4)
                                            and row[0] in CHANGE_WORDS and isinstance(row[1], str))]


def compose_changes(runs):
    """The changes of runs in order (oldest first), as one: a path added
    then deleted was never there; deleted then added, it changed; what was
    in a directory deleted goes with it."""
    import bisect
    result = {}
    for rows in runs:
        earlier = sorted(result)
        for kind, path, _owner, _size in rows:
            if kind == "D":
                start = bisect.bisect_left(earlier, path + "/")
                for inside in earlier[start:bisect.bisect_left(earlier, path + "0")]:
                    result.pop(inside, None)
        for kind, path, owner, size in rows:
            before = result.get(path)
            if before is None:
                result[path] = [kind, path, owner, size]
                continue
            first = before[0]
            if first == "A" and kind == "D":
                del result[path]
                continue
            merged = "A" if first == "A" else ("C" if first == "D" and kind != "D" else kind)
            result[path] = [merged, path, owner or before[2], size]
    return [result[path] for path in sorted(result)]


def compose_packages(runs):
    """The packages of runs in order, as one (installed then removed: gone)."""
    result = {}
    for packages in runs:
        for package in packages:
            key = (package.get("manager"), package.get("name"))
            before = result.get(key)
            change = package.get("change")
            if before is not None:
                if before["change"] == "installed" and change == "removed":
                    del result[key]
                    continue
                if before["change"] == "installed" or (before["change"] == "removed"
                                                       and change != "removed"):
                    change = "installed" if before["change"] == "installed" else "changed"
            result[key] = dict(package, change=change)
    return [result[key] for key in sorted(result, key=lambda k: (str(k[0]), str(k[1])))]


def wait_for_reports(line, records, timeout=120):
    """Until the runs' changes are recorded, or nobody is at it: the saver
    records them once the line is free (record_changes), a moment after
    the prompt."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        removing = line.read_state().get("removing") or {}
        pending = [r for r in records if r.get("container") in removing
                   and read_report(line, r["container"]) is None
                   and pid_alive(removing[r["container"]])]
        if not pending:
            return
        time.sleep(0.05)


def changed_nothing(record):
    return record.get("image_after") == record.get("image_before")


def layer_dirs(line):
    """Where runs' layers can still be read: ({image ID: its layers'
    directories, top first}, {layer ID: its directory and those below it})
    of every image of the repository that the engine keeps as overlay2
    directories; a layer stays in the images made on top of it, whichever
    snapshots are pruned, until a flatten or a reset drops them all."""
    if not line.engine.lists_layers:
        return {}, {}
    ids = sorted(set(docker("image", "ls", "-q", "--no-trunc", line.repo).stdout.split()))
    by_image, by_layer = {}, {}
    for image in json.loads(docker("image", "inspect", *ids).stdout) if ids else []:
        layers = (image.get("RootFS") or {}).get("Layers") or []
        if not layer_listable(line, image):
            continue
        data = image["GraphDriver"]["Data"]
        dirs = [data["UpperDir"]] + [path for path in (data.get("LowerDir") or "").split(":")
                                     if path]
        if len(dirs) != len(layers):
            continue
        by_image[image["Id"]] = dirs
        for index, layer in enumerate(reversed(layers)):
            by_layer.setdefault(layer, dirs[index:])
    return by_image, by_layer


def ensure_reports(line, records):
    """The reports of these runs (session records) that are missing, made
    now: each run's layer, from an image that still holds it, read by one
    container for all (list_layers), kept as its report (a second ask reads
    it). A run whose layer no image holds any more is said to be gone. A
    save starts no container for this: whoever asks pays, once."""
    import io
    todo = [record for record in records if isinstance(record, dict)
            and isinstance(record.get("layer"), str) and not changed_nothing(record)
            and REPORT_NAME_RE.fullmatch(str(record.get("container")))
            and read_report(line, record["container"]) is None]
    if not todo or not line.config.record_changes or not line.engine.lists_layers:
        return  # (an engine without listable layers recorded each run at its save)
    by_image, by_layer = layer_dirs(line)
    jobs = []
    for record in todo:
        dirs = by_image.get(record.get("image_after")) or by_layer.get(record["layer"])
        if dirs:
            jobs.append((record, dirs))
        else:
            keep_report(line, record["container"], {
                "image_after": record.get("image_after"),
                "failed": "its layer is gone (the images that held it were removed, or "
                          "flattened)"})
    done = 0
    try:
        for record, changes, sizes, books in list_layers(line, jobs):
            report_changes(line, record["container"], record.get("image_after"),
                           record.get("mount"), changes, sizes,
                           lambda wanted, books=books: read_books(io.BytesIO(books), wanted))
            done += 1
    except EngineError as err:
        if "more than %s" % human_size(LAYER_READ_LIMIT) in str(err):
            keep_report(line, jobs[done][0]["container"], {
                "image_after": jobs[done][0].get("image_after"), "failed": str(err)})
        say("what %s changed could not be listed: %s" % (
            plural(len(jobs) - done, "run"), err), "warning")


def noise_snapshots(line, snaps):
    """The snapshots (rows of list_snapshots) whose state was made by a run
    that changed only noise (its report says so: all_noise), found through
    the session log. A run not recorded (yet) is not noise."""
    made = {}
    for record in newest_sessions(line.sessions_path, max(200, 5 * len(snaps))):
        if not changed_nothing(record):
            made.setdefault(str(record.get("image_after")).split(":")[-1][:12],
                            record.get("container"))
    return {snap["tag"] for snap in snaps
            if (read_report(line, made.get(snap["id"])) or {}).get("noise")}


def doomed_snapshots(line, snaps, keep=None, protect=()):
    """What pruning removes of `snaps` (rows of list_snapshots): with `keep`
    None, what retention (retained) lets go, else all but the `keep`
    newest; never a pinned one, nor one in `protect`."""
    free = [snap for snap in snaps if not snap["pins"]]
    if keep is None:
        noise = noise_snapshots(line, free)
        kept = retained([(snap["tag"], snap["tag"] in noise) for snap in free],
                        line.config.snapshot_keep, time.time())
    else:
        kept = {snap["tag"] for snap in free[:keep]}
    return [snap for snap in free if snap["tag"] not in kept and snap["tag"] not in protect]


def prune_snapshots(line, state, keep=None):
    """Prune (doomed_snapshots) from a fresh listing; returns what went."""
    snaps = list_snapshots(line)
    doomed = doomed_snapshots(line, snaps, keep)
    if doomed:
        result = docker("rmi", *[line.snap(snap["tag"]) for snap in doomed], check=False)
        if result.returncode != 0:
            raise docker_failure(("rmi",), result.stderr)
    state["snapshots"] = sorted(snap["tag"] for snap in snaps if snap not in doomed)
    line.write_state(state)
    remove_own_dangling(line)
    return doomed


def prune_if_due(line, state, protect=()):
    """Auto-prune after a save: what retention lets go, never one in
    `protect` (the run's own, which may be an old name that keeps current's
    image again). The state keeps the names: when retention by the names
    alone keeps them all, a run prunes without listing them. What went is
    said: at once on a terminal, else by the next command
    (state["pruned"]); always in the log."""
    config = line.config
    names = state.get("snapshots")
    if not config.auto_prune or names is not None and not set(names) - set(protect) - retained(
            [(name, False) for name in sorted(names, reverse=True)], config.snapshot_keep,
            time.time()):
        return
    snaps = list_snapshots(line)
    doomed = [snap["tag"] for snap in doomed_snapshots(line, snaps, protect=protect)]
    state["snapshots"] = sorted(snap["tag"] for snap in snaps if snap["tag"] not in doomed)
    if doomed:
        # A tag someone removed by hand is simply gone already.
        docker("rmi", *[line.snap(name) for name in doomed], check=False)
        message = pruned_message(doomed, config.snapshot_keep)
        line.log(message)
        if sys.stderr.isatty():
            say(message)
        else:
            state["pruned"] = (state.get("pruned") or []) + doomed
    line.write_state(state)


def trace_runs(line, records, from_id, to_id):
    """The saved runs (session records, oldest first) that led from image
    `from_id` to image `to_id`, found from `to_id` back: the run whose
    image it is, then the run that made the image that run started from,
    and so on. An image the log does not know (a flattened current) is
    known by its labels, which name the run that made what it holds.
    Returns None if the way back does not reach `from_id`."""
    by_image, by_container = {}, {}
    for record in records:  # (newest first: a later record of an image wins)
        if record.get("ended_by") == "failed commit" or changed_nothing(record):
            continue
        by_image.setdefault(record.get("image_after"), record)
        by_container.setdefault(record.get("container"), record)
    chain, image, seen = [], to_id, set()
    while image != from_id:
        if image in seen or image is None:
            return None
        seen.add(image)
        record = by_image.get(image) or by_container.get(
            image_labels(inspect_image(image)).get(LABEL + "container"))
        if record is None:
            return None
        if record.get("image_after") == from_id:
            break  # `to_id` is a flattened copy of `from_id`
        chain.append(record)
        image = record.get("image_before")
    return chain[::-1]


def diff_endpoint(line, name):
    """(image ID, what to call it) for a snapshot name, current or base."""
    if name in ("current", "base"):
        image = inspect_image(line.current if name == "current" else line.base)
        if image is None:
            raise NotFound("%s has no %s image" % (line.name, name))
        return image["Id"], name
    snap = resolve_snapshot(line, name)
    return inspect_image(line.snap(snap["tag"]))["Id"], snap["tag"]


def image_names(line, image_ids, current_id):
    """current, a snapshot's name, base or None for each image ID (the
    engine asked once)."""
    snaps, base = list_snapshots(line), inspect_image(line.base)

    def name(image_id):
        if not image_id:
            return None
        if image_id == current_id:
            return "current"
        for snap in snaps:
            if image_id.split(":")[-1].startswith(snap["id"]):
                return snap["tag"]
        return "base" if base and base["Id"] == image_id else None
    return [name(image_id) for image_id in image_ids]


def invert_changes(rows, packages):
    """What going back undoes: the changes of the way forward, reversed."""
    flip = {"A": "D", "D": "A", "C": "C"}
    undo = {"installed": "removed", "removed": "installed", "changed": "changed"}
    return ([[flip[kind], path, owner, None] for kind, path, owner, _size in rows],
            [dict(package, change=undo.get(package.get("change"), package.get("change")),
                  size=None) for package in packages])


def run_paths(line, record):
    """A run's counts of paths added, changed, deleted (its report's), or
    None when not recorded."""
    if changed_nothing(record) and record.get("ended_by") != "failed commit":
        return {"added": 0, "changed": 0, "deleted": 0}
    report = read_report(line, record.get("container")) or {}
    paths = report.get("paths")
    return paths if isinstance(paths, dict) else None


# -------------------------------------------------------------------- flatten
#
# Current rewritten as one layer: what its runs changed is listed first, as
# their layers are about to go.

def import_changes(config):
    """`docker import --change` lines that give a new image `config`.
    (STOPSIGNAL, HEALTHCHECK and SHELL are not accepted there: see
    finish_config.)"""
    changes = []
    for key in ("Entrypoint", "Cmd"):
        if config.get(key):
            changes.append("%s %s" % (key.upper(), json.dumps(config[key], ensure_ascii=False)))
    for entry in config.get("Env") or []:
        name, _, value = entry.partition("=")
        changes.append("ENV %s=%s" % (name, dockerfile_quote(value)))
    if config.get("WorkingDir"):
        changes.append("WORKDIR " + config["WorkingDir"])
    if config.get("User"):
        changes.append("USER " + config["User"])
    for port in sorted(config.get("ExposedPorts") or {}):
        changes.append("EXPOSE " + port)
    if config.get("Volumes"):
        changes.append("VOLUME " + json.dumps(sorted(config["Volumes"]), ensure_ascii=False))
    for key, value in sorted((config.get("Labels") or {}).items()):
        changes.append("LABEL %s=%s" % (dockerfile_quote(key), dockerfile_quote(value)))
    for trigger in config.get("OnBuild") or []:
        changes.append("ONBUILD " + trigger)
    return changes


def finish_config(image_id, config):
    """Add what import cannot set, by a build that adds no layer."""
    lines = []
    if config.get("StopSignal"):
        lines.append("STOPSIGNAL " + config["StopSignal"])
    if config.get("Shell"):
        lines.append("SHELL " + json.dumps(config["Shell"]))
    check = config.get("Healthcheck") or {}
    if check.get("Test"):
        if check["Test"][0] == "NONE":
            lines.append("HEALTHCHECK NONE")
        else:
            options = "".join(" --%s=%dms" % (flag, check[key] // 1000000) for flag, key in (
                ("interval", "Interval"), ("timeout", "Timeout"),
                ("start-period", "StartPeriod")) if check.get(key))
            if check.get("Retries"):
                options += " --retries=%d" % check["Retries"]
            command = check["Test"][1:] if check["Test"][0] == "CMD" else \
                ["/bin/sh", "-c"] + check["Test"][1:]
            lines.append("HEALTHCHECK%s CMD %s" % (options, json.dumps(command)))
    if not lines:
        return image_id
    dockerfile = "FROM %s\n%s\n" % (image_id, "\n".join(lines))
    return docker("build", "-q", "-", feed=dockerfile).stdout.strip()


def relay(source, sink, expected, started):
    """Copy a stream in 1 MiB pieces, showing progress on the terminal."""
    done, shown = 0, 0.0
    while True:
        chunk = source.read(1 << 20)
        if not chunk:
            break
        sink.write(chunk)  # communicate() closes it afterwards
        done += len(chunk)
        now = time.monotonic()
        if now - shown > 0.2:
            shown = now
            sys.stderr.write("\rpi-agent: flattening: %s of about %s, %.0f s " % (
                human_size(done), human_size(expected), now - started))
            sys.stderr.flush()
    sys.stderr.write("\r\033[K")


def flatten_image(line, image, progress=False):
    """A one-layer copy of `image`: the same files (export streamed into
    import, never held whole in memory or on disk) and the same config.
    Returns the new image's ID; nothing is tagged."""
    config = image.get("Config") or {}
    # Flattens run under the line's lock, one at a time: any other such
    # container is what an interrupted one left behind.
    flatten_label = "%sflatten=%s" % (LABEL, "profile " + line.profile if line.profile else "1")
    stale = docker("ps", "-aq", "--filter", "label=" + flatten_label, "--filter", "label=" + MINE,
                   "--filter", "label=%srepo=%s" % (LABEL, line.repo)).stdout.split()
    if stale:
        docker("rm", "-f", *stale, check=False)
    holder = docker("create", "--label", "%srepo=%s" % (LABEL, line.repo), "--label", MINE,
                    "--label", flatten_label, image["Id"], "pi-agent-flatten").stdout.strip()
    try:
        started = time.monotonic()
        export = DockerCall(("export", holder), capture=False, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
        importing = DockerCall(
            ("import", *[arg for change in import_changes(config) for arg in ("--change", change)],
             "-"), capture=False, stdin=subprocess.PIPE if progress else export.proc.stdout,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        if progress:
            relay(export.proc.stdout, importing.proc.stdin, image.get("Size") or 0, started)
        export.proc.stdout.close()  # import alone reads it now (and sees export die)
        export.proc.stdout = None
        result = importing.finish(check=False)
        export.finish()  # (export's error first: what import saw came from it)
        if result.returncode != 0:
            raise docker_failure(("import",), result.stderr.decode(errors="replace"))
        new_id = result.stdout
    finally:
        docker("rm", "-f", holder, check=False)
    new_id = finish_config(new_id.decode().strip(), config)
    if image_layers(inspect_image(new_id)) != 1:
        raise EngineError("the flattened image of %s has more than one layer" % image["Id"])
    return new_id


def flatten_current(line, state, current, progress=False):
    """current := a one-layer copy of itself; the layered one stays as a
    snapshot like any other replaced current. What the runs in its layers
    changed is listed first (ensure_reports), in the same pass: once that
    snapshot goes, their layers go with it. Returns the snapshot name."""
    layers = set((current.get("RootFS") or {}).get("Layers") or ())
    ensure_reports(line, [record for record in newest_sessions(line.sessions_path, DIFF_LOG_DEPTH)
                          if record.get("layer") in layers])
    new_id = flatten_image(line, current, progress)
    kept, _ = replace_current(line, state, current, new_id)
    remove_own_dangling(line)
    return kept


def flatten_limit(line):
    """The layer count at which a save flattens current."""
    # "0, never" still keeps commits possible: the engine refuses them at
    # its depth (125 on overlay2).
    limit = line.engine.max_layers - 5
    return min(line.config.flatten_threshold or limit, limit)


def auto_flatten(line, state):
    """Flatten current as part of the (detached) save that took it to the
    limit: the prompt is back already, and the next run waits for it with a
    message. Not in parallel with runs: while `docker import` writes the
    copy, the engine holds back the commits and tags of other saves anyway.
    Never fails the run: a failure is logged and shown once as a notice."""
    current = inspect_image(line.current)
    line.log("flattening %s (%d layers)" % (line.current, image_layers(current)))
    try:
        kept = flatten_current(line, state, current)
    except PiError as err:
        state["notice"] = ("auto-flatten of %s failed: %s; the run was saved all the same, "
                           "and pi-flatten retries" % (line.current, err))
        line.write_state(state)
        line.log(state["notice"])
        return
    line.log("flattened %s; the layered image is kept as %s" % (line.current, kept))


# ---------------------------------------------------------------- the network
#
# PI_AGENT_EGRESS. Under public and allow a run is on an engine network
# that is internal (no route out) and whose bridge has no address on the
# host (com.docker.network.bridge.inhibit_ipv4: a container on an internal
# bridge still reaches every host service on 0.0.0.0 through the bridge's
# own address, measured on Docker 20.10). Its one way out is the egress
# proxy: pi-agent's own code (serve_egress, below, this very file mounted
# read-only) in a container of REPO:base (never current, which the agent
# makes), on that network and on one of its own with a route out. It
# tunnels (CONNECT, no interception) and forwards plain HTTP, deciding on
# the address it connects to, after resolving. One proxy serves every run
# of a user with the same policy (its name is the policy's digest); it ends
# when no run has kept it for EGRESS_IDLE seconds.

EGRESS_PORT = 3128
EGRESS_IDLE = 600
EGRESS_KEEP = 60        # a run's saver looks at its proxy this often (it keeps it up)
EGRESS_CLIENT_MAX = 64  # connections at once from one run; more are refused, 503
EGRESS_MAX = 512        # ... from every run
EGRESS_HEAD = 16384     # the most a request's head may be
EGRESS_WAIT = 10        # seconds a request's head may take; then a tunnel's idle limit
EGRESS_TUNNEL_IDLE = 900


def egress_name(host, names):
    """True when `host` is one of `names` (exact, or *.suffix: below it)."""
    return any(host == name or name.startswith("*.") and host.endswith(name[1:])
               for name in names)


def splice(one, other, idle=EGRESS_TUNNEL_IDLE):
    """Bytes both ways until both ends have closed (each close passed on)
    or nothing moved for `idle` seconds."""
    import select
    peer = {one: other, other: one}
    open_ = [one, other]
    try:
        for sock in open_:
            sock.settimeout(idle)
        while open_:
            ready = select.select(open_, [], [], idle)[0]
            if not ready:
                return
            for sock in ready:
                data = sock.recv(1 << 16)
                if data:
                    peer[sock].sendall(data)
                else:
                    open_.remove(sock)
                    peer[sock].shutdown(1)  # (SHUT_WR: the close passed on)
    except OSError:
        return


def socket_ntoa(number):
    """The dotted address of /proc/net/route's hex (little-endian) field."""
    return ".".join(str(number >> shift & 255) for shift in (0, 8, 16, 24))


class EgressProxy:
    """The proxy, in its container. `spec`: mode, allow (parse_allow's),
    host_ports, never (the host's own addresses), upstream ({"http",
    "https": [host, port, authorization or None], "no_proxy"}), network
    (the internal one), name. What it refused is kept per run (by the
    name the engine's DNS gives the client's address) for the host to ask,
    from the one address no run has: the host's, its gateway."""

    def __init__(self, spec):
        import threading
        self.spec, self.lock = spec, threading.Lock()
        self.busy, self.refused, self.names, self.last = {}, {}, {}, time.monotonic()
        self.members = {}  # (a run's address: until when it is known to be one: see member)
        with open("/proc/net/if_inet6", encoding="ascii") as handle:  # (IPv6 beyond the link?)
            self.v6 = any(row.split()[3] == "00" for row in handle)
        with open("/proc/net/route", encoding="ascii") as handle:
            hops = [row.split() for row in handle.read().splitlines()[1:]]
        self.gateway = next(socket_ntoa(int(row[2], 16)) for row in hops if row[1] == "00000000")
        self.never = set(spec["never"]) | {self.gateway}

    def serve(self):
        import socket
        import threading
        threading.stack_size(1 << 19)
        server = socket.socket()
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("0.0.0.0", EGRESS_PORT))
        server.listen(256)
        server.settimeout(30)
        while True:
            try:
                conn, peer = server.accept()
            except socket.timeout:
                if not self.busy and time.monotonic() - self.last > EGRESS_IDLE:
                    return 0
                continue
            self.last = time.monotonic()
            with self.lock:
                mine = self.busy.get(peer[0], 0)
                full = mine >= EGRESS_CLIENT_MAX or sum(self.busy.values()) >= EGRESS_MAX
                if not full:
                    self.busy[peer[0]] = mine + 1
            try:
                if full:
                    raise RuntimeError
                threading.Thread(target=self.handle, args=(conn, peer[0]), daemon=True).start()
            except RuntimeError:  # (full, or no thread to be had: refused, never let through)
                if not full:
                    self.done(peer[0])
                self.answer(conn, 503, "too many connections at once")
                conn.close()

    def done(self, client):
        with self.lock:
            self.busy[client] -= 1
            if not self.busy[client]:
                del self.busy[client]

    def answer(self, conn, code, reason, body=None):
        """An answer, and for a refusal the reason, one line, in the status
        line (what tools print of a refused CONNECT) and in the body."""
        words = {200: "OK", 400: "Bad Request", 403: "Forbidden", 408: "Request Timeout",
                 431: "Request Header Fields Too Large", 502: "Bad Gateway",
                 503: "Service Unavailable"}
        line = re.sub(r"[\x00-\x1f]", " ", "pi-agent egress %s: %s" % (self.spec["mode"], reason))
        body = (body or line + "\n").encode("utf-8", "replace")
        try:
            conn.sendall(("HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n"
                          "Connection: close\r\n\r\n" % (
                              code, words[code] if code == 200 else line[:200], "text/plain"
                              if code != 200 else "application/json", len(body))
                          ).encode("latin-1", "replace") + body)
        except OSError:
            pass

    def member(self, client):
        """True for the host and for this proxy's own runs: those the
        engine's DNS gives for NAME-runs, an alias only pi-agent sets (at
        `docker run`). Every policy's proxy is on the one internal network:
        a run of another policy (or another PI_AGENT_EGRESS_ALLOW, or
        PI_AGENT_HOST_PORTS) is refused, never served by a looser proxy."""
        import socket
        if not self.spec.get("runs") or client in (self.gateway, "127.0.0.1"):
            return True
        now = time.monotonic()
        with self.lock:
            if self.members.get(client, 0) > now:
                return True
        found = []
        for _ in range(2):  # (once more if the engine's DNS failed: a busy engine)
            try:  # (the trailing dot: no search domain of yours is tried, nor told)
                found = socket.getaddrinfo(self.spec["name"] + "-runs.", None, socket.AF_INET,
                                           socket.SOCK_STREAM)
                break
            except (OSError, UnicodeError):
                continue
        with self.lock:
            self.members = {info[4][0]: now + 2 for info in found}
            return client in self.members

    def handle(self, conn, client):
        try:
            if not self.member(client):
                return self.answer(conn, 403, "%s is not a run of this proxy's policy (%s): "
                                   "each policy has its own" % (client, self.spec["name"]))
            self.request(conn, client)
        except Exception as err:  # (whatever a client sends: its connection ends, never the proxy)
            self.answer(conn, 502, "%s" % (err,)[:200])
        finally:
            try:  # (what the client still sends is read first: a close would reset the answer)
                conn.shutdown(1)
                conn.settimeout(1)
                for _ in range(16):
                    if not conn.recv(1 << 16):
                        break
            except OSError:
                pass
            conn.close()
            self.done(client)

    def request(self, conn, client):
        import socket
        head, deadline = b"", time.monotonic() + EGRESS_WAIT
        try:
            while b"\r\n\r\n" not in head:
                left = deadline - time.monotonic()  # (the whole head, not each read)
                if left <= 0:
                    raise socket.timeout
                conn.settimeout(left)
                data = conn.recv(4096)
                if not data:
                    return
                head += data
                if len(head) > EGRESS_HEAD and b"\r\n\r\n" not in head[:EGRESS_HEAD + 4]:
                    return self.answer(conn, 431, "the request's head is over %d bytes"
                                       % EGRESS_HEAD)
        except socket.timeout:
            return self.answer(conn, 408, "no request within %d s" % EGRESS_WAIT)
        head, _, rest = head.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        words = lines[0].split(" ")
        if len(words) != 3 or not re.fullmatch(r"[A-Z]{1,20}", words[0]) or \
                not re.fullmatch(r"HTTP/1\.[01]", words[2]):
            return self.answer(conn, 400, "not an HTTP/1 request")
        method, target, version = words
        if target.startswith("/"):
            if client in (self.gateway, "127.0.0.1"):  # the host asks (Egress.ask)
                if target.startswith("/never/"):  # (its addresses now: Egress.tell)
                    self.learn(target[len("/never/"):])
                    return self.answer(conn, 200, "", json.dumps(
                        {"name": self.spec["name"], "never": sorted(self.never)}))
                return self.answer(conn, 200, "", json.dumps(
                    {"name": self.spec["name"], "refused": self.refused.get(target[1:])}))
            return self.answer(conn, 400, "this is pi-agent's egress proxy; it takes "
                               "CONNECT host:port and http:// URLs")
        url = re.fullmatch(r"http://([^/?#]+)(.*)", target) if method != "CONNECT" else None
        authority = url.group(1) if url else target
        where = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\](?::(\d{1,5}))?|([A-Za-z0-9_.-]{1,253})"
                             r"(?::(\d{1,5}))?", authority)
        if not where or (method == "CONNECT") == bool(url) or \
                (method == "CONNECT" and not (where.group(2) or where.group(4))):
            return self.answer(conn, 400, "%s %s: use CONNECT host:port, or an http:// URL"
                               % (method, target[:100]))
        host = (where.group(1) or where.group(3)).lower().rstrip(".")
        port = int(where.group(2) or where.group(4) or 80)
        if not 0 < port < 65536:
            return self.answer(conn, 400, "port %d" % port)
        dest = "%s:%d" % (host, port)
        try:
            upstream, addresses = self.decide(host, port, method == "CONNECT")
        except PermissionError as refusal:
            self.note(client, dest, str(refusal))
            return self.answer(conn, 403, str(refusal))
        if upstream and addresses:
            # Your proxy is handed the address checked, never a name it
            # would resolve again (a rebinding name, or one your LAN's DNS
            # answers otherwise: public here, your LAN there) nor the
            # agent's spelling of an address (0127.0.0.1 is 87.0.0.1 here,
            # 127.0.0.1 to a parser that reads leading zeros as decimal).
            # The name stays in Host (and in TLS's SNI).
            checked = addresses[0][1][0]
            checked = "[%s]" % checked if ":" in checked else checked
            dest = "%s:%d" % (checked, port)
            target = url and "http://%s%s" % (dest, url.group(2) or "/")
        if url:  # forwarded as it came, but for what only the proxy is owed
            kept = [row for row in lines[1:] if not re.match(
                r"(?i)(proxy-|connection:|keep-alive:|host:)", row)]
            first = "%s %s %s" % (method, target if upstream else url.group(2) or "/", version)
            head = "\r\n".join([first, "Host: " + authority] + kept + [
                "Connection: close"] + (["Proxy-Authorization: " + upstream[2]]
                                        if upstream and upstream[2] else []))
            rest = head.encode("latin-1") + b"\r\n\r\n" + rest
        try:
            sock = self.connect(upstream, addresses, dest, method == "CONNECT")
        except OSError as err:
            return self.answer(conn, 502, "cannot reach %s: %s" % (dest, err.strerror or err))
        with sock:
            if method == "CONNECT":
                conn.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
            if rest:
                sock.sendall(rest)
            splice(conn, sock)

    def learn(self, text):
        """The host's own addresses, as it tells them (Egress.tell): those
        it has now, a network made since the proxy started included."""
        import ipaddress
        for word in text.split(",")[:1024]:
            try:
                address = str(ipaddress.ip_address(word))
            except ValueError:
                continue
            with self.lock:
                if len(self.never) < 65536:
                    self.never.add(address)

    def decide(self, host, port, tunnel):
        """(upstream or None, [sockaddr] to connect to), or PermissionError
        with the reason: after resolving, on the addresses connected to."""
        import socket
        spec = self.spec
        if host == "host.docker.internal":
            if port not in spec["host_ports"]:
                raise PermissionError("%s:%d is not in PI_AGENT_HOST_PORTS" % (host, port))
            return None, [(socket.AF_INET, (self.gateway, port))]
        allow = spec["allow"]
        named = egress_name(host, [entry["name"] for entry in allow if "name" in entry and
                                   entry["port"] in (None, port)])
        if spec["mode"] == "allow" and not named and not any("net" in entry for entry in allow):
            # (no lookup: the name is the agent's, and your DNS would carry it out)
            raise PermissionError("%s is not in PI_AGENT_EGRESS_ALLOW" % host)
        bypass = spec["upstream"]["no_proxy"]
        upstream = None if "*" in bypass or egress_name(host, bypass) else \
            spec["upstream"].get("https" if tunnel else "http")
        found = self.resolve(host, port)
        if not found:
            if upstream and (named or spec["mode"] == "public"):  # (for your proxy to resolve)
                return upstream, []
            raise PermissionError("%s does not resolve" % host)
        import ipaddress
        reasons, fit = [], []
        for family, sockaddr in found:
            address = sockaddr[0]
            kind = address_class(address, self.never)
            listed = named or any(
                "net" in entry and entry["port"] in (None, port) and
                ipaddress.ip_address(address) in ipaddress.ip_network(entry["net"])
                for entry in allow)
            if kind == "public" and (listed or spec["mode"] == "public") or \
                    kind == "private" and listed:
                fit.append((family, sockaddr))
                continue
            reasons.append("%s%s is %s" % (address, "" if address == host else " (%s)" % host, {
                "never": "never reachable from a run (loopback, link-local, the host)",
                "private": "a private address; PI_AGENT_EGRESS_ALLOW can let it through",
                "public": "not in PI_AGENT_EGRESS_ALLOW"}[kind]))
        if fit:
            return upstream, fit
        raise PermissionError(reasons[0])

    def resolve(self, host, port):
        """[(family, sockaddr)] of `host`, looked up once for all the
        connections that ask for it within a minute (npm opens dozens at
        once: as many lookups at once fail), IPv6 only where there is a
        route for it."""
        import socket
        import threading
        with self.lock:
            now, entry = time.monotonic(), self.names.get(host)
            mine = entry is None or entry[0] < now - 60
            if mine:
                if len(self.names) > 4096:
                    self.names.clear()
                entry = self.names[host] = [now, threading.Event(), []]
        if mine:
            try:
                entry[2] = socket.getaddrinfo(host, None, socket.AF_UNSPEC if self.v6 or ":" in
                                              host else socket.AF_INET, socket.SOCK_STREAM)
            except (OSError, UnicodeError):
                entry[0] = 0  # (a failure is asked again)
            entry[1].set()
        entry[1].wait(3 * EGRESS_WAIT)
        return [(info[0], (info[4][0], port) + info[4][2:]) for info in entry[2]]

    def connect(self, upstream, addresses, dest, tunnel):
        """A socket to `dest`: directly to the first address that answers,
        or through the upstream proxy (a tunnel: asked for one first)."""
        import socket
        if not upstream:
            failure = OSError("no address")
            for family, sockaddr in addresses:
                sock = socket.socket(family, socket.SOCK_STREAM)
                sock.settimeout(EGRESS_WAIT)
                try:
                    sock.connect(sockaddr)
                    return sock
                except OSError as err:
                    failure = err
                    sock.close()
            raise failure
        sock = socket.create_connection((self.gateway if upstream[0] == "host.docker.internal"
                                         else upstream[0], upstream[1]), timeout=EGRESS_WAIT)
        if not tunnel:
            return sock
        sock.sendall(("CONNECT %s HTTP/1.1\r\nHost: %s\r\n%s\r\n" % (
            dest, dest, "Proxy-Authorization: %s\r\n" % upstream[2] if upstream[2] else "")
                      ).encode("latin-1"))
        answer = b""
        while b"\r\n\r\n" not in answer and len(answer) < EGRESS_HEAD:
            data = sock.recv(1)  # (not a byte past its head: that is the tunnel's)
            if not data:
                break
            answer += data
        status = answer.split(b"\r\n", 1)[0].decode("latin-1")
        if not re.match(r"HTTP/1\.[01] 200", status):
            sock.close()
            raise OSError("your proxy %s:%d said %s" % (upstream[0], upstream[1],
                                                        status[:100] or "nothing"))
        return sock

    def note(self, client, dest, why):
        """A refusal, kept for the run it came from (the engine's DNS names
        it: CONTAINER.NETWORK), a few hundred runs and 20 places each."""
        import socket
        try:
            name = socket.gethostbyaddr(client)[0]
        except OSError:
            name = client
        name = name[:-len(self.spec["network"]) - 1] if name.endswith(
            "." + self.spec["network"]) else name
        with self.lock:
            record = self.refused.pop(name, None) or {"count": 0, "places": {}}
            self.refused[name] = record  # (newest last: the oldest go first)
            record["count"] += 1
            if dest in record["places"] or len(record["places"]) < 20:
                place = record["places"].setdefault(dest, {"count": 0, "why": why})
                place["count"] += 1
            while len(self.refused) > 500:
                del self.refused[next(iter(self.refused))]


def serve_egress():
    """The egress proxy's main, in its container (see Egress.start)."""
    return EgressProxy(json.loads(os.environ["PI_AGENT_EGRESS_SPEC"])).serve()


def local_addresses():
    """This host's own addresses (Linux's /proc; none elsewhere)."""
    import socket
    found, last = set(), None
    try:
        with open("/proc/net/fib_trie", encoding="ascii") as handle:
            for row in handle:
                words = row.split()
                if words[:1] == ["|--"]:
                    last = words[1]
                elif "host LOCAL" in row and last:
                    found.add(last)
        with open("/proc/net/if_inet6", encoding="ascii") as handle:
            for row in handle:
                # (as the proxy spells them: fd00::2, never fd00:0000:...:0002)
                found.add(socket.inet_ntop(socket.AF_INET6, bytes.fromhex(row.split()[0])))
    except (OSError, ValueError):
        pass
    return found


def upstream_proxy(name, url):
    """[host, port, Proxy-Authorization or None] of your proxy `url`, which
    the egress proxy goes on through. One on your host's loopback (cntlm,
    px) is the host's, host.docker.internal to the proxy (see keep)."""
    import base64
    from urllib.parse import unquote
    found = re.fullmatch(r"(?:http://)?(?:([^@/]*)@)?(\[[0-9A-Fa-f:.]+\]|[^][:/@]+):(\d{1,5})/?",
                         url.strip())
    if not found:
        raise BadSetting("%s: the egress proxy goes on through a proxy of yours given as "
                         "http://HOST:PORT (user:password@ too); write it so, or use "
                         "PI_AGENT_EGRESS=open" % name)
    auth = found.group(1) and "Basic " + base64.b64encode(unquote(found.group(1)).encode()
                                                          ).decode()
    host = found.group(2).strip("[]").lower()
    return ["host.docker.internal" if host in ("localhost", "::1") or host.startswith("127.")
            else host, int(found.group(3)), auth]


# What the proxy says to the host where the host has no route to it
# (rootless engines, Podman, an engine elsewhere): asked inside its
# container, from its loopback, through the engine.
ASK_INSIDE = ("import socket, sys; s = socket.create_connection(('127.0.0.1', %d), 5); "
              "s.sendall(sys.argv[1].encode()); sys.stdout.buffer.write(b''.join(iter("
              "lambda: s.recv(65536), b'')))" % EGRESS_PORT)


class Egress:
    """A run's network as PI_AGENT_EGRESS (or --offline) has it: its docker
    run arguments and proxy variables, the proxy brought up (ensure),
    kept up and asked what it refused (ask), and your host's ports
    forwarded (listen, keep)."""

    def __init__(self, config, environ, offline=False):
        self.mode = "none" if offline else config.egress
        self.base = config.image_repo + ":base"  # (the proxy's image: never current)
        self.inside = "pi-agent-egress-%d" % os.getuid()
        self.outside = self.inside + "-out"
        self.state = os.path.join(config.state_dir, "egress.json")
        self.ports = config.host_ports if self.mode != "none" else []
        self.proxy = self.address = self.bridge = None
        self.routed, self.local, self.listeners = False, None, []
        self.forward = list(self.ports)  # (and your proxy's port, if it is on your loopback)
        self.network = {"none": "none", "open": config.network}.get(self.mode, self.inside)
        if self.network != self.inside:
            return
        self.local = local_addresses()
        allow = list(config.egress_allow) + [
            {"name": name, "port": None} for name in AGENT_HOSTS.get(config.agent, ())
            if self.mode == "allow"]
        proxies = {name: environ[name] for name in PROXY_ENV if environ.get(name)} or \
            docker_config_proxies()
        bypass = [word.strip().lower() for word in (proxies.get("NO_PROXY") or proxies.get(
            "no_proxy") or "").split(",") if word.strip()]
        upstream = {"no_proxy": ["*"] if "*" in bypass else sum(
            ([word.lstrip("*."), "*." + word.lstrip("*.")] for word in bypass), [])}
        for kind, names in (("http", ("HTTP_PROXY", "http_proxy")),
                            ("https", ("HTTPS_PROXY", "https_proxy"))):
            name = next((name for name in names + ("ALL_PROXY", "all_proxy") if proxies.get(
                name) and (name in names or proxies[name].startswith("http://"))), None)
            if name:  # (an ALL_PROXY of another kind, socks, is not the egress proxy's)
                upstream[kind] = upstream_proxy(name, proxies[name])
                if upstream[kind][0] == "host.docker.internal":
                    self.forward.append(upstream[kind][1])
        import ipaddress
        nets = [ipaddress.ip_network(entry["net"]) for entry in allow if "net" in entry]
        never = sorted(address for address in self.local if address_class(address) == "public"
                       or any(ipaddress.ip_address(address) in net for net in nets))
        self.spec = {"mode": self.mode, "allow": allow, "host_ports": self.ports,
                     "never": never, "upstream": upstream, "network": self.inside,
                     "runs": True}
        module = os.stat(__file__)
        self.proxy = "%s-%s" % (self.inside, text_digest(json.dumps(
            [self.spec, self.base, os.path.abspath(__file__), module.st_mtime_ns,
             module.st_size],
            sort_keys=True))[:12])
        self.spec["name"] = self.proxy

    def run_args(self):
        if self.proxy:
            # The engine's DNS answers the engine's names only there: an
            # outside name fails in a second, not twenty. No IPv6 at all.
            # Its alias is what its proxy serves (EgressProxy.member): every
            # policy's proxy is on this network, and serves its own runs only.
            return ["--network", self.network, "--network-alias", self.proxy + "-runs",
                    "--dns-opt", "timeout:1", "--dns-opt", "attempts:1",
                    "--sysctl", "net.ipv6.conf.all.disable_ipv6=1"]
        # (Podman names the host itself: host.containers.internal)
        return (["--network", self.network] if self.network else []) + (
            ["--add-host", "host.docker.internal:host-gateway"]
            if self.mode == "open" and engine_kind() != "podman" else [])

    def environ(self, environ):
        """`environ` as a run takes its proxy variables from: the egress
        proxy's (yours are the proxy's own way on, never the agent's)."""
        if not self.proxy:
            return environ
        url, local = "http://%s:%d" % (self.proxy, EGRESS_PORT), "localhost,127.0.0.1,::1"
        return dict(environ, HTTP_PROXY=url, HTTPS_PROXY=url, http_proxy=url, https_proxy=url,
                    NO_PROXY=local, no_proxy=local, ALL_PROXY="", all_proxy="")

    def describe(self):
        return {"public": "the internet, not your host, LAN or cloud metadata",
                "allow": "only PI_AGENT_EGRESS_ALLOW and the agent's own hosts",
                "open": "the engine's network %s, your host and LAN too" % (
                    self.network or "(its default bridge)"),
                "none": "no network"}[self.mode] + (
            "; through the egress proxy %s" % self.proxy if self.proxy else "") + (
            "; your host's ports %s as host.docker.internal" % ",".join(map(str, self.ports))
            if self.ports else "")

    def ensure(self):
        """The run's proxy up (asked where the last run found it: no engine
        call), else started, with its networks; your host's ports' bridge."""
        if self.mode == "open" and self.ports:
            names = ["bridge"] + [self.network] * (self.network not in ("", "bridge"))
            rows = docker("network", "inspect", "--format", "{{range .IPAM.Config}}"
                          "{{.Gateway}} {{.Subnet}} {{end}}", *names).stdout.split()
            self.bridge = (rows[0], rows[-1])  # (host-gateway's address; the run's subnet)
        if not self.proxy:
            return
        try:
            known = json.loads(read_regular(self.state) or b"{}")
        except (OSError, ValueError):
            known = {}
        self.address = known.get(self.proxy)
        self.bridge = known.get("outside")
        self.routed = bool(self.bridge) and self.bridge[0] in self.local and \
            known.get("routed", False)
        if self.routed and self.address and self.tell() is not None:
            return
        # One at a time: runs of two profiles (one base, one proxy) would
        # both start it, and the engine names a container before it has it;
        # runs of two state directories, both make the networks (per user:
        # the runtime directory, yours alone, where there is one).
        flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW
        try:
            held = os.open(os.path.join(os.environ["XDG_RUNTIME_DIR"], "pi-agent-egress.lock"),
                           flags, 0o600)
        except (KeyError, OSError):  # (none, or not yours: after su)
            held = os.open(os.path.join(os.path.dirname(self.state), "egress.lock"), flags,
                           0o600)
        with os.fdopen(held):
            fcntl.flock(held, fcntl.LOCK_EX)
            try:
                known = json.loads(read_regular(self.state) or b"{}")
            except (OSError, ValueError):
                known = {}
            info = inspect("container", self.proxy) or {}
            running = info.get("State", {}).get("Running")
            if not running:
                self.start(known)
            elif not self.bridge:
                self.networks(known)
            deadline = time.monotonic() + EGRESS_WAIT
            while True:
                if not running:
                    info = inspect("container", self.proxy) or {}
                self.address = ((info.get("NetworkSettings") or {}).get("Networks")
                                or {}).get(self.outside, {}).get("IPAddress")
                if not info.get("State", {}).get("Running"):
                    raise EngineError("the egress proxy %s stopped as it started (it runs "
                                      "%s's python3, which must be 3.9 or newer); "
                                      "PI_AGENT_EGRESS=open runs without it"
                                      % (self.proxy, self.base))
                if running and not self.routed or self.tell() is not None:
                    break  # (up already: an engine the host has no route to is not asked)
                running = False
                if time.monotonic() > deadline:
                    raise EngineError("the egress proxy %s does not answer; docker logs %s "
                                      "says why; PI_AGENT_EGRESS=open runs without it"
                                      % (self.proxy, self.proxy))
                time.sleep(0.05)
            known[self.proxy] = self.address
            replace_file(self.state, json.dumps(known).encode())

    def networks(self, known):
        """The internal network (made with no address on the host, and
        checked to be so) and the proxy's way out, made if missing."""
        if engine_kind() == "podman":  # (its networks take none of Docker's options)
            raise Refused("PI_AGENT_EGRESS=%s needs a network with no address on your host, "
                          "which pi-agent makes on Docker only, not yet on Podman; set "
                          "PI_AGENT_EGRESS=open (the engine's own network, which reaches your "
                          "host and LAN) or none (no network)" % self.mode)
        def look():
            out = docker("network", "inspect", "--format", '{{.Name}} {{.Internal}} {{index '
                         '.Options "com.docker.network.bridge.inhibit_ipv4"}} {{range '
                         '.IPAM.Config}}{{.Gateway}} {{.Subnet}} {{end}}', self.inside,
                         self.outside, check=False).stdout
            return {row.split()[0]: row.split()[1:] for row in out.splitlines() if row.strip()}
        found = look()
        for name, args in ((self.inside, ["--internal", "-o",
                                          "com.docker.network.bridge.inhibit_ipv4=true"]),
                           (self.outside, [])):
            if name not in found:
                made = docker("network", "create", "--label", LABEL + "egress=%d" % os.getuid(),
                              *args, name, check=False)
                if made.returncode and "already exists" not in made.stderr:
                    raise docker_failure(("network",), made.stderr)
                # Two made at once (runs of two state directories) are two
                # networks of one name to Docker 20.10: all keep the first.
                same = sorted(row.split()[0] for row in docker(
                    "network", "ls", "--no-trunc", "--filter", "name=" + name, "--format",
                    "{{.ID}} {{.Name}}").stdout.splitlines() if row.split()[1:] == [name])
                if len(same) > 1:
                    docker("network", "rm", *same[1:], check=False)
        found = look()
        # A bridge is this host's own interface where Docker made it here
        # (br-ID): an engine in another network namespace (rootless, in a
        # container, elsewhere) may well use the same addresses as the host.
        ids = dict(row.split() for row in docker(
            "network", "inspect", "--format", "{{.Name}} {{.Id}}", self.inside, self.outside,
            check=False).stdout.splitlines() if len(row.split()) == 2)
        here = {name: os.path.exists("/sys/class/net/br-" + ids.get(name, "?")[:12])
                for name in (self.inside, self.outside)}
        inside = found.get(self.inside, [])
        if inside[:2] != ["true", "true"] or len(inside) < 3 or \
                here[self.inside] and inside[2] in self.local:
            raise Refused("the engine's network %s is not internal with no address on your "
                          "host (Docker's com.docker.network.bridge.inhibit_ipv4), so a run on "
                          "it could reach your host: docker network rm %s lets pi-agent make "
                          "it again; where the engine cannot (Podman), PI_AGENT_EGRESS=open "
                          "or none" % (self.inside, self.inside))
        self.bridge = known["outside"] = found.get(self.outside, [])[-2:]
        self.routed = known["routed"] = bool(self.bridge) and self.bridge[0] in self.local \
            and here[self.outside]

    def start(self, known):
        self.networks(known)
        module = os.path.abspath(__file__)
        started = docker(
            "run", "-d", "--rm", "--name", self.proxy, "--network", self.outside,
            # (none of the line's: not the repository's label, which the base
            # would give it, so no listing of the line's containers waits for it)
            "--label", LABEL + "egress=%d" % os.getuid(), "--label", LABEL + "repo=",
            "--label", LABEL + "egress-base=" + self.base,
            "--user", "%d:%d" % (
                os.getuid(), os.getgid()), "--cap-drop", "ALL", "--security-opt",
            "no-new-privileges", "--read-only", "--memory", "256m", "--pids-limit",
            str(EGRESS_MAX + 64), "--sysctl", "net.ipv4.ip_forward=0",
            "--env", "PI_AGENT_EGRESS_SPEC", "--mount",
            mount_spec(module, "/pi-agent/pi_agent.py") + ",readonly", "--entrypoint", "python3",
            self.base, "-I", "-B", "-c", "import sys; sys.path.insert(0, '/pi-agent'); "
            "import pi_agent; sys.exit(pi_agent.serve_egress())", check=False,
            env=dict(os.environ, PI_AGENT_EGRESS_SPEC=json.dumps(self.spec)))
        if started.returncode and "Conflict" not in started.stderr:  # (another run's, then)
            why = "%s has no python3, which it runs (a base of your own?)" % self.base \
                if '"python3": executable file not found' in started.stderr else \
                str(docker_failure(("run",), started.stderr))[len("docker run failed: "):]
            raise EngineError("the egress proxy did not start: %s; PI_AGENT_EGRESS=open runs "
                              "without it" % why)
        joined = docker("network", "connect", self.inside, self.proxy, check=False)
        if joined.returncode and "already exists" not in joined.stderr:
            raise docker_failure(("network",), joined.stderr)

    def tell(self, addresses=None):
        """The proxy told this host's own addresses (never reachable from a
        run, whatever the exceptions say), `addresses` or all it has: a
        network made after the proxy started gives the host a new one (and
        a name an exception lets through may resolve to one of its private
        ones). What the proxy says (ask), None if it does not answer."""
        found = sorted(address for address in (self.local if addresses is None
                                                else addresses)
                       if address_class(address) != "never")
        said = None
        for start in range(0, max(len(found), 1), 300):  # (a request's head: 16 kB at most)
            said = self.ask("never/" + ",".join(found[start:start + 300]))
        return said

    def ask(self, path):
        """What the proxy says (`path`: a run's container, for what it
        refused), asked as the host; None if it does not answer, or is
        another proxy."""
        request = "GET /%s HTTP/1.0\r\n\r\n" % path
        if self.routed:
            import _socket
            sock = _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM)
            sock.settimeout(2)
            try:
                sock.connect((self.address, EGRESS_PORT))
                sock.sendall(request.encode())
                data = b"".join(iter(lambda: sock.recv(65536), b""))
            except OSError:
                return None
            finally:
                sock.close()
        else:
            data = docker("exec", self.proxy, "python3", "-I", "-c", ASK_INSIDE, request,
                          check=False, capture=False, stdout=subprocess.PIPE,
                          stderr=subprocess.DEVNULL).stdout or b""
        try:
            said = json.loads(data.partition(b"\r\n\r\n")[2])
        except ValueError:
            return None
        return said if isinstance(said, dict) and said.get("name") == self.proxy else None

    def listen(self):
        """Your host's ports, each a socket on the bridge's address on the
        host (the proxy's way out; an open run's own), made before the run
        (a port that cannot be stops it) for the saver to serve (keep)."""
        import socket
        sockets = []
        for port in sorted(set(self.forward)):
            sock = socket.socket()
            sockets.append(sock)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)  # (runs side by side)
                sock.bind((self.bridge[0], port))
                sock.listen(16)
            except (OSError, TypeError) as err:
                for each in sockets:
                    each.close()
                raise BadSetting("PI_AGENT_HOST_PORTS (or a proxy of yours on your loopback): "
                                 "port %d cannot be forwarded from the engine's bridge (%s: "
                                 "%s): it needs an engine whose bridges are on this host (not "
                                 "rootless Docker, Podman or Docker Desktop, yet)" % (
                                     port, self.bridge and self.bridge[0],
                                     getattr(err, "strerror", err)))
        return sockets

    def keep(self, listeners):
        """In the saver while its run lasts: the proxy asked every
        EGRESS_KEEP seconds (so it does not end while a run waits for its
        user), and your host's ports forwarded, to the bridge's containers
        only. Returns what stops it (and closes the ports at once)."""
        import ipaddress
        import select
        import socket
        import threading
        stop = threading.Event()

        def end():
            stop.set()
            for listener in listeners:
                listener.close()
        if not (self.proxy or listeners):
            return end
        subnet = ipaddress.ip_network(self.bridge[1]) if listeners else None

        def forward(conn, port):
            with conn:
                try:
                    with socket.create_connection(("localhost", port), EGRESS_WAIT) as there:
                        splice(conn, there)
                except OSError:
                    pass

        def serve():
            asked, known, trie = 0.0, set(self.local or ()), None
            while not stop.is_set():
                try:  # (a network made meanwhile gives the host an address: told at once)
                    with open("/proc/net/fib_trie", "rb") as handle:
                        now = handle.read()
                except OSError:
                    now = None
                if self.proxy and now != trie:
                    trie, found = now, local_addresses()
                    if found - known:
                        self.tell(found - known)
                    known |= found
                if self.proxy and time.monotonic() - asked > EGRESS_KEEP:
                    asked = time.monotonic()
                    self.tell()
                if not listeners:
                    stop.wait(0.5)
                    continue
                try:
                    for listener in select.select(listeners, [], [], 0.5)[0]:
                        conn, peer = listener.accept()
                        if ipaddress.ip_address(peer[0]) in subnet:
                            threading.Thread(target=forward, args=(
                                conn, listener.getsockname()[1]), daemon=True).start()
                        else:
                            conn.close()
                except (OSError, ValueError):
                    return  # (closed: the run has ended)
        threading.Thread(target=serve, daemon=True).start()
        return end


# -------------------------------------------------------------------- the run
#
# One run, start to end: the map below, then its steps, each before the step
# that calls it.


# A run, as run_lifecycle (at the end of this section) takes it. Each step
# below is defined before the step that calls it; the mechanisms it uses
# are in the sections above.
#
#  1. find       find_target (the project) picks the directory to mount; a
#                session joins a run of its profile already there instead
#                (join_run).
#  2. lock       the image line's (LineLock), then the project's
#                (lock_project, both in state and locks), held while
#                Project.inspect looks through the project (look_through,
#                config_facts).
#  3. prepare    prepare_run, under both: what an interrupted run left is
#                saved first (recover_leftovers, with save_run); current is
#                there (ensure_current); the run is planned (RunPlan) and
#                written down (write_run_dir: its script and record, and the
#                git gate, seed_gate); hard links out of the project are
#                broken (unshare_links); the project is watched
#                (ProjectWatch).
#  4. fork       the Saver, a detached process that saves the run whatever
#                becomes of the wrapper.
#  5. run        run_container: docker run in the foreground (run_attached);
#                the container stopped for sure once it returns
#                (ensure_stopped).
#  6. hand over  hand_over: the container has stopped; the saver hears its
#                status while the wrapper ends the run in the project
#                (end_run: git back through the gate, hand_back_git; the
#                sweep, sweep).
#  7. save       in the saver (Saver._main): save_run, the one save: the
#                commit into current (commit_run; not made when too big,
#                save_cost), or current put back when nothing changed;
#                snapshots pruned (prune_if_due); current flattened at the
#                threshold (flatten_if_due).
#  8. end        finish_saved, whoever saved: the session logged
#                (Line.record_session), the locks freed, then the container
#                and its run directory gone (teardown). What the run changed
#                is read from its layer when someone asks (ensure_reports);
#                only an engine without layer directories has it recorded
#                here, from its diff (record_changes).


# --- find the project

class Project:
    """The project as a run finds it, read before anything starts: where it
    is, its repository, whether the run mounts a private .git there
    (`gated`), the git directories and .git files already inside it (the
    git directories are mounted read-only), what host git reads from it."""

    def __init__(self, target, subdir="", repo=None, notes=(), gated=False, git_dirs=None,
                 git_files=None, protected=(), object_format="sha1", dirs=(), modules=False,
                 read=(), git_config=(), linked=None, module_configs=()):
        self.target, self.subdir, self.repo, self.notes = target, subdir, repo, list(notes)
        self.gated, self.protected, self.format = gated, list(protected), object_format
        self.read = list(read)  # what host git reads as the repository's config and hooks
        self.git_config = [list(entry) for entry in git_config]  # what the gate takes of it
        self.git_dirs, self.git_files, self.dirs = git_dirs or {}, git_files or {}, list(dirs)
        self.modules = modules
        self.module_configs = [list(entry) for entry in module_configs]  # submodules' configs
        self.linked = linked or {}  # {path: lstat}: see shared_files

    @classmethod
    def inspect(cls, config, cwd, here, hold=None, found=None):
        """Find and read the project; refusals (Refused) come from here,
        with nothing changed. `hold(target, paths)` runs before it is read
        (a lock that keeps another run's agent from changing it, or the
        other paths host git reads for it, meanwhile), and again with all
        of those paths once they are known. `found`: what find_target()
        found already."""
        target, subdir, repo, notes = found or find_target(cwd, home_dirs(), here,
                                                           guarded_dirs(config))
        if hold:
            hold(target, [repo.common, repo.gitdir] if repo else [])
        check_armed(config.state_dir, target, forget=hold is not None)
        try:
            gated = repo is not None or stat.S_ISDIR(os.lstat(os.path.join(target, ".git")).st_mode)
        except OSError:
            gated = True
        listing = start_config_listing(repo) if repo else None
        # (a look for a dry run or pi-status keeps nothing: those write no state)
        found = look_through(target, gated, project_file(config.state_dir, target, ".scan")
                             if hold else None)
        sockets = sorted(path for path, info in found if stat.S_ISSOCK(info.st_mode))
        if sockets:
            raise Refused("refusing to mount %s: it holds Unix sockets (%s), doors to programs "
                          "on your host that the agent could use; stop what listens there and "
                          "remove the socket (or give it one outside the project), or cd into "
                          "a subdirectory without one and use --here" % (
                              target, ", ".join(sockets[:3] + ["..."] * (len(sockets) > 3))))
        mounts = mounts_below(target)
        if mounts:
            raise Refused("refusing to mount %s: file systems are mounted inside it (%s), which "
                          "a run would reach and the sweep after it does not look into; unmount "
                          "them, or cd into a part without one and use --here" % (
                              target, ", ".join(mounts[:3] + ["..."] * (len(mounts) > 3))))
        git_dirs, git_files = git_entries(target, found)
        facts = config_facts(listing, target, repo, [os.path.join(target, path)
                                                     for path in git_dirs if path != ".git"])
        if hold and repo:
            hold(target, [repo.common, repo.gitdir] + facts["read"])
        if repo and os.path.exists(os.path.join(repo.common, "objects", "info", "alternates")):
            notes.append("the repository borrows objects from another (git clone --shared or "
                         "--reference); inside, those objects are missing")
        if len(outermost(git_dirs)) > MAX_NESTED_GIT:
            raise Refused("refusing to mount %s: it holds %d git repositories, each of which "
                          "would be mounted read-only; cd into one and use --here"
                          % (target, len(git_dirs)))
        dirs = [path for path, info in found if stat.S_ISDIR(info.st_mode)]
        if facts["left_out"]:
            notes.append("your repository's git config holds what may be credentials (%s): "
                         "they stay out of the run" % ", ".join(facts["left_out"][:4]))
        readonly = list(git_dirs) + [os.path.relpath(path, target)
                                     for path, _dev, _ino in facts["protected"]]
        modules, module_configs = submodules_mountable(repo, target, notes) if repo else (
            False, [])
        return cls(target, subdir, repo, notes, gated, git_dirs, git_files, facts["protected"],
                   facts["format"], dirs, modules, facts["read"], facts["local"],
                   shared_files(found, readonly), module_configs)

    def protect_mounts(self, point):
        """Read-only mounts of what host git reads in the project: the git
        directories inside it, and its config's files there."""
        paths = [os.path.join(self.target, path) for path in self.git_dirs]
        paths += [path for path, _dev, _ino in self.protected]
        return [(path, inside_path(path, self.target, point), True) for path in outermost(paths)]


# --- plan: what runs inside, and how; or join a run already there

def agent_command(kind, argv, config, network):
    """What a session of `kind` runs inside: the command (exec), a shell,
    or the agent (run), installed on first use."""
    if kind == "exec":
        # Through sh: a missing command is the shell's one line and 127,
        # not the runtime's OCI error and 126.
        return ["sh", "-c", 'exec "$@"', "pi-exec"] + list(argv)
    if kind == "shell":
        return ["sh", "-c", "command -v bash >/dev/null 2>&1 && exec bash; exec sh"]
    if network == "none":
        script = ('command -v "$1" >/dev/null 2>&1 || {'
                  ' echo "pi-agent: $1 is not installed here, and an offline run cannot'
                  ' install it; run pi once with the network" >&2; exit 127; }; exec "$@"')
        return ["sh", "-c", script, "pi-agent"] + config.command_argv + list(argv)
    # Installed on first use: on a terminal with its output and the
    # time it took; in a pipe quietly (its output only if it fails),
    # so that the agent's own output stays clean.
    script = ('command -v "$1" >/dev/null 2>&1 || {'
              ' log=/tmp/pi-agent-install.log; started=$(date +%s);'
              ' if [ -t 2 ]; then'
              ' echo "pi-agent: $1 is not installed here; installing it:'
              ' $PI_AGENT_INSTALL_CMD" >&2;'
              ' sh -c "$PI_AGENT_INSTALL_CMD" >&2; status=$?; else'
              ' sh -c "$PI_AGENT_INSTALL_CMD" >"$log" 2>&1; status=$?;'
              ' if [ $status != 0 ] || ! command -v "$1" >/dev/null 2>&1; then'
              ' cat "$log" >&2; fi; fi;'
              ' rm -f "$log";'
              ' if [ $status != 0 ]; then'
              ' echo "pi-agent: the install command failed (exit $status); fix'
              ' PI_AGENT_INSTALL_CMD or PI_AGENT_COMMAND (pi-status shows them). Paths it'
              ' named are inside the environment, not on your host: pi-exec cat PATH shows'
              ' one" >&2;'
              ' exit $status; fi;'
              ' command -v "$1" >/dev/null 2>&1 || {'
              ' echo "pi-agent: the install command ended without installing $1 (its'
              ' output is above: no network?); check that, or fix PI_AGENT_INSTALL_CMD or'
              ' PI_AGENT_COMMAND (pi-status shows them)" >&2;'
              ' exit 127; };'
              ' [ -t 2 ] && echo "pi-agent: installed $1 in $(( $(date +%s) - started )) s" >&2;'
              ' };'
              ' exec "$@"')
    return ["sh", "-c", script, "pi-agent"] + config.command_argv + list(argv)


def container_env(environ, pass_env):
    """[(name, value)] a run exports inside: the short list, the locale, and
    PI_AGENT_PASS_ENV from our environment; credentials set empty. The
    docker client's proxies come in where ours are not set."""
    if not any(name in environ for name in PROXY_ENV):
        environ = dict(docker_config_proxies(), **environ)
    names = [name for name in ALLOWED_ENV if name in environ]
    names += [name for name in LOCALE_ENV if LOCALE_VALUE.fullmatch(environ.get(name, "-" * 65))]
    names += [name for name in pass_env if name in environ and name not in names]
    return [(name, environ[name]) for name in names] + [(name, "") for name in CREDENTIAL_ENV]


def session_env(config, kind, environ, egress=None):
    """[(name, value)] a session of `kind` gets: the agent's keys reach the
    agent only, unless PI_AGENT_PASS_ENV names them (see Config); the
    proxy variables are the egress proxy's, if it has one."""
    env = container_env(egress.environ(environ) if egress else environ,
                        config.pass_env if kind == "run" or not config.keys_for_agent_only
                        else [])
    if egress and egress.proxy:
        env.append(("NODE_USE_ENV_PROXY", "1"))  # (Node's fetch: 22.21 and newer)
    if not any(name == "EMAIL" for name, _value in env):
        env.append(("EMAIL", config.git_identity[1]))  # (see session_script())
    if kind == "run":
        env.append(("PI_AGENT_INSTALL_CMD", config.install_cmd))
    # Installs inside copy files into the project, never link them to a cache.
    env += [(name, "copy") for name in ("UV_LINK_MODE", "npm_config_package_import_method")
            if name not in dict(env)]
    return env


def session_script(container, env, config, workdir, command, redact=False, main=False):
    """A session's script: its environment, git's identity fallback, the
    working directory, the command. The run's own (`main`) stays the
    command's parent where it can, so that sessions that joined the run
    (see JOIN_FILE) end when they leave, not with the agent: tini (docker
    run --init) must send signals to the whole process group for that
    (TINI_KILL_PROCESS_GROUP, in the shipped Dockerfile), so that the agent
    still gets them, and flock is needed."""
    lines = ["#!/bin/sh",
             "# pi-agent: the environment and command of %s (removed when it ends)" % container]
    for name, value in env:
        shown = "<from your environment>" if redact and value else value
        lines.append("export %s=%s" % (name, shlex.quote(shown)))
    # git's fallbacks for an image with no identity (EMAIL, in env, for the
    # address): commits work in any image, and nothing is written into a
    # git config. A user.name the image has stays; it is looked for with
    # the shell's own read (git config would cost every run 5 ms).
    name = shlex.quote(config.git_identity[0])
    lines += [
        'for f in "$HOME/.gitconfig" "${XDG_CONFIG_HOME:-$HOME/.config}/git/config" '
        '/etc/gitconfig; do [ -r "$f" ] || continue; s=',
        '  while IFS= read -r l || [ -n "$l" ]; do case $l in *"["*) s=$l ;; *name*=*)',
        '    case $s in *[Uu][Ss][Ee][Rr]*) named=1 ;; esac ;; esac; done < "$f"',
        'done',
        '[ -n "${named-}" ] || export GIT_AUTHOR_NAME=%s GIT_COMMITTER_NAME=%s' % (name, name),
        'unset f s l named']
    lines.append("cd %s || exit 1" % shlex.quote(workdir))
    run = shlex.join(command)
    if not main:
        return "\n".join(lines + ["exec " + run]) + "\n"
    lines += [
        'if [ -z "${TINI_KILL_PROCESS_GROUP+set}" ] || ! command -v flock >/dev/null 2>&1; then',
        "  exec " + run,
        "fi",
        # (a run stopped by a signal ends the sessions that joined it too)
        "stopped=",
        "trap stopped=1 INT TERM HUP",
        run,
        "status=$?",
        'if [ -z "$stopped" ]; then',
        "  exec 9<%s/%s" % (RUN_DIR_INSIDE, JOIN_FILE),
        "  flock -w 2 9",
        "  said=",
        '  while [ -z "$stopped" ]; do',
        "    open=",
        "    for f in %s/%s*; do" % (RUN_DIR_INSIDE, JOIN_PREFIX),
        '      [ -e "$f" ] && ! flock -n "$f" true && open=1',
        "    done",
        '    [ -n "$open" ] || break',
        '    [ -n "$said" ] || echo "pi-agent: the run has ended; it is saved when the sessions '
        'that joined it leave (ctrl-c ends them now)" >&2',
        "    said=1",
        "    sleep 0.5",
        "  done",
        "fi",
        "exit $status"]
    return "\n".join(lines) + "\n"


def script_command(image, run_dir):
    """The end of a `docker run` that runs the script in run_dir. An
    image's entrypoint is replaced by the script itself, so the container
    has no command to leave in the commit; without one, the command runs
    it, and the commit puts the image's CMD back."""
    script = RUN_DIR_INSIDE + "/" + RUN_SCRIPT
    args = ["--mount", mount_spec(run_dir, RUN_DIR_INSIDE) + ",readonly"]
    if (image.get("Config") or {}).get("Entrypoint"):
        return args + ["--entrypoint", script, image["Id"]]
    return args + [image["Id"], "sh", script]


class RunPlan:
    """Everything a run needs, computed before anything starts (pure).
    `snapshot` names the tag that keeps current as it was before the run;
    `kept`: that snapshot kept it already (after a rollback), so the run
    makes no new one, and never takes that one back."""

    def __init__(self, line, kind, argv, image, project, environ, now, pid, tty, snapshot,
                 offline=False, kept=False):
        config = line.config
        self.line, self.kind, self.argv, self.image = line, kind, list(argv), image
        self.environ, self.tty, self.offline, self.project = environ, tty, offline, project
        self.egress = Egress(config, environ, offline)
        self.network = self.egress.network
        self.target, self.subdir = project.target, project.subdir
        self.started, self.snapshot, self.kept = now, snapshot, kept
        home = image_home(image)
        self.mount_point = mount_point(self.target, home, config.mount_at)
        self.workdir = os.path.join(self.mount_point, self.subdir) if self.subdir \
            else self.mount_point
        # The engine creates a new mount point's missing parents as root; in
        # a non-root agent's home they must be the agent's (~/src of
        # ~/src/app). Parents of a mount point the image has seen were made then.
        known = known_mounts(image)
        self.home_parents = []
        user = ((image.get("Config") or {}).get("User") or "").split(":")[0]
        if (self.mount_point not in known and self.mount_point.startswith(home + "/")
                and user not in ("", "root", "0")):
            parent = os.path.dirname(self.mount_point)
            while parent != home:
                if not any(is_within(seen, parent) for seen in known):
                    self.home_parents.insert(0, parent)
                parent = os.path.dirname(parent)
        self.container = "pi-agent-%s-%s-%d" % (line.slug, time.strftime(
            "%Y%m%d-%H%M%S", time.gmtime(now)), pid)
        self.run_dir = os.path.join(line.run_dir, self.container)
        self.labels = {LABEL + "repo": line.repo, LABEL + "profile": line.profile,
                       OWNER_LABEL: str(os.getuid()), LABEL + "pid": str(pid),
                       LABEL + "host": os.uname().nodename, LABEL + "target": self.target,
                       LABEL + "started": utc_iso(now), LABEL + "kind": kind,
                       LABEL + "snapshot": snapshot, LABEL + "kept": "1" if kept else ""}
        self.env = session_env(config, kind, environ, self.egress)
        self.record = self._record()
        self.mounts = ([(self.target, self.mount_point, False)]
                       + gate_mounts(self.record, self.run_dir)
                       + project.protect_mounts(self.mount_point))
        self.run_args = self._run_args()

    def on(self, image, snapshot):
        """The same run, started from another image, kept by a new snapshot."""
        plan = RunPlan(self.line, self.kind, self.argv, image, self.project, self.environ,
                       self.started, int(self.labels[LABEL + "pid"]), self.tty, snapshot,
                       self.offline)
        plan.egress = self.egress  # (brought up already: see prepare_run)
        return plan

    def _record(self):
        """The run record: what whoever ends the run (end_run) needs, kept
        as RUN_RECORD in its run directory until the run is ended. Its keys,
        who writes them (w) and who reads them (r):

          container kind target point uid gid started  w: here
              r: end_run, the sweep, the hand-back (its reflog messages)
          gated format repo{gitdir common linked modules} git_dirs git_files
          protected read git_config module_configs linked  w: here, from
              Project.inspect; r: seed_gate, gate_mounts, the sweep,
              end_unended (the locks it takes), end_run (linked)
          head refs index gate_index state stash gate_config made_dot
              w: seed_gate (adopt_repository, for a repository the agent
              made); r: hand_back_git, end_run and abandon_run_dir (made_dot)
          identity host_run  w: prepare_run; r: note_commits, end_run
          notes  w: end_run, hand_back_git and its steps, the sweep;
              r: end_run, which returns them
          commits moved swept  w: note_commits, apply_ref_lines and
              move_refs, the sweep; r: run_summary
          disarmed armed  w: the sweep; r: end_run (keep_armed)
          summary  w: end_run (run_summary); r: hand_over, teardown
        """
        project, repo = self.project, self.project.repo
        return {
            "container": self.container, "kind": self.kind, "target": self.target,
            "point": self.mount_point, "uid": os.getuid(), "gid": os.getgid(),
            "started": self.started, "gated": project.gated, "format": project.format,
            "repo": repo and {"gitdir": repo.gitdir, "common": repo.common,
                              "linked": repo.linked,
                              "modules": project.modules},
            "git_dirs": [list(value) for value in project.git_dirs.values()],
            "git_files": {path: list(value) for path, value in project.git_files.items()},
            "protected": [list(entry) for entry in project.protected],
            "read": list(project.read), "git_config": project.git_config,
            "module_configs": project.module_configs,
            # (PI_AGENT_HARDLINKS=allow: the shared files, for end_run to name those changed)
            "linked": {path: [info.st_ino, info.st_ctime_ns] for path, info in
                       project.linked.items()} if self.line.config.hardlinks == "allow" else {},
            "head": None, "refs": {}, "index": None, "state": {}, "made_dot": False,
            "notes": [], "host_run": {}}

    def _run_args(self):
        args = ["run", "-i"] + (["-t"] if self.tty else []) + ["--init", "--name", self.container]
        args += label_args(self.labels)
        args += CAP_DROP_ARGS + self.line.engine.run_args()
        for source, destination, readonly in self.mounts:
            args += ["--mount", mount_spec(source, destination) + (",readonly" if readonly else "")]
        args += self.egress.run_args()
        return args + self.line.engine.limit_args(self.line.config.limits) + script_command(
            self.image, self.run_dir)

    def script(self, redact=False):
        """The run script: the environment, the working directory, the
        command; it waits for sessions that joined the run to leave."""
        # (it stays the agent's parent only where the engine's init signals
        # the whole group: elsewhere the agent would not get a signal)
        return session_script(self.container, self.env, self.line.config, self.workdir,
                              agent_command(self.kind, self.argv, self.line.config, self.network),
                              redact, main=self.line.engine.group_signals)

    def save_meta(self, exit_status):
        """The save's facts, `meta`, as save_run() takes them (recovery
        makes them from a container's labels). Plain data, no process in
        it. Its keys, who writes them (w) and who reads them (r):

          repo profile pid host target started kind snapshot kept (the run
              labels), exit_status mount epoch command agent egress  w: here;
              r: commit_run (saved_labels, its message), record_session
          written  w: save_run (save_cost: what the commit writes, or None);
              r: commit_run (bytes_added, where image sizes are not the disk's)
          image_before image_after bytes_added layers new_image branched
              diff_output  w: commit_run; r: finish_saved (flatten),
              record_changes, record_session
          saved_as snapshot kept  w: save_run; r: finish_saved (prune),
              record_session
        """
        meta = {key[len(LABEL):]: value for key, value in self.labels.items()}
        meta.update(exit_status="unknown" if exit_status is None else str(exit_status),
                    mount=self.mount_point, epoch=self.started, command=self.argv,
                    agent=self.line.config.agent if self.kind == "run" else None,
                    egress=self.egress.mode)
        return meta


def write_run_dir(run_dir, script, record=None, identity=None):
    """A run's directory, which only the user can reach on the host (the
    parent is 0700), readable inside whatever the container's user: its
    script and, for a run in a project, its private git directory (see the
    git gate) and its record (RUN_RECORD)."""
    parent = os.path.dirname(run_dir)
    path = os.path.join(run_dir, RUN_SCRIPT)
    try:
        os.makedirs(parent, mode=0o700, exist_ok=True)
        os.chmod(parent, 0o700)
        os.mkdir(run_dir, 0o755)
        os.chmod(run_dir, 0o755)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o755)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(script)
        os.chmod(path, 0o755)
    except OSError as err:
        raise BadSetting("cannot write %s: %s; PI_AGENT_STATE_DIR must be a directory you "
                         "can write" % (path, err.strerror))
    if record is None:
        return
    try:
        write_file(os.path.join(run_dir, JOIN_FILE), b"")
        if record["gated"]:
            seed_gate(run_dir, record, identity)
        write_file(os.path.join(run_dir, RUN_RECORD), json.dumps(record).encode())
    except OSError as err:
        raise PiError("cannot prepare the run's git directory in %s: %s" % (run_dir, err))


def read_run_record(run_dir):
    """The record a run left in its directory, or None."""
    try:
        record = json.loads(read_regular(os.path.join(run_dir, RUN_RECORD), 1 << 30) or b"")
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def remove_run_dir(run_dir, script_only=False, line=None):
    """The script goes when the run ends; the rest of the directory stays
    until the container is removed, so that a saved container whose remover
    died is told from one it removed without asking the engine. What the
    agent left there as root (in its git directory) goes as root."""
    import shutil
    if script_only:
        try:
            os.remove(os.path.join(run_dir, RUN_SCRIPT))
        except FileNotFoundError:
            pass
        return
    try:
        shutil.rmtree(run_dir)
    except FileNotFoundError:
        pass
    except OSError:
        if line is not None:
            try:
                give_back(line, os.path.dirname(run_dir), [os.path.basename(run_dir)],
                          os.getuid(), os.getgid())
            except PiError:
                pass
        shutil.rmtree(run_dir, ignore_errors=True)


def abandon_run_dir(run_dir, record):
    """The directory of a run that never started goes, with the empty .git
    it made in a project that has no repository."""
    if record.get("made_dot"):
        try:
            os.rmdir(os.path.join(record["target"], ".git"))
        except OSError:
            pass
    remove_run_dir(run_dir)


def make_home_parents(line, plan):
    """Create a new mount point and its parents in the agent's home, owned
    by the agent (the engine would make them root's), and commit that into
    current; returns the new current. Once per new directory: the image
    then knows the mount point. The session log has it (kind "prepare"),
    so that the way from base to current is all there."""
    image = plan.image
    user = image["Config"]["User"].split(":")[0]
    name = plan.container + "-prepare"
    run_dir = os.path.join(line.run_dir, name)
    labels = dict(plan.labels)
    labels[LABEL + "kind"] = "prepare"
    write_run_dir(run_dir, "#!/bin/sh\nmkdir -p %s && chown %s %s\n" % (
        shlex.quote(plan.mount_point), shlex.quote(user + ":"), shlex.join(plan.home_parents)))
    try:
        # --init as in a run, so that its mount point is made here too.
        docker("run", "--init", "--name", name, "--network", "none", "-u", "0",
               *CAP_DROP_ARGS, *line.engine.run_args(),
               *line.engine.limit_args(line.config.limits), *label_args(labels),
               *script_command(image, run_dir))
        labels = saved_labels(line, name, image, {"kind": "prepare", "target": plan.target,
                                                  "exit_status": 0, "mount": plan.mount_point})
        docker(*commit_args(name, image, labels, "pi-agent: %s for the agent"
                            % ", ".join(plan.home_parents)), line.current)
    finally:
        remove_run_dir(run_dir)
        docker("rm", "-f", "-v", name, check=False)
    new = inspect_image(line.current)
    line.record_session({"started": plan.labels[LABEL + "started"], "target": plan.target,
                         "kind": "prepare", "exit_status": 0, "image_before": image["Id"],
                         "image_after": new["Id"], "new_image": new, "container": name,
                         "bytes_added": (new.get("Size") or 0) - (image.get("Size") or 0)},
                        "run")  # (no mount: the directories it made are what it changed)
    return new


def print_plan(line, kind, argv, project, tty, offline):
    """--dry-run: what a run would do, as docker commands; nothing changes.
    (Printable only: the names come from the project, which the agent may
    have named.)"""
    def show(text):
        print(printable(text))

    current = inspect_image(line.current)
    if current is None:
        if inspect_image(line.base) is None:
            base_image = line.config.base_image
            show("# %s is missing: it would be built from %s, FROM %s (%s; until then its "
                 "CMD, USER and home are unknown: the commands below use defaults)"
                 % (line.base, line.config.dockerfile, base_image,
                    "here already" if inspect_image(base_image) else
                    "not here: the build would pull it; PI_AGENT_BASE_IMAGE picks another"))
        show(shlex.join([engine_kind(), "tag", line.base, line.current]))
        current = inspect_image(line.base) or {"Id": line.base, "Config": {}}
    now = time.time()
    kept = kept_as(line, current)
    plan = RunPlan(line, kind, argv, current, project, os.environ, now, os.getpid(), tty,
                   kept or snapshot_name(now), offline=offline, kept=bool(kept))
    show("# target %s mounted at %s, working directory %s" % (project.target, plan.mount_point,
                                                              plan.workdir))
    show("# network: PI_AGENT_EGRESS=%s, %s%s" % (plan.egress.mode, plan.egress.describe(), (
        " (%s running pi-agent's serve_egress, started if it is not running, on the internal "
        "network %s and %s)" % (plan.egress.base, plan.egress.inside, plan.egress.outside))
        if plan.egress.proxy else ""))
    if project.repo:
        show("# its git directory stays outside: the agent gets a private one at %s (see the "
             "docs/security.md: git through a gate)" % os.path.join(plan.run_dir, GATE_DIR))
    if plan.home_parents:
        show("# first, %s made the agent's in a container committed into current"
             % ", ".join(plan.home_parents))
    if plan.kept:
        show("# current is kept already, as %s: no new snapshot" % plan.snapshot)
    else:
        show(shlex.join([engine_kind(), "tag", current["Id"], line.snap(plan.snapshot)]))
    show("# %s, mounted read-only at %s:" % (os.path.join(plan.run_dir, RUN_SCRIPT),
                                             RUN_DIR_INSIDE))
    for text in plan.script(redact=True).splitlines():
        show("#   " + text)
    show(shlex.join([engine_kind(), *plan.run_args]))
    labels = {key: "..." for key in plan.labels}
    show(shlex.join([engine_kind(), *commit_args(plan.container, current, labels, "..."),
                     line.current]))
    show("# if that added no layer, the run changed nothing: current and the snapshot go back")
    show(shlex.join([engine_kind(), "rm", "-f", "-v", plan.container]))
    return 0


def running_session(line, target):
    """(holder, run directory) of the line's agent running in `target`, or None."""
    holder = line.read_state().get("holder")
    if not (agent_is_running(holder) and holder.get("phase") == "running"
            and holder.get("target") == target and isinstance(holder.get("container"), str)):
        return None
    return holder, os.path.join(line.run_dir, os.path.basename(holder["container"]))


def passed_secrets(env, config):
    """{name: a digest of its value} of the variables of `env` that may be
    secrets: PASS_ENV's, and the proxies (a proxy URL can hold a password)."""
    names = set(config.pass_env) | set(PROXY_ENV)
    return {name: sha256_hex(value.encode("utf-8", "surrogateescape"))
            for name, value in env if name in names}


def join_run(line, found, kind, args):
    """pi-shell (or pi) where the line's agent runs in the same project: a
    session in its container (docker exec), with this command's own
    environment, instead of waiting. The agent (pi) joins only the agent's
    run; a shell joins any. A session joins only what has its network, and
    brings no variable that may be a secret (passed_secrets) unless the
    container has it already (the agent there could read it). The
    container is saved once, by its run, after the last session has left
    (see JOIN_FILE). Returns the session's exit status, or None when there
    is no run to join."""
    target, subdir = found[0], found[1]
    running = running_session(line, target)
    if running is None or (kind == "run" and running[0].get("kind") != "run"):
        return None
    holder, run_dir = running
    config = line.config
    egress = Egress(config, os.environ, args.offline)
    network = egress.network
    env = session_env(config, kind, os.environ, egress)
    if (holder.get("network", ""), holder.get("proxy")) != (network, egress.proxy):
        raise Busy("%s is in use by %s; a session that joined it would be on its network (%s), "
                   "not on yours (%s): add --wait to wait for it" % (
                       line.name, describe_holder(holder), holder.get("proxy") or
                       holder.get("network") or "default", egress.proxy or network or "default"))
    theirs, mine = holder.get("secrets") or {}, passed_secrets(env, config)
    brought = sorted(name for name in mine if theirs.get(name) != mine[name])
    if brought:
        raise Busy("%s is in use by %s; a session that joined it would bring %s, which it does "
                   "not have (its agent could read them): add --wait to wait for it"
                   % (line.name, describe_holder(holder), ", ".join(brought)))
    name = JOIN_PREFIX + str(os.getpid())
    script, pending = os.path.join(run_dir, name), os.path.join(run_dir, "pending-" + name)
    try:
        door = os.open(os.path.join(run_dir, JOIN_FILE), os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None  # it has just ended
    held = None
    try:
        try:
            fcntl.flock(door, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return None  # it is ending: the line's lock is for the next one to wait for
        point = (read_run_record(run_dir) or {}).get("point")
        if not isinstance(point, str):
            return None
        for stale in (script, pending):  # (a killed session's, of the same pid)
            try:
                os.remove(stale)
            except FileNotFoundError:
                pass
        # Locked before it is where the run's script looks: never by the agent first.
        # No value of the environment is in it (the agent reads what is in
        # the run directory): docker exec takes them by name (-e NAME) from
        # the client's own environment, so they are in no file and on no
        # command line. It stays until the session ends, not once read: it
        # is how the run's script knows that a session is still in there.
        write_file(pending, session_script(
            holder["container"], [], config, os.path.join(point, subdir) if subdir else point,
            agent_command(kind, args.argv, config, network)).encode(), 0o600)
        held = os.open(pending, os.O_RDONLY | os.O_NOFOLLOW)
        try:
            fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise Busy("%s is in use by %s, and its container keeps this session from joining "
                       "it: add --wait to wait for it" % (line.name, describe_holder(holder)))
        os.rename(pending, script)
        say("joining %s: this session shares its container, which is saved once, when the "
            "last session has left" % describe_holder(holder))
        os.close(door)
        door = None
        tty = sys.stdin.isatty() and sys.stdout.isatty()
        passing = [arg for name, value in env for arg in ("-e", name if value else name + "=")]
        status = run_attached(["exec", "-i"] + (["-t"] if tty else []) + passing +
                              [holder["container"], "sh", RUN_DIR_INSIDE + "/" + name],
                              env=dict(os.environ, **{name: value for name, value in env
                                                      if value}))
    finally:
        for path in (pending, script):
            try:
                os.remove(path)
            except FileNotFoundError:
                pass
        for fd in (held, door):
            if fd is not None:
                os.close(fd)
    if status > 128 and not (inspect("container", holder["container"]) or
                             {}).get("State", {}).get("Running"):
        say("the run this session joined was stopped, and the session with it")
    return status


# --- the save: commit, or put back; whoever saves

def only_mountpoint_changes(changes, mount, made=INIT_MOUNTS):
    """A run's changes ([(A|C|D, path)]) hold the mount points the engine
    created (the project's `mount`, those it `made`: Engine.made_mounts),
    and their parents' mtimes: that alone is not a change the run made."""
    return all(kind in ("A", "C") and any(is_within(point, path)
                                          for point in (mount,) + tuple(made))
               for kind, path in changes)


def keep_snapshot(line, state, image_id, name):
    """The one tag of the image a run started from as its snapshot `name`
    (recorded first: a name never tagged is harmless, and tagging again
    is too). Returns the call under way; the caller finishes it."""
    record_snapshot(state, name)
    return DockerCall(("tag", image_id, line.snap(name)))


# What a save may cost the engine's disk (see save_cost): it keeps this much
# free; the free space is asked only of a layer this big; the limit where
# it cannot be known.
SAVE_MARGIN = 1 << 30
SAVE_ASK_FREE = 64 << 20
SAVE_FALLBACK_LIMIT = 20 << 30


class SaveWaits(Refused):
    """A save not made, as it would write too much (or the disk is full):
    the container waits for the user's decision (see wait_for_decision)."""


def engine_free_space(line):
    """Bytes free where a local engine keeps its layers, or None: an engine
    elsewhere (a context, ssh, tcp, Docker Desktop's VM), or one whose
    layers are not where it says (the containerd store), is not looked at
    (Engine.free_space_dir)."""
    root = line.engine.free_space_dir
    try:
        found = os.statvfs(root) if root else None
    except OSError:
        return None
    return found and found.f_bavail * found.f_frsize


def size_call(container, image=None):
    """What the commit of `container` will write, asked, and with it (one
    call) `image`'s ID: see sized()."""
    return DockerCall(("inspect", "--size", "--format", "{{json .}}", container,
                       *([image] if image else [])))


def sized(call):
    """(the bytes size_call's container would commit: None when not known,
    -1 when the engine cannot measure them; the ID of its image, None when
    there is none)."""
    result = call.finish(check=False)
    size = image = None
    try:  # (Podman prints the objects as one list, whatever the template)
        rows = json.loads(result.stdout) if result.stdout.lstrip().startswith("[") else None
    except ValueError:
        rows = None
    for row in rows if isinstance(rows, list) else result.stdout.splitlines():
        try:
            found = row if isinstance(row, dict) else json.loads(row)
        except ValueError:
            continue
        if not isinstance(found, dict):
            continue
        if "SizeRw" in found:
            size = found["SizeRw"] if isinstance(found["SizeRw"], int) else -1
        elif isinstance(found.get("Id"), str):
            image = found["Id"]
    return size, image


def save_cost(line, size):
    """The bytes the commit will write (`size`, from sized(): the engine
    counts a sparse file whole, as the commit writes its holes), or None
    when not known. SaveWaits above PI_AGENT_SAVE_LIMIT (default: half the
    engine's free space), or where less than SAVE_MARGIN would be left
    free, or when the engine cannot measure it."""
    if size is None:
        return None  # (the commit says what is wrong)
    if size < 0:
        if line.config.raw["PI_AGENT_SAVE_LIMIT"] == "none":
            return None
        raise SaveWaits("the engine cannot say what it would write (a path too deep to "
                        "measure?), and a save of unknown size could fill its disk")
    limit = line.config.save_limit
    free = engine_free_space(line) if size > SAVE_ASK_FREE else None
    if limit is None:
        limit = free // 2 if free is not None else SAVE_FALLBACK_LIMIT
    if free is not None and size > free - SAVE_MARGIN:
        why = "and the engine's disk has only %s free" % human_size(free)
    elif size <= limit:
        return size
    elif line.config.save_limit is not None:
        why = "more than PI_AGENT_SAVE_LIMIT=%s" % line.config.raw["PI_AGENT_SAVE_LIMIT"]
    elif free is not None:
        why = "more than half the engine's free space (%s; PI_AGENT_SAVE_LIMIT sets another " \
            "limit)" % human_size(free)
    else:
        why = "more than %s (the engine's free space is not known here; PI_AGENT_SAVE_LIMIT " \
            "sets another limit)" % human_size(limit)
    err = SaveWaits("it would write %s, %s" % (human_size(size), why))
    err.size = size
    raise err


def waiting_message(name, entry):
    """The one line for a container that waits for the user's decision."""
    largest = ", ".join("%s (%s)" % (path, human_size(size)) for path, size in
                        entry.get("largest") or []) or "docker diff %s lists them" % name
    return ("the %s was not saved: %s. Its container %s waits for your decision; the "
            "largest: %s. pi-recover --drop PATH ... %s saves the run without those paths; "
            "pi-clean-orphans discards it" % (entry.get("what"), entry.get("why"), name, largest,
                                              name))


def wait_for_decision(line, state, container, what, why, size):
    """A save not made for its size or the disk's space: the container is
    stopped and kept, and waits (the state's `waiting`) with its largest
    files; the next command says so once, and no recovery retries it."""
    docker("stop", "--time", "0", container, check=False)  # (a wrapper that died left it?)
    largest, sizes, info = None, None, inspect("container", container)
    if layer_listable(line, info):
        try:
            sizes = list_layer(line, info, names_only=True)[1]
        except PiError as err:
            line.log("could not list the layer of %s: %s" % (container, err))
    if sizes is not None:
        # The biggest files; where they are not the half of it (many small
        # ones), the directories three deep that hold the most too.
        largest = [item for item in sorted(sizes.items(), key=lambda item: -item[1])[:5]
                   if item[1] >= 1 << 20]
        if sum(found for _path, found in largest) < (size or 0) // 2:
            tops = {}
            for path, found in sizes.items():
                top = "/".join(path.split("/")[:4])
                if top != path:
                    tops[top] = tops.get(top, 0) + found
            largest += sorted(tops.items(), key=lambda item: -item[1])[:3]
    entry = {"what": what, "why": why, "size": size, "largest": largest}
    state.setdefault("waiting", {})[container] = entry
    state["notice"] = waiting_message(container, entry)
    line.write_state(state)
    line.log(state["notice"])
    return SaveWaits(state["notice"])


def end_unended(line, name, summaries=None):
    """A stopped run that nobody ended is ended under its project's lock,
    as by its wrapper (waited for: no run waits for this line meanwhile).
    Returns end_run's notes; its summary goes into `summaries` by name."""
    run_dir = os.path.join(line.run_dir, name)
    record = read_run_record(run_dir)
    if record is None:
        return []
    repo = record.get("repo") or {}
    fd = lock_project(line, record["target"], "end", True,
                      [path for path in [repo.get("common"), repo.get("gitdir")] +
                       list(record.get("read") or []) if isinstance(path, str)])
    try:
        notes = end_run(line, run_dir, record)
        if summaries is not None:
            summaries[name] = record.get("summary")
        return notes
    finally:
        if fd is not None:
            release_project_lock(fd)


def teardown(line, names, state=None, removal=None, check=False, summaries=None):
    """The one teardown of finished runs' containers: they go (an agent
    still in one too), then their run directories (a run that nobody ended
    is ended first, see end_run: its notes are returned, and its summary
    goes into `summaries` by name), then their entries in the state.
    Without `state` (the lock is not held) the next holder drops those
    entries. `removal`: their `docker rm`, under way.
    If the engine did not remove them, all stays for recovery: None is
    returned, or with `check` the error raised."""
    removal = removal or DockerCall(("rm", "-f", "-v", *names))
    result = removal.finish(check=False)
    if result.returncode != 0:
        if check:
            raise docker_failure(("rm",), result.stderr)
        return None
    notes = []
    for name in names:
        notes += end_unended(line, name, summaries)
        remove_run_dir(os.path.join(line.run_dir, name), line=line)
        if state is not None:
            (state.get("removing") or {}).pop(name, None)
            (state.get("waiting") or {}).pop(name, None)
    if state is not None:
        line.write_state(state)
    return notes


def flatten_if_due(line, state, layers):
    """After a save that took current to `layers` (see auto_flatten)."""
    if layers >= flatten_limit(line):
        if state.get("holder"):
            state["holder"]["phase"] = "flattening"
        line.write_state(state)
        auto_flatten(line, state)


def commit_run(line, state, container, image, meta, snapshot, current_id, tagging=None):
    """The commit of save_run(): into current, or into a snapshot when the
    container did not start from current. Returns the snapshot's name (None
    for no change), and the container's removal if it is under way."""
    branched = current_id != image["Id"]
    line.write_state(state)
    mount = meta.get("mount") or ""
    labels = saved_labels(line, container, image, meta)
    message = "pi-agent %s in %s (exit %s)" % (meta.get("kind", "run"), meta.get("target", "?"),
                                               meta.get("exit_status", "unknown"))
    args = commit_args(container, image, labels, message)
    new_id = docker(*args, *([] if branched else [line.current])).stdout.strip()
    new = meta["new_image"] = inspect_image(new_id)
    # Whether the run changed anything but the mount points the engine made
    # is asked below (of its layer, or the engine's diff) for a new mount
    # point, and on an engine whose commit always adds a layer.
    asks = bool(mount) and mount not in known_mounts(image) or line.engine.empty_commits
    removal = None
    if not asks:
        # Saved: from here the container is only to be removed (and read
        # by record_changes, where the layer cannot be). Recorded first, so
        # that whoever finds it later (this remover dead) just removes it.
        state.setdefault("removing", {})[container] = os.getpid()
        line.write_state(state)
        if layer_listable(line, new) or not line.config.record_changes:
            removal = DockerCall(("rm", "-f", "-v", container))
    if tagging is not None and tagging.finish(check=False).returncode != 0:
        keep_snapshot(line, state, image["Id"], snapshot).finish()
    meta["layers"] = image_layers(new)
    changed = image_layers(new) != image_layers(image)
    before = image.get("Size")
    if before is None and line.engine.sizes_are_disk:  # (a state file of an earlier version)
        before = (inspect_image(image["Id"]) or {}).get("Size") or 0
    # (where image sizes are not the disk's, what the layer holds, as measured before the commit)
    meta.update(image_before=image["Id"], image_after=new["Id"], bytes_added=(
        (new.get("Size") or 0) - before if line.engine.sizes_are_disk else meta.get("written")))
    if changed and asks:
        if layer_listable(line, new):
            try:  # (under the lock: the names alone, which are quick)
                changed = not only_mountpoint_changes(list_layer(line, new, True)[0], mount,
                                                      line.engine.made_mounts)
            except PiError as err:  # (in doubt, the layer stays: it costs nothing more)
                line.log("could not list the layer of %s: %s" % (container, err))
        else:
            meta["diff_output"] = docker("diff", container).stdout
            try:
                changed = not only_mountpoint_changes(parse_diff(meta["diff_output"]), mount,
                                                      line.engine.made_mounts)
            except PiError:
                pass
    snap = snapshot
    if not changed:
        meta.update(image_after=image["Id"], bytes_added=0)
        if branched:
            docker("rmi", new_id, check=False)
        else:
            docker("tag", image["Id"], line.current)
            if meta.get("kept"):
                docker("rmi", new_id, check=False)
            else:
                drop_snapshot(line, state, snapshot, also=[new_id])
            remember_current(state, image)
        snap = None
    elif branched:
        snap = add_snapshot(line, state, new_id)
        meta["branched"] = True
        state.pop("current", None)
    else:
        remember_current(state, new)
    state.setdefault("removing", {})[container] = os.getpid()
    line.write_state(state)
    return snap, removal


def save_run(line, state, container, image, meta, snapshot, current_id, tagging=None,
             size=None):
    """Save a finished run's container: the one save, whoever saves it (the
    saver; the wrapper, when its saver died; recovery, for a container an
    interrupted run left).

    `image` is the record of the image the container started from, `meta`
    its run labels and exit_status (RunPlan.save_meta), `snapshot` the name
    that keeps that image (keep_snapshot() tags it, unless `tagging` is
    that tag under way; None: a new name, unless the image is not current
    and kept already, as a leftover's is), `current_id` current's ID
    as it is now (None: there is none). The commit moves current itself,
    atomically. If the commit added no layer, the run changed nothing, and
    current, the snapshots and the layers are as they were. If the
    container did not start from current (a leftover, current changed by
    hand, reset or removed), its result becomes a snapshot and current
    stays (meta["branched"]; the notice says so). Snapshots beyond the
    setting are pruned. Returns the snapshot's name (None for no change)
    and the container's removal if it is under way; finish_saved() does
    the rest, whoever saves.

    A failure is kept in the state (failed, notice: the next command says
    so, and recovery retries), logged as a session "failed commit", and
    raised; one for size or disk space waits for the user (SaveWaits).
    """
    what = "%s in %s" % (meta.get("kind") or "run", meta.get("target") or "?")
    if size is None:
        size = sized(size_call(container))[0]
    if snapshot is None and current_id == image["Id"]:
        snapshot = kept_as(line, image)
        meta["kept"] = "1" if snapshot else ""
        snapshot = snapshot or next_snapshot(state, meta.get("epoch"))
    if snapshot is not None and tagging is None:
        tagging = keep_snapshot(line, state, image["Id"], snapshot)
    try:
        meta["written"] = save_cost(line, size)
        snap, removal = commit_run(line, state, container, image, meta, snapshot, current_id,
                                   tagging)
    except PiError as err:
        if isinstance(err, SaveWaits) or "no space left on device" in str(err).lower():
            if tagging is not None:
                tagging.finish(check=False)
            line.record_session(dict(meta, container=container), "waiting")
            raise wait_for_decision(line, state, container, what, str(err) if isinstance(
                err, SaveWaits) else "the engine's disk is full (%s)" % err,
                getattr(err, "size", size if size and size > 0 else None))
        state["failed"] = container
        state["notice"] = ("the save of the %s failed: %s. The container %s keeps its "
                           "changes: fix the engine (disk space?), then the next pi retries "
                           "(or pi-recover %s now; pi-clean-orphans discards them)"
                           % (what, err, container, container))
        line.write_state(state)
        line.log(state["notice"])
        line.record_session(dict(meta, container=container), "failed commit")
        raise PiError(state["notice"], err.code)
    line.log("saved %s%s" % (container, " (snapshot %s)" % snap if snap else " (no change)"))
    meta.update(saved_as=snap, snapshot=snapshot)
    if meta.get("branched"):
        state["notice"] = ("%s was %s before the %s was saved; current stays as it is and the "
                           "run is snapshot %s (pi-rollback %s to use it)"
                           % (line.current, "changed outside pi-agent" if current_id else
                              "gone (reset or removed)", what, snap, snap))
        line.log(state["notice"])
    return snap, removal


def finish_saved(line, state, container, meta, ended, ended_by, removal=None,
                 free_project=None, free_line=None):
    """What every path after a commit does (the saver's, the wrapper's
    when its saver died, recovery's), in one order: a run nobody ended
    (`ended` None) loses its container first (its agent may still be at
    work), then is ended (teardown, end_run); the session is logged
    (`ended_by`: run, interrupted, recovered); snapshots are pruned;
    `free_project` is called; current is flattened if the save took it to
    the threshold; `free_line` is called (the saver's lock released: the
    next run need not wait for what follows); then what the run changed is
    recorded, and the container of a run that was ended goes (`removal`,
    under way, or started here). Returns the notes of the end it made; a
    saver (which frees the line) leaves them to the next command instead."""
    notes = []
    if ended is None:
        record_changes(line, container, meta)  # (it may read the container)
        summaries = {}
        notes = teardown(line, [container], state, removal, summaries=summaries) or []
        ended, removal = summaries.get(container), False
        if notes and free_line:
            state["notice"] = "after the %s in %s: %s" % (
                meta.get("kind") or "run", meta.get("target") or "?", "; ".join(notes))
            line.write_state(state)
    record = line.record_session(dict(meta, container=container, ended=ended), ended_by)
    prune_if_due(line, state, protect=(meta.get("snapshot"),))
    if free_project:
        free_project()
    if meta.get("saved_as") and not meta.get("branched"):
        flatten_if_due(line, state, meta["layers"])
    if free_line:
        free_line()
    if removal is not False:
        record_changes(line, container, meta)
        if line.config.auto_prune and len(state.get("snapshots") or []) >= \
                line.config.snapshot_keep:
            # The next prune weighs this run's state: whether it was noise
            # is read now, off the lock (noise_snapshots).
            ensure_reports(line, [record])
        teardown(line, [container], None if free_line else state, removal)
    return notes


# --- recovery: what an interrupted run left, saved the same way

def start_listing_runs(line, sizes=False):
    fields = ["ID", "Names", "State", "CreatedAt", "RunningFor"] + (["Size"] if sizes else [])
    parts = ['"%s":{{json .%s}}' % (field.lower(), field) for field in fields]
    parts += ['"%s":{{json %s}}' % (key, label_field(LABEL + key)) for key in RUN_LABELS]
    return DockerCall(("ps", "-a", *(["--size"] if sizes else []),
                       "--filter", "label=%srepo=%s" % (LABEL, line.repo), "--filter",
                       "label=" + MINE, "--format", "{" + ",".join(parts) + "}"))


def list_run_containers(line, sizes=False, listing=None):
    """Containers this line's runs started (by label), oldest first."""
    listing = listing or start_listing_runs(line, sizes)
    rows = [row for row in json_lines(listing.finish().stdout)
            if row.get("pid") and (row.get("profile") or "") == line.profile]
    rows.sort(key=lambda row: (row.get("started") or "", row.get("createdat") or ""))
    return rows


def being_removed(state, name):
    """Saved, and its remover still at work."""
    pid = (state.get("removing") or {}).get(name)
    return pid is not None and pid_alive(pid)


def leftover_containers(line, sizes=False):
    """Run containers that no live lifecycle owns. The state is read before
    the listing: a save that ends in between removes its container after
    writing that it does, so it is never taken for a leftover. One still
    running is one only if it was started on this machine, by a wrapper
    that is gone: nothing else running is ever stopped or removed."""
    state = line.read_state()
    holder = (state.get("holder") or {}) if lock_is_held(line) else {}
    host = os.uname().nodename
    return [row for row in list_run_containers(line, sizes)
            if row["names"] != holder.get("container")
            and not being_removed(state, row["names"])
            and not (row.get("host") == host and pid_alive(row["pid"]))
            and (row.get("state") != "running" or row.get("host") == host)]


def recover_container(line, state, row):
    """Save one left-behind container (see save_run). Returns a line for
    the user. One still running (its wrapper gone: leftover_containers) is
    stopped first, as `docker stop` does it: no running container is
    removed."""
    name = row["names"]
    if row.get("state") == "running":
        docker("stop", "--time", str(STOP_GRACE), name, check=False)
    current = inspect_image(line.current)
    if image_labels(current).get(LABEL + "container") == name:
        show_notes(line, teardown(line, [name], state, check=True))
        return "removed %s: its run was saved already" % name
    info = inspect("container", name)
    if info is None:
        return "%s is gone already" % name
    image = inspect_image(info["Image"])
    if image is None:
        raise EngineError("the image that %s started from is gone, so it cannot be saved; "
                          "pi-clean-orphans discards it" % name)
    meta = {key: row.get(key) or "" for key in RUN_LABELS}
    meta.update(exit_status="unknown", kind=(row.get("kind") or "run"),
                mount=next((m.get("Destination") for m in info.get("Mounts") or []
                            if m.get("Type") == "bind" and m.get("RW")
                            and m.get("Destination") != RUN_DIR_INSIDE), ""))
    current_id = current["Id"] if current else None
    # The run (almost surely) tagged its snapshot; a leftover of another
    # image than current's is kept by a snapshot already, or is current's past.
    snapshot = (row.get("snapshot") or None) if current_id == image["Id"] else None
    snap, removal = save_run(line, state, name, image, meta, snapshot, current_id)
    show_notes(line, finish_saved(line, state, name, meta, None, "recovered", removal))
    started = local_time(row.get("started"))
    if meta.get("branched") and current is None:
        return ("saved the run of %s in %s as snapshot %s: there was no current (reset or "
                "removed), so the next run starts from base (pi-rollback %s to use the run)"
                % (started, row.get("target"), snap, snap))
    if meta.get("branched"):
        return ("saved the run of %s in %s, which started from an older environment, as "
                "snapshot %s; current is unchanged (pi-rollback %s to use it)"
                % (started, row.get("target"), snap, snap))
    if snap:
        return ("recovered the interrupted run of %s in %s into current (before it: %s)"
                % (started, row.get("target"), snap))
    return ("removed %s: the interrupted run of %s changed nothing in the environment"
            % (name, started))


def forget_unmade(line, state, present):
    """The run directories of this line whose container was never made: a
    lifecycle killed between writing one (its script holds the values
    passed to the agent) and `docker run` making the container, its saver
    not forked yet or killed too. Each goes as a finished run's does (ended
    first: nothing its git directory holds is thrown away) once the engine
    says the container is not there (a listing can miss one); a saved one's
    remover at work is left to finish."""
    pattern = re.compile(r"pi-agent-%s-\d{8}-\d{6}-\d+(-prepare)?\Z" % re.escape(line.slug))
    try:
        names = sorted(os.listdir(line.run_dir))
    except FileNotFoundError:
        return
    for name in names:
        if pattern.match(name) and name not in present and not being_removed(state, name) \
                and is_absent(docker("container", "inspect", "--format", "{{.Id}}", name,
                                     check=False), "container"):
            show_notes(line, end_unended(line, name))
            remove_run_dir(os.path.join(line.run_dir, name), line=line)


def recover_leftovers(line, state, listing=None, only=None, decide=False):
    """Save what interrupted runs left behind, oldest first, before anything
    else changes the line; returns how many it saved. One `docker ps` when
    there is nothing to do: the labels find leftovers even when the state
    file was lost. `only` (pi-recover CONTAINER) picks one by name or ID.
    A save that fails stops it (save_run keeps the failure for the next).
    Those that wait for the user's decision (too big to save) are left as
    they are, but for pi-recover (`decide`): it tries them again."""
    host = os.uname().nodename
    recovered = 0
    rows = list_run_containers(line, listing=listing)
    present = {row["names"] for row in rows}
    for key in ("removing", "waiting"):
        if set(state.get(key) or {}) - present:
            state[key] = {name: value for name, value in state[key].items() if name in present}
            line.write_state(state)
    if only:
        rows = [row for row in rows if only in (row["names"], row["id"])]
        if not rows:
            raise NotFound("no left-behind container %s; pi-orphans lists them" % only)
    for row in rows:
        if row["names"] in state.get("removing", {}):
            # Saved already: its remover is at work, or died and we finish.
            if not being_removed(state, row["names"]):
                show_notes(line, teardown(line, [row["names"]], state, check=True))
            continue
        if row.get("host") != host:
            say("skipping %s: it was started on host %s" % (row["names"], row.get("host")))
            continue
        if row.get("state") == "running" and pid_alive(row["pid"]):
            continue  # (a live run of another state directory: see leftover_containers)
        if row["names"] in (state.get("waiting") or {}) and not decide:
            show_notes(line, end_unended(line, row["names"]))  # (its wrapper died)
            continue
        try:
            say(recover_container(line, state, row))
        except SaveWaits as err:
            state.pop("notice", None)  # (said here, once)
            line.write_state(state)
            if decide:
                raise
            say(str(err))
            continue
        except BaseException as err:
            # Not saved (Ctrl-C too): the next command must look again.
            first = state.get("failed") != row["names"]  # save_run says it its own way
            state["failed"] = row["names"]
            line.write_state(state)
            if first and isinstance(err, PiError):
                raise PiError("could not save the environment that an interrupted run left in "
                              "container %s: %s. Fix the engine, then pi-recover %s saves it "
                              "(pi-clean-orphans discards it)"
                              % (row["names"], err, row["names"]), err.code)
            raise
        recovered += 1
    if not only:
        forget_unmade(line, state, present)
    if recovered or state.get("failed") or state.get("notice"):
        state.pop("failed", None)
        state.pop("notice", None)
        line.write_state(state)
        remove_own_dangling(line)
    return recovered


class exclusive:
    """`with exclusive(line, kind) as state:` for commands that change images:
    waits for any save, recovers what an interrupted run left, and releases."""

    def __init__(self, line, kind, wait=False, recover=True):
        self.lock = LineLock(line)
        self.line, self.kind, self.wait, self.recover = line, kind, wait, recover

    def __enter__(self):
        found, self.state = self.lock.acquire(self.kind, wait=self.wait)
        say_what_was_left(self.line, found, self.state)
        try:
            line = self.line
            check_owner(line, *json.loads(docker("image", "inspect", line.base, line.current,
                                                 check=False).stdout or "[]"))
            if self.recover:
                recover_leftovers(line, self.state)
        except BaseException:
            self.lock.release(self.state, clean=released_cleanly(found))
            raise
        return self.state

    def __exit__(self, *exc):
        self.lock.release(self.state)
        return False


# --- prepare, under the line's lock and the project's

def prepare_run(line, found, state, project, kind, argv, offline, tty):
    """Under the line's lock, before anything starts: what the last holder
    left is dealt with (recovery, unless it released cleanly), current is
    there, warnings are said, the run is planned and written down (its
    run directory, the git gate), the project watched. Returns (plan,
    watch, stale, verify, built): stale, the saved
    containers whose removers died, for the saver to tear down, whether
    current's remembered record is to be checked (by the saver: off the
    path to the prompt), and whether the base was built for this run."""
    config = line.config
    check_engine()
    if not offline:
        check_network(config)
    unshare_links(config, project)
    say_what_was_left(line, found, state)
    stale, remembered = [], None
    if released_cleanly(found):
        # No lifecycle died holding the lock: nothing was left behind but
        # saved containers whose removers died (a remover that finished
        # took its run directory).
        removing = state.get("removing") or {}
        for name, pid in list(removing.items()):
            if not pid_alive(pid):
                if os.path.isdir(os.path.join(line.run_dir, name)):
                    stale.append(name)
                else:
                    del removing[name]
        remembered = remembered_current(state)
        current = remembered or inspect_image(line.current)
    else:
        listing = start_listing_runs(line)  # overlaps the inspect below
        current = inspect_image(line.current)
        if recover_leftovers(line, state, listing):
            current = None
    image, built = ensure_current(line, current, made=bool(found.get("made")))
    for warning in misspelled_settings(os.environ) + [owner_mismatch(image, line.engine)]:
        if warning:
            say(warning, "warning")
    now = time.time()
    kept = kept_as(line, image)
    plan = RunPlan(line, kind, argv, image, project, os.environ, now, os.getpid(), tty,
                   snapshot=kept or next_snapshot(state, now), offline=offline, kept=bool(kept))
    plan.egress.ensure()
    plan.egress.listeners = plan.egress.listen()
    try:
        if plan.home_parents:
            plan = plan.on(make_home_parents(line, plan),
                           next_snapshot(state, now) if kept else plan.snapshot)
            state.pop("current", None)
        plan.record["host_run"] = host_run_files(project.target)
        plan.record["identity"] = "%s <%s>" % config.git_identity
        write_run_dir(plan.run_dir, plan.script(), plan.record, config.git_identity)
        watch = ProjectWatch(project.target, project.dirs)
    except BaseException:
        if os.path.isdir(plan.run_dir):
            abandon_run_dir(plan.run_dir, plan.record)
        raise
    return plan, watch, stale, remembered is not None, built


# --- the saver, forked before the container starts

# The wrapper's words to the saver, one line each, and its answers.
SAID_ABORT = "abort"    # the container could not start: take the run back
SAID_STATUS = "status"  # "status N": the container stopped with N; save
SAID_ENDED = "ended"    # "ended SUMMARY": the wrapper has ended the run (run_summary)
SAID_OK = "ok"          # "ok [SNAPSHOT]": saved
SAID_ERROR = "error"    # "error CODE MESSAGE": the save failed


def said_ended(messages):
    """The summary the wrapper sent with SAID_ENDED, or None if it did not
    end the run."""
    for message in messages:
        word, _, rest = message.partition(" ")
        if word == SAID_ENDED:
            try:
                summary = json.loads(rest)
            except ValueError:
                return {}
            return summary if isinstance(summary, dict) else {}
    return None


class Saver:
    """The detached process that saves a run, forked before the container
    starts. It shares the line's lock and the project's, and hears the
    wrapper on a pipe (SAID_ABORT, SAID_STATUS N, SAID_ENDED); it answers on
    another (SAID_OK, SAID_ERROR). When the wrapper is gone (exit, Ctrl-C,
    hangup, kill -9: its pipe closes), it saves anyway and ends the run
    itself. Its phases, in _main: wait for the word; tidy (tag the run's
    snapshot, check current, tear down earlier runs' containers whose
    removers died); save (save_run); end (the run ended by whoever is
    there, the project released, current flattened if due, the line
    released, the container removed)."""

    def __init__(self, line, lock, state, plan, stale=(), verify=False, keep=(),
                 project_fd=None):
        self.line, self.lock, self.state, self.plan = line, lock, state, plan
        self.stale, self.verify, self.keep = list(stale), verify, set(keep)
        self.project_fd = project_fd
        self.pid = None
        self.to_saver = None
        self.from_saver = None

    def start(self):
        down_r, down_w = os.pipe()
        up_r, up_w = os.pipe()
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                os.close(down_w)
                os.close(up_r)
                os.setsid()
                signal.signal(signal.SIGINT, signal.SIG_IGN)
                signal.signal(signal.SIGHUP, signal.SIG_IGN)
                self._detach_stdio(keep={self.lock.fd, down_r, up_w, self.project_fd}
                                   | self.keep)
                code = self._main(os.fdopen(down_r, "r"), up_w)
            except BaseException as err:  # the saver must never die silently
                self.line.log("saver crashed: %r" % (err,))
            finally:
                os._exit(code)
        os.close(down_r)
        os.close(up_w)
        self.pid, self.to_saver, self.from_saver = pid, down_w, up_r
        return self

    def _detach_stdio(self, keep):
        devnull = os.open(os.devnull, os.O_RDWR)
        os.dup2(devnull, 0)
        os.dup2(devnull, 1)
        # Nothing is printed once the prompt is back (what the saver has to
        # say is left in the state for the next command), and a pipe must
        # not be held open (`out=$(pi-exec ...)` would wait for the save):
        # what it and its docker calls write goes to the log.
        log = os.open(self.line.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        os.dup2(log, 2)
        os.close(log)
        os.close(devnull)
        keep = sorted((keep - {None}) | {0, 1, 2})
        for low, high in zip(keep, keep[1:] + [65536]):
            os.closerange(low + 1, high)

    # --- the wrapper's side

    def send(self, message):
        try:
            os.write(self.to_saver, (message + "\n").encode())
            return True
        except OSError:
            return False

    def finish(self, wait):
        """Close the pipe (the saver's cue); with `wait`, return its answer."""
        os.close(self.to_saver)
        if not wait:
            os.close(self.from_saver)
            return None
        import select
        chunks, started, shown = [], time.monotonic(), False
        while True:
            ready, _, _ = select.select([self.from_saver], [], [], 1.0)
            if not ready:
                if sys.stderr.isatty():  # a large change takes a while to commit
                    sys.stderr.write("\rpi-agent: saving the environment... %.0f s "
                                     % (time.monotonic() - started))
                    sys.stderr.flush()
                    shown = True
                continue
            chunk = os.read(self.from_saver, 4096)
            if not chunk:
                break
            chunks.append(chunk)
        if shown:
            sys.stderr.write("\r\033[K")
        os.close(self.from_saver)
        return b"".join(chunks).decode(errors="replace").strip()

    # --- the saver's side

    def _main(self, pipe, up_w):
        egress = self.plan.egress.keep(self.plan.egress.listeners)  # (while the run lasts)
        messages = self._hear(pipe, until=(SAID_STATUS, SAID_ABORT))
        egress()
        if SAID_ABORT in messages:
            self._abort()
            self._answer(up_w, SAID_OK)
            return 0
        tagging, current_id, size = self._tidy()
        status = next((m.split()[1] for m in messages if m.startswith(SAID_STATUS)), None)
        if status is not None:
            # The container has stopped; the wrapper holds the project until
            # it has ended the run, and the next run need not wait for a save.
            self.release_project()
        self.state["holder"].update(phase="saving", saver_pid=os.getpid())
        self.line.write_state(self.state)
        if status is None and not self._container_exists(tagging):
            return 0
        if status is not None and size is None and not self._container_exists(tagging, pipe):
            self._answer(up_w, SAID_OK)
            return 0
        meta = self.plan.save_meta(status)
        line, state, plan = self.line, self.state, self.plan
        try:
            snap, removal = save_run(line, state, plan.container, plan.image, meta,
                                     plan.snapshot, current_id, tagging, size=size)
        except PiError as err:
            self._hear(pipe)  # the wrapper is still ending the run: let it
            if not self._answer(up_w, "%s %d %s" % (SAID_ERROR, err.code, err)):
                say(str(err))
            return 1
        ended = said_ended(messages + self._hear(pipe))

        def free_line():
            self.lock.release(state)
            self._answer(up_w, SAID_OK + " " + (snap or ""))
            os.close(up_w)  # (a wrapper that waits reads to the end)
        finish_saved(line, state, plan.container, meta, ended,
                     "run" if status is not None else "interrupted", removal,
                     self.release_project, free_line)
        return 0

    @staticmethod
    def _hear(pipe, until=()):
        """The wrapper's words up to one of `until`, or until its pipe closes."""
        messages = []
        for text in pipe:
            messages.append(text.strip())
            if until and text.startswith(until):
                break
        return messages

    def _abort(self):
        """`docker run` failed: a container it may have created is junk, and
        the run is taken back (its snapshot was never tagged)."""
        line, state, plan = self.line, self.state, self.plan
        self.release_project()
        docker("rm", "-f", "-v", plan.container, check=False)
        abandon_run_dir(plan.run_dir, plan.record)
        if not plan.kept:
            drop_snapshot(line, state, plan.snapshot)
        state.pop("current", None)  # perhaps what made it fail
        self.lock.release(state)

    def _tidy(self):
        """Only once the container has stopped, so as not to slow its start:
        the snapshot's tag (by the image's ID, which stays), the check of a
        remembered current (changed by hand since, the run is saved as a
        snapshot and current stays), the teardown of earlier runs' saved
        containers whose removers died. Returns the tag under way, current's
        ID, and the size of the save, asked (save_cost)."""
        line, plan = self.line, self.plan
        tagging = keep_snapshot(line, self.state, plan.image["Id"], plan.snapshot)
        # (current's ID, asked with the size: the engine answers one call
        # sooner than two)
        sizing = size_call(plan.container, line.current if self.verify else None)
        removing = DockerCall(("rm", "-f", "-v", *self.stale)) if self.stale else None
        size, current_id = sized(sizing)
        if not self.verify or size is None:  # (an engine at fault: the commit says so)
            current_id = plan.image["Id"]
        if removing:
            for note in teardown(line, self.stale, self.state, removing) or []:
                line.log(note)
        remove_run_dir(plan.run_dir, script_only=True)
        return tagging, current_id, size

    def _container_exists(self, tagging, pipe=None):
        """Without an exit status the wrapper died; if it died while `docker
        run` was still creating the container (which then fails, its run
        script gone), the state stays dirty so that the next lifecycle looks
        for it, and its recovery tags the snapshot again. With the wrapper's
        `pipe` (it has a status, but the container could not be measured): a
        signal stopped `docker run` before it made the container, and the
        run is taken back the same way once the wrapper has ended it in the
        project (any other error is the save's to say)."""
        line, state, plan = self.line, self.state, self.plan
        if pipe is None:
            line.log("the wrapper of %s ended without an exit status; saving it anyway"
                     % plan.container)
        if not is_absent(docker("container", "inspect", "--format", "{{.Id}}", plan.container,
                                check=False), "container"):
            return True
        if pipe is not None:
            self._hear(pipe)  # (the wrapper ends the run in the project first)
        abandon_run_dir(plan.run_dir, plan.record)
        tagging.finish(check=False)  # (before its tag is taken back)
        if not plan.kept:
            drop_snapshot(line, state, plan.snapshot)
        line.write_state(state)
        line.log("%s does not exist (yet?); the next run will look again" % plan.container)
        return False

    def release_project(self):
        if self.project_fd is not None:
            release_project_lock(self.project_fd)
            self.project_fd = None

    @staticmethod
    def _answer(fd, text):
        try:
            os.write(fd, (text + "\n").encode())
            return True
        except OSError:
            return False


# --- the container, in the foreground; then handed over

def run_container(plan, saver):
    """The container, in the foreground; returns its exit status. One that
    could not start is taken back by the saver (SAID_ABORT)."""
    def take_back():
        saver.send(SAID_ABORT)
        saver.finish(wait=True)

    try:
        status = run_attached(plan.run_args, plan.container)
    except PiError:
        take_back()
        raise
    # The client returns with the container still at work only when it was
    # detached (a terminal's keys) or failed itself (a broken pipe, exit
    # 1; a signal; 125): a clean exit off a terminal is the container's.
    try:
        info = ensure_stopped(plan.container, plan.tty) if plan.tty or status else None
    except PiError:
        if status == 125:
            take_back()  # the engine went away before any agent ran
        raise
    # `docker run` exits 125 for its own failures, and so may the agent: a
    # container that never started tells them apart.
    if status == 125 and (not info or (info.get("State") or {}).get("StartedAt", "").startswith(
            "0001-")):
        take_back()
        raise EngineError("docker could not start the container (its error is above); "
                          "pi-status shows the settings it used")
    return status


def hand_over(line, lock, state, plan, saver, status, watch):
    """The container has stopped: the saver saves it while the run is ended
    here (end_run), before the prompt. If the saver is gone (killed?), the
    save is done here, the same way (they share the lock). Returns the
    run's exit status (a failed save's code, if the run itself succeeded
    and the save was waited for)."""
    saved_elsewhere = saver.send("%s %d" % (SAID_STATUS, status))
    show_notes(line, end_run(line, plan.run_dir, plan.record, watch))
    trace_step("ended the run in the project")
    summary = plan.record.get("summary") or {}
    # (asked of a proxy the host has a route to: an engine call would cost the prompt)
    refused = plan.egress.routed and (plan.egress.ask(plan.container) or {}).get("refused")
    if refused:
        summary["refused"] = refused
        say("the egress proxy refused %s: %s (pi-log --json keeps them; PI_AGENT_EGRESS_ALLOW "
            "lets one through)" % (plural(refused["count"], "connection"), ", ".join(
                printable(place) for place in sorted(refused["places"])[:5])), "warning")
    if saved_elsewhere and saver.send("%s %s" % (SAID_ENDED, summary_message(summary))):
        answer = saver.finish(wait=line.config.save_mode == "foreground")
        if answer and answer.startswith(SAID_ERROR):
            _, code, message = answer.split(" ", 2)
            say(message)
            return status or int(code)
        return status
    say("the background saver is gone; saving in the foreground")
    try:
        current = inspect_image(line.current)
        meta, removal = plan.save_meta(status), None
        if image_labels(current).get(LABEL + "container") == plan.container:
            # It died after its commit: what it wrote stands; its session
            # and changes are recorded, and the container is left to go.
            state = line.read_state()
            meta.update(image_before=plan.image["Id"], image_after=current["Id"],
                        new_image=current, layers=image_layers(current),
                        saved_as=plan.snapshot, snapshot=plan.snapshot)
        else:
            _snap, removal = save_run(line, state, plan.container, plan.image, meta,
                                      plan.snapshot, current["Id"] if current else None)
            if state.get("notice") and meta.get("branched"):
                say(state.pop("notice"))
        finish_saved(line, state, plan.container, meta, summary, "run", removal)
    except BaseException as err:
        # Not a clean release (Ctrl-C too): the next command recovers the run.
        state.setdefault("failed", plan.container)
        lock.release(state)
        if not isinstance(err, PiError):
            raise
        say(str(err))
        return status or err.code
    lock.release(state)
    return status


# --- the lifecycle: the steps above, in their order

def run_lifecycle(args, kind, argv):
    """lifecycle()'s run, with the ctypes import under way beside it."""
    started = time.monotonic()
    trace_step("started")
    config = Config(agent=args.agent, profile=args.profile, egress=args.egress)
    try:
        cwd = os.path.realpath(os.getcwd())
    except FileNotFoundError:
        raise NotFound("the current directory no longer exists; cd somewhere that does")
    network_typos(os.environ)
    line = require_profile(Line(config))
    place = find_target(cwd, home_dirs(), args.here, guarded_dirs(config))
    trace_step("found the project")
    if kind in JOINABLE_KINDS and not args.wait and not args.dry_run:
        status = join_run(line, place, kind, args)
        if status is not None:
            return status
    tty = sys.stdin.isatty() and sys.stdout.isatty()
    if args.dry_run:
        project = Project.inspect(config, cwd, args.here, found=place)
        for note in project.notes:
            say(note, "warning")
        return print_plan(line, kind, argv, project, tty, args.offline)

    # The line's lock, then the project's: in that order everywhere, so
    # that recovery (which ends a run in its project) never waits for a
    # run that waits for the line.
    lock = LineLock(line)
    found, state = lock.acquire(kind, place[0], wait=args.wait)
    trace_step("locked the line")
    held = []

    def hold(target, paths):
        if held:
            cover_project(held[0], line, target, kind, paths)
        else:
            held.append(lock_project(line, target, kind, args.wait, paths))

    try:
        project = Project.inspect(config, cwd, args.here, found=place, hold=hold)
        trace_step("looked through the project")
        for note in project.notes:
            say(note, "warning")
        plan, watch, stale, verify, built = prepare_run(line, found, state, project, kind,
                                                        argv, args.offline, tty)
        trace_step("prepared")
    except BaseException:
        # (failed before its recovery, the engine down say: the next one recovers)
        lock.release(state, clean=released_cleanly(found))
        raise
    # The saver's copy of the state names the container too. It keeps the
    # watch open: closing the last reference to it takes the kernel a
    # while, better spent after the prompt is back.
    state["holder"]["container"] = plan.container
    saver = Saver(line, lock, state, plan, stale, verify,
                  keep=([watch.fd] if watch.fd is not None else []) + [
                      sock.fileno() for sock in plan.egress.listeners],
                  project_fd=held[0]).start()
    for sock in plan.egress.listeners:  # (the saver's to serve)
        sock.close()
    state["holder"].update(phase="running", saver_pid=saver.pid, network=plan.network or "",
                           proxy=plan.egress.proxy, secrets=passed_secrets(plan.env, config))
    line.write_state(state)
    trace_step("forked the saver")
    repo = plan.record.get("repo")
    if repo and plan.record.get("index"):  # (in a thread: after the fork)
        walk_in_background(os.path.join(repo["gitdir"], "index"), plan.record["index"],
                           32 if plan.record.get("format") == "sha256" else 20)
    status = run_container(plan, saver)
    trace_step("the container stopped")
    status = hand_over(line, lock, state, plan, saver, status, watch)
    trace_step("handed over")
    if status not in (0, 127, 130) and plan.network == "none":
        # (apt-get, npm or pip offline say only that a name did not resolve)
        say("exit %d; this run had no network (%s): what failed may have needed it" % (
            status, "--offline" if args.offline else "--egress none" if args.egress == "none"
            else "PI_AGENT_NETWORK=none" if config.network == "none" else "PI_AGENT_EGRESS=none"))
    if built and status == 0 and sys.stderr.isatty():
        say("first use: %.0f s in all; from now on a run starts in about a second"
            % (time.monotonic() - started))
    return status


def lifecycle(args, kind, argv):
    """A run, start to end: the project found and held, the run prepared
    under the line's lock, the saver forked, the container run in the
    foreground, then handed over."""
    import threading  # ctypes (for the project watch) loads meanwhile, off the path
    loader = threading.Thread(target=__import__, args=("ctypes",), daemon=True)
    loader.start()
    try:
        return run_lifecycle(args, kind, argv)
    finally:
        # An interpreter that exits while a thread still loads a C
        # extension can crash (exit 139): an early error waits for it.
        loader.join()


# ------------------------------------------------------------------- commands
#
# One cmd_NAME per subcommand, after what only it uses.

class Args:
    """A command's arguments, as its parser (or parse_args' own reading of
    a lifecycle's wrapper options) gives them."""

    def __init__(self, **values):
        self.__dict__.update(values)


def cmd_run(args):
    return lifecycle(args, "run", args.argv)


def cmd_exec(args):
    if not args.argv:
        raise PiError("pi-exec needs a command, e.g. pi-exec make test", EXIT_USAGE)
    return lifecycle(args, "exec", args.argv)


def cmd_shell(args):
    if args.argv:
        raise PiError("pi-shell takes no command (got %s); use pi-exec to run one"
                      % " ".join(args.argv), EXIT_USAGE)
    return lifecycle(args, "shell", [])


def installed_agents(line, image):
    """{agent: its --version line} of the known agents installed in
    `image`: one throwaway container (no network, nothing mounted), asked
    once per image and remembered beside the state, so that no run pays.
    What answers is the agent's (its sh too): the answer is bounded in
    time and size, and read from no input of ours."""
    path = line.agents_path
    try:
        with open(path, encoding="utf-8") as handle:
            cached = json.load(handle)
        if isinstance(cached, dict) and isinstance(cached.get(image["Id"]), dict):
            return cached[image["Id"]]
    except (OSError, ValueError):
        pass
    # The first line with a version number in it (a tool may warn first).
    script = ('limit=; command -v timeout >/dev/null 2>&1 && limit="timeout 30";'
              ' for c in "$@"; do command -v "$c" >/dev/null 2>&1 || continue;'
              ' out=$($limit "$c" --version 2>&1 </dev/null);'
              ' v=$(printf "%s\\n" "$out" | grep -m 1 "[0-9]\\.[0-9]" || printf "%s\\n" "$out"'
              ' | head -n 1);'
              ' printf "%s\\t%s\\n" "$c" "$v"; done')
    commands = {command: name for name, (command, _i, _k) in AGENTS.items()}
    name = "pi-agent-status-%d-%d" % (os.getuid(), os.getpid())
    call = DockerCall(("run", "--rm", "--name", name, "--label", MINE, "--network", "none",
                       "--entrypoint", "sh", *CAP_DROP_ARGS, *line.engine.run_args(),
                       *line.engine.limit_args(line.config.limits), image["Id"], "-c", script,
                       "sh", *commands), capture=False, stdin=subprocess.DEVNULL,
                      stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    import select
    output, deadline = b"", time.monotonic() + 60
    while len(output) < 4096 and time.monotonic() < deadline:
        if not select.select([call.proc.stdout], [], [], deadline - time.monotonic())[0]:
            break
        chunk = os.read(call.proc.stdout.fileno(), 4096)
        if not chunk:
            break
        output += chunk
    try:
        call.proc.wait(timeout=1 if len(output) >= 4096 else
                       max(deadline - time.monotonic(), 0) + 1)
    except subprocess.TimeoutExpired:  # too slow, or too much to say
        docker("rm", "-f", name, check=False)
        call.proc.kill()
        call.proc.wait()
    call.proc.stdout.close()
    found = {}
    for row in output.decode("utf-8", "replace").splitlines():
        command, _, version = row.partition("\t")
        if command in commands:
            found[commands[command]] = version.strip()[:80] or "?"
    if call.proc.returncode == 0:
        try:
            replace_file(path, json.dumps({image["Id"]: found}).encode())
        except OSError:
            pass
    return found


def status_facts(config, line):
    """What pi-status shows, as data (pi-status --json: its shape in docs/commands.md)."""
    engine = line.engine = probe_engine(config.state_dir, fresh=True)
    if not config.raw["PI_AGENT_ENGINE"]:
        config.raw["PI_AGENT_ENGINE"] = engine.kind  # (shown: the one chosen)
    facts = {"version": __version__, "config_file": config.path,
             "config_file_exists": os.path.exists(config.path),
             "settings": {name: {"value": config.raw[name], "source": config.sources[name]}
                          for name, _d, _m in SETTINGS},
             "problems": list(config.problems), "warnings": misspelled_settings(os.environ),
             "python": sys.executable, "engine": engine.describe(),
             "engine_facts": dict(
                 {key: engine.facts.get(key) for key in ("kind", "version", "rootless", "remap",
                                                         "store", "os", "local", "limits")},
                 root_inside=engine.root_inside(), lists_layers=engine.lists_layers,
                 sizes_are_disk=engine.sizes_are_disk, max_layers=engine.max_layers),
             "profile": line.profile, "images": {}, "drift": [], "disk": None, "agents": None}
    found = {}
    for role, ref in (("base", line.base), ("current", line.current)):
        image = found[role] = inspect_image(ref)
        facts["images"][role] = image and {
            "ref": ref, "id": image["Id"], "size": image.get("Size", 0),
            "layers": image_layers(image), "created": image.get("Created"),
            "made_by": made_by(image) if role == "current" else None,
            "origin": describe_origin(image) if role == "current" else None}
    if found["base"] is not None:
        facts["drift"] = base_drift(config, found["base"], line.engine)
    snaps = list_snapshots(line)
    facts["snapshots"] = {"count": len(snaps), "newest": snaps[0]["tag"] if snaps else None}
    state = line.read_state()
    facts["profile_exists"] = profile_exists(line)
    if found["current"] is not None:
        facts["disk"] = disk_usage(line)
        facts["agents"] = installed_agents(line, found["current"])
    holder = (state.get("holder") or {}) if lock_is_held(line) else None
    facts["lock"] = holder and {key: holder.get(key) for key in
                                ("pid", "kind", "phase", "target", "started", "saver_pid")}
    facts["lock_holder"] = holder is not None and describe_holder(holder) or None
    try:
        egress = Egress(config, os.environ)
        facts["egress"] = {"policy": egress.mode, "reaches": egress.describe(),
                           "proxy": egress.proxy, "running": bool(egress.proxy and (inspect(
                               "container", egress.proxy) or {}).get("State", {}).get("Running"))}
    except PiError as err:
        facts["egress"] = {"policy": config.egress, "problem": str(err)}
    facts["notice"] = state.get("notice")
    free = engine_free_space(line) if config.save_limit is None else None
    facts["save_limit"] = None if config.save_limit is not None else \
        "%s, half the engine's free space" % human_size(free // 2) if free is not None else \
        "%s (the engine's free space is not known here)" % human_size(SAVE_FALLBACK_LIMIT)
    left = [row["names"] for row in leftover_containers(line)]
    facts["waiting"] = {name: entry for name, entry in (state.get("waiting") or {}).items()
                        if name in left}
    facts["left_behind"] = len(left) - len(facts["waiting"])
    try:
        cwd = os.path.realpath(os.getcwd())
        project = Project.inspect(config, cwd, here=False)
        point = mount_point(project.target, image_home(found["current"] or {}), config.mount_at)
        facts["target"] = {"path": project.target, "inside": os.path.join(
            point, project.subdir) if project.subdir else point, "notes": project.notes}
    except (PiError, FileNotFoundError) as err:
        facts["target"] = {"path": None, "why_not": str(err)}
    return facts


def print_status(config, line, facts):
    print("pi-agent %s" % facts["version"])
    print("\nsettings (config file: %s%s):" % (
        config.path, "" if facts["config_file_exists"] else ", absent"))
    rows = [(name, config.raw[name] if len(config.raw[name]) <= 60 else
             config.raw[name][:57] + "...", "(%s)" % config.sources[name])
            for name, _d, _m in SETTINGS]
    if facts["save_limit"]:  # (empty: the engine's free space says)
        rows[[row[0] for row in rows].index("PI_AGENT_SAVE_LIMIT")] = (
            "PI_AGENT_SAVE_LIMIT", facts["save_limit"], "(default)")
    print_table(rows)
    sys.stdout.flush()
    for problem in facts["problems"]:
        say(problem, "error")
    for warning in facts["warnings"]:
        say(warning, "warning")
    print("python: %s (PI_AGENT_PYTHON=%s)" % (facts["python"],
                                              os.environ.get("PI_AGENT_PYTHON", "python3")))
    print("engine: %s" % facts["engine"])
    egress = facts["egress"]
    print("network: %s: %s" % (egress["policy"], egress.get("problem") or egress["reaches"] + (
        " (%s)" % ("running" if egress["running"] else "the next run starts it")
        if egress["proxy"] else "")))
    print("\nimages:")
    rows = []
    for role in ("base", "current"):
        image = facts["images"][role]
        if image is None:
            rows.append((role, line.base if role == "base" else line.current, "absent", "",
                         ""))
            continue
        rows.append((role, image["ref"], human_size(image["size"]),
                     plural(image["layers"], "layer"), image["origin"] or "built " + local_time(
                         (image["created"] or "")[:19] + "Z")))
    snaps = facts["snapshots"]
    rows.append(("snapshots", "%d" % snaps["count"], "newest " + snaps["newest"]
                 if snaps["newest"] else "", "", ""))
    print_table(rows)
    disk = facts["disk"]
    if disk is not None:
        print("disk: current holds %s of its own on %s shared with base; %s only its "
              "snapshots hold (pi-prune 0 would free it)" % (
                  human_size(disk["own"]), human_size(disk["base"]),
                  human_size(disk["snapshots"])))
    elif facts["images"]["current"] is not None:
        print("disk: not known on this image store (%s: the engine's image sizes are not what "
              "each layer holds on disk); %s system df shows the engine's own figures"
              % (facts["engine_facts"]["store"], facts["engine_facts"]["kind"]))
    if not facts["profile_exists"]:
        print("there is no profile %s: pi-branch %s makes it (pi-branch lists those there are)"
              % (facts["profile"], facts["profile"]))
    agents = facts["agents"]
    if agents is not None:
        print("agents in current: %s" % (", ".join(
            "%s (%s)" % (name, printable(version)[:60]) for name, version in sorted(agents.items()))
            or "none yet"))
        if config.agent not in agents:
            print("  (the first pi installs %s)" % config.agent)
    if facts["drift"]:
        print("the base differs from your settings: %s; pi-rebuild-base builds it again (then "
              "pi-reset-system starts current afresh from it; your environment stays a snapshot)"
              % "; ".join(facts["drift"]))
    print("\nlock: %s" % printable(facts["lock_holder"] or "free"))
    waiting = [waiting_message(name, entry) for name, entry in facts["waiting"].items()]
    if facts["notice"] and facts["notice"] not in waiting:
        print("notice: %s" % printable(facts["notice"]))
    if facts["left_behind"]:
        print("left-behind containers: %d (see pi-orphans; the next pi recovers them)"
              % facts["left_behind"])
    for message in waiting:
        print("waiting: %s" % printable(message))
    target = facts["target"]
    if target["path"] is None:
        print("target: none here: %s" % printable(target["why_not"]))
        return
    print("target: %s (inside: %s)" % (printable(target["path"]), printable(target["inside"])))
    for note in target["notes"]:
        print("  " + printable(note))


# pi-status --check: what a first run needs, asked in seconds. TLS is tried
# from this host, through the proxies the build is given, trusting what the
# base will: the public roots (as Debian's
# ca-certificates ships them, which Node's own match; without it here, this
# host's store, which may trust a proxy already) and PI_AGENT_CA_CERTS.
NPM_REGISTRY = "https://registry.npmjs.org/"
PUBLIC_ROOTS = "/usr/share/ca-certificates/mozilla"
BUILD_SPACE = 3 << 30  # the base (1.3 GB) and its build's steps, with room


def reach(url, config):
    """None when the server at `url` answers, else why not (and what to do)."""
    import ssl
    import urllib.error
    import urllib.request
    roots = [os.path.join(PUBLIC_ROOTS, name) for name in sorted(os.listdir(PUBLIC_ROOTS))
             ] if os.path.isdir(PUBLIC_ROOTS) else []
    context = ssl.create_default_context(cadata="".join(
        (read_regular(path) or b"").decode("ascii", "replace") for path in roots) or None)
    if config.ca_certs:
        context.load_verify_locations(cadata=config.ca_certs)
    # The environment's proxies, else the docker client's (as the build's).
    given = {} if any(os.environ.get(name) for name in PROXY_ENV) else docker_config_proxies()
    opener = urllib.request.build_opener(urllib.request.HTTPSHandler(context=context),
                                         urllib.request.ProxyHandler({
                                             scheme: given[scheme.upper() + "_PROXY"]
                                             for scheme in ("http", "https")
                                             if given.get(scheme.upper() + "_PROXY")} or None))
    try:
        opener.open(urllib.request.Request(url, method="HEAD"), timeout=5).close()
    except urllib.error.HTTPError as err:  # (the server answered: reached)
        return None if err.code in (404, 405) else "%s: HTTP %d" % (url, err.code)
    except OSError as err:  # (URLError, a timeout)
        reason = getattr(err, "reason", err)
        if isinstance(reason, ssl.SSLCertVerificationError):
            return "%s: %s: %s" % (url, reason.verify_message, untrusted_advice(config))
        return "%s: %s; behind a proxy, set HTTPS_PROXY and HTTP_PROXY" % (url, reason)
    return None


def apt_mirrors(image):
    """The http(s) URIs of `image`'s apt sources, read in a throwaway
    container with no network."""
    found = docker("run", "--rm", "--network", "none", "--label", MINE, "--entrypoint", "sh",
                   image, "-c", "cat /etc/apt/sources.list /etc/apt/sources.list.d/* 2>/dev/null",
                   check=False, timeout=30).stdout
    return list(dict.fromkeys(re.findall(
        r"^\s*(?:deb\s+(?:\[[^]]*\]\s+)?|URIs:\s*)(https?://\S+)", found, re.M)))


def run_checks(config, line):
    """pi-status --check: a line for each check (ok, or FAILED and what to
    do), reading only; returns how many failed."""
    failed = []

    def said(name, problem, fine):
        if problem:
            failed.append(name)
        print(printable("%-8s %s" % (name + ":", "FAILED: " + problem if problem else fine)),
              flush=True)

    for problem in config.problems:
        said("setting", problem, "")
    engine = build = from_here = None
    try:
        engine = line.engine = probe_engine(config.state_dir, fresh=True)
        said("engine", None, "ok: " + engine.name)
    except PiError as err:
        said("engine", str(err), "")
    if engine:
        here = next((ref for ref in (line.current, line.base) if inspect_image(ref)), None)
        build, from_here = here is None, here is None and inspect_image(config.base_image)
        if here or from_here:
            said("image", None, "ok: %s is here" % (here or config.base_image) + (
                "" if here else " (PI_AGENT_BASE_IMAGE): the first pi builds the base FROM it, "
                "in a few minutes"))
        else:
            try:
                pulled = docker("manifest", "inspect", config.base_image, check=False, timeout=15)
                why = pulled.returncode and str(docker_failure(("manifest",), pulled.stderr))
            except EngineError as err:
                why = str(err)
            said("image", why and "%s (PI_AGENT_BASE_IMAGE) is not here and cannot be pulled "
                 "(%s); set PI_AGENT_BASE_IMAGE to an image you have (%s images) or can pull"
                 % (config.base_image, why.split(": ", 1)[-1], engine_kind()),
                 "ok: %s (PI_AGENT_BASE_IMAGE) can be pulled: the first pi pulls it and builds "
                 "the base FROM it, in a few minutes" % config.base_image)
    if from_here:
        for uri in apt_mirrors(config.base_image):
            said("apt", reach(uri, config), "ok: %s answers" % uri)
    said("npm", reach(NPM_REGISTRY, config), "ok: %s answers, its certificate trusted (the "
         "build and agents' installs use it)" % NPM_REGISTRY)
    free = engine_free_space(line) if engine else None
    if free is not None:
        need = BUILD_SPACE if build else 1 << 30
        said("disk", free < need and "%s free where the engine keeps its images (%s), under the "
             "%s %s needs; free some (%s system df says what holds it)" % (
                 human_size(free), engine.free_space_dir, human_size(need),
                 "a first build" if build else "a run's save", engine_kind()),
             "ok: %s free where the engine keeps its images" % human_size(free))
    return len(failed)


def cmd_status(args):
    """Everything, even with a bad setting: the diagnostic command must not
    go blind when it is needed most. A bad setting is shown (its default
    used meanwhile) and is the exit status."""
    config = Config(lenient=True, profile=args.profile)
    line = Line(config)
    if args.check:
        failed = run_checks(config, line)
        if failed:
            raise PiError("%s failed: see above" % plural(failed, "check"), EXIT_CHECK_FAILED)
        say("every check passed")
        return 0
    facts = status_facts(config, line)
    if args.json:
        print(json.dumps(facts, indent=1, sort_keys=True))
    else:
        print_status(config, line, facts)
    if config.problems:
        raise PiError("%s: see above; pi-status used the defaults in their place"
                      % plural(len(config.problems), "bad setting"), EXIT_BAD_SETTING)
    return 0


def snapshot_entry(snap, image, current, next_run):
    """pi-snapshots --json: one snapshot (its shape in docs/commands.md)."""
    day, clock, millis = SNAPSHOT_RE.match(snap["tag"]).groups()
    return {"name": snap["tag"], "id": image.get("Id"),
            "kept_at": "%s-%s-%sT%s:%s:%s.%sZ" % (day[:4], day[4:6], day[6:], clock[:2],
                                                  clock[2:4], clock[4:], millis),
            "made": image.get("Created"), "size": image.get("Size"), "pins": snap["pins"],
            "current": bool(image.get("Id")) and image.get("Id") == current.get("Id"),
            "made_by": made_by(image), "next_run": next_run}


def print_pruned(line):
    """What the detached saver's auto-prune removed, not said yet (the next
    command that takes the lock says it, and forgets it)."""
    pruned = line.read_state().get("pruned")
    if pruned:
        print(pruned_message(pruned, line.config.snapshot_keep).replace(
            "auto-prune removed", "after the last save, auto-prune removed", 1))


def pin_snapshot(line, pin, snapshot):
    """pi-snapshots --pin: a second tag, pin-NAME, on SNAPSHOT's image, or on
    current's (kept as a snapshot now, if none keeps it already)."""
    with exclusive(line, "pin") as state:
        if inspect_image(line.pin(pin)) is not None:
            raise Refused("pin %s exists already; pi-snapshots --unpin %s first" % (pin, pin))
        if snapshot is not None:
            name = resolve_snapshot(line, snapshot)["tag"]
        else:
            current = inspect_image(line.current)
            if current is None:
                raise NotFound("%s does not exist yet; nothing to pin" % line.current)
            name = kept_as(line, current)
            if name is None:
                # (the lock dropped the state's record of current: the next
                # run inspects it, sees this tag and keeps no second one)
                name = add_snapshot(line, state, current["Id"])
                line.write_state(state)
        docker("tag", line.snap(name), line.pin(pin))
    say("pinned %s as %s: no prune removes it (pi-rollback %s; pi-snapshots --unpin %s)"
        % (name, pin, pin, pin))
    return 0


def unpin_snapshot(line, pin):
    with exclusive(line, "pin"):
        if inspect_image(line.pin(pin)) is None:
            raise NotFound("no pin %s of %s; pi-snapshots lists them" % (pin, line.name))
        docker("rmi", line.pin(pin))
    say("unpinned %s: its snapshot is pruned as the others are" % pin)
    return 0


def cmd_snapshots(args):
    line = profile_line(args)
    if args.pin or args.unpin:
        return (pin_snapshot(line, args.pin, args.snapshot) if args.pin
                else unpin_snapshot(line, args.unpin))
    wait_for_save(line)
    snaps = list_snapshots(line)
    if not snaps:
        if args.json:
            print("[]")
            return 0
        print("no snapshots of %s yet: each run that changes the environment makes one"
              % line.name)
        return 0
    current = inspect_image(line.current) or {}
    images = json.loads(docker("image", "inspect", *[s["id"] for s in snaps]).stdout)
    by_id = {image["Id"].split(":")[-1][:12]: image for image in images}
    # The run that started from each (the session log names the snapshot
    # that kept what it started from); older snapshots may have none.
    next_run = {}
    for record in newest_sessions(line.sessions_path, max(200, 5 * len(snaps))):
        next_run.setdefault(record.get("snapshot"), record)
    wait_for_reports(line, list(next_run.values()))
    if args.json:
        ensure_reports(line, list(next_run.values()))
    for record in next_run.values():
        record["paths"] = run_paths(line, record)
    if args.json:
        print(json.dumps([snapshot_entry(snap, by_id.get(snap["id"]) or {}, current,
                                         next_run.get(snap["tag"])) for snap in snaps],
                         indent=1, sort_keys=True))
        return 0
    rows = [("", "NAME (KEPT AT, UTC)", "PINNED AS", "CREATED", "SIZE", "MADE BY",
             "REPLACED BY (THE RUN)")]
    for snap in snaps:
        image = by_id.get(snap["id"]) or {}
        record = next_run.get(snap["tag"])
        rows.append(("*" if image.get("Id") and image["Id"] == current.get("Id") else "",
                     snap["tag"], ", ".join(snap["pins"]),
                     local_time((image.get("Created") or "")[:19] + "Z"),
                     human_size(image.get("Size", 0)), describe_origin(image),
                     "%s, exit %s, +%s" % (record.get("kind"), "?" if record.get(
                         "exit_status") is None else record["exit_status"], human_size(
                         max(record.get("bytes_added") or 0, 0))) if record else "-"))
    print_table(rows)
    print_pruned(line)
    print("A snapshot keeps the environment as it was before a change: it is named for when "
          "that change (a run, a rollback) began; CREATED is when the state itself was made, by "
          "what MADE BY says; REPLACED BY is the run that started from it.")
    if any(row[0] for row in rows):
        print("* is current's image: pi-rollback to it changes nothing.")
    return 0


def switch_current(line, state, new_ref, what):
    """current := new_ref, keeping the replaced image as a snapshot."""
    current = inspect_image(line.current)
    new = inspect_image(new_ref)
    if new is None:
        raise NotFound("%s does not exist" % new_ref)
    if current is None:
        docker("tag", new_ref, line.current)
        say("current is now %s" % what)
        return 0
    if current["Id"] == new["Id"]:
        say("current is already %s; nothing to do" % what)
        return 0
    # No prune here: moving current between kept states never drops one
    # (the next run's auto-prune does, and says so).
    kept, fresh = replace_current(line, state, current, new_ref)
    say("current is now %s; the replaced environment is %s as %s (undo: pi-rollback %s)"
        % (what, "kept" if fresh else "still kept", kept, kept))
    remove_own_dangling(line)
    return 0


def cmd_rollback(args):
    line = profile_line(args)
    with exclusive(line, "rollback") as state:
        snap = resolve_snapshot(line, args.snapshot)
        return switch_current(line, state, line.snap(snap["tag"]), snap["tag"])


def carry_config(line, old, base):
    """A copy of `base` with the agents' own files (AGENT_CONFIG) of image
    `old` in it, committed; returns its ID and what it carried ("~/.pi",
    ...; none: the ID is base's). Taken out of and put into containers
    that are created, never started (docker cp): nothing of `old` runs,
    and only those paths are written. The session log has the commit."""
    import tarfile
    home, carried, into, tar = image_home(old), [], None, None
    source = docker("create", "--label", MINE, old["Id"]).stdout.strip()
    made = docker("create", "--label", MINE, base["Id"]).stdout.strip()
    try:
        for name in [name for names in AGENT_CONFIG.values() for name in names]:
            path = os.path.join(home, name)
            out = DockerCall(("cp", "%s:%s" % (source, path), "-"), capture=False,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            try:
                members = tarfile.open(fileobj=out.proc.stdout, mode="r|")
            except tarfile.ReadError:
                members = None
            if members is None:
                result = out.finish(check=False)
                if result.returncode == 0 or b"could not find" not in result.stderr.lower():
                    raise docker_failure(("cp",), result.stderr.decode(errors="replace"))
                continue
            if into is None:
                into = DockerCall(("cp", "-", made + ":/"), capture=False,
                                  stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)
                tar = tarfile.open(fileobj=into.proc.stdin, mode="w|")
            prefix = os.path.dirname(path).lstrip("/")
            for member in members:
                if not carried or carried[-1] != "~/" + name:
                    carried.append("~/" + name)
                    # (its parents in the home, the agent's, as base may not have them)
                    for depth in range(home.count("/"), prefix.count("/") + 1):
                        parent = tarfile.TarInfo("/".join(prefix.split("/")[:depth + 1]))
                        parent.type, parent.mode = tarfile.DIRTYPE, 0o755
                        parent.mtime, parent.uid, parent.gid = time.time(), member.uid, member.gid
                        tar.addfile(parent)
                member.name = prefix + "/" + member.name
                if member.islnk():
                    member.linkname = prefix + "/" + member.linkname
                tar.addfile(member, members.extractfile(member) if member.isfile() else None)
            out.finish()
        if into is None:
            return base["Id"], []
        tar.close()
        into.proc.stdin.close()
        into.finish()
        labels = saved_labels(line, made, base, {"kind": "reset", "exit_status": 0})
        new = inspect_image(docker(*commit_args(made, base, labels, "pi-agent: the base, and %s "
                                                "of before" % ", ".join(carried))).stdout.strip())
    finally:
        docker("rm", "-f", "-v", source, made, check=False)
    line.record_session({"started": utc_iso(time.time()), "kind": "reset", "exit_status": 0,
                         "image_before": base["Id"], "image_after": new["Id"], "new_image": new,
                         "container": made,
                         "bytes_added": (new.get("Size") or 0) - (base.get("Size") or 0)}, "run")
    return new["Id"], carried


def cmd_reset_system(args):
    line = profile_line(args)
    with exclusive(line, "reset-system") as state:
        base = inspect_image(line.base)
        if base is None:
            raise NotFound("%s does not exist; pi-rebuild-base builds it" % line.base)
        current = inspect_image(line.current)
        if current is None or current["Id"] == base["Id"]:
            return switch_current(line, state, line.base, "the base image (%s)" % line.base)
        say("current becomes the base image: what runs installed and changed goes, and with it "
            "the agents' logins, settings and sessions%s; the environment you have now stays "
            "a snapshot" % (" too" if args.drop_config else ", but for their own files "
                            "(~/.pi, ~/.claude, ...: carried over; --drop-config leaves them)"))
        new, carried = (base["Id"], []) if args.drop_config else carry_config(line, current, base)
        return switch_current(line, state, new, "the base image (%s)%s" % (
            line.base, ", with %s of before" % ", ".join(carried) if carried else ""))


def ask(question):
    """The user's yes on the terminal."""
    try:
        answer = input("pi-agent: %s [y/N] " % question)
    except EOFError:
        answer = ""
    return answer.strip().lower() in ("y", "yes")


def confirm(question, yes):
    """Go on only on yes (--yes, or asked on the terminal): anything else
    is a refusal (exit 3), with nothing changed."""
    if yes:
        return
    if not sys.stdin.isatty():
        raise Refused("%s Refusing without --yes (no terminal to ask on)" % question)
    if not ask(question):
        raise Refused("nothing removed (answered no)")


def settle(line, state):
    """Until what goes by itself, and would keep an image from going, has
    gone (a minute at most): the containers the line's savers remove once
    the lock is free, and the user's short-lived helpers in the repository
    (a layer's listing, pi-status's look at the agents: no wrapper pid)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        helpers = [row for row in docker(
            "ps", "--filter", "label=%srepo=%s" % (LABEL, line.repo), "--filter", "label=" + MINE,
            "--format", '{{.ID}}/{{.Label "%spid"}}' % LABEL).stdout.split() if row.endswith("/")]
        if not helpers and not any(being_removed(state, name) for name in
                                   state.get("removing") or {}):
            return
        time.sleep(0.1)


def purge(line, yes):
    """pi-reset-all --base: every image of the user's in the repository (every
    profile's, and base), the containers of its runs, and its files in the
    state directory (the directory too, when no other repository has files
    there); never what carries another UID."""
    config, key, held = line.config, line.key, []

    def files():  # (the line's, Line's names, of every profile: not another repository's)
        mine = re.compile(re.escape(key) + r"(?:@[a-z0-9][a-z0-9_.-]*)?\.(?:lock|json|log|log\.1|"
                          r"sessions\.jsonl|agents\.json|runs)")
        try:
            return sorted(name for name in os.listdir(config.state_dir) if mine.fullmatch(name))
        except FileNotFoundError:
            return []
    profiles = [name[len(key) + 1:-len(".lock")] for name in files()
                if name.startswith(key + "@") and name.endswith(".lock")]
    try:
        for profile in [""] + [name for name in profiles if not profile_problem(name)]:
            held.append(LineLock(Line(config.for_profile(profile))))
            held[-1].acquire("reset-all")
            settle(held[-1].line, held[-1].line.read_state())
        names = files()
        rows = [row.split("/") for row in docker(
            "ps", "-a", "--filter", "label=%srepo=%s" % (LABEL, line.repo), "--filter",
            "label=" + MINE, "--format", '{{.Names}}/{{.State}}/{{.Label "%spid"}}'
            % LABEL).stdout.split()]
        running = [name for name, state, _pid in rows if state == "running"]
        if running:
            raise Busy("%s is running (a run of another state directory?); let it end, then "
                       "pi-reset-all --base again" % running[0])
        refs = ["%s:%s" % (line.repo, tag) for tag in docker(
            "image", "ls", line.repo, "--format", "{{.Tag}}").stdout.split() if tag != "<none>"]
        images = json.loads(docker("image", "inspect", *refs).stdout) if refs else []
        theirs = {image["Id"] for image in images if image_labels(image).get(OWNER_LABEL)
                  != str(os.getuid())}
        mine = {tag for image in images if image["Id"] not in theirs
                for tag in image.get("RepoTags") or []}
        refs = [ref for ref in refs if ref in mine]
        confirm("remove everything of yours in %s: %s (every profile's environment and "
                "snapshots, and the base: the next pi builds it again, a few minutes), %s, and "
                "their state in %s? Project files are not touched."
                % (line.repo, plural(len(refs), "image"), plural(len(rows), "container"),
                   config.state_dir), yes)
        if rows:
            docker("rm", "-f", "-v", *[name for name, _state, _pid in rows])
        proxies = docker("ps", "-q", "--filter", "label=%segress=%d" % (LABEL, os.getuid()),
                         "--filter", "label=%segress-base=%s" % (LABEL, line.base)
                         ).stdout.split()
        if proxies:  # (the egress proxies of the line's base, by name: see Egress.start)
            docker("rm", "-f", *proxies)
        if refs:
            docker("rmi", *refs)
        dangling = docker("image", "ls", "-q", "--filter", "dangling=true", "--filter",
                          "label=" + MINE, "--filter", "label=%srepo=%s" % (LABEL, line.repo)
                          ).stdout.split()
        if dangling:
            docker("rmi", *dangling, check=False)
        import shutil
        for name in names + [os.path.join("run", row[0]) for row in rows]:
            path = os.path.join(config.state_dir, name)
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
        if not set(os.listdir(config.state_dir)) - {"run", "projects", "engines.json",
                                                     "egress.json", "egress.lock"}:
            shutil.rmtree(config.state_dir)
        say("removed %s and %s of %s, and their state; %s" % (
            plural(len(refs), "image"), plural(len(rows), "container"), line.repo,
            "images of other users stay (%s)" % plural(len(theirs), "image") if theirs else
            "the next pi builds the base again"))
    finally:
        for lock in held:
            if lock.fd is not None:
                os.close(lock.fd)
    return 0


def cmd_reset_all(args):
    line = profile_line(args)
    if args.base:
        return purge(line, args.yes)
    with exclusive(line, "reset-all") as state:
        snaps = list_snapshots(line)
        refs = snapshot_refs(line, snaps)
        if inspect_image(line.current) is not None:
            refs.insert(0, line.current)
        if not refs:
            say("%s has no current image and no snapshots; nothing to remove" % line.name)
            return 0
        confirm("remove %s and its %s (pinned or not)? The environment is lost; the base image "
                "stays." % (line.current, plural(len(snaps), "snapshot")), args.yes)
        settle(line, state)
        docker("rmi", *refs)
        remove_own_dangling(line)
        state["snapshots"] = []
        say("removed %s; the next pi starts from %s" % (plural(len(refs), "image"), line.base))
    return 0


def cmd_rebuild_base(args):
    line = profile_line(args)
    with exclusive(line, "rebuild-base"):
        before = inspect_image(line.base)
        build_base(line, no_cache=args.no_cache, first=False)
        after = inspect_image(line.base)
        remove_own_dangling(line)
    if before and after and before["Id"] == after["Id"]:
        say("the base image is unchanged (everything came from the build cache; "
            "--no-cache rebuilds every step)")
    elif inspect_image(line.current) is not None:
        say("current still holds your environment on the old base; pi-reset-system starts "
            "current afresh from the new base (your environment now is kept as a snapshot)")
    return 0


def cmd_prune(args):
    config = Config(profile=args.profile)
    line = require_profile(Line(config))
    if args.dry_run:
        # A plain read: no lock taken, nothing recovered, nothing written.
        wait_for_save(line)
        doomed = doomed_snapshots(line, list_snapshots(line), args.keep)
        freed = bytes_freed(line, [snap["tag"] for snap in doomed])
    else:
        with exclusive(line, "prune") as state:
            doomed = prune_snapshots(line, state, args.keep)
    say("%s %s%s, keeping %s and the pinned%s" % (
        "would remove" if args.dry_run else "removed", plural(len(doomed), "snapshot"),
        (" (" + " ".join(s["tag"] for s in doomed) + ")") if doomed else "",
        "the %d newest" % args.keep if args.keep is not None else
        "the newest %d (noise apart), one a day for a week, one a week for a month"
        % config.snapshot_keep,
        ("; what that would free is not known on %s's image store" % line.engine.name
         if freed is None else "; that would free about %s%s" % (
             human_size(freed), " (what they hold is in what stays too: current, base or "
             "other snapshots)" if doomed and not freed else " (layers shared with what stays "
             "are not counted)" if doomed else ""))
        if args.dry_run else ""))
    return 0


def cmd_flatten(args):
    line = profile_line(args)
    with exclusive(line, "flatten") as state:
        current = inspect_image(line.current)
        if current is None:
            raise NotFound("%s does not exist yet; nothing to flatten" % line.current)
        layers = image_layers(current)
        if layers <= 1:
            say("%s has a single layer already" % line.current)
            return 0
        started, base = time.monotonic(), inspect_image(line.base)
        below = ((base or {}).get("RootFS") or {}).get("Layers") or []
        if below and current["RootFS"]["Layers"][:len(below)] == below:
            say("the flattened current shares no layer with the base, as the layered one does: "
                "it takes about %s more disk" % human_size(base.get("Size") or 0))
        kept = flatten_current(line, state, current, progress=sys.stderr.isatty())
        say("flattened %s: %d layers into 1 in %.0f s; the layered image is kept as %s "
            "(undo: pi-rollback %s; pi-prune frees its space)"
            % (line.current, layers, time.monotonic() - started, kept, kept))
    return 0


def cmd_orphans(args):
    line = profile_line(args)
    rows = leftover_containers(line, sizes=True)
    waiting = line.read_state().get("waiting") or {}
    if args.json:
        print(json.dumps([{"container": row["names"], "id": row.get("id"),
                           "created": row.get("createdat"), "started": row.get("started") or None,
                           "target": row.get("target") or None, "kind": row.get("kind") or None,
                           "state": row.get("state"), "size": row.get("size"),
                           "waiting": waiting.get(row["names"])} for row in rows],
                         indent=1, sort_keys=True))
        return 0
    if not rows:
        print("no left-behind containers of %s" % line.name)
        return 0
    table = [("CONTAINER", "AGE", "TARGET", "STATE", "CHANGES")]
    for row in rows:
        table.append((row["names"], row.get("runningfor", ""), row.get("target", ""),
                      "waiting" if row["names"] in waiting else row.get("state", ""),
                      (row.get("size") or "").split(" ")[0]))
    print_table(table)
    for row in rows:
        if row["names"] in waiting:
            print(printable(waiting_message(row["names"], waiting[row["names"]])))
    return 0


# Takes the paths (NUL-separated, on stdin) out of a stopped container's
# writable layer, at /pi-agent-layer: first each is checked, never through
# a symbolic link (a directory on the way that the run made a link), and
# none goes unless all are there; a line says what is wrong with one.
DROP_SCRIPT = r"""cd /pi-agent-layer || exit 1
xargs -0 -r sh -c '
check() {
  d=. r=${1#/}
  while :; do
    case $r in */*) d=$d/${r%%/*} r=${r#*/} ;; *) d=$d/$r; break ;; esac
    if [ -L "$d" ]; then echo "$1: the run made ${d#.} a symbolic link; drop that"; return 1; fi
    [ -d "$d" ] || { echo "$1: the run did not change it"; return 1; }
  done
  [ -e "$d" ] || [ -L "$d" ] || { echo "$1: the run did not change it"; return 1; }
}
bad=
for p do check "$p" || bad=1; done
[ -z "$bad" ] || exit 3
for p do check "$p" && rm -rf -- "$d" || exit 1; done
' sh"""


def drop_paths(line, state, only, paths):
    """pi-recover --drop: what the run of a left-behind container (`only`,
    else the one waiting, else the one left) did to `paths` is not kept: a
    new file goes, a changed one shows its old version. Its writable layer
    is changed by a short root container of REPO:base (never current),
    with no network and no capability but to delete. Returns its name."""
    for path in paths:
        if os.path.normpath(path) != path or path.startswith("//") or path == "/" or \
                "\0" in path:
            raise PiError("pi-recover --drop %s: give each path absolute and as it is, with "
                          "no .., no // and no / at the end" % path, EXIT_USAGE)
    rows = leftover_containers(line)
    if only:
        rows = [row for row in rows if only in (row["names"], row["id"])]
    waiting = [row for row in rows if row["names"] in (state.get("waiting") or {})]
    if len(waiting or rows) != 1:
        raise NotFound("no left-behind container %s; pi-orphans lists them" % only if only else
                       "pi-recover --drop PATH ... CONTAINER: name the container; pi-orphans "
                       "lists them" if rows else "no left-behind containers of %s" % line.name)
    name = (waiting or rows)[0]["names"]
    docker("stop", "--time", "0", name, check=False)  # (its agent may be at work still)
    info = inspect("container", name)
    if not layer_listable(line, info):
        raise Refused("the layer of %s is out of reach here (the engine's storage is not "
                      "overlay2 on this host), so pi-agent cannot drop paths from it: "
                      "pi-recover %s saves it whole, pi-clean-orphans discards it" % (name, name))
    result = docker("run", "--rm", "-i", "--label", MINE, "--pull", "never", "--network", "none",
                    "-u", "0", "--cap-drop", "ALL", "--cap-add", "DAC_OVERRIDE", "--cap-add",
                    "FOWNER", "--read-only", "--security-opt", "no-new-privileges", "--log-driver",
                    "none", "--entrypoint", "sh", "--mount", mount_spec(
                        info["GraphDriver"]["Data"]["UpperDir"], "/pi-agent-layer"),
                    line.base, "-c", DROP_SCRIPT, feed="\0".join(paths), check=False)
    if result.returncode != 0:
        problems = [printable(text) for text in result.stdout.splitlines()]
        if problems:
            raise Refused("nothing dropped from %s: %s" % (name, "; ".join(problems[:5])))
        raise docker_failure(("run",), result.stderr)
    say("dropped from %s: %s" % (name, ", ".join(printable(path) for path in paths)))
    return name


def cmd_recover(args):
    line = profile_line(args)
    # (--drop takes the words after it: the one that is not a path is the container)
    paths = [word for word in args.drop if word.startswith("/")]
    names = [word for word in args.drop if not word.startswith("/")] + \
        ([args.container] if args.container else [])
    if len(names) > 1 or (args.drop and not paths):
        raise PiError("pi-recover --drop PATH ... [CONTAINER]: each PATH absolute, as inside "
                      "the container, and one container at most", EXIT_USAGE)
    with exclusive(line, "recover", recover=False) as state:
        only = drop_paths(line, state, names[0] if names else None, paths) if paths \
            else names[0] if names else None
        if not recover_leftovers(line, state, only=only, decide=True):
            say("no left-behind containers of %s; nothing to recover" % line.name)
    return 0


def cmd_clean_orphans(args):
    line = profile_line(args)
    with exclusive(line, "clean-orphans", recover=False) as state:
        rows = leftover_containers(line)
        if not rows:
            say("no left-behind containers of %s" % line.name)
            return 0
        names = [row["names"] for row in rows]
        confirm("discard %d left-behind containers (%s)? What their runs changed in the "
                "environment is lost; project files are not touched."
                % (len(names), ", ".join(names)), args.yes)
        running = [row["names"] for row in rows if row.get("state") == "running"]
        if running:  # (its wrapper gone: see leftover_containers)
            docker("stop", "--time", str(STOP_GRACE), *running, check=False)
        show_notes(line, teardown(line, names, state, check=True))
        state.pop("failed", None)
        state.pop("notice", None)
        say("removed %s" % plural(len(names), "container"))
    return 0


PROFILE_SNAPSHOT_RE = re.compile(r"(?:(.+)-)?snap-\d{8}-\d{6}\.\d{3}")


def state_profiles(config):
    """The profiles that have state files (made, or once used)."""
    key = Line(config).key
    try:
        files = os.listdir(config.state_dir)
    except OSError:
        return []
    names = [file[len(key) + 1:-len(".json")] for file in files
             if file.startswith(key + "@") and file.endswith(".json")]
    return [name for name in names if not profile_problem(name)]


def list_profiles(config):
    """{profile: {current (its inspect record or None), snapshots (a
    count), used (when its state last changed, or None)}}: those with
    images, and those pi-branch made; the default profile ("") always.
    Saves in progress are waited for first."""
    lines = {name: Line(config.for_profile(name))
             for name in [""] + state_profiles(config)}
    for line in lines.values():
        wait_for_save(line)
    rows = json_lines(docker("image", "ls", config.image_repo, "--format",
                             '{"tag":{{json .Tag}},"id":{{json .ID}}}').stdout)
    found = {"": {"current": None, "snapshots": 0}}
    for row in rows:
        name = "" if row["tag"] == "current" else row["tag"][:-len("-current")] \
            if row["tag"].endswith("-current") else None
        if name == "" or (name and not profile_problem(name)):
            found.setdefault(name, {"snapshots": 0})["current"] = row["id"]
        match = PROFILE_SNAPSHOT_RE.fullmatch(row["tag"])
        if match and not profile_problem(match.group(1) or DEFAULT_PROFILE):
            found.setdefault(match.group(1) or "", {"current": None, "snapshots": 0})
            found[match.group(1) or ""]["snapshots"] += 1
    ids = sorted({entry["current"] for entry in found.values() if entry["current"]})
    images = {image["Id"].split(":")[-1][:12]: image for image in
              json.loads(docker("image", "inspect", *ids).stdout)} if ids else {}
    for name in lines:
        found.setdefault(name, {"current": None, "snapshots": 0})
    for name, entry in list(found.items()):
        line = lines.get(name) or Line(config.for_profile(name))
        entry["current"] = images.get(entry["current"])
        if name and entry["current"] is None and not entry["snapshots"] and \
                not line.read_state().get("made"):
            del found[name]
            continue
        try:
            entry["used"] = os.stat(line.state_path).st_mtime
        except OSError:
            entry["used"] = None
    return found


def branch_source(config, source):
    """(image ID, words for it) that pi-branch copies: the selected
    profile's current (base when the default has none yet), a snapshot of
    it, another profile's current, or base; the ID is None for a base that
    is still to be built. NotFound before anything is written."""
    line = Line(config)
    if source is not None and source != "base" and not source.startswith(SNAPSHOT_PREFIX) \
            and ":" not in source:
        line = Line(config.for_profile(checked_profile("pi-branch", source, "--from")))
        source = None
    wait_for_save(line)
    if source not in (None, "base"):
        name = resolve_snapshot(line, source)["tag"]
        return inspect_image(line.snap(name))["Id"], "snapshot %s of %s" % (name, line.name)
    image = inspect_image(line.current) if source is None else None
    if image is not None:
        return image["Id"], "the environment of %s" % line.name
    if source is None and line.profile:
        raise NotFound("there is no profile %s to copy; pi-branch lists them" % line.profile)
    base = inspect_image(line.base)
    return base and base["Id"], "the base image"


def make_profile(config, name, source=None):
    """Profile `name`, a copy of `source` (see branch_source): a tag."""
    target = Line(config.for_profile(name))
    exists = Refused("profile %s exists already: pi --profile %s runs in it, pi-branch "
                     "--delete %s removes it" % (name, name, name))
    if profile_exists(target):
        raise exists
    image_id, what = branch_source(config, source)
    with exclusive(target, "branch", recover=False) as state:
        if inspect_image(target.current) is not None or state.get("made"):
            raise exists
        if image_id is None:
            build_base(target)
            image_id = inspect_image(target.base)["Id"]
        docker("tag", image_id, target.current)
        state["made"] = True
        state.pop("snapshots", None)
    say("made profile %s from %s: pi --profile %s runs in it (PI_AGENT_PROFILE=%s for every "
        "command)" % (name, what, name, name))


def delete_profile(config, name, yes):
    """Remove a profile's current and snapshots, after asking."""
    if not name or name == DEFAULT_PROFILE:
        raise Refused("the default profile is %s:current itself; pi-reset-all empties it"
                      % config.image_repo)
    line = Line(config.for_profile(checked_profile("pi-branch", name, "--delete")))
    if not profile_exists(line) and not list_snapshots(line):
        raise NotFound("there is no profile %s; pi-branch lists them" % name)
    with exclusive(line, "branch", recover=False) as state:
        current = inspect_image(line.current)
        snaps = list_snapshots(line)
        refs = ([line.current] if current else []) + snapshot_refs(line, snaps)
        leftovers = [row["names"] for row in leftover_containers(line)]
        if leftovers:
            raise Refused("profile %s has left-behind containers (%s): pi-recover --profile %s "
                          "saves them, pi-clean-orphans --profile %s discards them"
                          % (name, ", ".join(leftovers), name, name))
        confirm("delete profile %s (%s and %s)? Its environment is lost; project files and "
                "the base image stay." % (name, line.current, plural(len(snaps), "snapshot")),
                yes)
        if refs:
            docker("rmi", *refs)
        remove_own_dangling(line)
        state.clear()
    say("deleted profile %s (%s)" % (name, plural(len(refs), "image")))


def cmd_branch(args):
    config = Config(profile=args.profile)
    if args.json and (args.delete is not None or args.name):
        raise PiError("pi-branch: --json is for the list (pi-branch --json)", EXIT_USAGE)
    if args.delete is not None:
        if args.name or args.source:
            raise PiError("pi-branch: --delete NAME takes nothing else", EXIT_USAGE)
        delete_profile(config, args.delete, args.yes)
        return 0
    if args.name is None:
        if args.source:
            raise PiError("pi-branch: --from needs the NAME of the profile to make", EXIT_USAGE)
        rows = [("", "PROFILE", "CURRENT", "SIZE", "SNAPSHOTS", "LAST USED")]
        found = sorted(list_profiles(config).items())
        if args.json:
            print(json.dumps([{
                "profile": name or DEFAULT_PROFILE, "in_use": name == config.profile,
                "current": entry["current"] and Line(config.for_profile(name)).current,
                "id": entry["current"] and entry["current"]["Id"],
                "size": entry["current"] and entry["current"]["Size"],
                "snapshots": entry["snapshots"],
                "used": utc_iso(entry["used"]) if entry["used"] else None}
                for name, entry in found], indent=1, sort_keys=True))
            return 0
        for name, entry in found:
            line = Line(config.for_profile(name))
            rows.append(("*" if name == config.profile else "", name or DEFAULT_PROFILE,
                         line.current if entry["current"] else "(none yet)",
                         human_size(entry["current"]["Size"]) if entry["current"] else "",
                         str(entry["snapshots"]),
                         local_time(utc_iso(entry["used"])) if entry["used"] else ""))
        print_table(rows)
        print("* is the profile in use here (PI_AGENT_PROFILE, or --profile). pi-branch NAME "
              "makes one, a copy of it.")
        return 0
    if args.name == DEFAULT_PROFILE:
        raise PiError("pi-branch: %s is the profile of the plain names; pick another name"
                      % DEFAULT_PROFILE, EXIT_USAGE)
    make_profile(config, checked_profile("pi-branch", args.name, None), args.source)
    return 0


def worktree_place(config, name):
    """(repository, main work tree, the worktree's path) for pi-worktree
    NAME in the repository of the current directory."""
    try:
        cwd = os.path.realpath(os.getcwd())
        _target, _subdir, repo, _notes = find_target(cwd, home_dirs(), False,
                                                     guarded_dirs(config))
    except (FileNotFoundError, Refused):
        repo = None
    if repo is None:
        raise NotFound("pi-worktree works in a git repository, and the current directory is "
                       "not in one; cd into one (git init and a first commit make one)")
    if os.path.basename(repo.common) != ".git":
        raise Refused("pi-worktree needs the repository's main work tree beside it; %s has "
                      "none (a bare repository?)" % repo.common)
    main = os.path.dirname(repo.common)
    return repo, main, os.path.join(os.path.dirname(main), os.path.basename(main) + "-" + name)


def registered_worktree(repo, path):
    """git has a worktree at `path` on record (its admin directory)."""
    admin = os.path.join(repo.common, "worktrees")
    try:
        names = os.listdir(admin)
    except OSError:
        return False
    for name in names:
        named = read_regular(os.path.join(admin, name, "gitdir"), 4096)
        if named is not None and os.fsdecode(named.strip()) == os.path.join(path, ".git"):
            return True
    return False


def remove_worktree(config, repo, path, name, yes, wait):
    there = git_repo_at(path)[0] if os.path.lexists(path) else None
    if there is None and not os.path.lexists(path) and registered_worktree(repo, path):
        host_git(repo.gitdir, "worktree", "prune")
        say("git had the worktree %s on record, but its directory was gone: git worktree "
            "prune cleared it" % path)
    elif there is None or there.common != repo.common:
        raise NotFound("there is no worktree %s of %s; git worktree list shows them"
                       % (path, os.path.dirname(repo.common)))
    else:
        line = Line(config.for_profile(name))
        fd = lock_project(line, path, "worktree", wait, [repo.common, repo.gitdir])
        try:  # (Busy while a run is there)
            result = host_git(repo.gitdir, "worktree", "remove", path, check=False)
        finally:
            release_project_lock(fd)
        if result.returncode != 0:
            why = (result.stderr.decode(errors="replace").strip().splitlines() or ["?"])[-1]
            raise Refused("git would not remove %s (%s); commit or stash what is there, or "
                          "remove it with git worktree remove --force, which loses it"
                          % (path, why.replace("fatal: ", "")))
        say("removed the worktree %s; its branch agent/%s keeps its commits (git branch -D "
            "agent/%s deletes it)" % (path, name, name))
    line = Line(config.for_profile(name))
    if not profile_exists(line):
        return 0
    if yes or (sys.stdin.isatty() and ask("delete the profile %s too (its environment and "
                                          "snapshots)?" % name)):
        delete_profile(config, name, yes=True)
    else:
        say("kept the profile %s: pi-branch --delete %s removes it" % (name, name))
    return 0


# Set on a branch pi-worktree made, in your repository's config (which no
# agent writes): a branch agent/NAME without it may be an agent's.
WORKTREE_MARK = "piAgentWorktree"


def add_worktree(repo, main, path, name, base):
    """git worktree add: `path` on branch agent/NAME (made at `base`, or
    the branch as it is, if pi-worktree made it)."""
    branch = "agent/" + name
    has_branch = host_git(repo.gitdir, "rev-parse", "--verify", "--quiet",
                          "refs/heads/" + branch, check=False).returncode == 0
    if has_branch and base:
        raise PiError("pi-worktree: branch %s exists already; pi-worktree %s checks it out "
                      "(without BASE)" % (branch, name), EXIT_USAGE)
    mark = "branch.%s.%s" % (branch, WORKTREE_MARK)
    if has_branch and host_git(repo.gitdir, "config", "--get", mark,
                               check=False).stdout.strip() != b"true":
        raise Refused("branch %s exists, and pi-worktree did not make it: an agent may have "
                      "(a run's branches come back to your repository). Read it first (git log "
                      "-p %s); then delete it (git branch -D %s), or take it as yours: git "
                      "config %s true" % (branch, branch, branch, mark))
    base = base or "HEAD"
    if not has_branch and host_git(repo.gitdir, "rev-parse", "--verify", "--quiet",
                                   base + "^{commit}", check=False).returncode != 0:
        raise NotFound("pi-worktree: %s is not a commit of %s (a branch, tag or commit is)"
                       % (base, main))
    if registered_worktree(repo, path):
        raise Refused("%s is on record as a worktree of %s, but its directory is gone; "
                      "pi-worktree --remove %s clears it" % (path, main, name))
    result = host_git(repo.gitdir, "worktree", "add", "--quiet",
                      *([path, branch] if has_branch else ["-b", branch, path, base]),
                      check=False)
    if result.returncode != 0:
        why = (result.stderr.decode(errors="replace").strip().splitlines() or ["?"])[-1]
        raise Refused("git would not make the worktree %s: %s%s" % (
            path, why.replace("fatal: ", ""), "; switch that work tree to another branch first"
            if "checked out" in why or "used by worktree" in why else ""))
    if not has_branch:
        host_git(repo.gitdir, "config", mark, "true")
    say("made the worktree %s on %s branch %s" % (path, "the" if has_branch else "a new",
                                                  branch))


def cmd_worktree(args):
    """pi-worktree NAME [BASE]: a worktree ../REPO-NAME on branch agent/NAME,
    profile NAME (a copy of the selected profile), and pi run there."""
    config = Config(profile=args.profile)
    if args.name == DEFAULT_PROFILE:
        raise PiError("pi-worktree: %s names the default profile; pick another name"
                      % DEFAULT_PROFILE, EXIT_USAGE)
    name = checked_profile("pi-worktree", args.name, None)
    repo, main, path = worktree_place(config, name)
    if args.remove:
        if args.base or args.argv:
            raise PiError("pi-worktree: --remove NAME takes nothing else", EXIT_USAGE)
        return remove_worktree(config, repo, path, name, args.yes, args.wait)
    line = Line(config.for_profile(name))
    made = profile_exists(line)
    if not made:
        branch_source(config, None)  # (a profile to copy that is not there: said first)
    if os.path.lexists(path):
        there = git_repo_at(path)[0]
        if there is None or there.common != repo.common:
            raise Refused("%s is there already and is not a worktree of %s; move it away, or "
                          "pick another NAME" % (path, main))
        if args.base:
            raise PiError("pi-worktree: the worktree %s exists already; BASE is for a new one"
                          % path, EXIT_USAGE)
    else:
        # (what git reads for it must be out of any live run's reach)
        facts = config_facts(start_config_listing(repo), main, repo)
        fd = lock_project(line, path, "worktree", args.wait,
                          [repo.common, repo.gitdir] + facts["read"])
        try:
            add_worktree(repo, main, path, name, args.base)
        finally:
            release_project_lock(fd)
    if not made:
        make_profile(config, name)
    os.chdir(path)
    return lifecycle(Args(agent=args.agent, profile=name, wait=args.wait,
                                        here=False, offline=args.offline, dry_run=False,
                                        egress=args.egress, argv=args.argv), "run", args.argv)


# pi-log's words for a record's ended_by.
SAVED_WORDS = {"run": "as it ended", "interrupted": "interrupted", "recovered": "recovered later",
               "failed commit": "no: failed", "waiting": "no: too big"}


def cmd_log(args):
    line = profile_line(args)
    wait_for_save(line)
    records = newest_sessions(line.sessions_path, args.count)
    wait_for_reports(line, records)
    ensure_reports(line, records)
    for record in records:
        record["paths"] = run_paths(line, record)
    if args.json:
        print(json.dumps(records, indent=1, sort_keys=True))
        return 0
    if not records:
        print("no runs of %s saved yet" % line.name)
        return 0
    rows = [("STARTED", "KIND", "EXIT", "ADDED", "PATHS +/~/-", "COMMITS", "SNAPSHOT",
             "SAVED", "REFUSED", "TARGET")]
    for record in records:
        added, paths = record.get("bytes_added"), record["paths"]
        rows.append((local_time(record.get("started")), printable(str(record.get("kind"))),
                     "?" if record.get("exit_status") is None else str(record["exit_status"]),
                     human_size(added) if isinstance(added, int) and added >= 0 else "-",
                     "%d/%d/%d" % (paths["added"], paths["changed"], paths["deleted"])
                     if paths else "?",
                     str(record["commits_total"]) if isinstance(record.get("commits_total"), int)
                     else "-",
                     printable(str(record.get("snapshot") or "-")),
                     SAVED_WORDS.get(record.get("ended_by")) or printable(str(record.get(
                         "ended_by"))),
                     str((record.get("refused") or {}).get("count", "-")),
                     printable(str(record.get("target")))))
    print_table(rows)
    print_pruned(line)
    return 0


def print_diff(title, runs, facts, shown, missing, everything, nothing_saved=False):
    counts = facts["paths"]
    if nothing_saved:
        print(title)
        return
    print("%s: %s" % (title, ", ".join("%d %s" % (counts[word], word) for word in
                                       ("added", "changed", "deleted") if counts[word])
                      or ("not recorded" if missing else "no change")))
    if len(runs) > 1:
        print("(%d runs)" % len(runs))
    if facts["packages"]:
        print("packages:")
        rows = []
        for package in facts["packages"]:
            rows.append(("  " + package["change"], package["manager"],
                         printable(package["name"]),
                         printable(package.get("version") or ""),
                         human_size(package["size"]) if package.get("size") else ""))
        print_table(rows)
    if everything:
        if shown:
            print("paths:")
        for kind, path, owner, _size in shown:
            print("  %s %s%s" % (kind, printable(path), "  (%s)" % printable(owner) if owner
                                 else "  (noise)" if is_noise(path) else ""))
        return
    if facts["groups"]:
        print("other paths, by directory:")
        rows = [("  DIRECTORY", "ADDED", "CHANGED", "DELETED", "WRITTEN")]
        for group in facts["groups"]:
            rows.append(("  " + printable(group["directory"]), str(group["added"]),
                         str(group["changed"]), str(group["deleted"]),
                         human_size(group["bytes"]) if group["bytes"] else "-"))
        print_table(rows)
    hidden = []
    if facts["package_paths"]:
        hidden.append("%s of the packages above" % plural(facts["package_paths"], "path"))
    if facts["hidden"]:
        hidden.append("%s of caches, logs and temporary files%s" % (
            plural(facts["hidden"], "path"), " (%s written)" % human_size(facts["hidden_bytes"])
            if facts["hidden_bytes"] else ""))
    if hidden:
        print("not shown: %s (pi-diff --all lists every path)" % ", and ".join(hidden))


def cmd_diff(args):
    line = profile_line(args)
    wait_for_save(line)
    if len(args.snapshots) > 2:
        raise PiError("pi-diff: give at most two snapshots (pi-diff A B)", EXIT_USAGE)
    records = newest_sessions(line.sessions_path, DIFF_LOG_DEPTH)
    current = inspect_image(line.current)
    current_id = current["Id"] if current else None
    notes, backwards = [], False
    if not args.snapshots:
        last = records[0] if records else None
        runs = [last] if last and not changed_nothing(last) and \
            last.get("ended_by") != "failed commit" else []
        title = "the last run (%s %s in %s)" % (
            printable(str(last.get("kind"))), local_time(last.get("started")),
            printable(str(last.get("target")))) if last else "no runs of %s saved yet" % line.name
        ends = [(last or {}).get("image_before"), (last or {}).get("image_after")]
        if last and last.get("image_after") != current_id:
            notes.append("current is no longer what that run left (a rollback, a reset or a "
                         "later run since): pi-diff SNAPSHOT compares a snapshot with current")
        if last and last.get("commits_total"):
            notes.append("%s came back to the project's repository (pi-log --json lists them)"
                         % plural(last["commits_total"], "commit"))
    else:
        names = [args.snapshots[0], (args.snapshots[1:] or ["current"])[0]]
        (from_id, from_name), (to_id, to_name) = [diff_endpoint(line, n) for n in names]
        runs = trace_runs(line, records, from_id, to_id)
        if runs is None:
            runs, backwards = trace_runs(line, records, to_id, from_id), True
        if runs is None:
            raise NotFound("the session log does not lead from %s to %s (runs saved before "
                           "pi-agent kept a log, or a reset between them); pi-log lists the "
                           "runs it knows" % tuple(names))
        title = "from %s to %s%s" % (from_name, to_name, " (going back: what that undoes)"
                                     if backwards else "")
        ends = [from_id, to_id]
    wait_for_reports(line, runs)
    ensure_reports(line, runs)
    rows, packages, missing, truncated, failed = [], [], 0, 0, []
    for record in runs:
        report, changes = read_report(line, record.get("container")), None
        if report is not None and report.get("failed"):
            failed.append(str(report["failed"]))
        elif report is not None:
            changes = read_changes(line, record["container"])
        if changes is None:
            missing += 1
            continue
        truncated += bool(report.get("truncated"))
        rows.append(changes)
        packages.append(report.get("packages") or [])
    changes, packages = compose_changes(rows), compose_packages(packages)
    if backwards:
        changes, packages = invert_changes(changes, packages)
    leaves = leaf_rows(changes)
    facts = summarize(leaves, packages, everything=args.all)
    shown = [row for row in leaves if args.all or row[2] or not is_noise(row[1])]
    if args.json:
        names = image_names(line, ends, current_id)
        print(json.dumps({
            "from": {"image": ends[0], "name": names[0]},
            "to": {"image": ends[1], "name": names[1]},
            "runs": [{"container": r.get("container"), "started": r.get("started"),
                      "kind": r.get("kind")} for r in runs],
            "backwards": backwards, "unrecorded": missing, "failed": failed,
            "truncated": truncated,
            "paths": facts["paths"], "packages": packages, "groups": facts["groups"],
            "hidden": facts["hidden"],
            "changes": [{"change": CHANGE_WORDS[kind], "path": path, "package": owner,
                         "size": size, "noise": is_noise(path)}
                        for kind, path, owner, size in shown]}, indent=1, sort_keys=True))
        return 0
    if truncated:
        say("%s changed %d paths or more: only the first %d of each were recorded (and "
            "counted)" % (plural(truncated, "run"), MAX_RECORDED_PATHS, MAX_RECORDED_PATHS),
            "warning")
    if failed:
        say("%s changed the environment, but what could not be recorded (%s): not shown"
            % (plural(len(failed), "run"), printable(failed[-1])), "warning")
    if missing - len(failed):
        say("%s changed the environment without a record of what (PI_AGENT_RECORD_CHANGES=0, "
            "or an earlier pi-agent): not shown" % plural(missing - len(failed), "run"),
            "warning")
    print_diff(title, runs, facts, shown, missing, args.all, nothing_saved=not records)
    for note in notes:
        print("(%s)" % note)
    return 0


def cmd_complete(args):
    """For shell completion: one candidate per line, nothing on any error."""
    line = Line(Config(profile=args.profile))
    try:
        if args.what == "snapshots":
            names = [name for snap in list_snapshots(line)
                     for name in [snap["tag"]] + snap["pins"]]
        elif args.what == "pins":
            names = [name for snap in list_snapshots(line) for name in snap["pins"]]
        elif args.what == "profiles":
            names = [name or DEFAULT_PROFILE for name in sorted(list_profiles(line.config))]
        else:
            names = [row["names"] for row in leftover_containers(line)]
    except PiError:
        return 1
    print("\n".join(names))
    return 0


def cmd_unlock(args):
    line = profile_line(args)
    if not lock_is_held(line):
        say("nothing holds the lock of %s: a lock dies with its holder, so there is nothing to "
            "unlock" % line.name)
        return 0
    holder = line.read_state().get("holder")
    raise Busy("%s is held by %s; it is released when that process ends (if it is stuck: kill "
               "it, and the next pi recovers its work)" % (line.name, describe_holder(holder)))


# -------------------------------------------------------------------- parsing
#
# The command line: wrapper options before the agent's, one parser, main.

LIFECYCLE_FLAGS = {"--wait", "--here", "--dry-run", "--offline", "-h", "--help", "--version"}
# ... and those that take a value (--agent: pi only).
VALUE_FLAGS = ("--agent", "--profile", "--egress")

EXAMPLES = """examples:
  pi                              run the agent in this project
  pi -- --help                    the agent's own help
  pi-exec make test               any command in the agent's environment
  pi-diff; pi-rollback            see what the last run did to the environment, undo it
  pi-worktree fix-tests           a second agent beside the first: its own worktree
                                  and environment
  PI_AGENT_PASS_ENV=ANTHROPIC_API_KEY pi   give the agent one credential
"""


def split_wrapper_args(argv):
    """Wrapper options come first; the first other word (or --) starts the
    agent's (or the command's) arguments. Returns (options, the rest,
    {--agent/--profile: its value}), a value given as --flag VALUE or
    --flag=VALUE."""
    values, index = {}, 0
    while index < len(argv):
        word = argv[index]
        if word == "--":
            return argv[:index], argv[index + 1:], values
        flag = word.split("=", 1)[0]
        if flag in VALUE_FLAGS:
            if "=" in word:
                values[flag], index = word.split("=", 1)[1], index + 1
                continue
            if index + 1 == len(argv):
                raise PiError("%s needs a value: %s" % (flag, {
                    "--agent": ", ".join(AGENTS), "--egress": ", ".join(EGRESS_POLICIES)}.get(
                        flag, "a profile name")), EXIT_USAGE)
            values[flag], index = argv[index + 1], index + 2
            continue
        if word not in LIFECYCLE_FLAGS:
            return argv[:index], argv[index:], values
        index += 1
    return argv, [], values


# Dashes a keyboard, a word processor or a web page may put for "-".
DASHES = "-\u2010\u2011\u2012\u2013\u2014\u2015\u2212\ufe58\ufe63\uff0d"


def near_miss(word):
    """The wrapper option a word looks like a slip of (--ofline, -offline,
    --Wait, --dryrun, \u2014offline, --dry, --offline-mode), or None."""
    import difflib
    stem = word.split("=", 1)[0].lstrip(DASHES).lower()
    if word == "--" or not word.startswith(tuple(DASHES)) or not stem:
        return None
    name = "--" + stem
    options = sorted(flag for flag in LIFECYCLE_FLAGS | set(VALUE_FLAGS) if flag.startswith("--"))
    for option in options:
        if len(stem) >= 3 and (option.startswith(name) or name.startswith(option + "-")):
            return option
    close = difflib.get_close_matches(name, options, 1, 0.8)
    return close[0] if close else None


def build_parser():
    """The parser of every command but the lifecycle's (see parse_args:
    argparse, and building this, would cost each run more than the rest of
    its start)."""
    import argparse

    class Parser(argparse.ArgumentParser):
        """Usage errors are one line, like every other error, and exit 2."""

        def error(self, message):
            prefix = "" if self.prog == "pi-agent" else self.prog + ": "
            raise PiError("%s%s; see %s --help" % (prefix, message, self.prog), EXIT_USAGE)

    parser = Parser(
        prog="pi-agent", usage="pi [--agent NAME] [--profile NAME] [--wait] [--here] [--offline] "
        "[--egress POLICY] [--dry-run] "
        "[--] [AGENT ARGS]\n"
        "       pi-COMMAND [OPTIONS] [ARGS]   (pi_agent.py COMMAND ...)",
        description=__doc__.split("\nEvery run:")[0].split("\n\n", 1)[1],
        epilog=EXAMPLES + "\n" + __doc__[__doc__.index("Exit codes:"):],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version="pi-agent " + __version__)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", help=argparse.SUPPRESS,
                                parser_class=Parser)
    sub.required = True

    def lifecycle_parser(name, func, help_text, usage_tail):
        command = sub.add_parser(name, help=help_text, description=help_text,
                                 prog="pi" if name == "run" else "pi-" + name,
                                 usage="%%(prog)s [--profile NAME] [--wait] [--here] [--offline] "
                                 "[--egress POLICY] [--dry-run] %s"
                                 % usage_tail)
        command.add_argument("--wait", action="store_true",
                             help="wait for a running agent on this image line instead of failing")
        command.add_argument("--here", action="store_true",
                             help="mount the current directory, not the repository root")
        command.add_argument("--offline", action="store_true",
                             help="no network for this run (like PI_AGENT_NETWORK=none)")
        egress_option(command)
        command.add_argument("--dry-run", action="store_true",
                             help="print the docker commands a run would use; change nothing")
        if name == "run":
            command.add_argument("--agent", metavar="NAME", choices=list(AGENTS),
                                 help="this agent for this run: %s" % ", ".join(AGENTS))
        profile_option(command)
        command.set_defaults(func=func)

    def egress_option(command):
        command.add_argument("--egress", metavar="POLICY", choices=EGRESS_POLICIES,
                             help="what this run reaches, instead of PI_AGENT_EGRESS's: %s"
                             % ", ".join(EGRESS_POLICIES))

    def profile_option(command):
        command.add_argument("--profile", metavar="NAME",
                             help="the profile (environment) to use instead of PI_AGENT_PROFILE's "
                             "(default: the plain names)")

    lifecycle_parser("run", cmd_run, "run the agent in the current project", "[--] [AGENT ARGS]")
    lifecycle_parser("exec", cmd_exec, "run a command in the agent's environment",
                     "[--] CMD [ARGS]")
    lifecycle_parser("shell", cmd_shell, "an interactive shell in the agent's environment", "")

    def simple(name, func, help_text):
        command = sub.add_parser(name, help=help_text, description=help_text, prog="pi-" + name)
        profile_option(command)
        command.set_defaults(func=func)
        return command

    status = simple("status", cmd_status, "settings, images, lock holder, mount target"
                    ).add_mutually_exclusive_group()
    status.add_argument("--json", action="store_true",
                        help="as JSON (docs/commands.md gives its shape)")
    status.add_argument("--check", action="store_true", help="check in seconds what the first "
                        "run needs: engine, image, apt and npm with your CA certificates, disk "
                        "(exit 10 if something fails)")
    snapshots = simple("snapshots", cmd_snapshots, "list snapshots, newest first; pin one")
    snapshots.usage = "pi-snapshots [--json] [--profile NAME]\n" \
        "       pi-snapshots --pin NAME [SNAPSHOT]\n       pi-snapshots --unpin NAME"
    snapshots.add_argument("--json", action="store_true",
                           help="as JSON (docs/commands.md gives its shape)")
    snapshots.add_argument("--pin", metavar="NAME", help="keep SNAPSHOT (default: current's "
                           "state, kept as a snapshot now) under NAME: never pruned; "
                           "pi-rollback NAME")
    snapshots.add_argument("--unpin", metavar="NAME", help="take the pin NAME away")
    snapshots.add_argument("snapshot", nargs="?", metavar="SNAPSHOT", help="with --pin")
    simple("rollback", cmd_rollback, "make a snapshot current (default: the newest); the "
           "replaced current is kept as a snapshot").add_argument("snapshot", nargs="?")
    simple("reset-system", cmd_reset_system, "make the base image current (undoable), the "
           "agents' own files (~/.pi, ...) carried over").add_argument(
        "--drop-config", action="store_true", help="leave the agents' own files behind too")
    reset_all = simple("reset-all", cmd_reset_all, "remove current and every snapshot")
    reset_all.add_argument("--yes", "-y", action="store_true", help="do not ask")
    reset_all.add_argument("--base", action="store_true", help="everything of yours: every "
                           "profile, the base, left-behind containers, the state (asks)")
    simple("rebuild-base", cmd_rebuild_base, "build the base image again").add_argument(
        "--no-cache", action="store_true", help="rebuild every step")
    prune = simple("prune", cmd_prune, "remove what retention lets go (the newest "
                   "PI_AGENT_SNAPSHOT_KEEP, noise apart, one a day for a week and one a week "
                   "for a month stay; docs/commands.md); with N, all but the N newest; never "
                   "a pinned one")
    prune.add_argument("keep", nargs="?", type=int, metavar="N",
                       help="keep only the N newest (and the pinned)")
    prune.add_argument("--dry-run", action="store_true", help="only say what would go")
    simple("flatten", cmd_flatten, "rewrite current as a single layer (same files, same "
           "config); the layered image is kept as a snapshot")
    simple("orphans", cmd_orphans, "list containers that interrupted runs left behind"
           ).add_argument("--json", action="store_true",
                          help="as JSON (docs/commands.md gives its shape)")
    recover = simple("recover", cmd_recover, "save left-behind containers into current now")
    recover.usage = "pi-recover [--profile NAME] [--drop PATH ...] [CONTAINER]"
    recover.add_argument("container", nargs="?")
    recover.add_argument("--drop", nargs="+", metavar="PATH", default=[],
                         help="save it without what the run did to these paths (absolute, as "
                         "inside): a new file goes, a changed one keeps its old version")
    simple("clean-orphans", cmd_clean_orphans, "discard left-behind containers").add_argument(
        "--yes", "-y", action="store_true", help="do not ask")
    simple("unlock", cmd_unlock, "show who holds the lock (a dead holder never does)")
    log = simple("log", cmd_log, "the saved runs, newest first")
    log.add_argument("-n", dest="count", type=int, default=20, metavar="N",
                     help="this many (default 20)")
    log.add_argument("--json", action="store_true",
                     help="as JSON (docs/commands.md gives its shape)")
    diff = simple("diff", cmd_diff, "what runs changed in the environment: the last run; "
                  "since SNAPSHOT (to current); from snapshot A to B")
    diff.usage = "pi-diff [--all] [--json] [--profile NAME] [SNAPSHOT | A B]"
    diff.add_argument("snapshots", nargs="*", metavar="SNAPSHOT",
                      help="a snapshot name (snap-...), current or base")
    diff.add_argument("--all", action="store_true",
                      help="every path, caches, logs and temporary files too")
    diff.add_argument("--json", action="store_true",
                      help="as JSON (docs/commands.md gives its shape)")
    branch = simple("branch", cmd_branch, "list the profiles, make one (a copy of current, "
                    "a tag), or delete one")
    branch.add_argument("name", nargs="?", help="the profile to make")
    branch.add_argument("--from", dest="source", metavar="FROM",
                        help="a snapshot of the selected profile, another profile, or base "
                        "(default: the selected profile's current)")
    branch.add_argument("--delete", metavar="NAME", help="delete this profile (asks first)")
    branch.add_argument("--yes", "-y", action="store_true", help="do not ask")
    branch.add_argument("--json", action="store_true",
                        help="the list as JSON (docs/commands.md gives its shape)")
    worktree = simple("worktree", cmd_worktree, "run pi in a worktree of its own, ../REPO-NAME "
                      "on branch agent/NAME, with profile NAME (made from the selected one)")
    worktree.usage = "pi-worktree [OPTIONS] NAME [BASE] [-- AGENT ARGS]\n" \
        "       pi-worktree --remove [--yes] NAME"
    worktree.add_argument("name", metavar="NAME")
    worktree.add_argument("base", nargs="?", metavar="BASE",
                          help="the commit a new branch starts at (default: HEAD)")
    worktree.add_argument("--remove", action="store_true",
                          help="remove the worktree (not if it has uncommitted changes), then "
                          "offer to delete the profile")
    worktree.add_argument("--yes", "-y", action="store_true",
                          help="with --remove: delete the profile too, without asking")
    worktree.add_argument("--agent", metavar="NAME", choices=list(AGENTS),
                          help="this agent for this run: %s" % ", ".join(AGENTS))
    worktree.add_argument("--wait", action="store_true",
                          help="wait for a running agent instead of failing")
    worktree.add_argument("--offline", action="store_true", help="no network for this run")
    egress_option(worktree)
    complete = sub.add_parser("complete", prog="pi-agent complete")
    complete.add_argument("what", choices=("snapshots", "pins", "orphans", "profiles"))
    profile_option(complete)
    complete.set_defaults(func=cmd_complete)
    return parser


def parse_args(argv):
    if argv and argv[0] in LIFECYCLE_KINDS:
        wrapper, rest, values = split_wrapper_args(argv[1:])
        agent = values.get("--agent")
        if agent is not None and argv[0] != "run":
            raise PiError("pi-%s: --agent is for pi (a command here is yours to name)" % argv[0],
                          EXIT_USAGE)
        if agent is not None and agent not in AGENTS:
            raise PiError("pi: --agent %s: use one of %s" % (agent, ", ".join(AGENTS)),
                          EXIT_USAGE)
        egress = values.get("--egress")
        if egress is not None and egress not in EGRESS_POLICIES:
            raise PiError("--egress %s: use one of %s" % (egress, ", ".join(EGRESS_POLICIES)),
                          EXIT_USAGE)
        if egress not in (None, "none") and "--offline" in wrapper:
            raise PiError("--offline is --egress none: give one of them", EXIT_USAGE)
        if "--version" in wrapper:
            print("pi-agent " + __version__)
            raise SystemExit(0)
        if argv[0] == "run" and ("--help" in wrapper or "-h" in wrapper):
            build_parser().print_help()
            raise SystemExit(0)
        prog = "pi" if argv[0] == "run" else "pi-" + argv[0]
        unsure = rest and rest[0].startswith(tuple(DASHES)) and argv[1 + len(wrapper)] != "--"
        meant = near_miss(rest[0]) if unsure else None
        if meant:
            # A safety option mistyped must not reach the agent (online).
            raise PiError("%s: unknown option %s; did you mean %s?%s" % (
                prog, rest[0], meant, {"run": " (an option for the agent goes after --)",
                                       "exec": " (an option for the command goes after --)"}
                .get(argv[0], "")), EXIT_USAGE)
        if argv[0] == "shell" and unsure:
            raise PiError("pi-shell: unknown option %s; see pi-shell --help" % rest[0],
                          EXIT_USAGE)
        if argv[0] == "exec" and unsure:
            raise PiError("pi-exec: unknown option %s; options come before the command, and "
                          "-- before a command that starts with -" % rest[0], EXIT_USAGE)
        if "--help" in wrapper or "-h" in wrapper:
            build_parser().parse_args([argv[0], "--help"])
        # Only known flags are left: no parser needed (building one costs
        # more than the rest of a run's start).
        return Args(
            command=argv[0], func={"run": cmd_run, "exec": cmd_exec, "shell": cmd_shell}[argv[0]],
            wait="--wait" in wrapper, here="--here" in wrapper, offline="--offline" in wrapper,
            dry_run="--dry-run" in wrapper, agent=agent, egress=egress,
            profile=checked_profile(prog, values.get("--profile")), argv=rest)
    tail = []
    if argv and argv[0] == "worktree" and "--" in argv:
        tail, argv = argv[argv.index("--") + 1:], argv[:argv.index("--")]
    args, extra = build_parser().parse_known_args(argv)
    args.argv = tail
    prog = "pi-" + args.command
    if extra:
        raise PiError("%s: unexpected %s; see %s --help" % (prog, " ".join(extra), prog),
                      EXIT_USAGE)
    args.profile = checked_profile(prog, getattr(args, "profile", None))
    if getattr(args, "count", None) is not None and args.count < 1:
        raise PiError("%s: -n N must be 1 or more" % prog, EXIT_USAGE)
    if getattr(args, "keep", None) is not None and args.keep < 0:
        raise PiError("%s: N must be 0 or more" % prog, EXIT_USAGE)
    if args.command == "snapshots" and (args.pin and args.unpin or args.json and (
            args.pin or args.unpin) or args.snapshot and not args.pin):
        raise PiError("pi-snapshots: --pin NAME [SNAPSHOT], --unpin NAME or [--json]; see "
                      "pi-snapshots --help", EXIT_USAGE)
    for option in ("pin", "unpin"):
        name = getattr(args, option, None)
        if name is not None and (not PROFILE_RE.fullmatch(name) or PIN_CLASH_RE.search(name)):
            raise PiError("%s: --%s %s: a pin's name is 1 to 40 of a-z, 0-9, '.', '_' and '-', "
                          "starting with a letter or digit; not base or current, and with no "
                          "snap-, pin- or -current that would read as another profile's image"
                          % (prog, option, shlex.quote(name)), EXIT_USAGE)
    return args


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = parse_args(argv)
        return args.func(args)
    except PiError as err:
        say(str(err), "error")
        return err.code
    except KeyboardInterrupt:
        say("interrupted")
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
