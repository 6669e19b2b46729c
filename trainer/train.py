"""The training loop: features -> encoder -> normalise -> logits against the batch's images -> loss.

Reads only the cache. One process per GPU under torchrun (DistributedDataParallel, embeddings gathered so
the loss sees the global batch); a plain `python cli.py train` is one process on one device.
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
from torch import distributed as dist

from cache.manifest import atomic_write_json, atomic_write_text, read_manifest
from trainer.augment import spec_augment
from trainer.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from trainer.config import ENCODER_FIELDS, TrainConfig
from trainer.data import load_keywords, load_split
from trainer.distributed import world_info
from trainer.evaluate import dev_metrics
from trainer.loss import ImagesAsClassesLoss
from trainer.model import CnnTransformer, EncoderConfig
from trainer.plots import plot_curves
from trainer.precision import autocast, pick_device
from trainer.sampler import LengthBucketBatchSampler, local_slice
from trainer.schedule import batch_size_at, lr_at, parse_batch_schedule


def encoder_config(cfg: TrainConfig, input_dim: int, out_dim: int) -> EncoderConfig:
    return EncoderConfig(input_dim=input_dim, out_dim=out_dim, **{k: getattr(cfg, k) for k in ENCODER_FIELDS})


def param_groups(model: torch.nn.Module, loss_fn: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices and conv kernels only; none on biases, norm gains or the temperature."""
    decay, no_decay = [], []
    for p in model.parameters():
        (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay + list(loss_fn.parameters()), "weight_decay": 0.0}]


def _init_distributed() -> tuple[int, int, int]:
    """(rank, world_size, local_rank); initialises the process group when launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank, world = world_info()
    return rank, world, int(os.environ.get("LOCAL_RANK", "0"))


def _log(path: Path, record: dict, tb=None) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
    if tb is not None:
        for k, v in record.items():
            if k != "step" and isinstance(v, (int, float)):
                tb.add_scalar(k, v, record["step"])


def _truncate_log(path: Path, step: int) -> None:
    """On resume, forget what a crashed run logged after its last checkpoint."""
    if path.is_file():
        keep = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        atomic_write_text(path, "".join(line + "\n" for line in keep))


def _tensorboard(out: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(out / "tensorboard"))


def train(cfg: TrainConfig) -> dict:
    """Trains until cfg.steps (or cfg.stop_after more steps); returns the last dev metrics."""
    from tqdm import tqdm
    rank, world, local_rank = _init_distributed()
    main = rank == 0
    device = pick_device(cfg.device, local_rank)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out, cache = Path(cfg.out), Path(cfg.cache)
    last = out / "last.pt"
    if last.exists() and not cfg.resume:
        raise ValueError(f"{out} already holds a run (last.pt): pass --resume to continue it, or another --out")
    if cfg.batch_size % world and not cfg.batch_schedule:
        raise ValueError(f"--batch-size {cfg.batch_size} is not divisible by the {world} processes")

    # ---- data: everything the loop touches, loaded once onto the device
    manifest = read_manifest(cache)
    data = load_split(cache, "train", device)
    if len(data) < 2:
        raise ValueError(f"{cache}: {len(data)} usable training utterances; the loss needs a batch of at least 2")
    dev = load_split(cache, "dev", device) if cfg.eval_every else None
    dev = dev if dev is not None and len(dev) > 1 else None
    try:
        keywords = load_keywords(cache, device)
    except FileNotFoundError:
        keywords = None

    # ---- model, loss, optimiser, sampler
    torch.manual_seed(cfg.seed)
    enc = encoder_config(cfg, data.dims, data.embed_dim)
    model = CnnTransformer(enc).to(device)
    loss_fn = ImagesAsClassesLoss(targets=cfg.targets, symmetric=cfg.symmetric).to(device)
    optimizer = torch.optim.AdamW(param_groups(model, loss_fn, cfg.weight_decay), lr=cfg.lr,
                                  fused=device.type == "cuda")
    # unbucketed = equal lengths, so the jittered sort is a plain shuffle
    lengths = data.lengths.cpu().numpy() if cfg.bucket else np.ones(len(data))
    sampler = LengthBucketBatchSampler(lengths, [data.image_ids[i] for i in data.image_index.tolist()], cfg.seed,
                                       one_caption_per_image=cfg.one_caption_per_image)
    schedule = parse_batch_schedule(cfg.batch_schedule or str(cfg.batch_size))
    generator = torch.Generator(device=device).manual_seed(cfg.seed + rank)
    forward = torch.compile(model, dynamic=True) if cfg.compile else model
    if world > 1:
        forward = torch.nn.parallel.DistributedDataParallel(
            forward, device_ids=[device.index] if device.type == "cuda" else None)

    step, best = 0, {"metric": cfg.best_metric, "value": None, "step": None}
    if cfg.resume and last.exists():
        state = load_checkpoint(last, map_location=device)
        if state["encoder"] != enc.to_dict():
            raise ValueError(f"{last}: its model settings differ from this run's; resume with the same settings")
        model.load_state_dict(state["model"])
        loss_fn.load_state_dict(state["loss"])
        optimizer.load_state_dict(state["optimizer"])
        sampler.load_state_dict(state["sampler"])
        set_rng_state(state["rng"], generator)
        step, best = state["step"], state["best"]
    elif cfg.resume and main:
        print(f"--resume: no {last} yet, starting a fresh run")

    log_path = out / "metrics.jsonl"
    if main:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / "config.json", cfg.to_dict())
        if step:
            _truncate_log(log_path, step)
        elif log_path.exists():
            log_path.unlink()
    tb = _tensorboard(out) if main else None
    identity = {"features": manifest.get("audio", {}).get("features"), "clip": manifest.get("clip")}

    def checkpoint(path: Path) -> None:
        save_checkpoint(path, {"model": model.state_dict(), "encoder": enc.to_dict(), "config": cfg.to_dict(),
                               "loss": loss_fn.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                               "sampler": sampler.state_dict(), "rng": rng_state(generator), "best": best,
                               "cache": identity})

    # ---- the loop
    end = cfg.steps if not cfg.stop_after else min(cfg.steps, step + cfg.stop_after)
    bar = tqdm(total=cfg.steps, initial=step, unit="step", desc="train", disable=not (main and cfg.progress))
    window_loss, window_n, window_utt, window_t = 0.0, 0, 0, time.perf_counter()
    last_eval: dict = {}
    model.train()
    while step < end:
        lr = lr_at(step + 1, cfg.lr, min(cfg.warmup, cfg.steps), cfg.steps)   # step 0 at lr 0 is wasted
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = sampler.next_batch(batch_size_at(step, schedule))
        idx = torch.from_numpy(local_slice(batch, rank, world)).to(device)
        feats, lens = data.batch(idx, cfg.max_frames)
        if cfg.spec_augment:
            feats = spec_augment(feats, lens, generator)
        with autocast(device):
            audio = forward(feats, lens)
        losses = loss_fn(audio, data.images[data.image_index[idx]], data.texts[idx])
        optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        loss_fn.clamp_()
        step += 1
        window_loss += losses["loss"].detach()   # summed on the device: no sync per step
        window_n += 1
        window_utt += len(batch)

        if main and (step % cfg.log_every == 0 or step == 1 or step == end):
            seconds = time.perf_counter() - window_t
            record = {"step": step, "loss": float(window_loss) / window_n, "lr": lr,
                      "temperature": float(loss_fn.logit_scale.exp()), "batch_size": len(batch),
                      "utt_per_s": window_utt / seconds}
            _log(log_path, record, tb)
            bar.set_postfix(loss=f"{record['loss']:.3f}", t=f"{record['temperature']:.1f}",
                            utt_s=f"{record['utt_per_s']:.0f}")
            window_loss, window_n, window_utt, window_t = 0.0, 0, 0, time.perf_counter()
        bar.update(1)

        if dev is not None and (step % cfg.eval_every == 0 or step == cfg.steps):
            if main:
                last_eval = dev_metrics(model, dev, keywords, cfg.eval_batch_size, cfg.max_frames)
                _log(log_path, {"step": step, **{f"dev/{k}": v for k, v in last_eval.items()}}, tb)
                value = _metric(last_eval, cfg.best_metric, record_loss=float(losses["loss"]))
                if best["value"] is None or value > best["value"]:
                    best = {"metric": cfg.best_metric, "value": value, "step": step}
                    checkpoint(out / "best.pt")
            if world > 1:
                dist.barrier()
        if main and (step % cfg.save_every == 0 or step == end):
            checkpoint(last)
    bar.close()
    if main:
        if dev is None and not (out / "best.pt").exists():
            checkpoint(out / "best.pt")   # nothing to choose by: the last weights are the best we know
        plot_curves(log_path, out / "curves.png")
    if tb is not None:
        tb.close()
    return {"step": step, "best": best, "dev": last_eval}


def _metric(results: dict, name: str, record_loss: float) -> float:
    """Larger is better for every selectable metric (the loss is negated)."""
    if name == "loss":
        return -record_loss
    if name == "keyword_mAP" and "keyword_mAP" not in results:
        name = "audio_to_image_R@10"
    value = results[name]
    return value if math.isfinite(value) else float("-inf")
