"""Is the Hugging Face Hub reachable, and did the user ask for offline mode? (data.py's Hub sources)

A 2 s TCP probe of the Hub endpoint (or of the configured HTTPS proxy) decides whether ``datasets`` may
try the network at all: on an offline machine it would otherwise retry for ~25 s before answering
from its cache. When the probe fails, or HF_HUB_OFFLINE / HF_DATASETS_OFFLINE is set, data.py runs
``datasets`` inside :func:`_forced_offline`.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import os
import socket
import threading
import urllib.parse
import urllib.request
from collections.abc import Iterator

logger = logging.getLogger("llmprune.data")  # its messages belong to data loading
HUB_PROBE_TIMEOUT_S = 2.0
_TRUE = {"1", "ON", "YES", "TRUE"}


def _offline_requested() -> bool:
    """True when the user asked for offline mode (env vars read now, or the libraries' flags)."""
    if any(os.environ.get(v, "").upper() in _TRUE
           for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")):
        return True
    import datasets.config
    import huggingface_hub.constants

    return bool(datasets.config.HF_HUB_OFFLINE or huggingface_hub.constants.HF_HUB_OFFLINE)


@contextlib.contextmanager
def _forced_offline(enabled: bool = True) -> Iterator[None]:
    """Make ``datasets``/``huggingface_hub`` act as with HF_HUB_OFFLINE=1 (cache only) for a while.

    Both libraries read the variable at import time, so their module flags are switched instead.
    """
    if not enabled:
        yield
        return
    import datasets.config as dcfg
    import huggingface_hub.constants as hcst

    saved = (dcfg.HF_HUB_OFFLINE, dcfg.HF_DATASETS_OFFLINE, hcst.HF_HUB_OFFLINE)
    dcfg.HF_HUB_OFFLINE = dcfg.HF_DATASETS_OFFLINE = hcst.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        dcfg.HF_HUB_OFFLINE, dcfg.HF_DATASETS_OFFLINE, hcst.HF_HUB_OFFLINE = saved


@functools.lru_cache(maxsize=8)
def _tcp_reachable(host: str, port: int, timeout: float) -> bool:
    """Can a TCP connection to host:port be opened within ``timeout`` s (DNS included)?"""
    ok = threading.Event()

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                ok.set()
        except OSError:
            pass

    thread = threading.Thread(target=probe, daemon=True)  # getaddrinfo itself has no timeout
    thread.start()
    thread.join(timeout + 0.5)
    return ok.is_set()


def _hub_reachable() -> bool:
    """2 s TCP probe of the Hub endpoint (or of the HTTPS proxy, when one is configured)."""
    import huggingface_hub.constants

    url = urllib.parse.urlsplit(huggingface_hub.constants.ENDPOINT)
    proxy = urllib.request.getproxies().get(url.scheme)
    if proxy and not urllib.request.proxy_bypass(url.hostname or ""):
        url = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
    if not url.hostname:
        return True  # cannot tell: let the libraries try
    port = url.port or (443 if url.scheme == "https" else 80)
    reachable = _tcp_reachable(url.hostname, port, HUB_PROBE_TIMEOUT_S)
    if not reachable:
        logger.info("data: %s:%d is unreachable; reading Hub datasets from the local cache only",
                    url.hostname, port)
    return reachable


__all__ = ["HUB_PROBE_TIMEOUT_S", "_forced_offline", "_hub_reachable", "_offline_requested", "_tcp_reachable"]
