"""What `twa watch` has taken in so far, kept on disk so that a killed watcher resumes where it was.

The basis grows by one row per checkpoint that adds a direction. Each row is written once, to its own file
(`rows/row-NNNNN.safetensors`), before `state.json` names it, so saving after a checkpoint costs one model's
worth of writing, not the whole basis again. `state.json` is the commit point: it is replaced atomically and
names the rows and the running mean (`others-NNNNN.safetensors`: the tensors outside the subspace, such as
BatchNorm statistics) that belong to it. A row or mean file written by a watcher killed before it could commit
is not named by the state and is overwritten or removed on the next save.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from twa_cli.core.basis import Basis
from twa_cli.engine.mean import RunningMean
from twa_cli.engine.orthogonalizer import Orthogonalizer
from twa_cli.errors import TwaError
from twa_cli.io.atomic import write_bytes
from twa_cli.io.checkpoints import Source, load_tensors
from twa_cli.io.safetensors import save_tensors
from twa_cli.units import dtype_name, first_line, layout_size, torch_dtype

STATE_FOLDER = "watch-state"
STATE_FILE = "state.json"
VERSION = 1

Signature = list[list[Any]]  # (file, size, mtime_ns) of each file of a checkpoint


@dataclass
class Taken:
    """Every checkpoint the watcher has read (or set aside), and what it built from them."""

    run: str
    layout: list[tuple[str, tuple[int, ...]]]
    basis: Orthogonalizer
    others: RunningMean
    sources: list[Source] = field(default_factory=list)
    seen: dict[str, Signature] = field(default_factory=dict)  # path -> signature when taken in or set aside
    set_aside: dict[str, str] = field(default_factory=dict)  # path -> why it is not in the basis
    rounds: int = 0
    fitted_at: int = 0  # how many checkpoints the last TWA round spanned
    recorded: dict[str, Any] = field(default_factory=dict)  # what the first checkpoint says about its task
    dtypes: dict[str, str] = field(default_factory=dict)  # the widest precision each trained tensor came in

    @staticmethod
    def new(run: Path, layout: list[tuple[str, tuple[int, ...]]], tol: float, recorded: dict[str, Any]) -> Taken:
        dim = layout_size(layout)
        return Taken(str(run), layout, Orthogonalizer(dim, tol=tol, capacity=8), RunningMean(), recorded=recorded)

    @property
    def count(self) -> int:
        return self.basis.count

    def others_mean(self) -> dict[str, torch.Tensor]:
        """The running mean of the tensors outside the subspace, each in the widest precision it came in."""
        if not self.others.count:
            return {}
        return {k: v.to(self.others.widest[k]) if v.is_floating_point() else v
                for k, v in self.others.average().items()}

    def average(self) -> dict[str, torch.Tensor]:
        """SWA of everything taken in: the basis's center on the trained tensors (in the widest precision each
        came in, as `twa swa` writes it), the running mean elsewhere."""
        basis = Basis(self.basis.vectors, self.basis.coords, self.layout)
        out = {name: t.to(torch_dtype(self.dtypes.get(name, "float32")))
               for name, t in basis.unflatten(basis.point(basis.center_coords())).items()}
        out.update(self.others_mean())
        return out

    def model_folder(self) -> Path | None:
        """A Hugging Face checkpoint folder of the run still on disk (its config and tokenizer go beside a
        result): a Trainer with save_total_limit deletes its oldest ones, the first taken in among them."""
        return next((Path(s.path) for s in reversed(self.sources) if Path(s.path).is_dir()), None)

    def recorded_now(self) -> dict[str, Any]:
        """What a basis records about the task, its model folder one of the run's still there."""
        recorded = dict(self.recorded)
        folder = self.model_folder()
        if isinstance(recorded.get("hf"), dict) and folder is not None:
            recorded["hf"] = {**recorded["hf"], "dir": str(folder.resolve())}
        return recorded

    def save(self, out: Path) -> None:
        folder = out / STATE_FOLDER
        (folder / "rows").mkdir(parents=True, exist_ok=True)  # OUT itself too, at the first checkpoint
        for i in range(self._rows_saved(folder), self.basis.rank):  # the committed ones are final
            save_tensors(folder / "rows" / f"row-{i:05d}.safetensors", {"row": self.basis.vectors[i]}, {})
        others = f"others-{self.count:05d}.safetensors"
        save_tensors(folder / others, {**self.others.sums},
                     {"widest": json.dumps({k: dtype_name(v) for k, v in self.others.widest.items()})})
        state = {
            "version": VERSION, "run": self.run, "layout": [[n, list(s)] for n, s in self.layout],
            "tol": self.basis.tol, "rank": self.basis.rank, "count": self.count,
            "coords": self.basis.coords.tolist(),
            "dropped": [[d.index, d.relative_residual] for d in self.basis.dropped],
            "sources": [s.to_dict() for s in self.sources], "seen": self.seen, "set_aside": self.set_aside,
            "others": others, "others_count": self.others.count, "rounds": self.rounds, "fitted_at": self.fitted_at,
            "recorded": self.recorded, "dtypes": self.dtypes,
        }
        write_bytes(folder / STATE_FILE, json.dumps(state).encode())
        for stale in folder.glob("others-*.safetensors"):  # means no state names any more
            if stale.name != others:
                stale.unlink(missing_ok=True)

    def _rows_saved(self, folder: Path) -> int:
        """Rows the committed state already names (those files are final)."""
        try:
            return int(json.loads((folder / STATE_FILE).read_text())["rank"])
        except (OSError, ValueError, KeyError, TypeError):
            return 0

    @staticmethod
    def load(out: Path) -> Taken:
        folder = out / STATE_FOLDER
        path = folder / STATE_FILE
        try:
            state = json.loads(path.read_text())
            if state["version"] != VERSION:
                raise TwaError(f"it is of version {state['version']!r}; this twa reads version {VERSION}")
            layout = [(str(n), tuple(int(x) for x in s)) for n, s in state["layout"]]
            rank, count = _whole(state, "rank"), _whole(state, "count")
            if rank > count:
                raise TwaError(f"its basis has rank {rank}, more than its {count} checkpoints")
            coords = torch.tensor(state["coords"], dtype=torch.float64).reshape(rank, count)
            if not bool(torch.isfinite(coords).all()):
                raise TwaError("its coordinates hold NaN or Inf")
            taken = Taken.new(Path(state["run"]), layout, float(state["tol"]), dict(state["recorded"]))
            vectors = torch.stack([load_tensors(folder / "rows" / f"row-{i:05d}.safetensors")["row"]
                                   for i in range(rank)]) if rank else torch.empty(0, taken.basis.dim)
            taken.basis.load_state_dict({"vectors": vectors, "coords": coords, "count": count, "tol": state["tol"],
                                         "dropped": state["dropped"]})
            if any(not 0 <= d.index < count for d in taken.basis.dropped):
                raise TwaError(f"a checkpoint it says was dropped is not one of its {count}")
            if not re.fullmatch(r"others-\d+\.safetensors", str(state["others"])):
                raise TwaError(f"its 'others' names {state['others']!r}, not a file of its own")
            sums = load_tensors(folder / str(state["others"]))
            taken.others.load_state_dict({"sums": sums, "count": int(state["others_count"])})
            widest = json.loads(_metadata(folder / str(state["others"])).get("widest", "{}"))
            taken.others.widest = {k: torch_dtype(v) for k, v in widest.items()}
            taken.sources = [Source.from_json(s) for s in state["sources"]]
            taken.seen = {str(k): v for k, v in state["seen"].items()}
            taken.set_aside = {str(k): str(v) for k, v in state["set_aside"].items()}
            taken.rounds, taken.fitted_at = int(state["rounds"]), int(state["fitted_at"])
            taken.dtypes = {str(k): dtype_name(torch_dtype(str(v))) for k, v in state.get("dtypes", {}).items()}
        except TwaError as exc:
            raise TwaError(f"{path}: cannot resume from it ({exc})") from exc
        except (OSError, ValueError, KeyError, TypeError, RuntimeError, AttributeError) as exc:
            raise TwaError(f"{path}: cannot resume from it, it is damaged or not a watch state "
                           f"({first_line(exc)})") from exc
        if len(taken.sources) != count:
            raise TwaError(f"{path}: cannot resume from it, it names {len(taken.sources)} checkpoints for {count} "
                           "in its basis")
        return taken


def _whole(state: dict[str, Any], key: str) -> int:
    value = state[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise TwaError(f"its '{key}' is {value!r}, not a count")
    return value


def _metadata(path: Path) -> dict[str, str]:
    from twa_cli.io.checkpoints import read_checkpoint

    return dict(read_checkpoint(path).meta)
