#!/usr/bin/env python
"""Fit the demo's CLIP teacher with some TeacherConfig fields changed; print its test retrieval and time.

The measurements behind the teacher table of docs/demo-tuning.md, e.g.

    python benchmarks/demo_teacher.py --corpus demo/corpus                          # the defaults
    python benchmarks/demo_teacher.py --corpus demo/corpus cpu_bf16=false steps=120 lr=0.002
    python benchmarks/demo_teacher.py --corpus demo/corpus model=clipspeech-demo-vit steps=150

--corpus is a make-demo corpus; the teacher is written to a temporary folder and deleted.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.demo.build import teacher_pairs  # noqa: E402
from pipeline.demo.teacher import TeacherConfig, fit_teacher  # noqa: E402

_PARSE = {"int": int, "float": float, "str": str, "bool": lambda v: {"true": True, "false": False}[v.lower()]}


def parse_settings(pairs: list[str]) -> dict:
    """["steps=120", "cpu_bf16=false"] -> {"steps": 120, "cpu_bf16": False}, typed by TeacherConfig."""
    types = {f.name: f.type for f in dataclasses.fields(TeacherConfig)}
    settings = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or name not in types:
            raise SystemExit(f"{pair!r}: expected NAME=VALUE with NAME one of {', '.join(types)}")
        try:
            settings[name] = _PARSE[types[name]](value)
        except (KeyError, ValueError):
            raise SystemExit(f"{pair!r}: {value!r} is not a {types[name]}") from None
    return settings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=Path, required=True, help="a make-demo corpus folder")
    parser.add_argument("settings", nargs="*", help="TeacherConfig fields to change, as NAME=VALUE")
    args = parser.parse_args()
    settings = parse_settings(args.settings)
    try:
        cfg = TeacherConfig(**settings)
    except ValueError as err:
        raise SystemExit(f"teacher settings: {err}") from None
    train, test = teacher_pairs(args.corpus)
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        metrics = fit_teacher(train, test, Path(tmp) / "teacher", cfg)
        seconds = time.perf_counter() - started
    print(json.dumps({"settings": settings, "seconds": round(seconds, 1),
                      "image_to_text": [round(metrics["image_to_text"][f"R@{k}"]) for k in (1, 5, 10)],
                      "text_to_image": [round(metrics["text_to_image"][f"R@{k}"]) for k in (1, 5, 10)]}))


if __name__ == "__main__":
    main()
