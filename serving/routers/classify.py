"""``/v1/classify``: labels and class probabilities for a list of texts, for classifiers."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from ..front import Front
from ..schemas import ClassifyRequest


def router(front: Front) -> APIRouter:
    api = APIRouter()

    @api.post("/v1/classify")
    async def classify(body: ClassifyRequest) -> dict[str, Any]:
        engine = front.engine_for("sequence-classification", "model")
        front.check_model(body.model)
        probs = await front.classify(engine, body.texts, "texts")
        results = []
        for row in probs:
            best = max(range(len(row)), key=row.__getitem__)
            results.append(
                {"label": engine.labels[best], "score": row[best], "scores": dict(zip(engine.labels, row, strict=True))}
            )
        return {"model": front.model_name, "results": results}

    return api
