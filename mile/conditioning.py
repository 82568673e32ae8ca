"""The one conditioning rule of every evaluation route: what a request is scored after.

Training joins documents with EOS and never shows BOS (`<s>`), so a document starts right after
an EOS. A request (a prompt, a multiple-choice context, a text to score) starts a document, so it
is conditioned on exactly one EOS in front of its tokens and nothing else. mile.evaluate, the
harness backend (mile.lm_eval) and the Hugging Face export (mile.export: its tokenizer's
begin-of-text token is EOS) all follow it.

Splitting (context, continuation) into tokens follows lm-evaluation-harness, so every route cuts
at the same place: trailing spaces of the context move to the continuation, the whole text is
encoded once, and the continuation is what lies beyond the context's own encoding. (Encoding the
whole rather than the halves matters with SentencePiece's dummy "▁" prefix: " yes" alone would
encode as "▁▁yes", a sequence never seen in training.)
"""

from __future__ import annotations


def encode_document(tokenizer, text: str) -> list[int]:
    """EOS then the tokens of ``text``: a request as the model saw documents in training."""
    return [tokenizer.eos_id] + tokenizer.encode(text)


def split_request(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids with the leading EOS, continuation ids), cut as lm-evaluation-harness cuts."""
    if context == "":
        # The harness's rule for an empty context: the prefix token (EOS here) alone.
        return [tokenizer.eos_id], tokenizer.encode(continuation)
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = encode_document(tokenizer, context + continuation)
    n_context = len(encode_document(tokenizer, context))
    return whole[:n_context], whole[n_context:]
