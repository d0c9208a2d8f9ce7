"""Controlled sentiment on a real pretrained model: a VADER ground-truth reward and preference pairs
sampled from the reference model.

This rebuilds the IMDb controlled-sentiment experiment of DPO (Rafailov et al. 2023, §6.1), TDPO,
rDPO and SparsePO for a CPU: the policy is a TinyStories Llama (``../shared/models/stories260k``),
the ground-truth reward is the VADER compound score of the completion (Hutto & Gilbert 2014; PyPI
``vadersentiment``, a lexicon, so no network and ~40 µs a call) in [-1, 1], and preference pairs
come from the reference model itself: for each story opening draw k samples, score them, and keep
(highest, lowest) as (chosen, rejected), skipping ties.

* `vader(texts)` — compound scores.
* `vader_reward(prompts, completions)` — the pluggable-reward signature of `alignlab eval --reward`
  (`alignlab.bench.sentiment:vader_reward`); it scores the completion only (the openings are neutral).
* `story_prompts(split)` — distinct story openings; "train" and "eval" share no character name.
* `make_pairs(model_path, n_pairs, seed, ...)` — rows ``{prompt, chosen, rejected, chosen_score,
  rejected_score}``, sampled in left-padded batches.
* `pairs_file(model_path, n_pairs, seed, cache_dir, ...)` — the same rows cached as JSONL (keyed by
  every argument and the model's weights file), readable by ``data.path=`` as explicit pairs.

Imports are light: transformers and torch are imported only when sampling.
"""

from __future__ import annotations

import hashlib
import json
import os
from functools import lru_cache
from itertools import product
from pathlib import Path

#: character names of training prompts and of held-out prompts (disjoint).
NAMES_TRAIN = ["Lily", "Tom", "Ben", "Sue", "Max", "Zoe", "Tim", "Anna", "Sam", "Lucy", "Jack", "Amy"]
NAMES_EVAL = ["Sara", "Bob", "Jill", "Kim"]
#: neutral story openings (no sentiment words: VADER scores each 0), {a} and {b} are names.
OPENINGS = [
    "Once upon a time, there was a girl named {a}. One day,",
    "{a} and {b} went to the",
    "One day, {a} saw a",
    "{a} ran to the",
    "{a} looked at the sky and",
    "In the park, {a} found a",
    "{a} and {b} were in the kitchen. {a} said,",
    "{a}'s mom told {a} to",
    "At night, {a} heard a",
    "{a} had a box. In the box, there was a",
    "{a} went to school with {b}. At school,",
    "{a} and {b} saw a dog. The dog",
    "{a} walked to the big tree. Then",
    "{b} gave {a} a",
    "It was a windy day. {a} and {b}",
]
#: the default cache folder of `pairs_file` (gitignored `runs/`).
DEFAULT_CACHE = Path("runs") / "cache" / "sentiment"


@lru_cache(maxsize=1)
def _analyzer():
    try:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
    except ImportError:  # an optional dependency: the benchmark's, not the framework's
        raise ImportError("the VADER reward needs vadersentiment: pip install 'alignlab[bench]'") from None

    return SentimentIntensityAnalyzer()


def vader(texts: list[str]) -> list[float]:
    """VADER compound score of each text, in [-1, 1] (0: neutral or no sentiment words)."""
    analyzer = _analyzer()
    return [float(analyzer.polarity_scores(text)["compound"]) for text in texts]


def vader_reward(prompts: list[str], completions: list[str]) -> list[float]:
    """`alignlab eval --reward alignlab.bench.sentiment:vader_reward`: VADER compound of each completion."""
    if len(prompts) != len(completions):
        raise ValueError(
            f"vader_reward got {len(prompts)} prompts and {len(completions)} completions; "
            "pass one prompt per completion"
        )
    return vader(completions)


def story_prompts(split: str = "train") -> list[str]:
    """Distinct story openings, in a fixed order: `OPENINGS` filled with pairs of distinct names of
    the split ("train": `NAMES_TRAIN`, 12 names, 900 openings; "eval": `NAMES_EVAL`, 108)."""
    names = {"train": NAMES_TRAIN, "eval": NAMES_EVAL}.get(split)
    if names is None:
        raise ValueError(f"story_prompts split must be 'train' or 'eval', got {split!r}")
    seen, prompts = set(), []
    for (a, b), opening in product(((a, b) for a in names for b in names if a != b), OPENINGS):
        text = opening.format(a=a, b=b)
        if text not in seen:
            seen.add(text)
            prompts.append(text)
    return prompts


def load_model(model_path: str | os.PathLike):
    """(model, tokenizer) for sampling: float32, eval mode, left padding, pad = EOS when absent."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_path))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(str(model_path), use_safetensors=True).eval()  # never a .bin
    return model, tokenizer


def generate(
    model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int = 256, temperature: float = 1.0
) -> list[str]:
    """One ancestral sample (top_k=0, top_p=1) per prompt, in left-padded batches; the completion
    text is decoded without special tokens and cut at EOS. Seed torch beforehand for fixed draws."""
    import torch

    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    out: list[str] = []
    try:
        with torch.no_grad():
            for start in range(0, len(prompts), batch_size):
                enc = tokenizer(prompts[start : start + batch_size], return_tensors="pt", padding=True)
                ids = model.generate(
                    **enc,
                    do_sample=True,
                    top_k=0,
                    top_p=1.0,
                    temperature=temperature,
                    max_new_tokens=max_new_tokens,
                    pad_token_id=tokenizer.pad_token_id,
                    eos_token_id=tokenizer.eos_token_id,
                )
                for row in ids[:, enc["input_ids"].shape[1] :].tolist():
                    if tokenizer.eos_token_id in row:
                        row = row[: row.index(tokenizer.eos_token_id)]
                    out.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    finally:
        tokenizer.padding_side = side
    return out


def sample_groups(
    model_path: str | os.PathLike,
    prompts: list[str],
    samples_per_prompt: int = 4,
    seed: int = 0,
    max_new_tokens: int = 24,
    batch_size: int = 256,
    temperature: float = 1.0,
    whole_sentences: bool = False,
) -> list[dict]:
    """`samples_per_prompt` samples of the model for every prompt, VADER-scored: rows
    ``{prompt, completions: [...], scores: [...]}`` in prompt order. Deterministic for a seed. Pairs,
    triples and thumbs-up/down labels can all be cut from the same groups. `whole_sentences` cuts
    each sample after its last full sentence (".", "!" or "?"), when it has one, so that lengths vary."""
    import torch

    model, tokenizer = load_model(model_path)
    torch.manual_seed(seed)
    texts = generate(
        model,
        tokenizer,
        [p for p in prompts for _ in range(samples_per_prompt)],
        max_new_tokens,
        batch_size,
        temperature,
    )
    if whole_sentences:
        texts = [_whole_sentences(t) for t in texts]
    scores = vader(texts)
    k = samples_per_prompt
    return [
        {"prompt": p, "completions": texts[i * k : (i + 1) * k], "scores": scores[i * k : (i + 1) * k]}
        for i, p in enumerate(prompts)
    ]


def _whole_sentences(text: str) -> str:
    end = max(text.rfind(c) for c in ".!?")
    return text[: end + 1] if end > 0 else text


def make_pairs(
    model_path: str | os.PathLike,
    n_pairs: int,
    seed: int = 0,
    samples_per_prompt: int = 4,
    max_new_tokens: int = 24,
    split: str = "train",
    prompts: list[str] | None = None,
    batch_size: int = 256,
    temperature: float = 1.0,
) -> list[dict]:
    """Preference pairs sampled from the model at `model_path` and labelled by VADER.

    The prompts (`story_prompts(split)` unless given) are taken in order, cycling when `n_pairs`
    exceeds them; each gets `samples_per_prompt` samples and gives the pair (highest score, lowest
    score) unless the two tie (then the next prompt is drawn). Deterministic for a seed.

    Returns:
        `n_pairs` rows ``{prompt, chosen, rejected, chosen_score, rejected_score}``.
    """
    import torch

    if n_pairs < 1 or samples_per_prompt < 2:
        raise ValueError(
            f"make_pairs needs n_pairs >= 1 and samples_per_prompt >= 2, got {n_pairs} and "
            f"{samples_per_prompt}"
        )
    pool = list(prompts) if prompts is not None else story_prompts(split)
    if not pool:
        raise ValueError("make_pairs got an empty prompt list; pass prompts=None for the story openings")
    model, tokenizer = load_model(model_path)
    torch.manual_seed(seed)
    rows: list[dict] = []
    cursor, draws = 0, 0
    while len(rows) < n_pairs:
        need = n_pairs - len(rows)
        chunk = [pool[(cursor + i) % len(pool)] for i in range(need + need // 4 + 1)]  # room for ties
        cursor += len(chunk)
        draws += len(chunk)
        if draws > 20 * n_pairs + 100:
            raise RuntimeError(
                f"make_pairs: only {len(rows)} of {n_pairs} pairs after {draws} prompts; "
                "almost every sample ties (raise max_new_tokens or samples_per_prompt)"
            )
        texts = generate(
            model,
            tokenizer,
            [p for p in chunk for _ in range(samples_per_prompt)],
            max_new_tokens,
            batch_size,
            temperature,
        )
        scores = vader(texts)
        for i, prompt in enumerate(chunk):
            group = list(
                zip(
                    scores[i * samples_per_prompt : (i + 1) * samples_per_prompt],
                    texts[i * samples_per_prompt : (i + 1) * samples_per_prompt],
                )
            )
            hi, lo = max(group, key=lambda g: g[0]), min(group, key=lambda g: g[0])
            if hi[0] == lo[0] or hi[1] == lo[1] or not hi[1] or not lo[1]:
                continue
            rows.append(
                {
                    "prompt": prompt,
                    "chosen": hi[1],
                    "rejected": lo[1],
                    "chosen_score": hi[0],
                    "rejected_score": lo[0],
                }
            )
            if len(rows) == n_pairs:
                break
    return rows


def pairs_file(
    model_path: str | os.PathLike,
    n_pairs: int,
    seed: int = 0,
    cache_dir: str | os.PathLike = DEFAULT_CACHE,
    **kwargs,
) -> Path:
    """`make_pairs(model_path, n_pairs, seed, **kwargs)` as a JSONL file, generated once and cached.

    The file name is a hash of the arguments and of the model's weights (size and mtime of its
    files), so a different seed, size or model gives a different file. Written atomically.
    """
    model_dir = Path(model_path).expanduser().resolve()
    weights = sorted(
        (p.name, p.stat().st_size, int(p.stat().st_mtime)) for p in model_dir.glob("*") if p.is_file()
    )
    key = hashlib.sha256(
        json.dumps([str(model_dir), weights, n_pairs, seed, sorted(kwargs.items()), 1], default=str).encode()
    ).hexdigest()[:16]
    path = Path(cache_dir) / f"pairs-{kwargs.get('split', 'train')}-{n_pairs}-seed{seed}-{key}.jsonl"
    if path.exists():
        return path
    rows = make_pairs(model_dir, n_pairs, seed, **kwargs)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text("".join(json.dumps(row) + "\n" for row in rows))
    tmp.replace(path)
    return path
