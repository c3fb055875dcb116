"""One way to turn a pydantic ValidationError into the one-line message our errors carry.

    try:
        Model.model_validate(data)
    except ValidationError as e:
        raise ConfigError(f"{path}: {describe_validation_error(e)}") from e
"""

from __future__ import annotations

from pydantic import ValidationError


def describe_validation_error(e: ValidationError, *, top: str = "(top level)") -> str:
    """``field 'a.b': message`` (or ``unknown key 'a.b'``) for the first error, with a
    count of the others."""
    err = e.errors()[0]
    # keys come from the user's file: escape them so the message stays one line
    loc = ".".join(str(p) for p in err["loc"]).encode("unicode_escape").decode() or top
    more = f" (and {e.error_count() - 1} more)" if e.error_count() > 1 else ""
    if err["type"] == "extra_forbidden":
        return f"unknown key '{loc}'{more}"
    return f"field '{loc}': {err['msg']}{more}"
