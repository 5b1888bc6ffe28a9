"""Orbax checkpoints: async, atomic (a cut-off write never replaces a good one), keep last N + every K-th,
train state + data-iterator state + run metadata; restore directly into the target shardings."""
from __future__ import annotations

import os
from typing import Any, Optional

import grain
import jax
import orbax.checkpoint as ocp

from jaxgen.errors import CheckpointError


def _abs(path: str) -> str:
    return os.path.abspath(os.path.expanduser(path))


class Checkpointer:
    def __init__(self, directory: str, keep: int = 3, keep_every: int = 0, async_save: bool = True,
                 read_only: bool = False):
        self.directory = _abs(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep if keep > 0 else None,
            keep_period=keep_every if keep_every > 0 else None,
            enable_async_checkpointing=async_save,
            create=not read_only,
            read_only=read_only,
            # Interrupted writes stay in tmp folders that orbax never lists as checkpoints; clean them on start.
            cleanup_tmp_directories=not read_only,
        )
        try:
            self.manager = ocp.CheckpointManager(self.directory, options=options)
        except Exception as e:  # noqa: BLE001 - surface as a one-line user error
            raise CheckpointError(f"cannot open checkpoint directory {self.directory}: {e}; "
                                  f"check the path and its permissions") from None

    def latest_step(self) -> Optional[int]:
        return self.manager.latest_step()

    def all_steps(self):
        return list(self.manager.all_steps())

    def save(self, step: int, state: Any, data_iter=None, meta: Optional[dict] = None, force: bool = False) -> bool:
        items = {"state": ocp.args.StandardSave(state)}
        if data_iter is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iter)
        if meta is not None:
            items["meta"] = ocp.args.JsonSave(meta)
        try:
            return self.manager.save(step, args=ocp.args.Composite(**items), force=force)
        except Exception as e:  # noqa: BLE001 - a full disk / lost mount: one line; the last good one is kept
            raise self._save_error(step, e) from None

    def _save_error(self, step: Optional[int], e: BaseException) -> CheckpointError:
        while e.__cause__ is not None or e.__context__ is not None:  # orbax wraps the OSError
            e = e.__cause__ or e.__context__
        what = f"step {step}" if step is not None else "a pending checkpoint"
        good = self.latest_step()
        kept = f"the last complete checkpoint (step {good}) is intact" if good is not None else \
            "no complete checkpoint exists yet"
        msg = " ".join(str(e).split()) or type(e).__name__
        return CheckpointError(f"saving {what} in {self.directory} failed ({msg[:200]}); {kept}; free disk space "
                               f"(or fix the path) and re-run the same command to resume")

    def restore(self, step: int, abstract_state: Any, data_iter=None) -> dict:
        """Restore into `abstract_state` (jax.ShapeDtypeStruct leaves with shardings). Returns dict(state, meta)."""
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        if data_iter is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:  # noqa: BLE001
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise CheckpointError(
                f"checkpoint step {step} in {self.directory} is unreadable or does not match this config ({msg[:300]}); "
                f"use the config it was written with, or point --workdir elsewhere (nothing was overwritten)") from None
        out = {"state": restored["state"]}
        try:
            out["meta"] = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        except Exception:  # noqa: BLE001 - metadata is optional (e.g. converted checkpoints)
            out["meta"] = None
        return out

    def restore_params_only(self, step: int, abstract_state: Any) -> Any:
        return self.restore(step, abstract_state)["state"]

    def wait(self):
        try:
            self.manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001 - an async save that failed in the background
            raise self._save_error(None, e) from None

    def close(self):
        self.wait()
        self.manager.close()


def abstract_like(tree: Any) -> Any:
    """ShapeDtypeStructs (with shardings) of a pytree of jax arrays, for restore targets."""
    return jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, tree)
