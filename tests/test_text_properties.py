"""Invariants of TextEncoder.encode_batch over generated texts (Hypothesis), checked against transformers too."""

from __future__ import annotations

from functools import cache

import numpy as np
from _text_helpers import CLIP_DIR, MINILM_DIR, coco_captions
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mmprep.text.config import TextConfig
from mmprep.text.encoder import TextEncoder
from mmprep.text.lengths import LengthHistogram

WORDS = [w for c in coco_captions() for w in c.split()][:200]
# Real caption words mixed with arbitrary unicode, placeholders and whitespace.
piece = st.one_of(
    st.sampled_from(WORDS),
    st.text(min_size=0, max_size=8),
    st.sampled_from(["<image>", " ", "\n", "  ", "🙂", "日本語", "[SEP]", "<|endoftext|>"]),
)
text = st.lists(piece, min_size=0, max_size=40).map(" ".join)
config = st.fixed_dictionaries(
    {
        "tok": st.sampled_from(["clip", "minilm"]),
        "max_length": st.integers(3, 48),
        "padding_side": st.sampled_from(["right", "left"]),
        "truncation_side": st.sampled_from(["right", "left"]),
        "add_special_tokens": st.booleans(),
    }
)


@cache
def encoder(tok: str, max_length: int, padding_side: str, truncation_side: str, special: bool) -> TextEncoder:
    directory = CLIP_DIR if tok == "clip" else MINILM_DIR
    cfg = TextConfig(
        max_length=max_length, padding_side=padding_side, truncation_side=truncation_side, add_special_tokens=special
    )
    return TextEncoder(directory, cfg)


@cache
def reference(tok: str, padding_side: str, truncation_side: str) -> object:
    from transformers import AutoTokenizer

    directory = CLIP_DIR if tok == "clip" else MINILM_DIR
    return AutoTokenizer.from_pretrained(str(directory), padding_side=padding_side, truncation_side=truncation_side)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cfg=config, texts=st.lists(text, min_size=0, max_size=12))
def test_encode_batch_invariants(cfg: dict, texts: list[str]) -> None:
    enc = encoder(cfg["tok"], cfg["max_length"], cfg["padding_side"], cfg["truncation_side"], cfg["add_special_tokens"])
    length = cfg["max_length"]
    batch = enc.encode_batch(texts)
    n = batch.n_tokens.astype(np.int64)
    # No row lost, every row exactly max_length ids.
    assert batch.input_ids.shape == (len(texts), length) and batch.attention_mask.shape == (len(texts), length)
    assert len(batch) == len(texts)
    # Mask sum = min(count, max_length); truncated = count > max_length.
    assert batch.attention_mask.sum(axis=1).tolist() == np.minimum(n, length).tolist()
    assert batch.truncated.tolist() == (n > length).tolist()
    # Padding placement: ones contiguous at the start (right padding) or at the end (left padding).
    for mask, ids, count in zip(batch.attention_mask, batch.input_ids, n, strict=True):
        kept = min(int(count), length)
        expected = [1] * kept + [0] * (length - kept)
        if cfg["padding_side"] == "left":
            expected = expected[::-1]
        assert mask.tolist() == expected
        assert (ids[mask == 0] == enc.pad_token_id).all()
    # Exactly what transformers produces, and the count is the untruncated length.
    if texts:
        hf = reference(cfg["tok"], cfg["padding_side"], cfg["truncation_side"])
        special = cfg["add_special_tokens"]
        ref = hf(texts, padding="max_length", truncation=True, max_length=length, add_special_tokens=special)
        assert batch.input_ids.tolist() == ref["input_ids"]
        full = hf(texts, add_special_tokens=special, verbose=False)["input_ids"]
        assert n.tolist() == [len(ids) for ids in full]


@settings(max_examples=80, deadline=None)
@given(
    counts=st.lists(st.lists(st.integers(0, 300), max_size=30), min_size=1, max_size=5),
    max_length=st.integers(1, 300),
    q=st.sampled_from([0.5, 0.9, 0.99, 1.0]),
)
def test_length_histogram_matches_sorting(counts: list[list[int]], max_length: int, q: float) -> None:
    hist = LengthHistogram()
    for chunk in counts:
        hist.add(np.array(chunk, dtype=np.int32))
    flat = sorted(v for chunk in counts for v in chunk)
    assert hist.total == len(flat)
    if not flat:
        assert hist.quantile(q) is None
        return
    rank = int(np.ceil(q * len(flat) - 1e-9))
    assert hist.quantile(q) == flat[max(rank, 1) - 1]
    assert hist.over(max_length) == sum(v > max_length for v in flat)
    assert hist.summary(max_length)["max"] == flat[-1]
