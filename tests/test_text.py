"""The text stage with real tokenizers: exact ids, shapes of real annotations, placeholders, pad tokens, templates."""

from __future__ import annotations

import importlib.util
import json
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from _text_helpers import (
    CHAT_TEMPLATE,
    CLIP_DIR,
    MINILM_DIR,
    SP_LLAMA_DIR,
    TEXT_DATA,
    build_bytelevel_bpe,
    build_unigram,
    coco_captions,
)

from mmprep.errors import InputError, UsageError
from mmprep.records import Sample
from mmprep.text.config import MAX_LENGTH_LIMIT, TextConfig, TextError
from mmprep.text.encoder import TextEncoder
from mmprep.text.lengths import LengthHistogram
from mmprep.text.render import count_placeholders, inline_images, sample_image_count

CAT = "a photo of a cat"
CLIP_CAT = [49406, 320, 1125, 539, 320, 2368, 49407]
BERT_CAT = [101, 1037, 6302, 1997, 1037, 4937, 102]


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_bytelevel_bpe(tmp_path_factory.mktemp("gpt2"))


@pytest.fixture(scope="module")
def unigram_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_unigram(tmp_path_factory.mktemp("unigram"))


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_bytelevel_bpe(tmp_path_factory.mktemp("llama"), llama_style=True)


def _json(name: str) -> list[dict]:
    return json.loads((TEXT_DATA / name).read_text(encoding="utf-8"))


def _jsonl(name: str) -> list[dict]:
    return [json.loads(line) for line in (TEXT_DATA / name).read_text(encoding="utf-8").splitlines() if line]


def _real_texts() -> list[str]:
    llava = ["\n".join(t["value"] for t in r["conversations"]) for r in _json("llava_instruct_3.json")]
    return [*coco_captions(), *llava, "a", "héllo wörld 日本語 🙂", "<image> two  spaces\tand a tab"]


# -- exact ids -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("directory", "expected", "pad_id"), [(CLIP_DIR, CLIP_CAT, 49407), (MINILM_DIR, BERT_CAT, 0)])
def test_exact_ids_for_a_known_string(directory: Path, expected: list[int], pad_id: int) -> None:
    enc = TextEncoder(directory, TextConfig(max_length=10))
    batch = enc.encode_batch([enc.render(CAT)])
    assert batch.input_ids.dtype == np.int32 and batch.attention_mask.dtype == np.uint8
    assert batch.n_tokens.dtype == np.int32 and batch.truncated.dtype == np.bool_
    assert batch.input_ids[0].tolist() == [*expected, pad_id, pad_id, pad_id]
    assert batch.attention_mask[0].tolist() == [1] * 7 + [0] * 3
    assert batch.n_tokens.tolist() == [7] and batch.truncated.tolist() == [False]
    assert enc.pad_token_id == pad_id


def test_minilm_padding_to_128_in_tokenizer_json_is_ignored() -> None:
    enc = TextEncoder(MINILM_DIR, TextConfig(max_length=7))
    batch = enc.encode_batch([CAT, "cat"])
    assert batch.input_ids.tolist() == [BERT_CAT, [101, 4937, 102, 0, 0, 0, 0]]
    assert batch.n_tokens.tolist() == [7, 3]


@pytest.mark.parametrize("tok", ["clip", "minilm", "gpt2", "llama", "unigram"])
@pytest.mark.parametrize("padding_side", ["right", "left"])
@pytest.mark.parametrize("truncation_side", ["right", "left"])
@pytest.mark.parametrize("special", [True, False])
def test_same_ids_as_transformers(
    tok: str,
    padding_side: str,
    truncation_side: str,
    special: bool,
    gpt2_dir: Path,
    llama_dir: Path,
    unigram_dir: Path,
) -> None:
    """Differential check against `tokenizer(texts, padding="max_length", truncation=True, max_length=L)`."""
    from transformers import AutoTokenizer

    dirs = {"clip": CLIP_DIR, "minilm": MINILM_DIR, "gpt2": gpt2_dir, "llama": llama_dir, "unigram": unigram_dir}
    directory = dirs[tok]
    texts = _real_texts()
    hf = AutoTokenizer.from_pretrained(str(directory), padding_side=padding_side, truncation_side=truncation_side)
    if hf.pad_token is None:
        hf.pad_token = hf.eos_token
    full = hf(texts, add_special_tokens=special, verbose=False)["input_ids"]
    for length in (4, 16):
        cfg = TextConfig(
            max_length=length, padding_side=padding_side, truncation_side=truncation_side, add_special_tokens=special
        )
        enc = TextEncoder(directory, cfg)
        batch = enc.encode_batch(texts)
        ref = hf(texts, padding="max_length", truncation=True, max_length=length, add_special_tokens=special)
        assert batch.input_ids.tolist() == ref["input_ids"]
        assert batch.attention_mask.tolist() == ref["attention_mask"]
        assert batch.n_tokens.tolist() == [len(ids) for ids in full]
        assert batch.truncated.tolist() == [len(ids) > length for ids in full]


def test_sentencepiece_unigram_suffix_only_layout(unigram_dir: Path) -> None:
    enc = TextEncoder(unigram_dir, TextConfig(max_length=6, truncation_side="left"))
    assert (enc.special_prefix, enc.special_suffix, enc.pad_token) == (0, 1, "<pad>")
    eos = enc._backend.token_to_id("</s>")
    batch = enc.encode_batch([CAT, "a"])
    assert batch.input_ids[0, -1] == eos and batch.truncated.tolist() == [True, False]
    assert batch.input_ids[1].tolist()[-4:] == [enc.pad_token_id] * 4


def test_truncation_keeps_special_tokens_and_counts_the_true_length() -> None:
    conv = _json("llava_instruct_3.json")[0]["conversations"]
    enc = TextEncoder(CLIP_DIR, TextConfig(max_length=77, check_placeholders=False))
    text = enc.render(conv)
    batch = enc.encode_batch([text])
    assert batch.truncated.tolist() == [True] and int(batch.n_tokens[0]) > 77
    assert batch.input_ids[0, 0] == 49406 and batch.input_ids[0, -1] == 49407
    assert int(batch.attention_mask.sum()) == 77
    left = TextEncoder(CLIP_DIR, TextConfig(max_length=77, truncation_side="left", check_placeholders=False))
    lb = left.encode_batch([text])
    assert lb.input_ids[0, 0] == 49406 and lb.input_ids[0, -1] == 49407
    assert lb.input_ids[0, 1:-1].tolist() != batch.input_ids[0, 1:-1].tolist()


def test_empty_batch() -> None:
    batch = TextEncoder(MINILM_DIR, TextConfig(max_length=8)).encode_batch([])
    assert batch.input_ids.shape == (0, 8) and batch.attention_mask.shape == (0, 8) and len(batch) == 0


def test_encode_batch_makes_one_batched_tokenizer_call() -> None:
    enc = TextEncoder(MINILM_DIR, TextConfig(max_length=16))
    calls: list[str] = []
    real = enc._backend

    class Spy:
        def __getattr__(self, name: str) -> object:
            calls.append(name)
            return getattr(real, name)

    enc._backend = Spy()
    texts = coco_captions()
    batch = enc.encode_batch(texts)
    assert len(batch) == len(texts)
    assert calls == ["encode_batch_fast"]


# -- pad tokens ------------------------------------------------------------------------------------------


def test_tokenizer_without_pad_token_falls_back_to_eos_with_a_warning(gpt2_dir: Path) -> None:
    enc = TextEncoder(gpt2_dir, TextConfig(max_length=12))
    eos_id = enc._backend.token_to_id("<|endoftext|>")
    assert enc.pad_token == "<|endoftext|>" and enc.pad_token_id == eos_id
    assert any("no pad token" in w and "--pad-token" in w for w in enc.warnings)
    batch = enc.encode_batch(["a cat"])
    n = int(batch.n_tokens[0])
    assert (batch.input_ids[0, n:] == eos_id).all() and not batch.attention_mask[0, n:].any()


def test_explicit_pad_token(gpt2_dir: Path) -> None:
    enc = TextEncoder(gpt2_dir, TextConfig(max_length=12, pad_token="a"))
    a_id = enc._backend.token_to_id("a")
    assert enc.pad_token_id == a_id and enc.warnings == ()
    assert enc.encode_batch(["cat"]).input_ids[0, -1] == a_id
    with pytest.raises(UsageError, match="not a token"):
        TextEncoder(gpt2_dir, TextConfig(max_length=12, pad_token="<pad-that-does-not-exist>"))


def test_no_pad_and_no_eos_is_a_usage_error(gpt2_dir: Path, tmp_path: Path) -> None:
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "tokenizer.json").write_bytes((gpt2_dir / "tokenizer.json").read_bytes())
    (bare / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))
    with pytest.raises(UsageError, match="no pad token") as info:
        TextEncoder(bare, TextConfig(max_length=12))
    assert "--pad-token" in (info.value.hint or "")


# -- construction errors ---------------------------------------------------------------------------------


def test_missing_and_unusable_tokenizer_directories(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no such tokenizer directory"):
        TextEncoder(tmp_path / "nope", TextConfig())
    (tmp_path / "file.json").write_text("{}")
    with pytest.raises(InputError, match="is not a directory"):
        TextEncoder(tmp_path / "file.json", TextConfig())
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="cannot load a tokenizer") as info:
        TextEncoder(empty, TextConfig())
    assert "tokenizer.json" in (info.value.hint or "")


@pytest.mark.parametrize(("files", "says"), [
    ((), "the folder is empty: it needs tokenizer.json, or vocabulary files"),
    (("readme.md",), "the folder holds readme.md but no tokenizer.json and no vocabulary files (vocab.txt, "
                     "vocab.json with merges.txt, or tokenizer.model)"),
    (("tokenizer_config.json", "vocab.json"), "the folder holds tokenizer_config.json, vocab.json but not "
                                              "merges.txt, which vocab.json needs beside it"),
    (("vocab.json", "merges.txt"), "the folder holds merges.txt, vocab.json but no tokenizer_config.json, which "
                                   "names the tokenizer class"),
    # transformers builds a CLIP tokenizer from its config alone, with special tokens only: every word would be
    # the unknown token; mmprep refuses it
    (("tokenizer_config.json",), "the folder holds tokenizer_config.json but no tokenizer.json and no vocabulary "
                                 "files (vocab.txt, vocab.json with merges.txt, or tokenizer.model); the tokenizer "
                                 "built from it knows only its 2 special token(s)"),
])
def test_a_wrong_tokenizer_folder_is_one_sentence_naming_it_and_what_is_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, files: tuple[str, ...], says: str
) -> None:
    monkeypatch.setenv("MMPREP_NO_CACHE", "1")
    folder = tmp_path / "tok"
    folder.mkdir()
    for name in files:
        src = CLIP_DIR / name
        (folder / name).write_bytes(src.read_bytes() if src.exists() else b"not a tokenizer\n")
    with pytest.raises(InputError) as info:
        TextEncoder(folder, TextConfig(max_length=16))
    message = info.value.message
    assert message == f"{folder}: cannot load a tokenizer: {says}" or message.startswith(
        f"{folder}: cannot load a tokenizer: {says}")
    assert "\n" not in message and not message.rstrip().endswith(":")
    assert "Couldn't instantiate" not in message


def test_a_cached_tokenizer_with_special_tokens_only_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cache entry written before the vocabulary check (or by hand) does not bring the empty tokenizer back."""
    from tokenizers import Tokenizer, models

    from mmprep.text.cache import TokenizerInfo, tokenizer_cache_dir, tokenizer_cache_key

    monkeypatch.setenv("MMPREP_CACHE_DIR", str(tmp_path / "cache"))
    folder = tmp_path / "tok"
    folder.mkdir()
    (folder / "tokenizer_config.json").write_bytes((CLIP_DIR / "tokenizer_config.json").read_bytes())
    good = TextEncoder(CLIP_DIR, TextConfig(max_length=16))  # a real entry to copy the facts from
    backend = Tokenizer(models.WordLevel({"<|startoftext|>": 0, "<|endoftext|>": 1}, unk_token="<|endoftext|>"))
    backend.add_special_tokens(["<|startoftext|>", "<|endoftext|>"])
    cache = tokenizer_cache_dir()
    assert cache is not None
    entry = cache / f"{tokenizer_cache_key(CLIP_DIR)}.json"
    info = json.loads(entry.read_bytes())
    info["backend"] = backend.to_str()
    (cache / f"{tokenizer_cache_key(folder)}.json").write_text(json.dumps(info))
    assert TokenizerInfo.from_json((cache / f"{tokenizer_cache_key(folder)}.json").read_bytes()) is not None
    with pytest.raises(InputError, match="knows only its 2 special token"):
        TextEncoder(folder, TextConfig(max_length=16))
    assert good.vocab_size > 1000


@pytest.mark.skipif(importlib.util.find_spec("sentencepiece") is not None, reason="sentencepiece is installed")
def test_sentencepiece_model_without_the_package_names_the_package() -> None:
    """A real SentencePiece model, no tokenizer.json: the message names sentencepiece, not transformers' tiktoken."""
    with pytest.raises(InputError) as info:
        TextEncoder(SP_LLAMA_DIR, TextConfig(max_length=16))
    err = info.value
    assert "SentencePiece model (tokenizer.model)" in err.message and "'sentencepiece'" in err.message
    assert "tiktoken" not in str(err)
    assert "pip install sentencepiece protobuf" in (err.hint or "") and "tokenizer.json" in (err.hint or "")


def test_huge_max_length_is_a_usage_error_before_loading(tmp_path: Path) -> None:
    cfg = TextConfig(max_length=1_000_000_000)
    with pytest.raises(UsageError, match="above the limit of 1,048,576") as info:
        cfg.validate()
    assert "--max-length" in (info.value.hint or "")
    with pytest.raises(UsageError, match="above the limit"):
        TextEncoder(tmp_path / "not-even-a-directory", cfg)  # checked before the tokenizer is looked at
    TextConfig(max_length=MAX_LENGTH_LIMIT).validate()


def test_max_length_must_leave_room_for_text() -> None:
    with pytest.raises(UsageError, match="2 special tokens"):
        TextEncoder(MINILM_DIR, TextConfig(max_length=2))
    enc = TextEncoder(MINILM_DIR, TextConfig(max_length=2, add_special_tokens=False))
    assert enc.encode_batch([CAT]).input_ids.tolist() == [BERT_CAT[1:3]]
    assert TextEncoder(MINILM_DIR, TextConfig(max_length=3)).encode_batch([CAT]).input_ids.tolist() == [
        [101, 1037, 102]
    ]


def test_max_length_above_the_model_limit_is_a_warning() -> None:
    enc = TextEncoder(CLIP_DIR, TextConfig(max_length=100))
    assert any("model_max_length 77" in w for w in enc.warnings)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_length", 0),
        ("max_length", True),
        ("padding_side", "middle"),
        ("truncation_side", "up"),
        ("caption", "longest"),
        ("seed", "x"),
        ("pad_token", ""),
        ("image_placeholder", ""),
    ],
)
def test_config_validation(field: str, value: object) -> None:
    cfg = TextConfig(**{field: value})  # type: ignore[arg-type]
    with pytest.raises(UsageError):
        cfg.validate()
    with pytest.raises(UsageError):
        TextEncoder(MINILM_DIR, cfg)


# -- text shapes -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bert() -> TextEncoder:
    return TextEncoder(MINILM_DIR, TextConfig(max_length=64))


def test_plain_string_is_unchanged(bert: TextEncoder) -> None:
    caption = coco_captions()[1]
    assert caption.endswith(" ")  # a real caption with trailing whitespace
    assert bert.render(caption) == caption


def test_caption_lists_first_all_random() -> None:
    rows = _jsonl("coco_caption_lists.jsonl")
    first = TextEncoder(MINILM_DIR, TextConfig(caption="first"))
    allc = TextEncoder(MINILM_DIR, TextConfig(caption="all", separator=" | "))
    rnd = TextEncoder(MINILM_DIR, TextConfig(caption="random", seed=1))
    rnd_again = TextEncoder(MINILM_DIR, TextConfig(caption="random", seed=1))
    picks = set()
    for row in rows:
        caps = row["captions"]
        assert first.render(caps, sample_id=row["id"]) == caps[0]
        assert allc.render(caps, sample_id=row["id"]) == " | ".join(c.strip() for c in caps)
        chosen = rnd.render(caps, sample_id=row["id"])
        assert chosen in caps
        assert rnd_again.render(caps, sample_id=row["id"]) == chosen  # deterministic per sample
        picks.add(caps.index(chosen))
    assert len(picks) > 1  # not always the same position
    other_seeds = [
        [TextEncoder(MINILM_DIR, TextConfig(caption="random", seed=s)).render(r["captions"], sample_id=r["id"])
         for r in rows]
        for s in (2, 3)
    ]
    assert any(o != [rnd.render(r["captions"], sample_id=r["id"]) for r in rows] for o in other_seeds)


def test_llava_conversation_plain_layout(bert: TextEncoder) -> None:
    record = _json("llava_instruct_3.json")[0]
    text = bert.render(record["conversations"], sample_id=record["id"], image_count=1)
    turns = text.split("\n")
    assert turns[0] == "user: What is the man doing in the back of the pickup truck?"
    assert turns[1] == "<image>"
    assert turns[2].startswith("assistant: The man is sitting on top of piled objects")


def test_openai_messages_plain_layout(bert: TextEncoder) -> None:
    record = _json("mllm_demo.json")[1]
    assert bert.render(record["messages"], image_count=1) == (
        "user: <image>Who is he?\n"
        "assistant: He's Thomas Muller from Bayern Munich.\n"
        "user: Why is he on the ground?\n"
        "assistant: Because he's sliding on his knees to celebrate."
    )


def test_typed_parts_render_like_the_same_conversation_in_string_form(bert: TextEncoder) -> None:
    """LLaMA-Factory ships the same demo conversations as strings and as typed parts: they render identically."""
    demo = _json("mllm_demo.json")
    typed = _jsonl("v1_multimodal_demo_4.jsonl")
    for plain_rec, typed_rec in zip(demo[:4], typed, strict=True):
        n_images = len(plain_rec["images"])
        assert bert.render(typed_rec["messages"], image_count=n_images) == bert.render(
            plain_rec["messages"], image_count=n_images
        )
    assert inline_images(typed[0]["messages"]) == ["data/mllm_demo_data/1.jpg", "data/mllm_demo_data/1.jpg"]
    assert sample_image_count(Sample(id="x", text=typed[0]["messages"])) == 2
    assert sample_image_count(Sample(id="x", images=("a.jpg",), text=typed[0]["messages"])) == 1


def test_parquet_typed_parts_with_null_text(bert: TextEncoder) -> None:
    import pyarrow.parquet as pq

    rows = pq.read_table(TEXT_DATA / "llamafactory_mllm_example_dataset_test-0.parquet").to_pylist()
    text = bert.render(rows[0]["messages"], image_count=len(rows[0]["images"]))
    assert text.startswith("user: Who are they?<image>\nassistant: They're Kane and Gretzka")
    assert count_placeholders(rows[0]["messages"]) == 1


def test_dict_wrapping_messages_is_unwrapped(bert: TextEncoder) -> None:
    record = _json("mllm_demo.json")[1]
    assert bert.render({"messages": record["messages"]}) == bert.render(record["messages"])


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        (None, "text_missing"),
        ("", "text_empty"),
        ("   \n", "text_empty"),
        ([], "text_empty"),
        (["", "second"], "text_empty"),
        (42, "text_bad_type"),
        (["a caption", {"role": "user", "content": "hi"}], "text_bad_type"),
        ([{"speaker": "x", "text": "hi"}], "text_bad_type"),
        ([{"role": "user", "content": None}], "text_bad_type"),
        ([{"role": "user", "content": [{"type": "video", "value": "a.mp4"}]}], "text_bad_type"),
        ([{"role": "user", "content": [{"type": "text", "text": None, "value": 3}]}], "text_bad_type"),
        ([{"role": "", "content": "hi"}], "text_bad_type"),
        ([{"from": "human", "value": " "}], "text_empty"),
    ],
)
def test_bad_texts_raise_text_error_with_reason(bert: TextEncoder, text: object, reason: str) -> None:
    with pytest.raises(TextError) as info:
        bert.render(text)
    assert info.value.reason == reason and info.value.detail
    assert pickle.loads(pickle.dumps(info.value)).reason == reason


# -- placeholders ----------------------------------------------------------------------------------------


def test_count_placeholders_on_every_shape() -> None:
    demo = _json("mllm_demo.json")
    assert [count_placeholders(r["messages"]) for r in demo] == [len(r["images"]) for r in demo]
    assert count_placeholders(_json("llava_instruct_3.json")[0]["conversations"]) == 1
    assert count_placeholders(_jsonl("v1_multimodal_demo_4.jsonl")[0]["messages"]) == 2
    assert count_placeholders("<image><image> two") == 2
    assert count_placeholders(["<image> a", "b <image>"]) == 2
    assert count_placeholders("<img> x <img>", "<img>") == 2
    assert count_placeholders(None) == 0 and count_placeholders(7) == 0


def test_placeholder_mismatch_is_a_text_error(bert: TextEncoder) -> None:
    two = _json("mllm_demo.json")[0]["messages"]  # 2 <image> tags, 2 images in the real record
    assert bert.render(two, image_count=2)
    with pytest.raises(TextError) as info:
        bert.render(two, image_count=1)
    assert info.value.reason == "placeholder_mismatch" and "2 <image> placeholders but 1 image" in info.value.detail
    assert bert.render(two)  # no image count: nothing to check
    unchecked = TextEncoder(MINILM_DIR, TextConfig(check_placeholders=False))
    assert unchecked.render(two, image_count=1) == bert.render(two)
    with pytest.raises(TextError, match="0 <image> placeholders but 1 image"):
        bert.render([{"from": "human", "value": "Describe it."}], image_count=1)


def test_captions_without_placeholders_are_not_checked(bert: TextEncoder) -> None:
    assert bert.render("A tabby cat.", image_count=3) == "A tabby cat."
    assert bert.render(["A tabby cat.", "A cat."], image_count=1) == "A tabby cat."
    with pytest.raises(TextError, match="placeholder_mismatch"):
        bert.render("<image> A tabby cat.", image_count=2)


# -- chat templates --------------------------------------------------------------------------------------


def test_chat_template_renders_conversations_with_one_bos(llama_dir: Path) -> None:
    enc = TextEncoder(llama_dir, TextConfig(max_length=64))
    assert enc.has_chat_template and enc.special_prefix == 1 and enc.special_suffix == 0
    msgs = _json("mllm_demo.json")[1]["messages"]
    text = enc.render(msgs, image_count=1)
    assert text == "".join(f"<|{m['role']}|>\n{m['content']}</s>\n" for m in msgs)
    bos = enc._backend.token_to_id("<s>")
    ids = enc.encode_batch([text]).input_ids[0].tolist()
    assert ids[0] == bos and ids.count(bos) == 1
    # Without special tokens the template's own BOS stays in the text: the same ids come out.
    raw = TextEncoder(llama_dir, TextConfig(max_length=64, add_special_tokens=False))
    raw_text = raw.render(msgs, image_count=1)
    assert raw_text == "<s>" + text
    assert raw.encode_batch([raw_text]).input_ids[0].tolist() == ids
    assert enc.render("plain caption") == "plain caption"  # plain strings are not templated


def test_chat_template_without_jinja2_is_a_usage_error(llama_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    enc = TextEncoder(llama_dir, TextConfig(max_length=32))
    monkeypatch.setitem(sys.modules, "jinja2", None)
    with pytest.raises(UsageError, match="jinja2") as info:
        enc.render([{"role": "user", "content": "hi"}])
    assert "pip install jinja2" in (info.value.hint or "")
    assert enc.render("a caption") == "a caption"  # plain text needs no template


def test_chat_template_errors_are_text_errors(llama_dir: Path, tmp_path: Path) -> None:
    strict = tmp_path / "strict"
    strict.mkdir()
    (strict / "tokenizer.json").write_bytes((llama_dir / "tokenizer.json").read_bytes())
    cfg = json.loads((llama_dir / "tokenizer_config.json").read_text())
    cfg["chat_template"] = (
        "{% if messages[0]['role'] != 'user' %}{{ raise_exception('the first turn must be the user') }}{% endif %}"
        + CHAT_TEMPLATE
    )
    (strict / "tokenizer_config.json").write_text(json.dumps(cfg))
    enc = TextEncoder(strict, TextConfig(max_length=32))
    assert enc.render([{"role": "user", "content": "hi"}]) == "<|user|>\nhi</s>\n"
    with pytest.raises(TextError) as info:
        enc.render([{"role": "assistant", "content": "hi"}])
    assert info.value.reason == "chat_template_error" and "first turn must be the user" in info.value.detail


# -- pickling --------------------------------------------------------------------------------------------


def test_pickle_round_trip_gives_the_same_results(llama_dir: Path) -> None:
    for directory in (CLIP_DIR, llama_dir):
        enc = TextEncoder(directory, TextConfig(max_length=24, padding_side="left"))
        clone = pickle.loads(pickle.dumps(enc))
        msgs = _json("mllm_demo.json")[1]["messages"]
        assert clone.render(msgs, image_count=1) == enc.render(msgs, image_count=1)
        texts = _real_texts()
        a, b = enc.encode_batch(texts), clone.encode_batch(texts)
        for field in ("input_ids", "attention_mask", "n_tokens", "truncated"):
            assert np.array_equal(getattr(a, field), getattr(b, field))
        same = ("pad_token_id", "vocab_size", "warnings", "special_prefix", "special_suffix")
        assert [getattr(clone, k) for k in same] == [getattr(enc, k) for k in same]


def test_unpickling_in_a_fresh_process_does_not_import_transformers(tmp_path: Path) -> None:
    enc = TextEncoder(MINILM_DIR, TextConfig(max_length=10))
    blob = tmp_path / "enc.pkl"
    blob.write_bytes(pickle.dumps(enc))
    code = (
        "import pickle, sys\n"
        f"enc = pickle.loads(open({str(blob)!r}, 'rb').read())\n"
        f"ids = enc.encode_batch([enc.render({CAT!r})]).input_ids[0].tolist()\n"
        "print(ids, 'transformers' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=Path.cwd())
    assert out.stdout.strip() == f"{[*BERT_CAT, 0, 0, 0]} False"


# -- length histogram ------------------------------------------------------------------------------------


def test_length_histogram_nearest_rank() -> None:
    hist = LengthHistogram()
    hist.add(np.arange(1, 51))
    hist.add(np.arange(51, 101))
    s = hist.summary(95)
    assert (s["p50"], s["p90"], s["p99"], s["max"], s["covers_99_pct"]) == (50, 90, 99, 100, 99)
    assert s["rows"] == 100 and s["truncated"] == 5 and s["truncated_pct"] == 5.0 and s["mean"] == 50.5
    empty = LengthHistogram().summary(10)
    assert empty["p50"] is None and empty["rows"] == 0 and empty["truncated_pct"] == 0.0
