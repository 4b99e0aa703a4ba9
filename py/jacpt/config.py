"""Settings: one flat table of typed keys, resolved with a fixed precedence.

    built-in default  <  configs/<profile>.yaml  <  environment  <  key=value

Every key is declared once in KEYS below with its type, default and a one-line
trade-off. Unknown keys and wrong types are errors that name the fix; every
resolved value remembers where it came from (``jacpt config --show``).
"""

from __future__ import annotations

import difflib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import yaml

from jacpt.paths import CONFIG_DIR


class ConfigError(Exception):
    """A setting is unknown or invalid; the message names where and the fix."""


@dataclass(frozen=True)
class Key:
    type: type
    default: Any
    help: str
    env: str | None = None
    choices: tuple[str, ...] | None = None
    check: Callable[[Any], str | None] | None = None  # returns an error text or None


_SHARDS_RE = re.compile(r"^\d+(-\d+)?(,\d+(-\d+)?)*$")


def parse_shards(spec: str, lo: int = 0, hi: int = 13) -> list[int]:
    """'0-13', '3', '0,2,5-7' -> sorted shard numbers within [lo, hi]."""
    spec = spec.replace(" ", "")
    if not _SHARDS_RE.match(spec):
        raise ValueError(f"bad shard spec {spec!r}: use N, A-B or a comma list like 0,3,5-7")
    out: set[int] = set()
    for part in spec.split(","):
        a, _, b = part.partition("-")
        first, last = int(a), int(b or a)
        if first > last or first < lo or last > hi:
            raise ValueError(f"bad shard range {part!r}: shards are {lo}..{hi} and A<=B")
        out.update(range(first, last + 1))
    return sorted(out)


def _check_shards(v: str) -> str | None:
    try:
        parse_shards(v)
    except ValueError as e:
        return str(e)
    return None


def _unit(v: float) -> str | None:
    return None if 0.0 <= v <= 1.0 else "must be between 0 and 1"


def _nonneg(v: int) -> str | None:
    return None if v >= 0 else "must be >= 0"


def _positive(v: int) -> str | None:
    return None if v >= 1 else "must be >= 1"


JAWIKI_URL = "https://gitlab.llm-jp.nii.ac.jp/datasets/llm-jp-corpus-v3/-/raw/main/ja/ja_wiki"

KEYS: dict[str, Key] = {
    # --- data: source -------------------------------------------------------------
    "data.source": Key(str, "llmjp", "llmjp (download ja_wiki), sample (the embedded corpus) or a directory "
                       "of train_*.jsonl[.gz] / validation_*.jsonl[.gz]", env="DATA_SOURCE"),
    "data.shards": Key(str, "0-13", "ja_wiki train shards to use (N, A-B or 0,3,5-7); validation_0 always comes too",
                       env="SHARDS", check=_check_shards),
    "data.base_url": Key(str, JAWIKI_URL, "where ja_wiki is downloaded from (a mirror, or a local server in tests)",
                         env="JAWIKI_BASE_URL"),
    # --- data: cleaning -------------------------------------------------------------
    "data.skip_bad": Key(bool, False, "count and skip structurally broken lines/files instead of stopping",
                         env="SKIP_BAD"),
    "data.min_chars": Key(int, 0, "drop documents shorter than this many characters (0: keep all)", check=_nonneg),
    "data.max_chars": Key(int, 0, "drop documents longer than this many characters (0: no limit)", check=_nonneg),
    "data.min_ja_ratio": Key(float, 0.0, "drop documents whose share of Japanese script (kana, kanji) among "
                             "non-space characters is below this (0: off)", check=_unit),
    "data.val_fraction": Key(float, 0.01, "share of documents held out for validation when a source has no "
                             "validation file (split by content hash, deterministic)", check=_unit),
    # --- data: tokenising -------------------------------------------------------------
    "data.backend": Key(str, "fast", "fast (HF tokenizers, N processes) or nemo (NeMo's "
                        "preprocess_data_for_megatron.py; slow, the reference)", env="DATA_BACKEND",
                        choices=("fast", "nemo")),
    "data.workers": Key(int, 2, "tokeniser processes; more than the cores you have only adds overhead",
                        env="DATA_WORKERS", check=_positive),
    # --- data: LoRA examples -------------------------------------------------------------
    "data.lora_source": Key(str, "auto", "auto (built from the cleaned corpus) or a directory with "
                            "training/validation/test.jsonl of {input, output}", env="LORA_DATA"),
    "data.lora_max_train": Key(int, 2000, "at most this many LoRA training examples (0: all)", check=_nonneg),
    "data.lora_max_eval": Key(int, 200, "at most this many LoRA validation and test examples each (0: all)",
                              check=_nonneg),
    # --- tokenizer -------------------------------------------------------------
    "tokenizer.dir": Key(str, "", "Qwen2.5 tokenizer directory, absolute or relative to the kit root "
                         "(empty: the embedded one that `make assets` builds)", env="TOKENIZER_DIR"),
}

_TYPES = {str: "a string", int: "an integer", float: "a number", bool: "true or false"}


def _coerce(key: str, spec: Key, value: Any, where: str) -> Any:
    """Convert value (YAML scalar or string from env/CLI) to spec.type, or raise ConfigError."""
    v = value
    try:
        if spec.type is bool:
            if isinstance(v, str):
                low = v.strip().lower()
                if low not in ("1", "0", "true", "false", "yes", "no", "on", "off", ""):
                    raise ValueError
                v = low in ("1", "true", "yes", "on")
            elif not isinstance(v, bool):
                raise ValueError
        elif spec.type is int:
            if isinstance(v, bool) or (isinstance(v, float) and not v.is_integer()):
                raise ValueError
            v = int(v)
        elif spec.type is float:
            if isinstance(v, bool):
                raise ValueError
            v = float(v)
        elif spec.type is str:
            if isinstance(v, (dict, list)) or v is None:
                raise ValueError
            v = str(v)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: {key} = {value!r} is not {_TYPES[spec.type]} ({spec.help})") from None
    if spec.choices and v not in spec.choices:
        raise ConfigError(f"{where}: {key} = {v!r} is not one of {', '.join(spec.choices)}")
    if spec.check and (msg := spec.check(v)):
        raise ConfigError(f"{where}: {key} = {v!r}: {msg}")
    return v


def _unknown(key: str, where: str) -> ConfigError:
    close = difflib.get_close_matches(key, KEYS, n=1)
    hint = f"; did you mean {close[0]}?" if close else ""
    return ConfigError(f"{where}: unknown setting {key!r}{hint} (`jacpt config` lists them all)")


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, name + "."))
        else:
            out[name] = v
    return out


def profiles() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


@dataclass
class Config:
    profile: str
    values: dict[str, Any]
    origin: dict[str, str]

    def __getitem__(self, key: str) -> Any:
        return self.values[key]

    def section(self, name: str) -> dict[str, Any]:
        p = name + "."
        return {k[len(p):]: v for k, v in self.values.items() if k.startswith(p)}

    def show(self) -> str:
        width = max(map(len, self.values))
        return "\n".join(f"{k:<{width}}  {self.values[k]!r:<40}  # {self.origin[k]}" for k in sorted(self.values))

    def as_dict(self) -> dict[str, Any]:
        return {"profile": self.profile, **dict(sorted(self.values.items()))}


def load(profile: str, overrides: list[str] | tuple[str, ...] = (), env: dict[str, str] | None = None) -> Config:
    """Resolve the settings of `profile`: defaults < configs/<profile>.yaml < env < key=value."""
    env = os.environ if env is None else env
    path = CONFIG_DIR / f"{profile}.yaml"
    if not path.is_file():
        raise ConfigError(f"unknown profile {profile!r}: choose one of {', '.join(profiles())} (files in {CONFIG_DIR})")
    values = {k: s.default for k, s in KEYS.items()}
    origin = {k: "default" for k in KEYS}

    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections (data:, tokenizer:, ...)")
    for k, v in _flatten(raw).items():
        if k not in KEYS:
            raise _unknown(k, str(path))
        values[k], origin[k] = _coerce(k, KEYS[k], v, str(path)), f"profile {path.name}"

    for k, spec in KEYS.items():
        if spec.env and env.get(spec.env, "") != "":
            values[k], origin[k] = _coerce(k, spec, env[spec.env], f"env {spec.env}"), f"env {spec.env}"

    for item in overrides:
        k, eq, v = item.partition("=")
        if not eq:
            raise ConfigError(f"override {item!r}: write key=value, e.g. data.workers=4")
        k = k.strip()
        if k not in KEYS:
            raise _unknown(k, "command line")
        values[k], origin[k] = _coerce(k, KEYS[k], v, "command line"), "command line"

    if values["data.max_chars"] and values["data.max_chars"] < values["data.min_chars"]:
        raise ConfigError(f"data.max_chars ({values['data.max_chars']}) is below data.min_chars "
                          f"({values['data.min_chars']}): raise max_chars or set it to 0 (no limit)")
    return Config(profile=profile, values=values, origin=origin)
