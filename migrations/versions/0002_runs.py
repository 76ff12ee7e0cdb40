"""learning cycle: run stages, run lessons, model versions; more run columns

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("runs") as batch:
        batch.add_column(sa.Column("reason", sa.String(32), nullable=False, server_default="threshold"))
        batch.add_column(sa.Column("started_at", sa.Float, nullable=True))
        batch.add_column(sa.Column("next_try_at", sa.Float, nullable=True))
        batch.add_column(sa.Column("waiting_for", sa.Text, nullable=True))
    op.create_table(
        "run_stages",
        sa.Column("run_id", sa.Integer, sa.ForeignKey("runs.id"), primary_key=True),
        sa.Column("stage", sa.String(16), primary_key=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("started_at", sa.Float, nullable=True),
        sa.Column("finished_at", sa.Float, nullable=True),
        sa.Column("error", sa.Text, nullable=True),
        sa.Column("result", sa.Text, nullable=True),
    )
    op.create_table(
        "run_lessons",
        sa.Column("run_id", sa.Integer, sa.ForeignKey("runs.id"), primary_key=True),
        sa.Column("lesson_id", sa.Integer, sa.ForeignKey("lessons.id"), primary_key=True),
    )
    op.create_table(
        "model_versions",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("name", sa.Text, nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("tag", sa.Text, nullable=False),
        sa.Column("run_id", sa.Integer, sa.ForeignKey("runs.id"), nullable=True),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("active", sa.Integer, nullable=False),
        sa.Column("lesson_count", sa.Integer, nullable=False),
        sa.Column("digest", sa.String(80), nullable=True),
        sa.Column("metrics", sa.Text, nullable=True),
        sa.Column("note", sa.Text, nullable=True),
        sa.UniqueConstraint("name", "version", name="uq_model_versions_name_version"),
    )


def downgrade() -> None:
    op.drop_table("model_versions")
    op.drop_table("run_lessons")
    op.drop_table("run_stages")
    with op.batch_alter_table("runs") as batch:
        batch.drop_column("waiting_for")
        batch.drop_column("next_try_at")
        batch.drop_column("started_at")
        batch.drop_column("reason")
