"""The trainer's data path: a split of the cache loaded once into contiguous tensors, batches built by index.

All features of a split live in one (total_frames, dims) float16 tensor plus offsets - on the GPU when
there is one - so building a batch is a gather, with no per-utterance Python and no DataLoader.
"""
from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from cache.manifest import (AUDIO_STORE, IMAGE_STORE, KEYWORD_STORE, SPEAKER_CMVN, TEXT_STORE, read_manifest,
                            read_records, stage_command)
from cache.reader import StoreReader
from cache.store import INDEX_FILE
from trainer.sampler import LengthBucketBatchSampler, local_slice
from trainer.schedule import batch_size_at


@dataclass
class SplitData:
    """One split of the cache, on one device."""
    split: str
    utt_ids: list[str]
    caption_ids: list[str]
    transcripts: list[str]
    speakers: list[str]
    features: torch.Tensor        # [total_frames, dims] float16
    offsets: torch.Tensor         # [N + 1] int64
    lengths: torch.Tensor         # [N] int64 frames
    image_index: torch.Tensor     # [N] int64 row of `images` for each utterance
    image_ids: list[str]          # [M] unique images of the split
    images: torch.Tensor          # [M, E] float32, L2-normalised CLIP image embeddings
    texts: torch.Tensor           # [N, E] float32 caption embedding of each utterance
    _spans: dict = field(default_factory=dict, repr=False, compare=False)   # max_frames -> [N, 2]

    def __len__(self) -> int:
        return len(self.utt_ids)

    @property
    def dims(self) -> int:
        return self.features.shape[1]

    @property
    def embed_dim(self) -> int:
        return self.images.shape[1]

    def batch(self, idx: torch.Tensor, max_frames: int,
              frames: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Utterances `idx` [B] -> (features [B, T, dims] float32 zero-padded, lengths [B]); T <= max_frames.

        `frames`: T when the caller knows it (the trainer does, from lengths on the CPU); otherwise the
        longest clamped length, which costs a GPU sync.
        """
        idx = idx.to(self.offsets.device)
        span = self.spans(max_frames)[idx]   # one gather for both: each is a kernel launch on a GPU
        starts, lengths = span[:, 0], span[:, 1]
        steps = torch.arange(int(lengths.max()) if frames is None else frames, device=idx.device)
        valid = steps[None, :] < lengths[:, None]
        rows = (starts[:, None] + steps[None, :]).where(valid, 0)
        feats = self.features[rows].float() * valid[..., None]
        return feats, lengths

    def spans(self, max_frames: int) -> torch.Tensor:
        """[N, 2] int64: each utterance's first row in `features` and its frames clamped to max_frames (made
        once per max_frames)."""
        if max_frames not in self._spans:
            self._spans[max_frames] = torch.stack([self.offsets[:-1], self.lengths.clamp(max=max_frames)], dim=1)
        return self._spans[max_frames]


def _embedding_rows(reader: StoreReader, keys: list[str]) -> np.ndarray:
    """[len(keys), E] float32: the (1 x E) embeddings of `keys` in that order, only those read."""
    return reader.load_all(keys)[0].astype(np.float32).reshape(len(keys), reader.dims)


def check_cache(cache: Path) -> dict:
    """The cache's manifest, after checking that the stages the trainer needs have run."""
    if not Path(cache).is_dir():
        raise FileNotFoundError(f"{cache}: no such cache folder; a cache is made by `clipspeech extract-audio "
                                f"--data CORPUS --cache {cache}`, then `clipspeech embed-images` on it")
    manifest = read_manifest(cache)
    if not manifest:
        raise FileNotFoundError(f"{cache}: not a cache (no cache.json; a corpus folder given as --cache?); make "
                                f"one with `{stage_command(cache, 'extract-audio', manifest)}`, then "
                                f"`{stage_command(cache, 'embed-images', manifest)}`")
    for section, stage in (("audio", "extract-audio"), ("clip", "embed-images")):
        if section not in manifest:
            raise FileNotFoundError(f"{cache}: no {section} section in cache.json; run "
                                    f"`{stage_command(cache, stage, manifest)}` first")
    for store, stage in ((AUDIO_STORE, "extract-audio"), (IMAGE_STORE, "embed-images"), (TEXT_STORE, "embed-images")):
        if not any((cache / store / name).is_file() for name in INDEX_FILE.values()):
            after_shards = " (or `extract-audio --index-only` once every --shard job is done)" \
                if stage == "extract-audio" else " (its last --shard job builds the index)"
            raise FileNotFoundError(f"{cache / store}: no index, so `clipspeech {stage}` has not finished on "
                                    f"this cache: run it again{after_shards}")
    return manifest


@functools.lru_cache(maxsize=4)
def _speaker_stats(path: str, mtime_ns: int) -> tuple[dict, dict]:
    """{speaker: mean [D]}, {speaker: 1 / (std + eps) [D]} float32; parsed once per file version (streamed
    batches call apply_speaker_cmvn for every batch)."""
    stats = json.loads(Path(path).read_text(encoding="utf-8"))
    mean = {k: np.asarray(v["mean"], np.float32) for k, v in stats["speakers"].items()}
    scale = {k: np.float32(1.0) / (np.asarray(v["std"], np.float32) + np.float32(stats["eps"]))
             for k, v in stats["speakers"].items()}
    return mean, scale


def apply_speaker_cmvn(cache: Path, features: np.ndarray, offsets: np.ndarray, speakers: list[str]
                       ) -> np.ndarray:
    """Speaker-level mean/variance normalisation (mfcc-kaldi with normalisation=speaker): utterance i, rows
    offsets[i]:offsets[i+1] of features [total_frames, D], becomes (x - mean) / (std + eps) with the [D]
    statistics of speakers[i] from CACHE/audio/speaker_cmvn.json. Returns a new float16 array."""
    path = Path(cache) / AUDIO_STORE / SPEAKER_CMVN
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: these features need per-speaker statistics, which "
                                "extract-audio writes with its index; run it on this cache again "
                                "(--index-only)")
    mean, scale = _speaker_stats(str(path), path.stat().st_mtime_ns)
    missing = sorted(set(speakers) - set(mean))
    if missing:
        raise ValueError(f"speakers {missing[:5]} have no statistics in {path}; run extract-audio "
                         "--index-only on this cache to compute them again")
    out = np.empty(features.shape, dtype=np.float16)
    for i, speaker in enumerate(speakers):
        rows = slice(int(offsets[i]), int(offsets[i + 1]))
        out[rows] = (features[rows].astype(np.float32) - mean[speaker]) * scale[speaker]
    return out


_LOAD_CHUNK_BYTES = 256 << 20   # features go to the device this much at a time


def _load_features(cache: Path, audio: StoreReader, ids: list[str], offsets: np.ndarray,
                   speakers: list[str] | None, device: torch.device) -> torch.Tensor:
    """The features of `ids` as one [offsets[-1], dims] float16 tensor on `device`, read and copied over
    in chunks of about _LOAD_CHUNK_BYTES: for a GPU the host holds one chunk, not the split (SpokenCOCO's
    train split is ~20 GB, once per process under torchrun). `speakers`: apply speaker CMVN with these."""
    out = torch.empty((int(offsets[-1]), audio.dims), dtype=torch.float16, device=device)
    row_bytes = audio.dims * 2
    first = 0
    while first < len(ids):
        last = int(np.searchsorted(offsets, offsets[first] + max(1, _LOAD_CHUNK_BYTES // row_bytes),
                                   side="right")) - 1
        last = min(max(last, first + 1), len(ids))
        chunk, chunk_offsets, _ = audio.load_all(ids[first:last])
        if speakers is not None:
            chunk = apply_speaker_cmvn(cache, chunk, chunk_offsets, speakers[first:last])
        out[int(offsets[first]):int(offsets[last])].copy_(torch.from_numpy(chunk.astype(np.float16, copy=False)))
        first = last
    return out


def load_split(cache: str | Path, split: str, device: str | torch.device = "cpu",
               features: bool = True) -> SplitData:
    """Loads the utterances of `split` that have features and an image embedding.

    features=False (--data-mode stream): everything but the audio features, which stay on disk; `features`
    is then an empty [0, dims] tensor, while `offsets` and `lengths` come from the store's index.
    """
    cache = Path(cache)
    manifest = check_cache(cache)
    records = [r for r in read_records(cache) if r["split"] == split]
    audio = StoreReader(cache / AUDIO_STORE)
    with StoreReader(cache / IMAGE_STORE) as image_store, StoreReader(cache / TEXT_STORE) as text_store:
        usable = [r for r in records if r["utt_id"] in audio and r["image_id"] in image_store
                  and r["caption_id"] in text_store]
        image_ids = list(dict.fromkeys(r["image_id"] for r in usable))
        image_emb = _embedding_rows(image_store, image_ids)
        text_emb = _embedding_rows(text_store, [r["caption_id"] for r in usable])
    ids = [r["utt_id"] for r in usable]
    frames = dict(zip(audio.ids, audio.lengths.tolist()))
    offsets = np.concatenate([[0], np.cumsum([frames[u] for u in ids], dtype=np.int64)])
    if features:
        speakers = [r["speaker"] for r in usable] \
            if manifest["audio"]["features"].get("normalisation") == "speaker" else None
        feats = _load_features(cache, audio, ids, offsets, speakers, torch.device(device))
    else:
        feats = torch.zeros((0, audio.dims), dtype=torch.float16, device=device)
    audio.close()

    local = {k: i for i, k in enumerate(image_ids)}
    to = dict(device=device)
    offsets_t = torch.from_numpy(offsets)
    return SplitData(
        split=split, utt_ids=ids, caption_ids=[r["caption_id"] for r in usable],
        transcripts=[r["caption"] for r in usable], speakers=[str(r["speaker"]) for r in usable],
        features=feats, offsets=offsets_t.to(**to), lengths=(offsets_t[1:] - offsets_t[:-1]).to(**to),
        image_index=torch.tensor([local[r["image_id"]] for r in usable], dtype=torch.long).to(**to),
        image_ids=image_ids,
        images=torch.from_numpy(image_emb).to(**to),
        texts=torch.from_numpy(text_emb).to(**to))


def load_keywords(cache: str | Path, device: str | torch.device = "cpu"
                  ) -> tuple[list[str], torch.Tensor, dict]:
    """(words, prompt embeddings [K, E] float32, store attrs) from CACHE/keywords."""
    store = Path(cache) / KEYWORD_STORE
    if not store.is_dir():
        raise FileNotFoundError(f"{store}: no keyword embeddings; run `clipspeech embed-images` on this "
                                "cache")
    reader = StoreReader(store)
    array, _, words = reader.load_all()
    attrs = reader.attrs
    reader.close()
    return list(words), torch.from_numpy(array.astype(np.float32)).to(device), attrs


# ----------------------------------------------------------------------------------------------------
# Batches for the training loop (--data-mode memory; trainer/stream.py makes the same Batch from shards)

COMPILE_BUCKET = 128  # frames: with --compile, T is rounded up to a multiple, so few shapes get compiled


@dataclass
class Batch:
    """One training step's local batch, on the training device."""
    feats: torch.Tensor       # [B, T, dims] float32, zero-padded
    lengths: torch.Tensor     # [B] int64 frames (clamped to max_frames)
    images: torch.Tensor      # [B, E] float32 CLIP embedding of each utterance's image
    texts: torch.Tensor       # [B, E] float32 CLIP embedding of each utterance's written caption
    size: int                 # global batch size (all processes), for utterances/s


def padded_frames(longest: int, max_frames: int, multiple: int = 1) -> int:
    """T of a batch whose longest utterance has `longest` frames: clamped to max_frames, then rounded up
    to `multiple` (and clamped again: the encoder cuts at max_frames anyway)."""
    frames = min(int(longest), max_frames)
    return min(-(-frames // multiple) * multiple, max_frames)


class MemoryBatches:
    """--data-mode memory: global batches from LengthBucketBatchSampler, this rank's share gathered from
    the split's features on the device. Per step: a numpy slice, one small host-to-device copy of the
    indices (pinned, asynchronous on CUDA) and gathers on the device; no sync, no per-utterance Python."""

    def __init__(self, data: SplitData, schedule: list[tuple[int, int]], seed: int, rank: int = 0,
                 world: int = 1, max_frames: int = 2048, bucket: bool = True,
                 one_caption_per_image: bool = True, frame_multiple: int = 1):
        self.data, self.schedule, self.rank, self.world = data, schedule, rank, world
        self.max_frames, self.frame_multiple = max_frames, frame_multiple
        self.lengths = data.lengths.cpu().numpy()   # T of each batch without asking the GPU
        # unbucketed = equal lengths, so the jittered sort is a plain shuffle
        self.sampler = LengthBucketBatchSampler(self.lengths if bucket else np.ones(len(data)),
                                                data.image_index.cpu().numpy(),
                                                seed, one_caption_per_image=one_caption_per_image)
        self.pin = data.features.device.type == "cuda"

    def next(self, step: int) -> Batch:
        """The local batch of optimiser step `step` (0-based)."""
        batch = self.sampler.next_batch(batch_size_at(step, self.schedule))
        local = local_slice(batch, self.rank, self.world)
        frames = padded_frames(self.lengths[local].max(), self.max_frames, self.frame_multiple)
        idx = torch.from_numpy(local)
        if self.pin:
            idx = idx.pin_memory()
        idx = idx.to(self.data.features.device, non_blocking=True)
        feats, lengths = self.data.batch(idx, self.max_frames, frames)
        return Batch(feats, lengths, self.data.images[self.data.image_index[idx]], self.data.texts[idx],
                     len(batch))

    def state_dict(self) -> dict:
        return {"mode": "memory", "sampler": self.sampler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if state.get("mode") != "memory":
            raise ValueError(f"the checkpoint was written with --data-mode {state.get('mode')}; resume it "
                             "with the same data mode")
        self.sampler.load_state_dict(state["sampler"])

    def close(self) -> None:
        pass
