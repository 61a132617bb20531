"""Turn one annotation record into one shard sample, or reject it with a reason.

Checks, in order: the record parsed; it has text (conversations, or a caption made into a
one-turn conversation); at least one assistant turn, turns alternating human/gpt; one
placeholder per medium and none without media; not over the token limit; the media file
exists, is not empty and decodes (a video needs frames). Then the media is optionally
transcoded and the sample assembled: `{key}.mp4|.webm|...|.jpg` + `{key}.json`.
"""

from __future__ import annotations

import io
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from PIL import Image

from data_shards.conversation import PLACEHOLDERS, TEMPLATES, SampleError, render_segments
from data_shards.frames import NoFrames, decode_at, index_video
from data_shards.media import IMAGE_EXTS, MEDIA_ERRORS, VIDEO_EXTS, media_kind
from data_shards.write.annotations import Record
from data_shards.write.transcode import TranscodeOptions, shrink_image, transcode_video

ROLE_ALIASES = {"human": "human", "user": "human", "gpt": "gpt", "assistant": "gpt"}
_PLACEHOLDER_RE = re.compile("|".join(map(re.escape, PLACEHOLDERS)))


class Rejected(Exception):
    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail


@dataclass(frozen=True)
class IngestOptions:
    media_root: str
    transcode: TranscodeOptions = TranscodeOptions()
    max_tokens: int = 4096


def _media_of(fields: dict) -> tuple[str | None, str | None]:
    """(kind, relative path) of the record's media; kind from the column, else the extension."""
    for kind in ("video", "image"):
        if fields.get(kind):
            return kind, str(fields[kind])
    path = fields.get("media")
    if not path:
        return None, None
    kind = media_kind(Path(path).suffix.lower().lstrip("."))
    if kind:
        return kind, path
    raise Rejected("unsupported media type", f"{path}: not one of {VIDEO_EXTS + IMAGE_EXTS}")


def conversation_of(fields: dict, media_kind: str | None) -> list[dict]:
    """The record's turns, roles normalised to human/gpt; a caption becomes one exchange."""
    if "conversations" in fields:
        turns = fields["conversations"]
        if not isinstance(turns, list) or not all(
            isinstance(t, dict) and isinstance(t.get("value"), str) for t in turns
        ):
            raise Rejected("bad conversation", "conversations must be a list of {from, value} objects")
        return [
            {"from": ROLE_ALIASES.get(str(t.get("from")).lower(), t.get("from")), "value": t["value"]} for t in turns
        ]
    caption = fields.get("caption")
    if not isinstance(caption, str) or not caption.strip():
        raise Rejected("no text", "neither conversations nor a caption")
    return [
        {"from": "human", "value": f"<{media_kind}>" if media_kind else ""},
        {"from": "gpt", "value": caption.strip()},
    ]


def check_conversation(
    turns: list[dict], media_kind: str | None, count_tokens: Callable[[str], int], max_tokens: int
) -> None:
    if not any(t["from"] == "gpt" for t in turns):
        raise Rejected("no assistant turn", f"{len(turns)} turn(s), none from gpt")
    try:
        render_segments(TEMPLATES["plain"], turns, eos="")
    except SampleError as err:
        raise Rejected(err.reason, str(err)) from err
    found = _PLACEHOLDER_RE.findall(" ".join(t["value"] for t in turns))
    expected = [f"<{media_kind}>"] if media_kind else []
    if found != expected:
        raise Rejected("placeholder mismatch", f"media is {media_kind or 'none'}, text has {found or 'none'}")
    tokens = count_tokens(" ".join(t["value"] for t in turns))
    if tokens > max_tokens:
        raise Rejected("too long", f"{tokens} tokens > {max_tokens}")


def _video(data: bytes, options: TranscodeOptions) -> tuple[bytes, dict]:
    try:
        if options.transcodes_video:
            return transcode_video(data, options)
        index = index_video(data)
        decode_at(data, index, [index.frame_pts[0], index.frame_pts[-1]])  # first and last frame decode
        return data, {"frames": len(index.frame_pts), "seconds": index.duration_s}
    except NoFrames as err:
        raise Rejected("zero-frame video", str(err)) from err
    except MEDIA_ERRORS as err:
        raise Rejected("undecodable video", f"{type(err).__name__}: {err}") from err


def _image(data: bytes, options: TranscodeOptions, ext: str) -> tuple[bytes, str, dict]:
    try:
        if options.image_max_side:
            data, ext, size = shrink_image(data, options.image_max_side)
        else:
            with Image.open(io.BytesIO(data)) as image:
                image.load()
                size = image.size
    except MEDIA_ERRORS as err:
        raise Rejected("undecodable image", f"{type(err).__name__}: {err}") from err
    return data, ext, {"width": size[0], "height": size[1]}


def ingest(record: Record, options: IngestOptions, count_tokens: Callable[[str], int]) -> tuple[dict, dict]:
    """(sample for the tar, statistics) or raises Rejected."""
    if record.error:
        raise Rejected(*record.error)
    media_kind, rel_path = _media_of(record.fields)
    turns = conversation_of(record.fields, media_kind)
    check_conversation(turns, media_kind, count_tokens, options.max_tokens)
    key = f"{record.index:09d}"
    body = {"id": record.id, "source": record.source, "conversations": turns}
    sample: dict[str, bytes] = {"__key__": key}
    stats = {"kind": media_kind or "text", "bytes_in": 0}
    if media_kind:
        path = Path(options.media_root) / rel_path
        if not path.is_file():
            raise Rejected("missing media", str(path))
        data = path.read_bytes()
        if not data:
            raise Rejected("empty media file", str(path))
        stats["bytes_in"] = len(data)
        ext = path.suffix.lower().lstrip(".")
        if media_kind == "video":
            if ext not in VIDEO_EXTS and not options.transcode.transcodes_video:
                raise Rejected("unsupported media type", f"{path}: not one of {VIDEO_EXTS}")
            data, info = _video(data, options.transcode)
            ext = "mp4" if options.transcode.transcodes_video else ext
        else:
            data, ext, info = _image(data, options.transcode, "jpg" if ext == "jpeg" else ext)
        stats.update(info)
        body["media"] = rel_path
        body.update({k: info[k] for k in ("seconds", "width", "height") if k in info})
        sample[ext] = data
    sample["json"] = json.dumps(body, sort_keys=True, ensure_ascii=False).encode("utf-8")
    stats["bytes_out"] = sum(len(v) for k, v in sample.items() if k != "__key__")
    return sample, stats
