"""``synapse-bridge serve status`` and ``delete`` against the session's Serve."""

from __future__ import annotations

from typing import Any

from click.testing import CliRunner

from serve_runtime.cli import serve


def test_status_lists_each_application_with_its_route(example_app: Any) -> None:
    result = CliRunner().invoke(serve, ["status"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    line = next(x for x in result.output.splitlines() if x.startswith(example_app.app_name))
    assert f"route={example_app.route_prefix}" in line
    assert "RUNNING" in line


def test_delete_of_an_unknown_application_names_it(example_app: Any) -> None:
    result = CliRunner().invoke(serve, ["delete", "no-such-app"])
    assert result.exit_code == 1
    assert "no application named 'no-such-app'" in result.output
