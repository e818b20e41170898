"""Warm start in continuous distillation: training steps for a new round's student to reach the
champion's quality, starting from the served (promoted) student's full-precision weights
(``warmStart: lastPromoted``) against starting from the teacher's layers (the template's
``student.fromTeacher``, ``warmStart: none``).

Per seed:

1. ``--champion-rounds`` + 1 rounds of examples/schedule.yaml (its gate, replay 0.2 and warm
   start; the quickstart teacher; ``--steps`` steps per round) run with
   ``cli/schedule_local.run_rounds`` over the drifting pydoc corpus (trainer/drift_corpus.py) of
   that many partitions. The last round's job (``job.yaml``: its data, planned and written by
   the library, and ``student.model``, the champion's full-precision student) is the round
   measured here; the champion is the student promoted before it.
2. **The champion's quality** is its retention (student quality over teacher quality, quality
   being 1 / perplexity) on the newest eval data of the round that trained it, in full
   precision (its result.json), the figure the gate's ``minRetention`` reads. The quality
   levels of different partitions are comparable only relative to the teacher, and a new
   round starts from the champion itself, so "as good as the champion on the new data" would be
   met at step 0 by construction: the bar is to do as well, relative to the teacher, on the new
   partition as the champion did on its own.
3. The last round's job is trained twice with the library's trainer (``trainer.loop.Trainer``),
   each for ``--max-steps`` steps (the same learning-rate schedule): from the champion's
   weights (``warm``) and from the teacher's layers (``cold``), in an order rotated per seed.
   Every ``--eval-every`` steps (and before the first) the student in training is scored in
   full precision on the round's newest eval data; **steps to the champion's quality** is the
   first such step at which its retention reaches the champion's. A run that never reaches it
   counts as ``--max-steps`` + ``--eval-every`` (reported as not reached).

Reported: medians over ``--seeds`` and the ratio of the cold start's median steps to the warm
start's (target: >= 2). Each seed seeds the replay draw and the training.

    .venv/bin/python -P benchmarks/warm_start.py [--champion-rounds 3] [--steps 120]
        [--max-steps 240] [--eval-every 10] [--seeds 0,1,2] [--pvc ./pvc] [--out FILE]

Needs the quickstart teacher in ``--pvc`` (``make quickstart``); trained here when missing.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_common import command_line, machine_state, write_report  # noqa: E402
from continuous_forgetting import ensure_teacher, schedule_for  # noqa: E402

RESULT = ROOT / "benchmarks" / "results" / "continuous_warm_start.json"
VARIANTS = ("warm", "cold")


def train_curve(
    job: dict[str, Any], work: Path, name: str, max_steps: int, eval_every: int, target: float
) -> dict[str, Any]:
    """Train `job` for `max_steps` steps, scoring the student every `eval_every` steps."""
    import torch

    from kdistill.api import parse_job
    from kdistill.trainer.evaluate import evaluate
    from kdistill.trainer.loop import RunOptions, Trainer
    from kdistill.trainer.outputs import OutputLayout

    job = json.loads(json.dumps(job))
    job["metadata"] = {"name": name}
    distillation = job["spec"]["distillation"]
    distillation["stages"] = [{**distillation["stages"][0], "steps": max_steps}]
    job["spec"]["checkpoint"] = {"everySteps": max_steps, "keep": 1}
    curve: list[dict[str, float]] = []
    holder: dict[str, Any] = {}

    def score(step: int) -> None:
        trainer = holder["trainer"]
        device = torch.device("cpu")
        batches = holder.setdefault("batches", trainer.eval_batches())
        if "teacher" not in holder:
            holder["teacher"] = evaluate(trainer.teacher, batches, "causal-lm", device).value
        ppl = evaluate(trainer.student, batches, "causal-lm", device).value
        curve.append({"step": step, "perplexity": ppl, "retention": holder["teacher"] / ppl})

    def on_step(report: Any) -> None:
        if report.step % eval_every == 0 or report.step == max_steps:
            score(report.step)

    started = time.perf_counter()
    trainer = Trainer(
        parse_job(job), RunOptions(output=OutputLayout(work / name), base_dir=work, evaluate=False, on_step=on_step)
    )
    holder["trainer"] = trainer
    score(0)
    trainer.train()
    trainer.close()
    reached = next((p["step"] for p in curve if p["retention"] >= target), None)
    return {
        "steps_to_target": reached if reached is not None else max_steps + eval_every,
        "reached": reached is not None,
        "start_retention": curve[0]["retention"],
        "final_retention": curve[-1]["retention"],
        "final_perplexity": curve[-1]["perplexity"],
        "teacher_perplexity": holder["teacher"],
        "seconds": round(time.perf_counter() - started, 1),
        "load_average": list(os.getloadavg()),
        "curve": curve,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--champion-rounds", type=int, default=3, help="rounds before the measured one")
    p.add_argument("--steps", type=int, default=120, help="training steps per round (the example's)")
    p.add_argument("--max-steps", type=int, default=240, help="steps of each measured run")
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--pvc", type=Path, default=ROOT / "pvc")
    p.add_argument("--out", type=Path, default=RESULT)
    args = p.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch
    from transformers.utils import logging as hf_logging

    from kdistill.api.schedule import DistillationScheduleStatus
    from kdistill.cli.schedule_local import run_rounds
    from kdistill.trainer.drift_corpus import build_drift_partitions

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    state_before = machine_state()
    teacher = ensure_teacher(args.pvc)
    rounds = args.champion_rounds + 1
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in VARIANTS}
    champions: list[dict[str, Any]] = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="kdistill-warm-start-") as tmp:
        work = Path(tmp)
        partitions = work / "partitions"
        build_drift_partitions(partitions, rounds)
        for n, seed in enumerate(seeds):
            name = f"warm-s{seed}"
            raw_schedule = yaml.safe_load((ROOT / "examples" / "schedule.yaml").read_text())["spec"]
            schedule = schedule_for(
                name,
                teacher,
                partitions,
                fraction=raw_schedule["data"]["replay"]["fraction"],
                replay_partitions=raw_schedule["data"]["replay"]["partitions"],
                steps=args.steps,
                seed=seed,
            )
            out = work / name
            status: DistillationScheduleStatus = run_rounds(schedule, partitions, rounds, out, lambda line: None, ROOT)
            last = status.history[-1]
            job = yaml.safe_load((out / last.job / "job.yaml").read_text())
            student_model = job["spec"]["student"].get("model")
            if not student_model:
                raise SystemExit(f"{last.job}: no champion to start from: {[e.reason for e in status.history]}")
            champion_out = Path(student_model).parent
            champion_result = json.loads((champion_out / "result.json").read_text())
            target = float(champion_result["fullPrecision"]["retention"])
            champion = {
                "seed": seed,
                "champion": champion_out.name,
                "retention_full_precision": target,
                "retention_served": next(e.retention for e in status.history if e.job == champion_out.name),
                "history": [e.model_dump(mode="json") for e in status.history],
            }
            champions.append(champion)
            print(json.dumps({k: v for k, v in champion.items() if k != "history"}), flush=True)
            job["spec"]["data"].pop("runData", None)  # the round's data is written; train on it as it is
            cold = json.loads(json.dumps(job))
            cold["spec"]["student"] = schedule.spec.job_template.spec.student.model_dump(
                by_alias=True, mode="json", exclude_none=True
            )
            order = VARIANTS[n % 2 :] + VARIANTS[: n % 2]
            for variant in order:
                spec = job if variant == "warm" else cold
                result = train_curve(spec, work, f"{variant}-s{seed}", args.max_steps, args.eval_every, target)
                result["seed"] = seed
                result["target_retention"] = target
                runs[variant].append(result)
                print(json.dumps({"variant": variant, **{k: v for k, v in result.items() if k != "curve"}}), flush=True)
    medians = {
        v: {
            k: statistics.median(r[k] for r in rs)
            for k in ("steps_to_target", "start_retention", "final_retention", "final_perplexity", "seconds")
        }
        for v, rs in runs.items()
    }
    for v, rs in runs.items():
        medians[v]["reached"] = sum(r["reached"] for r in rs)
    warm_steps = medians["warm"]["steps_to_target"]
    ratio = medians["cold"]["steps_to_target"] / warm_steps if warm_steps else math.inf
    report = {
        "benchmark": "continuous_warm_start",
        "command": command_line(),
        "machine_before": state_before,
        "machine_after": machine_state(),
        "seconds": round(time.perf_counter() - started, 1),
        "torch_threads": torch.get_num_threads(),
        "config": {
            "champion_rounds": args.champion_rounds,
            "steps_per_round": args.steps,
            "max_steps": args.max_steps,
            "eval_every": args.eval_every,
            "seeds": seeds,
            "template": "examples/schedule.yaml",
            "corpus": f"trainer/drift_corpus.build_drift_partitions(partitions={rounds})",
        },
        "definitions": {
            "target_retention": "the champion's full-precision retention (teacher perplexity / student perplexity) "
            "on the newest eval data of the round that trained it",
            "steps_to_target": "first scored step (every eval_every) whose retention on the measured round's newest "
            "eval data reaches target_retention; max_steps + eval_every when never",
            "speedup": "median steps_to_target cold / median steps_to_target warm",
        },
        "champions": champions,
        "medians": medians,
        "speedup": ratio,
        "target": {"rule": "speedup >= 2 (medians)", "met": ratio >= 2.0},
        "runs": runs,
    }
    write_report(report, args.out)
    print(f"{'start':>5}  {'steps to target':>15}  {'reached':>7}  {'start ret':>9}  {'final ret':>9}  {'seconds':>7}")
    for v, m in medians.items():
        print(
            f"{v:>5}  {m['steps_to_target']:>15.0f}  {m['reached']:>4}/{len(seeds)}  {m['start_retention']:>9.4f}  "
            f"{m['final_retention']:>9.4f}  {m['seconds']:>7.1f}"
        )
    print(f"speedup (cold / warm steps): {ratio:.2f}")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
