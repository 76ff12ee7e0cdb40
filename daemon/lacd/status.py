"""What `lacd status` shows, read from the database and the lock file; never blocks the daemon."""

from __future__ import annotations

import json
import time

from lacd import db, forget, health, listings, lock, served
from lacd.config import Settings
from lacd.runs import ACTIVE, RunOutcome, gate_decisions


TABLES = ("lessons", "rejects", "sources", "runs", "run_stages", "model_versions", "secret_findings", "forgets")


def snapshot(settings: Settings) -> dict:
    """One JSON-able object: queue counts, daemon, current and past runs, active model."""
    pid = lock.holder(settings.lock_path)
    out = {
        "pending": 0, "threshold": settings.queue.threshold, "lessons_total": 0, "trained": 0,
        "excluded": {}, "rejected": 0, "forgotten": 0, "secrets": {}, "secret_lines": 0, "forget": None,
        "daemon": {"running": pid is not None, "pid": pid},
        "current_run": None, "runs": [], "active_model": None, "sources": [],
        "log": str(settings.watch.log), "state_dir": str(settings.state.dir), "config": settings.source,
        "health": health.read(settings.state.dir / "lacd.health", pid),
    }
    if not settings.db_path.exists():
        return out
    engine = db.read_engine(settings.db_path)
    try:
        db.require_schema(engine, *TABLES)
    except db.DatabaseError as exc:  # a daemon migrating right now, or never migrated
        out["note"] = str(exc)
        return out
    with engine.connect() as conn:
        out.update(listings.counts(conn))
        out["forget"] = forget.summary(conn)
        out["runs"] = listings.runs(conn)
        _add_gate(conn, out["runs"])
        out["sources"] = listings.sources(conn)
        out["active_model"] = listings.active_model(conn)
        out["served"] = served.all_rows(conn)
    out["current_run"] = next((r for r in out["runs"] if r["status"] in ACTIVE), None)
    for r in out["runs"]:
        r["paused"] = (r.get("progress") or {}).get("paused") if r["status"] == RunOutcome.PAUSED else None
    out["scheduler"] = _scheduler_decision(settings)
    engine.dispose()
    return out


def _add_gate(conn, runs: list[dict]) -> None:
    """Each run's registered tag and the promotion gate's decision (None before its promote stage)."""
    decided = gate_decisions(conn, [r["id"] for r in runs])
    for r in runs:
        found = decided.get(r["id"], {})
        r["tag"] = found.get("tag")
        r["gate"] = found.get("decision")


def _scheduler_decision(settings: Settings) -> dict | None:
    try:
        return json.loads((settings.state.dir / "scheduler.json").read_text())
    except (OSError, ValueError):
        return None


def render(s: dict) -> str:
    """The readable table."""
    daemon = f"running (pid {s['daemon']['pid']})" if s["daemon"]["running"] else "not running"
    daemon += _health_text(s.get("health"))
    lines = [f"note        {s['note']}"] if s.get("note") else []
    lines += [
        f"daemon      {daemon}",
        f"log         {s['log']}",
        f"state dir   {s['state_dir']}",
        f"queue       {s['pending']} pending / threshold {s['threshold']}   "
        f"({s['lessons_total']} lessons, {s['trained']} trained, {sum(s['excluded'].values())} excluded, {s['rejected']} rejected lines)",
    ]
    for reason, n in sorted(s["excluded"].items(), key=lambda kv: -kv[1]):
        lines.append(f"  excluded  {n:>6}  {reason}")
    lines += _privacy_lines(s)
    run = s["current_run"]
    lines.append(f"current run {_run_line(run) if run else 'none'}")
    if s.get("scheduler"):
        lines.append(f"scheduler   {s['scheduler']['decision']}")
        lines += _idle_lines(s["scheduler"].get("idle"))
    for r in s["runs"][:5]:
        lines.append(f"  run {_run_line(r)}")
    model = s["active_model"]
    lines.append(f"model       {model['tag'] + ' (latest), from run #' + str(model['run']) if model else 'none registered yet'}")
    for row in s.get("served") or []:
        lines.append(f"agent name  {served.describe(row)}")
    for src in s["sources"][:3]:
        note = f"  ({src['note']})" if src["note"] else ""
        lines.append(f"  file #{src['id']} {src['state']:<8} offset {src['offset']}  {src['path']}{note}")
    return "\n".join(lines)


def _health_text(h: dict | None) -> str:
    """What the running daemon said it is doing, when that is not plain watching."""
    if not h or h.get("state") == "ok":
        return ""
    if h["state"] == "waiting":
        return f", waiting: {h['message']}; it is read once it can be"
    retry = f"; retrying every {h['retry_in']:.0f} s" if h.get("retry_in") else ""
    return f", but failing since {time.strftime('%H:%M:%S', time.localtime(h['since']))}: {h['message']}{retry}"


def _idle_lines(idle: dict | None) -> list[str]:
    """The idle signals that could not be read, and what lacd does without them."""
    if not idle:
        return []
    lines = [f"  signal    {sig['detail']}" for sig in idle.get("signals", []) if sig.get("error")]
    if idle.get("hardware") and not idle.get("gpu"):  # no NVML: say what is watched instead
        lines.append(f"  signal    {idle['hardware']}")
    return lines


def _privacy_lines(s: dict) -> list[str]:
    """Secrets redacted by kind; forgotten lessons and whether the model in use still holds some."""
    lines = []
    if s["secrets"]:
        kinds = ", ".join(f"{kind} {n}" for kind, n in s["secrets"].items())
        lines.append(f"secrets     {sum(s['secrets'].values())} redacted in {s['secret_lines']} lines: {kinds}")
    f = s.get("forget") or {}
    if s.get("forgotten"):
        text = f"forgotten   {s['forgotten']} lessons"
        if f.get("active_model_forgotten"):
            retrain = f.get("retrain_run")
            text += (f"; the model in use was trained on {f['active_model_forgotten']} of them: retrain "
                     + (f"run #{retrain['id']} {retrain['status']}" if retrain else "due (starts when no run is active)"))
        lines.append(text)
    return lines


def _run_line(r: dict) -> str:
    text = f"#{r['id']} {r['status']} ({r['lessons']} lessons)"
    if r.get("stage") and r["status"] not in (RunOutcome.DONE, RunOutcome.REJECTED):
        text += f" at {r['stage']}"
    if r.get("tag"):
        text += f" {r['tag']}"
    p = r.get("progress") or {}
    if p.get("total_steps"):
        loss = p.get("loss")
        text += f"  step {p.get('step')}/{p['total_steps']}" + (f" loss {loss:.3f}" if loss is not None else "")
        if p.get("tokens_per_s"):
            text += f" {p['tokens_per_s']:.0f} tok/s"
        if p.get("eta_s") is not None:
            text += f" ETA {p['eta_s'] / 60:.0f} min"
    if p.get("plan"):  # the GPU memory plan of the train stage (precision, checkpointing, expected peak)
        text += f"  plan: {p['plan']}"
    if r.get("paused"):
        paused = r["paused"]
        text += f"  paused: agent active since {time.strftime('%H:%M', time.localtime(paused['since']))} ({paused['reason']})"
    elif r.get("waiting_for"):
        text += f"  waiting for {r['waiting_for']}"
    if r.get("error"):
        text += f"  error: {r['error'][:200]}"
    age = time.time() - r["created_at"]
    text += f"  ({age / 60:.0f} min ago)"
    if r.get("gate"):  # why it was promoted or rejected, with the numbers
        text += "\n      gate: " + "; ".join(r["gate"].get("reasons") or [r["gate"].get("summary", "")])
    return text


def render_models(rows: list[dict], names: list[dict] | None = None) -> str:
    """`lacd models`: one line per version (newest first), its gate metrics, then its note; then the
    user's original when an agent name ([model] serve_as) is served, marked where that name points."""
    if not rows:
        return "no model version yet"
    lines = []
    serving = {}
    for n in names or []:
        if n["state"] in ("serving", "handed_back"):
            serving.setdefault(n["serving"], []).append(n["name"])
    for r in rows:
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(r["created_at"]))
        mark = "  <- latest" if r["active"] else ""
        mark += "".join(f"  <- {name}" for name in serving.get(f"v{r['version']}", []))
        lines.append(f"{r['tag']:<24} run #{r['run']!s:<4} {r['lessons']:>6} lessons  {r['status']:<9} {when}"
                     f"  {_metrics_line(r.get('metrics'))}{mark}")
        if r.get("note"):
            lines.append(f"    {r['note']}")
    for n in names or []:
        if n["original_digest"]:
            mark = "".join(f"  <- {name}" for name in serving.get(served.ORIGINAL, []) if name == n["name"])
            lines.append(f"{n['backup_tag']:<24} your model from before lacd ({n['name']}){mark}")
        if n["state"] == "released":
            lines.append(f"    {n['name']}: {n['note']}")
    return "\n".join(lines)


def _metrics_line(metrics: dict | None) -> str:
    """exact-call 0.92 (in use 0.00), loss 0.871 (1.204), 24 prompts via transformers."""
    if not metrics or not metrics.get("candidate"):
        return "not measured"
    cand, inc = metrics["candidate"], metrics.get("incumbent") or {}

    def num(value, digits=2):
        return "n/a" if value is None else f"{value:.{digits}f}"

    return (f"exact-call {num(cand.get('exact_call_accuracy'))} (in use {num(inc.get('exact_call_accuracy'))}), "
            f"loss {num(cand.get('heldout_loss'), 3)} ({num(inc.get('heldout_loss'), 3)}), "
            f"{metrics.get('n_cases', 0)} prompts via {metrics.get('generator', '?')}")
