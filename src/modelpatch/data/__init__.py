"""Tasks and their data: specs and the catalog (``specs``), in-memory datasets (``embedded``), datasets
streamed from disk (``disk``), the LightningDataModule (``datamodule``), task mixing (``mixing``) and the
training loader (``steps``). Nothing here knows of the model."""

from modelpatch.data.datamodule import TaskDataModule, load_task
from modelpatch.data.mixing import MIXING, Mixing, make_mixing
from modelpatch.data.specs import DatasetMissingError, TaskData, TaskError, TaskSpec, check_task_names, task_specs

__all__ = [
    "MIXING",
    "DatasetMissingError",
    "Mixing",
    "TaskData",
    "TaskDataModule",
    "TaskError",
    "TaskSpec",
    "check_task_names",
    "load_task",
    "make_mixing",
    "task_specs",
]
