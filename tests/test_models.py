"""Model sources: resolution, and the offline switch for an unreachable hub."""

from __future__ import annotations

import os

import huggingface_hub.constants as hub_constants
import pytest

from peftlab import models
from peftlab.models import offline_unless_hub_reachable, resolve_model


@pytest.fixture
def hub_undecided(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """No offline setting and no earlier decision; records the URLs probed (answering as `answers`)."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv(models.HUB_PROBED, raising=False)
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    probed: list[str] = []
    yield probed
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the test session's setting, restored at teardown


def test_unreachable_hub_switches_to_offline_mode_once(monkeypatch, hub_undecided) -> None:
    monkeypatch.setattr(models, "_answers", lambda url, timeout: hub_undecided.append(url) or False)
    assert offline_unless_hub_reachable() is True
    assert hub_constants.HF_HUB_OFFLINE is True and os.environ["HF_HUB_OFFLINE"] == "1"
    assert os.environ[models.HUB_PROBED] == "unreachable"  # inherited by workers: no second probe
    monkeypatch.delenv("HF_HUB_OFFLINE")
    assert offline_unless_hub_reachable() is True and hub_undecided == ["https://huggingface.co"]


def test_reachable_hub_is_left_online_and_endpoint_is_honoured(monkeypatch, hub_undecided) -> None:
    monkeypatch.setenv("HF_ENDPOINT", "https://hub.example.org")
    monkeypatch.setattr(models, "_answers", lambda url, timeout: hub_undecided.append(url) or True)
    assert offline_unless_hub_reachable() is False and hub_constants.HF_HUB_OFFLINE is False
    assert hub_undecided == ["https://hub.example.org"]


def test_hf_hub_offline_means_no_probe(monkeypatch, hub_undecided) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(models, "_answers", lambda url, timeout: hub_undecided.append(url) or True)
    assert offline_unless_hub_reachable() is False and hub_undecided == []


def test_only_hub_ids_are_probed(monkeypatch, hub_undecided, tmp_path) -> None:
    monkeypatch.setattr(models, "_answers", lambda url, timeout: hub_undecided.append(url) or False)
    resolve_model(str(tmp_path))
    resolve_model({"arch": "bert", "random_init": True})
    assert hub_undecided == []
    resolve_model("org/some-model")
    assert len(hub_undecided) == 1


def test_an_answering_server_is_reachable_even_with_an_error_status(monkeypatch) -> None:
    import http.server
    import threading

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_HEAD(self) -> None:
            self.send_response(403)
            self.end_headers()

        def log_message(self, *args) -> None:
            pass

    for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.handle_request, daemon=True).start()
    try:
        assert models._answers(f"http://127.0.0.1:{server.server_port}/", timeout=5) is True
    finally:
        server.server_close()
    assert models._answers("http://127.0.0.1:9/", timeout=1) is False  # nothing listens on port 9


def test_sources_resolve_by_form(tmp_path) -> None:
    assert resolve_model("org/some-model").kind == "hub"
    assert resolve_model(str(tmp_path)).kind == "local"
    random = resolve_model({"arch": "bert", "random_init": True, "config": {"hidden_size": 32}})
    assert (random.kind, random.arch, random.overrides) == ("random", "bert", {"hidden_size": 32})


def test_only_safetensors_weights_are_loaded(tmp_path) -> None:
    import torch
    from transformers import AutoModelForSequenceClassification, BertConfig, BertForSequenceClassification

    from peftlab.errors import InputError
    from peftlab.models import instantiate

    config = BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    config.save_pretrained(tmp_path)
    torch.save(BertForSequenceClassification(config).state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(InputError, match=r"no safetensors weights .* loads weights only from .safetensors files"):
        instantiate(AutoModelForSequenceClassification, resolve_model(str(tmp_path)), num_labels=2)
