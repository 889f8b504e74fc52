"""qwen-mlx command line: a thin layer over the `qwen_mlx` and `export` libraries.

    python cli.py chat --backend mlx [--model M]
    python cli.py generate --backend mlx --model M --prompt TEXT
    python cli.py info --model M
    python cli.py convert --gguf FILE.gguf --out DIR
    python cli.py export-onnx --model M --out DIR
    python cli.py serve --backend mlx [--model M] [--port 8000]

Every user error ends as one `error: ...` line on stderr and exit status 2; Ctrl-C exits with 130.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

import export  # registers the torch and onnx backends (no torch import until one is used)
from qwen_mlx.dtypes import BYTES, DTYPES
from qwen_mlx.errors import QwenError

# `cli` and `export` are generic top-level names. Run as `python cli.py`, this folder is sys.path[0] and wins;
# through the installed `qwen-mlx` script another distribution's `export` could shadow ours: refuse clearly.
if Path(export.__file__).resolve().parent.parent != Path(__file__).resolve().parent:
    sys.exit(f"error: `import export` found {export.__file__}, not qwen-mlx's export package; "
             "run `python cli.py` from the qwen-mlx checkout")



def model_option(f):
    return click.option("--model", "model", default=None, metavar="M",
                        help="HF folder, .gguf file or Hub repo id [default: Qwen/Qwen2.5-0.5B-Instruct, "
                             "or the offline real checkpoint when the Hub is unreachable]")(f)


MODEL_OPTIONS = [
    click.option("--backend", default="mlx", show_default=True, help="mlx, torch or onnx"),
    model_option,
    click.option("--dtype", type=click.Choice(DTYPES), default=None,
                 help="weights and activations [default: float32 on a CPU, bfloat16 on a GPU]"),
    click.option("--quantize", type=click.Choice(["4", "8", "int4"]), default=None,
                 help="mlx: 4- or 8-bit affine weights (group 64); onnx: run the int4 export"),
]


def model_options(f):
    """Flags shared by `chat`, `generate` and `serve`: which model, on which backend, at which precision."""
    for opt in reversed(MODEL_OPTIONS):
        f = opt(f)
    return f


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
        click.option("--stop", multiple=True, help="stop string (repeatable)"),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def _prepare(backend, model, dtype, quantize, max_tokens, stop=(), **sampling):
    """Check the flags before loading anything, then load the backend and the sampling defaults."""
    from qwen_mlx.backends import load
    from qwen_mlx.generate import check_stop_strings
    from qwen_mlx.sampling import SamplingParams

    if max_tokens < 0:
        raise QwenError(f"--max-tokens must be >= 0, got {max_tokens}")
    check_stop_strings(stop)
    SamplingParams(**{k: v for k, v in sampling.items() if v is not None})  # validate the flags early
    loaded = load(backend, model, dtype, quantize)
    params = SamplingParams.from_generation_config(loaded.generation_config, **sampling)
    return loaded, params


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli():
    """Run Qwen2-family models with MLX, PyTorch or ONNX Runtime, and export them to ONNX."""


@cli.command()
@run_options
@click.option("--system", default=None, help="system message")
def chat(backend, model, dtype, quantize, max_tokens, stop, system, **sampling):
    """Multi-turn chat in the terminal, replies streamed."""
    from qwen_mlx.chat import run_chat

    loaded, params = _prepare(backend, model, dtype, quantize, max_tokens, stop, **sampling)
    run_chat(loaded, params, max_tokens, system=system, stop=tuple(stop))


@cli.command()
@run_options
@click.option("--prompt", required=True, help="the prompt; '-' reads standard input")
@click.option("--raw", is_flag=True, help="send the prompt as plain text, not through the chat template")
@click.option("--system", default=None, help="system message (chat template only)")
def generate(backend, model, dtype, quantize, max_tokens, stop, prompt, raw, system, **sampling):
    """One reply to one prompt: the text on stdout, a JSON stats line last on stderr."""
    from qwen_mlx.generate import GenerationStats, Session, stream_generate

    if prompt == "-":
        prompt = sys.stdin.read()
    loaded, params = _prepare(backend, model, dtype, quantize, max_tokens, stop, **sampling)
    tok = loaded.tokenizer
    if raw:
        ids = tok.encode(prompt)
    else:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        ids = tok.encode_chat(messages)
    stats = GenerationStats()
    for piece in stream_generate(Session(loaded.backend), tok, ids, params, max_tokens, tuple(stop), stats):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    print(json.dumps(stats.as_dict()), file=sys.stderr)


@cli.command()
@model_options
@click.option("--host", default="127.0.0.1", show_default=True, help="address to listen on")
@click.option("--port", type=int, default=8000, show_default=True, help="0 picks a free port")
@click.option("--max-batch", type=int, default=8, show_default=True, help="sequences decoded together")
@click.option("--max-queue", type=int, default=64, show_default=True,
              help="requests waiting for a slot; beyond it: 429 with Retry-After")
@click.option("--max-tokens", type=int, default=4096, show_default=True, help="the largest max_tokens a request may ask")
@click.option("--api-key", default=None, envvar="QWEN_MLX_API_KEY", help="require 'Authorization: Bearer KEY'")
@click.option("--grace", type=float, default=10.0, show_default=True,
              help="seconds in-flight requests get to finish after Ctrl-C / SIGTERM")
def serve(backend, model, dtype, quantize, host, port, max_batch, max_queue, max_tokens, api_key, grace):
    """An OpenAI-compatible HTTP server (chat, completions, streaming) with continuous batching."""
    from qwen_mlx.serve import require_extra, serve as run_server

    require_extra()  # before loading a model
    if max_batch < 1 or max_queue < 0 or max_tokens < 1:
        raise QwenError("--max-batch and --max-tokens must be >= 1, --max-queue >= 0")
    from qwen_mlx.backends import load

    loaded = load(backend, model, dtype, quantize)
    run_server(loaded, host, port, max_batch=max_batch, api_key=api_key, max_queue=max_queue,
               max_tokens=max_tokens, grace=grace)


@cli.command()
@model_option
def info(model):
    """Architecture, parameter count by component and memory per dtype."""
    from qwen_mlx.checkpoint import prepare_model

    ckpt = prepare_model(model)
    a = ckpt.args
    counts = a.parameter_counts()
    total = sum(counts.values())
    print(f"model          {ckpt.folder}")
    print(f"architecture   qwen2: {a.num_hidden_layers} layers, hidden {a.hidden_size}, MLP {a.intermediate_size}, "
          f"{a.num_attention_heads} heads / {a.num_key_value_heads} KV heads x {a.head_dim}")
    print(f"vocabulary     {a.vocab_size}, embeddings {'tied' if a.tie_word_embeddings else 'untied'}")
    print(f"rope           {a.rope_type}, theta {a.rope_theta:g}; context {a.context_length}")
    for cap, reason in a.context_caps():
        print(f"               context capped at {cap} by {reason}; config.json says "
              f"{a.max_position_embeddings}")
    print("parameters")
    for name, n in counts.items():
        print(f"  {name:<12} {n:>14,}  {100 * n / total:5.1f}%")
    print(f"  {'total':<12} {total:>14,}")
    # Quantized: Linear and embedding weights at `bits`, plus a 16-bit scale and bias per group of 64.
    matrices = sum(n for k, n in counts.items() if k != "norms")
    print("weights memory")
    for label, size in BYTES.items():
        print(f"  {label:<12} {total * size / 1e9:8.2f} GB")
    for bits in (8, 4):
        size = (matrices * (bits + 0.5) + (total - matrices) * 16) / 8 / 1e9
        print(f"  {f'{bits}-bit':<12} {size:8.2f} GB")
    kv = 2 * a.num_hidden_layers * a.num_key_value_heads * a.head_dim
    print(f"KV cache       {kv * 2 / 1024:.1f} KiB per token in 16-bit ({kv * 2 * a.context_length / 1e9:.2f} GB "
          f"for the full context)")


@cli.command()
@click.option("--gguf", "gguf_file", required=True, help="a GGUF file of architecture qwen2")
@click.option("--out", required=True, help="the HF folder to write")
@click.option("--dtype", type=click.Choice(DTYPES), default="float32", show_default=True)
@click.option("--force", is_flag=True, help="replace a non-empty --out")
def convert(gguf_file, out, dtype, force):
    """Convert a qwen2 GGUF (llama.cpp) into a Hugging Face folder."""
    from qwen_mlx.gguf_convert import convert_gguf

    path = convert_gguf(Path(gguf_file), Path(out), dtype=dtype, force=force)
    print(path)


@cli.command("export-onnx")
@model_option
@click.option("--out", required=True, help="the export folder to write")
@click.option("--dtype", type=click.Choice(["float32", "float16"]), default="float32", show_default=True)
@click.option("--quantize", type=click.Choice(["int4"]), default=None, help="MatMulNBits int4 weights")
@click.option("--opset", type=int, default=None)
@click.option("--force", is_flag=True, help="replace a non-empty --out")
def export_onnx_cmd(model, out, dtype, quantize, opset, force):
    """Export to an ONNX folder that onnxruntime-genai, transformers.js and optimum load as is."""
    from qwen_mlx.checkpoint import prepare_model

    export.require("export-onnx")
    from export.onnx_export import export_onnx

    ckpt = prepare_model(model)
    print(export_onnx(ckpt, Path(out), dtype, quantize, opset, force))


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
    return 0


if __name__ == "__main__":
    sys.exit(main())
