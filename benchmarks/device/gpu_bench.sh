#!/usr/bin/env bash
# One GPU lease (about 10 minutes on one H100/H200): the evidence that needs a GPU, in priority order.
# Run from the repository root on the device machine, with the LA copy packed by la_transfer.py in .dev/la
# and the wheels the image lacks in .whl (monai, nibabel, pynrrd). Writes logs and a tarball under $OUT.
#   1. smoke: every method of the synthetic protocol trained and evaluated on CUDA (stops here on failure)
#   1b. the la3d table (issue 44: LA in 3D at 112x112x80 on la2d's splits): LA3D_METHODS x 8, 16 labelled x seeds
#      0-2, LA3D_JOBS runs at a time, for at most LA3D_S seconds and until LA3D_END seconds into the call; LA3D_FROM
#      holds the finished runs of an earlier call (the tarball keeps no checkpoints: an unfinished run starts again)
#   2. ssl4mis: the la2d-ssl4mis protocol (the baselines as their originals train them: SSL4MIS's U-Net, SGD,
#      30000 iterations; issue 13), 8 labelled, seeds 0-2, SSL4MIS_METHODS (default supervised,mean-teacher)
#   3. the la2d table: the protocol's methods x 8, 16 labelled x seeds 0, 1, 2 (LA2D_ARGS adds methods)
#   4. bench-speed on the GPU: fp32 vs bf16 autocast vs channels-last
#   5. predict (teacher ensemble + uncertainty, DDIM) and export on a la2d run
#   6. the la3d-full protocol for a few steps (step time -> cost of the full protocol)
# PARTS picks some of them (default smoke,la3d: the 3D table first); SSL4MIS_S and LA2D_S
# bound those benches' seconds (SSL4MIS_STEPS shortens its runs, SSL4MIS_MORE adds methods for the time left),
# SSL4MIS_JOBS and LA2D_JOBS their runs at a time, LA2D_ARGS adds bench options (e.g. --ablation weight),
# LA2D_FROM / SSL4MIS_FROM (folders in the tree) hold the runs of a bench cut short to go on with.
# MPS=1 (default) starts CUDA's multi-process service first: runs sharing the GPU then run their small kernels side
# by side instead of in turns (2026-12-04, six SSL4MIS-U-Net training steps at once: 330 steps/s together with it,
# 143 without; benchmarks/device/mps_probe.py); MPS=0 leaves it off.
set -u
PARTS=,${PARTS:-smoke,la3d},
part() { [[ $PARTS == *,$1,* ]]; }
OUT=${OUT:-/tmp/out}; T=/tmp/work; mkdir -p "$OUT" "$T"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD/src:/tmp/site
SD="python3 -m superdiffusion"
LA2D_S=${LA2D_S:-330}; LA2D_JOBS=${LA2D_JOBS:-8}; LA2D_ARGS=${LA2D_ARGS:-}
t0=$(date +%s); stamp() { echo "== $(( $(date +%s) - t0 )) s: $*"; }
stamp setup
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, monai; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'monai', monai.__version__)"
python3 benchmarks/device/la_transfer.py unpack .dev/la /tmp/LA || exit 1
if [ "${MPS:-1}" = 1 ]; then  # stopped on any exit (a TERM from a timeout included), so no call leaves it running
  if nvidia-cuda-mps-control -d; then
    echo "MPS started"; trap 'echo quit | timeout 10 nvidia-cuda-mps-control || true' EXIT; trap 'exit 143' TERM
  else echo "MPS not started"; fi
fi

if part smoke; then
stamp smoke
$SD bench --protocol synthetic --methods supervised,fully-supervised,mean-teacher,ua-mt,cps,bcp,superdiffusion \
  --fractions 0.25 --seeds 0 --out $T/smoke --jobs 4 --no-progress > $OUT/smoke.log 2>&1
rc=$?; tail -5 $OUT/smoke.log
if [ $rc -ne 0 ]; then stamp "smoke failed ($rc)"; cat $OUT/smoke.log | tail -60; exit 1; fi
fi

L3=$T/la3d
if part la3d; then
stamp la3d table
if [ -n "${LA3D_FROM:-}" ]; then cp -r "$LA3D_FROM" $L3; fi  # runs finished in an earlier device call are skipped
la3d_args="--protocol la3d --train-data /tmp/LA --out $L3 --fractions 8,16 --seeds 0,1,2 --no-progress \
  --methods ${LA3D_METHODS:-supervised,fully-supervised,fixmatch,superdiffusion,mean-teacher,bcp}"
left=$(( ${LA3D_END:-450} - ($(date +%s) - t0) ))  # room left for the report and the tarball before 600 s
timeout -k 10 $(( left < ${LA3D_S:-450} ? left : ${LA3D_S:-450} )) $SD bench $la3d_args --jobs ${LA3D_JOBS:-6} \
  > $OUT/la3d.log 2>&1
rc=$?; echo "la3d rc=$rc"; pkill -f multiprocessing.spawn; sleep 2
tail -3 $OUT/la3d.log
if [ $rc -ne 0 ]; then  # cut before the end: tables and figures from the finished runs
  timeout -k 5 90 $SD bench $la3d_args --report-only > $OUT/la3d-report.log 2>&1
fi
fi

S=$T/ssl4mis
ssl4mis_args() {  # METHODS: the la2d-ssl4mis bench of these methods in $S
  echo --protocol la2d-ssl4mis --train-data /tmp/LA --out $S --methods $1 ${SSL4MIS_STEPS:+--steps $SSL4MIS_STEPS}
}
ssl4mis_bench() {  # METHODS SECONDS: train them, SSL4MIS_JOBS runs at a time, for at most SECONDS
  timeout -k 10 $2 $SD bench $(ssl4mis_args $1) --jobs ${SSL4MIS_JOBS:-6} --no-progress >> $OUT/ssl4mis.log 2>&1
  echo "ssl4mis $1 rc=$?"; pkill -f multiprocessing.spawn; sleep 2
  tail -3 $OUT/ssl4mis.log
  for r in $S/runs/*/frac8/seed*; do echo "$r: $(tail -c 300 $r/log.jsonl | tail -1 | cut -c1-120)"; done
}
if part ssl4mis; then
stamp la2d-ssl4mis
if [ -n "${SSL4MIS_FROM:-}" ]; then cp -r "$SSL4MIS_FROM" $S; fi
methods=${SSL4MIS_METHODS:-supervised,mean-teacher}
ssl4mis_bench $methods ${SSL4MIS_S:-480}
# SSL4MIS_MORE: methods trained in the time left before SSL4MIS_END seconds (compared with the runs above)
left=$(( ${SSL4MIS_END:-540} - ($(date +%s) - t0) ))
if [ -n "${SSL4MIS_MORE:-}" ] && [ $left -gt 90 ]; then
  stamp "la2d-ssl4mis $SSL4MIS_MORE"; ssl4mis_bench $SSL4MIS_MORE $left; methods=$methods,$SSL4MIS_MORE
fi
stamp "la2d-ssl4mis report ($methods)"  # one results.csv of every finished run
timeout -k 5 60 $SD bench $(ssl4mis_args $methods) --no-progress --report-only > $OUT/ssl4mis-report.log 2>&1
echo "report rc=$?"; tail -4 $OUT/ssl4mis-report.log
fi

B=$T/la2d
if part la2d; then
stamp la2d table
if [ -n "${LA2D_FROM:-}" ]; then cp -r "$LA2D_FROM" $B; fi  # runs finished in an earlier device call are skipped
timeout -k 10 $LA2D_S $SD bench --protocol la2d --train-data /tmp/LA --out $B --jobs $LA2D_JOBS --no-progress \
  $LA2D_ARGS > $OUT/la2d.log 2>&1
rc=$?; echo "la2d rc=$rc"; pkill -f multiprocessing.spawn; sleep 2
tail -3 $OUT/la2d.log
if [ $rc -ne 0 ]; then  # cut before the end: tables and figures from the finished runs
  timeout -k 5 60 $SD bench --protocol la2d --train-data /tmp/LA --out $B --no-progress \
    $LA2D_ARGS --report-only > $OUT/la2d-report.log 2>&1
fi
fi

if part speed; then
stamp speed
timeout -k 5 100 $SD bench-speed --device cuda --amp --channels-last --repeats 5 --json $OUT/speed-gpu.json \
  > $OUT/speed-gpu.log 2>&1; echo "speed rc=$?"; tail -40 $OUT/speed-gpu.log
fi

stamp predict and export
R=$B/runs/superdiffusion/frac8/seed0; C=$(sed -n 1p /tmp/LA/train.list)
if part predict && [ -f $R/DONE ]; then
  ( $SD predict $R /tmp/LA/$C/mri_norm2.h5 --out $T/pred-ens --predictor teacher --mode ensemble --uncertainty &&
    $SD predict $R /tmp/LA/$C/mri_norm2.h5 --out $T/pred-ddim --predictor teacher --mode ddim &&
    $SD export $R --out $T/student.pt && ls -la $T/pred-ens $T/pred-ddim $T/student.pt ) > $OUT/predict.log 2>&1
  echo "predict rc=$?"; tail -8 $OUT/predict.log
fi

stamp la3d-full
left=$(( 560 - ($(date +%s) - t0) ))
if part la3d-full && [ $left -gt 60 ]; then
  timeout -k 5 $left $SD bench --protocol la3d-full --train-data /tmp/LA --methods supervised,superdiffusion \
    --fractions 0.1 --seeds 0 --steps 40 --set split.val=4 --set train.ckpt_every=20 --out $T/la3d-full --jobs 2 \
    --no-progress > $OUT/la3d-full.log 2>&1; echo "la3d-full rc=$?"; tail -5 $OUT/la3d-full.log
fi

stamp pack
cd $T && tar czf $OUT/results.tar.gz --exclude='checkpoints' --exclude='tb' --exclude='*.pt' ssl4mis la2d smoke la3d la3d-full \
  2>/dev/null
ls -la $OUT; stamp done
