"""Tokenizer loading: a bare byte-level BPE folder (vocab.json + merges.txt), clear errors otherwise."""

from __future__ import annotations

import pytest

from alignlab.config import ModelConfig
from alignlab.models import ModelError, load_tokenizer


def test_bare_bpe_folder_loads_as_gpt2_with_pad_from_eos(shared_path):
    tokenizer = load_tokenizer(
        ModelConfig(name_or_path="unused", tokenizer=str(shared_path("tokenizers", "gpt2")))
    )
    assert len(tokenizer) == 50257
    assert tokenizer("Hello world")["input_ids"] == [15496, 995]  # GPT-2's published ids
    assert tokenizer.pad_token_id == tokenizer.eos_token_id == 50256


def test_folder_without_tokenizer_files_is_one_line_error(tmp_path):
    (tmp_path / "vocab.json").write_text("{}")  # half a BPE vocabulary: no merges.txt
    with pytest.raises(ModelError, match="cannot load tokenizer") as err:
        load_tokenizer(ModelConfig(name_or_path=str(tmp_path)))
    assert "\n" not in str(err.value) and "model.tokenizer" in str(err.value)
