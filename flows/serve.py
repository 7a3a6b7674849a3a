"""`posttrain serve`: every deployment of `deployments/prefect.yaml`, served from one process.

`prefect.yaml` stays the one source of truth: this module reads its deployments (name, parameters,
schedules, tags, description) and hands them to `prefect.serve` as `post_train.to_deployment(...)`.
No work pool or worker is needed; the serving process polls the API and runs each flow run in a
subprocess of its own, one at a time by default (stages share the state dir and the CPU).

It does not build, push or pull anything: the flow runs from this checkout. Serve either this way or
through the work pool, not both on one server under the same names: a served deployment that was
first deployed to the pool keeps that deployment's storage settings, and its runs crash before the
flow starts (measured with Prefect 3.8.8: FileNotFoundError '<cwd>/None').
"""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
PREFECT_YAML = REPO_ROOT / "deployments" / "prefect.yaml"
FLOW_ENTRYPOINT = "flows/post_train.py:post_train"


class ServeError(ValueError):
    """A deployment definition this command cannot serve, or an unknown `--only` name."""


def load_deployments(path: Path = PREFECT_YAML) -> list[dict[str, Any]]:
    """The deployments of the `post-train` flow as plain dicts, in file order."""
    doc = yaml.safe_load(Path(path).read_text()) or {}
    out = []
    for d in doc.get("deployments") or []:
        if d.get("entrypoint", FLOW_ENTRYPOINT) != FLOW_ENTRYPOINT:
            continue  # another flow: not ours to serve
        out.append(d)
    return out


def select(deployments: list[dict], only: list[str] | None) -> list[dict]:
    if not only:
        return deployments
    names = [d["name"] for d in deployments]
    unknown = [n for n in only if n not in names]
    if unknown:
        raise ServeError(f"unknown deployment(s) {', '.join(unknown)}; known: {', '.join(names)}")
    return [d for d in deployments if d["name"] in only]


def schedule_kwargs(d: dict, interval: float | None = None) -> dict[str, Any]:
    """`to_deployment` schedule arguments for one definition.

    `interval` replaces the schedule of every served deployment and gives one to those that run on
    demand (tests and demos: a nightly or smoke run fires within seconds).
    """
    if interval is not None:
        return {"interval": datetime.timedelta(seconds=interval)}
    schedules = d.get("schedules") or []
    if not schedules:
        return {}
    crons = [s for s in schedules if s.get("cron")]
    intervals = [s for s in schedules if s.get("interval")]
    if len(crons) + len(intervals) != len(schedules):
        raise ServeError(f"deployment {d['name']!r}: only cron and interval schedules are served")
    kw: dict[str, Any] = {}
    if crons:
        from prefect.schedules import Cron

        kw["schedules"] = [Cron(s["cron"], timezone=s.get("timezone") or "UTC") for s in crons]
    if intervals:
        from prefect.schedules import Interval

        kw.setdefault("schedules", []).extend(
            Interval(datetime.timedelta(seconds=float(s["interval"])), timezone=s.get("timezone") or "UTC")
            for s in intervals)
    return kw


def deployment_parameters(d: dict, state_dir: str, tracking_uri: str | None) -> dict[str, Any]:
    params = dict(d.get("parameters") or {})
    params["state_dir"] = state_dir
    if tracking_uri:
        params["tracking_uri"] = tracking_uri
    return params


def serve(state_dir: str, only: list[str] | None = None, interval: float | None = None,
          tracking_uri: str | None = None, limit: int = 1, path: Path = PREFECT_YAML) -> None:
    """Blocks until SIGTERM/SIGINT. Prefect must be importable with its settings already in place."""
    from prefect import serve as prefect_serve

    from flows.post_train import post_train

    chosen = select(load_deployments(path), only)
    runner_deployments = [
        post_train.to_deployment(
            name=d["name"], parameters=deployment_parameters(d, state_dir, tracking_uri),
            description=d.get("description"), tags=d.get("tags"), **schedule_kwargs(d, interval),
        )
        for d in chosen
    ]
    prefect_serve(*runner_deployments, limit=limit)
