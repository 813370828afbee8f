"""Can a hub id be downloaded at all? Answered in about a second, before transformers asks.

Without network, huggingface_hub retries each request with exponential backoff (its
``http_backoff``: 5 retries waiting 1, 2, 4, 8, 8 s, then transformers' own second round),
so a mistyped or uncached id used to fail only after ~26 s. lowbit first loads from the
local Hugging Face cache (``local_files_only=True``, no network); only a model not there
goes to the hub, and only after this check found the endpoint reachable.
"""

from __future__ import annotations

import socket
import urllib.request
from urllib.parse import urlsplit

from ..errors import ModelLoadError

PROBE_TIMEOUT_S = 2.0  # a TCP connect to a reachable host takes well under a second; a dropped one never returns


def check_reachable(repo_id: str) -> None:
    """One-line ``ModelLoadError`` if ``repo_id`` cannot be downloaded: the hub is switched
    off (``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE``), or its endpoint (``HF_ENDPOINT``, or
    the proxy the environment names for it) does not accept a connection."""
    from huggingface_hub import constants

    prefix = f"cannot load model from {repo_id}: it is not in the local Hugging Face cache"
    if constants.HF_HUB_OFFLINE:
        raise ModelLoadError(f"{prefix}, and HF_HUB_OFFLINE is set")
    endpoint = constants.ENDPOINT
    host, port = _connect_target(endpoint)
    try:
        socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S).close()
    except OSError as exc:
        reason = "timed out" if isinstance(exc, TimeoutError) else exc.strerror or type(exc).__name__
        raise ModelLoadError(f"{prefix}, and {endpoint} cannot be reached ({host}:{port}: {reason})") from None


def _connect_target(url: str) -> tuple[str, int]:
    """The (host, port) a request to ``url`` connects to: its proxy's, if the environment sets one."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    proxy = urllib.request.getproxies().get(parts.scheme)
    if proxy and not urllib.request.proxy_bypass(host):
        parts = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        host = parts.hostname or ""
    return host, parts.port or (443 if parts.scheme == "https" else 80)
