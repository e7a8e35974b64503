"""minimail's tests, run the way a user meets it.

Each test starts the real program (`python minimail.py --foreground ...`) on a
free loopback port, in front of a real OpenSSH sshd on 127.0.0.1 (throwaway
host and client keys in a temp dir) and a real SMTP server standing in for the
hoster (aiosmtpd), then talks to it with real SMTP clients (smtplib, swaks)
and looks at what the user would see: the mail that arrived, the replies, the
log, the processes.  All traffic stays on loopback; every wait is bounded.
The real parts and the helpers that act like a client are in conftest.py.
"""

import hashlib
import json
import os
import pwd
import re
import shutil
import signal
import smtplib
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from docopt import docopt

import minimail
from conftest import (
    AS_ROOT, MINIMAIL, SWAKS, alive, child_processes, free_port, make_message, minimail_command,
    need, proc_status, read_until_eof, send_mail, ssh_config_with_key, start_daemon, wait_until)


# ---------------------------------------------------------------------------
# Mail gets through, unchanged
# ---------------------------------------------------------------------------

def test_mail_sent_with_smtplib_arrives_byte_identical(through_ssh, hoster):
    mm = through_ssh()
    message = make_message("smtplib-7f3a")
    send_mail(mm.port, message)
    send_mail(hoster.port, message)           # the same mail, straight to the hoster
    assert hoster.bodies() == [message, message]
    assert mm.tunnel_starts() == 1
    mm.wait_for_log(r"client 127\.0\.0\.1:\d+: ok; \d+ bytes from client, \d+ to client")


def test_mail_sent_with_swaks_arrives_byte_identical(through_ssh, hoster, tmp_path):
    need("swaks", SWAKS)
    mm = through_ssh()
    message = make_message("swaks-51c2")
    (tmp_path / "mail.eml").write_bytes(message)
    for port in (mm.port, hoster.port):       # through minimail, then straight to the hoster
        result = subprocess.run(
            [SWAKS, "--server", "127.0.0.1", "--port", str(port), "--from", "cron@desktop.example",
             "--to", "admin@hoster.example", "--data", f"@{tmp_path / 'mail.eml'}"],
            capture_output=True, timeout=60)
        assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()
    through_minimail, direct = hoster.bodies()
    assert through_minimail == direct
    assert through_minimail.startswith(message)   # swaks adds only a final line end


def test_log_holds_no_message_content(through_ssh, hoster):
    mm = through_ssh("--verbose")
    send_mail(mm.port, make_message("SECRET-PAYLOAD-93e1"))
    assert len(hoster.messages) == 1
    mm.wait_for_log(r"client 127\.0\.0\.1:\d+: ok")    # the session was logged...
    log = mm.log()
    assert "SECRET-PAYLOAD" not in log                  # ...but none of the mail
    assert "admin@hoster.example" not in log and "cron@desktop" not in log


# ---------------------------------------------------------------------------
# The tunnel on demand
# ---------------------------------------------------------------------------

def test_no_tunnel_runs_until_the_first_client(through_ssh, hoster):
    mm = through_ssh()
    time.sleep(0.5)
    assert mm.tunnels() == [] and mm.tunnel_starts() == 0
    send_mail(mm.port, make_message("first"))
    assert [name for _, name, _ in mm.tunnels()] == ["ssh"]
    assert mm.tunnel_starts() == 1
    mm.wait_for_log(r"tunnel up after")


def test_twenty_clients_at_once_share_one_cold_tunnel(through_ssh, hoster):
    mm = through_ssh()
    start = threading.Barrier(20)
    errors = []

    def client(i):
        try:
            start.wait(timeout=10)
            send_mail(mm.port, make_message(f"client-{i}", size=500))
        except Exception as exc:                  # collected and reported below
            errors.append(repr(exc))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert errors == []
    assert len(hoster.messages) == 20
    assert sorted(hoster.bodies()) == sorted(make_message(f"client-{i}", size=500) for i in range(20))
    assert mm.tunnel_starts() == 1
    assert len(mm.tunnels()) == 1


def test_tunnel_stops_linger_after_the_last_client_and_is_reaped(through_ssh, hoster):
    mm = through_ssh(linger=2)
    send_mail(mm.port, make_message("linger"))
    finished = time.monotonic()
    (pid, _, _), = mm.tunnels()
    time.sleep(0.5)
    assert [p for p, _, _ in mm.tunnels()] == [pid], "the tunnel stopped before its linger"
    mm.wait_for_log(rf"tunnel stopped \(pid {pid}, linger expired\)", timeout=10)
    assert time.monotonic() - finished >= 2
    wait_until(lambda: mm.tunnels() == [], 5, "the ssh process to be reaped")


def test_a_new_client_cancels_the_countdown(through_ssh, hoster):
    mm = through_ssh("--verbose", linger=1.5)
    send_mail(mm.port, make_message("one"))
    mm.wait_for_log(r"countdown: stopping the tunnel in")
    send_mail(mm.port, make_message("two"))
    mm.wait_for_log(r"countdown cancelled")
    assert len(hoster.messages) == 2
    assert mm.tunnel_starts() == 1
    mm.wait_for_log(r"linger expired", timeout=10)
    send_mail(mm.port, make_message("three"))       # after the stop: a fresh tunnel
    assert mm.tunnel_starts() == 2 and len(hoster.messages) == 3


def test_a_session_longer_than_linger_is_not_cut(through_ssh, hoster):
    mm = through_ssh(linger=0.3)
    message = make_message("slow-client")
    with smtplib.SMTP("127.0.0.1", mm.port, timeout=30) as smtp:
        smtp.ehlo()
        time.sleep(1.5)                               # five times the linger, mid-session
        smtp.mail("cron@desktop.example")
        smtp.rcpt("admin@hoster.example")
        time.sleep(1.0)
        smtp.data(message)
    assert hoster.bodies() == [message]
    assert "linger expired" not in mm.log().split("client 127.0.0.1")[0]
    assert mm.tunnel_starts() == 1


def test_an_account_that_may_run_no_command_gets_ssh_minus_n(through_ssh, sshd, hoster, tmp_path):
    config, key = ssh_config_with_key(sshd, tmp_path, "forced_key")
    entry = f'command="/bin/true" {Path(f"{key}.pub").read_text()}'
    authorized = sshd.root / "authorized_keys"
    original = authorized.read_text()
    authorized.write_text(original + entry)              # a forced command ends every session
    try:
        mm = through_ssh(linger=30, ssh=f"ssh -F {config}")
        send_mail(mm.port, make_message("forced-0"))      # the session ended at once, but ssh
        mm.wait_for_log(r"the remote command ended by itself \(exited with code 0")  # forwarded
        for i in (1, 2):                                  # the next clients get a working tunnel
            send_mail(mm.port, make_message(f"forced-{i}"))
        assert hoster.bodies() == [make_message(f"forced-{i}") for i in range(3)]
        assert mm.log().count("the remote command ended") == 1
        assert mm.tunnel_starts() == 2
        (pid, _, _), = mm.tunnels()
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().rstrip(b"\0").split(b"\0")
        assert b"-N" in argv and argv[-1] == b"hoster"
    finally:
        authorized.write_text(original)


def test_the_tunnel_socket_lives_in_a_private_directory_removed_on_exit(through_ssh, hoster):
    mm = through_ssh()
    send_mail(mm.port, make_message("private"))
    (pid, _, _), = mm.tunnels()
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().rstrip(b"\0").split(b"\0")
    forward = argv[argv.index(b"-L") + 1].decode()
    socket_path = Path(forward.split(":")[0])
    assert forward.endswith(f":127.0.0.1:{hoster.port}")
    assert stat.S_ISSOCK(socket_path.stat().st_mode)
    assert stat.S_IMODE(socket_path.parent.stat().st_mode) == 0o700
    assert argv[-2:] == [b"hoster", b"cat"] and b"BatchMode=yes" in argv
    assert mm.stop() == 0
    assert not socket_path.parent.exists()


# ---------------------------------------------------------------------------
# The splice itself: early bytes and half-closes (through a stand-in tunnel)
# ---------------------------------------------------------------------------

def test_an_eager_clients_early_bytes_wait_for_the_tunnel(tunnel_double):
    mm, _ = tunnel_double("echo", 1.0, "{port}")
    payload = os.urandom(300_000)
    with socket.create_connection(("127.0.0.1", mm.port), timeout=10) as client:
        client.sendall(payload)                   # long before the tunnel listens
        client.shutdown(socket.SHUT_WR)           # and half-close: the echo must still come
        echoed = read_until_eof(client)
    assert hashlib.sha256(echoed).hexdigest() == hashlib.sha256(payload).hexdigest()
    assert mm.tunnel_starts() == 1
    mm.wait_for_log(r"client .*: ok; 300000 bytes from client, 300000 to client")


def test_a_client_that_speaks_first_works_through_a_warm_tunnel(tunnel_double):
    mm, _ = tunnel_double("echo", 0, "{port}")          # the default --greeting-wait (10 s)
    hello = b"\x16\x03\x01 a TLS ClientHello, say" * 100
    for _ in range(3):                                  # a cold tunnel, then a warm one twice
        with socket.create_connection(("127.0.0.1", mm.port), timeout=10) as client:
            client.sendall(hello)                       # the client speaks first, as on 465
            client.shutdown(socket.SHUT_WR)
            assert read_until_eof(client) == hello
    assert mm.tunnel_starts() == 1 and "stale" not in mm.log()


def test_half_close_from_the_far_side_passes_through(tunnel_double, tmp_path):
    report = tmp_path / "received.txt"
    mm, _ = tunnel_double("greet", "{port}", report)
    payload = os.urandom(500_000)
    with socket.create_connection(("127.0.0.1", mm.port), timeout=10) as client:
        greeting = read_until_eof(client)        # the far side has said all it will
        assert greeting == bytes(range(256)) * 4096
        client.sendall(payload)                   # but still listens
        client.shutdown(socket.SHUT_WR)
        assert client.recv(1) == b""
    wait_until(report.exists, 10, "the far side to report what it received")
    assert report.read_text() == f"{len(payload)} {hashlib.sha256(payload).hexdigest()}"


# ---------------------------------------------------------------------------
# Failures are SMTP answers, not hangs
# ---------------------------------------------------------------------------

def test_ssh_that_cannot_connect_gives_421_within_wait(through_ssh, hoster):
    closed_port = free_port()
    mm = through_ssh("--no-queue", "--wait", 5, "-o", f"Port={closed_port}")
    started = time.monotonic()
    with pytest.raises(smtplib.SMTPConnectError) as refused:
        smtplib.SMTP("127.0.0.1", mm.port, timeout=30)
    assert time.monotonic() - started < 5 + 1
    assert refused.value.smtp_code == 421
    assert refused.value.smtp_error.startswith(b"4.4.0 ")
    assert re.search(rf"ssh\[\d+\]: ssh: connect to host 127.0.0.1 port {closed_port}: "
                     r"Connection refused", mm.log())
    assert mm.proc.poll() is None                  # minimail itself carries on
    with pytest.raises(smtplib.SMTPConnectError) as again:
        smtplib.SMTP("127.0.0.1", mm.port, timeout=30)
    assert again.value.smtp_code == 421
    assert hoster.messages == []


def test_a_tunnel_that_never_accepts_gives_421_at_wait(tunnel_double):
    mm, _ = tunnel_double("echo", 60, "{port}", wait=1,   # listens only after a minute
                          options=["--no-queue"])
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", mm.port), timeout=10) as client:
        reply = read_until_eof(client)
    waited = time.monotonic() - started
    assert reply.startswith(b"421 4.4.0 ") and reply.endswith(b"\r\n")
    assert b"not up within" in reply
    assert 1.0 <= waited < 1.0 + 1, waited


def test_a_far_side_that_refuses_gives_421(through_ssh, hoster):
    mm = through_ssh("--no-queue", remote=f"127.0.0.1:{free_port()}")   # nothing listens there
    with pytest.raises(smtplib.SMTPConnectError) as refused:
        smtplib.SMTP("127.0.0.1", mm.port, timeout=30)
    assert refused.value.smtp_code == 421
    assert mm.proc.poll() is None


# ---------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("argv, message", [
    (["--foreground"], "DESTINATION is missing"),
    (["--foreground", "--bogus", "me@host"], "unknown option --bogus"),
    (["--foreground", "--listen", "25x", "me@host"], "--listen: '25x' is not HOST:PORT"),
    (["--foreground", "--listen", "127.0.0.1:99999", "me@host"], "not a port number"),
    (["--foreground", "--listen", "mail.example:25", "me@host"], "is not an IP address"),
    (["--foreground", "--listen", "[::1:25", "me@host"], "is not [IPv6]:PORT"),
    (["--foreground", "--linger", "soon", "me@host"], "--linger: 'soon' is not a number"),
    (["--foreground", "--wait", "-1", "me@host"], "--wait: '-1' must be zero or more"),
    (["--foreground", "--remote", "localhost:0", "me@host"], "--remote: '0' is not a port"),
    (["--foreground", "--tunnel-port", "x", "me@host"], "--tunnel-port: 'x' is not a port"),
    (["--foreground", "--max-clients", "0", "me@host"], "--max-clients: '0' is not a whole"),
    (["--foreground", "--tunnel-command", "true"], "--tunnel-command needs --tunnel-port"),
    (["--foreground", "-t", "2600", "--tunnel-command", "'unbalanced"], "No closing quotation"),
    (["--foreground", "me@ho st"], "is not an ssh destination"),
    (["--foreground", ""], "'' is not an ssh destination"),
    (["--foreground", "me@host", "extra"], "unexpected argument 'extra'"),
])
def test_bad_arguments_exit_2_with_a_message(argv, message, capsys):
    assert minimail.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err


def test_a_busy_listen_port_exits_1_with_one_line():
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        result = subprocess.run([sys.executable, MINIMAIL, "--foreground", "--listen",
                                 f"127.0.0.1:{port}", *AS_ROOT, "me@host"],
                                capture_output=True, timeout=20)
    assert result.returncode == 1
    assert result.stderr.decode().splitlines() == [
        f"minimail: cannot listen on 127.0.0.1:{port}: address already in use"]


def test_a_copied_script_alone_shows_its_help(tmp_path):
    copy = tmp_path / "minimail.py"
    shutil.copy(MINIMAIL, copy)
    result = subprocess.run([sys.executable, copy, "--help"], cwd=tmp_path,
                            capture_output=True, timeout=20)
    assert result.returncode == 0
    assert result.stdout.decode().startswith("minimail: ")
    assert "--tunnel-command=CMD" in result.stdout.decode()


def test_sigterm_stops_minimail_and_its_tunnel(through_ssh, hoster):
    mm = through_ssh()
    send_mail(mm.port, make_message("before-stop"))
    assert len(mm.tunnels()) == 1
    assert mm.stop() == 0
    assert mm.tunnels() == []
    assert re.search(r"tunnel stopped \(pid \d+, minimail is stopping\)", mm.log())


# ---------------------------------------------------------------------------
# The daemon: start, status, stop; privileges; systemd; check
# ---------------------------------------------------------------------------

def read_status(pidfile):
    result = minimail_command("status", "--json", "--pidfile", pidfile)
    return result.returncode, json.loads(result.stdout)


def test_start_status_mail_stop_as_a_daemon(sshd, hoster, run_dir):
    pidfile, logfile = run_dir / "minimail.pid", run_dir / "minimail.log"
    port = free_port()
    started = minimail_command(
        "start", *AS_ROOT, "--listen", f"127.0.0.1:{port}", "--pidfile", pidfile, "--logfile", logfile,
        "--queue", run_dir / "queue", "--ssh", sshd.ssh, "--remote", f"127.0.0.1:{hoster.port}", "--linger", 30, "hoster")
    assert started.returncode == 0, started.stderr
    pid = int(pidfile.read_text())
    assert started.stdout == f"minimail started (pid {pid}), listening on 127.0.0.1:{port}; log: {logfile}\n"

    code, state = read_status(pidfile)              # start returned: it listens already
    assert code == 0 and state["running"] and state["pid"] == pid
    assert state["tunnel"]["state"] == "down" and state["sessions"] == 0

    send_mail(port, make_message("daemon"))
    assert hoster.bodies() == [make_message("daemon")]
    wait_until(lambda: read_status(pidfile)[1]["bytes_to_clients"] > 0, 5, "the state file")
    code, state = read_status(pidfile)
    assert state["tunnel"]["state"] == "up" and state["sessions"] == 1
    assert [p for p, name, _ in child_processes(pid)] == [state["tunnel"]["pid"]]
    text = minimail_command("status", "--pidfile", pidfile)
    assert text.returncode == 0
    assert re.search(rf"minimail is running \(pid {pid}\), up \d+ s, listening on 127.0.0.1:{port}",
                     text.stdout)
    assert re.search(r"tunnel: up \(pid \d+, for \d+ s\), stops in \d+ s unless a client comes",
                     text.stdout)
    assert "clients: 0 active, 1 session(s) served" in text.stdout

    stopped = minimail_command("stop", "--pidfile", pidfile)
    assert (stopped.returncode, stopped.stdout) == (0, f"minimail stopped (pid {pid})\n")
    assert not pidfile.exists() and not (run_dir / "minimail.state").exists()
    assert not alive(pid)
    after = minimail_command("status", "--pidfile", pidfile)
    assert (after.returncode, after.stdout) == (3, "minimail is not running\n")
    log = logfile.read_text()
    assert re.search(rf"^\d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ minimail\[{pid}\] INFO listening on", log, re.M)
    assert re.search(r"tunnel stopped \(pid \d+, minimail is stopping\)", log)


def test_a_stale_pid_file_is_not_trusted(run_dir, tunnel_script):
    pidfile = run_dir / "minimail.pid"
    gone = subprocess.Popen(["true"])
    gone.wait()
    pidfile.write_text(f"{gone.pid}\n")                 # that process is gone
    assert minimail_command("status", "--pidfile", pidfile).returncode == 3
    assert minimail_command("stop", "--pidfile", pidfile).returncode == 1
    with subprocess.Popen(["sleep", "60"]) as other:      # a pid reused by another program
        try:
            pidfile.write_text(f"{other.pid}\n")
            assert minimail_command("status", "--pidfile", pidfile).returncode == 3
            start_daemon(run_dir, *tunnel_script("echo", 0, "{port}"))
            assert int(pidfile.read_text()) != other.pid
            assert other.poll() is None               # and that program was left alone
        finally:
            other.kill()
    assert minimail_command("stop", "--pidfile", pidfile).returncode == 0


def test_stop_with_no_daemon_says_so(run_dir):
    result = minimail_command("stop", "--pidfile", run_dir / "minimail.pid")
    assert (result.returncode, result.stdout) == (1, "minimail is not running\n")


def test_restart_replaces_the_daemon(run_dir, tunnel_script):
    pidfile, port = run_dir / "minimail.pid", free_port()
    args = [*AS_ROOT, "--listen", f"127.0.0.1:{port}", "--pidfile", pidfile,
            "--logfile", run_dir / "log", "--queue", run_dir / "queue",
            *tunnel_script("echo", 0, "{port}")]
    assert minimail_command("start", *args).returncode == 0
    first = int(pidfile.read_text())
    again = minimail_command("start", *args)
    assert again.returncode == 1 and f"already running (pid {first}" in again.stderr
    assert minimail_command("restart", *args).returncode == 0
    second = int(pidfile.read_text())
    assert second != first and not alive(first)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
        client.sendall(b"ping")
        client.shutdown(socket.SHUT_WR)
        assert read_until_eof(client) == b"ping"
    assert minimail_command("stop", "--pidfile", pidfile).returncode == 0


def test_sighup_reopens_the_log_file(run_dir, tunnel_script):
    pidfile, logfile = run_dir / "minimail.pid", run_dir / "minimail.log"
    port = start_daemon(run_dir, *tunnel_script("echo", 0, "{port}"))
    logfile.rename(run_dir / "minimail.log.1")             # what logrotate does
    os.kill(int(pidfile.read_text()), signal.SIGHUP)
    wait_until(logfile.exists, 5, "a new log file")
    with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
        client.shutdown(socket.SHUT_WR)
        read_until_eof(client)
    wait_until(lambda: "client 127.0.0.1" in logfile.read_text(), 5, "the client in the new log")
    assert "log file reopened" in logfile.read_text()
    assert "client 127.0.0.1" not in (run_dir / "minimail.log.1").read_text()
    assert minimail_command("stop", "--pidfile", pidfile).returncode == 0


root_only = pytest.mark.skipif(os.geteuid() != 0, reason="dropping privileges needs root")


@root_only
def test_started_as_root_it_becomes_the_user_for_good(run_dir):
    nobody = pwd.getpwnam("nobody")
    # in a directory minimail makes, and so hands to nobody (as /run/minimail)
    pidfile, port, tunnel_port = run_dir / "run" / "minimail.pid", free_port(), free_port()
    socat = shutil.which("socat")
    need("socat", socat)
    started = minimail_command(
        "start", "--user", "nobody", "--listen", f"127.0.0.1:{port}", "--pidfile", pidfile,
        "--logfile", run_dir / "minimail.log", "--queue", run_dir / "queue",
        "--tunnel-port", tunnel_port, "--tunnel-command",
        f"{socat} TCP-LISTEN:{tunnel_port},bind=127.0.0.1,reuseaddr,fork SYSTEM:'echo 220 ok'")
    assert started.returncode == 0, started.stderr
    pid = int(pidfile.read_text())
    with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
        assert client.recv(100) == b"220 ok\n"
        (tunnel_pid, _, _), = child_processes(pid)
    status = proc_status(pid)
    ids = f"{nobody.pw_uid}\t{nobody.pw_uid}\t{nobody.pw_uid}\t{nobody.pw_uid}"
    assert status["Uid"] == ids
    assert status["Gid"] == ids.replace(str(nobody.pw_uid), str(nobody.pw_gid))
    assert status["Groups"].split() == [str(g) for g in os.getgrouplist("nobody", nobody.pw_gid)]
    assert status["CapEff"] == status["CapPrm"] == "0000000000000000"   # setuid(0) must fail
    assert proc_status(tunnel_pid)["Uid"] == ids                        # so does the tunnel
    assert (run_dir / "minimail.log").stat().st_uid == nobody.pw_uid   # writable after the drop
    assert minimail_command("stop", "--pidfile", pidfile).returncode == 0
    assert not pidfile.exists()


@root_only
@pytest.mark.parametrize("sudo_user", [None, "root"])
def test_as_root_with_no_user_to_become_it_refuses(sudo_user):
    env = {k: v for k, v in os.environ.items() if k != "SUDO_USER"}
    if sudo_user:
        env["SUDO_USER"] = sudo_user
    result = minimail_command("--foreground", "--listen", f"127.0.0.1:{free_port()}", "me@host",
                              env=env)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        "minimail: refusing to run the tunnel as root: name the user to become with "
        "--user USER (or say --user root to stay root)"]


def test_a_port_that_needs_root_names_the_ways_out(monkeypatch):
    def refuse(sock, address):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(socket.socket, "bind", refuse)
    settings = minimail.Settings(docopt(minimail.__doc__, ["--foreground", "me@host"]))
    with pytest.raises(minimail.Fatal) as refused:
        minimail.bind(settings)
    assert str(refused.value) == (
        "cannot listen on 127.0.0.1:25: permission denied (ports below 1024 need root, e.g. "
        "sudo minimail ..., or CAP_NET_BIND_SERVICE as in minimail.service; or use "
        "--listen 127.0.0.1:2525)")


def test_socket_activation_and_readiness_for_systemd(sshd, hoster, tmp_path):
    activate = shutil.which("systemd-socket-activate")
    need("systemd-socket-activate", activate)
    notify_path = str(tmp_path / "notify")
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(notify_path)
    notify.settimeout(20)
    port = free_port()
    with open(tmp_path / "minimail.log", "wb") as log:
        proc = subprocess.Popen(
            [activate, "-l", f"127.0.0.1:{port}", "-E", f"NOTIFY_SOCKET={notify_path}",
             sys.executable, MINIMAIL, "--foreground", *AS_ROOT, "--listen", "127.0.0.1:1",
             "--queue", tmp_path / "queue", "--ssh", sshd.ssh, "--remote",
             f"127.0.0.1:{hoster.port}", "hoster"],
            stdout=log, stderr=log)
    try:
        wait_until(lambda: b"Listening on" in (tmp_path / "minimail.log").read_bytes(), 10,
                   "systemd-socket-activate to listen")
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as smtp:   # minimail starts on demand
            assert notify.recv(4096) == f"READY=1\nSTATUS=listening on 127.0.0.1:{port}".encode()
            smtp.sendmail("cron@desktop.example", ["admin@hoster.example"], make_message("activated"))
            (ssh_pid, _, _), = child_processes(proc.pid)
            environment = Path(f"/proc/{ssh_pid}/environ").read_bytes().split(b"\0")
        assert hoster.bodies() == [make_message("activated")]
        assert not any(v.startswith((b"LISTEN_", b"NOTIFY_SOCKET")) for v in environment)
        assert (f"listening on 127.0.0.1:{port}, the socket systemd passed, not on 127.0.0.1:1 "
                f"(--listen): the sendmail command submits to --listen").encode() in \
            (tmp_path / "minimail.log").read_bytes()
        proc.send_signal(signal.SIGTERM)
        assert notify.recv(4096) == b"STOPPING=1"
        assert proc.wait(timeout=15) == 0
    finally:
        proc.kill()
        proc.wait()
        notify.close()


@root_only
def test_a_capability_granted_for_the_port_does_not_pass_on_to_the_tunnel(tunnel_script, tmp_path):
    setpriv = shutil.which("setpriv")
    need("setpriv (util-linux)", setpriv)
    port = free_port()
    with open(tmp_path / "minimail.log", "wb") as log:            # as systemd's AmbientCapabilities=
        proc = subprocess.Popen(
            [setpriv, "--inh-caps", "+net_bind_service", "--ambient-caps", "+net_bind_service",
             sys.executable, MINIMAIL, "--foreground", *AS_ROOT, "--listen", f"127.0.0.1:{port}",
             "--no-queue",
             *map(str, tunnel_script("echo", 0, "{port}"))], stderr=log)
    try:
        wait_until(lambda: b"listening on" in (tmp_path / "minimail.log").read_bytes(), 10, "minimail")
        with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
            client.sendall(b"x")
            assert client.recv(1) == b"x"
            (tunnel, _, _), = child_processes(proc.pid)
            assert proc_status(tunnel)["CapAmb"] == "0000000000000000"
    finally:
        proc.terminate()
        proc.wait(timeout=15)


def test_check_passes_when_all_is_well(check_setup):
    result = check_setup()
    assert result.returncode == 0, result.stdout
    assert re.search(r"ok    ssh found: \S*ssh \(OpenSSH", result.stdout)
    for step in ("ssh reached the hoster", "the hoster's host key is known",
                 "ssh logged in without a prompt", "the forward opened",
                 "the far side answered: 220 ", "tunnel closed (ssh exited with code 0)"):
        assert f"ok    {step}" in result.stdout
    assert result.stdout.endswith("all good: minimail can send mail through hoster\n")


def test_check_names_a_wrong_port(check_setup):
    result = check_setup("-o", f"Port={free_port()}")
    assert result.returncode == 1
    assert "FAIL  ssh did not reach the hoster" in result.stdout
    assert "fix: check that the host is reachable and that the port is right" in result.stdout
    assert "Connection refused" in result.stdout


def test_check_names_an_unknown_host_key(check_setup):
    result = check_setup("-o", "UserKnownHostsFile=/dev/null")
    assert result.returncode == 1
    assert "ok    ssh reached the hoster" in result.stdout
    assert "FAIL  the hoster's host key was not accepted" in result.stdout
    assert "ssh-keyscan" in result.stdout and "Host key verification failed" in result.stdout


def test_check_names_a_rejected_key(check_setup, sshd, tmp_path):
    config, _ = ssh_config_with_key(sshd, tmp_path, "stranger")
    result = check_setup(ssh=f"ssh -F {config}")
    assert result.returncode == 1
    assert "ok    the hoster's host key is known" in result.stdout
    assert "FAIL  ssh could not log in without a prompt" in result.stdout
    assert "ssh-copy-id" in result.stdout and "Permission denied (publickey)" in result.stdout


def test_check_names_a_far_side_that_is_not_smtp(check_setup, sshd):
    result = check_setup(remote=f"127.0.0.1:{sshd.port}")      # sshd answers, but not in SMTP
    assert result.returncode == 1
    assert "ok    the forward opened" in result.stdout
    assert "FAIL  the far side does not speak SMTP: it said 'SSH-2.0-OpenSSH" in result.stdout
    assert "fix: check --remote" in result.stdout


def test_check_names_a_far_side_where_nothing_listens(check_setup):
    result = check_setup(remote=f"127.0.0.1:{free_port()}")
    assert result.returncode == 1
    assert "FAIL  the far side said nothing" in result.stdout
    assert "open failed: connect failed: Connection refused" in result.stdout


# ---------------------------------------------------------------------------
# Pure logic
# ---------------------------------------------------------------------------

def test_every_documented_option_is_understood():
    """docopt-ng reads any docstring line that starts with a dash as an option:
    a wrapped description must not, or options go missing or clash."""
    argv = ["--foreground", "-l", "[::1]:2525", "-t", "2600", "-r", "mail:587", "--linger", "1",
            "--jitter", "2", "--wait", "3", "--idle-timeout", "4", "--max-clients", "5",
            "--drain", "6", "--ssh", "ssh -F cfg", "-o", "A=1", "-o", "B=2", "--no-session",
            "-v", "me@hoster"]
    settings = minimail.Settings(docopt(minimail.__doc__, argv))
    assert settings.listen == (socket.AF_INET6, "::1", 2525)
    assert (settings.tunnel_port, settings.remote, settings.destination) == (2600, "mail:587", "me@hoster")
    assert (settings.linger, settings.jitter, settings.wait, settings.idle_timeout,
            settings.max_clients, settings.drain) == (1, 2, 3, 4, 5, 6)
    assert settings.ssh == ["ssh", "-F", "cfg"] and settings.ssh_options == ["A=1", "B=2"]
    assert not settings.session and settings.verbose
    assert set(minimail.option_table()) >= {"-X", "--foreground", "--tunnel-command", "--help"}

@pytest.mark.parametrize("text, expected", [
    ("25", (socket.AF_INET, "127.0.0.1", 25)),
    ("127.0.0.1:2525", (socket.AF_INET, "127.0.0.1", 2525)),
    ("localhost:2525", (socket.AF_INET, "127.0.0.1", 2525)),
    ("0.0.0.0:25", (socket.AF_INET, "0.0.0.0", 25)),
    ("[::1]:25", (socket.AF_INET6, "::1", 25)),
])
def test_listen_addresses(text, expected):
    assert minimail.parse_listen(text) == expected


@pytest.mark.parametrize("text, expected", [
    ("localhost:25", "localhost:25"), ("587", "localhost:587"),
    ("mail.example.org:25", "mail.example.org:25"), ("[::1]:25", "[::1]:25"),
])
def test_remote_addresses(text, expected):
    assert minimail.parse_remote(text) == expected


@pytest.mark.parametrize("copy", [minimail.splice_through_pipe, minimail.splice_through_buffer],
                         ids=["splice(2)", "recv_into"])
def test_both_ways_of_copying_move_every_byte_and_report_the_end(copy):
    """The zero-copy path runs in every test above where splice(2) exists; its
    twin runs where it does not: both on real sockets here."""
    if copy is minimail.splice_through_pipe and not hasattr(os, "splice"):
        pytest.skip("no os.splice here")
    import gevent.socket
    payload = os.urandom(3_000_000)
    src_near, src_far = gevent.socket.socketpair()
    dst_near, dst_far = gevent.socket.socketpair()
    flow, pool = minimail.Flow(), minimail.PipePool() if "pipe" in copy.__name__ else minimail.BufferPool()
    copier = gevent.spawn(copy, src_far, dst_near, flow, pool)
    def write_all():
        src_near.sendall(payload)
        src_near.shutdown(socket.SHUT_WR)

    writer = gevent.spawn(write_all)
    received = []
    while True:
        chunk = dst_far.recv(65536)
        if not chunk:
            break
        received.append(chunk)
        if sum(map(len, received)) == len(payload):
            break
    assert copier.get(timeout=10) is minimail.AT_END and writer.get(timeout=10) is None
    assert b"".join(received) == payload and flow.count == len(payload)
    src_near, src_far = gevent.socket.socketpair()
    dst_far.close()                                   # the far side is gone
    src_near.sendall(b"x" * 1000)                      # fits in the socket's buffer
    failure = gevent.spawn(copy, src_far, dst_near, minimail.Flow(), pool).get(timeout=10)
    assert isinstance(failure, (BrokenPipeError, ConnectionResetError))
    pool.empty()


def test_ssh_argv_keeps_safety_options_first_and_holds_a_session():
    argv = minimail.ssh_argv(["ssh", "-oBatchMode=no", "-F", "cfg"],
                             ["BatchMode=no", "ServerAliveInterval=2"],
                             "/run/mm/tunnel.sock:localhost:25", "me@hoster", session=True)
    options = [argv[i + 1] for i, word in enumerate(argv) if word == "-o"]
    # right after the program's name, ahead of --ssh's own arguments (ssh keeps the first value)
    assert argv[:5] == ["ssh", "-o", "BatchMode=yes", "-o", "ExitOnForwardFailure=yes"]
    assert argv[5:9] == ["-oBatchMode=no", "-F", "cfg", "-T"]
    assert options.index("BatchMode=yes") < options.index("BatchMode=no")
    assert options.index("ServerAliveInterval=2") < options.index("ServerAliveInterval=15")
    assert {"ExitOnForwardFailure=yes", "ControlMaster=no", "ControlPath=none",
            "StreamLocalBindUnlink=yes", "ServerAliveCountMax=3"} <= set(options)
    assert argv[-4:] == ["-L", "/run/mm/tunnel.sock:localhost:25", "me@hoster", "cat"]
    no_session = minimail.ssh_argv(["ssh"], [], "x:localhost:25", "me@hoster", session=False)
    assert no_session[-4:] == ["-L", "x:localhost:25", "-N", "me@hoster"]
