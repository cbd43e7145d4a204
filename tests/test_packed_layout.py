"""The packed layout end to end: one tar per shard, method and layer, read back one map at a time.

Two real runs of the same images, one per layout, are compared: every packed map's byte range
must hold exactly the bytes the files layout stores as a whole object, and every reader
(render, the web pages, drift, localisation, mask export) must give the same answer on both.
"""

from __future__ import annotations

import io
import json
import tarfile
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select, update
from typer.testing import CliRunner

from scheduler.analysis.drift import diff_runs
from scheduler.analysis.quality import localisation
from scheduler.cli import app as cli
from scheduler.cli.runs import start_run
from scheduler.exports.common import choose_maps
from scheduler.exports.masks import export_masks
from scheduler.render import render_overlay
from scheduler.web import create_app
from schema.db import session_scope
from schema.models import Heatmap, Item, PatchScore, Run, Shard
from schema.payloads import RunSpec
from schema.settings import Settings, get_settings
from tests.cli_runner import run_cli as camaudit
from workers.map_reads import map_bytes, raw_bytes, read_map_png
from workers.packing import build_tar, check_layout, join_members, packed_key, tar_member
from workers.shard import explain_shard
from workers.storage import InvalidRangeError, ObjectNotFoundError, Storage, open_storage
from workers.synth import make_dataset

LOCAL = "http://127.0.0.1"
METHODS = ["gradcam", "cam"]


@dataclass(frozen=True)
class Runs:
    db: str
    files: str
    packed: str
    settings: Settings


def run_cli(source: Path, settings: Settings, *options: str) -> str:
    """``camaudit run`` as people start runs; returns the run id."""
    proc = camaudit(
        *("run", "--source", str(source), "--json"),
        *("--methods", ",".join(METHODS), "--layer", "features", "--device", "cpu", "--amp", "off"),
        *("--database-url", settings.database_url, "--storage-url", settings.storage_url),
        *(("--s3-endpoint-url", settings.s3_endpoint_url) if settings.s3_endpoint_url else ()),
        *options,
    )
    assert proc.returncode == 0, proc.stderr
    status = json.loads(proc.stdout)
    assert status["status"] == "finished", status
    return str(status["run_id"])


def _heatmaps(db: str, run_id: str) -> list[Heatmap]:
    with session_scope(db) as s:
        rows = list(s.execute(select(Heatmap).where(Heatmap.run_id == run_id).order_by(Heatmap.id)).scalars())
        s.expunge_all()
    return rows


def _by_map(db: str, run_id: str) -> dict[tuple[str, str, str, int], Heatmap]:
    """Heatmaps keyed by what they explain, which both runs share: (source, method, layer, class)."""
    with session_scope(db) as s:
        found = {
            (uri, h.method, h.layer, h.target_class): h
            for h, uri in s.execute(
                select(Heatmap, Item.source_uri)
                .join(Item, Item.id == Heatmap.item_id)
                .where(Heatmap.run_id == run_id)
            )
        }
        s.expunge_all()
    return found


def run_here(source: Path, settings: Settings, layout: str) -> str:
    """``camaudit run``'s own start_run in this process (the embedded task reads the environment)."""
    spec = RunSpec(
        source=str(source), methods=METHODS, layers=["features"], shard_size=6, batch_size=5, layout=layout
    )
    return start_run(spec, settings)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Runs]:
    root = tmp_path_factory.mktemp("packed")
    manifest = make_dataset(root / "data", 11, seed=5, min_size=48, max_size=96)
    db = f"sqlite:///{root / 'runs.db'}"
    env = {"DATABASE_URL": db, "STORAGE_URL": str(root / "out"), "DEVICE": "cpu", "AMP": "off"}
    with pytest.MonkeyPatch.context() as patch:
        for name, value in env.items():
            patch.setenv(f"CAMAUDIT_{name}", value)
        get_settings.cache_clear()
        try:
            settings = get_settings()
            files = run_here(manifest, settings, "files")
            packed = run_here(manifest, settings, "packed")
            yield Runs(db, files, packed, settings)
        finally:
            get_settings.cache_clear()


def _tars(storage: Storage, run_id: str) -> dict[str, tarfile.TarFile]:
    return {
        key: tarfile.open(fileobj=io.BytesIO(storage.get(key))) for key in storage.list(f"runs/{run_id}/")
    }


def check_packed_run(db: str, run_id: str, storage: Storage, n_shards: int) -> list[Heatmap]:
    """Only tars, each listing exactly its rows' maps, and each row's ranges holding its members."""
    heatmaps = _heatmaps(db, run_id)
    assert heatmaps
    tars = _tars(storage, run_id)
    expected_keys = {packed_key(run_id, m, "features", s) for m in METHODS for s in range(n_shards)}
    assert set(tars) == expected_keys
    members: dict[str, set[str]] = defaultdict(set)
    for h in heatmaps:
        assert h.object_key == h.raw_key and h.object_key in expected_keys
        sample = f"{h.item_id}_{h.target_class}"
        members[h.object_key] |= {f"{sample}.png", f"{sample}.npy"}
        tar = tars[h.object_key]
        png = tar.extractfile(f"{sample}.png")
        npy = tar.extractfile(f"{sample}.npy")
        assert png is not None and npy is not None
        assert map_bytes(storage, h) == png.read() and h.object_length == tar.getmember(f"{sample}.png").size
        assert raw_bytes(storage, h) == npy.read()
    for key, tar in tars.items():
        assert set(tar.getnames()) == members[key]  # exactly the maps, nothing else
        info = tar.getmembers()[0]
        assert (info.mtime, info.uid, info.gid, info.mode) == (0, 0, 0, 0o644)
    return heatmaps


def test_packed_run_stores_one_tar_per_shard_method_and_layer(runs: Runs) -> None:
    storage = open_storage(runs.settings.storage_url)
    check_packed_run(runs.db, runs.packed, storage, n_shards=2)
    with session_scope(runs.db) as s:
        layouts = {r.id: r.config["layout"] for r in s.execute(select(Run)).scalars()}
    assert layouts == {runs.files: "files", runs.packed: "packed"}  # recorded for readers
    # the files run keeps one object per map and no byte ranges
    plain = _heatmaps(runs.db, runs.files)
    assert all(h.object_offset is None and h.raw_length is None for h in plain)
    assert all(h.object_key.endswith(".png") and storage.exists(h.object_key) for h in plain)


def test_packed_members_are_the_bytes_the_files_layout_stores(runs: Runs) -> None:
    storage = open_storage(runs.settings.storage_url)
    files, packed = _by_map(runs.db, runs.files), _by_map(runs.db, runs.packed)
    assert files.keys() == packed.keys() and len(files) >= 20
    for key, h in packed.items():
        plain = files[key]
        assert map_bytes(storage, h) == storage.get(plain.object_key)
        assert raw_bytes(storage, h) == storage.get(plain.raw_key)
        assert h.sha256 == plain.sha256


def test_render_and_web_pages_read_packed_maps(runs: Runs) -> None:
    files, packed = _by_map(runs.db, runs.files), _by_map(runs.db, runs.packed)
    key = sorted(packed)[0]
    _uri, method, layer, target = key
    a = render_overlay(runs.db, files[key].item_id, method, target, layer=layer)
    b = render_overlay(runs.db, packed[key].item_id, method, target, layer=layer)
    assert b.jpeg == a.jpeg and b.object_key == packed[key].object_key
    client = TestClient(create_app(runs.db), base_url=LOCAL)
    gallery = client.get(f"/runs/{runs.packed}")
    assert gallery.status_code == 200, gallery.text
    assert client.get(f"/items/{packed[key].item_id}").status_code == 200
    params = {"method": method, "class": str(target), "layer": layer, "max_side": "64"}
    thumbs = [client.get(f"/items/{h.item_id}/overlay.jpg", params=params) for h in (files[key], packed[key])]
    assert [t.status_code for t in thumbs] == [200, 200]
    assert thumbs[1].content == thumbs[0].content
    shared = client.get(f"/heatmaps/{packed[key].id}/shared.jpg", params={"vmax": "1.0"})
    assert shared.status_code == 200 and shared.content[:2] == b"\xff\xd8"


def test_drift_localisation_and_masks_read_packed_maps(runs: Runs, tmp_path: Path) -> None:
    diff = diff_runs(runs.db, runs.files, runs.packed)
    assert diff.pairs == len(_heatmaps(runs.db, runs.packed))
    assert diff.mean_correlation == pytest.approx(1.0) and not diff.drifted  # the same raw maps
    located = localisation(runs.db, runs.packed)
    assert located.boxed_items > 0 and located.methods
    assert located == localisation(runs.db, runs.files)
    written = {}
    for name, run_id in (("files", runs.files), ("packed", runs.packed)):
        out = open_storage(str(tmp_path / name))
        report = export_masks(runs.db, choose_maps(runs.db, run_id, "gradcam", layer=None, class_=None), out)
        assert report.written > 0 and not report.failed
        written[name] = sorted(out.get(k) for k in out.list() if k.endswith(".png"))
    assert written["packed"] == written["files"]


def _snapshot(db: str, run_id: str) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    with session_scope(db) as s:
        heatmaps = [
            tuple(getattr(h, c.key) for c in Heatmap.__table__.columns)
            for h in s.execute(select(Heatmap).where(Heatmap.run_id == run_id).order_by(Heatmap.id)).scalars()
        ]
        patches = [
            tuple(getattr(p, c.key) for c in PatchScore.__table__.columns)
            for p in s.execute(
                select(PatchScore).where(PatchScore.run_id == run_id).order_by(PatchScore.id)
            ).scalars()
        ]
    return heatmaps, patches


def test_rerun_of_a_packed_shard_rewrites_the_same_tars_and_rows(runs: Runs) -> None:
    storage = open_storage(runs.settings.storage_url)
    before = _snapshot(runs.db, runs.packed)
    objects = {k: storage.get(k) for k in storage.list(f"runs/{runs.packed}/")}
    with session_scope(runs.db) as s:
        shard_id = s.execute(
            select(Shard.id).where(Shard.run_id == runs.packed, Shard.index == 1)
        ).scalar_one()
        s.execute(update(Shard).where(Shard.id == shard_id).values(status="pending"))
        items = select(Item.id).where(Item.shard_id == shard_id).scalar_subquery()
        spoiled = s.execute(
            update(Heatmap)
            .where(Heatmap.item_id.in_(items))
            .values(object_key="stale", raw_key="stale", object_offset=1, object_length=1, raw_offset=None)
        ).rowcount
    assert spoiled > 0
    for key in [k for k in objects if "shard-00001" in k]:
        storage.put(key, b"stale")
    assert explain_shard(runs.packed, shard_id, runs.settings).status == "done"
    assert _snapshot(runs.db, runs.packed) == before
    assert {k: storage.get(k) for k in storage.list(f"runs/{runs.packed}/")} == objects


@pytest.mark.slow
def test_packed_run_on_s3_writes_under_two_objects_per_hundred_images(
    tmp_path: Path, s3_endpoint_url: str, s3_storage_url: str, s3_client: Any, s3_bucket: str
) -> None:
    """256 images in one shard with two methods: two tars in the bucket, every map readable by range."""
    manifest = make_dataset(tmp_path / "data", 256, seed=9, min_size=32, max_size=48)
    db = f"sqlite:///{tmp_path / 'runs.db'}"
    settings = Settings(
        database_url=db, storage_url=s3_storage_url, s3_endpoint_url=s3_endpoint_url, device="cpu", amp="off"
    )
    run_id = run_cli(manifest, settings, "--shard-size", "256", "--batch-size", "32")  # the default layout
    listed = [
        o["Key"]
        for page in s3_client.get_paginator("list_objects_v2").paginate(Bucket=s3_bucket)
        for o in page.get("Contents", ())
    ]
    with session_scope(db) as s:
        done = s.execute(select(Run.n_done).where(Run.id == run_id)).scalar_one()
    assert done == 256
    assert len(listed) / done <= 0.02, listed
    storage = open_storage(s3_storage_url, endpoint_url=s3_endpoint_url)
    heatmaps = check_packed_run(db, run_id, storage, n_shards=1)
    assert read_map_png(storage, heatmaps[-1]).shape == (128, 128)  # the demo model's input
    rendered = render_overlay(
        db, heatmaps[0].item_id, "gradcam", heatmaps[0].target_class, endpoint_url=s3_endpoint_url
    )
    assert rendered.jpeg[:2] == b"\xff\xd8"


@pytest.mark.parametrize("where", ["folder", "s3"])
def test_ranged_reads_refuse_bad_ranges_clearly(
    where: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    if where == "s3":
        endpoint = request.getfixturevalue("s3_endpoint_url")
        storage = open_storage(request.getfixturevalue("s3_storage_url"), endpoint_url=endpoint)
    else:
        storage = open_storage(str(tmp_path / "out"))
    storage.put("runs/r/a.bin", bytes(range(100)))
    assert storage.get_range("runs/r/a.bin", 10, 5) == bytes(range(10, 15))
    assert storage.get_range("runs/r/a.bin", 99, 1) == b"\x63"
    with pytest.raises(InvalidRangeError, match=r"200\.\.209 of 'runs/r/a.bin' reaches past its end"):
        storage.get_range("runs/r/a.bin", 200, 10)
    with pytest.raises(InvalidRangeError, match="reaches past its end"):
        storage.get_range("runs/r/a.bin", 95, 10)
    with pytest.raises(InvalidRangeError, match="offset must be >= 0 and the length >= 1"):
        storage.get_range("runs/r/a.bin", -1, 5)
    with pytest.raises(InvalidRangeError, match="offset must be >= 0 and the length >= 1"):
        storage.get_range("runs/r/a.bin", 0, 0)
    with pytest.raises(ObjectNotFoundError):
        storage.get_range("runs/r/missing.bin", 0, 1)


def test_tar_is_deterministic_and_keeps_samples_together() -> None:
    members = {"12_3.png": b"a" * 700, "12_30.npy": b"b", "12_3.npy": b"c" * 513, "2_1.png": b""}
    data, spans = build_tar(members)
    again, _ = build_tar(dict(reversed(list(members.items()))))
    assert again == data
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        assert tar.getnames() == ["12_3.npy", "12_3.png", "12_30.npy", "2_1.png"]
        for name, (offset, length) in spans.items():
            assert data[offset : offset + length] == members[name]
    with pytest.raises(ValueError, match="use packed or files"):
        check_layout("pakced")
    with pytest.raises(ValueError, match="layout 'tarball' is not known; use packed or files"):
        Settings(layout="tarball")


def _tarfile_tar(members: dict[str, bytes]) -> bytes:
    """The tar as :mod:`tarfile` writes it with build_tar's metadata and order."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name in sorted(members, key=lambda n: tuple(n.partition(".")[::2])):
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(members[name]), 0, 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            tar.addfile(info, io.BytesIO(members[name]))
    return buffer.getvalue()


@pytest.mark.parametrize(
    "names",
    [
        ["7_0.png", "7_0.npy", "7_0.jpg", "10_1.png"],  # the names a shard writes
        ["x" * 100, "y" * 99],  # a name filling its field, with and without the closing NUL
        ["a/" * 60 + "long.png", "schön_1.png"],  # split into prefix and name; not ASCII
    ],
)
def test_tar_members_are_laid_out_as_tarfile_writes_them(names: list[str]) -> None:
    sizes = [0, 1, 511, 512, 513, 10_000]
    members = {name: bytes(range(256)) * 40 for name in names}
    members = {name: data[: sizes[i % len(sizes)]] for i, (name, data) in enumerate(members.items())}
    data, spans = build_tar(members)
    assert data == _tarfile_tar(members)
    assert len(data) % tarfile.RECORDSIZE == 0
    assert {name: data[o : o + n] for name, (o, n) in spans.items()} == members
    # members laid out one at a time (on the encoder threads) and joined at the end: the same tar
    assert join_members({name: tar_member(name, body) for name, body in members.items()}) == (data, spans)


def test_an_unknown_layout_fails_before_any_run_is_planned(tmp_path: Path) -> None:
    db = tmp_path / "never.db"
    result = CliRunner().invoke(
        cli,
        ["run", "--source", str(tmp_path), "--layout", "tarball", "--database-url", f"sqlite:///{db}"],
    )
    assert result.exit_code != 0
    assert "layout 'tarball' is not known; use packed or files" in result.output
    assert not db.exists()
