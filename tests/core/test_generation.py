"""Per-row decoding, host side: incremental detokenisation equals a full decode byte for byte at a bounded
window per token; stop strings found incrementally; vLLM's request extensions (``ignore_eos``, ``min_tokens``,
``top_k``).

Three real tokenizers: the demo's byte-level one (random ids are random bytes: invalid UTF-8, characters split
across tokens), a byte-level BPE trained here on multilingual text (merges spanning multi-byte characters, as
GPT-2/Llama 3/Qwen have) and a SentencePiece-style Metaspace BPE (its decoder strips the first token's space).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from hotswap_core.detokenize import IncrementalDetokenizer
from hotswap_core.generation import GenerationRequest, RowState, SamplingParams, TokenLogprob
from hotswap_core.sampling import sample
from hotswapd.demo import DemoAssets

CORPUS = [
    "Hello world, how are you today? Très bien, merci. Ça va très bien.",
    "日本語のテキストです。中文文本。한국어 텍스트입니다.",
    "Emoji: 🚀🔥👍🏽 and 👨‍👩‍👧 families, ∑ math ≠ ∞, ½ ¾.",
    "Grüße aus Köln; Ελληνικά κείμενα; русский текст; עברית; العربية.",
] * 20

Decode = Callable[[list[int]], str]


def _fast(tok: Tokenizer) -> Decode:
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tok, clean_up_tokenization_spaces=False)
    return lambda ids: str(wrapped.decode(ids, skip_special_tokens=True))


def _byte_level_bpe() -> tuple[Decode, int, Callable[[str], list[int]]]:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<eos>"])  # fmt: skip
    tok.train_from_iterator(CORPUS, trainer)
    return _fast(tok), tok.get_vocab_size(), lambda text: tok.encode(text).ids


def _metaspace_bpe() -> tuple[Decode, int, Callable[[str], list[int]]]:
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Metaspace()])
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=700, special_tokens=["<unk>", "<eos>", *byte_tokens])
    tok.train_from_iterator(CORPUS, trainer)
    return _fast(tok), tok.get_vocab_size(), lambda text: tok.encode(text).ids


def _incremental(decode: Decode, ids: list[int]) -> tuple[str, list[str]]:
    det = IncrementalDetokenizer(decode)
    deltas = [det.push(i) for i in ids]
    deltas.append(det.finish())
    assert det.text == "".join(deltas)
    return det.text, deltas


@pytest.fixture(scope="module")
def demo_tokenizer(demo_assets: DemoAssets) -> Any:
    return AutoTokenizer.from_pretrained(str(demo_assets.base))  # byte-level, no merges: one token per byte


@pytest.fixture(scope="module")
def demo_decode(demo_tokenizer: Any) -> tuple[Decode, int]:
    return (lambda ids: str(demo_tokenizer.decode(ids, skip_special_tokens=True))), len(demo_tokenizer)


def test_random_bytes_on_the_demo_tokenizer_decode_as_a_full_decode(demo_decode: tuple[Decode, int]) -> None:
    decode, vocab = demo_decode
    rng = random.Random(1)
    for _ in range(1500):
        ids = [rng.randrange(vocab) for _ in range(rng.randrange(1, 48))]
        text, _ = _incremental(decode, ids)
        assert text == decode(ids), ids


@pytest.mark.parametrize("build", [_byte_level_bpe, _metaspace_bpe], ids=["byte_level_bpe", "metaspace_bpe"])
def test_random_ids_and_real_text_on_bpe_tokenizers_decode_as_a_full_decode(
    build: Callable[[], tuple[Decode, int, Callable[[str], list[int]]]],
) -> None:
    decode, vocab, encode = build()
    rng = random.Random(2)
    samples = [[rng.randrange(vocab) for _ in range(rng.randrange(1, 48))] for _ in range(800)]
    samples += [encode(line) for line in set(CORPUS)]
    for ids in samples:
        text, deltas = _incremental(decode, ids)
        assert text == decode(ids), ids
    for line in set(CORPUS):  # valid text: no delta ever shows a half character
        _, deltas = _incremental(decode, encode(line))
        assert all("\ufffd" not in d for d in deltas), deltas


def test_a_split_multibyte_character_is_held_until_complete(demo_tokenizer: Any) -> None:
    tok = demo_tokenizer

    def decode(ids: list[int]) -> str:
        return str(tok.decode(ids, skip_special_tokens=True))

    ids = tok.encode("é🚀", add_special_tokens=False)
    assert len(ids) == 6
    det = IncrementalDetokenizer(decode)
    assert [det.push(i) for i in ids] == ["", "é", "", "", "", "🚀"]
    assert det.finish() == ""
    det = IncrementalDetokenizer(decode)
    assert det.push(ids[2]) == ""  # the first byte of the rocket, and nothing after it
    assert det.finish() == "\ufffd" == decode(ids[2:3])  # cut at the end: as a full decode


def test_each_token_decodes_a_bounded_window_whatever_the_length(demo_decode: tuple[Decode, int]) -> None:
    decode, vocab = demo_decode
    longest = 0

    def counting(ids: list[int]) -> str:
        nonlocal longest
        longest = max(longest, len(ids))
        return decode(ids)

    rng = random.Random(3)
    ids = [rng.randrange(vocab) for _ in range(3000)]
    text, _ = _incremental(counting, ids)
    assert text == decode(ids)
    assert longest <= 33, longest  # the window, never the whole output


def _reference(decode: Decode, ids: list[int], stops: tuple[str, ...], max_tokens: int) -> tuple[str, str]:
    """What a row's text and finish reason must be: the old way, a full decode after every token."""
    taken: list[int] = []
    for token in ids:
        taken.append(token)
        text = decode(taken)
        hits = [at for at in (text.find(s) for s in stops) if at != -1]
        if hits:
            return text[: min(hits)], "stop"
        if len(taken) >= max_tokens:
            return text, "length"
    raise AssertionError("ran out of ids")


def test_rows_stop_strings_and_streams_match_a_full_decode(
    demo_decode: tuple[Decode, int], demo_tokenizer: Any
) -> None:
    decode, _ = demo_decode
    rng = random.Random(4)
    words = ["lorem ", "ipsum ", "dolor ", "é🚀 ", "日本 ", "END", "\n"]
    for _ in range(300):
        text = "".join(rng.choice(words) for _ in range(12))
        ids = list(demo_tokenizer.encode(text, add_special_tokens=False))
        stops = tuple(rng.sample(["END", "🚀 d", "m i", "\n\n", "本 l", "zzz"], rng.randrange(0, 3)))
        max_tokens = rng.randrange(1, len(ids) + 1)
        streamed: list[str] = []
        request = GenerationRequest(
            "x", SamplingParams(max_tokens=max_tokens, stop=stops), on_text=lambda t, _lp, into=streamed: into.append(t)
        )
        row = RowState(request, [0], decode, frozenset())
        for token in ids:
            row.push(token)
            if row.done:
                break
        assert (row.text, row.finish_reason) == _reference(decode, ids, stops, max_tokens), (text, stops)
        assert "".join(streamed) == row.text
        assert not any(s in d for d in streamed for s in stops if s)


def test_streamed_logprobs_come_with_the_text_their_tokens_start(
    demo_decode: tuple[Decode, int], demo_tokenizer: Any
) -> None:
    """Every token's log-probabilities are streamed once, in order, with the delta in which its text starts
    (those of a character split across tokens wait for it, as does text held back for a stop string); the
    last delta, possibly empty, carries the rest."""
    decode, _ = demo_decode
    rng = random.Random(5)
    words = ["lorem ", "é🚀 ", "日本 ", "END", "\n"]
    for _ in range(200):
        ids = list(demo_tokenizer.encode("".join(rng.choice(words) for _ in range(8)), add_special_tokens=False))
        stops = tuple(rng.sample(["END", "🚀 l", "本 ", "zzz"], rng.randrange(0, 3)))
        streamed: list[tuple[str, tuple[TokenLogprob, ...]]] = []
        params = SamplingParams(max_tokens=rng.randrange(1, len(ids) + 1), stop=stops, logprobs=1)
        request = GenerationRequest("x", params, on_text=lambda t, lp, into=streamed: into.append((t, lp)))
        row = RowState(request, [0], decode, frozenset())
        for n, token in enumerate(ids):
            row.push(token, (-float(n), ((token, -float(n)),)))
            if row.done:
                break
        assert row.logprobs is not None and [e.token_id for e in row.logprobs] == row.ids
        assert [e for _, entries in streamed for e in entries] == row.logprobs
        assert "".join(t for t, _ in streamed) == row.text
        for e in row.logprobs:  # valid UTF-8 here: each token's own text is where its offset says
            own = decode([e.token_id])
            assert "\ufffd" in own or e.offset >= len(row.text) or row.text[e.offset :].startswith(own), row.text
        start = 0
        for k, (delta, entries) in enumerate(streamed):
            last = k == len(streamed) - 1
            assert all(start <= e.offset and (last or e.offset < start + len(delta)) for e in entries), streamed
            start += len(delta)


EOS = 258  # the demo tokenizer's eos_token_id


def _row(decode: Decode, **params: Any) -> RowState:
    return RowState(GenerationRequest("x", SamplingParams(**params)), [0], decode, frozenset({EOS}))


def test_ignore_eos_generates_max_tokens_and_min_tokens_masks_eos(
    demo_decode: tuple[Decode, int], demo_tokenizer: Any
) -> None:
    decode, vocab = demo_decode
    assert demo_tokenizer.eos_token_id == EOS
    eos_first = torch.full((1, vocab), -5.0)
    eos_first[0, EOS], eos_first[0, 70] = 10.0, 1.0  # EOS is the argmax, byte 70 the runner-up
    row = _row(decode, max_tokens=4)
    row.push(sample(eos_first, [row])[0])
    assert (row.finish_reason, row.ids, row.text) == ("stop", [EOS], "")  # a token of the output, not of its text
    row = _row(decode, max_tokens=4, min_tokens=3)
    while not row.done:
        row.push(sample(eos_first, [row])[0])
    assert row.ids == [70, 70, 70, EOS] and row.finish_reason == "stop"
    row = _row(decode, max_tokens=4, ignore_eos=True)
    while not row.done:
        row.push(sample(eos_first, [row])[0])
    assert (row.ids, row.finish_reason) == ([EOS] * 4, "length")


def test_an_eos_that_ends_the_text_is_counted_and_scored_but_not_shown(demo_decode: tuple[Decode, int]) -> None:
    """As in vLLM: the EOS is a token of the output (``ids``, so ``usage.completion_tokens``) with its
    log-probability entry, at the end of the text, delivered with the stream's last delta; its text is not shown.
    (lm-eval reads ``token_logprobs[ctxlen:-1]``: without the entry its continuation's last token would be lost.)"""
    decode, _ = demo_decode
    deltas: list[tuple[str, tuple[TokenLogprob, ...]]] = []
    row = RowState(
        GenerationRequest("x", SamplingParams(max_tokens=4, logprobs=1), on_text=lambda t, lp: deltas.append((t, lp))),
        [0], decode, frozenset({EOS}),
    )  # fmt: skip
    row.push(70, (-0.5, ((70, -0.5),)))
    row.push(EOS, (-0.25, ((EOS, -0.25),)))
    assert (row.ids, row.text, row.finish_reason) == ([70, EOS], "F", "stop")
    assert row.logprobs == [TokenLogprob(70, -0.5, ((70, -0.5),), 0), TokenLogprob(EOS, -0.25, ((EOS, -0.25),), 1)]
    assert "".join(t for t, _ in deltas) == "F" and [e for _, lp in deltas for e in lp] == row.logprobs
    assert deltas[-1][1][-1].token_id == EOS


def test_min_tokens_defers_stop_strings(demo_decode: tuple[Decode, int], demo_tokenizer: Any) -> None:
    decode, _ = demo_decode
    ids = list(demo_tokenizer.encode("ab\ncd\nef", add_special_tokens=False))
    for min_tokens, text in ((0, "ab"), (3, "ab"), (4, "ab\ncd"), (len(ids), "ab\ncd\nef")):
        row = _row(decode, max_tokens=len(ids), min_tokens=min_tokens, stop=("\n",))
        for token in ids:
            row.push(token)
            if row.done:
                break
        assert row.text == text, min_tokens


def test_top_k_samples_only_among_the_k_most_likely(demo_decode: tuple[Decode, int]) -> None:
    decode, vocab = demo_decode
    logits = torch.randn(1, vocab, generator=torch.Generator().manual_seed(0))
    top = set(logits[0].topk(5).indices.tolist())
    row = _row(decode, max_tokens=1, temperature=2.0, top_k=5, seed=7)
    picked = {sample(logits, [row])[0] for _ in range(300)}
    assert picked <= top and len(picked) > 1
    greedy = int(logits.argmax())
    row = _row(decode, max_tokens=1, temperature=1.5, top_k=1, seed=7)
    assert {sample(logits, [row])[0] for _ in range(50)} == {greedy}
