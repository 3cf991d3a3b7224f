"""Token logprobs in OpenAI's two formats (chat: per-token objects with bytes; completions: parallel lists)."""

from functools import lru_cache

from engine_builder.common.types import TokenLogprob
from engine_builder.serve.decoding.detokenizer import TextDecoder
from engine_builder.serve.server.protocol import ChatTokenLogprob, CompletionLogprobs, TopLogprob


class TokenTexts:
    """Text and raw bytes of single tokens, cached per token id."""

    def __init__(self, decoder: TextDecoder) -> None:
        self.decoder = decoder
        self.text = lru_cache(maxsize=65536)(self._text)
        self.raw_bytes = lru_cache(maxsize=65536)(self._raw_bytes)

    def _text(self, token_id: int) -> str:
        return self.decoder.token_text(token_id)

    def _raw_bytes(self, token_id: int) -> list[int]:
        return list(self.decoder.token_bytes(token_id))

    def chat(self, entries: list[TokenLogprob]) -> list[ChatTokenLogprob]:
        return [
            ChatTokenLogprob(
                token=self.text(entry.token_id),
                logprob=entry.logprob,
                bytes=self.raw_bytes(entry.token_id),
                top_logprobs=[
                    TopLogprob(token=self.text(token_id), logprob=logprob, bytes=self.raw_bytes(token_id))
                    for token_id, logprob in entry.top
                ],
            )
            for entry in entries
        ]

    def completion(
        self,
        entries: list[TokenLogprob | None],
        start_offset: int,
        logprobs: CompletionLogprobs,
        unwritten: frozenset[int] = frozenset(),
    ) -> int:
        """Append entries to `logprobs`; returns the text offset after them. `unwritten`: token ids the text leaves
        out (special tokens under skip_special_tokens), which take no characters of it (probe FE #4)."""
        offset = start_offset
        for entry in entries:
            if entry is None:
                continue
            logprobs.tokens.append(self.text(entry.token_id))
            logprobs.token_logprobs.append(entry.logprob)
            start, offset = (offset, offset) if entry.token_id in unwritten else self.char_span(entry.token_id, offset)
            logprobs.text_offset.append(start)
            logprobs.top_logprobs.append(self.completion_top(entry))
        return offset

    def char_span(self, token_id: int, chars: int) -> tuple[int, int]:
        """(the character offset a token starts at, the characters begun once it is added), `chars` having begun
        before it. Offsets count characters of the text, as OpenAI's `text_offset` does, not token texts: a
        character cut across tokens (each decodes to U+FFFD alone) is one character, and a token that starts
        inside one starts at that character. Every UTF-8 character has exactly one byte that is not a
        continuation byte (0b10xxxxxx), so counting those counts characters."""
        raw = self.raw_bytes(token_id)
        if not raw:
            return chars, chars
        start = chars - 1 if raw[0] & 0xC0 == 0x80 and chars > 0 else chars
        return start, chars + sum(1 for byte in raw if byte & 0xC0 != 0x80)

    def completion_top(self, entry: TokenLogprob) -> dict[str, float] | None:
        """Completions' `top_logprobs` entry: the k best tokens and the chosen one (OpenAI: up to logprobs + 1), keyed
        by text, best first. The chosen token's key is its text, as in `tokens`; another token whose text is already
        a key (byte fragments all decode to U+FFFD) is keyed by its bytes, `bytes:\\xf0\\x9f`, so none overwrites
        another."""
        chosen = self.text(entry.token_id)
        if not entry.top:  # logprobs: 0 asks for the chosen token alone (OpenAI and vLLM give it, not null)
            return {chosen: entry.logprob}
        ranked = list(entry.top)
        if all(token_id != entry.token_id for token_id, _ in ranked):
            ranked.append((entry.token_id, entry.logprob))
            ranked.sort(key=lambda pair: -pair[1])
        top: dict[str, float] = {}
        for token_id, logprob in ranked:
            key = chosen if token_id == entry.token_id else self.text(token_id)
            if token_id != entry.token_id and (key == chosen or key in top):
                key = "bytes:" + "".join(f"\\x{byte:02x}" for byte in self.raw_bytes(token_id))
            top.setdefault(key, logprob)
        return top
