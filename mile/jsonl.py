"""JSON files: reading JSONL task files (errors name the file and line), writing results atomically."""

from __future__ import annotations

import json
import os

from mile import paths


def read_records(path: str | os.PathLike, kind: str) -> list[tuple[str, dict]]:
    """(where, record) for each non-blank line; `where` is "path:line" for error messages."""
    if not paths.isfile(path):
        raise ValueError(f"{kind} file {path} does not exist; pass an existing JSONL file.")
    records = []
    with paths.open(path) as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{i}: not valid JSON ({e.msg}); fix the line.") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{i}: expected a JSON object; fix the line.")
            records.append((f"{path}:{i}", record))
    if not records:
        raise ValueError(f"{kind} file {path} has no examples; add JSONL lines.")
    return records


def write_json(path: str | os.PathLike, obj) -> None:
    """Write `obj` as JSON to `path` atomically (mile.paths: a rename locally, one object upload on
    gs://), so a kill mid-write never leaves a half-written result where a finished one was."""
    paths.write_text(path, json.dumps(obj, indent=1))
