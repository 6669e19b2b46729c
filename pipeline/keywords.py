"""Keyword vocabularies for keyword spotting and the prompt that turns a keyword into a CLIP text."""
from __future__ import annotations

from pathlib import Path

from cache.manifest import read_utf8

DEFAULT_PROMPT = "this is a photo of a {}"

# The 67 Flickr8k keywords of Kamper et al. (REFERENCE.md §4)
FLICKR8K_KEYWORDS = tuple("""
air baby ball beach bike black boy brown building camera car carrying children climbing dirt dogs face
field football grass hair hat holding jacket jumps large little mountain mouth ocean orange park pink pool
race red rides riding road rock running sand shirt sits sitting skateboard small smiling snow snowy soccer
stands stick street swimming tennis three top toy tree walks water wearing white women yellow young
""".split())
assert len(FLICKR8K_KEYWORDS) == 67


def read_keywords(path: str | Path) -> list[str]:
    """One keyword per line; blank lines and lines starting with # are ignored; duplicates are an error."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: keyword file not found (one keyword per line)")
    words = [line.strip().lower() for line in read_utf8(path).splitlines()]
    words = [w for w in words if w and not w.startswith("#")]
    if not words:
        raise ValueError(f"{path}: no keywords in this file (one keyword per line)")
    dup = sorted({w for w in words if words.count(w) > 1})
    if dup:
        raise ValueError(f"{path}: keywords listed twice: {', '.join(dup)}")
    return words


def load_keywords(path: str | Path | None, corpus_root: str | Path | None = None) -> list[str]:
    """The given file; else the corpus' own keywords.txt (the demo has one); else the 67 Flickr8k keywords."""
    if path is not None:
        return read_keywords(path)
    if corpus_root is not None:
        root = Path(corpus_root)
        own = (root if root.is_dir() else root.parent) / "keywords.txt"
        if own.is_file():
            return read_keywords(own)
    return list(FLICKR8K_KEYWORDS)
