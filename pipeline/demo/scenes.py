"""Procedurally drawn scenes for the demo corpus: a textured background with one to three coloured shapes,
described by a small structured record that the caption grammar turns into true sentences."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

# Colour words reuse Flickr8k keywords where they exist (REFERENCE.md §4). RGB, 0..255.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (210, 30, 35), "orange": (245, 130, 20), "yellow": (245, 215, 30), "green": (40, 165, 60),
    "blue": (35, 80, 215), "purple": (135, 50, 175), "pink": (245, 130, 185), "brown": (125, 75, 35),
    "black": (25, 25, 25), "white": (245, 245, 245),
}
SHAPES = ("ball", "square", "triangle", "star", "ring", "cross", "tree")
COLOURLESS_SHAPES = ("tree",)  # drawn in their natural colours; captions never give them a colour word
# Sampling probability of each shape: a tree carries no colour word, so it is drawn a third as often.
_SHAPE_WEIGHTS = [1.0 if s in COLOURLESS_SHAPES else 3.0 for s in SHAPES]
SHAPE_P = tuple(w / sum(_SHAPE_WEIGHTS) for w in _SHAPE_WEIGHTS)
SIZES = ("small", "medium", "large")
POSITIONS = ("left", "right", "top", "bottom", "centre")
BACKGROUNDS = ("grass", "sand", "water", "snow", "road", "dirt")

# Base colour of each background texture (RGB); an object colour closer than MIN_CONTRAST is not used on it,
# so that every object stays visible at the teacher's 64 px.
BACKGROUND_RGB: dict[str, tuple[int, int, int]] = {
    "grass": (80, 150, 55), "sand": (214, 190, 140), "water": (40, 100, 170), "snow": (232, 236, 244),
    "road": (78, 78, 84), "dirt": (120, 86, 56),
}
MIN_CONTRAST = 110.0
# Object radius as a fraction of the image side: small objects are still ~10 px wide at 64 px.
SIZE_RADIUS = {"small": 0.09, "medium": 0.13, "large": 0.17}
# Object centre (x, y) as fractions of the image side. "centre" is only used for single-object scenes,
# where it cannot overlap anything; the four others keep two large objects apart.
POSITION_XY = {"left": (0.25, 0.5), "right": (0.75, 0.5), "top": (0.5, 0.22), "bottom": (0.5, 0.78),
               "centre": (0.5, 0.5)}
JITTER = 0.025  # random shift of an object's centre, fraction of the image side
SHAPE_OUTLINE_DARKEN = 0.55
SUPERSAMPLE = 4  # masks are drawn this many times larger, then shrunk, for anti-aliased edges


def allowed_colours(background: str) -> tuple[str, ...]:
    """The colour words that contrast enough with `background` to be drawn on it."""
    bg = np.array(BACKGROUND_RGB[background], dtype=float)
    return tuple(c for c, rgb in COLOURS.items() if np.linalg.norm(np.array(rgb) - bg) >= MIN_CONTRAST)


@dataclass(frozen=True)
class SceneObject:
    """One drawn object; `colour` is None exactly for COLOURLESS_SHAPES."""
    shape: str
    colour: str | None
    size: str
    position: str

    def __post_init__(self):
        if self.shape not in SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}; use one of {', '.join(SHAPES)}")
        if self.shape in COLOURLESS_SHAPES:
            if self.colour is not None:
                raise ValueError(f"a {self.shape} is drawn in its own colours; give colour=None")
        elif self.colour not in COLOURS:
            raise ValueError(f"unknown colour {self.colour!r} for a {self.shape}; "
                             f"use one of {', '.join(COLOURS)}")
        if self.size not in SIZES:
            raise ValueError(f"unknown size {self.size!r}; use one of {', '.join(SIZES)}")
        if self.position not in POSITIONS:
            raise ValueError(f"unknown position {self.position!r}; use one of {', '.join(POSITIONS)}")


@dataclass(frozen=True)
class Scene:
    """A background and 1-3 objects at distinct positions ("centre" only when alone)."""
    background: str
    objects: tuple[SceneObject, ...]

    def __post_init__(self):
        if self.background not in BACKGROUNDS:
            raise ValueError(f"unknown background {self.background!r}; use one of {', '.join(BACKGROUNDS)}")
        if not 1 <= len(self.objects) <= 3:
            raise ValueError(f"a scene holds 1 to 3 objects, got {len(self.objects)}")
        positions = [o.position for o in self.objects]
        if len(set(positions)) != len(positions):
            raise ValueError(f"two objects share a position: {positions}")
        if "centre" in positions and len(positions) > 1:
            raise ValueError("'centre' is only for a single object (it would overlap the others)")

    def to_dict(self) -> dict:
        return {"background": self.background,
                "objects": [{"shape": o.shape, "colour": o.colour, "size": o.size, "position": o.position}
                            for o in self.objects]}

    @classmethod
    def from_dict(cls, d: dict) -> Scene:
        return cls(d["background"], tuple(SceneObject(**o) for o in d["objects"]))


def sample_scene(rng: np.random.Generator) -> Scene:
    """A random scene: uniform background, 1-3 objects (40/35/25 %), no two with the same shape and colour."""
    background = BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
    n = int(rng.choice([1, 2, 3], p=[0.4, 0.35, 0.25]))
    places = ("left", "right", "top", "bottom") if n > 1 else POSITIONS
    positions = rng.choice(len(places), size=n, replace=False)
    colours = allowed_colours(background)
    objects: list[SceneObject] = []
    seen: set[tuple[str, str | None]] = set()
    for p in positions:
        while True:
            shape = SHAPES[rng.choice(len(SHAPES), p=SHAPE_P)]
            colour = None if shape in COLOURLESS_SHAPES else colours[rng.integers(len(colours))]
            if (shape, colour) not in seen:
                break
        seen.add((shape, colour))
        objects.append(SceneObject(shape, colour, SIZES[rng.integers(len(SIZES))], places[p]))
    return Scene(background, tuple(objects))


# ----------------------------------------------------------------------------------------------------
# Background textures: float arrays (H, W, 3) in 0..255

def _value_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Smooth noise (size, size) in about [-1, 1]: `cells` random values per side, bicubic-interpolated."""
    grid = rng.uniform(-1, 1, size=(cells + 1, cells + 1)).astype(np.float32)
    return np.asarray(Image.fromarray(grid, mode="F").resize((size, size), Image.BICUBIC), dtype=np.float32)


def _texture(background: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """The background texture (size, size, 3) float32 in 0..255: noise, stripes or waves, never flat."""
    base = np.array(BACKGROUND_RGB[background], dtype=np.float32)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    patches = _value_noise(rng, size, 6)
    grain = rng.standard_normal((size, size), dtype=np.float32)
    if background == "grass":
        # Vertical blades: noise stretched along y, over larger light/dark patches.
        blades = np.repeat(rng.standard_normal((size // 6 + 1, size), dtype=np.float32), 6, axis=0)[:size]
        shade = 18 * patches + 14 * blades + 5 * grain
        tint = np.array([0.6, 1.0, 0.45])
    elif background == "sand":
        ripples = np.sin(2 * np.pi * (9 * x + 4 * y + 0.6 * patches))
        shade = 10 * ripples + 8 * patches + 9 * grain
        tint = np.array([1.0, 0.92, 0.7])
    elif background == "water":
        waves = np.sin(2 * np.pi * (14 * y + 0.5 * np.sin(2 * np.pi * 3 * x) + 0.8 * patches))
        shade = 22 * np.clip(waves, 0, 1) ** 3 + 12 * patches + 3 * grain
        tint = np.array([0.7, 0.85, 1.0])
    elif background == "snow":
        speckles = (rng.random((size, size), dtype=np.float32) > 0.985) * np.float32(-25.0)
        shade = 10 * patches - 6 * y + speckles + 3 * grain
        tint = np.array([0.9, 0.95, 1.0])
    elif background == "road":
        shade = 8 * patches + 12 * grain
        tint = np.array([1.0, 1.0, 1.05])
    elif background == "dirt":
        pebbles = (_value_noise(rng, size, 40) > 0.55) * np.float32(30.0)
        shade = 20 * patches + pebbles + 10 * grain
        tint = np.array([1.0, 0.85, 0.7])
    else:
        raise ValueError(f"unknown background {background!r}; use one of {', '.join(BACKGROUNDS)}")
    img = base + shade[..., None] * tint.astype(np.float32)
    if background == "road":
        # Dashed lane marking across the middle and solid edge lines: a road, not grey noise.
        lane = (np.abs(y - 0.5) < 0.012) & ((x * 8 + rng.uniform()) % 1 < 0.55)
        edges = (np.abs(y - 0.1) < 0.01) | (np.abs(y - 0.9) < 0.01)
        img[lane | edges] = (225, 210, 120) if rng.uniform() < 0.5 else (230, 230, 230)
    # Soft light from the top left, so the picture is not uniformly lit.
    img *= (1.08 - 0.16 * (0.5 * x + 0.5 * y))[..., None]
    return img


# ----------------------------------------------------------------------------------------------------
# Objects

def _polygon_points(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    """Outline of a polygon shape centred at (cx, cy), circumradius r (pixels), rotated by `angle` rad."""
    if shape == "square":
        h = 0.8 * r  # half side: about the area of a ball of the same size (2.6 r^2 against 3.1 r^2)
        pts = [(-h, -h), (h, -h), (h, h), (-h, h)]
    elif shape == "triangle":
        angles = (-math.pi / 2 + k * 2 * math.pi / 3 for k in range(3))
        pts = [(r * math.cos(a), r * math.sin(a)) for a in angles]
    elif shape == "star":
        radii = [r if k % 2 == 0 else 0.42 * r for k in range(10)]
        angles = [-math.pi / 2 + k * math.pi / 5 for k in range(10)]
        pts = [(rk * math.cos(a), rk * math.sin(a)) for rk, a in zip(radii, angles)]
    elif shape == "cross":
        w = 0.34 * r
        pts = [(-w, -r), (w, -r), (w, -w), (r, -w), (r, w), (w, w), (w, r), (-w, r), (-w, w), (-r, w),
               (-r, -w), (-w, -w)]
    else:
        raise ValueError(f"{shape!r} is not a polygon shape")
    c, s = math.cos(angle), math.sin(angle)
    return [(cx + c * px - s * py, cy + s * px + c * py) for px, py in pts]


def _masks(shape: str, cx: float, cy: float, r: float, angle: float,
           size: int) -> list[tuple[np.ndarray, tuple | None]]:
    """Anti-aliased coverage masks (size, size) float32 in 0..1, each with its fill colour or None for the
    object's own colour; trees have a brown trunk and a green crown."""
    k = SUPERSAMPLE

    def draw(fn) -> np.ndarray:
        big = Image.new("L", (size * k, size * k), 0)
        fn(ImageDraw.Draw(big))
        return np.asarray(big.resize((size, size), Image.BOX), dtype=np.float32) / 255.0

    def box(x0, y0, x1, y1):
        return [x0 * k, y0 * k, x1 * k, y1 * k]

    if shape == "ball":
        return [(draw(lambda d: d.ellipse(box(cx - r, cy - r, cx + r, cy + r), fill=255)), None)]
    if shape == "ring":
        def ring(d):
            d.ellipse(box(cx - r, cy - r, cx + r, cy + r), fill=255)
            d.ellipse(box(cx - 0.5 * r, cy - 0.5 * r, cx + 0.5 * r, cy + 0.5 * r), fill=0)
        return [(draw(ring), None)]
    if shape == "tree":
        trunk = draw(lambda d: d.rectangle(box(cx - 0.16 * r, cy - 0.1 * r, cx + 0.16 * r, cy + r), fill=255))
        crown = draw(lambda d: d.ellipse(box(cx - 0.72 * r, cy - r, cx + 0.72 * r, cy + 0.3 * r), fill=255))
        return [(trunk, (105, 65, 30)), (crown, (25, 95, 35))]
    pts = [(px * k, py * k) for px, py in _polygon_points(shape, cx, cy, r, angle)]
    return [(draw(lambda d: d.polygon(pts, fill=255)), None)]


def _paint(img: np.ndarray, mask: np.ndarray, rgb: tuple, shape: str, cx: float, cy: float, r: float,
           rng: np.random.Generator) -> None:
    """Composite one coverage mask (H, W) onto img (H, W, 3) in place: shaded fill, darker outline."""
    ys, xs = np.nonzero(mask)
    if len(ys) == 0:
        return
    # Work in the object's bounding box only (plus the outline filter's margin): 10x faster than full frames.
    y0, y1 = max(int(ys.min()) - 2, 0), int(ys.max()) + 3
    x0, x1 = max(int(xs.min()) - 2, 0), int(xs.max()) + 3
    mask, win = mask[y0:y1, x0:x1], img[y0:y1, x0:x1]
    y, x = np.mgrid[y0:y0 + mask.shape[0], x0:x0 + mask.shape[1]].astype(np.float32)
    colour = np.array(rgb, dtype=np.float32)
    if shape == "ball":
        # Lit from the top left: a sphere, not a flat disc.
        d = np.hypot(x - (cx - 0.35 * r), y - (cy - 0.35 * r)) / (1.6 * r)
        light = 1.15 - 0.45 * np.clip(d, 0, 1)
    else:
        light = 1.06 - 0.12 * ((x - cx) + (y - cy)) / (2 * r)
    fill = colour * light[..., None] + 4 * rng.standard_normal(mask.shape + (1,), dtype=np.float32)
    dark = colour.max() < 60
    if dark:  # black shows no shading by scaling; lift the lit side instead
        fill += 40 * (light[..., None] - 1.0)
    inner = np.asarray(Image.fromarray((mask * 255).astype(np.uint8)).filter(ImageFilter.MinFilter(3)),
                       dtype=np.float32) / 255.0
    edge = np.clip(mask - inner, 0, 1)[..., None]
    outline = colour + 50 if dark else colour * SHAPE_OUTLINE_DARKEN
    fill = fill * (1 - edge) + outline * edge
    m = mask[..., None]
    win[:] = win * (1 - m) + fill * m


def _shadow(img: np.ndarray, mask: np.ndarray) -> None:
    """Darken img (H, W, 3) in place under a blurred copy of mask (H, W) moved to the bottom right: a drop
    shadow that grounds the object on the background."""
    size = img.shape[0]
    shift, blur = max(2, int(0.035 * size)), max(1, size // 80)
    ys, xs = np.nonzero(mask)
    if len(ys) == 0:
        return
    pad = shift + 3 * blur
    y0, y1 = max(int(ys.min()) - pad, 0), min(int(ys.max()) + pad + 1, size)
    x0, x1 = max(int(xs.min()) - pad, 0), min(int(xs.max()) + pad + 1, size)
    moved = np.zeros((y1 - y0, x1 - x0), dtype=np.uint8)
    src = (mask[y0:y1 - shift, x0:x1 - shift] * 255).astype(np.uint8)
    moved[shift:, shift:] = src
    shade = np.asarray(Image.fromarray(moved).filter(ImageFilter.GaussianBlur(blur)), np.float32) / 255
    img[y0:y1, x0:x1] *= (1 - 0.35 * shade)[..., None]


def draw_scene(scene: Scene, size: int = 224, rng: np.random.Generator | None = None) -> Image.Image:
    """Draw `scene` as a size x size RGB image. `rng` drives textures, jitter and rotation (default seed 0):
    the same scene and rng state give identical pixels."""
    if size < 32:
        raise ValueError(f"image size must be >= 32 pixels to show the objects, got {size}")
    rng = np.random.default_rng(0) if rng is None else rng
    img = _texture(scene.background, size, rng)
    # Big objects first, so a small one is never hidden behind a large one.
    for obj in sorted(scene.objects, key=lambda o: -SIZE_RADIUS[o.size]):
        fx, fy = POSITION_XY[obj.position]
        r = SIZE_RADIUS[obj.size] * size * rng.uniform(0.95, 1.05)
        # Jittered, but never past the frame: a cut-off object would not be "at the top" any more.
        cx = float(np.clip((fx + rng.uniform(-JITTER, JITTER)) * size, r + 2, size - r - 2))
        cy = float(np.clip((fy + rng.uniform(-JITTER, JITTER)) * size, r + 2, size - r - 2))
        angle = rng.uniform(-0.2, 0.2)
        layers = _masks(obj.shape, cx, cy, r, angle, size)
        _shadow(img, np.clip(sum(m for m, _ in layers), 0, 1))
        for mask, own in layers:
            _paint(img, mask, own or COLOURS[obj.colour], obj.shape, cx, cy, r, rng)
    return Image.fromarray(np.clip(np.rint(img), 0, 255).astype(np.uint8), mode="RGB")
