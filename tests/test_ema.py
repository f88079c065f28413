import pytest
import torch
from torch import nn

from ldm.modules.ema import EMA


def small_model() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))


def parameter_sequence(model: nn.Module, steps: int) -> list[list[torch.Tensor]]:
    """``steps`` random values for every parameter of ``model``, to be written in before each update."""
    generator = torch.Generator().manual_seed(1)
    return [[torch.randn(p.shape, generator=generator) for p in model.parameters()] for _ in range(steps)]


def hand_computed_ema(
    initial: list[torch.Tensor], sequence: list[list[torch.Tensor]], decay: float, warmup: bool
) -> list[torch.Tensor]:
    shadow = [p.double() for p in initial]
    for n, values in enumerate(sequence, start=1):
        d = min(decay, (1 + n) / (10 + n)) if warmup else decay
        shadow = [d * s + (1 - d) * v.double() for s, v in zip(shadow, values)]
    return shadow


def set_parameters(model: nn.Module, values: list[torch.Tensor]) -> None:
    with torch.no_grad():
        for p, v in zip(model.parameters(), values):
            p.copy_(v)


@pytest.mark.parametrize("warmup", [True, False])
def test_shadow_equals_hand_computed_ema(warmup: bool) -> None:
    model = small_model()
    initial = [p.detach().clone() for p in model.parameters()]
    ema = EMA(model, decay=0.9, warmup=warmup)
    sequence = parameter_sequence(model, steps=25)
    for values in sequence:
        set_parameters(model, values)
        ema.update(model)

    expected = hand_computed_ema(initial, sequence, decay=0.9, warmup=warmup)
    for shadow, want in zip(ema.module.parameters(), expected):
        torch.testing.assert_close(shadow.double(), want, rtol=1e-5, atol=1e-6)
    assert int(ema.num_updates) == 25
    last = sequence[-1]
    assert not torch.allclose(next(ema.module.parameters()), last[0])


def test_warmup_decay_schedule_matches_litema() -> None:
    ema = EMA(small_model(), decay=0.999)
    decays = []
    for _ in range(3):
        decays.append(float(ema.current_decay()))
        ema.num_updates += 1
    assert decays == pytest.approx([2 / 11, 3 / 12, 4 / 13])
    ema.num_updates.fill_(100_000)
    assert float(ema.current_decay()) == pytest.approx(0.999)


def test_buffers_are_copied_not_averaged() -> None:
    model = small_model()
    ema = EMA(model, decay=0.99)
    model.train()
    model(torch.randn(16, 3) * 5 + 2)
    ema.update(model)
    bn_model, bn_ema = model[1], ema.module[1]
    assert torch.equal(bn_ema.running_mean, bn_model.running_mean)
    assert torch.equal(bn_ema.num_batches_tracked, bn_model.num_batches_tracked)


def test_average_parameters_swaps_in_and_restores_exactly() -> None:
    model = small_model()
    ema = EMA(model, decay=0.5)
    for values in parameter_sequence(model, steps=5):
        set_parameters(model, values)
        ema.update(model)
    original = {k: v.clone() for k, v in model.state_dict().items()}

    with ema.average_parameters(model) as swapped:
        assert swapped is model
        for p, s in zip(model.parameters(), ema.module.parameters()):
            assert torch.equal(p, s)
        assert not torch.equal(model[0].weight, original["0.weight"])

    for k, v in model.state_dict().items():
        assert torch.equal(v, original[k]), k


def test_swap_restores_after_an_exception() -> None:
    model = small_model()
    ema = EMA(model, decay=0.5)
    set_parameters(model, parameter_sequence(model, steps=1)[0])
    original = [p.clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match="boom"):
        with ema.swap(model):
            raise RuntimeError("boom")
    for p, o in zip(model.parameters(), original):
        assert torch.equal(p, o)


def test_copy_to_overwrites_the_model() -> None:
    model = small_model()
    ema = EMA(model, decay=0.5)
    set_parameters(model, parameter_sequence(model, steps=1)[0])
    ema.update(model)
    ema.copy_to(model)
    for p, s in zip(model.parameters(), ema.module.parameters()):
        assert torch.equal(p, s)


def test_state_dict_round_trip_continues_identically() -> None:
    model = small_model()
    ema = EMA(model, decay=0.9)
    sequence = parameter_sequence(model, steps=8)
    for values in sequence[:5]:
        set_parameters(model, values)
        ema.update(model)
    state = ema.state_dict()
    assert int(state["num_updates"]) == 5

    restored = EMA(small_model(), decay=0.9)
    restored.load_state_dict(state)
    assert int(restored.num_updates) == 5
    for values in sequence[5:]:
        set_parameters(model, values)
        ema.update(model)
        restored.update(model)
    for a, b in zip(ema.state_dict().values(), restored.state_dict().values()):
        assert torch.equal(a, b)


def test_ema_is_frozen_and_stays_in_eval() -> None:
    ema = EMA(small_model())
    ema.train()
    assert not ema.module.training
    assert all(not p.requires_grad for p in ema.parameters())


def test_update_rejects_a_different_model() -> None:
    ema = EMA(small_model())
    with pytest.raises(ValueError, match="do not match"):
        ema.update(nn.Linear(3, 2))


def test_a_moved_model_and_a_second_model_are_still_averaged() -> None:
    """The parameter pairing is kept between updates: it must follow `.to()` (which swaps the tensors'
    storage under the same Parameter objects) and must not be reused for another model object."""
    model = small_model()
    ema = EMA(model, decay=0.5, warmup=False)
    ema.update(model)
    model.to(torch.float64)
    ema.to(torch.float64)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(2.0)
    before = [p.clone() for p in ema.module.parameters()]
    ema.update(model)
    for shadow, old in zip(ema.module.parameters(), before):
        torch.testing.assert_close(shadow, 0.5 * old + 1.0)

    twin = small_model().to(torch.float64)
    with torch.no_grad():
        for p in twin.parameters():
            p.fill_(-4.0)
    before = [p.clone() for p in ema.module.parameters()]
    ema.update(twin)
    for shadow, old in zip(ema.module.parameters(), before):
        torch.testing.assert_close(shadow, 0.5 * old - 2.0)
