"""The environment's on/off settings (switches.py): one reading for every OSS_MLX_* switch."""

from __future__ import annotations

import pytest


@pytest.mark.parametrize(
    "value,want",
    [
        ("1", True),
        ("ON", True),
        (" yes ", True),
        ("0", False),
        ("Off", False),
        ("no", False),
        ("", None),
        ("auto", None),
        ("maybe", None),
    ],
)
def test_the_environments_switches_read_one_way(monkeypatch, value, want):
    from oss_mlx.switches import env_switch

    monkeypatch.setenv("OSS_MLX_SOME_SWITCH", value)
    assert env_switch("OSS_MLX_SOME_SWITCH") is want
    monkeypatch.delenv("OSS_MLX_SOME_SWITCH")
    assert env_switch("OSS_MLX_SOME_SWITCH") is None
