"""qwen-mlx command line: a thin layer over the `qwen_mlx` and `export` libraries.

    python cli.py chat --backend mlx [--model M]
    python cli.py generate --backend mlx --model M --prompt TEXT
    python cli.py info --model M
    python cli.py convert --gguf FILE.gguf --out DIR      (or --model AWQ_OR_GPTQ_FOLDER --out DIR)
    python cli.py convert --model M --out FILE.gguf [--gguf-type q8_0]   (GGUF out, for llama.cpp)
    python cli.py export-onnx --model M --out DIR
    python cli.py serve --backend mlx [--model M] [--port 8000]
    python cli.py attention --model M --prompt TEXT --out FILE.png|FILE.npz

Every user error ends as one `error: ...` line on stderr and exit status 2; Ctrl-C exits with 130.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

import export  # registers the torch and onnx backends (no torch import until one is used)
from qwen_mlx.dtypes import DTYPES
from qwen_mlx.errors import QwenError
from qwen_mlx.files import check_writable, staged_file
from qwen_mlx.text_input import check_text, read_stdin, read_text_file


def _utf8(ctx: click.Context, param: click.Parameter, value):
    """A text option's value(s) checked as UTF-8 before any work starts (arguments decode bad bytes silently)."""
    for text in (value if isinstance(value, tuple) else (value,)):
        if isinstance(text, str):
            check_text(text, f"--{param.name}")
    return value

# `cli` and `export` are generic top-level names. Run as `python cli.py`, this folder is sys.path[0] and wins;
# through the installed `qwen-mlx` script another distribution's `export` could shadow ours: refuse clearly.
if Path(export.__file__).resolve().parent.parent != Path(__file__).resolve().parent:
    sys.exit(f"error: `import export` found {export.__file__}, not qwen-mlx's export package; "
             "run `python cli.py` from the qwen-mlx checkout")



def model_option(f):
    return click.option("--model", "model", default=None, metavar="M",
                        help="HF folder, .gguf file or Hub repo id [default: Qwen/Qwen2.5-0.5B-Instruct, "
                             "or the offline real checkpoint when the Hub is unreachable]")(f)


def backend_option(default: str):
    # QWEN_MLX_BACKEND sets the default once (the test suite pins mlx, for which its older tests were written).
    return click.option("--backend", default=default, show_default=True, envvar="QWEN_MLX_BACKEND",
                        type=click.Choice(["auto", "mlx", "torch", "onnx"]),
                        help="auto: MLX where it has a GPU (Metal, CUDA), else this model's ONNX export, made "
                             "once into the cache (int4; float32 with --dtype float32); it says which and why")


MODEL_OPTIONS = [
    backend_option("auto"),
    model_option,
    click.option("--dtype", type=click.Choice(DTYPES), default=None,
                 help="weights and activations [default: float32 on a CPU, bfloat16 on a GPU]"),
    click.option("--quantize", type=click.Choice(["4", "8", "int4"]), default=None,
                 help="mlx: 4- or 8-bit affine weights (group 64); onnx: run the int4 export"),
    click.option("--onnx-dtype", type=click.Choice(["fp32", "fp16", "q8", "int8", "uint8", "q4", "q4f16"]),
                 default=None, help="onnx: the export folder's file to run, by transformers.js' dtype name "
                                    "[default: the most accurate there: fp32, fp16, q4, q4f16, uint8, q8, int8]"),
    click.option("--keep-quantized", is_flag=True,
                 help="mlx on a CPU: run weights stored quantized (mlx-lm folders, GGUF blocks) with MLX's "
                      "quantized kernels; by default a CPU dequantizes them once at load (faster decode, "
                      "float32 memory)"),
    click.option("--parallel", type=click.Choice(["tensor", "pipeline"]), default=None, expose_value=False,
                 callback=lambda ctx, param, value: _set_parallel(value),
                 help="under mlx.launch (several ranks): give each rank whole layers, or split every layer "
                      "over the ranks (fast links: Thunderbolt, JACCL) [default: pipeline]"),
]


def _no_stdin_under_launcher(what: str) -> None:
    """mlx.launch does not pass standard input to the ranks (it stays open, empty): reading it would wait forever."""
    if not sys.stdin.isatty():
        from qwen_mlx.backends.distributed import several_ranks
        if several_ranks():
            raise QwenError(f"{what} reads standard input, which mlx.launch does not pass to the ranks: give the "
                            "prompt with --prompt TEXT, or run `serve` and talk to it with any OpenAI client")


def _set_parallel(mode: str | None) -> None:
    if mode is not None:  # only then: the option costs the other backends no MLX import
        from qwen_mlx.backends.distributed import set_parallel
        set_parallel(mode)


def model_options(f=None, *, backend: str = "auto"):
    """Flags shared by `chat`, `generate`, `serve` and `cache-prompt`: which model, on which backend, at which
    precision; `backend` is the --backend default."""
    def apply(f):
        for opt in reversed([backend_option(backend), *MODEL_OPTIONS[1:]]):
            f = opt(f)
        return f
    return apply(f) if f is not None else apply


def run_options(f):
    """Flags shared by `chat` and `generate`: backend, precision and sampling."""
    opts = [
        *MODEL_OPTIONS,
        click.option("--max-tokens", type=int, default=512, show_default=True),
        click.option("--temperature", type=float, default=None, help="0 is greedy [default: checkpoint's]"),
        click.option("--top-p", type=float, default=None),
        click.option("--top-k", type=int, default=None),
        click.option("--min-p", type=float, default=None),
        click.option("--repetition-penalty", type=float, default=None),
        click.option("--seed", type=int, default=None),
        click.option("--stop", multiple=True, callback=_utf8, help="stop string (repeatable)"),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def kv_options(f):
    """--kv-bits / --kv-group-size (mlx): the KV cache stored quantized (qwen_mlx/models/cache.py)."""
    f = click.option("--kv-group-size", type=click.Choice(["32", "64", "128"]), default="64", show_default=True,
                     help="with --kv-bits: features of a key or value vector per scale and bias")(f)
    return click.option("--kv-bits", type=click.Choice(["4", "8"]), default=None,
                        help="mlx: store the KV cache in 8 or 4 bits (~3.6x / ~6.4x less memory than float32, "
                             "~1.9x / ~3.6x less than bfloat16)")(f)


def _kv(kv_bits, kv_group_size) -> dict:
    if not kv_bits and kv_group_size != "64":
        raise QwenError("--kv-group-size needs --kv-bits")
    return {"kv_bits": int(kv_bits) if kv_bits else None, "kv_group_size": int(kv_group_size)}


def spec_options(f):
    """Speculative decoding (mlx; qwen_mlx/engine/speculative.py): the same tokens, sooner where drafts hold."""
    f = click.option("--num-draft-tokens", type=int, default=None,
                     help="most tokens drafted per step (adapted to the acceptance) [default: 16 with "
                          "--prompt-lookup, 4 with --draft-model, 2 with --mtp]")(f)
    f = click.option("--mtp", is_flag=True,
                     help="speculative decoding with the checkpoint's own multi-token-prediction layer (mtp.*: "
                          "Qwen3-Next, Qwen3.5, Qwen3.6)")(f)
    f = click.option("--draft-model", default=None,
                     help="speculative decoding with a smaller model of the same tokenizer (a folder, .gguf or "
                          "Hub id)")(f)
    return click.option("--prompt-lookup", is_flag=True,
                        help="speculative decoding with drafts copied from the prompt and the reply so far "
                             "(edits, code, quoting answers)")(f)


def _speculation(loaded, dtype, prompt_lookup, draft_model, num_draft_tokens, mtp=False, model=None):
    """(the requests' Speculation or None, the drafters an engine needs for it); the draft model or the MTP
    layer (of `model`, as --model gave it) loaded."""
    from qwen_mlx.engine.speculative import load_draft_model, load_mtp_drafter, speculation_from_flags

    speculation = speculation_from_flags(prompt_lookup, draft_model, num_draft_tokens, mtp)
    if speculation is not None and loaded.backend.name != "mlx":
        raise QwenError("speculative decoding needs the mlx backend")
    drafters = {"draft-model": load_draft_model(draft_model, loaded.tokenizer, dtype)} if draft_model else {}
    if mtp:
        drafters["mtp"] = load_mtp_drafter(loaded, model)
    return speculation, drafters


NO_THINK = click.option("--no-think", is_flag=True,
                        help="Qwen3: answer without reasoning first (the chat template's enable_thinking=False)")


def _thinking_switch(loaded, no_think: bool) -> None:
    """--no-think: every chat the tokenizer renders gets enable_thinking=False, as HF's
    apply_chat_template(..., enable_thinking=False) would."""
    if not no_think:
        return
    if not loaded.tokenizer.has_thinking_switch:
        print("note: this model's chat template has no thinking switch (enable_thinking); --no-think changes "
              "nothing", file=sys.stderr)
    loaded.tokenizer.template_kwargs["enable_thinking"] = False


def _resolve_backend(backend, model, dtype, quantize, onnx_dtype, mlx_only: dict):
    """`--backend auto` made concrete, the banner printed (export/auto_backend.py); any other backend as given.
    `mlx_only`: flag -> value of the flags only the mlx backend honours (auto then chooses mlx)."""
    if backend != "auto":
        return backend, model, dtype, quantize, onnx_dtype
    from qwen_mlx.backends.distributed import several_ranks
    if several_ranks():  # under mlx.launch: MLX alone splits a model over the ranks (qwen_mlx/backends/distributed.py)
        return "mlx", model, dtype, quantize, onnx_dtype
    from export.auto_backend import resolve_auto

    r = resolve_auto(model, dtype, quantize, onnx_dtype, tuple(flag for flag, value in mlx_only.items() if value))
    return r.backend, r.model, r.dtype, r.quantize, r.onnx_dtype


def _mlx_only(kv_bits=None, prompt_lookup=False, draft_model=None, num_draft_tokens=None, mtp=False,
              prompt_cache=None, keep_quantized=False) -> dict:
    """The flags `--backend auto` must honour by choosing mlx, by name (the only backend that has them)."""
    return {"--kv-bits": kv_bits, "--prompt-lookup": prompt_lookup, "--draft-model": draft_model,
            "--num-draft-tokens": num_draft_tokens, "--mtp": mtp, "--prompt-cache": prompt_cache,
            "--keep-quantized": keep_quantized}


def _prepare(backend, model, dtype, quantize, max_tokens, stop=(), kv_bits=None, kv_group_size="64", onnx_dtype=None,
             keep_quantized=False, mlx_only=None, **sampling):
    """Check the flags before loading anything, then load the backend (`auto` chosen first) and the sampling
    defaults."""
    from qwen_mlx.backends import load
    from qwen_mlx.engine.text import check_stop_strings
    from qwen_mlx.sampling import SamplingParams

    if max_tokens < 0:
        raise QwenError(f"--max-tokens must be >= 0, got {max_tokens}")
    check_stop_strings(stop)
    SamplingParams(**{k: v for k, v in sampling.items() if v is not None})  # validate the flags early
    kv = _kv(kv_bits, kv_group_size)
    backend, model, dtype, quantize, onnx_dtype = _resolve_backend(backend, model, dtype, quantize, onnx_dtype,
                                                                   mlx_only or _mlx_only(kv_bits))
    loaded = load(backend, model, dtype, quantize, **kv, onnx_dtype=onnx_dtype, keep_quantized=keep_quantized)
    params = SamplingParams.from_generation_config(loaded.generation_config, **sampling)
    return loaded, params


PROMPT_CACHE = click.option("--prompt-cache", default=None, metavar="FILE",
                            help="a KV cache written by `cache-prompt` (mlx): prefill only what follows it")


def _prompt_cache(loaded, path):
    """Fill the backend's cache from a `cache-prompt` file; returns (Session holding it, CachedPrompt)."""
    from qwen_mlx.backends.base import Session
    from qwen_mlx.prompt_cache import load_prompt_cache

    cached = load_prompt_cache(Path(path), loaded)
    return Session(loaded.backend, tokens=list(cached.tokens)), cached


def _check_prompt_cache_backend(prompt_cache, backend):
    if prompt_cache and backend not in ("mlx", "auto"):  # auto takes mlx for a prompt cache
        raise QwenError(f"--prompt-cache works with the mlx backend only, not {backend}")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli():
    """Run Qwen2-family models with MLX, PyTorch or ONNX Runtime, and export them to ONNX."""


@cli.command()
@run_options
@click.option("--system", default=None, callback=_utf8, help="system message")
@NO_THINK
@PROMPT_CACHE
@kv_options
@spec_options
def chat(backend, model, dtype, quantize, onnx_dtype, keep_quantized, max_tokens, stop, system, no_think, prompt_cache,
         kv_bits, kv_group_size, prompt_lookup, draft_model, num_draft_tokens, mtp, **sampling):
    """Multi-turn chat in the terminal, replies streamed."""
    from qwen_mlx.chat import run_chat

    _no_stdin_under_launcher("chat")
    _check_prompt_cache_backend(prompt_cache, backend)
    loaded, params = _prepare(backend, model, dtype, quantize, max_tokens, stop, kv_bits, kv_group_size, onnx_dtype,
                              keep_quantized, _mlx_only(kv_bits, prompt_lookup, draft_model, num_draft_tokens, mtp,
                                                        prompt_cache, keep_quantized), **sampling)
    _thinking_switch(loaded, no_think)
    session = None
    if prompt_cache:
        from qwen_mlx.prompt_cache import check_prefix

        session, cached = _prompt_cache(loaded, prompt_cache)
        system = system if system is not None else cached.system
        first = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": "?"}]
        check_prefix(cached.tokens, loaded.tokenizer.encode_chat(first))
    speculation, drafters = _speculation(loaded, dtype, prompt_lookup, draft_model, num_draft_tokens, mtp, model)
    run_chat(loaded, params, max_tokens, system=system, stop=tuple(stop), session=session, speculation=speculation,
             drafters=drafters)


@cli.command()
@run_options
@click.option("--prompt", required=True, callback=_utf8, help="the prompt; '-' reads standard input")
@click.option("--raw", is_flag=True, help="send the prompt as plain text, not through the chat template")
@click.option("--system", default=None, callback=_utf8, help="system message (chat template only)")
@NO_THINK
@PROMPT_CACHE
@kv_options
@spec_options
def generate(backend, model, dtype, quantize, onnx_dtype, keep_quantized, max_tokens, stop, prompt, raw, system,
             no_think, prompt_cache, kv_bits, kv_group_size, prompt_lookup, draft_model, num_draft_tokens, mtp,
             **sampling):
    """One reply to one prompt: the text on stdout, a JSON stats line last on stderr."""
    from qwen_mlx.engine import local_engine, stream_generate
    from qwen_mlx.engine.text import GenerationStats

    if prompt == "-":
        _no_stdin_under_launcher("--prompt -")
        prompt = read_stdin("--prompt -")
    _check_prompt_cache_backend(prompt_cache, backend)
    loaded, params = _prepare(backend, model, dtype, quantize, max_tokens, stop, kv_bits, kv_group_size, onnx_dtype,
                              keep_quantized, _mlx_only(kv_bits, prompt_lookup, draft_model, num_draft_tokens, mtp,
                                                        prompt_cache, keep_quantized), **sampling)
    _thinking_switch(loaded, no_think and not raw)
    session, cached = _prompt_cache(loaded, prompt_cache) if prompt_cache else (None, None)
    if cached is not None and system is None and not raw:
        system = cached.system
    tok = loaded.tokenizer
    if raw:
        ids = tok.encode(prompt)
    else:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        ids = tok.encode_chat(messages)
    if cached is not None:
        from qwen_mlx.prompt_cache import check_prefix
        check_prefix(cached.tokens, ids)
    speculation, drafters = _speculation(loaded, dtype, prompt_lookup, draft_model, num_draft_tokens, mtp, model)
    stats = GenerationStats()
    engine = local_engine(loaded.backend, tok, session)  # the server's generation loop, a batch of one
    engine.drafters.update(drafters)
    for piece in stream_generate(engine, ids, params, max_tokens, tuple(stop), stats, speculation):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    print(json.dumps(stats.as_dict()), file=sys.stderr)


@cli.command("cache-prompt")
@model_options(backend="mlx")
@click.option("--file", "doc", required=True, help="the document (UTF-8 text); '-' reads standard input")
@click.option("--raw", is_flag=True,
              help="cache the text as is [default: as the chat's system message, which chat/generate reuse]")
@click.option("--out", required=True, help="the cache file to write (safetensors)")
def cache_prompt(backend, model, dtype, quantize, onnx_dtype, keep_quantized, doc, raw, out):
    """Prefill a long document once and save its KV cache for `chat` / `generate --prompt-cache` (mlx)."""
    from qwen_mlx.backends import load
    from qwen_mlx.prompt_cache import save_prompt_cache

    backend = "mlx" if backend == "auto" else backend  # (QWEN_MLX_BACKEND=auto) a prompt cache is MLX's
    _check_prompt_cache_backend(True, backend)
    if Path(out).suffix != ".safetensors":
        raise QwenError(f"--out must end in .safetensors, got {Path(out).name}")
    check_writable(Path(out))
    text = read_stdin("--file -") if doc == "-" else read_text_file(doc, f"--file {doc}")
    loaded = load(backend, model, dtype, quantize, onnx_dtype=onnx_dtype, keep_quantized=keep_quantized)
    tok = loaded.tokenizer
    ids = tok.encode(text) if raw else tok.encode_chat([{"role": "system", "content": text}], add_generation_prompt=False)
    save_prompt_cache(Path(out), loaded, ids, system=None if raw else text)
    print(f"{out}: {len(ids)} tokens cached", file=sys.stderr)


@cli.command()
@model_options
@click.option("--host", default="127.0.0.1", show_default=True, help="address to listen on")
@click.option("--port", type=int, default=8000, show_default=True, help="0 picks a free port")
@click.option("--max-batch", type=int, default=16, show_default=True, help="sequences decoded together")
@click.option("--max-queue", type=int, default=64, show_default=True,
              help="requests waiting for a slot; beyond it: 429 with Retry-After")
@click.option("--max-tokens", type=int, default=4096, show_default=True, help="the largest max_tokens a request may ask")
@click.option("--api-key", default=None, envvar="QWEN_MLX_API_KEY", help="require 'Authorization: Bearer KEY'")
@click.option("--grace", type=float, default=10.0, show_default=True,
              help="seconds in-flight requests get to finish after Ctrl-C / SIGTERM")
@NO_THINK
@kv_options
@spec_options
def serve(backend, model, dtype, quantize, onnx_dtype, keep_quantized, host, port, max_batch, max_queue, max_tokens,
          api_key, grace, no_think, kv_bits, kv_group_size, prompt_lookup, draft_model, num_draft_tokens, mtp):
    """An OpenAI-compatible HTTP server (chat, completions, streaming) with continuous batching."""
    from qwen_mlx.serve import require_extra, serve as run_server

    require_extra()  # before loading a model
    if max_batch < 1 or max_queue < 0 or max_tokens < 1:
        raise QwenError("--max-batch and --max-tokens must be >= 1, --max-queue >= 0")
    if kv_bits and max_batch != 1:
        # The batched MLX engine (qwen_mlx/backends/mlx_batch.py) pads, joins and slices rows of a float cache;
        # a quantized cache runs one sequence at a time, which must be asked for rather than slipped in.
        raise QwenError("serve --kv-bits needs --max-batch 1: continuous batching keeps a float KV cache; "
                        "with --kv-bits requests are served one at a time on a quantized cache")
    from qwen_mlx.backends import load

    kv = _kv(kv_bits, kv_group_size)
    backend, model, dtype, quantize, onnx_dtype = _resolve_backend(
        backend, model, dtype, quantize, onnx_dtype,
        _mlx_only(kv_bits, prompt_lookup, draft_model, num_draft_tokens, mtp, keep_quantized=keep_quantized))
    loaded = load(backend, model, dtype, quantize, **kv, onnx_dtype=onnx_dtype, keep_quantized=keep_quantized)
    _thinking_switch(loaded, no_think)  # the default; a request's chat_template_kwargs can still say otherwise
    speculation, drafters = _speculation(loaded, dtype, prompt_lookup, draft_model, num_draft_tokens, mtp, model)
    run_server(loaded, host, port, max_batch=max_batch, api_key=api_key, max_queue=max_queue,
               max_tokens=max_tokens, grace=grace, speculation=speculation, drafters=drafters)


@cli.command()
@model_option
def info(model):
    """Architecture, experts, total and active parameters by component, and memory per dtype."""
    from qwen_mlx.checkpoint import prepare_model
    from qwen_mlx.report import model_report

    ckpt = prepare_model(model, gguf_blocks=True)  # a GGUF as the MLX backend runs it by default: blocks kept
    print("\n".join(model_report(ckpt)))


@cli.command()
@click.option("--gguf", "gguf_file", default=None,
              help="a GGUF file of architecture qwen2, qwen2moe, qwen3, qwen3moe, qwen3next, qwen35 or qwen35moe")
@click.option("--model", default=None, help="an AWQ/GPTQ folder to repack exactly, or with --quantize: the model to "
              "quantize (as everywhere: an HF folder, a .gguf, a Hub id)")
@click.option("--quantize", type=click.Choice(["4", "8"]), default=None,
              help="write an MLX affine-quantized folder (mlx-lm's layout) instead of a float one")
@click.option("--group-size", type=click.Choice(["32", "64", "128"]), default="64", show_default=True,
              help="with --quantize: weights per scale and bias")
@click.option("--out", required=True, help="the folder to write, or a FILE.gguf: the model as one GGUF that "
              "llama.cpp runs")
@click.option("--dtype", type=click.Choice(DTYPES), default=None,
              help="write float weights of this dtype [default: float32; for --gguf alone, an MLX quantized "
                   "folder keeping the GGUF's blocks that MLX holds exactly, the rest float32]")
@click.option("--gguf-type", default=None, metavar="f32|f16|bf16|q8_0|q4_0",
              help="with --out FILE.gguf: the matrices' type (vectors and norms stay f32) [default: bf16 for a "
                   "bfloat16 checkpoint, else f16, as llama.cpp's converter's auto]")
@click.option("--force", is_flag=True, help="replace a non-empty --out (an existing .gguf)")
def convert(gguf_file, model, quantize, group_size, out, dtype, gguf_type, force):
    """Convert a Qwen GGUF (llama.cpp) into a Hugging Face folder, an AWQ/GPTQ folder into an MLX quantized
    folder with the same codes, (--quantize) any model into an MLX quantized folder that mlx-lm loads, or (--out
    FILE.gguf) any model into a GGUF for llama.cpp."""
    if out.lower().endswith(".gguf"):
        _convert_to_gguf(gguf_file, model, quantize, dtype, gguf_type, Path(out), force)
        return
    if gguf_type is not None:
        raise QwenError("--gguf-type is for a GGUF output: give --out FILE.gguf")
    if quantize:
        from qwen_mlx.checkpoint import prepare_model
        from qwen_mlx.convert import quantize_folder

        if (model is None) == (gguf_file is None):
            raise QwenError("convert --quantize needs exactly one of --model and --gguf")
        print(quantize_folder(prepare_model(model or gguf_file), Path(out), int(quantize), int(group_size),
                              dtype or "float32", force))
        return
    if model is not None and gguf_file is None:
        from qwen_mlx.formats.awq_gptq import folder_scheme, repack_folder

        if Path(model).is_dir() and folder_scheme(Path(model)) is not None:
            print(repack_folder(Path(model), Path(out), force))  # AWQ/GPTQ -> MLX affine, every code kept
            return
    if gguf_file is None or model is not None:
        raise QwenError("convert needs --gguf FILE, an AWQ/GPTQ --model folder, or --quantize 4|8 with --model M")
    from qwen_mlx.formats.gguf import convert_gguf

    path = convert_gguf(Path(gguf_file), Path(out), dtype=dtype, force=force)
    print(path)


def _convert_to_gguf(gguf_file, model, quantize, dtype, gguf_type, out: Path, force: bool) -> None:
    """`convert --out FILE.gguf`: any model (a folder, a Hub id, or a GGUF to retype) as one GGUF."""
    from qwen_mlx.formats.gguf_write import check_gguf_out, llama_cpp_caveats

    if (model is None) == (gguf_file is None):
        raise QwenError("convert --out FILE.gguf needs exactly one of --model and --gguf")
    if quantize or dtype:
        raise QwenError("--quantize and --dtype write folders; for a GGUF output choose --gguf-type")
    check_gguf_out(out, gguf_type or "f16", force)  # the path and the type, before loading anything
    from qwen_mlx.checkpoint import prepare_model
    from qwen_mlx.convert import gguf_file as write_gguf_file

    ckpt = prepare_model(model or gguf_file)
    for note in llama_cpp_caveats(ckpt.args):
        print(f"note: {note}", file=sys.stderr)
    source = Path(gguf_file) if gguf_file else None  # a GGUF retyped keeps its nextn (MTP) block
    print(write_gguf_file(ckpt, out, gguf_type, force, source))


@cli.command("export-onnx")
@model_option
@click.option("--out", required=True, help="the export folder to write")
@click.option("--dtypes", default=None, metavar="LIST",
              help="the files to write, by transformers.js' dtype names: comma-separated of fp32, fp16, q8, int8, "
                   "uint8, q4, q4f16, or all [default: fp32,fp16,q8,q4,q4f16]")
@click.option("--dtype", type=click.Choice(["float32", "float16"]), default=None,
              help="one file only: float32 (model.onnx) or float16 weights (model_fp16.onnx)")
@click.option("--quantize", type=click.Choice(["int4"]), default=None,
              help="one file only: MatMulNBits int4 weights (model_q4.onnx, model_q4f16.onnx with --dtype float16)")
@click.option("--opset", type=int, default=None)
@click.option("--attention", type=click.Choice(["standard", "gqa"]), default="standard", show_default=True,
              help="standard ONNX ops (exact for any padding and RoPE scaling) or one com.microsoft "
                   "GroupQueryAttention per layer (onnxruntime-genai's form; no left padding, no dynamic RoPE)")
@click.option("--moe", type=click.Choice(["fused", "standard"]), default="fused", show_default=True,
              help="MoE experts as onnxruntime's com.microsoft MoE/QMoE op (fused) or standard ONNX ops")
@click.option("--force", is_flag=True, help="replace a non-empty --out")
def export_onnx_cmd(model, out, dtypes, dtype, quantize, opset, force, attention, moe):
    """Export to an ONNX folder that onnxruntime-genai, transformers.js and optimum load as is."""
    from qwen_mlx.checkpoint import prepare_model

    export.require("export-onnx")
    from export.onnx_export import default_variants, export_onnx_variants
    from export.onnx_format import parse_variants

    if dtypes is not None and (dtype or quantize):
        raise QwenError("--dtypes names every file to write; --dtype/--quantize name a single one: use one or the other")
    variants = parse_variants(dtypes) if dtypes is not None else None  # checked before loading the model
    ckpt = prepare_model(model)
    if variants is None and not (dtype or quantize):  # the default set: what this model can hold, said
        variants, note = default_variants(ckpt, moe)
        if note:
            print(f"warning: {note}", file=sys.stderr)
    for path in export_onnx_variants(ckpt, Path(out), variants, dtype or "float32", quantize, opset, force,
                                     attention=attention, moe=moe):
        print(path)


@cli.command()
@model_option
@click.option("--prompt", required=True, callback=_utf8, help="the prompt; '-' reads standard input")
@click.option("--raw", is_flag=True, help="the prompt as plain text, not through the chat template")
@click.option("--system", default=None, callback=_utf8, help="system message (chat template only)")
@click.option("--layers", default=None,
              help="comma-separated layer indices [default: all; a hybrid model's full-attention layers]")
@click.option("--heads", default=None, help="comma-separated head indices [default: all]")
@click.option("--dtype", type=click.Choice(["float64", *DTYPES]), default=None,
              help="float64: the exact maps of the weights (CPU); another dtype: the maps as the model runs at it "
                   "[default: float64, float32 for MoE and hybrid models]")
@click.option("--out", required=True, help="FILE.png (a grid of heatmaps) or FILE.npz (the numbers)")
def attention(model, prompt, raw, system, layers, heads, dtype, out):
    """Attention maps (MLX): the softmax weights of chosen layers and heads over the prompt's tokens."""
    out = Path(out)
    if out.suffix not in (".png", ".npz"):
        raise QwenError(f"--out must end in .png or .npz, got {out.name}")
    check_writable(out)
    from qwen_mlx.attention_maps import (attention_maps, float64_model, parse_indices, parse_layers, save_npz,
                                         save_png, token_labels)
    from qwen_mlx.checkpoint import prepare_model
    from qwen_mlx.models.load import load_model
    from qwen_mlx.tokenizer import Tokenizer

    ckpt = prepare_model(model)
    layer_ids = parse_layers(layers, ckpt.args)
    head_ids = parse_indices(heads, ckpt.args.num_attention_heads, "head")
    tok = Tokenizer.from_folder(ckpt.folder)
    if prompt == "-":
        prompt = read_stdin("--prompt -")
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    ids = tok.encode(prompt) if raw else tok.encode_chat(messages)
    dtype = dtype or ("float32" if ckpt.args.num_experts or ckpt.args.hybrid else "float64")
    if dtype == "float64":  # float32 weights widened; see qwen_mlx/attention_maps.py for why
        model = float64_model(load_model(ckpt, "float32"))
    else:
        model = load_model(ckpt, dtype)
    weights = attention_maps(model, ids, layer_ids, head_ids)
    tokens, special = token_labels(tok, ids)
    with staged_file(out) as staging:
        if out.suffix == ".npz":
            save_npz(staging, weights, tokens, layer_ids, head_ids)
        else:
            save_png(staging, weights, tokens, special, layer_ids, head_ids, title=f"{ckpt.folder.name}, {dtype}")
    print(out)


def main(argv: list[str] | None = None) -> int:
    try:
        cli.main(args=argv, prog_name="cli.py", standalone_mode=False)
    except QwenError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except click.exceptions.NoArgsIsHelpError as e:
        click.echo(e.ctx.get_help() if e.ctx else str(e), err=True)
        return 2
    except click.UsageError as e:
        print(f"error: {e.format_message()}", file=sys.stderr)
        return 2
    except click.ClickException as e:
        print(f"error: {e.format_message()}", file=sys.stderr)
        return e.exit_code or 1
    except (click.Abort, KeyboardInterrupt):
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except Exception as e:  # the last line of defence: a bug, said in one line, its traceback kept in a file
        print(f"error: internal error: {type(e).__name__}: {e} (a bug in qwen-mlx; {_save_traceback()})",
              file=sys.stderr)
        return 1
    return 0


def _save_traceback() -> str:
    """Write the current exception's traceback under the cache folder; say where (or why it could not be)."""
    import time
    import traceback

    from qwen_mlx.paths import cache_dir

    try:
        folder = cache_dir() / "errors"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.txt"
        path.write_text(f"qwen-mlx {' '.join(sys.argv)}\n\n{traceback.format_exc()}", encoding="utf-8")
    except (OSError, QwenError) as e:
        return f"its traceback could not be saved: {e}"
    return f"the traceback is in {path}; please include it in a report"


if __name__ == "__main__":
    sys.exit(main())
