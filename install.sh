#!/bin/sh
# pi-agent installer. POSIX sh; safe under `curl -fsSL URL | sh`: nothing
# runs until the last line, so a cut-off download does nothing.
#
#   ./install.sh [-y] [--no-modify-rc] [--from DIR|TARBALL] [--uninstall]
#
#   -y               no questions (add the source line to every shell's rc)
#   --no-modify-rc   leave ~/.bashrc and ~/.zshrc alone
#   --from SRC       install from a checkout or a release tarball (offline)
#   --uninstall      remove the installed files and the source lines
#
# Settings: PI_AGENT_HOME (install dir, default
# ${XDG_DATA_HOME:-~/.local/share}/pi-agent), PI_AGENT_RELEASE_URL (the
# tarball fetched when neither a checkout nor --from is at hand).

say() {
  printf 'pi-agent install: %s\n' "$1"
}

err() {
  printf 'pi-agent install: %s\n' "$1" >&2
  exit 1
}

# Ask a yes/no question on the terminal (not stdin: that may be the script).
ask() {
  [ "$assume_yes" = 1 ] && return 0
  # In a subshell: a failed redirection of a special builtin would end this shell.
  if ! (: </dev/tty) 2>/dev/null; then
    return 1
  fi
  printf 'pi-agent install: %s [Y/n] ' "$1" >/dev/tty
  read -r answer </dev/tty || answer=n
  case $answer in
    ''|y|Y|yes|YES) return 0 ;;
    *) return 1 ;;
  esac
}

check_python() {
  command -v python3 >/dev/null 2>&1 ||
    err "python3 is not installed; pi-agent needs Python 3.9 or newer (apt install python3, brew install python)"
  python3 -c 'import sys; sys.exit(sys.version_info < (3, 9))' ||
    err "pi-agent needs Python 3.9 or newer; python3 is $(python3 -c 'import platform; print(platform.python_version())')"
}

check_docker() {
  if ! command -v docker >/dev/null 2>&1; then
    say "note: no docker command yet; install Docker Engine or Docker Desktop before the first pi"
  fi
}

# Unpack or locate the files to install; prints the directory that holds them.
fetch_source() {
  if [ -n "$from" ]; then
    if [ -d "$from" ]; then
      printf '%s\n' "$from"
      return
    fi
    [ -f "$from" ] || err "--from $from: no such file or directory"
    mkdir -p "$work/src"
    tar -xzf "$from" -C "$work/src" || err "--from $from: not a .tar.gz release"
  else
    mkdir -p "$work/src"
    url=${PI_AGENT_RELEASE_URL:-https://github.com/pi-agent/pi-agent/archive/refs/heads/main.tar.gz}
    say "downloading $url" >&2  # stdout is the directory this function returns
    if command -v curl >/dev/null 2>&1; then
      curl -fsSL "$url" -o "$work/release.tar.gz" || err "could not download $url; install offline with --from"
    elif command -v wget >/dev/null 2>&1; then
      wget -q -O "$work/release.tar.gz" "$url" || err "could not download $url; install offline with --from"
    else
      err "neither curl nor wget is installed; install offline with --from DIR|TARBALL"
    fi
    tar -xzf "$work/release.tar.gz" -C "$work/src" || err "$url is not a .tar.gz release"
  fi
  found=$(find "$work/src" -name pi_agent.py -type f | head -n 1)
  [ -n "$found" ] || err "no pi_agent.py in ${from:-the download}"
  dirname "$found"
}

install_files() {
  src=$1
  for file in pi_agent.py Dockerfile shell/pi.sh; do
    [ -f "$src/$file" ] || err "$src/$file is missing; is this a pi-agent release?"
  done
  # Build the new copy beside the old one, then swap: an upgrade is never half done.
  staging="$dest.new.$$"
  rm -rf "$staging"
  mkdir -p "$staging/shell" || err "cannot create $staging"
  if ! cp "$src/pi_agent.py" "$src/Dockerfile" "$staging/" ||
     ! cp "$src/shell/"*.sh "$staging/shell/"; then
    err "could not copy the files to $staging"
  fi
  [ -f "$src/.dockerignore" ] && cp "$src/.dockerignore" "$staging/"
  [ -f "$src/README.md" ] && cp "$src/README.md" "$staging/"
  rm -rf "$dest.old.$$"
  if [ -d "$dest" ]; then
    mv "$dest" "$dest.old.$$" || err "cannot replace $dest"
  fi
  mv "$staging" "$dest" || err "cannot move $staging to $dest"
  rm -rf "$dest.old.$$"
}

rc_line() {
  printf '[ -f "%s/shell/pi.sh" ] && . "%s/shell/pi.sh"  # pi-agent\n' "$dest" "$dest"
}

add_to_rc() {
  rc=$1
  if [ -f "$rc" ] && grep -qF "$dest/shell/pi.sh" "$rc"; then
    return
  fi
  if ask "add pi-agent to $rc?"; then
    rc_line >>"$rc" || err "cannot write $rc"
    say "added pi-agent to $rc"
  else
    say "left $rc alone; to use pi-agent, add: $(rc_line)"
  fi
}

# Only the exact line this install added: a user's own lines that mention
# pi-agent, and another install's line, stay.
remove_from_rc() {
  rc=$1
  line=$(rc_line)
  [ -f "$rc" ] && grep -qxF "$line" "$rc" || return 0
  grep -vxF "$line" "$rc" >"$work/rc" || :
  if [ -s "$work/rc" ]; then
    # cat, not mv: keeps the file's owner, mode and any symlink to it.
    cat "$work/rc" >"$rc" || err "cannot write $rc"
  else
    rm -f "$rc"  # only our line was in it: the installer made it
  fi
  say "removed the pi-agent line from $rc"
}

main() {
  assume_yes=0
  modify_rc=1
  uninstall=0
  from=""
  while [ $# -gt 0 ]; do
    case $1 in
      -y|--yes) assume_yes=1 ;;
      --no-modify-rc) modify_rc=0 ;;
      --uninstall) uninstall=1 ;;
      --from) [ $# -ge 2 ] || err "--from needs a directory or tarball"; from=$2; shift ;;
      --from=*) from=${1#--from=} ;;
      -h|--help) sed -n '2,16s/^# \{0,1\}//p' "$0" 2>/dev/null || say "see README.md"; return 0 ;;
      *) err "unknown option $1 (see --help)" ;;
    esac
    shift
  done
  [ -n "${HOME:-}" ] || err "HOME is not set"
  dest=${PI_AGENT_HOME:-${XDG_DATA_HOME:-$HOME/.local/share}/pi-agent}
  work=$(mktemp -d 2>/dev/null || mktemp -d -t pi-agent) || err "cannot create a temporary directory"
  trap 'rm -rf "$work"' EXIT

  if [ "$uninstall" = 1 ]; then
    for rc in "$HOME/.bashrc" "$HOME/.zshrc"; do
      remove_from_rc "$rc"
    done
    if [ -d "$dest" ]; then
      rm -rf "$dest"
      parent=$(dirname "$dest")
      while [ "$parent" != "$HOME" ] && [ "$parent" != / ] && rmdir "$parent" 2>/dev/null; do
        parent=$(dirname "$parent")
      done
      say "removed $dest"
    else
      say "nothing installed at $dest"
    fi
    repo=${PI_AGENT_IMAGE_REPO:-pi-agent}
    state=${PI_AGENT_STATE_DIR:-${XDG_STATE_HOME:-$HOME/.local/state}/pi-agent}
    say "your environments are kept; to remove them too:"
    say "  docker images $repo --format '{{.Repository}}:{{.Tag}}' | xargs docker rmi; rm -r '$state'"
    return 0
  fi

  check_python
  check_docker
  if [ -z "$from" ]; then
    case $0 in
      */install.sh) [ -f "$(dirname "$0")/pi_agent.py" ] && from=$(cd "$(dirname "$0")" && pwd) ;;
    esac
  fi
  # (fetch_source runs in a subshell: its err ends only that)
  src=$(fetch_source) || return 1
  install_files "$src"
  say "installed pi-agent $(python3 "$dest/pi_agent.py" run --version | cut -d' ' -f2) in $dest"

  if [ "$modify_rc" = 1 ]; then
    command -v bash >/dev/null 2>&1 || [ -f "$HOME/.bashrc" ] && add_to_rc "$HOME/.bashrc"
    command -v zsh >/dev/null 2>&1 || [ -f "$HOME/.zshrc" ] && add_to_rc "$HOME/.zshrc"
  fi
  say "open a new shell (or: . \"$dest/shell/pi.sh\"), cd into a project, and type pi"
}

main "$@" || exit 1
