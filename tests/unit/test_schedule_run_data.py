"""A scheduled run's data files from a partition folder (trainer/run_data.py), and the refusals
of `kdistill schedule run` before any training."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from kdistill.api import parse_job, parse_schedule
from kdistill.api.replay import plan_run_data
from kdistill.cli.schedule_local import ScheduleRunError, link_partitions, partition_names, run_rounds
from kdistill.trainer.errors import TrainerError
from kdistill.trainer.run_data import ensure_run_data, list_partitions, read_plan, write_run_data
from tests.schedule_table import base_schedule
from tests.spec_table import base_job

ROOT = Path(__file__).resolve().parents[2]


def make_partitions(root: Path, sizes: list[int], eval_size: int = 3) -> Path:
    for i, n in enumerate(sizes):
        folder = root / f"2026-11-{i + 1:02d}"
        folder.mkdir(parents=True)
        (folder / "train.jsonl").write_text("".join(json.dumps({"text": f"p{i} train {j}"}) + "\n" for j in range(n)))
        (folder / "eval.jsonl").write_text(
            "".join(json.dumps({"text": f"p{i} eval {j}"}) + "\n" for j in range(eval_size))
        )
    return root


def test_partitions_are_listed_with_their_line_counts(tmp_path: Path) -> None:
    folder = make_partitions(tmp_path / "parts", [5, 0, 7])
    (folder / "notes").mkdir()  # no train.jsonl: not a partition
    (folder / "2026-11-02" / "train.jsonl").write_text("\n\n")  # blank lines do not count
    assert [(p.name, p.train, p.eval) for p in list_partitions(folder)] == [
        ("2026-11-01", 5, 3),
        ("2026-11-02", 0, 3),
        ("2026-11-03", 7, 3),
    ]
    with pytest.raises(TrainerError, match="does not exist"):
        list_partitions(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(TrainerError, match="no partitions"):
        list_partitions(tmp_path / "empty")
    assert partition_names(folder) == ["2026-11-01", "2026-11-02", "2026-11-03"]
    with pytest.raises(ScheduleRunError, match="no partitions"):
        partition_names(tmp_path / "empty")


def test_the_files_hold_exactly_what_the_plan_says(tmp_path: Path) -> None:
    folder = make_partitions(tmp_path / "parts", [40, 40, 80])
    plan = plan_run_data(list_partitions(folder), window=1, fraction=0.2, replay_partitions=2, seed=5, run="r-1")
    files = write_run_data(plan, folder, tmp_path / "run" / "train.jsonl", tmp_path / "run" / "eval-new.jsonl")
    train = [json.loads(line)["text"] for line in files.train.read_text().splitlines()]
    assert len(train) == 100 and plan.replay_examples == 20
    assert train[:80] == [f"p2 train {j}" for j in range(80)]
    expected_replay = [f"p{int(name[-2:]) - 1} train {j}" for name, lines in plan.replay.items() for j in lines]
    assert train[80:] == expected_replay
    assert files.eval_new.read_text().count("p2 eval") == 3
    assert files.eval_old is not None
    old = files.eval_old.read_text()
    assert old.count("p0 eval") == 3 and old.count("p1 eval") == 3 and "p2" not in old
    assert json.loads((tmp_path / "run" / "plan.json").read_text())["replay_wanted"] == 20


def _scheduled_job(tmp_path: Path, partitions: Path, run: str = "nightly-1") -> dict:
    body = base_job(run)
    body["spec"]["data"] = {
        "train": str(tmp_path / "run" / "train.jsonl"),
        "eval": str(tmp_path / "run" / "eval-new.jsonl"),
        "runData": {"partitions": str(partitions), "replayFraction": 0.2, "replayPartitions": 2, "run": run},
    }
    return body


def test_a_restarted_run_keeps_its_data_when_newer_partitions_arrive(tmp_path: Path) -> None:
    folder = make_partitions(tmp_path / "parts", [40, 40, 80])
    job = parse_job(_scheduled_job(tmp_path, folder))
    first = ensure_run_data(job.spec, tmp_path)
    assert first is not None and first.plan.fresh == ("2026-11-03",)
    before = first.train.read_text()
    # A newer partition arrives while the run is going; the gang restarts.
    new = folder / "2026-11-04"
    new.mkdir()
    (new / "train.jsonl").write_text(json.dumps({"text": "late"}) + "\n")
    (new / "eval.jsonl").write_text(json.dumps({"text": "late eval"}) + "\n")
    again = ensure_run_data(job.spec, tmp_path)
    assert again is not None and again.plan == first.plan and again.train.read_text() == before
    # Another run (another name) over the same folder plans anew and sees the new partition.
    (tmp_path / "run" / "plan.json").unlink()
    other = ensure_run_data(parse_job(_scheduled_job(tmp_path, folder, "nightly-2")).spec, tmp_path)
    assert other is not None and other.plan.fresh == ("2026-11-04",)
    assert read_plan(other.train) == other.plan


def test_a_plan_without_newest_eval_data_is_refused(tmp_path: Path) -> None:
    folder = make_partitions(tmp_path / "parts", [5, 5], eval_size=0)
    with pytest.raises(TrainerError, match=r"have no eval\.jsonl"):
        ensure_run_data(parse_job(_scheduled_job(tmp_path, folder)).spec, tmp_path)


def test_each_round_sees_the_partitions_up_to_its_own(tmp_path: Path) -> None:
    folder = make_partitions(tmp_path / "parts", [5, 5, 5])
    view = link_partitions(folder, partition_names(folder)[:2], tmp_path / "round" / "partitions")
    assert [p.name for p in list_partitions(view)] == ["2026-11-01", "2026-11-02"]


def test_runs_are_refused_before_training(tmp_path: Path) -> None:
    folder = make_partitions(tmp_path / "parts", [5, 5])
    schedule = parse_schedule(base_schedule())
    with pytest.raises(ScheduleRunError, match="2 partition\\(s\\) for 3 round\\(s\\)"):
        run_rounds(schedule, folder, 3, tmp_path / "out", print, tmp_path)


def test_kdistill_validate_reads_schedules(tmp_path: Path) -> None:
    bad = base_schedule()
    bad["spec"]["schedule"] = "61 * * * *"
    bad["spec"]["data"]["replay"] = {"fraction": 1.0}
    bad_file = tmp_path / "bad.yaml"
    bad_file.write_text(yaml.safe_dump(bad))
    proc = subprocess.run(
        [sys.executable, "-P", "-m", "kdistill.cli.main", "validate", "examples/schedule.yaml", str(bad_file)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 1
    assert "examples/schedule.yaml: ok (pydoc-nightly: schedule '0 3 * * *' in Europe/Berlin" in proc.stdout
    assert "  spec.schedule: not a cron schedule: minute: 61 is outside 0-59" in proc.stderr
    assert "  spec.data.replay.fraction: " in proc.stderr
