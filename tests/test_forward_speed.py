"""The forward's speed switches (`skip_unused_logits`, `padding_free`, `prefix_sharing`,
`drop_padding_mask`) change nothing but speed.

Every switch is compared with the plain path (dense logits, padded batch, head on every position):
per-token log-probs, losses and parameter gradients agree to 1e-5 in fp64, on batches of uneven
lengths, for 2 and 3 responses, a response with its own prompt (NPO's retain), and token-level
losses that read full-vocabulary logits (TDPO; NPO+KL at prompt positions too).
"""

from __future__ import annotations

import logging

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from alignlab import losses
from alignlab.chunked import LazyLogits, per_token, token_kl
from alignlab.data.collate import PreferenceCollator
from alignlab.forward import ForwardPlan, Packing
from alignlab.losses.base import LossInputs, Needs

VOCAB = 97
#: name -> ForwardPlan.of switches (logit_chunk_size, skip_unused_logits, padding_free, prefix_sharing,
#: drop_padding_mask)
SWITCHES = {
    "skip_unused_logits": (5, True, False, False, False),
    "padding_free": (5, False, True, False, False),
    "padding_free_dense": (0, False, True, False, False),
    "skip_and_padding_free": (5, True, True, False, False),
    "prefix_sharing": (5, True, False, True, False),
    "prefix_sharing_dense": (0, False, False, True, False),
    "drop_padding_mask": (5, True, False, False, True),
    "drop_padding_mask_dense": (0, False, False, False, True),
}
PLAIN = (0, False, False, False, False)


def _model(seed: int, attn: str = "sdpa") -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=True,
        pad_token_id=0,
        attn_implementation=attn,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).double()


def _batch(responses, seed=0, b=3, own_prompt=()):
    """Random ids, lengths drawn per example and response (uneven: padding everywhere but one row)."""
    gen = torch.Generator().manual_seed(seed)

    def ids(lo, hi):
        return torch.randint(
            3, VOCAB, (int(torch.randint(lo, hi + 1, (1,), generator=gen)),), generator=gen
        ).tolist()

    rows = []
    for _ in range(b):
        row = {"prompt_ids": ids(1, 6), **{f"{r}_ids": ids(1, 7) for r in responses}}
        row.update({f"{r}_prompt_ids": ids(2, 5) for r in own_prompt})
        rows.append(row)
    return PreferenceCollator(pad_token_id=0, responses=responses)(rows)


def _plan(args, model, responses=("chosen", "rejected"), needs=None, reference=False):
    """`ForwardPlan.of` the switches `args`, fitted to `model`."""
    chunk, skip, packed, shared, drop = args
    plan = ForwardPlan.of(
        needs or Needs(responses=responses),
        logit_chunk_size=chunk,
        skip_unused_logits=skip,
        padding_free=packed,
        prefix_sharing=shared,
        drop_padding_mask=drop,
    )
    return plan.fitted(model, reference=reference)


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _run_loss(args, loss, policy, reference, batch):
    """Loss value, per-response outputs and policy gradients through the plan of the switches `args`."""
    needs = loss.needs
    policy.zero_grad()
    plan = _plan(args, policy, needs=needs)
    pol = plan(policy, policy.get_output_embeddings(), batch)
    ref = None
    if needs.reference:
        with torch.no_grad():
            ref_plan = _plan(args, reference, needs=needs, reference=True)
            ref = ref_plan(reference, reference.get_output_embeddings(), batch)
    out = loss(LossInputs(policy=pol, reference=ref))
    out.losses.mean().backward()
    if args[2] or args[3]:  # packing was used, not refused when the plan was fitted
        assert plan.layout != "padded"
    assert plan.padding_mask is not args[4]
    return out.losses.detach(), pol, _grads(policy)


def _loss(name, **kwargs):
    entry = losses.get(name)
    return losses.build(entry.config(**kwargs))


CASES = {  # name -> (loss, extra responses with their own prompt)
    "dpo": (lambda: _loss("dpo"), ()),
    "tpo_3_responses": (lambda: _loss("tpo"), ()),
    "tdpo_full_logits": (lambda: _loss("tdpo"), ()),
    "npo_kl_retain_prompt_logits": (lambda: _loss("npo", variant="npo_kl"), ("retain",)),
}


@pytest.mark.parametrize("switch", SWITCHES)
@pytest.mark.parametrize("case", CASES)
def test_switch_gives_the_plain_losses_log_probs_and_gradients(switch, case):
    make, own_prompt = CASES[case]
    loss = make()
    policy, reference = _model(0), _model(1)
    batch = _batch(loss.needs.responses, seed=len(case), own_prompt=own_prompt)
    assert (batch[f"{loss.needs.responses[0]}_attention_mask"] == 0).any()  # the batch is padded
    want_loss, want, want_grads = _run_loss(PLAIN, loss, policy, reference, batch)
    got_loss, got, got_grads = _run_loss(SWITCHES[switch], loss, policy, reference, batch)
    torch.testing.assert_close(got_loss, want_loss, atol=1e-5, rtol=1e-5)
    for r in loss.needs.responses:
        torch.testing.assert_close(
            got[r].token_logps.detach(), want[r].token_logps.detach(), atol=1e-5, rtol=1e-5
        )
        torch.testing.assert_close(got[r].mean_logit, want[r].mean_logit, atol=1e-5, rtol=1e-5)
        assert torch.equal(got[r].mask, want[r].mask) and torch.equal(got[r].input_mask, want[r].input_mask)
    assert got_grads.keys() == want_grads.keys() and want_grads
    for name in want_grads:
        torch.testing.assert_close(got_grads[name], want_grads[name], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("switch", ["padding_free", "prefix_sharing"])
def test_packed_log_probs_equal_padded_ones_under_each_attention(attn, switch):
    model = _model(2, attn)
    batch = _batch(("chosen", "rejected"), seed=7, b=5)
    with torch.no_grad():
        want = _plan(PLAIN, model)(model, model.get_output_embeddings(), batch)
        plan = _plan(SWITCHES[switch], model)
        got = plan(model, model.get_output_embeddings(), batch)
    assert plan.layout == ("packed" if switch == "padding_free" else "shared_prompts")
    for r in ("chosen", "rejected"):
        torch.testing.assert_close(got[r].token_logps, want[r].token_logps, atol=1e-5, rtol=1e-5)


def test_packing_layout_first_fit_decreasing_by_hand():
    # lengths 5, 2, 3, 1 in T = 5: rows [0], [2, 1], [3] (+ a tail of its own)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]])
    packing = Packing.of(mask)
    assert packing.index.tolist() == [[0, 1, 2, 3, 4], [10, 11, 12, 5, 6], [15, 0, 0, 0, 0]]
    assert packing.position_ids.tolist() == [[0, 1, 2, 3, 4], [0, 1, 2, 0, 1], [0, 0, 1, 2, 3]]
    assert packing.saves
    values = torch.arange(15.0).view(3, 5)  # the packed slots' own flat index
    unpacked = packing.unpack(values)
    assert unpacked.tolist() == [[0, 1, 2, 3, 4], [8, 9, 0, 0, 0], [5, 6, 7, 0, 0], [10, 0, 0, 0, 0]]
    assert not Packing.of(torch.ones(2, 4, dtype=torch.long)).saves


def test_padding_free_refuses_left_padding():
    with pytest.raises(ValueError, match="right-padded"):
        Packing.of(torch.tensor([[0, 1, 1], [1, 1, 1]]))


def test_shared_prompt_layout_and_mask_by_hand():
    # example 0: prompt [5, 6], chosen [7], rejected [8, 9];
    # example 1: prompt [4], chosen [3, 3], rejected [2]
    ids = torch.tensor([[5, 6, 7, 0], [4, 3, 3, 0], [5, 6, 8, 9], [4, 2, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 0, 0]])
    labels = torch.tensor(
        [[-100, -100, 7, -100], [-100, 3, 3, -100], [-100, -100, 8, 9], [-100, 2, -100, -100]]
    )
    packing = Packing.shared_prompts(mask, input_ids=ids, labels=labels, n_responses=2)
    assert ids.flatten()[packing.index].tolist() == [
        [5, 6, 7, 8, 9],
        [4, 3, 3, 2, 5],
    ]  # (the last is the tail)
    assert packing.position_ids.tolist() == [[0, 1, 2, 2, 3], [0, 1, 2, 1, 0]]
    assert packing.owner.tolist() == [[-1, -1, 0, 2, 2], [-1, 1, 1, 3, -2]]
    allowed = packing.mask_for("sdpa")[0, 0].int().tolist()
    assert allowed == [
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0],  # chosen: prompt + itself
        [1, 1, 0, 1, 0],  # rejected: prompt + itself, not chosen
        [1, 1, 0, 1, 1],
    ]
    eager = packing.mask_for("eager")
    assert eager.dtype == torch.float32 and (eager == 0).equal(packing.mask_for("sdpa"))
    with pytest.raises(ValueError, match="prefix_sharing"):
        packing.mask_for("flash_attention_2")
    # the padded rows read the shared prompt's slots: rejected of example 0 at position 1 -> slot 1
    hidden = torch.arange(10.0).view(2, 5)
    assert packing.unpack(hidden).tolist() == [[0, 1, 2, 0], [5, 6, 7, 0], [0, 1, 3, 4], [5, 8, 0, 0]]


def test_model_that_ignores_packed_positions_falls_back_to_padding(caplog):
    """A model that drops position_ids would let packed sequences attend to each other: detected."""
    inner = _model(3)

    class NoPositions(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = inner

        def forward(self, position_ids=None, **kwargs):
            return self.inner(**kwargs)

    model = NoPositions()
    batch = _batch(("chosen", "rejected"), seed=4, b=4)
    with caplog.at_level(logging.WARNING):
        plan = _plan((4, True, True, False, False), model)
    assert plan.layout == "padded"  # decided when the plan is fitted, before any batch
    assert "packed sequences attend to each other" in caplog.text
    got = plan(model, inner.get_output_embeddings(), batch)
    want = _plan(PLAIN, inner)(inner, inner.get_output_embeddings(), batch)
    torch.testing.assert_close(got["chosen"].token_logps, want["chosen"].token_logps, atol=1e-5, rtol=1e-5)


def test_selected_logits_are_the_dense_ones_at_the_selected_positions():
    torch.manual_seed(0)
    head_a, head_b = torch.nn.Linear(6, 11).double(), torch.nn.Linear(6, 11).double()
    hidden = torch.randn(3, 7, 6, dtype=torch.float64)
    where = torch.rand(3, 7) > 0.4
    a, b = LazyLogits(hidden, head_a, 2).select(where), LazyLogits(hidden, head_b, 2).select(where)
    assert a.shape == (3, 7, 11)
    want = (
        torch.softmax(head_a(hidden), -1) * (head_a(hidden).log_softmax(-1) - head_b(hidden).log_softmax(-1))
    ).sum(-1)
    torch.testing.assert_close(token_kl(a, b), want * where, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(a.dense(), head_a(hidden) * where.unsqueeze(-1))
    parts = a.split(3)
    assert [p.hidden.shape[0] for p in parts] == [int(w.sum()) for w in where]
    other = LazyLogits(hidden, head_b, 2).select(~where)
    with pytest.raises(ValueError, match="different positions"):
        per_token(lambda x, y: x.sum(-1), a, other)


#: model_type -> config fields: architectures whose facts differ. Cohere and Granite scale their logits after
#: the head; OPT builds its mask without the position ids, so its packed sequences attend to each other.
ARCHITECTURES = {
    "llama": {},
    "gpt2": {},
    "qwen2": {},
    "mistral": {},
    "phi": {},
    "opt": {},
    "cohere": {"logit_scale": 0.5},
    "granite": {"logits_scaling": 4.0},
}


def _architecture(model_type: str, dtype=torch.float64):
    """A small random model of `model_type` with sdpa attention."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        model_type,
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=0,
        **ARCHITECTURES[model_type],
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").to(dtype).eval()


@pytest.mark.parametrize("model_type", ["llama", "opt", "cohere"])
def test_model_facts_hold_in_half_precision(model_type):
    """In bf16 the probe's allowance for kernel noise hides neither OPT's mixed sequences nor Cohere's scaled
    logits, and flags no difference in Llama: the same facts as in fp64."""
    from alignlab.forward import ModelFacts

    plan = ForwardPlan.of(Needs(), logit_chunk_size=4, padding_free=True)
    facts = [
        ModelFacts.of(m, m.get_output_embeddings(), plan)
        for m in (_architecture(model_type), _architecture(model_type, torch.bfloat16))
    ]
    assert (facts[0].logits_from_head, facts[0].packs) == (facts[1].logits_from_head, facts[1].packs)


@pytest.mark.parametrize("layout", ["packed", "shared_prompts", "unmasked"])
@pytest.mark.parametrize("model_type", ARCHITECTURES)
def test_model_facts_are_what_the_model_does_on_real_batches(model_type, layout):
    """`ModelFacts`, decided once on the fixed probe batch, are what the model does on other batches: a
    wrong decision (chunked logits of a model that scales its own, packing a model that mixes sequences)
    fails here."""
    from alignlab.forward import ModelFacts

    model = _architecture(model_type)
    head = model.get_output_embeddings()
    plan = ForwardPlan.of(
        Needs(),
        logit_chunk_size=4,
        padding_free=layout == "packed",
        prefix_sharing=layout == "shared_prompts",
        drop_padding_mask=layout == "unmasked",
    )
    facts = ModelFacts.of(model, head, plan)
    batch = _batch(("chosen", "rejected"), seed=11, b=6)
    with torch.no_grad():
        out = model(
            input_ids=batch["chosen_input_ids"],
            attention_mask=batch["chosen_attention_mask"],
            output_hidden_states=True,
            use_cache=False,
        )
        real = batch["chosen_attention_mask"].bool()
        from_head = torch.allclose(head(out.hidden_states[-1])[real], out.logits[real], atol=1e-6)
        padded = ForwardPlan(("chosen", "rejected"))(model, head, batch)
        if layout == "unmasked":
            plan = ForwardPlan(("chosen", "rejected"), padding_mask=False)
        else:
            plan = ForwardPlan(("chosen", "rejected"), layout=layout, attn_implementation="sdpa")
        other = plan(model, head, batch)
    same = all(torch.allclose(other[r].token_logps, padded[r].token_logps, atol=1e-6) for r in padded)
    assert facts.logits_from_head == from_head
    assert facts.logits_from_head == (model_type not in ("cohere", "granite"))
    if layout == "unmasked":  # every one of these is a causal LM: right padding needs no mask
        assert facts.packs is None and facts.causal_padding is same is True
    else:
        assert facts.packs == same
        assert facts.packs == (
            model_type != "opt" or layout == "shared_prompts"
        )  # a 4D mask, which OPT takes


class _SpyMask(torch.nn.Module):
    """A causal LM that records the attention mask of every call; `bidirectional`: the real positions also
    read the padding unless the mask hides it (what a prefix-LM or an encoder does)."""

    def __init__(self, inner, bidirectional=False):
        super().__init__()
        self.inner, self.bidirectional, self.masks = inner, bidirectional, []
        self.config = inner.config

    def get_output_embeddings(self):
        return self.inner.get_output_embeddings()

    def forward(self, input_ids=None, attention_mask=None, **kwargs):
        self.masks.append(attention_mask)
        kwargs = {**kwargs, "output_hidden_states": True, "logits_to_keep": 0}
        out = self.inner(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        if self.bidirectional:  # add each row's mean hidden state over what the mask lets it see
            seen = torch.ones_like(input_ids) if attention_mask is None else attention_mask
            last = out.hidden_states[-1]
            pooled = (last * seen.unsqueeze(-1)).sum(1, keepdim=True) / seen.sum(-1)[:, None, None]
            out.hidden_states = (*out.hidden_states[:-1], last + pooled)
            out.logits = self.inner.get_output_embeddings()(out.hidden_states[-1])
        return out


def _spied(seed, args, batch):
    """The plan of the switches `args` fitted to a `_SpyMask` around a fresh model and run once on
    `batch`: (the plan, the masks that run gave the model, whether its log-probs are the plain path's)."""
    inner = _model(seed)
    model = _SpyMask(inner)
    head = inner.get_output_embeddings()
    plan = _plan(args, model)
    model.masks.clear()
    got = plan(model, head, batch)
    want = _plan(PLAIN, inner)(inner, head, batch)
    for r in ("chosen", "rejected"):
        torch.testing.assert_close(got[r].token_logps, want[r].token_logps, atol=1e-5, rtol=1e-5)
    return plan, model.masks


def test_right_padded_batches_run_without_the_mask_and_give_the_masked_log_probs():
    batch = _batch(("chosen", "rejected"), seed=9, b=5)
    assert (batch["chosen_attention_mask"] == 0).any()
    plan, masks = _spied(5, SWITCHES["drop_padding_mask"], batch)  # log-probs: the plain path's
    assert not plan.padding_mask
    assert masks == [None]  # the training forward runs unmasked


def test_left_padded_batches_keep_their_mask():
    inner = _model(5)
    model = _SpyMask(inner)
    mask = torch.tensor([[0, 1, 1], [1, 1, 1]])  # left padding: 0 before 1
    batch = {
        "chosen_input_ids": torch.tensor([[0, 5, 6], [5, 6, 7]]),
        "chosen_attention_mask": mask,
        "chosen_labels": torch.tensor([[-100, -100, 6], [-100, 6, 7]]),
    }
    plan = _plan(SWITCHES["drop_padding_mask"], model, responses=("chosen",))
    assert not plan.padding_mask
    model.masks.clear()
    plan(model, inner.get_output_embeddings(), batch)
    assert len(model.masks) == 1 and torch.equal(model.masks[0], mask)


def test_a_model_whose_real_positions_read_the_padding_keeps_the_mask(caplog):
    inner = _model(6)
    model = _SpyMask(inner, bidirectional=True)
    with caplog.at_level(logging.WARNING):
        plan = _plan(SWITCHES["drop_padding_mask"], model)
    assert plan.padding_mask and "keeping the padding mask" in caplog.text
    batch = _batch(("chosen", "rejected"), seed=2, b=4)
    model.masks.clear()
    plan(model, inner.get_output_embeddings(), batch)
    assert model.masks[0] is not None


def _one_long_example(rejected_length: int) -> dict[str, torch.Tensor]:
    """One example as the collator gives it: a 60-token prompt, a 60-token chosen response and a rejected
    one of `rejected_length` tokens, right-padded to one length."""
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, VOCAB, (60,), generator=gen).tolist()
    lengths = {"chosen": 60, "rejected": rejected_length}
    rows = {r: prompt + torch.randint(3, VOCAB, (n,), generator=gen).tolist() for r, n in lengths.items()}
    width = max(map(len, rows.values()))
    batch = {}
    for r, ids in rows.items():
        pad = width - len(ids)
        batch[f"{r}_input_ids"] = torch.tensor([ids + [0] * pad])
        batch[f"{r}_attention_mask"] = torch.tensor([[1] * len(ids) + [0] * pad])
        batch[f"{r}_labels"] = torch.tensor([[-100] * 60 + ids[60:] + [-100] * pad])
    return batch


def test_layout_cost_by_hand():
    from alignlab.forward import layout_cost

    # 2 rows of 120 positions, a pair costing 1/192 of a position: causal 120·121/2 pairs per row
    assert layout_cost(2, 120, 1 / 192, causal=True) == pytest.approx(2 * (120 + 7260 / 192))
    assert layout_cost(2, 120, 1 / 192, causal=False) == pytest.approx(390.0)
    assert layout_cost(1, 179, 0.0, causal=False) == 179


@pytest.mark.parametrize("drop", [True, False])
def test_each_batch_shares_its_prompt_only_where_that_is_less_work(drop):
    """Hidden size 32: a pair of attention costs 1/(6·32) = 1/192 of a position's matmuls. The padded batch
    (2 rows of 120) costs 2·(120 + 7260/192) = 315.6 without its mask (causal) and 2·(120 + 120²/192) =
    390 with it; the shared row (60 + 60 + 59 = 179 positions, a 4D mask) 179 + 179²/192 = 345.9. So the
    prompt is shared only when the padded batch keeps its mask; the log-probs are the same either way."""
    plan, (mask,) = _spied(7, (5, True, False, True, drop), _one_long_example(59))  # the plain log-probs
    assert plan.layout == "shared_prompts" and plan.pair_weight == pytest.approx(1 / 192)
    if drop:
        assert mask is None  # padded, causal
    else:
        assert mask.dim() == 4  # the shared row's mask


def test_short_batches_share_their_prompts():
    _, masks = _spied(7, (5, True, False, True, True), _batch(("chosen", "rejected"), seed=1, b=3))
    assert masks[0].dim() == 4


def test_prefix_sharing_without_a_4d_mask_falls_back_to_packing(caplog):
    """An attention implementation that takes no 4D mask (flash attention) packs instead, with a warning."""
    from types import SimpleNamespace

    inner = _model(8)
    model = _SpyMask(inner)
    model.config = SimpleNamespace(_attn_implementation="flash_attention_2", hidden_size=32)
    with caplog.at_level(logging.WARNING):
        plan = _plan((5, True, True, True, True), model)
    assert plan.layout == "packed" and "needs a 4D attention mask" in caplog.text
    with caplog.at_level(logging.WARNING):
        plan = _plan((5, True, False, True, True), model)
    assert plan.layout == "padded"
