"""secrets: findings recorded at ingestion; forgets (lessons removed by `lacd forget`)

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-25
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "secret_findings",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("source_id", sa.Integer, sa.ForeignKey("sources.id"), nullable=False),
        sa.Column("offset", sa.Integer, nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("field", sa.String(16), nullable=False),
        sa.Column("turn", sa.Integer, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
    )
    op.create_index("ix_secret_findings_place", "secret_findings", ["source_id", "offset"])
    op.create_table(
        "forgets",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("lessons", sa.Integer, nullable=False),
        sa.Column("chosen_by", sa.String(16), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("forgets")
    op.drop_index("ix_secret_findings_place", table_name="secret_findings")
    op.drop_table("secret_findings")
