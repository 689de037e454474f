"""Pictures of concepts and rule paths (Pillow only): a concept's prototype strip of the image regions where it
fires most (crops, not whole images), and an explanation's picture: per condition, where its concept fired.
"""

from __future__ import annotations

import io

import numpy as np

_ZOOM_TO = 96      # a crop or an image is enlarged to about this many pixels
_GAP, _TOP = 4, 18
_FIRED = np.array((255, 140, 0), np.float32)  # orange: where a concept fired


def crop_box(row: int, col: int, grid: tuple[int, int], size: tuple[int, int]) -> tuple[int, int, int, int]:
    """(top, left, bottom, right) pixels of a grid cell's region: half the image's side, centred on the cell."""
    (gh, gw), (h, w) = grid, size
    ch, cw = max(4, h // 2), max(4, w // 2)
    cy, cx = (row + 0.5) * h / gh, (col + 0.5) * w / gw
    top, left = int(round(min(max(cy - ch / 2, 0), h - ch))), int(round(min(max(cx - cw / 2, 0), w - cw)))
    return top, left, top + ch, left + cw


def _tile(image: np.ndarray):
    from PIL import Image

    return Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image[..., :3]).convert("RGB")


def _png(picture) -> bytes:
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()


def crop_strip(pixels: np.ndarray, positions: list[tuple[int, int]], grid: tuple[int, int], caption: str) -> bytes:
    """The regions (row, col of the concept layer's grid) of these images, side by side, enlarged, captioned."""
    from PIL import Image, ImageDraw

    crops = []
    for image, (row, col) in zip(pixels, positions):
        top, left, bottom, right = crop_box(row, col, grid, image.shape[:2])
        crops.append(image[top:bottom, left:right])
    h, w = crops[0].shape[:2]
    zoom = max(1, _ZOOM_TO // max(h, w))
    width = max(len(crops) * (w * zoom + _GAP) + _GAP, 7 * len(caption) + 2 * _GAP)
    strip = Image.new("RGB", (width, h * zoom + _TOP + _GAP), "white")
    for i, crop in enumerate(crops):
        strip.paste(_tile(crop).resize((w * zoom, h * zoom), Image.NEAREST), (_GAP + i * (w * zoom + _GAP), _TOP))
    ImageDraw.Draw(strip).text((_GAP, 3), caption, fill="black")
    return _png(strip)


def fired(image: np.ndarray, where: np.ndarray, zoom: int = 4):
    """The image, dimmed, with orange where the concept fired (`where`: its code map scaled to 0..1)."""
    from PIL import Image

    h, w = image.shape[:2]
    base = np.asarray(_tile(image), np.float32) * 0.55
    mask = Image.fromarray((np.clip(where, 0, 1) * 255).astype(np.uint8)).resize((w, h), Image.BILINEAR)
    alpha = (np.asarray(mask, np.float32) / 255.0)[..., None]
    mixed = base * (1 - alpha) + _FIRED * alpha
    return Image.fromarray(mixed.clip(0, 255).astype(np.uint8)).resize((w * zoom, h * zoom), Image.NEAREST)


def fired_png(image: np.ndarray, where: np.ndarray, zoom: int = 4) -> bytes:
    return _png(fired(image, where, zoom))


def explanation_png(image: np.ndarray, why: dict) -> bytes:
    """A rule path as a picture: the image and its answer on top, then one row per condition: where the concept
    fired in this image (orange), and the condition in words."""
    from PIL import Image, ImageDraw

    from tandem.explain.rules_tree import condition_text

    zoom = max(1, _ZOOM_TO // max(image.shape[:2]))
    side = image.shape[0] * zoom
    rows = why["conditions"]
    line = 14
    text_width = 760
    height = _GAP + side + _GAP + sum(side + _GAP + line for _ in rows) + 3 * line
    page = Image.new("RGB", (side + 2 * _GAP + text_width, height), "white")
    draw = ImageDraw.Draw(page)
    page.paste(_tile(image).resize((side, side), Image.NEAREST), (_GAP, _GAP))
    verdict = "agrees with the network" if why["agrees"] else f"the network says {why['network_label']}"
    draw.text((side + 3 * _GAP, _GAP), f"rules: {why['label']}  ({verdict})", fill="black")
    draw.text((side + 3 * _GAP, _GAP + line), f"group: {why['group']}", fill="black")
    y = _GAP + side + _GAP
    level = None
    for c in rows:
        if c["level"] != level:
            level = c["level"]
            title = f"level 1: which group ({why['group']})" if level == 1 else f"level 2: which class in it"
            draw.text((_GAP, y), title, fill=(60, 60, 160))
            y += line
        page.paste(fired(image, np.asarray(c["where"], np.float32), zoom), (_GAP, y))
        words = condition_text(c)
        for i in range(0, len(words), 110):
            draw.text((side + 3 * _GAP, y + (i // 110) * line), words[i:i + 110], fill="black")
        y += side + _GAP
    return _png(page.crop((0, 0, page.width, min(height, y + line))))
