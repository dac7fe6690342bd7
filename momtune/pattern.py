"""Pattern search: a local search over a template's search space that starts at the default
config (as Helion's autotuner does), for ``momtune search --sampler pattern``.

A kernel's speed is mostly smooth along each parameter (a block size one step up or down, a
warp count doubled): the next configs worth measuring are the moves from the best one so far.
The order of candidates, best first, is recomputed from the study's trials at every ask, so the
search is stateless: it resumes, and several processes or GPUs on one study share it (each
claims the first candidate nobody else claims, :func:`momtune.study.claim_config`). The search
driver asks a few candidates at a time (momtune.search), so each batch follows the results of
the ones before.

0. the default, then the configs known to be good elsewhere (the space's ``[[starts]]``, other
   studies' winners); the template's fallbacks only if the default fails;
1. the default's whole one-parameter neighbourhood (a move the constraints forbid is *repaired* by
   one other parameter moved to its nearest valid choice);
2. the moves of a config that failed for lack of per-block resources (a *wall*, ranked at
   WALL_RANK of its best measured neighbour's time: bridged before the others), and of the best
   measured configs: those within NEAR of the best (at most KMAX) polled together, one parameter at
   a time, the parameters on which the AGREE_M best configs agree first;
3. once none is left (a local optimum), the moves from the next-best measured configs, then two
   parameters moved together from the best;
4. then every other valid config, in a seeded random order (a restart).
"""
from __future__ import annotations

import itertools
import math
import random
from collections.abc import Mapping, Sequence
from typing import Any

from .space import SearchSpace, canonical

NEAR = 0.03  # measured configs within this of the best are polled with it (at most KMAX centres)
KMAX = 3
AGREE_M = 6  # best configs whose agreement orders the parameters: the ones they all share move first
WALL_RANK = 0.5  # a config out of resources ranks as this share of its best measured neighbour's time
BEAM = 4  # best measured configs whose moves are searched before moving two parameters


def _numeric(choices: Sequence[Any]) -> bool:
    return all(isinstance(c, (int, float)) and not isinstance(c, bool) for c in choices)


def _steps(config: Mapping[str, Any], name: str, space: SearchSpace) -> list[Any]:
    """The values one step from ``config[name]``: the adjacent numbers, or every other name."""
    choices = list(space.parameters[name].choices)
    if config[name] not in choices:
        return []
    if not _numeric(choices):
        return [c for c in choices if c != config[name]]
    ranked = sorted(choices)
    pos = ranked.index(config[name])
    return [ranked[j] for j in (pos + 1, pos - 1) if 0 <= j < len(ranked)]


def _nearest(config: Mapping[str, Any], name: str, space: SearchSpace) -> list[Any]:
    """The other values of ``name``, nearest to ``config[name]`` first (named ones in their order)."""
    choices = [c for c in space.parameters[name].choices if c != config[name]]
    if _numeric(choices) and _numeric([config[name]]):
        return sorted(choices, key=lambda c: (abs(c - config[name]), c))
    return choices


def _moves_of(config: Mapping[str, Any], name: str, space: SearchSpace,
              valid: Mapping[str, Mapping[str, Any]]) -> list[tuple[dict[str, Any], bool]]:
    """(target config, valid) per move of ``name``: a numeric parameter to the nearest valid choice
    on each side (the adjacent one, invalid, where none on that side is valid), a named one to each
    other choice."""
    choices = list(space.parameters[name].choices)
    if config[name] not in choices:
        return []
    if not _numeric(choices):
        return [({**config, name: c}, canonical({**config, name: c}) in valid) for c in choices if c != config[name]]
    ranked = sorted(choices)
    pos = ranked.index(config[name])
    out = []
    for step in (1, -1):  # the nearest valid choice on each side (a constraint may skip some)
        j = pos + step
        while 0 <= j < len(ranked) and canonical({**config, name: ranked[j]}) not in valid:
            j += step
        if 0 <= j < len(ranked):
            out.append(({**config, name: ranked[j]}, True))
        elif 0 <= pos + step < len(ranked):
            out.append(({**config, name: ranked[pos + step]}, False))
    return out


def neighbours(config: Mapping[str, Any], space: SearchSpace, valid: Mapping[str, Mapping[str, Any]],
               order: Sequence[str]) -> list[dict[str, Any]]:
    """Valid configs one parameter away from ``config``, parameters in ``order``."""
    return [dict(valid[canonical(c)]) for name in order for c, ok in _moves_of(config, name, space, valid) if ok]


def moves(config: Mapping[str, Any], space: SearchSpace, valid: Mapping[str, Mapping[str, Any]],
          order: Sequence[str]) -> list[dict[str, Any]]:
    """The :func:`neighbours` of ``config`` and, in their place, the repairs of the moves the
    constraints forbid: the move plus one other parameter (each, in ``order``) set to its nearest
    choice that makes the config valid."""
    out: list[dict[str, Any]] = []
    seen = {canonical(config)}
    for name in order:
        for target, ok in _moves_of(config, name, space, valid):
            found = [target] if ok else []
            for other in ([] if ok else order):
                if other != name and target[other] in space.parameters[other].choices:
                    fix = next((c for v in _nearest(target, other, space)
                                if canonical(c := {**target, other: v}) in valid), None)
                    if fix is not None:
                        found.append(fix)
            for c in found:
                key = canonical(c)
                if key not in seen:
                    seen.add(key)
                    out.append(dict(valid[key]))
    return out


class PatternSearch:
    """Pattern search over the valid configs of one study (keys, moves and the restart order
    computed once: an ask costs a few lookups, not a pass over a space of 16k configs)."""

    def __init__(self, space: SearchSpace, valid: Sequence[Mapping[str, Any]], default: Mapping[str, Any],
                 seed: int, starts: Sequence[Mapping[str, Any]] = (),
                 fallbacks: Sequence[Mapping[str, Any]] = ()) -> None:
        self.space = space
        self.by_key = {canonical(c): dict(c) for c in valid}
        self.default = dict(default)
        # measured right after the default (those valid at this shape): the space's [[starts]], the
        # template's fallbacks; the moves from the best of them all come next
        self.starts = [dict(c) for c in starts if canonical(c) in self.by_key]
        self.fallbacks = [dict(c) for c in fallbacks if canonical(c) in self.by_key]
        rng = random.Random(seed)
        self.order = list(space.parameters)
        rng.shuffle(self.order)  # which parameter moves first: seeded, so seeds explore differently
        self.restart = list(self.by_key)
        rng.shuffle(self.restart)
        self._moves: dict[str, list[dict[str, Any]]] = {}

    def moves(self, key: str) -> list[dict[str, Any]]:
        if key not in self._moves:
            self._moves[key] = moves(self.by_key[key], self.space, self.by_key, self.order)
        return self._moves[key]

    def candidates(self, times: Mapping[str, float], done: set[str], limit: int | None = None,
                   walls: set[str] = frozenset()) -> list[dict[str, Any]]:
        """The valid configs not yet measured, in the order pattern search would measure them (at
        most ``limit``). ``times``: canonical config -> its measured time (ok trials); ``done``:
        canonical configs with any result (a config that failed is not tried again); ``walls``:
        those that failed for lack of per-block resources, whose moves are bridged (step 1)."""
        by_key = self.by_key
        ranked = [k for _, k in sorted((t, k) for k, t in times.items() if k in by_key and math.isfinite(t))]
        if not ranked and canonical(self.default) in by_key:
            ranked = [canonical(self.default)]
        out: list[dict[str, Any]] = []
        seen = set(done)
        cap = math.inf if limit is None else limit

        def add(configs: Sequence[Mapping[str, Any]]) -> bool:
            for c in configs:
                key = canonical(c)
                if key not in seen:
                    seen.add(key)
                    out.append(dict(c))
                    if len(out) >= cap:
                        return True
            return False

        default = canonical(self.default)
        if default in by_key and add([self.default]):
            return out
        if add(self.starts):
            return out
        if default in done and default not in times and add(self.fallbacks):  # the default did not run
            return out
        if default in times and add(self.moves(default)):  # the default's whole neighbourhood first
            return out
        # centres: the measured configs by time, and the walls (configs out of resources), each ranked
        # at WALL_RANK of its best measured neighbour's time: bridged before the others' moves
        centres = [(times[k], k) for k in ranked if k in times] or [(0.0, k) for k in ranked[:1]]
        best_t = centres[0][0] if centres else math.inf
        for w in walls:
            near = [times[canonical(m)] for m in self.moves(w) if canonical(m) in times] if w in by_key else []
            if near:
                centres.append((min(near) * WALL_RANK, w))
        centres.sort()
        k_poll = min(KMAX, max(1, sum(t <= best_t * (1 + NEAR) for t, _ in centres)))
        top = [k for _, k in centres[:k_poll]]
        # parameters on which the best configs agree first (the directions not yet explored where the
        # times are good), each one's moves from every polled centre together
        best = [by_key[k] for _, k in centres[:max(k_poll, AGREE_M)]]
        names = sorted(self.order, key=lambda n: (len({repr(c[n]) for c in best}), self.order.index(n)))
        for name in names:
            for key in top:
                if add([m for m in self.moves(key) if m[name] != by_key[key][name]]):
                    return out
        for _, key in centres[k_poll:BEAM]:  # a local optimum: the next-best configs' moves
            if add(self.moves(key)):
                return out
        if ranked:
            center = by_key[ranked[0]]
            for a, b in itertools.combinations(self.order, 2):
                for va, vb in itertools.product(_steps(center, a, self.space), _steps(center, b, self.space)):
                    key = canonical({**center, a: va, b: vb})
                    if key in by_key and add([by_key[key]]):
                        return out
        for key in self.restart:
            if key not in seen and add([by_key[key]]):
                return out
        return out


def candidates(space: SearchSpace, valid: Sequence[Mapping[str, Any]], default: Mapping[str, Any],
               times: Mapping[str, float], done: set[str], seed: int, limit: int | None = None,
               starts: Sequence[Mapping[str, Any]] = (), walls: set[str] = frozenset()) -> list[dict[str, Any]]:
    """:meth:`PatternSearch.candidates` for a one-off call."""
    return PatternSearch(space, valid, default, seed, starts).candidates(times, done, limit, walls)
