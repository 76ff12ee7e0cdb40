"""[run] keep_runs: finished run folders beyond the newest N are deleted after each run, never the
active run's (executor with stand-in stages, as in tests/test_worker.py)."""

from __future__ import annotations

from lacd.worker import RunExecutor
from test_worker import fake_stages
from test_worker import make_executor as worker_executor


def make_executor(tmp_path, keep_runs: int) -> RunExecutor:
    return worker_executor(tmp_path, LACD_RUN_KEEP_RUNS=str(keep_runs))


def run_folders(executor: RunExecutor) -> list[int]:
    return sorted(int(p.name) for p in executor.settings.runs_dir.iterdir())


def test_only_the_newest_keep_runs_folders_stay_and_never_the_active_runs(tmp_path, monkeypatch):
    executor = make_executor(tmp_path, keep_runs=2)
    fake_stages(monkeypatch)
    seen = []
    for _ in range(4):
        run_id = executor.store.create("threshold", 10)
        assert executor.execute(run_id) == "rejected"
        assert (executor.settings.runs_dir / str(run_id) / "report.html").is_file()
        seen.append(run_folders(executor))
    assert seen == [[1], [1, 2], [2, 3], [3, 4]]

    active = executor.store.create("manual", 10)
    executor.run_dir(active)  # its stages have begun writing
    executor.prune_run_dirs()  # as a failed or finished run elsewhere would
    assert run_folders(executor) == [3, 4, active]  # the two newest finished ones, and the active one
