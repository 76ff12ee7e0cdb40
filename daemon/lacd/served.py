"""The agent's own model name (``[model] serve_as``): lacd points it at the promoted version.

local-ai-coder asks Ollama for a fixed name (``codellama``); a promoted ``lacd-coder:v<N>`` only
reaches the agent when that name is a copy of it. Every change is an Ollama copy (same blobs, no
weight copy), and each one follows the same steps, so the user's model is never lost:

    1. the first time: record the intent, copy the user's model to ``<name>:original`` (the
       backup tag), check its digest, record it;
    2. before every change: the name must still hold the digest lacd last put there; if the user
       pulled or created something else under it, lacd stops serving under it (``released``, with
       the reason for ``lacd status``) and keeps registering its own tags;
    3. record the copy about to happen (``pending_*``), copy, check the digest, record it.

A process killed anywhere in between leaves a row that :func:`reconcile` finishes from what Ollama
holds, rolling the recorded intent forward (the daemon calls it at start, and every change calls
it first). ``lacd rollback --original``
points the name back at the backup; ``lacd hand-back`` does so for good (``handed_back``: later
promotions leave the name alone). The backup tag is never deleted by lacd.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import structlog
from sqlalchemy import Engine, insert, select, update
from sqlalchemy.exc import OperationalError

from lacd.models import ServedName
from lacd.pipeline import register

log = structlog.get_logger(__name__)

ORIGINAL = "original"


class ServeError(Exception):
    """The name cannot be changed as asked; the message says why and that nothing changed."""


@dataclass(frozen=True)
class Served:
    """What the agent's name serves, as `lacd status` and `lacd models` show it."""

    name: str
    backup_tag: str
    serving: str  # "original" or "v<N>"
    state: str  # backing_up | serving | released | handed_back
    original_digest: str | None
    digest: str | None
    note: str | None
    pending: str | None = None  # the label of a copy recorded but not confirmed (a killed process)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def backup_tag(model_name: str) -> str:
    """Where the user's own model is kept: ``<[model] name>:original``."""
    return f"{model_name}:{ORIGINAL}"


def label(tag: str) -> str:
    """``lacd-coder:v3`` -> ``v3``; the backup tag -> ``original``."""
    return tag.rsplit(":", 1)[-1]


# --------------------------------------------------------------------------- the row


def get(engine: Engine, name: str) -> Served | None:
    with engine.connect() as conn:
        row = conn.execute(select(ServedName).where(ServedName.name == register.full_tag(name))).first()
    return _served(row) if row else None


def all_rows(conn) -> list[dict]:
    """Every served name (for `lacd status` / `lacd models`; reads the database only)."""
    try:
        rows = conn.execute(select(ServedName).order_by(ServedName.name)).all()
    except OperationalError:  # a database from before migration 0004: nothing served yet
        return []
    return [_served(r).to_dict() for r in rows]


def _served(row) -> Served:
    return Served(row.name, row.backup_tag, row.serving, row.state, row.original_digest, row.digest, row.note,
                  row.pending_label)


def _row(engine: Engine, name: str):
    with engine.connect() as conn:
        return conn.execute(select(ServedName).where(ServedName.name == name)).first()


def _set(engine: Engine, name: str, **values) -> None:
    with engine.begin() as conn:
        conn.execute(update(ServedName).where(ServedName.name == name).values(updated_at=time.time(), **values))


def _release(engine: Engine, name: str, why: str) -> None:
    _set(engine, name, state="released", note=why, pending_tag=None, pending_label=None, pending_digest=None,
         pending_state=None)
    log.warning("served_name_released", name=name, reason=why)


# --------------------------------------------------------------------------- acting


def point(engine: Engine, client, name: str, model_name: str, target_tag: str, final_state: str = "serving") -> Served:
    """Point the agent's name at target_tag (a lacd version, or the backup tag for the original).

    Preserves the user's model first (once), checks that the name still holds what lacd last put
    there, records the copy, copies, records its digest. Returns the row as it stands after; a
    released or handed-back name is left alone. OllamaUnavailable propagates (the caller retries).
    """
    name = register.full_tag(name)
    row = reconcile(engine, client, name) or _preserve(engine, client, name, backup_tag(model_name))
    if row.state in ("released", "handed_back"):
        log.info("served_name_left_alone", name=name, state=row.state)
        return row
    current = register.tag_digest(client, name)
    if current != row.digest:
        _release(engine, name, f"{name} was changed outside lacd (it holds {_short(current)}, lacd last put "
                               f"{_short(row.digest)} there): lacd no longer serves under it")
        return get(engine, name)
    if target_tag == row.backup_tag and row.original_digest is None:
        return _remove(engine, client, name, final_state)  # there was no model under the name before lacd
    target = register.tag_digest(client, target_tag)
    if target is None:
        raise ServeError(f"{target_tag} is not in Ollama; {name} is unchanged")
    _set(engine, name, pending_tag=target_tag, pending_label=label(target_tag), pending_digest=target,
         pending_state=final_state)
    register.copy(client, target_tag, name)
    return reconcile(engine, client, name)


def _preserve(engine: Engine, client, name: str, backup: str) -> Served:
    """First change: keep the user's model under the backup tag (intent recorded before the copy)."""
    existing = register.tag_digest(client, backup)
    current = register.tag_digest(client, name)
    original = existing or current  # a backup from an earlier install is the user's model: never overwrite it
    with engine.begin() as conn:
        conn.execute(insert(ServedName).values(
            name=name, backup_tag=backup, original_digest=original, digest=current, serving=ORIGINAL,
            state="backing_up", updated_at=time.time()))
    log.info("served_name_preserving", name=name, backup=backup, digest=original)
    return reconcile(engine, client, name)


def _remove(engine: Engine, client, name: str, final_state: str) -> Served:
    """The original is "no model under this name": delete what lacd put there."""
    _set(engine, name, pending_tag=None, pending_label=ORIGINAL, pending_digest=None, pending_state=final_state)
    register.delete(client, name)
    return reconcile(engine, client, name)


def reconcile(engine: Engine, client, name: str) -> Served | None:
    """Finish what a killed process left half done, from what Ollama holds; None when no row exists."""
    name = register.full_tag(name)
    row = _row(engine, name)
    if row is None:
        return None
    if row.state == "backing_up":
        _finish_backup(engine, client, row)
    row = _row(engine, name)
    if row.pending_label is not None:
        _finish_copy(engine, client, row)
    return get(engine, name)


def _finish_backup(engine: Engine, client, row) -> None:
    held = register.tag_digest(client, row.backup_tag)
    if row.original_digest is None or held == row.original_digest:
        _set(engine, row.name, state="serving")
        log.info("served_name_preserved", name=row.name, backup=row.backup_tag, digest=row.original_digest)
        return
    if held is None and register.tag_digest(client, row.name) == row.original_digest:
        register.copy(client, row.name, row.backup_tag)
        if register.tag_digest(client, row.backup_tag) == row.original_digest:
            _set(engine, row.name, state="serving")
            log.info("served_name_preserved", name=row.name, backup=row.backup_tag, digest=row.original_digest)
            return
    _release(engine, row.name, f"could not keep {row.name} as {row.backup_tag} (it holds {_short(held)}, "
                               f"expected {_short(row.original_digest)}): lacd never changed {row.name}")


def _finish_copy(engine: Engine, client, row) -> None:
    current = register.tag_digest(client, row.name)
    if current == row.digest and current != row.pending_digest:  # killed before the copy: do it now
        log.info("served_name_copy_resumed", name=row.name, wanted=row.pending_label)
        if row.pending_tag is None:
            register.delete(client, row.name)
        elif register.tag_digest(client, row.pending_tag) == row.pending_digest:
            register.copy(client, row.pending_tag, row.name)
        current = register.tag_digest(client, row.name)
    if current == row.pending_digest:  # the copy (or the delete, for no original) took place
        _set(engine, row.name, digest=current, serving=row.pending_label, state=row.pending_state or "serving",
             pending_tag=None, pending_label=None, pending_digest=None, pending_state=None, note=None)
        log.info("served_name_points", name=row.name, serving=row.pending_label, digest=current)
    elif current == row.digest:  # the target left Ollama meanwhile: nothing changed, drop the intent
        _set(engine, row.name, pending_tag=None, pending_label=None, pending_digest=None, pending_state=None)
        log.warning("served_name_copy_dropped", name=row.name, wanted=row.pending_tag)
    else:
        _release(engine, row.name, f"{row.name} holds {_short(current)}, neither what lacd put there "
                                   f"({_short(row.digest)}) nor {row.pending_tag}: lacd no longer serves under it")


def _short(digest: str | None) -> str:
    return "nothing" if digest is None else digest.removeprefix("sha256:")[:12]


# --------------------------------------------------------------------------- what the pipeline and the CLI call


def follow(settings, engine: Engine, client, tag: str) -> Served | None:
    """After <name>:latest moved to tag: point the served name there too (no-op without serve_as)."""
    if not settings.model.serve_as:
        return None
    return point(engine, client, settings.model.serve_as, settings.model.name, tag)


def to_original(settings, engine: Engine, client, for_good: bool = False) -> Served:
    """`lacd rollback --original` (for_good=False) or `lacd hand-back` (True)."""
    if not settings.model.serve_as:
        raise ServeError("[model] serve_as is not set: lacd serves under no agent name, there is nothing to hand back")
    name = register.full_tag(settings.model.serve_as)
    row = reconcile(engine, client, name)
    if row is None:
        raise ServeError(f"lacd never changed {name}: it still serves your own model")
    if row.state == "released":
        raise ServeError(f"lacd stopped serving under {name} ({row.note}); it is yours as it is, nothing changed")
    if row.state == "handed_back":
        raise ServeError(f"{name} was already handed back; nothing changed")
    done = point(engine, client, name, settings.model.name, row.backup_tag, "handed_back" if for_good else "serving")
    if done.serving != ORIGINAL:
        raise ServeError(f"{name} could not be pointed back at {row.backup_tag}: {done.note}")
    return done


def base_source(settings, engine: Engine | None) -> str | None:
    """The tag to read ``[model] base = ollama:<serve_as>`` from: the preserved original once lacd has
    changed that name (lacd must never train on a model it put there itself); None otherwise."""
    spec = settings.model.base.strip()
    if not (spec.startswith("ollama:") and settings.model.serve_as):
        return None
    name = register.full_tag(settings.model.serve_as)
    if register.full_tag(spec.removeprefix("ollama:")) != name:
        return None
    row = get(engine, name) if engine is not None else None
    if row is None:
        return None  # lacd never changed the name: it is the user's model
    if row.original_digest is None:
        raise ServeError(f"[model] base is ollama:{name}, the name lacd serves under, and there was no model "
                         f"under it before lacd: set [model] base to the model you want to train")
    return row.backup_tag


class OriginalOf:
    """An Ollama client for lacd.basemodel whose ``show(<served name>)`` answers with the original's,
    so the base converted once under the served name's folder is the same file before and after."""

    def __init__(self, client, name: str, backup: str):
        self.client, self.name, self.backup = client, register.full_tag(name), backup

    def show(self, model: str):
        return self.client.show(self.backup if register.full_tag(model) == self.name else model)


def describe(row: dict) -> str:
    """One line for `lacd status`: what the agent's name serves, or why lacd left it alone."""
    what = {"serving": f"serves {row['serving']}", "backing_up": "being preserved",
            "handed_back": f"handed back (serves {row['serving']}; lacd leaves it alone)",
            "released": "left alone"}[row["state"]]
    kept = f"; your model is kept as {row['backup_tag']}" if row["original_digest"] else "; it did not exist before lacd"
    note = f": {row['note']}" if row.get("note") else ""
    pending = f" (moving to {row['pending']} was cut short: the daemon finishes it when it starts)" \
        if row.get("pending") else ""
    return f"{row['name']} {what}{kept}{note}{pending}"


def reconcile_configured(settings, engine: Engine) -> None:
    """At daemon start: finish a change a killed process left half done (Ollama down: the next change does)."""
    if not settings.model.serve_as:
        return
    try:
        row = reconcile(engine, register.make_client(settings.ollama.host, timeout_s=10), settings.model.serve_as)
    except register.OllamaError as exc:
        log.warning("served_name_reconcile_postponed", error=str(exc))
        return
    if row is not None:
        log.info("served_name", name=row.name, serving=row.serving, state=row.state, note=row.note)
