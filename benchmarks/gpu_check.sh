#!/usr/bin/env bash
# One prepared device call for `equilibrium` on an H200 (about 5 minutes; budget 8):
#   1. bench_engine.py: PreResNet32, batch 128 — plain eager loop vs engine K=1 vs engine K=32 (target ≥ 10×
#      plain branch-steps/s), eager and with a whole-step CUDA graph;
#   2. gpu_check.py: CUDA-graph equivalence, then the bundled FEC sweep (fixtures/fec-sweep: 5 intrinsic LRs ×
#      2 starts × 8 seeds, horizon 8/λ_e) on a copy outside the repo, interrupted after 5 evaluations and resumed.
# Writes $OUT/bench.json, bench.log, summary.json, sweep.json, curves.csv, sweep.log.
# Run from the repository root:  OUT=/tmp/out bash benchmarks/gpu_check.sh
set -u
OUT=${OUT:?set OUT to an output folder}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/nvidia-smi.txt" 2>&1
START=$(date +%s)
timeout 200 $PY benchmarks/bench_engine.py --model preresnet32 --k 32 --batch 128 --steps 40 --warmup 8 \
  --cuda-graph --json "$OUT/bench.json" > "$OUT/bench.log" 2>&1
echo "bench rc=$? after $(( $(date +%s) - START )) s" | tee -a "$OUT/bench.log"
timeout 270 $PY benchmarks/gpu_check.py "$OUT" > "$OUT/sweep.log" 2>&1
echo "sweep rc=$? after $(( $(date +%s) - START )) s" | tee -a "$OUT/sweep.log"
tail -n 30 "$OUT/bench.log"
tail -n 60 "$OUT/sweep.log"
