"""Atomic, verified training checkpoints.

A checkpoint is a directory ``step-000000123``. Gathered (one writer holds the whole student:
``save``), it holds the student and aux modules (projections) as safetensors and the optimizer
state as a ``torch.save`` file that loads with ``weights_only=True``, plus named extra
safetensors files a caller adds (the top-k compression residuals of every rank, gathered to rank
0). Sharded (a split student, ``parallel/sharded_checkpoint.py``), every rank writes its own part
into a shared temporary directory (``shared_tmp``, ``begin``) and rank 0 adds the rest. Both hold
the LR-scheduler state, every RNG state and the sampler position (``write_state``) and
``trainer.json`` (step, stage, temperature).

``commit`` finishes either: a manifest of sha256 checksums written last, then the directory
renamed into place: a reader never sees a partial one. On start, the newest checkpoint whose
manifest verifies wins; a corrupt one is skipped with a warning. With a gang attempt
(``fence.py``) the rename and the pruning happen under the attempt fence: a rank of an older
attempt has its save refused (``ExitCode.FENCED``), so it never becomes the newest complete
checkpoint. Pruning also removes temporary directories a writer that died mid-save left.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, cast

import numpy as np
import torch
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import nn

from .dcp_storage import METADATA as SHARDED_METADATA
from .fence import Fence
from .fsio import replace_dir, sha256_file

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
PREFIX = "step-"
TMP_PREFIX = ".tmp-"


@dataclass
class CheckpointInfo:
    path: Path
    step: int
    stage: str
    temperature: float
    sampler: dict[str, Any]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def sharded(self) -> bool:
        """Written by ranks that each saved their own part (``sharded_state``); else gathered:
        the whole student in ``model.safetensors`` and ``optimizer.pt``."""
        return (self.path / SHARDED_METADATA).is_file()


def capture_rng() -> dict[str, Any]:
    """Every RNG state as tensors and plain values, so that ``weights_only`` loading accepts it."""
    # The legacy tuple form (numpy's stubs also allow a dict, which legacy=True never returns).
    np_state = cast(tuple[str, np.ndarray, int, int, float], np.random.get_state(legacy=True))
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np_state
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "kind": np_kind,
            "keys": torch.from_numpy(np_keys.astype(np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "gauss": float(np_gauss),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class ResumeGroup(Protocol):
    """The ranks that resume together (``ParallelRuntime``): collectives over all of them."""

    def steps_of_first(self, steps: list[int]) -> list[int]:
        """The first rank's ``steps``, on every rank."""
        ...

    def agree_sound(self, local: bool) -> bool:
        """True on every rank when ``local`` is True on every rank."""
        ...


class CheckpointManager:
    def __init__(self, root: Path, keep: int, fence: Fence | None = None) -> None:
        self.root = root
        self.keep = keep
        self.fence = fence or Fence(root, None)

    def path_of(self, step: int) -> Path:
        """Where the checkpoint of ``step`` lives once committed."""
        return self.root / f"{PREFIX}{step:09d}"

    def save(
        self,
        *,
        step: int,
        stage: str,
        temperature: float,
        model: nn.Module,
        aux: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        sampler: dict[str, Any],
        meta: dict[str, Any] | None = None,
        extra: dict[str, dict[str, torch.Tensor]] | None = None,
    ) -> Path:
        """Write a gathered checkpoint (one writer holds the whole student) atomically, prune old
        ones, and return its path. ``extra`` maps a file name (``*.safetensors``) to the tensors
        it holds; they are covered by the manifest."""
        tmp = self.begin(self.root / f"{TMP_PREFIX}{self.path_of(step).name}-{os.getpid()}")
        try:
            save_model(model, str(tmp / "model.safetensors"))
            save_model(aux, str(tmp / "aux.safetensors"))
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
            for name, tensors in (extra or {}).items():
                if not name.endswith(".safetensors") or "/" in name or name.startswith("."):
                    raise ValueError(f"extra checkpoint file {name!r}: expected a plain NAME.safetensors")
                save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp / name))
            self.write_state(
                tmp, step=step, stage=stage, temperature=temperature, scheduler=scheduler, sampler=sampler, meta=meta
            )
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return self.commit(tmp, step)

    def shared_tmp(self, step: int) -> Path:
        """The temporary directory every rank of a sharded save writes into: the same name on
        every rank, one per attempt (a rank of an older attempt never writes into a newer one's)."""
        return self.root / f"{TMP_PREFIX}{self.path_of(step).name}-attempt{self.fence.attempt or 0}"

    def begin(self, tmp: Path) -> Path:
        """An empty ``tmp`` (what a writer that died there left is removed first)."""
        self.root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        return tmp

    def write_state(
        self,
        tmp: Path,
        *,
        step: int,
        stage: str,
        temperature: float,
        scheduler: Any,
        sampler: dict[str, Any],
        meta: dict[str, Any] | None = None,
    ) -> None:
        """What every checkpoint holds besides the student and its optimizer state: the LR
        schedule, the RNG states, the sampler position and ``trainer.json``."""
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save(capture_rng(), tmp / "rng.pt")
        torch.save(sampler, tmp / "sampler.pt")
        info = {
            "step": step,
            "stage": stage,
            "temperature": temperature,
            "time": time.time(),
            "meta": meta or {},
            "attempt": self.fence.attempt,
        }
        (tmp / "trainer.json").write_text(json.dumps(info, indent=1))

    def commit(self, tmp: Path, step: int, digests: dict[str, str] | None = None) -> Path:
        """Checksum every file of the finished ``tmp`` into the manifest (written last; files
        whose sha256 a writer already computed from the bytes it wrote are not read again), then
        rename it into place and prune, under the attempt fence. Returns the checkpoint's path."""
        known = digests or {}
        files = sorted(p.name for p in tmp.iterdir())
        manifest = {"step": step, "files": {name: known.get(name) or sha256_file(tmp / name) for name in files}}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        final = self.path_of(step)
        try:
            with self.fence.holding(f"checkpoint of step {step}"):
                # Re-saving a step (e.g. SIGTERM right after a periodic save) replaces the old one.
                replace_dir(tmp, final)
                self.prune()
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return final

    def prune(self) -> None:
        for path in self.candidates()[self.keep :]:
            shutil.rmtree(path, ignore_errors=True)
        for stale in [*self.root.glob(f"{TMP_PREFIX}*"), *self.root.glob(f"{PREFIX}*.old")]:
            # Left by a writer that died mid-save or mid-replace; never the newest checkpoint.
            shutil.rmtree(stale, ignore_errors=True)

    def listed_steps(self) -> list[int]:
        """Steps of the committed checkpoint directories, newest first."""
        if not self.root.is_dir():
            return []
        steps = []
        for p in self.root.iterdir():
            if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX) :].isdigit():
                steps.append(int(p.name[len(PREFIX) :]))
        return sorted(steps, reverse=True)

    def candidates(self) -> list[Path]:
        """Checkpoint directories, newest first."""
        return [self.path_of(step) for step in self.listed_steps()]

    @staticmethod
    def verify(path: Path, share: tuple[int, int] = (0, 1)) -> str | None:
        """None when every file of ``share`` matches the manifest, else why not. ``share`` is
        (index, count): the files at index, index + count, ... of the manifest's sorted names, so
        that the ranks of a group hash one part each; (0, 1) is every file."""
        try:
            manifest = json.loads((path / MANIFEST).read_text())
            files: dict[str, str] = manifest["files"]
            names = sorted(files)
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            return f"unreadable manifest ({exc})"
        index, count = share
        for name in names[index::count]:
            digest = files[name]
            target = path / name
            if not target.is_file():
                return f"{name} is missing"
            if sha256_file(target) != digest:
                return f"{name} does not match its checksum"
        return None

    def latest(self, share: tuple[int, int] = (0, 1), group: ResumeGroup | None = None) -> CheckpointInfo | None:
        """The newest checkpoint whose files all match its manifest. In a group of processes each
        hashes its ``share`` of the files (``verify``) and the group agrees on each verdict (True
        only when every rank's share is sound), so they all skip the same checkpoints and the
        group reads each file once instead of once per rank. The ranks walk the first rank's
        listing: a listing taken while an older gang still commits or prunes may differ between
        ranks, and one verdict per checkpoint per rank keeps the collectives matched (a rank that
        lacks a listed checkpoint finds it unsound)."""
        steps = self.listed_steps()
        if group is not None:
            steps = group.steps_of_first(steps)
        paths = [self.path_of(step) for step in steps]
        for path in paths:
            problem = self.verify(path, share)
            sound = problem is None if group is None else group.agree_sound(problem is None)
            if not sound:
                log.warning("skipping corrupt checkpoint %s: %s", path, problem or "another rank found a bad file")
                continue
            info = json.loads((path / "trainer.json").read_text())
            sampler = torch.load(path / "sampler.pt", weights_only=True)
            return CheckpointInfo(
                path=path,
                step=int(info["step"]),
                stage=str(info["stage"]),
                temperature=float(info["temperature"]),
                sampler=sampler,
                meta=dict(info.get("meta", {})),
            )
        return None

    @staticmethod
    def restore(
        info: CheckpointInfo,
        *,
        model: nn.Module,
        aux: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
    ) -> None:
        """Load states into live objects; the caller already verified ``info`` through ``latest``."""
        path = info.path
        load_model(model, str(path / "model.safetensors"))
        load_model(aux, str(path / "aux.safetensors"))
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
        scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
        restore_rng(torch.load(path / "rng.pt", weights_only=True))

    @staticmethod
    def load_extra(info: CheckpointInfo, name: str) -> dict[str, torch.Tensor] | None:
        """An extra file written by ``save`` (already verified through ``latest``), or None."""
        path = info.path / name
        return load_file(str(path)) if path.is_file() else None
