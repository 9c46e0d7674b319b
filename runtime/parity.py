"""Parity figures between runs of the same token sequences: do two configurations compute the same model?

Two verdicts. The calibrated one (the default of `moerun parity`) measures the noise floor of faithful arithmetic
on the tokens at hand: a high-precision run HP of the reference's checkpoint, the reference A and the candidate B;
B passes when it is about as close to HP as A is (`Calibration`, docs/fidelity.md). The fixed one compares A and B
directly against constants (`Thresholds`): the "faithful 16-bit" band of llama.cpp's KLD tables (BF16 vs FP16 of
one model about 2.5e-5 mean KL and 99.7% top-1, 8-bit quantization about 1.4e-3 and 97.7%), which does not hold
across widths (a release-width bf16 layer flips router choices and exceeds it although it is faithful).

All logits are fp32 [T, V] of next-token predictions; figures are computed in float64.
"""

from __future__ import annotations

import dataclasses
import math

import torch

_ROWS = 32  # positions per chunk in measure_logits (32 x 200064 x 8 bytes = 51 MB per float64 copy)

# A stage leaves the floor when its typical relative distance to HP exceeds sqrt(k) x the reference's plus this:
# ~100x fp32 rounding after a layer's accumulations (~1e-6) and ~10x below bf16's (2^-9 / sqrt(3) ~ 1e-3), so it
# only matters when the reference itself is float32 (its floor is then near zero).
STAGE_EPSILON = 1e-4


@dataclasses.dataclass(frozen=True)
class Calibration:
    """B passes when median KL(HP||B) <= k * median KL(HP||A) + epsilon and top-1(HP, B) >= top-1(HP, A) - margin.

    The median over positions, not the mean: a faithful 16-bit run's distance to HP is rounding noise at every
    position plus a few discrete events (a router choice flipped by rounding moves that token's distribution a
    lot), and whether the reference or the candidate happens to flip a knife-edge choice makes a faithful candidate's
    mean KL up to 45x the reference's on small models, while the medians agree within 2.5x; quantization moves every
    position (docs/fidelity.md has the measurements). The flips still count, through top-1 agreement.

    k = 4: KL is quadratic in a small logit perturbation, so 4x the reference's KL is twice its error amplitude:
    room for another, equally exact order of rounding (faithful candidates measure 0.4-0.9x), at the level 8-bit
    weights add (3-7x) and far below 4-bit (720x and more). epsilon = 1e-6 nats: a floor under the floor, for
    float32 references, whose KL to a float64 run is ~1e-13; 25x below two faithful 16-bit implementations (2.5e-5).
    margin None: two standard errors of the difference of two top-1 rates over N positions at the reference's rate
    (p = (agreeing + 1) / (N + 2), so a perfect reference still leaves room), plus one position:
    2 sqrt(2 p (1 - p) / N) + 1 / N. Top-1 flips are discrete events at near-ties, so a faithful candidate's count
    differs from the reference's by sampling noise of that size."""

    k: float = 4.0
    epsilon: float = 1e-6
    top1_margin: float | None = None

    def margin(self, floor: ParityReport) -> float:
        return self.top1_margin_of(floor.positions, floor.top1_agreement)

    def top1_margin_of(self, positions: int, top1_agreement: float) -> float:
        """The margin for a floor of `top1_agreement` over `positions` positions."""
        if self.top1_margin is not None:
            return self.top1_margin
        n = positions
        p = (top1_agreement * n + 1) / (n + 2)
        return 2 * math.sqrt(2 * p * (1 - p) / n) + 1 / n


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
    median_kl: float  # ... and its median over positions
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
            ("median KL(A||B)", f"{self.median_kl:.3e}", ""),
            ("max KL(A||B)", f"{self.max_kl:.3e}", limit(t.max_kl, ".1e", "<=")),
            ("top-1 agreement", f"{self.top1_agreement:.4f}", limit(t.min_top1, ".4f", ">=")),
            ("top-5 overlap", f"{self.top5_overlap:.4f}", limit(t.min_top5, ".4f", ">=")),
        ]


def compare_logits(a: torch.Tensor, b: torch.Tensor, t: Thresholds = Thresholds()) -> ParityReport:
    """The fixed verdict: B against A, judged by the constants in `t`."""
    report = measure_logits(a, b)
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


def measure_logits(a: torch.Tensor, b: torch.Tensor) -> ParityReport:
    """The figures of B against A; `failures` holds only non-finite logits. Computed a few positions at a time, so a
    200k vocabulary needs no full-size float64 copies."""
    if a.shape != b.shape:
        raise ValueError(f"logit shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    kls, top1, overlap, max_diff = [], [], [], 0.0
    k = min(5, a.shape[-1])
    for i in range(0, a.shape[0], _ROWS):
        ca, cb = a[i:i + _ROWS].double(), b[i:i + _ROWS].double()
        logp_a, logp_b = torch.log_softmax(ca, -1), torch.log_softmax(cb, -1)
        kls.append((logp_a.exp() * (logp_a - logp_b)).sum(-1).clamp_min(0))
        top1.append(ca.argmax(-1) == cb.argmax(-1))
        top_a, top_b = ca.topk(k, -1).indices, cb.topk(k, -1).indices
        overlap.append((top_a[:, :, None] == top_b[:, None, :]).any(-1).double().sum(-1) / k)
        max_diff = max(max_diff, (ca - cb).abs().max().item())
    kl = torch.cat(kls)
    report = ParityReport(
        positions=a.shape[0],
        logit_scale=a.abs().max().item(),
        max_abs_diff=max_diff,
        mean_kl=kl.mean().item(),
        median_kl=kl.median().item(),
        max_kl=kl.max().item(),
        top1_agreement=torch.cat(top1).double().mean().item(),
        top5_overlap=torch.cat(overlap).mean().item(),
    )
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        report.failures.append("non-finite logits")
    return report


@dataclasses.dataclass
class CalibratedVerdict:
    floor: ParityReport  # the reference against HP
    candidate: ParityReport  # the candidate against HP
    direct: ParityReport  # the candidate against the reference: what the fixed verdict judges
    kl_limit: float
    top1_limit: float
    failures: list[str]

    @property
    def passed(self) -> bool:
        return not self.failures

    def rows(self) -> list[tuple[str, str, str, str, str]]:
        """(metric, floor, candidate, limit, B vs A) rows for the table."""
        f, c, d = self.floor, self.candidate, self.direct
        return [
            ("positions", str(f.positions), str(c.positions), "", str(d.positions)),
            ("max |x-y| / max|y|", f"{f.max_abs_rel:.3e}", f"{c.max_abs_rel:.3e}", "", f"{d.max_abs_rel:.3e}"),
            ("median KL(y||x)", f"{f.median_kl:.3e}", f"{c.median_kl:.3e}", f"<= {self.kl_limit:.3e}", f"{d.median_kl:.3e}"),
            ("mean KL(y||x)", f"{f.mean_kl:.3e}", f"{c.mean_kl:.3e}", "", f"{d.mean_kl:.3e}"),
            ("max KL(y||x)", f"{f.max_kl:.3e}", f"{c.max_kl:.3e}", "", f"{d.max_kl:.3e}"),
            ("top-1 agreement", f"{f.top1_agreement:.4f}", f"{c.top1_agreement:.4f}", f">= {self.top1_limit:.4f}",
             f"{d.top1_agreement:.4f}"),
            ("top-5 overlap", f"{f.top5_overlap:.4f}", f"{c.top5_overlap:.4f}", "", f"{d.top5_overlap:.4f}"),
        ]


def calibrated_verdict(hp: torch.Tensor, ref: torch.Tensor, cand: torch.Tensor,
                       cal: Calibration = Calibration()) -> CalibratedVerdict:
    """Judge the candidate by its distance to the high-precision run, relative to the reference's (the floor)."""
    floor, candidate = measure_logits(hp, ref), measure_logits(hp, cand)
    kl_limit = cal.k * floor.median_kl + cal.epsilon
    top1_limit = floor.top1_agreement - cal.margin(floor)
    failures = [f"reference: {f}" for f in floor.failures] + [f"candidate: {f}" for f in candidate.failures]
    if not candidate.median_kl <= kl_limit:
        failures.append(f"median KL(HP||candidate) {candidate.median_kl:.3e} beyond {cal.k:g} x floor "
                        f"{floor.median_kl:.3e} + {cal.epsilon:.0e} = {kl_limit:.3e}")
    if not candidate.top1_agreement >= top1_limit:
        failures.append(f"top-1 agreement with HP {candidate.top1_agreement:.4f} below the floor's "
                        f"{floor.top1_agreement:.4f} - margin {cal.margin(floor):.4f}")
    return CalibratedVerdict(floor, candidate, measure_logits(ref, cand), kl_limit, top1_limit, failures)


@dataclasses.dataclass
class StageDiff:
    """How far one intermediate of the graph (a layer's attention output, router logits, MoE output) has moved."""

    name: str
    max_abs_rel: float  # max |A - B| / max |A|
    token_rel: float  # median over tokens of ||B_t - A_t|| / ||A_t||: the typical token's relative distance
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
        diff = tb64 - ta64
        per_token = diff.reshape(ta.shape[0], -1).norm(dim=-1) / ta64.reshape(ta.shape[0], -1).norm(dim=-1).clamp_min(1e-30)
        out.append(StageDiff(name, diff.abs().max().item() / max(ta64.abs().max().item(), 1e-30),
                             per_token.median().item(), cosine, agreement))
    return out


@dataclasses.dataclass
class StageFloor:
    """One stage of the three runs: the reference's and the candidate's distance to HP."""

    floor: StageDiff  # HP vs the reference
    candidate: StageDiff  # HP vs the candidate
    limit: float  # the candidate's typical relative distance beyond which it has left the floor

    @property
    def name(self) -> str:
        return self.floor.name

    @property
    def left(self) -> bool:
        return not self.candidate.token_rel <= self.limit


def stage_floors(hp: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], cand: dict[str, torch.Tensor],
                 k: float, route=None) -> list[StageFloor]:
    """Per stage (in graph order, the stages all three runs recorded): the candidate leaves the floor where the
    typical token's relative distance to HP (the median, for the reason Calibration gives) exceeds sqrt(k) x the
    reference's + STAGE_EPSILON. sqrt(k): the amplitude that k allows in KL, which is quadratic in it."""
    names = [n for n in hp if n in ref and n in cand]
    floors = compare_stages({n: hp[n] for n in names}, ref, route)
    cands = compare_stages({n: hp[n] for n in names}, cand, route)
    return [StageFloor(f, c, math.sqrt(k) * f.token_rel + STAGE_EPSILON) for f, c in zip(floors, cands)]
