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


__all__ = ["METHODS", "Instruction", "Method", "MethodConfig", "ModelHost", "make_method", "method_config_from_dict",
           "describe_methods", "describe_method_fields"]
