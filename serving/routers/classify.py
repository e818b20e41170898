"""``/v1/classify``: labels and class probabilities for a list of texts, for classifiers."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Request, Response

from ..cascade import ANSWERED_BY_HEADER, answered_by
from ..front import Front
from ..schemas import ClassifyRequest

ROUTE = "/v1/classify"


def router(front: Front) -> APIRouter:
    api = APIRouter()

    @api.post(ROUTE)
    async def classify(body: ClassifyRequest, request: Request, response: Response) -> dict[str, Any]:
        started = time.perf_counter()
        engine = front.engine_for("sequence-classification", "model")
        front.check_model(body.model)
        probs = await front.classify(engine, body.texts, "texts")
        results = []
        for row in probs:
            best = max(range(len(row)), key=row.__getitem__)
            results.append(
                {"label": engine.labels[best], "score": row[best], "scores": dict(zip(engine.labels, row, strict=True))}
            )
        cascade = front.cascade_for(request.headers)
        if cascade is not None:  # the teacher answers the texts the student is unsure of
            results, verdicts = await cascade.classify(ROUTE, body.texts, results, engine.labels, started)
            response.headers[ANSWERED_BY_HEADER] = answered_by(verdicts)
        return {"model": front.model_name, "results": results}

    return api
