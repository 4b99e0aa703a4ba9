"""The embedded sample corpus, and docs that must not drift from the code."""

from __future__ import annotations

import gzip
import json
import re
import subprocess

from click.testing import CliRunner
from conftest import sample_texts

from jacpt import config, paths
from jacpt.cli import cli
from jacpt.fsutil import sha256_file

README = (paths.KIT_ROOT / "README.md").read_text(encoding="utf-8")


def test_sample_matches_its_sha256sums_and_llmjp_format():
    sums = dict(reversed(line.split()) for line in (paths.SAMPLE_DIR / "SHA256SUMS").read_text().splitlines())
    assert sorted(sums) == ["train_0.jsonl.gz", "train_1.jsonl.gz", "validation_0.jsonl.gz"]
    ids, size = set(), 0
    for name, digest in sums.items():
        assert sha256_file(paths.SAMPLE_DIR / name) == digest
        with gzip.open(paths.SAMPLE_DIR / name, "rb") as f:
            for raw in f:
                size += len(raw)
                rec = json.loads(raw)
                assert set(rec) == {"text", "meta"} and set(rec["meta"]) == {"id", "title", "url"}
                assert rec["text"].startswith(rec["meta"]["title"])
                ids.add(rec["meta"]["id"])
    assert len(ids) >= 150 and size >= 200_000


def test_sample_is_japanese_and_has_no_duplicates():
    from jacpt.corpus import japanese_ratio

    texts = sample_texts()
    assert len(set(texts)) == len(texts)
    assert all(japanese_ratio(t) > 0.9 for t in texts)


def test_readme_opens_with_the_two_commands_and_their_expectations():
    head = "\n".join(README.splitlines()[:25])
    assert re.search(r"^make quickstart\s+#.*min", head, re.M)
    assert re.search(r"^make test\s+#.*min", head, re.M)


def test_readme_documents_every_make_target():
    out = subprocess.run(["make", "-s", "-C", str(paths.KIT_ROOT), "help"], capture_output=True, text=True,
                         check=True).stdout
    targets = re.findall(r"^  ([a-z][a-z-]*) ", out, re.M)
    assert "data" in targets
    missing = [t for t in targets if f"`make {t}" not in README]
    assert not missing, f"README.md does not document: {missing}"


def test_readme_documents_every_setting_and_its_env_var():
    missing = [k for k in config.KEYS if f"`{k}`" not in README]
    missing += [s.env for s in config.KEYS.values() if s.env and f"`{s.env}`" not in README]
    assert not missing, f"README.md does not document: {missing}"


def test_cli_help_and_version():
    r = CliRunner().invoke(cli, ["--help"])
    assert r.exit_code == 0
    for cmd in ("assets", "bench-data", "config", "data"):
        assert re.search(rf"^  {cmd}\s", r.output, re.M)
    r = CliRunner().invoke(cli, ["--version"])
    assert r.exit_code == 0 and "jacpt, version" in r.output


def test_assets_dry_run_builds_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("JACPT_ASSETS_DIR", str(tmp_path / "a"))
    r = CliRunner().invoke(cli, ["assets"], env={"DRY_RUN": "1"})
    assert r.exit_code == 0 and "tiny model" in r.output and not (tmp_path / "a").exists()
