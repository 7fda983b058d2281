"""Actions and their discovery: find a plugin's action class by ``action_name``.

A plugin names its actions in config.yaml (``actions.<name>.entrypoint``); a module
may also simply define subclasses of ``BaseAction`` with an ``action_name``.
"""

from __future__ import annotations

import importlib
import inspect
import sys
from abc import ABC, abstractmethod
from pathlib import Path
from types import ModuleType
from typing import Any, ClassVar

from config.plugin import CONFIG_FILENAME, PluginConfigError, load_plugin_config


class ActionNotFound(LookupError):
    """No action of that name in the plugin; the message lists what there is."""


class BaseAction(ABC):
    """An action a plugin offers; subclasses set ``action_name``.

    An ABC, as in the SDK: a subclass that leaves an abstract method of its base
    undefined (``execute``; a serve deployment's ``_get_model`` or ``infer``) fails when it is
    instantiated (``TypeError``), not at its first request.
    """

    action_name: ClassVar[str] = ""

    @abstractmethod
    def execute(self) -> Any:
        """Run the action."""


def import_plugin_module(module: str, plugin_dir: Path | None = None) -> ModuleType:
    """Import ``module``, looking in ``plugin_dir`` first when given."""
    if plugin_dir is not None:
        root = str(Path(plugin_dir).resolve())
        if root not in sys.path:
            sys.path.insert(0, root)
    try:
        return importlib.import_module(module)
    except ImportError as e:
        where = f" (plugin dir {plugin_dir})" if plugin_dir else ""
        raise ActionNotFound(f"cannot import plugin module {module!r}{where}: {e}") from e


def actions_in_module(module: ModuleType) -> dict[str, type[BaseAction]]:
    found: dict[str, type[BaseAction]] = {}
    for _, obj in inspect.getmembers(module, inspect.isclass):
        if issubclass(obj, BaseAction) and obj.action_name and not inspect.isabstract(obj):
            found.setdefault(obj.action_name, obj)
    return found


def discover_action(plugin: str | Path | ModuleType, action_name: str) -> type[BaseAction]:
    """The action class named ``action_name`` in a plugin directory, module, or module name."""
    if isinstance(plugin, ModuleType):
        module = plugin
    elif isinstance(plugin, Path) or Path(str(plugin), CONFIG_FILENAME).is_file():
        plugin_dir = Path(plugin)
        try:
            cfg = load_plugin_config(plugin_dir)
            module_name, class_name = cfg.action(action_name).module_and_class
        except PluginConfigError as e:
            raise ActionNotFound(str(e)) from e
        module = import_plugin_module(module_name, plugin_dir)
        cls = getattr(module, class_name, None)
        if not (inspect.isclass(cls) and issubclass(cls, BaseAction)):
            raise ActionNotFound(
                f"{module_name}.{class_name} (action {action_name!r}) is not a BaseAction class"
            )
        return cls
    else:
        module = import_plugin_module(str(plugin))
    found = actions_in_module(module)
    if action_name not in found:
        known = ", ".join(sorted(found)) or "none"
        raise ActionNotFound(f"no action {action_name!r} in {module.__name__} (found: {known})")
    return found[action_name]
