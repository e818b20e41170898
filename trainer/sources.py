"""Resolve a model or data source URI (path, ``pvc://CLAIM/PATH``, ``hf://REPO[@REV]``) to a local path."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from kdistill.api.failures import ExitCode
from kdistill.api.metadata import PVC_ROOT_ENV
from kdistill.api.uris import parse_source_uri

from .errors import TrainerError

DEFAULT_PVC_ROOT = "./pvc"
HF_HOST = ("huggingface.co", 443)
# An unreachable hub must fail in seconds, not after a long connect timeout.
HF_PROBE_TIMEOUT_S = 3.0


def pvc_root() -> Path:
    return Path(os.environ.get(PVC_ROOT_ENV, DEFAULT_PVC_ROOT))


def resolve_source(uri: str, base_dir: Path) -> Path:
    """Return the local path of ``uri``; existence is checked by the caller, which knows the exit code.

    A relative path is relative to ``base_dir`` (the job file's folder); ``pvc://`` is relative
    to ``$KDISTILL_PVC_ROOT`` (default ``./pvc``); ``hf://`` needs the hub or a local HF cache.
    """
    try:
        src = parse_source_uri(uri)
    except ValueError as exc:
        raise TrainerError(ExitCode.BAD_SPEC, str(exc)) from None
    if src.kind == "pvc":
        return pvc_root() / src.claim / src.path
    if src.kind == "hf":
        return _resolve_hf(src.repo, src.revision or None, uri)
    path = Path(src.path).expanduser()
    return path if path.is_absolute() else base_dir / path


def _hub_reachable() -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes"}:
        return False
    try:
        with socket.create_connection(HF_HOST, timeout=HF_PROBE_TIMEOUT_S):
            return True
    except OSError:
        return False


def _resolve_hf(repo: str, revision: str | None, uri: str) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError:  # pragma: no cover - transformers depends on huggingface_hub
        raise TrainerError(ExitCode.NETWORK_REQUIRED, f"{uri}: huggingface_hub is not installed") from None
    try:
        return Path(snapshot_download(repo, revision=revision, local_files_only=True))
    except Exception:  # any miss in the local cache means "not cached"
        pass
    if not _hub_reachable():
        raise TrainerError(
            ExitCode.NETWORK_REQUIRED,
            f"{uri}: not in the local Hugging Face cache and {HF_HOST[0]} cannot be reached; "
            "copy the model to a volume and use pvc://CLAIM/PATH or a local path instead",
        )
    try:
        return Path(snapshot_download(repo, revision=revision, token=os.environ.get("HF_TOKEN") or None))
    except Exception as exc:  # the hub's errors are many; all mean "not downloadable"
        raise TrainerError(ExitCode.MODEL_NOT_FOUND, f"{uri}: download failed: {exc}") from None
