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
  minimail stop [options]
  minimail status [--json] [options]
  minimail [start | restart | check | --foreground] [options] [-o OPT]...
           (DESTINATION | --tunnel-command=CMD)
  minimail -h | --help
  minimail --version

Commands:
  start     Detach into the background (also what a bare `minimail ...
            DESTINATION` does) and return once the daemon listens.
  stop      Stop the daemon and wait until it is gone.
  restart   Stop the daemon if it runs, then start it.
  status    Say whether the daemon runs, and what its tunnel and clients do
            (exit 0 when it runs, 3 when it does not).
  check     Try the tunnel once, as the daemon would, and say what is wrong.
  (none)    The same as start; with --foreground, stay in the foreground
            and log to stderr (as under systemd).

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
  -u USER, --user=USER      When started as root: the user to become once
                            the port is bound (default: $SUDO_USER).  To
                            keep root, say --user root.
  --pidfile=PATH            The daemon's pid file (see Files below).
  --logfile=PATH            The daemon's log file (see Files below).
  --json                    With status: print the daemon's state as JSON.
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

Files: as root, the pid file is /run/minimail/minimail.pid and the log
/var/log/minimail.log; otherwise the pid file is in $XDG_RUNTIME_DIR/minimail
(or ~/.local/state/minimail) and the log in ~/.local/state/minimail.  The
state file that `status` reads lies beside the pid file.  With --foreground,
minimail logs to stderr and writes a pid file only when --pidfile is given.

Privileges: started as root, minimail binds the port, then becomes --user for
good before it runs ssh, so ssh uses that user's keys and known_hosts.  Under
systemd, minimail.service grants the port without root, and minimail.socket
hands over a bound socket (socket activation).  SIGHUP reopens the log file.

Stopping: SIGTERM or SIGINT stops accepting clients at once, lets active
sessions finish for up to --drain seconds, then closes them, stops ssh and
exits 0.  A second signal stops at once.

Exit status: 0 on a clean stop, 1 when minimail cannot run (for example the
listen address is taken), 2 for a usage error.
"""

import collections
import ctypes
import errno
import fcntl
import importlib
import ipaddress
import json
import logging
import math
import mmap
import os
import pwd
import random
import re
import resource
import select
import shlex
import shutil
import signal
import socket
import sys
import tempfile
import time
from contextlib import closing

import gevent
import gevent.socket
from docopt import DocoptExit, docopt
from gevent import subprocess
from gevent.event import Event
from gevent.pool import Pool
from gevent.server import StreamServer

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
#: ssh's own exit status for its errors and lost connections (a remote command
#: killed by a signal ends with it too).  Any other status, when minimail did not
#: stop ssh, is the remote command's own: the session ended, so the account may
#: run no command (a forced command, a restricted shell) and gets ssh -N.
SSH_ERROR_STATUS = 255

#: Bytes moved per chunk: the size of a splice pipe (the most a user may ask
#: for without privilege: /proc/sys/fs/pipe-max-size), or of a copy buffer.
CHUNK_SIZE = 1024 * 1024
#: A copy that always finds data waiting lets others run after this many chunks.
YIELD_EVERY = 16
#: libev's event masks for an io watcher.
READ, WRITE = 1, 2
#: At most this many idle pipes (or buffers) are kept for reuse while the
#: tunnel is up; the pools are emptied when it stops.
POOL_SIZE = 32
#: splice(2) flags: move pages rather than copy them; never block on the pipe.
SPLICE_FLAGS = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)

#: While the tunnel starts, a waiting client tries to connect this often (seconds)...
POLL_FAST = 0.005
#: ...for this long, as ssh is normally up by then...
POLL_FAST_FOR = 2.0
#: ...and then this often, so that many clients waiting on a slow start cost little.
POLL_SLOW = 0.05

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
#: Lines of the tunnel's stderr kept for `check` and the 421 reply.
STDERR_TAIL = 20
#: Environment variables of a service manager that the tunnel must not inherit.
SERVICE_VARIABLES = ("NOTIFY_SOCKET", "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES")
#: prctl(2): the ambient capability set, and its operation that clears it.
PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL = 47, 4
#: The first file descriptor systemd passes with socket activation.
SD_LISTEN_FDS_START = 3
#: The open-files limit to aim for when the hard limit is unlimited.
OPEN_FILES_CAP = 1 << 20
#: Changes to the daemon's state within this many seconds make one write of the state file.
STATE_DELAY = 0.05
#: How long `minimail stop` waits for the daemon to end before it kills it.
STOP_WAIT = 30.0
#: How long `minimail check` waits for the far side's greeting.
GREETING_WAIT = 10.0


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
        self.user = args["--user"]
        self.pidfile = args["--pidfile"] and os.path.abspath(args["--pidfile"])
        self.logfile = args["--logfile"] and os.path.abspath(args["--logfile"])
        self.destination = args["DESTINATION"] if args["DESTINATION"] is None \
            else parse_destination(args["DESTINATION"])
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


def earliest(*delays):
    """The shortest of the delays that are set (None means no timer)."""
    return min((d for d in delays if d is not None), default=None)


def wall_clock(moment):
    """A time.monotonic() moment as seconds since the epoch (None stays None)."""
    return None if moment is None else time.time() - (time.monotonic() - moment)


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
        self.last_exit = None             # the last child's exit status
        self.closing = False              # minimail is stopping: no new child
        self.retry_at = 0.0               # no start before this (backoff)
        self.error = None                 # why the last start failed
        self.stderr_tail = collections.deque(maxlen=STDERR_TAIL)
        self.died = Event()               # set when this child is gone: its sessions are too
        self.on_change = lambda: None     # e.g. the state file's writer
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
        """Raise TunnelUnavailable while minimail backs off after a failed start,
        or when it is stopping and the tunnel is gone."""
        left = self.retry_at - time.monotonic()
        if self.proc is None and left > 0:
            raise TunnelUnavailable(f"{self.error}; next try in {math.ceil(left)} s")
        if self.proc is None and self.closing:
            raise TunnelUnavailable("minimail is stopping")

    def connect(self, wait, abandoned=lambda: False):
        """Connect to the tunnel's local end, retrying until it accepts.

        The caller must have acquire()d the tunnel.  Gives up with
        TunnelUnavailable when a start fails or after `wait` seconds, and with
        ClientGone as soon as abandoned() says nobody needs the connection.
        """
        started = time.monotonic()
        deadline = started + wait
        while True:
            changed = self.changed
            if self.state in ("starting", "up"):
                upstream = self._try_connect()
                if upstream is not None:
                    self.mark_up()
                    return upstream
            self.check()
            if abandoned():
                raise ClientGone()
            left = deadline - time.monotonic()
            if left <= 0:
                raise TunnelUnavailable(f"the tunnel was not up within {wait:g} s")
            pause = POLL_FAST if time.monotonic() - started < POLL_FAST_FOR else POLL_SLOW
            changed.wait(min(pause, left))

    def _try_connect(self):
        """One attempt to connect to the tunnel; None while nobody accepts there."""
        if isinstance(self.endpoint, str):
            sock, address = gevent.socket.socket(socket.AF_UNIX), self.endpoint
        else:
            sock, address = gevent.socket.socket(socket.AF_INET), ("127.0.0.1", self.endpoint)
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

    def mark_up(self):
        """A client got through: the tunnel works."""
        if self.state == "starting":
            self.state = "up"
            self.failures = 0
            log.info("tunnel up after %.2f s", time.monotonic() - self.started_at)
            self.on_change()

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
        if self.state == "starting" and now >= self.started_at + self.settings.wait:
            self._stop(f"not up within {self.settings.wait:g} s")
            self._failed(time.monotonic(), f"the tunnel was not up within {self.settings.wait:g} s")
        timer = self._step_clients(now)
        if self.state == "starting":
            timer = earliest(timer, self.started_at + self.settings.wait - now)
        return timer

    def _step_clients(self, now):
        """Start the child for waiting clients, or count down when there are none."""
        if self.active:
            if self.deadline is not None:
                log.debug("countdown cancelled: a client arrived")
                self.deadline = None
                self.on_change()
            if self.proc is None and not self.closing:
                if now < self.retry_at:
                    return self.retry_at - now
                self._launch(now)
        elif self.proc is not None and self.state != "stopping":
            if self.deadline is None:
                linger = self.settings.linger + random.uniform(0, self.settings.jitter)
                self.deadline = now + linger
                log.debug("countdown: stopping the tunnel in %.1f s", linger)
                self.on_change()
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
        self.stderr_tail.clear()
        self.died = Event()
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
                self.stderr_tail.append(line)
                log.warning("%s[%d]: %s", name, proc.pid, line)
        proc.stderr.close()
        proc.wait()
        self._wake.set()

    def _reaped(self, now):
        """The child has exited: log why, and decide what the next start needs."""
        proc, self.proc = self.proc, None
        proc.stdin.close()
        self.died.set()
        if not self.active:
            empty_pools()           # idle for real: the splice's pipes go back too
        code, uptime = proc.returncode, now - self.started_at
        self.last_exit = code
        was_up, self.state, self.deadline = self.state == "up", "down", None
        if self.stop_reason:
            log.info("tunnel stopped (pid %d, %s): %s", proc.pid, self.stop_reason, describe_exit(code))
        elif self.session and 0 <= code != SSH_ERROR_STATUS:
            self.session = False
            log.warning("the remote command ended by itself (%s after %.1f s): %s allows no "
                        "session; using ssh -N from now on (see --no-session)",
                        describe_exit(code), uptime, self.settings.destination)
        elif was_up:
            log.warning("tunnel (pid %d) %s after %.1f s", proc.pid, describe_exit(code), uptime)
        else:
            reason = self.stderr_tail[-1] if self.stderr_tail else describe_exit(code)
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
        self.on_change()

    def describe(self):
        """The tunnel's state for `minimail status`."""
        return {
            "state": self.state,
            "pid": self.proc.pid if self.proc else None,
            "since": wall_clock(self.started_at) if self.proc else None,
            "stops_at": wall_clock(self.deadline),
            "session": self.session,
            "failures": self.failures,
            "retry_at": wall_clock(self.retry_at) if self.retry_at > time.monotonic() else None,
            "last_error": self.error,
        }

    def close(self):
        """Stop the child for good (minimail is exiting)."""
        if self.proc is not None:
            self._stop("minimail is stopping")


# ---------------------------------------------------------------------------
# The forwarder
# ---------------------------------------------------------------------------

# Copying: zero-copy through a pipe where there is splice(2) (Linux, Python 3.10+),
# else through a buffer.  A pipe or buffer is taken from a pool only once data
# waits, so an idle client holds none, and the pools are emptied when the last
# client leaves.  This is the hot path: no logging, no allocation per chunk.

_pipes = []       # idle, empty pipes for os.splice: (read end, write end)
_buffers = []     # idle buffers for recv_into: anonymous mmaps, whose memory frees for real


def new_pipe():
    read_end, write_end = os.pipe()
    try:
        fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, CHUNK_SIZE)
    except OSError:
        pass                 # above /proc/sys/fs/pipe-max-size: the default will do
    return read_end, write_end


def close_pipe(pipe):
    for fd in pipe:
        os.close(fd)


def splice_through_pipe(src, dst, flow):
    """Move src to dst until src ends, through a pipe with splice(2): the bytes
    never enter Python.  flow[0] counts them.  Returns None at the end of src, or
    the socket error that ended the copy (a client's reset is an outcome to log,
    not a crash).  The caller passes end-of-stream on (Forwarder.splice_pair).

    After a chunk that filled the pipe it reads again before it waits, so a bulk
    transfer seldom goes round the event loop (but after YIELD_EVERY chunks in a
    row it waits all the same, to give other clients their turn).  A pipe is held
    only while it holds bytes; the two watchers live as long as the copy."""
    hub = gevent.get_hub()
    readable = hub.loop.io(src.fileno(), READ)
    writable = hub.loop.io(dst.fileno(), WRITE)
    in_a_row = 0
    try:
        while True:
            hub.wait(readable)
            while True:
                pipe = _pipes.pop() if _pipes else new_pipe()
                try:
                    count = move_through(pipe, readable.fd, writable, hub)
                except OSError as exc:
                    close_pipe(pipe)     # it may hold bytes that will never be sent
                    return exc
                except BaseException:
                    close_pipe(pipe)     # killed mid-chunk (minimail is stopping)
                    raise
                if len(_pipes) < POOL_SIZE:
                    _pipes.append(pipe)
                else:
                    close_pipe(pipe)
                if count == 0:
                    return None
                if count:
                    flow[0] += count
                    in_a_row += 1
                if count != CHUNK_SIZE or in_a_row >= YIELD_EVERY:
                    in_a_row = 0
                    break
    finally:
        readable.close()
        writable.close()


def move_through(pipe, src_fd, writable, hub):
    """Move what waits on src_fd through an empty pipe to the writable watcher's
    fd: the byte count, 0 at the end of src, or None if nothing waits."""
    try:
        count = os.splice(src_fd, pipe[1], CHUNK_SIZE, flags=SPLICE_FLAGS)
    except BlockingIOError:
        return None
    left = count
    while left:
        try:
            left -= os.splice(pipe[0], writable.fd, left, flags=SPLICE_FLAGS)
        except BlockingIOError:
            hub.wait(writable)
    return count


def splice_through_buffer(src, dst, flow):
    """splice_through_pipe's twin for systems without splice(2): recv_into a
    pooled buffer, then sendall."""
    hub = gevent.get_hub()
    readable = hub.loop.io(src.fileno(), READ)
    try:
        while True:
            hub.wait(readable)
            buf = _buffers.pop() if _buffers else mmap.mmap(-1, CHUNK_SIZE)
            try:
                count = src.recv_into(buf)
                if count:
                    dst.sendall(memoryview(buf)[:count])
            finally:
                if len(_buffers) < POOL_SIZE:
                    _buffers.append(buf)
            if not count:
                return None
            flow[0] += count
    except OSError as exc:
        return exc
    finally:
        readable.close()


splice = splice_through_pipe if hasattr(os, "splice") else splice_through_buffer


def empty_pools():
    """Hand the idle pipes and buffers back to the system (the tunnel has stopped)."""
    while _pipes:
        close_pipe(_pipes.pop())
    _buffers.clear()


def shutdown_write(sock):
    """Pass end-of-stream on; the peer may be gone already."""
    try:
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass


def hung_up(sock):
    """True if the peer closed its end entirely, not just half-closed it (POLLHUP:
    a Unix socket shows it; ssh closes a channel that DESTINATION refused)."""
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN)
    return any(event & select.POLLHUP for _, event in poller.poll(0))


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
    """One client's connection: its sockets, and what the log line at its end reports."""

    def __init__(self, client, peer):
        self.client = client
        self.upstream = None     # the connection through the tunnel, once there is one
        self.peer = peer
        self.started = time.monotonic()
        self.sent = [0]          # bytes from the client into the tunnel
        self.received = [0]      # bytes from the tunnel to the client
        self.outcome = None      # why it ended, if not simply at the end of both streams

    def end(self, outcome):
        """End the session from outside its copies: shutting both sockets down
        wakes them wherever they wait, and they end as at end-of-stream."""
        if self.outcome is None:
            self.outcome = outcome
        for sock in (self.client, self.upstream):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def end_with_tunnel(self, _event):
        self.end("closed: the tunnel ended under the session")

    def log(self):
        log.info("client %s: %s; %d bytes from client, %d to client, %.2f s",
                 self.peer, self.outcome or "ok", self.sent[0], self.received[0],
                 time.monotonic() - self.started)


class Forwarder(StreamServer):
    """Accepts mail clients and splices each through the tunnel."""

    def __init__(self, listener, tunnel, settings):
        super().__init__(listener, spawn=Pool())     # the pool lets stop() drain
        self.tunnel = tunnel
        self.settings = settings
        self.sessions = 0            # clients served since the start
        self.bytes_from_clients = 0  # of sessions that have ended
        self.bytes_to_clients = 0
        self.started_at = time.time()   # wall clock, for status
        self.on_change = lambda: None

    def handle(self, client, address):
        session = Session(client, format_peer(address))
        try:
            if self.tunnel.active >= self.settings.max_clients:
                session.outcome = "refused: too many clients"
                reply(client, "421 4.3.2 minimail: too many clients, try again later")
                return
            self.sessions += 1
            self.on_change()
            self.forward(client, session)
        finally:
            client.close()
            session.log()
            self.bytes_from_clients += session.sent[0]
            self.bytes_to_clients += session.received[0]
            self.on_change()

    def forward(self, client, session):
        """Bring the tunnel up for this client, then splice the two together."""
        if client.family != socket.AF_UNIX:
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.tunnel.acquire()
        try:
            session.upstream = self.tunnel.connect(self.settings.wait, lambda: client_gone(client))
            try:
                self.splice_pair(session)
            finally:
                session.upstream.close()
        except TunnelUnavailable as exc:
            session.outcome = f"421: {exc}"
            reply(client, f"421 4.4.0 minimail: {exc}")
        except ClientGone:
            session.outcome = "client left before the tunnel was up"
        finally:
            self.tunnel.release()

    def splice_pair(self, session):
        """Copy both ways until both directions end, one fails, the tunnel dies
        under them, or the session idles too long.  The caller closes the sockets.

        This greenlet copies from the tunnel to the client, one more the other
        way: a held client costs two parked greenlets.  The idle timer and the
        tunnel's death are callbacks, which end the session (Session.end)."""
        client, upstream = session.client, session.upstream
        tunnel_died = self.tunnel.died        # of the child this session went through
        up = gevent.spawn(copy_up, session)
        idle = IdleTimer(session, self.settings.idle_timeout)
        tunnel_ended = session.end_with_tunnel
        tunnel_died.rawlink(tunnel_ended)
        try:
            failure = splice(upstream, client, session.received)
            if failure is not None:
                session.end(f"closed: {describe_error(failure)}")
            elif session.outcome is None and not session.received[0] and not up.dead \
                    and hung_up(upstream):
                up.kill()
                session.outcome = "421: the tunnel closed before the far side spoke"
                reply(client, "421 4.4.0 minimail: the far side closed the "
                              "connection without a word (is --remote right?)")
                return
            else:
                shutdown_write(client)
            up.join()
        finally:
            tunnel_died.unlink(tunnel_ended)
            idle.stop()
            up.kill()


def copy_up(session):
    """The client-to-tunnel half of a session, in a greenlet of its own."""
    failure = splice(session.client, session.upstream, session.sent)
    if failure is not None:
        session.end(f"closed: {describe_error(failure)}")
    else:
        shutdown_write(session.upstream)


class IdleTimer:
    """Ends a session that has moved no byte for idle_timeout seconds (0: never).
    A timer that checks the byte counts now and then: no greenlet, no work per chunk."""

    def __init__(self, session, idle_timeout):
        self.session = session
        self.idle_timeout = idle_timeout
        self.last_total = 0
        self.last_change = time.monotonic()
        self.timer = None
        if idle_timeout:
            self.timer = gevent.get_hub().loop.timer(idle_timeout / 4, idle_timeout / 4)
            self.timer.start(self.check)

    def check(self):
        total = self.session.sent[0] + self.session.received[0]
        now = time.monotonic()
        if total != self.last_total:
            self.last_total, self.last_change = total, now
        elif now - self.last_change >= self.idle_timeout:
            self.stop()
            self.session.end(f"closed: idle for {self.idle_timeout:g} s")

    def stop(self):
        if self.timer is not None:
            self.timer.close()
            self.timer = None


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
# Listening, files and privileges
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


def inherited_listener():
    """The listening socket systemd passed (socket activation, fd 3), or None."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return None
    count = os.environ.get("LISTEN_FDS", "0")
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(name, None)
    if not count.isdigit() or int(count) < 1:
        return None
    sock = socket.socket(fileno=SD_LISTEN_FDS_START)
    if sock.type != socket.SOCK_STREAM or not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        raise Fatal("the socket systemd passed (fd 3) is not a listening stream socket")
    sock.setblocking(False)
    return sock


def describe_socket(sock):
    """Where a listening socket listens, as a user writes it."""
    address = sock.getsockname()
    return address if isinstance(address, str) else format_peer(address)


def default_paths():
    """(pid file, log file) of the daemon when --pidfile and --logfile are not given."""
    if os.geteuid() == 0:
        return "/run/minimail/minimail.pid", "/var/log/minimail.log"
    state_home = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    state = os.path.join(state_home, "minimail")
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    pid_dir = os.path.join(runtime, "minimail") if runtime else state
    return os.path.join(pid_dir, "minimail.pid"), os.path.join(state, "minimail.log")


def state_path(pidfile):
    """The state file that `status` reads: next to the pid file."""
    return os.path.splitext(pidfile)[0] + ".state"


def running_pid(pidfile):
    """The pid in pidfile if a minimail process runs under it; None if the file is
    missing or stale (the process is gone, a zombie, or another program)."""
    try:
        with open(pidfile) as f:
            pid = int(f.read().split()[0])
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rpartition(")")[2].split()[0]
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read()
    except (OSError, ValueError, IndexError):
        return None
    return pid if state != "Z" and b"minimail" in cmdline else None


def make_owned_dir(path, owner):
    """Create path (mode 0755) and give it to the daemon's user, who must be
    able to replace the state file and remove the pid file after the drop."""
    os.makedirs(path, mode=0o755, exist_ok=True)
    if owner is not None:
        os.chown(path, owner.pw_uid, owner.pw_gid)


def write_pidfile(pidfile):
    with open(pidfile, "w") as f:
        f.write(f"{os.getpid()}\n")


def remove_file(path):
    """Remove a file of ours; say so if that is impossible."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("cannot remove %s: %s", path, exc.strerror)


def target_user(settings):
    """The user to become after binding (a pwd entry), or None to stay as we are."""
    if os.geteuid() != 0:
        me = pwd.getpwuid(os.geteuid()).pw_name
        if settings.user not in (None, me):
            raise Fatal(f"--user {settings.user} needs root; minimail runs as {me}")
        return None
    name = settings.user or os.environ.get("SUDO_USER")
    if not name or (name == "root" and settings.user != "root"):
        raise Fatal("refusing to run the tunnel as root: name the user to become with "
                    "--user USER (or say --user root to stay root)")
    try:
        return pwd.getpwnam(name)
    except KeyError:
        raise UsageError(f"--user: there is no user {name!r}") from None


def drop_privileges(user):
    """Become user for good: supplementary groups, gid, then uid (real,
    effective and saved); check that root cannot be regained."""
    if user.pw_uid != 0:
        os.initgroups(user.pw_name, user.pw_gid)
        os.setresgid(user.pw_gid, user.pw_gid, user.pw_gid)
        os.setresuid(user.pw_uid, user.pw_uid, user.pw_uid)
        try:
            os.setuid(0)
        except PermissionError:
            pass
        else:
            raise Fatal("dropping root failed: the process could become root again")
    os.environ.update(HOME=user.pw_dir, USER=user.pw_name, LOGNAME=user.pw_name)
    log.info("running as %s (uid %d)", user.pw_name, user.pw_uid)


def clear_ambient_capabilities():
    """Keep a capability systemd granted for binding (AmbientCapabilities=) from
    passing on to ssh: clear the ambient set once the port is bound (Linux)."""
    try:
        with open("/proc/self/status") as f:
            ambient = re.search(r"^CapAmb:\s*([0-9a-f]+)", f.read(), re.M)
    except OSError:
        return
    if not ambient or int(ambient[1], 16) == 0:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) != 0:
        log.warning("cannot clear ambient capabilities: %s", os.strerror(ctypes.get_errno()))


def preload():
    """Import now what gevent and minimail would import lazily later: after the
    drop, the interpreter's own directory may be closed to the new user."""
    hub = gevent.get_hub()
    hub.threadpool.spawn(int).get()
    hub.resolver
    importlib.import_module("gevent.fileobject")     # ssh's stderr pipe
    "localhost".encode("idna")
    json.dumps(signal.Signals.SIGTERM.name)


def raise_open_files_limit():
    """Raise the soft limit of open files to the hard one, for many clients."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = OPEN_FILES_CAP
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    log.info("open files limit: %d", soft)


def make_tunnel_dir(base=None):
    """A private directory (mode 0700) for the tunnel's Unix socket."""
    base = base or os.environ.get("XDG_RUNTIME_DIR")
    if not base or not os.access(base, os.W_OK):
        base = None
    return tempfile.mkdtemp(prefix="minimail-", dir=base)


# ---------------------------------------------------------------------------
# Logging, readiness and state
# ---------------------------------------------------------------------------

class LogFile(logging.FileHandler):
    """The daemon's log file, reopened on SIGHUP after logrotate has moved it."""

    def reopen(self):
        try:
            stream = open(self.baseFilename, "a", encoding="utf-8")
        except OSError as exc:
            log.warning("cannot reopen %s: %s; still writing to the old file",
                        self.baseFilename, exc.strerror)
            return
        old = self.setStream(stream)
        if old:
            old.close()
        log.info("log file reopened")


def log_to_stderr(verbose):
    """Log to stderr without timestamps: the journal or the terminal adds its own."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    install_log_handler(handler, verbose)


def log_to_file(path, verbose, owner):
    """Log to a file with timestamps; create it now, while we may, for owner."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    handler = LogFile(path, encoding="utf-8")
    os.chmod(path, 0o640)
    if owner is not None:
        os.chown(path, owner.pw_uid, owner.pw_gid)
    handler.setFormatter(logging.Formatter(
        "%(asctime)s minimail[%(process)d] %(levelname)s %(message)s"))
    install_log_handler(handler, verbose)
    return handler


def install_log_handler(handler, verbose):
    # Record nothing the formats do not print (the logging docs' "Optimization").
    logging.logThreads = logging.logMultiprocessing = False
    logging._srcfile = None
    log.handlers[:] = [handler]
    log.setLevel(logging.DEBUG if verbose else logging.INFO)
    log.propagate = False


class Readiness:
    """Tells whoever waits for the daemon that it listens (or why it cannot):
    the `minimail start` process through a pipe, systemd through NOTIFY_SOCKET."""

    def __init__(self, pipe=None):
        self.pipe = pipe
        self.notify = None
        address = os.environ.pop("NOTIFY_SOCKET", None)
        if address:          # connect now: its directory may be closed to us after the drop
            self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            self.notify.connect("\0" + address[1:] if address.startswith("@") else address)

    def ready(self, where):
        self._tell_parent(f"ok {os.getpid()} {where}")
        self._tell_systemd(f"READY=1\nSTATUS=listening on {where}")

    def failed(self, reason):
        self._tell_parent(f"error {reason}")

    def stopping(self):
        self._tell_systemd("STOPPING=1")

    def _tell_parent(self, message):
        if self.pipe is not None:
            os.write(self.pipe, message.encode())
            os.close(self.pipe)
            self.pipe = None

    def _tell_systemd(self, message):
        if self.notify is not None:
            try:
                self.notify.send(message.encode())
            except OSError as exc:
                log.warning("cannot notify systemd: %s", exc.strerror)


class StateFile:
    """The daemon's figures for `minimail status`, replaced atomically soon after
    each change (changes within STATE_DELAY are written once)."""

    def __init__(self, path, describe):
        self.path = path
        self.describe = describe
        self.pending = None
        self.failed = False

    def changed(self):
        if self.pending is None:
            self.pending = gevent.spawn_later(STATE_DELAY, self.write)

    def write(self):
        self.pending = None
        temporary = f"{self.path}.tmp"
        try:
            with open(temporary, "w") as f:
                json.dump(self.describe(), f, indent=1)
            os.replace(temporary, self.path)
        except OSError as exc:
            if not self.failed:
                log.warning("cannot write the state file %s: %s", self.path, exc.strerror)
            self.failed = True

    def remove(self):
        if self.pending is not None:
            self.pending.kill()
        remove_file(self.path)


# ---------------------------------------------------------------------------
# Running the daemon
# ---------------------------------------------------------------------------

def describe_tunnel(settings):
    """How the tunnel is made, for the start-up line."""
    if settings.tunnel_command:
        return f"{shlex.join(settings.tunnel_command)} on 127.0.0.1:{settings.tunnel_port}"
    return f"ssh {settings.destination} to {settings.remote}"


def start(settings, foreground):
    """Start minimail, in the foreground or as a daemon; return the exit status."""
    user = target_user(settings)
    default_pidfile, default_logfile = default_paths()
    pidfile = settings.pidfile or (None if foreground else default_pidfile)
    if pidfile:
        pid = running_pid(pidfile)
        if pid:
            raise Fatal(f"already running (pid {pid}, pid file {pidfile})")
    listener = inherited_listener() or bind(settings)
    if pidfile:
        make_owned_dir(os.path.dirname(pidfile), user)
    if foreground:
        log_to_stderr(settings.verbose)
        return run(settings, listener, user, pidfile, Readiness())
    logfile = settings.logfile or default_logfile
    handler = log_to_file(logfile, settings.verbose, user)
    in_daemon, result = detach(keep={listener.fileno(), handler.stream.fileno()})
    if not in_daemon:
        return report_start(result, logfile)
    return run(settings, listener, user, pidfile, Readiness(result), handler)


def detach(keep):
    """Fork into the background, before gevent's hub or any thread exists.

    In the original process return (False, the daemon's word on a pipe); in the
    daemon, a new session with stdin/stdout/stderr on /dev/null, working
    directory / and no other inherited descriptors, return (True, the pipe).
    """
    read_end, write_end = os.pipe()
    child = os.fork()
    if child:
        os.close(write_end)
        os.waitpid(child, 0)
        with os.fdopen(read_end, "rb") as pipe:
            return False, pipe.read().decode(errors="replace")
    os.close(read_end)
    os.setsid()
    if os.fork():
        os._exit(0)                   # the daemon is no session leader: no terminal
    os.chdir("/")
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    keep = sorted(keep | {0, 1, 2, write_end})
    for low, high in zip(keep, keep[1:] + [resource.getrlimit(resource.RLIMIT_NOFILE)[0]]):
        os.closerange(low + 1, high)
    return True, write_end


def report_start(word, logfile):
    """In the `start` process: say how the daemon's start went; the exit status."""
    status, _, rest = word.partition(" ")
    if status == "ok":
        pid, _, where = rest.partition(" ")
        print(f"minimail started (pid {pid}), listening on {where}; log: {logfile}")
        return 0
    reason = rest if status == "error" else f"the daemon ended before it was ready; see {logfile}"
    print(f"minimail: {reason}", file=sys.stderr)
    return 1


def run(settings, listener, user, pidfile, readiness, logfile=None):
    """Serve until a signal stops minimail; return the exit status."""
    where = describe_socket(listener)
    tunnel_dir = None
    try:
        raise_open_files_limit()
        clear_ambient_capabilities()
        preload()
        stopping = Event()
        if user is not None:
            drop_privileges(user)
        if pidfile:
            write_pidfile(pidfile)
        tunnel_dir = None if settings.tunnel_port else make_tunnel_dir(
            os.path.dirname(pidfile) if pidfile else None)
        endpoint = settings.tunnel_port or os.path.join(tunnel_dir, "tunnel.sock")
        tunnel = Tunnel(settings, endpoint)
        server = Forwarder(listener, tunnel, settings)
        state = StateFile(state_path(pidfile), lambda: describe_daemon(server, settings)) if pidfile else None
        for signum in (signal.SIGTERM, signal.SIGINT):
            gevent.signal_handler(signum, on_signal, server, stopping)
        if logfile is not None:
            gevent.signal_handler(signal.SIGHUP, logfile.reopen)
        supervisor = gevent.spawn(tunnel.run)
        supervisor.link_exception(lambda _: stopping.set())
        server.start()
    except (Fatal, OSError) as exc:
        reason = exc if isinstance(exc, Fatal) else f"cannot start: {exc}"
        log.error("%s", reason)
        readiness.failed(str(reason))
        cleanup(pidfile, tunnel_dir)
        return 1
    if state:
        tunnel.on_change = server.on_change = state.changed
        state.write()
    log.info("listening on %s; tunnel: %s", where, describe_tunnel(settings))
    readiness.ready(where)
    try:
        stopping.wait()
        readiness.stopping()
        if supervisor.dead:
            log.error("the tunnel supervisor failed: %r", supervisor.exception)
        tunnel.closing = True
        drain(server, settings.drain)
        supervisor.kill()
        tunnel.close()
        log.info("stopped after %d session(s)", server.sessions)
        return 1 if supervisor.exception else 0
    finally:
        if state:
            state.remove()
        cleanup(pidfile, tunnel_dir)


def cleanup(pidfile, tunnel_dir):
    """Remove what the daemon made: its pid file and the tunnel's directory."""
    if pidfile:
        remove_file(pidfile)
    if tunnel_dir:
        shutil.rmtree(tunnel_dir, ignore_errors=True)


def describe_daemon(server, settings):
    """The daemon's figures for the state file."""
    return {
        "pid": os.getpid(),
        "started": server.started_at,
        "listening": describe_socket(server.socket),
        "tunnel_to": describe_tunnel(settings),
        "clients_active": server.tunnel.active,
        "sessions": server.sessions,
        "bytes_from_clients": server.bytes_from_clients,
        "bytes_to_clients": server.bytes_to_clients,
        "tunnel": server.tunnel.describe(),
        "updated": time.time(),
    }


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


# ---------------------------------------------------------------------------
# stop, status
# ---------------------------------------------------------------------------

def stop(pidfile):
    """Stop the daemon and wait until it is gone; the exit status."""
    pid = running_pid(pidfile)
    if pid is None:
        stale = os.path.exists(pidfile)
        print(f"minimail is not running{' (stale pid file ignored)' if stale else ''}")
        return 1
    try:
        os.kill(pid, signal.SIGTERM)
    except PermissionError:
        raise Fatal(f"not allowed to stop minimail (pid {pid}): try sudo minimail stop") from None
    deadline = time.monotonic() + STOP_WAIT
    while running_pid(pidfile) == pid:
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            print(f"minimail (pid {pid}) did not stop within {STOP_WAIT:g} s: killed")
            remove_file(pidfile)
            return 1
        time.sleep(0.05)
    print(f"minimail stopped (pid {pid})")
    return 0


def status(pidfile, as_json):
    """Say whether the daemon runs and what it is doing: exit 0 if it runs, 3 if not."""
    pid = running_pid(pidfile)
    state = {}
    if pid:
        try:
            with open(state_path(pidfile)) as f:
                state = json.load(f)
        except (OSError, ValueError):
            pass
    if as_json:
        print(json.dumps({"running": bool(pid), "pid": pid, **state}, indent=1))
    elif pid is None:
        print("minimail is not running")
    else:
        print("\n".join(describe_status(pid, state)))
    return 0 if pid else 3


def describe_status(pid, state):
    """The lines `minimail status` prints for a running daemon."""
    now = time.time()
    lines = [f"minimail is running (pid {pid})"]
    if not state:
        return lines + ["(no state file: is it an older minimail, or started with --foreground?)"]
    lines[0] += f", up {format_duration(now - state['started'])}, listening on {state['listening']}"
    tunnel = state["tunnel"]
    line = f"tunnel: {tunnel['state']}"
    if tunnel["pid"]:
        line += f" (pid {tunnel['pid']}, for {format_duration(now - tunnel['since'])})"
    if tunnel["stops_at"]:
        line += f", stops in {max(0, tunnel['stops_at'] - now):.0f} s unless a client comes"
    if tunnel["retry_at"]:
        line += f", next try in {max(0, tunnel['retry_at'] - now):.0f} s"
    lines.append(f"{line}; {state['tunnel_to']}")
    lines.append(f"clients: {state['clients_active']} active, {state['sessions']} session(s) served; "
                 f"{state['bytes_from_clients']} bytes from clients, "
                 f"{state['bytes_to_clients']} to clients")
    lines.append(f"last tunnel error: {tunnel['last_error'] or 'none'}")
    return lines


def format_duration(seconds):
    """'42 s', '7 min 3 s', '3 h 12 min', '2 d 4 h'."""
    seconds = int(max(0, seconds))
    for unit, size, smaller, small_size in (("d", 86400, "h", 3600), ("h", 3600, "min", 60),
                                            ("min", 60, "s", 1)):
        if seconds >= size:
            return f"{seconds // size} {unit} {seconds % size // small_size} {smaller}"
    return f"{seconds} s"


# ---------------------------------------------------------------------------
# check
# ---------------------------------------------------------------------------

#: How to read ssh's complaints: (pattern, the step that failed, the likely fix).
SSH_TROUBLES = (
    (r"Could not resolve hostname", "reach",
     "check the host name in DESTINATION (or HostName in your ssh config)"),
    (r"REMOTE HOST IDENTIFICATION HAS CHANGED", "host key",
     "the hoster's host key changed: if that is expected, remove the old one with "
     "ssh-keygen -R HOST, then accept the new one once"),
    (r"Host key verification failed|host key is known|No \S+ host key", "host key",
     "the hoster's host key is not known: accept it once with `ssh DESTINATION true` as the "
     "user minimail runs as, or ssh-keyscan -p PORT HOST >> ~/.ssh/known_hosts (compare the "
     "fingerprint with your hoster's)"),
    (r"Permission denied|Too many authentication failures", "log in",
     "the hoster did not accept the key: install it with ssh-copy-id -i KEY.pub DESTINATION and "
     "point IdentityFile (or --ssh \"ssh -i KEY\") at it; a key with a passphrase needs an agent"),
    (r"forwarding|cannot listen|bind", "forward",
     "ssh could not open the forward: check that the hoster allows port forwarding "
     "(AllowTcpForwarding, permitopen= in authorized_keys)"),
    (r"Connection refused|timed out|No route to host|unreachable|Connection closed|"
     r"Connection reset|kex_exchange_identification", "reach",
     "check that the host is reachable and that the port is right (Port in your ssh config, "
     "or --ssh \"ssh -p PORT\")"),
)
#: The steps `check` reports, in order: (key, what passing means, what failing means).
CHECK_STEPS = (
    ("reach", "ssh reached the hoster", "ssh did not reach the hoster"),
    ("host key", "the hoster's host key is known", "the hoster's host key was not accepted"),
    ("log in", "ssh logged in without a prompt", "ssh could not log in without a prompt"),
    ("forward", "the forward opened", "the forward did not open"),
)


def check_step(ok, text, fix=None):
    print(f"  {'ok  ' if ok else 'FAIL'}  {text}")
    if fix:
        print(f"        fix: {fix}")
    return ok


def check(settings):
    """Try the tunnel once, as the daemon would, and say in plain words what works."""
    print(f"minimail check: ssh {settings.destination}, then {settings.remote} from there")
    program = shutil.which(settings.ssh[0])
    if not program:
        check_step(False, f"ssh found: {settings.ssh[0]} is not on PATH",
                   "install openssh-client, or point --ssh at ssh")
        return 1
    check_step(True, f"ssh found: {program} ({ssh_version(program)})")
    tunnel_dir = make_tunnel_dir()
    tunnel = Tunnel(settings, os.path.join(tunnel_dir, "tunnel.sock"))
    supervisor = gevent.spawn(tunnel.run)
    tunnel.acquire()
    try:
        started = time.monotonic()
        try:
            upstream = tunnel.connect(settings.wait)
        except TunnelUnavailable as exc:
            return explain_tunnel_failure(tunnel, exc)
        for _, passed, _ in CHECK_STEPS:
            check_step(True, passed)
        print(f"        (the tunnel was up after {time.monotonic() - started:.2f} s)")
        if not tunnel.session:
            print("        note: the hoster ends sessions at once; minimail uses ssh -N there")
        with closing(upstream):
            greeted = check_greeting(upstream, settings)
        if not greeted:
            gevent.sleep(0.1)            # let ssh's complaint about the channel arrive
            show_ssh_said(tunnel)
    finally:
        tunnel.release()
        supervisor.kill()
        tunnel.close()
        shutil.rmtree(tunnel_dir, ignore_errors=True)
    closed = tunnel.proc is None
    check_step(closed, f"tunnel closed (ssh {describe_exit(tunnel.last_exit)})")
    if greeted and closed:
        print(f"all good: minimail can send mail through {settings.destination}")
        return 0
    return 1


def ssh_version(program):
    """What `ssh -V` says of itself."""
    try:
        result = subprocess.run([program, "-V"], capture_output=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "version unknown"
    return (result.stderr or result.stdout).decode(errors="replace").strip()


def explain_tunnel_failure(tunnel, exc):
    """Report which step failed, from ssh's own words; the exit status (1)."""
    said = "\n".join(tunnel.stderr_tail)
    failed_step, fix = "reach", "run ssh DESTINATION by hand to see what it wants"
    for pattern, step, advice in SSH_TROUBLES:
        if re.search(pattern, said):
            failed_step, fix = step, advice
            break
    for step, passed, failed in CHECK_STEPS:
        if step == failed_step:
            check_step(False, failed if said else f"{failed}: {exc}", fix)
            break
        check_step(True, passed)
    show_ssh_said(tunnel)
    return 1


def show_ssh_said(tunnel):
    for line in tunnel.stderr_tail:
        print(f"        ssh said: {line}")


def check_greeting(upstream, settings):
    """Read the far side's first line: an SMTP server says 220."""
    line = b""
    with gevent.Timeout(GREETING_WAIT, False):
        while not line.endswith(b"\n") and len(line) < 512:
            chunk = upstream.recv(512)
            if not chunk:
                break
            line += chunk
    text = line.decode("ascii", "replace").strip()
    if text.startswith("220"):
        check_step(True, f"the far side answered: {text[:200]}")
        try:
            upstream.sendall(b"QUIT\r\n")
        except OSError:
            pass
        return True
    if not line:
        return check_step(False, f"the far side said nothing at {settings.remote}",
                          f"nothing answers at {settings.remote} as seen from {settings.destination}: "
                          f"check --remote (e.g. localhost:25 or localhost:587)")
    return check_step(False, f"the far side does not speak SMTP: it said {text[:80]!r}",
                      f"check --remote: {settings.remote} is not an SMTP server")


# ---------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------

def docopt_usage():
    """The usage lines of the docstring."""
    return __doc__[__doc__.index("Usage:"):__doc__.index("Options:")].rstrip()


def main(argv=None):
    """Run minimail; return its exit status."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = docopt(__doc__, argv, version=f"minimail {__version__}")
    except DocoptExit as exc:
        complaint = str(exc).partition("\n")[0]
        print(f"minimail: {explain_usage_error(argv, complaint)}", file=sys.stderr)
        print(docopt_usage(), "Try 'minimail --help'.", sep="\n", file=sys.stderr)
        return 2
    try:
        return dispatch(args)
    except UsageError as exc:
        print(f"minimail: {exc}\nTry 'minimail --help'.", file=sys.stderr)
        return 2
    except Fatal as exc:
        print(f"minimail: {exc}", file=sys.stderr)
        return 1


def dispatch(args):
    """Run the command that args name."""
    pidfile = args["--pidfile"] or default_paths()[0]
    if args["stop"]:
        return stop(pidfile)
    if args["status"]:
        return status(pidfile, args["--json"])
    settings = Settings(args)
    if args["check"] and not settings.destination:
        raise UsageError("check tries ssh: it needs DESTINATION, not --tunnel-command")
    if args["check"]:
        logging.disable(logging.NOTSET if settings.verbose else logging.CRITICAL)
        log_to_stderr(settings.verbose)
        user = target_user(settings)
        if user is not None:              # ssh runs as the daemon's would: that user's keys
            preload()
            drop_privileges(user)
        return check(settings)
    if args["restart"] and running_pid(pidfile):
        stop(pidfile)
    return start(settings, foreground=args["--foreground"])


if __name__ == "__main__":
    sys.exit(main())
