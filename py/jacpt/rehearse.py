"""Demo rehearsal: run a timed script of shell steps, check each one's budget and output, print a verdict.

A script is YAML (configs/rehearsal/*.yaml):

    total_budget_s: 600        # the slot, in seconds
    tolerance_s: 30            # how far over the slot still passes
    steps:
      - name: demo             # [A-Za-z0-9][A-Za-z0-9_.-]*, unique; names the log file
        run: make demo         # bash -c, from the kit root, PROFILE exported
        budget_s: 90           # the step fails when it takes longer
        expect: '/demo-[0-9-]+/COMPLETE\\.json$'   # regex (re.MULTILINE) that must match stdout+stderr

Each step's output goes to the console and to runs/<profile>/rehearse-<stamp>/<nn>-<name>.log. A failed
step (non-zero exit, expect not found, over budget) stops the rehearsal; later steps are "not run". The
rehearsal passes when every step passes and the total is at most total_budget_s + tolerance_s; only then is
COMPLETE.json written. rehearse.json and rehearse.md hold the table either way.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import yaml

from jacpt import paths, runs
from jacpt.fsutil import sha256_file, write_json_atomic, write_text_atomic

FORMAT = 1
TOP_KEYS = ("total_budget_s", "tolerance_s", "steps")
STEP_KEYS = ("name", "run", "budget_s", "expect")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
               "WANDB_MODE": "offline"}
# A new network namespace has its loopback down; torch.distributed (gloo/NCCL rendezvous on 127.0.0.1) needs it.
UNSHARE = ["unshare", "-rn", "bash", "-c", 'ip link set lo up && exec bash -c "$0"']


class RehearseError(Exception):
    """The script file is missing or invalid; the message names the file, the step and the fix."""


def default_script(profile: str) -> Path:
    """tiny-* profiles rehearse the whole CPU chain; real profiles the 10-minute GPU demo."""
    return paths.CONFIG_DIR / "rehearsal" / ("tiny.yaml" if profile.startswith("tiny") else "gpu.yaml")


def _number(v, where: str, key: str, minimum_exclusive: bool = True) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise RehearseError(f"{where}: {key} = {v!r} is not a number of seconds")
    if (v <= 0) if minimum_exclusive else (v < 0):
        raise RehearseError(f"{where}: {key} = {v!r} must be {'> 0' if minimum_exclusive else '>= 0'}")
    return float(v)


def load_script(path: str | Path) -> dict:
    """Read and validate a rehearsal script strictly; raise RehearseError naming file and step."""
    path = Path(path)
    if not path.is_file():
        raise RehearseError(f"{path}: no such rehearsal script (the kit's are in {paths.CONFIG_DIR / 'rehearsal'})")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise RehearseError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise RehearseError(f"{path}: expected a mapping with keys {', '.join(TOP_KEYS)}")
    unknown = sorted(set(raw) - set(TOP_KEYS), key=str)
    if unknown:
        raise RehearseError(f"{path}: unknown key(s) {', '.join(map(repr, unknown))}; allowed: {', '.join(TOP_KEYS)}")
    missing = [k for k in TOP_KEYS if k not in raw]
    if missing:
        raise RehearseError(f"{path}: missing key(s) {', '.join(missing)}")
    total = _number(raw["total_budget_s"], str(path), "total_budget_s")
    tolerance = _number(raw["tolerance_s"], str(path), "tolerance_s", minimum_exclusive=False)
    if not isinstance(raw["steps"], list) or not raw["steps"]:
        raise RehearseError(f"{path}: steps must be a non-empty list of {{{', '.join(STEP_KEYS)}}} mappings")
    steps, seen = [], set()
    for i, s in enumerate(raw["steps"], 1):
        where = f"{path}: step {i}"
        if not isinstance(s, dict):
            raise RehearseError(f"{where}: expected a mapping with keys {', '.join(STEP_KEYS)}, got {s!r}")
        if isinstance(s.get("name"), str):
            where += f" ({s['name']!r})"
        unknown = sorted(set(s) - set(STEP_KEYS), key=str)
        if unknown:
            raise RehearseError(f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; "
                                f"allowed: {', '.join(STEP_KEYS)}")
        missing = [k for k in STEP_KEYS if k not in s]
        if missing:
            raise RehearseError(f"{where}: missing key(s) {', '.join(missing)}")
        name = s["name"]
        if not isinstance(name, str) or not NAME_RE.match(name):
            raise RehearseError(f"{where}: name {name!r} must match {NAME_RE.pattern} (it names the log file)")
        if name in seen:
            raise RehearseError(f"{where}: name {name!r} is used twice; step names must be unique")
        seen.add(name)
        for k in ("run", "expect"):
            if not isinstance(s[k], str) or not s[k].strip():
                raise RehearseError(f"{where}: {k} must be a non-empty string")
        try:
            re.compile(s["expect"], re.MULTILINE)
        except re.error as e:
            raise RehearseError(f"{where}: expect {s['expect']!r} is not a valid regex: {e}") from None
        steps.append({"name": name, "run": s["run"], "budget_s": _number(s["budget_s"], where, "budget_s"),
                      "expect": s["expect"]})
    return {"path": str(path), "total_budget_s": total, "tolerance_s": tolerance, "steps": steps}


def isolation_available() -> bool:
    """Can this box put a step in its own network namespace, unprivileged, with loopback up?"""
    if sys.platform != "linux" or not shutil.which("unshare") or not shutil.which("ip"):
        return False
    try:
        return subprocess.run([*UNSHARE, "true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def mmss(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 60}:{s % 60:02d}"


def _run_step(step: dict, nn: int, run_dir: Path, env: dict, isolate: bool) -> dict:
    """Run one step, tee its output to the console and its log; return its record."""
    log_path = run_dir / f"{nn:02d}-{step['name']}.log"
    argv = [*UNSHARE, step["run"]] if isolate else ["bash", "-c", step["run"]]
    print(f"\n=== [{nn:02d}] {step['name']} (budget {mmss(step['budget_s'])}): {step['run']}", flush=True)
    chunks: list[str] = []
    start = time.monotonic()
    with open(log_path, "w", encoding="utf-8") as log:
        proc = subprocess.Popen(argv, cwd=paths.KIT_ROOT, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            for raw in iter(proc.stdout.readline, b""):
                line = raw.decode("utf-8", errors="replace")
                sys.stdout.write(line)
                sys.stdout.flush()
                log.write(line)
                chunks.append(line)
            rc = proc.wait()
        finally:
            if proc.poll() is None:  # interrupted (Ctrl-C): do not leave the step running
                proc.kill()
                proc.wait()
    actual = time.monotonic() - start
    problems = []
    if rc != 0:
        problems.append(f"exit {rc}")
    if not re.search(step["expect"], "".join(chunks), re.MULTILINE):
        problems.append(f"missing expect /{step['expect']}/")
    if actual > step["budget_s"]:
        problems.append(f"over budget by {actual - step['budget_s']:.1f} s")
    return {**step, "n": nn, "log": log_path.name, "exit_code": rc, "actual_s": round(actual, 3),
            "status": "pass" if not problems else "FAIL: " + "; ".join(problems)}


def render_table(doc: dict) -> str:
    rows = ["| # | step | budget | actual | status |", "| --- | --- | ---: | ---: | --- |"]
    for r in doc["steps"]:
        actual = mmss(r["actual_s"]) if r.get("actual_s") is not None else "-"
        rows.append(f"| {r['n']:02d} | {r['name']} | {mmss(r['budget_s'])} | {actual} | {r['status']} |")
    rows.append(f"| | **total** | {mmss(doc['total_budget_s'])} ± {mmss(doc['tolerance_s'])} | "
                f"{mmss(doc['total_s'])} | {doc['total_status']} |")
    verdict = "PASS" if doc["passed"] else "FAIL"
    return "\n".join(rows) + f"\n\nrehearsal {verdict}: {doc['summary']}"


def rehearse_stage(cfg, dry_run: bool, offline: bool, script: Path | None) -> int:
    """Run the rehearsal script (default: default_script(cfg.profile)); return the exit code (0: passed)."""
    path = Path(script) if script is not None else default_script(cfg.profile)
    spec = load_script(path)
    isolate = offline and isolation_available()
    if not offline:
        network = "allowed"
    elif isolate:
        network = "off: HF/wandb offline env vars, each step in its own network namespace (unshare -rn)"
    else:
        network = ("offline env vars only (HF_HUB_OFFLINE, TRANSFORMERS_OFFLINE, HF_DATASETS_OFFLINE, "
                   "WANDB_MODE=offline); best-effort: `unshare -rn` is not usable here, so the network is not cut")
    started = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    # Every rehearsal runs again: a nonce in the key, so open_run never finds one "done" or resumes it.
    key = {"nonce": f"{started}-{secrets.token_hex(4)}", "format": FORMAT}
    inputs = {"script": str(path.resolve()), "script_sha256": sha256_file(path), "offline": offline,
              "network_isolation": isolate}
    run, _ = runs.open_run(cfg, "rehearse", key, inputs=inputs, dry_run=dry_run)

    budget_sum = sum(s["budget_s"] for s in spec["steps"])
    head = (f"# rehearsal {path} on profile {cfg.profile}: {len(spec['steps'])} steps, step budgets sum to "
            f"{mmss(budget_sum)}, slot {mmss(spec['total_budget_s'])} ± {mmss(spec['tolerance_s'])}\n"
            f"# network: {network}\n# run dir: {run.dir}")
    if dry_run:
        w = max(len(s["name"]) for s in spec["steps"])
        lines = [head] + [f"{i:02d}  {s['name']:<{w}}  {mmss(s['budget_s']):>5}  {s['run']}    # expect: {s['expect']}"
                          for i, s in enumerate(spec["steps"], 1)]
        text = "\n".join(lines)
        print(text, flush=True)
        write_text_atomic(run.dir / "plan.txt", text + "\n")
        return 0

    print(head, flush=True)
    if offline and not isolate:
        print(f"warning: network isolation is best-effort: {network}", file=sys.stderr, flush=True)
    env = {**os.environ, "PROFILE": cfg.profile, "PYTHONUNBUFFERED": "1", **(OFFLINE_ENV if offline else {})}
    records: list[dict] = []
    failed = None
    t0 = time.monotonic()
    for i, step in enumerate(spec["steps"], 1):
        if failed is not None:
            records.append({**step, "n": i, "log": None, "exit_code": None, "actual_s": None, "status": "not run"})
            continue
        rec = _run_step(step, i, run.dir, env, isolate)
        records.append(rec)
        if rec["status"] != "pass":
            failed = rec
    total = time.monotonic() - t0
    limit = spec["total_budget_s"] + spec["tolerance_s"]
    total_ok = total <= limit
    total_status = "pass" if total_ok else f"FAIL: over by {total - limit:.1f} s"
    if failed is not None:
        summary = f"step {failed['n']:02d} {failed['name']}: {failed['status'].removeprefix('FAIL: ')}"
    elif not total_ok:
        summary = (f"total {mmss(total)} is over the slot {mmss(spec['total_budget_s'])} + "
                   f"{mmss(spec['tolerance_s'])} tolerance")
    else:
        summary = f"all {len(records)} steps passed in {mmss(total)} (slot {mmss(spec['total_budget_s'])})"
    passed = failed is None and total_ok
    doc = {"format": FORMAT, "profile": cfg.profile, "script": str(path.resolve()), "started_utc": started,
           "offline": offline, "network": network, "total_budget_s": spec["total_budget_s"],
           "tolerance_s": spec["tolerance_s"], "total_s": round(total, 3), "total_status": total_status,
           "passed": passed, "summary": summary, "steps": records}
    table = render_table(doc)
    write_json_atomic(run.dir / "rehearse.json", doc)
    write_text_atomic(run.dir / "rehearse.md", f"# Rehearsal {started} ({cfg.profile})\n\n{table}\n")
    print("\n" + table, flush=True)
    print(f"# written: {run.dir / 'rehearse.md'}", flush=True)
    if not passed:
        return 1
    run.mark_complete({"rehearse_json": "rehearse.json", "rehearse_md": "rehearse.md", "total_s": round(total, 3)})
    print(run.dir / runs.MARKER, flush=True)
    return 0
