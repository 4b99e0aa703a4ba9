# shellcheck shell=bash
# Summary: shared bats setup; `load test_helper/common` then call common_setup.
#
# common_setup: temp HOME and work dir per test (cwd is $WORK), PATH rebuilt to
#   $FAKE_BIN (for fake docker/nvidia-smi/... a test drops in), the kit's bin/
#   and the system dirs; kit env knobs cleared; bats-support/bats-assert loaded.
# start_server ROOT [http_server.py options]: serve ROOT on 127.0.0.1; sets
#   SERVER_URL, SERVER_PORT, SERVER_PID and SERVER_LOG (one line per request).
# stop_server: stop it (common_teardown calls it).

KIT_ROOT=$(cd "${BATS_TEST_DIRNAME}/../.." && pwd)
TEST_HELPER_DIR=${KIT_ROOT}/tests/bats/test_helper

common_setup() {
  load "${KIT_ROOT}/node_modules/bats-support/load"
  load "${KIT_ROOT}/node_modules/bats-assert/load"

  export HOME=${BATS_TEST_TMPDIR}/home
  WORK=${BATS_TEST_TMPDIR}/work
  FAKE_BIN=${BATS_TEST_TMPDIR}/fakebin
  mkdir -p "$HOME" "$WORK" "$FAKE_BIN"
  cd "$WORK" || return 1

  export PATH="${FAKE_BIN}:${KIT_ROOT}/bin:/usr/local/bin:/usr/bin:/bin:/usr/local/sbin:/usr/sbin:/sbin"
  unset KIT_TRACE JAWIKI_BASE_URL JAWIKI_RETRIES JAWIKI_BACKOFF_BASE
  export LC_ALL=C.UTF-8 TZ=UTC
}

common_teardown() {
  stop_server
}

start_server() { # ROOT [OPTIONS...]
  local root=$1 port_file=${BATS_TEST_TMPDIR}/server.port i
  shift
  stop_server
  rm -f "$port_file"
  SERVER_LOG=${BATS_TEST_TMPDIR}/server.log
  : >"$SERVER_LOG"
  # fd 3 closed: bats waits for every process holding it before it finishes.
  python3 "${TEST_HELPER_DIR}/http_server.py" --root "$root" --port-file "$port_file" \
    --log "$SERVER_LOG" "$@" 3>&- &
  SERVER_PID=$!
  for ((i = 0; i < 100; i++)); do # at most ~10 s
    [[ -s $port_file ]] && break
    kill -0 "$SERVER_PID" 2>/dev/null || {
      echo "fixture server exited before binding" >&2
      return 1
    }
    sleep 0.1
  done
  [[ -s $port_file ]] || {
    echo "fixture server did not write ${port_file} within 10 s" >&2
    return 1
  }
  SERVER_PORT=$(<"$port_file")
  # shellcheck disable=SC2034 # read by the .bats files that load this helper
  SERVER_URL=http://127.0.0.1:${SERVER_PORT}
}

stop_server() {
  [[ -n ${SERVER_PID:-} ]] || return 0
  kill -TERM "$SERVER_PID" 2>/dev/null || true
  wait "$SERVER_PID" 2>/dev/null || true
  SERVER_PID=
}
