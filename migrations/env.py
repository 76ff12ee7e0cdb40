"""Alembic environment.

lacd passes its own engine in ``config.attributes["engine"]`` (see lacd.db.migrate). For writing a
new revision by hand, ``alembic -c migrations/alembic.ini revision --autogenerate -m "..."`` uses
the scratch database named in alembic.ini instead.
"""

from alembic import context
from sqlalchemy import create_engine

from lacd.models import Base


def run_migrations() -> None:
    engine = context.config.attributes.get("engine")
    if engine is None:
        engine = create_engine(context.config.get_main_option("sqlalchemy.url"))
    with engine.connect() as connection:
        context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
        with context.begin_transaction():
            context.run_migrations()
        connection.commit()


run_migrations()
