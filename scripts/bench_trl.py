"""Speed and memory side by side with TRL's DPOTrainer (issue #8), and alignlab's own switches.

Every measurement runs in a fresh subprocess (clean peak RSS, no warm caches), and the two frameworks
alternate A/B/B/A... so that the load of this shared machine hits both alike. Both train through
their HF Trainer subclass exactly as a user's run would (alignlab: `alignlab.train.run` on a composed
config; TRL: `DPOTrainer(...).train()`), on the same model files, the same token ids (rows whose
tokenisation would differ between the two are dropped and counted), the same data order (HF's
`train_sampling_strategy=sequential`), batch, max length, AdamW (`adamw_torch_fused`, both
frameworks' default, same lr, linear
schedule, no warmup, clip 1.0) and steps. Logging, evaluation and checkpointing are off.

One probe does the measuring in both: a `TrainerCallback` records step ends (step time = interval
between consecutive step ends, so data loading and collation count), the first training loss and
the loss's metrics of that batch (`logps/chosen|rejected`), tokens and padding per batch, and the
peak RSS (VmHWM, reset after the imports) at the end of training. The precompute pass of the
reference log-probs is timed by wrapping the function that does it.

    python scripts/bench_trl.py                          # everything, ~25 min on the 2-core CPU box
    python scripts/bench_trl.py --workloads w1 --sections trl
    python scripts/bench_trl.py --quick --out /tmp/b    # a tiny end-to-end run (~1 min)

Workloads (issue #8):
  W1: ../shared/models/stories260k, 500 VADER-scored pairs sampled from it (alignlab.bench.sentiment),
      batch 16, max_length 64, fp32, 2 threads.
  W2: a Llama from config (hidden 512, 4 layers, 8 heads, intermediate 1376, tied, GPT-2 tokenizer,
      38.4M params; seeded init saved once and loaded by both), HH-RLHF harmless-base pairs with
      prompt and each response 32-256 tokens, batch 4, TRL's defaults (gradient checkpointing on).
  W3 (GPU only): W2's recipe at 0.53B parameters (hidden 1536, 16 layers, 12 heads, intermediate
      4096) in bf16, batch 8: model FLOPs utilisation (MFU) of DPO, both frameworks.

On a GPU every run also reports its model FLOP/s and, for bf16 runs on a GPU whose peak is known
(`PEAK_BF16`, or `--peak-tflops`), its MFU: see `dpo_flops_per_token`.

Writes <out>/results.json (every record) and <out>/results.md (the tables of docs/performance.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
STORIES = SHARED / "models" / "stories260k"
HH = SHARED / "data" / "hh-rlhf" / "harmless-base-test.jsonl.gz"
GPT2 = SHARED / "tokenizers" / "gpt2"

#: the eleven registered losses, with the overrides and data each needs on the pair workloads.
LOSSES = ("dpo", "tdpo", "sparsepo", "rdpo", "npo", "asft", "tpo", "modpo", "bco", "rpo", "aligndistil")
#: the forward's layout before 2026-12-02's defaults: padded batches with their attention mask
BEFORE_LAYOUT_DEFAULTS = {"prefix_sharing": False, "padding_free": False, "drop_padding_mask": False}
#: alignlab's optimisation switches ({`model.<field>`: value}), each set alone over the defaults;
#: fields ModelConfig does not have (yet) are skipped and named in the table.
SWITCHES = {
    "reference cache (reference_mode=precomputed)": {"reference_mode": "precomputed"},
    "dense logits (logit_chunk_size=0)": {"logit_chunk_size": 0},
    "smaller logit chunks (logit_chunk_size=32)": {"logit_chunk_size": 32},
    "larger logit chunks (logit_chunk_size=512)": {"logit_chunk_size": 512},
    "head on every position (skip_unused_logits=false)": {"skip_unused_logits": False},
    "no prefix sharing: padding-free packing (prefix_sharing=false)": {"prefix_sharing": False},
    "padded batches (prefix_sharing=false padding_free=false)": {
        "prefix_sharing": False,
        "padding_free": False,
    },
    "padded batches with their mask (… drop_padding_mask=false)": BEFORE_LAYOUT_DEFAULTS,
    "eager attention (attn_implementation=eager)": {"attn_implementation": "eager"},
    #: flips the workload's own setting (W1: off -> on; W2: on -> off)
    "gradient checkpointing flipped": {"gradient_checkpointing": None},
}


#: the model shapes built from config (W2, W3), Llama with tied embeddings and the GPT-2 tokenizer.
SHAPES = {
    "w2": {"hidden_size": 512, "num_hidden_layers": 4, "num_attention_heads": 8, "intermediate_size": 1376},
    #: W2's model with room for 8k-token sequences
    "w4": {
        "hidden_size": 512,
        "num_hidden_layers": 4,
        "num_attention_heads": 8,
        "intermediate_size": 1376,
        "max_position_embeddings": 8192,
    },
    "w3": {
        "hidden_size": 1536,
        "num_hidden_layers": 16,
        "num_attention_heads": 12,
        "intermediate_size": 4096,
    },
    "w3-quick": {
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "intermediate_size": 128,
    },
}
#: dense bf16 peak FLOP/s of a GPU (datasheet, without sparsity), by a substring of its name; the
#: first match wins.
PEAK_BF16 = {
    "H100 PCIe": 756e12,
    "H100": 989.4e12,
    "H200": 989.4e12,
    "GH200": 989.4e12,
    "A100": 312e12,
    "L40S": 362.1e12,
}


@dataclasses.dataclass
class Workload:
    name: str
    batch: int
    max_length: int
    max_prompt_length: int
    n_pairs: int
    warmup: int
    steps: int
    repeats: int
    #: TRL's default (on) unless told; alignlab's own setting per workload below.
    trl_gradient_checkpointing: bool = True
    alignlab_gradient_checkpointing: bool = False
    learning_rate: float = 1e-6
    #: the data each run keeps: all pairs (W1) or only what its steps consume (W2).
    consume_only: bool = False
    #: float32, or bfloat16: bf16 mixed precision (fp32 weights, `bf16=True`) in both frameworks
    dtype: str = "float32"
    #: the model built from config (`SHAPES`); None: stories260k (W1)
    shape: str | None = None
    #: refused without a GPU (except in --quick, which checks the plumbing on a tiny model)
    gpu_only: bool = False
    #: micro-batches per optimizer step (`gradient_accumulation_steps`, both frameworks)
    grad_accum: int = 1
    #: long rows (W4): each of prompt, chosen and rejected is this many tokens (low, high) of HH-RLHF
    #: text concatenated; None: single HH pairs of 32-256 tokens per part (W2)
    part_tokens: tuple[int, int] | None = None


def _w4(length: int, quick: bool) -> Workload:
    """W4 at `length`-token sequences: prompt and each response 3/8-1/2 of it (at 4,096: 1,536-2,048
    tokens each), batch 1 with gradient accumulation 4, gradient checkpointing on in both."""
    return Workload(
        f"w4-{length // 1024}k",
        batch=1,
        grad_accum=4 if not quick else 2,
        max_length=length,
        max_prompt_length=length // 2,
        n_pairs=12 if not quick else 4,
        warmup=1,
        steps=2 if not quick else 1,
        repeats=1,
        consume_only=True,
        shape="w4",
        part_tokens=(3 * length // 8, length // 2),
        alignlab_gradient_checkpointing=True,
    )


def workloads(quick: bool) -> dict[str, Workload]:
    long_context = {f"w4-{k}k": _w4(k * 1024, quick) for k in (2, 4, 8)}
    if quick:
        return long_context | {
            "w1": Workload(
                "w1", batch=4, max_length=64, max_prompt_length=48, n_pairs=24, warmup=1, steps=2, repeats=1
            ),
            "w2": Workload(
                "w2",
                batch=2,
                max_length=1024,
                max_prompt_length=512,
                n_pairs=4,
                warmup=1,
                steps=1,
                repeats=1,
                consume_only=True,
                shape="w2",
            ),
            "w3": Workload(
                "w3",
                batch=2,
                max_length=1024,
                max_prompt_length=512,
                n_pairs=4,
                warmup=1,
                steps=1,
                repeats=1,
                consume_only=True,
                shape="w3-quick",
            ),
        }
    return long_context | {
        "w1": Workload(
            "w1", batch=16, max_length=64, max_prompt_length=48, n_pairs=500, warmup=3, steps=25, repeats=3
        ),
        "w2": Workload(
            "w2",
            batch=4,
            max_length=1024,
            max_prompt_length=512,
            n_pairs=256,
            warmup=1,
            steps=3,
            repeats=2,
            consume_only=True,
            shape="w2",
        ),
        "w3": Workload(
            "w3",
            batch=8,
            max_length=1024,
            max_prompt_length=512,
            n_pairs=256,
            warmup=2,
            steps=10,
            repeats=2,
            consume_only=True,
            shape="w3",
            dtype="bfloat16",
            gpu_only=True,
        ),
    }


# ----------------------------------------------------------------------------------------------------
# Preparing a workload: the model folder and the data files both frameworks read.
# ----------------------------------------------------------------------------------------------------


def _split_hh(text_chosen: str, text_rejected: str) -> tuple[str, str, str] | None:
    """HH transcripts -> (prompt up to and including the last "\\n\\nAssistant:", chosen, rejected)."""
    marker = "\n\nAssistant:"
    cut = text_chosen.rfind(marker)
    if cut < 0:
        return None
    prompt = text_chosen[: cut + len(marker)]
    if not text_rejected.startswith(prompt):
        return None
    return prompt, text_chosen[len(prompt) :], text_rejected[len(prompt) :]


def _hh_rows(tokenizer, n: int, low: int, high: int) -> list[dict]:
    """The first `n` HH pairs whose prompt and both responses are `low`-`high` tokens."""
    rows = []
    with gzip.open(HH, "rt") as f:
        for line in f:
            rec = json.loads(line)
            split = _split_hh(rec["chosen"], rec["rejected"])
            if split is None:
                continue
            prompt, chosen, rejected = split
            if chosen == rejected or not chosen.strip() or not rejected.strip():
                continue
            lengths = [len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in split]
            if all(low <= k <= high for k in lengths):
                rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
                if len(rows) == n:
                    break
    return rows


def _hh_long_rows(tokenizer, n: int, low: int, high: int) -> list[dict]:
    """`n` long pairs from consecutive HH records, each part `low`-`high` tokens: the prompt is whole
    transcripts (their chosen text) followed by one record's prompt, ending "\n\nAssistant:"; chosen
    and rejected are the chosen and the rejected responses of consecutive records, concatenated.
    A piece that would overshoot `high` is skipped, so every part is real text within the bounds."""
    records = []
    with gzip.open(HH, "rt") as f:
        for line in f:
            rec = json.loads(line)
            split = _split_hh(rec["chosen"], rec["rejected"])
            if split is not None and split[1] != split[2] and split[1].strip() and split[2].strip():
                records.append((rec["chosen"], *split))
    size = lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])  # noqa: E731

    def grow(pieces, start: int, tail: str = "") -> tuple[str, int]:
        """Concatenate pieces from `start` (cyclically) until the text (+ `tail`) reaches `low`."""
        text, i = "", start
        while size(text + tail) < low:
            piece = pieces[i % len(pieces)]
            if size(text + piece + tail) <= high:
                text += piece
            i += 1
            if i - start > 10 * len(pieces):
                raise RuntimeError(f"cannot reach {low}-{high} tokens from the HH records")
        return text + tail, i

    rows, at = [], 0
    for _ in range(n):
        while size(records[at % len(records)][1]) > low // 2:  # a short last turn: room for transcripts
            at += 1
        prompt, at = grow([r[0] for r in records], at, tail=records[at % len(records)][1])
        chosen, _ = grow([r[2] for r in records], at)
        rejected, at = grow([r[3] for r in records], at)
        rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return rows


def _sentiment_rows(n: int, cache_dir: Path) -> tuple[list[dict], str]:
    """W1's pairs: VADER-scored samples of stories260k (alignlab.bench.sentiment); HH pairs if it is
    absent."""
    try:
        from alignlab.bench.sentiment import pairs_file
    except ImportError:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(STORIES))
        rows = _hh_rows(tok, n, 1, 20)
        return rows, f"HH-RLHF pairs (alignlab.bench.sentiment absent), {len(rows)} rows"
    path = pairs_file(STORIES, n, seed=0, cache_dir=cache_dir)
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return rows, f"VADER-scored stories260k samples, alignlab.bench.sentiment.pairs_file(n_pairs={n}, seed=0)"


def _ids_alignlab(tok, prompt: str, response: str) -> tuple[list[int], list[int]]:
    """How alignlab.data.tokenize encodes a plain-text row: prompt with special tokens, response
    without, then EOS."""
    return tok(prompt)["input_ids"], tok(response, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]


def _ids_trl(tok, prompt: str, response: str) -> tuple[list[int], list[int]]:
    """How TRL 1.16 DPOTrainer._prepare_dataset encodes it: prompt and prompt+response+EOS text,
    the completion starting where the two diverge."""
    p = tok(prompt)["input_ids"]
    full = tok(prompt + response + tok.eos_token)["input_ids"]
    k = 0
    while k < min(len(p), len(full)) and p[k] == full[k]:
        k += 1
    return p[:k], full[k:]


def prepare(workload: Workload, work: Path) -> dict:
    """Write `work/pairs.jsonl` (+ the files other losses read) and, for W2, the model folder.

    Keeps only rows that both frameworks tokenise to the same ids within max_length, so the two
    runs see identical tokens. Returns a description for the report.
    """
    from transformers import AutoTokenizer

    work.mkdir(parents=True, exist_ok=True)
    if workload.name == "w1":
        model_dir = STORIES
        tok = AutoTokenizer.from_pretrained(str(STORIES))
        rows, source = _sentiment_rows(workload.n_pairs, work / "sentiment")
        sep = " "  # make_pairs strips completions; TRL joins prompt and completion as strings
    else:
        model_dir = work / f"model-{workload.shape}"  # one folder per shape: --quick never feeds a full run
        tok = _config_model(model_dir, SHAPES[workload.shape])
        if workload.part_tokens:
            low, high = workload.part_tokens
            rows = _hh_long_rows(tok, workload.n_pairs, low, high)
            source = (
                f"HH-RLHF harmless-base test concatenated: {len(rows)} pairs with prompt and each "
                f"response {low}-{high} tokens"
            )
        else:
            rows = _hh_rows(tok, workload.n_pairs, 32, 256)
            source = (
                f"HH-RLHF harmless-base test, first {len(rows)} pairs with prompt and responses 32-256 tokens"
            )
        sep = ""  # HH responses start with their own space
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    kept, dropped = [], 0
    for row in rows:
        ok = True
        for r in ("chosen", "rejected"):
            a = _ids_alignlab(tok, row["prompt"], row[r])
            b = _ids_trl(tok, row["prompt"], sep + row[r])
            if (
                a != b
                or len(a[0]) + len(a[1]) > workload.max_length
                or len(a[0]) > workload.max_prompt_length
            ):
                ok = False
        if ok:
            kept.append(row)
        else:
            dropped += 1
    if workload.consume_only:
        kept = kept[: workload.batch * workload.grad_accum * (workload.warmup + workload.steps)]
    _write_files(kept, work, sep)
    return {
        "model": str(model_dir),
        "source": source,
        "rows": len(kept),
        "dropped_tokenisation": dropped,
        "sep": sep,
    }


def _write_files(rows: list[dict], work: Path, sep: str) -> None:
    def dump(name: str, records: list[dict]) -> None:
        (work / name).write_text("".join(json.dumps(r) + "\n" for r in records))

    score = lambda row, r: float(row.get(f"{r}_score", 1.0 if r == "chosen" else 0.0))
    dump(
        "pairs.jsonl",
        [
            {
                "prompt": r["prompt"],
                "chosen": r["chosen"],
                "rejected": r["rejected"],
                "vader_chosen": score(r, "chosen"),
                "vader_rejected": score(r, "rejected"),
            }
            for r in rows
        ],
    )
    dump(
        "trl.jsonl",
        [{"prompt": r["prompt"], "chosen": sep + r["chosen"], "rejected": sep + r["rejected"]} for r in rows],
    )
    # TPO's triples: gold = the chosen response, chosen = the rejected one, rejected = the next row's
    # rejected response (off-prompt, so the worst): three distinct responses of this workload's lengths
    dump(
        "triples.jsonl",
        [
            {
                "prompt": r["prompt"],
                "gold": r["chosen"],
                "chosen": r["rejected"],
                "rejected": rows[(i + 1) % len(rows)]["rejected"],
            }
            for i, r in enumerate(rows)
            if len({r["chosen"], r["rejected"], rows[(i + 1) % len(rows)]["rejected"]}) == 3
        ],
    )
    # NPO: forget the rejected responses, retain the chosen ones
    dump("forget.jsonl", [{"prompt": r["prompt"], "completion": r["rejected"]} for r in rows])
    dump("retain.jsonl", [{"prompt": r["prompt"], "completion": r["chosen"]} for r in rows])


def _config_model(model_dir: Path, shape: dict):
    """A Llama of `shape` (SHAPES) from config and the GPT-2 fast tokenizer, saved once (seed 0) for
    both frameworks."""
    import torch
    from transformers import GPT2TokenizerFast, LlamaConfig, LlamaForCausalLM

    tok = GPT2TokenizerFast(vocab=str(GPT2 / "vocab.json"), merges=str(GPT2 / "merges.txt"))
    tok.pad_token = tok.eos_token
    if len(tok) != 50257:
        raise RuntimeError(f"the GPT-2 tokenizer built from {GPT2} has {len(tok)} tokens, expected 50257")
    if not (model_dir / "config.json").exists():
        torch.manual_seed(0)
        config = LlamaConfig(
            **{"max_position_embeddings": 1024, **shape},
            num_key_value_heads=shape["num_attention_heads"],
            vocab_size=len(tok),
            tie_word_embeddings=True,
            bos_token_id=tok.eos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.eos_token_id,
        )
        LlamaForCausalLM(config).save_pretrained(model_dir)
        tok.save_pretrained(model_dir)
    return tok


# ----------------------------------------------------------------------------------------------------
# One measurement, in its own process.
# ----------------------------------------------------------------------------------------------------


def _status_mib(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {key} in /proc/self/status")


def _reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class Probe:
    """Step ends, first loss and metrics, tokens, padding and peak memory of one training run."""

    def __init__(self) -> None:
        self.step_ends: list[float] = []
        self.first_loss: float | None = None
        self.first_metrics: dict[str, float] = {}
        self.tokens: list[int] = []
        self.slots: list[int] = []
        #: sequences (rows of every response) per batch
        self.rows: list[int] = []
        self.peak_mib: float | None = None
        self.cuda_peak_mib: float | None = None
        self.train_begin: float | None = None
        self.precompute_s = 0.0
        #: micro-batches per optimizer step (`tokens`, `slots` and `rows` are per micro-batch)
        self.accum = 1

    def callback(self):
        from transformers import TrainerCallback

        probe = self

        class _Callback(TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs):
                probe.train_begin = time.perf_counter()

            def on_step_end(self, args, state, control, **kwargs):
                probe.step_ends.append(time.perf_counter())

            def on_train_end(self, args, state, control, **kwargs):
                probe.peak_mib = _status_mib("VmHWM")
                import torch

                if torch.cuda.is_available():
                    probe.cuda_peak_mib = torch.cuda.max_memory_allocated() / 2**20

        return _Callback()

    def instrument(self, trainer_cls) -> None:
        """Wrap `trainer_cls.compute_loss` (the framework's own) to record what each batch held."""
        original = trainer_cls.compute_loss
        probe = self

        def compute_loss(trainer, model, inputs, *args, **kwargs):
            out = original(trainer, model, inputs, *args, **kwargs)
            if model.training:
                masks = [v for k, v in inputs.items() if k.endswith("attention_mask") and hasattr(v, "sum")]
                if not masks:  # packed inputs carry no mask: every position is a token
                    masks = [v for k, v in inputs.items() if k.endswith("input_ids") and hasattr(v, "numel")]
                    probe.tokens.append(sum(int(m.numel()) for m in masks))
                else:
                    probe.tokens.append(sum(int(m.sum()) for m in masks))
                probe.slots.append(sum(int(m.numel()) for m in masks))
                probe.rows.append(sum(int(m.shape[0]) for m in masks))
                if probe.first_loss is None:
                    loss = out[0] if isinstance(out, tuple) else out
                    probe.first_loss = float(loss.detach().double())
                    probe.first_metrics = {k: float(v[-1]) for k, v in trainer._metrics["train"].items() if v}
            return out

        trainer_cls.compute_loss = compute_loss

    def timed(self, fn):
        probe = self

        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                probe.precompute_s += time.perf_counter() - start

        return wrapper

    def result(
        self,
        warmup: int,
        baseline: float,
        flops_of=None,
        peak: float | None = None,
        gemm: float | None = None,
    ) -> dict:
        """`flops_of(tokens, mean_length)`: model FLOPs of a step (see `dpo_flops_per_token`); with
        `peak` (FLOP/s), the MFU of the timed steps; with `gemm` (FLOP/s, `gemm_rate`), the model
        FLOP/s as a fraction of what a plain fp32 matrix multiply reached in the same process."""
        steps = [b - a for a, b in zip(self.step_ends[warmup - 1 :], self.step_ends[warmup:])]
        k = self.accum  # micro-batches per step: their tokens and rows add up
        tokens = [sum(self.tokens[i * k : (i + 1) * k]) for i in range(warmup, warmup + len(steps))]
        rows = [sum(self.rows[i * k : (i + 1) * k]) for i in range(warmup, warmup + len(steps))]
        flops = (
            sum(flops_of(t, t / r) for t, r in zip(tokens, rows)) / sum(steps) if flops_of and steps else None
        )
        return {
            "model_tflops_per_s": None if flops is None else flops / 1e12,
            "mfu": None if flops is None or not peak else flops / peak,
            "gemm_tflops_per_s": None if not gemm else gemm / 1e12,
            "gemm_ratio": None if flops is None or not gemm else flops / gemm,
            "step_times": steps,
            "tokens": tokens,
            "pad_fraction": 1 - sum(self.tokens) / max(1, sum(self.slots)),
            "tokens_per_s": sum(tokens) / sum(steps) if steps else None,
            "first_loss": self.first_loss,
            "first_metrics": self.first_metrics,
            "peak_mib": None if self.peak_mib is None else round(self.peak_mib - baseline, 1),
            "cuda_peak_mib": self.cuda_peak_mib,
            "precompute_s": round(self.precompute_s, 2),
        }


#: the categories of a step's profile, first match wins: (name, test on the names of an op and of
#: its enclosing ops and annotations, innermost first). Time is each op's own (self) CPU time.
MATMULS = {
    "aten::mm",
    "aten::addmm",
    "aten::bmm",
    "aten::baddbmm",
    "aten::addbmm",
    "aten::_addmm_activation",
    "aten::matmul",
    "aten::linear",
    "aten::mv",
    "aten::addmv",
    "aten::dot",
}
PROFILE_CATEGORIES = (
    ("optimizer", lambda names: any(n.startswith(("Optimizer.step", "Optimizer.zero_grad")) for n in names)),
    ("data loading, collation", lambda names: any(n.startswith("enumerate(DataLoader)") for n in names)),
    ("attention", lambda names: any("attention" in n.lower() for n in names)),
    (
        "log-softmax, logsumexp, gather",
        lambda names: any(
            k in n.lower()
            for n in names
            for k in ("log_softmax", "logsoftmax", "logsumexp", "cross_entropy", "nll")
        ),
    ),
    ("matmuls", lambda names: names[0] in MATMULS),
    ("autograd engine", lambda names: names[0].startswith("autograd::")),
    ("other ops (elementwise, norms, copies)", lambda names: True),
)


class StepProfile:
    """`torch.profiler` over the timed steps of a run; `breakdown()` splits their wall time into
    `PROFILE_CATEGORIES` by each op's own CPU time, and names the rest (time in no op: the Python
    of the training loop, the loss and the model code) "Python, framework"."""

    def __init__(self, warmup: int, steps: int) -> None:
        self.warmup, self.steps = warmup, steps
        self.profiler = None
        self.wall_s = 0.0

    def callback(self):
        import torch
        from transformers import TrainerCallback

        me = self

        class _Callback(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                if state.global_step == me.warmup:
                    me.profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
                    me.profiler.start()
                    me.start = time.perf_counter()
                elif state.global_step == me.warmup + me.steps and me.profiler is not None:
                    me.profiler.stop()
                    me.wall_s = time.perf_counter() - me.start

        return _Callback()

    def breakdown(self) -> dict:
        """Seconds per step of each category, and of the whole step."""
        seconds = dict.fromkeys([name for name, _ in PROFILE_CATEGORIES], 0.0)
        ops: dict[tuple[str, str], float] = {}
        for event in self.profiler.events():
            names, e = [], event
            while e is not None:
                names.append(e.name)
                e = e.cpu_parent
            name = next(n for n, test in PROFILE_CATEGORIES if test(names))
            seconds[name] += event.self_cpu_time_total / 1e6
            ops[name, event.name] = ops.get((name, event.name), 0.0) + event.self_cpu_time_total / 1e6
        seconds["Python, framework"] = max(0.0, self.wall_s - sum(seconds.values()))
        top = sorted(ops.items(), key=lambda kv: -kv[1])[:25]
        self.top_ops = [(category, op, round(t / self.steps, 3)) for (category, op), t in top]
        return {"step_s": self.wall_s / self.steps, **{k: v / self.steps for k, v in seconds.items()}}


def dpo_flops_per_token(config: dict, context: float, live_reference: bool = True) -> float:
    """Model FLOPs of one DPO training token of a Llama-style decoder (PaLM, Chowdhery et al. 2022,
    appendix B): a forward pass costs 2 FLOPs per weight of every matmul (attention projections, MLP,
    output head; the embedding is a lookup) plus 4·L·d_attn·T for attention scores and values over a
    context of T tokens (the sequence's length, no causal discount); the policy's forward and backward
    cost 3 forwards, the live reference 1 more. The same count for both frameworks: what a plain
    implementation computes, without gradient checkpointing's recomputation; alignlab's skipped head
    positions count as computed, so its savings show as a higher MFU.
    """
    d, layers, inter, vocab = (
        config[k] for k in ("hidden_size", "num_hidden_layers", "intermediate_size", "vocab_size")
    )
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or d // heads
    attention = 2 * d * heads * head_dim + 2 * d * kv_heads * head_dim  # q and o; k and v
    matmul = layers * (attention + 3 * d * inter) + vocab * d
    forward = 2 * matmul + 4 * layers * heads * head_dim * context
    return (3 + live_reference) * forward


def peak_flops(gpu: str | None, dtype: str, override_tflops: float | None = None) -> float | None:
    """The GPU's dense peak FLOP/s for `dtype` (bf16 only: `PEAK_BF16`), or `override_tflops`."""
    if override_tflops:
        return override_tflops * 1e12
    if gpu is None or dtype != "bfloat16":
        return None
    return next((peak for name, peak in PEAK_BF16.items() if name in gpu), None)


def gemm_rate(threads: int, n: int = 2048, repeats: int = 5) -> float:
    """The machine's fp32 matrix-multiply rate now, in FLOP/s: `torch.mm` of two n×n matrices on
    `threads` threads, best of `repeats` (2n³ FLOPs each). Measured in each run's own process just
    before and after its training, so it sees the same load as the run's steps."""
    import torch

    _threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)  # warm-up: thread pool, allocator
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def _threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)


def measure(spec: dict) -> dict:
    """Run one training in this process (spec: see `_spec`) and return its figures."""
    t0 = time.perf_counter()
    _threads(spec["threads"])
    if spec["framework"] == "trl":
        import datasets
        import transformers
        from trl import DPOConfig, DPOTrainer

        trainer_cls = DPOTrainer
    else:
        import datasets  # noqa: F401
        import transformers  # noqa: F401

        import alignlab.data
        import alignlab.models
        import alignlab.reference
        import alignlab.report  # noqa: F401
        import alignlab.train as train_module
        from alignlab.trainer import AlignTrainer

        trainer_cls = AlignTrainer
    imports_s = time.perf_counter() - t0
    gemm_before = gemm_rate(spec["threads"]) if spec["device"] == "cpu" else None
    probe = Probe()
    probe.accum = spec.get("grad_accum", 1)
    probe.instrument(trainer_cls)
    profile = StepProfile(spec["warmup"], spec["steps"]) if spec.get("profile") else None
    baseline_rss = _status_mib("VmRSS")
    exact_peak = _reset_peak()
    baseline = baseline_rss if exact_peak else _status_mib("VmHWM")
    work = Path(spec["work"])
    steps = spec["warmup"] + spec["steps"]
    scratch = Path(tempfile.mkdtemp(prefix="bench_trl_"))  # fresh caches: nothing is reused between runs
    if spec["framework"] == "trl":
        import torch
        from datasets import Dataset
        from transformers import AutoModelForCausalLM, AutoTokenizer

        DPOTrainer._precompute_ref_logps = probe.timed(DPOTrainer._precompute_ref_logps)
        tok = AutoTokenizer.from_pretrained(spec["model"])
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
        rows = [json.loads(line) for line in (work / "trl.jsonl").read_text().splitlines()]
        args = DPOConfig(
            output_dir=str(scratch / "out"),
            per_device_train_batch_size=spec["batch"],
            gradient_accumulation_steps=spec["grad_accum"],
            per_device_eval_batch_size=spec["batch"],
            max_length=spec["max_length"],
            learning_rate=spec["lr"],
            lr_scheduler_type="linear",
            warmup_steps=0,
            weight_decay=0.0,
            max_grad_norm=1.0,
            optim=spec["optim"],
            max_steps=steps,
            bf16=spec["dtype"] == "bfloat16",
            fp16=False,
            gradient_checkpointing=spec["gradient_checkpointing"],
            precompute_ref_log_probs=spec["reference_mode"] == "precomputed",
            train_sampling_strategy="sequential",
            logging_steps=10**6,
            save_strategy="no",
            eval_strategy="no",
            report_to="none",
            use_cpu=not torch.cuda.is_available(),
            disable_tqdm=True,
            seed=spec["seed"],
            dataset_num_proc=None,
        )
        os.environ["HF_DATASETS_CACHE"] = str(scratch / "datasets")
        trainer = DPOTrainer(
            model=model,
            args=args,
            train_dataset=Dataset.from_list(rows),
            processing_class=tok,
            callbacks=[probe.callback(), *([profile.callback()] if profile else [])],
        )
        trainer.train()
    else:
        train_module._precompute_reference = probe.timed(train_module._precompute_reference)
        original_init = AlignTrainer.__init__

        def init(self, *args, callbacks=None, **kwargs):
            extra = [probe.callback(), *([profile.callback()] if profile else [])]
            original_init(self, *args, callbacks=[*(callbacks or []), *extra], **kwargs)

        AlignTrainer.__init__ = init
        cfg = _compose(_alignlab_overrides(spec, scratch))
        train_module.run(cfg, output_dir=scratch / "run")
    gemm = max(gemm_before, gemm_rate(spec["threads"])) if gemm_before else None
    out = _result(probe, spec, baseline, gemm)
    if profile:
        out["profile"] = profile.breakdown()
        out["profile_top_ops"] = profile.top_ops
    out.update(
        imports_s=round(imports_s, 2),
        baseline_rss_mib=round(baseline_rss, 1),
        exact_peak=exact_peak,
        setup_s=round((probe.train_begin or t0) - t0 - imports_s, 2),
    )
    return out


def _result(probe: Probe, spec: dict, baseline: float, gemm: float | None = None) -> dict:
    """The probe's figures, with model FLOP/s (DPO only), MFU on a GPU whose peak is known, and on a
    CPU the model FLOP/s as a fraction of the fp32 GEMM rate measured in the same process (`gemm`)."""
    import torch

    flops_of, peak = None, None
    if spec["loss"] == "dpo":
        config = json.loads((Path(spec["model"]) / "config.json").read_text())
        live = spec["reference_mode"] == "live"
        flops_of = lambda tokens, length: tokens * dpo_flops_per_token(config, length, live)  # noqa: E731
        if torch.cuda.is_available():
            peak = peak_flops(torch.cuda.get_device_name(0), spec["dtype"], spec.get("peak_tflops"))
    return probe.result(spec["warmup"], baseline, flops_of, peak, gemm)


def _alignlab_overrides(spec: dict, scratch: Path) -> list[str]:
    from alignlab.config import AlignConfig

    work = Path(spec["work"])
    data = {"pairs": work / "pairs.jsonl", "triples": work / "triples.jsonl", "forget": work / "forget.jsonl"}
    overrides = [
        f"loss={spec['loss']}",
        f"model.name_or_path={spec['model']}",
        f"data.path={data[spec['data']]}",
        "data.format=explicit",
        "data.eval_size=0",
        f"data.max_length={spec['max_length']}",
        f"data.max_prompt_length={spec['max_prompt_length']}",
        f"data.cache_dir={scratch / 'cache'}",
        f"trainer.per_device_train_batch_size={spec['batch']}",
        f"trainer.gradient_accumulation_steps={spec['grad_accum']}",
        f"trainer.per_device_eval_batch_size={spec['batch']}",
        f"trainer.max_steps={steps_of(spec)}",
        f"trainer.learning_rate={spec['lr']}",
        "trainer.warmup_steps=0",
        f"trainer.optim={spec['optim']}",
        "trainer.lr_scheduler_type=linear",
        "trainer.max_grad_norm=1.0",
        "trainer.logging_steps=1000000",
        "trainer.eval_steps=0",
        "trainer.save_steps=0",
        "+trainer.extra.train_sampling_strategy=sequential",
        "+trainer.extra.disable_tqdm=true",
        f"seed={spec['seed']}",
        f"model.reference_mode={spec['reference_mode']}",
        f"model.gradient_checkpointing={str(spec['gradient_checkpointing']).lower()}",
        f"trainer.bf16={str(spec['dtype'] == 'bfloat16').lower()}",
    ]
    overrides += [
        f"model.{k}={_yaml(v)}"
        for k, v in spec.get("switches", {}).items()
        if k not in ("reference_mode", "gradient_checkpointing")
    ]
    overrides += LOSS_OVERRIDES.get(spec["loss"], [])
    if "eval" in {f.name for f in dataclasses.fields(AlignConfig)}:
        overrides.append("eval.generate=false")  # no sampling after training
    if spec["loss"] == "npo":
        overrides.append(f"data.retain={work / 'retain.jsonl'}")
    if spec["loss"] == "aligndistil":  # minimal valid teachers: the initial model itself, twice
        overrides += [f"loss.dpo_teacher={spec['model']}", f"loss.reverse_teacher={spec['model']}"]
    return overrides


#: loss settings (the recipes' values) and the data file each loss reads.
LOSS_OVERRIDES = {
    "tdpo": ["loss.variant=tdpo2", "loss.alpha=0.5"],
    "sparsepo": ["loss.mask=learned"],
    "rdpo": ["loss.epsilon=0.1"],
    "npo": ["loss.variant=npo_rt"],
    "modpo": ["loss.weights=[0.5,0.5]", "loss.margins=[{kind:column,column:vader}]"],
    "rpo": ["loss.eta=0.005"],
}
LOSS_DATA = {"tpo": "triples", "npo": "forget"}


def steps_of(spec: dict) -> int:
    return spec["warmup"] + spec["steps"]


def _yaml(value) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def _compose(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    from alignlab.compose import register_configs
    from alignlab.config import resource_dir

    register_configs()
    with initialize_config_dir(config_dir=str(resource_dir("configs")), version_base=None):
        return compose("config", overrides=overrides)


# ----------------------------------------------------------------------------------------------------
# The driver: alternating runs, statistics, tables.
# ----------------------------------------------------------------------------------------------------

#: `--peak-tflops`: the GPU's peak for the MFU when `PEAK_BF16` does not know it
PEAK_TFLOPS: float | None = None


def _spec(
    w: Workload,
    info: dict,
    work: Path,
    framework: str,
    reference_mode: str = "live",
    loss: str = "dpo",
    switches: dict | None = None,
    threads: int = 2,
    profile: bool = False,
    optim: str = "adamw_torch_fused",
) -> dict:
    switches = dict(switches or {})
    gc = (
        w.trl_gradient_checkpointing
        if framework == "trl"
        else switches.get("gradient_checkpointing", w.alignlab_gradient_checkpointing)
    )
    return {
        "framework": framework,
        "workload": w.name,
        "work": str(work),
        "model": info["model"],
        "batch": w.batch,
        "grad_accum": w.grad_accum,
        "max_length": w.max_length,
        "max_prompt_length": w.max_prompt_length,
        "warmup": w.warmup,
        "steps": w.steps,
        "lr": w.learning_rate,
        "seed": 42,
        "threads": threads,
        "reference_mode": switches.get("reference_mode", reference_mode),
        "loss": loss,
        "data": LOSS_DATA.get(loss, "pairs"),
        "gradient_checkpointing": gc,
        "switches": switches,
        "dtype": w.dtype,
        "peak_tflops": PEAK_TFLOPS,
        "device": "cuda" if _has_gpu() else "cpu",
        "profile": profile,
        "optim": optim,
    }


def run_child(spec: dict, log: Path) -> dict:
    """`measure(spec)` in a fresh interpreter; its output goes to `log`."""
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(spec["threads"]),
        "MKL_NUM_THREADS": str(spec["threads"]),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "TQDM_DISABLE": "1",
        "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
    }
    start = time.time()
    with log.open("a") as f:
        f.write(f"\n### {json.dumps(spec)}\n")
        f.flush()
        proc = subprocess.run(
            [sys.executable, __file__, "--one", json.dumps(spec)],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=f,
            text=True,
            check=False,
        )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {
            **spec,
            "error": f"exit {proc.returncode}; see {log}",
            "wall_s": round(time.time() - start, 1),
        }
    return {**spec, **json.loads(lines[-1]), "wall_s": round(time.time() - start, 1)}


def _has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def machine() -> dict:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    try:
        import torch

        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except ImportError:
        gpu = None
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "loadavg": Path("/proc/loadavg").read_text().split()[:3],
        "gpu": gpu,
        "python": platform.python_version(),
        "time_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def available_switches() -> dict[str, dict[str, object]]:
    from alignlab.config import ModelConfig

    names = {f.name for f in dataclasses.fields(ModelConfig)}
    return {label: sw for label, sw in SWITCHES.items() if set(sw) <= names}


def _median(xs):
    return statistics.median(xs) if xs else float("nan")


def summarise(records: list[dict]) -> dict:
    """Median step time, its spread (min-max over every timed step of every repeat), tokens/s, memory."""
    ok = [r for r in records if "error" not in r]
    steps = [s for r in ok for s in r["step_times"]]
    tps = [r["tokens_per_s"] for r in ok if r.get("tokens_per_s")]
    return {
        "n": len(ok),
        "errors": [r["error"] for r in records if "error" in r],
        "step_s": _median(steps),
        "step_min": min(steps, default=float("nan")),
        "step_max": max(steps, default=float("nan")),
        "tokens_per_s": _median(tps),
        "tps_min": min(tps, default=float("nan")),
        "tps_max": max(tps, default=float("nan")),
        "peak_mib": _median([r["peak_mib"] for r in ok if r.get("peak_mib") is not None]),
        "cuda_peak_mib": _median([r["cuda_peak_mib"] for r in ok if r.get("cuda_peak_mib") is not None]),
        "pad_fraction": _median([r["pad_fraction"] for r in ok]),
        "model_tflops_per_s": _median([r["model_tflops_per_s"] for r in ok if r.get("model_tflops_per_s")]),
        "mfu": _median([r["mfu"] for r in ok if r.get("mfu")]),
        "gemm_tflops_per_s": _median([r["gemm_tflops_per_s"] for r in ok if r.get("gemm_tflops_per_s")]),
        "gemm_ratio": _median([r["gemm_ratio"] for r in ok if r.get("gemm_ratio")]),
        "precompute_s": _median([r["precompute_s"] for r in ok]),
        "first_loss": ok[0]["first_loss"] if ok else None,
        "first_metrics": ok[0]["first_metrics"] if ok else {},
    }


def trl_section(w: Workload, info: dict, work: Path, log: Path, modes: tuple[str, ...]) -> list[dict]:
    """alignlab and TRL, alternating: repeat r runs (A, B) for even r and (B, A) for odd r, per mode."""
    records = []
    for rep in range(w.repeats):
        for mode in modes:
            order = ("alignlab", "trl") if rep % 2 == 0 else ("trl", "alignlab")
            for fw in order:
                rec = run_child(_spec(w, info, work, fw, mode), log)
                rec.update(section="trl", repeat=rep)
                records.append(rec)
                _progress(rec)
    return records


def _progress(rec: dict) -> None:
    if "error" in rec:
        print(
            f"  {rec['workload']} {rec['framework']} {rec['loss']} "
            f"{rec['reference_mode']} {rec.get('label', '')}: "
            f"FAILED {rec['error']}",
            file=sys.stderr,
        )
        return
    st = rec["step_times"]
    print(
        f"  {rec['workload']} {rec['framework']:8} {rec['loss']:11} {rec['reference_mode']:11} "
        f"{rec.get('label', ''):22} step {_median(st):.3f}s tok/s {rec['tokens_per_s'] or 0:.0f} "
        f"peak {rec['peak_mib']} MiB loss0 {rec['first_loss']!r} ({rec['wall_s']} s)",
        file=sys.stderr,
    )


def fmt(x, digits=3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def trl_table(name: str, records: list[dict], modes: tuple[str, ...]) -> tuple[list[str], dict]:
    lines = [
        (
            f"| {name} | reference | framework | step time, s "
            "(median [min–max]) | tokens/s (median [min–max]) | "
            "peak memory above imports, MiB | padding | precompute "
            "pass, s | step-0 loss | step-0 logps/chosen |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    ratios = {}
    for mode in modes:
        s = {
            fw: summarise([r for r in records if r["reference_mode"] == mode and r["framework"] == fw])
            for fw in ("alignlab", "trl")
        }
        for fw in ("alignlab", "trl"):
            x = s[fw]
            mem = _memory(x)
            lines.append(
                f"| | {mode} | {fw} | {fmt(x['step_s'])} [{fmt(x['step_min'])}–{fmt(x['step_max'])}] | "
                f"{fmt(x['tokens_per_s'], 0)} "
                f"[{fmt(x['tps_min'], 0)}–{fmt(x['tps_max'], 0)}] | {fmt(mem, 0)} | "
                f"{fmt(x['pad_fraction'], 2)} | "
                f"{fmt(x['precompute_s'], 1) if mode == 'precomputed' else '—'} | "
                f"{fmt(x['first_loss'], 7)} | {fmt(x['first_metrics'].get('logps/chosen'), 4)} |"
            )
        a, t = s["alignlab"], s["trl"]
        agree = (
            a["first_loss"] is not None
            and t["first_loss"] is not None
            and abs(a["first_loss"] - t["first_loss"]) <= 1e-5
        )
        paired = []  # alignlab / TRL tokens/s of each repeat: the two ran back to back under the same load
        for rep in sorted({r["repeat"] for r in records}):
            pair = {
                r["framework"]: r.get("tokens_per_s")
                for r in records
                if r["repeat"] == rep and r["reference_mode"] == mode and "error" not in r
            }
            if pair.get("alignlab") and pair.get("trl"):
                paired.append(pair["alignlab"] / pair["trl"])
        ratios[mode] = {
            "tokens_per_s": a["tokens_per_s"] / t["tokens_per_s"] if t["tokens_per_s"] else None,
            "tokens_per_s_paired": paired,
            "step_time": t["step_s"] / a["step_s"] if a["step_s"] else None,
            "peak_memory": _memory(a) / _memory(t) if _memory(t) else None,
            "mfu": {"alignlab": a["mfu"], "trl": t["mfu"]},
            "gemm_ratio": {"alignlab": a["gemm_ratio"], "trl": t["gemm_ratio"]},
            "model_tflops_per_s": {"alignlab": a["model_tflops_per_s"], "trl": t["model_tflops_per_s"]},
            "loss0_diff": (
                abs(a["first_loss"] - t["first_loss"])
                if a["first_loss"] is not None and t["first_loss"] is not None
                else None
            ),
            "logps_chosen0_diff": _diff(a["first_metrics"], t["first_metrics"], "logps/chosen"),
            "logps_rejected0_diff": _diff(a["first_metrics"], t["first_metrics"], "logps/rejected"),
            "loss0_agree": agree,
            "errors": a["errors"] + t["errors"],
        }
    lines.append("")
    lines.append(
        f"| {name}: alignlab / TRL | tokens/s (of medians) "
        "| tokens/s, per A/B pair [min–max] | peak memory | "
        "step-0 loss |Δ| | step-0 logps/chosen |Δ| | step-0 logps/rejected |Δ| |"
    )
    lines.append("|---|---|---|---|---|---|---|")
    for mode, r in ratios.items():
        p = r["tokens_per_s_paired"]
        lines.append(
            f"| {mode} reference | {fmt(r['tokens_per_s'], 2)}× | {fmt(_median(p), 2)}× "
            f"[{fmt(min(p, default=None), 2)}–{fmt(max(p, default=None), 2)}] "
            f"| {fmt(r['peak_memory'], 2)}× | "
            f"{_sci(r['loss0_diff'])} | {_sci(r['logps_chosen0_diff'])} | {_sci(r['logps_rejected0_diff'])} |"
        )
    if any(not math.isnan(x) for r in ratios.values() for x in r["model_tflops_per_s"].values()):
        lines += [
            "",
            f"| {name}: model FLOPs (`dpo_flops_per_token`) | reference | framework | model GFLOP/s "
            "| fp32 GEMM GFLOP/s, same processes | model / GEMM | MFU (GPU peak) |",
            "|---|---|---|---|---|---|---|",
        ]
        for mode in modes:
            for fw in ("alignlab", "trl"):
                x = summarise([r for r in records if r["reference_mode"] == mode and r["framework"] == fw])
                lines.append(
                    f"| | {mode} | {fw} | {fmt(x['model_tflops_per_s'] * 1e3, 1)} | "
                    f"{fmt(x['gemm_tflops_per_s'] * 1e3, 1)} | {_pct(x['gemm_ratio'])} | {_pct(x['mfu'])} |"
                )
    return lines, ratios


def _memory(summary: dict) -> float:
    """Peak memory of a summary: the GPU's allocated peak on a GPU, else RSS above the imports."""
    return summary["peak_mib"] if math.isnan(summary["cuda_peak_mib"]) else summary["cuda_peak_mib"]


def _pct(x) -> str:
    return "—" if x is None or math.isnan(x) else f"{100 * x:.1f}%"


def _diff(a: dict, b: dict, key: str):
    return abs(a[key] - b[key]) if key in a and key in b else None


def _sci(x) -> str:
    return "—" if x is None else f"{x:.1e}"


def relative_table(name: str, records: list[dict], key: str, base_label: str) -> list[str]:
    groups: dict[str, list[dict]] = {}
    for r in records:
        groups.setdefault(r[key], []).append(r)
    base = summarise(groups.get(base_label, []))
    lines = [
        (
            f"| {name} | step time, s (median [min–max]) | tokens/s "
            f"| × {base_label} tokens/s | peak memory, MiB | "
            f"× {base_label} memory | padding | step-0 loss | model GFLOP/s | model / GEMM |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for label, recs in groups.items():
        s = summarise(recs)
        if not s["n"]:
            lines.append(f"| {label} | failed: {s['errors'][0][:80]} | | | | | | | | |")
            continue
        rt = s["tokens_per_s"] / base["tokens_per_s"] if base["n"] else float("nan")
        rm = _memory(s) / _memory(base) if base["n"] and _memory(base) else float("nan")
        lines.append(
            f"| {label} | {fmt(s['step_s'])} [{fmt(s['step_min'])}–{fmt(s['step_max'])}] | "
            f"{fmt(s['tokens_per_s'], 0)} | {fmt(rt, 2)}× | {fmt(_memory(s), 0)} | {fmt(rm, 2)}× | "
            f"{fmt(s['pad_fraction'], 2)} | {fmt(s['first_loss'], 5)} | "
            f"{fmt(s['model_tflops_per_s'] * 1e3, 1)} | {_pct(s['gemm_ratio'])} |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="tiny workloads and steps: an end-to-end check")
    parser.add_argument("--workloads", default="w1,w2")
    parser.add_argument("--sections", default="trl,losses,switches,profile")
    parser.add_argument("--modes", default="live,precomputed", help="reference modes of the TRL comparison")
    parser.add_argument("--losses", default=",".join(LOSSES), help="losses of the W1 loss table")
    parser.add_argument("--w2-losses", default="dpo,tdpo,aligndistil", help="losses of the W2 loss table")
    parser.add_argument("--repeats", type=int, help="override the workloads' repeats")
    parser.add_argument(
        "--switches", help="only the switches whose label contains one of these comma-separated words"
    )
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "bench_trl")
    parser.add_argument(
        "--peak-tflops", type=float, help="the GPU's dense bf16 peak, for the MFU (default: PEAK_BF16)"
    )
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(json.loads(args.one))))
        return
    global PEAK_TFLOPS
    PEAK_TFLOPS = args.peak_tflops

    if not SHARED.exists():
        sys.exit(f"bench_trl: needs {SHARED} (models and data); it is absent")
    args.out.mkdir(parents=True, exist_ok=True)
    log = args.out / "children.log"
    modes = tuple(args.modes.split(","))
    sections = set(args.sections.split(","))
    all_w = workloads(args.quick)
    results = {"machine_start": machine(), "command": " ".join(sys.argv), "workloads": {}, "records": []}
    md = []
    for name in args.workloads.split(","):
        w = all_w[name]
        if w.gpu_only and not args.quick and not _has_gpu():
            sys.exit(
                f"bench_trl: workload {name} measures GPU throughput "
                "(bf16, MFU) and needs a GPU; this machine has none"
            )
        if args.repeats:
            w.repeats = args.repeats
        work = args.out / "work" / name
        info = prepare(w, work)
        results["workloads"][name] = {**dataclasses.asdict(w), **info}
        print(f"{name}: {info}", file=sys.stderr)
        md.append(
            f"### {name.upper()}: {info['source']}; {info['rows']} pairs kept "
            f"({info['dropped_tokenisation']} dropped: tokenised differently or too long); batch {w.batch}"
            f"{f' × {w.grad_accum} accumulated' if w.grad_accum > 1 else ''}, "
            f"max_length {w.max_length}, {w.warmup} warm-up + {w.steps} timed steps × {w.repeats} repeats; "
            f"gradient checkpointing TRL {'on' if w.trl_gradient_checkpointing else 'off'}, "
            f"alignlab {'on' if w.alignlab_gradient_checkpointing else 'off'}"
        )
        md.append("")
        alignlab_runs: dict[str, list[dict]] = {}  # the TRL comparison's alignlab runs, reused below
        if "trl" in sections:
            recs = trl_section(w, info, work, log, modes)
            results["records"] += recs
            lines, ratios = trl_table(name.upper(), recs, modes)
            results["workloads"][name]["ratios"] = ratios
            md += lines + [""]
            for mode in modes:
                alignlab_runs[mode] = [
                    r for r in recs if r["framework"] == "alignlab" and r["reference_mode"] == mode
                ]
        repeats = 1 if name.startswith(("w2", "w3", "w4")) else max(1, w.repeats - 1)
        if "losses" in sections:
            names = args.losses.split(",") if name == "w1" else args.w2_losses.split(",")
            recs = [{**r, "section": "losses"} for r in alignlab_runs.get("live", []) if "dpo" in names]
            todo = [n for n in names if not (n == "dpo" and recs)]
            for rep in range(repeats):
                for loss in todo if rep % 2 == 0 else todo[::-1]:
                    rec = run_child(_spec(w, info, work, "alignlab", loss=loss), log)
                    rec.update(section="losses", repeat=rep)
                    recs.append(rec)
                    _progress(rec)
            results["records"] += [r for r in recs if r.get("section") == "losses"]
            md += relative_table(f"{name.upper()} loss", recs, "loss", "dpo") + [""]
        if "switches" in sections:
            switches = available_switches()
            missing = [label for label in SWITCHES if label not in switches]
            if args.switches:
                words = args.switches.split(",")
                switches = {label: sw for label, sw in switches.items() if any(w in label for w in words)}
            recs = [{**r, "label": "plain"} for r in alignlab_runs.get("live", [])]
            label_cache = next(iter(SWITCHES))
            recs += [{**r, "label": label_cache} for r in alignlab_runs.get("precomputed", [])]
            reused = {r["label"] for r in recs}
            for rep in range(repeats):
                for label, flipped in [("plain", {}), *switches.items()]:
                    if label in reused:
                        continue
                    if "gradient_checkpointing" in flipped:
                        flipped = {"gradient_checkpointing": not w.alignlab_gradient_checkpointing}
                    rec = run_child(_spec(w, info, work, "alignlab", switches=flipped or None), log)
                    rec.update(section="switches", repeat=rep, label=label)
                    recs.append(rec)
                    _progress(rec)
            results["records"] += [r for r in recs if r.get("section") == "switches"]
            md += relative_table(f"{name.upper()} alignlab switch (DPO)", recs, "label", "plain") + [""]
            if missing:
                md += [f"Not measured (no such `model.*` field yet): {', '.join(missing)}.", ""]
        if "profile" in sections:
            recs = []
            for fw, label, switches, optim in PROFILED:
                rec = run_child(_spec(w, info, work, fw, switches=switches, profile=True, optim=optim), log)
                rec.update(section="profile", label=label)
                recs.append(rec)
                _progress(rec)
            results["records"] += recs
            md += profile_table(f"{name.upper()} per-step profile (DPO, live reference)", recs) + [""]
        write(results, md, args.out)  # after each workload: a cut-short run keeps what it measured
    print(write(results, md, args.out))


#: the runs of the profile section: (framework, label, alignlab's switches, optimizer)
PROFILED = (
    ("alignlab", "alignlab (defaults)", {}, "adamw_torch_fused"),
    (
        "alignlab",
        "alignlab, padded batches with their mask (the defaults before 2026-12-02)",
        BEFORE_LAYOUT_DEFAULTS,
        "adamw_torch_fused",
    ),
    ("trl", "TRL", {}, "adamw_torch_fused"),
)


def profile_table(name: str, records: list[dict]) -> list[str]:
    """Seconds per step (and share of the step) of each profile category, one column per run."""
    ok = [r for r in records if "profile" in r]
    if not ok:
        return [f"{name}: failed ({'; '.join(r.get('error', '?') for r in records)})"]
    lines = [
        f"| {name} | " + " | ".join(r["label"] for r in ok) + " |",
        "|---|" + "---|" * len(ok),
    ]
    for key in [*ok[0]["profile"].keys()][1:] + ["step_s"]:
        cells = []
        for r in ok:
            p = r["profile"]
            share = "" if key == "step_s" else f" ({100 * p[key] / p['step_s']:.0f}%)"
            cells.append(f"{p[key]:.2f} s{share}")
        label = "whole step (profiled)" if key == "step_s" else key
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def write(results: dict, md: list[str], out: Path) -> str:
    """results.json and results.md in `out`; returns the markdown."""
    results["machine_end"] = machine()
    m0, m1 = results["machine_start"], results["machine_end"]
    header = [
        (
            f"Machine: {m0['nproc']} CPUs, {m0['cpu']}; GPU: "
            f"{m0['gpu'] or 'none'}; load average (1, 5, 15 min) "
            f"{' '.join(m0['loadavg'])} at the start "
            f"({m0['time_utc']}), {' '.join(m1['loadavg'])} at the end "
            f"({m1['time_utc']})."
        ),
        "",
        f"Command: `python {results['command']}`",
        "",
    ]
    text = "\n".join(header + md) + "\n"
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    (out / "results.md").write_text(text)
    return text


if __name__ == "__main__":
    main()
