"""Helpers for tests that run the binaries and launchers in fresh processes."""

import importlib.util
import os
import pathlib
import signal
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
LOCAL_LAUNCHER = ROOT / "launch" / "local.sh"

_spec = importlib.util.spec_from_file_location("free_ports", ROOT / "launch" / "free_ports.py")
_ports = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_ports)
free_ports = _ports.free_ports  # the launcher's own choice of ports


def environment():
    """This interpreter's binary for launchers, no inherited cluster, quiet TF."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    env["HESSIAN_SPECTRUM"] = f"{sys.executable} -m hessian_tf.bin.spectrum"
    env.pop("TF_CONFIG", None)
    return env


def kill_worker(output_dir, index: int) -> bool:
    """SIGKILLs the spectrum worker with TF_CONFIG task index `index` whose
    command line names `output_dir`; True if one was found."""
    found = subprocess.run(["pgrep", "-f", f"output_dir={output_dir}"],
                           capture_output=True, text=True).stdout.split()
    for pid in found:
        try:
            environ = pathlib.Path(f"/proc/{pid}/environ").read_bytes()
            cmdline = pathlib.Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if f'"index": {index}'.encode() in environ and b"hessian_tf.bin.spectrum" in cmdline:
            os.kill(int(pid), signal.SIGKILL)
            return True
    return False
