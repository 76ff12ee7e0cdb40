"""What `lacd status` shows, read from the database and the lock file; never blocks the daemon."""

from __future__ import annotations

import time

from lacd import db, lock, queue
from lacd.config import Settings


def snapshot(settings: Settings) -> dict:
    """One JSON-able object: queue counts, daemon, current and past runs, active model."""
    pid = lock.holder(settings.lock_path)
    out = {
        "pending": 0, "threshold": settings.queue.threshold, "lessons_total": 0, "trained": 0,
        "excluded": {}, "rejected": 0,
        "daemon": {"running": pid is not None, "pid": pid},
        "current_run": None, "runs": [], "active_model": None, "sources": [],
        "log": str(settings.watch.log), "state_dir": str(settings.state.dir), "config": settings.source,
    }
    if not settings.db_path.exists():
        return out
    engine = db.read_engine(settings.db_path)
    db.require_schema(engine, "lessons", "rejects", "sources", "runs")
    with engine.connect() as conn:
        out.update(queue.counts(conn))
        out["runs"] = queue.runs(conn)
        out["sources"] = queue.sources(conn)
    out["current_run"] = next((r for r in out["runs"] if r["status"] in ("queued", "running", "waiting")), None)
    engine.dispose()
    return out


def render(s: dict) -> str:
    """The readable table."""
    daemon = f"running (pid {s['daemon']['pid']})" if s["daemon"]["running"] else "not running"
    lines = [
        f"daemon      {daemon}",
        f"log         {s['log']}",
        f"state dir   {s['state_dir']}",
        f"queue       {s['pending']} pending / threshold {s['threshold']}   "
        f"({s['lessons_total']} lessons, {s['trained']} trained, {sum(s['excluded'].values())} excluded, {s['rejected']} rejected lines)",
    ]
    for reason, n in sorted(s["excluded"].items(), key=lambda kv: -kv[1]):
        lines.append(f"  excluded  {n:>6}  {reason}")
    run = s["current_run"]
    lines.append(f"current run {_run_line(run) if run else 'none'}")
    for r in s["runs"][:5]:
        lines.append(f"  run {_run_line(r)}")
    model = s["active_model"]
    lines.append(f"model       {model['tag'] if model else 'none registered yet'}")
    for src in s["sources"][:3]:
        note = f"  ({src['note']})" if src["note"] else ""
        lines.append(f"  file #{src['id']} {src['state']:<8} offset {src['offset']}  {src['path']}{note}")
    return "\n".join(lines)


def _run_line(r: dict) -> str:
    text = f"#{r['id']} {r['status']}"
    if r.get("stage"):
        text += f" at {r['stage']}"
    p = r.get("progress") or {}
    if p.get("total_steps"):
        text += f"  step {p.get('step')}/{p['total_steps']} loss {p.get('loss', float('nan')):.3f}"
    if r.get("error"):
        text += f"  error: {r['error']}"
    age = time.time() - r["created_at"]
    return text + f"  ({age / 60:.0f} min ago)"
