"""minimail against its own environment: as root it writes only what it made, its
tunnel never outlives it, and what comes from outside (ssh's stderr, the far
side's words, pid and state files) stays harmless.

Each test is a user's (or an attacker's) session against the real program, as
in the other modules; the shared parts come from conftest.py.
"""

import json
import os
import pwd
import re
import resource
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import minimail
from conftest import (
    AS_ROOT, MINIMAIL, alive, double_options, free_port, make_message,
    minimail_command, read_until_eof, send_mail, start_daemon, wait_until)

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")


def start_as_nobody(run_dir, *args, pidfile=None, logfile=None):
    """`minimail start --user nobody` with an echo tunnel: the finished process."""
    port = free_port()
    return minimail_command(
        "start", "--user", "nobody", "--listen", f"127.0.0.1:{port}",
        "--pidfile", pidfile or run_dir / "run" / "minimail.pid",
        "--logfile", logfile or run_dir / "minimail.log", "--queue", run_dir / "queue",
        "--tunnel-port", free_port(), "--tunnel-command", "sleep 60", *args)


def processes_running(*argv):
    """Pids of the processes whose command line is argv."""
    wanted = b"".join(word.encode() + b"\0" for word in argv)
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if cmdline == wanted and alive(int(entry.name)):
                found.append(int(entry.name))
    return found


def tunnel_command_minimail(minimail_process, command, *args):
    """minimail whose tunnel is `sh -c COMMAND` on a fresh port ({port} in it)."""
    port = free_port()
    script = command.replace("{port}", str(port))
    return minimail_process("--tunnel-port", port, "--tunnel-command", f"sh -c {script!r}",
                            "--linger", 5, "--jitter", 0, *args), port


# ---------------------------------------------------------------------------
# Root writes only through paths it made
# ---------------------------------------------------------------------------

@root_only
def test_root_hands_over_only_the_directories_it_made(run_dir):
    nobody = pwd.getpwnam("nobody")
    system_dir = run_dir / "sysdir"
    system_dir.mkdir(mode=0o755)
    target = run_dir / "target"
    target.mkdir(mode=0o755)
    (run_dir / "link").symlink_to(target)
    for existing in (system_dir, run_dir / "link"):
        refused = start_as_nobody(run_dir, pidfile=existing / "minimail.pid")
        assert refused.returncode == 1
        assert refused.stderr.splitlines() == [
            f"minimail: {existing}: the daemon's user nobody cannot write there (it belongs to "
            f"root); choose another place, or make it writable for nobody"]
    assert system_dir.stat().st_uid == target.stat().st_uid == run_dir.stat().st_uid == 0
    pidfile = run_dir / "made" / "minimail.pid"          # a directory minimail makes itself
    started = start_as_nobody(run_dir, pidfile=pidfile)
    assert started.returncode == 0, started.stderr
    assert pidfile.parent.stat().st_uid == nobody.pw_uid
    assert minimail_command("stop", "--pidfile", pidfile).returncode == 0
    assert run_dir.stat().st_uid == 0 and (run_dir / "queue").stat().st_uid == nobody.pw_uid
    assert stat.S_IMODE((run_dir / "queue").stat().st_mode) == 0o711   # users reach maildrop/


@root_only
def test_root_never_writes_the_log_through_a_link_or_into_anothers_file(run_dir):
    secret = run_dir / "secret"
    secret.write_text("root's own\n")
    secret.chmod(0o600)
    (run_dir / "linked.log").symlink_to(secret)
    (run_dir / "hardlinked.log").hardlink_to(secret)
    (run_dir / "strangers.log").write_text("")
    os.chown(run_dir / "strangers.log", 4242, 4242)
    os.mkfifo(run_dir / "fifo.log")
    cases = {"linked.log": "is a symbolic link: refusing to write through it",
             "hardlinked.log": "has other hard links: refusing to write to it",
             "strangers.log": "belongs to uid 4242: refusing to write to it",
             "fifo.log": "is not a regular file"}
    for name, complaint in cases.items():
        refused = start_as_nobody(run_dir, logfile=run_dir / name)
        assert refused.returncode == 1, name
        assert refused.stderr.splitlines() == [
            f"minimail: the log file {run_dir / name} {complaint}"]
    st = secret.stat()
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o600)
    assert secret.read_text() == "root's own\n"
    started = start_as_nobody(run_dir)                   # a log file it makes: nobody's, 0640
    assert started.returncode == 0, started.stderr
    st = (run_dir / "minimail.log").stat()
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (pwd.getpwnam("nobody").pw_uid, 0o640)
    assert minimail_command("stop", "--pidfile", run_dir / "run" / "minimail.pid").returncode == 0


@root_only
def test_root_keeps_no_queue_in_anothers_directory_or_through_links(run_dir, tunnel_script):
    victim = run_dir / "victim"
    victim.mkdir()
    (victim / "important.txt").write_text("keep me\n")
    foreign = run_dir / "foreign"                           # another user's directory
    foreign.mkdir(mode=0o700)
    os.chown(foreign, 4242, 4242)
    linked = run_dir / "linked"                             # root's, with tmp/ a link
    linked.mkdir(mode=0o700)
    (linked / "tmp").symlink_to(victim)
    cases = {foreign: f"{foreign} belongs to uid 4242, not to root: refusing to keep the queue there",
             linked: f"{linked / 'tmp'} is not a directory (a link?): refusing to keep the queue there"}
    for queue, complaint in cases.items():
        refused = minimail_command("--foreground", *AS_ROOT, "--listen", f"127.0.0.1:{free_port()}",
                                   "--queue", queue, *tunnel_script("echo", 0, "{port}"))
        assert refused.returncode == 1
        assert f"ERROR {complaint}" in refused.stderr
    assert (victim / "important.txt").read_text() == "keep me\n"


# ---------------------------------------------------------------------------
# The tunnel never outlives minimail
# ---------------------------------------------------------------------------

def test_a_killed_minimail_takes_its_tunnel_with_it_and_the_next_one_starts_clean(
        minimail_process, minimail_to_kill, double_script):
    _, tunnel = double_options(double_script, "echo", 0, "{port}")
    first = minimail_to_kill(*tunnel, "--linger", 60)
    with socket.create_connection(("127.0.0.1", first.port), timeout=10) as client:
        client.sendall(b"x")
        assert client.recv(1) == b"x"
        (tunnel_pid, _, _), = first.tunnels()
    first.proc.kill()                                    # kill -9: no clean-up at all
    first.proc.wait()
    wait_until(lambda: not alive(tunnel_pid), 5, "the tunnel to die with minimail")
    second = minimail_process(*tunnel, "--linger", 60)
    with socket.create_connection(("127.0.0.1", second.port), timeout=10) as client:
        client.sendall(b"y")                             # not a bare close from an orphan
        assert client.recv(1) == b"y"


def test_stopping_the_tunnel_stops_its_whole_process_group(minimail_process):
    marker = f"{31 + os.getpid() % 1000 / 1000:.3f}"     # sleep's argument marks it as ours
    mm, _ = tunnel_command_minimail(minimail_process, f"sleep {marker}; exit 1",
                                    "--no-queue", "--wait", 1)
    with socket.create_connection(("127.0.0.1", mm.port), timeout=10) as client:
        wait_until(lambda: processes_running("sleep", marker), 5, "the tunnel's sleep")
        assert read_until_eof(client).startswith(b"421 4.4.0 ")   # not up within --wait
    mm.wait_for_log(r"tunnel stopped \(pid \d+, not up within 1 s\)")
    wait_until(lambda: not processes_running("sleep", marker), 5, "the grandchild to be gone")


def test_a_killed_daemons_tunnel_directory_is_removed_at_the_next_start(run_dir, sshd, hoster):
    args = ("--ssh", sshd.ssh, "--remote", f"127.0.0.1:{hoster.port}", "--linger", 60, "hoster")
    port = start_daemon(run_dir, *args)
    send_mail(port, make_message("before-the-kill"))
    left, = [p for p in run_dir.iterdir() if p.name.startswith("minimail-tunnel-")]
    os.kill(int((run_dir / "minimail.pid").read_text()), signal.SIGKILL)
    port = start_daemon(run_dir, *args)
    assert not left.exists()
    send_mail(port, make_message("after-the-kill"))
    assert len(hoster.messages) == 2
    assert minimail_command("stop", "--pidfile", run_dir / "minimail.pid").returncode == 0


# ---------------------------------------------------------------------------
# SIGHUP never stops minimail
# ---------------------------------------------------------------------------

def test_sighup_never_stops_minimail_in_the_foreground(double_script, tmp_path):
    _, tunnel = double_options(double_script, "echo", 0, "{port}")
    listen, log_path = free_port(), tmp_path / "minimail.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, MINIMAIL, "--foreground", *AS_ROOT, "--listen",
                                 f"127.0.0.1:{listen}", "--no-queue", *map(str, tunnel)],
                                stderr=log)
    try:
        wait_until(lambda: connectable(listen) or proc.poll() is not None, 10, "the port")
        deadline = time.monotonic() + 10             # SIGHUP from bind() on
        while b"listening on" not in log_path.read_bytes():
            assert proc.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline
            proc.send_signal(signal.SIGHUP)
            time.sleep(0.01)
        for _ in range(3):
            proc.send_signal(signal.SIGHUP)
        with socket.create_connection(("127.0.0.1", listen), timeout=10) as client:
            client.sendall(b"still here")
            client.shutdown(socket.SHUT_WR)
            assert read_until_eof(client) == b"still here"
        assert "SIGHUP: logging to stderr, nothing to reopen" in log_path.read_text()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    finally:
        proc.kill()
        proc.wait()


def connectable(port):
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


# ---------------------------------------------------------------------------
# What the tunnel says is bounded and sanitized
# ---------------------------------------------------------------------------

#: A tunnel that writes one 400 MB line (no newline until its end) and fails.
HUGE_LINE = ("import sys; chunk = b'A' * (1 << 20)\n"
             "for _ in range(400): sys.stderr.buffer.write(chunk)\n"
             "sys.stderr.buffer.write(b'\\n'); sys.exit(1)")


def peak_rss_kib(pid):
    return int(re.search(r"VmHWM:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text())[1])


def test_a_400_mb_stderr_line_is_cut_not_kept(minimail_process, tmp_path):
    script = tmp_path / "huge.py"
    script.write_text(HUGE_LINE)
    port = free_port()
    mm = minimail_process("--no-queue", "--tunnel-port", port, "--tunnel-command",
                          f"{sys.executable} {script}")
    with socket.create_connection(("127.0.0.1", mm.port), timeout=60) as client:
        reply = read_until_eof(client, timeout=60)
    peak = peak_rss_kib(mm.proc.pid)
    print(f"\npeak RSS under a 400 MB stderr line: {peak / 1024:.1f} MiB; 421 reply "
          f"{len(reply)} bytes")
    assert peak < 100 * 1024
    assert reply.startswith(b"421 4.4.0 minimail: tunnel failed: AAAA") and reply.endswith(b"\r\n")
    assert len(reply) <= 512 and reply.count(b"\r\n") == 1
    logged = [line for line in mm.log().splitlines() if "AAAA" in line]
    assert logged and all(len(line) < 500 for line in logged)


def test_escape_codes_and_line_breaks_from_the_tunnel_stay_harmless(minimail_process):
    forged = r"ok\rINFO client 127.0.0.1:1: ok; forged\033]0;owned\007\033[2J\n"
    mm, _ = tunnel_command_minimail(minimail_process, f"printf '{forged}' >&2; exit 1", "--no-queue")
    with socket.create_connection(("127.0.0.1", mm.port), timeout=10) as client:
        reply = read_until_eof(client)
    log = mm.log()
    assert "\r" not in log and "\x1b" not in log and "\x07" not in log
    assert r"ok\rINFO client 127.0.0.1:1: ok; forged\x1b]0;owned\x07\x1b[2J" in log
    assert b"\x1b" not in reply and reply.count(b"\r") == 1


def test_the_421_quotes_the_most_telling_line_not_the_last(minimail_process):
    lines = ("Warning: Permanently added 'hoster' to the list of known hosts.\\n"
             "me@hoster: Permission denied (publickey).\\n"
             "usage: ssh [-46AaCfGgKkMNnqsTtVvXxYy] destination [command [argument ...]]\\n")
    mm, _ = tunnel_command_minimail(minimail_process, f"printf '{lines}' >&2; exit 255",
                                    "--no-queue")
    with socket.create_connection(("127.0.0.1", mm.port), timeout=10) as client:
        assert read_until_eof(client) == (b"421 4.4.0 minimail: tunnel failed: me@hoster: Permission "
                                          b"denied (publickey).; next try in 1 s\r\n")


def test_check_prints_a_far_sides_escape_codes_escaped(check_setup):
    with socket.create_server(("127.0.0.1", 0)) as far_side:
        def greet_badly():
            conn, _ = far_side.accept()
            conn.sendall(b"220 \x1b]0;owned\x07\x1b[2J mail.example ESMTP\r\n")
            conn.recv(100)
            conn.close()
        threading.Thread(target=greet_badly, daemon=True).start()
        result = check_setup(remote=f"127.0.0.1:{far_side.getsockname()[1]}")
    assert result.returncode == 0, result.stdout
    assert "\x1b" not in result.stdout and "\x07" not in result.stdout
    assert r"the far side answered: 220 \x1b]0;owned\x07\x1b[2J mail.example ESMTP" in result.stdout


# ---------------------------------------------------------------------------
# The pid file is locked; stop and status believe only its holder
# ---------------------------------------------------------------------------

def test_stop_believes_the_lock_not_what_the_pid_file_says(run_dir, tunnel_script):
    start_daemon(run_dir, *tunnel_script("echo", 0, "{port}"))
    pidfile = run_dir / "minimail.pid"
    daemon = int(pidfile.read_text())
    with subprocess.Popen(["sleep", "60"]) as bystander:
        try:
            pidfile.write_text(f"{bystander.pid}\n")     # what the daemon's user could write
            again = minimail_command("start", *AS_ROOT, "--listen", f"127.0.0.1:{free_port()}",
                                     "--pidfile", pidfile, "--logfile", run_dir / "other.log",
                                     "--queue", run_dir / "queue",
                                     *tunnel_script("echo", 0, "{port}"))
            assert again.returncode == 1
            assert again.stderr == f"minimail: already running (pid {daemon}, pid file {pidfile})\n"
            shown = json.loads(minimail_command("status", "--json", "--pidfile", pidfile).stdout)
            assert shown["pid"] == daemon
            stopped = minimail_command("stop", "--pidfile", pidfile)
            assert stopped.stdout == f"minimail stopped (pid {daemon})\n"
            assert bystander.poll() is None                # left alone
            assert not alive(daemon)
        finally:
            bystander.kill()


def test_stop_waits_for_the_daemons_own_drain(run_dir, tunnel_script):
    port = start_daemon(run_dir, "--drain", 32, *tunnel_script("echo", 0, "{port}"))
    with socket.create_connection(("127.0.0.1", port), timeout=10) as held:
        held.sendall(b"x")
        assert held.recv(1) == b"x"
        asked = time.monotonic()
        stopped = minimail_command("stop", "--pidfile", run_dir / "minimail.pid", timeout=90)
        waited = time.monotonic() - asked
    print(f"\nstop waited {waited:.1f} s with --drain 32")
    assert stopped.returncode == 0, stopped.stdout
    assert 32 <= waited < 32 + 10
    log = (run_dir / "minimail.log").read_text()
    assert re.search(r"client 127\.0\.0\.1:\d+: cut: the drain of 32 s ran out; 1 bytes", log)


# ---------------------------------------------------------------------------
# Start-up warnings and checks
# ---------------------------------------------------------------------------

def test_listening_beyond_loopback_warns_of_an_open_relay(minimail_process, tunnel_script, run_dir):
    mm = minimail_process(*tunnel_script("echo", 0, "{port}"))
    assert "not loopback" not in mm.log()
    port = free_port()
    started = minimail_command("start", *AS_ROOT, "--listen", f"0.0.0.0:{port}",
                               "--pidfile", run_dir / "minimail.pid", "--logfile",
                               run_dir / "minimail.log", "--queue", run_dir / "queue",
                               *tunnel_script("echo", 0, "{port}"))
    assert started.returncode == 0
    warning = (f"listening on 0.0.0.0:{port}, which is not loopback: every host that reaches this "
               f"port can send mail through your hoster, which trusts its own localhost (an open "
               f"relay)")
    assert warning in started.stderr and warning in (run_dir / "minimail.log").read_text()
    assert minimail_command("stop", "--pidfile", run_dir / "minimail.pid").returncode == 0


def test_out_of_file_descriptors_clients_get_421_not_tracebacks(double_script, tmp_path):
    _, tunnel = double_options(double_script, "echo", 0, "{port}")
    port, log_path = free_port(), tmp_path / "minimail.log"
    limit = lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))   # ulimit -Hn 256
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, MINIMAIL, "--foreground", *AS_ROOT, "--listen",
                                 f"127.0.0.1:{port}", "--no-queue", "--max-clients", "400",
                                 *map(str, tunnel)], stderr=log, preexec_fn=limit)
    clients = []
    try:
        wait_until(lambda: b"listening on" in log_path.read_bytes(), 10, "minimail to listen")
        for _ in range(400):
            client = socket.create_connection(("127.0.0.1", port), timeout=20)
            client.sendall(b"x")
            clients.append(client)
        echoed = refused = 0
        for client in clients:
            answer = client.recv(100)
            if answer == b"x":
                echoed += 1
            else:
                assert answer.startswith(b"421 4.3.2 minimail: too busy (out of file descriptors)")
                refused += 1
                client.close()
        print(f"\n256 descriptors, 400 clients: {echoed} echoed, {refused} refused with 421 4.3.2")
        assert echoed > 50 and refused > 50
    finally:
        for client in clients:
            client.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    log = log_path.read_text()
    assert "Traceback" not in log and "Errno 24" not in log
    assert ("the open files limit (256) is too low for --max-clients 400: each client can hold "
            "6 descriptors; raise it to 2464 or more") in log
    assert len(re.findall(r": 421: out of file descriptors;", log)) == refused


def test_a_client_waiting_for_the_tunnel_at_sigterm_gets_421_at_once(tunnel_double):
    mm, _ = tunnel_double("echo", 60, "{port}", wait=60)  # the tunnel listens after a minute
    with socket.create_connection(("127.0.0.1", mm.port), timeout=10) as client:
        mm.wait_for_log(r"tunnel starting")
        signalled = time.monotonic()
        mm.proc.send_signal(signal.SIGTERM)
        assert read_until_eof(client) == b"421 4.4.0 minimail: minimail is stopping\r\n"
        assert time.monotonic() - signalled < 2
    assert mm.proc.wait(timeout=15) == 0
    assert re.search(r"client 127\.0\.0\.1:\d+: 421: minimail is stopping;", mm.log())


def test_a_pid_file_too_deep_for_a_socket_path_still_carries_mail(run_dir, sshd, hoster):
    deep = run_dir / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    port = free_port()
    started = minimail_command("start", *AS_ROOT, "--listen", f"127.0.0.1:{port}",
                               "--pidfile", deep / "minimail.pid", "--logfile",
                               run_dir / "minimail.log", "--queue", run_dir / "queue",
                               "--ssh", sshd.ssh, "--remote", f"127.0.0.1:{hoster.port}", "hoster")
    assert started.returncode == 0, started.stderr
    try:
        send_mail(port, make_message("deep"))
        assert hoster.bodies() == [make_message("deep")]
        assert "is too deep for a socket path" in (run_dir / "minimail.log").read_text()
    finally:
        assert minimail_command("stop", "--pidfile", deep / "minimail.pid").returncode == 0


@pytest.mark.parametrize("content", ['{"started": "x"}', "[1, 2]", "not json",
                                     '{"running": false, "pid": 1, "tunnel": 5}'])
def test_status_does_not_trust_the_state_file(run_dir, tunnel_script, content):
    start_daemon(run_dir, *tunnel_script("echo", 0, "{port}"))
    pidfile, state = run_dir / "minimail.pid", run_dir / "minimail.state"
    daemon = int(pidfile.read_text())
    assert stat.S_IMODE(state.stat().st_mode) == 0o600
    state.write_text(content)
    shown = minimail_command("status", "--pidfile", pidfile)
    assert shown.returncode == 0 and "Traceback" not in shown.stderr
    assert shown.stdout.startswith(f"minimail is running (pid {daemon})")
    as_json = minimail_command("status", "--json", "--pidfile", pidfile)
    assert as_json.returncode == 0 and "Traceback" not in as_json.stderr
    data = json.loads(as_json.stdout)
    assert (data["running"], data["pid"]) == (True, daemon)
    assert minimail_command("stop", "--pidfile", pidfile).returncode == 0


def test_the_tunnel_is_up_once_its_socket_appears(through_ssh, hoster):
    mm = through_ssh()
    quitter = socket.create_connection(("127.0.0.1", mm.port), timeout=10)
    mm.wait_for_log(r"tunnel starting")
    quitter.close()                                   # leaves before the tunnel is up
    up = float(mm.wait_for_log(r"tunnel up after (\d+\.\d+) s")[1])
    assert up < 2.0                                   # not when the next client came
    mm.wait_for_log(r"client left before the tunnel was up")


@pytest.mark.parametrize("argv, message", [
    (["--foreground", "--wait", "0", "me@host"], "--wait: '0' must be more than 0 seconds"),
    (["--foreground", "--idle-timeout", "0.05", "me@host"],
     "--idle-timeout: '0.05' is too short: 0, or at least 0.1 s"),
])
def test_timings_that_would_fail_every_client_are_usage_errors(argv, message, capsys):
    assert minimail.main(argv) == 2
    assert message in capsys.readouterr().err


def test_the_benchmark_says_which_install_it_needs():
    bench = Path(MINIMAIL).parent / "bench_minimail.py"
    result = subprocess.run([sys.executable, "-S", bench, "--quick"], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 2
    assert len(result.stderr.splitlines()) == 1 and "Traceback" not in result.stderr
    assert "needs aiosmtpd" in result.stderr and "pip install" in result.stderr
