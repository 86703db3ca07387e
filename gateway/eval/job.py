"""One ``gateway eval`` run: read the dataset, run the models (in-process or at a URL), write files and report."""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path

import httpx

from gateway.eval.datasets import DatasetError, load_examples
from gateway.eval.report import write_report
from gateway.eval.results import ModelRun, write_run
from gateway.eval.runner import EvalError, Sampling, in_process_client, remote_client, run_models
from gateway.settings import Settings


@dataclass(frozen=True)
class EvalJob:
    """What to evaluate, where, and how; ``settings`` (in-process) or ``server`` (a URL) says where."""

    dataset: str
    models: tuple[str, ...]
    out: Path
    sampling: Sampling
    dataset_dir: Path | None = None
    formatting: str | None = None
    max_samples: int | None = None
    concurrency: int = 16
    settings: Settings | None = None
    server: str | None = None
    api_key: str | None = None
    timeout: float = 600.0
    progress: bool = True

    def client(self) -> AbstractAsyncContextManager[httpx.AsyncClient]:
        if self.server is not None:
            return remote_client(self.server, self.api_key, self.timeout)
        if self.settings is None:
            raise EvalError("an eval needs a server URL or settings to start a gateway in-process")
        return in_process_client(self.settings, self.timeout)


@dataclass(frozen=True)
class EvalOutcome:
    runs: list[ModelRun]
    report: Path
    skipped: int


async def run_job(job: EvalJob) -> EvalOutcome:
    """Run ``job``; raises ``DatasetError`` for a bad dataset, ``EvalError`` for a failed request."""
    if not job.models:
        raise EvalError("no models to evaluate")
    examples, skipped = load_examples(job.dataset, job.dataset_dir, job.formatting, job.max_samples)
    if not examples:
        raise DatasetError(f"dataset {job.dataset!r} holds no usable example")
    async with job.client() as client:
        runs = await run_models(client, job.models, examples, job.sampling, job.concurrency, job.progress)
    job.out.mkdir(parents=True, exist_ok=True)
    for run in runs:
        write_run(job.out, run)
    report = write_report(job.out, runs, examples, title=f"gateway eval: {job.dataset}")
    return EvalOutcome(runs=runs, report=report, skipped=skipped)
