"""Tokenizer, chat template and streaming detokenizer for Qwen2-family checkpoints, without transformers.

Why this module exists: the runtime must load an HF checkpoint folder and turn chats into token ids (and ids
back into text, token by token) exactly as `transformers` would, but without importing transformers, torch or
mlx. The BPE itself is the `tokenizers` library reading `tokenizer.json` (no reimplementation); the chat
template is rendered in a jinja2 sandbox configured like transformers 5.x `apply_chat_template`
(`transformers/utils/chat_template_utils.py`), so renderings match it byte for byte.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as _HFTokenizer

from qwen_mlx.errors import QwenError
from qwen_mlx.text_input import check_text

# The named special tokens transformers passes to every chat template (its SPECIAL_TOKENS_ATTRIBUTES).
_SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# Tokens that end a turn in Qwen's ChatML even when the config forgets to list them.
_CHATML_STOP_TOKENS = ("<|im_end|>", "<|endoftext|>")


def plain_chatml_template() -> str:
    """The fallback template: `<|im_start|>{role}\\n{content}<|im_end|>\\n` per message, then the prompt."""
    return (
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )


# ---------------------------------------------------------------------------------------------------------
# The jinja2 environment, as transformers 5.23 `_cached_compile_jinja_template` builds it.


class _GenerationTag(jinja2.ext.Extension):
    """Accept `{% generation %}...{% endgeneration %}` (transformers' AssistantTracker) and render the body.

    transformers uses the tag to build assistant masks for training; we only need templates using it to parse.
    """

    tags = {"generation"}

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return caller()


class _TemplateNamespace(jinja2.utils.Namespace):
    """`namespace()` that refuses underscore-prefixed attributes, like transformers' TemplateNamespace."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # same signature trick as jinja2's Namespace
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates cannot set underscore attributes ({name!r})")


class _TemplateDict:
    """`dict()` / `dict.fromkeys()` without exposing the dict type itself (transformers' TemplateDict)."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None, sort_keys: bool = False
) -> str:
    # Unlike jinja's own tojson: no HTML escaping, non-ASCII kept, and the json.dumps options exposed.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


def compile_chat_template(source: str) -> jinja2.Template:
    """Compile `source` in the sandbox transformers uses (raises jinja2.TemplateSyntaxError on bad syntax)."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    return env.from_string(source)


# ---------------------------------------------------------------------------------------------------------
# Reading the checkpoint folder.


def _read_json(path: Path) -> Any:
    """The parsed JSON at `path`, or None when the file is absent; QwenError when it is unreadable."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise QwenError(f"{path}: not valid JSON ({e})") from e


def _token_content(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string, or an AddedToken dict with "content"."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _pick_template(config: dict, folder: Path) -> str:
    """The template transformers would use: chat_template.jinja, else tokenizer_config's, else plain ChatML.

    transformers lets a separate chat_template.jinja take priority over the config entry, so we do too.
    """
    jinja_file = folder / "chat_template.jinja"
    if jinja_file.is_file():
        try:
            return jinja_file.read_text(encoding="utf-8")  # universal newlines, as transformers' open() reads it
        except UnicodeDecodeError as e:
            raise QwenError(f"{jinja_file}: not UTF-8 text ({e})") from e
    template = config.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": "..."}, {"name": "tool_use", ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
        if template is None:
            raise QwenError(f"{folder / 'tokenizer_config.json'}: chat_template lists no 'default' template")
    if isinstance(template, str):
        return template
    return plain_chatml_template()


# Template variables a caller's extra keyword arguments may not replace.
RESERVED_TEMPLATE_VARIABLES = ("messages", "tools", "documents", "add_generation_prompt")


def check_template_kwargs(kwargs: dict[str, Any]) -> None:
    """QwenError when extra template variables would replace the conversation or the render's own flags."""
    reserved = [k for k in RESERVED_TEMPLATE_VARIABLES if k in kwargs]
    if reserved:
        raise QwenError(f"chat template variables {', '.join(reserved)} cannot be overridden")


class Tokenizer:
    """An HF tokenizer folder: encode/decode text, render and encode chats, stream detokenization."""

    def __init__(
        self,
        tokenizer: _HFTokenizer,
        chat_template: str,
        template_tokens: dict[str, str],
        eos_token_ids: frozenset[int],
        pad_token_id: int | None,
        source: str = "<memory>",
    ) -> None:
        self._tok = tokenizer
        self.chat_template = chat_template
        # Extra template variables every render gets, e.g. {"enable_thinking": False} (Qwen3's switch, set by
        # --no-think); a call's own keyword arguments win over these.
        self.template_kwargs: dict[str, Any] = {}
        self._template_tokens = template_tokens  # bos_token, eos_token, ... passed to the template
        self.eos_token_ids = eos_token_ids
        self.pad_token_id = pad_token_id
        self._source = source
        # Ids the tokenizer can emit: 1 + the highest id, added tokens included.
        self.vocab_size = max(tokenizer.get_vocab(with_added_tokens=True).values(), default=-1) + 1
        try:
            self._template = compile_chat_template(chat_template)
        except jinja2.TemplateError as e:
            raise QwenError(f"{source}: chat template does not compile: {e}") from e

    @classmethod
    def from_folder(cls, path: str | Path) -> Tokenizer:
        """Load tokenizer.json (+ tokenizer_config.json, generation_config.json, chat_template.jinja if there)."""
        folder = Path(path)
        tok_file = folder / "tokenizer.json"
        if not tok_file.is_file():
            raise QwenError(f"{folder}: no tokenizer.json (expected an HF checkpoint folder)")
        try:
            tok = _HFTokenizer.from_file(str(tok_file))
        except Exception as e:  # the tokenizers library raises plain Exception on malformed content
            _read_json(tok_file)  # corrupt JSON gets a clearer message than the Rust parser's
            raise QwenError(f"{tok_file}: cannot load tokenizer ({e})") from e
        config = _read_json(folder / "tokenizer_config.json") or {}
        gen_config = _read_json(folder / "generation_config.json") or {}
        if not isinstance(config, dict) or not isinstance(gen_config, dict):
            raise QwenError(f"{folder}: tokenizer_config.json / generation_config.json must hold JSON objects")

        # Special-token strings the template sees: the named ones, plus any other `*_token` string entry
        # (transformers treats those as model-specific special tokens).
        template_tokens = {}
        for key, value in config.items():
            if key in _SPECIAL_TOKEN_NAMES or (key.endswith("_token") and isinstance(value, (str, dict))):
                content = _token_content(value)
                if content is not None:
                    template_tokens[key] = content

        # eos: generation_config (int or list) | tokenizer_config eos_token | ChatML stop tokens in the vocab.
        eos: set[int] = set()
        gen_eos = gen_config.get("eos_token_id")
        for i in gen_eos if isinstance(gen_eos, list) else [gen_eos]:
            if isinstance(i, int):
                eos.add(i)
        for name in (template_tokens.get("eos_token"), *_CHATML_STOP_TOKENS):
            if name is not None and (i := tok.token_to_id(name)) is not None:
                eos.add(i)

        pad_token_id = None
        if (pad := template_tokens.get("pad_token")) is not None:
            pad_token_id = tok.token_to_id(pad)
        if pad_token_id is None and isinstance(gen_config.get("pad_token_id"), int):
            pad_token_id = gen_config["pad_token_id"]

        return cls(tok, _pick_template(config, folder), template_tokens, frozenset(eos), pad_token_id, str(folder))

    # --- text <-> ids -----------------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """Ids of `text`, like HF `tokenizer(text, add_special_tokens=False)`; special tokens in text match."""
        return self._tok.encode(check_text(text, "the text"), add_special_tokens=False).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids` (invalid UTF-8 becomes U+FFFD, as in HF)."""
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def to_json(self) -> str:
        """tokenizer.json as the `tokenizers` library serializes it (for grammar engines)."""
        return self._tok.to_str()

    def id_to_token(self, token_id: int) -> str | None:
        """The vocabulary string of one id (byte-level form), or None."""
        return self._tok.id_to_token(token_id)

    def is_special(self, token_id: int) -> bool:
        """Whether `token_id` is a special added token (<|im_start|>, <|endoftext|>, ...)."""
        added = self._tok.get_added_tokens_decoder().get(token_id)
        return added is not None and added.special

    def vocab(self) -> dict[str, int]:
        """Every token's string and id, added tokens included (to tell whether two tokenizers agree)."""
        return self._tok.get_vocab(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        """The id of one vocabulary string, or None."""
        return self._tok.token_to_id(token)

    # --- chat -------------------------------------------------------------------------------------------

    def apply_chat_template(
        self, messages: list[dict], add_generation_prompt: bool = True, tools: list[dict] | None = None,
        **template_kwargs: Any,
    ) -> str:
        """Render `messages` ([{"role", "content"}, ...]) as HF `apply_chat_template(tokenize=False)` does;
        extra keyword arguments become template variables, as in HF (`enable_thinking=False` for Qwen3)."""
        if not messages:
            raise QwenError("cannot apply the chat template to an empty conversation")
        variables = {**self.template_kwargs, **template_kwargs}
        check_template_kwargs(variables)
        # transformers drops None-valued keys (e.g. OpenAI's content=None) before rendering.
        chat = [{k: v for k, v in m.items() if v is not None} for m in messages]
        try:
            return self._template.render(
                messages=chat,
                tools=tools,
                documents=None,
                add_generation_prompt=add_generation_prompt,
                **{**self._template_tokens, **variables},
            )
        except Exception as e:  # anything the template program raises is a template/input problem
            raise QwenError(f"{self._source}: chat template failed: {type(e).__name__}: {e}") from e

    def encode_chat(
        self, messages: list[dict], add_generation_prompt: bool = True, tools: list[dict] | None = None,
        **template_kwargs: Any,
    ) -> list[int]:
        """Ids of the rendered chat (HF `apply_chat_template(tokenize=True)`)."""
        return self.encode(self.apply_chat_template(messages, add_generation_prompt, tools, **template_kwargs))

    @property
    def has_thinking_switch(self) -> bool:
        """Whether the chat template reads `enable_thinking` (Qwen3's switch between reasoning and not)."""
        return "enable_thinking" in self.chat_template

    def detokenizer(self, skip_special_tokens: bool = False) -> StreamingDetokenizer:
        """A fresh streaming detokenizer for one generated sequence."""
        return StreamingDetokenizer(self, skip_special_tokens)


class StreamingDetokenizer:
    """Turns ids into text one token at a time, never emitting half a character.

    It decodes only a small window of recent tokens each step (like TGI/vLLM incremental detokenizers):
    `_start` is a token index where the text so far ends on a clean character boundary, and `_done` is how
    many characters of `decode(ids[_start:])` were already emitted. While the window's text ends with U+FFFD
    (a byte sequence a later token may complete) that last character is held back; everything before it is
    final under UTF-8's left-to-right decoding. Once the window ends cleanly, it slides to the previous clean
    boundary (kept as context, for decoders whose output depends on the preceding token).
    Joined pieces plus `finalize()` equal `Tokenizer.decode(all ids)`.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False) -> None:
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = []
        self._start = 0  # window start (a clean boundary)
        self._clean = 0  # latest clean boundary >= _start
        self._done = 0  # chars of decode(ids[_start:]) emitted
        self._pieces: list[str] = []

    def _decode_window(self) -> str:
        return self._tokenizer.decode(self._ids[self._start :], self._skip)

    def _emit(self, piece: str) -> str:
        if piece:
            self._pieces.append(piece)
        return piece

    def add_token(self, token_id: int) -> str:
        """Add one id; return the text it makes printable (possibly "")."""
        self._ids.append(token_id)
        text = self._decode_window()
        if text.endswith("\ufffd"):  # maybe an incomplete character: hold back just that last char
            stable = len(text) - 1
            piece = text[self._done : stable] if stable > self._done else ""
            self._done = max(self._done, stable)
            return self._emit(piece)
        piece = text[self._done :]
        # Slide: the new window starts at the previous clean boundary, so it keeps one step of context.
        self._start, self._clean = self._clean, len(self._ids)
        self._done = len(self._decode_window())
        return self._emit(piece)

    def finalize(self) -> str:
        """Flush whatever is held back (a trailing U+FFFD that no token completed)."""
        text = self._decode_window()
        piece = text[self._done :]
        self._done = len(text)
        return self._emit(piece)

    @property
    def text(self) -> str:
        """Everything emitted so far."""
        if len(self._pieces) > 1:
            self._pieces = ["".join(self._pieces)]
        return self._pieces[0] if self._pieces else ""

    @property
    def token_ids(self) -> list[int]:
        """All ids added so far."""
        return list(self._ids)
