"""KServe Open Inference Protocol v2: server and model health and metadata, and ``infer`` for
classifiers (texts in as a ``BYTES`` tensor; labels and probabilities out). Its errors are the
protocol's one-string error objects (``serving/errors.py``)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from ..errors import ApiError
from ..front import Front
from ..schemas import InferRequest, InferTensor

CLASSIFY = "sequence-classification"


def check_shape(tensor: InferTensor) -> None:
    """Texts come as shape [N] or [N, 1], with N the number of texts."""
    if tensor.datatype != "BYTES":
        raise ApiError(400, f"datatype must be BYTES (texts), got {tensor.datatype!r}", "inputs[0].datatype")
    count = 1
    for d in tensor.shape:
        if d < 0:
            raise ApiError(400, "shape must not hold negative sizes", "inputs[0].shape")
        count *= d
    if (
        count != len(tensor.data)
        or len(tensor.shape) not in (1, 2)
        or (len(tensor.shape) == 2 and tensor.shape[1] != 1)
    ):
        raise ApiError(
            400, f"shape {tensor.shape} does not fit {len(tensor.data)} texts (use [N] or [N, 1])", "inputs[0].shape"
        )


def router(front: Front) -> APIRouter:
    api = APIRouter()

    def check_name(name: str) -> None:
        if name != front.model_name:
            raise ApiError(
                404, f"unknown model {name!r}; this server serves {front.model_name!r}", "name", kind="not_found_error"
            )

    @api.get("/v2/health/live")
    async def live() -> dict[str, bool]:
        return {"live": True}

    @api.get("/v2/health/ready")
    async def ready() -> JSONResponse:
        ok = front.serving
        return JSONResponse({"ready": ok}, status_code=200 if ok else 503)

    @api.get("/v2")
    async def server_metadata() -> dict[str, Any]:
        return {"name": "kdistill", "version": "2", "extensions": []}

    @api.get("/v2/models/{name}")
    async def model_metadata(name: str) -> dict[str, Any]:
        check_name(name)
        engine = front.engine_for(CLASSIFY, "name")
        return {
            "name": name,
            "platform": "kdistill",
            "versions": ["1"],
            "inputs": [{"name": "text", "datatype": "BYTES", "shape": [-1]}],
            "outputs": [
                {"name": "label", "datatype": "BYTES", "shape": [-1]},
                {"name": "probabilities", "datatype": "FP32", "shape": [-1, len(engine.labels)]},
            ],
            "parameters": front.model_info(),
        }

    @api.get("/v2/models/{name}/ready")
    async def model_ready(name: str) -> JSONResponse:
        check_name(name)
        ok = front.serving
        return JSONResponse({"name": name, "ready": ok}, status_code=200 if ok else 503)

    @api.post("/v2/models/{name}/infer")
    async def infer(name: str, body: InferRequest) -> dict[str, Any]:
        check_name(name)
        engine = front.engine_for(CLASSIFY, "name")
        tensor = body.inputs[0]
        check_shape(tensor)
        probs = await front.classify(engine, tensor.data, "inputs[0].data")
        labels = [engine.labels[max(range(len(r)), key=r.__getitem__)] for r in probs]
        flat = [p for row in probs for p in row]
        out: dict[str, Any] = {
            "model_name": name,
            "model_version": "1",
            "outputs": [
                {"name": "label", "shape": [len(labels)], "datatype": "BYTES", "data": labels},
                {"name": "probabilities", "shape": [len(probs), len(engine.labels)], "datatype": "FP32", "data": flat},
            ],
        }
        if body.id is not None:
            out["id"] = body.id
        return out

    return api
