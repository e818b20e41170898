"""The generated set: the teacher's completions for the prompts, on disk, resumable.

Layout under the job's output (``OUT/generated/``)::

    manifest.json          what the set is (generation settings, teacher, prompts' checksum,
                           shard size) and, once complete, every shard with its counts and sha256
    shard-00000.jsonl      prompts [0, S): samplesPerPrompt lines per prompt, in prompt order
    shard-00001.jsonl      prompts [S, 2S) ...

A line is ``{"prompt", "completion", "text", "promptIndex", "sample"}``; ``text`` is prompt
followed by completion, so the folder is also a plain text data source (``data.train``).

Shards are written whole to a temporary file, fsync'ed, and renamed into place: a shard file at
its final name is complete. On a restart every shard file is checked (each line parses, and it
holds exactly the expected prompts and samples); good shards are kept, anything else is deleted
and written again, so no prompt is generated twice once its shard is done and none is lost.

Several ranks share the work by shard (rank r writes shards i with i % world == r, each with
its own in-process or served teacher). Ranks never meet in a collective while generating:
generation can take far longer than a collective timeout. Rank 0 writes the manifest, every
rank writes its shards, then waits on the file system for the others' shards; rank 0 then
checksums them and marks the manifest complete, which the others wait for. A wait fails as a
lost peer when nothing new appears for ``stall_timeout_s``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdistill.api.failures import ExitCode

from .data import Example
from .errors import TrainerError
from .fsio import fsync_dir, replace_file, sha256_file
from .teacher_service import GenerationParams, TeacherService

log = logging.getLogger(__name__)

FORMAT = "kdistill.generated/v1"
MANIFEST = "manifest.json"
SHARD_PROMPTS = 16  # prompts per shard: the unit of resume
IN_FLIGHT_SHARDS = 4  # shards asked of the teacher at once, so a served teacher's batcher fills
POLL_SECONDS = 0.5


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.jsonl"


def is_generated_set(path: Path) -> bool:
    """A folder with a generated set's manifest (a valid ``data.train`` / ``data.eval``)."""
    return path.is_dir() and (path / MANIFEST).is_file()


@dataclass(frozen=True)
class GenerationPlan:
    """Everything that decides a generated set's content."""

    prompts: Sequence[str]
    samples_per_prompt: int
    max_new_tokens: int
    temperature: float
    top_p: float
    seed: int
    teacher: dict[str, str]  # the teacher's identity: its model source or its endpoint
    shard_prompts: int = SHARD_PROMPTS

    def __post_init__(self) -> None:
        if not self.prompts:
            raise ValueError("a generation plan needs at least one prompt")
        if self.shard_prompts < 1 or self.samples_per_prompt < 1:
            raise ValueError("shard_prompts and samples_per_prompt must be >= 1")

    @property
    def num_shards(self) -> int:
        return -(-len(self.prompts) // self.shard_prompts)

    def shard_range(self, index: int) -> range:
        start = index * self.shard_prompts
        return range(start, min(start + self.shard_prompts, len(self.prompts)))

    def params(self, shard: int) -> GenerationParams:
        # One seed per shard: a shard written again after a crash draws the same samples
        # from a teacher that honours seeds.
        return GenerationParams(
            max_new_tokens=self.max_new_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            n=self.samples_per_prompt,
            seed=(self.seed * 1_000_003 + shard) % 2**31,
        )

    def identity(self) -> dict[str, Any]:
        digest = hashlib.sha256()
        for p in self.prompts:
            digest.update(p.encode("utf-8"))
            digest.update(b"\0")
        return {
            "format": FORMAT,
            "generation": {
                "samplesPerPrompt": self.samples_per_prompt,
                "maxNewTokens": self.max_new_tokens,
                "temperature": self.temperature,
                "topP": self.top_p,
                "seed": self.seed,
            },
            "teacher": dict(self.teacher),
            "prompts": {"count": len(self.prompts), "sha256": digest.hexdigest()},
            "shardPrompts": self.shard_prompts,
        }


# ---- shards ----------------------------------------------------------------------------------
def shard_records(plan: GenerationPlan, index: int, completions: list[list[str]]) -> list[dict[str, Any]]:
    """The lines of shard ``index`` from the teacher's answer (one list of samples per prompt)."""
    rows = plan.shard_range(index)
    if len(completions) != len(rows) or any(len(c) != plan.samples_per_prompt for c in completions):
        shape = [len(c) for c in completions]
        raise TrainerError(
            ExitCode.INTERNAL,
            f"the teacher answered {len(completions)} prompts with {shape} samples; asked "
            f"{len(rows)} prompts with {plan.samples_per_prompt} samples each",
        )
    out = []
    for p, samples in zip(rows, completions, strict=True):
        prompt = plan.prompts[p]
        for j, completion in enumerate(samples):
            out.append(
                {"prompt": prompt, "completion": completion, "text": prompt + completion, "promptIndex": p, "sample": j}
            )
    return out


def write_shard(root: Path, index: int, records: list[dict[str, Any]]) -> Path:
    """Write a whole shard atomically (temporary file, fsync, rename, fsync of the folder)."""
    final = root / shard_name(index)
    tmp = root / f".{final.name}.{os.getpid()}.tmp"
    with tmp.open("w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    replace_file(tmp, final)
    return final


def shard_is_complete(path: Path, plan: GenerationPlan, index: int) -> bool:
    """Whether the file holds exactly shard ``index`` of ``plan``: every line parses, and the
    (prompt, sample) pairs are the expected ones, once each, with the plan's prompt text."""
    if not path.is_file():
        return False
    expected = {(p, j) for p in plan.shard_range(index) for j in range(plan.samples_per_prompt)}
    seen: set[tuple[int, int]] = set()
    try:
        with path.open("rb") as f:
            for raw in f:
                r = json.loads(raw.decode("utf-8"))
                key = (r["promptIndex"], r["sample"])
                if key not in expected or key in seen or r["prompt"] != plan.prompts[key[0]]:
                    return False
                if not isinstance(r["completion"], str) or r["text"] != r["prompt"] + r["completion"]:
                    return False
                seen.add(key)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
        return False
    return seen == expected


# ---- the manifest ----------------------------------------------------------------------------
def read_manifest(root: Path) -> dict[str, Any] | None:
    path = root / MANIFEST
    if not path.is_file():
        return None
    try:
        body = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise TrainerError(ExitCode.BAD_DATA, f"{path}: unreadable manifest: {exc}") from None
    if not isinstance(body, dict) or body.get("format") != FORMAT:
        raise TrainerError(ExitCode.BAD_DATA, f"{path}: not a generated set's manifest (format {FORMAT})")
    return body


def _write_manifest(root: Path, body: dict[str, Any]) -> None:
    tmp = root / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(body, indent=2, sort_keys=True) + "\n")
    with tmp.open("rb") as f:
        os.fsync(f.fileno())
    replace_file(tmp, root / MANIFEST)


def _checksum_ok(path: Path, sha256: str) -> bool:
    return path.is_file() and sha256_file(path) == sha256


def _differences(saved: dict[str, Any], mine: dict[str, Any]) -> list[str]:
    return [f"{k}: {saved.get(k)!r} there, {v!r} here" for k, v in mine.items() if saved.get(k) != v]


def prepare(root: Path, plan: GenerationPlan) -> dict[str, Any]:
    """Rank 0: check an existing set is this plan's, or start a new one; returns the manifest."""
    root.mkdir(parents=True, exist_ok=True)
    saved = read_manifest(root)
    identity = plan.identity()
    if saved is not None:
        differ = _differences(saved, identity)
        if differ:
            raise TrainerError(
                ExitCode.BAD_SPEC,
                f"{root} holds a generated set made with other settings ({'; '.join(differ)}); "
                "remove it, or give the job another output folder",
            )
        if saved.get("complete"):
            bad = [s["file"] for s in saved["shards"] if not _checksum_ok(root / s["file"], s["sha256"])]
            if not bad:
                return saved
            # A shard changed on disk after the set was finished: write those shards again.
            log.warning("%s: %s changed since the set was finished; generating them again", root, bad)
            for name in bad:
                (root / name).unlink(missing_ok=True)
        else:
            return saved
    body = {**identity, "complete": False, "shards": []}
    _write_manifest(root, body)
    return body


def finalize(root: Path, plan: GenerationPlan) -> dict[str, Any]:
    """Rank 0, once every shard is written: checksum them and mark the manifest complete."""
    shards: list[dict[str, Any]] = []
    for i in range(plan.num_shards):
        path = root / shard_name(i)
        if not shard_is_complete(path, plan, i):
            raise TrainerError(ExitCode.INTERNAL, f"{path}: shard {i} is missing or incomplete at the end")
        rows = plan.shard_range(i)
        shards.append(
            {
                "file": path.name,
                "prompts": len(rows),
                "firstPrompt": rows.start,
                "records": len(rows) * plan.samples_per_prompt,
                "bytes": path.stat().st_size,
                "sha256": sha256_file(path),
            }
        )
    body = {
        **plan.identity(),
        "complete": True,
        "shards": shards,
        "records": sum(s["records"] for s in shards),
    }
    _write_manifest(root, body)
    return body


# ---- generating --------------------------------------------------------------------------------
def generate_shards(
    root: Path,
    plan: GenerationPlan,
    teacher: TeacherService,
    *,
    rank: int = 0,
    world: int = 1,
    in_flight: int = IN_FLIGHT_SHARDS,
    on_shard: Callable[[int, int], None] | None = None,
) -> list[int]:
    """Write this rank's missing shards; returns their indices in the order written.

    ``in_flight`` shards are asked of the teacher at once (``in_flight * shard_prompts``
    prompts), and each is written as soon as its answer is in. ``on_shard(index, records)``
    runs after each write (progress, and the tests' crash point)."""
    todo = []
    for i in range(rank, plan.num_shards, world):
        path = root / shard_name(i)
        for stale in root.glob(f".{path.name}.*.tmp"):  # a crashed writer's leftovers
            stale.unlink(missing_ok=True)
        if shard_is_complete(path, plan, i):
            continue
        if path.exists():
            log.warning("%s is incomplete or corrupt: generating it again", path)
            path.unlink()
        todo.append(i)
    if not todo:
        return []
    fsync_dir(root)
    written: list[int] = []
    pending: dict[Future[list[list[str]]], int] = {}
    queue = iter(todo)
    for i in queue:
        pending[_ask(teacher, plan, i)] = i
        if len(pending) >= in_flight:
            break
    while pending:
        done, _ = wait(list(pending), return_when=FIRST_COMPLETED)
        for future in done:
            i = pending.pop(future)
            records = shard_records(plan, i, future.result())
            write_shard(root, i, records)
            written.append(i)
            if on_shard is not None:
                on_shard(i, len(records))
        for i in queue:
            pending[_ask(teacher, plan, i)] = i
            if len(pending) >= in_flight:
                break
    return written


def _ask(teacher: TeacherService, plan: GenerationPlan, shard: int) -> Future[list[list[str]]]:
    prompts = [plan.prompts[p] for p in plan.shard_range(shard)]
    return teacher.generate(prompts, plan.params(shard))


def _wait_until(ready: Callable[[], tuple[bool, int]], what: str, stall_timeout_s: float) -> None:
    """Poll ``ready`` (done, progress) until done; fail when progress stalls for the timeout."""
    last_progress, since = -1, time.monotonic()
    while True:
        done, progress = ready()
        if done:
            return
        if progress != last_progress:
            last_progress, since = progress, time.monotonic()
        elif time.monotonic() - since > stall_timeout_s:
            raise TrainerError(
                ExitCode.PEER_LOST,
                f"waited {stall_timeout_s:.0f} s for {what} with no progress: a peer rank is gone or stuck",
            )
        time.sleep(POLL_SECONDS)


def ensure_generated(
    root: Path,
    plan: GenerationPlan,
    teacher: Callable[[], TeacherService],
    *,
    rank: int = 0,
    world: int = 1,
    in_flight: int = IN_FLIGHT_SHARDS,
    stall_timeout_s: float = 600.0,
    on_shard: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """The complete generated set of ``plan`` at ``root``, generating what is missing; every
    rank calls it. ``teacher`` is called (once) only when this rank has shards to write."""
    if rank == 0:
        manifest = prepare(root, plan)
    else:
        _wait_until(lambda: (read_manifest(root) is not None, 0), f"{root / MANIFEST}", stall_timeout_s)
        manifest = read_manifest(root) or {}
        differ = _differences(manifest, plan.identity())
        if differ:
            raise TrainerError(ExitCode.BAD_SPEC, f"{root}: another rank's generated set differs: {'; '.join(differ)}")
    if manifest.get("complete"):
        try:
            return verify(root)
        except TrainerError:
            if rank == 0:  # prepare() already wrote changed shards off: this is not that
                raise
            # Rank 0 found a changed shard and is having it written again.
    mine = [i for i in range(rank, plan.num_shards, world) if not shard_is_complete(root / shard_name(i), plan, i)]
    if mine:
        service = teacher()
        started = time.perf_counter()
        written = generate_shards(root, plan, service, rank=rank, world=world, in_flight=in_flight, on_shard=on_shard)
        log.info("rank %d wrote %d shards in %.1f s", rank, len(written), time.perf_counter() - started)

    def shards_present() -> tuple[bool, int]:
        n = sum((root / shard_name(i)).is_file() for i in range(plan.num_shards))
        return n == plan.num_shards, n

    _wait_until(shards_present, f"the {plan.num_shards} shards of {root}", stall_timeout_s)
    if rank == 0:
        finalize(root, plan)
    else:
        _wait_until(lambda: (bool((read_manifest(root) or {}).get("complete")), 0), f"{root} complete", stall_timeout_s)
    return verify(root)


# ---- reading -----------------------------------------------------------------------------------
def verify(root: Path) -> dict[str, Any]:
    """The manifest of a complete set whose every shard matches its checksum."""
    manifest = read_manifest(root)
    if manifest is None:
        raise TrainerError(ExitCode.BAD_DATA, f"{root}: no {MANIFEST}: not a generated set")
    if not manifest.get("complete"):
        raise TrainerError(
            ExitCode.BAD_DATA, f"{root}: the generated set is not complete (its job is still writing it)"
        )
    for shard in manifest["shards"]:
        path = root / shard["file"]
        if not _checksum_ok(path, shard["sha256"]):
            raise TrainerError(ExitCode.BAD_DATA, f"{path}: missing, or its sha256 differs from {root / MANIFEST}")
    return manifest


def iter_records(root: Path) -> Iterator[dict[str, Any]]:
    """Every line of a complete, verified set, in prompt order."""
    manifest = verify(root)
    for shard in manifest["shards"]:
        with (root / shard["file"]).open(encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    yield json.loads(line)


def text_examples(root: Path, text_field: str) -> list[Example]:
    """The set as plain training text (``data.train`` pointing at it): one example per line,
    its ``text_field`` (``text`` is prompt + completion; ``prompt`` and ``completion`` also
    exist)."""
    out = []
    for i, record in enumerate(iter_records(root)):
        text = record.get(text_field)
        if not isinstance(text, str):
            raise TrainerError(
                ExitCode.BAD_DATA,
                f"{root}: a generated set's lines have the fields text, prompt and completion; "
                f"data.textField is {text_field!r}",
            )
        out.append(Example(index=i, text=text, label=None, line=i + 1))
    return out
