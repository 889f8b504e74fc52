"""qwen_mlx.tokenizer against HF transformers (the reference) on the tiny Qwen2.5-style tokenizer."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qwen_mlx.errors import QwenError
from qwen_mlx.tokenizer import StreamingDetokenizer, Tokenizer, plain_chatml_template
from benchmarks.checkpoints.tiny_tokenizer import QWEN25_CHAT_TEMPLATE
from tests.support.tokenizer_fixtures import tiny_tokenizer_dir  # noqa: F401  (fixture)

HYPOTHESIS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

CORPUS = [
    "",
    "Hello, world!",
    "def f(x):\n    return x ** 2  # square\n\n\nprint(f(3))\n",
    "\tif (a && b) { c = d[0]->e; }\r\n\r\n",
    "你好，世界！机器学习。",
    "Emoji 😀🚀 👨‍👩‍👧‍👦 🇫🇷 👍🏽 and ❤️",
    "runs of spaces:      x        y\n\n\n\n\n   \n \n",
    "trailing spaces   ",
    "   leading spaces",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "text<|im_end|>text<|endoftext|><|endoftext|>",
    "<tool_call>\n{\"name\": \"f\"}\n</tool_call>",
    "<|im_start <|im_end| |im_end|> <|unknown|>",
    "decomposed e\u0301 and a\u030a (NFC normalizes)",
    "It's, they're, WE'LL, I'M, you'VE",
    "1234567890 3.14 -2e10",
    "Ελληνικά Русский العربية 日本語 한국어",
    "\u200b\u00a0\ufeff zero width and nbsp",
    "a literal replacement char \ufffd here",
]


@pytest.fixture(scope="module")
def tok(tiny_tokenizer_dir: Path) -> Tokenizer:  # noqa: F811
    return Tokenizer.from_folder(tiny_tokenizer_dir)


@pytest.fixture(scope="module")
def hf(tiny_tokenizer_dir: Path):  # noqa: F811
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir))


def _variant(src: Path, dst: Path, config_edit=None, files: dict[str, str] | None = None) -> Path:
    """A copy of the tiny tokenizer folder with tokenizer_config edited and extra files written."""
    shutil.copytree(src, dst)
    if config_edit is not None:
        config = json.loads((dst / "tokenizer_config.json").read_text(encoding="utf-8"))
        config_edit(config)
        (dst / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    for name, text in (files or {}).items():
        (dst / name).write_text(text, encoding="utf-8")
    return dst


# --- ids and text -----------------------------------------------------------------------------------------


def test_vocab_fits_tiny_models(tok: Tokenizer) -> None:
    assert tok.vocab_size == 512
    assert tok.encode("<|im_end|>") == [509]


@pytest.mark.parametrize("text", CORPUS)
def test_ids_match_hf(tok: Tokenizer, hf, text: str) -> None:
    ids = tok.encode(text)
    assert ids == hf(text, add_special_tokens=False)["input_ids"]
    assert ids == hf.encode(text, add_special_tokens=False)
    for skip in (False, True):
        assert tok.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)


@HYPOTHESIS
@given(st.text(max_size=60))
def test_ids_match_hf_random_text(tok: Tokenizer, hf, text: str) -> None:
    assert tok.encode(text) == hf.encode(text, add_special_tokens=False)


def test_eos_and_pad(tok: Tokenizer, hf) -> None:
    assert tok.eos_token_ids == frozenset({509, 507})  # <|im_end|>, <|endoftext|>
    assert hf.eos_token_id in tok.eos_token_ids
    assert tok.pad_token_id == hf.pad_token_id == 507


def test_eos_without_configs(tiny_tokenizer_dir: Path, tmp_path: Path) -> None:  # noqa: F811
    folder = tmp_path / "bare"
    folder.mkdir()
    shutil.copy(tiny_tokenizer_dir / "tokenizer.json", folder)
    bare = Tokenizer.from_folder(folder)
    assert bare.eos_token_ids == frozenset({507, 509})  # the ChatML stop tokens found in the vocab
    assert bare.pad_token_id is None
    assert bare.chat_template == plain_chatml_template()
    # generation_config with a single int eos is merged too
    (folder / "generation_config.json").write_text('{"eos_token_id": 3, "pad_token_id": 7}')
    assert Tokenizer.from_folder(folder).eos_token_ids == frozenset({3, 507, 509})
    assert Tokenizer.from_folder(folder).pad_token_id == 7


# --- chat templates -----------------------------------------------------------------------------------------

CHATS = {
    "single-user": [{"role": "user", "content": "Hi there! 你好"}],
    "system-multiturn": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3+3?\n\nExplain."},
    ],
    "no-system-multiturn": [
        {"role": "user", "content": "Write a haiku"},
        {"role": "assistant", "content": "Leaves fall\nquietly 🍂"},
        {"role": "user", "content": "Another"},
        {"role": "assistant", "content": "ok"},
    ],
    "tools": [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": None,  # dropped, as transformers does
            "tool_calls": [
                {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris", "é": "ü"}}}
            ],
        },
        {"role": "tool", "content": '{"temp": 21}'},
        {"role": "tool", "content": '{"sky": "clear"}'},
    ],
}
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Météo",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]


@pytest.mark.parametrize("name", sorted(CHATS))
@pytest.mark.parametrize("gen", [True, False])
def test_qwen25_chat_matches_hf(tok: Tokenizer, hf, name: str, gen: bool) -> None:
    msgs = CHATS[name]
    assert tok.chat_template == QWEN25_CHAT_TEMPLATE
    want = hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
    assert tok.apply_chat_template(msgs, add_generation_prompt=gen) == want
    assert tok.encode_chat(msgs, add_generation_prompt=gen) == hf.encode(want, add_special_tokens=False)
    if name == "single-user":
        assert want.startswith("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud.")


def test_qwen25_chat_with_tools_matches_hf(tok: Tokenizer, hf) -> None:
    msgs = CHATS["tools"]
    want = hf.apply_chat_template(msgs, tools=TOOLS, tokenize=False, add_generation_prompt=True)
    assert tok.apply_chat_template(msgs, tools=TOOLS) == want
    assert "Météo" in want  # tojson keeps non-ASCII


def test_history_is_a_prefix_of_the_next_turn(tok: Tokenizer) -> None:
    """What KV-cache reuse relies on: the prompt of turn n is a text prefix of the render of turn n+1."""
    msgs = [{"role": "user", "content": "hi"}]
    prompt = tok.apply_chat_template(msgs)
    nxt = tok.apply_chat_template(msgs + [{"role": "assistant", "content": "yo"}, {"role": "user", "content": "?"}])
    assert nxt.startswith(prompt + "yo<|im_end|>\n")


CUSTOM_TEMPLATE = """{# exercises the sandbox features transformers enables #}
{% set ns = namespace(n=0) %}
{{ bos_token if bos_token is defined else 'NOBOS' }}|{{ eos_token }}|{{ pad_token }}
{% for m in messages %}
    {% if m.role == 'skip' %}{% continue %}{% endif %}
    {% if m.role == 'stop' %}{% break %}{% endif %}
    {% if m.role not in ['user', 'assistant', 'system'] %}{{ raise_exception('bad role: ' + m.role) }}{% endif %}
    {% set ns.n = ns.n + 1 %}
<{{ m.role }}>{{ m.content }}</{{ m.role }}> {{ {'n': ns.n, 'c': m.content} | tojson }} {{ dict(a=1) | tojson(indent=2) }}
{% endfor %}
{% if tools is none and documents is none %}notools{% endif %}
{% if add_generation_prompt %}<assistant>{% endif %}
"""


def test_template_from_jinja_file_matches_hf(tiny_tokenizer_dir: Path, tmp_path: Path) -> None:  # noqa: F811
    from transformers import AutoTokenizer

    folder = _variant(tiny_tokenizer_dir, tmp_path / "jinja", lambda c: c.pop("chat_template"),
                      {"chat_template.jinja": CUSTOM_TEMPLATE})
    ours, ref = Tokenizer.from_folder(folder), AutoTokenizer.from_pretrained(str(folder))
    msgs = [{"role": "user", "content": "ü <b>&"}, {"role": "skip", "content": "x"}, {"role": "assistant", "content": "ok"},
            {"role": "stop", "content": ""}, {"role": "user", "content": "never"}]
    for gen in (True, False):
        want = ref.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
        assert ours.apply_chat_template(msgs, add_generation_prompt=gen) == want
    assert "NOBOS|<|im_end|>|<|endoftext|>" in want and '"c": "ü <b>&"' in want
    # raise_exception surfaces as a QwenError
    with pytest.raises(QwenError, match="bad role: tool"):
        ours.apply_chat_template([{"role": "tool", "content": "x"}])


def test_jinja_file_wins_over_config(tiny_tokenizer_dir: Path, tmp_path: Path) -> None:  # noqa: F811
    from transformers import AutoTokenizer

    folder = _variant(tiny_tokenizer_dir, tmp_path / "both", None, {"chat_template.jinja": "FILE{{ messages[0].content }}"})
    msgs = [{"role": "user", "content": "x"}]
    want = AutoTokenizer.from_pretrained(str(folder)).apply_chat_template(msgs, tokenize=False)
    assert Tokenizer.from_folder(folder).apply_chat_template(msgs) == want == "FILEx"


def test_template_list_form_matches_hf(tiny_tokenizer_dir: Path, tmp_path: Path) -> None:  # noqa: F811
    from transformers import AutoTokenizer

    def edit(c: dict) -> None:
        c["chat_template"] = [{"name": "tool_use", "template": "TOOLS"}, {"name": "default", "template": c["chat_template"]}]

    folder = _variant(tiny_tokenizer_dir, tmp_path / "list", edit)
    msgs = CHATS["system-multiturn"]
    want = AutoTokenizer.from_pretrained(str(folder)).apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    ours = Tokenizer.from_folder(folder)
    assert ours.chat_template == QWEN25_CHAT_TEMPLATE
    assert ours.apply_chat_template(msgs) == want


def test_no_template_is_plain_chatml(tiny_tokenizer_dir: Path, tmp_path: Path) -> None:  # noqa: F811
    folder = _variant(tiny_tokenizer_dir, tmp_path / "none", lambda c: c.pop("chat_template"))
    ours = Tokenizer.from_folder(folder)
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}, {"role": "assistant", "content": "A"}]
    body = "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\nA<|im_end|>\n"
    assert ours.apply_chat_template(msgs, add_generation_prompt=False) == body
    assert ours.apply_chat_template(msgs) == body + "<|im_start|>assistant\n"
    assert ours.encode_chat(msgs)[:1] == [508]


# --- errors --------------------------------------------------------------------------------------------------


def test_missing_tokenizer_json(tmp_path: Path) -> None:
    with pytest.raises(QwenError, match="no tokenizer.json"):
        Tokenizer.from_folder(tmp_path)
    with pytest.raises(QwenError, match="no tokenizer.json"):
        Tokenizer.from_folder(tmp_path / "does-not-exist")


@pytest.mark.parametrize("name", ["tokenizer.json", "tokenizer_config.json", "generation_config.json"])
def test_corrupt_json(tiny_tokenizer_dir: Path, tmp_path: Path, name: str) -> None:  # noqa: F811
    folder = _variant(tiny_tokenizer_dir, tmp_path / "bad", None, {name: '{"model": {"vocab": '})
    with pytest.raises(QwenError, match=f"{name}: not valid JSON"):
        Tokenizer.from_folder(folder)


def test_valid_json_but_not_a_tokenizer(tiny_tokenizer_dir: Path, tmp_path: Path) -> None:  # noqa: F811
    folder = _variant(tiny_tokenizer_dir, tmp_path / "bad", None, {"tokenizer.json": '{"hello": 1}'})
    with pytest.raises(QwenError, match="tokenizer.json: cannot load tokenizer"):
        Tokenizer.from_folder(folder)


def test_template_errors(tiny_tokenizer_dir: Path, tmp_path: Path, tok: Tokenizer) -> None:  # noqa: F811
    folder = _variant(tiny_tokenizer_dir, tmp_path / "syntax", None, {"chat_template.jinja": "{% for %}"})
    with pytest.raises(QwenError, match="chat template does not compile"):
        Tokenizer.from_folder(folder)
    with pytest.raises(QwenError, match="chat template failed"):
        tok.apply_chat_template([{"role": "user"}])  # the Qwen template needs content
    with pytest.raises(QwenError, match="empty conversation"):
        tok.apply_chat_template([])
    # the sandbox stays closed
    folder = _variant(tiny_tokenizer_dir, tmp_path / "escape", None, {"chat_template.jinja": "{{ messages.append(1) }}"})
    with pytest.raises(QwenError, match="SecurityError"):
        Tokenizer.from_folder(folder).apply_chat_template([{"role": "user", "content": "x"}])


def test_imports_neither_mlx_nor_torch() -> None:
    code = (
        "import sys, qwen_mlx.tokenizer; top = {m.split('.')[0] for m in sys.modules}; "
        "bad = {'mlx', 'torch', 'transformers'} & top; assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parent.parent)


# --- streaming detokenizer --------------------------------------------------------------------------------------


def _stream(tok: Tokenizer, ids: list[int], skip: bool = False) -> tuple[list[str], str]:
    detok = tok.detokenizer(skip_special_tokens=skip)
    full = tok.decode(ids, skip_special_tokens=skip)
    pieces = []
    for i in ids:
        pieces.append(detok.add_token(i))
        # everything emitted so far is final: a prefix of the full text (so no half character, no early U+FFFD)
        assert full.startswith(detok.text), (ids, pieces)
    pieces.append(detok.finalize())
    assert "".join(pieces) == detok.text == full
    return pieces, full


@HYPOTHESIS
@given(st.text(max_size=80))
def test_stream_random_text(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text)
    pieces, full = _stream(tok, ids)
    if "\ufffd" not in full:
        assert not any("\ufffd" in p for p in pieces)


@HYPOTHESIS
@given(st.lists(st.integers(0, 511), max_size=40), st.booleans())
def test_stream_random_ids(tok: Tokenizer, ids: list[int], skip: bool) -> None:
    """Arbitrary ids (as a sampler may produce): invalid UTF-8, special tokens, split characters."""
    _stream(tok, ids, skip)


def test_stream_holds_split_characters(tok: Tokenizer) -> None:
    ids = tok.encode("😀")  # not in the tiny vocab as one token: several byte tokens
    assert len(ids) > 1
    detok = tok.detokenizer()
    assert [detok.add_token(i) for i in ids] == [""] * (len(ids) - 1) + ["😀"]
    assert detok.finalize() == ""
    # a character nobody completes is flushed by finalize as U+FFFD, exactly like decode()
    detok = tok.detokenizer()
    assert detok.add_token(ids[0]) == "" and detok.finalize() == tok.decode(ids[:1]) == "\ufffd"


def test_stream_window_stays_small(tok: Tokenizer, monkeypatch: pytest.MonkeyPatch) -> None:
    """O(1) per token: each step decodes a few recent ids, never the whole sequence."""
    ids = tok.encode("".join(CORPUS) * 5)
    assert len(ids) > 1000
    longest = 0
    real_decode = Tokenizer.decode

    def spy(self, window, skip_special_tokens=False):
        nonlocal longest
        longest = max(longest, len(window))
        return real_decode(self, window, skip_special_tokens)

    monkeypatch.setattr(Tokenizer, "decode", spy)
    detok = tok.detokenizer()
    out = "".join(detok.add_token(i) for i in ids) + detok.finalize()
    monkeypatch.undo()
    assert out == tok.decode(ids)
    assert longest <= 8
    assert isinstance(detok, StreamingDetokenizer)
