"""Tokenizer directories and data paths shared by the text-stage tests.

Three tokenizers are built here with the real ``tokenizers`` library, trained on real COCO captions from
tests/data/text: two byte-level BPEs (a GPT-2-style one without a pad token, and a Llama-style one whose
post-processor adds a BOS token and whose ``tokenizer_config.json`` carries a chat template), and a SentencePiece
Unigram model (Metaspace pre-tokenizer, a T5-style ``</s>`` suffix).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

HERE = Path(__file__).parent
REPO = HERE.parent
CLIP_DIR = REPO / "sample_data" / "tokenizers" / "clip"
MINILM_DIR = HERE / "data" / "tokenizers" / "minilm"
TEXT_DATA = HERE / "data" / "text"
SP_LLAMA_DIR = HERE / "data" / "tokenizers" / "sp_llama_coco"  # a SentencePiece model without tokenizer.json

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
)


def coco_captions() -> list[str]:
    """60 real COCO captions (cocoapi fake-caption results)."""
    return [r["caption"] for r in json.loads((TEXT_DATA / "coco_fakecap_results_60.json").read_text())]


def build_bytelevel_bpe(directory: Path, *, llama_style: bool = False) -> Path:
    """Train a small byte-level BPE on real captions and save it as a transformers tokenizer directory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    directory.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>"] + (["<s>", "</s>"] if llama_style else [])
    trainer = trainers.BpeTrainer(
        vocab_size=500,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(coco_captions(), trainer)
    cfg: dict[str, object] = {"model_max_length": 1024}
    if llama_style:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))]
        )
        cfg |= {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": "<s>",
            "eos_token": "</s>",
            "chat_template": CHAT_TEMPLATE,
        }
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
        cfg |= {
            "tokenizer_class": "GPT2Tokenizer",
            "bos_token": "<|endoftext|>",
            "eos_token": "<|endoftext|>",
            "unk_token": "<|endoftext|>",
        }
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(cfg))
    return directory


def build_unigram(directory: Path) -> Path:
    """Train a small SentencePiece-style Unigram tokenizer (T5 layout: ``$A </s>``, pad ``<pad>``) on real captions."""
    from tokenizers import processors
    from tokenizers.implementations import SentencePieceUnigramTokenizer

    directory.mkdir(parents=True, exist_ok=True)
    tok = SentencePieceUnigramTokenizer()
    tok.train_from_iterator(
        coco_captions(), vocab_size=300, show_progress=False, special_tokens=["<pad>", "</s>", "<unk>"],
        unk_token="<unk>",
    )
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", special_tokens=[("</s>", tok.token_to_id("</s>"))]
    )
    tok.save(str(directory / "tokenizer.json"))
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "pad_token": "<pad>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "model_max_length": 512,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(cfg))
    return directory


def copy_tokenizer(src: Path, dst: Path) -> Path:
    """A copy of a tokenizer directory (its regular files), to change or move without touching the original."""
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.is_file() and f.name != "ATTRIBUTION.md":
            shutil.copyfile(f, dst / f.name)
    return dst
