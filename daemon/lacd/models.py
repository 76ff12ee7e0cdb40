"""The tables. The schema itself is only ever changed through Alembic migrations (migrations/)."""

from __future__ import annotations

from sqlalchemy import Float, ForeignKey, Index, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


class Source(Base):
    """One generation of the watched log: a file identity and how far it has been read.

    ``offset`` always sits just after a complete line, and moves only in the transaction that
    stores the rows of the lines before it. ``head_hash`` covers the first ``head_len`` bytes and
    ``marker_hash`` the ``marker_len`` bytes just before ``offset``: together they tell whether a
    file is still the one this row describes (see lacd.ingest.identity).
    """

    __tablename__ = "sources"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    path: Mapped[str] = mapped_column(Text)
    dev: Mapped[int] = mapped_column(Integer)
    inode: Mapped[int] = mapped_column(Integer)
    head_len: Mapped[int] = mapped_column(Integer, default=0)
    head_hash: Mapped[str] = mapped_column(String(64), default="")
    offset: Mapped[int] = mapped_column(Integer, default=0)
    marker_len: Mapped[int] = mapped_column(Integer, default=0)
    marker_hash: Mapped[str] = mapped_column(String(64), default="")
    state: Mapped[str] = mapped_column(String(16), index=True)  # active | draining | done | lost
    note: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[float] = mapped_column(Float)
    updated_at: Mapped[float] = mapped_column(Float)


class Lesson(Base):
    """One complete log line that parsed into a conversation; identified by its place in the file."""

    __tablename__ = "lessons"
    __table_args__ = (UniqueConstraint("source_id", "offset", name="uq_lessons_place"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    source_id: Mapped[int] = mapped_column(ForeignKey("sources.id"))
    offset: Mapped[int] = mapped_column(Integer)
    length: Mapped[int] = mapped_column(Integer)
    ingested_at: Mapped[float] = mapped_column(Float)
    format: Mapped[str] = mapped_column(String(32))
    conversation: Mapped[str] = mapped_column(Text)  # canonical JSON: {"messages": [...]}
    raw: Mapped[str] = mapped_column(Text)  # the line as written (decoded, without its newline)
    conv_hash: Mapped[str] = mapped_column(String(32), index=True)
    status: Mapped[str] = mapped_column(String(16))  # pending | trained | excluded | forgotten (indexed with id below)
    reason: Mapped[str | None] = mapped_column(String(32), nullable=True)
    trained_run_id: Mapped[int | None] = mapped_column(Integer, nullable=True)


class Reject(Base):
    """A line that could not become a lesson, kept with its reason and a prefix for the CLI."""

    __tablename__ = "rejects"
    __table_args__ = (UniqueConstraint("source_id", "offset", name="uq_rejects_place"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    source_id: Mapped[int] = mapped_column(ForeignKey("sources.id"))
    offset: Mapped[int] = mapped_column(Integer)
    length: Mapped[int] = mapped_column(Integer)
    reason: Mapped[str] = mapped_column(Text)
    prefix: Mapped[str] = mapped_column(Text)
    created_at: Mapped[float] = mapped_column(Float)


class Run(Base):
    """A training cycle: its folder is <state dir>/runs/<id>/, its stages are RunStage rows.

    status: queued -> running -> done | failed | rejected; ``waiting`` while a stage waits for a
    retry (``next_try_at``) or for Ollama (``waiting_for`` says what).
    """

    __tablename__ = "runs"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    status: Mapped[str] = mapped_column(String(16), index=True)
    stage: Mapped[str | None] = mapped_column(String(16), nullable=True)
    created_at: Mapped[float] = mapped_column(Float)
    finished_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    lesson_count: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    progress: Mapped[str | None] = mapped_column(Text, nullable=True)
    reason: Mapped[str] = mapped_column(String(32), default="threshold")
    started_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    next_try_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    waiting_for: Mapped[str | None] = mapped_column(Text, nullable=True)


class RunStage(Base):
    """One stage of one run: done once its output was renamed into place and this row says so."""

    __tablename__ = "run_stages"
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id"), primary_key=True)
    stage: Mapped[str] = mapped_column(String(16), primary_key=True)
    status: Mapped[str] = mapped_column(String(16))  # a lacd.runs.StageStatus value
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    started_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    finished_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    result: Mapped[str | None] = mapped_column(Text, nullable=True)  # JSON


class RunLesson(Base):
    """The lessons a run trains on, fixed when the run is created (later lessons wait)."""

    __tablename__ = "run_lessons"
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id"), primary_key=True)
    lesson_id: Mapped[int] = mapped_column(ForeignKey("lessons.id"), primary_key=True)


class ModelVersion(Base):
    """A model registered with Ollama as <name>:v<version>; ``active`` is the one <name>:latest names."""

    __tablename__ = "model_versions"
    __table_args__ = (UniqueConstraint("name", "version", name="uq_model_versions_name_version"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(Text)
    version: Mapped[int] = mapped_column(Integer)
    tag: Mapped[str] = mapped_column(Text)
    run_id: Mapped[int | None] = mapped_column(ForeignKey("runs.id"), nullable=True)
    created_at: Mapped[float] = mapped_column(Float)
    status: Mapped[str] = mapped_column(String(16))  # registered | promoted | rejected | removed
    active: Mapped[int] = mapped_column(Integer, default=0)  # 1 for the version <name>:latest names
    lesson_count: Mapped[int] = mapped_column(Integer, default=0)
    digest: Mapped[str | None] = mapped_column(String(80), nullable=True)
    metrics: Mapped[str | None] = mapped_column(Text, nullable=True)  # JSON
    note: Mapped[str | None] = mapped_column(Text, nullable=True)


class SecretFinding(Base):
    """A secret found and redacted in a lesson or a reject's prefix, at ingestion: its kind and where
    (``field``: the message's role, ``tool_calls`` or ``raw``; ``turn``: the message index, -1 for the
    raw line or a reject). The line is named by its place, like lessons and rejects. Never the secret."""

    __tablename__ = "secret_findings"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    source_id: Mapped[int] = mapped_column(ForeignKey("sources.id"))
    offset: Mapped[int] = mapped_column(Integer)
    kind: Mapped[str] = mapped_column(String(32))
    field: Mapped[str] = mapped_column(String(16))
    turn: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[float] = mapped_column(Float)


class Forget(Base):
    """One `lacd forget`: when, how many lessons, and how they were chosen (never the pattern itself,
    which may be the very secret). A later run with reason ``forget`` retrains without them."""

    __tablename__ = "forgets"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    created_at: Mapped[float] = mapped_column(Float)
    lessons: Mapped[int] = mapped_column(Integer)
    chosen_by: Mapped[str] = mapped_column(String(16))  # ids | pattern


Index("ix_lessons_status_id", Lesson.status, Lesson.id)
Index("ix_secret_findings_place", SecretFinding.source_id, SecretFinding.offset)


class ServedName(Base):
    """The agent's own model name ([model] serve_as) and what lacd last put under it.

    state: backing_up (intent: preserve the user's model as backup_tag) -> serving -> released (the
    name changed behind lacd's back: lacd stopped touching it) | handed_back (`lacd hand-back`).
    pending_*: a copy to the name that was decided but not yet confirmed (written before acting).
    """

    __tablename__ = "served_names"
    name: Mapped[str] = mapped_column(Text, primary_key=True)  # as Ollama stores it: codellama:latest
    backup_tag: Mapped[str] = mapped_column(Text)  # the user's original, e.g. lacd-coder:original
    original_digest: Mapped[str | None] = mapped_column(String(80), nullable=True)  # None: the name did not exist
    digest: Mapped[str | None] = mapped_column(String(80), nullable=True)  # what lacd last put under the name
    serving: Mapped[str] = mapped_column(String(32))  # "original" or "v<N>"
    state: Mapped[str] = mapped_column(String(16))
    pending_tag: Mapped[str | None] = mapped_column(Text, nullable=True)
    pending_label: Mapped[str | None] = mapped_column(String(32), nullable=True)
    pending_digest: Mapped[str | None] = mapped_column(String(80), nullable=True)
    pending_state: Mapped[str | None] = mapped_column(String(16), nullable=True)
    note: Mapped[str | None] = mapped_column(Text, nullable=True)
    updated_at: Mapped[float] = mapped_column(Float)
