"""The training loop: features -> encoder -> normalise -> logits against the batch's images -> loss.

Reads only the cache. One process per GPU under torchrun (DistributedDataParallel, embeddings gathered so
the loss sees the global batch); a plain `python cli.py train` is one process on one device. `fit_step` is
the one optimisation step and `advance` the one loop body, used by `train` and by the throughput benchmark.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import distributed as dist

from cache.manifest import atomic_write_json, atomic_write_text, read_manifest
from trainer.augment import spec_augment
from trainer.checkpoint import (cache_identity, check_same_cache, load_checkpoint, rng_state, save_checkpoint,
                                set_rng_state)
from trainer.config import CUDAGRAPH_MODES, ENCODER_FIELDS, TrainConfig
from trainer.data import COMPILE_BUCKET, Batch, MemoryBatches, load_keywords, load_split
from trainer.distributed import world_info
from trainer.evaluate import dev_metrics
from trainer.loss import ImagesAsClassesLoss
from trainer.model import CnnTransformer, EncoderConfig, conv_stack
from trainer.plots import plot_curves, read_log
from trainer.precision import autocast, pick_device
from trainer.sampler import check_batch_size
from trainer.schedule import run_lr


def encoder_config(cfg: TrainConfig, input_dim: int, out_dim: int) -> EncoderConfig:
    return EncoderConfig(input_dim=input_dim, out_dim=out_dim, conv=conv_stack(cfg.conv_channels, cfg.width),
                         **{k: getattr(cfg, k) for k in ENCODER_FIELDS})


def param_groups(model: torch.nn.Module, loss_fn: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices and conv kernels only; none on biases, norm gains or the temperature."""
    decay, no_decay = [], []
    for p in model.parameters():
        (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay + list(loss_fn.parameters()), "weight_decay": 0.0}]


@dataclass
class Run:
    """Everything one training process steps: built by `build_run`, advanced by `advance`."""
    cfg: TrainConfig
    device: torch.device
    rank: int
    world: int
    encoder: EncoderConfig
    model: CnnTransformer             # the plain module (eval, checkpoints)
    forward: torch.nn.Module          # what the step calls: the model, or its DDP / compiled wrapper
    loss_fn: ImagesAsClassesLoss
    optimizer: torch.optim.Optimizer
    source: object                    # MemoryBatches or stream.StreamBatches: next(step) -> Batch
    generator: torch.Generator        # SpecAugment's draws, on the device
    step: int = 0                     # optimiser steps done
    shapes: set = field(default_factory=set)   # with --compile: the (batch, frames) shapes compiled so far


def build_run(cfg: TrainConfig, rank: int = 0, world: int = 1, device: torch.device | None = None) -> Run:
    """Loads the train split (memory mode: all of it onto `device`) and builds model, loss and optimiser."""
    device = device or pick_device(cfg.device)
    schedule = cfg.batch_sizes()
    for _, size in schedule:
        if size % world:
            raise ValueError(f"batch size {size} is not divisible by the {world} processes: choose batch "
                             f"sizes that are multiples of {world}")
    stream = cfg.data_mode == "stream"
    data = load_split(cfg.cache, "train", device, features=not stream)
    if len(data) < 2:
        raise ValueError(f"{cfg.cache}: {len(data)} usable training utterances; the loss needs a batch of at "
                         "least 2")
    multiple = COMPILE_BUCKET if cfg.compile else 1
    if stream:
        from trainer.stream import StreamBatches
        source = StreamBatches(data, cfg.cache, schedule, cfg.seed, rank, world, cfg.workers,
                               cfg.stream_buffer, cfg.max_frames, device, multiple, cfg.one_caption_per_image,
                               cfg.bucket)
    else:
        source = MemoryBatches(data, schedule, cfg.seed, rank, world, cfg.max_frames, cfg.bucket,
                               cfg.one_caption_per_image, multiple)
    for _, size in schedule:   # before any reader starts or a progress bar is drawn
        check_batch_size(size, len(data.image_ids), len(data), cfg.one_caption_per_image)

    torch.manual_seed(cfg.seed)      # the same initial weights in every process
    enc = encoder_config(cfg, data.dims, data.embed_dim)
    model = CnnTransformer(enc).to(device)
    torch.manual_seed(cfg.seed + rank)   # dropout masks of their own in each process
    loss_fn = ImagesAsClassesLoss(targets=cfg.targets, symmetric=cfg.symmetric).to(device)
    optimizer = torch.optim.AdamW(param_groups(model, loss_fn, cfg.weight_decay), lr=cfg.lr,
                                  fused=device.type == "cuda")
    forward: torch.nn.Module = model
    if world > 1:
        forward = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        # one static graph per (batch size, 128-frame bucket): dynamic shapes failed at 1,024 frames
        # (REFERENCE.md §6); allow every bucket of every scheduled batch size
        limit = len(schedule) * (cfg.max_frames // COMPILE_BUCKET + 1) + 8
        config = torch._dynamo.config
        for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit",
                     "accumulated_cache_size_limit"):
            if hasattr(config, name):
                setattr(config, name, max(getattr(config, name), limit))
        forward = torch.compile(forward, dynamic=False,
                                mode=None if cfg.compile_mode == "default" else cfg.compile_mode)
    generator = torch.Generator(device=device).manual_seed(cfg.seed + rank)
    return Run(cfg, device, rank, world, enc, model, forward, loss_fn, optimizer, source, generator)


def fit_step(run: Run, batch: Batch) -> torch.Tensor:
    """One optimisation step on `batch`; returns the loss (detached, on the device: no sync)."""
    feats = batch.feats
    if run.cfg.compile_mode in CUDAGRAPH_MODES:   # TrainConfig refuses them without compile
        # CUDA graphs (reduce-overhead, max-autotune) reuse their output memory: a new step begins here
        torch.compiler.cudagraph_mark_step_begin()
    if run.cfg.spec_augment:
        feats = spec_augment(feats, batch.lengths, run.generator)
    with autocast(run.device, run.cfg.cpu_bf16):
        audio = run.forward(feats, batch.lengths)
    losses = run.loss_fn(audio, batch.images, batch.texts)   # normalised, logits and loss in fp32
    run.optimizer.zero_grad(set_to_none=True)
    losses["loss"].backward()
    if run.cfg.grad_clip:
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), run.cfg.grad_clip)
    run.optimizer.step()
    run.loss_fn.clamp_()
    return losses["loss"].detach()


def advance(run: Run) -> tuple[torch.Tensor, int]:
    """The loop body: learning rate of the step, next batch, `fit_step`. -> (loss on the device, global
    batch size)."""
    cfg = run.cfg
    lr = run_lr(run.step, cfg.lr, cfg.warmup, cfg.steps)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    batch = run.source.next(run.step)
    shape = tuple(batch.feats.shape[:2])
    if cfg.compile and shape not in run.shapes:
        _note_compile(run, shape)
    loss = fit_step(run, batch)
    run.step += 1
    return loss, batch.size


def _note_compile(run: Run, shape: tuple[int, int]) -> None:
    """Says why this step is slow: the first batch of a length bucket compiles (and with CUDA graphs records)
    the step for its shape, which takes 25-37 s on an H200 (docs/benchmarks.md), while the bar's rate drops."""
    run.shapes.add(shape)
    if run.rank == 0:
        from tqdm import tqdm
        tqdm.write(f"train: step {run.step + 1} compiles for batches of {shape[0]} x {shape[1]} frames, the first "
                   f"of its {COMPILE_BUCKET}-frame bucket (shape {len(run.shapes)}; tens of seconds each)",
                   file=sys.stderr)


# ----------------------------------------------------------------------------------------------------
# Processes, logs, checkpoints


def _init_distributed(device_name: str) -> tuple[int, int, torch.device]:
    """(rank, world_size, device); initialises the process group when launched by torchrun: NCCL when the
    run's device is a GPU (each process on cuda:LOCAL_RANK), gloo when it is the CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if world > 1 and device_name.startswith("cuda:"):
        raise ValueError(f"--device {device_name} under torchrun would put all {world} processes on one GPU; "
                         "use --device cuda (or auto): each process takes cuda:LOCAL_RANK")
    device = pick_device(device_name, local_rank)
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank, world = world_info()
    return rank, world, device


def _per_rank(obj, world: int) -> list:
    """Every rank's `obj` (on every rank): the checkpoint keeps each process's RNG and stream state."""
    if world == 1:
        return [obj]
    gathered = [None] * world
    dist.all_gather_object(gathered, obj)
    return gathered


def _log(path: Path, record: dict, tb=None) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
    if tb is not None:
        for k, v in record.items():
            if k not in ("step", "elapsed_s") and isinstance(v, (int, float)):   # TensorBoard keeps wall time
                tb.add_scalar(k, v, record["step"])


def _truncate_log(path: Path, step: int) -> None:
    """On resume, forget what a crashed run logged after its last checkpoint."""
    if path.is_file():   # a torn last line (the crash) is dropped with the rest
        keep = [record for record in read_log(path)[0] if record["step"] <= step]
        atomic_write_text(path, "".join(json.dumps(record) + "\n" for record in keep))


def _tensorboard(out: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(out / "tensorboard"))


# what the run learns with (the model's settings are checked apart): changing one on --resume is allowed
# (e.g. a lower lr to finish) but said, as config.json is rewritten with the new values
RECIPE_FIELDS = ("symmetric", "targets", "one_caption_per_image", "batch_size", "batch_schedule", "lr",
                 "weight_decay", "warmup", "grad_clip", "spec_augment", "bucket", "seed", "best_metric", "cpu_bf16")


# how the run goes rather than what it learns: a resume takes the new value without a word (a stream position
# under other readers is not restored: _restore says so)
OPERATIONAL_FIELDS = ("compile", "compile_mode", "eval_batch_size", "eval_every", "log_every", "save_every",
                      "workers", "stream_buffer")
# the rest is checked apart: the model's fields (refused when they differ), data_mode and preset (refused),
# steps (a notice of its own); the invocation's fields are never taken from the run (config.INVOCATION_FIELDS)
CHECKED_APART = ("data_mode", "preset", "steps")


def _resume_notices(cfg: TrainConfig, state: dict, last: Path) -> list[str]:
    """What a user should know before a resumed run goes on: changed settings, nothing left to train."""
    before = state["config"]
    changed = [f"{k} {before[k]!r} -> {getattr(cfg, k)!r}" for k in RECIPE_FIELDS
               if k in before and before[k] != getattr(cfg, k)]
    notes = []
    if changed:
        notes.append(f"--resume: {last} was trained with other settings; from step {state['step']} on, "
                     f"{', '.join(changed)}")
    before_steps = before.get("steps", cfg.steps)
    if before_steps != cfg.steps and state["step"] < cfg.steps:   # the cosine is stretched to the new length
        at = state["step"]
        old_lr = run_lr(at, before.get("lr", cfg.lr), before.get("warmup", cfg.warmup), before_steps)
        new_lr = run_lr(at, cfg.lr, cfg.warmup, cfg.steps)
        notes.append(f"--resume: steps {before_steps} -> {cfg.steps}: the learning-rate schedule now decays over "
                     f"{cfg.steps} steps; at step {at} it is {new_lr:.3g} (it was {old_lr:.3g})")
    if state["step"] >= cfg.steps:
        notes.append(f"--resume: {last} is at step {state['step']}, --steps is {cfg.steps}: nothing to train; "
                     "raise --steps to continue the run")
    return notes


def _restore(run: Run, state: dict, last: Path) -> dict:
    """Loads a checkpoint's states into `run`; returns its `best` record."""
    ours, theirs = run.encoder.to_dict(), state["encoder"]
    if theirs != ours:
        diff = ", ".join(f"{k} {theirs.get(k)!r} -> {ours.get(k)!r}" for k in sorted(ours.keys() | theirs.keys())
                         if theirs.get(k) != ours.get(k))
        raise ValueError(f"{last}: its model settings differ from this run's ({diff}); resume without the model "
                         "options (they are taken from the run's config.json), or start a new run (another --out)")
    if state["config"].get("data_mode", "memory") != run.cfg.data_mode:
        raise ValueError(f"{last} was trained with --data-mode {state['config'].get('data_mode')}; resume "
                         "with the same data mode")
    run.model.load_state_dict(state["model"])
    run.loss_fn.load_state_dict(state["loss"])
    decay = [group["weight_decay"] for group in run.optimizer.param_groups]
    run.optimizer.load_state_dict(state["optimizer"])
    for group, value in zip(run.optimizer.param_groups, decay):   # this run's --weight-decay, not the saved one
        group["weight_decay"] = value                               # (lr is set at every step)
    run.step = state["step"]
    ranks = state["ranks"]
    mine = ranks[run.rank] if len(ranks) == run.world else None
    if run.cfg.data_mode == "memory":
        run.source.load_state_dict(ranks[0]["data"])    # one global sampler, the same in every process
        exact = mine is not None
    else:
        exact = mine is not None and run.source.load_state_dict(mine["data"], run.step)
        if mine is None:
            run.source.reshuffle(run.step)
    if mine is not None:
        set_rng_state(mine["rng"], run.generator, run.device)
    else:   # another number of processes: fresh random streams, seeded by the step
        torch.manual_seed(run.cfg.seed + run.rank + 7919 * run.step)
        run.generator.manual_seed(run.cfg.seed + run.rank + 7919 * run.step)
    if not exact and run.rank == 0:
        fresh = "random draws (dropout, SpecAugment)" if run.cfg.data_mode == "memory" else \
            "random draws and the stream's order"
        other = " (or other stream readers, or another batch size, --stream-buffer or --seed)" \
            if run.cfg.data_mode == "stream" else ""
        print(f"--resume: {last} was written by {len(ranks)} process(es){other}: model, optimiser and schedule "
              f"continue exactly, the {fresh} start afresh")
    return state["best"]


# a scheduler's notice (Slurm: SIGTERM, or --signal=USR1), and Ctrl-C (a second one aborts without saving)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


@contextlib.contextmanager
def _stop_requests():
    """A dict whose "signal" is set when SIGTERM, SIGUSR1 or SIGINT arrives while the loop runs, so that the loop can
    write last.pt at the end of its step and return, instead of dying with up to save_every steps unsaved.
    Only the main thread of a process can take signals; elsewhere nothing is installed."""
    request = {"signal": None}
    if threading.current_thread() is not threading.main_thread():
        yield request
        return

    def note(signum, frame):
        if signum == signal.SIGINT:
            if request["signal"] is not None:
                raise KeyboardInterrupt
            print("\ntrain: Ctrl-C: ending this step and writing last.pt (Ctrl-C again to stop without saving)",
                  file=sys.stderr)
        request["signal"] = signum

    previous = {s: signal.signal(s, note) for s in STOP_SIGNALS}
    try:
        yield request
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _stop_now(request: dict, step: int, log_every: int, world: int, device: torch.device) -> bool:
    """Whether every process stops after this step: at once in one process; with several, the processes
    agree at log steps (one all-reduce per log_every steps), as they must stop at the same step."""
    if world == 1:
        return request["signal"] is not None
    if step % log_every:
        return False
    flag = torch.tensor([request["signal"] is not None], dtype=torch.int32, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def train(cfg: TrainConfig) -> dict:
    """Trains until cfg.steps, cfg.stop_after more steps or a SIGTERM/SIGUSR1 (which writes last.pt first);
    returns {"step", "best", "dev", "stopped": the signal's name or None, "signal": its number (None when
    not stopped, or stopped because another process got the signal)}."""
    from tqdm import tqdm
    rank, world, device = _init_distributed(cfg.device)
    main = rank == 0
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out, cache = Path(cfg.out), Path(cfg.cache)
    last = out / "last.pt"
    if last.exists() and not cfg.resume:
        raise ValueError(f"{out} already holds a run (last.pt): pass --resume to continue it, or choose "
                         "another --out")

    # ---- data, model, optimiser; the dev split and keyword prompts for validation
    manifest = read_manifest(cache)
    # on the CPU: RNG states must stay CPU tensors; load_state_dict moves weights and optimiser state
    state = load_checkpoint(last) if cfg.resume and last.exists() else None
    if state is not None:   # first: a run is only worth resuming on the embeddings it was trained against
        check_same_cache(manifest, state, last, cache, "resume it on the cache it was trained on, or start a "
                         "new run (another --out)")
    run = build_run(cfg, rank, world, device)
    dev = load_split(cache, "dev", device) if main else None
    dev = dev if dev is not None and len(dev) > 1 else None
    try:
        keywords = load_keywords(cache, device)
    except FileNotFoundError:
        keywords = None
    metric = cfg.best_metric
    if metric == "keyword_mAP" and keywords is None:
        metric = "audio_to_image_R@10"   # no keyword prompts in this cache: the next best default
    best = {"metric": metric, "value": None, "step": None}
    window = {"loss": 0.0, "n": 0}        # the log window's losses so far (a resumed run continues it)
    elapsed = 0.0                         # wall seconds of the loop in earlier invocations of this run
    if state is not None:
        restored, window = _restore(run, state, last), state.get("window", window)
        if main:
            for note in _resume_notices(cfg, state, last):
                print(note)
        if restored["metric"] == metric and (restored["value"] is None or (out / "best.pt").is_file()):
            best = restored
        elif restored["metric"] == metric:   # e.g. a run folder copied with last.pt alone
            if main:
                print(f"--resume: no {out / 'best.pt'} (it held step {restored['step']}): the next validation "
                      "chooses it afresh, until then it holds the newest weights")
        elif main and restored["value"] is not None:   # values of two metrics do not compare
            print(f"--resume: best.pt was chosen by {restored['metric']} ({restored['value']:.2f} at step "
                  f"{restored['step']}); from now on by {metric}: the next validation replaces it")
        elapsed = state.get("elapsed_s", 0.0)
    elif cfg.resume and main:
        print(f"--resume: no {last} yet, starting a fresh run")

    log_path = out / "metrics.jsonl"
    if main:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / "config.json", cfg.to_dict())
        if run.step:
            _truncate_log(log_path, run.step)
        elif log_path.exists():
            log_path.unlink()
    tb = _tensorboard(out) if main else None
    identity = cache_identity(manifest)

    def weights(path: Path, **resume_state) -> None:
        """best.pt (the model, for evaluation) or, with `resume_state`, last.pt (all that --resume needs)."""
        save_checkpoint(path, {"model": run.model.state_dict(), "encoder": run.encoder.to_dict(),
                               "config": cfg.to_dict(), "step": run.step, "best": best, "cache": identity,
                               **resume_state})

    def checkpoint(window_loss: float, window_n: int) -> None:
        ranks = _per_rank({"rng": rng_state(run.generator, run.device), "data": run.source.state_dict()}, world)
        if main:
            weights(last, loss=run.loss_fn.state_dict(), optimizer=run.optimizer.state_dict(), ranks=ranks,
                    window={"loss": window_loss, "n": window_n}, elapsed_s=elapsed_s())

    # ---- the loop
    end = cfg.steps if not cfg.stop_after else min(cfg.steps, run.step + cfg.stop_after)
    # in a log file (cluster jobs), a line every 30 s rather than a redraw at every step
    bar = tqdm(total=cfg.steps, initial=run.step, unit="step", desc="train",
               disable=not (main and cfg.progress), mininterval=0.1 if sys.stderr.isatty() else 30.0)
    window_loss = torch.tensor(window["loss"], dtype=torch.float32, device=device)  # summed on the device
    window_n, window_utt, window_t, paused = window["n"], 0, time.perf_counter(), 0.0
    last_eval: dict = {}
    loop_start = time.perf_counter()
    stopped = None

    def elapsed_s() -> float:
        """Wall seconds of training so far, resumed invocations included (validation and checkpoints too)."""
        return elapsed + time.perf_counter() - loop_start

    run.model.train()
    try:
        with _stop_requests() as request:
            while run.step < end:
                loss, size = advance(run)
                step = run.step
                window_loss += loss
                window_n, window_utt = window_n + 1, window_utt + size

                if main and (step % cfg.log_every == 0 or step == 1 or step == cfg.steps):
                    seconds = time.perf_counter() - window_t - paused
                    record = {"step": step, "loss": float(window_loss) / window_n,
                              "lr": run.optimizer.param_groups[0]["lr"],
                              "temperature": float(run.loss_fn.logit_scale.detach().exp()), "batch_size": size,
                              "utt_per_s": window_utt / seconds, "elapsed_s": elapsed_s()}
                    _log(log_path, record, tb)
                    bar.set_postfix(loss=f"{record['loss']:.3f}", t=f"{record['temperature']:.1f}",
                                    utt_s=f"{record['utt_per_s']:.0f}")
                    window_loss.zero_()
                    window_n, window_utt, window_t, paused = 0, 0, time.perf_counter(), 0.0
                bar.update(1)

                pause = time.perf_counter()   # validation and checkpoints do not count in utterances/s
                # decided before validation: a scheduler waits ~30 s after its notice, a dev pass may not fit
                stop = _stop_now(request, step, cfg.log_every, world, device) and step < cfg.steps
                if cfg.eval_every and (step % cfg.eval_every == 0 or step == cfg.steps) and not stop:
                    if dev is not None:
                        last_eval = dev_metrics(run.model, dev, keywords, cfg.eval_batch_size, cfg.max_frames)
                        _log(log_path, {"step": step, **{f"dev/{k}": v for k, v in last_eval.items()}}, tb)
                        value = _metric(last_eval, metric, train_loss=float(loss))
                        if best["value"] is None or value > best["value"]:
                            best = {"metric": metric, "value": value, "step": step}
                            weights(out / "best.pt")
                    if world > 1:
                        dist.barrier()
                if step % cfg.save_every == 0 or step == end or stop:
                    checkpoint(float(window_loss), window_n)
                paused += time.perf_counter() - pause
                if stop:
                    stopped = signal.Signals(request["signal"]).name if request["signal"] else \
                        "a stop signal to another process"
                    break
    finally:
        bar.close()
        run.source.close()
    if stopped and main:
        print(f"train: {stopped} received; stopped after step {run.step} with {last} written: run the same "
              "command with --resume to continue", file=sys.stderr)
    if main:
        if best["value"] is None:
            weights(out / "best.pt")   # nothing to choose by (yet): the last weights are the best we know
        plot_curves(log_path, out / "curves.png")
    if tb is not None:
        tb.close()
    return {"step": run.step, "best": best, "dev": last_eval, "stopped": stopped,
            "signal": request["signal"] if stopped else None}


def _metric(results: dict, name: str, train_loss: float) -> float:
    """Larger is better for every selectable metric (the training loss is negated)."""
    value = -train_loss if name == "loss" else results[name]
    return value if math.isfinite(value) else float("-inf")
