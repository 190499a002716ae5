#!/usr/bin/env bash
# The one GPU check (issues 2 and 7), run on the lent GPU machine from the repository root with
# a binary built on the CPU machine (carry target/release/adamcu). That machine has Python with
# torch 2.11.0 but no Rust; the binary uses its torch/lib through LD_LIBRARY_PATH.
#   device tool: run(command="scripts/gpu-check.sh", carry=["target/release/adamcu"])
# Each section runs even when one before it failed (one lease may be all a task gets); the
# script exits non-zero if any did. With $OUT set (the device tool), the whole log lands there.
# A dry run on the CPU machine before a lease (about 3 minutes; the step benchmark only at
# small sizes, with a Python that has torch and torchvision):
#   DEVICE=cpu SYNTH_IMAGES=4 SOURCE_STEPS=1 ADA_STEPS=2 SOURCE_SIZE=40x72 TARGET_SIZE=32x64 \
#   ITERATIONS=2 WARMUP=1 PYTHON=$LIBTORCH/../../../../bin/python scripts/gpu-check.sh
set -uo pipefail
if [[ -n "${OUT:-}" ]]; then exec > >(tee "$OUT/gpu-check.log") 2>&1; fi
failed=()
section() { # section NAME COMMAND...: runs one check, remembers a failure
  local name=$1; shift
  echo "== $name"
  "$@" || { echo "!! $name failed (exit $?)"; failed+=("$name"); }
}
BIN=${ADAMCU_BIN:-target/release/adamcu}
# The machine's own torch/lib (elsewhere, e.g. a dry run here, the binary's rpath finds libtorch).
if TORCH_DIR=$(python3 -c 'import torch,os;print(os.path.dirname(torch.__file__))' 2>/dev/null); then
  export LD_LIBRARY_PATH="$TORCH_DIR/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi
if command -v nvidia-smi >/dev/null; then nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true; fi

DEVICE=${DEVICE:-cuda}
# Without CUDA every later check would run on the CPU at the paper's sizes for the whole
# lease: stop here instead. The later ones also ask for run.device = $DEVICE explicitly.
if ! "$BIN" doctor --device "$DEVICE"; then
  echo "!! adamcu doctor --device $DEVICE failed: no such device for this binary here; nothing else was run"
  exit 1
fi

# DeepLab v2 ResNet-101, batch 2 source 720x1280 + 2 target 512x1024; seg-only and full
# ADA-MCU; fp32 and bf16 + channels-last. Targets: our full step <= 1.1x the reference's seg
# step and <= 0.75x its full step; peak memory <= the reference's (the bench prints the
# ratios and both memories after its table). One warm-up step of each
# row runs under libtorch's sync check: "host waits ... none" means the step never waited;
# the same step's most called operators (with their dispatch time there) follow each row.
# On another device (a dry run) only at the sizes SOURCE_SIZE and TARGET_SIZE give: the
# paper's would take hours on a CPU.
if [[ $DEVICE == cuda* || -n "${SOURCE_SIZE:-}" ]]; then
  section "training step: adamcu beside bench/reference/ada_mcu_step.py, same shapes, same card" \
    "$BIN" bench step --config pipelines/gta5-cityscapes.toml --set "run.device=\"$DEVICE\"" \
    --source-size "${SOURCE_SIZE:-720x1280}" --target-size "${TARGET_SIZE:-512x1024}" \
    --iterations "${ITERATIONS:-20}" --warmup "${WARMUP:-5}" --top-ops 12 --python "${PYTHON:-python3}"
fi

# The translation stage (Algorithm 1, line 1) at the paper config's sizes: the CycleGAN
# generator (ngf 64, 9 blocks) translating GTA5-sized frames, one training iteration at the
# 256x256 crop, and FDA, each beside bench/reference/translate_bench.py (PyTorch, same networks).
# On another device only at TRANSLATE_SIZE (and TRANSLATE_SETS).
section "translation stage: CycleGAN generator, a training iteration and FDA, images/s" \
  "$BIN" bench translate --config pipelines/gta5-cityscapes.toml --set "run.device=\"$DEVICE\"" \
  --size "${TRANSLATE_SIZE:-1052x1914}" --iterations "${ITERATIONS:-5}" --python "${PYTHON:-python3}" ${TRANSLATE_SETS:-}

# The synthetic benchmark at 2048x1024 (like Cityscapes; GTA5 frames are 1914x1052) in the
# real layouts, read through pipelines/gta5-cityscapes.toml with random weights (no ImageNet
# file on this machine), so BatchNorm on batch statistics: the stored ones of an untrained
# ResNet-101 diverge at once. In bf16 + channels-last, the fastest trainer, which needs the
# loaders most. Target: the status lines show the trainer waiting < 2 % for data.
data_wait() {
  WORK=${WORK:-$(mktemp -d)}
  "$BIN" datasets synth --set "synth.root=\"$WORK/synth\"" --set synth.width=2048 --set synth.height=1024 \
    --set "synth.source_images=${SYNTH_IMAGES:-120}" --set "synth.target_train_images=${SYNTH_IMAGES:-120}" \
    --set synth.target_val_images=2 2>&1 || return
  grep -v '^pretrained' pipelines/gta5-cityscapes.toml > "$WORK/paper-synth.toml"
  # Algorithm 1 from line 1, by FDA on the device (the paper config's CycleGAN would train
  # for days at these sizes; the translation section below times it).
  GTA5_TRANSLATED="$WORK/synth/source_translated" GTA5_ROOT="$WORK/synth/source" CITYSCAPES_ROOT="$WORK/synth/target" \
    "$BIN" train --config "$WORK/paper-synth.toml" --stage all --set "run.runs_dir=\"$WORK/runs\"" --set "run.device=\"$DEVICE\"" \
    --set 'translate.method="fda"' \
    --set "train.source_iterations=${SOURCE_STEPS:-20}" --set "active.iterations=${ADA_STEPS:-300}" \
    --set train.log_every=50 --set 'model.bn_stats="batch"' --set 'train.precision="bf16"' \
    --set train.channels_last=true ${EXTRA_SETS:-} 2>&1
}
section "data wait: the daemon with the loaders on, paper's network and sizes, synthetic frames" data_wait

# RIPU (issue 33) at its published sizes (target 1280x640, source 1280x720) on the same
# synthetic frames: two selection rounds (the whole target set scored in eval mode at the
# ledger's size, 3x3 regions bought) and the steps between them with RIPU's losses, on the
# device. Target: the run finishes, each round's log line shows its share bought, and the
# status lines show the step rate. With online FDA, so the loader's rustfft swap runs too
# (no translated set is written: the raw frames are restyled as they load).
ripu_rounds() {
  WORK=${WORK:-$(mktemp -d)}
  [[ -d "$WORK/synth/target" ]] || { echo "no synthetic frames (the data wait section failed)"; return 1; }
  grep -v '^pretrained' pipelines/gta5-cityscapes-ripu.toml > "$WORK/ripu-synth.toml"
  local steps=${ADA_STEPS:-40}
  GTA5_TRANSLATED="$WORK/synth/source_translated" GTA5_ROOT="$WORK/synth/source" CITYSCAPES_ROOT="$WORK/synth/target" \
    "$BIN" train --config "$WORK/ripu-synth.toml" --stage all --set "run.runs_dir=\"$WORK/runs-ripu\"" \
    --set "run.device=\"$DEVICE\"" --set 'translate.method="fda"' --set 'translate.fda_mode="online"' \
    --set "active.rounds=[0, $((steps / 2))]" --set "active.iterations=$steps" --set "active.poly_horizon=$((steps * 2))" \
    --set train.log_every=10 --set 'model.bn_stats="batch"' ${EXTRA_SETS:-} 2>&1
}
section "RIPU: selection rounds and round steps at RIPU's sizes, online FDA in the loader" ripu_rounds

# Data-parallel on NCCL (issue 34): `doctor` says whether the binary has the NCCL backend
# ("c10d gloo, nccl"); then the step benchmark as one process and as one rank per GPU (c10d's
# NCCL, the Reducer's buckets, SyncBatchNorm; the efficiency line), and the embedded default's
# run (translation, source, ADA-MCU) as one process and with --nproc, which must spend the same
# budget. NCCL takes one GPU per rank, so with one GPU there is nothing to run: the section
# says so and passes.
nccl_ranks() {
  local gpus
  gpus=$(nvidia-smi --list-gpus 2>/dev/null | wc -l)
  "$BIN" doctor --device "$DEVICE" | grep "c10d .*nccl" >/dev/null || { echo "this binary has no NCCL backend (DEVELOPERS.md)"; return 1; }
  if ((gpus < 2)); then echo "skipped: $gpus GPU(s); NCCL needs one GPU per rank and at least 2 ranks"; return 0; fi
  "$BIN" bench step --config pipelines/synth.toml --set "run.device=\"$DEVICE\"" --iterations "${ITERATIONS:-20}" \
    --warmup "${WARMUP:-5}" --nproc "$gpus" || return 1
  WORK=${WORK:-$(mktemp -d)}
  ADAMCU_DATA="$WORK/data" "$BIN" datasets synth --config pipelines/synth.toml || return 1
  # The first run writes the translated source (rank 0 of the second would otherwise). Each
  # run's budget as `adamcu status` reads it from status.json ("budget Ma/Me px ..."). The
  # embedded default's schedule spends all of Me, which both must reach: a shorter run's partial
  # spend follows the weights, which rounding makes differ between one process and N ranks
  # (4 ADA steps on the CPU: 25,893 against 25,579 px).
  local nproc args budgets=()
  for nproc in 1 "$gpus"; do
    args=()
    ((nproc > 1)) && args=(--nproc "$nproc")
    ADAMCU_DATA="$WORK/data" "$BIN" train --config pipelines/synth.toml --set "run.device=\"$DEVICE\"" \
      --set "run.runs_dir=\"$WORK/runs-nccl-$nproc\"" \
      "${args[@]}" 2>&1 | tail -5
    ((PIPESTATUS[0] == 0)) || return 1
    budgets+=("$("$BIN" status "$WORK/runs-nccl-$nproc/synth" | grep -o 'budget [0-9]*/[0-9]* px')")
  done
  echo "one process: ${budgets[0]}; $gpus ranks: ${budgets[1]}"
  [[ -n ${budgets[0]} && ${budgets[0]} == "${budgets[1]}" ]] || { echo "the runs spent different budgets"; return 1; }
}
section "data-parallel: c10d's NCCL, one rank per GPU (step benchmark, a --nproc run's budget)" nccl_ranks

if ((${#failed[@]})); then echo "failed: ${failed[*]}"; exit 1; fi
echo "all GPU checks ran"
