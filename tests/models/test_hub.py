"""Hub ids: the local Hugging Face cache first, and a quick one-line error when the hub is out
of reach (huggingface_hub alone retries for ~26 s). No test here touches the network: the
endpoint is a local port that refuses connections."""

from __future__ import annotations

import shutil
import socket
import time

import pytest

from lowbit import load_model
from lowbit.errors import ModelLoadError
from lowbit.models.hashing import files_sha256, model_files
from lowbit.models.hub import _connect_target

COMMIT = "0" * 40


@pytest.fixture
def refused_endpoint(monkeypatch, tmp_path):
    """The hub endpoint is a bound, never-listening local port (connections are refused at
    once); the Hugging Face cache is empty; offline mode is off."""
    from huggingface_hub import constants

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))  # bound and not listening: a connect is refused, and no one else gets the port
    endpoint = f"http://127.0.0.1:{sock.getsockname()[1]}"
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    yield endpoint
    sock.close()


def test_unreachable_hub_fails_in_one_line_without_downloading(refused_endpoint, monkeypatch):
    """The ~26 s were huggingface_hub's download retries: the download path is never entered.
    (Speed is not asserted here; the time is printed.)"""
    import lowbit.models.loader as loader

    calls = []
    real = loader._load_hub_files

    def recorded(repo_id, *, local_files_only):
        calls.append(local_files_only)
        return real(repo_id, local_files_only=local_files_only)

    monkeypatch.setattr(loader, "_load_hub_files", recorded)
    start = time.perf_counter()
    with pytest.raises(ModelLoadError) as err:
        load_model("no-such-org/no-such-model")
    print(f"unreachable hub id refused in {time.perf_counter() - start:.2f} s")
    message = str(err.value)
    assert message.startswith("cannot load model from no-such-org/no-such-model: it is not in the local Hugging Face")
    assert f"{refused_endpoint} cannot be reached" in message and "\n" not in message
    assert calls == [True]  # the local cache only: no download, so no retries


def test_offline_mode_fails_at_once(monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    with pytest.raises(ModelLoadError, match="not in the local Hugging Face cache, and HF_HUB_OFFLINE is set$"):
        load_model("no-such-org/no-such-model")


def test_a_model_in_the_local_hf_cache_loads_without_network(refused_endpoint, tmp_path, tiny_lm_dir):
    """The Hugging Face cache layout: models--org--name/{refs/main, snapshots/<commit>/files}."""
    from huggingface_hub import constants

    repo = tmp_path / "hf-cache" / "models--lowbit-test--tiny"
    shutil.copytree(tiny_lm_dir, repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    assert str(tmp_path / "hf-cache") == constants.HF_HUB_CACHE
    model, tokenizer, info = load_model("lowbit-test/tiny")
    assert info.source == "lowbit-test/tiny" and info.name == "tiny"
    assert info.file_hash == files_sha256(model_files(tiny_lm_dir), root=tiny_lm_dir)
    assert not model.training and tokenizer("hello")["input_ids"]


def test_the_probe_goes_to_the_proxy_the_environment_names(monkeypatch):
    monkeypatch.setenv("https_proxy", "http://proxy.example:3128")
    monkeypatch.setenv("no_proxy", "internal.example")
    assert _connect_target("https://huggingface.co") == ("proxy.example", 3128)
    assert _connect_target("https://internal.example") == ("internal.example", 443)
    monkeypatch.delenv("https_proxy")
    assert _connect_target("https://huggingface.co") == ("huggingface.co", 443)
    assert _connect_target("http://127.0.0.1:9") == ("127.0.0.1", 9)
