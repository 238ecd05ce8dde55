"""The demo's toy world drawn: shapes (the classes) in visual styles (the domains), one scene each."""

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

MIN_IMAGE_SIZE = 16

# Shapes are drawn at this multiple of the output size and box-downsampled: cheap anti-aliasing
# for ImageDraw, which has none of its own.
_SUPERSAMPLE = 2

# Object colours: saturated, far apart in hue, and with unambiguous everyday names so that the
# colour word in a caption matches what a viewer (or CLIP) sees.
_COLORS: dict[str, tuple[int, int, int]] = {
    "red": (214, 39, 40),
    "orange": (245, 130, 32),
    "yellow": (240, 205, 35),
    "green": (44, 160, 44),
    "blue": (31, 90, 200),
    "purple": (128, 60, 175),
    "pink": (240, 110, 170),
}
_COLOR_NAMES: tuple[str, ...] = tuple(_COLORS)

# Warm grey that painting colours are pulled towards, which gives the muted, earthy palette.
_PAINT_GREY = np.array([150.0, 140.0, 120.0])

PHOTO_SETTINGS: dict[str, str] = {
    "wood": "on a wooden table",
    "concrete": "on a concrete floor",
    "studio": "against a plain studio backdrop",
}


# --------------------------------------------------------------------------- shapes


def _regular(n: int, radius: float = 1.0, phase: float = -math.pi / 2) -> np.ndarray:
    angles = phase + 2 * math.pi * np.arange(n) / n
    return radius * np.stack([np.cos(angles), np.sin(angles)], axis=1)


def _star(points: int = 5, inner: float = 0.45) -> np.ndarray:
    outer = _regular(2 * points)
    radii = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner)
    return outer * radii[:, None]


def _cross(half_width: float = 0.32) -> np.ndarray:
    w = half_width
    return np.array(
        [(-w, -1), (w, -1), (w, -w), (1, -w), (1, w), (w, w), (w, 1), (-w, 1), (-w, w), (-1, w)]
        + [(-1, -w), (-w, -w)],
        dtype=float,
    )


def _heart(n: int = 48) -> np.ndarray:
    t = np.linspace(0, 2 * math.pi, n, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
    pts = np.stack([x, y - (y.max() + y.min()) / 2], axis=1)
    return pts / np.abs(pts).max()


# Each shape is a list of (unit polygon, is_hole); solids come before holes so that painting the
# list in order into a mask cuts the holes out. Unit polygons fit in the unit disc.
_SHAPES: dict[str, list[tuple[np.ndarray, bool]]] = {
    "circle": [(_regular(48), False)],
    "square": [(_regular(4, phase=math.pi / 4), False)],
    "triangle": [(_regular(3, radius=1.05) + [0.0, 0.15], False)],
    "star": [(_star(), False)],
    "cross": [(_cross(), False)],
    "ring": [(_regular(48), False), (_regular(48, radius=0.55), True)],
    "pentagon": [(_regular(5), False)],
    "hexagon": [(_regular(6, phase=0.0), False)],
    "diamond": [(np.array([(0, -1), (0.62, 0), (0, 1), (-0.62, 0)], dtype=float), False)],
    "heart": [(_heart(), False)],
}
SUPPORTED_CLASSES: tuple[str, ...] = tuple(_SHAPES)


@dataclass(frozen=True)
class Scene:
    """Everything about one image that a caption may mention, drawn before any pixel work."""

    label: str
    style: str
    color_name: str
    # Placement in units of the canvas side, so one scene renders alike at any size.
    cx: float
    cy: float
    radius: float
    rotation: float
    setting: str | None  # photo background kind, or cartoon background colour name


def sample_scene(label: str, style: str, rng: np.random.Generator) -> Scene:
    color_name = _COLOR_NAMES[int(rng.integers(len(_COLOR_NAMES)))]
    radius = float(rng.uniform(0.22, 0.34))
    # Keep the whole object (plus a photo shadow offset) inside the frame.
    margin = radius + 0.06
    cx = float(rng.uniform(margin, 1 - margin))
    cy = float(rng.uniform(margin, 1 - margin))
    # Moderate tilt only: an upside-down heart or a 45-degree square reads as another class.
    rotation = float(rng.uniform(-0.6, 0.6))
    setting: str | None = None
    if style == "photo":
        setting = tuple(PHOTO_SETTINGS)[int(rng.integers(len(PHOTO_SETTINGS)))]
    elif style in ("cartoon", "painting"):
        others = [c for c in _COLOR_NAMES if c != color_name]
        setting = others[int(rng.integers(len(others)))]
    return Scene(label, style, color_name, cx, cy, radius, rotation, setting)


def _polygons(
    scene: Scene, side: int, dx: float = 0.0, dy: float = 0.0
) -> list[tuple[list[float], bool]]:
    """The scene's shape as flat pixel-coordinate lists for ImageDraw, with hole flags."""
    c, s = math.cos(scene.rotation), math.sin(scene.rotation)
    rot = np.array([[c, -s], [s, c]])
    centre = np.array([scene.cx * side + dx, scene.cy * side + dy])
    out = []
    for unit, hole in _SHAPES[scene.label]:
        pts = unit @ rot.T * (scene.radius * side) + centre
        out.append((pts.ravel().tolist(), hole))
    return out


def _mask(polys: list[tuple[list[float], bool]], side: int) -> Image.Image:
    mask = Image.new("L", (side, side), 0)
    draw = ImageDraw.Draw(mask)
    for pts, hole in polys:
        draw.polygon(pts, fill=0 if hole else 255)
    return mask


def _outline(
    draw: ImageDraw.ImageDraw, pts: list[float], fill: tuple[int, ...], width: int
) -> None:
    # Repeat the first two vertices so the closing corner also gets a rounded joint.
    draw.line(pts + pts[:4], fill=fill, width=width, joint="curve")


def _lowfreq(rng: np.random.Generator, side: int, cells: int = 4) -> np.ndarray:
    """Smooth random field in [-1, 1]: blotchy lighting and stains without per-pixel noise."""
    small = rng.uniform(-1, 1, (cells, cells)).astype(np.float32)
    field = Image.fromarray(small).resize((side, side), Image.Resampling.BICUBIC)
    return np.clip(np.asarray(field), -1, 1)


def _to_image(arr: np.ndarray) -> Image.Image:
    return Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8))


# --------------------------------------------------------------------------- styles


def _draw_photo(scene: Scene, rng: np.random.Generator, side: int, size: int) -> Image.Image:
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32) / side
    kind = scene.setting
    if kind == "wood":
        base = np.array([150.0, 100.0, 60.0]) * rng.uniform(0.8, 1.15)
        wobble = np.sin(xx * rng.uniform(3, 7) + rng.uniform(0, 2 * math.pi))
        grain = np.sin(yy * rng.uniform(30, 50) + rng.uniform(0.5, 1.5) * wobble)
        tone = 1 + 0.1 * grain + 0.2 * (yy - 0.5)  # far edge of the table a bit darker
    elif kind == "concrete":
        base = np.full(3, rng.uniform(115, 165)) + rng.uniform(-8, 8, 3)
        tone = 1 + 0.08 * _lowfreq(rng, side, 5) + 0.15 * (yy - 0.5)
    else:
        base = np.full(3, rng.uniform(195, 225)) + rng.uniform(-10, 10, 3)
        tone = 1 - 0.18 * yy + 0.04 * _lowfreq(rng, side, 3)  # studio sweep, lit from above
    # One light direction for the whole picture: it places both the shadow and the highlight.
    light = rng.uniform(-math.pi, math.pi)
    lx, ly = math.cos(light), math.sin(light)
    img = base[None, None, :] * tone[..., None]

    shadow_off = scene.radius * side * 0.3
    shadow = _mask(_polygons(scene, side, -lx * shadow_off, -ly * shadow_off), side)
    shadow = shadow.filter(ImageFilter.GaussianBlur(side * 0.04))
    img *= 1 - 0.45 * (np.asarray(shadow, dtype=np.float32) / 255)[..., None]

    # Lambert-like falloff away from the light plus a soft specular spot: reads as a solid object.
    cx, cy, r = scene.cx * side, scene.cy * side, scene.radius * side
    px, py = xx * side - cx, yy * side - cy
    along = np.clip((px * lx + py * ly) / r, -1, 1)
    hx, hy = 0.45 * r * lx, 0.45 * r * ly
    spot = np.exp(-((px - hx) ** 2 + (py - hy) ** 2) / (2 * (0.3 * r) ** 2))
    color = np.array(_COLORS[scene.color_name], dtype=np.float32)
    obj = color * (0.8 + 0.25 * along)[..., None] + (255 - color) * (0.55 * spot)[..., None]
    m = (np.asarray(_mask(_polygons(scene, side), side), dtype=np.float32) / 255)[..., None]
    img = img * (1 - m) + obj * m

    small = _to_image(img).resize((size, size), Image.Resampling.BOX)
    # Sensor noise at output resolution, mostly luminance with a little colour, as in a real
    # camera; the other styles have none, so it marks the domain.
    sigma = rng.uniform(5, 8)
    grain = rng.normal(0, sigma, (size, size, 1)) + rng.normal(0, sigma / 3, (size, size, 3))
    noisy = np.asarray(small, dtype=np.float32) + grain
    return _to_image(noisy)


def _draw_sketch(scene: Scene, rng: np.random.Generator, side: int, size: int) -> Image.Image:
    paper = np.array([250.0, 248.0, 240.0]) + rng.uniform(-4, 4, 3)
    img = Image.new("RGB", (side, side), tuple(int(v) for v in paper))
    polys = _polygons(scene, side)
    lead = int(rng.uniform(30, 80))
    if rng.random() < 0.5:
        # Diagonal hatching inside the shape: shading a pencil artist would add, still no fill.
        hatch = Image.new("L", (side, side), 0)
        hd = ImageDraw.Draw(hatch)
        step = max(3, side // int(rng.integers(9, 14)))
        for k in range(-side, side, step):
            hd.line([(k, side), (k + side, 0)], fill=255, width=max(1, side // 96))
        hatch = Image.fromarray(np.minimum(np.asarray(hatch), np.asarray(_mask(polys, side))))
        img.paste((lead + 90,) * 3, mask=hatch)
    draw = ImageDraw.Draw(img)
    width = max(1, round(side / 64))  # one output pixel: a thin pencil line
    jitter = side * 0.008
    # Two slightly offset passes: the doubled, wobbly contour of a hand-drawn line.
    for shade in (lead, lead + 60):
        for pts, _hole in polys:
            wobbly = (np.array(pts) + rng.normal(0, jitter, len(pts))).tolist()
            _outline(draw, wobbly, (shade,) * 3, width)
    return img.resize((size, size), Image.Resampling.BOX)


def _draw_cartoon(scene: Scene, rng: np.random.Generator, side: int, size: int) -> Image.Image:
    # Background: another palette hue lightened a little, so it stays saturated yet contrasts.
    bg = 0.6 * np.array(_COLORS[scene.setting or "blue"]) + 0.4 * 255
    bg_rgb = tuple(int(v) for v in bg)
    img = Image.new("RGB", (side, side), bg_rgb)
    draw = ImageDraw.Draw(img)
    polys = _polygons(scene, side)
    for pts, hole in polys:
        draw.polygon(pts, fill=bg_rgb if hole else _COLORS[scene.color_name])
    width = max(3, round(side * 0.045))  # thick ink line, about 3 px at 64 px
    for pts, _hole in polys:
        _outline(draw, pts, (0, 0, 0), width)
    return img.resize((size, size), Image.Resampling.BOX)


def _muted(rgb: tuple[int, int, int], amount: float) -> np.ndarray:
    return (1 - amount) * np.asarray(rgb, dtype=np.float64) + amount * _PAINT_GREY


def _strokes(
    img: Image.Image, rng: np.random.Generator, base: np.ndarray, count: int, spread: float
) -> None:
    side = img.size[0]
    draw = ImageDraw.Draw(img)
    # Strokes of one canvas share a main direction, as a painter's hand mostly moves one way.
    main = rng.uniform(0, math.pi)
    for _ in range(count):
        x, y = rng.uniform(-0.1, 1.1, 2) * side
        angle = main + rng.normal(0, 0.3)
        length = rng.uniform(0.2, 0.45) * side / 2
        dx, dy = math.cos(angle) * length, math.sin(angle) * length
        # Mostly lighter/darker paint of one hue, with a little hue drift: shading, not confetti.
        shift = rng.normal(0, spread) + rng.normal(0, spread / 4, 3)
        color = tuple(int(v) for v in np.clip(base + shift, 0, 255))
        width = max(2, int(rng.uniform(0.06, 0.12) * side))
        draw.line([(x - dx, y - dy), (x + dx, y + dy)], fill=color, width=width, joint="curve")


def _draw_painting(scene: Scene, rng: np.random.Generator, side: int, size: int) -> Image.Image:
    bg_base = _muted(_COLORS[scene.setting or "blue"], 0.6)
    canvas = Image.new("RGB", (side, side), tuple(int(v) for v in bg_base))
    _strokes(canvas, rng, bg_base, 60, 18)
    obj_base = _muted(_COLORS[scene.color_name], 0.3)
    obj = Image.new("RGB", (side, side), tuple(int(v) for v in obj_base))
    _strokes(obj, rng, obj_base, 40, 24)
    # Soft, slightly ragged object edge: paint, not a vector cut-out.
    mask = _mask(_polygons(scene, side), side).filter(ImageFilter.GaussianBlur(side / 90))
    canvas.paste(obj, mask=mask)
    canvas = canvas.filter(ImageFilter.GaussianBlur(side / 110))
    small = canvas.resize((size, size), Image.Resampling.BOX)
    # Posterize to 5 bits: flattens the blur into the visible bands of layered paint.
    return Image.fromarray(np.asarray(small) & 0xF8)


STYLE_RENDERERS = {
    "photo": _draw_photo,
    "sketch": _draw_sketch,
    "cartoon": _draw_cartoon,
    "painting": _draw_painting,
}


def draw_scene(scene: Scene, rng: np.random.Generator, size: int) -> Image.Image:
    return STYLE_RENDERERS[scene.style](scene, rng, size * _SUPERSAMPLE, size)


def _check_known(label: str, style: str) -> None:
    if label not in _SHAPES:
        raise ValueError(f"unknown class {label!r}; supported: {', '.join(SUPPORTED_CLASSES)}")
    if style not in STYLE_RENDERERS:
        raise ValueError(f"unknown style {style!r}; supported: {', '.join(STYLE_RENDERERS)}")


def render_image(label: str, style: str, rng: np.random.Generator, size: int) -> Image.Image:
    """One RGB image of class `label` drawn in `style`.

    `write_synthetic_dataset` draws image i as
    ``render_image(label, style, numpy.random.default_rng([seed, i]), image_size)``.
    """
    _check_known(label, style)
    if isinstance(size, bool) or not isinstance(size, int) or size < MIN_IMAGE_SIZE:
        raise ValueError(f"size must be an int >= {MIN_IMAGE_SIZE}, got {size!r}")
    return draw_scene(sample_scene(label, style, rng), rng, size)
