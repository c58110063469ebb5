"""One named fix of megatron-core: for each module, attribute -> replacement, revertible."""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Callable


@dataclass
class Patch:
    """One named fix: for each module, attribute -> replacement."""

    name: str
    why: str
    targets: dict[str, dict[str, Callable[[], object]]]
    saved: dict = field(default_factory=dict)

    @staticmethod
    def _owner(mod_name: str, attr: str):
        """'Class.method' attributes are patched on the class."""
        owner = importlib.import_module(mod_name)
        *path, leaf = attr.split(".")
        for p in path:
            owner = getattr(owner, p)
        return owner, leaf

    def apply(self) -> None:
        for mod_name, attrs in self.targets.items():
            for attr, make in attrs.items():
                if (mod_name, attr) not in self.saved:
                    owner, leaf = self._owner(mod_name, attr)
                    orig = owner.__dict__[leaf] if isinstance(owner, type) else getattr(owner, leaf)
                    self.saved[(mod_name, attr)] = orig
                    setattr(owner, leaf, make(orig) if _takes_original(make) else make())

    def revert(self) -> None:
        for (mod_name, attr), orig in self.saved.items():
            owner, leaf = self._owner(mod_name, attr)
            setattr(owner, leaf, orig)
        self.saved.clear()


def _takes_original(make) -> bool:
    return make.__code__.co_argcount == 1
