"""BCO's UDM classifier (spec §4): fitted on reference prompt embeddings, weights = clamped density ratio."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset

from alignlab import builtin
from alignlab.losses import build
from alignlab.losses.base import PrepareContext
from alignlab.losses.bco import BCOConfig


def test_udm_matches_sklearn_on_hand_pooled_embeddings():
    sklearn = pytest.importorskip("sklearn.linear_model")
    tok = builtin.build_tokenizer()
    model = builtin.build_model(len(tok), seed=0).eval()
    good = ["review : the film was", "review : the movie was", "my take : this film felt"]
    bad = ["review : the book was", "in short , the novel is", "my take : this song felt", "review : the play was"]
    rows = [(p, True) for p in good] + [(p, False) for p in bad]
    data = Dataset.from_list([{"prompt_ids": tok(p)["input_ids"], "label": y} for p, y in rows])
    ctx = PrepareContext(reference=model, tokenizer=tok, train=data, eval=None, device=torch.device("cpu"), seed=0)
    loss = build(BCOConfig(udm=True, prompt_sample_size=1024))
    loss.prepare(ctx)

    # Independent: mean of the last hidden state over each prompt's tokens, one prompt at a time.
    with torch.no_grad():
        emb = torch.stack([model(input_ids=torch.tensor([tok(p)["input_ids"]]), output_hidden_states=True)
                           .hidden_states[-1][0].mean(0) for p, _ in rows]).double().numpy()
    # prepare samples each class in a seeded order; the fit does not depend on row order.
    clf = sklearn.LogisticRegression(class_weight="balanced").fit(emb, [int(y) for _, y in rows])
    assert loss.udm_coef.tolist() == pytest.approx(clf.coef_[0].tolist(), rel=1e-4, abs=1e-6)
    assert loss.udm_intercept.item() == pytest.approx(float(clf.intercept_[0]), rel=1e-4, abs=1e-6)

    p = clf.predict_proba(emb)[:, 1]
    expected = [1.0 if y else min(max(pi / (1 - pi + 1e-8), 0.5), 10.0) for pi, (_, y) in zip(p, rows)]
    assert ctx.train["udm_weight"] == pytest.approx(expected, rel=1e-4)
