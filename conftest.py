"""What both test modules share: the real parts and the helpers that drive them.

The real parts: a real OpenSSH sshd on 127.0.0.1 (throwaway keys), a real SMTP
server standing in for the hoster (aiosmtpd), minimail itself started by path
(`python minimail.py`), and a stand-in tunnel command for tests that need no ssh.
The helpers act like a mail client (a message, smtplib, reading to EOF), like a
user at a shell (`minimail start ...`), or look at processes through /proc.
Plain helpers are imported with `from conftest import ...`; fixtures by name.
"""

import atexit
import functools
import os
import pwd
import re
import shutil
import signal
import smtplib
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from aiosmtpd.controller import Controller

HERE = Path(__file__).resolve().parent
MINIMAIL = HERE / "minimail.py"
SSHD = shutil.which("sshd") or "/usr/sbin/sshd"
SWAKS = shutil.which("swaks")
IN_CI = bool(os.environ.get("CI"))
#: As root, minimail runs its tunnel as root only when told so.
AS_ROOT = ["--user", "root"] if os.geteuid() == 0 else []
#: No settings file of this machine's (/etc/default/minimail, ~/.config/minimail)
#: may reach the minimail under test: an empty one stands in.
os.environ["MINIMAIL_CONFIG"] = os.devnull


#: What Debian's cron pipes to `sendmail -FCronDaemon -i -B8BITMIME -oem root`
#: for a job's output: LF line ends, no Date, no Message-ID.
CRON_MAIL = """\
From: root (Cron Daemon)
To: root
Subject: Cron <root@desktop> /usr/local/bin/backup
MIME-Version: 1.0
Content-Type: text/plain; charset=UTF-8
Content-Transfer-Encoding: 8bit
X-Cron-Env: <SHELL=/bin/sh>
X-Cron-Env: <HOME=/root>

backup: 3 files copied, Größe 12 kB
.
the line above has a lone dot, which -i keeps
"""


def need(tool, path):
    """Skip when a tool is missing, except in CI, where that is a failure."""
    if path and os.access(path, os.X_OK):
        return
    if IN_CI:
        pytest.fail(f"{tool} is missing, and CI must run the tests that need it")
    pytest.skip(f"{tool} is not installed")


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(predicate, timeout, what):
    """Poll predicate until it returns something true; fail after timeout seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


def child_processes(pid):
    """[(pid, command name, state)] of the direct children of pid, zombies included."""
    children = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat_line = (entry / "stat").read_text()
        except OSError:
            continue
        name = stat_line[stat_line.index("(") + 1:stat_line.rindex(")")]
        state, ppid = stat_line[stat_line.rindex(")") + 2:].split()[:2]
        if int(ppid) == pid:
            children.append((int(entry.name), name, state))
    return children


def descendants(pid):
    """All processes below pid."""
    found, todo = [], [pid]
    while todo:
        children = [child for child, _, _ in child_processes(todo.pop())]
        found += children
        todo += children
    return found


def alive(pid):
    """True while pid runs: a zombie (exited, not yet reaped by init) does not."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except FileNotFoundError:
        return False


def proc_status(pid):
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return dict(line.split(":\t", 1) for line in lines if ":\t" in line)


# ---------------------------------------------------------------------------
# The real parts: sshd, the hoster's SMTP server, minimail itself
# ---------------------------------------------------------------------------

class Sshd:
    """A real OpenSSH sshd on 127.0.0.1 that lets the current user in by key."""

    def __init__(self, root):
        need("sshd (openssh-server)", SSHD)
        self.root = root
        self.port = free_port()
        new_ssh_key(root / "host_key")
        new_ssh_key(root / "client_key")
        shutil.copy(root / "client_key.pub", root / "authorized_keys")
        host_key = (root / "host_key.pub").read_text().split()[:2]
        (root / "known_hosts").write_text(f"[127.0.0.1]:{self.port} {' '.join(host_key)}\n")
        (root / "sshd_config").write_text(f"""\
Port {self.port}
ListenAddress 127.0.0.1
HostKey {root}/host_key
PidFile {root}/sshd.pid
AuthorizedKeysFile {root}/authorized_keys
StrictModes no
UsePAM no
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
AllowTcpForwarding yes
LogLevel VERBOSE
""")
        self.config = root / "ssh_config"
        self.config.write_text(f"""\
Host *
  HostName 127.0.0.1
  Port {self.port}
  User {pwd.getpwuid(os.geteuid()).pw_name}
  IdentityFile {root}/client_key
  IdentitiesOnly yes
  UserKnownHostsFile {root}/known_hosts
  GlobalKnownHostsFile /dev/null
  StrictHostKeyChecking yes
  PasswordAuthentication no
""")
        if os.geteuid() == 0:
            os.makedirs("/run/sshd", mode=0o755, exist_ok=True)   # privilege separation
        self.log = root / "sshd.log"
        self.start()

    def start(self):
        """Start (or start again, on the same port with the same keys)."""
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [SSHD, "-D", "-e", "-f", str(self.root / "sshd_config")],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log)
        wait_until(self.greets, 10, "sshd to listen")

    def greets(self):
        if self.proc.poll() is not None:
            pytest.fail(f"sshd exited: {self.log.read_text()}")
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=2) as sock:
                return sock.recv(64).startswith(b"SSH-")
        except OSError:
            return False

    @property
    def ssh(self):
        """The --ssh value that points ssh at this server."""
        return f"ssh -F {self.config}"

    def stop(self):
        """Stop listening; connections already made stay (as an sshd restart does)."""
        self.proc.terminate()
        self.proc.wait(timeout=10)


def new_ssh_key(path):
    """A new ed25519 key pair with no passphrase: path and path.pub."""
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)],
                   check=True, capture_output=True, timeout=30)


def ssh_config_with_key(sshd, directory, name):
    """A new key directory/name, and a copy of sshd's ssh_config that logs in with it
    instead of the client key sshd lets in: (config path, key path)."""
    key = directory / name
    new_ssh_key(key)
    config = directory / f"{name}.ssh_config"
    config.write_text(sshd.config.read_text().replace(f"{sshd.root}/client_key", str(key)))
    return config, key


class HosterController(Controller):
    """aiosmtpd's server with a listen backlog fit for hundreds of clients at once:
    asyncio's default of 100 makes the rest wait for SYN retries, seconds each."""

    def _create_server(self):
        return self.loop.create_server(self._factory_invoker, host=self.hostname,
                                       port=self.port, backlog=1024)


class Hoster:
    """A real SMTP server (aiosmtpd) standing in for the hoster's; it keeps every
    message, and refuses the recipients in `refuse` ({address: reply})."""

    def __init__(self):
        self.messages = []
        self.refuse = {}
        self.port = free_port()
        self.controller = HosterController(self, hostname="127.0.0.1", port=self.port)
        self.controller.start()

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if address in self.refuse:
            return self.refuse[address]
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 ok"

    async def handle_DATA(self, server, session, envelope):
        self.messages.append(envelope)
        return "250 2.0.0 stored"

    def bodies(self):
        return [envelope.content for envelope in self.messages]


class Minimail:
    """`python minimail.py --foreground --listen 127.0.0.1:PORT ARGS...`, its log in a file."""

    def __init__(self, args, log_path):
        self.port = free_port()
        self.log_path = log_path
        self.queue = log_path.with_suffix(".queue")      # never the machine's own queue
        queue = [] if {"--queue", "--no-queue"} & set(args) else ["--queue", str(self.queue)]
        self.argv = [sys.executable, str(MINIMAIL), "--foreground",
                     "--listen", f"127.0.0.1:{self.port}", *AS_ROOT, *queue, *args]
        with open(log_path, "wb") as log_file:
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=log_file)
        self.wait_for_log(r"listening on")

    def log(self):
        return self.log_path.read_text(errors="replace")

    def wait_for_log(self, pattern, timeout=10):
        def seen():
            if self.proc.poll() is not None:
                pytest.fail(f"minimail exited with {self.proc.returncode}:\n{self.log()}")
            return re.search(pattern, self.log())
        return wait_until(seen, timeout, f"{pattern!r} in minimail's log")

    def tunnel_starts(self):
        return len(re.findall(r"tunnel starting \(pid \d+\)", self.log()))

    def tunnels(self):
        """The tunnel processes running now (minimail's children)."""
        return child_processes(self.proc.pid)

    def stop(self, timeout=15):
        """SIGTERM, as systemd or Ctrl-C would; return the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            pytest.fail(f"minimail did not stop within {timeout} s:\n{self.log()}")


@pytest.fixture(scope="session")
def sshd(tmp_path_factory):
    server = Sshd(tmp_path_factory.mktemp("sshd"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def own_sshd(tmp_path_factory):
    """An sshd for one test module alone, for tests that stop it, freeze its
    connections or restart it (the other modules' sshd stays untouched)."""
    server = Sshd(tmp_path_factory.mktemp("own-sshd"))
    yield server
    server.proc.kill()
    server.proc.wait()


@pytest.fixture
def hoster():
    server = Hoster()
    yield server
    server.controller.stop()


def starter(tmp_path, name, started):
    """start(*args) -> a Minimail with those arguments, logging to tmp_path/NAME-N.log,
    added to the list `started`."""
    def start(*args):
        process = Minimail([str(a) for a in args], tmp_path / f"{name}-{len(started)}.log")
        started.append(process)
        return process
    return start


@pytest.fixture
def minimail_process(tmp_path):
    """Start minimail with the given arguments; it is stopped (and must exit 0) after the test."""
    started = []
    yield starter(tmp_path, "minimail", started)
    for process in started:
        assert process.stop() == 0, process.log()
        assert process.tunnels() == [], "a tunnel process outlived minimail"


@pytest.fixture
def minimail_to_kill(tmp_path):
    """Start minimail for a test that kills it (kill -9): whatever still runs
    at the end is killed, so a failing test leaves nothing behind."""
    started = []
    yield starter(tmp_path, "killed", started)
    for process in started:
        if process.proc.poll() is None:
            process.proc.kill()
            process.proc.wait()


def minimail_via(sshd, hoster, minimail_process, linger):
    """A function that starts minimail in front of sshd, tunnelling to the hoster:
    start(*args, linger=linger, remote=None, ssh=None), where remote and ssh replace
    the hoster's address and sshd's --ssh value."""
    def start(*args, linger=linger, remote=None, ssh=None):
        return minimail_process("--ssh", ssh or sshd.ssh,
                                "--remote", remote or f"127.0.0.1:{hoster.port}",
                                "--linger", linger, "--jitter", 0, *args, "hoster")
    return start


@pytest.fixture
def through_ssh(sshd, hoster, minimail_process):
    """Start minimail in front of the test sshd, tunnelling to the hoster."""
    return minimail_via(sshd, hoster, minimail_process, linger=5)


# ---------------------------------------------------------------------------
# A stand-in tunnel, for tests that need no ssh
# ---------------------------------------------------------------------------

#: A stand-in for ssh: listens on the tunnel port and serves each connection.
#:   echo DELAY PORT  -- start listening only after DELAY seconds; echo until EOF
#:   greet PORT FILE  -- send 1 MiB and half-close; then sink until EOF and
#:                       write "<length> <sha256>" of what arrived to FILE
#:   forward PORT FILE -- splice each connection to 127.0.0.1:<the port in FILE>,
#:                       read anew for each; without FILE, exit at once (the
#:                       hoster is away: as an ssh that cannot connect)
TUNNEL_DOUBLE = r'''
import hashlib, os, socket, sys, threading, time

def echo(conn):
    try:
        while True:
            data = conn.recv(65536)
            if not data:
                break
            conn.sendall(data)
        conn.shutdown(socket.SHUT_WR)
    except OSError:            # the client went away
        pass
    conn.close()

def greet(conn, path):
    conn.sendall(bytes(range(256)) * 4096)
    conn.shutdown(socket.SHUT_WR)
    digest, length = hashlib.sha256(), 0
    while True:
        data = conn.recv(65536)
        if not data:
            break
        digest.update(data)
        length += len(data)
    with open(path + ".tmp", "w") as out:      # whole, or not there
        out.write(f"{length} {digest.hexdigest()}")
    os.rename(path + ".tmp", path)
    conn.close()

def pipe(src, dst):
    try:
        while True:
            data = src.recv(65536)
            if not data:
                break
            dst.sendall(data)
        dst.shutdown(socket.SHUT_WR)
    except OSError:            # either side went away
        pass

def forward(conn, path):
    try:
        with open(path) as f:
            far = socket.create_connection(("127.0.0.1", int(f.read())), timeout=5)
    except (OSError, ValueError):
        conn.close()
        return
    far.settimeout(None)
    back = threading.Thread(target=pipe, args=(far, conn), daemon=True)
    back.start()
    pipe(conn, far)
    back.join()
    far.close()
    conn.close()

mode = sys.argv[1]
if mode == "echo":
    time.sleep(float(sys.argv[2]))
    port, serve, extra = int(sys.argv[3]), echo, ()
elif mode == "forward":
    if not os.path.exists(sys.argv[3]):
        sys.exit("forward: the hoster is away")
    port, serve, extra = int(sys.argv[2]), forward, (sys.argv[3],)
else:
    port, serve, extra = int(sys.argv[2]), greet, (sys.argv[3],)
listener = socket.create_server(("127.0.0.1", port))
while True:
    conn, _ = listener.accept()
    threading.Thread(target=serve, args=(conn, *extra), daemon=True).start()
'''


@pytest.fixture
def double_script(tmp_path):
    """TUNNEL_DOUBLE written to a file that any user may read; its path."""
    script = tmp_path / "tunnel_double.py"
    script.write_text(TUNNEL_DOUBLE)
    script.chmod(0o644)
    return script


def double_options(script, *command):
    """(tunnel port, minimail's options that run `python script COMMAND...` as the tunnel
    on that port); "{port}" in a word of command stands for the port."""
    port = free_port()
    words = [sys.executable, script, *[str(w).format(port=port) for w in command]]
    return port, ["--tunnel-port", port, "--tunnel-command", " ".join(map(str, words))]


@pytest.fixture
def tunnel_double(double_script, minimail_process):
    """Start minimail with the stand-in tunnel command; returns (minimail, tunnel port)."""
    def start(*command, linger=5, wait=30, options=()):
        port, tunnel = double_options(double_script, *command)
        mm = minimail_process(*tunnel, "--linger", linger, "--jitter", 0, "--wait", wait, *options)
        return mm, port
    return start


@pytest.fixture
def tunnel_script(double_script):
    """The stand-in tunnel's options: --tunnel-port PORT --tunnel-command "python double.py ..."."""
    def options(*command):
        return double_options(double_script, *command)[1]
    return options


# ---------------------------------------------------------------------------
# Like a user at a shell: minimail's commands, a directory for the daemon
# ---------------------------------------------------------------------------

def minimail_command(*args, env=None, timeout=60):
    """Run `python minimail.py ARGS...` to its end, as a user at a shell would."""
    return subprocess.run([sys.executable, MINIMAIL, *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=env)


@functools.lru_cache(maxsize=None)
def console_script():
    """minimail's console script, which a `sendmail` symlink names: pip's, beside
    a venv's python (`pip install -e .`); under a python that is no venv
    (Debian's own, as .ci/run tries it) one of the same shape, made here, that
    runs this checkout's minimail.py."""
    if sys.prefix != sys.base_prefix:
        return Path(sys.executable).parent / "minimail"
    directory = Path(tempfile.mkdtemp(prefix="minimail-script-"))
    atexit.register(shutil.rmtree, directory, ignore_errors=True)
    directory.chmod(0o755)
    script = directory / "minimail"
    script.write_text(f"#!{sys.executable}\nimport sys\nsys.path.insert(0, {str(HERE)!r})\n"
                      "from minimail import main\nsys.exit(main())\n")
    script.chmod(0o755)
    return script


@pytest.fixture
def run_dir():
    """A directory for pid, state and log files that any user may enter (tmp_path's
    parents are closed to the users a test drops to)."""
    path = Path(tempfile.mkdtemp(prefix="minimail-test-"))
    path.chmod(0o755)
    yield path
    pid_file = path / "minimail.pid"
    if pid_file.exists():                     # a test failed with its daemon running
        minimail_command("stop", "--pidfile", pid_file)
    shutil.rmtree(path, ignore_errors=True)


def start_daemon(run_dir, *args):
    """`minimail start` on a free port, its pid file minimail.pid and its log file
    minimail.log (timestamped) in run_dir; the port it listens on."""
    port = free_port()
    result = minimail_command("start", *AS_ROOT, "--listen", f"127.0.0.1:{port}",
                              "--pidfile", run_dir / "minimail.pid",
                              "--logfile", run_dir / "minimail.log",
                              "--queue", run_dir / "queue", *args)
    assert result.returncode == 0, result.stderr
    return port


@pytest.fixture
def check_setup(sshd, hoster, tmp_path):
    """`minimail check` against the test sshd, with one thing changed."""
    def check(*args, ssh=None, remote=None):
        return minimail_command("check", *AS_ROOT, "--ssh", ssh or sshd.ssh,
                                "--remote", remote or f"127.0.0.1:{hoster.port}", *args, "hoster")
    return check


# ---------------------------------------------------------------------------
# Helpers that act like a mail client
# ---------------------------------------------------------------------------

def make_message(marker, size=2000):
    """A message with CRLF line ends, a line that needs dot-stuffing, and a body
    full of marker text that must never show up in a log."""
    body = "".join(f"{marker} line {i}\r\n" for i in range(size // 40 + 1))
    return (f"From: cron@desktop.example\r\nTo: admin@hoster.example\r\n"
            f"Subject: {marker} subject\r\n\r\n.a line starting with a dot\r\n{body}").encode()


def send_mail(port, message, timeout=30):
    with smtplib.SMTP("127.0.0.1", port, timeout=timeout) as smtp:
        smtp.sendmail("cron@desktop.example", ["admin@hoster.example"], message)


def read_until_eof(sock, timeout=20):
    sock.settimeout(timeout)
    chunks = []
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


# ---------------------------------------------------------------------------
# The hoster away, a small disk
# ---------------------------------------------------------------------------

@pytest.fixture
def queueing(request, own_sshd, hoster, minimail_process, tmp_path):
    """minimail in front of this module's sshd and hoster, retrying queued
    mail after `retry` seconds (the module's QUEUE_RETRY, else 0.5), with a
    pid file (so `status` and `flush` find it)."""
    def start(*args, retry=getattr(request.module, "QUEUE_RETRY", 0.5), linger=30):
        pidfile = tmp_path / f"minimail-{free_port()}.pid"
        mm = minimail_via(own_sshd, hoster, minimail_process, linger)(
            "--queue-retry", retry, "--pidfile", pidfile, *args)
        mm.pidfile = pidfile
        return mm
    return start


def as_nobody(action):
    """Run action() in a fork of this process as nobody; (its exit status, what it wrote
    to the pipe it is given as its argument)."""
    nobody = pwd.getpwnam("nobody")
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:
        status = 70
        try:
            os.close(read_end)
            os.setgid(nobody.pw_gid)
            os.setuid(nobody.pw_uid)
            out = os.fdopen(write_end, "w")
            sys.stdout = sys.stderr = out
            status = action(out)
            out.flush()
        finally:
            os._exit(status)
    os.close(write_end)
    with os.fdopen(read_end) as said:
        text = said.read()
    _, status = os.waitpid(child, 0)
    return os.waitstatus_to_exitcode(status), text


@pytest.fixture
def hoster_reachable(own_sshd):
    """reachable(False) stops this module's sshd, so ssh is refused at once;
    reachable(True) starts it again.  It runs again after the test."""
    def reachable(up):
        running = own_sshd.proc.poll() is None
        if up and not running:
            own_sshd.start()
        elif not up and running:
            own_sshd.stop()
    yield reachable
    reachable(True)


@pytest.fixture
def small_disk(tmp_path):
    """disk(size="4m", inodes=None) -> an empty directory that is a tmpfs of
    that size (and that many inodes) of its own, unmounted after the test;
    the test is skipped where mounting is not allowed (not root, a container)."""
    mounted = []

    def disk(size="4m", inodes=None):
        if os.geteuid() != 0:
            pytest.skip("mounting a small tmpfs needs root")
        path = tmp_path / f"disk-{len(mounted)}"
        path.mkdir()
        options = f"size={size}" + (f",nr_inodes={inodes}" if inodes else "")
        if subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                          capture_output=True).returncode != 0:
            pytest.skip("mounting a tmpfs is not allowed here")
        mounted.append(path)
        return path
    yield disk
    for path in mounted:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def fill_disk(directory, leave=0, inodes=False):
    """Fill the file system of directory (a small tmpfs) with files of its own:
    its blocks until at most `leave` bytes are free, or (inodes=True) its
    inodes; the files made, for the test to remove when space is back."""
    made = [directory / "filler"]
    if inodes:
        made[0].touch()
        for i in range(1_000_000):
            try:
                (directory / f"filler-{i}").touch()
            except OSError:                   # ENOSPC: no inode left
                return made
            made.append(directory / f"filler-{i}")
    st = os.statvfs(directory)
    want = max(0, st.f_bavail * st.f_frsize - leave)
    fd = os.open(made[0], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        while want > 0:
            want -= os.write(fd, b"x" * min(want, 1 << 20))
    except OSError:                           # ENOSPC: full
        pass
    finally:
        os.close(fd)
    return made
