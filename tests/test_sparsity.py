import math

import pytest

from modules.sparsity import SCHEDULES, SparsitySchedule, plot_schedule


def schedule(kind, initial=0.1, target=0.2, target_at=10, **kw):
    return SparsitySchedule(schedule=kind, initial=initial, target=target, target_at=target_at, **kw)


@pytest.mark.parametrize("kind", ["step", "linear", "exponential", "cosine"])
@pytest.mark.parametrize("initial,target", [(0.1, 0.2), (0.0, 0.5), (0.3, 0.0), (0.0, 1.0)])
def test_endpoints_exact_monotone_and_held(kind, initial, target):
    s = schedule(kind, initial, target, target_at=10, step_size=3)
    values = [s(t) for t in range(20)]
    assert values[0] == initial  # exactly, no 1e-10 substitutes for 0
    assert all(v == target for v in values[10:])  # reaches the target exactly and holds it
    steps = [b - a for a, b in zip(values, values[1:])]
    sign = 1 if target >= initial else -1
    assert all(sign * d >= -1e-12 for d in steps)  # monotone between the endpoints
    lo, hi = min(initial, target), max(initial, target)
    assert all(lo <= v <= hi for v in values)


def test_linear_values():
    s = schedule("linear", 0.1, 0.2, target_at=4)
    assert [s(t) for t in range(6)] == pytest.approx([0.1, 0.125, 0.15, 0.175, 0.2, 0.2])


def test_cosine_values():
    s = schedule("cosine", 0.0, 1.0, target_at=4)
    assert s(2) == pytest.approx(0.5)
    assert s(1) == pytest.approx(0.5 * (1 - math.cos(math.pi / 4)))


def test_exponential_allows_zero_and_is_convex():
    s = schedule("exponential", 0.0, 0.4, target_at=10, exponential_rate=5.0)
    assert s(0) == 0.0 and s(10) == 0.4
    assert s(5) == pytest.approx(0.4 * math.expm1(2.5) / math.expm1(5.0))
    assert s(5) < 0.2  # slow start, fast end


def test_step_schedule_stairs():
    s = schedule("step", 0.0, 0.3, target_at=9, step_size=3)  # 3 stairs of 0.1
    assert [s(t) for t in range(11)] == pytest.approx([0, 0, 0, 0.1, 0.1, 0.1, 0.2, 0.2, 0.2, 0.3, 0.3])
    uneven = schedule("step", 0.0, 1.0, target_at=10, step_size=4)  # ceil(10/4) = 3 stairs
    assert [uneven(t) for t in (0, 4, 8, 9, 10)] == pytest.approx([0, 1 / 3, 2 / 3, 2 / 3, 1.0])


def test_constant_ignores_target():
    s = schedule("constant", 0.15, 0.9, target_at=5)
    assert {s(t) for t in range(10)} == {0.15}


def test_end_of_training_resolution():
    s = SparsitySchedule(schedule="linear", initial=0.1, target=0.2, target_at=-1)
    with pytest.raises(ValueError, match="resolve"):
        s(0)
    curve = s.curve(500)
    assert len(curve) == 500 and curve[0] == 0.1 and curve[499] == 0.2 and curve[498] < 0.2


@pytest.mark.parametrize("bad", [dict(initial=-0.1), dict(target=1.2), dict(schedule="sigmoid"),
                                 dict(schedule="step", step_size=0)])
def test_invalid_schedules(bad):
    with pytest.raises(ValueError):
        SparsitySchedule(**{**dict(schedule="linear", initial=0.1, target=0.2, target_at=5), **bad})


def test_plot_schedule_draws_every_schedule(tmp_path):
    schedules = {k: schedule(k, 0.0, 0.5, target_at=40, step_size=10) for k in SCHEDULES}
    fig = plot_schedule(schedules, 50)
    ax = fig.axes[0]
    assert len(ax.lines) == len(SCHEDULES)
    ys = dict(zip(SCHEDULES, (line.get_ydata() for line in ax.lines)))
    assert ys["linear"][-1] == 0.5 and ys["constant"][-1] == 0.0
    fig.savefig(tmp_path / "s.png")
    assert (tmp_path / "s.png").stat().st_size > 1000


def test_schedule_cli(tmp_path):
    from modules.sparsity import main

    out = tmp_path / "schedules.png"
    assert main(["--cfg_name", "mcvae_biked", "--compare", "--out", str(out)]) == 0
    assert out.stat().st_size > 5000
