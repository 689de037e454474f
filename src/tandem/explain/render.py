"""Pictures of attribution maps (NumPy and Pillow; never imports torch).

    png = overlay_png(pixels, heatmap, "zebra 97.3% (integrated gradients)")   # image | image + map, caption
    png = heatmap_png(heatmap)          # RGBA, transparent where the map is ~0: to lay over the image in a page

Pixels that raise the explained class's probability are drawn from red (weak) through orange to yellow (strong),
those that lower it from blue (weak) to cyan (strong); the stronger, the more opaque. `legend()` says so in the
colours' names, taken from the ramps themselves (`colour_name`), so the words cannot drift from what is drawn. Maps are scaled by a robust maximum (the value above which the top 2% of the map's absolute mass lies,
as Captum's visualisation does), so one extreme pixel does not wash out the rest.
"""

from __future__ import annotations

import colorsys
import io

import numpy as np

POSITIVE_RAMP = np.array([(200, 20, 0), (255, 220, 0)], np.float32)   # weak -> strong: red, orange, yellow
NEGATIVE_RAMP = np.array([(0, 70, 220), (0, 220, 255)], np.float32)   # weak -> strong: blue to cyan
# Hue bands (degrees, upper bounds) of the colour words the legend may use.
_HUES = ((15, "red"), (40, "orange"), (70, "yellow"), (170, "green"), (200, "cyan"), (260, "blue"), (330, "purple"),
         (360, "red"))
_OPACITY = 0.9   # at full strength: the image stays visible under the map
_DIM = 0.5       # the image under the map is darkened, so the colours stand out against grey animals
_OUTLIER_MASS = 0.02


def ramp_colour(ramp: np.ndarray, strength: float) -> np.ndarray:
    """The RGB colour (floats 0..255) a ramp draws at a strength in 0..1, as the overlay computes it."""
    return ramp[0] + float(strength) * (ramp[1] - ramp[0])


def colour_name(rgb) -> str:
    """A plain name for an RGB colour (0..255) by its hue: red, orange, yellow, green, cyan, blue or purple."""
    r, g, b = (float(v) / 255 for v in rgb)
    hue = colorsys.rgb_to_hsv(r, g, b)[0] * 360
    return next(name for bound, name in _HUES if hue < bound)


def ramp_names(ramp: np.ndarray) -> list[str]:
    """The colours a ramp passes through, weak to strong (at strengths 0, 0.5 and 1), each named once."""
    names: list[str] = []
    for strength in (0.0, 0.5, 1.0):
        name = colour_name(ramp_colour(ramp, strength))
        if name not in names:
            names.append(name)
    return names


def legend(label: str, signed: bool = True) -> str:
    """What the colours mean, named as drawn: "red to orange to yellow (weak to strong): for zebra; blue to cyan:
    against". signed=False (Grad-CAM, which keeps only what speaks for the class): the first half alone."""
    positive = " to ".join(ramp_names(POSITIVE_RAMP))
    text = f"{positive} (weak to strong): for {label}"
    if signed:
        text += f"; {' to '.join(ramp_names(NEGATIVE_RAMP))}: against"
    return text


def robust_scale(heatmap: np.ndarray) -> float:
    """The absolute value above which the top 2% of the map's absolute mass lies (1.0 for an all-zero map)."""
    values = np.sort(np.abs(np.asarray(heatmap, np.float64)).ravel())
    total = values.sum()
    if not np.isfinite(total) or total <= 0:
        return 1.0
    at = int(np.searchsorted(np.cumsum(values), (1 - _OUTLIER_MASS) * total))
    return float(values[min(at, len(values) - 1)]) or float(values[-1])


def _colours(heatmap: np.ndarray, scale: int) -> tuple[np.ndarray, np.ndarray]:
    """RGB float (H*scale, W*scale, 3) and opacity in 0..1 of the same size, from a signed (H, W) map."""
    from PIL import Image

    heatmap = np.nan_to_num(np.asarray(heatmap, np.float32))
    if heatmap.ndim != 2:
        raise ValueError(f"a heatmap is (H, W), got shape {heatmap.shape}")
    height, width = heatmap.shape
    # Bilinear on the values themselves, then colour: a smooth map without colour fringes at its edges.
    big = np.asarray(Image.fromarray(heatmap / robust_scale(heatmap)).resize((width * scale, height * scale),
                                                                              Image.Resampling.BILINEAR))
    strength = np.clip(np.abs(big), 0, 1)[..., None]
    ramp = np.where(big[..., None] >= 0, ramp_colour(POSITIVE_RAMP, 0) + strength * (POSITIVE_RAMP[1] - POSITIVE_RAMP[0]),
                    ramp_colour(NEGATIVE_RAMP, 0) + strength * (NEGATIVE_RAMP[1] - NEGATIVE_RAMP[0]))
    return ramp, _OPACITY * strength[..., 0] ** 0.75  # weak values still show, faintly


def _rgb(pixels: np.ndarray, scale: int) -> np.ndarray:
    """uint8 (H, W, C) -> float RGB (H*scale, W*scale, 3), each pixel a scale x scale block (what the model saw)."""
    pixels = np.asarray(pixels)
    if pixels.ndim == 2:
        pixels = pixels[..., None]
    if pixels.ndim != 3 or pixels.shape[-1] not in (1, 3):
        raise ValueError(f"pixels are uint8 (H, W, 1) or (H, W, 3), got shape {pixels.shape}")
    rgb = np.repeat(pixels, 3, axis=-1) if pixels.shape[-1] == 1 else pixels
    return rgb.repeat(scale, axis=0).repeat(scale, axis=1).astype(np.float32)


def _png(array: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()  # (H, W, 4) uint8 is RGBA to Pillow, (H, W, 3) RGB
    Image.fromarray(np.clip(np.rint(array), 0, 255).astype(np.uint8)).save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def _wrap(text: str, font, width: float) -> list[str]:
    """The caption's lines (split at newlines), each broken between words to fit `width` pixels."""
    lines: list[str] = []
    for paragraph in text.splitlines() or [""]:
        line = ""
        for word in paragraph.split(" "):
            candidate = f"{line} {word}" if line else word
            if line and font.getlength(candidate) > width:
                lines.append(line)
                line = word
            else:
                line = candidate
        lines.append(line)
    return lines


def heatmap_png(heatmap: np.ndarray, scale: int = 8) -> bytes:
    """The map alone as an RGBA PNG (H*scale, W*scale), transparent where it is ~0, to lay over the image."""
    colours, opacity = _colours(heatmap, scale)
    return _png(np.concatenate([colours, 255 * opacity[..., None]], axis=-1))


def overlay_png(pixels: np.ndarray, heatmap: np.ndarray, caption: str, scale: int = 8) -> bytes:
    """A PNG: the image as the model saw it, beside it the image with the map over it, the caption underneath
    (label and probability), wrapped to the picture's width."""
    from PIL import Image, ImageDraw, ImageFont

    image = _rgb(pixels, scale)
    if image.shape[:2] != (heatmap.shape[0] * scale, heatmap.shape[1] * scale):
        raise ValueError(f"pixels {np.shape(pixels)} and heatmap {np.shape(heatmap)} differ in size")
    colours, opacity = _colours(heatmap, scale)
    mixed = _DIM * image * (1 - opacity[..., None]) + colours * opacity[..., None]
    height, width = image.shape[:2]
    gap, pad = max(4, scale), max(4, scale)
    font = ImageFont.load_default(size=max(12, min(18, width // 14)))
    lines = _wrap(caption, font, 2 * width + gap)
    line_height = int(font.getbbox("Ag")[3]) + 4
    canvas = Image.new("RGB", (2 * width + gap + 2 * pad, height + 2 * pad + len(lines) * line_height + pad // 2),
                       (255, 255, 255))
    canvas.paste(Image.fromarray(image.astype(np.uint8)), (pad, pad))
    canvas.paste(Image.fromarray(np.clip(np.rint(mixed), 0, 255).astype(np.uint8)), (pad + width + gap, pad))
    draw = ImageDraw.Draw(canvas)
    for i, line in enumerate(lines):
        draw.text((pad, height + pad + pad // 2 + i * line_height), line, fill=(20, 20, 20), font=font)
    buffer = io.BytesIO()
    canvas.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()
