"""How long reading a SpokenCOCO-sized corpus takes, which every extract-audio and embed-images job pays
before its first utterance: `read_spokencoco` as it is, against the same reader with pathlib joins and the
cyclic garbage collector running (how it read before), and against json.loads of the same files alone
(the floor), in one process.

    python benchmarks/corpus_read.py                  # Karpathy sizes: 123,287 images, 616,435 utterances
    python benchmarks/corpus_read.py --images 20000

The metadata is written in SpokenCOCO's layout (SpokenCOCO_{train,val,test}_karpathy.json, 5 captions an
image with uttid, speaker, wav and text); no audio or image files are made, so the readers run with
check_files=False and the figures leave out the file-existence checks (benchmarks/corpus_check.py times
those). Figures are the best of --repeats wall-clock rounds, the ways alternating.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cache.manifest import read_utf8, records_text  # noqa: E402
from pipeline import corpus as corpus_module  # noqa: E402
from pipeline.extract import corpus_section  # noqa: E402

SPLITS = (("train", "train2014"), ("val", "val2014"), ("test", "val2014"))


def write_spokencoco(root: Path, images: int) -> int:
    """SpokenCOCO-like metadata for `images` images (5,000 each for val and test, the rest train); the
    number of utterances."""
    sizes = {"val": min(5000, images // 4), "test": min(5000, images // 4)}
    sizes["train"] = images - sizes["val"] - sizes["test"]
    count = 0
    for split, folder in SPLITS:
        data = []
        for i in range(sizes[split]):
            image = f"{folder}/COCO_{folder}_{count // 5:012d}.jpg"
            captions = []
            for k in range(5):
                speaker = f"m{(count * 7919) % 10 ** 9:x}"
                utt = f"{speaker}-3LXH6OKH4N6LP8OWLPN55PXKKAPPJDG_{count // 5}_{k}"
                captions.append({"text": "A man riding a wave on top of a surfboard.", "speaker": speaker,
                                 "uttid": utt, "wav": f"wavs/{split}/{k}/{utt}.wav"})
                count += 1
            data.append({"image": image, "captions": captions})
        (root / f"SpokenCOCO_{split}_karpathy.json").write_text(json.dumps({"data": data}))
    return count


def _pathlib_join(root: str, rel: str) -> str:
    return str(Path(root) / rel)


@contextlib.contextmanager
def before():
    """The reader as it was: a pathlib join per path, the garbage collector running."""
    kept = corpus_module._under, corpus_module.read_spokencoco
    corpus_module._under = _pathlib_join
    corpus_module.read_spokencoco = corpus_module.read_spokencoco.__wrapped__
    try:
        yield
    finally:
        corpus_module._under, corpus_module.read_spokencoco = kept


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=123_287)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        utterances = write_spokencoco(root, args.images)
        files = sorted(root.glob("SpokenCOCO_*.json"))

        def now():
            corpus = corpus_module.read_spokencoco(root, check_files=False)
            assert len(corpus.utterances) == utterances
            return corpus

        def then():
            with before():
                return corpus_module.read_spokencoco(root, check_files=False)

        a, b = now(), then()   # the two ways read the same corpus
        assert a.utterances == b.utterances and a.root == b.root
        del b
        best = {"json.loads alone": [], "read_spokencoco": [], "before (pathlib, gc on)": []}
        # what each extract-audio job pays to know whether records.jsonl still says what the corpus says:
        # the digests of cache.json's corpus section, against writing the records' JSON to compare it
        follow = {"corpus section (digests)": [], "records.jsonl's JSON": []}
        for _ in range(args.repeats):
            best["json.loads alone"].append(timed(lambda: [json.loads(read_utf8(f)) for f in files]))
            best["read_spokencoco"].append(timed(now))
            best["before (pathlib, gc on)"].append(timed(then))
            follow["corpus section (digests)"].append(timed(lambda: corpus_section(a)))
            follow["records.jsonl's JSON"].append(timed(lambda: records_text([u.to_dict() for u in a.utterances])))

    print(f"{platform.python_implementation()} {platform.python_version()} on {platform.machine()}; "
          f"{utterances:,} utterances of {args.images:,} images; best of {args.repeats}")
    floor = min(best["json.loads alone"])
    for name, times in best.items():
        t = min(times)
        print(f"  {name:26s} {t:6.2f} s  {utterances / t / 1000:7.0f}k utt/s  {t / floor:5.1f}x json.loads")
    print(f"  speed-up over before: {min(best['before (pathlib, gc on)']) / min(best['read_spokencoco']):.2f}x")
    print("whether records.jsonl follows the corpus:")
    for name, times in follow.items():
        print(f"  {name:26s} {min(times):6.2f} s")


if __name__ == "__main__":
    main()
