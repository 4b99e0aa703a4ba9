"""jacpt.metrics: the answer metrics on hand-written inputs with known answers; no model, no torch."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest

from jacpt import metrics

JA = "東京は日本の首都であり、政治と経済の中心である。"
ZH = "北京是中华人民共和国的首都，也是全国的政治和文化中心。"
EN = "Tokyo is the capital of Japan and its political centre."


# ----------------------------------------------------------------------------- Japanese or not

@pytest.mark.parametrize("text, japanese", [
    (JA, True),
    ("カタカナだけのテキストです", True),
    ("ひらがな", True),
    (ZH, False),                                       # Han alone: Chinese
    ("中华人民共和国", False),
    ("東京都", False),                                 # the documented miss: short all-kanji Japanese
    (EN, False),
    ("", False),
    ("   \n\t", False),
    ("12345。、！？", False),                          # no letters at all
    ("東京はTokyo Metropolisと呼ばれるcityです", False),  # 10 of 29 letters Japanese: below 0.5
    ("東京はTokyoと呼ばれる", True),                  # 8 of 13 letters Japanese, with kana
    ("ｶﾀｶﾅ", True),                                   # half-width katakana is kana
    ("ーーー・・・", False),                           # the long-vowel mark and the middle dot are no kana
])
def test_is_japanese(text, japanese):
    assert metrics.is_japanese(text, 0.5) is japanese


def test_japanese_share_ignores_digits_punctuation_and_spaces():
    assert metrics.japanese_share("東京 2024年。!!") == 1.0
    assert metrics.japanese_share("abc東京") == pytest.approx(2 / 5)
    assert metrics.japanese_share("") == 0.0 and metrics.japanese_share("123") == 0.0
    assert metrics.kana_count(JA) == 10 and metrics.kana_count(ZH) == 0


def test_threshold_decides_mixed_scripts():
    mixed = "日本語とEnglish"  # 4 Japanese letters of 11
    assert metrics.japanese_share(mixed) == pytest.approx(4 / 11)
    assert metrics.is_japanese(mixed, 0.3) and not metrics.is_japanese(mixed, 0.5)
    assert metrics.is_japanese(JA, 1.0)  # every letter Japanese: passes even the strictest threshold


# ----------------------------------------------------------------------------- loops

@pytest.mark.parametrize("text, unit, times, loop", [
    ("これはテストです。" * 40, 4, 3, "これはテストです。"),   # a sentence said forever
    ("StackNavigator" * 24, 4, 3, "StackNavigator"),         # what the random tiny model writes
    ("あ" * 12, 4, 3, "ああああ"),                              # a one-character run, 4 x 3 long
    ("あ" * 11, 4, 3, None),                                   # one short of 4 x 3
    ("の、の、の、の、の、の、", 4, 3, "の、の、"),            # a short unit that repeats long enough
    ("abcdabcd", 4, 3, None),                                  # twice is no loop at times=3
    ("abcdabcd", 4, 2, "abcd"),
    (JA, 4, 3, None),
    ("", 4, 3, None),
    ("東京は東京は東京は", 3, 3, "東京は"),
    ("東京は東京は東京は", 4, 3, None),                        # the unit is shorter than asked for
])
def test_find_loop(text, unit, times, loop):
    assert metrics.find_loop(text, unit, times) == loop


def test_find_loop_refuses_settings_that_make_everything_a_loop():
    with pytest.raises(ValueError, match="times >= 2"):
        metrics.find_loop(JA, 4, 1)


def test_find_loop_finds_a_loop_after_normal_text():
    text = JA + "そして" + "同じ言葉を繰り返す。" * 3
    assert metrics.find_loop(text, 4, 3) == "同じ言葉を繰り返す。"
    assert metrics.find_loop(JA + "同じ言葉を繰り返す。" * 2, 4, 3) is None


# ----------------------------------------------------------------------------- exact match

def test_exact_match_normalises_nfkc_and_whitespace():
    assert metrics.normalize(" 東京 は\u3000首都。\n") == "東京は首都。"
    assert metrics.exact_match("ＡＢＣ１２３", "ABC123")       # full-width forms fold with NFKC
    assert metrics.exact_match("ｶﾀｶﾅ", "カタカナ")              # so does half-width katakana
    assert metrics.exact_match("東京 は 首都", "東京は首都")
    assert not metrics.exact_match("東京は首都", "東京は首都。")
    assert not metrics.exact_match("", JA)
    assert metrics.exact_match("", "  ")


# ----------------------------------------------------------------------------- chrF and BLEU

def test_chrf_and_bleu_on_identical_and_disjoint_strings():
    assert metrics.corpus_chrf([JA], [JA]) == pytest.approx(100)
    assert metrics.corpus_bleu([JA], [JA]) == pytest.approx(100)
    assert metrics.sentence_chrf(JA, JA) == pytest.approx(100)
    assert metrics.sentence_bleu(JA, JA) == pytest.approx(100)
    assert metrics.corpus_chrf(["xyz"], [JA]) == 0 and metrics.corpus_bleu(["xyz"], [JA]) == 0
    assert metrics.corpus_chrf([""], [JA]) == 0 and metrics.corpus_bleu([""], [JA]) == 0
    assert metrics.corpus_chrf([], []) == 0 and metrics.corpus_bleu([], []) == 0


def test_bleu_tokenises_japanese_by_character():
    ref = "東京は日本の首都である"
    # A word-level (13a) tokeniser sees each unspaced sentence as one token: all or nothing. Character tokens
    # give partial credit for a near miss.
    near = "東京は日本の首都だ"
    got = metrics.sentence_bleu(near, ref)
    assert 0 < got < 100
    from sacrebleu.metrics import BLEU

    assert BLEU(tokenize="13a", effective_order=True).sentence_score(near, [ref]).score == 0
    # char BLEU by hand: 9 hypothesis characters, 8 of them in the reference in order ("東京は日本の首都"), with
    # 8/7/6/5 matching 1-4-grams of 9/8/7/6; brevity penalty exp(1 - 11/9).
    precisions = [8 / 9, 7 / 8, 6 / 7, 5 / 6]
    want = 100 * math.exp(1 - 11 / 9) * math.exp(sum(math.log(p) for p in precisions) / 4)
    assert got == pytest.approx(want, rel=1e-9)
    assert "tok:char" in metrics.signatures()["bleu"]


def test_chrf_ignores_whitespace():
    assert metrics.sentence_chrf("東京 は 日本", "東京は日本") == pytest.approx(100)


# ----------------------------------------------------------------------------- records and the table

def test_summarize_and_answer_record():
    answers = [JA, ZH, "", "これはテストです。" * 5]
    refs = [JA, JA, JA, JA]
    s = metrics.summarize(answers, refs, 0.5, 4, 3)
    assert s["examples"] == 4 and s["exact_match"] == 0.25
    assert s["ja_rate"] == 0.5 and s["repeat_rate"] == 0.25
    assert s["mean_chars"] == (len(JA) + len(ZH) + 0 + 45) / 4
    assert 0 < s["chrf"] < 100 and 0 < s["bleu"] < 100
    rec = metrics.answer_record("", JA, 0.5, 4, 3)
    assert rec == {"chars": 0, "ja_share": 0.0, "kana": 0, "japanese": False, "loop": None, "repeat": False,
                   "exact": False, "chrf": 0.0, "bleu": 0.0}
    rec = metrics.answer_record("これはテストです。" * 5, JA, 0.5, 4, 3)
    assert rec["repeat"] and rec["loop"] == "これはテストです。" and rec["japanese"]
    empty = metrics.summarize([], [], 0.5, 4, 3)
    assert empty["examples"] == 0 and empty["ja_rate"] is None and empty["exact_match"] is None


def _doc(with_answers: bool) -> dict:
    row = {"key": "base", "label": "base", "tokens": 300, "mean_nll": 2.0, "perplexity": math.exp(2.0)}
    if with_answers:
        row.update(examples=4, exact_match=0.25, chrf=40.0, bleu=20.0, ja_rate=0.75, repeat_rate=0.0,
                   mean_chars=50.0, new_tokens=96, latency_s=0.5, gen_tokens_per_s=48.0)
    doc = {"results": [row, {**row, "key": "cpt", "label": "CPT"}]}
    if with_answers:
        doc["reference"] = {"examples": 4, "ja_rate": 1.0, "repeat_rate": 0.0, "mean_chars": 60.0}
    return doc


def test_table_has_a_row_per_metric_and_a_column_per_model():
    header, rows = metrics.table(_doc(True))
    assert header == ["metric", "base", "CPT", "reference"]
    assert [r[0] for r in rows] == [label for _, label, _ in metrics.ROWS]
    by = {r[0]: r[1:] for r in rows}
    assert by["exact match ↑"] == ["25.0%", "25.0%", "-"]
    assert by["Japanese answers ↑"] == ["75.0%", "75.0%", "100.0%"]
    assert by["perplexity (validation) ↓"][0] == f"{math.exp(2.0):.3f}"
    text = metrics.text_table(header, rows)
    assert max(len(line) for line in text.splitlines()) <= 80
    md = metrics.markdown_table(header, rows)
    assert md[0] == "| metric | base | CPT | reference |" and md[1] == "|---|---:|---:|---:|"
    assert len(md) == 2 + len(rows)


def test_table_of_a_perplexity_only_eval_has_its_rows_only():
    header, rows = metrics.table(_doc(False))
    assert header == ["metric", "base", "CPT"]
    assert [r[0] for r in rows] == ["perplexity (validation) ↓", "mean NLL, nats/token ↓",
                                    "validation tokens scored"]


def test_import_pulls_in_no_torch_or_nemo():
    code = ("import sys, jacpt.metrics; bad = [m for m in ('torch', 'nemo', 'transformers', 'megatron') "
            "if m in sys.modules]; print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
