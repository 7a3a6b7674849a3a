"""`posttrain services up|down|status`: a team's Prefect server and MLflow tracking server on PostgreSQL.

One existing PostgreSQL (`--database-url postgresql://user:pw@host:port/db`) holds two databases,
`<db>_prefect` and `<db>_mlflow`, created when missing. `up` starts `prefect server start` and
`mlflow server` (artifacts served from `<services dir>/mlartifacts`) as detached process groups,
waits until both answer their health checks, and records them in `<services dir>/services.json`;
`status` checks that record, `down` stops both groups. Runs then point at them with
`PREFECT_API_URL` and `--tracking-uri`; without them the embedded default (a temporary Prefect API,
SQLite under the state dir) is unchanged.

What it does not do: install or start PostgreSQL, manage users, or put the servers behind TLS or
authentication. Both bind loopback unless `--host` says otherwise.
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from flows.processes import alive, free_port, port_taken, start_ticks, stop_group

RECORD = "services.json"
SERVICES = ("prefect", "mlflow")
# Each server's own default port, taken when free: a run records its tracking URI, and `resume`
# finds the store again at the same address after a restart of the services.
DEFAULT_PORTS = {"prefect": 4200, "mlflow": 5000}
DEFAULT_TIMEOUT_S = 240.0  # both servers migrate a new database at their first start


class ServicesError(Exception):
    """Something `services` cannot do, said in one line (the CLI prints it as `error: ...`)."""


# ------------------------------------------------------------------------------------- the database


def parse_database_url(url: str):
    """A SQLAlchemy URL for a PostgreSQL database, whatever driver suffix it was given with."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        u = make_url(url)
    except ArgumentError:
        raise ServicesError(f"--database-url {mask(url)}: not a URL; give postgresql://user:password@host:port/db") from None
    if u.get_backend_name() not in ("postgresql", "postgres") or not u.database:
        raise ServicesError(f"--database-url {mask(url)}: give postgresql://user:password@host:port/db "
                            "(an existing PostgreSQL server; the database name is the prefix of the two it creates)")
    return u.set(drivername="postgresql")


def mask(url) -> str:
    """The URL with its password as `***`: what error messages and services.json may show."""
    import re

    from sqlalchemy.engine import URL, make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return (url if isinstance(url, URL) else make_url(url)).render_as_string(hide_password=True)
    except ArgumentError:  # not a URL at all: hide whatever sits between `user:` and `@`
        return re.sub(r"(//[^:/@]*:)[^@]*@", r"\1***@", str(url))


def service_databases(base) -> dict[str, object]:
    """{service: URL of its own database}: `<db>_prefect` and `<db>_mlflow` on the same server."""
    return {name: base.set(database=f"{base.database}_{name}") for name in SERVICES}


def _connect(u, database: str):
    import psycopg2

    return psycopg2.connect(host=u.host or "127.0.0.1", port=u.port or 5432, user=u.username,
                            password=u.password, dbname=database, connect_timeout=10)


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def ensure_databases(base) -> dict[str, object]:
    """Create the services' databases when missing, over a connection to the URL's own database (or,
    when that one does not exist, to the server's maintenance database `postgres`)."""
    try:
        import psycopg2
        from psycopg2 import errors, sql
    except ImportError:  # MLflow's server needs the same driver
        raise ServicesError("psycopg2 is not installed: pip install -e '.[services]' (PostgreSQL's driver for "
                            "MLflow's server)") from None

    dbs = service_databases(base)
    try:
        try:
            conn = _connect(base, base.database)
        except psycopg2.OperationalError as e:
            if f'database "{base.database}" does not exist' not in str(e):
                raise
            conn = _connect(base, "postgres")
    except psycopg2.OperationalError as e:
        raise ServicesError(f"cannot connect to PostgreSQL at {mask(base)}: {_first_line(e)}") from None
    conn.autocommit = True  # CREATE DATABASE cannot run inside a transaction
    try:
        with conn.cursor() as cur:
            for u in dbs.values():
                cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (u.database,))
                if cur.fetchone():
                    continue
                try:
                    cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(u.database)))
                except errors.InsufficientPrivilege:
                    names = " and ".join(d.database for d in dbs.values())
                    raise ServicesError(
                        f"role {base.username!r} may not create databases on {mask(base)} (it lacks CREATEDB): "
                        f"run `ALTER ROLE {base.username} CREATEDB` as a superuser, or create {names} "
                        f"owned by {base.username} yourself") from None
    finally:
        conn.close()
    return dbs


def healthy(url: str) -> bool:
    """The service's health endpoint answers 200 (Prefect: `true`, MLflow: `OK`)."""
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status == 200
    except OSError:
        return False


def _client_host(host: str) -> str:
    """The address a client on this machine uses for a server bound to `host` (IPv4)."""
    return "127.0.0.1" if host in ("0.0.0.0", "") else host


def commands(dirs: Path, host: str, ports: dict[str, int], dbs: dict) -> dict[str, dict]:
    """{service: argv, env, url, health URL, log}. Database URLs travel in the environment, not on the
    command line, where `ps` would show their passwords."""
    # A client's settings (where its API or store is) must not steer a server; the servers' own settings
    # pass through (MLFLOW_SERVER_ALLOWED_HOSTS for a --host other than loopback, say).
    base_env = {k: v for k, v in os.environ.items()
                if not k.startswith(("PREFECT_API_", "PREFECT_SERVER_DATABASE_", "PREFECT_HOME", "MLFLOW_TRACKING_"))}
    base_env.update(DO_NOT_TRACK="1", MLFLOW_DISABLE_TELEMETRY="true", PYTHONUNBUFFERED="1")
    client = _client_host(host)
    prefect_url = f"http://{client}:{ports['prefect']}"
    mlflow_url = f"http://{client}:{ports['mlflow']}"
    bin_dir = Path(sys.executable).parent
    return {
        "prefect": {
            "argv": [sys.executable, "-m", "prefect", "server", "start", "--host", host, "--port", str(ports["prefect"])],
            "env": dict(base_env, PREFECT_HOME=str(dirs / "prefect"), PREFECT_SERVER_ANALYTICS_ENABLED="false",
                        PREFECT_SERVER_DATABASE_CONNECTION_URL=dbs["prefect"].set(drivername="postgresql+asyncpg")
                        .render_as_string(hide_password=False)),
            "url": f"{prefect_url}/api", "ui": prefect_url, "health": f"{prefect_url}/api/health",
            "log": str(dirs / "prefect.log"), "database": mask(dbs["prefect"]),
        },
        "mlflow": {
            # one worker: the tracking API is light next to training, and the machine may have 2 cores
            "argv": [str(bin_dir / "mlflow"), "server", "--host", host, "--port", str(ports["mlflow"]),
                     "--workers", "1", "--serve-artifacts"],
            # MLflow's job runner (GenAI scorers, trace roll-ups; nothing posttrain logs) starts ~8
            # Huey worker processes: off.
            "env": dict(base_env, MLFLOW_BACKEND_STORE_URI=dbs["mlflow"].render_as_string(hide_password=False),
                        MLFLOW_ARTIFACTS_DESTINATION=str(dirs / "mlartifacts"),
                        MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false"),
            "url": mlflow_url, "ui": mlflow_url, "health": f"{mlflow_url}/health",
            "log": str(dirs / "mlflow.log"), "database": mask(dbs["mlflow"]),
        },
    }


# ------------------------------------------------------------------------------------------- record


def read_record(dirs: Path) -> dict | None:
    try:
        return json.loads((dirs / RECORD).read_text())
    except FileNotFoundError:
        return None
    except json.JSONDecodeError as e:
        raise ServicesError(f"{dirs / RECORD} is not valid JSON ({e}); remove it once no server from it runs") from None


def write_record(dirs: Path, record: dict) -> None:
    """Atomically: a reader never sees half a record."""
    tmp = dirs / f".{RECORD}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(record, indent=2))
    os.replace(tmp, dirs / RECORD)


def running(record: dict) -> dict[str, bool]:
    return {name: alive(s["pid"], s.get("start_ticks")) for name, s in record["services"].items()}


# ------------------------------------------------------------------------------------------ up/down


def _tail(log: str, n: int = 5) -> str:
    try:
        lines = Path(log).read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(line.strip() for line in lines[-n:])


def _wait_healthy(started: dict[str, dict], timeout: float) -> None:
    """Poll both health checks until they answer; a server that exits or stays silent past `timeout`
    fails with its log file named."""
    deadline = time.monotonic() + timeout
    waiting = dict(started)
    while waiting:
        for name, s in list(waiting.items()):
            if healthy(s["health"]):
                del waiting[name]
            elif s["proc"].poll() is not None:
                raise ServicesError(f"the {name} server exited ({s['proc'].returncode}) before answering "
                                    f"{s['health']}; its log {s['log']} ends: {_tail(s['log'])}")
        if waiting and time.monotonic() > deadline:
            name, s = next(iter(waiting.items()))
            raise ServicesError(f"the {name} server did not answer {s['health']} within {timeout:.0f} s; "
                                f"see its log {s['log']} (ends: {_tail(s['log'], 2)})")
        if waiting:
            time.sleep(0.5)


def up(dirs: Path, database_url: str, host: str = "127.0.0.1", prefect_port: int | None = None,
       mlflow_port: int | None = None, timeout: float = DEFAULT_TIMEOUT_S) -> dict:
    """Start both servers and return their record (also written to `<dirs>/services.json`)."""
    dirs.mkdir(parents=True, exist_ok=True)
    old = read_record(dirs)
    if old and any(running(old).values()):
        live = ", ".join(f"{n} pid {old['services'][n]['pid']} at {old['services'][n]['url']}"
                         for n, ok in running(old).items() if ok)
        raise ServicesError(f"services already running from {dirs / RECORD} ({live}); "
                            f"`posttrain services down --services-dir {dirs}` first")
    ports = {"prefect": prefect_port, "mlflow": mlflow_port}
    for name, port in ports.items():
        if port is not None and port_taken(host, port):
            raise ServicesError(f"--{name}-port {port}: something already listens on {host}:{port}")
    ports = {n: p if p is not None else (DEFAULT_PORTS[n] if not port_taken(host, DEFAULT_PORTS[n]) else free_port(host))
             for n, p in ports.items()}
    dbs = ensure_databases(parse_database_url(database_url))
    (dirs / "mlartifacts").mkdir(exist_ok=True)
    t0 = time.monotonic()
    started: dict[str, dict] = {}
    try:
        for name, c in commands(dirs, host, ports, dbs).items():
            with open(c["log"], "ab") as log:
                proc = subprocess.Popen(c["argv"], env=c["env"], cwd=dirs, stdin=subprocess.DEVNULL, stdout=log,
                                        stderr=subprocess.STDOUT, start_new_session=True)
            started[name] = dict(c, proc=proc)
        _wait_healthy(started, timeout)
    except BaseException:
        for s in started.values():
            stop_group(s["proc"].pid, timeout=10)
        raise
    record = {
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "startup_seconds": round(time.monotonic() - t0, 1), "host": host, "services_dir": str(dirs),
        "artifacts": str(dirs / "mlartifacts"), "database": mask(database_url),
        "services": {name: {"pid": s["proc"].pid, "start_ticks": start_ticks(s["proc"].pid),
                            **{k: s[k] for k in ("url", "ui", "health", "log", "database")}}
                     for name, s in started.items()},
    }
    write_record(dirs, record)
    return record


def status(dirs: Path) -> dict | None:
    """The record with each service's `alive` and `healthy` filled in; None when nothing was started."""
    record = read_record(dirs)
    if record is None:
        return None
    for name, ok in running(record).items():
        s = record["services"][name]
        s["alive"], s["healthy"] = ok, ok and healthy(s["health"])
    return record


def down(dirs: Path, timeout: float = 20.0) -> dict | None:
    """Stop both servers' process groups and remove the record; None when nothing was started."""
    record = read_record(dirs)
    if record is None:
        return None
    for name, ok in running(record).items():
        if ok:
            stop_group(record["services"][name]["pid"], timeout)
    (dirs / RECORD).unlink(missing_ok=True)
    return record


def usage_lines(record: dict) -> list[str]:
    """What `up` prints: the URLs, and the exact lines that point a run at these servers."""
    p, m = record["services"]["prefect"], record["services"]["mlflow"]
    return [
        f"Prefect server  {p['url']}  (UI {p['ui']}; database {p['database']}; log {p['log']})",
        f"MLflow server   {m['url']}  (UI the same; database {m['database']}; artifacts {record['artifacts']}; "
        f"log {m['log']})",
        f"started in {record['startup_seconds']} s; record {Path(record['services_dir']) / RECORD}",
        "Point runs at them:",
        f"  export PREFECT_API_URL={p['url']}",
        f"  posttrain run --tracking-uri {m['url']}",
        f"  posttrain lineage MODEL --tracking-uri {m['url']}",
        f"Stop them: posttrain services down --services-dir {record['services_dir']}",
    ]


# ------------------------------------------------------------------------------------------- the CLI


def services_parser(sub) -> None:
    """`posttrain services up|status|down` and their options, on the CLI's subcommand parsers."""
    services = sub.add_parser("services", help="start, check or stop a Prefect server and an MLflow server on PostgreSQL")
    actions = services.add_subparsers(dest="action", required=True)
    up = actions.add_parser("up", help="start both servers (detached) and print how to point runs at them")
    up.add_argument("--database-url", default=os.environ.get("POSTTRAIN_DATABASE_URL"),
                    metavar="postgresql://USER:PW@HOST:PORT/DB",
                    help="an existing PostgreSQL server; DB_prefect and DB_mlflow are created there when missing "
                         "(default: $POSTTRAIN_DATABASE_URL)")
    up.add_argument("--host", default="127.0.0.1", help="address both servers bind (default: loopback)")
    up.add_argument("--prefect-port", type=int, default=None, help="default: 4200 when free, else a free port")
    up.add_argument("--mlflow-port", type=int, default=None, help="default: 5000 when free, else a free port")
    up.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, metavar="SECONDS",
                    help=f"how long to wait for both health checks (default {DEFAULT_TIMEOUT_S:.0f})")
    for name, p in (("up", up), ("status", actions.add_parser("status", help="are both servers alive and healthy")),
                    ("down", actions.add_parser("down", help="stop both servers and remove services.json"))):
        p.add_argument("--services-dir", default=None,
                       help="their logs, Prefect home, artifacts and services.json (default: <state dir>/services)")
        p.add_argument("--state-dir", default=None, help="project state dir (default: $POSTTRAIN_HOME or ./.posttrain)")
        if name == "status":
            p.add_argument("--json", action="store_true", help="print the record as JSON")


def services_command(args) -> int:
    """Exit 0 when the servers are up (or were stopped, or nothing ran for `down`); 1 when `status`
    finds them not both alive and healthy; 2 for an error, said in one `error:` line."""
    from flows.state import resolve_state_dir

    dirs = (Path(args.services_dir).expanduser().resolve() if args.services_dir
            else resolve_state_dir(args.state_dir) / "services")
    try:
        return {"up": _up_command, "status": _status_command, "down": _down_command}[args.action](args, dirs)
    except ServicesError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _up_command(args, dirs: Path) -> int:
    if not args.database_url:
        raise ServicesError("no PostgreSQL to use: pass --database-url postgresql://USER:PW@HOST:PORT/DB "
                            "(or set POSTTRAIN_DATABASE_URL)")
    record = up(dirs, args.database_url, args.host, args.prefect_port, args.mlflow_port, args.timeout)
    print("\n".join(usage_lines(record)))
    return 0


def _status_command(args, dirs: Path) -> int:
    record = status(dirs)
    if record is None:
        print(f"no services running: no {dirs / RECORD} (`posttrain services up` starts them)")
        return 1
    if args.json:
        print(json.dumps(record, indent=2))
    else:
        for name, s in record["services"].items():
            state = "healthy" if s["healthy"] else ("alive, not answering" if s["alive"] else "not running")
            print(f"{name:8s} {state:22s} {s['url']}  pid {s['pid']}  log {s['log']}")
    return 0 if all(s["healthy"] for s in record["services"].values()) else 1


def _down_command(args, dirs: Path) -> int:
    record = down(dirs)
    print(f"no services running: no {dirs / RECORD}" if record is None else
          "stopped " + ", ".join(f"{n} (pid {s['pid']})" for n, s in record["services"].items()))
    return 0
