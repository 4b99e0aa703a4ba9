"""jacpt.launch: NeMo-Run executors, dry-run renderings and real local launches of a trivial task.

The tasks are the module-level functions below; the child process imports this module
by name (tests/py goes on its PYTHONPATH), so they must stay importable and cheap.
"""

from __future__ import annotations

import os
import re
import shlex
import sys
from pathlib import Path

import pytest

from jacpt import config, paths

run = pytest.importorskip("nemo_run", reason="needs nemo_run (make setup)")

from jacpt import launch  # noqa: E402  (after the skip: launch needs nemo_run)

HERE = Path(__file__).resolve().parent


def write_marker(path: str, x: int) -> None:
    """The trivial task: proves it ran, and where."""
    Path(path).write_text(f"x={x} pid={os.getpid()} py={os.environ.get('PYTHONPATH', '')}", encoding="utf-8")


def fail_loudly(message: str) -> None:
    raise ValueError(message)


@pytest.fixture
def nr_home(tmp_path, monkeypatch) -> Path:
    """A private NEMORUN_HOME; NeMo-Run's import-time copies of it are restored afterwards."""
    import nemo_run.config as nr_config
    from nemo_run.run.torchx_backend.schedulers import local as local_sched
    from nemo_run.run.torchx_backend.schedulers import slurm as slurm_sched

    home = tmp_path / "nemorun"
    monkeypatch.setenv("NEMORUN_HOME", str(home))
    monkeypatch.setattr(nr_config, "_NEMORUN_HOME", nr_config.get_nemorun_home())
    monkeypatch.setattr(local_sched, "LOCAL_JOB_DIRS", local_sched.LOCAL_JOB_DIRS)
    monkeypatch.setattr(slurm_sched, "SLURM_JOB_DIRS", slurm_sched.SLURM_JOB_DIRS)
    for var in ("JACPT_DATA_DIR", "JACPT_ASSETS_DIR"):
        monkeypatch.setenv(var, str(tmp_path / var.lower()))
    return home


def cfg_of(*overrides: str) -> config.Config:
    return config.load("tiny-cpu", overrides=list(overrides), env={})


SLURM = ("launch.executor=slurm", "slurm.account=proj_llm", "slurm.partition=gpu-h100", "launch.nodes=2",
         "launch.gpus=4", "slurm.time=03:30:00", "slurm.container_image=nvcr.io/nvidia/nemo:25.04",
         "slurm.container_mounts=/lustre/ds:/lustre/ds, /scratch/hf:/root/.cache/huggingface")


def sbatch_flags(script: str) -> dict[str, str]:
    return dict(re.findall(r"^#SBATCH --([\w-]+)=(.*)$", script, flags=re.M))


def srun_line(script: str) -> list[str]:
    (line,) = [ln for ln in script.splitlines() if ln.startswith("srun ") and "--container-image" in ln]
    return shlex.split(line)


# --- executors -------------------------------------------------------------------


def test_local_executor_one_gpu_has_no_launcher_and_forwards_env(nr_home, tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", "/from-shell")
    ex = launch.build_executor(cfg_of(), tmp_path / "run", {"FOO": "bar", "PYTHONPATH": "/elsewhere"})
    assert isinstance(ex, run.LocalExecutor)
    assert ex.ntasks_per_node == 1 and ex.launcher is None
    assert ex.env_vars["FOO"] == "bar" and ex.env_vars["PYTHONUNBUFFERED"] == "1"
    assert ex.env_vars["PYTHONPATH"].split(os.pathsep) == [str(paths.KIT_ROOT / "py"), "/elsewhere", "/from-shell"]
    assert ex.env_vars["PATH"].split(os.pathsep)[0] == os.path.dirname(sys.executable)


def test_local_with_several_nodes_is_an_error(nr_home, tmp_path):
    with pytest.raises(config.ConfigError, match="launch.nodes=2 needs launch.executor=slurm"):
        launch.build_executor(cfg_of("launch.nodes=2"), tmp_path, {})


@pytest.mark.parametrize("missing, env", [("slurm.account", "JACPT_SLURM_ACCOUNT"),
                                          ("slurm.partition", "JACPT_SLURM_PARTITION")])
def test_slurm_without_account_or_partition_names_the_setting(nr_home, tmp_path, missing, env):
    cfg = cfg_of(*SLURM, f"{missing}=")
    with pytest.raises(config.ConfigError, match=rf"{missing}.*{env}"):
        launch.launch(run.Partial(write_marker, path="x", x=1), cfg, tmp_path / "run", "cpt", {}, dry_run=True)
    assert not (tmp_path / "run").exists(), "nothing may be rendered before the settings are checked"


def test_bad_extra_mount_is_an_error(nr_home, tmp_path):
    with pytest.raises(config.ConfigError, match="JACPT_SLURM_MOUNTS"):
        launch.build_executor(cfg_of(*SLURM, "slurm.container_mounts=/only-one-path"), tmp_path, {})


# --- dry runs ----------------------------------------------------------------------


def test_local_dry_run_one_gpu_is_a_plain_python_child(nr_home, tmp_path):
    run_dir = tmp_path / "run"
    res = launch.launch(run.Partial(write_marker, path=str(tmp_path / "m"), x=1), cfg_of(), run_dir,
                        "cpt-tiny", {"FOO": "bar"}, dry_run=True)
    text = (run_dir / "launch.txt").read_text()
    assert res["launch_txt"] == str(run_dir / "launch.txt") and res["executor"] == "local"
    assert shlex.split(res["command"])[:3] == ["python", "-m", "nemo_run.core.runners.fdl_runner"]
    assert "torchrun" not in text
    assert f"export PYTHONPATH={shlex.quote(str(paths.KIT_ROOT / 'py'))}" in text
    assert "export FOO=bar" in text and "export PYTHONUNBUFFERED=1" in text
    assert not (tmp_path / "m").exists(), "a dry run starts nothing"
    # the serialized task the command names exists, under NEMORUN_HOME
    cfg_file = shlex.split(res["command"])[-1]
    assert Path(cfg_file).is_file() and str(nr_home) in cfg_file


def test_local_dry_run_two_gpus_uses_torchrun(nr_home, tmp_path):
    res = launch.launch(run.Partial(write_marker, path="m", x=1), cfg_of("launch.gpus=2"), tmp_path / "run",
                        "cpt-tiny", {}, dry_run=True)
    argv = shlex.split(res["command"])
    assert argv[0] == "torchrun"
    assert argv[argv.index("--nproc-per-node") + 1] == "2" and argv[argv.index("--nnodes") + 1] == "1"
    assert argv[argv.index("-m") + 1] == "nemo_run.core.runners.fdl_runner"
    assert res["command"] in (tmp_path / "run" / "launch.txt").read_text()


def test_slurm_dry_run_renders_the_sbatch_script(nr_home, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", "/from-shell")
    run_dir = tmp_path / "run"
    res = launch.launch(run.Partial(write_marker, path="m", x=1), cfg_of(*SLURM), run_dir, "cpt-h100",
                        {"WANDB_MODE": "offline"}, dry_run=True)
    script = (run_dir / "sbatch.sh").read_text()
    assert res["sbatch_sh"] == str(run_dir / "sbatch.sh") and res["executor"] == "slurm"
    flags = sbatch_flags(script)
    assert flags["account"] == "proj_llm" and flags["partition"] == "gpu-h100"
    assert flags["nodes"] == "2" and flags["ntasks-per-node"] == "4" and flags["gpus-per-node"] == "4"
    assert flags["time"] == "03:30:00" and flags["job-name"] == "jacpt-cpt-h100"

    srun = srun_line(script)
    assert srun[srun.index("--container-image") + 1] == "nvcr.io/nvidia/nemo:25.04"
    mounts = srun[srun.index("--container-mounts") + 1].split(",")
    assert f"{paths.KIT_ROOT}:{paths.KIT_ROOT}" == mounts[0]
    assert "/lustre/ds:/lustre/ds" in mounts and "/scratch/hf:/root/.cache/huggingface" in mounts
    assert f"{run_dir}:{run_dir}" in mounts  # outside the kit root: mounted at the same path
    assert srun[-2:] == ["bash", "/nemo_run/scripts/cpt-h100.sh"]

    assert "export PYTHONUNBUFFERED=1" in script and "export WANDB_MODE=offline" in script
    assert f"export PYTHONPATH={paths.KIT_ROOT / 'py'}\n" in script  # not the host's PYTHONPATH
    # the per-task wrapper keeps the image's PYTHONPATH and puts the kit's first
    wrapper = (Path(res["job_dir"]) / "scripts" / "cpt-h100.sh").read_text()
    assert f"export PYTHONPATH={paths.KIT_ROOT / 'py'}${{PYTHONPATH:+:$PYTHONPATH}}" in wrapper
    assert "exec python -m nemo_run.core.runners.fdl_runner -n cpt-h100 /nemo_run/configs/" in wrapper

    text = (run_dir / "launch.txt").read_text()
    assert res["command"].startswith("sbatch --requeue --parsable ") and res["command"] in text
    assert Path(shlex.split(res["command"])[-1]).read_text() == script  # the file sbatch would get
    assert Path(shlex.split(res["command"])[-1]).is_relative_to(run_dir / "slurm")
    out = capsys.readouterr()
    assert out.out == "" and "[jacpt] dry run: wrote" in out.err


def test_slurm_job_dir_setting_moves_nemo_run_files(nr_home, tmp_path):
    res = launch.launch(run.Partial(write_marker, path="m", x=1), cfg_of(*SLURM, f"slurm.job_dir={tmp_path / 'jobs'}"),
                        tmp_path / "run", "cpt", {}, dry_run=True)
    assert Path(res["job_dir"]).is_relative_to(tmp_path / "jobs" / "experiments")


# --- real local launches -------------------------------------------------------------


def test_local_launch_runs_the_task_in_a_child(nr_home, tmp_path, capsys):
    marker = tmp_path / "ran.txt"
    res = launch.launch(run.Partial(write_marker, path=str(marker), x=7), cfg_of(), tmp_path / "run", "tiny",
                        {"PYTHONPATH": str(HERE)}, dry_run=False)
    body = marker.read_text()
    assert body.startswith("x=7 ") and f"pid={os.getpid()} " not in body
    assert f"py={paths.KIT_ROOT / 'py'}{os.pathsep}{HERE}" in body
    assert res["state"] == "SUCCEEDED" and Path(res["log"]).is_file()
    assert capsys.readouterr().out == ""


def test_failing_task_raises_naming_the_log(nr_home, tmp_path):
    with pytest.raises(RuntimeError, match=r"ended FAILED.*log: .*combined\.log") as err:
        launch.launch(run.Partial(fail_loudly, message="boom-7f3a"), cfg_of(), tmp_path / "run", "tiny",
                      {"PYTHONPATH": str(HERE)}, dry_run=False)
    log_path = Path(re.search(r"log: (\S+)", str(err.value)).group(1))
    assert "ValueError: boom-7f3a" in log_path.read_text()
    assert "boom-7f3a" in str(err.value)  # the tail of the log is in the message
