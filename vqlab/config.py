"""The config side of the seam: `QuantConfig`, the base of every method's config, and the handler registry.

After torchao (`core/config.py`, `quantization/transform_module.py`): a method is a frozen dataclass config whose
`__post_init__` validates its fields, plus a handler registered for its type with `@register_handler(ConfigClass)`
that turns float layers into quantized ones.  A config holds the method's own knobs only; which layers a model
quantizes is decided by `quantize_`'s arguments (`filter_fn`, `overrides`), never by a config field.

Every method has one name, `name` (a class attribute): the report's status, the code kind a file records, the
label of plots and tables.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar, Iterator

import torch.nn as nn

from .layers import check_layer

__all__ = ["QuantConfig", "register_handler", "handler_for", "HANDLERS", "Handler", "method_name"]

Handler = Callable[[list[tuple[str, nn.Module]], object], Iterator[tuple[str, nn.Module]]]
HANDLERS: dict[type, Handler] = {}


@dataclass(frozen=True)
class QuantConfig:
    """Base of the methods' configs.  Subclasses are `@dataclass(frozen=True)`, set `name`, check their fields in
    `validate()` (ValueError / TypeError naming "<Config>.<field>" and the value, `vqlab.checks`) and may
    refine `check(module, name)`, which `quantize_` calls on every chosen layer before changing anything."""

    name: ClassVar[str] = ""

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Check every field; raise naming the field and the value."""

    def check(self, module: nn.Module, name: str) -> None:
        """Raise a clear error if this config cannot quantize `module` (named `name`)."""
        check_layer(module, name, self.name or type(self).__name__)

    def field_name(self, field: str) -> str:
        """"<Config>.<field>", how errors name a field."""
        return f"{type(self).__name__}.{field}"


def method_name(config) -> str:
    """The one name of a config's method (its `name`; "quantized" for a config without one)."""
    return getattr(config, "name", "") or "quantized"


def register_handler(config_cls: type) -> Callable[[Handler], Handler]:
    """Register `handler(modules, config)` for a config class.

    The handler gets every (name, module) the config was chosen for (in model order, so shared state such as one
    codebook can be fit on all of them) and yields (name, new_module) pairs.  A config class may define
    `check(module, name)`; quantize_ calls it on every layer first.
    """
    def deco(fn: Handler) -> Handler:
        HANDLERS[config_cls] = fn
        return fn
    return deco


def handler_for(config) -> Handler:
    """The handler registered for `config`'s type; TypeError listing the registered configs otherwise."""
    handler = HANDLERS.get(type(config))
    if handler is None:
        raise TypeError(f"config must be one of {[c.__name__ for c in HANDLERS]}, got {type(config).__name__}")
    return handler
