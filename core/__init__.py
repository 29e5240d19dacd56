"""The ground floor every service stands on: settings, the database engine, errors, logging,
metrics, auth and request limits. It imports nothing of the services; `app` (which composes
them) and every service import it."""
