"""Read the servers' own Prometheus metrics over HTTP, for the canary analysis.

``kdistill serve`` exports, per route template (label ``endpoint``):

- ``kdistill_request_latency_seconds`` (histogram): every answered request, errors included;
- ``kdistill_errors_total`` (counter, label ``status``): the answers with status >= 400.

A scrape keeps the model endpoints only: kubelet probes, metadata reads and the scrapes
themselves (``NOT_MODEL_ENDPOINTS``) would otherwise dilute the error rate and the p99. The
result is a ``canary_logic.Scrape``; ``scrape_all`` reads several pods at once and keeps them
apart, so that ``canary_logic.window`` can take each pod's difference before summing.
"""

from __future__ import annotations

import logging
import urllib.error
import urllib.request
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

from .canary_logic import Scrape

log = logging.getLogger(__name__)

LATENCY = "kdistill_request_latency_seconds"
ERRORS = "kdistill_errors"
METRICS_PATH = "/metrics"
# Routes that answer probes, metadata and scrapes: not model traffic. "other" is the label of a
# request no route matched (an unknown path, or a body refused before routing).
NOT_MODEL_ENDPOINTS = frozenset(
    {
        "/metrics",
        "/v1/models",
        "/v2",
        "/v2/health/live",
        "/v2/health/ready",
        "/v2/models/{name}",
        "/v2/models/{name}/ready",
        "other",
    }
)
# Largest /metrics body read (a server's is a few kB).
MAX_BYTES = 4 * 1024 * 1024
# Pods are scraped directly, never through an HTTP(S)_PROXY of the operator's environment.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class ScrapeError(Exception):
    """A server's metrics could not be read or parsed."""

    def __init__(self, url: str, reason: str) -> None:
        super().__init__(f"{url}: {reason}")
        self.url, self.reason = url, reason


def _is_model(labels: dict[str, str]) -> bool:
    return labels.get("endpoint", "other") not in NOT_MODEL_ENDPOINTS


def parse(text: str) -> Scrape:
    """The model endpoints' requests, errors by status and latency buckets, summed over endpoints."""
    requests = 0.0
    errors: dict[str, float] = {}
    buckets: dict[float, float] = {}
    seen_latency = False
    for family in text_string_to_metric_families(text):
        if family.name == LATENCY:
            seen_latency = True
            for sample in family.samples:
                if not _is_model(sample.labels):
                    continue
                if sample.name == f"{LATENCY}_count":
                    requests += sample.value
                elif sample.name == f"{LATENCY}_bucket":
                    le = float(sample.labels["le"])
                    buckets[le] = buckets.get(le, 0.0) + sample.value
        elif family.name == ERRORS:
            for sample in family.samples:
                if sample.name == f"{ERRORS}_total" and _is_model(sample.labels):
                    status = sample.labels.get("status", "unknown")
                    errors[status] = errors.get(status, 0.0) + sample.value
    if not seen_latency:
        raise ValueError(f"no {LATENCY} histogram: not a kdistill server's metrics")
    return Scrape(requests, errors, tuple(sorted(buckets.items())))


def fetch(base_url: str, timeout: float = 5.0) -> str:
    """The text of ``base_url``/metrics."""
    if not base_url.startswith(("http://", "https://")):
        raise ScrapeError(base_url, "expected an http:// or https:// URL")
    url = base_url.rstrip("/") + METRICS_PATH
    try:
        with _OPENER.open(url, timeout=timeout) as response:
            body: bytes = response.read(MAX_BYTES + 1)
    except (urllib.error.URLError, OSError) as exc:
        raise ScrapeError(base_url, f"GET {METRICS_PATH} failed: {exc}") from exc
    if len(body) > MAX_BYTES:
        raise ScrapeError(base_url, f"{METRICS_PATH} is over {MAX_BYTES} bytes")
    return body.decode("utf-8", errors="replace")


def scrape(base_url: str, timeout: float = 5.0) -> Scrape:
    text = fetch(base_url, timeout)
    try:
        return parse(text)
    except ValueError as exc:
        raise ScrapeError(base_url, f"unreadable metrics: {exc}") from exc


@dataclass(frozen=True)
class PodScrapes:
    """Scrapes of several servers by base URL, and the servers that could not be read, with why."""

    scrapes: dict[str, Scrape] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)


def scrape_all(base_urls: Iterable[str], timeout: float = 5.0) -> PodScrapes:
    """Scrape every server at once. A pod that cannot be read is reported in ``failed`` rather
    than dropped silently: the caller decides whether a window without it can be judged."""
    urls = sorted(set(base_urls))
    out = PodScrapes()
    if not urls:
        return out

    def one(url: str) -> tuple[str, Scrape | ScrapeError]:
        try:
            return url, scrape(url, timeout)
        except ScrapeError as exc:
            return url, exc

    with ThreadPoolExecutor(max_workers=min(16, len(urls))) as pool:
        for url, result in pool.map(one, urls):
            if isinstance(result, ScrapeError):
                log.warning("metrics of %s unreadable: %s", url, result.reason)
                out.failed[url] = result.reason
            else:
                out.scrapes[url] = result
    return out
