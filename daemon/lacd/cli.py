"""The `lacd` command. Parses, calls, prints: the logic lives in the modules it calls."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from lacd import config as config_mod
from lacd import db, logs, queue, status
from lacd.config import ConfigError
from lacd.db import DatabaseError
from lacd.ingest.lessons import REASONS
from lacd.lock import LockHeld

USER_ERRORS = (ConfigError, DatabaseError, LockHeld)


class Lacd(click.Group):
    """Turns known errors into one line on stderr and exit status 2: no traceback for users."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except USER_ERRORS as exc:
            click.echo(f"lacd: {exc}", err=True)
            ctx.exit(2)


@click.group(cls=Lacd)
@click.option("--config", "config_path", metavar="PATH", help="config file (default: $LACD_CONFIG, ~/.config/lacd/config.toml, /etc/lacd/config.toml)")
@click.pass_context
def cli(ctx, config_path):
    """lacd: turns local-ai-coder's log into a model that gets better at your agent work."""
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
    path.write_text(config_mod.render_default_config())
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
@click.option("--status", "status_", type=click.Choice(queue.STATUSES), help="only lessons with this status")
@click.option("--reason", type=click.Choice(REASONS), help="only lessons excluded for this reason")
@click.option("--limit", default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def lessons(ctx, status_, reason, limit, as_json):
    """List lessons, newest first, with their status and the reason for an exclusion."""
    rows = _read(ctx, lambda conn: queue.list_lessons(conn, status_, reason, limit))
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    for r in rows:
        why = f" ({r['reason']})" if r["reason"] else ""
        prompt = r["prompt"].replace("\n", " ")[:60]
        click.echo(f"{r['id']:>7}  {r['status']}{why:<22} {r['turns']:>3} turns  {prompt}")


@cli.command()
@click.option("--limit", default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def rejects(ctx, limit, as_json):
    """List log lines that could not become lessons, with the reason and a prefix."""
    rows = _read(ctx, lambda conn: queue.list_rejects(conn, limit))
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
