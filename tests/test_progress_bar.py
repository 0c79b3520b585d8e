"""`vae-fast train` draws its progress bars on a terminal only (issue 22): with stderr to a file or a
pipe (a log) tqdm used to leave a "  0%|          | 0/10" line per epoch between the epoch lines.

Two real `python -m vae_fast train` processes, started together to share the wait: one with stderr to
a pipe, one with stderr on a pseudo-terminal (POSIX `pty`), as a person at a shell would have it.
"""

import fcntl
import os
import pty
import re
import struct
import subprocess
import sys
import termios

import numpy as np

EPOCHS = 2
BAR = re.compile(r"epoch (\d)/2:\s+\d+%\|")  # tqdm's "epoch 1/2:  40%|####      | 4/10"


def _start(out, data, stderr) -> subprocess.Popen:
    command = [sys.executable, "-m", "vae_fast", "train", "--dataset", "npy", "--data-file", str(data), "--epochs",
               str(EPOCHS), "--batch-size", "4", "--hidden-dims", "8", "--latent-dim", "2", "--device", "cpu",
               "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=stderr, env=env, text=True)


def _read_until_closed(fd: int) -> str:
    """Everything written to a pseudo-terminal until the process on it exits."""
    chunks = []
    while True:
        try:
            chunk = os.read(fd, 4096)
        except OSError:  # EIO: no process holds the terminal any more
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks).decode(errors="replace")


def test_progress_bars_are_drawn_on_a_terminal_and_not_in_a_log(tmp_path):
    data = tmp_path / "images.npy"
    np.save(data, np.random.default_rng(0).integers(0, 256, size=(50, 4, 4), dtype=np.uint8))  # 10 steps of 4
    piped = _start(tmp_path / "piped", data, subprocess.PIPE)
    controller, terminal = pty.openpty()
    # A terminal has a size, a new pseudo-terminal 0 x 0, on which tqdm draws nothing.
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    try:
        on_terminal = _start(tmp_path / "terminal", data, terminal)
    finally:
        os.close(terminal)  # the child holds its own copy
    try:
        drawn = _read_until_closed(controller)
        piped_out, piped_err = piped.communicate(timeout=240)
        terminal_out, _ = on_terminal.communicate(timeout=240)
    finally:
        os.close(controller)
        for process in (piped, on_terminal):
            process.kill()
    assert (piped.returncode, on_terminal.returncode) == (0, 0), piped_err[-3000:] + drawn[-3000:]
    for out in (piped_out, terminal_out):  # the epoch lines on stdout either way
        assert [line.split(":")[0] for line in out.splitlines() if line.startswith("epoch ")] == ["epoch 1/2", "epoch 2/2"]
    assert "%|" not in piped_err, piped_err
    assert sorted({int(epoch) for epoch in BAR.findall(drawn)}) == [1, 2], drawn
