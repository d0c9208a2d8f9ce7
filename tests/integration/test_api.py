"""`alignlab.api.train`: the command line's overrides from Python, with a `datasets` object as the data."""

from __future__ import annotations

import json

import pytest
from omegaconf import OmegaConf

from alignlab.errors import ConfigError, UserError

pytestmark = pytest.mark.slow

ROWS = [
    {"question": f"review : the {s} was", "good": "great .", "bad": "awful ."}
    for s in ("film", "movie", "show", "book", "play", "album", "series", "novel", "story", "song")
]


def _overrides(tmp_path, *more):
    return [
        "+recipe=dpo",
        "data.columns={prompt: question, chosen: good, rejected: bad}",
        "trainer.max_steps=2",
        "trainer.eval_steps=0",
        "eval.generate=false",
        f"data.cache_dir={tmp_path / 'cache'}",
        *more,
    ]


def test_train_on_a_dataset_dict_with_cli_overrides(tmp_path):
    import datasets

    from alignlab.api import train

    data = datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(ROWS[:8]), "test": datasets.Dataset.from_list(ROWS[8:])}
    )
    result = train(
        _overrides(tmp_path, "data.eval_split=test", "loss.beta=0.3"),
        dataset=data,
        output_dir=tmp_path / "run",
    )
    assert result.output_dir == tmp_path / "run" and (result.model_dir / "model.safetensors").exists()
    report = json.loads((tmp_path / "run" / "data_report.json").read_text())
    assert (report["train_rows"], report["eval_rows"]) == (8, 2)
    saved = OmegaConf.load(tmp_path / "run" / "config.yaml")
    assert saved.loss.beta == 0.3 and saved.data.path.startswith(str(tmp_path / "cache" / "datasets"))
    assert datasets.load_from_disk(saved.data.path)["test"].to_list() == ROWS[8:]  # the run names real files

    from alignlab.api import saved as save

    assert (
        str(save(data, tmp_path / "cache" / "datasets", "dataset")) == saved.data.path
    )  # the same rows: saved once


def test_mistakes_are_user_errors_before_anything_loads(tmp_path):
    import datasets

    from alignlab.api import train

    with pytest.raises(ConfigError, match="unknown key 'loss.bta'. Did you mean loss.beta?"):
        train(_overrides(tmp_path, "loss.bta=1"))
    with pytest.raises(ConfigError, match="dataset must be a datasets.Dataset or DatasetDict, got list"):
        train(_overrides(tmp_path), dataset=ROWS)
    with pytest.raises(ConfigError, match="both data.path= and the dataset argument"):
        train(_overrides(tmp_path, "data.path=x.jsonl"), dataset=datasets.Dataset.from_list(ROWS))
    bad = datasets.Dataset.from_list([*ROWS[:3], {**ROWS[3], "good": ""}])
    with pytest.raises(UserError, match=r"row 3: field 'good'.*empty"):
        train(_overrides(tmp_path, "data.eval_size=0"), dataset=bad, output_dir=tmp_path / "run")
