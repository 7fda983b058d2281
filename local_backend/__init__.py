"""A local, real stand-in for the Synapse backend (see shared/spec/backend-api.md).

FastAPI + SQLite on disk: it persists, authenticates, can be restarted and can be told
to misbehave at run time. It depends on nothing else in this project, so it can run
(and be tested) on its own.

Entry points:

- :func:`local_backend.app.create_app` builds the ASGI app,
- :class:`local_backend.server.BackendProcess` runs it as a subprocess (tests, demo),
- :class:`local_backend.client.AdminClient` drives its ``_admin/`` endpoints,
- ``python -m local_backend serve|seed`` (the ``backend`` click group in ``cli.py``).
"""

DEFAULT_ADMIN_TOKEN = "local-backend-admin"
"""Admin token used when none is configured. Fine for a laptop; set your own elsewhere."""

__all__ = ["DEFAULT_ADMIN_TOKEN"]
