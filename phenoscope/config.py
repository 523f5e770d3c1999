"""The one config mechanism: plain dataclasses, optionally filled from a TOML or JSON file.

Every configurable component defines a ``@dataclass`` of its options with defaults.
``load_config(Cls, path, overrides)`` builds one from a file and keyword overrides and
rejects unknown keys with a clear message. A file may start from another one with a top-level
``extends = "other.toml"`` (relative to the file): its tables are merged over the other's, key by key.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


def _check_keys(cls: type, data: dict[str, Any], where: str) -> None:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} in {where}; known options: {sorted(known)}")


def from_dict(cls: type[T], data: dict[str, Any], where: str = "config") -> T:
    """Build dataclass ``cls`` from a (possibly nested) dict; nested dataclass fields recurse."""
    _check_keys(cls, data, where)
    kwargs = {}
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key, value in data.items():
        ftype = fields[key].type
        sub = _dataclass_type(cls, ftype)
        kwargs[key] = from_dict(sub, value, f"{where}.{key}") if sub and isinstance(value, dict) else value
    return cls(**kwargs)


def _dataclass_type(owner: type, annotation: Any) -> type | None:
    if isinstance(annotation, str):  # postponed annotations
        import sys

        annotation = getattr(sys.modules[owner.__module__], annotation, None)
    return annotation if dataclasses.is_dataclass(annotation) else None


def load_config(cls: type[T], path: str | Path | None = None, **overrides: Any) -> T:
    """Load ``cls`` from a ``.toml`` or ``.json`` file (optional, may ``extends``), then apply ``overrides``."""
    data = _read_config_file(Path(path)) if path is not None else {}
    data.update({k: v for k, v in overrides.items() if v is not None})
    return from_dict(cls, data, where=str(path) if path else "config")


def _read_config_file(path: Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The nested dict of a ``.toml`` / ``.json`` config, with its ``extends`` chain resolved."""
    if not path.exists():
        raise FileNotFoundError(f"config file not found: {path}")
    if path.resolve() in _seen:
        raise ValueError(f"config files extend each other in a cycle: {' -> '.join(map(str, (*_seen, path)))}")
    if path.suffix == ".toml":
        data = tomllib.loads(path.read_text())
    elif path.suffix == ".json":
        data = json.loads(path.read_text())
    else:
        raise ValueError(f"config file must be .toml or .json, got {path.name}")
    base = data.pop("extends", None)
    if base is None:
        return data
    return _merge(_read_config_file(path.parent / base, (*_seen, path.resolve())), data)


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """``top`` over ``base``; tables (dicts) merge recursively, other values replace."""
    out = dict(base)
    for key, value in top.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def to_dict(cfg: Any) -> dict[str, Any]:
    """Dataclass → plain dict (JSON-serialisable for simple field types)."""
    return dataclasses.asdict(cfg)
