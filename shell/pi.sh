# shellcheck shell=bash
# pi-agent shell functions for bash (>= 3.2) and zsh (>= 5).
# Source this file from ~/.bashrc or ~/.zshrc. It defines functions,
# remembers where pi_agent.py is and registers their completion; it prints
# nothing and is safe to source again. All logic lives in pi_agent.py.

# Where this file is, so that pi_agent.py is found (in ..).
if [ -n "${ZSH_VERSION:-}" ]; then
  eval '_PI_AGENT_SOURCE=${(%):-%x}'
else
  _PI_AGENT_SOURCE=${BASH_SOURCE[0]}
fi
case $_PI_AGENT_SOURCE in
  /*) ;;
  *) _PI_AGENT_SOURCE=$PWD/$_PI_AGENT_SOURCE ;;
esac
_PI_AGENT_DIR=${_PI_AGENT_SOURCE%/*}/..
unset _PI_AGENT_SOURCE

# A user's aliases must not change these functions: `\command` and
# `\builtin` are never alias-expanded (an alias is expanded where a
# function is defined, in zsh always); `command` skips any function of the
# same name; the `function` keyword keeps an alias named pi from breaking
# the definitions, and the aliases named as ours go, as they would shadow
# them at the prompt.
\builtin unalias pi pi-shell pi-exec pi-status pi-snapshots pi-rollback pi-reset-system \
  pi-reset-all pi-rebuild-base pi-prune pi-flatten pi-orphans pi-recover pi-clean-orphans \
  pi-unlock pi-branch pi-worktree pi-log pi-diff >/dev/null 2>&1 || \builtin true
# The interpreter's real path is looked up once: a version manager's shim
# (pyenv) costs a tenth of a second per call. -I -S: no user site, no .pth
# imports; pi_agent.py needs only the standard library. It is imported, not
# run as a script, so its compiled form is cached beside it.
function _pi_agent {
  if [ ! -f "$_PI_AGENT_DIR/pi_agent.py" ]; then  # (a shell left open after an uninstall)
    printf 'pi-agent: pi-agent was uninstalled (%s is gone); open a new shell, or install it again\n' \
      "$_PI_AGENT_DIR/pi_agent.py" >&2
    return 127
  fi
  if [ "${_PI_AGENT_PYTHON_FOR-}" != "${PI_AGENT_PYTHON:-python3}" ] ||
     [ ! -x "${_PI_AGENT_PYTHON_BIN:-}" ]; then
    _PI_AGENT_PYTHON_BIN=$(\command "${PI_AGENT_PYTHON:-python3}" -I -S -c \
      'import sys; print(sys.executable)') || return
    _PI_AGENT_PYTHON_FOR=${PI_AGENT_PYTHON:-python3}
  fi
  # Ctrl-C while Python loads pi_agent.py (before main hears it) is said as
  # main says it, not as a traceback.
  \command "$_PI_AGENT_PYTHON_BIN" -I -S -c 'import sys; sys.path.insert(0, sys.argv.pop(1))
try:
    import pi_agent
except KeyboardInterrupt:
    sys.stderr.write("pi-agent: interrupted\n")
    sys.exit(130)
sys.exit(pi_agent.main())' "$_PI_AGENT_DIR" "$@"
}

function pi { _pi_agent run "$@"; }
function pi-shell { _pi_agent shell "$@"; }
function pi-exec { _pi_agent exec "$@"; }
function pi-status { _pi_agent status "$@"; }
function pi-snapshots { _pi_agent snapshots "$@"; }
function pi-rollback { _pi_agent rollback "$@"; }
function pi-reset-system { _pi_agent reset-system "$@"; }
function pi-reset-all { _pi_agent reset-all "$@"; }
function pi-rebuild-base { _pi_agent rebuild-base "$@"; }
function pi-prune { _pi_agent prune "$@"; }
function pi-flatten { _pi_agent flatten "$@"; }
function pi-orphans { _pi_agent orphans "$@"; }
function pi-recover { _pi_agent recover "$@"; }
function pi-clean-orphans { _pi_agent clean-orphans "$@"; }
function pi-unlock { _pi_agent unlock "$@"; }
function pi-branch { _pi_agent branch "$@"; }
function pi-worktree { _pi_agent worktree "$@"; }
function pi-log { _pi_agent log "$@"; }
function pi-diff { _pi_agent diff "$@"; }

# Completion: wrapper options, snapshot names (and pins) for pi-rollback,
# pi-diff and pi-snapshots (pins after --unpin),
# left-behind containers for pi-recover, profiles for pi-branch (and after
# --profile, --delete, --remove; and snapshots and base after --from),
# commands after pi-exec's options.
function _pi_agent_candidates {
  case ${2-} in
    --profile) _pi_agent complete profiles 2>/dev/null; return 0 ;;
    --egress) printf '%s\n' public allow open none; return 0 ;;
    --from)
      _pi_agent complete profiles 2>/dev/null
      _pi_agent complete snapshots 2>/dev/null
      printf '%s\n' base
      return 0 ;;
    --pin) return 0 ;;
    --unpin) _pi_agent complete pins 2>/dev/null; return 0 ;;
    --delete|--remove)
      _pi_agent complete profiles 2>/dev/null | \command grep -vx default
      return 0 ;;
  esac
  case $1 in
    pi) printf '%s\n' --agent --profile --wait --here --offline --egress --dry-run --help \
      --version -- ;;
    pi-shell) printf '%s\n' --profile --wait --here --offline --egress --dry-run --help \
      --version -- ;;
    pi-exec) printf '%s\n' --profile --wait --here --offline --egress --dry-run --help -- ;;
    pi-rollback) _pi_agent complete snapshots 2>/dev/null; printf '%s\n' --profile --help ;;
    pi-recover) _pi_agent complete orphans 2>/dev/null; printf '%s\n' --drop --profile --help ;;
    pi-branch) _pi_agent complete profiles 2>/dev/null
      printf '%s\n' --from --delete --yes --json --profile --help ;;
    pi-worktree) printf '%s\n' --remove --yes --agent --wait --offline --egress --profile \
      --help -- ;;
    pi-prune) printf '%s\n' --dry-run --profile --help ;;
    pi-reset-all) printf '%s\n' --yes --base --profile --help ;;
    pi-reset-system) printf '%s\n' --drop-config --profile --help ;;
    pi-clean-orphans) printf '%s\n' --yes --profile --help ;;
    pi-rebuild-base) printf '%s\n' --no-cache --profile --help ;;
    pi-log) printf '%s\n' -n --json --profile --help ;;
    pi-diff) _pi_agent complete snapshots 2>/dev/null
      printf '%s\n' current base --all --json --profile --help ;;
    pi-status) printf '%s\n' --json --check --profile --help ;;
    pi-snapshots) _pi_agent complete snapshots 2>/dev/null
      printf '%s\n' --json --pin --unpin --profile --help ;;
    pi-orphans) printf '%s\n' --json --profile --help ;;
    *) printf '%s\n' --profile --help ;;
  esac
}

function _pi_agent_complete_bash {
  local word=${COMP_WORDS[COMP_CWORD]} IFS=$'\n'
  if [ "${COMP_WORDS[0]}" = pi-exec ] && [ "${word#-}" = "$word" ] &&
     [ "${COMP_WORDS[COMP_CWORD-1]}" != --profile ] &&
     [ "${COMP_WORDS[COMP_CWORD-1]}" != --egress ]; then
    # shellcheck disable=SC2207
    COMPREPLY=($(compgen -c -- "$word"))
  else
    # shellcheck disable=SC2207
    COMPREPLY=($(compgen -W "$(_pi_agent_candidates "${COMP_WORDS[0]}" \
      "${COMP_WORDS[COMP_CWORD-1]}")" -- "$word"))
  fi
}

if [ -n "${ZSH_VERSION:-}" ]; then
  # zsh syntax, kept from bash's parser. compdef exists only once compinit
  # has run, which a .zshrc may do after sourcing this file (or never): then
  # the first prompt registers, if compinit has run by then, and the hook
  # goes either way. The filter keeps a second source from adding it twice.
  eval '
    function _pi_agent_complete_zsh {
      if [[ $service == pi-exec && $PREFIX != -* && $words[CURRENT-1] != --(profile|egress) ]]; then
        _command_names
      else
        compadd -- ${(f)"$(_pi_agent_candidates $service $words[CURRENT-1])"}
      fi
    }
    function _pi_agent_compdef {
      (( $+functions[compdef] )) || return 0
      compdef _pi_agent_complete_zsh pi pi-shell pi-exec pi-status pi-snapshots pi-rollback \
        pi-reset-system pi-reset-all pi-rebuild-base pi-prune pi-flatten pi-orphans \
        pi-recover pi-clean-orphans pi-unlock pi-branch pi-worktree pi-log pi-diff
    }
    function _pi_agent_compdef_at_prompt {
      precmd_functions=(${precmd_functions:#_pi_agent_compdef_at_prompt})
      _pi_agent_compdef
    }
    if (( $+functions[compdef] )); then
      _pi_agent_compdef
    else
      typeset -ga precmd_functions
      precmd_functions=(${precmd_functions:#_pi_agent_compdef_at_prompt}
        _pi_agent_compdef_at_prompt)
    fi'
elif \command -v complete >/dev/null 2>&1; then
  complete -F _pi_agent_complete_bash pi pi-shell pi-exec pi-status pi-snapshots pi-rollback \
    pi-reset-system pi-reset-all pi-rebuild-base pi-prune pi-flatten pi-orphans pi-recover \
    pi-clean-orphans pi-unlock pi-branch pi-worktree pi-log pi-diff
fi
