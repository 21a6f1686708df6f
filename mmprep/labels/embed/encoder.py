"""The text encoder behind a tag-embedding matrix: any transformers encoder in a local directory (nothing is
downloaded), wrapped as a :class:`TagEmbedder` (texts in, float32 vectors out).

CLIP checkpoints (``model_type`` ``clip`` or ``clip_text_model``) give their *projected* text embedding, the same
vector as ``CLIPModel.get_text_features`` / ``CLIPTextModelWithProjection.text_embeds``: the final hidden state at the
EOS token, multiplied by ``text_projection``. Other encoders (BERT, sentence-transformers, ...) use the pooling their
folder declares in ``1_Pooling/config.json`` (sentence-transformers layout), else mean pooling over the attention
mask (the documented default); ``pooling=`` overrides. torch and transformers are imported inside the functions.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mmprep.errors import InputError, MissingDependencyError, UsageError
from mmprep.labels.embed.messages import first_line, some
from mmprep.text.hf import custom_code_error, quiet_transformers

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = [
    "DEFAULT_POOLING",
    "POOLINGS",
    "Encoded",
    "EncoderInfo",
    "TagEmbedder",
    "load_encoder",
    "set_torch_threads",
]

#: Pooling modes. ``eos``: the last non-padding token (for CLIP: the EOS token followed by ``text_projection``);
#: ``mean``: mean over the attention mask; ``cls``: the first token; ``max``: element-wise max over the attention
#: mask; ``mean_sqrt_len``: the masked sum divided by sqrt(length) (sentence-transformers' ``mean_sqrt_len_tokens``).
POOLINGS: tuple[str, ...] = ("eos", "mean", "cls", "max", "mean_sqrt_len")

#: Default pooling for non-CLIP encoders whose folder declares none.
DEFAULT_POOLING = "mean"


@dataclass(frozen=True)
class EncoderInfo:
    """How a text encoder turns a text into a vector (recorded in the sidecar).

    Attributes:
        path: the model directory.
        model_type: ``config.json``'s ``model_type``.
        kind: ``clip`` (CLIP text tower) or ``encoder`` (any other transformers encoder).
        pooling: one of :data:`POOLINGS`.
        pooling_source: where the pooling came from (``--pooling``, ``1_Pooling/config.json``, ``clip``,
            ``default``).
        projection: whether CLIP's ``text_projection`` is applied.
        config_sha256: sha256 of the bytes of ``config.json``.
        max_length: token limit (texts are truncated to it).
        lowercase: texts are lower-cased first (sentence-transformers ``do_lower_case``).
        device: torch device the model runs on.
        dtype: compute dtype (pooling and outputs are float32).
        declared_normalize: the folder's ``modules.json`` declares a sentence-transformers ``Normalize`` module.
        warnings: things the user should know (e.g. sentence-transformers modules that are not applied).
    """

    path: str
    model_type: str
    kind: str
    pooling: str
    pooling_source: str
    projection: bool
    config_sha256: str
    max_length: int
    lowercase: bool
    device: str
    dtype: str
    declared_normalize: bool = False
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True)
class Encoded:
    """What :meth:`TagEmbedder.encode` returns: ``vectors`` (``[len(texts), D]`` float32, in input order) and how
    many distinct texts reached ``max_length`` tokens, i.e. were probably truncated."""

    vectors: np.ndarray
    truncated: int


class TagEmbedder:
    """A loaded text encoder for tag texts: texts in, float32 vectors out (one per text, not normalised).

    Create it with :func:`load_encoder`.
    """

    def __init__(self, model: Any, tokenizer: Any, info: EncoderInfo, pad_id: int) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.info = info
        self._pad_id = pad_id

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids per text (special tokens added, truncated to ``max_length``, no padding)."""
        if not texts:
            return []
        if self.info.lowercase:
            texts = [t.lower() for t in texts]
        enc = self.tokenizer(
            list(texts), add_special_tokens=True, truncation=True, max_length=self.info.max_length,
            padding=False, return_attention_mask=False, return_token_type_ids=False,
        )
        return [list(ids) for ids in enc["input_ids"]]

    def encode(
        self,
        texts: Sequence[str],
        *,
        batch_size: int = 128,
        progress: Callable[[int, int], None] | None = None,
    ) -> Encoded:
        """Encode texts (see :class:`Encoded`).

        Identical texts are encoded once; batches are formed from texts sorted by token length (longest first) to
        minimise padding; ``progress(n_done_in_batch, n_unique)`` is called after each batch.
        """
        import torch

        if batch_size < 1:
            raise UsageError(f"--batch-size must be at least 1, got {batch_size}")
        index: dict[str, int] = {}
        inverse = np.fromiter((index.setdefault(t, len(index)) for t in texts), dtype=np.int64, count=len(texts))
        unique = list(index)
        if not unique:
            return Encoded(np.zeros((0, 0), dtype=np.float32), 0)
        ids = self.tokenize(unique)
        lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
        truncated = int(np.count_nonzero(lengths >= self.info.max_length))
        order = np.argsort(-lengths, kind="stable")
        out: np.ndarray | None = None
        device = torch.device(self.info.device)
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                sel = order[start : start + batch_size]
                width = int(lengths[sel[0]])
                input_ids = torch.full((len(sel), width), self._pad_id, dtype=torch.long)
                mask = torch.zeros((len(sel), width), dtype=torch.long)
                for row, j in enumerate(sel):
                    n = int(lengths[j])
                    input_ids[row, :n] = torch.tensor(ids[j], dtype=torch.long)
                    mask[row, :n] = 1
                vecs = self._forward(input_ids.to(device), mask.to(device))
                arr = vecs.detach().to("cpu", torch.float32).numpy()
                if out is None:
                    out = np.empty((len(unique), arr.shape[1]), dtype=np.float32)
                out[sel] = arr
                if progress is not None:
                    progress(len(sel), len(unique))
        assert out is not None
        return Encoded(out[inverse], truncated)

    def _forward(self, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        info = self.info
        if info.kind == "clip":
            if info.pooling == "eos" and info.projection:
                return self.model(input_ids=input_ids, attention_mask=mask).text_embeds.float()
            res = self.model.text_model(input_ids=input_ids, attention_mask=mask)
            if info.pooling == "eos":
                return res.pooler_output.float()
            hidden = res.last_hidden_state
        else:
            hidden = self.model(input_ids=input_ids, attention_mask=mask).last_hidden_state
        return _pool(hidden.float(), mask, info.pooling)


def _pool(hidden: torch.Tensor, mask: torch.Tensor, mode: str) -> torch.Tensor:
    import torch

    m = mask.unsqueeze(-1).to(hidden.dtype)
    if mode == "cls":
        return hidden[:, 0]
    if mode == "eos":
        last = mask.sum(dim=1) - 1
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    if mode == "max":
        return hidden.masked_fill(m == 0, float("-inf")).max(dim=1).values
    summed = (hidden * m).sum(dim=1)
    count = m.sum(dim=1).clamp(min=1.0)
    if mode == "mean":
        return summed / count
    if mode == "mean_sqrt_len":
        return summed / count.sqrt()
    raise UsageError(f"unknown pooling '{mode}'", hint=f"use one of: {', '.join(POOLINGS)}")


_CLIP_TYPES = ("clip", "clip_text_model")
_TOKENIZER_GLOBS = ("tokenizer.json", "vocab.txt", "vocab.json", "*.model", "*.tiktoken")
_WEIGHT_GLOBS = ("*.safetensors", "*.bin", "*.safetensors.index.json", "*.bin.index.json")
_ST_POOL_KEYS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len",
    "pooling_mode_lasttoken": "eos",
    "pooling_mode_weightedmean_tokens": "weightedmean",
}
_ST_POOL_NAMES = {"cls": "cls", "mean": "mean", "max": "max", "mean_sqrt_len_tokens": "mean_sqrt_len",
                  "lasttoken": "eos", "weightedmean": "weightedmean"}


def _read_json(p: Path, what: str) -> Any:
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise InputError(f"{p}:{exc.lineno}: invalid JSON in {what}: {exc.msg}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{p}: cannot read {what}: {exc}") from None


def _st_transformer_dir(d: Path) -> Path | None:
    """The sub-folder holding the transformer in an older sentence-transformers layout (``0_Transformer/``)."""
    modules_file = d / "modules.json"
    if not modules_file.is_file():
        return None
    modules = _read_json(modules_file, "sentence-transformers modules.json")
    for mod in modules if isinstance(modules, list) else []:
        if isinstance(mod, dict) and str(mod.get("type", "")).endswith(".Transformer") and mod.get("path"):
            sub = d / str(mod["path"])
            if (sub / "config.json").is_file():
                return sub
    return None


@dataclass(frozen=True)
class _STLayout:
    """sentence-transformers folder facts."""

    pooling: str | None  # declared pooling, None if none
    source: str  # where the pooling came from
    warnings: list[str]
    max_seq: int | None  # sentence_bert_config.json max_seq_length
    lower: bool  # do_lower_case
    normalize: bool  # modules.json declares a Normalize module


def _st_layout(d: Path) -> _STLayout:
    """What a sentence-transformers folder declares (all defaults for a plain transformers folder)."""
    warnings: list[str] = []
    normalize = False
    pool_dir = d / "1_Pooling"
    modules_file = d / "modules.json"
    if modules_file.is_file():
        modules = _read_json(modules_file, "sentence-transformers modules.json")
        if isinstance(modules, list):
            for mod in modules:
                if not isinstance(mod, dict):
                    continue
                mtype = str(mod.get("type", ""))
                short = mtype.rsplit(".", 1)[-1]
                if short == "Pooling" and mod.get("path"):
                    pool_dir = d / str(mod["path"])
                elif short == "Normalize":
                    normalize = True
                elif short not in ("Transformer", "Pooling"):
                    warnings.append(
                        f"modules.json declares {mtype} ({mod.get('path')}), which mmprep does not apply: the "
                        "vectors are the pooled transformer outputs"
                    )
    pooling: str | None = None
    source = "default"
    cfg_file = pool_dir / "config.json"
    if cfg_file.is_file():
        cfg = _read_json(cfg_file, "pooling config")
        if not isinstance(cfg, dict):
            raise InputError(f"{cfg_file}: expected a JSON object")
        modes: list[str]
        if isinstance(mode := cfg.get("pooling_mode"), str):
            modes = [_ST_POOL_NAMES.get(mode, mode)]
        else:
            modes = [name for key, name in _ST_POOL_KEYS.items() if cfg.get(key)]
        if len(modes) != 1 or modes[0] not in POOLINGS:
            raise InputError(
                f"{cfg_file}: pooling {'+'.join(modes) or 'none'} is not supported",
                hint=f"pass --pooling with one of: {', '.join(POOLINGS)}",
            )
        pooling, source = modes[0], f"{pool_dir.name}/config.json"
    max_seq: int | None = None
    lower = False
    sb = d / "sentence_bert_config.json"
    if sb.is_file():
        sbc = _read_json(sb, "sentence_bert_config.json")
        if isinstance(sbc, dict):
            if isinstance(sbc.get("max_seq_length"), int) and sbc["max_seq_length"] > 0:
                max_seq = sbc["max_seq_length"]
            lower = bool(sbc.get("do_lower_case", False))
    return _STLayout(pooling, source, warnings, max_seq, lower, normalize)


def set_torch_threads(threads: int) -> int:
    """Set torch's intra-op CPU threads for this process (0: leave torch's default); returns the count in use.

    On a machine whose cores are busy with other work, fewer threads (often 1) can be several times faster, because
    torch's worker threads wait for each other at every operation.
    """
    import torch

    if threads < 0:
        raise UsageError(f"--threads must be 0 (torch's default) or more, got {threads}")
    if threads:
        torch.set_num_threads(threads)
    return int(torch.get_num_threads())


def _resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        return "cpu"
    if device == "cuda" or device.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise UsageError("--device cuda: no CUDA device is available to torch",
                             hint="use --device cpu (or auto)")
        return device
    raise UsageError(f"unknown device '{device}'", hint="use auto, cpu or cuda")


def _resolve_dtype(dtype: str, device: str) -> str:
    if dtype == "auto":
        return "float16" if device.startswith("cuda") else "float32"
    if dtype not in ("float32", "float16", "bfloat16"):
        raise UsageError(f"unknown dtype '{dtype}'", hint="use auto, float32, float16 or bfloat16")
    if dtype == "float16" and device == "cpu":
        raise UsageError("--dtype float16 needs a GPU", hint="use --dtype float32 or bfloat16 on CPU")
    return dtype


def load_encoder(
    path: str | Path,
    *,
    pooling: str | None = None,
    device: str = "auto",
    dtype: str = "auto",
    max_length: int | None = None,
    tokenizer: str | Path | None = None,
) -> TagEmbedder:
    """Load a text encoder from a local directory (never from the network).

    Args:
        path: a directory with ``config.json``, weights (``*.safetensors`` / ``*.bin``) and tokenizer files.
        pooling: override the pooling (one of :data:`POOLINGS`); None: CLIP → ``eos`` + projection, others → the
            folder's ``1_Pooling/config.json``, else ``mean``.
        device: ``auto`` (CUDA when available), ``cpu`` or ``cuda``.
        dtype: ``auto`` (float16 on GPU, float32 on CPU), ``float32``, ``float16`` (GPU only) or ``bfloat16``.
        max_length: token limit; default: the smallest of sentence-transformers' ``max_seq_length``, the
            tokenizer's ``model_max_length`` and the model's ``max_position_embeddings``.
        tokenizer: a separate tokenizer directory (default: ``path``).

    Raises:
        InputError: the directory is missing, is not a transformers model, or its weights do not fit its config.
        UsageError: a bad pooling, device or dtype.
    """
    d = Path(path)
    hint = "pass a local directory holding config.json, the weights and the tokenizer files (nothing is downloaded)"
    if not d.exists():
        raise InputError(f"{d}: model directory not found", hint=hint)
    if not d.is_dir():
        raise InputError(f"{d}: is a file, expected a model directory", hint=hint)
    model_dir = d if (d / "config.json").is_file() else (_st_transformer_dir(d) or d)
    cfg_file = model_dir / "config.json"
    if not cfg_file.is_file():
        raise InputError(f"{d}: not a transformers model directory (no config.json)", hint=hint)
    cfg_bytes = cfg_file.read_bytes()
    try:
        cfg_json = json.loads(cfg_bytes)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{cfg_file}: invalid JSON: {exc}") from None
    if not isinstance(cfg_json, dict) or "model_type" not in cfg_json:
        raise InputError(f"{cfg_file}: not a transformers model config (no model_type)", hint=hint)
    if not any(any(model_dir.glob(g)) for g in _WEIGHT_GLOBS):
        raise InputError(f"{model_dir}: no model weights (model.safetensors or pytorch_model.bin)", hint=hint)
    if pooling is not None and pooling not in POOLINGS:
        raise UsageError(f"unknown pooling '{pooling}'", hint=f"use one of: {', '.join(POOLINGS)}")

    try:
        import torch
        import transformers
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise MissingDependencyError(exc.name or "torch", "embed", purpose="embed-labels") from None

    model_type = str(cfg_json["model_type"])
    kind = "clip" if model_type in _CLIP_TYPES else "encoder"
    dev = _resolve_device(device)
    dt = _resolve_dtype(dtype, dev)
    st = _st_layout(d)
    warnings = list(st.warnings)
    if kind == "clip":
        if pooling == "cls":
            raise UsageError("--pooling cls does not apply to CLIP: its first token never sees the text (causal mask)",
                             hint="use eos (the projected CLIP embedding, default), mean or max")
        chosen, source = (pooling, "--pooling") if pooling else ("eos", "clip")
    else:
        chosen, source = (pooling, "--pooling") if pooling else (st.pooling or DEFAULT_POOLING, st.source)

    tok_dir = Path(tokenizer) if tokenizer is not None else model_dir
    if not tok_dir.is_dir():
        raise InputError(f"{tok_dir}: tokenizer directory not found")
    tok_hint = "the directory needs tokenizer files (tokenizer.json, or vocab.json+merges.txt, or vocab.txt, or a " \
        "sentencepiece *.model); pass --tokenizer DIR if they live elsewhere"
    if not any(any(tok_dir.glob(g)) for g in _TOKENIZER_GLOBS):
        custom = custom_code_error(tok_dir, "tokenizer")
        if custom is not None:  # the real reason: its tokenizer is a Python class of its own
            raise custom
        # transformers 5 would silently build an empty tokenizer (special tokens only) from config.json alone.
        raise InputError(f"{tok_dir}: no tokenizer files", hint=tok_hint)
    with quiet_transformers():
        try:
            tok = transformers.AutoTokenizer.from_pretrained(str(tok_dir), local_files_only=True,
                                                             trust_remote_code=False)
        except Exception as exc:  # transformers raises OSError/ValueError/KeyError/... for unusable folders
            custom = custom_code_error(tok_dir, "tokenizer")
            if custom is not None:
                raise custom from None
            raise InputError(f"{tok_dir}: cannot load a tokenizer: {first_line(exc)}", hint=tok_hint) from None
        if len(tok) <= 16:
            raise InputError(f"{tok_dir}: the tokenizer has only {len(tok)} tokens; its files were not understood",
                             hint=tok_hint)
        projection = False
        try:
            if kind == "clip":
                model, projection = _load_clip(model_dir, cfg_json, transformers)
            else:
                model, info = transformers.AutoModel.from_pretrained(
                    str(model_dir), local_files_only=True, output_loading_info=True, trust_remote_code=False
                )
                _check_loading(model_dir, info, ignore_prefixes=("pooler.",))
                if getattr(model.config, "is_encoder_decoder", False) and hasattr(model, "get_encoder"):
                    model = model.get_encoder()
        except InputError:
            raise
        except Exception as exc:
            custom = custom_code_error(model_dir, "model")
            if custom is not None:
                raise custom from None
            raise InputError(f"{model_dir}: cannot load the model: {first_line(exc)}", hint=hint) from None
    torch_dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dt]
    model = model.to(device=dev, dtype=torch_dtype).eval()

    limits = [x for x in (st.max_seq, _int_or_none(getattr(tok, "model_max_length", None)),
                          _int_or_none(getattr(_text_config(model.config), "max_position_embeddings", None)))
              if x is not None and 0 < x < 1_000_000]
    if max_length is not None:
        if max_length < 2:
            raise UsageError(f"--max-length must be at least 2, got {max_length}")
        limit = max_length
    else:
        limit = min(limits) if limits else 512
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    info = EncoderInfo(
        path=str(d), model_type=model_type, kind=kind, pooling=chosen, pooling_source=source,
        projection=projection and chosen == "eos", config_sha256=hashlib.sha256(cfg_bytes).hexdigest(),
        max_length=limit, lowercase=st.lower, device=dev, dtype=dt, declared_normalize=st.normalize,
        warnings=tuple(warnings),
    )
    if kind == "clip" and chosen == "eos" and not projection:
        info = replace(info, warnings=(*info.warnings, f"{d}: the checkpoint has no text_projection; using the "
                                        "unprojected EOS embedding (pooler_output)"))
    return TagEmbedder(model, tok, info, int(pad_id))


def _int_or_none(v: Any) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def _text_config(cfg: Any) -> Any:
    return getattr(cfg, "text_config", None) or cfg




def _check_loading(d: Path, info: dict[str, Any], ignore_prefixes: tuple[str, ...] = ()) -> None:
    missing = sorted(k for k in info.get("missing_keys", ()) if not k.startswith(ignore_prefixes))
    mismatched = sorted(str(k) for k in info.get("mismatched_keys", ()))
    if missing or mismatched:
        bad = missing or mismatched
        raise InputError(
            f"{d}: the weights do not fit config.json: {len(bad)} tensors "
            f"{'missing' if missing else 'with the wrong shape'} ({some(bad, 3, quote=False)})",
            hint="the directory is not a complete checkpoint of this architecture",
        )


def _load_clip(d: Path, cfg_json: dict[str, Any], transformers: Any) -> tuple[Any, bool]:
    """CLIPTextModelWithProjection from a CLIPModel or a CLIP text-tower checkpoint; (model, has projection)."""
    config = transformers.AutoConfig.from_pretrained(str(d), local_files_only=True)
    if cfg_json["model_type"] == "clip":
        text_cfg = config.text_config
        # CLIPConfig keeps the projection size at the top level; the text tower needs it to build text_projection.
        text_cfg.projection_dim = config.projection_dim
    else:
        text_cfg = config
    model, info = transformers.CLIPTextModelWithProjection.from_pretrained(
        str(d), config=text_cfg, local_files_only=True, output_loading_info=True
    )
    missing = set(info.get("missing_keys", ()))
    has_projection = "text_projection.weight" not in missing
    info = dict(info, missing_keys=missing - {"text_projection.weight"})
    _check_loading(d, info)
    return model, has_projection


