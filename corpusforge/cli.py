"""The `corpusforge` command line: a thin shell over the library (typer + rich)."""

from __future__ import annotations

import json
import logging
import sys
import traceback
from pathlib import Path
from typing import Optional

import typer
from rich.logging import RichHandler
from rich.table import Table

from corpusforge.graph import STAGES as STAGE_NAMES
from corpusforge.progress import console

# Expected faults that reach the top of a command: (module, exception class, exit code), first
# match wins (SnapshotExistsError is also an OSError, so the snapshot rows come first). Classes are
# looked up in sys.modules: an exception of a module never imported cannot occur, and classifying
# an error must not import botocore or the pipeline. The README's exit-code table lists the codes.
_FAULTS: tuple[tuple[str, str, int], ...] = (
    ("corpusforge.spec", "SpecError", 2),
    ("corpusforge.data.contracts", "ContractError", 3),
    ("corpusforge.pipeline", "StrictModeError", 4),
    ("corpusforge.workspace_lock", "WorkspaceBusyError", 5),
    ("corpusforge.snapshots.store", "SnapshotError", 1),
    ("corpusforge.snapshots.manifest", "ManifestError", 1),
    # `datasets fetch` and a spec's source.fetch: a name or --dest to fix, an archive that fails its
    # pinned digests, or a download that cannot reach its server (offline)
    ("corpusforge.data.benchmarks", "UnknownDatasetError", 2),
    ("corpusforge.data.benchmarks", "DestinationError", 2),
    ("corpusforge.data.benchmarks", "ArchiveError", 1),
    ("corpusforge.data.benchmarks", "DownloadError", 6),
    # S3 through boto3: endpoint down or unknown, timeouts, credentials, no such bucket, denied
    ("botocore.exceptions", "ConnectionError", 6),
    ("botocore.exceptions", "HTTPClientError", 6),
    ("botocore.exceptions", "NoCredentialsError", 6),
    ("botocore.exceptions", "PartialCredentialsError", 6),
    ("botocore.exceptions", "NoRegionError", 6),
    ("botocore.exceptions", "ProfileNotFound", 6),
    ("botocore.exceptions", "ClientError", 6),
    # a missing source or file, S3 through pyarrow (its errors are OSErrors), a full disk, ...
    ("builtins", "OSError", 6),
)
EXIT_UNEXPECTED = 1


def _fault_exit(exc: Exception, verbose: bool) -> None:
    """Print what went wrong as one line (after the traceback with `verbose`) and exit with its code.

    Args:
        exc: the exception that ended the command.
        verbose: also print the traceback.
    """
    code = next((fault_code for module, name, fault_code in _FAULTS
                 if isinstance(exc, getattr(sys.modules.get(module), name, ()))), None)
    text = str(exc).strip() or type(exc).__name__
    if code != 2:  # a spec error lists one problem a line; everything else is one line
        text = " ".join(text.split())
    if type(exc).__module__.startswith("botocore"):
        text = f"S3: {text}"
    if code is None:
        code = EXIT_UNEXPECTED
        text = f"unexpected error: {type(exc).__name__}: {text}" + ("" if verbose else " (--verbose shows where)")
    if verbose:
        traceback.print_exception(exc, file=sys.stderr)
    console.print(text, style="red", markup=False, highlight=False, soft_wrap=True)
    sys.exit(code)


class _App(typer.Typer):
    """The typer app, whose call (console script and ``python -m`` alike) maps faults to exit codes.

    Commands just raise; the one place below turns an exception into one line and the documented
    exit code, with the traceback only when the command line has ``--verbose``/``-v``.
    """

    def __call__(self, *args, **kwargs):
        try:
            return super().__call__(*args, **kwargs)
        except Exception as exc:
            argv = kwargs.get("args", args[0] if args else None)
            argv = sys.argv[1:] if argv is None else argv
            _fault_exit(exc, verbose=any(a in ("--verbose", "-v") for a in argv))


app = _App(
    help="Raw text corpora to evaluated, versioned retrieval indexes, and their serving.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

SpecArg = typer.Argument(..., exists=False, help="pipeline spec, e.g. pipelines/scifact.yaml")
WorkspaceOpt = typer.Option(None, "--workspace", "-w", help="workspace root (default: spec's, else ./workspace)")


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s",
                        handlers=[RichHandler(console=console, show_path=False, markup=False,
                                              level=logging.DEBUG if verbose else logging.INFO)], force=True)
    for noisy in ("httpx", "urllib3", "botocore", "filelock", "alembic", "mlflow", "great_expectations",
                  "faiss", "bm25s", "transformers", "sentence_transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own bars show counts and rates


def _load(spec_path: Path):
    from corpusforge.spec import SpecError, load_spec

    try:
        return load_spec(spec_path)
    except SpecError as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from None


# Read by `_App.__call__` from the command line itself, like every command's own --verbose.
VerboseOpt = typer.Option(False, "--verbose", "-v", help="on an error, print its traceback too")


def _print_version(value: bool) -> None:
    if value:
        from corpusforge import __version__

        typer.echo(f"corpusforge {__version__}")
        raise typer.Exit()


@app.callback()
def _global_options(verbose: bool = VerboseOpt,
                    version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                                 help="print the version and exit")) -> None:
    """Raw text corpora to evaluated, versioned retrieval indexes, and their serving."""


def _check_source(s, list_remote: bool = False) -> str:
    """`fs.check_source` on a spec's source: a missing one raises before any stage runs, unless
    ``source.fetch`` names a dataset that `run` downloads into it."""
    from corpusforge.data import fs

    try:
        return fs.check_source(s.source_uri, s.source.s3_endpoint_url, list_remote=list_remote)
    except FileNotFoundError:
        if not s.source.fetch:
            raise
        return f"absent; `corpusforge run` fetches {s.source.fetch!r} into it"


@app.command()
def validate(
    spec: Path = SpecArg,
    check_sources: bool = typer.Option(False, "--check-sources",
                                       help="also list an s3:// source (5 s timeouts, no retries)"),
    verbose: bool = VerboseOpt,
) -> None:
    """Validate a pipeline spec and that its local source exists; print the resolved configuration."""
    s = _load(spec)
    checked = _check_source(s, list_remote=check_sources)
    console.print(f"[green]{spec}: valid[/green] (pipeline {s.name!r}, source {s.source_uri}: {checked})")
    typer.echo(json.dumps(s.report(), indent=2))


@app.command()
def run(
    spec: Path = SpecArg,
    until: Optional[str] = typer.Option(None, help="last stage to run: " + "|".join(STAGE_NAMES)),
    workspace: Optional[Path] = WorkspaceOpt,
    strict: bool = typer.Option(False, help="exit non-zero when any record is quarantined"),
    force: bool = typer.Option(False, help="redo every stage even when unchanged"),
    engine: Optional[str] = typer.Option(None, help="local|ray: where the stages run (default: the spec's "
                                                     "execution.engine)"),
    ray_address: Optional[str] = typer.Option(None, help="Ray cluster address (implies --engine ray); without "
                                                          "it, --engine ray starts a local Ray"),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Run a pipeline end to end (or up to --until), skipping stages whose inputs are unchanged."""
    from corpusforge.data.contracts import ContractError
    from corpusforge.graph import stages_for
    from corpusforge.pipeline import Pipeline, StrictModeError

    from corpusforge.data.benchmarks import ensure_source
    from corpusforge.workspace import Workspace

    _setup_logging(verbose)
    s = _with_engine(_load(spec), engine, ray_address)
    fetched = ensure_source(s, Workspace.for_spec(s, workspace).root)  # a missing source.fetch dataset
    if fetched is not None:
        console.print(fetched.describe())
    _check_source(s, list_remote=True)  # every stage needs the source: fail now, in seconds, not at extract
    try:
        stages_for(s, until)
    except ValueError as exc:
        console.print(f"[red]--until: {exc}[/red]")
        raise typer.Exit(2) from None
    pipeline = Pipeline(s, workspace=workspace, force=force)
    console.print(f"[bold]{s.name}[/bold]: workspace {pipeline.ws.base}")
    results = []
    try:
        pipeline.run(until=until, strict=strict, on_result=results.append)
    except ContractError as exc:
        console.print(f"[red]data contract failed: {exc}[/red]")
        raise typer.Exit(3) from None
    except StrictModeError as exc:
        _print_results(results)
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(4) from None
    finally:
        if results:
            _print_results(results)


@app.command("stage")
def stage_command(
    spec: Path = SpecArg,
    stage: str = typer.Argument(..., help="the stage to run: " + "|".join(STAGE_NAMES)),
    workspace: Optional[Path] = WorkspaceOpt,
    force: bool = typer.Option(False, help="redo the stage even when unchanged"),
    alias: Optional[str] = typer.Option(None, help="the alias publish moves (default: the spec's publish.alias)"),
    orchestrator: str = typer.Option("cli", help="tags the stage's MLflow run (airflow, dagster, cli)"),
    run_id: Optional[str] = typer.Option(None, help="the orchestrator's run id: the stage's MLflow run nests under "
                                                    "that build's parent run (default: a new id)"),
    engine: Optional[str] = typer.Option(None, help="local|ray (default: the spec's execution.engine)"),
    ray_address: Optional[str] = typer.Option(None, help="Ray cluster address (implies --engine ray)"),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Run one stage of a spec (skipped when unchanged), tracked as an orchestrator step.

    What an orchestrator task runs, here or as a Ray job (`corpusforge.engines.ray_jobs`): the
    stage's upstream stages must be done. The last line printed is the stage's facts as JSON,
    after the prefix ``corpusforge-result: ``.
    """
    import uuid

    from corpusforge.engines.ray_jobs import RESULT_MARKER
    from corpusforge.pipeline import Pipeline
    from corpusforge.spec import with_alias

    _setup_logging(verbose)
    s = _with_engine(_load(spec), engine, ray_address)
    if alias:
        s = with_alias(s, alias)
    pipeline = Pipeline(s, workspace=workspace, force=force, progress=False)
    if stage not in pipeline.stages():
        console.print(f"[red]stage {stage!r}: not in {s.name}'s graph ({', '.join(pipeline.stages())})[/red]")
        raise typer.Exit(2)
    result = pipeline.run_stage_tracked(stage, orchestrator, run_id or f"cli-{uuid.uuid4().hex[:12]}")
    typer.echo(RESULT_MARKER + json.dumps(result.flat(), sort_keys=True))


def _with_engine(s, engine: str | None, ray_address: str | None):
    """The spec with `run`'s --engine / --ray-address applied (exit 2 on a bad combination)."""
    if engine is None and ray_address is None:
        return s
    if engine not in (None, "local", "ray") or (engine == "local" and ray_address):
        console.print("[red]--engine: expected local or ray (--ray-address needs ray)[/red]")
        raise typer.Exit(2)
    update = {"engine": "ray" if ray_address else engine}
    if ray_address:
        update["address"] = ray_address
    return s.model_copy(update={"execution": s.execution.model_copy(update=update)})


def _print_results(results) -> None:
    table = Table(title="stages")
    for col in ("stage", "status", "rows", "quarantined", "seconds", "peak RSS MB", "details"):
        table.add_column(col)
    for r in results:
        s = r.summary
        table.add_row(r.stage, "skipped (unchanged)" if r.skipped else "ran", f"{s.get('rows', ''):,}"
                      if isinstance(s.get("rows"), int) else "", str(s.get("quarantined", "")),
                      f"{r.seconds:.1f}", f"{r.peak_rss_mb:,.0f}" if r.peak_rss_mb else "",
                      ("last run: " if r.skipped and s else "") + stage_details(r.stage, s))
    console.print(table)
    ran = [r for r in results if not r.skipped]
    if ran:  # each stage's peak is its own (the mark is reset per stage), so `time -v` sees only the last
        top = max(ran, key=lambda r: r.peak_rss_mb)
        console.print(f"peak RSS of this run: {top.peak_rss_mb:,.0f} MB ({top.stage}); "
                      f"{sum(r.seconds for r in ran):,.1f} s in the stages that ran")


def stage_details(stage: str, s: dict) -> str:
    """The few facts of a stage summary worth a glance in the results table."""
    parts = []
    if s.get("quarantine_reasons"):
        parts.append("quarantine " + ", ".join(f"{k}={v}" for k, v in s["quarantine_reasons"].items()))
    if stage == "chunk" and s.get("tokens"):
        t = s["tokens"]
        parts.append(f"tokens/chunk min {t.get('min')} mean {t.get('mean')} p95 {t.get('p95')} max {t.get('max')}")
    if stage == "embed":
        parts.append(f"embedded {s.get('embedded', 0):,}, from cache {s.get('cached', 0):,}, dim {s.get('dim')}")
    if stage == "index":
        d = s.get("dense", {})
        parts.append(f"{d.get('factory')} x{d.get('shards')} recall@10 vs exact {d.get('recall_at_10', d.get('recall@10'))}")
        if s.get("query_tower"):
            t = s["query_tower"]
            parts.append(f"query tower {len(t['layers'])}/{t['teacher_layers']} layers, held-out cosine "
                         f"{t['holdout_cosine']['mean']:.3f}" + (" (kept)" if t.get("reused") else f", {t['seconds']:.0f} s"))
    if stage == "evaluate":
        tower = {f"{m}-tower": v for m, v in (s.get("query_tower") or {}).get("modes", {}).items()}
        for mode, v in {**s.get("modes", {}), **tower}.items():
            m = v["metrics"]
            parts.append(f"{mode}: nDCG@10 {m.get('ndcg@10', 0):.4f} R@100 {m.get('recall@100', 0):.4f} "
                         f"p50 {v['latency'].get('latency_ms_p50', 0):.1f} ms")
    if stage == "evaluate" and s.get("dev"):
        parts.append("dev: " + ", ".join(f"{mode} {m.get('ndcg@10', 0):.4f}" for mode, m in s["dev"]["modes"].items())
                     + f" nDCG@10 ({s['dev']['queries']} queries)")
    if stage == "mine":
        parts.append(f"{s.get('train_pairs')} training pairs, {s.get('dev_queries')} dev queries; base dev nDCG@10 "
                     + ", ".join(f"{m} {v:.4f}" for m, v in (s.get("dev_base") or {}).items()))
    if "examples_per_s" in s:  # a training stage
        dev = s["dev"] if isinstance(s.get("dev"), dict) else {"dev pool": s.get("best_dev") or 0.0}
        parts.append(f"{s.get('steps')} steps, {s.get('examples_per_s', 0):.1f} examples/s"
                     + (" TRUNCATED by its time budget" if s.get("truncated") else "") + "; dev nDCG@10 "
                     + ", ".join(f"{m} {v:.4f}" for m, v in (dev or {}).items()))
        if s.get("registry"):
            parts.append(f"registered {s['registry'].get('name')} v{s['registry'].get('version')}")
    if stage == "publish":
        parts.append(f"{s.get('index')}/{s.get('version')} -> alias {s.get('alias')} ({s.get('files')} files)")
        if s.get("promotion"):
            parts.append(("moved: " if s.get("promoted") else "NOT moved: ") + s["promotion"])
    return "\n".join(parts)


@app.command()
def inspect(
    dataset: str = typer.Argument(..., help="a dataset directory, or a dataset name with --spec"),
    spec: Optional[Path] = typer.Option(None, help="resolve DATASET as a name in this spec's workspace"),
    workspace: Optional[Path] = WorkspaceOpt,
    rows: int = typer.Option(5, help="rows to show"),
    as_json: bool = typer.Option(False, "--json", help="print path, rows, schema and first rows as JSON"),
) -> None:
    """Show a dataset's row count, schema and first rows."""
    from corpusforge.data import datasets
    from corpusforge.workspace import Workspace

    path, folder = Path(dataset), Path(dataset).parent
    if spec is not None:
        ws = Workspace.for_spec(_load(spec), workspace)
        path = ws.quarantine(dataset.split("/", 1)[1]) if dataset.startswith("quarantine/") else ws.dataset(dataset)
        folder = ws.base
    if not datasets.is_complete(path):
        console.print(f"[red]{path}: not a complete dataset[/red]" + _dataset_hint(dataset, folder, spec is not None))
        raise typer.Exit(2)
    ds = datasets.open_dataset(path)
    if as_json:
        typer.echo(json.dumps({
            "path": str(path), "rows": ds.count_rows(),
            "schema": [{"name": f.name, "type": str(f.type), "nullable": f.nullable} for f in ds.schema],
            "head": ds.head(rows).to_pylist()}, indent=2, default=str))
        return
    console.print(f"[bold]{path}[/bold]: {ds.count_rows():,} rows")
    console.print(str(ds.schema))
    head = ds.head(rows).to_pylist()
    table = Table()
    for name in ds.schema.names:
        table.add_column(name, overflow="fold", max_width=60)
    for row in head:
        table.add_row(*[_short(row[n]) for n in ds.schema.names])
    console.print(table)


def _dataset_hint(name: str, folder: Path, in_workspace: bool) -> str:
    """The message's tail for a name that is no dataset of `folder`: a near miss, and the datasets there."""
    import difflib

    from corpusforge.data import datasets

    # datasets sit one or two levels down (chunks, quarantine/clean, train/pairs)
    found = sorted(p.relative_to(folder).as_posix() for pattern in ("*", "*/*") for p in folder.glob(pattern)
                   if datasets.is_complete(p))
    if not found:
        return f" (no datasets in {folder}" + ("; run the spec first)" if in_workspace else ")")
    close = difflib.get_close_matches(Path(name).as_posix() if in_workspace else Path(name).name, found, n=3)
    return ((f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else "")
            + f" (datasets in {folder}: {', '.join(found)})")


snapshots_app = typer.Typer(help="List, verify, promote and roll back published index snapshots.",
                            no_args_is_help=True)
app.add_typer(snapshots_app, name="snapshots")

RootOpt = typer.Option(None, "--root", help="snapshot root: a directory or s3://bucket/prefix "
                       "(default: the spec's publish root)")
SpecOpt = typer.Option(None, "--spec", help="take root and index name from this pipeline spec")
IndexOpt = typer.Option(None, "--index", help="index name (default: the spec's)")
EndpointOpt = typer.Option(None, "--endpoint-url", help="S3 API endpoint for s3:// roots")


def _store(root: Optional[str], spec: Optional[Path], index: Optional[str], workspace: Optional[Path],
           endpoint_url: Optional[str]):
    from corpusforge.snapshots import SnapshotStore

    if spec is not None:
        from corpusforge.snapshots.build import index_name, store_for
        from corpusforge.workspace import Workspace

        s = _load(spec)
        root = root or store_for(s, Workspace.for_spec(s, workspace)).root
        index = index or index_name(s)
        endpoint_url = endpoint_url or s.publish.s3_endpoint_url
    if not root or not index:
        console.print("[red]give --spec, or both --root and --index[/red]")
        raise typer.Exit(2)
    return SnapshotStore(root, endpoint_url=endpoint_url), index


def _snapshot_errors(func):
    """Turn the store's errors into a red message and exit code 1 (no stack trace)."""
    import functools

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        from corpusforge.snapshots import ManifestError, SnapshotError

        try:
            return func(*args, **kwargs)
        except (SnapshotError, ManifestError) as exc:
            console.print(f"[red]{exc}[/red]")
            raise typer.Exit(1) from None
    return wrapper


@snapshots_app.command("list")
@_snapshot_errors
def snapshots_list(spec: Optional[Path] = SpecOpt, root: Optional[str] = RootOpt, index: Optional[str] = IndexOpt,
                   workspace: Optional[Path] = WorkspaceOpt, endpoint_url: Optional[str] = EndpointOpt,
                   as_json: bool = typer.Option(False, "--json", help="print index, root, aliases, versions and "
                                                "incomplete publishes as JSON")) -> None:
    """List an index's versions (oldest first) with their aliases and metrics."""
    store, name = _store(root, spec, index, workspace, endpoint_url)
    versions = store.versions(name)
    if as_json:
        from dataclasses import asdict

        typer.echo(json.dumps({"index": name, "root": str(store.root), "aliases": store.aliases(name),
                               "versions": [v.to_dict() for v in versions],
                               "incomplete": [asdict(i) for i in store.incomplete(name)]}, indent=2))
        return
    rows = [v.as_row() for v in versions]
    table = Table(title=f"{name} @ {store.root}")
    for col in (rows[0] if rows else {"version": ""}):
        table.add_column(col, overflow="fold")
    for row in rows:
        table.add_row(*row.values())
    console.print(table)
    for leftover in store.incomplete(name):
        console.print(f"[yellow]incomplete (not listed as a version): {leftover.as_row()}[/yellow]")


@snapshots_app.command("verify")
@_snapshot_errors
def snapshots_verify(version: Optional[str] = typer.Argument(None, help="version or alias (default: every version)"),
                     spec: Optional[Path] = SpecOpt, root: Optional[str] = RootOpt, index: Optional[str] = IndexOpt,
                     workspace: Optional[Path] = WorkspaceOpt, endpoint_url: Optional[str] = EndpointOpt) -> None:
    """Re-hash every file of a snapshot against its manifest; exit 1 when any check fails."""
    store, name = _store(root, spec, index, workspace, endpoint_url)
    aliases = store.aliases(name)
    versions = [aliases.get(version, version)] if version else [v.version for v in store.versions(name)]
    reports = [store.verify(name, v) for v in versions]
    table = Table(title=f"verify {name}")
    for col in ("version", "ok", "files", "size", "seconds", "problems"):
        table.add_column(col, overflow="fold")
    for r in reports:
        table.add_row(*r.as_row().values())
    console.print(table)
    if not all(r.ok for r in reports):
        raise typer.Exit(1)


@snapshots_app.command("promote")
@_snapshot_errors
def snapshots_promote(version: str = typer.Argument(..., help="version (or another alias) to point at"),
                      alias: str = typer.Option("production", help="alias to move"),
                      spec: Optional[Path] = SpecOpt, root: Optional[str] = RootOpt, index: Optional[str] = IndexOpt,
                      workspace: Optional[Path] = WorkspaceOpt, endpoint_url: Optional[str] = EndpointOpt) -> None:
    """Point an alias at a verified version (atomic)."""
    store, name = _store(root, spec, index, workspace, endpoint_url)
    record = store.promote(name, version, alias)
    console.print(f"[green]{name}/{alias} -> {record['version']}[/green]")


@snapshots_app.command("rollback")
@_snapshot_errors
def snapshots_rollback(alias: str = typer.Option("production", help="alias to move back"),
                       spec: Optional[Path] = SpecOpt, root: Optional[str] = RootOpt, index: Optional[str] = IndexOpt,
                       workspace: Optional[Path] = WorkspaceOpt, endpoint_url: Optional[str] = EndpointOpt) -> None:
    """Move an alias back to the version it pointed at before."""
    store, name = _store(root, spec, index, workspace, endpoint_url)
    console.print(f"[green]{name}/{alias} -> {store.rollback(name, alias)}[/green]")


@snapshots_app.command("gc")
@_snapshot_errors
def snapshots_gc(keep: Optional[int] = typer.Option(None, "--keep", min=0, help="also remove versions older than the "
                                                    "N newest that no alias points at (nor has in its recent history)"),
                 history: int = typer.Option(5, "--history", min=0, help="protect each alias's last N history "
                                             "entries (its rollback depth)"),
                 grace: float = typer.Option(3600.0, "--grace", min=0, help="keep unfinished publishes written to "
                                             "within this many seconds (one may still be running)"),
                 yes: bool = typer.Option(False, "--yes", help="remove; without it, only print what would be removed"),
                 spec: Optional[Path] = SpecOpt, root: Optional[str] = RootOpt, index: Optional[str] = IndexOpt,
                 workspace: Optional[Path] = WorkspaceOpt, endpoint_url: Optional[str] = EndpointOpt) -> None:
    """Remove leftovers of interrupted publishes and, with --keep, old unaliased versions (a dry run unless --yes)."""
    store, name = _store(root, spec, index, workspace, endpoint_url)
    report = store.gc(name, keep=keep, history=history, grace_s=grace, dry_run=not yes)
    table = Table(title=f"gc {name} @ {store.root}" + (" (dry run)" if report.dry_run else ""))
    for col in ("action", "kind", "name", "files", "size", "reason"):
        table.add_column(col, overflow="fold")
    for action, items in (("would remove" if report.dry_run else "removed", report.removed), ("keep", report.kept)):
        for item in items:
            table.add_row(action, *item.as_row().values())
    console.print(table)
    console.print(report.summary() + ("; run again with --yes to remove" if report.dry_run else ""))


datasets_app = typer.Typer(help="Download public benchmark datasets (pinned digests, cached under the workspace).",
                           no_args_is_help=True)
app.add_typer(datasets_app, name="datasets")


@datasets_app.command("list")
def datasets_list() -> None:
    """List the datasets `datasets fetch` knows, with their archive and pinned digests."""
    from corpusforge.data.benchmarks import DATASETS

    table = Table(title="datasets")
    for col in ("name", "description", "archive", "sha256", "md5"):
        table.add_column(col, overflow="fold")
    for d in DATASETS.values():
        table.add_row(d.name, d.description, d.url, d.sha256 or "", d.md5 or "")
    console.print(table)


@datasets_app.command("fetch")
def datasets_fetch(
    name: str = typer.Argument(..., help="a dataset of `corpusforge datasets list`, e.g. scifact"),
    dest: Optional[Path] = typer.Option(None, "--dest", help="folder to extract into (default: "
                                        "<workspace>/cache/datasets/<name>); left alone when already complete"),
    workspace: Optional[Path] = typer.Option(None, "--workspace", "-w", help="workspace root whose cache keeps "
                                             "the archive (default: ./workspace)"),
    attempts: int = typer.Option(3, min=1, help="requests at most; later ones resume a short transfer"),
    verbose: bool = VerboseOpt,
) -> None:
    """Download a dataset's archive, check its pinned digests, and extract only its expected files."""
    from corpusforge.data.benchmarks import default_cache_dir, fetch

    cache = default_cache_dir((workspace or Path("workspace")).expanduser().absolute())
    result = fetch(name, dest if dest is not None else cache / name, cache, attempts=attempts)
    console.print(result.describe(), markup=False, highlight=False)


def _short(value, limit: int = 120) -> str:
    text = str(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


@app.command()
def serve(
    root: str = typer.Option(..., help="snapshot store root: a directory or s3://bucket/prefix"),
    index: str = typer.Option(..., help="index name under the root"),
    alias: str = typer.Option("production", help="alias to serve (followed when it moves)"),
    host: str = typer.Option("127.0.0.1", help="interface to bind"),
    port: int = typer.Option(8000, help="TCP port"),
    keys: Optional[Path] = typer.Option(None, help="API keys YAML (key -> name, acl, admin, rate_limit_per_minute)"),
    poll_seconds: float = typer.Option(10.0, help="alias polling interval; 0 disables"),
    endpoint_url: Optional[str] = typer.Option(None, help="S3 endpoint for S3-compatible servers"),
    cache_dir: Optional[Path] = typer.Option(None, help="download cache for s3:// roots"),
    cache_size: int = typer.Option(4096, help="LRU result cache entries; 0 disables"),
    access_log: bool = typer.Option(True, help="log one line per request"),
    query_runtime: str = typer.Option("auto", help="query encoder: auto (int8 ONNX on CPU when it agrees with "
                                      "torch), onnx-int8 or torch"),
    search_threads: Optional[int] = typer.Option(None, help="searches (with int8 query encoding) run at once "
                                                 "off the event loop; default: CPUs, +1 without a query tower"),
    encode_threads: int = typer.Option(1, help="intra-op threads per int8 query-encoder call"),
    freeze_gc: bool = typer.Option(True, help="after each snapshot swap, freeze live objects out of the cyclic "
                                   "garbage collector (no ~200 ms full-collection stalls under load)"),
    micro_batch: int = typer.Option(32, help="most concurrent queries searched in one call"),
    micro_batch_wait_ms: float = typer.Option(0.0, help="how long a free search thread waits for more queries "
                                              "(0: take what is queued; under load batches form anyway)"),
    query_tower: bool = typer.Option(True, help="encode queries with the snapshot's distilled query tower when it "
                                     "has one (faster; --no-query-tower uses the full model)"),
    opentelemetry: bool = typer.Option(False, help="FastAPI's native OpenTelemetry spans, metrics and logs through "
                                       "the globally configured providers"),
    wait_for_snapshot: bool = typer.Option(False, "--wait-for-snapshot",
                                           help="when nothing is loadable at start (no such index or alias, its "
                                           "snapshot refused), keep running not ready (503 on /readyz) and poll the "
                                           "alias; without it the server exits with code 7"),
    max_body_bytes: int = typer.Option(1 << 20, help="largest request body (413 beyond)"),
    max_query_chars: int = typer.Option(1024, help="longest query"),
    max_k: int = typer.Option(100, help="largest k"),
    max_batch: int = typer.Option(64, help="most queries in one /search/batch request"),
    max_filters: int = typer.Option(16, help="most filter keys in one request"),
    max_filter_values: int = typer.Option(16, help="most wanted values of one filter key"),
    max_filter_value_chars: int = typer.Option(256, help="longest filter key or string filter value"),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Serve /search over the aliased snapshot (FastAPI + uvicorn), hot-swapping when the alias moves."""
    from corpusforge.serve import ServeSettings, run_server
    from corpusforge.serve.app import NothingToServe
    from corpusforge.serve.auth import KeyFileError

    from pydantic import ValidationError

    _setup_logging(verbose)
    try:
        settings = ServeSettings(root=root, index=index, alias=alias, keys_file=keys, poll_seconds=poll_seconds,
                                 endpoint_url=endpoint_url, cache_dir=cache_dir, cache_size=cache_size,
                                 query_runtime=query_runtime, search_threads=search_threads,
                                 encode_threads=encode_threads, query_tower=query_tower, micro_batch=micro_batch,
                                 micro_batch_wait_ms=micro_batch_wait_ms, freeze_gc=freeze_gc,
                                 opentelemetry=opentelemetry, max_body_bytes=max_body_bytes,
                                 max_query_chars=max_query_chars, max_k=max_k, max_batch=max_batch,
                                 max_filters=max_filters, max_filter_values=max_filter_values,
                                 max_filter_value_chars=max_filter_value_chars)
    except ValidationError as exc:
        for err in exc.errors():
            console.print(f"[red]--{str(err['loc'][0]).replace('_', '-')}: {err['msg']}[/red]")
        raise typer.Exit(2) from None
    try:
        run_server(settings, host=host, port=port, access_log=access_log, wait_for_snapshot=wait_for_snapshot)
    except KeyFileError as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from None
    except NothingToServe as exc:
        console.print(f"nothing to serve: {exc} (--wait-for-snapshot waits for one instead)", style="red",
                      markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(7) from None


@app.command()
def train(
    spec: Path = SpecArg,
    workspace: Optional[Path] = WorkspaceOpt,
    force: bool = typer.Option(False, help="redo every stage even when unchanged"),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Run a spec with train.enabled (the same as `run`): mine, fit, re-embed, re-index, evaluate, publish."""
    s = _load(spec)
    if not s.train.enabled:
        console.print(f"[red]{spec}: train.enabled is false; `corpusforge run` builds this spec[/red]")
        raise typer.Exit(2)
    run(spec=spec, until=None, workspace=workspace, strict=False, force=force, verbose=verbose)


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
