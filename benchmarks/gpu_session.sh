#!/usr/bin/env bash
# The GPU figures that issues 4 (embed-images) and 5 (train) still need, in device calls of under 10
# minutes each. On the CPU machine, once: ../shared/gpu/wheels.sh (puts the wheels the GPU box lacks in
# .whl/). Then one device call per phase, carrying .whl:
#
#   run(command="bash benchmarks/gpu_session.sh embed", carry=[".whl"])
#
# Phases (figures land in $OUT, or gpu-out/ outside the device tool):
#   embed     embed_images.py: 20,000 Flickr-like JPEGs, ViT-B-32, PIL workers and --gpu-decode (~3 min)
#   train     train_throughput.py at batch 64/256/1024: eager, then --compile (~6 min)
#   train-stream  the same in stream mode (WebDataset shards, 4 reader processes)
#   extract   extract_audio.py: 16 CPU workers against --device cuda on 20,000 espeak utterances (~5 min)
#   seed-run  the full seed-config run (25k steps, batch 64) on the demo cache; stops after 12,500 steps
#             and writes the wall time so far: run the phase twice (the second call resumes to 25k) -
#             but a fresh machine loses the run, so both calls must hit the same warm machine.
set -euo pipefail
phase=${1:?usage: gpu_session.sh embed|train|train-stream|extract|seed-run}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD
out=${OUT:-gpu-out}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$out/gpu.txt"
nproc >> "$out/gpu.txt"
date -u +%F >> "$out/gpu.txt"

case "$phase" in
  embed)
    python3 benchmarks/embed_images.py --images 20000 --device cuda --batch-size 256 --workers 16 \
      --gpu-decode --out /tmp/bench-embed --json "$out/embed_images_cuda.json" ;;
  train)
    python3 benchmarks/train_throughput.py --device cuda --json "$out/train_throughput_cuda.json"
    python3 benchmarks/train_throughput.py --device cuda --compile --json "$out/train_throughput_cuda_compile.json" ;;
  train-stream)
    python3 benchmarks/train_throughput.py --device cuda --data-mode stream --workers 4 \
      --json "$out/train_throughput_cuda_stream.json" ;;
  extract)
    python3 benchmarks/extract_audio.py --utterances 20000 --workers 16 --device cuda --repeats 1 \
      --out /tmp/bench-extract --json "$out/extract_audio_cuda.json" ;;
  seed-run)
    demo=/tmp/seed-demo
    if [ ! -f "$demo/cache/cache.json" ]; then
      python3 cli.py make-demo --out "$demo/corpus" --workers 16
      python3 cli.py extract-audio --data "$demo/corpus" --cache "$demo/cache" --workers 16
      python3 cli.py embed-images --data "$demo/corpus" --cache "$demo/cache" \
        --model "local-dir:$demo/corpus/teacher" --device cuda
    fi
    resume=()
    [ -f "$demo/run/last.pt" ] && resume=(--resume)
    start=$(date +%s)
    python3 cli.py train --cache "$demo/cache" --out "$demo/run" --preset seed --device cuda \
      --stop-after 12500 "${resume[@]}"
    echo "$(( $(date +%s) - start )) s for this call" >> "$out/seed_run_wall.txt"
    cp "$demo/run/metrics.jsonl" "$demo/run/config.json" "$out/" ;;
  *)
    echo "unknown phase $phase: use embed, train, train-stream, extract or seed-run" >&2; exit 2 ;;
esac
