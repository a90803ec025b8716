"""Jobs launched from the studio: `llamaforge train job.yaml` in a subprocess inside the workspace.

The job file is written to <workspace>/jobs/<name>.yaml (never over an existing file), so the run can
be repeated from a terminal with the same command; the process's output goes to
<workspace>/.studio/jobs/<id>/log.txt, which the page streams. Stop sends SIGTERM, which the recipe
turns into a checkpoint and run.json "interrupted" (see train/recipe.py interrupt_on_sigterm).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from llamaforge.errors import ConfigError


@dataclass
class Job:
    id: str
    kind: str  # train | resume | export | eval
    run_dir: Path
    job_file: Path
    log_path: Path
    argv: list[str]
    started: float = field(default_factory=time.time)
    process: subprocess.Popen | None = None
    returncode: int | None = None
    result: Path | None = None  # the folder the job writes besides the run (an eval's results, an export)

    @property
    def running(self) -> bool:
        if self.process is None:
            return False
        rc = self.process.poll()
        if rc is not None:
            self.returncode = rc
        return rc is None

    def to_dict(self, workspace: Path) -> dict:
        running = self.running
        return {
            "id": self.id,
            "kind": self.kind,
            "run": self.run_dir.relative_to(workspace).as_posix(),
            "job_file": self.job_file.relative_to(workspace).as_posix(),
            "argv": self.argv,
            "started": self.started,
            "running": running,
            "returncode": self.returncode,
            "result": self.result.relative_to(workspace).as_posix() if self.result else None,
        }


def default_run_name(source: str, method: str) -> str:
    """The recipe's default name (<model>-<method>-<timestamp>), fixed here so the page can follow the run."""
    stem = Path(source.rstrip("/")).name.removesuffix(".gguf")
    return f"{stem}-{method}-{datetime.now():%Y%m%d-%H%M%S}"


EXPORT_FORMATS = ("safetensors", "gguf", "quantized")


def _child_env() -> dict[str, str]:
    """The studio's environment; the child runs the same llamaforge as the studio, even a source
    checkout on PYTHONPATH."""
    package_root = str(Path(__file__).resolve().parents[2])
    path = os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": path}


def _free_path(path: Path) -> Path:
    """`path`, or path-2, path-3 ... when a file is already there (nothing the user made is replaced)."""
    candidate, n = path, 1
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.stem}-{n}{path.suffix}")
    return candidate


class JobManager:
    def __init__(self, workspace: Path):
        self.workspace = workspace.resolve()
        self.jobs: dict[str, Job] = {}
        self._lock = threading.Lock()

    def _spawn(
        self, kind: str, run_dir: Path, job_file: Path, args: list[str], result: Path | None = None
    ) -> Job:
        job_id = f"{datetime.now():%Y%m%d-%H%M%S}-{run_dir.name}"
        log_dir = self.workspace / ".studio" / "jobs" / job_id
        log_dir.mkdir(parents=True, exist_ok=True)
        argv = [sys.executable, "-m", "llamaforge.cli", *args]
        job = Job(job_id, kind, run_dir, job_file, log_dir / "log.txt", argv, result=result)
        env = _child_env()
        with open(job.log_path, "w", encoding="utf-8") as log:
            log.write("$ llamaforge " + " ".join(args) + "\n")
            log.flush()
            job.process = subprocess.Popen(
                argv,
                cwd=self.workspace,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,
            )
        (log_dir / "job.json").write_text(json.dumps(job.to_dict(self.workspace), indent=2))
        with self._lock:
            self.jobs[job_id] = job
        return job

    def launch(self, cfg, yaml_text: str) -> Job:
        """Start training `cfg` (already schema- and path-checked); `yaml_text` is what the user chose."""
        run_dir = (self.workspace / cfg.output.dir / cfg.output.name).resolve()
        if run_dir.exists() and not cfg.output.overwrite:
            raise ConfigError(
                f"output.name: run directory {run_dir.relative_to(self.workspace)} exists; "
                "choose another output.name (or resume that run from its page)"
            )
        if self.running_for(run_dir):
            raise ConfigError(f"a job is already running for {run_dir.relative_to(self.workspace)}")
        jobs_dir = self.workspace / "jobs"
        jobs_dir.mkdir(exist_ok=True)
        job_file = _free_path(jobs_dir / f"{cfg.output.name}.yaml")
        job_file.write_text(yaml_text, encoding="utf-8")
        return self._spawn("train", run_dir, job_file, ["train", str(job_file.relative_to(self.workspace))])

    def resume(self, run_dir: Path) -> Job:
        if self.running_for(run_dir):
            raise ConfigError(f"a job is already running for {run_dir.relative_to(self.workspace)}")
        config = run_dir / "config.yaml"
        if not any(p.name.startswith("step-") for p in (run_dir / "checkpoints").glob("step-*")):
            raise ConfigError(
                f"{run_dir.relative_to(self.workspace)} has no resumable checkpoint "
                "(train.save_every=0 runs checkpoint only when interrupted)"
            )
        rel = run_dir.relative_to(self.workspace).as_posix()
        return self._spawn("resume", run_dir, config, ["train", f"{rel}/config.yaml", "--resume", rel])

    def export(self, run_dir: Path, fmt: str) -> Job:
        """`llamaforge export RUN --format F --out exports/<run>-<F>` (a new folder: nothing is replaced)."""
        if fmt not in EXPORT_FORMATS:
            raise ConfigError(f"export format must be one of {', '.join(EXPORT_FORMATS)}, got '{fmt}'")
        if self.running_for(run_dir):
            raise ConfigError(f"a job is already running for {run_dir.relative_to(self.workspace)}")
        out = _free_path(self.workspace / "exports" / f"{run_dir.name}-{fmt}")
        rel = run_dir.relative_to(self.workspace).as_posix()
        args = ["export", rel, "--format", fmt, "--out", out.relative_to(self.workspace).as_posix()]
        return self._spawn("export", run_dir, run_dir / "config.yaml", args, result=out)

    def evaluate(self, run_dir: Path, task: Path, *, limit: int | None, fail_if: list[str]) -> Job:
        """`llamaforge eval RUN/config.yaml --candidates base=base:RUN tuned=RUN --task T --out evals/<run>`:
        the run's base and its weights on the same examples, written to a new folder of the workspace.
        `task` is already checked to be a file inside the workspace, the rules to parse."""
        if self.running_for(run_dir):
            raise ConfigError(f"a job is already running for {run_dir.relative_to(self.workspace)}")
        out = _free_path(self.workspace / "evals" / run_dir.name)
        out.mkdir(parents=True)  # reserved now: a second evaluation picks the next name
        rel = run_dir.relative_to(self.workspace).as_posix()
        args = [
            "eval",
            f"{rel}/config.yaml",
            "--candidates",
            f"base=base:{rel}",
            f"tuned={rel}",
            "--task",
            task.relative_to(self.workspace).as_posix(),
            "--out",
            out.relative_to(self.workspace).as_posix(),
        ]
        if limit:
            args += ["--limit", str(limit)]
        for rule in fail_if:
            args += ["--fail-if", rule]
        return self._spawn("eval", run_dir, run_dir / "config.yaml", args, result=out)

    def plan(self, yaml_text: str, gpu: str | None, gpus: int = 1, timeout: float = 180) -> str:
        """`llamaforge plan job.yaml [--gpu G --gpus N]` on the form's job: memory, time and method advice."""
        tmp_dir = self.workspace / ".studio"
        tmp_dir.mkdir(exist_ok=True)
        job = tmp_dir / f"plan-{os.getpid()}-{threading.get_ident()}.yaml"
        job.write_text(yaml_text, encoding="utf-8")
        args = [sys.executable, "-m", "llamaforge.cli", "plan", str(job.relative_to(self.workspace))]
        if gpu:
            args += ["--gpu", gpu, "--gpus", str(gpus)]
        try:
            done = subprocess.run(
                args,
                cwd=self.workspace,
                capture_output=True,
                text=True,
                timeout=timeout,
                env=_child_env(),
                stdin=subprocess.DEVNULL,
            )
        finally:
            job.unlink(missing_ok=True)
        if done.returncode != 0:
            raise ConfigError(
                (done.stderr.strip().splitlines() or ["llamaforge plan failed"])[-1].removeprefix("error: ")
            )
        return done.stdout

    def running_for(self, run_dir: Path) -> Job | None:
        with self._lock:
            jobs = list(self.jobs.values())
        return next((j for j in jobs if j.run_dir == run_dir and j.running), None)

    def latest_for(self, run_dir: Path) -> Job | None:
        with self._lock:
            jobs = [j for j in self.jobs.values() if j.run_dir == run_dir]
        return max(jobs, key=lambda j: j.started) if jobs else None

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            return self.jobs.get(job_id)

    def stop(self, job: Job) -> None:
        """SIGTERM to the job's process group: the recipe checkpoints and marks the run interrupted."""
        if job.running:
            os.killpg(job.process.pid, signal.SIGTERM)

    def shutdown(self) -> None:
        """Studio exit: running jobs are stopped the same way (checkpointed, resumable)."""
        with self._lock:
            jobs = list(self.jobs.values())
        for job in jobs:
            if job.running:
                self.stop(job)
        for job in jobs:
            if job.process is not None:
                try:
                    job.process.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    os.killpg(job.process.pid, signal.SIGKILL)
