#!/usr/bin/env bats
# Tests for bin/download-jawiki against a real HTTP server on 127.0.0.1
# (test_helper/http_server.py) serving small gzip JSONL shards made per test.

bats_require_minimum_version 1.5.0

setup() {
  load test_helper/common
  common_setup
  export JAWIKI_BACKOFF_BASE=0
  SRC=${BATS_TEST_TMPDIR}/src
  DEST=${WORK}/dest
  mkdir -p "$SRC"
  make_shard "${SRC}/train_0.jsonl.gz" 1
  make_shard "${SRC}/train_1.jsonl.gz" 2
  make_shard "${SRC}/validation_0.jsonl.gz" 3
}

teardown() {
  common_teardown
}

# make_shard PATH SEED: a gzip JSONL shard (~20 KiB) of seeded random Japanese text.
make_shard() {
  python3 - "$1" "$2" <<'PY'
import gzip, json, random, sys
rng = random.Random(int(sys.argv[2]))
with gzip.GzipFile(sys.argv[1], "wb", mtime=0) as fh:
    for i in range(400):
        text = "".join(rng.choice("あいうえおかきくけこ日本語の文章 abc") for _ in range(100))
        fh.write((json.dumps({"text": text, "id": i}, ensure_ascii=False) + "\n").encode())
PY
}

sha() { sha256sum "$1" | cut -d' ' -f1; }
size() { stat -c %s "$1"; }
# Manifest "SIZE SHA256" of a file, or nothing.
pinned() { awk -F'\t' -v f="$1" '$1 == f { print $2, $3 }' "${DEST}/MANIFEST.tsv"; }
gets() { grep -c '^GET ' "$SERVER_LOG" || true; }

@test "--help prints Summary and Usage and exits 0" {
  run download-jawiki --help
  assert_success
  assert_line --index 0 'Summary: download llm-jp-corpus v3 ja_wiki shards, resumable and verified'
  assert_line --index 1 'Usage: download-jawiki [--dest DIR] [--shards SPEC] [--base-url URL] [--retries N] [--verify]'
  assert_output --partial '--repin'
  run download-jawiki -h
  assert_success
  assert_line --index 0 --partial 'Summary:'
}

@test "an unknown option exits 2 with the usage" {
  run download-jawiki --frobnicate
  assert_failure 2
  assert_line --index 0 '[download-jawiki] error: unknown option: --frobnicate'
  assert_line 'Usage: download-jawiki [--dest DIR] [--shards SPEC] [--base-url URL] [--retries N] [--verify]'
  run download-jawiki --dest
  assert_failure 2
  assert_output --partial 'error: --dest needs a value'
}

@test "a bad --shards spec fails naming what is wrong and the valid form" {
  local spec
  for spec in 14 0-14 abc 1,,2 '0,' -3 7-2 ''; do
    run download-jawiki --dest "$DEST" --shards "$spec" --base-url http://127.0.0.1:9
    assert_failure 1
    assert_output --partial "bad --shards '${spec}'"
    assert_output --partial 'N, A-B or a comma list like 0,3,5-7, with shards 0..13 and A<=B'
  done
  run download-jawiki --shards 14
  assert_output --partial "'14' is outside 0..13"
  run download-jawiki --shards 7-2
  assert_output --partial "'7-2' runs backwards"
  assert [ ! -e "$DEST" ]
}

@test "downloads the chosen shards plus validation, pins them and prints a summary" {
  start_server "$SRC"
  export JAWIKI_BASE_URL=$SERVER_URL
  run --separate-stderr download-jawiki --dest "$DEST" --shards 0-1
  assert_success
  local f
  for f in train_0.jsonl.gz train_1.jsonl.gz validation_0.jsonl.gz; do
    cmp "${SRC}/${f}" "${DEST}/${f}"
    gzip -t "${DEST}/${f}"
    assert_equal "$(pinned "$f")" "$(size "${SRC}/${f}") $(sha "${SRC}/${f}")"
    assert_line "ok  ${f} $(size "${SRC}/${f}") $(sha "${SRC}/${f}" | cut -c1-12) downloaded"
    grep -q "^GET /${f}?ref_type=heads range=- status=200$" "$SERVER_LOG"
    [[ $stderr == *"${f}: downloaded $(size "${SRC}/${f}") bytes in "*s* ]]
  done
  assert_line --index 3 "$DEST"
  assert_equal "${#lines[@]}" 4
  assert_equal "$(head -n1 "${DEST}/MANIFEST.tsv")" "$(printf '# file\tsize\tsha256\trecorded_utc')"
  assert_equal "$(grep -vc '^#' "${DEST}/MANIFEST.tsv")" 3
  assert [ ! -e "${DEST}/train_2.jsonl.gz" ]
  assert_equal "$(find "${DEST}/.partial" -type f ! -name lock)" ''
}

@test "a second run downloads nothing and verifies every file" {
  start_server "$SRC"
  run download-jawiki --dest "$DEST" --shards 1 --base-url "$SERVER_URL"
  assert_success
  : >"$SERVER_LOG"
  run download-jawiki --dest "$DEST" --shards 1 --base-url "$SERVER_URL"
  assert_success
  assert_line "ok  train_1.jsonl.gz $(size "${SRC}/train_1.jsonl.gz") $(sha "${SRC}/train_1.jsonl.gz" | cut -c1-12) verified"
  assert_line --partial "ok  validation_0.jsonl.gz "
  assert_equal "$(gets)" 0
}

@test "--verify passes on good files and names a file with a corrupted byte" {
  start_server "$SRC"
  run download-jawiki --dest "$DEST" --shards 0-1 --base-url "$SERVER_URL"
  assert_success
  : >"$SERVER_LOG"
  run download-jawiki --dest "$DEST" --shards 0-1 --verify
  assert_success
  assert_line --partial 'ok  train_0.jsonl.gz '
  assert_line --index 3 "$DEST"
  printf 'X' | dd of="${DEST}/train_1.jsonl.gz" bs=1 seek=100 conv=notrunc status=none
  run download-jawiki --dest "$DEST" --shards 0-1 --verify
  assert_failure 1
  assert_output --partial "train_1.jsonl.gz does not match ${DEST}/MANIFEST.tsv"
  assert_output --partial "expected size sha256: $(size "${SRC}/train_1.jsonl.gz") $(sha "${SRC}/train_1.jsonl.gz")"
  assert_output --partial "actual   size sha256: $(size "${DEST}/train_1.jsonl.gz") $(sha "${DEST}/train_1.jsonl.gz")"
  assert_output --partial 'fix: delete it and run download-jawiki again'
  assert_output --partial 'error: 1 of 3 files failed verification'
  refute_output --partial 'train_0.jsonl.gz does not match'
  assert_equal "$(gets)" 0
}

@test "--verify lists every missing file with the fix" {
  run download-jawiki --dest "$DEST" --shards 2,5 --verify
  assert_failure 1
  assert_output --partial "missing: ${DEST}/train_2.jsonl.gz; fix: run download-jawiki without --verify"
  assert_output --partial "missing: ${DEST}/train_5.jsonl.gz"
  assert_output --partial "missing: ${DEST}/validation_0.jsonl.gz"
  assert_output --partial 'error: 3 of 3 files failed verification'
  assert [ ! -e "$DEST" ]
}

@test "a connection cut mid-file is retried and resumed, not restarted" {
  start_server "$SRC" --cut-after 5000
  run download-jawiki --dest "$DEST" --shards 0 --base-url "$SERVER_URL"
  assert_success
  assert_output --partial 'train_0.jsonl.gz: attempt 1/5 failed (curl exit 18'
  local resumed
  resumed=$(sed -n 's|^GET /train_0.jsonl.gz?ref_type=heads range=bytes=\([0-9]*\)- status=206$|\1|p' "$SERVER_LOG")
  [[ $resumed -gt 0 ]]
  assert_equal "$(grep -c '^GET /train_0' "$SERVER_LOG")" 2
  assert_equal "$(sha "${DEST}/train_0.jsonl.gz")" "$(sha "${SRC}/train_0.jsonl.gz")"
  assert_equal "$(sha "${DEST}/validation_0.jsonl.gz")" "$(sha "${SRC}/validation_0.jsonl.gz")"
}

@test "a .part left by an earlier run is resumed, even when already complete" {
  mkdir -p "${DEST}/.partial"
  head -c 3000 "${SRC}/train_0.jsonl.gz" >"${DEST}/.partial/train_0.jsonl.gz.part"
  cp "${SRC}/train_1.jsonl.gz" "${DEST}/.partial/train_1.jsonl.gz.part"
  start_server "$SRC"
  run download-jawiki --dest "$DEST" --shards 0-1 --base-url "$SERVER_URL"
  assert_success
  grep -q '^GET /train_0.jsonl.gz?ref_type=heads range=bytes=3000- status=206$' "$SERVER_LOG"
  grep -q "^GET /train_1.jsonl.gz?ref_type=heads range=bytes=$(size "${SRC}/train_1.jsonl.gz")- status=416$" "$SERVER_LOG"
  cmp "${SRC}/train_0.jsonl.gz" "${DEST}/train_0.jsonl.gz"
  cmp "${SRC}/train_1.jsonl.gz" "${DEST}/train_1.jsonl.gz"
  assert_equal "$(pinned train_1.jsonl.gz)" "$(size "${SRC}/train_1.jsonl.gz") $(sha "${SRC}/train_1.jsonl.gz")"
}

@test "a server that ignores Range still yields a correct file" {
  start_server "$SRC" --cut-after 5000 --ignore-range
  run download-jawiki --dest "$DEST" --shards 0 --base-url "$SERVER_URL"
  assert_success
  assert_output --partial 'train_0.jsonl.gz: server ignored the Range request; restarting this file from byte 0'
  grep -q '^GET /train_0.jsonl.gz?ref_type=heads range=bytes=5000- status=200$' "$SERVER_LOG"
  cmp "${SRC}/train_0.jsonl.gz" "${DEST}/train_0.jsonl.gz"
  assert_equal "$(pinned train_0.jsonl.gz)" "$(size "${SRC}/train_0.jsonl.gz") $(sha "${SRC}/train_0.jsonl.gz")"
}

@test "a corrupt gzip on the server fails naming the file and leaves nothing behind" {
  head -c 4000 "${SRC}/train_1.jsonl.gz" >"${SRC}/train_0.jsonl.gz"
  start_server "$SRC"
  run download-jawiki --dest "$DEST" --shards 0 --base-url "$SERVER_URL"
  assert_failure 1
  assert_output --partial "error: train_0.jsonl.gz was corrupt (gzip -t failed) as downloaded from ${SERVER_URL}/train_0.jsonl.gz?ref_type=heads"
  assert_output --partial 're-running will download it again'
  assert [ ! -e "${DEST}/train_0.jsonl.gz" ]
  assert [ ! -e "${DEST}/.partial/train_0.jsonl.gz.part" ]
  run grep -s train_0 "${DEST}/MANIFEST.tsv"
  assert_failure
}

@test "a download that differs from the manifest fails, keeps its bytes and replaces nothing" {
  start_server "$SRC"
  run download-jawiki --dest "$DEST" --shards 0 --base-url "$SERVER_URL"
  assert_success
  local old_pin
  old_pin=$(pinned train_0.jsonl.gz)
  rm "${DEST}/train_0.jsonl.gz"
  make_shard "${SRC}/train_0.jsonl.gz" 99
  run download-jawiki --dest "$DEST" --shards 0 --base-url "$SERVER_URL"
  assert_failure 1
  assert_output --partial "train_0.jsonl.gz does not match ${DEST}/MANIFEST.tsv"
  assert_output --partial "expected size sha256: ${old_pin}"
  assert_output --partial "actual   size sha256: $(size "${SRC}/train_0.jsonl.gz") $(sha "${SRC}/train_0.jsonl.gz")"
  assert_output --partial "kept at ${DEST}/.partial/train_0.jsonl.gz.mismatch"
  assert_output --partial 're-run with --repin'
  assert [ ! -e "${DEST}/train_0.jsonl.gz" ]
  assert [ ! -e "${DEST}/.partial/train_0.jsonl.gz.part" ]
  cmp "${SRC}/train_0.jsonl.gz" "${DEST}/.partial/train_0.jsonl.gz.mismatch"
  assert_equal "$(pinned train_0.jsonl.gz)" "$old_pin"
}

@test "--repin accepts a changed local file and re-records it" {
  start_server "$SRC"
  run download-jawiki --dest "$DEST" --shards 0 --base-url "$SERVER_URL"
  assert_success
  make_shard "${DEST}/train_0.jsonl.gz" 42
  local new
  new="$(size "${DEST}/train_0.jsonl.gz") $(sha "${DEST}/train_0.jsonl.gz")"
  run download-jawiki --dest "$DEST" --shards 0 --base-url "$SERVER_URL"
  assert_failure 1
  assert_output --partial "actual   size sha256: ${new} (${DEST}/train_0.jsonl.gz)"
  assert_output --partial "fix: delete ${DEST}/train_0.jsonl.gz and re-run to download it again, or re-run with --repin"
  run download-jawiki --dest "$DEST" --shards 0 --base-url "$SERVER_URL" --repin
  assert_success
  assert_output --partial 'train_0.jsonl.gz: re-pinned'
  assert_line --partial "ok  train_0.jsonl.gz ${new% *} ${new:${#new}-64:12} repinned"
  assert_equal "$(pinned train_0.jsonl.gz)" "$new"
  run download-jawiki --dest "$DEST" --shards 0 --verify
  assert_success
}

@test "HTTP 404 fails at once naming the URL" {
  rm "${SRC}/train_0.jsonl.gz"
  start_server "$SRC"
  run download-jawiki --dest "$DEST" --shards 0 --base-url "${SERVER_URL}/"
  assert_failure 1
  assert_output --partial "error: HTTP 404 for ${SERVER_URL}/train_0.jsonl.gz?ref_type=heads; check --shards, JAWIKI_BASE_URL/--base-url"
  refute_output --partial 'attempt 1/'
  assert_equal "$(gets)" 1
  assert [ ! -e "${DEST}/train_0.jsonl.gz" ]
}

@test "an unreachable server is retried --retries times, then fails" {
  start_server "$SRC"
  local url=$SERVER_URL
  stop_server
  run download-jawiki --dest "$DEST" --shards 0 --base-url "$url" --retries 3
  assert_failure 1
  assert_output --partial 'train_0.jsonl.gz: attempt 1/3 failed (curl exit 7, HTTP 000); retrying in 0s'
  assert_output --partial 'attempt 2/3 failed'
  refute_output --partial 'attempt 3/3 failed'
  assert_output --partial "error: train_0.jsonl.gz: giving up after 3 attempts (curl exit 7, HTTP 000) for ${url}/train_0.jsonl.gz?ref_type=heads; re-run to resume"
}

@test "a second downloader on the same DEST is refused" {
  mkdir -p "${DEST}/.partial"
  exec 8>"${DEST}/.partial/lock"
  flock -n 8
  run download-jawiki --dest "$DEST" --shards 0 --base-url http://127.0.0.1:9
  exec 8>&-
  assert_failure 1
  assert_output --partial "another download-jawiki is using ${DEST}"
}
