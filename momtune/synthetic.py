"""A synthetic language with a known next token, and a short trainer on it: LM weights whose
logits have the top-1 margins of a trained model, for checks that compare argmax.

Randomly initialised LM weights give near-tied logits: over a 32000-token vocabulary the gap
between the two largest logits is often below bf16 rounding, so two correct bf16
implementations pick different tokens at a few percent of positions (momtune and fla 0.6.0
each agree with the float64 reference on 94-96% of positions of a random-init mom-340m). An
argmax comparison on such weights measures rounding, not correctness. A few hundred optimiser
steps on :class:`MarkovLanguage` text give the LM a peaked next-token distribution (it learns
the successor map), and prompts drawn from the same language exercise it where it is confident.

    lang = MarkovLanguage(vocab_size=cfg.vocab_size, seed=0)
    losses = train_on(model, lang, steps=200)          # any LM whose forward takes labels=
    ids = lang.sample(8, 64, generator=torch.Generator().manual_seed(1))
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch

from .errors import InputError


class MarkovLanguage:
    """Token streams over ``used`` of the vocabulary's ids: after token ``t`` comes its fixed
    successor ``succ[t]`` with probability ``p``, else a token drawn uniformly from the used ids.
    The best next-token guess is ``succ[t]``, with a log-odds margin of
    ``log(p / ((1 - p) / used))`` over any other token."""

    def __init__(self, vocab_size: int, used: int = 512, p: float = 0.8, seed: int = 0) -> None:
        if not isinstance(vocab_size, int) or vocab_size < 2:
            raise InputError(f"vocab_size: expected an int >= 2, got {vocab_size!r}")
        if not isinstance(used, int) or used < 2:
            raise InputError(f"used: expected an int >= 2, got {used!r}")
        if not (isinstance(p, float) and 0.0 < p < 1.0):
            raise InputError(f"p: expected a float in (0, 1), got {p!r}")
        gen = torch.Generator().manual_seed(seed)
        self.vocab_size, self.p = vocab_size, p
        self.ids = torch.randperm(vocab_size, generator=gen)[:min(used, vocab_size)]
        # successor of the i-th used id: another used id (a random cycle-free-of-fixed-points map)
        n = self.ids.numel()
        shift = torch.randint(1, n, (n,), generator=gen)
        self.succ_index = (torch.arange(n) + shift) % n
        self.succ = torch.full((vocab_size,), -1, dtype=torch.long)
        self.succ[self.ids] = self.ids[self.succ_index]

    @property
    def margin(self) -> float:
        """Log-odds of the successor over any one other token, at convergence."""
        n = self.ids.numel()
        return math.log(self.p / ((1 - self.p) / n))

    def sample(self, batch: int, length: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """[batch, length] int64 token ids (CPU)."""
        for name, v in (("batch", batch), ("length", length)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise InputError(f"{name}: expected an int >= 1, got {v!r}")
        n = self.ids.numel()
        idx = torch.empty(batch, length, dtype=torch.long)
        idx[:, 0] = torch.randint(0, n, (batch,), generator=generator)
        follow = torch.rand(batch, length, generator=generator) < self.p
        jump = torch.randint(0, n, (batch, length), generator=generator)
        for t in range(1, length):
            idx[:, t] = torch.where(follow[:, t], self.succ_index[idx[:, t - 1]], jump[:, t])
        return self.ids[idx]

    def successor_hit_rate(self, ids: torch.Tensor, logits: torch.Tensor) -> float:
        """Share of positions whose argmax is the language's successor of the input token."""
        want = self.succ.to(ids.device)[ids]
        return float((logits.argmax(-1) == want).double().mean())


def train_on(model: torch.nn.Module, lang: MarkovLanguage, steps: int = 200, batch: int = 16, length: int = 64,
             lr: float = 3e-3, seed: int = 0, log: Callable[[str], None] | None = None) -> list[float]:
    """Adam on the LM's next-token loss over ``lang`` text, in place, on the model's device and
    dtype; returns the loss of every step. ``model(input_ids, labels=...)`` must return an
    object with ``.loss`` (momtune's and the reference's LMs do)."""
    if not isinstance(steps, int) or steps < 1:
        raise InputError(f"steps: expected an int >= 1, got {steps!r}")
    param = next(model.parameters())
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    losses: list[float] = []
    was_training = model.training
    model.train()
    try:
        for step in range(steps):
            ids = lang.sample(batch, length, generator=gen).to(param.device)
            loss = model(ids, labels=ids).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            if log is not None and (step + 1) % max(1, steps // 4) == 0:
                log(f"train step {step + 1}/{steps}: loss {losses[-1]:.3f}")
    finally:
        model.train(was_training)
    return losses
