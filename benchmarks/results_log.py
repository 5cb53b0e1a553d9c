"""Appending one benchmark run to its JSON-lines file, stamped with when, where and what ran.

Every record gets `date` (UTC), `machine` (architecture, cores, platform, plus `machine_detail`,
e.g. the GPU), `command` and the library versions, then the benchmark's own fields.
"""

from __future__ import annotations

import json
import os
import platform
from datetime import datetime, timezone
from pathlib import Path

from kd_core.manifest import library_versions


def append_result(path: Path, command: str, fields: dict, machine_detail: str = "") -> dict:
    record = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}" + (f", {machine_detail}" if machine_detail else ""),
        "command": command,
        **fields,
        "versions": library_versions(),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        handle.write(json.dumps(record) + "\n")
    return record
