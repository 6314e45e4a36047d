import pytest

from usjepa.train.schedules import cosine, warmup_cosine


def test_warmup_then_cosine_hits_start_peak_final():
    kw = dict(total_steps=100, warmup_steps=10, start=5e-6, peak=5e-5, final=5e-7)
    assert warmup_cosine(0, **kw) == pytest.approx(5e-6)
    assert warmup_cosine(5, **kw) == pytest.approx((5e-6 + 5e-5) / 2)
    assert warmup_cosine(10, **kw) == pytest.approx(5e-5)
    assert warmup_cosine(100, **kw) == pytest.approx(5e-7)
    values = [warmup_cosine(s, **kw) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_weight_decay_cosine_rises_from_start_to_end():
    assert cosine(0.0, 0.04, 0.4) == pytest.approx(0.04)
    assert cosine(0.5, 0.04, 0.4) == pytest.approx(0.22)
    assert cosine(1.0, 0.04, 0.4) == pytest.approx(0.4)
    assert cosine(2.0, 0.04, 0.4) == pytest.approx(0.4)
