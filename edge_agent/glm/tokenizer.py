"""The model's byte-level BPE tokenizer (tokenizers), built from verified bytes."""
from __future__ import annotations

from tokenizers import Tokenizer

from edge_agent.glm.schema import EOS, MAX_TEXT_CHARS, SPECIAL_TOKENS, prompt


class PromptError(ValueError):
    """An operator's text that cannot be asked (too long, empty, carries a reserved marker)."""


class GlmTokenizer:
    def __init__(self, data: bytes) -> None:
        self.json = data.decode("utf-8")
        self.tok = Tokenizer.from_str(self.json)
        self.tok.no_padding()
        self.tok.no_truncation()
        self.eos_id = self._id(EOS)
        self.vocab_size = self.tok.get_vocab_size()

    def _id(self, token: str) -> int:
        i = self.tok.token_to_id(token)
        if i is None:
            raise ValueError(f"tokenizer has no {token} token")
        return i

    def encode_prompt(self, text: str) -> list[int]:
        text = text.strip()
        if not text:
            raise PromptError("the question is empty")
        if len(text) > MAX_TEXT_CHARS:
            raise PromptError(f"the question is {len(text)} characters; at most {MAX_TEXT_CHARS}")
        if "<|" in text and any(s in text for s in SPECIAL_TOKENS):
            raise PromptError("the question contains a reserved marker (<|...|>)")
        return self.tok.encode(prompt(text)).ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)
