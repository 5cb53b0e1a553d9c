"""The teacher cache's bytes: how teacher outputs are written to and read from cache shards.

`kd_core/cache/format.py` is the codec (`CacheLayout`: bit-packed top-k, sampled, full and reward
columns of Arrow IPC shards); `cache_shards` lists a cache manifest's shards of a split. The
cache stage that writes them is `kd_core/stages/cache.py`; readers (the training stream, a search's
trials) need only this package.
"""

from __future__ import annotations

from kd_core.manifest import Manifest
from kd_core.storage import FileRecord


SYNTHETIC = "synthetic"
"""The cache's split of rows a task added for the teacher to label (`Task.synthetic_rows`)."""


def synthetic_inputs(cache_manifest: Manifest) -> list[FileRecord]:
    """The input shards of the cache's synthetic rows, in the order of their cache shards ([]: none)."""
    return [cache_manifest.output(name) for name in cache_manifest.details.get("synthetic_rows", {}).get("shards", [])]


def cache_shards(cache_manifest: Manifest, split: str = "train") -> list[FileRecord]:
    """The cache's shard records of a split, in the order of that split's token shards (a cache
    of validation targets also holds `val`; shards listed without a split are `train`)."""
    shards = cache_manifest.details["shards"]
    return [cache_manifest.output(shard["name"]) for shard in shards if shard.get("split", "train") == split]
