"""BCO's UDM classifier (spec §4): fitted on reference prompt embeddings, weights = clamped density ratio."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset

from alignlab import builtin
from alignlab.losses import build
from alignlab.losses.base import PrepareContext
from alignlab.losses.bco import BCOConfig
from alignlab.scorers import prompt_embedder


def test_udm_weights_are_the_converged_fit_on_hand_pooled_embeddings():
    pytest.importorskip("sklearn.linear_model")
    tok = builtin.build_tokenizer()
    model = builtin.build_model(len(tok), seed=0).eval()
    good = ["review : the film was", "review : the movie was", "my take : this film felt"]
    bad = [
        "review : the book was",
        "in short , the novel is",
        "my take : this song felt",
        "review : the play was",
    ]
    rows = [(p, True) for p in good] + [(p, False) for p in bad]
    data = Dataset.from_list([{"prompt_ids": tok(p)["input_ids"], "label": y} for p, y in rows])
    ctx = PrepareContext(
        reference=model,
        tokenizer=tok,
        train=data,
        eval=None,
        device=torch.device("cpu"),
        seed=0,
        embed_prompts=prompt_embedder(model, tok.pad_token_id, torch.device("cpu")),
    )
    loss = build(BCOConfig(udm=True, prompt_sample_size=1024))
    loss.prepare(ctx)

    # Independent: mean of the last hidden state over each prompt's tokens, one prompt at a time.
    with torch.no_grad():
        emb = (
            torch.stack(
                [
                    model(input_ids=torch.tensor([tok(p)["input_ids"]]), output_hidden_states=True)
                    .hidden_states[-1][0]
                    .mean(0)
                    for p, _ in rows
                ]
            )
            .double()
            .numpy()
        )
    # The fit to convergence, independently: Newton's method on sklearn's objective for
    # LogisticRegression(class_weight="balanced", C=1): ½‖w‖² + Σ_i s_i·log(1 + exp(−y_i·(w·x_i + b))),
    # s_i = n / (2·n_class(i)), y ∈ {−1, 1}, the intercept b not penalised.
    x = torch.cat([torch.tensor(emb), torch.ones(len(rows), 1, dtype=torch.float64)], 1)
    y = torch.tensor([1.0 if label else -1.0 for _, label in rows], dtype=torch.float64)
    s = torch.tensor(
        [len(rows) / (2 * sum(1 for _, other in rows if other == label)) for _, label in rows],
        dtype=torch.float64,
    )
    penalty = torch.ones(x.shape[1], dtype=torch.float64)
    penalty[-1] = 0.0
    theta = torch.zeros(x.shape[1], dtype=torch.float64)
    for _ in range(100):
        m = y * (x @ theta)
        grad = penalty * theta - x.T @ (s * y * torch.sigmoid(-m))
        hess = torch.diag(penalty) + x.T @ (x * (s * torch.sigmoid(m) * torch.sigmoid(-m))[:, None])
        theta = theta - torch.linalg.solve(hess, grad)
    assert grad.abs().max() < 1e-12
    p = torch.sigmoid(x @ theta).tolist()
    expected = [
        1.0 if label else min(max(pi / (1 - pi + 1e-8), 0.5), 10.0) for pi, (_, label) in zip(p, rows)
    ]
    # spec §4: the density-ratio weights within 1e-6 of the converged fit (#12.7: the default tolerance
    # left them 4e-4 away)
    assert ctx.train["udm_weight"] == pytest.approx(expected, abs=1e-6, rel=0)
    assert loss.udm_coef.tolist() == pytest.approx(theta[:-1].tolist(), abs=1e-6)
