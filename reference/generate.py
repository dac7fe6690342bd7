"""``generate`` of the MoM causal LMs with Hugging Face's keyword arguments (reference and fast share it).

    out = model.generate(ids, max_new_tokens=20)                        # greedy, [B, T + 20]
    out = model.generate(ids, max_length=64, do_sample=True, top_p=0.9, eos_token_id=2,
                         attention_mask=mask, return_dict_in_generate=True, output_scores=True)
    out.sequences, out.scores, out["sequences"], out[0]

Per step, as transformers' ``GenerationMixin`` (greedy search and multinomial sampling): the last
logits in fp32 (fp64 for a fp64 model) -> temperature -> top-k -> top-p (the processed scores are
``scores``) -> argmax, or a draw from their softmax with ``generator``. A row that has emitted an
EOS id is finished: its later tokens are ``pad_token_id`` (default: the first EOS id, as HF). The
output ends at the step where every row has finished (as HF), else after ``max_new_tokens``.

The loop decides "every row finished" on the device; the host reads that flag only every
``sync_every`` steps (the fast LM's CUDA-graph loop: 16) to stop early, and once at the end to cut
the output at the step where the last row finished, so every path returns the same tokens.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch

from momtune.checks import check_int, check_tensor
from momtune.errors import InputError

#: Keywords ``generate`` accepts (besides ``input_ids`` / ``inputs`` and class extras such as ``cuda_graph``).
ACCEPTED = ("max_new_tokens", "max_length", "do_sample", "temperature", "top_k", "top_p", "eos_token_id",
            "pad_token_id", "attention_mask", "return_dict_in_generate", "output_scores", "output_logits",
            "generator", "use_cache", "num_beams", "num_return_sequences", "output_attentions",
            "output_hidden_states")
#: Hugging Face keywords accepted only at the value that changes nothing (greedy / sampling, one sequence).
NO_OP_ONLY = {"num_beams": 1, "num_return_sequences": 1, "output_attentions": False, "output_hidden_states": False}


@dataclass
class GenerateOutput:
    """Like transformers' ``GenerateDecoderOnlyOutput``: attributes, ``out["sequences"]`` and ``out[0]``.

    sequences [B, T + n]; scores / logits: n tensors [B, vocab] (the processed scores, the raw
    logits; fp32, or fp64 for a fp64 model), None unless ``output_scores`` / ``output_logits``.
    As HF's ``ModelOutput``, fields that are None are left out of keys(), iteration and indexing.
    """

    sequences: torch.Tensor
    scores: tuple[torch.Tensor, ...] | None = None
    logits: tuple[torch.Tensor, ...] | None = None

    def keys(self) -> list[str]:
        return [f.name for f in dataclasses.fields(self) if getattr(self, f.name) is not None]

    def values(self) -> list[Any]:
        return [getattr(self, k) for k in self.keys()]

    def items(self) -> list[tuple[str, Any]]:
        return [(k, getattr(self, k)) for k in self.keys()]

    def to_tuple(self) -> tuple[Any, ...]:
        return tuple(self.values())

    def __getitem__(self, key: str | int | slice) -> Any:
        if isinstance(key, str):
            if key not in self.keys():
                raise KeyError(f"{key!r}: this output holds {self.keys()}")
            return getattr(self, key)
        return self.to_tuple()[key]

    def __contains__(self, key: object) -> bool:
        return key in self.keys()

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self.keys())


@dataclass
class GenerateArgs:
    """``generate``'s arguments after checks and defaults (eos: token ids, or None for no EOS)."""

    max_new_tokens: int
    do_sample: bool
    temperature: float
    top_k: int | None
    top_p: float
    eos_token_id: list[int] | None
    pad_token_id: int | None
    attention_mask: torch.Tensor | None
    return_dict: bool
    output_scores: bool
    output_logits: bool
    generator: torch.Generator | None
    extras: dict[str, Any]


def parse(model: Any, input_ids: object, max_new_tokens: object, kwargs: dict[str, Any],
          extras: dict[str, Any] | None = None) -> tuple[torch.Tensor, GenerateArgs]:
    """Check ``generate``'s arguments (InputError naming the argument) and fill in the defaults.

    ``model``: the LM (``config`` and ``_check_ids``); ``extras``: keywords of this class and their
    defaults (e.g. ``cuda_graph``), returned in ``args.extras``."""
    kwargs, extras = dict(kwargs), dict(extras or {})
    if "inputs" in kwargs:  # transformers' name of the first argument
        if input_ids is not None:
            raise InputError("generate: give input_ids or inputs (the same argument), not both")
        input_ids = kwargs.pop("inputs")
    unknown = sorted(k for k in kwargs if k not in ACCEPTED and k not in extras)
    if unknown:
        accepted = ", ".join(("input_ids",) + ACCEPTED + tuple(extras))
        raise InputError(f"generate: unknown keyword argument{'s' if len(unknown) > 1 else ''} "
                         f"{', '.join(unknown)}; accepted: {accepted}")
    if input_ids is None:
        raise InputError("input_ids: generate needs the prompt, input_ids [B, T] (token ids)")
    model._check_ids("input_ids", input_ids)
    assert isinstance(input_ids, torch.Tensor)
    B, T = input_ids.shape
    vocab = model.config.vocab_size
    for name, value in NO_OP_ONLY.items():
        if name in kwargs and kwargs[name] is not None and kwargs[name] != value:
            raise InputError(f"{name}: {kwargs[name]!r} is not supported; momtune's generate does greedy "
                             f"decoding or sampling of one sequence per prompt ({name}={value!r})")
    _flag("use_cache", kwargs.get("use_cache", True))  # the cache is always used (same tokens)

    max_length = kwargs.get("max_length")
    if max_new_tokens is None:
        max_new_tokens = kwargs.get("max_new_tokens")
    if max_new_tokens is not None:  # wins over max_length, as in transformers
        check_int("max_new_tokens", max_new_tokens, lo=0)
    elif max_length is not None:
        check_int("max_length", max_length, lo=1)
        if max_length < T:
            raise InputError(f"max_length: {max_length} is shorter than the prompt ({T} tokens); max_length "
                             f"counts the prompt too (use max_new_tokens for tokens to add)")
        max_new_tokens = max_length - T
    else:
        raise InputError(f"generate: give max_new_tokens (tokens to add) or max_length (total length, "
                         f"prompt of {T} tokens included)")
    assert isinstance(max_new_tokens, int)

    do_sample = _flag("do_sample", kwargs.get("do_sample", False))
    temperature = kwargs.get("temperature")
    temperature = 1.0 if temperature is None else temperature
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or math.isnan(temperature):
        raise InputError(f"temperature: expected a number, got {temperature!r}")
    if do_sample and not (temperature > 0 and math.isfinite(temperature)):
        raise InputError(f"temperature: expected a finite number > 0 when sampling, got {temperature!r}")
    top_k = kwargs.get("top_k")
    if top_k is not None:
        if top_k == 0 and not isinstance(top_k, bool):
            raise InputError(f"top_k: 0 is not accepted; give None for no top-k limit (transformers' top_k=0) "
                             f"or an int in 1..{vocab}")
        check_int("top_k", top_k, lo=1, hi=vocab)
    top_p = kwargs.get("top_p")
    top_p = 1.0 if top_p is None else top_p
    if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        raise InputError(f"top_p: expected a number in (0, 1] (1 = no nucleus filter), got {top_p!r}")

    eos, pad = (_token_ids(name, kwargs[name] if kwargs.get(name) is not None else getattr(model.config, name),
                           vocab, single=name == "pad_token_id", default=kwargs.get(name) is None)
                for name in ("eos_token_id", "pad_token_id"))
    if pad is None and eos is not None:
        pad = eos  # transformers' default: the first EOS id
    pad = None if pad is None else pad[0]

    mask = kwargs.get("attention_mask")
    if mask is not None:
        check_tensor("attention_mask", mask, shape=(B, T))
    generator = kwargs.get("generator")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise InputError(f"generator: expected a torch.Generator or None, got {type(generator).__name__}")
    for name, default in extras.items():
        extras[name] = kwargs.get(name, default)
    args = GenerateArgs(
        max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=float(temperature), top_k=top_k,
        top_p=float(top_p), eos_token_id=eos, pad_token_id=pad, attention_mask=mask,
        return_dict=_flag("return_dict_in_generate", kwargs.get("return_dict_in_generate", False)),
        output_scores=_flag("output_scores", kwargs.get("output_scores", False)),
        output_logits=_flag("output_logits", kwargs.get("output_logits", False)),
        generator=generator, extras=extras)
    return input_ids, args


def _flag(name: str, value: object) -> bool:
    if value is None:
        return False
    if not isinstance(value, bool):
        raise InputError(f"{name}: expected True or False, got {value!r}")
    return value


def _token_ids(name: str, value: object, vocab: int, single: bool = False, default: bool = False) -> list[int] | None:
    """An id or (unless ``single``) a list / 1-D tensor of ids, each in 0..vocab-1 (``default``: the
    value is the config's, named so in errors)."""
    if value is None:
        return None
    name = f"{name} (the config's default)" if default else name
    if isinstance(value, torch.Tensor) and value.dim() <= (0 if single else 1) \
            and not value.is_floating_point() and value.dtype != torch.bool:
        value = value.tolist()
    ids = value if isinstance(value, (list, tuple)) and not single else [value]
    if not ids or any(isinstance(i, bool) or not isinstance(i, int) for i in ids):
        what = "an int" if single else "an int or a non-empty list of ints"
        raise InputError(f"{name}: expected {what}, got {value!r}")
    for i in ids:
        if not 0 <= i < vocab:
            raise InputError(f"{name}: {i} is outside the vocabulary 0..{vocab - 1} (vocab_size {vocab})")
    return list(ids)


def process(logits: torch.Tensor, args: GenerateArgs, copy: bool = False) -> torch.Tensor:
    """Last-position logits [B, vocab] -> scores (fp32 or fp64): as transformers' temperature,
    top-k and top-p warpers when sampling (filtered entries -inf), the logits unchanged when greedy
    (``copy``: a new tensor even then, for scores kept past the step)."""
    scores = logits.to(torch.promote_types(logits.dtype, torch.float32), copy=copy)
    if not args.do_sample:
        return scores
    if args.temperature != 1.0:
        scores = scores / args.temperature
    if args.top_k is not None:
        kth = torch.topk(scores, args.top_k, dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if args.top_p < 1.0:  # nucleus: drop the least likely tokens whose total probability is <= 1 - top_p
        ordered, order = torch.sort(scores, descending=False)
        drop = ordered.softmax(dim=-1).cumsum(dim=-1) <= 1 - args.top_p
        drop[:, -1:] = False  # keep the most likely token
        scores = scores.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    return scores


def pick(scores: torch.Tensor, args: GenerateArgs) -> torch.Tensor:
    """scores [B, vocab] -> next token ids [B]: argmax, or a draw from softmax(scores).

    The draw is torch.multinomial(probs, 1)'s own algorithm (argmax of probs / q, q ~ Exp(1): the
    same tokens from the same generator state) without its host-side check of the probabilities,
    a sync per step on CUDA."""
    if not args.do_sample:
        return scores.argmax(-1)
    probs = torch.softmax(scores, dim=-1)
    q = torch.empty_like(probs).exponential_(1, generator=args.generator)
    return (probs / q).argmax(-1)


def all_finished(flag: torch.Tensor) -> bool:
    """The host reads the device's 'every row finished' flag (the loop's only sync; tests count them)."""
    return bool(flag)


def run(input_ids: torch.Tensor, args: GenerateArgs, start: Callable[[], torch.Tensor],
        step: Callable[[torch.Tensor], torch.Tensor], sync_every: int = 1) -> torch.Tensor | GenerateOutput:
    """The decode loop. ``start()`` prefills the prompt and returns the last logits [B, vocab];
    ``step(ids [B, 1])`` feeds one token per row and returns the next logits (may be a static buffer).
    The host checks for "every row finished" every ``sync_every`` steps."""
    B, n = input_ids.shape[0], args.max_new_tokens
    steps, scores, raw = n, [], []
    tokens = input_ids.new_empty(B, n)
    if n:
        logits = start()
        device = logits.device
        eos = None if args.eos_token_id is None else torch.tensor(args.eos_token_id, device=device)
        finished = torch.zeros(B, dtype=torch.bool, device=device)
        done = torch.zeros(n, dtype=torch.bool, device=device)  # done[i]: every row finished after step i
        for i in range(n):
            if args.output_logits:
                raw.append(logits.to(torch.promote_types(logits.dtype, torch.float32), copy=True))
            s = process(logits, args, copy=args.output_scores)
            if args.output_scores:
                scores.append(s)
            nxt = pick(s, args)
            if eos is not None:
                nxt = torch.where(finished, args.pad_token_id, nxt)
                finished = finished | torch.isin(nxt, eos)
                done[i] = finished.all()
            tokens[:, i] = nxt
            if i + 1 == n:
                break
            if eos is not None and (i + 1) % sync_every == 0 and all_finished(done[i]):
                steps = i + 1
                break
            logits = step(tokens[:, i:i + 1])
        if eos is not None:  # cut where the last row finished (one read at the end)
            first = done[:steps].nonzero()
            steps = int(first[0, 0]) + 1 if first.numel() else steps
    sequences = torch.cat([input_ids, tokens[:, :steps]], dim=1)
    if not args.return_dict:
        return sequences
    return GenerateOutput(sequences, tuple(scores[:steps]) if args.output_scores else None,
                          tuple(raw[:steps]) if args.output_logits else None)
