"""Scores of frozen models a loss declares in `Needs.scores` (MODPO's margin rewards), computed once,
and the reference's prompt embeddings a loss may ask for in `Loss.prepare` (BCO's UDM).

The scorers never change during training, so each response is scored once, before training, on the
train and eval rows, and the scores become per-example columns `<score>_<response>` that the
collator serves like any data field. The official MODPO code scores every batch under no-grad: the
same values, one forward pass per example instead of one per epoch.

It runs where `Loss.prepare` does (after the data and models load, before ZeRO-3 partitions the
reference), so a `log_ratio` score can use the run's reference as it is.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from alignlab.data import PreferenceCollator
from alignlab.forward import ForwardPlan
from alignlab.losses.base import Needs, PrepareContext, Score
from alignlab.models import DTYPES, ModelError, freeze, load_frozen

#: rows per forward pass when scoring.
SCORING_BATCH = 16
#: logits positions per chunk when scoring (no `(B, T, V)` fp32 logits; see alignlab.chunked).
SCORING_CHUNK = 128

Scorer = Callable[[list[dict]], dict[str, list[float]]]


def add_scores(needs: Needs, ctx: PrepareContext) -> None:
    """Score every response of `ctx.train` and `ctx.eval` with each of `needs.scores`; add the columns.

    Raises:
        ModelError: a scorer's model cannot be loaded, naming the config key that names it.
    """
    for score in needs.scores:
        try:
            scorer = (_log_ratio if score.kind == "log_ratio" else _reward_model)(score, ctx, needs.responses)
        except ModelError as err:
            raise ModelError(f"{score.option or score.name}: {err}") from None
        for split in ("train", "eval"):
            dataset = getattr(ctx, split)
            if dataset is None:
                continue
            values: dict[str, list[float]] = {response: [] for response in needs.responses}
            for rows in _batches(dataset, needs.responses):
                for response, scores in scorer(rows).items():
                    values[response] += scores
            for response in needs.responses:
                dataset = dataset.add_column(f"{score.name}_{response}", values[response])
            setattr(ctx, split, dataset)
        print(f"scores: {score.name} ({score.kind} of {score.model}) computed on the train and eval rows")


def _batches(dataset, responses: tuple[str, ...]) -> Iterator[list[dict]]:
    """The rows of a tokenized dataset, `SCORING_BATCH` at a time, with the columns scoring reads: the
    prompt, each response, and the prompt of each response that has its own (`Needs.own_prompts`)."""
    own = [f"{r}_prompt_ids" for r in responses if f"{r}_prompt_ids" in dataset.column_names]
    columns = dataset.select_columns(["prompt_ids", *(f"{r}_ids" for r in responses), *own])
    for chunk in columns.iter(batch_size=SCORING_BATCH):
        yield [dict(zip(chunk, values)) for values in zip(*chunk.values())]


def _log_ratio(score: Score, ctx: PrepareContext, responses: tuple[str, ...]) -> Scorer:
    """S_model(y) − S_ref(y) of each response, the log-probabilities summed over its tokens."""
    model = load_frozen(score.model, ctx.model, ctx.tokenizer, ctx.seed).to(ctx.device)
    collate = PreferenceCollator(ctx.tokenizer.pad_token_id, responses=responses)
    plan = ForwardPlan(responses, chunk_size=SCORING_CHUNK)  # padded batches; fitted once to each model
    forward = [(plan.fitted(m), m, m.get_output_embeddings()) for m in (model, ctx.reference)]

    @torch.no_grad()
    def run(rows: list[dict]) -> dict[str, list[float]]:
        batch = {key: value.to(ctx.device) for key, value in collate(rows).items()}
        ours, ref = (fitted(m, head, batch) for fitted, m, head in forward)
        return {r: (ours[r].logps - ref[r].logps).tolist() for r in responses}

    return run


def _reward_model(score: Score, ctx: PrepareContext, responses: tuple[str, ...]) -> Scorer:
    """A sequence-classification model's score of prompt + response: the policy's token ids when the
    reward model's tokenizer (from its folder, else the policy's) has the same vocabulary, else the
    text decoded and re-tokenized."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer  # heavy: only when used

    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            score.model,
            num_labels=1,
            dtype=DTYPES[ctx.model.dtype],
            trust_remote_code=ctx.model.trust_remote_code,
            use_safetensors=True,
        )
    except OSError as err:
        raise ModelError(
            f"cannot load the sequence-classification reward model {score.model!r}: {err}"
        ) from None
    model = freeze(model).to(ctx.device)
    try:  # the reward model's own tokenizer; the policy's when its folder has none
        tokenizer = AutoTokenizer.from_pretrained(score.model)
    except (OSError, ValueError):
        tokenizer = ctx.tokenizer
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    same_tokens = tokenizer.get_vocab() == ctx.tokenizer.get_vocab()
    eos = ctx.tokenizer.eos_token_id

    @torch.no_grad()
    def run(rows: list[dict]) -> dict[str, list[float]]:
        out = {}
        for r in responses:
            ids = [
                row.get(f"{r}_prompt_ids", row["prompt_ids"]) + _without_eos(row[f"{r}_ids"], eos)
                for row in rows
            ]
            if same_tokens:  # the policy's own ids: nothing lost to decoding
                encoded = tokenizer.pad({"input_ids": ids}, return_tensors="pt")
            else:
                encoded = tokenizer([ctx.tokenizer.decode(x) for x in ids], return_tensors="pt", padding=True)
            out[r] = model(**encoded.to(ctx.device)).logits[:, 0].float().tolist()
        return out

    return run


def _without_eos(ids: list[int], eos: int) -> list[int]:
    """A response's ids without the EOS the pipeline appended (the reward model's tokenizer adds its own)."""
    return ids[:-1] if ids and ids[-1] == eos else ids


def prompt_embedder(
    model, pad_id: int, device, batch_size: int = 32
) -> Callable[[list[list[int]]], torch.Tensor]:
    """`PrepareContext.embed_prompts`: prompts -> `(N, H)`, the last hidden state of `model` mean-pooled
    over each prompt's tokens (right-padded batches; padding is masked out of the model and the mean)."""
    from torch.nn.utils.rnn import pad_sequence

    @torch.no_grad()
    def embed(prompts: list[list[int]]) -> torch.Tensor:
        out = []
        for start in range(0, len(prompts), batch_size):
            chunk = [torch.tensor(p, dtype=torch.long) for p in prompts[start : start + batch_size]]
            ids = pad_sequence(chunk, batch_first=True, padding_value=pad_id)
            mask = pad_sequence([torch.ones_like(p) for p in chunk], batch_first=True, padding_value=0)
            hidden = (
                model(
                    input_ids=ids.to(device),
                    attention_mask=mask.to(device),
                    output_hidden_states=True,
                    use_cache=False,
                )
                .hidden_states[-1]
                .float()
            )
            m = mask.to(device).unsqueeze(-1)
            out.append(((hidden * m).sum(1) / m.sum(1).clamp(min=1)).cpu())
        return torch.cat(out) if out else torch.zeros(0, 0)

    return embed
