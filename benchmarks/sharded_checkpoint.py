"""Checkpoint save and load time of a split student: sharded (every rank writes and reads its own
part, ``trainer/parallel/sharded_checkpoint.py``) against gathered (every rank sends its shard to
rank 0, which writes the whole student and a single-process optimizer state; on load every rank
reads the whole files and cuts out its shard: ``parallel/student_state.py``'s ``gather_state``
and ``load_state``, the loader of gathered checkpoints).

    flock /tmp/kdistill-bench.lock .venv/bin/python -P benchmarks/sharded_checkpoint.py

Per layout, ``world`` real processes (gloo on CPU) build a Llama-shaped student from a config,
split it, take one AdamW step (so the moments exist), then alternate the two variants ``--reps``
times: save, then load (``CheckpointManager.latest``, which verifies every checksum, and the
restore). A time is rank 0's, between barriers, so it covers the slowest rank. Medians per
variant, with the load average read before and after each figure.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import RESULTS, command_line, machine_state, main

LAYOUTS = {"tensor2": (1, 1, 2), "pipeline2": (2, 1, 1), "tensor2xpipeline2": (2, 1, 2)}


def llama_config(hidden: int, layers: int, vocab: int) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=hidden * 8 // 3 // 64 * 64,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=hidden // 128,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )


class Rank:
    """One rank's split student, optimizer and checkpoint state."""

    def __init__(self, args: argparse.Namespace, root: Path) -> None:
        import torch
        from transformers import LlamaForCausalLM

        from kdistill.api.spec import Distillation
        from kdistill.trainer.checkpoint import CheckpointManager
        from kdistill.trainer.data import TokenizedExample
        from kdistill.trainer.flows.base import CheckpointState
        from kdistill.trainer.optim import build_optimizer
        from kdistill.trainer.parallel.distributed import env_from, init_distributed
        from kdistill.trainer.parallel.mesh import MeshLayout, build_device_mesh
        from kdistill.trainer.parallel.student import parallelize_student
        from kdistill.trainer.parallel.student_state import FullLayout
        from kdistill.trainer.sampling import BatchSampler

        self.env = env_from()
        init_distributed(self.env, prefer_gpu=False)
        pipeline, data, tensor = LAYOUTS[args.layout]
        self.layout = MeshLayout(self.env.world_size, pipeline, data, tensor, 1)
        torch.manual_seed(0)
        model = LlamaForCausalLM(llama_config(args.hidden, args.layers, args.vocab))
        self.full = FullLayout.of(model)
        self.bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        # What the gathered save writes into: rank 0's unsplit copy.
        self.template = copy.deepcopy(model) if self.env.rank == 0 else None
        mesh = build_device_mesh(self.layout, "cpu")
        self.ps = parallelize_student(model, self.layout, self.env.rank, mesh, self._loss, device=torch.device("cpu"))
        self.aux = torch.nn.ModuleDict()
        named = [(f"student.{n}", p) for n, p in self.ps.named_params.items()]
        optimizer, scheduler = build_optimizer(named, Distillation(), 10, foreach=False)
        examples = [TokenizedExample(i, [1, 2, 3], None) for i in range(8)]
        sampler = BatchSampler(examples, 2, strategy="uniform", tiers=None, shares=(1.0, 0.0, 0.0), seed=0)
        self.state = CheckpointState(CheckpointManager(root, keep=1), self.aux, optimizer, scheduler, sampler, {})
        self._step()

    @staticmethod
    def _loss(student: Any, teacher: Any, labels: Any) -> Any:
        return student.float().logsumexp(-1) - teacher.float().mean(-1)

    def _step(self) -> None:
        import torch

        ids = torch.randint(1, 100, (2, 16), generator=torch.Generator().manual_seed(0))
        teacher = torch.zeros(2, 16, 1)
        self.ps.forward_backward(ids, ids, teacher, torch.ones_like(ids))
        self.state.optimizer.step()
        self.state.scheduler.step()

    def save_sharded(self, step: int) -> None:
        from kdistill.trainer.parallel import sharded_checkpoint
        from kdistill.trainer.parallel.distributed import peer_guard

        held = sharded_checkpoint.student_held(self.ps, self.full, for_save=True)
        sharded_checkpoint.save(self.state, held, step=step, stage="s", temperature=1.0, guard=peer_guard)

    def load_sharded(self) -> None:
        from kdistill.trainer.parallel import sharded_checkpoint
        from kdistill.trainer.parallel.distributed import peer_guard

        info = self.state.manager.latest()
        assert info is not None and info.sharded
        held = sharded_checkpoint.student_held(self.ps, self.full, for_save=False)
        sharded_checkpoint.restore(info.path, self.state, held, set(self.full.shapes), guard=peer_guard)

    def save_gathered(self, step: int) -> None:
        from kdistill.trainer.parallel.student_state import gather_state, load_into_template

        gathered = gather_state(self.ps, self.state.optimizer, self.full)
        if gathered is None:
            return
        assert self.template is not None
        load_into_template(self.template, gathered.weights)
        self.state.write(
            step=step,
            phase=_Phase(),  # type: ignore[arg-type]
            temperature=1.0,
            model=self.template,
            optimizer=gathered.optimizer_view(),
        )

    def load_gathered(self) -> None:
        import torch
        from safetensors.torch import load_file, load_model

        from kdistill.trainer.checkpoint import restore_rng
        from kdistill.trainer.parallel.student_state import load_state

        info = self.state.manager.latest()
        assert info is not None and not info.sharded
        weights = load_file(str(info.path / "model.safetensors"))
        opt_state = torch.load(info.path / "optimizer.pt", weights_only=True)
        load_model(self.aux, str(info.path / "aux.safetensors"))
        load_state(self.ps, self.state.optimizer, self.full, weights, opt_state)
        self.state.scheduler.load_state_dict(torch.load(info.path / "scheduler.pt", weights_only=True))
        restore_rng(torch.load(info.path / "rng.pt", weights_only=True))


class _Phase:
    name = "s"


def _timed(fn: Any) -> float:
    import torch.distributed as dist

    dist.barrier()
    started = time.perf_counter()
    fn()
    dist.barrier()
    return time.perf_counter() - started


def worker(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    root = Path(args.scratch) / "checkpoints"
    rank = Rank(args, root)
    figures: dict[str, dict[str, list[Any]]] = {
        v: {"save_s": [], "load_s": [], "load_before": [], "load_after": [], "bytes_on_disk": []}
        for v in ("sharded", "gathered")
    }
    step = 0
    for _ in range(args.reps):
        for variant in ("sharded", "gathered"):  # interleaved
            step += 1
            f = figures[variant]
            f["load_before"].append(list(os.getloadavg()))
            f["save_s"].append(_timed(lambda: getattr(rank, f"save_{variant}")(step)))  # noqa: B023
            f["load_s"].append(_timed(getattr(rank, f"load_{variant}")))
            f["load_after"].append(list(os.getloadavg()))
            newest = rank.state.manager.candidates()[0]
            f["bytes_on_disk"].append(sum(p.stat().st_size for p in newest.iterdir()))
    if rank.env.rank == 0:
        out = {"student_bytes": rank.bytes, "figures": figures}
        Path(args.scratch, "figures.json").write_text(json.dumps(out))


def run_layout(args: argparse.Namespace, layout: str) -> dict[str, Any]:
    pipeline, data, tensor = LAYOUTS[layout]
    world = pipeline * data * tensor
    with tempfile.TemporaryDirectory(dir=args.scratch_root) as scratch:
        env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(29500 + os.getpid() % 1000))
        env.update(WORLD_SIZE=str(world), OMP_NUM_THREADS=str(args.threads), TRANSFORMERS_VERBOSITY="error")
        base = [sys.executable, "-P", __file__, "--worker", "--layout", layout, "--scratch", scratch]
        base += ["--hidden", str(args.hidden), "--layers", str(args.layers), "--vocab", str(args.vocab)]
        base += ["--reps", str(args.reps), "--threads", str(args.threads)]
        procs = [
            subprocess.Popen(base, env=dict(env, RANK=str(r), LOCAL_RANK=str(r)), cwd=Path(__file__).parents[1])
            for r in range(world)
        ]
        codes = [p.wait() for p in procs]
        if any(codes):
            raise SystemExit(f"{layout}: ranks exited {codes}")
        got = json.loads(Path(scratch, "figures.json").read_text())
    summary = {}
    for variant, f in got["figures"].items():
        summary[variant] = {
            "save_s_median": statistics.median(f["save_s"]),
            "load_s_median": statistics.median(f["load_s"]),
            **f,
        }
    return {"layout": layout, "world": world, "student_bytes": got["student_bytes"], "variants": summary}


def run(args: argparse.Namespace) -> dict[str, Any]:
    from kdistill.trainer.dcp_storage import FORMAT

    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=False).stdout.strip()
    layouts = [run_layout(args, layout) for layout in args.layouts.split(",")]
    return {
        "command": command_line(),
        "commit": commit,
        "format": FORMAT,
        "student": {"family": "llama", "hidden": args.hidden, "layers": args.layers, "vocab": args.vocab},
        "reps": args.reps,
        "threads_per_rank": args.threads,
        "machine": machine_state(),
        "layouts": layouts,
    }


def print_table(report: dict[str, Any]) -> None:
    print(f"student {report['layouts'][0]['student_bytes'] / 2**20:.0f} MiB fp32 (weights; + 2 Adam moments)")
    print(f"{'layout':20} {'world':>5} {'variant':9} {'save s':>8} {'load s':>8} {'MiB on disk':>12}  load avg")
    for lay in report["layouts"]:
        for variant, v in lay["variants"].items():
            mib = statistics.median(v["bytes_on_disk"]) / 2**20
            load = f"{v['load_before'][0][0]:.1f}..{v['load_after'][-1][0]:.1f}"
            print(
                f"{lay['layout']:20} {lay['world']:>5} {variant:9} {v['save_s_median']:8.2f} "
                f"{v['load_s_median']:8.2f} {mib:12.0f}  {load}"
            )


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layouts", default="tensor2,tensor2xpipeline2", help=f"comma-separated, of {sorted(LAYOUTS)}")
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    p.add_argument("--scratch-root", default=None, help="where the checkpoints are written (default: $TMPDIR)")
    p.add_argument("--out", type=Path, default=RESULTS / "sharded_checkpoint.json")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--layout", default="tensor2", help=argparse.SUPPRESS)
    p.add_argument("--scratch", default="", help=argparse.SUPPRESS)
    return p


if __name__ == "__main__":
    if "--worker" in sys.argv:
        worker(parser().parse_args())
    else:
        main(parser(), run, print_table)
