"""Train the embedded demo model: a tiny MiniMax-M2 (transformers' MiniMaxM2ForCausalLM) on tools/demo_corpus.py.

    python tools/train_demo.py --out configs/demo_model --log /path/train.log      # the shipped model
    python tools/train_demo.py --out /tmp/x --quick                                  # seconds: CI's rot check

Seeded and deterministic: the corpus, the tokenizer (trained with the `tokenizers` library on the corpus), the
initial weights and the batch order all follow `Settings.seed`. Loss is taken on the assistant turns the model writes
(those after the last user message), never on the prompt. The router's e_score_correction_bias is not trained by
gradient, as in M2: after each step it moves by `bias_rate` toward balance (an expert that got more than its share
of tokens has its bias lowered, one that got less has it raised), so the router does not collapse onto a few
experts. The checkpoint is written in the M2 release layout (runtime/demo.py's config and tokenizer_config writers,
bf16 weights with an fp32 router, two shards with an index) plus a manifest of sha256 hashes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import re
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path

# Before torch starts OpenMP: idle OpenMP threads sleep instead of spinning. On a shared machine spinning threads
# burn most of the CPU time (measured: 8x more CPU per step), and the results are the same either way.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import demo_corpus  # noqa: E402  (tools/ is scripts, not a package)

from moerun.runtime import demo, trained_demo  # noqa: E402

# The architecture: M2's layout (QK-norm over all heads, partial RoPE, sigmoid router + correction bias, top-k)
# at a size whose bf16 weights stay near 10 MB and that trains on two CPU cores in about half an hour.
DIMS = dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2, head_dim=32,
            rotary_dim=16, intermediate_size=64, num_local_experts=16, num_experts_per_tok=4)
VOCAB = 2048  # tokenizer entries, added tokens included (the model's vocab is padded to a multiple of 64)
# generation_config.json: M2's recommended sampling, but cooler. A 5M-parameter toy's low-probability tail is noise:
# at the release's temperature 1.0 about one sampled answer in six has a made-up word (docs/demo.md).
SAMPLING = {"temperature": 0.5}


@dataclass
class Settings:
    seed: int = 0
    heldout_seed: int = 1
    corpus_mb: float = 4.0
    heldout_conversations: int = 200
    steps: int = 600
    tokens_per_step: int = 4096
    lr: float = 3e-3
    warmup: int = 30
    weight_decay: float = 0.05
    bias_rate: float = 5e-3
    eval_every: int = 200
    threads: int = 2


QUICK = Settings(corpus_mb=0.04, heldout_conversations=4, steps=2, tokens_per_step=512, eval_every=2)


# --- data -------------------------------------------------------------------------------------------------------

ADDED = [content for content, _ in demo.ADDED_TOKENS]
_ADDED_RE = re.compile("|".join(re.escape(a) for a in ADDED))


def train_tokenizer(conversations: list[str]):
    """Byte-level BPE (digits split one by one, so numbers are learnable) with M2's added tokens after the
    learned vocabulary, as in the release. The added tokens are cut out of the training text first, so no merge
    is spent on their pieces."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB - len(ADDED), min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    segments = [s for text in conversations for s in _ADDED_RE.split(text) if s]
    tok.train_from_iterator(segments, trainer)
    tok.add_tokens([AddedToken(content, special=special, normalized=False) for content, special in demo.ADDED_TOKENS])
    return tok


def loss_spans(text: str) -> list[tuple[int, int]]:
    """Character spans the model is trained to write: every assistant turn after the last user message, from
    just after `]~b]ai\\n` through its `[e~[`. Earlier turns are context the model never has to produce."""
    start = text.rfind("]~b]user\n")
    spans = []
    for m in re.finditer(re.escape("]~b]ai\n"), text[start:]):
        begin = start + m.end()
        end = text.index(demo.EOS, begin) + len(demo.EOS)
        spans.append((begin, end))
    return spans


def encode(tok, text: str) -> tuple[list[int], list[int]]:
    """Token ids and labels (-100 outside the loss spans; transformers shifts labels itself)."""
    enc = tok.encode(text, add_special_tokens=False)
    spans = loss_spans(text)
    labels = [i if any(b <= s < e for b, e in spans) else -100 for i, (s, _) in zip(enc.ids, enc.offsets)]
    return enc.ids, labels


def make_batches(examples: list[tuple[list[int], list[int]]], tokens_per_step: int) -> list[list[int]]:
    """Indices grouped by length (little padding; each conversation attends only to itself), at most
    tokens_per_step padded tokens per batch."""
    order = sorted(range(len(examples)), key=lambda i: (len(examples[i][0]), i))
    batches, current = [], []
    for i in order:
        if current and (len(current) + 1) * len(examples[i][0]) > tokens_per_step:
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


def collate(examples, batch: list[int], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    # Right padding needs no attention mask: causal attention never lets a real token see a later pad.
    width = max(len(examples[i][0]) for i in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)
    for row, i in enumerate(batch):
        x, y = examples[i]
        ids[row, :len(x)] = torch.tensor(x)
        labels[row, :len(y)] = torch.tensor(y)
    return ids, labels


# --- model ------------------------------------------------------------------------------------------------------

def model_config(ids: dict[str, int], vocab_size: int) -> dict:
    """config.json exactly as the shipped checkpoint has it (release layout, legacy rotary_dim included)."""
    return demo._model_config(ids, vocab_size, DIMS)


def build_model(config: dict, seed: int):
    from transformers import MiniMaxM2Config, MiniMaxM2ForCausalLM

    torch.manual_seed(seed)
    cfg = MiniMaxM2Config(**{k: v for k, v in config.items() if k not in ("architectures", "transformers_version",
                                                                          "torch_dtype")})
    cfg._attn_implementation = "sdpa"
    return MiniMaxM2ForCausalLM(cfg).float()


class LoadBalancer:
    """Aux-loss-free balancing (as M2 and DeepSeek-V3 do it): count each expert's share of the routed tokens in a
    step, then bias += rate * sign(mean share - share). Counts only real tokens (not padding)."""

    def __init__(self, model, rate: float) -> None:
        self.model, self.rate = model, rate
        self.mask: torch.Tensor | None = None
        self.counts = [None] * len(model.model.layers)
        for i, layer in enumerate(model.model.layers):
            layer.mlp.gate.register_forward_hook(self._hook(i))

    def _hook(self, index: int):
        def record(module, inputs, output):
            top_k = output[2].detach()
            if self.mask is not None:
                top_k = top_k[self.mask.reshape(-1)]
            self.counts[index] = torch.bincount(top_k.reshape(-1), minlength=module.num_experts).float()
        return record

    @torch.no_grad()
    def update(self) -> float:
        """Apply the bias step; returns the worst layer's max share / mean share (1.0 = perfectly even)."""
        worst = 1.0
        for layer, counts in zip(self.model.model.layers, self.counts):
            share = counts / counts.sum()
            layer.mlp.e_score_correction_bias += self.rate * torch.sign(share.mean() - share)
            worst = max(worst, (share.max() / share.mean()).item())
        return worst


def lr_at(step: int, s: Settings) -> float:
    if step < s.warmup:
        return s.lr * (step + 1) / s.warmup
    progress = (step - s.warmup) / max(1, s.steps - s.warmup)
    return s.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def loss_sum(model, input_ids: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed next-token loss over the labelled positions, and their count. The LM head runs only where there is
    a label: most tokens are prompt (tool schemas, system text), so this saves much of the step."""
    hidden = model.model(input_ids=input_ids).last_hidden_state[:, :-1]
    target = labels[:, 1:]
    keep = target != -100
    logits = model.lm_head(hidden[keep]).float()
    return torch.nn.functional.cross_entropy(logits, target[keep], reduction="sum"), int(keep.sum())


@torch.no_grad()
def mean_loss(model, examples, pad_id: int, tokens_per_step: int) -> float:
    """Mean per-token loss over the loss spans of `examples` (fp32)."""
    model.eval()
    total, count = 0.0, 0
    for batch in make_batches(examples, tokens_per_step):
        summed, n = loss_sum(model, *collate(examples, batch, pad_id))
        total, count = total + summed.item(), count + n
    model.train()
    return total / count


# --- checkpoint -------------------------------------------------------------------------------------------------

def release_tensors(model) -> dict[str, torch.Tensor]:
    """transformers' fused expert tensors back to M2's per-expert w1/w3/w2 names; bf16, router in fp32."""
    bf16, out = torch.bfloat16, {}
    inter = DIMS["intermediate_size"]
    for name, t in model.state_dict().items():
        t = t.detach()
        if ".mlp.experts.gate_up_proj" in name:
            p = name.replace("mlp.experts.gate_up_proj", "block_sparse_moe.experts.")
            for e in range(t.shape[0]):
                out[f"{p}{e}.w1.weight"] = t[e, :inter].to(bf16).clone()
                out[f"{p}{e}.w3.weight"] = t[e, inter:].to(bf16).clone()
        elif ".mlp.experts.down_proj" in name:
            p = name.replace("mlp.experts.down_proj", "block_sparse_moe.experts.")
            for e in range(t.shape[0]):
                out[f"{p}{e}.w2.weight"] = t[e].to(bf16).clone()
        elif ".mlp.gate.weight" in name or "e_score_correction_bias" in name:
            out[name.replace(".mlp.", ".block_sparse_moe.")] = t.float().clone()
        else:
            out[name] = t.to(bf16).clone()
    return out


def write_checkpoint(folder: Path, tok, ids: dict[str, int], vocab_size: int, model, record: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    demo._write_text(folder / "tokenizer.json", tok.to_str(pretty=True) + "\n")
    demo._write_json(folder / "tokenizer_config.json", demo._tokenizer_config(ids))
    demo._write_text(folder / "chat_template.jinja", demo.CHAT_TEMPLATE)
    demo._write_json(folder / "config.json", model_config(ids, vocab_size))
    demo._write_json(folder / "generation_config.json", {**demo._generation_config(ids), **SAMPLING})
    demo._write_weights(folder, release_tensors(model), DIMS["num_hidden_layers"])
    demo._write_json(folder / "training.json", record)
    demo.write_manifest(folder, trained_demo.VERSION, trained_demo.FILES)


# --- the run ----------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def deterministic_torch(threads: int) -> Iterator[None]:
    """Deterministic kernels on `threads` threads while training; torch's settings as they were afterwards, so a
    caller in the same process (a test) is left as it was."""
    before = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.set_num_threads(before[0])
        torch.use_deterministic_algorithms(before[1])


def train(out: Path, s: Settings, log) -> dict:
    with deterministic_torch(s.threads):
        return _train(out, s, log)


def _train(out: Path, s: Settings, log) -> dict:
    t_start = time.time()
    conversations = list(demo_corpus.render_conversations(s.seed, max_chars=int(s.corpus_mb * 1e6)))
    heldout_text = list(demo_corpus.render_conversations(s.heldout_seed, count=s.heldout_conversations))
    tok = train_tokenizer(conversations)
    ids = tok.get_vocab()
    vocab_size = -(-tok.get_vocab_size() // 64) * 64
    pad_id = ids[demo.PAD]
    examples = [encode(tok, t) for t in conversations]
    heldout = [encode(tok, t) for t in heldout_text]
    n_tokens = sum(len(x) for x, _ in examples)
    n_loss = sum(sum(1 for y in ys if y != -100) for _, ys in examples)
    log(f"corpus: {len(conversations)} conversations, {sum(map(len, conversations)) / 1e6:.2f} MB, {n_tokens} tokens "
        f"({n_loss} in the loss); held-out: {len(heldout)} conversations; vocab {tok.get_vocab_size()} -> {vocab_size}")

    model = build_model(model_config(ids, vocab_size), s.seed)
    log(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters, {DIMS}")
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "gate.weight" not in n]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2 or "gate.weight" in n]
    groups = [{"params": decay, "weight_decay": s.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=s.lr, betas=(0.9, 0.95))
    balancer = LoadBalancer(model, s.bias_rate)
    batches = make_batches(examples, s.tokens_per_step)
    order: list[list[int]] = []
    curve, evals, epoch, seen = [], [], 0, 0
    model.train()
    for step in range(s.steps):
        if not order:
            order = list(batches)
            random.Random(s.seed * 1000 + epoch).shuffle(order)
            epoch += 1
        batch = order.pop()
        input_ids, labels = collate(examples, batch, pad_id)
        balancer.mask = input_ids != pad_id
        for group in opt.param_groups:
            group["lr"] = lr_at(step, s)
        summed, count = loss_sum(model, input_ids, labels)
        loss = summed / count
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        imbalance = balancer.update()
        seen += int(balancer.mask.sum())
        curve.append(loss.item())
        if step % 20 == 0 or step == s.steps - 1:
            recent = sum(curve[-20:]) / len(curve[-20:])
            log(f"step {step} epoch {epoch} loss {recent:.4f} lr {lr_at(step, s):.2e} max/mean expert load "
                f"{imbalance:.2f} tokens {seen} elapsed {time.time() - t_start:.0f}s")
        if (step + 1) % s.eval_every == 0 or step == s.steps - 1:
            balancer.mask = None
            evals.append({"step": step + 1, "heldout_loss": mean_loss(model, heldout, pad_id, s.tokens_per_step)})
            log(f"eval step {step + 1}: held-out loss {evals[-1]['heldout_loss']:.4f}")
    final_train = sum(curve[-50:]) / len(curve[-50:])
    record = {
        "settings": asdict(s), "dims": DIMS, "vocab": tok.get_vocab_size(), "model_vocab": vocab_size,
        "parameters": sum(p.numel() for p in model.parameters()), "corpus_conversations": len(conversations),
        "corpus_tokens": n_tokens, "tokens_seen": seen, "epochs": round(seen / n_tokens, 2),
        "train_loss_last_50_steps": round(final_train, 4), "heldout_loss": [
            {"step": e["step"], "loss": round(e["heldout_loss"], 4)} for e in evals],
        "max_over_mean_expert_load_last_step": round(imbalance, 2),
        "seconds": round(time.time() - t_start), "torch": torch.__version__,
        "transformers": __import__("transformers").__version__, "tokenizers": __import__("tokenizers").__version__,
    }
    write_checkpoint(out, tok, ids, vocab_size, model, record)
    log(f"wrote {out} in {record['seconds']}s: train loss {final_train:.4f}, held-out {evals[-1]['heldout_loss']:.4f}")
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="empty or new folder for the checkpoint")
    parser.add_argument("--quick", action="store_true", help="a few steps on a small slice (CI)")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--corpus-mb", type=float, default=None)
    parser.add_argument("--log", type=Path, default=None)
    args = parser.parse_args()
    s = QUICK if args.quick else Settings()
    if args.steps is not None:
        s = replace(s, steps=args.steps)
    if args.corpus_mb is not None:
        s = replace(s, corpus_mb=args.corpus_mb)
    log_file = args.log.open("a", encoding="utf-8") if args.log else None

    def log(line: str) -> None:
        print(line, flush=True)
        if log_file:
            log_file.write(line + "\n")
            log_file.flush()

    train(args.out, s, log)


if __name__ == "__main__":
    main()
