"""Model sources: resolution, and the offline switch for an unreachable hub."""

from __future__ import annotations

import os
import socket

import huggingface_hub.constants as hub_constants
import pytest

from peftlab.models import offline_unless_hub_reachable, resolve_model


def test_unreachable_hub_switches_to_offline_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args, **kwargs):
        raise OSError("no route")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    assert offline_unless_hub_reachable() is True
    assert hub_constants.HF_HUB_OFFLINE is True
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # restored by monkeypatch at teardown


def test_reachable_hub_is_left_online(monkeypatch: pytest.MonkeyPatch) -> None:
    class Conn:
        def close(self) -> None:
            pass

    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: Conn())
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    assert offline_unless_hub_reachable() is False and hub_constants.HF_HUB_OFFLINE is False


def test_sources_resolve_by_form(tmp_path) -> None:
    assert resolve_model("org/some-model").kind == "hub"
    assert resolve_model(str(tmp_path)).kind == "local"
    random = resolve_model({"arch": "bert", "random_init": True, "config": {"hidden_size": 32}})
    assert (random.kind, random.arch, random.overrides) == ("random", "bert", {"hidden_size": 32})
