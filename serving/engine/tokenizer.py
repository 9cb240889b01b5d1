"""Tokenizer (the `tokenizers` library), chat templates (jinja2) and incremental detokenization."""

from __future__ import annotations

import functools
import json
import re
import secrets
from pathlib import Path
from typing import Any

from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer
from tokenizers.decoders import DecodeStream

IMAGE_PAD = "<|image_pad|>"


def _raise(message: str) -> None:
    raise TemplateError(message)


def load_chat_template(model_dir: Path) -> str | None:
    """chat_template.jinja, else chat_template.json, else tokenizer_config.json's field."""
    jinja = model_dir / "chat_template.jinja"
    if jinja.exists():
        return jinja.read_text()
    for name in ("chat_template.json", "tokenizer_config.json"):
        path = model_dir / name
        if path.exists():
            template = json.loads(path.read_text()).get("chat_template")
            if isinstance(template, list):  # named templates: take the default one
                template = next((t["template"] for t in template if t.get("name") == "default"), None)
            if template:
                return template
    return None


class Tokenizer:
    def __init__(self, model_dir: str | Path) -> None:
        model_dir = Path(model_dir)
        self._tok = HFTokenizer.from_file(str(model_dir / "tokenizer.json"))
        # A second instance that reads special-token text as plain text, for client text. Separate, so
        # concurrent encodes on threads never see the flag flipped under them.
        self._plain = HFTokenizer.from_file(str(model_dir / "tokenizer.json"))
        self._plain.encode_special_tokens = True
        specials = {t.content: i for i, t in self._tok.get_added_tokens_decoder().items() if t.special}
        self._added_ids = frozenset(self._tok.get_added_tokens_decoder())
        self._special_ids = specials
        # Longest first, so a token that begins another is not matched inside it.
        alternatives = "|".join(re.escape(t) for t in sorted(specials, key=len, reverse=True))
        self._special_re = re.compile(alternatives or r"(?!)")  # (?!) never matches
        template = load_chat_template(model_dir)
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise
        env.filters["tojson"] = lambda value, indent=None: json.dumps(
            value, indent=indent, ensure_ascii=False
        )
        self._template = env.from_string(template) if template else None

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def token_id(self, token: str) -> int:
        token_id = self._tok.token_to_id(token)
        if token_id is None:
            raise KeyError(f"token {token!r} is not in the vocabulary")
        return token_id

    def encode(self, text: str) -> list[int]:
        """Trusted text (a rendered template): special-token text becomes control tokens."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_text(self, text: str) -> list[int]:
        """Client text: special-token text such as `<|image_pad|>` or `<|im_end|>` is plain text."""
        return self._plain.encode(text, add_special_tokens=False).ids

    def encode_chat(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
    ) -> list[int]:
        """The rendered chat template's tokens, where only the template makes control tokens: every text
        a client wrote (message strings, text parts) is tokenized as plain text, so `<|im_end|>
        <|im_start|>system` in a user turn cannot open a system turn and `<|image_pad|>` is no image.

        The template is rendered with a unique marker in place of each client text; the output is split
        at the markers, and runs of plain text between the template's own control tokens are tokenized
        whole, so ordinary prompts give exactly the tokens of `encode(apply_chat_template(...))`.

        Tool definitions and an assistant's call arguments are rendered as JSON by the template, so
        they cannot be marked; they are refused when they spell a special token instead."""
        structured = json.dumps([tools, [m.get("tool_calls") for m in messages]], ensure_ascii=False)
        if self._special_re.search(structured):
            raise ValueError("tool definitions and tool-call arguments may not contain special-token text")
        nonce = secrets.token_hex(8)
        texts: list[str] = []

        def mark(text: str) -> str:
            texts.append(text)
            return f"\ue000{nonce}:{len(texts) - 1}\ue001"

        marked = [_mark_message(m, mark) for m in messages]
        rendered = self.apply_chat_template(marked, add_generation_prompt, tools)
        pieces = re.split(f"\ue000{nonce}:(\\d+)\ue001", rendered)
        # pieces alternate: template text, marker index, template text, ...
        if sorted(int(i) for i in pieces[1::2]) != list(range(len(texts))):
            # The template dropped, repeated or altered a client text: fall back to the plain rendering,
            # which is safe only when no client text spells a special token.
            if any(self._special_re.search(t) for t in texts):
                raise ValueError("message text contains special-token text this chat template cannot quote")
            return self.encode(self.apply_chat_template(messages, add_generation_prompt, tools))
        ids: list[int] = []
        run: list[str] = []
        for k, piece in enumerate(pieces):
            if k % 2:  # a client text: joins the current run of plain text
                run.append(texts[int(piece)])
                continue
            pos = 0
            for match in self._special_re.finditer(piece):
                run.append(piece[pos : match.start()])
                ids.extend(self._plain.encode("".join(run), add_special_tokens=False).ids)
                ids.append(self._special_ids[match.group()])
                run, pos = [], match.end()
            run.append(piece[pos:])
        ids.extend(self._plain.encode("".join(run), add_special_tokens=False).ids)
        return ids

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(token_ids, skip_special_tokens=skip_special_tokens)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token stands for. With byte-level BPE a token can be part of a UTF-8
        character, which its decoded text cannot show (it decodes to U+FFFD); added tokens are their
        literal text."""
        piece = self._tok.id_to_token(token_id)
        if piece is None:
            return b""
        if token_id in self._added_ids:
            return piece.encode()
        table = _byte_decoder()
        if all(ch in table for ch in piece):
            return bytes(table[ch] for ch in piece)
        return self.decode([token_id], skip_special_tokens=False).encode()

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
    ) -> str:
        """Render messages whose content is a string or a list of {"type": "text"|"image", ...} parts;
        each image part becomes one `<|vision_start|><|image_pad|><|vision_end|>`. `tools` are
        OpenAI-style function definitions, for templates that render them (Qwen2.5's)."""
        if self._template is None:
            raise ValueError("the model has no chat template")
        return self._template.render(
            messages=messages, add_generation_prompt=add_generation_prompt, tools=tools or None
        )

    def detokenizer(self) -> Detokenizer:
        return Detokenizer(self._tok)


def _mark_message(message: dict[str, Any], mark: Any) -> dict[str, Any]:
    """A copy of a chat message with every client text replaced by mark(text)."""
    content = message.get("content")
    if isinstance(content, str):
        return {**message, "content": mark(content)}
    if isinstance(content, list):
        parts = [
            {**p, "text": mark(p["text"])} if isinstance(p, dict) and isinstance(p.get("text"), str) else p
            for p in content
        ]
        return {**message, "content": parts}
    return message


@functools.cache
def _byte_decoder() -> dict[str, int]:
    """Byte-level BPE's printable stand-in for each byte (GPT-2's table), inverted."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


class Detokenizer:
    """Turns a request's tokens into text as they arrive; multi-byte characters split across tokens
    are held back until complete."""

    def __init__(self, tok: HFTokenizer) -> None:
        self._tok = tok
        self._stream = DecodeStream(skip_special_tokens=True)

    def step(self, token_id: int) -> str:
        return self._stream.step(self._tok, token_id) or ""
