# shellcheck shell=bash
# Summary: shared helpers for the kit's bash scripts; sourced, never run.
# Usage: source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
#
# Provides log_info / log_warn / die (stderr, one prefix), usage_from_header,
# and KIT_TRACE=1 for `set -x` with a file:line prompt.

KIT_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export KIT_ROOT

if [[ "${KIT_TRACE:-0}" == 1 ]]; then
  export PS4='+ ${BASH_SOURCE[0]##*/}:${LINENO}: '
  set -x
fi

_kit_prog=$(basename "${0}")

log_info() { printf '[%s] %s\n' "${_kit_prog}" "$*" >&2; }
log_warn() { printf '[%s] warning: %s\n' "${_kit_prog}" "$*" >&2; }
die() {
  printf '[%s] error: %s\n' "${_kit_prog}" "$*" >&2
  exit 1
}

# Print the '# Summary:' / '# Usage:' header block of the calling script.
usage_from_header() {
  sed -n '2,/^[^#]/{/^#/!q;s/^# \{0,1\}//;p;}' "${1:-$0}"
}

# Die with usage after an unknown option (exit 2, like click's UsageError).
usage_error() {
  printf '[%s] error: %s\n\n' "${_kit_prog}" "$*" >&2
  usage_from_header "$0" >&2
  exit 2
}
