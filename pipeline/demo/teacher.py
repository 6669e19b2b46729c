"""The demo's own small CLIP teacher: fitted with open_clip on the demo's train images and texts, saved as an
open_clip model folder that loads through "local-dir:DIR" like any released CLIP."""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import sys
import time
from copy import deepcopy
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from open_clip.loss import ClipLoss
from open_clip.transform import PreprocessCfg, image_transform_v2
from PIL import Image, UnidentifiedImageError
from safetensors.torch import save_file
from tqdm import tqdm

_TEXT_CFG = {"context_length": 32, "vocab_size": 49408, "width": 128, "heads": 4, "layers": 3}
# Two image towers. The ViT is REFERENCE.md §8's; on the demo corpus's captions it learns the backgrounds
# and little else in the time budget (test image->text R@1 3 % after 150 steps, 10 % after 400), while
# open_clip's small ModifiedResNet reaches 36-48 % after 150-250 steps; starting the temperature at 10
# instead of CLIP's 1/0.07 helped it (R@1 36 -> 43 % at 150 steps; 33 made it 7 %).
MODEL_CFGS = {
    "clipspeech-demo-rn": {
        "embed_dim": 128, "init_logit_scale": math.log(10.0),
        "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 32, "head_width": 32},
        "text_cfg": _TEXT_CFG},
    "clipspeech-demo-vit": {
        "embed_dim": 128,
        "vision_cfg": {"image_size": 64, "patch_size": 8, "width": 128, "head_width": 32, "layers": 3},
        "text_cfg": _TEXT_CFG},
}
DEFAULT_MODEL = "clipspeech-demo-rn"
IMAGE_STRIDE = {"clipspeech-demo-rn": 32, "clipspeech-demo-vit": 8}  # pixels; image_size is a multiple
CONFIG_FILE = "open_clip_config.json"  # the names open_clip's local-dir / hf-hub loaders look for
WEIGHTS_FILE = "open_clip_model.safetensors"
METRICS_FILE = "metrics.json"
RECALL_KS = (1, 5, 10)
MAX_LOGIT_SCALE = math.log(100.0)  # CLIP caps the temperature at 100


def register_model_configs() -> list[str]:
    """Make the MODEL_CFGS names known to open_clip (create_model, get_tokenizer, list_models); idempotent."""
    # add_model_config() only takes JSON files on disk; the registry dict survives its rescans.
    for name, model_cfg in MODEL_CFGS.items():
        open_clip.factory._MODEL_CONFIGS.setdefault(name, deepcopy(model_cfg))
    return list(MODEL_CFGS)


@dataclass(frozen=True)
class TeacherConfig:
    """How the teacher is fitted. model is a MODEL_CFGS name; steps x batch_size images are seen; lr is
    AdamW's peak (linear warm-up over `warmup` steps, then cosine decay to 0); max_shift is the random
    translation in pixels (no flips: captions say left/right); shared_text_share is how often an image's
    text in a step is one that other train images also hold (attribute texts such as "this is a photo of
    a red") rather than one of its own (its captions); threads is torch's intra-op thread count; cpu_bf16
    trains under bf16 autocast with channels-last images where the CPU computes bf16 natively (1.8x faster
    on the demo's 2 cores, about the same recall: docs/demo-tuning.md; weights, saving and testing stay
    fp32)."""
    model: str = DEFAULT_MODEL
    steps: int = 200
    batch_size: int = 100
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup: int = 10
    image_size: int = 64
    max_shift: int = 4
    shared_text_share: float = 0.1
    seed: int = 0
    threads: int = 2
    cpu_bf16: bool = True

    def __post_init__(self):
        if self.model not in MODEL_CFGS:
            raise ValueError(f"unknown teacher model {self.model!r}; use one of {', '.join(MODEL_CFGS)}")
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.batch_size < 2:
            raise ValueError(f"batch_size must be >= 2 (a contrastive batch needs negatives), "
                             f"got {self.batch_size}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if not 0 <= self.warmup <= self.steps:
            raise ValueError(f"warmup must be in [0, steps={self.steps}], got {self.warmup}")
        stride = IMAGE_STRIDE[self.model]
        if self.image_size < stride or self.image_size % stride:
            raise ValueError(f"image_size must be a positive multiple of {stride} for {self.model}, "
                             f"got {self.image_size}")
        if not 0 <= self.max_shift < self.image_size // 2:
            raise ValueError(f"max_shift must be in [0, image_size/2), got {self.max_shift}")
        if not 0.0 <= self.shared_text_share <= 1.0:
            raise ValueError(f"shared_text_share must be in [0, 1], got {self.shared_text_share}")
        if self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")


def lr_at(step: int, cfg: TeacherConfig) -> float:
    """Learning rate at `step` (0-based): linear warm-up to cfg.lr, then cosine decay to 0 at cfg.steps."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_model(cfg: TeacherConfig) -> open_clip.CLIP:
    """A randomly initialised teacher (seeded by cfg.seed) whose preprocess_cfg is the one saved with it."""
    register_model_configs()
    torch.manual_seed(cfg.seed)
    # "squash" resizes the whole picture: a centre crop could cut off objects the captions mention.
    preprocess = {"size": cfg.image_size, "resize_mode": "squash", "interpolation": "bicubic"}
    return open_clip.create_model(cfg.model, force_image_size=cfg.image_size,
                                  force_preprocess_cfg=preprocess)


def _require_file(path: str) -> None:
    if not Path(path).is_file():
        raise FileNotFoundError(f"teacher image not found: {path}; check the corpus folder "
                                f"(regenerate the demo corpus if files are missing)")


def load_images(paths: list[str], preprocess) -> torch.Tensor:
    """Read and preprocess images once: [N, 3, S, S] float32, normalised as `preprocess` does."""
    tensors = []
    for path in paths:
        _require_file(path)
        try:
            with Image.open(path) as image:
                tensors.append(preprocess(image.convert("RGB")))
        except (UnidentifiedImageError, OSError) as err:
            raise ValueError(f"cannot read teacher image {path}: {err}; replace or remove the file") from err
    return torch.stack(tensors)


def random_shift(images: torch.Tensor, max_shift: int, rng: np.random.Generator) -> torch.Tensor:
    """Translate each image [B, 3, H, W] by its own random (dx, dy) in [-max_shift, max_shift] pixels,
    filling the uncovered border with the edge pixels (the drawn scenes have flat backgrounds)."""
    if max_shift == 0:
        return images
    height, width = images.shape[-2:]
    padded = F.pad(images, (max_shift,) * 4, mode="replicate")
    offsets = rng.integers(0, 2 * max_shift + 1, size=(len(images), 2))
    return torch.stack([padded[i, :, y:y + height, x:x + width] for i, (y, x) in enumerate(offsets)])


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    # open_clip's rule: no decay on biases, norm gains, embeddings of rank < 2 and the temperature.
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        skip = param.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name
        (no_decay if skip else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _text_pools(text_ids: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per image, (its own text ids, the ids it shares with other images)."""
    holders = np.bincount(np.concatenate(text_ids))
    return [(ids[holders[ids] == 1], ids[holders[ids] > 1]) for ids in text_ids]


def _pick_texts(batch: np.ndarray, pools: list[tuple[np.ndarray, np.ndarray]], shared_share: float,
                rng: np.random.Generator) -> list[int]:
    """One text id per image of the batch: a shared text with probability shared_share, else an own one.
    A text held by several images of the batch is a false negative for all but one of them: too many of
    them swamp the captions (trial: test R@1 69 % with captions only, 21 % when 3 of 4 texts were shared),
    hence the share; and a text already picked for another image of the batch is avoided if possible."""
    picked, used = [], set()
    for image in batch:
        own, shared = pools[image]
        choices = shared if len(own) == 0 or (len(shared) and rng.uniform() < shared_share) else own
        fresh = [t for t in choices if t not in used]
        text = int(rng.choice(fresh if fresh else choices))
        picked.append(text)
        used.add(text)
    return picked


def cpu_has_native_bf16() -> bool:
    """True on CPUs with bf16 arithmetic (AVX512-BF16 or AMX); elsewhere bf16 is emulated and slower than
    fp32. The trainer's twin is trainer/precision.py (pipeline/ and trainer/ do not import each other)."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")   # private, hence getattr
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def _training_precision(model: open_clip.CLIP, cfg: TeacherConfig):
    """(autocast context, memory format) for the training steps: bf16 and channels-last where cfg asks for
    it and the CPU supports it, else fp32 in the default layout."""
    if cfg.cpu_bf16 and cpu_has_native_bf16() and next(model.parameters()).device.type == "cpu":
        return (lambda: torch.autocast("cpu", dtype=torch.bfloat16)), torch.channels_last
    return contextlib.nullcontext, torch.contiguous_format


@contextlib.contextmanager
def _torch_threads(threads: int):
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _check_pairs(pairs: list[tuple[str, list[str]]], what: str) -> None:
    if not pairs:
        raise ValueError(f"{what} is empty: pass (image path, texts) pairs")
    for path, texts in pairs:
        if isinstance(texts, str) or not texts or not all(isinstance(t, str) and t.strip() for t in texts):
            raise ValueError(f"{what}: image {path} needs a non-empty list of non-empty texts, got {texts!r}")


def train_teacher(train: list[tuple[str, list[str]]],
                  cfg: TeacherConfig) -> tuple[open_clip.CLIP, list[float]]:
    """Fit a fresh teacher on (image path, texts) pairs with open_clip's ClipLoss, deterministic given
    cfg.seed and cfg.threads. Each step takes a batch of distinct images (a new permutation every epoch)
    with one text each. Returns the model in eval mode and the loss of every step."""
    _check_pairs(train, "train")
    if len(train) < 2:
        raise ValueError(f"train needs at least 2 images for a contrastive batch, got {len(train)}")
    with _torch_threads(cfg.threads):
        model = build_model(cfg)
        preprocess = image_transform_v2(PreprocessCfg(**model.visual.preprocess_cfg), is_train=False)
        images = load_images([path for path, _ in train], preprocess)
        vocabulary = sorted({text for _, texts in train for text in texts})
        index = {text: i for i, text in enumerate(vocabulary)}
        tokens = open_clip.get_tokenizer(cfg.model)(vocabulary)
        pools = _text_pools([np.array(sorted({index[t] for t in texts})) for _, texts in train])

        precision, memory_format = _training_precision(model, cfg)
        model.to(memory_format=memory_format)
        images = images.contiguous(memory_format=memory_format)
        rng = np.random.default_rng(cfg.seed)
        batch_size = min(cfg.batch_size, len(train))
        loss_fn = ClipLoss()
        # fused: one kernel for all 12M parameters (half of them the token table) instead of a loop over
        # them; 0.36 -> 0.29 s per step on 2 cores, together with the attention kernel below
        optimizer = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.lr, fused=True)
        model.train()
        losses, order = [], np.array([], dtype=np.int64)
        bar = tqdm(range(cfg.steps), desc="teacher", unit="step", mininterval=2.0 if sys.stderr.isatty() else 30.0)
        for step in bar:
            if len(order) < batch_size:  # new epoch; the remainder of the old one is dropped
                order = rng.permutation(len(train))
            batch, order = order[:batch_size], order[batch_size:]
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, cfg)

            # images and their texts -> normalised embeddings -> symmetric InfoNCE
            shifted = random_shift(images[batch], cfg.max_shift, rng).contiguous(memory_format=memory_format)
            texts = tokens[_pick_texts(batch, pools, cfg.shared_text_share, rng)]
            # PyTorch's flash attention kernel for the CPU spent a third of the backward pass on these short
            # sequences (32 tokens, 5 in the image tower's attention pool); the plain math kernel is faster
            with precision(), sdpa_kernel([SDPBackend.MATH]):
                image_features = model.encode_image(shifted, normalize=True)
                text_features = model.encode_text(texts, normalize=True)
            # the loss in fp32 (REFERENCE.md §7: contrastive losses in low precision go wrong)
            loss = loss_fn(image_features.float(), text_features.float(), model.logit_scale.exp())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
            losses.append(loss.item())
            bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
        model.to(memory_format=torch.contiguous_format)  # what a reloaded teacher has: identical outputs
    return model.eval(), losses


@torch.no_grad()
def embed(model: open_clip.CLIP, images: torch.Tensor, tokens: torch.Tensor,
          batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit-norm embeddings of preprocessed images [N, 3, S, S] and tokens [M, L]: ([N, D], [M, D])."""
    image_emb = torch.cat([model.encode_image(images[i:i + batch], normalize=True)
                           for i in range(0, len(images), batch)])
    text_emb = torch.cat([model.encode_text(tokens[i:i + batch], normalize=True)
                          for i in range(0, len(tokens), batch)])
    return image_emb, text_emb


def retrieval_recall(image_emb: torch.Tensor, text_emb: torch.Tensor, text_image: torch.Tensor,
                     ks: tuple[int, ...] = RECALL_KS) -> dict[str, dict[str, float]]:
    """R@K in percent for image->text (hit if ANY of the image's texts is in the top K) and text->image
    (hit if the text's own image is in the top K). image_emb [N, D], text_emb [M, D], text_image [M]
    (index of each text's image). Scores are dot products; ties rank in index order (stable sort)."""
    if text_emb.shape[0] != text_image.shape[0]:
        raise ValueError(f"{text_emb.shape[0]} texts but {text_image.shape[0]} text_image entries")
    scores = image_emb.float() @ text_emb.float().T  # [N, M]
    positive = text_image[None, :] == torch.arange(len(image_emb))[:, None]  # [N, M]
    if not positive.any(dim=1).all():
        raise ValueError("every image needs at least one text in text_image")
    # 0-based rank of the best-ranked positive of each image, and of each text's own image
    order = torch.argsort(scores, dim=1, descending=True, stable=True)
    image_rank = torch.gather(positive, 1, order).float().argmax(dim=1)
    order = torch.argsort(scores.T, dim=1, descending=True, stable=True)
    text_rank = (order == text_image[:, None]).float().argmax(dim=1)
    return {name: {f"R@{k}": 100.0 * (rank < k).float().mean().item() for k in ks}
            for name, rank in (("image_to_text", image_rank), ("text_to_image", text_rank))}


def evaluate_teacher(model: open_clip.CLIP, test: list[tuple[str, list[str]]]) -> dict[str, dict[str, float]]:
    """Retrieval R@K (percent) of the model on (image path, its captions) pairs; see retrieval_recall."""
    _check_pairs(test, "test")
    preprocess = image_transform_v2(PreprocessCfg(**model.visual.preprocess_cfg), is_train=False)
    images = load_images([path for path, _ in test], preprocess)
    captions = [caption for _, texts in test for caption in texts]
    text_image = torch.tensor([i for i, (_, texts) in enumerate(test) for _ in texts])
    tokens = open_clip.tokenize(captions, context_length=model.context_length)  # what get_tokenizer gives
    image_emb, text_emb = embed(model.eval(), images, tokens)
    return retrieval_recall(image_emb, text_emb, text_image)


def _check_out_dir(out_dir: Path) -> None:
    # Replacing a previous teacher is fine; silently deleting some other folder is not.
    foreign = out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / CONFIG_FILE).is_file()
    if foreign or (out_dir.exists() and not out_dir.is_dir()):
        raise ValueError(f"{out_dir} exists and is not a teacher folder (no {CONFIG_FILE}); "
                         f"choose another out_dir or remove it")


def save_teacher(model: open_clip.CLIP, out_dir: str | Path, metrics: dict,
                 model_name: str = DEFAULT_MODEL) -> Path:
    """Write the open_clip model folder (config, safetensors weights, metrics.json) atomically: it is built
    in a temporary folder next to out_dir and renamed when complete; a previous teacher there is replaced."""
    out_dir = Path(out_dir)
    _check_out_dir(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    model_cfg = deepcopy(MODEL_CFGS[model_name])
    size = model.visual.image_size  # an int for the ResNet, a pair for the ViT
    model_cfg["vision_cfg"]["image_size"] = size if isinstance(size, int) else size[0]
    preprocess_cfg = {key: (list(value) if isinstance(value, tuple) else value)
                      for key, value in model.visual.preprocess_cfg.items()}
    # mkdir (not mkdtemp, which makes the folder private to its owner) so the teacher is as readable as
    # any other file the user writes.
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}-{time.time_ns()}")
    tmp.mkdir()
    old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
    try:
        (tmp / CONFIG_FILE).write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg},
                                                  indent=2))
        save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, tmp / WEIGHTS_FILE)
        # safetensors creates the file owner-only; give it the mode (umask) of the files written beside it
        os.chmod(tmp / WEIGHTS_FILE, (tmp / CONFIG_FILE).stat().st_mode & 0o777)
        (tmp / METRICS_FILE).write_text(json.dumps(metrics, indent=2))
        if out_dir.exists():
            out_dir.rename(old)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
    return out_dir


def fit_teacher(train: list[tuple[str, list[str]]], test: list[tuple[str, list[str]]], out_dir: str | Path,
                cfg: TeacherConfig = TeacherConfig()) -> dict:
    """Fit the teacher on `train` (image path, its captions + short attribute texts), measure retrieval on
    `test` (image path, its captions) and save the "local-dir:" folder out_dir. Returns the metrics saved
    in out_dir/metrics.json (R@K in percent, seconds of wall-clock time for loading, training, testing)."""
    out_dir = Path(out_dir)
    _check_out_dir(out_dir)  # fail before minutes of training, not after
    _check_pairs(test, "test")
    for path, _ in train + test:
        _require_file(path)
    start = time.perf_counter()
    model, losses = train_teacher(train, cfg)
    with _torch_threads(cfg.threads):
        recall = evaluate_teacher(model, test)
    head, tail = losses[:10], losses[-10:]
    metrics = {
        **recall,
        "steps": cfg.steps,
        "seconds": round(time.perf_counter() - start, 2),
        "train_images": len(train),
        "train_texts": sum(len(texts) for _, texts in train),
        "test_images": len(test),
        "test_captions": sum(len(texts) for _, texts in test),
        "train_loss": {"first10": sum(head) / len(head), "last10": sum(tail) / len(tail)},
        "model": cfg.model,
        "open_clip_version": open_clip.__version__,
        "config": asdict(cfg),
    }
    save_teacher(model, out_dir, metrics, cfg.model)
    i2t, t2i = metrics["image_to_text"], metrics["text_to_image"]
    print(f"teacher: {len(train)} train images, {cfg.steps} steps in {metrics['seconds']:.0f} s; test "
          f"image->text R@1/5/10 {i2t['R@1']:.0f}/{i2t['R@5']:.0f}/{i2t['R@10']:.0f}, text->image "
          f"{t2i['R@1']:.0f}/{t2i['R@5']:.0f}/{t2i['R@10']:.0f} -> {out_dir}")
    return metrics
