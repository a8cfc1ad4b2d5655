"""Family mode: one teacher forward per batch, then every student (issue 6).

A config lists students either as the single `student:` block or as a `students:` mapping from a
name to a `StudentConfig` (like `teachers`); `load_config` turns the first form into the second
(`{"student": student}`), so only `cfg.students` is read here. Each student has its own heads, optimizer, schedule,
checkpoint folder (`checkpoints/step_N/students/<name>/`) and `final/<name>/`.

A family run must equal separate runs with the same seed, so nothing random about one student may
depend on the others:
- every student is initialised from the same global RNG state a lone run would have at that point;
- each student owns a torch RNG stream (drop path, stochastic depth, anything a forward draws),
  started from the rank's seed as in a lone run, swapped in around its forward/backward and
  checkpointed with it (every rank saves its own);
- data, TeacherNorm and teacher targets are shared (identical in separate runs of one seed);
- pyramid draws come from the run's sampler, drawn once per iteration for all students (a lone
  run of the same seed draws exactly that value).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from .config import DistillConfig


class RngStreams:
    """One torch RNG state per student (CPU and this rank's CUDA device), swapped in while it runs."""

    def __init__(self) -> None:
        self.states: dict[str, dict[str, Any]] = {}

    @staticmethod
    def capture() -> dict[str, Any]:
        state: dict[str, Any] = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state()
        return state

    @staticmethod
    def restore(state: dict[str, Any]) -> None:
        torch.set_rng_state(state["cpu"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["cuda"])

    @contextlib.contextmanager
    def use(self, name: str) -> Iterator[None]:
        """Run a block on `name`'s stream; the global stream is left as it was."""
        outer = self.capture()
        self.restore(self.states[name])
        try:
            yield
        finally:
            self.states[name] = self.capture()
            self.restore(outer)

    def state_dict(self) -> dict[str, Any]:
        return {n: dict(s) for n, s in self.states.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = set(self.states) - set(state)
        if missing:
            raise KeyError(f"no RNG stream saved for student(s) {sorted(missing)}")
        self.states = {
            n: {"cpu": state[n]["cpu"], **({"cuda": state[n]["cuda"]} if "cuda" in state[n] else {})}
            for n in self.states
        }


def build_students(
    cfg: DistillConfig, teacher_dims: dict[str, tuple[int, int]], device: torch.device, stream_seed: int
) -> tuple[dict, RngStreams]:
    """Every `StudentState` of the run, each built from the same RNG state (identical weights on
    every rank), and their streams, each started from `stream_seed` (this rank's own seed, so drop
    path and RoPE jitter differ across the global batch)."""
    from .stages import StudentState

    streams = RngStreams()
    start = RngStreams.capture()
    students = {}
    for name, spec in cfg.students.items():
        RngStreams.restore(start)  # as if this student were the only one
        students[name] = StudentState.build(name, cfg, spec, teacher_dims, device)
        torch.manual_seed(stream_seed)
        streams.states[name] = RngStreams.capture()
    return students, streams
