"""The bad-input suite, end to end through `alignlab train`: every case of the issue gets one line on
stderr that names the row or field and the fix, exit status 2 and no traceback; or, where the config
allows it, a counted and reported filter.

The cases call the command's entry point, `alignlab.cli.main(["train", ...])`, in this process (its
exit status and its stderr, fd-level, are what the command gives; a second start of Python and
transformers per case would cost ~8 s each); the filter test runs the command in a subprocess."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

GOOD = [
    {"prompt": f"Write about item {i}.", "chosen": f" A fine item {i}.", "rejected": f" A bad item {i}."}
    for i in range(16)
]


def _jsonl(path, rows, insert: dict[int, str] | None = None):
    lines = [json.dumps(row) for row in rows]
    for index, raw in sorted((insert or {}).items()):
        lines.insert(index, raw)
    path.write_text("\n".join(lines) + "\n")
    return path


def _with_row(index: int, row: dict) -> list[dict]:
    return GOOD[:index] + [row] + GOOD[index:]


def _argv(tmp_path, *overrides: str) -> list[str]:
    return [
        "train",
        "trainer.max_steps=2",
        f"data.cache_dir={tmp_path / 'cache'}",
        f"hydra.run.dir={tmp_path / 'run'}",
        *overrides,
    ]  # the case's own overrides last: they win


def _train(tmp_path, *overrides: str) -> subprocess.CompletedProcess:
    """`alignlab train` in a subprocess."""
    return subprocess.run(
        [sys.executable, "-m", "alignlab.cli", *_argv(tmp_path, *overrides)],
        capture_output=True,
        text=True,
        timeout=300,
    )


def _train_here(capfd, tmp_path, *overrides: str) -> subprocess.CompletedProcess:
    """`alignlab train` through its entry point in this process: exit status, stdout and stderr."""
    from alignlab.cli import main

    capfd.readouterr()
    try:
        main(_argv(tmp_path, *overrides))
        code = 0
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    out = capfd.readouterr()
    return subprocess.CompletedProcess([], code, out.out, out.err)


def _one_line_error(out: subprocess.CompletedProcess) -> str:
    assert out.returncode == 2, out.stderr[-2000:]
    assert "Traceback" not in out.stderr
    errors = [line for line in out.stderr.splitlines() if line.startswith("alignlab: error: ")]
    assert len(errors) == 1, out.stderr[-2000:]
    return errors[0]


def _data(tmp_path, name: str, rows, insert=None) -> str:
    return f"data.path={_jsonl(tmp_path / name, rows, insert)}"


CASES = {
    # case: (files to write -> overrides, substrings the one line must contain)
    "corrupted JSONL line": (
        lambda d: ["+recipe=dpo", _data(d, "x.jsonl", GOOD, {3: '{"prompt": "cut off'})],
        ["row 3", "not valid JSON", "Fix:", "data.on_bad_row=skip"],
    ),
    "wrong type": (
        lambda d: [
            "+recipe=dpo",
            _data(d, "x.jsonl", _with_row(2, {"prompt": "p", "chosen": 5, "rejected": "r"})),
        ],
        ["row 2", "'chosen'", "expected a string", "Fix:"],
    ),
    "empty string": (
        lambda d: [
            "+recipe=dpo",
            _data(d, "x.jsonl", _with_row(4, {"prompt": "p", "chosen": " ", "rejected": "r"})),
        ],
        ["row 4", "'chosen'", "empty", "Fix:"],
    ),
    "column missing for the loss (TPO's gold)": (
        lambda d: ["+recipe=tpo", _data(d, "x.jsonl", GOOD)],
        ["column 'gold'", "data.columns"],
    ),
    "column missing in every row": (
        lambda d: [
            "+recipe=dpo",
            _data(d, "x.jsonl", [{"prompt": r["prompt"], "chosen": r["chosen"]} for r in GOOD]),
        ],
        ["column 'rejected'", "Fix:"],
    ),
    "prompt longer than max_prompt_length": (
        lambda d: [
            "+recipe=dpo",
            "data.max_length=64",
            "data.max_prompt_length=32",
            _data(d, "x.jsonl", _with_row(1, {"prompt": "word " * 200, "chosen": "a", "rejected": "b"})),
        ],
        ["row 1", "more than data.max_prompt_length=32", "data.prompt_truncation=keep_end"],
    ),
    "conversational data, tokenizer without a chat template": (
        lambda d: [
            "+recipe=dpo",
            f"model.name_or_path={d / 'stories260k'}",
            _data(
                d,
                "x.jsonl",
                [
                    {
                        "prompt": [{"role": "user", "content": f"Say {i}"}],
                        "chosen": [{"role": "assistant", "content": "yes"}],
                        "rejected": [{"role": "assistant", "content": "no"}],
                    }
                    for i in range(16)
                ],
            ),
        ],
        ["needs a chat template", "model.chat_template"],
    ),
    "tokenizer that does not match the model": (
        lambda d: ["+recipe=dpo", f"model.name_or_path={d / 'stories260k'}", f"model.tokenizer={d / 'gpt2'}"],
        ["tokens but model", "model.tokenizer"],
    ),
    "unknown recipe": (lambda d: ["+recipe=dpx"], ["unknown recipe 'dpx'", "Did you mean +recipe=dpo?"]),
    "unknown loss": (lambda d: ["loss=tdop"], ["unknown loss 'tdop'", "Did you mean loss=tdpo?"]),
    "unknown key": (
        lambda d: ["+recipe=dpo", "loss.bta=1"],
        ["unknown key 'loss.bta'", "Did you mean loss.beta?"],
    ),
    "precomputed reference with TDPO": (
        lambda d: ["+recipe=tdpo", "model.reference_mode=precomputed"],
        ["full-vocabulary logits", "model.reference_mode=live"],
    ),
    "a reference-free loss given a reference": (
        lambda d: ["+recipe=asft", "model.reference=builtin:tiny"],
        ["reference-free", "remove model.reference"],
    ),
    "an out-of-range setting": (lambda d: ["+recipe=dpo", "loss.beta=-1"], ["beta", "-1"]),
    "a trainer setting passed as an extra TrainingArguments field": (
        lambda d: ["+recipe=dpo", "+trainer.extra.save_total_limit=1"],
        ["trainer.extra.save_total_limit", "set trainer.save_total_limit instead"],
    ),
    "a TrainingArguments field alignlab sets": (
        lambda d: ["+recipe=dpo", "+trainer.extra.seed=3"],
        ["trainer.extra.seed", "remove trainer.extra.seed"],
    ),
    # checked before any model loads (they used to fail after it, with a traceback)
    "a batch size of 0": (
        lambda d: ["+recipe=dpo", "trainer.per_device_train_batch_size=0"],
        ["trainer.per_device_train_batch_size must be >= 1, got 0"],
    ),
    "zero training steps": (
        lambda d: ["+recipe=dpo", "trainer.max_steps=-1", "trainer.num_train_epochs=0"],
        ["trains zero steps", "trainer.num_train_epochs > 0"],
    ),
    "an unknown dtype (bf16, fp16 are accepted)": (
        lambda d: ["+recipe=dpo", "model.dtype=int8"],
        ["model.dtype must be one of float32, bfloat16, float16, auto"],
    ),
    "a tokenizer-only folder as the model": (
        lambda d: ["+recipe=dpo", f"model.name_or_path={d / 'gpt2'}"],
        ["is not a model folder: it holds only a tokenizer (vocab.json, merges.txt)", "model.tokenizer="],
    ),
    "a model folder that does not exist": (
        lambda d: ["+recipe=dpo", "model.name_or_path=./no-such-model"],
        ["does not exist", "model.name_or_path"],
    ),
    "an unknown chat template name": (
        lambda d: ["+recipe=dpo", "model.chat_template=chatmll"],
        ["model.chat_template='chatmll'", "(plain, chatml)"],
    ),
    "a misspelt TrainingArguments field": (
        lambda d: ["+recipe=dpo", "trainer.extra.lerning_rate=1"],
        ["no field 'lerning_rate'", "Did you mean trainer.learning_rate?"],
    ),
    "a misspelt scheduler": (
        lambda d: ["+recipe=dpo", "trainer.lr_scheduler_type=cosinus"],
        ["Did you mean trainer.lr_scheduler_type=cosine?"],
    ),
    "an unknown attention implementation": (
        lambda d: [
            "+recipe=dpo",
            f"model.name_or_path={d / 'stories260k'}",
            "data.max_prompt_length=32",
            "data.max_length=64",
            "model.attn_implementation=sdpaa",
        ],
        ["model.attn_implementation=sdpaa", "is not supported", "Fix: use model.attn_implementation=sdpa"],
    ),
    "a value TrainingArguments refuses": (
        lambda d: ["+recipe=dpo", "trainer.extra.hub_strategy=sometimes"],
        ["transformers.TrainingArguments refused the settings: sometimes is not a valid HubStrategy"],
    ),
    # TRL's names
    "TRL's trainer.warmup_ratio": (
        lambda d: ["+recipe=dpo", "trainer.warmup_ratio=0.1"],
        ["in alignlab it is trainer.warmup_steps"],
    ),
    "TRL's trainer.beta": (lambda d: ["+recipe=dpo", "trainer.beta=0.1"], ["in alignlab it is loss.beta"]),
    "TRL's trainer.gradient_checkpointing": (
        lambda d: ["+recipe=dpo", "trainer.gradient_checkpointing=true"],
        ["in alignlab it is model.gradient_checkpointing"],
    ),
    "TRL's trainer.max_length as an extra": (
        lambda d: ["+recipe=dpo", "trainer.extra.max_length=512"],
        ["in alignlab it is data.max_length"],
    ),
    "an unknown option in one member of a sweep": (
        lambda d: ["-m", "+recipe=dpo", "model=tiny,tny", f"hydra.sweep.dir={d / 'sweep'}"],
        ["unknown model 'tny'. Did you mean model=tiny?", "(sweep member with model=tny)"],
    ),
    "a misspelt key in a sweep": (
        lambda d: ["-m", "+recipe=dpo", "loss.bta=0.1,0.2", f"hydra.sweep.dir={d / 'sweep'}"],
        ["unknown key 'loss.bta'. Did you mean loss.beta?"],
    ),
    # data
    "every row skipped": (
        lambda d: [
            "+recipe=dpo",
            "data.on_bad_row=skip",
            "data.max_length=64",
            "data.max_prompt_length=3",
            _data(d, "x.jsonl", GOOD),
        ],
        [
            "no usable train rows left of 16 read",
            "14 x prompt too long (over data.max_prompt_length=3 tokens)",
            "2 held out",
            "Fix: raise data.max_prompt_length",
        ],
    ),
    "a split of a plain file": (
        lambda d: ["+recipe=dpo", _data(d, "x.jsonl", GOOD), "data.eval_split=test"],
        ["has no splits", "data.eval_path"],
    ),
    "a malformed CSV line": (
        lambda d: ["+recipe=dpo", f"data.path={_csv(d / 'x.csv')}"],
        ["x.csv: cannot read the CSV file", "got 2", "Fix:"],
    ),
}


def _csv(path):
    path.write_text('prompt,chosen,rejected\n"Write, then",fine,bad\nonly,two\n')
    return path


STORIES, GPT2 = ("stories260k", "models", "stories260k"), ("gpt2", "tokenizers", "gpt2")
#: case -> links (name in tmp_path, path under ../shared) it needs
NEEDS_SHARED = {
    "conversational data, tokenizer without a chat template": [STORIES],
    "tokenizer that does not match the model": [STORIES, GPT2],  # 50,257 tokens for a 512-token model
    "a tokenizer-only folder as the model": [GPT2],
    "an unknown attention implementation": [STORIES],
}


@pytest.mark.parametrize("case", list(CASES))
def test_each_bad_input_gets_one_actionable_line(tmp_path, case, request, capfd):
    overrides, expected = CASES[case]
    for name, *parts in NEEDS_SHARED.get(case, []):  # skips this case alone when ../shared is absent
        (tmp_path / name).symlink_to(request.getfixturevalue("shared_path")(*parts))
    line = _one_line_error(_train_here(capfd, tmp_path, *overrides(tmp_path)))
    for text in expected:
        assert text in line, line


def test_bad_rows_can_be_skipped_counted_and_reported(tmp_path):
    rows = _with_row(3, {"prompt": "p", "chosen": "", "rejected": "r"})
    out = _train(
        tmp_path,
        "+recipe=dpo",
        _data(tmp_path, "x.jsonl", rows, {6: "{not json"}),
        "data.on_bad_row=skip",
        "data.eval_size=0",
        "data.prompt_truncation=keep_end",
        "data.max_prompt_length=2",
        "eval.generate=false",
    )
    assert out.returncode == 0, out.stderr[-2000:]
    report = out.stdout + out.stderr
    assert "skipped 2" in report, report[-3000:]  # the data report: counted, with the rows named
    assert "skipped 1 x corrupt JSON line" in report and "skipped 1 x empty prompt or response" in report
    # every prompt cut (allowed, but rarely meant): a warning naming the limit
    assert "warning: 16 of 16 prompts (100%) were cut to data.max_prompt_length=2 tokens" in report
