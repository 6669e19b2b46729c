"""Evaluation of an audio encoder against the cache: embeddings of a split, six-way retrieval, keyword
spotting (REFERENCE.md §3), the printed table, the JSON file and the embeddings behind them."""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cache.manifest import (TEXT_STORE, atomic_target, atomic_write_json, check_prompt, read_manifest, read_records,
                            read_utf8, stage_command)
from cache.reader import StoreReader
from trainer.data import SplitData, load_keywords, load_split
from trainer.metrics import (keyword_chance, keyword_relevance, keyword_spotting, positive_ranks, recall_summary,
                             retrieval_chance, six_way_retrieval)
from trainer.precision import autocast, pick_device

log = logging.getLogger(__name__)

PAIRS = (("audio_to_image", "audio -> image"), ("audio_to_text", "audio -> text"),
         ("image_to_audio", "image -> audio"), ("image_to_text", "image -> text"),
         ("text_to_audio", "text -> audio"), ("text_to_image", "text -> image"))


@torch.no_grad()
def embed_audio(model, data: SplitData, batch_size: int = 256, max_frames: int = 2048) -> torch.Tensor:
    """L2-normalised utterance embeddings [N, E] float32, in data order; batches sorted by length."""
    was_training = model.training
    model.eval()
    device = data.features.device
    order = torch.argsort(data.lengths, stable=True)
    out = torch.empty(len(data), data.embed_dim, device=device)
    for s in range(0, len(data), batch_size):
        idx = order[s:s + batch_size]
        feats, lengths = data.batch(idx, max_frames)
        with autocast(device):
            emb = model(feats, lengths)
        out[idx] = torch.nn.functional.normalize(emb.float(), dim=-1)
    model.train(was_training)
    return out


def dev_metrics(model, data: SplitData, keywords: tuple | None, batch_size: int, max_frames: int) -> dict:
    """The validation figures logged during training: audio<->image R@1/5/10 and keyword mAP. Only those two
    pairs are ranked (the text pairs are evaluate's: a corpus may have several utterances of one caption)."""
    audio = embed_audio(model, data, batch_size, max_frames)
    image_ids = [data.image_ids[i] for i in data.image_index.tolist()]
    out = {}
    for pair, ranks in (("audio_to_image", positive_ranks(audio, data.images, image_ids, data.image_ids)),
                        ("image_to_audio", positive_ranks(data.images, audio, data.image_ids, image_ids))):
        r = recall_summary(ranks)
        for k in ("R@1", "R@5", "R@10"):
            out[f"{pair}_{k}"] = r[k]
    if keywords is not None:
        words, emb, _ = keywords
        out["keyword_mAP"] = keyword_spotting(audio, emb, data.transcripts, words)["mAP"]
    return out


# ----------------------------------------------------------------------------------------------------
# The evaluate command


@dataclass(frozen=True)
class EvalConfig:
    cache: Path
    checkpoint: Path
    split: str = "test"
    json: Path | None = None
    html: Path | None = None
    save_embeddings: Path | None = None
    keywords: Path | None = None      # a subset of the cached keywords, one per line
    prompt: str | None = None         # must be the template the cache's keyword prompts were embedded with
    device: str = "cpu"
    batch_size: int | None = None     # utterances per forward pass [the run's eval_batch_size, as its dev figures]
    chunk: int = 1024

    def __post_init__(self):
        if self.split not in ("train", "dev", "test"):
            raise ValueError(f"--split {self.split!r}: use train, dev or test")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"--batch-size {self.batch_size}: must be 1 or more")
        if self.prompt is not None:
            check_prompt(self.prompt)
        pick_device(self.device)   # a bad or absent device fails here, before anything is loaded


def _split_texts(cache: Path, records: list[dict], image_ids: list[str],
                 device) -> tuple[list[str], list[str], torch.Tensor]:
    """The written captions (with an embedding) of the evaluated images: (caption ids, their image ids, [T, E]).

    Only the images that are evaluated (an image embedding and at least one usable utterance) count, so
    that every caption has its image among the candidates: a caption of an image that failed in
    embed-images, or whose every utterance failed in extract-audio, is left out with its image."""
    images = set(image_ids)
    captions = {}
    for r in records:
        if r["image_id"] in images:
            captions.setdefault(r["caption_id"], r["image_id"])
    reader = StoreReader(cache / TEXT_STORE)
    ids = [c for c in captions if c in reader]
    array, _, _ = reader.load_all(ids)
    reader.close()
    return ids, [captions[c] for c in ids], torch.from_numpy(array.astype(np.float32)).to(device)


def _report_left_out(cfg: EvalConfig, records: list[dict], data: SplitData, text_ids: list[str]) -> None:
    """A warning with what of the split is not evaluated (failed in extract-audio or embed-images)."""
    gone = {"utterances": len({r["utt_id"] for r in records}) - len(data),
            "images": len({r["image_id"] for r in records}) - len(data.image_ids),
            "captions": len({r["caption_id"] for r in records}) - len(text_ids)}
    if any(gone.values()):
        log.warning("%s split: %s left out (no features or no embedding: see %s/failures.jsonl)", cfg.split,
                    ", ".join(f"{n} {what}" for what, n in gone.items() if n), cfg.cache)


def evaluate(cfg: EvalConfig) -> tuple[dict, dict]:
    """(results in the JSON shape of the README, the arrays behind them, chance levels)."""
    from trainer.checkpoint import check_same_cache, load_encoder
    device = pick_device(cfg.device)
    model, state = load_encoder(cfg.checkpoint, device)
    check_same_cache(read_manifest(cfg.cache), state, cfg.checkpoint, cfg.cache,
                     "evaluate it on a cache made the same way")
    data = load_split(cfg.cache, cfg.split, device)
    if len(data) == 0:
        raise ValueError(f"{cfg.cache}: no usable utterances in the {cfg.split} split")
    # without a padding mask (the seed's encoder) an utterance's embedding depends on its batch's padding:
    # by default the batch size of the run's own validation, so that evaluate --split dev gives its figures
    batch_size = cfg.batch_size or state.get("config", {}).get("eval_batch_size", 256)
    audio = embed_audio(model, data, batch_size, model.cfg.max_frames)
    records = [r for r in read_records(cfg.cache) if r["split"] == cfg.split]
    text_ids, text_image_ids, text = _split_texts(cfg.cache, records, data.image_ids, device)
    _report_left_out(cfg, records, data, text_ids)
    words, keyword_emb = _keywords(cfg, device)
    audio_image_ids = [data.image_ids[i] for i in data.image_index.tolist()]

    retrieval = six_way_retrieval(audio, audio_image_ids, data.caption_ids, data.images, data.image_ids,
                                  text, text_ids, text_image_ids, chunk=cfg.chunk, device=device)
    kws = keyword_spotting(audio, keyword_emb, data.transcripts, words, device=device)
    relevance = keyword_relevance(data.transcripts, words)
    chance = {pair: r[10] for pair, r in retrieval_chance(audio_image_ids, len(data.image_ids),
                                                          text_image_ids).items()}
    chance["keyword_mAP"] = keyword_chance(relevance)
    results = {
        "split": cfg.split,
        "counts": {"audio": len(data), "images": len(data.image_ids), "texts": len(text_ids),
                   "keywords": len(words)},
        "retrieval": {pair: {k: r[k] for k in ("R@1", "R@5", "R@10", "median_rank", "mean_rank")}
                      for pair, r in retrieval.items()},
        "keyword_spotting": {k: kws[k] for k in ("mAP", "micro_AP", "P@10", "P@N", "EER")}
        | {"per_keyword": kws["per_keyword"]},
    }
    arrays = {"audio": audio.cpu().numpy(), "audio_ids": np.array(data.utt_ids),
              "audio_image_ids": np.array(audio_image_ids), "audio_caption_ids": np.array(data.caption_ids),
              "audio_text": np.array(data.transcripts),
              "image": data.images.cpu().numpy(), "image_ids": np.array(data.image_ids),
              "text": text.cpu().numpy(), "text_ids": np.array(text_ids),
              "text_image_ids": np.array(text_image_ids), "keyword": keyword_emb.cpu().numpy(),
              "keywords": np.array(words)}
    if cfg.json:
        atomic_write_json(cfg.json, _json_safe(results))
    if cfg.save_embeddings:   # at the path given (np.savez would add .npz to a name without it), atomically
        with atomic_target(cfg.save_embeddings) as tmp, open(tmp, "wb") as f:
            np.savez(f, **arrays)
    return results, arrays, chance


def _keywords(cfg: EvalConfig, device) -> tuple[list[str], torch.Tensor]:
    words, emb, attrs = load_keywords(cfg.cache, device)
    if cfg.prompt is not None and attrs.get("prompt") not in (None, cfg.prompt):
        raise ValueError(f"{cfg.cache}/keywords: the prompts were embedded with {attrs.get('prompt')!r}, not "
                         f"{cfg.prompt!r}; run `{stage_command(cfg.cache, 'embed-images')} --prompt "
                         f"{cfg.prompt!r}` (with the --keywords it had, if any: the keyword store is made anew)")
    if cfg.keywords is None:
        return words, emb
    path = Path(cfg.keywords)
    if not path.is_file():
        raise FileNotFoundError(f"--keywords {path}: no such file (one keyword per line)")
    wanted = list(dict.fromkeys(w.strip().lower() for w in read_utf8(path).splitlines()
                                if w.strip() and not w.strip().startswith("#")))
    if not wanted:
        raise ValueError(f"--keywords {path}: no keywords in this file (one per line; # starts a comment)")
    missing = [w for w in wanted if w not in words]
    if missing:
        again = f" --prompt {attrs['prompt']!r}" if attrs.get("prompt") else ""
        raise ValueError(f"{cfg.keywords}: keywords not embedded in {cfg.cache}: {', '.join(missing[:10])}; the "
                         f"cache holds {len(words)}. Run `{stage_command(cfg.cache, 'embed-images')} --keywords "
                         f"FILE{again}` with a FILE of every keyword to keep (the cache's and these): the cache's "
                         "keyword list is replaced by FILE's")
    rows = [words.index(w) for w in wanted]
    return wanted, emb[rows]


def _json_safe(x):
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def format_table(results: dict, chance: dict | None = None) -> str:
    """The seed note's table: rows = the six pairs, columns R@1 R@5 R@10, chance R@10 beside them."""
    chance = chance or {}
    lines = [f"{results['split']} split: {results['counts']['audio']} utterances, {results['counts']['images']} "
             f"images, {results['counts']['texts']} captions, {results['counts']['keywords']} keywords",
             f"{'':16}{'R@1':>7}{'R@5':>7}{'R@10':>7}{'chance R@10':>13}"]
    for pair, label in PAIRS:
        r = results["retrieval"][pair]
        lines.append(f"{label:16}{r['R@1']:7.1f}{r['R@5']:7.1f}{r['R@10']:7.1f}{chance.get(pair, float('nan')):13.1f}")
    k = results["keyword_spotting"]
    lines.append(f"keyword spotting: mAP {k['mAP']:.1f} (chance {chance.get('keyword_mAP', float('nan')):.1f}), "
                 f"micro AP {k['micro_AP']:.1f}, P@10 {k['P@10']:.1f}, P@N {k['P@N']:.1f}, EER {k['EER']:.1f}")
    return "\n".join(lines)


def write_html(cfg: EvalConfig, results: dict, arrays: dict) -> Path:
    """The HTML report, with the corpus files the cache records and the curves of the checkpoint's run."""
    from trainer.report import write_report
    records = read_records(cfg.cache)
    audio_paths = {r["utt_id"]: r["audio_path"] for r in records}
    image_paths = {r["image_id"]: r["image_path"] for r in records}
    return write_report(cfg.html, results, arrays, audio_paths, image_paths, run_dir=Path(cfg.checkpoint).parent)
