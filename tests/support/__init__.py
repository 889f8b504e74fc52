"""Support code for the test suite (never collected as tests): tiny-model and tokenizer builders, the HF
reference, the CLI and server runners, GGUF and AWQ/GPTQ checkpoint writers, the parity measurements, and
what a test needs from outside the venv. Test modules import from here (and take fixtures from
tests/conftest.py), never from each other; benchmarks/ reuses some of it."""
