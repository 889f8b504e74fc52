#!/usr/bin/env bash
# Peer runtimes for side-by-side runs of our ONNX export (benchmarks/peers/edge_runtimes.py,
# benchmarks/speed/bench_onnx.py, tests/test_edge_runtimes.py). Idempotent: a step whose marker exists is skipped.
#
#   bash benchmarks/peers/setup_peers.sh [PREFIX]        # PREFIX defaults to /work/venvs
#
# Creates
#   $PREFIX/genai     onnxruntime-genai + plain onnxruntime (never beside onnxruntime-gpu) + onnx-ir and
#                     torch/transformers for its model builder (python -m onnxruntime_genai.models.builder)
#   $PREFIX/optimum   optimum-onnx (pins transformers 4.57) + onnxruntime, for `optimum-cli export onnx`
#                     and ORTModelForCausalLM
#   $PREFIX/node      a node project with @huggingface/transformers (onnxruntime-node, CUDA skipped); its
#                     node_modules also serve examples/browser/ (the web bundle and onnxruntime-web's wasm)
# tests/test_browser.py also needs Debian's chromium (.ci/run installs it: apt-get install -y chromium).
# Tests and benchmarks find them through QWEN_MLX_PEERS (default /work/venvs; benchmarks/common.py: peers_root).
set -euo pipefail

PREFIX="${1:-${QWEN_MLX_PEERS:-/work/venvs}}"
PY="${PYTHON:-python3}"
GENAI_VERSION="${GENAI_VERSION:-0.18.0}"
ORT_VERSION="${ORT_VERSION:-1.31.1}"
OPTIMUM_ONNX_VERSION="${OPTIMUM_ONNX_VERSION:-0.1.0}"
TRANSFORMERS_JS_VERSION="${TRANSFORMERS_JS_VERSION:-4.3.1}"
mkdir -p "$PREFIX"

make_venv() {  # make_venv DIR: a venv whose torch is the CPU build on this disk (install it first!)
    local dir="$1"
    [ -x "$dir/bin/python" ] || "$PY" -m venv "$dir"
    "$dir/bin/pip" install -q --upgrade pip
    "$dir/bin/pip" install -q torch==2.13.0
}

# --- onnxruntime-genai ---------------------------------------------------------------------------
if [ ! -f "$PREFIX/genai/.ready" ]; then
    make_venv "$PREFIX/genai"
    "$PREFIX/genai/bin/pip" install -q "onnxruntime-genai==$GENAI_VERSION" "onnxruntime==$ORT_VERSION" \
        onnx onnx-ir "transformers>=4.57,<6" safetensors numpy psutil
    "$PREFIX/genai/bin/python" -c "import onnxruntime_genai as og, onnxruntime as ort, onnx_ir; print('genai', og.__version__, 'ort', ort.__version__)"
    touch "$PREFIX/genai/.ready"
fi

# --- optimum-onnx --------------------------------------------------------------------------------
if [ ! -f "$PREFIX/optimum/.ready" ]; then
    make_venv "$PREFIX/optimum"
    "$PREFIX/optimum/bin/pip" install -q "optimum-onnx[onnxruntime]==$OPTIMUM_ONNX_VERSION" "onnxruntime==$ORT_VERSION" psutil
    "$PREFIX/optimum/bin/python" -c "import optimum.onnxruntime, transformers, onnxruntime as ort; print('optimum ok, transformers', transformers.__version__, 'ort', ort.__version__)"
    touch "$PREFIX/optimum/.ready"
fi

# --- transformers.js (Node) ----------------------------------------------------------------------
if [ ! -f "$PREFIX/node/.ready" ]; then
    mkdir -p "$PREFIX/node"
    ( cd "$PREFIX/node"
      [ -f package.json ] || npm init -y >/dev/null
      npm pkg set type=module >/dev/null
      ONNXRUNTIME_NODE_INSTALL_CUDA=skip npm install --no-audit --no-fund "@huggingface/transformers@$TRANSFORMERS_JS_VERSION"
      node -e "import('@huggingface/transformers').then(m => console.log('transformers.js', m.env.version))" )
    touch "$PREFIX/node/.ready"
fi
echo "peers ready under $PREFIX"
