"""RUNBOOK.md stays honest: every symptom in its table has a section, and every `make` command,
`jacpt` subcommand and setting key it tells a reader to use exists. Fast: no NeMo import; the make
commands run as `make -n`, which prints recipes and runs none of them."""

from __future__ import annotations

import os
import re
import shlex
import subprocess

import pytest

from jacpt import config, paths
from jacpt.cli import cli

RUNBOOK = (paths.KIT_ROOT / "RUNBOOK.md").read_text(encoding="utf-8")
PROFILE = "rtx6000ada-48g"  # stands in for <profile>
# Make variables the Makefile or the scripts it runs read, besides the settings' environment variables.
MAKE_VARS = {"PROFILE", "DRY_RUN", "SKIP_BAD", "OVERRIDES", "INTERACTIVE", "CMD", "GPUS", "IMAGE", "NEMO_IMAGE",
             "SHM_SIZE", "DOCKER", "JACPT_DATA_DIR", "JACPT_ASSETS_DIR", "JACPT_RUNS_DIR", "OFFLINE", "SCRIPT"}
KEY_RE = re.compile(r"(?<![\w/.-])((?:%s)\.[a-z_]+)(?![\w/])" % "|".join(sorted({k.split(".")[0] for k in config.KEYS})))
FILE_SUFFIXES = {"py", "json", "jsonl", "yaml", "txt", "md", "gz", "bin", "idx", "tsv", "npy"}


def _norm(text: str) -> str:
    return " ".join(text.replace("\\|", "|").split())


def _table_rows() -> list[list[str]]:
    """Cells of the first table's body rows (`\\|` inside a cell is not a separator)."""
    lines = RUNBOOK.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip().replace("\0", "\\|") for c in line.replace("\\|", "\0").strip("|").split("|")]
        rows.append(cells)
    return rows


def _code_spans() -> list[str]:
    """Inline code spans and the lines of fenced blocks, with table escapes undone."""
    fenced = re.findall(r"^```[^\n]*\n(.*?)^```", RUNBOOK, re.M | re.S)
    text = re.sub(r"^```[^\n]*\n.*?^```", "", RUNBOOK, flags=re.M | re.S)
    spans = [s.replace("\\|", "|") for s in re.findall(r"`([^`\n]+)`", text)]
    return spans + [line for block in fenced for line in block.splitlines()]


def _make_commands() -> list[list[str]]:
    """Distinct `make ...` invocations (arguments up to the first |, &&, ; ...), <profile> filled in;
    those with another <placeholder> are left out."""
    seen, out = set(), []
    for span in _code_spans():
        for m in re.finditer(r"(?:^|&&|;|\|)\s*(make(?:\s.*)?)$", span):
            cmd = m.group(1).replace("<profile>", PROFILE)
            if re.search(r"<[^>]+>", cmd):
                continue
            lex = shlex.shlex(cmd, posix=True, punctuation_chars=True)
            lex.whitespace_split = True
            args = []
            for tok in lex:
                if tok and set(tok) <= set("|&;()<>"):
                    break
                args.append(tok)
            if tuple(args) in seen:
                continue
            seen.add(tuple(args))
            out.append(args[1:])
    return out


def test_every_symptom_in_the_table_has_a_section():
    rows = _table_rows()
    assert len(rows) >= 30
    titles = [_norm(t) for t in re.findall(r"^### (.+)$", RUNBOOK, re.M)]
    missing = []
    for cells in rows:
        m = re.search(r"`([^`]+)`", cells[0])
        assert m, f"table row without a backticked symptom: {cells[0]}"
        key = _norm(m.group(1))
        if not any(key in t for t in titles):
            missing.append(key)
    assert not missing, f"RUNBOOK.md rows without a ### section: {missing}"


@pytest.mark.parametrize("symptom", [
    "CUDA out of memory", "Only NeMo based paths starting with nemo://", "Could not find data-idx or data-bin",
    "Permission denied", "Last checkpoint is unfinished", "Training from scratch", "loss gate",
    "tokenizer mismatch", "NVTE_", "NCCL error", "Bus error", "401", "could not download",
    "No space left on device", "nvidia-container-cli"])
def test_the_table_covers(symptom):
    assert any(symptom in c[0] for c in _table_rows()), symptom


def test_every_section_has_a_fix():
    symptoms = RUNBOOK.split("\n## The timed 10-minute demo")[0]  # the checklists after it are not symptoms
    for title, body in re.findall(r"^### (.+?)\n(.*?)(?=^##|\Z)", symptoms, re.M | re.S):
        assert "**Fix**" in body, f"section without a Fix: {title}"


def test_the_oom_ladder_is_ordered_cheapest_first():
    ladder = RUNBOOK.split("## The OOM ladder", 1)[1]
    ladder = ladder[ladder.index("\n1. **"):]
    steps = re.findall(r"^(\d)\. \*\*(.+?)\*\*", ladder, re.M)
    assert [n for n, _ in steps] == ["1", "2", "3", "4", "5"]
    order = [ladder.find(k) for k in ("`MBS=`", "`cpt.loss_chunk_tokens`", "recompute_granularity",
                                      "`cpt.seq_length`", "LoRA instead")]
    assert -1 not in order and order == sorted(order)
    assert len(re.findall(r"\*\*≈? ?[\d.]+ GB\*\*", ladder)) >= 5, "each rung states its saving in GB"


def test_every_make_command_exists():
    commands = _make_commands()
    targets = {a for args in commands for a in args if "=" not in a and not a.startswith("-")}
    assert {"cpt", "data", "docker-run", "docker-build", "lora"} <= targets
    env = {k: v for k, v in os.environ.items()
           if k not in MAKE_VARS and k not in {s.env for s in config.KEYS.values() if s.env}
           and not k.startswith("MAKE")}
    for args in commands:
        for a in args:
            name, eq, value = a.partition("=")
            if not eq or a.startswith("-"):
                continue
            assert name in MAKE_VARS or any(s.env == name for s in config.KEYS.values()), \
                f"make {' '.join(args)}: {name} is neither a Make knob nor a setting's variable"
            if name == "OVERRIDES":
                for kv in value.split():
                    assert kv.partition("=")[0] in config.KEYS, f"make {' '.join(args)}: unknown setting in {kv}"
        # -n prints the recipes and runs none; -o keeps the setup stamps from being (re)made or required.
        proc = subprocess.run(["make", "-n", "--no-print-directory", "-C", str(paths.KIT_ROOT),
                               "-o", ".stamps/python", "-o", ".stamps/assets", "-o", ".stamps/npm",
                               "-o", ".stamps/setup", *args], capture_output=True, text=True, env=env, timeout=60)
        assert proc.returncode == 0, f"make {' '.join(args)}: {proc.stderr.strip()}"


def test_every_jacpt_subcommand_exists():
    subs = set(re.findall(r"\bjacpt(?:\.cli)? ([a-z][a-z-]*)", RUNBOOK))
    unknown = subs - set(cli.commands)
    assert not unknown, f"RUNBOOK.md names jacpt subcommands that do not exist: {unknown}"


def test_every_setting_key_exists():
    found = {m.group(1) for span in _code_spans() for m in KEY_RE.finditer(span)
             if m.group(1).rsplit(".", 1)[1] not in FILE_SUFFIXES}
    found |= {m.group(1) for m in re.finditer(r"setting `([a-z]+\.[a-z_]+)`", RUNBOOK)}
    assert {"cpt.micro_batch_size", "cpt.seq_length", "cpt.global_batch_size"} <= found
    unknown = sorted(found - set(config.KEYS))
    assert not unknown, f"RUNBOOK.md names settings that do not exist: {unknown}"


def test_demo_checklist_has_the_three_phases_with_minutes_and_abort_criteria():
    part = RUNBOOK.split("\n## The timed 10-minute demo", 1)[1]
    assert "backup" in part.split("###", 1)[0]  # the backup path is decided before the phases
    for phase in ("### T-1 day", "### T-1 hour", "### T-0"):
        body = part.split(phase, 1)[1].split("\n### ", 1)[0]
        rows = [r for r in body.splitlines() if r.startswith("| ") and not r.startswith(("| min", "| ---"))]
        assert rows, phase
        assert all(r.split("|")[1].strip().isdigit() for r in rows), phase  # minutes per step
        assert all(len(r.split("|")) == 6 and r.split("|")[4].strip() for r in rows), phase  # an abort column
    t0 = part.split("### T-0", 1)[1]
    assert sum(int(r.split("|")[1]) for r in t0.splitlines() if r.startswith("| ") and r.split("|")[1].strip()
               .isdigit()) == 10
