"""Captions, keywords and short attribute texts for drawn scenes: a small grammar whose every sentence is true
of its scene, so that a keyword occurring in a transcript means the picture shows it."""
from __future__ import annotations

import numpy as np

from pipeline.demo.scenes import POSITION_XY, Scene, SceneObject

# Every word listed here is a keyword, and the grammar uses it only where it is true of the scene
# (scene_keywords). Other words in the grammar ("tiny", "block", "lake", ...) add variety and are never
# keywords, so they cannot break that rule.
SIZE_WORDS = {"small": ("small", "little", "tiny"), "medium": (), "large": ("large", "big", "huge")}
SHAPE_WORDS = {"ball": ("ball",), "square": ("square", "block"), "triangle": ("triangle",), "star": ("star",),
               "ring": ("ring", "donut"), "cross": ("cross", "plus sign"), "tree": ("tree",)}
# No colour words in background phrases ("green grass", "white snow"): a colour keyword must mean an object.
BACKGROUND_PHRASES = {
    "grass": ("on the grass", "in the grass", "on a grassy field", "in a field", "on a lawn"),
    "sand": ("on the sand", "on the beach", "on a sandy beach", "in the sand"),
    "water": ("on the water", "in the water", "floating on the water", "on a lake"),
    "snow": ("in the snow", "on the snow", "on snowy ground", "on a snowy hill"),
    "road": ("on the road", "on the street", "in the street", "on an asphalt road"),
    "dirt": ("on the dirt", "on dirt", "on a dirt path", "on bare dirt"),
}
BACKGROUND_NOUNS = {"grass": ("grass", "a grassy field", "a field"),
                    "sand": ("sand", "a sandy beach", "a beach"), "water": ("water", "a lake"),
                    "snow": ("snow", "snowy ground"), "road": ("a road", "a street"),
                    "dirt": ("dirt", "a dirt path")}
POSITION_PHRASES = {"left": ("on the left", "at the left", "on the left side"),
                    "right": ("on the right", "at the right", "on the right side"),
                    "top": ("at the top", "near the top"), "bottom": ("at the bottom", "near the bottom"),
                    "centre": ("in the middle", "in the center")}
COUNT_WORDS = {2: "two", 3: "three"}

KEYWORD_GROUPS: dict[str, tuple[str, ...]] = {
    "colour": ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white"),
    "shape": ("ball", "square", "triangle", "star", "ring", "cross", "tree"),
    "size": ("small", "little", "large", "big"),
    "background": ("grass", "field", "sand", "beach", "water", "snow", "snowy", "road", "street", "dirt"),
    "position": ("left", "right", "top", "bottom", "middle"),
    "count": ("two", "three"),
}
# Which keywords each scene attribute makes true.
_SIZE_KEYWORDS = {"small": ("small", "little"), "medium": (), "large": ("large", "big")}
_BACKGROUND_KEYWORDS = {"grass": ("grass", "field"), "sand": ("sand", "beach"), "water": ("water",),
                        "snow": ("snow", "snowy"), "road": ("road", "street"), "dirt": ("dirt",)}
_POSITION_KEYWORDS = {"left": "left", "right": "right", "top": "top", "bottom": "bottom", "centre": "middle"}


def keywords() -> list[str]:
    """The demo's keyword vocabulary (38 words), grouped by KEYWORD_GROUPS in that order."""
    return [w for group in KEYWORD_GROUPS.values() for w in group]


def scene_keywords(scene: Scene) -> set[str]:
    """The keywords true of `scene`: its objects' colours, shapes, size words and position words, its
    background words and the count word of a two- or three-object scene."""
    words = set(_BACKGROUND_KEYWORDS[scene.background])
    for o in scene.objects:
        words.add(o.shape)
        words.update([o.colour] if o.colour else [])
        words.update(_SIZE_KEYWORDS[o.size])
        words.add(_POSITION_KEYWORDS[o.position])
    if len(scene.objects) in COUNT_WORDS:
        words.add(COUNT_WORDS[len(scene.objects)])
    return words


def _pick(rng: np.random.Generator, options: tuple[str, ...] | list[str]) -> str:
    return options[rng.integers(len(options))]


def _article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _noun_phrase(o: SceneObject, rng: np.random.Generator) -> str:
    """'a big red ball', 'a red ring', 'an orange star', 'a little tree': the size word is optional, a
    coloured object's colour is always named."""
    words = []
    if SIZE_WORDS[o.size] and rng.uniform() < 0.6:
        words.append(_pick(rng, SIZE_WORDS[o.size]))
    # The demo teacher learns colours far better than shapes (test text->image R@10 57 % for captions
    # without a colour word against 90 % with one), so every caption that names an object names its colour.
    if o.colour:
        words.append(o.colour)
    words.append(_pick(rng, SHAPE_WORDS[o.shape]))
    return _article(" ".join(words))


def _relative_phrase(o: SceneObject, rng: np.random.Generator) -> str:
    """Colour after the noun: 'a big ball that is red' (a coloured object) or 'a tree that is small'."""
    size = _pick(rng, SIZE_WORDS[o.size]) + " " if SIZE_WORDS[o.size] and rng.uniform() < 0.5 else ""
    shape = _pick(rng, SHAPE_WORDS[o.shape])
    if o.colour:
        return _article(f"{size}{shape} that is {o.colour}")
    if SIZE_WORDS[o.size]:
        return _article(f"{shape} that is {_pick(rng, SIZE_WORDS[o.size])}")
    return _article(shape)


def _single(o: SceneObject, scene: Scene, rng: np.random.Generator) -> str:
    """One sentence about one object of the scene (true whatever else the scene holds)."""
    np_, bg, pos = _noun_phrase(o, rng), _pick(rng, BACKGROUND_PHRASES[scene.background]), \
        _pick(rng, POSITION_PHRASES[o.position])
    templates = (
        lambda: f"{np_} {bg}",
        lambda: f"{np_} {pos}",
        lambda: f"{np_} lying {bg} {pos}",
        lambda: f"there is {np_} {bg}",
        lambda: f"{bg} there is {np_}",
        lambda: f"{_pick(rng, ('a picture of', 'an image of', 'a photo of'))} {np_} {bg}",
        lambda: f"{_pick(rng, BACKGROUND_NOUNS[scene.background])} with {np_} {pos}",
        lambda: f"{_relative_phrase(o, rng)} {bg}",
        lambda: f"you can see {np_} {pos}",
        lambda: f"{pos} there is {np_}",
    )
    return templates[rng.integers(len(templates))]()


def _vertical_relation(a: SceneObject, b: SceneObject) -> str | None:
    """'above' / 'below' when a is clearly higher / lower than b in the picture, else None."""
    dy = POSITION_XY[a.position][1] - POSITION_XY[b.position][1]
    return "above" if dy < -0.1 else "below" if dy > 0.1 else None


def _multi(scene: Scene, rng: np.random.Generator) -> str:
    """One sentence about two or all three objects of a multi-object scene."""
    order = [scene.objects[i] for i in rng.permutation(len(scene.objects))]
    a, b = order[0], order[1]
    np_a, np_b = _noun_phrase(a, rng), _noun_phrase(b, rng)
    bg = _pick(rng, BACKGROUND_PHRASES[scene.background])
    pos_a, pos_b = _pick(rng, POSITION_PHRASES[a.position]), _pick(rng, POSITION_PHRASES[b.position])
    count = COUNT_WORDS[len(scene.objects)]
    templates = [
        lambda: f"{np_a} and {np_b} {bg}",
        lambda: f"{np_a} next to {np_b}",
        lambda: f"{np_a} next to {np_b} {bg}",
        lambda: f"{np_a} {pos_a} and {np_b} {pos_b}",
        lambda: f"there are {count} {_pick(rng, ('shapes', 'objects', 'things'))} {bg}",
        lambda: f"{np_a} {pos_a} and {np_b} {bg}",
    ]
    relation = _vertical_relation(a, b)
    if relation:
        templates.append(lambda: f"{np_a} {relation} {np_b}")
    if len(order) == 3:
        c = order[2]
        np_c, pos_c = _noun_phrase(c, rng), _pick(rng, POSITION_PHRASES[c.position])
        templates += [
            lambda: f"{np_a} {np_b} and {np_c} {bg}",
            lambda: f"{np_a} {pos_a} {np_b} {pos_b} and {np_c} {pos_c}",
            lambda: f"{count} shapes {bg} {np_a} {np_b} and {np_c}",
        ]
    else:
        templates.append(lambda: f"{count} shapes {bg} {np_a} and {np_b}")
    return templates[rng.integers(len(templates))]()


def captions_for(scene: Scene, rng: np.random.Generator, n: int = 5) -> list[str]:
    """n different lower-case captions, each true of `scene`. Multi-object scenes mix sentences about several
    objects with sentences about one of them."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    captions: list[str] = []
    for _ in range(100 * n):
        if len(scene.objects) > 1 and rng.uniform() < 0.7:
            caption = _multi(scene, rng)
        else:
            caption = _single(scene.objects[rng.integers(len(scene.objects))], scene, rng)
        if caption not in captions:
            captions.append(caption)
            if len(captions) == n:
                return captions
    raise RuntimeError(f"the grammar produced only {len(captions)} different captions for {scene}")


def attribute_texts(scene: Scene, template: str = "this is a photo of a {}") -> list[str]:
    """Short texts true of `scene` for fitting the teacher: `template` filled with each keyword true of the
    scene (keyword order), then per object 'a red ball', 'a large red ball on the snow' and
    'a ball on the left'."""
    if "{}" not in template:
        raise ValueError(f"template {template!r} needs a '{{}}' where the keyword goes")
    true = scene_keywords(scene)
    texts = [template.format(w) for w in keywords() if w in true]
    for o in scene.objects:
        shape = o.shape
        size = _SIZE_KEYWORDS[o.size][0] + " " if _SIZE_KEYWORDS[o.size] else ""
        colour = o.colour + " " if o.colour else ""
        texts.append(_article(f"{colour}{shape}"))
        texts.append(_article(f"{size}{colour}{shape} {BACKGROUND_PHRASES[scene.background][0]}"))
        texts.append(_article(f"{shape} {POSITION_PHRASES[o.position][0]}"))
    # Keep order, drop repeats (a lone tree gives 'a tree' twice when it is medium-sized).
    return list(dict.fromkeys(texts))
