#!/usr/bin/env python3
"""Benchmark minimail against other TCP forwarders, plain ssh tunnels, Postfix and msmtp.

Run it from a checkout, as root or as a user who may run sshd:

    python bench_minimail.py                 # everything, 5 rounds, under 3 minutes
    python bench_minimail.py --quick         # 2 rounds, smaller sizes, under 40 s
    python bench_minimail.py --section forwarder --rounds 3
    python bench_minimail.py --minimail /tmp/old/minimail.py     # measure another copy
    python bench_minimail.py --compare /tmp/before/minimail.py   # A/B in one run

It needs python with gevent, docopt-ng (for minimail) and aiosmtpd (it says
what to install, and exits 2, if one is missing), plus socat, haproxy,
systemd-socket-activate, /usr/lib/systemd/systemd-socket-proxyd, OpenSSH
(sshd, ssh, ssh-keygen), and for the last sections Postfix (run as root) and
msmtp; without those two, their rows are left out with one line that says so.
Everything it starts listens on 127.0.0.1 only: a throwaway sshd (keys
generated in a temp dir), an aiosmtpd server as the hoster, a small line
server for section 1 (both forked from this process; the clients run in this
process itself, or in processes forked from it), and a throwaway Postfix.
Every contender runs once per round, in a fresh random order each round.
Tables show the median over the rounds with (min-max), and the ratio of
medians to the section's baseline (value / baseline: above 1 means more,
whether more is better or worse).

--compare PATH adds a second copy, "minimail B (PATH)", started with the same
arguments as the one measured (each gets --user root, when run as root, only
if its --help knows that option) and measured side by side with it, in the
same rounds, in sections forwarder, tunnel and cold (and intake, delivery and
sendmail when it has a queue and the sendmail command).  A line "B/A" gives
minimail B / minimail: the ratio of medians and the range of the per-round
ratios.

Sections (--section NAME, repeatable):

  forwarder  minimail as a plain TCP forwarder (--tunnel-command "sleep ...",
             --tunnel-port pointing straight at the server) against direct
             connections, socat, systemd-socket-proxyd and haproxy:
             1a bulk throughput each way: 1 MiB random blocks, each stamped
             with its number; the receiver keeps every byte and checks the
             sha256 against the sender's after the clock stops, so hashing
             costs the forwarders no CPU (2 cores, 3 busy processes);
             1b sequential short sessions (connect, 220, QUIT, 221) per second,
             with p50/p99 of connect-to-greeting;
             1c N clients held open at once: time until all are greeted, and
             PSS per held client, summed over the forwarder's process tree.
  tunnel     one smtplib transaction (EHLO, MAIL, RCPT, DATA 1 KiB, QUIT)
             through a warm tunnel: direct, standing `ssh -N -L`, standing
             `ssh -T -L ... cat`, minimail, minimail --no-session.
  cold       connect-to-220 when no tunnel runs: minimail (--linger 0) against
             the floor, launching `ssh -T -L ... cat` and polling every 10 ms.
  idle       CPU used by an idle minimail (no client, no tunnel).
  intake     10 KiB messages per second accepted into a durable queue (each
             fsync'ed before its 250), 4 clients at once (forked processes),
             one connection per message, as cron, sendmail and smtp-source
             send them: minimail's queue (--queue DIR, --tunnel-command false,
             so every tunnel start fails and minimail answers each client
             itself) against Postfix's smtpd in a throwaway instance (its own
             config, queue and data directories in a temp dir, 127.0.0.1 only,
             every mail put on hold: nothing is delivered; stopped and removed
             afterwards).  Counted: 250 replies to DATA.
  delivery   N queued 10 KiB messages flushed through one tunnel: queued while
             the tunnel command fails (`sh -c 'test -e FLAG && exec socat ...;
             exit 1'`), then FLAG is made and minimail gets SIGUSR1; timed from
             the signal until the hoster has all N.  Against the same N sent in
             a row on one smtplib connection through minimail's splice (tunnel
             up).  Goal: the flush at least 0.5 x the splice's rate.
  sendmail   wall time of `minimail sendmail -i RCPT < message` (the venv's
             console script, and python minimail.py) to a minimail with a warm
             tunnel, against `python -c pass`, `python -c 'import smtplib'` and
             msmtp to the same minimail; every contender once per run, in a
             fresh random order, 30 runs.  Goal: within 30 ms of python -c pass.
             minimail sendmail finds the port in the file $MINIMAIL_CONFIG
             names (MINIMAIL_OPTIONS=--listen 127.0.0.1:PORT).

The sections on the queue and sendmail measure minimail only if its --help
mentions --queue (intake, delivery) or sendmail; otherwise they say so in one
line and measure the others.  Every minimail started gets an empty settings
file ($MINIMAIL_CONFIG) and, if it keeps a queue, a queue directory of its own
in the temp dir, so nothing of the machine's minimail is read or written.
"""

import argparse
import dataclasses
import hashlib
import importlib.metadata
import importlib.util
import math
import multiprocessing
import os
import platform
import pwd
import random
import resource
import selectors
import shlex
import shutil
import signal
import smtplib
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SSHD = shutil.which("sshd") or "/usr/sbin/sshd"
PROXYD = "/usr/lib/systemd/systemd-socket-proxyd"
MiB = 1 << 20
GREETING = b"220 bench.invalid ready\r\n"
SERVER_LIFETIME = 1800                   # forked servers end by themselves after this


@dataclasses.dataclass
class Plan:
    """How much each section does."""
    rounds: int
    bulk_mib: int          # MiB per bulk transfer, each way
    sessions: int          # sequential short sessions per contender and round
    held: int              # clients held open at once
    transactions: int      # timed smtplib transactions per contender and round
    cold_samples: int      # cold starts per contender, over all rounds
    idle_seconds: float    # how long idle CPU is sampled
    intake: int            # messages per contender and round into a queue (4 clients)
    delivery: int          # messages queued, then flushed, per round
    sendmail_runs: int     # runs of each sendmail contender, interleaved


FULL = Plan(rounds=5, bulk_mib=256, sessions=1000, held=1000, transactions=30,
            cold_samples=15, idle_seconds=5.0, intake=400, delivery=200, sendmail_runs=30)
QUICK = Plan(rounds=2, bulk_mib=32, sessions=200, held=1000, transactions=10,
             cold_samples=4, idle_seconds=2.0, intake=100, delivery=50, sendmail_runs=10)


# ---------------------------------------------------------------------------
# Small helpers: waiting, ports, /proc, sockets
# ---------------------------------------------------------------------------

def wait_for(predicate, timeout, what, every=0.01):
    """Poll predicate until it returns something true; raise after timeout seconds."""
    deadline = time.monotonic() + timeout
    while not (result := predicate()):
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(every)
    return result


def slug(name):
    """name made fit for a file name: 'minimail B (/x/y.py)' -> 'minimail-B-x-y-py'."""
    return "-".join("".join(c if c.isalnum() else " " for c in name).split())


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def is_listening(port):
    """True if a socket listens on 127.0.0.1:port (from /proc/net/tcp: no connection made)."""
    wanted = f"0100007F:{port:04X}"
    with open("/proc/net/tcp") as table:
        next(table)
        return any(f[1] == wanted and f[3] == "0A" for f in map(str.split, table))


def process_tree(pid):
    """[pid, and the pid of every descendant], through the ppid field in /proc."""
    children = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    tree, todo = [], [pid]
    while todo:
        tree.append(todo.pop())
        todo.extend(children.get(tree[-1], ()))
    return tree


def pss_kib(pids):
    """Sum of Pss (KiB) over the given processes, from /proc/PID/smaps_rollup."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                total += next(int(line.split()[1]) for line in f if line.startswith("Pss:"))
        except (OSError, StopIteration):
            continue
    return total


def cpu_ticks(pid):
    """utime + stime of a process, in clock ticks."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def load_average():
    return " ".join(open("/proc/loadavg").read().split()[:3])


def touched_buffer(size):
    """A bytearray whose pages are all mapped already, so no transfer pays page faults."""
    buf = bytearray(size)
    buf[::4096] = b"\1" * len(range(0, size, 4096))
    return buf


def read_line(sock, limit=4096):
    """Read one line byte by byte, never past its b'\\n' (bulk data may follow)."""
    line = bytearray()
    while not line.endswith(b"\n") and len(line) < limit:
        if not (chunk := sock.recv(1)):
            break
        line += chunk
    return bytes(line)


def recv_line(sock):
    """Read a reply that comes as one small segment (a greeting, a 221)."""
    data = b""
    while b"\n" not in data and len(data) < 4096:
        if not (chunk := sock.recv(512)):
            break
        data += chunk
    return data


def greet_and_quit(port, start=None):
    """Connect, read the 220, QUIT, read the 221; return seconds from start (default:
    the connect) to the 220.  Raises ConnectionRefusedError while nobody listens."""
    start = start or time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
        greeting = recv_line(sock)
        greeted = time.perf_counter()
        sock.sendall(b"QUIT\r\n")
        bye = recv_line(sock)
    if not greeting.startswith(b"220") or not bye.startswith(b"221"):
        raise OSError(f"port {port}: unexpected replies {greeting!r} {bye!r}")
    return greeted - start


@dataclasses.dataclass(frozen=True)
class Copy:
    """A minimail.py to measure, and the --help text that says what it can do."""
    name: str            # "minimail", or "minimail B (PATH)" for --compare's copy
    path: str
    usage: str

    def knows(self, word):
        """True if this copy's --help mentions word (an option, a command)."""
        return word in self.usage

    def label(self):
        """Its name, with its path if the name has none."""
        return self.name if self.path in self.name else f"{self.name} ({self.path})"


COPIES = []              # the copy measured (A), then --compare's (B); set by parse_args
WORKDIR = None           # the run's temp dir (Path); set by main


def minimail_argv(port, *args, copy=None):
    """`python minimail.py --foreground --listen 127.0.0.1:PORT ARGS...` for copy
    (default: the one measured), plus `--user root` when we are root and that copy
    knows the option (a newer minimail refuses to run as root without it), and,
    if the copy keeps a queue and ARGS name none, `--queue` in a fresh directory
    of the temp dir (its default would be /var/spool/minimail as root)."""
    copy = copy or COPIES[0]
    argv = [sys.executable, copy.path, "--foreground", "--listen", f"127.0.0.1:{port}"]
    if os.geteuid() == 0 and copy.knows("--user"):
        argv += ["--user", "root"]
    if copy.knows("--queue") and not {"--queue", "--no-queue"} & set(args):
        argv += ["--queue", tempfile.mkdtemp(prefix="queue-", dir=WORKDIR)]
    return argv + list(args)


# ---------------------------------------------------------------------------
# Processes we start: every one is stopped, with its whole tree, in the end
# ---------------------------------------------------------------------------

class Child:
    """A program run in a session of its own; stop() ends it and all below it."""

    live = []        # Child and ForkedServer objects not stopped yet

    def __init__(self, argv, log_path, stdin=subprocess.DEVNULL):
        self.argv, self.log_path = argv, log_path
        with open(log_path, "ab") as log:
            self.popen = subprocess.Popen(argv, stdin=stdin, stdout=log,
                                          stderr=subprocess.STDOUT, start_new_session=True)
        self.pid = self.popen.pid
        Child.live.append(self)

    def alive(self):
        return self.popen.poll() is None

    def tree(self):
        return process_tree(self.pid) if self.alive() else []

    def wait_listening(self, port, timeout=15):
        def ready():
            if not self.alive():
                raise RuntimeError(f"{self.argv[:2]} exited: {self.log_tail()}")
            return is_listening(port)
        wait_for(ready, timeout, f"{os.path.basename(self.argv[0])} to listen on {port}")

    def log_tail(self):
        return Path(self.log_path).read_text(errors="replace")[-2000:]

    def stop(self, grace=3.0):
        """SIGTERM the process group; after grace seconds SIGTERM again (minimail
        then closes its sessions at once), then SIGKILL.  Last, kill what is left
        of its descendants in other sessions (minimail's tunnel)."""
        if self in Child.live:
            Child.live.remove(self)
        pids = self.tree()
        if self.popen.stdin:
            self.popen.stdin.close()
        for sig in (signal.SIGTERM, signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(self.pid, sig)
                self.popen.wait(timeout=grace)
                break
            except ProcessLookupError:
                self.popen.wait(timeout=grace)
                break
            except subprocess.TimeoutExpired:
                continue
        for pid in pids[1:]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


class ForkedServer:
    """A server function run in a forked copy of this process (so it shares the
    bulk data), ended by SIGTERM and, at the latest, after SERVER_LIFETIME."""

    def __init__(self, target, *args):
        self.process = multiprocessing.get_context("fork").Process(
            target=run_forked, args=(target, *args), daemon=True)
        self.process.start()
        Child.live.append(self)

    def stop(self, grace=3.0):
        if self in Child.live:
            Child.live.remove(self)
        self.process.terminate()
        self.process.join(grace)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(grace)


def run_forked(target, *args):
    """In the forked server: SIGTERM ends it, Ctrl-C is the parent's business."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    target(*args)


def stop_everything():
    for child in reversed(Child.live[:]):
        try:
            child.stop()
        except Exception as exc:            # keep stopping the others
            print(f"cleanup: {exc!r}", file=sys.stderr)


def wait_settled(child, timeout=5.0):
    """Wait (bounded) until child's process count has not changed for 100 ms
    (socat's children of finished clients have exited)."""
    deadline, last, steady = time.monotonic() + timeout, None, 0
    while child and time.monotonic() < deadline and steady < 5:
        count = len(child.tree())
        steady, last = (steady + 1 if count == last else 0), count
        time.sleep(0.02)


# ---------------------------------------------------------------------------
# The servers: section 1's line server, the hoster's SMTP server, sshd
# ---------------------------------------------------------------------------

def bulk_blocks(base, size):
    """The bulk data, either way: size // len(base) copies of the random block base,
    each stamped with its number, so that no two blocks are alike."""
    block = bytearray(base)
    for number in range(size // len(base)):
        block[:8] = number.to_bytes(8, "big")
        yield block


def serve_lines(listener, base, size):
    """Section 1's server.  Greets every connection with 220, then: QUIT -> 221
    and close; GET n -> n bytes of bulk data, then close; PUT n -> reads n bytes,
    answers '250 received n', then '250 <sha256 of what it read>'."""
    upload_buffer = touched_buffer(size)
    sel = selectors.DefaultSelector()
    listener.setblocking(False)
    sel.register(listener, selectors.EVENT_READ)
    deadline = time.monotonic() + SERVER_LIFETIME
    while time.monotonic() < deadline:
        for key, _ in sel.select(timeout=60):
            if key.fileobj is listener:
                accept_all(listener, sel)
            else:
                serve_readable(key.fileobj, key.data, sel, base, upload_buffer)


def accept_all(listener, sel):
    while True:
        try:
            conn, _ = listener.accept()
        except BlockingIOError:
            return
        conn.setblocking(False)
        conn.send(GREETING)
        sel.register(conn, selectors.EVENT_READ, bytearray())


def serve_readable(conn, pending, sel, base, upload_buffer):
    try:
        data = conn.recv(65536)
    except BlockingIOError:
        return
    except OSError:
        data = b""
    pending += data
    if data and b"\n" not in pending and len(pending) < 1024:
        return                                  # wait for the rest of the line
    sel.unregister(conn)
    line, _, early = bytes(pending).partition(b"\n")
    words = line.split()
    if len(words) == 2 and words[0] in (b"GET", b"PUT") and words[1].isdigit():
        conn.setblocking(True)
        threading.Thread(target=serve_bulk, daemon=True, args=(
            conn, words[0], int(words[1]), early, base, upload_buffer)).start()
        return
    if words == [b"QUIT"]:
        conn.send(b"221 bye\r\n")
    conn.close()


def serve_bulk(conn, verb, size, early, base, upload_buffer):
    with conn:
        conn.settimeout(120)
        if verb == b"GET":
            for block in bulk_blocks(base, size):
                conn.sendall(block)
            return
        view = memoryview(upload_buffer)
        view[:len(early)] = early
        got = len(early)
        while got < size and (n := conn.recv_into(view[got:size])):
            got += n
        conn.sendall(b"250 received %d\r\n" % got)
        conn.sendall(b"250 %s\r\n" % hashlib.sha256(view[:got]).hexdigest().encode())


class Sink:
    """aiosmtpd handler: accepts every message and keeps none.  It counts them in
    shared memory, with the time.perf_counter() of the last one (CLOCK_MONOTONIC:
    the same clock in every process), so the bench process can see them arrive."""

    def __init__(self, count, last):
        self.count, self.last = count, last

    async def handle_DATA(self, server, session, envelope):
        with self.count.get_lock():
            self.count.value += 1
            self.last.value = time.perf_counter()
        return "250 2.0.0 accepted"


def serve_smtp(port, count, last):
    """The hoster's SMTP server: aiosmtpd on 127.0.0.1:port."""
    from aiosmtpd.controller import Controller
    Controller(Sink(count, last), hostname="127.0.0.1", port=port,
               server_hostname="hoster.invalid").start()
    threading.Event().wait(SERVER_LIFETIME)


class HosterSmtp:
    """The hoster's SMTP server, forked, with what it has received so far."""

    def __init__(self):
        context = multiprocessing.get_context("fork")
        self.count, self.last = context.Value("q", 0), context.Value("d", 0.0)
        self.port = free_port()
        self.server = ForkedServer(serve_smtp, self.port, self.count, self.last)
        wait_for(lambda: is_listening(self.port), 15, "aiosmtpd to listen")

    def received(self):
        return self.count.value

    def last_arrival(self):
        return self.last.value

    def stop(self):
        self.server.stop()


class Sshd:
    """A real OpenSSH sshd on 127.0.0.1 that lets the current user in by key."""

    def __init__(self, root):
        self.port = free_port()
        for name in ("host_key", "client_key"):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(root / name)],
                           check=True, capture_output=True, timeout=30)
        shutil.copy(root / "client_key.pub", root / "authorized_keys")
        host_key = " ".join((root / "host_key.pub").read_text().split()[:2])
        (root / "known_hosts").write_text(f"[127.0.0.1]:{self.port} {host_key}\n")
        (root / "sshd_config").write_text(
            f"Port {self.port}\nListenAddress 127.0.0.1\nHostKey {root}/host_key\n"
            f"PidFile {root}/sshd.pid\nAuthorizedKeysFile {root}/authorized_keys\n"
            "StrictModes no\nUsePAM no\nPasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\nPermitRootLogin prohibit-password\n"
            "AllowTcpForwarding yes\nLogLevel INFO\n")
        self.config = root / "ssh_config"
        self.config.write_text(
            f"Host *\n  HostName 127.0.0.1\n  Port {self.port}\n"
            f"  User {pwd.getpwuid(os.geteuid()).pw_name}\n  IdentityFile {root}/client_key\n"
            f"  IdentitiesOnly yes\n  UserKnownHostsFile {root}/known_hosts\n"
            "  GlobalKnownHostsFile /dev/null\n  StrictHostKeyChecking yes\n"
            "  PasswordAuthentication no\n  BatchMode yes\n")
        if os.geteuid() == 0:
            os.makedirs("/run/sshd", mode=0o755, exist_ok=True)   # privilege separation
        self.child = Child([SSHD, "-D", "-e", "-f", str(root / "sshd_config")], root / "sshd.log")
        self.child.wait_listening(self.port)

    def ssh(self, *args):
        """An ssh argv that reaches this sshd as `hoster`."""
        return ["ssh", "-F", str(self.config), "-o", "ExitOnForwardFailure=yes", *args]


# ---------------------------------------------------------------------------
# Section 1: the forwarder alone (the clients run here, in the bench process)
# ---------------------------------------------------------------------------

def measure_short_sessions(port, count, time_cap=20.0):
    """Sequential short sessions: (sessions per second, p50 ms, p99 ms, sessions
    that failed or did not run within time_cap)."""
    latencies = []
    start = time.perf_counter()
    for _ in range(count):
        if time.perf_counter() - start > time_cap:
            break
        try:
            latencies.append(greet_and_quit(port))
        except OSError:
            pass
    elapsed = time.perf_counter() - start
    latencies.sort()
    p50, p99 = (percentile(latencies, p) * 1000 for p in (50, 99))
    return len(latencies) / elapsed, p50, p99, count - len(latencies)


def percentile(ordered, p):
    """Nearest-rank percentile of a sorted list (nan if empty)."""
    if not ordered:
        return math.nan
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def measure_held(port, count, child, timeout=30.0):
    """Open count clients at once; return (how many got a 220, seconds until the
    last 220, PSS KiB per held client or None for direct)."""
    idle_pss = pss_kib(child.tree()) if child else None
    sel, socks, greeted = selectors.DefaultSelector(), [], 0
    start = last = time.perf_counter()
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.setblocking(False)
            sock.connect_ex(("127.0.0.1", port))
            socks.append(sock)
            sel.register(sock, selectors.EVENT_READ)
        waiting, deadline = count, start + timeout
        while waiting and time.perf_counter() < deadline:
            for key, _ in sel.select(timeout=max(0.0, deadline - time.perf_counter())):
                try:
                    data = key.fileobj.recv(256)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                sel.unregister(key.fileobj)
                waiting -= 1
                if data.startswith(b"220"):
                    greeted, last = greeted + 1, time.perf_counter()
        held_pss = pss_kib(child.tree()) if child else None
    finally:
        sel.close()
        for sock in socks:
            sock.close()
    return greeted, last - start, (held_pss - idle_pss) / count if child else None


@dataclasses.dataclass
class BulkData:
    base: bytes            # a random block: see bulk_blocks()
    size: int              # bytes per transfer
    digest: str            # the sender's sha256 of the data
    buffer: bytearray      # where downloads land, to be hashed after the clock stops


def make_bulk_data(mib):
    base, size, digest = os.urandom(MiB), mib * MiB, hashlib.sha256()
    for block in bulk_blocks(base, size):
        digest.update(block)
    return BulkData(base, size, digest.hexdigest(), touched_buffer(size))


def upload(port, data):
    """PUT the bulk data; return MiB/s until the server has it all.  The server's
    sha256 of what it received must equal the sender's."""
    with socket.create_connection(("127.0.0.1", port), timeout=120) as sock:
        read_line(sock)
        sock.sendall(b"PUT %d\r\n" % data.size)
        start = time.perf_counter()
        for block in bulk_blocks(data.base, data.size):
            sock.sendall(block)
        received = read_line(sock)
        elapsed = time.perf_counter() - start
        digest = read_line(sock).split()[-1:]
    if received != b"250 received %d\r\n" % data.size or digest != [data.digest.encode()]:
        raise RuntimeError(f"upload through port {port} corrupted: {received!r} {digest}")
    return data.size / MiB / elapsed


def download(port, data):
    """GET the bulk data into data.buffer; return MiB/s.  Its sha256 is checked, and
    that nothing follows it, after the clock stops."""
    size, view = data.size, memoryview(data.buffer)
    with socket.create_connection(("127.0.0.1", port), timeout=120) as sock:
        read_line(sock)
        start = time.perf_counter()
        sock.sendall(b"GET %d\r\n" % size)
        got = 0
        while got < size and (n := sock.recv_into(view[got:size])):
            got += n
        elapsed = time.perf_counter() - start
        extra = sock.recv(1)
    if got != size or extra or hashlib.sha256(view[:size]).hexdigest() != data.digest:
        raise RuntimeError(f"download through port {port} corrupted ({got} of {size} bytes)")
    return size / MiB / elapsed


def haproxy_argv(tmp, port, target):
    config = tmp / f"haproxy-{port}.cfg"
    config.write_text(
        "global\n    maxconn 5000\n    nbthread 1\n"
        "defaults\n    mode tcp\n    timeout connect 5s\n    timeout client 1h\n"
        f"    timeout server 1h\nlisten fwd\n    bind 127.0.0.1:{port}\n    maxconn 5000\n"
        f"    server target 127.0.0.1:{target}\n")
    return ["haproxy", "-db", "-f", str(config)]


def forwarder_contenders(tmp):
    """{name: argv(listen_port, target_port), or None: clients connect straight to the target}.
    Each minimail copy (A, and B with --compare) is started with the same arguments."""
    contenders = {
        "direct": None,
        "socat": lambda port, target: [
            "socat", f"TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork,backlog=4096",
            f"TCP:127.0.0.1:{target}"],
        "systemd-socket-proxyd": lambda port, target: [
            "systemd-socket-activate", "-l", f"127.0.0.1:{port}", PROXYD,
            "--connections-max=4096", f"127.0.0.1:{target}"],
        "haproxy": lambda port, target: haproxy_argv(tmp, port, target),
    }
    for copy in COPIES:
        contenders[copy.name] = lambda port, target, copy=copy: minimail_argv(
            port, "--tunnel-port", str(target), "--tunnel-command", "sleep 100000",
            "--linger", "100000", "--jitter", "0", "--max-clients", "5000",
            "--idle-timeout", "0", copy=copy)
    return contenders


def forwarder_round(name, argv, plan, tmp, server_port, data):
    """Start one contender, run every section-1 measurement through it, stop it."""
    child, port = None, server_port
    if argv:
        port = free_port()
        child = Child(argv(port, server_port), tmp / f"{slug(name)}.log")
        child.wait_listening(port)
    try:
        greet_and_quit(port)         # wakes systemd-socket-activate, starts minimail's tunnel
        wait_settled(child)
        served, all_greeted, pss = measure_held(port, plan.held, child)
        wait_settled(child)
        up, down = upload(port, data), download(port, data)
        rate, p50, p99, errors = measure_short_sessions(port, plan.sessions)
        return dict(up=up, down=down, rate=rate, p50=p50, p99=p99, errors=errors,
                    served=served, all_greeted=all_greeted, pss=pss)
    finally:
        if child:
            child.stop()


def section_forwarder(plan, tmp):
    data = make_bulk_data(plan.bulk_mib)
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(4096)
        server_port = listener.getsockname()[1]
        server = ForkedServer(serve_lines, listener, data.base, data.size)
    contenders = forwarder_contenders(tmp)
    results = {name: [] for name in contenders}
    try:
        upload(server_port, data), download(server_port, data)      # warm, untimed
        for _ in range(plan.rounds):
            for name in random.sample(list(contenders), len(contenders)):
                results[name].append(
                    forwarder_round(name, contenders[name], plan, tmp, server_port, data))
    finally:
        server.stop()
    print_forwarder_tables(results, plan)


# ---------------------------------------------------------------------------
# Sections 2 and 3: through ssh; and idle CPU
# ---------------------------------------------------------------------------

MESSAGE = (b"From: bench@example.org\r\nTo: hoster@example.org\r\nSubject: bench\r\n\r\n"
           + b"".join(b"%-62d\r\n" % i for i in range(16)))          # a 1 KiB body


def smtp_transaction(port):
    """EHLO, MAIL, RCPT, DATA (1 KiB), QUIT with smtplib; return seconds."""
    start = time.perf_counter()
    smtp = smtplib.SMTP("127.0.0.1", port, local_hostname="bench.invalid", timeout=20)
    try:
        smtp.ehlo()
        smtp.sendmail("bench@example.org", ["hoster@example.org"], MESSAGE)
        smtp.quit()
    finally:
        smtp.close()
    return time.perf_counter() - start


class Hoster:
    """sshd plus the hoster's SMTP server: what sections 2 and 3 tunnel to."""

    def __init__(self, tmp):
        self.tmp = tmp
        self.smtp = HosterSmtp()
        self.smtp_port = self.smtp.port
        self.remote = f"127.0.0.1:{self.smtp_port}"
        (tmp / "sshd").mkdir()
        self.sshd = Sshd(tmp / "sshd")

    def standing_ssh(self, name, *args, stdin=subprocess.DEVNULL):
        """A standing `ssh -L PORT:SMTP ...`; return (PORT, child)."""
        port = free_port()
        child = Child(self.sshd.ssh("-L", f"{port}:{self.remote}", *args),
                      self.tmp / f"{name}.log", stdin=stdin)
        child.wait_listening(port)
        return port, child

    def minimail(self, name, *args, copy=None):
        """minimail (copy, default the one measured) in front of this hoster;
        return (its port, child)."""
        port = free_port()
        child = Child(minimail_argv(port, "--ssh", f"ssh -F {self.sshd.config}",
                                    "--remote", self.remote, "--jitter", "0", *args, "hoster",
                                    copy=copy),
                      self.tmp / f"{name}.log")
        child.wait_listening(port)
        return port, child

    def stop(self):
        self.sshd.child.stop()
        self.smtp.stop()


def section_tunnel(plan, hoster):
    ssh_n, ssh_t = "ssh -N -L (standing)", "ssh -T -L ... cat (standing)"
    starts = {
        ssh_n: lambda: hoster.standing_ssh("ssh-N", "-N", "hoster"),
        ssh_t: lambda: hoster.standing_ssh("ssh-T", "-T", "hoster", "cat", stdin=subprocess.PIPE),
        "minimail": lambda: hoster.minimail("minimail", "--linger", "1000"),
        "minimail --no-session": lambda: hoster.minimail("minimail-N", "--linger", "1000",
                                                         "--no-session"),
    }
    for copy in COPIES[1:]:              # --compare: B, started as "minimail" is
        starts[copy.name] = lambda copy=copy: hoster.minimail("minimail-B", "--linger", "1000",
                                                              copy=copy)
    ports, children = {"direct": hoster.smtp_port}, []
    try:
        for name, start in starts.items():
            ports[name], child = start()
            children.append(child)
        results = {name: [] for name in ports}
        for _ in range(plan.rounds):
            for name in random.sample(list(ports), len(ports)):
                smtp_transaction(ports[name])                 # warm, untimed
                times = [smtp_transaction(ports[name]) for _ in range(plan.transactions)]
                results[name].append(statistics.median(times) * 1000)
    finally:
        for child in children:
            child.stop()
    rows = [[name, spread(values, 1), ratio(values, results[ssh_t]), ratio(values, results[ssh_n])]
            for name, values in results.items()]
    print_table(f"2. One SMTP transaction through a warm tunnel (smtplib: EHLO, MAIL, RCPT, "
                f"DATA 1 KiB, QUIT); per round the median of {plan.transactions}",
                ["contender", "ms per transaction", "x ssh -T cat", "x ssh -N"], rows,
                notes=compare_notes(results, [("ms per transaction", None)]))


def cold_floor(hoster):
    """Launch `ssh -T -L PORT:SMTP hoster cat`; poll PORT every 10 ms until the 220."""
    port = free_port()
    start = time.perf_counter()
    child = Child(hoster.sshd.ssh("-T", "-L", f"{port}:{hoster.remote}", "hoster", "cat"),
                  hoster.tmp / "cold-floor.log", stdin=subprocess.PIPE)
    try:
        while time.perf_counter() - start < 20 and child.alive():
            try:
                return greet_and_quit(port, start)
            except ConnectionRefusedError:
                time.sleep(0.01)
        raise RuntimeError(f"ssh gave no forward within 20 s: {child.log_tail()}")
    finally:
        child.stop()


def cold_minimail(port, child):
    """Wait (bounded) until minimail runs no tunnel, then time connect to 220."""
    wait_for(lambda: len(child.tree()) == 1, 15, "minimail's tunnel to end", every=0.02)
    return greet_and_quit(port)


def section_cold(plan, hoster):
    floor = "floor: ssh -T -L ... cat, polled"
    measure, children = {floor: lambda: cold_floor(hoster)}, []
    try:
        for copy in COPIES:                  # --compare: B with the same arguments
            port, child = hoster.minimail(f"minimail-cold-{len(children)}", "--linger", "0",
                                          copy=copy)
            children.append(child)
            measure[copy.name] = lambda port=port, child=child: cold_minimail(port, child)
        samples = {name: [] for name in measure}
        for _ in range(plan.rounds):
            for name in random.sample(list(measure), len(measure)):
                for _ in range(math.ceil(plan.cold_samples / plan.rounds)):
                    samples[name].append(measure[name]() * 1000)
    finally:
        for child in children:
            child.stop()
    rows = [[name, str(len(values)), spread(values, 0), ratio(values, samples[floor])]
            for name, values in samples.items()]
    print_table("3. Cold start: client connect to 220 greeting with no tunnel running "
                "(median of all samples)", ["contender", "samples", "ms", "x floor"], rows,
                notes=compare_notes(samples, [("ms", None)]))


def section_idle(plan, tmp):
    """CPU % of an idle minimail (no client, so no tunnel) over plan.idle_seconds."""
    port = free_port()
    child = Child(minimail_argv(port, "--ssh", "ssh -F /dev/null", "hoster.invalid"),
                  tmp / "minimail-idle.log")
    try:
        child.wait_listening(port)
        time.sleep(0.5)
        ticks, start = cpu_ticks(child.pid), time.monotonic()
        time.sleep(plan.idle_seconds)
        ticks, elapsed = cpu_ticks(child.pid) - ticks, time.monotonic() - start
        children = len(child.tree()) - 1
    finally:
        child.stop()
    percent = ticks / os.sysconf("SC_CLK_TCK") / elapsed * 100
    print(f"\nIdle CPU: minimail with no client and no tunnel used {percent:.2f} % of a core "
          f"over {elapsed:.1f} s ({ticks} clock ticks; {children} child processes).")


# ---------------------------------------------------------------------------
# Sections 4 to 6: minimail's queue (intake, delivery) and `minimail sendmail`
# ---------------------------------------------------------------------------

SENDER, RECIPIENT = "cron@desktop.example", "admin@hoster.example"
MESSAGE_10K = (b"From: cron@desktop.example\r\nTo: admin@hoster.example\r\n"
               b"Subject: bench 10 KiB\r\n\r\n"
               + b"".join(b"%-78d\r\n" % i for i in range(128)))        # a 10 KiB body
SMALL_MESSAGE = (b"From: cron@desktop.example\nTo: admin@hoster.example\n"
                 b"Subject: cron: bench\n\nA small message, as cron sends them.\n")
QUEUED_GREETING = b"mail is queued"      # in minimail's own 220 while the tunnel is down
CLIENTS = 4                              # intake: clients sending at once
POSTFIX = "Postfix smtpd"


def socat_tunnel(tunnel_port, target_port):
    """A tunnel command for minimail: socat from 127.0.0.1:tunnel_port to the hoster's
    SMTP port.  nodelay on both ends, as ssh has with a session: without it a 10 KiB
    DATA that socat writes in two pieces waits 40 ms on Nagle and delayed ACKs."""
    return (f"socat TCP-LISTEN:{tunnel_port},bind=127.0.0.1,reuseaddr,fork,nodelay "
            f"TCP:127.0.0.1:{target_port},nodelay")


def send_each(port, count, deadline):
    """Send count MESSAGE_10K to port, one smtplib connection per message (EHLO, MAIL,
    RCPT, DATA, QUIT); return dict(accepted: 250 replies to DATA, greeting: the last
    greeting, reply: the last DATA reply, ids: the queue IDs the replies named,
    error: the first error or None).  Stops at deadline (perf_counter)."""
    accepted, greeting, reply, error, ids = 0, b"", b"", None, []
    for _ in range(count):
        if time.perf_counter() > deadline:
            error = error or "time cap reached"
            break
        smtp = smtplib.SMTP(local_hostname="desktop.example", timeout=30)
        try:
            _, greeting = smtp.connect("127.0.0.1", port)
            smtp.ehlo()
            for code, text in (smtp.mail(SENDER), smtp.rcpt(RECIPIENT)):
                if code != 250:
                    raise smtplib.SMTPResponseException(code, text)
            code, reply = smtp.data(MESSAGE_10K)
            if code != 250:
                raise smtplib.SMTPResponseException(code, reply)
            accepted += 1
            ids.append(reply.rpartition(b"queued as ")[2].split(b" ")[0])
            smtp.quit()
        except (OSError, smtplib.SMTPException) as exc:
            error = error or repr(exc)
        finally:
            smtp.close()
    return dict(accepted=accepted, greeting=greeting, reply=reply, ids=ids, error=error)


def send_worker(port, count, time_cap, barrier, results):
    """In a forked client process: wait for the start, send, report."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        barrier.wait(30)
    except threading.BrokenBarrierError:
        results.put(dict(accepted=0, greeting=b"", reply=b"", ids=[],
                         error="start barrier broken", end=time.perf_counter()))
        return
    outcome = send_each(port, count, time.perf_counter() + time_cap)
    results.put(dict(outcome, end=time.perf_counter()))


def send_parallel(port, total, clients=CLIENTS, time_cap=60.0):
    """total messages from clients forked processes at once (no GIL between them), each
    one connection per message; the clock runs from a common start until the last client
    is done.  Returns dict(rate (250 replies to DATA per s), accepted, greeting, reply, error,
    duplicates: replies that named a queue ID another reply had named already)."""
    context = multiprocessing.get_context("fork")
    barrier, results = context.Barrier(clients + 1), context.SimpleQueue()
    shares = [total // clients + (i < total % clients) for i in range(clients)]
    processes = [context.Process(target=send_worker, daemon=True,
                                 args=(port, share, time_cap, barrier, results))
                 for share in shares]
    for process in processes:
        process.start()
    try:
        barrier.wait(30)
        start = time.perf_counter()
        deadline = start + time_cap + 60
        while sum(p.is_alive() for p in processes) and time.perf_counter() < deadline:
            time.sleep(0.005)          # results are small: the clients exit after put()
        outcomes = []
        while not results.empty() and len(outcomes) < clients:
            outcomes.append(results.get())
    finally:
        for process in processes:
            process.join(1)
            if process.is_alive():
                process.kill()
                process.join()
    if len(outcomes) < clients:
        raise RuntimeError(f"port {port}: {clients - len(outcomes)} client(s) did not report")
    accepted = sum(outcome["accepted"] for outcome in outcomes)
    elapsed = max(outcome["end"] for outcome in outcomes) - start
    ids = [queue_id for outcome in outcomes for queue_id in outcome["ids"]]
    return dict(rate=accepted / elapsed, accepted=accepted, greeting=outcomes[-1]["greeting"],
                reply=outcomes[-1]["reply"], duplicates=len(ids) - len(set(ids)),
                error=next((o["error"] for o in outcomes if o["error"]), None))


def filesystem(path):
    """'ext4 on /dev/vda': the mount that holds path, from /proc/mounts."""
    path, best = os.path.realpath(path), ("", "?", "?")
    for line in open("/proc/mounts"):
        device, mount, kind = line.split()[:3]
        if (path == mount or path.startswith(mount.rstrip("/") + "/")) and len(mount) >= len(best[0]):
            best = (mount, kind, device)
    return f"{best[1]} on {best[2]}"


def postfix_missing():
    """Why no throwaway Postfix can run here, or None."""
    if not (shutil.which("postfix") or os.path.exists("/usr/sbin/postfix")):
        return "Postfix is not installed (apt-get install -y postfix)"
    if os.geteuid() != 0:
        return "a Postfix instance needs root to start"
    try:
        pwd.getpwnam("postfix")
    except KeyError:
        return "there is no user postfix (is Postfix installed?)"
    return None


class Postfix:
    """A throwaway Postfix whose smtpd listens on 127.0.0.1:port and puts every mail
    on hold (check_client_access static:HOLD): nothing is ever delivered onward.
    Its config, queue and data directories lie in a temp dir of its own (readable by
    the postfix user, which the bench's temp dir is not), removed by stop()."""

    def __init__(self):
        self.postfix = shutil.which("postfix") or "/usr/sbin/postfix"
        self.root = Path(tempfile.mkdtemp(prefix="bench-minimail-postfix-"))
        self.root.chmod(0o755)
        self.port, self.child = free_port(), None
        Child.live.append(self)
        etc, spool, data = (self.root / name for name in ("etc", "spool", "data"))
        for directory in (etc, spool, data):
            directory.mkdir()
        shutil.chown(data, "postfix")
        settings = {
            "compatibility_level": "3.6",
            "config_directory": etc, "queue_directory": spool, "data_directory": data,
            "maillog_file": self.root / "maillog", "maillog_file_prefixes": self.root,
            "myhostname": "postfix.bench.invalid", "mydomain": "bench.invalid",
            "myorigin": "$myhostname", "mydestination": "", "relayhost": "",
            "inet_interfaces": "127.0.0.1", "inet_protocols": "ipv4",
            "mynetworks": "127.0.0.0/8", "smtpd_peername_lookup": "no",   # no DNS at all
            "smtpd_client_restrictions": "check_client_access static:HOLD",
            "smtpd_recipient_restrictions": "permit_mynetworks, reject",
            "defer_transports": "smtp relay local virtual error",        # belt and braces
            "alias_maps": "", "alias_database": "", "biff": "no", "smtputf8_enable": "no",
        }
        (etc / "main.cf").write_text("".join(f"{k} = {v}\n" for k, v in settings.items()))
        services = [                # service type private unpriv chroot wakeup maxproc command
            f"127.0.0.1:{self.port} inet n - n - - smtpd",
            "cleanup unix n - n - 0 cleanup", "qmgr unix n - n 300 1 qmgr",
            "rewrite unix - - n - - trivial-rewrite", "bounce unix - - n - 0 bounce",
            "defer unix - - n - 0 bounce", "trace unix - - n - 0 bounce",
            "verify unix - - n - 1 verify", "flush unix n - n 1000? 0 flush",
            "proxymap unix - - n - - proxymap", "smtp unix - - n - - smtp",
            "relay unix - - n - - smtp", "showq unix n - n - - showq",
            "error unix - - n - - error", "retry unix - - n - - error",
            "discard unix - - n - - discard", "anvil unix - - n - 1 anvil",
            "scache unix - - n - 1 scache", "postlog unix-dgram n - n - 1 postlogd"]
        (etc / "master.cf").write_text("\n".join(services) + "\n")
        # start-fg: postfix-script checks and creates the queue, then runs `master -s`
        # (a session of its own) and waits for it.
        self.child = Child([self.postfix, "-c", str(etc), "start-fg"], self.root / "start.log")
        try:
            self.child.wait_listening(self.port, timeout=30)
        except RuntimeError as exc:
            raise RuntimeError(f"{exc}; {self.log_tail()}") from None

    def log_tail(self):
        return " | ".join(
            path.read_text(errors="replace")[-600:].strip().replace("\n", " | ")
            for path in (self.root / "start.log", self.root / "maillog") if path.exists())

    def held(self):
        """Mails in the hold queue."""
        return sum(len(files) for _, _, files in os.walk(self.root / "spool" / "hold"))

    def stop(self, grace=10.0):
        """SIGTERM the master (it stops its daemons), bounded; then whatever is left
        of the tree dies by SIGKILL (Child.stop); then the directories go."""
        if self in Child.live:
            Child.live.remove(self)
        if self.child:
            tree = self.child.tree()
            for pid in tree[1:2]:           # postfix-script's one child: master
                try:
                    os.kill(pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + grace
            while self.child.alive() and time.monotonic() < deadline:
                time.sleep(0.05)
            self.child.stop()
        shutil.rmtree(self.root, ignore_errors=True)


def queue_minimail(copy, tmp, name, tunnel_command):
    """minimail (copy) with a queue in tmp and the given tunnel command, as the
    contract for the queue says; return (port, child)."""
    port, tunnel_port, queue = free_port(), free_port(), tmp / f"queue-{name}"
    queue.mkdir(mode=0o700)
    child = Child(minimail_argv(port, "--tunnel-port", str(tunnel_port), "--tunnel-command",
                                tunnel_command(tunnel_port), "--queue", str(queue),
                                "--linger", "0", "--jitter", "0", copy=copy),
                  tmp / f"{name}.log")
    child.wait_listening(port)
    return port, child


def checked_intake(name, port, total, queued_greeting):
    """send_parallel, and check that the replies are the ones expected."""
    result = send_parallel(port, total)
    if queued_greeting and result["accepted"] and QUEUED_GREETING not in result["greeting"]:
        raise RuntimeError(f"{name} did not answer with its queue: {result['greeting']!r}")
    if result["accepted"] and b"queued as" not in result["reply"]:
        raise RuntimeError(f"{name}: DATA reply {result['reply']!r} says nothing of a queue")
    return result


def section_intake(plan, tmp):
    """Messages per second accepted into a durable queue (fsync'ed before the 250):
    Postfix's smtpd against minimail's queue (tunnel command `false`)."""
    title = "4. Intake"
    ports, children, postfix, notes = {}, [], None, []
    try:
        if why := postfix_missing():
            print(f"\n{title}: {why}: measuring minimail alone.")
        else:
            postfix = Postfix()
            ports[POSTFIX] = postfix.port
            notes.append(f"{POSTFIX}: {tool_version(['postconf', '-d', '-h', 'mail_version'])}, a "
                         "throwaway instance (own config, queue and data directories, chroot "
                         "off, smtpd_peername_lookup=no), every mail put on hold, none "
                         "delivered; its cleanup fsyncs each queue file before the 250 (one "
                         "fsync per mail, seen with strace; no fsync of the directory).")
        for copy in COPIES:
            if not copy.knows("--queue"):
                print(f"\n{title}: {copy.label()} has no --queue yet: not measured.")
                continue
            port, child = queue_minimail(copy, tmp, f"intake-{len(children)}",
                                         lambda tunnel_port: "false")
            children.append(child)
            ports[copy.name] = port
        if not ports:
            return
        for name, port in ports.items():        # warm, untimed; start the smtpd processes
            checked_intake(name, port, 2 * CLIENTS, name != POSTFIX)
        results = {name: [] for name in ports}
        for _ in range(plan.rounds):
            for name in random.sample(list(ports), len(ports)):
                results[name].append(checked_intake(name, ports[name], plan.intake,
                                                    name != POSTFIX))
        if postfix:
            submitted = 2 * CLIENTS + sum(r["accepted"] for r in results[POSTFIX])
            notes.append(f"Postfix's hold queue has {postfix.held()} of the {submitted} mails "
                         "it accepted.")
    finally:
        for child in children:
            child.stop()
        if postfix:
            postfix.stop()
    rates = {name: [r["rate"] for r in values] for name, values in results.items()}
    base = rates.get(POSTFIX) or rates[COPIES[0].name]
    errors = [f"{name}: {r['error']}" for name, values in results.items()
              for r in values if r["error"]][:3]
    print_table(f"{title}: 10 KiB messages accepted into the durable queue, {CLIENTS} clients "
                f"at once, one connection per message (EHLO, MAIL, RCPT, DATA, QUIT), "
                f"{plan.intake} messages per contender and round",
                ["contender", "messages/s", "x Postfix" if POSTFIX in rates else "x minimail",
                 "failed", "IDs named twice"],
                [[name, spread(values, 0), ratio(values, base),
                  str(sum(plan.intake - r["accepted"] for r in results[name])),
                  str(sum(r["duplicates"] for r in results[name]))]
                 for name, values in rates.items()],
                notes=[*notes,
                       "minimail: --tunnel-command false --queue DIR --linger 0 --jitter 0: "
                       "every tunnel start fails, so minimail answers each client itself.",
                       f"Counted: 250 replies to DATA.  Queues on {filesystem(tmp)}; the "
                       "clients are forked processes.  One connection per message as cron, "
                       "sendmail and smtp-source (Postfix's own benchmark client) do.",
                       "IDs named twice: 250 replies whose 'queued as ID' named an ID that an "
                       "earlier reply of the round had named (one of the two mails may be lost).",
                       *compare_notes(rates, [("messages/s", None)]),
                       *(f"error: {error}" for error in errors)])


def flush_round(state, hoster, count, stall=10.0, time_cap=120.0):
    """Queue count messages while the tunnel command fails, then allow the tunnel and
    send SIGUSR1.  Return dict(rate: messages/s from the signal until the hoster has all,
    or None if it never had; first: ms until the first arrived; missing: how many of the
    count never arrived (waiting ends stall seconds after the last arrival);
    duplicates: queue IDs named twice in the 250 replies)."""
    port, child, flag = state
    flag.unlink(missing_ok=True)
    wait_for(lambda: len(child.tree()) == 1, 15, "minimail's tunnel to end", every=0.01)
    before = hoster.received()
    queued = checked_intake("minimail", port, count, True)
    if queued["accepted"] != count:
        raise RuntimeError(f"minimail queued {queued['accepted']} of {count}: {queued['error']}")
    if hoster.received() != before:
        raise RuntimeError("mail reached the hoster while the tunnel could not start")
    flag.touch()
    start = time.perf_counter()
    os.kill(child.pid, signal.SIGUSR1)
    first, seen, progress = None, before, start
    while hoster.received() < before + count:
        now = time.perf_counter()
        if hoster.received() > seen:
            seen, progress = hoster.received(), now
            first = first or now
        if now - progress > stall or now - start > time_cap:
            break
        time.sleep(0.001)
    elapsed = hoster.last_arrival() - start
    time.sleep(0.05)
    got = hoster.received() - before       # more than count: late mail of an earlier round
    return dict(rate=count / elapsed if got >= count else None, missing=max(0, count - got),
                extra=max(0, got - count), duplicates=queued["duplicates"],
                first=((first or hoster.last_arrival()) - start) * 1000 if got else None)


def splice_round(state, hoster, count):
    """Send count messages in a row on one smtplib connection through minimail with a
    working tunnel; return messages/s from the first MAIL to the last 250 (the hoster's,
    so it has them)."""
    port, child, flag = state
    flag.touch()
    before = hoster.received()
    smtp = smtplib.SMTP(local_hostname="desktop.example", timeout=30)
    try:
        _, greeting = smtp.connect("127.0.0.1", port)
        if QUEUED_GREETING in greeting:
            raise RuntimeError(f"minimail queues instead of splicing: {greeting!r}")
        smtp.ehlo()
        start, deadline = time.perf_counter(), time.perf_counter() + 120
        for _ in range(count):
            if time.perf_counter() > deadline:
                break
            smtp.sendmail(SENDER, [RECIPIENT], MESSAGE_10K)
        elapsed = time.perf_counter() - start
        smtp.quit()
    finally:
        smtp.close()
    if hoster.received() - before < count:         # more: queued mail that came along
        raise RuntimeError(f"the hoster got {hoster.received() - before} of {count} mails")
    return count / elapsed


def section_delivery(plan, tmp):
    """N queued messages flushed through one tunnel against the same N through the splice."""
    title = "5. Delivery"
    copies = [copy for copy in COPIES if copy.knows("--queue")]
    for copy in COPIES:
        if copy not in copies:
            print(f"\n{title}: {copy.label()} has no --queue yet: not measured.")
    if not copies:
        return
    hoster, states, children = HosterSmtp(), {}, []
    try:
        for copy in copies:
            flag = tmp / f"tunnel-allowed-{len(children)}"

            def tunnel(tunnel_port, flag=flag):
                return shlex.join(["sh", "-c", f"test -e {shlex.quote(str(flag))} && exec "
                                   f"{socat_tunnel(tunnel_port, hoster.port)}; exit 1"])
            port, child = queue_minimail(copy, tmp, f"delivery-{len(children)}", tunnel)
            children.append(child)
            states[copy.name] = (port, child, flag)
        measures = {}
        for copy in copies:
            state = states[copy.name]
            splice_round(state, hoster, 2 * CLIENTS)             # warm, untimed
            flush_round(state, hoster, 2 * CLIENTS)
            measures[(copy.name, "flush")] = lambda state=state: flush_round(
                state, hoster, plan.delivery)
            measures[(copy.name, "splice")] = lambda state=state: splice_round(
                state, hoster, plan.delivery)
        results = {key: [] for key in measures}
        for _ in range(plan.rounds):
            for key in random.sample(list(measures), len(measures)):
                results[key].append(measures[key]())
    finally:
        for child in children:
            child.stop()
        hoster.stop()
    rows, rounds = [], {}
    for copy in copies:
        flushes = results[(copy.name, "flush")]
        flush, first = [r["rate"] for r in flushes], [r["first"] for r in flushes]
        splice = results[(copy.name, "splice")]
        rounds[copy.name] = [dict(flush=f, splice=s) for f, s in zip(flush, splice)]
        verdict = ratio(flush, splice)
        rows.append([copy.name, spread(flush, 0), spread(first, 0), spread(splice, 0),
                     paired_ratio(flush, splice),
                     "n/a" if verdict == "n/a" else ("met" if float(verdict) >= 0.5 else "missed"),
                     str(sum(r["missing"] for r in flushes)),
                     str(sum(r["duplicates"] for r in flushes))])
    print_table(f"{title}: {plan.delivery} queued 10 KiB messages flushed through one tunnel "
                f"(SIGUSR1) against the same {plan.delivery} through minimail's splice on one "
                "connection (messages/s)",
                ["contender", "flush msgs/s", "first after ms", "splice msgs/s",
                 "flush / splice", "goal >= 0.5", "never arrived", "IDs named twice"], rows,
                notes=["flush: from SIGUSR1 (the tunnel command may now start socat to the "
                       "hoster) until the hoster has all; it includes starting the tunnel "
                       "(see 'first after').  splice: one smtplib connection through a tunnel "
                       "already up, from the first MAIL to the last 250.  A round in which some "
                       "queued mail never arrived (none for 10 s) has no flush rate.",
                       *compare_notes(rounds, [("flush msgs/s", "flush"),
                                               ("splice msgs/s", "splice")]),
                       *(f"{name}: {n} mail(s) more than queued reached the hoster during "
                         "flushes (late mail of an earlier round)" for name, n in
                         ((copy.name, sum(r["extra"] for r in results[(copy.name, "flush")]))
                          for copy in copies) if n)])


def section_sendmail(plan, tmp):
    """The start-up cost of `minimail sendmail` per mail, against the interpreter's own."""
    title = "6. sendmail"
    python, console = sys.executable, Path(sys.executable).parent / "minimail"
    hoster, child = HosterSmtp(), None
    port, tunnel_port = free_port(), free_port()
    config = tmp / "minimail.conf"
    config.write_text(f"MINIMAIL_OPTIONS=--listen 127.0.0.1:{port}\nMINIMAIL_SENDER={SENDER}\n")
    msmtprc = tmp / "msmtprc"
    msmtprc.write_text(f"defaults\nauth off\ntls off\nsyslog off\nlogfile\naccount bench\n"
                       f"host 127.0.0.1\nport {port}\nfrom {SENDER}\ndomain desktop.example\n"
                       f"account default : bench\n")
    msmtprc.chmod(0o600)
    message = tmp / "small-message.txt"
    message.write_bytes(SMALL_MESSAGE)
    # Bytecode is cached as in an install, in the temp dir (the warm-up run compiles),
    # even where the environment says PYTHONDONTWRITEBYTECODE: without it every run
    # of the console script compiles minimail.py (about 30 ms more).
    env = dict(os.environ, MINIMAIL_CONFIG=str(config), PYTHONPYCACHEPREFIX=str(tmp / "pycache"))
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    floor, submitters = "python -c pass", {}
    contenders = {floor: [python, "-c", "pass"],
                  "python -c 'import smtplib'": [python, "-c", "import smtplib"]}
    skipped = []
    console_usage = subprocess.run([str(console), "--help"], capture_output=True, text=True,
                                   timeout=30, env=env).stdout if console.exists() else ""
    if "sendmail" in console_usage:
        origin = subprocess.run([python, "-c", "import minimail; print(minimail.__file__)"],
                                capture_output=True, text=True, timeout=30, cwd=tmp).stdout.strip()
        submitters[f"minimail sendmail (console script; {origin})"] = [
            str(console), "sendmail", "-i", RECIPIENT]
    else:
        skipped.append(f"{console} " + ("is missing" if not console.exists() else
                                        "has no sendmail command yet"))
    for copy in COPIES:
        if copy.knows("sendmail"):
            submitters[f"python {copy.path} sendmail" + (" (B)" if copy is not COPIES[0] else "")] = [
                python, copy.path, "sendmail", "-i", RECIPIENT]
        else:
            skipped.append(f"{copy.label()} has no sendmail command yet")
    if shutil.which("msmtp"):
        submitters["msmtp"] = ["msmtp", f"--file={msmtprc}", "-i", RECIPIENT]
    else:
        skipped.append("msmtp is not installed (apt-get install -y msmtp)")
    contenders.update(submitters)
    if skipped:
        print(f"\n{title}: not measured: {'; '.join(skipped)}.")
    times = {name: [] for name in contenders}
    failed = {name: 0 for name in contenders}
    errors = []

    def run(name):
        with open(message, "rb") as stdin:
            start = time.perf_counter()
            done = subprocess.run(contenders[name], stdin=stdin, capture_output=True,
                                  env=env, cwd=tmp, timeout=30)
            elapsed = time.perf_counter() - start
        if done.returncode:
            failed[name] += 1
            errors.append(f"{name}: exit {done.returncode}: "
                          f"{(done.stderr or done.stdout).decode(errors='replace').strip()[-300:]}")
            return None
        return elapsed * 1000

    try:
        if submitters:
            argv = minimail_argv(port, "--tunnel-port", str(tunnel_port), "--tunnel-command",
                                 socat_tunnel(tunnel_port, hoster.port), "--linger", "100000",
                                 "--jitter", "0")
            child = Child(argv, tmp / "minimail-sendmail.log")
            child.wait_listening(port)
            smtp_transaction(port)                      # the tunnel is up and warm
        before = hoster.received()
        for name in contenders:                         # warm, untimed (page cache, .pyc)
            run(name)
        for _ in range(plan.sendmail_runs):
            for name in random.sample(list(contenders), len(contenders)):
                if (ms := run(name)) is not None:
                    times[name].append(ms)
        time.sleep(0.2)
        delivered = hoster.received() - before
    finally:
        if child:
            child.stop()
        hoster.stop()
    expected = sum(plan.sendmail_runs + 1 - failed[name] for name in submitters)
    base = statistics.median(times[floor])
    rows = [[name, spread(values, 1), "n/a" if not values else
             f"{statistics.median(values) - base:+.1f}", str(failed[name])]
            for name, values in times.items()]
    goals = [f"{name.split(' (')[0] if 'console' in name else name} "
             f"{'met' if statistics.median(times[name]) - base <= 30 else 'missed'}"
             for name in submitters if "minimail" in name and times[name]]
    print_table(f"{title}: one small message per run (`... -i {RECIPIENT} < message`) to a "
                f"minimail with a warm tunnel; wall time of {plan.sendmail_runs} runs each, "
                "interleaved, ms",
                ["contender", "ms", "+ms over python -c pass", "failed"], rows,
                notes=[f"The hoster received {delivered} of the {expected} mails submitted "
                       "(warm-up runs included).",
                       "minimail sendmail reads MINIMAIL_OPTIONS=--listen 127.0.0.1:PORT from "
                       "the file $MINIMAIL_CONFIG names; msmtp: host 127.0.0.1, that port, "
                       "no auth, no TLS.  msmtp sends each line in a send() of its own without "
                       "TCP_NODELAY, so its end of DATA waits for a delayed ACK (about 40 ms).",
                       "Python caches bytecode (PYTHONPYCACHEPREFIX in the temp dir), except for "
                       "the script that `python minimail.py` runs: Python compiles a script on "
                       "every run.",
                       "goal, within 30 ms of python -c pass: " + (", ".join(goals) or "n/a"),
                       *(f"error: {error}" for error in errors[:3])])


# ---------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------

def spread(values, digits):
    """'median (min-max)' of the values that are numbers."""
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return "n/a"
    return f"{statistics.median(values):.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def ratio(values, baseline):
    """median(values) / median(baseline), or n/a."""
    values = [v for v in values if v is not None]
    baseline = [v for v in baseline if v is not None]
    if not values or not baseline or not statistics.median(baseline):
        return "n/a"
    return f"{statistics.median(values) / statistics.median(baseline):.2f}"


def paired_ratio(values, baseline):
    """ratio(values, baseline), and the (min-max) of the per-round ratios when the two
    lists were measured in the same rounds (same length): '0.98 (0.95-1.01)'."""
    text = ratio(values, baseline)
    pairs = [v / b for v, b in zip(values, baseline) if v is not None and b]
    if text != "n/a" and len(values) == len(baseline) == len(pairs) > 1:
        text += f" ({min(pairs):.2f}-{max(pairs):.2f})"
    return text


def compare_notes(results, metrics):
    """With --compare: one line of B/A ratios for the metrics, [(label, key or None)];
    results[name] is a list of per-round dicts (or of numbers, for key None)."""
    if len(COPIES) < 2 or not {COPIES[0].name, COPIES[1].name} <= set(results):
        return []
    a, b = COPIES[0].name, COPIES[1].name      # measured in the same rounds, side by side

    def column(name, key):
        return [r if key is None else r[key] for r in results[name]]

    parts = [f"{label} {paired_ratio(column(b, key), column(a, key))}" for label, key in metrics]
    return ["B/A, minimail B / minimail (ratio of medians, per-round range): " + "; ".join(parts)]


def print_table(title, header, rows, notes=()):
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    print(f"\n{title}")
    for row in [header, *rows]:
        print("  " + "  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    for note in notes:
        print(f"  {note}")
    sys.stdout.flush()


def print_forwarder_tables(results, plan):
    def column(name, key):
        return [r[key] for r in results[name]]

    def cells(name, key, digits, *baselines):
        return [spread(column(name, key), digits),
                *(ratio(column(name, key), column(base, key)) for base in baselines)]

    proxyd = "systemd-socket-proxyd"
    print_table(f"1a. Forwarder alone: bulk throughput, {plan.bulk_mib} MiB per transfer "
                "(MiB/s, higher is better)",
                ["contender", "upload", "x socat", "x proxyd", "download", "x socat", "x proxyd"],
                [[name, *cells(name, "up", 0, "socat", proxyd),
                  *cells(name, "down", 0, "socat", proxyd)] for name in results],
                notes=[f"direct (no forwarder) reaches {statistics.median(column('direct', 'up')):.0f}"
                       f" MiB/s up and {statistics.median(column('direct', 'down')):.0f} MiB/s down:"
                       " the harness's ceiling (sha256 is checked after the clock stops).",
                       "haproxy: nbthread 1, tcp mode, default buffers, no splicing.",
                       *compare_notes(results, [("upload", "up"), ("download", "down")])])
    print_table(f"1b. Forwarder alone: {plan.sessions} sequential short sessions per round "
                "(connect, 220, QUIT, 221)",
                ["contender", "sessions/s", "x socat", "p50 connect->220 ms", "p99 ms",
                 "p99 x socat", "failed"],
                [[name, *cells(name, "rate", 0, "socat"), *cells(name, "p50", 2),
                  *cells(name, "p99", 2, "socat"), str(sum(column(name, "errors")))]
                 for name in results],
                notes=compare_notes(results, [("sessions/s", "rate"), ("p50", "p50"),
                                              ("p99", "p99")]))
    print_table(f"1c. Forwarder alone: {plan.held} clients held open at once",
                ["contender", "served (worst round)", "s until all greeted", "x socat",
                 "PSS KiB per held client", "x socat"],
                [[name, f"{min(column(name, 'served'))}/{plan.held}",
                  *cells(name, "all_greeted", 3, "socat"), *cells(name, "pss", 1, "socat")]
                 for name in results],
                notes=["PSS per held client: (PSS of the process tree with all held - idle) / "
                       "clients held, from /proc/PID/smaps_rollup.",
                       *compare_notes(results, [("s until all greeted", "all_greeted"),
                                                ("PSS per held client", "pss")])])


def tool_version(argv, words=None):
    """The line of `argv` that names a version (or its first line), maybe cut to words."""
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except OSError:
        return "missing"
    lines = (out.stdout + out.stderr).strip().splitlines() or ["?"]
    line = next((line for line in lines if "version" in line.lower()), lines[0])
    return " ".join(line.split()[:words])


def print_header(plan, sections):
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                if line.startswith("model name")), "unknown CPU")
    print(f"minimail benchmark, {time.strftime('%Y-%m-%d %H:%M:%S %Z')}; {platform.machine()}; "
          f"{cpu}; {os.cpu_count()} cores; python {platform.python_version()}; "
          f"gevent {importlib.metadata.version('gevent')}; "
          f"aiosmtpd {importlib.metadata.version('aiosmtpd')}; rounds {plan.rounds}")
    print(f"tools: {tool_version(['ssh', '-V'])}; {tool_version(['socat', '-V'], 3)}; "
          f"{tool_version(['haproxy', '-v'], 3)}; "
          f"{tool_version(['systemd-socket-activate', '--version'])}; "
          f"postfix {tool_version(['postconf', '-d', '-h', 'mail_version'])}; "
          f"{tool_version(['msmtp', '--version'], 3)}")
    for copy in COPIES:
        digest = hashlib.sha256(Path(copy.path).read_bytes()).hexdigest()[:12]
        print(f"measuring {copy.name}: {copy.path} "
              f"({tool_version([sys.executable, copy.path, '--version'])}, sha256 {digest}...)")
    print(f"sections: {', '.join(sections)}")
    print(f"plan: {dataclasses.asdict(plan)}; load average at start: {load_average()}")
    sys.stdout.flush()


# ---------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------

SECTIONS = ("forwarder", "tunnel", "cold", "idle", "intake", "delivery", "sendmail")
NEEDED = {"aiosmtpd": "aiosmtpd", "gevent": "gevent", "docopt-ng": "docopt"}   # package: module


def check_packages():
    """Exit 2 with one line saying what to install if a Python package this script
    (aiosmtpd, for the hoster) or minimail (gevent, docopt-ng) needs is missing."""
    missing = [package for package, module in NEEDED.items()
               if importlib.util.find_spec(module) is None]
    if not missing:
        return
    pip = Path(sys.executable).parent / "pip"
    if pip.exists():
        pip = os.path.relpath(pip) if not os.path.relpath(pip).startswith("..") else str(pip)
    else:
        pip = f"{sys.executable} -m pip"
    print(f"{Path(__file__).name} needs {', '.join(missing)}: {pip} install {' '.join(missing)} "
          f"(or pip install -e '.[test]' in the checkout)", file=sys.stderr)
    sys.exit(2)


def read_copy(parser, name, path):
    """A Copy for the minimail.py at path, from its --help."""
    if not Path(path).is_file():
        parser.error(f"{path}: no such file")
    usage = subprocess.run([sys.executable, path, "--help"], capture_output=True,
                           text=True, timeout=30).stdout
    if "Usage:" not in usage:
        parser.error(f"{path} --help shows no usage: is it minimail?")
    return Copy(name, str(Path(path).resolve()), usage)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="2 rounds and smaller sizes (under 40 s)")
    parser.add_argument("--rounds", type=int, help="rounds per section (default 5)")
    parser.add_argument("--section", choices=SECTIONS, action="append",
                        help="run only this section (repeatable; default: all)")
    parser.add_argument("--bulk-mib", type=int, help="MiB per bulk transfer (default 256)")
    parser.add_argument("--held", type=int, help="clients held open at once (default 1000)")
    parser.add_argument("--minimail", default=str(HERE / "minimail.py"),
                        help="the minimail.py to measure (default: the one next to this file)")
    parser.add_argument("--compare", metavar="PATH",
                        help="another minimail.py, measured side by side as 'minimail B' "
                             "(forwarder, tunnel, cold; intake, delivery and sendmail too "
                             "if it has --queue / sendmail)")
    args = parser.parse_args(argv)
    check_packages()
    plan = QUICK if args.quick else FULL
    for field in ("rounds", "bulk_mib", "held"):
        if (value := getattr(args, field)) is not None:
            if value < 1:
                parser.error(f"--{field.replace('_', '-')} must be at least 1")
            plan = dataclasses.replace(plan, **{field: value})
    COPIES[:] = [read_copy(parser, "minimail", args.minimail)]
    if args.compare:
        COPIES.append(read_copy(parser, f"minimail B ({args.compare})", args.compare))
    return plan, list(dict.fromkeys(args.section or SECTIONS))


def main(argv=None):
    global WORKDIR
    plan, sections = parse_args(argv)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))     # children inherit it
    signal.signal(signal.SIGTERM, signal.default_int_handler)    # SIGTERM, too, cleans up
    signal.signal(signal.SIGINT, signal.default_int_handler)     # even if started ignoring it
    print_header(plan, sections)
    tmp = WORKDIR = Path(tempfile.mkdtemp(prefix="bench-minimail-"))
    # A newer minimail reads settings from $MINIMAIL_CONFIG, else /etc/default/minimail
    # or ~/.config/minimail/minimail.conf: give every minimail an empty settings file.
    (tmp / "minimail-empty.conf").write_text("")
    os.environ["MINIMAIL_CONFIG"] = str(tmp / "minimail-empty.conf")
    hoster, started = None, time.monotonic()
    try:
        if "forwarder" in sections:
            section_forwarder(plan, tmp)
        if "tunnel" in sections or "cold" in sections:
            hoster = Hoster(tmp)
        if "tunnel" in sections:
            section_tunnel(plan, hoster)
        if "cold" in sections:
            section_cold(plan, hoster)
        if "idle" in sections:
            section_idle(plan, tmp)
        if "intake" in sections:
            section_intake(plan, tmp)
        if "delivery" in sections:
            section_delivery(plan, tmp)
        if "sendmail" in sections:
            section_sendmail(plan, tmp)
    except KeyboardInterrupt:
        print("\ninterrupted: stopping everything", file=sys.stderr)
        return 130
    finally:
        if hoster:
            hoster.stop()
        stop_everything()
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"\ndone in {time.monotonic() - started:.0f} s; load average at the end: {load_average()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
