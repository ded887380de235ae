"""The method registry: `method = { name = "..." }` in the run config picks one."""
from __future__ import annotations

from ..configtools import ConfigError, from_dict
from .base import Instruction, Method, MethodConfig, ModelHost
from .adapter import Houlsby, Pfeiffer
from .baselines import FullFineTuning, Lora
from .flasc import Flasc
from .slora import FLora, SLora
from .sparse import BitFit, SparseFineTuning

METHODS: dict[str, type[Method]] = {m.name: m for m in (FullFineTuning, Lora, SparseFineTuning, SLora, FLora,
                                                        BitFit, Houlsby, Pfeiffer, Flasc)}


def method_config_from_dict(raw: dict | None):
    raw = dict(raw or {})
    name = raw.get("name", "lora")
    if name not in METHODS:
        raise ConfigError(f"method.name: unknown method {name!r}; allowed: {sorted(METHODS)}")
    return from_dict(METHODS[name].Config, raw, "method")


HEAD = "head"
HEAD_FIELDS = ("modules_to_save", "dense_patterns")


def resolve_head(cfg, head: tuple[str, ...]):
    """The method config with the word "head" in its module lists (modules_to_save, dense_patterns, nested
    tables too) replaced by the task's head modules, so config.toml and the wire carry real module names."""
    import dataclasses

    changes = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            resolved = resolve_head(value, head)
            if resolved is not value:
                changes[f.name] = resolved
        elif f.name in HEAD_FIELDS and HEAD in value:
            changes[f.name] = [m for v in value for m in (head if v == HEAD else (v,))]
    return dataclasses.replace(cfg, **changes) if changes else cfg


def make_method(run) -> Method:
    return METHODS[run.method.name](run.method, run)


def describe_methods() -> list[tuple[str, str]]:
    return [(name, cls.summary) for name, cls in METHODS.items()]


def describe_method_fields(name: str) -> list[tuple[str, str, str]]:
    """(key, default, help) of every field of method `name`'s [method] table, nested tables dotted."""
    import dataclasses

    if name not in METHODS:
        raise ConfigError(f"methods: unknown method {name!r}; allowed: {sorted(METHODS)}")

    def rows(cls, prefix: str):
        default = cls()
        for f in dataclasses.fields(cls):
            value = getattr(default, f.name)
            if dataclasses.is_dataclass(value):
                yield from rows(type(value), f"{prefix}{f.name}.")
            else:
                yield f"{prefix}{f.name}", repr(value), f.metadata.get("help", "")

    return list(rows(METHODS[name].Config, ""))


__all__ = ["METHODS", "Instruction", "Method", "MethodConfig", "ModelHost", "make_method", "resolve_head", "method_config_from_dict",
           "describe_methods", "describe_method_fields"]
