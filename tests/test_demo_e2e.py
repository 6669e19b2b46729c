"""The demo command end to end on a reduced demo corpus, and what evaluate writes (JSON schema, embeddings)."""
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from trainer.metrics import keyword_spotting, six_way_retrieval

ROOT = Path(__file__).resolve().parents[1]
PAIRS = {"audio_to_image", "audio_to_text", "image_to_audio", "image_to_text", "text_to_audio", "text_to_image"}
RETRIEVAL_KEYS = {"R@1", "R@5", "R@10", "median_rank", "mean_rank"}
KEYWORD_KEYS = {"mAP", "micro_AP", "P@10", "P@N", "EER", "per_keyword"}


def cli(*args, cwd=ROOT):
    return subprocess.run([sys.executable, str(ROOT / "cli.py"), *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=900)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "demo"
    done = cli("demo", "--out", out, "--images", 18, "--steps", 40, "--teacher-steps", 20, "--workers", 2)
    assert done.returncode == 0, done.stderr[-3000:]
    return out, done


@pytest.mark.slow
def test_demo_writes_everything_and_prints_the_table(demo_run):
    out, done = demo_run
    for name in ("corpus/flickr_audio/wav2capt.txt", "corpus/teacher/open_clip_config.json", "cache/cache.json",
                 "run/best.pt", "run/last.pt", "run/metrics.jsonl", "run/curves.png", "eval.json", "report.html"):
        assert (out / name).is_file(), name
    for label in ("audio -> image", "image -> audio", "text -> image", "keyword spotting: mAP"):
        assert label in done.stdout
    assert f"report: {out / 'report.html'}" in done.stdout
    first = json.loads((out / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["step"] == 1 and abs(first["loss"] - math.log(first["batch_size"])) < 1.0


def test_eval_json_has_exactly_the_documented_shape(demo_run):
    out, _ = demo_run
    results = json.loads((out / "eval.json").read_text())
    assert set(results) == {"split", "counts", "retrieval", "keyword_spotting"}
    assert results["split"] == "test"
    assert set(results["counts"]) == {"audio", "images", "texts", "keywords"}
    assert results["counts"]["audio"] == 5 * results["counts"]["images"]
    assert set(results["retrieval"]) == PAIRS
    for pair in PAIRS:
        assert set(results["retrieval"][pair]) == RETRIEVAL_KEYS
        assert 0 <= results["retrieval"][pair]["R@1"] <= results["retrieval"][pair]["R@10"] <= 100
    assert set(results["keyword_spotting"]) == KEYWORD_KEYS
    words = (out / "corpus" / "keywords.txt").read_text().split()
    assert set(results["keyword_spotting"]["per_keyword"]) == set(words)
    for stats in results["keyword_spotting"]["per_keyword"].values():
        assert set(stats) == {"AP", "P@10", "P@N", "EER", "n_relevant"}


def test_saved_embeddings_reproduce_the_figures(demo_run, tmp_path):
    out, _ = demo_run
    npz, js = tmp_path / "emb.out", tmp_path / "eval.json"      # written where asked, .npz or not
    done = cli("evaluate", "--cache", out / "cache", "--checkpoint", out / "run" / "best.pt", "--json", js,
               "--save-embeddings", npz)
    assert done.returncode == 0, done.stderr[-2000:]
    e = np.load(npz)
    assert set(e.files) == {"audio", "audio_ids", "audio_image_ids", "audio_caption_ids", "audio_text", "image",
                            "image_ids", "text", "text_ids", "text_image_ids", "keyword", "keywords"}
    assert not list(tmp_path.glob("*.npz"))
    caption_of = {}
    for line in (out / "cache" / "records.jsonl").read_text().splitlines():
        r = json.loads(line)
        caption_of[r["utt_id"]] = r["caption_id"]
    assert list(e["audio_caption_ids"]) == [caption_of[u] for u in e["audio_ids"]]
    retrieval = six_way_retrieval(e["audio"], list(e["audio_image_ids"]), list(e["audio_caption_ids"]),
                                  e["image"], list(e["image_ids"]), e["text"], list(e["text_ids"]),
                                  list(e["text_image_ids"]))
    kws = keyword_spotting(e["audio"], e["keyword"], list(e["audio_text"]), list(e["keywords"]))
    results = json.loads(js.read_text())
    for pair in PAIRS:
        assert retrieval[pair]["R@10"] == pytest.approx(results["retrieval"][pair]["R@10"])
    assert kws["mAP"] == pytest.approx(results["keyword_spotting"]["mAP"])


@pytest.mark.slow
def test_a_rerun_reuses_what_is_done(demo_run):
    out, _ = demo_run
    before = (out / "eval.json").read_text()
    log = (out / "run" / "metrics.jsonl").read_text()
    teacher = (out / "corpus" / "teacher" / "open_clip_model.safetensors").stat().st_mtime
    done = cli("demo", "--out", out, "--images", 18, "--steps", 40, "--teacher-steps", 20, "--workers", 2)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "this run wrote 0 parts" in done.stderr   # extract-audio found every part complete
    assert (out / "corpus" / "teacher" / "open_clip_model.safetensors").stat().st_mtime == teacher
    assert (out / "run" / "metrics.jsonl").read_text() == log   # nothing trained twice
    assert json.loads((out / "eval.json").read_text())["retrieval"] == json.loads(before)["retrieval"]

    # other teacher settings on the same corpus: refused, not silently ignored (the cache holds its embeddings)
    other = cli("make-demo", "--out", out / "corpus", "--images", 18, "--teacher-steps", 21, "--workers", 2)
    assert other.returncode != 0 and "Traceback" not in other.stderr
    assert "was fitted with other settings" in other.stderr and "steps: it has 20, requested 21" in other.stderr
    assert (out / "corpus" / "teacher" / "open_clip_model.safetensors").stat().st_mtime == teacher


@pytest.mark.slow
def test_overwrite_replaces_a_demo_of_other_settings_with_its_cache_and_run(demo_run, tmp_path):
    """The refusal says to pass --overwrite, which demo takes: the corpus is made anew, and the cache, run and
    report of the old corpus go with it (extract-audio would refuse the old cache for the new corpus)."""
    import shutil
    out = tmp_path / "demo"
    shutil.copytree(demo_run[0], out)
    args = ["demo", "--out", out, "--images", 12, "--steps", 5, "--teacher-steps", 20, "--workers", 2]
    refused = cli(*args)
    assert refused.returncode == 1 and "pass --overwrite to replace it" in refused.stderr
    done = cli(*args, "--overwrite")
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((out / "corpus" / "demo_config.json").read_text())["images"] == 12
    assert json.loads((out / "cache" / "cache.json").read_text())["corpus"]["utterances"] == 12 * 5
    steps = [json.loads(line)["step"] for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) == 5 and (out / "eval.json").is_file()


def test_evaluate_on_chosen_keywords(demo_run, tmp_path):
    out, _ = demo_run
    words = (out / "corpus" / "keywords.txt").read_text().split()
    chosen = tmp_path / "chosen.txt"
    chosen.write_text(f"# two of them\n{words[0]}\n\n{words[3].upper()}\n{words[0]}\n")
    base = ["evaluate", "--cache", out / "cache", "--checkpoint", out / "run" / "best.pt"]
    done = cli(*base, "--keywords", chosen, "--json", tmp_path / "eval.json")
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads((tmp_path / "eval.json").read_text())
    assert sorted(results["keyword_spotting"]["per_keyword"]) == sorted([words[0], words[3]])
    assert results["counts"]["keywords"] == 2
    for content, message in [("\n# nothing\n", "no keywords in this file"),
                             ("zebra\n", "keywords not embedded in")]:
        chosen.write_text(content)
        done = cli(*base, "--keywords", chosen)
        assert done.returncode == 1 and message in done.stderr and "Traceback" not in done.stderr
    # the way out keeps the cache's other keywords and its prompt
    assert f"clipspeech embed-images --data {out / 'corpus'} --cache {out / 'cache'} --model local-dir:PATH " \
           "--keywords FILE --prompt 'this is a photo of a {}'` with a FILE of every keyword to keep" in done.stderr
    done = cli(*base, "--keywords", tmp_path / "absent.txt")
    assert done.returncode == 1 and "absent.txt: no such file" in done.stderr and "Traceback" not in done.stderr
