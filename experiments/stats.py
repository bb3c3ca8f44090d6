"""The statistics of a study's comparisons: means and sample standard deviations, paired differences
with two-sided 95 % Student-t intervals, their p-values, and Holm's adjustment for several comparisons.

The quantiles and tail probabilities come from scipy.stats; what is written here is only the
arithmetic that names what a table shows.
"""
import math

from scipy import stats as scipy_stats


def mean_std(values):
    """(mean, sample standard deviation; nan for one value)."""
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else float("nan")
    return mean, std


def t_quantile(df, level=0.95):
    """The two-sided Student-t quantile with `df` degrees of freedom (t_{0.975, df} for 95 %)."""
    return float(scipy_stats.t.ppf(0.5 + level / 2, df))


def t_interval(values):
    """(mean, half-width of its two-sided 95 % Student-t interval: t_{0.975, n-1} * sd / sqrt(n);
    nan for one value)."""
    mean, std = mean_std(values)
    n = len(values)
    if n < 2:
        return mean, float("nan")
    return mean, t_quantile(n - 1) * std / math.sqrt(n)


def p_value(differences):
    """Two-sided p-value of the paired t-test that the differences' mean is 0 (nan for fewer than two
    values; 0 or 1 for differences that are all equal, nonzero or zero)."""
    n = len(differences)
    if n < 2:
        return float("nan")
    mean, std = mean_std(differences)
    if std == 0:
        return 1.0 if mean == 0 else 0.0
    return float(2 * scipy_stats.t.sf(abs(mean) / (std / math.sqrt(n)), n - 1))


def holm(p_values):
    """Holm's step-down adjustment (Holm 1979, "A simple sequentially rejective multiple test
    procedure"): the k-th smallest of m p-values becomes max over j <= k of min(1, (m - j + 1) p_(j)),
    which controls the family-wise error rate; nan values stay nan and do not count in m."""
    order = sorted((p, i) for i, p in enumerate(p_values) if not math.isnan(p))
    adjusted, running = [float("nan")] * len(p_values), 0.0
    for rank, (p, i) in enumerate(order):
        running = max(running, min(1.0, (len(order) - rank) * p))
        adjusted[i] = running
    return adjusted
