"""Forgetting against replay in continuous distillation: a DistillationSchedule's rounds over the
drifting pydoc corpus (trainer/drift_corpus.py), with replay fractions 0, 0.1, 0.2 and 0.3.

Each variant is ``--rounds`` rounds of ``kdistill schedule run``'s logic
(``cli/schedule_local.run_rounds``: replay planning, ``kdistill run`` per round, warmStart
lastPromoted, the gate) over a corpus of exactly ``--rounds`` partitions, so round 1 trains on
the first partition alone and every later round on the next partition plus replay drawn from
all the partitions before it (``replay.partitions`` = rounds - 1). The job template is
examples/schedule.yaml's (the quickstart teacher, a 2-layer student, batch 16, LR 1e-3) with
``--steps`` steps per round; the gate is opened (minRetention 0.01, mustBeatServing false,
maxForgetting 1) so that every round is promoted and the served student after the last round
is the last round's student: the gate would otherwise refuse forgetful rounds and keep an older
student, which hides forgetting rather than measuring it.

Measured per run, on the FIRST partition's eval data (its eval.jsonl, never trained on): the
served (INT8) student's mean token loss (ln perplexity of its student-int8/ artifact,
trainer/model_scoring.score_artifact) after every round. **Forgetting** is the loss after the
last round minus the loss after round 1, in nats per token. The cost of each variant: the
training steps, the examples drawn (steps x batch), the lines in the rounds' training sets
(fresh + replay) and the wall time of all rounds (each round: the data, ``kdistill run`` with
its INT8 export, the scoring). Also recorded: the last round's perplexity on the newest data
(what replay costs the fresh data at equal steps) and each round's gate decision.

Steps per round are the template's, the same for every fraction: replay replaces fresh examples
in each batch rather than adding steps, so it costs 0% more steps and examples; the results
file shows the counts so that this is checked, not assumed.

Variants run interleaved (the order rotated per seed); each seed seeds both the replay draw
(``data.seed``) and the training (``distillation.seed``). Reported: medians over ``--seeds``,
and each fraction's reduction of forgetting against replay 0
(1 - median forgetting / median forgetting at 0). Target: replay 0.2 cuts it by at least half
at <= 25% more steps.

    .venv/bin/python -P benchmarks/continuous_forgetting.py [--rounds 4] [--steps 120]
        [--fractions 0,0.1,0.2,0.3] [--seeds 0,1,2] [--pvc ./pvc] [--out FILE]

Needs the quickstart teacher in ``--pvc`` (``make quickstart``); it is trained here (300 steps,
as the quickstart does) when missing.
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

RESULT = ROOT / "benchmarks" / "results" / "continuous_forgetting.json"
FRACTIONS = (0.0, 0.1, 0.2, 0.3)
OPEN_GATE = {"minRetention": 0.01, "mustBeatServing": False, "tolerance": 0.0, "maxForgetting": 1.0}


def ensure_teacher(pvc: Path) -> Path:
    """The quickstart teacher under ``pvc``, trained as ``make quickstart`` does when missing."""
    teacher = pvc / "models" / "quickstart-teacher"
    if not (teacher / "model.safetensors").is_file():
        from kdistill.trainer.teacher_pretrain import PretrainConfig, pretrain

        pretrain(pvc, PretrainConfig(steps=300))
    return teacher


def schedule_for(
    name: str,
    teacher: Path,
    partitions: Path,
    *,
    fraction: float,
    replay_partitions: int,
    steps: int,
    seed: int,
    gate: dict[str, Any] | None = None,
) -> Any:
    """examples/schedule.yaml with the benchmark's teacher, partitions, replay, steps and seed."""
    from kdistill.api.schedule import parse_schedule

    raw = yaml.safe_load((ROOT / "examples" / "schedule.yaml").read_text())
    raw["metadata"]["name"] = name
    spec = raw["spec"]
    spec["data"] = {
        "partitions": str(partitions),
        "window": 1,
        "replay": {"fraction": fraction, "partitions": replay_partitions},
        "seed": seed,
    }
    if gate is not None:
        spec["promotion"]["gate"] = gate
    job = spec["jobTemplate"]["spec"]
    job["teacher"]["model"] = str(teacher)
    job["distillation"]["seed"] = seed
    for stage in job["distillation"]["stages"]:
        stage["steps"] = steps
    job["checkpoint"] = {"everySteps": steps, "keep": 1}
    return parse_schedule(raw, "benchmark")


def run_variant(
    teacher: Path, partitions: Path, work: Path, *, fraction: float, rounds: int, steps: int, seed: int
) -> dict[str, Any]:
    from kdistill.api.metadata import STUDENT_INT8_DIR
    from kdistill.cli.schedule_local import run_rounds
    from kdistill.trainer.model_scoring import score_artifact

    name = f"replay{round(fraction * 100):02d}-s{seed}"
    schedule = schedule_for(
        name,
        teacher,
        partitions,
        fraction=fraction,
        replay_partitions=rounds - 1,
        steps=steps,
        seed=seed,
        gate=OPEN_GATE,
    )
    out = work / name
    load_before = list(os.getloadavg())
    started = time.perf_counter()
    status = run_rounds(schedule, partitions, rounds, out, lambda line: None, ROOT)
    wall = time.perf_counter() - started
    first = min(p.name for p in partitions.iterdir() if p.is_dir())
    first_eval = partitions / first / "eval.jsonl"
    data = schedule.spec.job_template.spec.data
    per_round: list[dict[str, Any]] = []
    for i, entry in enumerate(status.history, start=1):
        run_out = out / entry.job
        if not entry.promoted:
            raise SystemExit(f"{entry.job}: {entry.reason}")
        plan = json.loads((run_out / "data" / "plan.json").read_text())
        result = json.loads((run_out / "result.json").read_text())
        replayed = sum(len(lines) for lines in plan["replay"].values())
        ppl = score_artifact(
            run_out / STUDENT_INT8_DIR, first_eval, text_field=data.text_field, max_seq_length=data.max_seq_length
        ).value
        per_round.append(
            {
                "round": i,
                "fresh": plan["fresh"],
                "fresh_examples": plan["fresh_examples"],
                "replay_examples": replayed,
                "replay_from_first": len(plan["replay"].get(first, [])),
                "train_lines": plan["fresh_examples"] + replayed,
                "steps": int(result["steps"]),
                "tokens_seen": int(result["tokensSeen"]),
                "train_seconds": float(result["trainSeconds"]),
                "first_partition_perplexity": ppl,
                "first_partition_loss": math.log(ppl),
                "newest_perplexity": entry.challenger_metric,
                "retention": entry.retention,
                "gate_forgetting": entry.forgetting,
                "reason": entry.reason,
            }
        )
    batch = schedule.spec.job_template.spec.distillation.batch_size
    total_steps = sum(r["steps"] for r in per_round)
    return {
        "fraction": fraction,
        "seed": seed,
        "rounds": per_round,
        "loss_after_first": per_round[0]["first_partition_loss"],
        "loss_after_last": per_round[-1]["first_partition_loss"],
        "forgetting": per_round[-1]["first_partition_loss"] - per_round[0]["first_partition_loss"],
        "peak_forgetting": max(r["first_partition_loss"] for r in per_round[1:]) - per_round[0]["first_partition_loss"],
        "last_newest_perplexity": per_round[-1]["newest_perplexity"],
        "steps": total_steps,
        "examples_drawn": total_steps * batch,
        "train_lines": sum(r["train_lines"] for r in per_round),
        "tokens_seen": sum(r["tokens_seen"] for r in per_round),
        "train_seconds": round(sum(r["train_seconds"] for r in per_round), 1),
        "wall_seconds": round(wall, 1),
        "load_average_before": load_before,
        "load_average_after": list(os.getloadavg()),
    }


def summarize(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    keys = (
        "forgetting",
        "peak_forgetting",
        "loss_after_first",
        "loss_after_last",
        "last_newest_perplexity",
        "steps",
        "examples_drawn",
        "train_lines",
        "tokens_seen",
        "train_seconds",
        "wall_seconds",
    )
    medians = {f: {k: statistics.median(r[k] for r in rs) for k in keys} for f, rs in runs.items()}
    base = medians.get("0.0")
    if base is not None:
        for m in medians.values():
            # Without forgetting at replay 0 (median <= 0) there is nothing for replay to cut: no ratio.
            for key in ("forgetting", "peak_forgetting"):
                m[f"{key}_reduction"] = 1.0 - m[key] / base[key] if base[key] > 0 else None
            m["extra_steps"] = m["steps"] / base["steps"] - 1.0
            m["extra_wall_time"] = m["wall_seconds"] / base["wall_seconds"] - 1.0
    return medians


def target(medians: dict[str, Any]) -> dict[str, Any] | None:
    m = medians.get("0.2")
    if m is None or "forgetting_reduction" not in m or m["forgetting_reduction"] is None:
        return None
    return {
        "rule": "replay 0.2: forgetting_reduction >= 0.5 and extra_steps <= 0.25 (medians)",
        "forgetting_reduction": m["forgetting_reduction"],
        "extra_steps": m["extra_steps"],
        "met": m["forgetting_reduction"] >= 0.5 and m["extra_steps"] <= 0.25,
    }


def print_table(report: dict[str, Any]) -> None:
    print(
        f"{'replay':>6}  {'forgetting':>10}  {'reduction':>9}  {'peak':>7}  {'loss r1':>7}  {'loss last':>9}  "
        f"{'new ppl':>7}  {'steps':>5}  {'lines':>5}  {'wall s':>6}"
    )
    for f, m in report["medians"].items():
        red = m.get("forgetting_reduction")
        print(
            f"{float(f):>6.1f}  {m['forgetting']:>10.4f}  {'-' if red is None else f'{red:.1%}':>9}  "
            f"{m['peak_forgetting']:>7.4f}  "
            f"{m['loss_after_first']:>7.4f}  {m['loss_after_last']:>9.4f}  {m['last_newest_perplexity']:>7.2f}  "
            f"{m['steps']:>5.0f}  {m['train_lines']:>5.0f}  {m['wall_seconds']:>6.1f}"
        )
    if report.get("target"):
        print(json.dumps(report["target"]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=4, help="rounds, and partitions in the drifting corpus")
    p.add_argument("--steps", type=int, default=120, help="training steps per round (the example's)")
    p.add_argument("--fractions", default=",".join(str(f) for f in FRACTIONS), help="replay fractions")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--pvc", type=Path, default=ROOT / "pvc")
    p.add_argument("--out", type=Path, default=RESULT)
    args = p.parse_args()
    if args.rounds < 2:
        raise SystemExit("--rounds must be at least 2")
    fractions = [float(f) for f in args.fractions.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # inherited by each round's `kdistill run`
    import torch
    from transformers.utils import logging as hf_logging

    from kdistill.trainer.drift_corpus import build_drift_partitions

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    state_before = machine_state()
    teacher = ensure_teacher(args.pvc)
    runs: dict[str, list[dict[str, Any]]] = {str(f): [] for f in fractions}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="kdistill-forgetting-") as tmp:
        work = Path(tmp)
        partitions = work / "partitions"
        build_drift_partitions(partitions, args.rounds)
        for n, seed in enumerate(seeds):
            order = fractions[n % len(fractions) :] + fractions[: n % len(fractions)]
            for fraction in order:
                result = run_variant(
                    teacher, partitions, work, fraction=fraction, rounds=args.rounds, steps=args.steps, seed=seed
                )
                runs[str(fraction)].append(result)
                brief = {k: v for k, v in result.items() if k != "rounds"}
                print(json.dumps({"variant": fraction, **brief}), flush=True)
    medians = summarize(runs)
    report = {
        "benchmark": "continuous_forgetting",
        "command": command_line(),
        "machine_before": state_before,
        "machine_after": machine_state(),
        "seconds": round(time.perf_counter() - started, 1),
        "torch_threads": torch.get_num_threads(),
        "config": {
            "rounds": args.rounds,
            "steps_per_round": args.steps,
            "fractions": fractions,
            "seeds": seeds,
            "replay_partitions": args.rounds - 1,
            "gate": OPEN_GATE,
            "template": "examples/schedule.yaml",
            "corpus": f"trainer/drift_corpus.build_drift_partitions(partitions={args.rounds})",
        },
        "definitions": {
            "first_partition_loss": "mean token loss (ln perplexity) of the served INT8 student on the first "
            "partition's eval.jsonl",
            "forgetting": "first_partition_loss after the last round minus after round 1 (nats per token)",
            "peak_forgetting": "the largest first_partition_loss after rounds 2..N minus after round 1",
            "forgetting_reduction": "1 - median forgetting / median forgetting at replay 0 (none when that is <= 0)",
            "extra_steps": "median steps / median steps at replay 0 - 1",
        },
        "medians": medians,
        "target": target(medians),
        "runs": runs,
    }
    write_report(report, args.out)
    print_table(report)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
