"""tools/profile_host.py: the host-section workload runs through the stub executables."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))

import profile_host as ph  # noqa: E402


def test_null_device_run_reports_host_time_and_a_profile(capsys):
    ph.main(["--decode-steps", "1,2", "--batch", "4", "--prompt-len", "8", "--max-tokens", "9",
             "--max-model-len", "64", "--repeats", "1", "--top", "5", "--null-device"])
    out = capsys.readouterr().out
    assert "k=1: host" in out and "over 9 steps (9 dispatches)" in out
    assert "k=2: host" in out and "dispatches)" in out
    assert "Ordered by: internal time" in out
