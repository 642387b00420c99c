"""Which worker can run what: a worker's capacity on its budget, refusals at create (the field, the reason,
what would fit), routing by mode and model, and the worker specs of I2V_DEVICES."""

from __future__ import annotations

from pathlib import Path

import pytest

from i2v import Engine, KlingRequest
from i2v.backends import resolve
from i2v.devices import worker_spec
from i2v.errors import I2VError
from i2v.request import MODES
from i2v.server.admission import refusal
from i2v.server.routing import choose_worker
from i2v.server.runner import Capacity, Offer, WorkerView
from i2v.server.store import PredictionRow
from i2v.server.worker import preload_models, serving_capacity
from i2v.settings import Settings


def tiny_bytes(name: str) -> int:
    cls, spec = resolve(f"tiny-{name}", Settings().tiny_dir)
    return sum(part.size.bytes for part in cls.parts(spec, "cpu").values())


def test_a_worker_says_what_its_budget_holds_and_creates_that_no_worker_can_hold_are_refused(
    _cache_dir: Path,
) -> None:
    small = tiny_bytes("wan2.2-ti2v-5b") * 3 // 2  # the tiny TI2V-5B fits, the tiny LTX-2 does not
    capacity = serving_capacity(Engine("tiny", settings=Settings(gpu_memory=small)), MODES)
    offers = {(o.mode, o.preset): o for o in capacity.offers}
    assert offers["standard", "default"].durations == (5, 10)
    assert offers["pro", "default"].durations == () and "tiny-ltx-2" in offers["pro", "default"].reason
    worker = WorkerView(0, "0 (cpu)", MODES, "READY", True, capacity)
    pro = KlingRequest(prompt="x", start_image="https://example.com/a.png", mode="pro")
    problem = refusal(pro, [worker])
    assert problem is not None and problem.field == "input.mode"
    assert "tiny-ltx-2" in problem.description and "budget" in problem.description
    assert "what would fit: mode standard with preset default (5/10 s)" in problem.description
    assert refusal(pro.model_copy(update={"mode": "standard"}), [worker]) is None
    # No worker for the mode at all, from I2V_DEVICES alone (nothing reported yet).
    standard_only = WorkerView(0, "0 (standard@cuda:0)", ("standard",), "STARTING", False, None)
    problem = refusal(pro, [standard_only])
    assert (
        problem is not None
        and problem.field == "input.mode"
        and "no worker serves mode 'pro'" in problem.description
    )
    assert refusal(pro, [standard_only, WorkerView(1, "1 (cuda:1)", MODES, "STARTING", False, None)]) is None


def offer(mode: str, preset: str, model: str, durations: tuple[int, ...]) -> Offer:
    return Offer(
        mode, preset, model, "all parts on the device", durations, 1, 1, None if durations else "too big"
    )  # type: ignore[arg-type]


def test_refusals_name_the_preset_or_the_duration_when_only_that_does_not_fit() -> None:
    capacity = Capacity(
        10**9,
        "default",
        (offer("pro", "default", "ltx-2", (5,)), offer("pro", "turbo", "ltx-2-distilled", ())),
    )
    worker = WorkerView(0, "0 (pro@cuda:1)", ("pro",), "READY", True, capacity)
    request = KlingRequest(prompt="x", start_image="https://example.com/a.png", mode="pro")
    assert refusal(request, [worker]) is None
    assert refusal(request.model_copy(update={"duration": 10}), [worker]).field == "input.duration"  # type: ignore[union-attr]
    assert refusal(request.model_copy(update={"preset": "turbo"}), [worker]).field == "input.preset"  # type: ignore[union-attr]


def test_routing_prefers_the_worker_holding_the_model_and_never_starves_a_mode() -> None:
    capacity = Capacity(
        None,
        "default",
        (offer("standard", "default", "ti2v", (5, 10)), offer("pro", "default", "ltx", (5, 10))),
    )

    def worker(index: int, holds: str, free: bool) -> WorkerView:
        return WorkerView(index, str(index), MODES, "READY" if free else "BUSY", free, capacity, (holds,))

    def head(seq: int, mode: str) -> tuple[PredictionRow, KlingRequest]:
        request = KlingRequest(prompt="x", start_image="https://example.com/a.png", mode=mode)  # type: ignore[arg-type]
        return PredictionRow(seq=seq, id=f"{mode}-{seq}"), request

    standard, pro = head(1, "standard"), head(2, "pro")
    both_free = (worker(0, "ti2v", True), worker(1, "ltx", True))
    assert [(r.id, w.index) for r, w in [choose_worker([pro], both_free)]] == [("pro-2", 1)]  # type: ignore[misc]
    # The standard model's worker is busy: the free one holding the pro model takes the younger pro job.
    one_busy = (worker(0, "ti2v", False), worker(1, "ltx", True))
    row, chosen = choose_worker([standard, pro], one_busy)  # type: ignore[misc]
    assert (row.id, chosen.index) == ("pro-2", 1)
    # One worker holding the standard model: the older pro job still goes first (no mode starves).
    alone = (worker(0, "ti2v", True),)
    row, chosen = choose_worker([pro, head(3, "standard")], alone)  # type: ignore[misc]
    assert row.id == "pro-2"


def test_worker_specs() -> None:
    assert worker_spec("standard@cuda:0") == worker_spec(" standard @ cuda:0 ")
    spec = worker_spec("pro@cuda:1+cuda:2")
    assert (spec.mode, spec.device, spec.modes, str(spec)) == (
        "pro",
        "cuda:1+cuda:2",
        ("pro",),
        "pro@cuda:1+cuda:2",
    )
    assert worker_spec("cuda:3").modes == MODES
    for bad, rule in (
        ("ultra@cuda:0", "'ultra' is not a mode"),
        ("pro@", "a device follows"),
        ("pro@gpu 1", "not a device"),
    ):
        with pytest.raises(I2VError, match=rule):
            worker_spec(bad)


def test_preload_loads_only_what_the_worker_serves_and_holds_without_dropping(_cache_dir: Path) -> None:
    standard, pro = tiny_bytes("wan2.2-ti2v-5b"), tiny_bytes("ltx-2")
    sent: list[object] = []
    # A pro worker whose budget holds no pro model: nothing to preload (standard is not its mode).
    small = Engine("tiny", settings=Settings(gpu_memory=standard * 3 // 2))
    assert preload_models(small, serving_capacity(small, ("pro",)), MODES, sent.append) == ()
    assert small.executor.loaded() == ()
    # Either model fits, never both, and CPU memory takes none: pro is pulled but would drop standard.
    one = Settings(gpu_memory=max(standard, pro) + min(standard, pro) // 2, offload_memory=0)
    engine = Engine("tiny", settings=one)
    assert preload_models(engine, serving_capacity(engine, MODES), MODES, sent.append) == ("standard",)
    assert engine.executor.loaded() == (engine.key("standard"),)
    assert engine.executor.would_drop(engine.key("pro"))
    assert sent == []  # tiny twins are built here, never downloaded
