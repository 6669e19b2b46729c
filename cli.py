#!/usr/bin/env python
"""clipspeech command line: each command checks its options, builds a stage config and calls the library."""
from __future__ import annotations

import logging
import signal
import sys
from pathlib import Path

import click

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 110}


class Shard(click.ParamType):
    """I/N: this job's share of the work when N array jobs write one cache together."""
    name = "I/N"

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        try:
            i, n = (int(x) for x in str(value).split("/"))
        except ValueError:
            self.fail(f"{value!r} is not I/N, e.g. 0/4 for the first of four jobs", param, ctx)
        from cache.store import check_shard
        try:
            return check_shard((i, n))
        except ValueError as err:
            self.fail(str(err), param, ctx)


def _fail(message: str) -> None:
    raise click.ClickException(message)


def _run(fn, *args):
    """Runs a library call, turning user errors into clear one-line messages (no traceback)."""
    try:
        return fn(*args)
    except ValueError as e:
        _fail(str(e))
    except OSError as e:   # a missing file, a folder where a file goes, no permission, a full disk ...
        # our own FileNotFoundErrors carry a sentence; the system's name the path: "PATH: Not a directory"
        _fail(f"{e.filename}: {e.strerror}" if e.filename and e.strerror else str(e))


@click.group(context_settings=CONTEXT)
@click.option("-v", "--verbose", is_flag=True, help="Log more detail.")
def main(verbose: bool) -> None:
    """clipspeech: train speech encoders in the embedding space of a frozen CLIP model.

    \b
    Check a corpus first:
      info           what a corpus holds and what is wrong with it (missing files, duplicates)
    The expensive work happens once, in stages that write a feature cache:
      make-demo      write the built-in synthetic demo corpus and fit its CLIP teacher
      extract-audio  corpus audio -> MFCCs (or filterbanks) in CACHE/audio
      embed-images   CLIP teacher -> image, caption and keyword-prompt embeddings in CACHE
      train          the audio encoder, from the cache only
      evaluate       six-way retrieval and keyword spotting, JSON and an HTML report
      demo           all of the above on the demo corpus, in a few minutes on a laptop
    """
    # our own messages at INFO; libraries (open_clip logs every config it parses) only from WARNING
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING, format="%(message)s", stream=sys.stderr)
    for name in ("pipeline", "trainer", "cache"):
        logging.getLogger(name).setLevel(logging.DEBUG if verbose else logging.INFO)


@main.command(context_settings=CONTEXT)
@click.option("--data", required=True, type=click.Path(path_type=Path),
              help="Corpus: Flickr8k folder, SpokenCOCO folder or JSON, or a .jsonl manifest.")
def info(data: Path) -> None:
    """Read a corpus and report what it holds and what is wrong with it."""
    from pipeline.corpus import read_corpus
    click.echo(_run(read_corpus, data).describe())


@main.command("extract-audio", context_settings=CONTEXT)
@click.option("--data", required=True, type=click.Path(path_type=Path),
              help="Corpus: Flickr8k folder, SpokenCOCO folder or JSON, or a .jsonl manifest.")
@click.option("--cache", required=True, type=click.Path(path_type=Path, file_okay=False),
              help="Cache folder (created if missing; reruns resume it).")
@click.option("--features", "recipe", default="mfcc-seed", show_default=True,
              help="Feature recipe: mfcc-seed (the seed's 39-dim MFCCs), mfcc-kaldi, fbank.")
@click.option("--option", "recipe_options", multiple=True, metavar="KEY=VALUE",
              help="Recipe setting, e.g. --option n_mels=80 for fbank, --option normalisation=speaker for mfcc-kaldi.")
@click.option("--format", "fmt", type=click.Choice(["hdf5", "wds"]), default="hdf5", show_default=True,
              help="hdf5 part files, or WebDataset tar shards for streaming.")
@click.option("--workers", type=click.IntRange(min=1), default=None, help="Worker processes [default: all cores].")
@click.option("--shard", type=Shard(), default="0/1", show_default=True,
              help="Do part I of N (array jobs); the last one to finish builds the index.")
@click.option("--part-size", type=click.IntRange(min=1), default=500, show_default=True,
              help="Utterances per part file (the unit of resume and sharding).")
@click.option("--max-failures", type=click.IntRange(min=0), default=100, show_default=True,
              help="Exit non-zero if more utterances than this fail (they are listed in CACHE/failures.jsonl).")
@click.option("--device", default="cpu", show_default=True,
              help="cpu: features in the workers; cuda: workers decode, features computed on the GPU in batches.")
@click.option("--index-only", is_flag=True,
              help="Only build the index (and speaker statistics) over the parts the --shard jobs wrote; pass the "
                   "same options as those jobs. Exits non-zero, naming the missing parts, if some are not written.")
@click.option("--retry-failed", is_flag=True,
              help="Compute again the parts that recorded failures (CACHE/failures.jsonl), e.g. once the files "
                   "are fixed; other complete parts are kept.")
def extract_audio(data, cache, recipe, recipe_options, fmt, workers, shard, part_size, max_failures, device,
                  index_only, retry_failed):
    """Decode every utterance once and store its features in CACHE/audio."""
    from pipeline.extract import ExtractConfig, TooManyFailures, WorkerDied, default_workers, extract_audio
    options = []
    for item in recipe_options:
        if "=" not in item:
            _fail(f"--option {item!r}: expected KEY=VALUE")
        key, value = item.split("=", 1)
        options.append((key, _parse_value(value)))
    cfg = _run(lambda: ExtractConfig(
        data=data, cache=cache, recipe=recipe, recipe_options=tuple(options), fmt=fmt,
        workers=workers or default_workers(), shard=shard, part_size=part_size, max_failures=max_failures,
        batch_device=None if device == "cpu" else device, index_only=index_only, retry_failed=retry_failed))
    try:
        summary = _stage("extract-audio", extract_audio, cfg)
    except (TooManyFailures, WorkerDied) as e:
        click.echo(str(e), err=True)
        sys.exit(1)
    click.echo("\n".join(summary.lines()))


def _stage(name: str, fn, cfg):
    """A stage under a scheduler's SIGTERM or Ctrl-C: it stops between writes, says so and exits 128 + the
    signal's number (143, 130), so that a job script does not take the stage for finished; what it completed
    stays for the rerun."""
    from pipeline.stopping import Stopped, stop_on_signals
    try:
        with stop_on_signals():
            return _run(fn, cfg)
    except Stopped as e:
        click.echo(f"{name}: {e} received: stopped; the parts it completed are kept: run the same command "
                   "to resume", err=True)
        sys.exit(128 + e.signum)


def _parse_value(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


@main.command("embed-images", context_settings=CONTEXT)
@click.option("--data", required=True, type=click.Path(path_type=Path), help="Corpus (as for extract-audio).")
@click.option("--cache", required=True, type=click.Path(path_type=Path, file_okay=False), help="Cache folder.")
@click.option("--model", required=True,
              help="open_clip model: a name (ViT-B-32), local-dir:PATH (the demo teacher: local-dir:DEMO/teacher) "
                   "or hf-hub:ORG/REPO.")
@click.option("--pretrained", default="none", show_default=True,
              help="Weights for a named model: an open_clip tag (openai, laion2b_s34b_b79k) where it is cached, a "
                   "local checkpoint path, or none (random weights, for testing). Ignored for local-dir:/hf-hub:.")
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda.")
@click.option("--batch-size", type=click.IntRange(min=1), default=256, show_default=True,
              help="Images (and captions) per forward pass of the teacher.")
@click.option("--workers", type=click.IntRange(min=0), default=None,
              help="Image decoding processes [default: all cores].")
@click.option("--keywords", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Keyword file, one per line [default: the corpus' keywords.txt, else the 67 Flickr8k keywords].")
@click.option("--prompt", default="this is a photo of a {}", show_default=True, help="Keyword prompt template.")
@click.option("--shard", type=Shard(), default="0/1", show_default=True, help="Do part I of N (array jobs).")
@click.option("--dtype", type=click.Choice(["float16", "float32"]), default="float16", show_default=True,
              help="Storage precision of the embeddings.")
@click.option("--gpu-decode", is_flag=True,
              help="Decode JPEGs on the GPU in batches (nvjpeg; needs --device cuda): about 3x the CPU workers' "
                   "rate on one H200 with 16 cores.")
@click.option("--no-draft", is_flag=True, help="Decode JPEGs at full size (draft mode decodes small targets faster).")
@click.option("--no-cuda-graph", is_flag=True,
              help="Run the image and text towers eagerly on a GPU instead of replaying each as one CUDA graph per "
                   "batch (same embeddings; a graph saves the host hundreds of kernel launches a batch).")
@click.option("--retry-failed", is_flag=True,
              help="Embed again the image parts that recorded failures (CACHE/failures.jsonl), e.g. once the "
                   "images are fixed; other complete parts are kept.")
def embed_images(data, cache, model, pretrained, device, batch_size, workers, keywords, prompt, shard, dtype,
                 gpu_decode, no_draft, no_cuda_graph, retry_failed):
    """Embed every image, written caption and keyword prompt with a frozen CLIP teacher."""
    from pipeline.embed import EmbedConfig, embed_images
    from pipeline.extract import default_workers
    if gpu_decode and not device.startswith("cuda"):
        _fail("--gpu-decode needs --device cuda")
    cfg = _run(lambda: EmbedConfig(
        data=data, cache=cache, model=model, pretrained=None if pretrained.lower() == "none" else pretrained,
        device=device, batch_size=batch_size, workers=default_workers() if workers is None else workers,
        keywords=keywords, prompt=prompt, shard=shard, dtype=dtype, draft=not no_draft, gpu_decode=gpu_decode,
        cuda_graph=not no_cuda_graph, retry_failed=retry_failed))
    click.echo("\n".join(_stage("embed-images", embed_images, cfg).lines()))


def _flag(name: str, help: str):
    """A --x/--no-x switch whose default is None: unset switches leave the preset's or file's value."""
    return click.option(f"--{name}/--no-{name}", default=None, help=help)


@main.command(context_settings=CONTEXT)
@click.option("--cache", type=click.Path(path_type=Path, file_okay=False),
              help="Cache folder (required, here or as cache = ... in the --config file).")
@click.option("--out", type=click.Path(path_type=Path, file_okay=False),
              help="Run folder: config.json, metrics.jsonl, last.pt, best.pt, curves.png (required, here or in "
                   "the --config file).")
@click.option("--config", "toml", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="TOML file setting any option below (command-line options win).")
@click.option("--preset", type=click.Choice(["seed", "demo"]), default=None,
              help="seed (default): the note's set-up, with length-bucketed batches of one caption per image "
                   "(--no-bucket --no-one-caption-per-image for the original); demo: tuned for the demo "
                   "corpus on 2 CPU cores.")
@click.option("--steps", type=click.IntRange(min=1), default=None, help="Training steps [seed: 25000; demo: 400].")
@click.option("--batch-size", type=click.IntRange(min=2), default=None, help="Utterances per step [seed and demo: 64].")
@click.option("--batch-schedule", default=None, metavar="B:STEP,...,B",
              help="Anneal the batch size, e.g. 64:2000,256:4000,1024 (64 until step 2000, ...).")
@click.option("--lr", type=float, default=None, help="Peak learning rate [seed: 4e-4; demo: 2e-3].")
@click.option("--warmup", type=click.IntRange(min=0), default=None,
              help="Linear warm-up steps [seed: 1000; demo: 150].")
@click.option("--weight-decay", type=float, default=None, help="AdamW weight decay [0.01].")
@click.option("--grad-clip", type=float, default=None, help="Max gradient norm, 0 = off [seed: 0; demo: 1].")
@click.option("--eval-every", type=click.IntRange(min=1), default=None,
              help="Dev evaluation interval [seed: 1000; demo: 100].")
@click.option("--save-every", type=click.IntRange(min=1), default=None,
              help="last.pt interval [seed: 1000; demo: 400].")
@click.option("--log-every", type=click.IntRange(min=1), default=None,
              help="metrics.jsonl interval [seed: 50; demo: 20].")
@click.option("--best-metric", type=click.Choice(["keyword_mAP", "audio_to_image_R@10", "image_to_audio_R@10",
                                                  "loss"]), default=None,
              help="What best.pt maximises [keyword_mAP; audio_to_image_R@10 where the cache has no keywords].")
@click.option("--device", default=None, help="auto (default), cpu, cuda, cuda:N.")
@click.option("--seed", type=int, default=None, help="Random seed [42].")
@click.option("--resume", is_flag=True, default=None,
              help="Continue RUN_DIR/last.pt exactly where it stopped, with the settings in RUN_DIR/config.json "
                   "(options given here win; not --device, --threads, --stop-after).")
@click.option("--stop-after", type=click.IntRange(min=1), default=None,
              help="Stop after this many steps in this invocation (fits a job's time slot; continue with --resume).")
@click.option("--layers", type=click.IntRange(min=0), default=None, help="Transformer layers [seed: 8; demo: 2].")
@click.option("--pos-emb", type=click.Choice(["none", "sinusoidal", "learned"]), default=None,
              help="Positional embeddings [seed: none].")
@click.option("--pooling", type=click.Choice(["first", "mean", "attention"]), default=None,
              help="Utterance vector: output at step 0 (seed), mean (demo) or attention over unpadded steps.")
@_flag("padding-mask", "Mask padded frames in the transformer [seed: off; demo: on].")
@click.option("--max-frames", type=click.IntRange(min=16), default=None, help="Frames per utterance cap [2048].")
@click.option("--conv-init", type=click.Choice(["pytorch", "kaiming"]), default=None,
              help="Conv kernels' initialisation: PyTorch's default (seed) or He-normal with zero biases (demo).")
@click.option("--conv-channels", type=click.IntRange(min=1), default=None,
              help="Channels of the hidden conv layers; the last has the transformer's width [seed: 96].")
@click.option("--targets", type=click.Choice(["image", "text", "image+text"]), default=None,
              help="What each utterance must pick out of the batch [seed: image; demo: image+text].")
@_flag("symmetric", "Average audio->image and image->audio losses [on].")
@_flag("spec-augment", "SpecAugment masks during training [on].")
@_flag("bucket", "Length-bucketed batches [on].")
@_flag("one-caption-per-image", "Never two captions of one image in a batch [on].")
@_flag("compile", "torch.compile the encoder, one static graph per 128-frame length bucket [off].")
@click.option("--compile-mode", type=click.Choice(["default", "reduce-overhead", "max-autotune",
                                                   "max-autotune-no-cudagraphs"]), default=None,
              help="torch.compile mode with --compile: reduce-overhead replays CUDA graphs, fewer kernel "
                   "launches for small batches on a GPU [default].")
@click.option("--dropout", type=click.FloatRange(0, 1, max_open=True), default=None, help="Transformer dropout [0.1].")
@click.option("--data-mode", type=click.Choice(["memory", "stream"]), default=None,
              help="memory: all features in one tensor on the device (default); stream: read WebDataset shards "
                   "(--format wds caches) with reader processes, for caches larger than memory.")
@click.option("--workers", type=click.IntRange(min=0), default=None, help="Reader processes in stream mode [2].")
@click.option("--stream-buffer", type=click.IntRange(min=1), default=None,
              help="Utterances buffered for length bucketing in stream mode [4096].")
@click.option("--threads", type=click.IntRange(min=0), default=None,
              help="CPU threads for torch, 0 = torch's default [seed: 0; demo: 2].")
@_flag("cpu-bf16", "bf16 autocast on the CPU where it computes bf16 natively (AVX512-BF16, AMX) [seed: off; demo: on].")
def train(toml, preset, **options):
    """Train the audio encoder on CACHE's train split, validating on its dev split.

    The first logged loss of a fresh run sits near ln(batch size), the chance level of the loss.
    Multi-GPU: torchrun --nproc-per-node N cli.py train ... (the loss sees the global batch).
    SIGTERM or SIGUSR1 (a scheduler's notice) or Ctrl-C writes RUN_DIR/last.pt after the current step and
    exits with status 128 + the signal's number (143, 138, 130), as if the signal had ended it, so that a job
    script does not take the unfinished run for a finished one; --resume continues from there. A second
    Ctrl-C stops at once, without saving.
    """
    from trainer.config import resolve_config
    from trainer.train import train as run
    options = {k: (str(v) if isinstance(v, Path) else v) for k, v in options.items()}
    cfg = _run(lambda: resolve_config(preset, toml, **options))
    result = _run(run, cfg)
    best = result["best"]
    if best.get("value") is not None:
        click.echo(f"best {best['metric']} {best['value']:.2f} at step {best['step']}; "
                   f"checkpoints in {cfg.out}")
    else:   # no dev split (or no validation yet): say what best.pt is rather than nothing
        click.echo(f"no validation yet (a dev split of 2 or more utterances is validated every --eval-every "
                   f"steps): best.pt holds the weights of step {result['step']}; checkpoints in {cfg.out}")
    if not result["stopped"] and result["step"] < cfg.steps:
        click.echo(f"stopped at step {result['step']} of {cfg.steps} (--stop-after): run the same command with "
                   "--resume to continue")
    if result["stopped"]:   # another process's signal stopped this one: the scheduler's usual SIGTERM
        sys.exit(128 + (result["signal"] or signal.SIGTERM))


@main.command(context_settings=CONTEXT)
@click.option("--cache", required=True, type=click.Path(path_type=Path, file_okay=False), help="Cache folder.")
@click.option("--checkpoint", required=True, type=click.Path(path_type=Path, dir_okay=False),
              help="RUN_DIR/best.pt or last.pt.")
@click.option("--split", type=click.Choice(["test", "dev", "train"]), default="test", show_default=True,
              help="The corpus split to score.")
@click.option("--json", "json_out", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Write the figures as JSON here.")
@click.option("--html", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Write a self-contained HTML report here.")
@click.option("--save-embeddings", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Write the embeddings behind the figures (.npz).")
@click.option("--keywords", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Evaluate only these cached keywords (one per line).")
@click.option("--prompt", default=None, help="Check that the cached keyword prompts used this template.")
@click.option("--device", default="cpu", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--batch-size", type=click.IntRange(min=1), default=None,
              help="Utterances per forward pass [the run's eval_batch_size, 256]: an encoder without a padding "
                   "mask (the seed's) embeds an utterance slightly differently with other padding.")
def evaluate(cache, checkpoint, split, json_out, html, save_embeddings, keywords, prompt, device, batch_size):
    """Six-way retrieval (R@1/5/10) and keyword spotting (mAP, P@10, P@N, EER) on a split."""
    from trainer.evaluate import EvalConfig, evaluate as run, format_table
    cfg = _run(lambda: EvalConfig(cache=cache, checkpoint=checkpoint, split=split, json=json_out, html=html,
                                  save_embeddings=save_embeddings, keywords=keywords, prompt=prompt,
                                  device=device, batch_size=batch_size))
    results, arrays, chance = _run(run, cfg)
    click.echo(format_table(results, chance))
    if html:
        from trainer.evaluate import write_html
        click.echo(f"report: {_run(write_html, cfg, results, arrays)}")


@main.command("make-demo", context_settings=CONTEXT)
@click.option("--out", required=True, type=click.Path(path_type=Path, file_okay=False),
              help="Folder for the corpus (Flickr8k layout), keywords.txt and teacher/.")
@click.option("--images", type=click.IntRange(min=12), default=600, show_default=True,
              help="Drawn scenes, 5 spoken captions each, split 2/3 train, 1/6 dev, 1/6 test.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
              help="The same seed gives byte-identical files.")
@click.option("--workers", type=click.IntRange(min=1), default=None, help="Processes [default: all cores].")
@click.option("--teacher-steps", type=click.IntRange(min=1), default=None,
              help="Training steps of the demo's CLIP teacher [200]; a teacher fitted with other settings is "
                   "refused, not refitted.")
@click.option("--overwrite", is_flag=True, help="Replace a demo corpus made with other settings.")
def make_demo(out, images, seed, workers, teacher_steps, overwrite):
    """Write the synthetic demo corpus and fit its own small CLIP teacher (no network needed).

    Drawn scenes with five true captions each, spoken by espeak-ng voices, in the Flickr8k layout; the teacher
    is saved as an open_clip model folder: use it as --model local-dir:OUT/teacher.
    """
    summary = _make_demo(out, images, seed, workers, teacher_steps, overwrite)
    click.echo(f"demo corpus: {summary['corpus']}\nteacher: {summary['teacher']} "
               f"(use --model local-dir:{summary['teacher']})")


def _make_demo(out, images, seed, workers, teacher_steps, overwrite) -> dict:
    from pipeline.demo.build import MakeDemoConfig, make_demo
    from pipeline.demo.make_demo import DemoConfig
    from pipeline.demo.teacher import TeacherConfig
    from pipeline.extract import default_workers
    teacher = TeacherConfig(seed=seed) if teacher_steps is None else \
        TeacherConfig(seed=seed, steps=teacher_steps, warmup=min(10, teacher_steps))
    cfg = _run(lambda: MakeDemoConfig(DemoConfig(out=out, images=images, seed=seed, overwrite=overwrite,
                                                 workers=workers or default_workers()), teacher))
    summary = _run(make_demo, cfg)
    m = summary["teacher_metrics"]
    i2t, t2i = m["image_to_text"], m["text_to_image"]
    click.echo(f"teacher on the test split: image->text R@1/5/10 {i2t['R@1']:.0f}/{i2t['R@5']:.0f}/{i2t['R@10']:.0f}, "
               f"text->image {t2i['R@1']:.0f}/{t2i['R@5']:.0f}/{t2i['R@10']:.0f}")
    return summary


def _cache_of_another_corpus(corpus: Path, cache: Path) -> bool:
    """Whether cache.json names another corpus (other utterances, captions, splits) than the one at `corpus`."""
    from cache.manifest import read_manifest
    from pipeline.corpus import read_corpus
    from pipeline.extract import corpus_section
    recorded = read_manifest(cache).get("corpus") if cache.is_dir() else None
    if recorded is None:
        return False
    now = corpus_section(read_corpus(corpus, check_files=False))
    same_place = recorded.get("root") == now["root"]   # a demo folder moved elsewhere is followed by the stages
    return recorded.get("ids_sha1") != now["ids_sha1"] or (
        same_place and recorded.get("records_sha1", now["records_sha1"]) != now["records_sha1"])


def _remove_demo_outputs(cache: Path, run: Path, *files: Path) -> None:
    """Deletes a demo's cache, run and report files; refuses folders that are not a cache or a run."""
    import shutil
    for folder, marker in ((cache, "cache.json"), (run, "config.json")):
        if folder.exists() and not (folder / marker).is_file():
            raise FileExistsError(f"{folder}: not a clipspeech {folder.name} (no {marker}), so the demo will not "
                                  "delete it; remove it yourself or choose another --out")
    for folder in (cache, run):
        shutil.rmtree(folder, ignore_errors=True)
    for file in files:
        file.unlink(missing_ok=True)


@main.command(context_settings=CONTEXT)
@click.option("--out", default=Path("demo"), show_default=True, type=click.Path(path_type=Path, file_okay=False),
              help="Holds corpus/, cache/, run/, eval.json and report.html; a rerun reuses what is done.")
@click.option("--images", type=click.IntRange(min=12), default=600, show_default=True, help="Demo corpus size.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
              help="Seed of the demo corpus and its teacher; the student trains with the demo preset's seed.")
@click.option("--workers", type=click.IntRange(min=1), default=None, help="Processes [default: all cores].")
@click.option("--steps", type=click.IntRange(min=1), default=None, help="Student training steps [demo preset].")
@click.option("--teacher-steps", type=click.IntRange(min=1), default=None,
              help="Teacher training steps [200]; must match a teacher already in OUT.")
@click.option("--overwrite", is_flag=True,
              help="Replace a demo corpus made with another --images or --seed in OUT, and with it the cache, "
                   "the run and the report made from the old one.")
def demo(out, images, seed, workers, steps, teacher_steps, overwrite):
    """The whole chain on the built-in demo corpus: make-demo -> extract-audio -> embed-images -> train -> evaluate."""
    import time
    from pipeline.demo.make_demo import split_sizes
    from pipeline.embed import EmbedConfig, embed_images
    from pipeline.extract import ExtractConfig, default_workers, extract_audio
    from trainer.config import resolve_config
    from trainer.evaluate import EvalConfig, evaluate as run_evaluate, format_table, write_html
    from trainer.train import train as run_train
    workers = workers or default_workers()
    corpus, cache, run = out / "corpus", out / "cache", out / "run"
    started = time.perf_counter()
    timings = {}

    def stage(name, fn, *args):
        click.echo(f"== {name}", err=True)
        t = time.perf_counter()
        result = _run(fn, *args)
        timings[name] = time.perf_counter() - t
        if hasattr(result, "lines"):
            click.echo("\n".join(result.lines()), err=True)
        return result

    summary = stage("make-demo", _make_demo, corpus, images, seed, workers, teacher_steps, overwrite)
    if _run(_cache_of_another_corpus, corpus, cache):
        if not overwrite:
            _fail(f"{cache} was made from another demo corpus than {corpus}: pass --overwrite to make the cache, "
                  "the run and the report anew, or choose another --out")
        _run(_remove_demo_outputs, cache, run, out / "eval.json", out / "report.html")
    stage("extract-audio", extract_audio, ExtractConfig(data=corpus, cache=cache, workers=workers))
    stage("embed-images", embed_images, EmbedConfig(data=corpus, cache=cache, model=f"local-dir:{summary['teacher']}",
                                                    workers=min(workers, 2), batch_size=100))
    stage("train", run_train, resolve_config("demo", cache=str(cache), out=str(run), resume=True, steps=steps,
                                             batch_size=min(64, split_sizes(images)["train"])))
    ecfg = EvalConfig(cache=cache, checkpoint=run / "best.pt", json=out / "eval.json", html=out / "report.html")
    results, arrays, chance = stage("evaluate", run_evaluate, ecfg)
    report = _run(write_html, ecfg, results, arrays)
    click.echo(format_table(results, chance))
    click.echo("stages: " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items())
               + f"; total {time.perf_counter() - started:.0f} s")
    click.echo(f"figures: {ecfg.json}\nreport: {report}")


if __name__ == "__main__":
    main()
