"""`usjepa shards inspect OUT`: what a shard set holds, and a contact sheet of samples with their
region masks drawn on (docs/data.md#verify-and-inspect)."""

from __future__ import annotations

import math
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

from usjepa.errors import UserError
from usjepa.fileio import atomic_write
from usjepa.ingest.verify import read_samples
from usjepa.shardset.manifest import Manifest, load_manifest
from usjepa.shardset.sample import decode_sample

BORDER = (40, 220, 90)  # region contour
OUTSIDE_TINT = np.array([30, 60, 140], dtype=np.float32)  # outside the region
BACKGROUND = (24, 24, 24)
TEXT = (235, 235, 235)
FLAG_TEXT = (255, 120, 80)


def first_samples(manifest: Manifest, split: str, n: int):
    """The first `n` decoded samples of a split, in manifest (shard) order: (key, image, region, meta)."""
    out = []
    for path in manifest.shard_paths(split):
        try:
            for raw in read_samples(path):
                image, region, meta = decode_sample(raw)
                out.append((raw["__key__"], image, region, meta))
                if len(out) >= n:
                    return out
        except (OSError, ValueError, tarfile.TarError) as exc:
            raise UserError(
                f"shard {path} cannot be read ({exc}); `usjepa shards verify {manifest.root}` lists what is "
                "damaged: rebuild or restore the set"
            ) from None
    return out


def render_tile(image: np.ndarray, region: np.ndarray, side: int) -> Image.Image:
    """RGB tile: the image, outside of the region tinted, the region's border drawn."""
    rgb = np.repeat(image[..., None].astype(np.float32), 3, axis=2)
    outside = ~region
    rgb[outside] = 0.55 * rgb[outside] + 0.45 * OUTSIDE_TINT
    tile = Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8), "RGB")
    scale = max(1, round(side / max(image.shape)))
    if scale > 1:
        tile = tile.resize((image.shape[1] * scale, image.shape[0] * scale), Image.Resampling.NEAREST)
        region = np.kron(region, np.ones((scale, scale), dtype=bool))
    edge = region & ~ndimage.binary_erosion(region, iterations=max(1, scale // 2), border_value=0)
    arr = np.asarray(tile).copy()
    arr[edge] = BORDER
    return Image.fromarray(arr, "RGB")


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def _fit(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> str:
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."


def contact_sheet(
    shards_dir, grid_path, split: str = "train", n: int = 32, columns: int | None = None, min_tile: int = 128
) -> dict:
    """Write a PNG contact sheet of the first `n` samples of `split`; returns what it drew."""
    if n < 1:
        raise UserError(f"--n {n}: draw at least one sample")
    manifest = load_manifest(shards_dir)
    samples = first_samples(manifest, split, n)
    if not samples:
        nonempty = [s for s, info in manifest.splits.items() if info.count]
        raise UserError(f"split {split!r} of {manifest.root} holds no samples; choose one of: {', '.join(nonempty)}")
    side = max(min_tile, manifest.image_size)
    columns = columns or max(1, math.ceil(math.sqrt(len(samples))))
    rows = math.ceil(len(samples) / columns)
    font_size = max(10, side // 12)
    font = _font(font_size)
    caption, pad, title_h = 2 * (font_size + 4) + 4, 6, font_size + 12
    tiles = [render_tile(image, region, side) for _, image, region, _ in samples]
    tile_w, tile_h = max(t.width for t in tiles), max(t.height for t in tiles)
    size = (pad + columns * (tile_w + pad), title_h + pad + rows * (tile_h + caption + pad))
    sheet = Image.new("RGB", size, BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    title = (
        f"{manifest.root.name}: {split}, first {len(samples)} of {manifest.count(split)} "
        f"({manifest.image_size} px; green: region border, blue: outside)"
    )
    draw.text((pad, 4), title, fill=TEXT, font=font)
    for i, ((key, _, _, meta), tile) in enumerate(zip(samples, tiles)):
        x = pad + (i % columns) * (tile_w + pad)
        y = title_h + pad + (i // columns) * (tile_h + caption + pad)
        sheet.paste(tile, (x, y))
        _caption(draw, (x, y + tile_h + 2), key, meta, font, font_size, tile_w)
    grid_path = Path(grid_path).expanduser()
    if not grid_path.parent.is_dir():
        what = "is a file, not a folder" if grid_path.parent.exists() else "does not exist"
        raise UserError(f"folder {grid_path.parent} for the contact sheet {what}; create it or choose another path")
    try:
        atomic_write(grid_path, lambda f: sheet.save(f, format="PNG"))
    except OSError as exc:
        raise UserError(f"cannot write the contact sheet {grid_path} ({exc.strerror}); choose another path") from None
    keys = [key for key, *_ in samples]
    return {"path": str(grid_path), "split": split, "samples": len(samples), "size": list(sheet.size), "keys": keys}


def _caption(draw: ImageDraw.ImageDraw, at: tuple[int, int], key: str, meta: dict, font, font_size: int, width: int):
    """Two lines under a tile: class (label), then overlay flags and the key."""
    label = meta.get("label", -1)
    name = meta.get("class_name") if label != -1 else "unlabelled"
    flags = []
    if meta.get("overlay_flagged"):
        flags.append(f"FLAGGED {meta.get('color_fraction', 0):.0%}")
    elif meta.get("inpainted"):
        flags.append("inpainted")
    x, y = at
    draw.text((x, y), _fit(draw, f"{name} ({label})", font, width), fill=TEXT, font=font)
    second = " ".join([*flags, key]) if flags else key
    draw.text((x, y + font_size + 4), _fit(draw, second, font, width), fill=FLAG_TEXT if flags else TEXT, font=font)


def contents_lines(manifest: Manifest) -> list[str]:
    """The classes, then per split: samples, groups, shards and samples per class."""
    lines = ["classes: " + (", ".join(f"{i}={c}" for i, c in enumerate(manifest.classes)) or "(none)")]
    for split, info in manifest.splits.items():
        per_class = ", ".join(f"{c} {k}" for c, k in info.class_counts.items())
        unl = f", unlabelled {info.unlabelled}" if info.unlabelled else ""
        lines.append(
            f"{split:5s} {info.count:7d} samples, {info.groups} groups, {len(info.shards)} shard(s) ({per_class}{unl})"
        )
    return lines


def summary_lines(manifest: Manifest) -> list[str]:
    """A few lines on what the shard set holds and how it was built."""
    lines = [
        f"{manifest.root}: {manifest.total} samples, {manifest.image_size} px, source "
        f"{manifest.source_format} {manifest.source_root or '(root not recorded)'}"
    ]
    lines += contents_lines(manifest)
    s = manifest.build_summary
    if s:
        lines.append(
            f"built from {s.get('items')} items ({s.get('frames')} frames): skipped {s.get('skipped')}, "
            f"duplicates {s.get('duplicates')}, inpainted {s.get('overlay_inpainted')}, flagged "
            f"{s.get('overlay_flagged')}, over the cap {s.get('capped')}"
        )
    if manifest.sampling_weight is not None:
        lines.append(f"sampling weight {manifest.sampling_weight} (min(train samples, {manifest.weight_cap}))")
    return lines
