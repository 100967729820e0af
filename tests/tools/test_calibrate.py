"""CPU tests of tools/calibrate.py: the orchestration with simulated measurements (``--fake``).

What a GPU run measures cannot be checked here; what can: levels and pairs are measured at
the right SM percentages (through the children's environment), factors are together / alone,
the profile reads back through ``DeviceProfile.from_json``, a missing MPS leaves only the 100 %
level, the pair children start their windows together, and failing children are reported.
"""
from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from duetjax.duet.mps import MPSError
from duetjax.perf.roofline import DeviceProfile, load_profile

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "tools" / "calibrate.py"
sys.path.insert(0, str(REPO / "tools"))

import calibrate as cal  # noqa: E402

FAST = cal.Measure(fake=True, window_s=0.05)


class RecordingRunner(cal.InProcessRunner):
    """The in-process fake, remembering which environment each measurement got."""

    def __init__(self, measure=FAST):
        super().__init__(measure)
        self.levels, self.pairs, self.gemms = [], [], []

    def level(self, env):
        self.levels.append(dict(env))
        return super().level(env)

    def pair(self, env_p, env_d, s_p, s_d):
        self.pairs.append((dict(env_p), dict(env_d), s_p, s_d))
        return super().pair(env_p, env_d, s_p, s_d)

    def gemm(self, env, shape, tokens):
        self.gemms.append(dict(env))
        return super().gemm(env, shape, tokens)


def _prefill_factor(s_d: int) -> float:
    return 1 - cal.FAKE_PREFILL_SLOWDOWN * s_d / 100


def _decode_factor(s_p: int) -> float:
    return 1 - cal.FAKE_DECODE_SLOWDOWN * s_p / 100


# ------------------------------------------------------------------ parsing

def test_parse_arguments():
    assert cal.parse_levels("100,10, 50,10") == (10, 50, 100)
    assert cal.parse_pairs("80/20,50/50,80/20") == ((80, 20), (50, 50))
    assert cal.parse_pairs("none") == ()
    assert cal.parse_tokens("256,16") == (16, 256)
    for parse, bad in ((cal.parse_levels, "0,50"), (cal.parse_levels, "x"),
                       (cal.parse_levels, "101"), (cal.parse_pairs, "80-20"),
                       (cal.parse_pairs, "80/0"), (cal.parse_tokens, "0")):
        with pytest.raises(argparse.ArgumentTypeError):
            parse(bad)
    args = cal.build_parser().parse_args([])
    assert args.levels == cal.DEFAULT_LEVELS and args.pairs == cal.DEFAULT_PAIRS


def test_model_shape_from_shipped_config():
    shape, name = cal.load_model_shape("llama-3-8b")
    assert name == "llama-3-8b"
    assert (shape.hidden_size, shape.num_kv_heads, shape.intermediate_size) == (4096, 8, 14336)
    assert cal.projections(shape)[0] == ("qkv_proj", 4096, 4096 + 2 * 1024)
    assert cal.projections(shape)[2] == ("gate_up_proj", 4096, 2 * 14336)
    with pytest.raises(FileNotFoundError):
        cal.load_model_shape("no-such-model")


# ------------------------------------------------------------------ orchestration

def test_calibrate_levels_pairs_efficiency_and_round_trip(tmp_path, monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--user_flag=1")
    shape, name = cal.load_model_shape("llama-3-8b")
    plan = cal.Plan(levels=(20, 50, 100), pairs=((80, 20), (70, 30), (50, 50)), shape=shape,
                    model_name=name, measure=FAST)
    runner = RecordingRunner()
    result = cal.calibrate(plan, runner, cal.FakeMPS(), "fake MPS", "python tools/calibrate.py")
    profile = result.profile

    # every child got its SM share, no preallocation, and the level flags before the user's
    assert [int(e[cal.PCT_VAR]) for e in runner.levels] == [20, 50, 100]
    assert all(e["XLA_PYTHON_CLIENT_PREALLOCATE"] == "false" for e in runner.levels)
    assert runner.levels[0]["XLA_FLAGS"] == f"{cal.LEVEL_XLA_FLAGS} --user_flag=1"
    assert [(int(p[cal.PCT_VAR]), int(d[cal.PCT_VAR])) for p, d, _, _ in runner.pairs] == [
        (80, 20), (70, 30), (50, 50)]
    assert runner.gemms[0][cal.PCT_VAR] == "100" and runner.gemms[0]["XLA_FLAGS"] == "--user_flag=1"

    assert profile.gpu_name == cal.FAKE_GPU
    assert [lv.sm_share for lv in profile.levels] == [0.2, 0.5, 1.0]
    for lv in profile.levels:
        assert lv.flops == pytest.approx(cal.fake_flops(lv.sm_share))
        assert lv.bandwidth == pytest.approx(cal.fake_bandwidth(lv.sm_share))
    # factors = together / alone; alone at 80 % and 30 % interpolated (exact for the fake)
    for point, (s_p, s_d) in zip(profile.interference, plan.pairs):
        assert (point.s_p, point.s_d) == (s_p / 100, s_d / 100)
        assert point.prefill_rate == pytest.approx(_prefill_factor(s_d), abs=1e-4)
        assert point.decode_bandwidth == pytest.approx(_decode_factor(s_p), abs=1e-4)
        assert point.prefill_bandwidth == point.prefill_rate
        assert point.decode_rate == point.decode_bandwidth
    assert all(r.overlap > 0.5 for r in result.pairs)
    assert profile.efficiency.gemm == pytest.approx(cal.FAKE_GEMM_EFFICIENCY, abs=1e-3)
    assert (profile.efficiency.attention, profile.efficiency.elementwise) == (1.0, 1.0)
    assert profile.overhead_s == pytest.approx(cal.FAKE_OVERHEAD_S)
    assert profile.fp8_flops_ratio == cal.FAKE_FP8_RATIO  # measured, not the datasheet's 2.0
    assert "tools/calibrate.py" in profile.source and "python tools/calibrate.py" in profile.source
    notes = " ".join(profile.notes)
    assert "interpolated" in notes and "engine-level calibration" in notes and "fake MPS" in notes

    path = cal.output_path(str(tmp_path), profile.gpu_name)
    assert path.name == "fake-gpu.json"
    profile.save(path)
    assert DeviceProfile.from_json(path) == profile
    assert load_profile("fake gpu", tmp_path) == profile
    table = cal.markdown(result, path)
    assert "| 50 / 50 |" in table and "| 100 | 800.0 | 4.00 |" in table and str(path) in table


def test_mps_unavailable_measures_only_the_full_gpu(monkeypatch, capsys):
    monkeypatch.setenv(cal.PCT_VAR, "30")  # inherited from the shell: must not leak into children

    def refuse():
        raise MPSError("nvidia-cuda-mps-control not found\nmore detail")

    with cal.mps_session(find=lambda: None, start=refuse) as (daemon, note):
        assert daemon is None and "MPS unavailable" in note and "not found" in note
        runner = RecordingRunner()
        result = cal.calibrate(cal.Plan(levels=(10, 50, 100), pairs=((50, 50),), measure=FAST),
                               runner, daemon, note)
    assert len(runner.levels) == 1 and cal.PCT_VAR not in runner.levels[0]
    assert runner.pairs == []
    profile = result.profile
    assert [lv.sm_share for lv in profile.levels] == [1.0] and profile.interference == ()
    assert any("MPS unavailable" in n for n in profile.notes)
    assert "MPS unavailable" in capsys.readouterr().err
    assert "MPS unavailable" in cal.markdown(result, None)


class _Daemon:
    def __init__(self, pipe_dir):
        self.pipe_dir, self.stopped = pipe_dir, False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stopped = True

    def client_env(self, pct):
        return {cal.PCT_VAR: str(pct), "CUDA_MPS_PIPE_DIRECTORY": self.pipe_dir}


def test_mps_session_prefers_a_running_daemon_and_stops_its_own_on_error():
    running = _Daemon("/tmp/running")
    with cal.mps_session(find=lambda: running, start=pytest.fail) as (daemon, note):
        assert daemon is running and "running MPS daemon" in note
    started = _Daemon("/tmp/private")
    with pytest.raises(RuntimeError, match="boom"):
        with cal.mps_session(find=lambda: None, start=lambda: started) as (daemon, note):
            assert daemon is started and "private" in note
            assert cal.child_env(daemon, 40)["CUDA_MPS_PIPE_DIRECTORY"] == "/tmp/private"
            raise RuntimeError("boom")
    assert started.stopped
    with cal.mps_session(enabled=False) as (daemon, note):
        assert daemon is None and "--no-mps" in note


def test_levels_are_made_monotone_and_say_so():
    raw = {50: {"flops": 400e12, "bandwidth": 3.9e12}, 70: {"flops": 390e12, "bandwidth": 4.0e12},
           100: {"flops": 800e12, "bandwidth": 3.95e12}}
    levels, notes = cal.build_levels(raw)
    assert [lv.flops for lv in levels] == [400e12, 400e12, 800e12]
    assert [lv.bandwidth for lv in levels] == [3.9e12, 4.0e12, 4.0e12]
    assert len(notes) == 2 and "level 70 %" in notes[0] and "level 100 %" in notes[1]
    DeviceProfile("x", levels)  # valid


def test_fp8_ratio_is_the_median_of_the_levels_that_measured_it():
    raw = {20: {"flops": 100e12, "fp8_flops": 150e12}, 50: {"flops": 300e12, "fp8_flops": 540e12},
           100: {"flops": 600e12, "fp8_flops": 1140e12}}
    ratio, note = cal.fp8_ratio(raw)
    assert ratio == 1.8 and "20 % 1.500" in note and "100 % 1.900" in note
    ratio, note = cal.fp8_ratio({100: {"flops": 600e12, "fp8_flops": None}})  # no FP8 cores
    assert ratio is None and "not measured" in note


def test_interference_and_gemm_fit_math():
    alone = DeviceProfile("x", tuple(cal.SMLevel(s, cal.fake_flops(s), cal.fake_bandwidth(s))
                                     for s in (0.2, 0.5, 1.0)))
    point = cal.interference_point(alone, 70, 30, 0.5 * 560e12, 0.75 * 2.4e12)
    assert (point.prefill_rate, point.decode_bandwidth) == (0.5, 0.75)
    shape, _ = cal.load_model_shape("llama-3-8b")
    predicted = [cal.predicted_gemm_s_per_layer(shape, alone, 1.0, n) for n in (16, 8192)]
    fit, _, ratios = cal.fit_gemm_efficiency(shape, alone, 1.0, (16, 8192),
                                             [predicted[0] / 0.5, predicted[1] / 0.8])
    assert ratios == pytest.approx([0.5, 0.8])
    assert fit == pytest.approx((0.5 * 0.8) ** 0.5, abs=1e-4)
    fit, _, _ = cal.fit_gemm_efficiency(shape, alone, 1.0, (16,), [predicted[0] / 1.2])
    assert fit == 1.0  # faster than the measured ceiling: capped
    assert cal.window_overlap({"window_start": 0, "window_end": 2},
                              {"window_start": 1, "window_end": 4}) == 0.5


# ------------------------------------------------------------------ children as processes

def test_pair_children_start_together():
    # (a window long enough that a busy CI machine's scheduling delays stay small beside it)
    runner = cal.SubprocessRunner(cal.Measure(fake=True, window_s=1.0), timeout_s=60)
    env = cal.child_env(cal.FakeMPS(), 70), cal.child_env(cal.FakeMPS(), 30)
    p, d = runner.pair(*env, 70, 30)
    assert p["role"] == "prefill" and p["pct"] == 70 and d["role"] == "decode" and d["pct"] == 30
    assert p["flops"] == pytest.approx(cal.fake_flops(0.7) * _prefill_factor(30))
    assert d["bandwidth"] == pytest.approx(cal.fake_bandwidth(0.3) * _decode_factor(70))
    assert abs(p["window_start"] - d["window_start"]) < 0.3
    assert cal.window_overlap(p, d) > 0.7


def test_failing_children_are_reported():
    runner = cal.SubprocessRunner(cal.Measure(fake=True, window_s=5.0), timeout_s=60)
    bad = cal.child_env(None, 100) | {cal.PCT_VAR: "lots"}
    with pytest.raises(cal.CalibrationError, match="ValueError"):
        runner.level(bad)
    begin = time.monotonic()
    with pytest.raises(cal.CalibrationError, match="exited before it was ready"):
        runner.pair(bad, cal.child_env(cal.FakeMPS(), 50), 50, 50)
    assert time.monotonic() - begin < 4  # the healthy partner was killed, not waited for


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), "--fake", "--window-s", "0.2", *args],
                          capture_output=True, text=True, timeout=120, cwd=REPO)


def test_cli_end_to_end(tmp_path):
    run = _cli("--levels", "20,50,100", "--pairs", "70/30,50/50", "--model-config",
               "models/configs/llama-3-8b", "--gemm-tokens", "16,2048", "--out", str(tmp_path))
    assert run.returncode == 0, run.stderr
    profile = DeviceProfile.from_json(tmp_path / "fake-gpu.json")
    assert [lv.sm_share for lv in profile.levels] == [0.2, 0.5, 1.0]
    assert [(p.s_p, p.s_d) for p in profile.interference] == [(0.7, 0.3), (0.5, 0.5)]
    assert profile.interference[0].prefill_rate == pytest.approx(_prefill_factor(30), abs=1e-4)
    assert profile.interference[1].decode_bandwidth == pytest.approx(_decode_factor(50), abs=1e-4)
    assert profile.efficiency.gemm == pytest.approx(cal.FAKE_GEMM_EFFICIENCY, abs=1e-3)
    assert "--model-config models/configs/llama-3-8b" in profile.source
    assert "| SM % |" in run.stdout and "| 70 / 30 |" in run.stdout
    assert "pair 50/50" in run.stderr


def test_cli_without_mps_prints_the_profile(tmp_path):
    run = _cli("--no-mps", "--levels", "30,100")
    assert run.returncode == 0, run.stderr
    assert "WARNING" in run.stderr and "--no-mps" in run.stderr
    profile_json = run.stdout[:run.stdout.index("## ")]
    data = json.loads(profile_json)
    assert [lv["sm_share"] for lv in data["levels"]] == [1.0] and data["interference"] == []
    assert not (REPO / "duetjax" / "profiles" / "fake-gpu.json").exists()


def _children_with(marker: str) -> list[int]:
    """Pids of calibrate children whose command line holds ``marker``."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if proc.name.isdigit() and b"--child" in argv and marker.encode() in argv:
            pids.append(int(proc.name))
    return pids


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs /proc")
@pytest.mark.parametrize("inherited", ["default", "ignored"])
def test_sigint_kills_the_children_first(inherited):
    """Ctrl-C, or SIGINT to a background job (which starts with SIGINT ignored)."""
    marker = f"31.2{len(inherited)}"  # a window length no other run uses
    ignore = (lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if inherited == "ignored" \
        else None
    parent = subprocess.Popen([sys.executable, str(SCRIPT), "--fake", "--levels", "100",
                               "--pairs", "50/50", "--window-s", marker],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                              cwd=REPO, preexec_fn=ignore)
    try:
        assert "level 100" in parent.stderr.readline()
        deadline = time.monotonic() + 20
        while len(_children_with(marker)) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(_children_with(marker)) == 2
        parent.send_signal(signal.SIGINT)
        parent.wait(timeout=10)
        assert parent.returncode == 130
        assert "interrupted" in parent.stderr.read()
        assert _children_with(marker) == []
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
