"""minimail under faults: what the network, ssh and clients throw at it.

Like test_minimail.py, these run the real program against a real sshd, a real
SMTP server and real clients (all from conftest.py), on loopback, each bounded
in time.  Faults are injected from outside, as they happen in life: ssh killed
or hung, a hoster that rejects the key, a tunnel command that dies at once,
clients that idle, crowd in or leave early, SIGTERM in the middle of sessions,
and a soak of thousands of sessions after which nothing may be left behind.
"""

import hashlib
import os
import random
import re
import resource
import signal
import smtplib
import socket
import struct
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from conftest import (
    Minimail, descendants, free_port, make_message, minimail_command, minimail_via,
    read_until_eof, send_mail, ssh_config_with_key, start_daemon, wait_until)


@pytest.fixture
def via_ssh(own_sshd, hoster, minimail_process):
    """Start minimail in front of this module's sshd, tunnelling to the hoster."""
    return minimail_via(own_sshd, hoster, minimail_process, linger=30)


def send_signal(pid, signum):
    """Signal a process that may have ended meanwhile."""
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


def tunnel_pid(mm):
    (pid, _, _), = mm.tunnels()
    return pid


class SmtpSession:
    """A hand-driven SMTP client on a raw socket, for sessions that fault halfway."""

    def __init__(self, port, timeout=20):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.file = self.sock.makefile("rb")

    def reply(self):
        lines = []
        while True:
            line = self.file.readline()
            if not line:
                raise ConnectionError("closed")
            lines.append(line)
            if line[3:4] != b"-":
                return b"".join(lines)

    def command(self, text):
        self.sock.sendall(text.encode() + b"\r\n")
        return self.reply()

    def start_data(self):
        assert self.reply().startswith(b"220")
        assert self.command("EHLO desktop.example").startswith(b"250")
        assert self.command("MAIL FROM:<cron@desktop.example>").startswith(b"250")
        assert self.command("RCPT TO:<admin@hoster.example>").startswith(b"250")
        assert self.command("DATA").startswith(b"354")

    def closed_within(self, seconds):
        """True if the server side closes (EOF or reset) within seconds."""
        self.sock.settimeout(seconds)
        try:
            while self.sock.recv(65536):
                pass
            return True
        except (ConnectionError, OSError) as exc:
            return not isinstance(exc, socket.timeout)

    def close(self):
        self.file.close()
        self.sock.close()


# ---------------------------------------------------------------------------
# ssh dies, hangs, or cannot get in
# ---------------------------------------------------------------------------

def test_ssh_killed_mid_transfer_closes_the_session_and_the_next_mail_gets_a_fresh_tunnel(
        via_ssh, hoster):
    mm = via_ssh()
    session = SmtpSession(mm.port)
    session.start_data()
    chunk = b"x" * 1000 + b"\r\n"
    for _ in range(200):                                 # a large mail, underway
        session.sock.sendall(chunk)
    os.kill(tunnel_pid(mm), signal.SIGKILL)
    killed = time.monotonic()
    with pytest.raises(OSError):                         # the client is cut off, not hung
        for _ in range(20000):
            session.sock.sendall(chunk)
            time.sleep(0.0005)
        session.reply()
    assert time.monotonic() - killed < 5
    session.close()
    mm.wait_for_log(r"tunnel \(pid \d+\) killed by SIGKILL after")
    mm.wait_for_log(r"client 127\.0\.0\.1:\d+: closed: ")
    send_mail(mm.port, make_message("after-the-kill"))
    assert hoster.bodies() == [make_message("after-the-kill")]   # the cut mail is not delivered
    assert mm.tunnel_starts() == 2


def test_a_hung_network_is_noticed_by_server_alive(via_ssh, hoster, own_sshd):
    mm = via_ssh("-o", "ServerAliveInterval=1", "-o", "ServerAliveCountMax=2")
    session = SmtpSession(mm.port)
    assert session.reply().startswith(b"220")
    hung = descendants(own_sshd.proc.pid)               # the server side of this tunnel
    for pid in hung:
        send_signal(pid, signal.SIGSTOP)
    try:
        assert session.closed_within(10), "the client hung with the tunnel"
        mm.wait_for_log(r"ssh\[\d+\]: Timeout, server 127\.0\.0\.1 not responding", timeout=5)
        mm.wait_for_log(r"tunnel \(pid \d+\) exited with code 255")
    finally:
        for pid in hung:
            send_signal(pid, signal.SIGKILL)
        session.close()
    send_mail(mm.port, make_message("after-the-hang"))
    assert hoster.bodies() == [make_message("after-the-hang")]
    assert mm.tunnel_starts() == 2


# ---------------------------------------------------------------------------
# Stale tunnels: after a suspend or a network change
# ---------------------------------------------------------------------------

@pytest.fixture
def freeze_network(own_sshd):
    """A function that freezes the server side of every ssh connection open now
    (as a dead network would: ssh still looks alive); unfrozen by a kill after."""
    frozen = []

    def freeze():
        pids = descendants(own_sshd.proc.pid)
        for pid in pids:
            send_signal(pid, signal.SIGSTOP)
        frozen.extend(pids)
    yield freeze
    for pid in frozen:
        send_signal(pid, signal.SIGKILL)


def test_a_stale_tunnel_is_replaced_and_the_client_greeted_through_a_fresh_one(
        via_ssh, hoster, freeze_network):
    mm = via_ssh("--greeting-wait", 2)
    held = SmtpSession(mm.port)                          # a session inside the tunnel
    assert held.reply().startswith(b"220")
    stale = tunnel_pid(mm)
    freeze_network()
    message = make_message("through-a-fresh-tunnel")
    asked = time.monotonic()
    with smtplib.SMTP("127.0.0.1", mm.port, timeout=30) as smtp:
        greeted = time.monotonic() - asked
        smtp.sendmail("cron@desktop.example", ["admin@hoster.example"], message)
    print(f"\ngreeting through a stale tunnel with --greeting-wait 2: {greeted:.2f} s")
    assert 2 <= greeted < 2 + 1 + 1                      # greeting-wait + cold start + 1 s
    assert hoster.bodies() == [message]                  # once, byte-identical
    mm.wait_for_log(rf"tunnel \(pid {stale}\) is stale: the far side said nothing for 2 s")
    assert held.closed_within(5)                         # the stale tunnel took it down...
    held.close()
    mm.wait_for_log(r"client 127\.0\.0\.1:\d+: closed: the tunnel ended under the session "
                    r"\(stale: the far side went silent\)")          # ...and the log says so
    assert mm.tunnel_starts() == 2


def test_without_the_greeting_wait_a_stale_tunnel_keeps_the_client_waiting(via_ssh, hoster,
                                                                          freeze_network):
    mm = via_ssh("--greeting-wait", 0)
    send_mail(mm.port, make_message("warm"))
    freeze_network()
    with socket.create_connection(("127.0.0.1", mm.port), timeout=10) as client:
        client.settimeout(5)
        with pytest.raises(socket.timeout):              # no greeting for 5 s and more
            client.recv(100)
    assert mm.tunnel_starts() == 1


def eager_mail(port, marker):
    """A client that says EHLO before the greeting, then sends a mail by hand:
    each reply must come once, in order."""
    session = SmtpSession(port, timeout=30)
    session.sock.sendall(b"EHLO eager.example\r\n")      # before any greeting
    assert session.reply().startswith(b"220 ")
    assert session.reply().startswith(b"250-")           # the EHLO's answer, once
    assert session.command("NOOP").startswith(b"250 ")   # not a second EHLO answer
    assert session.command("MAIL FROM:<cron@desktop.example>").startswith(b"250")
    assert session.command("RCPT TO:<admin@hoster.example>").startswith(b"250")
    assert session.command("DATA").startswith(b"354")
    session.sock.sendall(re.sub(rb"(?m)^\.", b"..", make_message(marker)) + b".\r\n")
    assert session.reply().startswith(b"250")
    assert session.command("QUIT").startswith(b"221")
    session.close()


@pytest.mark.parametrize("stale", [True, False], ids=["stale", "healthy"])
def test_an_eager_clients_early_bytes_arrive_once_through_a_warm_tunnel(via_ssh, hoster,
                                                                         freeze_network, stale):
    mm = via_ssh("--greeting-wait", 1)
    send_mail(mm.port, make_message("warm"))
    if stale:
        freeze_network()
    eager_mail(mm.port, "eager")
    assert hoster.bodies() == [make_message("warm"), make_message("eager")]
    assert mm.tunnel_starts() == (2 if stale else 1)


def test_a_stopped_ssh_costs_clients_only_the_idle_timeout_and_is_killed(via_ssh, hoster):
    mm = via_ssh("--idle-timeout", 1, linger=0.5)
    session = SmtpSession(mm.port)
    assert session.reply().startswith(b"220")
    stopped = tunnel_pid(mm)
    os.kill(stopped, signal.SIGSTOP)                     # ssh itself hangs: no keep-alive can tell
    session.sock.sendall(b"EHLO desktop.example\r\n")
    assert session.closed_within(5)
    session.close()
    mm.wait_for_log(r"closed: idle for 1 s")
    mm.wait_for_log(rf"tunnel stopped \(pid {stopped}, linger expired\): killed by SIGKILL", timeout=15)
    send_mail(mm.port, make_message("after-the-stop"))
    assert hoster.bodies() == [make_message("after-the-stop")]


def test_a_client_arriving_while_a_stubborn_tunnel_stops_gets_a_fresh_one_at_once(
        via_ssh, own_sshd, hoster, tmp_path):
    stubborn = tmp_path / "ssh-ignoring-sigterm"           # ssh that SIGTERM cannot stop
    stubborn.write_text("#!/bin/sh\ntrap '' TERM\nexec ssh \"$@\"\n")
    stubborn.chmod(0o755)
    mm = via_ssh("--no-session", linger=0.3, ssh=f"{stubborn} -F {own_sshd.config}")
    send_mail(mm.port, make_message("before-the-stop"))
    old = tunnel_pid(mm)
    mm.wait_for_log(rf"tunnel stopping \(pid {old}, linger expired\)")
    asked = time.monotonic()
    with smtplib.SMTP("127.0.0.1", mm.port, timeout=30) as smtp:     # connect: the 220
        greeted = time.monotonic() - asked
        smtp.sendmail("cron@desktop.example", ["admin@hoster.example"], make_message("during"))
    print(f"\ngreeting while a stubborn tunnel stops: {greeted:.2f} s")
    assert greeted < 2.0                                  # a cold start, not the 3 s grace
    assert hoster.bodies() == [make_message("before-the-stop"), make_message("during")]
    mm.wait_for_log(rf"tunnel stopped \(pid {old}, linger expired\): killed by SIGKILL")
    assert mm.tunnel_starts() == 2


def test_a_rejected_key_gets_421_at_once_and_is_not_hammered(via_ssh, own_sshd, hoster, tmp_path):
    config, _ = ssh_config_with_key(own_sshd, tmp_path, "stranger")
    mm = via_ssh("--no-queue", "--wait", 20, ssh=f"ssh -F {config}")
    replies, slowest, until = 0, 0.0, time.monotonic() + 6
    while time.monotonic() < until and replies < 300:   # a client every 20 ms for 6 s
        asked = time.monotonic()
        with pytest.raises(smtplib.SMTPConnectError) as refused:
            smtplib.SMTP("127.0.0.1", mm.port, timeout=25)
        slowest = max(slowest, time.monotonic() - asked)
        assert refused.value.smtp_code == 421 and b"Permission denied" in refused.value.smtp_error
        replies += 1
        time.sleep(0.02)
    assert replies > 50 and slowest < 2                  # nobody waited for --wait (20 s)
    starts = mm.tunnel_starts()
    assert 2 <= starts <= 4, f"{starts} logins in 6 s"   # backoff 1, 2, 4 s: starts at 0, 1, 3
    assert len(re.findall(r"ssh\[\d+\]: .*Permission denied \(publickey\)", mm.log())) == starts
    assert hoster.messages == []


def logged_times(logfile, pattern):
    """The timestamps of the log lines that match pattern."""
    times = []
    for line in logfile.read_text().splitlines():
        if re.search(pattern, line):
            times.append(datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp())
    return times


def test_a_tunnel_that_dies_at_once_backs_off_1_2_4_seconds_and_resets_after_success(
        run_dir, tmp_path, double_script):
    flag = tmp_path / "works"
    tunnel_port = free_port()
    command = (f"sh -c 'test -e {flag} && exec {sys.executable} {double_script} echo 0 {tunnel_port}; "
               f"echo no tunnel today >&2; exit 3'")
    port = start_daemon(run_dir, "--no-queue", "--tunnel-port", tunnel_port,
                        "--tunnel-command", command, "--linger", 0.5, "--jitter", 0)
    until = time.monotonic() + 3.5
    while time.monotonic() < until:                      # clients keep coming for 3.5 s
        with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
            assert read_until_eof(client).startswith(b"421 4.4.0 minimail: tunnel failed: no tunnel today")
        time.sleep(0.05)
    logfile = run_dir / "minimail.log"
    starts = logged_times(logfile, r"tunnel starting")
    gaps = [round(b - a, 1) for a, b in zip(starts, starts[1:])]
    assert len(starts) == 3, gaps                       # at 0, 1 and 3 s: not hundreds
    for gap, backoff in zip(gaps, (1, 2)):              # (the whole 1, 2, 4 ... 60: test_units)
        assert backoff <= gap < backoff + 0.5, gaps
    assert "failure 3 in a row; next try in 4 s" in logfile.read_text()

    flag.touch()                                         # the hoster is back
    wait_until(lambda: try_echo(port), 12, "a working tunnel after the backoff")
    flag.unlink()
    wait_until(lambda: "tunnel stopped" in logfile.read_text(), 10, "the tunnel to stop")
    with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
        assert read_until_eof(client).startswith(b"421 ")
    assert "failure 1 in a row; next try in 1 s" in logfile.read_text().rpartition("tunnel up")[2]
    assert minimail_command("stop", "--pidfile", run_dir / "minimail.pid").returncode == 0


def try_echo(port):
    with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
        client.sendall(b"hello")
        client.shutdown(socket.SHUT_WR)
        return read_until_eof(client) == b"hello"


# ---------------------------------------------------------------------------
# Stopping with sessions in flight
# ---------------------------------------------------------------------------

def echo_clients(port, count):
    """count clients through an echo tunnel, each shown to get through."""
    clients = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(count)]
    for client in clients:
        client.sendall(b"x")
        assert client.recv(1) == b"x"
    return clients


def draining(tunnel_double):
    """minimail with one echo session open, told to stop: it waits for the session."""
    mm, _ = tunnel_double("echo", 0, "{port}")
    client, = echo_clients(mm.port, 1)
    mm.proc.send_signal(signal.SIGTERM)
    mm.wait_for_log(r"waiting up to 10 s for 1 active session")
    return mm, client


def test_sigterm_lets_active_sessions_finish_their_mail(via_ssh, hoster):
    mm = via_ssh()
    sessions = [smtplib.SMTP("127.0.0.1", mm.port, timeout=30) for _ in range(10)]
    for smtp in sessions:
        smtp.ehlo()
    mm.proc.send_signal(signal.SIGTERM)
    mm.wait_for_log(r"waiting up to 10 s for 10 active session\(s\)")
    with pytest.raises(ConnectionRefusedError):          # no new clients: accepting stopped at once
        socket.create_connection(("127.0.0.1", mm.port), timeout=5)
    for i, smtp in enumerate(sessions):
        smtp.sendmail("cron@desktop.example", ["admin@hoster.example"], make_message(f"drain-{i}"))
        smtp.quit()
    assert mm.proc.wait(timeout=15) == 0
    assert sorted(hoster.bodies()) == sorted(make_message(f"drain-{i}") for i in range(10))
    assert "tunnel stopped" in mm.log()


def test_sessions_that_outlast_the_drain_are_closed(tunnel_double):
    mm, _ = tunnel_double("echo", 0, "{port}", options=["--drain", 1.5])
    clients = echo_clients(mm.port, 3)
    signalled = time.monotonic()
    mm.proc.send_signal(signal.SIGTERM)
    assert mm.proc.wait(timeout=10) == 0
    assert time.monotonic() - signalled < 1.5 + 1
    for client in clients:
        client.settimeout(5)
        assert client.recv(100) == b""                   # closed, not left hanging
        client.close()
    assert mm.tunnels() == []


def test_a_second_signal_stops_at_once(tunnel_double):
    mm, client = draining(tunnel_double)
    signalled = time.monotonic()
    mm.proc.send_signal(signal.SIGINT)
    assert mm.proc.wait(timeout=10) == 0
    assert time.monotonic() - signalled < 2
    client.close()


def test_a_tunnel_that_dies_during_the_drain_is_not_started_again(tunnel_double):
    mm, client = draining(tunnel_double)
    (tunnel, _, _), = mm.tunnels()
    os.kill(tunnel, signal.SIGKILL)                      # as systemd's KillMode=control-group would
    assert mm.proc.wait(timeout=5) == 0
    assert client.recv(1) == b""
    client.close()
    assert mm.tunnel_starts() == 1
    assert "closed: the tunnel ended under the session" in mm.log()


# ---------------------------------------------------------------------------
# Clients that misbehave
# ---------------------------------------------------------------------------

def test_an_idle_client_is_closed(tunnel_double):
    mm, _ = tunnel_double("echo", 0, "{port}", options=["--idle-timeout", 1])
    with socket.create_connection(("127.0.0.1", mm.port), timeout=10) as client:
        client.sendall(b"hello")
        assert client.recv(10) == b"hello"
        opened = time.monotonic()
        client.settimeout(5)
        assert client.recv(10) == b""                    # then nothing for a second: closed
        assert 1 <= time.monotonic() - opened < 2
    mm.wait_for_log(r"closed: idle for 1 s; 5 bytes from client, 5 to client")


def test_a_client_that_resets_is_logged_not_a_traceback(tunnel_double):
    mm, _ = tunnel_double("echo", 0, "{port}")
    client = socket.create_connection(("127.0.0.1", mm.port), timeout=10)
    client.sendall(b"y" * 100_000)
    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    client.close()                                       # a reset, with the echo unread
    mm.wait_for_log(r"client 127\.0\.0\.1:\d+: closed: E[A-Z]+; 100000 bytes from client")
    assert not re.search(r"^Traceback|failed with", mm.log(), re.M)   # gevent's crash report
    assert try_echo(mm.port)


def test_more_than_max_clients_get_421_at_once(tunnel_double):
    mm, _ = tunnel_double("echo", 0, "{port}", options=["--max-clients", 2])
    held = echo_clients(mm.port, 2)
    with socket.create_connection(("127.0.0.1", mm.port), timeout=10) as third:
        assert read_until_eof(third, timeout=3) == b"421 4.3.2 minimail: too many clients, try again later\r\n"
    held.pop().close()
    mm.wait_for_log(r"client .*: ok; 1 bytes from client")
    assert try_echo(mm.port)                             # room again
    for client in held:
        client.close()


def test_a_client_that_leaves_while_the_tunnel_starts_leaves_nothing_behind(tunnel_double):
    mm, _ = tunnel_double("echo", 2, "{port}", linger=0.5)   # the tunnel needs 2 s to come up
    client = socket.create_connection(("127.0.0.1", mm.port), timeout=10)
    wait_until(lambda: mm.tunnel_starts() == 1, 5, "the tunnel to start")
    client.close()
    mm.wait_for_log(r"client .*: client left before the tunnel was up")
    mm.wait_for_log(r"tunnel stopped \(pid \d+, linger expired\)", timeout=5)
    assert mm.tunnels() == []


def test_the_open_files_limit_is_raised_to_the_hard_limit(tunnel_double):
    mm, _ = tunnel_double("echo", 0, "{port}")
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    mm.wait_for_log(rf"open files limit: {hard}\b")
    soft_in_minimail = Path(f"/proc/{mm.proc.pid}/limits").read_text()
    assert re.search(rf"Max open files\s+{hard}\s+{hard}", soft_in_minimail)


# ---------------------------------------------------------------------------
# A soak: thousands of sessions, then nothing left behind
# ---------------------------------------------------------------------------

def resources(pid):
    """(open file descriptors, resident memory in KiB) of a process."""
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    rss = int(re.search(r"VmRSS:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text())[1])
    return fds, rss


def quick_session(port):
    """connect, 220, QUIT, 221, close."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        reader = sock.makefile("rb")
        assert reader.readline().startswith(b"220")
        sock.sendall(b"QUIT\r\n")
        assert reader.readline().startswith(b"221")
        reader.close()


def crowd(port, count, mail_every=10):
    """count clients at once: every mail_every-th sends a mail, the rest say QUIT."""
    errors, gate = [], threading.Barrier(count)

    def client(i):
        try:
            gate.wait(timeout=30)
            if i % mail_every:
                quick_session(port)
            else:
                send_mail(port, make_message(f"crowd-{i}", size=5000))
        except Exception as exc:                          # reported by the caller
            errors.append(repr(exc))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    return errors


def test_soak_2000_sessions_in_a_row_and_300_at_once_leave_nothing_behind(via_ssh, hoster):
    mm = via_ssh("--max-clients", 1000, linger=1)

    def idle_again(sessions):
        """Wait until every session has ended and the tunnel has stopped."""
        wait_until(lambda: mm.log().count("client 127.0.0.1") == sessions, 30, "the sessions to end")
        wait_until(lambda: mm.log().count("tunnel stopped") == mm.tunnel_starts(), 10,
                   "the tunnel to stop")
        wait_until(lambda: mm.tunnels() == [], 5, "ssh to be reaped")
        return resources(mm.proc.pid)

    idle = resources(mm.proc.pid)                      # listening, never used
    for _ in range(50):                                  # warm up: the tunnel, and the
        quick_session(mm.port)                           # allocator's high-water mark
    assert crowd(mm.port, 300) == []
    before = idle_again(350)

    started = time.monotonic()
    for _ in range(2000):
        quick_session(mm.port)
    in_a_row = 2000 / (time.monotonic() - started)
    assert crowd(mm.port, 300) == []
    after = idle_again(2650)
    print(f"\nsoak: {in_a_row:.0f} sessions/s in a row; idle at start {idle[0]} fds, {idle[1]} KiB; "
          f"idle after 350 sessions {before[0]} fds, {before[1]} KiB; "
          f"idle after 2300 more {after[0]} fds, {after[1]} KiB")
    assert idle[0] == before[0] == after[0], "file descriptors leaked"
    assert after[1] - before[1] < 2 * 1024, "memory grew by 2 MiB or more"
    assert len(hoster.messages) == 60
    assert mm.log().count(": ok; ") == 2650
    assert re.search(r"tunnel stopped \(pid \d+, linger expired\)", mm.log())   # no zombie: reaped


# ---------------------------------------------------------------------------
# The splice keeps every byte, in order, whatever the sizes and half-closes
# ---------------------------------------------------------------------------

#: A far side for the property test: the first line says what to do.
#:   "echo"            -- echo everything until EOF, then half-close
#:   "send N TOKEN"    -- send N pseudo-random bytes and half-close, then read to
#:                        EOF and write "<length> <sha256>" of it to TOKEN.out
FAR_SIDE = r'''
import hashlib, os, random, socket, sys, threading

def serve(conn, out_dir):
    reader = conn.makefile("rb")
    words = reader.readline().split()
    if words[0] == b"echo":
        while True:
            data = reader.read1(65536)
            if not data:
                break
            conn.sendall(data)
        conn.shutdown(socket.SHUT_WR)
    else:
        size, token = int(words[1]), words[2].decode()
        conn.sendall(random.Random(size).randbytes(size))
        conn.shutdown(socket.SHUT_WR)
        digest, length = hashlib.sha256(), 0
        while True:
            data = reader.read1(65536)
            if not data:
                break
            digest.update(data)
            length += len(data)
        with open(f"{out_dir}/{token}.tmp", "w") as out:     # whole, or not there
            out.write(f"{length} {digest.hexdigest()}")
        os.rename(f"{out_dir}/{token}.tmp", f"{out_dir}/{token}.out")
    conn.close()

listener = socket.create_server(("127.0.0.1", int(sys.argv[1])))
while True:
    conn, _ = listener.accept()
    threading.Thread(target=serve, args=(conn, sys.argv[2]), daemon=True).start()
'''


@pytest.fixture(scope="module")
def splice_target(tmp_path_factory):
    """One minimail whose tunnel command is FAR_SIDE, for every example."""
    root = tmp_path_factory.mktemp("splice")
    (root / "far_side.py").write_text(FAR_SIDE)
    tunnel_port = free_port()
    mm = Minimail(["--tunnel-port", str(tunnel_port), "--linger", "600", "--jitter", "0",
                   "--tunnel-command", f"{sys.executable} {root / 'far_side.py'} {tunnel_port} {root}"],
                  root / "minimail.log")
    yield mm, root
    assert mm.stop() == 0


def send_chunks(sock, data, sizes, pauses):
    """Write data in the given chunk sizes (the rest in one), pausing between some."""
    offset = 0
    for size, pause in zip(sizes, pauses):
        sock.sendall(data[offset:offset + size])
        offset += size
        if pause:
            time.sleep(0.001)
    sock.sendall(data[offset:])


def read_in_chunks(sock, sizes, into):
    """Read to EOF with the given read sizes (cycled)."""
    i = 0
    while True:
        chunk = sock.recv(sizes[i % len(sizes)])
        if not chunk:
            return
        into.append(chunk)
        i += 1


sizes = st.lists(st.integers(1, 200_000), min_size=1, max_size=12)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(payload_size=st.integers(0, 1_500_000), writes=sizes, reads=sizes,
       pauses=st.lists(st.booleans(), max_size=12), far_side_first=st.booleans(),
       far_size=st.integers(1, 600_000))   # ending before its first byte is a silent close:
                                           # the queue's (test_bounds.py)
def test_the_splice_keeps_every_byte_in_order(splice_target, payload_size, writes, reads, pauses,
                                              far_side_first, far_size):
    mm, root = splice_target
    payload = os.urandom(payload_size)
    with socket.create_connection(("127.0.0.1", mm.port), timeout=30) as client:
        received = []
        if far_side_first:                   # the far side speaks and half-closes first
            token = os.urandom(6).hex()
            client.sendall(f"send {far_size} {token}\n".encode())
            read_in_chunks(client, reads, received)
            expected = random.Random(far_size).randbytes(far_size)
            assert hashlib.sha256(b"".join(received)).digest() == hashlib.sha256(expected).digest()
            send_chunks(client, payload, writes, pauses)
            client.shutdown(socket.SHUT_WR)
            assert client.recv(1) == b""
            report = root / f"{token}.out"
            wait_until(report.exists, 10, "the far side's report")
            assert report.read_text() == f"{payload_size} {hashlib.sha256(payload).hexdigest()}"
        else:                                # the client writes and half-closes first
            reader = threading.Thread(target=read_in_chunks, args=(client, reads, received))
            reader.start()
            client.sendall(b"echo\n")
            send_chunks(client, payload, writes, pauses)
            client.shutdown(socket.SHUT_WR)
            reader.join(timeout=30)
            assert not reader.is_alive()
            echoed = b"".join(received)           # the far side echoes what follows "echo\n"
            assert len(echoed) == payload_size
            assert hashlib.sha256(echoed).digest() == hashlib.sha256(payload).digest()
