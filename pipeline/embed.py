"""The embed-images stage: a frozen open_clip teacher over every image, caption and keyword prompt, once.

Embeddings are L2-normalised and written to CACHE/images, texts and keywords with the teacher's identity in
cache.json, so that no later stage mixes two teachers. Resumable and shardable like extract-audio.
"""
from __future__ import annotations

import contextlib
import difflib
import hashlib
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from cache.index import build_index
from cache.manifest import (IMAGE_STORE, KEYWORD_STORE, RECORDS, TEXT_STORE, CacheMismatchError, atomic_write_json,
                            check_prompt, claim_section, read_manifest, read_records, record_stage_failures,
                            settings_diff, shard_lock)
from cache.store import (FAILURES_DIR, FORMATS, INDEX_FILE, PartWriter, check_shard, completed_parts,
                         failures_path, parts_to_write, plan_parts, read_store_json, recorded_failures, shard_parts,
                         store_settings_diff)
from pipeline.corpus import read_corpus
from pipeline.extract import check_device, corpus_section, default_workers
from pipeline.images import embed_image_files
from pipeline.keywords import DEFAULT_PROMPT, load_keywords
from pipeline.stopping import ignore_stop_signals, raise_if_stopped
from pipeline.towers import Tower, pipelined, text_tower
from pipeline.versions import versions

log = logging.getLogger(__name__)
SCHEMAS = ("local-dir:", "hf-hub:")
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")   # tags may hold dots, paths these
RANDOM_INIT_SEED = 0               # random weights are seeded: all shards of a cache get the same model


@dataclass(frozen=True)
class EmbedConfig:
    data: Path
    cache: Path
    model: str                               # open_clip name, local-dir:PATH or hf-hub:ORG/REPO
    pretrained: str | None = None            # open_clip tag, checkpoint path, or None for random weights
    device: str = "cpu"
    batch_size: int = 256
    workers: int = field(default_factory=default_workers)   # DataLoader processes decoding images; 0 = inline
    keywords: Path | None = None             # None: the corpus' keywords.txt, else the 67 Flickr8k keywords
    prompt: str = DEFAULT_PROMPT
    shard: tuple[int, int] = (0, 1)
    fmt: str | None = None                   # None: the format of the cache's audio store, else hdf5
    dtype: str = "float16"                   # storage precision
    part_size: int = 2048                    # images (or captions) per part: the unit of resume and sharding
    draft: bool = True                       # decode JPEGs at reduced size when the target is small
    gpu_decode: bool = False                 # decode JPEGs in batches on `device` (nvjpeg on cuda)
    cuda_graph: bool = True                  # on a GPU, each tower as one CUDA graph (towers.Tower)
    retry_failed: bool = False               # embed the complete image parts that recorded failures again
    progress: bool = True

    def __post_init__(self):
        if self.fmt is not None and self.fmt not in FORMATS:
            raise ValueError(f"--format {self.fmt!r}: use one of {', '.join(FORMATS)}")
        if self.dtype not in ("float16", "float32"):
            raise ValueError(f"--dtype {self.dtype!r}: use float16 or float32")
        check_prompt(self.prompt)
        check_shard(self.shard)
        if self.batch_size < 1 or self.part_size < 1 or self.workers < 0:
            raise ValueError(f"--batch-size {self.batch_size} and --part-size {self.part_size} must be "
                             f"positive, --workers {self.workers} 0 or more")
        check_device(self.device)


@dataclass
class EmbedSummary:
    images: int = 0                  # distinct images in the corpus
    captions: int = 0                # distinct written captions
    keywords: int = 0                # keyword prompts embedded by this run (shard 0 only)
    images_embedded: int = 0         # by this run
    images_failed: int = 0           # by this run
    parts_skipped: int = 0           # image and caption parts of this shard found complete
    parts_retried: int = 0           # complete image parts with failures, embedded again (--retry-failed)
    captions_embedded: int = 0       # by this run
    seconds_images: float = 0.0
    seconds_captions: float = 0.0
    indexed: dict = field(default_factory=dict)   # store name -> whether its index covers every part

    def lines(self) -> list[str]:
        rate = self.images_embedded / self.seconds_images if self.seconds_images else 0.0
        text_rate = self.captions_embedded / self.seconds_captions if self.seconds_captions else 0.0
        stores = ", ".join(f"{k} {'indexed' if v else 'waiting for other shards'}"
                           for k, v in self.indexed.items())
        return [f"images: {self.images_embedded} embedded now ({rate:.0f} img/s), {self.images_failed} "
                f"failed, {self.images} in the corpus; {self.parts_skipped} parts already complete"
                f"{f', {self.parts_retried} embedded again for their failures' if self.parts_retried else ''}",
                f"captions: {self.captions_embedded} embedded now ({text_rate:.0f} captions/s), "
                f"{self.captions} in the corpus; keywords: {self.keywords}; {stores}"]


# ----------------------------------------------------------------------------------------------------
# The teacher and its identity


class Teacher(NamedTuple):
    model: torch.nn.Module           # open_clip model in eval mode, on the device
    preprocess: object               # open_clip's eval transform: PIL image -> float [3, S, S]
    tokenizer: object                # list[str] -> int64 [n, context_length]
    identity: dict                   # model, weights, open_clip version, preprocessing (cache.json)


def load_teacher(model: str, pretrained: str | None, device: str = "cpu") -> Teacher:
    """The open_clip model, its preprocessing, tokenizer and identity. A tag is fetched by open_clip (from its
    cache, else the network); a checkpoint path or local-dir: folder is hashed (sha256) for the identity."""
    import open_clip
    if model.startswith(SCHEMAS) and pretrained is not None:
        log.warning("--pretrained %s is ignored: %s brings its own weights", pretrained, model)
        pretrained = None
    if model.startswith("local-dir:"):
        folder = Path(model[len("local-dir:"):]).expanduser().resolve()
        if not (folder / "open_clip_config.json").is_file():
            raise FileNotFoundError(f"{folder / 'open_clip_config.json'} not found: --model local-dir:PATH "
                                    "takes a folder with open_clip_config.json and its weights (the demo's "
                                    "is DEMO/teacher)")
        model = f"local-dir:{folder}"
    elif not model.startswith(SCHEMAS) and model not in (known := open_clip.list_models()):
        close = difflib.get_close_matches(model, known, n=4)
        raise ValueError(f"--model {model!r} is not an open_clip model name"
                         + (f"; did you mean {', '.join(close)}?" if close else "")
                         + " (open_clip.list_models() lists them; a model folder is --model local-dir:PATH)")
    checkpoint = _checkpoint_file(model, pretrained)
    random_weights = checkpoint is None and pretrained is None and not model.startswith("hf-hub:")
    if random_weights:
        log.warning("WARNING: %s has RANDOM weights (--pretrained none, or no weights in its folder): its "
                    "embeddings mean nothing beyond testing the pipeline", model)
    if pretrained is not None and checkpoint is None and ("/" in pretrained or pretrained.startswith("~")
                                                          or Path(pretrained).suffix in CHECKPOINT_SUFFIXES):
        raise FileNotFoundError(f"--pretrained {pretrained}: no such checkpoint file; pass an existing path "
                                f"or an open_clip tag (open_clip.list_pretrained_tags_by_model({model!r}))")
    try:
        with torch.random.fork_rng(devices=[]):   # open_clip initialises on the CPU, then moves to `device`
            torch.manual_seed(RANDOM_INIT_SEED)
            clip, _, preprocess = open_clip.create_model_and_transforms(
                model, pretrained=str(checkpoint) if checkpoint and pretrained else pretrained, device=device)
    except RuntimeError as e:
        raise ValueError(f"cannot load open_clip model {model!r} with pretrained={pretrained!r}: {e}. "
                         "Without network, pass a local checkpoint path to --pretrained, or a model folder "
                         "as --model local-dir:PATH") from None
    clip.eval()
    tokenizer = open_clip.get_tokenizer(model)
    pp = open_clip.get_model_preprocess_cfg(clip)
    identity = {
        "model": model if not model.startswith("local-dir:") else "local-dir",
        "pretrained": pretrained if checkpoint is None else None,
        "weights_sha256": _sha256(checkpoint) if checkpoint else None,
        "random_init_seed": RANDOM_INIT_SEED if random_weights else None,
        "open_clip": open_clip.__version__,
        "embed_dim": _embed_dim(clip, tokenizer, device),
        "preprocess": {k: (list(v) if isinstance(v, tuple) else v) for k, v in pp.items()},
    }
    return Teacher(clip, preprocess, tokenizer, identity)


def _checkpoint_file(model: str, pretrained: str | None) -> Path | None:
    """The weights file the model is loaded from, where it is a local file (None for tags, hf-hub, random)."""
    if model.startswith("local-dir:"):
        import open_clip
        # open_clip's own choice among the folder's files, so the hash is of what it loads
        found = open_clip.factory._find_checkpoint_in_dir(Path(model[len("local-dir:"):]))
        return Path(found) if found else None
    if pretrained is not None and Path(pretrained).expanduser().is_file():
        return Path(pretrained).expanduser().resolve()
    return None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _embed_dim(clip, tokenizer, device: str) -> int:
    with torch.inference_mode():
        return int(clip.encode_text(tokenizer([""]).to(device)).shape[-1])


def _run_settings(cfg: EmbedConfig, fmt: str) -> dict:
    """How the embeddings were computed and stored, beyond the teacher: recorded next to its identity."""
    return {"precision": "bf16-autocast" if cfg.device.startswith("cuda") else "fp32",
            "image_decode": "torchvision" if cfg.gpu_decode else ("pil-draft" if cfg.draft else "pil"),
            "dtype": cfg.dtype, "format": fmt, "part_size": cfg.part_size}


def _claim_clip(cfg: EmbedConfig, identity: dict, settings: dict) -> None:
    """Records the teacher in cache.json or checks it is the one there, with a message saying what differs."""
    cached = read_manifest(cfg.cache).get("clip")
    other_teacher = cached is not None and settings_diff({k: cached.get(k) for k in identity}, identity)
    if cached is not None and not other_teacher and cached.get("format") != settings["format"]:
        fix = (f"embed-images stores its embeddings in the format of the cache's audio (cache.json's 'audio' "
               f"section), or hdf5 where extract-audio has not run yet: these embeddings are "
               f"{cached.get('format')}, the audio {settings['format']}. Delete {cfg.cache}/images, texts and "
               "keywords and the 'clip' section of cache.json and run embed-images again (once extract-audio has "
               "run, so that every shard picks its format)")
    elif other_teacher:
        fix = (f"{cfg.cache} holds embeddings of another CLIP teacher, and the trainer must not mix two "
               "teachers' embeddings: use another --cache directory for this one, or delete "
               f"{cfg.cache}/images, texts and keywords and the 'clip' section of cache.json to re-embed")
    else:
        fix = ("same teacher, other settings: rerun with the cache's settings (--dtype, --device, "
               f"--gpu-decode, --no-draft) so that all parts match, or delete {cfg.cache}/images, texts and "
               "keywords and the 'clip' section of cache.json to re-embed")
    claim_section(cfg.cache, "clip", {**identity, **settings}, fix=fix)


# ----------------------------------------------------------------------------------------------------
# The stage


def _check_same_corpus(cfg: EmbedConfig, corpus, section: dict, manifest: dict) -> None:
    """The cache's audio (extract-audio records the corpus's utterance ids) must come from this corpus
    (`section`: its corpus_section): embeddings of another corpus's images would leave the trainer with no
    usable utterance."""
    recorded = manifest.get("corpus")
    if recorded and recorded.get("ids_sha1") != section["ids_sha1"]:
        raise CacheMismatchError(
            f"--data {cfg.data} is not the corpus whose audio is in {cfg.cache}: extract-audio recorded "
            f"{recorded.get('utterances')} utterances of {recorded.get('kind')} corpus {recorded.get('root')}, "
            f"this one has {len(corpus.utterances)} with other ids; pass that corpus as --data, or use "
            "another --cache folder for this one")
    if recorded and recorded.get("records_sha1") == section["records_sha1"]:
        return   # records.jsonl says what this corpus says: no need to read and parse it
    if recorded and (cfg.cache / RECORDS).is_file():
        # the same utterances, but are they of the same images and captions? The trainer joins the audio to
        # the embeddings by these ids (a JSONL manifest of Flickr8k's wavs gives them other caption ids)
        for r, u in zip(read_records(cfg.cache), corpus.utterances):
            if (r["image_id"], r["caption_id"]) != (u.image_id, u.caption_id):
                raise CacheMismatchError(
                    f"--data {cfg.data} gives utterance {u.utt_id} image {u.image_id!r} and caption "
                    f"{u.caption_id!r}, but extract-audio's {cfg.cache / RECORDS} gives it image "
                    f"{r['image_id']!r} and caption {r['caption_id']!r}: the trainer finds each utterance's "
                    f"embeddings by these ids; pass the corpus extract-audio read ({recorded.get('root')}) as "
                    "--data, or use another --cache folder for this one")


def embed_images(cfg: EmbedConfig) -> EmbedSummary:
    """Runs the stage for this shard; builds the indexes (and records image failures) once all parts exist.
    StageBusyError when another process runs the same shard of this cache."""
    with contextlib.ExitStack() as held:
        return _embed_images(cfg, held)


def _embed_images(cfg: EmbedConfig, held: contextlib.ExitStack) -> EmbedSummary:
    # no per-file checks: the report is not shown here, and each image's file is checked as it is read
    corpus = read_corpus(cfg.data, check_files=False)
    manifest = read_manifest(cfg.cache)
    section = corpus_section(corpus)
    _check_same_corpus(cfg, corpus, section, manifest)
    # read before anything is loaded or recorded: a bad --keywords file fails first (on every shard;
    # shard 0 embeds them)
    words = load_keywords(cfg.keywords, corpus.root)
    fmt = cfg.fmt or manifest.get("audio", {}).get("format", "hdf5")
    teacher = load_teacher(cfg.model, cfg.pretrained, cfg.device)
    settings = _run_settings(cfg, fmt)
    cfg.cache.mkdir(parents=True, exist_ok=True)
    held.enter_context(shard_lock(cfg.cache, "embed-images", cfg.shard))   # until the stage returns
    _claim_clip(cfg, teacher.identity, settings)
    if "corpus" not in manifest:   # before extract-audio: which corpus these embeddings are of, for it to check
        claim_section(cfg.cache, "corpus", section)
    attrs = {"stage": "embed-images", "clip": {**teacher.identity, **settings},
             "versions": versions("open_clip_torch", "torchvision", "Pillow")}

    images: dict[str, str] = {}
    captions: dict[str, str] = {}
    for u in corpus.utterances:       # each image once, however many captions it has
        images.setdefault(u.image_id, u.image_path)
        captions.setdefault(u.caption_id, u.caption)
    summary = EmbedSummary(images=len(images), captions=len(captions))

    started = time.perf_counter()
    image_failures = _embed_image_store(cfg, fmt, teacher, list(images.items()), attrs, summary)
    summary.seconds_images = time.perf_counter() - started
    started = time.perf_counter()   # the text tower's graph is recorded here: no decode thread is left to race it
    texts = text_tower(teacher.model, teacher.tokenizer, cfg.device, cfg.batch_size, cfg.cuda_graph)
    _embed_text_store(cfg, fmt, teacher, texts, list(captions.items()), attrs, summary)
    summary.seconds_captions = time.perf_counter() - started
    if cfg.shard[0] == 0:
        _write_keyword_store(cfg, fmt, teacher, texts, words, attrs)
        summary.keywords = len(words)
    if image_failures is not None:   # at the corpus's present paths (a part may predate a move)
        record_stage_failures(cfg.cache, "images", [{**f, "path": images.get(f["id"], f.get("path"))}
                                                    for f in image_failures])
    for name in (IMAGE_STORE, TEXT_STORE, KEYWORD_STORE):
        summary.indexed[name] = (cfg.cache / name / INDEX_FILE[fmt]).is_file()
    return summary


def _plan(cfg: EmbedConfig, fmt: str, store: Path, keys: list[str], attrs: dict,
          dims: int) -> tuple[list[range], list[int], dict, int, int]:
    """Parts of cfg.part_size items in corpus order, this shard's missing ones, the store's attrs, how many
    of this shard's parts are complete already and how many were made missing again (cfg.retry_failed: those
    that recorded failures).

    The attrs name the planned keys (sha1), so a rerun on a changed corpus is refused instead of resuming
    parts planned for another list; leftovers of killed writers of the missing parts are removed.
    """
    parts = plan_parts(len(keys), cfg.part_size)
    attrs = {**attrs, "plan": {"part_size": cfg.part_size,
                               "keys_sha1": hashlib.sha1("\n".join(keys).encode("utf-8")).hexdigest()}}
    diffs = store_settings_diff(store, fmt, dims, cfg.dtype, attrs)
    if diffs:
        raise CacheMismatchError(f"store {store} was written with other settings (another corpus or "
                                 "software version?):\n  " + "\n  ".join(diffs) +
                                 f"\nFix: delete {store} to embed again, or use another --cache")
    mine = shard_parts(len(parts), cfg.shard)
    todo, retried = parts_to_write(store, mine, fmt, cfg.retry_failed)
    return parts, todo, attrs, len(mine) - len(todo), retried


def _finish_store(store: Path, n_parts: int) -> bool:
    """Indexes the store when every part exists (whichever shard finishes last does it)."""
    done = completed_parts(store)
    if any(k not in done for k in range(n_parts)):
        return False
    build_index(store)
    return True


class _PartStream:
    """Writes items streaming in part order: part k opens at its first item and is committed at its last,
    after its failures file; `abort` leaves nothing of an unfinished part behind."""

    def __init__(self, store: Path, fmt: str, parts: list[range], dims: int, dtype: str, attrs: dict):
        self.store, self.parts = store, parts
        self.options = {"fmt": fmt, "dims": dims, "dtype": dtype, "attrs": attrs}
        self.writer: PartWriter | None = None
        self.failures: list[dict] = []
        self.written = self.failed = 0

    def add_rows(self, js: list[int], keys: list[str], rows: np.ndarray, metas: list[dict]) -> None:
        """Items js (ascending, in stream order, of one part), one row each."""
        self._open_part(js[0])
        self.writer.add_rows(keys, rows, metas)
        self.written += len(js)
        self._commit_if_last(js[-1])

    def fail(self, j: int, failure: dict) -> None:
        self._open_part(j)
        self.failures.append(failure)
        self.failed += 1
        self._commit_if_last(j)

    def _open_part(self, j: int) -> None:
        if self.writer is None:
            k = j // len(self.parts[0])
            self.writer = PartWriter(self.store, k, **self.options)
            self.part, self.failures = k, []

    def _commit_if_last(self, j: int) -> None:
        if j == self.parts[self.part].stop - 1:
            atomic_write_json(failures_path(self.store, self.part), self.failures)
            self.writer.commit()
            self.writer = None

    def abort(self) -> None:
        if self.writer is not None:
            self.writer.abort()
            self.writer = None


def _embed_image_store(cfg, fmt, teacher: Teacher, images: list[tuple[str, str]], attrs: dict,
                       summary: EmbedSummary) -> list[dict] | None:
    """Embeds the images of this shard's missing parts; returns every image failure once all parts exist."""
    from tqdm import tqdm
    store = cfg.cache / IMAGE_STORE
    (store / FAILURES_DIR).mkdir(parents=True, exist_ok=True)
    dims = teacher.identity["embed_dim"]
    parts, todo, attrs, skipped, summary.parts_retried = _plan(cfg, fmt, store, [key for key, _ in images], attrs,
                                                               dims)
    summary.parts_skipped += skipped
    jobs = [j for k in todo for j in parts[k]]   # item numbers, part after part
    size = teacher.identity["preprocess"]["size"]
    draft = (size if isinstance(size, int) else max(size)) if cfg.draft else None
    stream = _PartStream(store, fmt, parts, dims, cfg.dtype, attrs)
    bar = tqdm(total=len(jobs), unit="img", desc="embed images", disable=not cfg.progress or not jobs)
    consumed = 0
    try:
        batches = embed_image_files(teacher.model, teacher.preprocess, [images[j][1] for j in jobs],
                                    device=cfg.device, batch_size=cfg.batch_size, workers=cfg.workers,
                                    draft_size=draft, gpu_decode=cfg.gpu_decode,
                                    cuda_graph=cfg.cuda_graph) if jobs else []
        for embeddings, reasons in batches:
            raise_if_stopped()   # SIGTERM or Ctrl-C: the open part is dropped (stream.abort below)
            # one row per image whose reason is "": written a run at a time (a run ends at a failure or
            # at the end of a part), failures one by one, all in item order
            batch, row, run = jobs[consumed:consumed + len(reasons)], 0, []
            for j, reason in zip(batch, reasons):
                if not reason:
                    run.append(j)
                if run and (reason or j == batch[-1] or j + 1 == parts[j // cfg.part_size].stop):
                    stream.add_rows(run, [images[i][0] for i in run], embeddings[row:row + len(run)],
                                    [{"path": images[i][1]} for i in run])
                    row, run = row + len(run), []
                if reason:
                    image_id, path = images[j]
                    stream.fail(j, {"stage": "images", "id": image_id, "path": path, "reason": reason})
            consumed += len(reasons)
            bar.update(len(reasons))
    finally:
        stream.abort()   # only an unfinished part is open here: after an error or a KeyboardInterrupt
        bar.close()
    summary.images_embedded, summary.images_failed = stream.written, stream.failed
    if not _finish_store(store, len(parts)):
        return None
    return recorded_failures(store, range(len(parts)))


class TokenBatches(torch.utils.data.Dataset):
    """Item i: batch i of `texts` as the model's token ids [n, context], with its tag. Tokenized in DataLoader
    workers: open_clip's tokenizer is Python, about 50 us a caption, and SpokenCOCO has 600,000 captions."""

    def __init__(self, tokenizer, batches: list[tuple[list[str], object]]):
        self.tokenizer, self.batches = tokenizer, batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, object]:
        texts, tag = self.batches[i]
        return self.tokenizer(texts), tag


def _embedded_texts(teacher: Teacher, tower: Tower, batches: list[tuple[list[str], object]], cfg: EmbedConfig,
                    workers: int = 0):
    """(unit-norm embeddings [n, D] float32 on the host, tag) of each (texts, tag) batch, in order: tokenized
    in `workers` processes (here if fewer than 2: one process hands the batches over at about what tokenizing
    them costs), embedded by `tower` (text_tower) on the device meanwhile."""
    workers = min(workers, len(batches)) if workers >= 2 else 0
    loader = torch.utils.data.DataLoader(
        TokenBatches(teacher.tokenizer, batches), batch_size=None, num_workers=workers,
        pin_memory=cfg.device.startswith("cuda"), prefetch_factor=4 if workers else None,
        worker_init_fn=ignore_stop_signals)
    return pipelined(tower, ((tokens.to(cfg.device, non_blocking=True), tag) for tokens, tag in loader))


def _embed_text_store(cfg, fmt, teacher: Teacher, tower: Tower, captions: list[tuple[str, str]], attrs: dict,
                      summary: EmbedSummary) -> None:
    """Caption embeddings by caption id, in parts like the images; all missing parts' batches go through one
    DataLoader (tokenizing in cfg.workers processes), and each part is written once its last batch is back."""
    from tqdm import tqdm
    store = cfg.cache / TEXT_STORE
    dims = teacher.identity["embed_dim"]
    parts, todo, attrs, skipped, _ = _plan(cfg, fmt, store, [key for key, _ in captions], attrs, dims)
    summary.parts_skipped += skipped
    batches = [([captions[j][1] for j in rows], (k, rows.stop)) for k in todo   # plain tags: pinning keeps them
               for rows in (parts[k][s:s + cfg.batch_size] for s in range(0, len(parts[k]), cfg.batch_size))]
    done: dict[int, list[np.ndarray]] = {}
    with tqdm(total=sum(len(parts[k]) for k in todo), unit="caption", desc="embed captions",
              disable=not cfg.progress or not todo) as bar:
        for emb, (k, stop) in _embedded_texts(teacher, tower, batches, cfg, cfg.workers):
            raise_if_stopped()   # between parts' writes: each is written whole, below
            done.setdefault(k, []).append(emb)
            bar.update(len(emb))
            if stop == parts[k].stop:
                chunk = [captions[j] for j in parts[k]]
                with PartWriter(store, k, fmt, dims=dims, dtype=cfg.dtype, attrs=attrs) as writer:
                    writer.add_rows([caption_id for caption_id, _ in chunk], np.concatenate(done.pop(k)),
                                    [{"text": text} for _, text in chunk])
                summary.captions_embedded += len(chunk)
    _finish_store(store, len(parts))


def _write_keyword_store(cfg, fmt, teacher: Teacher, tower: Tower, words: list[str], attrs: dict) -> None:
    """Keyword prompts are cheap: the store is rebuilt in a new folder and swapped in whenever the words or
    the template change, so readers never see half of it."""
    store = cfg.cache / KEYWORD_STORE
    attrs = {**attrs, "prompt": cfg.prompt, "keywords": words}
    for leftover in cfg.cache.glob(f"{KEYWORD_STORE}.*-*"):
        shutil.rmtree(leftover, ignore_errors=True)
    if (store / INDEX_FILE[fmt]).is_file() and not settings_diff(read_store_json(store)["attrs"], attrs):
        return
    prompts = [cfg.prompt.format(w) for w in words]
    batches = [(prompts[s:s + cfg.batch_size], None) for s in range(0, len(prompts), cfg.batch_size)]
    emb = np.concatenate([e for e, _ in _embedded_texts(teacher, tower, batches, cfg)])
    tmp = cfg.cache / f"{KEYWORD_STORE}.tmp-{os.getpid()}"
    with PartWriter(tmp, 0, fmt, dims=emb.shape[1], dtype=cfg.dtype, attrs=attrs) as writer:
        for word, prompt, row in zip(words, prompts, emb):
            writer.add(word, row[None], meta={"prompt": prompt})
    build_index(tmp)
    if store.exists():
        store.rename(cfg.cache / f"{KEYWORD_STORE}.old-{os.getpid()}")
    tmp.rename(store)
    shutil.rmtree(cfg.cache / f"{KEYWORD_STORE}.old-{os.getpid()}", ignore_errors=True)
