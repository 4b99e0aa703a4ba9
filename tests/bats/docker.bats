#!/usr/bin/env bats
# bin/docker-build and bin/docker-run: the exact engine argv, GPUs, podman, secrets by name, the
# errors that name the fix, DRY_RUN, and the Makefile wiring. Hermetic: the scripts run from a copy
# of bin/ in a temp kit root, against a fake docker/podman that records its argv one arg a line.

bats_require_minimum_version 1.5.0

setup() {
  load test_helper/common
  common_setup
  unset DOCKER IMAGE NEMO_IMAGE GPUS SHM_SIZE DRY_RUN PROFILE WANDB_API_KEY HF_TOKEN SHARDS MBS OVERRIDES
  KIT=${WORK}/kit
  mkdir -p "${KIT}/bin"
  cp "${KIT_ROOT}/bin/docker-run" "${KIT_ROOT}/bin/docker-build" "${KIT_ROOT}/bin/lib.sh" "${KIT}/bin/"
  ARGV_LOG=${BATS_TEST_TMPDIR}/engine.argv
  export ARGV_LOG
  cat >"${FAKE_BIN}/docker" <<'FAKE'
#!/usr/bin/env bash
# Fake engine: `info` prints $FAKE_RUNTIMES (or fails with FAKE_DAEMON_DOWN=1), `image inspect`
# fails with FAKE_NO_IMAGE=1; anything else records cwd and argv (one arg a line) to $ARGV_LOG.
case "$1" in
  info)
    [[ -z ${FAKE_DAEMON_DOWN:-} ]] || { echo "Cannot connect to the Docker daemon at unix:///var/run/docker.sock." >&2; exit 1; }
    runtimes='{"io.containerd.runc.v2":{},"nvidia":{"path":"nvidia-container-runtime"},"runc":{}}'
    printf '%s\n' "${FAKE_RUNTIMES-$runtimes}" ;;
  image) [[ -z ${FAKE_NO_IMAGE:-} ]] ;;
  *) { echo "cwd=$PWD"; basename "$0"; printf '%s\n' "$@"; } >"$ARGV_LOG"; echo "engine ran: $1" ;;
esac
FAKE
  chmod +x "${FAKE_BIN}/docker"
  cp "${FAKE_BIN}/docker" "${FAKE_BIN}/podman"
}

teardown() {
  common_teardown
}

drun() { "${KIT}/bin/docker-run" "$@" </dev/null; }

# The argv every `run` shares after the GPU flags, one arg a line (ENGINE, then flags up to the image).
common_args() {
  printf '%s\n' --ipc=host --shm-size=16g --ulimit memlock=-1 --ulimit stack=67108864
  if [[ $1 == podman ]]; then
    echo --security-opt=label=disable
    [[ $(id -u) == 0 ]] || echo --userns=keep-id
  fi
  printf '%s\n' --user "$(id -u):$(id -g)" -v "${KIT}:/workspace" -w /workspace \
    -e HOME=/workspace/.cache/home -e HF_HOME=/workspace/.cache/huggingface \
    -e NEMO_HOME=/workspace/.cache/nemo -e NEMORUN_HOME=/workspace/.cache/nemo_run \
    -e WANDB_DIR=/workspace/.cache/wandb
}

assert_argv() { # EXPECTED (one arg a line): the recorded argv, after the cwd line
  run diff <(printf '%s\n' "$1") <(tail -n +2 "$ARGV_LOG")
  assert_success
}

@test "docker-run -h prints the header; an unknown option is a usage error" {
  run drun -h
  assert_success
  assert_line --index 0 --partial 'Summary: run a command in the kit'
  assert_output --partial 'GPUS=all|N|none'
  run drun --bogus
  assert_failure 2
  assert_output --partial 'unknown option: --bogus'
}

@test "docker-run with no command: an interactive shell, all GPUs, kit at /workspace, caches created" {
  run drun
  assert_success
  assert_argv "$(printf '%s\n' docker run --rm -i --gpus all; common_args docker; echo jacpt:25.04; echo bash)"
  for c in home huggingface nemo nemo_run wandb; do [[ -d ${KIT}/.cache/$c ]]; done
}

@test "docker-run with a command (make docker-run CMD=...), PROFILE and knobs forwarded by name" {
  export PROFILE=rtx6000ada-48g SHARDS=0-1 IMAGE=my/jacpt:dev SHM_SIZE=32g
  run drun bash -c 'make data cpt lora demo'
  assert_success
  local expected
  expected=$(printf '%s\n' docker run --rm -i --gpus all; common_args docker | sed 's/^--shm-size=16g$/--shm-size=32g/'
    printf '%s\n' -e PROFILE -e SHARDS my/jacpt:dev bash -c 'make data cpt lora demo')
  assert_argv "$expected"
}

@test "docker-run gives -it only when stdin is a terminal" {
  command -v script >/dev/null || skip "needs util-linux script for a pseudo-terminal"
  run script -qec "${KIT}/bin/docker-run" /dev/null
  assert_success
  run sed -n '5p' "$ARGV_LOG"
  assert_output -- '-it'
}

@test "GPUS=2 asks for 2 GPUs and sets the kit's launch.gpus; GPUS=none: no GPU flag and no runtime check" {
  GPUS=2 run drun
  assert_success
  assert_argv "$(printf '%s\n' docker run --rm -i --gpus 2; common_args docker; printf '%s\n' -e GPUS=2 jacpt:25.04 bash)"
  FAKE_RUNTIMES='{"runc":{}}' GPUS=none run drun
  assert_success
  assert_argv "$(printf '%s\n' docker run --rm -i; common_args docker; printf '%s\n' jacpt:25.04 bash)"
  GPUS=two run drun
  assert_failure
  assert_output --partial 'GPUS=two: use all, a count (1, 2, ...) or none'
}

@test "DOCKER=podman: CDI devices for GPUs, the same flags otherwise, no docker info" {
  DOCKER=podman FAKE_DAEMON_DOWN=1 run drun
  assert_success
  assert_argv "$(printf '%s\n' podman run --rm -i --device nvidia.com/gpu=all; common_args podman
    printf '%s\n' jacpt:25.04 bash)"
  DOCKER=podman GPUS=2 run drun make cpt
  assert_success
  assert_argv "$(printf '%s\n' podman run --rm -i --device nvidia.com/gpu=0 --device nvidia.com/gpu=1
    common_args podman; printf '%s\n' -e GPUS=2 jacpt:25.04 make cpt)"
}

@test "secrets: --env-file .env when it exists, -e NAME from the environment, never a value in argv or output" {
  run drun
  refute_line --partial -- '--env-file'
  run grep -cx -- '--env-file' "$ARGV_LOG"
  assert_output 0
  printf 'WANDB_API_KEY=file-secret-0123456789\n' >"${KIT}/.env"
  export HF_TOKEN=hf_env_secret_9876543210
  run drun
  assert_success
  refute_output --partial 'secret'
  run grep -c 'secret' "$ARGV_LOG"
  assert_output 0
  run grep -A1 -x -- '--env-file' "$ARGV_LOG"
  assert_output "$(printf '%s\n' --env-file "${KIT}/.env")"
  run grep -A1 -x -- '-e' "$ARGV_LOG"
  assert_line 'HF_TOKEN'
  refute_line 'WANDB_API_KEY' # set in .env only: --env-file carries it
  WANDB_API_KEY=env-secret-5555 DRY_RUN=1 run drun
  assert_success
  assert_output --partial ' -e WANDB_API_KEY -e HF_TOKEN '
  refute_output --partial 'secret'
}

@test "no docker on PATH: fails naming the fix; DOCKER=podman likewise" {
  local bin=${BATS_TEST_TMPDIR}/minbin t
  mkdir -p "$bin"
  for t in bash dirname basename id mkdir sed; do ln -s "$(command -v "$t")" "${bin}/$t"; done
  PATH=$bin run drun
  assert_failure 1
  assert_output --partial 'docker not found on PATH: install Docker Engine'
  assert_output --partial 'or set DOCKER=podman'
  PATH=$bin DOCKER=podman run drun
  assert_failure 1
  assert_output --partial 'podman not found on PATH: install podman'
  PATH=$bin run "${KIT}/bin/docker-build"
  assert_failure 1
  assert_output --partial 'docker not found on PATH'
  [[ ! -e $ARGV_LOG ]]
}

@test "GPUs requested without the nvidia runtime, daemon down, or no image: each fails with its fix" {
  FAKE_RUNTIMES='{"io.containerd.runc.v2":{},"runc":{}}' run drun
  assert_failure 1
  assert_output --partial "GPUS=all but 'docker info' shows no nvidia runtime"
  assert_output --partial 'install nvidia-container-toolkit'
  assert_output --partial 'GPUS=none for a CPU rehearsal'
  FAKE_DAEMON_DOWN=1 run drun
  assert_failure 1
  assert_output --partial "'docker info' failed (Cannot connect to the Docker daemon"
  FAKE_NO_IMAGE=1 run drun
  assert_failure 1
  assert_output --partial "image jacpt:25.04 not found: build it with 'make docker-build'"
  [[ ! -e $ARGV_LOG ]]
}

@test "DRY_RUN=1 prints the exact argv as one shell-quoted line, runs nothing, writes nothing" {
  DRY_RUN=1 run drun bash -c 'make data && make cpt'
  assert_success
  assert_equal "${#lines[@]}" 1
  local -a parsed
  eval "parsed=(${output})"
  run diff <(printf '%s\n' "${parsed[@]}") \
    <(printf '%s\n' docker run --rm -i --gpus all; common_args docker; printf '%s\n' jacpt:25.04 bash -c 'make data && make cpt')
  assert_success
  [[ ! -e $ARGV_LOG && ! -e ${KIT}/.cache ]]
  DRY_RUN=1 run "${KIT}/bin/docker-build"
  assert_success
  assert_output 'docker build -f docker/Dockerfile -t jacpt:25.04 --build-arg NEMO_IMAGE=nvcr.io/nvidia/nemo:25.04 docker'
  [[ ! -e $ARGV_LOG ]]
}

@test "docker-build: the exact build command, run from the kit root, IMAGE and NEMO_IMAGE honoured" {
  run "${KIT}/bin/docker-build"
  assert_success
  run cat "$ARGV_LOG"
  assert_output "$(printf '%s\n' "cwd=${KIT}" docker build -f docker/Dockerfile -t jacpt:25.04 \
    --build-arg NEMO_IMAGE=nvcr.io/nvidia/nemo:25.04 docker)"
  IMAGE=me/jacpt:1 NEMO_IMAGE=nvcr.io/nvidia/nemo:25.04.01 DOCKER=podman run "${KIT}/bin/docker-build"
  assert_success
  run cat "$ARGV_LOG"
  assert_output "$(printf '%s\n' "cwd=${KIT}" podman build -f docker/Dockerfile -t me/jacpt:1 \
    --build-arg NEMO_IMAGE=nvcr.io/nvidia/nemo:25.04.01 docker)"
  run "${KIT}/bin/docker-build" --help
  assert_success
  assert_line --index 0 --partial 'Summary: build the kit'
}

@test "make docker-build / docker-run: wiring, CMD as one argument, help lists both (no venv needed)" {
  kmake() { make --no-print-directory -C "$KIT_ROOT" "$@"; }
  run kmake -n docker-build
  assert_success
  assert_output 'bin/docker-build'
  run kmake -n docker-run
  assert_success
  assert_output 'bin/docker-run '
  run kmake -n docker-run CMD="make data cpt lora demo"
  assert_success
  # shellcheck disable=SC2016 # the literal recipe text: the shell in the recipe expands $CMD
  assert_output 'bin/docker-run bash -c "$CMD"'
  run kmake docker-run DRY_RUN=1 CMD="make data cpt OVERRIDES='cpt.micro_batch_size=1 cpt.max_steps=5'"
  assert_success
  assert_output --partial " -v ${KIT_ROOT}:/workspace -w /workspace "
  local -a parsed
  eval "parsed=(${output})"
  assert_equal "${parsed[-3]} ${parsed[-2]}" "bash -c"
  assert_equal "${parsed[-1]}" "make data cpt OVERRIDES='cpt.micro_batch_size=1 cpt.max_steps=5'"
  run kmake help
  assert_line --regexp '^  docker-build +build the image'
  assert_line --regexp '^  docker-run +a shell in the container'
}
