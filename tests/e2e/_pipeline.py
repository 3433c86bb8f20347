"""Helpers for the e2e tests that run the whole DVC pipeline in a copy of the project.

- `write_tiny_params`: the real params.yaml with a tiny model, 2 epochs and short evaluation
  (outputs and dvc.lock copied from the real project removed first).
- `pipeline_env`: the environment DVC and the stages run in (this venv, the copy's code, the
  loopback mirror, no MLFLOW_TRACKING_URI so the copy's own mlruns/mlflow.db is used).
- `run_ok` / `dvc`: run a command, fail with the tail of its output unless it exits 0.
- `declared_outputs`: every out, metric and plot of dvc.yaml, templated from params.yaml.
- `commit_all`: commit the copy's working tree (the baseline `dvc exp run` needs).
- `exp_show_revs`, `metric_file`, `param`, `committed_json`: read `dvc exp show --json` and
  the files an experiment committed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from rnnlm.download import MIRROR_ENV
from tests.fixtures import TINY_OVERRIDES

BIN = Path(sys.executable).parent
EXPERIMENT = "rnnlm"  # mlflow.experiment_name in the real params.yaml
TAIL = 4000  # characters of a failed command's stdout/stderr shown in the assertion
# Environment variables that would point the stages away from the copy.
DROPPED_ENV = {"RNNLM_PARAMS", "MLFLOW_TRACKING_URI", "RNNLM_PROJECT_ROOT", "PYTHONPATH"}
GIT_IDENTITY = ("-c", "user.name=rnnlm tests", "-c", "user.email=tests@rnnlm.invalid")

# The unit tests' tiny setup; the seed stays the shipped one (experiments override it).
E2E_OVERRIDES: dict[str, dict[str, Any]] = {
    **TINY_OVERRIDES,
    "train": {k: v for k, v in TINY_OVERRIDES["train"].items() if k != "seed"},
}


def write_tiny_params(project: Path) -> dict[str, Any]:
    """Shrink the copy's params.yaml in place (every other value kept); return the new dict.

    First removes dvc.lock and the declared outputs the copy may have brought along (committed
    or untracked pipeline results of the real project), so a stage that fails to write one of
    them cannot pass unnoticed.
    """
    for paths in declared_outputs(project).values():
        for name in paths:
            target = project / name
            if target.is_dir():
                shutil.rmtree(target)
            else:
                target.unlink(missing_ok=True)
    (project / "dvc.lock").unlink(missing_ok=True)
    path = project / "params.yaml"
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    for section, values in E2E_OVERRIDES.items():
        raw[section].update(values)
    path.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    return raw


def pipeline_env(project: Path, mirror_url: str) -> dict[str, str]:
    """os.environ for DVC and its stages: this venv first on PATH, the copy's src importable."""
    env = {k: v for k, v in os.environ.items() if k not in DROPPED_ENV}
    env.update(
        {
            # dvc.yaml runs `python -m rnnlm...`: it must be this venv's interpreter.
            "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
            # The package is installed editable from the original tree; run the copy's code.
            "PYTHONPATH": str(project / "src"),
            MIRROR_ENV: mirror_url,
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
            "DVC_NO_ANALYTICS": "1",
            "DVC_SITE_CACHE_DIR": str(project.parent / "dvc_site_cache"),
            "CI": "1",  # no progress bars or model summaries in the stage logs
        }
    )
    return env


def run_ok(
    args: list[str], cwd: Path, env: dict[str, str], timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """Run `args`; fail with the tail of its stdout and stderr unless it exits 0."""
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, (
        f"{' '.join(args)} exited {result.returncode}\n"
        f"stdout (tail):\n{result.stdout[-TAIL:]}\nstderr (tail):\n{result.stderr[-TAIL:]}"
    )
    return result


def dvc(project: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """`dvc <args>` in `project`, which must exit 0."""
    return run_ok([str(BIN / "dvc"), *args], cwd=project, env=env)


def repro_log(project: Path, env: dict[str, str], *args: str) -> str:
    """`dvc repro <args>`; its log (DVC writes to both stdout and stderr)."""
    result = dvc(project, env, "repro", *args)
    return result.stdout + result.stderr


def _lookup(params: dict[str, Any], dotted: str) -> str:
    value: Any = params
    for key in dotted.split("."):
        value = value[key]
    return str(value)


def _paths(entries: list[Any] | None) -> list[str]:
    """Paths of a stage's outs/metrics/plots list (a string, or a {path: options} mapping)."""
    names: list[str] = []
    for entry in entries or []:
        names.extend([entry] if isinstance(entry, str) else list(entry))
    return names


def declared_outputs(project: Path) -> dict[str, list[str]]:
    """Stage name -> its outs, metrics and plots as relative paths, `${...}` resolved."""
    params = yaml.safe_load((project / "params.yaml").read_text(encoding="utf-8"))
    stages = yaml.safe_load((project / "dvc.yaml").read_text(encoding="utf-8"))["stages"]

    def resolve(text: str) -> str:
        return re.sub(r"\$\{([^}]+)\}", lambda m: _lookup(params, m[1].strip()), text)

    return {
        name: [resolve(p) for kind in ("outs", "metrics", "plots") for p in _paths(stage.get(kind))]
        for name, stage in stages.items()
    }


def commit_all(project: Path, message: str) -> None:
    """`git add -A && git commit` in the copy (its .gitignore keeps mlruns/ and DVC outs out)."""
    git = ["git", *GIT_IDENTITY, "-c", "commit.gpgsign=false", "-c", "core.hooksPath=/dev/null"]
    run_ok([*git, "add", "-A"], cwd=project, env=dict(os.environ))
    run_ok([*git, "commit", "-q", "-m", message], cwd=project, env=dict(os.environ))


def set_git_identity(project: Path) -> None:
    """A committer for the commits `dvc exp run` makes, whatever the machine's git config."""
    for key, value in (("user.name", "rnnlm tests"), ("user.email", "tests@rnnlm.invalid")):
        run_ok(["git", "config", key, value], cwd=project, env=dict(os.environ))


def mlflow_client(project: Path):  # -> mlflow.MlflowClient
    """A client on the copy's own store, `<project>/mlruns/mlflow.db`."""
    from mlflow import MlflowClient

    db = project / "mlruns" / "mlflow.db"
    assert db.is_file(), f"no MLflow store at {db}"
    return MlflowClient(tracking_uri=f"sqlite:///{db}")


def experiment_runs(project: Path, name: str = EXPERIMENT) -> list[Any]:
    """Every run of experiment `name` in the copy's store, oldest first."""
    client = mlflow_client(project)
    experiment = client.get_experiment_by_name(name)
    assert experiment is not None, f"no MLflow experiment {name!r} in {project}/mlruns"
    return client.search_runs(
        [experiment.experiment_id], order_by=["attributes.start_time ASC"], max_results=100
    )


def cached_outputs(project: Path) -> list[str]:
    """The outs of dvc.yaml that DVC caches, so `dvc push`/`dvc pull` move them, `${...}` resolved.

    Outs, metrics and plots declared with `cache: false` are left out: git carries those.
    """
    params = yaml.safe_load((project / "params.yaml").read_text(encoding="utf-8"))
    stages = yaml.safe_load((project / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
    names: list[str] = []
    for stage in stages.values():
        for kind in ("outs", "metrics", "plots"):
            for entry in stage.get(kind) or []:
                path, options = (entry, {}) if isinstance(entry, str) else next(iter(entry.items()))
                if (options or {}).get("cache", True):
                    names.append(
                        re.sub(r"\$\{([^}]+)\}", lambda m: _lookup(params, m[1].strip()), path)
                    )
    return names


def exp_show_revs(exp_show: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Experiment name -> its `data` (params, metrics, and `rev`, the experiment's commit) from
    `dvc exp show --json`."""
    found: dict[str, dict[str, Any]] = {}
    for baseline in exp_show:
        for experiment in baseline.get("experiments") or []:
            for rev in experiment.get("revs") or []:
                found[rev["name"]] = {**rev["data"], "rev": rev["rev"]}
    return found


def metric_file(data: dict[str, Any], name: str) -> dict[str, Any]:
    """The values of metrics file `name` in one revision of `dvc exp show --json`."""
    return data["metrics"][name]["data"]


def param(data: dict[str, Any], section: str, key: str) -> Any:
    return data["params"]["params.yaml"]["data"][section][key]


def committed_json(project: Path, data: dict[str, Any], name: str) -> dict[str, Any]:
    """A `cache: false` JSON output as an experiment committed it (`data` from exp_show_revs):
    the run records (metrics/train_run.json, ...) are not metrics, so `dvc exp show` omits them."""
    shown = run_ok(["git", "show", f"{data['rev']}:{name}"], cwd=project, env=dict(os.environ))
    return json.loads(shown.stdout)
