"""Split-conformal price ranges on synthetic cases whose truth is known."""

from __future__ import annotations

import json
import math
from statistics import NormalDist

import numpy as np
import pytest

from phivision.answer.calibration import (
    DEFAULT_FLOOR,
    FLOOR_MULTIPLES,
    PriceCalibration,
    calibrate,
    check_level,
    choose_floor,
    conformal_quantile,
    coverage,
    nonconformity,
    read_calibration,
    write_calibration,
)
from phivision.errors import PhivisionError


def lognormal_items(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Answers whose true price is ``price * exp(sigma * z)``, z standard normal, and whose spread is sigma."""
    rng = np.random.default_rng(seed)
    price = rng.uniform(20, 5000, n)
    sigma = rng.uniform(0.02, 0.6, n)  # some answers sure, some not
    true = price * np.exp(sigma * rng.standard_normal(n))
    return true, price, sigma


def test_the_quantile_is_the_normal_one_when_the_spread_is_the_true_scale() -> None:
    true, price, sigma = lognormal_items(20_000, seed=0)
    calibration = calibrate(true, price, sigma, floor=1e-9)
    for level in (0.5, 0.8, 0.95):
        expected = NormalDist().inv_cdf((1 + level) / 2)  # |z| <= q with probability level
        assert calibration.quantile(level) == pytest.approx(expected, rel=0.03)


@pytest.mark.parametrize("level", [0.5, 0.8, 0.95])
def test_coverage_on_new_items_is_the_nominal_level(level: float) -> None:
    calibration = calibrate(*lognormal_items(4000, seed=1))
    true, price, sigma = lognormal_items(20_000, seed=2)
    low, high = calibration.intervals(price, sigma, level)
    covered, width = coverage(true, low, high)
    assert covered.mean() == pytest.approx(level, abs=0.015)
    # an answer the model is surer of gets a narrower range
    sure, unsure = sigma < 0.1, sigma > 0.5
    assert np.nanmean(width[sure]) < np.nanmean(width[unsure]) / 3


def test_a_spread_that_ignores_the_model_still_covers_but_wider() -> None:
    """Conformal coverage holds whatever the spread; an uninformative one costs width, not coverage."""
    cal_true, cal_price, cal_sigma = lognormal_items(4000, seed=3)
    true, price, sigma = lognormal_items(20_000, seed=4)
    informed = calibrate(cal_true, cal_price, cal_sigma).intervals(price, sigma, 0.8)
    blind = calibrate(cal_true, cal_price, np.zeros(4000)).intervals(price, np.zeros(20_000), 0.8)
    (c1, w1), (c2, w2) = coverage(true, *informed), coverage(true, *blind)
    assert c1.mean() == pytest.approx(0.8, abs=0.015) and c2.mean() == pytest.approx(0.8, abs=0.015)
    assert np.nanmean(w1) < np.nanmean(w2)


def test_conformal_quantile_ranks_and_small_sets() -> None:
    scores = [0.4, 0.1, 0.3, 0.2]
    assert conformal_quantile(scores, 0.5) == 0.3  # ceil(5 * 0.5) = 3rd smallest
    assert conformal_quantile(scores, 0.8) == 0.4  # ceil(5 * 0.8) = 4th
    assert conformal_quantile(scores, 0.81) == math.inf  # needs a 5th: no finite range
    calibration = PriceCalibration(tuple(scores))
    assert calibration.interval(100.0, 0.1, 0.9) == (None, None)
    low, high = calibration.interval(100.0, 0.1, 0.5)
    half = 0.3 * (0.1 + calibration.floor)
    assert low == pytest.approx(math.floor(100 * math.exp(-half) * 100) / 100)
    assert high == pytest.approx(math.ceil(100 * math.exp(half) * 100) / 100)
    assert low <= 100.0 * math.exp(-half) and high >= 100.0 * math.exp(half)  # rounded outwards


def test_a_missing_price_is_never_covered_and_widens_every_range() -> None:
    scores = nonconformity([100.0, 100.0, 100.0], [100.0, None, 110.0], [0.1, 0.1, None])
    assert scores[0] == 0 and math.isinf(scores[1]) and math.isinf(scores[2])
    assert PriceCalibration((0.5,)).interval(None, 0.1) == (None, None)
    covered, width = coverage(
        [10.0, 10.0, 10.0], np.array([9.0, np.nan, 10.0]), np.array([11.0, np.nan, 12.0])
    )
    assert covered.tolist() == [True, False, True]  # bounds are inclusive
    assert width[0] == pytest.approx(0.2) and math.isnan(width[1]) and width[2] == pytest.approx(0.2)


def test_levels_are_checked() -> None:
    for bad in (0, 1, 1.5, -0.2, "0.8", True, float("nan")):
        with pytest.raises(ValueError, match="strictly between 0 and 1"):
            check_level(bad)
    assert check_level(0.8) == 0.8


def test_the_calibration_file_round_trips_and_a_broken_one_names_itself(tmp_path) -> None:
    calibration = calibrate([100.0, 200.0, 300.0], [100.0, None, 330.0], [0.1, 0.2, 0.3], source="val (3)")
    path = write_calibration(tmp_path, calibration)
    saved = json.loads(path.read_text())
    assert saved["scores"][-1] is None and saved["n"] == 3  # infinity written as null
    assert read_calibration(tmp_path) == calibration
    assert read_calibration(tmp_path / "nowhere") is None
    path.write_text(json.dumps({**saved, "scores": ["x"]}))
    with pytest.raises(PhivisionError, match=r"calibration\.json: 'scores' must be a list of numbers"):
        read_calibration(tmp_path)
    path.write_text("{not json")
    with pytest.raises(PhivisionError, match=r"calibration\.json"):
        read_calibration(tmp_path)


def test_the_floor_follows_the_spread_where_it_tracks_the_errors() -> None:
    """Where the spread is the error's true scale, a smaller floor (widths that follow the model) is narrowest;
    where the spread is noise, the largest floor (nearly one relative width for all) is; coverage holds either
    way."""
    true, price, sigma = lognormal_items(4000, seed=5)
    informative = calibrate(true, price, sigma)
    noise = np.random.default_rng(6).permutation(sigma)  # the same spreads, unrelated to the errors
    blind = calibrate(true, price, noise)
    assert blind.floor == pytest.approx(FLOOR_MULTIPLES[-1] * np.median(noise))  # the largest
    assert informative.floor <= blind.floor / 4
    new_true, new_price, new_sigma = lognormal_items(20_000, seed=7)
    new_noise = np.random.default_rng(8).permutation(new_sigma)
    for calibration, spread in ((informative, new_sigma), (blind, new_noise)):
        covered, _ = coverage(new_true, *calibration.intervals(new_price, spread, 0.8))
        assert covered.mean() == pytest.approx(0.8, abs=0.015)
    _, narrow = coverage(new_true, *informative.intervals(new_price, new_sigma, 0.8))
    _, fixed_floor = coverage(
        new_true, *calibrate(true, price, sigma, floor=1.0).intervals(new_price, new_sigma, 0.8)
    )
    assert np.nanmean(narrow) < np.nanmean(fixed_floor)


def test_the_floor_of_tiny_or_priceless_calibration_sets() -> None:
    assert choose_floor([100.0], [110.0], [0.2]) == DEFAULT_FLOOR  # one item: nothing to compare
    assert choose_floor([100.0, 200.0, 300.0], [None, None, None], [None, None, None]) == DEFAULT_FLOOR
    mixed = choose_floor([100.0] * 40, [105.0] * 20 + [None] * 20, [0.1] * 20 + [None] * 20)
    assert mixed in (
        DEFAULT_FLOOR,
        *(m * 0.1 for m in FLOOR_MULTIPLES),
    )  # answers without a price are left out
