#!/usr/bin/env python3
"""minimail: a local SMTP port that sends your mail through an SSH tunnel.

minimail listens on the local SMTP port.  When a mail client connects, it
starts `ssh -L ... DESTINATION` on demand, waits until the tunnel accepts,
and splices the client's connection through it to the SMTP server that
DESTINATION reaches (--remote), so the mail leaves through your hoster.
Bytes a client sends early wait in the kernel until the tunnel is up; none
are dropped.  When the tunnel cannot be had within --wait seconds, the client
gets "421 4.4.0" and keeps its mail queued.  --linger seconds (plus a random
0..--jitter) after the last client has gone, ssh is stopped again.

Usage:
  minimail --foreground [options] [-o OPT]... DESTINATION
  minimail --foreground [options] --tunnel-command=CMD
  minimail -h | --help
  minimail --version

Options:
  -X, --foreground          Stay in the foreground and log to stderr.
  -l ADDR, --listen=ADDR    Where mail clients connect: HOST:PORT,
                            [IPv6]:PORT, or PORT on 127.0.0.1.
                            [default: 127.0.0.1:25]
  -t PORT, --tunnel-port=PORT
                            Use 127.0.0.1:PORT as the tunnel's local end
                            instead of a private Unix socket; needed
                            with --tunnel-command.
  -r ADDR, --remote=ADDR    What the tunnel reaches, as seen from
                            DESTINATION: HOST:PORT or PORT.
                            [default: localhost:25]
  --linger=SECONDS          Keep the tunnel up this long after the last
                            client has gone. [default: 10]
  --jitter=SECONDS          Add a random 0..SECONDS to each linger, so the
                            logins look human. [default: 25]
  --wait=SECONDS            How long a client waits for the tunnel before
                            it gets 421. [default: 30]
  --idle-timeout=SECONDS    Close a client after this long without a byte
                            in either direction; 0 means never.
                            [default: 300]
  --max-clients=N           Clients served at once; more get 421.
                            [default: 100]
  --drain=SECONDS           On SIGTERM, let active sessions finish for up
                            to this long. [default: 10]
  --ssh=COMMAND             The ssh program and leading arguments, e.g.
                            "ssh -F ~/.ssh/minimail_config". [default: ssh]
  -o OPT                    Pass "-o OPT" on to ssh (repeatable).
  --no-session              Open the tunnel with "ssh -N" (no remote
                            command).  Slower per mail; for accounts that
                            may not run commands.
  --tunnel-command=CMD      Run CMD (split like a shell would, run without
                            one) as the tunnel instead of ssh; while it
                            runs, it must accept connections on the
                            tunnel port.
  -v, --verbose             Log debug messages too.
  -h, --help                Show this text.
  --version                 Show the version.

The tunnel: by default minimail runs "ssh -T ... -L SOCKET:REMOTE DESTINATION
cat" with the options BatchMode=yes and ExitOnForwardFailure=yes, then yours
from -o, then ServerAliveInterval=15, ServerAliveCountMax=3, ControlMaster=no,
ControlPath=none and StreamLocalBindUnlink=yes (ssh takes the first value it
is given, so your -o can change the later ones but not the first two),
where SOCKET lies in a directory only minimail's user can enter.  The remote
`cat` holds a session open (ssh's stdin stays an open pipe): without a
session OpenSSH never turns on TCP_NODELAY and every mail stalls on Nagle's
algorithm.  If DESTINATION ends that session at once (a forced command, a
restricted shell), minimail falls back to "ssh -N" by itself.

Stopping: SIGTERM or SIGINT stops accepting clients at once, lets active
sessions finish for up to --drain seconds, then closes them, stops ssh and
exits 0.  A second signal stops at once.

Exit status: 0 on a clean stop, 1 when minimail cannot run (for example the
listen address is taken), 2 for a usage error.
"""

import errno
import ipaddress
import logging
import math
import os
import random
import re
import shlex
import shutil
import signal
import socket
import sys
import tempfile
import time

import gevent
import gevent.socket
from docopt import DocoptExit, docopt
from gevent import subprocess
from gevent.event import Event
from gevent.pool import Pool
from gevent.server import StreamServer
from gevent.socket import wait_read

__version__ = "0.1.0"

log = logging.getLogger("minimail")

#: Options ssh always gets first; first-given wins in ssh, so -o cannot undo them.
SSH_FORCED_OPTIONS = ("BatchMode=yes", "ExitOnForwardFailure=yes")
#: Options ssh gets after the user's own -o, which may override them.
SSH_DEFAULT_OPTIONS = (
    "ServerAliveInterval=15",
    "ServerAliveCountMax=3",
    "ControlMaster=no",
    "ControlPath=none",
    "StreamLocalBindUnlink=yes",
)
#: The remote command that holds the session open: it waits on its stdin.
SESSION_COMMAND = "cat"
#: ssh's own exit status for its errors (as opposed to the remote command's).
SSH_ERROR_STATUS = 255
#: A session that ends this soon after the start, with the remote command's own
#: exit status, means the account may not run commands: fall back to -N.
SESSION_PROBATION = 10.0

#: Bytes read per chunk; a buffer is taken from the pool only once data waits.
CHUNK_SIZE = 256 * 1024
#: At most this many idle chunk buffers are kept for reuse.
BUFFER_POOL_SIZE = 64

#: First pause between connection attempts while the tunnel starts (seconds).
POLL_FIRST = 0.005
#: The pause grows by this factor up to POLL_MAX.
POLL_GROWTH = 1.5
#: Longest pause between connection attempts while the tunnel starts.
POLL_MAX = 0.05

#: Seconds ssh gets to end by itself after its stdin closes, then to obey SIGTERM.
STOP_GRACE = 3.0
#: Backoff after the n-th tunnel start in a row that failed: 1, 2, 4 ... seconds.
BACKOFF_FIRST = 1.0
#: Longest backoff between two failed tunnel starts.
BACKOFF_MAX = 60.0
#: After a 421, how long minimail reads (and drops) what the client still sends,
#: so that closing does not reset the connection before the reply arrives.
REPLY_LINGER = 1.0
#: The listen backlog; the kernel caps it at net.core.somaxconn.
LISTEN_BACKLOG = 4096
#: Environment variables of a service manager that the tunnel must not inherit.
SERVICE_VARIABLES = ("NOTIFY_SOCKET", "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES")


class UsageError(Exception):
    """A mistake on the command line: reported in one line, exit status 2."""


class Fatal(Exception):
    """minimail cannot run (e.g. the listen address is taken): exit status 1."""


class TunnelUnavailable(Exception):
    """The tunnel cannot carry this client; the text goes into the 421 reply."""


class ClientGone(Exception):
    """The client hung up before the tunnel was up."""


# ---------------------------------------------------------------------------
# Parsing the command line
# ---------------------------------------------------------------------------

def parse_port(text, what):
    """Return text as a TCP port number, 1..65535."""
    if not (text.isascii() and text.isdigit()) or not 0 < int(text) < 65536:
        raise UsageError(f"{what}: {text!r} is not a port number (1-65535)")
    return int(text)


def split_host_port(text, what):
    """Split HOST:PORT, [IPv6]:PORT or a bare PORT into (host or None, port)."""
    if text.isascii() and text.isdigit():
        return None, parse_port(text, what)
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket or not rest.startswith(":"):
            raise UsageError(f"{what}: {text!r} is not [IPv6]:PORT")
        return host, parse_port(rest[1:], what)
    host, colon, port = text.rpartition(":")
    if not colon or not host or ":" in host:
        raise UsageError(f"{what}: {text!r} is not HOST:PORT, [IPv6]:PORT or PORT")
    return host, parse_port(port, what)


def parse_listen(text):
    """Return (family, ip, port) for --listen; the host must be an IP address."""
    host, port = split_host_port(text, "--listen")
    if host is None or host == "localhost":
        host = "127.0.0.1"
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise UsageError(f"--listen: {host!r} is not an IP address") from None
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    return family, str(ip), port


def parse_remote(text):
    """Return --remote in the form ssh's -L wants after the local part."""
    host, port = split_host_port(text, "--remote")
    if host is None:
        host = "localhost"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_seconds(text, what):
    """Return text as a non-negative number of seconds."""
    try:
        seconds = float(text)
    except ValueError:
        raise UsageError(f"{what}: {text!r} is not a number of seconds") from None
    if not 0 <= seconds < float("inf"):
        raise UsageError(f"{what}: {text!r} must be zero or more seconds")
    return seconds


def parse_count(text, what):
    """Return text as a whole number of at least 1."""
    if not (text.isascii() and text.isdigit()) or int(text) < 1:
        raise UsageError(f"{what}: {text!r} is not a whole number of at least 1")
    return int(text)


def parse_destination(text):
    """Check an ssh destination, [user@]host, as far as it can be checked here."""
    if not text or text.startswith("-") or any(c.isspace() for c in text):
        raise UsageError(f"DESTINATION: {text!r} is not an ssh destination ([user@]host)")
    return text


def parse_command(text, what):
    """Split a command line like a shell would (without running one)."""
    try:
        argv = shlex.split(text)
    except ValueError as exc:
        raise UsageError(f"{what}: {exc}") from None
    if not argv:
        raise UsageError(f"{what}: empty command")
    return argv


def option_table():
    """{name: takes a value} for every option the docstring's Options list defines."""
    table = {}
    for line in __doc__.partition("Options:")[2].splitlines():
        head = line.strip().split("  ")[0]
        if head.startswith("-"):
            for name, value in re.findall(r"(--?[\w-]+)([= ]\w+)?", head):
                table[name] = bool(value)
    return table


def explain_usage_error(argv, complaint):
    """Say in one line what is wrong with argv, which docopt has rejected."""
    known, given, positional = option_table(), set(), []
    words = iter(argv)
    for word in words:
        name = word.partition("=")[0] if word.startswith("--") else word[:2]
        if not word.startswith("-") or word == "-":
            positional.append(word)
        elif name not in known:
            return f"unknown option {name}"
        else:
            given.add(name)
            if known[name] and word == name:
                next(words, None)             # the option's value
    if complaint and not complaint.startswith("Warning:"):
        return complaint                      # e.g. "--listen requires argument"
    if not positional and "--tunnel-command" not in given:
        return "DESTINATION is missing: the ssh destination, [user@]host"
    if positional and "--tunnel-command" in given:
        return "give DESTINATION or --tunnel-command, not both"
    if len(positional) > 1:
        return f"unexpected argument {positional[1]!r}"
    return "these arguments fit none of the usage lines below"


class Settings:
    """Everything the command line says, checked once, before anything starts."""

    def __init__(self, args):
        self.listen = parse_listen(args["--listen"])
        self.tunnel_port = args["--tunnel-port"] and parse_port(args["--tunnel-port"], "--tunnel-port")
        self.remote = parse_remote(args["--remote"])
        self.linger = parse_seconds(args["--linger"], "--linger")
        self.jitter = parse_seconds(args["--jitter"], "--jitter")
        self.wait = parse_seconds(args["--wait"], "--wait")
        self.idle_timeout = parse_seconds(args["--idle-timeout"], "--idle-timeout")
        self.max_clients = parse_count(args["--max-clients"], "--max-clients")
        self.drain = parse_seconds(args["--drain"], "--drain")
        self.ssh = parse_command(args["--ssh"], "--ssh")
        self.ssh_options = args["-o"]
        self.session = not args["--no-session"]
        self.verbose = args["--verbose"]
        self.destination = args["DESTINATION"] and parse_destination(args["DESTINATION"])
        self.tunnel_command = args["--tunnel-command"] and parse_command(
            args["--tunnel-command"], "--tunnel-command")
        if self.tunnel_command and not self.tunnel_port:
            raise UsageError("--tunnel-command needs --tunnel-port: where the command's tunnel accepts")

    def tunnel_argv(self, endpoint, session):
        """The tunnel command as an argv list; endpoint is a socket path or a port."""
        if self.tunnel_command:
            return list(self.tunnel_command)
        return ssh_argv(self.ssh, self.ssh_options, f"{endpoint}:{self.remote}",
                        self.destination, session)

    def describe_listen(self):
        """The listen address as a user writes it."""
        family, ip, port = self.listen
        return f"[{ip}]:{port}" if family == socket.AF_INET6 else f"{ip}:{port}"


def ssh_argv(ssh, options, forward, destination, session):
    """Build ssh's argv: forced options, the user's -o, defaults, -L, and the session."""
    argv = list(ssh) + ["-T"]
    for option in (*SSH_FORCED_OPTIONS, *options, *SSH_DEFAULT_OPTIONS):
        argv += ["-o", option]
    argv += ["-L", forward]
    if not session:
        argv.append("-N")
    argv.append(destination)
    if session:
        argv.append(SESSION_COMMAND)
    return argv


# ---------------------------------------------------------------------------
# The tunnel supervisor
# ---------------------------------------------------------------------------

def describe_exit(code):
    """'exited with code 255' or 'killed by SIGKILL'."""
    if code is not None and code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with code {code}"


def unlink_socket(endpoint):
    """Remove the tunnel's Unix socket, if it is one and it is there."""
    if isinstance(endpoint, str) and os.path.lexists(endpoint):
        os.unlink(endpoint)


def child_environment():
    """The environment for the tunnel child: ours, without the service manager's."""
    return {k: v for k, v in os.environ.items() if k not in SERVICE_VARIABLES}


class Tunnel:
    """The tunnel child process, owned by one supervisor greenlet.

    Clients call acquire() when they arrive and release() when they leave; the
    supervisor (run) starts the child when a client needs it, reaps it when it
    exits, and stops it once no client has been active for the linger time.
    Handlers learn of changes through `changed`, an Event replaced on each one.
    """

    def __init__(self, settings, endpoint):
        self.settings = settings
        self.endpoint = endpoint          # Unix socket path, or a TCP port
        self.session = settings.session and not settings.tunnel_command
        self.active = 0                   # clients between acquire and release
        self.state = "down"               # down, starting, up, stopping
        self.proc = None
        self.started_at = None
        self.stop_reason = None           # set when minimail stops the child
        self.deadline = None              # when the countdown ends
        self.failures = 0                 # failed starts in a row
        self.retry_at = 0.0               # no start before this (backoff)
        self.error = None                 # why the last start failed
        self.last_stderr = None
        self.changed = Event()
        self._wake = Event()

    # -- what clients see ---------------------------------------------------

    def acquire(self):
        """Count a client in: it needs the tunnel, and cancels any countdown."""
        self.active += 1
        self._wake.set()

    def release(self):
        """Count a client out; the last one starts the countdown."""
        self.active -= 1
        self._wake.set()

    def check(self):
        """Raise TunnelUnavailable while minimail backs off after a failed start."""
        left = self.retry_at - time.monotonic()
        if self.proc is None and left > 0:
            raise TunnelUnavailable(f"{self.error}; next try in {math.ceil(left)} s")

    @property
    def accepting(self):
        """True while a connection attempt can succeed."""
        return self.state in ("starting", "up")

    def mark_up(self):
        """A client got through: the tunnel works."""
        if self.state == "starting":
            self.state = "up"
            self.failures = 0
            log.info("tunnel up after %.2f s", time.monotonic() - self.started_at)

    # -- the supervisor -----------------------------------------------------

    def run(self):
        """The supervisor greenlet: keep the child in line with the clients' needs."""
        while True:
            self._wake.clear()
            timeout = self._step(time.monotonic())
            self._wake.wait(timeout)

    def _step(self, now):
        """Start, reap or stop the child as needed; return seconds to the next timer."""
        if self.proc is not None and self.proc.poll() is not None:
            self._reaped(now)
        if self.active:
            if self.deadline is not None:
                log.debug("countdown cancelled: a client arrived")
                self.deadline = None
            if self.proc is None:
                if now < self.retry_at:
                    return self.retry_at - now
                self._launch(now)
        elif self.proc is not None and self.state != "stopping":
            if self.deadline is None:
                linger = self.settings.linger + random.uniform(0, self.settings.jitter)
                self.deadline = now + linger
                log.debug("countdown: stopping the tunnel in %.1f s", linger)
            if now < self.deadline:
                return self.deadline - now
            self._stop("linger expired")
        return None

    def _launch(self, now):
        """Start the tunnel child."""
        argv = self.settings.tunnel_argv(self.endpoint, self.session)
        unlink_socket(self.endpoint)     # a stale socket would only refuse
        try:
            self.proc = subprocess.Popen(
                argv, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE, start_new_session=True,
                env=child_environment())
        except OSError as exc:
            self._failed(now, f"cannot run {argv[0]}: {exc.strerror}")
            return
        self.state, self.started_at, self.stop_reason = "starting", now, None
        self.last_stderr = None
        log.info("tunnel starting (pid %d)", self.proc.pid)
        log.debug("tunnel command: %s", shlex.join(argv))
        gevent.spawn(self._watch, self.proc)
        self._notify()

    def _watch(self, proc):
        """Log the child's stderr line by line; wake the supervisor when it exits."""
        name = os.path.basename(proc.args[0])
        for raw in proc.stderr:
            line = raw.decode("utf-8", "replace").strip()
            if line:
                self.last_stderr = line
                log.warning("%s[%d]: %s", name, proc.pid, line)
        proc.stderr.close()
        proc.wait()
        self._wake.set()

    def _reaped(self, now):
        """The child has exited: log why, and decide what the next start needs."""
        proc, self.proc = self.proc, None
        code, uptime = proc.returncode, now - self.started_at
        was_up, self.state, self.deadline = self.state == "up", "down", None
        if self.stop_reason:
            log.info("tunnel stopped (pid %d, %s): %s", proc.pid, self.stop_reason, describe_exit(code))
        elif self.session and uptime < SESSION_PROBATION and 0 <= code != SSH_ERROR_STATUS:
            self.session = False
            log.warning("the remote command ended at once (%s): %s allows no session here; "
                        "using ssh -N from now on (see --no-session)",
                        describe_exit(code), self.settings.destination)
        elif was_up:
            log.warning("tunnel (pid %d) %s after %.1f s", proc.pid, describe_exit(code), uptime)
        else:
            reason = self.last_stderr or describe_exit(code)
            self._failed(now, f"tunnel failed: {reason}")
        self._notify()

    def _failed(self, now, reason):
        """A start failed: tell waiting clients and back off before the next one."""
        self.failures += 1
        self.error = reason
        backoff = min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** (self.failures - 1))
        self.retry_at = now + backoff
        log.warning("%s (failure %d in a row; next try in %.0f s at the earliest)",
                    reason, self.failures, backoff)
        self._notify()

    def _stop(self, reason):
        """Stop the child: end its session (closing ssh's stdin ends the remote
        cat), or SIGTERM; then SIGTERM and SIGKILL, STOP_GRACE apart."""
        self.state, self.stop_reason = "stopping", reason
        self._notify()
        unlink_socket(self.endpoint)     # no new client may reach a dying tunnel
        proc = self.proc
        steps = (proc.terminate, proc.kill)
        if self.session:
            steps = (proc.stdin.close,) + steps
        for step in steps:
            step()
            try:
                proc.wait(timeout=STOP_GRACE)
                break
            except subprocess.TimeoutExpired:
                continue
        self._reaped(time.monotonic())

    def _notify(self):
        """Wake every handler waiting on the tunnel."""
        changed, self.changed = self.changed, Event()
        changed.set()

    def close(self):
        """Stop the child for good (minimail is exiting)."""
        if self.proc is not None:
            self._stop("minimail is stopping")


# ---------------------------------------------------------------------------
# The forwarder
# ---------------------------------------------------------------------------

_buffers = []


def splice(src, dst, flow):
    """Copy src to dst until src ends; flow[0] counts the bytes.

    The buffer comes from a pool only once src is readable, so idle clients
    hold none.  The caller passes end-of-stream on (see Forwarder.splice_pair).
    """
    fd = src.fileno()
    while True:
        wait_read(fd)
        buf = _buffers.pop() if _buffers else bytearray(CHUNK_SIZE)
        try:
            n = src.recv_into(buf)
            if n:
                dst.sendall(memoryview(buf)[:n])
        finally:
            if len(_buffers) < BUFFER_POOL_SIZE:
                _buffers.append(buf)
        if not n:
            return
        flow[0] += n


def shutdown_write(sock):
    """Pass end-of-stream on; the peer may be gone already."""
    try:
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass


def client_gone(sock):
    """True if the client closed its end without sending anything (peek, no read)."""
    sock.settimeout(0)
    try:
        return sock.recv(1, socket.MSG_PEEK) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True
    finally:
        sock.settimeout(None)


def format_peer(address):
    """'127.0.0.1:40404' or '[::1]:40404'."""
    host, port = address[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class Session:
    """One client's connection: what the log line at its end reports."""

    def __init__(self, peer):
        self.peer = peer
        self.started = time.monotonic()
        self.sent = [0]          # bytes from the client into the tunnel
        self.received = [0]      # bytes from the tunnel to the client
        self.outcome = "ok"

    def log(self):
        log.info("client %s: %s; %d bytes from client, %d to client, %.2f s",
                 self.peer, self.outcome, self.sent[0], self.received[0],
                 time.monotonic() - self.started)


class Forwarder(StreamServer):
    """Accepts mail clients and splices each through the tunnel."""

    def __init__(self, listener, tunnel, settings):
        super().__init__(listener, spawn=Pool())     # the pool lets stop() drain
        self.tunnel = tunnel
        self.settings = settings
        self.sessions = 0

    def handle(self, client, address):
        session = Session(format_peer(address))
        try:
            if self.tunnel.active >= self.settings.max_clients:
                session.outcome = "refused: too many clients"
                reply(client, "421 4.3.2 minimail: too many clients, try again later")
                return
            self.sessions += 1
            self.forward(client, session)
        finally:
            client.close()
            session.log()

    def forward(self, client, session):
        """Bring the tunnel up for this client, then splice the two together."""
        if client.family != socket.AF_UNIX:
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.tunnel.acquire()
        try:
            upstream = self.connect_tunnel(client)
            try:
                self.splice_pair(client, upstream, session)
            finally:
                upstream.close()
        except TunnelUnavailable as exc:
            session.outcome = f"421: {exc}"
            reply(client, f"421 4.4.0 minimail: {exc}")
        except ClientGone:
            session.outcome = "client left before the tunnel was up"
        finally:
            self.tunnel.release()

    def connect_tunnel(self, client):
        """Connect to the tunnel's local end, retrying until it accepts.

        Nothing is read from the client meanwhile: its early bytes wait in the
        kernel.  Gives up when a tunnel start fails, at --wait, or when the
        client hangs up.
        """
        tunnel = self.tunnel
        deadline = time.monotonic() + self.settings.wait
        pause = POLL_FIRST
        while True:
            changed = tunnel.changed
            if tunnel.accepting:
                upstream = self.try_connect()
                if upstream is not None:
                    tunnel.mark_up()
                    return upstream
            tunnel.check()
            if client_gone(client):
                raise ClientGone()
            left = deadline - time.monotonic()
            if left <= 0:
                raise TunnelUnavailable(f"the tunnel was not up within {self.settings.wait:g} s")
            changed.wait(min(pause, left))
            pause = min(pause * POLL_GROWTH, POLL_MAX)

    def try_connect(self):
        """One attempt to connect to the tunnel; None while nobody accepts there."""
        endpoint = self.tunnel.endpoint
        if isinstance(endpoint, str):
            sock, address = gevent.socket.socket(socket.AF_UNIX), endpoint
        else:
            sock, address = gevent.socket.socket(socket.AF_INET), ("127.0.0.1", endpoint)
        try:
            sock.connect(address)
        except (ConnectionRefusedError, FileNotFoundError):
            sock.close()
            return None
        except OSError as exc:
            sock.close()
            raise TunnelUnavailable(f"cannot connect to the tunnel: {exc.strerror}") from None
        if sock.family == socket.AF_INET:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    def splice_pair(self, client, upstream, session):
        """Copy both ways until both directions end, one fails, or the client idles."""
        up = gevent.spawn(splice, client, upstream, session.sent)
        down = gevent.spawn(splice, upstream, client, session.received)
        pending = {up: upstream, down: client}
        idle = IdleWatch(session, self.settings.idle_timeout)
        try:
            while pending:
                done = gevent.wait(list(pending), timeout=idle.check_every, count=1)
                if not done:
                    if idle.expired():
                        session.outcome = f"closed: idle for {self.settings.idle_timeout:g} s"
                        return
                    continue
                for greenlet in done:
                    target = pending.pop(greenlet)
                    if not greenlet.successful():
                        session.outcome = f"closed: {describe_error(greenlet.exception)}"
                        return
                    if greenlet is down and not session.received[0] and up in pending:
                        session.outcome = "421: the tunnel closed before the far side spoke"
                        up.kill()
                        reply(client, "421 4.4.0 minimail: the far side closed the "
                                      "connection without a word (is --remote right?)")
                        return
                    shutdown_write(target)
        finally:
            gevent.killall([up, down])


class IdleWatch:
    """Tells when a session has moved no byte for idle_timeout seconds."""

    def __init__(self, session, idle_timeout):
        self.session = session
        self.idle_timeout = idle_timeout
        self.check_every = idle_timeout / 4 if idle_timeout else None
        self.last_total = 0
        self.last_change = time.monotonic()

    def expired(self):
        total = self.session.sent[0] + self.session.received[0]
        now = time.monotonic()
        if total != self.last_total:
            self.last_total, self.last_change = total, now
        return now - self.last_change >= self.idle_timeout


def describe_error(exc):
    """A short name for a socket error, e.g. 'ECONNRESET'."""
    if isinstance(exc, OSError) and exc.errno:
        return errno.errorcode.get(exc.errno, str(exc))
    return type(exc).__name__


def reply(client, line):
    """Send one SMTP reply line and close our side without resetting the client.

    What the client still sends is read and dropped for a moment, so that
    closing with unread data does not turn into a reset that eats the reply.
    """
    try:
        client.sendall(line.encode("ascii", "replace") + b"\r\n")
        client.shutdown(socket.SHUT_WR)
        with gevent.Timeout(REPLY_LINGER, False):
            while client.recv(4096):
                pass
    except OSError:
        pass


# ---------------------------------------------------------------------------
# Running it
# ---------------------------------------------------------------------------

def bind(settings):
    """Open the listening socket, or raise Fatal in one line naming the cause."""
    family, ip, port = settings.listen
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((ip, port))
        sock.listen(LISTEN_BACKLOG)
        sock.setblocking(False)      # gevent accepts until the queue is empty
    except OSError as exc:
        sock.close()
        where = settings.describe_listen()
        if exc.errno == errno.EACCES and port < 1024:
            raise Fatal(f"cannot listen on {where}: permission denied (ports below 1024 need "
                        f"root, e.g. sudo minimail ..., or CAP_NET_BIND_SERVICE as in "
                        f"minimail.service; or use --listen 127.0.0.1:2525)") from None
        raise Fatal(f"cannot listen on {where}: {exc.strerror.lower()}") from None
    return sock


def make_tunnel_dir():
    """A private directory (mode 0700) for the tunnel's Unix socket."""
    base = os.environ.get("XDG_RUNTIME_DIR")
    if not base or not os.access(base, os.W_OK):
        base = None
    return tempfile.mkdtemp(prefix="minimail-", dir=base)


def setup_logging(verbose):
    """Log to stderr, without timestamps (the journal or the terminal adds context)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(logging.DEBUG if verbose else logging.INFO)
    log.propagate = False


def describe_tunnel(settings):
    """How the tunnel is made, for the start-up line."""
    if settings.tunnel_command:
        return f"{shlex.join(settings.tunnel_command)} on 127.0.0.1:{settings.tunnel_port}"
    return f"ssh {settings.destination} to {settings.remote}"


def run(settings, listener):
    """Serve clients until a signal stops minimail; return the exit status."""
    tunnel_dir = None if settings.tunnel_port else make_tunnel_dir()
    endpoint = settings.tunnel_port or os.path.join(tunnel_dir, "tunnel.sock")
    try:
        tunnel = Tunnel(settings, endpoint)
        server = Forwarder(listener, tunnel, settings)
        stopping = Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            gevent.signal_handler(signum, on_signal, server, stopping)
        supervisor = gevent.spawn(tunnel.run)
        supervisor.link_exception(lambda _: stopping.set())
        server.start()
        log.info("listening on %s; tunnel: %s", settings.describe_listen(),
                 describe_tunnel(settings))
        stopping.wait()
        if supervisor.dead:
            log.error("the tunnel supervisor failed: %r", supervisor.exception)
        drain(server, settings.drain)
        supervisor.kill()
        tunnel.close()
        log.info("stopped after %d session(s)", server.sessions)
        return 1 if supervisor.exception else 0
    finally:
        if tunnel_dir:
            shutil.rmtree(tunnel_dir, ignore_errors=True)


def on_signal(server, stopping):
    """First SIGTERM/SIGINT: stop gracefully.  Second: close all sessions now."""
    if stopping.is_set():
        log.warning("second signal: closing %d session(s) now", len(server.pool))
        server.pool.kill(block=False)
    else:
        log.info("signal received: stopping")
        stopping.set()


def drain(server, seconds):
    """Stop accepting; give active sessions up to `seconds` to end, then close them."""
    server.close()
    if len(server.pool):
        log.info("waiting up to %g s for %d active session(s)", seconds, len(server.pool))
    server.stop(timeout=seconds)


def docopt_usage():
    """The usage lines of the docstring."""
    return __doc__[__doc__.index("Usage:"):__doc__.index("Options:")].rstrip()


def main(argv=None):
    """Run minimail; return its exit status."""
    try:
        args = docopt(__doc__, argv, version=f"minimail {__version__}")
    except DocoptExit as exc:
        complaint = str(exc).partition("\n")[0]
        argv = sys.argv[1:] if argv is None else argv
        print(f"minimail: {explain_usage_error(argv, complaint)}", file=sys.stderr)
        print(docopt_usage(), "Try 'minimail --help'.", sep="\n", file=sys.stderr)
        return 2
    try:
        settings = Settings(args)
    except UsageError as exc:
        print(f"minimail: {exc}\nTry 'minimail --help'.", file=sys.stderr)
        return 2
    setup_logging(settings.verbose)
    try:
        listener = bind(settings)
    except Fatal as exc:
        print(f"minimail: {exc}", file=sys.stderr)
        return 1
    return run(settings, listener)


if __name__ == "__main__":
    sys.exit(main())
