"""The docs stand on their own: the README quotes the e2e transcript that `make e2e` writes,
links point at files that exist, nothing cites a design brief outside the repository, and the
reference docs do not narrate how they were made."""

from __future__ import annotations

import re
from pathlib import Path

from e2e.support import readme_excerpt

ROOT = Path(__file__).resolve().parents[2]
TRANSCRIPT = ROOT / "docs" / "e2e-transcript.txt"
MARKER = "<!-- e2e-transcript:"
DOCS = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", *sorted((ROOT / "docs").rglob("*.md"))]
SOURCES = [
    p
    for folder in ("api", "operator", "trainer", "serving", "cli", "kdistill", "tests", "e2e", "benchmarks", "scripts")
    for p in sorted((ROOT / folder).rglob("*"))
    if p.suffix in {".py", ".sh", ".md", ".yaml"} and "__pycache__" not in p.parts and "results" not in p.parts
]


def _readme_excerpt() -> list[str]:
    text = (ROOT / "README.md").read_text()
    assert MARKER in text, "the README has no e2e transcript excerpt"
    block = re.search(r"```\n(.*?)```", text[text.index(MARKER) :], re.S)
    assert block is not None
    return block.group(1).splitlines()


def test_readme_transcript_is_the_excerpt_of_the_committed_e2e_transcript() -> None:
    transcript = TRANSCRIPT.read_text()
    shown = _readme_excerpt()
    assert shown == readme_excerpt(transcript), "README and docs/e2e-transcript.txt differ: see CONTRIBUTING.md"
    # Quoted, not retyped: every line is one of the transcript's, in order.
    lines = transcript.splitlines()
    position = 0
    for line in (line for line in shown if line.strip()):
        position = lines.index(line, position) + 1
    assert shown[0].startswith("NAME") and any(" Restarting " in line for line in shown), shown


def test_the_excerpt_follows_phase_and_stage_changes() -> None:
    transcript = (
        "$ kubectl get dj -n e2e -w\n"
        "NAME   PHASE   STAGE   PROGRESS   RESTARTS   AGE\n"
        "j                                             0s\n"
        "j   Pending         0   0s\n"
        "j   Running   soft   5%   0   9s\n"
        "j   Running   soft   9%   0   12s\n"
        "j   Restarting   soft   9%   1   20s\n"
        "j   Running   output   50%   1   40s\n"
        "j   Succeeded   output   100%   1   0.872   http://j   60s\n"
        "\n"
        "$ kubectl get events\n"
        "LAST SEEN   TYPE   REASON   OBJECT   MESSAGE\n"
        "50s   Normal    Running   dj/j   phase Pending -> Running\n"
        "40s   Warning   GangRestart   dj/j   PEER_LOST\n"
        "5s    Normal    QualityGatePassed   dj/j   retention 0.872 >= 0.2\n"
        "1s    Normal    Succeeded   dj/j   phase Deploying -> Succeeded\n"
    )
    lines = transcript.splitlines()
    assert readme_excerpt(transcript) == [
        lines[1], lines[3], lines[4], lines[5], lines[6], lines[7], lines[8],
        "", lines[11], lines[13], lines[14], lines[15],
    ]  # fmt: skip


def test_relative_links_in_the_docs_point_at_files_that_exist() -> None:
    broken = []
    for doc in DOCS:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", doc.read_text()):
            if "://" in target or target.startswith("mailto:"):
                continue
            if not (doc.parent / target).exists():
                broken.append(f"{doc.relative_to(ROOT)} -> {target}")
    assert not broken, broken


def test_nothing_cites_a_design_brief_outside_the_repository() -> None:
    brief = "DESIGN" + ".md"  # spelled apart so that this file does not match itself
    citing = [str(p.relative_to(ROOT)) for p in [*DOCS, *SOURCES] if brief in p.read_text(errors="replace")]
    assert not citing, citing


def test_docs_do_not_narrate_their_own_history() -> None:
    phrases = re.compile(
        r"\b(this|that|the previous|an earlier|the last|earlier|previous|last|next) sessions?\b|\bsession \d"
        r"|\bwas replaced\b|\bwere replaced\b",
        re.IGNORECASE,
    )
    found = [
        f"{doc.relative_to(ROOT)}:{n}: {line.strip()[:100]}"
        for doc in DOCS
        for n, line in enumerate(doc.read_text().splitlines(), 1)
        if phrases.search(line)
    ]
    assert not found, "\n".join(found)


# Paths the docs name that a run creates, not the repository (a folder: everything under it too).
_WRITTEN_AT_RUN_TIME = {"e2e/results/", "benchmarks/results/e2e.json", "kdistill/attempt-N/"}
_REPO_PATH = re.compile(
    r"`((?:api|operator|trainer|serving|cli|kdistill|tests|e2e|benchmarks|scripts|docs|charts|crds|manifests|docker"
    r"|hack|examples)/[^`\s]*)`"
)


def _cited_path_exists(token: str) -> bool:
    written = any(token == w or (w.endswith("/") and token.startswith(w)) for w in _WRITTEN_AT_RUN_TIME)
    if written or any(c in token for c in "<*{$[") or ":" in token.split("::")[0]:
        return True  # a pattern, a placeholder or an image name (kdistill/trainer:TAG)
    path = token.split("::")[0].rstrip(".,;)").removesuffix("()")
    if (ROOT / path).exists():
        return True
    # `trainer/outputs.write_served_artifact`: a module and a name in it.
    module, _, name = path.rpartition(".")
    source = ROOT / f"{module}.py"
    return bool(module) and source.is_file() and re.search(rf"\b{re.escape(name)}\b", source.read_text()) is not None


def test_paths_the_docs_cite_exist() -> None:
    missing = [
        f"{doc.relative_to(ROOT)}: {token}"
        for doc in DOCS
        for token in _REPO_PATH.findall(doc.read_text())
        if not _cited_path_exists(token)
    ]
    assert not missing, missing
