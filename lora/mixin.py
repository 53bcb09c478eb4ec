"""A mixin's forward for one module instance, the module staying what it was: its class becomes a subclass of the
mixin and its own class. One subclass per (mixin, class) pair: torch.compile guards on a module's type, and a class
per layer would make each block a graph of its own."""

from __future__ import annotations

from functools import cache

from torch import nn


def mix_in(module: nn.Module, mixin: type[nn.Module]) -> None:
    """Put ``mixin`` before ``module``'s class (once: a module that already has it is left as it is)."""
    if not isinstance(module, mixin):
        module.__class__ = _with_mixin(mixin, type(module))


@cache
def _with_mixin(mixin: type[nn.Module], cls: type[nn.Module]) -> type[nn.Module]:
    return type(f"{cls.__name__}{mixin.__name__}", (mixin, cls), {})
