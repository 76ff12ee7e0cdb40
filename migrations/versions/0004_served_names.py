"""served names: the agent's own model name lacd points at the promoted version ([model] serve_as)

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-05
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "served_names",
        sa.Column("name", sa.Text, primary_key=True),
        sa.Column("backup_tag", sa.Text, nullable=False),
        sa.Column("original_digest", sa.String(80), nullable=True),
        sa.Column("digest", sa.String(80), nullable=True),
        sa.Column("serving", sa.String(32), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("pending_tag", sa.Text, nullable=True),
        sa.Column("pending_label", sa.String(32), nullable=True),
        sa.Column("pending_digest", sa.String(80), nullable=True),
        sa.Column("pending_state", sa.String(16), nullable=True),
        sa.Column("note", sa.Text, nullable=True),
        sa.Column("updated_at", sa.Float, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("served_names")
