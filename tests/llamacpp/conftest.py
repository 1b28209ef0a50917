"""Opt-in: llama.cpp runs our GGUF exports (`make test-llamacpp`). Plain `pytest` / `make test` collect nothing
here: llama-cpp-python is a ~15-minute C++ build (scripts/llamacpp_wheel.sh caches it), not a dev dependency.
`MICROGPT_LLAMACPP=1` (set by the make target) turns these tests on; then a missing llama_cpp is an error."""

from __future__ import annotations

import os

if os.environ.get("MICROGPT_LLAMACPP") != "1":
    collect_ignore_glob = ["test_*.py"]
