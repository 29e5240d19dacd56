"""Composition root: settings, app factory, CLI, database engine, auth and metrics."""
