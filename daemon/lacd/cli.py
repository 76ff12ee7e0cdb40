"""The `lacd` command. Parses, calls, prints: the logic lives in the modules it calls."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

from lacd import config as config_mod
from lacd import db, listings, lock, logs, status
from lacd.artifacts import write_text_atomic
from lacd.config import ConfigError
from lacd.db import DatabaseError
from lacd.ingest.lessons import REASONS
from lacd.lock import LockHeld
from lacd.runs import RunOutcome

def _user_errors() -> tuple[type[Exception], ...]:
    from lacd.cycle import NothingToTrain, RollbackError
    from lacd.report import ReportError

    from lacd.forget import ForgetError
    from lacd.ingest.tailer import LogPathError
    from lacd.service import StateDirError

    return (ConfigError, DatabaseError, LockHeld, NothingToTrain, StateDirError, RollbackError, ReportError, ForgetError,
            LogPathError)


class Lacd(click.Group):
    """Turns known errors into one line on stderr and exit status 2: no traceback for users."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except _user_errors() as exc:
            click.echo(f"lacd: {exc}", err=True)
            ctx.exit(2)
        except Exception as exc:  # a SQLite failure any command can meet: locked, damaged, full
            settings = ctx.obj.get("settings") if ctx.obj else None
            found = settings and db.explain(exc, settings.db_path)
            if not found:
                raise
            click.echo(f"lacd: {found}", err=True)
            ctx.exit(2)


@click.group(cls=Lacd)
@click.option("--config", "config_path", metavar="PATH", help="config file (default: $LACD_CONFIG, ~/.config/lacd/config.toml, /etc/lacd/config.toml)")
@click.pass_context
def cli(ctx, config_path):
    """lacd: turns local-ai-coder's log into a model that gets better at your agent work."""
    os.umask(0o077)  # everything lacd writes (database, datasets, checkpoints, models) is private
    ctx.obj = {"config_path": config_path}


def settings_of(ctx) -> config_mod.Settings:
    s = ctx.obj.get("settings")
    if s is None:
        s = ctx.obj["settings"] = config_mod.load(ctx.obj["config_path"])
        logs.setup(s.log.level, s.log.format)
    return s


@cli.command()
@click.argument("path", required=False, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--force", is_flag=True, help="overwrite an existing file")
def init(path, force):
    """Write a commented config with every default (default: ~/.config/lacd/config.toml)."""
    path = path or Path("~/.config/lacd/config.toml").expanduser()
    if path.exists() and not force:
        raise ConfigError(f"{path} exists; pass --force to overwrite it")
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, config_mod.render_default_config())
    click.echo(f"wrote {path}")


@cli.command()
@click.pass_context
def run(ctx):
    """Run the daemon in the foreground (what systemd starts)."""
    from lacd.service import Service

    Service(settings_of(ctx)).run()


@cli.command()
@click.pass_context
def ingest(ctx):
    """Read the log once to its end (the daemon's own code), print a summary, exit."""
    from lacd.service import catch_up

    stats = catch_up(settings_of(ctx))
    excluded = ", ".join(f"{k} {v}" for k, v in sorted(stats.excluded.items())) or "none"
    click.echo(f"ingested {stats.lessons} lessons ({stats.pending} usable, excluded: {excluded}), rejected {stats.rejected} lines")


@cli.command("status")
@click.option("--json", "as_json", is_flag=True, help="one JSON object")
@click.pass_context
def status_cmd(ctx, as_json):
    """The queue, the current run with its progress, past runs and the active model."""
    snap = status.snapshot(settings_of(ctx))
    click.echo(json.dumps(snap, indent=2) if as_json else status.render(snap))


@cli.command()
@click.option("--status", "status_", type=click.Choice(listings.STATUSES), help="only lessons with this status")
@click.option("--reason", callback=lambda ctx, param, v: _exclusion_reason(v),
              help=f"only lessons excluded for this reason: {', '.join(REASONS)}, secret:<kind> or forgotten")
@click.option("--secrets", "secrets_only", is_flag=True, help="only lessons in which secrets were redacted")
@click.option("--limit", default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def lessons(ctx, status_, reason, secrets_only, limit, as_json):
    """List lessons, newest first: status, reason for an exclusion, secrets redacted (by kind)."""
    rows = _read(ctx, lambda conn: listings.list_lessons(conn, status_, reason, limit, secrets_only))
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    from lacd.terminal import printable

    totals = _read(ctx, listings.secret_counts)
    if totals["secrets"]:
        kinds = ", ".join(f"{k} {n}" for k, n in totals["secrets"].items())
        click.echo(f"secrets redacted: {sum(totals['secrets'].values())} in {totals['secret_lines']} lines ({kinds})")
    for r in rows:
        why = f" ({r['reason']})" if r["reason"] else ""
        prompt = printable(" ".join(r["prompt"].split()))[:60]  # a prompt's escape sequences never reach the terminal
        found = f"  [redacted: {', '.join(r['secrets'])}]" if r["secrets"] else ""
        click.echo(f"{r['id']:>7}  {r['status']}{why:<22} {r['turns']:>3} turns  {prompt}{found}")


def _exclusion_reason(value: str | None) -> str | None:
    if value is None or value in REASONS or value == "forgotten" or value.startswith("secret:"):
        return value
    raise click.BadParameter(f"{value!r} is none of {', '.join(REASONS)}, secret:<kind>, forgotten")


@cli.command("forget")
@click.argument("ids", nargs=-1, type=int)
@click.option("--pattern", metavar="TEXT", help="forget every lesson whose text (prompt, replies, tool calls and outputs) "
              "contains TEXT (case-sensitive), and every rejected line whose stored prefix does")
@click.option("--all-matching", is_flag=True, help="forget them even when TEXT matches more than [forget] max_share of all lessons")
@click.option("--yes", is_flag=True, help="do not ask for confirmation")
@click.pass_context
def forget_cmd(ctx, ids, pattern, all_matching, yes):
    """Remove lessons by id or by text, and retrain the model in use without them."""
    from lacd import forget

    s = settings_of(ctx)
    if bool(ids) == bool(pattern):
        raise forget.ForgetError("name lesson ids or give --pattern TEXT (one of the two)")
    _read(ctx, lambda conn: None)  # no database: nothing to forget, and none is created
    if pattern:
        found = _read(ctx, lambda conn: forget.matching(conn, pattern, s.forget.max_share, all_matching))
        _show_matches(found)
    what = f"lessons {', '.join(map(str, ids))}" if ids else "them"
    if not yes and not click.confirm(f"forget {what}? Their text is erased from the database", default=False):
        ctx.exit(1)
    engine = db.write_engine(s.db_path)
    done = forget.forget(engine, s.runs_dir, s.queue.max_lessons, ids=list(ids) or None, pattern=pattern,
                         max_share=s.forget.max_share, all_matching=all_matching)
    click.echo(f"forgot {done.lessons} lesson{'s' if done.lessons != 1 else ''}"
               + (f" and {done.rejects} rejected line{'s' if done.rejects != 1 else ''}" if done.rejects else "")
               + "; their text is erased"
               + ("" if done.wal_truncated else " (the write-ahead log is still in use: it is cleared at the next checkpoint)"))
    if done.purged_runs:
        click.echo(f"deleted the datasets of runs {', '.join(f'#{r}' for r in done.purged_runs)}")
    if done.versions:
        click.echo(f"models trained on them: {', '.join(done.versions)}")
    if done.retrain_run:
        where = "the daemon runs it" if lock.holder(s.lock_path) else "`lacd train` runs it now, or the daemon when it starts"
        click.echo(f"retrain without them: run #{done.retrain_run} queued ({where})")
    elif done.waits_for_run:
        click.echo(f"retrain without them: starts after run #{done.waits_for_run}")


def _show_matches(found) -> None:
    """How many lessons and rejected lines the pattern matches, and a few of the lessons."""
    from lacd.terminal import printable

    click.echo(f"matches {len(found.lessons)} of {found.live_lessons} lessons"
               + (f" and {len(found.rejects)} of {found.all_rejects} rejected lines" if found.rejects else ""))
    for lesson_id, snippet in found.samples:
        click.echo(f"{lesson_id:>7}  {printable(snippet)[:100]}")
    if len(found.lessons) > len(found.samples):
        click.echo(f"    ... and {len(found.lessons) - len(found.samples)} more (`lacd lessons` lists them)")


@cli.command()
@click.option("--limit", default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def rejects(ctx, limit, as_json):
    """List log lines that could not become lessons, with the reason and a prefix."""
    rows = _read(ctx, lambda conn: listings.list_rejects(conn, limit))
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    for r in rows:
        click.echo(f"{r['id']:>7}  file #{r['source']} @ {r['offset']}  {r['reason']}\n         {r['prefix'][:100]!r}")


@cli.command()
@click.option("--downgrade", "down_to", metavar="REVISION", help="go back to this revision instead (base: empty)")
@click.pass_context
def migrate(ctx, down_to):
    """Apply the database migrations (the daemon also does this at start)."""
    from lacd.service import prepare_state_dir

    s = settings_of(ctx)
    prepare_state_dir(s)
    engine = db.write_engine(s.db_path)
    if down_to:
        db.downgrade(engine, down_to)
    else:
        db.migrate(engine)
    click.echo(f"database {s.db_path} at revision {db.current_revision(engine) or 'base'}")


@cli.command()
@click.pass_context
def train(ctx):
    """Start a learning cycle now, whatever the threshold (through the daemon if it runs)."""
    from lacd import cycle

    s = settings_of(ctx)
    queued = cycle.request_run(s)
    if queued:
        click.echo(f"run #{queued.run_id} handed to the running daemon; follow it with `lacd status`")
        return
    outcome = cycle.run_foreground(s, on_progress=_progress_printer())
    click.echo(f"\nrun #{outcome.run_id}: {outcome.status}")
    _print_outcome(s, outcome)


@cli.command()
@click.option("--dir", "work", type=click.Path(file_okay=False, path_type=Path), default=Path("lacd-quickstart"),
              show_default=True, help="folder for the sample log and the state")
@click.option("--lessons", default=16, show_default=True, help="sample lessons to generate")
@click.pass_context
def quickstart(ctx, work, lessons):
    """A whole cycle on the embedded defaults: sample lessons, SmolLM2-135M, GGUF, Ollama if running."""
    from lacd import quickstart as qs

    s = qs.prepare(work.resolve(), lessons)
    ctx.obj["settings"] = s
    logs.setup(s.log.level, s.log.format)
    click.echo(f"sample log: {s.watch.log} ({lessons} lessons); state: {s.state.dir}")
    outcome = qs.run(s, on_progress=_progress_printer())
    click.echo(f"\nrun #{outcome.run_id}: {outcome.status}")
    _print_outcome(s, outcome)


@cli.command("export")
@click.option("--base", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True, help="HF model folder")
@click.option("--adapter", type=click.Path(exists=True, file_okay=False, path_type=Path), help="peft LoRA adapter folder")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True, help="the GGUF file to write")
@click.option("--outtype", type=click.Choice(["f16", "bf16", "f32", "q8_0"]), default="f16", show_default=True)
def export_cmd(base, adapter, out, outtype):
    """Merge a LoRA adapter into its base model and write GGUF in one streaming pass."""
    from lacd.export import export_gguf

    logs.setup("warning")
    result = export_gguf(base, adapter, out, outtype)
    click.echo(f"wrote {result.path}: {result.n_tensors} tensors ({result.merged_tensors} merged), "
               f"{result.bytes_written / 2**20:.1f} MiB in {result.seconds:.1f} s")


@cli.command()
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def models(ctx, as_json):
    """Every version: run, lessons, metrics, promoted/rejected/removed, when, which one is latest."""
    from lacd import served

    rows = _read(ctx, listings.model_versions)
    names = _read(ctx, served.all_rows)
    if as_json:  # each version lists the agent names serving it; `lacd status --json` has the rest
        for row in rows:
            row["served_as"] = [n["name"] for n in names if n["state"] in ("serving", "handed_back")
                                and n["serving"] == f"v{row['version']}"]  # fmt: skip
        click.echo(json.dumps(rows, indent=2))
    else:
        click.echo(status.render_models(rows, names))


@cli.command()
@click.argument("version", required=False)
@click.option("--original", is_flag=True, help="point [model] serve_as (the agent's name) back at your own model (also: VERSION v0)")
@click.pass_context
def rollback(ctx, version, original):
    """Point <name>:latest back at VERSION (e.g. v3; default: the promoted version before the current one).

    With [model] serve_as set, the agent's own model name follows; --original (or v0) points it
    back at the model you had before lacd (kept as <name>:original) until the next promotion."""
    from lacd import cycle

    if original or (version or "").rsplit(":", 1)[-1] in ("v0", "0", "original"):
        done = cycle.rollback_original(settings_of(ctx))
        click.echo(f"{done.name} now serves your original model again ({done.backup_tag}); "
                   f"the next promotion points it at the new version (`lacd hand-back` stops that for good)")
        return
    number = None
    if version is not None:
        digits = version.rsplit(":", 1)[-1].removeprefix("v")
        if not digits.isdigit():
            raise click.BadParameter(f"{version!r} is not a version like v3", param_hint="VERSION")
        number = int(digits)
    done = cycle.rollback(settings_of(ctx), number)
    if done.from_tag != done.to_tag:
        click.echo(f"{done.name}:latest now points at {done.to_tag} (was {done.from_tag})")
    if done.served:
        click.echo(done.served)
    if done.note:
        click.echo(f"note: {done.to_tag} had been {done.note}")


@cli.command("hand-back")
@click.pass_context
def hand_back(ctx):
    """Give [model] serve_as (the agent's name) back for good: it serves your original model again, and
    lacd never changes it again (its own <name>:v<N> and <name>:latest go on). Do this before uninstalling."""
    from lacd import cycle

    done = cycle.rollback_original(settings_of(ctx), for_good=True)
    click.echo(f"{done.name} is yours again: it serves your original model ({done.backup_tag} keeps a copy); "
               f"lacd will not change it again")


@cli.command()
@click.argument("run_id", required=False, type=int, metavar="[RUN]")
@click.pass_context
def report(ctx, run_id):
    """Print the path of a run's report.html (default: the newest run), writing it if it is missing."""
    from lacd.report import report_path

    click.echo(report_path(settings_of(ctx), run_id))


def _progress_printer():
    state = {"stage": None}

    def show(stage: str, p: dict) -> None:
        if stage != state["stage"]:
            state["stage"] = stage
            click.echo(f"\n[{stage}]", nl=False)
        if p.get("total_steps"):
            loss = p.get("loss")
            eta = p.get("eta_s")
            click.echo(f"\r[{stage}] step {p.get('step')}/{p['total_steps']}"
                       + (f"  loss {loss:.3f}" if loss is not None else "")
                       + (f"  {p['tokens_per_s']:.0f} tok/s" if p.get("tokens_per_s") else "")
                       + (f"  ETA {eta:.0f} s" if eta is not None else "") + "   ", nl=False)
        elif p.get("tensors"):
            click.echo(f"\r[{stage}] tensor {p['tensor']}/{p['tensors']}   ", nl=False)
        elif p.get("ollama"):
            click.echo(f"\r[{stage}] {p['ollama']}   ", nl=False)

    return show


def _print_outcome(s, outcome) -> None:
    snap = status.snapshot(s)
    run = next((r for r in snap["runs"] if r["id"] == outcome.run_id), None)
    if snap["active_model"] and snap["active_model"]["run"] == outcome.run_id:
        click.echo(f"registered with Ollama at {s.ollama.host} as {snap['active_model']['tag']} "
                   f"and {s.model.name}:latest")
    elif outcome.status is RunOutcome.STOPPED_AFTER_EXPORT:
        run_dir = s.runs_dir / str(outcome.run_id)
        click.echo(f"no Ollama at {s.ollama.host}: the model is {run_dir / 'model.gguf'}\n"
                   f"register it with:  cd {run_dir} && ollama create {s.model.name}:latest -f Modelfile")
    elif outcome.status is RunOutcome.REJECTED and run:
        latest = snap["active_model"]["tag"] if snap["active_model"] else "none yet"
        click.echo(f"{(run.get('gate') or {}).get('summary', 'rejected by gate')}\n"
                   f"{run.get('tag')} stays registered; {s.model.name}:latest is unchanged ({latest})")
    elif run and run.get("error"):
        raise click.ClickException(run["error"])
    page = s.runs_dir / str(outcome.run_id) / "report.html"
    if page.exists():
        click.echo(f"report: {page}")


def _read(ctx, fn):
    s = settings_of(ctx)
    engine = db.read_engine(s.db_path)
    db.require_schema(engine, "lessons", "rejects")
    with engine.connect() as conn:
        return fn(conn)


def main() -> None:
    cli(prog_name="lacd")


if __name__ == "__main__":
    sys.exit(main())
