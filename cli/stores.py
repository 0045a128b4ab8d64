"""The stores as the command line opens them: the configured database, at the newest schema."""

from __future__ import annotations

from sqlalchemy import Engine

from config import load_settings
from stores.engine import create_schema, make_engine


def open_stores() -> Engine:
    engine = make_engine(load_settings().database_url)
    create_schema(engine)
    return engine
