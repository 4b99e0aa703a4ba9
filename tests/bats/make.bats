#!/usr/bin/env bats
# The Makefile's contract: help, knob validation, the exact commands its targets run,
# and bin/setup's interface. Runs the real Makefile of this checkout.

bats_require_minimum_version 1.5.0

setup() {
  load test_helper/common
  common_setup
  export JACPT_DATA_DIR=${WORK}/data
}

teardown() {
  common_teardown
}

kmake() { make --no-print-directory -C "$KIT_ROOT" "$@"; }

@test "make alone prints the help, one line per documented target" {
  run kmake
  assert_success
  assert_line --index 0 --partial 'Usage: make <target> [PROFILE=tiny-cpu|tiny-gpu|rtx6000ada-48g|h100-80g]'
  for target in help setup assets config data import cpt lora export demo eval quickstart gpu-smoke \
    test lint bats pytest bench-data clean distclean; do
    assert_line --regexp "^  ${target} +[A-Za-z]"
  done
  run kmake help
  assert_success
}

@test "every target with a ## comment is .PHONY or a file target, and help lists it" {
  run bash -c "grep -oE '^[a-z][a-z-]+:.*## ' '${KIT_ROOT}/Makefile' | cut -d: -f1"
  assert_success
  local documented=$output
  run kmake help
  for t in $documented; do assert_line --regexp "^  ${t} "; done
}

@test "a bad PROFILE fails before anything runs and lists the valid ones" {
  run kmake data PROFILE=a100
  assert_failure
  assert_output --partial 'PROFILE=a100 is not one of: tiny-cpu tiny-gpu rtx6000ada-48g h100-80g'
}

@test "a bad DATA_BACKEND, DRY_RUN or SKIP_BAD fails with the allowed values" {
  run kmake data DATA_BACKEND=turbo
  assert_failure
  assert_output --partial 'DATA_BACKEND=turbo is not one of: fast nemo'
  run kmake data DRY_RUN=yes
  assert_failure
  assert_output --partial 'DRY_RUN, SKIP_BAD and OFFLINE take 0 or 1'
  run kmake data SKIP_BAD=2
  assert_failure
  assert_output --partial 'DRY_RUN, SKIP_BAD and OFFLINE take 0 or 1'
}

@test "make -n data shows the one command it wires, with --skip-bad and overrides" {
  run kmake -n data SKIP_BAD=1 OVERRIDES='data.workers=3'
  assert_success
  assert_output --regexp 'python -m jacpt.cli data --skip-bad data.workers=3'
}

@test "make data DRY_RUN=1 prints the plan for a real profile, exits 0 and writes nothing" {
  run kmake data DRY_RUN=1 PROFILE=rtx6000ada-48g SHARDS=0-1 JAWIKI_BASE_URL=http://127.0.0.1:9/mirror
  assert_success
  assert_output --partial 'profile      rtx6000ada-48g'
  assert_output --partial 'download   http://127.0.0.1:9/mirror (shards 0-1 + validation_0)'
  assert_output --partial 'train_1.jsonl.gz'
  refute_output --partial 'train_2.jsonl.gz'
  assert_output --partial "# env JAWIKI_BASE_URL"
  [[ ! -e ${JACPT_DATA_DIR} ]]
}

@test "make data DRY_RUN=1 with a bad override fails with the setting's name" {
  run kmake data DRY_RUN=1 OVERRIDES='data.wokers=3'
  assert_failure
  assert_output --partial "unknown setting 'data.wokers'; did you mean data.workers?"
}

@test "make quickstart runs the whole chain on the embedded default" {
  run kmake -n quickstart
  assert_success
  assert_output --partial 'data import cpt lora export demo eval PROFILE=tiny-cpu DATA_SOURCE=sample'
}

@test "make gpu-smoke refuses without a GPU and says what to run instead" {
  printf '#!/usr/bin/env bash\necho "No devices were found" >&2; exit 6\n' >"${FAKE_BIN}/nvidia-smi"
  chmod +x "${FAKE_BIN}/nvidia-smi"
  run kmake gpu-smoke
  assert_failure
  assert_output --partial 'gpu-smoke needs a CUDA GPU'
  assert_output --partial 'make quickstart'
}

@test "every stage target passes DRY_RUN and OVERRIDES through to its command" {
  for stage in import cpt lora export demo eval; do
    run kmake -n "$stage" DRY_RUN=1 OVERRIDES='wandb.mode=disabled'
    assert_success
    assert_output --regexp "python -m jacpt.cli ${stage} +wandb.mode=disabled"
  done
  run kmake -n demo INTERACTIVE=1
  assert_output --regexp 'jacpt.cli demo --interactive'
}

@test "bin/setup --help and an unknown option" {
  run "${KIT_ROOT}/bin/setup" --help
  assert_success
  assert_line --index 0 --partial 'Summary: install what the kit needs'
  run "${KIT_ROOT}/bin/setup" --bogus
  assert_failure 2
  assert_output --partial 'unknown option: --bogus'
  run "${KIT_ROOT}/bin/setup" --python /no/such/python3
  assert_failure 1
  assert_output --partial '/no/such/python3 not found'
}

@test "setup stamps are up to date after setup (idempotent)" {
  run kmake -q .stamps/setup
  assert_success
}

@test "every stage runs its own preflight first, with the overrides, except in a dry run" {
  local stage
  for stage in data import cpt lora export demo eval; do
    run kmake -n "$stage" PROFILE=h100-80g OVERRIDES='wandb.mode=disabled'
    assert_success
    assert_output --regexp "jacpt.cli preflight --stage ${stage} +wandb.mode=disabled +>&2 && .*jacpt.cli ${stage} "
    run kmake -n "$stage" DRY_RUN=1
    assert_success
    refute_output --partial 'preflight'
  done
  run kmake -n preflight
  assert_success
  assert_output --regexp 'jacpt.cli preflight *$'
  refute_output --partial -- '--stage'
}

@test "a stage stops at a failed preflight, which names the fix, before the stage runs" {
  export JACPT_RUNS_DIR=${WORK}/runs
  run kmake cpt PROFILE=tiny-cpu
  assert_failure
  assert_output --partial "${JACPT_DATA_DIR}/tiny-cpu/data_manifest.json missing: make cpt reads the tokenised data; run make data PROFILE=tiny-cpu first"
  assert_output --partial 'FAIL  preflight  not ready for make cpt PROFILE=tiny-cpu: fix the FAIL line above'
  refute_output --partial 'no data for profile' # the stage's own error: it never started
  [[ ! -e ${JACPT_RUNS_DIR} ]]
}
