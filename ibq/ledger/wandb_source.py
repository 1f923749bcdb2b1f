"""Runs of a sweep read back from the W&B API (`--source wandb`), and the online check that comes first:
credentials, then one GraphQL request (who am I?) with a short timeout, so that a machine without
credentials or network gets one clear line instead of a hang in the client's retries. A TCP connection
alone proves nothing: sandboxes and proxies accept connections to any address."""

from __future__ import annotations

import base64
import json
import netrc
import os
import threading
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

from ibq.config import one_line
from ibq.errors import UserError
from ibq.ledger.runs import Run, flatten

PROBE_TIMEOUT_S = 3.0
API_TIMEOUT_S = 30
# W&B run states -> run.json statuses
STATES = {"finished": "completed", "running": "running", "crashed": "failed", "failed": "failed", "killed": "failed", "preempted": "preempted", "preempting": "preempted"}


def base_url() -> str:
    return os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")


def api_key(url: str) -> str | None:
    if os.environ.get("WANDB_API_KEY"):
        return os.environ["WANDB_API_KEY"]
    path = os.environ.get("NETRC") or str(Path.home() / ".netrc")
    try:
        entry = netrc.netrc(path).authenticators(urlparse(url).hostname)
    except (OSError, netrc.NetrcParseError):
        return None
    return entry[2] if entry else None


def probe(url: str, key: str) -> str | None:
    """None when W&B at `url` answers a GraphQL query with this key; otherwise what went wrong."""
    request = urllib.request.Request(
        url.rstrip("/") + "/graphql",
        data=json.dumps({"query": "query { viewer { id } }"}).encode(),
        headers={"Content-Type": "application/json", "Authorization": "Basic " + base64.b64encode(f"api:{key}".encode()).decode()},
    )
    try:
        with urllib.request.urlopen(request, timeout=PROBE_TIMEOUT_S) as response:
            answer = json.load(response)
    except urllib.error.HTTPError as error:
        refused = " (the API key was refused)" if error.code in (401, 403) else ""
        return f"W&B at {url} answered HTTP {error.code}{refused}"
    except (urllib.error.URLError, OSError, ValueError) as error:
        return f"W&B at {url} cannot be reached ({getattr(error, 'reason', error)})"
    if not (answer.get("data") or {}).get("viewer"):
        return f"W&B at {url} did not accept the API key"
    return None


def online_problem() -> str | None:
    """Why the W&B API cannot be used from here, or None when it can."""
    url = base_url()
    key = api_key(url)
    if not key:
        return f"no W&B credentials for {url} (set WANDB_API_KEY or run `wandb login`)"
    answer = []
    # the request's timeout does not cover the name lookup, which can hang without a network
    worker = threading.Thread(target=lambda: answer.append(probe(url, key)), daemon=True)
    worker.start()
    worker.join(PROBE_TIMEOUT_S * 2)
    if not answer:
        return f"W&B at {url} cannot be reached (no answer within {PROBE_TIMEOUT_S * 2:.0f} s)"
    return answer[0]


def require_online(purpose: str) -> None:
    problem = online_problem()
    if problem:
        raise UserError(f"{purpose}: {problem}; read the runs from disk instead (leave out --source wandb)")


def to_run(api_run, evaluations: list = ()) -> Run:
    """A training run; the summaries of its evaluations' W&B runs (job_type eval/sample, oldest step first) are
    merged into its results, as ibq-eval merges them into results.json."""
    config = {k: v for k, v in dict(api_run.config).items() if not k.startswith("_")}
    choices = {k: str(v) for k, v in (config.pop("choices", None) or {}).items() if v is not None}
    summary = {k: v for k, v in dict(api_run.summary).items() if not k.startswith("_")}
    for evaluation in evaluations:
        summary.update({k: v for k, v in dict(evaluation.summary).items() if not k.startswith("_")})
    status = STATES.get(api_run.state, api_run.state)
    return Run(
        name=api_run.name,
        location=f"{api_run.entity}/{api_run.project}/{api_run.id}",
        status=status,
        signature=api_run.id,  # ibq's W&B run id is the run's signature
        choices=choices,
        config=flatten(config),
        results=summary if status == "completed" and summary else None,
        record={"error": None if status != "failed" else f"W&B state {api_run.state}", "wandb": {"group": api_run.group}},
    )


def grouped_runs(api_runs) -> list[Run]:
    """The training runs of a group, each with its evaluations (the runs whose config names it as train_run_id)."""
    trained = [r for r in api_runs if not r.config.get("train_run_id")]
    evaluations = sorted((r for r in api_runs if r.config.get("train_run_id")), key=lambda r: r.config.get("evaluated_step") or 0)
    return [to_run(r, [e for e in evaluations if e.config["train_run_id"] == r.id]) for r in trained]


def wandb_runs(group: str, project: str, entity: str | None) -> list[Run]:
    require_online("--source wandb")
    import wandb

    path = f"{entity}/{project}" if entity else project
    try:
        api = wandb.Api(timeout=API_TIMEOUT_S)
        runs = grouped_runs(list(api.runs(path, filters={"group": group})))
    except Exception as error:  # the client raises many types (auth, HTTP, value errors)
        reason = one_line(str(error)) or type(error).__name__
        raise UserError(f"--source wandb: the W&B API failed for {path}, group {group!r}: {reason}") from None
    if not runs:
        raise UserError(f"--source wandb: W&B project {path} has no runs in group {group!r}")
    return runs
