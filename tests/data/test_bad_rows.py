"""Every kind of bad row, under data.on_bad_row=error (one actionable message) and skip (counted).

Each case is a small .jsonl file whose row 2 (0-based, line 3) is bad and whose other rows are good.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest

from alignlab.data import DataError, SkipCount, build_datasets

EXPLICIT = [
    {"prompt": f"the {s} was", "chosen": "really great .", "rejected": "very dull ."}
    for s in ("film", "show", "book")
]
HH = [
    {
        "chosen": f"\n\nHuman: the {s} was\n\nAssistant: great .",
        "rejected": f"\n\nHuman: the {s} was\n\nAssistant: dull .",
    }
    for s in ("film", "show", "book")
]
PAIRWISE = [
    {"instruction": f"the {s} was", "output_1": "great .", "output_2": "dull .", "preference": 1}
    for s in ("film", "show", "book")
]
ALPACA = {
    "prompt": "instruction",
    "response_a": "output_1",
    "response_b": "output_2",
    "preference": "preference",
}


def chat(prompt: str, chosen: str, rejected: str) -> dict[str, Any]:
    return {
        "chosen": [{"role": "user", "content": prompt}, {"role": "assistant", "content": chosen}],
        "rejected": [{"role": "user", "content": prompt}, {"role": "assistant", "content": rejected}],
    }


def sharegpt(chosen: dict[str, Any]) -> dict[str, Any]:
    return {
        "conversations": [{"from": "human", "value": "the film was"}],
        "chosen": chosen,
        "rejected": {"from": "gpt", "value": "dull ."},
    }


CHAT = [chat(f"the {s} was", "great .", "dull .") for s in ("film", "show", "book")]
SHAREGPT = [sharegpt({"from": "gpt", "value": "great ."}) for _ in range(3)]


@dataclass
class Case:
    """Good rows, one bad row inserted at index 2, its reason and what its error must say."""

    good: list[dict[str, Any]]
    bad: Any
    reason: str
    says: tuple[str, ...]
    cfg: dict[str, Any] = field(default_factory=dict)
    #: set on the config after construction (to reach states that DataConfig's validation forbids)
    patch: dict[str, Any] = field(default_factory=dict)

    def rows(self) -> list[Any]:
        """The rows of the file: two good ones, the bad one, the rest."""
        return [*self.good[:2], self.bad, *self.good[2:]]


CASES = {
    "missing": Case(
        EXPLICIT,
        {"prompt": "the film was", "chosen": "great ."},
        "missing field",
        ("field 'rejected' is missing", "data.columns"),
    ),
    "non-string": Case(
        EXPLICIT,
        {"prompt": "the film was", "chosen": "great .", "rejected": 5},
        "non-string field",
        ("field 'rejected' is a int", "make the field a string"),
    ),
    "empty": Case(
        EXPLICIT,
        {"prompt": "  \n", "chosen": "great .", "rejected": "dull ."},
        "empty prompt or response",
        ("field 'prompt' is empty",),
    ),
    "identical": Case(
        EXPLICIT,
        {"prompt": "the film was", "chosen": "great .", "rejected": "great ."},
        "identical responses",
        ("chosen and rejected are identical",),
    ),
    "prompt too long": Case(
        EXPLICIT,
        {"prompt": "really very truly the film was", "chosen": "a", "rejected": "b"},
        "prompt too long",
        ("6 tokens", "raise data.max_prompt_length", "data.prompt_truncation=keep_end"),
        cfg={"max_length": 16, "max_prompt_length": 4},
    ),
    "corrupt JSON": Case(
        EXPLICIT, '{"prompt": "the film', "corrupt JSON line", ("line 3 is not valid JSON",)
    ),
    "not an object": Case(EXPLICIT, '"just text"', "row is not a JSON object", ("the row is a str",)),
    "HH mismatch": Case(
        HH,
        {
            "chosen": "\n\nHuman: the film was\n\nAssistant: great .",
            "rejected": "\n\nHuman: the show was\n\nAssistant: dull .",
        },
        "HH prompt mismatch",
        ("field 'rejected' does not start with the prompt",),
    ),
    "HH no assistant": Case(
        HH,
        {"chosen": "\n\nHuman: the film was", "rejected": "\n\nHuman: the show was"},
        "HH prompt mismatch",
        ("field 'chosen' has no '\\n\\nAssistant:' turn",),
    ),
    "HH empty response": Case(
        HH,
        {
            "chosen": "\n\nHuman: the film was\n\nAssistant: ",
            "rejected": "\n\nHuman: the film was\n\nAssistant: dull .",
        },
        "empty prompt or response",
        ("the chosen is empty",),
    ),
    "tie": Case(
        PAIRWISE,
        {**PAIRWISE[0], "preference": 0},
        "tie / no preference",
        ("field 'preference' is 0, not 1",),
        cfg={"columns": ALPACA},
    ),
    "messages": Case(
        CHAT,
        {**CHAT[0], "chosen": [{"role": "assistant"}]},
        "bad message structure",
        ("'chosen'[0] is not a {role: str, content: str} message",),
    ),
    "messages not a list": Case(
        CHAT, {**CHAT[0], "rejected": "dull ."}, "bad message structure", ("field 'rejected' is a str",)
    ),
    "empty message": Case(
        CHAT,
        chat("the film was", " ", "dull ."),
        "empty prompt or response",
        ("the chosen has no non-empty message",),
    ),
    "empty conversation": Case(
        CHAT, {**CHAT[0], "chosen": []}, "empty prompt or response", ("field 'chosen' is an empty list",)
    ),
    "no shared prompt": Case(
        CHAT,
        {
            "chosen": chat("the film was", "great .", "dull .")["chosen"],
            "rejected": chat("the show was", "great .", "dull .")["rejected"],
        },
        "empty prompt or response",
        ("the conversations share no leading message",),
    ),
    "ShareGPT speaker": Case(
        SHAREGPT,
        sharegpt({"from": "bot", "value": "great ."}),
        "bad message structure",
        ("unknown speaker 'bot'",),
    ),
    "empty after truncation": Case(
        EXPLICIT,
        {"prompt": "truly the film was", "chosen": "a", "rejected": "b"},
        "response empty after truncation",
        ("data.max_length=4",),
        cfg={"max_length": 8, "max_prompt_length": 4},
        patch={"max_length": 4},
    ),
}


def make(make_cfg, case: Case, **overrides: Any):
    cfg = make_cfg(case.rows(), **case.cfg, **overrides)
    for key, value in case.patch.items():
        setattr(cfg, key, value)
    return cfg


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_error_names_row_reason_and_fix(make_cfg, tokenizer, tmp_path, case):
    with pytest.raises(DataError) as error:
        build_datasets(make(make_cfg, case), tokenizer)
    text = str(error.value)
    assert "\n" not in text
    assert f"{tmp_path / 'data.jsonl'} row 2" in text
    assert f"({case.reason})" in text and "Fix:" in text
    for part in case.says:
        assert part in text
    assert "0 other bad rows" in text and "data.on_bad_row=skip" in text


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_skip_drops_and_counts(make_cfg, tokenizer, tmp_path, case):
    prepared = build_datasets(make(make_cfg, case, on_bad_row="skip"), tokenizer)
    report = prepared.report
    assert report.skipped == {case.reason: SkipCount(1, [f"{tmp_path / 'data.jsonl'} row 2"])}
    assert (report.rows_read, report.train_rows, report.rows_skipped) == (4, 3, 1)
    assert len(prepared.train) == 3
    assert case.reason in report.summary()


def test_error_counts_the_other_bad_rows(make_cfg, tokenizer):
    rows = [*EXPLICIT, {"prompt": "a"}, {"prompt": "b", "chosen": "c", "rejected": "c"}]
    with pytest.raises(
        DataError,
        match=r"row 3: field 'chosen' is missing .*\(1 other bad row found: 1 x identical responses; ",
    ):
        build_datasets(make_cfg(rows), tokenizer)


def test_skip_keeps_first_examples_per_reason(make_cfg, tokenizer):
    rows = [*EXPLICIT, *({"prompt": "a", "chosen": "b"} for _ in range(7)), "{oops"]
    report = build_datasets(make_cfg(rows, on_bad_row="skip"), tokenizer).report
    assert report.skipped["missing field"].count == 7
    examples = report.skipped["missing field"].examples
    assert [example.rsplit(" ", 1)[1] for example in examples] == ["3", "4", "5", "6", "7"]
    assert report.skipped["corrupt JSON line"].count == 1
    assert report.to_dict()["rows_skipped"] == 8


def test_all_rows_bad_is_an_error_even_when_skipping(make_cfg, tokenizer):
    with pytest.raises(DataError, match="no usable train rows left .*missing field"):
        build_datasets(
            make_cfg([{"prompt": "a", "chosen": "b"}, {"prompt": "a", "rejected": "b"}], on_bad_row="skip"),
            tokenizer,
        )


def test_every_row_skipped_names_each_reason_its_count_and_limit(make_cfg, tokenizer):
    long = [
        {"prompt": f"the {s} was really very", "chosen": "great .", "rejected": "dull ."}
        for s in ("film", "movie", "show")
    ]
    rows = [*long, {"prompt": "the book was", "chosen": "great .", "rejected": "great ."}]
    with pytest.raises(DataError) as error:  # held-out rows asked for: the cause is still the skipped rows
        build_datasets(
            make_cfg(rows, on_bad_row="skip", eval_size=0.1, max_prompt_length=4, max_length=8), tokenizer
        )
    text = str(error.value)
    assert (
        "no usable train rows left of 4 read, 1 held out for evaluation; skipped 2 x prompt too long (over "
        "data.max_prompt_length=4 tokens), 1 x identical responses. Fix: raise data.max_prompt_length" in text
    )
    assert "eval_size" not in text


def test_skips_in_the_report_name_their_limit(make_cfg, tokenizer):
    rows = [
        {"prompt": "the film was", "chosen": "great .", "rejected": "dull ."},
        {"prompt": "the show was really very", "chosen": "great .", "rejected": "dull ."},
    ]
    summary = build_datasets(
        make_cfg(rows, on_bad_row="skip", max_prompt_length=4, max_length=8), tokenizer
    ).report.summary()
    assert "skipped 1 x prompt too long (over data.max_prompt_length=4 tokens): e.g." in summary


def test_most_prompts_truncated_is_a_warning(make_cfg, tokenizer):
    rows = [
        {"prompt": f"the {s} was really very", "chosen": "great .", "rejected": "dull ."}
        for s in ("film", "movie", "show")
    ]
    report = build_datasets(
        make_cfg(rows, prompt_truncation="keep_end", max_prompt_length=3, max_length=5), tokenizer
    ).report
    assert report.warnings()[0].strip() == (
        "warning: 3 of 3 prompts (100%) were cut to data.max_prompt_length=3 "
        "tokens: the model sees little of them. Fix: raise data.max_prompt_length "
        "(and data.max_length)"
    )
    assert "warning: 6 of 6 responses (100%) were cut to fit data.max_length=5" in report.summary()
    short = build_datasets(make_cfg(rows, max_prompt_length=16, max_length=24), tokenizer).report
    assert short.warnings() == []
