"""Chat tokenization as the engine does it: the chat template, with message text always plain text.

One class serves the engine's step 1 (``Engine.tokenize``) and the workload replay's text traces
(``python -m cache.replay``, which imports this lazily: ``cache/`` itself never loads a tokenizer),
so a replayed chat request gets exactly the token ids a served one would. Knows nothing of
models, the cache or the request flow.
"""

from __future__ import annotations

import secrets
import threading
from pathlib import Path
from typing import Any

from engine import loading
from engine.config import EngineConfig


class ChatTokenizer:
    """A tokenizer plus the engine's rules: the template with a generation prompt, control-token text as text.

    Example:
        >>> chat = ChatTokenizer.load("bundled")
        >>> ids = chat.prompt_ids([{"role": "user", "content": "Hi"}])   # <|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\n
        >>> chat.reply_ids("Hello!")                                     # the reply's tokens, no special tokens
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.lock = threading.Lock()  # Rust tokenizers raise "Already borrowed" under concurrent use
        self._control_texts = tuple(t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values())

    @classmethod
    def load(cls, spec: str | None = "bundled") -> "ChatTokenizer":
        """The bundled model's tokenizer (``None`` or ``"bundled"``, converted once) or a local tokenizer folder.

        Raises:
            ValueError: no such folder, or the bundled model is not installed.
        """
        from transformers import AutoTokenizer

        spec = (spec or "").strip()
        if spec.lower() in loading.BUNDLED_ALIASES:
            gguf = loading.bundled_gguf_path()
            if gguf is None:
                raise ValueError(f"the bundled model is not installed: {loading.INSTALL_HINT}; or pass a tokenizer folder")
            folder = loading.convert_gguf(gguf, EngineConfig.from_env().resolved_model_cache_dir())
        else:
            folder = Path(spec).expanduser()
            if not folder.is_dir():
                raise ValueError(f"tokenizer {spec!r} is not a local folder (nothing is downloaded): give a folder with tokenizer files, or 'bundled'")
        try:
            return cls(AutoTokenizer.from_pretrained(str(folder), local_files_only=True))
        except (OSError, ValueError) as exc:
            raise ValueError(f"cannot load a tokenizer from {folder}: {exc}") from None

    @property
    def has_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def prompt_ids(self, messages: list[dict[str, str]]) -> list[int]:
        """The prompt's token ids: the chat template with the assistant's turn opened.

        Text in any message is plain text: ``<|im_start|>system`` typed by someone becomes ordinary
        tokens, never a control token. Without a chat template the contents are joined by blank lines.
        """
        with self.lock:
            if not self.has_template:
                text = "\n\n".join(m["content"] for m in messages)
                return list(self.tokenizer(text, split_special_tokens=True).input_ids)
            if any(t in m["content"] for m in messages for t in self._control_texts):
                return self._chat_as_text(messages)
            return list(self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False))

    def reply_ids(self, text: str) -> list[int]:
        """A reply's tokens as the model would have generated them (the end-of-turn token not included)."""
        with self.lock:
            return list(self.tokenizer(text, add_special_tokens=False, split_special_tokens=True).input_ids)

    def _chat_as_text(self, messages: list[dict[str, str]]) -> list[int]:
        """The chat template's tokens with every message's content tokenized as plain text.

        The template is rendered with a unique placeholder per content; its own pieces are
        tokenized normally (their control tokens are real) and each content with
        ``split_special_tokens=True``. Caller holds the lock.
        """
        nonce = secrets.token_hex(8)
        placeholders = [f"\u2063{nonce}{i}\u2063" for i in range(len(messages))]
        rendered = self.tokenizer.apply_chat_template(
            [{**m, "content": p} for m, p in zip(messages, placeholders)], add_generation_prompt=True, tokenize=False
        )
        if any(rendered.count(p) != 1 for p in placeholders):
            raise ValueError("this chat template does not keep message text as it is, so control-token text in it cannot be made safe: remove it")
        ids: list[int] = []
        for message, placeholder in zip(messages, placeholders):
            template_piece, rendered = rendered.split(placeholder, 1)
            ids += self.tokenizer(template_piece, add_special_tokens=False).input_ids
            ids += self.tokenizer(message["content"], add_special_tokens=False, split_special_tokens=True).input_ids
        return ids + list(self.tokenizer(rendered, add_special_tokens=False).input_ids)
