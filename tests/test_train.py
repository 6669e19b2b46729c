"""The training stage on the shared tiny cache (tests/conftest.py): it starts at chance and learns, keeps one
caption per image in the batches the loop uses, resumes exactly (memory and stream data), matches one
process with two DDP processes, resolves its config in order, and fails clearly through the CLI."""
from __future__ import annotations

import json
import logging
import math
import re
import shutil
import multiprocessing as mp
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from cli import main as cli_main
from cache.reader import StoreReader
from trainer.checkpoint import load_checkpoint, load_encoder
from trainer.config import PRESETS, TrainConfig, resolve_config
from trainer.data import MemoryBatches, load_split
from trainer.loss import ImagesAsClassesLoss
from trainer.precision import autocast, cpu_has_native_bf16
from trainer.stream import StreamBatches, pass_batches
from trainer.train import train

from runs import TINY, logged_losses, tiny_config

LEARN = dict(steps=60, eval_every=30, save_every=30)


def _record_batches(monkeypatch) -> list[torch.Tensor]:
    """The image embeddings of every batch the training loop hands to the loss, as the loop used them."""
    seen: list[torch.Tensor] = []
    forward = ImagesAsClassesLoss.forward

    def recording(self, audio, image, text=None):
        seen.append(image.detach().cpu().clone())
        return forward(self, audio, image, text)

    monkeypatch.setattr(ImagesAsClassesLoss, "forward", recording)
    return seen


@pytest.fixture()
def batch_images(monkeypatch) -> list[torch.Tensor]:
    return _record_batches(monkeypatch)


def _assert_distinct_images(batches: list[torch.Tensor], cache: Path) -> None:
    images = load_split(cache, "train", features=False).images
    assert torch.cdist(images, images).add(torch.eye(len(images))).min() > 1e-3  # the fixture's promise
    for rows in batches:
        nearest = torch.cdist(rows, images).argmin(dim=1)
        assert torch.allclose(images[nearest], rows)          # every row is one of the split's images
        assert len(set(nearest.tolist())) == len(rows), "two captions of one image in a batch"


# ----------------------------------------------------------------------------------------------------
# A fresh run: chance level, learning, what RUN_DIR holds, one caption per image


@pytest.fixture(scope="module")
def learned(tiny_cache, tmp_path_factory):
    """One 60-step run with dev evaluation every 30 steps, and the image rows of each of its batches."""
    out = tmp_path_factory.mktemp("learned") / "run"
    with pytest.MonkeyPatch.context() as patch:
        seen = _record_batches(patch)
        result = train(tiny_config(tiny_cache, out, **LEARN))
    return out, result, seen


def test_first_loss_is_near_chance_and_training_lowers_it_clearly(learned):
    out, result, _ = learned
    losses = logged_losses(out)
    chance = math.log(8)
    assert abs(losses[1] - chance) < 0.1 * chance            # random student: ln(B), the loss's chance level
    late = np.mean([losses[s] for s in range(51, 61)])      # seeds 42, 1, 7 gave 0.98, 0.88, 0.74
    assert late < 0.6 * chance, f"mean loss of steps 51-60 {late:.2f} vs ln 8 = {chance:.2f}"
    assert result["step"] == 60


def test_run_dir_holds_config_logs_checkpoints_and_curves(learned, tiny_cache):
    out, result, _ = learned
    for name in ("config.json", "metrics.jsonl", "last.pt", "best.pt", "curves.png"):
        assert (out / name).is_file(), name
    saved = json.loads((out / "config.json").read_text())
    assert saved == tiny_config(tiny_cache, out, **LEARN).to_dict()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    dev = [r for r in records if "dev/keyword_mAP" in r]
    assert [r["step"] for r in dev] == [30, 60]
    for key in ("audio_to_image_R@1", "audio_to_image_R@5", "audio_to_image_R@10", "image_to_audio_R@1",
                "image_to_audio_R@5", "image_to_audio_R@10", "keyword_mAP"):
        assert all(0.0 <= r[f"dev/{key}"] <= 100.0 for r in dev), key
    best = max(dev, key=lambda r: r["dev/keyword_mAP"])      # ties: the first one was kept
    assert result["best"] == {"metric": "keyword_mAP", "value": best["dev/keyword_mAP"], "step": best["step"]}
    last, best_state = load_checkpoint(out / "last.pt"), load_checkpoint(out / "best.pt")
    assert last["step"] == 60 and best_state["step"] == best["step"]
    assert last["config"] == saved and best_state["config"] == saved
    model, _ = load_encoder(out / "best.pt")
    assert model.cfg.out_dim == 512 and model.cfg.layers == 1


def test_the_loop_never_batches_two_captions_of_one_image(learned, tiny_cache):
    _, _, seen = learned
    assert len(seen) == 60 and all(len(rows) == 8 for rows in seen)
    _assert_distinct_images(seen, tiny_cache)


def test_without_the_rule_captions_of_one_image_do_meet(tiny_cache):
    """The check above can fail: 8 of 12 images per batch, 5 captions each, do collide when allowed to."""
    data = load_split(tiny_cache, "train")
    codes = data.image_index.numpy()
    for rule, collide in ((True, False), (False, True)):
        source = MemoryBatches(data, [(0, 8)], seed=0, one_caption_per_image=rule)
        batches = [source.sampler.next_batch(8) for _ in range(20)]
        assert any(len(set(codes[b])) < len(b) for b in batches) == collide


# ----------------------------------------------------------------------------------------------------
# Resume: a run stopped and resumed logs the losses of one that never stopped


@pytest.mark.parametrize("mode", ["memory", "stream"])
def test_stopped_and_resumed_run_logs_the_same_losses(mode, tiny_cache, tiny_wds_cache, tmp_path,
                                                      batch_images):
    # dropout and SpecAugment on: their random draws must be restored too; the batch size switches from 4
    # to 8 (stream: to 4 x 2 readers can't fill 8, so 2 -> 4) after the stop, through the restored schedule
    cache = tiny_cache if mode == "memory" else tiny_wds_cache
    schedule = "4:5,8" if mode == "memory" else "2:5,4"
    common = dict(steps=9, dropout=0.1, spec_augment=True, batch_schedule=schedule, data_mode=mode, workers=2)
    train(tiny_config(cache, tmp_path / "whole", **common))
    whole_batches = list(batch_images)
    train(tiny_config(cache, tmp_path / "parts", stop_after=3, **common))
    assert load_checkpoint(tmp_path / "parts" / "last.pt")["step"] == 3
    train(tiny_config(cache, tmp_path / "parts", resume=True, **common))
    whole, parts = logged_losses(tmp_path / "whole"), logged_losses(tmp_path / "parts")
    assert sorted(whole) == list(range(1, 10)) and sorted(parts) == sorted(whole)
    assert [whole[s] for s in whole] == [parts[s] for s in whole]
    records = [json.loads(line) for line in (tmp_path / "parts" / "metrics.jsonl").read_text().splitlines()]
    sizes = [r["batch_size"] for r in records if "loss" in r]
    assert sizes == [int(schedule[0])] * 5 + [int(schedule[-1])] * 4
    elapsed = [r["elapsed_s"] for r in records if "loss" in r]   # wall time carried over the stop
    assert all(0 < a < b for a, b in zip(elapsed, elapsed[1:])), elapsed
    assert 0 < load_checkpoint(tmp_path / "parts" / "last.pt")["elapsed_s"] < elapsed[-1] + 1
    assert all(torch.equal(a, b) for a, b in zip(whole_batches, batch_images[len(whole_batches):], strict=True))
    _assert_distinct_images(batch_images, cache)


def test_resume_after_a_crash_mid_log_line(tiny_cache, tmp_path):
    # a run killed while appending to metrics.jsonl leaves a torn last line; --resume must drop it with
    # the other lines past the checkpoint, not fail on it
    out = tmp_path / "run"
    train(tiny_config(tiny_cache, out, steps=4, stop_after=2))
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 2.')
    train(tiny_config(tiny_cache, out, steps=4, resume=True))
    assert sorted(logged_losses(out)) == [1, 2, 3, 4]


def test_resume_says_what_changed_and_when_nothing_is_left(tiny_cache, tmp_path, capsys):
    out = tmp_path / "run"
    train(tiny_config(tiny_cache, out, steps=4, stop_after=2))
    capsys.readouterr()
    train(tiny_config(tiny_cache, out, steps=4, resume=True, lr=1e-3, warmup=2))
    said = capsys.readouterr().out
    assert f"--resume: {out / 'last.pt'} was trained with other settings; from step 2 on, lr 0.002 -> 0.001, " \
           "warmup 5 -> 2" in said
    assert json.loads((out / "config.json").read_text())["lr"] == 1e-3
    train(tiny_config(tiny_cache, out, steps=3, resume=True, lr=1e-3, warmup=2))
    said = capsys.readouterr().out
    assert "is at step 4, --steps is 3: nothing to train; raise --steps" in said and "other settings" not in said
    assert sorted(logged_losses(out)) == [1, 2, 3, 4]


def test_resume_applies_a_new_weight_decay_and_says_that_the_schedule_stretches(tiny_cache, tmp_path, capsys):
    """Changes on --resume are announced as applied: the optimiser's saved weight decay must not win over the
    new one (only the learning rate was set anew), and a new --steps moves the cosine under the run's feet."""
    out = tmp_path / "run"
    train(tiny_config(tiny_cache, out, steps=4, stop_after=2, weight_decay=0.01))
    capsys.readouterr()
    train(tiny_config(tiny_cache, out, steps=6, stop_after=1, resume=True, weight_decay=0.5, cpu_bf16=True))
    said = capsys.readouterr().out
    assert "weight_decay 0.01 -> 0.5" in said and "cpu_bf16 False -> True" in said
    assert "--resume: steps 4 -> 6: the learning-rate schedule now decays over 6 steps; at step 2 it is" in said
    groups = load_checkpoint(out / "last.pt")["optimizer"]["param_groups"]
    assert [g["weight_decay"] for g in groups] == [0.5, 0.0]


def test_best_pt_follows_a_new_best_metric_and_the_last_weights_until_validated(tiny_cache, tmp_path, capsys):
    """best.pt is chosen by one metric: a resume with another --best-metric starts the choice afresh (an R@10
    of 100 must not outrank every later loss); without validation yet, best.pt is the newest weights, as the
    command says, in every invocation."""
    out = tmp_path / "run"
    train(tiny_config(tiny_cache, out, steps=8, stop_after=3))
    train(tiny_config(tiny_cache, out, steps=8, stop_after=3, resume=True))
    assert load_checkpoint(out / "best.pt")["step"] == 6 and load_checkpoint(out / "last.pt")["step"] == 6
    out = tmp_path / "metric"
    train(tiny_config(tiny_cache, out, steps=6, eval_every=2, stop_after=2, best_metric="audio_to_image_R@10"))
    assert load_checkpoint(out / "last.pt")["best"]["metric"] == "audio_to_image_R@10"
    capsys.readouterr()
    train(tiny_config(tiny_cache, out, steps=6, eval_every=2, resume=True, best_metric="loss"))
    assert "from now on by loss: the next validation replaces it" in capsys.readouterr().out
    best = load_checkpoint(out / "last.pt")["best"]
    assert best["metric"] == "loss" and best["step"] in (4, 6)
    assert load_checkpoint(out / "best.pt")["step"] == best["step"]
    (out / "best.pt").unlink()                   # a run folder copied with last.pt alone
    capsys.readouterr()
    train(tiny_config(tiny_cache, out, steps=7, eval_every=100, resume=True, best_metric="loss"))
    assert f"--resume: no {out / 'best.pt'} (it held step {best['step']})" in capsys.readouterr().out
    assert load_checkpoint(out / "best.pt")["step"] == 7


def test_every_setting_has_a_rule_on_resume():
    """A setting added to TrainConfig must be given a rule for --resume (said, refused, taken silently, or the
    invocation's own); one left out would change silently under a resumed run."""
    from trainer.config import ENCODER_FIELDS, FIELDS, INVOCATION_FIELDS
    from trainer.train import CHECKED_APART, OPERATIONAL_FIELDS, RECIPE_FIELDS
    model = {"conv_channels"} | set(ENCODER_FIELDS)      # EncoderConfig's: refused when they differ
    groups = [set(INVOCATION_FIELDS), set(RECIPE_FIELDS), model, set(OPERATIONAL_FIELDS), set(CHECKED_APART)]
    assert set().union(*groups) == FIELDS
    assert sum(map(len, groups)) == len(FIELDS)          # each in one group


def test_resume_takes_the_run_settings_from_its_config(tiny_cache, tmp_path):
    """`train --cache C --out RUN --resume` alone continues a run started with many options (the job
    script's second line need not repeat the first's): the same losses as a run that never stopped."""
    common = dict(steps=6, dropout=0.1, pooling="attention", pos_emb="learned", batch_schedule="4:3,8")
    train(tiny_config(tiny_cache, tmp_path / "whole", **common))
    out = tmp_path / "parts"
    train(tiny_config(tiny_cache, out, stop_after=2, **common))
    code, output = _cli("--cache", tiny_cache, "--out", out, "--resume", "--threads", 1, "--stop-after", 2)
    assert code == 0 and "stopped at step 4 of 6 (--stop-after): run the same command with --resume" in output
    assert f"checkpoints in {out}" in output
    code, output = _cli("--cache", tiny_cache, "--out", out, "--resume", "--threads", 1, "--device", "cpu")
    assert code == 0, output
    assert "other settings" not in output and "--stop-after" not in output
    assert logged_losses(out) == logged_losses(tmp_path / "whole")
    saved = json.loads((out / "config.json").read_text())
    assert (saved["pooling"], saved["batch_schedule"], saved["stop_after"]) == ("attention", "4:3,8", 0)


def test_resume_names_the_model_settings_that_differ(tiny_cache, tmp_path):
    out = tmp_path / "run"
    train(tiny_config(tiny_cache, out, steps=4, stop_after=2))
    before = (out / "last.pt").read_bytes()
    code, output = _cli("--cache", tiny_cache, "--out", out, "--resume", "--threads", 1, "--layers", 2)
    assert code == 1 and "Traceback" not in output
    assert "its model settings differ from this run's (layers 1 -> 2)" in output
    code, output = _cli("--cache", tiny_cache, "--out", out, "--resume", "--threads", 1, "--preset", "seed")
    assert code == 1 and "was trained with preset demo" in output and "leave out --preset" in output
    assert (out / "last.pt").read_bytes() == before
    (out / "config.json").write_text("{")
    code, output = _cli("--cache", tiny_cache, "--out", out, "--resume")
    assert code == 1 and f"{out / 'config.json'}: not valid JSON" in output


def _wait_for_step(run_dir: Path, step: int, running, seconds: float = 120) -> bool:
    """Polls RUN_DIR/metrics.jsonl until it logs `step` (True), or running() is False or time is up."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and running():
        if (run_dir / "metrics.jsonl").is_file() and max(logged_losses(run_dir), default=0) >= step:
            return True
        time.sleep(0.05)
    return False


def _train_until_sigterm(config: dict, run_dir: Path, after_step: int, sig=signal.SIGTERM) -> tuple[int, str]:
    """Runs `cli.py train --config` with `config` as TOML in a process group of its own, sends SIGTERM to the
    whole group (as a scheduler does) once metrics.jsonl shows `after_step`; (exit status, stderr)."""
    root = Path(__file__).resolve().parents[1]
    toml = run_dir.parent / f"{run_dir.name}.toml"   # JSON's strings, numbers and booleans are TOML's
    toml.write_text("".join(f"{key} = {json.dumps(value)}\n" for key, value in config.items()))
    proc = subprocess.Popen([sys.executable, "cli.py", "train", "--config", str(toml), "--cache", config["cache"],
                             "--out", config["out"]], cwd=root, start_new_session=True,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(root)})
    if _wait_for_step(run_dir, after_step, lambda: proc.poll() is None):
        os.killpg(proc.pid, sig)
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err


@pytest.mark.parametrize("mode, sig", [("memory", signal.SIGTERM), ("stream", signal.SIGTERM),
                                       ("stream", signal.SIGINT)])
def test_sigterm_writes_last_pt_and_the_resumed_run_logs_the_same_losses(mode, sig, tiny_cache, tiny_wds_cache,
                                                                         tmp_path):
    """A scheduler's SIGTERM (to the training process and its stream readers alike) ends the step, writes
    last.pt and exits with status 143 (the run is not finished); --resume then continues exactly. save_every
    1000: without the signal handling nothing would be saved."""
    # log_every 3: the stop lands inside a log window, whose partial loss last.pt must carry over; eval_every
    # 1: a stop skips the validation of its step, whatever the step
    cache = tiny_cache if mode == "memory" else tiny_wds_cache
    common = dict(steps=1000, dropout=0.1, data_mode=mode, workers=2, batch_size=8 if mode == "memory" else 4,
                  log_every=3, eval_every=1)
    options = {**TINY, **common, "cache": str(cache), "out": str(tmp_path / "parts")}
    status, err = _train_until_sigterm(options, tmp_path / "parts", after_step=6, sig=sig)
    assert status == 128 + sig, err          # 143, or 130 for Ctrl-C's SIGINT
    stopped = load_checkpoint(tmp_path / "parts" / "last.pt")["step"]
    assert 6 <= stopped < 1000
    assert f"{signal.Signals(sig).name} received; stopped after step {stopped}" in err
    lines = (tmp_path / "parts" / "metrics.jsonl").read_text().splitlines()
    validated = [r["step"] for r in map(json.loads, lines) if "dev/keyword_mAP" in r]
    assert validated == list(range(1, stopped))
    train(tiny_config(cache, tmp_path / "parts", resume=True, stop_after=8, **common))
    train(tiny_config(cache, tmp_path / "whole", stop_after=stopped + 8, **common))
    whole, parts = logged_losses(tmp_path / "whole"), logged_losses(tmp_path / "parts")
    assert sorted(parts) == sorted(whole) == [1] + list(range(3, stopped + 9, 3))
    assert [parts[s] for s in whole] == [whole[s] for s in whole]


def test_a_stream_reader_s_error_ends_the_command(tiny_wds_cache, tmp_path):
    """Readers ignore SIGTERM (the training process stops them itself): after a reader's error the command
    must still shut them down and exit with the message, not hang at exit on readers deaf to terminate()."""
    args = [sys.executable, str(Path(__file__).resolve().parents[1] / "cli.py"), "train", "--cache",
            str(tiny_wds_cache), "--out", str(tmp_path / "run"), "--preset", "demo", "--layers", "1",
            "--threads", "1", "--device", "cpu", "--data-mode", "stream", "--workers", "2", "--batch-size", "12",
            "--steps", "3", "--no-cpu-bf16"]
    try:
        done = subprocess.run(args, capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("train hung after a stream reader's error")
    assert done.returncode == 1 and "too few for a batch of 12" in done.stdout + done.stderr


def test_a_second_ctrl_c_stops_at_once(capsys):
    """The first Ctrl-C asks for the end of the step and last.pt (said on stderr); a second one is the way out
    of a step that hangs, without saving; the handlers before are back afterwards."""
    from trainer.train import _stop_requests
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        with _stop_requests() as request:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.1)
            assert request["signal"] == signal.SIGINT
            assert "Ctrl-C again to stop without saving" in capsys.readouterr().err
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.1)
    assert signal.getsignal(signal.SIGINT) is before


def test_features_go_to_the_device_in_chunks(tiny_cache, monkeypatch):
    """The host holds one chunk of the split at a time (SpokenCOCO: ~20 GB per process otherwise); the
    tensor is the one a single read gives, and each utterance is the store's own array."""
    whole = load_split(tiny_cache, "train")
    reads = []
    load_all = StoreReader.load_all
    monkeypatch.setattr(StoreReader, "load_all", lambda self, keys=None: reads.append(self.store_dir.name)
                        or load_all(self, keys))
    monkeypatch.setattr("trainer.data._LOAD_CHUNK_BYTES", 39 * 2 * 200)   # about 200 frames per chunk
    chunked = load_split(tiny_cache, "train")
    assert reads.count("audio") > 10
    assert torch.equal(chunked.features, whole.features) and torch.equal(chunked.offsets, whole.offsets)
    with StoreReader(tiny_cache / "audio") as store:
        for i, utt_id in enumerate(chunked.utt_ids):
            got = chunked.features[chunked.offsets[i]:chunked.offsets[i + 1]]
            assert torch.equal(got, torch.from_numpy(store.get(utt_id))), utt_id


def test_a_batch_holds_each_utterance_zero_padded_and_cut_at_max_frames(tiny_cache):
    data = load_split(tiny_cache, "train")
    with StoreReader(tiny_cache / "audio") as store:
        own = [torch.from_numpy(store.get(u)).float() for u in data.utt_ids]
    idx = torch.tensor([5, 0, 17, 3, 3])
    for max_frames, frames in ((2048, None), (60, None), (60, 64), (2048, 400)):
        feats, lengths = data.batch(idx, max_frames, frames)
        cut = [own[i][:max_frames] for i in idx.tolist()]
        assert lengths.tolist() == [len(x) for x in cut]
        assert feats.dtype == torch.float32 and feats.shape == (5, frames or max(map(len, cut)), data.dims)
        for row, x in zip(feats, cut):
            assert torch.equal(row[:len(x)], x) and not row[len(x):].any()


def test_stream_mode_needs_a_webdataset_cache(tiny_cache, tmp_path):
    with pytest.raises(ValueError, match="--format wds"):
        train(tiny_config(tiny_cache, tmp_path / "run", steps=2, data_mode="stream"))


def test_stream_refuses_more_ranks_than_shards_and_caps_readers(tiny_wds_cache, caplog):
    """4 shards hold the 60 training utterances: 5 ranks would leave one without data (DDP would hang)."""
    data = load_split(tiny_wds_cache, "train", features=False)
    args = dict(data=data, cache=tiny_wds_cache, schedule=[(0, 20)], seed=0, buffer=64, max_frames=2048,
                device=torch.device("cpu"))
    with pytest.raises(ValueError, match="4 shards hold training utterances, fewer than the 5 processes"):
        StreamBatches(rank=0, world=5, workers=1, **args)
    with caplog.at_level(logging.WARNING, logger="trainer.stream"):
        assert StreamBatches(rank=1, world=2, workers=3, **args).workers == 2
    assert "using 2 reader(s) per process" in caplog.text


def test_a_stream_position_is_only_restored_under_the_same_cut_of_the_pass(tiny_wds_cache):
    """A position is batch k of pass p: under another --stream-buffer, batch size or seed, skipping k batches
    of the new cut would repeat utterances within the pass; the stream starts a new order instead."""
    data = load_split(tiny_wds_cache, "train", features=False)
    args = dict(data=data, cache=tiny_wds_cache, rank=0, world=1, workers=0, max_frames=2048,
                device=torch.device("cpu"))
    first = StreamBatches(schedule=[(0, 2)], seed=0, buffer=16, **args)
    for step in range(3):
        first.next(step)
    state = first.state_dict()
    first.close()
    assert StreamBatches(schedule=[(0, 2)], seed=0, buffer=16, **args).load_state_dict(state, 3)
    for changed in (dict(buffer=40), dict(schedule=[(0, 4)]), dict(seed=1)):
        options = {"schedule": [(0, 2)], "seed": 0, "buffer": 16, **changed}
        assert not StreamBatches(**options, **args).load_state_dict(state, 3), changed


def test_pass_batches_respect_sizes_the_rule_and_use_each_utterance_once():
    rng = np.random.default_rng(0)
    codes = np.repeat(np.arange(60), 5)                 # captions of an image side by side, as in shards
    lengths = rng.integers(50, 500, len(codes))
    order = np.arange(len(codes))

    def size(k):
        return 8 if k < 10 else 16

    def spread(batches):
        return np.mean([np.ptp(lengths[b]) for b in batches])

    batches = list(pass_batches(order, lengths, codes, size, (0, 0), buffer=128))
    assert [len(b) for b in batches] == [size(k) for k in range(len(batches))]
    assert all(len(set(codes[b])) == len(b) for b in batches)
    used = np.concatenate(batches)
    assert len(set(used.tolist())) == len(used) and len(used) > 0.9 * len(codes)
    again = list(pass_batches(order, lengths, codes, size, (0, 0), buffer=128))
    assert all(np.array_equal(a, b) for a, b in zip(batches, again, strict=True))
    unbucketed = list(pass_batches(order, lengths, codes, size, (0, 0), buffer=128, bucket=False))
    assert spread(batches) < 0.6 * spread(unbucketed)          # similar lengths in a batch: less padding


# ----------------------------------------------------------------------------------------------------
# Two DDP processes (gloo) against one process with the same global batch


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_rank(rank: int, port: int, config: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    try:
        train(TrainConfig(**config))
    finally:
        torch.distributed.destroy_process_group()


def test_two_ddp_processes_log_the_losses_of_one(tiny_cache, tmp_path):
    port = _free_port()
    common = dict(steps=3, batch_size=4, dropout=0.0, spec_augment=False)
    ddp = tiny_config(tiny_cache, tmp_path / "ddp", **common).to_dict()
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_ddp_rank, args=(rank, port, ddp)) for rank in range(2)]
    for p in procs:
        p.start()
    train(tiny_config(tiny_cache, tmp_path / "one", **common))   # meanwhile, the single process
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0, 0]
    assert len(load_checkpoint(tmp_path / "ddp" / "last.pt")["ranks"]) == 2   # one run of two processes
    one, two = logged_losses(tmp_path / "one"), logged_losses(tmp_path / "ddp")
    assert sorted(one) == sorted(two) == [1, 2, 3]
    assert np.allclose([one[s] for s in one], [two[s] for s in one], rtol=1e-4, atol=1e-5)


def test_a_sigterm_to_one_ddp_process_stops_both_after_one_step(tiny_cache, tmp_path):
    """The processes agree at log steps: the one that got the signal must not leave the other waiting in a
    collective, and last.pt holds both processes' states at the same step."""
    port = _free_port()
    ddp = tiny_config(tiny_cache, tmp_path / "ddp", steps=1000, batch_size=4, log_every=5).to_dict()
    procs = [mp.get_context("spawn").Process(target=_ddp_rank, args=(rank, port, ddp)) for rank in range(2)]
    for p in procs:
        p.start()
    try:
        assert _wait_for_step(tmp_path / "ddp", 5, lambda: all(p.is_alive() for p in procs))
        os.kill(procs[1].pid, signal.SIGTERM)   # rank 1 only
        for p in procs:
            p.join(timeout=120)
    finally:   # a deadlocked pair must fail the test, not hang pytest at exit
        for p in procs:
            if p.is_alive():
                p.kill()
    assert [p.exitcode for p in procs] == [0, 0]
    state = load_checkpoint(tmp_path / "ddp" / "last.pt")
    assert 5 <= state["step"] < 1000 and state["step"] % 5 == 0 and len(state["ranks"]) == 2


@pytest.mark.parametrize("mode", ["memory", "stream"])
def test_a_run_resumes_on_another_number_of_processes(mode, tiny_cache, tiny_wds_cache, tmp_path):
    """One process stops after 3 steps; two processes resume it: the weights, optimiser and step carry on
    (the checkpoint says how many wrote it), the stream restarts its order, nothing hangs."""
    cache = tiny_cache if mode == "memory" else tiny_wds_cache
    common = dict(steps=6, batch_size=4, data_mode=mode, workers=1)
    train(tiny_config(cache, tmp_path / "run", stop_after=3, **common))
    three = load_checkpoint(tmp_path / "run" / "last.pt")
    port = _free_port()
    resumed = tiny_config(cache, tmp_path / "run", resume=True, **common).to_dict()
    procs = [mp.get_context("spawn").Process(target=_ddp_rank, args=(r, port, resumed)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    assert [p.exitcode for p in procs] == [0, 0]
    six = load_checkpoint(tmp_path / "run" / "last.pt")
    assert six["step"] == 6 and len(three["ranks"]) == 1 and len(six["ranks"]) == 2
    assert sorted(logged_losses(tmp_path / "run")) == [1, 2, 3, 4, 5, 6]
    steps = [g["step"] for g in six["optimizer"]["state"].values()]   # AdamW's own count went on from 3
    assert steps and all(int(step) == 6 for step in steps)


@pytest.mark.parametrize("device, backend", [("cpu", "gloo"), ("auto", "nccl"), ("cuda", "nccl")])
def test_torchrun_picks_the_backend_of_the_run_s_device(device, backend, monkeypatch):
    """On a GPU host (faked here) a --device cpu run under torchrun must use gloo: NCCL cannot carry CPU
    tensors, and set_device(LOCAL_RANK) fails where LOCAL_RANK >= the number of GPUs."""
    from trainer import train as train_module
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(("set_device", str(d))))
    monkeypatch.setattr(train_module.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(train_module.dist, "init_process_group", lambda b: calls.append(("init", b)))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    _, _, picked = train_module._init_distributed(device)
    assert ("init", backend) in calls
    assert str(picked) == ("cpu" if backend == "gloo" else "cuda:1")
    assert any(c[0] == "set_device" for c in calls) == (backend == "nccl")


def test_torchrun_refuses_one_explicit_gpu_for_every_process(monkeypatch):
    from trainer.train import _init_distributed
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="--device cuda:0 under torchrun would put all 2 processes on one GPU"):
        _init_distributed("cuda:0")


def _ddp_stream_rank(rank: int, port: int, config: dict, record: str) -> None:
    """A stream-mode rank that also saves the image rows of each of its local batches."""
    seen = _record_batches(pytest.MonkeyPatch())   # this process's own patch, gone when it exits
    _ddp_rank(rank, port, config)
    torch.save(seen, record)


@pytest.mark.parametrize("workers", [1, 2])
def test_two_stream_ranks_never_share_an_image_and_run_through_passes(workers, tiny_wds_cache, tmp_path):
    """--data-mode stream with two processes: the global batch (rank 0's rows, then rank 1's) never holds
    two captions of one image, and neither rank runs dry (DDP would hang) through several passes."""
    port = _free_port()
    config = tiny_config(tiny_wds_cache, tmp_path / "ddp", steps=40, batch_size=4, data_mode="stream",
                         workers=workers).to_dict()
    ctx = mp.get_context("spawn")
    records = [tmp_path / f"rank{r}.pt" for r in range(2)]
    procs = [ctx.Process(target=_ddp_stream_rank, args=(r, port, config, str(records[r]))) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    assert [p.exitcode for p in procs] == [0, 0]
    local = [torch.load(path) for path in records]
    assert len(local[0]) == len(local[1]) == 40 and all(len(b) == 2 for b in local[0] + local[1])
    _assert_distinct_images([torch.cat(pair) for pair in zip(*local)], tiny_wds_cache)
    used = {tuple(row.tolist()) for batch in local[0] + local[1] for row in batch}
    assert len(used) > 0.9 * len(load_split(tiny_wds_cache, "train", features=False).images)  # 30 steps+


# ----------------------------------------------------------------------------------------------------
# Configuration and the command line


def test_defaults_are_the_seed_set_up():
    cfg = TrainConfig()
    assert (cfg.batch_size, cfg.lr, cfg.weight_decay, cfg.warmup, cfg.steps, cfg.seed) == \
        (64, 4e-4, 0.01, 1000, 25_000, 42)
    assert (cfg.layers, cfg.heads, cfg.width, cfg.pos_emb, cfg.pooling, cfg.padding_mask, cfg.max_frames) == \
        (8, 4, 128, "none", "first", False, 2048)
    assert cfg.symmetric and cfg.spec_augment and cfg.targets == "image" and cfg.best_metric == "keyword_mAP"
    assert cfg.data_mode == "memory" and cfg.one_caption_per_image


def test_precedence_defaults_preset_toml_command_line(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('preset = "demo"\nlr = 0.002\nsteps = 500\nbatch-schedule = "16:100,32"\nlayers = 2\n'
                    'cache = "caches/f8k"\nout = "~/runs/a"\n')
    cfg = resolve_config(None, toml, steps=700)
    assert (cfg.preset, cfg.cache, cfg.out) == ("demo", "caches/f8k", os.path.expanduser("~/runs/a"))
    assert cfg.steps == 700                                   # command line beats the file
    assert (cfg.lr, cfg.batch_schedule, cfg.layers) == (0.002, "16:100,32", 2)   # file beats the preset
    assert cfg.pooling == PRESETS["demo"]["pooling"] == "mean"                    # preset beats the default
    assert cfg.weight_decay == TrainConfig.weight_decay                           # untouched: the default
    assert resolve_config("seed", toml).pooling == "first"    # --preset beats the file's preset
    assert resolve_config(None, toml, lr=None).lr == 0.002    # unset options leave the file's value
    toml.write_text('steps = 500\nout = "runs/a"\n')
    code, output = _cli("--config", toml)
    assert code == 1 and '--cache (the cache folder) is required: give it on the command line or as cache = "..."' \
        in output and "Traceback" not in output


def _cli(*args) -> tuple[int, str]:
    result = CliRunner().invoke(cli_main, ["train", *map(str, args)])
    return result.exit_code, result.output


@pytest.mark.parametrize("args, toml, message", [
    (["--batch-schedule", "64:2000,oops"], None, "bad batch schedule"),
    (["--device", "cuda"], None, "no CUDA GPU"),
    (["--device", "gpu"], None, "--device 'gpu': use auto, cpu, cuda or cuda:N"),
    ([], "device = 'gpu'\n", "--device 'gpu': use auto, cpu, cuda or cuda:N"),
    ([], "steps = 'many'\n", "steps = 'many': expected int"),
    ([], "stepz = 10\n", "unknown settings stepz"),
    ([], "data_mode = 'stream'\n", "--format wds"),
    ([], "[model]\nlayers = 2\n", "sections [model] are not supported"),
    ([], "conv_init = 'xavier'\n", "conv_init = 'xavier': use one of pytorch, kaiming"),
    (["--batch-schedule", "4:3,13"], None, "batch_size 13 is larger than the 12 distinct images"),
    (["--lr", "inf"], None, "lr = inf: must be a finite number, above 0"),
    (["--lr", "0"], None, "lr = 0.0: must be a finite number, above 0"),
    (["--weight-decay", "nan"], None, "weight_decay = nan: must be a finite number, 0 or more"),
    (["--grad-clip", "-1"], None, "grad_clip = -1.0: must be a finite number, 0 or more"),
    (["--seed", "-5"], None, "seed = -5: must be 0 or more"),
])
def test_bad_options_fail_with_a_message_not_a_traceback(args, toml, message, tiny_cache, tmp_path):
    if toml is not None:
        (tmp_path / "run.toml").write_text(toml)
        args = [*args, "--config", tmp_path / "run.toml"]
    code, output = _cli("--cache", tiny_cache, "--out", tmp_path / "run", "--threads", 1, *args)
    assert code == 1 and "Traceback" not in output
    assert message in output and "train:" not in output   # refused before the progress bar
    assert not (tmp_path / "run").exists()


def test_a_cache_folder_that_is_not_there_is_named(tmp_path):
    code, output = _cli("--cache", tmp_path / "nowhere", "--out", tmp_path / "run", "--threads", 1)
    assert code == 1 and f"{tmp_path / 'nowhere'}: no such cache folder" in output and "extract-audio" in output
    assert not (tmp_path / "run").exists()


def test_a_cache_without_its_stages_names_commands_that_can_be_copied(tiny_cache, tiny_corpus, tmp_path):
    """A corpus folder given as --cache, or a cache that one stage has not filled: the message's command has
    the options the stage requires, filled in from cache.json where it knows them."""
    code, output = _cli("--cache", tiny_corpus, "--out", tmp_path / "run", "--threads", 1)
    assert code == 1 and f"{tiny_corpus}: not a cache (no cache.json; a corpus folder given as --cache?)" in output
    assert "clipspeech extract-audio --data CORPUS --cache" in output and "--model NAME" in output
    cache = tmp_path / "cache"
    cache.mkdir()
    manifest = json.loads((tiny_cache / "cache.json").read_text())
    (cache / "cache.json").write_text(json.dumps({"corpus": manifest["corpus"], "clip": manifest["clip"]}))
    code, output = _cli("--cache", cache, "--out", tmp_path / "run", "--threads", 1)
    root = manifest["corpus"]["root"]
    assert code == 1 and f"run `clipspeech extract-audio --data {root} --cache {cache}` first" in output
    (cache / "cache.json").write_text(json.dumps({"corpus": manifest["corpus"], "audio": manifest["audio"]}))
    code, output = _cli("--cache", cache, "--out", tmp_path / "run", "--threads", 1)
    assert f"clipspeech embed-images --data {root} --cache {cache} --model NAME --pretrained TAG|PATH|none" in output
    assert not (tmp_path / "run").exists()


def test_an_out_folder_inside_a_file_is_named(tiny_cache, tmp_path):
    (tmp_path / "notes.txt").write_text("")
    code, output = _cli("--cache", tiny_cache, "--out", tmp_path / "notes.txt" / "run", "--threads", 1,
                        "--batch-size", 8, "--steps", 2)
    assert code == 1 and "Traceback" not in output
    assert f"{tmp_path / 'notes.txt' / 'run'}: Not a directory" in output


@pytest.mark.parametrize("device, message", [("gpu", "--device 'gpu': use auto, cpu, cuda or cuda:N"),
                                             ("cuda" if not torch.cuda.is_available() else "tpu",
                                              "no CUDA GPU" if not torch.cuda.is_available() else "'tpu'")])
def test_evaluate_refuses_a_bad_device_before_loading(learned, tiny_cache, device, message):
    out, _, _ = learned
    result = CliRunner().invoke(cli_main, ["evaluate", "--cache", str(tiny_cache), "--checkpoint",
                                           str(out / "best.pt"), "--device", device])
    assert result.exit_code == 1 and message in result.output, result.output


def test_evaluate_embeds_at_the_run_s_validation_batch_size_unless_told(learned, tiny_cache, monkeypatch,
                                                                        tmp_path):
    """An encoder without a padding mask (the seed's) embeds an utterance a little differently with other
    padding: by default evaluate uses the batch size of the run's own validation, so that --split dev gives
    the figures the run logged; --batch-size overrides it. A --prompt that embed-images would refuse is
    refused here too, not answered with advice to run embed-images with it."""
    import trainer.evaluate as ev
    out, _, _ = learned
    sizes = []
    real = ev.embed_audio
    monkeypatch.setattr(ev, "embed_audio", lambda model, data, size, frames: sizes.append(size) or
                        real(model, data, size, frames))
    state = load_checkpoint(out / "best.pt")
    state["config"]["eval_batch_size"] = 32       # as if trained with eval_batch_size = 32 in its TOML file
    torch.save(state, tmp_path / "best.pt")
    ev.evaluate(ev.EvalConfig(cache=tiny_cache, checkpoint=tmp_path / "best.pt"))
    ev.evaluate(ev.EvalConfig(cache=tiny_cache, checkpoint=tmp_path / "best.pt", batch_size=7))
    assert sizes == [32, 7]
    for prompt in ("bogus", "a photo of a {w}", "{} and {}"):
        result = CliRunner().invoke(cli_main, ["evaluate", "--cache", str(tiny_cache), "--checkpoint",
                                               str(out / "best.pt"), "--prompt", prompt])
        assert result.exit_code == 1 and "a template with one '{}' where the keyword goes" in result.output


UNFINISHED = [("audio", "`clipspeech extract-audio` has not finished on this cache: run it again (or "
                        "`extract-audio --index-only` once every"),
              ("texts", "`clipspeech embed-images` has not finished")]


@pytest.mark.parametrize("store, fix", UNFINISHED)
def test_an_unfinished_stage_is_named(store, fix, tiny_cache, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(tiny_cache, cache)
    for index in (cache / store).glob("index.*"):
        index.unlink()
    code, output = _cli("--cache", cache, "--out", tmp_path / "run", "--threads", 1)
    assert code == 1 and "Traceback" not in output
    assert f"{cache / store}: no index" in output and fix in " ".join(output.split())
    assert not (tmp_path / "run").exists()


def test_an_existing_run_is_not_overwritten_without_resume(learned, tiny_cache):
    out, _, _ = learned
    before = (out / "last.pt").read_bytes()
    code, output = _cli("--cache", tiny_cache, "--out", out, "--steps", 2)
    assert code == 1 and "Traceback" not in output and "--resume" in output
    assert (out / "last.pt").read_bytes() == before


def test_a_checkpoint_refuses_a_cache_of_another_teacher(learned, tiny_cache, tmp_path):
    """Resume and evaluate check that the cache holds the CLIP embeddings the run was trained against."""
    out, _, _ = learned
    other = tmp_path / "other"
    shutil.copytree(tiny_cache, other)
    manifest = json.loads((other / "cache.json").read_text())
    manifest["clip"]["weights_sha256"] = "0" * 64          # as if embed-images had run another teacher
    (other / "cache.json").write_text(json.dumps(manifest))
    before = (out / "last.pt").read_bytes()
    code, output = _cli("--cache", other, "--out", out, "--resume", "--steps", 70, "--threads", 1)
    assert code == 1 and "Traceback" not in output
    assert "trained on a cache with other clip settings" in output and "weights_sha256" in output
    assert (out / "last.pt").read_bytes() == before
    result = CliRunner().invoke(cli_main, ["evaluate", "--cache", str(other), "--checkpoint", str(out / "best.pt")])
    assert result.exit_code == 1 and "other clip settings" in result.output and "weights_sha256" in result.output
    manifest["audio"]["features"] = {**manifest["audio"]["features"], "name": "mfcc-kaldi", "num_ceps": 13}
    (other / "cache.json").write_text(json.dumps(manifest))   # another recipe: its name, not each setting
    result = CliRunner().invoke(cli_main, ["evaluate", "--cache", str(other), "--checkpoint", str(out / "best.pt")])
    assert "other features settings" in result.output and "(name 'mfcc-seed' -> 'mfcc-kaldi')" in result.output


def test_a_checkpoint_is_evaluated_on_a_copy_of_its_cache_in_another_format(learned, tiny_cache, tiny_wds_cache):
    """The same corpus, teacher and features stored as WebDataset shards instead of HDF5 (or at another
    --dtype, part size): the same embeddings, so evaluate and --resume take it."""
    out, _, _ = learned
    assert json.loads((tiny_wds_cache / "cache.json").read_text())["clip"]["format"] == "wds"
    result = CliRunner().invoke(cli_main, ["evaluate", "--cache", str(tiny_wds_cache), "--checkpoint",
                                           str(out / "best.pt")])
    assert result.exit_code == 0, result.output


def test_evaluate_leaves_out_what_failed_in_the_stages(learned, tiny_corpus, tiny_teacher, tmp_path, caplog):
    """A corpus with a broken test image (text named .jpg) and a test image whose every WAV is empty: both
    are recorded in failures.jsonl, and evaluate scores the rest, without their captions, instead of
    refusing queries that have no positive."""
    from pipeline.embed import EmbedConfig, embed_images
    from pipeline.extract import ExtractConfig, extract_audio
    from trainer.evaluate import EvalConfig, evaluate
    out, _, _ = learned
    corpus, cache = tmp_path / "corpus", tmp_path / "cache"
    shutil.copytree(tiny_corpus, corpus)
    test_images = (corpus / "Flickr8k_text" / "Flickr_8k.testImages.txt").read_text().split()
    broken, silent = Path(test_images[0]).stem, Path(test_images[1]).stem
    (corpus / "Flicker8k_Dataset" / f"{broken}.jpg").write_text("not a JPEG")
    for wav in (corpus / "flickr_audio" / "wavs").glob(f"{silent}_*.wav"):
        wav.write_bytes(b"")
    extract_audio(ExtractConfig(data=corpus, cache=cache, workers=1, progress=False))
    embed_images(EmbedConfig(data=corpus, cache=cache, model=tiny_teacher, workers=0, progress=False))
    with caplog.at_level("WARNING", logger="trainer.evaluate"):
        results, arrays, _ = evaluate(EvalConfig(cache=cache, checkpoint=out / "best.pt"))
    kept = len(test_images) - 2
    assert results["counts"] == {"audio": 5 * kept, "images": kept, "texts": 5 * kept, "keywords": 6}
    assert not {broken, silent} & (set(arrays["image_ids"]) | set(arrays["text_image_ids"]))
    assert all(0 <= r["R@10"] <= 100 for r in results["retrieval"].values())
    assert "test split: 10 utterances, 2 images, 10 captions left out" in caplog.text


def test_conv_options_reach_the_saved_encoder(tiny_cache, tmp_path):
    out = tmp_path / "run"
    code, output = _cli("--cache", tiny_cache, "--out", out, "--steps", 2, "--threads", 1, "--layers", 1,
                        "--batch-size", 8, "--conv-channels", 48, "--conv-init", "pytorch")
    assert code == 0, output
    model, _ = load_encoder(out / "last.pt")
    assert [c.out_channels for c in model.convs] == [48] * 6 + [128]
    assert model.cfg.conv_init == "pytorch" and model.cfg.layers == 1


@pytest.mark.parametrize("native", [True, False])
def test_cpu_bf16_autocast_only_where_asked_for_and_native(native, monkeypatch):
    monkeypatch.setattr("trainer.precision.cpu_has_native_bf16", lambda: native)
    a, b = torch.randn(4, 8), torch.randn(8, 3)
    with autocast("cpu"):
        assert (a @ b).dtype == torch.float32                # the default: fp32 on the CPU
    with autocast("cpu", cpu_bf16=True):                     # never emulated bf16: fp32 without native bf16
        assert (a @ b).dtype == (torch.bfloat16 if native else torch.float32)


@pytest.mark.slow
def test_compiled_training_logs_the_losses_of_eager(tiny_cache, tmp_path):
    """--compile (one static graph per batch size and 128-frame bucket; max_frames 128 makes it one graph,
    compiled in about 40 s on 2 cores) steps exactly like the eager model."""
    common = dict(steps=3, dropout=0.0, spec_augment=False, max_frames=128)
    train(tiny_config(tiny_cache, tmp_path / "compiled", compile=True, **common))
    train(tiny_config(tiny_cache, tmp_path / "eager", **common))
    compiled, eager = logged_losses(tmp_path / "compiled"), logged_losses(tmp_path / "eager")
    assert sorted(compiled) == sorted(eager) == [1, 2, 3]
    assert np.allclose([compiled[s] for s in eager], [eager[s] for s in eager], rtol=1e-5, atol=0)
    assert load_checkpoint(tmp_path / "compiled" / "last.pt")["config"]["compile"] is True


def test_compile_mode_reaches_torch_compile_and_needs_compile(tiny_cache, tmp_path, monkeypatch):
    from trainer.train import build_run
    modes = []
    monkeypatch.setattr(torch, "compile", lambda module, **kw: modes.append(kw["mode"]) or module)
    for mode, want in (("reduce-overhead", "reduce-overhead"), ("default", None)):
        build_run(tiny_config(tiny_cache, tmp_path, compile=True, compile_mode=mode)).source.close()
        assert modes.pop() == want
    with pytest.raises(ValueError, match="compile_mode = 'max-autotune' needs compile = true"):
        tiny_config(tiny_cache, tmp_path, compile_mode="max-autotune")


def test_compile_says_when_a_new_shape_compiles(tiny_cache, tmp_path, monkeypatch, capsys):
    """The first batch of each length bucket compiles for tens of seconds: the run says so, once a shape."""
    shapes = []

    def compiled(module, **kw):   # what torch.compile would compile: record each step's input shape
        def forward(feats, lengths):
            shapes.append(tuple(feats.shape[:2]))
            return module(feats, lengths)
        return forward
    monkeypatch.setattr(torch, "compile", compiled)
    train(tiny_config(tiny_cache, tmp_path / "run", compile=True, steps=12, max_frames=256))
    said = re.findall(r"step (\d+) compiles for batches of (\d+) x (\d+) frames", capsys.readouterr().err)
    first = {}
    for step, shape in enumerate(shapes, 1):
        first.setdefault(shape, step)
    assert len(shapes) == 12 and all(t % 128 == 0 for _, t in shapes) and len(first) >= 2   # two buckets at least
    assert [(int(s), (int(b), int(t))) for s, b, t in said] == [(s, shape) for shape, s in first.items()]


@pytest.mark.skipif(not cpu_has_native_bf16(), reason="this CPU has no native bf16")
def test_cpu_bf16_training_learns_and_keeps_fp32_weights(tiny_cache, tmp_path):
    out = tmp_path / "run"
    train(tiny_config(tiny_cache, out, steps=60, cpu_bf16=True))
    losses = logged_losses(out)
    late = np.mean([losses[s] for s in range(51, 61)])
    assert late < 0.6 * math.log(8), f"mean loss of steps 51-60 {late:.2f} vs ln 8"
    state = load_checkpoint(out / "last.pt")
    assert all(v.dtype == torch.float32 for v in state["model"].values() if v.is_floating_point())
