"""``mmprep embed-labels``: a tag-embedding matrix (one row per tag id) from a local transformers text encoder."""

from __future__ import annotations

from contextlib import ExitStack
from typing import Annotated, Any

import typer

from mmprep.cli._app import JsonOpt, QuietOpt, VerboseOpt, app, make_output, run_command
from mmprep.cli._options import choices
from mmprep.errors import UsageError
from mmprep.output import Output, Progress

__all__ = ["embed_labels_cmd"]


class _Bars:
    """One progress bar per stage ("verify", "embed"), opened on the first report."""

    def __init__(self, out: Output, stack: ExitStack) -> None:
        self._out = out
        self._stack = stack
        self._bars: dict[str, Progress] = {}

    def __call__(self, stage: str, n: int, total: int) -> None:
        bar = self._bars.get(stage)
        if bar is None:
            desc = "verifying reused rows" if stage == "verify" else "embedding"
            bar = self._bars[stage] = self._stack.enter_context(self._out.progress(total, desc, unit="text"))
        bar.update(n)


@app.command("embed-labels")
def embed_labels_cmd(
    vocab: Annotated[str, typer.Argument(help="Tag vocabulary (txt: one tag per line = id; .json; .csv).")],
    model: Annotated[str, typer.Option("--model", "-m", help="Local transformers model directory (CLIP, BERT, "
                                       "sentence-transformers, ...). Nothing is downloaded.")],
    out: Annotated[str, typer.Option("--out", "-o", help="Output matrix: .pth/.pt, .npy or .safetensors "
                                          "(a sidecar <out>.json is written next to it).")],
    template: Annotated[list[str] | None, typer.Option(
        "--template", "-t", help='Prompt template with {} for the tag (and optional {article}), e.g. "a photo of '
        'a {}." Repeat for an ensemble.')] = None,
    templates: Annotated[str | None, typer.Option(
        "--templates", help="A file of templates (one per line) or a built-in set: none, photo, ram (RAM's 63-"
        "template open-set ensemble, rendered exactly as RAM does).")] = None,
    descriptions: Annotated[str | None, typer.Option(
        "--descriptions", help="Description-set JSON (RAM++: a list of one-key objects tag -> list of K "
        "descriptions, or one object): K rows per tag, N*K rows in all.")] = None,
    reduce: Annotated[str, typer.Option(
        "--reduce", help="With --descriptions: none (N*K rows) or mean (average the K, N rows).",
        **choices("none", "mean"))] = "none",
    clean: Annotated[str | None, typer.Option(
        "--clean", help="Tag cleaning: default (_ -> space, whitespace collapsed), ram (RAM's processed_name: _ -> "
        "space, / -> ' or ', lower-case, trailing . removed), none. Default: ram with --templates ram (RAM's exact "
        "texts), else default.", **choices("default", "ram", "none"))] = None,
    pooling: Annotated[str | None, typer.Option(
        "--pooling", help="Override pooling: eos, mean, cls, max, mean_sqrt_len. Default: CLIP -> eos + "
        "text_projection; others -> 1_Pooling/config.json, else mean.",
        **choices("eos", "mean", "cls", "max", "mean_sqrt_len"))] = None,
    no_normalize: Annotated[bool, typer.Option("--no-normalize", help="Do not L2-normalise the rows.")] = False,
    reuse: Annotated[str | None, typer.Option(
        "--reuse", help="Old matrix: keep its rows for tags also in --old-vocab, compute only new tags.")] = None,
    old_vocab: Annotated[str | None, typer.Option("--old-vocab", help="The vocabulary --reuse was made for.")] = None,
    verify_sample: Annotated[int, typer.Option(
        "--verify-sample", help="Reused tags recomputed to check the old matrix matches this model.")] = 32,
    verify_all: Annotated[bool, typer.Option("--verify-all", help="Recompute every reused tag for the check.")] = False,
    min_cosine: Annotated[float, typer.Option(
        "--min-cosine", help="Refuse reuse (exit 1) when a recomputed row's cosine to its old row is lower.")] = 0.99,
    device: Annotated[str, typer.Option("--device", help="Where the model runs.", **choices("auto", "cpu", "cuda"))
                      ] = "auto",
    dtype: Annotated[str, typer.Option(
        "--dtype", help="Compute dtype: auto (float16 on GPU, float32 on CPU), float32, float16, bfloat16. "
        "Output is float32.", **choices("auto", "float32", "float16", "bfloat16"))] = "auto",
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", help="Texts per forward pass.")] = 128,
    threads: Annotated[int, typer.Option(
        "--threads", help="CPU threads for torch (0: torch's default). On a busy machine 1 can be much faster.")] = 0,
    max_length: Annotated[int | None, typer.Option(
        "--max-length", help="Token limit (default: the model's).")] = None,
    tokenizer: Annotated[str | None, typer.Option(
        "--tokenizer", help="Tokenizer directory, if not inside --model.")] = None,
    json_: JsonOpt = False,
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Embed every tag of a vocabulary with a local text encoder (row i = tag i); optionally reuse an old matrix."""
    output = make_output(json_, quiet, verbose)

    def body() -> int:
        from mmprep.labels.embed import load_templates, set_torch_threads

        if template and templates:
            raise UsageError("--template and --templates exclude each other",
                             hint="repeat --template, or put all templates in the --templates file")
        source: str | None = None
        tmpl: tuple[str, ...] | None = None
        if templates:
            tmpl, source = load_templates(templates), templates
        elif template:
            tmpl, source = tuple(template), "--template"
        if threads:
            set_torch_threads(threads)
        with ExitStack() as stack:
            from mmprep.labels.embed import embed_labels

            result = embed_labels(
                vocab, model, out, templates=tmpl, template_source=source, descriptions=descriptions,
                reduce=reduce, clean=clean, normalize=not no_normalize, pooling=pooling, device=device, dtype=dtype,
                batch_size=batch_size, max_length=max_length, tokenizer=tokenizer, reuse=reuse, old_vocab=old_vocab,
                verify_sample=verify_sample, verify_all=verify_all, min_cosine=min_cosine,
                progress=_Bars(output, stack),
            )
        for w in result.warnings:
            output.warn(w)
        if output.json_mode:
            output.emit_json(result)
            return 0
        _render(output, result)
        return 0

    run_command(output, body)


def _render(out: Output, result: Any) -> None:
    enc = result.encoder
    rows, dim = result.shape
    per = f"{result.n_tags} tags x {result.rows_per_tag} rows" if result.rows_per_tag > 1 else f"{result.n_tags} tags"
    out.info(f"wrote {result.out}: [{rows}, {dim}] float32 ({per})")
    speed = ""
    if result.tags_per_s:
        rate = result.tags_per_s
        speed = f" ({rate:,.1f} tags/s" if rate < 100 else f" ({rate:,.0f} tags/s"
        speed += f", {result.unique_texts / result.encode_seconds:,.0f} texts/s)"
    out.info(f"encoded {result.encoded_tags} tags ({result.unique_texts} distinct texts) in "
             f"{result.encode_seconds:.1f} s{speed}; model loaded in {result.load_seconds:.1f} s")
    proj = " + text_projection" if enc.projection else ""
    out.info(f"model {enc.path} ({enc.model_type}): {enc.pooling} pooling{proj} [{enc.pooling_source}], "
             f"{enc.device} {enc.dtype}")
    out.info(f"sidecar {result.sidecar}")
    r = result.reuse
    if r is not None:
        v = r.verify
        out.table(
            "reuse",
            ["", "tags"],
            [["kept (old rows)", r.kept], ["new (computed)", r.new], ["dropped (old only)", r.dropped]],
            caption=(f"checked {v.checked_tags} kept tags: min cosine {v.min_cosine:.4f}, mean {v.mean_cosine:.4f} "
                     f"(threshold {v.threshold})") if v.checked_tags else "no kept tags checked",
        )
        if r.new_tags:
            out.debug("new: " + ", ".join(r.new_tags))
        if r.dropped_tags:
            out.debug("dropped: " + ", ".join(r.dropped_tags))
