"""Whether any worker can run a request at all: a create no worker can serve is refused at once (422).

Each worker says at start-up what it can serve on its memory budget (`Capacity`: per mode and preset, the
model, its placement, the durations that fit). A request is refused when no worker of its mode exists,
or when every worker of its mode has reported and none can hold it; the refusal names the field to
change (`input.mode`, else `input.preset`, else `input.duration`), the reason, and what would fit. While a
worker of the mode has not reported yet (starting, or its setup failed) nothing is refused: the job
waits for it, or fails with the setup's reason.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..parsing import format_bytes
from ..request import KlingRequest
from .runner import Offer, WorkerView
from .schemas import InvalidField


def _fits(workers: Sequence[WorkerView]) -> str:
    """What the workers can serve, for the refusal's "what would fit"."""
    seen = []
    for worker in workers:
        for offer in worker.capacity.offers if worker.capacity else ():
            if offer.durations:
                durations = "/".join(str(d) for d in offer.durations)
                text = f"mode {offer.mode} with preset {offer.preset} ({durations} s)"
                if text not in seen:
                    seen.append(text)
    return "; ".join(seen) if seen else "nothing: raise I2V_GPU_MEMORY or use a GPU with more memory"


def _why(workers: Sequence[WorkerView], offers: list[tuple[WorkerView, Offer]]) -> str:
    lines = []
    for worker, offer in offers:
        budget = worker.capacity.budget_bytes if worker.capacity else None
        limit = format_bytes(budget) if budget is not None else "no limit"
        lines.append(f"worker {worker.name} (budget {limit}): {offer.reason or 'does not fit'}")
    return "; ".join(lines)


def refusal(request: KlingRequest, workers: Sequence[WorkerView]) -> InvalidField | None:
    """None when some worker can (or may yet) run the request; else the field to change and why."""
    if not workers:
        return None  # no workers (yet): the create waits in the queue
    serving = [w for w in workers if request.mode in w.modes]
    if not serving:
        names = ", ".join(w.name for w in workers)
        return InvalidField(
            type="unavailable",
            field="input.mode",
            description=(
                f"no worker serves mode {request.mode!r} here (workers: {names}; see I2V_DEVICES); "
                f"what would fit: {_fits(workers)}"
            ),
        )
    if any(w.capacity is None for w in serving):
        return None
    if any(w.can_run(request) for w in serving):
        return None
    of_mode = [(w, o) for w in serving for o in w.capacity.offers if o.mode == request.mode]  # type: ignore[union-attr]
    if not any(o.durations for _, o in of_mode):
        field, what = "input.mode", f"no worker can hold mode {request.mode!r} on its memory budget"
        shown = of_mode
    else:
        chosen = [(w, o) for w in serving if (o := w.offer(request)) is not None]
        if not any(o.durations for _, o in chosen):
            preset = request.preset or "the server's default"
            field, what = "input.preset", f"no worker can hold mode {request.mode!r} with preset {preset}"
        else:
            field = "input.duration"
            what = f"no worker can hold a {request.duration} s clip in mode {request.mode!r}"
        shown = chosen
    return InvalidField(
        type="unavailable",
        field=field,
        description=f"{what}: {_why(serving, shown)}; what would fit: {_fits(workers)}",
    )
