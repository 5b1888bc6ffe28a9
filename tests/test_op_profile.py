"""bench/op_profile.py: per-op sums of a jax.profiler trace (synthetic trace in the profiler's file layout)."""
import gzip
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))

from op_profile import op_times  # noqa: E402


def _write_trace(root, events):
    run = os.path.join(root, "plugins", "profile", "2026_12_06_00_00_00")
    os.makedirs(run)
    with gzip.open(os.path.join(run, "vm.trace.json.gz"), "wt") as f:
        json.dump({"traceEvents": events}, f)


def test_op_times_sums_ops_and_skips_python_and_runtime_frames(tmp_path):
    events = [
        {"ph": "X", "name": "ynn_fusion.3", "dur": 2000},
        {"ph": "X", "name": "ynn_fusion.3", "dur": 1000},
        {"ph": "X", "name": "ynn_fusion.12", "dur": 500},
        {"ph": "X", "name": "conv_general_dilated", "dur": 250},
        {"ph": "X", "name": "$api.py:2479 block_until_ready", "dur": 9000},  # Python frame
        {"ph": "X", "name": "ThunkExecutor::Execute", "dur": 9000},  # runtime
        {"ph": "X", "name": "end: ynn_fusion.3", "dur": 9000},  # marker of the op's end
        {"ph": "X", "name": "while.210", "dur": 9000},  # the loop around the ops
        {"ph": "M", "name": "thread_name", "args": {"name": "x"}},
    ]
    _write_trace(str(tmp_path), events)
    total, count = op_times(str(tmp_path))
    assert dict(total) == {"ynn_fusion.3": 3.0, "ynn_fusion.12": 0.5, "conv_general_dilated": 0.25}
    assert count["ynn_fusion.3"] == 2
    grouped, grouped_count = op_times(str(tmp_path), group=True)
    assert dict(grouped) == {"ynn_fusion": 3.5, "conv_general_dilated": 0.25}
    assert grouped_count["ynn_fusion"] == 3
