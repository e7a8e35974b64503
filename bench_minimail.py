#!/usr/bin/env python3
"""Benchmark minimail against other TCP forwarders and against plain ssh tunnels.

Run it from a checkout, as root or as a user who may run sshd:

    python bench_minimail.py                 # everything, 5 rounds, under 3 minutes
    python bench_minimail.py --quick         # 2 rounds, smaller sizes, under 40 s
    python bench_minimail.py --section forwarder --rounds 3
    python bench_minimail.py --minimail /tmp/old/minimail.py     # measure another copy

It needs python with gevent, docopt-ng (for minimail) and aiosmtpd, plus socat,
haproxy, systemd-socket-activate, /usr/lib/systemd/systemd-socket-proxyd and
OpenSSH (sshd, ssh, ssh-keygen).  Everything it starts listens on 127.0.0.1
only: a throwaway sshd (keys generated in a temp dir), an aiosmtpd server as
the hoster, and a small line server for section 1 (both forked from this
process; the clients run in this process itself).  Every contender runs once
per round, in a fresh random order each round.  Tables show the median over
the rounds with (min-max), and the ratio of medians to the section's baseline
(value / baseline: above 1 means more, whether more is better or worse).

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
"""

import argparse
import dataclasses
import hashlib
import importlib.metadata
import math
import multiprocessing
import os
import platform
import pwd
import random
import resource
import selectors
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
MINIMAIL = str(HERE / "minimail.py")     # --minimail changes it
MINIMAIL_HAS_USER = False                # a newer minimail refuses root without --user
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


FULL = Plan(rounds=5, bulk_mib=256, sessions=1000, held=1000, transactions=30,
            cold_samples=15, idle_seconds=5.0)
QUICK = Plan(rounds=2, bulk_mib=32, sessions=200, held=1000, transactions=10,
             cold_samples=4, idle_seconds=2.0)


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


def minimail_argv(port, *args):
    """`python minimail.py --foreground --listen 127.0.0.1:PORT ARGS...`, plus
    `--user root` when we are root and this minimail knows that option."""
    argv = [sys.executable, MINIMAIL, "--foreground", "--listen", f"127.0.0.1:{port}"]
    if os.geteuid() == 0 and MINIMAIL_HAS_USER:
        argv += ["--user", "root"]
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
    """aiosmtpd handler: accepts every message and keeps none."""

    async def handle_DATA(self, server, session, envelope):
        return "250 2.0.0 accepted"


def serve_smtp(port):
    """The hoster's SMTP server: aiosmtpd on 127.0.0.1:port."""
    from aiosmtpd.controller import Controller
    Controller(Sink(), hostname="127.0.0.1", port=port, server_hostname="hoster.invalid").start()
    threading.Event().wait(SERVER_LIFETIME)


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
    """{name: argv(listen_port, target_port), or None: clients connect straight to the target}."""
    return {
        "direct": None,
        "socat": lambda port, target: [
            "socat", f"TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork,backlog=4096",
            f"TCP:127.0.0.1:{target}"],
        "systemd-socket-proxyd": lambda port, target: [
            "systemd-socket-activate", "-l", f"127.0.0.1:{port}", PROXYD,
            "--connections-max=4096", f"127.0.0.1:{target}"],
        "haproxy": lambda port, target: haproxy_argv(tmp, port, target),
        "minimail": lambda port, target: minimail_argv(
            port, "--tunnel-port", str(target), "--tunnel-command", "sleep 100000",
            "--linger", "100000", "--jitter", "0", "--max-clients", "5000",
            "--idle-timeout", "0"),
    }


def forwarder_round(name, argv, plan, tmp, server_port, data):
    """Start one contender, run every section-1 measurement through it, stop it."""
    child, port = None, server_port
    if argv:
        port = free_port()
        child = Child(argv(port, server_port), tmp / f"{name}.log")
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
        self.smtp_port = free_port()
        self.remote = f"127.0.0.1:{self.smtp_port}"
        self.smtp = ForkedServer(serve_smtp, self.smtp_port)
        wait_for(lambda: is_listening(self.smtp_port), 15, "aiosmtpd to listen")
        (tmp / "sshd").mkdir()
        self.sshd = Sshd(tmp / "sshd")

    def standing_ssh(self, name, *args, stdin=subprocess.DEVNULL):
        """A standing `ssh -L PORT:SMTP ...`; return (PORT, child)."""
        port = free_port()
        child = Child(self.sshd.ssh("-L", f"{port}:{self.remote}", *args),
                      self.tmp / f"{name}.log", stdin=stdin)
        child.wait_listening(port)
        return port, child

    def minimail(self, name, *args):
        """minimail in front of this hoster; return (its port, child)."""
        port = free_port()
        child = Child(minimail_argv(port, "--ssh", f"ssh -F {self.sshd.config}",
                                    "--remote", self.remote, "--jitter", "0", *args, "hoster"),
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
                ["contender", "ms per transaction", "x ssh -T cat", "x ssh -N"], rows)


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
    port, child = hoster.minimail("minimail-cold", "--linger", "0")
    floor = "floor: ssh -T -L ... cat, polled"
    measure = {floor: lambda: cold_floor(hoster), "minimail": lambda: cold_minimail(port, child)}
    samples = {name: [] for name in measure}
    try:
        for _ in range(plan.rounds):
            for name in random.sample(list(measure), len(measure)):
                for _ in range(math.ceil(plan.cold_samples / plan.rounds)):
                    samples[name].append(measure[name]() * 1000)
    finally:
        child.stop()
    rows = [[name, str(len(values)), spread(values, 0), ratio(values, samples[floor])]
            for name, values in samples.items()]
    print_table("3. Cold start: client connect to 220 greeting with no tunnel running "
                "(median of all samples)", ["contender", "samples", "ms", "x floor"], rows)


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
                       "haproxy: nbthread 1, tcp mode, default buffers, no splicing."])
    print_table(f"1b. Forwarder alone: {plan.sessions} sequential short sessions per round "
                "(connect, 220, QUIT, 221)",
                ["contender", "sessions/s", "x socat", "p50 connect->220 ms", "p99 ms",
                 "p99 x socat", "failed"],
                [[name, *cells(name, "rate", 0, "socat"), *cells(name, "p50", 2),
                  *cells(name, "p99", 2, "socat"), str(sum(column(name, "errors")))]
                 for name in results])
    print_table(f"1c. Forwarder alone: {plan.held} clients held open at once",
                ["contender", "served (worst round)", "s until all greeted", "x socat",
                 "PSS KiB per held client", "x socat"],
                [[name, f"{min(column(name, 'served'))}/{plan.held}",
                  *cells(name, "all_greeted", 3, "socat"), *cells(name, "pss", 1, "socat")]
                 for name in results],
                notes=["PSS per held client: (PSS of the process tree with all held - idle) / "
                       "clients held, from /proc/PID/smaps_rollup."])


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
          f"{tool_version(['systemd-socket-activate', '--version'])}")
    digest = hashlib.sha256(Path(MINIMAIL).read_bytes()).hexdigest()[:12]
    print(f"measuring {MINIMAIL} ({tool_version([sys.executable, MINIMAIL, '--version'])}, "
          f"sha256 {digest}...); sections: {', '.join(sections)}")
    print(f"plan: {dataclasses.asdict(plan)}; load average at start: {load_average()}")
    sys.stdout.flush()


# ---------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------

SECTIONS = ("forwarder", "tunnel", "cold", "idle")


def parse_args(argv=None):
    global MINIMAIL, MINIMAIL_HAS_USER
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="2 rounds and smaller sizes (under 40 s)")
    parser.add_argument("--rounds", type=int, help="rounds per section (default 5)")
    parser.add_argument("--section", choices=SECTIONS, action="append",
                        help="run only this section (repeatable; default: all)")
    parser.add_argument("--bulk-mib", type=int, help="MiB per bulk transfer (default 256)")
    parser.add_argument("--held", type=int, help="clients held open at once (default 1000)")
    parser.add_argument("--minimail", default=MINIMAIL,
                        help="the minimail.py to measure (default: the one next to this file)")
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else FULL
    for field in ("rounds", "bulk_mib", "held"):
        if (value := getattr(args, field)) is not None:
            if value < 1:
                parser.error(f"--{field.replace('_', '-')} must be at least 1")
            plan = dataclasses.replace(plan, **{field: value})
    MINIMAIL = args.minimail
    usage = subprocess.run([sys.executable, MINIMAIL, "--help"], capture_output=True,
                           text=True, timeout=30).stdout
    if "Usage:" not in usage:
        parser.error(f"{MINIMAIL} --help shows no usage: is it minimail?")
    MINIMAIL_HAS_USER = "--user" in usage
    return plan, args.section or list(SECTIONS)


def main(argv=None):
    plan, sections = parse_args(argv)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))     # children inherit it
    signal.signal(signal.SIGTERM, signal.default_int_handler)    # SIGTERM, too, cleans up
    signal.signal(signal.SIGINT, signal.default_int_handler)     # even if started ignoring it
    print_header(plan, sections)
    tmp = Path(tempfile.mkdtemp(prefix="bench-minimail-"))
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
