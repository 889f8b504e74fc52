"""Support code for the test suite (never collected as tests): the CLI, server and engine runners, the GGUF
checkpoint writer, tokenizer fixtures, and what a test needs from outside the venv. Test modules import from
here (and take fixtures from tests/conftest.py), never from each other. Code the benchmarks need too lives in
benchmarks/ and tests import it from there (benchmarks never import tests): the tiny tokenizer, the tiny HF
models and the AWQ/GPTQ writer in benchmarks.checkpoints, the HF reference and the parity measurements in
benchmarks.quality, the edge runtimes' drivers in benchmarks.peers."""
