"""Cutting a long text to the end a tokenizer needs: judging or truncating a multi-megabyte input on a few thousand
characters of it, with the same tokens as the whole text would give there.

A vocabulary entry's spelling is never shorter than the text it stands for, so `n` tokens' worth of text is at most
`n * longest_token_chars` characters. A cut at a word boundary changes only how the words next to it split: the cut
end's tokens differ from the whole text's by at most CUT_MARGIN tokens, all next to the cut.
"""

CUT_MARGIN = 32


def head(text: str, num_chars: int, search_chars: int) -> str:
    """The first `num_chars` characters of a text, cut back to the last word boundary (a space or punctuation) among
    the final `search_chars`, so that the words kept tokenize as they do in the whole text. Without one, the cut
    falls in a word at least `search_chars` long, which splits the same way whatever follows it."""
    for end in range(num_chars, max(num_chars - search_chars, 0), -1):
        if not text[end - 1].isalnum():
            return text[:end]
    return text[:num_chars]


def tail(text: str, num_chars: int, search_chars: int) -> str | None:
    """`head` from the other end: the last `num_chars` characters, begun where a run of spaces or punctuation begins
    after a letter or digit, among the first `search_chars` (the run kept: a byte-level tokenizer reads a word's
    leading space with it). None without one: how a word's end splits depends on where the word begins (BPE merges
    run from its start), and so does a run's: begun inside `"…" * 60000` or a run of spaces, every token of the rest
    of the run can differ from the whole text's (probe AD)."""
    start = max(len(text) - num_chars, 0)
    if start == 0:
        return text
    for begin in range(max(start, 1), min(start + search_chars, len(text))):
        if not text[begin].isalnum() and text[begin - 1].isalnum():
            return text[begin:]
    return None
