"""The rehearsal runner: synthetic scripts of echo/sleep/false steps, real subprocesses, real run dirs.

The budgets asserted here are the runner's own verdicts on deliberately slow/fast toy steps, not the kit's speed.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from jacpt import config, paths, rehearse
from jacpt.rehearse import RehearseError, load_script, rehearse_stage


@pytest.fixture
def env(monkeypatch, tmp_path):
    monkeypatch.setenv("JACPT_RUNS_DIR", str(tmp_path / "runs"))
    for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "WANDB_MODE", "PROFILE", "DRY_RUN"):
        monkeypatch.delenv(k, raising=False)
    return tmp_path


@pytest.fixture
def cfg(env):
    return config.load("tiny-cpu", env={})


def script(tmp_path: Path, steps: list[dict], total: float = 60, tolerance: float = 30, **extra) -> Path:
    p = tmp_path / "script.yaml"
    p.write_text(yaml.safe_dump({"total_budget_s": total, "tolerance_s": tolerance, "steps": steps, **extra}))
    return p


def step(name: str, run: str, expect: str = ".*", budget: float = 20) -> dict:
    return {"name": name, "run": run, "budget_s": budget, "expect": expect}


def run_dir(tmp_path: Path) -> Path:
    (d,) = [d for d in (tmp_path / "runs" / "tiny-cpu").iterdir() if d.name.startswith("rehearse-")]
    return d


def result(tmp_path: Path) -> dict:
    return json.loads((run_dir(tmp_path) / "rehearse.json").read_text())


def test_pass_prints_table_writes_json_md_and_marker(cfg, tmp_path, capsys):
    s = script(tmp_path, [step("hello", "echo hello-world", r"^hello-world$"),
                          step("nap", "sleep 0.1; echo done >&2", r"^done$")])
    assert rehearse_stage(cfg, dry_run=False, offline=False, script=s) == 0
    out = capsys.readouterr().out
    assert "hello-world" in out  # streamed to the console
    assert "| 01 | hello | 0:20 |" in out and "| 02 | nap |" in out and "rehearsal PASS" in out
    d = run_dir(tmp_path)
    assert (d / "COMPLETE.json").is_file() and str(d / "COMPLETE.json") in out.splitlines()[-1]
    assert (d / "01-hello.log").read_text() == "hello-world\n"
    assert (d / "02-nap.log").read_text() == "done\n"  # stderr captured too
    doc = result(tmp_path)
    assert doc["passed"] and [r["status"] for r in doc["steps"]] == ["pass", "pass"]
    assert 0.1 <= doc["steps"][1]["actual_s"] <= doc["total_s"]
    assert "| **total** | 1:00 ± 0:30 |" in (d / "rehearse.md").read_text()
    assert json.loads((d / "run.json").read_text())["inputs"]["script"] == str(s.resolve())


def test_steps_run_from_the_kit_root_with_the_profile_exported(cfg, tmp_path):
    s = script(tmp_path, [step("where", 'echo "$PWD $PROFILE"', rf"^{paths.KIT_ROOT} tiny-cpu$")])
    assert rehearse_stage(cfg, False, False, s) == 0


def test_missing_expect_fails_naming_the_step(cfg, tmp_path, capsys):
    s = script(tmp_path, [step("ok", "echo fine"), step("quiet", "echo nothing", r"COMPLETE\.json$"),
                          step("after", "echo later")])
    assert rehearse_stage(cfg, False, False, s) == 1
    out = capsys.readouterr().out
    assert r"rehearsal FAIL: step 02 quiet: missing expect /COMPLETE\.json$/" in out
    doc = result(tmp_path)
    assert [r["status"] for r in doc["steps"]][::2] == ["pass", "not run"]
    assert not (run_dir(tmp_path) / "COMPLETE.json").exists()
    assert not (run_dir(tmp_path) / "03-after.log").exists()


def test_nonzero_exit_fails_and_later_steps_are_not_run(cfg, tmp_path, capsys):
    s = script(tmp_path, [step("boom", "echo trying; false"), step("next", f"touch {tmp_path / 'ran'}"),
                          step("last", "echo x")])
    assert rehearse_stage(cfg, False, False, s) == 1
    doc = result(tmp_path)
    assert doc["steps"][0]["status"] == "FAIL: exit 1" and doc["steps"][0]["exit_code"] == 1
    assert [r["status"] for r in doc["steps"][1:]] == ["not run", "not run"]
    assert not (tmp_path / "ran").exists()
    assert "| 02 | next | 0:20 | - | not run |" in capsys.readouterr().out


def test_step_over_its_budget_fails(cfg, tmp_path):
    s = script(tmp_path, [step("slow", "sleep 0.3; echo done", "done", budget=0.05)])
    assert rehearse_stage(cfg, False, False, s) == 1
    (rec,) = result(tmp_path)["steps"]
    assert rec["status"].startswith("FAIL: over budget") and rec["exit_code"] == 0 and rec["actual_s"] >= 0.3


def test_total_over_budget_plus_tolerance_fails(cfg, tmp_path, capsys):
    s = script(tmp_path, [step("a", "sleep 0.2"), step("b", "sleep 0.2")], total=0.1, tolerance=0.1)
    assert rehearse_stage(cfg, False, False, s) == 1
    doc = result(tmp_path)
    assert [r["status"] for r in doc["steps"]] == ["pass", "pass"]
    assert doc["total_status"].startswith("FAIL: over by") and not doc["passed"]
    assert "is over the slot" in capsys.readouterr().out
    assert not (run_dir(tmp_path) / "COMPLETE.json").exists()


def test_dry_run_lists_steps_and_runs_nothing(cfg, tmp_path, capsys):
    marker = tmp_path / "touched"
    s = script(tmp_path, [step("first", f"touch {marker}"), step("second", "echo two", budget=45)])
    assert rehearse_stage(cfg, dry_run=True, offline=True, script=s) == 0
    out = capsys.readouterr().out
    assert f"touch {marker}" in out and "second" in out and "0:45" in out and "# network: " in out
    assert not marker.exists()
    d = tmp_path / "runs" / "tiny-cpu" / "rehearse-dry-run"
    assert (d / "plan.txt").is_file() and not (d / "rehearse.json").exists()


def test_offline_sets_the_env_vars_in_the_step(cfg, tmp_path):
    s = script(tmp_path, [step("env", 'echo "hub=$HF_HUB_OFFLINE tf=$TRANSFORMERS_OFFLINE ds=$HF_DATASETS_OFFLINE '
                                      'wandb=$WANDB_MODE"', r"^hub=1 tf=1 ds=1 wandb=offline$")])
    assert rehearse_stage(cfg, False, offline=True, script=s) == 0
    assert (run_dir(tmp_path) / "01-env.log").read_text().strip() == "hub=1 tf=1 ds=1 wandb=offline"


def test_online_leaves_the_env_alone(cfg, tmp_path):
    s = script(tmp_path, [step("env", 'echo "hub=${HF_HUB_OFFLINE:-unset}"', r"^hub=unset$")])
    assert rehearse_stage(cfg, False, offline=False, script=s) == 0


@pytest.mark.skipif(not rehearse.isolation_available(), reason="needs unprivileged `unshare -rn` and `ip` (Linux)")
def test_offline_cuts_the_network_but_keeps_loopback(cfg, tmp_path):
    probe = ("import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); s.listen(); "
             "c = socket.create_connection(s.getsockname()); print('loopback ok'); "
             "print('ifaces', sorted(n for _, n in socket.if_nameindex()))")
    s = script(tmp_path, [step("net", f'python3 -c "{probe}"', r"^loopback ok$")])
    assert rehearse_stage(cfg, False, offline=True, script=s) == 0
    assert "ifaces ['lo']" in (run_dir(tmp_path) / "01-net.log").read_text()


@pytest.mark.parametrize("doc, message", [
    ({"total_budget_s": 60, "tolerance_s": 30, "steps": [], "extra": 1}, r"unknown key\(s\) 'extra'"),
    ({"total_budget_s": 60, "steps": [step("a", "true")]}, r"missing key\(s\) tolerance_s"),
    ({"total_budget_s": 60, "tolerance_s": 30, "steps": []}, "steps must be a non-empty list"),
    ({"total_budget_s": "ten", "tolerance_s": 30, "steps": [step("a", "true")]}, "total_budget_s = 'ten' is not a"),
    ({"total_budget_s": 60, "tolerance_s": 30, "steps": [step("a", "true"), {**step("b", "true"), "budget": 3}]},
     r"step 2 \('b'\): unknown key\(s\) 'budget'; allowed: name, run, budget_s, expect"),
    ({"total_budget_s": 60, "tolerance_s": 30, "steps": [{"name": "c", "run": "true", "budget_s": 5}]},
     r"step 1 \('c'\): missing key\(s\) expect"),
    ({"total_budget_s": 60, "tolerance_s": 30, "steps": [step("d", "true", expect="(unclosed")]},
     r"step 1 \('d'\): expect '\(unclosed' is not a valid regex"),
    ({"total_budget_s": 60, "tolerance_s": 30, "steps": [step("e", "true", budget=0)]},
     r"step 1 \('e'\): budget_s = 0 must be > 0"),
    ({"total_budget_s": 60, "tolerance_s": 30, "steps": [step("a b", "true")]}, r"name 'a b' must match"),
    ({"total_budget_s": 60, "tolerance_s": 30, "steps": [step("a", "true"), step("a", "true")]},
     r"step 2 \('a'\): name 'a' is used twice"),
])
def test_bad_script_is_a_clear_error_naming_file_and_step(tmp_path, doc, message):
    p = tmp_path / "bad.yaml"
    p.write_text(yaml.safe_dump(doc))
    with pytest.raises(RehearseError, match=rf"bad\.yaml: .*{message}"):
        load_script(p)


def test_missing_or_unparsable_script(tmp_path, cfg):
    with pytest.raises(RehearseError, match="no such rehearsal script"):
        rehearse_stage(cfg, False, False, tmp_path / "nope.yaml")
    (tmp_path / "x.yaml").write_text("steps: [unclosed\n")
    with pytest.raises(RehearseError, match=r"x\.yaml: not valid YAML"):
        load_script(tmp_path / "x.yaml")
    assert not (tmp_path / "runs").exists()  # nothing is written before the script validates


def test_shipped_scripts_validate_and_budgets_add_up():
    tiny = load_script(paths.CONFIG_DIR / "rehearsal" / "tiny.yaml")
    assert [s["name"] for s in tiny["steps"]] == ["data", "import", "cpt", "lora", "export", "demo", "eval"]
    assert [s["run"] for s in tiny["steps"]] == [f"make {s['name']}" for s in tiny["steps"]]
    assert [s["budget_s"] for s in tiny["steps"]] == [120, 120, 240, 240, 180, 180, 120]
    assert tiny["total_budget_s"] == sum(s["budget_s"] for s in tiny["steps"]) and tiny["tolerance_s"] == 30

    gpu = load_script(paths.CONFIG_DIR / "rehearsal" / "gpu.yaml")
    assert [s["run"] for s in gpu["steps"]] == ["make preflight", "make demo", "make eval", "make lora LORA_STEPS=30",
                                                "make demo"]
    assert gpu["total_budget_s"] == 600 and gpu["tolerance_s"] == 30
    assert sum(s["budget_s"] for s in gpu["steps"]) <= 600
    assert rehearse.default_script("tiny-cpu").name == "tiny.yaml"
    assert rehearse.default_script("rtx6000ada-48g").name == "gpu.yaml"


def test_shipped_expects_match_what_the_stages_print():
    """Each stage prints its output path last (cli.py / stages.py); the regexes must accept those lines."""
    tiny = {s["name"]: s["expect"] for s in load_script(paths.CONFIG_DIR / "rehearsal" / "tiny.yaml")["steps"]}
    for name, expect in tiny.items():
        line = ("/k/data/tiny-cpu/data_manifest.json" if name == "data"
                else f"/k/runs/tiny-cpu/{name}-20250101-120000/COMPLETE.json")
        assert re.search(expect, f"log noise\n{line}\n", re.MULTILINE), name
        if name != "data":  # the wrong stage's marker does not count
            assert not re.search(expect, "/k/runs/tiny-cpu/other-20250101-120000/COMPLETE.json", re.MULTILINE)
    gpu = {s["name"]: s["expect"] for s in load_script(paths.CONFIG_DIR / "rehearsal" / "gpu.yaml")["steps"]}
    ready = "ok    torch  2.6\n\nok    ready: this box can run PROFILE=rtx6000ada-48g"
    assert re.search(gpu["preflight"], ready, re.MULTILINE)
    not_ready = "ok    torch  2.6\nFAIL  gpu  none\n\nFAIL  not ready for PROFILE=rtx6000ada-48g: fix the FAIL line above"
    assert not re.search(gpu["preflight"], not_ready, re.MULTILINE)


def test_shipped_scripts_are_not_taken_for_profiles():
    assert not any(p.startswith("rehearsal") for p in config.profiles())
