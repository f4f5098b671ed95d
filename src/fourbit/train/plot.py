"""The loss curve (and compare's perplexity-vs-bits points) as a PNG, drawn without a plotting library.

A PNG is an 8-byte signature and chunks (length, type, data, CRC32): IHDR (size, 8-bit RGB),
IDAT (the zlib-compressed rows, each prefixed with filter type 0) and IEND. On a white canvas
we draw the axes, the per-step loss (light) and its moving average (dark), and label the axes'
ends with a 3x5 pixel digit font: first/last step below, max/min loss on the left.
"""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

from ..io.atomic import atomic_file

# 3x5 glyphs, one string of 15 bits per character, row by row.
_FONT = {
    "0": "111101101101111", "1": "010110010010111", "2": "111001111100111", "3": "111001111001111",
    "4": "101101111001001", "5": "111100111001111", "6": "111100111101111", "7": "111001010010010",
    "8": "111101111101111", "9": "111101111001111", ".": "000000000000010", "-": "000000111000000",
    "e": "000111111100111",
}
WIDTH, HEIGHT, MARGIN = 640, 400, 40


PLOT = (MARGIN + 20, WIDTH - 10, 10, HEIGHT - MARGIN)  # left, right, top, bottom of the plot area


def _axes() -> list[list[tuple[int, int, int]]]:
    canvas = [[(255, 255, 255)] * WIDTH for _ in range(HEIGHT)]
    left, right, top, bottom = PLOT
    for x in range(left, right + 1):
        canvas[bottom][x] = (0, 0, 0)
    for y in range(top, bottom + 1):
        canvas[y][left] = (0, 0, 0)
    return canvas


def plot_loss(losses: list[float], path: str | os.PathLike, smooth: int = 10) -> Path:
    canvas = _axes()
    left, right, top, bottom = PLOT
    if losses:
        lo, hi = min(losses), max(losses)
        span = (hi - lo) or 1.0

        def point(i: int, value: float) -> tuple[int, int]:
            x = left + round(i * (right - left) / max(len(losses) - 1, 1))
            return x, bottom - round((value - lo) * (bottom - top) / span)

        windows = [losses[max(0, i - smooth + 1) : i + 1] for i in range(len(losses))]
        averaged = [sum(w) / len(w) for w in windows]
        for series, colour in ((losses, (170, 190, 230)), (averaged, (20, 60, 160))):
            for i in range(1, len(series)):
                _line(canvas, point(i - 1, series[i - 1]), point(i, series[i]), colour)
        _text(canvas, f"{hi:.3g}", 2, top)
        _text(canvas, f"{lo:.3g}", 2, bottom - 5)
        _text(canvas, "1", left, bottom + 6)
        _text(canvas, str(len(losses)), right - 4 * len(str(len(losses))), bottom + 6)
    return _write_png(canvas, path)


COLOURS = [(214, 39, 40), (31, 119, 180), (44, 160, 44), (255, 127, 14), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127)]


def plot_points(points: list[tuple[float, float]], path: str | os.PathLike) -> Path:
    """(x, y) points as 7-pixel squares, one colour each in COLOURS order (the caller prints the
    legend); the axes' ends labelled with the smallest and largest x and y."""
    canvas = _axes()
    left, right, top, bottom = PLOT
    if points:
        xs, ys = [p[0] for p in points], [p[1] for p in points]
        x_lo, x_hi, y_lo, y_hi = min(xs), max(xs), min(ys), max(ys)
        for i, (x, y) in enumerate(points):
            px = left + 10 + round((x - x_lo) * (right - left - 20) / ((x_hi - x_lo) or 1))
            py = bottom - 10 - round((y - y_lo) * (bottom - top - 20) / ((y_hi - y_lo) or 1))
            for dy in range(-3, 4):
                for dx in range(-3, 4):
                    canvas[py + dy][px + dx] = COLOURS[i % len(COLOURS)]
        _text(canvas, f"{y_hi:.3g}", 2, top + 7)
        _text(canvas, f"{y_lo:.3g}", 2, bottom - 12)
        _text(canvas, f"{x_lo:.3g}", left + 8, bottom + 6)
        _text(canvas, f"{x_hi:.3g}", right - 14, bottom + 6)
    return _write_png(canvas, path)


def _write_png(canvas, path: str | os.PathLike) -> Path:
    raw = b"".join(b"\x00" + bytes(v for pixel in row for v in pixel) for row in canvas)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", WIDTH, HEIGHT, 8, 2, 0, 0, 0))
    png += chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")
    with atomic_file(path, "wb") as f:
        f.write(png)
    return Path(path)


def _line(canvas, a: tuple[int, int], b: tuple[int, int], colour) -> None:
    (x0, y0), (x1, y1) = a, b
    steps = max(abs(x1 - x0), abs(y1 - y0), 1)
    for s in range(steps + 1):
        x, y = x0 + (x1 - x0) * s // steps, y0 + (y1 - y0) * s // steps
        if 0 <= y < HEIGHT and 0 <= x < WIDTH:
            canvas[y][x] = colour


def _text(canvas, text: str, x: int, y: int) -> None:
    for c in text:
        glyph = _FONT.get(c)
        if glyph:
            for i, bit in enumerate(glyph):
                if bit == "1" and 0 <= y + i // 3 < HEIGHT and 0 <= x + i % 3 < WIDTH:
                    canvas[y + i // 3][x + i % 3] = (0, 0, 0)
        x += 4
