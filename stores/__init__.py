"""Stores: sqlmodel tables and the engine they live in (SQLite by default, or PostgreSQL)."""
