"""Settings: precedence, validation, profiles."""

from __future__ import annotations

import pytest

from jacpt import config
from jacpt.config import ConfigError, load, parse_shards


def test_precedence_default_profile_env_cli():
    cfg = load("tiny-cpu", env={})
    assert cfg["data.backend"] == "fast" and cfg.origin["data.backend"] == "default"
    assert cfg["data.source"] == "sample" and cfg.origin["data.source"] == "profile tiny-cpu.yaml"
    cfg = load("tiny-cpu", env={"DATA_SOURCE": "llmjp"})
    assert cfg["data.source"] == "llmjp" and cfg.origin["data.source"] == "env DATA_SOURCE"
    cfg = load("tiny-cpu", ["data.source=/some/dir"], env={"DATA_SOURCE": "llmjp"})
    assert cfg["data.source"] == "/some/dir" and cfg.origin["data.source"] == "command line"


def test_empty_env_value_does_not_override():
    assert load("tiny-cpu", env={"DATA_SOURCE": ""})["data.source"] == "sample"


def test_every_profile_loads_and_real_ones_use_the_real_corpus():
    assert set(config.profiles()) >= {"tiny-cpu", "rtx6000ada-48g", "h100-80g"}
    for p in config.profiles():
        cfg = load(p, env={})
        assert cfg.profile == p
    assert load("rtx6000ada-48g", env={})["data.source"] == "llmjp"
    assert load("h100-80g", env={})["data.source"] == "llmjp"


def test_unknown_key_suggests_the_close_one():
    with pytest.raises(ConfigError, match=r"unknown setting 'data.wokers'; did you mean data.workers\?"):
        load("tiny-cpu", ["data.wokers=2"], env={})


def test_unknown_key_in_a_profile_names_the_file(tmp_path, monkeypatch):
    (tmp_path / "bad.yaml").write_text("data:\n  sorce: sample\n")
    monkeypatch.setattr(config, "CONFIG_DIR", tmp_path)
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown setting 'data.sorce'; did you mean data.source"):
        load("bad", env={})


@pytest.mark.parametrize("item, message", [
    ("data.workers=two", "is not an integer"),
    ("data.workers=0", "must be >= 1"),
    ("data.min_ja_ratio=1.5", "between 0 and 1"),
    ("data.backend=turbo", "is not one of fast, nemo"),
    ("data.skip_bad=maybe", "is not true or false"),
    ("data.shards=0-14", "bad shard range"),
    ("data.shards=3-1", "bad shard range"),
    ("data.shards=a", "bad shard spec"),
    ("data.workers", "write key=value"),
])
def test_bad_values_fail_before_anything_runs(item, message):
    with pytest.raises(ConfigError, match=message):
        load("tiny-cpu", [item], env={})


def test_bad_env_value_names_the_variable():
    with pytest.raises(ConfigError, match="env DATA_WORKERS: data.workers = 'x'"):
        load("tiny-cpu", env={"DATA_WORKERS": "x"})


def test_unknown_profile_lists_the_known_ones():
    with pytest.raises(ConfigError, match="unknown profile 'nope': choose one of .*tiny-cpu"):
        load("nope", env={})


def test_min_max_chars_must_agree():
    with pytest.raises(ConfigError, match="data.max_chars .* is below data.min_chars"):
        load("tiny-cpu", ["data.max_chars=10"], env={})


@pytest.mark.parametrize("value, expected", [("1", True), ("true", True), ("0", False), ("off", False)])
def test_bool_spellings(value, expected):
    assert load("tiny-cpu", env={"SKIP_BAD": value})["data.skip_bad"] is expected



@pytest.mark.parametrize("stage, overrides, message", [
    ("lora", ["lora.micro_batch_size=32", "lora.global_batch_size=8"],
     r"lora.global_batch_size \(8\) is not a multiple of lora.micro_batch_size \(32\).*Fix: lora.micro_batch_size=8"),
    ("cpt", ["cpt.micro_batch_size=3"],
     r"cpt.global_batch_size \(32\) is not a multiple of cpt.micro_batch_size \(3\)"
     r".*Fix: cpt.micro_batch_size=2, or a global batch that is a multiple of 3"),
    ("cpt", ["launch.gpus=3"],
     r"cpt.global_batch_size \(32\) is not a multiple of cpt.micro_batch_size \(16 x 3 GPUs\)"
     r".*Fix: a global batch that is a multiple of 48"),
])
def test_a_global_batch_of_partial_micro_batches_is_refused_with_a_fix(stage, overrides, message):
    cfg = config.load("h100-80g", overrides)  # the other stages do not care: loading works
    with pytest.raises(ConfigError, match=message):
        config.check_batches(cfg, stage)
    config.check_batches(config.load("h100-80g"), "cpt")
    config.check_batches(config.load("h100-80g"), "lora")  # 32 of 32: one micro-batch a step
    assert config.largest_divisor(32, 12) == 8 and config.largest_divisor(7, 100) == 7
    # under slurm every node's GPUs train side by side; a local executor has one node
    assert config.data_parallel(config.load("h100-80g", ["launch.gpus=4", "launch.nodes=2"])) == 4
    slurm = config.load("h100-80g", ["launch.executor=slurm", "launch.gpus=4", "launch.nodes=2"])
    assert config.data_parallel(slurm) == 8
    with pytest.raises(ConfigError, match=r"cpt.micro_batch_size \(16 x 8 GPUs\)"):
        config.check_batches(slurm, "cpt")

def test_parse_shards():
    assert parse_shards("0-13") == list(range(14))
    assert parse_shards("3") == [3]
    assert parse_shards("0,2,5-7") == [0, 2, 5, 6, 7]
    assert parse_shards("1,1,0-1") == [0, 1]


def test_show_lists_every_key_with_its_origin():
    text = load("tiny-cpu", ["data.workers=3"], env={}).show()
    assert len(text.splitlines()) == len(config.KEYS)
    assert "data.workers" in text and "# command line" in text and "# profile tiny-cpu.yaml" in text


def test_a_training_stage_checks_its_batches_before_anything_else(tmp_path, monkeypatch):
    from jacpt import stages

    for var in ("JACPT_DATA_DIR", "JACPT_RUNS_DIR"):
        monkeypatch.setenv(var, str(tmp_path / var.lower()))
    cfg = config.load("tiny-cpu", ["lora.micro_batch_size=4"], env={})  # tiny-cpu's global batch is 2
    with pytest.raises(ConfigError, match=r"lora.global_batch_size \(2\) .*Fix: lora.micro_batch_size=2"):
        stages._train_stage(cfg, "lora", dry_run=False)  # no data, no CPT run: the batches are refused first
    assert not (tmp_path / "jacpt_runs_dir").exists()
