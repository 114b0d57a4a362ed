"""Stop signals: noted without re-entering a log call they interrupt."""
from __future__ import annotations

import logging
import os
import signal
from types import SimpleNamespace

from processor.trainer import Trainer


def test_a_signal_inside_a_log_call_is_noted_without_logging(capfd):
    """Slurm's SIGTERM can arrive while the training loop writes a log line. The handler
    only notes it (writing straight to stderr): logging from it re-entered the file
    handler's buffered write ("RuntimeError: reentrant call", a logging traceback)."""
    trainer = SimpleNamespace(_stop_signal=None)
    reentered = []

    class SignalledDuringEmit(logging.Handler):
        busy = False

        def emit(self, record):
            if self.busy:
                reentered.append(record.getMessage())
                return
            self.busy = True
            try:
                os.kill(os.getpid(), signal.SIGTERM)  # the handler runs before this returns
            finally:
                self.busy = False

    logger = logging.getLogger("comoe")
    handler = SignalledDuringEmit()
    previous = signal.signal(signal.SIGTERM, lambda s, f: Trainer._on_signal(trainer, s, f))
    logger.addHandler(handler)
    try:
        logger.warning("epoch 1 [2/9] step 2 ...")
    finally:
        logger.removeHandler(handler)
        signal.signal(signal.SIGTERM, previous)
    assert trainer._stop_signal == signal.SIGTERM
    assert reentered == []
    assert "received SIGTERM: finishing the current step" in capfd.readouterr().err


# A train.py whose final test sends SIGTERM to its whole process group from a loader
# worker, once (as Slurm stops a job): the workers ignore it, the run stops cleanly.
_STOPPED_IN_FINAL_TEST = """
import os, signal, sys
import processor.runner as runner
from cli import run_cli
import train

marker = sys.argv[1]
evaluate = runner.evaluate

def final_test(model, image_loader, *args, **kwargs):
    get_item = type(image_loader.dataset).__getitem__
    def signalling(self, index):
        try:
            os.close(os.open(marker, os.O_CREAT | os.O_EXCL))
        except FileExistsError:
            return get_item(self, index)
        os.killpg(os.getpgid(0), signal.SIGTERM)
        return get_item(self, index)
    type(image_loader.dataset).__getitem__ = signalling
    return evaluate(model, image_loader, *args, **kwargs)

runner.evaluate = final_test
sys.argv = ["train.py", *sys.argv[2:]]
sys.exit(run_cli(train.main))
"""


def test_a_stop_signal_during_the_final_test_stops_cleanly(synth_root, tmp_path):
    import subprocess
    import sys

    from conftest import ROOT, tiny_overrides
    argv = ["--config_file", str(ROOT / "configs" / "demo.yaml"),
            *tiny_overrides(synth_root, tmp_path), "solver.num_epoch=1", "dataset.num_workers=2"]
    proc = subprocess.run([sys.executable, "-c", _STOPPED_IN_FINAL_TEST, str(tmp_path / "sent"),
                           *argv], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          start_new_session=True, env={**os.environ, "PYTHONPATH": str(ROOT),
                                                       "OMP_NUM_THREADS": "1"})
    run = tmp_path / "CUHK-PEDES" / "tiny"
    assert (tmp_path / "sent").exists()
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr[-3000:]
    message = (f"stopped by SIGTERM during the final test: training is complete and "
               f"{run / 'best.pth'} is saved. Score it with: python test.py --config_file "
               f"{run / 'configs.yaml'}")
    assert proc.stderr.strip().endswith(message), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "killed by signal" not in proc.stderr
    log = (run / "train.log").read_text()
    assert message in log and "resume=true" not in log.split("training done")[1]
    assert not (run / "test_metrics.json").exists()
