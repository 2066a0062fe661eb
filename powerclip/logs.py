"""Logging set-up for the workflow scripts: everything (logging, warnings, tqdm, tracebacks) goes to the rule's log."""

from __future__ import annotations

import atexit
import json
import logging
import os
import sys
from pathlib import Path


def log_to_file(path, level: int = logging.INFO, rule: str | None = None):
    """Send logging and stderr of this process to ``path`` (appending); returns the open file.

    ``rule`` names the Snakemake rule (for the import record of the tests; default: from the log path)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    stream = open(path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115 - lives as long as the process
    sys.stderr = stream
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        handlers=[logging.StreamHandler(stream)],
        force=True,
    )
    logging.captureWarnings(True)
    record_imports(rule or rule_of_log(path))
    return stream


RECORD_IMPORTS_ENV = "POWERCLIP_RECORD_IMPORTS"


def record_imports(rule: str) -> None:
    """If $POWERCLIP_RECORD_IMPORTS names a directory, write this process's imported top-level modules
    there at exit (``<rule>-<pid>.json``). The tests use it to check that each rule's conda env provides
    every package its job really imported."""
    target = os.environ.get(RECORD_IMPORTS_ENV)
    if not target:
        return

    def dump():
        names = sorted({name.split(".")[0] for name in list(sys.modules)})
        out = Path(target)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{rule}-{os.getpid()}.json").write_text(json.dumps({"rule": rule, "modules": names}))

    atexit.register(dump)


def rule_of_log(path) -> str:
    """`logs/<rule>/...` -> <rule> (every rule logs under logs/<rule>/)."""
    parts = Path(path).parts
    return parts[parts.index("logs") + 1] if "logs" in parts[:-1] else Path(path).stem
