"""Manifests are untrusted: rows may name only regular image files below the run's source roots.

A whole run goes through the same task code a worker runs; each refused row fails as its own
item with its reason, the rest of the run finishes, and no error holds the bytes of a file.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from PIL import Image
from sqlalchemy import select

from scheduler.plan import plan_run
from scheduler.runner import run_embedded
from scheduler.web import create_app
from schema.db import session_scope
from schema.models import Item, Run
from schema.payloads import RunSpec
from schema.settings import get_settings
from workers.fetch import LocalSources, SourceRefused, read_source
from workers.synth import make_dataset

PASSWORD = "S3cretPassw0rd-roots"
CREDENTIALS = f"db.internal:5432:prod:admin:{PASSWORD}\n"


def _png(path: Path, size: tuple[int, int] = (40, 30), noise: bool = False) -> Path:
    image = Image.effect_noise(size, 80).convert("RGB") if noise else Image.new("RGB", size, (200, 30, 30))
    image.save(path, format="PNG", compress_level=0)
    return path


def _run(spec: RunSpec, **env: str) -> Any:
    """Plan and run in this process with these settings, as `camaudit run` does without a broker."""
    with pytest.MonkeyPatch.context() as patch:
        for name, value in env.items():
            patch.setenv(name, value)
        get_settings.cache_clear()
        try:
            settings = get_settings()
            planned = plan_run(spec, settings)
            run_embedded(planned.run_id, planned.shard_ids, settings)
        finally:
            get_settings.cache_clear()
    return planned


def _errors(db: str, run_id: str) -> dict[str, tuple[str, str | None]]:
    with session_scope(db) as session:
        rows = session.execute(
            select(Item.source_uri, Item.status, Item.error).where(Item.run_id == run_id)
        ).all()
    return {uri: (status, error) for uri, status, error in rows}


@pytest.fixture(scope="module")
def hostile_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("roots")
    data, outside, extra = root / "data", root / "outside", root / "extra"
    manifest = make_dataset(data, 4, seed=3)
    outside.mkdir()
    extra.mkdir()
    (outside / "pgpass.png").write_text(CREDENTIALS)
    (data / "creds-inside.png").write_text(CREDENTIALS)
    outside_png = _png(outside / "real.png")
    extra_png = _png(extra / "allowed.png")
    (data / "link.png").symlink_to(outside_png)
    os.mkfifo(data / "pipe.png")
    (data / "folder.png").mkdir()
    big = _png(data / "big.png", (400, 400), noise=True)
    rows = {
        "outside": str(outside / "pgpass.png"),
        "outside-image": str(outside_png),
        "file-uri": outside_png.as_uri(),
        "dotdot": "../outside/real.png",
        "symlink": "link.png",
        "fifo": "pipe.png",
        "folder": "folder.png",
        "device": "/dev/zero",
        "big": "big.png",
        "extra": str(extra_png),
        "text-inside": "creds-inside.png",
    }
    with manifest.open("a") as fh:
        for uri in rows.values():
            fh.write(json.dumps({"uri": uri, "label": "circle"}) + "\n")
    db = f"sqlite:///{root / 'runs.db'}"
    planned = _run(
        RunSpec(source=str(manifest), methods=["gradcam"], shard_size=6),
        CAMAUDIT_DATABASE_URL=db,
        CAMAUDIT_STORAGE_URL=str(root / "out"),
        CAMAUDIT_SOURCE_ROOTS=os.pathsep.join([str(extra), "/dev"]),
        CAMAUDIT_MAX_SOURCE_BYTES=str(big.stat().st_size - 1),
    )
    errors = _errors(db, planned.run_id)
    by_row = {}
    for name, uri in rows.items():
        (found,) = [key for key in errors if key.endswith(uri.rsplit("/", 1)[-1]) and _same(key, uri, data)]
        by_row[name] = errors[found]
    return {"db": db, "run_id": planned.run_id, "errors": errors, "rows": by_row, "data": data}


def _same(stored: str, uri: str, data: Path) -> bool:
    if uri.startswith("file://") or uri.startswith("/"):
        return stored == uri or stored == os.path.normpath(uri.removeprefix("file://"))
    return stored == os.path.normpath(os.path.join(data, uri))


@pytest.mark.parametrize(
    ("row", "reason"),
    [
        ("outside", "outside the folders this run may read"),
        ("outside-image", "outside the folders this run may read"),
        ("file-uri", "outside the folders this run may read"),
        ("dotdot", "outside the folders this run may read"),
        ("symlink", "outside the folders this run may read"),
        ("fifo", "the path is a FIFO"),
        ("folder", "the path is a folder"),
        ("device", "the path is a character device"),
        ("big", "over the limit of .* bytes \\(CAMAUDIT_MAX_SOURCE_BYTES\\)"),
        ("text-inside", "not an image: the file holds text"),
    ],
)
def test_each_refused_row_fails_alone_with_its_reason(
    hostile_run: dict[str, Any], row: str, reason: str
) -> None:
    status, error = hostile_run["rows"][row]
    assert status == "failed" and error is not None and re.search(reason, error), (row, error)


def test_the_rest_of_the_run_finishes_and_no_error_holds_file_bytes(hostile_run: dict[str, Any]) -> None:
    assert hostile_run["rows"]["extra"] == ("done", None)
    done = [uri for uri, (status, _) in hostile_run["errors"].items() if status == "done"]
    assert len(done) == 4 + 1  # the dataset and the file under CAMAUDIT_SOURCE_ROOTS
    with session_scope(hostile_run["db"]) as session:
        run = session.get(Run, hostile_run["run_id"])
        assert run is not None and run.status == "finished" and run.n_failed == 10
    for _, error in hostile_run["errors"].values():
        assert PASSWORD not in (error or "") and "db.internal" not in (error or "")


def test_the_gallery_never_serves_a_file_outside_the_roots(hostile_run: dict[str, Any]) -> None:
    client = TestClient(create_app(hostile_run["db"]), base_url="http://localhost")
    with session_scope(hostile_run["db"]) as session:
        ids = dict(
            session.execute(
                select(Item.source_uri, Item.id).where(Item.run_id == hostile_run["run_id"])
            ).all()
        )
    outside = next(item_id for uri, item_id in ids.items() if uri.endswith("outside/real.png"))
    inside = next(item_id for uri, item_id in ids.items() if uri.endswith("extra/allowed.png"))
    refused = client.get(f"/items/{outside}/source.jpg")
    assert refused.status_code == 404, refused.status_code
    assert "outside the folders this run may read" in refused.text
    assert refused.headers["content-type"].startswith("text/plain")
    served = client.get(f"/items/{inside}/source.jpg")
    assert served.status_code == 200 and served.headers["content-type"] == "image/jpeg"


def test_one_reader_for_a_shard_resolves_folders_once_and_still_follows_every_link(tmp_path: Path) -> None:
    """A shard keeps one LocalSources: its cached folders never let a link or a ``..`` out."""
    data, outside = tmp_path / "data", tmp_path / "outside"
    (data / "sub").mkdir(parents=True)
    outside.mkdir()
    inside_png = _png(data / "sub" / "a.png")
    outside_png = _png(outside / "real.png")
    (data / "to-inside.png").symlink_to(inside_png)
    (data / "to-outside.png").symlink_to(outside_png)
    (data / "alias").symlink_to(outside, target_is_directory=True)
    local = LocalSources([str(data)])
    expected = inside_png.read_bytes()
    for _ in range(2):  # the second round reads through the cached folders
        assert local.read(str(inside_png), 1 << 20) == expected
        assert local.read(str(data / "to-inside.png"), 1 << 20) == expected
        assert local.read(inside_png.as_uri(), 1 << 20) == expected
        for refused in (
            data / "to-outside.png",
            data / "alias" / "real.png",
            data / "sub" / ".." / ".." / "outside",
        ):
            with pytest.raises(SourceRefused, match="outside the folders this run may read"):
                local.read(str(refused), 1 << 20)
        with pytest.raises(SourceRefused, match="the path is a folder"):
            local.read(str(data / "sub" / ".."), 1 << 20)
    with pytest.raises(FileNotFoundError):
        local.read(str(data / "sub" / "missing.png"), 1 << 20)
    assert read_source(str(inside_png), roots=[str(data)], local=local) == expected


def test_an_s3_manifest_names_only_objects(
    tmp_path: Path, s3_client: Any, s3_bucket: str, s3_endpoint_url: str
) -> None:
    local = _png(tmp_path / "local.png")
    s3_client.put_object(Bucket=s3_bucket, Key="set/a.png", Body=_png(tmp_path / "a.png").read_bytes())
    lines = [
        json.dumps({"uri": "a.png"}),
        json.dumps({"uri": str(local)}),
        json.dumps({"uri": local.as_uri()}),
    ]
    s3_client.put_object(Bucket=s3_bucket, Key="set/manifest.jsonl", Body="\n".join(lines).encode())
    db = f"sqlite:///{tmp_path / 'runs.db'}"
    planned = _run(
        RunSpec(source=f"s3://{s3_bucket}/set/manifest.jsonl", methods=["gradcam"]),
        CAMAUDIT_DATABASE_URL=db,
        CAMAUDIT_STORAGE_URL=str(tmp_path / "out"),
        CAMAUDIT_S3_ENDPOINT_URL=s3_endpoint_url,
        CAMAUDIT_SOURCE_ROOTS=str(tmp_path),
    )
    with session_scope(db) as session:
        rows = session.execute(
            select(Item.source_uri, Item.status, Item.error).where(Item.run_id == planned.run_id)
        ).all()
    assert [(status, error) for uri, status, error in rows if uri.startswith("s3://")] == [("done", None)]
    local_rows = [(status, error) for uri, status, error in rows if not uri.startswith("s3://")]
    assert len(local_rows) == 2
    for status, error in local_rows:
        assert status == "failed" and "names only s3:// objects" in (error or ""), error


def test_s3_objects_over_the_cap_are_refused_before_reading(
    tmp_path: Path, s3_client: Any, s3_bucket: str, s3_endpoint_url: str
) -> None:
    s3_client.put_object(Bucket=s3_bucket, Key="big.bin", Body=b"\0" * 5000)
    with pytest.raises(SourceRefused, match="5,000 bytes, over the limit of 4,999 bytes"):
        read_source(f"s3://{s3_bucket}/big.bin", roots=[], max_bytes=4999, endpoint_url=s3_endpoint_url)
    data = read_source(f"s3://{s3_bucket}/big.bin", roots=[], max_bytes=5000, endpoint_url=s3_endpoint_url)
    assert len(data) == 5000
