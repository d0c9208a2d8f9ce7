"""The embedded default: a task, a tokenizer and a model that alignlab generates itself.

`alignlab train +recipe=dpo` must run offline on a laptop CPU in minutes and show real learning,
with no hub and no downloaded files. This module provides:

* ``builtin:sentiment`` — a synthetic review-completion preference task. Every pair shares a
  prompt ("review : the film was") and two completions of the same shape that differ only in
  their sentiment words; the chosen one has more positive words (e.g. 2 of 3 against 1 of 3). The
  held-out split uses subjects and openings that training never shows, so accuracy there measures
  generalisation, not memorisation.
* ``builtin:sentiment-understated`` — a second objective on the same prompts, for multi-objective
  recipes (MODPO): a reviewer who distrusts hype prefers the completion with fewer hype words
  (`HYPE`: wonderful, great, brilliant, ...), whatever else it says. Its pairs differ only in hype
  words against plain ones (mild praise or criticism), so on the sentiment pairs it disagrees with
  sentiment where the extra praise is hype and is indifferent where it is mild: a real trade-off.
  (Brevity would not be one: the two completions of a sentiment pair always have the same length.)
* ``builtin:tiny`` — a small Llama (two layers, hidden 64) over the task's word-level vocabulary,
  randomly initialised from the run's seed, with a word-level tokenizer that has a pad token,
  an EOS token and a minimal chat template.

Both are deterministic functions of a seed.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

SUBJECTS_TRAIN = ["film", "movie", "show", "book", "play", "album", "series", "novel", "story", "song"]
SUBJECTS_HELDOUT = ["game", "musical", "comic", "documentary"]
OPENINGS_TRAIN = ["review : the {s} was", "my take : this {s} felt", "in short , the {s} is"]
OPENINGS_HELDOUT = ["honestly , that {s} seemed", "verdict : our {s} looked"]
POSITIVE = [
    "wonderful",
    "great",
    "brilliant",
    "charming",
    "delightful",
    "superb",
    "moving",
    "fresh",
    "clever",
]
NEGATIVE = ["awful", "dull", "boring", "clumsy", "tedious", "weak", "bland", "messy", "stale"]
ASPECTS = ["acting", "plot", "music", "writing", "ending", "pacing", "cast", "dialogue"]
LINKS = ["and the {a} was", "with {a} that felt", ", its {a} simply", "but the {a} stayed"]
FILLER = ["really", "quite", "very", "truly", "rather", "so", "just", "always", "mostly"]
#: the positive words `builtin:sentiment-understated` counts against a completion.
HYPE = ["wonderful", "great", "brilliant", "superb", "delightful"]
#: everything else a sentiment slot may hold: mild praise and criticism.
PLAIN = [w for w in POSITIVE if w not in HYPE] + NEGATIVE

SPECIAL = ["<pad>", "<eos>", "<unk>", "<|user|>", "<|assistant|>", "<|system|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} {% if m['role'] == 'assistant' %}"
    "<eos> {% endif %}{% endfor %}{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


def _words() -> list[str]:
    words: set[str] = set()
    for group in (SUBJECTS_TRAIN, SUBJECTS_HELDOUT, POSITIVE, NEGATIVE, ASPECTS, FILLER):
        words.update(group)
    for template in OPENINGS_TRAIN + OPENINGS_HELDOUT + LINKS:
        words.update(w for w in template.split() if "{" not in w)
    words.update([".", "!"])
    return sorted(words)


def build_tokenizer():
    """A word-level `PreTrainedTokenizerFast` over the task vocabulary (whitespace-split)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL + _words())}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    # joins words with single spaces and nothing else ("great ." stays "great ."), so decoding and
    # encoding again gives back the same ids
    core.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        eos_token="<eos>",
        unk_token="<unk>",
        additional_special_tokens=["<|user|>", "<|assistant|>", "<|system|>"],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_model(vocab_size: int, seed: int):
    """A randomly initialised 2-layer Llama (≈0.1M parameters) seeded by `seed`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=True,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=None,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return LlamaForCausalLM(config)


def _completion(
    rng: random.Random, good: list[str] = POSITIVE, bad: list[str] = NEGATIVE
) -> tuple[str, str, str]:
    """One completion skeleton with 2–3 word slots, filled three times: gold, chosen, rejected.

    The fillings share every word except the slots, each of which holds a `good` or a `bad` word.
    Gold is all good; the chosen one has fewer good words than gold but strictly more than the
    rejected one (e.g. 2 of 3 against 1 of 3), so the task rewards preferring good words, not
    recognising a fixed phrase. Sentiment: good = positive words, bad = negative ones.
    """
    n_links = rng.randint(1, 2)
    fillers = [rng.choice(FILLER) for _ in range(n_links + 1)]
    links = [rng.choice(LINKS).format(a=rng.choice(ASPECTS)) for _ in range(n_links)]
    pos = [rng.choice(good) for _ in range(n_links + 1)]
    neg = [rng.choice(bad) for _ in range(n_links + 1)]
    n_chosen = rng.randint(1, n_links)
    n_rejected = rng.randint(0, n_chosen - 1)
    slots = list(range(n_links + 1))

    def render(n_positive: int) -> str:
        positive = set(rng.sample(slots, n_positive))
        words = [pos[i] if i in positive else neg[i] for i in slots]
        parts = [fillers[0], words[0]]
        for i, link in enumerate(links, start=1):
            parts += [link, fillers[i], words[i]]
        return " ".join(parts + [end])

    end = rng.choice([".", "!"])
    return render(n_links + 1), render(n_chosen), render(n_rejected)


def sentiment_pairs(n: int = 2400, seed: int = 0, heldout: bool = False) -> list[dict[str, str]]:
    """`n` explicit `{prompt, gold, chosen, rejected}` rows; `heldout` uses unseen subjects and openings.

    Pair losses read `chosen`/`rejected`; TPO also reads the all-positive `gold` response.
    """
    return _review_pairs("sentiment", POSITIVE, NEGATIVE, n, seed, heldout)


def understated_pairs(n: int = 2400, seed: int = 0, heldout: bool = False) -> list[dict[str, str]]:
    """Like `sentiment_pairs`, but the chosen completion has fewer `HYPE` words than the rejected one.

    The non-hype slots hold `PLAIN` words (mild praise or criticism), so the objective is "no hype",
    not "negative"; gold has no hype word at all.
    """
    return _review_pairs("understated", PLAIN, HYPE, n, seed, heldout)


def _review_pairs(
    task: str, good: list[str], bad: list[str], n: int, seed: int, heldout: bool
) -> list[dict[str, str]]:
    """`n` review rows whose chosen completion has more `good` slot words than the rejected one."""
    rng = random.Random(f"alignlab-{task}-{seed}-{heldout}")
    subjects = SUBJECTS_HELDOUT if heldout else SUBJECTS_TRAIN
    openings = OPENINGS_HELDOUT if heldout else OPENINGS_TRAIN
    rows = []
    for _ in range(n):
        prompt = rng.choice(openings).format(s=rng.choice(subjects))
        gold, chosen, rejected = _completion(rng, good, bad)
        rows.append({"prompt": prompt, "gold": gold, "chosen": chosen, "rejected": rejected})
    return rows


def joint_pairs(n: int = 2400, seed: int = 0, heldout: bool = False) -> list[dict[str, str]]:
    """`n` explicit joint preference rows ``{chosen_prompt, chosen, rejected_prompt, rejected}`` (JPO,
    `Needs.own_prompts`), built from `sentiment_pairs(n, seed, heldout)` in order, half of each kind:

    * even rows, conditional pairs: the row's own pair, under its prompt in both prompt columns;
    * odd rows, joint pairs: (prompt, chosen) of the row against (prompt, rejected) of the previous
      row (another instruction), ordered by the task's reward (`sentiment_reward`), as an annotator
      judges two instruction-response pairs; a tie, or the same prompt twice, keeps the row's own pair.

    Deterministic in `seed` (the pairs are seeded; the pairing is by position), and the paper's
    proposed mix of conditional and joint rankings (Bansal et al. 2024).
    """
    pairs = sentiment_pairs(n, seed=seed, heldout=heldout)
    return joint_from_pairs(pairs, lambda row, response: sentiment_reward([], [row[response]])[0])


def joint_from_pairs(pairs: list[dict], score) -> list[dict[str, str]]:
    """Joint preference rows from explicit pairs in order (`joint_pairs`; also the sentiment
    benchmark's): even rows keep their own pair; odd rows pit their (prompt, chosen) against the
    previous row's (prompt, rejected), the higher `score(row, response)` chosen; a tie, or the same
    prompt twice, keeps the row's own pair."""
    rows = []
    for i, row in enumerate(pairs):
        own = {"chosen_prompt": row["prompt"], "chosen": row["chosen"]}
        own.update({"rejected_prompt": row["prompt"], "rejected": row["rejected"]})
        other = pairs[i - 1]
        if i % 2 == 0 or other["prompt"] == row["prompt"]:
            rows.append(own)
            continue
        mine, theirs = (row["prompt"], row["chosen"]), (other["prompt"], other["rejected"])
        mine_score, theirs_score = score(row, "chosen"), score(other, "rejected")
        if mine_score == theirs_score:
            rows.append(own)
            continue
        chosen, rejected = (mine, theirs) if mine_score > theirs_score else (theirs, mine)
        rows.append(
            {
                "chosen_prompt": chosen[0],
                "chosen": chosen[1],
                "rejected_prompt": rejected[0],
                "rejected": rejected[1],
            }
        )
    return rows


#: the subject whose reviews `builtin:sentiment-forget` holds (and `builtin:sentiment-retain` lacks).
FORGET_SUBJECT = "film"


def sentiment_completions(
    split: str, n: int = 600, seed: int = 0, heldout: bool = False
) -> list[dict[str, str]]:
    """`{prompt, completion}` reviews for unlearning: `forget` = reviews of the film, `retain` = the rest.

    Completions are the task's responses (gold, chosen or rejected at random), so the forget set
    differs from the retain set only in its subject: unlearning must be specific to it.
    """
    if split not in ("forget", "retain"):
        raise ValueError(f"split must be forget or retain, got {split!r}")
    rows = []
    for row in sentiment_pairs(n * 12, seed=seed, heldout=heldout):
        about = f" {FORGET_SUBJECT} " in f" {row['prompt']} "
        if about == (split == "forget"):
            key = ("gold", "chosen", "rejected")[len(rows) % 3]
            rows.append({"prompt": row["prompt"], "completion": row[key]})
            if len(rows) == n:
                break
    return rows


@dataclass(frozen=True)
class BuiltinDataset:
    """A generator `(n, seed, heldout) -> rows`, its default size, whether its evaluation rows come
    from the held-out generator (unseen subjects) rather than a random hold-out, and the task's reward
    ("module:function", the end-of-training eval's `eval.reward=auto`; None: the task has none)."""

    generate: Callable[..., list[dict[str, str]]]
    size: int
    heldout_eval: bool
    reward: str | None = None


#: `builtin:<name>` data sources.
DATASETS = {
    "sentiment": BuiltinDataset(
        sentiment_pairs, 2400, heldout_eval=True, reward="alignlab.builtin:sentiment_reward"
    ),
    "sentiment-understated": BuiltinDataset(understated_pairs, 2400, heldout_eval=True),
    "sentiment-joint": BuiltinDataset(
        joint_pairs, 2400, heldout_eval=True, reward="alignlab.builtin:sentiment_reward"
    ),
    "sentiment-forget": BuiltinDataset(partial(sentiment_completions, "forget"), 600, heldout_eval=False),
    "sentiment-retain": BuiltinDataset(partial(sentiment_completions, "retain"), 600, heldout_eval=False),
}


def task_reward(data_path: str) -> str | None:
    """The reward a `builtin:NAME` data source registers (`BuiltinDataset.reward`); None for any other."""
    spec = DATASETS.get(data_path.removeprefix("builtin:")) if data_path.startswith("builtin:") else None
    return spec.reward if spec else None


def sentiment_reward(prompts: list[str], completions: list[str]) -> list[float]:
    """The embedded task's ground-truth reward: (positive − negative words) / words, in [−1, 1].

    Usable as `alignlab eval RUN --reward alignlab.builtin:sentiment_reward`.
    """
    positive, negative = set(POSITIVE), set(NEGATIVE)
    scores = []
    for text in completions:
        words = text.split()
        scores.append(
            (sum(w in positive for w in words) - sum(w in negative for w in words)) / max(len(words), 1)
        )
    return scores
