"""The applications Serve runs, with their route prefixes.

``serve.status()`` gives each application's status and deployments but not its route
(Ray 2.60); the controller's details do. Read through Serve's client, which is not a
public API: it is kept to this one function.
"""

from __future__ import annotations

from ray.serve.context import _get_global_client


def routes() -> dict[str, str]:
    """Application name -> route prefix ('' for an application without one)."""
    details = _get_global_client().get_serve_details()
    return {
        name: app.get("route_prefix") or "" for name, app in details.get("applications", {}).items()
    }
