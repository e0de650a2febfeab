"""Environment switches of the acceleration options: ``auto`` (the default), ``1`` / ``0`` (and their spellings)."""

from __future__ import annotations

import os

ON = ("1", "true", "yes", "on")
OFF = ("0", "false", "no", "off")


def env_switch(name: str) -> bool | None:
    """True for an "on" spelling of the variable ``name``, False for an "off" one, None (auto) when it is unset,
    ``auto`` or anything else."""
    raw = os.environ.get(name, "auto").strip().lower()
    if raw in ON:
        return True
    if raw in OFF:
        return False
    return None
