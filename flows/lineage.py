"""`posttrain lineage`: walk a model back to its base checkpoint through the MLflow stage runs, and
check every recorded digest against the files on disk.

Each stage run carries the lineage tags written by `tasks.common.lineage_tags` (stage, cache key,
inputs with digests, upstream runs, code version, Prefect ids) plus its output's digest and path. A
cache-hit run names the run that produced the result (`posttrain.cached_from_run`); the walk follows
it, so the chain always lists producing runs. The walk follows every input, so a node with several
parents (a distilled student: its own base, and the teacher through the samples) lists them all; each
branch ends at a `fetch`, the one kind with no inputs.

What a chain can start from: an output dir, a digest (`sha256:…`), a stage run id, a registry URI
(`models:/name/version`), a flow's MLflow parent run id, or a Prefect flow-run id (via the run
records). It reads MLflow and the disk; it writes nothing.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from data_contracts.artifacts import EXTERNAL_KINDS, digest_path

NOT_IN_CHAIN = ("evaluate",)  # evaluation runs hang off a checkpoint; nothing downstream reads them


class LineageError(Exception):
    """The start of the chain could not be found (exit 2); a broken chain is reported, not raised."""


@dataclass
class StageRecord:
    stage: str
    mlflow_run_id: str
    cache_key: str | None
    code_version: str | None
    prefect_flow_run_id: str | None
    prefect_task_run_id: str | None
    output_path: str | None
    output_digest: str | None
    inputs: list[dict] = field(default_factory=list)
    upstream_runs: list[str] = field(default_factory=list)
    reached_via_cache_hit: str | None = None  # the cache-hit run the walk came through, if any
    status: str | None = None
    kind: str | None = None  # the node's stage kind (its name when the run predates named nodes)


def _tag_json(tags: dict, key: str, default):
    try:
        return json.loads(tags.get(key) or "null") or default
    except json.JSONDecodeError:
        return default


def _pick(runs: list[dict]) -> dict | None:
    """Prefer the run that produced an output over cache hits that merely point at it."""
    producers = [r for r in runs if not r["tags"].get("posttrain.cached_from_run")]
    return (producers or runs or [None])[-1]


def resolve_start(reader, target: str, state_dir: str | None = None) -> str:
    """The MLflow run id of the stage run that produced `target`."""
    if target.startswith("models:/"):
        name, _, version = target.removeprefix("models:/").rpartition("/")
        mv = reader.model_version(name, version) if name else None
        if mv is None or not mv["run_id"]:
            raise LineageError(f"no registered model version {target} in the store {reader.uri}")
        return mv["run_id"]
    if target.startswith("sha256:"):
        hit = _pick(reader.runs_tagged("posttrain.output_digest", target))
        if hit is None:
            raise LineageError(f"no stage run recorded an output with digest {target}")
        return hit["run_id"]
    p = Path(target).expanduser()
    if p.exists():
        hit = _pick(reader.runs_tagged("posttrain.output_path", str(p.resolve())))
        if hit is None:
            hit = _pick(reader.runs_tagged("posttrain.output_digest", digest_path(p)))
        if hit is None:
            raise LineageError(f"no stage run recorded {p.resolve()} (or its digest) as its output")
        return hit["run_id"]
    run = reader.run(target)
    if run is None and state_dir:  # a Prefect flow-run id: its run record names the MLflow parent
        from flows.runs import find_run

        rec = find_run(state_dir, target)
        if rec and rec.get("mlflow_parent_run_id"):
            run = reader.run(rec["mlflow_parent_run_id"])
    if run is None:
        raise LineageError(f"{target!r} is not an output path, a digest, a models:/ URI or a run id in {reader.uri}")
    if run["tags"].get("posttrain.kind") == "flow":
        return _final_stage_run(reader, run)
    if not run["tags"].get("posttrain.stage"):
        raise LineageError(f"run {target} has no posttrain.stage tag: not a posttrain stage run")
    return run["run_id"]


def _final_stage_run(reader, parent: dict) -> str:
    from models.stages import STAGE_KINDS

    if parent["tags"].get("posttrain.final_run_id"):  # the run of the model the flow registered
        return parent["tags"]["posttrain.final_run_id"]
    children = reader.runs_tagged("mlflow.parentRunId", parent["run_id"])
    models = [c for c in children if STAGE_KINDS.get(c["tags"].get("posttrain.stage", "")) == "checkpoint"]
    if not models:
        raise LineageError(f"flow run {parent['run_id']} has no stage run that made a checkpoint")
    return models[-1]["run_id"]


def walk(reader, start_run_id: str) -> tuple[list[StageRecord], list[str]]:
    """Stage records, base first (a topological order of the DAG), and the broken links found."""
    records: list[StageRecord] = []
    problems: list[str] = []
    done: set[str] = set()

    def visit(run_id: str, needed_by: str) -> None:
        if run_id in done:
            return
        done.add(run_id)
        run = reader.run(run_id)
        if run is None:
            problems.append(f"stage {needed_by!r}: its upstream MLflow run {run_id} is missing from {reader.uri}")
            return
        via = None
        producer_id = run["tags"].get("posttrain.cached_from_run")
        if producer_id:
            via, run = run_id, reader.run(producer_id)
            if run is None:
                stage = reader.run(via)["tags"].get("posttrain.stage")
                problems.append(f"stage {stage!r}: cache-hit run {via} names producing run {producer_id}, "
                                f"which is missing from {reader.uri}")
                return
            if run["run_id"] in done:
                return
            done.add(run["run_id"])
        tags = run["tags"]
        rec = StageRecord(
            stage=tags.get("posttrain.stage", "?"), mlflow_run_id=run["run_id"], status=run["status"],
            cache_key=tags.get("posttrain.cache_key"), code_version=tags.get("posttrain.code_version"),
            prefect_flow_run_id=tags.get("posttrain.prefect_flow_run_id"),
            prefect_task_run_id=tags.get("posttrain.prefect_task_run_id"),
            output_path=tags.get("posttrain.output_path"), output_digest=tags.get("posttrain.output_digest"),
            inputs=_tag_json(tags, "posttrain.inputs", []), upstream_runs=_tag_json(tags, "posttrain.upstream_runs", []),
            reached_via_cache_hit=via,
            kind=tags.get("posttrain.stage_kind") or tags.get("posttrain.stage", "?"),
        )
        upstream = [i["run_id"] for i in rec.inputs if i.get("run_id")]
        upstream += [r for r in rec.upstream_runs if r not in upstream]
        for i in rec.inputs:
            if i.get("kind") not in EXTERNAL_KINDS and not i.get("run_id"):
                problems.append(f"stage {rec.stage!r}: input {i.get('name')!r} ({i.get('path')}) names no producing run")
        if rec.kind != "fetch" and not rec.inputs:
            problems.append(f"stage {rec.stage!r} (run {rec.mlflow_run_id}) records no inputs: the chain stops "
                            "before the base checkpoint")
        for up in upstream:
            visit(up, rec.stage)
        records.append(rec)

    visit(start_run_id, "start")
    return records, problems


def _file_sha256(p: Path) -> str:
    h = hashlib.sha256()
    with open(p, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _changed_files(reader, rec: StageRecord) -> list[str]:
    """Files of a directory output that differ from the copy logged as the run's `model` artifact."""
    try:
        logged = reader.artifact_dir(rec.mlflow_run_id, "model")
    except Exception:  # noqa: BLE001 - no copy to compare with
        logged = None
    if logged is None:
        return []
    out = Path(rec.output_path)
    disk = {f.relative_to(out).as_posix() for f in out.rglob("*") if f.is_file() and not _hidden(f, out)}
    copy = {f.relative_to(logged).as_posix() for f in logged.rglob("*") if f.is_file() and not _hidden(f, logged)}
    changed = sorted(r for r in disk & copy if _file_sha256(out / r) != _file_sha256(logged / r))
    return [str(out / r) for r in changed] + [f"{out / r} (missing)" for r in sorted(copy - disk)] + \
        [f"{out / r} (new)" for r in sorted(disk - copy)]


def _hidden(f: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in f.relative_to(root).parts)


def _check(path: str | None, digest: str | None) -> str | None:
    """None when the path still has the digest, else what is wrong."""
    if not path or not digest:
        return "no path or digest recorded"
    if not Path(path).exists():
        return f"{path} is missing"
    actual = digest_path(path)
    return None if actual == digest else f"{path}: digest {actual} no longer matches the recorded {digest}"


def verify(reader, records: list[StageRecord]) -> list[str]:
    """Every stage output and every dataset or source input against its recorded digest."""
    problems: list[str] = []
    seen: set[tuple[str, str]] = set()
    for rec in records:
        wrong = _check(rec.output_path, rec.output_digest)
        if wrong:
            files = _changed_files(reader, rec) if rec.output_path and Path(rec.output_path).is_dir() else []
            where = f" (changed: {', '.join(files)})" if files else ""
            problems.append(f"stage {rec.stage!r} (run {rec.mlflow_run_id}): output {wrong}{where}")
        seen.add((rec.output_path or "", rec.output_digest or ""))
        for i in rec.inputs:
            key = (i.get("path") or "", i.get("digest") or "")
            if i.get("kind") not in EXTERNAL_KINDS or key in seen:
                continue
            seen.add(key)
            wrong = _check(i.get("path"), i.get("digest"))
            if wrong:
                problems.append(f"stage {rec.stage!r} (run {rec.mlflow_run_id}): input {i.get('name')!r} {wrong}")
    return problems


def lineage(target: str, tracking_uri: str, state_dir: str | None = None) -> dict:
    """{"start": target, "start_run_id", "stages": [StageRecord as dict, base first], "problems": [...]}."""
    from tasks.tracking import RunReader

    reader = RunReader(tracking_uri)
    start = resolve_start(reader, target, state_dir)
    records, problems = walk(reader, start)
    records = [r for r in records if not r.stage.startswith(NOT_IN_CHAIN)]
    if records and records[0].kind != "fetch":
        problems.append(f"the chain ends at stage {records[0].stage!r}, not at the base checkpoint (fetch)")
    problems += verify(reader, records)
    return {"start": target, "start_run_id": start, "stages": [asdict(r) for r in records], "problems": problems}


def format_chain(result: dict) -> str:
    lines = [f"lineage of {result['start']} (stage run {result['start_run_id']}), base first:"]
    for i, s in enumerate(result["stages"]):
        via = f"  (reached via cache hit {s['reached_via_cache_hit']})" if s["reached_via_cache_hit"] else ""
        kind = f" ({s['kind']})" if s.get("kind") and s["kind"] != s["stage"] else ""
        lines.append(f"{i + 1}. {s['stage']}{kind}  mlflow run {s['mlflow_run_id']} [{s['status']}]{via}")
        lines.append(f"     config hash (cache key) {s['cache_key']}   code {s['code_version']}")
        lines.append(f"     prefect flow run {s['prefect_flow_run_id'] or '-'}  task run {s['prefect_task_run_id'] or '-'}")
        lines.append(f"     output {s['output_digest']}  {s['output_path']}")
        for inp in s["inputs"]:
            lines.append(f"     input {inp.get('name')} ({inp.get('kind')}) {inp.get('digest')}  {inp.get('path')}"
                         + (f"  from run {inp['run_id']}" if inp.get("run_id") else ""))
    lines.append("all recorded digests match the files on disk" if not result["problems"]
                 else f"{len(result['problems'])} problem(s):")
    lines += [f"  - {p}" for p in result["problems"]]
    return "\n".join(lines)
