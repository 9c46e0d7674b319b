"""Parity figures between two runs of the same token sequences: do two backends compute the same model?

Reference run A, candidate run B, both fp32 logits [T, V] of next-token predictions. Default thresholds are the
"faithful 16-bit" band (mean KL <= 1e-3 nats, top-1 agreement >= 99%): BF16 vs FP16 of one model measures about
2.5e-5 mean KL and 99.7% top-1, 8-bit quantization about 1.4e-3 and 97.7% (llama.cpp's KLD tables).
"""

from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass(frozen=True)
class Thresholds:
    max_abs_rel: float | None = None  # max |A - B| / max |A|; off by default (dtype-dependent)
    mean_kl: float = 1e-3
    max_kl: float | None = None
    min_top1: float = 0.99
    min_top5: float = 0.95


@dataclasses.dataclass
class ParityReport:
    positions: int
    logit_scale: float  # max |A|
    max_abs_diff: float
    mean_kl: float  # KL(P_A || P_B) in nats, mean over positions
    max_kl: float
    top1_agreement: float
    top5_overlap: float  # mean |top5(A) & top5(B)| / 5
    failures: list[str] = dataclasses.field(default_factory=list)

    @property
    def max_abs_rel(self) -> float:
        return self.max_abs_diff / max(self.logit_scale, 1e-30)

    @property
    def passed(self) -> bool:
        return not self.failures

    def rows(self, t: Thresholds) -> list[tuple[str, str, str]]:
        """(metric, value, threshold) rows for the table."""
        def limit(v, fmt, op):
            return "-" if v is None else f"{op} {v:{fmt}}"
        return [
            ("positions", str(self.positions), ""),
            ("logit scale max|A|", f"{self.logit_scale:.4g}", ""),
            ("max |A-B|", f"{self.max_abs_diff:.3e}", ""),
            ("max |A-B| / scale", f"{self.max_abs_rel:.3e}", limit(t.max_abs_rel, ".1e", "<=")),
            ("mean KL(A||B)", f"{self.mean_kl:.3e}", limit(t.mean_kl, ".1e", "<=")),
            ("max KL(A||B)", f"{self.max_kl:.3e}", limit(t.max_kl, ".1e", "<=")),
            ("top-1 agreement", f"{self.top1_agreement:.4f}", limit(t.min_top1, ".4f", ">=")),
            ("top-5 overlap", f"{self.top5_overlap:.4f}", limit(t.min_top5, ".4f", ">=")),
        ]


def compare_logits(a: torch.Tensor, b: torch.Tensor, t: Thresholds = Thresholds()) -> ParityReport:
    if a.shape != b.shape:
        raise ValueError(f"logit shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    a, b = a.double(), b.double()
    logp_a, logp_b = torch.log_softmax(a, -1), torch.log_softmax(b, -1)
    kl = (logp_a.exp() * (logp_a - logp_b)).sum(-1).clamp_min(0)
    k = min(5, a.shape[-1])
    top_a, top_b = a.topk(k, -1).indices, b.topk(k, -1).indices
    overlap = (top_a[:, :, None] == top_b[:, None, :]).any(-1).float().sum(-1) / k
    report = ParityReport(
        positions=a.shape[0],
        logit_scale=a.abs().max().item(),
        max_abs_diff=(a - b).abs().max().item(),
        mean_kl=kl.mean().item(),
        max_kl=kl.max().item(),
        top1_agreement=(a.argmax(-1) == b.argmax(-1)).double().mean().item(),
        top5_overlap=overlap.mean().item(),
    )
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        report.failures.append("non-finite logits")
    checks = [
        (t.max_abs_rel, report.max_abs_rel, "max |A-B| / scale", lambda v, lim: v <= lim),
        (t.mean_kl, report.mean_kl, "mean KL", lambda v, lim: v <= lim),
        (t.max_kl, report.max_kl, "max KL", lambda v, lim: v <= lim),
        (t.min_top1, report.top1_agreement, "top-1 agreement", lambda v, lim: v >= lim),
        (t.min_top5, report.top5_overlap, "top-5 overlap", lambda v, lim: v >= lim),
    ]
    for limit, value, name, ok in checks:
        if limit is not None and not ok(value, limit):
            report.failures.append(f"{name} {value:.3e} beyond {limit:.1e}")
    return report


@dataclasses.dataclass
class StageDiff:
    """How far one intermediate of the graph (a layer's attention output, router logits, MoE output) has moved."""

    name: str
    max_abs_rel: float  # max |A - B| / max |A|
    cosine: float  # cosine similarity of the flattened tensors
    expert_agreement: float | None  # router stages: mean fraction of each token's top-k experts both chose


def compare_stages(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], route=None) -> list[StageDiff]:
    """a, b: stage name -> tensor [T, ...] from the two runs, in graph order. `route(name, logits) -> ids [T, k]`
    turns router logits into expert choices, so routing flips show up as agreement below 1."""
    out = []
    for name, ta in a.items():
        tb = b[name]
        ta64, tb64 = ta.double().flatten(), tb.double().flatten()
        cosine = torch.nn.functional.cosine_similarity(ta64, tb64, dim=0).item()
        agreement = None
        if route is not None and name.endswith("router_logits"):
            ids_a, ids_b = route(name, ta), route(name, tb)
            agreement = (ids_a[:, :, None] == ids_b[:, None, :]).any(-1).double().mean().item()
        out.append(StageDiff(name, (ta64 - tb64).abs().max().item() / max(ta64.abs().max().item(), 1e-30), cosine, agreement))
    return out
