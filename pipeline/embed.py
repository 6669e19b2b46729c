"""The embed-images stage: a frozen open_clip teacher over every image, caption and keyword prompt, once.

Images are embedded once each however many captions they have; captions by caption id; keyword prompts
by keyword. Embeddings are L2-normalised and written to CACHE/images, CACHE/texts and CACHE/keywords in
the cache's format, with the model's identity in cache.json so later stages never mix two teachers.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from cache.manifest import atomic_write_json, claim_section, read_manifest, record_stage_failures
from cache.store import FORMATS, PartWriter, build_index, completed_parts, part_path
from pipeline.corpus import read_corpus
from pipeline.extract import default_workers
from pipeline.images import ImageFiles, decode_on_device
from pipeline.keywords import DEFAULT_PROMPT, load_keywords
from pipeline.versions import versions

log = logging.getLogger(__name__)
IMAGE_STORE, TEXT_STORE, KEYWORD_STORE = "images", "texts", "keywords"


@dataclass(frozen=True)
class EmbedConfig:
    data: Path
    cache: Path
    model: str
    pretrained: str | None = None            # open_clip tag, checkpoint path, or None for random weights
    device: str = "cpu"
    batch_size: int = 256
    workers: int = field(default_factory=default_workers)
    keywords: Path | None = None             # None: the corpus' keywords.txt, else the 67 Flickr8k keywords
    prompt: str = DEFAULT_PROMPT
    shard: tuple[int, int] = (0, 1)
    fmt: str | None = None                   # None: the format of the cache's audio store, else hdf5
    dtype: str = "float16"
    part_size: int = 2048                    # images (or captions) per part
    draft: bool = True                       # decode JPEGs at reduced size when the target is small
    gpu_decode: bool = False                 # decode JPEGs with nvjpeg on `device` (torchvision.io)
    progress: bool = True

    def __post_init__(self):
        if self.fmt is not None and self.fmt not in FORMATS:
            raise ValueError(f"--format {self.fmt!r}: use one of {', '.join(FORMATS)}")
        if self.dtype not in ("float16", "float32"):
            raise ValueError(f"--dtype {self.dtype!r}: use float16 or float32")
        if "{}" not in self.prompt:
            raise ValueError(f"--prompt {self.prompt!r} has no '{{}}' where the keyword goes, "
                             "e.g. 'this is a photo of a {}'")
        i, n = self.shard
        if not (n >= 1 and 0 <= i < n):
            raise ValueError(f"--shard {i}/{n}: expected I/N with 0 <= I < N")
        if self.batch_size < 1 or self.part_size < 1 or self.workers < 0:
            raise ValueError("--batch-size and --part-size must be positive, --workers 0 or more")


@dataclass
class EmbedSummary:
    images: int = 0
    captions: int = 0
    keywords: int = 0
    images_done: int = 0
    images_failed: int = 0
    seconds_images: float = 0.0
    indexed: dict = field(default_factory=dict)

    def lines(self) -> list[str]:
        rate = self.images_done / self.seconds_images if self.seconds_images else 0.0
        stores = ", ".join(f"{k} {'indexed' if v else 'waiting for other shards'}" for k, v in self.indexed.items())
        return [f"images: {self.images_done} embedded now ({rate:.0f} img/s), {self.images_failed} failed, "
                f"{self.images} in the corpus",
                f"captions: {self.captions}, keywords: {self.keywords}; {stores}"]


# ----------------------------------------------------------------------------------------------------
# The teacher and its identity


def load_teacher(model: str, pretrained: str | None, device: str):
    """(model, preprocess, tokenizer, identity) through open_clip; nothing is downloaded if it is not cached."""
    import open_clip
    if pretrained is None and not model.startswith(("local-dir:", "hf-hub:")):
        log.warning("WARNING: --pretrained none: %s has RANDOM weights; its embeddings mean nothing "
                    "beyond testing the pipeline", model)
    if pretrained and Path(pretrained).expanduser().is_file():
        pretrained = str(Path(pretrained).expanduser().resolve())
    try:
        clip, _, preprocess = open_clip.create_model_and_transforms(model, pretrained=pretrained, device=device)
    except RuntimeError as e:
        raise ValueError(f"cannot load open_clip model {model!r} with pretrained={pretrained!r}: {e}. "
                         "Without network, pass a local checkpoint path to --pretrained, or a model folder "
                         "as --model local-dir:PATH") from None
    clip.eval()
    tokenizer = open_clip.get_tokenizer(model)
    return clip, preprocess, tokenizer, _identity(open_clip, clip, model, pretrained)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _identity(open_clip, clip, model: str, pretrained: str | None) -> dict:
    weights = None
    if model.startswith("local-dir:"):
        folder = Path(model[len("local-dir:"):])
        files = sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin")) + sorted(folder.glob("*.pt"))
        weights = _sha256(files[0]) if files else None
    elif pretrained and Path(pretrained).is_file():
        weights = _sha256(Path(pretrained))
    pp = open_clip.get_model_preprocess_cfg(clip)
    return {"model": model, "pretrained": pretrained if weights is None else None, "weights_sha256": weights,
            "open_clip": open_clip.__version__, "embed_dim": int(_embed_dim(clip)),
            "preprocess": {k: (list(v) if isinstance(v, tuple) else v) for k, v in pp.items()}}


def _embed_dim(clip) -> int:
    with torch.no_grad():
        return clip.encode_text(torch.zeros(1, clip.context_length, dtype=torch.long,
                                            device=next(clip.parameters()).device)).shape[-1]


def _autocast(device: str):
    if device.startswith("cuda"):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def _normalise(x: torch.Tensor) -> np.ndarray:
    x = x.float()
    return (x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)).cpu().numpy()


# ----------------------------------------------------------------------------------------------------
# The stage


def embed_images(cfg: EmbedConfig) -> EmbedSummary:
    corpus = read_corpus(cfg.data)
    fmt = cfg.fmt or read_manifest(cfg.cache).get("audio", {}).get("format", "hdf5")
    clip, preprocess, tokenizer, identity = load_teacher(cfg.model, cfg.pretrained, cfg.device)
    cfg.cache.mkdir(parents=True, exist_ok=True)
    claim_section(cfg.cache, "clip", {**identity, "dtype": cfg.dtype, "format": fmt, "part_size": cfg.part_size},
                  fix="embeddings of another model go in another --cache directory (the trainer must not mix "
                      f"teachers); or delete {cfg.cache}/images, texts, keywords and the 'clip' section")
    attrs = {"stage": "embed-images", "clip": identity, "versions": versions("open_clip_torch")}

    images: dict[str, str] = {}
    captions: dict[str, str] = {}
    for u in corpus.utterances:
        images.setdefault(u.image_id, u.image_path)
        captions.setdefault(u.caption_id, u.caption)
    summary = EmbedSummary(images=len(images), captions=len(captions))

    started = time.perf_counter()
    failures = _embed_image_store(cfg, fmt, clip, preprocess, list(images.items()), attrs, summary)
    summary.seconds_images = time.perf_counter() - started
    _embed_text_store(cfg, fmt, clip, tokenizer, TEXT_STORE, list(captions.items()), attrs, summary)

    if cfg.shard[0] == 0:
        words = load_keywords(cfg.keywords, corpus.root)
        prompts = [(w, cfg.prompt.format(w)) for w in words]
        _rewrite_keywords(cfg, fmt, clip, tokenizer, prompts, attrs)
        summary.keywords = len(words)
    for name in (IMAGE_STORE, TEXT_STORE, KEYWORD_STORE):
        summary.indexed[name] = (cfg.cache / name / "index.json").is_file() or \
            (cfg.cache / name / "index.h5").is_file()
    if failures is not None:
        record_stage_failures(cfg.cache, "images", failures)
    return summary


def _my_parts(cfg: EmbedConfig, n_items: int, store: Path) -> tuple[list[range], list[int]]:
    parts = [range(s, min(s + cfg.part_size, n_items)) for s in range(0, n_items, cfg.part_size)]
    done = completed_parts(store)
    i, n = cfg.shard
    todo = [k for k in range(len(parts)) if k % n == i and k not in done]
    for k in todo:
        for tmp in store.glob(part_path(store, k, "hdf5").name + ".tmp*"):
            tmp.unlink()
        for tmp in store.glob(part_path(store, k, "wds").name + ".tmp*"):
            tmp.unlink()
    return parts, todo


def _finish_store(store: Path, n_parts: int) -> bool:
    if all(k in completed_parts(store) for k in range(n_parts)):
        build_index(store)
        return True
    return False


def _embed_image_store(cfg, fmt, clip, preprocess, items, attrs, summary) -> list[dict] | None:
    """Embeds the images of this shard's missing parts; returns all image failures once every part is done."""
    from tqdm import tqdm
    store = cfg.cache / IMAGE_STORE
    (store / "failures").mkdir(parents=True, exist_ok=True)
    parts, todo = _my_parts(cfg, len(items), store)
    pp = attrs["clip"]["preprocess"]
    size = pp["size"] if isinstance(pp["size"], int) else min(pp["size"])
    # one loader over every missing part, in order: its workers fork before any part file is open
    order = [(k, j) for k in todo for j in parts[k]]
    files = ImageFiles([items[j][1] for _, j in order], preprocess, size, draft=cfg.draft, raw=cfg.gpu_decode)
    loader = torch.utils.data.DataLoader(
        files, batch_size=cfg.batch_size, num_workers=cfg.workers, collate_fn=files.collate,
        pin_memory=cfg.device.startswith("cuda"), prefetch_factor=4 if cfg.workers else None)
    bar = tqdm(total=len(order), unit="img", desc="embed images", disable=not cfg.progress or not order)
    pos, writer, part_failures = 0, None, []
    with torch.no_grad():
        for batch, reasons in loader:
            if cfg.gpu_decode:
                x = decode_on_device(batch, reasons, size, pp["mean"], pp["std"], cfg.device)
            else:
                x = batch.to(cfg.device, non_blocking=True)
            with _autocast(cfg.device):
                emb = _normalise(clip.encode_image(x))
            for row, reason in enumerate(reasons):
                k, j = order[pos]
                pos += 1
                if writer is None:   # part k starts here
                    writer = PartWriter(store, k, fmt, dims=emb.shape[1], dtype=cfg.dtype, attrs=attrs)
                    part_failures = []
                image_id, path = items[j]
                if reason:
                    part_failures.append({"stage": "images", "id": image_id, "path": path, "reason": reason})
                    summary.images_failed += 1
                else:
                    writer.add(image_id, emb[row:row + 1], meta={"path": path})
                    summary.images_done += 1
                if j + 1 == parts[k].stop:   # part k is complete: failures first, then the rename
                    atomic_write_json(store / "failures" / f"part-{k:05d}.json", part_failures)
                    writer.commit()
                    writer = None
            bar.update(len(reasons))
    bar.close()
    if not _finish_store(store, len(parts)):
        return None
    return [f for path in sorted((store / "failures").glob("part-*.json")) for f in json.loads(path.read_text())]


def _encode_texts(clip, tokenizer, texts: list[str], cfg: EmbedConfig) -> np.ndarray:
    out = []
    with torch.no_grad():
        for s in range(0, len(texts), cfg.batch_size):
            tokens = tokenizer(texts[s:s + cfg.batch_size]).to(cfg.device)
            with _autocast(cfg.device):
                out.append(_normalise(clip.encode_text(tokens)))
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def _embed_text_store(cfg, fmt, clip, tokenizer, name, items, attrs, summary) -> None:
    from tqdm import tqdm
    store = cfg.cache / name
    store.mkdir(parents=True, exist_ok=True)
    parts, todo = _my_parts(cfg, len(items), store)
    for k in tqdm(todo, unit="part", desc=f"embed {name}", disable=not cfg.progress or len(todo) < 2):
        chunk = [items[j] for j in parts[k]]
        emb = _encode_texts(clip, tokenizer, [t for _, t in chunk], cfg)
        with PartWriter(store, k, fmt, dims=emb.shape[1], dtype=cfg.dtype, attrs=attrs) as writer:
            for (key, text), row in zip(chunk, emb):
                writer.add(key, row[None], meta={"text": text})
    _finish_store(store, len(parts))


def _rewrite_keywords(cfg, fmt, clip, tokenizer, prompts: list[tuple[str, str]], attrs) -> None:
    """Keyword prompts are cheap: the store is rewritten whenever the words or the template change."""
    import shutil
    store = cfg.cache / KEYWORD_STORE
    kw_attrs = {**attrs, "prompt": cfg.prompt, "keywords": [w for w, _ in prompts]}
    if store.is_dir():
        try:
            from cache.store import StoreReader
            if StoreReader(store).attrs.get("keywords") == kw_attrs["keywords"] and \
                    StoreReader(store).attrs.get("prompt") == cfg.prompt:
                return
        except (FileNotFoundError, ValueError):
            pass
        shutil.rmtree(store)
    store.mkdir(parents=True)
    emb = _encode_texts(clip, tokenizer, [p for _, p in prompts], cfg)
    with PartWriter(store, 0, fmt, dims=emb.shape[1], dtype=cfg.dtype, attrs=kw_attrs) as writer:
        for (word, prompt), row in zip(prompts, emb):
            writer.add(word, row[None], meta={"prompt": prompt})
    build_index(store)
