"""The grid's trial schedule: every trial once to the end, or successive halving in rungs under `grid.prune`.

The flow drives a `TrialSchedule`; the schedule decides what trains next and ranks what came back:

    schedule = TrialSchedule(specs, grid, max_steps, recorded, parent)
    while (rung := schedule.next_rung()) is not None:
        schedule.record(train(rung.work, stop_at=rung.stop_at))
    results = schedule.results()

It never trains anything itself, so the same schedule serves the local process pool and a Dask cluster.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from tasks.config import GridSettings
from tasks.errors import UserInputError
from tasks.tracking import RunRef
from tasks.trials import (
    TrialResult,
    TrialSpec,
    at_rung,
    before_rung,
    mark_pruned,
    replay_rung,
    rung_ranking,
    rung_steps,
    survivors,
)

# Progress goes to the terminal (stderr) whatever Prefect's log level.
progress = logging.getLogger("adaptflow.grid")

Work = list[tuple[TrialSpec, TrialResult | None]]  # each trial with the result it continues from, if any


@dataclass
class Rung:
    """One round of training: `work` trains to `stop_at` (None: to the run's end)."""

    number: int
    stop_at: int | None
    work: Work
    label: str  # prefixed to the progress lines ("rung 1/3, step 20: ")


@dataclass
class TrialSchedule:
    """What trains in which rung, and which trials go on.

    Without `grid.prune` there is one rung: every trial to the end, each continuing from its recorded result.
    Under `grid.prune`, every trial trains to the first rung, the best 1/eta go on from their checkpoints to the
    next one, and so on to `max_steps`. A resumed grid (`recorded`: the trials' logged results) takes the rungs
    its trials had logged as they were and trains the others on from their checkpoints, so it ranks exactly as
    the interrupted grid would have.
    """

    specs: list[TrialSpec]
    grid: GridSettings
    max_steps: int | None
    recorded: dict[int, TrialResult]
    parent: RunRef
    _rungs: list[int | None] = field(init=False)
    _number: int = field(init=False, default=0)
    _work: Work = field(init=False)
    _replayed: dict[int, TrialResult] = field(init=False, default_factory=dict)
    _final: list[TrialResult] = field(init=False, default_factory=list)
    _done: list[TrialResult] | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        if self.grid.prune is None:
            self._rungs = [None]
            self._work = [(spec, self.recorded.get(spec.index)) for spec in self.specs]
            return
        if self.max_steps is None:
            raise UserInputError("grid.prune needs train.max_steps: the rungs are steps of it")
        self._rungs = list(rung_steps(self.max_steps, self.grid.prune, len(self.specs)))
        first = self._rungs[0]
        assert first is not None
        self._work = [
            (spec, before_rung(self.recorded[spec.index], first) if spec.index in self.recorded else None)
            for spec in self.specs
        ]

    def next_rung(self) -> Rung | None:
        """The next round to train, or None once every trial has its last result."""
        if self._done is not None:
            return None
        steps = self._rungs[self._number]
        self._number += 1
        label = "" if steps is None else f"rung {self._number}/{len(self._rungs)}, step {steps}: "
        # The last rung is always trained: finishing needs the trained model (a trial already there only evaluates).
        self._replayed = {}
        if steps is not None and steps != self.max_steps:
            for spec, _ in self._work:
                if spec.index in self.recorded and (done := replay_rung(self.recorded[spec.index], steps)):
                    self._replayed[spec.index] = done
        work = [(spec, previous) for spec, previous in self._work if spec.index not in self._replayed]
        return Rung(self._number, steps, work, label)

    def record(self, trained: list[TrialResult]) -> None:
        """Take the rung's results: rank them and keep the trials that go on (the last rung: every result).

        Raises:
            UserInputError: no trial reports the metric that ranks them (naming its key).
        """
        prune = self.grid.prune
        if prune is None:
            self._done = sorted(trained, key=lambda r: r.index)
            return
        ranking = rung_ranking(self.grid)
        ranked = [at_rung(r, ranking) for r in trained]
        results = sorted([*ranked, *self._replayed.values()], key=lambda r: r.index)
        reached = [r for r in results if r.status == "ok"]
        if reached and not any(ranking.metric in r.metrics for r in reached):
            key = "grid.prune.metric" if prune.metric else "grid.select.metric"
            reported = ", ".join(sorted(reached[0].metrics))
            raise UserInputError(f"{key}: no trial reports {ranking.metric!r}; the trials report: {reported}")
        if self._number == len(self._rungs):
            self._done = sorted([*self._final, *results], key=lambda r: r.index)
            return
        going_on = set(survivors(results, ranking, prune.eta))
        self._final += [r for r in results if r.status == "failed"]
        self._final += [mark_pruned(r, self.parent) for r in reached if r.index not in going_on]
        by_index = {spec.index: spec for spec in self.specs}
        self._work = [(by_index[r.index], r) for r in results if r.index in going_on]
        going = "1 trial goes on" if len(self._work) == 1 else f"{len(self._work)} trials go on"
        progress.info("[rung %d/%d] %s to step %d", self._number, len(self._rungs), going, self._rungs[self._number])

    def results(self) -> list[TrialResult]:
        """Every trial's last result (ok, failed or pruned), by index; only once the last rung is recorded."""
        assert self._done is not None, "the schedule has rungs left"
        return self._done
