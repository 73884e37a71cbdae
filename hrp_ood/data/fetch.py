"""`hrp-ood data fetch NAME... --root DIR`: the real datasets, from the sources torchvision and OpenOOD use, into
exactly the layout `hrp-ood train` and `hrp-ood evaluate` read (`hrp_ood.eval.ood_data`, `hrp_ood.data.benchmarks`).

Sources (`SOURCES`; the URLs and checksums are copied, never made up):

* torchvision 0.29 (`datasets/cifar.py`, `mnist.py`, `svhn.py`, `dtd.py`): the CIFAR python tarballs, MNIST's
  t10k images (two mirrors), SVHN's `test_32x32.mat`, DTD's tarball, each with the md5 torchvision checks;
* OpenOOD v1.5 (`scripts/download/download.py`, `openood/evaluation_api/datasets.py`): the Google-Drive ids of its
  `benchmark_imglist.zip` and of every image zip, each extracted as OpenOOD's script does it (the lists into the
  root, set X into `images_classic/X/`). OpenOOD publishes no checksum: `md5` is None there, and what is verified
  instead is the zip's own CRC of every member, the layout and, for `openood-*`, that every image its lists name
  is present; the sha256 of what was downloaded is printed so that it can be recorded;
* ODIN (facebookresearch/odin, README): LSUN (crop) and LSUN (resize) on Dropbox, no checksum either.

A fetch holds a lock on its root (`<root>/.hrp-ood-fetch.lock`): a second fetch into the same root is refused.
Every download goes to `<root>/.hrp-ood-downloads/<file>.part` and resumes after an interruption with an HTTP Range
request, but only with `If-Range` and the ETag (or Last-Modified) its first response gave, and only a 206 answer
with that validator: a file changed meanwhile, or a server that gives no validator, restarts the part from zero, so
two versions are never spliced. It follows Google Drive's "cannot scan this file for viruses" confirmation form and
redirects only to http(s) on the source's own hosts (`Remote.hosts`; with --base-url, that host), must keep
MIN_RATE on average after RATE_GRACE_S, and is renamed to `<file>` only when complete.

An archive is verified (md5, or its own integrity) and checked by its magic bytes (gzip, zip, MATLAB) before it is
read. Before anything is extracted, every member must be a regular file or a folder (no symlink, hardlink, device
or fifo, on any Python), named inside the folder it is extracted into (no absolute path, no `..`), never both a file
and a folder, and the sizes the members declare must stay under the set's bound (`Part.max_bytes`) and MAX_RATIO
times the archive's size: a bomb is refused before a byte is written. It is then extracted into a staging folder
beside its destination, checked there (expected files or image count), and renamed into place. A corrupt, hostile
or unexpected archive is refused in one line and deleted, and nothing half-extracted is left; an installed set's
archive is deleted at once. A destination that already exists is kept as it is (a file where a folder belongs is
an error). `--base-url URL` (or HRP_OOD_DATA_URL) replaces every source by `URL/<file name>`: a mirror or a test
server.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import gzip
import hashlib
import html
import http.client
import logging
import math
import os
import re
import shutil
import stat
import sys
import tarfile
import time
import urllib.error
import urllib.request
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.cookiejar import CookieJar
from pathlib import Path, PurePosixPath
from typing import IO
from urllib.parse import parse_qsl, urlencode, urljoin, urlsplit, urlunsplit

from hrp_ood import __version__
from hrp_ood.errors import UserError, os_error_text, shown
from hrp_ood.io import check_output_folder, write_error
from hrp_ood.progress import progress_steps

log = logging.getLogger(__name__)

BASE_URL_ENV = "HRP_OOD_DATA_URL"
DOWNLOADS = ".hrp-ood-downloads"
STAGING = ".hrp-ood-staging-"
GDRIVE = "https://drive.google.com/uc?id={}&export=download"
CHUNK = 1 << 20  # one progress step = 1 MiB
GIB = 1 << 30
TIMEOUT_S = 60.0  # each read of a response
MIN_RATE = 16 * 1024  # bytes/s every download must keep on average ...
RATE_GRACE_S = 60.0  # ... once it has run this long
MAX_RATIO = 100  # declared uncompressed size / archive size (images and pickles hardly compress; text lists ~5x)
LOCK = ".hrp-ood-fetch.lock"
RETRIES = 3  # attempts per URL, each resuming where the last one stopped
RETRY_WAIT_S = 2.0
MAX_CONFIRM_PAGES = 3
USER_AGENT = f"hrp-ood/{__version__} (Python urllib)"


@dataclass(frozen=True)
class Remote:
    """One file to download: its name (also its name under --base-url), its mirrors in order, the md5 its source
    publishes (None: the source publishes none) and where the URL and checksum were taken from."""

    filename: str
    urls: tuple[str, ...]
    md5: str | None
    origin: str

    @property
    def hosts(self) -> tuple[str, ...]:
        """The hosts a download of this file may be redirected to, each with its subdomains: those of its URLs and
        their download sites (SITE_HOSTS: Drive's form leads to drive.usercontent.google.com, Dropbox redirects to
        <id>.dl.dropboxusercontent.com)."""
        own = [urlsplit(url).hostname or "" for url in self.urls]
        return tuple(dict.fromkeys([*own, *(extra for host in own for extra in SITE_HOSTS.get(host, ()))]))


@dataclass(frozen=True)
class Part:
    """A remote file installed as `target` (relative to the root). kind "file": the file itself; "tar"/"zip": the
    archive extracted into `extract_to`, which must produce `target`. `check(path)` validates what was built and
    returns its image count (or None); `expected` is the count the source documents (None: not documented)."""

    remote: Remote
    kind: str
    target: str
    extract_to: str = ""
    check: Callable[[Path], int | None] | None = None
    expected: int | None = None
    max_bytes: int = 2 * GIB  # a generous bound on what the archive's members may declare once extracted


@dataclass(frozen=True)
class Source:
    name: str
    description: str
    parts: tuple[Part, ...]
    benchmark: str | None = None  # an OpenOOD benchmark whose lists must name only present images

    def usage(self, root: Path) -> str:
        """The command that reads what this source installs under `root`."""
        if self.benchmark:
            return f"hrp-ood evaluate --ckpt CKPT --benchmark {self.benchmark} --data-root {shown(root)}"
        if self.name in ("cifar10", "cifar100"):
            return f"hrp-ood train --dataset {self.name} --data-root {shown(root)} (or evaluate --ood {self.name})"
        return f"hrp-ood evaluate --ckpt CKPT --ood {self.name} --data-root {shown(root)}"


# ------------------------------------------------------------------------------------------------ checks


def _cifar_files(*names: str) -> Callable[[Path], None]:
    def check(folder: Path) -> None:
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise UserError(f"{shown(folder)} lacks {', '.join(missing)} after extraction")

    return check


def _image_count(sub: str = "") -> Callable[[Path], int]:
    def check(folder: Path) -> int:
        from hrp_ood.data.images import folder_images

        count = len(folder_images(folder / sub))
        if count == 0:
            raise UserError(f"{shown(folder / sub)} holds no image after extraction")
        return count

    return check


def _mnist_count(path: Path) -> int:
    from hrp_ood.data.idx import read_mnist_idx

    return len(read_mnist_idx(path))


def _svhn_count(path: Path) -> int:
    from scipy.io import whosmat

    try:
        shapes = {name: shape for name, shape, _ in whosmat(path)}
    except (ValueError, OSError, TypeError) as err:
        raise UserError(f"{shown(path)} is not a MATLAB file ({err})") from None
    shape = shapes.get("X", ())
    if len(shape) != 4 or shape[:3] != (32, 32, 3):
        raise UserError(f"{shown(path)}: X has shape {shape}, expected (32, 32, 3, N) as SVHN's test_32x32.mat")
    return shape[3]


# ------------------------------------------------------------------------------------------------ sources

_TV = "torchvision 0.29 datasets/"
_OPENOOD = "OpenOOD scripts/download/download.py at 3c35632 (Google Drive id; no published checksum)"
_ODIN = "facebookresearch/odin README (Dropbox; no published checksum)"
# OpenOOD's Google-Drive ids (scripts/download/download.py, download_id_dict), set name → id
OPENOOD_DRIVE_IDS = {
    "benchmark_imglist": "1lI1j0_fDDvjIt9JlWAw09X8ks-yrR_H1",
    "cifar10": "1Co32RiiWe16lTaiOU6JMMnyUYS41IlO1",
    "cifar100": "1PGKheHUsf29leJPPGuXqzLBMwl8qMF8_",
    "tin": "1PZ-ixyx52U989IKsMA2OT-24fToTrelC",
    "mnist": "1CCHAGWqA1KJTFFswuF9cbhmB-j98Y1Sb",
    "svhn": "1DQfc11HOtB1nEwqS4pWUFp8vtQ3DczvI",
    "texture": "1OSz1m3hHfVWbRdmMwKbUzoU8Hg9UKcam",
    "places365": "1Ec-LRSTf6u5vEctKX9vRp9OA6tqnJ0Ay",
}
# The image sets OpenOOD's evaluator fetches per benchmark (openood/evaluation_api/datasets.py, benchmarks_dict)
OPENOOD_BENCHMARK_SETS = {
    "cifar10": ("cifar10", "cifar100", "tin", "mnist", "svhn", "texture", "places365"),
    "cifar100": ("cifar100", "cifar10", "tin", "mnist", "svhn", "texture", "places365"),
}
# the download sites a source's host hands its files over to: host → domains (with their subdomains) a redirect or
# a confirmation form may lead to
SITE_HOSTS = {
    "drive.google.com": ("drive.usercontent.google.com",),
    "www.dropbox.com": ("dropboxusercontent.com",),
}
# torchvision datasets/mnist.py, MNIST.mirrors, in its order
MNIST_MIRRORS = ("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/")


def _openood_zip(name: str) -> Remote:
    return Remote(f"{name}.zip", (GDRIVE.format(OPENOOD_DRIVE_IDS[name]),), None, _OPENOOD)


def _openood(benchmark: str) -> Source:
    lists = Part(_openood_zip("benchmark_imglist"), "zip", "benchmark_imglist", max_bytes=GIB)
    images = tuple(
        Part(_openood_zip(name), "zip", f"images_classic/{name}", f"images_classic/{name}", _image_count())
        for name in OPENOOD_BENCHMARK_SETS[benchmark]
    )
    return Source(
        f"openood-{benchmark}",
        f"OpenOOD v1.5's {benchmark} benchmark: benchmark_imglist/ and images_classic/ (Google Drive)",
        (lists, *images),
        benchmark=benchmark,
    )


def _odin(folder: str, url: str) -> Source:
    remote = Remote(f"{folder}.tar.gz", (url,), None, _ODIN)
    return Source(
        folder.lower(),
        f"ODIN's {folder} (10,000 test images) as {folder}/",
        # 10,000 test images each: the ODIN paper (Liang et al., ICLR 2018, section 4.1)
        (Part(remote, "tar", folder, check=_image_count(), expected=10000, max_bytes=GIB),),
    )


SOURCES: dict[str, Source] = {
    source.name: source
    for source in (
        Source(
            "cifar10",
            "CIFAR-10 python pickles as cifar-10-batches-py/ (Toronto)",
            (
                Part(
                    Remote(
                        "cifar-10-python.tar.gz",
                        ("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",),
                        "c58f30108f718f92721af3b95e74349a",
                        _TV + "cifar.py",
                    ),
                    "tar",
                    "cifar-10-batches-py",
                    check=_cifar_files(*(f"data_batch_{i}" for i in range(1, 6)), "test_batch", "batches.meta"),
                    max_bytes=GIB,  # 178 MB
                ),
            ),
        ),
        Source(
            "cifar100",
            "CIFAR-100 python pickles as cifar-100-python/ (Toronto)",
            (
                Part(
                    Remote(
                        "cifar-100-python.tar.gz",
                        ("https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",),
                        "eb9058c3a382ffc7106e4002c42a8d85",
                        _TV + "cifar.py",
                    ),
                    "tar",
                    "cifar-100-python",
                    check=_cifar_files("train", "test", "meta"),
                    max_bytes=GIB,  # 178 MB
                ),
            ),
        ),
        Source(
            "mnist",
            "MNIST's 10,000 test digits as MNIST/raw/t10k-images-idx3-ubyte.gz",
            (
                Part(
                    Remote(
                        "t10k-images-idx3-ubyte.gz",
                        tuple(m + "t10k-images-idx3-ubyte.gz" for m in MNIST_MIRRORS),
                        "9fb629c4189551a2d022fa330f9573f3",
                        _TV + "mnist.py",
                    ),
                    "file",
                    "MNIST/raw/t10k-images-idx3-ubyte.gz",
                    check=_mnist_count,
                    expected=10000,
                ),
            ),
        ),
        Source(
            "svhn",
            "SVHN's 26,032 test images as svhn/test_32x32.mat (Stanford)",
            (
                Part(
                    Remote(
                        "test_32x32.mat",
                        ("http://ufldl.stanford.edu/housenumbers/test_32x32.mat",),
                        "eb5a983be6a315427106f1b164d9cef3",
                        _TV + "svhn.py",
                    ),
                    "file",
                    "svhn/test_32x32.mat",
                    check=_svhn_count,
                    expected=26032,
                ),
            ),
        ),
        Source(
            "textures",
            "DTD r1.0.1 (47 categories x 120 images) as dtd/images/ (Oxford VGG)",
            (
                Part(
                    Remote(
                        "dtd-r1.0.1.tar.gz",
                        ("https://www.robots.ox.ac.uk/~vgg/data/dtd/download/dtd-r1.0.1.tar.gz",),
                        "fff73e5086ae6bdbea199a49dfb8a4c1",
                        _TV + "dtd.py",
                    ),
                    "tar",
                    "dtd",
                    check=_image_count("images"),
                    expected=5640,
                ),
            ),
        ),
        Source(
            "places365",
            "OpenOOD's Places365 image archive as places365/ (Google Drive)",
            (Part(_openood_zip("places365"), "zip", "places365", "places365", _image_count(), max_bytes=4 * GIB),),
        ),
        Source(
            "tin",
            "OpenOOD's TinyImageNet image archive as tin/ (Google Drive)",
            (Part(_openood_zip("tin"), "zip", "tin", "tin", _image_count()),),
        ),
        _odin("LSUN", "https://www.dropbox.com/s/fhtsw1m3qxlwj6h/LSUN.tar.gz?dl=1"),
        _odin("LSUN_resize", "https://www.dropbox.com/s/moqh2wh8696c3yl/LSUN_resize.tar.gz?dl=1"),
        _openood("cifar10"),
        _openood("cifar100"),
    )
}


def fetch_hint(name: str, data_root: str | Path, benchmark: str | None = None) -> str:
    """'; or fetch it: hrp-ood data fetch NAME --root DIR' for an OOD set (of an OpenOOD benchmark) that
    `fetch` can get, else ''."""
    fetch_name = f"openood-{benchmark}" if benchmark else name
    if fetch_name not in SOURCES:
        return ""
    return f"; or fetch it: hrp-ood data fetch {fetch_name} --root {shown(data_root)}"


# ------------------------------------------------------------------------------------------------ fetch


def fetch(
    names: list[str],
    root: str | Path,
    *,
    base_url: str | None = None,
    progress: bool | None = None,
    sources: dict[str, Source] | None = None,
) -> list[str]:
    """Download, verify and install the sets `names` under `root`; one report line per set."""
    sources = SOURCES if sources is None else sources
    unknown = [n for n in names if n not in sources]
    if unknown:
        raise UserError(f"unknown dataset {', '.join(unknown)} for `data fetch`; choose from {', '.join(sources)}")
    root = Path(root)
    check_output_folder(root, "--root")
    base_url = _checked_base_url(os.environ.get(BASE_URL_ENV) or None if base_url is None else base_url)
    progress = sys.stderr.isatty() if progress is None else progress
    downloads = root / DOWNLOADS
    report = []
    with _root_lock(root):
        try:
            for name in dict.fromkeys(names):
                report.append(f"{name}: " + "; ".join(_fetch_source(sources[name], root, base_url, progress)))
        finally:
            if downloads.is_dir() and not any(downloads.iterdir()):
                downloads.rmdir()
    return report


def _fetch_source(source: Source, root: Path, base_url: str | None, progress: bool) -> list[str]:
    """Install every part of `source` that is not there yet; one note per part (and the benchmark's lists)."""
    notes = []
    for part in source.parts:
        if _already_there(part, root):
            notes.append(f"{part.target} already there (kept)")
            continue
        archive, verified = _obtain(part.remote, root / DOWNLOADS, base_url, progress)
        count = _install(part, archive, root)
        archive.unlink(missing_ok=True)  # installed: its archive is not needed again
        notes.append(f"{part.target} ({verified}{f'; {count} images' if count is not None else ''})")
    if source.benchmark:
        notes.append(_check_benchmark_lists(source.benchmark, root))
    return notes


def _already_there(part: Part, root: Path) -> bool:
    """Whether the part's target exists as what it installs (a folder, or a file for kind "file"); anything else
    in its place is an error."""
    target = root / part.target
    if not os.path.lexists(target):
        return False
    folder = part.kind != "file"
    if target.is_dir() != folder:
        kind = "a folder" if target.is_dir() else "a file" if target.is_file() else "not a folder or file"
        raise UserError(
            f"{shown(target)} is {kind} where `data fetch` installs the {part.target} {'folder' if folder else 'file'};"
            " move it away (or delete it) and run the command again"
        )
    return True


def _checked_base_url(base_url: str | None) -> str | None:
    """--base-url (or HRP_OOD_DATA_URL): None, or an http(s) URL with a host."""
    if base_url is None:
        return None
    parts = urlsplit(base_url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UserError(
            f"--base-url must be an http(s) URL with a host (a mirror or a test server), got {base_url!r}; drop it "
            "to download from the sources"
        )
    return base_url


@contextlib.contextmanager
def _root_lock(root: Path) -> Iterator[None]:
    """An exclusive lock on `root/LOCK` for the whole fetch: a second fetch into the same root fails at once. The
    file is removed when the fetch ends; a fetch that locked a file removed meanwhile locks the new one."""
    path = root / LOCK
    while True:
        handle = _locked(path, root)
        if _same_file(handle, path):
            break
        handle.close()
    with handle:
        try:
            yield
        finally:
            path.unlink(missing_ok=True)  # still locked here, so nobody else holds this file


def _locked(path: Path, root: Path) -> IO[str]:
    try:
        root.mkdir(parents=True, exist_ok=True)
        handle = path.open("a+")
    except OSError as err:
        raise write_error(path, err) from None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise UserError(
            f"another `hrp-ood data fetch` is installing into {shown(root)} ({shown(path)} is locked); wait for it "
            "to finish, or give another --root"
        ) from None
    return handle


def _same_file(handle: IO[str], path: Path) -> bool:
    try:
        return os.stat(path).st_ino == os.fstat(handle.fileno()).st_ino
    except FileNotFoundError:
        return False


def _urls(remote: Remote, base_url: str | None) -> tuple[str, ...]:
    return (f"{base_url.rstrip('/')}/{remote.filename}",) if base_url else remote.urls


def _hosts(remote: Remote, base_url: str | None) -> tuple[str, ...]:
    """The hosts the download may be redirected to: the mirror's (--base-url), else the source's own."""
    return (urlsplit(base_url).hostname,) if base_url else remote.hosts


def _obtain(remote: Remote, downloads: Path, base_url: str | None, progress: bool) -> tuple[Path, str]:
    """The remote file, complete, under `downloads` (downloaded unless a complete one is already there) and
    checked against its md5; returns (path, what was verified)."""
    path = downloads / remote.filename
    if not path.is_file():
        try:
            downloads.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise write_error(downloads, err) from None
        _download_any(_urls(remote, base_url), path, progress, _hosts(remote, base_url))
    md5, sha256 = _digests(path)
    if remote.md5 is None:
        return path, f"{remote.origin}: sha256 {sha256}"
    if md5 != remote.md5:
        path.unlink()
        raise UserError(
            f"{remote.filename} does not match its published md5 (got {md5}, expected {remote.md5}, "
            f"{remote.origin}); the corrupt download was deleted: run the command again"
        )
    return path, f"md5 verified ({remote.origin})"


def _digests(path: Path) -> tuple[str, str]:
    md5, sha256 = hashlib.md5(usedforsecurity=False), hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(CHUNK):
            md5.update(block)
            sha256.update(block)
    return md5.hexdigest(), sha256.hexdigest()


# ------------------------------------------------------------------------------------------------ HTTP


_TRANSIENT = (TimeoutError, ConnectionResetError, ConnectionAbortedError, http.client.HTTPException)


class _Retry(Exception):
    """The transfer stopped midway (dropped connection, timeout, server error): try again, resuming."""


class _Unavailable(Exception):
    """This URL cannot serve the file (404, refused, a page instead of the file): try the next mirror."""


def _download_any(urls: tuple[str, ...], path: Path, progress: bool, hosts: tuple[str, ...]) -> None:
    """`path` from the first URL that serves it, through `<path>.part`, redirected only within `hosts`."""
    part = path.with_name(path.name + ".part")
    failures = []
    for url in urls:
        try:
            _download(url, part, progress, hosts)
        except _Unavailable as err:
            failures.append(f"{url}: {err}")
            continue
        try:
            os.replace(part, path)
        except OSError as err:
            raise write_error(path, err) from None
        _validator_file(part).unlink(missing_ok=True)
        return
    kept = part.stat().st_size if part.exists() and _validator_file(part).is_file() else 0
    if not kept:  # nothing a later run could resume (no validator: it would start from zero)
        part.unlink(missing_ok=True)
    resume = f"; {kept} bytes are kept in {shown(part)}: run the same command again to resume" if kept else ""
    raise UserError(f"cannot download {path.name}: {'; '.join(failures)}{resume}; or give --base-url a mirror")


def _download(url: str, part: Path, progress: bool, hosts: tuple[str, ...]) -> None:
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(CookieJar()), _SameSiteRedirects(hosts))
    for attempt in range(1, RETRIES + 1):
        try:
            _transfer(opener, url, part, progress, hosts)
            return
        except _Retry as err:
            if attempt == RETRIES:
                raise _Unavailable(f"interrupted {RETRIES} times ({err})") from None
            log.warning("%s: %s; resuming (attempt %d of %d)", part.name, err, attempt + 1, RETRIES)
            time.sleep(RETRY_WAIT_S * attempt)


def _on_hosts(url: str, hosts: tuple[str, ...]) -> bool:
    """Whether `url` is http(s) on one of `hosts` (or a subdomain of one)."""
    parts = urlsplit(url)
    host = (parts.hostname or "").lower()
    return parts.scheme in ("http", "https") and any(host == h or host.endswith("." + h) for h in hosts)


def _check_on_hosts(url: str, hosts: tuple[str, ...], how: str) -> None:
    if not _on_hosts(url, hosts):
        raise _Unavailable(f"{how} {url[:200]!r}, which is not http(s) on {', '.join(hosts)}: refused")


class _SameSiteRedirects(urllib.request.HTTPRedirectHandler):
    """Follows a redirect only to http(s) on the download's own hosts (never file:, ftp:, data: or another site)."""

    def __init__(self, hosts: tuple[str, ...]) -> None:
        self.hosts = hosts

    def http_error_302(self, req, fp, code, msg, headers):  # noqa: ANN001, ANN201 (urllib's signature)
        location = headers.get("location") or headers.get("uri") or ""
        _check_on_hosts(urljoin(req.full_url, location), self.hosts, "redirected to")
        return super().http_error_302(req, fp, code, msg, headers)

    http_error_301 = http_error_303 = http_error_307 = http_error_308 = http_error_302


def _validator_file(part: Path) -> Path:
    """Where the ETag / Last-Modified of the response a part was started from is kept."""
    return part.with_name(part.name + ".validator")


def _validator(response: http.client.HTTPResponse) -> str | None:
    """What identifies this version of the file, for If-Range: a strong ETag, else Last-Modified, else None."""
    etag = response.headers.get("ETag")
    if etag and not etag.startswith("W/"):
        return etag
    return response.headers.get("Last-Modified")


def _resumable(part: Path) -> tuple[int, str | None]:
    """(bytes to resume from, the validator they were downloaded under): (0, None) when the part cannot be resumed
    safely (no part, or no validator recorded for it), which restarts it."""
    recorded = _validator_file(part)
    validator = recorded.read_text() if part.exists() and recorded.is_file() else ""
    if validator:
        return part.stat().st_size, validator
    part.unlink(missing_ok=True)
    return 0, None


def _transfer(
    opener: urllib.request.OpenerDirector, url: str, part: Path, progress: bool, hosts: tuple[str, ...]
) -> None:
    """One request for the rest of `part` (Range: bytes=<size>- with If-Range), appended; anything but a 206 of
    the same version restarts the part."""
    offset, validator = _resumable(part)
    try:
        response = _open(opener, url, offset, validator, hosts)
    except urllib.error.HTTPError as err:
        if err.code == 416:  # nothing left to send from `offset`: the part is whole, or longer than the file
            whole = re.fullmatch(r"bytes \*/(\d+)", err.headers.get("Content-Range") or "")
            if whole and int(whole[1]) == offset:
                return
            part.unlink(missing_ok=True)
            raise _Retry("HTTP 416: the partial file does not fit, starting again") from None
        if err.code == 429 or err.code >= 500:
            raise _Retry(f"HTTP {err.code} {err.reason}") from None
        raise _Unavailable(f"HTTP {err.code} {err.reason}") from None
    except urllib.error.URLError as err:  # no connection at all: DNS, refused, TLS
        if isinstance(err.reason, _TRANSIENT):
            raise _Retry(str(err.reason)) from None
        raise _Unavailable(str(err.reason)) from None
    except _TRANSIENT as err:
        raise _Retry(f"{type(err).__name__}: {err}") from None
    except OSError as err:
        raise _Unavailable(os_error_text(err)) from None
    with response:
        if response.status == 206:
            if _range_start(response) != offset or _validator(response) != validator:
                part.unlink(missing_ok=True)
                raise _Retry("the server answered another byte range or version than asked for: starting again")
            mode = "ab"
        else:
            if offset:
                log.info("%s answered with the whole file (changed, or no Range support): downloading it again", url)
            offset, mode = 0, "wb"
            _record_validator(part, _validator(response))
        _write_body(response, part, mode, offset, progress)


def _record_validator(part: Path, validator: str | None) -> None:
    """Keep the validator of a part started now (none: the part will restart from zero if interrupted)."""
    path = _validator_file(part)
    try:
        if validator is None:
            path.unlink(missing_ok=True)
        else:
            path.write_text(validator)
    except OSError as err:
        raise write_error(path, err) from None


def _write_body(response: http.client.HTTPResponse, part: Path, mode: str, offset: int, progress: bool) -> None:
    length = response.headers.get("Content-Length")
    total = offset + int(length) if length and length.isdigit() else None
    try:
        f = part.open(mode)
    except OSError as err:
        raise write_error(part, err) from None
    with f:
        steps = progress_steps(
            _chunks(response),
            bar=progress,
            desc=f"{part.name[: -len('.part')]} (MiB)",
            total=math.ceil(total / CHUNK) if total else 0,
            initial=offset // CHUNK,
        )
        try:
            for chunk in steps:
                try:
                    f.write(chunk)
                except OSError as err:
                    raise write_error(part, err) from None
        except (http.client.HTTPException, OSError) as err:  # the connection, not the disk: resumable
            raise _Retry(f"{type(err).__name__} after {f.tell()} bytes") from None
    size = part.stat().st_size
    if total is not None and size != total:
        raise _Retry(f"got {size} of {total} bytes")


def _chunks(response: http.client.HTTPResponse) -> Iterator[bytes]:
    """The body in CHUNK-sized blocks, read as it arrives; too slow a transfer (under MIN_RATE on average once
    RATE_GRACE_S have passed) is given up, its part kept to resume."""
    started, received, block = time.monotonic(), 0, b""
    while piece := response.read1(CHUNK - len(block)):
        block += piece
        received += len(piece)
        elapsed = time.monotonic() - started
        if elapsed > RATE_GRACE_S and received < MIN_RATE * elapsed:
            if block:
                yield block
            raise _Unavailable(
                f"too slow: {received} bytes in {elapsed:.0f} s, under the {MIN_RATE // 1024} KiB/s every download "
                f"must keep on average after {RATE_GRACE_S:.0f} s"
            )
        if len(block) == CHUNK:
            yield block
            block = b""
    if block:
        yield block


def _range_start(response: http.client.HTTPResponse) -> int | None:
    match = re.match(r"bytes (\d+)-", response.headers.get("Content-Range", ""))
    return int(match[1]) if match else None


def _open(
    opener: urllib.request.OpenerDirector, url: str, offset: int, validator: str | None, hosts: tuple[str, ...]
) -> http.client.HTTPResponse:
    """The response that carries the file, through Google Drive's confirmation page if one comes first (its form
    followed only to `hosts`)."""
    headers = {"User-Agent": USER_AGENT}
    if offset:
        headers.update({"Range": f"bytes={offset}-", "If-Range": validator})
    for _ in range(MAX_CONFIRM_PAGES):
        response = opener.open(urllib.request.Request(url, headers=headers), timeout=TIMEOUT_S)
        if response.headers.get_content_type() != "text/html":
            return response
        with response:
            page = response.read(1 << 20).decode("utf-8", "replace")
        url = _confirmed_url(page, response.url)
        _check_on_hosts(url, hosts, "its confirmation page leads to")
    raise _Unavailable("answered with confirmation pages only")


def _confirmed_url(page: str, page_url: str) -> str:
    """The download link of Google Drive's "cannot scan for viruses" page: its download form (action + hidden
    inputs: id, export, confirm, uuid) or, on older pages, the /uc?export=download&confirm=… link."""
    error = re.search(r'class="uc-error-subcaption">(.*?)</p>', page, re.S)
    if error:
        raise _Unavailable(f"Google Drive: {html.unescape(error[1]).strip()}")
    form = re.search(r'<form[^>]*id="download-form"[^>]*action="([^"]+)"', page)
    if form:
        action = urlsplit(urljoin(page_url, html.unescape(form[1])))
        query = dict(parse_qsl(action.query))
        query.update(re.findall(r'<input type="hidden" name="([^"]+)" value="([^"]*)"', page))
        return urlunsplit(action._replace(query=urlencode(query)))
    link = re.search(r'href="(/uc\?export=download[^"]+)"', page)
    if link:
        return urljoin(page_url, html.unescape(link[1]))
    raise _Unavailable("answered with a web page, not the file (not shared, or too many downloads today)")


# ------------------------------------------------------------------------------------------------ install


def _install(part: Part, archive: Path, root: Path) -> int | None:
    """Check `archive`, extract (or copy) it into a staging folder, check that, rename its target into place."""
    staging = root / f"{STAGING}{part.target.replace('/', '_')}"
    try:
        shutil.rmtree(staging, ignore_errors=True)
        built = staging / part.target
        try:
            _check_format(part.remote.filename, archive)
            if part.kind == "file":
                built.parent.mkdir(parents=True)
                shutil.copyfile(archive, built)
            else:
                _extract(part.kind, archive, staging / part.extract_to, part.max_bytes)
            if not built.exists():
                top = sorted(p.name for p in (staging / part.extract_to).iterdir())
                raise UserError(f"holds {', '.join(top[:5]) or 'nothing'}, not {part.target}")
            count = part.check(built) if part.check else None
            if part.expected is not None and count != part.expected:
                raise UserError(f"{count} images where the source has {part.expected}")
        except UserError as err:
            archive.unlink(missing_ok=True)
            raise UserError(
                f"refused {archive.name} ({err}); it was deleted and nothing was installed: run the command "
                "again, and report it if it persists (the source may have changed)"
            ) from None
        target = root / part.target
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(built, target)
    except OSError as err:
        raise write_error(root / part.target, err) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return count


# how a file's name says it is stored → (what it must be, its magic bytes at offset 0)
MAGIC = {
    ".tar.gz": ("gzip-compressed", b"\x1f\x8b"),
    ".gz": ("gzip-compressed", b"\x1f\x8b"),
    ".zip": ("a zip archive", b"PK\x03\x04"),
    ".mat": ("a MATLAB 5 file", b"MATLAB 5.0 MAT-file"),
}
TAR_MAGIC_AT, TAR_MAGIC = 257, b"ustar"  # POSIX and GNU tar headers


def _check_format(filename: str, archive: Path) -> None:
    """The file is what its name says, by its magic bytes (an uncompressed tar under a .tar.gz name is refused)."""
    suffix = next((suffix for suffix in MAGIC if filename.endswith(suffix)), None)
    if suffix is None:
        return
    what, magic = MAGIC[suffix]
    with archive.open("rb") as f:
        head = f.read(max(len(magic), TAR_MAGIC_AT + len(TAR_MAGIC)))
    if head.startswith(magic):
        return
    plain_tar = head[TAR_MAGIC_AT:].startswith(TAR_MAGIC)
    found = "an uncompressed tar" if plain_tar else f"a file that starts with {head[:8]!r}"
    raise UserError(f"it is not {what} as its name {suffix} says, but {found}")


class _BadArchive(Exception):
    """An archive refused for what it holds (a link, a path outside, a bomb), whatever its format."""


_CORRUPT = (
    _BadArchive,
    tarfile.TarError,
    zipfile.BadZipFile,
    EOFError,
    zlib.error,
    gzip.BadGzipFile,
    NotImplementedError,
)
RATIO_FLOOR = 64 << 20  # MAX_RATIO is not applied under this many bytes (tiny archives have large headers)
_TAR_KINDS = {
    tarfile.SYMTYPE: "symbolic link",
    tarfile.LNKTYPE: "hard link",
    tarfile.CHRTYPE: "character device",
    tarfile.BLKTYPE: "block device",
    tarfile.FIFOTYPE: "fifo",
}


def _extract(kind: str, archive: Path, into: Path, max_bytes: int) -> None:
    """Extract `archive` (a gzip-compressed tar, or a zip) into `into` once every member passed `_check_members`."""
    into.mkdir(parents=True, exist_ok=True)
    limit = min(max_bytes, max(MAX_RATIO * archive.stat().st_size, RATIO_FLOOR))
    try:
        if kind == "tar":
            _check_tar_stream(archive, limit)
            with tarfile.open(archive, "r:gz") as tar:
                members = tar.getmembers()
                for member in members:
                    if not (member.isfile() or member.isdir()):
                        kind_name = _TAR_KINDS.get(member.type, f"member of type {member.type!r}")
                        raise _BadArchive(f"{member.name!r} is a {kind_name}, not a file or a folder")
                _check_members([(m.name, m.isdir(), m.size) for m in members], limit, max_bytes)
                if hasattr(tarfile, "data_filter"):  # Python >= 3.10.12 / 3.11.4: also drops modes and owners
                    tar.extractall(into, filter="data")
                else:
                    tar.extractall(into)
            return
        with zipfile.ZipFile(archive) as zipped:
            infos = zipped.infolist()
            for info in infos:
                mode = stat.S_IFMT(info.external_attr >> 16)
                if mode not in (0, stat.S_IFREG, stat.S_IFDIR):
                    raise _BadArchive(f"{info.filename!r} is not a file or a folder (mode {oct(mode)})")
            _check_members([(i.filename, i.is_dir(), i.file_size) for i in infos], limit, max_bytes)
            bad = zipped.testzip()  # every member's CRC; zipfile reads no more than each declares
            if bad is not None:
                raise zipfile.BadZipFile(f"bad CRC in {bad}")
            zipped.extractall(into)
    except _CORRUPT as err:
        raise UserError(f"not a valid {kind} archive: {err or type(err).__name__}") from None


def _check_tar_stream(archive: Path, limit: int) -> None:
    """The gzip stream's CRC (tarfile stops before gzip's trailer), read without writing and given up beyond twice
    `limit` (a tar of small files is about twice their size), and a tar header at its start."""
    read = 0
    with gzip.open(archive) as stream:
        head = stream.read(512)
        if head[TAR_MAGIC_AT : TAR_MAGIC_AT + len(TAR_MAGIC)] != TAR_MAGIC:
            raise tarfile.TarError("its gzip stream holds no tar archive")
        while block := stream.read(CHUNK):
            read += len(block)
            if read > 2 * limit + CHUNK:
                raise _BadArchive(
                    f"it decompresses to more than {2 * limit + CHUNK} bytes, over twice the {limit} its members may "
                    "hold: a decompression bomb, or not this set"
                )


def _check_members(members: list[tuple[str, bool, int]], limit: int, max_bytes: int) -> None:
    """Before anything is written: every (name, is a folder, declared size) lands inside the folder the archive is
    extracted into (and so inside the installed one: no member is a link), no name is both a file and a folder,
    and the declared sizes stay under `limit` (`max_bytes` for the set, or MAX_RATIO times the archive)."""
    files, folders = set(), set()
    for name, is_folder, _ in members:
        if _unsafe(name):
            raise _BadArchive(f"unsafe member {name!r}")
        parts = PurePosixPath(name.replace("\\", "/")).parts
        folders.update("/".join(parts[:k]) for k in range(1, len(parts)))
        (folders if is_folder else files).add("/".join(parts))
    both = sorted(files & folders)
    if both:
        raise _BadArchive(f"it holds both a file and a folder named {both[0]!r}")
    total = sum(size for _, _, size in members)
    if total > limit:
        bound = "the bound for this set" if limit == max_bytes else f"{MAX_RATIO} times the archive's size"
        raise _BadArchive(
            f"its members declare {total} bytes once extracted, over {limit} ({bound}): a decompression bomb, or "
            "not this set"
        )


def _unsafe(name: str) -> bool:
    """An archive member that would land outside the folder it is extracted into."""
    return name.startswith(("/", "\\")) or ".." in Path(name.replace("\\", "/")).parts


def _check_benchmark_lists(benchmark_name: str, root: Path) -> str:
    """Every list OpenOOD's benchmark reads (`hrp_ood.data.benchmarks`) exists and names only present images."""
    from hrp_ood.data.benchmarks import BENCHMARKS
    from hrp_ood.data.image_lists import list_files

    benchmark = BENCHMARKS[benchmark_name]
    lists = [benchmark.id_list(split, root) for split in ("train", "val", "test")]
    lists += [benchmark.ood_val_list(root), *(benchmark.ood_list(n, root) for n in {**benchmark.near, **benchmark.far})]
    images = 0
    for list_file, images_root in lists:
        if not list_file.is_file():
            raise UserError(
                f"OpenOOD's list {shown(list_file)} is missing; delete {shown(root / 'benchmark_imglist')} and "
                f"fetch openood-{benchmark_name} again"
            )
        try:
            images += len(list_files(list_file, images_root)) - 1  # the list, then its images; all must exist
        except UserError as err:
            raise UserError(
                f"{err}; or delete that set's folder under {shown(images_root)} and fetch "
                f"openood-{benchmark_name} again"
            ) from None
    return f"its {len(lists)} lists name {images} images, all present"


# ------------------------------------------------------------------------------------------------ command


def add_fetch_arguments(p: argparse.ArgumentParser) -> None:
    names = "; ".join(f"{s.name}: {s.description}" for s in SOURCES.values())
    p.description = f"Download, verify and install datasets in the layout train/evaluate read. {names}."
    p.add_argument("names", nargs="+", metavar="NAME", help=f"one or more of {', '.join(SOURCES)}")
    p.add_argument("--root", type=Path, default=Path("./data"), help="data root to install into (default ./data)")
    p.add_argument(
        "--base-url",
        default=None,
        help=f"fetch every file as BASE_URL/<file name> (a mirror) instead of its source (env: {BASE_URL_ENV})",
    )
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None, help="progress bars")


def cmd_fetch(args: argparse.Namespace) -> int:
    for line in fetch(args.names, args.root, base_url=args.base_url, progress=args.progress):
        print(line)
    for name in dict.fromkeys(args.names):
        print(f"use it: {SOURCES[name].usage(args.root)}")
    return 0


__all__ = ["SOURCES", "Part", "Remote", "Source", "fetch", "fetch_hint"]
