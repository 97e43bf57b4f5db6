from __future__ import annotations

import pytest

from metald.core.errors import StepFailed
from metald.core.plan import FuncStep, Plan


def _steps(log: list[str], fail_at: str | None = None, done: set[str] | None = None):  # type: ignore[no-untyped-def]
    def make(name: str) -> FuncStep:
        async def do() -> None:
            if name == fail_at:
                raise RuntimeError(f"{name} broke")
            log.append(f"do {name}")

        async def undo() -> None:
            log.append(f"undo {name}")

        async def is_done() -> bool:
            return name in (done or set())

        return FuncStep(name, do, undo, is_done)

    return [make(n) for n in ("a", "b", "c", "d")]


async def test_runs_in_order() -> None:
    log: list[str] = []
    assert await Plan("p", _steps(log)).run() == ["a", "b", "c", "d"]
    assert log == ["do a", "do b", "do c", "do d"]


async def test_failure_undoes_finished_steps_in_reverse() -> None:
    log: list[str] = []
    with pytest.raises(StepFailed) as info:
        await Plan("p", _steps(log, fail_at="c")).run()
    assert info.value.step == "c" and "c broke" in str(info.value)
    assert log == ["do a", "do b", "undo b", "undo a"]


async def test_done_steps_are_skipped_and_not_undone() -> None:
    log: list[str] = []
    with pytest.raises(StepFailed):
        await Plan("p", _steps(log, fail_at="d", done={"b"})).run()
    assert log == ["do a", "do c", "undo c", "undo a"]


async def test_injected_fault(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("METALD_FAULTS", "fail:p.b")
    log: list[str] = []
    with pytest.raises(StepFailed) as info:
        await Plan("p", _steps(log)).run()
    assert info.value.step == "b" and "injected" in str(info.value)
    assert log == ["do a", "undo a"]


async def test_wildcard_fault(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("METALD_FAULTS", "fail:*.c")
    with pytest.raises(StepFailed):
        await Plan("other", _steps([])).run()


async def test_observer_sees_every_step() -> None:
    seen: list[tuple[str, str]] = []
    plan = Plan("p", _steps([], fail_at="b"), observers=[lambda s, o, t, e: seen.append((s, o))])
    with pytest.raises(StepFailed):
        await plan.run()
    assert seen == [("p.a", "done"), ("p.b", "failed")]
