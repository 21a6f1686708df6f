"""``mmprep audit-labels``: audit a tag vocabulary against its annotations and aligned files."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from mmprep.cli._app import JsonOpt, QuietOpt, VerboseOpt, app, make_output, run_command
from mmprep.cli._options import choices
from mmprep.errors import EXIT_FAILED, EXIT_OK, UsageError

if TYPE_CHECKING:
    from mmprep.labels.audit import AuditReport, EmbeddingReport
    from mmprep.output import Output

__all__ = ["audit_labels_cmd"]

_FAIL_ON_HELP = "Exit 1 when these findings exist (comma-separated or repeated): never-used, unknown, duplicates, " \
    "misaligned, invalid, hygiene, any."


@app.command("audit-labels")
def audit_labels_cmd(
    vocab: Annotated[
        str, typer.Option("--vocab", metavar="FILE", help="The tag vocabulary: one tag per line, a JSON list, or CSV.")
    ],
    annotations: Annotated[
        list[str] | None,
        typer.Argument(
            help="Annotation files: RAM training JSON, JSON/JSONL/CSV/Parquet manifests with a tags column, or RAM "
            "benchmark text (image,tag,tag / image,id id id); '-' reads standard input.",
            show_default=False,
        ),
    ] = None,
    format: Annotated[
        str | None,
        typer.Option(
            "--format",
            help="Annotation format instead of detecting it.",
            **choices("ram-json", "json", "jsonl", "csv", "parquet", "ram-text", "ram-text-ids", "ram-text-names"),
        ),
    ] = None,
    tags_column: Annotated[
        str | None,
        typer.Option("--tags-column", metavar="COL", help="Manifest column with tag names or ids (default: tags, "
                     "labels, union_label_id or tag_ids)."),
    ] = None,
    aligned: Annotated[
        list[str] | None,
        typer.Option(
            "--aligned",
            metavar="[KIND=]FILE",
            help="A file with one entry per tag id (translations, thresholds, descriptions JSON); repeatable. "
            "KIND= forces the kind.",
        ),
    ] = None,
    embeddings: Annotated[
        list[str] | None,
        typer.Option(
            "--embeddings",
            metavar="[label=]FILE[#KEY]",
            help="An embedding matrix (.pt/.pth, .npy/.npz, .safetensors) whose rows must be the vocabulary size "
            "(or size x K for description sets); label=FILE requires exactly one row per tag; repeatable.",
        ),
    ] = None,
    declared_size: Annotated[
        int | None,
        typer.Option("--declared-size", metavar="N", min=0, help="The size the model expects (e.g. class_num)."),
    ] = None,
    embedding_dim: Annotated[
        str | None,
        typer.Option("--embedding-dim", metavar="N|FILE", help="The width the model expects of --embeddings "
                     "matrices (RAM: 512), or an embedding file whose width the new matrix must keep (the file it "
                     "replaces); another width is misaligned."),
    ] = None,
    fail_on: Annotated[list[str] | None, typer.Option("--fail-on", metavar="LIST", help=_FAIL_ON_HELP)] = None,
    write_used: Annotated[
        str | None,
        typer.Option("--write-used", metavar="FILE", help="Write the used tags as id<TAB>name<TAB>count lines."),
    ] = None,
    write_never_used: Annotated[
        str | None,
        typer.Option("--write-never-used", metavar="FILE", help="Write the never-used tags as id<TAB>name lines."),
    ] = None,
    plot: Annotated[
        str | None,
        typer.Option("--plot", metavar="FILE.png", help="Draw the tag frequency long tail (needs matplotlib); the "
                     "extension picks the format (png, pdf, svg, ...)."),
    ] = None,
    top: Annotated[
        int,
        typer.Option("--top", min=1, help="Rows shown per table, and most/least used tags listed in --json (which "
                     "has every tag's count in frequency.counts_by_id)."),
    ] = 10,
    json_: JsonOpt = False,
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Audit a tag vocabulary against annotations and aligned files (translations, thresholds, embeddings)."""
    out = make_output(json_, quiet, verbose)

    def body() -> int:
        from mmprep.labels.audit import (
            ANNOTATION_FORMATS,
            FAIL_ON_CATEGORIES,
            audit_labels,
            embedding_width,
            plot_format,
            plot_frequency,
            write_tag_list,
        )

        if format is not None and format not in ANNOTATION_FORMATS:
            raise UsageError(f"unknown --format '{format}'", hint="choose one of " + ", ".join(ANNOTATION_FORMATS))
        categories = _parse_fail_on(fail_on or [], FAIL_ON_CATEGORIES)
        files = list(annotations or [])
        if not files and (write_used or write_never_used or plot):
            raise UsageError("--write-used, --write-never-used and --plot need annotation files")
        if plot:
            plot_format(plot)  # a bad extension or a missing matplotlib fails now, not after the audit
        width: int | None = None
        if embedding_dim is not None:
            if not embeddings:
                raise UsageError("--embedding-dim needs --embeddings: the matrices whose width it checks")
            width = _positive_int(embedding_dim)
            if width is None:
                width = embedding_width(embedding_dim)
                out.debug(f"--embedding-dim {embedding_dim}: width {width}")
        total = sum(_size(f) for f in files)
        with out.progress(total or None, "audit-labels", unit="B") as prog:
            report = audit_labels(
                vocab, files, fmt=format, tags_column=tags_column, aligned=aligned or [],
                embeddings=embeddings or [], declared_size=declared_size, embedding_dim=width, top=top,
                progress=prog.update,
            )
        if write_used:
            n = write_tag_list(write_used, report.used, counts=True)
            out.debug(f"wrote {n} used tags to {write_used}")
        if write_never_used:
            n = write_tag_list(write_never_used, report.never_used or [])
            out.debug(f"wrote {n} never-used tags to {write_never_used}")
        if plot:
            plot_frequency(report, plot)
            out.debug(f"wrote the frequency plot to {plot}")
        failed = report.failing(categories)
        if out.json_mode:
            payload = report.to_dict()
            payload["fail_on"] = categories
            payload["failed"] = failed
            out.emit_json(payload)
        else:
            _render(out, report, top)
        if not files and {"never-used", "unknown"} & set(categories):
            out.warn("--fail-on never-used/unknown has nothing to check without annotation files")
        if failed:
            found = report.findings
            out.error("failing on: " + ", ".join(f"{c} ({found[c]:,})" for c in failed))
            return EXIT_FAILED
        return EXIT_OK

    run_command(out, body)


def _size(path: str) -> int:
    try:
        return os.path.getsize(path) if path != "-" else 0
    except OSError:
        return 0


def _positive_int(value: str) -> int | None:
    """``value`` as a positive width, None when it is not a number (then it names a file); UsageError for 0 or a
    negative number."""
    text = value.strip()
    if not text.lstrip("+-").isdigit() or os.path.exists(value):
        return None
    width = int(text)
    if width < 1:
        raise UsageError(f"--embedding-dim must be a positive width, got {value}")
    return width


def _parse_fail_on(values: list[str], known: tuple[str, ...]) -> list[str]:
    out: list[str] = []
    for value in values:
        for part in value.split(","):
            name = part.strip().lower().replace("_", "-")
            if not name:
                continue
            if name not in (*known, "any"):
                raise UsageError(f"unknown --fail-on category '{part.strip()}'",
                                 hint="choose from " + ", ".join((*known, "any")))
            if name not in out:
                out.append(name)
    return out


def _more(shown: int, total: int, how: str) -> str | None:
    return f"{total - shown:,} more ({how})" if total > shown else None


def _at(loc: Any) -> str:
    """``file:line`` with the file's base name (tables are narrow; --json has the full path)."""
    return f"{Path(loc.file).name}:{loc.line}"


def _yes_no(value: bool | None) -> str:
    return "-" if value is None else ("yes" if value else "no")


def _embedding_status(e: EmbeddingReport) -> str:
    if not e.rows_ok:
        return "MISALIGNED"
    if not e.width_ok:
        return f"WIDTH {e.dim} ≠ {e.expected_dim}"
    return "ok" if e.k == 1 else f"{e.k} per tag"


def _render(out: Output, r: AuditReport, top: int) -> None:
    v = r.vocab
    rows: list[tuple[str, Any]] = [
        ("file", v.path),
        ("format", v.format),
        ("entries", v.entries),
        ("declared size (largest id + 1)", v.size),
    ]
    if r.declared_size_given is not None:
        status = "matches" if r.declared_size_given == v.entries else "MISMATCH"
        rows.append(("--declared-size", f"{r.declared_size_given:,} ({status})"))
    nl = _yes_no(v.final_newline)
    if v.final_newline is False and v.format == "txt":
        nl = f"no (wc -l says {max(v.entries - 1, 0):,})"
    rows += [
        ("final newline", nl),
        ("UTF-8 BOM", _yes_no(v.has_bom)),
        ("CRLF lines", f"{v.crlf_lines:,} (first: line {v.first_crlf_line})" if v.crlf_lines else 0),
        ("empty entries", len(v.empty_ids)),
        ("entries with surrounding whitespace", len(v.whitespace_ids)),
        ("duplicate groups (exact / normalised only)",
         f"{len(v.duplicates):,} ({sum(g.exact for g in v.duplicates):,} / "
         f"{sum(not g.exact for g in v.duplicates):,})"),
        ("sha256 (id<TAB>name lines)", v.sha256[:16] + "…"),
    ]
    out.table("Vocabulary", ["", "value"], rows)
    if v.duplicates:
        out.table(
            "Vocabulary duplicates",
            ["normalised name", "ids", "entries as written", "kind"],
            [(g.key, ", ".join(map(str, g.ids)), " | ".join(repr(e) for e in g.entries),
              "exact" if g.exact else "normalised") for g in v.duplicates[:top]],
            caption=_more(min(top, len(v.duplicates)), len(v.duplicates), "--json lists all"),
        )
    if v.empty_ids or v.whitespace_ids:
        entries = [(i, "empty") for i in v.empty_ids[:top]] + [(i, "surrounding whitespace")
                                                               for i in v.whitespace_ids[:top]]
        out.table("Vocabulary entries to clean", ["id", "line", "issue"],
                  [(str(i), str(i + v.first_line) if v.format != "json" else "-", issue) for i, issue in entries])

    if r.annotations:
        out.table("Annotation files", ["file", "format", "samples", "tag refs", "malformed"],
                  [(a.path, a.format, a.samples, a.tag_refs, a.problems) for a in r.annotations])
        summary: list[tuple[str, Any]] = [
            ("declared size", r.declared_size),
            ("distinct tags used", r.distinct_used),
            ("never-used tags", len(r.never_used or ())),
            ("unknown names (distinct)", sum(u.kind == "name" for u in r.unknown)),
            ("out-of-range ids (distinct)", sum(u.kind == "id" for u in r.unknown)),
            ("unknown occurrences", r.unknown_occurrences),
            *([("  of those, in distinct values not listed", r.unknown_untracked)] if r.unknown_truncated else []),
            ("names matched only after normalisation", len(r.normalised_matches)),
        ]
        if r.parse_only_ids:
            summary.append(("ids only in parse_label_id", len(r.parse_only_ids)))
        out.table("Usage", ["", "value"], summary)
        never = r.never_used or []
        if never:
            out.table("Never-used tags", ["id", "name"], [(str(t.id), t.name) for t in never[:top]],
                      caption=_more(min(top, len(never)), len(never), "--write-never-used FILE writes all"))
        if r.unknown:
            out.table("Unknown tags", ["kind", "value", "count", "first seen"],
                      [(u.kind, u.value if u.kind == "name" else str(u.value), u.count, _at(u.first))
                       for u in r.unknown[:top]],
                      caption=_more(min(top, len(r.unknown)), len(r.unknown), "--json lists all"))
        if r.normalised_matches:
            out.table("Names matched only after normalisation", ["name as written", "count", "first seen"],
                      [(u.value, u.count, _at(u.first)) for u in r.normalised_matches[:top]],
                      caption=_more(min(top, len(r.normalised_matches)), len(r.normalised_matches), "--json"))
        if r.problems:
            out.table("Malformed records", ["reason", "count", "first seen", "detail"],
                      [(p.code, p.count, _at(p.first), p.detail) for p in r.problems])

    if r.aligned:
        out.table(
            "Aligned files",
            ["file", "kind", "entries", "status", "duplicates", "trailing ws", "invalid"],
            [(Path(a.path).name, a.kind, f"{a.entries:,} / {a.expected:,}", "ok" if a.aligned else "MISALIGNED",
              len(a.duplicates), len(a.whitespace_lines), len(a.invalid) + len(a.name_mismatches))
             for a in r.aligned],
            caption="entries / expected (the vocabulary size)",
        )
        details: list[tuple[Any, ...]] = []
        for a in r.aligned:
            name = Path(a.path).name
            details += [(name, str(line), repr(entry), why) for line, entry, why in a.invalid[:top]]
            details += [(name, f"#{k}", repr(got), f"vocabulary says {want!r}") for k, got, want in
                        a.name_mismatches[:top]]
            details += [(name, ", ".join(str(i + 1) for i in g.ids), " | ".join(repr(e) for e in g.entries),
                         "duplicate") for g in a.duplicates[:top]]
        if details:
            out.table("Aligned-file findings (first of each kind per file)", ["file", "line", "entry", "issue"],
                      details)
    if r.embeddings:
        out.table(
            "Embeddings",
            ["file", "tensor", "shape", "dtype", "rows", "expected", "K", "status"],
            [(Path(e.path).name, e.key or "-", "×".join(map(str, e.shape)), e.dtype, e.rows, e.expected, e.k or "-",
              _embedding_status(e)) for e in r.embeddings],
            caption="K > 1: a description set (K rows per tag); label=FILE requires K = 1"
            + (f"; --embedding-dim {r.embeddings[0].expected_dim}" if r.embeddings[0].expected_dim else ""),
        )
    f = r.frequency
    if f is not None:
        tps = f.tags_per_sample
        out.table("Frequency", ["", "value"], [
            ("samples", f.samples),
            ("samples without tags", f.samples_without_tags),
            ("tags per sample (min / mean / median / p90 / max)",
             " / ".join("-" if tps[k] is None else f"{tps[k]:g}" for k in ("min", "mean", "median", "p90", "max"))),
            ("tag occurrences", f.occurrences),
            ("tags covering 50% / 90% / 99% of occurrences",
             " / ".join(f"{f.coverage[k]:,}" for k in ("50%", "90%", "99%"))),
            ("tags used exactly once", f.used_once),
        ])
        if f.most_used:
            out.table("Most used", ["id", "name", "count"],
                      [(str(t.id), t.name, t.count) for t in f.most_used[:top]])
            out.table("Least used (of the used)", ["id", "name", "count"],
                      [(str(t.id), t.name, t.count) for t in f.least_used[:top]])
    found = r.findings
    listed = ", ".join(f"{k} {n:,}" for k, n in found.items() if n)
    out.info(f"findings: {listed}" if listed else "findings: none")
