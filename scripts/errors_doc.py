"""The bad-input table: each case a user may try, run through ``compose_run_config`` and ``run.build``
with data reading forbidden, and the message it gets. The tests run every case (``tests/test_bad_input.py``)
and check that ``docs/errors.md`` is this module's output:

    python scripts/errors_doc.py > docs/errors.md
"""

from __future__ import annotations

import argparse
import contextlib
import pickle
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

# A tiny model on the CPU: building it is what every case does before it would read data.
BASE = ["backbone.width=0.25", "trainer.accelerator=cpu", "logger=none", "extras.print_config=false"]


class DataWouldBeRead(RuntimeError):
    """Raised instead of reading a dataset: the config passed every check made before data."""


@dataclass
class Case:
    """A bad input: overrides (``{tmp}`` is a scratch folder), an optional ``setup(tmp)`` writing the files
    they name, and a fragment the message must hold."""

    overrides: list[str]
    expect: str
    setup: Callable[[Path], None] | None = None
    note: str = ""


class _Opaque:
    """A pickled object of a class torch's weights-only reader refuses."""


def _text_file(tmp: Path) -> None:
    (tmp / "notes.txt").write_text("not a checkpoint\n")


def _pickle_file(tmp: Path) -> None:
    (tmp / "object.pt").write_bytes(pickle.dumps(_Opaque()))


def _checkpoint_of_another_run(tmp: Path) -> None:
    """``<out>/checkpoints/last.ckpt`` as a run with ``optim.lr=0.5 patch=dw`` writes it (config only)."""
    import torch
    from omegaconf import OmegaConf

    from modelpatch.config import compose_run_config

    cfg = compose_run_config([*BASE, "optim.lr=0.5", "patch=dw"], tmp / "out", tmp / "data")
    (tmp / "out" / "checkpoints").mkdir(parents=True, exist_ok=True)
    hp = {"meta": {"config": OmegaConf.to_container(cfg, resolve=True)}}
    state = {"hyper_parameters": hp, "state_dict": {}, "loops": {}, "optimizer_states": []}
    torch.save(state, tmp / "out" / "checkpoints" / "last.ckpt")


def _half_written_checkpoint(tmp: Path) -> None:
    """``<out>/checkpoints/last.ckpt`` cut in half, the only checkpoint of the run."""
    _checkpoint_of_another_run(tmp)
    last = tmp / "out" / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])


CASES = [
    Case(["seed=abc"], "seed='abc': set a whole number"),
    Case(["task=multi", "task.mixing=bogus"], "choose one of all"),
    Case(["optim.name=bogus"], "optim.name='bogus'"),
    Case(["optim.scheduler=bogus"], "optim.scheduler='bogus'"),
    Case(["optim.patch_lr=-0.1"], "optim.patch_lr=-0.1"),
    Case(["optim.lr=fast"], "optim.lr='fast': set a rate >= 0, or auto"),
    Case(["task.train_size=0"], "task.train_size"),
    Case(["task.train_size=1"], "task.train_size"),
    Case(["task.val_size=-5"], "task.val_size"),
    Case(["task=multi", "task.tasks=[fmnist_a,bogus]"], "unknown task(s) in the mix: bogus"),
    Case(["backbone.weights={tmp}/notes.txt"], "notes.txt' is not a checkpoint", _text_file),
    Case(["backbone.weights={tmp}/object.pt"], "object.pt' is not a checkpoint", _pickle_file),
    Case(["backbone.weights={tmp}/missing.pt"], "missing.pt' does not exist"),
    Case(["patch.kind=bogus"], "bogus"),
    Case(["data.cache_features=maybe"], "data.cache_features='maybe'"),
    Case(["lean_backward=maybe"], "lean_backward='maybe': choose auto"),
    Case(["init_from={tmp}/missing.ckpt"], "missing.ckpt does not exist"),
    Case(
        [],
        "optim.lr=0.5 in the checkpoint, 0.05 now",
        _checkpoint_of_another_run,
        note="resume (the default) from a `last.ckpt` in the output dir written with `optim.lr=0.5 patch=dw`",
    ),
    Case(
        ["trainer.max_epochs=5"],
        "no readable checkpoint",
        _half_written_checkpoint,
        note="resume from a `last.ckpt` cut in half (a writer that is not atomic, killed), the run's only checkpoint",
    ),
]


@contextlib.contextmanager
def no_data() -> Iterator[None]:
    """Make any dataset read raise ``DataWouldBeRead``."""
    from modelpatch.data.datamodule import TaskDataModule

    def refuse(self, stage=None):
        raise DataWouldBeRead("the config passed every check and data would now be read")

    saved = TaskDataModule.setup
    TaskDataModule.setup = refuse
    try:
        yield
    finally:
        TaskDataModule.setup = saved


def run_case(case: Case, tmp: Path) -> tuple[str, str]:
    """(exception class, message) of building ``case``'s config; ``tmp`` written as ``<tmp>``."""
    from hydra.core.global_hydra import GlobalHydra

    from modelpatch.config import compose_run_config
    from modelpatch.run import build

    if case.setup is not None:
        case.setup(tmp)
    overrides = [o.replace("{tmp}", str(tmp)) for o in case.overrides]
    try:
        with no_data():
            build(compose_run_config([*BASE, *overrides], tmp / "out", tmp / "data"))
    except Exception as err:  # the table records whatever a user would see
        return type(err).__name__, str(err).replace(str(tmp), "<tmp>")
    finally:
        GlobalHydra.instance().clear()
    return "", "(no error)"


def table() -> str:
    """``docs/errors.md``: every case and the message it gets."""
    rows = []
    for case in CASES:
        with tempfile.TemporaryDirectory() as tmp:
            kind, message = run_case(case, Path(tmp))
        shown = " ".join(f"`{o.replace('{tmp}', '<tmp>')}`" for o in case.overrides) or "(none)"
        if case.note:
            shown += f" ({case.note})"
        message = message.replace("|", "\\|").replace("\n", " ")
        rows.append(f"| {shown} | {kind} | {message} |")
    return "\n".join(
        [
            "# Bad input and the messages it gets",
            "",
            "Generated by `python scripts/errors_doc.py > docs/errors.md` (each case composed with "
            f"`{' '.join(BASE)}` and built by `modelpatch.run.build` with data reading forbidden; every "
            "message below comes before any data is read). `tests/test_bad_input.py` runs every case and "
            "fails when this file is not the script's output. `<tmp>` is a scratch folder.",
            "",
            "Inputs that are handled rather than refused, each tested in `tests/test_bad_input.py`: a last "
            "training batch of one image (e.g. `task.train_size=129` at `data.batch_size=128`) is dropped; "
            "`optim.patch_lr=0.0` freezes the patch (0 is a rate, not unset); `optim.warmup_epochs` counts "
            "the steps of a real epoch, also under `trainer.max_steps`; `resume=false` starts afresh where "
            "the last row refuses to resume.",
            "",
            "| input | error | message |",
            "|---|---|---|",
            *rows,
            "",
        ]
    )


def main() -> None:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()
    print(table(), end="")


if __name__ == "__main__":
    main()
