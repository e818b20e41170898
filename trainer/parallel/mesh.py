"""Rank layout of a job: the student's (pipeline, data, tensor) mesh and the teacher's stage groups.

The layout is pure arithmetic so that it can be tested without processes and read by the
operator's docs. Dimension order is ``("pipeline", "data", "tensor")`` with tensor innermost:
tensor-parallel peers exchange activations every layer, so they get neighbouring ranks (the
same node, the fastest links); pipeline stages, which only pass one activation per
micro-batch, are outermost.

The teacher is split into ``S`` stages over groups of ``S`` consecutive ranks: rank ``r`` runs
teacher stage ``r % S`` of group ``r // S``. Every rank belongs to exactly one teacher group and
each group serves its members' batches.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

    from kdistill.api.spec import Parallelism

MESH_DIMS = ("pipeline", "data", "tensor")


@dataclass(frozen=True)
class MeshLayout:
    world_size: int
    pipeline: int
    data: int
    tensor: int
    teacher_stages: int

    def __post_init__(self) -> None:
        for name in ("pipeline", "data", "tensor", "teacher_stages", "world_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.pipeline * self.data * self.tensor != self.world_size:
            raise ValueError(
                f"student pipeline*data*tensor = {self.pipeline}*{self.data}*{self.tensor} "
                f"= {self.pipeline * self.data * self.tensor} must equal the world size {self.world_size}"
            )
        if self.world_size % self.teacher_stages:
            raise ValueError(
                f"teacherPipelineStages {self.teacher_stages} must divide the world size {self.world_size}"
            )

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.pipeline, self.data, self.tensor)

    def coords(self, rank: int) -> dict[str, int]:
        """Coordinates of ``rank`` on each student mesh dimension."""
        self._check_rank(rank)
        return {
            "pipeline": rank // (self.data * self.tensor),
            "data": (rank // self.tensor) % self.data,
            "tensor": rank % self.tensor,
        }

    def rank_of(self, pipeline: int, data: int, tensor: int) -> int:
        return (pipeline * self.data + data) * self.tensor + tensor

    def teacher_group(self, rank: int) -> list[int]:
        self._check_rank(rank)
        first = (rank // self.teacher_stages) * self.teacher_stages
        return list(range(first, first + self.teacher_stages))

    def _check_rank(self, rank: int) -> None:
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} outside world of size {self.world_size}")


def layout_from_spec(parallelism: Parallelism) -> MeshLayout:
    s = parallelism.student
    return MeshLayout(
        world_size=parallelism.world_size,
        pipeline=s.pipeline,
        data=s.data,
        tensor=s.tensor,
        teacher_stages=parallelism.teacher_pipeline_stages,
    )


def build_device_mesh(layout: MeshLayout, device_type: str) -> DeviceMesh:
    """The student's 3-D DeviceMesh; needs an initialised default process group of the same size."""
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device_type, layout.shape, mesh_dim_names=MESH_DIMS)
