"""The packed shard schema, declared up front, and the metadata that tells a reader everything.

Only plain Arrow types are used (no extension types), so pyarrow, pandas, DuckDB, Polars and Hugging Face
``datasets`` read shards as they are. Fields are declared nullable (though never null) because ``datasets``
only honours its ``huggingface`` feature metadata when the fields match its own, nullable, schema exactly.
The padded pixel tensor of a row is one ``fixed_size_binary`` value (see
``docs``/README "Shard format"); small per-row arrays are fixed-size lists.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from mmprep.dataset.format import FORMAT_VERSION, METADATA_KEY

if TYPE_CHECKING:
    from mmprep.labels.vocab import Vocabulary
    from mmprep.pack.columns import ColumnPlan
    from mmprep.pack.config import PackConfig

__all__ = ["build_schema", "read_metadata"]


def build_schema(
    cfg: PackConfig,
    *,
    pad_token_id: int | None = None,
    tokenizer_name: str | None = None,
    vocab: Vocabulary | None = None,
    columns: ColumnPlan | None = None,
) -> Any:
    """The Arrow schema (with ``mmprep`` metadata) for a pack configuration; ``columns``: the target's and the
    carried input columns, after mmprep's own."""
    import numpy as np
    import pyarrow as pa

    limit = cfg.limit_images
    fields: list[Any] = [
        pa.field("id", pa.string()),
        pa.field("line", pa.int64()),
        pa.field("image_count", pa.int32()),
    ]
    meta: dict[str, Any] = {
        "format": "mmprep-shard",
        "format_version": FORMAT_VERSION,
        "layout": "padded" if cfg.pad == "max" else "encoded",
        "limit_images": limit,
        "resize_mode": cfg.image.resize_mode,
        "interpolation": cfg.image.interpolation,
    }
    if cfg.image.resampler != "pillow":  # the Pillow path writes the metadata it always wrote (same bytes)
        from mmprep.images.decode import decoder_info

        meta["decoder"] = decoder_info(cfg.image)
    if cfg.pad == "max":
        shape = [limit, *cfg.slot_shape()]
        fields += [
            pa.field("image_mask", pa.list_(pa.bool_(), limit)),
            pa.field("image_sizes", pa.list_(pa.list_(pa.int32(), 2), limit)),
            pa.field("content_boxes", pa.list_(pa.list_(pa.int32(), 4), limit)),
            pa.field("pixel_values", pa.binary(cfg.pixel_bytes())),
        ]
        meta["pixels"] = {
            "column": "pixel_values",
            "dtype": cfg.norm.dtype,
            "shape": shape,
            "layout": cfg.norm.layout,
            "byte_order": "little" if np.little_endian else "big",
            "normalized": cfg.norm.dtype != "uint8",
            "mean": list(cfg.norm.mean),
            "std": list(cfg.norm.std),
            "scale": "pixel/255" if cfg.norm.dtype != "uint8" else "pixel",
            "padding": "all-zero bytes in the stored dtype (uint8: black; normalised: the mean colour)",
            "letterbox_fill": list(cfg.image.fill) if cfg.image.resize_mode == "letterbox" else None,
            "image_size": list(cfg.image.size) if cfg.image.size else None,
            "image_sizes": "original (width, height) after EXIF orientation; zeros for empty slots",
            "content_boxes": "(x0, y0, x1, y1) of real content in output pixels; zeros for empty slots",
        }
    else:
        image_struct = pa.struct([pa.field("bytes", pa.binary()), pa.field("path", pa.string())])
        fields += [
            pa.field("images", pa.list_(image_struct)),
            pa.field("image_sizes", pa.list_(pa.list_(pa.int32(), 2))),
        ]
        meta["images"] = {
            "column": "images",
            "storage": "Hugging Face Image (struct<bytes, path>)",
            "encoding": cfg.encode_format,
            "image_sizes": "original (width, height) after EXIF orientation",
        }
    if tokenizer_name is not None:
        length = cfg.text.max_length
        fields += [
            pa.field("input_ids", pa.list_(pa.int32(), length)),
            pa.field("attention_mask", pa.list_(pa.int8(), length)),
            pa.field("n_tokens", pa.int32()),
            pa.field("truncated", pa.bool_()),
        ]
        meta["text"] = {
            "tokenizer": tokenizer_name,
            "pad_token_id": pad_token_id,
            "max_length": length,
            "padding_side": cfg.text.padding_side,
            "truncation_side": cfg.text.truncation_side,
            "add_special_tokens": cfg.text.add_special_tokens,
            "caption": cfg.text.caption,
        }
    if vocab is not None:
        fields.append(pa.field("tag_ids", pa.list_(pa.int32())))
        meta["vocab"] = {"sha256": vocab.sha256, "size": vocab.size, "file": _basename(vocab.path)}
    else:
        fields.append(pa.field("tags", pa.list_(pa.string())))
    fields += [
        pa.field("text", pa.string()),
        pa.field("image_paths", pa.list_(pa.string())),
    ]
    # -- trainer-ready output (issue 16): the target's columns and the carried input columns ----------------------
    given: dict[str, Any] = {}
    if columns is not None:
        fields += columns.fields()
        given = columns.features()
        meta["columns"] = {"target": columns.target, "carried": [c.name for c in columns.carried]}
    # ------------------------------------------------------------------------------------------------------------
    metadata = {METADATA_KEY: json.dumps(meta, sort_keys=True)}
    if cfg.pad == "none":
        features = _hf_features(fields, given)
        if features is not None:
            metadata["huggingface"] = json.dumps(features, sort_keys=True)
    return pa.schema(fields, metadata=metadata)


def _basename(path: str) -> str:
    import os

    return os.path.basename(path)


def _hf_features(fields: list[Any], given: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """``datasets`` feature metadata so ``load_dataset("parquet")`` decodes ``images`` as a list of Images, and
    columns the input declared (an ``Image`` column) keep their feature (``given``).

    Uses ``Sequence`` (not ``List``), which datasets 2.x, 3.x and 4+ all read, and a list literal ``[{...}]`` for
    a list of objects (``Sequence`` of an object would turn it into an object of lists). None when a column has a
    type ``datasets`` cannot name (then ``datasets`` infers every feature itself, and images read as
    ``{bytes, path}`` objects).
    """
    out: dict[str, Any] = {}
    for f in fields:
        if f.name == "images":
            out[f.name] = {"_type": "Sequence", "feature": {"_type": "Image"}}
        elif given and f.name in given:
            out[f.name] = _portable(given[f.name])
        else:
            feature = _hf_feature(f.type)
            if feature is None:
                return None
            out[f.name] = feature
    return {"info": {"features": out}}


def _portable(feature: Any) -> Any:
    """An input's feature JSON as every ``datasets`` version reads it: ``List`` (datasets >= 4; 3.x cannot read it)
    becomes ``Sequence``, or a list literal ``[...]`` for a list of objects (``Sequence`` of an object would be an
    object of lists)."""
    if isinstance(feature, list):
        return [_portable(f) for f in feature]
    if not isinstance(feature, dict):
        return feature
    if feature.get("_type") == "List":
        inner = _portable(feature.get("feature"))
        if isinstance(inner, dict) and "_type" not in inner and "length" not in feature:
            return [inner]
        out = {"_type": "Sequence", "feature": inner}
        if feature.get("length", -1) != -1:
            out["length"] = feature["length"]
        return out
    return {k: _portable(v) if k != "_type" else v for k, v in feature.items()}


def _hf_feature(t: Any) -> Any:
    """The ``datasets`` feature (as JSON) of an Arrow type, None when it has none."""
    import pyarrow as pa

    if pa.types.is_struct(t):
        parts = {t.field(i).name: _hf_feature(t.field(i).type) for i in range(t.num_fields)}
        return None if any(v is None for v in parts.values()) else parts
    if pa.types.is_fixed_size_list(t):
        inner = _hf_feature(t.value_type)
        return None if inner is None else {"_type": "Sequence", "feature": inner, "length": t.list_size}
    if pa.types.is_list(t):
        inner = _hf_feature(t.value_type)
        if inner is None:
            return None
        return [inner] if isinstance(inner, dict) and "_type" not in inner else {"_type": "Sequence", "feature": inner}
    dtype = _hf_dtype(t)
    return None if dtype is None else {"_type": "Value", "dtype": dtype}


def _hf_dtype(t: Any) -> str | None:
    """The ``datasets`` name of a plain Arrow type (as ``datasets`` names it), None for one it cannot hold."""
    import pyarrow as pa

    if pa.types.is_dictionary(t):
        return _hf_dtype(t.value_type)
    if pa.types.is_string(t):
        return "string"
    if pa.types.is_large_string(t):
        return "large_string"
    if pa.types.is_boolean(t):
        return "bool"
    if pa.types.is_binary(t):
        return "binary"
    if pa.types.is_large_binary(t):
        return "large_binary"
    if pa.types.is_null(t):
        return "null"
    if pa.types.is_integer(t):
        return str(t)  # int8 ... uint64
    if pa.types.is_floating(t):
        return {16: "float16", 32: "float32", 64: "float64"}[t.bit_width]
    if pa.types.is_timestamp(t):
        return f"timestamp[{t.unit}" + (f", tz={t.tz}]" if t.tz else "]")
    if pa.types.is_date32(t) or pa.types.is_date64(t) or pa.types.is_time(t):
        return str(t)
    if pa.types.is_duration(t):
        return f"duration[{t.unit}]"
    if pa.types.is_decimal(t):
        return f"decimal{t.bit_width}({t.precision}, {t.scale})"
    return None


def read_metadata(schema: Any) -> dict[str, Any]:
    """The ``mmprep`` metadata of a shard schema (raises KeyError when absent)."""
    raw = (schema.metadata or {})[METADATA_KEY.encode()]
    return json.loads(raw)
