"""Opening the configured registry. Light (no torch, Ray or matplotlib): `loramill validate`, `list`, `pull`,
`promote` and `gc` need only this and the registry."""

from __future__ import annotations

from pathlib import Path

from infra.registry import Registry, Retention
from infra.registry.rules import check_location
from infra.store import store_up
from lora.config import Config


def open_registry(cfg: Config) -> Registry:
    """The configured registry, writing versions with the configured retention (``publish.retention_days``);
    ``embedded`` starts (or joins) the project's SeaweedFS on 127.0.0.1."""
    in_effect = cfg.publish.retention_in_effect()
    retention = None if in_effect is None else Retention(mode=in_effect[0], days=in_effect[1])
    if cfg.publish.registry == "embedded":
        info = store_up(Path(cfg.publish.store_dir))
        return Registry(f"s3://{info.bucket}/adapters", info.storage_options(), retention=retention)
    return Registry(cfg.publish.registry, cfg.publish.storage_options or None, retention=retention)


def check_registry(cfg: Config) -> None:
    """Refuse, with ``open_registry``'s own ``RegistryError``, a registry location every command would refuse;
    contacts nothing and starts nothing (``embedded`` is always a valid location)."""
    if cfg.publish.registry != "embedded":
        check_location(cfg.publish.registry, cfg.publish.storage_options)
