"""Cascade serving: accuracy and latency of the student alone, the teacher alone, and the student with
the teacher as its fallback (``kdistill serve --fallback-url``) at two confidence thresholds.

    flock /tmp/kdistill-bench.lock .venv/bin/python -P benchmarks/cascade.py \
        [--thresholds 0.8 0.9] [--runs 3] [--out benchmarks/results/cascade.json]

**Task.** Which standard-library package a docstring comes from (asyncio, email, importlib,
logging, tkinter, xml): the docstrings of the functions, classes and modules of each package,
parsed from the stdlib's sources with ``ast`` (not imported), ``--per-class`` of each, split into
train and eval by a hash of the text. A byte-level BPE tokenizer is learned on the train texts.

**Models**, trained here on CPU before anything is timed:

- the teacher: a BERT classifier (2 layers, 128 wide), ``--teacher-steps`` of cross-entropy on the
  train split, served in FP32 as a plain Hugging Face directory;
- the student: a BERT classifier of 1 layer, ``--student-width`` (32) wide, distilled from that
  teacher for ``--student-steps`` (KL to the teacher's soft labels at temperature 2, weight 0.7,
  plus 0.3 cross-entropy), then PTQ INT8, served as a kdistill artifact.

**Measure.** Four ``kdistill serve`` processes (1 thread each): the teacher, the student, and two
cascade students whose fallback is that teacher server, at ``--min-confidence`` = each of
``--thresholds``. Each run sends every eval text as its own ``/v1/classify`` request, one at a time
over one keep-alive connection, to each variant in turn (the order rotates from run to run), after
a warm-up. Per variant and run: accuracy against the gold package, p50 and p99 latency, and for
the cascades the share of texts forwarded to the teacher (from the answers' ``kdistill.answered_by``,
checked against the server's ``kdistill_cascade_items_total``) and the accuracy of the answers the
student kept. The figures are medians over
``--runs``, with the load average at the start of each run.

Writes benchmarks/results/cascade.json (with the command that produced it) and prints a table.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import re
import statistics
import sys
import sysconfig
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.serving.helpers: the server process

from benchmarks import bench_common
from tests.serving.helpers import ServerProcess

PACKAGES = ("asyncio", "email", "importlib", "logging", "tkinter", "xml")
MAX_TOKENS = 48


def docstrings(package: str, limit: int) -> list[str]:
    """Up to ``limit`` distinct docstrings (>= 40 characters, first 300 kept) of ``package``'s
    modules, classes and functions, in a fixed order; the package's tests are left out."""
    root = Path(sysconfig.get_paths()["stdlib"]) / package
    seen: dict[str, None] = {}
    for path in sorted(root.rglob("*.py")):
        if "test" in path.relative_to(root).parts[0]:
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= 40:
                    seen.setdefault(" ".join(doc.split())[:300], None)
    texts = list(seen)
    # A spread over the whole package, not its first modules only.
    step = max(1, len(texts) // limit)
    return texts[::step][:limit]


def dataset(per_class: int, eval_fraction: float) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    train, evaluation = [], []
    for label, package in enumerate(PACKAGES):
        for text in docstrings(package, per_class):
            bucket = int(hashlib.sha256(text.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
            (evaluation if bucket < eval_fraction else train).append((text, label))
    return train, evaluation


def fit(tok: Any, text: str) -> str:
    """``text`` cut to the tokens that fit ``MAX_TOKENS`` (special tokens included), so that the
    server classifies the same text the models trained on."""
    while len(tok(text)["input_ids"]) > MAX_TOKENS:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        text = tok.decode(ids[: max(1, len(ids) - max(1, len(tok(text)["input_ids"]) - MAX_TOKENS))])
    return text


def encode(tok: Any, rows: list[tuple[str, int]]) -> tuple[Any, Any, Any]:
    import torch

    enc = tok([t for t, _ in rows], truncation=True, max_length=MAX_TOKENS, padding="max_length", return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"], torch.tensor([y for _, y in rows])


def classifier(vocab: int, layers: int, width: int, heads: int, seed: int) -> Any:
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=vocab,
        hidden_size=width,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=4 * width,
        max_position_embeddings=MAX_TOKENS + 2,
        num_labels=len(PACKAGES),
        id2label=dict(enumerate(PACKAGES)),
        label2id={p: i for i, p in enumerate(PACKAGES)},
        pad_token_id=0,
    )
    return BertForSequenceClassification(config)


def teacher_logits(teacher: Any, data: tuple[Any, Any, Any]) -> Any:
    """The teacher's logits for every training example, once: they do not change while the student trains."""
    import torch

    ids, mask, _ = data
    with torch.no_grad():
        parts = [
            teacher(input_ids=ids[i : i + 64], attention_mask=mask[i : i + 64]).logits for i in range(0, len(ids), 64)
        ]
    return torch.cat(parts)


def train(
    name: str, model: Any, data: tuple[Any, Any, Any], steps: int, seed: int, soft: Any = None, batch: int = 32
) -> float:
    """AdamW with linear decay; with the teacher's logits ``soft``, 0.7 KL to its soft labels at T=2
    plus 0.3 CE. Returns the seconds it took."""
    import torch
    import torch.nn.functional as F

    ids, mask, labels = data
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / steps)
    model.train()
    start = time.perf_counter()
    for step in range(steps):
        pick = torch.randint(0, len(labels), (batch,), generator=gen)
        logits = model(input_ids=ids[pick], attention_mask=mask[pick]).logits
        loss = F.cross_entropy(logits, labels[pick])
        if soft is not None:
            t = 2.0
            kd = F.kl_div(
                F.log_softmax(logits / t, -1), F.log_softmax(soft[pick] / t, -1), log_target=True, reduction="batchmean"
            )
            loss = 0.7 * kd * t * t + 0.3 * loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if (step + 1) % 50 == 0:
            print(
                f"{name} step {step + 1}/{steps}: loss {loss.item():.3f}, {time.perf_counter() - start:.0f} s",
                flush=True,
            )
    model.eval()
    return time.perf_counter() - start


def build_models(root: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Train the teacher and the distilled student; save the teacher as a Hugging Face directory and
    the student as an INT8 artifact."""
    from kdistill.trainer.artifact import save_artifact
    from kdistill.trainer.quantization import quantize_ptq_int8
    from kdistill.trainer.tokenizer_build import build_tokenizer

    train_rows, eval_rows = dataset(args.per_class, args.eval_fraction)
    tok = build_tokenizer([t for t, _ in train_rows], args.vocab, root / "tokenizer", model_max_length=MAX_TOKENS)
    train_rows = [(fit(tok, t), y) for t, y in train_rows]
    eval_rows = [(fit(tok, t), y) for t, y in eval_rows]
    data = encode(tok, train_rows)
    teacher = classifier(len(tok), 2, 128, 4, args.seed)
    teacher_s = train("teacher", teacher, data, args.teacher_steps, args.seed)
    teacher_dir = root / "teacher"
    teacher.save_pretrained(teacher_dir)
    tok.save_pretrained(teacher_dir)
    student = classifier(len(tok), 1, args.student_width, 2, args.seed + 1)
    student_s = train("student", student, data, args.student_steps, args.seed + 1, soft=teacher_logits(teacher, data))
    params = {
        "teacher": sum(p.numel() for p in teacher.parameters()),
        "student": sum(p.numel() for p in student.parameters()),
    }
    student_dir = save_artifact(
        quantize_ptq_int8(student),
        tok,
        root / "docstrings" / "student-int8",
        task="sequence-classification",
        quantization="ptq-int8",
        metrics={},
    )
    return {
        "teacher_dir": teacher_dir,
        "student_dir": student_dir,
        "eval": eval_rows,
        "train_examples": len(train_rows),
        "train_seconds": {"teacher": round(teacher_s, 1), "student": round(student_s, 1)},
        "params": params,
    }


def forwarded_items(server: ServerProcess) -> float:
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    m = re.search(r'^kdistill_cascade_items_total\{endpoint="/v1/classify",path="forwarded"\} (\S+)$', text, re.M)
    return float(m.group(1)) if m else 0.0


def measure(server: ServerProcess, rows: list[tuple[str, int]], client: httpx.Client) -> dict[str, Any]:
    """Every eval text as its own request, one at a time: accuracy, latencies, forwarded share."""
    latencies, correct, forwarded, kept_correct = [], 0, 0, 0
    before = forwarded_items(server)
    for text, gold in rows:
        start = time.perf_counter()
        r = client.post(f"{server.url}/v1/classify", json={"texts": [text]})
        latencies.append(time.perf_counter() - start)
        r.raise_for_status()
        result = r.json()["results"][0]
        right = result["label"] == PACKAGES[gold]
        by_teacher = result.get("kdistill", {}).get("answered_by") == "teacher"
        correct += right
        forwarded += by_teacher
        kept_correct += right and not by_teacher
    latencies.sort()
    counted = forwarded_items(server) - before
    return {
        "accuracy": correct / len(rows),
        "p50_ms": 1000 * bench_common.percentile(latencies, 0.5),
        "p99_ms": 1000 * bench_common.percentile(latencies, 0.99),
        "forwarded_share": forwarded / len(rows),
        "forwarded_share_metrics": counted / len(rows),
        # Accuracy of the answers the student kept (all of them for the student alone).
        "kept_accuracy": kept_correct / (len(rows) - forwarded) if forwarded < len(rows) else None,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="kdistill-cascade-") as tmp:
        root = Path(tmp)
        built = build_models(root, args)
        rows = built["eval"]
        common = ("--threads", "1", "--max-wait-ms", "2")
        teacher = ServerProcess(built["teacher_dir"], *common, log_path=root / "teacher.log")
        student = ServerProcess(built["student_dir"], *common, log_path=root / "student.log")
        servers: dict[str, ServerProcess] = {"student": student, "teacher": teacher}
        for t in args.thresholds:
            extra = ("--fallback-url", teacher.url, "--min-confidence", repr(t))
            servers[f"cascade@{t:g}"] = ServerProcess(
                built["student_dir"], *common, *extra, log_path=root / f"cascade-{t:g}.log"
            )
        try:
            for s in servers.values():
                s.wait_ready()
            names = list(servers)
            runs = []
            with httpx.Client(timeout=60) as client:
                for name in names:  # warm-up: connections, the teacher's pool, first-call costs
                    measure(servers[name], rows[: args.warmup], client)
                for i in range(args.runs):
                    order = names[i % len(names) :] + names[: i % len(names)]
                    one: dict[str, Any] = {"order": order, **bench_common.machine_state()}
                    for name in order:
                        one[name] = measure(servers[name], rows, client)
                        print(f"run {i + 1} {name}: {one[name]}", flush=True)
                    runs.append(one)
        finally:
            for s in servers.values():
                s.terminate()

    def med(name: str, key: str) -> float | None:
        values = [r[name][key] for r in runs if r[name][key] is not None]
        return statistics.median(values) if values else None

    keys = ("accuracy", "p50_ms", "p99_ms", "forwarded_share", "forwarded_share_metrics", "kept_accuracy")
    return {
        "command": bench_common.command_line(),
        "task": f"stdlib docstring -> package, {len(PACKAGES)} classes: {', '.join(PACKAGES)}",
        "eval_examples": len(rows),
        "train_examples": built["train_examples"],
        "train_seconds": built["train_seconds"],
        "params": built["params"],
        "models": {
            "teacher": "BERT 2 layers x 128, FP32, Hugging Face directory",
            "student": f"BERT 1 layer x {args.student_width}, distilled from the teacher, PTQ INT8 artifact",
        },
        "thresholds": args.thresholds,
        "requests": "one text per /v1/classify request, one at a time, one keep-alive connection",
        "medians": {name: {k: med(name, k) for k in keys} for name in names},
        "runs": runs,
        **bench_common.machine_state(),
    }


def print_table(report: dict[str, Any]) -> None:
    print(f"\n{report['task']}; {report['eval_examples']} eval texts; medians of {len(report['runs'])} runs")
    print(f"{'variant':<14} {'accuracy':>9} {'p50 ms':>8} {'p99 ms':>8} {'forwarded':>10} {'kept acc.':>10}")
    for name, m in report["medians"].items():
        kept = "-" if m["kept_accuracy"] is None else f"{m['kept_accuracy']:.3f}"
        print(
            f"{name:<14} {m['accuracy']:>9.3f} {m['p50_ms']:>8.1f} {m['p99_ms']:>8.1f} {m['forwarded_share']:>10.3f}"
            f" {kept:>10}"
        )
    print("load average per run:", [r["load_average"] for r in report["runs"]])


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--thresholds", type=float, nargs=2, default=[0.8, 0.9], help="the cascades' --min-confidence")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--warmup", type=int, default=20, help="requests per variant before the runs")
    p.add_argument("--per-class", type=int, default=220, help="docstrings per package")
    p.add_argument("--eval-fraction", type=float, default=0.3)
    p.add_argument("--vocab", type=int, default=1000)
    p.add_argument("--teacher-steps", type=int, default=300)
    p.add_argument("--student-steps", type=int, default=600)
    p.add_argument("--student-width", type=int, default=32, help="the student's hidden size (1 layer)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=bench_common.RESULTS / "cascade.json")
    return p


if __name__ == "__main__":
    bench_common.main(parser(), run, print_table)
