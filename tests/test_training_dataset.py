"""Training datasets, from zips the tests build in memory, a folder, a data URI and a URL on a local server:
captions and the default caption, edit pairs, skipped files with their notes, and every refusal (not a zip, no
images, small images, too many files or bytes, unsafe names, links, compression bombs, lying headers)."""

from __future__ import annotations

import base64
import io
import stat
import struct
import threading
import zipfile
import zlib
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image

from fluxserve.request import InputError
from fluxserve.training.dataset import DatasetLimits, check_api_source, load_dataset

RED, BLUE = (200, 30, 30), (30, 30, 200)


def image_bytes(width: int = 320, height: int = 288, color=RED, fmt: str = "PNG", **save) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), color).save(out, format=fmt, **save)
    return out.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares ``width`` x ``height`` and holds a few bytes of pixels: only its header is sound."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
            + chunk(b"IEND", b""))


def zip_of(files: dict[str | zipfile.ZipInfo, bytes | str]) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in files.items():
            if isinstance(name, zipfile.ZipInfo):
                name.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(name, data)
    return out.getvalue()


def refused(source, field: str = "image_data_url", **options) -> str:
    with pytest.raises(InputError) as info:
        load_dataset(source, **options)
    assert info.value.field == field
    return info.value.message


def test_captions_default_caption_and_skipped_files_with_notes():
    data = zip_of({
        "cat.png": image_bytes(color=RED), "cat.txt": "  a red cat\n",
        "dog.jpg": image_bytes(400, 300, BLUE, "JPEG"),
        "notes.pdf": b"%PDF-1.4", "orphan.txt": "nobody's caption", "inner.zip": zip_of({"x.png": image_bytes()}),
        "__MACOSX/._cat.png": b"\0\5\26\7", ".DS_Store": b"\0\0\0\1Bud1", "photos/": b"",
    })
    dataset = load_dataset(data, default_caption="a photo")
    assert [(e.name, e.caption, e.image.size, e.image.mode, e.starts) for e in dataset.examples] == [
        ("cat", "a red cat", (320, 288), "RGB", []), ("dog", "a photo", (400, 300), "RGB", [])]
    assert dataset.examples[0].image.getpixel((5, 5)) == RED
    notes = "\n".join(dataset.notes)
    assert "skipped notes.pdf: not an image" in notes
    assert "skipped inner.zip: archives inside the archive are not opened" in notes
    assert "skipped orphan.txt: no image of that name" in notes
    assert "skipped 2 system or hidden files" in notes and "__MACOSX/._cat.png" in notes


def test_missing_captions_need_a_default_caption():
    data = zip_of({"a.png": image_bytes(), "a.txt": "first", "b.png": image_bytes(), "c.webp": image_bytes(
        fmt="WEBP")})
    message = refused(data, field="default_caption")
    assert "2 of 3 images have no caption" in message and "b.txt" in message
    captioned = zip_of({"a.png": image_bytes(), "a.txt": "first", "b.png": image_bytes(), "b.txt": "second"})
    assert [e.caption for e in load_dataset(captioned).examples] == ["first", "second"]
    assert refused(zip_of({"a.png": image_bytes(), "a.txt": "   "}), field="default_caption", default_caption=" ")


def test_exif_orientation_is_applied_and_transparency_lands_on_white():
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, shown rotated 90 degrees clockwise
    rotated = image_bytes(400, 300, fmt="JPEG", exif=exif.tobytes())
    rgba = io.BytesIO()
    Image.new("RGBA", (300, 300), (0, 0, 0, 0)).save(rgba, format="PNG")
    dataset = load_dataset(zip_of({"a.jpg": rotated, "b.png": rgba.getvalue()}), default_caption="x")
    assert dataset.examples[0].image.size == (300, 400)
    assert dataset.examples[1].image.mode == "RGB" and dataset.examples[1].image.getpixel((0, 0)) == (255, 255, 255)


def test_edit_pairs_with_pair_captions():
    data = zip_of({
        "photo_start.png": image_bytes(color=RED), "photo_end.png": image_bytes(color=BLUE),
        "photo.txt": "make it blue", "sub/b_start.jpg": image_bytes(fmt="JPEG"),
        "sub/b_end.jpg": image_bytes(fmt="JPEG"), "photo_start.txt": "not a pair caption",
    })
    dataset = load_dataset(data, edit=True, default_caption="edit it")
    assert [(e.name, e.caption) for e in dataset.examples] == [("photo", "make it blue"), ("sub/b", "edit it")]
    photo = dataset.examples[0]
    assert photo.image.getpixel((1, 1)) == BLUE and [s.getpixel((1, 1)) for s in photo.starts] == [RED]
    assert "skipped photo_start.txt: no image pair of that name (a pair's caption is ROOT.txt)" in dataset.notes


def test_edit_pairs_with_up_to_four_start_images():
    green, white = (20, 180, 60), (255, 255, 255)
    data = zip_of({
        "p_start.png": image_bytes(color=RED), "p_start3.png": image_bytes(color=white),
        "p_Start2.png": image_bytes(color=green), "p_start4.png": image_bytes(color=BLUE),
        "p_end.png": image_bytes(color=BLUE), "q_start.png": image_bytes(), "q_end.png": image_bytes(),
    })
    dataset = load_dataset(data, edit=True, default_caption="edit it")
    p, q = dataset.examples
    assert [s.getpixel((1, 1)) for s in p.starts] == [RED, green, white, BLUE]  # start, start2, start3, start4
    assert len(q.starts) == 1
    assert "ROOT_start2 to ROOT_start4" in refused(zip_of({"a_start.png": image_bytes(), "a_start5.png": image_bytes(),
                                                           "a_end.png": image_bytes()}), edit=True, default_caption="x")
    assert "a_end.png has no a_start image" in refused(
        zip_of({"a_start2.png": image_bytes(), "a_end.png": image_bytes()}), edit=True, default_caption="x")


@pytest.mark.parametrize(("files", "named"), [
    ({"a_start.png": image_bytes(), "a_end.png": image_bytes(), "b_start.png": image_bytes()}, "b_start.png"),
    ({"a_start.png": image_bytes(), "a_end.png": image_bytes(), "c_end.png": image_bytes()}, "c_end.png"),
    ({"a_start.png": image_bytes(), "a_end.png": image_bytes(), "loose.png": image_bytes()}, "loose.png"),
])
def test_edit_files_outside_a_pair_are_named(files, named):
    assert named in refused(zip_of(files), edit=True, default_caption="x")


def test_not_a_zip_and_no_images():
    assert refused(b"just some text, no archive") == "is not a zip archive"
    assert "PNG image" in refused(image_bytes())
    assert "no images" in refused(zip_of({"readme.md": "# hello", "notes.txt": "x"}))
    assert "could not read an image" in refused(zip_of({"broken.png": b"not really a png"}), default_caption="x")


def test_images_below_the_minimum_side_and_header_bombs_are_refused():
    message = refused(zip_of({"ok.png": image_bytes(), "tiny.png": image_bytes(255, 600)}), default_caption="x")
    assert message.startswith("tiny.png:") and "255x600" in message and "at least 256" in message
    message = refused(zip_of({"huge.png": png_header_only(20000, 20000)}), default_caption="x")
    assert message.startswith("huge.png:") and "MP" in message


def test_too_many_files_or_bytes():
    limits = DatasetLimits(max_files=5)
    six = zip_of({f"{i}.png": image_bytes(300, 300) for i in range(6)})
    assert "holds 6 files; at most 5" in refused(six, limits=limits, default_caption="x")
    many = zip_of({f"{i}.txt": "x" for i in range(11)})
    assert "lists 11 entries" in refused(many, limits=limits)
    assert "larger than" in refused(six, limits=DatasetLimits(max_archive_bytes=1000), default_caption="x")
    big = image_bytes(300, 300)
    message = refused(zip_of({"a.png": big, "b.png": big}), limits=DatasetLimits(max_total_bytes=len(big) + 10),
                      default_caption="x")
    assert "total" in message
    message = refused(zip_of({"a.png": big}), limits=DatasetLimits(max_entry_bytes=len(big) - 1),
                      default_caption="x")
    assert message.startswith("a.png is")


def test_a_huge_index_is_refused_from_the_end_record_before_it_is_parsed():
    """65,541 empty entries need a zip64 end record; the count is read from it, not from parsing the index."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as archive:
        for i in range(0x10000 + 5):
            archive.writestr(str(i), b"")
    assert b"PK\x06\x06" in out.getvalue()
    assert "lists 65541 entries" in refused(out.getvalue())


@pytest.mark.parametrize("name", ["../evil.png", "a/../../evil.png", "/etc/evil.png", "C:/evil.png",
                                  "..\\evil.png", "c:evil.png"])
def test_unsafe_names_are_refused(name):
    data = zip_of({"ok.png": image_bytes(), zipfile.ZipInfo(name): image_bytes()})
    assert name in zipfile.ZipFile(io.BytesIO(data)).namelist()  # the archive really holds that name
    assert "absolute paths, drive letters and '..' are not accepted" in refused(data, default_caption="x")


def test_symlink_entries_are_refused():
    link = zipfile.ZipInfo("link.png")
    link.create_system = 3  # Unix
    link.external_attr = (stat.S_IFLNK | 0o777) << 16
    message = refused(zip_of({"ok.png": image_bytes(), link: "/etc/passwd"}), default_caption="x")
    assert message == "link.png is a symbolic link; links are not accepted"


def test_a_highly_compressible_member_is_refused_from_its_header():
    data = zip_of({"ok.png": image_bytes(), "bomb.bmp": b"\0" * (8 * 1024**2)})
    assert len(data) < 100_000
    message = refused(data, default_caption="x")
    assert message.startswith("bomb.bmp expands") and "at most 100 times" in message


def test_a_member_whose_header_lies_about_its_size_is_caught_while_reading():
    """bomb.png declares 4,000 bytes in both its headers (a harmless ratio) and inflates to 4 MiB."""
    data = bytearray(zip_of({"ok.png": image_bytes(), "bomb.png": b"\0" * (4 * 1024**2)}))
    real = struct.pack("<L", 4 * 1024**2)
    for signature, offset in ((b"PK\x03\x04", 22), (b"PK\x01\x02", 24)):  # local header, central directory
        at = next(i for i in _all(data, signature) if data[i + offset:i + offset + 4] == real)
        data[at + offset:at + offset + 4] = struct.pack("<L", 4000)
    assert zipfile.ZipFile(io.BytesIO(bytes(data))).getinfo("bomb.png").file_size == 4000
    message = refused(bytes(data), default_caption="x")
    assert message.startswith("bomb.png could not be read: its data does not match its header")


def _all(data: bytes, needle: bytes) -> Iterator[int]:
    at = data.find(needle)
    while at >= 0:
        yield at
        at = data.find(needle, at + 1)


def test_large_images_are_downscaled_and_the_total_is_capped():
    data = zip_of({"wide.png": image_bytes(1200, 600)})
    [example] = load_dataset(data, default_caption="x", limits=DatasetLimits(max_side=512)).examples
    assert example.image.size == (512, 256)
    three = zip_of({f"{i}.png": image_bytes(320, 320) for i in range(3)})
    assert "more than 0.25 MP" in refused(three, default_caption="x",
                                          limits=DatasetLimits(max_total_megapixels=0.25))


def test_a_folder_follows_the_same_rules_and_links_only_inside_it(tmp_path):
    folder, outside = tmp_path / "data", tmp_path / "outside.png"
    (folder / "sub").mkdir(parents=True)
    (folder / ".git").mkdir()
    (folder / "cat.png").write_bytes(image_bytes())
    (folder / "cat.txt").write_text("a cat")
    (folder / "sub" / "dog.jpg").write_bytes(image_bytes(fmt="JPEG"))
    (folder / ".git" / "config").write_text("[core]")
    (folder / "notes.pdf").write_bytes(b"%PDF")
    outside.write_bytes(image_bytes())
    (folder / "away.png").symlink_to(outside)
    (folder / "alias.png").symlink_to(folder / "cat.png")
    (folder / "linked").symlink_to(tmp_path)
    dataset = load_dataset(folder, default_caption="a pet")
    assert [(e.name, e.caption) for e in dataset.examples] == [("alias", "a pet"), ("cat", "a cat"),
                                                               ("sub/dog", "a pet")]
    notes = "\n".join(dataset.notes)
    for expected in ("skipped away.png: a link to a file outside the folder", "skipped .git/",
                     "skipped linked/: a link to a folder", "skipped notes.pdf: not an image"):
        assert expected in notes
    assert load_dataset(str(folder), default_caption="a pet").examples[2].name == "sub/dog"
    (folder / "tiny.png").write_bytes(image_bytes(100, 300))
    assert refused(folder, default_caption="x").startswith("tiny.png:")
    assert "more than 3 files" in refused(folder, default_caption="x", limits=DatasetLimits(max_files=3))


def test_a_zip_file_path_and_a_data_uri(tmp_path):
    data = zip_of({"cat.png": image_bytes(), "cat.txt": "a cat"})
    (tmp_path / "set.zip").write_bytes(data)
    assert load_dataset(tmp_path / "set.zip").examples[0].caption == "a cat"
    assert load_dataset(str(tmp_path / "set.zip")).examples[0].caption == "a cat"
    uri = "data:application/zip;base64," + base64.b64encode(data).decode()
    assert load_dataset(uri).examples[0].caption == "a cat"
    assert "larger than" in refused(uri, limits=DatasetLimits(max_archive_bytes=100))
    assert "not an http(s) URL, a data URI, a zip file or a folder" in refused(str(tmp_path / "missing.zip"))


class ZipSite:
    """An HTTP server on 127.0.0.1 answering every GET with ``body``."""

    def __init__(self, body: bytes):
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "application/zip")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/set.zip"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def zip_site() -> Iterator[ZipSite]:
    site = ZipSite(zip_of({"a_start.png": image_bytes(), "a_end.png": image_bytes(color=BLUE), "a.txt": "blue"}))
    yield site
    site.close()


def test_an_internal_url_is_refused_by_default(zip_site, default_fetches):
    assert "does not fetch from" in refused(zip_site.url, edit=True)


def test_an_http_url_through_the_guarded_fetcher(zip_site, loopback_fetches):
    dataset = load_dataset(zip_site.url, edit=True)
    assert [(e.name, e.caption, e.image.getpixel((0, 0))) for e in dataset.examples] == [("a", "blue", BLUE)]
    assert "larger than" in refused(zip_site.url, edit=True, limits=DatasetLimits(max_archive_bytes=100))


def test_api_callers_may_only_give_urls_and_data_uris(tmp_path):
    check_api_source("https://example.com/set.zip")
    check_api_source("data:application/zip;base64,UEsFBgAAAAAAAAAAAAAAAAAAAAAAAA==")
    for source in (str(tmp_path), "/etc/passwd", "file:///etc/passwd", 42):
        with pytest.raises(InputError) as info:
            check_api_source(source)
        assert info.value.field == "image_data_url"


@pytest.mark.parametrize(("fmt", "suffix"), [("PNG", "png"), ("JPEG", "jpg"), ("WEBP", "webp"), ("AVIF", "avif"),
                                             ("BMP", "bmp"), ("GIF", "gif"), ("TIFF", "tif")])
def test_every_format_is_checked_by_its_header_and_decoded_on_access(fmt, suffix):
    data = zip_of({f"a.{suffix}": image_bytes(320, 288, fmt=fmt), "b.png": image_bytes(300, 256)})
    with load_dataset(data, default_caption="x") as dataset:
        assert dataset.megapixels == pytest.approx((320 * 288 + 300 * 256) / 1024**2)
        assert [e.image.size for e in dataset.examples] == [(320, 288), (300, 256)]
        assert dataset.examples[0].image.mode == "RGB"


def test_headers_alone_refuse_too_many_megapixels_in_all():
    """300 PNGs that each declare 2048x2048 and hold almost no pixels: refused from their headers (1200 MP)."""
    data = zip_of({f"{i:03d}.png": png_header_only(2048, 2048) for i in range(300)})
    assert len(data) < 200_000
    assert "the images total more than 1024 MP" in refused(data, default_caption="x")
    with load_dataset(data, default_caption="x", limits=DatasetLimits(max_total_megapixels=2000)) as dataset:
        assert dataset.megapixels == 1200  # nothing decoded: the headers are all that was read
        assert "could not decode the image" in pytest.raises(InputError, lambda: dataset.examples[0].image).value.message


def test_a_file_that_is_not_an_image_is_refused_from_its_first_bytes():
    message = refused(zip_of({"ok.png": image_bytes(), "fake.jpg": b"<svg width='9000' height='9000'/>"}),
                      default_caption="x")
    assert message.startswith("fake.jpg: could not read an image")


def test_a_caption_over_its_limit_is_refused():
    data = zip_of({"a.png": image_bytes(), "a.txt": "x" * 2000})
    message = refused(data, limits=DatasetLimits(max_caption_bytes=1000))
    assert message.startswith("a.txt is") and "a caption may have at most" in message
    assert load_dataset(data).examples[0].caption == "x" * 2000


def test_examples_read_from_the_dataset_until_it_is_closed(tmp_path):
    (tmp_path / "set.zip").write_bytes(zip_of({"cat.png": image_bytes(), "cat.txt": "a cat"}))
    with load_dataset(tmp_path / "set.zip") as dataset:
        [example] = dataset.examples
        assert example.image.size == (320, 288) and len(example.starts) == 0
    with pytest.raises(ValueError):
        example.image  # noqa: B018 - the archive is closed


def test_the_limits_come_from_the_settings(monkeypatch):
    from fluxserve.config import Settings

    monkeypatch.setenv("FLUXSERVE_DATASET_MAX_FILES", "3")
    monkeypatch.setenv("FLUXSERVE_DATASET_MAX_TOTAL_MEGAPIXELS", "0.5")
    monkeypatch.setenv("FLUXSERVE_DATASET_MAX_CAPTION_KB", "2")
    limits = DatasetLimits.from_settings(Settings.from_env())
    assert (limits.max_files, limits.max_total_megapixels, limits.max_caption_bytes) == (3, 0.5, 2048)
    assert DatasetLimits.from_settings(Settings()) == DatasetLimits()
