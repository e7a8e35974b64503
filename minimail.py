#!/usr/bin/env python3
"""minimail: a local SMTP port that sends your mail through an SSH tunnel.

minimail listens on the local SMTP port.  When a mail client connects, it
starts `ssh -L ... DESTINATION` on demand, waits until the tunnel is up, and
splices the client's connection through it to the SMTP server that
DESTINATION reaches (--remote), so the mail leaves through your hoster.
Bytes a client sends early are never dropped.  When the tunnel cannot be
had, minimail answers the client itself, keeps the mail in its queue and
delivers it once the hoster can be reached.  --linger seconds (plus a random
0..--jitter) after the last client has gone, ssh is stopped again.

Usage:
  minimail stop [options]
  minimail status [--json] [options]
  minimail queue [--json] [options]
  minimail flush [options]
  minimail delete [options] ID...
  minimail sendmail [FLAG]... [--] [RECIPIENT]...
  minimail [start | restart | check | --foreground] [options] [-o OPT]...
           [DESTINATION | --tunnel-command=CMD]
  minimail -h | --help
  minimail --version

Commands:
  start     Detach into the background (also what a bare `minimail ...
            DESTINATION` does) and return once the daemon listens.
  stop      Stop the daemon and wait until it is gone.
  restart   Stop the daemon if it runs, then start it.
  status    Say whether the daemon runs, and what its tunnel, clients and
            queue do (exit 0 when it runs, 3 when it does not).
  check     Try the tunnel once, as the daemon would, and say what is wrong.
  queue     List the mail waiting in the queue, and what failed.
  flush     Ask the daemon to deliver the queue now.
  delete    Remove the queued or failed mail with these IDs (as `minimail
            queue` shows them), without a bounce; a running daemon forgets
            them at once.  Exit 1 if one is not there.
  sendmail  Submit one message from standard input, as sendmail(8) does:
            see "The sendmail command" below.
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
                            minimail takes its mail into the queue (or
                            answers 421 with --no-queue). [default: 30]
  --greeting-wait=SECONDS   Through a tunnel that was already up, the far
                            side must say its first word within this
                            long, or the tunnel is stale: minimail
                            replaces it and puts the client through the
                            new one; 0 turns this off. [default: 10]
  --idle-timeout=SECONDS    Close a client after this long without a byte
                            in either direction (or, in the queue, with
                            its replies unread; its message must come
                            within this plus 1 s for each 256 KiB the
                            queue takes, see --max-size); 0 means never.
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
  --queue=DIR               Where mail waits while the hoster cannot be
                            reached (see Files below).
  --no-queue                Keep no queue: answer 421 when the tunnel
                            cannot be had, as a plain relay would.
  --queue-lifetime=DAYS     Return mail to its sender when it could not be
                            delivered in this many days. [default: 5]
  --queue-retry=SECONDS     Try a queued mail again after this long, then
                            after twice as long each time, at most an
                            hour apart. [default: 60]
  --max-size=BYTES          The largest message the queue accepts.
                            [default: 52428800]
  --max-queue-size=BYTES    The queue takes no more mail (452) once the
                            messages waiting in it add up to this much:
                            1 GiB is twenty of the largest messages or a
                            hundred thousand of cron's, days of a busy
                            machine's mail, while a local user can no
                            longer fill the disk through it.  Nor does it
                            take mail that would leave less than 1 % of
                            its disk free (64 KiB to 64 MiB), the room for
                            its own writes (envelopes, bounces).
                            [default: 1073741824]
  -u USER, --user=USER      When started as root: the user to become once
                            the port is bound (default: $SUDO_USER).  To
                            keep root, say --user root.
  --pidfile=PATH            The daemon's pid file (see Files below).
  --logfile=PATH            The daemon's log file (see Files below).
  --config=FILE             The settings file (see Settings below).
  --idle-without-destination
                            Without DESTINATION (none in the settings
                            file yet), listen and queue mail but run no
                            tunnel, instead of stopping with a usage
                            error (minimail.service runs so).
  --json                    With status and queue: print JSON.
  -v, --verbose             Log debug messages too.
  -h, --help                Show this text.
  --version                 Show the version.

The tunnel: by default minimail runs "ssh -o BatchMode=yes -o
ExitOnForwardFailure=yes [--ssh's own arguments] -T [your -o options]
... -L SOCKET:REMOTE DESTINATION cat", then ServerAliveInterval=15,
ServerAliveCountMax=3, ControlMaster=no, ControlPath=none and
StreamLocalBindUnlink=yes (ssh takes the first value it is given, so
your -o can change the later ones but never the first two), where SOCKET
lies in a directory only minimail's user can enter.  The remote `cat` holds a
session open (ssh's stdin stays an open pipe): without a session OpenSSH
never turns on TCP_NODELAY and every mail stalls on Nagle's algorithm.  If
DESTINATION ends that session at once (a forced command, a restricted
shell), minimail falls back to "ssh -N" by itself.  The tunnel runs in a
process group of its own and dies with minimail.

The queue: when the tunnel cannot be had (ssh fails, it is not up in
time, or the far side closes without a word), minimail serves the SMTP
session itself and answers "250 2.0.0 queued as ID" once the mail is on
disk.  It delivers the queue through the tunnel when the tunnel comes up
for anyone, at each mail's next try (1, 2, 4 ... minutes), and on `minimail
flush` (or SIGUSR1).  What the hoster refuses for good, or what waited
longer than --queue-lifetime, goes back to its sender as a bounce.  Once
the queue holds --max-queue-size, or its disk is short, it answers 452 and
keeps what it has; nothing one message does (a full disk, a file removed by
hand) stops the daemon.  `minimail delete ID...` removes mail from the
queue.  One daemon at a time uses a queue (it holds QUEUE/lock).

Settings: `minimail start` and `minimail --foreground` without DESTINATION
take DESTINATION and options from a settings file, and the sendmail
command takes its settings from the same file.  It is --config, else
$MINIMAIL_CONFIG, else $XDG_CONFIG_HOME/minimail/minimail.conf
(~/.config/minimail/minimail.conf) if it exists, else
/etc/default/minimail.  It holds shell-style lines: MINIMAIL_DESTINATION
(user@hoster), MINIMAIL_OPTIONS (options, split as a shell would: --listen
there is where sendmail submits), MINIMAIL_SENDER (the envelope sender of
local mail), MINIMAIL_ADMIN (where mail to a local name such as root
goes) and MINIMAIL_ALIASES (the aliases file, /etc/aliases by default).
Values are read as a shell reads them: quotes, and a # that starts a word
begins a comment.  Options on the command line win over the file's.

The sendmail command: `minimail sendmail`, or minimail run under the name
sendmail (a symlink), reads one message from standard input and submits it
to the local minimail, which delivers or queues it; under the name mailq it
is `minimail queue`.  Flags as sendmail's: -t (recipients from To, Cc and
Bcc; Bcc removed), -i or -oi (a lone dot does not end the message), -f ADDR
or -r ADDR (envelope sender), -F NAME (full name), -B 8BITMIME|7BIT, -bm
(the default), -bp (list the queue), -bs (SMTP on standard input and
output), -q (flush), -v (show the SMTP dialogue); any other -o... and the
historic -L, -N, -R, -V, -X, -h and -C with their values are ignored.  When
minimail cannot be reached (nothing listens, or it goes away before its final
reply), the message waits in the queue's maildrop/ (the queue found as the
daemon finds it: --queue in the settings file's MINIMAIL_OPTIONS, else the
default) and minimail takes it in when it starts, on flush and every minute.
Exit status as sysexits.h: 0 accepted (or kept in the maildrop), 64 usage,
65 bad message, 67 every recipient refused, 69 refused for another reason,
75 try again later (minimail cannot be reached and there is no maildrop, or
it answered 4xx), 78 the settings are wrong.

Local mail: the sendmail command is the machine's MTA, and no address
leaves bare or at a name of this machine (localhost, the host name, its
FQDN, the mail name).  Local recipients are looked up in the aliases file
(aliases(5); chains followed, loops stopped; |command, /file and :include:
are never run or read); what stays local goes to MINIMAIL_ADMIN.  A local
sender (-f root@HOST too) becomes MINIMAIL_SENDER, else MINIMAIL_ADMIN, in
the envelope and in From, Sender and Reply-To; local addresses in To and
Cc become where the mail goes.  The mail name, for the Message-IDs the
command adds and the daemon's bounces, is /etc/mailname's if dotted (the
environment's MINIMAIL_MAILNAME names another file), else the FQDN if
dotted, else the domain of MINIMAIL_SENDER.  `newaliases` (a symlink) and
`sendmail -bi` check the aliases file: they print how many aliases it
holds and exit 0, or name each bad line and exit 1.

Files: as root, the pid file is /run/minimail/minimail.pid, the log
/var/log/minimail.log and the queue /var/spool/minimail; otherwise the pid
file is in $XDG_RUNTIME_DIR/minimail (or ~/.local/state/minimail), the log
in ~/.local/state/minimail and the queue in ~/.local/state/minimail/queue.
The state file that `status` reads lies beside the pid file.  In the
foreground, minimail logs to stderr and writes a pid file only when told
where (--pidfile).

Privileges: started as root, minimail binds the port, then becomes --user for
good before it runs ssh, so ssh uses that user's keys and known_hosts.  Under
systemd, minimail.service grants the port without root, and minimail.socket
hands over a bound socket (socket activation).  SIGHUP reopens the log file
and never stops minimail.

Stopping: SIGTERM or SIGINT stops accepting clients at once, lets active
sessions finish for up to --drain seconds, then closes them, stops ssh and
exits 0.  A second signal stops at once.

Exit status: 0 on a clean stop, 1 when minimail cannot run (for example the
listen address is taken), 2 for a usage error.
"""

import collections.abc
import contextlib
import enum
import errno
import fcntl
import io
import ipaddress
import logging
import math
import os
import pwd
import re
import resource
import select
import shlex
import signal
import socket
import stat
import sys
import time

# gevent, docopt and the mail modules are imported where they are used: the
# sendmail command (cron, mail(1)) must start fast and never loads them.

__version__ = "0.3.0"

log = logging.getLogger("minimail")

# Who owns what (one writer per piece of state):
#   Settings      the command line and the settings file, checked once.
#   Child         one launch of the tunnel command: its process group, stderr
#                 reader, endpoint, `died` event, and its non-blocking stop.
#   Supervisor    the tunnel's state (down, starting, up, stopping) and every
#                 Child; it alone writes them, deciding with decide().  Others
#                 post what they know (arrived, left, got through, stale).
#   Forwarder     the listening socket, the sessions, the splice pools and
#                 every 421; it hands a session it cannot pass on to the queue.
#   SmtpClient    one SMTP dialogue with a far side, for the queue runner and
#                 the sendmail command: the step it is in, each reply bounded
#                 and checked against that step, addresses as given, the one
#                 dot-stuffer (stdlib only).
#   Spool         the queue directory: durable writes, envelopes, failed/;
#                 QueueLock keeps a second daemon off it.
#   Receiver      serves one SMTP session itself, into the spool (within the
#                 runner's room_for: the queue's cap and its disk's reserve).
#   QueueRunner   delivers the spool through the tunnel, bounces what fails;
#                 it alone writes the spool's messages (one write at a time),
#                 its Schedule (on the monotonic clock) and `minimail delete`'s
#                 answers; every message has its own error boundary.
#   Maildrop      takes in, as hostile input, what the sendmail command left in
#                 the queue's maildrop/ while minimail was down.
#   daemon files  pid file (locked), state file, log file, privileges.
#   sendmail      the sendmail(8) command: stdlib only, no gevent; MailNames
#                 and Aliases address local mail as the machine's MTA.

#: Options ssh always gets right after its name; ssh keeps the first value it
#: is given, so neither --ssh's arguments nor -o can undo them.
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
#: What a client's early bytes are kept for, until the far side's first byte:
#: to replay them into a fresh tunnel or into the queue.
REPLAY_LIMIT = 64 * 1024

#: While a TCP tunnel starts, a waiting client tries to connect this often...
POLL_FAST = 0.005
#: ...for this long, as ssh is normally up by then...
POLL_FAST_FOR = 2.0
#: ...and then this often, so that many clients waiting on a slow start cost little.
POLL_SLOW = 0.05
#: How often a waiting client looks whether it has hung up meanwhile.
CLIENT_LOOK = 0.1

#: Seconds a stopping child gets for each step: stdin closed, SIGTERM, SIGKILL.
STOP_GRACE = 3.0
#: Backoff after the n-th tunnel start in a row that failed: 1, 2, 4 ... seconds.
BACKOFF_FIRST = 1.0
#: Longest backoff between two failed tunnel starts.
BACKOFF_MAX = 60.0
#: CLOCK_BOOTTIME ahead of CLOCK_MONOTONIC by more than this since the last
#: look: the machine was asleep.
SLEEP_NOTICED = 3.0
#: While a tunnel runs, the supervisor looks at the clocks at least this often.
SLEEP_LOOK_EVERY = 5.0
#: The longest an arriving client waits for the supervisor's step (it takes ms).
ARRIVAL_WAIT = 1.0
#: After a 421, how long minimail reads (and drops) what the client still sends,
#: so that closing does not reset the connection before the reply arrives.
REPLY_LINGER = 1.0
#: SMTP's limit for a reply line, CRLF included (RFC 5321, 4.5.3.1.5).
REPLY_MAX = 512
#: The listen backlog; the kernel caps it at net.core.somaxconn.
LISTEN_BACKLOG = 4096
#: Lines of the tunnel's stderr kept for `check` and the 421 reply.
STDERR_TAIL = 20
#: A line of the tunnel's stderr is cut to this many characters; the rest of
#: the line is read in pieces of STDERR_PIECE bytes and dropped.
STDERR_LINE_MAX = 300
STDERR_PIECE = 4096
#: Environment variables of a service manager that the tunnel must not inherit.
SERVICE_VARIABLES = ("NOTIFY_SOCKET", "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES")
#: prctl(2) operations: the parent-death signal; the ambient capability set.
PR_SET_PDEATHSIG = 1
PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL = 47, 4
#: The first file descriptor systemd passes with socket activation.
SD_LISTEN_FDS_START = 3
#: The open-files limit to aim for when the hard limit is unlimited.
OPEN_FILES_CAP = 1 << 20
#: Descriptors one client can hold: its socket, the tunnel's, two splice pipes.
FDS_PER_CLIENT = 6
#: Descriptors minimail needs besides its clients (log, listener, queue, ssh).
FDS_SPARE = 64
#: How long accepting pauses when minimail has run out of file descriptors.
ACCEPT_PAUSE = 0.1
#: Changes to the daemon's state within this many seconds make one write of the state file.
STATE_DELAY = 0.05
#: The most of a state or settings file minimail reads: they come from outside.
SMALL_FILE_MAX = 64 * 1024
#: `minimail stop` waits for the daemon's drain plus this, then kills it.
STOP_MARGIN = 15.0
#: The drain `stop` assumes when the daemon's state file does not say.
DEFAULT_DRAIN = 10.0
#: How long `minimail check` waits for the far side's greeting.
CHECK_GREETING_WAIT = 10.0
#: The settings file of the service, and of root's sendmail command (cron's).
ROOT_SETTINGS = "/etc/default/minimail"
#: The aliases file (aliases(5)) the sendmail command reads, unless MINIMAIL_ALIASES says.
DEFAULT_ALIASES = "/etc/aliases"
#: The file that names this machine's mail domain; $MINIMAIL_MAILNAME names another.
MAILNAME_FILE = "/etc/mailname"
#: The longest Unix socket path (sun_path holds 108 bytes with the final NUL).
SOCKET_PATH_MAX = 107


class UsageError(Exception):
    """A mistake on the command line: reported in one line, exit status 2."""


class Fatal(Exception):
    """minimail cannot run (e.g. the listen address is taken): exit status 1."""


class SettingsRefused(UsageError):
    """A settings file root must not read: one line, exit 2 (78 for sendmail)."""


class TunnelUnavailable(Exception):
    """The tunnel cannot carry this client; the text goes into the 421 reply."""


class ClientGone(Exception):
    """The client hung up before the tunnel was up."""


class OutOfDescriptors(Exception):
    """minimail has no file descriptor left for this client (EMFILE, ENFILE)."""


def out_of_descriptors(exc):
    return isinstance(exc, OSError) and exc.errno in (errno.EMFILE, errno.ENFILE)


# ---------------------------------------------------------------------------
# Parsing the command line and the settings file
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


def parse_seconds(text, what, least=0.0, zero_ok=True):
    """Return text as a number of seconds: 0 (if zero_ok) or at least `least`."""
    try:
        seconds = float(text)
    except ValueError:
        raise UsageError(f"{what}: {text!r} is not a number of seconds") from None
    if not 0 <= seconds < float("inf"):
        raise UsageError(f"{what}: {text!r} must be zero or more seconds")
    if seconds == 0 and not zero_ok:
        raise UsageError(f"{what}: {text!r} must be more than 0 seconds")
    if 0 < seconds < least:
        raise UsageError(f"{what}: {text!r} is too short: 0, or at least {least:g} s")
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
    """{name: (canonical name, takes a value)} for every option of the docstring."""
    table = {}
    for line in __doc__.partition("Options:")[2].splitlines():
        head = line.strip().split("  ")[0]
        if head.startswith("-"):
            names = re.findall(r"(--?[\w-]+)([= ]\w+)?", head)
            for name, value in names:
                table[name] = (names[-1][0], bool(value))
    return table


#: The docstring's command words (a positional word that is not DESTINATION).
COMMANDS = ("start", "stop", "status", "restart", "check", "queue", "flush", "delete", "sendmail")


def split_argv(argv):
    """Split argv into [(canonical option, value or None)] and positional words;
    raise UsageError for an option the docstring does not define."""
    known, options, positional = option_table(), [], []
    words = iter(argv)
    for word in words:
        if not word.startswith("-") or word == "-":
            positional.append(word)
            continue
        name, equals, value = word.partition("=") if word.startswith("--") else (word[:2], "", word[2:])
        if name not in known:
            raise UsageError(f"unknown option {printable(name, 100)}")
        canonical, takes_value = known[name]
        if takes_value and not (equals or value):
            value = next(words, None)
        options.append((canonical, value if takes_value else None))
    return options, positional


def explain_usage_error(argv, complaint):
    """Say in one line what is wrong with argv, which docopt has rejected."""
    try:
        options, positional = split_argv(argv)
    except UsageError as exc:
        return str(exc)
    given = {name for name, _ in options}
    twice = [name for name in given if name != "-o" and
             sum(1 for other, _ in options if other == name) > 1]
    if twice:
        return f"{twice[0]} is given twice"
    if complaint and not complaint.startswith(("Warning:", "Usage:")):
        return complaint    # e.g. "--listen requires argument" (docopt 0.6.2: just the usage)
    positional = [w for w in positional if w not in COMMANDS]
    if positional and "--tunnel-command" in given:
        return "give DESTINATION or --tunnel-command, not both"
    if len(positional) > 1:
        return f"unexpected argument {positional[1]!r}"
    return "these arguments fit none of the usage lines below"


def merge_settings_file(argv, settings_file):
    """argv with the settings file's options before it and its DESTINATION after
    it, when argv names no DESTINATION and no --tunnel-command.  An option on
    the command line replaces the file's (but -o adds to them)."""
    options, positional = split_argv(argv)
    if any(w not in COMMANDS for w in positional) or \
            any(name == "--tunnel-command" for name, _ in options):
        return argv
    given = {name for name, _ in options if name != "-o"}
    words = []
    for name, value in split_argv(settings_file.options)[0]:
        if name not in given:
            words += [name] if value is None else [name, value]
    return words + list(argv) + ([settings_file.destination] if settings_file.destination else [])


def shell_words(text):
    """The words a POSIX shell makes of one line: quotes ('...', "..." with its
    backslash escapes) and backslashes removed, and a comment from a # that
    starts a word (not one inside a word, as shlex would have it).  ValueError
    for an unterminated quote."""
    words, word, i, started = [], [], 0, False
    while i < len(text):
        c = text[i]
        if c in " \t":
            if started:
                words.append("".join(word))
            word, started = [], False
        elif c == "#" and not started:
            break
        elif c == "'":
            end = text.find("'", i + 1)
            if end < 0:
                raise ValueError("no closing quotation (')")
            word.append(text[i + 1:end])
            i, started = end, True
        elif c == '"':
            i = double_quoted(text, i + 1, word)
            started = True
        elif c == "\\" and i + 1 < len(text):
            word.append(text[i + 1])
            i, started = i + 1, True
        else:
            word.append(c)
            started = True
        i += 1
    return words + (["".join(word)] if started else [])


def double_quoted(text, i, word):
    """Read a "..." word part from text[i] on into word; the closing quote's index."""
    while i < len(text):
        c = text[i]
        if c == '"':
            return i
        if c == "\\" and i + 1 < len(text) and text[i + 1] in '"\\$`':
            i += 1
            c = text[i]
        word.append(c)
        i += 1
    raise ValueError('no closing quotation (")')


def settings_value(key, raw):
    """A settings file's value as a shell reads it.  MINIMAIL_OPTIONS is a list
    of words, returned quoted (shlex.join): written unquoted, the value's own
    words; written as one quoted string, that string split again."""
    words = shell_words(raw)
    if key != "MINIMAIL_OPTIONS":
        return " ".join(words)
    if len(words) == 1 and raw.lstrip()[:1] in ("'", '"'):
        words = shlex.split(words[0])
    return shlex.join(words)


class SettingsFile:
    """The settings shared by the daemon and the sendmail command: a file of
    shell-style KEY=VALUE lines (what systemd's EnvironmentFile= reads too)."""

    KEYS = ("MINIMAIL_DESTINATION", "MINIMAIL_OPTIONS", "MINIMAIL_SENDER", "MINIMAIL_ADMIN",
            "MINIMAIL_ALIASES")

    def __init__(self, path=None, values=None):
        self.path = path
        values = values or {}
        self.destination = values.get("MINIMAIL_DESTINATION") or None
        self.sender = values.get("MINIMAIL_SENDER") or None
        self.admin = values.get("MINIMAIL_ADMIN") or None
        self.aliases = values.get("MINIMAIL_ALIASES") or DEFAULT_ALIASES
        options = values.get("MINIMAIL_OPTIONS", "")
        try:
            self.options = shlex.split(options)
        except ValueError as exc:
            raise UsageError(f"{path}: MINIMAIL_OPTIONS: {exc}") from None

    @classmethod
    def find(cls, explicit=None):
        """The settings file in force (see Settings in the docstring); an empty
        one when there is none."""
        path = explicit or os.environ.get("MINIMAIL_CONFIG")
        if not path:
            config_home = os.environ.get("XDG_CONFIG_HOME") or os.path.expanduser("~/.config")
            own = os.path.join(config_home, "minimail", "minimail.conf")
            path = own if os.geteuid() != 0 and os.path.exists(own) else "/etc/default/minimail"
            if not os.path.exists(path):
                return cls()
        return cls.read(path)

    @classmethod
    def read(cls, path):
        try:
            with open(path, "rb") as f:
                if os.geteuid() == 0:
                    refuse_unsafe_settings(path, os.fstat(f.fileno()))
                text = f.read(SMALL_FILE_MAX + 1)
        except OSError as exc:
            raise UsageError(f"cannot read the settings file {path}: {exc.strerror}") from None
        if len(text) > SMALL_FILE_MAX:
            raise UsageError(f"{path}: larger than {SMALL_FILE_MAX} bytes: not a settings file")
        values = {}
        for number, line in enumerate(text.decode("utf-8", "replace").splitlines(), 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            key, equals, value = line.removeprefix("export ").partition("=")
            key, value = key.strip(), value.strip()
            if not equals or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
                raise UsageError(f"{path}:{number}: not a KEY=VALUE line")
            if key.startswith("MINIMAIL_") and key not in cls.KEYS:
                raise UsageError(f"{path}:{number}: unknown setting {key} "
                                 f"(known: {', '.join(cls.KEYS)})")
            try:
                value = settings_value(key, value)
            except ValueError as exc:
                raise UsageError(f"{path}:{number}: {key}: {exc}") from None
            values[key] = value
        return cls(path, values)

    def check_options(self):
        """UsageError naming the file if MINIMAIL_OPTIONS holds an unknown option,
        or one without its value (the sendmail command reads it in pieces, later:
        a 78 there, not a 70, nor --queue's value silently taken for the default)."""
        try:
            options, _ = split_argv(self.options)
            table = option_table()
            missing = next((name for name, value in options if value is None and table[name][1]),
                           None)
            if missing:
                raise UsageError(f"{missing} needs a value")
        except UsageError as exc:
            raise UsageError(f"{self.path}: MINIMAIL_OPTIONS: {exc}") from None

    def option(self, name):
        """The last value MINIMAIL_OPTIONS gives an option (canonical name), or None."""
        found = None
        for option, value in split_argv(self.options)[0]:
            if option == name:
                found = value
        return found

    def listen(self):
        """Where the daemon listens, as the file's MINIMAIL_OPTIONS say."""
        return parse_listen(self.option("--listen") or "127.0.0.1:25")


def refuse_unsafe_settings(path, st):
    """As root, a settings file must be root's, and neither it nor its directory
    writable by anyone else: it names commands root runs (--tunnel-command,
    --ssh).  /dev/null, which holds no settings, will do."""
    if stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(1, 3):
        return
    shown = printable(os.fspath(path), 200)
    where = [(f"the settings file {shown}", st)]
    for directory in dict.fromkeys((os.path.dirname(os.path.abspath(path)),
                                    os.path.dirname(os.path.realpath(path)))):
        where.append((f"the directory of the settings file {shown} ({printable(directory, 200)})",
                      os.stat(directory)))
    for what, st in where:
        if st.st_uid != 0:
            raise SettingsRefused(f"{what} belongs to {owner_name(st.st_uid)}, not root: root "
                                  f"would run the commands it names; make it root's")
        if st.st_mode & 0o022:
            raise SettingsRefused(f"{what} may be written by others (mode "
                                  f"{stat.S_IMODE(st.st_mode):04o}): root would run the "
                                  f"commands it names; make it writable by root alone")


class Settings:
    """Everything the command line says, checked once, before anything starts."""

    def __init__(self, args, settings_file=None):
        settings_file = settings_file or SettingsFile()
        self.admin = settings_file.admin            # told of bounces nobody else takes
        self.mail_name = MailNames(settings_file).mail_name()   # for bounces
        self.listen = parse_listen(args["--listen"])
        self.tunnel_port = args["--tunnel-port"] and parse_port(args["--tunnel-port"], "--tunnel-port")
        self.remote = parse_remote(args["--remote"])
        self.linger = parse_seconds(args["--linger"], "--linger")
        self.jitter = parse_seconds(args["--jitter"], "--jitter")
        self.wait = parse_seconds(args["--wait"], "--wait", zero_ok=False)
        self.greeting_wait = parse_seconds(args["--greeting-wait"], "--greeting-wait")
        self.idle_timeout = parse_seconds(args["--idle-timeout"], "--idle-timeout", least=0.1)
        self.max_clients = parse_count(args["--max-clients"], "--max-clients")
        self.drain = parse_seconds(args["--drain"], "--drain")
        self.ssh = parse_command(args["--ssh"], "--ssh")
        self.ssh_options = args["-o"]
        self.session = not args["--no-session"]
        self.verbose = args["--verbose"]
        self.user = args["--user"]
        self.pidfile = args["--pidfile"] and os.path.abspath(args["--pidfile"])
        self.logfile = args["--logfile"] and os.path.abspath(args["--logfile"])
        self.queue = None if args["--no-queue"] else \
            os.path.abspath(args["--queue"] or default_paths().queue)
        self.queue_lifetime = parse_seconds(args["--queue-lifetime"], "--queue-lifetime",
                                            zero_ok=False) * 86400
        self.queue_retry = parse_seconds(args["--queue-retry"], "--queue-retry", zero_ok=False)
        self.max_size = parse_count(args["--max-size"], "--max-size")
        self.max_queue_size = parse_count(args["--max-queue-size"], "--max-queue-size")
        self.destination = args["DESTINATION"] if args["DESTINATION"] is None \
            else parse_destination(args["DESTINATION"])
        self.tunnel_command = args["--tunnel-command"] and parse_command(
            args["--tunnel-command"], "--tunnel-command")
        self.idle = None                  # or why there is no tunnel
        if not self.destination and not self.tunnel_command:
            if not args.get("--idle-without-destination"):
                raise UsageError("DESTINATION is missing: the ssh destination, [user@]host "
                                 "(or MINIMAIL_DESTINATION in the settings file)")
            self.idle = f"MINIMAIL_DESTINATION is not set in {settings_file.path or 'a settings file'}"
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

    def describe_tunnel(self):
        """How the tunnel is made, for the start-up line."""
        if self.tunnel_command:
            return f"{shlex.join(self.tunnel_command)} on 127.0.0.1:{self.tunnel_port}"
        if self.idle:
            return "none"
        return f"ssh {self.destination} to {self.remote}"



def ssh_argv(ssh, options, forward, destination, session):
    """Build ssh's argv: the forced options right after the program's name (so
    nothing the user gives comes first), --ssh's own arguments, the user's -o,
    the defaults, -L, and the session."""
    argv = [ssh[0]]
    for option in SSH_FORCED_OPTIONS:
        argv += ["-o", option]
    argv += list(ssh[1:]) + ["-T"]
    for option in (*options, *SSH_DEFAULT_OPTIONS):
        argv += ["-o", option]
    argv += ["-L", forward]
    if not session:
        argv.append("-N")
    argv.append(destination)
    if session:
        argv.append(SESSION_COMMAND)
    return argv


# ---------------------------------------------------------------------------
# Text from outside: ssh's stderr, the far side's words, files
# ---------------------------------------------------------------------------

def printable(raw, limit):
    """Text safe for a log line, an SMTP reply or a terminal: at most `limit`
    characters, with line breaks, escape codes and every other unprintable
    character escaped (so nothing from outside can forge a line or move a
    cursor)."""
    if isinstance(raw, bytes):
        raw = raw[:limit * 4].decode("utf-8", "replace")
    text = "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii")
                   for c in raw.strip()[:limit])
    return text[:limit]


def smtp_reply_line(text):
    """One SMTP reply line, CRLF included, of at most REPLY_MAX bytes."""
    line = printable(text, REPLY_MAX).encode("ascii", "replace")[:REPLY_MAX - 2]
    return line + b"\r\n"


def describe_exit(code):
    """'exited with code 255' or 'killed by SIGKILL'."""
    if code is not None and code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with code {code}"


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


def most_telling(lines):
    """Of what the tunnel said, the line that best says why it failed: the
    first that names a known trouble, else the first (not the last: after a
    bad argument that would be the last line of ssh's usage text)."""
    for line in lines:
        if any(re.search(pattern, line) for pattern, _, _ in SSH_TROUBLES):
            return line
    return lines[0] if lines else None


# ---------------------------------------------------------------------------
# The tunnel: one Child per launch, one Supervisor over them
# ---------------------------------------------------------------------------

class Phase(enum.Enum):
    """The tunnel's state, as the supervisor keeps it."""
    DOWN = "down"              # no child
    STARTING = "starting"      # a child runs, its forward is not known to work yet
    UP = "up"                  # the forward works
    STOPPING = "stopping"      # no current child; an old one is being stopped


class Action(enum.Enum):
    NOTHING = "nothing"
    LAUNCH = "launch"                        # start a child for the waiting clients
    GIVE_UP = "give up"                      # the child was not up within --wait
    STOP = "stop"                            # the countdown ran out
    START_COUNTDOWN = "start countdown"      # the last client has gone
    CANCEL_COUNTDOWN = "cancel countdown"    # a client came


#: What decide() looks at: the supervisor's state, its clients and its timers.
Facts = collections.namedtuple(
    "Facts", "now phase clients launched_at countdown_ends retry_at closing endpoint_busy")
#: What decide() says: one action, and when to look again (None: only when told).
Plan = collections.namedtuple("Plan", "action wake_at")


def earliest(first, second):
    """The earlier of two moments that may be unset (None: no timer)."""
    if first is None or (second is not None and second < first):
        return second
    return first


def decide(facts, wait):
    """The supervisor's next step; a pure function of (state, clients, timers,
    now), so that every transition is a unit test."""
    f = facts
    if f.phase in (Phase.DOWN, Phase.STOPPING):
        if not f.clients or f.closing or f.endpoint_busy:
            return Plan(Action.NOTHING, None)
        if f.now < f.retry_at:
            return Plan(Action.NOTHING, f.retry_at)          # backing off
        return Plan(Action.LAUNCH, None)
    start_deadline = f.launched_at + wait if f.phase is Phase.STARTING else None
    if start_deadline is not None and f.now >= start_deadline:
        return Plan(Action.GIVE_UP, None)
    if f.clients:
        cancel = f.countdown_ends is not None
        return Plan(Action.CANCEL_COUNTDOWN if cancel else Action.NOTHING, start_deadline)
    if f.countdown_ends is None:
        return Plan(Action.START_COUNTDOWN, start_deadline)
    if f.now >= f.countdown_ends:
        return Plan(Action.STOP, None)
    return Plan(Action.NOTHING, earliest(f.countdown_ends, start_deadline))


class Verdict(enum.Enum):
    STOPPED = "stopped"            # minimail stopped it
    NO_SESSION = "no session"      # the account may run no command: use ssh -N
    DIED = "died"                  # it worked, then ended by itself
    FAILED = "failed"              # it never worked: a failed start


def judge_exit(code, stopped, was_up, session):
    """Why a child ended, from its exit status and what minimail knows."""
    if stopped:
        return Verdict.STOPPED
    if session and code is not None and 0 <= code != SSH_ERROR_STATUS:
        return Verdict.NO_SESSION
    return Verdict.DIED if was_up else Verdict.FAILED


def backoff(failures, first=BACKOFF_FIRST, most=BACKOFF_MAX):
    """Seconds to wait after the n-th failed start in a row: 1, 2, 4 ... most."""
    return min(most, first * 2 ** (failures - 1))


def boottime():
    """CLOCK_BOOTTIME, which runs on while the machine sleeps (Linux)."""
    return time.clock_gettime(getattr(time, "CLOCK_BOOTTIME", time.CLOCK_MONOTONIC))


class SleepWatch:
    """Notices that the machine slept: CLOCK_BOOTTIME runs on during suspend,
    CLOCK_MONOTONIC (and every libev timer) stands still."""

    def __init__(self, clocks=(time.monotonic, boottime)):
        self.clocks = clocks
        self.offset = self.read()

    def read(self):
        monotonic, boot = self.clocks
        return boot() - monotonic()

    def slept(self):
        """Seconds asleep since the last look, or 0 when not noticeably."""
        offset = self.read()
        asleep, self.offset = offset - self.offset, offset
        return asleep if asleep > SLEEP_NOTICED else 0.0

    def slept_since(self):
        """Whether the next look will find that the machine slept (a peek)."""
        return self.read() - self.offset > SLEEP_NOTICED


def child_environment():
    """The environment for the tunnel child: ours, without the service manager's."""
    return {k: v for k, v in os.environ.items() if k not in SERVICE_VARIABLES}


def signal_group(pgid, signum):
    """Signal a process group that may be gone already."""
    try:
        os.killpg(pgid, signum)
    except (ProcessLookupError, PermissionError):
        pass


def exited(pid):
    """True once pid has exited: gone, or a zombie not yet reaped (Linux)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rpartition(b")")[2].split()[0] == b"Z"
    except (OSError, IndexError):
        return True


def dies_with(parent, prctl):
    """A preexec function: the child gets SIGKILL when minimail dies (even by
    kill -9), and ends at once if minimail has died already."""
    def preexec():
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:
            os._exit(1)
    return preexec


def libc_function(name):
    """A libc function through ctypes (resolved before forks and privilege drops)."""
    import ctypes
    return getattr(ctypes.CDLL(None, use_errno=True), name)


class Child:
    """One launch of the tunnel command: its process group, its stderr, its
    own endpoint, its `died` event, and a stop that never blocks.

    The supervisor alone calls launch() and stop() and writes `phase`; the
    child's own watcher greenlet reaps it and then calls on_exit(child)."""

    def __init__(self, argv, endpoint, session, grace, on_exit):
        from gevent.event import Event
        self.argv = argv
        self.endpoint = endpoint        # this launch's Unix socket path, or a TCP port
        self.session = session          # holds a remote `cat` open (ssh's stdin)
        self.grace = grace
        self.on_exit = on_exit
        self.proc = None
        self.pid = None
        self.phase = Phase.STARTING
        self.launched_at = None
        self.stop_reason = None         # set when minimail stops it
        self.returncode = None
        self.said = collections.deque(maxlen=STDERR_TAIL)   # its stderr, sanitized
        self.died = Event()             # set when it is gone: its sessions are too
        self.timers = []                # a stop's later steps
        self.far = Flow()               # bytes the far side sent through it, to anyone

    @property
    def announces_up(self):
        """A Unix socket appears only once ssh listens: no need to connect to know."""
        return isinstance(self.endpoint, str)

    def launch(self, now, prctl):
        """Start the process in a new session (its own process group) that dies
        with minimail; raises OSError if it cannot run."""
        from gevent import spawn, subprocess
        self.forget_endpoint()
        self.proc = subprocess.Popen(
            self.argv, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, start_new_session=True, env=child_environment(),
            preexec_fn=dies_with(os.getpid(), prctl))
        self.pid, self.launched_at = self.proc.pid, now
        spawn(self.watch)

    def listening(self):
        """True once the child's Unix socket is there (ssh made it: it listens)."""
        try:
            return stat.S_ISSOCK(os.stat(self.endpoint).st_mode)
        except OSError:
            return False

    def try_connect(self):
        """A connection through this child, or None while nothing accepts there."""
        import gevent.socket
        try:
            if self.announces_up:
                sock, address = gevent.socket.socket(socket.AF_UNIX), self.endpoint
            else:
                sock, address = gevent.socket.socket(socket.AF_INET), ("127.0.0.1", self.endpoint)
        except OSError as exc:
            if out_of_descriptors(exc):
                raise OutOfDescriptors() from None
            raise
        try:
            sock.connect(address)
        except (ConnectionRefusedError, FileNotFoundError):
            sock.close()
            return None
        except OSError as exc:
            sock.close()
            if out_of_descriptors(exc):
                raise OutOfDescriptors() from None
            raise TunnelUnavailable(f"cannot connect to the tunnel: {exc.strerror}") from None
        if sock.family == socket.AF_INET:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    def gone(self):
        """True once the process has ended (its `died` may not be set yet)."""
        return self.died.is_set() or self.stop_reason is not None or exited(self.pid)

    def stop(self, reason, gentle=True):
        """Begin to stop, and return at once.  Gently: close ssh's stdin (which
        ends the remote `cat` and ssh with it), SIGTERM the group after a grace,
        SIGKILL it after another.  Otherwise (a stale tunnel, whose ssh would
        wait for its frozen server forever) SIGTERM at once.  A child already
        reaped (its watcher still waits for its stderr) gets no signal and no
        timer: its process group may be someone else's by now."""
        from gevent import spawn_later
        if self.stop_reason is not None:
            return
        self.stop_reason = reason
        self.forget_endpoint()          # no new client reaches a dying tunnel
        if self.returncode is not None:
            return
        steps = [lambda: signal_group(self.pid, signal.SIGTERM),
                 lambda: signal_group(self.pid, signal.SIGKILL)]
        if gentle and self.session:
            steps.insert(0, self.proc.stdin.close)
        steps[0]()
        self.timers = [spawn_later(self.grace * i, step) for i, step in enumerate(steps[1:], 1)]

    def watch(self):
        """Read stderr, reap the process, kill what is left of its group, then
        tell the supervisor."""
        from gevent import spawn
        reader = spawn(self.read_stderr)
        self.returncode = self.proc.wait()         # from now on stop() sets no timer
        signal_group(self.pid, signal.SIGKILL)     # grandchildren die with it
        for timer in self.timers:
            timer.kill()
        reader.join(timeout=self.grace)            # stderr ends when the group is gone
        reader.kill()
        self.proc.stdin.close()
        self.proc.stderr.close()
        self.forget_endpoint()
        self.died.set()
        self.on_exit(self)

    def read_stderr(self):
        """Log the child's stderr, line by line, in bounded pieces: the first
        STDERR_LINE_MAX characters of a line are kept (escaped), the rest is
        read and dropped without ever being held whole."""
        name = os.path.basename(self.argv[0])
        stream = self.proc.stderr
        while True:
            line = piece = stream.readline(STDERR_PIECE)
            if not piece:
                return
            while not piece.endswith(b"\n"):
                piece = stream.readline(STDERR_PIECE)
                if not piece:
                    break
            text = printable(line, STDERR_LINE_MAX)
            if text:
                self.said.append(text)
                log.warning("%s[%d]: %s", name, self.pid, text)

    def forget_endpoint(self):
        """Remove this launch's Unix socket, if it is there."""
        if self.announces_up and os.path.lexists(self.endpoint):
            try:
                os.unlink(self.endpoint)
            except OSError:
                pass


class Supervisor:
    """Owns the tunnel: its state and every child.  One greenlet (run) is the
    only writer; clients and the queue runner post what they know (arrived,
    left, got through, stale) and wait on `changed`, an Event replaced at each
    change.  No step blocks: stopping a child is a timed state, like starting."""

    def __init__(self, settings, endpoints, on_change=lambda: None, on_up=lambda: None,
                 grace=STOP_GRACE, backoff_first=BACKOFF_FIRST, backoff_max=BACKOFF_MAX,
                 clocks=(time.monotonic, boottime), rng=None):
        import random
        from gevent import get_hub
        from gevent.event import Event
        self.settings = settings
        self.endpoints = endpoints        # launch number -> its endpoint
        self.on_change = on_change        # e.g. the state file's writer
        self.on_up = on_up                # e.g. the queue runner
        self.grace = grace
        self.backoff_first, self.backoff_max = backoff_first, backoff_max
        self.clock = clocks[0]
        self.sleep_watch = SleepWatch(clocks)
        self.rng = rng or random.Random()
        self.prctl = libc_function("prctl")
        self.session = settings.session and not settings.tunnel_command
        self.shared_endpoint = bool(settings.tunnel_port)   # TCP: one port for all launches
        self.child = None                 # the current launch, starting or up
        self.retiring = set()             # children being stopped
        self.last_child = None            # for `check`: what the last one said
        self.launches = 0
        self.clients = 0
        self.countdown_ends = None
        self.failures = 0                 # failed starts in a row
        self.retry_at = 0.0               # no start before this (backoff)
        self.error = None                 # why the last start failed
        self.last_exit = None
        self.closing = False              # minimail is stopping: no new child
        self.inbox = collections.deque()
        self.wake = Event()
        self.alarm, self.alarm_at = get_hub().loop.timer(0), None   # see set_alarm
        self.changed = Event()
        self.stepped = Event()            # set (and replaced) after each of its steps
        self.all_gone = Event()           # set when closing and no child is left

    # -- what others see and post -------------------------------------------

    @property
    def phase(self):
        if self.child is not None:
            return self.child.phase
        return Phase.STOPPING if self.retiring else Phase.DOWN

    def post(self, *message):
        self.inbox.append(message)
        self.wake.set()

    def arrived(self):
        """A client needs the tunnel: start it, or cancel the countdown.  While
        the tunnel is up, the supervisor need not wake for it: it learns of it
        at its next step (the client's leaving, at the latest), unless the
        clocks say the machine slept."""
        self.inbox.append(("arrived",))
        child = self.child
        if child is None or child.phase is not Phase.UP or self.sleep_watch.slept_since():
            self.wake.set()

    def visit(self):
        """The one way for a client (a session, the queue runner, `check`) to use
        the tunnel: `with supervisor.visit() as tunnel: tunnel.connect(...)`."""
        return Visit(self)

    def arrive(self):
        """arrived(), and when the supervisor has something to judge first (no
        tunnel up, or the machine slept), let it step before the client goes on:
        the first client after a suspend connects on its verdict on the old
        tunnel, not on the state from before."""
        stepped = self.stepped
        self.arrived()
        if self.wake.is_set():
            stepped.wait(timeout=ARRIVAL_WAIT)

    def left(self):
        """A client is done with the tunnel; the last one starts the countdown.
        With no tunnel there is no countdown: the supervisor learns of it at
        its next step."""
        self.inbox.append(("left",))
        if self.child is not None:
            self.wake.set()

    def report_stale(self, child):
        """A client found this child silent: replace it."""
        self.post("stale", child)

    def flush(self):
        """The queue is to be delivered now: end the backoff."""
        self.post("flush")

    def close(self):
        """minimail is stopping: start no child, fail clients who wait."""
        self.post("close")

    def stop_all(self):
        """Stop every child (after the drain); all_gone is set when they are."""
        self.post("stop all")

    def connect(self, wait, exclude=None, abandoned=None):
        """(connection, child) through the tunnel, waiting up to `wait` seconds
        for it; never through `exclude` (a child found stale).  Raises
        TunnelUnavailable while the tunnel cannot be had (a failed start,
        backoff, minimail stopping, not up in time), ClientGone as soon as
        abandoned() says nobody needs the connection any more."""
        started = self.clock()
        deadline, refused = started + wait, False
        while True:
            changed, child = self.changed, self.child
            if child is not None and child is not exclude and (
                    child.phase is Phase.UP or not child.announces_up):
                upstream = child.try_connect()
                if upstream is not None:
                    if child.phase is not Phase.UP:
                        self.post("through", child)
                    return upstream, child
                refused = True
            self.raise_if_unavailable(exclude)
            if abandoned is not None and abandoned():
                raise ClientGone()
            left = deadline - self.clock()
            if left <= 0:
                raise TunnelUnavailable(f"the tunnel was not up within {wait:g} s")
            changed.wait(min(self.pause(child, started, refused), left))

    def pause(self, child, started, refused):
        """How long connect() waits before it looks again (a change wakes it sooner)."""
        if child is not None and (refused or not child.announces_up):
            return POLL_FAST if self.clock() - started < POLL_FAST_FOR else POLL_SLOW
        return CLIENT_LOOK

    def raise_if_unavailable(self, exclude=None):
        child = self.child if self.child is not exclude else None
        if self.closing:
            raise TunnelUnavailable("minimail is stopping")
        if self.settings.idle:
            raise TunnelUnavailable(f"idle: {self.settings.idle}")
        left = self.retry_at - self.clock()
        if child is None and left > 0:
            raise TunnelUnavailable(f"{self.error}; next try in {math.ceil(left)} s")

    def describe(self):
        """The tunnel's state for `minimail status`."""
        child, now = self.child, self.clock()
        return {
            "state": self.phase.value,
            "pid": child.pid if child else None,
            "since": wall_clock(child.launched_at, now) if child else None,
            "stops_at": wall_clock(self.countdown_ends, now),
            "session": self.session,
            "failures": self.failures,
            "retry_at": wall_clock(self.retry_at, now) if self.retry_at > now else None,
            "last_error": self.error,
            "idle": self.settings.idle,
        }

    # -- the supervisor greenlet --------------------------------------------

    def run(self):
        try:
            while True:
                self.wake.clear()
                now = self.clock()
                while self.inbox:
                    self.take(self.inbox.popleft(), now)
                self.set_alarm(self.step(now), now)
                stepped, self.stepped = self.stepped, type(self.stepped)()
                stepped.set()
                self.wake.wait()
        finally:
            self.alarm.close()

    def set_alarm(self, wake_at, now):
        """Ring at wake_at (None: no need).  One timer, set again only when it
        must ring sooner: an early ring costs one needless step, a new timer
        for every client that comes and goes would cost more."""
        if wake_at is None or (self.alarm.active and self.alarm_at <= wake_at):
            return
        self.alarm.close()
        self.alarm_at = wake_at
        self.alarm = self.alarm.loop.timer(max(0.0, wake_at - now))
        self.alarm.start(self.wake.set)

    def take(self, message, now):
        """Apply one message a client, a child or minimail posted."""
        kind, *rest = message
        if kind in ("arrived", "left"):
            self.clients += 1 if kind == "arrived" else -1
            if kind == "arrived" and self.countdown_ends is not None:
                self.countdown_ends = None  # even if it has left again since
                log.debug("countdown cancelled: a client arrived")
            self.on_change()                # waiting clients need not wake
            return
        if kind == "through" and rest[0] is self.child:
            self.mark_up(rest[0], now)
        elif kind == "stale" and rest[0] is self.child:
            log.warning("tunnel (pid %d) is stale: the far side said nothing for %g s; "
                        "replacing it", rest[0].pid, self.settings.greeting_wait)
            self.retire(rest[0], "stale: the far side went silent", gentle=False)
        elif kind == "exited":
            self.reaped(rest[0], now)
        elif kind == "flush":
            self.retry_at = 0.0
        elif kind == "close":
            self.closing = True
        elif kind == "stop all":
            self.closing = True
            if self.child is not None:
                self.retire(self.child, "minimail is stopping")
        self.notify()

    def step(self, now):
        """Do what decide() says until it says nothing; the next wake-up."""
        self.notice_sleep(now)
        child = self.child
        if child is not None and child.phase is Phase.STARTING and child.announces_up \
                and child.listening():
            self.mark_up(child, now)
        for _ in range(8):                 # each action changes the facts
            plan = decide(self.facts(now), self.settings.wait)
            if plan.action is Action.NOTHING:
                break
            self.act(plan.action, now)
        if self.closing and self.child is None and not self.retiring:
            self.all_gone.set()
        return earliest(plan.wake_at, self.polling(now))

    def facts(self, now):
        child = self.child
        return Facts(now, self.phase, self.clients, child and child.launched_at,
                     self.countdown_ends, self.retry_at, self.closing or bool(self.settings.idle),
                     self.shared_endpoint and bool(self.retiring))

    def polling(self, now):
        """While a child runs: look for its socket (starting), and at the clocks."""
        if self.child is None:
            return None
        if self.child.phase is Phase.STARTING and self.child.announces_up:
            return now + POLL_FAST
        return now + SLEEP_LOOK_EVERY

    def act(self, action, now):
        if action is Action.LAUNCH:
            self.launch(now)
        elif action is Action.GIVE_UP:
            wait = self.settings.wait
            self.retire(self.child, f"not up within {wait:g} s")
            self.failed(now, f"the tunnel was not up within {wait:g} s")
        elif action is Action.STOP:
            self.retire(self.child, "linger expired")
        elif action is Action.START_COUNTDOWN:
            linger = self.settings.linger + self.rng.uniform(0, self.settings.jitter)
            self.countdown_ends = now + linger
            log.debug("countdown: stopping the tunnel in %.1f s", linger)
        elif action is Action.CANCEL_COUNTDOWN:
            self.countdown_ends = None
            log.debug("countdown cancelled: a client arrived")
        if action in (Action.START_COUNTDOWN, Action.CANCEL_COUNTDOWN):
            self.on_change()
        else:
            self.notify()

    def launch(self, now):
        self.launches += 1
        endpoint = self.endpoints(self.launches)
        argv = self.settings.tunnel_argv(endpoint, self.session)
        child = Child(argv, endpoint, self.session, self.grace,
                      on_exit=lambda c: self.post("exited", c))
        try:
            child.launch(now, self.prctl)
        except OSError as exc:
            self.failed(now, f"cannot run {argv[0]}: {exc.strerror}")
            return
        self.child = self.last_child = child
        log.info("tunnel starting (pid %d)", child.pid)
        log.debug("tunnel command: %s", shlex.join(argv))

    def mark_up(self, child, now):
        child.phase = Phase.UP
        self.failures = 0
        log.info("tunnel up after %.2f s", now - child.launched_at)
        self.notify()
        self.on_up()

    def retire(self, child, reason, gentle=True):
        """Begin to stop a child; clients that need the tunnel get a new one."""
        log.info("tunnel stopping (pid %d, %s)", child.pid, reason)
        child.stop(reason, gentle)
        self.retiring.add(child)
        if child is self.child:
            self.child, self.countdown_ends = None, None

    def reaped(self, child, now):
        """A child has ended: log why, and decide what the next start needs."""
        self.retiring.discard(child)
        was_current = child is self.child
        if was_current:
            self.child, self.countdown_ends = None, None
        code, uptime = child.returncode, now - child.launched_at
        self.last_exit = code
        verdict = judge_exit(code, child.stop_reason is not None, child.phase is Phase.UP,
                             child.session)
        if verdict is Verdict.STOPPED:
            log.info("tunnel stopped (pid %d, %s): %s", child.pid, child.stop_reason,
                     describe_exit(code))
        elif verdict is Verdict.NO_SESSION:
            self.session = False
            log.warning("the remote command ended by itself (%s after %.1f s): %s allows no "
                        "session; using ssh -N from now on (see --no-session)",
                        describe_exit(code), uptime, self.settings.destination)
        elif verdict is Verdict.DIED:
            log.warning("tunnel (pid %d) %s after %.1f s", child.pid, describe_exit(code), uptime)
        elif was_current:
            self.failed(now, f"tunnel failed: {most_telling(list(child.said)) or describe_exit(code)}")

    def failed(self, now, reason):
        """A start failed: waiting clients are told, the next start waits."""
        self.failures += 1
        self.error = reason
        delay = backoff(self.failures, self.backoff_first, self.backoff_max)
        self.retry_at = now + delay
        log.warning("%s (failure %d in a row; next try in %.0f s at the earliest)",
                    reason, self.failures, delay)

    def notice_sleep(self, now):
        asleep = self.sleep_watch.slept()
        if asleep:
            log.info("resumed after %.0f s asleep", asleep)
            if self.child is not None:
                self.retire(self.child, f"resumed after {asleep:.0f} s asleep", gentle=False)
            self.retry_at = 0.0
            self.notify()
            self.on_up()            # the queue runner looks again too

    def notify(self):
        """Wake everyone waiting on the tunnel."""
        changed = self.changed
        self.changed = type(changed)()
        changed.set()
        self.on_change()


class Visit:
    """One client's use of the tunnel, from its arrival to its leaving (see
    Supervisor.visit): connect() as often as it needs in between."""

    def __init__(self, supervisor):
        self.supervisor = supervisor

    def __enter__(self):
        self.supervisor.arrive()
        return self

    def __exit__(self, *exc_info):
        self.supervisor.left()

    def connect(self, wait, exclude=None, abandoned=None):
        return self.supervisor.connect(wait, exclude, abandoned)


def wall_clock(moment, now):
    """A monotonic moment as seconds since the epoch (None stays None)."""
    return None if moment is None else time.time() - (now - moment)


# ---------------------------------------------------------------------------
# The forwarder
# ---------------------------------------------------------------------------

# Copying: zero-copy through a pipe where there is splice(2) (Linux, Python 3.10+),
# else through a buffer.  A pipe or buffer is taken from the forwarder's pool
# only once data waits, so an idle client holds none.  This is the hot path:
# no logging, no allocation per chunk.

#: What a copy returns when its source ended cleanly; otherwise it returns the
#: socket error that ended it (a client's reset is an outcome to log, not a crash).
AT_END = "end of stream"
#: What move_through returns when nothing waits to be read.
NOTHING_WAITING = -1


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


class PipePool:
    """Idle, empty pipes for splice(2), owned by the forwarder: a copy takes one
    while bytes are in flight and gives it back after."""

    def __init__(self):
        self.idle = []

    def take(self):
        return self.idle.pop() if self.idle else new_pipe()

    def give(self, pipe):
        if len(self.idle) < POOL_SIZE:
            self.idle.append(pipe)
        else:
            close_pipe(pipe)

    def empty(self):
        while self.idle:
            close_pipe(self.idle.pop())


class BufferPool(PipePool):
    """Idle copy buffers where there is no splice(2): anonymous mmaps, whose
    memory is given back to the system for real when they are dropped."""

    def take(self):
        import mmap
        return self.idle.pop() if self.idle else mmap.mmap(-1, CHUNK_SIZE)

    def give(self, buf):
        if len(self.idle) < POOL_SIZE:
            self.idle.append(buf)

    def empty(self):
        self.idle.clear()


class Flow:
    """Bytes moved one way, counted by the one copy that moves them."""
    __slots__ = ("count",)

    def __init__(self):
        self.count = 0


def splice_through_pipe(src, dst, flow, pool, ready=False, far=None):
    """Move src to dst until src ends, through a pipe with splice(2): the bytes
    never enter Python.  Returns AT_END, or the socket error that ended the
    copy.  The caller passes end-of-stream on.

    After a chunk that filled the pipe it reads again before it waits, so a bulk
    transfer seldom goes round the event loop (but after YIELD_EVERY chunks in a
    row it waits all the same, to give other clients their turn); with ready,
    it reads before it first waits too (bytes are known to wait).  Bytes from
    the far side count on its child's `far` too."""
    from gevent import get_hub
    hub = get_hub()
    readable = hub.loop.io(src.fileno(), READ)
    writable = hub.loop.io(dst.fileno(), WRITE)
    in_a_row = 0
    try:
        while True:
            if not ready:
                hub.wait(readable)
            ready = False
            while True:
                try:
                    pipe = pool.take()
                except OSError as exc:
                    return exc               # out of file descriptors
                try:
                    count = move_through(pipe, readable.fd, writable, hub)
                except OSError as exc:
                    close_pipe(pipe)         # it may hold bytes that will never be sent
                    return exc
                except BaseException:
                    close_pipe(pipe)         # killed mid-chunk (minimail is stopping)
                    raise
                pool.give(pipe)
                if count == 0:
                    return AT_END
                if count != NOTHING_WAITING:
                    flow.count += count
                    if far is not None:
                        far.count += count
                    in_a_row += 1
                if count != CHUNK_SIZE or in_a_row >= YIELD_EVERY:
                    in_a_row = 0
                    break
    finally:
        readable.close()
        writable.close()


def move_through(pipe, src_fd, writable, hub):
    """Move what waits on src_fd through an empty pipe to the writable watcher's
    fd: the byte count, 0 at the end of src, or NOTHING_WAITING."""
    try:
        count = os.splice(src_fd, pipe[1], CHUNK_SIZE, flags=SPLICE_FLAGS)
    except BlockingIOError:
        return NOTHING_WAITING
    left = count
    while left:
        try:
            left -= os.splice(pipe[0], writable.fd, left, flags=SPLICE_FLAGS)
        except BlockingIOError:
            hub.wait(writable)
    return count


def splice_through_buffer(src, dst, flow, pool, ready=False, far=None):
    """splice_through_pipe's twin for systems without splice(2): recv_into a
    pooled buffer, then sendall."""
    from gevent import get_hub
    hub = get_hub()
    readable = hub.loop.io(src.fileno(), READ)
    try:
        while True:
            if not ready:
                hub.wait(readable)
            ready = False
            buf = pool.take()
            try:
                count = src.recv_into(buf)
                if count:
                    dst.sendall(memoryview(buf)[:count])
            finally:
                pool.give(buf)
            if not count:
                return AT_END
            flow.count += count
            if far is not None:
                far.count += count
    except OSError as exc:
        return exc
    finally:
        readable.close()


splice = splice_through_pipe if hasattr(os, "splice") else splice_through_buffer


def shutdown_write(sock):
    """Pass end-of-stream on; the peer may be gone already."""
    try:
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass


def peek(sock):
    """The first byte waiting on sock without taking it; b"" at its end (or
    after a reset); None while nothing waits."""
    timeout = sock.gettimeout()
    sock.settimeout(0)
    try:
        return sock.recv(1, socket.MSG_PEEK)
    except BlockingIOError:
        return None
    except OSError:
        return b""
    finally:
        sock.settimeout(timeout)


def wait_readable(socks, timeout):
    """The first of socks to become readable within timeout seconds (None: no
    limit), or None if none did.  libev watchers: no FD_SETSIZE limit."""
    from gevent import get_hub
    from gevent.hub import Waiter
    loop, waiter = get_hub().loop, Waiter()
    watchers = [loop.io(sock.fileno(), READ) for sock in socks]
    for watcher, sock in zip(watchers, socks):
        watcher.start(waiter.switch, sock)
    timer = None if timeout is None else loop.timer(timeout)
    if timer is not None:
        timer.start(waiter.switch, None)
    try:
        return waiter.get()
    finally:
        for watcher in watchers:
            watcher.close()
        if timer is not None:
            timer.close()


def format_peer(address):
    """'127.0.0.1:40404' or '[::1]:40404'."""
    host, port = address[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def describe_error(exc):
    """A short name for a socket error, e.g. 'ECONNRESET'."""
    if isinstance(exc, OSError) and exc.errno:
        return errno.errorcode.get(exc.errno, str(exc))
    return type(exc).__name__


def reply(client, line):
    """Send one SMTP reply line and close our side without resetting the client;
    the bytes sent.

    What the client still sends is read and dropped for a moment, so that
    closing with unread data does not turn into a reset that eats the reply.
    """
    from gevent import Timeout
    data = smtp_reply_line(line)
    try:
        client.sendall(data)
        client.shutdown(socket.SHUT_WR)
        with Timeout(REPLY_LINGER, False):
            while client.recv(4096):
                pass
    except OSError:
        return 0
    return len(data)


class Greeting(enum.Enum):
    """How the wait for the far side's first word ended."""
    HEARD = "heard"              # bytes (or a half-close) came from the far side
    STALE = "stale"              # a warm tunnel stayed silent: replace it
    GONE = "gone"                # the tunnel ended before the far side spoke
    TOO_MUCH = "too much"        # the client sent more than can be replayed
    IDLE = "idle"                # nothing moved for --idle-timeout
    CLIENT_GONE = "client gone"  # the client reset the connection


#: How often one client is moved to a fresh tunnel before it is given up.
MOVES_MAX = 2
#: Running out of file descriptors is logged at most this often (seconds).
FD_WARN_EVERY = 10.0
#: When this many clients were here at once and all have gone, memory goes back.
CROWD = 200
#: After the drain's cut, a session inside a commit gets this long to answer it.
COMMIT_GRACE = 3.0


class Session:
    """One client's connection: its sockets, the child it goes through, the
    bytes it sent before the far side spoke (for a replay), and its outcome."""

    def __init__(self, client, peer):
        self.client = client
        self.peer = peer
        self.upstream = None     # the connection through the tunnel
        self.child = None        # the launch it goes through
        self.started = time.monotonic()
        self.sent = Flow()       # bytes from the client
        self.received = Flow()   # bytes to the client
        self.kept = bytearray()  # what the client sent before the far side's first byte
        self.movable = True      # kept holds all of it (at most REPLAY_LIMIT)
        self.client_ended = False  # the client half-closed before the far side spoke
        self.outcome = None      # why it ended, if not simply at the end of both streams
        self.held = False        # a commit is under way: a cut waits for its reply
        self.cut_waiting = None  # a cut asked for meanwhile

    def end(self, outcome):
        """Record why the session ended; the first reason stays."""
        if self.outcome is None:
            self.outcome = outcome

    def cut(self, outcome):
        """End the session from outside its copies (idle, the tunnel died, the
        drain ran out): shutting both sockets down wakes the copies wherever
        they wait, and they end as at end-of-stream.  While a commit is under
        way (held), the cut waits until its reply has gone out."""
        if self.held:
            self.cut_waiting = self.cut_waiting or outcome
            return
        self.end(outcome)
        for sock in (self.client, self.upstream):
            if sock is not None:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def hold(self):
        """A commit begins: the mail will be queued, and the client must hear so."""
        self.held = True

    def release(self, say):
        """The commit is over: say() sends its reply, then a cut that waited comes."""
        self.held = False
        if self.cut_waiting is not None:
            try:
                say()
            except OSError:
                pass
            self.cut(self.cut_waiting)

    def attach(self, upstream, child):
        """Go through this connection: close the one before, replay what the
        client sent so far, and pass its half-close on."""
        self.close_upstream()
        self.upstream, self.child = upstream, child
        try:
            if self.kept:
                upstream.sendall(self.kept)
            if self.client_ended:
                upstream.shutdown(socket.SHUT_WR)
        except OSError:
            pass                 # the next wait for the far side tells

    def keep(self, data):
        """Keep what the client sent until the far side speaks, within REPLAY_LIMIT."""
        if self.movable and len(self.kept) + len(data) <= REPLAY_LIMIT:
            self.kept += data
        else:
            self.movable, self.kept = False, bytearray()

    def close_upstream(self):
        if self.upstream is not None:
            self.upstream.close()
            self.upstream = None

    def log(self):
        log.info("client %s: %s; %d bytes from client, %d to client, %.2f s",
                 self.peer, self.outcome or "ok", self.sent.count, self.received.count,
                 time.monotonic() - self.started)


class Forwarder:
    """The listening side: accepts mail clients and puts each through the
    tunnel; a client the tunnel cannot carry is served by the queue's
    receiver, or gets 421.  Owns the sessions and the splice pool."""

    def __init__(self, listener, supervisor, settings, receiver=None, on_change=lambda: None):
        from gevent.pool import Pool
        from gevent.server import StreamServer
        self.supervisor = supervisor
        self.settings = settings
        self.receiver = receiver
        self.on_change = on_change
        self.handlers = Pool()              # lets drain() wait for them
        self.server = StreamServer(listener, self.handle, spawn=self.handlers)
        self.accept_one, self.server.do_read = self.server.do_read, self.accept
        self.sessions = set()
        self.served = 0                     # clients served since the start
        self.bytes_from_clients = 0         # of sessions that have ended
        self.bytes_to_clients = 0
        self.pool = PipePool() if splice is splice_through_pipe else BufferPool()
        self.buffers = BufferPool()         # when no descriptor is left for a pipe
        self.started_at = time.time()       # wall clock, for status
        self.closing = False
        self.crowd = 0                      # the most clients at once since memory was given back
        self.fd_warned_at = -FD_WARN_EVERY
        self.keeper = None

    def start(self):
        from gevent import spawn
        self.server.start()
        self.keeper = spawn(self.keep_pools)

    # -- accepting ----------------------------------------------------------

    def accept(self):
        """The server's accept: out of file descriptors, it pauses for a moment
        (the client waits in the backlog) instead of printing tracebacks."""
        try:
            return self.accept_one()
        except OSError as exc:
            if not out_of_descriptors(exc):
                raise
        from gevent import spawn_later
        if time.monotonic() - self.fd_warned_at > FD_WARN_EVERY:
            self.fd_warned_at = time.monotonic()
            log.warning("out of file descriptors with %d clients: new clients wait "
                        "(see the open files limit at the start of the log)", len(self.sessions))
        self.server.stop_accepting()
        spawn_later(ACCEPT_PAUSE, self.resume_accepting)
        return None

    def resume_accepting(self):
        if not self.closing and not self.server.closed:
            self.server.start_accepting()

    # -- one client ---------------------------------------------------------

    def handle(self, client, address):
        session = Session(client, format_peer(address))
        self.sessions.add(session)
        self.crowd = max(self.crowd, len(self.sessions))
        try:
            self.forward(session)
        finally:
            self.sessions.discard(session)
            client.close()
            if not self.sessions and self.crowd >= CROWD:
                self.crowd = 0
                give_memory_back()
            session.log()
            self.bytes_from_clients += session.sent.count
            self.bytes_to_clients += session.received.count
            self.on_change()

    def forward(self, session):
        """Put the client through the tunnel; when the tunnel cannot be had,
        the queue takes its mail, or it gets 421.  Every 421 is written here."""
        if len(self.sessions) > self.settings.max_clients:
            session.end("refused: too many clients")
            session.received.count += reply(session.client, "421 4.3.2 minimail: too many "
                                                            "clients, try again later")
            return
        self.served += 1
        self.on_change()
        if session.client.family != socket.AF_UNIX:
            session.client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self.supervisor.visit() as tunnel:   # left before the queue serves it
            warm = self.supervisor.phase is Phase.UP    # as the client found it
            try:
                self.pass_through(session, tunnel, warm)
                return
            except TunnelUnavailable as exc:
                why = str(exc)
            except OutOfDescriptors:
                session.end("421: out of file descriptors")
                session.received.count += reply(session.client, "421 4.3.2 minimail: too busy "
                                                "(out of file descriptors), try again later")
                return
            except ClientGone:
                session.end("client left before the tunnel was up")
                return
            finally:
                session.close_upstream()
        session.child = None                # what the client gets now is no far side's
        if self.receiver is not None and session.movable and not self.closing:
            self.receiver.serve(session, why)
        else:
            session.end(f"421: {why}")
            session.received.count += reply(session.client, f"421 4.4.0 minimail: {why}")

    def connect(self, session, tunnel, exclude=None):
        return tunnel.connect(self.settings.wait, exclude,
                              abandoned=lambda: peek(session.client) == b"")

    def pass_through(self, session, tunnel, warm):
        """Connect through the tunnel, wait for the far side's first word (moving
        the client to a fresh tunnel if the first one is stale or ends before
        that), then splice the two together."""
        session.attach(*self.connect(session, tunnel))
        for moves in range(MOVES_MAX + 1):
            result = self.await_greeting(session, warm and moves == 0)
            if result in (Greeting.HEARD, Greeting.TOO_MUCH):
                break
            if result is Greeting.IDLE:
                return session.end(f"closed: idle for {self.settings.idle_timeout:g} s")
            if result is Greeting.CLIENT_GONE:
                return
            if moves == MOVES_MAX:
                raise TunnelUnavailable("the tunnel ended before the far side spoke")
            stale = session.child
            if result is Greeting.STALE:
                self.supervisor.report_stale(stale)
            session.attach(*self.connect(session, tunnel, exclude=stale))
            log.info("client %s: moved from tunnel %d (%s) to %d, %d bytes replayed",
                     session.peer, stale.pid, result.value, session.child.pid, len(session.kept))
        self.splice_pair(session)

    def await_greeting(self, session, warm):
        """Wait for the far side's first byte, passing on (and keeping a copy of)
        what the client sends meanwhile.  Through a warm tunnel the far side
        must speak within --greeting-wait, unless the far side sent bytes through
        that child meanwhile, to anyone (a slow server is not a dead tunnel):
        counted on the child as they are copied, never cached."""
        client, upstream, child = session.client, session.upstream, session.child
        if peek(upstream):                          # it has spoken already (a crowd)
            return Greeting.HEARD
        settings, now = self.settings, time.monotonic()
        stale_at = now + settings.greeting_wait if warm and settings.greeting_wait else None
        idle_at = now + settings.idle_timeout if settings.idle_timeout else None
        heard = child.far.count
        watched = [upstream] if session.client_ended else [upstream, client]
        while True:
            wake_at = earliest(stale_at, idle_at)
            timeout = None if wake_at is None else max(0.0, wake_at - time.monotonic())
            readable = wait_readable(watched, timeout)
            if readable is upstream:
                return self.first_word(session)
            if readable is client:
                result = self.take_early_bytes(session)
                if result is not None:
                    return result
                idle_at = idle_at and time.monotonic() + settings.idle_timeout
                if session.client_ended:
                    watched = [upstream]
                continue
            now = time.monotonic()
            if stale_at is not None and now >= stale_at:
                if child.far.count == heard:
                    return Greeting.STALE
                stale_at = None                     # slow, but alive: wait on
            if idle_at is not None and now >= idle_at:
                return Greeting.IDLE

    def first_word(self, session):
        """The far side's end is readable: bytes, or an end before any byte: a
        tunnel gone, the far side's answer to the client's half-close, or else
        (a Unix socket or TCP alike) a far side that closed without a word."""
        try:
            first = session.upstream.recv(1, socket.MSG_PEEK)    # readable: no wait
        except OSError:
            first = b""
        if first:
            return Greeting.HEARD
        if session.child.gone():
            return Greeting.GONE
        if not session.client_ended:     # over TCP too, where a close sets no POLLHUP
            raise TunnelUnavailable("the far side closed the connection without a word "
                                    "(is --remote right?)")
        return Greeting.HEARD                       # after the client's half-close: pass it on

    def take_early_bytes(self, session):
        """Pass on what the client sent before the far side spoke, keeping a copy."""
        try:
            data = session.client.recv(65536)
        except OSError as exc:
            session.end(f"closed: {describe_error(exc)}")
            return Greeting.CLIENT_GONE
        if not data:
            session.client_ended = True
            shutdown_write(session.upstream)
            return None
        session.sent.count += len(data)
        session.keep(data)
        try:
            session.upstream.sendall(data)
        except OSError:
            pass                  # the tunnel is going: the wait for the far side tells
        return None if session.movable else Greeting.TOO_MUCH

    def splice_pair(self, session):
        """Copy both ways until both directions end, one fails, the tunnel dies
        under them, or the session idles too long.  This greenlet copies from the
        tunnel to the client, one more the other way: a held client costs two
        parked greenlets.  The idle timer and the tunnel's death are callbacks."""
        from gevent import spawn
        up = None if session.client_ended else spawn(self.copy_up, session)
        idle = IdleTimer(session, self.settings.idle_timeout)
        died, ended = session.child.died, self.tunnel_ended(session)
        died.rawlink(ended)
        try:
            result = self.copy(session.upstream, session.client, session.received, ready=True,
                               far=session.child.far)
            if result is AT_END:
                shutdown_write(session.client)
            else:
                session.cut(f"closed: {describe_error(result)}")
            if up is not None:
                up.join()
        finally:
            died.unlink(ended)
            idle.stop()
            if up is not None:
                up.kill()

    def copy(self, src, dst, flow, ready=False, far=None):
        """splice(2) through a pooled pipe; through a buffer once no descriptor
        is left for a pipe (nothing has been read then: the copy goes on)."""
        result = splice(src, dst, flow, self.pool, ready, far)
        if out_of_descriptors(result):
            result = splice_through_buffer(src, dst, flow, self.buffers, ready, far)
        return result

    def copy_up(self, session):
        """The client-to-tunnel half of a session, in a greenlet of its own."""
        result = self.copy(session.client, session.upstream, session.sent)
        if result is AT_END:
            shutdown_write(session.upstream)
        else:
            session.cut(f"closed: {describe_error(result)}")

    @staticmethod
    def tunnel_ended(session):
        def cut(_event):
            reason = session.child.stop_reason
            session.cut("closed: the tunnel ended under the session" +
                        (f" ({reason})" if reason else ""))
        return cut

    # -- the pool, and stopping ----------------------------------------------

    def keep_pools(self):
        """Give the splice pipes back to the system whenever the tunnel is down
        and no client is here (sessions in a row reuse them meanwhile)."""
        while True:
            changed = self.supervisor.changed
            if self.supervisor.phase is Phase.DOWN and not self.sessions:
                self.pool.empty()
                self.buffers.empty()
            changed.wait()

    def close(self):
        """Stop accepting clients (minimail is stopping)."""
        self.closing = True
        self.server.close()

    def drain(self, seconds):
        """Give active sessions up to `seconds` to end, then cut the rest."""
        if self.handlers:
            log.info("waiting up to %g s for %d active session(s)", seconds, len(self.handlers))
        self.handlers.join(timeout=seconds)
        self.cut_all(f"cut: the drain of {seconds:g} s ran out")

    def cut_all(self, outcome):
        """Cut every session; one inside a commit first answers it (COMMIT_GRACE)."""
        from gevent import sleep
        for session in list(self.sessions):
            session.cut(outcome)
        self.handlers.join(timeout=1)
        deadline = time.monotonic() + COMMIT_GRACE
        while any(s.held for s in self.sessions) and time.monotonic() < deadline:
            sleep(0.02)
        self.handlers.kill(block=True, timeout=1)
        if self.keeper is not None:
            self.keeper.kill()

    def describe(self):
        return {
            "clients_active": len(self.sessions),
            "sessions": self.served,
            "bytes_from_clients": self.bytes_from_clients,
            "bytes_to_clients": self.bytes_to_clients,
        }


def give_memory_back():
    """After a crowd: collect cycles and hand the allocator's free pages back to
    the system (glibc's malloc_trim; elsewhere only the collection).  Some tens
    of ms, so only when a crowd has gone, not after every client."""
    import gc
    gc.collect()
    try:
        libc_function("malloc_trim")(0)
    except AttributeError:
        pass


class IdleTimer:
    """Ends a session that has moved no byte for idle_timeout seconds (0: never).
    A timer that looks at the byte counts now and then: no greenlet, no work per chunk."""

    def __init__(self, session, idle_timeout):
        self.session = session
        self.idle_timeout = idle_timeout
        self.last_total = 0
        self.last_change = time.monotonic()
        self.timer = None
        if idle_timeout:
            from gevent import get_hub
            self.timer = get_hub().loop.timer(idle_timeout / 4, idle_timeout / 4)
            self.timer.start(self.look)

    def look(self):
        total = self.session.sent.count + self.session.received.count
        now = time.monotonic()
        if total != self.last_total:
            self.last_total, self.last_change = total, now
        elif now - self.last_change >= self.idle_timeout:
            self.stop()
            self.session.cut(f"closed: idle for {self.idle_timeout:g} s")

    def stop(self):
        if self.timer is not None:
            self.timer.close()
            self.timer = None


# ---------------------------------------------------------------------------
# The SMTP client: one for the queue runner and the sendmail command
# ---------------------------------------------------------------------------

#: How long each reply may take, whole, from the command's end (RFC 5321,
#: 4.5.3.2): the greeting, commands and MAIL/RCPT 5 minutes, DATA's go-ahead
#: 2, the answer to the final dot 10 (the far side may still be filtering a
#: mail it has taken: minimail waits rather than send it twice).  QUIT's answer
#: is not worth a long wait.
REPLY_DEADLINES = {"greeting": 300.0, "EHLO": 300.0, "HELO": 300.0, "MAIL": 300.0,
                   "RCPT": 300.0, "RSET": 300.0, "DATA": 120.0, "the final dot": 600.0,
                   "QUIT": 10.0}
#: How long each block of a message's text may take to be sent (RFC 5321: 3 minutes).
BLOCK_DEADLINE = 180.0
#: The most lines one reply may have; a far side that never ends one is cut.
REPLY_LINES_MAX = 100
#: A reply line: its code, then a space (the last line), a dash (more follow)
#: or nothing, then its text.
REPLY_LINE = re.compile(rb"([1-5][0-9][0-9])(?:([ -])(.*))?", re.S)
#: The only codes that let these steps go on (elsewhere: any 2xx).
GOES_ON = {"greeting": (220,), "EHLO": (250,), "HELO": (250,), "DATA": (354,)}


class DialogueFailed(Exception):
    """The dialogue with the far side cannot go on: it closed, a deadline
    passed, or a reply did not fit its step (a protocol error, or a lie).  The
    connection must end, and nothing in flight counts as delivered.  The text
    names the step and codes only (it may be logged); `reply` is the far
    side's refusal where it was one (a 554 greeting)."""

    def __init__(self, text, reply=None, gone=False):
        super().__init__(text)
        self.reply = reply
        self.gone = gone              # the far side closed or reset the connection


class Reply(collections.namedtuple("Reply", "code lines")):
    """One reply of the far side: its code and each line's text (str)."""

    def __str__(self):
        return f"{self.code} {printable(' '.join(self.lines), 300)}".rstrip()


#: A transaction's end: `results`, a Reply for every recipient given (the
#: answer to the final dot for those accepted); `rest`, the recipients the far
#: side would not take in this transaction (a 452 after some were accepted:
#: for another one); `refused`, the no to MAIL, DATA or the final dot, if any.
Transaction = collections.namedtuple("Transaction", "results rest refused")


def goes_on(step, code):
    """True if a reply with this code lets the step go on, False if it is the
    far side's no (4xx, 5xx); DialogueFailed if it does not fit the step."""
    wanted = GOES_ON.get(step)
    if (code in wanted) if wanted else 200 <= code < 300:
        return True
    if 400 <= code < 600:
        return False
    raise DialogueFailed(f"answered {step} with {code}, which does not fit (a protocol error)")


class DotStuffer:
    """Dot-stuffing (RFC 5321, 4.5.2) of a message's text sent in blocks: a
    dot that begins a line is doubled; the text then ends with CRLF and a lone
    dot.  The one place minimail stuffs."""

    def __init__(self):
        self.tail = b"\r\n"           # the text's last two bytes (a line starts)

    def stuff(self, chunk):
        if not chunk:
            return b""
        stuffed = chunk.replace(b"\n.", b"\n..")
        if self.tail.endswith(b"\n") and chunk.startswith(b"."):
            stuffed = b"." + stuffed
        self.tail = (self.tail + chunk)[-2:]
        return stuffed

    def end(self):
        return b".\r\n" if self.tail == b"\r\n" else b"\r\n.\r\n"


def send_at_once(sock):
    """No Nagle on a TCP connection: a command or the text's last block must
    not wait for the ACK of what went before (a delayed ACK: 40 ms)."""
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class SmtpClient:
    """One SMTP dialogue with a far side, on any socket object (a blocking
    stdlib socket in the sendmail command, a gevent socket in the runner),
    through its recv, sendall and settimeout.  It knows the step it is in,
    reads each reply whole within that step's deadline and bounds (lines of
    at most REPLY_MAX bytes, at most REPLY_LINES_MAX of them), and checks it
    against the step.  Addresses go out as they are given."""

    def __init__(self, sock, show=None, deadlines=REPLY_DEADLINES, block_deadline=BLOCK_DEADLINE):
        self.sock = sock
        self.show = show or (lambda direction, data: None)    # -v: the dialogue
        self.deadlines = deadlines
        self.block_deadline = block_deadline
        self.buffer = bytearray()
        self.step = "greeting"
        self.extensions = {}          # EHLO's keywords (upper case) -> their parameters
        self.utf8 = False             # the transaction asked for SMTPUTF8
        self.received = 0             # bytes from the far side
        self.broken = None            # why the dialogue cannot go on (a failed RSET)
        send_at_once(sock)

    # -- a session ---------------------------------------------------------

    def greet(self, hostname):
        """The greeting, then EHLO (HELO if EHLO is refused); DialogueFailed
        if the far side will not talk."""
        reply = self.reply("greeting")
        if not goes_on("greeting", reply.code):
            raise DialogueFailed(f"greeted with {reply.code}", reply)
        ok, reply = self.ask("EHLO", f"EHLO {hostname}")
        if ok:
            self.extensions = {line.split(" ", 1)[0].upper(): line.partition(" ")[2]
                               for line in reply.lines[1:] if line}
            return
        ok, reply = self.ask("HELO", f"HELO {hostname}")
        if not ok:
            raise DialogueFailed(f"answered EHLO and HELO with {reply.code}", reply)

    def transaction(self, sender, recipients, parameters, message):
        """MAIL, RCPT for each recipient, DATA and the message's text (read
        from `message` with .read()): a Transaction."""
        self.utf8 = "SMTPUTF8" in parameters
        ok, reply = self.ask("MAIL", f"MAIL FROM:<{sender}>{''.join(' ' + p for p in parameters)}")
        if not ok:
            self.reset()
            return Transaction({r: reply for r in recipients}, [], reply)
        results, accepted, rest = {}, [], []
        for i, recipient in enumerate(recipients):
            ok, reply = self.ask("RCPT", f"RCPT TO:<{recipient}>")
            if reply.code == 452 and accepted:         # as many as it takes: the rest later
                rest = recipients[i:]
                results.update((r, reply) for r in rest)
                break
            results[recipient] = reply
            if ok:
                accepted.append(recipient)
        if not accepted:
            self.reset()
            return Transaction(results, rest, None)
        ok, reply = self.data(message)
        results.update((r, reply) for r in accepted)
        return Transaction(results, rest, None if ok else reply)

    def data(self, message):
        """DATA, the text dot-stuffed, the final dot: (delivered, the reply to the
        dot), or (False, the no to DATA).  Only the reply to the dot proves delivery."""
        ok, reply = self.ask("DATA", "DATA")
        if not ok:
            self.reset()
            return False, reply
        stuffer, size, last = DotStuffer(), 0, b""
        while True:
            chunk = message.read(CHUNK_SIZE)
            if not chunk:
                break
            size += len(chunk)
            if last:
                self.send_block(last, "the message's text")
            last = stuffer.stuff(chunk)
        self.show(">>>", f"[the message's text: {size} bytes]".encode())
        self.must_be_quiet("the final dot")
        self.send_block(last + stuffer.end(), "the final dot")   # one send: no wait for an ACK
        self.show(">>>", b".")
        reply = self.reply("the final dot")
        return goes_on("the final dot", reply.code), reply

    def reset(self):
        """RSET after the far side's no, which stands even if RSET fails: then
        the next command fails at once, as the first failure said."""
        try:
            self.ask("RSET", "RSET")
        except DialogueFailed as exc:
            self.broken = exc

    def quit(self):
        """QUIT, and its answer if it comes soon; what goes wrong no longer matters."""
        try:
            self.ask("QUIT", "QUIT")
        except DialogueFailed:
            pass

    # -- commands and replies ----------------------------------------------

    def ask(self, step, line):
        """Send a command line and read its reply: (it goes on, the Reply)."""
        if self.broken is not None:
            raise DialogueFailed(str(self.broken))
        self.must_be_quiet(step)
        try:
            data = line.encode("utf-8" if self.utf8 else "ascii") + b"\r\n"
        except UnicodeEncodeError:
            raise DialogueFailed(f"{step} would need SMTPUTF8 (not asked for)") from None
        self.show(">>>", data)
        self.send_block(data, step)
        reply = self.reply(step)
        return goes_on(step, reply.code), reply

    def must_be_quiet(self, step):
        """Nothing may wait unread when a command goes out: a reply that came
        before its command means the dialogue is out of step."""
        if self.buffer or peek(self.sock):
            raise DialogueFailed(f"spoke before {step} was sent (a protocol error)")

    def send_block(self, data, what):
        self.sock.settimeout(self.block_deadline)
        try:
            self.sock.sendall(data)
        except socket.timeout:
            raise DialogueFailed(f"could not send {what} within {self.block_deadline:g} s") from None
        except OSError as exc:
            raise DialogueFailed(f"{describe_error(exc)} while sending {what}",
                                 gone=isinstance(exc, ConnectionError)) from None

    def reply(self, step):
        """The far side's next reply, whole, within the step's deadline and
        bounds; nothing may follow it (no command is in flight)."""
        self.step = step
        deadline = time.monotonic() + self.deadlines[step]
        code, lines = None, []
        while True:
            line = self.next_line(deadline)
            self.show("<<<", line)
            parsed = REPLY_LINE.fullmatch(line)
            if parsed is None or code not in (None, int(parsed[1])):
                raise DialogueFailed(f"its reply to {step} is not SMTP (a protocol error)")
            code = int(parsed[1])
            lines.append((parsed[3] or b"").decode("utf-8", "replace"))
            if parsed[2] != b"-":
                break
            if len(lines) >= REPLY_LINES_MAX:
                raise DialogueFailed(f"its reply to {step} goes on past {REPLY_LINES_MAX} lines")
        if self.buffer:
            raise DialogueFailed(f"sent more than one reply to {step} (a protocol error)")
        return Reply(code, lines)

    def next_line(self, deadline):
        """One line of a reply, without its line end; at most REPLY_MAX bytes
        (CRLF included) are kept."""
        while True:
            end = self.buffer.find(b"\n")
            if end >= REPLY_MAX or (end < 0 and len(self.buffer) >= REPLY_MAX):
                raise DialogueFailed(f"a line of its reply to {self.step} is longer than "
                                     f"{REPLY_MAX} bytes")
            if end >= 0:
                line = bytes(self.buffer[:end])
                del self.buffer[:end + 1]
                return line[:-1] if line.endswith(b"\r") else line
            self.fill(deadline)

    def fill(self, deadline):
        left = deadline - time.monotonic()
        try:
            if left <= 0:
                raise socket.timeout("timed out")
            self.sock.settimeout(left)
            chunk = self.sock.recv(4096)
        except socket.timeout:
            raise DialogueFailed(f"no whole reply to {self.step} within "
                                 f"{self.deadlines[self.step]:g} s") from None
        except OSError as exc:
            raise DialogueFailed(f"{describe_error(exc)} waiting for the reply to {self.step}",
                                 gone=isinstance(exc, ConnectionError)) from None
        if not chunk:
            raise DialogueFailed(f"closed the connection before its reply to {self.step}",
                                 gone=True)
        self.received += len(chunk)
        self.buffer += chunk


# ---------------------------------------------------------------------------
# The queue: the spool, the receiver, the runner
# ---------------------------------------------------------------------------

#: A queue ID: the arrival time in microseconds and 12 random bits, in
#: upper-case hex (Draft makes sure no message in the spool has it yet).
QUEUE_ID = re.compile(r"[0-9A-F]{16}")
#: The most recipients one message may have (RFC 5321 asks servers for 100).
MAX_RECIPIENTS = 100
#: The longest command line the receiver takes, CRLF included (RFC 5321: 512).
COMMAND_LINE_MAX = 512
#: The longest address the receiver takes (RFC 5321's path: 256 octets).
ADDRESS_MAX = 256
#: Failed messages are kept this long, for `minimail queue` to show.
FAILED_KEPT = 30 * 86400.0
#: Queued mail is tried again at most this far apart.
RETRY_MAX = 3600.0
#: A message this large goes to a file as it arrives (smaller ones are
#: written whole, in the thread pool, when they are committed).
DRAFT_IN_MEMORY = 1024 * 1024
#: A line of DATA without CRLF is passed on in pieces once it is this long.
DATA_LINE_PIECE = 64 * 1024
#: DATA must be done within --idle-timeout plus a second for this many bytes of
#: --max-size (500 s by default): a local client sends megabytes a second, and
#: one that trickles a byte now and then no longer holds its slot for ever.
DATA_RATE_LEAST = 256 * 1024
#: Replies the receiver keeps for a client before it waits for the client to
#: read them (and reads nothing from it meanwhile): a client that pipelines
#: and never reads costs this much, not all it asked for.
REPLIES_PENDING_MAX = 16 * 1024
#: How much of a message's header the bounce quotes.
HEADER_QUOTE_MAX = 64 * 1024
#: Where the spool keeps what (subdirectories of --queue).
SPOOL_DIRS = ("tmp", "queued", "failed")
#: A stored message's first line: this, then its envelope in JSON, then CRLF.
ENVELOPE_LINE = b"MINIMAIL-ENVELOPE "
#: The queue's lock file (in the queue directory): held by the daemon for its life.
QUEUE_LOCK = "lock"
#: The free space the queue keeps on its disk for its own writes (envelope
#: updates, bounces) and everyone else's: this share of the disk, within the
#: bounds below; new mail that would leave less gets 452 4.3.1.
RESERVE_SHARE = 0.01
RESERVE_BYTES = (64 << 10, 64 << 20)
RESERVE_INODES = (16, 1000)
#: The reply to new mail when the queue is at its cap or its disk is short.
QUEUE_FULL = "452 4.3.1 minimail: the queue is full, try again later"
OUT_OF_SPACE = "452 4.3.1 minimail: the queue is out of space, try again later"
#: How long `minimail delete` waits for a running daemon's answer.
DELETE_ANSWER_WAIT = 10.0
#: How long `minimail delete` waits for another delete's lock (a daemon holds it longer).
DELETE_LOCK_WAIT = 2.0
#: The name of a delete request in tmp/ (TOKEN: 16 random hex digits).
DELETE_REQUEST = re.compile(r"delete-([0-9a-f]{16})\.request")
#: The most IDs in one delete request (they go in several).
DELETE_BATCH = 1000


#: The queue's subdirectory where the sendmail command leaves mail while
#: minimail is down, and its mode: any user may add a file; nobody but
#: minimail's user may list it, or remove another's file (sticky).
MAILDROP, MAILDROP_MODE = "maildrop", 0o1733
#: Where what the maildrop refuses is moved aside (0700, minimail's).
REFUSED = "refused"
#: A maildrop file's first line: this, then its envelope in JSON, then CRLF.
MAILDROP_LINE = b"MINIMAIL-MAILDROP "
#: The longest envelope line of a maildrop file.
MAILDROP_ENVELOPE_MAX = 1024 * 1024
#: The daemon looks into the maildrop at least this often (and at start, on flush).
MAILDROP_EVERY = 60.0
#: At most this many files are taken in in one look (a flood waits for the next).
MAILDROP_BATCH = 1000
#: The mode of a maildrop file: a daemon that is not root must read it (its
#: name is unguessable and the directory cannot be listed).
MAILDROP_FILE_MODE = 0o644
#: The daemon's queue when root starts it, and the service's.
ROOT_QUEUE, SERVICE_QUEUE = "/var/spool/minimail", "/var/lib/minimail/queue"


class SpoolError(Exception):
    """A file of the queue could not be read or written (an OSError underneath)."""


class MessageGone(SpoolError):
    """A queued message's text is not there any more (removed by hand, or deleted)."""


def new_queue_id():
    microseconds = time.time_ns() // 1000
    return f"{microseconds & 0xFFFFFFFFFFFFF:013X}{os.urandom(2).hex()[1:].upper()}"


def fsync_directory(path):
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durably(path, data):
    """Write a new file (0600), fsync it; the caller renames it into place."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def in_thread(function, *args):
    """Run a blocking file operation (fsync) in the hub's thread pool; its
    exception is raised here (gevent would also print its traceback: a full
    disk is an outcome to log in one line, not a crash)."""
    from gevent import get_hub

    def carried():
        try:
            return function(*args), None
        except Exception as exc:              # carried over to the caller, raised there
            return None, exc
    result, error = get_hub().threadpool.apply(carried)
    if error is not None:
        raise error
    return result


class Envelope:
    """What the queue keeps of a message besides its text: the sender, the
    recipients still to deliver, the attempts, and what the hoster said."""

    FIELDS = {"id": str, "sender": str, "recipients": list, "arrived": float, "size": int,
              "body": (str, type(None)), "smtputf8": bool, "bounce": bool, "attempts": int,
              "next_try": float, "last_reply": (str, type(None)), "failures": list,
              "failed_at": (float, type(None))}

    def __init__(self, id, sender, recipients, arrived, size, body=None, smtputf8=False,
                 bounce=False, attempts=0, next_try=0.0, last_reply=None, failures=(),
                 failed_at=None):
        self.id, self.sender, self.recipients = id, sender, list(recipients)
        self.arrived, self.size, self.body, self.smtputf8 = arrived, size, body, smtputf8
        self.bounce, self.attempts, self.next_try = bounce, attempts, next_try
        self.last_reply, self.failures, self.failed_at = last_reply, list(failures), failed_at
        self.due = None               # when due, on the runner's monotonic clock (never stored)

    def to_json(self):
        import json
        return json.dumps({name: getattr(self, name) for name in self.FIELDS}).encode()

    @classmethod
    def from_json(cls, raw, expected_id):
        """An envelope read from disk, checked field by field (ValueError if not)."""
        import json
        data = json.loads(raw)
        if not isinstance(data, dict) or set(data) != set(cls.FIELDS):
            raise ValueError("not an envelope")
        for name, kind in cls.FIELDS.items():
            value = data[name]
            if kind is float and isinstance(value, int) and not isinstance(value, bool):
                value = data[name] = float(value)
            if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                raise ValueError(f"{name} is not {kind}")
            if isinstance(value, (int, float)) and not 0 <= value < 1e15:   # NaN too
                raise ValueError(f"{name} is out of range")
        if data["id"] != expected_id or not QUEUE_ID.fullmatch(expected_id):
            raise ValueError("the id does not match the file name")
        addresses = [data["sender"], *data["recipients"], *(f[0] for f in data["failures"]
                                                           if isinstance(f, list) and f)]
        if len(data["recipients"]) > MAX_RECIPIENTS or len(data["failures"]) > MAX_RECIPIENTS \
                or not all(valid_address(a) for a in addresses) \
                or not all(isinstance(f, list) and len(f) == 2 and isinstance(f[1], str)
                           for f in data["failures"]):
            raise ValueError("bad addresses")
        return cls(**data)


def valid_address(address):
    return isinstance(address, str) and len(address) <= ADDRESS_MAX and address.isprintable() \
        and "<" not in address and ">" not in address


class Draft:
    """A message as it arrives.  Its first line is its envelope.  It stays in
    memory until it is large (then in a file in the spool's tmp/); the file is
    made, written and fsync'ed at the latest in the commit, in the thread
    pool.  Its ID is unique by its time, its random part and O_EXCL (the
    commit's link refuses one that a queued message has)."""

    def __init__(self, spool, limit=None):
        self.id = new_queue_id()
        self.path = spool.path("tmp", f"{self.id}.msg")
        self.limit = limit            # past this size nothing more is kept
        self.fd = None
        self.size = 0                 # of the message, without the envelope's line
        self.eight_bit = False
        self.error = None             # the first write error (a full disk)
        self.pending, self.pending_size = [], 0

    def write_envelope(self, envelope):
        self.pending.append(ENVELOPE_LINE + envelope.to_json() + b"\r\n")

    def write(self, data):
        self.size += len(data)
        if self.error is not None or (self.limit is not None and self.size > self.limit):
            return                    # counted, not kept: it gets 452 or 552
        self.eight_bit = self.eight_bit or not data.isascii()
        self.pending.append(data)
        self.pending_size += len(data)
        if self.pending_size >= DRAFT_IN_MEMORY:
            self.flush()

    def flush(self):
        """Write what is pending to the file (made now if need be)."""
        data, self.pending, self.pending_size = b"".join(self.pending), [], 0
        try:
            if self.fd is None:
                self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                                  | os.O_CLOEXEC, 0o600)
            view = memoryview(data)
            while view:
                view = view[os.write(self.fd, view):]
        except OSError as exc:
            self.error = exc

    def close(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def discard(self):
        self.close()
        self.pending = []
        remove_quietly(self.path)


def remove_quietly(path, dir_fd=None):
    try:
        os.unlink(path, dir_fd=dir_fd)
    except FileNotFoundError:
        pass


class DirectorySync:
    """The fsync of a directory, shared by the commits under way: one that
    began after a rename makes that rename durable, so a crowd of commits pays
    for one or two (a group commit).  Called from the thread pool."""

    def __init__(self, path):
        import threading
        self.path = path
        self.syncing = threading.Lock()     # one fsync at a time
        self.counting = threading.Lock()
        self.asked = 0                      # renames that asked for a sync
        self.synced = 0                     # renames a finished fsync covers

    def sync(self):
        with self.counting:
            self.asked += 1
            mine = self.asked
        with self.syncing:
            if self.synced >= mine:
                return
            with self.counting:
                covers = self.asked
            fsync_directory(self.path)
            self.synced = covers


class Spool:
    """The queue directory, owned by the daemon's user (0700): tmp/ holds
    drafts, queued/ the messages, failed/ what bounced.  A message is one file,
    ID.msg, whose first line is its envelope: queued once that file is
    fsync'ed, renamed into queued/, and the directory fsync'ed.  Later changes
    to the envelope (attempts, the last reply) go to ID.env beside it, which
    wins.  Blocking calls run in the thread pool."""

    def __init__(self, root):
        self.root = root
        self.syncs = {where: DirectorySync(self.path(where)) for where in ("queued", "failed")}

    def path(self, where, name=None):
        return os.path.join(self.root, where, name) if name else os.path.join(self.root, where)

    def prepare(self):
        """Make the subdirectories; remove what an interrupted write left.  The
        queue and its subdirectories must be ours and closed to others (and the
        subdirectories no links): minimail removes and writes files in them."""
        private_directory(self.root, follow=True)
        let_users_through(self.root)
        for where in SPOOL_DIRS:
            private_directory(self.path(where))
        private_directory(self.path(REFUSED))
        make_maildrop(self.path(MAILDROP))
        for name in os.listdir(self.path("tmp")):
            remove_quietly(self.path("tmp", name))
        for where in ("queued", "failed"):
            names = set(os.listdir(self.path(where)))
            for name in names:
                stem, _, kind = name.partition(".")
                if kind == "env" and f"{stem}.msg" not in names:
                    log.warning("queue: removing %s/%s, left without its message", where,
                                printable(name, 40))
                    remove_quietly(self.path(where, name))

    def draft(self, limit=None):
        return Draft(self, limit)

    def commit(self, draft):
        """Make a draft a queued message, durably (blocking: run in_thread):
        written and fsync'ed in tmp/, linked into queued/ (a link never replaces
        a message that has the same ID), the directory fsync'ed."""
        queued = self.path("queued", f"{draft.id}.msg")
        linked = False
        try:
            draft.flush()
            if draft.error is not None:
                raise draft.error
            os.fsync(draft.fd)
            draft.close()
            os.link(draft.path, queued)
            linked = True
            os.unlink(draft.path)
            self.syncs["queued"].sync()
        except OSError:
            draft.discard()
            if linked:
                remove_quietly(queued)
            raise

    def save(self, envelope):
        """Write a queued message's envelope as it is now, durably (blocking:
        run in_thread); never for a message whose text is gone: MessageGone,
        and its envelope, left alone, is removed."""
        self.must_have(envelope.id)
        self.write_envelope(envelope, "queued")

    def must_have(self, queue_id):
        if not os.path.lexists(self.path("queued", f"{queue_id}.msg")):
            remove_quietly(self.path("queued", f"{queue_id}.env"))
            raise MessageGone(f"queued/{queue_id}.msg is gone")

    def write_envelope(self, envelope, where):
        temporary = self.path("tmp", f"{envelope.id}.env")
        remove_quietly(temporary)
        try:
            write_durably(temporary, envelope.to_json())
            os.rename(temporary, self.path(where, f"{envelope.id}.env"))
        except OSError:
            remove_quietly(temporary)
            raise
        self.syncs[where].sync()

    def remove(self, envelope):
        """A delivered message leaves the queue (an envelope left alone by a
        crash is removed at the next start)."""
        remove_quietly(self.path("queued", f"{envelope.id}.msg"))
        remove_quietly(self.path("queued", f"{envelope.id}.env"))

    def fail(self, envelope):
        """Move a message that bounced to failed/ (blocking: run in_thread): its
        envelope first, so failed/ never holds a message without one."""
        queued, failed = (self.path(where, f"{envelope.id}.msg") for where in ("queued", "failed"))
        if not os.path.lexists(queued) and os.path.lexists(failed):   # moved before an error
            remove_quietly(self.path("queued", f"{envelope.id}.env"))
            return
        self.must_have(envelope.id)
        envelope.failed_at = envelope.failed_at or time.time()
        self.write_envelope(envelope, "failed")
        try:
            os.rename(queued, failed)
        except OSError:
            remove_quietly(self.path("failed", f"{envelope.id}.env"))
            raise
        self.syncs["failed"].sync()
        remove_quietly(self.path("queued", f"{envelope.id}.env"))

    def delete(self, queue_id):
        """Remove a message, waiting or failed, by its ID (blocking: run
        in_thread; only the holder of the queue's lock): where it was, or None."""
        for where in ("queued", "failed"):
            message = self.path(where, f"{queue_id}.msg")
            if os.path.lexists(message):
                os.unlink(message)
                remove_quietly(self.path(where, f"{queue_id}.env"))
                self.syncs[where].sync()
                return where
        return None

    def free_space(self):
        """(bytes, inodes) free on the queue's disk beyond what it keeps in reserve
        (negative: short); inodes None where the disk does not count them."""
        st = os.statvfs(self.root)
        size, free = st.f_blocks * st.f_frsize, st.f_bavail * st.f_frsize
        spare_bytes = free - reserve(size, RESERVE_BYTES)
        spare_inodes = st.f_favail - reserve(st.f_files, RESERVE_INODES) if st.f_files else None
        return spare_bytes, spare_inodes

    def load(self, where="queued"):
        """The envelopes in queued/ or failed/, oldest first; corrupt ones are
        logged and left alone (everything on disk is checked, never trusted)."""
        envelopes = []
        for name in sorted(os.listdir(self.path(where))):
            stem, _, kind = name.partition(".")
            if kind != "msg":
                continue
            try:
                envelopes.append(self.envelope(where, stem))
            except (OSError, ValueError) as exc:
                log.warning("queue: %s/%s has no valid envelope (%s): left alone",
                            where, printable(name, 40), printable(str(exc), 80))
        return sorted(envelopes, key=lambda e: e.arrived)

    def envelope(self, where, queue_id):
        """A message's envelope: its ID.env if there is one, else its first line."""
        if not QUEUE_ID.fullmatch(queue_id):
            raise ValueError("not a queue ID")
        try:
            with open_own_file(self.path(where, f"{queue_id}.env")) as f:
                return Envelope.from_json(read_small(f), queue_id)
        except FileNotFoundError:
            pass
        with open_own_file(self.path(where, f"{queue_id}.msg")) as f:
            line = f.readline(SMALL_FILE_MAX)
            if not line.startswith(ENVELOPE_LINE) or not line.endswith(b"\r\n"):
                raise ValueError("its first line is no envelope")
            envelope = Envelope.from_json(line[len(ENVELOPE_LINE):], queue_id)
            envelope.size = os.fstat(f.fileno()).st_size - len(line)
            return envelope

    def forget_old_failures(self, now):
        for envelope in self.load("failed"):
            if now - (envelope.failed_at or envelope.arrived) > FAILED_KEPT:
                remove_quietly(self.path("failed", f"{envelope.id}.msg"))
                remove_quietly(self.path("failed", f"{envelope.id}.env"))

    def open_message(self, envelope):
        """The queued message's text, from past its envelope's line: MessageGone
        if it is not there, SpoolError if it cannot be read (now or later)."""
        path = self.path("queued", f"{envelope.id}.msg")
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            if not os.path.lexists(path):
                raise MessageGone(f"queued/{envelope.id}.msg is gone") from None
            raise SpoolError("cannot open the message: No such file or directory, yet it is "
                             "there") from None
        except OSError as exc:
            raise SpoolError(f"cannot open the message: {exc.strerror}") from None
        message = StoredMessage(io.FileIO(fd, "r"))
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise SpoolError("the message is not a regular file")
            message.readline(SMALL_FILE_MAX)
        except BaseException:
            message.close()
            raise
        return message


class QueueLock:
    """What makes one process the queue's only writer: a flock on QUEUE/lock
    (0600, the queue's owner's, never through a link), held by the daemon
    for its life and by `minimail delete` for a moment when none runs."""

    def __init__(self, root):
        self.root = root
        self.path = os.path.join(root, QUEUE_LOCK)
        self.fd = None

    def open(self):
        """Open (or make) the lock file; root makes it the queue owner's."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            st, owner = os.fstat(fd), os.stat(self.root)
            if st.st_uid != owner.st_uid and os.geteuid() == 0:
                os.fchown(fd, owner.st_uid, owner.st_gid)
                st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1 or st.st_uid != owner.st_uid:
                raise Fatal(f"{self.path} is not minimail's lock (a link, or not the queue "
                            f"owner's): refusing to use the queue {self.root}")
            os.fchmod(fd, 0o600)
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd

    def take(self):
        """True if this process now holds the lock, False if another does."""
        if self.fd is None:
            self.open()
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True

    def hold(self):
        """The daemon's: take the lock or refuse to start; note our pid in it."""
        try:
            taken = self.take()
        except OSError as exc:
            raise Fatal(f"cannot lock the queue {self.root}: {exc.strerror}") from None
        if not taken:
            pid = self.holder()
            raise Fatal(f"the queue {self.root} is in use by another minimail "
                        f"(pid {pid or '?'}): two daemons must not share one queue")
        try:
            os.ftruncate(self.fd, 0)
            os.pwrite(self.fd, f"{os.getpid()}\n".encode(), 0)
        except OSError as exc:                # a full disk: the lock holds all the same
            log.warning("queue: cannot write the pid into %s: %s", self.path, exc.strerror)

    def holder(self):
        """The pid that holds the lock: from /proc/locks, else what the file says."""
        return lock_holder(self.path) or self.recorded_pid()

    def recorded_pid(self):
        """The pid the daemon wrote into the lock file (its user could write any)."""
        text = os.pread(self.fd, 16, 0).strip() if self.fd is not None else b""
        return int(text) if text.isdigit() and 0 < int(text) < 1 << 22 else None

    def daemon(self):
        """The pid of the daemon that holds the lock, or None (a short-lived
        holder such as another `minimail delete`, or no holder)."""
        pid = lock_holder(self.path)
        return pid if pid and pid == self.recorded_pid() and is_minimail(pid) else None

    def release(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class DeleteRequests:
    """How `minimail delete` asks a running daemon: tmp/delete-TOKEN.request
    holds the IDs, one a line; the daemon, on SIGUSR2, deletes them and
    answers in tmp/delete-TOKEN.answer."""

    def __init__(self, spool):
        self.tmp = spool.path("tmp")

    def path(self, token, kind):
        return os.path.join(self.tmp, f"delete-{token}.{kind}")

    def waiting(self):
        """The tokens of the requests waiting in tmp/."""
        return [m[1] for m in map(DELETE_REQUEST.fullmatch, os.listdir(self.tmp)) if m]

    def write(self, token, ids):
        """Leave a request: in tmp/ as it is (never through a link), as root
        made the queue owner's."""
        tmp = os.open(self.tmp, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            fd = os.open(f"delete-{token}.part", os.O_WRONLY | os.O_CREAT | os.O_EXCL
                         | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=tmp)
            try:
                owner = os.fstat(tmp)
                if owner.st_uid != os.geteuid():
                    os.fchown(fd, owner.st_uid, owner.st_gid)
                os.write(fd, "".join(f"{queue_id}\n" for queue_id in ids).encode())
            finally:
                os.close(fd)
            os.rename(f"delete-{token}.part", f"delete-{token}.request", src_dir_fd=tmp,
                      dst_dir_fd=tmp)
        finally:
            os.close(tmp)

    def read(self, token):
        """The IDs a request names (it is removed); ValueError if it is not one."""
        try:
            with open_own_file(self.path(token, "request")) as f:
                ids = read_small(f).decode("ascii").split()
        finally:
            self.drop(token)
        if not all(QUEUE_ID.fullmatch(queue_id) for queue_id in ids):
            raise ValueError("a delete request names something that is no queue ID")
        return ids

    def answer(self, token, results):
        part = self.path(token, "answering")
        remove_quietly(part)
        write_durably(part, "".join(f"{queue_id} {where or 'absent'}\n"
                                    for queue_id, where in results.items()).encode())
        os.rename(part, self.path(token, "answer"))

    def read_answer(self, token):
        """{ID: "queued", "failed", "error" or None} from the daemon's answer
        (removed), or None while there is none."""
        try:
            with open_own_file(self.path(token, "answer")) as f:
                lines = read_small(f).decode("ascii", "replace").splitlines()
        except FileNotFoundError:
            return None
        remove_quietly(self.path(token, "answer"))
        results = {}
        for line in lines:
            queue_id, _, where = line.partition(" ")
            if QUEUE_ID.fullmatch(queue_id):
                results[queue_id] = where if where in ("queued", "failed", "error") else None
        return results

    def drop(self, token):
        remove_quietly(self.path(token, "request"))


def reserve(total, bounds):
    """What the queue keeps free of a disk's total (bytes or inodes)."""
    least, most = bounds
    return min(max(int(total * RESERVE_SHARE), least), most)


class StoredMessage(io.BufferedReader):
    """A queued message open for reading: its read errors are the spool's
    (SpoolError), never taken for the connection's while it is sent."""

    @staticmethod
    def guarded(method, *args):
        try:
            return method(*args)
        except OSError as exc:
            raise SpoolError(f"cannot read the message: {exc.strerror}") from None

    def read(self, *args):
        return self.guarded(super().read, *args)

    def read1(self, *args):
        return self.guarded(super().read1, *args)

    def readinto(self, buffer):
        return self.guarded(super().readinto, buffer)

    def readline(self, *args):
        return self.guarded(super().readline, *args)

    def seek(self, *args):
        return self.guarded(super().seek, *args)


def private_directory(path, follow=False):
    """Make path a directory of ours (0700) if it is missing, and refuse one
    that is a link (unless follow), not ours, or writable by others."""
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    st = os.stat(path) if follow else os.lstat(path)
    me = pwd.getpwuid(os.geteuid()).pw_name
    if not stat.S_ISDIR(st.st_mode):
        raise Fatal(f"{path} is not a directory (a link?): refusing to keep the queue there")
    if st.st_uid != os.geteuid():
        raise Fatal(f"{path} belongs to {owner_name(st.st_uid)}, not to {me}: refusing to keep "
                    f"the queue there")
    if st.st_mode & 0o022:
        raise Fatal(f"{path} may be written by others (mode {stat.S_IMODE(st.st_mode):04o}): "
                    f"refusing to keep the queue there")


def let_users_through(path):
    """The queue directory may be entered by every user (0711), to reach its
    maildrop; it is never listable by them, and all else in it stays 0700."""
    mode = stat.S_IMODE(os.stat(path).st_mode)
    if mode & 0o011 != 0o011:
        os.chmod(path, mode | 0o011)


def make_maildrop(path):
    """maildrop/: ours, mode 1733 (set by chmod, not cut by the umask), no link."""
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise Fatal(f"{path} is not a directory (a link?): {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if st.st_uid != os.geteuid():
            raise Fatal(f"{path} belongs to {owner_name(st.st_uid)}: refusing to take mail from it")
        if stat.S_IMODE(st.st_mode) != MAILDROP_MODE:
            os.fchmod(fd, MAILDROP_MODE)
    finally:
        os.close(fd)


def maildrop_count(queue):
    """How many files wait in the queue's maildrop (None if it cannot be listed)."""
    try:
        with os.scandir(os.path.join(queue, MAILDROP)) as entries:
            return sum(1 for entry in entries if not entry.name.startswith("."))
    except OSError:
        return None


def open_own_file(path):
    """Open a file of minimail's (in the queue, the state file) for reading:
    never through a link, never a FIFO or a device (its directory belongs to
    the daemon's user; root may be the reader)."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ValueError("not a regular file")
    return os.fdopen(fd, "rb")


def read_small(f):
    raw = f.read(SMALL_FILE_MAX + 1)
    if len(raw) > SMALL_FILE_MAX:
        raise ValueError("too large")
    return raw


class DataReader:
    """Turns what follows DATA into the message's text.  The message ends only
    at CRLF.CRLF; dot-stuffing is undone; every bare CR or LF becomes CRLF, so a
    stored message has CRLF line ends only and nothing in it can end a message
    early at the hoster (no SMTP smuggling).  Whole chunks at a time, in C:
    lines are CRLF-ended, and the work is done on the run of complete lines."""

    NEWLINES = re.compile(rb"\r\n|\r|\n")

    def __init__(self):
        self.partial = b""        # the unfinished last line
        self.midline = False      # partial does not begin a line (a long one was passed on)
        self.done = False
        self.leftover = b""       # what came after the final dot: the next commands

    def feed(self, chunk):
        """The message text in this chunk (a list of pieces)."""
        data = self.partial + chunk
        end = data.rfind(b"\r\n")
        if end < 0:
            self.partial = data
            return self.cut_long_line()
        lead = b"" if self.midline else b"\r\n"   # a line starts here: unstuff it too
        lines, self.partial = lead + data[:end + 2], data[end + 2:]
        final = lines.find(b"\r\n.\r\n")
        if final >= 0:
            self.done = True
            self.leftover = lines[final + 5:] + self.partial
            lines = lines[:final + 2]
        self.midline = False
        text = [self.normalize(lines.replace(b"\r\n.", b"\r\n")[len(lead):])]
        return text if self.done else text + self.cut_long_line()

    def cut_long_line(self):
        """Pass on most of a line that is too long to wait for its end."""
        if len(self.partial) <= DATA_LINE_PIECE:
            return []
        keep = 1 if self.partial.endswith(b"\r") else 0    # maybe half a CRLF
        piece, self.partial = self.partial[:len(self.partial) - keep], self.partial[len(self.partial) - keep:]
        if not self.midline and piece.startswith(b"."):
            piece = piece[1:]
        self.midline = True
        return [self.normalize(piece)]

    def normalize(self, text):
        crlf = text.count(b"\r\n")
        if text.count(b"\r") == crlf and text.count(b"\n") == crlf:
            return text
        return self.NEWLINES.sub(b"\r\n", text)


#: LineReader.readline's answer for a line longer than allowed.
LINE_TOO_LONG = "line too long"


class LineReader:
    """Reads a client's command lines (after the bytes it sent early), bounded
    in size and time: a whole command line must come within `idle` seconds
    (so a client that sends a byte now and then is cut all the same), and
    each piece of a message's text within `idle` of the one before."""

    def __init__(self, sock, early, flow, idle):
        self.sock = sock
        self.buffer = bytearray(early)
        self.flow = flow
        self.idle = idle or None

    def fill(self, deadline=None):
        """Read more; socket.timeout when nothing comes in time."""
        if deadline is None:
            self.sock.settimeout(self.idle)
        else:
            left = deadline - time.monotonic()
            if left <= 0:
                raise socket.timeout("timed out")
            self.sock.settimeout(left if self.idle is None else min(left, self.idle))
        chunk = self.sock.recv(65536)
        self.flow.count += len(chunk)
        self.buffer += chunk
        return bool(chunk)

    def readline(self, limit):
        """A line without its line end; None at the end of input; LINE_TOO_LONG
        for a line over `limit` bytes (read to its end and dropped)."""
        too_long = False
        deadline = None if self.idle is None else time.monotonic() + self.idle
        while True:
            end = self.buffer.find(b"\n")
            if end >= 0:
                line = bytes(self.buffer[:end + 1])
                del self.buffer[:end + 1]
                if too_long or len(line) > limit:
                    return LINE_TOO_LONG
                return line.rstrip(b"\r\n")
            if len(self.buffer) > limit:
                too_long = True
                self.buffer.clear()
            if not self.fill(deadline):
                return None

    def has_line(self):
        return b"\n" in self.buffer

    def read_some(self, deadline=None):
        """What is buffered, or else the next chunk from the client (b"" at its end),
        within `idle` and the deadline."""
        if not self.buffer and not self.fill(deadline):
            return b""
        data = bytes(self.buffer)
        self.buffer.clear()
        return data

    def push_back(self, data):
        self.buffer[:0] = data


def smtp_hostname():
    """This machine's name for greetings, EHLO and Message-IDs (no DNS asked)."""
    name = socket.gethostname() or "localhost"
    return name if re.fullmatch(r"[A-Za-z0-9.-]{1,253}", name) else "localhost"


def received_line(helo, peer, host, queue_id, esmtp):
    """The Received: line minimail puts on top of a message it queues."""
    helo = re.sub(r"[^\x21-\x7e]", "?", helo)[:100] or "unknown"
    return (f"Received: from {helo} ({peer})\r\n\tby {host} (minimail {__version__}) with "
            f"{'ESMTP' if esmtp else 'SMTP'} id {queue_id};\r\n\t{rfc5322_date()}"
            f"\r\n").encode("ascii")


def rfc5322_date():
    """Now, as a mail's Date: wants it (time.strftime in the C locale: English)."""
    return time.strftime("%a, %d %b %Y %H:%M:%S %z")


#: The receiver's commands: verb -> Reception's method.
SMTP_VERBS = ("EHLO", "HELO", "MAIL", "RCPT", "DATA", "RSET", "NOOP", "VRFY", "HELP", "QUIT")
#: Asked for, but not offered by the queue's receiver.
NOT_OFFERED = {
    "STARTTLS": "502 5.5.1 STARTTLS is not offered here: minimail takes mail on loopback "
                "while the tunnel is down; send without TLS, or try again later",
    "AUTH": "502 5.5.1 AUTH is not offered here: minimail takes mail on loopback while "
            "the tunnel is down; send without AUTH, or try again later",
    "BDAT": "502 5.5.1 BDAT (CHUNKING) is not offered: use DATA",
}


class Receiver:
    """Serves an SMTP session itself when the tunnel cannot carry it, and
    keeps its mail in the spool."""

    def __init__(self, spool, settings, hostname, on_queued, room_for=lambda size, to_write: None):
        self.spool = spool
        self.settings = settings
        self.hostname = hostname
        self.on_queued = on_queued           # the queue runner learns of the mail
        self.room_for = room_for             # the runner's word on the queue's cap and disk
        self.committing = 0                  # bytes of messages being committed now

    def no_room(self, size, to_write, when):
        """The 452 reply if the queue cannot take size more bytes now (logged
        without addresses), else None."""
        refusal = self.room_for(size + self.committing, to_write)
        if refusal is None:
            return None
        reply, why = refusal
        log.warning("queue: cannot queue a message: %s (%s)", why, when)
        return reply

    def serve(self, session, why):
        """The session's log line says why the queue took it (from `why`)."""
        reception = Reception(self, session)
        try:
            reception.run()
        except OSError as exc:               # a reset
            reception.outcome = f"closed: {describe_error(exc)}"
        finally:
            reception.abandon_draft()
        session.end(f"queue ({why}): {reception.queued} message(s) queued"
                    + (f"; {reception.outcome}" if reception.outcome else ""))


class Reception:
    """One SMTP session served by minimail itself: its state and its commands."""

    def __init__(self, receiver, session):
        self.receiver = receiver
        self.session = session
        self.reader = LineReader(session.client, session.kept, session.sent,
                                 receiver.settings.idle_timeout)
        self.out, self.out_size = [], 0
        self.stalled = False             # the client did not read its replies in time
        self.greeted_as = None           # the client's EHLO or HELO name
        self.esmtp = False
        self.queued = 0
        self.outcome = None              # how the session ended, if not by QUIT
        self.draft = None
        self.reset()

    def reset(self):
        self.sender = None
        self.recipients = []
        self.body = None
        self.smtputf8 = False

    def send(self, *lines):
        for line in lines:
            data = smtp_reply_line(line)
            self.out.append(data)
            self.out_size += len(data)
        if self.out_size > REPLIES_PENDING_MAX:
            self.flush()                 # a pipelining client must read to go on

    def flush(self):
        """Send the replies so far: most often in one send(2) (a reply is small
        and the socket's buffer empty), so no timer is set for it.  A client
        that reads none of them within --idle-timeout is cut (socket.timeout)."""
        if self.out and not self.stalled:
            data, client = b"".join(self.out), self.session.client
            self.out, self.out_size = [], 0
            client.settimeout(self.reader.idle)
            try:
                sent = client.send(data)
                if sent < len(data):
                    client.sendall(data[sent:])
            except socket.timeout:
                self.stalled = True
                raise
            self.session.received.count += len(data)

    def run(self):
        from gevent import Timeout
        host = self.receiver.hostname
        self.send(f"220 {host} ESMTP minimail: the tunnel is down, mail is queued")
        try:
            while True:
                if not self.reader.has_line():
                    self.flush()
                line = self.reader.readline(COMMAND_LINE_MAX)
                if line is None:
                    return
                if line is LINE_TOO_LONG:
                    self.send("500 5.5.2 line too long (at most 512 bytes)")
                    continue
                if self.command(line) == "QUIT":
                    return
        except (socket.timeout, Timeout):
            idle = self.receiver.settings.idle_timeout
            self.send("421 4.4.2 minimail: idle too long, closing")
            self.outcome = f"closed: {'its replies went unread' if self.stalled else 'idle'} " \
                           f"for {idle:g} s"
        finally:
            try:
                self.flush()
            except OSError:
                pass

    def command(self, line):
        verb, _, argument = line.decode("utf-8", "replace").partition(" ")
        verb = verb.upper()
        if verb in SMTP_VERBS:
            return getattr(self, verb.lower())(argument.strip())
        self.send(NOT_OFFERED.get(verb, "502 5.5.1 command not recognized"))
        return None

    def ehlo(self, domain):
        if not domain:
            return self.send("501 5.5.4 EHLO needs a domain")
        self.greeted_as, self.esmtp = domain, True
        self.reset()
        host = self.receiver.hostname
        self.send(f"250-{host} at your service", "250-PIPELINING",
                  f"250-SIZE {self.receiver.settings.max_size}", "250-8BITMIME", "250-SMTPUTF8",
                  "250-ENHANCEDSTATUSCODES", "250 HELP")

    def helo(self, domain):
        if not domain:
            return self.send("501 5.5.4 HELO needs a domain")
        self.greeted_as, self.esmtp = domain, False
        self.reset()
        self.send(f"250 {self.receiver.hostname}")

    def mail(self, argument):
        if self.greeted_as is None:
            return self.send("503 5.5.1 send EHLO or HELO first")
        if self.sender is not None:
            return self.send("503 5.5.1 a transaction is under way: RSET first")
        parsed = parse_path("FROM", argument)
        if parsed is None:
            return self.send("501 5.5.4 syntax: MAIL FROM:<address> [parameters]")
        sender, params = parsed
        body, smtputf8, size = None, False, 0
        for name, value in params:
            if name == "SIZE" and value and value.isascii() and value.isdigit():
                size = int(value)
                if size > self.receiver.settings.max_size:
                    return self.send("552 5.3.4 message too big for the queue")
            elif name == "BODY" and value and value.upper() in ("7BIT", "8BITMIME"):
                body = value.upper()
            elif name == "SMTPUTF8" and value is None:
                smtputf8 = True
            else:
                return self.send(f"555 5.5.4 parameter {printable(name, 20)} not supported")
        refusal = sender and address_refusal(sender, smtputf8, "5.1.7", "sender")
        if refusal:
            return self.send(refusal)
        full = self.receiver.no_room(size, size, f"refused at MAIL, SIZE={size}")
        if full:
            return self.send(full)
        self.sender, self.body, self.smtputf8 = sender, body, smtputf8
        self.send("250 2.1.0 ok")

    def rcpt(self, argument):
        if self.sender is None:
            return self.send("503 5.5.1 send MAIL first")
        parsed = parse_path("TO", argument)
        if parsed is None or not parsed[0]:
            return self.send("501 5.5.4 syntax: RCPT TO:<address>")
        recipient, params = parsed
        if params:
            return self.send("555 5.5.4 RCPT parameters not supported")
        refusal = address_refusal(recipient, self.smtputf8, "5.1.3", "recipient")
        if refusal:
            return self.send(refusal)
        if len(self.recipients) >= MAX_RECIPIENTS:
            return self.send("452 4.5.3 too many recipients")
        self.recipients.append(recipient)
        self.send("250 2.1.5 ok")

    def data(self, argument):
        if argument:
            return self.send("501 5.5.4 DATA takes no argument")
        if not self.recipients:
            return self.send("503 5.5.1 send RCPT first" if self.sender is None
                             else "554 5.5.1 no valid recipients")
        self.send("354 end data with <CR><LF>.<CR><LF>")
        self.flush()
        return self.receive()

    def receive(self):
        """Read the message into a draft, then queue it durably: 250 only then."""
        spool = self.receiver.spool
        self.draft = spool.draft(self.receiver.settings.max_size)
        self.envelope = Envelope(self.draft.id, self.sender, self.recipients, time.time(), 0,
                                 body=self.body, smtputf8=self.smtputf8,
                                 next_try=time.time() + self.receiver.settings.queue_retry)
        self.draft.write_envelope(self.envelope)
        self.draft.write(received_line(self.greeted_as, self.session.peer, self.receiver.hostname,
                                       self.draft.id, self.esmtp))
        if self.read_text(DataReader()) == "QUIT":
            return "QUIT"
        self.finish_message()
        self.reset()
        return None

    def read_text(self, reader):
        """Feed what follows DATA into the draft up to its final dot, which must
        come within --idle-timeout plus a second for each DATA_RATE_LEAST bytes
        of --max-size; "QUIT" when the session ends first."""
        settings = self.receiver.settings
        allowed = settings.idle_timeout and \
            settings.idle_timeout + settings.max_size / DATA_RATE_LEAST
        deadline = allowed and time.monotonic() + allowed
        while not reader.done:
            try:
                chunk = self.reader.read_some(deadline or None)
            except socket.timeout:
                if not deadline or time.monotonic() < deadline:
                    raise                    # idle
                self.send(f"421 4.4.2 minimail: the message did not arrive within {allowed:g} s, "
                          f"closing")
                self.outcome = f"closed: DATA not done within {allowed:g} s"
                return "QUIT"
            if not chunk:
                self.outcome = "the client left in the middle of DATA"
                return "QUIT"
            for piece in reader.feed(chunk):
                self.draft.write(piece)
        self.reader.push_back(reader.leftover)
        return None

    def finish_message(self):
        draft, self.draft = self.draft, None
        if draft.size > self.receiver.settings.max_size:
            draft.discard()
            return self.send("552 5.3.4 message too big for the queue")
        if draft.error is not None:
            draft.discard()
            log.warning("queue: cannot write a message: %s", draft.error.strerror)
            return self.send(OUT_OF_SPACE)
        full = self.receiver.no_room(draft.size, draft.pending_size,
                                     f"refused after DATA, {draft.size} bytes")
        if full:
            draft.discard()
            return self.send(full)
        envelope = self.envelope
        envelope.size = draft.size
        envelope.body = envelope.body or ("8BITMIME" if draft.eight_bit else None)
        self.session.hold()                  # a drain's cut waits for the reply
        try:
            self.commit(draft, envelope)
        finally:
            self.session.release(self.flush)

    def commit(self, draft, envelope):
        try:
            self.receiver.committing += draft.size
            in_thread(self.receiver.spool.commit, draft)
        except OSError as exc:
            log.warning("queue: cannot queue a message: %s", exc.strerror)
            return self.send(OUT_OF_SPACE)
        finally:
            self.receiver.committing -= draft.size
        self.queued += 1
        log.info("queue: %s queued: %d bytes, %d recipient(s), from client %s", draft.id,
                 draft.size, len(self.recipients), self.session.peer)
        self.send(f"250 2.0.0 queued as {draft.id}")
        self.receiver.on_queued(envelope)

    def abandon_draft(self):
        if self.draft is not None:
            self.draft.discard()
            self.draft = None

    def rset(self, argument):
        self.reset()
        self.send("250 2.0.0 ok")

    def noop(self, argument):
        self.send("250 2.0.0 ok")

    def vrfy(self, argument):
        self.send("252 2.5.2 cannot verify here, but will take the mail and try")

    def help(self, argument):
        self.send("214 2.0.0 minimail keeps mail here while the tunnel to the hoster is down; "
                  "commands: EHLO HELO MAIL RCPT DATA RSET NOOP VRFY HELP QUIT")

    def quit(self, argument):
        self.send("221 2.0.0 bye")
        return "QUIT"


def address_refusal(address, smtputf8, status, role):
    """The 553 for an address the queue could not pass on byte for byte as
    it was given, or None: the runner sends it verbatim later."""
    if "\ufffd" in address:
        return f"553 {status} the {role} address is not valid UTF-8"
    if not address.isascii() and not smtputf8:
        return (f"553 5.6.7 a non-ASCII {role} address needs SMTPUTF8 "
                f"(MAIL FROM:<...> SMTPUTF8)")
    if len(address.encode()) > ADDRESS_MAX:
        return f"553 {status} the {role} address is too long (at most {ADDRESS_MAX} bytes)"
    if not address.isprintable() or "<" in address or ">" in address:
        return f"553 {status} the {role} address holds a control character, < or >"
    return None


class CountedReads:
    """The runner's connection through a child: what it reads counts as the far
    side's bytes on that child (as a session's copy counts them), so the stale
    check sees a tunnel that carries the queue alive.  The rest is the socket's."""

    def __init__(self, sock, flow):
        self.sock = sock
        self.flow = flow

    def __getattr__(self, name):
        return getattr(self.sock, name)

    def recv(self, size, flags=0):
        data = self.sock.recv(size, flags)
        if not flags & socket.MSG_PEEK:           # a look (peek()) is no byte read
            self.flow.count += len(data)
        return data

    def recv_into(self, *args):
        count = self.sock.recv_into(*args)
        self.flow.count += count
        return count


def parse_path(keyword, argument):
    """(address, [(PARAM, value or None)]) from 'FROM:<addr> PARAM=value ...',
    or None if it is not that."""
    match = re.fullmatch(rf"(?i){keyword}:\s*<([^<>]*)>((?:\s+\S+)*)\s*", argument)
    if match is None:
        return None
    params = []
    for word in match[2].split():
        name, equals, value = word.partition("=")
        params.append((name.upper(), value if equals else None))
    return match[1], params


class Schedule(collections.abc.MutableMapping):
    """The messages waiting in the queue (queue ID -> Envelope, oldest first),
    their total size, and when each is due.  Times are kept on the monotonic
    clock: a wall clock stepped back cannot hold a retry.  The wall time
    (next_try) is stored only for display and for a restart, and a next_try
    read back is never believed further off than the schedule would set it."""

    def __init__(self, first_retry, clocks=(time.monotonic, time.time)):
        self.first_retry = first_retry
        self.monotonic, self.wall = clocks
        self.envelopes = {}
        self.bytes = 0                    # the sizes of the messages waiting, added up

    def __getitem__(self, queue_id):
        return self.envelopes[queue_id]

    def __setitem__(self, queue_id, envelope):
        if queue_id in self.envelopes:
            self.bytes -= self.envelopes[queue_id].size
        if envelope.due is None:
            longest = retry_delay(envelope.attempts, self.first_retry)
            ahead = min(max(0.0, envelope.next_try - self.wall()), longest)
            envelope.due = self.monotonic() + ahead
        self.envelopes[queue_id] = envelope
        self.bytes += envelope.size

    def __delitem__(self, queue_id):
        self.bytes -= self.envelopes.pop(queue_id).size

    def __iter__(self):
        return iter(self.envelopes)

    def __len__(self):
        return len(self.envelopes)

    def retry_in(self, envelope, delay):
        """Make a message due again in delay seconds (at most RETRY_MAX)."""
        delay = min(delay, RETRY_MAX)
        envelope.due = self.monotonic() + delay
        envelope.next_try = self.wall() + delay

    def due(self, everything=False):
        now = self.monotonic()
        return [e for e in self.envelopes.values() if everything or e.due <= now]

    def next_due(self):
        """When the next message is due (monotonic), or None."""
        return min((e.due for e in self.envelopes.values()), default=None)

    def wait(self):
        """Seconds until the next message is due, at most RETRY_MAX; None if none waits."""
        due = self.next_due()
        return None if due is None else min(RETRY_MAX, max(0.0, due - self.monotonic()))

    def next_try(self):
        """The wall time of the next try, for display."""
        due = self.next_due()
        return None if due is None else self.wall() + due - self.monotonic()


class Intake(enum.Enum):
    """What became of one file of the maildrop."""
    QUEUED = "queued"
    REFUSED = "refused"              # moved to refused/, and logged
    GONE = "gone"                    # removed meanwhile (by its owner)
    LATER = "later"                  # the queue cannot take it now (a full disk)


class Maildrop:
    """The queue's maildrop/: what the sendmail command left while minimail
    could not be reached, one file a message, written by a local user (the
    file's owner).  Taken in at start, on flush and every MAILDROP_EVERY
    seconds, as hostile input, each file in the thread pool: one that passes
    becomes a queued message through the spool's commit and is then removed
    (a crash between the two queues it twice at most, never loses it); one
    that does not is moved to refused/ and logged."""

    def __init__(self, spool, settings, hostname, on_queued, on_change=lambda: None,
                 room_for=lambda size, to_write: None):
        from gevent.event import Event
        self.spool, self.settings, self.hostname = spool, settings, hostname
        self.on_queued, self.on_change = on_queued, on_change
        self.room_for = room_for         # None, or (reply, why) when the queue is full
        self.wake = Event()
        self.fd = os.open(spool.path(MAILDROP),
                          os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        self.waiting = 0                 # files in it at the last look
        self.stuck = set()               # inodes taken in (or refused) that stay there

    def flush(self):
        self.wake.set()

    def run(self):
        while True:
            self.wake.clear()
            more = self.take_in_all()
            self.wake.wait(0 if more else MAILDROP_EVERY)

    def take_in_all(self):
        """One look: take in what waits; whether more may wait (a full batch).
        A failing file system ends the look; the next one tries again."""
        names, outcome = [], None
        try:
            names = in_thread(self.waiting_names)
            for name in names:
                outcome, envelopes = in_thread(self.take_in, name)
                for envelope in envelopes:
                    self.on_queued(envelope)
                if outcome is Intake.LATER:
                    break
        except OSError as exc:
            log.warning("maildrop: cannot take it in now: %s", describe_error(exc))
            outcome = Intake.LATER
        self.waiting = in_thread(maildrop_count, self.spool.root) or 0
        self.on_change()
        return len(names) == MAILDROP_BATCH and outcome is not Intake.LATER

    def waiting_names(self):
        """Up to MAILDROP_BATCH names in the maildrop, oldest first; dot names
        (files still being written) skipped."""
        found = []
        with os.scandir(self.fd) as entries:
            for entry in entries:
                if entry.name.startswith(".") or entry.inode() in self.stuck:
                    continue
                try:
                    found.append((entry.stat(follow_symlinks=False).st_mtime_ns, entry.name))
                except OSError:
                    continue
                if len(found) == MAILDROP_BATCH:
                    break
        return [name for _, name in sorted(found)]

    def take_in(self, name):
        """One file (blocking: in the thread pool): (Intake, envelopes queued)."""
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                         dir_fd=self.fd)
        except FileNotFoundError:
            return Intake.GONE, []
        except OSError as exc:
            if out_of_descriptors(exc):
                return Intake.LATER, []
            why = "a symbolic link" if exc.errno == errno.ELOOP else \
                f"cannot be opened: {describe_error(exc)}"
            return self.refuse(name, why), []
        with os.fdopen(fd, "rb") as dropped:
            st = os.fstat(fd)
            try:
                envelope = read_maildrop_envelope(dropped, st, self.settings.max_size)
            except ValueError as exc:
                return self.refuse(name, str(exc)), []
            refusal = self.room_for(st.st_size, st.st_size)
            if refusal is not None:
                log.warning("maildrop: cannot queue a file of uid %d now: %s", st.st_uid,
                            refusal[1])
                return Intake.LATER, []
            try:
                queued = self.queue(dropped, st.st_size - dropped.tell(), st.st_uid, *envelope)
            except OSError as exc:
                log.warning("maildrop: cannot queue a file of uid %d now: %s", st.st_uid,
                            exc.strerror)
                return Intake.LATER, []
        log.info("maildrop: a file of uid %d taken in: queued as %s (%d bytes, %d recipient(s))",
                 st.st_uid, queued.id, queued.size, len(queued.recipients))
        self.remove(name, st)
        return Intake.QUEUED, [queued]

    def queue(self, dropped, size, owner, sender, recipients, body, smtputf8):
        """One queued message (blocking): through a draft and the spool's commit."""
        draft, now = self.spool.draft(), time.time()
        envelope = Envelope(draft.id, sender, recipients, now, 0, body=body, smtputf8=smtputf8,
                            next_try=now)
        try:
            draft.write_envelope(envelope)
            draft.write(local_received_line(owner, self.hostname, draft.id))
            copy_as_crlf(dropped, size, draft)
            envelope.size = draft.size
            envelope.body = body or ("8BITMIME" if draft.eight_bit else None)
            self.spool.commit(draft)
        except BaseException:
            draft.discard()
            raise
        return envelope

    def remove(self, name, st):
        """Remove a file taken in: by name, if it is still the file that was read."""
        try:
            now = os.stat(name, dir_fd=self.fd, follow_symlinks=False)
            if (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino):
                os.unlink(name, dir_fd=self.fd)
                return
            log.warning("maildrop: %s was replaced while it was taken in: the new file waits "
                        "for the next look", printable(name, 80))
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("maildrop: cannot remove %s, taken in: %s (not taken in again)",
                        printable(name, 80), exc.strerror)
            self.stuck.add(st.st_ino)

    def refuse(self, name, why):
        """Move a file that is not taken in aside, to refused/ (never read)."""
        aside = os.path.join(REFUSED, new_queue_id())
        try:
            owner = os.stat(name, dir_fd=self.fd, follow_symlinks=False).st_uid
            os.rename(name, os.path.join(self.spool.root, aside), src_dir_fd=self.fd)
        except FileNotFoundError:
            return Intake.GONE
        except OSError as exc:
            log.warning("maildrop: refused %s (%s), and cannot move it aside: %s",
                        printable(name, 80), why, exc.strerror)
            with contextlib.suppress(OSError):
                self.stuck.add(os.stat(name, dir_fd=self.fd, follow_symlinks=False).st_ino)
            return Intake.REFUSED
        log.warning("maildrop: refused %s of uid %d (%s): moved to %s", printable(name, 80),
                    owner, why, aside)
        return Intake.REFUSED


#: What a maildrop file may be instead of a regular file: what the log says.
FILE_KINDS = {stat.S_IFIFO: "a FIFO", stat.S_IFDIR: "a directory", stat.S_IFSOCK: "a socket",
              stat.S_IFCHR: "a device", stat.S_IFBLK: "a device", stat.S_IFLNK: "a symbolic link"}


def read_maildrop_envelope(dropped, st, max_size):
    """The envelope of an open maildrop file, checked, past its first line:
    (sender, recipients, body, smtputf8); ValueError says why it is refused."""
    if not stat.S_ISREG(st.st_mode):
        raise ValueError(f"not a regular file: {FILE_KINDS.get(stat.S_IFMT(st.st_mode), 'other')}")
    if st.st_nlink != 1:
        raise ValueError(f"{st.st_nlink} hard links")
    if st.st_size > max_size + MAILDROP_ENVELOPE_MAX:
        raise ValueError(f"{st.st_size} bytes: larger than --max-size")
    line = dropped.readline(MAILDROP_ENVELOPE_MAX + 1)
    if not line.startswith(MAILDROP_LINE) or not line.endswith(b"\r\n"):
        raise ValueError("its first line is no envelope")
    if st.st_size - len(line) > max_size:
        raise ValueError(f"{st.st_size - len(line)} bytes: larger than --max-size")
    return checked_maildrop_envelope(line[len(MAILDROP_LINE):])


def checked_maildrop_envelope(raw):
    """(sender, recipients, body, smtputf8) from a maildrop envelope's JSON,
    checked as the receiver checks MAIL and RCPT (ValueError if it is not)."""
    import json
    try:
        data = json.loads(raw)
    except RecursionError:
        raise ValueError("its envelope is nested too deep") from None
    if not isinstance(data, dict) or set(data) != {"sender", "recipients", "body", "smtputf8"}:
        raise ValueError("its envelope is not one")
    sender, recipients, body, smtputf8 = (data[k] for k in ("sender", "recipients", "body",
                                                              "smtputf8"))
    if not isinstance(recipients, list) or not 0 < len(recipients) <= MAX_RECIPIENTS \
            or not valid_address(sender) \
            or not all(valid_address(r) and r for r in recipients):
        raise ValueError("bad addresses in its envelope")
    if body not in (None, "7BIT", "8BITMIME") or not isinstance(smtputf8, bool):
        raise ValueError("a bad body type in its envelope")
    return sender, recipients, body, smtputf8 or not all(a.isascii() for a in (sender, *recipients))


def copy_as_crlf(source, size, draft):
    """At most size bytes of source into draft, every line end made CRLF (a
    bare CR or LF too, as the queue keeps every message)."""
    carry = b""
    while size > 0:
        chunk = source.read(min(CHUNK_SIZE, size))
        if not chunk:
            break
        size -= len(chunk)
        data = carry + chunk
        carry = b"\r" if data.endswith(b"\r") else b""
        draft.write(crlf_only(data[:len(data) - len(carry)]))
    if carry:
        draft.write(b"\r\n")


def crlf_only(text):
    """text with every line end CRLF: a bare CR or LF becomes one."""
    crlf = text.count(b"\r\n")
    if text.count(b"\r") == crlf and text.count(b"\n") == crlf:
        return text
    return DataReader.NEWLINES.sub(b"\r\n", text)


def local_received_line(uid, host, queue_id):
    """The Received: line on top of a message from the maildrop: the file's
    owner submitted it."""
    try:
        name = re.sub(r"[^\x21-\x7e]", "?", pwd.getpwuid(uid).pw_name)[:64]
    except KeyError:
        name = "unknown"
    return (f"Received: from local user {name} (uid {uid})\r\n\tby {host} (minimail "
            f"{__version__}) with local id {queue_id};\r\n\t{rfc5322_date()}\r\n").encode("ascii")


class QueueRunner:
    """Delivers the spool through the tunnel, as one more client of the
    supervisor (so the tunnel starts on demand and lingers as usual).  It runs
    when the tunnel comes up for anyone, at each message's next try, at start,
    and on flush.  It alone changes `waiting` and the files in the spool (its
    writes take turns under `writing`).  Nothing one message does stops it:
    every step for a message has an error boundary, and a message leaves
    `waiting` only after the disk has changed."""

    def __init__(self, spool, supervisor, settings, hostname, on_change=lambda: None):
        from gevent.event import Event
        from gevent.lock import Semaphore
        self.spool = spool
        self.supervisor = supervisor
        self.settings = settings
        self.hostname = hostname
        self.on_change = on_change
        self.waiting = Schedule(settings.queue_retry)
        self.loaded = False
        self.failed = 0                   # messages in failed/
        self.untold = 0                   # of them, those nobody was told about
        self.wake = Event()
        self.wake_at = None               # when the runner's timer rings, monotonic (None: never)
        self.everything = True            # deliver all, not only what is due
        self.delivering = False
        self.stopping = False             # minimail stops: end after the current message
        self.cleaned_at = None
        self.writing = Semaphore()        # one write to the spool at a time
        self.answering = Semaphore()      # one look at `minimail delete`'s requests at a time

    # -- what others tell it -------------------------------------------------

    def queued(self, envelope):
        """The receiver queued a message: its first try comes at its next_try
        (the runner wakes only if its timer would ring later than that)."""
        self.waiting[envelope.id] = envelope
        if self.wake_at is None or envelope.due < self.wake_at:
            self.wake.set()
        self.on_change()

    def flush(self):
        """Deliver everything now (`minimail flush`, SIGUSR1): ends ssh's backoff too."""
        log.info("queue: flush: %d message(s) to deliver", len(self.waiting))
        self.supervisor.flush()
        self.everything = True
        self.wake.set()

    def stop(self):
        """minimail is stopping: finish the message under way (the drain waits
        for it), then end; the rest stay queued as they are, no attempt counted."""
        self.stopping = True
        self.wake.set()

    def tunnel_up(self):
        """The tunnel came up for someone: it carries the queue too (but the
        runner's own connection does not wake the runner)."""
        if not self.delivering and self.waiting:
            self.everything = True
            self.wake.set()

    def room_for(self, size, to_write):
        """None if the queue can take a message of size bytes (to_write of them
        still to be written), else (the reply, why): the queue is at
        --max-queue-size, or its disk would keep less than its reserve."""
        held, cap = self.waiting.bytes, self.settings.max_queue_size
        if held + size > cap:
            return QUEUE_FULL, (f"the queue holds {held} bytes in {len(self.waiting)} "
                                f"message(s), --max-queue-size is {cap}")
        try:
            spare_bytes, spare_inodes = self.spool.free_space()
        except OSError as exc:
            return OUT_OF_SPACE, f"cannot see the free space on the queue's disk: {exc.strerror}"
        if spare_bytes < to_write or (spare_inodes is not None and spare_inodes < 1):
            return OUT_OF_SPACE, ("No space left on device for new mail (the queue keeps the "
                                  f"last {RESERVE_SHARE:.0%} of its disk, {RESERVE_BYTES[0] >> 10} "
                                  f"KiB to {RESERVE_BYTES[1] >> 20} MiB and {RESERVE_INODES[0]} to "
                                  f"{RESERVE_INODES[1]} inodes, for its own writes)")
        return None

    def describe(self):
        waiting = list(self.waiting.values())
        return {
            "dir": self.spool.root,
            "count": len(waiting),
            "oldest": min((e.arrived for e in waiting), default=None),
            "next_try": self.waiting.next_try(),
            "failed": self.failed,
            "untold": self.untold,
        }

    # -- the runner greenlet -------------------------------------------------

    def run(self):
        while not self.stopping:
            self.wake.clear()
            try:
                self.run_once()
            except Exception as exc:          # the last boundary: the runner never dies
                log.error("queue: the runner's pass failed (%s): trying again in %s",
                          describe_failure(exc), format_duration(self.settings.queue_retry))
                log.debug("queue: where: %s", where_it_failed(exc))
                self.wake_at = self.waiting.monotonic() + self.settings.queue_retry
            if self.stopping:
                break
            self.wake.wait(None if self.wake_at is None
                           else min(RETRY_MAX, max(0.0, self.wake_at - self.waiting.monotonic())))

    def run_once(self):
        """One pass: expire, deliver what is due, finish what could not be finished."""
        if not self.loaded:
            self.load()
        self.expire(time.time())
        due = self.waiting.due(self.everything)
        self.everything = False
        for envelope in due:
            if not envelope.recipients:       # delivered, but its removal failed: again
                self.finish(envelope, [], None)
        due = [e for e in due if e.recipients and self.waiting.get(e.id) is e]
        if due:
            self.deliver(due)
        if self.cleaned_at is None or self.waiting.monotonic() - self.cleaned_at > RETRY_MAX:
            self.cleaned_at = self.waiting.monotonic()
            with self.writing:
                in_thread(self.spool.forget_old_failures, time.time())
            self.count_failed()
        self.wake_at = self.waiting.next_due()

    def load(self):
        """What waits in the spool, at start."""
        for envelope in self.spool.load():
            self.waiting[envelope.id] = envelope
        self.count_failed()
        self.loaded = True
        if self.waiting:
            log.info("queue: %d message(s) waiting in %s", len(self.waiting), self.spool.root)
        self.on_change()

    def count_failed(self):
        failed = self.spool.load("failed")
        self.failed = len(failed)
        self.untold = sum(untold(envelope, self.settings.admin) for envelope in failed)

    def deliver(self, envelopes):
        """Through the tunnel: one connection for all these messages, and a
        fresh one after a message's own error has left a connection in doubt."""
        self.delivering = True
        try:
            left = list(envelopes)
            while left and not self.stopping:
                with self.supervisor.visit() as tunnel:
                    left = self.deliver_through_tunnel(tunnel, left)
        finally:
            self.delivering = False

    def deliver_through_tunnel(self, tunnel, envelopes):
        """One connection: what is left to try on a fresh one (after a message's
        own error), else [] (all were tried, the connection failed and they
        are deferred, or minimail stops and they stay as they are)."""
        try:
            upstream, child = tunnel.connect(self.settings.wait)
        except (TunnelUnavailable, OutOfDescriptors) as exc:
            for envelope in envelopes if not self.stopping else ():
                self.defer(envelope, f"the tunnel cannot be had: {exc}")
            return []
        upstream = CountedReads(upstream, child.far)    # its replies show the tunnel alive
        smtp = Hoster(upstream, self.hostname)
        left = list(envelopes)
        try:
            smtp.greet()
            while left and not self.stopping:
                if not self.deliver_guarded(smtp, left[0]):     # the connection is in doubt:
                    return [] if self.stopping else left[1:]    # no QUIT into a half-sent text
                left.pop(0)
            smtp.quit()
            return []
        except DialogueFailed as exc:         # its text names steps and codes only
            log.warning("queue: the dialogue with the hoster ended: %s", exc)
            for envelope in left if not self.stopping else left[:1]:
                self.defer(envelope, f"the connection to the hoster failed: {smtp_error(exc)}")
            return []
        finally:
            upstream.close()

    def deliver_guarded(self, smtp, envelope):
        """deliver_one inside the message's error boundary: True to go on over
        this connection; False when the message's own trouble (its file gone or
        unreadable, its envelope, anything unexpected) has left the connection
        in doubt: the message is then forgotten or deferred.  The connection's
        own errors (DialogueFailed) go to the caller."""
        if self.waiting.get(envelope.id) is not envelope:
            return True                       # deleted meanwhile
        try:
            self.deliver_one(smtp, envelope)
            return True
        except DialogueFailed:
            raise
        except MessageGone:
            self.forget(envelope)
        except Exception as exc:              # the message's own: the boundary
            self.step_failed("send it", envelope, exc)
            self.defer(envelope, f"it could not be sent: {describe_failure(exc)}")
        return False

    def deliver_one(self, smtp, envelope):
        """One transaction: each recipient ends delivered, deferred or failed."""
        with self.spool.open_message(envelope) as message:
            results = smtp.transaction(envelope, message)
        self.settle(envelope, results)

    def settle(self, envelope, results):
        """Act on the hoster's answers: {recipient: (code, reply)}."""
        if self.waiting.get(envelope.id) is not envelope:
            log.info("queue: %s: deleted while it was sent: nothing more done", envelope.id)
            return
        delivered = [r for r, (code, _) in results.items() if 200 <= code < 300]
        deferred = [r for r, (code, _) in results.items() if not 200 <= code < 300 and code < 500]
        failed = [(r, reply) for r, (code, reply) in results.items() if code >= 500]
        codes = sorted({code for code, _ in results.values()})
        log.info("queue: %s: %d delivered, %d deferred, %d refused (%s)", envelope.id,
                 len(delivered), len(deferred), len(failed), ", ".join(map(str, codes)))
        envelope.recipients = [r for r in envelope.recipients if r not in delivered]  # never again
        if failed and not self.bounce(envelope, failed, expired=False):
            deferred += [recipient for recipient, _ in failed]
        self.finish(envelope, deferred, results[deferred[0]][1] if deferred else None)

    def defer(self, envelope, reason):
        """Nothing was delivered this time: try again later."""
        log.info("queue: %s: deferred (%s)", envelope.id, printable(reason.partition(":")[0], 80))
        self.finish(envelope, envelope.recipients, reason)

    def finish(self, envelope, still_to_do, last_reply):
        """Keep the message for what is still to do, or let it leave the queue.
        Never raises: what cannot be written stays waiting, as it is in memory."""
        if self.waiting.get(envelope.id) is not envelope:
            log.info("queue: %s: deleted meanwhile: nothing more done", envelope.id)
            return
        envelope.recipients = list(still_to_do)
        if still_to_do:
            self.reschedule(envelope, last_reply)
        else:
            self.let_go(envelope)
        self.on_change()

    def reschedule(self, envelope, last_reply):
        envelope.attempts += 1
        delay = retry_delay(envelope.attempts, self.settings.queue_retry)
        self.waiting.retry_in(envelope, delay)
        envelope.last_reply = printable(last_reply or "", 300) or None
        if self.write("save its envelope", envelope, self.spool.save, envelope):
            log.info("queue: %s: next try in %s", envelope.id, format_duration(delay))

    def let_go(self, envelope):
        """Nothing is left to do: the message moves to failed/ (some recipient
        failed) or is removed; if that cannot be done now, it is tried again."""
        failing = bool(envelope.failures)
        step, write = ("move it to failed/", self.spool.fail) if failing \
            else ("remove it", self.spool.remove)
        if self.write(step, envelope, write, envelope):
            self.drop(envelope)
            self.failed += failing
            self.untold += failing and untold(envelope, self.settings.admin)
        elif self.waiting.get(envelope.id) is envelope:
            self.waiting.retry_in(envelope, self.settings.queue_retry)

    def write(self, step, envelope, function, *args):
        """One write to the spool for a message, in turn and inside its error
        boundary: True once it is on disk.  A message whose text is gone is
        forgotten; after any other error (a full disk) it stays as it is."""
        try:
            with self.writing:
                if self.waiting.get(envelope.id) is not envelope:
                    log.info("queue: %s: deleted meanwhile: nothing written", envelope.id)
                    return False
                in_thread(function, *args)
            return True
        except MessageGone:
            self.forget(envelope)
        except Exception as exc:              # the boundary of this step
            self.step_failed(step, envelope, exc)
        return False

    def drop(self, envelope):
        if self.waiting.get(envelope.id) is envelope:
            del self.waiting[envelope.id]

    def forget(self, envelope):
        """A message whose text is gone (removed by hand): forgotten, and what
        is left of it (its envelope) removed; never written again."""
        self.drop(envelope)
        log.warning("queue: %s: its message file is gone (removed by hand?): forgotten",
                    envelope.id)
        try:
            remove_quietly(self.spool.path("queued", f"{envelope.id}.env"))
        except OSError as exc:
            log.warning("queue: %s: cannot remove its envelope: %s", envelope.id, exc.strerror)
        self.on_change()

    def step_failed(self, step, envelope, exc):
        log.warning("queue: %s: cannot %s (%s): it stays in the queue", envelope.id, step,
                    describe_failure(exc))
        log.debug("queue: %s: where: %s", envelope.id, where_it_failed(exc))

    def expire(self, now):
        """What waited longer than --queue-lifetime goes back to its sender."""
        for envelope in list(self.waiting.values()):
            if now - envelope.arrived > self.settings.queue_lifetime and envelope.recipients:
                try:
                    self.expire_one(envelope)
                except MessageGone:
                    self.forget(envelope)
                except Exception as exc:      # the boundary of this message's expiry
                    self.step_failed("bounce it", envelope, exc)

    def expire_one(self, envelope):
        days = self.settings.queue_lifetime / 86400
        reason = (f"4.4.7 not delivered in {days:g} days; the last try said: "
                  f"{envelope.last_reply or 'nothing'}")
        log.info("queue: %s: expired after %g days", envelope.id, days)
        if self.bounce(envelope, [(r, reason) for r in envelope.recipients], expired=True):
            self.finish(envelope, [], None)
        else:
            self.finish(envelope, envelope.recipients, "expired; its bounce could not be queued")

    def bounce(self, envelope, failures, expired):
        """Tell the sender (or, for a bounce or mail without a sender, the admin
        address) what failed, in a delivery status notification queued like
        any mail, from the null sender.  True once done, or when there is
        nobody to tell; False if it could not be queued: the failures are then
        not noted and the failed recipients stay to do (never failed/ without
        its bounce)."""
        noted = [[recipient, printable(reply, 300)] for recipient, reply in failures]
        envelope.failures += noted
        done = False
        try:
            if untold(envelope, self.settings.admin):
                log.info("queue: %s: not bounced (it is a bounce, or has no sender), and no "
                         "other admin address to tell: kept in failed/", envelope.id)
                done = True
            else:
                done = self.queue_bounce(envelope, failures, expired)
        finally:
            if not done:
                del envelope.failures[-len(noted):]
        return done

    def queue_bounce(self, envelope, failures, expired):
        to = envelope.sender if envelope.sender and not envelope.bounce else self.settings.admin
        try:
            with self.spool.open_message(envelope) as message:
                header = read_header(message)
        except MessageGone:
            raise
        except SpoolError as exc:
            log.warning("queue: %s: cannot read it for its bounce (%s): its refused recipient(s) "
                        "stay to do", envelope.id, exc)
            return False
        text = make_bounce(envelope, failures, header, self.settings.mail_name, expired, to)
        draft = self.spool.draft()
        notice = Envelope(draft.id, "", [to], time.time(), len(text),
                          body=None if text.isascii() else "8BITMIME",
                          smtputf8=not to.isascii(), bounce=True, next_try=time.time())
        draft.write_envelope(notice)
        draft.write(text)
        try:
            with self.writing:
                in_thread(self.spool.commit, draft)
        except OSError as exc:
            log.warning("queue: %s: cannot queue its bounce (%s): its refused recipient(s) "
                        "stay to do", envelope.id, exc.strerror)
            return False
        self.waiting[notice.id] = notice
        log.info("queue: %s: bounced as %s", envelope.id, notice.id)
        return True

    # -- `minimail delete` ---------------------------------------------------

    def delete(self, ids):
        """Remove messages by ID, waiting or failed, without a bounce: {ID: where
        it was ("queued", "failed"), or None}.  Forgotten at once: one that is
        being sent just now is never written back."""
        with self.writing:
            results = {queue_id: self.delete_one(queue_id) for queue_id in ids}
        if "failed" in results.values():
            self.count_failed()
        self.on_change()
        return results

    def delete_one(self, queue_id):
        envelope = self.waiting.get(queue_id)
        try:
            where = in_thread(self.spool.delete, queue_id)
        except OSError as exc:
            log.warning("queue: %s: cannot delete it: %s", queue_id, exc.strerror)
            return "error"
        if envelope is not None:
            self.drop(envelope)
            where = where or "queued"        # its file was gone already: forgotten now
        log.info("queue: %s: %s", queue_id, f"deleted ({where})" if where else "not there")
        return where

    def take_requests(self):
        """SIGUSR2: answer the requests `minimail delete` left in tmp/."""
        requests = DeleteRequests(self.spool)
        with self.answering:
            try:
                tokens = requests.waiting()
            except OSError as exc:
                return log.warning("queue: cannot look for delete requests: %s", exc.strerror)
            for token in tokens:
                try:
                    in_thread(requests.answer, token, self.delete(requests.read(token)))
                except (OSError, ValueError) as exc:
                    log.warning("queue: a delete request cannot be answered: %s",
                                describe_failure(exc))
                    requests.drop(token)


def describe_failure(exc):
    """What went wrong in a step of the runner, fit for the log (no addresses)."""
    if isinstance(exc, OSError):
        return exc.strerror or type(exc).__name__
    if isinstance(exc, SpoolError) or type(exc) is ValueError:    # minimail's own words
        return printable(str(exc), 120)
    return f"unexpected {type(exc).__name__}"


def where_it_failed(exc):
    """The code lines an exception passed, without its message (which may hold addresses)."""
    import traceback
    return " / ".join(f"{frame.name}:{frame.lineno}"
                      for frame in traceback.extract_tb(exc.__traceback__))


def untold(envelope, admin):
    """Whether a failed message is one nobody is told about: its bounce goes to
    its sender, but a bounce (or mail with no sender) that fails goes to the
    admin address only when that is not what failed (a double bounce)."""
    if envelope.sender and not envelope.bounce:
        return False
    refused = {recipient.lower() for recipient, _ in envelope.failures}
    return not admin or admin.lower() in refused


def retry_delay(attempts, first):
    """Seconds until a queued mail's next try after its n-th: first, twice that,
    and so on, at most RETRY_MAX (whatever n, even from a hostile envelope)."""
    return min(RETRY_MAX, first * 2 ** min(max(attempts, 1) - 1, 30))


def smtp_error(exc):
    """A short, safe description of what went wrong talking to the hoster
    (for the queue's listing: the hoster's own refusal is quoted, escaped)."""
    if isinstance(exc, DialogueFailed):
        return f"{exc} ({exc.reply})" if exc.reply else str(exc)
    if isinstance(exc, OSError):
        return describe_error(exc)
    return printable(str(exc), 200) or type(exc).__name__


#: The result of an address the hoster cannot be given as it was accepted.
NOT_PASSABLE = (553, "553 5.6.7 a non-ASCII address, and the message was not sent with SMTPUTF8: "
                     "it cannot be passed on as it was accepted")


class Hoster:
    """The runner's side of an SMTP dialogue with the hoster, over a connection
    through the tunnel: minimail's own SmtpClient on a gevent socket."""

    def __init__(self, upstream, hostname):
        self.client = SmtpClient(upstream)
        self.hostname = hostname

    def greet(self):
        self.client.greet(self.hostname)

    def transaction(self, envelope, message):
        """MAIL, RCPT for each recipient, DATA: {recipient: (code, reply)}.  An
        address is sent as it was accepted, or not at all: a non-ASCII one
        without SMTPUTF8 (only an envelope from outside has one) is refused on
        its own."""
        extensions = self.client.extensions
        if envelope.smtputf8 and "SMTPUTF8" not in extensions:
            refusal = (553, "553 5.6.7 the hoster takes no non-ASCII addresses (no SMTPUTF8)")
            return {r: refusal for r in envelope.recipients}
        if not (envelope.smtputf8 or envelope.sender.isascii()):
            return {r: NOT_PASSABLE for r in envelope.recipients}
        results = {r: NOT_PASSABLE for r in envelope.recipients
                   if not (envelope.smtputf8 or r.isascii())}
        recipients = [r for r in envelope.recipients if r not in results]
        if not recipients:
            return results
        parameters = ["SMTPUTF8"] if envelope.smtputf8 else []
        if "8BITMIME" in extensions and (envelope.body == "8BITMIME" or
                                         (envelope.body is None and eight_bit(message))):
            parameters.append("BODY=8BITMIME")
        if "SIZE" in extensions:
            parameters.append(f"SIZE={envelope.size}")
        done = self.client.transaction(envelope.sender, recipients, parameters, message)
        results.update((r, (reply.code, str(reply))) for r, reply in done.results.items())
        return results

    def quit(self):
        self.client.quit()


def eight_bit(message):
    """Whether the rest of an open message has 8-bit bytes; it is read again from
    where it was (an envelope from a message's first line does not say)."""
    start = message.tell()
    try:
        while True:
            chunk = message.read(CHUNK_SIZE)
            if not chunk:
                return False
            if not chunk.isascii():
                return True
    finally:
        message.seek(start)


def read_header(message):
    """The header of a stored message (up to its first empty line), bounded."""
    header = message.read(HEADER_QUOTE_MAX)
    end = header.find(b"\r\n\r\n")
    return header[:end + 2] if end >= 0 else header


def enhanced_status(reply, expired):
    """The RFC 3463 status for a failed recipient: from the reply, or a default."""
    match = re.search(r"\b([245]\.\d{1,3}\.\d{1,3})\b", reply)
    if match:
        return match[1]
    return "4.4.7" if expired else "5.0.0"


def make_bounce(envelope, failures, header, hostname, expired, to=None):
    """A delivery status notification (RFC 3464) to the sender (or to `to`): a
    short text in plain words, message/delivery-status per recipient, and the
    original's header.  hostname: the mail name."""
    to = envelope.sender if to is None else to
    whose = "Your message" if to == envelope.sender else "A message that bounced, or had no sender,"
    from email.utils import formatdate, make_msgid
    now = formatdate(localtime=True)
    boundary = f"{envelope.id}.{os.urandom(4).hex()}/{hostname}"
    why = (f"it could not be delivered in {len(failures) and ''}the time allowed"
           if expired else "the hoster refused it")
    plain = [f"This is minimail on {hostname}.", "",
             f"{whose} (queue ID {envelope.id}) was not delivered to the recipients",
             f"below: {why}. Nothing more will be tried for them.", ""]
    plain += [f"<{recipient}>: {reply}" for recipient, reply in failures]
    per_recipient = []
    for recipient, reply in failures:
        per_recipient += ["", f"Final-Recipient: rfc822; {recipient}", "Action: failed",
                          f"Status: {enhanced_status(reply, expired)}",
                          f"Diagnostic-Code: smtp; {reply}", f"Last-Attempt-Date: {now}"]
    status = [f"Reporting-MTA: dns; {hostname}", f"X-Minimail-Queue-ID: {envelope.id}",
              f"Arrival-Date: {formatdate(envelope.arrived, localtime=True)}", *per_recipient]
    head = [f"From: Mail Delivery System <MAILER-DAEMON@{hostname}>",
            f"To: <{to}>", "Subject: Undelivered Mail Returned to Sender",
            f"Date: {now}", f"Message-ID: {make_msgid(domain=hostname)}",
            "Auto-Submitted: auto-replied", "MIME-Version: 1.0",
            f'Content-Type: multipart/report; report-type=delivery-status; boundary="{boundary}"',
            "", "This is a MIME-encapsulated message.", ""]
    parts = [f"--{boundary}", "Content-Type: text/plain; charset=utf-8",
             "Content-Description: Notification", "", *plain, "",
             f"--{boundary}", "Content-Type: message/delivery-status",
             "Content-Description: Delivery report", "", *status, "",
             f"--{boundary}", "Content-Type: text/rfc822-headers",
             "Content-Description: Undelivered Message Headers", ""]
    text = "\r\n".join(head + parts).encode("utf-8") + b"\r\n" + header.rstrip(b"\r\n") + \
        f"\r\n\r\n--{boundary}--\r\n".encode()
    return text


# ---------------------------------------------------------------------------
# Privileges
# ---------------------------------------------------------------------------

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


def become_daemon_user(user):
    """After binding, in this order, for these reasons: clear the ambient
    capabilities (the port's capability must not pass on to ssh); import what
    the daemon will need (the interpreter's directory may be closed to the new
    user); then drop root for good (after which nothing of root's can be
    regained, and ssh runs with the user's keys)."""
    clear_ambient_capabilities()
    preload()
    if user is not None:
        drop_privileges(user)


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
    import ctypes
    prctl = libc_function("prctl")
    if prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) != 0:
        log.warning("cannot clear ambient capabilities: %s", os.strerror(ctypes.get_errno()))


def preload():
    """Import now what gevent and minimail would import lazily later: after the
    drop, the interpreter's own directory may be closed to the new user."""
    import importlib
    for name in PRELOADED:
        importlib.import_module(name)
    from gevent import get_hub
    hub = get_hub()
    hub.threadpool.spawn(int).get()
    hub.resolver
    "localhost".encode("idna")
    json_module = importlib.import_module("json")
    json_module.dumps(signal.Signals.SIGTERM.name)
    email_utils = importlib.import_module("email.utils")
    email_utils.formatdate(localtime=True)
    email_utils.make_msgid(domain="localhost")


#: Modules the daemon imports only where it uses them (the sendmail command
#: never does); all of them are loaded before the privilege drop.
PRELOADED = ("ctypes", "email.utils", "gevent", "gevent.event", "gevent.fileobject", "gevent.hub",
             "gevent.pool", "gevent.server", "gevent.socket", "gevent.subprocess", "json", "mmap",
             "random", "shutil", "tempfile")


def raise_open_files_limit(max_clients):
    """Raise the soft limit of open files to the hard one, for many clients;
    warn when even that is too low for --max-clients."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = OPEN_FILES_CAP
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    needed = max_clients * FDS_PER_CLIENT + FDS_SPARE
    if soft < needed:
        return (f"the open files limit ({soft}) is too low for --max-clients {max_clients}: each "
                f"client can hold {FDS_PER_CLIENT} descriptors; raise it to {needed} or more "
                f"(ulimit -n, or LimitNOFILE= in minimail.service), or lower --max-clients")
    return None


# ---------------------------------------------------------------------------
# Pid, state and log files
# ---------------------------------------------------------------------------

Paths = collections.namedtuple("Paths", "pidfile logfile queue")


def default_paths():
    """Where the daemon's files go when not told otherwise."""
    if os.geteuid() == 0:
        return Paths("/run/minimail/minimail.pid", "/var/log/minimail.log", ROOT_QUEUE)
    state_home = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    state = os.path.join(state_home, "minimail")
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    pid_dir = os.path.join(runtime, "minimail") if runtime else state
    return Paths(os.path.join(pid_dir, "minimail.pid"), os.path.join(state, "minimail.log"),
                 os.path.join(state, "queue"))


def state_path(pidfile):
    """The state file that `status` reads: next to the pid file."""
    return os.path.splitext(pidfile)[0] + ".state"


def can_write(user, st):
    """Whether user (a pwd entry, or None for ourselves) may create files in a
    directory with stat st."""
    if user is None:
        uid, groups = os.geteuid(), set(os.getgroups()) | {os.getegid()}
    else:
        uid, groups = user.pw_uid, set(os.getgrouplist(user.pw_name, user.pw_gid))
    if uid == 0:
        return True
    if st.st_uid == uid:
        return bool(st.st_mode & stat.S_IWUSR)
    if st.st_gid in groups:
        return bool(st.st_mode & stat.S_IWGRP)
    return bool(st.st_mode & stat.S_IWOTH)


def prepare_directory(path, user, mode, must_write=True):
    """A directory for the daemon's files.  One that minimail makes is given to
    the daemon's user through its open descriptor (never through a path that
    could have become a link); an existing one keeps its owner, and must
    already be writable by that user.  Parents it makes stay root's (0755)."""
    parent = os.path.dirname(path)
    if parent != path and not os.path.isdir(parent):
        prepare_directory(parent, None, 0o755, must_write=False)
    try:
        os.mkdir(path, mode)
        made = True
    except FileExistsError:
        made = False
    except OSError as exc:
        raise Fatal(f"cannot make the directory {path}: {exc.strerror}") from None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC | (os.O_NOFOLLOW if made else 0))
    except OSError as exc:
        raise Fatal(f"{path}: {exc.strerror}") from None
    try:
        if made and user is not None:
            os.fchown(fd, user.pw_uid, user.pw_gid)
        st = os.fstat(fd)
    finally:
        os.close(fd)
    if must_write and not can_write(user, st):
        who = user.pw_name if user else pwd.getpwuid(os.geteuid()).pw_name
        raise Fatal(f"{path}: the daemon's user {who} cannot write there (it belongs to "
                    f"{owner_name(st.st_uid)}); choose another place, or make it writable for {who}")


def owner_name(uid):
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def open_log_file(path, user):
    """Open the log for appending without following a link (O_NOFOLLOW) and
    refuse anything but a regular file of ours with one link; then give it to
    the daemon's user through the descriptor (fchown, fchmod)."""
    flags = (os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOCTTY
             | os.O_NONBLOCK)                   # a FIFO must not hang the start
    try:
        fd = os.open(path, flags, 0o640)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise Fatal(f"the log file {path} is a symbolic link: refusing to write through it") \
                from None
        if exc.errno == errno.ENXIO:
            raise Fatal(f"the log file {path} is not a regular file") from None
        raise Fatal(f"cannot open the log file {path}: {exc.strerror}") from None
    os.set_blocking(fd, True)
    try:
        st = os.fstat(fd)
        allowed = {0, os.geteuid()} | ({user.pw_uid} if user else set())
        if not stat.S_ISREG(st.st_mode):
            raise Fatal(f"the log file {path} is not a regular file")
        if st.st_nlink != 1:
            raise Fatal(f"the log file {path} has other hard links: refusing to write to it")
        if st.st_uid not in allowed:
            raise Fatal(f"the log file {path} belongs to {owner_name(st.st_uid)}: refusing to "
                        f"write to it")
        if user is not None:
            os.fchown(fd, user.pw_uid, user.pw_gid)
            os.fchmod(fd, 0o640)
    except BaseException:
        os.close(fd)
        raise
    return os.fdopen(fd, "a", encoding="utf-8")


class LogFile(logging.FileHandler):
    """The daemon's log file, opened safely, reopened on SIGHUP after logrotate
    has moved it."""

    def __init__(self, path, user):
        super().__init__(path, encoding="utf-8", delay=True)
        self.setStream(open_log_file(path, user))

    def reopen(self):
        try:
            stream = open_log_file(self.baseFilename, None)
        except Fatal as exc:
            log.warning("SIGHUP: %s; still writing to the old file", exc)
            return
        old = self.setStream(stream)
        if old:
            old.close()
        log.info("log file reopened")

    def _open(self):                 # logging reopens by name after a close: never
        return open_log_file(self.baseFilename, None)


def log_to_stderr(verbose):
    """Log to stderr without timestamps: the journal or the terminal adds its own."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    install_log_handler(handler, verbose)


def log_to_file(path, verbose, user):
    """Log to a file with timestamps; open it now, while we may, for user."""
    handler = LogFile(path, user)
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


def note_sighup(_signum=None, _frame=None):
    """SIGHUP where there is no log file to reopen: logged, never fatal."""
    log.info("SIGHUP: logging to stderr, nothing to reopen")


def note_early_signal(signum, _frame=None):
    """SIGUSR1 or SIGUSR2 before the daemon's handlers are in place (`minimail
    flush` and `delete` signal the pid as soon as the pid file or the queue's
    lock names it): never fatal.  The daemon looks at its queue, its maildrop
    and the delete requests in tmp/ once it runs."""
    log.info("%s while minimail starts: its queue is looked at once it runs",
             signal.Signals(signum).name)


class PidFile:
    """The daemon's pid file, locked (flock) for as long as the daemon runs:
    a second daemon with the same pid file cannot start, and `stop` believes
    only the process that holds the lock.  It is 0600: a lock can be taken by
    anyone who can open the file, and another user holding it (after a kill -9)
    would keep minimail from starting."""

    def __init__(self, path):
        self.path = path
        self.fd = None

    def acquire(self):
        """Lock and write the pid file (after the final fork, so the lock is the
        daemon's; O_CLOEXEC, so the tunnel does not inherit it)."""
        flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            fd = os.open(self.path, flags, 0o600)
            os.fchmod(fd, 0o600)             # one left by an older minimail was 0644
        except OSError as exc:
            raise Fatal(f"cannot open the pid file {self.path}: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            holder = lock_holder(self.path)
            raise Fatal(f"already running (pid {holder or '?'}, pid file {self.path})") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd

    def release(self):
        """Remove the pid file, if it is ours (never the winner's of a race)."""
        if self.fd is not None:
            remove_file(self.path)
            os.close(self.fd)
            self.fd = None


def lock_holder(path):
    """The pid of the process that holds the flock on path (Linux: /proc/locks)."""
    try:
        st = os.stat(path)
        with open("/proc/locks") as f:
            locks = f.read()
    except OSError:
        return None
    device = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    for line in locks.splitlines():
        fields = line.split()
        if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5] == device \
                and fields[4].isdigit():
            return int(fields[4])
    return None


def is_minimail(pid):
    """True if pid runs (not a zombie) and is minimail."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read()
    except OSError:
        return False
    return b"minimail" in cmdline and not exited(pid)


def daemon_pid(pidfile):
    """The daemon's pid: the process that holds the pid file's lock and is
    minimail.  What the file says is never trusted (its directory belongs to
    the daemon's user, who could write any pid there)."""
    holder = lock_holder(pidfile)
    return holder if holder is not None and is_minimail(holder) else None


def remove_file(path):
    """Remove a file of ours; say so if that is impossible."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("cannot remove %s: %s", path, exc.strerror)


class StateFile:
    """The daemon's figures for `minimail status`: 0600, replaced atomically
    soon after each change (changes within STATE_DELAY are written once)."""

    def __init__(self, path, describe):
        self.path = path
        self.describe = describe
        self.pending = None
        self.failed = False

    def changed(self):
        from gevent import spawn_later
        if self.pending is None:
            self.pending = spawn_later(STATE_DELAY, self.write)

    def write(self):
        import json
        self.pending = None
        temporary = f"{self.path}.tmp"
        text = json.dumps(self.describe(), indent=1)
        try:
            remove_quietly(temporary)
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                         | os.O_CLOEXEC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(text)
            os.replace(temporary, self.path)
        except OSError as exc:
            if not self.failed:
                log.warning("cannot write the state file %s: %s", self.path, exc.strerror)
            self.failed = True

    def remove(self):
        if self.pending is not None:
            self.pending.kill()
        remove_file(self.path)


def read_state(pidfile):
    """What the daemon's state file says, checked field by field (it lies in a
    directory the daemon's user owns: never trusted); {} if unreadable."""
    import json
    try:
        with open_own_file(state_path(pidfile)) as f:
            data = json.loads(read_small(f))
    except (OSError, ValueError):
        return {}
    return checked(data, STATE_SCHEMA) if isinstance(data, dict) else {}


#: What a state file may hold: field -> kind, or a nested schema.
NUMBER, TEXT, FLAG = "number", "text", "flag"
STATE_SCHEMA = {
    "started": NUMBER, "listening": TEXT, "tunnel_to": TEXT, "drain": NUMBER,
    "clients_active": NUMBER, "sessions": NUMBER, "bytes_from_clients": NUMBER,
    "bytes_to_clients": NUMBER, "updated": NUMBER,
    "tunnel": {"state": TEXT, "pid": NUMBER, "since": NUMBER, "stops_at": NUMBER,
               "session": FLAG, "failures": NUMBER, "retry_at": NUMBER, "last_error": TEXT,
               "idle": TEXT},
    "queue": {"dir": TEXT, "count": NUMBER, "oldest": NUMBER, "next_try": NUMBER,
              "failed": NUMBER, "untold": NUMBER},
}


def checked(data, schema):
    """The fields of data that fit schema: finite numbers, short printable
    texts, flags; anything else (or missing) becomes None."""
    result = {}
    for name, kind in schema.items():
        value = data.get(name)
        if isinstance(kind, dict):
            value = checked(value, kind) if isinstance(value, dict) else None
        elif kind == NUMBER:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) \
                and math.isfinite(value)
            value = value if ok else None
        elif kind == TEXT:
            value = printable(value, 300) if isinstance(value, str) else None
        else:
            value = value if isinstance(value, bool) else None
        result[name] = value
    return result


# ---------------------------------------------------------------------------
# Running the daemon
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


def is_loopback(text):
    """Whether an IP address is loopback, an IPv4 one in IPv6 clothes too."""
    ip = ipaddress.ip_address(text.partition("%")[0])
    return (ip.ipv4_mapped or ip).is_loopback if ip.version == 6 else ip.is_loopback


def open_relay_warning(sock):
    """A warning when clients can come from other hosts than this one."""
    address = sock.getsockname()
    if isinstance(address, str) or is_loopback(address[0]):
        return None
    return (f"listening on {describe_socket(sock)}, which is not loopback: every host that "
            f"reaches this port can send mail through your hoster, which trusts its own "
            f"localhost (an open relay); listen on 127.0.0.1 unless a firewall keeps others out")


def listen_mismatch(sock, settings):
    """A warning when the socket systemd passed is not where --listen says: the
    sendmail command submits to --listen."""
    where, told = describe_socket(sock), settings.describe_listen()
    if where == told:
        return None
    return (f"listening on {where}, the socket systemd passed, not on {told} (--listen): "
            f"the sendmail command submits to --listen; make them the same, or leave --listen out")


TUNNEL_DIR = re.compile(r"minimail-tunnel-(\d+)-\w{8}")


def make_tunnel_dir(base):
    """A private directory (0700) for this daemon's tunnel sockets, named for
    its pid, so that a later start removes it if minimail was killed.  Where
    base's path is too long for a socket, somewhere shorter and as private."""
    import tempfile
    for candidate in (base, os.environ.get("XDG_RUNTIME_DIR"), tempfile.gettempdir()):
        if not candidate or not os.path.isdir(candidate) or not os.access(candidate, os.W_OK):
            continue
        remove_leftover_tunnel_dirs(candidate)
        longest = os.path.join(candidate, f"minimail-tunnel-{os.getpid()}-xxxxxxxx",
                               "tunnel-999999.sock")
        if len(longest.encode()) > SOCKET_PATH_MAX:
            log.info("%s is too deep for a socket path: the tunnel's sockets go elsewhere",
                     candidate)
            continue
        return tempfile.mkdtemp(prefix=f"minimail-tunnel-{os.getpid()}-", dir=candidate)
    raise Fatal("no private directory with a path short enough for the tunnel's socket "
                "(set XDG_RUNTIME_DIR, or use --tunnel-port)")


def remove_leftover_tunnel_dirs(base):
    """Remove tunnel directories of ours whose minimail has died (kill -9)."""
    import shutil
    try:
        entries = os.listdir(base)
    except OSError:
        return
    for name in entries:
        match = TUNNEL_DIR.fullmatch(name)
        path = os.path.join(base, name)
        if match and not is_minimail(int(match[1])) and int(match[1]) != os.getpid():
            try:
                if os.lstat(path).st_uid == os.geteuid() and stat.S_ISDIR(os.lstat(path).st_mode):
                    shutil.rmtree(path, ignore_errors=True)
                    log.info("removed %s, left by a minimail that was killed", path)
            except OSError:
                pass


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


def start(settings, foreground):
    """Start minimail, in the foreground or as a daemon; return the exit status."""
    signal.signal(signal.SIGHUP, note_sighup)     # from bind() on; not SIG_IGN, which ssh would inherit
    for signum in (signal.SIGUSR1, signal.SIGUSR2):     # from the pid file and the queue's lock on
        signal.signal(signum, note_early_signal)
    user = target_user(settings)
    paths = default_paths()
    pidfile = settings.pidfile or (None if foreground else paths.pidfile)
    running = pidfile and daemon_pid(pidfile)
    if running:
        raise Fatal(f"already running (pid {running}, pid file {pidfile})")
    inherited = inherited_listener()
    listener = inherited or bind(settings)
    warnings = [w for w in (open_relay_warning(listener),
                            inherited and listen_mismatch(inherited, settings),
                            raise_open_files_limit(settings.max_clients)) if w]
    if pidfile:
        prepare_directory(os.path.dirname(pidfile), user, 0o755)
    if settings.queue:
        prepare_directory(settings.queue, user, 0o700)
    if foreground:
        log_to_stderr(settings.verbose)
        return run(settings, listener, user, pidfile, Readiness(), warnings=warnings)
    logfile = settings.logfile or paths.logfile
    prepare_directory(os.path.dirname(logfile), user, 0o755, must_write=False)
    handler = log_to_file(logfile, settings.verbose, user)
    for warning in warnings:
        print(f"minimail: warning: {warning}", file=sys.stderr)
    in_daemon, result = detach(keep={listener.fileno(), handler.stream.fileno()})
    if not in_daemon:
        return report_start(result, logfile)
    return run(settings, listener, user, pidfile, Readiness(result), handler, warnings)


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


def run(settings, listener, user, pidfile, readiness, logfile=None, warnings=()):
    """Serve until a signal stops minimail; return the exit status."""
    where = describe_socket(listener)
    log.info("open files limit: %d", resource.getrlimit(resource.RLIMIT_NOFILE)[0])
    for warning in warnings:
        log.warning("%s", warning)
    daemon = Daemon(settings, listener, pidfile, logfile)
    try:
        become_daemon_user(user)
        daemon.start()
    except (Fatal, OSError) as exc:
        reason = exc if isinstance(exc, Fatal) else f"cannot start: {exc}"
        log.error("%s", reason)
        readiness.failed(str(reason))
        daemon.clean_up()
        return 1
    log.info("listening on %s; tunnel: %s; queue: %s", where, settings.describe_tunnel(),
             settings.queue or "off")
    if settings.idle:
        log.warning("idle: %s: mail waits in the queue until it is set and minimail "
                    "restarted", settings.idle)
    readiness.ready(where)
    return daemon.serve(readiness)


class Daemon:
    """The running daemon's parts, built after the privilege drop in the order
    they need each other, and taken down in reverse: stop accepting, drain the
    sessions, stop the queue runner, stop the tunnel, remove the files."""

    def __init__(self, settings, listener, pidfile, logfile):
        self.settings = settings
        self.listener = listener
        self.where = describe_socket(listener)
        self.pidfile = PidFile(pidfile) if pidfile else None
        self.logfile = logfile
        self.tunnel_dir = None
        self.state = None
        self.runner = None
        self.queue_lock = None
        self.maildrop = None
        self.greenlets = []
        self.signals = 0

    def start(self):
        from gevent import signal_handler, spawn
        from gevent.event import Event
        settings = self.settings
        self.stopping = Event()
        if self.pidfile:
            self.pidfile.acquire()
            self.state = StateFile(state_path(self.pidfile.path), self.describe)
        on_change = self.state.changed if self.state else (lambda: None)
        if settings.tunnel_port:
            endpoints = lambda n: settings.tunnel_port
        else:
            self.tunnel_dir = make_tunnel_dir(self.pidfile and os.path.dirname(self.pidfile.path))
            endpoints = lambda n: os.path.join(self.tunnel_dir, f"tunnel-{n}.sock")
        self.supervisor = Supervisor(settings, endpoints, on_change=on_change,
                                     on_up=lambda: self.runner and self.runner.tunnel_up())
        receiver = None
        if settings.queue:
            spool, hostname = Spool(settings.queue), smtp_hostname()
            self.queue_lock = QueueLock(settings.queue)
            self.queue_lock.hold()               # before anything in the queue is touched
            spool.prepare()
            # The hoster hears the mail name in EHLO: a strict one refuses a bare host name.
            self.runner = QueueRunner(spool, self.supervisor, settings, settings.mail_name,
                                      on_change)
            receiver = Receiver(spool, settings, hostname, on_queued=self.runner.queued,
                                room_for=self.runner.room_for)
            self.maildrop = Maildrop(spool, settings, hostname, self.runner.queued, on_change,
                                     room_for=self.runner.room_for)
        self.forwarder = Forwarder(self.listener, self.supervisor, settings, receiver, on_change)
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal_handler(signum, self.on_signal)
        signal_handler(signal.SIGHUP, self.logfile.reopen if self.logfile else note_sighup)
        signal_handler(signal.SIGUSR1, self.flush if self.runner else self.no_queue)
        signal_handler(signal.SIGUSR2, self.runner.take_requests if self.runner else self.no_queue)
        for part in (self.supervisor, self.runner, self.maildrop):
            if part is not None:
                greenlet = spawn(part.run)
                greenlet.link_exception(lambda _: self.stopping.set())
                self.greenlets.append(greenlet)
        self.forwarder.start()
        if self.runner is not None:          # a `minimail delete` that asked while it started
            spawn(self.runner.take_requests)
        if self.state:
            self.state.write()

    def serve(self, readiness):
        self.stopping.wait()
        readiness.stopping()
        failed = [g for g in self.greenlets if g.dead]
        for greenlet in failed:
            log.error("a part of minimail failed: %r", greenlet.exception)
        try:
            self.shut_down()
        finally:
            self.clean_up()
        return 1 if failed else 0

    def shut_down(self):
        """Stop accepting; let sessions and the runner's message under way end
        within the drain; cut what is left; stop the tunnel."""
        drain_ends = time.monotonic() + self.settings.drain
        if self.runner is not None:
            self.runner.stop()
        self.forwarder.close()
        self.supervisor.close()              # clients still waiting get 421 at once
        self.forwarder.drain(self.settings.drain)
        if self.runner is not None:          # its message under way is part of the drain
            self.greenlets[1].join(timeout=max(0.0, drain_ends - time.monotonic()))
        for greenlet in self.greenlets[1:]:  # the queue runner: its mail stays queued
            greenlet.kill()
        self.supervisor.stop_all()
        self.supervisor.all_gone.wait(timeout=3 * STOP_GRACE + 1)
        self.greenlets[0].kill()
        log.info("stopped after %d session(s)", self.forwarder.served)

    def clean_up(self):
        """Remove what the daemon made: its state and pid files, the tunnel's directory."""
        import shutil
        if self.state:
            self.state.remove()
        if self.pidfile:
            self.pidfile.release()
        if self.queue_lock:
            self.queue_lock.release()
        if self.tunnel_dir:
            shutil.rmtree(self.tunnel_dir, ignore_errors=True)

    def on_signal(self):
        """First SIGTERM/SIGINT: stop gracefully.  Second: cut all sessions now."""
        self.signals += 1
        if self.signals == 1:
            log.info("signal received: stopping")
            self.stopping.set()
        else:
            log.warning("second signal: closing %d session(s) now", len(self.forwarder.sessions))
            self.forwarder.cut_all("cut: a second signal stopped minimail")

    def flush(self):
        """SIGUSR1 (`minimail flush`): take the maildrop in, deliver the queue."""
        self.maildrop.flush()
        self.runner.flush()

    @staticmethod
    def no_queue():
        log.info("SIGUSR1/SIGUSR2: there is no queue to flush or delete from (--no-queue)")

    def describe(self):
        """The daemon's figures for the state file."""
        return {
            "pid": os.getpid(),
            "started": self.forwarder.started_at,
            "listening": self.where,
            "tunnel_to": self.settings.describe_tunnel(),
            "drain": self.settings.drain,
            **self.forwarder.describe(),
            "tunnel": self.supervisor.describe(),
            "queue": self.runner.describe() if self.runner else None,
            "maildrop": self.maildrop.waiting if self.maildrop else None,
            "updated": time.time(),
        }


# ---------------------------------------------------------------------------
# stop, status, queue, flush
# ---------------------------------------------------------------------------

def stop(pidfile):
    """Stop the daemon and wait until it is gone: its drain, and a margin."""
    pid = daemon_pid(pidfile)
    if pid is None:
        stale = os.path.exists(pidfile)
        print(f"minimail is not running{' (stale pid file ignored)' if stale else ''}")
        return 1
    drain = read_state(pidfile).get("drain")
    drain = min(drain, 3600.0) if drain is not None and drain >= 0 else DEFAULT_DRAIN
    try:
        os.kill(pid, signal.SIGTERM)
    except PermissionError:
        raise Fatal(f"not allowed to stop minimail (pid {pid}): try sudo minimail stop") from None
    limit = drain + STOP_MARGIN
    deadline = time.monotonic() + limit
    while is_minimail(pid):
        if time.monotonic() > deadline:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            print(f"minimail (pid {pid}) did not stop within {limit:g} s (its drain of "
                  f"{drain:g} s and {STOP_MARGIN:g} s more): killed")
            return 1
        time.sleep(0.05)
    print(f"minimail stopped (pid {pid})")
    return 0


def status(pidfile, as_json, queue=None):
    """Say whether the daemon runs and what it is doing, and what waits in the
    maildrop of its queue: exit 0 if it runs, 3 if not."""
    import json
    pid = daemon_pid(pidfile)
    state = read_state(pidfile) if pid else {}
    dropped = maildrop_count(queue) if queue else None
    if dropped is None and isinstance(state.get("maildrop"), int):
        dropped = state["maildrop"]
    if as_json:
        print(json.dumps({"running": bool(pid), "pid": pid, **state, "maildrop": dropped},
                         indent=1))
        return 0 if pid else 3
    if pid is not None and not os.access(pidfile, os.R_OK):
        print(f"minimail is running (pid {pid}); the rest is for its user and root: "
              f"try sudo minimail status")
        return 0
    lines = ["minimail is not running"] if pid is None else describe_status(pid, state)
    if dropped:
        lines.append(describe_maildrop(queue, dropped, "taken in within a minute, or on flush"
                                       if pid else "taken in when minimail starts"))
    print("\n".join(lines))
    return 0 if pid else 3


def describe_maildrop(queue, count, when):
    return (f"maildrop: {count} message(s) left by the sendmail command in "
            f"{os.path.join(queue, MAILDROP)}, not yet in the queue ({when})")


def describe_status(pid, state):
    """The lines `minimail status` prints for a running daemon."""
    now = time.time()
    lines = [f"minimail is running (pid {pid})"]
    if not state.get("started"):
        return lines + ["(no state to show: started with --foreground and no --pidfile, or "
                        "the state file is not readable for you: try sudo)"]
    lines[0] += f", up {format_duration(now - state['started'])}, listening on {state['listening']}"
    tunnel = state["tunnel"] or {}
    if tunnel.get("idle"):
        return lines + [f"tunnel: none: idle: {tunnel['idle']}",
                        describe_queue_state(state.get("queue"), now)]
    line = f"tunnel: {tunnel.get('state')}"
    if tunnel.get("pid") and tunnel.get("since"):
        line += f" (pid {tunnel['pid']:.0f}, for {format_duration(now - tunnel['since'])})"
    if tunnel.get("stops_at"):
        line += f", stops in {max(0, tunnel['stops_at'] - now):.0f} s unless a client comes"
    if tunnel.get("retry_at"):
        line += f", next try in {max(0, tunnel['retry_at'] - now):.0f} s"
    lines.append(f"{line}; {state['tunnel_to']}")
    lines.append(f"clients: {state['clients_active'] or 0:.0f} active, "
                 f"{state['sessions'] or 0:.0f} session(s) served; "
                 f"{state['bytes_from_clients'] or 0:.0f} bytes from clients, "
                 f"{state['bytes_to_clients'] or 0:.0f} to clients")
    lines.append(f"last tunnel error: {tunnel.get('last_error') or 'none'}")
    lines.append(describe_queue_state(state.get("queue"), now))
    return lines


def describe_queue_state(queue, now):
    if not queue:
        return "queue: off (--no-queue)"
    line = f"queue: {queue['count'] or 0:.0f} message(s) waiting"
    if queue.get("oldest"):
        line += f", the oldest for {format_duration(now - queue['oldest'])}"
    if queue.get("next_try"):
        line += f", next try in {format_duration(queue['next_try'] - now)}"
    untold = f" ({queue['untold']:.0f} nobody was told about)" if queue.get("untold") else ""
    return f"{line}; {queue['failed'] or 0:.0f} failed{untold}; in {queue['dir']}"


def format_duration(seconds):
    """'42 s', '7 min 3 s', '3 h 12 min', '2 d 4 h'."""
    seconds = int(max(0, seconds))
    for unit, size, smaller, small_size in (("d", 86400, "h", 3600), ("h", 3600, "min", 60),
                                            ("min", 60, "s", 1)):
        if seconds >= size:
            return f"{seconds // size} {unit} {seconds % size // small_size} {smaller}"
    return f"{seconds} s"


def queue_directory(explicit, settings_file, pidfile):
    """The queue to list: --queue, the settings file's, the running daemon's, the default."""
    if explicit or settings_file.option("--queue"):
        return os.path.abspath(explicit or settings_file.option("--queue"))
    running = daemon_pid(pidfile) and (read_state(pidfile).get("queue") or {}).get("dir")
    return running or default_paths().queue


def show_queue(directory, as_json, admin=None):
    """List the queued and the failed mail; exit 0, or 1 if it cannot be read."""
    import json
    spool = Spool(directory)
    try:
        queued, failed = spool.load("queued"), spool.load("failed")
    except FileNotFoundError:
        if not as_json:
            print(f"there is no queue in {directory} (yet): no mail has waited there; another "
                  f"place is named with --queue (the service's: /var/lib/minimail/queue)")
            return 0
        queued = failed = []
    except PermissionError:
        try:
            whose = f"it belongs to {owner_name(os.stat(directory).st_uid)}"
        except OSError:
            whose = "permission denied"
        raise Fatal(f"cannot read the queue in {directory}: {whose}; listing it needs root "
                    f"(try sudo)") from None
    dropped = maildrop_count(directory)
    if as_json:
        entries = [{**describe_envelope(e), "state": "queued"} for e in queued] + \
                  [{**describe_envelope(e), "state": "failed", "untold": untold(e, admin)}
                   for e in failed]
        print(json.dumps({"dir": directory, "messages": entries, "maildrop": dropped}, indent=1))
    else:
        lines = queue_listing(directory, queued, failed, time.time(), admin)
        if dropped:
            lines.append(describe_maildrop(directory, dropped, "taken in when minimail runs, "
                                                                "or on flush"))
        print("\n".join(lines))
    return 0


def queue_listing(directory, queued, failed, now, admin=None):
    """The lines `minimail queue` prints (everything from disk escaped)."""
    told = sum(untold(e, admin) for e in failed)
    lines = [f"queue in {directory}: {len(queued)} message(s) waiting, {len(failed)} failed"
             + (f" ({told} nobody was told about)" if told else "")]
    for envelope in queued:
        lines += [queue_line(envelope, now),
                  f"    {envelope.attempts} attempt(s); next try in "
                  f"{format_duration(envelope.next_try - now)}; last reply: "
                  f"{printable(envelope.last_reply or 'none', 200)}"]
    for envelope in failed:
        lines.append(queue_line(envelope, now) + "  FAILED"
                     + (", nobody was told" if untold(envelope, admin) else ""))
        lines += [f"    <{printable(recipient, 100)}>: {printable(reply, 200)}"
                  for recipient, reply in envelope.failures]
    if queued or failed:
        lines.append("(minimail flush: deliver now; minimail delete ID...: remove mail, "
                     "without a bounce)")
    return lines


def describe_envelope(envelope):
    return {"id": envelope.id, "age": time.time() - envelope.arrived, "size": envelope.size,
            "sender": envelope.sender, "recipients": envelope.recipients,
            "attempts": envelope.attempts, "next_try": envelope.next_try,
            "last_reply": envelope.last_reply,
            "failures": [{"recipient": r, "reply": reply} for r, reply in envelope.failures]}


def queue_line(envelope, now):
    recipients = envelope.recipients or [f[0] for f in envelope.failures]
    shown = ", ".join(f"<{printable(r, 100)}>" for r in recipients[:3])
    more = f" and {len(recipients) - 3} more" if len(recipients) > 3 else ""
    return (f"{envelope.id}  {format_duration(now - envelope.arrived)} old  {envelope.size} bytes  "
            f"from <{printable(envelope.sender, 100)}>  to {len(recipients)}: {shown}{more}")


def flush(pidfile):
    """Ask the running daemon to deliver its queue now (SIGUSR1)."""
    pid = daemon_pid(pidfile)
    if pid is None:
        print("minimail is not running: nothing would deliver the queue (start it: minimail "
              "start, or systemctl start minimail)", file=sys.stderr)
        return 1
    try:
        os.kill(pid, signal.SIGUSR1)
    except PermissionError:
        raise Fatal(f"not allowed to signal minimail (pid {pid}): try sudo minimail flush") from None
    queue = read_state(pidfile).get("queue")
    if queue is None:
        print(f"minimail (pid {pid}) keeps no queue (--no-queue): nothing to flush")
        return 0
    print(f"asked minimail (pid {pid}) to deliver the queue now: "
          f"{queue['count'] or 0:.0f} message(s) waiting")
    return 0


def delete(directory, ids):
    """Remove queued or failed mail by ID (`minimail delete`): through the
    running daemon, or directly while holding the queue's lock when none
    runs.  Exit 1 if an ID is not there (the others are removed)."""
    results = {queue_id: None for queue_id in ids}
    if os.path.isdir(directory):
        lock = QueueLock(directory)
        signal.signal(signal.SIGUSR2, signal.SIG_IGN)    # a mistaken ask is harmless here
        try:
            pid = queue_holder(lock)
            results = delete_directly(Spool(directory), ids) if pid is None \
                else ask_daemon_to_delete(DeleteRequests(Spool(directory)), pid, ids)
        except PermissionError:
            raise Fatal(f"cannot delete from the queue in {directory}: it belongs to "
                        f"{owner_name(os.stat(directory).st_uid)} (try sudo)") from None
        except OSError as exc:
            raise Fatal(f"cannot delete from the queue in {directory}: {exc.strerror}") from None
        finally:
            lock.release()
    for queue_id, where in results.items():
        if where in ("queued", "failed"):
            print(f"deleted {queue_id} (it {'was waiting' if where == 'queued' else 'had failed'})")
        elif where == "error":
            print(f"minimail: cannot delete {queue_id}: see the daemon's log", file=sys.stderr)
        else:
            print(f"minimail: no message {queue_id} in the queue in {directory}", file=sys.stderr)
    return 0 if all(where in ("queued", "failed") for where in results.values()) else 1


def queue_holder(lock):
    """None once this process holds the queue's lock, else the pid of the
    daemon that holds it (another `minimail delete` is waited for)."""
    deadline = time.monotonic() + DELETE_LOCK_WAIT
    while not lock.take():
        pid = lock.daemon()
        if pid is not None:
            return pid
        if time.monotonic() > deadline:
            holder = lock.holder()
            raise Fatal(f"the queue in {lock.root} is locked by pid {holder or '?'}, which is "
                        f"no minimail daemon: try again later")
        time.sleep(0.05)
    return None


def delete_directly(spool, ids):
    for where in ("queued", "failed"):
        if not stat.S_ISDIR(os.lstat(spool.path(where)).st_mode):
            raise Fatal(f"{spool.path(where)} is not a directory (a link?): not deleting there")
    results = {}
    for queue_id in ids:
        try:
            results[queue_id] = spool.delete(queue_id)
        except OSError as exc:
            print(f"minimail: cannot delete {queue_id}: {exc.strerror}", file=sys.stderr)
            results[queue_id] = "error"
    return results


def ask_daemon_to_delete(requests, pid, ids):
    """Leave the daemon requests (at most DELETE_BATCH IDs each), signal it,
    and wait for its answers."""
    results = {}
    for start in range(0, len(ids), DELETE_BATCH):
        token = os.urandom(8).hex()
        requests.write(token, ids[start:start + DELETE_BATCH])
        try:
            os.kill(pid, signal.SIGUSR2)
        except PermissionError:
            requests.drop(token)
            raise Fatal(f"not allowed to signal minimail (pid {pid}): try sudo minimail "
                        f"delete") from None
        deadline = time.monotonic() + DELETE_ANSWER_WAIT
        while (answer := requests.read_answer(token)) is None:
            if time.monotonic() > deadline:
                requests.drop(token)
                raise Fatal(f"minimail (pid {pid}) did not answer within "
                            f"{DELETE_ANSWER_WAIT:g} s; see its log")
            time.sleep(0.02)
        results.update(answer)
    return {queue_id: results.get(queue_id) for queue_id in ids}


# ---------------------------------------------------------------------------
# check
# ---------------------------------------------------------------------------

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


def check(settings, settings_file, invoker=None):
    """Try the tunnel once, as the daemon would, and say in plain words what works."""
    import shutil
    from gevent import spawn
    print(f"minimail check: ssh {settings.destination}, then {settings.remote} from there")
    program = shutil.which(settings.ssh[0])
    if not program:
        check_step(False, f"ssh found: {printable(settings.ssh[0], 100)} is not on PATH",
                   "install openssh-client, or point --ssh at ssh")
        return 1
    check_step(True, f"ssh found: {program} ({ssh_version(program)})")
    tunnel_dir = make_tunnel_dir(None)
    supervisor = Supervisor(settings, lambda n: os.path.join(tunnel_dir, f"tunnel-{n}.sock"))
    running = spawn(supervisor.run)
    try:
        with supervisor.visit() as tunnel:
            greeted = try_the_tunnel(supervisor, tunnel, settings)
    finally:
        supervisor.stop_all()
        supervisor.all_gone.wait(timeout=3 * STOP_GRACE + 1)
        running.kill()
        shutil.rmtree(tunnel_dir, ignore_errors=True)
    if greeted is None:
        return 1
    closed = supervisor.all_gone.is_set()
    check_step(closed, f"tunnel closed (ssh {describe_exit(supervisor.last_exit)})")
    show_sendmail_settings(settings_file, invoker)
    if greeted and closed:
        print(f"all good: minimail can send mail through {settings.destination}")
        return 0
    return 1


def try_the_tunnel(supervisor, tunnel, settings):
    """Connect through the tunnel and read the greeting: True if it is SMTP's,
    False if not, None if the tunnel did not come up."""
    from gevent import sleep
    started = time.monotonic()
    try:
        upstream, child = tunnel.connect(settings.wait)
    except TunnelUnavailable as exc:
        explain_tunnel_failure(supervisor.last_child, exc, settings)
        return None
    for _, passed, _ in CHECK_STEPS:
        check_step(True, passed)
    print(f"        (the tunnel was up after {time.monotonic() - started:.2f} s)")
    if not supervisor.session:
        print("        note: the hoster ends sessions at once; minimail uses ssh -N there")
    try:
        greeted = check_greeting(upstream, settings)
    finally:
        upstream.close()
    if not greeted:
        sleep(0.1)                   # let ssh's complaint about the channel arrive
        show_ssh_said(child)
    return greeted


def ssh_version(program):
    """What `ssh -V` says of itself."""
    import subprocess
    try:
        result = subprocess.run([program, "-V"], capture_output=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "version unknown"
    return printable(result.stderr or result.stdout, 200)


def explain_tunnel_failure(child, exc, settings):
    """Report which step failed, from ssh's own words."""
    said = list(child.said) if child else []
    failed_step, fix = "reach", "run ssh DESTINATION by hand to see what it wants"
    telling = most_telling(said) or ""
    for pattern, step, advice in SSH_TROUBLES:
        if re.search(pattern, telling):
            failed_step, fix = step, advice
            break
    if failed_step == "host key" and "~/.ssh/known_hosts" in fix:
        fix = fix.replace("~/.ssh/known_hosts", known_hosts_file(settings))
    for step, passed, failed in CHECK_STEPS:
        if step == failed_step:
            check_step(False, failed if said else f"{failed}: {exc}", fix)
            break
        check_step(True, passed)
    show_ssh_said(child)


def known_hosts_file(settings):
    """The known_hosts file ssh really uses for DESTINATION: the first of
    UserKnownHostsFile, as `ssh -G` (the --ssh program, the -o options) says."""
    import subprocess
    options = [word for option in settings.ssh_options for word in ("-o", option)]
    try:
        result = subprocess.run([*settings.ssh, *options, "-G", settings.destination],
                                capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "~/.ssh/known_hosts"
    for line in result.stdout.splitlines():
        key, _, value = line.partition(" ")
        if key.lower() == "userknownhostsfile" and value.split():
            return printable(value.split()[0], 200)
    return "~/.ssh/known_hosts"


def show_ssh_said(child):
    for line in (child.said if child else ()):
        print(f"        ssh said: {line}")


def check_greeting(upstream, settings):
    """Read the far side's first line: an SMTP server says 220."""
    from gevent import Timeout
    line = b""
    with Timeout(CHECK_GREETING_WAIT, False):
        while not line.endswith(b"\n") and len(line) < 512:
            chunk = upstream.recv(512)
            if not chunk:
                break
            line += chunk
    text = printable(line, 200)
    if text.startswith("220"):
        check_step(True, f"the far side answered: {text}")
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


def show_sendmail_settings(settings_file, user=None):
    """What `minimail sendmail` (and a sendmail symlink) would do for the user
    who runs check, and for root (cron's jobs), whose settings file may be another."""
    user = user or pwd.getpwuid(os.getuid()).pw_name
    describe_sendmail(settings_file, user)
    if user != "root" and settings_file.path != ROOT_SETTINGS:
        try:
            root_file = SettingsFile.read(ROOT_SETTINGS) if os.path.exists(ROOT_SETTINGS) \
                else SettingsFile()
        except UsageError as exc:
            print(f"sendmail settings for root: {exc}")
        else:
            describe_sendmail(root_file, "root")


def describe_sendmail(settings_file, user):
    """The lines of show_sendmail_settings for one settings file."""
    where = settings_file.path or "no settings file (see Settings in --help)"
    try:
        family, ip, port = settings_file.listen()
        submits = f"[{ip}]:{port}" if family == socket.AF_INET6 else f"{ip}:{port}"
    except UsageError as exc:
        submits = f"nowhere: {exc}"
    names = MailNames(settings_file)
    print(f"sendmail settings: {where} (for {user})")
    print(f"        submits to minimail at {submits}")
    print(f"        sender (of local mail, -f root@HOST too): {names.masquerade(user) or 'none'}"
          + ("" if settings_file.sender else " (MINIMAIL_SENDER not set)"))
    print(f"        admin (for mail to root and other local names): "
          f"{settings_file.admin or 'not set: such mail is refused until MINIMAIL_ADMIN is set'}")
    print(f"        aliases: {describe_aliases(settings_file.aliases)}")
    print(f"        mail name (Message-IDs, bounces): {names.mail_name()}")
    if not settings_file.sender and not settings_file.admin:
        print("        warning: neither MINIMAIL_SENDER nor MINIMAIL_ADMIN is set: mail from "
              "local users and to local names (cron's) cannot go out as it should")


def describe_aliases(path):
    try:
        aliases = Aliases.read(path)
    except FileNotFoundError:
        return f"{path}: no such file (local names go to the admin address)"
    except OSError as exc:
        return f"{path}: cannot read it ({exc.strerror})"
    problems = f"; {len(aliases.problems)} problem(s): see newaliases" if aliases.problems else ""
    return f"{path}, {len(aliases.table)} alias(es){problems}"


# ---------------------------------------------------------------------------
# Local mail: this machine's names, the aliases file, the mail name (stdlib only)
# ---------------------------------------------------------------------------

#: The most of an aliases file or of /etc/mailname minimail reads (they come from outside).
ALIASES_MAX = 1024 * 1024
MAILNAME_MAX = 256
#: Steps one recipient's alias expansion may take (chains, lists); the rest goes to the admin.
ALIAS_STEPS_MAX = 1000
#: The mail name when nothing better is known (never a bare short host name).
MAIL_NAME_FALLBACK = "localhost.localdomain"
#: Names every machine goes by (address literals included).
LOOPBACK_NAMES = ("localhost", "localhost.localdomain", "[127.0.0.1]", "[ipv6:::1]")
#: A host name as minimail accepts it from a file or the resolver: labels of
#: at most 63 characters between single dots (each dot ends a label, so a
#: name that fails is found out in one pass, never by trying every split).
HOST_NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,62}(?:\.[a-z0-9-]{1,63})*\.?", re.I)


def domain_of(address):
    """The domain of an address in lower case ('' for a bare name such as root)."""
    _, at, domain = address.rpartition("@")
    return domain.lower().rstrip(".") if at else ""


def local_part(address):
    """What comes before the last @ (the whole of a bare name)."""
    local, at, _ = address.rpartition("@")
    return local if at else address


def dotted(name):
    """A fully qualified name: dotted, and not localhost's."""
    return bool(name) and "." in name.strip(".") and name.split(".")[0] != "localhost"


def read_mailname(path=None):
    """The name in /etc/mailname ($MINIMAIL_MAILNAME names another file), in
    lower case; '' when there is none or it is no host name."""
    path = path or os.environ.get("MINIMAIL_MAILNAME") or MAILNAME_FILE
    try:
        text = read_small_file(path, MAILNAME_MAX)
    except OSError:
        return ""
    name = (text.decode("ascii", "replace").split() or [""])[0].lower().rstrip(".")
    return name if HOST_NAME.fullmatch(name) and len(name) <= 253 else ""


def read_small_file(path, limit):
    """At most limit bytes of a file, opened so that a FIFO or a device never
    stalls the command (/dev/null is an empty file, as a user means it)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    with open(fd, "rb") as f:
        return f.read(limit) or b""


def choose_mail_name(file_name, fqdn, sender=None, admin=None):
    """The mail name: /etc/mailname's if dotted, else the FQDN if dotted, else
    the domain of the sender (or admin) address; None if none of them is.  A
    name EHLO cannot say (not ASCII, not a host name) is passed over."""
    for name in (file_name, fqdn(), domain_of(sender or ""), domain_of(admin or "")):
        if dotted(name) and len(name) <= 253 and HOST_NAME.fullmatch(name):
            return name
    return None


class MailNames:
    """The names this machine goes by, for the sendmail command: which
    addresses are local, and the mail name for Message-IDs and bounces.  The
    FQDN is asked of the resolver only when it is needed."""

    def __init__(self, settings_file, hostname=None, fqdn=None, mailname=None):
        self.sender, self.admin = settings_file.sender, settings_file.admin
        self.real = {domain_of(a) for a in (self.sender, self.admin) if a} - {""}
        self.host = (hostname or socket.gethostname()).lower()
        self.file_name = read_mailname() if mailname is None else mailname
        self.names = {*LOOPBACK_NAMES, self.host, self.file_name} - self.real - {""}
        self.fqdn = fqdn

    def full_name(self):
        if self.fqdn is None:
            self.fqdn = socket.getfqdn().lower().rstrip(".")
        return self.fqdn

    def is_local(self, address):
        """An address without @, or at one of this machine's names (but not
        at the sender's or admin's mail domain)."""
        domain = domain_of(address)
        if not domain:
            return True
        if domain in self.real:
            return False
        return domain in self.names or domain == self.full_name()

    def mail_name(self):
        return choose_mail_name(self.file_name, self.full_name, self.sender, self.admin) \
            or MAIL_NAME_FALLBACK

    def masquerade(self, user=None):
        """What a local sender becomes: MINIMAIL_SENDER, else MINIMAIL_ADMIN,
        else the user at the mail name (when that is this machine's dotted
        name), else None."""
        if self.sender or self.admin:
            return self.sender or self.admin
        name = choose_mail_name(self.file_name, self.full_name)
        user = user or pwd.getpwuid(os.getuid()).pw_name
        return f"{user}@{name}" if name else None


class Aliases:
    """An aliases file (aliases(5)): names (lower case) to their targets, and
    the problems found, [(line number, what)]."""

    def __init__(self, path=None, table=None, problems=()):
        self.path, self.table, self.problems = path, table or {}, list(problems)

    @classmethod
    def read(cls, path):
        """The file's aliases (OSError if it cannot be read)."""
        text = read_small_file(path, ALIASES_MAX + 1)
        if len(text) > ALIASES_MAX:
            return cls(path, {}, [(0, f"larger than {ALIASES_MAX} bytes: not read")])
        return cls(path, *parse_aliases(text.decode("utf-8", "replace")))

    @classmethod
    def load(cls, path):
        """For the sendmail command: a missing default file is no aliases; a
        file that cannot be read is said on stderr, and none are used."""
        try:
            return cls.read(path)
        except FileNotFoundError:
            if path != DEFAULT_ALIASES:
                print(f"minimail: the aliases file {printable(path, 200)} is missing: local "
                      f"names go to the admin address", file=sys.stderr)
        except OSError as exc:
            print(f"minimail: cannot read the aliases file {printable(path, 200)} "
                  f"({exc.strerror}): local names go to the admin address", file=sys.stderr)
        return cls(path)


def alias_lines(text):
    """aliases(5)'s logical lines, [(line number, text)]: a line that starts
    with white space continues the one before; empty lines and lines whose
    first character that is not white space is # are skipped.  Also the
    problems: [(line number, what)]."""
    lines, problems = [], []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if line[0] in " \t":
            if lines:
                lines[-1][1] += " " + line.strip()
            else:
                problems.append((number, "a continuation line (it starts with white space) "
                                         "with no alias before it"))
            continue
        lines.append([number, line.strip()])
    return lines, problems


def parse_aliases(text):
    """({name: [target, ...]}, [(line number, problem)]) of an aliases file."""
    lines, problems = alias_lines(text)
    table, first_seen = {}, {}
    for number, line in lines:
        name, targets, problem = parse_alias(line)
        if problem is None and name in table:
            problem = (f"{name} is given again (first on line {first_seen[name]}): "
                       f"this one is ignored")
        if problem is not None:
            problems.append((number, problem))
            continue
        table[name], first_seen[name] = targets, number
    return table, sorted(problems)


def parse_alias(line):
    """(name, targets, None) of one logical line, or (None, None, the problem)."""
    quoted = line.startswith('"')
    if quoted:                            # "a name with : or white space": ...
        end = line.find('"', 1)
        name, rest = (line[1:end], line[end + 1:].lstrip()) if end > 0 else ("", "")
    else:
        name, _, rest = line.partition(":")
        name, rest = name.strip(), ":" + rest if _ else ""
    if not rest.startswith(":"):
        return None, None, f"no colon: not `name: target, ...` ({printable(line, 60)})"
    if not name or not name.isprintable() or (not quoted and any(c.isspace() for c in name)):
        return None, None, f"{printable(name, 60)!r} is not an alias name"
    targets = [unquoted(t.strip()) for t in split_outside_quotes(rest[1:], ",")]
    targets = [t for t in targets if t]
    if not targets:
        return None, None, f"{printable(name, 60)} has no target"
    bad = [t for t in targets if not t.isprintable() or len(t) > ADDRESS_MAX]
    if bad:
        return None, None, f"{printable(name, 60)}: {printable(bad[0], 60)!r} is no target"
    return name.lower(), targets, None


def split_outside_quotes(text, separator):
    """text split at each separator that is not inside "..." (a backslash
    escapes the next character there)."""
    pieces, piece, quoted, escaped = [], [], False, False
    for c in text:
        if escaped:
            escaped = False
        elif quoted and c == "\\":
            escaped = True
        elif c == '"':
            quoted = not quoted
        elif c == separator and not quoted:
            pieces.append("".join(piece))
            piece = []
            continue
        piece.append(c)
    return pieces + ["".join(piece)]


def unquoted(target):
    """A target written wholly in quotes ("|command with, commas") without them."""
    if len(target) >= 2 and target[0] == target[-1] == '"' and target.count('"') == 2:
        return target[1:-1]
    return target


class Expansion(enum.Enum):
    """What an alias target is to the sendmail command."""
    ADDRESS = "an address"
    LOCAL = "a local name"
    COMMAND = "a command"
    FILE = "a file"
    INCLUDE = "an :include: file"


def target_kind(target, names):
    if target.startswith("|"):
        return Expansion.COMMAND
    if target.lower().startswith(":include:"):
        return Expansion.INCLUDE
    if target.startswith("/"):
        return Expansion.FILE
    return Expansion.LOCAL if names.is_local(target) else Expansion.ADDRESS


#: Stands for the admin address in an expansion.
TO_ADMIN = object()


def expand(recipient, aliases, names):
    """Where mail to recipient goes: ([address or TO_ADMIN], [notes for
    stderr]).  Local names are looked up in the aliases, chains followed,
    loops stopped; a name without an alias, a loop, a command, a file or an
    :include: goes to the admin address (none of them is ever run or read)."""
    found, notes, todo, steps = [], [], [(recipient, ())], 0
    while todo:
        address, chain = todo.pop(0)
        steps += 1
        if steps > ALIAS_STEPS_MAX:
            notes.append(f"{printable(recipient, 100)}: more than {ALIAS_STEPS_MAX} aliases: "
                         f"the rest goes to the admin address")
            found.append(TO_ADMIN)
            break
        kind = target_kind(address, names)
        name = local_part(address).lower()
        targets = aliases.table.get(name) if kind is Expansion.LOCAL and name not in chain \
            and not name.startswith("\\") else None
        if targets is not None:
            todo[0:0] = [(target, chain + (name,)) for target in targets]
            continue
        found.append(address if kind is Expansion.ADDRESS else TO_ADMIN)
        note = expansion_note(kind, address, name, chain or (recipient,))
        if note:
            notes.append(note)
    return found, notes


def expansion_note(kind, address, name, chain):
    """What the sendmail command says on stderr of a target that goes to the
    admin address instead: a command, a file, a loop (None: nothing to say)."""
    if kind in (Expansion.COMMAND, Expansion.FILE, Expansion.INCLUDE):
        return (f"{printable(chain[-1], 100)}: {printable(address, 100)} is {kind.value}, which "
                f"minimail never {'runs' if kind is Expansion.COMMAND else 'reads'}: that mail "
                f"goes to the admin address")
    if kind is Expansion.LOCAL and name in chain and chain[-1] != name:
        # (`root: root, ...` is no loop: it only means "keep a copy here too")
        return (f"alias loop: {printable(' -> '.join(chain + (name,)), 200)}: that mail goes "
                f"to the admin address")
    return None


def admin_address(settings_file, names):
    """MINIMAIL_ADMIN, when it is a real address (else SendmailExit 78)."""
    admin = settings_file.admin
    if admin and names.is_local(admin):
        raise SendmailExit(EX_CONFIG, f"MINIMAIL_ADMIN={printable(admin, 100)} is a local name "
                                      f"itself: give a full address (you@example.org)")
    return admin


# ---------------------------------------------------------------------------
# The sendmail command: stdlib only, so that cron's mail starts fast
# ---------------------------------------------------------------------------

#: sysexits.h
EX_OK, EX_USAGE, EX_DATAERR, EX_NOUSER, EX_UNAVAILABLE = 0, 64, 65, 67, 69
EX_SOFTWARE, EX_TEMPFAIL, EX_CONFIG = 70, 75, 78
#: sendmail(8)'s flags: without a value; with one (attached, or the next word).
SENDMAIL_PLAIN_FLAGS = "tivmnGU"
SENDMAIL_VALUE_FLAGS = "frFBboCLNRVXhOAp"
#: --max-size's default (as the docstring says), for the sendmail command.
MAX_SIZE_DEFAULT = 52428800
#: How long the sendmail command waits for minimail (it may hold the client
#: while the tunnel starts, up to --wait, before the queue takes the mail).
SUBMIT_TIMEOUT = 300.0


class SendmailExit(Exception):
    """The sendmail command ends: one line on stderr, a sysexits.h status."""

    def __init__(self, status, message):
        super().__init__(message)
        self.status = status


class Unreachable(SendmailExit):
    """minimail cannot be reached: nothing listens, or it went away before its
    final reply.  Only this sends the mail to the maildrop (a reply, even a 4xx,
    means minimail runs and has spoken)."""

    def __init__(self, what, detail, message, pending=None, answered=None):
        super().__init__(EX_TEMPFAIL, message)
        self.what = what                  # "is not running", "went away"
        self.detail = detail              # where, and what happened
        self.pending = pending            # the recipients not yet accepted (None: all)
        self.answered = answered or {}    # the others: {recipient: minimail's Reply}


SendmailFlags = collections.namedtuple(
    "SendmailFlags", "recipients_from_header dot_ends sender full_name body mode verbose")


def parse_sendmail_flags(argv):
    """sendmail's command line, read as its getopt does: (flags, recipients)."""
    flags = dict(recipients_from_header=False, dot_ends=True, sender=None, full_name=None,
                 body=None, mode="m", verbose=False)
    words, recipients = list(argv), []
    while words:
        word = words.pop(0)
        if word == "--":
            recipients += words
            break
        if not word.startswith("-") or word == "-":
            recipients.append(word)
            continue
        letters = word[1:]
        while letters:
            flag, letters = letters[0], letters[1:]
            if flag in SENDMAIL_PLAIN_FLAGS:
                apply_sendmail_flag(flags, flag, None)
            elif flag == "q":
                flags["mode"], letters = "q", ""        # -q takes an optional attached value
            elif flag in SENDMAIL_VALUE_FLAGS:
                if not letters and not words:
                    raise SendmailExit(EX_USAGE, f"-{printable(flag, 10)} needs a value")
                value, letters = letters or words.pop(0), ""
                apply_sendmail_flag(flags, flag, value)
            else:
                raise SendmailExit(EX_USAGE, f"unknown flag -{printable(flag, 10)} (see "
                                             f"`minimail --help`, "
                                             f"The sendmail command)")
    return SendmailFlags(**flags), [a for word in recipients for a in split_addresses(word)]


def split_addresses(word):
    """The addresses in one recipient word, split at commas as sendmail(8)
    does, but not inside quotes, comments or angle brackets ('"a,b"@x' is one)."""
    addresses, current, depth, quoted, escaped = [], [], 0, False, False
    for c in word:
        if escaped:
            escaped = False
        elif c == "\\":
            escaped = True
        elif c == '"':
            quoted = not quoted
        elif not quoted and c in "(<":
            depth += 1
        elif not quoted and c in ")>":
            depth = max(0, depth - 1)
        elif c == "," and not quoted and depth == 0:
            addresses.append("".join(current))
            current = []
            continue
        current.append(c)
    addresses.append("".join(current))
    return [a.strip() for a in addresses if a.strip()]


def apply_sendmail_flag(flags, flag, value):
    if flag == "t":
        flags["recipients_from_header"] = True
    elif flag == "i" or (flag == "o" and value == "i"):
        flags["dot_ends"] = False
    elif flag == "v":
        flags["verbose"] = True
    elif flag in "fr":
        flags["sender"] = "" if value in ("<>", "") else value.strip("<>")
    elif flag == "F":
        flags["full_name"] = value
    elif flag == "B":
        if value.upper() not in ("8BITMIME", "7BIT"):
            raise SendmailExit(EX_USAGE, f"-B {printable(value, 100)}: the body type is 8BITMIME "
                                         f"or 7BIT")
        flags["body"] = value.upper()
    elif flag == "b":
        if value not in ("m", "p", "s", "i"):
            raise SendmailExit(EX_USAGE, f"-b{printable(value, 100)} is not supported here "
                                         f"(minimail's daemon "
                                         f"runs as `minimail start`)")
        flags["mode"] = value
    # the rest (-o..., -C, -L, -N, -R, -V, -X, -h, -O, -A, -p, -m, -n, -G, -U) mean nothing here


def sendmail_main(argv):
    """`minimail sendmail`, or minimail run as `sendmail`: the exit status."""
    try:
        flags, recipients = parse_sendmail_flags(argv)
        try:
            settings_file = SettingsFile.find()
            settings_file.check_options()
        except UsageError as exc:
            raise SendmailExit(EX_CONFIG, str(exc)) from None
        if flags.mode == "p":
            return show_queue(mailq_directory(settings_file), as_json=False,
                              admin=settings_file.admin)
        if flags.mode == "q":
            return flush(sendmail_pidfile(settings_file))
        if flags.mode == "i":
            return newaliases(settings_file.aliases)
        if flags.mode == "s":
            return smtp_on_stdio(settings_listen(settings_file))
        return submit_from_stdin(flags, recipients, settings_file)
    except SendmailExit as exc:
        print(f"minimail: {exc}", file=sys.stderr)
        return exc.status
    except Fatal as exc:
        print(f"minimail: {exc}", file=sys.stderr)
        return EX_UNAVAILABLE
    except KeyboardInterrupt:
        return EX_TEMPFAIL
    except BrokenPipeError:          # mailq | head: main() ends quietly
        raise
    except Exception as exc:         # never a traceback into cron's mail: one line
        print(f"minimail: internal error: {type(exc).__name__}: {printable(str(exc), 200)}",
              file=sys.stderr)
        return EX_SOFTWARE


def newaliases(path):
    """newaliases, sendmail -bi: check the aliases file and say how many
    aliases it holds (minimail reads it as it is: there is nothing to build).
    0, or 1 with a `file:line: problem` line for each problem."""
    try:
        aliases = Aliases.read(path)
    except FileNotFoundError:
        print(f"{path}: no such file: 0 aliases (local names go to MINIMAIL_ADMIN)")
        return EX_OK
    except OSError as exc:
        print(f"minimail: cannot read the aliases file {path}: {exc.strerror}", file=sys.stderr)
        return 1
    for number, problem in aliases.problems:
        print(f"{path}:{number}: {problem}", file=sys.stderr)
    count = len(aliases.table)
    print(f"{path}: {count} alias{'' if count == 1 else 'es'}")
    return 1 if aliases.problems else EX_OK


#: Where the machine's minimail keeps its queue: root's daemon, the service.
MACHINE_QUEUES = (ROOT_QUEUE, SERVICE_QUEUE)


def mailq_directory(settings_file, machine_queues=MACHINE_QUEUES):
    """The queue mailq lists: the settings file's --queue, a running daemon's
    (the user's own), the user's own queue if there is one, else the machine's
    minimail's (root's daemon's, the service's), which may need root to read."""
    found = queue_directory(None, settings_file, sendmail_pidfile(settings_file))
    if found != default_paths().queue or os.path.exists(found):
        return found
    return next((queue for queue in machine_queues if os.path.exists(queue)), found)


def sendmail_pidfile(settings_file):
    return os.path.abspath(settings_file.option("--pidfile") or default_paths().pidfile)


def settings_listen(settings_file):
    try:
        return settings_file.listen()
    except UsageError as exc:
        raise SendmailExit(EX_CONFIG, f"{settings_file.path}: {exc}") from None


def submit_from_stdin(flags, recipients, settings_file):
    """Read the message, address it and complete its header as an MTA would
    (see "Local mail"), submit it (or, when minimail cannot be reached, leave
    it in the maildrop)."""
    hostname = smtp_hostname()
    header, body = read_message(sys.stdin.buffer, flags.dot_ends)
    if flags.recipients_from_header:
        found, header = header_recipients(header)
        if not found and not recipients:
            raise SendmailExit(EX_DATAERR, "-t: no recipients in To, Cc or Bcc (is the message's "
                                           "header there?)")
        recipients = found + recipients
    if not recipients:
        raise SendmailExit(EX_USAGE, "no recipients given (name them, or use -t)")
    check_addresses(flags.sender or "", *recipients)
    if flags.full_name is not None and not flags.full_name.isprintable():
        raise SendmailExit(EX_USAGE, "-F: the name may hold no line breaks or control characters")
    sender, recipients, header, hostname = address_locally(flags, recipients, header,
                                                           settings_file, hostname)
    check_addresses(sender, *recipients)
    message = MessageFile(b"".join(line + b"\r\n" for line in header) + b"\r\n", body)
    options = []
    if flags.body == "7BIT":
        options.append("BODY=7BIT")
    elif flags.body == "8BITMIME" or message.eight_bit:
        options.append("BODY=8BITMIME")
    if not all(a.isascii() for a in (sender, *recipients)):
        options.append("SMTPUTF8")
    try:
        return submit(settings_listen(settings_file), sender, recipients, message, options,
                      flags.verbose, hostname)
    except Unreachable as exc:
        return keep_in_maildrop(exc, settings_file, sender, recipients, message, options)


def check_addresses(*addresses):
    for address in addresses:
        if address and not valid_address(address):
            raise SendmailExit(EX_USAGE, f"'{printable(address, 100)}' is not an address "
                                         f"(no line breaks, control characters or <>)")


def address_locally(flags, recipients, header, settings_file, hostname):
    """The sendmail command as the machine's MTA (see "Local mail" in --help):
    (the envelope sender, the recipients as the aliases lead, the header with
    its local addresses rewritten and Date, Message-ID and From added, and
    the mail name, which EHLO says too: a strict hoster refuses a bare one)."""
    names = MailNames(settings_file, hostname=hostname)
    aliases = Aliases.load(settings_file.aliases)
    recipients = deliverable(recipients, settings_file, aliases, names, show_notes=True)
    sender = envelope_sender(flags.sender, settings_file, names)
    delivered = lambda address: deliverable([address], settings_file, aliases, names, quiet=True)
    header = rewrite_header(header, names.is_local, names.masquerade(), delivered)
    mail_name = names.mail_name()
    header = completed_header(header, sender, flags.full_name, mail_name)
    return sender, recipients, header, mail_name


def read_message(stream, dot_ends):
    """(header lines, body) of standard input up to its end (or, unless -i, a
    line with a lone dot), with its line ends made CRLF.  The header is kept as
    lines, to be completed; the body goes to a temporary file as it comes, so
    a large message costs little memory."""
    try:
        head, ended, rest = read_head(stream, dot_ends)
        header, start = split_header(b"".join(line + b"\r\n" for line in head))
        body = MessageBody()
        body.write(start)
        if not ended:
            copy_body(stream, body, dot_ends, rest)
    except OSError as exc:
        raise SendmailExit(EX_TEMPFAIL, f"cannot keep the message in a temporary file in "
                                        f"{scratch_directory()}: {exc.strerror}") from None
    return header, body


def read_head(stream, dot_ends):
    """The message's first lines, without their line ends, up to the first that
    cannot be part of the header (at most HEADER_MAX bytes): (lines, whether
    the input ended, the start of a line too long to be a header line)."""
    lines, size = [], 0
    while size < HEADER_MAX:
        raw = stream.readline(HEADER_MAX)
        if len(raw) == HEADER_MAX and not raw.endswith(b"\n"):
            return lines, False, raw
        if not raw:
            return lines, True, b""
        line = raw.rstrip(b"\n").rstrip(b"\r")
        if dot_ends and line == b".":
            return lines, True, b""
        lines.append(line)
        size += len(raw)
        if not (HEADER_FIELD.match(line) or line[:1] in (b" ", b"\t")
                or (len(lines) == 1 and line.startswith(b"From "))):
            break
    return lines, False, b""


#: A line end as the sendmail command takes it: LF, after any CRs.
LINE_END = re.compile(rb"\r*\n")


def copy_body(stream, body, dot_ends, carry=b""):
    """The rest of standard input into body, chunk by chunk, with its line ends
    made CRLF, up to its end or (dot_ends) a line with a lone dot."""
    line_start = True                     # carry begins a line
    while True:
        chunk = stream.read1(CHUNK_SIZE)
        if not chunk:
            break
        data = carry + chunk
        end = data.rfind(b"\n") + 1
        if end:
            text, carry = data[:end], data[end:]
            text = LINE_END.sub(b"\r\n", text) if b"\r" in text else text.replace(b"\n", b"\r\n")
            cut = lone_dot(text, line_start) if dot_ends else -1
            body.write(text if cut < 0 else text[:cut])
            if cut >= 0:
                return
            line_start = True
        else:
            carry = data
        if len(carry) > CHUNK_SIZE:       # a long line goes on in pieces
            piece = carry.rstrip(b"\r") or carry[:-1]
            body.write(piece)
            carry, line_start = carry[len(piece):], False
    last = carry.rstrip(b"\r")
    if carry and not (dot_ends and line_start and last == b"."):
        body.write(last + b"\r\n")


def lone_dot(text, line_start):
    """Where the line with a lone dot begins in CRLF text, or -1."""
    if line_start and text.startswith(b".\r\n"):
        return 0
    found = text.find(b"\r\n.\r\n")
    return found + 2 if found >= 0 else -1


def scratch_directory():
    return os.environ.get("TMPDIR") or "/tmp"


def scratch_file():
    """A new temporary file without a name (0600), in $TMPDIR or /tmp: its descriptor."""
    directory = scratch_directory()
    try:
        return os.open(directory, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
            raise
    path = os.path.join(directory, f".minimail-{os.urandom(16).hex()}")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    os.unlink(path)
    return fd


def write_all(fd, data):
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


class MessageBody:
    """A message's body in a temporary file, written once as it is read."""

    def __init__(self):
        self.fd = scratch_file()
        self.size = 0
        self.eight_bit = False

    def write(self, data):
        self.eight_bit = self.eight_bit or not data.isascii()
        self.size += len(data)
        write_all(self.fd, data)


class MessageFile(io.RawIOBase):
    """The message as one file that can be read again from any point: its
    header's bytes, then the body's temporary file."""

    def __init__(self, head, body):
        super().__init__()
        self.head, self.body, self.position = head, body, 0
        self.size = len(head) + body.size
        self.eight_bit = body.eight_bit or not head.isascii()

    def readable(self):
        return True

    def seekable(self):
        return True

    def tell(self):
        return self.position

    def seek(self, offset, whence=io.SEEK_SET):
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.position, io.SEEK_END: self.size}[whence]
        self.position = max(0, base + offset)
        return self.position

    def readinto(self, buffer):
        """As much as fits, the header's end and the body's start together (a
        small message goes out in one block)."""
        view, done = memoryview(buffer).cast("B"), 0
        if self.position < len(self.head):
            data = self.head[self.position:self.position + len(view)]
            view[:len(data)] = data
            done = len(data)
        if done < len(view):
            data = os.pread(self.body.fd, len(view) - done, self.position + done - len(self.head))
            view[done:done + len(data)] = data
            done += len(data)
        self.position += done
        return done


HEADER_FIELD = re.compile(rb"[!-9;-~]+:")
#: The most of a message's header the sendmail command keeps in memory (the
#: rest, if a header is longer, goes on as the body's beginning).
HEADER_MAX = 1024 * 1024


def split_header(text):
    """(header lines, body): the header is the leading run of header fields and
    their continuations; a leading mbox "From " line is dropped.  A message with
    no header at all is all body."""
    lines = text.split(b"\r\n")
    if lines and lines[0].startswith(b"From "):
        lines.pop(0)
    header = []
    for i, line in enumerate(lines):
        if HEADER_FIELD.match(line) or (header and line[:1] in (b" ", b"\t")):
            header.append(line)
            continue
        if line == b"":
            i += 1                    # the empty line between header and body
        return header, b"\r\n".join(lines[i:])
    return header, b""


def fields(header):
    """[(lower-case name, value unfolded)] of header lines."""
    found = []
    for line in header:
        if line[:1] in (b" ", b"\t") and found:
            found[-1][1] += b" " + line.strip()
        else:
            name, _, value = line.partition(b":")
            found.append([name.strip().lower(), value.strip()])
    return [(n.decode("ascii", "replace"), v.decode("utf-8", "replace")) for n, v in found]


def header_recipients(header):
    """-t: the addresses in To, Cc and Bcc (Resent-To, -Cc, -Bcc if there are
    any Resent- fields), and the header without its Bcc fields."""
    from email.utils import getaddresses
    names = {name for name, _ in fields(header)}
    prefix = "resent-" if any(n.startswith("resent-") for n in names) else ""
    wanted = {prefix + kind for kind in ("to", "cc", "bcc")}
    values = [value for name, value in fields(header) if name in wanted]
    found = [address for _, address in getaddresses(values) if address]
    kept, dropping = [], False
    for line in header:
        if line[:1] in (b" ", b"\t"):
            if not dropping:
                kept.append(line)
            continue
        dropping = line.partition(b":")[0].strip().lower() in (b"bcc", b"resent-bcc")
        if not dropping:
            kept.append(line)
    return found, kept


def deliverable(recipients, settings_file, aliases=None, names=None, show_notes=False,
                quiet=False):
    """Recipients as the hoster must see them: a local name (cron mails root)
    is looked up in the aliases, and what stays local goes to the admin
    address.  Each once, in order.  quiet: a local name with no admin address
    to go to stays as it is (for the header), instead of SendmailExit 67."""
    aliases, names = aliases or Aliases(), names or MailNames(settings_file)
    result, shown = [], set()
    for recipient in recipients:
        found, notes = expand(recipient, aliases, names)
        for note in notes if show_notes else ():
            if note not in shown:
                print(f"minimail: {note}", file=sys.stderr)
                shown.add(note)
        if TO_ADMIN in found:
            admin = admin_address(settings_file, names)
            if not admin and quiet:
                return []
            if not admin:
                where = settings_file.path or os.path.expanduser("~/.config/minimail/minimail.conf")
                raise SendmailExit(EX_NOUSER, f"{recipient!r} is a local name, and no admin address "
                                              f"is set to send it to: set MINIMAIL_ADMIN=you@example.org "
                                              f"in {where}")
            found = [admin if address is TO_ADMIN else address for address in found]
        for address in found:
            if address not in result:
                result.append(address)
    return result


def envelope_sender(given, settings_file, names):
    """-f's address if it is a real one (or <>); a local one (-f root@HOST, as
    GNU mailutils passes), or none given, becomes the masqueraded sender."""
    if given == "" or (given and not names.is_local(given)):
        return given
    masqueraded = names.masquerade()
    if not masqueraded:
        where = settings_file.path or os.path.expanduser("~/.config/minimail/minimail.conf")
        raise SendmailExit(EX_CONFIG, f"no sender address for local mail: set "
                                      f"MINIMAIL_SENDER=you@example.org in {where}")
    return masqueraded


def top_level(value):
    """For each character of a header field's value: whether it is outside
    quotes, comments and <...>.  The comment depth at the end must be 0."""
    flags, quoted, depth, angle, escaped = [], False, 0, False, False
    for c in value:
        outside = not (quoted or depth or angle or escaped)
        if escaped:
            escaped = False
        elif c == "\\" and (quoted or depth):
            escaped = True
        elif quoted:
            quoted = c != '"'
        elif c == '"' and not depth:
            quoted = True
        elif c == "(":
            depth += 1
        elif c == ")" and depth:
            depth -= 1
        elif c == "<" and not depth:
            angle = True
        elif c == ">" and angle:
            angle = False
        flags.append(outside)
    return flags, not (quoted or depth or angle)


def split_mailboxes(value):
    """The mailboxes of an address field, as written (commas inside quotes,
    comments and <...> are no separators); None if the field holds a group
    or is not well formed (it is then left as it is)."""
    flags, closed = top_level(value)
    if not closed or any(f and c in ":;" for c, f in zip(value, flags)):
        return None
    pieces, start = [], 0
    for i, (c, outside) in enumerate(zip(value, flags)):
        if outside and c == ",":
            pieces.append(value[start:i].strip())
            start = i + 1
    pieces.append(value[start:].strip())
    return [p for p in pieces if p]


def parse_mailbox(text):
    """(display name, address) of one mailbox: `Name <addr>`, `addr (Name)`
    or a bare `addr`; the name as written ('' when there is none)."""
    flags, _ = top_level(text)
    opening = next((i for i, (c, f) in enumerate(zip(text, flags)) if f and c == "<"), -1)
    closing = text.find(">", opening) if opening >= 0 else -1
    if closing > 0:
        return text[:opening].strip(), text[opening + 1:closing].strip()
    comments = re.findall(r"\(((?:[^()\\]|\\.)*)\)", text)
    address = re.sub(r"\((?:[^()\\]|\\.)*\)", " ", text).strip()
    return " ".join(c.strip() for c in comments if c.strip()), address


def format_mailbox(name, address):
    """`name <address>`, the name quoted when it must be; a bare address without one."""
    if not name:
        return address
    plain = not name.startswith(('"', "=?"))
    if plain and re.search(r'[()<>\[\]:;@\\,"]', name):
        name = '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return f"{name} <{address}>"


def rewritten_field(value, replace):
    """The field's value with each local address replaced by replace(address)
    (a list of addresses; [] keeps it), or None when nothing changes."""
    mailboxes = split_mailboxes(value)
    if mailboxes is None:
        return None
    out, changed = [], False
    for mailbox in mailboxes:
        name, address = parse_mailbox(mailbox)
        new = replace(address) if address else []
        if not new:
            out.append(mailbox)
            continue
        changed = True
        name = name if len(new) == 1 else ""       # a name for one address, not for a list
        out += [format_mailbox(name, a) for a in new if format_mailbox(name, a) not in out]
    return out if changed else None


def fold(name, mailboxes):
    """A header field of several mailboxes as lines: one line if it fits in
    78 characters, else one mailbox on each."""
    line = f"{name}: {', '.join(mailboxes)}"
    if len(line) <= 78:
        return [line]
    return [f"{name}: {mailboxes[0]}" + ("," if len(mailboxes) > 1 else "")] + \
        [f" {m}" + ("," if i < len(mailboxes) - 1 else "") for i, m in enumerate(mailboxes) if i]


def rewrite_header(header, is_local, masqueraded, delivered):
    """The header lines with the local addresses (is_local) of From, Sender and
    Reply-To made the masqueraded sender, and those of To and Cc made where
    they go, delivered(address) (a list).  Other fields, and fields with no
    local address, stay as they are, byte for byte."""
    out, i = [], 0
    while i < len(header):
        end = i + 1
        while end < len(header) and header[end][:1] in (b" ", b"\t"):
            end += 1
        out += rewritten_lines(header[i:end], is_local, masqueraded, delivered)
        i = end
    return out


def rewritten_lines(lines, is_local, masqueraded, delivered):
    """One header field (its lines) rewritten as rewrite_header says."""
    name, _, first = lines[0].partition(b":")
    kind = name.strip().lower()
    if kind not in (b"from", b"sender", b"reply-to", b"to", b"cc"):
        return lines
    value = b" ".join([first.strip()] + [line.strip() for line in lines[1:]])
    text = value.decode("utf-8", "surrogateescape")
    if kind in (b"to", b"cc"):
        replace = lambda address: delivered(address) if is_local(address) else []
    else:
        replace = lambda address: [masqueraded] if masqueraded and is_local(address) else []
    mailboxes = rewritten_field(text, replace)
    if mailboxes is None:
        return lines
    field = name.decode("ascii", "replace").strip()
    return [line.encode("utf-8", "surrogateescape") for line in fold(field, mailboxes)]


def completed_header(header, sender, full_name, hostname):
    """The header with Date, Message-ID and From added where missing; nothing
    else is rewritten."""
    names = {name for name, _ in fields(header)}
    added = []
    if "date" not in names:
        added.append(f"Date: {rfc5322_date()}")
    if "message-id" not in names:
        added.append(f"Message-ID: <{time.time_ns()}.{os.getpid()}.{os.urandom(4).hex()}"
                     f"@{hostname}>")
    if "from" not in names:
        address = sender or f"MAILER-DAEMON@{hostname}"
        if full_name:
            from email.utils import formataddr
            address = formataddr((full_name, address))
        added.append(f"From: {address}")
    return header + [line.encode("utf-8") for line in added]


def connect_to_minimail(listen, verbose):
    """(where, an SmtpClient on a blocking socket to the local minimail); -v
    shows the dialogue on stderr, escaped.  Not smtplib: importing that takes
    longer than the interpreter needs to start, and cron runs this for every
    job's output."""
    family, ip, port = listen
    where = f"[{ip}]:{port}" if family == socket.AF_INET6 else f"{ip}:{port}"
    try:
        sock = socket.create_connection((ip, port), timeout=SUBMIT_TIMEOUT)
    except OSError as exc:
        text = (f"cannot reach minimail at {where}: {describe_error(exc)} (is it running? "
                f"minimail status)")
        if isinstance(exc, ConnectionRefusedError):          # nothing listens
            raise Unreachable("is not running", f"{where}: {describe_error(exc)}", text) from None
        raise SendmailExit(EX_TEMPFAIL, text) from None

    def show(direction, data):
        print(direction, printable(data, 300), file=sys.stderr)
    return where, SmtpClient(sock, show if verbose else None)


def submit(listen, sender, recipients, message, options, verbose, hostname):
    """Hand the message (something with .read(), at its start) to the local
    minimail, in as many transactions as it wants: the exit status, by sysexits.h."""
    where, client = connect_to_minimail(listen, verbose)
    try:
        try:
            client.greet(hostname)
            if "SMTPUTF8" in options and "SMTPUTF8" not in client.extensions:
                raise SendmailExit(EX_UNAVAILABLE, "the hoster takes no non-ASCII addresses "
                                                   "(no SMTPUTF8)")
            wanted = [o for o in options if o != "BODY=8BITMIME" or "8BITMIME" in client.extensions]
            results = submit_in_transactions(client, sender, recipients, wanted, message, where)
        except DialogueFailed as exc:
            if exc.gone:
                raise went_away(where, exc, None) from None
            if exc.reply is not None:
                raise SendmailExit(EX_UNAVAILABLE if exc.reply.code >= 500 else EX_TEMPFAIL,
                                   f"minimail at {where} answered {exc.reply}") from None
            raise SendmailExit(EX_TEMPFAIL, f"minimail at {where}: {exc}") from None
        client.quit()                     # the mail is taken: nothing else matters
    finally:
        client.sock.close()
    return submission_status(recipients, results)


def submit_in_transactions(client, sender, recipients, parameters, message, where):
    """{recipient: Reply}: a transaction, and another for the recipients it
    would not take (the local minimail takes 100 at a time)."""
    start = message.tell()
    results, todo = {}, list(recipients)
    while todo:
        message.seek(start)
        try:
            done = client.transaction(sender, todo, parameters, message)
        except DialogueFailed as exc:
            if exc.gone:                  # what is not taken yet goes to the maildrop
                answered = {r: reply for r, reply in results.items() if r not in todo}
                raise went_away(where, exc, todo, answered) from None
            raise
        if done.refused is not None:
            raise SendmailExit(EX_UNAVAILABLE if done.refused.code >= 500 else EX_TEMPFAIL,
                               f"minimail at {where} answered {done.refused}")
        results.update(done.results)
        todo = done.rest
    return results


def submission_status(recipients, results):
    """EX_OK if every recipient was accepted; else one line quoting a reply:
    75 if any got a 4xx (try again later), 67 if all that failed got a 5xx."""
    failed = [(r, results[r]) for r in recipients if not 200 <= results[r].code < 300]
    if not failed:
        return EX_OK
    later = [(r, reply) for r, reply in failed if reply.code < 500]
    recipient, reply = (later or failed)[0]
    status = EX_TEMPFAIL if later else EX_NOUSER
    if len(failed) == len(recipients):
        raise SendmailExit(status, f"every recipient was refused: {reply}")
    raise SendmailExit(status, f"{len(failed)} of {len(recipients)} recipients were not "
                               f"accepted, <{printable(recipient, 100)}> with: {reply}")


def went_away(where, exc, pending, answered=None):
    """minimail went away before its final reply: the mail, or the recipients
    still pending, may go to the maildrop (answered: its replies for the others,
    from the transactions before)."""
    return Unreachable("went away", f"{where}: {exc}", f"minimail at {where}: {exc}",
                       pending=pending, answered=answered)


def keep_in_maildrop(unreachable, settings_file, sender, recipients, message, options):
    """minimail cannot be reached: leave the message in its queue's maildrop,
    which it takes in when it starts (exit 0).  With no maildrop, exit 75."""
    queue, maildrop = find_maildrop(settings_file)
    if maildrop is None:
        raise unreachable
    where = os.path.join(queue, MAILDROP)
    try:
        if message.size > maildrop_size_limit(settings_file):
            raise SendmailExit(EX_TEMPFAIL, f"{unreachable}; the message ({message.size} bytes) "
                                            f"is larger than --max-size: not kept in {where}")
        pending = recipients if unreachable.pending is None else unreachable.pending
        for first in range(0, len(pending), MAX_RECIPIENTS):     # each one the daemon takes
            envelope = maildrop_envelope(sender, pending[first:first + MAX_RECIPIENTS], options)
            write_to_maildrop(maildrop, envelope, message)
    except OSError as exc:
        raise SendmailExit(EX_TEMPFAIL, f"{unreachable}; and {where} cannot keep the mail: "
                                        f"{exc.strerror}") from None
    finally:
        os.close(maildrop)
    print(f"minimail: minimail {unreachable.what} ({unreachable.detail}): the mail waits in "
          f"{where} and goes out once minimail runs", file=sys.stderr)
    kept = Reply(250, [f"kept in {where}"])
    return submission_status(recipients, {**dict.fromkeys(recipients, kept),
                                          **unreachable.answered})


def maildrop_size_limit(settings_file):
    """The largest message the daemon takes from the maildrop: --max-size in
    the settings file, else its default."""
    try:
        return parse_count(settings_file.option("--max-size") or str(MAX_SIZE_DEFAULT),
                           "--max-size")
    except UsageError as exc:
        raise SendmailExit(EX_CONFIG, f"{settings_file.path}: {exc}") from None


def find_maildrop(settings_file):
    """(queue, the maildrop's descriptor, O_PATH) as the daemon would have made
    it: --queue in the settings file, else the daemon's default queue (this
    user's own, root's, the service's); (None, None) if there is none."""
    options = split_argv(settings_file.options)[0]
    if any(name == "--no-queue" for name, _ in options):
        return None, None
    named = settings_file.option("--queue")
    for queue in [os.path.abspath(named)] if named else \
            dict.fromkeys((default_paths().queue, *MACHINE_QUEUES)):
        maildrop = open_maildrop(queue)
        if maildrop is not None:
            return queue, maildrop
    return None, None


def open_maildrop(queue):
    """The queue's maildrop (O_PATH: it may be entered, not read), if it is
    what the daemon makes: a directory, no link, sticky, owned by the queue's
    owner; else None."""
    flags = os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC
    try:
        parent = os.open(queue, flags)
    except OSError:
        return None
    try:
        maildrop = os.open(MAILDROP, flags | os.O_NOFOLLOW, dir_fd=parent)
        owner = os.fstat(parent).st_uid
    except OSError:
        return None
    finally:
        os.close(parent)
    st = os.fstat(maildrop)
    if st.st_uid != owner or not st.st_mode & stat.S_ISVTX or not st.st_mode & stat.S_IWOTH:
        os.close(maildrop)
        return None
    return maildrop


def maildrop_envelope(sender, recipients, options):
    """The first line of a maildrop file: what the daemon needs besides the text."""
    import json
    body = next((o.partition("=")[2] for o in options if o.startswith("BODY=")), None)
    envelope = {"sender": sender, "recipients": recipients, "body": body,
                "smtputf8": "SMTPUTF8" in options}
    return MAILDROP_LINE + json.dumps(envelope).encode("ascii") + b"\r\n"


def write_to_maildrop(maildrop, envelope, message):
    """Write a dot-named file (never read by the daemon while it is written),
    fsync it, rename it to an unguessable name, make the rename durable."""
    temporary, name = f".{os.urandom(16).hex()}", os.urandom(16).hex()
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 MAILDROP_FILE_MODE, dir_fd=maildrop)
    try:
        os.fchmod(fd, MAILDROP_FILE_MODE)           # not cut by the umask
        write_all(fd, envelope)
        message.seek(0)
        while True:
            chunk = message.read(CHUNK_SIZE)
            if not chunk:
                break
            write_all(fd, chunk)
        os.fsync(fd)
        os.rename(temporary, name, src_dir_fd=maildrop, dst_dir_fd=maildrop)
    except OSError:
        remove_quietly(temporary, maildrop)
        raise
    else:
        sync_maildrop(maildrop, fd)
    finally:
        os.close(fd)


def sync_maildrop(maildrop, fd):
    """Make the rename durable: fsync the directory, if this user may open it;
    else fsync the file once more (the rename changed its ctime, so ext4's and
    XFS's fsync commits the journal that holds the rename)."""
    try:
        directory = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=maildrop)
    except PermissionError:
        os.fsync(fd)
        return
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def smtp_on_stdio(listen):
    """-bs: an SMTP session on standard input and output, spliced to minimail."""
    family, ip, port = listen
    try:
        sock = socket.create_connection((ip, port), timeout=SUBMIT_TIMEOUT)
    except OSError as exc:
        raise SendmailExit(EX_TEMPFAIL, f"cannot reach minimail at {ip}:{port}: "
                                        f"{describe_error(exc)} (is it running?)") from None
    sock.settimeout(None)
    stdin, stdout = sys.stdin.buffer.fileno(), sys.stdout.buffer.fileno()
    poller = select.poll()
    poller.register(stdin, select.POLLIN)
    poller.register(sock, select.POLLIN)
    with sock:
        while True:
            for fd, _ in poller.poll():
                if fd == stdin:
                    data = os.read(stdin, 65536)
                    if not data:
                        poller.unregister(stdin)
                        sock.shutdown(socket.SHUT_WR)
                    else:
                        sock.sendall(data)
                else:
                    data = sock.recv(65536)
                    if not data:
                        return EX_OK
                    view = memoryview(data)
                    while view:
                        view = view[os.write(stdout, view):]


# ---------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------

def docopt_usage():
    """The usage lines of the docstring."""
    return __doc__[__doc__.index("Usage:"):__doc__.index("Commands:")].rstrip()


def main(argv=None):
    """Run minimail; return its exit status.  A reader that goes away early
    (`minimail queue | head -1`) ends it quietly, as it does other Unix tools:
    no traceback, the status of a process that SIGPIPE ended."""
    try:
        status = run_command(argv)
        sys.stdout.flush()
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())   # nothing left to flush
        return 128 + signal.SIGPIPE
    return status


def run_command(argv):
    """main() without its care for a closed standard output."""
    name = os.path.basename(sys.argv[0]) if argv is None else "minimail"
    argv = sys.argv[1:] if argv is None else list(argv)
    if name == "sendmail":
        return sendmail_main(argv)
    if name == "mailq":
        return sendmail_main(["-bp"])
    if name == "newaliases":         # a symlink, as every MTA installs it: never a daemon
        return sendmail_main(["-bi", *argv])
    if argv[:1] == ["sendmail"]:
        return sendmail_main(argv[1:])
    from docopt import DocoptExit, docopt
    try:
        argv, settings_file = with_settings_file(argv)
        args = docopt(__doc__, argv, version=f"minimail {__version__}")
    except SettingsRefused as exc:
        print(f"minimail: {exc}", file=sys.stderr)
        return 2
    except UsageError as exc:
        print(f"minimail: {exc}", docopt_usage(), "Try 'minimail --help'.", sep="\n", file=sys.stderr)
        return 2
    except DocoptExit as exc:
        complaint = str(exc).partition("\n")[0]
        print(f"minimail: {explain_usage_error(argv, complaint)}", file=sys.stderr)
        print(docopt_usage(), "Try 'minimail --help'.", sep="\n", file=sys.stderr)
        return 2
    try:
        return dispatch(args, settings_file)
    except UsageError as exc:
        print(f"minimail: {exc}\nTry 'minimail --help'.", file=sys.stderr)
        return 2
    except Fatal as exc:
        print(f"minimail: {exc}", file=sys.stderr)
        return 1


def queue_ids(words):
    """The queue IDs named on the command line (upper-cased), each once."""
    ids = []
    for word in words:
        if not QUEUE_ID.fullmatch(word.upper()):
            raise UsageError(f"{printable(word, 40)!r} is not a queue ID (16 hex digits, "
                             f"as `minimail queue` shows them)")
        if word.upper() not in ids:
            ids.append(word.upper())
    return ids


def with_settings_file(argv):
    """(argv with the settings file's options where they apply, the settings file)."""
    options, positional = split_argv(argv)
    explicit = [value for name, value in options if name == "--config"]
    settings_file = SettingsFile.find(explicit[-1] if explicit else None)
    command = next((word for word in positional if word in COMMANDS), "start")
    if command in ("start", "restart", "check"):
        argv = merge_settings_file(argv, settings_file)
    return argv, settings_file


def dispatch(args, settings_file):
    """Run the command that args name."""
    pidfile = os.path.abspath(args["--pidfile"] or settings_file.option("--pidfile")
                              or default_paths().pidfile)
    if args["stop"]:
        return stop(pidfile)
    if args["status"]:
        return status(pidfile, args["--json"],
                      queue_directory(args["--queue"], settings_file, pidfile))
    if args["flush"]:
        return flush(pidfile)
    if args["delete"]:
        return delete(queue_directory(args["--queue"], settings_file, pidfile),
                      queue_ids(args["ID"]))
    if args["queue"]:
        log_to_stderr(args["--verbose"])
        return show_queue(queue_directory(args["--queue"], settings_file, pidfile), args["--json"],
                          settings_file.admin)
    settings = Settings(args, settings_file)
    if args["check"]:
        if not settings.destination:
            raise UsageError("check tries ssh: it needs DESTINATION, not --tunnel-command")
        logging.disable(logging.NOTSET if settings.verbose else logging.CRITICAL)
        log_to_stderr(settings.verbose)
        user, invoker = target_user(settings), pwd.getpwuid(os.getuid()).pw_name
        if user is not None:              # ssh runs as the daemon's would: that user's keys
            preload()
            drop_privileges(user)
        return check(settings, settings_file, invoker)
    if args["restart"] and daemon_pid(settings.pidfile or pidfile):
        stop(settings.pidfile or pidfile)
    return start(settings, foreground=args["--foreground"])


if __name__ == "__main__":
    sys.exit(main())
