"""Which queued prediction goes to which free worker (the dispatcher asks once per free worker).

Only the oldest queued prediction of each mode is a candidate (FIFO within a mode). Among those, oldest
first, each goes to a free worker that serves its mode and fits it (`WorkerView.can_run`), preferring one
that already holds its model, so mixed traffic does not make one GPU swap models while another is idle.
"""

from __future__ import annotations

from pydantic import ValidationError

from ..request import KlingRequest
from .runner import WorkerView
from .store import PredictionRow

# A mode's oldest queued prediction, with its stored input parsed back (None: it no longer validates).
Head = tuple[PredictionRow, KlingRequest | None]


def stored_request(row: PredictionRow) -> KlingRequest | None:
    try:
        return KlingRequest.model_validate(row.input)
    except ValidationError:
        return None  # the dispatcher's job building fails it with the reason


def choose_worker(
    heads: list[Head], workers: tuple[WorkerView, ...]
) -> tuple[PredictionRow, WorkerView] | None:
    """Which head goes to which free worker. Oldest head first, to a free worker that already holds its
    model if there is one, else to the free worker able to run it whose models the other heads need
    least. One exception: a head whose model a busy worker holds waits for it (it is next there) while a
    younger head's model is held by a free worker, which takes that one instead, so two models do not
    swap places on two GPUs."""
    free = [w for w in workers if w.free]
    busy = [w for w in workers if not w.free]

    def holder(request: KlingRequest | None) -> WorkerView | None:
        return next(
            (w for w in free if request is None or (w.can_run(request) and w.holds_model_for(request))), None
        )

    holders = [holder(request) for _, request in heads]
    for index, (row, request) in enumerate(heads):
        if (found := holders[index]) is not None:
            return row, found
        assert request is not None  # a head that does not validate has a holder (any free worker)
        able = [w for w in free if w.can_run(request)]
        if not able:
            continue
        held_by_busy = any(w.can_run(request) and w.holds_model_for(request) for w in busy)
        if held_by_busy and any(h is not None for h in holders[index + 1 :]):
            continue
        needed = {
            offer.model
            for _, other in heads
            if other is not None and other is not request
            for w in free
            if (offer := w.offer(other)) is not None
        }
        return row, min(able, key=lambda w: (len(set(w.holds) & needed), w.index))
    return None
