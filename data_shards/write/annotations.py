"""Read annotation files into records, one per input sample, bad ones included.

Formats (by extension):
- `.json`: a list of LLaVA / Valley / Video-ChatGPT samples: `id`, `video` or `image` (a path
  under the media root), `conversations` [{from: human|gpt, value}] with `<video>`/`<image>`;
- `.jsonl`: one such sample per line, or one caption row per line (`video`|`image` + `caption`);
- `.csv`: caption rows with a header: a media column (`video`, `image`, `path` or `media`)
  and `caption`.
A line that is not JSON or not UTF-8 still becomes a record, carrying its error, so every
input sample is either written or rejected with a reason.
"""

from __future__ import annotations

import csv
import io
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from data_shards.errors import ValleyForgeError

MEDIA_COLUMNS = ("video", "image", "path", "media")
_SURROGATE = re.compile("[\udc80-\udcff]")


@dataclass
class Record:
    index: int  # position among all input samples
    source: str  # "file:line" (or "file:#item" for a JSON list)
    fields: dict = field(default_factory=dict)
    error: tuple[str, str] | None = None  # (reason, detail) when the record is already unusable

    @property
    def id(self) -> str:
        return str(self.fields.get("id", "")) if self.fields else ""


def _has_bad_utf8(value) -> bool:
    if isinstance(value, str):
        return bool(_SURROGATE.search(value))
    if isinstance(value, dict):
        return any(_has_bad_utf8(k) or _has_bad_utf8(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_bad_utf8(v) for v in value)
    return False


def _checked(index: int, source: str, fields) -> Record:
    if not isinstance(fields, dict):
        return Record(index, source, {}, ("bad record", f"expected an object, got {type(fields).__name__}"))
    if _has_bad_utf8(fields):
        return Record(index, source, fields, ("invalid utf-8", "text holds bytes that are not UTF-8"))
    return Record(index, source, fields)


def _read_text(path: Path) -> str:
    # surrogateescape keeps undecodable bytes visible per record instead of failing the file
    return path.read_bytes().decode("utf-8", errors="surrogateescape")


def read_records(paths: list[str | Path], start_index: int = 0) -> list[Record]:
    """Records of every annotation file, in the order given; errors name the file."""
    records: list[Record] = []
    for path in map(Path, paths):
        if not path.is_file():
            raise ValleyForgeError(f"{path}: annotation file not found")
        suffix = path.suffix.lower()
        if suffix == ".json":
            records += _read_json_list(path, start_index + len(records))
        elif suffix == ".jsonl":
            records += _read_jsonl(path, start_index + len(records))
        elif suffix == ".csv":
            records += _read_csv(path, start_index + len(records))
        else:
            raise ValleyForgeError(f"{path}: unknown annotation format {suffix!r}; use .json, .jsonl or .csv")
    return records


def _read_json_list(path: Path, start: int) -> list[Record]:
    try:
        items = json.loads(_read_text(path))
    except json.JSONDecodeError as err:
        raise ValleyForgeError(
            f"{path}: not valid JSON ({err}); a JSON file must hold one list of samples "
            f"(write JSONL to keep the good lines of a damaged file)"
        ) from err
    if not isinstance(items, list):
        raise ValleyForgeError(f"{path}: expected a JSON list of samples, found {type(items).__name__}")
    return [_checked(start + i, f"{path}:#{i}", item) for i, item in enumerate(items)]


def _read_jsonl(path: Path, start: int) -> list[Record]:
    records = []
    for line_no, line in enumerate(_read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        source, index = f"{path}:{line_no}", start + len(records)
        try:
            records.append(_checked(index, source, json.loads(line)))
        except json.JSONDecodeError as err:
            reason = "invalid utf-8" if _SURROGATE.search(line) else "broken json"
            records.append(Record(index, source, {}, (reason, str(err))))
    return records


def _read_csv(path: Path, start: int) -> list[Record]:
    reader = csv.DictReader(io.StringIO(_read_text(path), newline=""))
    columns = reader.fieldnames or []
    media = next((c for c in MEDIA_COLUMNS if c in columns), None)
    if media is None or "caption" not in columns:
        raise ValleyForgeError(
            f"{path}: a caption table needs a header with `caption` and one of {list(MEDIA_COLUMNS)}; found {columns}"
        )
    records = []
    for row in reader:
        fields = {k: v for k, v in row.items() if k is not None}
        if media not in ("video", "image"):
            fields["media"] = fields.pop(media)
        records.append(_checked(start + len(records), f"{path}:{reader.line_num}", fields))
    return records
