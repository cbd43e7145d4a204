"""Storage backends against a real folder and a real S3 API (moto over HTTP)."""

from __future__ import annotations

import hashlib
import os
import re
import threading
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from tests.plugins.s3 import TcpProxy
from workers import storage as storage_module
from workers.storage import (
    ConcurrentWriter,
    InvalidKeyError,
    LocalStorage,
    ObjectNotFoundError,
    PutResult,
    S3Storage,
    Storage,
    StorageError,
    UploadError,
    open_storage,
)


@pytest.fixture(params=["local", "s3"])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> Storage:
    if request.param == "local":
        return LocalStorage(tmp_path / "store", durable=False)  # the fsync path runs in the local-only tests
    url = request.getfixturevalue("s3_storage_url")
    return open_storage(url, endpoint_url=request.getfixturevalue("s3_endpoint_url"))


def test_put_get_exists_round_trip(storage: Storage) -> None:
    data = bytes(range(256)) * 3
    result = storage.put("runs/1/gradcam/layer4/item-7/3.png", data, "image/png")

    assert result.key == "runs/1/gradcam/layer4/item-7/3.png"
    assert result.size == len(data)
    assert result.sha256 == hashlib.sha256(data).hexdigest()
    assert storage.get(result.key) == data
    assert storage.exists(result.key)
    assert not storage.exists("runs/1/gradcam/layer4/item-7/4.png")
    with pytest.raises(ObjectNotFoundError, match=re.escape("item-7/4.png")):
        storage.get("runs/1/gradcam/layer4/item-7/4.png")


def test_s3_etag_is_md5_of_the_bytes(storage: Storage) -> None:
    data = b"heatmap bytes" * 100
    result = storage.put("a.bin", data)
    if isinstance(storage, S3Storage):
        assert result.etag == hashlib.md5(data).hexdigest()
    else:
        assert result.etag is None


def test_overwrite_replaces_the_object(storage: Storage) -> None:
    storage.put("k/one.png", b"first version, longer")
    second = storage.put("k/one.png", b"second")

    assert storage.get("k/one.png") == b"second"
    assert second.size == len(b"second")
    assert list(storage.list("k/")) == ["k/one.png"]


def test_list_by_prefix_is_a_string_prefix_in_byte_order(storage: Storage) -> None:
    keys = ["runs/1/a.png", "runs/1/b/c.png", "runs/10/a.png", "runs/2/a.png", "runs-x/a.png"]
    for key in keys:
        storage.put(key, key.encode())

    assert list(storage.list()) == sorted(keys)
    assert list(storage.list("runs/1/")) == ["runs/1/a.png", "runs/1/b/c.png"]
    assert list(storage.list("runs/1")) == ["runs/1/a.png", "runs/1/b/c.png", "runs/10/a.png"]
    assert list(storage.list("nothing/")) == []


def test_delete_prefix_deletes_that_folder_only(storage: Storage) -> None:
    keys = ["runs/1/a.png", "runs/1/b/c.png", "runs/10/a.png", "runs/1.png", "other/a.png"]
    for key in keys:
        storage.put(key, b"x")

    assert storage.delete_prefix("runs/1") == 2  # a folder: never runs/10/ or runs/1.png

    assert sorted(storage.list()) == sorted(["runs/10/a.png", "runs/1.png", "other/a.png"])
    assert storage.delete_prefix("runs/1/") == 0
    with pytest.raises(InvalidKeyError, match="whole storage root"):
        storage.delete_prefix("")


@pytest.mark.parametrize(
    "key",
    ["", "/etc/passwd", "../escape", "a/../../escape", "a//b", "a/./b", "a\\b", "folder/", "nul\x00byte"],
)
def test_bad_keys_are_rejected(storage: Storage, key: str) -> None:
    with pytest.raises(InvalidKeyError):
        storage.put(key, b"x")
    with pytest.raises(InvalidKeyError):
        storage.get(key)
    assert list(storage.list()) == []


@pytest.mark.parametrize("prefix", ["/abs", "../", "a/../b/"])
def test_bad_prefixes_are_rejected(storage: Storage, prefix: str) -> None:
    with pytest.raises(InvalidKeyError):
        storage.list(prefix)
    with pytest.raises(InvalidKeyError):
        storage.delete_prefix(prefix)


def test_many_keys_list_across_pages(storage: Storage) -> None:
    count = 1100  # more than one S3 listing page (1000 keys)
    with ConcurrentWriter(storage, max_workers=8) as writer:
        for i in range(count):
            writer.submit(f"many/{i:05d}.png", i.to_bytes(4, "big"))
        writer.submit("other/keep.png", b"keep")

    assert len(writer.results()) == count + 1
    listed = list(storage.list("many/"))
    assert listed == [f"many/{i:05d}.png" for i in range(count)]
    assert storage.delete_prefix("many") == count
    assert list(storage.list()) == ["other/keep.png"]


def test_writer_results_verify_sizes_and_hashes(storage: Storage) -> None:
    payloads = {f"w/{i}.bin": bytes([i]) * (i * 37 + 1) for i in range(20)}
    with ConcurrentWriter(storage, max_workers=4, max_pending=3) as writer:
        for key, data in payloads.items():
            writer.submit(key, data)

    results = writer.results()
    assert [r.key for r in results] == list(payloads)  # submission order
    for result in results:
        data = payloads[result.key]
        assert result == PutResult(result.key, len(data), hashlib.sha256(data).hexdigest(), result.etag)
        assert storage.get(result.key) == data


def test_local_writes_leave_no_partial_files(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path / "store")
    storage.put("a/b.png", b"1" * 1000)
    storage.put("a/b.png", b"2" * 10)

    assert sorted(p.name for p in (tmp_path / "store" / "a").iterdir()) == ["b.png"]
    assert storage.locate("a/b.png") == str(tmp_path / "store" / "a" / "b.png")


def test_local_never_writes_outside_root(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    storage = LocalStorage(tmp_path / "store")
    (tmp_path / "store" / "link").symlink_to(outside, target_is_directory=True)

    with pytest.raises(InvalidKeyError, match="outside the storage root"):
        storage.put("link/x.png", b"x")
    with pytest.raises(InvalidKeyError):
        storage.put("../outside/y.png", b"x")
    assert list(outside.iterdir()) == []


def test_open_storage_parses_urls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from_file_url = open_storage((tmp_path / "with space").as_uri())
    assert isinstance(from_file_url, LocalStorage)
    assert from_file_url.root == tmp_path / "with space"
    assert from_file_url.url == (tmp_path / "with space").as_uri()

    absolute = open_storage(str(tmp_path / "abs"))
    assert isinstance(absolute, LocalStorage) and absolute.root == tmp_path / "abs"

    monkeypatch.chdir(tmp_path)
    relative = open_storage("rel/out")
    assert isinstance(relative, LocalStorage) and relative.root == tmp_path / "rel" / "out"


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("s4://bucket/x", "did you mean s3://"),
        ("gs://bucket/x", "use s3://bucket/prefix"),
        ("fil:///tmp/x", "did you mean file://"),
        ("s3:/bucket/x", "unsupported storage URL"),
        ("s3:///x", "has no bucket"),
        ("file://otherhost/x", "names host"),
        ("s3://Bad_Bucket/x", "invalid bucket name"),
        ("", "empty"),
    ],
)
def test_open_storage_rejects_bad_urls(url: str, message: str) -> None:
    with pytest.raises(StorageError, match=message):
        open_storage(url)


def test_open_storage_s3_url(s3_endpoint_url: str, s3_bucket: str) -> None:
    storage = open_storage(f"s3://{s3_bucket}/a/b/", endpoint_url=s3_endpoint_url)

    assert isinstance(storage, S3Storage)
    assert (storage.bucket, storage.prefix, storage.url) == (s3_bucket, "a/b", f"s3://{s3_bucket}/a/b")
    assert storage.locate("x/y.png") == f"s3://{s3_bucket}/a/b/x/y.png"
    storage.put("x/y.png", b"data")
    assert list(open_storage(f"s3://{s3_bucket}", endpoint_url=s3_endpoint_url).list()) == ["a/b/x/y.png"]


def test_s3_bucket_is_created_only_when_allowed(s3_endpoint_url: str, s3_client: Any) -> None:
    name = f"camaudit-created-{uuid.uuid4().hex[:8]}"
    with pytest.raises(StorageError, match="create_bucket=True"):
        open_storage(f"s3://{name}/p", endpoint_url=s3_endpoint_url, create_bucket=False)

    storage = open_storage(f"s3://{name}/p", endpoint_url=s3_endpoint_url, create_bucket=True)
    storage.put("k", b"v")
    assert s3_client.get_object(Bucket=name, Key="p/k")["Body"].read() == b"v"
    assert storage.delete_prefix("k") == 0  # deletes the folder k/, not the object k
    s3_client.delete_object(Bucket=name, Key="p/k")
    s3_client.delete_bucket(Bucket=name)


def test_repr_never_shows_credentials(s3_endpoint_url: str, s3_bucket: str) -> None:
    storage = open_storage(f"s3://{s3_bucket}/p", endpoint_url=s3_endpoint_url)
    assert "testing" not in repr(storage)


def test_writer_names_keys_that_failed_for_good(s3_endpoint_url: str, s3_bucket: str, s3_client: Any) -> None:
    storage = open_storage(f"s3://{s3_bucket}/p", endpoint_url=s3_endpoint_url)
    s3_client.delete_bucket(Bucket=s3_bucket)  # gone under the storage's feet
    keys = ["a/1.png", "a/2.png", "b/3.png"]

    writer = ConcurrentWriter(storage, max_workers=2, retries=3, backoff=0.01)
    for key in keys:
        writer.submit(key, b"x")
    with pytest.raises(UploadError) as raised:
        writer.close()

    assert set(raised.value.failures) == set(keys)
    for key in keys:
        assert key in str(raised.value)
    assert "NoSuchBucket" in str(raised.value)
    assert writer.retried == 0  # a missing bucket does not come back by waiting


def test_writer_reports_local_failures_and_keeps_successes(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path / "store")
    storage.put("taken", b"a file where a folder is needed")

    writer = ConcurrentWriter(storage, max_workers=2)
    writer.submit("ok/1.png", b"1")
    writer.submit("taken/2.png", b"2")
    with pytest.raises(UploadError, match=re.escape("taken/2.png")) as raised:
        writer.flush()

    assert list(raised.value.failures) == ["taken/2.png"]
    assert [r.key for r in writer.results()] == ["ok/1.png"]
    assert writer.close() == writer.results()  # failures are reported once


def test_writer_rejects_bad_keys_at_submit(tmp_path: Path) -> None:
    with ConcurrentWriter(LocalStorage(tmp_path)) as writer, pytest.raises(InvalidKeyError):
        writer.submit("../x", b"x")


def test_writer_retries_while_the_endpoint_is_down(s3_endpoint_url: str, s3_bucket: str) -> None:
    upstream = urlsplit(s3_endpoint_url)
    retried = threading.Event()
    seen: list[str] = []

    def on_retry(key: str, attempt: int, error: BaseException) -> None:
        seen.append(key)
        if len(seen) >= 4:
            retried.set()

    with TcpProxy(upstream.hostname or "127.0.0.1", upstream.port or 80) as proxy:
        # max_attempts=1 leaves all retrying to the writer, so the test sees each one.
        storage = S3Storage(s3_bucket, "retry", endpoint_url=proxy.url, max_attempts=1, connect_timeout=2)
        storage.put("before.png", b"reachable")
        direct = S3Storage(s3_bucket, "retry", endpoint_url=s3_endpoint_url, create_bucket=False)
        proxy.down()
        keys = [f"k/{i}.png" for i in range(6)]
        with ConcurrentWriter(storage, max_workers=3, retries=12, backoff=0.02, on_retry=on_retry) as writer:
            for key in keys:
                writer.submit(key, key.encode())
            assert retried.wait(timeout=30), "no upload was retried while the endpoint was down"
            assert not any(direct.exists(key) for key in keys)
            proxy.up()
            results = writer.flush()

    assert [r.key for r in results] == keys
    assert writer.retried >= 4
    assert all(direct.get(key) == key.encode() for key in keys)


class RecordingSync(LocalStorage):
    """A real local store that also notes which keys each ``sync`` was asked to make durable."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.synced: list[list[str]] = []

    def sync(self, keys: Any = ()) -> None:
        keys = list(keys)
        self.synced.append(keys)
        super().sync(keys)


def record_fsyncs(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The paths os.fsync is called on from now on (the calls still happen)."""
    fsynced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        fsynced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return fsynced


def test_writer_defers_flushes_to_one_sync_per_flush(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fsynced = record_fsyncs(monkeypatch)
    storage = RecordingSync(tmp_path / "store")
    keys = [f"runs/r/gradcam/layer4/{i}/0.png" for i in range(20)]
    with ConcurrentWriter(storage, max_workers=4) as writer:
        for key in keys:
            writer.submit(key, key.encode())
        assert writer.flush()
        assert fsynced == []  # no flush per object: syncfs covers them all at once
        assert [sorted(batch) for batch in storage.synced] == [sorted(keys)]
    assert all(storage.get(key) == key.encode() for key in keys)


def test_sync_without_syncfs_fsyncs_each_file_and_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(storage_module, "_syncfs", lambda _folder: False)
    fsynced: list[str] = []
    real_fsync = os.fsync
    monkeypatch.setattr(
        os, "fsync", lambda fd: (fsynced.append(os.readlink(f"/proc/self/fd/{fd}")), real_fsync(fd))[1]
    )
    storage = LocalStorage(tmp_path / "store")
    storage.put("a/1.png", b"one", sync=False)
    storage.put("a/2.png", b"two", sync=False)
    storage.put("b/3.png", b"three", sync=False)
    assert fsynced == []
    storage.sync(["a/1.png", "a/2.png", "b/3.png"])
    root = tmp_path / "store"
    assert sorted(fsynced) == sorted(
        str(p) for p in (root / "a/1.png", root / "a/2.png", root / "b/3.png", root / "a", root / "b")
    )


def test_put_after_its_folder_was_deleted_makes_it_again(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path / "store")
    storage.put("runs/r1/gradcam/l/7/0.png", b"first")
    assert storage.delete_prefix("runs/r1") == 1
    assert not (tmp_path / "store" / "runs" / "r1").exists()
    storage.put("runs/r1/gradcam/l/7/0.png", b"again")
    assert storage.get("runs/r1/gradcam/l/7/0.png") == b"again"


def test_a_folder_made_then_swapped_for_a_link_is_refused_after_gc(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    storage = LocalStorage(tmp_path / "store")
    storage.put("runs/r1/x.png", b"x")
    storage.delete_prefix("runs/r1")
    (tmp_path / "store" / "runs" / "r1").symlink_to(outside, target_is_directory=True)
    with pytest.raises(InvalidKeyError, match="outside the storage root"):
        storage.put("runs/r1/y.png", b"y")
    assert list(outside.iterdir()) == []


def test_a_flush_that_fails_still_makes_the_successes_durable(tmp_path: Path) -> None:
    storage = RecordingSync(tmp_path / "store")
    storage.put("taken", b"a file where a folder is needed")
    writer = ConcurrentWriter(storage, max_workers=2)
    writer.submit("ok/1.png", b"1")
    writer.submit("taken/2.png", b"2")
    with pytest.raises(UploadError, match=re.escape("taken/2.png")):
        writer.flush()
    assert storage.synced == [["ok/1.png"]]  # what results() keeps is on disk
    writer.close()
