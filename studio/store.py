"""SQLite run history (sqlite-utils): schema migrations and every query the studio makes."""

from __future__ import annotations

import hashlib
import json
import secrets
import shutil
import sqlite3
from collections.abc import Iterable
from datetime import datetime, timezone
from enum import Enum
from pathlib import Path
from typing import Any, TypedDict

from sqlite_utils import Database, Migrations


class RunStatus(str, Enum):
    """A run's state; stored as its value, and equal to it (RunStatus.QUEUED == "queued")."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"
    INTERRUPTED = "interrupted"

    def __str__(self) -> str:
        return self.value


STATUSES = tuple(s.value for s in RunStatus)
TERMINAL = (RunStatus.SUCCEEDED, RunStatus.FAILED, RunStatus.CANCELED, RunStatus.INTERRUPTED)
ACTIVE = (RunStatus.QUEUED, RunStatus.RUNNING)
# Which states a run may come *from* when moving to the key state. Terminal states are never
# sources, so a finished run can't change again.
ALLOWED_FROM = {
    RunStatus.RUNNING: (RunStatus.QUEUED,),
    RunStatus.SUCCEEDED: (RunStatus.RUNNING,),
    RunStatus.FAILED: (RunStatus.QUEUED, RunStatus.RUNNING),
    RunStatus.CANCELED: (RunStatus.QUEUED, RunStatus.RUNNING),
    RunStatus.INTERRUPTED: (RunStatus.RUNNING,),
}
OUT = "out"  # a run's outputs live in runs/<id>/out/<output name>


class Run(TypedDict):
    """A row of `runs` (JSON columns as text; `summary`/`config` parse them)."""

    id: str
    step: str
    name: str
    status: str
    queue: str
    config_json: str
    outputs_json: str | None
    depends_on: str | None
    resumed_from: str | None
    chain_id: str | None
    created_at: str
    started_at: str | None
    finished_at: str | None
    progress: float
    message: str
    error: str | None
    traceback: str | None
    cancel_requested: int
    cancel_requested_at: str | None
    pid: int | None
    summary_json: str | None
    deleted: int
    owner: str


migrations = Migrations("slmops_studio")


@migrations(name="0001_initial")
def _initial(db: Database) -> None:
    db["runs"].create(
        {
            "id": str,
            "step": str,
            "name": str,
            "status": str,
            "queue": str,
            "config_json": str,
            "depends_on": str,
            "resumed_from": str,
            "created_at": str,
            "started_at": str,
            "finished_at": str,
            "progress": float,
            "message": str,
            "error": str,
            "traceback": str,
            "cancel_requested": int,
            "cancel_requested_at": str,
            "pid": int,
            "summary_json": str,
            "deleted": int,
        },
        pk="id",
        not_null=["step", "status", "queue", "config_json", "created_at"],
        defaults={"cancel_requested": 0, "deleted": 0, "progress": 0.0, "message": ""},
    )
    db["runs"].create_index(["status", "queue", "created_at"])
    db["run_events"].create(
        {"id": int, "run_id": str, "ts": str, "kind": str, "level": str, "message": str},
        pk="id",
        foreign_keys=[("run_id", "runs", "id")],
        not_null=["run_id", "kind"],
    )
    db["run_events"].create_index(["run_id", "id"])
    db["metrics"].create(
        {"run_id": str, "key": str, "step": int, "value": float, "ts": str},
        pk=("run_id", "key", "step"),
        foreign_keys=[("run_id", "runs", "id")],
    )
    db["artifacts"].create(
        {
            "id": int,
            "run_id": str,
            "kind": str,
            "name": str,
            "path": str,
            "bytes": int,
            "sha256": str,
            "meta_json": str,
            "created_at": str,
            "deleted": int,
        },
        pk="id",
        foreign_keys=[("run_id", "runs", "id")],
        defaults={"deleted": 0},
    )
    db["artifacts"].create_index(["kind", "created_at"])
    db["run_inputs"].create(
        {"run_id": str, "artifact_id": int, "role": str},
        pk=("run_id", "artifact_id", "role"),
        foreign_keys=[("run_id", "runs", "id"), ("artifact_id", "artifacts", "id")],
    )


@migrations(name="0002_servers")
def _servers(db: Database) -> None:
    """Local runtimes started from the Deploy tab (their API key is never stored)."""
    db["servers"].create(
        {
            "id": int,
            "models_json": str,
            "host": str,
            "port": int,
            "pid": int,
            "status": str,
            "key_required": int,
            "log_path": str,
            "error": str,
            "started_at": str,
            "stopped_at": str,
        },
        pk="id",
        defaults={"key_required": 0, "error": ""},
    )


@migrations(name="0003_owners")
def _owners(db: Database) -> None:
    """Hosted mode: who started each run and server ('' on a single-user studio)."""
    db["runs"].add_column("owner", str, not_null_default="")
    db["servers"].add_column("owner", str, not_null_default="")
    db["runs"].create_index(["owner", "status"])


@migrations(name="0004_outputs_and_chains")
def _outputs_and_chains(db: Database) -> None:
    """Each run's declared outputs (name -> kind), and chains of runs queued together (Distill,
    Quick start) as rows of their own, with each run's role in its chain."""
    db["runs"].add_column("outputs_json", str)
    db["runs"].add_column("chain_id", str)
    db["chains"].create(
        {"id": str, "kind": str, "name": str, "owner": str, "runs_json": str, "created_at": str},
        pk="id",
        not_null=["kind", "runs_json", "created_at"],
        defaults={"owner": "", "name": ""},
    )
    db["chains"].create_index(["kind", "owner", "created_at"])
    _backfill_chains(db)


def _backfill_chains(db: Database) -> None:
    """Runs queued before chains were stored: each group linked by depends_on becomes a chain;
    a Quick start (found by its run names, as the old code did) gets its roles back."""
    rows = list(db["runs"].rows_where(order_by="created_at, id"))
    root: dict[str, str] = {}
    for row in rows:
        parent = row["depends_on"]
        root[row["id"]] = root.get(parent, parent) if parent else row["id"]
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(root[row["id"]], []).append(row)
    quickstart = {
        "import": "dataset",
        "teacher answers": "synthesize",
        "student": "finetune",
        "report": "evaluate",
        "LoRA on the labels": "lora",
        "int4": "quantize",
    }
    for chain_id, members in groups.items():
        if len(members) < 2:
            continue
        suffixes = {m["name"].rsplit(" · ", 1)[-1]: m["id"] for m in members if " · " in m["name"]}
        if set(quickstart) <= set(suffixes):
            kind, name = "quickstart", members[0]["name"].rsplit(" · ", 1)[0]
            runs = {role: suffixes[suffix] for suffix, role in quickstart.items()}
        else:
            kind, name = "chain", members[0]["name"]
            runs = {f"{m['step']}-{i}": m["id"] for i, m in enumerate(members)}
        db["chains"].insert(
            {
                "id": chain_id,
                "kind": kind,
                "name": name,
                "owner": members[0]["owner"],
                "runs_json": json.dumps(runs),
                "created_at": members[0]["created_at"],
            }
        )
        for m in members:
            db["runs"].update(m["id"], {"chain_id": chain_id})


SERVER_LIVE = ("starting", "serving")


def connect(home: Path) -> Database:
    """Open a new connection; call per thread or process, never share one across threads."""
    conn = sqlite3.connect(Path(home) / "studio.db", timeout=30)
    conn.execute("PRAGMA busy_timeout = 30000")
    return Database(conn)


def init(home: Path) -> None:
    """Create the home folder and the database, and apply pending migrations (idempotent)."""
    home = Path(home)
    (home / "runs").mkdir(parents=True, exist_ok=True)
    (home / "uploads").mkdir(exist_ok=True)
    with connect(home) as db:
        db.enable_wal()  # readers (the UI) never wait for the writer (a worker)
        migrations.apply(db)


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


def new_run_id() -> str:
    """Sortable and readable: 20261129-201530-3fa2."""
    return datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(2)


def _unused_id(db: Database, table: str) -> str:
    """A new sortable id that no row of `table` has (two made in the same second differ)."""
    new = new_run_id()
    while db[table].count_where("id = ?", [new]):
        new = new_run_id()
    return new


def keep_uploads(home: Path, paths: list[str], owner: str = "") -> list[str]:
    """Copy input files into STUDIO_HOME/uploads so that a run (and its re-runs) owns them
    (a hosted studio's users each have their own folder there)."""
    if not paths:
        return []
    folder = uploads_dir(home, owner) / (new_run_id() + "-" + secrets.token_hex(2))
    folder.mkdir(parents=True)
    copies = []
    for path in map(Path, paths):
        target = folder / path.name
        if target.exists():  # two files with the same name from different folders
            target = folder / f"{len(copies)}-{path.name}"
        shutil.copy2(path, target)
        copies.append(str(target))
    return copies


def uploads_dir(home: Path, owner: str = "") -> Path:
    """STUDIO_HOME/uploads, or a user's own folder under it (named by a hash of the name)."""
    root = Path(home) / "uploads"
    return root / ("u-" + hashlib.sha256(owner.encode()).hexdigest()[:16]) if owner else root


# --- where a run's files are: only this module knows the layout --------------------------------


def run_dir(home: Path, run_id: str) -> Path:
    """runs/<id>: the run's config.json and log.txt, and its outputs under out/."""
    return Path(home) / "runs" / run_id


def workdir(home: Path, run_id: str) -> Path:
    """The folder a run's step writes its outputs into."""
    return run_dir(home, run_id) / OUT


def output(db: Database, home: Path, run_id: str, name: str) -> Path:
    """Where a run's output `name` is (or will be, for a queued run): the name must be one its
    config declared, or one it registered (runs made before outputs were declared)."""
    run = get_run(db, run_id)
    if run is None:
        raise KeyError(f"no run {run_id!r}")
    declared = json.loads(run.get("outputs_json") or "{}")
    path = workdir(home, run_id) / name
    registered = {a["path"] for a in artifacts(db, run_id=run_id)}
    if name not in declared and str(path.relative_to(Path(home))) not in registered:
        raise KeyError(
            f"run {run_id} ({run['step']}) has no output {name!r}; it declares "
            f"{', '.join(sorted(declared)) or 'none'}"
        )
    return path


def run_of_path(home: Path, path: str | Path) -> str | None:
    """The id of the run whose folder holds `path` (resolved first), else None."""
    runs = (Path(home) / "runs").resolve()
    resolved = Path(path).expanduser().resolve()
    if runs not in resolved.parents:
        return None
    return resolved.relative_to(runs).parts[0]


# --- chains: runs queued together (Distill, Quick start) --------------------------------------


def create_chain(db: Database, kind: str, name: str = "", owner: str = "") -> str:
    """A new, still empty chain; runs join it with `add_to_chain`."""
    chain_id = _unused_id(db, "chains")
    db["chains"].insert(
        {
            "id": chain_id,
            "kind": kind,
            "name": name,
            "owner": owner,
            "runs_json": "{}",
            "created_at": utc_now(),
        }
    )
    return chain_id


def add_to_chain(db: Database, chain_id: str, role: str, run_id: str) -> None:
    # one UPDATE each, no read first: a read that turns into a write inside a transaction fails
    # with "database is locked" when a worker wrote meanwhile (WAL snapshots)
    with db.atomic():
        db.execute(
            "update chains set runs_json = json_set(runs_json, ?, ?) where id = ?",
            [f'$."{role}"', run_id, chain_id],
        )
        db.execute("update runs set chain_id = ? where id = ?", [chain_id, run_id])


def latest_chain(db: Database, kind: str, owner: str | None = None) -> dict[str, str]:
    """Role -> run id of the newest chain of `kind` (the owner's, when given); {} if none."""
    where, params = "kind = ?", [kind]
    if owner is not None:
        where, params = where + " and owner = ?", [kind, owner]
    for chain in db["chains"].rows_where(where, params, order_by="created_at desc", limit=1):
        return json.loads(chain["runs_json"])
    return {}


# --- runs -------------------------------------------------------------------------------------


def create_run(
    db: Database,
    step: str,
    config: dict[str, Any],
    *,
    queue: str,
    name: str = "",
    depends_on: str | None = None,
    resumed_from: str | None = None,
    owner: str = "",
    outputs: dict[str, str] | None = None,
    chain_id: str | None = None,
) -> str:
    """Record a queued run; `outputs` are what its config declares it will write."""
    run_id = _unused_id(db, "runs")
    db["runs"].insert(
        {
            "id": run_id,
            "step": step,
            "name": name or step,
            "status": RunStatus.QUEUED.value,
            "queue": queue,
            "config_json": json.dumps(config, ensure_ascii=False),
            "outputs_json": json.dumps(outputs or {}),
            "chain_id": chain_id,
            "depends_on": depends_on,
            "resumed_from": resumed_from,
            "created_at": utc_now(),
            "owner": owner,
        }
    )
    return run_id


def get_run(db: Database, run_id: str, owner: str | None = None) -> Run | None:
    """The run's row; None also when `owner` is given and the run is someone else's."""
    rows = list(db["runs"].rows_where("id = ?", [run_id]))
    if not rows or (owner is not None and rows[0]["owner"] != owner):
        return None
    return rows[0]


def active_runs(db: Database, owner: str) -> int:
    """How many of the owner's runs are queued or running."""
    return db["runs"].count_where(
        "owner = ? and status in (?, ?) and deleted = 0", [owner, *(s.value for s in ACTIVE)]
    )


def list_runs(
    db: Database,
    *,
    step: str | None = None,
    status: str | None = None,
    include_deleted: bool = False,
    limit: int = 500,
    owner: str | None = None,
) -> list[Run]:
    """Newest first; `owner` (hosted mode) keeps that user's runs only."""
    where, params = [], []
    if owner is not None:
        where.append("owner = ?")
        params.append(owner)
    if step:
        where.append("step = ?")
        params.append(step)
    if status:
        where.append("status = ?")
        params.append(status)
    if not include_deleted:
        where.append("deleted = 0")
    return list(
        db["runs"].rows_where(
            " and ".join(where) or None, params, order_by="created_at desc, id desc", limit=limit
        )
    )


def queued_runs(db: Database) -> list[Run]:
    """Queued runs in submission order (the runner launches them first come, first served)."""
    return list(db["runs"].rows_where("status = 'queued'", order_by="created_at, id"))


def running_per_queue(db: Database) -> dict[str, int]:
    """Queue name -> how many of its runs are running now."""
    rows = db.query("select queue, count(*) as n from runs where status = 'running' group by queue")
    return {row["queue"]: row["n"] for row in rows}


def cancels_pending(db: Database) -> list[Run]:
    """Running runs whose user asked them to stop."""
    return list(db["runs"].rows_where("status = 'running' and cancel_requested = 1"))


def set_status(
    db: Database,
    run_id: str,
    status: RunStatus | str,
    *,
    only_from: tuple[RunStatus, ...] = (),
    **fields: Any,
) -> bool:
    """Move a run to `status` if that transition is legal; False means nothing changed.

    `only_from` narrows the legal source states (cancel moves only queued runs directly).
    """
    status = RunStatus(status)
    stamp = "started_at" if status == RunStatus.RUNNING else "finished_at"
    values = {"status": status.value, stamp: utc_now(), **fields}
    sources = [s.value for s in ALLOWED_FROM[status] if not only_from or s in only_from]
    # Column names come from this module's callers, never from user input.
    columns = ", ".join(f"[{name}] = ?" for name in values)
    placeholders = ", ".join("?" for _ in sources)
    cursor = db.execute(
        f"update runs set {columns} where id = ? and status in ({placeholders})",
        [*values.values(), run_id, *sources],
    )
    return cursor.rowcount == 1


def set_pid(db: Database, run_id: str, pid: int) -> None:
    db.execute("update runs set pid = ? where id = ? and status = 'running'", [pid, run_id])


def update_progress(db: Database, run_id: str, progress: float | None, message: str) -> None:
    # A late write after a terminal state matches no row and is dropped.
    db.execute(
        "update runs set progress = coalesce(?, progress), message = ? "
        "where id = ? and status = 'running'",
        [progress, message, run_id],
    )


def set_queued_message(db: Database, run_id: str, message: str) -> None:
    """Say why a queued run has not started (e.g. it waits for another run)."""
    db.execute(
        "update runs set message = ? where id = ? and status = 'queued' and message != ?",
        [message, run_id, message],
    )


def request_cancel(db: Database, run_id: str) -> bool:
    cursor = db.execute(
        "update runs set cancel_requested = 1, cancel_requested_at = ? "
        "where id = ? and status = 'running' and cancel_requested = 0",
        [utc_now(), run_id],
    )
    return cursor.rowcount == 1


def cancel_requested(db: Database, run_id: str) -> bool:
    row = db.execute("select cancel_requested from runs where id = ?", [run_id]).fetchone()
    return bool(row and row[0])


def mark_deleted(db: Database, home: Path, run_id: str) -> bool:
    """Hide a finished run and free its files; the row stays so that lineage still resolves."""
    with db.atomic():
        cursor = db.execute(
            "update runs set deleted = 1 where id = ? and status in "
            f"({', '.join('?' for _ in TERMINAL)})",
            [run_id, *(s.value for s in TERMINAL)],
        )
        if cursor.rowcount != 1:
            return False
        db.execute("update artifacts set deleted = 1 where run_id = ?", [run_id])
    shutil.rmtree(run_dir(home, run_id), ignore_errors=True)
    return True


def reconcile(db: Database, is_alive) -> tuple[list[str], list[dict[str, Any]]]:
    """After a restart: runs whose worker is gone become interrupted; -> (interrupted, alive)."""
    interrupted, alive = [], []
    for row in db["runs"].rows_where("status = 'running'"):
        if row["pid"] and is_alive(row["pid"], row["id"]):
            alive.append(row)
        elif set_status(
            db, row["id"], "interrupted", message="the studio stopped while this run was working"
        ):
            add_event(
                db,
                row["id"],
                "status",
                "interrupted: its worker process was gone after a restart",
                level="warning",
            )
            interrupted.append(row["id"])
    return interrupted, alive


# --- local runtimes ---------------------------------------------------------------------------


def add_server(
    db: Database,
    models: dict[str, str],
    host: str,
    port: int,
    key_required: bool,
    log_path: str,
    owner: str = "",
    pid: int | None = None,
) -> int:
    row = {
        "owner": owner,
        "pid": pid,
        "models_json": json.dumps(models),
        "host": host,
        "port": port,
        "status": "starting",
        "key_required": int(key_required),
        "log_path": log_path,
        "started_at": utc_now(),
    }
    return db["servers"].insert(row).last_pk


def get_server(db: Database, server_id: int) -> dict[str, Any]:
    return dict(db["servers"].get(server_id))


def set_server(db: Database, server_id: int, status: str, **fields: Any) -> bool:
    """Move a live server to `status`; a stopped or failed one stays as it is."""
    stopped = {"stopped_at": utc_now()} if status not in SERVER_LIVE else {}
    values = {"status": status, **fields, **stopped}
    assignments = ", ".join(f"[{k}] = ?" for k in values)  # names from this module's callers
    cursor = db.execute(
        f"update servers set {assignments} where id = ? and status in ('starting', 'serving')",
        [*values.values(), server_id],
    )
    return cursor.rowcount == 1


def servers(
    db: Database, live_only: bool = False, owner: str | None = None
) -> list[dict[str, Any]]:
    """Newest first (the last 50, or every live one); `owner` keeps that user's only."""
    where, params = [], []
    if live_only:
        where.append("status in ('starting', 'serving')")
    if owner is not None:
        where.append("owner = ?")
        params.append(owner)
    rows = db["servers"].rows_where(
        " and ".join(where) or None, params, order_by="id desc", limit=None if live_only else 50
    )
    return [{**r, "models": json.loads(r["models_json"])} for r in rows]


# --- events and metrics -----------------------------------------------------------------------


def add_event(db: Database, run_id: str, kind: str, message: str, level: str = "info") -> None:
    db["run_events"].insert(
        {"run_id": run_id, "ts": utc_now(), "kind": kind, "level": level, "message": message}
    )


def events(db: Database, run_id: str, after_id: int = 0, limit: int = 500) -> list[dict[str, Any]]:
    """Events with id > after_id (the UI's cursor), oldest first."""
    return list(
        db["run_events"].rows_where(
            "run_id = ? and id > ?", [run_id, after_id], order_by="id", limit=limit
        )
    )


def last_events(db: Database, run_id: str, limit: int = 200) -> list[dict[str, Any]]:
    rows = db["run_events"].rows_where("run_id = ?", [run_id], order_by="id desc", limit=limit)
    return list(reversed(list(rows)))


def record_metrics(db: Database, run_id: str, step: int, values: dict[str, float]) -> None:
    now = utc_now()
    db["metrics"].upsert_all(
        [
            {"run_id": run_id, "key": k, "step": step, "value": float(v), "ts": now}
            for k, v in values.items()
        ],
        pk=("run_id", "key", "step"),
    )


def metrics(db: Database, run_id: str) -> list[dict[str, Any]]:
    return list(db["metrics"].rows_where("run_id = ?", [run_id], order_by="key, step"))


# --- artifacts and lineage --------------------------------------------------------------------


def register_artifacts(
    db: Database,
    home: Path,
    run_id: str,
    workdir: Path,
    artifacts: Iterable[tuple[str, str, dict[str, Any]]],
) -> list[int]:
    """Record a succeeded run's outputs (paths relative to workdir) with size and sha256."""
    home = Path(home).resolve()
    rows = []
    for kind, relpath, meta in artifacts:
        path = (Path(workdir) / relpath).resolve()
        size, digest = _size_and_hash(path)
        rows.append(
            {
                "run_id": run_id,
                "kind": kind,
                "name": meta.get("name") or path.name,
                "path": str(path.relative_to(home)),
                "bytes": size,
                "sha256": digest,
                "meta_json": json.dumps(meta, ensure_ascii=False),
                "created_at": utc_now(),
            }
        )
    ids = []
    with db.atomic():
        for row in rows:
            ids.append(db["artifacts"].insert(row).last_pk)
    return ids


def artifacts(
    db: Database, *, kind: str | None = None, run_id: str | None = None, owner: str | None = None
) -> list[dict[str, Any]]:
    """Newest first; `owner` (hosted mode) keeps the artifacts of that user's runs only."""
    where, params = ["deleted = 0"], []
    if owner is not None:
        where.append("run_id in (select id from runs where owner = ?)")
        params.append(owner)
    if kind:
        where.append("kind = ?")
        params.append(kind)
    if run_id:
        where.append("run_id = ?")
        params.append(run_id)
    return list(db["artifacts"].rows_where(" and ".join(where), params, order_by="id desc"))


def record_inputs(db: Database, home: Path, run_id: str, config: dict[str, Any]) -> None:
    """Lineage from the config: every field whose path lies inside an artifact is an input."""
    home = Path(home).resolve()
    known = [(a["id"], (home / a["path"]).resolve()) for a in artifacts(db)]
    links = set()
    for role, value in config.items():
        for item in value if isinstance(value, list) else [value]:
            if not isinstance(item, str) or not item or "\n" in item:
                continue
            path = Path(item).expanduser().resolve()
            for artifact_id, artifact_path in known:
                if path == artifact_path or artifact_path in path.parents:
                    links.add((artifact_id, role))
    db["run_inputs"].insert_all(
        [{"run_id": run_id, "artifact_id": a, "role": r} for a, r in sorted(links)], ignore=True
    )


def lineage(db: Database, run_id: str) -> dict[str, list[dict[str, Any]]]:
    """What a run consumed (with the runs that made it) and which runs used its outputs."""
    inputs = list(
        db.query(
            "select i.role, a.id as artifact_id, a.kind, a.name, a.run_id as made_by "
            "from run_inputs i join artifacts a on a.id = i.artifact_id where i.run_id = ? "
            "order by a.id",
            [run_id],
        )
    )
    used_by = list(
        db.query(
            "select i.run_id, r.step, r.status, i.role, a.name as artifact "
            "from artifacts a join run_inputs i on i.artifact_id = a.id "
            "join runs r on r.id = i.run_id "
            "where a.run_id = ? order by i.run_id",
            [run_id],
        )
    )
    return {"inputs": inputs, "used_by": used_by}


MEASURING_STEPS = ("evaluate", "benchmark")


def run_chain(db: Database, run_id: str) -> list[dict[str, Any]]:
    """The run and every run that made its inputs, recursively, oldest first: each with its
    config, summary and the artifacts it consumed (role, id, kind, name, sha256, meta, made_by)."""
    runs: list[dict[str, Any]] = []
    seen: set[str] = set()

    def visit(current: str) -> None:
        if current in seen:
            return
        seen.add(current)
        inputs = list(
            db.query(
                "select i.role, a.id, a.kind, a.name, a.sha256, a.run_id, a.meta_json "
                "from run_inputs i join artifacts a on a.id = i.artifact_id where i.run_id = ? "
                "order by a.id",
                [current],
            )
        )
        for item in inputs:
            visit(item["run_id"])
        run = get_run(db, current)
        runs.append(
            {
                "id": current,
                "step": run["step"],
                "name": run["name"],
                "status": run["status"],
                "config": json.loads(run["config_json"]),
                "summary": json.loads(run["summary_json"] or "{}"),
                "inputs": [
                    {k: item[k] for k in ("role", "id", "kind", "name", "sha256")}
                    | {"meta": json.loads(item["meta_json"] or "{}"), "made_by": item["run_id"]}
                    for item in inputs
                ],
            }
        )

    visit(run_id)
    return runs


def ancestry(db: Database, artifact_id: int) -> dict[str, Any]:
    """How an artifact was made, for its model card: the artifact, the runs that made it and its
    inputs (oldest first), and the evaluate and benchmark runs that measured it or an ancestor.
    Configs hold no secrets (they travel in the environment)."""
    artifact = dict(db["artifacts"].get(artifact_id))
    runs = run_chain(db, artifact["run_id"])
    made = {artifact["id"]} | {i["id"] for run in runs for i in run["inputs"]}
    marks = ",".join("?" * len(made))
    measured = list(
        db.query(
            f"select distinct r.id, r.step, r.name, r.summary_json, i.artifact_id "
            f"from runs r join run_inputs i on i.run_id = r.id where i.artifact_id in ({marks}) "
            f"and r.status = 'succeeded' and r.deleted = 0 and r.step in "
            f"({','.join('?' * len(MEASURING_STEPS))}) order by r.id",
            [*made, *MEASURING_STEPS],
        )
    )
    artifact["meta"] = json.loads(artifact.pop("meta_json") or "{}")
    return {
        "artifact": artifact,
        "runs": runs,
        "measured": [
            {
                "id": m["id"],
                "step": m["step"],
                "name": m["name"],
                "of_this": m["artifact_id"] == artifact["id"],
                "summary": json.loads(m["summary_json"] or "{}"),
            }
            for m in measured
        ],
    }


def _size_and_hash(path: Path) -> tuple[int, str]:
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    digest, size = hashlib.sha256(), 0
    for file in files:
        if path.is_dir():
            digest.update(str(file.relative_to(path)).encode())
        with file.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
                size += len(chunk)
    return size, digest.hexdigest()
