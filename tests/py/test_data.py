"""`jacpt data` end to end: sources, manifest, idempotence, atomicity, errors."""

from __future__ import annotations

import gzip
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import write_jsonl

from jacpt import assets, data, lora_data, paths
from jacpt.cli import cli

pytestmark = pytest.mark.slow
JA = ("日本語の百科事典の記事である。二つ目の文がここに続き、話題を少し広げる。"
      "三つ目の文で締めくくり、最低限の長さを満たす。")


def invoke(*args, env=None):
    result = CliRunner().invoke(cli, ["data", *args], env=env or {})
    return result


def test_sample_manifest_is_complete_and_consistent(sample_data, tokenizer_dir):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    m = sample_data
    assert m["profile"] == "tiny-cpu" and m["source"]["kind"] == "sample"
    assert [f["name"] for f in m["source"]["files"]] == ["validation_0.jsonl.gz", "train_0.jsonl.gz",
                                                          "train_1.jsonl.gz"]
    assert m["tokenizer"]["fingerprint"] == assets.tokenizer_fingerprint(tokenizer_dir)
    assert m["tokenizer"]["eos_id"] == 151643
    assert m["megatron"]["train"]["documents"] + m["megatron"]["validation"]["documents"] == m["clean"]["kept"] >= 150
    for split in data.SPLITS:
        ds = IndexedDataset(m["megatron"][split]["prefix_path"])
        assert len(ds) == m["megatron"][split]["documents"]
        assert int(ds.sequence_lengths.sum()) == m["megatron"][split]["tokens"]
    base = Path(m["megatron"]["train"]["prefix_path"]).parent.parent
    for rel, info in m["outputs"].items():
        assert (base / rel).stat().st_size == info["size"]
    assert m["lora"]["examples"]["training.jsonl"] > 100
    assert m["versions"]["megatron-core"].startswith("0.12")


def test_lora_examples_have_ascii_template_and_held_out_eval(sample_data):
    d = Path(sample_data["lora"]["dir_path"])
    clean = Path(sample_data["megatron"]["train"]["prefix_path"]).parent.parent / "clean"
    val_titles = {json.loads(x)["meta"]["title"] for x in (clean / "validation.jsonl").open(encoding="utf-8")}
    for name in lora_data.FILES:
        rows = [json.loads(x) for x in (d / name).open(encoding="utf-8")]
        assert rows, name
        for r in rows:
            assert set(r) == {"input", "output"} and r["input"].strip() and r["output"].strip()
            assert r["input"].startswith("Continue the following Japanese encyclopedia article.\nTitle: ")
            assert r["input"].endswith("\nContinuation:") and r["output"].endswith("。")
            title = r["input"].split("Title: ", 1)[1].split("\n", 1)[0]
            assert (title in val_titles) == (name != "training.jsonl")
    assert lora_data.INSTRUCTION.isascii()


def test_cli_prints_manifest_path_last_and_reruns_do_nothing(kit_env):
    r = invoke("--profile", "tiny-cpu")
    assert r.exit_code == 0, r.output
    manifest = Path(r.stdout.strip().splitlines()[-1])
    assert manifest == kit_env / "data" / "tiny-cpu" / "data_manifest.json" and manifest.is_file()
    before = manifest.stat().st_mtime_ns
    r = invoke("--profile", "tiny-cpu")
    assert r.exit_code == 0 and "up to date" in r.stderr
    assert manifest.stat().st_mtime_ns == before
    r = invoke("--profile", "tiny-cpu", "data.min_chars=60")  # a setting that changes the output
    assert r.exit_code == 0 and "up to date" not in r.stderr
    assert manifest.stat().st_mtime_ns != before
    assert json.loads(manifest.read_text())["settings"]["data.min_chars"] == 60


def test_dry_run_resolves_and_writes_nothing(kit_env):
    r = invoke("--profile", "rtx6000ada-48g", env={"DRY_RUN": "1", "SHARDS": "0-1"})
    assert r.exit_code == 0, r.output
    assert "download   https://gitlab.llm-jp.nii.ac.jp/" in r.stdout and "train_1.jsonl.gz" in r.stdout
    assert "train_2.jsonl.gz" not in r.stdout and "# env SHARDS" in r.stdout
    assert not (kit_env / "data").exists()


def test_a_failed_run_leaves_the_previous_data_untouched(kit_env, monkeypatch):
    assert invoke().exit_code == 0
    out = kit_env / "data" / "tiny-cpu"
    manifest = (out / "data_manifest.json").read_bytes()

    def boom(*a, **k):
        raise RuntimeError("interrupted")

    monkeypatch.setattr(lora_data, "build", boom)
    r = invoke("--force")
    assert r.exit_code != 0 and isinstance(r.exception, RuntimeError)
    assert (out / "data_manifest.json").read_bytes() == manifest
    assert not list(out.parent.glob(".tiny-cpu.staging-*"))  # cleaned up


def test_a_failed_first_run_leaves_no_output_dir(kit_env, monkeypatch):
    monkeypatch.setattr(lora_data, "build", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("interrupted")))
    assert invoke().exit_code != 0
    assert not (kit_env / "data" / "tiny-cpu").exists()


def test_directory_without_validation_is_split_by_hash(kit_env):
    src = kit_env / "corpus"
    write_jsonl(src / "train_0.jsonl", [{"text": f"{JA}{i}", "meta": {"title": f"記事{i}"}} for i in range(300)])
    r = invoke(f"data.source={src}", "data.val_fraction=0.1", "data.min_chars=0", "data.min_ja_ratio=0")
    assert r.exit_code == 0, r.output
    m = data.load_manifest(Path(r.stdout.strip().splitlines()[-1]))
    assert m["source"]["files"] == [{"name": "train_0.jsonl", "split": "auto", "size": (src / "train_0.jsonl")
                                     .stat().st_size, "sha256": m["source"]["files"][0]["sha256"]}]
    assert 10 <= m["megatron"]["validation"]["documents"] <= 60
    assert m["megatron"]["train"]["documents"] + m["megatron"]["validation"]["documents"] == 300


def test_bad_line_stops_with_file_line_unless_skip_bad(kit_env):
    src = kit_env / "corpus"
    write_jsonl(src / "validation_0.jsonl", [{"text": JA + v, "meta": {"title": "検証" + v}} for v in "ab"])
    good = [json.dumps({"text": f"{JA}{i}", "meta": {"title": f"記事{i}"}}, ensure_ascii=False) for i in range(4)]
    (src / "train_0.jsonl").write_text("\n".join(good[:2] + ['{"text": broken'] + good[2:]) + "\n")
    r = invoke(f"data.source={src}")
    assert r.exit_code == 1
    assert f"{src / 'train_0.jsonl'}:3: not valid JSON" in r.output and "SKIP_BAD=1" in r.output
    assert not (kit_env / "data" / "tiny-cpu").exists()
    r = invoke(f"data.source={src}", "--skip-bad")
    assert r.exit_code == 0, r.output
    report = json.loads((kit_env / "data" / "tiny-cpu" / "clean" / "report.json").read_text())
    assert report["total"]["dropped"]["bad_json"] == 1 and report["total"]["kept"] == 6


def test_missing_source_dir_is_a_clear_error(kit_env):
    r = invoke("data.source=/no/such/dir")
    assert r.exit_code == 1 and "data.source /no/such/dir is not a directory" in r.output


def test_tampered_sample_is_caught(kit_env, monkeypatch, tmp_path):
    fake = tmp_path / "sample"
    shutil.copytree(paths.SAMPLE_DIR, fake)
    with gzip.open(fake / "train_1.jsonl.gz", "ab") as f:
        f.write(b'{"text": "x"}\n')
    monkeypatch.setattr(paths, "SAMPLE_DIR", fake)
    r = invoke()
    assert r.exit_code == 1 and "train_1.jsonl.gz: sha256" in r.output and "differs from the recorded" in r.output


def test_user_lora_dir_is_validated(kit_env):
    lora = kit_env / "lora"
    for name in lora_data.FILES:
        write_jsonl(lora / name, [{"input": "Q: 日本の首都は?", "output": "東京"}])
    r = invoke(f"data.lora_source={lora}")
    assert r.exit_code == 0, r.output
    m = data.load_manifest(Path(r.stdout.strip().splitlines()[-1]))
    assert m["lora"]["examples"] == {n: 1 for n in lora_data.FILES}
    write_jsonl(lora / "test.jsonl", [{"input": "Q", "output": ""}])
    r = invoke(f"data.lora_source={lora}")
    assert r.exit_code == 1 and "test.jsonl:1: needs non-empty string field(s) output" in r.output


@pytest.fixture
def jawiki_server(tmp_path):
    """The sample corpus served as if it were ja_wiki, by the bats fixture server, on 127.0.0.1."""
    root = tmp_path / "srv"
    root.mkdir()
    for n in ("train_0", "train_1", "validation_0"):
        shutil.copyfile(paths.SAMPLE_DIR / f"{n}.jsonl.gz", root / f"{n}.jsonl.gz")
    port_file = tmp_path / "port"
    helper = paths.KIT_ROOT / "tests" / "bats" / "test_helper" / "http_server.py"
    proc = subprocess.Popen([sys.executable, str(helper), "--root", str(root), "--port-file", str(port_file)],
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while not (port_file.is_file() and port_file.read_text().strip()) and time.monotonic() < deadline:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port_file.read_text().strip()}"
    proc.terminate()
    proc.wait(timeout=10)


def test_llmjp_source_downloads_verifies_and_builds(kit_env, jawiki_server):
    env = {"JAWIKI_BASE_URL": jawiki_server, "SHARDS": "0-1", "DATA_SOURCE": "llmjp", "JAWIKI_BACKOFF_BASE": "0"}
    r = invoke(env=env)
    assert r.exit_code == 0, r.output
    raw = kit_env / "data" / "raw" / "llmjp-ja_wiki"
    pins = {line.split("\t")[0]: line.split("\t")[2] for line in (raw / "MANIFEST.tsv").read_text().splitlines()
            if not line.startswith("#")}
    m = data.load_manifest(Path(r.stdout.strip().splitlines()[-1]))
    assert {f["name"]: f["sha256"] for f in m["source"]["files"]} == pins
    sums = dict(reversed(line.split()) for line in (paths.SAMPLE_DIR / "SHA256SUMS").read_text().splitlines())
    assert pins == sums  # what was served is what was pinned
    r = invoke(env=env)
    assert r.exit_code == 0 and "up to date" in r.stderr
