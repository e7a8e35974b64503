"""The maildrop: mail that the sendmail command cannot hand to minimail (it is
not running, or goes away mid-way) waits in the queue's maildrop/, written by
root's cron and by any other user, and minimail takes it in when it starts, as
hostile input.

The daemon here is the real program (`minimail start`), its tunnel a stand-in
(`sleep`, with --tunnel-port on the hoster's own port: the hoster is what the
tunnel reaches); the hoster is aiosmtpd.  The sendmail command runs as root
through the `sendmail` symlink to the console script, and as `nobody` through
a `sendmail` symlink to minimail.py run by an interpreter nobody may use.
"""

import hashlib
import json
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import minimail
from conftest import (MINIMAIL, CRON_MAIL, console_script, free_port, minimail_command, need,
                      wait_until)

CONSOLE_SCRIPT = console_script()
SENDER, ADMIN = "me@desktop.example", "admin@hoster.example"
NOBODY = pwd.getpwnam("nobody")
root_only = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to be another user")

# ---------------------------------------------------------------------------
# The parts: a machine with minimail installed, its daemon, a stand-in minimail
# ---------------------------------------------------------------------------

def interpreter_for(user):
    """A Python that user may run: this one, unless it lives where that user
    cannot go (a pyenv under root's 0700 home), then Debian's own."""
    for python in (sys.executable, "/usr/bin/python3"):
        try:
            ran = subprocess.run([python, "-c", "pass"], user=user.pw_uid, group=user.pw_gid,
                                 extra_groups=[], cwd="/", capture_output=True, timeout=30)
        except PermissionError:                         # exec(2) refused: a closed directory
            continue
        if ran.returncode == 0:
            return python
    pytest.skip(f"no Python here that {user.pw_name} may run")


class Machine:
    """A machine with minimail: a settings file (MINIMAIL_OPTIONS names where the
    daemon listens and its queue), the `sendmail` command for root and for
    nobody, and the daemon (`minimail start`, stopped by the test or at its end)."""

    def __init__(self, run_dir, hoster):
        need("minimail's console script (pip install -e .)", str(CONSOLE_SCRIPT))
        self.dir, self.hoster = run_dir, hoster
        self.port = free_port()
        self.queue = run_dir / "queue"
        self.maildrop = self.queue / "maildrop"
        self.pidfile = run_dir / "run" / "minimail.pid"      # a directory minimail makes
        self.logfile = run_dir / "minimail.log"
        self.config = run_dir / "minimail.conf"
        self.configure()
        self.aliases = run_dir / "aliases"                 # not the machine's /etc/aliases
        self.aliases.write_text("")
        self.aliases.chmod(0o644)
        bin_dir = run_dir / "bin"                          # root's: the console script
        bin_dir.mkdir()
        (bin_dir / "sendmail").symlink_to(CONSOLE_SCRIPT)
        users_bin = run_dir / "users-bin"                  # for nobody: minimail.py itself
        users_bin.mkdir()
        shutil.copy(MINIMAIL, run_dir / "minimail.py")
        (users_bin / "sendmail").symlink_to(run_dir / "minimail.py")

    def configure(self, listen=None, queue=None, extra=""):
        """The settings file; queue=False names no queue (the default's then)."""
        named = "" if queue is False else f"--queue {queue or self.queue}"
        self.config.write_text(
            f"MINIMAIL_OPTIONS=--listen 127.0.0.1:{listen or self.port} {named} {extra}\n"
            f"MINIMAIL_SENDER={SENDER}\nMINIMAIL_ADMIN={ADMIN}\n")
        self.config.chmod(0o644)

    def sendmail(self, *flags, message, user="root", home=None):
        """Run `sendmail FLAGS...` as user, the message on its stdin."""
        env = {**os.environ, "MINIMAIL_CONFIG": str(self.config),
               "MINIMAIL_ALIASES": str(self.aliases)}
        env.pop("XDG_STATE_HOME", None)
        if user == "root":
            argv, who = [self.dir / "bin" / "sendmail"], {}
        else:
            account = pwd.getpwnam(user)
            argv = [interpreter_for(account), self.dir / "users-bin" / "sendmail"]
            who = dict(user=account.pw_uid, group=account.pw_gid, extra_groups=[])
            env.update(HOME=str(home or account.pw_dir), USER=user, LOGNAME=user)
        data = message.encode() if isinstance(message, str) else message
        return subprocess.run([*map(str, argv), *flags], input=data, capture_output=True,
                              env=env, cwd="/", timeout=60, **who)

    def start(self, *args, user="root", tunnel_port=None):
        """`minimail start` as root, becoming user; its tunnel reaches the hoster
        (or, with tunnel_port, nothing)."""
        started = minimail_command(
            "start", "--user", user, "--listen", f"127.0.0.1:{self.port}",
            "--pidfile", self.pidfile, "--logfile", self.logfile, "--queue", self.queue,
            "--tunnel-port", tunnel_port or self.hoster.port, "--tunnel-command", "sleep 3600",
            "--linger", 1, "--jitter", 0, "--wait", 2, *args)
        assert started.returncode == 0, started.stderr

    def stop(self):
        assert minimail_command("stop", "--pidfile", self.pidfile).returncode == 0

    def ran_once(self, user="root"):
        """minimail ran before (it made its queue and maildrop) and is down now."""
        self.start(user=user)
        self.stop()

    def log(self):
        return self.logfile.read_text(errors="replace")

    def dropped(self):
        return sorted(p.name for p in self.maildrop.iterdir())

    def wait_delivered(self, count, timeout=30):
        """Wait until the hoster has count messages and nothing waits any more."""
        wait_until(lambda: len(self.hoster.messages) >= count, timeout, f"{count} message(s)")
        wait_until(lambda: not os.listdir(self.queue / "queued") and not self.dropped(), 10,
                   "an empty queue and maildrop")
        time.sleep(0.5)                                     # time for a duplicate to show
        assert len(self.hoster.messages) == count


@pytest.fixture
def machine(run_dir, hoster):
    made = Machine(run_dir, hoster)
    yield made
    if made.pidfile.exists():                          # a test failed with its daemon running
        minimail_command("stop", "--pidfile", made.pidfile)


class StandIn:
    """A stand-in for a running minimail on loopback: speaks SMTP, answers RCPT
    with rcpt_reply, and after DATA's 354 either takes the message (250) or,
    with close_after_data, reads a little of it and closes without a word."""

    def __init__(self, rcpt_reply="250 2.1.5 ok", close_after_data=False):
        self.rcpt_reply, self.close_after_data = rcpt_reply, close_after_data
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.received = 0
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self):
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:                                 # shut down
                return
            with conn:
                conn.settimeout(30)
                try:
                    self.session(conn, conn.makefile("rb"))
                except OSError:
                    pass

    def session(self, conn, lines):
        conn.sendall(b"220 stand-in ESMTP\r\n")
        for line in iter(lambda: lines.readline(1024), b""):
            verb = line[:4].upper()
            if verb == b"EHLO":
                conn.sendall(b"250-stand-in\r\n250 8BITMIME\r\n")
            elif verb == b"RCPT":
                conn.sendall(self.rcpt_reply.encode() + b"\r\n")
            elif verb == b"DATA":
                conn.sendall(b"354 go on\r\n")
                if self.close_after_data:
                    lines.read(100)
                    return
                self.sink(lines)
                conn.sendall(b"250 2.0.0 taken\r\n")
            elif verb == b"QUIT":
                conn.sendall(b"221 bye\r\n")
                return
            else:
                conn.sendall(b"250 ok\r\n")

    def sink(self, lines):
        """Read a message to its final dot, keeping nothing but its length."""
        tail = b""
        while True:
            chunk = lines.read1(1 << 20)
            if not chunk:
                return
            self.received += len(chunk)
            tail = (tail + chunk)[-5:]
            if tail == b"\r\n.\r\n":
                return

    def close(self):
        self.listener.shutdown(socket.SHUT_RDWR)
        self.thread.join(10)
        self.listener.close()


@pytest.fixture
def stand_in():
    made = []

    def make(**behaviour):
        made.append(StandIn(**behaviour))
        return made[-1]
    yield make
    for server in made:
        server.close()


def stays_down_line(machine):
    return (f"minimail: minimail is not running (127.0.0.1:{machine.port}: ECONNREFUSED): the "
            f"mail waits in {machine.maildrop} and goes out once minimail runs")


def received_from(message):
    match = re.match(rb"Received: from local user (\S+) \(uid (\d+)\)\r\n\tby ", message.content)
    assert match, message.content[:200]
    return match[1].decode(), int(match[2])


# ---------------------------------------------------------------------------
# Nothing lost while minimail is down
# ---------------------------------------------------------------------------

@root_only
@pytest.mark.parametrize("daemon_user", ["root", "nobody"])
def test_cron_and_a_user_mail_while_minimail_is_down_and_each_arrives_once_when_it_starts(
        machine, hoster, daemon_user):
    machine.ran_once(user=daemon_user)
    assert oct(machine.maildrop.stat().st_mode) == "0o41733"
    assert machine.maildrop.stat().st_uid == pwd.getpwnam(daemon_user).pw_uid
    assert oct(machine.queue.stat().st_mode & 0o777) == "0o711"
    assert {oct(p.stat().st_mode & 0o777) for p in machine.queue.iterdir()
            if p.name not in ("maildrop", "lock")} == {"0o700"}      # tmp, queued, failed, refused
    lock = machine.queue / "lock"                          # the daemon's, for its life
    assert (oct(lock.stat().st_mode & 0o777), lock.stat().st_uid) == \
        ("0o600", pwd.getpwnam(daemon_user).pw_uid)
    cron = machine.sendmail("-FCronDaemon", "-i", "-B8BITMIME", "-oem", "root", message=CRON_MAIL)
    assert (cron.returncode, cron.stderr.decode().splitlines()) == (0, [stays_down_line(machine)])
    user = machine.sendmail("-i", "friend@hoster.example", user="nobody",
                            message="Subject: from nobody\n\nhello from a user\n")
    assert (user.returncode, user.stderr.decode().splitlines()) == (0, [stays_down_line(machine)])
    assert len(machine.dropped()) == 2 and hoster.messages == []

    machine.start(user=daemon_user)
    machine.wait_delivered(2)
    machine.stop()
    by_sender = {received_from(m): m for m in hoster.messages}
    cron_mail, users_mail = by_sender[("root", 0)], by_sender[("nobody", NOBODY.pw_uid)]
    assert (cron_mail.mail_from, cron_mail.rcpt_tos) == (SENDER, [ADMIN])
    assert cron_mail.content.endswith("\r\n\r\nbackup: 3 files copied, Größe 12 kB\r\n.\r\nthe "
                                      "line above has a lone dot, which -i keeps\r\n".encode())
    assert users_mail.rcpt_tos == ["friend@hoster.example"]
    assert users_mail.content.endswith(b"\r\n\r\nhello from a user\r\n")
    log = machine.log()
    assert len(re.findall(r"maildrop: a file of uid (0|65534) taken in: queued as [0-9A-F]{16} "
                          r"\(\d+ bytes, 1 recipient\(s\)\)", log)) == 2
    assert "hello" not in log and "friend@" not in log and ADMIN not in log


def foreground_as(user, machine, home):
    """`minimail --foreground` run by user itself (no root at all), with its
    default queue in home; the process, once it listens."""
    python = interpreter_for(user)
    if subprocess.run([python, "-c", "import gevent, docopt"], capture_output=True).returncode:
        pytest.skip(f"{python} has no gevent or docopt")
    log = machine.dir / "foreground.log"
    env = {**os.environ, "HOME": str(home), "USER": user.pw_name, "LOGNAME": user.pw_name,
           "MINIMAIL_CONFIG": os.devnull}
    env.pop("XDG_STATE_HOME", None)
    with open(log, "ab") as stderr:
        daemon = subprocess.Popen(
            [python, machine.dir / "minimail.py", "--foreground", "--listen",
             f"127.0.0.1:{machine.port}", "--tunnel-port", str(machine.hoster.port),
             "--tunnel-command", "sleep 3600", "--linger", "1", "--jitter", "0"],
            user=user.pw_uid, group=user.pw_gid, extra_groups=[], cwd="/", env=env,
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr)
    wait_until(lambda: b"listening on" in log.read_bytes() or daemon.poll() is not None, 20,
               "minimail to listen")
    assert daemon.poll() is None, log.read_text()
    return daemon


@root_only
def test_a_users_own_minimail_keeps_that_users_mail_in_its_default_queue(machine, hoster):
    home = machine.dir / "home"
    home.mkdir()
    os.chown(home, NOBODY.pw_uid, NOBODY.pw_gid)
    daemon = foreground_as(NOBODY, machine, home)             # minimail ran before...
    daemon.terminate()
    assert daemon.wait(timeout=20) == 0
    maildrop = home / ".local/state/minimail/queue/maildrop"
    assert (oct(maildrop.stat().st_mode), maildrop.stat().st_uid) == ("0o41733", NOBODY.pw_uid)
    machine.configure(queue=False)                            # ...and the command finds its queue
    sent = machine.sendmail("-i", "friend@hoster.example", user="nobody", home=home,
                            message="Subject: mine\n\nkept for my own minimail\n")
    assert sent.returncode == 0 and str(maildrop).encode() in sent.stderr
    daemon = foreground_as(NOBODY, machine, home)
    try:
        wait_until(lambda: hoster.messages, 20, "the mail")
    finally:
        daemon.terminate()
        assert daemon.wait(timeout=20) == 0
    message, = hoster.messages
    assert received_from(message) == ("nobody", NOBODY.pw_uid)
    assert message.content.endswith(b"\r\n\r\nkept for my own minimail\r\n")


@root_only
def test_a_kill_9_while_the_maildrop_is_taken_in_loses_nothing(machine, hoster):
    machine.ran_once()
    padding = f"{'a line of padding ' * 4}\n" * 1500                    # 100 kB
    first = machine.sendmail("-i", "root", message=f"Subject: one of many\n\nmark-0000\n{padding}")
    assert first.returncode == 0
    name, = machine.dropped()
    template = (machine.maildrop / name).read_bytes()
    count = 200
    for i in range(1, count):
        (machine.maildrop / os.urandom(16).hex()).write_bytes(
            template.replace(b"mark-0000", f"mark-{i:04}".encode()))
    closed_port = free_port()                       # the first daemon delivers nothing
    machine.start(tunnel_port=closed_port)
    wait_until(lambda: len(os.listdir(machine.queue / "queued")) >= 5, 30, "the intake")
    os.kill(int(machine.pidfile.read_text()), signal.SIGKILL)
    left = len(machine.dropped())
    assert 0 < left < count, "the kill came after the intake"
    wait_until(lambda: not machine.pidfile.exists() or minimail_command(
        "status", "--pidfile", machine.pidfile).returncode == 3, 10, "the daemon to be gone")

    machine.start()
    wait_until(lambda: len(hoster.messages) >= count, 60, "every message")
    wait_until(lambda: not os.listdir(machine.queue / "queued") and not machine.dropped(), 20,
               "an empty queue and maildrop")
    machine.stop()
    marks = [re.search(rb"mark-(\d{4})", m.content)[1] for m in hoster.messages]
    assert sorted(set(marks)) == [f"{i:04}".encode() for i in range(count)]      # none lost
    assert len(marks) <= count + 1                  # at most the one in the crash window twice


def test_a_queue_at_its_cap_leaves_the_maildrop_waiting(machine, hoster):
    machine.ran_once()
    padding = f"{'a line of padding ' * 4}\n" * 150                     # 10 kB
    assert machine.sendmail("-i", "root", message=f"Subject: capped\n\n{padding}").returncode == 0
    name, = machine.dropped()
    machine.start("--max-queue-size", 5000)               # less than the message
    wait_until(lambda: "maildrop: cannot queue a file of uid 0 now: the queue holds 0 bytes in 0 "
               "message(s), --max-queue-size is 5000" in machine.log(), 20, "the cap")
    assert machine.dropped() == [name] and os.listdir(machine.queue / "queued") == []
    machine.stop()
    machine.start()                                       # room: 1 GiB
    machine.wait_delivered(1)
    machine.stop()


@root_only
def test_another_user_can_neither_list_the_maildrop_nor_read_roots_mail(machine):
    machine.ran_once()
    secret = "Subject: root's secret\n\nthe secret is 42\n"
    assert machine.sendmail("-i", "root", message=secret).returncode == 0
    name, = machine.dropped()
    assert re.fullmatch(r"[0-9a-f]{32}", name)                   # unguessable
    probe = f"""
import json, os, sys
queue = {str(machine.queue)!r}
tries = {{}}
for what, attempt in (("list maildrop", lambda: os.listdir(queue + "/maildrop")),
                      ("list queue", lambda: os.listdir(queue)),
                      ("list queued", lambda: os.listdir(queue + "/queued")),
                      ("read", lambda: open(queue + "/maildrop/" + sys.argv[1]).read())):
    try:
        attempt()
        tries[what] = "allowed"
    except PermissionError:
        tries[what] = "denied"
    except FileNotFoundError:
        tries[what] = "not found"
print(json.dumps(tries))
"""
    guess = "0" * 32
    seen = subprocess.run([interpreter_for(NOBODY), "-c", probe, guess], user=NOBODY.pw_uid,
                          group=NOBODY.pw_gid, extra_groups=[], cwd="/", capture_output=True,
                          text=True, timeout=30)
    assert json.loads(seen.stdout) == {"list maildrop": "denied", "list queue": "denied",
                                       "list queued": "denied", "read": "not found"}
    listing = machine.sendmail("-bp", message="", user="nobody")
    assert listing.returncode == 69 and b"secret" not in listing.stdout + listing.stderr
    assert (machine.maildrop / name).read_bytes().endswith(b"the secret is 42\r\n")  # kept


@root_only
def test_planted_links_fifos_and_oversized_files_are_refused_without_harm(machine, hoster):
    machine.ran_once()
    assert machine.sendmail("-i", "root", message="Subject: good\n\nthe good one\n").returncode == 0
    good, = machine.dropped()
    secret = machine.dir / "secret"
    secret.write_text("root's secret\n")
    secret.chmod(0o600)
    shadow = hashlib.sha256(Path("/etc/shadow").read_bytes()).hexdigest()
    (machine.maildrop / "to-shadow").symlink_to("/etc/shadow")
    (machine.maildrop / "hard-link").hardlink_to(secret)
    os.mkfifo(machine.maildrop / "fifo")
    envelope = (machine.maildrop / good).read_bytes().split(b"\r\n")[0]
    (machine.maildrop / "too-big").write_bytes(envelope + b"\r\n" + b"x" * 20_000 + b"\r\n")
    (machine.maildrop / "no-envelope").write_bytes(b"Subject: none\r\n\r\nx\r\n")
    (machine.maildrop / "bad\x1b[31mname").write_bytes(b'MINIMAIL-MAILDROP {"sender": "a"}\r\n')
    machine.start("--max-size", 10_000)
    machine.wait_delivered(1)
    machine.stop()
    assert hoster.messages[0].content.endswith(b"\r\n\r\nthe good one\r\n")
    refusals = dict(re.findall(r"WARNING maildrop: refused (.+?) of uid 0 \((.+?)\): moved to "
                               r"refused/[0-9A-F]{16}$", machine.log(), re.M))
    assert refusals == {"to-shadow": "a symbolic link", "hard-link": "2 hard links",
                        "fifo": "not a regular file: a FIFO",
                        "too-big": "20002 bytes: larger than --max-size",
                        "no-envelope": "its first line is no envelope",
                        "bad\\x1b[31mname": "its envelope is not one"}
    assert hashlib.sha256(Path("/etc/shadow").read_bytes()).hexdigest() == shadow
    assert secret.read_text() == "root's secret\n" and secret.stat().st_nlink == 2
    assert len(os.listdir(machine.queue / "refused")) == 6
    assert "root:" not in machine.log() and "secret" not in machine.log()


@root_only
def test_without_a_maildrop_the_command_exits_75_and_creates_nothing(machine):
    cases = {"never ran": machine.dir / "no-queue",                    # no queue at all
             "an old queue": machine.dir / "old-queue"}                # one without a maildrop
    (machine.dir / "old-queue").mkdir(mode=0o700)
    for queue in cases.values():
        machine.configure(queue=queue)
        before = sorted(os.listdir(machine.dir))
        result = machine.sendmail("-i", "root", message="Subject: x\n\nlost?\n")
        assert (result.returncode, result.stderr.decode().splitlines()) == (75, [
            f"minimail: cannot reach minimail at 127.0.0.1:{machine.port}: ECONNREFUSED (is it "
            f"running? minimail status)"])
        assert sorted(os.listdir(machine.dir)) == before
    assert os.listdir(machine.dir / "old-queue") == []


# ---------------------------------------------------------------------------
# What goes to the maildrop, and what does not
# ---------------------------------------------------------------------------

@root_only
def test_a_message_over_max_size_is_not_kept_where_it_would_be_refused(machine):
    machine.ran_once()
    machine.configure(extra="--max-size 1000")
    result = machine.sendmail("-i", "root", message="Subject: big\n\n" + "x" * 5000 + "\n")
    assert result.returncode == 75
    assert result.stderr.decode().startswith(
        f"minimail: cannot reach minimail at 127.0.0.1:{machine.port}: ECONNREFUSED")
    assert result.stderr.decode().endswith(f"is larger than --max-size: not kept in "
                                           f"{machine.maildrop}\n")
    assert machine.dropped() == []
    assert f"[default: {minimail.MAX_SIZE_DEFAULT}]" in minimail.__doc__


@root_only
def test_minimail_going_away_mid_submission_leaves_the_mail_in_the_maildrop(
        machine, hoster, stand_in):
    machine.ran_once()
    gone = stand_in(close_after_data=True)
    machine.configure(listen=gone.port)
    result = machine.sendmail("-i", "root", message="Subject: cut off\n\nstill delivered\n")
    assert result.returncode == 0
    said, = result.stderr.decode().splitlines()             # gone while it wrote, or after
    assert re.fullmatch(rf"minimail: minimail went away \(127\.0\.0\.1:{gone.port}: (EPIPE|"
                        rf"ECONNRESET|closed the connection)[^()]*\): the mail waits in "
                        rf"{machine.maildrop} and goes out once minimail runs", said), said
    machine.configure()
    machine.start()
    machine.wait_delivered(1)
    machine.stop()
    assert hoster.messages[0].content.endswith(b"\r\n\r\nstill delivered\r\n")


@root_only
@pytest.mark.parametrize("reply, status", [("451 4.3.0 try later", 75),
                                           ("550 5.1.1 no such user", 67)])
def test_a_reply_from_minimail_is_never_taken_for_its_absence(machine, stand_in, reply, status):
    machine.ran_once()
    speaking = stand_in(rcpt_reply=reply)
    machine.configure(listen=speaking.port)
    result = machine.sendmail("-i", "root", message="Subject: x\n\nrefused\n")
    assert result.returncode == status
    assert result.stderr.decode().splitlines() == [f"minimail: every recipient was refused: "
                                                   f"{reply}"]
    assert machine.dropped() == []


@root_only
def test_queue_mailq_and_status_count_the_maildrop_and_flush_takes_it_in(machine, hoster):
    machine.start()
    machine.configure(listen=free_port())        # as if minimail were gone for the command
    assert machine.sendmail("-i", "root", message="Subject: waits\n\nfor the flush\n") \
        .returncode == 0
    machine.configure()
    listing = minimail_command("queue", "--queue", machine.queue)
    assert listing.stdout.splitlines()[-1] == (
        f"maildrop: 1 message(s) left by the sendmail command in {machine.maildrop}, not yet in "
        f"the queue (taken in when minimail runs, or on flush)")
    assert json.loads(minimail_command("queue", "--json", "--queue", machine.queue).stdout)[
        "maildrop"] == 1
    env = {**os.environ, "MINIMAIL_CONFIG": str(machine.config)}
    mailq = machine.sendmail("-bp", message="")
    assert mailq.stdout.decode() == listing.stdout
    shown = minimail_command("status", "--pidfile", machine.pidfile, env=env)
    assert shown.stdout.splitlines()[-1] == (
        f"maildrop: 1 message(s) left by the sendmail command in {machine.maildrop}, not yet in "
        f"the queue (taken in within a minute, or on flush)")
    state = json.loads(minimail_command("status", "--json", "--pidfile", machine.pidfile,
                                        env=env).stdout)
    assert state["maildrop"] == 1 and hoster.messages == []
    assert minimail_command("flush", "--pidfile", machine.pidfile).returncode == 0
    machine.wait_delivered(1, timeout=20)                    # not a minute later
    state = json.loads(minimail_command("status", "--json", "--pidfile", machine.pidfile,
                                        env=env).stdout)
    assert state["maildrop"] == 0
    machine.stop()
    after = minimail_command("status", "--pidfile", machine.pidfile, env=env)
    assert (after.returncode, after.stdout) == (3, "minimail is not running\n")


# ---------------------------------------------------------------------------
# A large message costs little memory
# ---------------------------------------------------------------------------

def peak_rss_mib(argv, data, env):
    """Run argv (data on its stdin) in a fresh process of its own: (exit status,
    its peak resident memory in MiB)."""
    wrapper = ("import resource, subprocess, sys\n"
               "status = subprocess.run(sys.argv[1:], stdin=sys.stdin, stdout=subprocess.DEVNULL,"
               " stderr=subprocess.DEVNULL).returncode\n"
               "print(status, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n")
    result = subprocess.run([sys.executable, "-c", wrapper, *map(str, argv)], input=data,
                            capture_output=True, env=env, timeout=100)
    status, kib = result.stdout.split()
    return int(status), int(kib) / 1024


@root_only
def test_a_40_mb_message_costs_the_sendmail_command_little_memory(machine, stand_in):
    machine.ran_once()
    line = b"0123456789" * 9 + b"\n"
    message = b"Subject: large\n\n" + line * (40 * 1024 * 1024 // len(line))
    sink = stand_in()
    env = {**os.environ, "MINIMAIL_CONFIG": str(machine.config),
           "MINIMAIL_ALIASES": str(machine.aliases)}
    sendmail = [machine.dir / "bin" / "sendmail", "-i", "root"]
    machine.configure(listen=sink.port, extra="--max-size 100000000")
    submitted, submitting = peak_rss_mib(sendmail, message, env)
    assert submitted == 0 and sink.received > len(message)
    assert submitting < 40, f"{submitting:.0f} MiB to submit 40 MiB"
    machine.configure(extra="--max-size 100000000")           # minimail down: the maildrop
    kept, keeping = peak_rss_mib(sendmail, message, env)
    assert kept == 0 and len(machine.dropped()) == 1
    assert keeping < 40, f"{keeping:.0f} MiB to keep 40 MiB"


# ---------------------------------------------------------------------------
# Where the sendmail command's transactions meet the maildrop, and the mail
# name meets EHLO (found in a second read of the merged code)
# ---------------------------------------------------------------------------

class TakesSomeThenGoes(StandIn):
    """A minimail that takes 100 recipients a transaction (452 for more), refuses
    one of them for good, and goes away in the second transaction's DATA."""

    def __init__(self, refused):
        self.refused, self.transactions = refused.encode(), 0
        super().__init__()

    def session(self, conn, lines):
        conn.sendall(b"220 stand-in ESMTP\r\n")
        taken = 0
        for line in iter(lambda: lines.readline(1024), b""):
            verb = line[:4].upper()
            if verb == b"EHLO":
                conn.sendall(b"250-stand-in\r\n250 8BITMIME\r\n")
            elif verb == b"MAIL":
                taken = 0
                conn.sendall(b"250 2.1.0 ok\r\n")
            elif verb == b"RCPT" and self.refused in line:
                conn.sendall(b"550 5.1.1 no such user\r\n")
            elif verb == b"RCPT":
                taken += 1
                conn.sendall(b"250 2.1.5 ok\r\n" if taken <= 100 else
                             b"452 4.5.3 too many recipients\r\n")
            elif verb == b"DATA":
                self.transactions += 1
                conn.sendall(b"354 go on\r\n")
                if self.transactions > 1:
                    lines.read(100)
                    return                                  # gone before its reply
                self.sink(lines)
                conn.sendall(b"250 2.0.0 taken\r\n")
            else:
                conn.sendall(b"250 ok\r\n")


@pytest.fixture
def takes_some_then_goes():
    made = TakesSomeThenGoes("refused@hoster.example")
    yield made
    made.close()


@root_only
def test_a_recipient_refused_before_minimail_went_away_is_not_passed_over(
        machine, takes_some_then_goes):
    machine.ran_once()
    machine.configure(listen=takes_some_then_goes.port)
    recipients = ["refused@hoster.example"] + [f"u{i}@hoster.example" for i in range(150)]
    result = machine.sendmail("-i", *recipients, message="Subject: many\n\nto many\n")
    said = result.stderr.decode().splitlines()
    assert said[0].startswith("minimail: minimail went away ("), said
    assert said[1:] == ["minimail: 1 of 151 recipients were not accepted, "
                        "<refused@hoster.example> with: 550 5.1.1 no such user"]
    assert result.returncode == 67
    dropped, = machine.dropped()                  # the 50 the first transaction left
    envelope = (machine.maildrop / dropped).read_bytes().split(b"\r\n", 1)[0]
    assert envelope.count(b"@hoster.example") == 50 and b"refused@" not in envelope


@pytest.mark.parametrize("options, complaint", [("--bogus 1", "unknown option --bogus"),
                                                 ("--listen 2525 --queue", "--queue needs a value")])
@pytest.mark.parametrize("name, flags", [("sendmail", ["-bp"]), ("sendmail", ["-q"]),
                                         ("mailq", []), ("sendmail", ["-i", "root"])])
def test_an_unknown_option_in_the_settings_file_is_a_settings_error_for_every_mode(
        tmp_path, name, flags, options, complaint):
    config = tmp_path / "minimail.conf"
    config.write_text(f"MINIMAIL_OPTIONS={options}\nMINIMAIL_SENDER=me@desktop.example\n"
                      "MINIMAIL_ADMIN=admin@hoster.example\n")
    (tmp_path / name).symlink_to(CONSOLE_SCRIPT)
    env = {**os.environ, "MINIMAIL_CONFIG": str(config), "MINIMAIL_ALIASES": "/dev/null"}
    result = subprocess.run([str(tmp_path / name), *flags], input=b"Subject: x\n\nhi\n",
                            capture_output=True, env=env, timeout=30)
    assert result.stderr.decode().splitlines() == [
        f"minimail: {config}: MINIMAIL_OPTIONS: {complaint}"]
    assert result.returncode == 78


@root_only
def test_more_recipients_than_a_maildrop_file_may_name_are_kept_in_files_the_daemon_takes(
        machine):
    machine.ran_once()
    machine.configure(listen=free_port())                   # minimail is down
    recipients = [f"u{i}@hoster.example" for i in range(5001)]
    result = machine.sendmail("-i", *recipients, message="Subject: many\n\nto many\n")
    assert result.returncode == 0, result.stderr
    named = []
    for name in machine.dropped():
        with open(machine.maildrop / name, "rb") as dropped:
            envelope = minimail.read_maildrop_envelope(dropped, os.fstat(dropped.fileno()),
                                                       minimail.MAX_SIZE_DEFAULT)
        named += envelope[1]
    assert sorted(named) == sorted(recipients)


def test_a_mail_name_file_with_a_stray_character_is_refused_at_once(tmp_path):
    mailname = tmp_path / "mailname"
    mailname.write_text("backup-server.internal.example.org/\n")   # tried every split: minutes
    listening = StandIn()
    try:
        config = tmp_path / "minimail.conf"
        config.write_text(f"MINIMAIL_OPTIONS=--listen 127.0.0.1:{listening.port} --no-queue\n"
                          "MINIMAIL_SENDER=me@desktop.example\n")
        env = {**os.environ, "MINIMAIL_CONFIG": str(config), "MINIMAIL_MAILNAME": str(mailname)}
        started = time.monotonic()
        result = subprocess.run([str(CONSOLE_SCRIPT), "sendmail", "-i", "you@hoster.example"],
                                input=b"Subject: x\n\nhi\n", capture_output=True, env=env,
                                timeout=30)
        assert result.returncode == 0, result.stderr
        assert time.monotonic() - started < 10
    finally:
        listening.close()
    assert minimail.read_mailname(str(mailname)) == ""


def test_a_sender_domain_ehlo_cannot_say_is_not_the_mail_name(tmp_path):
    """(Where this machine's FQDN is dotted, that is the mail name, and this
    test shows nothing; on one without, EHLO said bücher.example and failed.)"""
    assert minimail.choose_mail_name("", lambda: "vm", "me@bücher.example") is None
    assert minimail.choose_mail_name("", lambda: "vm", "me@bücher.example",
                                     "admin@hoster.example") == "hoster.example"
    mailname = tmp_path / "mailname"
    mailname.write_text("")
    listening = StandIn()
    try:
        config = tmp_path / "minimail.conf"
        config.write_text(f"MINIMAIL_OPTIONS=--listen 127.0.0.1:{listening.port} --no-queue\n"
                          "MINIMAIL_SENDER=me@bücher.example\n")
        env = {**os.environ, "MINIMAIL_CONFIG": str(config), "MINIMAIL_MAILNAME": str(mailname)}
        result = subprocess.run([str(CONSOLE_SCRIPT), "sendmail", "-i", "-f", "me@example.org",
                                 "you@hoster.example"], input=b"Subject: x\n\nhi\n",
                                capture_output=True, env=env, timeout=30)
    finally:
        listening.close()
    assert result.returncode == 0, result.stderr
