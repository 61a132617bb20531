"""`valleyforge shards build`: annotation files + media -> webdataset shards, in parallel,
resumably and reproducibly.

The input records are cut into chunks of `samples_per_shard` records; each chunk is built by
one worker process into one shard (more when it passes `max_shard_bytes`), and recorded as
done in OUT/.build/chunk-NNNNNN.json once its shards are renamed into place. A build run
again skips done chunks. When every chunk is done, rejects.jsonl and then manifest.json are
written. Shard contents depend only on the inputs and options, so they are byte-identical
from one build to the next.

    OUT/shard-000000-00.tar ...   the shards (chunk, part)
    OUT/rejects.jsonl             one line per rejected input sample: source, id, reason, detail
    OUT/manifest.json             shards, counts, bytes, sha256, source statistics, reject counts
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from pathlib import Path

from tqdm import tqdm

from data_shards.errors import ValleyForgeError
from data_shards.manifest import ShardEntry, sha256_file, write_manifest
from data_shards.tokenizer import token_counter
from data_shards.write.annotations import Record, read_records
from data_shards.write.ingest import IngestOptions, Rejected, ingest
from data_shards.write.writer import tar_bytes, tar_file_bytes, write_shard

STATE_DIR = ".build"


@dataclass(frozen=True)
class BuildOptions:
    ingest: IngestOptions
    samples_per_shard: int = 1000
    max_shard_bytes: int = 1 << 30
    tokenizer: str | None = None  # a tokenizer folder to count tokens; None counts words


@dataclass
class BuildSummary:
    out: Path
    num_input: int
    num_written: int
    rejects: dict[str, int]
    shards: int
    skipped_chunks: int = 0
    statistics: dict = field(default_factory=dict)


def _write_json_atomic(path: Path, body) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(body, indent=1, sort_keys=True, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def build_chunk(chunk: int, records: list[Record], out: Path, options: BuildOptions) -> dict:
    """Build one chunk's shard(s) and mark the chunk done; returns what the done file holds."""
    count_tokens = token_counter(options.tokenizer)
    shards, rejects, stats, part = [], [], [], []

    def flush():
        if part:
            shards.append(vars(write_shard(out / f"shard-{chunk:06d}-{len(shards):02d}.tar", part)))
            part.clear()

    part_bytes = 0
    for record in records:
        try:
            sample, sample_stats = ingest(record, options.ingest, count_tokens)
        except Rejected as err:
            rejects.append({"source": record.source, "id": record.id, "reason": err.reason, "detail": err.detail})
            continue
        size = tar_bytes(sample)
        if part and tar_file_bytes(part_bytes + size) > options.max_shard_bytes:
            flush()
            part_bytes = 0
        part.append(sample)
        part_bytes += size
        stats.append(sample_stats)
    flush()
    done = {"chunk": chunk, "records": len(records), "shards": shards, "rejects": rejects, "stats": stats}
    _write_json_atomic(out / STATE_DIR / f"chunk-{chunk:06d}.json", done)
    return done


def _build_chunk_job(args) -> dict:
    return build_chunk(*args)


def _fingerprint(annotations: list[str], options: BuildOptions, num_records: int) -> dict:
    return {
        "annotations": [[str(Path(a).absolute()), sha256_file(Path(a))] for a in annotations],
        "options": asdict(options),
        "num_records": num_records,
    }


def _statistics(stats: list[dict]) -> dict:
    kinds = Counter(s["kind"] for s in stats)
    seconds = [s["seconds"] for s in stats if "seconds" in s]
    return {
        "samples_by_kind": dict(kinds),
        "video_seconds_total": round(sum(seconds), 3),
        "video_seconds_mean": round(sum(seconds) / len(seconds), 3) if seconds else 0.0,
        "media_bytes_in": sum(s["bytes_in"] for s in stats),
        "sample_bytes_out": sum(s["bytes_out"] for s in stats),
    }


def build_shards(
    annotations: list[str], out: str | Path, options: BuildOptions, workers: int = 1, show_progress: bool = True
) -> BuildSummary:
    out = Path(out)
    records = read_records(annotations)
    if not records:
        raise ValleyForgeError(f"{', '.join(map(str, annotations))}: no samples in the annotation file(s)")
    state_dir = out / STATE_DIR
    state_dir.mkdir(parents=True, exist_ok=True)
    fingerprint = _fingerprint(annotations, options, len(records))  # what this build is of
    fingerprint_file = state_dir / "fingerprint.json"
    if fingerprint_file.is_file() and json.loads(fingerprint_file.read_text()) != json.loads(json.dumps(fingerprint)):
        raise ValleyForgeError(
            f"{out}: holds a build of other annotations or options; resume it with the same "
            f"command, or build into an empty --out"
        )
    _write_json_atomic(fingerprint_file, fingerprint)

    size = options.samples_per_shard
    chunks = [records[i : i + size] for i in range(0, len(records), size)]
    done_files = {i: state_dir / f"chunk-{i:06d}.json" for i in range(len(chunks))}
    pending = [i for i in range(len(chunks)) if not done_files[i].is_file()]
    jobs = [(i, chunks[i], out, options) for i in pending]
    with tqdm(
        total=sum(len(chunks[i]) for i in pending), unit="sample", desc=f"building {out}", disable=not show_progress
    ) as bar:
        if workers > 1 and len(jobs) > 1:
            with get_context("fork").Pool(min(workers, len(jobs))) as pool:
                for done in pool.imap_unordered(_build_chunk_job, jobs):
                    bar.update(done["records"])
        else:
            for job in jobs:
                bar.update(build_chunk(*job)["records"])
    return _finish(
        out,
        [json.loads(done_files[i].read_text()) for i in range(len(chunks))],
        len(records),
        annotations,
        options,
        skipped=len(chunks) - len(pending),
    )


def _finish(
    out: Path, done: list[dict], num_input: int, annotations: list[str], options: BuildOptions, skipped: int
) -> BuildSummary:
    """rejects.jsonl, then the manifest (last: its presence means the build is complete)."""
    shards = [ShardEntry(**s) for d in done for s in d["shards"]]
    rejects = [r for d in done for r in d["rejects"]]
    stats = [s for d in done for s in d["stats"]]
    tmp = out / "rejects.jsonl.tmp"
    tmp.write_text("".join(json.dumps(r, sort_keys=True, ensure_ascii=False) + "\n" for r in rejects))
    os.replace(tmp, out / "rejects.jsonl")
    written = sum(s.samples for s in shards)
    assert written + len(rejects) == num_input, "every input sample is written or rejected"
    reject_counts = dict(sorted(Counter(r["reason"] for r in rejects).items()))
    statistics = _statistics(stats)
    write_manifest(
        out,
        shards,
        {
            "source": {"annotations": [str(a) for a in annotations], "media_root": options.ingest.media_root},
            "build_options": asdict(options),
            "num_input_samples": num_input,
            "num_rejected": len(rejects),
            "rejects": reject_counts,
            "source_statistics": statistics,
        },
    )
    return BuildSummary(out, num_input, written, reject_counts, len(shards), skipped, statistics)
