"""Where a run reports to: metric sinks (TensorBoard; Weights & Biases, offline unless an API key is configured,
never prompting) and the launcher's job record (Transformer Lab's, when it launched the run)."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import netrc
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

from .errors import ConfigError


def wandb_mode() -> str:
    """'online' only when a key is configured (env or ~/.netrc); otherwise 'offline', so W&B never prompts."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    try:
        return "online" if netrc.netrc().authenticators("api.wandb.ai") else "offline"
    except (FileNotFoundError, netrc.NetrcParseError):
        return "offline"


class Reporter:
    """Fans metrics and images out to the sinks the config enables and to the job record."""

    def __init__(self, cfg, log_dir: Path, job: "JobRecord", max_steps: int, history: Path | None = None, resumed_step: int | None = None):
        """`history`: a JSON-lines file of every step's metrics (the model card's curves), continued from
        `resumed_step` when the run resumes."""
        self.job = job
        self.max_steps = max_steps
        self.sinks = [] if history is None else [_MetricsFile(history, resumed_step)]
        if cfg.log_to_tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.sinks.append(_TensorBoard(SummaryWriter(str(log_dir))))
        if cfg.log_to_wandb:
            import wandb

            run = wandb.init(
                project="diffusion-lora",
                name=cfg.adaptor_name,
                config=cfg.as_dict(),
                dir=str(log_dir),
                mode=wandb_mode(),
            )
            self.sinks.append(_WandB(run))

    def metrics(self, step: int, values: dict[str, float]) -> None:
        for sink in self.sinks:
            sink.metrics(step, values)
        self.job.step(step, self.max_steps, values)

    def images(self, step: int, tag: str, images, grid: Path) -> None:
        """An evaluation's images, also saved as one grid image at `grid`."""
        for sink in self.sinks:
            sink.images(step, tag, images)
        self.job.evaluation(grid)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()


METRICS_FILE = Path("logs") / "metrics.jsonl"  # in the run folder: every step's metrics, for the model card


class _MetricsFile:
    """One JSON line per report, {"step": n, metric: value, ...}, appended and flushed as it comes (a kill
    loses at most the line being written, which `read_metrics` skips). A resumed run first drops the lines
    after its checkpoint's step, rewriting the file atomically."""

    def __init__(self, path: Path, resumed_step: int | None):
        from .export import atomic_path

        self.path = Path(path)
        kept = [row for row in read_metrics(self.path) if row["step"] <= resumed_step] if resumed_step is not None else []
        with atomic_path(self.path) as tmp:
            tmp.write_text("".join(json.dumps(row) + "\n" for row in kept), encoding="utf-8")
        self.file = open(self.path, "a", encoding="utf-8")

    def metrics(self, step, values):
        self.file.write(json.dumps({"step": step, **values}) + "\n")
        self.file.flush()

    def images(self, step, tag, images):
        pass

    def close(self):
        self.file.close()


def read_metrics(path: Path) -> list[dict]:
    """The rows of a metrics file (none if it is missing); a torn last line is skipped."""
    rows = []
    if Path(path).is_file():
        for line in Path(path).read_text(encoding="utf-8").splitlines():
            try:
                rows.append(json.loads(line))
            except ValueError:
                continue
    return rows


class _TensorBoard:
    def __init__(self, writer):
        self.writer = writer

    def metrics(self, step, values):
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)

    def images(self, step, tag, images):
        for k, image in enumerate(images):
            self.writer.add_image(f"{tag}/{k}", np.asarray(image), step, dataformats="HWC")

    def close(self):
        self.writer.close()


class _WandB:
    def __init__(self, run):
        self.run = run

    def metrics(self, step, values):
        self.run.log(values, step=step)

    def images(self, step, tag, images):
        import wandb

        self.run.log({tag: [wandb.Image(image) for image in images]}, step=step)

    def close(self):
        self.run.finish()


SETUP_PERCENT = 5  # the share of the progress bar given to the setup before the first step (loading, caches)


class JobRecord:
    """A launcher's record of this run: progress, stop requests, results, how it ended. Outside Transformer Lab
    there is none and every method does nothing, so the trainer reports the same way wherever it runs."""

    in_app = False  # a requested stop exits 0 under the app (it records a non-zero exit as a crash)

    def setup(self, percent: int) -> None:
        """Setup has reached `percent` (≤ SETUP_PERCENT) of the run."""

    def step(self, step: int, max_steps: int, metrics: dict[str, float]) -> None:
        """Optimizer step `step` of `max_steps` is done."""

    def stop_requested(self) -> bool:
        return False

    def evaluation(self, grid: Path) -> None:
        """An evaluation's images were written; `grid` is the one image of all prompts."""

    def finished(self, adapter_file: Path, name: str, score: dict[str, float]) -> None:
        """The run ended with this adapter."""

    def failed(self, message: str) -> None:
        """The run ended with an error, said in `message`."""

    def stopped(self, message: str) -> None:
        """The run ended early on request, checkpoint and adapter written."""


class TransformerLabJob(JobRecord):
    """The app's job, kept through its own SDK (`transformerlab`, imported as `lab`) so that whichever layout
    the installed app uses for its job files, the app reads what is written: progress by optimizer step, the
    latest metrics, eval images (the folder its Eval Images view lists, and each grid as an artifact), the
    adapter as the job's model, a final score, FAILED with the message, and its Stop flag."""

    in_app = True

    def __init__(self, lab):
        self.lab = lab
        self.eval_images_dir: Path | None = None

    @classmethod
    def attach(cls, job_id: str, experiment: str | None = None, workspace: Path | None = None) -> JobRecord:
        """The job `job_id` of the app that launched this process, marked RUNNING. Without the SDK installed
        the run goes on unreported (said once); a job the SDK cannot find is a ConfigError."""
        if workspace is not None and not os.environ.get("TFL_WORKSPACE_DIR"):
            os.environ["TFL_WORKSPACE_DIR"] = str(workspace)  # read when the SDK is imported
        try:
            from lab import lab
        except ImportError:
            print(f"note: launched as Transformer Lab job {job_id}, but its SDK is not installed here, so the job's "
                  "progress and status are not updated (bash setup.sh --with-transformerlab installs it)", file=sys.stderr)  # fmt: skip
            return JobRecord()
        os.environ["_TFL_JOB_ID"] = str(job_id)  # where the SDK looks for the job to use
        if experiment:
            os.environ["_TFL_EXPERIMENT_ID"] = experiment
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # the SDK prints its optional integrations' state
                lab.init()
        except (RuntimeError, FileNotFoundError) as error:
            raise ConfigError(f"_TFL_JOB_ID: Transformer Lab job {job_id!r} cannot be opened ({error})") from None
        return cls(lab)

    def parameters(self) -> dict:
        """The task's parameters as the app stored them. One left untouched in the app's form can arrive as its
        task.yaml definition ({"type": ..., "default": ...}): its default is the value."""
        return {k: v["default"] if isinstance(v, dict) and "default" in v else v for k, v in self.lab.get_config().items()}

    def directory(self) -> Path:
        """The job's own folder in the app's workspace: each job a run folder of its own."""
        return Path(asyncio.run(self.lab.job.get_dir()))

    def setup(self, percent):
        self.lab.update_progress(percent)

    def step(self, step, max_steps, metrics):
        self.lab.update_progress(SETUP_PERCENT + (99 - SETUP_PERCENT) * step // max_steps, metrics=metrics, step=step)

    def stop_requested(self):
        return bool(self.lab.get_job_data().get("stop"))

    def evaluation(self, grid):
        if self.eval_images_dir != grid.parent:
            self.eval_images_dir = grid.parent
            self.lab.set_job_data_field("eval_images_dir", str(grid.parent))
        self.lab.save_artifact(str(grid))

    def finished(self, adapter_file, name, score):
        with tempfile.TemporaryDirectory() as staging:  # the adapter alone, not the run folder around it
            shutil.copy2(adapter_file, Path(staging) / adapter_file.name)
            self.lab.save_model(staging, name=name, pipeline_tag="text-to-image")
        self.lab.finish(f"adapter saved: {adapter_file}", score=score)

    def failed(self, message):
        self.lab.error(message)

    def stopped(self, message):
        from lab import JobStatus

        self.lab.set_job_data_field("completion_details", message)
        asyncio.run(self.lab.job.update_status(JobStatus.STOPPED))
