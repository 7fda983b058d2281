"""Settings, the plugin config.yaml model, route prefixes and logging setup."""

from config.logging import configure_logging, redact, redact_text
from config.plugin import PluginConfig, PluginConfigError, load_plugin_config
from config.route_prefix import RoutePrefixError, prefix_for_release, resolve_route_prefix
from config.settings import Settings, SettingsError, get_settings, load_settings

__all__ = [
    "PluginConfig",
    "PluginConfigError",
    "RoutePrefixError",
    "Settings",
    "SettingsError",
    "configure_logging",
    "get_settings",
    "load_plugin_config",
    "load_settings",
    "prefix_for_release",
    "redact",
    "redact_text",
    "resolve_route_prefix",
]
