"""A sweep folder's identity, its driver lock and the checks made before anything is written.

``<storage>/<name>/sweep.json`` is written when a sweep is created and names it for good:

- ``sweep_id``: a random id, tagged on every MLflow run of the sweep (``cxrtune.sweep_id``), so two
  sweeps of one name (another ``--storage``, one tracking store) never share or touch each
  other's runs;
- ``record``: the data, profile and other arguments the sweep was created with; ``--resume``
  takes them from here, and refuses arguments that differ;
- ``tracking_uri``: the MLflow store its runs live in (``--resume --tracking-uri`` moves it).

One driver owns a sweep folder at a time: :func:`hold_driver_lock` takes an exclusive
``filelock`` on ``<sweep>/.driver.lock`` for the driver's lifetime (the OS releases it when the
process dies, so a dead driver never leaves a stale lock) and writes the holder's host and process
id beside it for the message a second driver gets.

No Ray import: the export, the reports and the tests read this module too.
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping

from cxrtune.errors import CxrtuneError
from cxrtune.sweepfolder import HOLDER_FILE, INPUTS_FILE, LOCK_FILE, SWEEP_FILE, SweepFolder

#: 2: a trial's config holds its method's block only and the in-loop probe's probe.* keys
#: (format 1 sweeps carried every method's keys and trial.probe_*): a format 1 sweep is not resumed
FORMAT = 2

#: lock paths this process holds (a driver that calls run_sweep after taking the lock itself)
_held: set[str] = set()


class SweepBusyError(CxrtuneError):
    """Another live driver holds the sweep folder's lock."""


def _atomic_write_json(path: Path, data: Mapping[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as out:
            json.dump(data, out, indent=2, sort_keys=True, default=str)
            out.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# -- storage ------------------------------------------------------------------------------------
def check_storage(storage: str | os.PathLike, flag: str = "--storage") -> Path:
    """The storage folder, resolved; refused when it is a file, or not writable (probed by
    writing, which also catches a read-only mount)."""
    path = Path(storage).expanduser()
    try:
        path = path.resolve()
    except (OSError, RuntimeError) as err:
        raise CxrtuneError(f"{flag} {storage}: cannot resolve the path ({err}); pass a folder") from err
    if path.exists() and not path.is_dir():
        raise CxrtuneError(f"{flag} {storage} is a file, not a folder: pass a folder where sweeps can live "
                           "(it is created if missing)")
    probe_dir = path
    while not probe_dir.exists():
        probe_dir = probe_dir.parent
    if not probe_dir.is_dir():
        raise CxrtuneError(f"{flag} {storage}: {probe_dir} is a file, not a folder; pass a folder")
    try:
        fd, tmp = tempfile.mkstemp(prefix=".cxrtune-write-probe.", dir=probe_dir)
        os.close(fd)
        os.unlink(tmp)
    except OSError as err:
        raise CxrtuneError(f"{flag} {storage}: {probe_dir} is not writable ({err.strerror or err}); "
                           "pass a folder this user can write to") from err
    return path


# -- tracking -----------------------------------------------------------------------------------
def check_tracking(uri: str, timeout_s: float = 5.0) -> None:
    """Fail in seconds, naming the URI, when the MLflow store cannot be reached or created.

    ``http(s)://``: the server's ``/health`` must answer within ``timeout_s`` (MLflow's own
    client retries for minutes first). ``sqlite:///PATH``: the folder must exist and be writable,
    and the store is created here under a file lock, so two drivers starting on one new
    ``mlflow.db`` do not both run its schema migration. Other schemes are not checked.
    """
    parsed = urllib.parse.urlparse(uri)
    if parsed.scheme in ("http", "https"):
        url = uri.rstrip("/") + "/health"
        try:
            with urllib.request.urlopen(url, timeout=timeout_s) as reply:  # noqa: S310 - user's own server
                reply.read(64)
        except urllib.error.HTTPError as err:
            if err.code >= 500:
                raise CxrtuneError(f"tracking server {uri} answered {err.code} at /health; check the server, or "
                                   "pass --tracking-uri sqlite:///mlflow.db") from err
        except (urllib.error.URLError, OSError, ValueError) as err:
            reason = getattr(err, "reason", err)
            raise CxrtuneError(f"tracking server {uri} is unreachable ({reason}); start it, or pass another "
                               "--tracking-uri (e.g. sqlite:///mlflow.db)") from err
        return
    if parsed.scheme == "sqlite":
        db = sqlite_path(uri)
        if db is None:
            return  # in-memory
        if db.exists() and db.is_dir():
            raise CxrtuneError(f"tracking URI {uri}: {db} is a folder; name a database file")
        if not db.parent.is_dir():
            raise CxrtuneError(f"tracking URI {uri}: folder {db.parent} does not exist; create it or "
                               "pass another --tracking-uri")
        create_sqlite_store(uri)


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (``None`` for an in-memory store)."""
    rest = uri[len("sqlite://"):]
    if rest in ("", "/", "/:memory:"):
        return None
    return Path(rest[1:] if rest.startswith("/") else rest).expanduser().absolute()


def create_sqlite_store(uri: str) -> None:
    """Create (or open) an MLflow SQLite store with one process at a time."""
    from filelock import FileLock

    db = sqlite_path(uri)
    if db is None:
        return
    with FileLock(str(db) + ".lock", timeout=300):
        from mlflow.tracking import MlflowClient

        try:
            MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
        except Exception as err:  # noqa: BLE001 - named for the user below
            raise CxrtuneError(f"tracking URI {uri}: cannot open the MLflow store ({type(err).__name__}: "
                               f"{str(err).splitlines()[0] if str(err) else ''})") from err


# -- the driver lock ----------------------------------------------------------------------------
def _holder(folder: Path) -> dict[str, Any]:
    try:
        return json.loads((folder / HOLDER_FILE).read_text())
    except (OSError, ValueError):
        return {}


@contextmanager
def hold_driver_lock(folder: str | os.PathLike) -> Iterator[None]:
    """Hold ``<folder>/.driver.lock`` until the block ends; refuse at once if a live driver holds it.

    Re-entrant within one process (the sweep CLI takes it, then the runner asks again).
    """
    from filelock import FileLock, Timeout

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = str((folder / LOCK_FILE).resolve())
    if path in _held:
        yield
        return
    lock = FileLock(path, timeout=0, is_singleton=False)
    try:
        lock.acquire()
    except Timeout:
        holder = _holder(folder)
        who = (f"process {holder.get('pid', '?')} on host {holder.get('host', '?')}, started "
               f"{holder.get('started', '?')}" if holder else "another process")
        raise SweepBusyError(f"sweep folder {folder} is in use by {who}: one driver runs a sweep at a time; "
                             "wait for it to finish (or stop it), or choose another --name") from None
    _held.add(path)
    try:
        _atomic_write_json(folder / HOLDER_FILE, {"host": socket.gethostname(), "pid": os.getpid(),
                                                  "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
        yield
    finally:
        _held.discard(path)
        (folder / HOLDER_FILE).unlink(missing_ok=True)
        lock.release()


# -- fixed inputs -------------------------------------------------------------------------------
def write_inputs(folder: str | os.PathLike, inputs: Mapping[str, Any]) -> None:
    """The data a sweep's trials read (caches, episodes, source names): given to the trainable
    with ``tune.with_parameters``, not searched or logged as a trial's params, and kept here for
    the analysis."""
    _atomic_write_json(Path(folder) / INPUTS_FILE, inputs)


def read_inputs(folder: str | os.PathLike) -> dict[str, Any]:
    return SweepFolder(folder).read_inputs()


# -- identity -----------------------------------------------------------------------------------
def read_identity(folder: str | os.PathLike) -> dict[str, Any] | None:
    path = Path(folder) / SWEEP_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise CxrtuneError(f"{path} is unreadable ({err}); it names the sweep, so restore it from a backup or "
                           "start a new sweep with --name") from err
    if not isinstance(data, dict) or "sweep_id" not in data:
        raise CxrtuneError(f"{path} holds no sweep_id; start a new sweep with --name")
    return data


def create_identity(folder: str | os.PathLike, name: str, record: Mapping[str, Any], tracking_uri: str) -> dict[str, Any]:
    """Write ``sweep.json`` for a new sweep (a fresh id, the record, the tracking URI)."""
    identity = {"format": FORMAT, "sweep_id": uuid.uuid4().hex, "name": name,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "record": dict(record),
                "tracking_uri": tracking_uri}
    _atomic_write_json(Path(folder) / SWEEP_FILE, identity)
    return identity


def check_resumable(folder: str | os.PathLike, identity: Mapping[str, Any]) -> None:
    """Refuse to resume a sweep whose trial configs this version cannot run."""
    made = identity.get("format", 1)
    if made < FORMAT:
        raise CxrtuneError(
            f"sweep {identity.get('name', Path(folder).name)!r} in {folder} was made by an earlier version of cxrtune "
            f"(sweep format {made}; this version writes {FORMAT}): its trials' configs hold keys this version no longer "
            "has (every method's block, trial.probe_*), so it cannot be resumed. Start a new sweep with --name; its "
            "trials, export and report stay readable where they are")


def update_identity(folder: str | os.PathLike, identity: Mapping[str, Any]) -> None:
    _atomic_write_json(Path(folder) / SWEEP_FILE, identity)


def resume_record(recorded: Mapping[str, Any], given: Mapping[str, Any], resume_hint: str) -> dict[str, Any]:
    """The arguments a resumed sweep runs with: the recorded ones, with every argument the user
    gave again (not ``None``) checked against them; a difference is refused, showing both."""
    differing = {k: v for k, v in given.items() if v is not None and k in recorded and recorded[k] != v}
    if differing:
        shown = "; ".join(f"{k}: recorded {recorded[k]!r}, given {v!r}" for k, v in differing.items())
        raise CxrtuneError(f"--resume continues the sweep with the arguments it was created with, and these "
                           f"differ: {shown}. Leave them out (the recorded ones are used), or start a new sweep "
                           f"with --name. {resume_hint}".rstrip())
    merged = dict(recorded)
    for key, value in given.items():
        if key not in merged:
            merged[key] = value
    return merged
