"""The metrics' parts that need no server: the metrics_listen setting and the fixed-bucket histogram.

    load_settings(environ={"EDGECOW_METRICS_LISTEN": "none"}).metrics_listen == "none"
"""

from __future__ import annotations

import pytest

from edge_server.config import ConfigError, load_settings
from edge_server.metrics import metrics_wanted
from edge_server.statistics import HISTOGRAM_BOUNDS, Histogram


@pytest.mark.parametrize("value", ["bogus", "127.0.0.1:", ":8002", "127.0.0.1:99999"])
def test_a_bad_metrics_address_names_where_it_was_set(value: str) -> None:
    with pytest.raises(ConfigError, match="EDGECOW_METRICS_LISTEN"):
        load_settings(environ={"EDGECOW_METRICS_LISTEN": value})


@pytest.mark.parametrize("value", ["none", "off", "", "NONE"])
def test_metrics_can_be_turned_off(value: str) -> None:
    assert not metrics_wanted(load_settings(environ={"EDGECOW_METRICS_LISTEN": value}).metrics_listen)


def test_metrics_are_on_loopback_by_default() -> None:
    settings = load_settings(environ={})
    assert settings.metrics_listen == "127.0.0.1:8002" and metrics_wanted(settings.metrics_listen)
    assert load_settings(overrides={"metrics_listen": "[::1]:0"}, environ={}).metrics_listen == "[::1]:0"


def test_a_histogram_counts_each_observation_in_the_first_bucket_that_holds_it() -> None:
    histogram = Histogram()
    first, second = (int(bound * 1e9) for bound in HISTOGRAM_BOUNDS[:2])
    histogram.observe(0)
    histogram.observe(first)  # a bucket's bound is inclusive, as Prometheus's `le`
    histogram.observe(first + 1)
    histogram.observe(second)
    histogram.observe(int(HISTOGRAM_BOUNDS[-1] * 1e9) + 1)
    assert histogram.buckets[:2] == [2, 2]
    assert histogram.buckets[-1] == 1
    assert sum(histogram.buckets) == 5
    assert histogram.ns == first + first + 1 + second + int(HISTOGRAM_BOUNDS[-1] * 1e9) + 1
