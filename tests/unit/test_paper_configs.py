"""Every released NACLIP / SCLIP config has a row of valid parameters, and the README shows each."""

from __future__ import annotations

from pathlib import Path

import pytest

from ovseg_ros.bench.paper_configs import EXACTNESS_ROWS, RELEASED_CONFIGS
from ovseg_ros.core.settings import check_consistent, make_settings

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


@pytest.mark.parametrize("config", RELEASED_CONFIGS, ids=lambda c: f"{c.paper}-{c.config}")
def test_released_config_is_valid_settings_and_in_the_readme(config):
    settings = make_settings({"preset": config.preset, **config.parameters})
    dense = check_consistent(settings)
    assert f"| {config.paper} `{config.config}` | `{config.preset}` |" in README
    if "score_threshold" in config.parameters:  # the papers' prob_thd gives the background class, not "unknown"
        assert dense.below_threshold == "first_class" and dense.score_threshold == 0.1


def test_every_released_config_of_both_papers_is_listed():
    names = {(c.paper, c.config) for c in RELEASED_CONFIGS}
    expected = {"ade20k", "city_scapes", "coco_object", "coco_stuff164k", "context59", "context60", "voc20", "voc21"}
    assert {c for p, c in names if p == "NACLIP"} == {f"cfg_{n}" for n in expected}
    assert {c for p, c in names if p == "SCLIP"} == {f"cfg_{n}" for n in expected | {"coco_stuff10k"}}


def test_exactness_rows_are_valid_settings():
    for row in EXACTNESS_ROWS:
        check_consistent(make_settings({"preset": row.preset, **row.ours}))
