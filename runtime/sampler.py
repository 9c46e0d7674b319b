"""Next tokens from a step's logits, on the device, with each request's own parameters, in one batched pass.

Per row, in order (runtime/sampling_params.py has the semantics): the vocabulary is cut to the tokenizer's (a
checkpoint's vocab_size may be padded past it); stop tokens are masked while fewer than min_tokens are out;
repetition, presence and frequency penalties; then greedy rows take the argmax, and the others: temperature,
min_p, top_k and top_p (the token whose cumulative probability crosses top_p is kept), and a draw from what
remains. Only the chosen ids (and the requested logprobs) go to the host.

The draw is an exponential race, argmax(p / E) with E ~ Exp(1) per token, which picks token i with probability
p_i. Its noise is a counter-based hash of (request seed, output position, token id), so a request's samples
depend on nothing else in the batch, come out the same after a preemption recomputes it, and are the same on
every device.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch

from moerun.runtime.request import LogprobEntry, Request
from moerun.runtime.staging import StagingBuffer

_M32 = 0xFFFFFFFF


def _mul32(x, c: int):
    """(x * c) mod 2^32 for x in [0, 2^32), without int64 overflow (16-bit halves); ints or int64 tensors."""
    return ((x & 0xFFFF) * c + ((((x >> 16) * c) & 0xFFFF) << 16)) & _M32


def hash32(x):
    """A bijective 32-bit mixer (Wellons' lowbias32) on ints or int64 tensors holding uint32 values."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def noise_key(seed: int, position: int) -> int:
    """The 32-bit key of one request's draw at one output position."""
    return hash32(hash32(hash32(seed & _M32) ^ ((seed >> 32) & _M32)) ^ (position & _M32))


def uniform_noise(keys: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """fp32 uniforms in (0, 1), [B, K], from int64 keys [B] and token ids [B, K] (or [1, K])."""
    bits = hash32(keys[:, None] ^ token_ids) >> 8  # 24 bits: what fp32 holds exactly
    return (bits.float() + 0.5) * 2.0 ** -24


@dataclasses.dataclass
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[LogprobEntry | None]  # per row; None where the request asked for none


@dataclasses.dataclass
class _Rows:
    """One step's rows, ready to draw from: processed logits and, on the device, each row's parameters."""

    logits: torch.Tensor  # [B, V] after penalties and the min_tokens mask
    drawn: list[int]  # rows with temperature > 0 (the others are greedy)
    candidates: int  # 0: every token, unsorted (no top-k/top-p); else how many of the largest to sort
    temperature: torch.Tensor
    top_k: torch.Tensor
    top_p: torch.Tensor
    min_p: torch.Tensor
    keys: torch.Tensor


class Sampler:
    def __init__(self, vocab_size: int, device: torch.device, max_num_seqs: int) -> None:
        self.vocab_size = vocab_size  # ids at or past it are never sampled
        self.device = device
        self._floats = StagingBuffer(max_num_seqs * 6, torch.float32, device)
        self._ints = StagingBuffer(max_num_seqs * 2, torch.int64, device)

    @torch.inference_mode()
    def __call__(self, logits: torch.Tensor, requests: list[Request]) -> SamplerOutput:
        """logits fp32 [B, V] on the device, row b for requests[b] (whose token_ids end where it samples)."""
        logits = logits[:, :self.vocab_size]
        rows = self._prepare(logits, requests)
        tokens = rows.logits.argmax(dim=-1)
        if rows.drawn:
            probs, ids = self._distribution(rows)
            race = probs / -torch.log(uniform_noise(rows.keys[rows.drawn], ids))
            tokens[rows.drawn] = ids.gather(1, race.argmax(dim=-1, keepdim=True)).squeeze(1)
        entries: list[LogprobEntry | None] = [None] * len(requests)
        asked = [b for b, r in enumerate(requests) if r.params.logprobs is not None]
        if asked:
            found = logprob_entries(logits[asked], tokens[asked], [requests[b].params.logprobs for b in asked])
            for b, entry in zip(asked, found):
                entries[b] = entry
        return SamplerOutput(tokens.tolist(), entries)

    @torch.inference_mode()
    def distribution(self, logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
        """The probabilities [B, vocab_size] that __call__ draws each row's token from (one-hot for greedy rows)."""
        logits = logits[:, :self.vocab_size]
        rows = self._prepare(logits, requests)
        out = torch.zeros_like(rows.logits)
        out.scatter_(1, rows.logits.argmax(dim=-1, keepdim=True), 1.0)
        if rows.drawn:
            probs, ids = self._distribution(rows)
            out[rows.drawn] = torch.zeros_like(out[rows.drawn]).scatter_(1, ids, probs)
        return out

    def _prepare(self, logits: torch.Tensor, requests: list[Request]) -> _Rows:
        n, vocab = len(requests), self.vocab_size
        params = [r.params for r in requests]
        top_k = [p.top_k if 0 < p.top_k < vocab else vocab for p in params]
        f = self._floats.np[:n * 6].reshape(6, n)
        for row, name in enumerate(("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty",
                                    "frequency_penalty")):
            f[row] = [getattr(p, name) for p in params]
        i = self._ints.np[:n * 2].reshape(2, n)
        i[0] = [noise_key(r.seed, r.num_output_tokens) for r in requests]
        i[1] = top_k
        temperature, top_p, min_p, repetition, presence, frequency = self._floats.upload(n * 6).view(6, n)
        keys, top_k_dev = self._ints.upload(n * 2).view(2, n)

        x = logits
        penalized = [b for b, p in enumerate(params)
                     if p.repetition_penalty != 1 or p.presence_penalty != 0 or p.frequency_penalty != 0]
        if penalized:
            x = x.clone()
            x[penalized] = self._penalize(x[penalized], [requests[b] for b in penalized],
                                          repetition[penalized], presence[penalized], frequency[penalized])
        x = self._mask_early_stops(x, requests)
        drawn = [b for b, p in enumerate(params) if p.temperature > 0]
        # the whole vocabulary unsorted (no top-k/top-p), the top max(k) when every drawn row has a top-k, else the
        # whole vocabulary sorted
        if not any(top_k[b] < vocab or params[b].top_p < 1 for b in drawn):
            candidates = 0
        elif all(top_k[b] < vocab for b in drawn):
            candidates = max(top_k[b] for b in drawn)
        else:
            candidates = vocab
        return _Rows(x, drawn, candidates, temperature, top_k_dev, top_p, min_p, keys)

    def _distribution(self, rows: _Rows) -> tuple[torch.Tensor, torch.Tensor]:
        """Probabilities [D, K] and their token ids [D, K] for the drawn rows: temperature, min_p, top_k, top_p."""
        d = rows.drawn
        x = rows.logits[d] / rows.temperature[d, None]
        if rows.candidates == 0:
            values, ids = x, torch.arange(x.shape[-1], device=x.device)[None, :].expand_as(x)
        elif rows.candidates < x.shape[-1]:
            values, ids = x.topk(rows.candidates, dim=-1)
        else:
            values, ids = x.sort(dim=-1, descending=True)
        # min_p: p_i >= min_p * p_max, i.e. x_i - x_max >= log(min_p) (log 0 = -inf keeps all)
        keep = values >= values.max(dim=-1, keepdim=True).values + torch.log(rows.min_p[d])[:, None]
        if rows.candidates:
            keep &= torch.arange(values.shape[-1], device=x.device)[None, :] < rows.top_k[d, None]
        probs = torch.softmax(values.masked_fill(~keep, -math.inf), dim=-1)
        if rows.candidates:  # top_p: drop what comes after the token whose cumulative mass crosses top_p
            top_p = rows.top_p[d, None]
            probs = probs.masked_fill((probs.cumsum(dim=-1) - probs >= top_p) & (top_p < 1), 0.0)
            probs = probs / probs.sum(dim=-1, keepdim=True)
        return probs, ids

    def _penalize(self, x: torch.Tensor, requests: list[Request], repetition: torch.Tensor, presence: torch.Tensor,
                  frequency: torch.Tensor) -> torch.Tensor:
        """OpenAI/vLLM penalties: repetition over prompt + output tokens, presence and frequency over the output."""
        vocab = x.shape[-1]

        def padded(lists: list[list[int]]) -> torch.Tensor:
            # ids past the vocabulary (and the padding) land in one extra column that is dropped
            width = max(1, max(map(len, lists)))
            out = np.full((len(lists), width), vocab, dtype=np.int64)
            for row, ids in enumerate(lists):
                out[row, :len(ids)] = np.minimum(ids, vocab)
            return torch.from_numpy(out).to(self.device)

        outputs = padded([r.output_token_ids for r in requests])
        counts = torch.zeros(len(requests), vocab + 1, device=self.device)
        counts.scatter_add_(1, outputs, torch.ones_like(outputs, dtype=counts.dtype))
        counts = counts[:, :vocab]
        in_prompt = torch.zeros(len(requests), vocab + 1, dtype=torch.bool, device=self.device)
        in_prompt.scatter_(1, padded([r.prompt_token_ids for r in requests]), True)
        seen = in_prompt[:, :vocab] | (counts > 0)
        r = repetition[:, None]
        x = torch.where(seen, torch.where(x > 0, x / r, x * r), x)
        return x - presence[:, None] * (counts > 0) - frequency[:, None] * counts

    def _mask_early_stops(self, x: torch.Tensor, requests: list[Request]) -> torch.Tensor:
        """Stop tokens cannot be drawn while a request has fewer than min_tokens outputs."""
        pairs = [(b, t) for b, r in enumerate(requests) if r.num_output_tokens < r.params.min_tokens
                 for t in r.stop_token_ids if t < self.vocab_size]
        if not pairs:
            return x
        rows, ids = torch.tensor(pairs, device=self.device).T
        return x.index_put((rows, ids), torch.tensor(-math.inf, device=self.device))

def logprob_entries(logits: torch.Tensor, token_ids: torch.Tensor, top_n: list[int]) -> list[LogprobEntry]:
    """Each row's logprob of token_ids[row] under log_softmax(logits[row]) and its top_n[row] most likely tokens."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    chosen = logprobs.gather(1, token_ids[:, None]).squeeze(1).tolist()
    ids = token_ids.tolist()
    top_values, top_ids = [[]] * len(ids), [[]] * len(ids)
    if max(top_n):
        values, indices = logprobs.topk(max(top_n), dim=-1)
        top_values, top_ids = values.tolist(), indices.tolist()
    return [LogprobEntry(ids[r], chosen[r], list(zip(top_ids[r][:top_n[r]], top_values[r][:top_n[r]])))
            for r in range(len(ids))]
