"""What every network config shares: built from a checkpoint's ``config.json`` dict, written
back without the runtime fields (dtypes and the like), validated at construction."""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar


class ConfigBase:
    """Mixin for frozen config dataclasses.

    Subclasses set ``RUNTIME_FIELDS`` (not part of the checkpoint), ``TAG`` (the source class
    marker written back, e.g. ``{"_class_name": ...}``), ``STRICT`` (unknown fields are an error,
    for configs whose every field changes the architecture) and ``IGNORED`` (known-harmless extras).
    """
    RUNTIME_FIELDS: ClassVar[tuple[str, ...]] = ("dtype", "param_dtype")
    TAG: ClassVar[dict[str, Any]] = {}
    STRICT: ClassVar[bool] = False
    IGNORED: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def source_fields(cls, d: dict) -> dict:
        return d

    @classmethod
    def from_dict(cls, d: dict, **overrides):
        d = cls.source_fields(d)
        names = {f.name for f in dataclasses.fields(cls)}
        if cls.STRICT:
            unknown = sorted(k for k in d if k not in names and k not in cls.IGNORED and not k.startswith("_"))
            if unknown:
                raise ValueError(f"{cls.__name__}: the config has fields this port does not know: {unknown}")
        kw = {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items() if k in names}
        cfg = cls(**{**kw, **overrides})
        cfg.validate()
        return cfg

    def to_dict(self, runtime: bool = False) -> dict:
        d = dataclasses.asdict(self)
        if not runtime:
            for k in self.RUNTIME_FIELDS:
                d.pop(k, None)
        d.update(self.TAG)
        return d

    def validate(self) -> None:
        pass
