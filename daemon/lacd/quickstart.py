"""`lacd quickstart`: one whole cycle on the embedded defaults, in a folder of its own.

Generates sample lessons (lacd.samples), ingests them with the daemon's code, and runs a cycle on
SmolLM2-135M on the CPU. Registers with Ollama when one answers at the configured host; otherwise
stops after the export and says how to register the GGUF by hand.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from lacd import config
from lacd.config import Settings
from lacd.cycle import Outcome, run_foreground
from lacd.samples import write_log
from lacd.service import catch_up


def prepare(work: Path, lessons: int) -> Settings:
    """Settings for the quick start: its own log and state dir, a small CPU-sized cycle."""
    work.mkdir(parents=True, exist_ok=True)
    base = config.load()
    s = dataclasses.replace(
        base,
        watch=dataclasses.replace(base.watch, log=work / "agent_interactions.jsonl"),
        state=dataclasses.replace(base.state, dir=work / "state"),
        queue=dataclasses.replace(base.queue, threshold=min(base.queue.threshold, lessons)),
        train=dataclasses.replace(base.train, epochs=2, max_seq_len=1024, learning_rate=1e-3, checkpoint_every=20,
                                  threads=base.train.threads or os.cpu_count() or 1),  # a demo: use every core
        run=dataclasses.replace(base.run, retries=1, min_free_gb=0.5),
        # 16 lessons leave no held-out lesson to measure on: the demo's model is promoted unmeasured
        gate=dataclasses.replace(base.gate, if_unmeasured="promote"),
    )
    if not s.watch.log.exists():
        write_log(s.watch.log, n=lessons, seed=0, noise=0.1)
    return s


def run(settings: Settings, on_progress=None) -> Outcome:
    from lacd.pipeline import register

    catch_up(settings)
    reachable = register.is_reachable(register.make_client(settings.ollama.host, timeout_s=10))
    return run_foreground(settings, on_progress=on_progress, register=reachable)
