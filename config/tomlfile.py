"""Settings files in TOML, validated by a pydantic model, failing with the variable named."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel, ValidationError

M = TypeVar("M", bound=BaseModel)


def read_toml(path: Path, model: type[M], variable: str, error: type[Exception]) -> M:
    """`model` from the file at `path`; `error("<variable> <path>: <field>: <problem>; ...")`
    when it cannot be read, is not TOML, or does not validate."""
    try:
        return model.model_validate(tomllib.loads(path.read_text()))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise error(f"{variable} {path}: {exc}") from exc
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()
        )
        raise error(f"{variable} {path}: {problems}") from None
