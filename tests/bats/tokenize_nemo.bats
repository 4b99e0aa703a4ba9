#!/usr/bin/env bats
# bin/tokenize-nemo: the exact call of NeMo's preprocess_data_for_megatron.py, and its errors.
# NeMo's script exists only in the container; a fake `python` on PATH records the argv and
# writes the outputs the real script would.

bats_require_minimum_version 1.5.0

setup() {
  load test_helper/common
  common_setup
  export NEMO_PREPROCESS=${WORK}/preprocess_data_for_megatron.py
  touch "$NEMO_PREPROCESS"
  mkdir -p tok && touch tok/tokenizer_config.json
  printf '{"text": "日本語"}\n' >in.jsonl
  cat >"${FAKE_BIN}/python" <<'SH'
#!/usr/bin/env bash
printf '%s\n' "$@" >"${BATS_TEST_TMPDIR}/python.argv"
prefix=$(awk 'p {print; exit} /^--output-prefix$/ {p=1}' "${BATS_TEST_TMPDIR}/python.argv")
[[ ${FAKE_NO_OUTPUT:-0} == 1 ]] || printf x | tee "${prefix}_text_document.bin" >"${prefix}_text_document.idx"
SH
  chmod +x "${FAKE_BIN}/python"
}

teardown() {
  common_teardown
}

@test "calls NeMo's script with the reference flags" {
  mkdir -p out
  run tokenize-nemo --input in.jsonl --tokenizer tok --output-prefix out/train --workers 4
  assert_success
  run cat "${BATS_TEST_TMPDIR}/python.argv"
  assert_output "$(printf '%s\n' "$NEMO_PREPROCESS" --input in.jsonl --json-keys text --tokenizer-library huggingface \
    --tokenizer-type tok --dataset-impl mmap --append-eod --output-prefix out/train --workers 4)"
}

@test "missing NeMo script says it needs the container and names the alternative" {
  rm "$NEMO_PREPROCESS"
  run tokenize-nemo --input in.jsonl --tokenizer tok --output-prefix p
  assert_failure 1
  assert_output --partial 'runs in the NeMo container (make docker-run)'
  assert_output --partial 'DATA_BACKEND=fast'
}

@test "required options, bad workers, missing input and tokenizer" {
  run tokenize-nemo --input in.jsonl
  assert_failure 2
  assert_output --partial '--input, --tokenizer and --output-prefix are required'
  run tokenize-nemo --input in.jsonl --tokenizer tok --output-prefix p --workers 0
  assert_failure 1
  assert_output --partial "--workers must be a positive integer, got '0'"
  run tokenize-nemo --input nope.jsonl --tokenizer tok --output-prefix p
  assert_failure 1
  assert_output --partial 'input nope.jsonl not found'
  run tokenize-nemo --input in.jsonl --tokenizer nodir --output-prefix p
  assert_failure 1
  assert_output --partial 'nodir is not a tokenizer directory'
}

@test "a script run that leaves no outputs is an error" {
  export FAKE_NO_OUTPUT=1
  run tokenize-nemo --input in.jsonl --tokenizer tok --output-prefix p
  assert_failure 1
  assert_output --partial 'p_text_document.{bin,idx} are missing or empty'
}
