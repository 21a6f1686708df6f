"""Tag (label) embedding matrices: one row per tag id, computed with a local transformers text encoder.

Recognize-Anything (RAM) freezes a ``[4585, 512]`` CLIP text-embedding matrix with one row per tag id, and RAM++ a
``[4585 x 51, 512]`` one (51 descriptions per tag). This module regenerates such matrices for any vocabulary:

* **Encoders.** Any transformers text encoder from a local directory (nothing is downloaded). CLIP checkpoints
  (``model_type`` ``clip`` or ``clip_text_model``) give their *projected* text embedding, the same vector as
  ``CLIPModel.get_text_features`` / ``CLIPTextModelWithProjection.text_embeds``: the final hidden state at the EOS
  token, multiplied by ``text_projection``. Other encoders (BERT, sentence-transformers, ...) use the pooling their
  folder declares in ``1_Pooling/config.json`` (sentence-transformers layout), else mean pooling over the attention
  mask (the documented default); ``pooling=`` overrides.
* **Text.** Tag names are cleaned (see :func:`clean_tag`) and put into prompt templates (see :func:`tag_texts`):
  none (the bare tag), one, several (a file) or the built-in ``ram`` ensemble (:data:`RAM_TEMPLATES`), which
  renders exactly the texts of RAM's open-set builder. With more than one template each
  template's embedding is L2-normalised, the template embeddings are averaged and the mean is re-normalised (RAM's
  open-set builder). Description sets (RAM++ ``{tag: [descriptions]}``) give ``K`` rows per tag instead.
* **Order.** Row ``i`` (or rows ``i*K .. i*K+K-1``) always belongs to tag id ``i``. Texts are deduplicated and
  encoded in batches sorted by token length; results are scattered back to their original positions.
* **Reuse.** Rows of an older matrix can be kept for tags present in both vocabularies (matched by
  :func:`mmprep.labels.vocab.normalize_tag`); only new tags are computed. A sample of kept tags is recomputed first and
  the reuse is refused when the cosine to the old rows is below a threshold (another model or template set).
* **Files.** ``.pth``/``.pt`` (a float32 tensor that ``torch.load`` returns), ``.npy`` and ``.safetensors`` (one
  tensor named ``embedding``), written atomically, plus a sidecar JSON ``<out>.json`` describing how the matrix was
  made.

torch, transformers and safetensors are imported inside the functions that need them.

The modules, top down: :mod:`.job` (``embed_labels``) uses :mod:`.templates` (cleaning, templates, descriptions),
:mod:`.plan` (texts -> rows), :mod:`.encoder` (``TagEmbedder``, ``load_encoder``), :mod:`.reuse` (keeping an old
matrix's rows) and :mod:`.files` (the matrix and its sidecar on disk).
"""

from mmprep.labels.embed.encoder import POOLINGS, Encoded, EncoderInfo, TagEmbedder, load_encoder, set_torch_threads
from mmprep.labels.embed.files import OUTPUT_SUFFIXES, SavedEmbeddings, load_embeddings, save_embeddings, sidecar_path
from mmprep.labels.embed.job import EmbedResult, ProgressHook, embed_labels
from mmprep.labels.embed.reuse import ReuseReport, VerifyReport
from mmprep.labels.embed.templates import (
    BUILTIN_TEMPLATES,
    CLEAN_MODES,
    RAM_TEMPLATES,
    VocabDescriptions,
    clean_tag,
    descriptions_for_vocab,
    load_descriptions,
    load_templates,
    render_template,
    tag_texts,
)

__all__ = [
    "BUILTIN_TEMPLATES",
    "CLEAN_MODES",
    "OUTPUT_SUFFIXES",
    "POOLINGS",
    "RAM_TEMPLATES",
    "EmbedResult",
    "Encoded",
    "EncoderInfo",
    "ProgressHook",
    "ReuseReport",
    "SavedEmbeddings",
    "TagEmbedder",
    "VerifyReport",
    "VocabDescriptions",
    "clean_tag",
    "descriptions_for_vocab",
    "embed_labels",
    "load_descriptions",
    "load_embeddings",
    "load_encoder",
    "load_templates",
    "render_template",
    "save_embeddings",
    "set_torch_threads",
    "sidecar_path",
    "tag_texts",
]
