"""The overlapped shard pipeline writes the same rows and objects as the serial one, byte for byte.

The overlapped path packs every statistic into one tensor, copies it back once and builds rows
on a thread while the next batch runs; the serial path reads each statistic back on its own,
one batch at a time. On the CPU both compute the same numbers, so any difference is a bug in
packing, unpacking or ordering.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Iterable
from pathlib import Path

import pytest
from pydantic import ValidationError

from schema.settings import Settings
from tests.shard_support import comparable, cpu_settings, objects, shard_work
from workers import shard
from workers.shard import WorkItem
from workers.storage import LocalStorage

CASES = {
    # several batches and a short last one, two targets per image, overlays from the sources
    "topk-overlay": {"target_spec": "topk:2", "overlay": True, "batch_size": 3},
    # per-item target failures in the middle of batches, three methods, a failed decode
    "labels": {"target_spec": "label", "batch_size": 4, "methods": ["gradcam", "eigencam", "cam"]},
    # the packed layout: one tar per method and layer, the rows' byte ranges into it
    "packed-overlay": {"target_spec": "topk:2", "overlay": True, "batch_size": 3, "layout": "packed"},
}


def _labelled(work: shard.ShardWork) -> shard.ShardWork:
    labels = ["1", "zebra", "0", "3", None, "2", "1", "4"]
    items = [
        WorkItem(id=item.id, source_uri=item.source_uri, label=labels[i % len(labels)])
        for i, item in enumerate(work.items)
    ]
    return dataclasses.replace(work, items=items)


@pytest.mark.parametrize("case", CASES)
def test_overlapped_rows_and_objects_equal_the_serial_ones(tmp_path: Path, case: str) -> None:
    options = dict(CASES[case])
    batch_size = options.pop("batch_size")
    settings = cpu_settings()
    works = {
        name: shard_work(tmp_path, 7, batch_size=batch_size, out=name, **options)
        for name in ("serial", "overlap")
    }
    if case == "labels":
        works = {name: _labelled(work) for name, work in works.items()}
    serial = shard.compute_shard(works["serial"], settings, overlap=False)
    threads: set[str] = set()
    real_build = shard._build_rows

    def build(*args, **kwargs):
        threads.add(threading.current_thread().name)
        return real_build(*args, **kwargs)

    shard._build_rows, saved = build, real_build
    try:
        overlapped = shard.compute_shard(works["overlap"], settings)
    finally:
        shard._build_rows = saved
    assert threads and all(name.startswith("rows") for name in threads)  # built off the main thread
    # the items in the serial order, not only the same set
    assert [row["id"] for row in overlapped.items] == [row["id"] for row in serial.items]
    assert comparable(overlapped) == comparable(serial)
    assert overlapped.n_failed == serial.n_failed > 0 and overlapped.n_done == serial.n_done > 0
    serial_objects, overlap_objects = objects(tmp_path / "serial"), objects(tmp_path / "overlap")
    assert serial_objects and overlap_objects == serial_objects
    if options.get("layout") == "packed":
        assert all(key.endswith(".tar") for key in serial_objects) and len(serial_objects) == 2
        assert all(row["object_offset"] is not None for row in serial.heatmaps)
    elif options.get("overlay"):
        assert any(key.endswith(".jpg") for key in serial_objects)


def test_rows_built_out_of_order_on_several_threads_are_applied_in_the_serial_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A GPU worker builds rows on several threads; the first batch here finishes building last."""
    settings = cpu_settings().model_copy(update={"row_workers": 3})
    works = {
        name: shard_work(tmp_path, 7, batch_size=2, out=name, target_spec="topk:2", layout="packed")
        for name in ("serial", "overlap")
    }
    serial = shard.compute_shard(works["serial"], settings, overlap=False)
    real_build = shard._build_rows
    second_built = threading.Event()
    finished: list[int] = []
    calls: list[int] = []
    lock = threading.Lock()

    def build(*args, **kwargs):
        with lock:
            call = len(calls)
            calls.append(call)
        if call == 0:
            assert second_built.wait(60), "the second batch was not built beside the first"
        built = real_build(*args, **kwargs)
        with lock:
            finished.append(call)
        if call == 1:
            second_built.set()
        return built

    monkeypatch.setattr(shard, "_build_rows", build)
    overlapped = shard.compute_shard(works["overlap"], settings)
    assert finished[:2] == [1, 0] and len(calls) > 2
    assert [row["id"] for row in overlapped.items] == [row["id"] for row in serial.items]
    assert comparable(overlapped) == comparable(serial)
    assert objects(tmp_path / "overlap") == objects(tmp_path / "serial")


def test_rows_get_one_thread_unless_set_and_processes_share_the_cores() -> None:
    auto = Settings()
    assert shard.pool_sizes(auto, remote_storage=False, cpus=16).rows == 1
    chosen = auto.model_copy(update={"row_workers": 5})
    assert shard.pool_sizes(chosen, remote_storage=False, cpus=2).rows == 5
    with pytest.raises(ValidationError, match="at least 1 thread"):
        Settings(row_workers=0)
    shared = Settings(worker_processes=4)  # one of four processes on 16 cores
    assert shard.pool_sizes(shared, remote_storage=False, cpus=16) == shard.PoolSizes(
        fetch=4, decode=4, encode=4, upload=4, rows=1
    )
    assert shard.pool_sizes(shared, remote_storage=False, cpus=2).decode == 1
    with pytest.raises(ValidationError):
        Settings(worker_processes=0)


def test_local_sources_are_read_by_decode_threads_and_s3_ones_by_the_fetch_pool(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A local read costs less than a hop between pools; an S3 read must never hold a decode thread."""
    settings = cpu_settings()
    local = shard_work(tmp_path, 5, batch_size=2, out="local")
    on_s3 = dataclasses.replace(
        local,
        output_uri=str(tmp_path / "s3"),
        items=[WorkItem(id=item.id, source_uri=f"s3://bucket/{item.id}", label=None) for item in local.items],
    )
    files = {f"s3://bucket/{item.id}": item.source_uri for item in local.items}
    readers: dict[str, str] = {}
    real_read = shard.read_source

    def read(uri: str, **kwargs: object) -> bytes:
        readers[uri] = threading.current_thread().name
        if uri.startswith("s3://"):
            return Path(files[uri]).read_bytes()  # the bucket's bytes, without a server
        return real_read(uri, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(shard, "read_source", read)
    from_folder = shard.compute_shard(local, settings)
    from_bucket = shard.compute_shard(on_s3, settings)

    local_readers = {readers[item.source_uri] for item in local.items}
    s3_readers = {readers[item.source_uri] for item in on_s3.items}
    assert local_readers and all(name.startswith("decode") for name in local_readers), local_readers
    assert s3_readers and all(name.startswith("fetch") for name in s3_readers), s3_readers
    assert (from_folder.n_done, from_folder.n_failed) == (from_bucket.n_done, from_bucket.n_failed) == (5, 1)
    assert objects(tmp_path / "local") == objects(tmp_path / "s3")


def test_rows_are_handed_over_while_the_storage_syncs_and_durable_waits_for_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The commit writes its rows during the shard's last uploads and sync; ``durable()`` is the
    barrier before it commits, and it raises when the sync fails."""
    syncing, release = threading.Event(), threading.Event()
    real_sync = LocalStorage.sync

    def slow_sync(self: LocalStorage, keys: Iterable[str] = ()) -> None:
        syncing.set()
        assert release.wait(30), "the test never released the sync"
        return real_sync(self, keys)

    monkeypatch.setattr(LocalStorage, "sync", slow_sync)
    work = shard_work(tmp_path, 5, batch_size=2, layout="packed")
    with shard.shard_results(work, cpu_settings()) as (rows, durable):
        assert syncing.wait(30), "the storage's sync never started"
        assert rows.n_done == 5 and all(row["sha256"] for row in rows.heatmaps)
        waiter = threading.Thread(target=durable)
        waiter.start()
        waiter.join(0.2)
        assert waiter.is_alive(), "durable() returned before the storage's sync did"
        release.set()
        waiter.join(30)
        assert not waiter.is_alive()
    assert {row["object_key"] for row in rows.heatmaps} <= set(objects(tmp_path / "out"))

    def failing_sync(self: LocalStorage, keys: Iterable[str] = ()) -> None:
        raise OSError("the disk is full")

    monkeypatch.setattr(LocalStorage, "sync", failing_sync)
    again = shard_work(tmp_path, 5, batch_size=2, layout="packed", out="again")
    failed = pytest.raises(OSError, match="disk is full")
    with failed, shard.shard_results(again, cpu_settings()) as (_, durable):
        durable()
