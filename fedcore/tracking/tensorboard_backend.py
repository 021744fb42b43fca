"""--track tensorboard://DIR: scalar event files TensorBoard reads, written with
tensorboard's own EventFileWriter (no TensorFlow, no torch).

Imported only when such a target is given (pip install 'fedgrpc[tensorboard]'). A resumed
federation writes a new event file into the same folder; TensorBoard joins them by step."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from tensorboard.compat.proto import event_pb2, summary_pb2, tensor_pb2, tensor_shape_pb2, types_pb2
from tensorboard.summary.writer.event_file_writer import EventFileWriter

from fedcore.tracking.base import Backend, RunInfo


class TensorBoardBackend(Backend):
    def __init__(self, target: str, folder: Path) -> None:
        self.target = target
        self.folder = folder
        self.writer: EventFileWriter | None = None

    def open(self, run: RunInfo) -> str:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.writer = EventFileWriter(str(self.folder), flush_secs=5)
        table = "\n".join(f"| {k} | {v} |" for k, v in sorted({**run.tags, **run.params}.items()))
        text = f"**{run.name}**\n\n| parameter | value |\n|---|---|\n{table}"
        self._write(0, [_text("parameters", text)])
        # The same, for programs: TensorBoard's hparams plugin needs TensorFlow to write.
        (self.folder / "parameters.json").write_text(
            json.dumps({"name": run.name, "tags": run.tags, "params": run.params}, indent=1)
        )
        return str(self.folder)

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        values = [
            summary_pb2.Summary.Value(tag=k, simple_value=float(v))
            for k, v in sorted(metrics.items())
        ]
        self._write(step, values)

    def _write(self, step: int, values: list[summary_pb2.Summary.Value]) -> None:
        assert self.writer is not None, "open() first"
        event = event_pb2.Event(
            wall_time=time.time(), step=step, summary=summary_pb2.Summary(value=values)
        )
        self.writer.add_event(event)
        self.writer.flush()  # a round is a few dozen scalars: readers see it at once

    def log_artifact(self, path: Path) -> None:
        shutil.copyfile(path, self.folder / path.name)

    def close(self, status: str) -> None:
        if self.writer is not None:
            self._write(0, [_text("status", status)])
            self.writer.close()
            self.writer = None


def _text(tag: str, text: str) -> summary_pb2.Summary.Value:
    """A value TensorBoard's Text tab shows (its plugin's tensor layout: one string)."""
    return summary_pb2.Summary.Value(
        tag=tag,
        metadata=summary_pb2.SummaryMetadata(
            plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="text")
        ),
        tensor=tensor_pb2.TensorProto(
            dtype=types_pb2.DT_STRING,
            tensor_shape=tensor_shape_pb2.TensorShapeProto(),
            string_val=[text.encode()],
        ),
    )
