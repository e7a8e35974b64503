"""A second read of the queue's pieces where they meet (issue 15's review):
each test here shows one bug found there, against the real program.

As in test_queue: this module's sshd is stopped so the tunnel cannot be had
and minimail serves the client itself; hand-driven sockets speak SMTP.
"""

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from conftest import AS_ROOT, MINIMAIL, free_port, minimail_via, wait_until


pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def queueing(own_sshd, hoster, minimail_process):
    """minimail in front of this module's sshd (stopped with hoster_reachable)."""
    return minimail_via(own_sshd, hoster, minimail_process, 30)


class Dialogue:
    """A hand-driven SMTP client on a socket: a command, then its reply."""

    def __init__(self, port):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.reader = self.sock.makefile("rb")

    def reply(self):
        lines = []
        while True:
            line = self.reader.readline()
            assert line, f"closed after {lines}"
            lines.append(line)
            if line[3:4] != b"-":
                return b"".join(lines)

    def command(self, text):
        self.sock.sendall(text.encode() + b"\r\n")
        return self.reply()

    def close(self):
        self.reader.close()
        self.sock.close()


def test_a_size_in_digits_that_are_not_ascii_gets_a_reply_not_a_traceback(
        queueing, hoster_reachable):
    hoster_reachable(False)
    mm = queueing()
    talk = Dialogue(mm.port)
    talk.reply()
    talk.command("EHLO desktop.example")
    assert talk.command("MAIL FROM:<a@b> SIZE=\u00b2").startswith(b"555 5.5.4")   # a superscript 2
    assert talk.command("MAIL FROM:<a@b> SIZE=12").startswith(b"250")         # the session goes on
    talk.close()
    time.sleep(0.5)
    assert "Traceback" not in mm.log()


def test_a_flush_or_delete_while_minimail_starts_never_kills_it(tmp_path):
    """`minimail flush` and `minimail delete` signal the pid they find (the pid
    file's, the queue lock's) as soon as it is there: a daemon still starting
    (here: clearing 20,000 leftovers from its queue's tmp/) must survive it."""
    queue = tmp_path / "queue"
    (queue / "tmp").mkdir(parents=True)
    for path in (queue, queue / "tmp"):
        path.chmod(0o700)
    for i in range(20_000):
        (queue / "tmp" / f"left-{i}").touch()
    log_path = tmp_path / "minimail.log"
    argv = [sys.executable, str(MINIMAIL), "--foreground", "--listen", f"127.0.0.1:{free_port()}",
            *AS_ROOT, "--queue", str(queue), "--ssh", "false", "hoster"]
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=log_file)
    try:
        deadline = time.monotonic() + 30
        while not (queue / "lock").exists() or not (queue / "lock").read_text().strip():
            assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.001)
        assert int((queue / "lock").read_text()) == proc.pid
        assert list((queue / "tmp").iterdir()), "the start was over before the signals"
        os.kill(proc.pid, signal.SIGUSR2)                    # what `minimail delete` sends
        os.kill(proc.pid, signal.SIGUSR1)                    # what `minimail flush` sends
        wait_until(lambda: proc.poll() is not None or "listening on" in log_path.read_text(),
                   30, "minimail to listen")
        assert proc.poll() is None, f"minimail died (status {proc.returncode})"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, log_path.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
