"""The dataset card (``README.md``) of a packed folder, generated from its index.

Its YAML header is what ``datasets.load_dataset(OUT)`` reads to find the splits (``configs`` / ``data_files``, as
the Hub writes them); the body tells a person what the folder holds and how to load it. The card is rewritten from
``index.json`` by every run, so it always lists exactly the splits the index lists.

The image features are not repeated in the card: every shard declares them in its own ``huggingface`` Parquet
metadata (``--pad none``: ``images`` is a ``Sequence(Image)``), which ``datasets`` reads for each file, so the
card and the files cannot disagree.
"""

from __future__ import annotations

from mmprep.dataset.format import DATA_DIR, FORMAT_VERSION, INDEX_NAME, IndexFile

__all__ = ["dataset_card"]


def dataset_card(index: IndexFile) -> bytes:
    """The ``README.md`` of a packed folder holding the splits of ``index``."""
    names = sorted(index.splits)
    lines = ["---", "configs:", "- config_name: default", "  data_files:"]
    for name in names:
        lines += [f"  - split: {name}", f'    path: "{DATA_DIR}/{name}-*"']
    lines += ["---", "", "# Packed dataset", "",
              f"Written by `mmprep pack` (format version {FORMAT_VERSION}). The shards are the Parquet files in "
              f"`{DATA_DIR}/` (nothing else is ever written there); `{INDEX_NAME}` lists every shard with its rows, "
              "size and sha256, and accounts for every input row (written + rejected = read).", "",
              "| split | rows | shards | bytes | rows read | rejected | layout |",
              "|---|---:|---:|---:|---:|---:|---|"]
    for name in names:
        ix = index.splits[name]
        layout = (ix.metadata or {}).get("layout", "-")
        lines.append(f"| {name} | {ix.totals.written} | {len(ix.shards)} | {ix.totals.bytes} | {ix.totals.read} "
                     f"| {ix.totals.rejected} ([`{ix.rejects}`]({ix.rejects})) | {layout} |")
    first = names[0] if names else "train"
    lines += ["", "## Loading", "", "```python", "from datasets import load_dataset", "",
              'ds = load_dataset("path/to/this/folder")  # every split, from this card',
              f'ds = load_dataset("parquet", data_dir="path/to/this/folder/{DATA_DIR}", split="{first}")',
              "```", "",
              "`pyarrow.parquet.read_table`, `pandas.read_parquet`, Polars, DuckDB and Ray Data read "
              f"`{DATA_DIR}/` (one split: `{DATA_DIR}/{first}-*.parquet`) as it is; `mmprep inspect` and "
              "`mmprep verify` check it against the index.", ""]
    for name in names:
        meta = index.splits[name].metadata or {}
        cols = meta.get("columns") or {}
        if cols.get("target") not in (None, "hf") or cols.get("carried"):
            carried = ", ".join(f"`{c}`" for c in cols.get("carried", [])) or "none"
            lines.append(f"Split `{name}`: target `{cols.get('target', 'hf')}`; columns carried from the input: "
                         f"{carried}.")
    return ("\n".join(lines).rstrip("\n") + "\n").encode()
