"""The evaluation's answer metrics and the one table every output shows them in.

Pure Python and sacrebleu (no torch, no NeMo): the report reads eval.json through `table` without
loading a model. Definitions, for an answer `a` (the generated text, surrounding whitespace stripped)
and its reference `r` (the test example's `output`):

* **Japanese answer** (`is_japanese`): the share of Japanese-script characters (hiragana, katakana,
  kanji, 々, ー) among letters (`corpus.japanese_ratio`, the rule of `data.min_ja_ratio`; whitespace,
  digits and punctuation don't count) is >= the threshold (`eval.ja_threshold`), AND the answer has
  at least MIN_KANA kana (hiragana or katakana proper; ー and ・ are no kana). Chinese is written in
  Han characters too: text of Han alone counts as Chinese, not Japanese. A short all-kanji Japanese
  answer such as "東京都" therefore counts as not Japanese: a known miss, accepted because the test
  answers are sentences of running text, which in Japanese always carry kana (particles, endings).
  An empty answer, or one without letters, is not Japanese.
* **Repetition loop** (`find_loop`): some unit of at least `unit` characters (`eval.repeat_unit`)
  occurs `times` (`eval.repeat_times`) or more times in a row, back to back. A run of one character
  (or of any shorter unit) counts once it is at least unit x times characters long, since it then
  holds a `unit`-character unit `times` times.
* **Exact match** (`exact_match`): equal after `normalize`: Unicode NFKC, then every whitespace
  character removed (Japanese has no word spaces; full-width and half-width forms compare equal).
* **chrF**: sacrebleu's chrF (character n-grams up to 6, beta 2, whitespace ignored), 0-100.
* **BLEU**: sacrebleu's BLEU with `tokenize="char"` (every character a token, so Japanese needs no
  word segmenter and works offline), 0-100. Corpus scores go in the table, sentence scores
  (`effective_order`) in each example's record.
* **Length**: characters (code points) of the answer.
"""

from __future__ import annotations

import re
import unicodedata

from jacpt.corpus import japanese_ratio

MIN_KANA = 1  # kana an answer needs to count as Japanese (above): pure-Han text is Chinese
_KANA = re.compile(r"[\u3041-\u3096\u30a1-\u30fa\u31f0-\u31ff\uff66-\uff6f\uff71-\uff9d]")
BLEU_TOKENIZE = "char"


# ----------------------------------------------------------------------------- one answer

def kana_count(text: str) -> int:
    return len(_KANA.findall(text))


def japanese_share(text: str) -> float:
    """Share of letters that are Japanese script (kana, kanji, 々, ー); 0.0 without letters."""
    return japanese_ratio(text)


def is_japanese(text: str, threshold: float) -> bool:
    """Mostly Japanese script (share >= threshold) and some kana (pure Han is Chinese)."""
    return kana_count(text) >= MIN_KANA and japanese_share(text) >= threshold


def find_loop(text: str, unit: int, times: int) -> str | None:
    """The first (shortest) unit of >= `unit` characters repeated >= `times` times back to back, or None.

    For each period p, a span with that period is a run of positions j where text[j] == text[j + p];
    a run of p * (times - 1) such positions is `times` copies of a p-character unit. O(len(text)^2 / times).
    """
    if unit < 1 or times < 2:
        raise ValueError(f"a loop needs unit >= 1 and times >= 2 (got unit={unit}, times={times})")
    n = len(text)
    for p in range(unit, n // times + 1):
        need, run = p * (times - 1), 0
        for j in range(n - p):
            run = run + 1 if text[j] == text[j + p] else 0
            if run >= need:
                start = j - need + 1
                return text[start:start + p]
    return None


def normalize(text: str) -> str:
    """The exact-match form: NFKC, every whitespace character removed."""
    return "".join(unicodedata.normalize("NFKC", text).split())


def exact_match(answer: str, reference: str) -> bool:
    return normalize(answer) == normalize(reference)


# ----------------------------------------------------------------------------- scores

def _bleu(sentence: bool = False):
    from sacrebleu.metrics import BLEU

    return BLEU(tokenize=BLEU_TOKENIZE, effective_order=sentence)


def _chrf():
    from sacrebleu.metrics import CHRF

    return CHRF()


def corpus_bleu(answers: list[str], references: list[str]) -> float:
    return _bleu().corpus_score(answers, [references]).score if answers else 0.0


def corpus_chrf(answers: list[str], references: list[str]) -> float:
    return _chrf().corpus_score(answers, [references]).score if answers else 0.0


def sentence_bleu(answer: str, reference: str) -> float:
    return _bleu(sentence=True).sentence_score(answer, [reference]).score


def sentence_chrf(answer: str, reference: str) -> float:
    return _chrf().sentence_score(answer, [reference]).score


def signatures() -> dict[str, str]:
    """sacrebleu's own description of the two scores (tokenisation, n-gram orders, version)."""
    out = {}
    for name, metric in (("bleu", _bleu()), ("chrf", _chrf())):
        metric.corpus_score(["a"], [["a"]])  # sacrebleu knows the reference count only after a first score
        out[name] = str(metric.get_signature())
    return out


def answer_record(answer: str, reference: str, threshold: float, unit: int, times: int) -> dict:
    """Every metric of one answer, for eval.json's per-example records."""
    loop = find_loop(answer, unit, times)
    return {"chars": len(answer), "ja_share": round(japanese_share(answer), 4), "kana": kana_count(answer),
            "japanese": is_japanese(answer, threshold), "loop": loop[:40] if loop is not None else None,
            "repeat": loop is not None, "exact": exact_match(answer, reference),
            "chrf": round(sentence_chrf(answer, reference), 2), "bleu": round(sentence_bleu(answer, reference), 2)}


def text_stats(texts: list[str], threshold: float, unit: int, times: int) -> dict:
    """Rates that need no reference: Japanese answers, loops, mean length (also applied to the references)."""
    n = len(texts)
    return {"ja_rate": sum(is_japanese(t, threshold) for t in texts) / n if n else None,
            "repeat_rate": sum(find_loop(t, unit, times) is not None for t in texts) / n if n else None,
            "mean_chars": sum(len(t) for t in texts) / n if n else None}


def summarize(answers: list[str], references: list[str], threshold: float, unit: int, times: int) -> dict:
    """One model's table values over all examples: rates as fractions, chrF and BLEU corpus-level 0-100."""
    n = len(answers)
    return {"examples": n,
            "exact_match": sum(exact_match(a, r) for a, r in zip(answers, references)) / n if n else None,
            "chrf": round(corpus_chrf(answers, references), 2), "bleu": round(corpus_bleu(answers, references), 2),
            **text_stats(answers, threshold, unit, times)}


# ----------------------------------------------------------------------------- the table

def _pct(v: float) -> str:
    return f"{100 * v:.1f}%"


# (result key, label, format). Arrows: which way is better. The console, eval.md, the model card,
# wandb and the offline report all show this table, built by `table`.
ROWS = (
    ("perplexity", "perplexity (validation) ↓", "{:.3f}"),
    ("mean_nll", "mean NLL, nats/token ↓", "{:.4f}"),
    ("tokens", "validation tokens scored", "{:,}"),
    ("examples", "test examples answered", "{:,}"),
    ("exact_match", "exact match ↑", _pct),
    ("chrf", "chrF ↑", "{:.1f}"),
    ("bleu", "BLEU, char tokens ↑", "{:.1f}"),
    ("ja_rate", "Japanese answers ↑", _pct),
    ("repeat_rate", "answers with a loop ↓", _pct),
    ("mean_chars", "answer length, chars", "{:.1f}"),
    ("new_tokens", "tokens generated", "{:,}"),
    ("latency_s", "latency per answer, s ↓", "{:.3f}"),
    ("gen_tokens_per_s", "generated tokens/s ↑", "{:.1f}"),
)
REFERENCE_KEYS = ("examples", "ja_rate", "repeat_rate", "mean_chars")


def fmt(v, f) -> str:
    if v is None:
        return "n/a"
    return f(v) if callable(f) else f.format(v)


def table(doc: dict) -> tuple[list[str], list[list[str]]]:
    """(header, rows): one row per metric, one column per model, and the references' own values where a
    metric needs none (the classifier's and loop detector's baseline). Rows no result has are left out,
    so an eval.json of format 1 (perplexity only) gives its perplexity rows."""
    results, ref = doc["results"], doc.get("reference")
    header = ["metric"] + [r["label"] for r in results] + (["reference"] if ref else [])
    rows = []
    for key, label, f in ROWS:
        if not any(key in r for r in results):
            continue
        row = [label] + [fmt(r.get(key), f) for r in results]
        if ref:
            row.append(fmt(ref.get(key), f) if key in REFERENCE_KEYS else "-")
        rows.append(row)
    return header, rows


def text_table(header: list[str], rows: list[list[str]]) -> str:
    """Aligned columns for a terminal: labels left, values right."""
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]

    def line(r: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))

    return "\n".join([line(header), "  ".join("-" * w for w in widths)] + [line(r) for r in rows])


def markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    """GitHub Markdown lines: the label column left-aligned, the values right-aligned."""
    def cell(c: str) -> str:
        return c.replace("|", "\\|").replace("\n", " ")

    out = ["| " + " | ".join(cell(h) for h in header) + " |", "|---" + "|---:" * (len(header) - 1) + "|"]
    return out + ["| " + " | ".join(cell(c) for c in r) + " |" for r in rows]


def definitions(doc: dict) -> list[str]:
    """What the table's rows mean, as the console, eval.md, the model card and the report print them under it.
    An eval.json of format 1 (perplexity only) gets the perplexity line alone."""
    s, d = doc["settings"], doc["data"]
    out = [f"perplexity: exp(mean next-token NLL) over {d['prefix']} (validation), windows of {s['seq_length']} "
           "tokens"]
    if "decoding" not in doc:
        return out
    dec, t = doc["decoding"], d["test"]
    return out + [
        f"answers: {t['used']} of {t['examples']} examples of {t['path']}; prompt = input (template "
        f"\"{dec['template']}\", no BOS), greedy, at most {s['max_new_tokens']} new tokens, stop at eos",
        "exact match: equal after NFKC with all whitespace removed",
        f"chrF: sacrebleu {dec['chrf']}; BLEU: sacrebleu, tokenize=char ({dec['bleu']}); both corpus-level",
        f"Japanese answer: Japanese-script share of letters >= {s['ja_threshold']} and at least {dec['min_kana']} "
        "kana (Han alone counts as Chinese)",
        f"loop: a unit of >= {s['repeat_unit']} characters repeated >= {s['repeat_times']} times back to back",
        f"latency: per answer, in batches of {s['batch_size']} (each answer counts its batch's wall time); "
        f"transformers on {doc['device']}, {doc['dtype']}",
        "reference: the same measures on the test set's references",
    ]
