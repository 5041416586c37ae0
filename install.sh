#!/bin/sh
# pi-agent installer. POSIX sh; safe under `curl -fsSL URL | sh`: nothing
# runs until the last line, so a cut-off download does nothing.
#
#   ./install.sh [-y] [--no-modify-rc] [--no-bin] [--from DIR|TARBALL] [--uninstall [--purge]]
#
#   -y               no questions (add the source line to every shell's rc)
#   --no-modify-rc   leave ~/.bashrc and ~/.zshrc alone
#   --no-bin         no pi-agent command (for scripts and CI) in the bin dir
#   --from SRC       install from a checkout or a release tarball (offline)
#   --uninstall      remove the installed files, the command, the source lines
#   --purge          with --uninstall: your images (base too), containers, state
#                    and settings as well (only yours: pi-reset-all --base)
#
# Settings: PI_AGENT_VERSION (the release to download, default the one this
# installer was made with; main for the newest, unreleased code),
# PI_AGENT_HOME (install dir, default ${XDG_DATA_HOME:-~/.local/share}/pi-agent),
# PI_AGENT_BIN_DIR (where the pi-agent command goes, default ~/.local/bin),
# PI_AGENT_RELEASE_URL (a tarball to fetch instead), PI_AGENT_PYTHON (the
# interpreter the shell functions run, default python3).
set -eu

# The release this installer installs unless PI_AGENT_VERSION says another.
RELEASE=0.2.0

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

# The interpreter the shell functions and the pi-agent command will run.
check_python() {
  command -v "$python" >/dev/null 2>&1 ||
    err "$python is not installed; pi-agent needs Python 3.9 or newer (apt install python3, brew install python; or set PI_AGENT_PYTHON)"
  "$python" -c 'import sys; sys.exit(sys.version_info < (3, 9))' ||
    err "pi-agent needs Python 3.9 or newer; $python is $("$python" -c 'import platform; print(platform.python_version())')"
}

# The version of the pi_agent.py in directory $1, or nothing.
version_in() {
  [ -f "$1/pi_agent.py" ] || return 0
  sed -n 's/^__version__ = "\([^"]*\)"$/\1/p' "$1/pi_agent.py" | head -n 1
}

check_docker() {
  if ! command -v docker >/dev/null 2>&1 && ! command -v podman >/dev/null 2>&1; then
    say "note: no docker (or podman) command yet; install Docker Engine, Docker Desktop or Podman before the first pi"
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
    version=${PI_AGENT_VERSION:-$RELEASE}
    case $version in
      main) ref=heads/main ;;
      [0-9]*.[0-9]*.[0-9]*) ref=tags/v$version ;;
      *) err "PI_AGENT_VERSION=$version: use a release such as $RELEASE, or main" ;;
    esac
    url=${PI_AGENT_RELEASE_URL:-https://github.com/pi-agent/pi-agent/archive/refs/$ref.tar.gz}
    say "downloading $url" >&2  # stdout is the directory this function returns
    # HTTPS only, redirects included, unless PI_AGENT_RELEASE_URL names another scheme.
    case $url in
      https://*) curl_tls="--proto =https --tlsv1.2" wget_tls=--https-only ;;
      *) curl_tls="" wget_tls="" ;;
    esac
    if command -v curl >/dev/null 2>&1; then
      # shellcheck disable=SC2086  # (two words, or none)
      curl $curl_tls -fsSL "$url" -o "$work/release.tar.gz" ||
        err "could not download $url; install offline with --from"
    elif command -v wget >/dev/null 2>&1; then
      # shellcheck disable=SC2086
      wget $wget_tls -q -O "$work/release.tar.gz" "$url" ||
        err "could not download $url; install offline with --from"
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

# $1 in single quotes, as a shell reads it back: for lines to paste or run.
quote() {
  printf "'%s'" "$(printf '%s\n' "$1" | sed "s/'/'\\\\''/g")"
}

# Remove DIR, then its parents, while they are empty; only below $HOME.
remove_empty_dirs() {
  dir=$1
  while case $dir in "$HOME"/?*) true ;; *) false ;; esac && rmdir "$dir" 2>/dev/null; do
    dir=$(dirname "$dir")
  done
}

# Why directory $1 cannot go into the shell lines the installer writes (the
# rc line's double quotes, the pi-agent command's comment, the lines it
# prints to paste), or nothing: a newline would end a line there (and make
# grep -F match any one of its lines), and ", $, ` and \ act inside double
# quotes. Spaces and ' are only text in them.
unsafe_in() {
  case $1 in
    *"$newline"*) printf 'a newline' ;;
    *[[:cntrl:]]*) printf 'a control character' ;;
    *'"'*) printf 'a double quote (")' ;;
    *'$'*) printf '%s' 'a dollar sign ($)' ;;
    *'`'*) printf '%s' 'a backquote (`)' ;;
    *\\*) printf '%s' 'a backslash (\)' ;;
  esac
}

# Refuse directory $2 (as unsafe_in says), before anything is written, in
# one line that names where it came from ($1) and shows it.
check_dir() {
  why=$(unsafe_in "$2")
  [ -z "$why" ] && return
  err "$1 has $why in it ($(printf '%s' "$2" | tr '[:cntrl:]' '?')); the installer writes it into shell lines, so choose a directory without control characters, \", \$, \` or \\"
}

rc_line() {
  printf '[ -f "%s/shell/pi.sh" ] && . "%s/shell/pi.sh"  # pi-agent\n' "$dest" "$dest"
}

# Written only into a ~/.zshrc the installer creates: zsh completes nothing
# until compinit has run, and a new file would run nothing else.
compinit_line() {
  printf 'autoload -Uz compinit && compinit  # completion (added by the pi-agent installer)\n'
}

in_rc() {
  [ -f "$1" ] && grep -qF "$dest/shell/pi.sh" "$1"
}

add_to_rc() {
  rc=$1
  in_rc "$rc" && return
  if ask "add pi-agent to $rc?"; then
    case $rc in
      */.zshrc) [ -e "$rc" ] || compinit_line >"$rc" || err "cannot write $rc" ;;
    esac
    rc_line >>"$rc" || err "cannot write $rc"
    say "added pi-agent to $rc"
  else
    say "left $rc alone; to use pi-agent, add: $(rc_line)"
    line_shown=1
  fi
}

# Only the exact line ($2, default rc_line) this install added: a user's own
# lines that mention pi-agent, and another install's line, stay.
remove_from_rc() {
  rc=$1
  line=${2:-$(rc_line)}
  [ -f "$rc" ] && grep -qxF "$line" "$rc" || return 0
  grep -vxF "$line" "$rc" >"$work/rc" || :
  if [ -s "$work/rc" ] && [ "$(cat "$work/rc")" != "$(compinit_line)" ]; then
    # cat, not mv: keeps the file's owner, mode and any symlink to it.
    cat "$work/rc" >"$rc" || err "cannot write $rc"
  else
    rm -f "$rc"  # only our lines were in it: the installer made it
  fi
  say "removed the pi-agent line from $rc"
}

# The pi-agent command, for scripts and CI: a shell that is not interactive
# reads no ~/.bashrc (and Debian's returns early), so it has no pi function.
# The marker names the install, so that only that install replaces or
# removes the file, never one someone else put there.
bin_marker() {
  printf '# the pi-agent command of the install in %s\n' "$dest"
}

install_bin() {
  bin=$bin_dir/pi-agent
  if { [ -e "$bin" ] || [ -L "$bin" ]; } && ! grep -qxF "$(bin_marker)" "$bin" 2>/dev/null; then
    say "left $bin alone: it is not this install's"
    return
  fi
  mkdir -p "$bin_dir" || err "cannot create $bin_dir"
  # As shell/pi.sh runs it: imported, so that its compiled form is cached.
  # shellcheck disable=SC2016  # $PI_AGENT_PYTHON and $@ are for the script to expand
  if ! { printf '#!/bin/sh\n' && bin_marker &&
         printf 'exec "${PI_AGENT_PYTHON:-python3}" -I -S -c %s %s "$@"\n' \
           "$(quote 'import sys; sys.path.insert(0, sys.argv.pop(1)); import pi_agent; sys.exit(pi_agent.main())')" \
           "$(quote "$dest")"
       } >"$bin.new.$$" || ! chmod 755 "$bin.new.$$" || ! mv -f "$bin.new.$$" "$bin"; then
    rm -f "$bin.new.$$"
    err "cannot write $bin"
  fi
  case ":$PATH:" in
    *":$bin_dir:"*) runner=pi-agent ;;
    *) runner=$bin
       add_path ;;
  esac
}

# The line that puts the bin dir on PATH, for bash, zsh and what they start.
path_line() {
  # shellcheck disable=SC2016  # $PATH is for the startup file to expand
  printf 'case ":$PATH:" in *":%s:"*) ;; *) PATH="%s:$PATH"; export PATH ;; esac  # PATH for pi-agent\n' \
    "$bin_dir" "$bin_dir"
}

# Where the PATH line goes, as rustup puts its own: ~/.profile (login
# shells, and so the scripts they start), ~/.bash_profile where there is
# one (bash reads it instead), ~/.bashrc and ~/.zshenv (every zsh, scripts
# too) for the shells you have.
path_files() {
  printf '%s\n' "$HOME/.profile"
  [ -f "$HOME/.bash_profile" ] && printf '%s\n' "$HOME/.bash_profile"
  { command -v bash >/dev/null 2>&1 || [ -f "$HOME/.bashrc" ]; } && printf '%s\n' "$HOME/.bashrc"
  { command -v zsh >/dev/null 2>&1 || [ -f "$HOME/.zshenv" ]; } && printf '%s\n' "$HOME/.zshenv"
  return 0
}

add_path() {
  files=$(path_files | while IFS= read -r rc; do printf ' ~/%s' "${rc#"$HOME"/}"; done)
  if [ "$modify_rc" = 0 ] || ! ask "$bin_dir is not on your PATH: add it (in$files), so that scripts and new shells find pi-agent?"; then
    say "$bin_dir is not on your PATH; to type pi-agent alone, add to your shell's startup file: $(path_line)"
    return
  fi
  path_files | while IFS= read -r rc; do
    grep -qxF "$(path_line)" "$rc" 2>/dev/null || path_line >>"$rc" || err "cannot write $rc"
  done
  say "added $bin_dir to PATH in$files (new shells)"
}

remove_bin() {
  bin=$bin_dir/pi-agent
  [ -f "$bin" ] && grep -qxF "$(bin_marker)" "$bin" || return 0
  rm -f "$bin" || err "cannot remove $bin"
  remove_empty_dirs "$bin_dir"
  say "removed $bin"
  for rc in "$HOME/.profile" "$HOME/.bash_profile" "$HOME/.bashrc" "$HOME/.zshenv"; do
    remove_from_rc "$rc" "$(path_line)"
  done
}

uninstall() {
  # First, while pi_agent.py is there: what stops it (a run under way, the
  # engine down) stops the uninstall, with nothing removed.
  if [ "$purge" = 1 ]; then
    [ -f "$dest/pi_agent.py" ] ||
      err "--purge: nothing installed at $dest to purge with (PI_AGENT_HOME says which install)"
    "$python" -I -S -c 'import sys; sys.path.insert(0, sys.argv.pop(1)); import pi_agent; sys.exit(pi_agent.main())' \
      "$dest" reset-all --base --yes || err "nothing uninstalled: your images could not be removed (see above)"
  fi
  for rc in "$HOME/.bashrc" "$HOME/.zshrc"; do
    remove_from_rc "$rc"
  done
  remove_bin
  # Where the images and state are, as pi_agent.py itself reads its settings
  # (environment, then config file), asked before its files go.
  where=$("$python" -I -S -c 'import sys; sys.path.insert(0, sys.argv[1]); import pi_agent
c = pi_agent.Config(lenient=True); print(c.image_repo); print(c.state_dir)' "$dest" 2>/dev/null) ||
    where=""
  repo=$(printf '%s\n' "$where" | sed -n 1p)
  state=$(printf '%s\n' "$where" | sed -n 2p)
  if [ -d "$dest" ]; then
    rm -rf "$dest"
    remove_empty_dirs "$(dirname "$dest")"
    say "removed $dest"
  else
    say "nothing installed at $dest"
  fi
  config=${PI_AGENT_CONFIG:-${XDG_CONFIG_HOME:-$HOME/.config}/pi-agent/config}
  # A PI_AGENT_CONFIG file may sit in a directory that holds other things.
  [ -n "${PI_AGENT_CONFIG:-}" ] || config=$(dirname "$config")
  if [ "$purge" = 1 ]; then
    [ -e "$config" ] && rm -r "$config" && say "removed your settings, $config"
    return
  fi
  repo=${repo:-${PI_AGENT_IMAGE_REPO:-pi-agent-$(id -un)}}
  state=${state:-${PI_AGENT_STATE_DIR:-${XDG_STATE_HOME:-$HOME/.local/state}/pi-agent}}
  say "your environments are kept (--uninstall --purge removes them); to remove them by hand (yours only):"
  say "  docker images $(quote "$repo") --filter label=pi-agent.uid=$(id -u) --format '{{.Repository}}:{{.Tag}}' | xargs -r docker rmi; rm -r $(quote "$state")"
  if [ -e "$config" ]; then
    say "and your settings, which are yours to keep or remove: rm -r $(quote "$config")"
  fi
}

main() {
  assume_yes=0
  modify_rc=1
  with_bin=1
  uninstall=0
  purge=0
  from=""
  while [ $# -gt 0 ]; do
    case $1 in
      -y|--yes) assume_yes=1 ;;
      --no-modify-rc) modify_rc=0 ;;
      --no-bin) with_bin=0 ;;
      --uninstall) uninstall=1 ;;
      --purge) purge=1 ;;
      --from) [ $# -ge 2 ] || err "--from needs a directory or tarball"; from=$2; shift ;;
      --from=*) from=${1#--from=} ;;
      -h|--help) sed -n '2,20s/^# \{0,1\}//p' "$0" 2>/dev/null || say "see README.md"; return 0 ;;
      *) err "unknown option $1 (see --help)" ;;
    esac
    shift
  done
  [ -n "${HOME:-}" ] || err "HOME is not set"
  [ "$purge" = 0 ] || [ "$uninstall" = 1 ] || err "--purge goes with --uninstall"
  python=${PI_AGENT_PYTHON:-python3}
  dest=${PI_AGENT_HOME:-${XDG_DATA_HOME:-$HOME/.local/share}/pi-agent}
  bin_dir=${PI_AGENT_BIN_DIR:-$HOME/.local/bin}
  newline='
'
  if [ -n "${PI_AGENT_HOME:-}" ]; then
    check_dir PI_AGENT_HOME "$dest"
  elif [ -n "${XDG_DATA_HOME:-}" ]; then
    check_dir "the default install dir \$XDG_DATA_HOME/pi-agent (set PI_AGENT_HOME?)" "$dest"
  else
    check_dir "the default install dir \$HOME/.local/share/pi-agent (set PI_AGENT_HOME?)" "$dest"
  fi
  # The bin dir only where it is used: not by an install with --no-bin.
  if [ "$with_bin" = 1 ] || [ "$uninstall" = 1 ]; then
    if [ -n "${PI_AGENT_BIN_DIR:-}" ]; then
      check_dir PI_AGENT_BIN_DIR "$bin_dir"
    else
      check_dir "the default bin dir \$HOME/.local/bin (set PI_AGENT_BIN_DIR?)" "$bin_dir"
    fi
  fi
  work=$(mktemp -d 2>/dev/null || mktemp -d -t pi-agent) || err "cannot create a temporary directory"
  trap 'rm -rf "$work"' EXIT

  if [ "$uninstall" = 1 ]; then
    uninstall
    return
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
  before=$(version_in "$dest")
  install_files "$src"
  after=$(version_in "$dest")
  if [ -z "$before" ]; then
    say "installed pi-agent ${after:-?} in $dest"
  elif [ "$before" = "$after" ]; then
    say "installed pi-agent ${after:-?} again in $dest"
  else
    say "upgraded pi-agent from $before to ${after:-?} in $dest"
  fi

  runner="$(quote "$python") $(quote "$dest/pi_agent.py")"
  [ "$with_bin" = 1 ] && install_bin
  line_shown=0
  if [ "$modify_rc" = 1 ]; then
    command -v bash >/dev/null 2>&1 || [ -f "$HOME/.bashrc" ] && add_to_rc "$HOME/.bashrc"
    command -v zsh >/dev/null 2>&1 || [ -f "$HOME/.zshrc" ] && add_to_rc "$HOME/.zshrc"
  fi
  if in_rc "$HOME/.bashrc" || in_rc "$HOME/.zshrc"; then
    say "open a new shell (or: . \"$dest/shell/pi.sh\"), cd into a project, and type pi"
    return
  fi
  [ "$line_shown" = 1 ] || say "to have pi in new shells, add to ~/.bashrc or ~/.zshrc: $(rc_line)"
  say "pi-agent is not in any shell startup file yet: add the line above and open a new shell, or type . \"$dest/shell/pi.sh\" in this one; without either: $runner run|exec|status ..."
}

main "$@" || exit 1
