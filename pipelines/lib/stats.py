"""Quality figures a careful engineer would sign: a score's 95% interval (bootstrap over rows), and
a paired comparison of two models on the same rows that names a winner only when the interval of
the difference excludes zero, and says "too few rows to tell" when that interval is too wide."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

RESAMPLES = 2000
LEVEL = 0.95
TOO_WIDE = 0.20  # an interval wider than 20 points cannot tell models apart
SEED = 0  # the same rows give the same interval, run after run


def interval(scores: Sequence[float | None]) -> dict[str, Any]:
    """Mean of the scored rows (None = not scored) with its 95% percentile-bootstrap interval."""
    import numpy as np

    values = np.array([s for s in scores if s is not None], dtype=float)
    if not len(values):
        return {"mean": None, "ci_low": None, "ci_high": None, "rows": 0}
    means = _resample(values[None, :], len(values)).mean(axis=-1)[0]
    low, high = _bounds(means)
    return {"mean": float(values.mean()), "ci_low": low, "ci_high": high, "rows": len(values)}


def compare(a: Sequence[float | None], b: Sequence[float | None]) -> dict[str, Any]:
    """B against A on the rows both scored: the mean difference (B - A) with its paired-bootstrap
    interval, B's share of A's score (%) with its interval, and a verdict: 'better', 'worse',
    'no difference found', or 'too few rows to tell'."""
    import numpy as np

    pairs = [(x, y) for x, y in zip(a, b, strict=True) if x is not None and y is not None]
    if not pairs:
        return {"rows": 0, "diff": None, "ci_low": None, "ci_high": None, "verdict": "no rows"}
    values = np.array(pairs, dtype=float).T  # [2, rows]
    resampled = _resample(values, values.shape[1])  # [2, resamples, rows]
    means = resampled.mean(axis=-1)
    diffs = means[1] - means[0]
    low, high = _bounds(diffs)
    diff = float(values[1].mean() - values[0].mean())
    with np.errstate(divide="ignore", invalid="ignore"):
        kept = 100 * means[1] / means[0]
    kept = kept[np.isfinite(kept)]
    base = float(values[0].mean())
    result = {
        "rows": values.shape[1],
        "diff": diff,
        "ci_low": low,
        "ci_high": high,
        "kept_pct": 100 * float(values[1].mean()) / base if base else None,
        "kept_ci_low": _bounds(kept)[0] if len(kept) else None,
        "kept_ci_high": _bounds(kept)[1] if len(kept) else None,
    }
    if high - low > TOO_WIDE:
        result["verdict"] = "too few rows to tell"
    elif low > 0:
        result["verdict"] = "better"
    elif high < 0:
        result["verdict"] = "worse"
    else:
        result["verdict"] = "no difference found"
    return result


def says(name_a: str, name_b: str, comparison: dict[str, Any]) -> str:
    """The comparison in words, claiming a winner only when the paired test supports it."""
    verdict, rows = comparison["verdict"], comparison["rows"]
    if verdict == "no rows":
        return f"{name_a} and {name_b} share no scored rows"
    span = (
        f"{comparison['diff']:+.3f}, 95% CI [{comparison['ci_low']:+.3f}, "
        f"{comparison['ci_high']:+.3f}] on {rows} rows"
    )
    if verdict == "better":
        return f"{name_b} is better than {name_a} ({span})"
    if verdict == "worse":
        return f"{name_a} is better than {name_b} ({span})"
    if verdict == "too few rows to tell":
        return f"too few rows to tell {name_a} and {name_b} apart ({span})"
    return f"no difference found between {name_a} and {name_b} ({span})"


def with_interval(value: float | None, low: float | None, high: float | None, rows: int) -> str:
    """'0.83 [0.74, 0.91] on 36 rows' (or n/a)."""
    if value is None:
        return "n/a"
    if low is None:
        return f"{value:.3g} on {rows} rows"
    return f"{value:.3g} [{low:.3g}, {high:.3g}] on {rows} rows"


def _resample(values: Any, rows: int) -> Any:
    """RESAMPLES bootstrap samples of the columns (rows), the same picks for every series."""
    import numpy as np

    picks = np.random.default_rng(SEED).integers(0, rows, size=(RESAMPLES, rows))
    return values[:, picks]


def _bounds(samples: Any) -> tuple[float, float]:
    import numpy as np

    tail = 100 * (1 - LEVEL) / 2
    low, high = np.percentile(samples, [tail, 100 - tail])
    return float(low), float(high)
