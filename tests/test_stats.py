"""Intervals and paired comparisons: no winner from noise, a clear winner from many rows."""

import pytest

from pipelines.lib import stats


def test_interval_holds_the_mean_and_narrows_with_rows():
    few = stats.interval([1.0, 0.0] * 6)
    many = stats.interval([1.0, 0.0] * 200)
    assert few["rows"] == 12 and few["ci_low"] < 0.5 < few["ci_high"]
    assert many["ci_high"] - many["ci_low"] < (few["ci_high"] - few["ci_low"]) / 3
    assert stats.interval([None, None]) == {
        "mean": None,
        "ci_low": None,
        "ci_high": None,
        "rows": 0,
    }
    assert stats.interval([1.0, None, 0.0])["rows"] == 2  # unscored rows are left out


def test_twelve_rows_cannot_tell_chance_from_a_little_better():
    """The old quick start's report: 0.167 vs 0.25 on 12 rows was called a gain."""
    a = [1.0, 0.0, 0.0, 0.0, 0.0, 0.0] * 2  # 0.167
    b = [1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0]  # 0.25
    result = stats.compare(a, b)
    assert result["verdict"] == "too few rows to tell"
    assert stats.says("LoRA", "int4", result).startswith("too few rows to tell LoRA and int4")


def test_a_real_difference_on_the_same_rows_names_the_winner():
    a = [1.0] * 150 + [0.0] * 150
    b = [1.0] * 240 + [0.0] * 60
    assert stats.compare(a, b)["verdict"] == "better"
    assert stats.compare(b, a)["verdict"] == "worse"
    assert stats.says("A", "B", stats.compare(a, b)).startswith("B is better than A (+0.300")
    same = stats.compare(b, b)
    assert same["verdict"] == "no difference found" and same["kept_pct"] == pytest.approx(100)


def test_pairs_use_only_rows_both_scored():
    result = stats.compare([1.0, None, 0.0], [1.0, 1.0, None])
    assert result["rows"] == 1
    with pytest.raises(ValueError):
        stats.compare([1.0], [1.0, 0.0])
