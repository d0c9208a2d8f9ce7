"""Smoke tests on the real sample files in ../shared (skipped when that folder is absent).

Expected counts are worked out here from the raw files with plain Python, not with the pipeline.
"""

from __future__ import annotations

import gzip
import json

import pytest

from alignlab.data import SkipCount, build_datasets

pytestmark = pytest.mark.shared
ASSISTANT = "\n\nAssistant:"


@pytest.fixture(scope="module")
def stories_tokenizer(shared):
    """The real SentencePiece tokenizer of stories260k (adds BOS 1; EOS 2)."""
    path = shared / "models" / "stories260k"
    if not path.is_dir():
        pytest.skip(f"needs {path.resolve()} (absent on a plain clone)")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def test_hh_first_50_rows(shared, make_cfg, stories_tokenizer):
    path = shared / "data" / "hh-rlhf" / "harmless-base-test.jsonl.gz"
    with gzip.open(path, "rt") as f:
        raw = [json.loads(next(f)) for _ in range(50)]
    prompts = [row["chosen"][: row["chosen"].rfind(ASSISTANT) + len(ASSISTANT)] for row in raw]
    expected_bad = sum(
        not row["rejected"].startswith(p) or row["chosen"] == row["rejected"]
        for row, p in zip(raw, prompts, strict=True)
    )
    cfg = make_cfg(path=str(path), limit=50, max_length=2048, max_prompt_length=1536)
    prepared = build_datasets(cfg, stories_tokenizer)
    assert prepared.report.format == "hh"
    assert prepared.report.rows_read == 50 and len(prepared.train) == 50 - expected_bad
    first = prepared.train[0]
    assert first["prompt_ids"][0] == stories_tokenizer.bos_token_id
    prompt = stories_tokenizer.decode(first["prompt_ids"], skip_special_tokens=True)
    assert prompt.endswith("Assistant:") and prompt.strip() == prompts[0].strip()
    assert all(ids[-1] == stories_tokenizer.eos_token_id for ids in prepared.train["chosen_ids"])
    assert stories_tokenizer.bos_token_id not in first["chosen_ids"]


def test_alpaca_eval_annotations(shared, make_cfg, stories_tokenizer):
    path = shared / "data" / "alpaca-eval" / "annotations.json"
    raw = json.loads(path.read_text())
    ties = [i for i, row in enumerate(raw) if row["preference"] not in (1, 2)]
    identical = [i for i, row in enumerate(raw) if i not in ties and row["output_1"] == row["output_2"]]
    columns = {
        "prompt": "instruction",
        "response_a": "output_1",
        "response_b": "output_2",
        "preference": "preference",
    }
    cfg = make_cfg(path=str(path), columns=columns, on_bad_row="skip", prompt_truncation="keep_end")
    report = build_datasets(cfg, stories_tokenizer).report
    assert report.format == "pairwise"
    assert report.skipped["tie / no preference"].count == len(ties) > 0
    assert report.skipped["tie / no preference"].examples[0] == f"{path} row {ties[0]}"
    assert report.skipped.get("identical responses", SkipCount()).count == len(identical)
    assert report.train_rows == len(raw) - len(ties) - len(identical)
    cfg.on_bad_row = "error"
    with pytest.raises(ValueError, match=rf"annotations.json row {ties[0]}: .*data.on_bad_row=skip"):
        build_datasets(cfg, stories_tokenizer)


def test_llamafactory_sharegpt_dpo(shared, make_cfg, tokenizer):
    path = shared / "data" / "llamafactory" / "dpo_en_demo.json"
    raw = json.loads(path.read_text())
    cfg = make_cfg(path=str(path), eval_size=0.1, prompt_truncation="keep_end")
    prepared = build_datasets(cfg, tokenizer)
    assert prepared.report.format == "sharegpt"
    assert (len(prepared.train), len(prepared.eval)) == (len(raw) - 30, 30)
    assistant, user = tokenizer.convert_tokens_to_ids(["<|assistant|>", "<|user|>"])
    # keep_end keeps the generation prompt; the builtin template ends every answer with <eos>
    assert all(ids[-1] == assistant for ids in prepared.train["prompt_ids"])
    assert all(user in ids for ids in prepared.train["prompt_ids"] if len(ids) < cfg.max_prompt_length)
    room = cfg.max_length - cfg.max_prompt_length  # a shorter response was never cut
    complete = [ids for ids in prepared.train["chosen_ids"] if len(ids) < room]
    assert complete and all(
        ids[-1] == tokenizer.eos_token_id and ids.count(tokenizer.eos_token_id) == 1 for ids in complete
    )


def test_llamafactory_kto_messages(shared, make_cfg, tokenizer):
    path = shared / "data" / "llamafactory" / "kto_en_demo.json"
    raw = json.loads(path.read_text())
    desirable = sum(row["label"] is True for row in raw)
    undesirable = sum(row["label"] is False for row in raw)
    assert (len(raw), desirable, undesirable) == (300, 150, 150)
    cfg = make_cfg(path=str(path), prompt_truncation="keep_end")
    prepared = build_datasets(cfg, tokenizer, responses=("completion",), fields=("label",))
    report = prepared.report
    assert (report.format, report.rows_read, report.train_rows) == ("messages", 300, 300)
    assert (report.desirable_rows, report.undesirable_rows) == (150, 150)
    assert list(prepared.train["label"]) == [row["label"] for row in raw]
    assistant = tokenizer.convert_tokens_to_ids("<|assistant|>")
    assert all(ids[-1] == assistant for ids in prepared.train["prompt_ids"])


def test_llamafactory_kto_held_out(shared, make_cfg, tokenizer):
    path = shared / "data" / "llamafactory" / "kto_en_demo.json"
    cfg = make_cfg(path=str(path), prompt_truncation="keep_end", eval_size=0.1)
    prepared = build_datasets(cfg, tokenizer, responses=("completion",), fields=("label",))
    assert (len(prepared.train), len(prepared.eval)) == (270, 30)
    assert prepared.report.desirable_rows + prepared.report.undesirable_rows == 300


def test_llamafactory_dpo_pairs_unpaired(shared, make_cfg, tokenizer):
    path = shared / "data" / "llamafactory" / "dpo_en_demo.json"
    raw = json.loads(path.read_text())
    cfg = make_cfg(path=str(path), prompt_truncation="keep_end")
    prepared = build_datasets(cfg, tokenizer, responses=("completion",), fields=("label",))
    report = prepared.report
    assert (report.format, report.unpaired_from_pairs, report.pairs_unpaired) == ("sharegpt", True, len(raw))
    assert list(prepared.train["label"]) == [True, False] * len(raw)
    assert prepared.train["prompt_ids"][0] == prepared.train["prompt_ids"][1]


def test_tofu_forget_with_retain(shared, make_cfg, tokenizer, ids):
    forget = json.loads((shared / "data" / "tofu" / "forget10.json").read_text())[:20]
    retain = json.loads((shared / "data" / "tofu" / "retain90.json").read_text())
    cfg = make_cfg(
        path=str(shared / "data" / "tofu" / "forget10.json"),
        retain=str(shared / "data" / "tofu" / "retain90.json"),
        columns={"prompt": "question", "completion": "answer"},
        limit=20,
    )
    prepared = build_datasets(cfg, tokenizer, responses=("completion", "retain"))
    report = prepared.report
    assert (report.rows_read, report.train_rows, report.retain_rows_read) == (20, 20, len(retain))
    assert report.retain_rows_used == 20
    eos = tokenizer.eos_token_id
    assert list(prepared.train["prompt_ids"]) == [ids(row["question"]) for row in forget]
    assert list(prepared.train["completion_ids"]) == [ids(row["answer"]) + [eos] for row in forget]
    # every partner is a real retain row, with its own question as its prompt
    questions: dict[tuple[int, ...], set[tuple[int, ...]]] = {}
    for row in retain:
        questions.setdefault(tuple(ids(row["answer"]) + [eos]), set()).add(tuple(ids(row["question"])))
    for prompt, answer in zip(prepared.train["retain_prompt_ids"], prepared.train["retain_ids"], strict=True):
        assert tuple(prompt) in questions[tuple(answer)]


def test_tofu_npo_alone_refuses_retain(shared, make_cfg, tokenizer):
    cfg = make_cfg(
        path=str(shared / "data" / "tofu" / "forget10.json"),
        retain=str(shared / "data" / "tofu" / "retain90.json"),
        columns={"prompt": "question", "completion": "answer"},
        limit=20,
    )
    with pytest.raises(ValueError, match="does not use a retain set"):
        build_datasets(cfg, tokenizer, responses=("completion",))
    cfg.retain = None
    assert len(build_datasets(cfg, tokenizer, responses=("completion",)).train) == 20
