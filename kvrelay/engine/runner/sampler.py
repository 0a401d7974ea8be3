"""Token sampling: greedy, temperature, top-k, top-p, per-request seeds.

Owns: turning last-position logits into token ids and the per-request random generators.
Must not import the model, the scheduler or anything above `engine.runner`.

Rules: temperature 0 and top_k 1 are greedy (argmax; ties go to the lowest index). A seeded
request draws only from its own `torch.Generator`, created at its first sample and kept until
`drop` is called, so its tokens do not depend on what else is in the batch. Unseeded rows
share one generator and are drawn together.
"""

from __future__ import annotations

import torch

from kvrelay.protocol import SamplingParams

_LOW_PRECISION = (torch.float16, torch.bfloat16)


class Sampler:
    """Samples one token per row of a logits matrix; holds per-request generators."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self._generators: dict[str, torch.Generator] = {}

    def drop(self, request_ids: list[str]) -> None:
        """Forget the generators of finished requests."""
        for rid in request_ids:
            self._generators.pop(rid, None)

    @property
    def num_generators(self) -> int:
        return len(self._generators)

    def sample(
        self, logits: torch.Tensor, request_ids: list[str], params: list[SamplingParams]
    ) -> list[int]:
        """logits: (num_rows, vocab), one row per request. Returns one token id per row."""
        assert logits.shape[0] == len(request_ids) == len(params)
        if logits.dtype in _LOW_PRECISION:
            logits = logits.float()
        tokens = torch.argmax(logits, dim=-1)  # (num_rows,) the greedy answer for every row
        rows = [i for i, p in enumerate(params) if not (p.greedy or p.top_k == 1)]
        if rows:
            sub = [params[i] for i in rows]
            index = torch.tensor(rows, device=logits.device)
            probs = _filtered_probs(logits.index_select(0, index), sub)
            drawn = self._draw(probs, [request_ids[i] for i in rows], sub)
            tokens.index_copy_(0, index, drawn)
        return [int(t) for t in tokens.tolist()]

    def _draw(
        self, probs: torch.Tensor, request_ids: list[str], params: list[SamplingParams]
    ) -> torch.Tensor:
        """One multinomial draw per row of probs (num_rows, vocab) -> (num_rows,) int64."""
        out = torch.empty(probs.shape[0], dtype=torch.int64, device=probs.device)
        unseeded = [i for i, p in enumerate(params) if p.seed is None]
        if unseeded:
            index = torch.tensor(unseeded, device=probs.device)
            picks = torch.multinomial(probs.index_select(0, index), 1).view(-1)
            out.index_copy_(0, index, picks)
        for i, p in enumerate(params):
            if p.seed is not None:
                gen = self._generator(request_ids[i], p.seed)
                out[i] = torch.multinomial(probs[i], 1, generator=gen)[0]
        return out

    def _generator(self, request_id: str, seed: int) -> torch.Generator:
        gen = self._generators.get(request_id)
        if gen is None:
            gen = torch.Generator(device=self.device)
            gen.manual_seed(seed)
            self._generators[request_id] = gen
        return gen


def _filtered_probs(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Temperature, then top-k, then top-p, row-wise. (num_rows, vocab) -> probabilities."""
    device, dtype = logits.device, logits.dtype
    temps = torch.tensor([p.temperature for p in params], device=device, dtype=dtype)
    logits = logits / temps[:, None]
    top_ks = [p.top_k for p in params]
    top_ps = [p.top_p for p in params]
    if any(k > 0 for k in top_ks) or any(p < 1.0 for p in top_ps):
        logits = _top_k_top_p(logits, top_ks, top_ps)
    return torch.softmax(logits, dim=-1)


def _top_k_top_p(logits: torch.Tensor, top_ks: list[int], top_ps: list[float]) -> torch.Tensor:
    """Mask to -inf every logit outside the row's top-k and top-p nucleus.

    Ties at the k-th value are all kept. The nucleus is the smallest prefix of the sorted
    distribution whose mass reaches top_p (the most likely token always stays).
    """
    vocab = logits.shape[-1]
    device = logits.device
    sorted_logits, _ = torch.sort(logits, dim=-1, descending=True)  # (num_rows, vocab)
    ks = torch.tensor([k if 0 < k < vocab else vocab for k in top_ks], device=device)
    kth = sorted_logits.gather(1, (ks - 1)[:, None])  # (num_rows, 1)
    sorted_logits = sorted_logits.masked_fill(sorted_logits < kth, float("-inf"))
    ps = torch.tensor(top_ps, device=device, dtype=logits.dtype)
    sorted_probs = torch.softmax(sorted_logits, dim=-1)
    mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
    outside = mass_before >= ps[:, None]
    outside[:, 0] = False
    cutoff = sorted_logits.masked_fill(outside, float("inf")).amin(dim=-1, keepdim=True)
    return logits.masked_fill(logits < torch.maximum(cutoff, kth), float("-inf"))
