"""Streaming at scale: shard URLs through fsspec (http, memory), brace ranges, globs and pipes;
weighted mixtures; read-time skips counted and the run stopped past the threshold."""

import functools
import http.server
import io
import json
import threading
from collections import Counter
from pathlib import Path

import fsspec
import pytest

from data_shards.config import DataSource, ReaderConfig
from data_shards.conversation import get_template
from data_shards.errors import ValleyForgeError
from data_shards.manifest import read_manifest
from data_shards.media import VisualSpec
from data_shards.read.health import ReadHealth, TooManySkipped
from data_shards.read.reader import Topology, build_loader, shard_lists
from data_shards.read.sources import expand_braces, shard_urls
from data_shards.read.tarstream import iter_samples
from data_shards.tokenizer import build_word_tokenizer
from data_shards.write.synth import vocabulary
from data_shards.write.writer import SplitWriter

pytestmark = pytest.mark.unit
VISUAL = VisualSpec(num_frames=2, image_size=16, tokens_per_video=3, tokens_per_image=2)
TOKENIZER = build_word_tokenizer(vocabulary())


def ordered_keys(spec, batches=4, batch_size=8):
    cfg = ReaderConfig(micro_batch_size=batch_size, num_workers=0)
    loader = build_loader(spec, cfg, TOKENIZER, get_template("plain"), VISUAL, Topology(), train=False)
    return [k for _ in range(batches) for k in next(loader)["keys"]]


def test_brace_ranges_expand_with_padding():
    assert expand_braces("s3://b/x-{008..011}.tar") == [f"s3://b/x-{i:03d}.tar" for i in range(8, 12)]
    assert expand_braces("a{0..1}/{p,q}.tar") == ["a0/p.tar", "a0/q.tar", "a1/p.tar", "a1/q.tar"]


class RangeHandler(http.server.SimpleHTTPRequestHandler):
    """Serves `Range: bytes=N-` requests, as object stores do."""

    def log_message(self, *args):
        pass

    def send_head(self):
        ranged = self.headers.get("Range", "")
        if not ranged.startswith("bytes="):
            return super().send_head()
        path = self.translate_path(self.path)
        data = open(path, "rb").read()
        start, _, end = ranged[len("bytes=") :].partition("-")
        start, end = int(start), min(int(end) if end else len(data) - 1, len(data) - 1)
        self.send_response(206)
        self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
        self.send_header("Content-Length", str(end - start + 1))
        self.end_headers()
        return io.BytesIO(data[start : end + 1])


class PlainHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture(params=[RangeHandler, PlainHandler], ids=["ranges", "no-ranges"])
def http_shards(synth_data, request):
    """The held-out caption shards served over HTTP on 127.0.0.1, with and without range requests."""
    directory = synth_data / "captions" / "heldout"
    handler = functools.partial(request.param, directory=str(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}", directory
    server.shutdown()


def test_local_http_memory_glob_and_pipe_sources_read_the_same(http_shards):
    base_url, directory = http_shards
    local = ordered_keys(str(directory))
    count = len(read_manifest(directory).shards)
    last = f"{count - 1:06d}"
    assert ordered_keys(f"{base_url}/shard-{{000000..{last}}}.tar") == local
    assert ordered_keys(f"{directory}/shard-*.tar") == local
    assert ordered_keys(f"pipe:cat {directory}/shard-{{000000..{last}}}.tar") == local
    memory = fsspec.filesystem("memory")
    for path in sorted(directory.glob("*.tar")):
        memory.pipe(f"/shards/{path.name}", path.read_bytes())
    assert ordered_keys("memory://shards/shard-*.tar") == local
    # resuming reads a remote shard from a byte offset (a range request, else reading forward)
    url = shard_urls(f"{base_url}/shard-000001.tar")[0]
    samples = list(iter_samples(url))
    assert [s.key for s in iter_samples(url, samples[2].offset)] == [s.key for s in samples[2:]]


def test_ranks_read_the_shard_lists_the_driver_expanded(tmp_path, synth_data):
    """A glob expanded once is what every rank splits, whatever appears in the store after."""
    shards = read_manifest(synth_data / "captions" / "train").urls
    for shard in shards[:2]:
        (tmp_path / Path(shard).name).write_bytes(Path(shard).read_bytes())
    lists = shard_lists(f"{tmp_path}/*.tar")
    (tmp_path / "a-late.tar").write_bytes(Path(shards[2]).read_bytes())  # one more, first in glob order
    expected = sorted(s.key for shard in shards[:2] for s in iter_samples(shard))
    assert sorted(ordered_keys(lists, batches=len(expected) // 8)) == expected
    assert len(shard_lists(f"{tmp_path}/*.tar").shards[0]) == 3  # expanding again would read it


def test_missing_sources_are_named(tmp_path):
    with pytest.raises(ValleyForgeError, match="matches no shards"):
        shard_urls(f"{tmp_path}/*.tar")
    with pytest.raises(ValleyForgeError, match="2 shard\\(s\\) not found"):
        shard_urls(f"{tmp_path}/x-{{0..1}}.tar")


def test_unknown_store_is_named_before_reading():
    with pytest.raises(ValleyForgeError, match="nosuchstore"):
        shard_urls("nosuchstore://bucket/a-{0..1}.tar")


def test_truncated_shard_counts_a_corrupt_member_and_reading_goes_on(tmp_path, synth_data):
    source = read_manifest(synth_data / "captions" / "heldout")
    for i, url in enumerate(source.urls[:2]):
        (tmp_path / f"s{i}.tar").write_bytes(open(url, "rb").read())
    first = tmp_path / "s0.tar"
    samples = list(iter_samples(str(first)))
    cut = samples[2].offset + 700  # inside the third sample's first member
    first.write_bytes(first.read_bytes()[:cut])
    cfg = ReaderConfig(micro_batch_size=len(samples), num_workers=0)
    batch = next(build_loader(f"{tmp_path}/s*.tar", cfg, TOKENIZER, get_template("plain"), VISUAL, Topology(), False))
    assert batch["rejected"] == {"corrupt tar member": 1}
    assert batch["keys"][:2] == [s.key for s in samples[:2]]  # read up to the damage, then the next shard
    assert batch["seen"] == len(samples) + 1


def test_resampled_mixture_follows_weights_and_epoch_mixture_reads_each_sample_once(synth_data):
    captions, instruct = str(synth_data / "captions" / "train"), str(synth_data / "instruct" / "train")
    sources = [DataSource(url=captions, weight=0.8), DataSource(url=instruct, weight=0.2)]
    cfg = ReaderConfig(micro_batch_size=10, num_workers=0, shuffle_buffer=1, mixing="resampled")
    loader = build_loader(sources, cfg, TOKENIZER, get_template("plain"), VISUAL, Topology(), train=True)
    keys = [k for _ in range(60) for k in next(loader)["keys"]]
    from_captions = sum(k.startswith(("caption", "image_caption")) for k in keys) / len(keys)
    assert 0.75 < from_captions < 0.85, from_captions

    cfg = cfg.model_copy(update={"mixing": "epoch", "micro_batch_size": 16})
    loader = build_loader(sources, cfg, TOKENIZER, get_template("plain"), VISUAL, Topology(), train=True)
    epoch = [k for _ in range(32) for k in next(loader)["keys"]]  # 512 = both sources' 256 samples
    counts = Counter(epoch)
    assert len(counts) == 512 and set(counts.values()) == {1}


def test_skip_rate_past_threshold_stops_naming_the_shard(tmp_path, synth_data):
    good = read_manifest(synth_data / "captions" / "heldout")
    samples = [{"__key__": s.key, **s.members} for s in iter_samples(good.urls[0])]
    writer = SplitWriter(tmp_path / "split", samples_per_shard=len(samples) + 2)
    for s in samples:
        writer.write(s)
    writer.write({"__key__": "bad-a", "json": samples[0]["json"], "mp4": b"\x00" * 64})
    writer.write({"__key__": "bad-b", "json": b"{", "mp4": samples[0]["mp4"]})
    for s in samples:
        writer.write({**s, "__key__": s["__key__"] + "-again"})
    writer.close()
    cfg = ReaderConfig(micro_batch_size=2, num_workers=0)
    loader = build_loader(str(tmp_path / "split"), cfg, TOKENIZER, get_template("plain"), VISUAL, Topology(), False)
    lenient, strict = ReadHealth(0.5, min_samples=1), ReadHealth(0.01, min_samples=len(samples) + 2)
    for _ in range(len(samples)):
        batch = next(loader)
        lenient.add_batch(batch)
        lenient.check()
        strict.add_batch(batch)
        if strict.seen >= len(samples) + 2:
            break
    with pytest.raises(TooManySkipped) as err:
        strict.check()
    shard = str(tmp_path / "split" / "shard-000000.tar")
    assert f"most in shard {shard} (1 broken json, 1 undecodable media)" in str(err.value)
    assert lenient.metrics()["data/rejected/undecodable_media"] == 1
    assert json.loads(json.dumps(strict.state_dict()))["seen"] == strict.seen
