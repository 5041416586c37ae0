# The agent's workstation: the base image of every pi-agent environment.
# pi-agent builds it on first use with the build args below; what the agent
# installs later lives in the committed images on top of it.
ARG BASE_IMAGE=ubuntu:24.04
FROM ${BASE_IMAGE}
# A base may end as some other user; the steps below need root.
USER root

ARG DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      bash build-essential ca-certificates curl file git jq less nodejs npm \
      procps python3 python3-pip python3-venv ripgrep fd-find sudo tree \
      unzip vim-tiny xz-utils zip \
 && ln -sf "$(command -v fdfind)" /usr/local/bin/fd \
 && rm -rf /var/lib/apt/lists/*

# Extra CA certificates (PI_AGENT_CA_CERTS: a TLS-inspecting proxy's, a
# private registry's), as PEM text: public, so a build arg may carry them.
# Node, Python, pip and npm read the one system bundle they end up in.
ARG EXTRA_CA_CERTS=""
RUN if [ -n "$EXTRA_CA_CERTS" ]; then \
      printf '%s\n' "$EXTRA_CA_CERTS" | awk -v dir=/usr/local/share/ca-certificates \
        '/-----BEGIN CERTIFICATE-----/ { n++; file = sprintf("%s/pi-agent-%02d.crt", dir, n) } \
         n { print > file }' \
   && update-ca-certificates >/dev/null 2>&1; \
    fi
ENV NODE_EXTRA_CA_CERTS=/etc/ssl/certs/ca-certificates.crt \
    REQUESTS_CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt \
    SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt \
    PIP_CERT=/etc/ssl/certs/ca-certificates.crt

# Node.js >= 20.6: Pi (and other agents) need it, and many distributions
# ship older (Ubuntu 24.04 and Debian 12: 18). NODE_FROM picks the route:
#   npm     (default) Node $NODE_MAJOR from the npm registry's `node` package,
#           into /usr/local: needs only what npm itself reaches;
#   distro  the distribution's own nodejs, if it is new enough (Debian 13).
ARG NODE_FROM=npm
ARG NODE_MAJOR=22
RUN set -eu; \
    if [ "$NODE_FROM" = npm ]; then \
      npm install --global --prefix /usr/local --no-fund --no-audit --loglevel=error \
        "node@$NODE_MAJOR"; \
    elif [ "$NODE_FROM" != distro ]; then \
      echo "NODE_FROM=$NODE_FROM: use npm or distro" >&2; exit 1; \
    fi; \
    node -e 'const [a, b] = process.versions.node.split(".").map(Number); \
      if (a < 20 || (a === 20 && b < 6)) { \
        console.error("Node.js " + process.version + " is too old for Pi (20.6 or newer); " + \
                      "build with NODE_FROM=npm"); process.exit(1); }'; \
    rm -rf /root/.npm

# The agent user gets the host user's UID and GID, so files it writes in the
# project belong to the host user, and the host user's home path, so that ~
# means the same path inside and out (the agent's home holds only its own
# files). An image may already have a user with that UID (Ubuntu 24.04's
# "ubuntu" is 1000): it gives way. A root host user (UID 0) gets an agent that
# is root too, or it could not write the root-owned project.
ARG AGENT_UID=1000
ARG AGENT_GID=1000
ARG AGENT_HOME=/home/agent
RUN set -eu; \
    if id agent >/dev/null 2>&1; then userdel --force --remove agent 2>/dev/null || userdel --force agent; fi; \
    if [ "$AGENT_UID" = 0 ]; then \
      useradd --non-unique --uid 0 --gid 0 --no-create-home --home-dir "$AGENT_HOME" \
              --shell /bin/bash agent; \
    else \
      other=$(getent passwd "$AGENT_UID" | cut -d: -f1); \
      if [ -n "$other" ]; then userdel --force --remove "$other" 2>/dev/null || userdel --force "$other"; fi; \
      group=$(getent group "$AGENT_GID" | cut -d: -f1); \
      if [ -z "$group" ]; then groupadd --gid "$AGENT_GID" agent; group=agent; fi; \
      useradd --uid "$AGENT_UID" --gid "$group" --no-create-home --home-dir "$AGENT_HOME" \
              --shell /bin/bash agent; \
    fi; \
    mkdir -p "$AGENT_HOME/.local/bin" "$AGENT_HOME/.npm-global"; \
    chown -R "$AGENT_UID:$AGENT_GID" "$AGENT_HOME"; \
    echo 'agent ALL=(ALL) NOPASSWD:ALL' > /etc/sudoers.d/agent; \
    chmod 0440 /etc/sudoers.d/agent

# TINI_KILL_PROCESS_GROUP: docker run --init's tini passes a signal to the
# run's whole process group. A run's script then stays the agent's parent,
# so that a session that joined the run (pi-shell while pi runs) lasts until
# it leaves, and the agent still gets each signal itself.
ENV TINI_KILL_PROCESS_GROUP=1 \
    HOME=${AGENT_HOME} \
    NPM_CONFIG_PREFIX=${AGENT_HOME}/.npm-global \
    PATH=${AGENT_HOME}/.local/bin:${AGENT_HOME}/.npm-global/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:/usr/games:/usr/local/games
USER agent
WORKDIR ${AGENT_HOME}

# Unsigned local commits work; there is no key inside to sign or push with.
# This is the container's own global config, never the project's .git/config.
# No identity here: each run gives git PI_AGENT_GIT_IDENTITY as its fallback.
RUN git config --global commit.gpgsign false \
 && git config --global tag.gpgsign false \
 && git config --global safe.directory '*' \
 && git config --global init.defaultBranch main

CMD ["bash"]
