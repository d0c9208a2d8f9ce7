"""MODPO against values worked out by hand from spec/losses.md part 2 §4.

Worked example (one pair, as in test_dpo.py): policy log-probs chosen −5 (tokens −2, −3), rejected −8
(four tokens of −2); reference chosen −6 (−3, −3), rejected −7 (−1, −2, −2, −2). So ρ(y_w) = 1,
ρ(y_l) = −1, |y_w| = 2 tokens and |y_l| = 4. With h(y) = (1/w₀)[β·ρ(y) − Σ_k w_k·r_k(y)]:

* column margin r(y_w) = 2, r(y_l) = −1, β = 0.5, w = (0.5, 0.5):
  h(y_w) = 2·(0.5 − 0.5·2) = −1, h(y_l) = 2·(−0.5 + 0.5) = 0, Δh = −1,
  L = −log σ(−1) = log(1 + e) = 1.3132616875; hinge: max(0, 1 − (−1)) = 2.
* length margin r = −|y|, β = 0.5, w = (1, 0.1):
  h(y_w) = 0.5 + 0.1·2 = 0.7, h(y_l) = −0.5 + 0.1·4 = −0.1, Δh = 0.8, L = log(1 + e^{−0.8}) = 0.3711006659.
* both, β = 1, w = (2, 1, 0.5): h(y_w) = ½(1 − 2 + 0.5·2) = 0, h(y_l) = ½(−1 + 1 + 0.5·4) = 1, Δh = −1.
* DPO (no margin, or w_k = 0), β = 0.5: −log σ(0.5·2) = log(1 + e^{−1}) = 0.3132616875.
"""

from __future__ import annotations

import math

import pytest
import torch

from alignlab.config import ModelConfig
from alignlab.losses import build
from alignlab.losses.base import Needs, PrepareContext, Score
from alignlab.losses.modpo import MarginConfig, MODPOConfig

PC, PR, RC, RR = [[-2.0, -3.0]], [[-2.0, -2.0, -2.0, -2.0]], [[-3.0, -3.0]], [[-1.0, -2.0, -2.0, -2.0]]
LOG_1_PLUS_E = math.log(1 + math.e)


def inputs(make_pair, **fields: float):
    batch = make_pair(PC, PR, RC, RR)
    batch.fields = {name: torch.tensor([value], dtype=torch.float64) for name, value in fields.items()}
    return batch


def modpo(**cfg):
    return build(MODPOConfig(**cfg))


COLUMN = {"kind": "column", "column": "score"}
SCORES = {"score_chosen": 2.0, "score_rejected": -1.0}


def test_column_margin_worked_example(make_pair):
    out = modpo(beta=0.5, weights=[0.5, 0.5], margins=[COLUMN])(inputs(make_pair, **SCORES))
    assert out.losses.item() == pytest.approx(LOG_1_PLUS_E, rel=1e-12)
    assert LOG_1_PLUS_E == pytest.approx(1.3132616875, abs=1e-10)


def test_hinge_worked_example(make_pair):
    loss = modpo(beta=0.5, weights=[0.5, 0.5], margins=[COLUMN], loss_type="hinge")
    out = loss(inputs(make_pair, **SCORES))
    assert out.losses.item() == pytest.approx(2.0, rel=1e-12)


def test_length_margin_worked_example(make_pair):
    out = modpo(beta=0.5, weights=[1.0, 0.1], margins=[{"kind": "length"}])(inputs(make_pair))
    assert out.losses.item() == pytest.approx(math.log(1 + math.exp(-0.8)), rel=1e-12)
    assert out.metrics["rewards/chosen"].item() == pytest.approx(0.7)
    assert out.metrics["rewards/rejected"].item() == pytest.approx(-0.1)


def test_two_margins_worked_example(make_pair):
    loss = modpo(beta=1.0, weights=[2.0, 1.0, 0.5], margins=[COLUMN, {"kind": "length"}])
    out = loss(inputs(make_pair, **SCORES))
    assert out.losses.item() == pytest.approx(LOG_1_PLUS_E, rel=1e-12)
    assert out.metrics["rewards/chosen"].item() == pytest.approx(0.0, abs=1e-12)
    assert out.metrics["rewards/rejected"].item() == pytest.approx(1.0)


@pytest.mark.parametrize("kind", ["implicit", "reward_model"])
def test_precomputed_margins_are_read_from_their_columns(make_pair, kind):
    margin = {"kind": kind, "model": "unused-here", "beta": 1.0}  # implicit: r = β_k·field, here β_k = 1
    out = modpo(beta=0.5, weights=[0.5, 0.5], margins=[margin])(
        inputs(make_pair, margin1_chosen=2.0, margin1_rejected=-1.0)
    )
    assert out.losses.item() == pytest.approx(LOG_1_PLUS_E, rel=1e-12)  # the column example's values


@pytest.mark.parametrize(
    "cfg",
    [
        {"weights": [1.0, 0.0], "margins": [COLUMN]},  # w = (1, 0): the margin has no weight
        {"weights": [1.0]},  # no margin at all
    ],
)
def test_reduces_to_dpo(make_pair, cfg):
    out = modpo(beta=0.5, **cfg)(inputs(make_pair, **SCORES))
    assert out.losses.item() == pytest.approx(math.log(1 + math.exp(-1)), rel=1e-12)


def test_w0_scales_beta(make_pair):
    # w = (0.25,), β = 0.1: −log σ((0.1·2)/0.25) = −log σ(0.8)
    out = modpo(beta=0.1, weights=[0.25])(inputs(make_pair))
    assert out.losses.item() == pytest.approx(math.log(1 + math.exp(-0.8)), rel=1e-12)


def test_metrics(make_pair):
    out = modpo(beta=0.5, weights=[0.5, 0.5], margins=[COLUMN])(inputs(make_pair, **SCORES))
    m = {k: v.item() for k, v in out.metrics.items()}
    assert m["rewards/chosen"] == pytest.approx(-1.0)
    assert m["rewards/rejected"] == pytest.approx(0.0, abs=1e-12)
    assert m["rewards/margins"] == pytest.approx(-1.0)
    assert m["rewards/accuracies"] == 0.0  # h(y_w) < h(y_l)
    assert (m["logps/chosen"], m["logps/rejected"], m["logps/margins"]) == pytest.approx((-5.0, -8.0, 3.0))
    assert all(not v.requires_grad for v in out.metrics.values())


def test_gradient_reaches_the_policy_only_through_beta_rho(make_pair):
    batch = make_pair(PC, PR, RC, RR, requires_grad=True)
    batch.fields = {
        "score_chosen": torch.tensor([2.0], dtype=torch.float64),
        "score_rejected": torch.tensor([-1.0], dtype=torch.float64),
    }
    loss = modpo(beta=0.5, weights=[0.5, 0.5], margins=[COLUMN])(batch).losses.sum()
    loss.backward()
    # dL/dS_θ(y_w) = −σ(−Δh)·β/w₀ = −σ(1)·1 per chosen token
    grad = batch.policy["chosen"].token_logps.grad
    assert grad[0].tolist() == pytest.approx([-1 / (1 + math.exp(-1))] * 2, rel=1e-12)


# --- needs follow the config ----------------------------------------------------------------------


def test_needs_follow_the_margins():
    loss = modpo(
        weights=[0.4, 0.2, 0.2, 0.1, 0.1],
        margins=[
            COLUMN,
            {"kind": "length"},
            {"kind": "implicit", "model": "m"},
            {"kind": "reward_model", "model": "rm"},
        ],
    )
    assert loss.needs == Needs(
        reference=True,
        fields=("score_chosen", "score_rejected"),
        scores=(
            Score("margin3", "log_ratio", "m", "loss.margins[2].model"),
            Score("margin4", "reward_model", "rm", "loss.margins[3].model"),
        ),
    )
    assert loss.needs.batch_fields == (
        "score_chosen",
        "score_rejected",
        "margin3_chosen",
        "margin3_rejected",
        "margin4_chosen",
        "margin4_rejected",
    )
    assert modpo().needs == Needs(reference=True)


def test_implicit_margin_is_beta_k_times_the_scored_log_ratio(make_pair):
    """The pipeline serves S_m(y) − S_ref(y) (a Score of kind log_ratio); r₁ = β₁·(S_m − S_ref)."""
    margin = {"kind": "implicit", "model": "m", "beta": 0.3}
    out = modpo(beta=0.5, weights=[0.5, 0.5], margins=[margin])(
        inputs(make_pair, margin1_chosen=2.0, margin1_rejected=-1.0)
    )
    # ρ(y_w) = −5 − (−6) = 1, ρ(y_l) = −8 − (−7) = −1; h(y) = (β·ρ(y) − w₁·β₁·field(y)) / w₀
    h_w, h_l = (0.5 * 1 - 0.5 * 0.3 * 2.0) / 0.5, (0.5 * -1 - 0.5 * 0.3 * -1.0) / 0.5
    assert out.losses.item() == pytest.approx(math.log1p(math.exp(-(h_w - h_l))), rel=1e-12)


# --- validation -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cfg, message",
    [
        (
            {"weights": [0.0, 1.0], "margins": [COLUMN]},
            r"loss.weights\[0\] \(w₀, the weight of the pairs trained on\) must be > 0, got 0.0",
        ),
        ({"weights": []}, r"loss.weights\[0\] .* must be > 0, got no weights"),
        (
            {"weights": [0.5, 0.5]},
            r"loss.margins must hold one margin per weight after w₀: 2 loss.weights need",
        ),
        (
            {"weights": [1.0], "margins": [COLUMN]},
            r"2 loss.weights|1 loss.weights need 0 loss.margins, got 1",
        ),
        (
            {"weights": [1, 1], "margins": [{"kind": "lenght"}]},
            r"loss.margins\[0\].kind must be one of column,",
        ),
        (
            {"weights": [1, 1], "margins": [{"kind": "column"}]},
            r"loss.margins\[0\].column names the data fields",
        ),
        ({"weights": [1, 1], "margins": [{"kind": "length", "column": "x"}]}, r"loss.margins\[0\].column"),
        ({"weights": [1, 1], "margins": [{"kind": "implicit"}]}, r"loss.margins\[0\].model is the model"),
        ({"weights": [1, 1], "margins": [{"kind": "length", "model": "m"}]}, r"loss.margins\[0\].model"),
        (
            {"weights": [1, 1], "margins": [{"kind": "implicit", "model": "m", "beta": 0}]},
            r"loss.margins\[0\].beta must be > 0",
        ),
        (
            {"weights": [1, 1, 1], "margins": [COLUMN, COLUMN]},
            r"loss.margins\[1\].column='score' is used by an",
        ),
        ({"beta": 0}, r"loss.beta must be > 0"),
        ({"loss_type": "ipo"}, r"loss.loss_type must be one of sigmoid, hinge; got 'ipo'"),
    ],
)
def test_validation_names_the_field(cfg, message):
    with pytest.raises(ValueError, match=message):
        MODPOConfig(**cfg)


def test_composes_from_the_command_line(compose_run):
    from alignlab.train import to_typed

    typed = to_typed(compose_run("loss=modpo", "loss.weights=[1,0.1]", "loss.margins=[{kind: length}]"))
    assert typed.loss.weights == [1.0, 0.1] and typed.loss.margins == [MarginConfig(kind="length")]
    with pytest.raises(ValueError, match=r"loss.margins\[0\].model is the model"):
        to_typed(compose_run("loss=modpo", "loss.weights=[1,0.1]", "loss.margins=[{kind: implicit}]"))


# --- margins scored once before training by the pipeline (alignlab.scorers) ------------------------


@pytest.fixture
def prepared(tmp_path):
    """`prepared(margin)`: a PrepareContext over four builtin pairs (3 train, 1 eval), after the pipeline
    scored MODPO's declared margins (`alignlab.scorers.add_scores`) and MODPO.prepare ran."""
    from alignlab.builtin import build_model, build_tokenizer
    from alignlab.config import DataConfig
    from alignlab.data import build_datasets
    from alignlab.models import freeze
    from alignlab.scorers import add_scores

    tokenizer = build_tokenizer()
    cfg = DataConfig(path="builtin:sentiment", limit=3, eval_size=1, cache_dir=str(tmp_path / "cache"))
    data = build_datasets(cfg, tokenizer)
    reference = freeze(build_model(len(tokenizer), seed=0))

    def run(margin: dict):
        ctx = PrepareContext(
            reference=reference,
            tokenizer=tokenizer,
            train=data.train,
            eval=data.eval,
            device=torch.device("cpu"),
            seed=0,
            model=ModelConfig(name_or_path="builtin:tiny"),
        )
        loss = build(MODPOConfig(weights=[0.5, 0.5], margins=[margin]))
        add_scores(loss.needs, ctx)
        loss.prepare(ctx)
        return ctx

    return run


def _sequence_logp(model, prompt: list[int], response: list[int]) -> float:
    """log p(response | prompt) summed over the response, from one unpadded forward pass."""
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logp = model(input_ids=ids).logits[0, :-1].double().log_softmax(-1)
    targets = ids[0, 1:]
    picked = logp[torch.arange(len(targets)), targets]
    return picked[len(prompt) - 1 :].sum().item()


def test_implicit_margin_scores_the_log_ratio(prepared, tmp_path):
    from alignlab.builtin import build_model

    margin_model = build_model(81, seed=1)  # the builtin vocabulary has 81 tokens
    margin_model.save_pretrained(tmp_path / "margin")
    ctx = prepared({"kind": "implicit", "model": str(tmp_path / "margin"), "beta": 0.3})
    assert len(ctx.train) == 3 and len(ctx.eval) == 1
    for split in (ctx.train, ctx.eval):
        for row in split:
            for r in ("chosen", "rejected"):
                expected = _sequence_logp(margin_model, row["prompt_ids"], row[f"{r}_ids"]) - _sequence_logp(
                    ctx.reference, row["prompt_ids"], row[f"{r}_ids"]
                )
                assert row[f"margin1_{r}"] == pytest.approx(expected, abs=1e-5)
                assert abs(expected) > 1e-3  # a different model: a real margin


def _reversed_tokenizer():
    """The builtin word-level tokenizer with its ids in reverse order (pad is the last id)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from alignlab.builtin import build_tokenizer

    vocab = build_tokenizer().get_vocab()
    reversed_ids = {word: len(vocab) - 1 - i for word, i in vocab.items()}
    core = Tokenizer(models.WordLevel(vocab=reversed_ids, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )


@pytest.mark.parametrize("own_tokenizer", ["same", "reversed"])
def test_reward_model_margin_scores_prompt_and_response(prepared, tmp_path, own_tokenizer):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from alignlab.builtin import build_tokenizer

    tokenizer = build_tokenizer() if own_tokenizer == "same" else _reversed_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=81,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        num_labels=1,
        pad_token_id=tokenizer.pad_token_id,
    )
    reward_model = LlamaForSequenceClassification(config).eval()
    reward_model.save_pretrained(tmp_path / "rm")
    tokenizer.save_pretrained(tmp_path / "rm")
    ctx = prepared({"kind": "reward_model", "model": str(tmp_path / "rm")})
    policy_words = {i: w for w, i in ctx.tokenizer.get_vocab().items()}
    rm_ids = tokenizer.get_vocab()
    for row in ctx.train:
        for r in ("chosen", "rejected"):
            # the reward model reads prompt + response in its own ids, without the EOS the pipeline appended
            words = [policy_words[i] for i in row["prompt_ids"] + row[f"{r}_ids"][:-1]]
            with torch.no_grad():
                logits = reward_model(input_ids=torch.tensor([[rm_ids[w] for w in words]])).logits
            expected = logits[0, 0].item()
            assert row[f"margin1_{r}"] == pytest.approx(expected, abs=1e-5)


def test_missing_margin_model_names_the_margin(prepared, tmp_path):
    from alignlab.models import ModelError

    with pytest.raises(ModelError, match=r"loss.margins\[0\].model: cannot load model"):
        prepared({"kind": "implicit", "model": str(tmp_path / "absent")})
