"""Tokenization: EOS, special tokens, truncation policies and the fingerprint cache."""

from __future__ import annotations

import pytest
from tokenizers import processors

from alignlab.builtin import build_tokenizer
from alignlab.data import DataError, build_datasets
from alignlab.data.tokenize import TokenizeSettings, fit

EOS = 1


def settings(max_length=10, max_prompt_length=4, prompt_truncation="error", chat=False):
    return TokenizeSettings(
        max_length, max_prompt_length, prompt_truncation, "explicit", chat, ("chosen", "rejected")
    )


# --- fit: EOS and limits on plain id lists --------------------------------------------------------


def test_fit_appends_eos_within_limits():
    row = fit([7, 8], [[9], [10, 11]], EOS, settings())
    assert (row.prompt_ids, row.response_ids) == ([7, 8], [[9, EOS], [10, 11, EOS]])
    assert (row.prompt_truncated, row.responses_truncated, row.reason) == (False, 0, "")


@pytest.mark.parametrize(
    ("policy", "kept"), [("keep_end", [12, 13, 14, 15]), ("keep_start", [10, 11, 12, 13])]
)
def test_fit_prompt_truncation(policy, kept):
    row = fit([10, 11, 12, 13, 14, 15], [[20], [21]], EOS, settings(prompt_truncation=policy))
    assert row.prompt_ids == kept and row.prompt_truncated
    assert row.response_ids == [[20, EOS], [21, EOS]]


def test_fit_prompt_too_long_is_a_bad_row():
    row = fit([10, 11, 12, 13, 14], [[20], [21]], EOS, settings())
    assert row.reason == "prompt too long"
    assert "5 tokens" in row.detail and "data.max_prompt_length=4" in row.detail


def test_fit_cuts_responses_on_the_right_losing_eos():
    # prompt 4 tokens, max_length 6: 2 response tokens left
    row = fit([10, 11, 12, 13], [[20, 21, 22], [23]], EOS, settings(max_length=6))
    assert row.response_ids == [[20, 21], [23, EOS]]
    assert row.responses_truncated == 1


def test_fit_no_budget_left_is_a_bad_row():
    row = fit([10, 11, 12, 13], [[20], [21]], EOS, settings(max_length=4))
    assert row.reason == "response empty after truncation"


@pytest.mark.parametrize(
    ("chat", "response", "expected"),
    [
        (False, [20, EOS], [20, EOS]),  # already ends with EOS: not doubled
        (False, [EOS, 20], [EOS, 20, EOS]),
        (True, [20, EOS, 30], [20, EOS, 30]),  # a template's end-of-turn followed by e.g. a newline
        (True, [20, 30], [20, 30, EOS]),
    ],
)
def test_fit_eos_rules(chat, response, expected):
    assert fit([10], [response, [21]], EOS, settings(chat=chat)).response_ids[0] == expected


# --- end to end -----------------------------------------------------------------------------------


LONG = [
    {"prompt": "really very truly the film was", "chosen": "really very truly great .", "rejected": "dull ."}
]


@pytest.mark.parametrize(
    ("policy", "prompt"), [("keep_end", "truly the film was"), ("keep_start", "really very truly the")]
)
def test_truncation_end_to_end(make_cfg, tokenizer, ids, policy, prompt):
    cfg = make_cfg(LONG, max_length=8, max_prompt_length=4, prompt_truncation=policy)
    prepared = build_datasets(cfg, tokenizer)
    row = prepared.train[0]
    assert row["prompt_ids"] == ids(prompt)
    assert row["chosen_ids"] == ids("really very truly great")  # 5 tokens + EOS cut to the 4 left
    assert row["rejected_ids"] == ids("dull .") + [EOS]
    assert (prepared.report.prompts_truncated, prepared.report.responses_truncated) == (1, 1)


@pytest.fixture(scope="module")
def bos_tokenizer():
    """The builtin tokenizer, but adding <|system|> (id 5) as a BOS when add_special_tokens=True."""
    tokenizer = build_tokenizer()
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<|system|> $A", special_tokens=[("<|system|>", 5)]
    )
    return tokenizer


def test_text_prompt_gets_special_tokens_responses_do_not(make_cfg, bos_tokenizer, ids, pairs):
    row = build_datasets(make_cfg(pairs(1)), bos_tokenizer).train[0]
    assert row["prompt_ids"] == [5, *ids("the film was")]
    assert row["chosen_ids"] == ids("really great .") + [EOS]


def test_rendered_prompt_gets_no_special_tokens(make_cfg, bos_tokenizer, ids):
    user = {"role": "user", "content": "the film was"}
    rows = [
        {
            "chosen": [user, {"role": "assistant", "content": "great ."}],
            "rejected": [user, {"role": "assistant", "content": "dull ."}],
        }
    ]
    row = build_datasets(make_cfg(rows), bos_tokenizer).train[0]
    assert row["prompt_ids"] == ids("<|user|> the film was <|assistant|>")


def test_tokenizer_without_eos(make_cfg, tokenizer, pairs):
    no_eos = tokenizer.__class__(tokenizer_object=tokenizer.backend_tokenizer, pad_token="<pad>")
    assert no_eos.eos_token_id is None
    with pytest.raises(DataError, match="no eos_token_id"):
        build_datasets(make_cfg(pairs(2)), no_eos)


# --- cache ----------------------------------------------------------------------------------------


def test_second_identical_call_is_a_cache_hit(make_cfg, tokenizer, pairs, tmp_path):
    cfg = make_cfg(pairs(8), eval_size=2)
    first = build_datasets(cfg, tokenizer)
    second = build_datasets(cfg, tokenizer)
    assert (first.report.cache_hit, second.report.cache_hit) == (False, True)
    assert second.train.to_list() == first.train.to_list()
    assert second.eval.to_list() == first.eval.to_list()
    assert second.report.to_dict() == {**first.report.to_dict(), "cache_hit": True}
    entries = [p for p in (tmp_path / "cache").iterdir()]
    assert len(entries) == 2 and not any(p.name.startswith(".tmp") for p in entries)  # train and eval


@pytest.mark.parametrize(
    "change", [{"max_length": 2048}, {"max_prompt_length": 8}, {"prompt_truncation": "keep_end"}]
)
def test_settings_change_the_fingerprint(make_cfg, tokenizer, pairs, change):
    build_datasets(make_cfg(pairs(4)), tokenizer)
    assert not build_datasets(make_cfg(pairs(4), **change), tokenizer).report.cache_hit


def test_rows_responses_and_tokenizer_change_the_fingerprint(make_cfg, tokenizer, bos_tokenizer, pairs):
    build_datasets(make_cfg(pairs(4)), tokenizer)
    assert not build_datasets(make_cfg(pairs(5)), tokenizer).report.cache_hit
    assert not build_datasets(make_cfg(pairs(4)), bos_tokenizer).report.cache_hit
    triples = [{**row, "gold": "superb !"} for row in pairs(4)]
    build_datasets(make_cfg(triples), tokenizer)
    triple = build_datasets(make_cfg(triples), tokenizer, responses=("gold", "chosen", "rejected"))
    assert not triple.report.cache_hit


def test_interrupted_write_is_not_a_hit(make_cfg, tokenizer, pairs, tmp_path):
    """A leftover temporary folder (a run killed while saving) is ignored."""
    cfg = make_cfg(pairs(4))
    build_datasets(cfg, tokenizer)
    [entry] = (tmp_path / "cache").iterdir()
    entry.rename(tmp_path / "cache" / f".tmp-{entry.name}-dead")
    assert not build_datasets(cfg, tokenizer).report.cache_hit
    assert build_datasets(cfg, tokenizer).report.cache_hit


def test_num_proc_gives_the_same_rows(make_cfg, tokenizer, pairs, tmp_path):
    one = build_datasets(make_cfg(pairs(12)), tokenizer)
    two = build_datasets(make_cfg(pairs(12), num_proc=2, cache_dir=str(tmp_path / "other")), tokenizer)
    assert not two.report.cache_hit
    assert two.train.to_list() == one.train.to_list()
