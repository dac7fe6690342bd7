"""momtune.synthetic: the Markov language follows its successor map, and a short training run
gives the reference LM a peaked next-token distribution (the premise of the GPU smoke's argmax checks)."""
from __future__ import annotations

import pytest
import torch

import momtune
from momtune.errors import InputError
from momtune.synthetic import MarkovLanguage, train_on


def test_samples_stay_in_the_used_ids_and_follow_the_successor_at_rate_p():
    lang = MarkovLanguage(vocab_size=1000, used=50, p=0.8, seed=3)
    ids = lang.sample(64, 200, generator=torch.Generator().manual_seed(0))
    assert ids.shape == (64, 200) and ids.dtype == torch.long
    assert torch.isin(ids, lang.ids).all()
    follows = (lang.succ[ids[:, :-1]] == ids[:, 1:]).double().mean().item()
    # a jump lands on the successor with chance 1/used too: expected p + (1 - p) / used = 0.804
    assert abs(follows - 0.804) < 0.01
    assert (lang.succ[lang.ids] != lang.ids).all()  # no token is its own successor
    assert lang.margin == pytest.approx(torch.log(torch.tensor(0.8 / (0.2 / 50))).item())


def test_same_seed_same_language_other_seed_another():
    a, b, c = (MarkovLanguage(500, seed=s) for s in (1, 1, 2))
    assert torch.equal(a.succ, b.succ) and not torch.equal(a.succ, c.succ)


@pytest.mark.parametrize("kwargs, says", [
    (dict(vocab_size=1), "vocab_size"), (dict(vocab_size=10, used=1), "used"),
    (dict(vocab_size=10, p=1.0), "p: expected a float in (0, 1)"),
])
def test_bad_arguments_name_themselves(kwargs, says):
    with pytest.raises(InputError, match=says.replace("(", r"\(").replace(")", r"\)")):
        MarkovLanguage(**kwargs)


def test_sample_and_train_reject_bad_sizes():
    lang = MarkovLanguage(10)
    with pytest.raises(InputError, match="length"):
        lang.sample(2, 0)
    with pytest.raises(InputError, match="steps"):
        train_on(torch.nn.Linear(2, 2), lang, steps=0)


def test_training_makes_the_successor_the_confident_top_1():
    cfg = momtune.MoMConfig.from_preset("tiny")
    torch.manual_seed(0)
    model = momtune.reference.MoMForCausalLM(cfg)
    lang = MarkovLanguage(cfg.vocab_size, seed=0)
    ids = lang.sample(4, 32, generator=torch.Generator().manual_seed(9))

    def hit_and_margin():
        with torch.no_grad():
            logits = model(ids).logits
        top = logits.topk(2, -1).values
        return lang.successor_hit_rate(ids, logits), (top[..., 0] - top[..., 1]).median().item()

    hit0, margin0 = hit_and_margin()
    losses = train_on(model, lang, steps=40, batch=8, length=32)
    hit1, margin1 = hit_and_margin()
    assert len(losses) == 40 and losses[-1] < 0.6 * losses[0]
    assert hit0 < 0.2 and hit1 > 0.9
    assert margin1 > 10 * margin0 and margin1 > 1.0
    assert model.training  # left as it was
