"""The two ways a stage can stop without failing, shared by every stage so the run executor
(lacd.worker) catches two types instead of each stage's own:

    StageWaiting      something the stage needs is not there yet (Ollama unreachable): the run
                      waits (status `waiting`) and retries without limit; not a failed attempt
    StageInterrupted  a stop request or the agent becoming active cut the stage short: it resumes
                      (training from its last checkpoint) at the next start; not a failed attempt

A stage's own error classes subclass these (e.g. ``TrainInterrupted(TrainError, StageInterrupted)``).
"""

from __future__ import annotations


class StageWaiting(Exception):
    """The stage cannot proceed yet; retrying later may succeed."""

    def waiting_for(self, settings) -> str | None:
        """What the run waits for, as `lacd status` shows it (None: a plain retry of the stage)."""
        return None


class StageInterrupted(Exception):
    """The stage stopped on request before it finished; it is redone or resumed at the next start."""
