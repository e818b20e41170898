"""Quality at equal teacher cost: plain CE, live logits KD, sequence-level KD and on-policy
distillation of a teacher (the quickstart's, or ``--teacher``) into a 2-layer student, each
given a budget of teacher tokens (the tokens the teacher reads or writes for the student).

Variants (same student shape and init: 2 layers copied from the teacher; batch 16; LR 1e-3):
- ``ce``: hard-label CE on the dataset's text (alpha 0): no teacher signal, 0 teacher tokens;
- ``logits``: live logits KD (forward KL, alpha 0.5, T 2 → 1) for ``--steps`` steps; the
  teacher reads every training token, so its token count is the budget B;
- ``on-policy``: the student samples (lambda 1, beta 0.5, 32 new tokens, top-32 + tail), the
  teacher scores prompt + completion; as many steps as spend B (each step's tokens measured
  from the data: prompts of at most 96 tokens plus 32 new tokens);
- ``on-policy-half``: the same with B/2;
- ``sequence``: the teacher writes one 32-token completion per prompt for as many prompts as
  spend B (prompt read + completion written), then the student trains ``--steps`` steps with CE
  on them.

Analysis variants (``--variants``; ``--merge`` adds them to the results already in the file):
- ``on-policy-short``: on-policy with B, from short prompts (the first ~96 characters of each
  line as its prompt field), so that more of each scored sequence is the student's own text;
  ``on-policy-short-half`` with B/2;
- ``logits+on-policy``: live logits KD for half the steps (half of B), then on-policy with the
  other half.

Reported per variant (medians over ``--seeds``, runs interleaved with the order rotated per
seed): the teacher tokens spent, eval perplexity (teacher-forced on the held-out split) and
two divergences to the teacher: ``kl_own_samples``, KL(student ‖ teacher) per token on the
student's own 32-token continuations of 32 held-out prompts (top-64 + tail buckets, a fixed
sampling seed), and ``kl_eval_text``, KL(teacher ‖ student) per token over the whole
vocabulary on the held-out text. ``start`` is the student before training.

    .venv/bin/python -P benchmarks/kd_methods_quality.py [--steps 60] [--seeds 0,1,2] [--pvc ./pvc]
        [--variants a,b] [--merge] [--teacher quickstart|stronger|DIR]

``--teacher quickstart`` (the default) is the quickstart teacher (``make quickstart``); it is
trained here (``--teacher-steps``, 300 as the quickstart does) when ``--pvc`` has none.
``--teacher stronger`` is the teacher of benchmarks/stronger_teacher.py (same shape and
tokenizer, trained longer on more text: lower eval perplexity on the same held-out lines),
built with its default recipe when ``PVC/models/stronger-teacher`` is missing; its results go
to ``kd_methods_quality_stronger.json`` unless ``--out`` says otherwise. A directory is any
causal-LM teacher with the quickstart tokenizer and a ``pretrain-report.json`` that names its
``eval_perplexity``. The student, data and held-out measurements are the same for all.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_common import command_line, machine_state, write_report  # noqa: E402

RESULT = ROOT / "benchmarks" / "results" / "kd_methods_quality.json"
RESULT_STRONGER = ROOT / "benchmarks" / "results" / "kd_methods_quality_stronger.json"
VARIANTS = ("ce", "logits", "on-policy", "on-policy-half", "sequence")
ANALYSIS = ("on-policy-short", "on-policy-short-half", "logits+on-policy")
SHORT_PROMPT_CHARS = 96
BATCH = 16
MAX_LEN = 128
NEW_TOKENS = 32
HELD_OUT_PROMPTS = 32
KL_TOP_K = 64


def base_job(name: str, teacher: Path, train: Path, evaluation: Path, seed: int) -> dict[str, Any]:
    return {
        "apiVersion": "kdistill.io/v1alpha1",
        "kind": "DistillationJob",
        "metadata": {"name": name},
        "spec": {
            "task": "causal-lm",
            "teacher": {"model": str(teacher), "dtype": "float32"},
            "student": {"fromTeacher": {"numLayers": 2}},
            "data": {"train": str(train), "eval": str(evaluation), "maxSeqLength": MAX_LEN},
            "distillation": {
                "loss": "forward-kl",
                "alpha": 0.5,
                "temperature": {"schedule": "linear", "start": 2.0, "end": 1.0},
                "stages": [],
                "batchSize": BATCH,
                "learningRate": 1e-3,
                "warmupSteps": 5,
                "seed": seed,
                "onPolicy": {"lambda": 1.0, "beta": 0.5, "maxNewTokens": NEW_TOKENS, "topK": 32},
                "generation": {"samplesPerPrompt": 1, "maxNewTokens": NEW_TOKENS, "temperature": 1.0, "topP": 1.0},
            },
            "quantization": {"mode": "none"},
            "parallelism": {"nodes": 1, "gpusPerNode": 0},
            "checkpoint": {"everySteps": 1_000_000, "keep": 1},
            "serving": {"enabled": False},
        },
    }


def with_stage(job: dict[str, Any], objective: str, steps: int, alpha: float | None = None) -> dict[str, Any]:
    d = job["spec"]["distillation"]
    d["stages"] = [{"name": objective, "steps": max(steps, 1), "objectives": [objective]}]
    if alpha is not None:
        d["alpha"] = alpha
    return job


class Measure:
    """The held-out measurements, with the teacher loaded once."""

    def __init__(self, teacher_dir: Path, evaluation: Path) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from kdistill.trainer.data import read_jsonl, tokenize_examples
        from kdistill.trainer.local_teacher import LocalTeacher
        from kdistill.trainer.on_policy import read_prompted, right_padded, tokenize_prompted

        self.tok = AutoTokenizer.from_pretrained(str(teacher_dir))
        self.teacher = AutoModelForCausalLM.from_pretrained(str(teacher_dir), use_safetensors=True).eval()
        self.service = LocalTeacher(self.teacher, self.tok)
        records = read_prompted(evaluation, prompt_field="prompt", text_field="text", max_bad_fraction=0.0)
        examples = tokenize_prompted(records, self.tok, MAX_LEN)
        cap = MAX_LEN - NEW_TOKENS
        self.prompts = [e.input_ids[: min(e.prompt_tokens, cap)] for e in examples[:HELD_OUT_PROMPTS]]
        # The held-out text as the trainer's eval reads it.
        rows = read_jsonl(evaluation, text_field="text", label_field=None, label_to_id=None, max_bad_fraction=0.0)
        self.texts = [e.input_ids for e in tokenize_examples(rows, self.tok, MAX_LEN)]
        self.batches = []
        for start in range(0, len(self.texts), 16):
            ids, mask = right_padded(self.texts[start : start + 16], self.tok.pad_token_id)
            self.batches.append({"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)})

    def perplexity(self, student: Any) -> float:
        import torch

        from kdistill.trainer.evaluate import evaluate

        return evaluate(student, self.batches, "causal-lm", torch.device("cpu")).value

    def all(self, student: Any) -> dict[str, float]:
        return {
            "eval_perplexity": self.perplexity(student),
            "kl_own_samples": self.kl_own_samples(student),
            "kl_eval_text": self.kl_eval_text(student),
        }

    def kl_own_samples(self, student: Any) -> float:
        from kdistill.trainer.on_policy_eval import held_out_divergence

        return held_out_divergence(
            student,
            self.service,
            self.prompts,
            max_new_tokens=NEW_TOKENS,
            temperature=1.0,
            top_k=KL_TOP_K,
            beta=1.0,
            eos_id=self.tok.eos_token_id,
            pad_id=self.tok.pad_token_id,
            seed=1234,
        )["divergence"]

    def kl_eval_text(self, student: Any) -> float:
        import torch

        from kdistill.trainer.losses import kd_divergence

        total, rows = 0.0, 0
        was = student.training
        student.eval()
        with torch.no_grad():
            for batch in self.batches:
                ids, mask = batch["input_ids"], batch["attention_mask"]
                valid = mask[:, 1:].bool()
                s = student(input_ids=ids, attention_mask=mask).logits[:, :-1][valid]
                t = self.teacher(input_ids=ids, attention_mask=mask).logits[:, :-1][valid]
                total += float(kd_divergence(s.float(), t.float(), "forward-kl", 1.0).sum())
                rows += int(valid.sum())
        student.train(was)
        return total / rows


def sequence_tokens(generated: Path, tok: Any) -> int:
    """Tokens the teacher read (prompts) and wrote (completions) for a generated set."""
    from kdistill.trainer.generated_set import iter_records

    return sum(
        len(tok(r["prompt"])["input_ids"]) + len(tok(r["completion"])["input_ids"]) for r in iter_records(generated)
    )


def prompt_subset(train: Path, out: Path, budget: int, tok: Any) -> Path:
    """The first lines of ``train`` whose prompts plus a full completion fit the budget."""
    from kdistill.trainer.prompts import prompt_of

    lines = train.read_text().splitlines()
    kept, spent = [], 0
    for line in lines:
        prompt = prompt_of(json.loads(line), "prompt", "text")
        if prompt is None:
            continue
        cost = min(len(tok(prompt)["input_ids"]), MAX_LEN - 1) + NEW_TOKENS
        if spent + cost > budget:
            break
        kept.append(line)
        spent += cost
    out.write_text("\n".join(kept) + "\n")
    return out


def short_prompts(train: Path, out: Path) -> Path:
    """Each line's first ~SHORT_PROMPT_CHARS characters (cut at a space) as its prompt field."""
    rows = []
    for line in train.read_text().splitlines():
        text = json.loads(line)["text"].strip()
        spaces = [i for i, c in enumerate(text) if c.isspace() and 0 < i <= SHORT_PROMPT_CHARS]
        cut = spaces[-1] if spaces else min(len(text), SHORT_PROMPT_CHARS)
        rows.append(json.dumps({"prompt": text[:cut], "text": text[cut:]}))
    out.write_text("\n".join(rows) + "\n")
    return out


def on_policy_tokens_per_step(train: Path, tok: Any) -> float:
    """Mean tokens the teacher scores per on-policy step: the capped prompt plus the new tokens."""
    from kdistill.trainer.on_policy import read_prompted, tokenize_prompted

    records = read_prompted(train, prompt_field="prompt", text_field="text", max_bad_fraction=0.0)
    examples = tokenize_prompted(records, tok, MAX_LEN)
    cap = max(MAX_LEN // 2, MAX_LEN - NEW_TOKENS)
    return BATCH * (statistics.fmean(min(e.prompt_tokens, cap) for e in examples) + NEW_TOKENS)


def run_variant(spec: dict[str, Any], work: Path, measure: Measure) -> dict[str, Any]:
    from kdistill.api import parse_job
    from kdistill.trainer.loop import RunOptions, Trainer
    from kdistill.trainer.outputs import OutputLayout

    out = work / spec["metadata"]["name"]
    steps: list[Any] = []
    trainer = Trainer(
        parse_job(spec), RunOptions(output=OutputLayout(out), base_dir=work, evaluate=True, on_step=steps.append)
    )
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    result: dict[str, Any] = {
        "steps": trainer.total,
        "tokens_seen": trainer.tokens_seen,
        **measure.all(trainer.student),
        "train_seconds": round(seconds, 1),
        "load_average": list(os.getloadavg()),
    }
    lengths = [s.parts["completion_length"] for s in steps if "completion_length" in s.parts]
    if lengths:
        result["mean_sampled_length"] = statistics.fmean(lengths)
    if (out / "generated").is_dir():
        result["generated"] = str(out / "generated")
    return result


def start_point(teacher: Path, train: Path, evaluation: Path, measure: Measure) -> dict[str, float]:
    """The measurements of the student every variant starts from (layers copied, no training)."""
    from kdistill.api import parse_job
    from kdistill.trainer.models import load_models

    job = with_stage(base_job("start", teacher, train, evaluation, 0), "logits", 1)
    return measure.all(load_models(parse_job(job).spec, teacher.parent).student)


def as_list(value: Any) -> list[Any]:
    """An earlier invocation's machine state(s), as a list (none: empty)."""
    if value is None:
        return []
    return list(value) if isinstance(value, list) else [value]


def median_of(runs: list[dict[str, Any]], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def teacher_dir(choice: str, pvc: Path) -> Path:
    """The teacher's directory for ``--teacher``; the stronger teacher is built when missing."""
    if choice == "quickstart":
        return pvc / "models" / "quickstart-teacher"
    if choice == "stronger":
        from stronger_teacher import NAME, StrongerConfig, build

        path = pvc / "models" / NAME
        if not (path / "pretrain-report.json").is_file():
            build(pvc, StrongerConfig())
        return path
    path = Path(choice)
    if not (path / "pretrain-report.json").is_file():
        raise SystemExit(f"--teacher {choice}: not quickstart, stronger, or a directory with pretrain-report.json")
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=60, help="steps of logits KD (it sets the budget) and of CE")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--pvc", type=Path, default=ROOT / "pvc")
    p.add_argument("--teacher-steps", type=int, default=300, help="steps of the teacher trained when --pvc has none")
    p.add_argument("--out", type=Path, default=None, help="default: kd_methods_quality[_stronger].json")
    p.add_argument("--teacher", default="quickstart", help="quickstart, stronger, or a teacher directory")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"of {', '.join(VARIANTS + ANALYSIS)}")
    p.add_argument("--merge", action="store_true", help="keep the other variants' runs already in --out")
    args = p.parse_args()
    if args.out is None:
        args.out = RESULT_STRONGER if args.teacher == "stronger" else RESULT
    variants = tuple(args.variants.split(","))
    if unknown := set(variants) - set(VARIANTS + ANALYSIS):
        raise SystemExit(f"unknown variants {sorted(unknown)}")
    previous = json.loads(args.out.read_text()) if args.merge and args.out.is_file() else {}
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch
    from transformers.utils import logging as hf_logging

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    quickstart = args.pvc / "models" / "quickstart-teacher"
    data = args.pvc / "data"
    if not (quickstart / "model.safetensors").is_file() or not (data / "pydoc-eval.jsonl").is_file():
        from kdistill.trainer.teacher_pretrain import PretrainConfig, pretrain

        pretrain(args.pvc, PretrainConfig(steps=args.teacher_steps))
    teacher = teacher_dir(args.teacher, args.pvc)
    if previous and previous.get("teacher", {}).get("name", "quickstart") != args.teacher:
        raise SystemExit(f"--merge: {args.out} was measured with another --teacher")
    train, evaluation = data / "pydoc-train.jsonl", data / "pydoc-eval.jsonl"
    seeds = [int(s) for s in args.seeds.split(",")]
    state_before = machine_state()
    measure = Measure(teacher, evaluation)
    teacher_ppl = json.loads((teacher / "pretrain-report.json").read_text())["eval_perplexity"]
    per_step = on_policy_tokens_per_step(train, measure.tok)
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
    if previous and previous.get("config", {}).get("steps") != args.steps:
        raise SystemExit(f"--merge: {args.out} was measured with other --steps")
    known_budget = previous.get("medians", {}).get("logits", {}).get("teacher_tokens")
    with tempfile.TemporaryDirectory(prefix="kdistill-methods-") as tmp:
        work = Path(tmp)
        short = short_prompts(train, work / "short-prompts.jsonl")
        per_step_short = on_policy_tokens_per_step(short, measure.tok)
        start = previous.get("start") or start_point(teacher, train, evaluation, measure)
        print(json.dumps({"variant": "start", **start}), flush=True)
        for n, seed in enumerate(seeds):
            order = variants[n % len(variants) :] + variants[: n % len(variants)]
            # The budget: what live logits KD spends in --steps steps (measured when it runs; the
            # first seed's order may put it later, so it is run first whenever it is unknown).
            if "logits" in variants and not runs["logits"] and known_budget is None:
                order = ("logits", *[v for v in order if v != "logits"])
            for variant in order:
                name = f"{variant.replace('+', '-then-')}-s{seed}"
                base = base_job(name, teacher, train, evaluation, seed)
                budget = runs["logits"][0]["teacher_tokens"] if runs.get("logits") else known_budget
                if variant == "ce":
                    spec = with_stage(base, "logits", args.steps, alpha=0.0)
                elif variant == "logits":
                    spec = with_stage(base, "logits", args.steps)
                elif variant in ("on-policy", "on-policy-half"):
                    assert budget is not None
                    share = 0.5 if variant == "on-policy-half" else 1.0
                    spec = with_stage(base, "on-policy", round(share * budget / per_step))
                elif variant in ("on-policy-short", "on-policy-short-half"):
                    assert budget is not None
                    share = 0.5 if variant == "on-policy-short-half" else 1.0
                    spec = with_stage(base, "on-policy", round(share * budget / per_step_short))
                    spec["spec"]["data"]["train"] = str(short)
                elif variant == "logits+on-policy":
                    assert budget is not None
                    spec = base
                    spec["spec"]["distillation"]["stages"] = [
                        {"name": "logits", "steps": args.steps // 2, "objectives": ["logits"]},
                        {"name": "on-policy", "steps": round(0.5 * budget / per_step), "objectives": ["on-policy"]},
                    ]
                else:
                    assert budget is not None
                    subset = prompt_subset(train, work / f"prompts-s{seed}.jsonl", budget, measure.tok)
                    spec = with_stage(base, "sequence", args.steps)
                    spec["spec"]["data"]["train"] = str(subset)
                result = run_variant(spec, work, measure)
                if variant == "ce":
                    result["teacher_tokens"] = 0
                elif variant == "sequence":
                    result["teacher_tokens"] = sequence_tokens(Path(result.pop("generated")), measure.tok)
                else:
                    result["teacher_tokens"] = result["tokens_seen"]
                result["seed"] = seed
                runs[variant].append(result)
                print(json.dumps({"variant": variant, **result}), flush=True)
    if previous:
        runs = {**{v: r for v, r in previous.get("runs", {}).items() if v not in runs}, **runs}
    medians = {
        v: {
            k: median_of(rs, k)
            for k in ("teacher_tokens", "steps", "eval_perplexity", "kl_own_samples", "kl_eval_text", "train_seconds")
        }
        for v, rs in runs.items()
        if rs
    }
    logits_ppl = medians["logits"]["eval_perplexity"]
    report = {
        "benchmark": "kd_methods_quality",
        "command": command_line(),
        # With --merge: the invocations whose runs this file also holds.
        "earlier_commands": [*previous.get("earlier_commands", []), previous["command"]] if previous else [],
        "config": {
            "steps": args.steps,
            "seeds": seeds,
            "batch": BATCH,
            "max_len": MAX_LEN,
            "new_tokens": NEW_TOKENS,
            "held_out_prompts": HELD_OUT_PROMPTS,
            "kl_top_k": KL_TOP_K,
            "student_layers": 2,
            "on_policy_tokens_per_step": per_step,
            "on_policy_short_tokens_per_step": per_step_short,
            "omp_threads": os.environ["OMP_NUM_THREADS"],
        },
        "machine_before": [*as_list(previous.get("machine_before")), state_before],
        "machine_after": [*as_list(previous.get("machine_after")), machine_state()],
        "teacher": {
            "name": args.teacher,
            "path": str(teacher.relative_to(ROOT)) if teacher.is_relative_to(ROOT) else str(teacher),
            "eval_perplexity": teacher_ppl,
            # The same held-out lines, the same tokenizer: the two teachers compare directly.
            "quickstart_eval_perplexity": json.loads((quickstart / "pretrain-report.json").read_text())[
                "eval_perplexity"
            ],
        },
        "start": start,
        "medians": medians,
        "runs": runs,
        # The target: on-policy with at most half the teacher tokens reaches live logits
        # KD's eval quality.
        "on_policy_half_reaches_logits": {
            v: medians[v]["eval_perplexity"] <= logits_ppl
            for v in ("on-policy-half", "on-policy-short-half")
            if v in medians
        },
    }
    write_report(report, args.out)
    print(f"\n{'variant':<16}{'teacher tok':>12}{'steps':>7}{'eval ppl':>10}{'KL own':>9}{'KL text':>9}")
    print(
        f"{'start':<16}{0:>12}{0:>7}{start['eval_perplexity']:>10.1f}{start['kl_own_samples']:>9.4f}{start['kl_eval_text']:>9.4f}"
    )
    for v, m in medians.items():
        print(
            f"{v:<16}{m['teacher_tokens']:>12.0f}{m['steps']:>7.0f}{m['eval_perplexity']:>10.1f}"
            f"{m['kl_own_samples']:>9.4f}{m['kl_eval_text']:>9.4f}"
        )
    print(f"teacher eval perplexity {teacher_ppl:.1f}; wrote {args.out}")


if __name__ == "__main__":
    main()
