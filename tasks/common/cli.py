"""Hydra's own errors (unknown key, missing config, bad override syntax) as one line, exit 1."""
from __future__ import annotations

import os
import sys
from typing import Callable

from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

# Lines of OmegaConf's messages that locate a key a second time.
_CONTEXT = ("full_key:", "object_type=", "reference_type=", "See https://hydra.cc")
_DROPPED = ("Config search path:",)


def one_line(exc: BaseException) -> str:
    """``exc`` and its cause on one line; a list Hydra prints one item a line is joined by commas."""
    parts: list[str] = []
    override = getattr(exc, "override", None)
    if override:
        parts.append(f"{override}:")
    for error, wrap in ((exc, "{}"), (exc.__cause__, "({})")):
        if error is not None:
            text = _join(str(error).splitlines())
            if text and text not in " ".join(parts):
                parts.append(wrap.format(text))
    return " ".join(parts)


def _join(lines: list[str]) -> str:
    sections: list[str] = []
    for line in lines:
        if line.startswith("\t") and sections:  # an item of the list the previous line opened
            sections[-1] += ("" if sections[-1].endswith(":") else ",") + " " + line.strip()
        elif line.strip() and not line.strip().startswith(_CONTEXT):
            sections.append(line.strip())
    return " ".join(s for s in sections if not s.startswith(_DROPPED))


_job = {"started": False}


def job_started() -> None:
    """Called first by the task function: from here on an error is the run's, not Hydra's."""
    _job["started"] = True


def run_main(hydra_main: Callable[[], object]) -> None:
    """Call a ``@hydra.main`` function; composition errors print one line and exit 1.

    Hydra prints these over several lines plus a hint; with ``HYDRA_FULL_ERROR=1`` it raises them
    instead, so they are caught here. A user who set ``HYDRA_FULL_ERROR=1`` still gets tracebacks.
    """
    full_error = os.environ.get("HYDRA_FULL_ERROR") == "1"
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        hydra_main()
    except (HydraException, OmegaConfBaseException) as exc:
        if full_error or _job["started"]:
            raise
        print(f"Error: {one_line(exc)}", file=sys.stderr)
        sys.exit(1)
