"""minimail's bounds: far sides that close without a word or answer slowly,
stale tunnels told from slow ones, the first client after a suspend, clients
that never read their replies or trickle their mail, a SIGTERM in the middle
of a commit or a delivery, child timers, and who may lock the pid file or
hand root a settings file.

As in the other modules, the real program runs against real clients; the far
side here is a small SMTP server of this module's own, run as the tunnel
command on a TCP port (FAR_SIDE), so that it can misbehave on cue: close
without a word, greet late, answer slowly, or stay silent.
"""

import json
import os
import pwd
import re
import shutil
import signal
import smtplib
import socket
import subprocess
import sys
import time
from pathlib import Path

import gevent
import pytest
from docopt import docopt

import minimail
from conftest import (
    AS_ROOT, MINIMAIL, SWAKS, alive, as_nobody, free_port, make_message, minimail_command, need,
    wait_until)

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")

#: A tunnel command that is its own far side: an SMTP server on the tunnel port.
#:   far_side.py PORT DIR SPEC  -- SPEC is JSON: a list of behaviours, one for each
#:   connection in turn (the last one for all later connections), each a dict:
#:   close (accept, then close without a word), silent (accept, never speak),
#:   greet_after, rcpt_delay, dot_delay (seconds).  It marks in DIR what it saw:
#:   conn-N when connection N (from 0) came, conn-N-rcpt at its first RCPT,
#:   conn-N-data once DATA began; each message it took is written to
#:   msg-N-K.eml (whole, or not there) before the reply to its final dot.
FAR_SIDE = r'''
import json, os, socket, sys, threading, time

port, where, spec = int(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3])

def mark(name, data=b""):
    with open(os.path.join(where, name + ".tmp"), "wb") as out:
        out.write(data)
    os.rename(os.path.join(where, name + ".tmp"), os.path.join(where, name))

def serve(conn, n, how):
    mark(f"conn-{n}")
    if how.get("close"):
        conn.close()
        return
    if how.get("silent"):
        time.sleep(3600)
    time.sleep(how.get("greet_after", 0))
    reader = conn.makefile("rb")
    conn.sendall(b"220 far.example ESMTP\r\n")
    taken = 0
    for line in reader:
        verb = line[:4].upper()
        if verb in (b"EHLO", b"HELO"):
            conn.sendall(b"250-far.example\r\n250 8BITMIME\r\n")
        elif verb == b"RCPT":
            if not os.path.exists(os.path.join(where, f"conn-{n}-rcpt")):
                mark(f"conn-{n}-rcpt")
            time.sleep(how.get("rcpt_delay", 0))
            conn.sendall(b"250 ok\r\n")
        elif verb == b"DATA":
            conn.sendall(b"354 go on\r\n")
            mark(f"conn-{n}-data")
            message = b""
            for text in reader:
                if text == b".\r\n":
                    break
                message += text[1:] if text.startswith(b".") else text
            mark(f"msg-{n}-{taken}.eml", message)
            taken += 1
            time.sleep(how.get("dot_delay", 0))
            conn.sendall(b"250 taken\r\n")
        elif verb == b"QUIT":
            conn.sendall(b"221 bye\r\n")
            break
        else:
            conn.sendall(b"250 ok\r\n")
    conn.close()

listener = socket.create_server(("127.0.0.1", port))
count = 0
while True:
    conn, _ = listener.accept()
    how = spec[min(count, len(spec) - 1)]
    threading.Thread(target=serve, args=(conn, count, how), daemon=True).start()
    count += 1
'''


@pytest.fixture
def far_side(tmp_path, minimail_process):
    """start(spec, *options) -> (minimail, the far side's record directory): minimail
    whose tunnel command is FAR_SIDE with that SPEC (a list of dicts)."""
    script = tmp_path / "far_side.py"
    script.write_text(FAR_SIDE)
    records = tmp_path / "far"
    records.mkdir()

    def start(spec, *options, linger=30):
        port = free_port()
        command = f"{sys.executable} {script} {port} {records} '{json.dumps(spec)}'"
        mm = minimail_process("--tunnel-port", port, "--tunnel-command", command,
                              "--linger", linger, "--jitter", 0, *options)
        return mm, records
    return start


def taken(records):
    """The messages the far side took, in the order of their files' names."""
    return [path.read_bytes() for path in sorted(records.glob("msg-*.eml"))]


def without_received(content):
    return re.sub(rb"\AReceived: [^\r]*\r\n(?:[ \t][^\r]*\r\n)*", b"", content)


def mail(port, marker, timeout=30):
    """smtplib sends one message; the reply to its DATA."""
    with smtplib.SMTP("127.0.0.1", port, timeout=timeout) as smtp:
        smtp.ehlo("desktop.example")
        assert smtp.mail("cron@desktop.example")[0] == 250
        assert smtp.rcpt("admin@hoster.example")[0] == 250
        return smtp.data(make_message(marker))


# ---------------------------------------------------------------------------
# Item 8: a far side that closes without a word, over a TCP tunnel
# ---------------------------------------------------------------------------

def test_a_far_side_closing_without_a_word_over_tcp_sends_the_mail_to_the_queue(far_side):
    mm, records = far_side([{"close": True}, {}], "--queue-retry", 0.5)
    code, reply = mail(mm.port, "silent-close")
    assert code == 250 and reply.startswith(b"2.0.0 queued as "), reply
    mm.wait_for_log(r"client 127\.0\.0\.1:\d+: queue \(the far side closed the connection "
                    r"without a word")
    wait_until(lambda: taken(records), 20, "the queued mail to be delivered")
    assert [without_received(m) for m in taken(records)] == [make_message("silent-close")]


def test_with_swaks_and_no_queue_a_silent_close_over_tcp_is_a_421(far_side, tmp_path):
    need("swaks", SWAKS)
    mm, _ = far_side([{"close": True}], "--no-queue")
    result = subprocess.run(["swaks", "--server", f"127.0.0.1:{mm.port}", "--to",
                             "admin@hoster.example", "--from", "cron@desktop.example",
                             "--timeout", "20"], capture_output=True, text=True, timeout=60)
    assert "<** 421 4.4.0 minimail: the far side closed the connection without a word" in \
        result.stdout, result.stdout


# ---------------------------------------------------------------------------
# Item 10: the stale check counts the far side's bytes on the child, for all
# ---------------------------------------------------------------------------

def failing_until(flag, command):
    """A tunnel command that fails (exit 3) until the file flag exists, then runs command."""
    return f"sh -c 'test -e {flag} || exit 3; exec {command}'"


def test_a_slow_greeting_while_the_runner_hears_the_far_side_is_no_stale_tunnel(
        tmp_path, minimail_process):
    script = tmp_path / "far_side.py"
    script.write_text(FAR_SIDE)
    records, flag, port = tmp_path / "far", tmp_path / "reachable", free_port()
    records.mkdir()
    spec = [{"rcpt_delay": 0.25}, {"greet_after": 3}, {}]      # the runner's, the client's
    command = f"{sys.executable} {script} {port} {records} {json.dumps(json.dumps(spec))}"
    mm = minimail_process("--tunnel-port", port, "--tunnel-command", failing_until(flag, command),
                          "--greeting-wait", 1, "--queue-retry", 600, "--linger", 30,
                          "--jitter", 0)
    recipients = [f"r{i}@hoster.example" for i in range(12)]  # 12 slow replies: 3 s
    with smtplib.SMTP("127.0.0.1", mm.port, timeout=30) as smtp:
        assert smtp.sendmail("cron@desktop.example", recipients, make_message("queued")) == {}
    flag.touch()
    mm.proc.send_signal(signal.SIGUSR1)                      # minimail flush
    wait_until(lambda: (records / "conn-0-rcpt").exists(), 20, "the runner's first RCPT")
    asked = time.monotonic()
    with smtplib.SMTP("127.0.0.1", mm.port, timeout=30) as smtp:    # a warm tunnel, slow greeting
        greeted = time.monotonic() - asked
        assert smtp.noop()[0] == 250
    print(f"\na slow greeting (3 s, --greeting-wait 1) while the runner delivers: {greeted:.2f} s")
    wait_until(lambda: taken(records), 20, "the runner's delivery")
    mm.wait_for_log(r"queue: [0-9A-F]+: 12 delivered")
    assert "stale" not in mm.log()
    assert mm.tunnel_starts() == 2                           # the failed one, and the one that worked
    assert greeted >= 2.5


def test_a_client_right_behind_another_through_a_stale_tunnel_is_moved_within_the_wait(far_side):
    spec = [{}, {"greet_after": 0.02}, {"silent": True}]   # warm-up, A, then silence (stale)
    mm, records = far_side(spec, "--greeting-wait", 1)
    code, _ = mail(mm.port, "warm-up")
    assert code == 250
    first = socket.create_connection(("127.0.0.1", mm.port), timeout=30)
    time.sleep(0.05)                                       # within 0.1 s of the first's arrival
    asked = time.monotonic()
    second = socket.create_connection(("127.0.0.1", mm.port), timeout=30)
    try:
        assert first.recv(100).startswith(b"220 far.example")
        second.settimeout(10)
        greeting = second.recv(100)
        took = time.monotonic() - asked
    finally:
        first.close()
        second.close()
    print(f"\nthe stale check for a client 0.05 s behind another: greeted after {took:.2f} s "
          f"(--greeting-wait 1)")
    assert greeting.startswith(b"220 far.example")
    assert 1 <= took < 1 + 3
    mm.wait_for_log(r"tunnel \(pid \d+\) is stale: the far side said nothing for 1 s")
    assert mm.tunnel_starts() == 2


# ---------------------------------------------------------------------------
# Item 11: the first client after a suspend waits for the supervisor's verdict
# ---------------------------------------------------------------------------

def settings_for(*argv):
    args = docopt(minimail.__doc__, ["--foreground", "--no-queue", *map(str, argv)])
    return minimail.Settings(args)


def supervisor_with_clock(command, port, **options):
    """(an in-process supervisor whose CLOCK_BOOTTIME can jump ahead, the jump, its greenlet)."""
    monotonic, boot = time.monotonic, [0.0]
    settings = settings_for("--tunnel-port", port, "--tunnel-command", command)
    supervisor = minimail.Supervisor(settings, lambda n: port, grace=0.2,
                                     clocks=(monotonic, lambda: monotonic() + boot[0]), **options)
    return supervisor, boot, gevent.spawn(supervisor.run)


def stop_supervisor(supervisor, greenlet):
    supervisor.stop_all()
    supervisor.all_gone.wait(timeout=5)
    greenlet.kill()


def socat_on(port):
    return f"socat TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork SYSTEM:true"


def test_the_first_client_after_a_resume_goes_through_a_fresh_tunnel():
    port = free_port()
    supervisor, boot, greenlet = supervisor_with_clock(socat_on(port), port)
    with gevent.Timeout(20):
        with supervisor.visit() as tunnel:
            upstream, before = tunnel.connect(5)
            upstream.close()
        boot[0] += 60                                   # the machine slept for a minute
        with supervisor.visit() as tunnel:              # as forward() does: arrive, connect
            upstream, after = tunnel.connect(5)
            upstream.close()
        assert after is not before
        assert before.stop_reason == "resumed after 60 s asleep"
        assert supervisor.launches == 2
        stop_supervisor(supervisor, greenlet)


def test_a_backoff_from_before_a_suspend_refuses_no_client_after_it(tmp_path):
    port, flag = free_port(), tmp_path / "reachable"
    supervisor, boot, greenlet = supervisor_with_clock(failing_until(flag, socat_on(port)), port,
                                                       backoff_first=30)
    with gevent.Timeout(20):
        with supervisor.visit() as tunnel:
            with pytest.raises(minimail.TunnelUnavailable, match="next try in 30 s"):
                tunnel.connect(5)
        flag.touch()                                    # the network is back...
        boot[0] += 600                                  # ...after a night asleep
        with supervisor.visit() as tunnel:
            upstream, child = tunnel.connect(5)         # not "next try in 30 s"
            upstream.close()
        assert supervisor.launches == 2
        stop_supervisor(supervisor, greenlet)


# ---------------------------------------------------------------------------
# Item 16: a child's timers end with it
# ---------------------------------------------------------------------------

def test_a_stop_while_the_child_is_being_reaped_leaves_no_timer_behind(monkeypatch):
    signalled = []
    monkeypatch.setattr(minimail, "signal_group", lambda pgid, signum: signalled.append(signum))
    # The tunnel ends at once, but a process of another session holds its stderr
    # open: the watcher waits for that (up to the grace) after reaping it.
    child = minimail.Child(["sh", "-c", "setsid sleep 2 & exit 0"], free_port(), False, 0.5,
                           on_exit=lambda c: None)
    child.launch(time.monotonic(), minimail.libc_function("prctl"))
    with gevent.Timeout(10):
        while child.returncode is None:
            gevent.sleep(0.01)
        assert not child.died.is_set()                  # reaped, its watcher still waiting
        signalled.clear()
        child.stop("linger expired")                    # the supervisor did not know yet
        child.died.wait()
        gevent.sleep(2 * 0.5 + 0.3)                     # past both of a stop's later steps
    assert signalled == [], "a reaped (maybe reused) process group was signalled"
    assert all(timer.dead for timer in child.timers)


# ---------------------------------------------------------------------------
# Item 19: a closed pipe, and what the sendmail command echoes
# ---------------------------------------------------------------------------

def fill_queue(queue, count):
    """count messages in queue/queued, as the receiver writes them."""
    for where in ("tmp", "queued", "failed"):
        (queue / where).mkdir(parents=True, mode=0o700)
    queue.chmod(0o700)
    for n in range(count):
        queue_id = f"{0x1000000000000 + n:013X}ABC"
        envelope = minimail.Envelope(queue_id, "cron@desktop.example", ["admin@hoster.example"],
                                     time.time(), 100, next_try=time.time() + 60)
        (queue / "queued" / f"{queue_id}.msg").write_bytes(
            minimail.ENVELOPE_LINE + envelope.to_json() + b"\r\n" + make_message("x", 100))


def test_a_queue_listing_into_head_ends_quietly(tmp_path):
    fill_queue(tmp_path / "queue", 2000)
    result = subprocess.run(
        ["bash", "-c", f"{sys.executable} {MINIMAIL} queue --queue {tmp_path / 'queue'} | head -1; "
                       f"echo \"status ${{PIPESTATUS[0]}}\" >&2"],
        capture_output=True, text=True, timeout=60)
    assert result.stdout.startswith(f"queue in {tmp_path / 'queue'}: 2000 message(s) waiting")
    assert result.stdout.count("\n") == 1
    assert result.stderr == "status 141\n"               # as SIGPIPE ends other tools


@pytest.mark.parametrize("flag, said", [
    ("-B8BITMIME\nX", r"-B 8BITMIME\nX: the body type is 8BITMIME or 7BIT"),
    ("-bx\rforged", r"-bx\rforged is not supported here"),
    ("-\x1b", r"unknown flag -\x1b"),
])
def test_the_sendmail_command_echoes_a_bad_flag_escaped(flag, said):
    result = minimail_command("sendmail", flag, "admin@hoster.example")
    assert result.returncode == 64
    assert result.stderr.count("\n") == 1 and "\x1b" not in result.stderr
    assert said in result.stderr


def test_an_unknown_option_is_echoed_escaped():
    result = minimail_command("--frob\nforged", "hoster")
    assert result.returncode == 2
    assert result.stderr.splitlines()[0] == r"minimail: unknown option --frob\nforged"


# ---------------------------------------------------------------------------
# Item 17: the pid file's lock is minimail's alone
# ---------------------------------------------------------------------------

def lock_as_nobody(pidfile, holding):
    """As another user, in a fork: take the pid file's lock if the file opens, and
    hold it while the file holding exists.  (The fork's pid, what it said.)"""
    nobody = pwd.getpwnam("nobody")
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:
        import fcntl
        try:
            os.close(read_end)
            os.setgid(nobody.pw_gid)
            os.setuid(nobody.pw_uid)
            try:
                fd = os.open(pidfile, os.O_RDONLY)
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                os.write(write_end, f"refused: {exc.strerror}\n".encode())
            else:
                os.write(write_end, b"locked\n")
                for _ in range(600):
                    if not os.path.exists(holding):
                        break
                    time.sleep(0.05)
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end) as said:
        return child, said.readline()


@root_only
def test_after_a_kill_9_another_user_cannot_lock_minimail_out(run_dir, tunnel_script):
    pidfile = run_dir / "minimail.pid"

    def start():
        return minimail_command(
            "start", *AS_ROOT, "--listen", f"127.0.0.1:{free_port()}", "--pidfile", pidfile,
            "--logfile", run_dir / "minimail.log", "--queue", run_dir / "queue",
            *tunnel_script("echo", 0, "{port}"))
    assert start().returncode == 0
    daemon = int(pidfile.read_text())
    assert pidfile.stat().st_mode & 0o777 == 0o600
    status, said = as_nobody(lambda out: minimail.main(["status", "--pidfile", str(pidfile)]))
    assert (status, said) == (0, f"minimail is running (pid {daemon}); the rest is for its user "
                                 f"and root: try sudo minimail status\n")
    os.kill(daemon, signal.SIGKILL)                      # its pid file stays behind
    wait_until(lambda: not alive(daemon), 10, "the daemon to die")
    holding = run_dir / "holding"
    holding.touch()
    locker, said = lock_as_nobody(str(pidfile), str(holding))
    try:
        assert said == "refused: Permission denied\n"
        started = start()
        assert started.returncode == 0, started.stderr
        assert minimail_command("stop", "--pidfile", pidfile).returncode == 0
    finally:
        holding.unlink()
        os.waitpid(locker, 0)


# ---------------------------------------------------------------------------
# Item 18: root reads only a settings file nobody else can change
# ---------------------------------------------------------------------------

def with_config(path):
    return {**os.environ, "MINIMAIL_CONFIG": str(path)}


@root_only
def test_root_refuses_a_settings_file_others_can_change(tmp_path):
    good = tmp_path / "good"
    good.mkdir(mode=0o755)
    open_dir = tmp_path / "open"
    open_dir.mkdir()
    open_dir.chmod(0o777)
    cases = {good / "strangers.conf": (65534, 0o644, "belongs to nobody, not root"),
             good / "writable.conf": (0, 0o666, "may be written by others (mode 0666)"),
             open_dir / "minimail.conf": (0, 0o644, f"({open_dir}) may be written by others "
                                                    f"(mode 0777)")}
    for path, (owner, mode, why) in cases.items():
        path.write_text("MINIMAIL_OPTIONS=--tunnel-port 2526 --tunnel-command 'touch /tmp/owned'\n")
        os.chown(path, owner, owner)
        path.chmod(mode)
        result = minimail_command("status", "--pidfile", tmp_path / "x.pid", env=with_config(path))
        assert result.returncode == 2, result.stderr
        assert result.stderr.count("\n") == 1 and why in result.stderr, result.stderr
        assert result.stderr.startswith("minimail: the ") and f"settings file {path}" in result.stderr
        result = minimail_command("sendmail", "root", env=with_config(path))
        assert result.returncode == 78 and result.stderr.count("\n") == 1, result.stderr
        assert why in result.stderr
        result = minimail_command("status", "--config", path, "--pidfile", tmp_path / "x.pid")
        assert result.returncode == 2 and why in result.stderr
    ours = good / "minimail.conf"
    ours.write_text("MINIMAIL_ADMIN=admin@hoster.example\n")
    ours.chmod(0o644)
    for path in (ours, os.devnull):
        result = minimail_command("status", "--pidfile", tmp_path / "x.pid", env=with_config(path))
        assert (result.returncode, result.stdout) == (3, "minimail is not running\n"), result.stderr


# ---------------------------------------------------------------------------
# Item 14: clients that never read their replies, or trickle their mail
# ---------------------------------------------------------------------------

def peak_rss_kib(pid):
    return int(re.search(r"VmHWM:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text())[1])


def non_reader(port):
    """A client with a small receive buffer (its replies back up soon)."""
    client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    client.settimeout(10)
    client.connect(("127.0.0.1", port))
    client.setblocking(False)
    return client


def pipeline_without_reading(port, count, seconds):
    """count clients that pipeline HELP (a long reply to a short command) as fast
    as minimail takes it and never read a reply; the open sockets."""
    clients = [non_reader(port) for _ in range(count)]
    burst = b"HELP\r\n" * 10000
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        moved = 0
        for client in clients:
            try:
                moved += client.send(burst)
            except BlockingIOError:
                pass
            except OSError:              # cut by minimail: that is allowed
                pass
        if not moved:
            time.sleep(0.05)
    return clients


def test_a_hundred_clients_that_never_read_their_replies_hold_little_memory(minimail_process):
    port = free_port()
    mm = minimail_process("--tunnel-port", port, "--tunnel-command", "sh -c 'exit 3'",
                          "--max-clients", 200)
    before = peak_rss_kib(mm.proc.pid)
    clients = pipeline_without_reading(mm.port, 100, 8)
    peak = peak_rss_kib(mm.proc.pid)
    for client in clients:
        client.close()
    print(f"\npeak RSS with 100 clients that never read their replies: {peak / 1024:.1f} MiB "
          f"(at the start: {before / 1024:.1f} MiB)")
    assert peak < before + 20 * 1024                   # 0.2.0: 74 MiB more in these 8 s


def queue_only(minimail_process, *options):
    """minimail whose tunnel always fails at once: every client is the queue's."""
    port = free_port()
    return minimail_process("--tunnel-port", port, "--tunnel-command", "sh -c 'exit 3'", *options)


def test_a_client_that_reads_no_reply_is_cut_after_the_idle_timeout(minimail_process):
    mm = queue_only(minimail_process, "--idle-timeout", 1)
    clients = pipeline_without_reading(mm.port, 1, 3)
    mm.wait_for_log(r"client 127\.0\.0\.1:\d+: queue \(.*\): 0 message\(s\) queued; closed: "
                    r"its replies went unread for 1 s", timeout=5)
    clients[0].close()


def test_a_client_that_trickles_its_message_is_cut_at_the_data_deadline(minimail_process):
    mm = queue_only(minimail_process, "--idle-timeout", 1, "--max-size", 100_000)
    with socket.create_connection(("127.0.0.1", mm.port), timeout=10) as client:
        replies = client.makefile("rb")
        assert replies.readline().startswith(b"220 ")
        client.sendall(b"HELO desktop.example\r\nMAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\n")
        for _ in range(4):
            assert replies.readline()[:3] in (b"250", b"354")
        started = time.monotonic()
        cut = None
        for _ in range(100):                             # a byte every 0.3 s: never idle
            try:
                client.sendall(b"x")
            except OSError:
                break
            time.sleep(0.3)
            if cut is None and select_readable(client):
                cut = replies.readline()
                break
        took = time.monotonic() - started
    print(f"\na client trickling DATA was cut after {took:.1f} s (--idle-timeout 1, "
          f"--max-size 100000)")
    assert cut == b"421 4.4.2 minimail: the message did not arrive within 1.38147 s, closing\r\n"
    assert took < 3
    mm.wait_for_log(r"closed: DATA not done within 1\.38147 s")


def select_readable(sock):
    import select
    return bool(select.select([sock], [], [], 0)[0])


# ---------------------------------------------------------------------------
# Item 9: SIGTERM while a commit or a delivery is under way
# ---------------------------------------------------------------------------

#: fsync(2), made slow once: the first call marks $SLOW_FSYNC_MARK, then takes 1.5 s.
SLOW_FSYNC = r'''
#define _GNU_SOURCE
#include <dlfcn.h>
#include <fcntl.h>
#include <stdlib.h>
#include <unistd.h>

int fsync(int fd) {
    static int slowed = 0;
    int (*real)(int) = (int (*)(int)) dlsym(RTLD_NEXT, "fsync");
    const char *mark = getenv("SLOW_FSYNC_MARK");
    if (mark && !__atomic_exchange_n(&slowed, 1, __ATOMIC_SEQ_CST)) {
        int marked = open(mark, O_WRONLY | O_CREAT, 0644);
        if (marked >= 0)
            close(marked);
        usleep(1500000);
    }
    return real(fd);
}
'''


@pytest.fixture
def slow_fsync(tmp_path, monkeypatch):
    """Processes started from now on in this test take 1.5 s for their first fsync;
    the path returned appears when that fsync begins."""
    gcc = shutil.which("gcc")
    need("gcc", gcc)
    source, library = tmp_path / "slow_fsync.c", tmp_path / "slow_fsync.so"
    source.write_text(SLOW_FSYNC)
    subprocess.run([gcc, "-shared", "-fPIC", "-o", library, source, "-ldl"], check=True,
                   timeout=60)
    mark = tmp_path / "fsync-began"
    monkeypatch.setenv("LD_PRELOAD", str(library))
    monkeypatch.setenv("SLOW_FSYNC_MARK", str(mark))
    return mark


def test_sigterm_during_a_commit_still_answers_250_and_the_mail_goes_once(
        tmp_path, slow_fsync, minimail_process, monkeypatch):
    script = tmp_path / "far_side.py"
    script.write_text(FAR_SIDE)
    records, port, queue = tmp_path / "far", free_port(), tmp_path / "queue"
    records.mkdir()
    mm = minimail_process("--tunnel-port", port, "--tunnel-command", "sh -c 'exit 3'",
                          "--queue", queue, "--drain", 0)
    with socket.create_connection(("127.0.0.1", mm.port), timeout=30) as client:
        replies = client.makefile("rb")
        assert replies.readline().startswith(b"220 ")
        client.sendall(b"HELO desktop.example\r\nMAIL FROM:<cron@desktop.example>\r\n"
                       b"RCPT TO:<admin@hoster.example>\r\nDATA\r\n")
        for _ in range(4):
            assert replies.readline()[:3] in (b"250", b"354")
        client.sendall(re.sub(rb"(?m)^\.", b"..", make_message("committed")) + b".\r\n")
        wait_until(slow_fsync.exists, 10, "the commit's fsync")
        mm.proc.send_signal(signal.SIGTERM)              # --drain 0: the cut comes at once
        answer = replies.readline()
    assert answer.startswith(b"250 2.0.0 queued as "), answer
    assert mm.stop() == 0
    assert "cut: the drain of 0 s ran out" in mm.log()
    monkeypatch.delenv("LD_PRELOAD")
    spec = json.dumps(json.dumps([{}]))
    again = minimail_process("--tunnel-port", port, "--tunnel-command",
                             f"{sys.executable} {script} {port} {records} {spec}",
                             "--queue", queue, "--linger", 30, "--jitter", 0)
    wait_until(lambda: taken(records), 20, "the queued mail to be delivered")
    again.wait_for_log(r"queue: [0-9A-F]+: 1 delivered")
    assert [without_received(m) for m in taken(records)] == [make_message("committed")]


def test_sigterm_lets_the_runner_finish_its_message_and_charges_no_other(
        tmp_path, minimail_process):
    script = tmp_path / "far_side.py"
    script.write_text(FAR_SIDE)
    flag, port, queue = tmp_path / "reachable", free_port(), tmp_path / "queue"
    first, second = tmp_path / "far-1", tmp_path / "far-2"

    def start(records, spec):
        records.mkdir()
        command = f"{sys.executable} {script} {port} {records} {json.dumps(json.dumps(spec))}"
        return minimail_process("--tunnel-port", port, "--tunnel-command",
                                failing_until(flag, command), "--queue", queue,
                                "--queue-retry", 600, "--linger", 30, "--jitter", 0)
    mm = start(first, [{"dot_delay": 2}])                # the hoster takes 2 s for each mail
    for n in range(3):
        assert mail(mm.port, f"queued-{n}")[0] == 250
    flag.touch()
    mm.proc.send_signal(signal.SIGUSR1)                  # minimail flush
    wait_until(lambda: (first / "conn-0-data").exists(), 20, "the first delivery's DATA")
    asked = time.monotonic()
    assert mm.stop() == 0                                 # SIGTERM, --drain 10
    stopped = time.monotonic() - asked
    print(f"\nSIGTERM with the runner inside a 2 s delivery: stopped after {stopped:.1f} s")
    assert stopped < 10
    assert re.search(r"queue: [0-9A-F]+: 1 delivered", mm.log())
    assert len(taken(first)) == 1
    waiting = sorted((queue / "queued").glob("*.msg"))
    assert len(waiting) == 2 and not list((queue / "queued").glob("*.env"))   # no attempt counted
    start(second, [{}])
    wait_until(lambda: len(taken(second)) == 2, 20, "the other two to be delivered")
    delivered = sorted(without_received(m) for m in taken(first) + taken(second))
    assert delivered == sorted(make_message(f"queued-{n}") for n in range(3))   # each once
