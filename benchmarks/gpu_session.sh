#!/usr/bin/env bash
# The GPU figures that issues 4 (embed-images) and 5 (train) still need, in device calls of under 10
# minutes each. On the CPU machine, once: ../shared/gpu/wheels.sh (puts the wheels the GPU box lacks in
# .whl/). Then one device call per phase, carrying .whl:
#
#   run(command="bash benchmarks/gpu_session.sh embed", carry=[".whl"])
#
# Phases (figures land in $OUT, or gpu-out/ outside the device tool):
#   smoke     FIRST, 3-5 minutes (timeout_s=600): tests/test_cuda.py (every GPU path against the CPU's
#             result) and each benchmark at a toy size, so that a bug costs one short call and not a long phase. Its test
#             report lands in $OUT/test_cuda.txt; it goes on to the toy benchmarks when a test fails.
#   embed     embed_images.py: 20,000 Flickr-like JPEGs, ViT-B-32, PIL workers and --gpu-decode (~3 min)
#   train     train_throughput.py at batch 64/256/1024: eager, then --compile; then --compile-mode
#             reduce-overhead (CUDA graphs) at 64/256, the small-batch remedy (~8 min)
#   train-stream  data_path.py (the data path alone: memory mode, 1/2/4/8 stream readers), then
#             train_throughput.py in stream mode (WebDataset shards, 4 reader processes)
#   extract   extract_audio.py: 16 CPU workers against --device "$device" on 20,000 espeak utterances (~5 min)
#   seed-run  the full seed-config run (25k steps, batch 64) on the demo cache, as far as one call allows:
#             train gets SIGTERM before the call's limit, writes last.pt and exits; run the phase again
#             (on the same warm machine: a fresh one loses the run) until metrics.jsonl reaches step
#             25,000. Its elapsed_s is the run's training wall time over all calls. Extra arguments go to
#             train, e.g. `seed-run --compile --compile-mode reduce-overhead`. SEED_RUN_UNTIL=S: train
#             stops S seconds after the phase began (default 570, for a call of its own).
#
#   lease     a 15-minute lease in one call (timeout_s=600): embed, train eager, tests/test_cuda.py,
#             train --compile at 256/1024, then reduce-overhead at 64/256, each capped, in that order
#
#   next      the next lease's first call (timeout_s=420): tests/test_cuda.py, then the embed benchmark
#             (graphed and eager image tower, per-thread clocks, profile of decode_on_device, nvJPEG from
#             pinned memory, the --gpu-decode stage at batch 512 too; its JSON is rewritten after each
#             figure, so a cut-off run keeps what it measured). Checked on the CPU (70 s):
#             GPU_SESSION_DEVICE=cpu NEXT_IMAGES=64 NEXT_BATCH=16 NEXT_CEILING=1 NEXT_NAIVE=4 NEXT_ALSO=32
#   seed-setup  the seed-run's demo corpus and cache (~100 s), once per machine
#
# Budget: 15 device minutes a session since 2026-12, machine start (~30 s) and idle time included; a warm
# machine goes back after 30 s idle, so make the next call at once or give it back. Done on H200s on
# 2026-12-04 (docs/benchmarks.md): lease (smoke tests, embed, train), then next (embed with the decode-ahead
# thread, CUDA graphs at batch 64 with a profile) and the whole seed-run in one call (342 s of training).
# Still to do, in order of need, back to back:
#   run(command="bash benchmarks/gpu_session.sh next", carry=[".whl"], timeout_s=420)
#   run(command="bash benchmarks/gpu_session.sh train-stream", carry=[".whl"], timeout_s=T)
#   run(command="bash benchmarks/gpu_session.sh extract", carry=[".whl"], timeout_s=T), T = budget_left - 10
set -euo pipefail
# GPU_SESSION_DEVICE=cpu runs a phase on the CPU (to check this script; no figure of it is a GPU figure).
phase=${1:?usage: gpu_session.sh next|lease|smoke|embed|train|train-stream|extract|seed-setup|seed-run}
device=${GPU_SESSION_DEVICE:-cuda}
if [ -z "${GPU_SESSION_WHEELS:-}" ] && compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD GPU_SESSION_WHEELS=1   # a phase that runs another: installed once
fi
out=${OUT:-gpu-out}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$out/gpu.txt" ||
  echo "no nvidia-smi" > "$out/gpu.txt"
nproc >> "$out/gpu.txt"
date -u +%F >> "$out/gpu.txt"

demo=/tmp/seed-demo   # the seed-run's demo corpus and cache: kept while the machine stays warm
seed_setup() {
  # make-demo (71 s of it fitting the teacher on an H200 box), extract-audio, embed-images: ~100 s
  if [ ! -f "$demo/ready" ]; then
    rm -rf "$demo"
    python3 cli.py make-demo --out "$demo/corpus" --workers 16
    python3 cli.py extract-audio --data "$demo/corpus" --cache "$demo/cache" --workers 16
    python3 cli.py embed-images --data "$demo/corpus" --cache "$demo/cache" \
      --model "local-dir:$demo/corpus/teacher" --device "$device"
    touch "$demo/ready"
  fi
}

# step CAP CMD...: CMD under a cap of CAP seconds, cut to what is left of the phase's $budget (skipped under
# 40 s), so that one hang costs only its share of a call; a failure is logged and the phase goes on
step() {
  local cap=$1 left=$(( budget - SECONDS )); shift
  if (( left < 40 )); then echo "== skipped, $left s left: $*" >&2; return 0; fi
  (( cap < left )) || cap=$left
  echo "== $(date -u +%T) at ${SECONDS}s, cap ${cap}s: $*"
  timeout -k 10 "$cap" "$@" || echo "== stopped or failed (rc $?): $*" >&2
}

case "$phase" in
  next)
    # The next lease's first call (timeout_s=420): tests/test_cuda.py (the image tower is now a CUDA graph by
    # default: its tests, and the GPU stage tests that now use it), then the embed-images benchmark, with the
    # eager tower's stage and ceiling beside the graphed ones and each thread's wall and CPU seconds, nvJPEG
    # from pageable and from pinned memory, and the --gpu-decode stage again at batch 512.
    budget=${NEXT_SECONDS:-400}
    export PYTHONUNBUFFERED=1
    {
      step 150 bash -c "CLIPSPEECH_TEST_DEVICE=$device python3 -m pytest -q -p no:cacheprovider \
        --durations=5 tests/test_cuda.py > $out/test_cuda.txt 2>&1"
      tail -n 3 "$out/test_cuda.txt" || true
      step "$budget" python3 benchmarks/embed_images.py --images "${NEXT_IMAGES:-20000}" --device "$device" \
        --batch-size "${NEXT_BATCH:-256}" --workers 16 --gpu-decode --ceiling-batches "${NEXT_CEILING:-30}" \
        --naive-images "${NEXT_NAIVE:-200}" --quiet --out /tmp/bench-embed \
        --profile "$out" --also-batch-sizes "${NEXT_ALSO:-512}" --json "$out/embed_images_cuda.json"
      echo "== done at ${SECONDS}s"
    } 2>&1 | tee "$out/next.log" ;;
  smoke)
    CLIPSPEECH_TEST_DEVICE=$device python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py \
      > "$out/test_cuda.txt" 2>&1 || echo "tests/test_cuda.py FAILED: see $out/test_cuda.txt" >&2
    tail -n 5 "$out/test_cuda.txt"
    python3 benchmarks/embed_images.py --images 256 --device "$device" --batch-size 64 --workers 4 \
      --gpu-decode --naive-images 16 --ceiling-batches 1 --quiet --out /tmp/smoke-embed \
      --json "$out/smoke_embed.json"
    for mode in memory stream; do
      python3 benchmarks/train_throughput.py --device "$device" --batch-sizes 64 --steps 3 --warmup 1 \
        --repeats 1 --layers 2 --data-mode $mode --workers 2 --json "$out/smoke_train_$mode.json"
    done
    python3 benchmarks/extract_audio.py --utterances 100 --workers 4 --device "$device" --repeats 1 \
      --out /tmp/smoke-extract --json "$out/smoke_extract.json" ;;
  embed)
    python3 benchmarks/embed_images.py --images 20000 --device "$device" --batch-size 256 --workers 16 \
      --gpu-decode --ceiling-batches 30 --quiet --out /tmp/bench-embed --json "$out/embed_images_cuda.json" ;;
  train)
    python3 benchmarks/train_throughput.py --device "$device" --json "$out/train_throughput_cuda.json"
    python3 benchmarks/train_throughput.py --device "$device" --compile --json "$out/train_throughput_cuda_compile.json"
    python3 benchmarks/train_throughput.py --device "$device" --compile --compile-mode reduce-overhead \
      --batch-sizes 64,256 --json "$out/train_throughput_cuda_cudagraphs.json" ;;
  train-stream)
    python3 benchmarks/data_path.py --device "$device" --readers 1 2 4 8 --utterances 32768 \
      --json "$out/data_path_cuda.json"
    python3 benchmarks/train_throughput.py --device "$device" --data-mode stream --workers 4 \
      --json "$out/train_throughput_cuda_stream.json" ;;
  extract)
    python3 benchmarks/extract_audio.py --utterances 20000 --workers 16 --device "$device" --repeats 1 \
      --out /tmp/bench-extract --json "$out/extract_audio_cuda.json" ;;
  seed-setup)
    seed_setup ;;
  seed-run)
    seed_setup
    resume=()
    [ -f "$demo/run/last.pt" ] && resume=(--resume)
    # whatever happens below, the run's log comes back with the call
    trap 'cp "$demo/run/metrics.jsonl" "$demo/run/config.json" "$out/" 2>/dev/null || true' EXIT
    left=$(( ${SEED_RUN_UNTIL:-570} - SECONDS ))   # of a 10-minute call, after the demo's set-up
    if (( left < 60 )); then
      echo "only $left s left in this call after the set-up: run the phase again to train" >&2; exit 0
    fi
    start=$(date +%s)
    # SIGTERM to train alone (--foreground: not to its compile workers) makes it write last.pt after its
    # step and exit, so the next call resumes exactly here; -k: SIGKILL if it has not exited 20 s later
    timeout --foreground -k 20 "$left" python3 cli.py train --cache "$demo/cache" --out "$demo/run" \
      --preset seed --device "$device" "${resume[@]}" "${@:2}" ||
      echo "train stopped at the call's limit: run the phase again to resume" >&2
    echo "$(( $(date +%s) - start )) s for this call (set-up included); the run's own clock is" \
      "metrics.jsonl's elapsed_s (training wall seconds over all calls)" >> "$out/seed_run_wall.txt" ;;
  lease)
    # All that one 15-minute lease allows (machine start included), in ONE call with timeout_s=600, the
    # figures the issues need first. Each step has a cap, so that one hang costs only its share, and
    # writes its figures to $out when it ends; the whole log is $out/lease.log.
    budget=${LEASE_SECONDS:-555}
    # smaller sizes only to check this script on the CPU (GPU_SESSION_DEVICE=cpu LEASE_IMAGES=64 ...)
    images=${LEASE_IMAGES:-20000} sizes=${LEASE_BATCHES:-64,256,1024} small=${LEASE_BATCHES:-64,256}
    big=${LEASE_BATCHES:-256,1024}   # compile default mode where REFERENCE.md has ceilings; 64 gets CUDA graphs
    steps=${LEASE_STEPS:-50} utts=${LEASE_UTTERANCES:-10240}   # one synthetic train cache for all three
    export PYTHONUNBUFFERED=1
    {
      step 120 python3 benchmarks/embed_images.py --images "$images" --device "$device" \
        --batch-size "${LEASE_EMBED_BATCH:-256}" --workers "${LEASE_WORKERS:-16}" --gpu-decode \
        --ceiling-batches "${LEASE_CEILING_BATCHES:-30}" --quiet --out /tmp/bench-embed \
        --json "$out/embed_images_cuda.json"
      step 90 python3 benchmarks/train_throughput.py --device "$device" --cache /tmp/bench-train --utterances "$utts" \
        --batch-sizes "$sizes" --steps "$steps" --json "$out/train_throughput_cuda.json"
      step 150 bash -c "CLIPSPEECH_TEST_DEVICE=$device python3 -m pytest -q -p no:cacheprovider \
        --durations=5 tests/test_cuda.py > $out/test_cuda.txt 2>&1"
      tail -n 3 "$out/test_cuda.txt" || true
      step 170 python3 benchmarks/train_throughput.py --device "$device" --cache /tmp/bench-train --utterances "$utts" --compile \
        --batch-sizes "$big" --steps "$steps" --json "$out/train_throughput_cuda_compile.json"
      step 120 python3 benchmarks/train_throughput.py --device "$device" --cache /tmp/bench-train --utterances "$utts" --compile \
        --compile-mode reduce-overhead --batch-sizes "$small" --steps "$steps" --json "$out/train_throughput_cuda_cudagraphs.json"
      echo "== done at ${SECONDS}s"
    } 2>&1 | tee "$out/lease.log" ;;
  *)
    echo "unknown phase $phase: use next, lease, smoke, embed, train, train-stream, extract, seed-setup or" \
      "seed-run" >&2; exit 2 ;;
esac
