"""Read-only routes beyond Replicate's API that the web page uses: a clip's poster frame and how long
clips like the next one usually take on this server.

Both sit behind the token like the rest of `/v1` (app.py includes this router with the same check), and a
poster is only its owner's, like the mp4 it comes from.
"""

from __future__ import annotations

import statistics
from typing import Any, Literal

from fastapi import APIRouter
from fastapi.responses import Response

from ..progress import STAGES, parse_stage_times
from ..request import Mode, RequestPreset
from .deps import Owner, ServiceDep
from .schemas import Estimate, StageShare
from .store import PredictionRow

SCANNED = 200  # newest succeeded predictions looked at for an estimate
SAMPLE = 20  # of those, the most recent similar ones it is made from

router = APIRouter()


@router.get("/predictions/{prediction_id}/poster.jpg")
def get_poster(prediction_id: str, service: ServiceDep, caller: Owner) -> Response:
    """The clip's first frame (JPEG, at most 640 px a side), for thumbnails before the mp4 is fetched;
    stored beside the mp4 by its worker."""
    return Response(
        service.poster(prediction_id, caller),  # 404 unless the caller's and still there
        media_type="image/jpeg",
        headers={"Cache-Control": "private, max-age=86400"},
    )


@router.get("/i2v/estimate", response_model=Estimate)
def get_estimate(
    service: ServiceDep,
    mode: Mode = "standard",
    duration: Literal["5", "10"] = "5",
    preset: RequestPreset | None = None,
) -> dict[str, Any]:
    """The median predict time of recent succeeded clips with the same mode, duration and preset (else the
    same mode and duration), and the share of that time each stage took."""
    rows = service.recent_succeeded(SCANNED)
    seconds = int(duration)
    same = [r for r in rows if _similar(r, mode, seconds) and r.input.get("preset") == preset]
    basis = "same inputs"
    if not same:
        same, basis = [r for r in rows if _similar(r, mode, seconds)], "same mode and duration"
    same = same[:SAMPLE]
    if not same:
        basis = "none"
    return Estimate(
        mode=mode,
        duration=seconds,
        preset=preset,
        basis=basis,
        count=len(same),
        predict_time=statistics.median(r.predict_time for r in same) if same else None,
        stages=_stage_shares(same),
    ).model_dump()


def _similar(row: PredictionRow, mode: str, duration: int) -> bool:
    given = row.input
    return (
        row.predict_time is not None
        and given.get("mode", "standard") == mode
        and str(given.get("duration", 5)) == str(duration)
    )


def _stage_shares(rows: list[PredictionRow]) -> list[StageShare]:
    """Each stage's mean share of the run, over the rows whose logs carry stage times."""
    totals: dict[str, float] = {}
    counted = 0
    for row in rows:
        times = parse_stage_times(row.logs)
        whole = sum(times.values()) if times else 0
        if not times or whole <= 0:
            continue
        counted += 1
        for stage, value in times.items():
            totals[stage] = totals.get(stage, 0.0) + value / whole
    order = {stage: i for i, stage in enumerate(STAGES)}
    names = sorted(totals, key=lambda stage: order.get(stage, len(STAGES)))
    return [StageShare(name=name, share=round(totals[name] / counted, 4)) for name in names]
