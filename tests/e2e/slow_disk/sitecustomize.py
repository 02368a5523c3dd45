"""Test-only: makes the N-th save of last.ckpt stall half-way through writing, so a test can kill the process there.

Active only when CAPLINE_TEST_STALL_SAVE=N is set (the resume tests put this folder on PYTHONPATH).
"""

import os

if os.environ.get("CAPLINE_TEST_STALL_SAVE"):
    import io
    import time

    import torch

    _save = torch.save
    _count = {"saves": 0}

    def _stalling_save(obj, f, *args, **kwargs):
        if not hasattr(f, "write") or isinstance(f, io.BytesIO) or "last" not in str(getattr(f, "name", "")):
            return _save(obj, f, *args, **kwargs)
        _count["saves"] += 1
        if _count["saves"] < int(os.environ["CAPLINE_TEST_STALL_SAVE"]):
            return _save(obj, f, *args, **kwargs)
        buffer = io.BytesIO()
        _save(obj, buffer, *args, **kwargs)
        data = buffer.getvalue()
        f.write(data[: len(data) // 2])
        f.flush()
        with open(os.environ["CAPLINE_TEST_STALL_MARKER"], "w") as marker:
            marker.write(getattr(f, "name", "?"))
        time.sleep(600)  # the test kills the process here

    torch.save = _stalling_save
