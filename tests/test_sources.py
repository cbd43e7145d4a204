"""Listing sources (folders, manifests, S3 prefixes) and reading items' bytes, S3 against a moto server."""

from __future__ import annotations

import io
import json
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from scheduler.sources import SourceError, SourceItem, list_source, read_manifest
from workers import fetch
from workers.fetch import read_bytes
from workers.images import decode_image


def _touch(root: Path, *names: str, data: bytes = b"x") -> None:
    for name in names:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def _png(colour: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (6, 4), colour).save(buf, "PNG")
    return buf.getvalue()


# --- folders --------------------------------------------------------------------------------------


def test_folder_is_recursive_sorted_filtered_and_skips_hidden(tmp_path: Path) -> None:
    root = tmp_path / ".workspace" / "data"  # a hidden folder above the root does not matter
    _touch(
        root,
        "b.png",
        "a/z.JPG",
        "a/b/c.tiff",
        "a.webp",
        "scan.DCM",
        "notes.txt",
        "README",
        ".hidden.png",
        "._b.png",
        ".cache/thumb.png",
        "a/.git/objects.png",
    )
    _touch(root, "series/IM0001", data=b"\x00" * 128 + b"DICM" + b"\x00" * 16)  # DICOM without extension
    items = list_source(str(root))
    assert all(isinstance(item, SourceItem) and Path(item.uri).is_absolute() for item in items)
    relative = [Path(item.uri).relative_to(root.resolve()).as_posix() for item in items]
    assert relative == ["a.webp", "a/b/c.tiff", "a/z.JPG", "b.png", "scan.DCM", "series/IM0001"]


def test_folder_extension_filter(tmp_path: Path) -> None:
    _touch(tmp_path, "x.png", "y.jpg", "sub/z.PNG", "w.dcm")
    names = [
        Path(item.uri).relative_to(tmp_path).as_posix()
        for item in list_source(str(tmp_path), extensions=["png"])
    ]
    assert names == ["sub/z.PNG", "x.png"]
    with pytest.raises(SourceError, match=r"holds no images \(extensions: \.bmp\)"):
        list_source(str(tmp_path), extensions=[".bmp"])


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda root: root / "missing", "does not exist"),
        (lambda root: root, "holds no images"),
        (lambda root: (root / "a.png").write_bytes(b"x") and root / "a.png", "is a file but not a manifest"),
    ],
    ids=["missing", "empty", "image-file"],
)
def test_folder_errors(tmp_path: Path, make: Any, reason: str) -> None:
    with pytest.raises(SourceError, match=reason):
        list_source(str(make(tmp_path)))


# --- manifests ------------------------------------------------------------------------------------


def test_jsonl_manifest_resolves_uris_and_reads_fields(tmp_path: Path) -> None:
    folder = tmp_path / "sets"
    folder.mkdir()
    absolute = tmp_path / "elsewhere" / "abs.png"
    rows = [
        {"uri": "images/a.png", "label": "cat", "box": [1, 2, 30.5, 40], "group_id": "patient-7"},
        {"path": "../other/b.png", "label": 3, "group": 12},
        {"uri": str(absolute), "Label": "dog"},
        {"uri": "s3://bucket/x/c.png", "split": "val"},
        {"uri": (tmp_path / "sp ace.png").as_uri()},
    ]
    text = "\n".join(json.dumps(row) for row in rows[:2]) + "\n\n  \n" + "\n".join(map(json.dumps, rows[2:]))
    manifest = folder / "items.jsonl"
    manifest.write_text(text + "\n")
    items = list_source(str(manifest))
    assert items == [
        SourceItem(str(folder / "images/a.png"), "cat", [1.0, 2.0, 30.5, 40.0], "patient-7"),
        SourceItem(str(tmp_path / "other/b.png"), "3", None, "12"),
        SourceItem(str(absolute), "dog"),
        SourceItem("s3://bucket/x/c.png"),
        SourceItem(str(tmp_path / "sp ace.png")),
    ]


def test_csv_manifest_box_as_json_or_four_columns(tmp_path: Path) -> None:
    manifest = tmp_path / "m.csv"
    manifest.write_text(
        "\ufeffURI, label ,box,x0,y0,x1,y1,group_id\n"
        'a.png, cat ,"[0, 0, 10, 20]",,,,,g1\n'
        "\n"
        "b.png,dog,,1,2,3.5,4,\n"
        "c.png,,,,,,,\n",
        encoding="utf-8",
    )
    assert read_manifest(manifest) == [
        SourceItem(str(tmp_path / "a.png"), "cat", [0.0, 0.0, 10.0, 20.0], "g1"),
        SourceItem(str(tmp_path / "b.png"), "dog", [1.0, 2.0, 3.5, 4.0], None),
        SourceItem(str(tmp_path / "c.png")),
    ]


def test_jsonl_bad_rows_are_all_reported_with_file_and_line(tmp_path: Path) -> None:
    manifest = tmp_path / "bad.jsonl"
    lines = [
        '{"uri": "ok.png"}',
        '{"uri": "a.png", "box": [1, 2, 3]}',
        "{not json",
        '{"label": "cat"}',
        '{"uri": "b.png", "box": [10, 10, 5, 5]}',
        '{"uri": "c.png", "lable": "cat"}',
        '["d.png"]',
        '{"uri": "gs://bucket/e.png"}',
        '{"uri": "f.png", "box": [0, 0, "wide", 5]}',
        '{"url": "g.png"}',
    ]
    manifest.write_text("\n".join(lines))
    with pytest.raises(SourceError) as caught:
        list_source(str(manifest))
    message = str(caught.value)
    assert message.startswith("9 bad manifest rows")
    for line, reason in [
        (2, r"'box' must be \[x0, y0, x1, y1\]"),
        (3, "not valid JSON"),
        (4, "needs a 'uri'"),
        (5, r"no area.*\[x, y, width, height\]"),
        (6, "unknown field 'lable'; did you mean 'label'"),
        (7, "expected a JSON object, got list"),
        (8, "unsupported URI scheme 'gs'"),
        (9, "box coordinates must be numbers"),
        (10, "did you mean 'uri' for 'url'"),
    ]:
        assert any(
            row.startswith(f"{manifest}:{line}: ") and re.search(reason, row) for row in message.splitlines()
        ), (line, reason, message)
    assert f"{manifest}:1:" not in message


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ('{"uri": "", "label": "cat"}\n', "uri"),
        ('{"uri": "   "}\n', "uri"),
        ('{"path": null}\n', "path"),
        ("uri,label\n,cat\n", "uri"),
    ],
)
def test_an_empty_uri_is_called_empty_and_never_suggests_the_field_itself(
    tmp_path: Path, text: str, field: str
) -> None:
    manifest = tmp_path / ("m.csv" if text.startswith("uri,") else "m.jsonl")
    manifest.write_text(text)
    with pytest.raises(SourceError) as caught:
        read_manifest(manifest)
    message = str(caught.value)
    assert f"{manifest}:" in message and f"{field!r} is empty; give a path or an s3:// object" in message
    assert "did you mean" not in message


def test_csv_errors_name_file_and_line(tmp_path: Path) -> None:
    manifest = tmp_path / "m.csv"
    manifest.write_text("uri,x0,y0,x1,y1\na.png,0,0,5,5\nb.png,0,zero,5,5\nc.png,0,,5,5\nd.png,1,2,3,4,5\n")
    with pytest.raises(SourceError) as caught:
        read_manifest(manifest)
    message = str(caught.value)
    assert f"{manifest}:3: box coordinates must be numbers, got 'zero'" in message
    assert f"{manifest}:4: box columns y0 are empty" in message
    assert f"{manifest}:5: row has 6 fields but the header has 5" in message
    assert f"{manifest}:2:" not in message


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", r":1: empty CSV"),
        (
            "url,label\na.png,cat\n",
            r":1: the header \['url', 'label'\] has no 'uri' column \(did you mean 'uri'",
        ),
        ("uri,lable\na.png,cat\n", r":1: unknown column 'lable'; did you mean 'label'"),
        ('uri,box,x0,y0,x1,y1\na.png,"[0,0,1,1]",0,0,1,1\n', r":2: give either 'box' or the columns"),
    ],
)
def test_csv_header_and_box_errors(tmp_path: Path, text: str, reason: str) -> None:
    manifest = tmp_path / "m.csv"
    manifest.write_text(text)
    with pytest.raises(SourceError, match=reason):
        read_manifest(manifest)


def test_manifest_that_is_not_utf8_says_so(tmp_path: Path) -> None:
    manifest = tmp_path / "m.csv"
    manifest.write_bytes("uri,label\na.png,caf\u00e9\n".encode("latin-1"))
    with pytest.raises(SourceError, match="not UTF-8"):
        read_manifest(manifest)


# --- S3 -------------------------------------------------------------------------------------------


def _put_all(client: Any, bucket: str, objects: dict[str, bytes]) -> None:
    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(lambda kv: client.put_object(Bucket=bucket, Key=kv[0], Body=kv[1]), objects.items()))


@pytest.mark.slow
def test_s3_prefix_lists_every_page(s3_endpoint_url: str, s3_bucket: str, s3_client: Any) -> None:
    images = {f"data/{n:05d}.png": b"" for n in range(1005)}
    others = {
        "data/notes.txt": b"",
        "data/.thumbs/0.png": b"",
        "data/sub/._mac.png": b"",
        "data-old/9.png": b"",  # beside the prefix, not inside it
        "top.png": b"",
    }
    _put_all(s3_client, s3_bucket, {**images, **others, "data/sub/deep.JPG": b""})
    calls: list[str] = []
    # The cached client that listing uses: a hook on it sees every page requested.
    client = fetch.s3_client(s3_endpoint_url, "us-east-1")
    client.meta.events.register("before-call.s3.ListObjectsV2", lambda **kw: calls.append("list"))
    try:
        items = list_source(f"s3://{s3_bucket}/data", endpoint_url=s3_endpoint_url, region="us-east-1")
    finally:
        client.meta.events.unregister("before-call.s3.ListObjectsV2")
    expected = sorted([*images, "data/sub/deep.JPG"])
    assert [item.uri for item in items] == [f"s3://{s3_bucket}/{key}" for key in expected]
    assert len(calls) >= 2  # more than 1000 keys: at least two pages
    whole = list_source(f"s3://{s3_bucket}", endpoint_url=s3_endpoint_url, region="us-east-1")
    assert len(whole) == len(expected) + 2  # data-old/9.png and top.png too


def test_s3_missing_bucket_and_empty_prefix(s3_endpoint_url: str, s3_bucket: str) -> None:
    with pytest.raises(SourceError, match="bucket 'no-such-bucket-here' does not exist"):
        list_source("s3://no-such-bucket-here/x", endpoint_url=s3_endpoint_url, region="us-east-1")
    with pytest.raises(SourceError, match="holds no images"):
        list_source(f"s3://{s3_bucket}/nothing", endpoint_url=s3_endpoint_url, region="us-east-1")


def test_s3_manifest_items_are_read_and_decoded(s3_endpoint_url: str, s3_bucket: str, s3_client: Any) -> None:
    """A manifest on S3 with relative and absolute s3:// URIs; odd characters in keys survive."""
    keys = {"sets/v1/images/red #1?.png": (200, 0, 0), "elsewhere/gr\u00fcn 100%.png": (0, 200, 0)}
    _put_all(s3_client, s3_bucket, {key: _png(colour) for key, colour in keys.items()})
    manifest = "\n".join(
        [
            json.dumps({"uri": "images/red #1?.png", "label": "red"}),
            json.dumps({"uri": f"s3://{s3_bucket}/elsewhere/gr\u00fcn 100%.png", "label": "green"}),
            json.dumps({"uri": "images/missing.png"}),
        ]
    )
    s3_client.put_object(Bucket=s3_bucket, Key="sets/v1/manifest.jsonl", Body=manifest.encode())
    items = list_source(
        f"s3://{s3_bucket}/sets/v1/manifest.jsonl", endpoint_url=s3_endpoint_url, region="us-east-1"
    )
    assert [item.uri for item in items] == [
        f"s3://{s3_bucket}/sets/v1/images/red #1?.png",
        f"s3://{s3_bucket}/elsewhere/gr\u00fcn 100%.png",
        f"s3://{s3_bucket}/sets/v1/images/missing.png",
    ]
    for item, colour in zip(items, keys.values(), strict=False):
        data = read_bytes(item.uri, endpoint_url=s3_endpoint_url, region="us-east-1")
        decoded = decode_image(data, (4, 6), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
        assert [round(v * 255) for v in decoded.tensor[:, 0, 0].tolist()] == list(colour)
    with pytest.raises(FileNotFoundError, match="no object"):
        read_bytes(items[2].uri, endpoint_url=s3_endpoint_url, region="us-east-1")
    with pytest.raises(SourceError, match="does not exist"):
        list_source(f"s3://{s3_bucket}/sets/none.csv", endpoint_url=s3_endpoint_url, region="us-east-1")


def test_s3_reads_with_and_without_a_cap_fail_alike(
    s3_endpoint_url: str, s3_bucket: str, s3_client: Any
) -> None:
    """``read_bytes`` and the capped ``read_source`` share one S3 read: same bytes, same errors."""
    s3_client.put_object(Bucket=s3_bucket, Key="same/a.bin", Body=b"0123456789")
    where = {"endpoint_url": s3_endpoint_url, "region": "us-east-1"}
    uri = f"s3://{s3_bucket}/same/a.bin"
    assert (
        read_bytes(uri, **where) == fetch.read_source(uri, roots=[], max_bytes=10, **where) == b"0123456789"
    )
    with pytest.raises(fetch.SourceRefused, match="over the limit of 9 bytes"):
        fetch.read_source(uri, roots=[], max_bytes=9, **where)
    for read in (lambda u: read_bytes(u, **where), lambda u: fetch.read_source(u, roots=[], **where)):
        with pytest.raises(FileNotFoundError, match="no object"):
            read(f"s3://{s3_bucket}/same/missing.bin")
        with pytest.raises(FileNotFoundError, match="no bucket 'no-such-bucket-here'"):
            read("s3://no-such-bucket-here/a.bin")
        with pytest.raises(ValueError, match="names a bucket but no object key"):
            read(f"s3://{s3_bucket}/")


def test_read_bytes_of_paths_and_file_uris(tmp_path: Path) -> None:
    path = tmp_path / "a b#c.png"
    path.write_bytes(b"pixels")
    assert read_bytes(str(path)) == b"pixels"
    assert read_bytes(path.as_uri()) == b"pixels"  # percent-escaped: file:///.../a%20b%23c.png
    assert read_bytes("file://localhost" + path.as_uri().removeprefix("file://")) == b"pixels"
    with pytest.raises(FileNotFoundError):
        read_bytes(str(tmp_path / "missing.png"))
    with pytest.raises(ValueError, match="only local files"):
        read_bytes(f"file://fileserver{path}")
