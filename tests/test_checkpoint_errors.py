"""A full disk while saving: one clear CheckpointError, the previous checkpoint survives, and re-running resumes.

The disk is simulated: orbax's CheckpointManager.save raises ENOSPC (what a full file system gives) from step 8 on.
"""
import errno
import os

import orbax.checkpoint as ocp
import pytest

from jaxgen.data.pipeline import make_train_iterator
from jaxgen.errors import CheckpointError
from jaxgen.train.trainer import Trainer
from tests.test_nan_halt import _config, _NanAfter


def _data(config):
    return make_train_iterator(config.data, ("image", "label"), config.batch_size, config.seed, process_index=0,
                               process_count=1)


def test_full_disk_keeps_the_last_checkpoint_and_resumes(tmp_path, monkeypatch):
    config = _config()
    config.total_steps = 12
    workdir = str(tmp_path / "run")
    real_save = ocp.CheckpointManager.save

    def full_disk(self, step, *args, **kwargs):
        if step >= 8:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(self, step, *args, **kwargs)

    monkeypatch.setattr(ocp.CheckpointManager, "save", full_disk)
    trainer = Trainer(config, workdir, family=_NanAfter(config, threshold=1e9))
    with pytest.raises(CheckpointError) as err:
        trainer.run(_data(config))
    msg = str(err.value)
    assert "No space left on device" in msg and "last complete checkpoint (step 4) is intact" in msg, msg
    assert "re-run" in msg and "\n" not in msg
    assert trainer.checkpointer.all_steps() == [4]
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["4"]
    trainer.checkpointer.manager.close()

    monkeypatch.setattr(ocp.CheckpointManager, "save", real_save)  # space freed: the same run resumes at step 4
    resumed = Trainer(config, workdir, family=_NanAfter(config, threshold=1e9))
    try:
        result = resumed.run(_data(config))
        assert result.step == 12 and resumed.checkpointer.all_steps()[-1] == 12
    finally:
        resumed.close()
