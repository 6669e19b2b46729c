"""The trainer's data path: a split of the cache loaded once into contiguous tensors, batches built by index.

All features of a split live in one (total_frames, dims) float16 tensor plus offsets - on the GPU when
there is one - so building a batch is a gather, with no per-utterance Python and no DataLoader.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cache.manifest import read_manifest, read_records
from cache.store import StoreReader

AUDIO, IMAGES, TEXTS, KEYWORDS = "audio", "images", "texts", "keywords"


@dataclass
class SplitData:
    """One split of the cache, on one device."""
    split: str
    utt_ids: list[str]
    caption_ids: list[str]
    transcripts: list[str]
    features: torch.Tensor        # [total_frames, dims] float16
    offsets: torch.Tensor         # [N + 1] int64
    lengths: torch.Tensor         # [N] int64 frames
    image_index: torch.Tensor     # [N] int64 row of `images` for each utterance
    image_ids: list[str]          # [M] unique images of the split
    images: torch.Tensor          # [M, E] float32, L2-normalised CLIP image embeddings
    texts: torch.Tensor           # [N, E] float32 caption embedding of each utterance
    skipped: int = 0              # utterances of the split left out (no features or no image embedding)

    def __len__(self) -> int:
        return len(self.utt_ids)

    @property
    def dims(self) -> int:
        return self.features.shape[1]

    @property
    def embed_dim(self) -> int:
        return self.images.shape[1]

    def batch(self, idx: torch.Tensor, max_frames: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Utterances `idx` [B] -> (features [B, T, dims] float32 zero-padded, lengths [B]); T <= max_frames."""
        idx = idx.to(self.offsets.device)
        lengths = self.lengths[idx].clamp(max=max_frames)
        steps = torch.arange(int(lengths.max()), device=idx.device)
        valid = steps[None, :] < lengths[:, None]
        rows = (self.offsets[idx][:, None] + steps[None, :]).where(valid, torch.zeros((), dtype=torch.long,
                                                                                         device=idx.device))
        feats = self.features[rows].float() * valid[..., None]
        return feats, lengths


def _embeddings(cache: Path, store: str) -> tuple[dict[str, int], np.ndarray]:
    reader = StoreReader(cache / store)
    array, _, ids = reader.load_all()
    reader.close()
    return {k: i for i, k in enumerate(ids)}, array.astype(np.float32)


def check_cache(cache: Path) -> dict:
    """The cache's manifest, after checking that the stages the trainer needs have run."""
    manifest = read_manifest(cache)
    for section, stage in (("audio", "extract-audio"), ("clip", "embed-images")):
        if section not in manifest:
            raise FileNotFoundError(f"{cache}: no {section} section in cache.json; run `clipspeech {stage} "
                                    f"--cache {cache}` first")
    for store in (AUDIO, IMAGES, TEXTS):
        if not any((cache / store / name).is_file() for name in ("index.h5", "index.json")):
            raise FileNotFoundError(f"{cache / store}: no index; the stage that writes it has not finished "
                                    "(rerun it, or with --index-only after all --shard jobs)")
    return manifest


def load_split(cache: str | Path, split: str, device: str | torch.device = "cpu") -> SplitData:
    """Loads the utterances of `split` that have features and an image embedding."""
    cache = Path(cache)
    check_cache(cache)
    records = [r for r in read_records(cache) if r["split"] == split]
    audio = StoreReader(cache / AUDIO)
    image_row, image_emb = _embeddings(cache, IMAGES)
    text_row, text_emb = _embeddings(cache, TEXTS)
    usable = [r for r in records if r["utt_id"] in audio and r["image_id"] in image_row
              and r["caption_id"] in text_row]
    feats, offsets, ids = audio.load_all([r["utt_id"] for r in usable]) if usable else \
        (np.zeros((0, audio.dims), np.float16), np.zeros(1, np.int64), [])
    audio.close()

    image_ids = list(dict.fromkeys(r["image_id"] for r in usable))
    local = {k: i for i, k in enumerate(image_ids)}
    to = dict(device=device)
    offsets_t = torch.from_numpy(np.asarray(offsets, dtype=np.int64))
    return SplitData(
        split=split, utt_ids=list(ids), caption_ids=[r["caption_id"] for r in usable],
        transcripts=[r["caption"] for r in usable],
        features=torch.from_numpy(np.ascontiguousarray(feats, dtype=np.float16)).to(**to),
        offsets=offsets_t.to(**to), lengths=(offsets_t[1:] - offsets_t[:-1]).to(**to),
        image_index=torch.tensor([local[r["image_id"]] for r in usable], dtype=torch.long).to(**to),
        image_ids=image_ids,
        images=torch.from_numpy(image_emb[[image_row[k] for k in image_ids]].reshape(-1, image_emb.shape[1])).to(**to),
        texts=torch.from_numpy(text_emb[[text_row[r["caption_id"]] for r in usable]].reshape(-1, text_emb.shape[1]))
        .to(**to),
        skipped=len(records) - len(usable))


def load_keywords(cache: str | Path, device: str | torch.device = "cpu") -> tuple[list[str], torch.Tensor, dict]:
    """(words, prompt embeddings [K, E] float32, store attrs) from CACHE/keywords."""
    store = Path(cache) / KEYWORDS
    if not store.is_dir():
        raise FileNotFoundError(f"{store}: no keyword embeddings; run `clipspeech embed-images` on this cache")
    reader = StoreReader(store)
    array, _, words = reader.load_all()
    attrs = reader.attrs
    reader.close()
    return list(words), torch.from_numpy(array.astype(np.float32)).to(device), attrs
