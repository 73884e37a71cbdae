"""`hrp-ood data fetch` offline: a local HTTP server (Range requests, a mode that drops the connection midway,
Google Drive's confirmation page) serves archives in the real formats (CIFAR python tarball, SVHN .mat, MNIST idx
gz, a DTD-like and an LSUN-like tar.gz, OpenOOD's benchmark_imglist zip and image zips). Checksums and image counts
of the source table are replaced by those of the served files. A fetched root is evaluated end to end."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import re
import stat
import tarfile
import threading
import time
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

import numpy as np
import pytest
from conftest import tiny_train_args
from fakes import (
    DTD_CATEGORIES,
    class_coloured_images,
    cycling_labels,
    random_images,
    write_cifar10,
    write_mnist_idx,
    write_ood_folder,
    write_openood_imglist,
    write_svhn_mat,
)

from hrp_ood.cli import main
from hrp_ood.data import fetch as fetch_module
from hrp_ood.data.benchmarks import BENCHMARKS
from hrp_ood.data.fetch import BASE_URL_ENV, DOWNLOADS, RETRIES, STAGING, fetch
from hrp_ood.errors import UserError
from hrp_ood.eval.ood_data import load_ood_images

N_OOD = {"svhn": 20, "mnist": 20, "textures": 21, "lsun": 20, "places365": 12}
PLAIN = ("cifar10", "svhn", "mnist", "textures", "lsun", "places365")
OPENOOD_SETS = ("cifar10", "cifar100", "tin", "mnist", "svhn", "texture", "places365")


# ------------------------------------------------------------------------------------------------ the server


@dataclass
class State:
    """What the server serves and how; `log` records every request (file, Range header, status, bytes sent)."""

    files: dict[str, bytes]
    range_support: bool = True
    drops: int = 0  # the next `drops` responses stop after `drop_at` bytes of body
    drop_at: int = 0
    confirm: set[str] = field(default_factory=set)  # served behind Google Drive's confirmation page
    refused: set[str] = field(default_factory=set)  # answered with Google Drive's quota error page
    validators: bool = True  # an ETag (the md5 of the file) with every file
    if_range: bool = True  # If-Range honoured (False: a Range is served whatever version it was asked for)
    form_action: dict[str, str] = field(default_factory=dict)  # file → where its confirmation form leads
    redirect: dict[str, str] = field(default_factory=dict)  # file → Location of a 302 answer
    drip_s: float = 0.0  # > 0: the body is sent one byte every drip_s seconds
    log: list[dict] = field(default_factory=list)

    def requests(self, name: str) -> list[dict]:
        return [r for r in self.log if r["name"] == name]


class Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        state: State = self.server.state
        url = urlsplit(self.path)
        entry = {"name": url.path.lstrip("/"), "query": dict(parse_qsl(url.query)), "range": self.headers["Range"]}
        entry["if_range"] = self.headers["If-Range"]
        state.log.append(entry)
        data = state.files.get(entry["name"])
        if entry["name"] in state.redirect:
            return self._send(entry, 302, b"", "text/plain", {"Location": state.redirect[entry["name"]]})
        if data is None:
            return self._send(entry, 404, b"not found", "text/plain")
        if entry["name"] in state.refused:
            page = b'<html><p class="uc-error-subcaption">Too many users have viewed or downloaded this file.</p>'
            return self._send(entry, 200, page, "text/html")
        if entry["name"] in state.confirm and entry["query"].get("confirm") != "t":
            page = (
                f'<html><form id="download-form" action="{state.form_action.get(entry["name"], "/" + entry["name"])}"'
                ' method="get">'
                '<input type="hidden" name="id" value="abc"><input type="hidden" name="export" value="download">'
                '<input type="hidden" name="confirm" value="t"><input type="hidden" name="uuid" value="u-1">'
                "</form></html>"
            ).encode()
            return self._send(entry, 200, page, "text/html; charset=utf-8")
        start = 0
        etag = f'"{hashlib.md5(data).hexdigest()}"'
        headers = {"ETag": etag} if state.validators else {}
        same_version = not state.if_range or entry["if_range"] in (None, etag if state.validators else None)
        if entry["range"] and state.range_support and same_version:
            start = int(re.fullmatch(r"bytes=(\d+)-", entry["range"])[1])
            if start >= len(data):
                return self._send(entry, 416, b"", "text/plain", {"Content-Range": f"bytes */{len(data)}"})
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        body = data[start:]
        limit = len(body)
        if state.drops:
            state.drops -= 1
            limit = min(limit, state.drop_at)
        self._send(entry, 206 if start else 200, body, "application/octet-stream", headers, limit)

    def _send(self, entry, status, body, kind, headers=None, limit=None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        sent = body[: len(body) if limit is None else limit]
        entry.update(status=status, sent=len(sent))
        self.close_connection = True
        if not self.server.state.drip_s:
            self.wfile.write(sent)
            self.wfile.flush()
            return
        for k in range(min(len(sent), 40)):  # a slow server: one byte at a time, then it drops the connection
            time.sleep(self.server.state.drip_s)
            try:
                self.wfile.write(sent[k : k + 1])
                self.wfile.flush()
            except OSError:
                return

    def log_message(self, *args) -> None:
        pass


@contextmanager
def serving(files: dict[str, bytes]):
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True  # a dripping answer does not hold the server's shutdown
    httpd.state = State(dict(files))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield httpd.state, f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


# ------------------------------------------------------------------------------------------------ archives


def tar_gz(folder: Path, arcname: str) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        tar.add(folder, arcname=arcname)
    return buffer.getvalue()


def zipped(folder: Path, prefix: str = "") -> bytes:
    """Every file under `folder`, named relative to it (with `prefix`): how OpenOOD's zips extract in place."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                archive.write(path, prefix + path.relative_to(folder).as_posix())
    return buffer.getvalue()


def write_openood_cifar10(src: Path, seed: int = 0) -> None:
    """OpenOOD's cifar10 benchmark as its download script leaves it: benchmark_imglist/cifar10/*.txt over
    images_classic/<set>/ with OpenOOD's set names (texture, not textures)."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", 40), ("val", 10), ("test", 20)):
        labels = cycling_labels(n, 10, rng)
        images = class_coloured_images(labels, 10, 32, rng)
        write_openood_imglist(src, "cifar10", "cifar10", images, f"{split}_cifar10.txt", labels, split)
    write_openood_imglist(src, "cifar10", "tin", random_images(8, seed=1), "val_tin.txt", split="val")
    for k, name in enumerate(("tin", "cifar100", "mnist", "svhn", "texture", "places365")):
        size = 48 if name == "places365" else 32
        write_openood_imglist(src, "cifar10", name, random_images(N_OOD["places365"], size, seed=2 + k))


@dataclass
class Served:
    files: dict[str, bytes]
    counts: dict[str, int]  # part target → images in the served archive


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Served:
    src = tmp_path_factory.mktemp("sources")
    write_cifar10(src / "cifar", n_train=200, n_test=60)
    write_svhn_mat(src / "svhn", N_OOD["svhn"])
    write_mnist_idx(src / "mnist", N_OOD["mnist"], compress=True)
    write_ood_folder(src / "dtd" / "images", random_images(N_OOD["textures"], seed=3), subfolders=DTD_CATEGORIES)
    (src / "dtd" / "labels").mkdir()
    (src / "dtd" / "labels" / "test1.txt").write_text("banded/0000.png\n")
    write_ood_folder(src / "LSUN" / "test", random_images(N_OOD["lsun"], seed=4), ext=".jpg")
    write_openood_cifar10(src / "openood")
    files = {
        "cifar-10-python.tar.gz": tar_gz(src / "cifar" / "cifar-10-batches-py", "cifar-10-batches-py"),
        "test_32x32.mat": (src / "svhn" / "svhn" / "test_32x32.mat").read_bytes(),
        "t10k-images-idx3-ubyte.gz": (src / "mnist" / "MNIST" / "raw" / "t10k-images-idx3-ubyte.gz").read_bytes(),
        "dtd-r1.0.1.tar.gz": tar_gz(src / "dtd", "dtd"),
        "LSUN.tar.gz": tar_gz(src / "LSUN", "LSUN"),
        "benchmark_imglist.zip": zipped(src / "openood" / "benchmark_imglist", "benchmark_imglist/"),
        **{f"{name}.zip": zipped(src / "openood" / "images_classic" / name) for name in OPENOOD_SETS},
    }
    counts = {
        "svhn/test_32x32.mat": N_OOD["svhn"],
        "MNIST/raw/t10k-images-idx3-ubyte.gz": N_OOD["mnist"],
        "dtd": N_OOD["textures"],
        "LSUN": N_OOD["lsun"],
    }
    return Served(files, counts)


def served_sources(served: Served) -> dict[str, fetch_module.Source]:
    """The real source table, with the md5 of the served file where the source publishes one and the served image
    counts where it documents one; sources with a file not served are left out."""
    table = {}
    for name, source in fetch_module.SOURCES.items():
        if any(part.remote.filename not in served.files for part in source.parts):
            continue
        parts = []
        for part in source.parts:
            remote = part.remote
            if remote.md5 is not None:
                remote = replace(remote, md5=hashlib.md5(served.files[remote.filename]).hexdigest())
            parts.append(
                replace(part, remote=remote, expected=None if part.expected is None else served.counts[part.target])
            )
        table[name] = replace(source, parts=tuple(parts))
    return table


@pytest.fixture(autouse=True)
def table(served, monkeypatch):
    monkeypatch.setattr(fetch_module, "SOURCES", served_sources(served))
    monkeypatch.setattr(fetch_module, "RETRY_WAIT_S", 0.0)
    monkeypatch.delenv(BASE_URL_ENV, raising=False)


def leftovers(root: Path) -> list[str]:
    """Staging folders and downloads a finished or refused fetch must not leave behind (a .part may stay)."""
    found = [p.name for p in root.glob(f"{STAGING}*")] + [p.name for p in root.glob(".hrp-ood-fetch.lock")]
    return found + [p.name for p in (root / DOWNLOADS).glob("*") if not p.name.endswith((".part", ".part.validator"))]


# ------------------------------------------------------------------------------------------------ end to end


@dataclass
class Fetched:
    root: Path
    ckpt: Path
    state: State
    output: str


@pytest.fixture(scope="module")
def fetched(served, tmp_path_factory) -> Fetched:
    """The plain sets and CIFAR-10 fetched through the CLI (places365 behind Drive's confirmation page), then a
    tiny network trained on the fetched CIFAR-10."""
    root = tmp_path_factory.mktemp("fetched") / "data"
    with pytest.MonkeyPatch.context() as patch, serving(served.files) as (state, url):
        patch.setattr(fetch_module, "SOURCES", served_sources(served))
        state.confirm.add("places365.zip")
        out = io.StringIO()
        patch.setattr("sys.stdout", out)
        assert main(["data", "fetch", *PLAIN, "--root", str(root), "--base-url", url, "--no-progress"]) == 0
    runs = root.parent / "runs"
    train = ["train", "--data-root", str(root), "--out-dir", str(runs), "--name", "tiny", "--epochs", "1"]
    assert main([*train, *tiny_train_args(method="ce")]) == 0
    return Fetched(root, runs / "tiny" / "last.pt", state, out.getvalue())


def test_fetched_plain_sets_evaluate_with_ood_all(fetched):
    root = fetched.root
    assert (root / "cifar-10-batches-py" / "test_batch").is_file()
    assert (root / "svhn" / "test_32x32.mat").is_file() and (root / "MNIST/raw/t10k-images-idx3-ubyte.gz").is_file()
    assert len(list((root / "dtd" / "images").rglob("*.png"))) == N_OOD["textures"]
    assert len(list((root / "LSUN" / "test").glob("*.jpg"))) == N_OOD["lsun"]
    assert not (root / DOWNLOADS).exists() and leftovers(root) == []
    assert "svhn: svhn/test_32x32.mat (md5 verified" in fetched.output and "sha256 " in fetched.output
    # Google Drive's confirmation page: the form's hidden inputs were sent back
    first, second = fetched.state.requests("places365.zip")
    assert "confirm" not in first["query"] and second["query"] == {
        "id": "abc",
        "export": "download",
        "confirm": "t",
        "uuid": "u-1",
    }
    out = root.parent / "eval"
    args = ["evaluate", "--ckpt", str(fetched.ckpt), "--data-root", str(root), "--ood", "all", "--no-progress"]
    assert main([*args, "--postprocessor", "msp", "--out", str(out)]) == 0
    report = json.loads((out / "eval.json").read_text())
    assert report["ood_sets"] == ["svhn", "lsun", "places365", "textures", "mnist"]
    with np.load(out / "scores.npz") as scores:  # every image of every fetched set was scored
        assert {name: len(scores[f"msp/{name}"]) for name in N_OOD} == N_OOD


def test_fetching_again_keeps_what_is_there(fetched, served):
    with serving(served.files) as (state, url):
        lines = fetch(["svhn", "lsun"], fetched.root, base_url=url, progress=False)
    assert state.log == [] and all("already there" in line for line in lines)


def test_openood_benchmark_root_evaluates_with_benchmark(fetched, served, tmp_path):
    root = tmp_path / "openood"
    with serving(served.files) as (state, url):
        state.confirm.add("benchmark_imglist.zip")
        lines = fetch(["openood-cifar10"], root, base_url=url, progress=False)
    assert "all present" in lines[0]
    assert sorted(p.name for p in (root / "images_classic").iterdir()) == sorted(OPENOOD_SETS)
    assert (root / "benchmark_imglist" / "cifar10" / "test_texture.txt").is_file() and leftovers(root) == []
    args = ["evaluate", "--ckpt", str(fetched.ckpt), "--benchmark", "cifar10", "--data-root", str(root)]
    assert main([*args, "--postprocessor", "msp", "--no-progress", "--out", str(tmp_path / "eval")]) == 0
    report = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert report["ood_sets"] == list(BENCHMARKS["cifar10"].far)


def test_openood_lists_must_name_present_images(served, tmp_path):
    files = dict(served.files)
    svhn = zipfile.ZipFile(io.BytesIO(files["svhn.zip"]))
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as smaller:
        for name in svhn.namelist()[1:]:  # one listed image left out
            smaller.writestr(name, svhn.read(name))
    files["svhn.zip"] = buffer.getvalue()
    with (
        serving(files) as (_, url),
        pytest.raises(UserError, match=r"test_svhn.txt lists 1 image.* fetch openood-cifar10 again$"),
    ):
        fetch(["openood-cifar10"], tmp_path, base_url=url, progress=False)


# ------------------------------------------------------------------------------------------------ refusals


def corrupt(data: bytes) -> bytes:
    middle = len(data) // 2
    return data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1 :]


@pytest.mark.parametrize(
    ("name", "filename", "target", "message"),
    [
        ("cifar10", "cifar-10-python.tar.gz", "cifar-10-batches-py", "does not match its published md5"),
        ("places365", "places365.zip", "places365", "refused places365.zip .not a valid zip archive"),
        ("lsun", "LSUN.tar.gz", "LSUN", "refused LSUN.tar.gz .not a valid tar archive"),
    ],
)
def test_a_corrupt_archive_is_refused_in_one_line_and_nothing_is_installed(
    served, tmp_path, capsys, name, filename, target, message
):
    files = {**served.files, filename: corrupt(served.files[filename])}
    with serving(files) as (_, url):
        assert main(["data", "fetch", name, "--root", str(tmp_path), "--base-url", url, "--no-progress"]) == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and re.search(message, error), error
    assert not (tmp_path / target).exists() and leftovers(tmp_path) == []


def test_google_drive_refusal_and_unknown_names_are_one_line_errors(served, tmp_path):
    with serving(served.files) as (state, url):
        state.refused.add("places365.zip")
        with pytest.raises(UserError, match="Google Drive: Too many users have viewed"):
            fetch(["places365"], tmp_path, base_url=url, progress=False)
    with pytest.raises(UserError, match="unknown dataset imagenet for `data fetch`; choose from cifar10"):
        fetch(["imagenet"], tmp_path)


# ------------------------------------------------------------------------------------------------ resuming


def test_an_interrupted_download_resumes_with_a_range_request(served, tmp_path):
    data = served.files["test_32x32.mat"]
    quarter = len(data) // 4
    with serving(served.files) as (state, url):
        state.drops, state.drop_at = 1, quarter  # dropped once: resumed within the same command
        fetch(["svhn"], tmp_path / "a", base_url=url, progress=False)
        first, second = state.requests("test_32x32.mat")
        assert (first["range"], first["sent"]) == (None, quarter)
        assert (second["range"], second["status"], second["sent"]) == (f"bytes={quarter}-", 206, len(data) - quarter)
        assert (tmp_path / "a" / "svhn" / "test_32x32.mat").read_bytes() == data

        state.log.clear()
        state.drops = RETRIES  # dropped on every attempt: the command gives up, keeping the part
        with pytest.raises(UserError, match="run the same command again to resume"):
            fetch(["svhn"], tmp_path / "b", base_url=url, progress=False)
        part = tmp_path / "b" / DOWNLOADS / "test_32x32.mat.part"
        assert part.stat().st_size == RETRIES * quarter and not (tmp_path / "b" / "svhn").exists()

        state.log.clear()  # the next command resumes where the last one stopped
        fetch(["svhn"], tmp_path / "b", base_url=url, progress=False)
        (request,) = state.requests("test_32x32.mat")
        assert (request["range"], request["sent"]) == (f"bytes={RETRIES * quarter}-", len(data) - RETRIES * quarter)
    assert (tmp_path / "b" / "svhn" / "test_32x32.mat").read_bytes() == data and leftovers(tmp_path / "b") == []


def test_a_server_without_range_support_restarts_the_download_cleanly(served, tmp_path, monkeypatch):
    data = served.files["t10k-images-idx3-ubyte.gz"]
    with serving(served.files) as (state, url):
        state.range_support, state.drops, state.drop_at = False, 1, len(data) // 3
        monkeypatch.setenv(BASE_URL_ENV, url)  # the environment's base URL, as --base-url
        fetch(["mnist"], tmp_path, progress=False)
    first, second = state.requests("t10k-images-idx3-ubyte.gz")
    assert first["sent"] == len(data) // 3 and second["range"] == f"bytes={len(data) // 3}-"
    assert (second["status"], second["sent"]) == (200, len(data))
    assert (tmp_path / "MNIST/raw/t10k-images-idx3-ubyte.gz").read_bytes() == data
    assert len(gzip.decompress(data)) == 16 + N_OOD["mnist"] * 28 * 28


def test_the_next_mirror_is_tried_when_one_cannot_serve_the_file(served, tmp_path):
    source = fetch_module.SOURCES["mnist"]
    part = source.parts[0]
    with serving(served.files) as (state, url):
        remote = replace(part.remote, urls=(f"{url}/gone/{part.remote.filename}", f"{url}/{part.remote.filename}"))
        table = {"mnist": replace(source, parts=(replace(part, remote=remote),))}
        fetch(["mnist"], tmp_path, progress=True, sources=table)  # a tqdm bar
    assert [(r["name"], r["status"]) for r in state.log] == [
        (f"gone/{part.remote.filename}", 404),
        (part.remote.filename, 200),
    ]
    assert (tmp_path / part.target).read_bytes() == served.files[part.remote.filename]


def test_an_archive_reaching_outside_its_folder_is_refused(served, tmp_path):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name in ("LSUN/test/0000.jpg", "../evil.txt"):
            info = tarfile.TarInfo(name)
            info.size = 1
            tar.addfile(info, io.BytesIO(b"x"))
    with serving({**served.files, "LSUN.tar.gz": buffer.getvalue()}) as (_, url):
        with pytest.raises(UserError, match="refused LSUN.tar.gz .not a valid tar archive"):
            fetch(["lsun"], tmp_path / "root", base_url=url, progress=False)
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["root"]


# ------------------------------------------------------------------------------------------------ the hint


def test_a_missing_set_names_the_fetch_command(tmp_path):
    with pytest.raises(UserError, match=f"or fetch it: hrp-ood data fetch svhn --root {tmp_path}$"):
        load_ood_images("svhn", tmp_path, id_dataset="cifar10")
    with pytest.raises(UserError, match=f"or fetch it: hrp-ood data fetch openood-cifar10 --root {tmp_path}$"):
        load_ood_images("svhn", tmp_path, id_dataset="folder", benchmark=BENCHMARKS["cifar10"])
    with pytest.raises(UserError) as not_fetchable:
        load_ood_images("textures", tmp_path, id_dataset="folder", benchmark=BENCHMARKS["imagenet"])
    assert "not found" in str(not_fetchable.value) and "fetch it" not in str(not_fetchable.value)


# ------------------------------------------------------------------------------------------------ hostile archives


def tar_of(members: list[tuple[str, bytes | tarfile.TarInfo]], compress: bool = True) -> bytes:
    """A tar (gzip-compressed unless `compress` is False) of (name, file content or a prepared TarInfo)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz" if compress else "w") as tar:
        for name, content in members:
            if isinstance(content, tarfile.TarInfo):
                content.name = name
                tar.addfile(content)
            else:
                info = tarfile.TarInfo(name)
                info.size = len(content)
                tar.addfile(info, io.BytesIO(content))
    return buffer.getvalue()


def link(target: str, kind: bytes = tarfile.SYMTYPE) -> tarfile.TarInfo:
    info = tarfile.TarInfo()
    info.type, info.linkname = kind, target
    return info


def special(kind: bytes) -> tarfile.TarInfo:
    info = tarfile.TarInfo()
    info.type = kind
    return info


JPEG = b"\xff\xd8\xff\xe0" + bytes(60)
DEEP = "/".join(["d" * 200] * 30)  # past PATH_MAX once joined: what slips through filter="data" before 3.11.13
HOSTILE_TARS = {
    "LSUN -> .": ([("LSUN", link("."))], "'LSUN' is a symbolic link, not a file or a folder"),
    "LSUN/up -> ..": (
        [("LSUN/test/0000.jpg", JPEG), ("LSUN/up", link(".."))],
        "'LSUN/up' is a symbolic link",
    ),
    "hard link": (
        [("LSUN/test/0000.jpg", JPEG), ("LSUN/test/1.jpg", link("LSUN/test/0000.jpg", tarfile.LNKTYPE))],
        "is a hard link",
    ),
    "device": ([("LSUN/test/0000.jpg", JPEG), ("LSUN/null", special(tarfile.CHRTYPE))], "is a character device"),
    "fifo": ([("LSUN/test/0000.jpg", JPEG), ("LSUN/pipe", special(tarfile.FIFOTYPE))], "is a fifo"),
    "long chain of links": (
        [(f"LSUN/{DEEP}/l", link("../" * 30)), ("LSUN/escape", link(f"{DEEP}/l/../../etc"))],
        "is a symbolic link",
    ),
    "../ path": ([("LSUN/test/0000.jpg", JPEG), ("../evil.jpg", JPEG)], "unsafe member '../evil.jpg'"),
    "file and folder x": ([("LSUN/x", JPEG), ("LSUN/x/a.jpg", JPEG)], "holds both a file and a folder named 'LSUN/x'"),
}


@pytest.mark.parametrize("hostile", list(HOSTILE_TARS))
def test_a_tar_member_that_is_not_a_file_or_folder_inside_is_refused_before_anything_is_written(
    served, tmp_path, capsys, hostile
):
    members, message = HOSTILE_TARS[hostile]
    with serving({**served.files, "LSUN.tar.gz": tar_of(members)}) as (_, url):
        assert main(["data", "fetch", "lsun", "--root", str(tmp_path / "root"), "--base-url", url]) == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and "refused LSUN.tar.gz (not a valid tar archive: " in error and message in error, error
    assert [p.name for p in tmp_path.rglob("*")] == ["root"]  # nothing written, the archive deleted, no lock left


def test_an_uncompressed_tar_under_a_tar_gz_name_is_refused(served, tmp_path):
    plain = tar_of([("LSUN/test/0000.jpg", JPEG)], compress=False)
    with serving({**served.files, "LSUN.tar.gz": plain}) as (_, url):
        with pytest.raises(UserError, match=r"it is not gzip-compressed as its name .tar.gz says, but an uncompressed"):
            fetch(["lsun"], tmp_path, base_url=url, progress=False)
    assert not (tmp_path / "LSUN").exists() and leftovers(tmp_path) == []


def zip_of(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, content in members.items():
            archive.writestr(name, content)
    return buffer.getvalue()


def bounded(monkeypatch, name: str, max_bytes: int) -> None:
    """The served source `name` with a smaller bound on what its archive may hold once extracted."""
    source = fetch_module.SOURCES[name]
    parts = tuple(replace(part, max_bytes=max_bytes) for part in source.parts)
    monkeypatch.setitem(fetch_module.SOURCES, name, replace(source, parts=parts))


@pytest.mark.parametrize(
    ("name", "filename", "bomb", "message"),
    [
        ("places365", "places365.zip", zip_of({"a.png": bytes(4 << 20)}), r"members declare 4194304 bytes once"),
        ("lsun", "LSUN.tar.gz", tar_of([("LSUN/test/a.jpg", bytes(4 << 20))]), r"decompresses to more than 3145728"),
        ("lsun", "LSUN.tar.gz", tar_of([("LSUN/test/a.jpg", bytes(2 << 20))]), r"members declare 2097152 bytes once"),
    ],
)
def test_a_decompression_bomb_is_refused_before_it_is_written_and_not_kept(
    served, tmp_path, monkeypatch, name, filename, bomb, message
):
    bounded(monkeypatch, name, 1 << 20)
    written = []
    monkeypatch.setattr(zipfile.ZipFile, "extractall", lambda *a, **k: written.append(a))
    monkeypatch.setattr(tarfile.TarFile, "extractall", lambda *a, **k: written.append(a))
    with serving({**served.files, filename: bomb}) as (state, url):
        for _ in range(2):  # deleted, so the next run downloads again rather than replaying it
            with pytest.raises(UserError, match=rf"{message} .*1048576.*: a decompression bomb, or not this set"):
                fetch([name], tmp_path, base_url=url, progress=False)
        assert len(state.requests(filename)) == 2
    assert written == [] and leftovers(tmp_path) == [] and not (tmp_path / DOWNLOADS).exists()


def test_an_archive_far_larger_extracted_than_downloaded_is_refused(served, tmp_path, monkeypatch):
    monkeypatch.setattr(fetch_module, "RATIO_FLOOR", 1 << 20)
    with serving({**served.files, "places365.zip": zip_of({"a.png": bytes(4 << 20)})}) as (_, url):
        with pytest.raises(UserError, match=r"over \d+ \(100 times the archive's size\): a decompression bomb"):
            fetch(["places365"], tmp_path, base_url=url, progress=False)


def test_a_zip_holding_a_file_and_a_folder_of_one_name_is_a_bad_archive_and_not_kept(served, tmp_path, capsys):
    with serving({**served.files, "places365.zip": zip_of({"x": b"1", "x/a.png": b"2"})}) as (_, url):
        assert main(["data", "fetch", "places365", "--root", str(tmp_path), "--base-url", url]) == 2
    error = capsys.readouterr().err.strip()
    assert "refused places365.zip (not a valid zip archive: it holds both a file and a folder named 'x')" in error
    assert "choose another" not in error and leftovers(tmp_path) == [] and not (tmp_path / DOWNLOADS).exists()


# ------------------------------------------------------------------------------------------------ hostile servers


def test_redirects_and_confirmation_forms_lead_only_to_the_sources_own_hosts(served, tmp_path):
    local = tmp_path / "local.zip"
    local.write_bytes(served.files["places365.zip"])
    with serving(served.files) as (state, url):
        port = url.rsplit(":", 1)[1]
        cases = {
            "form to file:": ("form_action", local.as_uri(), "its confirmation page leads to 'file://"),
            "form to another host": ("form_action", f"http://localhost:{port}/places365.zip", "leads to 'http://loc"),
            "redirect to file:": ("redirect", local.as_uri(), "redirected to 'file://"),
            "redirect to another host": ("redirect", f"http://localhost:{port}/tin.zip", "redirected to 'http://loc"),
        }
        for how, target, message in cases.values():
            state.confirm, state.form_action, state.redirect = {"places365.zip"}, {}, {}
            getattr(state, how)["places365.zip"] = target
            with pytest.raises(UserError, match=rf"{message}.*which is not http\(s\) on 127.0.0.1: refused"):
                fetch(["places365"], tmp_path / "root", base_url=url, progress=False)
            assert not (tmp_path / "root" / "places365").exists()
        state.redirect = {"places365.zip": "/tin.zip"}  # the same host: followed
        fetch(["places365"], tmp_path / "root", base_url=url, progress=False)
    assert (tmp_path / "root" / "places365").is_dir()


def test_the_sources_hosts_include_their_download_sites():
    drive, dropbox = (fetch_module.SOURCES[name].parts[0].remote.hosts for name in ("tin", "lsun"))
    assert fetch_module._on_hosts("https://drive.usercontent.google.com/download?id=1", drive)
    assert fetch_module._on_hosts("https://uc5f.dl.dropboxusercontent.com/s/LSUN.tar.gz", dropbox)
    assert not fetch_module._on_hosts("https://evil.example/LSUN.tar.gz", dropbox)
    assert not fetch_module._on_hosts("ftp://www.dropbox.com/LSUN.tar.gz", dropbox)


@pytest.mark.parametrize("base_url", ["", "ftp://mirror.example/data", "file:///srv/data", "mirror.example"])
def test_a_base_url_that_is_not_http_is_a_one_line_error(tmp_path, capsys, base_url):
    assert main(["data", "fetch", "svhn", "--root", str(tmp_path), "--base-url", base_url]) == 2
    error = capsys.readouterr().err.strip()
    assert (
        "\n" not in error
        and f"--base-url must be an http(s) URL with a host (a mirror or a test server), got {base_url!r}" in error
    )


@pytest.mark.parametrize("if_range", [True, False])
def test_a_resumed_download_of_a_changed_file_starts_again_and_never_splices(served, tmp_path, if_range):
    """A server that honours If-Range sends the new version whole; one that ignores it sends a 206 of the new version,
    whose ETag is not the part's: the part restarts from zero."""
    old = served.files["LSUN.tar.gz"]
    noise = np.random.default_rng(0).bytes(len(old))  # incompressible: the new version is longer than the old
    new = tar_of(
        [(f"LSUN/test/{k:04d}.jpg", JPEG + noise[k :: N_OOD["lsun"]] + bytes([k])) for k in range(N_OOD["lsun"])]
    )
    assert len(new) > len(old)
    with serving(served.files) as (state, url):
        state.if_range = if_range
        state.drops, state.drop_at = RETRIES, len(old) // 4  # the first command stops with a quarter of the old file
        with pytest.raises(UserError, match="run the same command again to resume"):
            fetch(["lsun"], tmp_path, base_url=url, progress=False)
        state.files["LSUN.tar.gz"] = new  # the source changed meanwhile
        state.log.clear()
        fetch(["lsun"], tmp_path, base_url=url, progress=False)
        request, *again = state.requests("LSUN.tar.gz")
    assert request["if_range"] == f'"{hashlib.md5(old).hexdigest()}"' and request["range"]
    if not if_range:  # a 206 of another version: refused, then the whole file without Range
        assert request["status"] == 206 and [(r["range"], r["status"]) for r in again] == [(None, 200)]
        request = again[0]
    assert (request["status"], request["sent"]) == (200, len(new))  # the whole new version, from zero
    assert sorted(p.read_bytes()[-1] for p in (tmp_path / "LSUN" / "test").iterdir()) == list(range(N_OOD["lsun"]))


def test_a_part_without_a_validator_is_not_resumed(served, tmp_path):
    data = served.files["test_32x32.mat"]
    with serving(served.files) as (state, url):
        state.validators, state.drops, state.drop_at = False, 1, len(data) // 3
        fetch(["svhn"], tmp_path, base_url=url, progress=False)
    first, second = state.requests("test_32x32.mat")
    assert first["sent"] == len(data) // 3 and (second["range"], second["sent"]) == (None, len(data))
    assert (tmp_path / "svhn" / "test_32x32.mat").read_bytes() == data
    with serving(served.files) as (state, url):  # given up: no part is kept, and none is promised to resume
        state.validators, state.drops, state.drop_at = False, RETRIES, len(data) // 3
        with pytest.raises(UserError) as refused:
            fetch(["svhn"], tmp_path / "b", base_url=url, progress=False)
    assert "resume" not in str(refused.value) and not (tmp_path / "b" / DOWNLOADS).exists()


def test_a_server_too_slow_on_average_is_given_up_saying_the_minimum_rate(served, tmp_path, monkeypatch):
    monkeypatch.setattr(fetch_module, "RATE_GRACE_S", 0.3)
    monkeypatch.setattr(fetch_module, "MIN_RATE", 2048)
    with serving(served.files) as (state, url):
        state.drip_s = 0.05  # 20 bytes/s, forever
        with pytest.raises(UserError, match=r"too slow: \d+ bytes in 0 s, under the 2 KiB/s every download must keep"):
            fetch(["svhn"], tmp_path, base_url=url, progress=False)


def test_a_second_fetch_into_a_locked_root_is_one_line(served, tmp_path, capsys):
    import fcntl

    tmp_path.joinpath(".hrp-ood-fetch.lock").touch()
    with (tmp_path / ".hrp-ood-fetch.lock").open() as held, serving(served.files) as (state, url):
        fcntl.flock(held, fcntl.LOCK_EX)  # a fetch running into this root
        assert main(["data", "fetch", "svhn", "--root", str(tmp_path), "--base-url", url]) == 2
        assert state.log == []
    error = capsys.readouterr().err.strip()
    assert (
        "\n" not in error
        and "another `hrp-ood data fetch` is installing into" in error
        and "give another --root" in error
    )


@pytest.mark.parametrize(("name", "target"), [("places365", "places365"), ("svhn", "svhn/test_32x32.mat")])
def test_a_target_of_the_wrong_kind_is_a_one_line_error(served, tmp_path, capsys, name, target):
    wrong = tmp_path / target
    wrong.parent.mkdir(parents=True, exist_ok=True)
    wrong.write_text("mine") if name == "places365" else wrong.mkdir()
    with serving(served.files) as (state, url):
        assert main(["data", "fetch", name, "--root", str(tmp_path), "--base-url", url]) == 2
        assert state.log == []
    error = capsys.readouterr().err.strip()
    kind = "a file" if name == "places365" else "a folder"
    assert "\n" not in error and f"{wrong} is {kind} where `data fetch` installs the {target}" in error, error


def test_an_installed_sets_archive_is_deleted_even_when_a_later_set_fails(served, tmp_path):
    files = {**served.files, "places365.zip": corrupt(served.files["places365.zip"])}
    with serving(files) as (_, url), pytest.raises(UserError, match="refused places365.zip"):
        fetch(["lsun", "places365"], tmp_path, base_url=url, progress=False)
    assert (tmp_path / "LSUN").is_dir() and leftovers(tmp_path) == [] and not (tmp_path / DOWNLOADS).exists()


def test_a_zip_member_that_is_a_link_is_refused(served, tmp_path):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("a.png", b"x")
        info = zipfile.ZipInfo("up")
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        archive.writestr(info, "..")
    with serving({**served.files, "places365.zip": buffer.getvalue()}) as (_, url):
        with pytest.raises(
            UserError, match=r"not a valid zip archive: 'up' is not a file or a folder \(mode 0o120000\)"
        ):
            fetch(["places365"], tmp_path, base_url=url, progress=False)
    assert not (tmp_path / "places365").exists() and leftovers(tmp_path) == []
