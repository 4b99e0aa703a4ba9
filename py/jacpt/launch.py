"""Start a stage's task through NeMo-Run: a child process here, or an sbatch job on Slurm.

The stage commands (`jacpt cpt`, `jacpt lora`) build a ``run.Partial`` and call
``launch(task, cfg, run_dir, name, env_vars, dry_run)``. Settings (`jacpt config`):

* ``launch.executor=local``: ``run.LocalExecutor``; one child process with
  ``launch.gpus=1``, ``torchrun --nproc-per-node=<gpus>`` otherwise. Training never
  runs in this process (``run.run(..., direct=True)``): a child gets a clean
  interpreter and CUDA state, and NeMo issue #11756 (import in the same process).
* ``launch.executor=slurm``: ``run.SlurmExecutor`` through a ``run.LocalTunnel``
  (sbatch runs on this host, a login node). One srun task per GPU
  (``--ntasks-per-node=<gpus>``, no torchrun): Lightning reads the ranks from
  Slurm, as NeMo's own Slurm examples do. The kit root is mounted at the same
  absolute path in the container (LoRA checkpoints record the base checkpoint's
  absolute path), and so are the run, data and assets dirs when they lie outside it.

``dry_run=True`` renders everything NeMo-Run would start, through the calls a
real launch makes (``package`` -> ``Runner.dryrun``), and writes
``<run_dir>/launch.txt`` (and for Slurm ``<run_dir>/sbatch.sh``, the script
sbatch would get); nothing is started or submitted.

Two NeMo-Run 0.4.0 habits a caller must know:

* It reads ``NEMORUN_HOME`` once, at import (``from nemo.collections import llm``
  imports it). Set it before; ``launch`` re-applies a later value and creates the dir.
* ``Experiment`` saves the source of the caller's ``__main__`` module and the child
  executes it before the task (``maybe_load_external_main``): every entry script
  needs ``if __name__ == "__main__":`` or the child re-runs it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shlex
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from jacpt import log
from jacpt import paths
from jacpt.config import Config, ConfigError

if TYPE_CHECKING:  # nemo_run is imported late: it fixes NEMORUN_HOME at import (see above)
    import nemo_run as run

PY_DIR = paths.KIT_ROOT / "py"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")  # names a Slurm job, a dir and an sbatch line unquoted

# Runs inside the container before the task: the image's own PYTHONPATH (pyxis gives
# an image's variables precedence over the exported host ones) plus the kit's py dir.
_SLURM_WRAPPER = "export PYTHONPATH={{ py_dir | safe }}${PYTHONPATH:+:$PYTHONPATH}\nexec {{ command | safe }}\n"



def child_env(env_vars: dict[str, str], executor: str) -> dict[str, str]:
    """The caller's variables plus PYTHONPATH (the kit's py dir first) and PYTHONUNBUFFERED=1.

    A local child inherits this shell's environment, so this shell's PYTHONPATH follows
    the caller's, and PATH starts with this interpreter's dir (NeMo-Run starts `python` /
    `torchrun` by name). On Slurm the host's PYTHONPATH and PATH mean nothing in the container.
    """
    env = dict(env_vars)
    parts = [str(PY_DIR), *env.get("PYTHONPATH", "").split(os.pathsep)]
    if executor == "local":
        parts += os.environ.get("PYTHONPATH", "").split(os.pathsep)
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(p for p in parts if p))  # in order, no repeats
    env["PYTHONUNBUFFERED"] = "1"
    if executor == "local":
        bin_dir = os.path.dirname(sys.executable)  # not resolved: a venv's bin/python is a symlink
        env["PATH"] = os.pathsep.join(p for p in (bin_dir, env.get("PATH", "")) if p)
    return env


def slurm_dir(cfg: Config, run_dir: Path) -> Path:
    """Where NeMo-Run keeps the sbatch scripts, task configs and job logs: slurm.job_dir or <run_dir>/slurm."""
    return paths.resolve(cfg["slurm.job_dir"]) if cfg["slurm.job_dir"] else Path(run_dir).resolve() / "slurm"


def _check_slurm(cfg: Config) -> None:
    missing = [(k, env) for k, env in (("slurm.account", "JACPT_SLURM_ACCOUNT"),
                                        ("slurm.partition", "JACPT_SLURM_PARTITION")) if not cfg[k].strip()]
    if missing:
        fixes = " and ".join(f"{env}=<{k.split('.')[1]}> (or {k}=<{k.split('.')[1]}>)" for k, env in missing)
        names = ", ".join(k for k, _ in missing)
        raise ConfigError(f"launch.executor=slurm needs {names}: set {fixes}; `sacctmgr -n show assoc user=$USER "
                          f"format=account,partition` lists yours")


def container_mounts(cfg: Config, run_dir: Path) -> list[str]:
    """The kit root at the same path, the extra slurm.container_mounts, then the run, data and
    assets dirs at the same path unless a same-path mount already covers them."""
    mounts = [f"{paths.KIT_ROOT}:{paths.KIT_ROOT}"]
    for item in cfg["slurm.container_mounts"].split(","):
        item = item.strip()
        if not item:
            continue
        src, sep, dst = item.partition(":")
        if not sep or not src or not dst:
            raise ConfigError(f"slurm.container_mounts: {item!r} is not SRC:DST[:FLAGS]; "
                              f"write e.g. JACPT_SLURM_MOUNTS=/lustre/data:/lustre/data")
        if item not in mounts:
            mounts.append(item)
    same_path = [Path(m.split(":")[0]) for m in mounts if m.split(":")[0] == m.split(":")[1]]
    for p in (Path(run_dir).resolve(), paths.data_dir(), paths.assets_dir()):
        if not any(p == s or s in p.parents for s in same_path):
            mounts.append(f"{p}:{p}")
            same_path.append(p)
            log(f"slurm: also mounting {p} at the same path (outside the kit root)")
    return mounts


def build_executor(cfg: Config, run_dir: Path, env_vars: dict[str, str]) -> run.Executor:
    """The NeMo-Run executor for cfg's launch.* and slurm.* settings (nothing is started)."""
    import nemo_run as run

    kind, gpus, nodes = cfg["launch.executor"], cfg["launch.gpus"], cfg["launch.nodes"]
    if kind == "local":
        if nodes != 1:
            raise ConfigError(f"launch.nodes={nodes} needs launch.executor=slurm (EXECUTOR=slurm); "
                              f"a local run uses this machine only")
        return run.LocalExecutor(ntasks_per_node=gpus, launcher="torchrun" if gpus > 1 else None,
                                 env_vars=child_env(env_vars, "local"))
    _check_slurm(cfg)
    return run.SlurmExecutor(
        account=cfg["slurm.account"].strip(),
        partition=cfg["slurm.partition"].strip(),
        job_name_prefix="jacpt-",
        nodes=nodes,
        ntasks_per_node=gpus,  # one srun task per GPU; Lightning takes the ranks from Slurm
        gpus_per_node=gpus,
        time=cfg["slurm.time"],
        container_image=cfg["slurm.container_image"],
        container_mounts=container_mounts(cfg, run_dir),
        # LocalTunnel copies nothing (only SSHTunnel rsyncs), so its job dir must be where
        # the Experiment writes: <base_dir>/experiments (launch uses base_dir=slurm_dir).
        tunnel=run.LocalTunnel(job_dir=str(slurm_dir(cfg, run_dir) / "experiments")),
        # No code is shipped: the kit root is mounted and PYTHONPATH points into it (the
        # default GitArchivePackager would ship only committed files).
        packager=run.Packager(),
        launcher=run.SlurmTemplate(template_inline=_SLURM_WRAPPER, template_vars={"py_dir": shlex.quote(str(PY_DIR))}),
        env_vars=child_env(env_vars, "slurm"),
    )


def _nemorun_home() -> Path:
    """NeMo-Run's home (its job index; local experiments), made to follow $NEMORUN_HOME and created."""
    import nemo_run.config as nr_config

    want = os.environ.get("NEMORUN_HOME", "")
    if want and os.path.expanduser(want) != nr_config.get_nemorun_home():
        # nemo_run read NEMORUN_HOME at import, before the caller set it; the schedulers
        # copied it into module constants then too (NeMo-Run 0.4.0).
        from nemo_run.run.torchx_backend.schedulers import local as local_sched
        from nemo_run.run.torchx_backend.schedulers import slurm as slurm_sched

        nr_config.set_nemorun_home(want)
        local_sched.LOCAL_JOB_DIRS = os.path.join(nr_config.get_nemorun_home(), ".local_jobs.json")
        slurm_sched.SLURM_JOB_DIRS = os.path.join(nr_config.get_nemorun_home(), ".slurm_jobs")
    elif not want:
        log(f"NEMORUN_HOME is not set: NeMo-Run keeps its records in {nr_config.get_nemorun_home()}")
    home = Path(nr_config.get_nemorun_home())
    home.mkdir(parents=True, exist_ok=True)  # NeMo-Run 0.4.0 fails on a missing home (.local_jobs.json)
    return home


@contextlib.contextmanager
def _nemo_run_output() -> Iterator[None]:
    """NeMo-Run's console and tailed child logs go to stderr (stdout stays the caller's); the
    shell commands it runs through invoke (mkdir, sbatch) read no input from ours; and the
    root logger it takes over (`logging.basicConfig(force=True)`) is given back."""
    root = logging.getLogger()
    handlers, level, stdin = root.handlers[:], root.level, sys.stdin
    try:
        with open(os.devnull, encoding="utf-8") as devnull, contextlib.redirect_stdout(sys.stderr):
            sys.stdin = devnull
            yield
    finally:
        sys.stdin = stdin
        root.handlers[:] = handlers
        root.setLevel(level)


def _render(task: run.Partial, executor: run.Executor, base_dir: Path, exp_id: str, name: str):
    """What `Experiment.run` does before it starts anything (`Job.prepare` + `Runner.dryrun`):
    returns the assigned executor and torchx's AppDryRunInfo."""
    from nemo_run.run.torchx_backend.packaging import package
    from nemo_run.run.torchx_backend.runner import get_runner
    from nemo_run.run.torchx_backend.schedulers.api import get_executor_str

    title = exp_id.rpartition("_")[0]
    executor = executor.clone()
    executor.assign(exp_id, str(base_dir / "experiments" / title / exp_id), task_id=name, task_dir=name)
    executor.create_job_dir()
    app = package(name, task, executor=executor, serialize_to_file=True)
    with get_runner() as runner:
        info = runner.dryrun(app, get_executor_str(executor), cfg=executor)
    return executor, info


def _local_text(info, cfg: Config) -> tuple[str, str]:
    """launch.txt for a local run: the child's working dir, added environment and command line."""
    (replica,) = [r for params in info.request.role_params.values() for r in params]
    env = dict(replica.env)
    path = env.pop("PATH", "")
    command = shlex.join(replica.args)
    lines = [
        f"# jacpt launch (dry run, nothing was started): executor=local, gpus={cfg['launch.gpus']}",
        "# NeMo-Run 0.4.0 LocalExecutor starts this child process (torchx local scheduler) with this",
        "# shell's environment plus the variables below; its output goes to",
        f"#   {replica.combined or replica.stdout}  (the app id changes at a real launch)",
        f"cd {shlex.quote(replica.cwd or os.getcwd())}",
        *(f"export {k}={shlex.quote(v)}" for k, v in sorted(env.items())),
        f"export PATH={shlex.quote(path)}:\"$PATH\"" if path else "",
        command,
    ]
    return "\n".join(line for line in lines if line) + "\n", command


def _slurm_text(info, executor, cfg: Config) -> tuple[str, str, str]:
    """launch.txt and the sbatch script for a Slurm run (the script as NeMo-Run wrote it)."""
    req = info.request
    sbatch_path = Path(executor.experiment_dir) / f"{executor.job_name}_sbatch.sh"
    script = sbatch_path.read_text(encoding="utf-8")
    command = shlex.join([*req.cmd, str(Path(executor.tunnel.job_dir) / sbatch_path.name)])
    wrappers = sorted((Path(executor.job_dir) / "scripts").glob("*.sh"))
    lines = [
        f"# jacpt launch (dry run, nothing was submitted): executor=slurm, nodes={cfg['launch.nodes']}, "
        f"gpus per node={cfg['launch.gpus']}",
        "# NeMo-Run 0.4.0 SlurmExecutor (LocalTunnel: sbatch runs on this host) submits with:",
        command,
        f"# the script (copied to sbatch.sh beside this file) starts nodes x gpus = "
        f"{cfg['launch.nodes'] * cfg['launch.gpus']} srun tasks in {cfg['slurm.container_image']};",
        f"# {executor.job_dir} is mounted at /nemo_run and each task runs:",
        *(f"#   {line}" for w in wrappers for line in w.read_text(encoding="utf-8").splitlines()),
    ]
    return "\n".join(lines) + "\n", script, command


def _log_file(job_dir: Path) -> Path:
    """The newest log NeMo-Run wrote for a job: torchx's combined.log (local) or log-*.out (slurm)."""
    logs = [p for pat in ("**/combined.log", "log-*.out") for p in job_dir.glob(pat)]
    return max(logs, key=lambda p: p.stat().st_mtime) if logs else job_dir


def _tail(path: Path, n: int = 15) -> str:
    if not path.is_file():
        return ""
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()[-n:]
    return "\n".join("    " + line for line in lines)


def launch(task: run.Partial, cfg: Config, run_dir: Path, name: str, env_vars: dict[str, str],
           dry_run: bool) -> dict:
    """Run `task` through NeMo-Run as cfg's launch.* settings say; returns what was done.

    dry_run: render into <run_dir>/launch.txt (+ sbatch.sh for Slurm), start nothing.
    Otherwise wait for the task (local child or Slurm job) and raise RuntimeError, naming
    NeMo-Run's log, unless it succeeded. `name` names the NeMo-Run experiment, its task
    and the Slurm job (jacpt-<name>).

    Returns {executor, dry_run, name, experiment_id, experiment_dir, job_dir} plus
    {launch_txt, command[, sbatch_sh]} for a dry run or {state, log, handle} for a run.
    """
    if not _NAME_RE.match(name):
        raise ValueError(f"launch name {name!r}: use letters, digits, '.', '_' and '-' "
                         f"(it names a Slurm job and a dir)")
    run_dir = Path(run_dir).resolve()
    kind = cfg["launch.executor"]
    executor = build_executor(cfg, run_dir, env_vars)  # raises on missing slurm settings, before any file
    home = _nemorun_home()
    base_dir = slurm_dir(cfg, run_dir) if kind == "slurm" else home
    exp_id = f"{name}_{time.time_ns() // 1_000_000}"
    result: dict = {"executor": kind, "dry_run": dry_run, "name": name, "experiment_id": exp_id,
                    "experiment_dir": str(base_dir / "experiments" / name / exp_id)}

    if dry_run:
        run_dir.mkdir(parents=True, exist_ok=True)
        with _nemo_run_output():
            assigned, info = _render(task, executor, base_dir, exp_id, name)
        launch_txt = run_dir / "launch.txt"
        if kind == "local":
            text, command = _local_text(info, cfg)
        else:
            text, script, command = _slurm_text(info, assigned, cfg)
            sbatch_sh = run_dir / "sbatch.sh"
            sbatch_sh.write_text(script, encoding="utf-8")
            result["sbatch_sh"] = str(sbatch_sh)
            log(f"dry run: wrote {sbatch_sh}")
        launch_txt.write_text(text, encoding="utf-8")
        log(f"dry run: wrote {launch_txt}; would run: {command}")
        result.update(launch_txt=str(launch_txt), command=command, job_dir=assigned.job_dir)
        return result

    import nemo_run as run

    log(f"launch {name} on {kind} (gpus per node {cfg['launch.gpus']}, nodes {cfg['launch.nodes']}); "
        f"NeMo-Run experiment {result['experiment_dir']}")
    exp = None
    try:
        with _nemo_run_output():
            with run.Experiment(title=name, executor=executor, id=exp_id, base_dir=str(base_dir)) as exp:
                exp.add(task, name=name, tail_logs=True)
                exp.run()
            # leaving the context waited for the job (Experiment.__exit__)
    except KeyboardInterrupt:
        if exp is not None and exp.jobs and exp.jobs[0].launched:
            log(f"interrupted: cancelling {name} (the child runs in its own session and would go on)")
            with _nemo_run_output():
                exp.cancel(name)
        raise
    job = exp.jobs[0]
    job_dir = Path(job.executor.job_dir)
    log_path = _log_file(job_dir)
    state = getattr(job.state, "name", str(job.state))
    result.update(job_dir=str(job_dir), log=str(log_path), state=state, handle=job.handle)
    if state != "SUCCEEDED":
        tail = _tail(log_path)
        raise RuntimeError(f"{name} ended {state} ({kind}); NeMo-Run's log: {log_path}"
                           + (f"\n  last lines:\n{tail}" if tail else ""))
    log(f"{name} finished: {state}; log {log_path}")
    return result
